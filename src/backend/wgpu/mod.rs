//! The GPU backend: WGSL compute shaders run through `wgpu` (Vulkan, Metal, DX12, GL).
//!
//! Memory is allocated once: weights are uploaded by [`Backend::weight`], activations are f32
//! storage buffers made by [`Backend::tensor`], and the KV cache is one f32 K and one f32 V
//! buffer per layer. A step records work, it does not run it: [`Backend::begin_step`] uploads
//! the batch into a preallocated buffer and opens one command encoder, every op appends a
//! compute pass to it, and [`Backend::read`] (or [`Backend::sample`], which picks the tokens
//! on the GPU and reads back only their ids) submits the whole step and does its single
//! blocking read-back. Nothing is allocated per step once buffers have grown to the largest
//! batch seen; pipelines and bind groups are cached (bind groups by the ids of the buffers
//! they bind).
//!
//! Layouts, and why:
//! - **Weights** keep their stored bits: F16 and BF16 as two elements per 32-bit word
//!   (widened to f32 in the shader, exactly: bf16 by a shift, f16 by `unpack2x16float` or
//!   integer operations where the driver lacks it), F32 as is. Rows are padded to an even
//!   length so that a word never straddles two rows. Parts stacked by rows are concatenated
//!   when they share a format, and the result is split by rows into segments (one buffer
//!   each) that each fit one storage binding (`max_storage_buffer_binding_size`,
//!   128 MiB on lavapipe, below the 311 MB embedding of Qwen3-0.6B in f16); a matmul
//!   dispatches once per segment. Norm weights (vectors) are widened to f32 once.
//! - **Activations** are dense row-major f32 `[rows, cols]`: the CPU backend's layout, so ops
//!   can be checked against it element for element.
//! - **KV cache**: per layer, K and V are `[num_blocks · block_size, Hkv · D]` f32, the CPU
//!   layout. A pool larger than one storage binding is refused with an error naming the limit
//!   (no splitting of KV yet).
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
//! Compute is f32 throughout (no f16 intermediates), so results match the CPU backend to
//! rounding. Kernels: see `shaders/` and [`pipelines`].

pub mod context;
pub mod params;
pub mod pipelines;
pub mod preprocess;
pub mod repack;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::sync::{Mutex, MutexGuard};

use bytemuck::Pod;

use self::context::GpuContext;
pub use self::context::{has_hardware_gpu, list_adapters, AdapterInfoSummary};
use self::params::*;
use self::pipelines::{Kernel, PipelineKey, Pipelines, WEIGHT_DTYPES};
use super::{AttentionDims, Backend, Batch, KvDtype, KvLayout, RowSampling};
use crate::error::{Error, Result};
use crate::loader::HostTensor;
use crate::quant::DType;

/// Token counts below this use the matrix-vector kernel; from it on, the tiled one.
const MAT_MIN_TOKENS: usize = 5;
/// Rows of W per workgroup of `matmul_vec.wgsl` (its `NR`).
const VEC_ROWS_PER_WG: usize = 4;
/// Tile of `matmul_mat.wgsl` (its `TM` = `TN`).
const MAT_TILE: usize = 64;
/// Threads per workgroup of the element-wise and per-row kernels (their `WG`).
const WG: usize = 64;
/// Largest head dimension of `attention.wgsl` (its `MAX_D`).
const MAX_HEAD_DIM: usize = 256;
/// Default [`WgpuOptions::decode_split`]: with 16 query heads, a 4096-token context makes
/// 128 workgroups instead of 16.
const DECODE_SPLIT: usize = 512;
/// Parameter slots per params page.
const SLOTS_PER_PAGE: usize = 64;

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

/// A GPU buffer with an id that bind-group caching can key on (cloning shares the buffer).
/// Its bytes count in [`GpuStats::memory_bytes`] until the last clone is dropped.
#[derive(Clone)]
struct GpuBuffer {
    id: u64,
    buf: wgpu::Buffer,
    _mem: Arc<MemShare>,
}

/// Cached bind groups by the buffers they bind. A bind group keeps its buffers alive, so
/// the entries that bind a buffer go when the buffer's last handle does.
type BindCache = Mutex<HashMap<BindKey, wgpu::BindGroup>>;

/// A buffer's share of the backend's bookkeeping, given back when its last handle drops:
/// its bytes in the count of live GPU memory, and the cached bind groups that bind it
/// (which would otherwise keep the buffer, and its memory, alive).
struct MemShare {
    id: u64,
    bytes: u64,
    live: Arc<AtomicU64>,
    bind_groups: std::sync::Weak<BindCache>,
}

