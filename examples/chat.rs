//! An interactive multi-turn chat in the terminal.
//!
//! ```text
//! cargo run --release --example chat -- --model Qwen/Qwen3-0.6B
//! ```
//!
//! Commands: `/think` and `/no_think` turn Qwen3's thinking on or off (thinking is shown in
//! grey), `/reset` starts a new conversation, `/exit` quits. Ctrl-C stops the reply being
//! generated, not the program. The chat runs on wick's serving engine, whose prefix cache
//! keeps the conversation so far: each turn computes only the new message (after a reply,
//! the engine caches the conversation the way the template renders it on the next turn).

use std::io::{BufRead, IsTerminal, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Result;
use clap::Parser;
use serde_json::json;
use wick::engine::{EngineEvent, EngineOptions, Prompt, Request};
use wick::loader::hub::HubOptions;
use wick::runtime::{Device, Runtime, RuntimeOptions};
use wick::text::chat_template::RenderOptions;

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
    let rt = Runtime::load(&args.model, &opts)?;
    let engine = rt.start_engine(&EngineOptions {
        max_num_seqs: 1,
        ..EngineOptions::default()
    })?;
    eprintln!(
        "{} on {}. /think, /no_think, /reset, /exit; Ctrl-C stops a reply.",
        rt.name(),
        rt.device()
    );

    let mut chat = rt.chat_options();
    chat.enable_thinking = !args.no_think;
    chat.params.max_tokens = Some(args.max_tokens);
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
                eprintln!("new conversation");
                continue;
            }
            _ => {}
        }
        messages.push(json!({"role": "user", "content": input}));
        let mut in_thought = false;
        let request = Request {
            prompt: Prompt::Chat {
                messages: messages.clone(),
                render: RenderOptions {
                    enable_thinking: Some(chat.enable_thinking),
                    ..RenderOptions::default()
                },
            },
            params: chat.params.clone(),
        };
        let out = engine.submit(request).and_then(|stream| {
            let stop = stream.cancel_handle();
            let c = cancel.clone();
            // Ctrl-C sets `cancel`; pass it on to the engine.
            let watcher = std::thread::spawn(move || loop {
                if c.load(Ordering::Relaxed) {
                    stop.store(true, Ordering::Relaxed);
                }
                if Arc::strong_count(&stop) == 1 {
                    return;
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            });
            let r = stream.wait(|ev| {
                let EngineEvent::Delta {
                    reasoning, content, ..
                } = ev
                else {
                    return;
                };
                let mut stdout = std::io::stdout();
                if !reasoning.is_empty() {
                    if grey && !in_thought {
                        let _ = write!(stdout, "\x1b[90m");
                    }
                    in_thought = true;
                    let _ = write!(stdout, "{reasoning}");
                }
                if !content.is_empty() {
                    if in_thought {
                        let _ = write!(stdout, "{}", if grey { "\x1b[0m\n" } else { "\n" });
                        in_thought = false;
                    }
                    let _ = write!(stdout, "{content}");
                }
                let _ = stdout.flush();
            });
            let _ = watcher.join();
            r
        });
        if grey && in_thought {
            print!("\x1b[0m");
        }
        println!();
        match out {
            Ok(out) => {
                let u = out.usage;
                let decode = out.total_time.saturating_sub(out.time_to_first_token);
                eprintln!(
                    "[{} prompt tokens, {} reused from cache; {} generated; first token after \
                     {:.0} ms, {:.1} tok/s decode{}]",
                    u.prompt_tokens,
                    u.cached_tokens,
                    u.completion_tokens,
                    out.time_to_first_token.as_secs_f64() * 1e3,
                    u.completion_tokens.saturating_sub(1) as f64 / decode.as_secs_f64().max(1e-9),
                    if cancel.load(Ordering::Relaxed) {
                        ", stopped"
                    } else {
                        ""
                    },
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
