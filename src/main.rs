//! `wick`: the command-line interface, a thin layer over the library.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use serde_json::json;

use wick::chat_template::RenderOptions;
use wick::generate::prompt_opens_reasoning;
use wick::loader::hub::HubOptions;
use wick::runtime::{Device, Runtime, RuntimeOptions};

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
    /// Print JSON.
    #[arg(long)]
    json: bool,
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
    Auto,
    Cpu,
    Gpu,
}

/// Options every command that loads a model shares.
#[derive(Args)]
struct ModelArgs {
    /// A local model directory, a .gguf file, or a Hub id such as Qwen/Qwen3-0.6B.
    #[arg(long, short)]
    model: String,
    /// Where to run: a GPU if usable (auto), the CPU, or a GPU or fail.
    #[arg(long, value_enum, default_value = "auto")]
    device: DeviceArg,
    /// CPU threads (default: one per core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Never touch the network; use the Hugging Face cache only.
    #[arg(long)]
    offline: bool,
    /// Longest sequence (prompt + reply) to hold in the KV cache.
    #[arg(long, default_value_t = 8192)]
    max_model_len: usize,
}

impl ModelArgs {
    fn load(&self) -> Result<Runtime> {
        let opts = RuntimeOptions {
            device: match self.device {
                DeviceArg::Auto => Device::Auto,
                DeviceArg::Cpu => Device::Cpu,
                DeviceArg::Gpu => Device::Gpu,
            },
            threads: self.threads,
            max_model_len: self.max_model_len,
            hub: HubOptions {
                offline: self.offline,
                ..HubOptions::default()
            },
            ..RuntimeOptions::default()
        };
        let rt =
            Runtime::load(&self.model, &opts).with_context(|| format!("loading {}", self.model))?;
        eprintln!("wick: {} on {}", rt.name(), rt.device());
        Ok(rt)
    }
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
    match Cli::parse().command {
        Command::Run(a) => run(a),
        Command::Logits(a) => logits(a),
        Command::Bench(a) => bench(a),
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
    params.max_tokens = a.max_tokens;
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

fn bench(a: BenchArgs) -> Result<()> {
    let max_len = a.model.max_model_len.max(a.n_prompt.max(a.n_gen) + 1);
    let mut rt = ModelArgs {
        max_model_len: max_len,
        ..a.model
    }
    .load()?;
    let opts = wick::bench::BenchOptions {
        n_prompt: a.n_prompt,
        n_gen: a.n_gen,
        repetitions: a.repetitions.max(1),
    };
    let vocab = rt.config().vocab_size;
    let bytes = rt.weight_bytes_per_token();
    let report = wick::bench::run(rt.runner(), vocab, bytes, &opts)?;
    if a.json {
        let mut v = serde_json::to_value(&report)?;
        v["model"] = json!(rt.name());
        v["device"] = json!(rt.device());
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("model {} on {}", rt.name(), rt.device());
        if let Some(pp) = report.pp_tok_s {
            println!("pp{:<5} {:8.1} tok/s", a.n_prompt, pp);
        }
        if let (Some(tg), Some(ms), Some(gb)) = (report.tg_tok_s, report.tg_ms_per_tok, report.tg_gb_s) {
            println!(
                "tg{:<5} {:8.1} tok/s  {:7.2} ms/tok  {:6.2} GB/s ({:.1} MB of weights per token)",
                a.n_gen,
                tg,
                ms,
                gb,
                bytes as f64 / 1e6
            );
        }
    }
    Ok(())
}