impl Drop for MemShare {
    fn drop(&mut self) {
        self.live.fetch_sub(self.bytes, Ordering::Relaxed);
        if let Some(cache) = self.bind_groups.upgrade() {
            // Never reached with the cache locked: nothing drops a buffer while holding it.
            let mut cache = cache.lock().unwrap_or_else(|e| e.into_inner());
            cache.retain(|k, _| !k.ids.contains(&self.id));
        }
    }
}

/// Where buffers get their ids and their bytes counted: every GPU buffer wick makes is made
/// here, so the count is every byte wick holds on the device.
struct Allocator {
    next_id: AtomicU64,
    live: Arc<AtomicU64>,
    bind_groups: Arc<BindCache>,
}

impl Allocator {
    fn create(&self, device: &wgpu::Device, desc: &wgpu::BufferDescriptor) -> GpuBuffer {
        let buf = device.create_buffer(desc);
        self.live.fetch_add(desc.size, Ordering::Relaxed);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        GpuBuffer {
            id,
            buf,
            _mem: Arc::new(MemShare {
                id,
                bytes: desc.size,
                live: self.live.clone(),
                bind_groups: Arc::downgrade(&self.bind_groups),
            }),
        }
    }
}

/// An f32 activation matrix `[rows, cols]` in a storage buffer.
pub struct WgpuTensor {
    buf: GpuBuffer,
    rows: usize,
    cols: usize,
}

impl WgpuTensor {
    /// Row capacity.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Columns.
    pub fn cols(&self) -> usize {
        self.cols
    }
}

/// Rows `row0..row0 + rows` of a weight in one buffer: `[rows, ks]` elements of `dtype`.
struct Segment {
    dtype: DType,
    buf: GpuBuffer,
    /// First row (= first output column of a matmul).
    row0: usize,
    rows: usize,
    /// Row stride in elements: the column count rounded up to even.
    ks: usize,
}

/// A weight: row segments on the GPU, or an f32 vector for norm weights.
pub struct WgpuWeight {
    /// N.
    rows: usize,
    /// K.
    cols: usize,
    segments: Vec<Segment>,
    /// `[K]` f32, when the weight is a single vector.
    vector: Option<GpuBuffer>,
}

impl WgpuWeight {
    /// Number of buffers the rows are split into (0 for a vector).
    pub fn num_segments(&self) -> usize {
        self.segments.len()
    }
}

/// K and V pools of every layer: `[num_blocks · block_size, Hkv · D]` f32 each.
pub struct WgpuKvCache {
    layout: KvLayout,
    k: Vec<GpuBuffer>,
    v: Vec<GpuBuffer>,
}

/// What the matrix-vector kernel applies to x before the product (see
/// `shaders/include/matmul_x.wgsl`).
#[derive(Clone, Copy)]
enum Prologue<'a> {
    /// x as is.
    None,
    /// RMSNorm with this epsilon and `[K]` f32 weight.
    Norm(f32, &'a GpuBuffer),
    /// x is gate_up `[T, 2K]`: silu(gate) · up.
    Silu,
}

/// Where the sections of the batch buffer start (in u32 words) for the current step.
#[derive(Clone, Copy, Debug, Default)]
struct StepLayout {
    num_tokens: usize,
    num_rows: usize,
    tokens_off: u32,
    positions_off: u32,
    slots_off: u32,
    row_seq_off: u32,
    logits_rows_off: u32,
    block_tables_off: u32,
    block_table_stride: u32,
    max_position: u32,
}

/// One page of parameter slots and its bind group.
struct ParamsPage {
    buf: GpuBuffer,
    bind_group: wgpu::BindGroup,
    host: Vec<u8>,
}

/// The RoPE cos/sin table `[positions, D]` (D/2 cosines then D/2 sines).
struct RopeTable {
    theta_bits: u32,
    head_dim: usize,
    positions: usize,
    buf: GpuBuffer,
}

