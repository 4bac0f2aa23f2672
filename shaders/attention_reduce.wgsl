// out[T, H·D]: combines the partial attention results of `attention.wgsl` with `SPLIT`
// (flash-decoding). Split s of a (token, head) holds acc_s[D] = Σ exp(score - m_s)·v over its
// positions, its max m_s and its sum l_s; with M = max m_s, the output is
// Σ exp(m_s - M)·acc_s / Σ exp(m_s - M)·l_s. Empty splits (l_s = 0, m_s = -3e38) add nothing.
//
// One workgroup per (token, head); each thread owns output dimensions lid, lid + WG, ...

const WG: u32 = 64u;

struct Params {
    num_tokens: u32,  // T
    num_heads: u32,   // H
    head_dim: u32,    // D
    num_splits: u32,  // splits per (token, head)
}

@group(0) @binding(0) var<storage, read> part: array<f32>;       // [T·H·splits, D + 2]
@group(0) @binding(1) var<storage, read_write> out: array<f32>;  // [T, H·D]
@group(1) @binding(0) var<uniform> p: Params;

@compute @workgroup_size(WG)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let job = wid.x + wid.y * nwg.x;
    if job >= p.num_tokens * p.num_heads {
        return;
    }
    let d = p.head_dim;
    let stride = d + 2u;
    let base = job * p.num_splits * stride;
    var m = -3.0e38;
    for (var s = 0u; s < p.num_splits; s++) {
        m = max(m, part[base + s * stride + d]);
    }
    var l = 0.0;
    for (var s = 0u; s < p.num_splits; s++) {
        l += exp(part[base + s * stride + d] - m) * part[base + s * stride + d + 1u];
    }
    let inv = 1.0 / l;
    // job = row · H + head, and out rows are H·D wide: the output starts at job · D.
    for (var dd = lid; dd < d; dd += WG) {
        var acc = 0.0;
        for (var s = 0u; s < p.num_splits; s++) {
            let ps = base + s * stride;
            acc += exp(part[ps + d] - m) * part[ps + dd];
        }
        out[job * d + dd] = acc * inv;
    }
}
