//! Every op of the GPU backend against the CPU backend (the reference), on odd shapes.
//!
//! Inputs reach a tensor the only way the `Backend` trait allows: an F32 "embedding" table
//! holding the input rows, gathered with token ids `0..T` (exact on both backends). Outputs
//! are compared with a mixed tolerance `|gpu - cpu| ≤ atol + rtol·|cpu|`.
//!
//! These tests need a GPU adapter; on a machine without one, Mesa's software Vulkan
//! (lavapipe, `apt-get install mesa-vulkan-drivers`) is enough. A test that finds no
//! adapter FAILS. Set `WICK_SKIP_GPU_TESTS=1` to skip them explicitly instead (CI does not).

#![cfg(feature = "gpu")]

use wick::backend::cpu::{ActQuant, CpuBackend};
use wick::backend::wgpu::{SharedDevice, WgpuBackend, WgpuOptions};
use wick::backend::{AttentionDims, Backend, Batch, KvDtype, KvLayout, SeqSpan};
use wick::loader::{Bytes, HostTensor};
use wick::quant::DType;

/// The GPU backend with `opts`, or `None` when GPU tests are explicitly skipped.
fn gpu_with(opts: WgpuOptions) -> Option<WgpuBackend> {
    if std::env::var_os("WICK_SKIP_GPU_TESTS").is_some_and(|v| v == "1") {
        eprintln!("WICK_SKIP_GPU_TESTS=1: skipping a GPU test");
        return None;
    }
    match WgpuBackend::new(&opts) {
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

fn gpu() -> Option<WgpuBackend> {
    gpu_with(WgpuOptions::default())
}

/// The reference: 16-bit activations, within about 1e-4 of f32 math (the GPU's).
fn cpu() -> CpuBackend {
    CpuBackend::with_act(2, ActQuant::Q16).unwrap()
}

/// Deterministic values in [-1, 1).
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn host(name: &str, dtype: DType, shape: &[usize], v: &[f32]) -> HostTensor {
    let bytes: Vec<u8> = match dtype {
        DType::F32 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        DType::F16 => v
            .iter()
            .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
            .collect(),
        DType::BF16 => v
            .iter()
            .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
            .collect(),
        _ => unreachable!(),
    };
    HostTensor {
        name: name.into(),
        dtype,
        shape: shape.to_vec(),
        data: Bytes::from_vec(bytes),
    }
}

/// One sequence of `t` new tokens after `cached` cached ones, blocks of 16 in reverse order
/// (so that block tables matter).
fn one_seq(t: usize, cached: usize) -> Batch {
    let ctx = cached + t;
    let blocks = ctx.div_ceil(16);
    let table: Vec<u32> = (0..blocks as u32).rev().collect();
    let slot = |p: usize| table[p / 16] * 16 + (p % 16) as u32;
    let b = Batch {
        token_ids: (0..t as u32).collect(),
        positions: (cached..ctx).map(|p| p as u32).collect(),
        slot_mapping: (cached..ctx).map(slot).collect(),
        seqs: vec![SeqSpan {
            start: 0,
            len: t as u32,
            context_len: ctx as u32,
            block_table: table.clone(),
        }],
        logits_rows: vec![t as u32 - 1],
    };
    b.check(16).unwrap();
    b
}

/// `x[T, C]` filled with `v` through an embedding of token ids 0..T.
fn fill<B: Backend>(b: &B, batch: &Batch, v: &[f32], cols: usize, cap: usize) -> B::Tensor {
    let t = batch.num_tokens();
    assert_eq!(v.len(), t * cols);
    let table = b
        .weight(&[&host("input", DType::F32, &[t, cols], v)])
        .unwrap();
    let mut x = b.tensor(cap.max(t), cols);
    b.embed(&table, batch, &mut x);
    x
}

fn read<B: Backend>(b: &B, t: &B::Tensor, rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0; rows * cols];
    b.read(t, rows, &mut out);
    out
}

#[track_caller]
/// Relative tolerance of attention outputs against the CPU's: with an f16 cache both round
/// keys and values to half precision, but the GPU's `pack2x16float` may round a value the
/// other way than the CPU's round-to-nearest-even when it lies near a tie.
fn kv_tol(dtype: KvDtype) -> f32 {
    match dtype {
        KvDtype::F32 => 1e-4,
        KvDtype::F16 => 2e-3,
    }
}

fn assert_close(what: &str, gpu: &[f32], cpu: &[f32], atol: f32, rtol: f32) {
    assert_eq!(gpu.len(), cpu.len(), "{what}: lengths");
    let mut worst = (0.0f32, 0usize);
    for (i, (g, c)) in gpu.iter().zip(cpu).enumerate() {
        let excess = (g - c).abs() - (atol + rtol * c.abs());
        assert!(!g.is_nan(), "{what}: NaN at {i}");
        if excess > worst.0 {
            worst = (excess, i);
        }
    }
    let i = worst.1;
    assert!(
        worst.0 <= 0.0,
        "{what}: [{i}] gpu {} vs cpu {} (|Δ| {})",
        gpu[i],
        cpu[i],
        (gpu[i] - cpu[i]).abs()
    );
}

fn embed_run<B: Backend>(b: &B, table: &HostTensor, batch: &Batch, cols: usize) -> Vec<f32> {
    let t = batch.num_tokens();
    let w = b.weight(&[table]).unwrap();
    let mut x = b.tensor(t, cols);
    b.begin_step(batch);
    b.embed(&w, batch, &mut x);
    read(b, &x, t, cols)
}

#[test]
fn embed_gathers_rows_of_every_dtype_and_across_segments() {
    // Segments of at most 1 KiB: the 4097-row table is split into many buffers.
    let Some(g) = gpu_with(WgpuOptions {
        max_segment_bytes: Some(1024),
        ..Default::default()
    }) else {
        return;
    };
    let c = cpu();
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        for &(vocab, cols) in &[(4097usize, 33usize), (7, 1), (33, 64)] {
            let table_v = values(vocab * cols, 5);
            let table = host("embed", dtype, &[vocab, cols], &table_v);
            let ids: Vec<u32> = [0, vocab - 1, vocab / 2, 1 % vocab, vocab - 1, 3 % vocab, 0]
                .iter()
                .map(|&i| i as u32)
                .collect();
            let mut batch = one_seq(ids.len(), 0);
            batch.token_ids = ids;
            assert_eq!(
                embed_run(&g, &table, &batch, cols),
                embed_run(&c, &table, &batch, cols),
                "{dtype} {vocab}×{cols}"
            );
        }
    }
}

