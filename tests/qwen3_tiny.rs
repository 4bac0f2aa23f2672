//! The forward pass against transformers' float32 oracle for the `qwen3-tiny` fixture, on
//! every backend ([`test_backends!`]).
//!
//! Both backends compute in f32 on bf16 weights widened exactly (f32 activations, KV cache
//! and softmax; no f16 intermediates), so the tolerance is the README's rule for exact
//! weights: 2e-3. Prefill runs in chunks, as the engine does.
//!
//! On the CPU top-k is checked at every prompt position; on the GPU (lavapipe's steps are
//! slow) at every position of the chat cases and at the first and last 128 positions of the
//! 1500-token one. Last logits and greedy decoding are checked for all cases everywhere; the
//! GPU also counts its work per decoded token.

mod common;

use std::sync::Arc;

use common::*;
use wick::backend::{Backend, KvDtype};
use wick::config::ModelConfig;
use wick::loader::safetensors::{load_dir, load_dir_with};
use wick::model::Model;
use wick::session::{Session, SessionOptions, WantLogits};

const TOL: f32 = 2e-3;

/// Prompts longer than this have their top-k checked on the first and last `SPOT` positions
/// only on the GPU (every position of the 1500-token case costs a minute on lavapipe, almost
/// all of it in the `[64, V]` logits of each chunk); the rest runs in 512-token chunks.
const LONG: usize = 256;
const SPOT: usize = 128;

fn model<B: Backend>(backend: B) -> Arc<Model<B>> {
    let dir = fixture("qwen3-tiny");
    let config = ModelConfig::from_file(&dir.join("config.json")).unwrap();
    let tensors = load_dir(&dir).unwrap();
    // An f32 KV cache: exact, for the f32 tolerance.
    let model = Model::load(backend, config, &tensors).unwrap();
    Arc::new(model.with_kv_dtype(KvDtype::F32))
}

fn session<B: Backend>(m: &Arc<Model<B>>, chunk: usize) -> Session<B> {
    let opts = SessionOptions {
        max_model_len: 2048,
        prefill_chunk: chunk,
        max_logits_rows: 64,
        ..Default::default()
    };
    Session::new(m.clone(), opts).unwrap()
}

/// The longest prompt whose top-k is checked at every position on this backend.
fn long_prompt<B: Backend + 'static>(m: &Model<B>) -> usize {
    if as_gpu(m.backend()).is_some() {
        LONG
    } else {
        usize::MAX
    }
}

test_backends!(
    fp8_checkpoint_follows_its_oracle,
    logits_and_topk_match_oracle,
    teacher_forced_greedy_follows_oracle,
    cached_decode_equals_full_recompute,
    reused_prefix_gives_the_same_logits,
    f16_kv_cache_follows_the_oracle,
);

fn logits_and_topk_match_oracle<B: Backend + 'static>(backend: B) {
    let m = model(backend);
    let long = long_prompt(&m);
    let oracle = Oracle::load("qwen3-tiny/oracle.json", "qwen3-tiny/oracle.safetensors");
    for case in &oracle.cases {
        let started = std::time::Instant::now();
        let ids_k = oracle.topk_ids(&case.name);
        let logits_k = oracle.topk_logits(&case.name);
        let ids = &case.input_ids;
        let n = ids.len();
        let mut last = Vec::new();
        let mut checked = 0;
        let mut check = |i: usize, row: &[f32]| {
            check_topk(i, row, &ids_k[i], &logits_k[i], TOL);
            checked += 1;
            if i + 1 == n {
                last = row.to_vec();
            }
        };
        if n <= long {
            session(&m, 512)
                .extend(ids, WantLogits::All, &mut check)
                .unwrap();
        } else {
            session(&m, 512)
                .extend(&ids[..SPOT], WantLogits::All, &mut check)
                .unwrap();
            let mut s = session(&m, 512);
            let tail = n - SPOT;
            // The last row of the long prefix is checked too.
            s.extend(&ids[..tail], WantLogits::Last, |_, row| {
                check(tail - 1, row)
            })
            .unwrap();
            s.extend(&ids[tail..], WantLogits::All, |i, row| check(tail + i, row))
                .unwrap();
        }
        let d = max_abs_diff(&last, &oracle.last_logits(&case.name));
        assert!(d <= TOL, "{}: last logits max |Δ| {d}", case.name);
        eprintln!(
            "{}: top-k checked at {checked} of {n} positions, last-logits max |Δ| = {d:.2e} \
             ({:.1?})",
            case.name,
            started.elapsed()
        );
    }
}

