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
//! `request_rate`: an open loop instead, as vLLM's `benchmark_serving --request-rate`: request
//! `i` is sent at the `i`-th arrival of a Poisson process of that rate (exponential gaps from
//! a seeded generator, so runs are repeatable), whether or not earlier ones have finished
//! (`max_concurrency` caps the requests in flight, if set). This is how a server meets real
//! traffic: a closed loop slows its own arrivals when the server slows, an open loop does not.
//! [`search_slo`] finds the highest such rate whose P95 end-to-end latency stays under a target,
//! by doubling from a start rate until the target is missed, then bisecting.
//!
//! `endpoint` chooses `/v1/chat/completions` or `/v1/completions` (the latter for servers whose
//! chat endpoint cannot answer a random-weight model: llama-server answers 500 when the
//! output does not parse as its chat format). `dataset` replays prompts from a JSONL file
//! (`{"messages": [...]}` or `{"prompt": "..."}` per line), in order and round again.
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
    /// Open loop: Poisson arrivals at this many requests per second (`concurrency` is then
    /// unused).
    pub request_rate: Option<f64>,
    /// Open loop: most requests in flight (`None`: no cap).
    pub max_concurrency: Option<usize>,
    /// Seed of the arrival times.
    pub seed: u64,
    /// Which API to call.
    pub endpoint: Endpoint,
    /// Prompts to replay instead of generated ones.
    pub dataset: Option<Vec<DatasetEntry>>,
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions {
            url: "http://127.0.0.1:8000".into(),
            model: None,
            api_key: None,
            concurrency: 8,
            requests: 64,
            stream: false,
            max_tokens: 64,
            prompt_len: 128,
            ignore_eos: false,
            timeout: Duration::from_secs(600),
            shared_prompt: false,
            soak: None,
            request_rate: None,
            max_concurrency: None,
            seed: 0,
            endpoint: Endpoint::Chat,
            dataset: None,
        }
    }
}

/// The API a benchmark calls.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Endpoint {
    /// `/v1/chat/completions` (thinking switched off in every request).
    #[default]
    Chat,
    /// `/v1/completions` with the prompt as raw text.
    Completions,
}

/// One prompt of a dataset.
#[derive(Clone, Debug)]
pub enum DatasetEntry {
    /// Chat messages (for `/v1/completions`, their contents joined by newlines).
    Messages(Vec<Value>),
    /// A raw prompt (for `/v1/chat/completions`, one user message).
    Prompt(String),
}

/// Reads a JSONL dataset: one `{"messages": [...]}` or `{"prompt": "..."}` object per line
/// (blank lines skipped).
pub fn read_dataset(text: &str) -> Result<Vec<DatasetEntry>, BenchError> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = |m: &str| BenchError::Options(format!("dataset line {}: {m}", n + 1));
        let v: Value = serde_json::from_str(line).map_err(|e| bad(&e.to_string()))?;
        if let Some(Value::Array(m)) = v.get("messages") {
            if m.is_empty() {
                return Err(bad("`messages` is empty"));
            }
            out.push(DatasetEntry::Messages(m.clone()));
        } else if let Some(Value::String(p)) = v.get("prompt") {
            out.push(DatasetEntry::Prompt(p.clone()));
        } else {
            return Err(bad(
                "expected an object with `messages` (a list) or `prompt` (a string)",
            ));
        }
    }
    if out.is_empty() {
        return Err(BenchError::Options("the dataset has no prompts".into()));
    }
    Ok(out)
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
    /// Inter-token latency: each streamed request's time after its first token divided by
    /// its other tokens (zeros without `--stream`).
    pub itl_s: Percentiles,
    /// Open loop: the arrival rate asked for, requests per second.
    pub request_rate: Option<f64>,
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
    // A connection per request: servers that close kept-alive connections after a streamed
    // reply (llama-server does) would otherwise fail the next request sent on one.
    let client = reqwest::Client::builder()
        .timeout(opts.timeout)
        .pool_max_idle_per_host(0)
        .build()
        .map_err(|e| BenchError::Options(format!("cannot build an HTTP client: {e}")))?;
    let model = match &opts.model {
        Some(m) => m.clone(),
        None => first_model(&client, &base, &opts.api_key).await?,
    };
    let mut body = json!({
        "model": model,
        "max_tokens": opts.max_tokens,
        "stream": opts.stream,
    });
    if opts.endpoint == Endpoint::Chat {
        body["chat_template_kwargs"] = json!({"enable_thinking": false});
    }
    if opts.stream {
        body["stream_options"] = json!({"include_usage": true});
    }
    if opts.ignore_eos {
        body["ignore_eos"] = json!(true);
    }
    let work = Arc::new(Work {
        body,
        endpoint: opts.endpoint,
        dataset: opts.dataset.clone(),
        prompt_len: opts.prompt_len,
        shared: opts.shared_prompt,
    });
    let url = format!(
        "{base}/v1/{}",
        match opts.endpoint {
            Endpoint::Chat => "chat/completions",
            Endpoint::Completions => "completions",
        }
    );
    if let Some(rate) = opts.request_rate {
        return open_loop(opts, rate, client, url, work, model).await;
    }
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
        let (client, work, next, url) = (client.clone(), work.clone(), next.clone(), url.clone());
        let (key, total, stream) = (opts.api_key.clone(), opts.requests, opts.stream);
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
                let body = work.body(i);
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
    let mut outcomes = Vec::new();
    for w in workers {
        outcomes.extend(w.await.unwrap_or_default());
    }
    let samples = report.count(outcomes, opts.stream);
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
    report.finish(start, samples);
    Ok(report)
}