fn rms_norm_run<B: Backend>(b: &B, rows: usize, cols: usize) -> Vec<f32> {
    let batch = one_seq(rows, 0);
    b.begin_step(&batch);
    let x = fill(b, &batch, &values(rows * cols, 1), cols, rows);
    let w = b
        .weight(&[&host("norm", DType::BF16, &[cols], &values(cols, 2))])
        .unwrap();
    let mut out = b.tensor(rows, cols);
    b.rms_norm(&x, &w, 1e-6, rows, &mut out);
    read(b, &out, rows, cols)
}

#[test]
fn rms_norm_matches_cpu() {
    let Some(g) = gpu() else { return };
    let c = cpu();
    for &(rows, cols) in &[(1, 7), (7, 33), (33, 4097), (2, 1)] {
        assert_close(
            &format!("rms_norm {rows}×{cols}"),
            &rms_norm_run(&g, rows, cols),
            &rms_norm_run(&c, rows, cols),
            1e-5,
            1e-4,
        );
    }
}

/// `out = x · Wᵀ` (and then `out += x2 · Wᵀ`) with W stacked from two parts.
fn matmul_run<B: Backend>(b: &B, t: usize, parts: &[HostTensor], k: usize) -> Vec<f32> {
    let n: usize = parts.iter().map(|p| p.shape[0]).sum();
    let batch = one_seq(t, 0);
    let w = b.weight(&parts.iter().collect::<Vec<_>>()).unwrap();
    b.begin_step(&batch);
    let x = fill(b, &batch, &values(t * k, 3), k, t);
    let x2 = fill(b, &batch, &values(t * k, 4), k, t);
    let mut out = b.tensor(t, n);
    b.matmul(&x, &w, t, &mut out);
    let first = read(b, &out, t, n);
    b.begin_step(&batch);
    b.matmul_add(&x2, &w, t, &mut out);
    let mut both = first;
    both.extend(read(b, &out, t, n));
    both
}

#[test]
fn matmul_and_matmul_add_match_cpu_on_odd_shapes() {
    let Some(g) = gpu() else { return };
    let c = cpu();
    let shapes: &[(usize, usize, usize, usize)] = &[
        // (T, N1, N2, K)
        (1, 1, 7, 33),
        (3, 33, 1, 7),
        (1, 4097, 3, 64),
        (7, 40, 17, 64),
        (33, 7, 33, 4097),
        (70, 130, 3, 33),
    ];
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        for &(t, n1, n2, k) in shapes {
            let parts = [
                host("a", dtype, &[n1, k], &values(n1 * k, 1)),
                host("b", dtype, &[n2, k], &values(n2 * k, 2)),
            ];
            assert_close(
                &format!("matmul {dtype} T={t} N={n1}+{n2} K={k}"),
                &matmul_run(&g, t, &parts, k),
                &matmul_run(&c, t, &parts, k),
                1e-4,
                1e-4,
            );
        }
    }
}

#[test]
fn matmul_splits_large_weights_and_mixes_formats() {
    // 2 KiB segments: a 4097×33 f16 weight becomes ~67 buffers, one dispatch each.
    let Some(g) = gpu_with(WgpuOptions {
        max_segment_bytes: Some(2048),
        ..Default::default()
    }) else {
        return;
    };
    let c = cpu();
    for &(t, k) in &[(1usize, 33usize), (9, 33), (2, 64)] {
        let parts = [
            host("q", DType::F16, &[4097, k], &values(4097 * k, 7)),
            host("k", DType::BF16, &[5, k], &values(5 * k, 8)),
            host("v", DType::F32, &[33, k], &values(33 * k, 9)),
        ];
        let w = g.weight(&parts.iter().collect::<Vec<_>>()).unwrap();
        assert!(w.num_segments() > 3, "{} segments", w.num_segments());
        assert_close(
            &format!("split matmul T={t} K={k}"),
            &matmul_run(&g, t, &parts, k),
            &matmul_run(&c, t, &parts, k),
            1e-4,
            1e-4,
        );
    }
}

