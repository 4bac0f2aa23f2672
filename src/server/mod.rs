//! `wick serve`: an OpenAI-compatible HTTP server on the [`Engine`], built on axum/tokio.
//!
//! ```text
//! client ─HTTP─▶ axum ─▶ auth, status counting ─▶ handler: parse + check (request.rs)
//!                                                   │ n × engine.submit()
//!                 SSE or JSON ◀── response.rs ◀─────┘ merged event streams of the n choices
//! ```
//!
//! - Endpoints: `/v1/chat/completions`, `/v1/completions` (both streaming and not),
//!   `/v1/embeddings` (with `--task embed`), `/v1/models`, `/health`, `/metrics` (Prometheus
//!   text), `/tokenize`, `/detokenize`; unless `--no-ui`, the chat page `/`, the dashboard
//!   `/dashboard` and its data `/dashboard/data`. An engine either generates or embeds: the
//!   endpoints of the other task answer 400.
//! - The server listens before the model is loaded: `/health` says 503 until the engine runs,
//!   and again once draining starts.
//! - Load: the engine's waiting queue is bounded (`--max-queue`); past it a request gets 429
//!   with `Retry-After`, or, with `--overload-policy degrade`, past a lower threshold requests
//!   are shortened and made greedy (and told so in the `x-wick-degraded` header).
//! - A client that goes away (streaming or not) drops the engine stream, which cancels the
//!   request and frees its KV blocks at the next step. Every request has a time limit
//!   (`--request-timeout`): past it the request is cancelled and answered with 504, or, when
//!   a stream has already started with status 200, the stream ends with an error event and
//!   no `[DONE]` (clients then raise an error instead of taking a cut-off reply for a whole
//!   one).
//! - Shutdown (SIGTERM or Ctrl-C): `/health` turns 503, new requests get 503, requests in
//!   flight finish for up to the shutdown timeout, then every connection is closed and
//!   [`serve`] returns.
//! - Connections: [`conn`] accepts them and bounds what a client controls (a connection
//!   cap, header, body and idle timeouts, a client that stops reading); the middleware in
//!   front of every route checks the key (every route but `/health`, the page files, which
//!   hold no data, and `/metrics` when public), the content type (JSON only: 415) and reads the body within its size and time
//!   limits.
//!
//! The files: [`request`] checks bodies and maps them to engine requests, [`response`] runs
//! them and writes JSON or SSE, [`embeddings`] is `/v1/embeddings`, [`crate::text::tool_calls`] pulls Qwen3's `<tool_call>` blocks out of the
//! answer, [`error`] is the one error type, [`metrics`] renders `/metrics`, and
//! [`bench`](mod@bench) is the `wick bench-serve` load generator. [`ui`] serves the chat page
//! and the dashboard, whose samples [`history`] keeps.

#[cfg(feature = "bench-serve")]
pub mod bench;
pub mod conn;
pub mod embeddings;
pub mod error;
pub mod history;
pub mod metrics;
pub mod request;
pub mod response;
pub mod ui;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Request as HttpRequest, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};

use crate::engine::Engine;
use crate::sampler::SamplingParams;
use error::ApiError;

/// What to do when the queue fills up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OverloadPolicy {
    /// Refuse with 429 once `--max-queue` requests wait.
    Refuse,
    /// From `threshold` waiting requests on, clamp `max_tokens` to `max_tokens` and decode
    /// greedily; still refuse past `--max-queue`.
    Degrade {
        /// Waiting requests at which degradation starts.
        threshold: usize,
        /// The clamp.
        max_tokens: usize,
    },
}