/// What every request of a run shares, and how request `i` differs.
struct Work {
    body: Value,
    endpoint: Endpoint,
    dataset: Option<Vec<DatasetEntry>>,
    prompt_len: usize,
    shared: bool,
}

impl Work {
    /// The body of request `i`.
    fn body(&self, i: usize) -> Value {
        let entry = match &self.dataset {
            Some(d) => d[i % d.len()].clone(),
            None => DatasetEntry::Prompt(prompt(i, self.prompt_len, self.shared)),
        };
        let mut body = self.body.clone();
        match (self.endpoint, entry) {
            (Endpoint::Chat, DatasetEntry::Messages(m)) => body["messages"] = Value::Array(m),
            (Endpoint::Chat, DatasetEntry::Prompt(p)) => {
                body["messages"] = json!([{"role": "user", "content": p}])
            }
            (Endpoint::Completions, DatasetEntry::Prompt(p)) => body["prompt"] = json!(p),
            (Endpoint::Completions, DatasetEntry::Messages(m)) => {
                let text: Vec<&str> = m
                    .iter()
                    .filter_map(|x| x.get("content").and_then(Value::as_str))
                    .collect();
                body["prompt"] = json!(text.join("\n"));
            }
        }
        body
    }
}

/// Per-request samples of a run: latency, time to first token, inter-token latency.
#[derive(Default)]
struct Samples {
    latency: Vec<f64>,
    ttft: Vec<f64>,
    itl: Vec<f64>,
}

impl BenchReport {
    /// Counts outcomes into the report; returns the timing samples of the completed ones.
    fn count(&mut self, outcomes: Vec<Outcome>, stream: bool) -> Samples {
        let mut s = Samples::default();
        for o in outcomes {
            match o {
                Outcome::Ok {
                    latency,
                    ttft,
                    prompt_tokens,
                    output_tokens,
                } => {
                    self.ok += 1;
                    s.latency.push(latency);
                    s.ttft.push(ttft);
                    if stream && output_tokens > 1 {
                        s.itl.push((latency - ttft) / (output_tokens - 1) as f64);
                    }
                    self.prompt_tokens += prompt_tokens;
                    self.output_tokens += output_tokens;
                }
                Outcome::Rejected => self.rejected += 1,
                Outcome::Failed(e) => {
                    self.failed += 1;
                    if self.errors.len() < 5 {
                        self.errors.push(e);
                    }
                }
            }
        }
        s
    }

    /// Rates and percentiles of a run that began at `start`.
    fn finish(&mut self, start: Instant, s: Samples) {
        self.duration_s = start.elapsed().as_secs_f64();
        self.qps = self.ok as f64 / self.duration_s.max(1e-9);
        self.output_tok_s = self.output_tokens as f64 / self.duration_s.max(1e-9);
        self.latency_s = Percentiles::of(&s.latency);
        self.ttft_s = Percentiles::of(&s.ttft);
        self.itl_s = Percentiles::of(&s.itl);
    }
}

/// Gaps between Poisson arrivals at `rate` per second: exponential, from a seeded generator.
fn arrival_gaps(rate: f64, n: usize, seed: u64) -> Vec<f64> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_pcg::Pcg64::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let u: f64 = rng.random();
            -(1.0 - u).ln() / rate
        })
        .collect()
}

