//! Perplexity over a text, computed the way llama.cpp's `llama-perplexity` does, so the two
//! numbers can be compared directly.
//!
//! The whole text is tokenized once (a BOS only if the model's tokenizer adds one), cut into
//! chunks of `ctx` tokens (the remainder is dropped), and each chunk is run from an empty
//! cache. Only the second half of each chunk is scored: the logits at positions
//! `ctx/2 .. ctx-2` predict tokens `ctx/2+1 .. ctx-1`, so every scored token has at least
//! `ctx/2` tokens of context. When the tokenizer adds a BOS, the first token of every chunk
//! is replaced by it, as llama.cpp does.
//!
//! The ± figure is llama.cpp's: the standard error of the mean negative log-likelihood,
//! scaled by the perplexity.

use crate::error::{Error, Result};
use crate::generate::SequenceRunner;

/// The outcome of a perplexity run.
#[derive(Clone, Debug, serde::Serialize)]
pub struct PerplexityReport {
    /// The final perplexity.
    pub ppl: f64,
    /// Its uncertainty (standard error of the mean NLL, times `ppl`).
    pub ppl_err: f64,
    /// Chunks evaluated.
    pub chunks: usize,
    /// Tokens in the tokenized text.
    pub tokens: usize,
    /// Tokens scored.
    pub scored: usize,
    /// Running perplexity after each chunk.
    pub running: Vec<f64>,
}

/// Scores `tokens` in chunks of `ctx` on `runner`; `on_chunk(i, running_ppl)` after each.
/// `bos` is the id to put first in every chunk when the tokenizer adds one.
///
/// Errors if the text holds fewer than two chunks or `ctx` is below 4.
pub fn perplexity(
    runner: &mut dyn SequenceRunner,
    tokens: &[u32],
    ctx: usize,
    bos: Option<u32>,
    on_chunk: &mut dyn FnMut(usize, f64),
) -> Result<PerplexityReport> {
    if ctx < 4 {
        return Err(Error::InvalidRequest(format!("context {ctx} is too small")));
    }
    // llama.cpp refuses texts shorter than two chunks; so does this, to stay comparable.
    let n_chunks = tokens.len() / ctx;
    if n_chunks < 2 {
        return Err(Error::InvalidRequest(format!(
            "the text has {} tokens; at least 2 × {ctx} are needed",
            tokens.len()
        )));
    }
    let first = ctx / 2;
    let (mut nll, mut nll2, mut count) = (0f64, 0f64, 0usize);
    let mut running = Vec::with_capacity(n_chunks);
    let mut chunk = vec![0u32; ctx];
    for c in 0..n_chunks {
        chunk.copy_from_slice(&tokens[c * ctx..(c + 1) * ctx]);
        if let Some(b) = bos {
            chunk[0] = b;
        }
        runner.reset();
        let mut row_err = None;
        runner.extend_all(&chunk, &mut |i, row| {
            if i < first || i + 1 >= ctx {
                return;
            }
            let target = chunk[i + 1] as usize;
            match neg_log_softmax(row, target) {
                Some(v) => {
                    nll += v;
                    nll2 += v * v;
                    count += 1;
                }
                None => row_err = Some(target),
            }
        })?;
        runner.reset();
        if let Some(t) = row_err {
            return Err(Error::InvalidRequest(format!(
                "token {t} is outside the model's vocabulary"
            )));
        }
        let ppl = (nll / count as f64).exp();
        running.push(ppl);
        on_chunk(c, ppl);
    }
    let mean = nll / count as f64;
    let ppl = mean.exp();
    let var = nll2 / count as f64 - mean * mean;
    let ppl_err = if var > 0.0 && count > 1 {
        (var / (count - 1) as f64).sqrt() * ppl
    } else {
        0.0
    };
    Ok(PerplexityReport {
        ppl,
        ppl_err,
        chunks: n_chunks,
        tokens: tokens.len(),
        scored: count,
        running,
    })
}

/// `-log softmax(logits)[target]`, with llama.cpp's precision: the maximum subtracted in
/// f32, the sum of exponentials accumulated in f64.
fn neg_log_softmax(logits: &[f32], target: usize) -> Option<f64> {
    let t = *logits.get(target)?;
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&l| ((l - max).exp()) as f64).sum();
    Some(-((t - max) as f64 - sum.ln()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniform_logits_give_vocabulary_size() {
        let v = neg_log_softmax(&[0.5; 100], 3).unwrap();
        assert!((v.exp() - 100.0).abs() < 1e-6);
        assert_eq!(neg_log_softmax(&[0.0; 4], 4), None);
    }
}
