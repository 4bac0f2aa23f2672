//! `wick serve` when something inside it fails or runs out, against the real binary: a step
//! of the engine that panics (through the `WICK_FAULT_STEP_PANIC` test hook), steps that keep
//! failing, and a KV pool that one long request fills. Each test checks what the client sees
//! (status and OpenAI's error shape), what the process does (goes on, or exits non-zero
//! within a bound) and that `/metrics` comes back to zero.

// The HTTP client is the bench-serve feature's.
#![cfg(feature = "bench-serve")]

mod server_common;

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use server_common::{assert_error_shape, tiny_model, wait_idle, Server};

/// One metric's value (0 when absent).
async fn metric(s: &Server, name: &str) -> f64 {
    s.metrics().await.get(name).copied().unwrap_or(0.0)
}

/// POSTs `body` to `/v1/completions`: the status and the body as text.
async fn complete(s: &Server, body: Value) -> (u16, String) {
    let r = reqwest::Client::new()
        .post(s.url("/v1/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

const STEP_FAILURES: &str = "wick_engine_step_failures_total";

#[tokio::test]
async fn a_failed_step_fails_its_requests_with_500_and_the_engine_goes_on() {
    // Completions leave no prefix-cache fills behind, so the model steps are counted by the
    // requests alone: 1 is the first request's only step; the second (streaming) request
    // runs steps 2 (prompt and first token) and 3, and fails at 4.
    let s = Server::start_model_env(&tiny_model(), &[], &[("WICK_FAULT_STEP_PANIC", "1,4")]).await;
    let (st, body) = complete(
        &s,
        json!({"prompt": "Once upon a time", "max_tokens": 4, "ignore_eos": true}),
    )
    .await;
    assert_eq!(st, 500, "{body}");
    assert_error_shape(st, &body);
    assert_eq!(metric(&s, STEP_FAILURES).await, 1.0);
    let health = reqwest::get(s.url("/health")).await.unwrap();
    assert_eq!(health.status(), 200);

    // A stream that has started cannot turn into a 500: it ends with an error event in the
    // same shape, and no `[DONE]`.
    let (st, body) = complete(
        &s,
        json!({"prompt": "Once upon a time", "max_tokens": 8, "ignore_eos": true,
               "stream": true}),
    )
    .await;
    assert_eq!(st, 200, "{body}");
    let events = server_common::sse_data(&body);
    assert!(!events.iter().any(|e| e == "[DONE]"), "{body}");
    let last = events.last().expect("events");
    assert_error_shape(500, last);
    // Before it, at most the chunks of the two tokens of steps 2 and 3.
    for e in &events[..events.len() - 1] {
        let v: Value = serde_json::from_str(e).unwrap();
        assert!(v["choices"][0]["text"].is_string(), "{body}");
    }
    assert!((2..=3).contains(&events.len()), "{body}");
    assert_eq!(metric(&s, STEP_FAILURES).await, 2.0);

    // The next request is served in full.
    let (st, body) = complete(
        &s,
        json!({"prompt": "Once upon a time", "max_tokens": 4, "ignore_eos": true}),
    )
    .await;
    assert_eq!(st, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["choices"][0]["finish_reason"], "length", "{v}");
    assert_eq!(v["usage"]["completion_tokens"], 4, "{v}");
    let health = reqwest::get(s.url("/health")).await.unwrap();
    assert_eq!(health.status(), 200);
    wait_idle(&s, None).await;
    let m = s.metrics().await;
    assert_eq!(m[STEP_FAILURES], 2.0);
    assert_eq!(m["wick_requests_finished_total{reason=\"error\"}"], 2.0);
    assert_eq!(m["wick_requests_finished_total{reason=\"length\"}"], 1.0);
    let log = s.log.lock().unwrap().clone();
    assert!(log.contains("made step 1 fail on purpose"), "{log}");
}

#[tokio::test]
async fn steps_failing_in_a_row_make_the_server_exit_70() {
    let mut s =
        Server::start_model_env(&tiny_model(), &[], &[("WICK_FAULT_STEP_PANIC", "every")]).await;
    // One request per step: each fails, and the third failure in a row stops the engine.
    for i in 1..=3 {
        let (st, body) = complete(&s, json!({"prompt": "Once", "max_tokens": 2})).await;
        assert_eq!(st, 500, "request {i}: {body}");
        assert_error_shape(st, &body);
    }
    // The process exits non-zero within a few seconds; until then `/health` may say 503,
    // but not for long.
    let start = Instant::now();
    let client = reqwest::Client::new();
    let mut health = Vec::new();
    let status = loop {
        if let Some(status) = s.wait_exit(Duration::from_millis(100)) {
            break status;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "still running 5 s after the third failed step (health {health:?}): {}",
            s.log.lock().unwrap()
        );
        if let Ok(r) = client.get(s.url("/health")).send().await {
            health.push(r.status().as_u16());
        }
    };
    assert_eq!(status.code(), Some(70), "{}", s.log.lock().unwrap());
    // (200 at first: the third 500 is sent just before the engine thread ends.)
    assert!(health.iter().all(|&c| c == 200 || c == 503), "{health:?}");
    let log = s.log.lock().unwrap().clone();
    assert!(
        log.contains("the engine stopped unexpectedly; exiting"),
        "{log}"
    );
    assert!(
        client.get(s.url("/health")).send().await.is_err(),
        "something still answers"
    );
}

#[tokio::test]
async fn one_request_filling_the_kv_pool_beside_others_ends_without_deadlock() {
    // 8 blocks of 16 tokens: one sequence of max_model_len 128 fills the pool.
    let s = Server::start(&[
        "--num-gpu-blocks-override",
        "8",
        "--max-model-len",
        "128",
        "--max-num-seqs",
        "4",
    ])
    .await;
    let start = Instant::now();
    // Asks for far more than the pool holds: capped at max_model_len, so it needs every
    // block; three shorter requests beside it need 3 blocks each by their end.
    let long = json!({"prompt": "Once upon a time", "max_tokens": 1000, "ignore_eos": true,
                      "temperature": 0});
    let short = json!({"prompt": "The quick brown fox", "max_tokens": 40, "ignore_eos": true,
                       "temperature": 0});
    let mut tasks = Vec::new();
    for body in [short.clone(), long, short.clone(), short] {
        let base = s.base.clone();
        tasks.push(tokio::spawn(async move {
            let r = reqwest::Client::new()
                .post(format!("{base}/v1/completions"))
                .json(&body)
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }));
    }
    for (i, t) in tasks.into_iter().enumerate() {
        let (st, v) = tokio::time::timeout(Duration::from_secs(120), t)
            .await
            .unwrap_or_else(|_| panic!("request {i} did not end within 120 s"))
            .unwrap();
        assert_eq!(st, 200, "request {i}: {v}");
        assert_eq!(v["choices"][0]["finish_reason"], "length", "{v}");
        let usage = &v["usage"];
        let (prompt, completion) = (
            usage["prompt_tokens"].as_u64().unwrap(),
            usage["completion_tokens"].as_u64().unwrap(),
        );
        if i == 1 {
            assert_eq!(prompt + completion, 128, "the long one fills the pool: {v}");
        } else {
            assert_eq!(completion, 40, "{v}");
        }
    }
    let took = start.elapsed();
    wait_idle(&s, None).await;
    let m = s.metrics().await;
    assert!(m["wick_preemptions_total"] > 0.0, "{m:?}");
    assert_eq!(m["wick_kv_blocks_total"], 8.0);
    eprintln!("four requests on a full pool: {took:?}");
}
