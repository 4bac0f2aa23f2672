//! Embeddings of the tiny Qwen3 embedding checkpoint against the transformers oracle
//! (`tests/fixtures/qwen3-embed-tiny/oracle.json`): last-token pooling, L2-normalized,
//! float32, on the CPU and on the GPU backend. Single inputs, one batch of inputs of
//! different lengths (2 to 231 tokens, prefilled in chunks), token-id inputs, Matryoshka
//! truncation, and many requests batched in the engine's steps.

mod common;

use std::time::{Duration, Instant};

use serde_json::Value;
use wick::backend::cpu::ActQuant;
use wick::backend::KvDtype;
use wick::engine::embed::truncate;
use wick::engine::{Engine, EngineOptions, Task};
use wick::runtime::{Device, Runtime, RuntimeOptions};

use common::{cosine, embed_oracle, floats};

/// The oracle's rule for the float32 path: every vector within this cosine of the oracle's.
const MIN_COSINE: f32 = 0.9999;

/// The runtime on `device` with exact float math: f32 KV cache, f32 activations.
fn runtime(dir: &std::path::Path, device: Device) -> Runtime {
    let opts = RuntimeOptions {
        device,
        threads: 2,
        max_model_len: 512,
        // Chunks of 16 tokens: the long input takes 15 steps.
        prefill_chunk: 16,
        kv_dtype: KvDtype::F32,
        cpu_act: ActQuant::F32,
        ..RuntimeOptions::default()
    };
    Runtime::load(dir.to_str().unwrap(), &opts).unwrap()
}

fn texts(oracle: &Value) -> Vec<String> {
    oracle["single"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["input"].as_str().unwrap().to_string())
        .collect()
}

/// Checks each of `got` against `want`, returning the lowest cosine.
fn check(what: &str, got: &[Vec<f32>], want: &[Vec<f32>]) -> f32 {
    assert_eq!(got.len(), want.len(), "{what}: number of vectors");
    let mut worst = 1.0f32;
    let mut max_diff = 0.0f32;
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        max_diff = max_diff.max(common::max_abs_diff(g, w));
        let norm = g.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4, "{what}[{i}]: norm {norm}");
        let c = cosine(g, w);
        assert!(c >= MIN_COSINE, "{what}[{i}]: cosine {c} < {MIN_COSINE}");
        worst = worst.min(c);
    }
    eprintln!(
        "{what}: lowest cosine 1 - {:.1e}, max |Δ| {max_diff:.1e}",
        1.0 - worst
    );
    worst
}

