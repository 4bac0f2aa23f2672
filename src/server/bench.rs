//! `wick bench-serve`: a load generator for any OpenAI-compatible server.
//!
//! `concurrency` workers share a counter of `requests` chat completions; each worker sends
//! its next request as soon as the previous one ends (a closed loop, like vLLM's
//! `benchmark_serving` without a request rate). Every prompt is about `prompt_len` tokens (a
//! repeated word, which Qwen3's tokenizer keeps at one token per word) and asks for
//! `max_tokens`. Each prompt starts with its request's number, so a server's prefix cache
//! can reuse only the chat template's few shared tokens, as with real traffic from many
//! users; `shared_prompt` sends the very same prompt every time instead, which measures the
//! best case of prefix reuse. The report gives requests per second, latency and time to
//! first token percentiles (exact, from every sample), and output tokens per second over the
//! whole run, with output tokens taken from the server's `usage`.
//!
//! Without `--stream` the time to first token is not observable and equals the latency.
//!
//! `soak`: instead of a number of requests, the workers keep sending for a duration while
//! a sampler reads the server's resident memory from `/metrics` (wick's
//! `wick_process_resident_memory_bytes`) every few seconds; the report gives the samples and
//! the least-squares slope in MB/hour over the run after its first tenth (warm-up), which is
//! how a leak shows.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde::Serialize;
use serde_json::{json, Value};

/// What to send.
#[derive(Clone, Debug)]
pub struct BenchOptions {
    /// The server's base URL (`http://127.0.0.1:8000`; a trailing `/v1` is accepted).
    pub url: String,
    /// The model name; `None` asks `/v1/models` for the first one.
    pub model: Option<String>,
    /// Bearer token.
    pub api_key: Option<String>,
    /// Requests in flight at once.
    pub concurrency: usize,
    /// Requests in total.
    pub requests: usize,
    /// Use server-sent events (and measure time to first token).
    pub stream: bool,
    /// `max_tokens` of every request.
    pub max_tokens: usize,
    /// Approximate prompt length in tokens.
    pub prompt_len: usize,
    /// Ask the server to ignore end-of-sequence tokens (wick and vLLM accept `ignore_eos`),
    /// so that every reply is `max_tokens` long.
    pub ignore_eos: bool,
    /// Per-request time limit.
    pub timeout: Duration,
    /// Send the same prompt every time (instead of one that differs from its first word).
    pub shared_prompt: bool,
    /// Keep sending for this long (ignoring `requests`) and track the server's memory.
    pub soak: Option<Duration>,
}

/// The prompt of request `i`: about `len` tokens, identical for every `i` if `shared`.
fn prompt(i: usize, len: usize, shared: bool) -> String {
    let words = "hello ".repeat(len.saturating_sub(1).max(1));
    if shared {
        format!("Request: {}", words.trim_end())
    } else {
        format!("Request {i}: {}", words.trim_end())
    }
}

/// Why a benchmark could not run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// The options make no sense.
    #[error("{0}")]
    Options(String),
    /// The server could not be asked for its model.
    #[error("cannot get the model list from {url}: {message}")]
    Models {
        /// The URL asked.
        url: String,
        /// What went wrong.
        message: String,
    },
}

/// Percentiles of one measure, in seconds.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Percentiles {
    /// Median.
    pub p50: f64,
    /// 95th percentile.
    pub p95: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Mean.
    pub mean: f64,
}

impl Percentiles {
    /// Nearest-rank percentiles of `samples` (zeros when empty).
    pub fn of(samples: &[f64]) -> Self {
        if samples.is_empty() {
            return Percentiles::default();
        }
        let mut s = samples.to_vec();
        s.sort_by(f64::total_cmp);
        let at = |q: f64| {
            let rank = (q * s.len() as f64).ceil().max(1.0) as usize;
            s[rank.min(s.len()) - 1]
        };
        Percentiles {
            p50: at(0.50),
            p95: at(0.95),
            p99: at(0.99),
            mean: s.iter().sum::<f64>() / s.len() as f64,
        }
    }
}

