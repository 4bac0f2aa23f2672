//! Quantized safetensors checkpoints (GPTQ, AWQ, compressed-tensors) against their oracles:
//! qwen3-tiny quantized and packed by each format's own library (`tests/fixtures/make_*.py`),
//! and transformers' float32 forward on the weights as that library dequantizes them.
//!
//! Ways of running each fixture, with the README's tolerances:
//! - the exact path (every weight read into f32, f32 activations on the CPU): 2e-3;
//! - the native blocks wick reads them into (Q4_0, Q4_1, Q8_0) with f32 compute (the CPU with
//!   f32 activations, and the GPU, which computes in f32 on dequantized blocks), the bf16
//!   embedding kept as stored: 2e-3 where the mapping is exact; where wick requantizes to
//!   Q8_0, within 2e-3 of llama.cpp's own Q8_0 of the same weights (`q8_0_requantized` in the
//!   oracle); where the mapping rounds (Q4_1's `m`) or requantizes only some blocks (8-bit
//!   `q − z` that does not fit a byte), within 2e-3 of the oracle's figure for exactly that
//!   (`q4_1_mapped`, `q8_0_mapped`);
//! - the same blocks with the embedding read into Q8_0, as wick loads them by default: within
//!   2e-3 of the same figures computed with llama.cpp's Q8_0 of the embedding as well
//!   (`embedding_q8_0` in the oracle);
//! - either with the CPU's default 8-bit activations: 0.1 more (the README's rule for 8-bit
//!   activations).

mod common;

use std::path::Path;
use std::sync::Arc;

use common::*;
use wick::backend::cpu::{ActQuant, CpuBackend};
use wick::backend::{Backend, KvDtype};
use wick::loader::checkpoint::Checkpoint;
use wick::loader::quantization::{scheme_of, QuantScheme};
use wick::loader::safetensors::load_dir_with;
use wick::loader::TensorSet;
use wick::model::Model;
use wick::quant::DType;
use wick::session::{Session, SessionOptions};

const TOL: f32 = 2e-3;
/// 8-bit activations: the README's 0.1 does not hold on qwen3-tiny, whose rows are two or
/// four activation blocks (`tests/gguf_golden.rs`: llama.cpp's own run of qwen3-tiny's
/// Q4_0 file moves it by up to 0.136); held to twice the README's figure.
const TOL_Q8_ACT: f32 = 0.2;

/// What wick makes of a fixture's linear weights by default.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Mapping {
    /// Every weight exactly, in this format.
    Exact(DType),
    /// Q4_1 with `d = s` and `m = f16(−s·z)`: within 2e-3 of the oracle's figure for that
    /// rounding (`q4_1_mapped`).
    Q4_1,
    /// Every weight requantized to Q8_0 (llama.cpp's figure applies).
    Requantized,
    /// Q8_0 with `d = s`, exact in the blocks where `q − z` fits a byte and requantized in
    /// the others: within 2e-3 of the oracle's figure for that (`q8_0_mapped`).
    Partly,
}

/// How the checkpoint's bf16 embedding (the tied output head) is read.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Embedding {
    /// As stored ([`QuantScheme::keep_embedding`]).
    AsStored,
    /// Into Q8_0, wick's default.
    Q8_0,
}

impl Embedding {
    /// The tensor type it has.
    fn dtype(self) -> DType {
        match self {
            Embedding::AsStored => DType::BF16,
            Embedding::Q8_0 => DType::Q8_0,
        }
    }
}

/// A fixture: its directory, the tensors file in it, and what wick makes of it.
struct Fixture {
    name: &'static str,
    file: &'static str,
    mapping: Mapping,
}