/// The open loop: request `i` leaves at the `i`-th Poisson arrival.
async fn open_loop(
    opts: &BenchOptions,
    rate: f64,
    client: reqwest::Client,
    url: String,
    work: Arc<Work>,
    model: String,
) -> Result<BenchReport, BenchError> {
    if !(rate.is_finite() && rate > 0.0) {
        return Err(BenchError::Options(format!(
            "--request-rate must be a positive number, not {rate}"
        )));
    }
    let cap = Arc::new(tokio::sync::Semaphore::new(
        opts.max_concurrency
            .unwrap_or(tokio::sync::Semaphore::MAX_PERMITS)
            .clamp(1, tokio::sync::Semaphore::MAX_PERMITS),
    ));
    let start = Instant::now();
    let mut at = 0.0;
    let mut tasks = Vec::with_capacity(opts.requests);
    for (i, gap) in arrival_gaps(rate, opts.requests, opts.seed)
        .into_iter()
        .enumerate()
    {
        at += gap;
        tokio::time::sleep_until((start + Duration::from_secs_f64(at)).into()).await;
        let Ok(permit) = cap.clone().acquire_owned().await else {
            break;
        };
        let (client, url, key, work) = (
            client.clone(),
            url.clone(),
            opts.api_key.clone(),
            work.clone(),
        );
        let stream = opts.stream;
        tasks.push(tokio::spawn(async move {
            let o = one(&client, &url, &key, &work.body(i), stream).await;
            drop(permit);
            o
        }));
    }
    let mut outcomes = Vec::with_capacity(tasks.len());
    for t in tasks {
        outcomes.push(
            t.await
                .unwrap_or_else(|e| Outcome::Failed(format!("request task: {e}"))),
        );
    }
    let mut report = BenchReport {
        model,
        requests: opts.requests,
        request_rate: Some(rate),
        ..BenchReport::default()
    };
    let samples = report.count(outcomes, opts.stream);
    report.finish(start, samples);
    Ok(report)
}

/// One rate tried by [`search_slo`].
#[derive(Clone, Debug, Serialize)]
pub struct SloStep {
    /// Requests per second asked for.
    pub rate: f64,
    /// Whether every request completed and the P95 latency met the target.
    pub met: bool,
    /// The run.
    pub report: BenchReport,
}

/// What [`search_slo`] found.
#[derive(Clone, Debug, Serialize)]
pub struct SloReport {
    /// The P95 end-to-end latency target, seconds.
    pub slo_p95_s: f64,
    /// The highest rate tried that met the target (`None`: none did).
    pub best_rate: Option<f64>,
    /// When the start rate missed the target: P95 latency of requests sent one at a time
    /// (no load). Above the target, no rate can meet it and the search stops there.
    pub unloaded_p95_s: Option<f64>,
    /// Every rate tried, in order.
    pub steps: Vec<SloStep>,
}

/// Finds the highest Poisson arrival rate whose P95 end-to-end latency stays at or under
/// `slo_p95` seconds with every request completed. First a few requests one at a time: they
/// warm the server up (mapped weights paged in, lazy allocations made) so that the first rate
/// does not pay for it, and give the latency without load, which no rate can beat — above
/// the target, the search stops there. Then from `opts.request_rate` (or 1 req/s), doubling
/// until the target is missed (at most 12 times) or halving until it is met (at most 6
/// times), then `bisections` halvings of the gap between the best rate that met it and the
/// lowest that did not.
pub async fn search_slo(
    opts: &BenchOptions,
    slo_p95: f64,
    bisections: usize,
    mut on_step: impl FnMut(&SloStep),
) -> Result<SloReport, BenchError> {
    if !(slo_p95.is_finite() && slo_p95 > 0.0) {
        return Err(BenchError::Options(format!(
            "--slo-p95 must be a positive number of seconds, not {slo_p95}"
        )));
    }
    let alone = run(&BenchOptions {
        request_rate: None,
        concurrency: 1,
        requests: opts.requests.clamp(1, 4),
        ..opts.clone()
    })
    .await?;
    let unloaded_p95_s = Some(alone.latency_s.p95);
    let mut steps = Vec::new();
    if alone.ok < alone.requests || alone.latency_s.p95 > slo_p95 {
        return Ok(SloReport {
            slo_p95_s: slo_p95,
            best_rate: None,
            unloaded_p95_s,
            steps,
        });
    }
    let try_rate = |rate: f64| {
        let o = BenchOptions {
            request_rate: Some(rate),
            ..opts.clone()
        };
        async move {
            let report = run(&o).await?;
            let met = report.ok == report.requests && report.latency_s.p95 <= slo_p95;
            Ok::<_, BenchError>(SloStep { rate, met, report })
        }
    };
    // The bracket: the best rate that met the target and the lowest that missed it.
    let (mut good, mut bad): (Option<f64>, Option<f64>) = (None, None);
    let mut rate = opts.request_rate.unwrap_or(1.0);
    for _ in 0..13 {
        let step = try_rate(rate).await?;
        on_step(&step);
        let met = step.met;
        steps.push(step);
        if met {
            good = Some(rate);
            if bad.is_some() {
                break;
            }
            rate *= 2.0;
        } else {
            bad = Some(rate);
            if good.is_some() || steps.len() > 6 {
                break;
            }
            rate /= 2.0;
        }
    }
    if let (Some(mut lo), Some(mut hi)) = (good, bad) {
        for _ in 0..bisections {
            let r = (lo + hi) / 2.0;
            let step = try_rate(r).await?;
            on_step(&step);
            let met = step.met;
            steps.push(step);
            if met {
                lo = r;
                good = Some(r);
            } else {
                hi = r;
            }
        }
    }
    Ok(SloReport {
        slo_p95_s: slo_p95,
        best_rate: good,
        unloaded_p95_s,
        steps,
    })
}

