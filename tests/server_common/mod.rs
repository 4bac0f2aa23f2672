//! Starting the real `wick serve` binary on the tiny Qwen3 fixture for the server tests, and a
//! few helpers to read its answers.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

/// A running server; killed when dropped.
pub struct Server {
    child: Child,
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    /// Everything the server wrote to stderr.
    pub log: Arc<Mutex<String>>,
}

/// The tiny random Qwen3 checkpoint (real tokenizer and chat template).
pub fn tiny_model() -> String {
    let p =
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures/qwen3-tiny");
    assert!(p.exists(), "fixture {} is missing", p.display());
    p.to_string_lossy().into_owned()
}

impl Server {
    /// Starts `wick serve --model <tiny> --port 0 --device cpu <extra>` and waits for
    /// `/health` to answer 200.
    pub async fn start(extra: &[&str]) -> Server {
        Self::start_model(&tiny_model(), extra).await
    }

    /// [`Server::start`] on another model.
    pub async fn start_model(model: &str, extra: &[&str]) -> Server {
        Self::start_model_env(model, extra, &[]).await
    }

    /// [`Server::start_model`] with these environment variables set.
    pub async fn start_model_env(model: &str, extra: &[&str], env: &[(&str, &str)]) -> Server {
        let mut args = vec![
            "--model",
            model,
            "--port",
            "0",
            "--device",
            "cpu",
            "--threads",
            "1",
        ];
        args.extend_from_slice(extra);
        Self::start_with(&args, env).await
    }

    /// `wick serve ARGS` with these environment variables set, as given (the arguments must
    /// choose the model and `--port 0`, here or through the environment).
    pub async fn start_with(args: &[&str], env: &[(&str, &str)]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_wick"))
            .arg("serve")
            .args(args)
            .envs(env.iter().copied())
            .env("RUST_LOG", "wick=info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning wick serve");
        let stderr = child.stderr.take().expect("stderr");
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some(addr) = line.strip_prefix("wick: listening on ") {
                    let _ = tx.send(addr.to_string());
                }
                let mut l = sink.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        let base = rx
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("the server did not start: {}", log.lock().unwrap()));
        let server = Server { child, base, log };
        let client = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Ok(r) = client.get(server.url("/health")).send().await {
                if r.status() == 200 {
                    break;
                }
                assert_eq!(r.status(), 503, "/health while loading");
            }
            assert!(
                Instant::now() < deadline,
                "the server never became healthy: {}",
                server.log.lock().unwrap()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        server
    }

    /// `base + path`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// POSTs `body` as JSON; the status and the JSON answer (which must be JSON).
    pub async fn post_json(&self, path: &str, body: Value) -> (u16, Value) {
        let r = reqwest::Client::new()
            .post(self.url(path))
            .json(&body)
            .send()
            .await
            .unwrap();
        let st = r.status().as_u16();
        (st, r.json::<Value>().await.unwrap())
    }

    /// `GET /v1/models`.
    pub async fn models(&self) -> Value {
        reqwest::get(self.url("/v1/models"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// The process id (for signals).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits up to `timeout` for the process to exit; its status, or `None`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// One sample of `/metrics`, as `name{labels}` → value.
    pub async fn metrics(&self) -> std::collections::HashMap<String, f64> {
        let text = reqwest::get(self.url("/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        parse_metrics(&text)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Prometheus text → `name{labels}` → value.
pub fn parse_metrics(text: &str) -> std::collections::HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

/// The `data:` payloads of a server-sent-events body, in order.
pub fn sse_data(body: &str) -> Vec<String> {
    body.split("\n\n")
        .filter_map(|ev| {
            let lines: Vec<&str> = ev
                .lines()
                .filter_map(|l| l.strip_prefix("data:").map(str::trim_start))
                .collect();
            (!lines.is_empty()).then(|| lines.join("\n"))
        })
        .collect()
}

/// Parses every event but `[DONE]` as JSON.
pub fn sse_json(body: &str) -> Vec<Value> {
    sse_data(body)
        .iter()
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str(d).unwrap_or_else(|e| panic!("bad event {d}: {e}")))
        .collect()
}

/// Polls `/metrics` until `pred` holds, or panics after `timeout`.
pub async fn wait_metrics(
    server: &Server,
    timeout: Duration,
    what: &str,
    pred: impl Fn(&std::collections::HashMap<String, f64>) -> bool,
) {
    let deadline = Instant::now() + timeout;
    loop {
        let m = server.metrics().await;
        if pred(&m) {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: metrics {m:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Asserts OpenAI's error shape: `{"error": {"message": "...", "type": "...", "param": ...,
/// "code": ...}}` with a message.
pub fn assert_error_shape(status: u16, body: &str) {
    let v: Value =
        serde_json::from_str(body).unwrap_or_else(|e| panic!("{status}: not JSON ({e}): {body}"));
    let e = &v["error"];
    assert!(
        e["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{status}: {v}"
    );
    assert!(e["type"].is_string(), "{status}: {v}");
    assert!(e.get("param").is_some() && e.get("code").is_some(), "{v}");
}

/// Waits (30 s at most) until `/metrics` shows nothing running, waiting or holding KV
/// blocks; `key` is the API key, if `/metrics` needs one.
pub async fn wait_idle(s: &Server, key: Option<&str>) {
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut r = client.get(s.url("/metrics"));
        if let Some(k) = key {
            r = r.bearer_auth(k);
        }
        let text = r.send().await.unwrap().text().await.unwrap();
        let m = parse_metrics(&text);
        let get = |k: &str| m.get(k).copied().unwrap_or(f64::NAN);
        let (run, wait, kv) = (
            get("wick_num_requests_running"),
            get("wick_num_requests_waiting"),
            get("wick_kv_blocks_used"),
        );
        if run == 0.0 && wait == 0.0 && kv == 0.0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "still busy: running {run}, waiting {wait}, kv blocks {kv}\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