/// What a run measured.
#[derive(Clone, Debug, Default, Serialize)]
pub struct BenchReport {
    /// The model asked for.
    pub model: String,
    /// Requests sent.
    pub requests: usize,
    /// Requests answered with 200 and a complete reply.
    pub ok: usize,
    /// Requests refused with 429.
    pub rejected: usize,
    /// Other failures (status, transport, timeout, malformed answer).
    pub failed: usize,
    /// Wall time of the run in seconds.
    pub duration_s: f64,
    /// Completed requests per second.
    pub qps: f64,
    /// End-to-end latency of completed requests.
    pub latency_s: Percentiles,
    /// Time to the first content (streaming) or to the answer (otherwise).
    pub ttft_s: Percentiles,
    /// Prompt tokens of completed requests (from `usage`).
    pub prompt_tokens: usize,
    /// Output tokens of completed requests (from `usage`).
    pub output_tokens: usize,
    /// Output tokens per second over the run.
    pub output_tok_s: f64,
    /// The first few error messages, for diagnosis.
    pub errors: Vec<String>,
    /// Soak runs: `(seconds since the start, resident MB)` samples of the server.
    pub rss_mb: Vec<(f64, f64)>,
    /// Soak runs: least-squares slope of the resident memory after warm-up, MB per hour
    /// (`None` without samples, e.g. a server that does not report it).
    pub rss_slope_mb_per_hour: Option<f64>,
}

/// Least-squares slope of `y` over `x`, per unit of `x`; `None` under three points.
pub fn slope(points: &[(f64, f64)]) -> Option<f64> {
    if points.len() < 3 {
        return None;
    }
    let n = points.len() as f64;
    let (mx, my) = points
        .iter()
        .fold((0.0, 0.0), |(a, b), &(x, y)| (a + x / n, b + y / n));
    let (mut sxy, mut sxx) = (0.0, 0.0);
    for &(x, y) in points {
        sxy += (x - mx) * (y - my);
        sxx += (x - mx) * (x - mx);
    }
    (sxx > 0.0).then(|| sxy / sxx)
}

/// The server's resident memory in MB, from its `/metrics`.
async fn resident_mb(client: &reqwest::Client, base: &str, key: &Option<String>) -> Option<f64> {
    let text = with_key(client.get(format!("{base}/metrics")), key)
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("wick_process_resident_memory_bytes "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|b| b / (1 << 20) as f64)
}

enum Outcome {
    Ok {
        latency: f64,
        ttft: f64,
        prompt_tokens: usize,
        output_tokens: usize,
    },
    Rejected,
    Failed(String),
}

fn base_url(url: &str) -> String {
    let u = url.trim_end_matches('/');
    u.strip_suffix("/v1").unwrap_or(u).to_string()
}

fn with_key(req: reqwest::RequestBuilder, key: &Option<String>) -> reqwest::RequestBuilder {
    match key {
        Some(k) => req.bearer_auth(k),
        None => req,
    }
}

/// Runs the benchmark.
pub async fn run(opts: &BenchOptions) -> Result<BenchReport, BenchError> {
    if opts.concurrency == 0 || opts.requests == 0 || opts.max_tokens == 0 {
        return Err(BenchError::Options(
            "--concurrency, --requests and --max-tokens must be at least 1".into(),
        ));
    }
    let base = base_url(&opts.url);
    let client = reqwest::Client::builder()
        .timeout(opts.timeout)
        .build()
        .map_err(|e| BenchError::Options(format!("cannot build an HTTP client: {e}")))?;
    let model = match &opts.model {
        Some(m) => m.clone(),
        None => first_model(&client, &base, &opts.api_key).await?,
    };
    let mut body = json!({
        "model": model,
        "messages": [{"role": "user", "content": ""}],
        "max_tokens": opts.max_tokens,
        "stream": opts.stream,
        "chat_template_kwargs": {"enable_thinking": false},
    });
    if opts.stream {
        body["stream_options"] = json!({"include_usage": true});
    }
    if opts.ignore_eos {
        body["ignore_eos"] = json!(true);
    }
    let body = Arc::new(body);
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let soak = opts.soak;
    let sampler = soak.map(|d| {
        let (client, base, key) = (client.clone(), base.clone(), opts.api_key.clone());
        let every = (d / 100).clamp(Duration::from_secs(1), Duration::from_secs(30));
        tokio::spawn(async move {
            let mut samples = Vec::new();
            while start.elapsed() < d {
                if let Some(mb) = resident_mb(&client, &base, &key).await {
                    samples.push((start.elapsed().as_secs_f64(), mb));
                }
                tokio::time::sleep(every).await;
            }
            samples
        })
    });
    let workers_n = if soak.is_some() {
        opts.concurrency
    } else {
        opts.concurrency.min(opts.requests)
    };
    let mut workers = Vec::new();
    for _ in 0..workers_n {
        let (client, body, next) = (client.clone(), body.clone(), next.clone());
        let url = format!("{base}/v1/chat/completions");
        let (key, total, stream) = (opts.api_key.clone(), opts.requests, opts.stream);
        let (len, shared) = (opts.prompt_len, opts.shared_prompt);
        workers.push(tokio::spawn(async move {
            let mut outcomes = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let done = match soak {
                    Some(d) => start.elapsed() >= d,
                    None => i >= total,
                };
                if done {
                    break;
                }
                let mut body = (*body).clone();
                body["messages"][0]["content"] = json!(prompt(i, len, shared));
                outcomes.push(one(&client, &url, &key, &body, stream).await);
            }
            outcomes
        }));
    }
    let mut report = BenchReport {
        model,
        requests: opts.requests,
        ..BenchReport::default()
    };
    let (mut latency, mut ttft) = (Vec::new(), Vec::new());
    for w in workers {
        let outcomes = w.await.unwrap_or_default();
        for o in outcomes {
            match o {
                Outcome::Ok {
                    latency: l,
                    ttft: t,
                    prompt_tokens,
                    output_tokens,
                } => {
                    report.ok += 1;
                    latency.push(l);
                    ttft.push(t);
                    report.prompt_tokens += prompt_tokens;
                    report.output_tokens += output_tokens;
                }
                Outcome::Rejected => report.rejected += 1,
                Outcome::Failed(e) => {
                    report.failed += 1;
                    if report.errors.len() < 5 {
                        report.errors.push(e);
                    }
                }
            }
        }
    }
    if let Some(sampler) = sampler {
        report.requests = report.ok + report.rejected + report.failed;
        if let Some(mb) = resident_mb(&client, &base, &opts.api_key).await {
            report.rss_mb = sampler.await.unwrap_or_default();
            report.rss_mb.push((start.elapsed().as_secs_f64(), mb));
        }
        let warm = report.rss_mb.last().map_or(0.0, |l| l.0 / 10.0);
        let settled: Vec<(f64, f64)> = report
            .rss_mb
            .iter()
            .filter(|p| p.0 >= warm)
            .map(|&(t, mb)| (t / 3600.0, mb))
            .collect();
        report.rss_slope_mb_per_hour = slope(&settled);
    }
    report.duration_s = start.elapsed().as_secs_f64();
    report.qps = report.ok as f64 / report.duration_s.max(1e-9);
    report.output_tok_s = report.output_tokens as f64 / report.duration_s.max(1e-9);
    report.latency_s = Percentiles::of(&latency);
    report.ttft_s = Percentiles::of(&ttft);
    Ok(report)
}

