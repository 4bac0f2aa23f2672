//! Real client libraries against `wick serve`: the Python `openai` package, langchain-openai's
//! `ChatOpenAI`, and the `openai` npm package. The scripts live in `tests/clients/`; a missing
//! package makes them fail, never skip (`.ci/run` installs them).

// The HTTP client is the bench-serve feature's.
#![cfg(feature = "bench-serve")]

mod server_common;

use std::path::PathBuf;
use std::process::Command;

use server_common::Server;

fn clients_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/clients")
}

fn run(program: &str, script: PathBuf, s: &Server, model: &str) {
    let out = Command::new(program)
        .arg(&script)
        .args([&s.base, model])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{} failed ({}):\n{stdout}\n{stderr}\n(install the clients with `pip install openai \
         langchain-openai` and `npm ci` in tests/clients/node, as .ci/run does)",
        script.display(),
        out.status
    );
    print!("{stdout}");
}

#[tokio::test]
async fn python_openai_package() {
    let s = Server::start(&["--served-model-name", "qwen3-tiny-py"]).await;
    run(
        "python3",
        clients_dir().join("openai_client.py"),
        &s,
        "qwen3-tiny-py",
    );
}

#[tokio::test]
async fn langchain_chat_openai() {
    let s = Server::start(&[]).await;
    // The default name: the model directory's.
    run(
        "python3",
        clients_dir().join("langchain_client.py"),
        &s,
        "qwen3-tiny",
    );
}

#[tokio::test]
async fn node_openai_package_streaming() {
    let s = Server::start(&[]).await;
    run(
        "node",
        clients_dir().join("node/stream.mjs"),
        &s,
        "qwen3-tiny",
    );
}

/// The command line of a vLLM deployment guide, with the program name replaced and the model
/// a fixture, serves the client libraries; flags that do not apply are accepted with a notice.
#[tokio::test]
async fn a_vllm_command_line_serves_the_client_libraries() {
    let model = server_common::tiny_model();
    let s = Server::start_with(
        &[
            "--model",
            &model,
            "--tensor-parallel-size",
            "1",
            "--dtype",
            "half",
            "--max-model-len",
            "8192",
            "--gpu-memory-utilization",
            "0.85",
            "--enforce-eager",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--device",
            "cpu",
        ],
        &[],
    )
    .await;
    let log = s.log.lock().unwrap().clone();
    for flag in [
        "--tensor-parallel-size 1",
        "--dtype half",
        "--enforce-eager",
    ] {
        assert!(
            log.contains(&format!("wick: note: {flag}")),
            "{flag}: {log}"
        );
    }
    run(
        "python3",
        clients_dir().join("openai_client.py"),
        &s,
        "qwen3-tiny",
    );
    run(
        "python3",
        clients_dir().join("langchain_client.py"),
        &s,
        "qwen3-tiny",
    );
}

/// `vllm serve MODEL` with thinking off for the whole server: LangChain without extra_body
/// gets no reasoning, and a request can switch thinking back on.
#[tokio::test]
async fn thinking_off_for_the_whole_server() {
    let model = server_common::tiny_model();
    let s = Server::start_with(
        &[
            &model,
            "--served-model-name",
            "qwen3",
            "--reasoning-parser",
            "qwen3",
            "--enable-auto-tool-choice",
            "--tool-call-parser",
            "hermes",
            "--default-chat-template-kwargs",
            r#"{"enable_thinking": false}"#,
            "--port",
            "0",
            "--device",
            "cpu",
        ],
        &[],
    )
    .await;
    run(
        "python3",
        clients_dir().join("langchain_thinking_default.py"),
        &s,
        "qwen3",
    );
}

/// Structured outputs as applications use them: 24 schemas (streamed and not, thinking on and
/// off) validated with Python's `jsonschema`, forced tool calls, vLLM's guided fields, the
/// OpenAI SDK's `parse()` and LangChain's `with_structured_output`.
#[tokio::test]
async fn structured_outputs_validate_in_the_client_libraries() {
    let s = Server::start(&[]).await;
    run(
        "python3",
        clients_dir().join("structured_outputs.py"),
        &s,
        "qwen3-tiny",
    );
}
