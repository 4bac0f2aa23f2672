//! The dashboard's memory of the last hours: fixed-size rings of one-line samples of the
//! engine's metrics, kept by the server so that a page opened late still sees history.
//!
//! ```text
//! every second: Reading (counters, histogram buckets, gauges, RSS) ─▶ recent (last 11)
//!                    │ rates over the last second, percentiles over the last 10 s
//!                    ▼
//!               fine ring:   1 s × 600  (10 minutes)
//!               coarse ring: 10 s × 1080 (3 hours), every 10th second, all over 10 s
//! ```
//!
//! A [`Sample`] holds rates (requests finished, prompt and generated tokens, 429s per
//! second), latency percentiles (end to end and time to first token, interpolated inside
//! the histogram's buckets as Prometheus' `histogram_quantile` does), gauges (running and
//! waiting requests, KV blocks) and memory. Both rings are allocated once at their full
//! capacity and never grow: [`History::BYTES`] is what they hold, 1680 samples of 112 bytes
//! (on 64-bit targets): 188 KB.
//!
//! Sampling starts once the model is loaded (loading's memory growth would swamp the memory
//! slope) and stops with the server. `GET /dashboard/data` ([`History::json`]) sends a ring
//! as columns, with the resident memory's slope in MB/hour from a least-squares line over
//! the ring (once it spans a minute).

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::engine::{Engine, MetricsSnapshot};

/// Samples in the fine ring (one a second: 10 minutes).
pub const FINE_LEN: usize = 600;
/// Samples in the coarse ring (one every [`COARSE_EVERY`] seconds: 3 hours).
pub const COARSE_LEN: usize = 1080;
/// Seconds per coarse sample, and the window of the fine samples' percentiles.
pub const COARSE_EVERY: usize = 10;

/// The metrics at one instant: what two readings are compared over.
#[derive(Clone, Debug)]
pub struct Reading {
    /// When it was taken.
    pub at: Instant,
    /// The same instant, in milliseconds since the epoch (the charts' time axis).
    pub unix_ms: u64,
    /// The engine's scalars.
    pub snap: MetricsSnapshot,
    /// End-to-end latency histogram: cumulative count per bucket of
    /// [`LATENCY_BUCKETS`](crate::engine::metrics::LATENCY_BUCKETS), then `+Inf`.
    pub e2e: Vec<u64>,
    /// Time-to-first-token histogram, likewise.
    pub ttft: Vec<u64>,
    /// Responses with status 429 so far.
    pub refused: u64,
    /// Resident memory, bytes.
    pub resident: u64,
    /// GPU buffers, bytes, on a GPU.
    pub gpu: Option<u64>,
}

impl Reading {
    /// Reads the engine's metrics and the process's memory now.
    pub fn take(engine: &Engine, gpu: Option<u64>, refused: u64) -> Reading {
        let m = engine.metrics();
        let counts = |h: &crate::engine::Histogram| h.cumulative().iter().map(|c| c.1).collect();
        Reading {
            at: Instant::now(),
            unix_ms: super::unix_now_ms(),
            snap: m.snapshot(),
            e2e: counts(&m.e2e_latency),
            ttft: counts(&m.time_to_first_token),
            refused,
            resident: super::metrics::resident_bytes(),
            gpu,
        }
    }
}

/// One point of every chart.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Sample {
    /// Milliseconds since the epoch.
    pub t_ms: u64,
    /// Requests finished (any reason) per second.
    pub requests_per_s: f32,
    /// Requests refused with 429 per second.
    pub refused_per_s: f32,
    /// Prompt tokens admitted per second.
    pub prompt_tokens_per_s: f32,
    /// Tokens generated per second.
    pub generation_tokens_per_s: f32,
    /// End-to-end latency percentiles (50, 95, 99), seconds; `None` when no request ended.
    pub e2e: [Option<f32>; 3],
    /// Time-to-first-token percentiles (50, 95, 99), seconds.
    pub ttft: [Option<f32>; 3],
    /// Sequences running.
    pub running: u32,
    /// Requests waiting.
    pub waiting: u32,
    /// KV blocks held by sequences.
    pub kv_used: u32,
    /// Free KV blocks still holding a cached prefix.
    pub kv_cached: u32,
    /// KV blocks in the pool.
    pub kv_total: u32,
    /// Prompt tokens found in the prefix cache over those looked up; `None` without lookups.
    pub prefix_hit_rate: Option<f32>,
    /// Resident memory, MB (10^6 bytes).
    pub resident_mb: f32,
    /// GPU buffers, MB, on a GPU.
    pub gpu_mb: Option<f32>,
}