async fn first_model(
    client: &reqwest::Client,
    base: &str,
    key: &Option<String>,
) -> Result<String, BenchError> {
    let url = format!("{base}/v1/models");
    let err = |message: String| BenchError::Models {
        url: url.clone(),
        message,
    };
    let resp = with_key(client.get(&url), key)
        .send()
        .await
        .map_err(|e| err(e.to_string()))?;
    let status = resp.status();
    let v: Value = resp.json().await.map_err(|e| err(e.to_string()))?;
    v.pointer("/data/0/id")
        .and_then(Value::as_str)
        .map(str::to_string)
        .ok_or_else(|| err(format!("status {status}, no model in {v}")))
}

fn usage(v: &Value) -> Option<(usize, usize)> {
    let u = v.get("usage")?;
    Some((
        u.get("prompt_tokens")?.as_u64()? as usize,
        u.get("completion_tokens")?.as_u64()? as usize,
    ))
}

async fn one(
    client: &reqwest::Client,
    url: &str,
    key: &Option<String>,
    body: &Value,
    stream: bool,
) -> Outcome {
    let t0 = Instant::now();
    let resp = match with_key(client.post(url), key).json(body).send().await {
        Ok(r) => r,
        Err(e) => return Outcome::Failed(e.to_string()),
    };
    let status = resp.status();
    if status == reqwest::StatusCode::TOO_MANY_REQUESTS {
        return Outcome::Rejected;
    }
    if !status.is_success() {
        let text = resp.text().await.unwrap_or_default();
        return Outcome::Failed(format!("status {status}: {text}"));
    }
    if !stream {
        let v: Value = match resp.json().await {
            Ok(v) => v,
            Err(e) => return Outcome::Failed(e.to_string()),
        };
        let latency = t0.elapsed().as_secs_f64();
        return match usage(&v) {
            Some((prompt_tokens, output_tokens)) => Outcome::Ok {
                latency,
                ttft: latency,
                prompt_tokens,
                output_tokens,
            },
            None => Outcome::Failed(format!("no usage in {v}")),
        };
    }
    // Server-sent events: `data: {...}` lines; the first one with text sets the TTFT.
    let mut body = resp.bytes_stream();
    let mut buf = Vec::<u8>::new();
    let (mut ttft, mut counts, mut done) = (None, None, false);
    while let Some(chunk) = body.next().await {
        let chunk = match chunk {
            Ok(c) => c,
            Err(e) => return Outcome::Failed(e.to_string()),
        };
        buf.extend_from_slice(&chunk);
        while let Some(nl) = buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buf.drain(..=nl).collect();
            let line = String::from_utf8_lossy(&line);
            let Some(data) = line.trim_end().strip_prefix("data:") else {
                continue;
            };
            let data = data.trim();
            if data == "[DONE]" {
                done = true;
                continue;
            }
            let Ok(v) = serde_json::from_str::<Value>(data) else {
                return Outcome::Failed(format!("malformed event: {data}"));
            };
            if let Some(e) = v.get("error") {
                return Outcome::Failed(format!("error event: {e}"));
            }
            let has_text = v.pointer("/choices/0/delta").is_some_and(|d| {
                ["content", "reasoning_content", "reasoning", "tool_calls"]
                    .iter()
                    .any(|k| d.get(k).is_some_and(|x| x.as_str() != Some("")))
            });
            if has_text && ttft.is_none() {
                ttft = Some(t0.elapsed().as_secs_f64());
            }
            if let Some(u) = usage(&v) {
                counts = Some(u);
            }
        }
    }
    let latency = t0.elapsed().as_secs_f64();
    match (done, counts) {
        (true, Some((prompt_tokens, output_tokens))) => Outcome::Ok {
            latency,
            ttft: ttft.unwrap_or(latency),
            prompt_tokens,
            output_tokens,
        },
        (false, _) => Outcome::Failed("the stream ended without [DONE]".into()),
        (true, None) => Outcome::Failed("the stream had no usage chunk".into()),
    }
}

