//! `/v1/embeddings` on the real `wick serve` binary: the OpenAI shape, base64, dimensions,
//! every input form, the errors (each naming its field), the key, the task switch (an
//! embedding model is served for embeddings by itself; the other task's endpoints answer
//! 400), and langchain-openai's `OpenAIEmbeddings` against it.

// The HTTP client is the bench-serve feature's.
#![cfg(feature = "bench-serve")]

mod common;
mod server_common;

use std::path::PathBuf;
use std::process::Command;

use serde_json::{json, Value};
use server_common::Server;

const KEY: &str = "sk-embed-test";

async fn post(s: &Server, path: &str, body: Value, key: Option<&str>) -> (u16, Value) {
    let mut r = reqwest::Client::new().post(s.url(path)).json(&body);
    if let Some(k) = key {
        r = r.bearer_auth(k);
    }
    let r = r.send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap())
}

fn floats(v: &Value) -> Vec<f32> {
    common::floats(v)
}

/// Decodes standard base64 (what OpenAI's SDKs do with `encoding_format: "base64"`) into
/// little-endian f32s.
fn from_base64(s: &str) -> Vec<f32> {
    let value = |c: u8| -> u32 {
        match c {
            b'A'..=b'Z' => (c - b'A') as u32,
            b'a'..=b'z' => (c - b'a' + 26) as u32,
            b'0'..=b'9' => (c - b'0' + 52) as u32,
            b'+' => 62,
            b'/' => 63,
            _ => panic!("not base64: {c}"),
        }
    };
    let mut bytes = Vec::new();
    for chunk in s.as_bytes().chunks(4) {
        let pad = chunk.iter().filter(|&&c| c == b'=').count();
        let n = chunk
            .iter()
            .map(|&c| if c == b'=' { 0 } else { value(c) })
            .fold(0u32, |acc, v| acc << 6 | v);
        bytes.extend_from_slice(&n.to_be_bytes()[1..4 - pad]);
    }
    bytes
        .chunks(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

#[tokio::test]
async fn serves_embeddings_in_openais_shape() {
    let dir = common::qwen3_embed_tiny();
    let oracle = common::embed_oracle();
    let s = Server::start_model(
        dir.path().to_str().unwrap(),
        &[
            "--served-model-name",
            "embed-tiny",
            "--api-key",
            KEY,
            "--metrics-public",
            // Fewer than one request's inputs: a request is admitted as one.
            "--max-queue",
            "2",
        ],
    )
    .await;
    assert!(s.log.lock().unwrap().contains("for embeddings"));
    let single = oracle["single"].as_array().unwrap();
    let texts: Vec<&str> = single
        .iter()
        .map(|c| c["input"].as_str().unwrap())
        .collect();

    // The key is required.
    let (st, body) = post(&s, "/v1/embeddings", json!({"input": "a"}), None).await;
    assert_eq!(st, 401, "{body}");

    // A string, a list of strings.
    let (st, body) = post(
        &s,
        "/v1/embeddings",
        json!({"input": texts[1], "model": "embed-tiny", "user": "u-1"}),
        Some(KEY),
    )
    .await;
    assert_eq!(st, 200, "{body}");
    assert_eq!(body["object"], "list");
    assert_eq!(body["model"], "embed-tiny");
    assert_eq!(body["data"][0]["object"], "embedding");
    assert_eq!(body["data"][0]["index"], 0);
    let n1 = single[1]["input_ids"].as_array().unwrap().len();
    assert_eq!(
        body["usage"],
        json!({"prompt_tokens": n1, "total_tokens": n1})
    );
    let v = floats(&body["data"][0]["embedding"]);
    assert_eq!(v.len(), 64);
    // f16 KV cache (the server's default): a little looser than the float32 oracle test.
    assert!(common::cosine(&v, &floats(&single[1]["embedding"])) > 0.999);

    let (st, body) = post(&s, "/v1/embeddings", json!({"input": texts}), Some(KEY)).await;
    assert_eq!(st, 200, "{body}");
    let data = body["data"].as_array().unwrap();
    assert_eq!(data.len(), texts.len());
    let total: usize = single
        .iter()
        .map(|c| c["input_ids"].as_array().unwrap().len())
        .sum();
    assert_eq!(body["usage"]["prompt_tokens"], total);
    let float_vectors: Vec<Vec<f32>> = data.iter().map(|d| floats(&d["embedding"])).collect();
    for (i, d) in data.iter().enumerate() {
        assert_eq!(d["index"], i);
        let c = common::cosine(&float_vectors[i], &floats(&single[i]["embedding"]));
        assert!(c > 0.999, "input {i}: cosine {c}");
    }

    // base64: the same floats, little-endian.
    let (st, body) = post(
        &s,
        "/v1/embeddings",
        json!({"input": texts, "encoding_format": "base64"}),
        Some(KEY),
    )
    .await;
    assert_eq!(st, 200, "{body}");
    // (Not bit for bit: a prompt's blocks may now come from the prefix cache, and rows
    // batched differently round differently.)
    for (i, d) in body["data"].as_array().unwrap().iter().enumerate() {
        let v = from_base64(d["embedding"].as_str().unwrap());
        assert!(
            common::max_abs_diff(&v, &float_vectors[i]) < 1e-5,
            "input {i}"
        );
    }

    // dimensions: truncated and normalized again.
    let (st, body) = post(
        &s,
        "/v1/embeddings",
        json!({"input": texts[2], "dimensions": 8}),
        Some(KEY),
    )
    .await;
    assert_eq!(st, 200, "{body}");
    let v = floats(&body["data"][0]["embedding"]);
    let want = wick::engine::embed::truncate(&float_vectors[2], 8);
    assert_eq!(v.len(), 8);
    assert!(common::max_abs_diff(&v, &want) < 1e-5, "{v:?} vs {want:?}");

    // Token ids and lists of them, used as given.
    let ids = &oracle["token_ids"];
    let (st, body) = post(
        &s,
        "/v1/embeddings",
        json!({"input": ids[0]["input_ids"]}),
        Some(KEY),
    )
    .await;
    assert_eq!(st, 200, "{body}");
    let c = common::cosine(
        &floats(&body["data"][0]["embedding"]),
        &floats(&ids[0]["embedding"]),
    );
    assert!(c > 0.999, "{c}");
    let (st, body) = post(
        &s,
        "/v1/embeddings",
        json!({"input": [ids[0]["input_ids"], ids[1]["input_ids"]]}),
        Some(KEY),
    )
    .await;
    assert_eq!(st, 200, "{body}");
    assert_eq!(body["data"].as_array().unwrap().len(), 2);

    // Errors name their field.
    let long = vec![9707u32; 9000];
    for (req, param) in [
        (json!({}), "input"),
        (json!({"input": ""}), "input"),
        (json!({"input": []}), "input"),
        (json!({"input": ["a", ""]}), "input"),
        (json!({"input": [[]]}), "input"),
        (json!({"input": [1, 2, 300000]}), "input"),
        (json!({"input": [[1], [4000000000u32]]}), "input"),
        (json!({"input": [-1]}), "input"),
        (json!({"input": long}), "input"),
        (json!({"input": "a", "dimensions": 0}), "dimensions"),
        (json!({"input": "a", "dimensions": 65}), "dimensions"),
        (
            json!({"input": "a", "encoding_format": "int8"}),
            "encoding_format",
        ),
        (json!({"input": "a", "model": "other"}), "model"),
    ] {
        let (st, body) = post(&s, "/v1/embeddings", req.clone(), Some(KEY)).await;
        let want = if param == "model" { 404 } else { 400 };
        assert_eq!(st, want, "{req}: {body}");
        assert_eq!(body["error"]["param"], param, "{req}: {body}");
        assert!(body["error"]["message"].as_str().unwrap().len() > 10);
    }

    // Generation is refused on an embedding model; /v1/models lists it.
    for (path, req) in [
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "hi"}]}),
        ),
        ("/v1/completions", json!({"prompt": "hi"})),
    ] {
        let (st, body) = post(&s, path, req, Some(KEY)).await;
        assert_eq!(st, 400, "{path}: {body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("/v1/embeddings"),
            "{body}"
        );
    }
    let models: Value = reqwest::Client::new()
        .get(s.url("/v1/models"))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(models["data"][0]["id"], "embed-tiny");

    // Every block is back once the requests are done.
    server_common::wait_metrics(
        &s,
        std::time::Duration::from_secs(10),
        "KV blocks freed",
        |m| m.get("wick_kv_blocks_used") == Some(&0.0),
    )
    .await;
}

