//! The one real trained model: SmolLM2-135M-Instruct Q4_1 (path in `WICK_SMOLLM2_GGUF`).
//!
//! Perplexity over the Apache License 2.0 text with llama.cpp's method must land within 1% of
//! llama.cpp's own figure, and greedy decoding of the oracle's chat prompt must follow
//! transformers' float32 greedy ids wherever the top-1 margin is clear. The KL-divergence
//! tools round-trip their base file and measure 8-bit activations against float32 ones.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

use common::smollm2;
use serde::Deserialize;
use wick::backend::cpu::ActQuant;
use wick::perplexity::{KlBase, KlReport, SELF_KLD_BOUND};
use wick::runtime::{Device, Runtime, RuntimeOptions};

/// The CPU backend computes prompts in f32 on exactly dequantized weights and decode steps
/// with 16-bit-quantized activations; over 30 layers that and the summation order differ
/// from the oracle's run; 0.1 leaves margins above 0.2 to
/// be checked (README: "Use the margin rule").
const GREEDY_TOL: f32 = 0.1;

const LICENSE: &str = "/usr/share/common-licenses/Apache-2.0";

#[derive(Deserialize)]
struct Chat {
    prompt_ids: Vec<u32>,
    greedy_ids_f32: Vec<u32>,
    greedy_top1_margin: Vec<f32>,
}

#[derive(Deserialize)]
struct PplRef {
    ctx: usize,
    chunks: usize,
    tokens: usize,
    llama_cpp: f64,
}

#[derive(Deserialize)]
struct OracleJson {
    chat: Chat,
    perplexity: std::collections::HashMap<String, PplRef>,
}

fn oracle() -> OracleJson {
    let text = std::fs::read_to_string(common::fixture("smollm2-q4_1.oracle.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn load() -> Runtime {
    let opts = RuntimeOptions {
        device: Device::Cpu,
        max_model_len: 1024,
        ..RuntimeOptions::default()
    };
    Runtime::load(smollm2().to_str().unwrap(), &opts).unwrap()
}

#[test]
fn apache_license_perplexity_is_within_one_percent_of_llama_cpp() {
    let o = oracle();
    let want = &o.perplexity["Apache-2.0"];
    let text = std::fs::read_to_string(LICENSE)
        .unwrap_or_else(|e| panic!("{LICENSE}: {e} (Debian's base-files ships it)"));
    let mut rt = load();
    let tokens = rt.encode_raw(&text).unwrap();
    assert_eq!(
        tokens.len(),
        want.tokens,
        "token count of llama.cpp's tokenization"
    );
    let bos = rt.tokenizer().encode("", true).unwrap().first().copied();
    assert_eq!(bos, None, "this model's tokenizer adds no BOS");
    let report =
        wick::perplexity::perplexity(rt.runner().unwrap(), &tokens, want.ctx, bos, &mut |_, _| {})
            .unwrap();
    assert_eq!(report.chunks, want.chunks);
    assert_eq!(report.scored, want.chunks * (want.ctx - want.ctx / 2 - 1));
    let rel = (report.ppl - want.llama_cpp).abs() / want.llama_cpp;
    eprintln!(
        "SmolLM2 Apache-2.0 ppl {:.4} ± {:.4} (llama.cpp {:.4}, {:.2}% off); running {:?}",
        report.ppl,
        report.ppl_err,
        want.llama_cpp,
        100.0 * rel,
        report.running
    );
    assert!(
        rel < 0.01,
        "ppl {} vs llama.cpp {}",
        report.ppl,
        want.llama_cpp
    );
}

#[test]
fn chat_greedy_follows_the_f32_oracle_under_the_margin_rule() {
    let o = oracle();
    let chat = &o.chat;
    let mut rt = load();
    // Teacher-force the prompt and the oracle's continuation in one pass; the argmax after
    // position p is our choice of token p + 1.
    let mut ids = chat.prompt_ids.clone();
    ids.extend_from_slice(&chat.greedy_ids_f32);
    let first = chat.prompt_ids.len() - 1;
    let mut argmaxes = vec![0usize; chat.greedy_ids_f32.len()];
    rt.logits_all(&ids, &mut |i, row| {
        if i >= first && i - first < argmaxes.len() {
            argmaxes[i - first] = common::argmax(row);
        }
    })
    .unwrap();
    let case = common::Case {
        name: "smollm2 chat".into(),
        input_ids: chat.prompt_ids.clone(),
        greedy_ids: chat.greedy_ids_f32.clone(),
        greedy_top1_margin: chat.greedy_top1_margin.clone(),
        messages: None,
        enable_thinking: None,
        prompt: None,
    };
    let checked = common::check_greedy(&case, &argmaxes, GREEDY_TOL);
    assert!(checked >= 20, "only {checked} steps had a clear margin");
}

// KL divergence (`wick perplexity --kl-divergence-base/--kl-divergence`): the base file is
// written from the float32-activation run, as a user makes the reference for a quantized
// path. Two chunks of 128 tokens keep these fast.

const KLD_CTX: usize = 128;

fn load_with(act: ActQuant) -> Runtime {
    let opts = RuntimeOptions {
        device: Device::Cpu,
        max_model_len: 1024,
        cpu_act: act,
        ..RuntimeOptions::default()
    };
    Runtime::load(smollm2().to_str().unwrap(), &opts).unwrap()
}

/// A file in the test target's scratch directory.
fn temp(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("smollm2-{name}"))
}

/// The first two chunks of the license text, as llama.cpp tokenizes it.
fn license_tokens(rt: &Runtime) -> Vec<u32> {
    let text = std::fs::read_to_string(LICENSE).unwrap();
    let mut tokens = rt.encode_raw(&text).unwrap();
    tokens.truncate(2 * KLD_CTX);
    tokens
}

/// The f32-activation base over [`license_tokens`], written once for all tests of this
/// file, and the perplexity of the run that wrote it.
fn f32_base() -> &'static (PathBuf, f64) {
    static BASE: OnceLock<(PathBuf, f64)> = OnceLock::new();
    BASE.get_or_init(|| {
        let path = temp("f32-base.kld");
        let mut rt = load_with(ActQuant::F32);
        let tokens = license_tokens(&rt);
        let report = wick::perplexity::perplexity_writing_base(
            rt.runner().unwrap(),
            &tokens,
            KLD_CTX,
            None,
            &path,
            &mut |_, _| {},
        )
        .unwrap();
        (path, report.ppl)
    })
}

