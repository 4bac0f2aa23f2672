//! An interactive multi-turn chat in the terminal.
//!
//! ```text
//! cargo run --release --example chat -- --model Qwen/Qwen3-0.6B
//! ```
//!
//! Commands: `/think` and `/no_think` turn Qwen3's thinking on or off (thinking is shown in
//! grey), `/reset` starts a new conversation, `/exit` quits. Ctrl-C stops the reply being
//! generated, not the program. Each turn reuses the KV cache of the conversation so far: only
//! the tokens that differ from the cached ones are computed.

use std::io::{BufRead, IsTerminal, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Result;
use clap::Parser;
use serde_json::json;
use wick::loader::hub::HubOptions;
use wick::runtime::{Device, Runtime, RuntimeOptions};

#[derive(Parser)]
#[command(about = "Chat with a Qwen3 model")]
struct Args {
    /// A local model directory, a .gguf file, or a Hub id such as Qwen/Qwen3-0.6B.
    #[arg(long, short)]
    model: String,
    /// auto, cpu or gpu.
    #[arg(long, default_value = "auto")]
    device: String,
    /// CPU threads (default: one per core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// A system message.
    #[arg(long)]
    system: Option<String>,
    /// Start with thinking off.
    #[arg(long)]
    no_think: bool,
    /// Most tokens per reply.
    #[arg(long, default_value_t = 2048)]
    max_tokens: usize,
    /// Sampling temperature (default from the model's generation_config.json; 0 = greedy).
    #[arg(long)]
    temperature: Option<f32>,
    /// Use the Hugging Face cache only.
    #[arg(long)]
    offline: bool,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let device = match args.device.as_str() {
        "cpu" => Device::Cpu,
        "gpu" => Device::Gpu,
        "auto" => Device::Auto,
        other => anyhow::bail!("--device must be auto, cpu or gpu, not {other}"),
    };
    let opts = RuntimeOptions {
        device,
        threads: args.threads,
        hub: HubOptions {
            offline: args.offline,
            ..HubOptions::default()
        },
        ..RuntimeOptions::default()
    };
    let mut rt = Runtime::load(&args.model, &opts)?;
    eprintln!(
        "{} on {}. /think, /no_think, /reset, /exit; Ctrl-C stops a reply.",
        rt.name(),
        rt.device()
    );

    let mut chat = rt.chat_options();
    chat.enable_thinking = !args.no_think;
    chat.params.max_tokens = args.max_tokens;
    if let Some(t) = args.temperature {
        chat.params.temperature = t;
    }

    let cancel = Arc::new(AtomicBool::new(false));
    let c = cancel.clone();
    ctrlc::set_handler(move || c.store(true, Ordering::Relaxed))?;

    let system: Vec<_> = args
        .system
        .iter()
        .map(|s| json!({"role": "system", "content": s}))
        .collect();
    let mut messages = system.clone();
    let grey = std::io::stdout().is_terminal();
    let stdin = std::io::stdin();
    let mut line = String::new();
    loop {
        print!("> ");
        std::io::stdout().flush()?;
        line.clear();
        cancel.store(false, Ordering::Relaxed);
        if stdin.lock().read_line(&mut line)? == 0 {
            break;
        }
        let input = line.trim();
        match input {
            "" => continue,
            "/exit" | "/quit" => break,
            "/think" | "/no_think" => {
                chat.enable_thinking = input == "/think";
                eprintln!(
                    "thinking {}",
                    if chat.enable_thinking { "on" } else { "off" }
                );
                continue;
            }
            "/reset" => {
                messages = system.clone();
                rt.reset();
                eprintln!("new conversation");
                continue;
            }
            _ => {}
        }
        messages.push(json!({"role": "user", "content": input}));
        let mut in_thought = false;
        let out = rt.chat(&messages, &chat, &cancel, &mut |ev| {
            let mut stdout = std::io::stdout();
            if !ev.delta.reasoning.is_empty() {
                if grey && !in_thought {
                    let _ = write!(stdout, "\x1b[90m");
                }
                in_thought = true;
                let _ = write!(stdout, "{}", ev.delta.reasoning);
            }
            if !ev.delta.content.is_empty() {
                if in_thought {
                    let _ = write!(stdout, "{}", if grey { "\x1b[0m\n" } else { "\n" });
                    in_thought = false;
                }
                let _ = write!(stdout, "{}", ev.delta.content);
            }
            let _ = stdout.flush();
        });
        if grey && in_thought {
            print!("\x1b[0m");
        }
        println!();
        match out {
            Ok(out) => {
                eprintln!(
                    "[{} prompt tokens, {} reused from cache; {} generated; {:.1} tok/s prefill, {:.1} tok/s decode{}]",
                    out.prompt_tokens,
                    out.cached_tokens,
                    out.token_ids.len(),
                    out.prefill_tok_s(),
                    out.decode_tok_s(),
                    if cancel.load(Ordering::Relaxed) { ", stopped" } else { "" },
                );
                // The template re-renders earlier answers without their thinking.
                messages.push(json!({"role": "assistant", "content": out.content}));
            }
            Err(e) => {
                eprintln!("error: {e}");
                messages.pop();
            }
        }
    }
    Ok(())
}
