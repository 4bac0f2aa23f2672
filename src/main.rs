//! `wick`: the command-line interface, a thin layer over the library.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use serde_json::json;

use wick::backend::cpu::ActQuant;
use wick::backend::KvDtype;
use wick::generate::prompt_opens_reasoning;
use wick::loader::hub::HubOptions;
use wick::quant::scheme::QuantScheme;
use wick::runtime::{Device, Runtime, RuntimeOptions};
use wick::text::chat_template::RenderOptions;

// musl's malloc makes prompt processing about 20% slower; see Cargo.toml.
#[cfg(target_env = "musl")]
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[cfg(feature = "bench-serve")]
#[path = "cli/bench_serve.rs"]
mod bench_serve;
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
    Run(RunArgs),
    /// Print the top-K logits at every prompt position.
    Logits(LogitsArgs),
    /// Measure prompt processing and generation speed (like llama-bench).
    Bench(BenchArgs),
    /// Write a random-weight checkpoint with the exact shape of a published model.
    Synth(SynthArgs),
    /// Quantize a Hugging Face checkpoint directory into a GGUF file (like llama-quantize).
    Quantize(QuantizeArgs),
    /// Measure perplexity over a text file (llama.cpp's method).
    Perplexity(PerplexityArgs),
    /// List GPU adapters, their features and limits, and what `--device auto` picks.
    Info,
    /// Serve the model over an OpenAI-compatible HTTP API.
    #[cfg(feature = "server")]
    Serve(Box<serve::ServeArgs>),
    /// Load-test an OpenAI-compatible server: QPS, latency and TTFT percentiles, tok/s.
    #[cfg(feature = "bench-serve")]
    BenchServe(bench_serve::BenchServeArgs),
}

#[derive(Args)]
struct QuantizeArgs {
    /// The Hugging Face checkpoint directory (config.json, *.safetensors, tokenizer.json).
    input: std::path::PathBuf,
    /// The GGUF file to write.
    output: std::path::PathBuf,
    /// The quantization mix: q8_0, q4_0 or q4_k_m.
    #[arg(long = "type", value_enum)]
    qtype: QuantArg,
}

#[derive(Args)]
struct PerplexityArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The text file to score (not read with --kl-divergence: the tokens come from the base
    /// file).
    #[arg(long, short, required_unless_present = "kl_divergence")]
    file: Option<std::path::PathBuf>,
    /// Tokens per chunk; the second half of each chunk is scored [default: 512; with
    /// --kl-divergence, the base file's, and a different value is an error].
    #[arg(long)]
    ctx: Option<usize>,
    /// Write the predicted distribution at every scored token to FILE, in the format of
    /// llama-perplexity's --kl-divergence-base (with --kl-divergence: read it instead).
    #[arg(long, value_name = "FILE")]
    kl_divergence_base: Option<std::path::PathBuf>,
    /// Run the model on the tokens of the --kl-divergence-base file and compare its
    /// predictions with the stored ones: KL divergence, top-token agreement, PPL ratio.
    #[arg(long, requires = "kl_divergence_base")]
    kl_divergence: bool,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, ValueEnum)]
enum QuantArg {
    #[value(name = "q8_0")]
    Q8_0,
    #[value(name = "q4_0")]
    Q4_0,
    #[value(name = "q4_k_m", alias = "q4_k")]
    Q4KM,
}

impl QuantArg {
    fn scheme(self) -> QuantScheme {
        match self {
            QuantArg::Q8_0 => QuantScheme::Q8_0,
            QuantArg::Q4_0 => QuantScheme::Q4_0,
            QuantArg::Q4KM => QuantScheme::Q4_K_M,
        }
    }
}

