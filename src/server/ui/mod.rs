//! The two web pages `wick serve` ships: a chat page at `/` and a live dashboard at
//! `/dashboard`, fed by `GET /dashboard/data` (the [`history`](super::history) rings as
//! JSON). `--no-ui` turns all of it off (404).
//!
//! - **Assets.** Hand-written HTML, CSS and plain JavaScript in this directory, embedded with
//!   `include_str!`: no framework, no build step, no CDN (edge boxes are often offline).
//!   Markdown is rendered by a small hand-written renderer (`markdown.js`: HTML escaped
//!   first, then code blocks, inline code, emphasis, lists, headings and links with safe
//!   schemes only): the vendorable renderers are either much larger than this whole page or
//!   sanitize after the fact. Charts are drawn on `<canvas>` by `dashboard.js`, no chart
//!   library. [`ASSETS`] lists every file; `tests/server_ui.rs` checks their total size.
//! - **Keys.** The page files are static and hold no data, so they are served without the
//!   key (a browser's navigation cannot send an `Authorization` header). Everything they
//!   show comes from key-protected routes: the chat from `/v1/chat/completions`, the charts
//!   from `/dashboard/data`. With `--api-key` set, a page without the key shows itself
//!   locked, asks for the key once and keeps it in the browser's `localStorage`.
//! - **Headers.** Every page file is sent with a strict Content-Security-Policy (scripts,
//!   styles and connections to this origin only, no inline script or style, no framing),
//!   `nosniff`, `no-referrer`, and `Cache-Control: no-cache` with an `ETag`, so a browser
//!   revalidates and an upgraded binary's pages are never stale.

use std::sync::Arc;

use axum::extract::{Query, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

use super::history::Range;
use super::{error::ApiError, AppState};

/// The Content-Security-Policy of every page file.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
                       connect-src 'self'; img-src 'self' data:; base-uri 'none'; \
                       form-action 'none'; frame-ancestors 'none'";

/// An embedded file: its URL path, content type and bytes.
pub struct Asset {
    /// Where it is served.
    pub path: &'static str,
    /// Its `Content-Type`.
    pub content_type: &'static str,
    /// Its contents.
    pub body: &'static str,
}

const HTML: &str = "text/html; charset=utf-8";
const JS: &str = "text/javascript; charset=utf-8";

/// Every page file.
pub const ASSETS: &[Asset] = &[
    Asset {
        path: "/",
        content_type: HTML,
        body: include_str!("chat.html"),
    },
    Asset {
        path: "/dashboard",
        content_type: HTML,
        body: include_str!("dashboard.html"),
    },
    Asset {
        path: "/ui/style.css",
        content_type: "text/css; charset=utf-8",
        body: include_str!("style.css"),
    },
    Asset {
        path: "/ui/common.js",
        content_type: JS,
        body: include_str!("common.js"),
    },
    Asset {
        path: "/ui/markdown.js",
        content_type: JS,
        body: include_str!("markdown.js"),
    },
    Asset {
        path: "/ui/chat.js",
        content_type: JS,
        body: include_str!("chat.js"),
    },
    Asset {
        path: "/ui/dashboard.js",
        content_type: JS,
        body: include_str!("dashboard.js"),
    },
];

/// The page files are open (they hold no data); their data routes need the key.
pub fn is_public(path: &str) -> bool {
    ASSETS.iter().any(|a| a.path == path)
}

/// The page routes, added to the router unless `--no-ui`.
pub fn routes(router: Router<Arc<AppState>>) -> Router<Arc<AppState>> {
    let mut router = router.route("/dashboard/data", get(data));
    for a in ASSETS {
        router = router.route(a.path, get(asset));
    }
    router
}

/// FNV-1a of the file: a validator that changes with the file.
fn etag(body: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in body.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    format!("\"{h:016x}\"")
}

async fn asset(req: Request) -> Response {
    let Some(a) = ASSETS.iter().find(|a| a.path == req.uri().path()) else {
        return ApiError::no_route(req.uri().path()).into_response();
    };
    let tag = etag(a.body);
    let fresh = req
        .headers()
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == tag));
    let mut resp = if fresh {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        ([(header::CONTENT_TYPE, a.content_type)], a.body).into_response()
    };
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    if let Ok(v) = HeaderValue::from_str(&tag) {
        h.insert(header::ETAG, v);
    }
    resp
}

/// `GET /dashboard/data` query.
#[derive(serde::Deserialize)]
struct DataQuery {
    /// Samples newer than this (ms since the epoch); all by default.
    since: Option<u64>,
    /// `fine` (1 s, 10 minutes; the default) or `coarse` (10 s, 3 hours).
    range: Option<String>,
}

async fn data(
    State(st): State<Arc<AppState>>,
    query: Result<Query<DataQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let range = match q.range.as_deref() {
        None | Some("fine") => Range::Fine,
        Some("coarse") => Range::Coarse,
        Some(other) => {
            return Err(ApiError::invalid(
                "range",
                format!("`range` is `fine` or `coarse`, not `{other}`"),
            ))
        }
    };
    let loaded = st.loaded();
    let info = loaded.map(|l| l.engine.info());
    let totals = loaded.map(|l| {
        let s = l.engine.metrics().snapshot();
        json!({
            "requests_finished": s.finished_stop + s.finished_length
                + s.finished_cancelled + s.finished_error,
            "prompt_tokens": s.prompt_tokens,
            "generation_tokens": s.generation_tokens,
            "prefix_cache_hit_tokens": s.prefix_cache_hit_tokens,
            "prefix_cache_query_tokens": s.prefix_cache_query_tokens,
            "preemptions": s.preemptions,
        })
    });
    let refused = st
        .statuses
        .lock()
        .map(|s| s.get(&429).copied().unwrap_or(0))
        .unwrap_or(0);
    let mut body = st.history.json(range, q.since.unwrap_or(0));
    body["now_ms"] = json!(super::unix_now_ms());
    body["range"] = json!(if range == Range::Fine {
        "fine"
    } else {
        "coarse"
    });
    body["model"] = json!(st.model_names().first());
    body["loaded"] = json!(loaded.is_some());
    body["max_model_len"] = json!(info.as_ref().map(|i| i.max_model_len));
    body["kv_block_size"] = json!(info.as_ref().map(|i| i.block_size));
    body["refused_total"] = json!(refused);
    body["totals"] = totals.unwrap_or_default();
    body["slo"] = json!({
        "e2e_p95_s": st.opts.slo_p95,
        "ttft_p95_s": st.opts.slo_ttft,
    });
    Ok(Json(body).into_response())
}
