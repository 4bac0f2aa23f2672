//! `out[T, N] (+)= x[T, K] · Wᵀ` for weights in any stored format, on the rayon pool.
//!
//! Work is split over the rows of W (output columns), so each thread streams its own slice
//! of the weights exactly once per step whatever T is: decode is bound by reading weights,
//! and prefill reuses each converted row for every token.
//!
//! Quantized weights with 8-bit activations ([`ActQuant::Q8`], [`q8`]): a decode step (up to
//! [`MAX_ROWS_Q8_DOT`] tokens) reads each row in its stored format, four tokens per unpacking;
//! a prompt chunk unpacks each group of rows once into an interleaved 8-bit scratch and runs
//! every token through it ([`q8::gemm`]) on tiers that have that kernel, and widens to f32
//! on the others. With 16-bit activations ([`ActQuant::Q16`], [`qdot`]) few tokens take the
//! integer path and more share rows widened to f32 in a per-thread scratch, four tokens at a
//! time; [`ActQuant::F32`] always widens.

use std::cell::RefCell;

use rayon::prelude::*;

use super::isa::Isa;
use super::q8::{self, Packed, Q8Act, Q8KAct};
use super::qdot::{self, Q16Act};
use super::simd;
use super::{ActQuant, CpuWeight};
use crate::quant::{dequantize_row, DType};

/// A raw output pointer that rayon jobs may share: each job writes a disjoint set of
/// elements (here, columns), so no element is written by two jobs.
#[derive(Clone, Copy)]
pub(super) struct OutPtr(pub(super) *mut f32);
// SAFETY: see above — jobs write disjoint elements and the owner waits for all of them.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// A method rather than a field access, so that closures capture the `Sync` wrapper.
    pub(super) fn get(self) -> *mut f32 {
        self.0
    }
}

thread_local! {
    /// Per-thread f32 copy of the weight rows being processed.
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// The calling thread's 16-bit copies of the activation rows.
    static XQ: RefCell<Vec<Q16Act>> = const { RefCell::new(Vec::new()) };
    /// The calling thread's 8-bit copies of the activation rows.
    static XQ8: RefCell<Vec<Q8Act>> = const { RefCell::new(Vec::new()) };
    /// The calling thread's per-256 8-bit copies, for the interleaved K-quant kernels.
    static XQ8K: RefCell<Vec<Q8KAct>> = const { RefCell::new(Vec::new()) };
    /// Per-thread packed weight rows and their results for one group ([`q8::gemm`]).
    static PACKED: RefCell<(Packed, Vec<f32>)> = RefCell::new(Default::default());
}

/// Up to this many activation rows take the row-by-row 8-bit dot products; more are a
/// prompt chunk and take the packed kernel where the tier has one.
pub const MAX_ROWS_Q8_DOT: usize = 8;

/// Fewer activation rows than this take the integer path for quantized weights; more share
/// widened f32 weight rows.
const MAX_ROWS_INTEGER_PATH: usize = 4;

/// Up to this many activation rows (a decode step of that many sequences) take the integer
/// path when every weight format widens a block once for four rows ([`qdot::has_dot4`]).
const MAX_ROWS_INTEGER_DOT4: usize = 16;

/// Rows of W handed to one job.
const MIN_ROWS_PER_JOB: usize = 16;

/// Quantizes the first `rows` activation rows of `x` (row stride `k`) into `buf`, reusing
/// its rows' buffers.
/// A prompt chunk's rows are quantized in parallel (in a decode step the fork would cost
/// more than the work).
fn quantize_rows<A: Default + Send>(
    buf: &mut Vec<A>,
    x: &[f32],
    rows: usize,
    k: usize,
    quantize: fn(&mut A, &[f32]),
) {
    buf.resize_with(rows, A::default);
    if rows > MAX_ROWS_Q8_DOT {
        buf.par_iter_mut()
            .zip(x.par_chunks_exact(k))
            .for_each(|(q, row)| quantize(q, row));
    } else {
        for (q, row) in buf.iter_mut().zip(x.chunks_exact(k)) {
            quantize(q, row);
        }
    }
}

