//! Perplexity over a text, and the KL divergence of a model's predictions from a reference
//! run, computed the way llama.cpp's `llama-perplexity` does, so the numbers (and the files)
//! can be compared directly.
//!
//! # Perplexity
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
//!
//! # KL divergence against a base
//!
//! [`perplexity_writing_base`] scores a text like [`perplexity`] and also stores, for every
//! scored position, the whole predicted distribution (the "base": typically a float32 run,
//! or the unquantized model). [`kl_divergence`] then runs another model (or the same one
//! with cheaper arithmetic) on the base's own tokens, with the same chunks, and compares
//! position by position: the mean KL divergence `Σ p_base · (log p_base − log p)` with its
//! distribution, how often both put the same token on top, the change Δp of the probability
//! of the token that actually follows, and both perplexities with their ratio. The
//! uncertainties are llama.cpp's (standard errors of the means, the two perplexities'
//! covariance taken into account for their ratio).
//!
//! # The base file
//!
//! The format is `llama-perplexity --kl-divergence-base`'s, so either program can compare
//! against a file the other wrote. Numbers are little-endian (llama.cpp writes them in
//! memory order, which is little-endian on every machine it supports):
//!
//! | bytes | what |
//! |---|---|
//! | 8 | the ASCII magic `_logits_` |
//! | 4 | `n_ctx`, u32: tokens per chunk |
//! | 4 | `n_vocab`, i32: entries in each distribution |
//! | 4 | `n_chunk`, i32: chunks |
//! | 4 · `n_ctx` · `n_chunk` | the chunks' token ids, i32, as tokenized (no BOS put in) |
//! | 2 · `nv` per row | one row per scored position, chunk after chunk, `n_ctx − 1 − n_ctx/2` rows each |
//!
//! A row is `nv = n_vocab + 4` u16 words, plus one if `n_vocab` is odd: the first four hold
//! two f32, `scale` and `min_log_prob`; then one u16 `q[v]` per token (then a zero word of
//! padding if needed), and `log p(v) ≈ min_log_prob + scale · q[v]`. The writer maps the
//! logits linearly onto 0..=65535: the largest logit to 65535, the smallest to 0, but no
//! lower than 16 below the largest (less likely tokens all land on 0, and a reader ignores
//! entries whose log-probability is −16 or below); `q` is rounded to nearest, ties to even.
//! The step is at most 16/65535 nats, so each stored log-probability is off by at most
//! half that, and a model compared with its own base shows per-token KL divergences of
//! either sign within ±1.3e-4 ([`SELF_KLD_BOUND`]), whose mean tends to 0. The floor also
//! means that PPL(base) read back from a file can be a little lower than the perplexity of
//! the run that wrote it: a scored token more than 16 nats below the top one counts as if
//! it were on the floor.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::session::SequenceRunner;

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
    /// Tokens per chunk.
    pub ctx: usize,
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
    score_text(runner, tokens, ctx, bos, None, on_chunk)
}

/// [`perplexity`], also writing the predicted distribution at every scored position to the
/// base file `base` (format in the module doc) for [`kl_divergence`] or llama.cpp's
/// `--kl-divergence` to compare against. On error the partial file is removed.
pub fn perplexity_writing_base(
    runner: &mut dyn SequenceRunner,
    tokens: &[u32],
    ctx: usize,
    bos: Option<u32>,
    base: &Path,
    on_chunk: &mut dyn FnMut(usize, f64),
) -> Result<PerplexityReport> {
    let chunks = check_text(tokens, ctx)?;
    let file = File::create(base).map_err(|e| Error::io(base, e))?;
    let mut writer = BaseWriter {
        path: base.to_path_buf(),
        out: BufWriter::new(file),
        ctx,
        tokens: tokens[..chunks * ctx].to_vec(),
        n_vocab: None,
        row: Vec::new(),
    };
    let scored = score_text(runner, tokens, ctx, bos, Some(&mut writer), on_chunk)
        .and_then(|report| writer.finish().map(|()| report));
    if scored.is_err() {
        let _ = std::fs::remove_file(base);
    }
    scored
}

/// The number of whole chunks in `tokens`, or why they cannot be scored.
fn check_text(tokens: &[u32], ctx: usize) -> Result<usize> {
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
    Ok(n_chunks)
}

/// The perplexity loop; every scored row also goes to `base` when given.
fn score_text(
    runner: &mut dyn SequenceRunner,
    tokens: &[u32],
    ctx: usize,
    bos: Option<u32>,
    mut base: Option<&mut BaseWriter>,
    on_chunk: &mut dyn FnMut(usize, f64),
) -> Result<PerplexityReport> {
    let n_chunks = check_text(tokens, ctx)?;
    let (mut nll, mut nll2, mut count) = (0f64, 0f64, 0usize);
    let mut running = Vec::with_capacity(n_chunks);
    let mut input = Vec::with_capacity(ctx);
    for c in 0..n_chunks {
        let chunk = &tokens[c * ctx..(c + 1) * ctx];
        score_chunk(runner, chunk, bos, &mut input, &mut |_, row, target| {
            let v = neg_log_softmax(row, target as usize).ok_or_else(|| {
                Error::InvalidRequest(format!("token {target} is outside the model's vocabulary"))
            })?;
            nll += v;
            nll2 += v * v;
            count += 1;
            match base.as_deref_mut() {
                Some(w) => w.write_row(row),
                None => Ok(()),
            }
        })?;
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
        ctx,
        running,
    })
}

