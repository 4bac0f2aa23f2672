// out[rows, C] = x / rms(x) * w, one workgroup per row.
//
// Matches the CPU reference: mean of squares, then x · (1/sqrt(ms + eps)) · w in that order.

const WG: u32 = 64u;

#include "include/reduce.wgsl"

struct Params {
    rows: u32,  // rows to normalise
    cols: u32,  // C
    eps: f32,
    _pad: u32,
}

@group(0) @binding(0) var<storage, read> w: array<f32>;         // [C] norm weight (f32)
@group(0) @binding(1) var<storage, read> x: array<f32>;         // [rows, C]
@group(0) @binding(2) var<storage, read_write> out: array<f32>; // [rows, C]
@group(1) @binding(0) var<uniform> p: Params;

@compute @workgroup_size(WG)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let row = wid.x + wid.y * nwg.x;
    if row >= p.rows {
        return;
    }
    let base = row * p.cols;
    var ss = 0.0;
    for (var i = lid; i < p.cols; i += WG) {
        let v = x[base + i];
        ss += v * v;
    }
    let total = wg_sum(ss, lid);
    let inv = 1.0 / sqrt(total / f32(p.cols) + p.eps);
    for (var i = lid; i < p.cols; i += WG) {
        out[base + i] = x[base + i] * inv * w[i];
    }
}