#[test]
fn matmul_without_subgroups_matches_cpu() {
    let Some(g) = gpu_with(WgpuOptions {
        allow_subgroups: false,
        allow_f16: false,
        ..Default::default()
    }) else {
        return;
    };
    assert!(!g.uses_subgroups());
    let c = cpu();
    for dtype in [DType::F16, DType::BF16] {
        let parts = [host("a", dtype, &[129, 4097], &values(129 * 4097, 1))];
        for t in [1, 4] {
            assert_close(
                &format!("plain matmul {dtype} T={t}"),
                &matmul_run(&g, t, &parts, 4097),
                &matmul_run(&c, t, &parts, 4097),
                1e-4,
                1e-4,
            );
        }
    }
}

fn dims(h: usize, hkv: usize, d: usize) -> AttentionDims {
    AttentionDims {
        num_heads: h,
        num_kv_heads: hkv,
        head_dim: d,
        rope_theta: 1_000_000.0,
        eps: 1e-6,
    }
}

fn qk_norm_rope_run<B: Backend>(
    b: &B,
    batch: &Batch,
    dims: AttentionDims,
    norms: bool,
) -> Vec<f32> {
    let (t, w, d) = (batch.num_tokens(), dims.qkv_width(), dims.head_dim);
    let qn = b
        .weight(&[&host("q_norm", DType::BF16, &[d], &values(d, 11))])
        .unwrap();
    let kn = b
        .weight(&[&host("k_norm", DType::BF16, &[d], &values(d, 12))])
        .unwrap();
    b.begin_step(batch);
    let mut qkv = fill(b, batch, &values(t * w, 10), w, t);
    if norms {
        b.qk_norm_rope(&mut qkv, Some(&qn), Some(&kn), dims, batch);
    } else {
        b.qk_norm_rope(&mut qkv, None, None, dims, batch);
    }
    read(b, &qkv, t, w)
}

#[test]
fn qk_norm_rope_matches_cpu_at_long_positions() {
    let Some(g) = gpu() else { return };
    let c = cpu();
    for &(h, hkv, d) in &[(4, 2, 32), (2, 1, 128), (3, 3, 8)] {
        for &(t, cached) in &[(1, 0), (7, 1500), (33, 4097)] {
            let batch = one_seq(t, cached);
            for norms in [true, false] {
                assert_close(
                    &format!("qk_norm_rope H={h} Hkv={hkv} D={d} T={t}+{cached} norms={norms}"),
                    &qk_norm_rope_run(&g, &batch, dims(h, hkv, d), norms),
                    &qk_norm_rope_run(&c, &batch, dims(h, hkv, d), norms),
                    1e-5,
                    1e-5,
                );
            }
        }
    }
}

/// Two sequences: a prompt chunk each (written to the cache and attended), then one decode
/// token each on top. Returns both steps' attention outputs.
fn attention_run<B: Backend>(
    b: &B,
    dims: AttentionDims,
    lens: [usize; 2],
    dtype: KvDtype,
) -> Vec<f32> {
    let (w, hd) = (dims.qkv_width(), dims.num_heads * dims.head_dim);
    let bs = 16;
    let layout = KvLayout {
        num_layers: 2,
        num_blocks: 2 * (lens[0] + lens[1]).div_ceil(bs) + 4,
        block_size: bs,
        num_kv_heads: dims.num_kv_heads,
        head_dim: dims.head_dim,
        dtype,
    };
    let mut cache = b.kv_cache(layout).unwrap();
    // Interleaved block tables so that sequences share no block and tables matter.
    let tables: Vec<Vec<u32>> = (0..2)
        .map(|s| {
            (0..(lens[s] + 1).div_ceil(bs) as u32)
                .map(|i| 2 * i + s as u32 + 2)
                .rev()
                .collect()
        })
        .collect();
    let slot = |s: usize, p: usize| tables[s][p / bs] * bs as u32 + (p % bs) as u32;
    let mut outs = Vec::new();
    for step in 0..2 {
        let mut batch = Batch::default();
        for s in 0..2 {
            let (from, to) = if step == 0 {
                (0, lens[s])
            } else {
                (lens[s], lens[s] + 1)
            };
            batch.seqs.push(SeqSpan {
                start: batch.token_ids.len() as u32,
                len: (to - from) as u32,
                context_len: to as u32,
                block_table: tables[s].clone(),
            });
            for p in from..to {
                batch.token_ids.push(batch.token_ids.len() as u32);
                batch.positions.push(p as u32);
                batch.slot_mapping.push(slot(s, p));
            }
        }
        batch.logits_rows = vec![0];
        batch.check(bs).unwrap();
        let t = batch.num_tokens();
        b.begin_step(&batch);
        let mut qkv = fill(b, &batch, &values(t * w, 20 + step as u64), w, t);
        b.qk_norm_rope(&mut qkv, None, None, dims, &batch);
        // Layer 1, so that per-layer pools are told apart.
        b.kv_write(&qkv, &mut cache, 1, dims, &batch);
        let mut out = b.tensor(t, hd);
        b.attention(&qkv, &cache, 1, dims, &batch, &mut out);
        outs.extend(read(b, &out, t, hd));
    }
    outs
}