/// What [`score_chunk`] hands each scored position to: `(j, logits [V], target)`.
type ScoredRow<'a> = dyn FnMut(usize, &[f32], u32) -> Result<()> + 'a;

/// Runs one chunk from an empty cache and hands every scored position to
/// `on_row(j, logits [V], target)`: position `ctx/2 + j` predicting `target`, for `j` in
/// `0 .. ctx-1-ctx/2`. The first error of `on_row` ends the scoring and is returned.
/// `input` is scratch for the chunk as the model sees it (BOS put in).
fn score_chunk(
    runner: &mut dyn SequenceRunner,
    chunk: &[u32],
    bos: Option<u32>,
    input: &mut Vec<u32>,
    on_row: &mut ScoredRow<'_>,
) -> Result<()> {
    let ctx = chunk.len();
    let first = ctx / 2;
    input.clear();
    input.extend_from_slice(chunk);
    if let Some(b) = bos {
        input[0] = b;
    }
    let mut failed = None;
    runner.reset();
    let ran = runner.extend_all(input, &mut |i, row| {
        if failed.is_some() || i < first || i + 1 >= ctx {
            return;
        }
        if let Err(e) = on_row(i - first, row, chunk[i + 1]) {
            failed = Some(e);
        }
    });
    runner.reset();
    ran?;
    failed.map_or(Ok(()), Err)
}

/// `-log softmax(logits)[target]`, with llama.cpp's precision: the maximum subtracted in
/// f32, the sum of exponentials accumulated in f64.
fn neg_log_softmax(logits: &[f32], target: usize) -> Option<f64> {
    let t = *logits.get(target)?;
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&l| ((l - max).exp()) as f64).sum();
    Some(-((t - max) as f64 - sum.ln()))
}

/// The magic that opens a base file.
const MAGIC: &[u8; 8] = b"_logits_";
/// Bytes before the token ids: magic, `n_ctx`, `n_vocab`, `n_chunk`.
const HEADER_BYTES: u64 = 20;
/// The most a per-token KL divergence of a model from its own base can be off 0: half the
/// largest step of the stored log-probabilities, 16/65535/2, as the rounding errors `δ` enter
/// the sum `Σ p_base · δ` weighted by probabilities that add up to 1.
pub const SELF_KLD_BOUND: f64 = 1.3e-4;
/// Log-probabilities at or below this are not stored apart (they all map to `q = 0`) and
/// are left out of the KL sum.
const LOG_PROB_FLOOR: f32 = -16.0;

/// u16 words in one row of a base file with `n_vocab` entries: two f32, then the entries
/// padded to an even count.
fn row_words(n_vocab: usize) -> usize {
    n_vocab.div_ceil(2) * 2 + 4
}

/// Writes a base file as the perplexity loop produces rows. The header is written with the
/// first row, whose length is the vocabulary size.
struct BaseWriter {
    path: PathBuf,
    out: BufWriter<File>,
    ctx: usize,
    /// The tokens of the scored chunks, written into the header.
    tokens: Vec<u32>,
    /// Set once the header is written.
    n_vocab: Option<usize>,
    /// One encoded row (`2 · nv` bytes).
    row: Vec<u8>,
}

impl BaseWriter {
    fn write_row(&mut self, logits: &[f32]) -> Result<()> {
        let n_vocab = match self.n_vocab {
            Some(n) => n,
            None => {
                self.write_header(logits.len())?;
                logits.len()
            }
        };
        assert_eq!(logits.len(), n_vocab, "rows of one model differ in length");
        self.row.resize(2 * row_words(n_vocab), 0);
        encode_row(logits, &mut self.row);
        self.out
            .write_all(&self.row)
            .map_err(|e| Error::io(&self.path, e))
    }

    fn write_header(&mut self, n_vocab: usize) -> Result<()> {
        let too_big =
            |what: &str| Error::InvalidRequest(format!("{what} does not fit a base file"));
        let ctx = u32::try_from(self.ctx).map_err(|_| too_big("the context"))?;
        let vocab = i32::try_from(n_vocab).map_err(|_| too_big("the vocabulary"))?;
        let chunks =
            i32::try_from(self.tokens.len() / self.ctx).map_err(|_| too_big("the text"))?;
        let mut header = Vec::with_capacity(HEADER_BYTES as usize + 4 * self.tokens.len());
        header.extend_from_slice(MAGIC);
        header.extend_from_slice(&ctx.to_le_bytes());
        header.extend_from_slice(&vocab.to_le_bytes());
        header.extend_from_slice(&chunks.to_le_bytes());
        for &t in &self.tokens {
            header.extend_from_slice(&t.to_le_bytes());
        }
        self.n_vocab = Some(n_vocab);
        self.out
            .write_all(&header)
            .map_err(|e| Error::io(&self.path, e))
    }

    fn finish(mut self) -> Result<()> {
        self.out.flush().map_err(|e| Error::io(&self.path, e))?;
        self.out
            .get_ref()
            .sync_all()
            .map_err(|e| Error::io(&self.path, e))
    }
}

