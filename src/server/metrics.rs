//! `/metrics` in Prometheus' text format: the engine's counters, gauges and latency
//! histograms, responses by status code, the process's resident memory, the GPU memory wick
//! holds and how long loading the model took, phase by phase
//! (`wick_load_seconds{phase="download|map|repack|upload|total"}`).

use std::collections::BTreeMap;
use std::fmt::Write;

use crate::engine::{Engine, Histogram};
use crate::loader::LoadTimes;

fn head(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn scalar(out: &mut String, name: &str, kind: &str, help: &str, v: f64) {
    head(out, name, kind, help);
    let _ = writeln!(out, "{name} {v}");
}

fn histogram(out: &mut String, name: &str, help: &str, h: &Histogram) {
    head(out, name, "histogram", help);
    for (le, count) in h.cumulative() {
        let le = if le.is_infinite() {
            "+Inf".to_string()
        } else {
            le.to_string()
        };
        let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {count}");
    }
    let _ = writeln!(out, "{name}_sum {}", h.sum_seconds());
    let _ = writeln!(out, "{name}_count {}", h.count());
}

/// A `/proc/self/status` field given in kB, in bytes (`None` where `/proc` is missing).
fn status_kb(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kb: u64 = line[field.len()..]
        .trim_start_matches(':')
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// Resident memory of this process in bytes (0 where `/proc` is missing). Read from
/// `VmRSS`, which the kernel gives in kB whatever the page size (16 KiB and 64 KiB pages
/// are common on ARM).
pub fn resident_bytes() -> u64 {
    status_kb("VmRSS").unwrap_or(0)
}

/// Memory of this process swapped out, in bytes (0 where `/proc` is missing).
pub fn swap_bytes() -> u64 {
    status_kb("VmSwap").unwrap_or(0)
}

/// Renders every metric; `gpu_memory` is the bytes of the GPU buffers wick holds, when the
/// model runs on a GPU, and `load` how long loading took, once the model is loaded.
pub fn render(
    engine: Option<&Engine>,
    gpu_memory: Option<u64>,
    load: Option<&LoadTimes>,
    statuses: &BTreeMap<u16, u64>,
) -> String {
    let mut out = String::new();
    head(
        &mut out,
        "wick_http_responses_total",
        "counter",
        "HTTP responses by status code.",
    );
    for (code, n) in statuses {
        let _ = writeln!(out, "wick_http_responses_total{{code=\"{code}\"}} {n}");
    }
    scalar(
        &mut out,
        "wick_process_resident_memory_bytes",
        "gauge",
        "Resident memory of the server process.",
        resident_bytes() as f64,
    );
    scalar(
        &mut out,
        "wick_process_swap_bytes",
        "gauge",
        "Memory of the server process swapped out (resident + swap is what it holds).",
        swap_bytes() as f64,
    );
    if let Some(bytes) = gpu_memory {
        scalar(
            &mut out,
            "wick_gpu_memory_bytes",
            "gauge",
            "GPU memory wick holds: every buffer it created (weights, KV cache, activations).",
            bytes as f64,
        );
    }
    if let Some(load) = load {
        head(
            &mut out,
            "wick_load_seconds",
            "gauge",
            "Time loading the model took, by phase (total also holds what no phase names).",
        );
        for (phase, d) in load.phases() {
            let _ = writeln!(
                out,
                "wick_load_seconds{{phase=\"{phase}\"}} {}",
                d.as_secs_f64()
            );
        }
    }
    let Some(engine) = engine else {
        return out;
    };
    let m = engine.metrics();
    let s = m.snapshot();
    let g = |out: &mut String, name: &str, help: &str, v: u64| {
        scalar(out, name, "gauge", help, v as f64)
    };
    let c = |out: &mut String, name: &str, help: &str, v: u64| {
        scalar(out, name, "counter", help, v as f64)
    };
    g(
        &mut out,
        "wick_num_requests_waiting",
        "Requests waiting to run.",
        s.waiting,
    );
    g(
        &mut out,
        "wick_num_requests_running",
        "Sequences running.",
        s.running,
    );
    g(
        &mut out,
        "wick_kv_blocks_used",
        "KV cache blocks held by sequences.",
        s.kv_blocks_used,
    );
    g(
        &mut out,
        "wick_kv_blocks_total",
        "KV cache blocks in the pool.",
        s.kv_blocks_total,
    );
    g(
        &mut out,
        "wick_kv_blocks_cached",
        "Free KV blocks that still hold a cached prefix.",
        s.kv_blocks_cached,
    );
    scalar(
        &mut out,
        "wick_kv_cache_usage_ratio",
        "gauge",
        "Share of KV blocks in use.",
        s.kv_blocks_used as f64 / s.kv_blocks_total.max(1) as f64,
    );
    c(
        &mut out,
        "wick_prompt_tokens_total",
        "Prompt tokens of admitted requests.",
        s.prompt_tokens,
    );
    c(
        &mut out,
        "wick_generation_tokens_total",
        "Tokens generated.",
        s.generation_tokens,
    );
    c(
        &mut out,
        "wick_computed_tokens_total",
        "Tokens run through the model.",
        s.computed_tokens,
    );
    c(
        &mut out,
        "wick_prefix_cache_hit_tokens_total",
        "Prompt tokens served from the prefix cache.",
        s.prefix_cache_hit_tokens,
    );
    c(
        &mut out,
        "wick_prefix_cache_query_tokens_total",
        "Prompt tokens looked up in the prefix cache.",
        s.prefix_cache_query_tokens,
    );
    scalar(
        &mut out,
        "wick_prefix_cache_hit_rate",
        "gauge",
        "Prompt tokens served from the prefix cache over those looked up, since start.",
        s.prefix_cache_hit_tokens as f64 / s.prefix_cache_query_tokens.max(1) as f64,
    );
    c(
        &mut out,
        "wick_preemptions_total",
        "Sequences preempted for lack of KV blocks.",
        s.preemptions,
    );
    c(
        &mut out,
        "wick_engine_step_failures_total",
        "Engine steps that failed internally (their requests got an error; the engine went on).",
        s.step_failures,
    );
    c(
        &mut out,
        "wick_requests_submitted_total",
        "Requests accepted by the engine.",
        s.requests_submitted,
    );
    head(
        &mut out,
        "wick_requests_finished_total",
        "counter",
        "Requests ended, by reason.",
    );
    for (reason, n) in [
        ("stop", s.finished_stop),
        ("length", s.finished_length),
        ("cancelled", s.finished_cancelled),
        ("error", s.finished_error),
    ] {
        let _ = writeln!(
            out,
            "wick_requests_finished_total{{reason=\"{reason}\"}} {n}"
        );
    }
    histogram(
        &mut out,
        "wick_time_to_first_token_seconds",
        "Time from submission to the first token.",
        &m.time_to_first_token,
    );
    histogram(
        &mut out,
        "wick_inter_token_latency_seconds",
        "Time between consecutive tokens of a request.",
        &m.inter_token_latency,
    );
    histogram(
        &mut out,
        "wick_e2e_request_latency_seconds",
        "Time from submission to the end of a request.",
        &m.e2e_latency,
    );
    histogram(
        &mut out,
        "wick_request_queue_time_seconds",
        "Time waiting before first being scheduled.",
        &m.queue_time,
    );
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn gpu_memory_is_reported_only_on_a_gpu() {
        let statuses = Default::default();
        let on_gpu = super::render(None, Some(123 << 20), None, &statuses);
        assert!(
            on_gpu.contains("# TYPE wick_gpu_memory_bytes gauge"),
            "{on_gpu}"
        );
        assert!(
            on_gpu
                .lines()
                .any(|l| l == format!("wick_gpu_memory_bytes {}", 123u64 << 20)),
            "{on_gpu}"
        );
        assert!(!super::render(None, None, None, &statuses).contains("wick_gpu_memory_bytes"));
    }

    #[test]
    fn load_phases_are_gauges_once_loaded() {
        let statuses = Default::default();
        let load = crate::loader::LoadTimes {
            map: std::time::Duration::from_millis(250),
            total: std::time::Duration::from_millis(1500),
            ..Default::default()
        };
        let text = super::render(None, None, Some(&load), &statuses);
        assert!(text.contains("# TYPE wick_load_seconds gauge"), "{text}");
        for line in [
            "wick_load_seconds{phase=\"download\"} 0",
            "wick_load_seconds{phase=\"map\"} 0.25",
            "wick_load_seconds{phase=\"repack\"} 0",
            "wick_load_seconds{phase=\"upload\"} 0",
            "wick_load_seconds{phase=\"total\"} 1.5",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing:\n{text}");
        }
        assert!(!super::render(None, None, None, &statuses).contains("wick_load_seconds"));
    }

    #[test]
    fn resident_memory_is_read_in_bytes() {
        let rss = super::resident_bytes();
        // statm's resident pages, times the real page size, agree with VmRSS.
        let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
        let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
        let page = std::fs::read_to_string("/proc/self/smaps")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("KernelPageSize:"))
                    .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            })
            .unwrap_or(4)
            * 1024;
        let from_statm = pages * page;
        let diff = rss.abs_diff(from_statm);
        assert!(rss > 1 << 20 && diff < 16 << 20, "{rss} vs {from_statm}");
    }
}