impl BenchReport {
    /// A few lines for people.
    pub fn text(&self) -> String {
        let ms = |p: &Percentiles| {
            format!(
                "p50 {:8.1} ms  p95 {:8.1} ms  p99 {:8.1} ms  mean {:8.1} ms",
                p.p50 * 1e3,
                p.p95 * 1e3,
                p.p99 * 1e3,
                p.mean * 1e3
            )
        };
        let mut s = format!(
            "model {}: {} requests, {} ok, {} refused (429), {} failed in {:.2} s\n\
             throughput   {:.2} req/s, {:.1} output tok/s ({} prompt + {} output tokens)\n\
             latency      {}\n\
             first token  {}\n",
            self.model,
            self.requests,
            self.ok,
            self.rejected,
            self.failed,
            self.duration_s,
            self.qps,
            self.output_tok_s,
            self.prompt_tokens,
            self.output_tokens,
            ms(&self.latency_s),
            ms(&self.ttft_s),
        );
        if let (Some(first), Some(last)) = (self.rss_mb.first(), self.rss_mb.last()) {
            s.push_str(&format!(
                "server RSS   {:.1} MB at the start, {:.1} MB at the end ({} samples)",
                first.1,
                last.1,
                self.rss_mb.len()
            ));
            match self.rss_slope_mb_per_hour {
                Some(k) => s.push_str(&format!(", slope after warm-up {k:+.2} MB/hour\n")),
                None => s.push('\n'),
            }
        }
        for e in &self.errors {
            s.push_str(&format!("error: {e}\n"));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slope_is_least_squares() {
        let pts: Vec<(f64, f64)> = (0..10).map(|i| (i as f64, 3.0 * i as f64 + 7.0)).collect();
        assert!((slope(&pts).unwrap() - 3.0).abs() < 1e-9);
        let flat = [(0.0, 5.0), (1.0, 6.0), (2.0, 5.0), (3.0, 6.0)];
        assert!(slope(&flat).unwrap().abs() < 0.5);
        assert_eq!(slope(&[(0.0, 1.0), (1.0, 2.0)]), None);
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let s: Vec<f64> = (1..=100).map(f64::from).collect();
        let p = Percentiles::of(&s);
        assert_eq!((p.p50, p.p95, p.p99), (50.0, 95.0, 99.0));
        assert_eq!(p.mean, 50.5);
        let one = Percentiles::of(&[3.0]);
        assert_eq!((one.p50, one.p99), (3.0, 3.0));
        assert_eq!(Percentiles::of(&[]).p50, 0.0);
    }

    #[test]
    fn prompts_differ_from_the_first_word_unless_shared() {
        let (a, b) = (prompt(0, 8, false), prompt(1, 8, false));
        assert_ne!(a, b);
        assert_eq!(a.split_whitespace().count(), 9);
        assert!(a.starts_with("Request 0:") && b.starts_with("Request 1:"));
        assert_eq!(prompt(0, 8, true), prompt(5, 8, true));
    }

    #[test]
    fn base_url_accepts_v1() {
        assert_eq!(base_url("http://h:1/v1/"), "http://h:1");
        assert_eq!(base_url("http://h:1"), "http://h:1");
    }
}
