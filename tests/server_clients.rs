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