/// The percentiles the charts draw.
const QUANTILES: [f64; 3] = [0.5, 0.95, 0.99];

/// The `q` quantile of the observations between two cumulative bucket counts, interpolated
/// linearly inside its bucket (from the bucket below's bound; the `+Inf` bucket answers the
/// largest finite bound). `None` when nothing was observed in between.
pub fn quantile(old: &[u64], new: &[u64], q: f64) -> Option<f64> {
    let bounds = crate::engine::metrics::LATENCY_BUCKETS;
    let delta = |i: usize| new[i].saturating_sub(old.get(i).copied().unwrap_or(0));
    let total = delta(new.len().checked_sub(1)?);
    if total == 0 {
        return None;
    }
    let rank = q.clamp(0.0, 1.0) * total as f64;
    let mut below = 0u64;
    for i in 0..new.len() {
        let c = delta(i);
        if (c as f64) >= rank && c > below {
            let Some(&hi) = bounds.get(i) else {
                return bounds.last().copied();
            };
            let lo = if i == 0 { 0.0 } else { bounds[i - 1] };
            let f = (rank - below as f64) / (c - below) as f64;
            return Some(lo + (hi - lo) * f.clamp(0.0, 1.0));
        }
        below = c;
    }
    bounds.last().copied()
}

/// The sample from `old` to `new`: rates over `rate_from`→`new`, percentiles and the hit
/// rate over `old`→`new`, gauges at `new`.
fn sample(rate_from: &Reading, old: &Reading, new: &Reading) -> Sample {
    let dt = new.at.duration_since(rate_from.at).as_secs_f32().max(1e-3);
    let (a, b) = (&rate_from.snap, &new.snap);
    let finished = |s: &MetricsSnapshot| {
        s.finished_stop + s.finished_length + s.finished_cancelled + s.finished_error
    };
    let rate = |x: u64, y: u64| y.saturating_sub(x) as f32 / dt;
    let pct = |o: &[u64], n: &[u64]| QUANTILES.map(|q| quantile(o, n, q).map(|v| v as f32));
    let queried = b
        .prefix_cache_query_tokens
        .saturating_sub(old.snap.prefix_cache_query_tokens);
    let hits = b
        .prefix_cache_hit_tokens
        .saturating_sub(old.snap.prefix_cache_hit_tokens);
    let mb = |bytes: u64| (bytes as f64 / 1e6) as f32;
    let small = |x: u64| u32::try_from(x).unwrap_or(u32::MAX);
    Sample {
        t_ms: new.unix_ms,
        requests_per_s: rate(finished(a), finished(b)),
        refused_per_s: rate(rate_from.refused, new.refused),
        prompt_tokens_per_s: rate(a.prompt_tokens, b.prompt_tokens),
        generation_tokens_per_s: rate(a.generation_tokens, b.generation_tokens),
        e2e: pct(&old.e2e, &new.e2e),
        ttft: pct(&old.ttft, &new.ttft),
        running: small(b.running),
        waiting: small(b.waiting),
        kv_used: small(b.kv_blocks_used),
        kv_cached: small(b.kv_blocks_cached),
        kv_total: small(b.kv_blocks_total),
        prefix_hit_rate: (queried > 0).then(|| hits as f32 / queried as f32),
        resident_mb: mb(new.resident),
        gpu_mb: new.gpu.map(mb),
    }
}

/// A ring of samples that holds at most its capacity, allocated up front.
#[derive(Debug)]
pub struct Ring {
    samples: VecDeque<Sample>,
    cap: usize,
    /// Seconds between samples.
    pub step_s: u64,
}