fn matches_the_oracle(device: Device) {
    let dir = common::qwen3_embed_tiny();
    let oracle = embed_oracle();
    let mut rt = runtime(dir.path(), device);
    assert!(rt.is_embedding_model(), "modules.json declares a pooling");
    let texts = texts(&oracle);
    let single: Vec<Vec<f32>> = oracle["single"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| floats(&c["embedding"]))
        .collect();
    // The inputs' embeddings are far apart: a cosine near 1 is not a given.
    for (i, a) in single.iter().enumerate() {
        for b in &single[i + 1..] {
            assert!(cosine(a, b) < 0.9, "two oracle vectors are too alike");
        }
    }

    // The tokenizer appends <|endoftext|> as the oracle's did.
    for case in oracle["single"].as_array().unwrap() {
        let want: Vec<u32> = case["input_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        let got = rt
            .tokenizer()
            .encode(case["input"].as_str().unwrap(), true)
            .unwrap();
        assert_eq!(got, want, "tokenization of {:?}", case["input"]);
    }

    // One at a time.
    let one_by_one: Vec<Vec<f32>> = texts
        .iter()
        .map(|t| rt.embed(&[t.as_str()]).unwrap().remove(0))
        .collect();
    check("single", &one_by_one, &single);

    // All at once: batched in the engine's steps.
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let batched = rt.embed(&refs).unwrap();
    let padded: Vec<Vec<f32>> = oracle["batched"]["embeddings"]
        .as_array()
        .unwrap()
        .iter()
        .map(floats)
        .collect();
    check("batched vs the padded batch", &batched, &padded);
    check("batched vs single", &batched, &single);
    let st: Vec<Vec<f32>> = oracle["sentence_transformers"]["embeddings"]
        .as_array()
        .expect("the oracle has sentence-transformers' embeddings")
        .iter()
        .map(floats)
        .collect();
    check("batched vs sentence-transformers", &batched, &st);

    // Matryoshka: truncated, normalized again.
    for dims in [1, 16, 63, 64] {
        let got = rt.embed_dims(&refs, Some(dims)).unwrap();
        assert!(got.iter().all(|v| v.len() == dims));
        let want: Vec<Vec<f32>> = single.iter().map(|v| truncate(v, dims)).collect();
        check(&format!("dimensions {dims}"), &got, &want);
    }
    for bad in [0, 65] {
        let e = rt.embed_dims(&refs, Some(bad)).unwrap_err();
        assert!(e.to_string().contains("dimensions"), "{e}");
    }
}

#[test]
fn matches_the_oracle_cpu() {
    matches_the_oracle(Device::Cpu);
}

#[cfg(feature = "gpu")]
#[test]
fn matches_the_oracle_gpu() {
    if std::env::var_os("WICK_SKIP_GPU_TESTS").is_some_and(|v| v == "1") {
        eprintln!("WICK_SKIP_GPU_TESTS=1: skipping a GPU test");
        return;
    }
    matches_the_oracle(Device::Gpu);
}

fn wait_idle(engine: &Engine) {
    let t0 = Instant::now();
    loop {
        let m = engine.metrics().snapshot();
        if m.running == 0 && m.waiting == 0 {
            return;
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "engine never idles");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Many requests (texts and token ids, each twice) submitted at once: several share each
/// step, the long one is prefilled in chunks beside the others, repeats hit the prefix
/// cache, and every vector still matches the oracle; no KV block is left held.
fn engine_batches_requests(device: Device) {
    let dir = common::qwen3_embed_tiny();
    let oracle = embed_oracle();
    let rt = runtime(dir.path(), device);
    let engine = rt
        .start_engine(&EngineOptions {
            max_num_seqs: 8,
            max_num_batched_tokens: 64,
            max_model_len: 512,
            task: Task::Embed,
            ..EngineOptions::default()
        })
        .unwrap();
    assert_eq!(engine.info().task, Task::Embed);
    let mut inputs: Vec<(Vec<u32>, Vec<f32>)> = Vec::new();
    for case in oracle["single"]
        .as_array()
        .unwrap()
        .iter()
        .chain(oracle["token_ids"].as_array().unwrap())
    {
        let ids = case["input_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        inputs.push((ids, floats(&case["embedding"])));
    }
    let n = inputs.len();
    let handles: Vec<_> = inputs
        .iter()
        .chain(inputs.iter())
        .map(|(ids, _)| engine.embed(ids.clone()).unwrap())
        .collect();
    let mut got = Vec::new();
    let mut cached = 0;
    for (i, h) in handles.into_iter().enumerate() {
        let e = h.blocking_wait().unwrap();
        assert_eq!(e.prompt_tokens, inputs[i % n].0.len());
        cached += e.cached_tokens;
        got.push(e.embedding);
    }
    let want: Vec<Vec<f32>> = inputs
        .iter()
        .chain(inputs.iter())
        .map(|(_, e)| e.clone())
        .collect();
    check("engine", &got, &want);
    wait_idle(&engine);
    let m = engine.metrics().snapshot();
    assert!(
        (m.steps as usize) < 2 * n,
        "{} steps for {} requests: they were meant to share steps",
        m.steps,
        2 * n
    );
    assert!(
        cached > 0,
        "repeated inputs were meant to hit the prefix cache"
    );
    assert_eq!(m.kv_blocks_used, 0, "every block is returned");
    assert_eq!(m.finished_stop as usize, 2 * n);
    assert_eq!(m.generation_tokens, 0, "nothing is generated");

    // The engine of one task refuses the other's requests, and bad inputs are errors.
    let e = engine
        .submit(wick::engine::Request {
            prompt: wick::engine::Prompt::Ids(vec![1, 2]),
            params: Default::default(),
        })
        .err()
        .unwrap();
    assert!(e.to_string().contains("embeddings"), "{e}");
    for (bad, says) in [
        (vec![], "empty"),
        (vec![1, 999_999], "outside the vocabulary"),
        (vec![7; 600], "context"),
    ] {
        let e = engine.embed(bad.clone()).err().unwrap();
        assert!(e.to_string().contains(says), "{e}");
        // All or none: a batch with one bad input queues nothing.
        let before = engine.metrics().snapshot().requests_submitted;
        assert!(engine.embed_batch(vec![vec![1, 2], bad]).is_err());
        assert_eq!(engine.metrics().snapshot().requests_submitted, before);
    }
}

#[test]
fn engine_batches_requests_cpu() {
    engine_batches_requests(Device::Cpu);
}

#[cfg(feature = "gpu")]
#[test]
fn engine_batches_requests_gpu() {
    if std::env::var_os("WICK_SKIP_GPU_TESTS").is_some_and(|v| v == "1") {
        eprintln!("WICK_SKIP_GPU_TESTS=1: skipping a GPU test");
        return;
    }
    engine_batches_requests(Device::Gpu);
}

/// A chat model embeds too (pooling from a causal LM, as vLLM does with `--task embed`);
/// an engine that generates refuses embedding requests.
#[test]
fn a_chat_model_embeds_on_request() {
    let opts = RuntimeOptions {
        device: Device::Cpu,
        threads: 2,
        max_model_len: 256,
        ..RuntimeOptions::default()
    };
    let path = common::fixture("qwen3-tiny");
    let mut rt = Runtime::load(path.to_str().unwrap(), &opts).unwrap();
    assert!(!rt.is_embedding_model());
    let v = rt.embed(&["Hello", "world, again"]).unwrap();
    assert_eq!(v.len(), 2);
    assert!(v.iter().all(|v| v.len() == rt.config().hidden_size));
    let generating = rt.start_engine(&EngineOptions::default()).unwrap();
    let e = generating.embed(vec![1, 2, 3]).err().unwrap();
    assert!(e.to_string().contains("task embed"), "{e}");
}

/// Qwen3-Embedding-4B and -8B untie the embedding and are published without `lm_head`: such
/// a checkpoint loads, embeds, and refuses to generate with a clear error.
#[test]
fn a_checkpoint_without_a_head_embeds_and_refuses_to_generate() {
    let dir = common::qwen3_embed_tiny();
    let config = dir.path().join("config.json");
    let mut c: Value = serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    c["tie_word_embeddings"] = Value::Bool(false);
    std::fs::remove_file(&config).unwrap();
    std::fs::write(&config, c.to_string()).unwrap();
    let mut rt = runtime(dir.path(), Device::Cpu);
    let e = rt.start_engine(&EngineOptions::default()).err().unwrap();
    assert!(e.to_string().contains("no lm_head"), "{e}");
    let oracle = embed_oracle();
    let got = rt
        .embed(&[oracle["single"][1]["input"].as_str().unwrap()])
        .unwrap();
    check(
        "without a head",
        &got,
        &[floats(&oracle["single"][1]["embedding"])],
    );
}
