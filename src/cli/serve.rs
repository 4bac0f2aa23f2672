//! `wick serve`: the OpenAI-compatible server's command line, bootstrap and startup report.
//!
//! The command line is vLLM's where the two mean the same (see [`crate::vllm`] for the
//! vLLM flags without a wick counterpart), and every flag can be set from the environment as
//! `WICK_` and its name in capitals (`--max-model-len` is `WICK_MAX_MODEL_LEN`).

use std::sync::Arc;

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};

use crate::{EngineArgs, ModelArgs};
use wick::config::GenerationConfig;
use wick::runtime::Runtime;

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum TaskArg {
    /// Embeddings for an embedding model (a sentence-transformers `modules.json` with a
    /// Pooling module, as Qwen3-Embedding has, or weights without an output head), text
    /// generation otherwise.
    Auto,
    /// Text generation: /v1/chat/completions and /v1/completions.
    Generate,
    /// Embeddings: /v1/embeddings, the last token's final hidden state, L2-normalized (any
    /// Qwen3 checkpoint can be pooled this way, a chat model too).
    Embed,
}

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
    /// What the model serves: text generation or embeddings (/v1/embeddings). The
    /// endpoints of the other task answer 400.
    #[arg(long, value_enum, default_value = "auto", env = "WICK_TASK")]
    task: TaskArg,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1", env = "WICK_HOST")]
    host: String,
    /// Port to listen on (0: any free port; the address is printed on stderr).
    #[arg(long, default_value_t = 8000, env = "WICK_PORT")]
    port: u16,
    /// The model names clients may send (default: the Hub id or the directory's name); the
    /// first is the one replies carry.
    #[arg(long, num_args = 1.., value_delimiter = ',', env = "WICK_SERVED_MODEL_NAME")]
    served_model_name: Vec<String>,
    /// Template variables for requests that do not set them, as JSON, e.g.
    /// '{"enable_thinking": false}' to switch Qwen3's thinking off by default.
    #[arg(long, env = "WICK_DEFAULT_CHAT_TEMPLATE_KWARGS")]
    default_chat_template_kwargs: Option<String>,
    /// Sampling defaults: auto (the model's generation_config.json), vllm (temperature 1,
    /// no top-k/top-p) or a directory holding a generation_config.json.
    #[arg(long, default_value = "auto", env = "WICK_GENERATION_CONFIG")]
    generation_config: String,
    /// Sampling defaults over the generation config, as JSON, e.g. '{"temperature": 0.6}'
    /// (temperature, top_k, top_p, min_p, repetition_penalty).
    #[arg(long, env = "WICK_OVERRIDE_GENERATION_CONFIG")]
    override_generation_config: Option<String>,
    /// Seed for requests that send none: a server restarted with the same seed answers the
    /// same requests in the same order with the same tokens (default: unseeded).
    #[arg(long, env = "WICK_SEED")]
    seed: Option<u64>,
    /// Require `Authorization: Bearer KEY` on every route but /health (also read from
    /// WICK_API_KEY).
    #[arg(long, env = "WICK_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Most requests waiting for a slot; more are refused with 429 and Retry-After.
    #[arg(long, default_value_t = 256, env = "WICK_MAX_QUEUE")]
    max_queue: usize,
    /// Fraction (0, 1] of the GPU's memory wick may use: the KV cache gets that share less
    /// the weights and activations (and no more than --kv-cache-mb if given). Where the
    /// memory size is unknown (the CPU; GPUs other than Vulkan), the fraction is of the
    /// --kv-cache-mb budget (default 1024 MiB) instead. The startup line shows the sums.
    #[arg(long, env = "WICK_GPU_MEMORY_UTILIZATION")]
    gpu_memory_utilization: Option<f64>,
    /// JSON fields the model's thinking is sent in: `reasoning` (current vLLM) and
    /// `reasoning_content` (DeepSeek's name, which many clients read), comma-separated.
    #[arg(
        long,
        default_value = "reasoning,reasoning_content",
        value_delimiter = ',',
        env = "WICK_REASONING_FIELD"
    )]
    reasoning_field: Vec<String>,
    /// What to do when the queue fills up.
    #[arg(
        long,
        value_enum,
        default_value = "refuse",
        env = "WICK_OVERLOAD_POLICY"
    )]
    overload_policy: OverloadArg,
    /// With --overload-policy degrade: waiting requests at which degrading starts
    /// (default: half of --max-queue).
    #[arg(long, env = "WICK_DEGRADE_THRESHOLD")]
    degrade_threshold: Option<usize>,
    /// With --overload-policy degrade: the max_tokens degraded requests are clamped to.
    #[arg(long, default_value_t = 64, env = "WICK_DEGRADE_MAX_TOKENS")]
    degrade_max_tokens: usize,
    /// Longest a request may run, in seconds: then it is cancelled and answered with 504
    /// (or, once a stream has started, an error event that ends the stream).
    #[arg(long, default_value_t = 600, env = "WICK_REQUEST_TIMEOUT")]
    request_timeout: u64,
    /// Serve /metrics without the API key (it needs the key when one is set).
    #[arg(long, env = "WICK_METRICS_PUBLIC", value_parser = clap::builder::BoolishValueParser::new())]
    metrics_public: bool,
    /// Web origins (e.g. https://app.example.com, or *) whose pages may call the API from a
    /// browser (CORS): comma-separated, or a JSON list as vLLM takes it. None by default.
    #[arg(long, env = "WICK_ALLOWED_ORIGINS")]
    allowed_origins: Vec<String>,
    /// Let `<|im_start|>`, `<think>` and other special-token strings inside messages and
    /// tool definitions become control tokens (by default they are encoded as text, so a
    /// user cannot forge turns).
    #[arg(long, env = "WICK_CONTROL_TOKENS_IN_CONTENT", value_parser = clap::builder::BoolishValueParser::new())]
    control_tokens_in_content: bool,
    /// Most open connections; past it a connection is answered 503 and closed.
    #[arg(long, default_value_t = 512, env = "WICK_MAX_CONNECTIONS")]
    max_connections: usize,
    /// Seconds a client may take to send a request's headers; then the connection closes.
    #[arg(long, default_value_t = 10, env = "WICK_HEADER_TIMEOUT")]
    header_timeout: u64,
    /// Seconds a client may take to send a request's body; then it is answered 408.
    #[arg(long, default_value_t = 30, env = "WICK_BODY_TIMEOUT")]
    body_timeout: u64,
    /// Seconds a connection may stay open without a request, or with a reply the client does
    /// not read; then it is closed (which cancels its request and frees its KV blocks).
    #[arg(long, default_value_t = 60, env = "WICK_IDLE_TIMEOUT")]
    idle_timeout: u64,
    /// Seconds SIGTERM or Ctrl-C waits for requests in flight before closing them and exiting.
    #[arg(long, default_value_t = 30, env = "WICK_SHUTDOWN_TIMEOUT")]
    shutdown_timeout: u64,
    /// Serve no web pages: without this flag, / is a chat page and /dashboard a live view
    /// of latency, throughput, KV cache and memory (their data needs the API key when one
    /// is set).
    #[arg(long, env = "WICK_NO_UI", value_parser = clap::builder::BoolishValueParser::new())]
    no_ui: bool,
    /// End-to-end P95 latency target in seconds, drawn on the dashboard's latency chart.
    #[arg(long, env = "WICK_SLO_P95", value_name = "SECONDS")]
    slo_p95: Option<f64>,
    /// Time-to-first-token P95 target in seconds, drawn on the dashboard's TTFT chart.
    #[arg(long, env = "WICK_SLO_TTFT", value_name = "SECONDS")]
    slo_ttft: Option<f64>,
    /// Seconds between the statistics lines printed while requests run (prompt and
    /// generation throughput, running and waiting requests, KV cache usage, prefix-cache hit
    /// rate); `--disable-log-stats` turns them off.
    #[arg(
        long,
        env = "VLLM_LOG_STATS_INTERVAL",
        value_name = "SECONDS",
        default_value_t = 10.0
    )]
    log_stats_interval: f64,
    #[command(flatten)]
    vllm: crate::vllm::VllmArgs,
}

