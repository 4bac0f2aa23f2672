//! llama.cpp's GGUF files on the CPU backend against transformers' float32 references computed
//! on the exactly dequantized weights (`*.oracle.*`).
//!
//! Two activation precisions, each with its tolerance:
//! - 16-bit activations ([`ActQuant::Q16`]): the README's rule for f32 compute on exactly
//!   dequantized weights, 2e-3. Prompt processing widens the stored weights exactly to f32
//!   (error ~2e-5 here); decode steps quantize each activation row to 16 bits per block of 32
//!   (`backend::cpu::qdot`), which moves logits by at most ~1.3e-3 on these fixtures.
//! - 8-bit activations ([`ActQuant::Q8`], the default, as llama.cpp): the README's 0.1 for
//!   8-bit-quantized activations where it holds. The Q4_K_M fixture (hidden 256) moves
//!   further; its bound is what llama.cpp's own run of the same file gets against the same
//!   oracle (see [`Q8_TOL_Q4_K_M`]).

mod common;

use std::sync::Arc;

use common::*;
use wick::backend::cpu::{ActQuant, CpuBackend};
use wick::loader::checkpoint::Checkpoint;
use wick::model::Model;
use wick::session::{Session, SessionOptions, WantLogits};

/// 16-bit activations.
const TOL: f32 = 2e-3;
/// 8-bit activations: the README's bound for them.
const Q8_TOL: f32 = 0.1;
/// 8-bit activations on the Q4_K_M fixture: llama.cpp's own deviation from the oracle on
/// this file (measured through llama-server's top log-probabilities at the last prompt
/// position of each case; see the note in the module doc).
const Q8_TOL_Q4_K_M: f32 = 0.3;

fn session(file: &str, act: ActQuant) -> Session<CpuBackend> {
    let ckpt = Checkpoint::open_gguf(&fixture(file), file.into()).unwrap();
    let model = Model::load(
        CpuBackend::with_act(2, act).unwrap(),
        ckpt.config.clone(),
        &ckpt.tensors,
    )
    .unwrap();
    let opts = SessionOptions {
        max_model_len: 2048,
        ..Default::default()
    };
    Session::new(Arc::new(model), opts).unwrap()
}

fn check_file(stem: &str, act: ActQuant, tol: f32) {
    let oracle = Oracle::load(
        &format!("{stem}.oracle.json"),
        &format!("{stem}.oracle.safetensors"),
    );
    let mut s = session(&format!("{stem}.gguf"), act);
    let mut worst = (0.0f32, 0.0f32);
    for case in &oracle.cases {
        s.reset();
        let ids_k = oracle.topk_ids(&case.name);
        let logits_k = oracle.topk_logits(&case.name);
        let n = case.input_ids.len();
        let mut last = Vec::new();
        s.extend(&case.input_ids, WantLogits::All, |i, row| {
            check_topk(i, row, &ids_k[i], &logits_k[i], tol);
            if i + 1 == n {
                last = row.to_vec();
            }
        })
        .unwrap();
        let d = max_abs_diff(&last, &oracle.last_logits(&case.name));
        assert!(d <= tol, "{stem} {}: last logits max |Δ| {d}", case.name);
        // The same logits through the decode path (one token: row-by-row dot products).
        s.reuse_prefix(&case.input_ids);
        let mut decoded = Vec::new();
        s.extend(&case.input_ids[n - 1..], WantLogits::Last, |_, row| {
            decoded = row.to_vec()
        })
        .unwrap();
        let dq = max_abs_diff(&decoded, &oracle.last_logits(&case.name));
        assert!(
            dq <= tol,
            "{stem} {}: decode-path last logits max |Δ| {dq}",
            case.name
        );
        s.reuse_prefix(&case.input_ids);
        s.extend(&case.input_ids[n - 1..], WantLogits::Last, |_, _| {})
            .unwrap();
        let mut argmaxes = vec![argmax(&last)];
        for &id in &case.greedy_ids[..case.greedy_ids.len() - 1] {
            s.extend(&[id], WantLogits::Last, |_, row| argmaxes.push(argmax(row)))
                .unwrap();
        }
        let checked = check_greedy(case, &argmaxes, tol);
        eprintln!(
            "{stem} {act:?} {}: max |Δ| {d:.2e} prefill, {dq:.2e} decode; {checked} greedy steps checked",
            case.name
        );
        worst = (worst.0.max(d), worst.1.max(dq));
    }
    eprintln!(
        "{stem} {act:?}: worst max |Δ| {:.3e} prefill, {:.3e} decode (tolerance {tol})",
        worst.0, worst.1
    );
}

#[test]
fn qwen3_tiny_q8_0_matches_oracle() {
    check_file("qwen3-tiny-q8_0", ActQuant::Q16, TOL);
}

#[test]
fn qwen3_tiny_q4_0_matches_oracle() {
    check_file("qwen3-tiny-q4_0", ActQuant::Q16, TOL);
}

#[test]
fn qwen3_tiny256_q4_k_m_matches_oracle() {
    check_file("qwen3-tiny256-q4_k_m", ActQuant::Q16, TOL);
}

#[test]
fn qwen3_tiny_q8_0_with_8_bit_activations_matches_oracle() {
    check_file("qwen3-tiny-q8_0", ActQuant::Q8, Q8_TOL);
}

#[test]
fn qwen3_tiny_q4_0_with_8_bit_activations_matches_oracle() {
    check_file("qwen3-tiny-q4_0", ActQuant::Q8, Q8_TOL);
}

#[test]
fn qwen3_tiny256_q4_k_m_with_8_bit_activations_matches_oracle() {
    check_file("qwen3-tiny256-q4_k_m", ActQuant::Q8, Q8_TOL_Q4_K_M);
}