fn teacher_forced_greedy_follows_oracle<B: Backend + 'static>(backend: B) {
    let m = model(backend);
    let oracle = Oracle::load("qwen3-tiny/oracle.json", "qwen3-tiny/oracle.safetensors");
    for case in &oracle.cases {
        let mut s = session(&m, 512);
        let mut argmaxes = Vec::new();
        let mut last = Vec::new();
        s.extend(&case.input_ids, WantLogits::Last, |_, row| {
            last = row.to_vec()
        })
        .unwrap();
        let d = max_abs_diff(&last, &oracle.last_logits(&case.name));
        assert!(d <= TOL, "{}: last logits max |Δ| {d}", case.name);
        argmaxes.push(argmax(&last));
        // Decode one token at a time through the cache, fed the oracle's tokens.
        let before = as_gpu(m.backend()).map(|g| g.stats());
        let started = std::time::Instant::now();
        let steps = case.greedy_ids.len() - 1;
        for &id in &case.greedy_ids[..steps] {
            s.extend(&[id], WantLogits::Last, |_, row| argmaxes.push(argmax(row)))
                .unwrap();
        }
        let elapsed = started.elapsed();
        let checked = check_greedy(case, &argmaxes, TOL);
        assert!(
            checked >= case.greedy_ids.len() / 2,
            "{}: only {checked} steps checkable",
            case.name
        );
        if let (Some(before), Some(gpu)) = (before, as_gpu(m.backend())) {
            let after = gpu.stats();
            // One step per decoded token, one read-back each.
            assert_eq!(after.steps - before.steps, steps as u64);
            assert_eq!(after.readbacks - before.readbacks, steps as u64);
            eprintln!(
                "{}: per decoded token: {} dispatches, {} read-back(s), {} submit(s)",
                case.name,
                (after.dispatches - before.dispatches) / steps as u64,
                (after.readbacks - before.readbacks) / steps as u64,
                (after.submits - before.submits) / steps as u64,
            );
        }
        eprintln!(
            "{}: {checked} greedy steps checked; {:.1} tok/s",
            case.name,
            steps as f64 / elapsed.as_secs_f64()
        );
    }
}

fn cached_decode_equals_full_recompute<B: Backend + 'static>(backend: B) {
    let m = model(backend);
    let oracle = Oracle::load("qwen3-tiny/oracle.json", "qwen3-tiny/oracle.safetensors");
    let case = &oracle.cases[2];
    let mut ids = case.input_ids.clone();
    ids.extend_from_slice(&case.greedy_ids[..8]);
    // Full recompute in one chunk.
    let mut full = Vec::new();
    session(&m, 512)
        .extend(&ids, WantLogits::Last, |_, r| full = r.to_vec())
        .unwrap();
    // Prompt, then decode token by token with the cache; odd chunk sizes exercise both
    // matmul kernels and chunks that read nothing back.
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

fn reused_prefix_gives_the_same_logits<B: Backend + 'static>(backend: B) {
    let m = model(backend);
    let oracle = Oracle::load("qwen3-tiny/oracle.json", "qwen3-tiny/oracle.safetensors");
    let case = &oracle.cases[2];
    let mut s = session(&m, 16);
    s.extend(&case.input_ids[..60], WantLogits::Last, |_, _| {})
        .unwrap();
    // A prompt sharing the first 60 tokens: only the rest is computed.
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

fn f16_kv_cache_follows_the_oracle<B: Backend + 'static>(backend: B) {
    let m = model(backend);
    let long = long_prompt(&m);
    let m = Arc::new(Arc::try_unwrap(m).ok().unwrap().with_kv_dtype(KvDtype::F16));
    let oracle = Oracle::load("qwen3-tiny/oracle.json", "qwen3-tiny/oracle.safetensors");
    let worst = check_oracle_cases(&oracle, || session(&m, 64), 37, long, TOL_F16_KV);
    eprintln!("f16 KV cache: worst last-logits max |Δ| = {worst:.2e}");
}

/// qwen3-tiny as an FP8 checkpoint (block-wise e4m3, as Qwen/Qwen3-0.6B-FP8; quantized by
/// transformers), loaded as `wick` loads it: into Q8_0.
fn fp8_checkpoint() -> (tempfile::TempDir, wick::loader::checkpoint::Checkpoint) {
    let dir = qwen3_tiny_fp8();
    let ckpt = wick::loader::checkpoint::Checkpoint::open_dir(dir.path(), "fp8".into()).unwrap();
    (dir, ckpt)
}

/// The FP8 fixture's oracle: transformers' float32 forward on the weights dequantized by
/// transformers, and per case `q8_0_requantized`, what llama.cpp's own Q8_0 quantizer makes
/// of the same weights (the largest |Δ| of the last logits).
fn fp8_oracle() -> (Oracle, impl Fn(&str) -> f32) {
    let fixtures = local_fixture("qwen3-tiny-fp8");
    let oracle = Oracle::load_paths(
        &fixtures.join("oracle.json"),
        &fixtures.join("oracle.safetensors"),
    );
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixtures.join("oracle.json")).unwrap()).unwrap();
    let requantized = move |case: &str| -> f32 {
        let cases = json["cases"].as_array().unwrap();
        let c = cases.iter().find(|c| c["name"] == case).unwrap();
        c["q8_0_requantized"].as_f64().unwrap() as f32
    };
    (oracle, requantized)
}

