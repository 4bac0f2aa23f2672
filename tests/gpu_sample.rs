//! Sampling on the GPU (`shaders/sample.wgsl`) against the host algorithm
//! (`wick::backend::sample::sample_row`) given the same seeds, and `Model::forward_sample`
//! against `Model::forward` on the `qwen3-tiny` fixture.
//!
//! Logits reach a tensor through an F32 "embedding" table holding the rows, gathered with
//! token ids `0..R` (exact on both backends). Draws are an argmax of race scores, so the GPU
//! and the host agree unless two scores are within rounding of each other (about one draw in
//! a million); the seeds here are fixed, so a failure is a real difference.
//!
//! These tests need a GPU adapter; on a machine without one, Mesa's software Vulkan
//! (lavapipe) is enough. A test that finds no adapter FAILS. Set `WICK_SKIP_GPU_TESTS=1` to
//! skip them explicitly instead.

#![cfg(feature = "gpu")]

mod common;

use wick::backend::cpu::CpuBackend;
use wick::backend::sample::sample_row;
use wick::backend::wgpu::{WgpuBackend, WgpuOptions};
use wick::backend::{Backend, Batch, RowSampling, SeqSpan};
use wick::loader::{Bytes, HostTensor};
use wick::quant::DType;

fn gpu() -> Option<WgpuBackend> {
    if std::env::var_os("WICK_SKIP_GPU_TESTS").is_some_and(|v| v == "1") {
        eprintln!("WICK_SKIP_GPU_TESTS=1: skipping a GPU test");
        return None;
    }
    match WgpuBackend::new(&WgpuOptions::default()) {
        Ok(b) => {
            eprintln!("{}", b.describe());
            Some(b)
        }
        Err(e) => panic!(
            "no usable GPU adapter ({e}); install mesa-vulkan-drivers for lavapipe, or set \
             WICK_SKIP_GPU_TESTS=1 to skip GPU tests explicitly"
        ),
    }
}

/// Deterministic values in [0, 1).
fn uniforms(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 24) as f32
        })
        .collect()
}

/// `R` rows of logits `[R, V]` in a tensor of `b`, through an embedding of ids `0..R`.
fn logits_tensor<B: Backend>(b: &B, rows: &[f32], r: usize, vocab: usize) -> B::Tensor {
    let bytes: Vec<u8> = rows.iter().flat_map(|x| x.to_le_bytes()).collect();
    let table = HostTensor {
        name: "logits".into(),
        dtype: DType::F32,
        shape: vec![r, vocab],
        data: Bytes::from_vec(bytes),
    };
    let w = b.weight(&[&table]).unwrap();
    let batch = Batch {
        token_ids: (0..r as u32).collect(),
        positions: (0..r as u32).collect(),
        slot_mapping: (0..r as u32).collect(),
        seqs: vec![SeqSpan {
            start: 0,
            len: r as u32,
            context_len: r as u32,
            block_table: vec![0; r.div_ceil(16)],
        }],
        logits_rows: (0..r as u32).collect(),
    };
    batch.check(16).unwrap();
    let mut t = b.tensor(r, vocab);
    b.begin_step(&batch);
    b.embed(&w, &batch, &mut t);
    t
}

fn sample_on<B: Backend>(b: &B, rows: &[f32], vocab: usize, params: &[RowSampling]) -> Vec<u32> {
    let r = params.len();
    let t = logits_tensor(b, rows, r, vocab);
    let mut ids = vec![u32::MAX; r];
    b.sample(&t, r, params, &[], &mut ids);
    ids
}

fn host_ids(rows: &[f32], vocab: usize, params: &[RowSampling]) -> Vec<u32> {
    let mut scratch = Vec::new();
    rows.chunks_exact(vocab)
        .zip(params)
        .map(|(row, p)| sample_row(row, p, &mut scratch))
        .collect()
}

const VOCABS: [usize; 5] = [1, 7, 33, 4097, 151936];

