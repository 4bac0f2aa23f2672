//! The paged KV pools and causal grouped-query attention over them.
//!
//! A V pool is laid out `[blocks, Hkv, block_size, D]` and a K pool `[blocks, Hkv, D,
//! block_size]`: what one KV head needs for a block of positions is contiguous, so a job
//! streams it in order instead of striding over the other heads' rows. Keys are transposed
//! within their block so that scores come out a block of positions at a time, one position
//! per SIMD lane: `s[p] += q[d] · K[d][p]` over `d` is plain multiply-adds with `q[d]`
//! broadcast, with no horizontal sum per position (a dot product of two rows would need one
//! each, which cost as much as the dot itself at D = 128). Values are f32 or IEEE half
//! ([`KvDtype`]); half data is widened a block at a time. Weighted sums of values run a block
//! of positions at a time too, each output row held in registers across the block.
//!
//! Each (tile of up to 16 new tokens of one sequence, KV head) is one job: the tile's tokens
//! and their `H / Hkv` query heads that share the KV head attend together, each token to
//! positions `0..=pos` of its sequence, found through the sequence's block table. Every key
//! and value row is read (and widened) once per job instead of once per token and query head:
//! for a prompt chunk over a long context that is 16× less of the cache streamed through the
//! core. A decode token is a tile of one. Scores and softmax are f32, two passes over a
//! per-thread score buffer.

use std::cell::RefCell;

use half::f16;
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;

use super::matmul::OutPtr;
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
    /// A zeroed pool for `layout`, resident from the start
    /// ([`crate::resources::resident_zeroed`]): the process holds its whole KV cache at once,
    /// as the GPU backend does, rather than growing towards it as the prefix cache fills
    /// blocks it has never written.
    pub fn zeroed(layout: &KvLayout) -> KvPool {
        let n = layout.pool_len();
        match layout.dtype {
            KvDtype::F32 => KvPool::F32(crate::resources::resident_zeroed(n)),
            KvDtype::F16 => KvPool::F16(crate::resources::resident_zeroed(n)),
        }
    }

    /// Stores `src` (`D` values) at element offset `at`.
    fn write(&mut self, at: usize, src: &[f32]) {
        match self {
            KvPool::F32(p) => p[at..at + src.len()].copy_from_slice(src),
            KvPool::F16(p) => p[at..at + src.len()].convert_from_f32_slice(src),
        }
    }

    /// Stores `src` at element offsets `at`, `at + stride`, … (a key's column of its block).
    fn write_strided(&mut self, at: usize, stride: usize, src: &[f32]) {
        match self {
            KvPool::F32(p) => {
                for (i, &v) in src.iter().enumerate() {
                    p[at + i * stride] = v;
                }
            }
            KvPool::F16(p) => {
                for (i, &v) in src.iter().enumerate() {
                    p[at + i * stride] = f16::from_f32(v);
                }
            }
        }
    }
}

/// Element offset of position slot `slot`, KV head `kvh` in a V pool of `layout`.
fn kv_index(layout: &KvLayout, slot: usize, kvh: usize) -> usize {
    let (bs, d) = (layout.block_size, layout.head_dim);
    ((slot / bs * layout.num_kv_heads + kvh) * bs + slot % bs) * d
}

/// Element offset of the `[D, block_size]` keys of block `block`, KV head `kvh`.
fn k_block(layout: &KvLayout, block: usize, kvh: usize) -> usize {
    (block * layout.num_kv_heads + kvh) * layout.block_size * layout.head_dim
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
        let (bs, slot) = (layout.block_size, slot as usize);
        for kvh in 0..dims.num_kv_heads {
            let kb = k_block(layout, slot / bs, kvh) + slot % bs;
            k.write_strided(kb, bs, &src[q_dim + kvh * d..][..d]);
            v.write(
                kv_index(layout, slot, kvh),
                &src[q_dim + kv_dim + kvh * d..][..d],
            );
        }
    }
}

/// Query tokens of one sequence that attend together: each K and V row is read and widened
/// once per tile instead of once per token.
const TILE: usize = 16;

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

