//! The library as a desktop app embeds it: loading on a thread of its own with progress,
//! awaited from async code without blocking the executor, replies streamed into a UI-like
//! callback, and the public types movable across threads.

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use wick::convert::scheme::QuantScheme;
use wick::engine::{Engine, RequestStream};
use wick::loader::{LoadProgress, Progress};
use wick::runtime::{Device, Runtime, RuntimeOptions};

fn assert_send<T: Send>() {}
fn assert_send_sync<T: Send + Sync>() {}

#[test]
fn public_types_cross_threads() {
    assert_send::<Runtime>();
    assert_send::<RequestStream>();
    assert_send_sync::<Engine>();
    assert_send_sync::<wick::loader::checkpoint::Checkpoint>();
    assert_send_sync::<wick::text::tokenizer::Tokenizer>();
    assert_send_sync::<Progress>();
    assert_send_sync::<RuntimeOptions>();
    assert_send_sync::<wick::Error>();
}

#[test]
fn loads_with_progress_without_blocking_the_executor_and_streams_a_reply() {
    let events = Arc::new(Mutex::new(Vec::new()));
    let sink = events.clone();
    let opts = RuntimeOptions {
        device: Device::Cpu,
        threads: 2,
        max_model_len: 512,
        quantize: Some(QuantScheme::Q8_0),
        on_progress: Some(Progress::new(move |p| sink.lock().unwrap().push(p.clone()))),
        ..RuntimeOptions::default()
    };
    let model = common::fixture("qwen3-tiny");
    // A single-threaded executor: if loading blocked it, the ticker would not run.
    let executor = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let ticks = Arc::new(AtomicUsize::new(0));
    let mut rt = executor.block_on(async {
        let t = ticks.clone();
        let ticker = tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(1)).await;
                t.fetch_add(1, Ordering::Relaxed);
            }
        });
        let rt = Runtime::load_async(model.to_str().unwrap(), &opts).await;
        ticker.abort();
        rt.unwrap()
    });
    assert!(
        ticks.load(Ordering::Relaxed) > 5,
        "the executor did not run while loading"
    );

    let events = events.lock().unwrap().clone();
    let quantized: Vec<_> = events
        .iter()
        .filter_map(|e| match e {
            LoadProgress::Quantize { done, total } => Some((*done, *total)),
            _ => None,
        })
        .collect();
    let loaded: Vec<_> = events
        .iter()
        .filter_map(|e| match e {
            LoadProgress::Load { done, total } => Some((*done, *total)),
            _ => None,
        })
        .collect();
    for (what, seq) in [("quantize", &quantized), ("load", &loaded)] {
        let &(last, total) = seq.last().unwrap_or_else(|| panic!("no {what} progress"));
        assert!(total > 0 && last == total, "{what}: {seq:?}");
        assert!(seq.windows(2).all(|w| w[0].0 <= w[1].0), "{what}: {seq:?}");
    }
    // Quantization comes before the weights go on the device.
    let first_load = events
        .iter()
        .position(|e| matches!(e, LoadProgress::Load { .. }))
        .unwrap();
    assert!(events[..first_load]
        .iter()
        .any(|e| matches!(e, LoadProgress::Quantize { .. })));

    // A reply streamed into a UI-like callback on another thread, called from inside an
    // async task (as an app's event handler would).
    let (ui, shown) = std::sync::mpsc::channel::<String>();
    let messages = vec![serde_json::json!({"role": "user", "content": "Hello!"})];
    let mut opts = rt.chat_options();
    opts.enable_thinking = false;
    opts.params.max_tokens = Some(12);
    opts.params.temperature = 0.0;
    let out = executor.block_on(async {
        rt.chat(&messages, &opts, &AtomicBool::new(false), &mut |ev| {
            let _ = ui.send(ev.delta.content.clone());
        })
    });
    let out = out.unwrap();
    drop(ui);
    let streamed: String = shown.iter().collect();
    assert_eq!(streamed, out.content);
    assert!(!out.token_ids.is_empty());
}
