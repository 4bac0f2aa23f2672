// out[T, N] (+)= x[T, K] · Wᵀ for many tokens (prefill): a tiled matrix-matrix product.
//
// Prefill reuses each weight element for every token of the chunk, so the kernel is shaped
// for reuse: a 16×16 workgroup computes a TM×TN tile of out (TM tokens × TN weight rows),
// staging TK-wide slices of x and W in workgroup memory; each thread owns a 4×4 block of the
// tile, strided by 16 so that neighbouring threads write neighbouring outputs. Float weight
// formats come from weight_float.wgsl (widened to f32 when staged).
//
// Dispatch: x = ceil(seg_rows / TN), y = ceil(T / TM).

#include "include/weight_float.wgsl"

const TM: u32 = 64u;  // tokens per tile
const TN: u32 = 64u;  // weight rows per tile
const TK: u32 = 16u;  // K per stage (even: W is staged a pair at a time)

struct Params {
    num_tokens: u32,  // T
    k: u32,           // K: columns of x and of W
    n: u32,           // N: row stride of out (all rows of the stacked weight)
    ks: u32,          // row stride of the segment in elements (K rounded up to even)
    seg_rows: u32,    // rows of W in this segment
    col0: u32,        // output column of the segment's first row
    accumulate: u32,  // 1: out += x·Wᵀ, 0: out = x·Wᵀ
    eps: f32,         // unused here
}

// binding 0: the weight segment `w` [seg_rows, ks] (see weight_float.wgsl)
@group(0) @binding(1) var<storage, read> x: array<f32>;         // [T, K]
@group(0) @binding(2) var<storage, read_write> out: array<f32>; // [T, N]
@group(1) @binding(0) var<uniform> p: Params;

var<workgroup> xs: array<f32, TM * TK>;  // [TM, TK] slice of x
var<workgroup> ws: array<f32, TN * TK>;  // [TN, TK] slice of W

@compute @workgroup_size(16, 16)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_id) lid3: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let n0 = wid.x * TN;
    let t0 = wid.y * TM;
    let wrow = p.ks / 2u;
    var acc: array<vec4<f32>, 4>;  // acc[i][j]: token t0 + ty + 16i, row n0 + tx + 16j
    for (var k0 = 0u; k0 < p.k; k0 += TK) {
        for (var i = 0u; i < TM * TK / 256u; i++) {
            let e = lid + i * 256u;
            let t = t0 + e / TK;
            let k = k0 + e % TK;
            var v = 0.0;
            if t < p.num_tokens && k < p.k {
                v = x[t * p.k + k];
            }
            xs[e] = v;
        }
        for (var i = 0u; i < TN * TK / 512u; i++) {
            let e = lid + i * 256u;  // pair index in the [TN, TK/2] slice
            let r = e / (TK / 2u);
            let kp = e % (TK / 2u);
            let k = k0 + 2u * kp;
            var v = vec2<f32>(0.0);
            if n0 + r < p.seg_rows && k < p.k {
                // k + 1 is inside the row stride; past K it is the zero padding.
                v = w_pair((n0 + r) * wrow + k / 2u);
            }
            ws[r * TK + 2u * kp] = v.x;
            ws[r * TK + 2u * kp + 1u] = v.y;
        }
        workgroupBarrier();
        for (var kk = 0u; kk < TK; kk++) {
            let b = vec4<f32>(
                ws[lid3.x * TK + kk],
                ws[(lid3.x + 16u) * TK + kk],
                ws[(lid3.x + 32u) * TK + kk],
                ws[(lid3.x + 48u) * TK + kk],
            );
            for (var i = 0u; i < 4u; i++) {
                acc[i] += xs[(lid3.y + 16u * i) * TK + kk] * b;
            }
        }
        workgroupBarrier();
    }
    for (var i = 0u; i < 4u; i++) {
        let t = t0 + lid3.y + 16u * i;
        for (var j = 0u; j < 4u; j++) {
            let r = n0 + lid3.x + 16u * j;
            if t < p.num_tokens && r < p.seg_rows {
                let o = t * p.n + p.col0 + r;
                if p.accumulate != 0u {
                    out[o] += acc[i][j];
                } else {
                    out[o] = acc[i][j];
                }
            }
        }
    }
}