#[test]
fn argmax_takes_the_lowest_id_among_ties_on_odd_vocab_sizes() {
    let Some(g) = gpu() else { return };
    let c = CpuBackend::new(2).unwrap();
    for vocab in VOCABS {
        let mut rows = Vec::new();
        let mut want = Vec::new();
        // Row 0: a tie of the maximum at two ids in different threads' strides (and, for
        // large V, a third one in the same stride as the second).
        // Row 1: NaN first and at the end, ties of the maximum among negative values, -inf.
        // Row 2: everything equal: id 0.
        // Row 3: every logit NaN: id 0 (as the host).
        for r in 0..4 {
            let mut row: Vec<f32> = uniforms(vocab, 10 + r as u64)
                .iter()
                .map(|u| u * 4.0 - 2.0)
                .collect();
            let expect = match r {
                0 => {
                    let (a, b) = (vocab * 2 / 3, vocab / 3 + 1);
                    for &i in &[a, b, b + 128] {
                        if i < vocab {
                            row[i] = 9.0;
                        }
                    }
                    a.min(b)
                }
                1 => {
                    for x in row.iter_mut() {
                        *x -= 10.0;
                    }
                    row[0] = f32::NAN;
                    row[vocab - 1] = f32::NAN;
                    if vocab > 2 {
                        row[1] = f32::NEG_INFINITY;
                    }
                    let best = (0..vocab)
                        .filter(|&i| !row[i].is_nan())
                        .max_by(|&i, &j| row[i].total_cmp(&row[j]).then(j.cmp(&i)));
                    if let Some(i) = best {
                        if vocab > 5 {
                            row[vocab - 2] = row[i];
                        }
                    }
                    best.unwrap_or(0)
                }
                2 => {
                    row.iter_mut().for_each(|x| *x = 0.5);
                    0
                }
                _ => {
                    row.iter_mut().for_each(|x| *x = f32::NAN);
                    0
                }
            };
            rows.extend_from_slice(&row);
            want.push(expect as u32);
        }
        let params = vec![RowSampling::greedy(); 4];
        let before = g.stats();
        let got = sample_on(&g, &rows, vocab, &params);
        let after = g.stats();
        assert_eq!(got, want, "gpu argmax, V = {vocab}");
        assert_eq!(host_ids(&rows, vocab, &params), want, "host, V = {vocab}");
        assert_eq!(
            sample_on(&c, &rows, vocab, &params),
            want,
            "cpu, V = {vocab}"
        );
        // The read-back is the 4 ids, not the logits.
        assert_eq!(after.readbacks - before.readbacks, 1);
        assert_eq!(after.readback_bytes - before.readback_bytes, 16);
    }
}

