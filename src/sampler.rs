//! Turning a row of logits into the next token.
//!
//! - [`SamplingParams`] is what a request asks for (temperature, top-k, top-p, min-p, penalties,
//!   seed, stop conditions, logprobs). [`SamplingParams::validate`] rejects bad values before a
//!   request is scheduled.
//! - [`Sampler`] is created once per request. [`Sampler::sample`] turns one row of logits
//!   (`[V]`, V = vocabulary size) into a token id; [`Sampler::accept`] records the token the
//!   request actually generated so that the penalties see it.
//! - [`logprobs`] computes the log-probabilities reported back to the client.
//!
//! The processing order follows vLLM's v1 sampler:
//! penalties (repetition → frequency → presence) → temperature → min-p → top-k → top-p → draw.
//! Everything after the penalties is [`crate::backend::sample::sample_row`], the one sampling
//! algorithm, which every backend reproduces where its logits are. min-p and top-k commute (both keep the most likely tokens and min-p only looks at ratios of
//! probabilities), but top-p is computed on the distribution that min-p and top-k left behind.
//!
//! ```
//! use wick::sampler::{Sampler, SamplingParams};
//!
//! let params = SamplingParams { seed: Some(7), ..SamplingParams::greedy() };
//! params.validate()?;
//! let prompt = [11u32, 12, 13];
//! let mut sampler = Sampler::new(&params, &prompt);
//!
//! let mut logits = vec![0.1, 2.0, -1.0, 1.5]; // [V], straight from the model
//! let id = sampler.sample(&mut logits);
//! assert_eq!(id, 1);
//! sampler.accept(id);
//! # Ok::<(), wick::Error>(())
//! ```

use std::collections::{HashMap, HashSet};

use rand::{Rng, SeedableRng};
use rand_pcg::Pcg64;
use serde::{Deserialize, Serialize};

use crate::backend::sample::sample_row;
use crate::backend::RowSampling;
use crate::error::{Error, Result};

pub use crate::backend::sample::GREEDY_TEMPERATURE;

/// The most top logprobs a request may ask for (the OpenAI limit, and vLLM's default).
pub const MAX_TOP_LOGPROBS: usize = 20;

/// How a request wants its tokens chosen and when it wants generation to stop.
///
/// Fields missing from JSON take the [`Default`] values: plain sampling at temperature 1 with
/// every filter and penalty off, 16 new tokens (vLLM's and the OpenAI completions default; the
/// server chooses its own limit for chat requests). A model's `generation_config.json` supplies
/// better defaults through [`SamplingParams::with_generation_defaults`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SamplingParams {
    /// Softmax temperature. 0 (anything below [`GREEDY_TEMPERATURE`]) means greedy decoding.
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens. 0 = off.
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability adds up to at least
    /// `top_p`. 1 = off. Must be in (0, 1].
    pub top_p: f32,
    /// Drop tokens whose probability is below `min_p` times that of the most likely token.
    /// 0 = off. Must be in [0, 1].
    pub min_p: f32,
    /// Penalty on every token seen in the prompt or the output (vLLM/Hugging Face style):
    /// positive logits are divided by it, negative ones multiplied. 1 = off. Must be > 0.
    pub repetition_penalty: f32,
    /// Subtracted once from the logit of every token already generated (OpenAI semantics; the
    /// prompt does not count). Must be in [-2, 2].
    pub presence_penalty: f32,
    /// Subtracted from the logit of every generated token once per time it was generated
    /// (OpenAI semantics; the prompt does not count). Must be in [-2, 2].
    pub frequency_penalty: f32,
    /// Seed for reproducible sampling; `None` draws one from the OS.
    pub seed: Option<u64>,
    /// Most tokens to generate, at least 1; `None`: up to the end of the context.
    pub max_tokens: Option<usize>,
    /// Generation stops when the text contains one of these; the stop string is not returned.
    pub stop: Vec<String>,
    /// Generation stops after one of these tokens (in addition to the model's end of sequence).
    pub stop_token_ids: Vec<u32>,
    /// Keep generating past the model's end-of-sequence tokens (for benchmarks).
    pub ignore_eos: bool,
    /// `None`: no logprobs. `Some(n)`: the chosen token's logprob plus the `n` most likely
    /// tokens' (at most [`MAX_TOP_LOGPROBS`]).
    pub logprobs: Option<usize>,
    /// Added to the logits of these token ids before sampling (OpenAI's `logit_bias`):
    /// each in [-100, 100]; -100 bans a token, 100 all but forces it.
    pub logit_bias: Vec<(u32, f32)>,
    /// What the reply must match (a JSON schema, a regular expression, choices, a grammar):
    /// tokens that would break it are banned before sampling ([`crate::grammar`]).
    pub grammar: Option<crate::grammar::Grammar>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: None,
            max_tokens: Some(16),
            stop: Vec::new(),
            stop_token_ids: Vec::new(),
            ignore_eos: false,
            logprobs: None,
            logit_bias: Vec::new(),
            grammar: None,
        }
    }
}

impl SamplingParams {
    /// Greedy decoding (always the most likely token), everything else at its default.
    pub fn greedy() -> Self {
        SamplingParams {
            temperature: 0.0,
            ..Self::default()
        }
    }

    /// The defaults, with the values a model's `generation_config.json` gives replacing them
    /// (Qwen3 ships temperature 0.6, top_k 20, top_p 0.95).
    pub fn with_generation_defaults(
        temperature: Option<f32>,
        top_k: Option<usize>,
        top_p: Option<f32>,
    ) -> Self {
        let default = Self::default();
        SamplingParams {
            temperature: temperature.unwrap_or(default.temperature),
            top_k: top_k.unwrap_or(default.top_k),
            top_p: top_p.unwrap_or(default.top_p),
            ..default
        }
    }