impl Ring {
    /// An empty ring of `cap` samples `step_s` apart.
    pub fn new(cap: usize, step_s: u64) -> Ring {
        Ring {
            samples: VecDeque::with_capacity(cap),
            cap,
            step_s,
        }
    }

    /// Adds `s`, dropping the oldest sample when full.
    pub fn push(&mut self, s: Sample) {
        if self.samples.len() == self.cap {
            self.samples.pop_front();
        }
        self.samples.push_back(s);
    }

    /// Samples held.
    pub fn len(&self) -> usize {
        self.samples.len()
    }

    /// No samples yet.
    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// Most samples held.
    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// The samples, oldest first.
    pub fn iter(&self) -> impl Iterator<Item = &Sample> {
        self.samples.iter()
    }

    /// Resident memory's slope in MB/hour: a least-squares line through every sample.
    /// `None` until the samples span a minute (over seconds, a single allocation reads as
    /// gigabytes an hour).
    pub fn memory_slope_mb_per_hour(&self) -> Option<f64> {
        let n = self.samples.len();
        let (first, last) = (self.samples.front()?, self.samples.back()?);
        if last.t_ms.saturating_sub(first.t_ms) < 60_000 {
            return None;
        }
        let t0 = first.t_ms;
        let pts = self
            .samples
            .iter()
            .map(|s| ((s.t_ms - t0) as f64 / 3.6e6, s.resident_mb as f64));
        let (mut sx, mut sy, mut sxx, mut sxy) = (0.0, 0.0, 0.0, 0.0);
        for (x, y) in pts {
            sx += x;
            sy += y;
            sxx += x * x;
            sxy += x * y;
        }
        let n = n as f64;
        let den = n * sxx - sx * sx;
        (den > 0.0).then(|| (n * sxy - sx * sy) / den)
    }
}

/// Which ring a page asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Range {
    /// One sample a second, 10 minutes.
    Fine,
    /// One sample every 10 seconds, 3 hours.
    Coarse,
}

struct Inner {
    /// The last readings, oldest first: at most `COARSE_EVERY + 1`.
    recent: VecDeque<Reading>,
    fine: Ring,
    coarse: Ring,
    /// Readings taken (the coarse ring takes every `COARSE_EVERY`th).
    ticks: u64,
}

/// Both rings behind one lock, fed by [`History::record`].
pub struct History {
    inner: Mutex<Inner>,
}

impl Default for History {
    fn default() -> Self {
        History {
            inner: Mutex::new(Inner {
                recent: VecDeque::with_capacity(COARSE_EVERY + 1),
                fine: Ring::new(FINE_LEN, 1),
                coarse: Ring::new(COARSE_LEN, COARSE_EVERY as u64),
                ticks: 0,
            }),
        }
    }
}

impl History {
    /// Bytes the two rings hold at full capacity (the readings kept besides are a few KB).
    pub const BYTES: usize = (FINE_LEN + COARSE_LEN) * std::mem::size_of::<Sample>();

    /// Adds a reading taken about a second after the previous one: a fine sample, and every
    /// [`COARSE_EVERY`]th reading a coarse one.
    pub fn record(&self, r: Reading) {
        let Ok(mut h) = self.inner.lock() else { return };
        if h.recent.is_empty() {
            // The engine's counters start at zero when it starts, at most a tick before this
            // first reading: a zero reading a second earlier lets the first sample count
            // the requests that ended in between.
            h.recent.push_back(Reading {
                at: r.at.checked_sub(Duration::from_secs(1)).unwrap_or(r.at),
                unix_ms: r.unix_ms.saturating_sub(1000),
                snap: MetricsSnapshot::default(),
                e2e: vec![0; r.e2e.len()],
                ttft: vec![0; r.ttft.len()],
                refused: 0,
                ..r.clone()
            });
        }
        if h.recent.len() == COARSE_EVERY + 1 {
            h.recent.pop_front();
        }
        h.recent.push_back(r);
        h.ticks += 1;
        let n = h.recent.len();
        if n < 2 {
            return;
        }
        let (oldest, prev, now) = (&h.recent[0], &h.recent[n - 2], &h.recent[n - 1]);
        let fine = sample(prev, oldest, now);
        let coarse = (n == COARSE_EVERY + 1 && h.ticks % COARSE_EVERY as u64 == 0)
            .then(|| sample(oldest, oldest, now));
        h.fine.push(fine);
        if let Some(c) = coarse {
            h.coarse.push(c);
        }
    }