const FIXTURES: &[Fixture] = &[
    Fixture {
        name: "qwen3-tiny-gptq-w4g32-sym",
        file: "quantized.safetensors",
        mapping: Mapping::Exact(DType::Q4_0),
    },
    Fixture {
        name: "qwen3-tiny-gptq-w4g128-v2",
        file: "quantized.safetensors",
        mapping: Mapping::Q4_1,
    },
    Fixture {
        name: "qwen3-tiny-gptq-w4g32-descact",
        file: "quantized.safetensors",
        mapping: Mapping::Requantized,
    },
    Fixture {
        name: "qwen3-tiny-gptq-w8-perrow",
        file: "quantized.safetensors",
        mapping: Mapping::Partly,
    },
    Fixture {
        name: "qwen3-tiny-gptq-w2g32",
        file: "quantized.safetensors",
        mapping: Mapping::Requantized,
    },
    Fixture {
        name: "qwen3-tiny-awq-w4g32",
        file: "quantized.safetensors",
        mapping: Mapping::Q4_1,
    },
    Fixture {
        name: "qwen3-tiny-awq-w4g64",
        file: "quantized.safetensors",
        mapping: Mapping::Q4_1,
    },
    Fixture {
        name: "qwen3-tiny-ct-w4a16-g32",
        file: "quantized.safetensors",
        mapping: Mapping::Exact(DType::Q4_0),
    },
    Fixture {
        name: "qwen3-tiny-ct-w4a16-asym-g32",
        file: "quantized.safetensors",
        mapping: Mapping::Q4_1,
    },
    Fixture {
        name: "qwen3-tiny-ct-w8a16-channel",
        file: "quantized.safetensors",
        mapping: Mapping::Exact(DType::Q8_0),
    },
    Fixture {
        name: "qwen3-tiny-ct-w3a16-g32",
        file: "quantized.safetensors",
        mapping: Mapping::Requantized,
    },
    Fixture {
        name: "qwen3-tiny-ct-w8a8-int",
        file: "quantized.safetensors",
        mapping: Mapping::Exact(DType::Q8_0),
    },
    Fixture {
        name: "qwen3-tiny-ct-fp8-dynamic",
        file: "quantized.safetensors",
        mapping: Mapping::Requantized,
    },
];

/// The largest |Δ| of one case's last logits from the oracle's that the fixture script
/// computed (transformers, with llama.cpp's gguf-py quantizer) for the linear weights as a
/// mapping gives them.
#[derive(Clone, Copy, Debug)]
struct Figures {
    /// Exact (0 with the embedding as stored: the oracle itself).
    exact: f32,
    /// Requantized to Q8_0 by llama.cpp.
    q8_0: f32,
    /// As Q4_1 blocks with `m = f16(−s·z)` (the asymmetric 4-bit fixtures).
    q4_1: Option<f32>,
    /// As Q8_0 blocks with `d = s` where `q − z` fits a byte, requantized by llama.cpp
    /// elsewhere (the asymmetric 8-bit fixture).
    partly_q8_0: Option<f32>,
}

impl Figures {
    /// The figure of `mapping`.
    fn of(self, mapping: Mapping) -> f32 {
        match mapping {
            Mapping::Exact(_) => self.exact,
            Mapping::Q4_1 => self.q4_1.expect("the oracle's q4_1_mapped"),
            Mapping::Requantized => self.q8_0,
            Mapping::Partly => self.partly_q8_0.expect("the oracle's q8_0_mapped"),
        }
    }
}

/// A fixture's oracle and, per case, the figures with the embedding as stored and with it
/// requantized to Q8_0.
struct FixtureOracle {
    oracle: Oracle,
    as_stored: Vec<Figures>,
    q8_0_embedding: Vec<Figures>,
}

impl FixtureOracle {
    fn figures(&self, e: Embedding) -> &[Figures] {
        match e {
            Embedding::AsStored => &self.as_stored,
            Embedding::Q8_0 => &self.q8_0_embedding,
        }
    }
}

