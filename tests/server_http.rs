//! `wick serve` over real sockets with raw HTTP: every error status and JSON shape, the
//! endpoints besides completions, streaming framing, cancellation, time limits and draining.

// The HTTP client is the bench-serve feature's.
#![cfg(feature = "bench-serve")]

mod server_common;

use std::time::Duration;

use futures_util::StreamExt;
use serde_json::{json, Value};
use server_common::{sse_json, wait_metrics, Server};

fn hi() -> Value {
    json!([{"role": "user", "content": "Hi there"}])
}

async fn post(s: &Server, path: &str, body: &Value) -> (u16, reqwest::header::HeaderMap, Value) {
    let r = reqwest::Client::new()
        .post(s.url(path))
        .json(body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    let text = r.text().await.unwrap();
    let v = serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
    (status, headers, v)
}

/// Asserts OpenAI's error shape and returns the error object.
fn error_of(v: &Value) -> &Value {
    let e = &v["error"];
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    assert!(e["type"].is_string(), "{v}");
    assert!(e.get("param").is_some() && e.get("code").is_some(), "{v}");
    e
}

#[tokio::test]
async fn errors_have_openai_shape_and_status() {
    let s = Server::start(&[
        "--max-model-len",
        "64",
        "--api-key",
        "sekret",
        "--metrics-public",
    ])
    .await;
    let client = reqwest::Client::new();
    let send = |path: &str, body: Vec<u8>, key: Option<&str>| {
        let mut r = client
            .post(s.url(path))
            .header("content-type", "application/json")
            .body(body);
        if let Some(k) = key {
            r = r.bearer_auth(k);
        }
        async move {
            let r = r.send().await.unwrap();
            let status = r.status().as_u16();
            let headers = r.headers().clone();
            let text = r.text().await.unwrap();
            let v: Value = serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("status {status}, not JSON ({e}): {text}"));
            (status, headers, v)
        }
    };
    let ok_body = json!({"messages": hi(), "max_tokens": 2})
        .to_string()
        .into_bytes();

    // 401: missing and wrong keys; /health needs none.
    for key in [None, Some("wrong")] {
        let (st, _, v) = send("/v1/chat/completions", ok_body.clone(), key).await;
        assert_eq!(st, 401);
        assert_eq!(error_of(&v)["code"], "invalid_api_key");
    }
    assert_eq!(reqwest::get(s.url("/health")).await.unwrap().status(), 200);
    let (st, _, v) = send("/v1/chat/completions", ok_body.clone(), Some("sekret")).await;
    assert_eq!(st, 200, "{v}");

    // 400: malformed JSON, in the same shape.
    let (st, _, v) = send(
        "/v1/chat/completions",
        b"{\"messages\": [".to_vec(),
        Some("sekret"),
    )
    .await;
    assert_eq!(st, 400);
    assert_eq!(error_of(&v)["type"], "invalid_request_error");

    // 400 naming the field.
    for (body, param) in [
        (json!({"messages": hi(), "temperature": 7}), "temperature"),
        (json!({"messages": hi(), "top_p": 1.5}), "top_p"),
        (json!({"messages": hi(), "max_tokens": "ten"}), "max_tokens"),
        (json!({"messages": hi(), "n": 0}), "n"),
        (json!({"messages": hi(), "stop": [1, 2]}), "stop"),
        (
            json!({"messages": hi(), "presence_penalty": 3}),
            "presence_penalty",
        ),
        (
            json!({"messages": hi(), "top_logprobs": 50, "logprobs": true}),
            "top_logprobs",
        ),
        (json!({"messages": "hello"}), "messages"),
        (
            json!({"messages": [{"role": "robot", "content": "x"}]}),
            "messages[0].role",
        ),
    ] {
        let (st, _, v) = send(
            "/v1/chat/completions",
            body.to_string().into_bytes(),
            Some("sekret"),
        )
        .await;
        assert_eq!(st, 400, "{body}: {v}");
        assert_eq!(error_of(&v)["param"], param, "{body}");
    }
    let (st, _, v) = send(
        "/v1/completions",
        json!({"prompt": 5}).to_string().into_bytes(),
        Some("sekret"),
    )
    .await;
    assert_eq!((st, error_of(&v)["param"].as_str()), (400, Some("prompt")));

    // 400 for a prompt longer than the context, with the token counts.
    let long = "word ".repeat(200);
    let (_, _, t) = send(
        "/tokenize",
        json!({"messages": [{"role": "user", "content": long}]})
            .to_string()
            .into_bytes(),
        Some("sekret"),
    )
    .await;
    let n = t["count"].as_u64().unwrap();
    assert!(n > 64);
    let (st, _, v) = send(
        "/v1/chat/completions",
        json!({"messages": [{"role": "user", "content": long}]})
            .to_string()
            .into_bytes(),
        Some("sekret"),
    )
    .await;
    assert_eq!(st, 400);
    let e = error_of(&v);
    assert_eq!(e["code"], "context_length_exceeded");
    let msg = e["message"].as_str().unwrap();
    assert!(msg.contains("64") && msg.contains(&n.to_string()), "{msg}");

    // 404: unknown model, unknown route.
    let (st, _, v) = send(
        "/v1/chat/completions",
        json!({"model": "gpt-4", "messages": hi()})
            .to_string()
            .into_bytes(),
        Some("sekret"),
    )
    .await;
    assert_eq!(st, 404);
    assert_eq!(error_of(&v)["code"], "model_not_found");
    let (st, _, v) = send("/v1/nothing", b"{}".to_vec(), Some("sekret")).await;
    assert_eq!(st, 404);
    error_of(&v);

    // 413: a body over the limit (8 MiB), still JSON.
    let mut big = b"{\"prompt\": \"".to_vec();
    big.resize(9 << 20, b'a');
    big.extend_from_slice(b"\"}");
    let (st, _, v) = send("/v1/completions", big, Some("sekret")).await;
    assert_eq!(st, 413);
    error_of(&v);

    // Every one of those was counted by status.
    let m = s.metrics().await;
    for (code, at_least) in [
        ("200", 1.0),
        ("400", 12.0),
        ("401", 2.0),
        ("404", 2.0),
        ("413", 1.0),
    ] {
        let n = m
            .get(&format!("wick_http_responses_total{{code=\"{code}\"}}"))
            .copied()
            .unwrap_or(0.0);
        assert!(n >= at_least, "{code}: {n}");
    }
}