#[test]
fn seeded_draws_match_the_host_algorithm() {
    let Some(g) = gpu() else { return };
    let c = CpuBackend::new(2).unwrap();
    // (temperature, top_k, top_p, min_p): Qwen3's defaults, each filter alone, all of them,
    // none, and a top-k of 1 (greedy by another road).
    let settings: [(f32, u32, f32, f32); 7] = [
        (0.6, 20, 0.95, 0.0),
        (1.0, 0, 0.9, 0.0),
        (1.3, 50, 1.0, 0.0),
        (0.8, 0, 1.0, 0.05),
        (0.7, 40, 0.8, 0.02),
        (1.0, 0, 1.0, 0.0),
        (2.0, 1, 1.0, 0.0),
    ];
    let draws = 8;
    let mut compared = 0;
    let mut distinct = 0;
    for vocab in VOCABS {
        for (spread, quantized) in [(4.0f32, false), (12.0, true)] {
            // One row of logits repeated for every draw; quantized logits tie a lot, so the
            // top-k and top-p cuts fall inside runs of equal logits.
            let row: Vec<f32> = uniforms(vocab, vocab as u64 + spread as u64)
                .iter()
                .map(|u| {
                    let l = (u * 2.0 - 1.0) * spread;
                    if quantized {
                        (l * 2.0).round() / 2.0
                    } else {
                        l
                    }
                })
                .collect();
            let rows: Vec<f32> = (0..draws).flat_map(|_| row.iter().copied()).collect();
            for (si, &(t, k, p, m)) in settings.iter().enumerate() {
                let seeds = uniforms(draws, 1000 + si as u64 + vocab as u64);
                let params: Vec<RowSampling> = seeds
                    .iter()
                    .map(|&u| RowSampling::new(t, k, p, m, (u * 4294967296.0) as u32))
                    .collect();
                let want = host_ids(&rows, vocab, &params);
                let what = format!("V = {vocab}, spread {spread}, T {t} k {k} p {p} min_p {m}");
                assert_eq!(sample_on(&g, &rows, vocab, &params), want, "gpu, {what}");
                assert_eq!(sample_on(&c, &rows, vocab, &params), want, "cpu, {what}");
                // The draws are real draws: a top-k of k gives ids among the k best.
                if k > 0 {
                    let mut ranked: Vec<usize> = (0..vocab).collect();
                    ranked.sort_by(|&i, &j| row[j].total_cmp(&row[i]).then(i.cmp(&j)));
                    ranked.truncate(k as usize);
                    for id in &want {
                        assert!(
                            ranked.contains(&(*id as usize)),
                            "{what}: {id} not in top-k"
                        );
                    }
                }
                let mut uniq = want.clone();
                uniq.sort_unstable();
                uniq.dedup();
                distinct += uniq.len();
                compared += want.len();
            }
        }
    }
    // The draws do vary with the seed (a constant answer would pass the above).
    assert!(distinct > compared / 2, "{distinct} distinct of {compared}");
}

/// Token masks (a grammar's allowed tokens) on some rows: every backend draws only allowed
/// tokens, the same ones as the host draws from logits with the banned ones at -inf.
#[test]
fn masked_rows_draw_only_allowed_tokens() {
    let Some(g) = gpu() else { return };
    let c = CpuBackend::new(2).unwrap();
    for vocab in [33usize, 4097, 151936] {
        let words = wick::backend::sample::mask_words(vocab);
        let rows_n = 6;
        let rows: Vec<f32> = uniforms(vocab * rows_n, vocab as u64)
            .iter()
            .map(|u| (u * 2.0 - 1.0) * 6.0)
            .collect();
        // Mask 0 allows a scattered few tokens, mask 1 exactly one; rows 1 and 4 unmasked.
        let allow0: Vec<usize> = (0..vocab).filter(|i| i % 7 == 3).collect();
        let allow1 = [vocab - 1];
        let mut masks = vec![0u32; 2 * words];
        for &i in &allow0 {
            masks[i / 32] |= 1 << (i % 32);
        }
        for &i in &allow1 {
            masks[words + i / 32] |= 1 << (i % 32);
        }
        let seeds = uniforms(rows_n, 77 + vocab as u64);
        let params: Vec<RowSampling> = seeds
            .iter()
            .enumerate()
            .map(|(i, &u)| {
                let mut p = if i % 3 == 2 {
                    RowSampling::greedy()
                } else {
                    RowSampling::new(0.9, 20, 0.95, 0.0, (u * 4294967296.0) as u32)
                };
                p.mask = match i {
                    0 | 2 | 3 => 0,
                    5 => 1,
                    _ => wick::backend::sample::NO_MASK,
                };
                p
            })
            .collect();
        // The host reference: banned logits at -inf, then the one algorithm.
        let mut banned = rows.clone();
        for (i, p) in params.iter().enumerate() {
            if p.mask != wick::backend::sample::NO_MASK {
                let m = &masks[p.mask as usize * words..(p.mask as usize + 1) * words];
                wick::backend::sample::apply_mask(&mut banned[i * vocab..(i + 1) * vocab], m);
            }
        }
        let want = host_ids(&banned, vocab, &params);
        for (i, id) in want.iter().enumerate() {
            match params[i].mask {
                0 => assert!(allow0.contains(&(*id as usize)), "row {i}: {id}"),
                1 => assert_eq!(*id as usize, vocab - 1),
                _ => {}
            }
        }
        for (name, ids) in [
            ("gpu", masked_sample_on(&g, &rows, vocab, &params, &masks)),
            ("cpu", masked_sample_on(&c, &rows, vocab, &params, &masks)),
        ] {
            assert_eq!(ids, want, "{name}, V = {vocab}");
        }
    }
}

