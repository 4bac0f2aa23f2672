//! The chat page and the dashboard without a browser: their headers (Content-Security-Policy,
//! content types, caching), the key rules (page files open, their data behind the key), the
//! shape of `/dashboard/data`, `--no-ui`, and the size of what the binary ships.

// The HTTP client is the bench-serve feature's.
#![cfg(feature = "bench-serve")]

mod server_common;

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use server_common::Server;

/// The page files and their content types.
const FILES: &[(&str, &str)] = &[
    ("/", "text/html; charset=utf-8"),
    ("/dashboard", "text/html; charset=utf-8"),
    ("/ui/style.css", "text/css; charset=utf-8"),
    ("/ui/common.js", "text/javascript; charset=utf-8"),
    ("/ui/markdown.js", "text/javascript; charset=utf-8"),
    ("/ui/chat.js", "text/javascript; charset=utf-8"),
    ("/ui/dashboard.js", "text/javascript; charset=utf-8"),
];

#[tokio::test]
async fn pages_are_open_with_a_strict_csp_and_small() {
    let s = Server::start(&["--api-key", "sekret"]).await;
    let client = reqwest::Client::new();
    let mut total = 0;
    for &(path, ctype) in FILES {
        // No key: page files hold no data, so they are served.
        let r = client.get(s.url(path)).send().await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
        let h = r.headers().clone();
        assert_eq!(h["content-type"], ctype, "{path}");
        let csp = h["content-security-policy"].to_str().unwrap();
        for directive in [
            "default-src 'none'",
            "script-src 'self'",
            "style-src 'self'",
            "connect-src 'self'",
            "frame-ancestors 'none'",
        ] {
            assert!(csp.contains(directive), "{path}: {csp}");
        }
        assert!(!csp.contains("unsafe"), "{path}: {csp}");
        assert_eq!(h["x-content-type-options"], "nosniff");
        assert_eq!(h["cache-control"], "no-cache");
        let body = r.text().await.unwrap();
        total += body.len();
        if ctype.starts_with("text/html") {
            // Nothing inline that the CSP would have to allow.
            let lower = body.to_ascii_lowercase();
            assert!(!lower.contains("<style"), "{path}: inline style");
            assert!(!lower.contains(" style="), "{path}: style attribute");
            assert_eq!(
                lower.matches("<script").count(),
                lower.matches("<script src=\"/ui/").count(),
                "{path}: inline script"
            );
            let handler = lower
                .split(|c: char| c.is_whitespace())
                .find(|w| w.starts_with("on") && w.contains('='));
            assert_eq!(handler, None, "{path}: inline event handler");
        }
        // The ETag revalidates.
        let tag = h["etag"].clone();
        let r = client
            .get(s.url(path))
            .header("if-none-match", tag)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 304, "{path}");
        assert!(r.headers().contains_key("content-security-policy"));
    }
    eprintln!("page files: {total} bytes");
    assert!(total < 100_000, "the pages weigh {total} bytes");

    // Their data needs the key, like the API.
    for key in [None, Some("wrong")] {
        let mut r = client.get(s.url("/dashboard/data"));
        if let Some(k) = key {
            r = r.bearer_auth(k);
        }
        let r = r.send().await.unwrap();
        assert_eq!(r.status(), 401, "{key:?}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["code"], "invalid_api_key");
    }
    let r = client
        .get(s.url("/dashboard/data"))
        .bearer_auth("sekret")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // Only the files are open, not whatever lies beside them.
    let r = client.get(s.url("/ui/secret.js")).send().await.unwrap();
    assert_eq!(r.status(), 401);
}

/// `GET /dashboard/data` with the key.
async fn data(s: &Server, query: &str) -> (u16, Value) {
    let r = reqwest::Client::new()
        .get(s.url(&format!("/dashboard/data{query}")))
        .bearer_auth("k")
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

#[tokio::test]
async fn dashboard_data_samples_the_engine_every_second() {
    let s = Server::start(&["--api-key", "k", "--slo-p95", "1.5"]).await;
    let client = reqwest::Client::new();
    for _ in 0..3 {
        let r = client
            .post(s.url("/v1/chat/completions"))
            .bearer_auth("k")
            .json(&json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    // A sample that saw the requests end, with their latency.
    let deadline = Instant::now() + Duration::from_secs(15);
    let v = loop {
        let (st, v) = data(&s, "").await;
        assert_eq!(st, 200, "{v}");
        let finished: f64 = v["series"]["requests_per_s"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(Value::as_f64)
            .sum();
        if finished > 0.0
            && v["series"]["e2e_p95"].as_array().unwrap()[..]
                .iter()
                .any(Value::is_number)
        {
            break v;
        }
        assert!(Instant::now() < deadline, "no sample saw the requests: {v}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert_eq!(v["range"], "fine");
    assert_eq!(v["step_s"], 1);
    assert_eq!(v["capacity"], 600);
    assert_eq!(v["slo"], json!({"e2e_p95_s": 1.5, "ttft_p95_s": null}));
    assert_eq!(v["loaded"], true);
    assert_eq!(v["totals"]["requests_finished"], 3);
    let t = v["t"].as_array().unwrap();
    assert_eq!(v["len"].as_u64(), Some(t.len() as u64));
    for (name, col) in v["series"].as_object().unwrap() {
        assert_eq!(col.as_array().unwrap().len(), t.len(), "{name}");
    }
    assert!(t.windows(2).all(|w| w[0].as_u64() < w[1].as_u64()), "{t:?}");
    let p95 = v["series"]["e2e_p95"]
        .as_array()
        .unwrap()
        .iter()
        .find_map(Value::as_f64)
        .unwrap();
    assert!(p95 > 0.0 && p95 < 640.0, "{p95}");
    assert!(v["series"]["resident_mb"][0].as_f64().unwrap() > 1.0);
    assert!(v["series"]["kv_total"][0].as_f64().unwrap() > 0.0);
    assert_eq!(v["series"]["gpu_mb"][0], Value::Null, "on the CPU");

    // `since` sends only newer samples.
    let last = t.last().unwrap().as_u64().unwrap();
    let (_, newer) = data(&s, &format!("?since={last}")).await;
    assert!(newer["t"]
        .as_array()
        .unwrap()
        .iter()
        .all(|x| x.as_u64() > Some(last)));
    let (st, coarse) = data(&s, "?range=coarse&since=0").await;
    assert_eq!(
        (st, &coarse["step_s"], &coarse["capacity"]),
        (200, &json!(10), &json!(1080))
    );
    let (st, bad) = data(&s, "?range=weekly").await;
    assert_eq!(st, 400, "{bad}");
    assert_eq!(bad["error"]["param"], "range");
    let (st, _) = data(&s, "?since=yesterday").await;
    assert_eq!(st, 400);
}

#[tokio::test]
async fn no_ui_turns_the_pages_off() {
    let s = Server::start(&["--no-ui"]).await;
    for path in ["/", "/dashboard", "/dashboard/data", "/ui/chat.js"] {
        let r = reqwest::get(s.url(path)).await.unwrap();
        assert_eq!(r.status(), 404, "{path}");
    }
    assert_eq!(
        reqwest::get(s.url("/v1/models")).await.unwrap().status(),
        200
    );
    assert!(!s.log.lock().unwrap().contains("chat page"));
}

#[test]
fn slo_flags_must_be_positive_seconds() {
    for bad in ["0", "-1", "nan"] {
        let flag = format!("--slo-p95={bad}");
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_wick"))
            .args(["serve", "--model", "/nonexistent", &flag])
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("--slo-p95"), "{bad}: {err}");
    }
}