/// Encodes one distribution into a row (`out`: `2 · row_words(V)` bytes), with llama.cpp's
/// arithmetic so both programs write the same bytes for the same logits: f32 throughout
/// except the sum of exponentials (f64).
fn encode_row(logits: &[f32], out: &mut [u8]) {
    let mut max = logits[0];
    let mut min = logits[0];
    for &l in &logits[1..] {
        max = max.max(l);
        min = min.min(l);
    }
    let min = min.max(max + LOG_PROB_FLOOR);
    let sum: f64 = logits.iter().map(|&l| (l - max).exp() as f64).sum();
    let log_sum = sum.ln() as f32;
    let min_log_prob = min - max - log_sum;
    let scale = (max - min) / 65535.0;
    out[0..4].copy_from_slice(&scale.to_le_bytes());
    out[4..8].copy_from_slice(&min_log_prob.to_le_bytes());
    let (words, padding) = out[8..].split_at_mut(2 * logits.len());
    padding.fill(0);
    if scale == 0.0 {
        // All logits equal: every q is 0 and min_log_prob alone is the log-probability.
        words.fill(0);
        return;
    }
    let inv_scale = 1.0 / scale;
    for (w, &l) in words.chunks_exact_mut(2).zip(logits) {
        let q = if l > min {
            // At most 65535 plus rounding error; `as` saturates.
            (inv_scale * (l - min)).round_ties_even() as u16
        } else {
            0
        };
        w.copy_from_slice(&q.to_le_bytes());
    }
}

/// An `InvalidData` I/O error for a malformed base file.
fn malformed(path: &Path, message: String) -> Error {
    Error::io(
        path,
        std::io::Error::new(std::io::ErrorKind::InvalidData, message),
    )
}

/// A base file opened for [`kl_divergence`]: its header and tokens read and checked, the
/// rows still on disk.
pub struct KlBase {
    path: PathBuf,
    ctx: usize,
    n_vocab: usize,
    tokens: Vec<u32>,
    rows: BufReader<File>,
}

impl KlBase {
    /// Opens a base file written by [`perplexity_writing_base`] or by
    /// `llama-perplexity --kl-divergence-base`. Checks the magic, that the header's sizes are
    /// sane, that the file is exactly as long as they say, and that every token id is inside
    /// the vocabulary.
    pub fn open(path: impl AsRef<Path>) -> Result<KlBase> {
        let path = path.as_ref();
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        let mut rows = BufReader::new(file);
        let not_base = || {
            malformed(
                path,
                "not a log-probability file (`--kl-divergence-base` writes them)".into(),
            )
        };
        if len < HEADER_BYTES {
            return Err(not_base());
        }
        let mut header = [0u8; HEADER_BYTES as usize];
        rows.read_exact(&mut header)
            .map_err(|e| Error::io(path, e))?;
        if &header[..8] != MAGIC {
            return Err(not_base());
        }
        let word = |at: usize| <[u8; 4]>::try_from(&header[at..at + 4]).expect("4 bytes");
        let ctx = u32::from_le_bytes(word(8));
        let n_vocab = i32::from_le_bytes(word(12));
        let n_chunk = i32::from_le_bytes(word(16));
        if ctx < 4 || n_vocab < 1 || n_chunk < 1 {
            return Err(malformed(
                path,
                format!("impossible header: n_ctx {ctx}, n_vocab {n_vocab}, n_chunk {n_chunk}"),
            ));
        }
        let (ctx, n_vocab, n_chunk) = (ctx as u64, n_vocab as u64, n_chunk as u64);
        let rows_per_chunk = ctx - 1 - ctx / 2;
        let want = n_chunk
            .checked_mul(ctx)
            .and_then(|t| t.checked_mul(4))
            .and_then(|tok_bytes| {
                let row_bytes = 2 * row_words(n_vocab as usize) as u64;
                n_chunk
                    .checked_mul(rows_per_chunk)?
                    .checked_mul(row_bytes)?
                    .checked_add(tok_bytes)?
                    .checked_add(HEADER_BYTES)
            })
            .ok_or_else(|| malformed(path, "impossible header: sizes overflow".into()))?;
        if len != want {
            let what = if len < want { "truncated" } else { "corrupt" };
            return Err(malformed(
                path,
                format!(
                    "{what}: {n_chunk} chunks of {ctx} tokens with a vocabulary of {n_vocab} \
                     take {want} bytes, the file has {len}"
                ),
            ));
        }
        let mut raw = vec![0u8; (4 * ctx * n_chunk) as usize];
        rows.read_exact(&mut raw).map_err(|e| Error::io(path, e))?;
        let mut tokens = Vec::with_capacity(raw.len() / 4);
        for (i, b) in raw.chunks_exact(4).enumerate() {
            let t = i32::from_le_bytes(b.try_into().expect("4 bytes"));
            if t < 0 || t as u64 >= n_vocab {
                return Err(malformed(
                    path,
                    format!("token {i} has id {t}, outside the vocabulary of {n_vocab}"),
                ));
            }
            tokens.push(t as u32);
        }
        Ok(KlBase {
            path: path.to_path_buf(),
            ctx: ctx as usize,
            n_vocab: n_vocab as usize,
            tokens,
            rows,
        })
    }

    /// Tokens per chunk.
    pub fn ctx(&self) -> usize {
        self.ctx
    }

    /// Entries in each stored distribution: the base model's vocabulary size.
    pub fn n_vocab(&self) -> usize {
        self.n_vocab
    }