    /// Checks every field's range: the one place they are checked. The error,
    /// [`Error::InvalidParam`], names the offending field.
    pub fn validate(&self) -> Result<()> {
        fn bad(param: &'static str, expected: &str, got: impl std::fmt::Display) -> Error {
            Error::InvalidParam {
                param,
                message: format!("{param} must be {expected}, got {got}"),
            }
        }
        // Written as `!(ok)` so that NaN, which fails every comparison, is rejected too.
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(bad("temperature", "a finite number >= 0", self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(bad("top_p", "in (0, 1]", self.top_p));
        }
        if !(self.min_p >= 0.0 && self.min_p <= 1.0) {
            return Err(bad("min_p", "in [0, 1]", self.min_p));
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return Err(bad(
                "repetition_penalty",
                "a finite number > 0",
                self.repetition_penalty,
            ));
        }
        if !(-2.0..=2.0).contains(&self.presence_penalty) {
            return Err(bad("presence_penalty", "in [-2, 2]", self.presence_penalty));
        }
        if !(-2.0..=2.0).contains(&self.frequency_penalty) {
            return Err(bad(
                "frequency_penalty",
                "in [-2, 2]",
                self.frequency_penalty,
            ));
        }
        if self.max_tokens == Some(0) {
            return Err(bad("max_tokens", "at least 1", 0));
        }
        if let Some(n) = self.logprobs {
            if n > MAX_TOP_LOGPROBS {
                return Err(bad("logprobs", &format!("at most {MAX_TOP_LOGPROBS}"), n));
            }
        }
        if let Some(&(id, b)) = self
            .logit_bias
            .iter()
            .find(|(_, b)| !(-100.0..=100.0).contains(b))
        {
            return Err(bad(
                "logit_bias",
                &format!("in [-100, 100] (token {id})"),
                b,
            ));
        }
        if self.stop.iter().any(String::is_empty) {
            return Err(bad("stop", "non-empty strings", "an empty string"));
        }
        Ok(())
    }

    fn is_greedy(&self) -> bool {
        // An unvalidated NaN temperature falls back to greedy.
        self.temperature.is_nan() || self.temperature < GREEDY_TEMPERATURE
    }
}

/// Log-probabilities reported for one generated token.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TokenLogprobs {
    /// Log-probability of the token that was generated.
    pub chosen_logprob: f32,
    /// The most likely tokens with their log-probabilities, most likely first (ties: lower id
    /// first). May or may not contain the chosen token.
    pub top: Vec<(u32, f32)>,
}

/// Log-probabilities of `chosen` and of the `top` most likely tokens under `log_softmax(logits)`.
///
/// wick reports the model's own distribution (what vLLM v1 returns by default): computed from
/// the raw logits, before penalties, temperature or any filter. NaN logits count as -inf.
/// `chosen` outside the vocabulary gets -inf. Costs one pass over the logits plus, at worst,
/// O(V · top) for the ranking (fine for the small `top` requests may ask for).
pub fn logprobs(logits: &[f32], chosen: u32, top: usize) -> TokenLogprobs {
    let max = max_logit(logits);
    // log(sum(exp(l))) computed around the max so nothing overflows.
    let log_z = if max.is_finite() {
        max as f64 + vocab_mass(logits, max, 1.0).ln()
    } else {
        max as f64
    };
    let logprob = |l: f32| -> f32 {
        if l.is_nan() || l == f32::NEG_INFINITY {
            f32::NEG_INFINITY
        } else {
            (l as f64 - log_z) as f32
        }
    };
    TokenLogprobs {
        chosen_logprob: logits
            .get(chosen as usize)
            .map_or(f32::NEG_INFINITY, |&l| logprob(l)),
        top: top_n(logits, top)
            .into_iter()
            .map(|(id, l)| (id, logprob(l)))
            .collect(),
    }
}

/// The `n` largest logits as `(id, logit)`, largest first, ties broken by lower id; NaN skipped.
fn top_n(logits: &[f32], n: usize) -> Vec<(u32, f32)> {
    let n = n.min(logits.len());
    let mut best: Vec<(u32, f32)> = Vec::with_capacity(n + 1);
    if n == 0 {
        return best;
    }
    for (c, chunk) in logits.chunks(LANES).enumerate() {
        if best.len() == n {
            let bar = best[n - 1].1;
            if !chunk.iter().fold(false, |any, &l| any | (l > bar)) {
                continue;
            }
        }
        for (j, &l) in chunk.iter().enumerate() {
            if l.is_nan() || (best.len() == n && l <= best[n - 1].1) {
                continue;
            }
            // Ids arrive in increasing order, so inserting after equal logits keeps ties by id.
            let at = best.partition_point(|&(_, b)| b >= l);
            best.insert(at, ((c * LANES + j) as u32, l));
            best.truncate(n);
        }
    }
    best
}

/// Chunk width for the scans over the vocabulary: short, fixed-length loops without early exits
/// are what the compiler turns into vector instructions.
const LANES: usize = 16;

/// The largest logit, ignoring NaN; -inf if there is none.
fn max_logit(logits: &[f32]) -> f32 {
    // Independent lanes so the reduction vectorises; `x > m` is false for NaN.
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let chunks = logits.chunks_exact(LANES);
    let rest = chunks.remainder();
    for chunk in chunks {
        for (m, &x) in lanes.iter_mut().zip(chunk) {
            if x > *m {
                *m = x;
            }
        }
    }
    rest.iter()
        .chain(&lanes)
        .fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m })
}