    /// Runs `f` on a ring.
    pub fn with<T>(&self, range: Range, f: impl FnOnce(&Ring) -> T) -> Option<T> {
        let h = self.inner.lock().ok()?;
        Some(f(match range {
            Range::Fine => &h.fine,
            Range::Coarse => &h.coarse,
        }))
    }

    /// A ring's samples newer than `since_ms`, as columns (`t` in ms, then one array per
    /// series, `null` where a value is unknown), with the ring's size and memory slope.
    pub fn json(&self, range: Range, since_ms: u64) -> Value {
        self.with(range, |ring| {
            let rows: Vec<&Sample> = ring.iter().filter(|s| s.t_ms > since_ms).collect();
            let col = |f: &dyn Fn(&Sample) -> Option<f32>| -> Value {
                rows.iter()
                    .map(|s| f(s).map_or(Value::Null, |v| json!(round(v))))
                    .collect()
            };
            json!({
                "step_s": ring.step_s,
                "capacity": ring.capacity(),
                "len": ring.len(),
                "memory_slope_mb_per_hour": ring.memory_slope_mb_per_hour().map(|v| round(v as f32)),
                "t": rows.iter().map(|s| s.t_ms).collect::<Vec<_>>(),
                "series": {
                    "requests_per_s": col(&|s| Some(s.requests_per_s)),
                    "refused_per_s": col(&|s| Some(s.refused_per_s)),
                    "prompt_tokens_per_s": col(&|s| Some(s.prompt_tokens_per_s)),
                    "generation_tokens_per_s": col(&|s| Some(s.generation_tokens_per_s)),
                    "e2e_p50": col(&|s| s.e2e[0]),
                    "e2e_p95": col(&|s| s.e2e[1]),
                    "e2e_p99": col(&|s| s.e2e[2]),
                    "ttft_p50": col(&|s| s.ttft[0]),
                    "ttft_p95": col(&|s| s.ttft[1]),
                    "ttft_p99": col(&|s| s.ttft[2]),
                    "running": col(&|s| Some(s.running as f32)),
                    "waiting": col(&|s| Some(s.waiting as f32)),
                    "kv_used": col(&|s| Some(s.kv_used as f32)),
                    "kv_cached": col(&|s| Some(s.kv_cached as f32)),
                    "kv_total": col(&|s| Some(s.kv_total as f32)),
                    "prefix_hit_rate": col(&|s| s.prefix_hit_rate),
                    "resident_mb": col(&|s| Some(s.resident_mb)),
                    "gpu_mb": col(&|s| s.gpu_mb),
                },
            })
        })
        .unwrap_or(Value::Null)
    }
}

// The rings' memory is a budget: growing a sample or a ring is a decision, not an accident.
const _: () = assert!(
    History::BYTES <= 192_000,
    "the rings grew past their budget"
);

