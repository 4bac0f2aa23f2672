// Writes the k and v columns of qkv[T, (H+2Hkv)·D] into one layer's pools at the step's
// KV slots. One thread per (token, element of Hkv·D); with KV_F16, one thread per (token,
// pair of elements), packed as two halves into one word of the pools.

#ifdef KV_F16
#include "include/half.wgsl"
#endif

const WG: u32 = 64u;

struct Params {
    num_tokens: u32,  // T
    q_dim: u32,       // H·D: where k starts in a qkv row
    kv_dim: u32,      // Hkv·D
    qkv_width: u32,   // (H+2Hkv)·D
    slots_off: u32,   // offset of slot_mapping[T] in `batch`
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<storage, read> qkv: array<f32>;           // [T, (H+2Hkv)·D]
@group(0) @binding(1) var<storage, read> batch: array<u32>;         // the step's batch words
#ifdef KV_F16
@group(0) @binding(2) var<storage, read_write> k_cache: array<u32>; // [slots, Hkv·D/2] half2
@group(0) @binding(3) var<storage, read_write> v_cache: array<u32>; // [slots, Hkv·D/2] half2
#else
@group(0) @binding(2) var<storage, read_write> k_cache: array<f32>; // [slots, Hkv·D]
@group(0) @binding(3) var<storage, read_write> v_cache: array<f32>; // [slots, Hkv·D]
#endif
@group(1) @binding(0) var<uniform> p: Params;

@compute @workgroup_size(WG)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let idx = (wid.x + wid.y * nwg.x) * WG + lid;
#ifdef KV_F16
    let words = p.kv_dim / 2u;
    if idx >= p.num_tokens * words {
        return;
    }
    let t = idx / words;
    let w = idx % words;
    let slot = batch[p.slots_off + t];
    let src = t * p.qkv_width + p.q_dim + 2u * w;
    k_cache[slot * words + w] = pack_half2(qkv[src], qkv[src + 1u]);
    v_cache[slot * words + w] = pack_half2(qkv[src + p.kv_dim], qkv[src + p.kv_dim + 1u]);
#else
    if idx >= p.num_tokens * p.kv_dim {
        return;
    }
    let t = idx / p.kv_dim;
    let e = idx % p.kv_dim;
    let slot = batch[p.slots_off + t];
    let src = t * p.qkv_width + p.q_dim + e;
    k_cache[slot * p.kv_dim + e] = qkv[src];
    v_cache[slot * p.kv_dim + e] = qkv[src + p.kv_dim];
#endif
}