#[test]
fn kv_write_and_attention_match_cpu() {
    let Some(g) = gpu() else { return };
    let c = cpu();
    for dtype in [KvDtype::F32, KvDtype::F16] {
        for &(h, hkv, d) in &[(4, 2, 32), (2, 1, 128), (3, 3, 8), (2, 2, 256)] {
            for lens in [[1, 7], [33, 70], [130, 1]] {
                assert_close(
                    &format!("attention H={h} Hkv={hkv} D={d} lens={lens:?} {dtype}"),
                    &attention_run(&g, dims(h, hkv, d), lens, dtype),
                    &attention_run(&c, dims(h, hkv, d), lens, dtype),
                    1e-5,
                    kv_tol(dtype),
                );
            }
        }
    }
}

/// Two sequences: a prompt chunk each, then two decode tokens each, every step through
/// `qk_norm_rope_kv_write_attention` (the GPU folds it into one dispatch for the decode
/// steps, and the second decode step attends to keys the first one wrote from inside the
/// folded kernel). Returns every step's attention output.
fn folded_attention_run<B: Backend>(
    b: &B,
    dims: AttentionDims,
    lens: [usize; 2],
    norms: bool,
    dtype: KvDtype,
) -> Vec<f32> {
    let (w, hd, d) = (
        dims.qkv_width(),
        dims.num_heads * dims.head_dim,
        dims.head_dim,
    );
    let bs = 16;
    let layout = KvLayout {
        num_layers: 2,
        num_blocks: 2 * (lens[0] + lens[1] + 2).div_ceil(bs) + 4,
        block_size: bs,
        num_kv_heads: dims.num_kv_heads,
        head_dim: d,
        dtype,
    };
    let mut cache = b.kv_cache(layout).unwrap();
    let qn = b
        .weight(&[&host("q_norm", DType::BF16, &[d], &values(d, 41))])
        .unwrap();
    let kn = b
        .weight(&[&host("k_norm", DType::BF16, &[d], &values(d, 42))])
        .unwrap();
    let (qn, kn) = if norms {
        (Some(&qn), Some(&kn))
    } else {
        (None, None)
    };
    let tables: Vec<Vec<u32>> = (0..2)
        .map(|s| {
            (0..(lens[s] + 2).div_ceil(bs) as u32)
                .map(|i| 2 * i + s as u32 + 2)
                .rev()
                .collect()
        })
        .collect();
    let slot = |s: usize, p: usize| tables[s][p / bs] * bs as u32 + (p % bs) as u32;
    let mut outs = Vec::new();
    for step in 0..3 {
        let mut batch = Batch::default();
        for s in 0..2 {
            let (from, to) = if step == 0 {
                (0, lens[s])
            } else {
                (lens[s] + step - 1, lens[s] + step)
            };
            batch.seqs.push(SeqSpan {
                start: batch.token_ids.len() as u32,
                len: (to - from) as u32,
                context_len: to as u32,
                block_table: tables[s].clone(),
            });
            for p in from..to {
                batch.token_ids.push(batch.token_ids.len() as u32);
                batch.positions.push(p as u32);
                batch.slot_mapping.push(slot(s, p));
            }
        }
        batch.logits_rows = vec![0];
        batch.check(bs).unwrap();
        let t = batch.num_tokens();
        b.begin_step(&batch);
        let mut qkv = fill(b, &batch, &values(t * w, 50 + step as u64), w, t);
        let mut out = b.tensor(t, hd);
        b.qk_norm_rope_kv_write_attention(&mut qkv, qn, kn, &mut cache, 1, dims, &batch, &mut out);
        outs.extend(read(b, &out, t, hd));
    }
    outs
}

#[test]
fn folded_decode_attention_matches_cpu_ops() {
    let Some(g) = gpu() else { return };
    let c = cpu();
    for dtype in [KvDtype::F32, KvDtype::F16] {
        for &(h, hkv, d) in &[(4, 2, 32), (6, 2, 8), (3, 3, 128), (2, 1, 256)] {
            for lens in [[1, 7], [33, 70], [130, 1]] {
                for norms in [true, false] {
                    let what = format!(
                        "folded attention H={h} Hkv={hkv} D={d} lens={lens:?} norms={norms} {dtype}"
                    );
                    let before = g.stats().dispatches;
                    let got = folded_attention_run(&g, dims(h, hkv, d), lens, norms, dtype);
                    // Prefill: embed + the three separate ops; each decode step: embed + one.
                    assert_eq!(
                        g.stats().dispatches - before,
                        4 + 2 + 2,
                        "{what}: dispatches"
                    );
                    let want = folded_attention_run(&c, dims(h, hkv, d), lens, norms, dtype);
                    assert_close(&what, &got, &want, 1e-5, kv_tol(dtype));
                }
            }
        }
    }
}

