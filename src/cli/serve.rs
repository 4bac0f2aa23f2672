//! `wick serve`: the OpenAI-compatible server's command line, bootstrap and startup report.

use std::sync::Arc;

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};

use crate::{EngineArgs, ModelArgs};
use wick::runtime::Runtime;

#[derive(Clone, Copy, ValueEnum)]
enum OverloadArg {
    /// Answer 429 with Retry-After once --max-queue requests wait.
    Refuse,
    /// From --degrade-threshold waiting requests on, shorten replies (--degrade-max-tokens)
    /// and decode greedily; still refuse past --max-queue.
    Degrade,
}

#[derive(Args)]
pub struct ServeArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    engine: EngineArgs,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port to listen on (0: any free port; the address is printed on stderr).
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// The model name clients send (default: the Hub id or the directory's name).
    #[arg(long)]
    served_model_name: Option<String>,
    /// Require `Authorization: Bearer KEY` on every route but /health (also read from
    /// WICK_API_KEY).
    #[arg(long, env = "WICK_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Most requests waiting for a slot; more are refused with 429 and Retry-After.
    #[arg(long, default_value_t = 256)]
    max_queue: usize,
    /// Fraction (0, 1] of the --kv-cache-mb budget (default 1024 MiB) given to the KV cache.
    /// Not a share of GPU memory: wgpu cannot query how much is free.
    #[arg(long)]
    gpu_memory_utilization: Option<f64>,
    /// JSON field for the model's thinking in replies (vLLM's default; some clients want
    /// `reasoning`).
    #[arg(long, default_value = "reasoning_content")]
    reasoning_field: String,
    /// What to do when the queue fills up.
    #[arg(long, value_enum, default_value = "refuse")]
    overload_policy: OverloadArg,
    /// With --overload-policy degrade: waiting requests at which degrading starts
    /// (default: half of --max-queue).
    #[arg(long)]
    degrade_threshold: Option<usize>,
    /// With --overload-policy degrade: the max_tokens degraded requests are clamped to.
    #[arg(long, default_value_t = 64)]
    degrade_max_tokens: usize,
    /// Longest a request may run, in seconds: then it is cancelled and answered with 504
    /// (or, once a stream has started, an error event that ends the stream).
    #[arg(long, default_value_t = 600)]
    request_timeout: u64,
    /// Serve /metrics without the API key (it needs the key when one is set).
    #[arg(long)]
    metrics_public: bool,
    /// Web origins (e.g. https://app.example.com, or *) whose pages may call the API from a
    /// browser (CORS). None by default.
    #[arg(long, value_delimiter = ',')]
    allowed_origins: Vec<String>,
    /// Let `<|im_start|>`, `<think>` and other special-token strings inside messages and
    /// tool definitions become control tokens (by default they are encoded as text, so a
    /// user cannot forge turns).
    #[arg(long)]
    control_tokens_in_content: bool,
    /// Most open connections; past it a connection is answered 503 and closed.
    #[arg(long, default_value_t = 512)]
    max_connections: usize,
    /// Seconds a client may take to send a request's headers; then the connection closes.
    #[arg(long, default_value_t = 10)]
    header_timeout: u64,
    /// Seconds a client may take to send a request's body; then it is answered 408.
    #[arg(long, default_value_t = 30)]
    body_timeout: u64,
    /// Seconds a connection may stay open without a request, or with a reply the client does
    /// not read; then it is closed (which cancels its request and frees its KV blocks).
    #[arg(long, default_value_t = 60)]
    idle_timeout: u64,
    /// Seconds SIGTERM or Ctrl-C waits for requests in flight before closing them and exiting.
    #[arg(long, default_value_t = 30)]
    shutdown_timeout: u64,
}