/// How the server behaves.
#[derive(Clone, Debug)]
pub struct ServerOptions {
    /// The model names clients may use (vLLM's `--served-model-name`): the first is the one
    /// replies carry, every one is accepted in requests and listed by `/v1/models`. Empty: the
    /// name the model was loaded under.
    pub served_model_names: Vec<String>,
    /// Required bearer token, if any: every route but `/health` (and `/metrics` when
    /// `metrics_public`) needs it.
    pub api_key: Option<String>,
    /// `/metrics` answers without the key.
    pub metrics_public: bool,
    /// Web origins allowed to call the API from a browser (CORS); `*` for any. Empty: no
    /// CORS headers, so browsers keep other sites' pages from reading the answers.
    pub allowed_origins: Vec<axum::http::HeaderValue>,
    /// Let `<|im_start|>` and other added-token strings in messages and tools become
    /// control tokens (off: they are text; see [`crate::text::chat_template`]).
    pub control_tokens_in_content: bool,
    /// JSON fields the reasoning text is sent in: `reasoning` (current vLLM and OpenAI's
    /// guidance) and `reasoning_content` (DeepSeek's name, which many clients read) by default.
    pub reasoning_fields: Vec<String>,
    /// Template variables for chat requests that do not set them (vLLM's
    /// `--default-chat-template-kwargs`), e.g. `{"enable_thinking": false}`.
    pub default_chat_template_kwargs: serde_json::Map<String, Value>,
    /// Overload behaviour.
    pub overload: OverloadPolicy,
    /// Longest a request may run.
    pub request_timeout: Duration,
    /// Largest request body.
    pub max_body_bytes: usize,
    /// Connection limits and timeouts, including how long draining may take.
    pub limits: conn::Limits,
    /// vLLM's `--seed`: requests without a seed get one from a stream seeded with this, so a
    /// server restarted with the same seed answers the same requests, in the same order, with
    /// the same tokens. `None`: unseeded requests draw from the OS.
    pub seed: Option<u64>,
    /// Serve the chat page at `/` and the dashboard at `/dashboard` (see [`ui`]).
    pub ui: bool,
    /// The end-to-end P95 latency target in seconds, drawn on the dashboard.
    pub slo_p95: Option<f64>,
    /// The time-to-first-token P95 target in seconds, drawn on the dashboard.
    pub slo_ttft: Option<f64>,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            served_model_names: Vec::new(),
            api_key: None,
            metrics_public: false,
            allowed_origins: Vec::new(),
            control_tokens_in_content: false,
            reasoning_fields: vec!["reasoning".into(), "reasoning_content".into()],
            default_chat_template_kwargs: serde_json::Map::new(),
            overload: OverloadPolicy::Refuse,
            request_timeout: Duration::from_secs(600),
            max_body_bytes: 8 << 20,
            limits: conn::Limits::default(),
            seed: None,
            ui: true,
            slo_p95: None,
            slo_ttft: None,
        }
    }
}

/// The model once loaded.
pub struct Loaded {
    /// The engine.
    pub engine: Arc<Engine>,
    /// Sampling defaults (the model's generation config).
    pub defaults: SamplingParams,
    /// The model name clients use.
    pub model_name: String,
    /// The GPU backend's counters (`None` on the CPU), for `wick_gpu_memory_bytes`.
    pub gpu_stats: Option<crate::runtime::GpuStatsFn>,
    /// How long loading took, for `wick_load_seconds`.
    pub load_times: crate::loader::LoadTimes,
}

/// Shared state of the handlers.
pub struct AppState {
    /// Options.
    pub opts: ServerOptions,
    loaded: OnceLock<Loaded>,
    draining: AtomicBool,
    /// Completion requests being answered (draining waits for them).
    in_flight: AtomicUsize,
    /// Responses by status code.
    statuses: Mutex<BTreeMap<u16, u64>>,
    created: u64,
    /// Requests seeded from `opts.seed` so far.
    seeded: std::sync::atomic::AtomicU64,
    /// The dashboard's samples (filled while the UI is on).
    pub history: history::History,
}

impl AppState {
    /// State for a server whose model is still loading.
    pub fn new(opts: ServerOptions) -> Arc<Self> {
        Arc::new(AppState {
            opts,
            loaded: OnceLock::new(),
            draining: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            statuses: Mutex::new(BTreeMap::new()),
            created: unix_now(),
            seeded: std::sync::atomic::AtomicU64::new(0),
            history: history::History::default(),
        })
    }

    /// Marks the model loaded.
    pub fn set_loaded(&self, loaded: Loaded) {
        let _ = self.loaded.set(loaded);
    }

    /// The engine, if loaded.
    pub fn loaded(&self) -> Option<&Loaded> {
        self.loaded.get()
    }

