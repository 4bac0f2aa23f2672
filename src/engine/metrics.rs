//! What the engine counts, for `/metrics` and `wick bench`: lock-free counters and gauges,
//! and latency histograms with Prometheus-style cumulative buckets.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::generate::FinishReason;

/// Upper bounds (seconds) of the latency histograms' buckets; `+Inf` is implied.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0,
    2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0,
];

/// A histogram of durations over [`LATENCY_BUCKETS`].
#[derive(Debug)]
pub struct Histogram {
    /// Observations at or below each bound (not cumulative; the last is `+Inf`).
    counts: Vec<AtomicU64>,
    /// Sum of observations in microseconds.
    sum_us: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            counts: (0..=LATENCY_BUCKETS.len())
                .map(|_| AtomicU64::new(0))
                .collect(),
            sum_us: AtomicU64::new(0),
        }
    }
}

impl Histogram {
    /// Records one observation.
    pub fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        let i = LATENCY_BUCKETS
            .iter()
            .position(|&b| s <= b)
            .unwrap_or(LATENCY_BUCKETS.len());
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(
            d.as_micros().min(u64::MAX as u128) as u64,
            Ordering::Relaxed,
        );
    }

    /// `(upper bound, cumulative count)` per bucket, ending with `(+Inf, total)`.
    pub fn cumulative(&self) -> Vec<(f64, u64)> {
        let mut acc = 0;
        self.counts
            .iter()
            .enumerate()
            .map(|(i, c)| {
                acc += c.load(Ordering::Relaxed);
                (
                    LATENCY_BUCKETS.get(i).copied().unwrap_or(f64::INFINITY),
                    acc,
                )
            })
            .collect()
    }

    /// Number of observations.
    pub fn count(&self) -> u64 {
        self.counts.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }

    /// Sum of observations in seconds.
    pub fn sum_seconds(&self) -> f64 {
        self.sum_us.load(Ordering::Relaxed) as f64 * 1e-6
    }

    /// The `q` quantile (0..=1) estimated from the buckets (upper bound of the bucket that
    /// holds it); `None` without observations.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let cum = self.cumulative();
        let total = cum.last()?.1;
        if total == 0 {
            return None;
        }
        let rank = (q.clamp(0.0, 1.0) * total as f64).ceil().max(1.0) as u64;
        cum.iter().find(|(_, c)| *c >= rank).map(|(b, _)| *b)
    }
}

/// Live engine counters. Gauges are set by the engine thread; counters only grow.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Requests queued in the scheduler and not running (including preempted ones).
    pub waiting: AtomicU64,
    /// Requests submitted that the engine thread has not picked up yet.
    pub(crate) in_channel: AtomicU64,
    /// Sequences running.
    pub running: AtomicU64,
    /// KV blocks in the pool.
    pub kv_blocks_total: AtomicU64,
    /// KV blocks held by running sequences.
    pub kv_blocks_used: AtomicU64,
    /// Free blocks that still hold a cached prefix.
    pub kv_blocks_cached: AtomicU64,
    /// Prefix-cache fills (conversations to compute for their next turn) queued or running.
    pub pending_fills: AtomicU64,
    /// Requests submitted.
    pub requests_submitted: AtomicU64,
    /// Requests ended by a stop token or string.
    pub finished_stop: AtomicU64,
    /// Requests ended by their length limit.
    pub finished_length: AtomicU64,
    /// Requests cancelled (by the caller, or because the stream was dropped).
    pub finished_cancelled: AtomicU64,
    /// Requests that failed.
    pub finished_error: AtomicU64,
    /// Prompt tokens of admitted requests.
    pub prompt_tokens: AtomicU64,
    /// Prompt tokens taken from the prefix cache.
    pub prefix_cache_hit_tokens: AtomicU64,
    /// Prompt tokens looked up in the prefix cache (the hit-rate denominator).
    pub prefix_cache_query_tokens: AtomicU64,
    /// Tokens run through the model (prompt chunks, recomputation and decode).
    pub computed_tokens: AtomicU64,
    /// Tokens generated.
    pub generation_tokens: AtomicU64,
    /// Sequences preempted (their blocks freed, to be recomputed).
    pub preemptions: AtomicU64,
    /// Forward steps run.
    pub steps: AtomicU64,
    /// Steps that panicked (their requests failed; the engine went on).
    pub step_failures: AtomicU64,
    /// Time from submission to the first token.
    pub time_to_first_token: Histogram,
    /// Time between consecutive tokens of a request.
    pub inter_token_latency: Histogram,
    /// Time from submission to the end of a request.
    pub e2e_latency: Histogram,
    /// Time spent waiting before first being scheduled.
    pub queue_time: Histogram,
}

