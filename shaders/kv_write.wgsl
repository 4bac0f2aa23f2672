// Writes the k and v columns of qkv[T, (H+2Hkv)·D] into one layer's pools at the step's
// KV slots. One thread per (token, element of Hkv·D).

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
@group(0) @binding(2) var<storage, read_write> k_cache: array<f32>; // [slots, Hkv·D]
@group(0) @binding(3) var<storage, read_write> v_cache: array<f32>; // [slots, Hkv·D]
@group(1) @binding(0) var<uniform> p: Params;

@compute @workgroup_size(WG)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let idx = (wid.x + wid.y * nwg.x) * WG + lid;
    if idx >= p.num_tokens * p.kv_dim {
        return;
    }
    let t = idx / p.kv_dim;
    let e = idx % p.kv_dim;
    let slot = batch[p.slots_off + t];
    let src = t * p.qkv_width + p.q_dim + e;
    k_cache[slot * p.kv_dim + e] = qkv[src];
    v_cache[slot * p.kv_dim + e] = qkv[src + p.kv_dim];
}
