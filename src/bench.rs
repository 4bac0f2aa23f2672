//! `wick bench`: prompt-processing and generation speed, measured like llama-bench.
//!
//! - pp: a prompt of `n_prompt` random tokens processed from an empty cache (matrix-matrix
//!   work in chunks), reported as prompt tokens per second.
//! - tg: `n_gen` tokens decoded one at a time from an empty cache, reported as tokens per
//!   second and as GB/s of weights read (decode reads every weight once per token, so GB/s
//!   against the machine's bandwidth says how close to the limit it runs).
//! - With `depth` (llama-bench's `-d`), both run after a context of `depth` tokens instead of
//!   an empty cache: attention then reads `depth` cached keys and values per token, which
//!   is what long chats cost. The context is computed once and kept (untimed) across runs.
//!
//! Each figure is the median over `repetitions` runs after one warm-up run; the machine is
//! shared and noisy, so medians, not means. Decoding is greedy and the argmax is part of the
//! step: the backend samples where the logits are ([`SequenceRunner::extend_sample`]), so on
//! the GPU a decoded token reads back one id, not `[V]` logits.
//!
//! The machine's memory read bandwidth is measured in the same run ([`memory_bandwidth`]):
//! decode reads every weight once per token, so bandwidth / weight bytes per token is the
//! ceiling of tg on this machine, and tg as a share of it says how much is left to win.
//!
//! On the GPU, the backend's counters give the work of each decoded token: compute
//! dispatches (each one a pass the driver schedules: fewer, fused kernels cost less),
//! blocking read-backs (each one a full CPU ↔ GPU round trip) and the bytes they copy.

use std::time::Instant;

use serde::Serialize;

use crate::backend::GpuStats;
use crate::backend::RowSampling;
use crate::error::Result;
use crate::session::SequenceRunner;

/// What to measure.
#[derive(Clone, Copy, Debug)]
pub struct BenchOptions {
    /// Prompt length for pp (0 = skip).
    pub n_prompt: usize,
    /// Tokens to generate for tg (0 = skip).
    pub n_gen: usize,
    /// Timed runs of each test.
    pub repetitions: usize,
    /// Tokens already in the cache when each test starts.
    pub depth: usize,
}

/// Results, all medians.
#[derive(Clone, Debug, Serialize)]
pub struct BenchReport {
    /// Prompt tokens.
    pub n_prompt: usize,
    /// Generated tokens.
    pub n_gen: usize,
    /// Cached context before each test.
    pub depth: usize,
    /// Median prompt tokens per second.
    pub pp_tok_s: Option<f64>,
    /// Median generated tokens per second.
    pub tg_tok_s: Option<f64>,
    /// Median milliseconds per generated token.
    pub tg_ms_per_tok: Option<f64>,
    /// Weight bytes read per generated token.
    pub weight_bytes_per_token: u64,
    /// Weight GB/s during generation (10⁹ bytes per second).
    pub tg_gb_s: Option<f64>,
    /// Every run's pp tok/s.
    pub pp_runs: Vec<f64>,
    /// Every run's tg tok/s.
    pub tg_runs: Vec<f64>,
    /// GPU compute dispatches per generated token (GPU only).
    pub tg_dispatches_per_tok: Option<f64>,
    /// GPU command-buffer submits per generated token (GPU only).
    pub tg_submits_per_tok: Option<f64>,
    /// Blocking GPU read-backs per generated token (GPU only).
    pub tg_readbacks_per_tok: Option<f64>,
    /// Bytes those read-backs copy to the host per generated token (GPU only).
    pub tg_readback_bytes_per_tok: Option<f64>,
}

/// Measures the memory read bandwidth of `threads` threads (0 = one per core), in GB/s
/// (10⁹ bytes per second): the fastest of `repetitions` passes over a 512 MiB buffer, far
/// larger than any last-level cache, each thread reading its own contiguous part, as the
/// CPU matmul jobs read their rows. The fastest, not the median: this is a ceiling, and on a
/// shared or virtual machine a slow pass measures the neighbours, not the memory.
pub fn memory_bandwidth(threads: usize, repetitions: usize) -> Result<f64> {
    use rayon::prelude::*;
    const BYTES: usize = 512 << 20;
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .map_err(|e| crate::error::Error::Device(format!("cannot start {threads} threads: {e}")))?;
    let n = pool.current_num_threads();
    // Written once so every page is mapped before timing.
    let buf: Vec<u64> = (0..BYTES / 8).map(|i| i as u64).collect();
    let part = buf.len().div_ceil(n * 16);
    let mut runs = Vec::with_capacity(repetitions);
    for _ in 0..repetitions.max(1) + 1 {
        let start = Instant::now();
        let sum: u64 = pool.install(|| {
            buf.par_chunks(part)
                .map(|c| {
                    #[cfg(target_arch = "x86_64")]
                    if std::arch::is_x86_feature_detected!("avx2") {
                        // SAFETY: the CPU has AVX2.
                        return unsafe { xor_lines_avx2(c) };
                    }
                    xor_lines(c)
                })
                .reduce(|| 0, |a, b| a ^ b)
        });
        std::hint::black_box(sum);
        runs.push(BYTES as f64 / start.elapsed().as_secs_f64() / 1e9);
    }
    // The first pass is a warm-up.
    Ok(runs[1..].iter().copied().fold(0.0, f64::max))
}