    /// Chunks stored.
    pub fn chunks(&self) -> usize {
        self.tokens.len() / self.ctx
    }

    /// The token ids the base was computed on, chunk after chunk.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// The file it was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Running statistics of a comparison: means and their uncertainties (standard errors), as
/// llama.cpp prints them after each chunk. Probabilities are fractions, not percent.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct KlSummary {
    /// Tokens compared.
    pub scored: usize,
    /// Perplexity of the model under test, PPL(Q).
    pub ppl: f64,
    /// Its uncertainty.
    pub ppl_err: f64,
    /// Perplexity of the base, from its stored distributions.
    pub base_ppl: f64,
    /// Its uncertainty.
    pub base_ppl_err: f64,
    /// Correlation of the two runs' per-token log-likelihoods.
    pub ppl_cor: f64,
    /// ln(PPL(Q) / PPL(base)).
    pub ln_ppl_ratio: f64,
    /// Its uncertainty.
    pub ln_ppl_ratio_err: f64,
    /// PPL(Q) / PPL(base).
    pub ppl_ratio: f64,
    /// Its uncertainty.
    pub ppl_ratio_err: f64,
    /// PPL(Q) − PPL(base).
    pub ppl_diff: f64,
    /// Its uncertainty.
    pub ppl_diff_err: f64,
    /// Mean KL divergence of the model's distribution from the base's, in nats.
    pub mean_kld: f64,
    /// Its uncertainty.
    pub kld_err: f64,
    /// Mean Δp: the model's probability of the next token minus the base's.
    pub mean_dp: f64,
    /// Its uncertainty.
    pub dp_err: f64,
    /// Root mean square of Δp.
    pub rms_dp: f64,
    /// Its uncertainty.
    pub rms_dp_err: f64,
    /// Share of positions where the model's most likely token is the base's.
    pub same_top_p: f64,
    /// Its uncertainty.
    pub same_top_p_err: f64,
}

/// Quantiles of a per-token figure (linear interpolation between neighbours; the median of
/// an even count is the mean of the middle two).
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Percentiles {
    /// The largest value.
    pub max: f64,
    /// 99.9th percentile.
    #[serde(rename = "99.9")]
    pub p99_9: f64,
    /// 99th percentile.
    #[serde(rename = "99")]
    pub p99: f64,
    /// 95th percentile.
    #[serde(rename = "95")]
    pub p95: f64,
    /// 90th percentile.
    #[serde(rename = "90")]
    pub p90: f64,
    /// 75th percentile.
    #[serde(rename = "75")]
    pub p75: f64,
    /// The median.
    pub median: f64,
    /// 25th percentile.
    #[serde(rename = "25")]
    pub p25: f64,
    /// 10th percentile.
    #[serde(rename = "10")]
    pub p10: f64,
    /// 5th percentile.
    #[serde(rename = "5")]
    pub p5: f64,
    /// 1st percentile.
    #[serde(rename = "1")]
    pub p1: f64,
    /// 0.1th percentile.
    #[serde(rename = "0.1")]
    pub p0_1: f64,
    /// The smallest value.
    pub min: f64,
}

impl Percentiles {
    /// Of `values`, sorted ascending and not empty.
    fn of_sorted(values: &[f32]) -> Percentiles {
        let n = values.len();
        let at = |f: f64| {
            let x = f * (n - 1) as f64;
            let i = x as usize;
            let frac = x - i as f64;
            let hi = values[(i + 1).min(n - 1)] as f64;
            (1.0 - frac) * values[i] as f64 + frac * hi
        };
        let median = if n.is_multiple_of(2) {
            0.5 * (values[n / 2 - 1] as f64 + values[n / 2] as f64)
        } else {
            values[n / 2] as f64
        };
        Percentiles {
            max: values[n - 1] as f64,
            p99_9: at(0.999),
            p99: at(0.99),
            p95: at(0.95),
            p90: at(0.90),
            p75: at(0.75),
            median,
            p25: at(0.25),
            p10: at(0.10),
            p5: at(0.05),
            p1: at(0.01),
            p0_1: at(0.001),
            min: values[0] as f64,
        }
    }
}

/// The outcome of [`kl_divergence`].
#[derive(Clone, Debug, serde::Serialize)]
pub struct KlReport {
    /// Means and uncertainties.
    #[serde(flatten)]
    pub summary: KlSummary,
    /// Distribution of the per-token KL divergence.
    pub kld_percentiles: Percentiles,
    /// Distribution of the per-token Δp.
    pub dp_percentiles: Percentiles,
    /// Chunks compared.
    pub chunks: usize,
    /// Tokens per chunk.
    pub ctx: usize,
}

/// Sums over compared tokens, from which [`KlSummary`] is computed.
#[derive(Default)]
struct KlSums {
    nll: f64,
    nll2: f64,
    nll_base: f64,
    nll_base2: f64,
    nll_nll_base: f64,
    kld: f64,
    kld2: f64,
    dp: f64,
    dp2: f64,
    dp4: f64,
    same_top: usize,
    count: usize,
}

