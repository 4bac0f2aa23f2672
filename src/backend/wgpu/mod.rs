//! The GPU backend: WGSL compute shaders run through `wgpu` (Vulkan, Metal, DX12, GL).
//!
//! Memory is allocated once: weights are uploaded by [`Backend::weight`], activations are f32
//! storage buffers made by [`Backend::tensor`], and the KV cache is one K and one V buffer per
//! layer, f16 (the default [`KvDtype`](super::KvDtype)) or f32. A step records work, it does
//! not run it: [`Backend::begin_step`] uploads the batch into a preallocated buffer and opens
//! one command encoder, every op appends a compute pass to it, and [`Backend::read`] (or
//! [`Backend::sample`], which picks the tokens on the GPU and reads back only their ids)
//! submits the whole step and does its single blocking read-back. Nothing is allocated per
//! step once buffers have grown to the largest batch seen; pipelines and bind groups are
//! cached (bind groups by the ids of the buffers they bind).
//!
//! Layouts, and why:
//! - **Weights** keep their stored bits: F16 and BF16 as two elements per 32-bit word
//!   (widened to f32 in the shader, exactly: bf16 by a shift, f16 by `unpack2x16float` or
//!   integer operations where the driver lacks it), F32 as is, GGUF block formats (`Q8_0`,
//!   `Q4_0`, `Q4_1`, `Q4_K`, `Q5_K`, `Q6_K`) repacked to whole words ([`repack`]). Rows are
//!   split into segments that each fit one storage binding; a matmul dispatches once per
//!   segment (see `weights`).
//! - **Activations** are dense row-major f32 `[rows, cols]`: the CPU backend's layout, so ops
//!   can be checked against it element for element.
//! - **KV cache**: per layer, K and V are `[num_blocks · block_size, Hkv · D]`, the CPU
//!   layout, in f16 (two values per word, rounded once when written) or f32, as
//!   [`KvLayout::dtype`] says. A pool larger than one storage binding is refused with an
//!   error naming the limit (no splitting of KV yet).
//! - **Batch**: one u32 buffer holding `token_ids[T] | positions[T] | slot_mapping[T] |
//!   row_seq[T] | logits_rows[R] | block_tables[S, stride]`; kernels get the offsets in their
//!   parameters.
//! - **Parameters**: each dispatch writes its uniform struct into its own 256-byte slot of
//!   a params page (bound with a dynamic offset); pages are uploaded just before submit.
//!
//! - **Decode attention over long contexts** (flash-decoding): when every sequence of a step
//!   has one new token and the longest context exceeds [`WgpuOptions::decode_split`]
//!   positions, each (token, head) is spread over one workgroup per that many positions,
//!   which write partial softmax results to a scratch buffer that a second pass combines
//!   (two dispatches per layer instead of one).
//!
//! Arithmetic is f32 throughout (no f16 intermediates): f16 weights, block scales and an f16
//! KV cache are widened to f32 as they are read, so results match the CPU backend to
//! rounding. An f16 KV cache rounds each key and value once, when it is written; scores and
//! sums stay f32. Kernels: see `shaders/` and [`pipelines`].
//!
//! The rooms: `buffers` (allocation, activations), `weights` (upload, segments), `step`
//! (batch upload, dispatch, submit, read-back), `matmul` (embedding and the matmuls), `rows`
//! (norm, SiLU, gather), `attention` (KV cache, RoPE, attention), `sample` (sampling on the
//! GPU); [`context`] opens the device, [`pipelines`] and [`preprocess`] build the kernels,
//! [`params`] mirrors their uniforms.

mod attention;
mod buffers;
pub mod context;
mod matmul;
pub mod params;
pub mod pipelines;
pub mod preprocess;
pub mod repack;
mod rows;
mod sample;
mod step;
mod weights;

use std::sync::{Mutex, MutexGuard};

use self::attention::RopeTable;
pub use self::attention::WgpuKvCache;
pub use self::buffers::WgpuTensor;
use self::buffers::{Allocator, GpuBuffer};
use self::context::GpuContext;
pub use self::context::{has_hardware_gpu, list_adapters, AdapterInfoSummary};
use self::pipelines::Pipelines;
use self::step::{ParamsPage, StepLayout};
pub use self::weights::WgpuWeight;
use super::{AttentionDims, Backend, Batch, KvLayout, RowSampling};
use crate::error::Result;
use crate::loader::HostTensor;