#[tokio::test]
async fn the_task_flag_chooses_what_a_model_serves() {
    // A chat model generates by default and refuses embeddings...
    let s = Server::start(&[]).await;
    let (st, body) = s.post_json("/v1/embeddings", json!({"input": "hi"})).await;
    assert_eq!(st, 400, "{body}");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("--task embed"));
    drop(s);
    // ...and pools its last token with --task embed.
    let s = Server::start(&["--task", "embed"]).await;
    let (st, body) = s
        .post_json("/v1/embeddings", json!({"input": ["hi", "there"]}))
        .await;
    assert_eq!(st, 200, "{body}");
    assert_eq!(body["data"][1]["embedding"].as_array().unwrap().len(), 64);
    let (st, _) = s
        .post_json(
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;
    assert_eq!(st, 400);
}

#[tokio::test]
async fn langchain_openai_embeddings() {
    let dir = common::qwen3_embed_tiny();
    let s = Server::start_model(
        dir.path().to_str().unwrap(),
        &["--served-model-name", "embed-tiny", "--api-key", KEY],
    )
    .await;
    let script =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/clients/langchain_embeddings.py");
    let oracle = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/qwen3-embed-tiny/oracle.json");
    let out = Command::new("python3")
        .arg(&script)
        .args([s.base.as_str(), "embed-tiny", KEY, oracle.to_str().unwrap()])
        .output()
        .expect("cannot run python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{} failed:\n{stdout}\n{stderr}\n(install the clients with `pip install openai \
         langchain-openai`, as .ci/run does)",
        script.display()
    );
    print!("{stdout}");
}
