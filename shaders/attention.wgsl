// Causal grouped-query attention over the paged KV cache: out[T, H·D].
//
// One workgroup per (token, query head). The token attends to positions 0..=pos of its own
// sequence; position p lives in KV slot block_table[p / bs] · bs + p % bs. The context is
// walked in chunks of WG positions with an online softmax (running max and sum, rescaling the
// accumulator when the max grows): one thread scores one position of the chunk, then each
// thread accumulates D/WG output dimensions over the chunk's values. Four barriers per chunk.
// Scores, softmax and accumulation are f32.
//
// With `DECODE` (only for steps where every sequence has exactly one new token), the kernel
// also does the work of `qk_norm_rope.wgsl` and `kv_write.wgsl`, saving two dispatches per
// layer: each workgroup normalises and rotates its query head and its KV group's new key
// from the raw qkv row, uses that key and the row's value for the last position instead of
// reading them back from the cache, and the first query head of each KV group writes them
// to the cache at the token's slot. No workgroup reads a slot another one writes: the only
// slot written for a sequence is its new position, which every workgroup of that sequence
// takes from its own registers. qkv itself is left as it was (un-normalised, un-rotated).
//
// With `SPLIT` (flash-decoding, for decode steps over long contexts, where T·H workgroups
// would leave most of a GPU idle), each (token, head) is spread over `num_splits`
// workgroups: split s walks positions [s·span, (s+1)·span) of the context with the same
// online softmax and writes its unnormalised accumulator with its running max and sum to
// `part[T·H·splits, D + 2]`; `attention_reduce.wgsl` rescales and combines the splits. A
// split past the end of its sequence's context writes an empty partial (sum 0). With
// `DECODE` too, every split normalises and rotates its query and key itself, only split 0
// writes the new key and value, and only the last split reads them (from registers).
//
// With `KV_F16` the pools hold half-precision values, two per u32 word (`pack_half2`); keys
// and values are widened as they are read, and the new key and value the `DECODE` variant
// keeps in registers are rounded to half first, so the token sees its own key and value
// exactly as later tokens will read them back.
//
// Not yet: sharing the K/V loads between the query heads of one KV group.

const WG: u32 = 64u;
// Largest head dimension supported (checked when the KV cache is made).
const MAX_D: u32 = 256u;
// Output dimensions per thread.
const DPT: u32 = MAX_D / WG;

#ifdef DECODE
#include "include/reduce.wgsl"
#endif
#ifdef KV_F16
#include "include/half.wgsl"
#endif

struct Params {
    num_tokens: u32,          // T
    num_heads: u32,           // H
    num_kv_heads: u32,        // Hkv
    head_dim: u32,            // D
    qkv_width: u32,           // (H+2Hkv)·D
    block_size: u32,          // tokens per KV block
    positions_off: u32,       // offset of positions[T] in `batch`
    row_seq_off: u32,         // offset of row_seq[T] (each row's sequence) in `batch`
    block_tables_off: u32,    // offset of block_tables[S, stride] in `batch`
    block_table_stride: u32,  // entries per sequence in block_tables
    scale: f32,               // 1/sqrt(D)
#ifdef DECODE
    eps: f32,                 // epsilon of the q/k norms
    has_q_norm: u32,          // 1 when q_norm holds the q norm weight
    has_k_norm: u32,          // 1 when k_norm holds the k norm weight
    slots_off: u32,           // offset of slot_mapping[T] in `batch`
    _pad0: u32,
#ifdef SPLIT
    split_span: u32,          // positions per split (a multiple of WG)
    num_splits: u32,          // splits per (token, head)
    _pad1: u32,
    _pad2: u32,
#endif
#else
#ifdef SPLIT
    split_span: u32,          // positions per split (a multiple of WG)
    num_splits: u32,          // splits per (token, head)
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
#else
    _pad: u32,
#endif
#endif
}

#ifdef DECODE
@group(0) @binding(0) var<storage, read> qkv: array<f32>;           // [T, (H+2Hkv)·D] raw
@group(0) @binding(1) var<storage, read> q_norm: array<f32>;        // [D] (a dummy when absent)
@group(0) @binding(2) var<storage, read> k_norm: array<f32>;        // [D] (a dummy when absent)
@group(0) @binding(3) var<storage, read> rope: array<f32>;          // [P, D]: cos[D/2] | sin[D/2]
@group(0) @binding(4) var<storage, read> batch: array<u32>;         // the step's batch words
#ifdef KV_F16
@group(0) @binding(5) var<storage, read_write> k_cache: array<u32>; // [slots, Hkv·D/2] half2
@group(0) @binding(6) var<storage, read_write> v_cache: array<u32>; // [slots, Hkv·D/2] half2
#else
@group(0) @binding(5) var<storage, read_write> k_cache: array<f32>; // [slots, Hkv·D]
@group(0) @binding(6) var<storage, read_write> v_cache: array<f32>; // [slots, Hkv·D]
#endif
#ifdef SPLIT
@group(0) @binding(7) var<storage, read_write> part: array<f32>;    // [T·H·splits, D + 2]
#else
@group(0) @binding(7) var<storage, read_write> out: array<f32>;     // [T, H·D]
#endif

