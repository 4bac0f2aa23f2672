// out[T, N] (+)= x[T, K] · Wᵀ for many tokens (prefill), W block-quantized.
//
// The tiling of matmul_mat.wgsl (a 16×16 workgroup computes a TM×TN tile, each thread a
// 4×4 block strided by 16) with TK = 32: each stage dequantizes a [TN, 32] slice of W into
// workgroup memory — one group of eight elements per thread, by weight_quant.wgsl — so the
// dequantization is paid once per tile, not once per token. K is a multiple of QK (≥ 32).
//
// Dispatch: x = ceil(seg_rows / TN), y = ceil(T / TM).

#include "include/weight_quant.wgsl"

const TM: u32 = 64u;  // tokens per tile
const TN: u32 = 64u;  // weight rows per tile
const TK: u32 = 32u;  // K per stage: four groups of eight

struct Params {
    num_tokens: u32,  // T
    k: u32,           // K: columns of x and of W (a multiple of QK)
    n: u32,           // N: row stride of out (all rows of the stacked weight)
    ks: u32,          // K again (row stride of the segment in elements)
    seg_rows: u32,    // rows of W in this segment
    col0: u32,        // output column of the segment's first row
    accumulate: u32,  // 1: out += x·Wᵀ, 0: out = x·Wᵀ
    eps: f32,         // unused here
}

// binding 0: the weight segment `w` [seg_rows, K / QK, BLOCK_WORDS] (see weight_quant.wgsl)
@group(0) @binding(1) var<storage, read> x: array<vec4<f32>>;   // [T, K / 4]
@group(0) @binding(2) var<storage, read_write> out: array<f32>; // [T, N]
@group(1) @binding(0) var<uniform> p: Params;

var<workgroup> xs: array<f32, TM * TK>;  // [TM, TK] slice of x
var<workgroup> ws: array<f32, TN * TK>;  // [TN, TK] slice of W, dequantized

@compute @workgroup_size(16, 16)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_id) lid3: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let n0 = wid.x * TN;
    let t0 = wid.y * TM;
    let k4 = p.k / 4u;
    let row_words = (p.k / QK) * BLOCK_WORDS;
    var acc: array<vec4<f32>, 4>;  // acc[i][j]: token t0 + ty + 16i, row n0 + tx + 16j
    for (var k0 = 0u; k0 < p.k; k0 += TK) {
        // x: [TM, TK / 4] vec4s, two per thread.
        for (var i = 0u; i < 2u; i++) {
            let e = lid + i * 256u;
            let t = t0 + e / (TK / 4u);
            let q = e % (TK / 4u);
            var v = vec4<f32>(0.0);
            if t < p.num_tokens {
                v = x[t * k4 + k0 / 4u + q];
            }
            xs[e * 4u] = v.x;
            xs[e * 4u + 1u] = v.y;
            xs[e * 4u + 2u] = v.z;
            xs[e * 4u + 3u] = v.w;
        }
        // W: [TN, TK / 8] groups of eight, one per thread.
        {
            let r = lid / 4u;
            let kg = k0 + 8u * (lid % 4u);
            var v = Group8(vec4<f32>(0.0), vec4<f32>(0.0));
            if n0 + r < p.seg_rows {
                v = w_group8((n0 + r) * row_words + (kg / QK) * BLOCK_WORDS, (kg % QK) / 8u);
            }
            let o = r * TK + 8u * (lid % 4u);
            ws[o] = v.lo.x;
            ws[o + 1u] = v.lo.y;
            ws[o + 2u] = v.lo.z;
            ws[o + 3u] = v.lo.w;
            ws[o + 4u] = v.hi.x;
            ws[o + 5u] = v.hi.y;
            ws[o + 6u] = v.hi.z;
            ws[o + 7u] = v.hi.w;
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