impl KlSums {
    fn summary(&self) -> KlSummary {
        let n = self.count;
        // llama.cpp's: the mean and its standard error, which needs more than 10 samples.
        let mean_err = |sum: f64, sum2: f64| {
            if n == 0 {
                return (0.0, 0.0);
            }
            let mean = sum / n as f64;
            let var = sum2 / n as f64 - mean * mean;
            let err = if var > 0.0 && n > 10 {
                (var / (n - 1) as f64).sqrt()
            } else {
                0.0
            };
            (mean, err)
        };
        let (ln_ppl, ln_ppl_err) = mean_err(self.nll, self.nll2);
        let (ln_base, ln_base_err) = mean_err(self.nll_base, self.nll_base2);
        // Covariance of the two mean log-likelihoods.
        let cov = if n < 10 {
            0.0
        } else {
            let n = n as f64;
            (self.nll_nll_base / n - (self.nll / n) * (self.nll_base / n)) / (n - 1.0)
        };
        let ppl = ln_ppl.exp();
        let base_ppl = ln_base.exp();
        let ln_ratio = ln_ppl - ln_base;
        let ln_ratio_err = (ln_ppl_err * ln_ppl_err + ln_base_err * ln_base_err - 2.0 * cov)
            .max(0.0)
            .sqrt();
        let ppl_ratio = ln_ratio.exp();
        let (ppl_err, base_ppl_err) = (ppl * ln_ppl_err, base_ppl * ln_base_err);
        let ppl_cov = ppl * base_ppl * cov;
        let (kld, kld_err) = mean_err(self.kld, self.kld2);
        let (dp, dp_err) = mean_err(self.dp, self.dp2);
        let (msd, msd_err) = mean_err(self.dp2, self.dp4);
        let rms_dp = msd.sqrt();
        let same = if n == 0 {
            0.0
        } else {
            self.same_top as f64 / n as f64
        };
        KlSummary {
            scored: n,
            ppl,
            ppl_err,
            base_ppl,
            base_ppl_err,
            ppl_cor: if ln_ppl_err > 0.0 && ln_base_err > 0.0 {
                cov / (ln_ppl_err * ln_base_err)
            } else {
                0.0
            },
            ln_ppl_ratio: ln_ratio,
            ln_ppl_ratio_err: ln_ratio_err,
            ppl_ratio,
            ppl_ratio_err: ppl_ratio * ln_ratio_err,
            ppl_diff: ppl - base_ppl,
            ppl_diff_err: (ppl_err * ppl_err + base_ppl_err * base_ppl_err - 2.0 * ppl_cov)
                .max(0.0)
                .sqrt(),
            mean_kld: kld,
            kld_err,
            mean_dp: dp,
            dp_err,
            rms_dp,
            rms_dp_err: if rms_dp > 0.0 {
                0.5 / rms_dp * msd_err
            } else {
                0.0
            },
            same_top_p: same,
            same_top_p_err: if n > 1 {
                (same * (1.0 - same) / (n - 1) as f64).sqrt()
            } else {
                0.0
            },
        }
    }
}

/// Compares one position: the model's `logits` (`[V]`) against the base's stored `row`
/// (`2 · row_words(V)` bytes), `target` being the token that follows. Adds to `sums` and
/// returns this position's KL divergence and Δp. Arithmetic as llama.cpp's (f32 but for the
/// sums) so both programs agree on the same inputs.
fn compare_row(logits: &[f32], row: &[u8], target: usize, sums: &mut KlSums) -> (f64, f32) {
    let mut max = logits[0];
    let mut top = 0;
    for (i, &l) in logits.iter().enumerate().skip(1) {
        if l > max {
            max = l;
            top = i;
        }
    }
    let sum: f64 = logits.iter().map(|&l| (l - max).exp() as f64).sum();
    let log_sum = sum.ln() as f32;
    let f32_at = |at: usize| f32::from_le_bytes(row[at..at + 4].try_into().expect("4 bytes"));
    let (scale, min_log_prob) = (f32_at(0), f32_at(4));
    let q = |i: usize| u16::from_le_bytes([row[8 + 2 * i], row[9 + 2 * i]]) as f32;

    let nll = max + log_sum - logits[target];
    let nll_base = -(scale * q(target) + min_log_prob);
    sums.nll += nll as f64;
    sums.nll2 += (nll * nll) as f64;
    sums.nll_base += nll_base as f64;
    sums.nll_base2 += (nll_base * nll_base) as f64;
    sums.nll_nll_base += (nll * nll_base) as f64;

    // log p(i) = logits[i] - log_norm.
    let log_norm = max + log_sum;
    let mut kld = 0f64;
    let mut base_top = 0;
    let mut base_top_lp = f32::NEG_INFINITY;
    for (i, &l) in logits.iter().enumerate() {
        let lp_base = scale * q(i) + min_log_prob;
        if lp_base > base_top_lp {
            base_top_lp = lp_base;
            base_top = i;
        }
        if lp_base > LOG_PROB_FLOOR {
            kld += (lp_base.exp() * (lp_base - l + log_norm)) as f64;
        }
    }
    sums.kld += kld;
    sums.kld2 += kld * kld;
    sums.count += 1;
    sums.same_top += usize::from(top == base_top);

    let dp = (-nll).exp() - (-nll_base).exp();
    let dp2 = (dp * dp) as f64;
    sums.dp += dp as f64;
    sums.dp2 += dp2;
    sums.dp4 += dp2 * dp2;
    (kld, dp)
}