fn oracle(f: &Fixture) -> FixtureOracle {
    let dir = local_fixture(f.name);
    let oracle = Oracle::load_paths(&dir.join("oracle.json"), &dir.join("oracle.safetensors"));
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("oracle.json")).unwrap()).unwrap();
    let cases = json["cases"].as_array().unwrap();
    let figure = |c: &serde_json::Value, k: &str| c[k].as_f64().map(|v| v as f32);
    let figures = |c: &serde_json::Value, exact: f32| Figures {
        exact,
        q8_0: figure(c, "q8_0_requantized").unwrap(),
        q4_1: figure(c, "q4_1_mapped"),
        partly_q8_0: figure(c, "q8_0_mapped"),
    };
    let q8_0_embedding = |c: &serde_json::Value| {
        let e = &c["embedding_q8_0"];
        figures(e, figure(e, "exact").unwrap())
    };
    FixtureOracle {
        oracle,
        as_stored: cases.iter().map(|c| figures(c, 0.0)).collect(),
        q8_0_embedding: cases.iter().map(q8_0_embedding).collect(),
    }
}

/// The fixture assembled and opened as `wick` opens it (the checkpoint's own scheme), and
/// its tensors read again with the scheme changed by `read`.
fn load(
    f: &Fixture,
    read: impl Fn(QuantScheme) -> QuantScheme,
) -> (tempfile::TempDir, Checkpoint, TensorSet) {
    let dir = quantized_checkpoint(f.name, f.file);
    let ckpt = Checkpoint::open_dir(dir.path(), f.name.into()).unwrap();
    let scheme = scheme_of(&config_json(dir.path())).unwrap().unwrap();
    let tensors = load_dir_with(dir.path(), Some(read(scheme))).unwrap();
    (dir, ckpt, tensors)
}

fn config_json(dir: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap()
}

fn session<B: Backend>(m: &Arc<Model<B>>) -> Session<B> {
    let opts = SessionOptions {
        max_model_len: 512,
        prefill_chunk: 64,
        max_logits_rows: 64,
        ..Default::default()
    };
    Session::new(m.clone(), opts).unwrap()
}

/// The last logits and the teacher-forced argmaxes of `case`.
fn run_case<B: Backend>(m: &Arc<Model<B>>, case: &Case) -> (Vec<f32>, Vec<usize>) {
    teacher_forced(&mut session(m), case)
}

/// Runs every case of `f` on `m`, whose linear weights are read as `mapping` says and its
/// embedding as `embedding` says, and checks the last logits (within `tol` of the oracle's
/// figure for that pair), the top 8 at the last position and the greedy continuation.
/// Returns the worst |Δ|.
fn check<B: Backend>(
    m: &Arc<Model<B>>,
    o: &FixtureOracle,
    what: &str,
    tol: f32,
    (mapping, embedding): (Mapping, Embedding),
) -> f32 {
    let mut worst = 0f32;
    for (case, figures) in o.oracle.cases.iter().zip(o.figures(embedding)) {
        let (last, argmaxes) = run_case(m, case);
        let d = max_abs_diff(&last, &o.oracle.last_logits(&case.name));
        let want = figures.of(mapping);
        eprintln!(
            "{what} {}: last logits max |Δ| {d:.3e}, the oracle's figure {want:.3e} \
             ({mapping:?}, embedding {embedding:?}; llama.cpp's Q8_0 of every layer {:.3e})",
            case.name, figures.q8_0
        );
        assert!(
            (d - want).abs() <= tol,
            "{what} {}: last logits max |Δ| {d}, the oracle's figure {want} ± {tol} \
             ({mapping:?}, embedding {embedding:?})",
            case.name
        );
        let allowed = want + tol;
        check_topk(
            case.input_ids.len() - 1,
            &last,
            &o.oracle.topk_ids(&case.name)[0],
            &o.oracle.topk_logits(&case.name)[0],
            allowed,
        );
        check_greedy(case, &argmaxes, allowed);
        worst = worst.max(d);
    }
    worst
}

fn cpu_model(ckpt: &Checkpoint, tensors: &TensorSet, act: ActQuant) -> Arc<Model<CpuBackend>> {
    let b = CpuBackend::with_act(2, act).unwrap();
    let m = Model::load(b, ckpt.config.clone(), tensors).unwrap();
    Arc::new(m.with_kv_dtype(KvDtype::F32))
}

