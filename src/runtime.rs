//! The library's front door: load a model once on the chosen device, then chat or generate.
//!
//! ```no_run
//! use std::sync::atomic::{AtomicBool, Ordering};
//! use wick::runtime::{Device, Runtime, RuntimeOptions, ChatOptions};
//!
//! # fn main() -> wick::Result<()> {
//! let mut rt = Runtime::load("Qwen/Qwen3-0.6B", &RuntimeOptions::default())?;
//! let messages = vec![serde_json::json!({"role": "user", "content": "Hi!"})];
//! let opts = ChatOptions { enable_thinking: false, ..rt.chat_options() };
//! let out = rt.chat(&messages, &opts, &AtomicBool::new(false), &mut |ev| {
//!     print!("{}", ev.delta.content);
//! })?;
//! println!("\n{} tokens", out.token_ids.len());
//! # Ok(())
//! # }
//! ```
//!
//! The device is chosen here, once: [`Runtime`] holds the model behind a trait object, so
//! nothing below it matches on the backend. A runtime serves one conversation itself
//! ([`Runtime::chat`], on an [`Engine`] of one sequence started on first use, whose prefix
//! cache keeps the earlier turns), starts engines for many ([`Runtime::start_engine`]), and
//! lends a plain [`Session`] to tools that need every row's logits ([`Runtime::runner`]);
//! all of them share the loaded weights.
//!
//! For the operator, a runtime keeps how long each phase of loading took
//! ([`Runtime::load_times`]), the device's memory size where the backend can tell
//! ([`Runtime::device_memory_bytes`]), and sizes a serving engine's KV cache as a share of
//! that memory ([`Runtime::size_kv_cache`], vLLM's `--gpu-memory-utilization`);
//! [`Runtime::report`] gathers them for `wick info`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use serde_json::Value;

use crate::backend::cpu::{ActQuant, CpuBackend};
use crate::backend::GpuStats;
use crate::backend::KvDtype;
use crate::config::{GenerationConfig, ModelConfig};
use crate::convert::scheme::{quantize_set, QuantScheme};
use crate::engine::{
    Engine, EngineEvent, EngineOptions, Prepared, Prompt, TextModel, DEFAULT_KV_CACHE_MB,
};
use crate::error::{Error, Result};
use crate::generate::{Generation, TokenEvent};
use crate::loader::checkpoint::Checkpoint;
use crate::loader::hub::HubOptions;
use crate::loader::{LoadProgress, LoadTimes, Progress};
use crate::model::Model;
use crate::resources::Fences;
use crate::sampler::SamplingParams;
use crate::session::SequenceRunner;
use crate::session::{Session, SessionOptions};
use crate::text::chat_template::RenderOptions;
use crate::text::reasoning::Delta;
use crate::text::tokenizer::Tokenizer;

/// Where to run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Device {
    /// A GPU if one is usable, else the CPU.
    #[default]
    Auto,
    /// The CPU backend.
    Cpu,
    /// A GPU, or an error.
    Gpu,
}

/// How to load a model.
#[derive(Clone, Debug)]
pub struct RuntimeOptions {
    /// Where to run.
    pub device: Device,
    /// CPU threads (0 = one per core).
    pub threads: usize,
    /// Longest sequence (prompt + reply) the KV cache holds; capped by the model's own.
    pub max_model_len: usize,
    /// Most prompt tokens per forward step.
    pub prefill_chunk: usize,
    /// How to reach the Hub.
    pub hub: HubOptions,
    /// `--adapter`: which GPU adapter (an index of `wick info`, or part of its name);
    /// `None` takes the first.
    pub adapter: Option<String>,
    /// Quantize float weights at load ([`crate::convert::scheme`]); `None` keeps them as stored.
    pub quantize: Option<QuantScheme>,
    /// How the KV cache stores keys and values (f16 by default, as llama.cpp's).
    pub kv_dtype: KvDtype,
    /// CPU backend: how activations are quantized for quantized weights (8-bit by default,
    /// as llama.cpp; `Q16` or `F32` for exact work).
    pub cpu_act: ActQuant,
    /// Receives the progress of loading: Hub downloads, load-time quantization, weights put
    /// on the device ([`LoadProgress`]).
    pub on_progress: Option<Progress>,
    /// Run on the application's own wgpu device instead of opening one (with
    /// [`Device::Auto`] or [`Device::Gpu`]).
    #[cfg(feature = "gpu")]
    pub gpu_device: Option<crate::backend::wgpu::SharedDevice>,
}

impl Default for RuntimeOptions {
    fn default() -> Self {
        RuntimeOptions {
            device: Device::Auto,
            threads: 0,
            max_model_len: 8192,
            prefill_chunk: 512,
            hub: HubOptions::default(),
            adapter: None,
            quantize: None,
            kv_dtype: KvDtype::default(),
            cpu_act: ActQuant::default(),
            on_progress: None,
            #[cfg(feature = "gpu")]
            gpu_device: None,
        }
    }
}

/// The shortest context an engine is started with under a memory limit: below it, chats do
/// not fit and starting is refused.
pub const MIN_CONTEXT: usize = 1024;

/// What a build without the `gpu` feature answers to `--device gpu`.
pub const NO_GPU: &str = "this build of wick has no GPU support (it was built without the \
                          `gpu` feature); use the CPU";

/// What `wick info` reports: the process's limits, the CPU's kernel tier, the GPU adapters
/// in `--adapter` order and what `--device auto` picks (the rule of
/// [`Runtime::from_checkpoint`]).
pub struct MachineReport {
    /// CPU and memory limits.
    pub fences: Fences,
    /// The kernel tier in use.
    pub isa: crate::backend::cpu::isa::Isa,
    /// Every tier this CPU can run.
    pub supported: Vec<crate::backend::cpu::isa::Isa>,
    /// The adapters, most capable first.
    #[cfg(feature = "gpu")]
    pub adapters: Vec<crate::backend::wgpu::AdapterInfoSummary>,
}

