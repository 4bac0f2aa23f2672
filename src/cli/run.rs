//! `wick run` and `wick logits`: one prompt through the model, its reply streamed or its
//! logits printed.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Result;
use clap::Args;
use serde_json::json;

use wick::generate::prompt_opens_reasoning;
use wick::runtime::Runtime;
use wick::text::chat_template::RenderOptions;

use crate::ModelArgs;

#[derive(Args)]
pub(crate) struct RunArgs {
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
pub(crate) struct LogitsArgs {
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

/// `wick run`: one reply, streamed (thinking to stderr, the answer to stdout).
pub(crate) fn run(a: RunArgs) -> Result<()> {
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

/// `wick logits`: the largest logits at every prompt position.
pub(crate) fn logits(a: LogitsArgs) -> Result<()> {
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
