// On the fused qkv[T, (H+2Hkv)·D]: per-head RMSNorm of q and k (when their norm weights are
// given), then rotate-half RoPE at each token's position. One workgroup per (token, head)
// for the H + Hkv heads of q and k; v is left alone.
//
// cos/sin come from a host-made table (`rope[P, D]`: D/2 cosines then D/2 sines per
// position) computed exactly as the CPU backend computes them, so that long positions round
// the same way on every device instead of depending on the GPU's sin/cos precision.

const WG: u32 = 64u;

#include "include/reduce.wgsl"

struct Params {
    num_tokens: u32,     // T
    num_heads: u32,      // H
    num_kv_heads: u32,   // Hkv
    head_dim: u32,       // D
    qkv_width: u32,      // (H+2Hkv)·D
    eps: f32,
    has_q_norm: u32,     // 1 when q_norm holds the q norm weight
    has_k_norm: u32,     // 1 when k_norm holds the k norm weight
    positions_off: u32,  // offset of positions[T] in `batch`
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<storage, read> q_norm: array<f32>;    // [D] (a dummy when absent)
@group(0) @binding(1) var<storage, read> k_norm: array<f32>;    // [D] (a dummy when absent)
@group(0) @binding(2) var<storage, read> rope: array<f32>;      // [P, D]: cos[D/2] | sin[D/2]
@group(0) @binding(3) var<storage, read> batch: array<u32>;     // the step's batch words
@group(0) @binding(4) var<storage, read_write> qkv: array<f32>; // [T, (H+2Hkv)·D]
@group(1) @binding(0) var<uniform> p: Params;

@compute @workgroup_size(WG)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let heads = p.num_heads + p.num_kv_heads;
    let job = wid.x + wid.y * nwg.x;
    if job >= p.num_tokens * heads {
        return;
    }
    let row = job / heads;
    let head = job % heads;
    let d = p.head_dim;
    let half = d / 2u;
    let base = row * p.qkv_width + head * d;
    let is_q = head < p.num_heads;
    let normed = (is_q && p.has_q_norm != 0u) || (!is_q && p.has_k_norm != 0u);

    var ss = 0.0;
    for (var i = lid; i < d; i += WG) {
        let v = qkv[base + i];
        ss += v * v;
    }
    let total = wg_sum(ss, lid);
    let inv = 1.0 / sqrt(total / f32(d) + p.eps);

    let angles = batch[p.positions_off + row] * d;
    // Each thread owns the pairs (i, i + D/2) it reads and writes: no other thread touches them.
    for (var i = lid; i < half; i += WG) {
        var x0 = qkv[base + i];
        var x1 = qkv[base + i + half];
        if normed {
            if is_q {
                x0 = x0 * inv * q_norm[i];
                x1 = x1 * inv * q_norm[i + half];
            } else {
                x0 = x0 * inv * k_norm[i];
                x1 = x1 * inv * k_norm[i + half];
            }
        }
        let c = rope[angles + i];
        let s = rope[angles + half + i];
        qkv[base + i] = x0 * c - x1 * s;
        qkv[base + i + half] = x1 * c + x0 * s;
    }
}