impl MachineReport {
    /// Looks at this machine (enumerating GPU adapters takes a moment).
    pub fn detect() -> MachineReport {
        use crate::backend::cpu::isa::Isa;
        MachineReport {
            fences: Fences::detect(),
            isa: Isa::current(),
            supported: Isa::supported(),
            #[cfg(feature = "gpu")]
            adapters: crate::backend::wgpu::list_adapters(),
        }
    }
}

impl std::fmt::Display for MachineReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "limits: {}", self.fences)?;
        writeln!(
            f,
            "cpu: {} threads, kernels {} (this CPU has: {}; WICK_ISA=<tier> forces a lower one)",
            self.fences.default_threads(),
            self.isa,
            self.supported
                .iter()
                .map(|i| i.name())
                .collect::<Vec<_>>()
                .join(", ")
        )?;
        #[cfg(not(feature = "gpu"))]
        return write!(f, "gpu: {NO_GPU}\n--device auto: cpu");
        #[cfg(feature = "gpu")]
        {
            let adapters = &self.adapters;
            if adapters.is_empty() {
                writeln!(
                    f,
                    "no GPU adapter with compute shaders (on Linux: apt-get install \
                     mesa-vulkan-drivers)"
                )?;
            }
            for a in adapters {
                writeln!(f, "{a}")?;
            }
            // The rule of `Runtime::from_checkpoint`: a hardware GPU if there is one, else
            // the CPU (a software rasterizer such as lavapipe is slower than the CPU backend).
            match adapters.iter().find(|a| a.is_hardware_gpu) {
                Some(_) => write!(
                    f,
                    "--device auto: gpu, adapter 0 ({})",
                    adapters.first().map_or("", |a| a.name.as_str())
                ),
                None => write!(
                    f,
                    "--device auto: cpu (no hardware GPU; --device gpu runs on adapter 0{})",
                    adapters
                        .first()
                        .map_or(String::new(), |a| format!(", {}", a.name))
                ),
            }
        }
    }
}

/// What `wick info MODEL` prints about a loaded model ([`Runtime::report`]).
#[derive(Clone, Debug)]
pub struct ModelReport {
    /// The model's name.
    pub name: String,
    /// What it runs on.
    pub device: String,
    /// Bytes of every weight tensor as loaded.
    pub weight_bytes: u64,
    /// How long loading took.
    pub load_times: LoadTimes,
    /// The device's memory, where the backend can tell.
    pub device_memory_bytes: Option<u64>,
    /// Bytes of every GPU buffer wick holds (`None` on the CPU).
    pub gpu_buffer_bytes: Option<u64>,
}

impl std::fmt::Display for ModelReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
        writeln!(f, "model: {} on {}", self.name, self.device)?;
        writeln!(f, "load: {}", self.load_times)?;
        write!(f, "memory: weights {:.1} MiB", mib(self.weight_bytes))?;
        match self.device_memory_bytes {
            Some(b) => write!(f, "; device memory {:.0} MiB", mib(b))?,
            None if self.gpu_buffer_bytes.is_none() => {
                write!(f, "; in the process's memory (see limits)")?
            }
            None => write!(f, "; device memory unknown")?,
        }
        if let Some(b) = self.gpu_buffer_bytes {
            write!(f, "; GPU buffers wick holds {:.1} MiB", mib(b))?;
        }
        Ok(())
    }
}

/// How [`Runtime::size_kv_cache`] sized the KV cache (vLLM's `--gpu-memory-utilization`).
#[derive(Clone, Debug, PartialEq)]
pub struct MemoryBudget {
    /// The share of the device's memory wick may use, in (0, 1].
    pub utilization: f64,
    /// The device's memory; `None` when unknown, and then the share is of
    /// `requested_kv_bytes`.
    pub device_bytes: Option<u64>,
    /// GPU buffers wick held when sizing (the weights, mostly).
    pub held_bytes: u64,
    /// The engine's activations.
    pub activation_bytes: u64,
    /// What the KV cache gets.
    pub kv_bytes: u64,
    /// The KV budget asked for (`--kv-cache-mb`; with an unknown device size, its default).
    pub requested_kv_bytes: Option<u64>,
}

/// The startup line: the arithmetic that gave the KV cache its size.
impl std::fmt::Display for MemoryBudget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
        let u = self.utilization;
        match self.device_bytes {
            Some(device) => {
                let left = ((u * device as f64) as u64)
                    .saturating_sub(self.held_bytes + self.activation_bytes);
                write!(
                    f,
                    "--gpu-memory-utilization {u}: device memory {:.1} MiB, {u} of it {:.1} MiB \
                     - GPU buffers {:.1} MiB - activations {:.1} MiB = KV cache {:.1} MiB",
                    mib(device),
                    u * mib(device),
                    mib(self.held_bytes),
                    mib(self.activation_bytes),
                    mib(left),
                )?;
                if self.kv_bytes < left {
                    write!(
                        f,
                        ", capped by --kv-cache-mb at {:.1} MiB",
                        mib(self.kv_bytes)
                    )?;
                }
                Ok(())
            }
            None => write!(
                f,
                "--gpu-memory-utilization {u}: the device's memory size is unknown (wick reads \
                 it only on Vulkan; on the CPU the memory limit applies), so taken as {u} of the \
                 {:.0} MiB KV cache budget (--kv-cache-mb): KV cache {:.1} MiB",
                mib(self.requested_kv_bytes.unwrap_or(0)),
                mib(self.kv_bytes)
            ),
        }
    }
}

/// Whether a hardware GPU (not a software rasterizer) is usable.
fn has_hardware_gpu() -> bool {
    #[cfg(feature = "gpu")]
    return crate::backend::wgpu::has_hardware_gpu();
    #[cfg(not(feature = "gpu"))]
    false
}

/// Per-turn chat settings.
#[derive(Clone, Debug)]
pub struct ChatOptions {
    /// Qwen3's thinking switch.
    pub enable_thinking: bool,
    /// Sampling and stopping.
    pub params: SamplingParams,
}

