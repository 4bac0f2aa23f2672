//! The compute backends and the closed set of coarse operations the model is written in.
//!
//! The forward pass ([`crate::model`]) is written once, generic over [`Backend`]. A backend
//! owns its memory: activations are [`Backend::Tensor`] handles (f32 matrices allocated once
//! with a fixed row capacity), weights are [`Backend::Weight`]s made once at load time, and
//! the paged KV cache is a [`Backend::KvCache`]. Each step of the model starts with
//! [`Backend::begin_step`], which hands the backend the step's [`Batch`] (token ids,
//! positions, slot mapping, block tables); the ops that follow take the row count and read
//! the rest from that batch. Operations cannot fail: shapes are validated when the model is
//! built, and invariants are asserted.
//!
//! Backends:
//! - [`cpu`]: rayon across rows, AVX2/FMA/F16C kernels chosen at run time, scalar fallback.
//! - [`wgpu`]: WGSL compute shaders through `wgpu` (Vulkan, Metal, DX12, GL).
//!
//! Shape letters used in docs: T tokens in the step, S sequences, C hidden, H / Hkv query /
//! key-value heads, D head_dim, F ffn width, V vocab, R rows whose logits are wanted.

pub mod cpu;
pub mod sample;
#[cfg(feature = "gpu")]
pub mod wgpu;

pub use self::sample::RowSampling;

/// The GPU backend's work counters since it was made (per token = difference / tokens).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GpuStats {
    /// Steps begun.
    pub steps: u64,
    /// Compute dispatches recorded.
    pub dispatches: u64,
    /// Command buffers submitted.
    pub submits: u64,
    /// Blocking read-backs (waits for the GPU).
    pub readbacks: u64,
    /// Bytes copied back to the host by those read-backs.
    pub readback_bytes: u64,
    /// Bytes of every GPU buffer wick holds now: weights, KV cache, activations, parameters
    /// and the read-back staging buffer (a level, not a counter).
    pub memory_bytes: u64,
}
use crate::error::Result;
use crate::loader::HostTensor;

/// One sequence's share of a step.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SeqSpan {
    /// First row of this sequence's tokens in the step.
    pub start: u32,
    /// Number of tokens of this sequence in the step (the prompt chunk, or 1 when decoding).
    pub len: u32,
    /// Tokens of this sequence in the KV cache after the step (cached + new).
    pub context_len: u32,
    /// Physical KV block of each logical block of the sequence.
    pub block_table: Vec<u32>,
}

/// What one forward step computes: a flat list of tokens from one or more sequences.
///
/// Names follow vLLM: token `i` sits at `positions[i]` of its sequence and its key/value go
/// to KV slot `slot_mapping[i]` (= block × block_size + offset).
#[derive(Clone, Debug, Default)]
pub struct Batch {
    /// `[T]` token ids.
    pub token_ids: Vec<u32>,
    /// `[T]` position of each token in its sequence.
    pub positions: Vec<u32>,
    /// `[T]` KV slot of each token.
    pub slot_mapping: Vec<u32>,
    /// `[S]` the sequences, in row order.
    pub seqs: Vec<SeqSpan>,
    /// `[R]` rows whose logits are wanted (usually the last row of each sequence).
    pub logits_rows: Vec<u32>,
}

/// The KV slot of position `pos` of a sequence whose blocks are `block_table`:
/// `block_table[pos / block_size] · block_size + pos % block_size`.
pub fn slot(block_table: &[u32], block_size: usize, pos: usize) -> u32 {
    (block_table[pos / block_size] as usize * block_size + pos % block_size) as u32
}

impl Batch {
    /// T: number of tokens in the step.
    pub fn num_tokens(&self) -> usize {
        self.token_ids.len()
    }

    /// Empties the batch for the next step (keeping its allocations).
    pub fn clear(&mut self) {
        self.token_ids.clear();
        self.positions.clear();
        self.slot_mapping.clear();
        self.seqs.clear();
        self.logits_rows.clear();
    }

    /// Appends a sequence's next tokens: `tokens` at positions `start..start + len`, with
    /// the KV slots of `block_table` (which covers them); after the step its context is
    /// `start + len` tokens. Returns the row of its first token. Which rows' logits are
    /// wanted is the caller's to push into `logits_rows`.
    pub fn push_seq(
        &mut self,
        tokens: &[u32],
        start: usize,
        block_table: &[u32],
        block_size: usize,
    ) -> usize {
        let row = self.token_ids.len();
        let end = start + tokens.len();
        self.token_ids.extend_from_slice(tokens);
        self.positions.extend((start..end).map(|p| p as u32));
        self.slot_mapping
            .extend((start..end).map(|p| slot(block_table, block_size, p)));
        self.seqs.push(SeqSpan {
            start: row as u32,
            len: tokens.len() as u32,
            context_len: end as u32,
            block_table: block_table.to_vec(),
        });
        row
    }

