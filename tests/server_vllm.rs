//! `wick serve` as a drop-in for `vllm serve`: vLLM's flags with vLLM's meaning (model names,
//! reasoning fields, the server's seed, generation config, chat template), the environment
//! as a container sets it, and flags that cannot be honoured refused before anything loads.
//! The client libraries against a vLLM command line are in `server_clients.rs`.

// The HTTP client is the bench-serve feature's.
#![cfg(feature = "bench-serve")]

mod server_common;

use std::process::Command;

use serde_json::{json, Value};
use server_common::{sse_json, tiny_model, Server};

async fn chat(s: &Server, extra: Value) -> Value {
    let mut body = json!({
        "messages": [{"role": "user", "content": "Tell me a story."}],
        "max_tokens": 8,
    });
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    let (status, v) = s.post_json("/v1/chat/completions", body).await;
    assert_eq!(status, 200, "{v}");
    v
}

fn serve_args<'a>(model: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut a = vec![model, "--port", "0", "--device", "cpu", "--threads", "1"];
    a.extend_from_slice(extra);
    a
}

#[tokio::test]
async fn every_served_model_name_is_accepted_and_the_first_is_answered() {
    let model = tiny_model();
    let s = Server::start_with(
        &serve_args(&model, &["--served-model-name", "qwen3", "Qwen/Qwen3-0.6B"]),
        &[],
    )
    .await;
    let models = s.models().await;
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["qwen3", "Qwen/Qwen3-0.6B"]);
    let r = chat(&s, json!({"model": "Qwen/Qwen3-0.6B"})).await;
    assert_eq!(r["model"], "qwen3");
    let (status, e) = s
        .post_json(
            "/v1/chat/completions",
            json!({"model": "qwen3-tiny", "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;
    assert_eq!(status, 404, "{e}");
}

#[tokio::test]
async fn every_flag_can_come_from_the_environment() {
    let model = tiny_model();
    let s = Server::start_with(
        &[],
        &[
            ("WICK_MODEL", &model),
            ("WICK_PORT", "0"),
            ("WICK_DEVICE", "cpu"),
            ("WICK_SERVED_MODEL_NAME", "a,b"),
            ("WICK_MAX_MODEL_LEN", "2k"),
            ("WICK_ENFORCE_EAGER", "1"),
        ],
    )
    .await;
    let models = s.models().await;
    assert_eq!(models["data"][0]["id"], "a");
    assert_eq!(models["data"][1]["id"], "b");
    assert_eq!(models["data"][0]["max_model_len"], 2000);
    assert!(s
        .log
        .lock()
        .unwrap()
        .contains("wick: note: --enforce-eager"));
}

/// A chat template whose prompt opens a think block: the random-weight model, which never
/// writes `<think>` itself, then writes nothing but reasoning.
const OPENS_THINK: &str = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}\
                           <|im_end|>\n{% endfor %}<|im_start|>assistant\n<think>\n";

#[tokio::test]
async fn reasoning_goes_in_both_fields_unless_configured_or_dropped() {
    let model = tiny_model();
    // Greedy, so that the reply does not depend on the draw.
    let think = json!({"temperature": 0.0});
    let s = Server::start_with(&serve_args(&model, &["--chat-template", OPENS_THINK]), &[]).await;
    // The model never closes its think block in 8 tokens: all is reasoning.
    let msg = &chat(&s, think.clone()).await["choices"][0]["message"];
    assert!(
        msg["reasoning"].as_str().is_some_and(|r| !r.is_empty()),
        "{msg}"
    );
    assert_eq!(msg["reasoning"], msg["reasoning_content"]);

    for field in ["include_reasoning", "return_reasoning"] {
        let mut body = think.clone();
        body[field] = json!(false);
        let msg = &chat(&s, body.clone()).await["choices"][0]["message"];
        assert!(msg.get("reasoning").is_none() && msg.get("reasoning_content").is_none());
        body["stream"] = json!(true);
        let text = reqwest::Client::new()
            .post(s.url("/v1/chat/completions"))
            .json(&{
                let mut b = body.clone();
                b["messages"] = json!([{"role": "user", "content": "hi"}]);
                b["max_tokens"] = json!(8);
                b
            })
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let events = sse_json(&text);
        assert!(!events.is_empty(), "{text}");
        for e in &events {
            let d = &e["choices"][0]["delta"];
            assert!(
                d.get("reasoning").is_none() && d.get("reasoning_content").is_none(),
                "{e}"
            );
        }
    }
    drop(s);

    let s = Server::start_with(
        &serve_args(
            &model,
            &[
                "--chat-template",
                OPENS_THINK,
                "--reasoning-field",
                "reasoning",
            ],
        ),
        &[],
    )
    .await;
    let msg = &chat(&s, think).await["choices"][0]["message"];
    assert!(
        msg["reasoning"].is_string() && msg.get("reasoning_content").is_none(),
        "{msg}"
    );
}

#[tokio::test]
async fn a_server_seed_makes_unseeded_requests_repeat_across_restarts() {
    let model = tiny_model();
    let sampled = json!({"temperature": 1.0, "top_p": 1.0, "top_k": 0, "max_tokens": 12});
    let mut runs = Vec::new();
    for seed in ["11", "11", "12"] {
        let s = Server::start_with(&serve_args(&model, &["--seed", seed]), &[]).await;
        let mut texts = Vec::new();
        for _ in 0..2 {
            let r = chat(&s, sampled.clone()).await;
            texts.push(r["choices"][0]["message"].to_string());
        }
        runs.push(texts);
    }
    assert_eq!(runs[0], runs[1], "same seed, same answers");
    assert_ne!(runs[0][0], runs[0][1], "each request draws its own seed");
    assert_ne!(runs[0], runs[2], "another seed, other answers");
}

#[tokio::test]
async fn generation_config_and_overrides_set_the_sampling_defaults() {
    let model = tiny_model();
    let greedy = json!({"temperature": 0.0, "max_tokens": 12});
    let no_params = json!({"max_tokens": 12});

    // A temperature of 0 from --override-generation-config makes requests greedy.
    let s = Server::start_with(
        &serve_args(
            &model,
            &["--override-generation-config", r#"{"temperature": 0}"#],
        ),
        &[],
    )
    .await;
    let want = chat(&s, greedy.clone()).await["choices"][0]["message"].clone();
    for _ in 0..2 {
        assert_eq!(
            chat(&s, no_params.clone()).await["choices"][0]["message"],
            want
        );
    }
    drop(s);

    // The same from a generation_config.json in another directory.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("generation_config.json"),
        r#"{"temperature": 0.0}"#,
    )
    .unwrap();
    let d = dir.path().to_str().unwrap();
    let s = Server::start_with(&serve_args(&model, &["--generation-config", d]), &[]).await;
    assert_eq!(chat(&s, no_params).await["choices"][0]["message"], want);
}

#[tokio::test]
async fn chat_template_from_a_file_or_inline() {
    let model = tiny_model();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("t.jinja");
    std::fs::write(
        &file,
        "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}",
    )
    .unwrap();
    for template in [
        file.to_str().unwrap(),
        "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}",
    ] {
        let s = Server::start_with(&serve_args(&model, &["--chat-template", template]), &[]).await;
        let (_, t) = s
            .post_json(
                "/tokenize",
                json!({"messages": [{"role": "user", "content": "hi there"}]}),
            )
            .await;
        let (_, d) = s
            .post_json("/detokenize", json!({"tokens": t["tokens"]}))
            .await;
        assert_eq!(d["prompt"], "[user] hi there\n");
    }
}

/// Flags that cannot be honoured stop `wick serve` before it listens or loads, with the
/// reason.
#[test]
fn what_cannot_be_honoured_is_refused_before_loading() {
    let model = tiny_model();
    for (args, says) in [
        (&["--tensor-parallel-size", "2"][..], "one device"),
        (&["-tp", "2"][..], "one device"),
        (&["--kv-cache-dtype", "fp8"][..], "f16 or f32"),
        (&["--quantization", "bitsandbytes"][..], "not supported"),
        (&["--tool-call-parser", "mistral"][..], "hermes"),
        (&["--ssl-certfile", "c.pem"][..], "TLS"),
        (&["--max-model-len", "auto"][..], "not a length"),
        (
            &["--default-chat-template-kwargs", "enable_thinking=false"][..],
            "JSON object",
        ),
        (
            &["--override-generation-config", r#"{"max_new_tokens": 5}"#][..],
            "max_new_tokens",
        ),
        (
            &["--chat-template", "no-such-file.jinja"][..],
            "neither a file",
        ),
        (&["--no-such-flag"][..], "unexpected argument"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_wick"))
            .args(["serve", &model, "--port", "0", "--device", "cpu"])
            .args(args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} was accepted: {err}");
        assert!(err.contains(says), "{args:?}: {err}");
        assert!(
            !err.contains("listening"),
            "{args:?} started listening: {err}"
        );
    }
}

/// vLLM's periodic statistics line: printed while requests run, every
/// `--log-stats-interval` seconds, and not at all with `--disable-log-stats`.
#[tokio::test]
async fn a_statistics_line_is_printed_while_requests_run() {
    let line = "Avg generation throughput";
    for (args, printed) in [
        (vec!["--log-stats-interval", "0.3"], true),
        (
            vec!["--log-stats-interval", "0.3", "--disable-log-stats"],
            false,
        ),
    ] {
        let s = Server::start(&args).await;
        let r = chat(&s, json!({"max_tokens": 40, "ignore_eos": true})).await;
        assert_eq!(r["usage"]["completion_tokens"], 40, "{r}");
        tokio::time::sleep(std::time::Duration::from_millis(1200)).await;
        let log = s.log.lock().unwrap().clone();
        let lines: Vec<&str> = log.lines().filter(|l| l.contains(line)).collect();
        if printed {
            assert!(!lines.is_empty(), "{log}");
            let l = lines[0];
            assert!(
                l.contains("Running:") && l.contains("KV cache usage:"),
                "{l}"
            );
            assert!(l.contains("Prefix cache hit rate:"), "{l}");
            // Idle intervals print nothing: the lines stop once the request is done.
            let before = lines.len();
            tokio::time::sleep(std::time::Duration::from_millis(900)).await;
            let after = s.log.lock().unwrap().matches(line).count();
            assert!(after <= before + 1, "{before} → {after}");
        } else {
            assert!(lines.is_empty(), "{log}");
        }
    }
    // A bad interval is refused before loading.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_wick"))
        .args([
            "serve",
            &server_common::tiny_model(),
            "--log-stats-interval",
            "0",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--log-stats-interval"));
}