/// Stores (or adds, when `accumulate`) `src` at `out[t, c..c + src.len()]` (row stride `n`).
///
/// # Safety
/// The elements written must lie inside `out` and belong to the calling job alone.
unsafe fn store_run(out: OutPtr, n: usize, t: usize, c: usize, src: &[f32], accumulate: bool) {
    let dst = std::slice::from_raw_parts_mut(out.get().add(t * n + c), src.len());
    if accumulate {
        for (o, v) in dst.iter_mut().zip(src) {
            *o += v;
        }
    } else {
        dst.copy_from_slice(src);
    }
}

/// Computes `out[t, n] = Σ_k x[t, k]·W[n, k]` (or adds it when `accumulate`) for `t < rows`.
/// `x` has row stride K = `w.cols`; `out` has row stride N = `w.rows`.
pub fn matmul(
    x: &[f32],
    w: &CpuWeight,
    rows: usize,
    out: &mut [f32],
    accumulate: bool,
    act: ActQuant,
) {
    let (n, k) = (w.rows, w.cols);
    assert!(
        x.len() >= rows * k && out.len() >= rows * n,
        "matmul buffers too small"
    );
    let threads = rayon::current_num_threads().max(1);
    // A multiple of 16 rows, so the packed kernels' groups are whole except at a part's end.
    let per_job = (n / (threads * 8))
        .max(MIN_ROWS_PER_JOB)
        .next_multiple_of(16);
    // (part, first row in part, row count, first output column)
    let mut jobs = Vec::with_capacity(n / per_job + w.parts.len());
    let mut col = 0;
    for (p, part) in w.parts.iter().enumerate() {
        let part_rows = part.rows_cols().0;
        let mut r = 0;
        while r < part_rows {
            let len = per_job.min(part_rows - r);
            jobs.push((p, r, len, col + r));
            r += len;
        }
        col += part_rows;
    }
    let out_ptr = OutPtr(out.as_mut_ptr());
    let isa = Isa::current();
    let all_q8 = w.parts.iter().all(|p| q8::supported(p.dtype));
    let all_interleaved = w.interleaved.iter().all(Option::is_some);
    if act == ActQuant::Q8
        && all_q8
        && (rows <= MAX_ROWS_Q8_DOT || q8::gemm_layout(isa).is_some() || all_interleaved)
    {
        let store = move |t: usize, c: usize, v: f32| {
            // SAFETY: t < rows and c < n, inside `out`; each job owns its columns.
            unsafe {
                let o = out_ptr.get().add(t * n + c);
                *o = if accumulate { *o + v } else { v };
            }
        };
        // The interleaved K-quants read per-256 activations, every other part per-32 ones;
        // each kind is quantized only if some part reads it.
        let reads_q8k = |p: usize| {
            w.interleaved[p]
                .as_ref()
                .is_some_and(|il| q8::interleaved_wants_q8k(il.dtype))
        };
        let need_q8k = (0..w.parts.len()).any(reads_q8k);
        let need_q8 = !(0..w.parts.len()).all(reads_q8k);
        XQ8.with(|xq| {
            XQ8K.with(|xqk| {
                let mut xq = xq.borrow_mut();
                let mut xqk = xqk.borrow_mut();
                if need_q8 {
                    quantize_rows(&mut xq, x, rows, k, Q8Act::quantize);
                }
                if need_q8k {
                    quantize_rows(&mut xqk, x, rows, k, Q8KAct::quantize);
                }
                // A kind no part reads is left as it was (its buffers are kept for reuse).
                let xq = &xq[..if need_q8 { rows } else { 0 }];
                let xqk = &xqk[..if need_q8k { rows } else { 0 }];
                jobs.par_iter().for_each(|&(p, r0, len, c0)| {
                    let part = &w.parts[p];
                    if let Some(il) = &w.interleaved[p] {
                        // Jobs start at multiples of 16 rows, so at group boundaries.
                        let r = il.r;
                        debug_assert!(r0.is_multiple_of(r));
                        let k_quant = reads_q8k(p);
                        PACKED.with(|pk| {
                            let (_, res) = &mut *pk.borrow_mut();
                            res.resize(rows * r, 0.0);
                            for g in (r0 / r)..(r0 + len).div_ceil(r) {
                                if k_quant {
                                    q8::gemm_interleaved_k(isa, il, g, xqk, res);
                                } else {
                                    q8::gemm_interleaved(isa, il, g, xq, res);
                                }
                                let gl = r.min(r0 + len - g * r);
                                for t in 0..rows {
                                    let src = &res[t * r..t * r + gl];
                                    // SAFETY: t < rows and the columns are this job's.
                                    unsafe {
                                        store_run(out_ptr, n, t, c0 - r0 + g * r, src, accumulate)
                                    };
                                }
                            }
                        });
                        return;
                    }
                    let row_bytes = part.dtype.bytes_for(k).expect("validated at load");
                    let data = &part.data.as_slice()[r0 * row_bytes..(r0 + len) * row_bytes];
                    if rows <= MAX_ROWS_Q8_DOT {
                        for (i, row) in data.chunks_exact(row_bytes).enumerate() {
                            let mut t = 0;
                            while t + 4 <= rows {
                                let x4 = [&xq[t], &xq[t + 1], &xq[t + 2], &xq[t + 3]];
                                for (j, v) in
                                    q8::dot4(isa, part.dtype, row, x4).into_iter().enumerate()
                                {
                                    store(t + j, c0 + i, v);
                                }
                                t += 4;
                            }
                            for (t, q) in xq.iter().enumerate().skip(t) {
                                store(t, c0 + i, q8::dot(isa, part.dtype, row, q));
                            }
                        }
                        return;
                    }
                    let (r, il, biased) = q8::gemm_layout(isa).expect("checked above");
                    PACKED.with(|pk| {
                        let (packed, res) = &mut *pk.borrow_mut();
                        res.resize(rows * r, 0.0);
                        let group: Vec<&[u8]> = Vec::with_capacity(r);
                        let mut group = group;
                        for g0 in (0..len).step_by(r) {
                            let gl = r.min(len - g0);
                            group.clear();
                            group.extend(
                                (g0..g0 + gl).map(|i| &data[i * row_bytes..(i + 1) * row_bytes]),
                            );
                            packed.pack(part.dtype, &group, k, r, il, biased);
                            q8::gemm(isa, packed, xq, res);
                            for t in 0..rows {
                                let src = &res[t * r..t * r + gl];
                                // SAFETY: t < rows and the columns are this job's.
                                unsafe { store_run(out_ptr, n, t, c0 + g0, src, accumulate) };
                            }
                        }
                    });
                });
            })
        });
        return;
    }
    let integer = act != ActQuant::F32
        && ((rows < MAX_ROWS_INTEGER_PATH && w.parts.iter().all(|p| qdot::supported(p.dtype)))
            || (rows <= MAX_ROWS_INTEGER_DOT4 && w.parts.iter().all(|p| qdot::has_dot4(p.dtype))));
    if integer {
        XQ.with(|xq| {
            let mut xq = xq.borrow_mut();
            xq.resize_with(rows, Q16Act::default);
            for (t, q) in xq.iter_mut().enumerate() {
                q.quantize(&x[t * k..(t + 1) * k]);
            }
            let xq = &*xq;
            jobs.par_iter().for_each(|&(p, r0, len, c0)| {
                let part = &w.parts[p];
                let row_bytes = part.dtype.bytes_for(k).expect("validated at load");
                let data = &part.data.as_slice()[r0 * row_bytes..(r0 + len) * row_bytes];
                let store = |t: usize, c: usize, v: f32| {
                    // SAFETY: as in the float path below.
                    unsafe {
                        let o = out_ptr.get().add(t * n + c);
                        *o = if accumulate { *o + v } else { v };
                    }
                };
                for (i, row) in data.chunks_exact(row_bytes).enumerate() {
                    // Four tokens at a time share the widening of each weight block.
                    let mut t = 0;
                    while t + 4 <= rows {
                        let x4 = [&xq[t], &xq[t + 1], &xq[t + 2], &xq[t + 3]];
                        for (j, v) in qdot::dot4(part.dtype, row, x4).into_iter().enumerate() {
                            store(t + j, c0 + i, v);
                        }
                        t += 4;
                    }
                    for (t, q) in xq.iter().enumerate().skip(t) {
                        store(t, c0 + i, qdot::dot(part.dtype, row, q));
                    }
                }
            });
        });
        return;
    }
    jobs.par_iter().for_each(|&(p, r0, len, c0)| {
        let part = &w.parts[p];
        let row_bytes = part.dtype.bytes_for(k).expect("validated at load");
        let data = &part.data.as_slice()[r0 * row_bytes..(r0 + len) * row_bytes];
        let store = |t: usize, c: usize, v: f32| {
            // SAFETY: t < rows and c < n, inside `out`; columns c0..c0+len belong to this job.
            unsafe {
                let p = out_ptr.get().add(t * n + c);
                if accumulate {
                    *p += v;
                } else {
                    *p = v;
                }
            }
        };
        if rows < 4 && !part.dtype.is_quantized() {
            for (i, row) in data.chunks_exact(row_bytes).enumerate() {
                for t in 0..rows {
                    let xt = &x[t * k..(t + 1) * k];
                    let v = match part.dtype {
                        DType::BF16 => simd::dot_bf16(xt, row),
                        DType::F16 => simd::dot_f16(xt, row),
                        DType::F32 => simd::dot_f32_bytes(xt, row),
                        _ => unreachable!(),
                    };
                    store(t, c0 + i, v);
                }
            }
            return;
        }
        SCRATCH.with(|s| {
            let mut s = s.borrow_mut();
            if s.len() < len * k {
                s.resize(len * k, 0.0);
            }
            for (i, row) in data.chunks_exact(row_bytes).enumerate() {
                widen(part.dtype, row, &mut s[i * k..(i + 1) * k]);
            }
            // Tokens outer, weight rows inner: four activation rows stay in L1 while the
            // widened rows (len × K floats, in L2) stream past them two at a time.
            let w_row = |i: usize| &s[i * k..(i + 1) * k];
            let mut t = 0;
            while t + 4 <= rows {
                let xs = [0, 1, 2, 3].map(|j| &x[(t + j) * k..(t + j + 1) * k]);
                let mut i = 0;
                while i + 2 <= len {
                    let v = simd::dot2x4_f32([w_row(i), w_row(i + 1)], xs);
                    for (r, vr) in v.into_iter().enumerate() {
                        for (j, vj) in vr.into_iter().enumerate() {
                            store(t + j, c0 + i + r, vj);
                        }
                    }
                    i += 2;
                }
                if i < len {
                    let v = simd::dot4_f32(w_row(i), xs);
                    for (j, vj) in v.into_iter().enumerate() {
                        store(t + j, c0 + i, vj);
                    }
                }
                t += 4;
            }
            for t in t..rows {
                for i in 0..len {
                    store(t, c0 + i, simd::dot_f32(w_row(i), &x[t * k..(t + 1) * k]));
                }
            }
        });
    });
}

