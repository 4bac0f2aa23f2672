//! Attention: the KV cache, the RoPE table, and the attention dispatches.
//!
//! The KV cache is, per layer, one K and one V pool `[num_blocks · block_size, Hkv · D]` in the
//! layout's [`KvDtype`] (f32, or f16 packed two values per word), the CPU backend's layout. A
//! pool larger than one storage binding is refused with an error naming the limit (no
//! splitting of KV yet). In decode steps (one new token per sequence) norm, RoPE, the KV write
//! and attention are one dispatch per layer. Over long contexts, flash-decoding spreads each
//! (token, head) over one workgroup per [`super::WgpuOptions::decode_split`] positions; they
//! write partial softmax results to a scratch buffer that a second pass combines.

use super::buffers::{GpuBuffer, WgpuTensor};
use super::params::*;
use super::pipelines::{Kernel, PipelineKey};
use super::weights::WgpuWeight;
use super::{Inner, WgpuBackend, WG};
use crate::backend::{AttentionDims, Batch, KvDtype, KvLayout};
use crate::error::{Error, Result};

/// Largest head dimension of `attention.wgsl` (its `MAX_D`).
const MAX_HEAD_DIM: usize = 256;

/// K and V pools of every layer: `[num_blocks · block_size, Hkv · D]` each, of
/// [`KvLayout::dtype`] (f16 values packed two per word, or f32).
pub struct WgpuKvCache {
    layout: KvLayout,
    k: Vec<GpuBuffer>,
    v: Vec<GpuBuffer>,
}

/// The RoPE cos/sin table `[positions, D]` (D/2 cosines then D/2 sines).
pub(super) struct RopeTable {
    theta_bits: u32,
    head_dim: usize,
    positions: usize,
    buf: GpuBuffer,
}

impl WgpuBackend {
    /// The variant of a KV-cache kernel for caches of `layout`.
    fn kv_key(&self, kernel: Kernel, layout: &KvLayout) -> PipelineKey {
        PipelineKey::kv(kernel, layout.dtype == KvDtype::F16, self.ctx.f16_in_f32)
    }

    /// K and V pools for every layer of `layout`: the trait's `kv_cache`.
    pub(super) fn new_kv_cache(&self, layout: KvLayout) -> Result<WgpuKvCache> {
        let d = layout.head_dim;
        if d == 0 || !d.is_multiple_of(2) || d > MAX_HEAD_DIM {
            return Err(Error::UnsupportedModel(format!(
                "head_dim {d}: the GPU attention kernel handles even head dims up to {MAX_HEAD_DIM}"
            )));
        }
        let bytes = (layout.pool_len() * layout.dtype.size()) as u64;
        if bytes > self.segment_limit {
            return Err(Error::Device(format!(
                "a KV pool of {} blocks × {} tokens × {} KV heads × {d} {} needs {bytes} bytes \
                 per layer, above the adapter's max_storage_buffer_binding_size ({} bytes); \
                 lower --max-model-len",
                layout.num_blocks,
                layout.block_size,
                layout.num_kv_heads,
                layout.dtype,
                self.segment_limit
            )));
        }
        let usage = wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST;
        Ok(WgpuKvCache {
            layout,
            k: (0..layout.num_layers)
                .map(|_| self.buffer(bytes, usage, "wick k cache"))
                .collect(),
            v: (0..layout.num_layers)
                .map(|_| self.buffer(bytes, usage, "wick v cache"))
                .collect(),
        })
    }

