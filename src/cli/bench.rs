//! `wick bench`: prompt processing and generation speed of one sequence (like llama-bench), or
//! with `--concurrency`, of many requests through the serving engine.

use anyhow::Result;
use clap::Args;

use crate::{EngineArgs, ModelArgs};

#[derive(Args)]
pub(crate) struct BenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Prompt tokens for the prompt-processing test (0 = skip).
    #[arg(short = 'p', long = "n-prompt", default_value_t = 512)]
    n_prompt: usize,
    /// Tokens for the generation test (0 = skip).
    #[arg(short = 'n', long = "n-gen", default_value_t = 128)]
    n_gen: usize,
    /// Timed repetitions of each test (after one warm-up); medians are reported.
    #[arg(short = 'r', long, default_value_t = 3)]
    repetitions: usize,
    /// Run both tests after this many tokens of context (llama-bench's -d).
    #[arg(short = 'd', long, default_value_t = 0)]
    depth: usize,
    /// Print JSON.
    #[arg(long)]
    json: bool,
    /// Run N requests at once through the serving engine instead, and report aggregate
    /// decode speed against one request alone (-p is each prompt's length, -n each reply's).
    #[arg(long)]
    concurrency: Option<usize>,
    /// With --concurrency: leading prompt tokens all requests share, to measure prefix reuse.
    #[arg(long, default_value_t = 0)]
    shared_prefix: usize,
    #[command(flatten)]
    engine: EngineArgs,
}

/// `wick bench`.
pub(crate) fn bench(a: BenchArgs) -> Result<()> {
    let max_len = a
        .model
        .max_model_len
        .max(a.depth + a.n_prompt.max(a.n_gen) + 1);
    if let Some(n) = a.concurrency {
        return bench_concurrency(a, n);
    }
    let mut rt = ModelArgs {
        max_model_len: max_len,
        ..a.model
    }
    .load()?;
    let opts = wick::bench::BenchOptions {
        n_prompt: a.n_prompt,
        n_gen: a.n_gen,
        repetitions: a.repetitions.max(1),
        depth: a.depth,
    };
    let vocab = rt.config().vocab_size;
    let bytes = rt.weight_bytes_per_token();
    let stats = rt.gpu_stats_reader();
    let report = wick::bench::run_counting(
        rt.runner()?,
        vocab,
        bytes,
        &opts,
        stats.as_ref().map(|f| f.as_ref() as &dyn Fn() -> _),
    )?;
    // On the CPU, the machine's bandwidth in the same run: tg's ceiling.
    let bandwidth = if rt.device().starts_with("cpu") && a.n_gen > 0 {
        Some(wick::bench::memory_bandwidth(a.model.threads, 5)?)
    } else {
        None
    };
    let summary = wick::bench::BenchSummary {
        model: rt.name().to_string(),
        device: rt.device().to_string(),
        kv_cache_dtype: a.model.kv_cache_dtype,
        threads: a.model.threads,
        memory_bandwidth: bandwidth,
        // Every GPU buffer wick holds after the run: weights, KV cache, activations.
        gpu_memory_bytes: rt.gpu_stats().map(|g| g.memory_bytes),
        load_times: rt.load_times(),
        report,
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&summary.to_json())?);
    } else {
        println!("{summary}");
    }
    Ok(())
}

fn bench_concurrency(a: BenchArgs, n: usize) -> Result<()> {
    let max_len = a.model.max_model_len.min(a.n_prompt + a.n_gen + 1);
    let rt = ModelArgs {
        max_model_len: max_len,
        ..a.model
    }
    .load()?;
    let mut opts = a.engine.options(max_len);
    opts.max_num_seqs = opts.max_num_seqs.max(n);
    let engine = rt.start_engine(&opts)?;
    let report = wick::engine::bench::run(
        &engine,
        &wick::engine::bench::ConcurrencyOptions {
            concurrency: n,
            n_prompt: a.n_prompt,
            n_gen: a.n_gen,
            shared_prefix: a.shared_prefix,
            vocab: rt.config().vocab_size,
            seed: 1,
        },
    )?;
    let summary = wick::engine::bench::ConcurrencySummary {
        model: rt.name().to_string(),
        device: rt.device().to_string(),
        // Every GPU buffer wick holds after the run: weights, KV cache, activations.
        gpu_memory_bytes: rt.gpu_stats().map(|g| g.memory_bytes),
        load_times: rt.load_times(),
        report,
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&summary.to_json())?);
    } else {
        println!("{summary}");
    }
    Ok(())
}