var<workgroup> k_sh: array<f32, MAX_D>;    // [D] the new key of this head's KV group
var<workgroup> v_sh: array<f32, MAX_D>;    // [D] the new value of this head's KV group
#else
@group(0) @binding(0) var<storage, read> qkv: array<f32>;       // [T, (H+2Hkv)·D]
#ifdef KV_F16
@group(0) @binding(1) var<storage, read> k_cache: array<u32>;   // [slots, Hkv·D/2] half2
@group(0) @binding(2) var<storage, read> v_cache: array<u32>;   // [slots, Hkv·D/2] half2
#else
@group(0) @binding(1) var<storage, read> k_cache: array<f32>;   // [slots, Hkv·D]
@group(0) @binding(2) var<storage, read> v_cache: array<f32>;   // [slots, Hkv·D]
#endif
@group(0) @binding(3) var<storage, read> batch: array<u32>;     // the step's batch words
#ifdef SPLIT
@group(0) @binding(4) var<storage, read_write> part: array<f32>; // [T·H·splits, D + 2]
#else
@group(0) @binding(4) var<storage, read_write> out: array<f32>; // [T, H·D]
#endif
#endif
@group(1) @binding(0) var<uniform> p: Params;

var<workgroup> q_sh: array<f32, MAX_D>;    // [D] the query
var<workgroup> score_sh: array<f32, WG>;   // [WG] scores of the chunk, then exp(score - max)
var<workgroup> slot_sh: array<u32, WG>;    // [WG] KV slot of each chunk position
var<workgroup> ctx_sh: u32;

#ifdef KV_F16
// q_sh · the key whose D values start at element `base` (even) of the K pool.
fn key_dot(base: u32, d: u32) -> f32 {
    var dot = 0.0;
    let w0 = base / 2u;
    for (var i = 0u; i < d; i += 2u) {
        let w = k_cache[w0 + i / 2u];
        dot += q_sh[i] * half_lo(w) + q_sh[i + 1u] * half_hi(w);
    }
    return dot;
}

// Element `e` of the V pool.
fn value_at(e: u32) -> f32 {
    let w = v_cache[e / 2u];
    return select(half_lo(w), half_hi(w), (e & 1u) == 1u);
}

// What the cache keeps of `x`.
fn kv_round(x: f32) -> f32 {
    return round_half(x);
}
#else
fn key_dot(base: u32, d: u32) -> f32 {
    var dot = 0.0;
    for (var i = 0u; i < d; i++) {
        dot += q_sh[i] * k_cache[base + i];
    }
    return dot;
}

fn value_at(e: u32) -> f32 {
    return v_cache[e];
}

fn kv_round(x: f32) -> f32 {
    return x;
}
#endif

@compute @workgroup_size(WG)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
#ifdef SPLIT
    let split_job = wid.x + wid.y * nwg.x;
    if split_job >= p.num_tokens * p.num_heads * p.num_splits {
        return;
    }
    let split = split_job % p.num_splits;
    let job = split_job / p.num_splits;
#else
    let job = wid.x + wid.y * nwg.x;
    if job >= p.num_tokens * p.num_heads {
        return;
    }
#endif
    let row = job / p.num_heads;
    let head = job % p.num_heads;
    let d = p.head_dim;
    let kv_dim = p.num_kv_heads * d;
    let kv_off = (head / (p.num_heads / p.num_kv_heads)) * d;
    let bs = p.block_size;
    let table = p.block_tables_off + batch[p.row_seq_off + row] * p.block_table_stride;

#ifdef DECODE
    // qk_norm_rope of the query head and of the KV group's key, as `qk_norm_rope.wgsl`
    // computes them (same reduction, same arithmetic), so both paths round alike.
    let half = d / 2u;
    let q_src = row * p.qkv_width + head * d;
    let k_src = row * p.qkv_width + p.num_heads * d + kv_off;
    var sq = 0.0;
    var sk = 0.0;
    for (var i = lid; i < d; i += WG) {
        let q = qkv[q_src + i];
        let k = qkv[k_src + i];
        sq += q * q;
        sk += k * k;
        v_sh[i] = kv_round(qkv[k_src + kv_dim + i]);
    }
    let inv_q = 1.0 / sqrt(wg_sum(sq, lid) / f32(d) + p.eps);
    let inv_k = 1.0 / sqrt(wg_sum(sk, lid) / f32(d) + p.eps);
    let angles = batch[p.positions_off + row] * d;
#ifdef SPLIT
    let writes_kv = head % (p.num_heads / p.num_kv_heads) == 0u && split == 0u;
#else
    let writes_kv = head % (p.num_heads / p.num_kv_heads) == 0u;
