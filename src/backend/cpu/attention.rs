//! The paged KV pools and causal grouped-query attention over them.
//!
//! A pool (the K or the V of one layer) is laid out `[blocks, Hkv, block_size, D]`: the
//! keys one KV head needs for a block of positions are contiguous, so a job streams them
//! in order instead of striding over the other heads' rows. Values are f32 or IEEE half
//! ([`KvDtype`]); half rows are widened one row at a time into a small buffer.
//!
//! Each (token, KV head) pair is one job: the token's `H / Hkv` query heads that share the
//! KV head attend together to positions `0..=pos` of the token's sequence, found through the
//! sequence's block table, so every key and value row is read (and widened) once per group
//! instead of once per query head. Scores and softmax are f32, two passes over a per-thread
//! score buffer.

use std::cell::RefCell;

use half::f16;
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;

use super::simd;
use crate::backend::{AttentionDims, Batch, KvDtype, KvLayout};

/// One layer's K or V values.
pub enum KvPool {
    /// Exact values.
    F32(Vec<f32>),
    /// Half-precision values.
    F16(Vec<f16>),
}

impl KvPool {
    /// A zeroed pool for `layout`. Zeroed allocations are mapped lazily by the OS: blocks
    /// never written cost no memory.
    pub fn zeroed(layout: &KvLayout) -> KvPool {
        let n = layout.pool_len();
        match layout.dtype {
            KvDtype::F32 => KvPool::F32(vec![0.0; n]),
            KvDtype::F16 => KvPool::F16(vec![f16::ZERO; n]),
        }
    }

    /// Stores `src` (`D` values) at element offset `at`.
    fn write(&mut self, at: usize, src: &[f32]) {
        match self {
            KvPool::F32(p) => p[at..at + src.len()].copy_from_slice(src),
            KvPool::F16(p) => p[at..at + src.len()].convert_from_f32_slice(src),
        }
    }

    /// The `D` values at element offset `at`, widened into `buf` when stored as half.
    fn row<'a>(&'a self, at: usize, buf: &'a mut [f32]) -> &'a [f32] {
        match self {
            KvPool::F32(p) => &p[at..at + buf.len()],
            KvPool::F16(p) => {
                simd::f16_to_f32(bytemuck::cast_slice(&p[at..at + buf.len()]), buf);
                buf
            }
        }
    }
}

/// Element offset of position slot `slot`, KV head `kvh` in a pool of `layout`.
fn kv_index(layout: &KvLayout, slot: usize, kvh: usize) -> usize {
    let (bs, d) = (layout.block_size, layout.head_dim);
    ((slot / bs * layout.num_kv_heads + kvh) * bs + slot % bs) * d
}

/// Writes the k and v columns of `qkv[T, (H+2Hkv)·D]` at the batch's slots.
pub fn kv_write(
    qkv: &[f32],
    k: &mut KvPool,
    v: &mut KvPool,
    layout: &KvLayout,
    dims: AttentionDims,
    batch: &Batch,
) {
    let d = dims.head_dim;
    let q_dim = dims.num_heads * d;
    let kv_dim = dims.num_kv_heads * d;
    let width = dims.qkv_width();
    for (row, &slot) in batch.slot_mapping.iter().enumerate() {
        let src = &qkv[row * width..(row + 1) * width];
        for kvh in 0..dims.num_kv_heads {
            let at = kv_index(layout, slot as usize, kvh);
            k.write(at, &src[q_dim + kvh * d..][..d]);
            v.write(at, &src[q_dim + kv_dim + kvh * d..][..d]);
        }
    }
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

#[derive(Default)]
struct Scratch {
    /// `[group, ctx]` scores, then weights.
    scores: Vec<f32>,
    /// One widened K or V row.
    row: Vec<f32>,
}

/// `out[T, H·D]` from the q columns of `qkv[T, (H+2Hkv)·D]` and the layer's pools.
pub fn attention(
    qkv: &[f32],
    k: &KvPool,
    v: &KvPool,
    layout: &KvLayout,
    dims: AttentionDims,
    batch: &Batch,
    out: &mut [f32],
) {
    let (h, hkv, d) = (dims.num_heads, dims.num_kv_heads, dims.head_dim);
    let stride = dims.qkv_width();
    let group = h / hkv;
    let t = batch.num_tokens();
    let bs = layout.block_size;
    let scale = 1.0 / (d as f32).sqrt();
    // A job's output is its group's heads, which sit side by side in the row.
    out[..t * h * d]
        .par_chunks_mut(group * d)
        .enumerate()
        .for_each(|(job, o)| {
            let (row, kvh) = (job / hkv, job % hkv);
            // Sequences are in row order, so the owner of `row` is found by bisection.
            let s = batch.seqs.partition_point(|sq| sq.start as usize <= row) - 1;
            let seq = &batch.seqs[s];
            let ctx = batch.positions[row] as usize + 1;
            let q = &qkv[row * stride + kvh * group * d..][..group * d];
            let at =
                |p: usize| kv_index(layout, seq.block_table[p / bs] as usize * bs + p % bs, kvh);
            SCRATCH.with(|cell| {
                let scratch = &mut *cell.borrow_mut();
                scratch.scores.resize(group * ctx, 0.0);
                scratch.row.resize(d, 0.0);
                let (scores, buf) = (&mut scratch.scores[..group * ctx], &mut scratch.row);
                for p in 0..ctx {
                    let kr = k.row(at(p), buf);
                    for g in 0..group {
                        scores[g * ctx + p] = simd::dot_f32(&q[g * d..][..d], kr) * scale;
                    }
                }
                for sc in scores.chunks_mut(ctx) {
                    let max = sc.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
                    let mut sum = 0.0;
                    for x in sc.iter_mut() {
                        *x = (*x - max).exp();
                        sum += *x;
                    }
                    let inv = 1.0 / sum;
                    sc.iter_mut().for_each(|x| *x *= inv);
                }
                o.fill(0.0);
                for p in 0..ctx {
                    let vr = v.row(at(p), buf);
                    for (g, og) in o.chunks_mut(d).enumerate() {
                        simd::axpy_f32(og, scores[g * ctx + p], vr);
                    }
                }
            });
        });
}
