//! Kernel throughput on the Qwen3-0.6B shapes: the decode dot products per weight format, the
//! interleaved 8-bit-activation kernels of the VNNI tiers (one token, as decode, and four, as
//! a prompt's tile) and the prefill tile, reported as weight bytes per second (criterion's
//! throughput). The weights fit in the L2 cache, so these are the kernels' compute rates,
//! the ceiling decode reaches when memory keeps up.
//!
//! `cargo bench --bench kernels`

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use wick::backend::cpu::isa::Isa;
use wick::backend::cpu::q8::{self, interleave::Interleaved, Q8Act, Q8KAct};
use wick::backend::cpu::qdot::{self, Q16Act};
use wick::backend::cpu::simd;
use wick::quant::DType;

fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// Weight bytes of `rows` rows of K elements in `dtype`, quantized from random values.
fn weights(dtype: DType, rows: usize, k: usize) -> Vec<u8> {
    let v = values(rows * k, 3);
    let mut out = vec![0u8; dtype.bytes_for(rows * k).unwrap()];
    match dtype {
        DType::Q8_0 => wick::quant::q8_0::quantize_row_ref(&v, &mut out),
        DType::Q4_0 => wick::quant::q4_0::quantize_row_ref(&v, &mut out),
        DType::Q4_K => wick::quant::q4_k::quantize_row_ref(&v, &mut out),
        DType::Q6_K => wick::quant::q6_k::quantize_row_ref(&v, &mut out),
        _ => unreachable!(),
    }
    out
}

fn decode_dots(c: &mut Criterion) {
    // gate_up of Qwen3-0.6B: 6144 rows × 1024.
    let (rows, k) = (6144, 1024);
    let mut g = c.benchmark_group("decode_dot");
    let mut x = Q16Act::default();
    x.quantize(&values(k, 9));
    for dtype in [DType::Q8_0, DType::Q4_0, DType::Q4_K, DType::Q6_K] {
        let w = weights(dtype, rows, k);
        let rb = dtype.bytes_for(k).unwrap();
        g.throughput(Throughput::Bytes(w.len() as u64));
        g.bench_with_input(BenchmarkId::from_parameter(dtype), &w, |b, w| {
            b.iter(|| {
                w.chunks_exact(rb)
                    .map(|r| qdot::dot(dtype, r, &x))
                    .sum::<f32>()
            })
        });
    }
    g.finish();
}

fn interleaved(c: &mut Criterion) {
    let isa = Isa::current();
    let Some(r) = q8::interleave_rows(isa) else {
        eprintln!("{isa} has no interleaved kernels: skipped");
        return;
    };
    let (rows, k) = (1024, 1024);
    let mut g = c.benchmark_group(format!("interleaved_{isa}"));
    for dtype in [DType::Q8_0, DType::Q4_0, DType::Q4_K, DType::Q6_K] {
        let w = Interleaved::new(dtype, &weights(dtype, rows, k), rows, k, r);
        for tokens in [1usize, 4] {
            let xs: Vec<Vec<f32>> = (0..tokens).map(|t| values(k, 9 + t as u64)).collect();
            let x8: Vec<Q8Act> = xs
                .iter()
                .map(|v| {
                    let mut q = Q8Act::default();
                    q.quantize(v);
                    q
                })
                .collect();
            let x8k: Vec<Q8KAct> = xs
                .iter()
                .map(|v| {
                    let mut q = Q8KAct::default();
                    q.quantize(v);
                    q
                })
                .collect();
            let mut out = vec![0.0f32; tokens * r];
            g.throughput(Throughput::Bytes(w.data.len() as u64));
            g.bench_function(BenchmarkId::new(dtype.to_string(), tokens), |b| {
                b.iter(|| {
                    for gi in 0..w.groups() {
                        if q8::interleaved_wants_q8k(dtype) {
                            q8::gemm_interleaved_k(isa, &w, gi, &x8k, &mut out);
                        } else {
                            q8::gemm_interleaved(isa, &w, gi, &x8, &mut out);
                        }
                    }
                    out[0]
                })
            });
        }
    }
    g.finish();
}

fn prefill_tile(c: &mut Criterion) {
    let k = 1024;
    let w: Vec<Vec<f32>> = (0..64).map(|i| values(k, i)).collect();
    let x: Vec<Vec<f32>> = (0..4).map(|i| values(k, 100 + i)).collect();
    let mut g = c.benchmark_group("prefill_tile");
    // 64 rows × 4 tokens × K multiply-adds.
    g.throughput(Throughput::Elements((64 * 4 * k) as u64));
    g.bench_function("dot2x4_f32", |b| {
        b.iter(|| {
            let xs = [&x[0][..], &x[1][..], &x[2][..], &x[3][..]];
            let mut s = 0.0;
            for pair in w.chunks_exact(2) {
                let v = simd::dot2x4_f32([&pair[0], &pair[1]], xs);
                s += v[0][0] + v[1][3];
            }
            s
        })
    });
    g.finish();
}

criterion_group!(benches, decode_dots, interleaved, prefill_tile);
criterion_main!(benches);