/// Prints vLLM's periodic statistics line every `every` seconds while there is work:
/// throughput over the interval, requests running and waiting, KV cache usage and the
/// prefix-cache hit rate over the interval. Idle intervals print nothing.
/// Makes a SIGBUS say what most likely caused it before it ends the process as it would
/// anyway. The CPU backend reads the weights in place from their memory map
/// ([`wick::loader`]); a model file truncated (or rewritten) in place while it is served takes
/// those pages away, and the next read of them raises SIGBUS. No check at load can prevent
/// that; files replaced by renaming a new one over them (as downloaders and `mv` do) are safe.
#[cfg(unix)]
fn explain_sigbus() {
    extern "C" fn on_sigbus(_: libc::c_int) {
        const MSG: &[u8] = b"wick: SIGBUS: a memory-mapped file could no longer be read, most \
            likely a model file truncated or rewritten in place while served; replace model \
            files by renaming a new file over them, then restart\n";
        // SAFETY: write(2) is async-signal-safe and the buffer is static.
        unsafe { libc::write(2, MSG.as_ptr().cast(), MSG.len()) };
        // SA_RESETHAND has restored the default action: returning retries the read, which
        // raises SIGBUS again and ends the process with it.
    }
    // SAFETY: a zeroed sigaction is valid; the handler only calls write(2).
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigbus as extern "C" fn(libc::c_int) as libc::sighandler_t;
        sa.sa_flags = libc::SA_RESETHAND;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(libc::SIGBUS, &sa, std::ptr::null_mut());
    }
}