/// Flash-decoding: decode steps over contexts longer than the split span spread each
/// (token, head) over several workgroups and combine them in a second pass. Contexts of 1,
/// 33, 1000 and 4097 tokens (and one more and two more in the decode steps), paired so that
/// one sequence of a step may have fewer splits than the other, or none.
#[test]
fn split_decode_attention_matches_cpu_on_long_contexts() {
    let Some(g) = gpu_with(WgpuOptions {
        decode_split: 64,
        ..Default::default()
    }) else {
        return;
    };
    let c = cpu();
    for dtype in [KvDtype::F32, KvDtype::F16] {
        for &(h, hkv, d) in &[(4, 2, 32), (2, 1, 128)] {
            for lens in [[1, 1], [1, 33], [1000, 33], [4097, 1000]] {
                let what = format!("split attention H={h} Hkv={hkv} D={d} lens={lens:?} {dtype}");
                let before = g.stats().dispatches;
                let got = folded_attention_run(&g, dims(h, hkv, d), lens, true, dtype);
                let dispatches = g.stats().dispatches - before;
                let want = folded_attention_run(&c, dims(h, hkv, d), lens, true, dtype);
                assert_close(&what, &got, &want, 1e-5, kv_tol(dtype));
                // A decode step over more than 64 positions: embed, the folded kernel split,
                // the reduction; otherwise embed and the folded kernel. Prefill (step 0) is
                // never split: embed + three ops, or for a step of single tokens, two.
                let decode = |ctx: usize| if ctx > 64 { 3 } else { 2 };
                let prefill = if lens == [1, 1] { 2 } else { 4 };
                let longest = lens[0].max(lens[1]);
                let want_dispatches = prefill + decode(longest + 1) + decode(longest + 2);
                assert_eq!(dispatches, want_dispatches as u64, "{what}: dispatches");
                // The unfolded op splits too (for adapters with fewer than 8 storage buffers).
                assert_close(
                    &format!("{what}, unfolded"),
                    &attention_run(&g, dims(h, hkv, d), lens, dtype),
                    &attention_run(&c, dims(h, hkv, d), lens, dtype),
                    1e-5,
                    kv_tol(dtype),
                );
            }
        }
    }
}

fn silu_gather_run<B: Backend>(b: &B, rows: usize, f: usize) -> Vec<f32> {
    let mut batch = one_seq(rows, 0);
    batch.logits_rows = (0..rows as u32).rev().step_by(2).collect();
    b.begin_step(&batch);
    let gu: Vec<f32> = values(rows * 2 * f, 30).iter().map(|v| v * 8.0).collect();
    let gate_up = fill(b, &batch, &gu, 2 * f, rows);
    let mut act = b.tensor(rows, f);
    b.silu_mul(&gate_up, rows, &mut act);
    let r = batch.logits_rows.len();
    let mut kept = b.tensor(r, f);
    b.gather_rows(&act, &batch, &mut kept);
    let mut out = read(b, &act, rows, f);
    out.extend(read(b, &kept, r, f));
    out
}

#[test]
fn silu_mul_and_gather_rows_match_cpu() {
    let Some(g) = gpu() else { return };
    let c = cpu();
    for &(rows, f) in &[(1, 7), (7, 33), (33, 4097)] {
        assert_close(
            &format!("silu_mul/gather_rows {rows}×{f}"),
            &silu_gather_run(&g, rows, f),
            &silu_gather_run(&c, rows, f),
            1e-5,
            1e-5,
        );
    }
}

#[test]
fn a_step_is_one_submit_and_one_readback() {
    let Some(g) = gpu() else { return };
    let batch = one_seq(3, 0);
    let parts = [host("a", DType::BF16, &[40, 64], &values(40 * 64, 1))];
    let w = g.weight(&[&parts[0]]).unwrap();
    g.begin_step(&batch);
    let x = fill(&g, &batch, &values(3 * 64, 2), 64, 3);
    let mut out = g.tensor(3, 40);
    let before = g.stats();
    g.matmul(&x, &w, 3, &mut out);
    g.matmul_add(&x, &w, 3, &mut out);
    let mut host_out = vec![0.0; 3 * 40];
    g.read(&out, 3, &mut host_out);
    let after = g.stats();
    assert_eq!(after.dispatches - before.dispatches, 2);
    assert_eq!(after.readbacks - before.readbacks, 1);
    assert_eq!(after.submits - before.submits, 1);
    // A step that reads nothing is submitted when the next one begins.
    g.begin_step(&batch);
    g.matmul(&x, &w, 3, &mut out);
    g.begin_step(&batch);
    assert_eq!(g.stats().submits - after.submits, 1);
    assert_eq!(g.stats().readbacks, after.readbacks);
}

