//! The `wick` binary end to end on the `qwen3-tiny` fixture.

mod common;

use std::process::Command;

use common::*;

fn wick(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_wick"))
        .args(args)
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .expect("run wick")
}

#[test]
fn run_json_greedy_gives_the_oracle_continuation() {
    let dir = fixture("qwen3-tiny");
    let out = wick(&[
        "run",
        "--model",
        dir.to_str().unwrap(),
        "--prompt",
        "Hello! Who are you?",
        "--temperature",
        "0",
        "--max-tokens",
        "24",
        "--json",
        "--device",
        "cpu",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    let oracle = Oracle::load("qwen3-tiny/oracle.json", "qwen3-tiny/oracle.safetensors");
    let case = oracle
        .cases
        .iter()
        .find(|c| c.name == "chat_hello")
        .unwrap();
    let ids = |k: &str| -> Vec<u32> {
        v[k].as_array()
            .unwrap_or_else(|| panic!("{k} missing"))
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    };
    assert_eq!(ids("prompt_token_ids"), case.input_ids);
    assert_eq!(ids("token_ids"), case.greedy_ids);
    assert_eq!(v["completion_tokens"], 24);
    assert_eq!(v["prompt_tokens"], case.input_ids.len());
    for k in ["text", "reasoning", "prefill_tok_s", "decode_tok_s"] {
        assert!(v.get(k).is_some(), "{k} missing");
    }
}

#[test]
fn logits_json_matches_oracle_topk() {
    let dir = fixture("qwen3-tiny");
    let oracle = Oracle::load("qwen3-tiny/oracle.json", "qwen3-tiny/oracle.safetensors");
    let case = oracle
        .cases
        .iter()
        .find(|c| c.name == "chat_hello")
        .unwrap();
    let prompt = case.prompt.clone().unwrap();
    let out = wick(&[
        "logits",
        "--model",
        dir.to_str().unwrap(),
        "--prompt",
        &prompt,
        "--raw",
        "--top",
        "8",
        "--json",
        "--device",
        "cpu",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let want = oracle.topk_ids(&case.name);
    let positions = v["positions"].as_array().unwrap();
    assert_eq!(positions.len(), case.input_ids.len());
    for (i, p) in positions.iter().enumerate() {
        let got: Vec<i64> = p["top_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_i64().unwrap())
            .collect();
        // The top 3 have clear gaps in this fixture; the tail may hold near-ties.
        assert_eq!(got[..3], want[i][..3], "position {i}");
    }
}

#[test]
fn missing_model_fails_with_a_message() {
    let out = wick(&["run", "--model", "/nonexistent/model", "--prompt", "hi"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/model"), "{err}");
}

#[test]
fn prompt_longer_than_the_context_is_a_clear_error() {
    let dir = fixture("qwen3-tiny");
    let long = "word ".repeat(200);
    let out = wick(&[
        "run",
        "--model",
        dir.to_str().unwrap(),
        "--prompt",
        &long,
        "--raw",
        "--max-model-len",
        "64",
        "--device",
        "cpu",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("tokens") && err.contains("64"), "{err}");
}

#[test]
fn bench_runs_at_depth_with_either_kv_cache() {
    let dir = fixture("qwen3-tiny");
    for dtype in ["f16", "f32"] {
        let out = wick(&[
            "bench",
            "--model",
            dir.to_str().unwrap(),
            "--device",
            "cpu",
            "--kv-cache-dtype",
            dtype,
            "-p",
            "16",
            "-n",
            "4",
            "-r",
            "2",
            "-d",
            "40",
            "--json",
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
        assert_eq!(
            (v["depth"].as_u64(), v["n_gen"].as_u64()),
            (Some(40), Some(4))
        );
        assert_eq!(v["pp_runs"].as_array().unwrap().len(), 2);
        assert_eq!(v["tg_runs"].as_array().unwrap().len(), 2);
        assert!(v["tg_tok_s"].as_f64().unwrap() > 0.0, "{v}");
        assert!(v["pp_tok_s"].as_f64().unwrap() > 0.0, "{v}");
    }
    let out = wick(&[
        "bench",
        "--model",
        dir.to_str().unwrap(),
        "--kv-cache-dtype",
        "f8",
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("expected f16 or f32"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