/// The exact path: every fixture read into f32 (the embedding as stored) and run in f32 on
/// the CPU meets 2e-3.
#[test]
fn exact_path_matches_the_oracles() {
    for f in FIXTURES {
        let (_dir, ckpt, tensors) = load(f, QuantScheme::exact);
        let q = tensors
            .get("model.layers.0.self_attn.q_proj.weight")
            .unwrap();
        assert_eq!(q.dtype, DType::F32);
        let e = tensors.get("model.embed_tokens.weight").unwrap();
        assert_eq!(e.dtype, DType::BF16);
        let m = cpu_model(&ckpt, &tensors, ActQuant::F32);
        let exact = (Mapping::Exact(DType::F32), Embedding::AsStored);
        check(&m, &oracle(f), &format!("{} exact", f.name), TOL, exact);
    }
}

/// The native blocks on the CPU with the embedding read as `embedding` says (into Q8_0 as
/// `wick` loads them, `Checkpoint::open_dir`), with f32 activations (2e-3 of the oracle's
/// figure) and with the default 8-bit activations (0.1 more).
fn native_blocks_on_the_cpu(embedding: Embedding) {
    for f in FIXTURES {
        let (_dir, ckpt, exact) = load(f, QuantScheme::exact);
        let kept;
        let tensors = match embedding {
            Embedding::Q8_0 => &ckpt.tensors,
            Embedding::AsStored => {
                (_, _, kept) = load(f, QuantScheme::keep_embedding);
                &kept
            }
        };
        check_dtypes(f, tensors, embedding);
        let mut worst = 0f32;
        for name in tensors.names().filter(|n| n.ends_with("_proj.weight")) {
            let d = max_abs_diff(
                &tensors.get(name).unwrap().to_f32(),
                &exact.get(name).unwrap().to_f32(),
            );
            worst = worst.max(d);
        }
        eprintln!(
            "{}: largest |Δw| of the blocks against the exact weights: {worst:.3e}",
            f.name
        );
        let o = oracle(f);
        let read = (f.mapping, embedding);
        let m = cpu_model(&ckpt, tensors, ActQuant::F32);
        let what = format!("{} blocks, embedding {embedding:?}", f.name);
        check(&m, &o, &format!("{what}, f32 activations"), TOL, read);
        let m = cpu_model(&ckpt, tensors, ActQuant::Q8);
        check(
            &m,
            &o,
            &format!("{what}, 8-bit activations"),
            TOL_Q8_ACT,
            read,
        );
    }
}

/// With the embedding as stored, the blocks are held to 2e-3 where their mapping is exact.
#[test]
fn native_blocks_match_the_oracles_on_the_cpu() {
    native_blocks_on_the_cpu(Embedding::AsStored);
}

/// As `wick` loads them, the embedding in Q8_0: the logits move by what llama.cpp's Q8_0
/// of the same embedding moves them.
#[test]
fn native_blocks_with_the_q8_0_embedding_match_the_oracles_on_the_cpu() {
    native_blocks_on_the_cpu(Embedding::Q8_0);
}

/// Every linear weight is in the format the fixture's mapping says, the embedding in the
/// one `embedding` says.
fn check_dtypes(f: &Fixture, tensors: &TensorSet, embedding: Embedding) {
    let want = match f.mapping {
        Mapping::Exact(d) => d,
        Mapping::Q4_1 => DType::Q4_1,
        Mapping::Requantized | Mapping::Partly => DType::Q8_0,
    };
    for name in tensors.names().filter(|n| n.ends_with("_proj.weight")) {
        assert_eq!(tensors.get(name).unwrap().dtype, want, "{}: {name}", f.name);
    }
    let e = tensors.get("model.embed_tokens.weight").unwrap();
    assert_eq!(e.dtype, embedding.dtype(), "{}: the embedding", f.name);
    assert!(
        tensors
            .names()
            .all(|n| !n.ends_with("qweight") && !n.ends_with("scales")),
        "{}: packed parts left over",
        f.name
    );
}