    /// Starts draining: health turns 503, the engine stops accepting.
    pub fn drain(&self) {
        self.draining.store(true, Ordering::SeqCst);
        if let Some(l) = self.loaded.get() {
            l.engine.shutdown();
        }
    }

    /// Whether draining has started.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Counts a completion request until the guard is dropped.
    fn enter(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        InFlight(self.clone())
    }

    /// Completion requests being answered.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    fn ready(&self) -> Result<&Loaded, ApiError> {
        if self.draining.load(Ordering::SeqCst) {
            return Err(ApiError::unavailable("the server is shutting down"));
        }
        let l = self
            .loaded
            .get()
            .ok_or_else(|| ApiError::unavailable("the model is still loading"))?;
        if !l.engine.is_running() {
            return Err(ApiError::unavailable("the engine has stopped"));
        }
        Ok(l)
    }

    /// The server's rules on every chat prompt: control tokens in message text, and the
    /// default template variables where the request set none.
    fn apply_render_policy(&self, prompts: &mut [crate::engine::Prompt]) {
        for p in prompts {
            if let crate::engine::Prompt::Chat { render, .. } = p {
                render.control_tokens_in_content = self.opts.control_tokens_in_content;
                for (k, v) in &self.opts.default_chat_template_kwargs {
                    if k == "enable_thinking" {
                        if render.enable_thinking.is_none() {
                            render.enable_thinking = v.as_bool();
                        }
                    } else if !render.extra.contains_key(k) {
                        render.extra.insert(k.clone(), v.clone());
                    }
                }
            }
        }
    }

    /// Gives a request without a seed the next one of the server's seed stream, if
    /// `--seed` was set.
    fn fill_seed(&self, params: &mut SamplingParams) {
        if let (None, Some(base)) = (params.seed, self.opts.seed) {
            let i = self.seeded.fetch_add(1, Ordering::Relaxed);
            params.seed = Some(splitmix64(
                base.wrapping_add(i.wrapping_mul(0x9e37_79b9_7f4a_7c15)),
            ));
        }
    }

    /// The names clients may use for the model: `--served-model-name`'s, or the loaded name.
    pub fn model_names(&self) -> Vec<String> {
        if !self.opts.served_model_names.is_empty() {
            return self.opts.served_model_names.clone();
        }
        self.loaded()
            .map(|l| vec![l.model_name.clone()])
            .unwrap_or_default()
    }

    fn check_model(&self, model: Option<&str>) -> Result<(), ApiError> {
        let names = self.model_names();
        match model {
            Some(m) if !names.iter().any(|n| n == m) => {
                Err(ApiError::unknown_model(m, &names.join(", ")))
            }
            _ => Ok(()),
        }
    }
}

/// Marks one completion request in flight; see [`AppState::enter`].
struct InFlight(Arc<AppState>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// SplitMix64's output function: consecutive inputs give unrelated seeds.
fn splitmix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Seconds since the epoch.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Milliseconds since the epoch.
pub fn unix_now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The JSON body, or 413 / 400 in OpenAI's shape.
fn json_body(body: Result<Bytes, BytesRejection>, limit: usize) -> Result<Value, ApiError> {
    let bytes = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::too_large(limit)
        } else {
            ApiError::bad_request(format!("cannot read the request body: {e}"))
        }
    })?;
    serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::bad_request(format!("the request body is not valid JSON: {e}")))
}

/// The router.
pub fn router(state: Arc<AppState>) -> Router {
    let limit = state.opts.max_body_bytes;
    let router = Router::new();
    let router = if state.opts.ui {
        ui::routes(router)
    } else {
        router
    };
    let router = router
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/embeddings", post(embeddings_route))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/metrics", get(metrics_text))
        .route("/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize))
        .fallback(|req: HttpRequest| async move { ApiError::no_route(req.uri().path()) })
        .method_not_allowed_fallback(|req: HttpRequest| async move {
            ApiError::method_not_allowed(req.method().as_str(), req.uri().path())
        })
        .layer(DefaultBodyLimit::max(limit))
        .layer(axum::middleware::from_fn_with_state(state.clone(), guard));
    // Outside the key check: a browser's preflight carries no key.
    let origins = &state.opts.allowed_origins;
    let router = if origins.is_empty() {
        router
    } else {
        use tower_http::cors::{AllowOrigin, CorsLayer};
        let allow = if origins.iter().any(|o| o == "*") {
            AllowOrigin::any()
        } else {
            AllowOrigin::list(origins.iter().cloned())
        };
        router.layer(
            CorsLayer::new()
                .allow_origin(allow)
                .allow_methods([axum::http::Method::GET, axum::http::Method::POST])
                .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE])
                .max_age(Duration::from_secs(600)),
        )
    };
    router.with_state(state)
}

