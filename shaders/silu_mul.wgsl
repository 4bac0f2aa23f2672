// out[rows, F] = silu(gate_up[:, :F]) * gate_up[:, F:], one thread per output element.

const WG: u32 = 64u;

struct Params {
    rows: u32,  // rows to compute
    ffn: u32,   // F
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<storage, read> gate_up: array<f32>;   // [rows, 2F]
@group(0) @binding(1) var<storage, read_write> out: array<f32>; // [rows, F]
@group(1) @binding(0) var<uniform> p: Params;

@compute @workgroup_size(WG)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let idx = (wid.x + wid.y * nwg.x) * WG + lid;
    if idx >= p.rows * p.ffn {
        return;
    }
    let r = idx / p.ffn;
    let c = idx % p.ffn;
    let g = gate_up[r * 2u * p.ffn + c];
    let u = gate_up[r * 2u * p.ffn + p.ffn + c];
    out[idx] = g / (1.0 + exp(-g)) * u;
}