    /// Per-head q/k RMSNorm and RoPE in place: the trait's `qk_norm_rope`.
    pub(super) fn record_qk_norm_rope(
        &self,
        qkv: &mut WgpuTensor,
        q_norm: Option<&WgpuWeight>,
        k_norm: Option<&WgpuWeight>,
        dims: AttentionDims,
        batch: &Batch,
    ) {
        let d = dims.head_dim;
        let t = batch.num_tokens();
        assert_eq!(qkv.cols, dims.qkv_width(), "qkv width");
        assert!(t <= qkv.rows, "qk_norm_rope rows");
        assert!(d.is_multiple_of(2) && d > 0, "head_dim must be even");
        let vec_of = |w: Option<&'_ WgpuWeight>| -> Option<GpuBuffer> {
            w.map(|w| {
                assert_eq!(w.cols, d, "q/k norm width");
                w.vector.clone().expect("a norm weight is a vector")
            })
        };
        let (qn, kn) = (vec_of(q_norm), vec_of(k_norm));
        let inner = &mut *self.lock();
        self.ensure_rope(inner, dims.rope_theta, d);
        let params = QkNormRopeParams {
            num_tokens: t as u32,
            num_heads: dims.num_heads as u32,
            num_kv_heads: dims.num_kv_heads as u32,
            head_dim: d as u32,
            qkv_width: dims.qkv_width() as u32,
            eps: dims.eps,
            has_q_norm: qn.is_some() as u32,
            has_k_norm: kn.is_some() as u32,
            positions_off: inner.step.positions_off,
            _pad: [0; 3],
        };
        let (gx, gy) = self.grid(t * (dims.num_heads + dims.num_kv_heads));
        let rope = inner.rope.as_ref().expect("made above").buf.clone();
        let batch_buf = inner.batch_buf.clone();
        self.dispatch(
            inner,
            PipelineKey::plain(Kernel::QkNormRope),
            &[
                qn.as_ref().unwrap_or(&self.dummy),
                kn.as_ref().unwrap_or(&self.dummy),
                &rope,
                &batch_buf,
                &qkv.buf,
            ],
            &params,
            (gx, gy, 1),
        );
    }

    /// The step's new keys and values into the cache: the trait's `kv_write`.
    pub(super) fn record_kv_write(
        &self,
        qkv: &WgpuTensor,
        cache: &mut WgpuKvCache,
        layer: usize,
        dims: AttentionDims,
        batch: &Batch,
    ) {
        let t = batch.num_tokens();
        let kv_dim = dims.num_kv_heads * dims.head_dim;
        assert_eq!(
            (cache.layout.num_kv_heads, cache.layout.head_dim),
            (dims.num_kv_heads, dims.head_dim),
            "KV layout"
        );
        assert_eq!(qkv.cols, dims.qkv_width(), "qkv width");
        let params = KvWriteParams {
            num_tokens: t as u32,
            q_dim: (dims.num_heads * dims.head_dim) as u32,
            kv_dim: kv_dim as u32,
            qkv_width: dims.qkv_width() as u32,
            slots_off: 0,
            _pad: [0; 3],
        };
        // One thread per value, or per pair of values packed into one word of an f16 cache.
        let per_token = if cache.layout.dtype == KvDtype::F16 {
            kv_dim / 2
        } else {
            kv_dim
        };
        let (gx, gy) = self.grid((t * per_token).div_ceil(WG));
        let inner = &mut *self.lock();
        let params = KvWriteParams {
            slots_off: inner.step.slots_off,
            ..params
        };
        let batch_buf = inner.batch_buf.clone();
        self.dispatch(
            inner,
            self.kv_key(Kernel::KvWrite, &cache.layout),
            &[&qkv.buf, &batch_buf, &cache.k[layer], &cache.v[layer]],
            &params,
            (gx, gy, 1),
        );
    }

    /// Paged attention of every new token: the trait's `attention`.
    pub(super) fn record_attention(
        &self,
        qkv: &WgpuTensor,
        cache: &WgpuKvCache,
        layer: usize,
        dims: AttentionDims,
        batch: &Batch,
        out: &mut WgpuTensor,
    ) {
        let t = batch.num_tokens();
        let (h, hkv, d) = (dims.num_heads, dims.num_kv_heads, dims.head_dim);
        assert_eq!(out.cols, h * d, "attention output width");
        assert_eq!(
            (cache.layout.num_kv_heads, cache.layout.head_dim),
            (hkv, d),
            "KV layout"
        );
        assert!(
            hkv > 0 && h % hkv == 0,
            "heads must be a multiple of KV heads"
        );
        if let Some(splits) = self.decode_splits(batch) {
            self.attention_split(qkv, cache, layer, dims, t, splits, out);
            return;
        }
        let (gx, gy) = self.grid(t * h);
        let inner = &mut *self.lock();
        let s = inner.step;
        let params = AttentionParams {
            num_tokens: t as u32,
            num_heads: h as u32,
            num_kv_heads: hkv as u32,
            head_dim: d as u32,
            qkv_width: dims.qkv_width() as u32,
            block_size: cache.layout.block_size as u32,
            positions_off: s.positions_off,
            row_seq_off: s.row_seq_off,
            block_tables_off: s.block_tables_off,
            block_table_stride: s.block_table_stride,
            scale: 1.0 / (d as f32).sqrt(),
            _pad: 0,
        };
        let batch_buf = inner.batch_buf.clone();
        self.dispatch(
            inner,
            self.kv_key(Kernel::Attention, &cache.layout),
            &[
                &qkv.buf,
                &cache.k[layer],
                &cache.v[layer],
                &batch_buf,
                &out.buf,
            ],
            &params,
            (gx, gy, 1),
        );
    }

    /// Norm, RoPE, KV write and attention, in one dispatch when the step is a decode step:
    /// the trait's `qk_norm_rope_kv_write_attention`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn record_qk_norm_rope_kv_write_attention(
        &self,
        qkv: &mut WgpuTensor,
        q_norm: Option<&WgpuWeight>,
        k_norm: Option<&WgpuWeight>,
        cache: &mut WgpuKvCache,
        layer: usize,
        dims: AttentionDims,
        batch: &Batch,
        out: &mut WgpuTensor,
    ) {
        // One dispatch is only safe when no token attends to another new token of the step:
        // its own new key and value it computes itself, anyone else's it would race to read.
        // The folded kernel binds 8 storage buffers (WebGPU's default limit; some adapters
        // have fewer).
        let decode = batch.seqs.iter().all(|s| s.len == 1);
        if !decode || self.ctx.limits.max_storage_buffers_per_shader_stage < 8 {
            self.record_qk_norm_rope(qkv, q_norm, k_norm, dims, batch);
            self.record_kv_write(qkv, cache, layer, dims, batch);
            self.record_attention(qkv, cache, layer, dims, batch, out);
            return;
        }
        let t = batch.num_tokens();
        let (h, hkv, d) = (dims.num_heads, dims.num_kv_heads, dims.head_dim);
        assert_eq!(qkv.cols, dims.qkv_width(), "qkv width");
        assert!(t <= qkv.rows && t <= out.rows, "attention rows");
        assert_eq!(out.cols, h * d, "attention output width");
        assert_eq!(
            (cache.layout.num_kv_heads, cache.layout.head_dim),
            (hkv, d),
            "KV layout"
        );
        assert!(
            hkv > 0 && h % hkv == 0,
            "heads must be a multiple of KV heads"
        );
        assert!(d.is_multiple_of(2) && d > 0, "head_dim must be even");
        let vec_of = |w: Option<&'_ WgpuWeight>| -> Option<GpuBuffer> {
            w.map(|w| {
                assert_eq!(w.cols, d, "q/k norm width");
                w.vector.clone().expect("a norm weight is a vector")
            })
        };
        let (qn, kn) = (vec_of(q_norm), vec_of(k_norm));
        // A long context is split over several workgroups per (token, head).
        let splits = self.decode_splits(batch);
        let (gx, gy) = self.grid(t * h * splits.unwrap_or(1));
        let inner = &mut *self.lock();
        self.ensure_rope(inner, dims.rope_theta, d);
        let s = inner.step;
        let params = AttentionDecodeParams {
            num_tokens: t as u32,
            num_heads: h as u32,
            num_kv_heads: hkv as u32,
            head_dim: d as u32,
            qkv_width: dims.qkv_width() as u32,
            block_size: cache.layout.block_size as u32,
            positions_off: s.positions_off,
            row_seq_off: s.row_seq_off,
            block_tables_off: s.block_tables_off,
            block_table_stride: s.block_table_stride,
            scale: 1.0 / (d as f32).sqrt(),
            eps: dims.eps,
            has_q_norm: qn.is_some() as u32,
            has_k_norm: kn.is_some() as u32,
            slots_off: s.slots_off,
            _pad: 0,
        };
        let rope = inner.rope.as_ref().expect("made above").buf.clone();
        let batch_buf = inner.batch_buf.clone();
        let Some(splits) = splits else {
            self.dispatch(
                inner,
                self.kv_key(Kernel::AttentionDecode, &cache.layout),
                &[
                    &qkv.buf,
                    qn.as_ref().unwrap_or(&self.dummy),
                    kn.as_ref().unwrap_or(&self.dummy),
                    &rope,
                    &batch_buf,
                    &cache.k[layer],
                    &cache.v[layer],
                    &out.buf,
                ],
                &params,
                (gx, gy, 1),
            );
            return;
        };
        let part = self.attention_parts(inner, t * h * splits * (d + 2));
        let params = AttentionDecodeSplitParams {
            decode: params,
            split_span: self.split_span as u32,
            num_splits: splits as u32,
            _pad: [0; 2],
        };
        self.dispatch(
            inner,
            self.kv_key(Kernel::AttentionDecodeSplit, &cache.layout),
            &[
                &qkv.buf,
                qn.as_ref().unwrap_or(&self.dummy),
                kn.as_ref().unwrap_or(&self.dummy),
                &rope,
                &batch_buf,
                &cache.k[layer],
                &cache.v[layer],
                &part,
            ],
            &params,
            (gx, gy, 1),
        );
        self.attention_reduce(inner, &part, dims, t, splits, out);
    }

    /// [`decode_splits`] with this backend's split span.
    fn decode_splits(&self, batch: &Batch) -> Option<usize> {
        decode_splits(batch, self.split_span)
    }

    /// Flash-decoding: `attention.wgsl` with `SPLIT` writes `splits` partial results per
    /// (token, head), `attention_reduce.wgsl` combines them into `out[T, H·D]`.
    #[allow(clippy::too_many_arguments)]
    fn attention_split(
        &self,
        qkv: &WgpuTensor,
        cache: &WgpuKvCache,
        layer: usize,
        dims: AttentionDims,
        t: usize,
        splits: usize,
        out: &mut WgpuTensor,
    ) {
        let (h, d) = (dims.num_heads, dims.head_dim);
        let inner = &mut *self.lock();
        let part = self.attention_parts(inner, t * h * splits * (d + 2));
        let s = inner.step;
        let params = AttentionSplitParams {
            num_tokens: t as u32,
            num_heads: h as u32,
            num_kv_heads: dims.num_kv_heads as u32,
            head_dim: d as u32,
            qkv_width: dims.qkv_width() as u32,
            block_size: cache.layout.block_size as u32,
            positions_off: s.positions_off,
            row_seq_off: s.row_seq_off,
            block_tables_off: s.block_tables_off,
            block_table_stride: s.block_table_stride,
            scale: 1.0 / (d as f32).sqrt(),
            split_span: self.split_span as u32,
            num_splits: splits as u32,
            _pad: [0; 3],
        };
        let batch_buf = inner.batch_buf.clone();
        let (gx, gy) = self.grid(t * h * splits);
        self.dispatch(
            inner,
            self.kv_key(Kernel::AttentionSplit, &cache.layout),
            &[
                &qkv.buf,
                &cache.k[layer],
                &cache.v[layer],
                &batch_buf,
                &part,
            ],
            &params,
            (gx, gy, 1),
        );
        self.attention_reduce(inner, &part, dims, t, splits, out);
    }

    /// The scratch buffer of split attention, grown to at least `floats` f32.
    fn attention_parts(&self, inner: &mut Inner, floats: usize) -> GpuBuffer {
        let bytes = (floats * 4) as u64;
        if inner
            .attn_part
            .as_ref()
            .is_none_or(|b| b.buf.size() < bytes)
        {
            let usage = wgpu::BufferUsages::STORAGE;
            let new = self.buffer(bytes.next_power_of_two(), usage, "wick attention parts");
            // The old buffer's bind groups go with it.
            inner.attn_part = Some(new);
        }
        inner.attn_part.clone().expect("made above")
    }

    /// `out[T, H·D]` from the `splits` partial results per (token, head) in `part`.
    fn attention_reduce(
        &self,
        inner: &mut Inner,
        part: &GpuBuffer,
        dims: AttentionDims,
        t: usize,
        splits: usize,
        out: &WgpuTensor,
    ) {
        let h = dims.num_heads;
        let params = AttentionReduceParams {
            num_tokens: t as u32,
            num_heads: h as u32,
            head_dim: dims.head_dim as u32,
            num_splits: splits as u32,
        };
        let (gx, gy) = self.grid(t * h);
        self.dispatch(
            inner,
            PipelineKey::plain(Kernel::AttentionReduce),
            &[part, &out.buf],
            &params,
            (gx, gy, 1),
        );
    }

    /// Makes sure the RoPE table covers positions up to `inner.step.max_position`.
    fn ensure_rope(&self, inner: &mut Inner, theta: f32, d: usize) {
        let need = inner.step.max_position as usize + 1;
        if let Some(r) = &inner.rope {
            if r.theta_bits == theta.to_bits() && r.head_dim == d && r.positions >= need {
                return;
            }
        }
        let positions = need.next_power_of_two().max(1024);
        let table = rope_table(theta, d, positions);
        let buf = self.upload(bytemuck::cast_slice(&table), "wick rope");
        inner.rope = Some(RopeTable {
            theta_bits: theta.to_bits(),
            head_dim: d,
            positions,
            buf,
        });
    }
}