#[derive(Args)]
struct BenchArgs {
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

/// Sizes of the serving engine.
#[derive(Args, Clone)]
pub struct EngineArgs {
    /// Most sequences decoding at once.
    #[arg(long, default_value_t = 16, env = "WICK_MAX_NUM_SEQS")]
    max_num_seqs: usize,
    /// Most tokens per forward step (long prompts are prefilled in chunks of this size).
    #[arg(long, default_value_t = 512, env = "WICK_MAX_NUM_BATCHED_TOKENS")]
    max_num_batched_tokens: usize,
    /// KV cache budget in MiB (default 1024, and never less than one max-model-len sequence).
    #[arg(long, env = "WICK_KV_CACHE_MB")]
    kv_cache_mb: Option<usize>,
    /// KV blocks (of 16 tokens) in the cache, whatever --kv-cache-mb says: vLLM's flag, for
    /// testing preemption with a small pool. At least one max-model-len sequence.
    #[arg(long, env = "WICK_NUM_GPU_BLOCKS_OVERRIDE")]
    num_gpu_blocks_override: Option<usize>,
    /// Do not reuse cached KV blocks across requests (also --no-enable-prefix-caching).
    #[arg(
        long,
        alias = "no-enable-prefix-caching",
        overrides_with = "enable_prefix_caching",
        env = "WICK_NO_PREFIX_CACHING",
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    no_prefix_caching: bool,
    /// Reuse cached KV blocks across requests (the default).
    #[arg(long, overrides_with = "no_prefix_caching", hide_short_help = true)]
    enable_prefix_caching: bool,
}

impl EngineArgs {
    fn options(&self, max_model_len: usize) -> wick::engine::EngineOptions {
        wick::engine::EngineOptions {
            max_num_seqs: self.max_num_seqs,
            max_num_batched_tokens: self.max_num_batched_tokens,
            max_model_len,
            kv_cache_mb: self.kv_cache_mb,
            num_blocks: self.num_gpu_blocks_override,
            enable_prefix_caching: !self.no_prefix_caching,
            ..wick::engine::EngineOptions::default()
        }
    }
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

#[derive(Clone, Copy, ValueEnum)]
enum DeviceArg {
    /// A GPU if usable, else the CPU.
    Auto,
    /// The CPU.
    Cpu,
    /// A GPU, or fail (also spelled `cuda`, as vLLM command lines say).
    #[value(alias = "cuda")]
    Gpu,
}

/// Options every command that loads a model shares. Every one can also be set from the
/// environment (`WICK_` and the flag's name), as containers do.
#[derive(Args)]
pub struct ModelArgs {
    /// A local model directory, a .gguf file (the first part of a split one), a Hub id such as
    /// Qwen/Qwen3-0.6B, or a GGUF repository and quantization such as
    /// Qwen/Qwen3-0.6B-GGUF:Q8_0 (or as --model).
    #[arg(
        value_name = "MODEL",
        required_unless_present = "model",
        conflicts_with = "model"
    )]
    model_pos: Option<String>,
    /// The model, as a flag (vLLM's api_server spelling).
    #[arg(long, short, env = "WICK_MODEL", hide_short_help = true)]
    model: Option<String>,
    /// Where to run.
    #[arg(long, value_enum, default_value = "auto", env = "WICK_DEVICE")]
    device: DeviceArg,
    /// CPU threads (default: one per CPU the process may use: the affinity mask, capped by
    /// the cgroup CPU quota).
    #[arg(long, default_value_t = 0, env = "WICK_THREADS")]
    threads: usize,
    /// Pin to these CPUs (e.g. 0,2-3), as `taskset -c` would; threads default to their
    /// number.
    #[arg(long, env = "WICK_CPUS")]
    cpus: Option<String>,
    /// Never touch the network; use the Hugging Face cache only.
    #[arg(long, env = "WICK_OFFLINE", value_parser = clap::builder::BoolishValueParser::new())]
    offline: bool,
    /// Longest sequence (prompt + reply) to hold in the KV cache: a number of tokens, or
    /// with a suffix as vLLM reads it (8k = 8000, 8K = 8192).
    #[arg(long, default_value = "8192", value_parser = parse_len, env = "WICK_MAX_MODEL_LEN")]
    max_model_len: usize,
    /// Quantize float weights at load: q8_0, q4_0 or q4_k (llama-quantize's Q4_K_M mix).
    #[arg(long, value_enum, env = "WICK_QUANTIZE")]
    quantize: Option<QuantArg>,
    /// GPU adapter: an index or part of a name, as listed by `wick info` (default: the first).
    #[arg(long, env = "WICK_ADAPTER")]
    adapter: Option<String>,
    /// How the KV cache stores keys and values: f16 (half the memory, twice the tokens; also
    /// `auto`) or f32 (exact).
    #[arg(long, default_value = "auto", value_parser = parse_kv_dtype, env = "WICK_KV_CACHE_DTYPE")]
    kv_cache_dtype: KvDtype,
    /// CPU: precision of the activations that meet quantized weights: q8 (8-bit, as
    /// llama.cpp: fastest), q16 (16-bit: within about 1e-4 of f32) or f32 (exact).
    #[arg(long, default_value = "q8", value_parser = parse_act, env = "WICK_ACTIVATIONS")]
    activations: ActQuant,
    /// A chat template to use instead of the model's: a file, or the template itself.
    #[arg(long, env = "WICK_CHAT_TEMPLATE")]
    chat_template: Option<String>,
    /// Hub: the branch, tag or commit to fetch (default: main).
    #[arg(long, env = "WICK_REVISION")]
    revision: Option<String>,
    /// Hub: the cache directory to download to and load from (default: HF_HUB_CACHE, else
    /// ~/.cache/huggingface/hub).
    #[arg(long, env = "WICK_DOWNLOAD_DIR")]
    download_dir: Option<std::path::PathBuf>,
    /// Hub: the access token for gated or private repositories (default: HF_TOKEN, else the
    /// token file).
    #[arg(long, env = "WICK_HF_TOKEN", hide_env_values = true)]
    hf_token: Option<String>,
}