#[test]
fn bad_adapter_choice_is_an_error() {
    if std::env::var_os("WICK_SKIP_GPU_TESTS").is_some_and(|v| v == "1") {
        return;
    }
    let err = WgpuBackend::new(&WgpuOptions {
        adapter: Some("no such adapter anywhere".into()),
        ..Default::default()
    })
    .err()
    .expect("an unknown adapter name must fail");
    assert!(err.to_string().contains("no adapter named like"), "{err}");
    assert!(!wick::backend::wgpu::list_adapters().is_empty());
}

/// Block formats the GPU reads, with the byte offsets of their f16 scale fields in a block.
const QUANT_FORMATS: [(DType, &[usize]); 6] = [
    (DType::Q8_0, &[0]),
    (DType::Q4_0, &[0]),
    (DType::Q4_1, &[0, 2]),
    (DType::Q4_K, &[0, 2]),
    (DType::Q5_K, &[0, 2]),
    (DType::Q6_K, &[208]),
];

/// A `[rows, cols]` tensor of `dtype` with random quants and sub-block scales and small f16
/// super-scales, and the same weights dequantized exactly by the scalar reference, as F32.
fn quant_host(name: &str, dtype: DType, rows: usize, cols: usize, seed: u64) -> [HostTensor; 2] {
    let scale_offsets = QUANT_FORMATS.iter().find(|f| f.0 == dtype).unwrap().1;
    let n_bytes = dtype.bytes_for(rows * cols).unwrap();
    let mut bytes: Vec<u8> = values(n_bytes, seed)
        .iter()
        .map(|v| ((v + 1.0) * 128.0) as u8)
        .collect();
    let scales = values(n_bytes / dtype.block_bytes() * 2, seed + 1);
    for (b, block) in bytes.chunks_exact_mut(dtype.block_bytes()).enumerate() {
        for (i, &o) in scale_offsets.iter().enumerate() {
            let d = half::f16::from_f32(scales[2 * b + i] * 0.004);
            block[o..o + 2].copy_from_slice(&d.to_le_bytes());
        }
    }
    let mut dense = vec![0.0f32; rows * cols];
    wick::quant::dequantize_row(dtype, &bytes, &mut dense);
    [
        HostTensor {
            name: name.into(),
            dtype,
            shape: vec![rows, cols],
            data: Bytes::from_vec(bytes),
        },
        host(name, DType::F32, &[rows, cols], &dense),
    ]
}

/// Quantized weights on the GPU against the CPU backend on the exactly dequantized weights
/// (f32 both sides, so only summation order differs), through the matrix-vector kernel
/// (T ≤ 4) and the tiled one, with two parts of different formats stacked (as `Q4_K_M`
/// stacks Q4_K q/k with a Q6_K v).
#[test]
fn quantized_matmul_matches_cpu_on_odd_shapes() {
    let Some(g) = gpu() else { return };
    let c = cpu();
    // (T, N1, N2, K)
    let shapes: &[(usize, usize, usize, usize)] = &[
        (1, 1, 7, 256),
        (3, 33, 1, 512),
        (1, 4097, 7, 256),
        (9, 7, 33, 256),
        (70, 33, 1, 512),
    ];
    for (dtype, _) in QUANT_FORMATS {
        let other = if dtype == DType::Q6_K {
            DType::Q8_0
        } else {
            DType::Q6_K
        };
        for &(t, n1, n2, k) in shapes {
            let [qa, fa] = quant_host("a", dtype, n1, k, 1);
            let [qb, fb] = quant_host("b", other, n2, k, 2);
            assert_close(
                &format!("matmul {dtype}+{other} T={t} N={n1}+{n2} K={k}"),
                &matmul_run(&g, t, &[qa, qb], k),
                &matmul_run(&c, t, &[fa, fb], k),
                1e-4,
                1e-4,
            );
        }
    }
}

#[test]
fn quantized_matmul_splits_large_weights() {
    // 16 KiB segments: a 4097×256 Q4_0 weight (160 bytes a row) becomes 41 buffers.
    let Some(g) = gpu_with(WgpuOptions {
        max_segment_bytes: Some(16 << 10),
        allow_subgroups: false,
        allow_f16: false,
        ..Default::default()
    }) else {
        return;
    };
    let c = cpu();
    for dtype in [DType::Q4_0, DType::Q4_K, DType::Q6_K] {
        let [q, f] = quant_host("w", dtype, 4097, 256, 3);
        assert!(g.weight(&[&q]).unwrap().num_segments() > 4);
        for t in [1, 7] {
            assert_close(
                &format!("split matmul {dtype} T={t}"),
                &matmul_run(&g, t, std::slice::from_ref(&q), 256),
                &matmul_run(&c, t, std::slice::from_ref(&f), 256),
                1e-4,
                1e-4,
            );
        }
    }
}