fn compare(act: ActQuant) -> KlReport {
    let mut rt = load_with(act);
    let base = KlBase::open(&f32_base().0).unwrap();
    assert_eq!(
        base.tokens(),
        license_tokens(&rt),
        "the base stores the text's tokens"
    );
    wick::perplexity::kl_divergence(rt.runner().unwrap(), base, None, &mut |_, _| {}).unwrap()
}

#[test]
fn the_f32_base_compared_with_itself_has_no_kl_divergence() {
    let r = compare(ActQuant::F32);
    let s = &r.summary;
    eprintln!("f32 vs its own base: {s:?}");
    assert_eq!(s.scored, 2 * (KLD_CTX - 1 - KLD_CTX / 2));
    // What is left is the file's 16-bit rounding of the log-probabilities.
    let k = &r.kld_percentiles;
    assert!(k.max <= SELF_KLD_BOUND && k.min >= -SELF_KLD_BOUND, "{k:?}");
    assert!(s.mean_kld.abs() < 1e-5, "mean KLD {}", s.mean_kld);
    assert_eq!(s.same_top_p, 1.0);
    let ppl = f32_base().1;
    assert!((s.ppl / ppl - 1.0).abs() < 1e-4, "{} vs {ppl}", s.ppl);
    assert!((s.ppl_ratio - 1.0).abs() < 1e-3, "{}", s.ppl_ratio);
}

#[test]
fn q8_activations_diverge_a_little_from_the_f32_base() {
    let r = compare(ActQuant::Q8);
    let s = &r.summary;
    eprintln!("q8 vs the f32 base: {s:?}");
    // 8-bit activations move every logit a little: measurably (0.004 here; over the whole
    // text at --ctx 512 the note of issue 13 compares it with llama.cpp's), but far from
    // what a different quantization of the weights does.
    assert!(
        s.mean_kld > 1e-4,
        "mean KLD {} (is q8 really on?)",
        s.mean_kld
    );
    assert!(s.mean_kld < 0.02, "mean KLD {}", s.mean_kld);
    assert!(s.same_top_p > 0.9, "same top {}", s.same_top_p);
    assert!(
        (s.ppl_ratio - 1.0).abs() < 0.03,
        "PPL ratio {}",
        s.ppl_ratio
    );
}