/// Splits per (token, head) when `batch` is a decode step (one new token per sequence)
/// whose longest context exceeds `split_span` positions (0 = never split); `None` for one
/// workgroup each.
fn decode_splits(batch: &Batch, split_span: usize) -> Option<usize> {
    let decode = batch.seqs.iter().all(|s| s.len == 1);
    let longest = batch.seqs.iter().map(|s| s.context_len as usize).max()?;
    (split_span > 0 && decode && longest > split_span).then(|| longest.div_ceil(split_span))
}

/// The RoPE table `[positions, d]`: per position, `d/2` cosines then `d/2` sines.
fn rope_table(theta: f32, d: usize, positions: usize) -> Vec<f32> {
    let half = d / 2;
    // Exactly the CPU backend's arithmetic: f32 inverse frequencies as transformers
    // computes them, f32 angles, f32 cos/sin.
    let inv_freq: Vec<f32> = (0..half)
        .map(|i| 1.0 / theta.powf((2 * i) as f32 / d as f32))
        .collect();
    let mut table = vec![0f32; positions * d];
    for (pos, row) in table.chunks_exact_mut(d).enumerate() {
        for i in 0..half {
            let angle = pos as f32 * inv_freq[i];
            row[i] = angle.cos();
            row[half + i] = angle.sin();
        }
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A batch of sequences with these (new tokens, context length), blocks of 16.
    fn batch(seqs: &[(usize, usize)]) -> Batch {
        let mut b = Batch::default();
        for &(len, context) in seqs {
            let table: Vec<u32> = (0..context.div_ceil(16) as u32).collect();
            let tokens = vec![1; len];
            b.push_seq(&tokens, context - len, &table, 16);
        }
        b
    }

    #[test]
    fn decode_splits_only_long_decode_steps() {
        // Decode, longest context 1000 over a span of 512: two workgroups per (token, head).
        assert_eq!(decode_splits(&batch(&[(1, 1000), (1, 40)]), 512), Some(2));
        // Exactly one span: no split.
        assert_eq!(decode_splits(&batch(&[(1, 512)]), 512), None);
        assert_eq!(decode_splits(&batch(&[(1, 513)]), 512), Some(2));
        assert_eq!(decode_splits(&batch(&[(1, 4096)]), 512), Some(8));
        // A prefill row in the step: never (new tokens would attend to each other).
        assert_eq!(decode_splits(&batch(&[(1, 4096), (3, 3)]), 512), None);
        // Span 0 turns splitting off; an empty step has nothing to split.
        assert_eq!(decode_splits(&batch(&[(1, 4096)]), 0), None);
        assert_eq!(decode_splits(&Batch::default(), 512), None);
    }

    #[test]
    fn rope_table_holds_cosines_then_sines() {
        let (theta, d) = (10_000.0f32, 8);
        let t = rope_table(theta, d, 5);
        assert_eq!(t.len(), 5 * d);
        // Position 0: no rotation.
        assert_eq!(&t[..d], &[1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]);
        // Frequency i is theta^(-2i/d); position 3, frequency 1: angle 3 / 10000^(1/4) = 0.3.
        let row = &t[3 * d..4 * d];
        assert!((row[1] - 0.3f32.cos()).abs() < 1e-6, "{}", row[1]);
        assert!((row[4 + 1] - 0.3f32.sin()).abs() < 1e-6, "{}", row[5]);
        // Frequency 0 turns one radian per position.
        assert!((row[0] - 3.0f32.cos()).abs() < 1e-6);
        assert!((row[4] - 3.0f32.sin()).abs() < 1e-6);
    }
}