#[test]
fn quantized_embed_matches_dequantized_table_across_segments() {
    let Some(g) = gpu_with(WgpuOptions {
        max_segment_bytes: Some(8 << 10),
        ..Default::default()
    }) else {
        return;
    };
    let c = cpu();
    for (dtype, _) in QUANT_FORMATS {
        for &(vocab, cols) in &[(4097usize, 256usize), (7, 512), (1, 256)] {
            let [q, f] = quant_host("embed", dtype, vocab, cols, 5);
            let ids: Vec<u32> = [0, vocab - 1, vocab / 2, 1 % vocab, vocab - 1, 3 % vocab, 0]
                .iter()
                .map(|&i| i as u32)
                .collect();
            let mut batch = one_seq(ids.len(), 0);
            batch.token_ids = ids;
            // Dequantization is exact on both sides: equal bits.
            assert_eq!(
                embed_run(&g, &q, &batch, cols),
                embed_run(&c, &f, &batch, cols),
                "{dtype} {vocab}×{cols}"
            );
        }
    }
}

/// `rms_norm_matmul` then `silu_mul_matmul_add` (the folded decode kernels below 5 tokens,
/// the separate ops above), for a float and a block-quantized weight.
fn fused_run<B: Backend>(b: &B, t: usize, w1: &HostTensor, w2: &HostTensor) -> Vec<f32> {
    let (n, k) = (w1.shape[0], w1.shape[1]);
    assert_eq!(w2.shape, [k, n / 2]);
    let batch = one_seq(t, 0);
    let w1 = b.weight(&[w1]).unwrap();
    let w2 = b.weight(&[w2]).unwrap();
    let norm = b
        .weight(&[&host("norm", DType::BF16, &[k], &values(k, 2))])
        .unwrap();
    b.begin_step(&batch);
    let x = fill(b, &batch, &values(t * k, 3), k, t);
    let mut res = fill(b, &batch, &values(t * k, 4), k, t);
    let (mut xn, mut gu, mut act) = (b.tensor(t, k), b.tensor(t, n), b.tensor(t, n / 2));
    b.rms_norm_matmul(&x, &norm, 1e-6, &w1, t, &mut xn, &mut gu);
    b.silu_mul_matmul_add(&gu, &w2, t, &mut act, &mut res);
    let mut out = read(b, &gu, t, n);
    out.extend(read(b, &res, t, k));
    out
}

#[test]
fn folded_norm_and_swiglu_products_match_cpu() {
    let Some(g) = gpu() else { return };
    let c = cpu();
    for t in [1, 3, 4, 7] {
        let (k, f) = (256, 66);
        let w1 = host("gu", DType::BF16, &[2 * f, k], &values(2 * f * k, 5));
        let w2 = host("down", DType::F16, &[k, f], &values(k * f, 6));
        assert_close(
            &format!("folded float T={t}"),
            &fused_run(&g, t, &w1, &w2),
            &fused_run(&c, t, &w1, &w2),
            1e-4,
            1e-4,
        );
        let [q1, f1] = quant_host("gu", DType::Q4_K, 2 * 64, k, 7);
        let [q2, f2] = quant_host("down", DType::Q8_0, k, 64, 8);
        assert_close(
            &format!("folded quantized T={t}"),
            &fused_run(&g, t, &q1, &q2),
            &fused_run(&c, t, &f1, &f2),
            1e-3,
            1e-4,
        );
    }
}

/// The attention output of a one-token context is that token's value as the cache holds it:
/// with an f16 cache, the value rounded to half precision (to nearest, ties to even). Exact
/// on the CPU and with the GPU's integer packing; within one half ulp with `pack2x16float`.
fn single_token_attention<B: Backend>(b: &B, v: &[f32]) -> Vec<f32> {
    let d = v.len();
    let dims = dims(2, 1, d);
    let w = dims.qkv_width();
    let layout = KvLayout {
        num_layers: 1,
        num_blocks: 1,
        block_size: 16,
        num_kv_heads: 1,
        head_dim: d,
        dtype: KvDtype::F16,
    };
    let mut cache = b.kv_cache(layout).unwrap();
    let batch = one_seq(1, 0);
    let mut row = values(w, 77);
    row[w - d..].copy_from_slice(v);
    b.begin_step(&batch);
    let qkv = fill(b, &batch, &row, w, 1);
    b.kv_write(&qkv, &mut cache, 0, dims, &batch);
    let mut out = b.tensor(1, 2 * d);
    b.attention(&qkv, &cache, 0, dims, &batch, &mut out);
    read(b, &out, 1, 2 * d)
}

#[test]
fn f16_kv_cache_rounds_to_half_precision() {
    // Ties in both directions, a half subnormal, values that round up into the next binade.
    let mut v = vec![
        1.0 + 2f32.powi(-11),
        1.0 + 3.0 * 2f32.powi(-11),
        -3.0e-6,
        2047.75,
        0.1,
        -65000.0,
        std::f32::consts::PI,
        -1.0e-8,
    ];
    v.extend(values(24, 5));
    let want: Vec<f32> = v
        .iter()
        .chain(&v)
        .map(|x| half::f16::from_f32(*x).to_f32())
        .collect();
    assert_eq!(single_token_attention(&cpu(), &v), want, "cpu");
    let Some(g) = gpu_with(WgpuOptions {
        allow_f16: false,
        ..Default::default()
    }) else {
        return;
    };
    assert_eq!(single_token_attention(&g, &v), want, "gpu, integer packing");
    let g = gpu().expect("as above");
    assert_close(
        "gpu",
        &single_token_attention(&g, &v),
        &want,
        0.0,
        2f32.powi(-11),
    );
}