/// The last logits and the teacher-forced argmaxes of `case` on `m`.
fn run_case<B: Backend>(m: &Arc<Model<B>>, case: &Case) -> (Vec<f32>, Vec<usize>) {
    teacher_forced(&mut session(m, 512), case)
}

/// The FP8 checkpoint as `wick` loads it (Q8_0) on every backend. The requantization moves
/// the logits by itself (`q8_0_requantized`, llama.cpp's figure for the same Q8_0 blocks):
/// the GPU computes in f32 on the Q8_0 weights and must land on that figure within 2e-3;
/// the CPU's default 8-bit activations get the README's 0.1 for 8-bit activations on top.
fn fp8_checkpoint_follows_its_oracle<B: Backend + 'static>(backend: B) {
    let (_dir, ckpt) = fp8_checkpoint();
    let q = ckpt
        .tensors
        .get("model.layers.0.self_attn.q_proj.weight")
        .unwrap();
    assert_eq!(q.dtype, wick::quant::DType::Q8_0);
    assert!(ckpt
        .tensors
        .try_get("model.layers.0.self_attn.q_proj.weight_scale_inv")
        .is_none());
    let gpu = as_gpu(&backend).is_some();
    let m = Model::load(backend, ckpt.config.clone(), &ckpt.tensors).unwrap();
    let m = Arc::new(m.with_kv_dtype(KvDtype::F32));
    let (oracle, requantized) = fp8_oracle();
    for case in &oracle.cases {
        // The 1500-token prompt costs minutes on lavapipe; the chat cases cover the GPU.
        if gpu && case.input_ids.len() > LONG {
            continue;
        }
        let (last, argmaxes) = run_case(&m, case);
        let d = max_abs_diff(&last, &oracle.last_logits(&case.name));
        let want = requantized(&case.name);
        eprintln!(
            "{}: last logits |Δ| {d}, llama.cpp's Q8_0 {want}",
            case.name
        );
        if gpu {
            // f32 compute on the Q8_0 weights: llama.cpp's figure.
            assert!(
                (d - want).abs() <= TOL,
                "{}: |Δ| {d}, llama.cpp's Q8_0 {want}",
                case.name
            );
        } else {
            assert!(
                d <= want + 0.1,
                "{}: |Δ| {d}, llama.cpp's Q8_0 {want}",
                case.name
            );
        }
        assert!(
            check_greedy(case, &argmaxes, want + 0.1) > 0,
            "{}",
            case.name
        );
    }
}

/// The FP8 checkpoint's exact path and its Q8_0 blocks, on the CPU: read into f32
/// ([`QuantScheme::exact`](wick::loader::quantization::QuantScheme::exact)) it meets the README's rule for exact weights (2e-3); read into Q8_0
/// and run with 16-bit activations it lands on llama.cpp's own Q8_0 figure within 2e-3 (the
/// blocks are llama.cpp's, bit for bit).
#[test]
fn fp8_exact_path_and_q8_0_blocks_match_the_oracle() {
    use wick::backend::cpu::{ActQuant, CpuBackend};
    use wick::loader::quantization::scheme_of;
    let (dir, ckpt) = fp8_checkpoint();
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("config.json")).unwrap()).unwrap();
    let scheme = scheme_of(&config).unwrap().unwrap();
    let exact = load_dir_with(dir.path(), Some(scheme.exact())).unwrap();
    let q = "model.layers.0.mlp.down_proj.weight";
    assert_eq!(exact.get(q).unwrap().dtype, wick::quant::DType::F32);
    let (oracle, requantized) = fp8_oracle();
    let load = |tensors: &wick::loader::TensorSet, act: ActQuant| {
        let b = CpuBackend::with_act(2, act).unwrap();
        let m = Model::load(b, ckpt.config.clone(), tensors).unwrap();
        Arc::new(m.with_kv_dtype(KvDtype::F32))
    };
    let (exact, q16) = (
        load(&exact, ActQuant::F32),
        load(&ckpt.tensors, ActQuant::Q16),
    );
    for case in &oracle.cases {
        let (last, argmaxes) = run_case(&exact, case);
        let d = max_abs_diff(&last, &oracle.last_logits(&case.name));
        assert!(d <= TOL, "exact {}: last logits max |Δ| {d}", case.name);
        assert!(check_greedy(case, &argmaxes, TOL) > 0, "{}", case.name);
        let (last, _) = run_case(&q16, case);
        let d = max_abs_diff(&last, &oracle.last_logits(&case.name));
        let want = requantized(&case.name);
        eprintln!(
            "{}: exact ok; Q8_0 with 16-bit activations |Δ| {d}, llama.cpp's Q8_0 {want}",
            case.name
        );
        assert!(
            (d - want).abs() <= TOL,
            "{}: |Δ| {d}, llama.cpp's Q8_0 {want}",
            case.name
        );
    }
}