/// Runs `runner` on the chunks stored in `base` (each from an empty cache, `bos` put first
/// when the tokenizer adds one, as when the base was written) and compares its predictions
/// with the base's at every scored position. `on_chunk(i, running)` after each chunk.
///
/// Errors if the model's vocabulary differs from the base's, if its context cannot hold a
/// chunk, or if the file cannot be read to the end.
pub fn kl_divergence(
    runner: &mut dyn SequenceRunner,
    mut base: KlBase,
    bos: Option<u32>,
    on_chunk: &mut dyn FnMut(usize, &KlSummary),
) -> Result<KlReport> {
    let (ctx, n_vocab, chunks) = (base.ctx, base.n_vocab, base.chunks());
    if runner.max_model_len() < ctx {
        return Err(Error::InvalidRequest(format!(
            "{}: the base was computed with chunks of {ctx} tokens; the model's context holds {}",
            base.path.display(),
            runner.max_model_len()
        )));
    }
    let rows_per_chunk = ctx - 1 - ctx / 2;
    let row_bytes = 2 * row_words(n_vocab);
    // [rows_per_chunk, row_bytes]: the current chunk's base rows.
    let mut rows = vec![0u8; rows_per_chunk * row_bytes];
    let mut sums = KlSums::default();
    let mut klds = Vec::with_capacity(chunks * rows_per_chunk);
    let mut dps = Vec::with_capacity(chunks * rows_per_chunk);
    let mut input = Vec::with_capacity(ctx);
    for c in 0..chunks {
        base.rows
            .read_exact(&mut rows)
            .map_err(|e| Error::io(&base.path, e))?;
        let chunk = &base.tokens[c * ctx..(c + 1) * ctx];
        let path = &base.path;
        score_chunk(runner, chunk, bos, &mut input, &mut |j, logits, target| {
            if logits.len() != n_vocab {
                return Err(Error::InvalidRequest(format!(
                    "{}: the base's vocabulary has {n_vocab} tokens, the model's {}",
                    path.display(),
                    logits.len()
                )));
            }
            let row = &rows[j * row_bytes..(j + 1) * row_bytes];
            let (kld, dp) = compare_row(logits, row, target as usize, &mut sums);
            klds.push(kld as f32);
            dps.push(dp);
            Ok(())
        })?;
        on_chunk(c, &sums.summary());
    }
    klds.sort_by(f32::total_cmp);
    dps.sort_by(f32::total_cmp);
    Ok(KlReport {
        summary: sums.summary(),
        kld_percentiles: Percentiles::of_sorted(&klds),
        dp_percentiles: Percentiles::of_sorted(&dps),
        chunks,
        ctx,
    })
}

/// The closing line of `wick perplexity`, as llama-perplexity prints it.
impl std::fmt::Display for PerplexityReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Final estimate: PPL = {:.4} +/- {:.5} ({} tokens, {} chunks of {})",
            self.ppl, self.ppl_err, self.tokens, self.chunks, self.ctx
        )
    }
}

/// What the base file holds, in one line.
impl std::fmt::Display for KlBase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: {} chunks of {} tokens, vocabulary {}",
            self.path.display(),
            self.chunks(),
            self.ctx,
            self.n_vocab
        )
    }
}

/// One row of `wick perplexity --kl-divergence`'s running table: the statistics after chunk
/// `chunk` (counted from 0), as llama-perplexity prints them.
pub struct KlProgress<'a> {
    /// The chunk just compared.
    pub chunk: usize,
    /// The running statistics.
    pub summary: &'a KlSummary,
}

impl KlProgress<'_> {
    /// The table's header line.
    pub fn header() -> String {
        format!(
            "chunk  {:>21}  {:>23}  {:>23}  {:>19}  {:>19}",
            "PPL", "ln(PPL(Q)/PPL(base))", "KL divergence", "RMS Δp", "same top p"
        )
    }
}

impl std::fmt::Display for KlProgress<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.summary;
        write!(
            f,
            "{:>5}  {:>9.4} ± {:>9.4}  {:>10.5} ± {:>10.5}  {:>10.5} ± {:>10.5}  \
             {:>6.3} ± {:>6.3} %  {:>6.3} ± {:>6.3} %",
            self.chunk + 1,
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
        )
    }
}

