// out[R, C] = x[logits_rows]: keeps the rows whose logits are wanted.

const WG: u32 = 64u;

struct Params {
    num_rows: u32,         // R
    cols: u32,             // C
    logits_rows_off: u32,  // offset of logits_rows[R] in `batch`
    _pad: u32,
}

@group(0) @binding(0) var<storage, read> x: array<f32>;         // [T, C]
@group(0) @binding(1) var<storage, read> batch: array<u32>;     // the step's batch words
@group(0) @binding(2) var<storage, read_write> out: array<f32>; // [R, C]
@group(1) @binding(0) var<uniform> p: Params;

@compute @workgroup_size(WG)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let idx = (wid.x + wid.y * nwg.x) * WG + lid;
    if idx >= p.num_rows * p.cols {
        return;
    }
    let i = idx / p.cols;
    let c = idx % p.cols;
    out[idx] = x[batch[p.logits_rows_off + i] * p.cols + c];
}