/// A device opened as an application would, on the adapter `gpu()` found.
fn app_device() -> (wgpu::Adapter, wgpu::Device, wgpu::Queue) {
    let instance =
        wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
    let adapter = pollster::block_on(instance.enumerate_adapters(wgpu::Backends::PRIMARY))
        .into_iter()
        .next()
        .expect("the adapter gpu() found");
    let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
        label: Some("the app's device"),
        required_limits: adapter.limits(),
        ..Default::default()
    }))
    .unwrap();
    (adapter, device, queue)
}

/// An application that already has a wgpu device hands it to wick instead of wick opening a
/// second one; wick's kernels run on it, and the application's own work on the same device
/// goes on beside them.
#[test]
fn runs_on_a_device_the_application_opened() {
    if gpu().is_none() {
        return;
    }
    let (adapter, device, queue) = app_device();
    let g = WgpuBackend::new(&WgpuOptions {
        device: Some(SharedDevice {
            adapter,
            device: device.clone(),
            queue: queue.clone(),
        }),
        ..WgpuOptions::default()
    })
    .unwrap();
    let (t, n, k) = (3, 40, 64);
    let parts = [host("w", DType::F32, &[n, k], &values(n * k, 9))];
    assert_close(
        "matmul on the app's device",
        &matmul_run(&g, t, &parts, k),
        &matmul_run(&cpu(), t, &parts, k),
        1e-4,
        1e-4,
    );
    assert!(g.stats().dispatches > 0);
    // The application's own buffer on the same device still works.
    let buf = device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("app"),
        size: 256,
        usage: wgpu::BufferUsages::COPY_DST | wgpu::BufferUsages::MAP_READ,
        mapped_at_creation: false,
    });
    queue.write_buffer(&buf, 0, &[7u8; 256]);
    queue.submit([]);
    buf.slice(..).map_async(wgpu::MapMode::Read, |r| r.unwrap());
    device.poll(wgpu::PollType::wait_indefinitely()).unwrap();
    let view = buf.slice(..).get_mapped_range().unwrap();
    assert!(view.iter().all(|&b| b == 7));
}

/// `GpuStats::memory_bytes` (what `/metrics` reports as `wick_gpu_memory_bytes`) is every
/// byte of the buffers wick holds: on a device only wick uses, it matches the device
/// allocator's own count of live allocations, and it rises with the KV cache and falls when
/// the engine goes.
#[test]
fn gpu_memory_counts_every_buffer_wick_holds() {
    if gpu().is_none() {
        return;
    }
    use std::sync::atomic::AtomicBool;
    use wick::runtime::{Device, Runtime, RuntimeOptions};
    let (adapter, device, queue) = app_device();
    let allocated = |device: &wgpu::Device| {
        device.poll(wgpu::PollType::wait_indefinitely()).unwrap();
        let r = device
            .generate_allocator_report()
            .expect("the Vulkan backend reports its allocations");
        // wgpu's own buffers (staging for buffers filled at creation, zero-initialisation)
        // are named so; the rest are the buffers wick created, named by their labels.
        r.allocations
            .iter()
            .filter(|a| !a.name.starts_with("(wgpu internal)"))
            .map(|a| a.size)
            .sum::<u64>()
    };
    let model =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures/qwen3-tiny");
    let mut rt = Runtime::load(
        model.to_str().unwrap(),
        &RuntimeOptions {
            device: Device::Gpu,
            gpu_device: Some(SharedDevice {
                adapter,
                device: device.clone(),
                queue,
            }),
            max_model_len: 256,
            ..RuntimeOptions::default()
        },
    )
    .unwrap();
    let weights_only = rt.gpu_stats().unwrap().memory_bytes;
    assert!(
        weights_only >= rt.weight_bytes(),
        "{weights_only} < {}",
        rt.weight_bytes()
    );
    let within = |ours: u64, theirs: u64, what: &str| {
        // The allocator rounds each allocation up to its alignment.
        let slack = theirs / 100 + (64 << 10);
        assert!(
            ours <= theirs && theirs - ours <= slack,
            "{what}: wick counts {ours} bytes, the allocator holds {theirs}"
        );
    };
    within(weights_only, allocated(&device), "after loading");

    let params = wick::sampler::SamplingParams::greedy();
    rt.generate(
        vec![1, 2, 3, 4],
        false,
        &params,
        &AtomicBool::new(false),
        &mut |_| {},
    )
    .unwrap();
    let running = rt.gpu_stats().unwrap().memory_bytes;
    assert!(running > weights_only, "the KV cache and activations count");
    within(running, allocated(&device), "with an engine running");

    rt.reset();
    let after = rt.gpu_stats().unwrap().memory_bytes;
    assert!(
        after < running,
        "the engine's buffers are given back: {after} ≥ {running}"
    );
    within(after, allocated(&device), "after reset");
}
