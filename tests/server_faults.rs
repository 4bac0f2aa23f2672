//! `wick serve` when something inside it or under it fails, against the real binary: a step
//! of the engine that panics (through the `WICK_FAULT_STEP_PANIC` test hook), steps that keep
//! failing, a KV pool that one long request fills, and model files that are truncated before
//! loading or changed while mapped. Each test checks what the client sees (status and
//! OpenAI's error shape), what the process does (goes on, or exits non-zero within a bound)
//! and that `/metrics` comes back to zero.

// The HTTP client is the bench-serve feature's.
#![cfg(feature = "bench-serve")]

mod server_common;

#[cfg(unix)]
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
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

/// A copy of the tiny checkpoint in a fresh directory (removed on drop).
struct ModelCopy(PathBuf);

impl ModelCopy {
    fn new(name: &str) -> ModelCopy {
        let dir = std::env::temp_dir().join(format!("wick-faults-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let src = PathBuf::from(tiny_model());
        for f in [
            "config.json",
            "generation_config.json",
            "tokenizer.json",
            "tokenizer_config.json",
            "model.safetensors",
        ] {
            std::fs::copy(src.join(f), dir.join(f)).unwrap();
        }
        ModelCopy(dir)
    }

    fn weights(&self) -> PathBuf {
        self.0.join("model.safetensors")
    }
}

impl Drop for ModelCopy {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs `wick serve --model <model>` to its end (60 s at most): exit code and stderr.
fn serve_to_exit(model: &Path) -> (Option<i32>, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_wick"))
        .args(["serve", "--port", "0", "--device", "cpu", "--threads", "1"])
        .arg("--model")
        .arg(model)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("wick serve on {} still runs after 60 s", model.display());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Asserts a clean refusal at load: exit code 1 (not a signal), a message naming the file
/// and the problem, no panic.
fn assert_refused(model: &Path, named: &Path, needles: &[&str]) {
    let (code, log) = serve_to_exit(model);
    assert_eq!(code, Some(1), "{log}");
    assert!(log.contains(&named.display().to_string()), "{log}");
    assert!(
        needles.iter().any(|n| log.contains(n)),
        "{needles:?}: {log}"
    );
    assert!(!log.contains("panicked"), "{log}");
}

#[test]
fn truncated_model_files_are_refused_at_load() {
    let st = ModelCopy::new("truncated-st");
    let full = std::fs::metadata(st.weights()).unwrap().len();
    for cut in [full - 1, full / 2, 100] {
        std::fs::File::options()
            .write(true)
            .open(st.weights())
            .unwrap()
            .set_len(cut)
            .unwrap();
        assert_refused(&st.0, &st.weights(), &["truncated"]);
    }

    let gguf_src =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures/qwen3-tiny-q8_0.gguf");
    let bytes = std::fs::read(&gguf_src).unwrap();
    let gguf = st.0.join("cut.gguf");
    for cut in [bytes.len() - 1, bytes.len() / 2, 1000] {
        std::fs::write(&gguf, &bytes[..cut]).unwrap();
        assert_refused(&gguf, &gguf, &["truncated"]);
    }
}

/// A greedy completion's text.
async fn greedy_text(s: &Server) -> Result<String, reqwest::Error> {
    let r = reqwest::Client::new()
        .post(s.url("/v1/completions"))
        .json(
            &json!({"prompt": "Once upon a time", "max_tokens": 8, "ignore_eos": true,
                      "temperature": 0}),
        )
        .send()
        .await?;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await?;
    Ok(v["choices"][0]["text"].as_str().unwrap().to_string())
}

/// The weights stay mapped while the server runs (the CPU backend reads them in place). A
/// new file renamed over the old one, as downloaders and `mv` do, leaves the mapped one
/// intact: the server answers as before. Cutting the mapped file itself takes its pages away
/// under the server: the next read of them is a SIGBUS, which no check at load can prevent;
/// the process dies (it does not hang or answer garbage) saying why, and a restart refuses
/// the file.
#[cfg(unix)]
#[tokio::test]
async fn model_files_changed_while_served() {
    let m = ModelCopy::new("changed-while-served");
    let mut s = Server::start_model(m.0.to_str().unwrap(), &[]).await;
    let before = greedy_text(&s).await.unwrap();

    let fresh = m.0.join("model.safetensors.new");
    std::fs::write(&fresh, b"not weights").unwrap();
    std::fs::rename(&fresh, m.weights()).unwrap();
    assert_eq!(greedy_text(&s).await.unwrap(), before);

    // Put the real weights back, in a file the server has not mapped, and serve them.
    drop(s);
    std::fs::copy(
        PathBuf::from(tiny_model()).join("model.safetensors"),
        m.weights(),
    )
    .unwrap();
    s = Server::start_model(m.0.to_str().unwrap(), &[]).await;
    assert_eq!(greedy_text(&s).await.unwrap(), before);
    let len = std::fs::metadata(m.weights()).unwrap().len();
    std::fs::File::options()
        .write(true)
        .open(m.weights())
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(30), greedy_text(&s))
        .await
        .expect("no answer nor exit within 30 s");
    assert!(answer.is_err(), "answered from a truncated map: {answer:?}");
    let status = s.wait_exit(Duration::from_secs(10)).expect("still running");
    assert_eq!(status.signal(), Some(libc::SIGBUS), "{status:?}");
    // The reader of its stderr may lag behind the exit a little.
    let said = "wick: SIGBUS: a memory-mapped file could no longer be read";
    let deadline = Instant::now() + Duration::from_secs(5);
    while !s.log.lock().unwrap().contains(said) {
        assert!(Instant::now() < deadline, "{}", s.log.lock().unwrap());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_refused(&m.0, &m.weights(), &["truncated"]);
}