/// Threads per workgroup of the element-wise and per-row kernels (their `WG`).
const WG: usize = 64;
/// Default [`WgpuOptions::decode_split`]: with 16 query heads, a 4096-token context makes
/// 128 workgroups instead of 16.
const DECODE_SPLIT: usize = 512;

/// How to open the GPU backend.
#[derive(Clone, Debug)]
pub struct WgpuOptions {
    /// `--adapter`: an index in [`list_adapters`] order, or part of an adapter's name
    /// (case-insensitive). `None` takes the first (the most capable).
    pub adapter: Option<String>,
    /// Use subgroup kernels when the adapter has subgroups.
    pub allow_subgroups: bool,
    /// Enable shader-f16 when the adapter has it.
    pub allow_f16: bool,
    /// Split weights into segments of at most this many bytes even when the adapter allows
    /// bigger bindings (tests use it to exercise splitting on small weights).
    pub max_segment_bytes: Option<u64>,
    /// Flash-decoding: in decode steps whose longest context exceeds this many positions,
    /// each (token, head) of the attention is spread over one workgroup per this many
    /// positions (rounded up to a multiple of 64), and a second pass combines them. 0 = never.
    pub decode_split: usize,
    /// Run on a device the application already has (a wgpu app need not open a second
    /// one); `adapter` is then ignored. wick uses the features and limits the device was
    /// opened with: request the adapter's own limits (`adapter.limits()`) and, where the
    /// adapter has them, `SHADER_F16` and `SUBGROUP` for the fastest kernels.
    pub device: Option<SharedDevice>,
}

/// An application's wgpu device for [`WgpuOptions::device`].
#[derive(Clone, Debug)]
pub struct SharedDevice {
    /// The adapter the device was opened on.
    pub adapter: wgpu::Adapter,
    /// The device.
    pub device: wgpu::Device,
    /// Its queue.
    pub queue: wgpu::Queue,
}

impl Default for WgpuOptions {
    fn default() -> Self {
        WgpuOptions {
            adapter: None,
            allow_subgroups: true,
            allow_f16: true,
            max_segment_bytes: None,
            decode_split: DECODE_SPLIT,
            device: None,
        }
    }
}

pub use super::GpuStats;
/// Everything the `&self` ops mutate.
struct Inner {
    pipelines: Pipelines,
    encoder: Option<wgpu::CommandEncoder>,
    pages: Vec<ParamsPage>,
    slots_used: usize,
    batch_buf: GpuBuffer,
    batch_words: Vec<u32>,
    step: StepLayout,
    staging: Option<GpuBuffer>,
    /// `[R]` [`RowSampling`] of the current sample op.
    sampling: Option<GpuBuffer>,
    /// `[R]` u32 token ids the sample op writes.
    sample_ids: Option<GpuBuffer>,
    /// The step's token masks of [`Backend::sample`] (grown to the largest seen).
    sample_masks: Option<GpuBuffer>,
    /// `[T·H·splits, D + 2]` partial results of split decode attention.
    attn_part: Option<GpuBuffer>,
    rope: Option<RopeTable>,
    stats: GpuStats,
}

/// The GPU backend.
pub struct WgpuBackend {
    ctx: GpuContext,
    alloc: Allocator,
    /// Largest weight segment / KV pool, bytes.
    segment_limit: u64,
    /// Bytes between parameter slots (≥ the uniform offset alignment).
    slot_bytes: usize,
    /// Bound in place of absent optional inputs (q/k norms).
    dummy: GpuBuffer,
    /// Context positions per workgroup of split decode attention (a multiple of `WG`);
    /// 0 = never split.
    split_span: usize,
    inner: Mutex<Inner>,
    /// Time spent making weights: repacking on the host, writing buffers.
    weight_times: Mutex<crate::loader::LoadTimes>,
}