/// In front of every route: the API key, then (for requests with a body) the content type,
/// the size and the time limit of the body, which is read here in full. Counts responses by
/// status.
async fn guard(State(st): State<Arc<AppState>>, req: HttpRequest, next: Next) -> Response {
    let resp = match admit(&st, req).await {
        Ok(req) => next.run(req).await,
        Err(e) => e.into_response(),
    };
    if let Ok(mut s) = st.statuses.lock() {
        *s.entry(resp.status().as_u16()).or_default() += 1;
    }
    resp
}

/// Compares in time that depends only on the lengths, so the key cannot be guessed a byte
/// at a time from response times.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for (i, &x) in a.iter().enumerate() {
        diff |= usize::from(x ^ b.get(i).copied().unwrap_or(!x));
    }
    diff == 0
}

/// `Authorization: Bearer KEY`, the scheme in any case (RFC 7235).
fn authorized(headers: &axum::http::HeaderMap, key: &str) -> bool {
    let Some(v) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let v = v.trim();
    let Some((scheme, token)) = v.split_once(' ') else {
        return false;
    };
    scheme.eq_ignore_ascii_case("bearer") && same_secret(token.trim().as_bytes(), key.as_bytes())
}

/// `application/json` or `application/…+json`, parameters (charset) allowed.
fn is_json(content_type: &str) -> bool {
    let mime = content_type.split(';').next().unwrap_or("").trim();
    let mime = mime.to_ascii_lowercase();
    mime == "application/json" || (mime.starts_with("application/") && mime.ends_with("+json"))
}

async fn admit(st: &AppState, req: HttpRequest) -> Result<HttpRequest, ApiError> {
    let path = req.uri().path();
    let open = path == "/health"
        || (path == "/metrics" && st.opts.metrics_public)
        || (st.opts.ui && ui::is_public(path));
    if let Some(key) = &st.opts.api_key {
        if !open && !authorized(req.headers(), key) {
            return Err(ApiError::unauthorized());
        }
    }
    // Only the routes that take a body read one; anything else goes on to its 404 or 405.
    let takes_body = req.method() == axum::http::Method::POST
        && matches!(
            path,
            "/v1/chat/completions"
                | "/v1/completions"
                | "/v1/embeddings"
                | "/tokenize"
                | "/detokenize"
        );
    if !takes_body {
        return Ok(req);
    }
    // A web page may POST `text/plain` to a server on localhost without asking first; a
    // JSON content type needs a CORS preflight, which this server does not grant.
    let ct = req
        .headers()
        .get(header::CONTENT_TYPE)
        .map(|v| v.to_str().unwrap_or("(not text)"));
    if !ct.is_some_and(is_json) {
        return Err(ApiError::not_json(ct));
    }
    // Read up to the limit even when Content-Length already says it is too large: a client
    // still writing its body when the answer comes would see a broken pipe, not the 413.
    let limit = st.opts.max_body_bytes;
    let (parts, body) = req.into_parts();
    let timeout = st.opts.limits.body_timeout;
    let bytes = match tokio::time::timeout(timeout, axum::body::to_bytes(body, limit)).await {
        Err(_) => return Err(ApiError::body_timeout(timeout.as_secs().max(1))),
        Ok(Err(e)) => {
            let too_large = std::error::Error::source(&e)
                .is_some_and(|s| s.is::<http_body_util::LengthLimitError>())
                || e.to_string().contains("length limit");
            return Err(if too_large {
                ApiError::too_large(limit)
            } else {
                ApiError::bad_request(format!("cannot read the request body: {e}"))
            });
        }
        Ok(Ok(b)) => b,
    };
    Ok(HttpRequest::from_parts(
        parts,
        axum::body::Body::from(bytes),
    ))
}