    /// Checks the internal consistency the kernels rely on (lengths agree, spans tile the
    /// rows, block tables cover the context). Used by debug assertions and tests.
    pub fn check(&self, block_size: usize) -> std::result::Result<(), String> {
        let t = self.token_ids.len();
        if self.positions.len() != t || self.slot_mapping.len() != t {
            return Err("token_ids, positions and slot_mapping differ in length".into());
        }
        let mut next = 0u32;
        for (s, seq) in self.seqs.iter().enumerate() {
            if seq.start != next || seq.len == 0 || seq.len > seq.context_len {
                return Err(format!("sequence {s} does not tile the rows: {seq:?}"));
            }
            next += seq.len;
            if seq.block_table.len() * block_size < seq.context_len as usize {
                return Err(format!("sequence {s}: block table too short"));
            }
            for i in 0..seq.len {
                let row = (seq.start + i) as usize;
                let pos = seq.context_len - seq.len + i;
                if self.positions[row] != pos {
                    return Err(format!(
                        "row {row}: position {} != {pos}",
                        self.positions[row]
                    ));
                }
                let slot = slot(&seq.block_table, block_size, pos as usize);
                if self.slot_mapping[row] != slot {
                    return Err(format!(
                        "row {row}: slot {} != {slot}",
                        self.slot_mapping[row]
                    ));
                }
            }
        }
        if next as usize != t {
            return Err("sequences do not cover every row".into());
        }
        if self.logits_rows.iter().any(|&r| r as usize >= t) {
            return Err("a logits row is out of range".into());
        }
        Ok(())
    }
}

/// `(rows, cols)` of `parts` stacked by rows, checked the same way for every backend: at
/// least one part, the same number of columns in each, rows of whole quantization blocks, and
/// exactly the bytes the shape needs.
pub fn stacked_shape(parts: &[&HostTensor]) -> Result<(usize, usize)> {
    let first = parts
        .first()
        .ok_or_else(|| crate::Error::UnsupportedModel("empty weight".into()))?;
    let cols = first.rows_cols().1;
    let mut rows = 0;
    for p in parts {
        let (r, c) = p.rows_cols();
        if c != cols {
            return Err(crate::Error::ShapeMismatch {
                name: p.name.clone(),
                expected: vec![r, cols],
                found: p.shape.clone(),
            });
        }
        if p.dtype.bytes_for(c).is_none() {
            return Err(crate::Error::UnsupportedModel(format!(
                "tensor `{}`: rows of {c} elements are not whole {} blocks",
                p.name, p.dtype
            )));
        }
        if p.dtype.bytes_for(r * c) != Some(p.data.len()) {
            return Err(crate::Error::UnsupportedModel(format!(
                "tensor `{}`: {} bytes for shape {:?}",
                p.name,
                p.data.len(),
                p.shape
            )));
        }
        rows += r;
    }
    Ok((rows, cols))
}

/// Shape of the paged KV cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvLayout {
    /// Transformer blocks (one K and one V pool each).
    pub num_layers: usize,
    /// Blocks in each pool.
    pub num_blocks: usize,
    /// Tokens per block.
    pub block_size: usize,
    /// Hkv.
    pub num_kv_heads: usize,
    /// D.
    pub head_dim: usize,
    /// How each value is stored.
    pub dtype: KvDtype,
}

impl KvLayout {
    /// Values in one pool (the K or the V of one layer).
    pub fn pool_len(&self) -> usize {
        self.num_blocks * self.block_size * self.num_kv_heads * self.head_dim
    }

    /// Bytes of K + V storage for all layers.
    pub fn bytes(&self) -> usize {
        2 * self.num_layers * self.pool_len() * self.dtype.size()
    }
}

/// How the KV cache stores keys and values.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum KvDtype {
    /// 4 bytes per value: keys and values exactly as computed.
    F32,
    /// 2 bytes per value (IEEE half, round to nearest): half the memory, so twice the
    /// tokens in the same budget, and half the bytes attention reads per token. Keys and
    /// values are rounded once, when written; scores and sums stay f32.
    #[default]
    F16,
}

impl KvDtype {
    /// Bytes per value.
    pub fn size(self) -> usize {
        match self {
            KvDtype::F32 => 4,
            KvDtype::F16 => 2,
        }
    }
}

impl std::fmt::Display for KvDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            KvDtype::F32 => "f32",
            KvDtype::F16 => "f16",
        })
    }
}

impl std::str::FromStr for KvDtype {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" => Ok(KvDtype::F32),
            "f16" | "float16" | "half" => Ok(KvDtype::F16),
            _ => Err(format!("unknown KV cache type `{s}` (expected f16 or f32)")),
        }
    }
}