impl WgpuBackend {
    /// Opens the adapter chosen by `opts` (see [`context`] for the order).
    pub fn new(opts: &WgpuOptions) -> Result<Self> {
        let ctx = match &opts.device {
            Some(shared) => GpuContext::from_device(shared, opts.allow_subgroups, opts.allow_f16),
            None => GpuContext::open(
                opts.adapter.as_deref(),
                opts.allow_subgroups,
                opts.allow_f16,
            )?,
        };
        // Indices inside a binding are u32 elements; stay well inside that too.
        let mut segment_limit = ctx
            .limits
            .max_storage_buffer_binding_size
            .min(ctx.limits.max_buffer_size)
            .min(1 << 31);
        if let Some(m) = opts.max_segment_bytes {
            segment_limit = segment_limit.min(m.max(16));
        }
        let slot_bytes = (ctx.limits.min_uniform_buffer_offset_alignment as usize).max(256);
        let alloc = Allocator::new();
        let make = |size: u64, label: &str| {
            alloc.create(
                &ctx.device,
                &wgpu::BufferDescriptor {
                    label: Some(label),
                    size,
                    usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST,
                    mapped_at_creation: false,
                },
            )
        };
        let dummy = make(16, "wick dummy");
        let batch_buf = make(4096, "wick batch");
        let pipelines = Pipelines::new(&ctx.device);
        Ok(WgpuBackend {
            inner: Mutex::new(Inner {
                pipelines,
                encoder: None,
                pages: Vec::new(),
                slots_used: 0,
                batch_buf,
                batch_words: Vec::new(),
                step: StepLayout::default(),
                staging: None,
                sampling: None,
                sample_ids: None,
                sample_masks: None,
                attn_part: None,
                rope: None,
                stats: GpuStats::default(),
            }),
            ctx,
            alloc,
            segment_limit,
            slot_bytes,
            dummy,
            split_span: opts.decode_split.next_multiple_of(WG),
            weight_times: Mutex::default(),
        })
    }

    /// Counters of dispatches, submits and read-backs so far.
    pub fn stats(&self) -> GpuStats {
        GpuStats {
            memory_bytes: self.alloc.live_bytes(),
            ..self.lock().stats
        }
    }

    /// The adapter this backend runs on.
    pub fn adapter_info(&self) -> &wgpu::AdapterInfo {
        &self.ctx.info
    }

    /// Whether subgroup kernels are in use.
    pub fn uses_subgroups(&self) -> bool {
        self.ctx.subgroup
    }