#[test]
fn truncated_or_foreign_base_files_are_errors() {
    let bytes = std::fs::read(&f32_base().0).unwrap();
    let path = temp("truncated.kld");
    std::fs::write(&path, &bytes[..bytes.len() - 100]).unwrap();
    let truncated = KlBase::open(&path)
        .err()
        .expect("a truncated file must not open");
    let truncated = truncated.to_string();
    assert!(truncated.contains("truncated"), "{truncated}");
    let foreign = KlBase::open(LICENSE)
        .err()
        .expect("a text file must not open");
    let foreign = foreign.to_string();
    assert!(foreign.contains("not a log-probability file"), "{foreign}");
}

/// The command line end to end: the base from `--activations f32`, the default path against
/// it as JSON, and the errors a user meets (no panics: exit code 1, a message).
#[test]
fn cli_writes_a_base_and_compares_against_it() {
    let text_path = temp("cli.txt");
    let base = temp("cli.kld");
    // Enough of the license for two chunks of 64 tokens.
    let text = std::fs::read_to_string(LICENSE).unwrap();
    std::fs::write(&text_path, &text[..2000]).unwrap();
    let model = smollm2();
    let wick = |args: &[&str]| {
        let mut all = vec![
            "perplexity",
            "--model",
            model.to_str().unwrap(),
            "--device",
            "cpu",
        ];
        all.extend_from_slice(args);
        Command::new(env!("CARGO_BIN_EXE_wick"))
            .args(&all)
            .output()
            .unwrap()
    };
    let (text_arg, base_arg) = (text_path.to_str().unwrap(), base.to_str().unwrap());
    let wrote = wick(&[
        "--file",
        text_arg,
        "--ctx",
        "64",
        "--activations",
        "f32",
        "--kl-divergence-base",
        base_arg,
        "--json",
    ]);
    let compared = wick(&[
        "--kl-divergence-base",
        base_arg,
        "--kl-divergence",
        "--json",
    ]);
    let wrong_ctx = wick(&[
        "--kl-divergence-base",
        base_arg,
        "--kl-divergence",
        "--ctx",
        "128",
    ]);
    let len = std::fs::metadata(&base).map(|m| m.len()).unwrap_or(0);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&base)
        .and_then(|f| f.set_len(len / 2))
        .unwrap();
    let truncated = wick(&["--kl-divergence-base", base_arg, "--kl-divergence"]);
    let _ = std::fs::remove_file(&base);
    let _ = std::fs::remove_file(&text_path);

    let stderr = |o: &std::process::Output| String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(wrote.status.success(), "{}", stderr(&wrote));
    let w: serde_json::Value = serde_json::from_slice(&wrote.stdout).unwrap();
    assert!(w["ppl"].as_f64().unwrap() > 1.0);
    assert!(compared.status.success(), "{}", stderr(&compared));
    let c: serde_json::Value = serde_json::from_slice(&compared.stdout).unwrap();
    for key in [
        "mean_kld",
        "kld_err",
        "same_top_p",
        "same_top_p_err",
        "ppl",
        "base_ppl",
        "ppl_ratio",
        "ln_ppl_ratio",
        "rms_dp",
        "mean_dp",
    ] {
        assert!(c[key].is_f64(), "{key} missing in {c}");
    }
    for key in ["max", "99.9", "99", "90", "median", "10", "1", "0.1", "min"] {
        assert!(
            c["kld_percentiles"][key].is_f64(),
            "kld_percentiles.{key} in {c}"
        );
    }
    assert_eq!(c["ctx"], 64);
    assert_eq!(c["chunks"], w["chunks"]);
    // The base's PPL read back from the file: at most the one the first run printed (lower
    // where a scored token lay more than 16 nats below the top: the file stores the floor).
    let (base_ppl, ppl) = (c["base_ppl"].as_f64().unwrap(), w["ppl"].as_f64().unwrap());
    assert!(
        base_ppl > 1.0 && base_ppl < ppl * 1.001,
        "{base_ppl} vs {ppl}"
    );
    assert!(c["mean_kld"].as_f64().unwrap() > 0.0);

    assert_eq!(wrong_ctx.status.code(), Some(1), "{}", stderr(&wrong_ctx));
    assert!(
        stderr(&wrong_ctx).contains("was computed with --ctx 64, not 128"),
        "{}",
        stderr(&wrong_ctx)
    );
    assert_eq!(truncated.status.code(), Some(1), "{}", stderr(&truncated));
    assert!(
        stderr(&truncated).contains("truncated"),
        "{}",
        stderr(&truncated)
    );
}