/// Where the columns of the fused QKV activation sit, and how to normalise and rotate them.
#[derive(Clone, Copy, Debug)]
pub struct AttentionDims {
    /// H.
    pub num_heads: usize,
    /// Hkv.
    pub num_kv_heads: usize,
    /// D.
    pub head_dim: usize,
    /// RoPE base.
    pub rope_theta: f32,
    /// RMSNorm epsilon for the q/k norms.
    pub eps: f32,
}

impl AttentionDims {
    /// Width of the fused QKV row: (H + 2·Hkv)·D.
    pub fn qkv_width(&self) -> usize {
        (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
    }
}

/// The coarse operations of a decoder-only transformer, on one kind of device.
///
/// Every op that takes `rows` works on the first `rows` rows of its tensors; tensors were
/// allocated with at least that many.
pub trait Backend: Send + Sync + 'static {
    /// An f32 activation matrix with a fixed row capacity.
    type Tensor: Send + Sync;
    /// A weight matrix (or vector) ready for this backend.
    type Weight: Send + Sync;
    /// K and V pools of every layer.
    type KvCache: Send + Sync;

    /// A short human-readable description ("cpu (2 threads, avx2)").
    fn describe(&self) -> String;

    /// Makes one weight from `parts` stacked by rows (all with the same number of columns).
    /// Stacking lets the model fuse q/k/v and gate/up into one product.
    fn weight(&self, parts: &[&HostTensor]) -> Result<Self::Weight>;

    /// The time [`Backend::weight`] has taken so far, split into `repack` (converting and
    /// re-laying weights out for this backend's kernels) and `upload` (writing them into
    /// device memory); the other phases are zero.
    fn weight_times(&self) -> crate::loader::LoadTimes {
        crate::loader::LoadTimes::default()
    }

    /// Bytes of memory the device has, when the backend can tell (`None` for host memory,
    /// which [`crate::resources::Fences`] watches, or a device that does not say).
    fn device_memory_bytes(&self) -> Option<u64> {
        None
    }

    /// Allocates an activation matrix of `rows` × `cols`.
    fn tensor(&self, rows: usize, cols: usize) -> Self::Tensor;

    /// The number of columns of `t`.
    fn tensor_cols(&self, t: &Self::Tensor) -> usize;

    /// Allocates the paged KV cache.
    fn kv_cache(&self, layout: KvLayout) -> Result<Self::KvCache>;

    /// The largest pool (one layer's K or V) [`Backend::kv_cache`] can make, in bytes, when
    /// the device limits it (a GPU binds each pool as one storage buffer); `None` when only
    /// memory does.
    fn max_kv_pool_bytes(&self) -> Option<usize> {
        None
    }

    /// Runs `step`, one forward step's calls into this backend, where they run best: the
    /// CPU runs it on its worker pool, so that each operation's parallel parts fork from a
    /// worker whose siblings are still awake from the previous one, instead of waking the
    /// pool from outside once per operation.
    fn run_step(&self, step: &mut (dyn FnMut() + Send)) {
        step()
    }

    /// Starts a forward step over `batch`.
    fn begin_step(&self, batch: &Batch);

    /// `out[T, C] = table[token_ids]`: gathers embedding rows.
    fn embed(&self, table: &Self::Weight, batch: &Batch, out: &mut Self::Tensor);

    /// `out[rows, C] = rmsnorm(x) * w`.
    fn rms_norm(
        &self,
        x: &Self::Tensor,
        w: &Self::Weight,
        eps: f32,
        rows: usize,
        out: &mut Self::Tensor,
    );

    /// `out[rows, N] = x[rows, K] · Wᵀ` (W is `[N, K]`).
    fn matmul(&self, x: &Self::Tensor, w: &Self::Weight, rows: usize, out: &mut Self::Tensor);

    /// `out[rows, N] += x[rows, K] · Wᵀ`: a product added into the residual stream.
    fn matmul_add(&self, x: &Self::Tensor, w: &Self::Weight, rows: usize, out: &mut Self::Tensor);

    /// `out[rows, N] = rms_norm(x, norm) · Wᵀ`: the RMSNorm in front of a product, which a
    /// backend may fold into it (the GPU does when decoding, to save a dispatch). `xn`
    /// `[rows, K]` is scratch for backends that do not fold; its contents afterwards are
    /// unspecified.
    #[allow(clippy::too_many_arguments)]
    fn rms_norm_matmul(
        &self,
        x: &Self::Tensor,
        norm: &Self::Weight,
        eps: f32,
        w: &Self::Weight,
        rows: usize,
        xn: &mut Self::Tensor,
        out: &mut Self::Tensor,
    ) {
        self.rms_norm(x, norm, eps, rows, xn);
        self.matmul(xn, w, rows, out);
    }