fn masked_sample_on<B: Backend>(
    b: &B,
    rows: &[f32],
    vocab: usize,
    params: &[RowSampling],
    masks: &[u32],
) -> Vec<u32> {
    let r = params.len();
    let t = logits_tensor(b, rows, r, vocab);
    let mut ids = vec![u32::MAX; r];
    b.sample(&t, r, params, masks, &mut ids);
    ids
}

/// Greedy decoding of the `qwen3-tiny` fixture: `forward_sample` gives the argmax of
/// `forward`'s logits, with one read-back of 4 bytes per step.
#[test]
fn forward_sample_decodes_like_forward_with_one_small_readback() {
    use std::sync::Arc;
    use wick::config::ModelConfig;
    use wick::loader::safetensors::load_dir;
    use wick::model::Model;

    let Some(g) = gpu() else { return };
    let dir = common::fixture("qwen3-tiny");
    let config = ModelConfig::from_file(&dir.join("config.json")).unwrap();
    let tensors = load_dir(&dir).unwrap();
    let vocab = config.vocab_size;
    let m = Model::load(g, config, &tensors).unwrap();
    let m = Arc::new(m.with_kv_dtype(wick::backend::KvDtype::F32));
    let bs = 16;
    let steps = 12;
    let prompt = [9707u32, 11, 1879, 0, 358];
    let total = prompt.len() + steps;
    let table: Vec<u32> = (0..total.div_ceil(bs) as u32).rev().collect();
    let batch_at = |ids: &[u32], cached: usize| {
        let t = ids.len();
        let ctx = cached + t;
        Batch {
            token_ids: ids.to_vec(),
            positions: (cached..ctx).map(|p| p as u32).collect(),
            slot_mapping: (cached..ctx)
                .map(|p| table[p / bs] * bs as u32 + (p % bs) as u32)
                .collect(),
            seqs: vec![SeqSpan {
                start: 0,
                len: t as u32,
                context_len: ctx as u32,
                block_table: table.clone(),
            }],
            logits_rows: vec![t as u32 - 1],
        }
    };
    let run = |sampled: bool| -> Vec<u32> {
        let mut state = m.run_state(prompt.len(), 1);
        let mut cache = m.kv_cache(m.kv_layout(table.len(), bs)).unwrap();
        let (mut logits, mut ids) = (Vec::new(), Vec::new());
        let mut out = Vec::new();
        let mut next = prompt.to_vec();
        let mut cached = 0;
        for _ in 0..steps {
            let batch = batch_at(&next, cached);
            cached += next.len();
            let before = m.backend().stats();
            let id = if sampled {
                m.forward_sample(
                    &mut state,
                    &mut cache,
                    &batch,
                    &[RowSampling::greedy()],
                    &[],
                    &mut ids,
                );
                ids[0]
            } else {
                m.forward(&mut state, &mut cache, &batch, &mut logits);
                assert_eq!(logits.len(), vocab);
                sample_row(&logits, &RowSampling::greedy(), &mut Vec::new())
            };
            let after = m.backend().stats();
            assert_eq!(after.readbacks - before.readbacks, 1);
            let bytes = if sampled { 4 } else { 4 * vocab as u64 };
            assert_eq!(after.readback_bytes - before.readback_bytes, bytes);
            out.push(id);
            next = vec![id];
        }
        out
    };
    let sampled = run(true);
    let read = run(false);
    assert_eq!(sampled, read);
    eprintln!("greedy ids: {sampled:?}");
}