/// The XOR of `c`'s words, read a cache line per step with eight independent lanes (so the
/// operations do not serialize) and the lines 4 KiB ahead asked for, as the matmul kernels
/// ask for their weights: the hardware prefetcher alone reads less than the memory gives.
#[inline(always)]
fn xor_lines(c: &[u64]) -> u64 {
    let mut acc = [0u64; 8];
    for (i, q) in c.chunks_exact(8).enumerate() {
        prefetch(c.as_ptr().wrapping_add(i * 8 + 512));
        for (a, v) in acc.iter_mut().zip(q) {
            *a ^= *v;
        }
    }
    acc.iter().fold(0u64, |s, v| s ^ v)
}

/// [`xor_lines`] compiled for AVX2: 32-byte loads, as wide as the kernels' narrowest.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn xor_lines_avx2(c: &[u64]) -> u64 {
    xor_lines(c)
}

/// Asks for the cache line at `p` (never faults, even past the end of a buffer).
#[inline(always)]
fn prefetch(p: *const u64) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch is a hint; it reads nothing and never faults.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p as *const i8)
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// Median of `v` (0 for empty).
pub fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    match s.len() {
        0 => 0.0,
        n if n % 2 == 1 => s[n / 2],
        n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    }
}

/// Deterministic pseudo-random token ids below `vocab`.
fn tokens(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    let mut s = seed | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s % vocab as u64) as u32
        })
        .collect()
}

/// Runs the benchmark on `runner` (its cache is reset before and after).
pub fn run(
    runner: &mut dyn SequenceRunner,
    vocab: usize,
    weight_bytes_per_token: u64,
    opts: &BenchOptions,
) -> Result<BenchReport> {
    run_counting(runner, vocab, weight_bytes_per_token, opts, None)
}

/// [`run`], also reading the GPU backend's counters around generation (`gpu_stats`, from
/// [`crate::runtime::Runtime::gpu_stats_reader`]) to report the work per decoded token.
pub fn run_counting(
    runner: &mut dyn SequenceRunner,
    vocab: usize,
    weight_bytes_per_token: u64,
    opts: &BenchOptions,
    gpu_stats: Option<&dyn Fn() -> GpuStats>,
) -> Result<BenchReport> {
    let mut logits = Vec::new();
    let mut per_tok: Option<[f64; 4]> = None;
    let greedy = RowSampling::greedy();
    let mut pp_runs = Vec::new();
    let mut tg_runs = Vec::new();
    // The context of `depth` tokens, plus one that never runs: keeping the longest cached
    // prefix of it keeps the whole context and drops what the last test appended.
    let mut context = tokens(opts.depth, vocab, 3);
    context.push(0);
    let start = |runner: &mut dyn SequenceRunner| -> Result<()> {
        if opts.depth == 0 {
            runner.reset();
            return Ok(());
        }
        let kept = runner.reuse_prefix(&context);
        if kept < opts.depth {
            runner.extend_last(&context[kept..opts.depth], &mut Vec::new())?;
        }
        Ok(())
    };
    for rep in 0..=opts.repetitions {
        if opts.n_prompt > 0 {
            let prompt = tokens(opts.n_prompt, vocab, 7 + rep as u64);
            start(runner)?;
            let t = Instant::now();
            runner.extend_last(&prompt, &mut logits)?;
            let secs = t.elapsed().as_secs_f64();
            if rep > 0 {
                pp_runs.push(opts.n_prompt as f64 / secs);
            }
        }
        if opts.n_gen > 0 {
            start(runner)?;
            let mut next = tokens(1, vocab, 11 + rep as u64)[0];
            let before = gpu_stats.map(|f| f());
            let t = Instant::now();
            for _ in 0..opts.n_gen {
                next = runner.extend_sample(&[next], &greedy)?;
            }
            let secs = t.elapsed().as_secs_f64();
            if let (Some(b), Some(f)) = (before, gpu_stats) {
                let (a, n) = (f(), opts.n_gen as f64);
                per_tok = Some([
                    (a.dispatches - b.dispatches) as f64 / n,
                    (a.submits - b.submits) as f64 / n,
                    (a.readbacks - b.readbacks) as f64 / n,
                    (a.readback_bytes - b.readback_bytes) as f64 / n,
                ]);
            }
            if rep > 0 {
                tg_runs.push(opts.n_gen as f64 / secs);
            }
        }
    }
    runner.reset();
    let pp = (!pp_runs.is_empty()).then(|| median(&pp_runs));
    let tg = (!tg_runs.is_empty()).then(|| median(&tg_runs));
    Ok(BenchReport {
        n_prompt: opts.n_prompt,
        n_gen: opts.n_gen,
        depth: opts.depth,
        pp_tok_s: pp,
        tg_tok_s: tg,
        tg_ms_per_tok: tg.map(|t| 1000.0 / t),
        weight_bytes_per_token,
        tg_gb_s: tg.map(|t| t * weight_bytes_per_token as f64 / 1e9),
        pp_runs,
        tg_runs,
        tg_dispatches_per_tok: per_tok.map(|p| p[0]),
        tg_submits_per_tok: per_tok.map(|p| p[1]),
        tg_readbacks_per_tok: per_tok.map(|p| p[2]),
        tg_readback_bytes_per_tok: per_tok.map(|p| p[3]),
    })
}