/// Key of a cached group-0 bind group: the binding signature and the buffers bound.
#[derive(Clone, PartialEq, Eq, Hash)]
struct BindKey {
    kernel_bindings: &'static [pipelines::Access],
    ids: Vec<u64>,
}

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
        let alloc = Allocator {
            next_id: AtomicU64::new(0),
            live: Arc::new(AtomicU64::new(0)),
            bind_groups: Arc::new(Mutex::new(HashMap::new())),
        };
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
        })
    }

    /// Counters of dispatches, submits and read-backs so far.
    pub fn stats(&self) -> GpuStats {
        GpuStats {
            memory_bytes: self.alloc.live.load(Ordering::Relaxed),
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

    /// The variant of a KV-cache kernel for caches of `layout`.
    fn kv_key(&self, kernel: Kernel, layout: &KvLayout) -> PipelineKey {
        PipelineKey::kv(kernel, layout.dtype == KvDtype::F16, self.ctx.f16_in_f32)
    }

    /// Whether kernels reading `dtype` widen f16 bits (F16 elements or block scales).
    fn widens_f16(dtype: DType) -> bool {
        dtype == DType::F16 || dtype.is_quantized()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn buffer(&self, size: u64, usage: wgpu::BufferUsages, label: &str) -> GpuBuffer {
        self.alloc.create(
            &self.ctx.device,
            &wgpu::BufferDescriptor {
                label: Some(label),
                size: size.max(16).next_multiple_of(4),
                usage,
                mapped_at_creation: false,
            },
        )
    }

    /// A storage buffer filled with `bytes` (padded to 4).
    fn upload(&self, bytes: &[u8], label: &str) -> GpuBuffer {
        let size = (bytes.len() as u64).max(16).next_multiple_of(4);
        let b = self.alloc.create(
            &self.ctx.device,
            &wgpu::BufferDescriptor {
                label: Some(label),
                size,
                usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: true,
            },
        );
        b.buf
            .slice(..)
            .get_mapped_range_mut()
            .expect("freshly mapped")
            .slice(..bytes.len())
            .copy_from_slice(bytes);
        b.buf.unmap();
        b
    }

    /// Workgroup grid for `n` workgroups: x up to the per-dimension limit, the rest in y.
    /// Kernels linearise `wid.x + wid.y · num_workgroups.x` and ignore ids past `n`.
    fn grid(&self, n: usize) -> (u32, u32) {
        let max = self.ctx.limits.max_compute_workgroups_per_dimension.max(1) as usize;
        if n <= max {
            (n.max(1) as u32, 1)
        } else {
            (max as u32, n.div_ceil(max) as u32)
        }
    }

    /// Records one dispatch of `key` with `buffers` as group 0 and `params` as group 1.
    fn dispatch<P: Pod>(
        &self,
        inner: &mut Inner,
        key: PipelineKey,
        buffers: &[&GpuBuffer],
        params: &P,
        groups: (u32, u32, u32),
    ) {
        let device = &self.ctx.device;
        let Inner {
            pipelines,
            encoder,
            pages,
            slots_used,
            stats,
            ..
        } = inner;
        let pipe = pipelines.get(device, key);
        let bind_key = BindKey {
            kernel_bindings: key.kernel.bindings(),
            ids: buffers.iter().map(|b| b.id).collect(),
        };
        debug_assert_eq!(buffers.len(), key.kernel.bindings().len());
        let mut cache = self
            .alloc
            .bind_groups
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let group0 = cache
            .entry(bind_key)
            .or_insert_with(|| {
                let entries: Vec<wgpu::BindGroupEntry> = buffers
                    .iter()
                    .enumerate()
                    .map(|(i, b)| wgpu::BindGroupEntry {
                        binding: i as u32,
                        resource: b.buf.as_entire_binding(),
                    })
                    .collect();
                device.create_bind_group(&wgpu::BindGroupDescriptor {
                    label: None,
                    layout: &pipe.group0,
                    entries: &entries,
                })
            })
            .clone();
        drop(cache);
        // A slot for the parameters; a new page only when a step needs more than ever before.
        let slot = *slots_used;
        *slots_used += 1;
        let (page, index) = (slot / SLOTS_PER_PAGE, slot % SLOTS_PER_PAGE);
        if page == pages.len() {
            let size = (SLOTS_PER_PAGE * self.slot_bytes) as u64;
            let buf = self.alloc.create(
                device,
                &wgpu::BufferDescriptor {
                    label: Some("wick params"),
                    size,
                    usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
                    mapped_at_creation: false,
                },
            );
            let bind_group = device.create_bind_group(&wgpu::BindGroupDescriptor {
                label: Some("wick params"),
                layout: &pipelines.params_layout,
                entries: &[wgpu::BindGroupEntry {
                    binding: 0,
                    resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                        buffer: &buf.buf,
                        offset: 0,
                        size: wgpu::BufferSize::new(self.slot_bytes as u64),
                    }),
                }],
            });
            pages.push(ParamsPage {
                buf,
                bind_group,
                host: vec![0; size as usize],
            });
        }
        let offset = index * self.slot_bytes;
        let bytes = bytemuck::bytes_of(params);
        pages[page].host[offset..offset + bytes.len()].copy_from_slice(bytes);
        let pipe = pipelines.get(device, key);
        let encoder = encoder.get_or_insert_with(|| {
            device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None })
        });
        let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: None,
            timestamp_writes: None,
        });
        pass.set_pipeline(&pipe.pipeline);
        pass.set_bind_group(0, &group0, &[]);
        pass.set_bind_group(1, &pages[page].bind_group, &[offset as u32]);
        pass.dispatch_workgroups(groups.0, groups.1, groups.2);
        stats.dispatches += 1;
    }

    /// Uploads the parameter pages of the recorded work and submits it (no wait).
    fn submit(&self, inner: &mut Inner) {
        let Some(encoder) = inner.encoder.take() else {
            return;
        };
        let used = inner.slots_used;
        for (p, page) in inner.pages.iter().enumerate() {
            let first = p * SLOTS_PER_PAGE;
            if first >= used {
                break;
            }
            let n = (used - first).min(SLOTS_PER_PAGE);
            self.ctx
                .queue
                .write_buffer(&page.buf.buf, 0, &page.host[..n * self.slot_bytes]);
        }
        inner.slots_used = 0;
        self.ctx.queue.submit([encoder.finish()]);
        inner.stats.submits += 1;
    }

    /// Splits per (token, head) when `batch` is a decode step (one new token per sequence)
    /// whose longest context exceeds the split span; `None` for one workgroup each.
    fn decode_splits(&self, batch: &Batch) -> Option<usize> {
        let decode = batch.seqs.iter().all(|s| s.len == 1);
        let longest = batch.seqs.iter().map(|s| s.context_len as usize).max()?;
        (self.split_span > 0 && decode && longest > self.split_span)
            .then(|| longest.div_ceil(self.split_span))
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

    /// Submits the recorded work, copies the start of `src` into `dst` through the staging
    /// buffer and waits for it: the step's one blocking read-back.
    fn read_back<T: Pod>(&self, inner: &mut Inner, src: &wgpu::Buffer, dst: &mut [T]) {
        let bytes = size_of_val(dst) as u64;
        if bytes == 0 {
            self.submit(inner);
            return;
        }
        if inner.staging.as_ref().is_none_or(|s| s.buf.size() < bytes) {
            // The old one (if any) is dropped first, so the count never holds both.
            inner.staging = None;
            inner.staging = Some(self.alloc.create(
                &self.ctx.device,
                &wgpu::BufferDescriptor {
                    label: Some("wick staging"),
                    size: bytes.next_power_of_two().max(1 << 16),
                    usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                    mapped_at_creation: false,
                },
            ));
        }
        let staging = inner.staging.as_ref().expect("made above").buf.clone();
        let device = &self.ctx.device;
        inner
            .encoder
            .get_or_insert_with(|| {
                device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None })
            })
            .copy_buffer_to_buffer(src, 0, &staging, 0, bytes);
        self.submit(inner);
        let (tx, rx) = std::sync::mpsc::channel();
        staging.map_async(wgpu::MapMode::Read, 0..bytes, move |r| {
            let _ = tx.send(r);
        });
        device
            .poll(wgpu::PollType::wait_indefinitely())
            .expect("the GPU device was lost");
        rx.recv()
            .expect("map callback ran")
            .expect("mapping the staging buffer");
        {
            let view = staging.get_mapped_range(0..bytes).expect("mapped above");
            // The mapped range may not be aligned for T: copy bytes.
            bytemuck::cast_slice_mut::<T, u8>(dst).copy_from_slice(&view);
        }
        staging.unmap();
        inner.stats.readbacks += 1;
        inner.stats.readback_bytes += bytes;
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
        let buf = self.upload(bytemuck::cast_slice(&table), "wick rope");
        inner.rope = Some(RopeTable {
            theta_bits: theta.to_bits(),
            head_dim: d,
            positions,
            buf,
        });
    }

    fn matmul_impl(
        &self,
        x: &WgpuTensor,
        w: &WgpuWeight,
        rows: usize,
        out: &WgpuTensor,
        accumulate: bool,
    ) {
        self.matmul_with(x, w, rows, out, accumulate, Prologue::None);
    }

    /// `out (+)= f(x) · Wᵀ`, with `f` folded into the matrix-vector kernel (callers use a
    /// prologue only below `MAT_MIN_TOKENS` tokens).
    fn matmul_with(
        &self,
        x: &WgpuTensor,
        w: &WgpuWeight,
        rows: usize,
        out: &WgpuTensor,
        accumulate: bool,
        prologue: Prologue,
    ) {
        let x_cols = match prologue {
            Prologue::Silu => x.cols / 2,
            _ => x.cols,
        };
        assert_eq!((x_cols, out.cols), (w.cols, w.rows), "matmul shapes");
        assert!(rows <= x.rows && rows <= out.rows, "matmul rows");
        assert!(w.vector.is_none(), "matmul with a vector weight");
        if rows == 0 {
            return;
        }
        let inner = &mut *self.lock();
        let vec = rows < MAT_MIN_TOKENS;
        assert!(
            vec || matches!(prologue, Prologue::None),
            "prologue on the tiled kernel"
        );
        let (eps, norm) = match prologue {
            Prologue::Norm(eps, nw) => (eps, Some(nw)),
            _ => (0.0, None),
        };
        for seg in &w.segments {
            let params = MatmulParams {
                num_tokens: rows as u32,
                k: w.cols as u32,
                n: w.rows as u32,
                ks: seg.ks as u32,
                seg_rows: seg.rows as u32,
                col0: seg.row0 as u32,
                accumulate: accumulate as u32,
                eps,
            };
            let (kernel, groups) = if vec {
                let (gx, gy) = self.grid(seg.rows.div_ceil(VEC_ROWS_PER_WG));
                let kernel = match prologue {
                    Prologue::None => Kernel::MatmulVec,
                    Prologue::Norm(..) => Kernel::MatmulVecNorm,
                    Prologue::Silu => Kernel::MatmulVecSilu,
                };
                (kernel, (gx, gy, rows as u32))
            } else {
                let gx = seg.rows.div_ceil(MAT_TILE) as u32;
                let gy = rows.div_ceil(MAT_TILE) as u32;
                (Kernel::MatmulMat, (gx, gy, 1))
            };
            let key = PipelineKey {
                kernel,
                weight: Some(seg.dtype),
                subgroup: vec && self.ctx.subgroup,
                f16_in_f32: Self::widens_f16(seg.dtype) && self.ctx.f16_in_f32,
                kv_f16: false,
            };
            match norm {
                Some(nw) => self.dispatch(
                    inner,
                    key,
                    &[&seg.buf, &x.buf, &out.buf, nw],
                    &params,
                    groups,
                ),
                None => self.dispatch(inner, key, &[&seg.buf, &x.buf, &out.buf], &params, groups),
            }
        }
    }

    /// Uploads stacked parts of one format as row segments starting at row `row0`.
    fn upload_rows(
        &self,
        parts: &[&HostTensor],
        dtype: DType,
        row0: usize,
        cols: usize,
        segments: &mut Vec<Segment>,
    ) -> Result<()> {
        // Float rows are padded to an even length; block rows are repacked to whole words.
        let (ks, row_bytes, src_row_bytes) = match repack::block_words(dtype) {
            None => {
                let ks = cols.next_multiple_of(2);
                (ks, ks * dtype.block_bytes(), cols * dtype.block_bytes())
            }
            Some(words) => {
                let blocks = cols / dtype.block_elems();
                (cols, blocks * words * 4, blocks * dtype.block_bytes())
            }
        };
        let max_rows = self.segment_limit as usize / row_bytes.max(1);
        if max_rows == 0 {
            return Err(Error::UnsupportedModel(format!(
                "tensor `{}`: one row of {cols} {dtype} elements exceeds the adapter's \
                 max_storage_buffer_binding_size ({} bytes)",
                parts[0].name, self.segment_limit
            )));
        }
        // Rows of all parts, in order, as (part, row in part).
        let total: usize = parts.iter().map(|p| p.rows_cols().0).sum();
        let mut part = 0;
        let mut part_row = 0;
        let mut done = 0;
        while done < total {
            let rows = max_rows.min(total - done);
            let size = (rows * row_bytes) as u64;
            let gbuf = self.alloc.create(
                &self.ctx.device,
                &wgpu::BufferDescriptor {
                    label: Some(&parts[part].name),
                    size: size.max(16).next_multiple_of(4),
                    usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST,
                    mapped_at_creation: true,
                },
            );
            let buf = &gbuf.buf;
            {
                let mut view = buf
                    .slice(..)
                    .get_mapped_range_mut()
                    .expect("freshly mapped");
                let mut filled = 0;
                while filled < rows {
                    let p = parts[part];
                    let prows = p.rows_cols().0;
                    let n = (prows - part_row).min(rows - filled);
                    let src = &p.data.as_slice()
                        [part_row * src_row_bytes..(part_row + n) * src_row_bytes];
                    let at = filled * row_bytes;
                    if dtype.is_quantized() {
                        // The mapped range is write-only: repack through a small host buffer.
                        const ROWS: usize = 64;
                        let mut tmp = vec![0u8; ROWS.min(n) * row_bytes];
                        for (i, s) in src.chunks(ROWS * src_row_bytes).enumerate() {
                            let d = &mut tmp[..s.len() / src_row_bytes * row_bytes];
                            repack::repack_blocks(dtype, s, d);
                            let a = at + i * ROWS * row_bytes;
                            view.slice(a..a + d.len()).copy_from_slice(d);
                        }
                    } else if ks == cols {
                        view.slice(at..at + n * row_bytes).copy_from_slice(src);
                    } else {
                        // Odd K: row by row; the padding element stays zero (buffers are
                        // zeroed at creation).
                        for (i, s) in src.chunks_exact(src_row_bytes).enumerate() {
                            let a = at + i * row_bytes;
                            view.slice(a..a + src_row_bytes).copy_from_slice(s);
                        }
                    }
                    filled += n;
                    part_row += n;
                    if part_row == prows {
                        part += 1;
                        part_row = 0;
                    }
                }
            }
            buf.unmap();
            segments.push(Segment {
                dtype,
                buf: gbuf,
                row0: row0 + done,
                rows,
                ks,
            });
            done += rows;
        }
        Ok(())
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
        let (rows, cols) = crate::backend::stacked_shape(parts)?;
        let first = parts[0];
        for p in parts {
            if !WEIGHT_DTYPES.contains(&p.dtype) {
                return Err(Error::UnsupportedDType {
                    name: p.name.clone(),
                    dtype: format!("{} (not readable by the GPU backend)", p.dtype),
                });
            }
        }
        if rows > u32::MAX as usize / 2 || cols > u32::MAX as usize / 2 {
            return Err(Error::UnsupportedModel(format!(
                "tensor `{}` is too large for 32-bit indexing",
                first.name
            )));
        }
        if parts.len() == 1 && first.shape.len() == 1 {
            let v = first.to_f32();
            let vector = Some(self.upload(bytemuck::cast_slice(&v), &first.name));
            return Ok(WgpuWeight {
                rows,
                cols,
                segments: Vec::new(),
                vector,
            });
        }
        // Runs of consecutive parts that share a format are stored together.
        let mut segments = Vec::new();
        let mut row0 = 0;
        let mut start = 0;
        while start < parts.len() {
            let dtype = parts[start].dtype;
            let mut end = start + 1;
            while end < parts.len() && parts[end].dtype == dtype {
                end += 1;
            }
            self.upload_rows(&parts[start..end], dtype, row0, cols, &mut segments)?;
            row0 += parts[start..end]
                .iter()
                .map(|p| p.rows_cols().0)
                .sum::<usize>();
            start = end;
        }
        Ok(WgpuWeight {
            rows,
            cols,
            segments,
            vector: None,
        })
    }

    fn tensor(&self, rows: usize, cols: usize) -> WgpuTensor {
        let bytes = (rows * cols * 4) as u64;
        // Activation sizes follow from the model's configuration and the step size the
        // caller chose; one that cannot be bound is a configuration the GPU cannot run.
        assert!(
            bytes <= self.ctx.limits.max_storage_buffer_binding_size,
            "an activation of {rows}×{cols} f32 ({bytes} bytes) exceeds the adapter's \
             max_storage_buffer_binding_size ({} bytes); use a smaller prefill chunk",
            self.ctx.limits.max_storage_buffer_binding_size
        );
        WgpuTensor {
            buf: self.buffer(
                bytes,
                wgpu::BufferUsages::STORAGE
                    | wgpu::BufferUsages::COPY_SRC
                    | wgpu::BufferUsages::COPY_DST,
                "wick activation",
            ),
            rows,
            cols,
        }
    }

    fn kv_cache(&self, layout: KvLayout) -> Result<WgpuKvCache> {
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

    fn max_kv_pool_bytes(&self) -> Option<usize> {
        Some(usize::try_from(self.segment_limit).unwrap_or(usize::MAX))
    }

    fn begin_step(&self, batch: &Batch) {
        let inner = &mut *self.lock();
        // Work of a step that read nothing back (a prompt chunk without logits) must run
        // before this step's batch overwrites the batch buffer.
        self.submit(inner);
        let t = batch.num_tokens();
        let r = batch.logits_rows.len();
        let stride = batch
            .seqs
            .iter()
            .map(|s| s.block_table.len())
            .max()
            .unwrap_or(0)
            .max(1);
        let w = &mut inner.batch_words;
        w.clear();
        w.extend_from_slice(&batch.token_ids);
        w.extend_from_slice(&batch.positions);
        w.extend_from_slice(&batch.slot_mapping);
        for (s, seq) in batch.seqs.iter().enumerate() {
            w.extend(std::iter::repeat_n(s as u32, seq.len as usize));
        }
        // Rows not covered by a sequence (an inconsistent batch) read sequence 0.
        w.resize(4 * t, 0);
        w.extend_from_slice(&batch.logits_rows);
        let bt_off = w.len();
        for seq in &batch.seqs {
            w.extend_from_slice(&seq.block_table);
            w.extend(std::iter::repeat_n(0, stride - seq.block_table.len()));
        }
        inner.step = StepLayout {
            num_tokens: t,
            num_rows: r,
            tokens_off: 0,
            positions_off: t as u32,
            slots_off: 2 * t as u32,
            row_seq_off: 3 * t as u32,
            logits_rows_off: 4 * t as u32,
            block_tables_off: bt_off as u32,
            block_table_stride: stride as u32,
            max_position: batch.positions.iter().copied().max().unwrap_or(0),
        };
        let bytes = (inner.batch_words.len() * 4) as u64;
        if bytes > inner.batch_buf.buf.size() {
            let new = self.buffer(
                bytes.next_power_of_two(),
                wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST,
                "wick batch",
            );
            // The old buffer's bind groups go with it.
            inner.batch_buf = new;
        }
        if !inner.batch_words.is_empty() {
            self.ctx.queue.write_buffer(
                &inner.batch_buf.buf,
                0,
                bytemuck::cast_slice(&inner.batch_words),
            );
        }
        inner.stats.steps += 1;
    }

    fn embed(&self, table: &WgpuWeight, batch: &Batch, out: &mut WgpuTensor) {
        let c = out.cols;
        let t = batch.num_tokens();
        assert_eq!(table.cols, c, "embedding width");
        assert!(t <= out.rows, "embed rows");
        let inner = &mut *self.lock();
        debug_assert_eq!(inner.step.num_tokens, t, "begin_step was not called");
        // The quantized kernel writes eight elements per thread.
        let per_thread = if table.segments.iter().any(|s| s.dtype.is_quantized()) {
            8
        } else {
            1
        };
        let groups = self.grid((t * c).div_ceil(WG * per_thread));
        for seg in &table.segments {
            let params = EmbedParams {
                num_tokens: t as u32,
                cols: c as u32,
                ks: seg.ks as u32,
                row0: seg.row0 as u32,
                seg_rows: seg.rows as u32,
                tokens_off: inner.step.tokens_off,
                _pad: [0; 2],
            };
            let key = PipelineKey {
                kernel: Kernel::Embed,
                weight: Some(seg.dtype),
                subgroup: false,
                f16_in_f32: Self::widens_f16(seg.dtype) && self.ctx.f16_in_f32,
                kv_f16: false,
            };
            let batch_buf = inner.batch_buf.clone();
            self.dispatch(
                inner,
                key,
                &[&seg.buf, &batch_buf, &out.buf],
                &params,
                (groups.0, groups.1, 1),
            );
        }
    }

    fn rms_norm(
        &self,
        x: &WgpuTensor,
        w: &WgpuWeight,
        eps: f32,
        rows: usize,
        out: &mut WgpuTensor,
    ) {
        let c = x.cols;
        let wv = w.vector.as_ref().expect("a norm weight is a vector");
        assert_eq!((w.cols, out.cols), (c, c), "rms_norm width");
        assert!(rows <= x.rows && rows <= out.rows, "rms_norm rows");
        if rows == 0 {
            return;
        }
        let params = RmsNormParams {
            rows: rows as u32,
            cols: c as u32,
            eps,
            _pad: 0,
        };
        let (gx, gy) = self.grid(rows);
        let inner = &mut *self.lock();
        self.dispatch(
            inner,
            PipelineKey::plain(Kernel::RmsNorm),
            &[wv, &x.buf, &out.buf],
            &params,
            (gx, gy, 1),
        );
    }

    fn matmul(&self, x: &WgpuTensor, w: &WgpuWeight, rows: usize, out: &mut WgpuTensor) {
        self.matmul_impl(x, w, rows, out, false);
    }

    fn matmul_add(&self, x: &WgpuTensor, w: &WgpuWeight, rows: usize, out: &mut WgpuTensor) {
        self.matmul_impl(x, w, rows, out, true);
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
        if rows >= MAT_MIN_TOKENS {
            // Prefill: the tiled kernel reads each x row many times; normalise it once.
            self.rms_norm(x, norm, eps, rows, xn);
            self.matmul_impl(xn, w, rows, out, false);
            return;
        }
        let nw = norm.vector.as_ref().expect("a norm weight is a vector");
        assert_eq!(norm.cols, x.cols, "rms_norm width");
        self.matmul_with(x, w, rows, out, false, Prologue::Norm(eps, nw));
    }

    fn silu_mul_matmul_add(
        &self,
        gate_up: &WgpuTensor,
        w: &WgpuWeight,
        rows: usize,
        act: &mut WgpuTensor,
        out: &mut WgpuTensor,
    ) {
        if rows >= MAT_MIN_TOKENS {
            self.silu_mul(gate_up, rows, act);
            self.matmul_impl(act, w, rows, out, true);
            return;
        }
        self.matmul_with(gate_up, w, rows, out, true, Prologue::Silu);
    }

    fn qk_norm_rope(
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

    fn kv_write(
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

    fn attention(
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
        // One dispatch is only safe when no token attends to another new token of the step:
        // its own new key and value it computes itself, anyone else's it would race to read.
        // The folded kernel binds 8 storage buffers (WebGPU's default limit; some adapters
        // have fewer).
        let decode = batch.seqs.iter().all(|s| s.len == 1);
        if !decode || self.ctx.limits.max_storage_buffers_per_shader_stage < 8 {
            self.qk_norm_rope(qkv, q_norm, k_norm, dims, batch);
            self.kv_write(qkv, cache, layer, dims, batch);
            self.attention(qkv, cache, layer, dims, batch, out);
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

    fn silu_mul(&self, gate_up: &WgpuTensor, rows: usize, out: &mut WgpuTensor) {
        let f = out.cols;
        assert_eq!(gate_up.cols, 2 * f, "gate_up width");
        assert!(rows <= gate_up.rows && rows <= out.rows, "silu_mul rows");
        if rows == 0 {
            return;
        }
        let params = SiluMulParams {
            rows: rows as u32,
            ffn: f as u32,
            _pad: [0; 2],
        };
        let (gx, gy) = self.grid((rows * f).div_ceil(WG));
        let inner = &mut *self.lock();
        self.dispatch(
            inner,
            PipelineKey::plain(Kernel::SiluMul),
            &[&gate_up.buf, &out.buf],
            &params,
            (gx, gy, 1),
        );
    }

    fn gather_rows(&self, x: &WgpuTensor, batch: &Batch, out: &mut WgpuTensor) {
        let c = x.cols;
        let r = batch.logits_rows.len();
        assert_eq!(out.cols, c, "gather_rows width");
        assert!(r <= out.rows, "gather_rows rows");
        if r == 0 {
            return;
        }
        let (gx, gy) = self.grid((r * c).div_ceil(WG));
        let inner = &mut *self.lock();
        debug_assert_eq!(inner.step.num_rows, r, "begin_step was not called");
        let params = GatherRowsParams {
            num_rows: r as u32,
            cols: c as u32,
            logits_rows_off: inner.step.logits_rows_off,
            _pad: 0,
        };
        let batch_buf = inner.batch_buf.clone();
        self.dispatch(
            inner,
            PipelineKey::plain(Kernel::GatherRows),
            &[&x.buf, &batch_buf, &out.buf],
            &params,
            (gx, gy, 1),
        );
    }

    fn read(&self, t: &WgpuTensor, rows: usize, dst: &mut [f32]) {
        assert!(rows <= t.rows, "read rows");
        assert_eq!(dst.len(), rows * t.cols, "read destination length");
        let inner = &mut *self.lock();
        self.read_back(inner, &t.buf.buf, dst);
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
        assert!(rows <= logits.rows, "sample rows");
        assert_eq!(params.len(), rows, "one RowSampling per row");
        assert_eq!(out.len(), rows, "one id per row");
        let inner = &mut *self.lock();
        if rows == 0 {
            self.submit(inner);
            return;
        }
        // Per-row choices in, ids out: two small buffers that grow to the most rows seen.
        let usage = wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST;
        let choice_bytes = size_of_val(params) as u64;
        if inner
            .sampling
            .as_ref()
            .is_none_or(|b| b.buf.size() < choice_bytes)
        {
            let new = self.buffer(choice_bytes.next_power_of_two(), usage, "wick sampling");
            // The old buffer's bind groups go with it.
            inner.sampling = Some(new);
        }
        let id_bytes = (rows * 4) as u64;
        if inner
            .sample_ids
            .as_ref()
            .is_none_or(|b| b.buf.size() < id_bytes)
        {
            let new = self.buffer(
                id_bytes.next_power_of_two(),
                usage | wgpu::BufferUsages::COPY_SRC,
                "wick sampled ids",
            );
            // The old buffer's bind groups go with it.
            inner.sample_ids = Some(new);
        }
        // Masks only for the rows that have one; a word stands in when no row has.
        let mask_bytes = (size_of_val(masks) as u64).max(4);
        if inner
            .sample_masks
            .as_ref()
            .is_none_or(|b| b.buf.size() < mask_bytes)
        {
            let new = self.buffer(mask_bytes.next_power_of_two(), usage, "wick token masks");
            // The old buffer's bind groups go with it.
            inner.sample_masks = Some(new);
        }
        let sampling = inner.sampling.clone().expect("made above");
        let ids = inner.sample_ids.clone().expect("made above");
        let mask_buf = inner.sample_masks.clone().expect("made above");
        // Lands before the submit below, so before the dispatch runs.
        self.ctx
            .queue
            .write_buffer(&sampling.buf, 0, bytemuck::cast_slice(params));
        if !masks.is_empty() {
            self.ctx
                .queue
                .write_buffer(&mask_buf.buf, 0, bytemuck::cast_slice(masks));
        }
        let sp = SampleParams {
            num_rows: rows as u32,
            vocab: logits.cols as u32,
            _pad: [0; 2],
        };
        let (gx, gy) = self.grid(rows);
        self.dispatch(
            inner,
            PipelineKey::plain(Kernel::Sample),
            &[&logits.buf, &sampling, &ids, &mask_buf],
            &sp,
            (gx, gy, 1),
        );
        self.read_back(inner, &ids.buf, out);
    }
}