/// Four significant digits are plenty for a chart and keep the JSON short; counts (1000
/// and up) stay whole and exact.
fn round(v: f32) -> f64 {
    let v = v as f64;
    if v == 0.0 || !v.is_finite() {
        return 0.0;
    }
    if v.abs() >= 1000.0 {
        return v.round();
    }
    let scale = 10f64.powi(3 - v.abs().log10().floor() as i32);
    (v * scale).round() / scale
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(start: Instant, s: u64, finished: u64, e2e: &[u64], rss_mb: u64) -> Reading {
        let buckets = crate::engine::metrics::LATENCY_BUCKETS.len() + 1;
        // Cumulative counts: `e2e` lists observations per bucket index.
        let mut cum = vec![0; buckets];
        for &i in e2e {
            for c in &mut cum[i as usize..] {
                *c += 1;
            }
        }
        Reading {
            at: start + Duration::from_secs(s),
            unix_ms: 1_000_000 + s * 1000,
            snap: MetricsSnapshot {
                finished_stop: finished,
                generation_tokens: finished * 10,
                running: 2,
                ..Default::default()
            },
            e2e: cum.clone(),
            ttft: cum,
            refused: s / 2,
            resident: rss_mb * 1_000_000,
            gpu: None,
        }
    }

    #[test]
    fn quantiles_interpolate_inside_buckets() {
        let b = crate::engine::metrics::LATENCY_BUCKETS;
        let n = b.len() + 1;
        let old = vec![0; n];
        // 10 observations in the bucket (0.1, 0.15].
        let i = b.iter().position(|&x| x == 0.15).unwrap();
        let new: Vec<u64> = (0..n).map(|j| if j >= i { 10 } else { 0 }).collect();
        assert_eq!(quantile(&old, &new, 0.5), Some(0.125));
        assert_eq!(quantile(&old, &new, 1.0), Some(0.15));
        assert_eq!(quantile(&new, &new, 0.5), None);
        // Past the last bound: the last bound.
        let mut inf = vec![0; n];
        inf[n - 1] = 3;
        assert_eq!(quantile(&old, &inf, 0.95), b.last().copied());
    }

    #[test]
    fn rings_keep_a_fixed_size_and_rates_are_per_second() {
        let h = History::default();
        let t0 = Instant::now();
        let bucket_1s = crate::engine::metrics::LATENCY_BUCKETS
            .iter()
            .position(|&x| x == 1.0)
            .unwrap() as u64;
        let mut e2e = Vec::new();
        for s in 0..2000u64 {
            // Two requests end every second, each taking (0.75, 1] s; memory grows 36 MB/hour.
            e2e.extend([bucket_1s, bucket_1s]);
            h.record(reading(t0, s, 2 * s, &e2e, 500 + s / 100));
        }
        let (fine_len, fine_cap) = h.with(Range::Fine, |r| (r.len(), r.capacity())).unwrap();
        assert_eq!((fine_len, fine_cap), (FINE_LEN, FINE_LEN));
        let coarse_len = h.with(Range::Coarse, |r| r.len()).unwrap();
        assert_eq!(coarse_len, 200, "one per 10 s");
        let last = h.with(Range::Fine, |r| *r.iter().last().unwrap()).unwrap();
        assert_eq!(last.requests_per_s, 2.0);
        assert_eq!(last.generation_tokens_per_s, 20.0);
        assert_eq!(last.running, 2);
        let p95 = last.e2e[1].unwrap();
        assert!(p95 > 0.75 && p95 <= 1.0, "{p95}");
        let coarse = h
            .with(Range::Coarse, |r| *r.iter().last().unwrap())
            .unwrap();
        assert_eq!(coarse.requests_per_s, 2.0);
        let slope = h
            .with(Range::Coarse, |r| r.memory_slope_mb_per_hour())
            .unwrap()
            .unwrap();
        assert!((slope - 36.0).abs() < 1.0, "{slope}");
    }

    #[test]
    fn json_sends_columns_newer_than_since() {
        let h = History::default();
        let t0 = Instant::now();
        for s in 1..6 {
            h.record(reading(t0, s, s, &[], 100));
        }
        let all = h.json(Range::Fine, 0);
        assert_eq!(all["len"], 5, "the first reading is compared with zero");
        assert_eq!(all["capacity"], FINE_LEN);
        assert_eq!(all["t"].as_array().unwrap().len(), 5);
        assert_eq!(all["series"]["e2e_p95"][0], Value::Null);
        // The request that ended before the first reading counts.
        assert_eq!(
            all["series"]["requests_per_s"],
            json!([1.0, 1.0, 1.0, 1.0, 1.0])
        );
        assert_eq!(
            all["memory_slope_mb_per_hour"],
            Value::Null,
            "under a minute"
        );
        let newer = h.json(Range::Fine, 1_000_000 + 4000);
        assert_eq!(newer["t"], json!([1_005_000]));
        assert_eq!(newer["series"]["running"], json!([2.0]));
    }
}