#[derive(Default)]
struct Scratch {
    /// `[rows, D]` queries of the tile, scaled.
    q: Vec<f32>,
    /// `[rows, ctx]` scores, then weights: one row per (token of the tile, head of the group).
    scores: Vec<f32>,
    /// `[rows, D]` outputs.
    acc: Vec<f32>,
    /// One widened `[block_size, D]` block of values.
    values: Vec<f32>,
    /// One widened `[D, block_size]` block of keys.
    kt: Vec<f32>,
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
    assert!(out.len() >= t * h * d, "attention output too small");
    // (sequence, first row, rows, KV head): a tile of one sequence's new tokens.
    let mut jobs = Vec::new();
    for (s, seq) in batch.seqs.iter().enumerate() {
        let end = (seq.start + seq.len) as usize;
        for r0 in (seq.start as usize..end).step_by(TILE) {
            for kvh in 0..hkv {
                jobs.push((s, r0, TILE.min(end - r0), kvh));
            }
        }
    }
    let out_ptr = OutPtr(out.as_mut_ptr());
    jobs.par_iter().for_each(|&(s, r0, n, kvh)| {
        let seq = &batch.seqs[s];
        // Positions within a sequence's chunk are consecutive (`Batch::check`): token i of
        // the tile sees positions 0..c0 + i, so position p is seen by tokens first(p)..n.
        let c0 = batch.positions[r0] as usize + 1;
        let cmax = c0 + n - 1;
        let first = |p: usize| (p + 1).saturating_sub(c0);
        let rows = n * group;
        SCRATCH.with(|cell| {
            let scratch = &mut *cell.borrow_mut();
            // Row r = i·group + g of the tile is query head kvh·group + g of token r0 + i,
            // copied with the 1/√D of the scores applied.
            scratch.q.resize(rows * d, 0.0);
            for (r, qr) in scratch.q.chunks_exact_mut(d).enumerate() {
                let src = &qkv[(r0 + r / group) * stride + (kvh * group + r % group) * d..][..d];
                for (o, x) in qr.iter_mut().zip(src) {
                    *o = x * scale;
                }
            }
            let qs = &scratch.q[..rows * d];
            scratch.scores.resize(rows * cmax, 0.0);
            scratch.acc.clear();
            scratch.acc.resize(rows * d, 0.0);
            scratch.values.resize(bs * d, 0.0);
            scratch.kt.resize(d * bs, 0.0);
            let (scores, acc, buf, kt) = (
                &mut scratch.scores[..rows * cmax],
                &mut scratch.acc,
                &mut scratch.values,
                &mut scratch.kt,
            );
            // Scores a block of positions at a time (one position per lane).
            for p0 in (0..cmax).step_by(bs) {
                let np = bs.min(cmax - p0);
                let kb = k_block(layout, seq.block_table[p0 / bs] as usize, kvh);
                let keys: &[f32] = match k {
                    KvPool::F32(pool) => &pool[kb..kb + d * bs],
                    KvPool::F16(pool) => {
                        simd::f16_to_f32(bytemuck::cast_slice(&pool[kb..kb + d * bs]), kt);
                        kt
                    }
                };
                // Four query rows per pass share each key row's load.
                let mut r = first(p0) * group;
                while r + 4 <= rows {
                    let q4 = &qs[r * d..(r + 4) * d];
                    let out = &mut scores[r * cmax + p0..];
                    simd::dot_transposed_x4(q4, keys, bs, out, cmax, np);
                    r += 4;
                }
                for r in r..rows {
                    let out = &mut scores[r * cmax + p0..r * cmax + p0 + np];
                    simd::dot_transposed(&qs[r * d..(r + 1) * d], keys, bs, out);
                }
            }
            for (r, sc) in scores.chunks_mut(cmax).enumerate() {
                let seen = c0 + r / group;
                simd::softmax(&mut sc[..seen]);
                // Positions a row does not see weigh nothing in the blocks' sums below.
                sc[seen..].fill(0.0);
            }
            // Values a block of positions at a time: each row's sum over the block stays in
            // registers ([`simd::axpy_rows_f32`]).
            for p0 in (0..cmax).step_by(bs) {
                let np = bs.min(cmax - p0);
                let vb = kv_index(layout, seq.block_table[p0 / bs] as usize * bs, kvh);
                let values: &[f32] = match v {
                    KvPool::F32(pool) => &pool[vb..vb + np * d],
                    KvPool::F16(pool) => {
                        let half = bytemuck::cast_slice(&pool[vb..vb + np * d]);
                        simd::f16_to_f32(half, &mut buf[..np * d]);
                        &buf[..np * d]
                    }
                };
                // Two rows per pass share each value row's load.
                let weights = |r: usize| &scores[r * cmax + p0..r * cmax + p0 + np];
                let mut r = first(p0) * group;
                while r + 2 <= rows {
                    let y = &mut acc[r * d..(r + 2) * d];
                    simd::axpy_rows_x2_f32(y, weights(r), weights(r + 1), values);
                    r += 2;
                }
                if r < rows {
                    simd::axpy_rows_f32(&mut acc[r * d..(r + 1) * d], weights(r), values);
                }
            }
            for i in 0..n {
                let dst = (r0 + i) * h * d + kvh * group * d;
                // SAFETY: row r0 + i < T and the columns of KV head kvh's group belong to this
                // job alone; `out` holds T·H·D elements (asserted above).
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        acc[i * group * d..].as_ptr(),
                        out_ptr.get().add(dst),
                        group * d,
                    );
                }
            }
        });
    });
}