/// A length as vLLM's `--max-model-len` takes it: digits, optionally with a decimal part
/// and a suffix (k, m, g: powers of 1000; K, M, G: powers of 1024).
fn parse_len(s: &str) -> std::result::Result<usize, String> {
    let t = s.trim();
    let (num, mult) = match t.chars().last() {
        Some('k') => (&t[..t.len() - 1], 1e3),
        Some('m') => (&t[..t.len() - 1], 1e6),
        Some('g') => (&t[..t.len() - 1], 1e9),
        Some('K') => (&t[..t.len() - 1], 1024.0),
        Some('M') => (&t[..t.len() - 1], 1024.0 * 1024.0),
        Some('G') => (&t[..t.len() - 1], 1024.0 * 1024.0 * 1024.0),
        _ => (t, 1.0),
    };
    let bad = || {
        format!(
            "`{s}` is not a length: give a number of tokens such as 8192, 8k or 8K \
             (`auto` and -1 are not supported: wick does not size the context from free memory)"
        )
    };
    let x: f64 = num.parse().map_err(|_| bad())?;
    let n = x * mult;
    if !((1.0..=1e9).contains(&n) && n.fract() == 0.0) {
        return Err(bad());
    }
    Ok(n as usize)
}

/// `--kv-cache-dtype` as vLLM spells it: `auto` is f16, the default.
fn parse_kv_dtype(s: &str) -> std::result::Result<KvDtype, String> {
    match s.to_ascii_lowercase().as_str() {
        "auto" | "fp16" => Ok(KvDtype::F16),
        "fp32" => Ok(KvDtype::F32),
        l if l.starts_with("fp8") || l == "bfloat16" || l == "bf16" => Err(format!(
            "wick stores the KV cache as f16 or f32, not {s} (use auto, f16 or f32)"
        )),
        _ => s.parse(),
    }
}

fn parse_act(s: &str) -> std::result::Result<ActQuant, String> {
    ActQuant::parse(s).ok_or_else(|| format!("{s:?} is not one of q8, q16, f32"))
}

impl ModelArgs {
    /// The model, as given positionally or by --model.
    fn model(&self) -> &str {
        self.model_pos
            .as_deref()
            .or(self.model.as_deref())
            .unwrap_or_default()
    }

    fn load(&self) -> Result<Runtime> {
        // Before the CPU threads start: they inherit the mask.
        if let Some(list) = &self.cpus {
            let cpus = wick::resources::parse_cpu_list(list).context("--cpus")?;
            wick::resources::pin(&cpus).context("--cpus")?;
        }
        let opts = RuntimeOptions {
            device: match self.device {
                DeviceArg::Auto => Device::Auto,
                DeviceArg::Cpu => Device::Cpu,
                DeviceArg::Gpu => Device::Gpu,
            },
            threads: self.threads,
            max_model_len: self.max_model_len,
            quantize: self.quantize.map(QuantArg::scheme),
            adapter: self.adapter.clone(),
            kv_dtype: self.kv_cache_dtype,
            cpu_act: self.activations,
            hub: HubOptions {
                offline: self.offline,
                revision: self.revision.clone(),
                cache_dir: self.download_dir.clone(),
                token: self.hf_token.clone(),
                ..HubOptions::default()
            },
            ..RuntimeOptions::default()
        };
        let model = self.model();
        let mut rt = Runtime::load(model, &opts).with_context(|| format!("loading {model}"))?;
        if let Some(t) = &self.chat_template {
            let source = chat_template_source(t)?;
            rt.set_chat_template(&source).context("--chat-template")?;
        }
        eprintln!("wick: {} on {}", rt.name(), rt.device());
        Ok(rt)
    }
}

