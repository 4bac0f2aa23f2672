//! `wick serve` under more streaming clients than it admits: the accepted ones all finish,
//! the rest are refused with 429 and Retry-After, health stays up, and every KV block comes
//! back. `wick bench-serve` then runs against the same server.

#![cfg(feature = "bench-serve")]

mod server_common;

use std::time::Duration;

use serde_json::{json, Value};
use server_common::{sse_json, wait_metrics, Server};

const CLIENTS: usize = 64;
/// Long enough that the first 48 admitted requests are still running when the last client
/// arrives, whatever the machine's speed: otherwise nobody need be refused.
const MAX_TOKENS: u64 = 96;

enum Outcome {
    Completed { tokens: u64 },
    Refused { retry_after: String, body: Value },
}

#[tokio::test]
async fn overload_refuses_with_429_and_recovers() {
    let s = Server::start(&["--max-num-seqs", "16", "--max-queue", "32"]).await;
    let client = reqwest::Client::new();
    let url = s.url("/v1/chat/completions");
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(CLIENTS));
    let mut tasks = Vec::new();
    for i in 0..CLIENTS {
        let (client, url, barrier) = (client.clone(), url.clone(), barrier.clone());
        tasks.push(tokio::spawn(async move {
            let body = json!({
                "messages": [{"role": "user", "content": format!("Request {i}: tell me a story")}],
                "max_tokens": MAX_TOKENS, "ignore_eos": true, "stream": true,
                "stream_options": {"include_usage": true},
                "chat_template_kwargs": {"enable_thinking": false},
            });
            barrier.wait().await;
            let r = client.post(&url).json(&body).send().await.unwrap();
            let status = r.status().as_u16();
            let retry_after = r
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap().to_string());
            let text = r.text().await.unwrap();
            match status {
                200 => {
                    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
                    let events = sse_json(&text);
                    let usage = &events.last().unwrap()["usage"];
                    Outcome::Completed {
                        tokens: usage["completion_tokens"].as_u64().unwrap(),
                    }
                }
                429 => Outcome::Refused {
                    retry_after: retry_after.expect("429 without Retry-After"),
                    body: serde_json::from_str(&text).unwrap(),
                },
                other => panic!("status {other}: {text}"),
            }
        }));
    }
    // Health stays up while the clients run.
    let health = {
        let (client, url) = (client.clone(), s.url("/health"));
        tokio::spawn(async move {
            let mut checks = 0;
            for _ in 0..20 {
                let r = client.get(&url).send().await.unwrap();
                assert_eq!(r.status(), 200, "/health under load");
                checks += 1;
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            checks
        })
    };
    let (mut completed, mut refused) = (0, 0);
    for t in tasks {
        match t.await.unwrap() {
            Outcome::Completed { tokens } => {
                assert_eq!(tokens, MAX_TOKENS);
                completed += 1;
            }
            Outcome::Refused { retry_after, body } => {
                assert!(retry_after.parse::<u64>().unwrap() >= 1);
                assert_eq!(body["error"]["type"], "rate_limit_error", "{body}");
                refused += 1;
            }
        }
    }
    eprintln!("{completed} completed, {refused} refused");
    assert_eq!(health.await.unwrap(), 20);
    assert_eq!(completed + refused, CLIENTS);
    // 16 running + 32 queued can be admitted at once; at least the queue's worth must be.
    assert!(completed >= 32, "only {completed} admitted");
    assert!(refused >= 1, "nobody was refused ({completed} completed)");
    wait_metrics(&s, Duration::from_secs(10), "blocks released", |m| {
        m["wick_kv_blocks_used"] == 0.0
            && m["wick_num_requests_running"] == 0.0
            && m["wick_num_requests_waiting"] == 0.0
    })
    .await;
    let m = s.metrics().await;
    assert_eq!(m["wick_http_responses_total{code=\"429\"}"], refused as f64);
    assert_eq!(
        m["wick_requests_finished_total{reason=\"length\"}"],
        completed as f64
    );
    assert_eq!(reqwest::get(s.url("/health")).await.unwrap().status(), 200);

    // The load tool against the same server.
    let r = bench_serve(&[
        "--url",
        &s.base,
        "--concurrency",
        "4",
        "--requests",
        "12",
        "--stream",
        "--max-tokens",
        "8",
        "--prompt-len",
        "16",
        "--ignore-eos",
    ]);
    assert_eq!(
        (r["ok"].as_u64(), r["failed"].as_u64()),
        (Some(12), Some(0)),
        "{r}"
    );
    assert_eq!(r["output_tokens"], 12 * 8);
    assert!(r["qps"].as_f64().unwrap() > 0.0);
    let (lat, ttft) = (&r["latency_s"], &r["ttft_s"]);
    assert!(lat["p50"].as_f64().unwrap() <= lat["p99"].as_f64().unwrap());
    assert!(ttft["p50"].as_f64().unwrap() <= lat["p50"].as_f64().unwrap());
    assert!(r["output_tok_s"].as_f64().unwrap() > 0.0);
}