    /// `out[rows, N] += (silu(gate_up[:, :F]) * gate_up[:, F:]) · Wᵀ`: the SwiGLU in front of
    /// `down_proj`, which a backend may fold into the product. `act` `[rows, F]` is scratch
    /// for backends that do not fold; its contents afterwards are unspecified.
    fn silu_mul_matmul_add(
        &self,
        gate_up: &Self::Tensor,
        w: &Self::Weight,
        rows: usize,
        act: &mut Self::Tensor,
        out: &mut Self::Tensor,
    ) {
        self.silu_mul(gate_up, rows, act);
        self.matmul_add(act, w, rows, out);
    }

    /// On the fused `qkv[T, (H+2Hkv)·D]`: per-head RMSNorm of q and k (when norms are given),
    /// then rotate-half RoPE of q and k at each token's position.
    fn qk_norm_rope(
        &self,
        qkv: &mut Self::Tensor,
        q_norm: Option<&Self::Weight>,
        k_norm: Option<&Self::Weight>,
        dims: AttentionDims,
        batch: &Batch,
    );

    /// Writes the k and v columns of `qkv` into `layer`'s pools at the batch's slots.
    fn kv_write(
        &self,
        qkv: &Self::Tensor,
        cache: &mut Self::KvCache,
        layer: usize,
        dims: AttentionDims,
        batch: &Batch,
    );

    /// Causal grouped-query attention of each token's q over its sequence's cached keys and
    /// values, read through the block tables: `out[T, H·D]`.
    fn attention(
        &self,
        qkv: &Self::Tensor,
        cache: &Self::KvCache,
        layer: usize,
        dims: AttentionDims,
        batch: &Batch,
        out: &mut Self::Tensor,
    );

    /// The attention half of a layer after the QKV product: [`Backend::qk_norm_rope`], then
    /// [`Backend::kv_write`] into `layer`'s pools, then [`Backend::attention`] into
    /// `out[T, H·D]`. A backend may fold them (the GPU does when every sequence of the batch
    /// has one new token, to save two dispatches per layer). `qkv[T, (H+2Hkv)·D]` holds the
    /// raw product on entry; its contents afterwards are unspecified.
    #[allow(clippy::too_many_arguments)]
    fn qk_norm_rope_kv_write_attention(
        &self,
        qkv: &mut Self::Tensor,
        q_norm: Option<&Self::Weight>,
        k_norm: Option<&Self::Weight>,
        cache: &mut Self::KvCache,
        layer: usize,
        dims: AttentionDims,
        batch: &Batch,
        out: &mut Self::Tensor,
    ) {
        self.qk_norm_rope(qkv, q_norm, k_norm, dims, batch);
        self.kv_write(qkv, cache, layer, dims, batch);
        self.attention(qkv, cache, layer, dims, batch, out);
    }

    /// `out[rows, F] = silu(gate_up[:, :F]) * gate_up[:, F:]`.
    fn silu_mul(&self, gate_up: &Self::Tensor, rows: usize, out: &mut Self::Tensor);

    /// `out[R, C] = x[logits_rows]`: keeps only the rows whose logits are wanted.
    fn gather_rows(&self, x: &Self::Tensor, batch: &Batch, out: &mut Self::Tensor);

    /// Copies the first `rows` rows of `t` to the host (`dst.len() == rows * cols`). This is
    /// the step's read-back: on a GPU it waits for the step to finish.
    fn read(&self, t: &Self::Tensor, rows: usize, dst: &mut [f32]);

    /// Chooses one token per row of `logits[rows, V]`, row `i` as `params[i]` says, into
    /// `out[rows]`, by [`sample::sample_row`], the one sampling algorithm (penalties and logprobs
    /// are the `Sampler`'s steps on the host). Like [`Backend::read`], this is the step's read-back; on a GPU
    /// it brings back `rows` ids instead of `rows × V` logits. `masks` holds the step's token
    /// masks ([`sample::mask_words`] words each); a row whose [`RowSampling::mask`] names one
    /// draws only among the tokens it allows.
    ///
    /// The default reads the logits to the host (allocating `[rows, V]`) and samples there.
    fn sample(
        &self,
        logits: &Self::Tensor,
        rows: usize,
        params: &[RowSampling],
        masks: &[u32],
        out: &mut [u32],
    ) {
        assert_eq!(params.len(), rows, "one RowSampling per row");
        assert_eq!(out.len(), rows, "one id per row");
        let vocab = self.tensor_cols(logits);
        let mut host = vec![0.0; rows * vocab];
        self.read(logits, rows, &mut host);
        sample::sample_rows(&host, vocab, params, masks, out, &mut Vec::new());
    }
}
