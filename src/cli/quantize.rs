//! `wick quantize`: a Hugging Face checkpoint directory into a GGUF file (like
//! llama-quantize).

use std::io::IsTerminal;

use anyhow::{Context, Result};
use clap::Args;

use crate::QuantArg;

#[derive(Args)]
pub(crate) struct QuantizeArgs {
    /// The Hugging Face checkpoint directory (config.json, *.safetensors, tokenizer.json).
    input: std::path::PathBuf,
    /// The GGUF file to write.
    output: std::path::PathBuf,
    /// The quantization mix: q8_0, q4_0 or q4_k_m.
    #[arg(long = "type", value_enum)]
    qtype: QuantArg,
}

/// `wick quantize`.
pub(crate) fn quantize(a: QuantizeArgs) -> Result<()> {
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
    eprintln!("{}", wick::convert::QuantizedFile::stat(&a.output, scheme));
    Ok(())
}