/// The native blocks on the GPU, with the embedding as stored and as `wick` loads them
/// (`Checkpoint::open_dir`, Q8_0): f32 compute on the dequantized blocks, so 2e-3 of the
/// oracle's figure.
#[cfg(feature = "gpu")]
#[test]
fn native_blocks_match_the_oracles_on_the_gpu() {
    for f in FIXTURES {
        let (_dir, ckpt, kept) = load(f, QuantScheme::keep_embedding);
        let o = oracle(f);
        for (embedding, tensors) in [
            (Embedding::AsStored, &kept),
            (Embedding::Q8_0, &ckpt.tensors),
        ] {
            let Some(b) = gpu_backend() else { return };
            check_dtypes(f, tensors, embedding);
            let m = Model::load(b, ckpt.config.clone(), tensors).unwrap();
            let m = Arc::new(m.with_kv_dtype(KvDtype::F32));
            let what = format!("{} GPU, embedding {embedding:?}", f.name);
            check(&m, &o, &what, TOL, (f.mapping, embedding));
        }
    }
}

/// A safetensors file's tensors, owned: name, dtype, shape, bytes.
type Tensors = Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)>;

/// Swaps the dimensions of tensor `name`'s shape (its bytes stay as they are).
fn reverse_shape(t: &mut Tensors, name: &str) {
    for (n, _, s, _) in t.iter_mut() {
        if n == name {
            s.reverse();
        }
    }
}

/// Rewrites `dir/model.safetensors` through `edit`.
fn rewrite(dir: &Path, edit: impl Fn(&mut Tensors)) {
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<_> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, v.dtype(), v.shape().to_vec(), v.data().to_vec()))
        .collect();
    edit(&mut tensors);
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, d, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &path).unwrap();
}

/// A packed weight with a part missing or misshapen, a packed tensor of no layer, a group
/// index out of range, and a `quant_method` wick does not load: each an error naming the
/// tensor or the method, never a panic.
#[test]
fn malformed_and_unsupported_checkpoints_are_errors() {
    let f = &FIXTURES[0];
    let q = "model.layers.0.self_attn.q_proj";
    let open = |edit: &dyn Fn(&mut Tensors)| {
        let dir = quantized_checkpoint(f.name, f.file);
        rewrite(dir.path(), edit);
        Checkpoint::open_dir(dir.path(), "bad".into())
            .err()
            .expect("a malformed checkpoint was accepted")
            .to_string()
    };
    let e = open(&|t| t.retain(|(n, ..)| n != &format!("{q}.qzeros")));
    assert!(
        e.contains(&format!("{q}.qzeros")) && e.contains("missing"),
        "{e}"
    );
    let e = open(&|t| reverse_shape(t, &format!("{q}.scales")));
    assert!(
        e.contains(&format!("{q}.scales")) && e.contains("expected [groups, 128]"),
        "{e}"
    );
    let e = open(&|t| {
        for (n, _, s, _) in t.iter_mut() {
            if n == &format!("{q}.qweight") {
                *s = vec![s[0] * s[1]];
            }
        }
    });
    assert!(
        e.contains(&format!("{q}.qweight")) && e.contains("shape"),
        "{e}"
    );
    let e = open(&|t| {
        for (n, _, _, b) in t.iter_mut() {
            if n == &format!("{q}.g_idx") {
                b[..4].copy_from_slice(&99i32.to_le_bytes());
            }
        }
    });
    assert!(e.contains("group index 99") && e.contains(q), "{e}");
    let e = open(&|t| {
        t.push((
            "model.layers.0.mlp.extra.qzeros".into(),
            safetensors::Dtype::I32,
            vec![1, 4],
            vec![0; 16],
        ))
    });
    assert!(
        e.contains("mlp.extra.qzeros") && e.contains("no quantized layer"),
        "{e}"
    );
    let e = open(&|t| {
        for (n, d, _, _) in t.iter_mut() {
            if n == &format!("{q}.scales") {
                *d = safetensors::Dtype::I16;
            }
        }
    });
    assert!(e.contains(&format!("{q}.scales")), "{e}");

    // The other formats' parts: compressed-tensors without `weight_shape`, with its zero
    // points misshapen, and AWQ with its zeros misshapen.
    let open_fixture = |name: &str, edit: &dyn Fn(&mut Tensors)| {
        let f = FIXTURES.iter().find(|f| f.name == name).unwrap();
        let dir = quantized_checkpoint(f.name, f.file);
        rewrite(dir.path(), edit);
        Checkpoint::open_dir(dir.path(), "bad".into())
            .err()
            .expect("a malformed checkpoint was accepted")
            .to_string()
    };
    let e = open_fixture("qwen3-tiny-ct-w4a16-asym-g32", &|t| {
        t.retain(|(n, ..)| n != &format!("{q}.weight_shape"))
    });
    assert!(e.contains(&format!("{q}.weight_shape")), "{e}");
    let e = open_fixture("qwen3-tiny-ct-w4a16-asym-g32", &|t| {
        reverse_shape(t, &format!("{q}.weight_zero_point"))
    });
    assert!(
        e.contains(&format!("{q}.weight_zero_point")) && e.contains("shape"),
        "{e}"
    );
    let e = open_fixture("qwen3-tiny-awq-w4g32", &|t| {
        reverse_shape(t, &format!("{q}.qzeros"))
    });
    assert!(
        e.contains(&format!("{q}.qzeros")) && e.contains("shape"),
        "{e}"
    );

    let dir = quantized_checkpoint(f.name, f.file);
    let mut config = config_json(dir.path());
    config["quantization_config"] =
        serde_json::json!({"quant_method": "bitsandbytes", "load_in_4bit": true});
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    let e = Checkpoint::open_dir(dir.path(), "bnb".into())
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("`bitsandbytes`") && e.contains("`gptq`") && e.contains("`awq`"),
        "{e}"
    );
}