    /// The largest weight segment (and KV pool) in bytes.
    pub fn segment_limit(&self) -> u64 {
        self.segment_limit
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Backend for WgpuBackend {
    type Tensor = WgpuTensor;
    type Weight = WgpuWeight;
    type KvCache = WgpuKvCache;

    fn describe(&self) -> String {
        let i = &self.ctx.info;
        let mut extra = Vec::new();
        if self.ctx.subgroup {
            extra.push("subgroups");
        }
        if self.ctx.shader_f16 {
            extra.push("shader-f16");
        }
        let extra = if extra.is_empty() {
            String::new()
        } else {
            format!(", {}", extra.join(", "))
        };
        format!(
            "gpu ({}, {:?}, {:?}{extra})",
            i.name, i.backend, i.device_type
        )
    }

    fn weight(&self, parts: &[&HostTensor]) -> Result<WgpuWeight> {
        let start = std::time::Instant::now();
        let mut repack = std::time::Duration::ZERO;
        let w = self.upload_weight(parts, &mut repack);
        let mut t = self.weight_times.lock().unwrap_or_else(|e| e.into_inner());
        t.repack += repack;
        t.upload += start.elapsed().saturating_sub(repack);
        w
    }

    fn weight_times(&self) -> crate::loader::LoadTimes {
        *self.weight_times.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn device_memory_bytes(&self) -> Option<u64> {
        self.ctx.memory_bytes
    }

    fn tensor(&self, rows: usize, cols: usize) -> WgpuTensor {
        self.new_tensor(rows, cols)
    }

    fn kv_cache(&self, layout: KvLayout) -> Result<WgpuKvCache> {
        self.new_kv_cache(layout)
    }

    fn max_kv_pool_bytes(&self) -> Option<usize> {
        Some(usize::try_from(self.segment_limit).unwrap_or(usize::MAX))
    }

    fn begin_step(&self, batch: &Batch) {
        self.upload_batch(batch);
    }

    fn embed(&self, table: &WgpuWeight, batch: &Batch, out: &mut WgpuTensor) {
        self.record_embed(table, batch, out);
    }

    fn rms_norm(
        &self,
        x: &WgpuTensor,
        w: &WgpuWeight,
        eps: f32,
        rows: usize,
        out: &mut WgpuTensor,
    ) {
        self.record_rms_norm(x, w, eps, rows, out);
    }

    fn matmul(&self, x: &WgpuTensor, w: &WgpuWeight, rows: usize, out: &mut WgpuTensor) {
        self.record_matmul(x, w, rows, out, false);
    }

    fn matmul_add(&self, x: &WgpuTensor, w: &WgpuWeight, rows: usize, out: &mut WgpuTensor) {
        self.record_matmul(x, w, rows, out, true);
    }

    fn rms_norm_matmul(
        &self,
        x: &WgpuTensor,
        norm: &WgpuWeight,
        eps: f32,
        w: &WgpuWeight,
        rows: usize,
        xn: &mut WgpuTensor,
        out: &mut WgpuTensor,
    ) {
        self.record_rms_norm_matmul(x, norm, eps, w, rows, xn, out);
    }

    fn silu_mul_matmul_add(
        &self,
        gate_up: &WgpuTensor,
        w: &WgpuWeight,
        rows: usize,
        act: &mut WgpuTensor,
        out: &mut WgpuTensor,
    ) {
        self.record_silu_mul_matmul_add(gate_up, w, rows, act, out);
    }

    fn qk_norm_rope(
        &self,
        qkv: &mut WgpuTensor,
        q_norm: Option<&WgpuWeight>,
        k_norm: Option<&WgpuWeight>,
        dims: AttentionDims,
        batch: &Batch,
    ) {
        self.record_qk_norm_rope(qkv, q_norm, k_norm, dims, batch);
    }

    fn kv_write(
        &self,
        qkv: &WgpuTensor,
        cache: &mut WgpuKvCache,
        layer: usize,
        dims: AttentionDims,
        batch: &Batch,
    ) {
        self.record_kv_write(qkv, cache, layer, dims, batch);
    }

    fn attention(
        &self,
        qkv: &WgpuTensor,
        cache: &WgpuKvCache,
        layer: usize,
        dims: AttentionDims,
        batch: &Batch,
        out: &mut WgpuTensor,
    ) {
        self.record_attention(qkv, cache, layer, dims, batch, out);
    }

    fn qk_norm_rope_kv_write_attention(
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
        self.record_qk_norm_rope_kv_write_attention(
            qkv, q_norm, k_norm, cache, layer, dims, batch, out,
        );
    }

    fn silu_mul(&self, gate_up: &WgpuTensor, rows: usize, out: &mut WgpuTensor) {
        self.record_silu_mul(gate_up, rows, out);
    }

    fn gather_rows(&self, x: &WgpuTensor, batch: &Batch, out: &mut WgpuTensor) {
        self.record_gather_rows(x, batch, out);
    }

    fn read(&self, t: &WgpuTensor, rows: usize, dst: &mut [f32]) {
        self.read_tensor(t, rows, dst);
    }

    fn tensor_cols(&self, t: &WgpuTensor) -> usize {
        t.cols
    }

    fn sample(
        &self,
        logits: &WgpuTensor,
        rows: usize,
        params: &[RowSampling],
        masks: &[u32],
        out: &mut [u32],
    ) {
        self.sample_rows(logits, rows, params, masks, out);
    }
}

#[cfg(test)]
mod tests {
    //! Dispatches on a real adapter (lavapipe is enough): a weight split into segments must
    //! give the same products and rows as one buffer would. Like `tests/gpu_ops.rs`, a test
    //! that finds no adapter fails; `WICK_SKIP_GPU_TESTS=1` skips them explicitly.

    use super::*;
    use crate::loader::Bytes;
    use crate::quant::DType;

    /// A backend whose weight segments hold at most `segment_bytes`.
    fn gpu(segment_bytes: u64) -> Option<WgpuBackend> {
        if std::env::var_os("WICK_SKIP_GPU_TESTS").is_some_and(|v| v == "1") {
            eprintln!("WICK_SKIP_GPU_TESTS=1: skipping a GPU test");
            return None;
        }
        let opts = WgpuOptions {
            max_segment_bytes: Some(segment_bytes),
            ..WgpuOptions::default()
        };
        match WgpuBackend::new(&opts) {
            Ok(b) => Some(b),
            Err(e) => panic!(
                "no usable GPU adapter ({e}); install mesa-vulkan-drivers for lavapipe, or \
                 set WICK_SKIP_GPU_TESTS=1 to skip GPU tests explicitly"
            ),
        }
    }

    /// `[rows, cols]` f32 values that differ in every element.
    fn values(rows: usize, cols: usize) -> Vec<f32> {
        (0..rows * cols)
            .map(|i| ((i * 7919) % 23) as f32 / 8.0 - 1.25)
            .collect()
    }

    fn f32_weight(name: &str, rows: usize, cols: usize, v: &[f32]) -> HostTensor {
        HostTensor {
            name: name.into(),
            dtype: DType::F32,
            shape: vec![rows, cols],
            data: Bytes::from_vec(v.iter().flat_map(|x| x.to_le_bytes()).collect()),
        }
    }

    /// A step of one sequence holding `tokens` (positions from 0, one block of 16 per 16).
    fn step(tokens: &[u32]) -> Batch {
        let blocks: Vec<u32> = (0..tokens.len().div_ceil(16) as u32).collect();
        let mut b = Batch::default();
        b.push_seq(tokens, 0, &blocks, 16);
        b.logits_rows.push(tokens.len() as u32 - 1);
        b
    }

    #[test]
    fn segmented_weights_embed_and_multiply_like_one_buffer() {
        // 7 rows of 5 f32, padded to 6: 24 bytes a row, 2 rows per 48-byte segment.
        let (n, k) = (7, 5);
        let Some(gpu) = gpu(48) else { return };
        let w_vals = values(n, k);
        let w = gpu.weight(&[&f32_weight("w", n, k, &w_vals)]).unwrap();
        assert_eq!(w.num_segments(), 4, "7 rows, 2 per segment");

        // Embedding: token ids from every segment, in any order, come back exactly.
        let tokens = [6u32, 0, 3, 4, 1, 5];
        let t = tokens.len();
        let batch = step(&tokens);
        let mut x = gpu.tensor(t, k);
        gpu.begin_step(&batch);
        gpu.embed(&w, &batch, &mut x);
        let mut rows = vec![0f32; t * k];
        gpu.read(&x, t, &mut rows);
        for (r, &id) in tokens.iter().enumerate() {
            let id = id as usize;
            assert_eq!(
                &rows[r * k..(r + 1) * k],
                &w_vals[id * k..(id + 1) * k],
                "row {r}"
            );
        }

        // x · Wᵀ with the matrix-vector kernel (2 rows) and the tiled one (6 rows), then
        // accumulated once more: every output column comes from its own segment.
        for m in [2, t] {
            let mut out = gpu.tensor(t, n);
            gpu.begin_step(&batch);
            gpu.embed(&w, &batch, &mut x);
            gpu.matmul(&x, &w, m, &mut out);
            gpu.matmul_add(&x, &w, m, &mut out);
            let mut got = vec![0f32; m * n];
            gpu.read(&out, m, &mut got);
            for i in 0..m {
                let xi = &rows[i * k..(i + 1) * k];
                for j in 0..n {
                    let wj = &w_vals[j * k..(j + 1) * k];
                    let want: f32 = 2.0 * xi.iter().zip(wj).map(|(a, b)| a * b).sum::<f32>();
                    let g = got[i * n + j];
                    assert!(
                        (g - want).abs() <= 1e-5 + 1e-5 * want.abs(),
                        "{m} rows: out[{i}, {j}] = {g}, want {want}"
                    );
                }
            }
        }
        let stats = gpu.stats();
        assert_eq!(stats.steps, 3);
        // One dispatch per segment for each embed and matmul: 4 + 2 · (4 + 4 + 4).
        assert_eq!(stats.dispatches, 28);
        assert!(stats.memory_bytes > 0);
    }

    #[test]
    fn a_row_wider_than_a_binding_is_an_error_not_a_panic() {
        let Some(gpu) = gpu(16) else { return };
        let v = values(2, 9);
        let err = gpu
            .weight(&[&f32_weight("wide", 2, 9, &v)])
            .err()
            .expect("a 40-byte row cannot fit 16 bytes");
        let msg = err.to_string();
        assert!(msg.contains("`wide`") && msg.contains("16 bytes"), "{msg}");
    }

    #[test]
    fn gathered_rows_follow_logits_rows() {
        let Some(gpu) = gpu(1 << 20) else { return };
        let (n, k) = (9, 3);
        let w_vals = values(n, k);
        let w = gpu.weight(&[&f32_weight("table", n, k, &w_vals)]).unwrap();
        let tokens = [8u32, 2, 5];
        let mut batch = step(&tokens);
        batch.logits_rows = vec![2, 0];
        let mut x = gpu.tensor(3, k);
        let mut picked = gpu.tensor(2, k);
        gpu.begin_step(&batch);
        gpu.embed(&w, &batch, &mut x);
        gpu.gather_rows(&x, &batch, &mut picked);
        let mut got = vec![0f32; 2 * k];
        gpu.read(&picked, 2, &mut got);
        assert_eq!(&got[..k], &w_vals[5 * k..6 * k]);
        assert_eq!(&got[k..], &w_vals[8 * k..9 * k]);
    }
}