/// A consistent-enough copy of the scalar metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct MetricsSnapshot {
    /// Requests waiting: submitted and not running.
    pub waiting: u64,
    /// See [`Metrics::running`].
    pub running: u64,
    /// See [`Metrics::kv_blocks_total`].
    pub kv_blocks_total: u64,
    /// See [`Metrics::kv_blocks_used`].
    pub kv_blocks_used: u64,
    /// See [`Metrics::kv_blocks_cached`].
    pub kv_blocks_cached: u64,
    /// See [`Metrics::pending_fills`].
    pub pending_fills: u64,
    /// See [`Metrics::requests_submitted`].
    pub requests_submitted: u64,
    /// See [`Metrics::finished_stop`].
    pub finished_stop: u64,
    /// See [`Metrics::finished_length`].
    pub finished_length: u64,
    /// See [`Metrics::finished_cancelled`].
    pub finished_cancelled: u64,
    /// See [`Metrics::finished_error`].
    pub finished_error: u64,
    /// See [`Metrics::prompt_tokens`].
    pub prompt_tokens: u64,
    /// See [`Metrics::prefix_cache_hit_tokens`].
    pub prefix_cache_hit_tokens: u64,
    /// See [`Metrics::prefix_cache_query_tokens`].
    pub prefix_cache_query_tokens: u64,
    /// See [`Metrics::computed_tokens`].
    pub computed_tokens: u64,
    /// See [`Metrics::generation_tokens`].
    pub generation_tokens: u64,
    /// See [`Metrics::preemptions`].
    pub preemptions: u64,
    /// See [`Metrics::steps`].
    pub steps: u64,
    /// See [`Metrics::step_failures`].
    pub step_failures: u64,
}

impl Metrics {
    /// Reads every scalar.
    pub fn snapshot(&self) -> MetricsSnapshot {
        let r = |a: &AtomicU64| a.load(Ordering::Relaxed);
        MetricsSnapshot {
            waiting: r(&self.waiting) + r(&self.in_channel),
            running: r(&self.running),
            kv_blocks_total: r(&self.kv_blocks_total),
            kv_blocks_used: r(&self.kv_blocks_used),
            kv_blocks_cached: r(&self.kv_blocks_cached),
            pending_fills: r(&self.pending_fills),
            requests_submitted: r(&self.requests_submitted),
            finished_stop: r(&self.finished_stop),
            finished_length: r(&self.finished_length),
            finished_cancelled: r(&self.finished_cancelled),
            finished_error: r(&self.finished_error),
            prompt_tokens: r(&self.prompt_tokens),
            prefix_cache_hit_tokens: r(&self.prefix_cache_hit_tokens),
            prefix_cache_query_tokens: r(&self.prefix_cache_query_tokens),
            computed_tokens: r(&self.computed_tokens),
            generation_tokens: r(&self.generation_tokens),
            preemptions: r(&self.preemptions),
            steps: r(&self.steps),
            step_failures: r(&self.step_failures),
        }
    }

    pub(crate) fn on_submit(&self) {
        self.requests_submitted.fetch_add(1, Ordering::Relaxed);
        self.in_channel.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn on_finish(&self, reason: Option<FinishReason>) {
        let c = match reason {
            Some(FinishReason::Stop) => &self.finished_stop,
            Some(FinishReason::Length) => &self.finished_length,
            Some(FinishReason::Cancelled) => &self.finished_cancelled,
            None => &self.finished_error,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn add(counter: &AtomicU64, n: usize) {
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }

    pub(crate) fn set(gauge: &AtomicU64, n: usize) {
        gauge.store(n as u64, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_counts_cumulatively_and_estimates_quantiles() {
        let h = Histogram::default();
        assert_eq!(h.quantile(0.5), None);
        for ms in [3, 3, 30, 300] {
            h.observe(Duration::from_millis(ms));
        }
        let cum = h.cumulative();
        assert_eq!(cum.last(), Some(&(f64::INFINITY, 4)));
        assert_eq!(cum[2], (0.005, 2));
        assert_eq!(h.quantile(0.5), Some(0.005));
        assert_eq!(h.quantile(0.99), Some(0.3));
        assert!((h.sum_seconds() - 0.336).abs() < 1e-9);
    }
}