#[tokio::test]
async fn chat_and_completion_answers_have_openai_shapes() {
    let s = Server::start(&["--served-model-name", "tiny"]).await;

    // Non-streaming chat with logprobs.
    let (st, _, v) = post(
        &s,
        "/v1/chat/completions",
        &json!({"model": "tiny", "messages": hi(), "max_tokens": 5, "ignore_eos": true,
                "logprobs": true, "top_logprobs": 3, "enable_thinking": false}),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(v["object"], "chat.completion");
    assert!(v["created"].as_u64().unwrap() > 1_600_000_000);
    assert_eq!(v["model"], "tiny");
    let c = &v["choices"][0];
    assert_eq!(c["index"], 0);
    assert_eq!(c["message"]["role"], "assistant");
    assert!(c["message"]["content"].is_string());
    assert_eq!(c["finish_reason"], "length");
    let lps = c["logprobs"]["content"].as_array().unwrap();
    assert_eq!(lps.len(), 5);
    for lp in lps {
        assert!(lp["logprob"].as_f64().unwrap() <= 0.0);
        assert_eq!(lp["top_logprobs"].as_array().unwrap().len(), 3);
    }
    let u = &v["usage"];
    assert_eq!(u["completion_tokens"], 5);
    let prompt_tokens = u["prompt_tokens"].as_u64().unwrap();
    assert_eq!(u["total_tokens"].as_u64().unwrap(), prompt_tokens + 5);
    assert!(u["prompt_tokens_details"]["cached_tokens"].is_u64());

    // The same prompt's token count from /tokenize matches `usage`.
    let (_, _, t) = post(
        &s,
        "/tokenize",
        &json!({"messages": hi(), "add_generation_prompt": true, "enable_thinking": false}),
    )
    .await;
    assert_eq!(t["count"].as_u64(), Some(prompt_tokens));

    // Completions: 16 tokens by default, n=2 indexed, prompt counted once.
    let (st, _, v) = post(
        &s,
        "/v1/completions",
        &json!({"prompt": "Once upon a time", "n": 2, "ignore_eos": true, "logprobs": 2}),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["object"], "text_completion");
    let choices = v["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 2);
    for (i, c) in choices.iter().enumerate() {
        assert_eq!(c["index"], i);
        assert!(c["text"].is_string());
        assert_eq!(c["finish_reason"], "length");
        assert_eq!(c["logprobs"]["tokens"].as_array().unwrap().len(), 16);
        // (Two top tokens may decode to the same text and share a key.)
        let top = c["logprobs"]["top_logprobs"][0].as_object().unwrap().len();
        assert!((1..=2).contains(&top), "{c}");
    }
    assert_eq!(v["usage"]["completion_tokens"], 32);
    let (_, _, t) = post(&s, "/tokenize", &json!({"prompt": "Once upon a time"})).await;
    assert_eq!(v["usage"]["prompt_tokens"], t["count"]);

    // Streaming chat: role first, content deltas, finish chunk, usage chunk, [DONE].
    for include_usage in [true, false] {
        let body = json!({"messages": hi(), "max_tokens": 4, "ignore_eos": true, "stream": true,
                          "n": 2, "stream_options": {"include_usage": include_usage}});
        let r = reqwest::Client::new()
            .post(s.url("/v1/chat/completions"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert!(r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream"));
        let text = r.text().await.unwrap();
        assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
        let events = sse_json(&text);
        let first = &events[0];
        assert_eq!(first["object"], "chat.completion.chunk");
        assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
        let mut finished = [0, 0];
        let mut content_tokens = 0;
        for ev in &events[1..] {
            assert_eq!(ev["id"], first["id"]);
            for c in ev["choices"].as_array().unwrap() {
                let i = c["index"].as_u64().unwrap() as usize;
                if let Some(f) = c["finish_reason"].as_str() {
                    assert_eq!(f, "length");
                    finished[i] += 1;
                } else {
                    assert_eq!(finished[i], 0, "delta after the finish chunk");
                    assert!(c["delta"].get("role").is_none());
                    content_tokens += 1;
                }
            }
        }
        assert_eq!(finished, [1, 1], "{text}");
        assert!(content_tokens >= 2, "{text}");
        let last = events.last().unwrap();
        if include_usage {
            assert_eq!(last["choices"].as_array().unwrap().len(), 0);
            assert_eq!(last["usage"]["completion_tokens"], 8);
        } else {
            assert!(events.iter().all(|e| e.get("usage").is_none()), "{text}");
        }
    }

    // Streaming completions end the same way.
    let r = reqwest::Client::new()
        .post(s.url("/v1/completions"))
        .json(&json!({"prompt": "a b c", "max_tokens": 3, "stream": true, "ignore_eos": true}))
        .send()
        .await
        .unwrap();
    let text = r.text().await.unwrap();
    assert!(text.trim_end().ends_with("data: [DONE]"));
    let events = sse_json(&text);
    assert!(events.iter().all(|e| e["object"] == "text_completion"));
    assert_eq!(
        events.last().unwrap()["choices"][0]["finish_reason"],
        "length"
    );
}

#[tokio::test]
async fn models_tokenize_detokenize_and_metrics() {
    let s = Server::start(&["--served-model-name", "my-model", "--max-model-len", "512"]).await;
    let v: Value = reqwest::get(s.url("/v1/models"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["object"], "list");
    assert_eq!(v["data"][0]["id"], "my-model");
    assert_eq!(v["data"][0]["object"], "model");
    assert_eq!(v["data"][0]["max_model_len"], 512);

    // tokenize → detokenize round trip, vLLM's shapes.
    let (st, _, t) = post(&s, "/tokenize", &json!({"prompt": "Hello, world! Grüße"})).await;
    assert_eq!(st, 200);
    let tokens = t["tokens"].as_array().unwrap();
    assert_eq!(t["count"].as_u64().unwrap() as usize, tokens.len());
    assert!(tokens.len() >= 4);
    assert_eq!(t["max_model_len"], 512);
    let (st, _, d) = post(&s, "/detokenize", &json!({"tokens": tokens})).await;
    assert_eq!(st, 200);
    assert_eq!(d["prompt"], "Hello, world! Grüße");
    let (st, _, e) = post(&s, "/detokenize", &json!({"tokens": [1, 99999999]})).await;
    assert_eq!((st, e["error"]["param"].as_str()), (400, Some("tokens")));

    // Chat tokenization follows the thinking switch in every spelling (the template adds an
    // empty think block when thinking is off) and add_generation_prompt.
    let count = |extra: Value| {
        let s = &s;
        async move {
            let mut body = json!({"messages": hi()});
            for (k, v) in extra.as_object().unwrap() {
                body[k] = v.clone();
            }
            let (st, _, t) = post(s, "/tokenize", &body).await;
            assert_eq!(st, 200, "{t}");
            t["count"].as_u64().unwrap()
        }
    };
    let on = count(json!({})).await;
    let off = count(json!({"chat_template_kwargs": {"enable_thinking": false}})).await;
    assert!(
        off > on,
        "thinking off adds an empty think block: {off} vs {on}"
    );
    for spelling in [
        json!({"enable_thinking": false}),
        json!({"extra_body": {"enable_thinking": false}}),
        json!({"extra_body": {"chat_template_kwargs": {"enable_thinking": false}}}),
        json!({"reasoning_effort": "none"}),
    ] {
        assert_eq!(count(spelling.clone()).await, off, "{spelling}");
    }
    let no_gen = count(json!({"add_generation_prompt": false})).await;
    assert!(no_gen < on);

    // Tools and earlier tool calls reach the chat template.
    let tools = json!([{"type": "function", "function": {
        "name": "get_weather", "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]);
    assert!(count(json!({"tools": tools})).await > on + 20);
    let convo = json!([
        {"role": "user", "content": [{"type": "text", "text": "Weather in Paris?"}]},
        {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]);
    let (st, _, t) = post(&s, "/tokenize", &json!({"messages": convo, "tools": tools})).await;
    assert_eq!(st, 200, "{t}");
    let (_, _, d) = post(&s, "/detokenize", &json!({"tokens": t["tokens"]})).await;
    let text = d["prompt"].as_str().unwrap();
    assert!(
        text.contains("<tool_call>") && text.contains("\"city\": \"Paris\""),
        "{text}"
    );
    assert!(text.contains("<tool_response>\nsunny"), "{text}");

    // tool_choice: `required` opens the call in the prompt (after an empty think block), a
    // named function writes its name too; bad choices are refused naming the field.
    let rendered = |choice: Value| {
        let (s, tools) = (&s, tools.clone());
        async move {
            let body = json!({"messages": hi(), "tools": tools, "tool_choice": choice});
            let (st, _, t) = post(s, "/tokenize", &body).await;
            assert_eq!(st, 200, "{t}");
            let (_, _, d) = post(s, "/detokenize", &json!({"tokens": t["tokens"]})).await;
            d["prompt"].as_str().unwrap().to_string()
        }
    };
    let auto = rendered(json!("auto")).await;
    assert!(auto.ends_with("<|im_start|>assistant\n"), "{auto}");
    let required = rendered(json!("required")).await;
    assert!(
        required.ends_with("<|im_start|>assistant\n<think>\n\n</think>\n\n<tool_call>\n"),
        "{required}"
    );
    let named = rendered(json!({"type": "function", "function": {"name": "get_weather"}})).await;
    assert!(
        named.ends_with("<tool_call>\n{\"name\": \"get_weather\", \"arguments\": "),
        "{named}"
    );
    for bad in [
        json!({"type": "function", "function": {"name": "nope"}}),
        json!("sometimes"),
    ] {
        let body = json!({"messages": hi(), "tools": tools, "tool_choice": bad});
        let (st, _, e) = post(&s, "/v1/chat/completions", &body).await;
        assert_eq!(
            (st, e["error"]["param"].as_str()),
            (400, Some("tool_choice")),
            "{e}"
        );
        assert_eq!(e["error"]["type"], "invalid_request_error");
    }

    // One request, then the metrics move.
    let (st, _, _) = post(
        &s,
        "/v1/completions",
        &json!({"prompt": "x y", "max_tokens": 3, "ignore_eos": true}),
    )
    .await;
    assert_eq!(st, 200);
    let text = reqwest::get(s.url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let m = server_common::parse_metrics(&text);
    for name in [
        "wick_num_requests_waiting",
        "wick_num_requests_running",
        "wick_kv_blocks_used",
        "wick_kv_blocks_total",
        "wick_prefix_cache_hit_rate",
        "wick_preemptions_total",
        "wick_process_resident_memory_bytes",
    ] {
        assert!(m.contains_key(name), "{name} missing from\n{text}");
    }
    assert!(m["wick_generation_tokens_total"] >= 3.0);
    assert!(m["wick_prompt_tokens_total"] >= 2.0);
    assert!(m["wick_kv_blocks_total"] > 0.0);
    // How long loading took, by phase; the phases within the total.
    let total = m["wick_load_seconds{phase=\"total\"}"];
    assert!(total > 0.0, "{text}");
    for phase in ["download", "map", "repack", "upload"] {
        let p = m[&format!("wick_load_seconds{{phase=\"{phase}\"}}")];
        assert!((0.0..=total).contains(&p), "{phase}: {text}");
    }
    assert!(m["wick_time_to_first_token_seconds_count"] >= 1.0);
    assert!(m["wick_e2e_request_latency_seconds_count"] >= 1.0);
    assert!(m["wick_inter_token_latency_seconds_count"] >= 2.0);
    assert!(m["wick_e2e_request_latency_seconds_bucket{le=\"+Inf\"}"] >= 1.0);
    if cfg!(target_os = "linux") {
        assert!(m["wick_process_resident_memory_bytes"] > 1e6);
    }
}

#[tokio::test]
async fn disconnects_and_time_limits_cancel_requests() {
    let s = Server::start(&["--request-timeout", "1"]).await;
    let client = reqwest::Client::new();

    // A streaming client that leaves after the first chunk.
    let r = client
        .post(s.url("/v1/chat/completions"))
        .json(&json!({"messages": hi(), "max_tokens": 100000, "ignore_eos": true, "stream": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let mut body = r.bytes_stream();
    let _ = body.next().await.unwrap().unwrap();
    wait_metrics(&s, Duration::from_secs(10), "request running", |m| {
        m["wick_num_requests_running"] >= 1.0
    })
    .await;
    drop(body);
    wait_metrics(
        &s,
        Duration::from_secs(10),
        "cancelled on disconnect",
        |m| {
            m["wick_requests_finished_total{reason=\"cancelled\"}"] >= 1.0
                && m["wick_num_requests_running"] == 0.0
                && m["wick_kv_blocks_used"] == 0.0
        },
    )
    .await;

    // A non-streaming client that gives up: the handler is dropped, the request cancelled.
    let quick = reqwest::Client::builder()
        .timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let r = quick
        .post(s.url("/v1/chat/completions"))
        .json(&json!({"messages": hi(), "max_tokens": 100000, "ignore_eos": true}))
        .send()
        .await;
    assert!(
        r.is_err(),
        "the request should have outlived the client's patience"
    );
    wait_metrics(
        &s,
        Duration::from_secs(10),
        "cancelled on a dropped handler",
        |m| {
            m["wick_requests_finished_total{reason=\"cancelled\"}"] >= 2.0
                && m["wick_num_requests_running"] == 0.0
                && m["wick_kv_blocks_used"] == 0.0
        },
    )
    .await;

    // A non-streaming request past the time limit: 504, and the engine lets go of it.
    let t0 = std::time::Instant::now();
    let (st, _, v) = post(
        &s,
        "/v1/chat/completions",
        &json!({"messages": hi(), "max_tokens": 100000, "ignore_eos": true, "n": 4}),
    )
    .await;
    assert_eq!(st, 504, "{v}");
    assert_eq!(v["error"]["type"], "timeout_error");
    assert!(t0.elapsed() < Duration::from_secs(5));
    wait_metrics(&s, Duration::from_secs(10), "cancelled on timeout", |m| {
        m["wick_requests_finished_total{reason=\"cancelled\"}"] >= 6.0
            && m["wick_kv_blocks_used"] == 0.0
    })
    .await;

    // A stream past the time limit ends with an error event.
    let r = client
        .post(s.url("/v1/completions"))
        .json(&json!({"prompt": "x", "max_tokens": 100000, "ignore_eos": true, "stream": true}))
        .send()
        .await
        .unwrap();
    let text = r.text().await.unwrap();
    let events = sse_json(&text);
    assert_eq!(
        events.last().unwrap()["error"]["type"],
        "timeout_error",
        "{text}"
    );
    assert!(!text.contains("[DONE]"));
}

#[tokio::test]
async fn degrade_policy_clamps_and_says_so() {
    let s = Server::start(&[
        "--overload-policy",
        "degrade",
        "--degrade-threshold",
        "0",
        "--degrade-max-tokens",
        "3",
    ])
    .await;
    let (st, headers, v) = post(
        &s,
        "/v1/chat/completions",
        &json!({"messages": hi(), "max_tokens": 50, "ignore_eos": true, "temperature": 1.0}),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(headers["x-wick-degraded"], "max_tokens=3,greedy");
    assert_eq!(v["usage"]["completion_tokens"], 3);
    assert_eq!(v["choices"][0]["finish_reason"], "length");
}

#[tokio::test]
async fn sigterm_drains_in_flight_requests_then_exits() {
    let mut s = Server::start(&[]).await;
    let client = reqwest::Client::new();
    let r = client
        .post(s.url("/v1/completions"))
        .json(&json!({"prompt": "x", "max_tokens": 400, "ignore_eos": true, "stream": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let mut body = r.bytes_stream();
    let mut text = String::from_utf8(body.next().await.unwrap().unwrap().to_vec()).unwrap();
    let kill = std::process::Command::new("kill")
        .args(["-TERM", &s.pid().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    // Draining: health and new requests say 503 while the stream runs.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let h = client.get(s.url("/health")).send().await.unwrap();
    assert_eq!(h.status(), 503);
    let (st, _, v) = post(
        &s,
        "/v1/completions",
        &json!({"prompt": "x", "max_tokens": 2}),
    )
    .await;
    assert_eq!(st, 503, "{v}");
    error_of(&v);
    // The request in flight still completes.
    while let Some(chunk) = body.next().await {
        text.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
    }
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    let events = sse_json(&text);
    assert_eq!(
        events.last().unwrap()["choices"][0]["finish_reason"],
        "length"
    );
    let status = s
        .wait_exit(Duration::from_secs(20))
        .expect("the server did not exit");
    assert!(status.success(), "{status:?}: {}", s.log.lock().unwrap());
}