/// `--chat-template`'s value: a file's contents, or the template itself (vLLM reads it the
/// same way).
fn chat_template_source(value: &str) -> Result<String> {
    let path = std::path::Path::new(value);
    if path.is_file() {
        return std::fs::read_to_string(path)
            .with_context(|| format!("--chat-template: reading {}", path.display()));
    }
    anyhow::ensure!(
        value.contains("{{") || value.contains("{%"),
        "--chat-template: `{value}` is neither a file nor a Jinja template"
    );
    Ok(value.to_string())
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The user's message (or the whole prompt with --raw).
    #[arg(long, short)]
    prompt: String,
    /// A system message.
    #[arg(long)]
    system: Option<String>,
    /// Turn Qwen3's thinking off (enable_thinking=false in the chat template).
    #[arg(long)]
    no_think: bool,
    /// Feed the prompt as is, without the chat template.
    #[arg(long)]
    raw: bool,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 512)]
    max_tokens: usize,
    /// Sampling temperature (0 = greedy); default from the model's generation_config.json.
    #[arg(long)]
    temperature: Option<f32>,
    /// Nucleus sampling threshold.
    #[arg(long)]
    top_p: Option<f32>,
    /// Keep only the K most likely tokens (0 = off).
    #[arg(long)]
    top_k: Option<usize>,
    /// Seed for reproducible sampling.
    #[arg(long)]
    seed: Option<u64>,
    /// Print one JSON object instead of streaming text.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct LogitsArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The user's message (or the whole prompt with --raw).
    #[arg(long, short)]
    prompt: String,
    /// Feed the prompt as is, without the chat template.
    #[arg(long)]
    raw: bool,
    /// Turn Qwen3's thinking off in the chat template.
    #[arg(long)]
    no_think: bool,
    /// How many of the largest logits to print per position.
    #[arg(long, default_value_t = 5)]
    top: usize,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
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
    match Cli::parse_from(args).command {
        Command::Run(a) => run(a),
        Command::Logits(a) => logits(a),
        Command::Bench(a) => bench(a),
        Command::Quantize(a) => quantize(a),
        Command::Perplexity(a) => perplexity(a),
        Command::Info => info(),
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

/// Renders the prompt (chat template unless raw) and tokenizes it.
fn prompt_ids(
    rt: &Runtime,
    prompt: &str,
    system: Option<&str>,
    raw: bool,
    no_think: bool,
) -> Result<(Vec<u32>, bool)> {
    if raw {
        return Ok((rt.encode_raw(prompt)?, false));
    }
    let mut messages = Vec::new();
    if let Some(s) = system {
        messages.push(json!({"role": "system", "content": s}));
    }
    messages.push(json!({"role": "user", "content": prompt}));
    let opts = RenderOptions {
        enable_thinking: no_think.then_some(false),
        ..RenderOptions::default()
    };
    let text = rt.render_chat(&messages, &opts)?;
    Ok((
        rt.tokenizer().encode(&text, false)?,
        prompt_opens_reasoning(&text),
    ))
}

fn run(a: RunArgs) -> Result<()> {
    let mut rt = a.model.load()?;
    let (ids, start_in_reasoning) =
        prompt_ids(&rt, &a.prompt, a.system.as_deref(), a.raw, a.no_think)?;
    let mut params = rt.default_params();
    params.max_tokens = Some(a.max_tokens);
    if let Some(t) = a.temperature {
        params.temperature = t;
    }
    if let Some(p) = a.top_p {
        params.top_p = p;
    }
    if let Some(k) = a.top_k {
        params.top_k = k;
    }
    params.seed = a.seed;

    // Ctrl-C stops the reply (the partial result is still printed).
    let cancel = Arc::new(AtomicBool::new(false));
    let c = cancel.clone();
    ctrlc::set_handler(move || c.store(true, Ordering::Relaxed)).ok();

    let grey = std::io::stderr().is_terminal();
    let json_out = a.json;
    let mut stdout = std::io::stdout();
    let mut stderr = std::io::stderr();
    let out = rt.generate(
        ids.clone(),
        start_in_reasoning,
        &params,
        &cancel,
        &mut |ev| {
            if json_out {
                return;
            }
            // Thinking goes to stderr, so stdout holds only the answer.
            if !ev.delta.reasoning.is_empty() {
                if grey {
                    let _ = write!(stderr, "\x1b[90m{}\x1b[0m", ev.delta.reasoning);
                } else {
                    let _ = write!(stderr, "{}", ev.delta.reasoning);
                }
            }
            if !ev.delta.content.is_empty() {
                let _ = write!(stdout, "{}", ev.delta.content);
                let _ = stdout.flush();
            }
        },
    )?;
    if a.json {
        let v = json!({
            "prompt_token_ids": ids,
            "token_ids": out.token_ids,
            "text": out.content,
            "reasoning": out.reasoning,
            "finish_reason": out.finish_reason,
            "prompt_tokens": out.prompt_tokens,
            "completion_tokens": out.token_ids.len(),
            "prefill_tok_s": out.prefill_tok_s(),
            "decode_tok_s": out.decode_tok_s(),
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!();
        eprintln!(
            "prefill {} tokens at {:.1} tok/s, decode {} tokens at {:.1} tok/s ({:?})",
            out.prompt_tokens,
            out.prefill_tok_s(),
            out.token_ids.len(),
            out.decode_tok_s(),
            out.finish_reason
                .unwrap_or(wick::generate::FinishReason::Stop),
        );
    }
    Ok(())
}

fn logits(a: LogitsArgs) -> Result<()> {
    let mut rt = a.model.load()?;
    let (ids, _) = prompt_ids(&rt, &a.prompt, None, a.raw, a.no_think)?;
    let k = a.top.max(1);
    let mut rows = Vec::with_capacity(ids.len());
    rt.logits_all(&ids, &mut |_, row| {
        let mut idx: Vec<usize> = (0..row.len()).collect();
        let cmp = |x: &usize, y: &usize| row[*y].total_cmp(&row[*x]).then(x.cmp(y));
        if k < idx.len() {
            idx.select_nth_unstable_by(k, cmp);
            idx.truncate(k);
        }
        idx.sort_by(cmp);
        rows.push(idx.iter().map(|&i| (i as u32, row[i])).collect::<Vec<_>>());
    })?;
    if a.json {
        let positions: Vec<_> = rows
            .iter()
            .zip(&ids)
            .map(|(top, id)| {
                json!({
                    "token_id": id,
                    "top_ids": top.iter().map(|t| t.0).collect::<Vec<_>>(),
                    "top_logits": top.iter().map(|t| t.1).collect::<Vec<_>>(),
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::to_string(&json!({"prompt_token_ids": ids, "positions": positions}))?
        );
    } else {
        for (i, (top, id)) in rows.iter().zip(&ids).enumerate() {
            let shown: Vec<String> = top
                .iter()
                .map(|(t, l)| {
                    let s = rt.tokenizer().decode(&[*t], false).unwrap_or_default();
                    format!("{t} {s:?} {l:.4}")
                })
                .collect();
            println!("{i:5} [{id:6}] {}", shown.join(" | "));
        }
    }
    Ok(())
}

/// `wick info`: the CPU's kernel tier, the GPU adapters in `--adapter` order and the
/// `--device auto` choice.
fn info() -> Result<()> {
    use wick::backend::cpu::isa::Isa;
    let fences = wick::resources::Fences::detect();
    println!("limits: {fences}");
    println!(
        "cpu: {} threads, kernels {} (this CPU has: {}; WICK_ISA=<tier> forces a lower one)",
        fences.default_threads(),
        Isa::current(),
        Isa::supported()
            .iter()
            .map(|i| i.name())
            .collect::<Vec<_>>()
            .join(", ")
    );
    #[cfg(not(feature = "gpu"))]
    println!("gpu: {}\n--device auto: cpu", wick::runtime::NO_GPU);
    #[cfg(feature = "gpu")]
    gpu_info();
    Ok(())
}

/// `wick info`'s GPU part: the adapters and what `--device auto` picks.
#[cfg(feature = "gpu")]
fn gpu_info() {
    let adapters = wick::backend::wgpu::list_adapters();
    if adapters.is_empty() {
        println!(
            "no GPU adapter with compute shaders (on Linux: apt-get install mesa-vulkan-drivers)"
        );
    }
    let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
    for a in &adapters {
        println!("adapter {}: {}", a.index, a.name);
        println!("  backend      {}", a.backend);
        println!("  device type  {}", a.device_type);
        println!("  driver       {}", a.driver);
        println!(
            "  features     shader-f16: {}, subgroups: {}",
            if a.shader_f16 { "yes" } else { "no" },
            if a.subgroup { "yes" } else { "no" }
        );
        println!(
            "  limits       max_storage_buffer_binding_size {} ({:.0} MiB), max_buffer_size {} \
             ({:.0} MiB),",
            a.max_storage_buffer_binding_size,
            mib(a.max_storage_buffer_binding_size),
            a.max_buffer_size,
            mib(a.max_buffer_size)
        );
        println!(
            "               max_compute_workgroup_size_x {}, \
             max_compute_invocations_per_workgroup {}",
            a.max_compute_workgroup_size_x, a.max_compute_invocations_per_workgroup
        );
    }
    // The rule of `Runtime::from_checkpoint`: a hardware GPU if there is one, else the CPU
    // (a software rasterizer such as lavapipe is slower than the CPU backend).
    match adapters.iter().find(|a| a.is_hardware_gpu) {
        Some(_) => println!(
            "--device auto: gpu, adapter 0 ({})",
            adapters.first().map_or("", |a| a.name.as_str())
        ),
        None => println!(
            "--device auto: cpu (no hardware GPU; --device gpu runs on adapter 0{})",
            adapters
                .first()
                .map_or(String::new(), |a| format!(", {}", a.name))
        ),
    }
}

fn bench(a: BenchArgs) -> Result<()> {
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
    // Every GPU buffer wick holds after the run: weights, KV cache, activations.
    let gpu_memory = rt.gpu_stats().map(|g| g.memory_bytes);
    if a.json {
        let mut v = serde_json::to_value(&report)?;
        v["model"] = json!(rt.name());
        v["device"] = json!(rt.device());
        v["gpu_memory_bytes"] = json!(gpu_memory);
        v["cpu_isa"] = json!(wick::backend::cpu::isa::Isa::current().name());
        if let Some(bw) = bandwidth {
            v["memory_bandwidth_gb_s"] = json!(bw);
            v["tg_ceiling_tok_s"] = json!(bw * 1e9 / bytes as f64);
            v["tg_share_of_ceiling"] = json!(report.tg_gb_s.map(|gb| gb / bw));
        }
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!(
            "model {} on {}, {} KV cache",
            rt.name(),
            rt.device(),
            a.model.kv_cache_dtype
        );
        let at = if a.depth > 0 {
            format!(" @ d{}", a.depth)
        } else {
            String::new()
        };
        if let Some(pp) = report.pp_tok_s {
            println!("pp{}{at} {:8.1} tok/s", a.n_prompt, pp);
        }
        if let (Some(tg), Some(ms), Some(gb)) =
            (report.tg_tok_s, report.tg_ms_per_tok, report.tg_gb_s)
        {
            println!(
                "tg{}{at} {:8.1} tok/s  {:7.2} ms/tok  {:6.2} GB/s ({:.1} MB of weights per token)",
                a.n_gen,
                tg,
                ms,
                gb,
                bytes as f64 / 1e6
            );
        }
        if let (Some(bw), Some(gb)) = (bandwidth, report.tg_gb_s) {
            println!(
                "memory read bandwidth {bw:.2} GB/s ({} threads): tg ceiling {:.1} tok/s, \
                 tg runs at {:.0}% of it",
                a.model.threads,
                bw * 1e9 / bytes as f64,
                100.0 * gb / bw
            );
        }
        if let (Some(d), Some(r)) = (report.tg_dispatches_per_tok, report.tg_readbacks_per_tok) {
            println!(
                "gpu work per decoded token: {d:.1} dispatches, {r:.1} blocking read-back(s), \
                 {:.1} submit(s)",
                report.tg_submits_per_tok.unwrap_or(0.0)
            );
        }
        if let Some(m) = gpu_memory {
            println!(
                "gpu memory {:.1} MiB (every buffer wick created: weights, KV cache, activations)",
                m as f64 / (1 << 20) as f64
            );
        }
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
    // Every GPU buffer wick holds after the run: weights, KV cache, activations.
    let gpu_memory = rt.gpu_stats().map(|g| g.memory_bytes);
    if a.json {
        let mut v = serde_json::to_value(&report)?;
        v["model"] = json!(rt.name());
        v["device"] = json!(rt.device());
        v["gpu_memory_bytes"] = json!(gpu_memory);
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!("model {} on {}", rt.name(), rt.device());
    println!(
        "{n} requests, {} prompt tokens ({} shared), {} generated each",
        a.n_prompt, a.shared_prefix, a.n_gen
    );
    println!(
        "decode: 1 request {:.1} tok/s; {n} together {:.1} tok/s aggregate ({:.2}x); \
         end to end {:.1} tok/s",
        report.single_decode_tok_s,
        report.aggregate_decode_tok_s,
        report.speedup,
        report.end_to_end_tok_s
    );
    println!(
        "prefill: {} prompt tokens computed, {} reused from the prefix cache; {} preemptions",
        report.prefill_computed, report.prefill_reused, report.preemptions
    );
    if let Some(r) = report.min_shared_reused_after_first {
        println!(
            "shared prefix reused by every request after the first: at least {:.0}%",
            r * 100.0
        );
    }
    for (i, r) in report.requests.iter().enumerate() {
        println!(
            "  request {i}: {} cached, {} computed, ttft {:.0} ms",
            r.cached_tokens, r.computed_tokens, r.ttft_ms
        );
    }
    Ok(())
}

fn quantize(a: QuantizeArgs) -> Result<()> {
    let bar = std::io::stderr().is_terminal().then(|| {
        let b = indicatif::ProgressBar::new(0);
        b.set_style(
            indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} {msg}")
                .expect("valid template"),
        );
        b
    });
    let scheme = a.qtype.scheme();
    wick::convert::quantize_checkpoint(&a.input, &a.output, scheme, &mut |done, total, name| {
        if let Some(b) = &bar {
            b.set_length(total as u64);
            b.set_position(done as u64);
            b.set_message(name.to_string());
        }
    })
    .with_context(|| format!("quantizing {}", a.input.display()))?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let size = std::fs::metadata(&a.output).map(|m| m.len()).unwrap_or(0);
    eprintln!(
        "wrote {} ({scheme}, {:.1} MiB)",
        a.output.display(),
        size as f64 / (1 << 20) as f64
    );
    Ok(())
}

fn perplexity(a: PerplexityArgs) -> Result<()> {
    if a.kl_divergence {
        return kl_divergence(a);
    }
    let file = a.file.as_deref().expect("clap requires --file here");
    let ctx = a.ctx.unwrap_or(512);
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let mut rt = ModelArgs {
        max_model_len: a.model.max_model_len.max(ctx),
        ..a.model
    }
    .load()?;
    // The tokenizer's post-processor adds a BOS exactly when the model wants one.
    let tokens = rt.encode_raw(&text)?;
    let with_bos = rt.tokenizer().encode("", true)?;
    let bos = with_bos.first().copied();
    let json_out = a.json;
    let mut on_chunk = |i: usize, ppl: f64| {
        if !json_out {
            print!("[{}]{ppl:.4},", i + 1);
            let _ = std::io::stdout().flush();
        }
    };
    let runner = rt.runner()?;
    let report = match &a.kl_divergence_base {
        Some(base) => wick::perplexity::perplexity_writing_base(
            runner,
            &tokens,
            ctx,
            bos,
            base,
            &mut on_chunk,
        )?,
        None => wick::perplexity::perplexity(runner, &tokens, ctx, bos, &mut on_chunk)?,
    };
    if a.json {
        let v = json!({
            "ppl": report.ppl,
            "ppl_err": report.ppl_err,
            "chunks": report.chunks,
            "tokens": report.tokens,
            "ctx": ctx,
            "model": rt.name(),
            "kl_divergence_base": a.kl_divergence_base,
        });
        println!("{}", serde_json::to_string(&v)?);
    } else {
        println!();
        println!(
            "Final estimate: PPL = {:.4} +/- {:.5} ({} tokens, {} chunks of {})",
            report.ppl, report.ppl_err, report.tokens, report.chunks, ctx
        );
    }
    if let Some(base) = &a.kl_divergence_base {
        eprintln!(
            "wrote the distributions of {} scored tokens to {}",
            report.scored,
            base.display()
        );
    }
    Ok(())
}

/// `wick perplexity --kl-divergence`: the model against a base file, printed as
/// llama-perplexity prints it.
fn kl_divergence(a: PerplexityArgs) -> Result<()> {
    let path = a.kl_divergence_base.as_deref().expect("clap requires it");
    let base = wick::perplexity::KlBase::open(path)?;
    if let Some(ctx) = a.ctx.filter(|&c| c != base.ctx()) {
        return Err(wick::Error::InvalidRequest(format!(
            "{} was computed with --ctx {}, not {ctx}",
            path.display(),
            base.ctx()
        ))
        .into());
    }
    if a.file.is_some() {
        eprintln!(
            "note: --file is not read; the tokens come from {}",
            path.display()
        );
    }
    let (ctx, chunks) = (base.ctx(), base.chunks());
    let mut rt = ModelArgs {
        max_model_len: a.model.max_model_len.max(ctx),
        ..a.model
    }
    .load()?;
    let bos = rt.tokenizer().encode("", true)?.first().copied();
    let json_out = a.json;
    if !json_out {
        println!(
            "{}: {chunks} chunks of {ctx} tokens, vocabulary {}",
            path.display(),
            base.n_vocab()
        );
    }
    let r = wick::perplexity::kl_divergence(rt.runner()?, base, bos, &mut |i, s| {
        if !json_out {
            if i == 0 {
                println!(
                    "chunk  {:>21}  {:>23}  {:>23}  {:>19}  {:>19}",
                    "PPL", "ln(PPL(Q)/PPL(base))", "KL divergence", "RMS Δp", "same top p"
                );
            }
            println!(
                "{:>5}  {:>9.4} ± {:>9.4}  {:>10.5} ± {:>10.5}  {:>10.5} ± {:>10.5}  \
                 {:>6.3} ± {:>6.3} %  {:>6.3} ± {:>6.3} %",
                i + 1,
                s.ppl,
                s.ppl_err,
                s.ln_ppl_ratio,
                s.ln_ppl_ratio_err,
                s.mean_kld,
                s.kld_err,
                100.0 * s.rms_dp,
                100.0 * s.rms_dp_err,
                100.0 * s.same_top_p,
                100.0 * s.same_top_p_err
            );
        }
    })?;
    if json_out {
        let mut v = serde_json::to_value(&r)?;
        v["model"] = json!(rt.name());
        v["base"] = json!(path);
        println!("{}", serde_json::to_string(&v)?);
        return Ok(());
    }
    let s = &r.summary;
    let pct = |x: f64| 100.0 * x;
    println!();
    println!("Perplexity ({} tokens)", s.scored);
    println!("  PPL(Q)              {:>10.6} ± {:.6}", s.ppl, s.ppl_err);
    println!(
        "  PPL(base)           {:>10.6} ± {:.6}",
        s.base_ppl, s.base_ppl_err
    );
    println!("  correlation         {:>9.2} %", pct(s.ppl_cor));
    println!(
        "  ln(PPL(Q)/PPL(base)) {:>9.6} ± {:.6}",
        s.ln_ppl_ratio, s.ln_ppl_ratio_err
    );
    println!(
        "  PPL(Q)/PPL(base)    {:>10.6} ± {:.6}",
        s.ppl_ratio, s.ppl_ratio_err
    );
    println!(
        "  PPL(Q)-PPL(base)    {:>10.6} ± {:.6}",
        s.ppl_diff, s.ppl_diff_err
    );
    println!();
    println!("KL divergence");
    println!("  mean     {:>10.6} ± {:.6}", s.mean_kld, s.kld_err);
    let k = &r.kld_percentiles;
    for (name, v) in [
        ("max", k.max),
        ("99.9%", k.p99_9),
        ("99%", k.p99),
        ("95%", k.p95),
        ("90%", k.p90),
        ("median", k.median),
        ("10%", k.p10),
        ("5%", k.p5),
        ("1%", k.p1),
        ("0.1%", k.p0_1),
        ("min", k.min),
    ] {
        println!("  {name:<8} {v:>10.6}");
    }
    println!();
    println!("Probability of the next token, Δp = p(Q) - p(base)");
    println!(
        "  mean     {:>7.3} ± {:.3} %",
        pct(s.mean_dp),
        pct(s.dp_err)
    );
    let d = &r.dp_percentiles;
    for (name, v) in [
        ("max", d.max),
        ("99.9%", d.p99_9),
        ("99%", d.p99),
        ("95%", d.p95),
        ("90%", d.p90),
        ("75%", d.p75),
        ("median", d.median),
        ("25%", d.p25),
        ("10%", d.p10),
        ("5%", d.p5),
        ("1%", d.p1),
        ("0.1%", d.p0_1),
        ("min", d.min),
    ] {
        println!("  {name:<8} {:>7.3} %", pct(v));
    }
    println!(
        "  RMS      {:>7.3} ± {:.3} %",
        pct(s.rms_dp),
        pct(s.rms_dp_err)
    );
    println!(
        "Same top p: {:.3} ± {:.3} %",
        pct(s.same_top_p),
        pct(s.same_top_p_err)
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_read_as_vllm_reads_them() {
        for (s, n) in [
            ("8192", 8192),
            ("8k", 8000),
            ("8K", 8192),
            ("25.6k", 25600),
            ("1m", 1_000_000),
        ] {
            assert_eq!(parse_len(s), Ok(n), "{s}");
        }
        for s in ["auto", "-1", "0", "1.5", "k", "NaN", "8q"] {
            assert!(parse_len(s).is_err(), "{s}");
        }
    }

    #[test]
    fn kv_cache_dtypes_as_vllm_spells_them() {
        assert_eq!(parse_kv_dtype("auto"), Ok(KvDtype::F16));
        assert_eq!(parse_kv_dtype("f32"), Ok(KvDtype::F32));
        assert!(parse_kv_dtype("fp8_e4m3")
            .unwrap_err()
            .contains("f16 or f32"));
    }
}
