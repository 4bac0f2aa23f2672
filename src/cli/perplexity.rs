//! `wick perplexity`: perplexity over a text file (llama.cpp's method), and with
//! `--kl-divergence`, the model against a base file of stored distributions.

use std::io::Write;

use anyhow::{Context, Result};
use clap::Args;
use serde_json::json;

use crate::ModelArgs;

#[derive(Args)]
pub(crate) struct PerplexityArgs {
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

/// `wick perplexity`.
pub(crate) fn perplexity(a: PerplexityArgs) -> Result<()> {
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
        println!("{report}");
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
    let ctx = base.ctx();
    let mut rt = ModelArgs {
        max_model_len: a.model.max_model_len.max(ctx),
        ..a.model
    }
    .load()?;
    let bos = rt.tokenizer().encode("", true)?.first().copied();
    let json_out = a.json;
    if !json_out {
        println!("{base}");
    }
    let r = wick::perplexity::kl_divergence(rt.runner()?, base, bos, &mut |i, s| {
        if !json_out {
            if i == 0 {
                println!("{}", wick::perplexity::KlProgress::header());
            }
            let row = wick::perplexity::KlProgress {
                chunk: i,
                summary: s,
            };
            println!("{row}");
        }
    })?;
    if json_out {
        let mut v = serde_json::to_value(&r)?;
        v["model"] = json!(rt.name());
        v["base"] = json!(path);
        println!("{}", serde_json::to_string(&v)?);
        return Ok(());
    }
    println!();
    println!("{r}");
    Ok(())
}