/// The first model the server lists. A server that is still starting (connection refused,
/// or listening while its model loads, with a 503 or an empty list) is asked again for up to
/// [`STARTING_WAIT`].
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
    let deadline = std::time::Instant::now() + STARTING_WAIT;
    loop {
        let starting = std::time::Instant::now() < deadline;
        let resp = match with_key(client.get(&url), key).send().await {
            Ok(r) => r,
            Err(e) if starting && e.is_connect() => {
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                continue;
            }
            Err(e) => return Err(err(e.to_string())),
        };
        let status = resp.status();
        // A server still loading its model answers 503 (llama-server, and wick before it
        // listens with the model) or an empty list.
        if starting && status == reqwest::StatusCode::SERVICE_UNAVAILABLE {
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            continue;
        }
        let v: Value = resp.json().await.map_err(|e| err(e.to_string()))?;
        if let Some(id) = v.pointer("/data/0/id").and_then(Value::as_str) {
            return Ok(id.to_string());
        }
        let empty = v
            .pointer("/data")
            .and_then(Value::as_array)
            .is_some_and(Vec::is_empty);
        if !(starting && status.is_success() && empty) {
            return Err(err(format!("status {status}, no model in {v}")));
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
}

/// How long [`first_model`] waits for a server that is still starting.
const STARTING_WAIT: std::time::Duration = std::time::Duration::from_secs(120);

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
            }) || v
                .pointer("/choices/0/text")
                .and_then(Value::as_str)
                .is_some_and(|t| !t.is_empty());
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
             first token  {}\n\
             inter-token  {}\n",
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
            ms(&self.itl_s),
        );
        if let Some(r) = self.request_rate {
            s = format!("arrivals     Poisson at {r:.3} req/s\n{s}");
        }
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
    fn arrivals_are_poisson_and_repeatable() {
        let gaps = arrival_gaps(4.0, 20_000, 7);
        assert_eq!(gaps, arrival_gaps(4.0, 20_000, 7));
        assert_ne!(gaps, arrival_gaps(4.0, 20_000, 8));
        let mean = gaps.iter().sum::<f64>() / gaps.len() as f64;
        assert!((mean - 0.25).abs() < 0.01, "mean gap {mean}");
        // Exponential: the share of gaps above the mean is e^-1.
        let above = gaps.iter().filter(|&&g| g > 0.25).count() as f64 / gaps.len() as f64;
        assert!((above - (-1f64).exp()).abs() < 0.02, "{above}");
        assert!(gaps.iter().all(|g| g.is_finite() && *g >= 0.0));
    }

    #[test]
    fn datasets_replay_in_order_on_either_endpoint() {
        let d = read_dataset(
            "{\"messages\": [{\"role\": \"system\", \"content\": \"Be brief.\"}, \
             {\"role\": \"user\", \"content\": \"Hi\"}]}\n\n{\"prompt\": \"Once\"}\n",
        )
        .unwrap();
        assert_eq!(d.len(), 2);
        let work = |endpoint| Work {
            body: json!({"max_tokens": 4}),
            endpoint,
            dataset: Some(d.clone()),
            prompt_len: 8,
            shared: false,
        };
        let chat = work(Endpoint::Chat);
        assert_eq!(chat.body(0)["messages"][1]["content"], "Hi");
        assert_eq!(
            chat.body(1)["messages"],
            json!([{"role": "user", "content": "Once"}])
        );
        assert_eq!(chat.body(2)["messages"], chat.body(0)["messages"]);
        let completions = work(Endpoint::Completions);
        assert_eq!(completions.body(0)["prompt"], "Be brief.\nHi");
        assert_eq!(completions.body(1)["prompt"], "Once");
        assert_eq!(completions.body(1)["max_tokens"], 4);
        for bad in ["", "{\"messages\": []}", "{\"text\": \"x\"}", "not json"] {
            assert!(read_dataset(bad).is_err(), "{bad}");
        }
    }

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