async fn health(State(st): State<Arc<AppState>>) -> Response {
    match st.ready() {
        Ok(_) => (StatusCode::OK, Json(json!({"status": "ok"}))).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn models(State(st): State<Arc<AppState>>) -> Response {
    // Nothing is listed while the model loads.
    let data: Vec<Value> = st
        .loaded()
        .map(|l| {
            st.model_names()
                .into_iter()
                .map(|name| {
                    json!({
                        "id": name,
                        "object": "model",
                        "created": st.created,
                        "owned_by": "wick",
                        "root": l.model_name,
                        "max_model_len": l.engine.info().max_model_len,
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    Json(json!({"object": "list", "data": data})).into_response()
}

async fn metrics_text(State(st): State<Arc<AppState>>) -> Response {
    let statuses = st.statuses.lock().map(|s| s.clone()).unwrap_or_default();
    let loaded = st.loaded();
    let gpu_memory = loaded
        .and_then(|l| l.gpu_stats.as_ref())
        .map(|f| f().memory_bytes);
    let body = metrics::render(
        loaded.map(|l| &*l.engine),
        gpu_memory,
        loaded.map(|l| &l.load_times),
        &statuses,
    );
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

async fn tokenize(
    State(st): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = json_body(body, st.opts.max_body_bytes)?;
    let l = st.ready()?;
    let obj = request::object(&body)?;
    st.check_model(obj.get("model").and_then(Value::as_str))?;
    let prompt = if obj.contains_key("messages") {
        let mut parsed = request::chat(&body, &l.defaults)?;
        st.apply_render_policy(&mut parsed.prompts);
        let mut p = parsed.prompts.remove(0);
        if let crate::engine::Prompt::Chat { render, .. } = &mut p {
            render.add_generation_prompt = obj
                .get("add_generation_prompt")
                .and_then(Value::as_bool)
                .unwrap_or(true);
        }
        p
    } else {
        let text = obj.get("prompt").and_then(Value::as_str).ok_or_else(|| {
            ApiError::invalid("prompt", "`prompt` (a string) or `messages` is required")
        })?;
        let special = obj
            .get("add_special_tokens")
            .and_then(Value::as_bool)
            .unwrap_or(true);
        let (engine, text) = (l.engine.clone(), text.to_string());
        let ids =
            tokio::task::spawn_blocking(move || engine.text().tokenizer.encode(&text, special))
                .await
                .map_err(ApiError::internal)??;
        crate::engine::Prompt::Ids(ids)
    };
    let engine = l.engine.clone();
    let (ids, _) = tokio::task::spawn_blocking(move || engine.tokenize_prompt(&prompt))
        .await
        .map_err(ApiError::internal)??;
    Ok(Json(json!({
        "tokens": ids,
        "count": ids.len(),
        "max_model_len": l.engine.info().max_model_len,
    }))
    .into_response())
}

async fn detokenize(
    State(st): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = json_body(body, st.opts.max_body_bytes)?;
    let l = st.ready()?;
    let obj = request::object(&body)?;
    st.check_model(obj.get("model").and_then(Value::as_str))?;
    let ids = obj
        .get("tokens")
        .and_then(Value::as_array)
        .and_then(|a| {
            a.iter()
                .map(|v| v.as_u64().and_then(|x| u32::try_from(x).ok()))
                .collect::<Option<Vec<u32>>>()
        })
        .ok_or_else(|| ApiError::invalid("tokens", "`tokens` must be a list of token ids"))?;
    let vocab = l.engine.text().tokenizer.vocab_size();
    if let Some(bad) = ids.iter().find(|&&id| id as usize >= vocab) {
        return Err(ApiError::invalid(
            "tokens",
            format!("token id {bad} is outside the vocabulary ({vocab})"),
        ));
    }
    let engine = l.engine.clone();
    let text = tokio::task::spawn_blocking(move || engine.text().tokenizer.decode(&ids, false))
        .await
        .map_err(ApiError::internal)??;
    Ok(Json(json!({"prompt": text})).into_response())
}

async fn chat_completions(
    State(st): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = json_body(body, st.opts.max_body_bytes)?;
    let l = st.ready()?;
    generates(l)?;
    let mut parsed = request::chat(&body, &l.defaults)?;
    st.check_model(parsed.model.as_deref())?;
    st.apply_render_policy(&mut parsed.prompts);
    st.fill_seed(&mut parsed.params);
    response::run(st.clone(), parsed, response::Kind::Chat).await
}

async fn completions(
    State(st): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = json_body(body, st.opts.max_body_bytes)?;
    let l = st.ready()?;
    generates(l)?;
    let mut parsed = request::completion(&body, &l.defaults)?;
    st.check_model(parsed.model.as_deref())?;
    st.fill_seed(&mut parsed.params);
    response::run(st.clone(), parsed, response::Kind::Completion).await
}

/// 400 for text generation on an engine that computes embeddings.
fn generates(l: &Loaded) -> Result<(), ApiError> {
    match l.engine.info().task {
        crate::engine::Task::Generate => Ok(()),
        crate::engine::Task::Embed => Err(ApiError::bad_request(
            "this server runs an embedding model (`--task embed`): use /v1/embeddings",
        )),
    }
}

async fn embeddings_route(
    State(st): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = json_body(body, st.opts.max_body_bytes)?;
    let req = embeddings::parse(&body)?;
    embeddings::run(st.clone(), req).await
}

/// Serves on `listener` until `shutdown` resolves, then drains: `/health` and new requests
/// answer 503 while the requests in flight finish, for up to the shutdown timeout; then the
/// listener closes, connections without a request close at once, and whatever is left is
/// closed (which cancels its requests). Returns when every connection is gone.
pub async fn serve(
    state: Arc<AppState>,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = router(state.clone());
    let sampler = state
        .opts
        .ui
        .then(|| tokio::spawn(sample_history(state.clone())));
    let trimmer = tokio::spawn(release_memory());
    let st = state.clone();
    let limits = state.opts.limits;
    let drained = async move {
        shutdown.await;
        tracing::info!(
            "shutting down: finishing {} requests in flight (up to {:?})",
            st.in_flight(),
            limits.shutdown_timeout
        );
        st.drain();
        let deadline = tokio::time::Instant::now() + limits.shutdown_timeout;
        while st.in_flight() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if st.in_flight() > 0 {
            tracing::warn!(
                "{} requests still running after {:?}; closing their connections",
                st.in_flight(),
                limits.shutdown_timeout
            );
        }
    };
    conn::serve(listener, app, limits, drained, Duration::from_secs(1)).await;
    if let Some(s) = sampler {
        s.abort();
    }
    trimmer.abort();
    Ok(())
}

/// How often the allocator's free memory goes back to the system.
const RELEASE_MEMORY_EVERY: Duration = Duration::from_secs(5);

/// Hands the allocator's free pages back to the system every few seconds
/// ([`crate::resources::release_free_memory`]): without it the process keeps the peak of
/// every burst of requests (connection buffers, parsed bodies, prompts, replies, freed on
/// threads whose arenas then keep the pages), and its resident memory creeps up over a
/// long run. It takes a few milliseconds on a blocking thread.
async fn release_memory() {
    let mut tick = tokio::time::interval(RELEASE_MEMORY_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let took = tokio::task::spawn_blocking(|| {
            let start = std::time::Instant::now();
            crate::resources::release_free_memory();
            start.elapsed()
        })
        .await;
        if let Ok(took) = took {
            tracing::trace!("free memory released in {took:?}");
        }
    }
}

/// Feeds the dashboard's history once a second from the moment the model is loaded.
async fn sample_history(st: Arc<AppState>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(l) = st.loaded() else { continue };
        let gpu = l.gpu_stats.as_ref().map(|f| f().memory_bytes);
        let refused = st
            .statuses
            .lock()
            .map(|s| s.get(&429).copied().unwrap_or(0))
            .unwrap_or(0);
        st.history
            .record(history::Reading::take(&l.engine, gpu, refused));
    }
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