/// `wick bench-serve ARGS --json`, which must succeed; its report.
fn bench_serve(args: &[&str]) -> Value {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_wick"))
        .arg("bench-serve")
        .args(args)
        .arg("--json")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The open loop (Poisson arrivals) on both endpoints, a replayed dataset, and the search for
/// the highest rate under a P95 target.
#[tokio::test]
async fn bench_serve_open_loop_dataset_and_slo_search() {
    let s = Server::start(&["--max-num-seqs", "4"]).await;
    let dir = tempfile::tempdir().unwrap();
    let dataset = dir.path().join("prompts.jsonl");
    std::fs::write(
        &dataset,
        "{\"messages\": [{\"role\": \"user\", \"content\": \"Hi\"}]}\n{\"prompt\": \"Once upon\"}\n",
    )
    .unwrap();
    let dataset = dataset.to_str().unwrap();
    for endpoint in ["chat", "completions"] {
        let r = bench_serve(&[
            "--url",
            &s.base,
            "--request-rate",
            "20",
            "--requests",
            "8",
            "--stream",
            "--max-tokens",
            "6",
            "--ignore-eos",
            "--endpoint",
            endpoint,
            "--dataset",
            dataset,
        ]);
        assert_eq!(
            (r["ok"].as_u64(), r["failed"].as_u64()),
            (Some(8), Some(0)),
            "{r}"
        );
        assert_eq!(r["request_rate"], 20.0);
        assert_eq!(r["output_tokens"], 8 * 6);
        // Two prompts, replayed in turn.
        let prompt_tokens = r["prompt_tokens"].as_u64().unwrap();
        assert!(prompt_tokens > 0 && prompt_tokens.is_multiple_of(4), "{r}");
        let itl = r["itl_s"]["p50"].as_f64().unwrap();
        assert!(
            itl > 0.0 && itl <= r["latency_s"]["p50"].as_f64().unwrap(),
            "{r}"
        );
    }

    // A generous target is met at every rate the search doubles to; a tiny one at none.
    let found = bench_serve(&[
        "--url",
        &s.base,
        "--slo-p95",
        "60",
        "--request-rate",
        "64",
        "--requests",
        "3",
        "--max-tokens",
        "2",
        "--endpoint",
        "completions",
    ]);
    let steps = found["steps"].as_array().unwrap();
    assert_eq!(steps[0]["rate"], 64.0);
    assert!(steps.iter().all(|s| s["met"] == true), "{found}");
    assert_eq!(found["best_rate"], steps.last().unwrap()["rate"]);
    let found = bench_serve(&[
        "--url",
        &s.base,
        "--slo-p95",
        "0.000001",
        "--request-rate",
        "64",
        "--requests",
        "2",
        "--max-tokens",
        "2",
        "--endpoint",
        "completions",
    ]);
    assert!(found["best_rate"].is_null(), "{found}");
    // One request alone already misses the target: the search stops before trying a rate.
    assert_eq!(found["steps"].as_array().unwrap().len(), 0, "{found}");
    assert!(
        found["unloaded_p95_s"].as_f64().unwrap() > 0.000001,
        "{found}"
    );
}