/// The final statistics of `wick perplexity --kl-divergence`, laid out as llama-perplexity
/// prints them.
impl std::fmt::Display for KlReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = &self.summary;
        let pct = |x: f64| 100.0 * x;
        writeln!(f, "Perplexity ({} tokens)", s.scored)?;
        writeln!(
            f,
            "  PPL(Q)              {:>10.6} ± {:.6}",
            s.ppl, s.ppl_err
        )?;
        writeln!(
            f,
            "  PPL(base)           {:>10.6} ± {:.6}",
            s.base_ppl, s.base_ppl_err
        )?;
        writeln!(f, "  correlation         {:>9.2} %", pct(s.ppl_cor))?;
        writeln!(
            f,
            "  ln(PPL(Q)/PPL(base)) {:>9.6} ± {:.6}",
            s.ln_ppl_ratio, s.ln_ppl_ratio_err
        )?;
        writeln!(
            f,
            "  PPL(Q)/PPL(base)    {:>10.6} ± {:.6}",
            s.ppl_ratio, s.ppl_ratio_err
        )?;
        writeln!(
            f,
            "  PPL(Q)-PPL(base)    {:>10.6} ± {:.6}",
            s.ppl_diff, s.ppl_diff_err
        )?;
        writeln!(f)?;
        writeln!(f, "KL divergence")?;
        writeln!(f, "  mean     {:>10.6} ± {:.6}", s.mean_kld, s.kld_err)?;
        let k = &self.kld_percentiles;
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
            writeln!(f, "  {name:<8} {v:>10.6}")?;
        }
        writeln!(f)?;
        writeln!(f, "Probability of the next token, Δp = p(Q) - p(base)")?;
        writeln!(
            f,
            "  mean     {:>7.3} ± {:.3} %",
            pct(s.mean_dp),
            pct(s.dp_err)
        )?;
        let d = &self.dp_percentiles;
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
            writeln!(f, "  {name:<8} {:>7.3} %", pct(v))?;
        }
        writeln!(
            f,
            "  RMS      {:>7.3} ± {:.3} %",
            pct(s.rms_dp),
            pct(s.rms_dp_err)
        )?;
        write!(
            f,
            "Same top p: {:.3} ± {:.3} %",
            pct(s.same_top_p),
            pct(s.same_top_p_err)
        )
    }
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

    /// A stand-in model: logits that depend on the position and the tokens so far, over
    /// an odd vocabulary (so rows carry a padding word); `shift` perturbs them.
    struct Fake {
        n_vocab: usize,
        shift: f32,
        tokens: Vec<u32>,
        max_len: usize,
    }

    impl Fake {
        fn new(n_vocab: usize, shift: f32) -> Fake {
            Fake {
                n_vocab,
                shift,
                tokens: Vec::new(),
                max_len: 1 << 20,
            }
        }
    }

    impl SequenceRunner for Fake {
        fn cached_tokens(&self) -> &[u32] {
            &self.tokens
        }
        fn reuse_prefix(&mut self, _: &[u32]) -> usize {
            0
        }
        fn extend_last(&mut self, _: &[u32], _: &mut Vec<f32>) -> Result<()> {
            unimplemented!()
        }
        fn extend_all(&mut self, ids: &[u32], on_row: &mut dyn FnMut(usize, &[f32])) -> Result<()> {
            let mut row = vec![0f32; self.n_vocab];
            for (i, &t) in ids.iter().enumerate() {
                self.tokens.push(t);
                let h = self
                    .tokens
                    .iter()
                    .fold(7u32, |h, &t| h.wrapping_mul(31) ^ t);
                for (v, l) in row.iter_mut().enumerate() {
                    let x = (v as f32 * 0.37 + (h % 97) as f32 * 0.11 + t as f32).sin();
                    *l = 6.0 * x + self.shift * (v as f32 * 1.7).cos();
                }
                on_row(i, &row);
            }
            Ok(())
        }
        fn reset(&mut self) {
            self.tokens.clear();
        }
        fn max_model_len(&self) -> usize {
            self.max_len
        }
    }

    fn temp(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("wick-kld-{}-{name}", std::process::id()))
    }

    fn text(n: usize, n_vocab: u32) -> Vec<u32> {
        (0..n as u32).map(|i| (i * 7 + 3) % n_vocab).collect()
    }

    /// Writes a base from `Fake::new(37, 0.0)` over 2 chunks of 16 (plus 5 dropped tokens).
    fn write_base(name: &str) -> (PathBuf, PerplexityReport) {
        let path = temp(name);
        let mut model = Fake::new(37, 0.0);
        let report =
            perplexity_writing_base(&mut model, &text(37, 37), 16, None, &path, &mut |_, _| {})
                .unwrap();
        (path, report)
    }

    #[test]
    fn row_layout_is_llama_cpps() {
        // A range of 65535/4096 makes the step exactly 1/4096: q = 0 (the minimum), 2.5 and
        // 1.5 → 2 (ties to even), 65535 (the maximum), 0; then one padding word.
        let s = 1.0 / 4096.0;
        let logits = [0.0, 2.5 * s, 1.5 * s, 65535.0 * s, 0.0];
        let mut row = vec![0xffu8; 2 * row_words(5)];
        assert_eq!(row.len(), 20);
        encode_row(&logits, &mut row);
        let scale = f32::from_le_bytes(row[0..4].try_into().unwrap());
        let min_lp = f32::from_le_bytes(row[4..8].try_into().unwrap());
        assert_eq!(scale, s);
        let lse: f64 = logits
            .iter()
            .map(|&l| ((l - 65535.0 * s) as f64).exp())
            .sum::<f64>()
            .ln();
        assert!((min_lp as f64 - (-65535.0 * s as f64 - lse)).abs() < 1e-6);
        assert_eq!(&row[8..], &[0, 0, 2, 0, 2, 0, 255, 255, 0, 0, 0, 0]);
    }

    #[test]
    fn a_base_file_has_the_header_tokens_and_rows() {
        let (path, report) = write_base("layout");
        let bytes = std::fs::read(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        assert_eq!(&bytes[..8], b"_logits_");
        let int = |at: usize| i32::from_le_bytes(bytes[at..at + 4].try_into().unwrap());
        assert_eq!((int(8), int(12), int(16)), (16, 37, 2));
        let tokens: Vec<u32> = (0..32).map(|i| int(20 + 4 * i) as u32).collect();
        assert_eq!(tokens, text(32, 37));
        assert_eq!(report.scored, 2 * 7);
        assert_eq!(bytes.len(), 20 + 4 * 32 + 2 * 7 * 2 * 42);
    }

    #[test]
    fn a_model_compared_with_its_own_base_agrees() {
        let (path, written) = write_base("self");
        let base = KlBase::open(&path).unwrap();
        assert_eq!((base.ctx(), base.n_vocab(), base.chunks()), (16, 37, 2));
        let mut chunks = 0;
        let r =
            kl_divergence(&mut Fake::new(37, 0.0), base, None, &mut |_, _| chunks += 1).unwrap();
        let _ = std::fs::remove_file(&path);
        assert_eq!((chunks, r.chunks, r.summary.scored), (2, 2, 14));
        let s = &r.summary;
        let k = &r.kld_percentiles;
        assert!(k.max <= SELF_KLD_BOUND && k.min >= -SELF_KLD_BOUND, "{r:?}");
        assert!(s.mean_kld.abs() < 0.5 * SELF_KLD_BOUND, "{s:?}");
        assert_eq!(s.same_top_p, 1.0);
        // f32 (llama.cpp's arithmetic) against the f64 of the perplexity loop.
        assert!(
            (s.ppl / written.ppl - 1.0).abs() < 1e-5,
            "{s:?} vs {written:?}"
        );
        assert!((s.ppl_ratio - 1.0).abs() < 1e-3, "{s:?}");
        assert!(s.rms_dp < 1e-3, "{s:?}");
    }

    #[test]
    fn a_perturbed_model_diverges() {
        let (path, _) = write_base("perturbed");
        let base = KlBase::open(&path).unwrap();
        let r = kl_divergence(&mut Fake::new(37, 0.5), base, None, &mut |_, _| {}).unwrap();
        let _ = std::fs::remove_file(&path);
        let s = &r.summary;
        // By hand: the KL divergence of softmax(a) from softmax(a + δ) is about Var(δ)/2
        // under p for small δ; here δ has amplitude 0.5.
        assert!(s.mean_kld > 1e-3 && s.mean_kld < 0.2, "{s:?}");
        assert!(r.kld_percentiles.min >= -1e-4 && r.kld_percentiles.max >= s.mean_kld);
        assert!(s.rms_dp > 0.0 && s.ppl != s.base_ppl);
    }

    fn open_err(bytes: &[u8], name: &str) -> String {
        let path = temp(name);
        std::fs::write(&path, bytes).unwrap();
        let e = KlBase::open(&path).err().expect("must fail").to_string();
        let _ = std::fs::remove_file(&path);
        e
    }

    #[test]
    fn malformed_base_files_are_errors() {
        let (path, _) = write_base("malformed");
        let good = std::fs::read(&path).unwrap();
        let _ = std::fs::remove_file(&path);

        let e = open_err(b"hello, world: not a base file", "text");
        assert!(e.contains("not a log-probability file"), "{e}");
        let e = open_err(&good[..10], "short");
        assert!(e.contains("not a log-probability file"), "{e}");
        let e = open_err(&good[..good.len() - 1], "truncated");
        assert!(e.contains("truncated"), "{e}");
        let mut long = good.clone();
        long.push(0);
        let e = open_err(&long, "long");
        assert!(e.contains("corrupt"), "{e}");
        let mut bad_token = good.clone();
        bad_token[20..24].copy_from_slice(&37i32.to_le_bytes());
        let e = open_err(&bad_token, "token");
        assert!(e.contains("outside the vocabulary"), "{e}");
        let mut bad_header = good.clone();
        bad_header[16..20].copy_from_slice(&(-1i32).to_le_bytes());
        let e = open_err(&bad_header, "header");
        assert!(e.contains("impossible header"), "{e}");
        let e = KlBase::open(temp("absent")).err().unwrap().to_string();
        assert!(e.contains("absent"), "{e}");
    }

    #[test]
    fn a_model_that_does_not_fit_the_base_is_an_error() {
        let (path, _) = write_base("mismatch");
        let other_vocab = kl_divergence(
            &mut Fake::new(39, 0.0),
            KlBase::open(&path).unwrap(),
            None,
            &mut |_, _| {},
        );
        let mut short = Fake::new(37, 0.0);
        short.max_len = 8;
        let short_ctx = kl_divergence(
            &mut short,
            KlBase::open(&path).unwrap(),
            None,
            &mut |_, _| {},
        );
        let _ = std::fs::remove_file(&path);
        let e = other_vocab.err().unwrap().to_string();
        assert!(
            e.contains("vocabulary has 37 tokens, the model's 39"),
            "{e}"
        );
        let e = short_ctx.err().unwrap().to_string();
        assert!(e.contains("chunks of 16 tokens"), "{e}");
    }

    #[test]
    fn percentiles_interpolate() {
        let v: Vec<f32> = (0..=10).map(|i| i as f32).collect();
        let p = Percentiles::of_sorted(&v);
        assert_eq!((p.min, p.median, p.max), (0.0, 5.0, 10.0));
        assert!((p.p99 - 9.9).abs() < 1e-9 && (p.p25 - 2.5).abs() < 1e-9);
        assert_eq!(Percentiles::of_sorted(&[1.0, 2.0]).median, 1.5);
    }
}
