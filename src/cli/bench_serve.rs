//! `wick bench-serve`: the load generator's command line.

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};

#[derive(Clone, Copy, ValueEnum)]
enum EndpointArg {
    /// /v1/chat/completions (thinking off in every request).
    Chat,
    /// /v1/completions (raw prompts; for servers whose chat endpoint cannot answer a
    /// random-weight model).
    Completions,
}

#[derive(Args)]
pub struct BenchServeArgs {
    /// The server's base URL.
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    url: String,
    /// Model name (default: the first one /v1/models lists).
    #[arg(long)]
    model: Option<String>,
    /// Bearer token (also read from OPENAI_API_KEY).
    #[arg(long, env = "OPENAI_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Requests in flight at once (closed loop: each worker sends its next request when the
    /// previous one ends).
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Open loop: Poisson arrivals at this many requests per second, as vLLM's benchmark
    /// (--concurrency is then unused). With --slo-p95, the rate the search starts from.
    #[arg(long)]
    request_rate: Option<f64>,
    /// Open loop: most requests in flight (default: no cap).
    #[arg(long)]
    max_concurrency: Option<usize>,
    /// Find the highest request rate whose P95 end-to-end latency stays at or under this
    /// many seconds (doubling from --request-rate, default 1, then bisecting); each rate
    /// tried sends --requests requests.
    #[arg(long)]
    slo_p95: Option<f64>,
    /// With --slo-p95: halvings of the interval between the last rate that met the target
    /// and the first that did not.
    #[arg(long, default_value_t = 4)]
    bisections: usize,
    /// Seed of the arrival times.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Which API to call.
    #[arg(long, value_enum, default_value = "chat")]
    endpoint: EndpointArg,
    /// Replay prompts from a JSONL file: one {"messages": [...]} or {"prompt": "..."} per
    /// line, in order and round again (instead of generated prompts).
    #[arg(long)]
    dataset: Option<std::path::PathBuf>,
    /// Requests in total.
    #[arg(long, default_value_t = 64)]
    requests: usize,
    /// Stream the replies (server-sent events) and measure time to first token.
    #[arg(long)]
    stream: bool,
    /// max_tokens of each request.
    #[arg(long, default_value_t = 64)]
    max_tokens: usize,
    /// Approximate prompt length in tokens.
    #[arg(long, default_value_t = 128)]
    prompt_len: usize,
    /// Send `ignore_eos: true` (wick, vLLM) so every reply is --max-tokens long.
    #[arg(long)]
    ignore_eos: bool,
    /// Per-request time limit in seconds.
    #[arg(long, default_value_t = 600)]
    timeout: u64,
    /// Send the same prompt every time (the best case for the server's prefix cache); by
    /// default each prompt starts with its request's number.
    #[arg(long)]
    shared_prompt: bool,
    /// Keep sending for this many seconds (ignoring --requests) and report the server's
    /// resident memory over the run and its slope in MB/hour (a leak check; wick servers).
    #[arg(long)]
    soak: Option<u64>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

pub fn bench_serve(a: BenchServeArgs) -> Result<()> {
    use wick::server::bench::{read_dataset, search_slo, Endpoint};
    let dataset = match &a.dataset {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("--dataset: reading {}", p.display()))?;
            Some(read_dataset(&text)?)
        }
        None => None,
    };
    let opts = wick::server::bench::BenchOptions {
        url: a.url,
        model: a.model,
        api_key: a.api_key.filter(|k| !k.is_empty()),
        concurrency: a.concurrency,
        requests: a.requests,
        stream: a.stream,
        max_tokens: a.max_tokens,
        prompt_len: a.prompt_len,
        ignore_eos: a.ignore_eos,
        timeout: std::time::Duration::from_secs(a.timeout.max(1)),
        shared_prompt: a.shared_prompt,
        soak: a.soak.map(std::time::Duration::from_secs),
        request_rate: a.request_rate,
        max_concurrency: a.max_concurrency,
        seed: a.seed,
        endpoint: match a.endpoint {
            EndpointArg::Chat => Endpoint::Chat,
            EndpointArg::Completions => Endpoint::Completions,
        },
        dataset,
    };
    anyhow::ensure!(
        a.soak.is_none() || (a.request_rate.is_none() && a.slo_p95.is_none()),
        "--soak runs a closed loop; it does not combine with --request-rate or --slo-p95"
    );
    let tokio_rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    if let Some(slo) = a.slo_p95 {
        let json = a.json;
        let found = tokio_rt.block_on(search_slo(&opts, slo, a.bisections, |step| {
            if !json {
                eprintln!(
                    "rate {:7.3} req/s: p95 {:8.1} ms, {} of {} ok ({:.2} req/s done) → {}",
                    step.rate,
                    step.report.latency_s.p95 * 1e3,
                    step.report.ok,
                    step.report.requests,
                    step.report.qps,
                    if step.met { "meets" } else { "misses" },
                );
            }
        }))?;
        if a.json {
            println!("{}", serde_json::to_string_pretty(&found)?);
            return Ok(());
        }
        match found.best_rate {
            Some(r) => {
                let best = found
                    .steps
                    .iter()
                    .rfind(|s| s.met && s.rate == r)
                    .expect("the best rate was tried");
                println!(
                    "highest rate with P95 latency ≤ {slo} s: {r:.3} req/s (of {} rates tried)",
                    found.steps.len()
                );
                print!("{}", best.report.text());
            }
            None => println!(
                "no rate tried kept P95 latency ≤ {slo} s (lowest tried: {:.3} req/s)",
                found
                    .steps
                    .iter()
                    .map(|s| s.rate)
                    .fold(f64::INFINITY, f64::min)
            ),
        }
        return Ok(());
    }
    let report = tokio_rt.block_on(wick::server::bench::run(&opts))?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.text());
    }
    Ok(())
}
