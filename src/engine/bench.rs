//! `wick bench --concurrency N --shared-prefix K`: the engine under concurrent load.
//!
//! Two runs on the same engine, one after the other:
//!
//! 1. one request alone, for the single-sequence decode speed;
//! 2. `N + 1` requests whose prompts start with the same `K` random tokens (then differ): the
//!    first alone, which leaves the shared prefix in the prefix cache, then the other `N`
//!    submitted at once, which decode together.
//!
//! Decode speed is measured from each token's arrival time: the tokens that arrive while
//! every request of the run is decoding (after the last first token, before the first
//! finish), divided by that window. Prefill is reported as prompt tokens computed versus
//! taken from the prefix cache, per request and in total.

use std::time::{Duration, Instant};

use serde::Serialize;

use super::{Engine, EngineEvent, Prompt, Request};
use crate::error::{Error, Result};
use crate::sampler::SamplingParams;

/// What to run.
#[derive(Clone, Copy, Debug)]
pub struct ConcurrencyOptions {
    /// Requests decoding together.
    pub concurrency: usize,
    /// Prompt tokens per request.
    pub n_prompt: usize,
    /// Tokens each request generates.
    pub n_gen: usize,
    /// Leading prompt tokens every request shares.
    pub shared_prefix: usize,
    /// Vocabulary size (prompts are random ids below it).
    pub vocab: usize,
    /// Seed of the random prompts.
    pub seed: u64,
}

/// One request's figures.
#[derive(Clone, Debug, Serialize)]
pub struct RequestFigures {
    /// Prompt tokens taken from the prefix cache.
    pub cached_tokens: usize,
    /// Prompt tokens computed.
    pub computed_tokens: usize,
    /// Share of the shared prefix that came from the cache (1 when there is none).
    pub shared_reused: f64,
    /// Time to first token.
    pub ttft_ms: f64,
}

/// Results.
#[derive(Clone, Debug, Serialize)]
pub struct ConcurrencyReport {
    /// Requests decoding together (after one that warms the prefix cache).
    pub concurrency: usize,
    /// Prompt tokens per request.
    pub n_prompt: usize,
    /// Generated tokens per request.
    pub n_gen: usize,
    /// Shared leading prompt tokens.
    pub shared_prefix: usize,
    /// Decode tok/s of one request alone.
    pub single_decode_tok_s: f64,
    /// Aggregate decode tok/s while all requests decode together.
    pub aggregate_decode_tok_s: f64,
    /// `aggregate / single`.
    pub speedup: f64,
    /// Generated tokens of the `N` requests over their wall time (prefill included).
    pub end_to_end_tok_s: f64,
    /// Prompt tokens computed by the first request and the `N`.
    pub prefill_computed: usize,
    /// Prompt tokens the first request and the `N` took from the prefix cache.
    pub prefill_reused: usize,
    /// Smallest share of the shared prefix reused by a request after the first.
    pub min_shared_reused_after_first: Option<f64>,
    /// Preemptions during the run.
    pub preemptions: u64,
    /// Per request, in submission order (the first is the one that ran alone).
    pub requests: Vec<RequestFigures>,
}

/// Random ids from a fixed generator (xorshift), away from the special tokens at the top.
fn random_ids(seed: u64, n: usize, vocab: usize) -> Vec<u32> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let hi = (vocab.saturating_sub(1024)).max(2) as u64;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (1 + s % (hi - 1)) as u32
        })
        .collect()
}

struct Trace {
    submitted: Instant,
    tokens: Vec<Instant>,
    cached: usize,
}

/// Consumes a stream on its own thread, recording each token's arrival.
fn collect(
    mut s: super::RequestStream,
    submitted: Instant,
) -> std::thread::JoinHandle<Result<Trace>> {
    std::thread::spawn(move || {
        let mut t = Trace {
            submitted,
            tokens: Vec::new(),
            cached: 0,
        };
        while let Some(ev) = s.blocking_next() {
            match ev {
                EngineEvent::Delta { token_ids, .. } => {
                    let now = Instant::now();
                    t.tokens.extend(token_ids.iter().map(|_| now));
                }
                EngineEvent::Finished(c) => {
                    t.cached = c.usage.cached_tokens;
                    // The last token (an end-of-sequence id) may come without a delta.
                    while t.tokens.len() < c.usage.completion_tokens {
                        t.tokens.push(Instant::now());
                    }
                    return Ok(t);
                }
                EngineEvent::Error(e) => return Err(Error::Engine(e)),
            }
        }
        Err(Error::Engine("the stream ended early".into()))
    })
}

/// Tokens arriving while every trace decodes, per second.
fn decode_rate(traces: &[Trace]) -> f64 {
    let start = traces.iter().filter_map(|t| t.tokens.first()).max();
    let end = traces.iter().filter_map(|t| t.tokens.last()).min();
    let (Some(&start), Some(&end)) = (start, end) else {
        return 0.0;
    };
    if end <= start {
        return 0.0;
    }
    let n = traces
        .iter()
        .flat_map(|t| &t.tokens)
        .filter(|&&x| x > start && x <= end)
        .count();
    n as f64 / (end - start).as_secs_f64()
}