async fn log_stats(state: Arc<wick::server::AppState>, every: f64) {
    let every = std::time::Duration::from_secs_f64(every.clamp(0.1, 86_400.0));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last: Option<(std::time::Instant, wick::engine::metrics::MetricsSnapshot)> = None;
    loop {
        tick.tick().await;
        let Some(l) = state.loaded() else { continue };
        let now = (std::time::Instant::now(), l.engine.metrics().snapshot());
        // The first interval counts from the engine's start (every counter 0 then), so a
        // request served before the first tick is not taken for the baseline.
        let start = now.0.checked_sub(every).unwrap_or(now.0);
        let (t0, s0) = *last.get_or_insert((start, Default::default()));
        let s = &now.1;
        let secs = now.0.duration_since(t0).as_secs_f64().max(1e-3);
        let prompt = s.prompt_tokens.saturating_sub(s0.prompt_tokens);
        let generated = s.generation_tokens.saturating_sub(s0.generation_tokens);
        if prompt + generated > 0 || s.running + s.waiting > 0 {
            let kv = 100.0 * s.kv_blocks_used as f64 / s.kv_blocks_total.max(1) as f64;
            let queried = s
                .prefix_cache_query_tokens
                .saturating_sub(s0.prefix_cache_query_tokens);
            let hit = s
                .prefix_cache_hit_tokens
                .saturating_sub(s0.prefix_cache_hit_tokens);
            let hit_rate = if queried > 0 {
                100.0 * hit as f64 / queried as f64
            } else {
                0.0
            };
            eprintln!(
                "wick: Avg prompt throughput: {:.1} tokens/s, Avg generation throughput: \
                 {:.1} tokens/s, Running: {} reqs, Waiting: {} reqs, KV cache usage: \
                 {kv:.1}%, Prefix cache hit rate: {hit_rate:.1}%",
                prompt as f64 / secs,
                generated as f64 / secs,
                s.running,
                s.waiting,
            );
        }
        last = Some(now);
    }
}

/// `--allowed-origins` values: each comma-separated or a JSON list.
fn origins(values: &[String]) -> Result<Vec<axum::http::HeaderValue>> {
    let mut out = Vec::new();
    for v in values {
        let list: Vec<String> = if v.trim_start().starts_with('[') {
            serde_json::from_str(v).with_context(|| {
                format!("--allowed-origins: `{v}` is not a JSON list of strings")
            })?
        } else {
            v.split(',').map(str::to_string).collect()
        };
        for o in list {
            let o = o.trim();
            if o.is_empty() {
                continue;
            }
            out.push(
                axum::http::HeaderValue::from_str(o)
                    .with_context(|| format!("--allowed-origins: `{o}` is not an origin"))?,
            );
        }
    }
    Ok(out)
}

/// A JSON object flag.
fn json_object(flag: &str, v: &str) -> Result<serde_json::Map<String, serde_json::Value>> {
    match serde_json::from_str(v) {
        Ok(serde_json::Value::Object(m)) => Ok(m),
        _ => anyhow::bail!(
            "{flag}: expected a JSON object such as '{{\"enable_thinking\": false}}', got `{v}`"
        ),
    }
}