/// Why weights whose groups do not map onto blocks (`desc_act`) are requantized to Q8_0
/// rather than Q4_1: on the `desc_act` fixture, with f32 compute, Q8_0 lands on llama.cpp's
/// Q8_0 figure and Q4_1 (a block of 32 mixing groups and so scales) moves the logits further.
#[test]
fn desc_act_falls_back_to_q8_0_not_q4_1() {
    let f = FIXTURES
        .iter()
        .find(|f| f.name.ends_with("descact"))
        .unwrap();
    let dir = quantized_checkpoint(f.name, f.file);
    let ckpt = Checkpoint::open_dir(dir.path(), f.name.into()).unwrap();
    // The embedding as stored, so that only the fallback moves the logits.
    let scheme = scheme_of(&config_json(dir.path())).unwrap().unwrap();
    let scheme = scheme.keep_embedding();
    let o = oracle(f);
    let mut worst = Vec::new();
    for dtype in [DType::Q8_0, DType::Q4_1] {
        let tensors = load_dir_with(dir.path(), Some(scheme.with_fallback(dtype))).unwrap();
        let q = tensors.get("model.layers.0.mlp.down_proj.weight").unwrap();
        assert_eq!(q.dtype, dtype);
        let m = cpu_model(&ckpt, &tensors, ActQuant::F32);
        let mut d = 0f32;
        for case in &o.oracle.cases {
            let (last, _) = run_case(&m, case);
            d = d.max(max_abs_diff(&last, &o.oracle.last_logits(&case.name)));
        }
        eprintln!("desc_act requantized to {dtype}: worst last-logits max |Δ| {d:.3e}");
        worst.push(d);
    }
    assert!(worst[0] < worst[1], "{worst:?}");
}

/// A GPTQ `quantization_config` on float weights (no `qweight` anywhere) is refused rather
/// than run as floats.
#[test]
fn a_quantization_config_without_packed_weights_is_an_error() {
    let f = &FIXTURES[0];
    let dir = quantized_checkpoint(f.name, f.file);
    std::fs::copy(
        fixture("qwen3-tiny").join("model.safetensors"),
        dir.path().join("model.safetensors"),
    )
    .unwrap();
    let e = Checkpoint::open_dir(dir.path(), "float".into())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("`gptq`") && e.contains("qweight"), "{e}");
}