/// Widens one stored row to f32.
fn widen(dtype: DType, src: &[u8], dst: &mut [f32]) {
    match dtype {
        DType::BF16 => simd::bf16_to_f32(src, dst),
        DType::F16 => simd::f16_to_f32(src, dst),
        _ => dequantize_row(dtype, src, dst),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loader::{Bytes, HostTensor};

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

    fn tensor(name: &str, dtype: DType, rows: usize, cols: usize, v: &[f32]) -> HostTensor {
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
            shape: vec![rows, cols],
            data: Bytes::from_vec(bytes),
        }
    }

    /// Naive reference over the dequantized weights.
    fn reference(x: &[f32], w: &[f32], t: usize, n: usize, k: usize) -> Vec<f32> {
        let mut out = vec![0.0; t * n];
        for i in 0..t {
            for j in 0..n {
                out[i * n + j] = (0..k).map(|l| x[i * k + l] * w[j * k + l]).sum();
            }
        }
        out
    }

    #[test]
    fn matches_reference_on_odd_shapes_and_stacked_parts() {
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            for &(t, n1, n2, k) in &[
                (1, 1, 7, 33),
                (3, 33, 1, 7),
                (7, 40, 17, 64),
                (5, 4097, 3, 9),
            ] {
                let w1 = tensor("a", dtype, n1, k, &values(n1 * k, 1));
                let w2 = tensor("b", dtype, n2, k, &values(n2 * k, 2));
                let w = CpuWeight::new(&[&w1, &w2]).unwrap();
                let x = values(t * k, 3);
                let mut dense = w1.to_f32();
                dense.extend(w2.to_f32());
                let want = reference(&x, &dense, t, n1 + n2, k);
                let mut out = vec![1.0; t * (n1 + n2)];
                matmul(&x, &w, t, &mut out, false, ActQuant::Q8);
                for (i, (a, b)) in out.iter().zip(&want).enumerate() {
                    assert!(
                        (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                        "{dtype} t={t} k={k} [{i}] {a} vs {b}"
                    );
                }
                // Accumulate adds onto what is there.
                let mut acc = vec![1.0; t * (n1 + n2)];
                matmul(&x, &w, t, &mut acc, true, ActQuant::Q8);
                for (a, b) in acc.iter().zip(&want) {
                    assert!((a - (b + 1.0)).abs() <= 1e-4 * (1.0 + b.abs()));
                }
            }
        }
    }

    /// A quantized `[rows, cols]` tensor from `v` (llama.cpp's reference quantizers).
    fn quantized(name: &str, dtype: DType, rows: usize, cols: usize, v: &[f32]) -> HostTensor {
        let row_bytes = dtype.bytes_for(cols).unwrap();
        let mut bytes = vec![0u8; rows * row_bytes];
        for (src, dst) in v.chunks_exact(cols).zip(bytes.chunks_exact_mut(row_bytes)) {
            match dtype {
                DType::Q8_0 => crate::quant::q8_0::quantize_row_ref(src, dst),
                DType::Q4_0 => crate::quant::q4_0::quantize_row_ref(src, dst),
                DType::Q4_1 => crate::quant::q4_1::quantize_row_ref(src, dst),
                DType::Q4_K => crate::quant::q4_k::quantize_row_ref(src, dst),
                DType::Q6_K => crate::quant::q6_k::quantize_row_ref(src, dst),
                DType::Q5_K => crate::quant::q5_k::quantize_row_ref(src, dst),
                _ => unreachable!(),
            }
        }
        HostTensor {
            name: name.into(),
            dtype,
            shape: vec![rows, cols],
            data: Bytes::from_vec(bytes),
        }
    }

    /// Every token count a decode step can have and prompt-sized ones, through the
    /// row-dot, four-row, packed and widened-f32 paths of every activation precision, against
    /// f32 math on the dequantized weights (for 8-bit activations: on the dequantized
    /// activations too, so the test sees kernel errors, not quantization noise).
    #[test]
    fn quantized_weights_match_reference_at_every_batch_size() {
        let (n1, n2, k) = (37, 5, 512);
        for (a, b) in [
            (DType::Q4_0, DType::Q6_K),
            (DType::Q8_0, DType::Q4_1),
            (DType::Q4_K, DType::Q6_K),
            (DType::Q5_K, DType::Q8_0),
        ] {
            let w1 = quantized("a", a, n1, k, &values(n1 * k, 1));
            let w2 = quantized("b", b, n2, k, &values(n2 * k, 2));
            let w = CpuWeight::new(&[&w1, &w2]).unwrap();
            // The same weight re-laid for this CPU's 8-bit kernels, where it has them.
            let mut wi = CpuWeight::new(&[&w1, &w2]).unwrap();
            wi.interleave(Isa::current());
            let mut dense = w1.to_f32();
            dense.extend(w2.to_f32());
            for act in [ActQuant::Q8, ActQuant::Q16, ActQuant::F32] {
                for t in (1..=MAX_ROWS_INTEGER_DOT4 + 2).chain([33, 40]) {
                    let mut x = values(t * k, 3 + t as u64);
                    if act == ActQuant::Q8 {
                        // Values on one grid per row, with ±127 steps in every block of 32:
                        // per-32 and per-256 quantization both give them back exactly.
                        for row in x.chunks_exact_mut(k) {
                            let mut q = Q8Act::default();
                            q.quantize(row);
                            let step = q.d.iter().fold(0.0f32, |m, &d| m.max(d));
                            for (i, v) in row.iter_mut().enumerate() {
                                let qi = if i % 32 == 0 {
                                    127.0
                                } else {
                                    (*v / step).round().clamp(-127.0, 127.0)
                                };
                                *v = qi * step;
                            }
                        }
                    }
                    let want = reference(&x, &dense, t, n1 + n2, k);
                    let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                    for (weight, layout) in [(&w, "stored"), (&wi, "interleaved")] {
                        let mut out = vec![0.0; t * (n1 + n2)];
                        matmul(&x, weight, t, &mut out, false, act);
                        for (i, (got, want)) in out.iter().zip(&want).enumerate() {
                            assert!(
                                (got - want).abs() <= 1e-3 * scale,
                                "{a}+{b} {act:?} {layout} t={t} [{i}]: {got} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }
}