/// `--generation-config` and `--override-generation-config`, read and checked before the
/// model loads.
struct GenerationFlags {
    /// `None`: the model's own (`auto`).
    base: Option<GenerationConfig>,
    /// The fields the override sets.
    over: GenerationConfig,
}

impl GenerationFlags {
    fn parse(spec: &str, overrides: Option<&str>) -> Result<Self> {
        let base = match spec {
            "auto" => None,
            "vllm" => Some(GenerationConfig::default()),
            dir => {
                let path = std::path::Path::new(dir).join("generation_config.json");
                Some(
                    GenerationConfig::from_file(&path)
                        .with_context(|| format!("--generation-config {dir}"))?,
                )
            }
        };
        let mut over = GenerationConfig::default();
        if let Some(o) = overrides {
            let m = json_object("--override-generation-config", o)?;
            const KNOWN: [&str; 5] = [
                "temperature",
                "top_k",
                "top_p",
                "min_p",
                "repetition_penalty",
            ];
            if let Some(k) = m.keys().find(|k| !KNOWN.contains(&k.as_str())) {
                anyhow::bail!(
                    "--override-generation-config: `{k}` is not one wick applies ({})",
                    KNOWN.join(", ")
                );
            }
            over = GenerationConfig::from_value(&serde_json::Value::Object(m.clone()));
            for (k, v) in &m {
                let read = match k.as_str() {
                    "temperature" => over.temperature.is_some(),
                    "top_k" => over.top_k.is_some(),
                    "top_p" => over.top_p.is_some(),
                    "min_p" => over.min_p.is_some(),
                    _ => over.repetition_penalty.is_some(),
                };
                anyhow::ensure!(
                    read,
                    "--override-generation-config: `{k}` must be a number{}, got {v}",
                    if k == "top_k" { " (a whole one)" } else { "" },
                );
            }
        }
        Ok(GenerationFlags { base, over })
    }

    /// The sampling defaults over the model's generation config.
    fn resolve(&self, model: &GenerationConfig) -> GenerationConfig {
        let g = self.base.clone().unwrap_or_else(|| model.clone());
        let o = &self.over;
        GenerationConfig {
            temperature: o.temperature.or(g.temperature),
            top_k: o.top_k.or(g.top_k),
            top_p: o.top_p.or(g.top_p),
            min_p: o.min_p.or(g.min_p),
            repetition_penalty: o.repetition_penalty.or(g.repetition_penalty),
            ..g
        }
    }
}