/// Runs the benchmark on `engine`.
pub fn run(engine: &Engine, o: &ConcurrencyOptions) -> Result<ConcurrencyReport> {
    if o.concurrency == 0 || o.n_gen < 2 || o.n_prompt <= o.shared_prefix {
        return Err(Error::InvalidRequest(
            "need --concurrency ≥ 1, --n-gen ≥ 2 and --n-prompt > --shared-prefix".into(),
        ));
    }
    let params = SamplingParams {
        max_tokens: Some(o.n_gen),
        ignore_eos: true,
        ..SamplingParams::greedy()
    };
    let shared = random_ids(o.seed, o.shared_prefix, o.vocab);
    let prompt = |i: usize| -> Vec<u32> {
        let mut p = shared.clone();
        p.extend(random_ids(
            o.seed + 1 + i as u64,
            o.n_prompt - o.shared_prefix,
            o.vocab,
        ));
        p
    };
    let submit = |ids: Vec<u32>| -> Result<(Instant, super::RequestStream)> {
        let t = Instant::now();
        let s = engine.submit(Request {
            prompt: Prompt::Ids(ids),
            params: params.clone(),
        })?;
        Ok((t, s))
    };

    // 1. Alone (a prompt unrelated to the shared prefix).
    let (t, s) = submit(random_ids(o.seed ^ 0x5eed, o.n_prompt, o.vocab))?;
    let single = collect(s, t)
        .join()
        .map_err(|_| Error::Engine("bench thread panicked".into()))??;
    let single_rate = match (single.tokens.first(), single.tokens.last()) {
        (Some(&a), Some(&b)) if b > a => (single.tokens.len() - 1) as f64 / (b - a).as_secs_f64(),
        _ => 0.0,
    };

    // 2. The first request alone, then N together.
    let before = engine.metrics().snapshot();
    let (t, s) = submit(prompt(0))?;
    let first = collect(s, t)
        .join()
        .map_err(|_| Error::Engine("bench thread panicked".into()))??;
    let t0 = Instant::now();
    let mut handles = Vec::new();
    for i in 1..=o.concurrency {
        let (t, s) = submit(prompt(i))?;
        handles.push(collect(s, t));
    }
    let mut traces = Vec::new();
    for h in handles {
        traces.push(
            h.join()
                .map_err(|_| Error::Engine("bench thread panicked".into()))??,
        );
    }
    let wall = t0.elapsed();
    let after = engine.metrics().snapshot();

    let generated: usize = traces.iter().map(|t| t.tokens.len()).sum();
    let aggregate = if o.concurrency == 1 {
        single_rate
    } else {
        decode_rate(&traces)
    };
    let requests: Vec<RequestFigures> = std::iter::once(&first)
        .chain(&traces)
        .map(|t| RequestFigures {
            cached_tokens: t.cached,
            computed_tokens: o.n_prompt - t.cached,
            shared_reused: if o.shared_prefix == 0 {
                1.0
            } else {
                t.cached.min(o.shared_prefix) as f64 / o.shared_prefix as f64
            },
            ttft_ms: t
                .tokens
                .first()
                .map_or(Duration::ZERO, |&f| f - t.submitted)
                .as_secs_f64()
                * 1e3,
        })
        .collect();
    Ok(ConcurrencyReport {
        concurrency: o.concurrency,
        n_prompt: o.n_prompt,
        n_gen: o.n_gen,
        shared_prefix: o.shared_prefix,
        single_decode_tok_s: single_rate,
        aggregate_decode_tok_s: aggregate,
        speedup: aggregate / single_rate.max(1e-9),
        end_to_end_tok_s: generated as f64 / wall.as_secs_f64(),
        prefill_computed: requests.iter().map(|r| r.computed_tokens).sum(),
        prefill_reused: requests.iter().map(|r| r.cached_tokens).sum(),
        min_shared_reused_after_first: requests
            .iter()
            .skip(1)
            .map(|r| r.shared_reused)
            .min_by(f64::total_cmp),
        preemptions: after.preemptions - before.preemptions,
        requests,
    })
}

/// A [`ConcurrencyReport`] with the model and device, as `wick bench --concurrency` prints it.
#[derive(Clone, Debug)]
pub struct ConcurrencySummary {
    /// The model's name.
    pub model: String,
    /// The device it ran on.
    pub device: String,
    /// Every GPU buffer wick holds after the run (GPU only).
    pub gpu_memory_bytes: Option<u64>,
    /// How long loading the model took.
    pub load_times: crate::loader::LoadTimes,
    /// The measurements.
    pub report: ConcurrencyReport,
}

impl ConcurrencySummary {
    /// The report as JSON, with the summary's fields added.
    pub fn to_json(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(&self.report).expect("plain numbers serialize");
        v["model"] = self.model.clone().into();
        v["device"] = self.device.clone().into();
        v["gpu_memory_bytes"] = self.gpu_memory_bytes.into();
        v["load_seconds"] = self.load_times.to_json();
        v
    }
}

impl std::fmt::Display for ConcurrencySummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let r = &self.report;
        let n = r.concurrency;
        writeln!(f, "model {} on {}", self.model, self.device)?;
        writeln!(f, "load: {}", self.load_times)?;
        writeln!(
            f,
            "{n} requests, {} prompt tokens ({} shared), {} generated each",
            r.n_prompt, r.shared_prefix, r.n_gen
        )?;
        writeln!(
            f,
            "decode: 1 request {:.1} tok/s; {n} together {:.1} tok/s aggregate ({:.2}x); \
             end to end {:.1} tok/s",
            r.single_decode_tok_s, r.aggregate_decode_tok_s, r.speedup, r.end_to_end_tok_s
        )?;
        write!(
            f,
            "prefill: {} prompt tokens computed, {} reused from the prefix cache; {} preemptions",
            r.prefill_computed, r.prefill_reused, r.preemptions
        )?;
        if let Some(s) = r.min_shared_reused_after_first {
            write!(
                f,
                "\nshared prefix reused by every request after the first: at least {:.0}%",
                s * 100.0
            )?;
        }
        for (i, q) in r.requests.iter().enumerate() {
            write!(
                f,
                "\n  request {i}: {} cached, {} computed, ttft {:.0} ms",
                q.cached_tokens, q.computed_tokens, q.ttft_ms
            )?;
        }
        Ok(())
    }
}