/// A [`BenchReport`] with what `wick bench` prints around it: the model, the device, and the
/// machine's bandwidth (the ceiling of tg) when measured.
#[derive(Clone, Debug)]
pub struct BenchSummary {
    /// The model's name.
    pub model: String,
    /// The device it ran on.
    pub device: String,
    /// How the KV cache stored keys and values.
    pub kv_cache_dtype: crate::backend::KvDtype,
    /// CPU threads (as asked; 0 = one per core).
    pub threads: usize,
    /// Memory read bandwidth in GB/s, measured in the same run (CPU only).
    pub memory_bandwidth: Option<f64>,
    /// Every GPU buffer wick holds after the run (GPU only).
    pub gpu_memory_bytes: Option<u64>,
    /// How long loading the model took.
    pub load_times: crate::loader::LoadTimes,
    /// The measurements.
    pub report: BenchReport,
}

impl BenchSummary {
    /// The report as JSON, with the summary's fields and the tg ceiling added.
    pub fn to_json(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(&self.report).expect("plain numbers serialize");
        v["model"] = self.model.clone().into();
        v["device"] = self.device.clone().into();
        v["gpu_memory_bytes"] = self.gpu_memory_bytes.into();
        v["load_seconds"] = self.load_times.to_json();
        v["cpu_isa"] = crate::backend::cpu::isa::Isa::current().name().into();
        if let Some(bw) = self.memory_bandwidth {
            let bytes = self.report.weight_bytes_per_token;
            v["memory_bandwidth_gb_s"] = bw.into();
            v["tg_ceiling_tok_s"] = (bw * 1e9 / bytes as f64).into();
            v["tg_share_of_ceiling"] = self.report.tg_gb_s.map(|gb| gb / bw).into();
        }
        v
    }
}

impl std::fmt::Display for BenchSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let r = &self.report;
        let bytes = r.weight_bytes_per_token;
        write!(
            f,
            "model {} on {}, {} KV cache\nload: {}",
            self.model, self.device, self.kv_cache_dtype, self.load_times
        )?;
        let at = if r.depth > 0 {
            format!(" @ d{}", r.depth)
        } else {
            String::new()
        };
        if let Some(pp) = r.pp_tok_s {
            write!(f, "\npp{}{at} {:8.1} tok/s", r.n_prompt, pp)?;
        }
        if let (Some(tg), Some(ms), Some(gb)) = (r.tg_tok_s, r.tg_ms_per_tok, r.tg_gb_s) {
            write!(
                f,
                "\ntg{}{at} {:8.1} tok/s  {:7.2} ms/tok  {:6.2} GB/s ({:.1} MB of weights per token)",
                r.n_gen,
                tg,
                ms,
                gb,
                bytes as f64 / 1e6
            )?;
        }
        if let (Some(bw), Some(gb)) = (self.memory_bandwidth, r.tg_gb_s) {
            write!(
                f,
                "\nmemory read bandwidth {bw:.2} GB/s ({} threads): tg ceiling {:.1} tok/s, \
                 tg runs at {:.0}% of it",
                self.threads,
                bw * 1e9 / bytes as f64,
                100.0 * gb / bw
            )?;
        }
        if let (Some(d), Some(rb)) = (r.tg_dispatches_per_tok, r.tg_readbacks_per_tok) {
            write!(
                f,
                "\ngpu work per decoded token: {d:.1} dispatches, {rb:.1} blocking read-back(s), \
                 {:.1} submit(s)",
                r.tg_submits_per_tok.unwrap_or(0.0)
            )?;
        }
        if let Some(m) = self.gpu_memory_bytes {
            write!(
                f,
                "\ngpu memory {:.1} MiB (every buffer wick created: weights, KV cache, activations)",
                m as f64 / (1 << 20) as f64
            )?;
        }
        Ok(())
    }
}
