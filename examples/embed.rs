//! wick inside a desktop-style app: the model loads on a background thread and reports its
//! progress to the "UI", which stays responsive; replies stream into the UI token by token.
//! The UI here is a loop over a channel that prints what a window would draw.
//!
//! ```text
//! cargo run --release --example embed -- path/to/model "Name three rivers."
//! ```

use std::sync::atomic::AtomicBool;
use std::sync::mpsc;
use std::thread;

use serde_json::json;
use wick::loader::{LoadProgress, Progress};
use wick::runtime::{Runtime, RuntimeOptions};

/// What the worker thread tells the UI.
enum UiEvent {
    Progress(LoadProgress),
    Loaded { name: String, device: String },
    Token(String),
    Done { tokens: usize, tok_s: f64 },
    Failed(String),
}

fn main() {
    let mut args = std::env::args().skip(1);
    let Some(model) = args.next() else {
        eprintln!("usage: embed MODEL [PROMPT]");
        std::process::exit(2);
    };
    let prompt = args
        .next()
        .unwrap_or_else(|| "Say hello in one sentence.".into());
    let (ui, events) = mpsc::channel::<UiEvent>();

    // The worker: loads with progress, then answers the prompt.
    let worker = thread::spawn(move || {
        let to_ui = ui.clone();
        let opts = RuntimeOptions {
            on_progress: Some(Progress::new(move |p| {
                let _ = to_ui.send(UiEvent::Progress(p.clone()));
            })),
            ..RuntimeOptions::default()
        };
        let mut rt = match Runtime::load(&model, &opts) {
            Ok(rt) => rt,
            Err(e) => {
                let _ = ui.send(UiEvent::Failed(e.to_string()));
                return;
            }
        };
        let _ = ui.send(UiEvent::Loaded {
            name: rt.name().to_string(),
            device: rt.device().to_string(),
        });
        let mut chat = rt.chat_options();
        chat.enable_thinking = false;
        chat.params.max_tokens = Some(128);
        let messages = vec![json!({"role": "user", "content": prompt})];
        let cancel = AtomicBool::new(false);
        let result = rt.chat(&messages, &chat, &cancel, &mut |ev| {
            if !ev.delta.content.is_empty() {
                let _ = ui.send(UiEvent::Token(ev.delta.content.clone()));
            }
        });
        let _ = ui.send(match result {
            Ok(out) => UiEvent::Done {
                tokens: out.token_ids.len(),
                tok_s: out.decode_tok_s(),
            },
            Err(e) => UiEvent::Failed(e.to_string()),
        });
    });

    // The UI loop: draws whatever arrives.
    for event in events {
        match event {
            UiEvent::Progress(LoadProgress::Download { file, done, total }) => {
                eprintln!("[ui] downloading {file}: {done}/{total} bytes")
            }
            UiEvent::Progress(LoadProgress::Quantize { done, total }) => {
                eprintln!("[ui] quantizing: {done}/{total} tensors")
            }
            UiEvent::Progress(LoadProgress::Load { done, total }) => {
                eprintln!("[ui] loading: {done}/{total} tensors")
            }
            UiEvent::Loaded { name, device } => eprintln!("[ui] {name} ready on {device}"),
            UiEvent::Token(text) => print!("{text}"),
            UiEvent::Done { tokens, tok_s } => println!("\n[ui] {tokens} tokens, {tok_s:.1} tok/s"),
            UiEvent::Failed(e) => eprintln!("[ui] error: {e}"),
        }
    }
    let _ = worker.join();
}