/// exp(x) for x <= 0, within a few ulp; 0 below -87 (where f32 turns subnormal), for -inf and
/// for NaN.
///
/// The softmax normaliser of [`logprobs`] takes one exponential per token, V per step. This
/// is plain branch-free arithmetic, so loops over it vectorise, instead of a libm call per
/// token.
/// exp(x) = 2^n · exp(r) with n = round(x / ln 2) and |r| <= ln 2 / 2, where a degree-7 Taylor
/// polynomial is accurate to ~5e-9.
#[inline]
fn exp_nonpositive(x: f32) -> f32 {
    // ln 2 split in a short high part (exact when multiplied by n) and the remainder, so that
    // r = x - n ln 2 loses no precision.
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // Adding 1.5 · 2^23 rounds to an integer and leaves it in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    // Not `clamp`, which passes NaN through: `max` and `min` ignore it, so NaN lands on -87
    // and is zeroed at the end.
    #[allow(clippy::manual_clamp)]
    let xc = x.max(-87.0).min(0.0);
    let shifted = xc * std::f32::consts::LOG2_E + ROUND;
    let n = shifted - ROUND;
    let n_int = (shifted.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    let r = (xc - n * LN2_HI) - n * LN2_LO;
    let p = 1.0 / 5040.0;
    let p = p * r + 1.0 / 720.0;
    let p = p * r + 1.0 / 120.0;
    let p = p * r + 1.0 / 24.0;
    let p = p * r + 1.0 / 6.0;
    let p = p * r + 0.5;
    let p = p * r + 1.0;
    let p = p * r + 1.0;
    // n is in [-126, 0], so 2^n is a normal float built from its exponent bits.
    let scale = f32::from_bits(((n_int + 127) as u32) << 23);
    // All ones when x >= -87, zero otherwise (NaN included): a mask, not a branch.
    let keep = ((x >= -87.0) as u32).wrapping_neg();
    f32::from_bits((p * scale).to_bits() & keep)
}

/// Unnormalised probability exp((l - max) / T) of a logit; 0 for NaN and -inf.
#[inline]
fn weight(l: f32, max: f32, inv_t: f32) -> f32 {
    exp_nonpositive((l - max) * inv_t)
}

/// Sum of the weights of a chunk of at most `LANES` logits. A short chunk is padded to the
/// full width so that every chunk goes through the same fixed-length, vectorised code.
#[inline]
fn chunk_mass(chunk: &[f32], max: f32, inv_t: f32) -> f32 {
    fn full(l: &[f32; LANES], max: f32, inv_t: f32) -> f32 {
        let mut w = [0.0f32; LANES];
        for (w, &l) in w.iter_mut().zip(l) {
            *w = weight(l, max, inv_t);
        }
        // Pairwise, in lanes.
        let mut half = LANES;
        while half > 1 {
            half /= 2;
            for i in 0..half {
                w[i] += w[i + half];
            }
        }
        w[0]
    }
    match <&[f32; LANES]>::try_from(chunk) {
        Ok(l) => full(l, max, inv_t),
        Err(_) => {
            let mut l = [f32::NEG_INFINITY; LANES];
            l[..chunk.len()].copy_from_slice(chunk);
            full(&l, max, inv_t)
        }
    }
}

/// Sum of the weights of every logit: the softmax normaliser, relative to exp(max / T).
fn vocab_mass(logits: &[f32], max: f32, inv_t: f32) -> f64 {
    logits
        .chunks(LANES)
        .map(|chunk| chunk_mass(chunk, max, inv_t) as f64)
        .sum()
}

/// Chooses the tokens of one request. Create it when the request starts; call
/// [`sample`](Sampler::sample) on each row of logits (or [`device_sampling`] to let the
/// backend sample where the logits are) and [`accept`](Sampler::accept) with each token the
/// request keeps.
///
/// There is one sampling algorithm, [`sample_row`] (mirrored by `shaders/sample.wgsl`); the
/// sampler adds the steps that need the request's history or the logits on the host:
/// penalties before the draw, logprobs beside it. Each token takes one 32-bit seed from the
/// request's random stream whichever way it is drawn, so a seeded request draws the same
/// tokens with or without logprobs, on the host or the device, alone or batched.
///
/// Nothing is allocated per call once the scratch buffers have grown to their working size.
///
/// [`device_sampling`]: Sampler::device_sampling
#[derive(Clone, Debug)]
pub struct Sampler {
    params: SamplingParams,
    rng: Pcg64,
    /// Tokens seen in the prompt or the output, for the repetition penalty (empty when off).
    seen: HashSet<u32>,
    /// How often each token has been generated, for presence and frequency penalties
    /// (empty when both are off). Kept incrementally so a step costs O(distinct tokens).
    output_counts: HashMap<u32, u32>,
    /// Scratch of [`sample_row`]: the surviving `(id, logit)`, up to `[V]`.
    candidates: Vec<(u32, f32)>,
    /// Scratch: copy of the raw logits `[V]` when logprobs are wanted.
    raw: Vec<f32>,
}

impl Sampler {
    /// A sampler for one request. `prompt_ids` feed the repetition penalty. The random stream
    /// is `Pcg64` seeded from `params.seed`, so a seed gives the same tokens on every run and
    /// platform; without a seed it is seeded from the OS.
    pub fn new(params: &SamplingParams, prompt_ids: &[u32]) -> Self {
        let seed = params.seed.unwrap_or_else(rand::random);
        let seen = if params.repetition_penalty != 1.0 {
            prompt_ids.iter().copied().collect()
        } else {
            HashSet::new()
        };
        Sampler {
            params: params.clone(),
            rng: Pcg64::seed_from_u64(seed),
            seen,
            output_counts: HashMap::new(),
            candidates: Vec::new(),
            raw: Vec::new(),
        }
    }

    /// The parameters this sampler was created with.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Whether the next token needs the logits on the host: penalties change them, and
    /// logprobs are computed from them.
    pub fn needs_logits(&self) -> bool {
        let p = &self.params;
        p.repetition_penalty != 1.0
            || p.presence_penalty != 0.0
            || p.frequency_penalty != 0.0
            || p.logprobs.is_some()
            || !p.logit_bias.is_empty()
    }

    /// The next token's sampling as the backend does it ([`crate::backend::Backend::sample`],
    /// where the logits are), or `None` when this request needs the logits on the host
    /// ([`needs_logits`](Sampler::needs_logits)); then call [`sample`](Sampler::sample) or
    /// [`sample_with_logprobs`](Sampler::sample_with_logprobs) instead. Call one of them
    /// once per token.
    pub fn device_sampling(&mut self) -> Option<RowSampling> {
        (!self.needs_logits()).then(|| self.next_row())
    }

    /// The next draw: the filters of the request and, unless greedy, a seed taken from the
    /// request's random stream.
    fn next_row(&mut self) -> RowSampling {
        let p = &self.params;
        if p.is_greedy() {
            return RowSampling::greedy();
        }
        let top_k = u32::try_from(p.top_k).unwrap_or(0);
        let (temperature, top_p, min_p) = (p.temperature, p.top_p, p.min_p);
        RowSampling::new(temperature, top_k, top_p, min_p, self.rng.random::<u32>())
    }

    /// Records a token the request generated, for the penalties on later steps.
    pub fn accept(&mut self, id: u32) {
        if self.params.repetition_penalty != 1.0 {
            self.seen.insert(id);
        }
        if self.params.presence_penalty != 0.0 || self.params.frequency_penalty != 0.0 {
            *self.output_counts.entry(id).or_insert(0) += 1;
        }
    }

    /// Chooses the next token from one row of logits `[V]`: penalties, then [`sample_row`].
    ///
    /// The penalties are applied to `logits` in place. Greedy requests take the argmax after
    /// penalties (lowest id on ties). NaN logits are never chosen. Panics if `logits` is
    /// empty: the model always produces V > 0.
    pub fn sample(&mut self, logits: &mut [f32]) -> u32 {
        assert!(!logits.is_empty(), "Sampler::sample called with no logits");
        self.apply_penalties(logits);
        let row = self.next_row();
        sample_row(logits, &row, &mut self.candidates)
    }

    /// [`sample`](Sampler::sample), plus the logprobs the request asked for
    /// (`params.logprobs`), computed from the logits as they came in (see [`logprobs`]).
    pub fn sample_with_logprobs(&mut self, logits: &mut [f32]) -> (u32, Option<TokenLogprobs>) {
        let Some(top) = self.params.logprobs else {
            return (self.sample(logits), None);
        };
        self.raw.clear();
        self.raw.extend_from_slice(logits);
        let id = self.sample(logits);
        (id, Some(logprobs(&self.raw, id, top)))
    }

    /// The logit bias, then repetition, frequency and presence penalties, as vLLM applies
    /// them. Ids outside the vocabulary are ignored.
    fn apply_penalties(&self, logits: &mut [f32]) {
        for &(id, b) in &self.params.logit_bias {
            if let Some(l) = logits.get_mut(id as usize) {
                *l += b;
            }
        }
        let rep = self.params.repetition_penalty;
        if rep != 1.0 {
            for &id in &self.seen {
                if let Some(l) = logits.get_mut(id as usize) {
                    *l = if *l > 0.0 { *l / rep } else { *l * rep };
                }
            }
        }
        let (freq, pres) = (self.params.frequency_penalty, self.params.presence_penalty);
        if freq != 0.0 || pres != 0.0 {
            for (&id, &count) in &self.output_counts {
                if let Some(l) = logits.get_mut(id as usize) {
                    *l = (*l - freq * count as f32) - pres;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Logits whose softmax is exactly `probs` (up to f32 rounding).
    fn logits_of(probs: &[f64]) -> Vec<f32> {
        probs.iter().map(|p| p.ln() as f32).collect()
    }

    fn softmax(logits: &[f32], t: f64) -> Vec<f64> {
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let e: Vec<f64> = logits
            .iter()
            .map(|&l| ((l as f64 - max) / t).exp())
            .collect();
        let z: f64 = e.iter().sum();
        e.iter().map(|x| x / z).collect()
    }

    /// Pseudo-random logits in [-scale, scale), from a fixed seed.
    fn random_logits(n: usize, seed: u64, scale: f32) -> Vec<f32> {
        let mut rng = Pcg64::seed_from_u64(seed);
        (0..n)
            .map(|_| (rng.random::<f32>() * 2.0 - 1.0) * scale)
            .collect()
    }

    /// Draws `n` tokens (fresh copy of `logits` each time) and counts them per id.
    fn histogram(params: &SamplingParams, logits: &[f32], n: usize) -> Vec<usize> {
        let mut sampler = Sampler::new(params, &[]);
        let mut counts = vec![0; logits.len()];
        for _ in 0..n {
            let mut l = logits.to_vec();
            counts[sampler.sample(&mut l) as usize] += 1;
        }
        counts
    }

    /// Every count within 5 binomial standard deviations of `n * expected`; a token with
    /// expected probability 0 must never appear.
    fn assert_matches(counts: &[usize], expected: &[f64]) {
        let n: usize = counts.iter().sum();
        for (id, (&c, &p)) in counts.iter().zip(expected).enumerate() {
            if p == 0.0 {
                assert_eq!(c, 0, "token {id} has probability 0 but was drawn {c} times");
                continue;
            }
            let mean = n as f64 * p;
            let sigma = (n as f64 * p * (1.0 - p)).sqrt();
            assert!(
                (c as f64 - mean).abs() <= 5.0 * sigma + 1.0,
                "token {id}: drawn {c} times, expected {mean:.1} ± {sigma:.1} (counts {counts:?})"
            );
        }
    }

    /// The tokens the filters of `params` let through, as `(id, exp((l - max) / T))`, and
    /// the sum of those weights.
    fn survivors(params: &SamplingParams, logits: &[f32]) -> (Vec<(u32, f64)>, f64) {
        let row = Sampler::new(params, &[]).next_row();
        let max = max_logit(logits);
        let mut cands = Vec::new();
        crate::backend::sample::filter(logits, &row, max, &mut cands);
        let t = params.temperature as f64;
        let weighted: Vec<(u32, f64)> = cands
            .iter()
            .map(|&(id, l)| (id, ((l - max) as f64 / t).exp()))
            .collect();
        let total = weighted.iter().map(|c| c.1).sum();
        (weighted, total)
    }

    fn random_params(seed: u64) -> SamplingParams {
        SamplingParams {
            seed: Some(seed),
            ..SamplingParams::default()
        }
    }

    #[test]
    fn exp_nonpositive_matches_std() {
        let mut worst = 0.0f64;
        for i in 0..=870_000 {
            let x = -(i as f32) * 1e-4;
            let want = (x as f64).exp();
            let got = exp_nonpositive(x) as f64;
            worst = worst.max((got - want).abs() / want);
        }
        assert!(worst < 3e-7, "relative error {worst}");
        assert_eq!(exp_nonpositive(0.0), 1.0);
        assert_eq!(exp_nonpositive(-88.0), 0.0);
        assert_eq!(exp_nonpositive(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_nonpositive(f32::NAN), 0.0);
    }

    #[test]
    fn greedy_picks_the_argmax() {
        let mut s = Sampler::new(&SamplingParams::greedy(), &[]);
        assert_eq!(s.sample(&mut [0.1, 2.0, -1.0, 1.5]), 1);
        assert_eq!(s.sample(&mut [-3.0, -2.0, -5.0]), 1);
        assert_eq!(s.sample(&mut [f32::NAN, 1.0, 2.0]), 2);
    }

    #[test]
    fn greedy_ties_go_to_the_lowest_id() {
        let mut s = Sampler::new(&SamplingParams::greedy(), &[]);
        assert_eq!(s.sample(&mut [1.0, 3.0, 2.0, 3.0, 3.0]), 1);
        assert_eq!(s.sample(&mut [0.0; 8]), 0);
        // Long enough for the chunked scan: the max sits in a later chunk, twice.
        let mut logits = random_logits(1000, 2, 1.0);
        logits[517] = 5.0;
        logits[900] = 5.0;
        assert_eq!(s.sample(&mut logits), 517);
    }

    #[test]
    fn temperature_below_cutoff_is_greedy() {
        let params = SamplingParams {
            temperature: 1e-6,
            ..random_params(1)
        };
        let logits = [1.0, 1.2, 1.1, 0.0];
        let counts = histogram(&params, &logits, 200);
        assert_eq!(counts, vec![0, 200, 0, 0]);
    }

    #[test]
    fn same_seed_same_draws_different_seed_different_draws() {
        let logits = random_logits(50, 3, 2.0);
        let draws = |seed| {
            let mut s = Sampler::new(&random_params(seed), &[]);
            (0..200)
                .map(|_| s.sample(&mut logits.clone()))
                .collect::<Vec<_>>()
        };
        assert_eq!(draws(42), draws(42));
        assert_ne!(draws(42), draws(43));
    }

    #[test]
    fn top_k_1_is_greedy() {
        for seed in 0..20 {
            let logits = random_logits(300, seed, 3.0);
            let params = SamplingParams {
                top_k: 1,
                ..random_params(seed)
            };
            let mut s = Sampler::new(&params, &[]);
            for _ in 0..20 {
                assert_eq!(
                    s.sample(&mut logits.clone()),
                    crate::backend::sample::argmax(&logits)
                );
            }
        }
    }

    #[test]
    fn top_k_draws_only_the_k_most_likely_in_proportion() {
        let probs = [0.4, 0.05, 0.25, 0.1, 0.2];
        let params = SamplingParams {
            top_k: 3,
            ..random_params(5)
        };
        let counts = histogram(&params, &logits_of(&probs), 10_000);
        assert_matches(&counts, &[0.4 / 0.85, 0.0, 0.25 / 0.85, 0.0, 0.2 / 0.85]);
    }

    #[test]
    fn top_k_selection_matches_a_full_sort() {
        // The quantised logits make ties at the k-th place common.
        for (seed, k) in [(1u64, 1usize), (2, 7), (3, 64), (4, 100), (5, 999)] {
            let logits: Vec<f32> = random_logits(5000, seed, 8.0)
                .iter()
                .map(|l| l.round())
                .collect();
            let mut expected: Vec<(u32, f32)> = logits
                .iter()
                .enumerate()
                .map(|(i, &l)| (i as u32, l))
                .collect();
            let by_rank = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
            expected.sort_by(by_rank);
            expected.truncate(k);
            let params = SamplingParams {
                top_k: k,
                ..random_params(seed)
            };
            let (survivors, _) = survivors(&params, &logits);
            let mut got: Vec<(u32, f32)> = survivors
                .iter()
                .map(|&(id, _)| (id, logits[id as usize]))
                .collect();
            got.sort_by(by_rank);
            assert_eq!(got, expected, "k = {k}");
        }
    }

    #[test]
    fn top_p_keeps_the_smallest_set_reaching_top_p() {
        let logits = logits_of(&[0.5, 0.3, 0.15, 0.05]);
        let params = SamplingParams {
            top_p: 0.8,
            ..random_params(9)
        };
        let counts = histogram(&params, &logits, 10_000);
        assert_matches(&counts, &[0.5 / 0.8, 0.3 / 0.8, 0.0, 0.0]);

        // Just past the boundary the third token is needed.
        let params = SamplingParams {
            top_p: 0.81,
            ..random_params(9)
        };
        let counts = histogram(&params, &logits, 10_000);
        assert_matches(&counts, &[0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0.0]);
    }

    #[test]
    fn min_p_never_draws_tokens_below_the_bar() {
        // Bar = 0.3 * 0.4 = 0.12: tokens 3 (0.1) and 4 (0.05) are out.
        let probs = [0.4, 0.3, 0.15, 0.1, 0.05];
        let params = SamplingParams {
            min_p: 0.3,
            ..random_params(11)
        };
        let counts = histogram(&params, &logits_of(&probs), 10_000);
        assert_matches(&counts, &[0.4 / 0.85, 0.3 / 0.85, 0.15 / 0.85, 0.0, 0.0]);
    }

    #[test]
    fn unfiltered_sampling_over_many_chunks_matches_softmax() {
        // 50 tokens: three full chunks and a partial one, with masked tokens mixed in.
        let mut logits = random_logits(50, 19, 2.0);
        logits[3] = f32::NEG_INFINITY;
        logits[20] = f32::NAN;
        let params = SamplingParams {
            temperature: 0.8,
            ..random_params(19)
        };
        let counts = histogram(&params, &logits, 20_000);
        let mut expected = logits.clone();
        expected[20] = f32::NEG_INFINITY;
        assert_matches(&counts, &softmax(&expected, 0.8));
    }

    #[test]
    fn temperature_2_matches_softmax_of_halved_logits() {
        let logits = [1.0, 0.0, -1.0, 2.0, 0.5];
        let params = SamplingParams {
            temperature: 2.0,
            ..random_params(13)
        };
        let counts = histogram(&params, &logits, 20_000);
        assert_matches(&counts, &softmax(&logits, 2.0));
    }

    /// The filters written the slow, obvious way: full softmax, vLLM v1 order.
    fn reference_distribution(logits: &[f32], p: &SamplingParams) -> Vec<f64> {
        let mut probs = softmax(logits, p.temperature as f64);
        let renormalise = |probs: &mut Vec<f64>| {
            let z: f64 = probs.iter().sum();
            probs.iter_mut().for_each(|x| *x /= z);
        };
        let pmax = probs.iter().copied().fold(0.0, f64::max);
        for x in probs.iter_mut() {
            if *x < p.min_p as f64 * pmax {
                *x = 0.0;
            }
        }
        renormalise(&mut probs);
        let mut order: Vec<usize> = (0..probs.len()).collect();
        order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]).then(a.cmp(&b)));
        if p.top_k > 0 {
            for &i in &order[p.top_k.min(order.len())..] {
                probs[i] = 0.0;
            }
            renormalise(&mut probs);
        }
        if p.top_p >= 1.0 {
            return probs;
        }
        let mut cum = 0.0;
        let mut reached = false;
        for &i in &order {
            if reached {
                probs[i] = 0.0;
            }
            cum += probs[i];
            reached |= cum >= p.top_p as f64 - crate::backend::sample::TOP_P_SLACK as f64;
        }
        renormalise(&mut probs);
        probs
    }

    #[test]
    fn filters_match_the_reference_distribution() {
        let cases = [
            (1.0, 0, 0.99, 0.0),
            (0.6, 20, 0.95, 0.0),
            (1.0, 0, 0.9, 0.0),
            (0.7, 0, 0.5, 0.0),
            (1.3, 0, 0.95, 0.05),
            (1.0, 50, 1.0, 0.1),
            (0.8, 200, 0.7, 0.01),
        ];
        for (case, &(temperature, top_k, top_p, min_p)) in cases.iter().enumerate() {
            let params = SamplingParams {
                temperature,
                top_k,
                top_p,
                min_p,
                ..random_params(0)
            };
            let logits = random_logits(4000, case as u64, 6.0);
            let expected = reference_distribution(&logits, &params);
            let (survivors, total) = survivors(&params, &logits);
            let mut got = vec![0.0; logits.len()];
            for &(id, w) in &survivors {
                got[id as usize] = w / total;
            }
            for (id, (g, e)) in got.iter().zip(&expected).enumerate() {
                assert!(
                    (g - e).abs() <= 1e-6 + 1e-4 * e,
                    "case {case}, token {id}: got {g}, expected {e}"
                );
            }
        }
    }

    #[test]
    fn top_p_on_near_equal_weights_matches_the_reference() {
        // Weights within 0.1% of each other: the cut is decided by small differences.
        let params = SamplingParams {
            top_p: 0.37,
            ..random_params(0)
        };
        let logits: Vec<f32> = random_logits(5000, 31, 1e-3);
        let expected = reference_distribution(&logits, &params);
        let (survivors, total) = survivors(&params, &logits);
        let mut got = vec![0.0; logits.len()];
        for &(id, w) in &survivors {
            got[id as usize] = w / total;
        }
        let kept = got.iter().filter(|&&g| g > 0.0).count();
        assert_eq!(kept, expected.iter().filter(|&&e| e > 0.0).count());
        for (id, (g, e)) in got.iter().zip(&expected).enumerate() {
            assert!((g - e).abs() <= 1e-9 + 1e-4 * e, "token {id}: {g} vs {e}");
        }
    }

    #[test]
    fn top_p_on_equal_logits_keeps_the_lowest_ids() {
        let params = SamplingParams {
            top_p: 0.5,
            ..random_params(0)
        };
        let logits = vec![1.5f32; 1000];
        let mut ids: Vec<u32> = survivors(&params, &logits).0.iter().map(|c| c.0).collect();
        ids.sort_unstable();
        assert_eq!(ids, (0..500).collect::<Vec<u32>>());
    }

    #[test]
    fn min_p_applies_before_top_p() {
        // min-p (bar 0.12) drops token 3; top-p then works on [0.4, 0.3, 0.2] / 0.9, where
        // 0.4 + 0.3 already reach 0.75. The other order would also keep token 2.
        let params = SamplingParams {
            min_p: 0.3,
            top_p: 0.75,
            ..random_params(21)
        };
        let counts = histogram(&params, &logits_of(&[0.4, 0.3, 0.2, 0.1]), 10_000);
        assert_matches(&counts, &[0.4 / 0.7, 0.3 / 0.7, 0.0, 0.0]);
    }

    #[test]
    fn top_p_counts_the_long_tail() {
        // Three likely tokens and a tail of 19 997 that each weigh little but together hold
        // 0.1: the nucleus for top_p = 0.5 is {0, 1}, not {0} as it would be if
        // the tail were forgotten (0.47 >= 0.5 * 0.9).
        let vocab = 20_000;
        let mut probs = vec![0.1 / (vocab - 3) as f64; vocab];
        probs[..3].copy_from_slice(&[0.47, 0.25, 0.18]);
        let logits = logits_of(&probs);
        let params = SamplingParams {
            top_p: 0.5,
            ..random_params(23)
        };
        let expected = reference_distribution(&logits, &params);
        assert!((expected[1] - 0.25 / 0.72).abs() < 1e-6);
        let (survivors, total) = survivors(&params, &logits);
        let mut got: Vec<(u32, f64)> = survivors.iter().map(|&(id, w)| (id, w / total)).collect();
        got.sort_by_key(|c| c.0);
        assert_eq!(got.len(), 2, "{got:?}");
        for (id, p) in got {
            assert!((p - expected[id as usize]).abs() < 1e-6, "token {id}: {p}");
        }
    }

    #[test]
    fn penalties_change_logits_by_the_expected_amounts() {
        let params = SamplingParams {
            repetition_penalty: 2.0,
            presence_penalty: 0.5,
            frequency_penalty: 0.25,
            ..SamplingParams::greedy()
        };
        let mut s = Sampler::new(&params, &[0, 1]);
        for id in [2, 2, 1, 4, 1000] {
            s.accept(id); // 1000 is outside the vocabulary and must be ignored
        }
        let mut logits = [2.0, -2.0, 1.0, 0.5, -1.0, 3.0];
        s.sample(&mut logits);
        let expected = [
            2.0 / 2.0,                    // prompt only: repetition
            -2.0 * 2.0 - 0.25 - 0.5,      // prompt + generated once
            1.0 / 2.0 - 2.0 * 0.25 - 0.5, // generated twice
            0.5,                          // never seen
            -2.0 - 0.25 - 0.5,            // -1.0 * 2: generated once
            3.0,                          // never seen
        ];
        assert_eq!(logits, expected);
    }

    /// A seeded request draws the same tokens whether the backend samples it or the host
    /// does because it asked for logprobs or spelled out penalties that change nothing.
    #[test]
    fn a_seed_draws_the_same_tokens_with_and_without_logprobs_or_zero_penalties() {
        let params = SamplingParams {
            temperature: 0.9,
            top_k: 40,
            top_p: 0.9,
            min_p: 0.01,
            ..random_params(77)
        };
        let variants = [
            SamplingParams {
                logprobs: Some(3),
                ..params.clone()
            },
            SamplingParams {
                repetition_penalty: 1.0,
                presence_penalty: 0.0,
                frequency_penalty: 0.0,
                logprobs: Some(0),
                ..params.clone()
            },
        ];
        let steps: Vec<Vec<f32>> = (0..100).map(|i| random_logits(3000, i, 4.0)).collect();
        let mut device = Sampler::new(&params, &[]);
        let mut scratch = Vec::new();
        let want: Vec<u32> = steps
            .iter()
            .map(|l| {
                let row = device
                    .device_sampling()
                    .expect("the backend can sample this");
                sample_row(l, &row, &mut scratch)
            })
            .collect();
        assert!(want.iter().collect::<HashSet<_>>().len() > 10, "real draws");
        let mut host = Sampler::new(&params, &[]);
        let got: Vec<u32> = steps.iter().map(|l| host.sample(&mut l.clone())).collect();
        assert_eq!(got, want, "host without logprobs");
        for p in &variants {
            let mut s = Sampler::new(p, &[]);
            assert!(s.device_sampling().is_none(), "{p:?} samples on the host");
            let mut s = Sampler::new(p, &[]);
            let got: Vec<u32> = steps
                .iter()
                .map(|l| {
                    let (id, lp) = s.sample_with_logprobs(&mut l.clone());
                    assert!(lp.is_some());
                    s.accept(id);
                    id
                })
                .collect();
            assert_eq!(got, want, "{p:?}");
        }
    }

    #[test]
    fn penalties_can_move_the_greedy_choice() {
        let params = SamplingParams {
            frequency_penalty: 1.0,
            ..SamplingParams::greedy()
        };
        let mut s = Sampler::new(&params, &[]);
        let logits = [1.0, 2.5, 2.0];
        assert_eq!(s.sample(&mut logits.clone()), 1);
        s.accept(1);
        assert_eq!(s.sample(&mut logits.clone()), 2); // 2.5 - 1 < 2
    }

    #[test]
    fn validate_accepts_defaults_and_rejects_each_bad_field() {
        SamplingParams::default().validate().unwrap();
        SamplingParams::greedy().validate().unwrap();
        SamplingParams::with_generation_defaults(Some(0.6), Some(20), Some(0.95))
            .validate()
            .unwrap();
        let d = SamplingParams::default;
        let bad: Vec<(&str, SamplingParams)> = vec![
            (
                "temperature",
                SamplingParams {
                    temperature: f32::NAN,
                    ..d()
                },
            ),
            (
                "temperature",
                SamplingParams {
                    temperature: -0.1,
                    ..d()
                },
            ),
            (
                "temperature",
                SamplingParams {
                    temperature: f32::INFINITY,
                    ..d()
                },
            ),
            ("top_p", SamplingParams { top_p: 0.0, ..d() }),
            ("top_p", SamplingParams { top_p: 1.01, ..d() }),
            (
                "top_p",
                SamplingParams {
                    top_p: f32::NAN,
                    ..d()
                },
            ),
            ("min_p", SamplingParams { min_p: -0.1, ..d() }),
            ("min_p", SamplingParams { min_p: 1.5, ..d() }),
            (
                "min_p",
                SamplingParams {
                    min_p: f32::NAN,
                    ..d()
                },
            ),
            (
                "repetition_penalty",
                SamplingParams {
                    repetition_penalty: 0.0,
                    ..d()
                },
            ),
            (
                "repetition_penalty",
                SamplingParams {
                    repetition_penalty: -1.0,
                    ..d()
                },
            ),
            (
                "repetition_penalty",
                SamplingParams {
                    repetition_penalty: f32::NAN,
                    ..d()
                },
            ),
            (
                "presence_penalty",
                SamplingParams {
                    presence_penalty: 2.5,
                    ..d()
                },
            ),
            (
                "presence_penalty",
                SamplingParams {
                    presence_penalty: f32::NAN,
                    ..d()
                },
            ),
            (
                "frequency_penalty",
                SamplingParams {
                    frequency_penalty: -2.1,
                    ..d()
                },
            ),
            (
                "max_tokens",
                SamplingParams {
                    max_tokens: Some(0),
                    ..d()
                },
            ),
            (
                "logprobs",
                SamplingParams {
                    logprobs: Some(21),
                    ..d()
                },
            ),
            (
                "stop",
                SamplingParams {
                    stop: vec!["ok".into(), String::new()],
                    ..d()
                },
            ),
        ];
        for (field, params) in bad {
            match params.validate() {
                Err(Error::InvalidParam { param, message }) => {
                    assert_eq!(param, field);
                    assert!(message.starts_with(field), "{field}: message {message:?}")
                }
                other => panic!("{field}: expected InvalidParam, got {other:?}"),
            }
        }
    }

    #[test]
    fn generation_defaults_override_only_what_they_give() {
        let p = SamplingParams::with_generation_defaults(Some(0.6), None, Some(0.95));
        assert_eq!((p.temperature, p.top_k, p.top_p), (0.6, 0, 0.95));
        assert_eq!(p.max_tokens, SamplingParams::default().max_tokens);
    }

    #[test]
    fn params_deserialize_with_defaults() {
        let p: SamplingParams = serde_json::from_str(r#"{"top_k": 5, "stop": ["x"]}"#).unwrap();
        assert_eq!(
            p,
            SamplingParams {
                top_k: 5,
                stop: vec!["x".into()],
                ..SamplingParams::default()
            }
        );
    }

    #[test]
    fn logprobs_are_a_normalised_log_softmax() {
        let logits = random_logits(1000, 17, 5.0);
        let lp = logprobs(&logits, 123, logits.len());
        let total: f64 = lp.top.iter().map(|&(_, l)| (l as f64).exp()).sum();
        assert!((total - 1.0).abs() < 1e-4, "probabilities sum to {total}");

        let probs = softmax(&logits, 1.0);
        assert!((lp.chosen_logprob as f64 - probs[123].ln()).abs() < 1e-5);
        for &(id, l) in &lp.top {
            assert!((l as f64 - probs[id as usize].ln()).abs() < 1e-5);
        }
        assert!(lp.top.windows(2).all(|w| w[0].1 >= w[1].1));
    }

    #[test]
    fn top_logprobs_are_the_most_likely_tokens_ties_by_id() {
        let logits = [0.5, 3.0, 1.0, 3.0, f32::NAN, 2.0];
        let lp = logprobs(&logits, 4, 3);
        let ids: Vec<u32> = lp.top.iter().map(|t| t.0).collect();
        assert_eq!(ids, [1, 3, 5]);
        assert_eq!(lp.chosen_logprob, f32::NEG_INFINITY);
        assert!(logprobs(&logits, 0, 0).top.is_empty());
    }

    #[test]
    fn sample_with_logprobs_reports_the_raw_distribution() {
        let logits = [1.0f32, 2.0, 0.5];
        let params = SamplingParams {
            repetition_penalty: 3.0,
            logprobs: Some(2),
            ..SamplingParams::greedy()
        };
        // The penalty on token 1 (2.0 -> 0.667) makes token 0 the choice...
        let mut s = Sampler::new(&params, &[1]);
        let (id, lp) = s.sample_with_logprobs(&mut logits.clone());
        assert_eq!(id, 0);
        // ...but the logprobs are those of the unmodified logits.
        let lp = lp.unwrap();
        let probs = softmax(&logits, 1.0);
        assert!((lp.chosen_logprob as f64 - probs[0].ln()).abs() < 1e-6);
        assert_eq!(lp.top.iter().map(|t| t.0).collect::<Vec<_>>(), [1, 0]);

        let mut s = Sampler::new(&SamplingParams::greedy(), &[]);
        assert_eq!(s.sample_with_logprobs(&mut logits.clone()), (1, None));
    }
}
