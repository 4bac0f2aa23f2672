// out[T, N] (+)= x[T, K] · Wᵀ for few tokens (decode): matrix-vector products.
//
// Decode reads every weight once per token, so the kernel is shaped for bandwidth: a
// workgroup owns NR consecutive rows of one weight segment for one token, its threads
// stride over K two elements (one packed word) at a time, and the NR partial sums are
// reduced across the workgroup at the end (x comes through matmul_x.wgsl: plain, or with
// the RMSNorm / SwiGLU in front folded in) — through subgroup sums when the adapter has
// subgroups (SUBGROUP), else a tree in workgroup memory. Float weight formats come from
// weight_float.wgsl; block-quantized formats get their own matmul_vec_<dtype>.wgsl.
//
// Dispatch: x·y = ceil(seg_rows / NR) row groups (linearised), z = T.

#include "include/weight_float.wgsl"
#include "include/matmul_x.wgsl"

const WG: u32 = 64u;
// Rows of W per workgroup (one vec4 of partial sums per thread).
const NR: u32 = 4u;

struct Params {
    num_tokens: u32,  // T
    k: u32,           // K: columns of x and of W
    n: u32,           // N: row stride of out (all rows of the stacked weight)
    ks: u32,          // row stride of the segment in elements (K rounded up to even)
    seg_rows: u32,    // rows of W in this segment
    col0: u32,        // output column of the segment's first row
    accumulate: u32,  // 1: out += x·Wᵀ, 0: out = x·Wᵀ
    eps: f32,         // RMSNorm epsilon (NORM)
}

// binding 0: the weight segment `w` [seg_rows, ks] (see weight_float.wgsl)
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
    let pairs = (p.k + 1u) / 2u;
    let wrow = p.ks / 2u;  // pairs per weight row
    let nr = min(NR, p.seg_rows - r0);
    var acc = vec4<f32>(0.0);
    for (var j = lid; j < pairs; j += WG) {
        let k = 2u * j;
        var xv = vec2<f32>(x_at(t, k), 0.0);
        if k + 1u < p.k {
            xv.y = x_at(t, k + 1u);
        }
        for (var r = 0u; r < nr; r++) {
            acc[r] += dot(w_pair((r0 + r) * wrow + j), xv);
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
