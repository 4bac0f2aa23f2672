//! Causal grouped-query attention over the paged KV cache.
//!
//! Each (token, head) pair is one job: the token's query attends to positions `0..=pos` of
//! its own sequence, whose keys and values are found through the sequence's block table
//! (`slot = block_table[p / block_size] · block_size + p % block_size`). Scores and softmax
//! are f32, two passes over a per-thread score buffer.

use std::cell::RefCell;

use rayon::prelude::*;

use super::simd;
use crate::backend::{AttentionDims, Batch};

thread_local! {
    static SCORES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// `out[T, H·D]` from the q columns of `qkv[T, (H+2Hkv)·D]` and the layer's pools
/// `k`, `v` (`[slots, Hkv·D]` each).
pub fn attention(
    qkv: &[f32],
    k: &[f32],
    v: &[f32],
    block_size: usize,
    dims: AttentionDims,
    batch: &Batch,
    out: &mut [f32],
) {
    let (h, hkv, d) = (dims.num_heads, dims.num_kv_heads, dims.head_dim);
    let stride = dims.qkv_width();
    let kv_dim = hkv * d;
    let group = h / hkv;
    let t = batch.num_tokens();
    let scale = 1.0 / (d as f32).sqrt();
    out[..t * h * d]
        .par_chunks_mut(d)
        .enumerate()
        .for_each(|(job, o)| {
            let (row, head) = (job / h, job % h);
            // Sequences are in row order, so the owner of `row` is found by bisection.
            let s = batch.seqs.partition_point(|sq| sq.start as usize <= row) - 1;
            let seq = &batch.seqs[s];
            let ctx = batch.positions[row] as usize + 1;
            let q = &qkv[row * stride + head * d..][..d];
            let kvh = head / group;
            let slot =
                |p: usize| seq.block_table[p / block_size] as usize * block_size + p % block_size;
            SCORES.with(|buf| {
                let mut scores = buf.borrow_mut();
                if scores.len() < ctx {
                    scores.resize(ctx, 0.0);
                }
                let scores = &mut scores[..ctx];
                let mut max = f32::NEG_INFINITY;
                for (p, sc) in scores.iter_mut().enumerate() {
                    let kr = &k[slot(p) * kv_dim + kvh * d..][..d];
                    *sc = simd::dot_f32(q, kr) * scale;
                    max = max.max(*sc);
                }
                let mut sum = 0.0;
                for sc in scores.iter_mut() {
                    *sc = (*sc - max).exp();
                    sum += *sc;
                }
                let inv = 1.0 / sum;
                o.fill(0.0);
                for (p, &w) in scores.iter().enumerate() {
                    let vr = &v[slot(p) * kv_dim + kvh * d..][..d];
                    let w = w * inv;
                    for (oi, vi) in o.iter_mut().zip(vr) {
                        *oi += w * vi;
                    }
                }
            });
        });
}