pub fn serve(a: ServeArgs) -> Result<()> {
    use wick::server::{AppState, Loaded, OverloadPolicy, ServerOptions};
    let secs = |s: u64| std::time::Duration::from_secs(s.max(1));

    let mut engine_opts = a.engine.options(a.model.max_model_len);
    engine_opts.max_waiting = Some(a.max_queue);
    if let Some(f) = a.gpu_memory_utilization {
        anyhow::ensure!(
            f > 0.0 && f <= 1.0,
            "--gpu-memory-utilization must be in (0, 1], not {f}"
        );
        let budget = a
            .engine
            .kv_cache_mb
            .unwrap_or(wick::engine::DEFAULT_KV_CACHE_MB) as f64;
        engine_opts.kv_cache_mb = Some(((budget * f) as usize).max(1));
    }
    let overload = match a.overload_policy {
        OverloadArg::Refuse => OverloadPolicy::Refuse,
        OverloadArg::Degrade => OverloadPolicy::Degrade {
            threshold: a.degrade_threshold.unwrap_or(a.max_queue / 2),
            max_tokens: a.degrade_max_tokens.max(1),
        },
    };
    let state = AppState::new(ServerOptions {
        served_model_name: a.served_model_name.clone(),
        api_key: a.api_key.clone().filter(|k| !k.is_empty()),
        reasoning_field: a.reasoning_field.clone(),
        overload,
        request_timeout: secs(a.request_timeout),
        metrics_public: a.metrics_public,
        allowed_origins: a
            .allowed_origins
            .iter()
            .map(|o| {
                axum::http::HeaderValue::from_str(o.trim())
                    .with_context(|| format!("--allowed-origins: `{o}` is not an origin"))
            })
            .collect::<Result<_>>()?,
        control_tokens_in_content: a.control_tokens_in_content,
        limits: wick::server::conn::Limits {
            max_connections: a.max_connections.max(1),
            header_timeout: secs(a.header_timeout),
            body_timeout: secs(a.body_timeout),
            idle_timeout: secs(a.idle_timeout),
            shutdown_timeout: std::time::Duration::from_secs(a.shutdown_timeout),
        },
        ..ServerOptions::default()
    });
    // Blocking work (rendering, tokenizing) queues for a bounded pool rather than growing a
    // thread, and its allocator arena, per request in a burst.
    let tokio_rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(16)
        .build()?;
    tokio_rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind((a.host.as_str(), a.port))
            .await
            .with_context(|| format!("listening on {}:{}", a.host, a.port))?;
        eprintln!("wick: listening on http://{}", listener.local_addr()?);
        // Load while already answering /health (503 until the engine runs).
        let st = state.clone();
        let model = a.model;
        let loading = tokio::task::spawn_blocking(move || -> Result<Runtime> {
            let rt = model.load()?;
            let engine = rt.start_engine(&engine_opts)?;
            let name = st
                .opts
                .served_model_name
                .clone()
                .unwrap_or_else(|| rt.name().to_string());
            let info = engine.info();
            eprintln!(
                "wick: {}; {}; weights {} MiB",
                wick::resources::Fences::detect(),
                rt.device(),
                rt.weight_bytes() >> 20
            );
            eprintln!(
                "wick: serving {name} ({} KV blocks of {} tokens, {} KV cache of {:.0} MiB, \
                 max_model_len {})",
                info.num_blocks,
                info.block_size,
                info.kv_dtype,
                info.kv_bytes as f64 / (1 << 20) as f64,
                info.max_model_len
            );
            st.set_loaded(Loaded {
                engine: Arc::new(engine),
                defaults: rt.default_params(),
                model_name: name,
            });
            Ok(rt)
        });
        let runtime = Arc::new(std::sync::Mutex::new(None));
        let keep = runtime.clone();
        tokio::spawn(async move {
            match loading.await {
                Ok(Ok(rt)) => {
                    if let Ok(mut k) = keep.lock() {
                        *k = Some(rt);
                    }
                }
                Ok(Err(e)) => {
                    eprintln!("wick: {e:#}");
                    std::process::exit(1);
                }
                Err(e) => {
                    eprintln!("wick: loading failed: {e}");
                    std::process::exit(1);
                }
            }
        });
        // An engine that stopped by itself (its steps kept failing) would leave a server
        // answering 503 for ever: exit non-zero instead, for a supervisor to restart it.
        let watched = state.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                if let Some(l) = watched.loaded() {
                    if !watched.is_draining() && !l.engine.is_running() {
                        eprintln!("wick: the engine stopped unexpectedly; exiting");
                        std::process::exit(70);
                    }
                }
            }
        });
        wick::server::serve(state.clone(), listener, wick::server::shutdown_signal()).await?;
        if let Some(l) = state.loaded() {
            l.engine.shutdown();
            l.engine.join();
        }
        drop(runtime);
        eprintln!("wick: stopped");
        Ok(())
    })
}