#endif
    let new_base = batch[p.slots_off + row] * kv_dim + kv_off;
    // Each thread owns the pairs (i, i + D/2) it reads and writes.
    for (var i = lid; i < half; i += WG) {
        let c = rope[angles + i];
        let s = rope[angles + half + i];
        var q0 = qkv[q_src + i];
        var q1 = qkv[q_src + i + half];
        if p.has_q_norm != 0u {
            q0 = q0 * inv_q * q_norm[i];
            q1 = q1 * inv_q * q_norm[i + half];
        }
        q_sh[i] = q0 * c - q1 * s;
        q_sh[i + half] = q1 * c + q0 * s;
        var k0 = qkv[k_src + i];
        var k1 = qkv[k_src + i + half];
        if p.has_k_norm != 0u {
            k0 = k0 * inv_k * k_norm[i];
            k1 = k1 * inv_k * k_norm[i + half];
        }
        k_sh[i] = kv_round(k0 * c - k1 * s);
        k_sh[i + half] = kv_round(k1 * c + k0 * s);
    }
#else
    for (var i = lid; i < d; i += WG) {
        q_sh[i] = qkv[row * p.qkv_width + head * d + i];
    }
#endif
    if lid == 0u {
        ctx_sh = batch[p.positions_off + row] + 1u;
    }
    // Also the barrier that publishes q_sh (and k_sh, v_sh).
    let ctx_all = workgroupUniformLoad(&ctx_sh);
#ifdef DECODE
    // The new key and value go to the cache once they are all in k_sh / v_sh (a half pair
    // spans values that different threads computed).
    if writes_kv {
#ifdef KV_F16
        for (var i = lid; i < half; i += WG) {
            k_cache[new_base / 2u + i] = pack_half2(k_sh[2u * i], k_sh[2u * i + 1u]);
            v_cache[new_base / 2u + i] = pack_half2(v_sh[2u * i], v_sh[2u * i + 1u]);
        }
#else
        for (var i = lid; i < d; i += WG) {
            k_cache[new_base + i] = k_sh[i];
            v_cache[new_base + i] = v_sh[i];
        }
#endif
    }
#endif
#ifdef SPLIT
    // This split's positions: [first, ctx).
    let first = min(split * p.split_span, ctx_all);
    let ctx = min(first + p.split_span, ctx_all);
#else
    let first = 0u;
    let ctx = ctx_all;
#endif

    var m = -3.0e38;  // running max of the scores (the same in every thread)
    var l = 0.0;      // running sum of exp(score - m) (the same in every thread)
    var acc: array<f32, DPT>;
    for (var c0 = first; c0 < ctx; c0 += WG) {
        let pos = c0 + lid;
        var s = -3.0e38;
        var slot = 0u;
        if pos < ctx {
            slot = batch[table + pos / bs] * bs + pos % bs;
            let kb = slot * kv_dim + kv_off;
            var dot = 0.0;
#ifdef DECODE
            if pos + 1u == ctx_all {
                for (var i = 0u; i < d; i++) {
                    dot += q_sh[i] * k_sh[i];
                }
            } else {
                dot = key_dot(kb, d);
            }
#else
            dot = key_dot(kb, d);
#endif
            s = dot * p.scale;
        }
        score_sh[lid] = s;
        slot_sh[lid] = slot;
        workgroupBarrier();
        // Every thread finds the chunk's max itself (cheap compares instead of a tree
        // reduction's barriers), then each exponentiates its own position once.
        let n = min(WG, ctx - c0);
        var m_new = m;
        for (var j = 0u; j < n; j++) {
            m_new = max(m_new, score_sh[j]);
        }
        workgroupBarrier();
        score_sh[lid] = select(0.0, exp(s - m_new), pos < ctx);
        workgroupBarrier();
        let alpha = exp(m - m_new);
        l *= alpha;
        for (var k = 0u; k < DPT; k++) {
            acc[k] *= alpha;
        }
        for (var j = 0u; j < n; j++) {
            let e = score_sh[j];
            l += e;
            let vb = slot_sh[j] * kv_dim + kv_off;
            for (var k = 0u; k < DPT; k++) {
                let dd = lid + k * WG;
                if dd < d {
#ifdef DECODE
                    if c0 + j + 1u == ctx_all {
                        acc[k] += e * v_sh[dd];
                    } else {
                        acc[k] += e * value_at(vb + dd);
                    }
#else
                    acc[k] += e * value_at(vb + dd);
#endif
                }
            }
        }
        m = m_new;
        // Nobody may overwrite score_sh / slot_sh before everyone has used them.
        workgroupBarrier();
    }
#ifdef SPLIT
    let pb = split_job * (d + 2u);
    for (var k = 0u; k < DPT; k++) {
        let dd = lid + k * WG;
        if dd < d {
            part[pb + dd] = acc[k];
        }
    }
    if lid == 0u {
        part[pb + d] = m;
        part[pb + d + 1u] = l;
    }
#else
    let inv = 1.0 / l;
    for (var k = 0u; k < DPT; k++) {
        let dd = lid + k * WG;
        if dd < d {
            out[row * p.num_heads * d + head * d + dd] = acc[k] * inv;
        }
    }
#endif
}
