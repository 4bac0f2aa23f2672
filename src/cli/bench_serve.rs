//! `wick bench-serve`: the load generator's command line.

use anyhow::Result;
use clap::Args;

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
    /// Requests in flight at once.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
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
    };
    let tokio_rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let report = tokio_rt.block_on(wick::server::bench::run(&opts))?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.text());
    }
    Ok(())
}
