//! `wick`: the command-line interface, a thin layer over the library.
//!
//! Arguments are parsed here and each command dispatched to its module under `cli/`; what a
//! command prints is the `Display` of a report the library computes (`wick info`:
//! [`wick::runtime::MachineReport`], and with a model [`wick::runtime::ModelReport`]; `wick bench`: [`wick::bench::BenchSummary`] and
//! [`wick::engine::bench::ConcurrencySummary`]; `wick perplexity`:
//! [`wick::perplexity::PerplexityReport`] and [`wick::perplexity::KlReport`]; `wick quantize`:
//! [`wick::convert::QuantizedFile`]).

use anyhow::Result;
use clap::{Args, Parser, Subcommand};

use self::args::{EngineArgs, ModelArgs, QuantArg};

// musl's malloc makes prompt processing about 20% slower; see Cargo.toml.
#[cfg(target_env = "musl")]
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[path = "cli/args.rs"]
mod args;
#[path = "cli/bench.rs"]
mod bench;
#[cfg(feature = "bench-serve")]
#[path = "cli/bench_serve.rs"]
mod bench_serve;
#[path = "cli/perplexity.rs"]
mod perplexity;
#[path = "cli/quantize.rs"]
mod quantize;
#[path = "cli/run.rs"]
mod run;
#[cfg(feature = "server")]
#[path = "cli/serve.rs"]
mod serve;
#[cfg(feature = "server")]
#[path = "cli/vllm.rs"]
mod vllm;

#[derive(Parser)]
#[command(
    name = "wick",
    version,
    about = "Run Qwen3 language models on CPU and GPU"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate a reply to one prompt, streaming it to stdout.
    Run(run::RunArgs),
    /// Print the top-K logits at every prompt position.
    Logits(run::LogitsArgs),
    /// Measure prompt processing and generation speed (like llama-bench).
    Bench(bench::BenchArgs),
    /// Write a random-weight checkpoint with the exact shape of a published model.
    Synth(SynthArgs),
    /// Quantize a Hugging Face checkpoint directory into a GGUF file (like llama-quantize).
    Quantize(quantize::QuantizeArgs),
    /// Measure perplexity over a text file (llama.cpp's method).
    Perplexity(perplexity::PerplexityArgs),
    /// List GPU adapters, their features, limits and memory, and what `--device auto` picks;
    /// given a model, load it and report the load time of each phase and the memory it takes.
    // The model is optional here, unlike for the commands that run one.
    #[command(mut_arg("model_pos", |a| a.required_unless_present(clap::builder::Resettable::Reset)))]
    Info(InfoArgs),
    /// Serve the model over an OpenAI-compatible HTTP API.
    #[cfg(feature = "server")]
    Serve(Box<serve::ServeArgs>),
    /// Load-test an OpenAI-compatible server: QPS, latency and TTFT percentiles, tok/s.
    #[cfg(feature = "bench-serve")]
    BenchServe(bench_serve::BenchServeArgs),
}

#[derive(Args)]
struct InfoArgs {
    #[command(flatten)]
    model: Option<ModelArgs>,
}

#[derive(Args)]
struct SynthArgs {
    /// Shape to copy: qwen3-0.6b.
    #[arg(long, default_value = "qwen3-0.6b")]
    preset: String,
    /// Output directory.
    #[arg(long)]
    out: std::path::PathBuf,
    /// Directory holding tokenizer.json and tokenizer_config.json to copy.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/fixtures/qwen3-tiny"))]
    tokenizer: std::path::PathBuf,
    /// Seed of the random weights.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,wgpu_hal::gles=off".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    // vLLM's two-letter short flags (-tp, -pp, -dp), which clap's one-letter shorts cannot
    // spell.
    let args = std::env::args_os().map(|a| match a.to_str() {
        Some("-tp") => "--tensor-parallel-size".into(),
        Some("-pp") => "--pipeline-parallel-size".into(),
        Some("-dp") => "--data-parallel-size".into(),
        _ => a,
    });
    let command = Cli::parse_from(args).command;
    if !command.serves() {
        restore_sigpipe();
    }
    match command {
        Command::Run(a) => run::run(a),
        Command::Logits(a) => run::logits(a),
        Command::Bench(a) => bench::bench(a),
        Command::Quantize(a) => quantize::quantize(a),
        Command::Perplexity(a) => perplexity::perplexity(a),
        Command::Info(a) => info(a),
        #[cfg(feature = "server")]
        Command::Serve(a) => serve::serve(*a),
        #[cfg(feature = "bench-serve")]
        Command::BenchServe(a) => bench_serve::bench_serve(a),
        Command::Synth(a) => {
            let preset = wick::synth::Preset::parse(&a.preset)?;
            wick::synth::write_checkpoint(preset, &a.out, &a.tokenizer, a.seed)?;
            eprintln!("wrote {}", a.out.display());
            Ok(())
        }
    }
}

impl Command {
    /// Whether the command runs a server or a load generator: those keep Rust's ignored
    /// SIGPIPE (a peer that goes away is an error on that connection, not the end of the
    /// process).
    fn serves(&self) -> bool {
        #[cfg(feature = "server")]
        if matches!(self, Command::Serve(_)) {
            return true;
        }
        #[cfg(feature = "bench-serve")]
        if matches!(self, Command::BenchServe(_)) {
            return true;
        }
        false
    }
}

/// Lets a closed standard output end the command quietly, as it ends other Unix tools
/// (`wick info | grep -q avx2`, `wick run ... | head -1`), instead of a panic on a broken pipe.
fn restore_sigpipe() {
    #[cfg(unix)]
    // SAFETY: called once at start-up, before any thread is spawned, with a valid
    // disposition.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// `wick info`: the CPU's kernel tier, the GPU adapters in `--adapter` order and the
/// `--device auto` choice; with a model, what loading it took.
fn info(a: InfoArgs) -> Result<()> {
    println!("{}", wick::runtime::MachineReport::detect());
    // Loading options without a model (WICK_DEVICE in the environment, say) load nothing.
    if let Some(m) = a.model.filter(|m| !m.model().is_empty()) {
        let rt = m.load()?;
        println!("{}", rt.report());
    }
    Ok(())
}
