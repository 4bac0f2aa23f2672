//! The CPU forward pass against transformers' float32 oracle for the `qwen3-tiny` fixture:
//! f32 compute on bf16 weights, tolerance 2e-3 (README rule for exact weights).

mod common;

use std::sync::Arc;

use common::*;
use wick::backend::cpu::CpuBackend;
use wick::backend::KvDtype;
use wick::config::ModelConfig;
use wick::loader::safetensors::load_dir;
use wick::model::Model;
use wick::session::{Session, SessionOptions, WantLogits};

const TOL: f32 = 2e-3;

fn model() -> Arc<Model<CpuBackend>> {
    let dir = fixture("qwen3-tiny");
    let config = ModelConfig::from_file(&dir.join("config.json")).unwrap();
    let tensors = load_dir(&dir).unwrap();
    // An f32 KV cache: exact, for the f32 tolerance.
    let model = Model::load(CpuBackend::new(2).unwrap(), config, &tensors).unwrap();
    Arc::new(model.with_kv_dtype(KvDtype::F32))
}

fn session(m: &Arc<Model<CpuBackend>>, chunk: usize) -> Session<CpuBackend> {
    let opts = SessionOptions {
        max_model_len: 2048,
        prefill_chunk: chunk,
        max_logits_rows: 64,
        ..Default::default()
    };
    Session::new(m.clone(), opts).unwrap()
}

#[test]
fn logits_and_topk_match_oracle_at_every_position() {
    let m = model();
    let oracle = Oracle::load("qwen3-tiny/oracle.json", "qwen3-tiny/oracle.safetensors");
    for case in &oracle.cases {
        let ids_k = oracle.topk_ids(&case.name);
        let logits_k = oracle.topk_logits(&case.name);
        let mut s = session(&m, 512);
        let mut last = Vec::new();
        let n = case.input_ids.len();
        s.extend(&case.input_ids, WantLogits::All, |i, row| {
            check_topk(i, row, &ids_k[i], &logits_k[i], TOL);
            if i + 1 == n {
                last = row.to_vec();
            }
        })
        .unwrap();
        let d = max_abs_diff(&last, &oracle.last_logits(&case.name));
        assert!(d <= TOL, "{}: last logits max |Δ| {d}", case.name);
        eprintln!(
            "{}: {} positions, last-logits max |Δ| = {d:.2e}",
            case.name, n
        );
    }
}

#[test]
fn teacher_forced_greedy_follows_oracle() {
    let m = model();
    let oracle = Oracle::load("qwen3-tiny/oracle.json", "qwen3-tiny/oracle.safetensors");
    for case in &oracle.cases {
        let mut s = session(&m, 512);
        let mut argmaxes = Vec::new();
        let mut last = Vec::new();
        s.extend(&case.input_ids, WantLogits::Last, |_, row| {
            last = row.to_vec()
        })
        .unwrap();
        argmaxes.push(argmax(&last));
        // Decode one token at a time through the cache, fed the oracle's tokens.
        for &id in &case.greedy_ids[..case.greedy_ids.len() - 1] {
            s.extend(&[id], WantLogits::Last, |_, row| argmaxes.push(argmax(row)))
                .unwrap();
        }
        let checked = check_greedy(case, &argmaxes, TOL);
        assert!(
            checked >= case.greedy_ids.len() / 2,
            "{}: only {checked} steps checkable",
            case.name
        );
    }
}

#[test]
fn cached_decode_equals_full_recompute() {
    let m = model();
    let oracle = Oracle::load("qwen3-tiny/oracle.json", "qwen3-tiny/oracle.safetensors");
    let case = &oracle.cases[2];
    let mut ids = case.input_ids.clone();
    ids.extend_from_slice(&case.greedy_ids[..8]);
    // Full recompute in one chunk.
    let mut full = Vec::new();
    session(&m, 512)
        .extend(&ids, WantLogits::Last, |_, r| full = r.to_vec())
        .unwrap();
    // Prompt, then decode token by token with the cache; also odd chunk sizes.
    for chunk in [1usize, 7, 33] {
        let mut s = session(&m, chunk);
        let mut cached = Vec::new();
        s.extend(&case.input_ids, WantLogits::Last, |_, _| {})
            .unwrap();
        for &id in &case.greedy_ids[..8] {
            s.extend(&[id], WantLogits::Last, |_, r| cached = r.to_vec())
                .unwrap();
        }
        let d = max_abs_diff(&full, &cached);
        assert!(d < 1e-4, "chunk {chunk}: cached vs full max |Δ| {d}");
    }
}

#[test]
fn reused_prefix_gives_the_same_logits() {
    let m = model();
    let oracle = Oracle::load("qwen3-tiny/oracle.json", "qwen3-tiny/oracle.safetensors");
    let case = &oracle.cases[2];
    let mut s = session(&m, 16);
    s.extend(&case.input_ids[..60], WantLogits::Last, |_, _| {})
        .unwrap();
    // A prompt sharing the first 50 tokens: only the rest is computed.
    let kept = s.reuse_prefix(&case.input_ids);
    assert_eq!(kept, 60);
    let mut last = Vec::new();
    s.extend(&case.input_ids[kept..], WantLogits::Last, |_, r| {
        last = r.to_vec()
    })
    .unwrap();
    let d = max_abs_diff(&last, &oracle.last_logits(&case.name));
    assert!(d <= TOL, "max |Δ| {d}");
}

#[test]
fn f16_kv_cache_follows_the_oracle() {
    let m = Arc::new(
        Arc::try_unwrap(model())
            .ok()
            .unwrap()
            .with_kv_dtype(KvDtype::F16),
    );
    let oracle = Oracle::load("qwen3-tiny/oracle.json", "qwen3-tiny/oracle.safetensors");
    let worst = check_oracle_cases(&oracle, || session(&m, 64), 37, usize::MAX, TOL_F16_KV);
    eprintln!("f16 KV cache: worst last-logits max |Δ| = {worst:.2e}");
}