pub fn serve(mut a: ServeArgs) -> Result<()> {
    use wick::server::{AppState, Loaded, OverloadPolicy, ServerOptions};
    let secs = |s: u64| std::time::Duration::from_secs(s.max(1));
    #[cfg(unix)]
    explain_sigbus();

    // Every flag is checked before the model loads, so a mistake costs no loading time.
    let vllm = a.vllm.apply(a.model.model())?;
    for n in &vllm.notices {
        eprintln!("wick: note: {n}");
    }
    if vllm.quantize.is_some() {
        a.model.quantize = vllm.quantize;
    }
    let default_kwargs = match &a.default_chat_template_kwargs {
        Some(v) => json_object("--default-chat-template-kwargs", v)?,
        None => serde_json::Map::new(),
    };
    if let Some(v) = default_kwargs.get("enable_thinking") {
        anyhow::ensure!(
            v.is_boolean(),
            "--default-chat-template-kwargs: enable_thinking must be true or false"
        );
    }
    let reasoning_fields: Vec<String> = a
        .reasoning_field
        .iter()
        .map(|f| f.trim().to_string())
        .filter(|f| !f.is_empty())
        .collect();
    anyhow::ensure!(
        !reasoning_fields.is_empty(),
        "--reasoning-field: give at least one field name"
    );
    let allowed_origins = origins(&a.allowed_origins)?;
    for (flag, v) in [
        ("--slo-p95", a.slo_p95),
        ("--slo-ttft", a.slo_ttft),
        ("--log-stats-interval", Some(a.log_stats_interval)),
    ] {
        if let Some(v) = v {
            anyhow::ensure!(
                v.is_finite() && v > 0.0,
                "{flag}: a number of seconds above 0, not {v}"
            );
        }
    }
    let generation = GenerationFlags::parse(
        &a.generation_config,
        a.override_generation_config.as_deref(),
    )?;
    if let Some(t) = &a.model.chat_template {
        wick::text::chat_template::ChatTemplate::new(
            &crate::args::chat_template_source(t)?,
            None,
            None,
        )
        .context("--chat-template")?;
    }

    let mut engine_opts = a.engine.options(a.model.max_model_len);
    engine_opts.max_waiting = Some(a.max_queue);
    // Applied once the model is loaded (the weights' size is part of the sum).
    let utilization = a.gpu_memory_utilization;
    if let Some(f) = utilization {
        anyhow::ensure!(
            f > 0.0 && f <= 1.0,
            "--gpu-memory-utilization must be in (0, 1], not {f}"
        );
    }
    let overload = match a.overload_policy {
        OverloadArg::Refuse => OverloadPolicy::Refuse,
        OverloadArg::Degrade => OverloadPolicy::Degrade {
            threshold: a.degrade_threshold.unwrap_or(a.max_queue / 2),
            max_tokens: a.degrade_max_tokens.max(1),
        },
    };
    let state = AppState::new(ServerOptions {
        served_model_names: a
            .served_model_name
            .iter()
            .map(|n| n.trim().to_string())
            .filter(|n| !n.is_empty())
            .collect(),
        api_key: a.api_key.clone().filter(|k| !k.is_empty()),
        reasoning_fields,
        default_chat_template_kwargs: default_kwargs,
        seed: a.seed,
        overload,
        request_timeout: secs(a.request_timeout),
        metrics_public: a.metrics_public,
        allowed_origins,
        control_tokens_in_content: a.control_tokens_in_content,
        ui: !a.no_ui,
        slo_p95: a.slo_p95,
        slo_ttft: a.slo_ttft,
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
        if state.opts.ui {
            let addr = listener.local_addr()?;
            eprintln!("wick: chat page http://{addr}/, dashboard http://{addr}/dashboard");
        }
        // Load while already answering /health (503 until the engine runs).
        let st = state.clone();
        let model = a.model;
        let task = a.task;
        let loading = tokio::task::spawn_blocking(move || -> Result<Runtime> {
            let mut rt = model.load()?;
            let g = generation.resolve(rt.generation_config());
            rt.set_generation_config(g);
            let defaults = rt.default_params();
            defaults.validate().context(
                "the sampling defaults (--generation-config / --override-generation-config)",
            )?;
            let embed = match task {
                TaskArg::Auto => rt.is_embedding_model(),
                TaskArg::Generate => false,
                TaskArg::Embed => true,
            };
            if embed {
                engine_opts.task = wick::engine::Task::Embed;
                engine_opts.cache_replies = false;
            }
            if let Some(f) = utilization {
                let budget = rt.size_kv_cache(f, &mut engine_opts)?;
                eprintln!("wick: {budget}");
            }
            let engine = rt.start_engine(&engine_opts)?;
            let name = st
                .opts
                .served_model_names
                .first()
                .cloned()
                .unwrap_or_else(|| rt.name().to_string());
            let info = engine.info();
            let mut gpu = rt
                .device_memory_bytes()
                .map(|b| format!("; device memory {} MiB", b >> 20))
                .unwrap_or_default();
            if let Some(g) = rt.gpu_stats() {
                gpu += &format!("; GPU buffers {} MiB", g.memory_bytes >> 20);
            }
            eprintln!(
                "wick: {}; {}; weights {} MiB{gpu}",
                wick::resources::Fences::detect(),
                rt.device(),
                rt.weight_bytes() >> 20
            );
            eprintln!(
                "wick: serving {name} for {} ({} KV blocks of {} tokens, {} KV cache of {:.0} MiB, \
                 max_model_len {})",
                if embed { "embeddings" } else { "text generation" },
                info.num_blocks,
                info.block_size,
                info.kv_dtype,
                info.kv_bytes as f64 / (1 << 20) as f64,
                info.max_model_len
            );
            st.set_loaded(Loaded {
                engine: Arc::new(engine),
                defaults,
                model_name: name,
                gpu_stats: rt.gpu_stats_reader(),
                load_times: rt.load_times(),
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
        if !a.vllm.disable_log_stats {
            tokio::spawn(log_stats(state.clone(), a.log_stats_interval));
        }
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