/// A model on some backend, behind a trait object.
trait LoadedModel: Send + Sync {
    fn session(&self, opts: SessionOptions) -> Result<Box<dyn SequenceRunner>>;
    fn start_engine(&self, text: TextModel, opts: &EngineOptions) -> Result<Engine>;
    /// Bytes of one KV block of `block_size` tokens (every layer's K and V).
    fn kv_block_bytes(&self, block_size: usize) -> usize;
    /// Bytes of an engine's activations for steps of `max_tokens` tokens and `rows` logits rows.
    fn activation_bytes(&self, max_tokens: usize, rows: usize) -> u64;
    fn can_generate(&self) -> bool;
    /// The backend's share of loading: repack and upload.
    fn weight_times(&self) -> LoadTimes;
    /// The device's memory, where the backend can tell.
    fn device_memory_bytes(&self) -> Option<u64>;
}

impl<B: crate::backend::Backend> LoadedModel for Arc<Model<B>> {
    fn session(&self, opts: SessionOptions) -> Result<Box<dyn SequenceRunner>> {
        Ok(Box::new(Session::new(self.clone(), opts)?))
    }
    fn start_engine(&self, text: TextModel, opts: &EngineOptions) -> Result<Engine> {
        Engine::start(self.clone(), text, opts)
    }
    fn kv_block_bytes(&self, block_size: usize) -> usize {
        self.kv_layout(1, block_size).bytes()
    }
    fn activation_bytes(&self, max_tokens: usize, rows: usize) -> u64 {
        self.run_state_bytes(max_tokens, rows)
    }
    fn can_generate(&self) -> bool {
        Model::can_generate(self)
    }
    fn weight_times(&self) -> LoadTimes {
        crate::backend::Backend::weight_times(self.backend())
    }
    fn device_memory_bytes(&self) -> Option<u64> {
        crate::backend::Backend::device_memory_bytes(self.backend())
    }
}

/// A loaded model, and the engine its conversation runs on.
pub struct Runtime {
    name: String,
    config: ModelConfig,
    generation: GenerationConfig,
    /// Tokenizer, chat template and end-of-sequence ids.
    text: TextModel,
    model: Box<dyn LoadedModel>,
    session_opts: SessionOptions,
    /// The engine chats and generations run on, started on first use.
    engine: Option<Engine>,
    /// The engine [`Runtime::embed`] runs on, started on first use.
    embedder: Option<Engine>,
    /// The pooling the checkpoint declares (see [`Checkpoint::pooling`]).
    pooling: Option<String>,
    /// A sequence driven directly, for every row's logits (benchmarks, perplexity), made on
    /// first use.
    runner: Option<Box<dyn SequenceRunner>>,
    device: String,
    /// The model runs on the CPU: its weights and KV cache are in the process's memory.
    on_cpu: bool,
    /// Bytes of every weight tensor as loaded.
    weight_bytes: u64,
    weight_bytes_per_token: u64,
    /// Reads the GPU backend's counters (`None` on the CPU).
    gpu_stats: Option<GpuStatsFn>,
    /// How long each phase of loading took.
    load_times: LoadTimes,
}

/// Reads the work counters of the GPU backend a runtime runs on.
pub type GpuStatsFn = Arc<dyn Fn() -> GpuStats + Send + Sync>;

impl Runtime {
    /// Loads `spec` (local directory, `.gguf` file or Hub id) onto `opts.device`.
    pub fn load(spec: &str, opts: &RuntimeOptions) -> Result<Self> {
        let mut hub = opts.hub.clone();
        if hub.on_progress.is_none() {
            hub.on_progress = opts.on_progress.clone();
        }
        let ckpt = Checkpoint::open(spec, &hub)?;
        Self::from_checkpoint(ckpt, opts)
    }

