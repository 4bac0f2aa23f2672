// out[T, N] (+)= x[T, K] · Wᵀ for few tokens (decode), W block-quantized.
//
// The shape of matmul_vec.wgsl (NR consecutive rows of one segment per workgroup, one
// token per z, partial sums reduced across the workgroup at the end) with the weight read a
// group of eight elements at a time and dequantized in registers by weight_quant.wgsl:
// thread i takes groups i, i + WG, ... of each row, so neighbouring threads read
// neighbouring words. K is a multiple of the block size QK (checked at upload). x comes
// through matmul_x.wgsl (plain, or with the RMSNorm / SwiGLU in front folded in).
//
// Dispatch: x·y = ceil(seg_rows / NR) row groups (linearised), z = T.

#include "include/weight_quant.wgsl"
#include "include/matmul_x.wgsl"

const WG: u32 = 64u;
// Rows of W per workgroup (one vec4 of partial sums per thread).
const NR: u32 = 4u;

struct Params {
    num_tokens: u32,  // T
    k: u32,           // K: columns of x and of W (a multiple of QK)
    n: u32,           // N: row stride of out (all rows of the stacked weight)
    ks: u32,          // K again (row stride of the segment in elements)
    seg_rows: u32,    // rows of W in this segment
    col0: u32,        // output column of the segment's first row
    accumulate: u32,  // 1: out += x·Wᵀ, 0: out = x·Wᵀ
    eps: f32,         // RMSNorm epsilon (NORM)
}

// binding 0: the weight segment `w` [seg_rows, K / QK, BLOCK_WORDS] (see weight_quant.wgsl)
// binding 1 (and 3): x, see matmul_x.wgsl
@group(0) @binding(2) var<storage, read_write> out: array<f32>; // [T, N]
@group(1) @binding(0) var<uniform> p: Params;

// Partial sums of the NR rows: [subgroups] with SUBGROUP, else [WG].
var<workgroup> red: array<vec4<f32>, WG>;

@compute @workgroup_size(WG)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
#ifdef SUBGROUP
    @builtin(subgroup_invocation_id) sg_lane: u32,
    @builtin(subgroup_id) sg_id: u32,
    @builtin(num_subgroups) sg_count: u32,
#endif
) {
    let r0 = (wid.x + wid.y * nwg.x) * NR;
    if r0 >= p.seg_rows {
        return;
    }
    let t = wid.z;
    x_begin(t, lid);
    let groups = p.k / 8u;
    let row_words = (p.k / QK) * BLOCK_WORDS;
    let nr = min(NR, p.seg_rows - r0);
    var acc = vec4<f32>(0.0);
    for (var j = lid; j < groups; j += WG) {
        let xa = x_at4(t, 2u * j);
        let xc = x_at4(t, 2u * j + 1u);
        let b = (j / (QK / 8u)) * BLOCK_WORDS;
        let g = j % (QK / 8u);
        for (var r = 0u; r < nr; r++) {
            let v = w_group8((r0 + r) * row_words + b, g);
            acc[r] += dot(v.lo, xa) + dot(v.hi, xc);
        }
    }

#ifdef SUBGROUP
    let s = subgroupAdd(acc);
    if sg_lane == 0u {
        red[sg_id] = s;
    }
    workgroupBarrier();
    if lid < nr {
        var total = 0.0;
        for (var i = 0u; i < sg_count; i++) {
            total += red[i][lid];
        }
        store(t, r0 + lid, total);
    }
#else
    red[lid] = acc;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s = s / 2u) {
        if lid < s {
            red[lid] = red[lid] + red[lid + s];
        }
        workgroupBarrier();
    }
    if lid < nr {
        store(t, r0 + lid, red[0][lid]);
    }
#endif
}

fn store(t: u32, r: u32, v: f32) {
    let o = t * p.n + p.col0 + r;
    if p.accumulate != 0u {
        out[o] += v;
    } else {
        out[o] = v;
    }
}