    /// [`Runtime::load`] on a thread of its own, for async code: awaiting it never blocks
    /// the executor (any executor: the result arrives through a channel).
    pub async fn load_async(spec: &str, opts: &RuntimeOptions) -> Result<Self> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let (spec, opts) = (spec.to_string(), opts.clone());
        std::thread::Builder::new()
            .name("wick-load".into())
            .spawn(move || {
                let _ = tx.send(Runtime::load(&spec, &opts));
            })
            .map_err(|e| Error::Device(format!("cannot start a loading thread: {e}")))?;
        rx.await
            .unwrap_or_else(|_| Err(Error::Engine("the loading thread panicked".into())))
    }

    /// Puts an opened checkpoint on `opts.device`. [`Runtime::load_times`] are the
    /// checkpoint's ([`Checkpoint::times`]) and this call's.
    pub fn from_checkpoint(mut ckpt: Checkpoint, opts: &RuntimeOptions) -> Result<Self> {
        let start = Instant::now();
        let mut load_times = ckpt.times;
        if let Some(scheme) = opts.quantize {
            let n_layers = ckpt.config.num_hidden_layers;
            let (total, mut done) = (ckpt.tensors.len(), 0);
            let progress = opts.on_progress.clone();
            // Called before each tensor: it reports the ones finished.
            ckpt.tensors = quantize_set(&ckpt.tensors, scheme, n_layers, &mut |_| {
                if let Some(p) = &progress {
                    p.report(LoadProgress::Quantize { done, total });
                }
                done += 1;
            })?;
            if let Some(p) = &progress {
                p.report(LoadProgress::Quantize { done: total, total });
            }
            load_times.repack += start.elapsed();
        }
        let session_opts = SessionOptions {
            max_model_len: opts.max_model_len,
            prefill_chunk: opts.prefill_chunk,
            ..SessionOptions::default()
        };
        // On the CPU, refuse before loading when the memory limit cannot hold the weights and
        // the smallest KV cache (loading first would meet the OOM killer instead).
        let weight_bytes = ckpt.tensors.total_bytes();
        #[cfg(feature = "gpu")]
        let app_gpu = opts.gpu_device.is_some();
        #[cfg(not(feature = "gpu"))]
        let app_gpu = false;
        let to_cpu = match opts.device {
            Device::Cpu => true,
            Device::Auto => !app_gpu && !has_hardware_gpu(),
            Device::Gpu => false,
        };
        if to_cpu {
            let c = &ckpt.config;
            let per_token = (2
                * c.num_hidden_layers
                * c.num_key_value_heads
                * c.head_dim
                * opts.kv_dtype.size()) as u64;
            let min_tokens = opts
                .max_model_len
                .min(c.max_position_embeddings)
                .min(MIN_CONTEXT);
            Fences::detect().kv_budget(weight_bytes, u64::MAX, per_token * min_tokens as u64)?;
        }
        // The weights on a backend, with the KV dtype asked for.
        fn place_on<B: crate::backend::Backend>(
            backend: B,
            ckpt: &Checkpoint,
            opts: &RuntimeOptions,
        ) -> Result<Arc<Model<B>>> {
            let model = Model::load_with_progress(
                backend,
                ckpt.config.clone(),
                &ckpt.tensors,
                opts.on_progress.as_ref(),
            )?;
            Ok(Arc::new(model.with_kv_dtype(opts.kv_dtype)))
        }
        #[cfg_attr(not(feature = "gpu"), allow(unused_mut))]
        let mut gpu_stats: Option<GpuStatsFn> = None;
        #[cfg(feature = "gpu")]
        let mut on_gpu = || -> Result<(Box<dyn LoadedModel>, String)> {
            use crate::backend::wgpu::{WgpuBackend, WgpuOptions};
            let backend = WgpuBackend::new(&WgpuOptions {
                adapter: opts.adapter.clone(),
                device: opts.gpu_device.clone(),
                ..WgpuOptions::default()
            })?;
            let model = place_on(backend, &ckpt, opts)?;
            let device = crate::backend::Backend::describe(model.backend());
            let m = model.clone();
            gpu_stats = Some(Arc::new(move || m.backend().stats()));
            Ok((Box::new(model), device))
        };
        #[cfg(not(feature = "gpu"))]
        let on_gpu =
            || -> Result<(Box<dyn LoadedModel>, String)> { Err(Error::Device(NO_GPU.into())) };
        let on_cpu = || -> Result<(Box<dyn LoadedModel>, String)> {
            let model = place_on(
                CpuBackend::with_act(opts.threads, opts.cpu_act)?,
                &ckpt,
                opts,
            )?;
            let device = crate::backend::Backend::describe(model.backend());
            Ok((Box::new(model), device))
        };
        let (model, device): (Box<dyn LoadedModel>, String) = match opts.device {
            Device::Gpu => on_gpu()?,
            Device::Cpu => on_cpu()?,
            // A hardware GPU if there is one (a software rasterizer such as lavapipe is slower
            // than the CPU backend); the CPU when there is none or the model cannot run on it.
            Device::Auto if app_gpu || has_hardware_gpu() => on_gpu().or_else(|e| {
                tracing::warn!("GPU unusable ({e}); running on the CPU");
                on_cpu()
            })?,
            Device::Auto => on_cpu()?,
        };
        // Decode reads every weight once per token, except the embedding, of which it reads one
        // row — unless the embedding doubles as the LM head.
        let mut weight_bytes_per_token = weight_bytes;
        if !ckpt.config.tie_word_embeddings {
            if let Some(e) = ckpt.tensors.try_get("model.embed_tokens.weight") {
                weight_bytes_per_token -= e.data.len() as u64;
            }
        }
        let on_cpu = device.starts_with("cpu");
        let placed = model.weight_times();
        load_times.repack += placed.repack;
        load_times.upload += placed.upload;
        load_times.total = ckpt.times.total + start.elapsed();
        Ok(Runtime {
            on_cpu,
            weight_bytes,
            weight_bytes_per_token,
            name: ckpt.name,
            config: ckpt.config,
            text: TextModel {
                tokenizer: ckpt.tokenizer,
                chat_template: ckpt.chat_template,
                eos_token_ids: ckpt.generation.eos_token_ids.clone(),
            },
            generation: ckpt.generation,
            model,
            session_opts,
            engine: None,
            embedder: None,
            pooling: ckpt.pooling,
            runner: None,
            device,
            gpu_stats,
            load_times,
        })
    }

    /// How long each phase of loading took ([`LoadTimes`]).
    pub fn load_times(&self) -> LoadTimes {
        self.load_times
    }

    /// Bytes of the device's memory, where the backend can tell: a GPU on Vulkan (its
    /// largest device-local heap, `backend::wgpu::context::device_memory`); `None` on the
    /// CPU.
    pub fn device_memory_bytes(&self) -> Option<u64> {
        self.model.device_memory_bytes()
    }

    /// What `wick info MODEL` reports about the loaded model.
    pub fn report(&self) -> ModelReport {
        ModelReport {
            name: self.name.clone(),
            device: self.device.clone(),
            weight_bytes: self.weight_bytes,
            load_times: self.load_times,
            device_memory_bytes: self.device_memory_bytes(),
            gpu_buffer_bytes: self.gpu_stats().map(|g| g.memory_bytes),
        }
    }

    /// Sizes the KV cache of an engine started with `opts` as vLLM's
    /// `--gpu-memory-utilization` does, and sets `opts.kv_cache_mb` to it.
    ///
    /// Where the device's memory size S is known ([`Runtime::device_memory_bytes`]), the KV
    /// cache gets `utilization · S` less the GPU buffers wick holds now (the weights) and the
    /// engine's activations (for `opts.max_num_batched_tokens` tokens and
    /// `opts.max_num_seqs` logits rows), and no more than `opts.kv_cache_mb` when that is
    /// set; [`Error::OutOfMemory`] when nothing is left. Where it is unknown (the CPU, a GPU
    /// API that does not tell), the KV cache gets `utilization` of `opts.kv_cache_mb`
    /// (default [`DEFAULT_KV_CACHE_MB`]). The small per-step buffers (parameters, read-back,
    /// sampling) are not counted.
    pub fn size_kv_cache(
        &self,
        utilization: f64,
        opts: &mut EngineOptions,
    ) -> Result<MemoryBudget> {
        if !(utilization > 0.0 && utilization <= 1.0) {
            return Err(Error::InvalidRequest(format!(
                "--gpu-memory-utilization must be in (0, 1], not {utilization}"
            )));
        }
        const MIB: u64 = 1 << 20;
        let requested_mb = opts.kv_cache_mb;
        let budget = match self.device_memory_bytes() {
            Some(device) => {
                let held = self
                    .gpu_stats()
                    .map_or(self.weight_bytes, |g| g.memory_bytes);
                let activations = self
                    .model
                    .activation_bytes(opts.max_num_batched_tokens, opts.max_num_seqs);
                let share = (utilization * device as f64) as u64;
                let left = share.saturating_sub(held + activations);
                let mut b = MemoryBudget {
                    utilization,
                    device_bytes: Some(device),
                    held_bytes: held,
                    activation_bytes: activations,
                    kv_bytes: left,
                    requested_kv_bytes: requested_mb.map(|m| m as u64 * MIB),
                };
                if left < MIB {
                    return Err(Error::OutOfMemory(format!(
                        "--gpu-memory-utilization {utilization} leaves no room for the KV \
                         cache: device {:.0} MiB, {utilization} of it {:.1} MiB, weights and \
                         other GPU buffers {:.1} MiB, activations {:.1} MiB",
                        device as f64 / MIB as f64,
                        share as f64 / MIB as f64,
                        held as f64 / MIB as f64,
                        activations as f64 / MIB as f64,
                    )));
                }
                if let Some(r) = b.requested_kv_bytes {
                    b.kv_bytes = b.kv_bytes.min(r);
                }
                b
            }
            None => {
                let base = requested_mb.unwrap_or(DEFAULT_KV_CACHE_MB) as u64 * MIB;
                MemoryBudget {
                    utilization,
                    device_bytes: None,
                    held_bytes: 0,
                    activation_bytes: 0,
                    kv_bytes: (utilization * base as f64) as u64,
                    requested_kv_bytes: Some(base),
                }
            }
        };
        opts.kv_cache_mb = Some(((budget.kv_bytes / MIB) as usize).max(1));
        Ok(budget)
    }

    /// The GPU backend's work counters (dispatches, submits, blocking read-backs) since
    /// the model was loaded; `None` when running on the CPU.
    pub fn gpu_stats(&self) -> Option<GpuStats> {
        self.gpu_stats.as_ref().map(|f| f())
    }

    /// A reader of [`Runtime::gpu_stats`] that outlives borrows of the runtime, for tools
    /// that drive [`Runtime::runner`] and count the work of each step (`wick bench`).
    pub fn gpu_stats_reader(&self) -> Option<GpuStatsFn> {
        self.gpu_stats.clone()
    }

    /// The model's name (Hub id or directory name).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// What the model runs on.
    pub fn device(&self) -> &str {
        &self.device
    }

    /// Hyper-parameters.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &Arc<Tokenizer> {
        &self.text.tokenizer
    }

    /// The longest sequence the KV cache holds.
    pub fn max_model_len(&self) -> usize {
        self.session_opts
            .max_model_len
            .min(self.config.max_position_embeddings)
            .max(1)
    }

    /// Starts the batching engine on this runtime's weights (the weights are shared, the
    /// engine has its own KV cache).
    ///
    /// On the CPU under a memory limit ([`Fences`]), the KV cache gets at most what the
    /// limit leaves after the weights; if that holds fewer tokens than `max_model_len`, the
    /// engine's `max_model_len` shrinks to fit (with a warning). Refused with
    /// [`Error::OutOfMemory`] when not even [`MIN_CONTEXT`] tokens fit. An engine of
    /// [`crate::engine::Task::Embed`] is refused for a model that declares a pooling other
    /// than the last token's.
    pub fn start_engine(&self, opts: &EngineOptions) -> Result<Engine> {
        if opts.task == crate::engine::Task::Embed {
            if let Some(p) = self.pooling.as_deref().filter(|p| *p != "lasttoken") {
                return Err(Error::UnsupportedModel(format!(
                    "the model declares `{p}` pooling; wick pools the last token only"
                )));
            }
        }
        let opts = self.fenced(opts, &Fences::detect())?;
        self.model.start_engine(self.text.clone(), &opts)
    }

    /// `opts` under the memory fence (see [`Runtime::start_engine`]).
    fn fenced(&self, opts: &EngineOptions, fences: &Fences) -> Result<EngineOptions> {
        let mut opts = opts.clone();
        if !self.on_cpu || opts.num_blocks.is_some() {
            return Ok(opts);
        }
        let bs = opts.block_size.max(1);
        let block_bytes = self.model.kv_block_bytes(bs) as u64;
        let max_len = opts
            .max_model_len
            .min(self.config.max_position_embeddings)
            .max(1);
        let min_kv = max_len.min(MIN_CONTEXT).div_ceil(bs) as u64 * block_bytes;
        let wanted = (opts.kv_cache_mb.unwrap_or(DEFAULT_KV_CACHE_MB) as u64) << 20;
        // Never less than one whole sequence, as the engine's own default.
        let wanted = wanted.max(max_len.div_ceil(bs) as u64 * block_bytes);
        let Some(budget) = fences.kv_budget(self.weight_bytes, wanted, min_kv)? else {
            return Ok(opts);
        };
        let blocks = (budget / block_bytes) as usize;
        if blocks * bs < max_len {
            tracing::warn!(
                "the memory limit leaves room for {} tokens of KV cache: max_model_len {} \
                 lowered to {}",
                blocks * bs,
                max_len,
                blocks * bs
            );
            opts.max_model_len = blocks * bs;
        }
        opts.num_blocks = Some(blocks);
        Ok(opts)
    }

    /// Bytes of every weight tensor as loaded (what the weights take in memory once read).
    pub fn weight_bytes(&self) -> u64 {
        self.weight_bytes
    }

    /// The end-of-sequence ids generation stops at.
    pub fn eos_token_ids(&self) -> &[u32] {
        &self.text.eos_token_ids
    }

    /// The sampling defaults' source: the model's `generation_config.json`, unless replaced.
    pub fn generation_config(&self) -> &GenerationConfig {
        &self.generation
    }

    /// Replaces the sampling defaults (vLLM's `--generation-config` and
    /// `--override-generation-config`); the end-of-sequence ids stay the model's. Engines
    /// started before keep the old defaults.
    pub fn set_generation_config(&mut self, g: GenerationConfig) {
        self.generation = GenerationConfig {
            eos_token_ids: self.generation.eos_token_ids.clone(),
            ..g
        };
    }

    /// Replaces the model's chat template with `source` (vLLM's `--chat-template`), keeping
    /// the BOS/EOS strings the template sees. Engines started before keep the old template.
    pub fn set_chat_template(&mut self, source: &str) -> Result<()> {
        let (bos, eos) = match &self.text.chat_template {
            Some(t) => (
                t.bos_token().map(str::to_string),
                t.eos_token().map(str::to_string),
            ),
            None => (None, None),
        };
        let t = crate::text::chat_template::ChatTemplate::new(source, bos, eos)?;
        self.text.chat_template = Some(Arc::new(t));
        Ok(())
    }

    /// Sampling defaults from the model's `generation_config.json`.
    pub fn default_params(&self) -> SamplingParams {
        let g = &self.generation;
        let mut p = SamplingParams::with_generation_defaults(g.temperature, g.top_k, g.top_p);
        if let Some(m) = g.min_p {
            p.min_p = m;
        }
        if let Some(r) = g.repetition_penalty {
            p.repetition_penalty = r;
        }
        p
    }

    /// Chat defaults: thinking on, the model's sampling defaults, 2048 new tokens.
    pub fn chat_options(&self) -> ChatOptions {
        ChatOptions {
            enable_thinking: true,
            params: SamplingParams {
                max_tokens: Some(2048),
                ..self.default_params()
            },
        }
    }

    /// Renders `messages` with the model's chat template ([`TextModel::render_chat`]).
    pub fn render_chat(&self, messages: &[Value], opts: &RenderOptions) -> Result<String> {
        self.text.render_chat(messages, opts)
    }

    /// Tokenizes a raw prompt (special tokens as the tokenizer's post-processor adds them).
    pub fn encode_raw(&self, text: &str) -> Result<Vec<u32>> {
        self.text.tokenizer.encode(text, true)
    }

    /// Generates a reply to `messages`. Whatever prefix of the rendered conversation is
    /// already in the KV cache (earlier turns) is reused, not recomputed.
    pub fn chat(
        &mut self,
        messages: &[Value],
        opts: &ChatOptions,
        cancel: &AtomicBool,
        on_token: &mut dyn FnMut(&TokenEvent<'_>),
    ) -> Result<Generation> {
        let prompt = Prompt::Chat {
            messages: messages.to_vec(),
            render: RenderOptions {
                enable_thinking: Some(opts.enable_thinking),
                ..RenderOptions::default()
            },
        };
        self.run(prompt, &opts.params, cancel, on_token)
    }

    /// Generates from token ids; `start_in_reasoning` when they leave a `<think>` block
    /// open. A cached prefix of `prompt_ids` is reused.
    pub fn generate(
        &mut self,
        prompt_ids: Vec<u32>,
        start_in_reasoning: bool,
        params: &SamplingParams,
        cancel: &AtomicBool,
        on_token: &mut dyn FnMut(&TokenEvent<'_>),
    ) -> Result<Generation> {
        let engine = self.engine()?;
        let mut prepared = engine.prepare(Prompt::Ids(prompt_ids))?;
        prepared.start_in_reasoning = start_in_reasoning;
        self.wait(prepared, params, cancel, on_token)
    }

    /// Runs one request on the engine (a batch of one) and reports its tokens.
    fn run(
        &mut self,
        prompt: Prompt,
        params: &SamplingParams,
        cancel: &AtomicBool,
        on_token: &mut dyn FnMut(&TokenEvent<'_>),
    ) -> Result<Generation> {
        let prepared = self.engine()?.prepare(prompt)?;
        self.wait(prepared, params, cancel, on_token)
    }

    /// Submits `prepared` and turns the engine's events into [`TokenEvent`]s until the
    /// request ends. `cancel` is checked at every token.
    fn wait(
        &mut self,
        prepared: Prepared,
        params: &SamplingParams,
        cancel: &AtomicBool,
        on_token: &mut dyn FnMut(&TokenEvent<'_>),
    ) -> Result<Generation> {
        let engine = self.engine()?;
        let mut stream = engine.submit_prepared(&prepared, params.clone())?;
        let mut last_id = 0;
        let completion = loop {
            if cancel.load(Ordering::Relaxed) {
                stream.cancel();
            }
            match stream.blocking_next() {
                Some(EngineEvent::Delta {
                    token_ids,
                    reasoning,
                    content,
                    logprobs,
                }) => {
                    last_id = token_ids.last().copied().unwrap_or(last_id);
                    let delta = Delta { reasoning, content };
                    on_token(&TokenEvent {
                        id: last_id,
                        delta: &delta,
                        logprobs: logprobs.last(),
                    });
                }
                Some(EngineEvent::Finished(c)) => break c,
                Some(EngineEvent::Error(e)) => return Err(Error::Engine(e)),
                None => return Err(Error::Engine("the engine stopped".into())),
            }
        };
        let decode_time = completion
            .total_time
            .saturating_sub(completion.time_to_first_token);
        Ok(Generation {
            prompt_tokens: completion.usage.prompt_tokens,
            cached_tokens: completion.usage.cached_tokens,
            decode_steps: completion.token_ids.len().saturating_sub(1),
            token_ids: completion.token_ids,
            content: completion.content,
            reasoning: completion.reasoning,
            finish_reason: Some(completion.finish_reason),
            logprobs: completion.logprobs,
            prefill_time: completion.time_to_first_token,
            decode_time,
        })
    }

    /// The engine [`Runtime::chat`] and [`Runtime::generate`] run on, started on first use
    /// with a KV cache of one sequence of [`Runtime::max_model_len`] tokens.
    fn engine(&mut self) -> Result<&Engine> {
        if self.engine.is_none() {
            let max_model_len = self.max_model_len();
            let block_size = EngineOptions::default().block_size;
            let one_sequence =
                max_model_len.div_ceil(block_size) * self.model.kv_block_bytes(block_size);
            let opts = EngineOptions {
                max_num_seqs: 1,
                max_num_batched_tokens: self.session_opts.prefill_chunk.max(1),
                max_model_len,
                block_size,
                kv_cache_mb: Some(one_sequence.div_ceil(1 << 20)),
                ..EngineOptions::default()
            };
            self.engine = Some(self.start_engine(&opts)?);
        }
        Ok(self.engine.as_ref().expect("just started"))
    }

    /// Whether the checkpoint is an embedding model: it declares a pooling
    /// (sentence-transformers' `modules.json`), or it has no output head. `wick serve
    /// --task auto` serves embeddings for these.
    pub fn is_embedding_model(&self) -> bool {
        self.pooling.is_some() || !self.model.can_generate()
    }

    /// Embeddings of `inputs`: each text tokenized as the model's tokenizer does by default
    /// (Qwen3-Embedding's appends `<|endoftext|>`), the hidden state of its last token after
    /// the final norm, L2-normalized. All inputs go to the engine at once and are batched in
    /// its steps. Instructions (Qwen3-Embedding's `Instruct: …\nQuery:`) are the caller's to
    /// prepend.
    pub fn embed(&mut self, inputs: &[&str]) -> Result<Vec<Vec<f32>>> {
        self.embed_dims(inputs, None)
    }

    /// [`Runtime::embed`] truncated to the first `dimensions` values and normalized again
    /// (Matryoshka); `dimensions` must be in `1..=hidden_size`.
    pub fn embed_dims(
        &mut self,
        inputs: &[&str],
        dimensions: Option<usize>,
    ) -> Result<Vec<Vec<f32>>> {
        let hidden = self.config.hidden_size;
        if let Some(d) = dimensions {
            if d == 0 || d > hidden {
                return Err(Error::InvalidParam {
                    param: "dimensions",
                    message: format!("dimensions must be between 1 and {hidden}, got {d}"),
                });
            }
        }
        let engine = self.embedder()?;
        let ids = inputs
            .iter()
            .map(|text| engine.tokenize_input(text))
            .collect::<Result<Vec<_>>>()?;
        engine
            .embed_batch(ids)?
            .into_iter()
            .map(|h| {
                let e = h.blocking_wait()?.embedding;
                Ok(match dimensions {
                    Some(d) => crate::engine::embed::truncate(&e, d),
                    None => e,
                })
            })
            .collect()
    }

    /// The engine [`Runtime::embed`] runs on: any model can embed (a causal LM pools its
    /// last token's hidden state too), started on first use with a KV cache of one sequence
    /// of [`Runtime::max_model_len`] tokens, which many short inputs share.
    fn embedder(&mut self) -> Result<&Engine> {
        if self.embedder.is_none() {
            let max_model_len = self.max_model_len();
            let block_size = EngineOptions::default().block_size;
            let one_sequence =
                max_model_len.div_ceil(block_size) * self.model.kv_block_bytes(block_size);
            let opts = EngineOptions {
                max_num_batched_tokens: self.session_opts.prefill_chunk.max(1),
                max_model_len,
                block_size,
                kv_cache_mb: Some(one_sequence.div_ceil(1 << 20)),
                cache_replies: false,
                task: crate::engine::Task::Embed,
                ..EngineOptions::default()
            };
            self.embedder = Some(self.start_engine(&opts)?);
        }
        Ok(self.embedder.as_ref().expect("just started"))
    }

    /// Weight bytes a decode step reads.
    pub fn weight_bytes_per_token(&self) -> u64 {
        self.weight_bytes_per_token
    }

    /// The sequence itself, for tools that drive it directly (benchmarks, perplexity). Its
    /// KV cache is allocated on first use.
    pub fn runner(&mut self) -> Result<&mut dyn SequenceRunner> {
        if self.runner.is_none() {
            self.runner = Some(self.model.session(self.session_opts)?);
        }
        Ok(self.runner.as_mut().expect("just made").as_mut())
    }

    /// Forgets the cached conversation and frees the KV caches (they are allocated again
    /// on next use).
    pub fn reset(&mut self) {
        self.engine = None;
        self.embedder = None;
        if let Some(r) = self.runner.as_mut() {
            r.reset();
        }
    }

    /// Logits of every position of `ids` (`on_row(i, [V])`), computed from scratch.
    pub fn logits_all(&mut self, ids: &[u32], on_row: &mut dyn FnMut(usize, &[f32])) -> Result<()> {
        let runner = self.runner()?;
        runner.reset();
        let r = runner.extend_all(ids, on_row);
        runner.reset();
        r
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn tiny() -> String {
        concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/fixtures/qwen3-tiny").to_string()
    }

    /// The phases of `t` are each within the total, and so is their sum (a millisecond of
    /// slack for the clock reads between them).
    fn assert_phases_fit(t: &LoadTimes) {
        let slack = Duration::from_millis(1);
        assert!(t.total > Duration::ZERO, "{t}");
        for (name, d) in t.phases() {
            assert!(d <= t.total + slack, "{name}: {t}");
        }
        assert!(t.phase_sum() <= t.total + slack, "{t}");
    }

    #[test]
    fn load_phases_add_up_to_no_more_than_the_total() {
        // Quantized at load, so the CPU has conversion and interleaving to time.
        let opts = RuntimeOptions {
            device: Device::Cpu,
            threads: 2,
            quantize: Some(QuantScheme::Q8_0),
            ..RuntimeOptions::default()
        };
        let rt = Runtime::load(&tiny(), &opts).unwrap();
        let t = rt.load_times();
        assert_phases_fit(&t);
        assert_eq!(t.download, Duration::ZERO, "a local directory: {t}");
        assert!(t.map > Duration::ZERO, "{t}");
        assert!(t.repack > Duration::ZERO, "{t}");
        assert_eq!(
            t.upload,
            Duration::ZERO,
            "the CPU reads the map in place: {t}"
        );
        assert_eq!(rt.device_memory_bytes(), None);
        let report = rt.report().to_string();
        assert!(report.contains(&format!("load: {t}")), "{report}");
    }

    #[cfg(feature = "gpu")]
    fn on_gpu() -> Option<Runtime> {
        if std::env::var_os("WICK_SKIP_GPU_TESTS").is_some_and(|v| v == "1") {
            eprintln!("WICK_SKIP_GPU_TESTS=1: skipping a GPU test");
            return None;
        }
        let opts = RuntimeOptions {
            device: Device::Gpu,
            ..RuntimeOptions::default()
        };
        Some(Runtime::load(&tiny(), &opts).unwrap_or_else(|e| {
            panic!(
                "no usable GPU ({e}); install mesa-vulkan-drivers for lavapipe, or set \
                 WICK_SKIP_GPU_TESTS=1 to skip GPU tests explicitly"
            )
        }))
    }

    #[cfg(feature = "gpu")]
    #[test]
    fn gpu_load_times_count_the_upload() {
        let Some(rt) = on_gpu() else { return };
        let t = rt.load_times();
        assert_phases_fit(&t);
        assert!(t.upload > Duration::ZERO, "{t}");
    }

    #[cfg(feature = "gpu")]
    #[test]
    fn kv_cache_is_the_share_of_device_memory_left_after_weights_and_activations() {
        const MIB: u64 = 1 << 20;
        let Some(rt) = on_gpu() else { return };
        // Lavapipe's Vulkan heap has a size: the device's memory is known.
        let device = rt.device_memory_bytes().expect("lavapipe reports its heap");
        let held = rt.gpu_stats().unwrap().memory_bytes;
        assert!(held >= rt.weight_bytes(), "{held}");
        let base = EngineOptions {
            max_num_batched_tokens: 64,
            max_num_seqs: 4,
            ..EngineOptions::default()
        };
        let activations = rt.model.activation_bytes(64, 4);
        // The tiny model: 64 tokens of x, xn, qkv, att, gate_up, act; 4 rows of last,
        // last_n and the logits over the whole vocabulary.
        let c = rt.config();
        let t_cols = 2 * c.hidden_size
            + (c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim
            + c.num_attention_heads * c.head_dim
            + 3 * c.intermediate_size;
        let r_cols = 2 * c.hidden_size + c.vocab_size;
        assert_eq!(activations, 4 * (64 * t_cols + 4 * r_cols) as u64);

        // A share leaving 40 MiB for the cache.
        let f = (held + activations + 40 * MIB) as f64 / device as f64;
        let mut opts = base.clone();
        let b = rt.size_kv_cache(f, &mut opts).unwrap();
        assert_eq!(b.device_bytes, Some(device));
        assert_eq!((b.held_bytes, b.activation_bytes), (held, activations));
        assert!(b.kv_bytes.abs_diff(40 * MIB) <= 1, "{b}");
        // Whole MiB, rounded down (the share's bytes are rounded, so 40 MiB or a byte less).
        assert_eq!(opts.kv_cache_mb, Some((b.kv_bytes / MIB) as usize), "{b}");
        assert!(matches!(opts.kv_cache_mb, Some(39 | 40)), "{b}");
        // --kv-cache-mb caps it.
        let mut capped = EngineOptions {
            kv_cache_mb: Some(8),
            ..base.clone()
        };
        let b = rt.size_kv_cache(f, &mut capped).unwrap();
        assert_eq!((b.kv_bytes, capped.kv_cache_mb), (8 * MIB, Some(8)));
        assert!(b.to_string().contains("capped by --kv-cache-mb"), "{b}");

        // Not even the weights and activations fit: refused, with the numbers.
        let f = (held + activations) as f64 / 2.0 / device as f64;
        let err = rt.size_kv_cache(f, &mut base.clone()).unwrap_err();
        assert!(matches!(err, Error::OutOfMemory(_)), "{err}");
        let msg = err.to_string();
        assert!(msg.contains("leaves no room for the KV cache"), "{msg}");
        assert!(
            msg.contains(&format!("device {} MiB", device / MIB)),
            "{msg}"
        );
        for f in [0.0, -0.5, 1.5, f64::NAN] {
            assert!(rt.size_kv_cache(f, &mut base.clone()).is_err(), "{f}");
        }
    }

    #[test]
    fn kv_cache_is_a_share_of_the_kv_budget_where_the_device_size_is_unknown() {
        let opts = RuntimeOptions {
            device: Device::Cpu,
            threads: 2,
            ..RuntimeOptions::default()
        };
        let rt = Runtime::load(&tiny(), &opts).unwrap();
        let mut e = EngineOptions::default();
        let b = rt.size_kv_cache(0.25, &mut e).unwrap();
        assert_eq!(b.device_bytes, None);
        assert_eq!(e.kv_cache_mb, Some(DEFAULT_KV_CACHE_MB / 4));
        assert!(b.to_string().contains("unknown"), "{b}");
        let mut e = EngineOptions {
            kv_cache_mb: Some(100),
            ..EngineOptions::default()
        };
        rt.size_kv_cache(0.5, &mut e).unwrap();
        assert_eq!(e.kv_cache_mb, Some(50));
    }
}
