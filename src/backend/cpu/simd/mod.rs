//! Dot products and row conversions of f32, f16 and bf16 data, with SIMD versions for the
//! tier [`Isa::current`] names.
//!
//! Every function has a scalar twin (`*_scalar`) that is the reference the SIMD versions are
//! tested against. The tier is detected once; the per-call check is one load of a
//! `OnceLock`, negligible next to a dot product of a model row. x86-64 bodies are in
//! `x86` (AVX2 and AVX-512), aarch64's in `arm` (NEON).

#[cfg(target_arch = "aarch64")]
mod arm;

use super::isa::Isa;

/// Whether the x86 SIMD kernels run (AVX2 + FMA + F16C or better, and not disabled with
/// `WICK_ISA`/`WICK_NO_SIMD=1`).
pub fn has_avx2() -> bool {
    Isa::current().is_x86()
}

/// Whether the AVX-512 bodies run.
pub fn has_avx512() -> bool {
    Isa::current() == Isa::Avx512
}

/// Whether the NEON bodies run.
pub fn has_neon() -> bool {
    Isa::current().is_arm()
}

/// Name of the kernels in use, for `describe()`.
pub fn isa_name() -> &'static str {
    Isa::current().name()
}

/// `Σ a[i]·b[i]`.
pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    #[cfg(target_arch = "x86_64")]
    if has_avx512() {
        // SAFETY: the CPU has the AVX-512 tier's features.
        return unsafe { x86::dot_f32_avx512(a, b) };
    }
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU supports the features the function is compiled for.
        return unsafe { x86::dot_f32(a, b) };
    }
    #[cfg(target_arch = "aarch64")]
    if has_neon() {
        // SAFETY: the CPU has NEON (every aarch64 CPU does).
        return unsafe { arm::dot_f32(a, b) };
    }
    dot_f32_scalar(a, b)
}

/// Scalar reference of [`dot_f32`].
pub fn dot_f32_scalar(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// `y[i] += a · x[i]`.
pub fn axpy_f32(y: &mut [f32], a: f32, x: &[f32]) {
    debug_assert_eq!(y.len(), x.len());
    #[cfg(target_arch = "x86_64")]
    if has_avx512() {
        // SAFETY: the CPU has the AVX-512 tier's features.
        return unsafe { x86::axpy_f32_avx512(y, a, x) };
    }
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: as above.
        return unsafe { x86::axpy_f32(y, a, x) };
    }
    #[cfg(target_arch = "aarch64")]
    if has_neon() {
        // SAFETY: the CPU has NEON (every aarch64 CPU does).
        return unsafe { arm::axpy_f32(y, a, x) };
    }
    axpy_f32_scalar(y, a, x)
}

/// Scalar reference of [`axpy_f32`].
pub fn axpy_f32_scalar(y: &mut [f32], a: f32, x: &[f32]) {
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi += a * xi;
    }
}

/// `y += Σ_j a[j] · x[j]` for the rows `x[j] = x[j·n .. (j+1)·n]`, `n = y.len()`: a run of
/// [`axpy_f32`]s that keeps `y` in registers across the rows instead of loading and storing
/// it once per row (attention's weighted sum of a block of value rows).
pub fn axpy_rows_f32(y: &mut [f32], a: &[f32], x: &[f32]) {
    assert!(x.len() >= a.len() * y.len(), "axpy_rows: too few rows");
    #[cfg(target_arch = "x86_64")]
    if has_avx512() {
        // SAFETY: the CPU has the AVX-512 tier's features.
        return unsafe { x86::axpy_rows_f32_avx512(y, a, x) };
    }
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: as above.
        return unsafe { x86::axpy_rows_f32(y, a, x) };
    }
    #[cfg(target_arch = "aarch64")]
    if has_neon() {
        // SAFETY: the CPU has NEON (every aarch64 CPU does).
        return unsafe { arm::axpy_rows_f32(y, a, x) };
    }
    axpy_rows_f32_scalar(y, a, x)
}

/// [`axpy_rows_f32`] for two outputs at once over the same rows: `y[..n] += Σ_j a0[j]·x[j]`
/// and `y[n..] += Σ_j a1[j]·x[j]` (`n = y.len() / 2`), each row of `x` loaded once for both.
pub fn axpy_rows_x2_f32(y: &mut [f32], a0: &[f32], a1: &[f32], x: &[f32]) {
    let n = y.len() / 2;
    assert!(y.len() == 2 * n && a0.len() == a1.len() && x.len() >= a0.len() * n);
    #[cfg(target_arch = "x86_64")]
    if n.is_multiple_of(64) && has_avx512() {
        // SAFETY: the CPU has the AVX-512 tier's features; the sizes are asserted above.
        return unsafe { x86::axpy_rows_x2_f32_avx512(y, a0, a1, x) };
    }
    let (y0, y1) = y.split_at_mut(n);
    axpy_rows_f32(y0, a0, x);
    axpy_rows_f32(y1, a1, x);
}

/// Scalar reference of [`axpy_rows_f32`].
pub fn axpy_rows_f32_scalar(y: &mut [f32], a: &[f32], x: &[f32]) {
    let n = y.len();
    for (j, &aj) in a.iter().enumerate() {
        axpy_f32_scalar(y, aj, &x[j * n..(j + 1) * n]);
    }
}

/// Four dot products of one row `w` with four activation rows, sharing the loads of `w`.
pub fn dot4_f32(w: &[f32], x: [&[f32]; 4]) -> [f32; 4] {
    #[cfg(target_arch = "x86_64")]
    if has_avx512() {
        // SAFETY: the CPU has the AVX-512 tier's features.
        return unsafe { x86::dot4_f32_avx512(w, x) };
    }
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: as above.
        return unsafe { x86::dot4_f32(w, x) };
    }
    #[cfg(target_arch = "aarch64")]
    if has_neon() {
        // SAFETY: the CPU has NEON (every aarch64 CPU does).
        return unsafe { arm::dot4_f32(w, x) };
    }
    x.map(|xi| dot_f32_scalar(w, xi))
}

/// Eight dot products: two weight rows with four activation rows (a 2×4 register tile:
/// six loads feed eight FMAs).
pub fn dot2x4_f32(w: [&[f32]; 2], x: [&[f32]; 4]) -> [[f32; 4]; 2] {
    #[cfg(target_arch = "x86_64")]
    if has_avx512() {
        // SAFETY: the CPU has the AVX-512 tier's features.
        return unsafe { x86::dot2x4_f32_avx512(w, x) };
    }
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: as above.
        return unsafe { x86::dot2x4_f32(w, x) };
    }
    #[cfg(target_arch = "aarch64")]
    if has_neon() {
        // SAFETY: the CPU has NEON (every aarch64 CPU does).
        return unsafe { arm::dot2x4_f32(w, x) };
    }
    w.map(|wr| x.map(|xi| dot_f32_scalar(wr, xi)))
}

/// `Σ x[i]·bf16(w[2i..2i+2])`, the weight row stored as little-endian bf16 bytes.
pub fn dot_bf16(x: &[f32], w: &[u8]) -> f32 {
    debug_assert_eq!(w.len(), 2 * x.len());
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: as above.
        return unsafe { x86::dot_bf16(x, w) };
    }
    #[cfg(target_arch = "aarch64")]
    if has_neon() {
        // SAFETY: the CPU has NEON (every aarch64 CPU does).
        return unsafe { arm::dot_bf16(x, w) };
    }
    dot_bf16_scalar(x, w)
}

/// Scalar reference of [`dot_bf16`].
pub fn dot_bf16_scalar(x: &[f32], w: &[u8]) -> f32 {
    x.iter()
        .zip(w.chunks_exact(2))
        .map(|(a, b)| a * half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
        .sum()
}

/// `Σ x[i]·f16(w[2i..2i+2])`.
pub fn dot_f16(x: &[f32], w: &[u8]) -> f32 {
    debug_assert_eq!(w.len(), 2 * x.len());
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: as above.
        return unsafe { x86::dot_f16(x, w) };
    }
    #[cfg(target_arch = "aarch64")]
    if has_neon() {
        // SAFETY: the CPU has NEON (every aarch64 CPU does).
        return unsafe { arm::dot_f16(x, w) };
    }
    dot_f16_scalar(x, w)
}

/// Scalar reference of [`dot_f16`].
pub fn dot_f16_scalar(x: &[f32], w: &[u8]) -> f32 {
    x.iter()
        .zip(w.chunks_exact(2))
        .map(|(a, b)| a * half::f16::from_le_bytes([b[0], b[1]]).to_f32())
        .sum()
}

/// `Σ x[i]·f32(w[4i..4i+4])` for an f32 row given as (possibly unaligned) bytes.
pub fn dot_f32_bytes(x: &[f32], w: &[u8]) -> f32 {
    debug_assert_eq!(w.len(), 4 * x.len());
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: as above.
        return unsafe { x86::dot_f32_bytes(x, w) };
    }
    #[cfg(target_arch = "aarch64")]
    if has_neon() {
        // SAFETY: the CPU has NEON (every aarch64 CPU does).
        return unsafe { arm::dot_f32_bytes(x, w) };
    }
    x.iter()
        .zip(w.chunks_exact(4))
        .map(|(a, b)| a * f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .sum()
}

/// Converts a bf16 row to f32.
pub fn bf16_to_f32(src: &[u8], dst: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: as above.
        return unsafe { x86::bf16_to_f32(src, dst) };
    }
    #[cfg(target_arch = "aarch64")]
    if has_neon() {
        // SAFETY: the CPU has NEON (every aarch64 CPU does).
        return unsafe { arm::bf16_to_f32(src, dst) };
    }
    crate::quant::dequantize_row(crate::quant::DType::BF16, src, dst)
}

/// Converts an f16 row to f32.
pub fn f16_to_f32(src: &[u8], dst: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx512() {
        // SAFETY: the CPU has the AVX-512 tier's features.
        return unsafe { x86::f16_to_f32_avx512(src, dst) };
    }
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: as above.
        return unsafe { x86::f16_to_f32(src, dst) };
    }
    #[cfg(target_arch = "aarch64")]
    if has_neon() {
        // SAFETY: the CPU has NEON (every aarch64 CPU does).
        return unsafe { arm::f16_to_f32(src, dst) };
    }
    crate::quant::dequantize_row(crate::quant::DType::F16, src, dst)
}

/// `x ← softmax(x)` in place (max-subtracted, so any finite scores are safe).
pub fn softmax(x: &mut [f32]) {
    if x.is_empty() {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if has_avx512() {
        // SAFETY: the CPU has the AVX-512 tier's features.
        return unsafe { x86::softmax_avx512(x) };
    }
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: as above.
        return unsafe { x86::softmax_avx2(x) };
    }
    softmax_scalar(x)
}

/// `out[i] = silu(g[i]) · u[i]` (SwiGLU's gate), `silu(g) = g / (1 + e^−g)`.
pub fn silu_mul(g: &[f32], u: &[f32], out: &mut [f32]) {
    debug_assert!(g.len() == u.len() && u.len() == out.len());
    #[cfg(target_arch = "x86_64")]
    if has_avx512() {
        // SAFETY: the CPU has the AVX-512 tier's features.
        return unsafe { x86::silu_mul_avx512(g, u, out) };
    }
    silu_mul_scalar(g, u, out)
}

/// Scalar reference of [`silu_mul`].
pub fn silu_mul_scalar(g: &[f32], u: &[f32], out: &mut [f32]) {
    for ((o, gi), ui) in out.iter_mut().zip(g).zip(u) {
        *o = gi / (1.0 + (-gi).exp()) * ui;
    }
}

/// `out[j] = Σ_d q[d] · kt[d·w + j]` for `j < out.len() ≤ w`: a query against a block of
/// `w` keys stored transposed (`kt` is `[D, w]`), one key per lane.
pub fn dot_transposed(q: &[f32], kt: &[f32], w: usize, out: &mut [f32]) {
    assert!(kt.len() >= q.len() * w && out.len() <= w);
    #[cfg(target_arch = "x86_64")]
    if w == 16 && has_avx512() {
        // SAFETY: the CPU has the AVX-512 tier's features; kt holds D rows of 16 (asserted).
        return unsafe { x86::dot_transposed16_avx512(q, kt, out) };
    }
    #[cfg(target_arch = "x86_64")]
    if w == 16 && has_avx2() {
        // SAFETY: as above, AVX2.
        return unsafe { x86::dot_transposed16_avx2(q, kt, out) };
    }
    dot_transposed_scalar(q, kt, w, out)
}

/// [`dot_transposed`] for four queries `q[i·D ..]` (`D = q.len() / 4`) against the same
/// block: `out[i·stride + j]` for `j < n ≤ w`. Each key row is loaded once for the four, and
/// the four sums are independent chains.
pub fn dot_transposed_x4(
    q: &[f32],
    kt: &[f32],
    w: usize,
    out: &mut [f32],
    stride: usize,
    n: usize,
) {
    let d = q.len() / 4;
    assert!(q.len() == 4 * d && kt.len() >= d * w && n <= w && n <= stride);
    assert!(
        out.len() >= 3 * stride + n,
        "dot_transposed_x4: output too small"
    );
    #[cfg(target_arch = "x86_64")]
    if w == 16 && has_avx512() {
        // SAFETY: the CPU has the AVX-512 tier's features; the sizes are asserted above.
        return unsafe { x86::dot_transposed16x4_avx512(q, kt, out, stride, n) };
    }
    for i in 0..4 {
        let o = &mut out[i * stride..i * stride + n];
        dot_transposed(&q[i * d..(i + 1) * d], kt, w, o);
    }
}

/// Scalar reference of [`dot_transposed`].
pub fn dot_transposed_scalar(q: &[f32], kt: &[f32], w: usize, out: &mut [f32]) {
    out.fill(0.0);
    for (d, &qd) in q.iter().enumerate() {
        for (j, o) in out.iter_mut().enumerate() {
            *o += qd * kt[d * w + j];
        }
    }
}

/// Scalar reference of [`softmax`].
pub fn softmax_scalar(x: &mut [f32]) {
    let max = x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let mut sum = 0.0;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    let inv = 1.0 / sum;
    x.iter_mut().for_each(|v| *v *= inv);
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    //! The AVX2 bodies. Loads are unaligned: rows come straight from memory-mapped files.
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum(v: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps(v, 1);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let mut acc0 = _mm256_setzero_ps();
        let mut acc1 = _mm256_setzero_ps();
        let mut i = 0;
        while i + 16 <= n {
            acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), acc0);
            acc1 = _mm256_fmadd_ps(
                _mm256_loadu_ps(pa.add(i + 8)),
                _mm256_loadu_ps(pb.add(i + 8)),
                acc1,
            );
            i += 16;
        }
        while i + 8 <= n {
            acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), acc0);
            i += 8;
        }
        let mut s = hsum(_mm256_add_ps(acc0, acc1));
        while i < n {
            s += a[i] * b[i];
            i += 1;
        }
        s
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn axpy_rows_f32(y: &mut [f32], a: &[f32], x: &[f32]) {
        let n = y.len();
        let (py, px) = (y.as_mut_ptr(), x.as_ptr());
        let mut i = 0;
        // 32 columns (four registers) at a time over every row, then 8, then one.
        while i + 32 <= n {
            let mut acc: [__m256; 4] = std::array::from_fn(|c| _mm256_loadu_ps(py.add(i + 8 * c)));
            for (j, &aj) in a.iter().enumerate() {
                let av = _mm256_set1_ps(aj);
                let row = px.add(j * n + i);
                for (c, acc) in acc.iter_mut().enumerate() {
                    *acc = _mm256_fmadd_ps(av, _mm256_loadu_ps(row.add(8 * c)), *acc);
                }
            }
            for (c, acc) in acc.iter().enumerate() {
                _mm256_storeu_ps(py.add(i + 8 * c), *acc);
            }
            i += 32;
        }
        while i + 8 <= n {
            let mut acc = _mm256_loadu_ps(py.add(i));
            for (j, &aj) in a.iter().enumerate() {
                acc = _mm256_fmadd_ps(_mm256_set1_ps(aj), _mm256_loadu_ps(px.add(j * n + i)), acc);
            }
            _mm256_storeu_ps(py.add(i), acc);
            i += 8;
        }
        for i in i..n {
            for (j, &aj) in a.iter().enumerate() {
                y[i] += aj * x[j * n + i];
            }
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn axpy_f32(y: &mut [f32], a: f32, x: &[f32]) {
        let n = y.len().min(x.len());
        let (py, px) = (y.as_mut_ptr(), x.as_ptr());
        let av = _mm256_set1_ps(a);
        let mut i = 0;
        while i + 8 <= n {
            let v = _mm256_fmadd_ps(av, _mm256_loadu_ps(px.add(i)), _mm256_loadu_ps(py.add(i)));
            _mm256_storeu_ps(py.add(i), v);
            i += 8;
        }
        while i < n {
            y[i] += a * x[i];
            i += 1;
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot4_f32(w: &[f32], x: [&[f32]; 4]) -> [f32; 4] {
        let n = w.len();
        let pw = w.as_ptr();
        let px = x.map(|r| r.as_ptr());
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        while i + 8 <= n {
            let wv = _mm256_loadu_ps(pw.add(i));
            for j in 0..4 {
                acc[j] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(px[j].add(i)), acc[j]);
            }
            i += 8;
        }
        let mut out = [0.0f32; 4];
        for j in 0..4 {
            out[j] = hsum(acc[j]);
            for k in i..n {
                out[j] += w[k] * x[j][k];
            }
        }
        out
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot2x4_f32(w: [&[f32]; 2], x: [&[f32]; 4]) -> [[f32; 4]; 2] {
        let n = w[0].len();
        let (pw0, pw1) = (w[0].as_ptr(), w[1].as_ptr());
        let px = x.map(|r| r.as_ptr());
        let mut a0 = [_mm256_setzero_ps(); 4];
        let mut a1 = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        while i + 8 <= n {
            let w0 = _mm256_loadu_ps(pw0.add(i));
            let w1 = _mm256_loadu_ps(pw1.add(i));
            for j in 0..4 {
                let xv = _mm256_loadu_ps(px[j].add(i));
                a0[j] = _mm256_fmadd_ps(w0, xv, a0[j]);
                a1[j] = _mm256_fmadd_ps(w1, xv, a1[j]);
            }
            i += 8;
        }
        let mut out = [[0.0f32; 4]; 2];
        for j in 0..4 {
            out[0][j] = hsum(a0[j]);
            out[1][j] = hsum(a1[j]);
            for k in i..n {
                out[0][j] += w[0][k] * x[j][k];
                out[1][j] += w[1][k] * x[j][k];
            }
        }
        out
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn load_bf16x8(p: *const u8) -> __m256 {
        let h = _mm_loadu_si128(p as *const __m128i);
        _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load_f16x8(p: *const u8) -> __m256 {
        _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_bf16(x: &[f32], w: &[u8]) -> f32 {
        let n = x.len();
        let (px, pw) = (x.as_ptr(), w.as_ptr());
        let mut acc0 = _mm256_setzero_ps();
        let mut acc1 = _mm256_setzero_ps();
        let mut i = 0;
        while i + 16 <= n {
            acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(px.add(i)), load_bf16x8(pw.add(2 * i)), acc0);
            acc1 = _mm256_fmadd_ps(
                _mm256_loadu_ps(px.add(i + 8)),
                load_bf16x8(pw.add(2 * i + 16)),
                acc1,
            );
            i += 16;
        }
        while i + 8 <= n {
            acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(px.add(i)), load_bf16x8(pw.add(2 * i)), acc0);
            i += 8;
        }
        let mut s = hsum(_mm256_add_ps(acc0, acc1));
        while i < n {
            s += x[i] * half::bf16::from_le_bytes([w[2 * i], w[2 * i + 1]]).to_f32();
            i += 1;
        }
        s
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_f16(x: &[f32], w: &[u8]) -> f32 {
        let n = x.len();
        let (px, pw) = (x.as_ptr(), w.as_ptr());
        let mut acc0 = _mm256_setzero_ps();
        let mut acc1 = _mm256_setzero_ps();
        let mut i = 0;
        while i + 16 <= n {
            acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(px.add(i)), load_f16x8(pw.add(2 * i)), acc0);
            acc1 = _mm256_fmadd_ps(
                _mm256_loadu_ps(px.add(i + 8)),
                load_f16x8(pw.add(2 * i + 16)),
                acc1,
            );
            i += 16;
        }
        while i + 8 <= n {
            acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(px.add(i)), load_f16x8(pw.add(2 * i)), acc0);
            i += 8;
        }
        let mut s = hsum(_mm256_add_ps(acc0, acc1));
        while i < n {
            s += x[i] * half::f16::from_le_bytes([w[2 * i], w[2 * i + 1]]).to_f32();
            i += 1;
        }
        s
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_f32_bytes(x: &[f32], w: &[u8]) -> f32 {
        let n = x.len();
        let (px, pw) = (x.as_ptr(), w.as_ptr() as *const f32);
        let mut acc = _mm256_setzero_ps();
        let mut i = 0;
        while i + 8 <= n {
            acc = _mm256_fmadd_ps(_mm256_loadu_ps(px.add(i)), _mm256_loadu_ps(pw.add(i)), acc);
            i += 8;
        }
        let mut s = hsum(acc);
        while i < n {
            s += x[i] * pw.add(i).read_unaligned();
            i += 1;
        }
        s
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn bf16_to_f32(src: &[u8], dst: &mut [f32]) {
        let n = dst.len();
        let mut i = 0;
        while i + 8 <= n {
            _mm256_storeu_ps(
                dst.as_mut_ptr().add(i),
                load_bf16x8(src.as_ptr().add(2 * i)),
            );
            i += 8;
        }
        while i < n {
            dst[i] = half::bf16::from_le_bytes([src[2 * i], src[2 * i + 1]]).to_f32();
            i += 1;
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn f16_to_f32(src: &[u8], dst: &mut [f32]) {
        let n = dst.len();
        let mut i = 0;
        while i + 8 <= n {
            _mm256_storeu_ps(dst.as_mut_ptr().add(i), load_f16x8(src.as_ptr().add(2 * i)));
            i += 8;
        }
        while i < n {
            dst[i] = half::f16::from_le_bytes([src[2 * i], src[2 * i + 1]]).to_f32();
            i += 1;
        }
    }

    // ---- AVX-512 bodies (the `avx512` tier) ----

    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl")]
    pub unsafe fn dot_f32_avx512(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let mut acc0 = _mm512_setzero_ps();
        let mut acc1 = _mm512_setzero_ps();
        let mut i = 0;
        while i + 32 <= n {
            acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(pa.add(i)), _mm512_loadu_ps(pb.add(i)), acc0);
            acc1 = _mm512_fmadd_ps(
                _mm512_loadu_ps(pa.add(i + 16)),
                _mm512_loadu_ps(pb.add(i + 16)),
                acc1,
            );
            i += 32;
        }
        if i + 16 <= n {
            acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(pa.add(i)), _mm512_loadu_ps(pb.add(i)), acc0);
            i += 16;
        }
        if i < n {
            // The tail under a mask: lanes past the end read as zero.
            let m: __mmask16 = (1u32 << (n - i)) as u16 - 1;
            acc1 = _mm512_fmadd_ps(
                _mm512_maskz_loadu_ps(m, pa.add(i)),
                _mm512_maskz_loadu_ps(m, pb.add(i)),
                acc1,
            );
        }
        _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1))
    }

    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl")]
    pub unsafe fn axpy_rows_f32_avx512(y: &mut [f32], a: &[f32], x: &[f32]) {
        let n = y.len();
        let (py, px) = (y.as_mut_ptr(), x.as_ptr());
        let mut i = 0;
        // 128 columns (eight registers, two multiply-add pipes' worth of independent
        // chains) at a time over every row, then 16 under a mask.
        while i + 128 <= n {
            let mut acc: [__m512; 8] = std::array::from_fn(|c| _mm512_loadu_ps(py.add(i + 16 * c)));
            for (j, &aj) in a.iter().enumerate() {
                let av = _mm512_set1_ps(aj);
                let row = px.add(j * n + i);
                for (c, acc) in acc.iter_mut().enumerate() {
                    *acc = _mm512_fmadd_ps(av, _mm512_loadu_ps(row.add(16 * c)), *acc);
                }
            }
            for (c, acc) in acc.iter().enumerate() {
                _mm512_storeu_ps(py.add(i + 16 * c), *acc);
            }
            i += 128;
        }
        while i < n {
            let m: __mmask16 = if n - i >= 16 {
                0xFFFF
            } else {
                ((1u32 << (n - i)) - 1) as u16
            };
            let mut acc = _mm512_maskz_loadu_ps(m, py.add(i));
            for (j, &aj) in a.iter().enumerate() {
                let row = _mm512_maskz_loadu_ps(m, px.add(j * n + i));
                acc = _mm512_fmadd_ps(_mm512_set1_ps(aj), row, acc);
            }
            _mm512_mask_storeu_ps(py.add(i), m, acc);
            i += 16;
        }
    }

    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl")]
    pub unsafe fn axpy_rows_x2_f32_avx512(y: &mut [f32], a0: &[f32], a1: &[f32], x: &[f32]) {
        let n = y.len() / 2;
        let (py, px) = (y.as_mut_ptr(), x.as_ptr());
        // 64 columns of both outputs (eight registers) per pass: each value register loaded
        // feeds two multiply-adds.
        let mut i = 0;
        while i < n {
            let mut acc: [__m512; 8] =
                std::array::from_fn(|c| _mm512_loadu_ps(py.add((c / 4) * n + i + 16 * (c % 4))));
            for (j, (&w0, &w1)) in a0.iter().zip(a1).enumerate() {
                let (v0, v1) = (_mm512_set1_ps(w0), _mm512_set1_ps(w1));
                let row = px.add(j * n + i);
                for c in 0..4 {
                    let xv = _mm512_loadu_ps(row.add(16 * c));
                    acc[c] = _mm512_fmadd_ps(v0, xv, acc[c]);
                    acc[4 + c] = _mm512_fmadd_ps(v1, xv, acc[4 + c]);
                }
            }
            for (c, acc) in acc.iter().enumerate() {
                _mm512_storeu_ps(py.add((c / 4) * n + i + 16 * (c % 4)), *acc);
            }
            i += 64;
        }
    }

    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl")]
    pub unsafe fn axpy_f32_avx512(y: &mut [f32], a: f32, x: &[f32]) {
        let n = y.len().min(x.len());
        let (py, px) = (y.as_mut_ptr(), x.as_ptr());
        let av = _mm512_set1_ps(a);
        let mut i = 0;
        while i + 16 <= n {
            let v = _mm512_fmadd_ps(av, _mm512_loadu_ps(px.add(i)), _mm512_loadu_ps(py.add(i)));
            _mm512_storeu_ps(py.add(i), v);
            i += 16;
        }
        if i < n {
            let m: __mmask16 = (1u32 << (n - i)) as u16 - 1;
            let v = _mm512_fmadd_ps(
                av,
                _mm512_maskz_loadu_ps(m, px.add(i)),
                _mm512_maskz_loadu_ps(m, py.add(i)),
            );
            _mm512_mask_storeu_ps(py.add(i), m, v);
        }
    }

    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl")]
    pub unsafe fn dot4_f32_avx512(w: &[f32], x: [&[f32]; 4]) -> [f32; 4] {
        let n = w.len();
        let pw = w.as_ptr();
        let px = x.map(|r| r.as_ptr());
        let mut acc = [_mm512_setzero_ps(); 4];
        let mut i = 0;
        while i < n {
            let m: __mmask16 = if i + 16 <= n {
                0xFFFF
            } else {
                (1u32 << (n - i)) as u16 - 1
            };
            let wv = _mm512_maskz_loadu_ps(m, pw.add(i));
            for j in 0..4 {
                acc[j] = _mm512_fmadd_ps(wv, _mm512_maskz_loadu_ps(m, px[j].add(i)), acc[j]);
            }
            i += 16;
        }
        acc.map(|a| _mm512_reduce_add_ps(a))
    }

    /// A 2×4 tile as in the AVX2 body, 16 lanes wide.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl")]
    pub unsafe fn dot2x4_f32_avx512(w: [&[f32]; 2], x: [&[f32]; 4]) -> [[f32; 4]; 2] {
        let n = w[0].len();
        let (pw0, pw1) = (w[0].as_ptr(), w[1].as_ptr());
        let px = x.map(|r| r.as_ptr());
        let mut a0 = [_mm512_setzero_ps(); 4];
        let mut a1 = [_mm512_setzero_ps(); 4];
        let mut i = 0;
        while i < n {
            let m: __mmask16 = if i + 16 <= n {
                0xFFFF
            } else {
                (1u32 << (n - i)) as u16 - 1
            };
            let w0 = _mm512_maskz_loadu_ps(m, pw0.add(i));
            let w1 = _mm512_maskz_loadu_ps(m, pw1.add(i));
            for j in 0..4 {
                let xv = _mm512_maskz_loadu_ps(m, px[j].add(i));
                a0[j] = _mm512_fmadd_ps(w0, xv, a0[j]);
                a1[j] = _mm512_fmadd_ps(w1, xv, a1[j]);
            }
            i += 16;
        }
        [
            a0.map(|a| _mm512_reduce_add_ps(a)),
            a1.map(|a| _mm512_reduce_add_ps(a)),
        ]
    }

    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl")]
    pub unsafe fn f16_to_f32_avx512(src: &[u8], dst: &mut [f32]) {
        let n = dst.len();
        let mut i = 0;
        while i + 16 <= n {
            let h = _mm256_loadu_si256(src.as_ptr().add(2 * i) as *const __m256i);
            _mm512_storeu_ps(dst.as_mut_ptr().add(i), _mm512_cvtph_ps(h));
            i += 16;
        }
        f16_to_f32(&src[2 * i..], &mut dst[i..]);
    }

    /// `e^x` of eight lanes for x ≤ 0 (softmax's range; larger x are clamped at 88):
    /// `2^n · p(r)` with `x = n·ln2 + r`, |r| ≤ ln2/2, and Cephes' degree-6 polynomial for
    /// `e^r` (about 1 ulp). Lanes below −87.3 give 0's neighbourhood (≤ 1.2e-38).
    #[target_feature(enable = "avx2,fma")]
    unsafe fn exp8(x: __m256) -> __m256 {
        let x = _mm256_min_ps(
            _mm256_max_ps(x, _mm256_set1_ps(-87.3)),
            _mm256_set1_ps(88.0),
        );
        let n = _mm256_round_ps(
            _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)),
            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
        );
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
        let mut p = _mm256_set1_ps(1.987_569_1e-4);
        for c in [1.398_2e-3, 8.333_452e-3, 4.166_579_6e-2, 0.166_666_65, 0.5] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
        }
        let p = _mm256_fmadd_ps(
            _mm256_mul_ps(p, r),
            r,
            _mm256_add_ps(r, _mm256_set1_ps(1.0)),
        );
        let pow2 = _mm256_slli_epi32(
            _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)),
            23,
        );
        _mm256_mul_ps(p, _mm256_castsi256_ps(pow2))
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn softmax_avx2(x: &mut [f32]) {
        let n = x.len();
        let p = x.as_mut_ptr();
        let mut max = f32::NEG_INFINITY;
        let mut i = 0;
        let mut mv = _mm256_set1_ps(f32::NEG_INFINITY);
        while i + 8 <= n {
            mv = _mm256_max_ps(mv, _mm256_loadu_ps(p.add(i)));
            i += 8;
        }
        let mut lanes = [0.0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), mv);
        for v in lanes.iter().chain(&x[i..]) {
            max = max.max(*v);
        }
        let mx = _mm256_set1_ps(max);
        let mut sv = _mm256_setzero_ps();
        let mut i = 0;
        while i + 8 <= n {
            let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p.add(i)), mx));
            _mm256_storeu_ps(p.add(i), e);
            sv = _mm256_add_ps(sv, e);
            i += 8;
        }
        let mut sum = hsum(sv);
        for v in &mut x[i..] {
            *v = (*v - max).exp();
            sum += *v;
        }
        let inv = _mm256_set1_ps(1.0 / sum);
        let mut i = 0;
        while i + 8 <= n {
            _mm256_storeu_ps(p.add(i), _mm256_mul_ps(_mm256_loadu_ps(p.add(i)), inv));
            i += 8;
        }
        for v in &mut x[i..] {
            *v *= 1.0 / sum;
        }
    }

    /// [`exp8`] on sixteen lanes.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl")]
    unsafe fn exp16(x: __m512) -> __m512 {
        let x = _mm512_min_ps(
            _mm512_max_ps(x, _mm512_set1_ps(-87.3)),
            _mm512_set1_ps(88.0),
        );
        let n = _mm512_roundscale_ps(
            _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)),
            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
        );
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_359_4), x);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.121_944_4e-4), r);
        let mut p = _mm512_set1_ps(1.987_569_1e-4);
        for c in [1.398_2e-3, 8.333_452e-3, 4.166_579_6e-2, 0.166_666_65, 0.5] {
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
        }
        let p = _mm512_fmadd_ps(
            _mm512_mul_ps(p, r),
            r,
            _mm512_add_ps(r, _mm512_set1_ps(1.0)),
        );
        let pow2 = _mm512_slli_epi32(
            _mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)),
            23,
        );
        _mm512_mul_ps(p, _mm512_castsi512_ps(pow2))
    }

    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl")]
    pub unsafe fn silu_mul_avx512(g: &[f32], u: &[f32], out: &mut [f32]) {
        let n = out.len().min(g.len()).min(u.len());
        let one = _mm512_set1_ps(1.0);
        let mut i = 0;
        while i < n {
            let m: __mmask16 = if i + 16 <= n {
                0xFFFF
            } else {
                (1u32 << (n - i)) as u16 - 1
            };
            let gv = _mm512_maskz_loadu_ps(m, g.as_ptr().add(i));
            let uv = _mm512_maskz_loadu_ps(m, u.as_ptr().add(i));
            // e^−g for g < −88 is clamped (silu is then −0 to f32 precision anyway).
            let e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), gv));
            let s = _mm512_div_ps(gv, _mm512_add_ps(one, e));
            _mm512_mask_storeu_ps(out.as_mut_ptr().add(i), m, _mm512_mul_ps(s, uv));
            i += 16;
        }
    }

    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl")]
    pub unsafe fn dot_transposed16_avx512(q: &[f32], kt: &[f32], out: &mut [f32]) {
        let pk = kt.as_ptr();
        // Four chains so the multiply-adds do not wait on each other.
        let mut acc = [_mm512_setzero_ps(); 4];
        let n = q.len();
        let mut d = 0;
        while d + 4 <= n {
            for (c, a) in acc.iter_mut().enumerate() {
                let qd = _mm512_set1_ps(*q.get_unchecked(d + c));
                *a = _mm512_fmadd_ps(qd, _mm512_loadu_ps(pk.add((d + c) * 16)), *a);
            }
            d += 4;
        }
        while d < n {
            let qd = _mm512_set1_ps(*q.get_unchecked(d));
            acc[0] = _mm512_fmadd_ps(qd, _mm512_loadu_ps(pk.add(d * 16)), acc[0]);
            d += 1;
        }
        let s = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
        let m: __mmask16 = ((1u32 << out.len()) - 1) as u16;
        _mm512_mask_storeu_ps(out.as_mut_ptr(), m, s);
    }

    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl")]
    pub unsafe fn dot_transposed16x4_avx512(
        q: &[f32],
        kt: &[f32],
        out: &mut [f32],
        stride: usize,
        n: usize,
    ) {
        let pk = kt.as_ptr();
        let d = q.len() / 4;
        let pq = q.as_ptr();
        // Two chains per query (even and odd d): eight independent multiply-adds per pair of
        // key rows, each key row loaded once.
        let mut acc = [_mm512_setzero_ps(); 8];
        let mut k = 0;
        while k + 2 <= d {
            for c in 0..2 {
                let key = _mm512_loadu_ps(pk.add((k + c) * 16));
                for i in 0..4 {
                    let qi = _mm512_set1_ps(*pq.add(i * d + k + c));
                    acc[2 * i + c] = _mm512_fmadd_ps(qi, key, acc[2 * i + c]);
                }
            }
            k += 2;
        }
        if k < d {
            let key = _mm512_loadu_ps(pk.add(k * 16));
            for i in 0..4 {
                let qi = _mm512_set1_ps(*pq.add(i * d + k));
                acc[2 * i] = _mm512_fmadd_ps(qi, key, acc[2 * i]);
            }
        }
        let m: __mmask16 = ((1u32 << n) - 1) as u16;
        for i in 0..4 {
            let s = _mm512_add_ps(acc[2 * i], acc[2 * i + 1]);
            _mm512_mask_storeu_ps(out.as_mut_ptr().add(i * stride), m, s);
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_transposed16_avx2(q: &[f32], kt: &[f32], out: &mut [f32]) {
        let pk = kt.as_ptr();
        let mut acc = [_mm256_setzero_ps(); 4];
        let n = q.len();
        let mut d = 0;
        while d + 2 <= n {
            for c in 0..2 {
                let qd = _mm256_set1_ps(*q.get_unchecked(d + c));
                let row = pk.add((d + c) * 16);
                acc[2 * c] = _mm256_fmadd_ps(qd, _mm256_loadu_ps(row), acc[2 * c]);
                acc[2 * c + 1] = _mm256_fmadd_ps(qd, _mm256_loadu_ps(row.add(8)), acc[2 * c + 1]);
            }
            d += 2;
        }
        while d < n {
            let qd = _mm256_set1_ps(*q.get_unchecked(d));
            let row = pk.add(d * 16);
            acc[0] = _mm256_fmadd_ps(qd, _mm256_loadu_ps(row), acc[0]);
            acc[1] = _mm256_fmadd_ps(qd, _mm256_loadu_ps(row.add(8)), acc[1]);
            d += 1;
        }
        let mut lanes = [0.0f32; 16];
        _mm256_storeu_ps(lanes.as_mut_ptr(), _mm256_add_ps(acc[0], acc[2]));
        _mm256_storeu_ps(lanes.as_mut_ptr().add(8), _mm256_add_ps(acc[1], acc[3]));
        out.copy_from_slice(&lanes[..out.len()]);
    }

    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl")]
    pub unsafe fn softmax_avx512(x: &mut [f32]) {
        let n = x.len();
        let p = x.as_mut_ptr();
        let tail = |i: usize| -> __mmask16 {
            if i + 16 <= n {
                0xFFFF
            } else {
                (1u32 << (n - i)) as u16 - 1
            }
        };
        let mut mv = _mm512_set1_ps(f32::NEG_INFINITY);
        let mut i = 0;
        while i < n {
            mv = _mm512_mask_max_ps(mv, tail(i), mv, _mm512_maskz_loadu_ps(tail(i), p.add(i)));
            i += 16;
        }
        let mx = _mm512_set1_ps(_mm512_reduce_max_ps(mv));
        let mut sv = _mm512_setzero_ps();
        let mut i = 0;
        while i < n {
            let m = tail(i);
            let e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, p.add(i)), mx));
            _mm512_mask_storeu_ps(p.add(i), m, e);
            sv = _mm512_add_ps(sv, _mm512_maskz_mov_ps(m, e));
            i += 16;
        }
        let inv = _mm512_set1_ps(1.0 / _mm512_reduce_add_ps(sv));
        let mut i = 0;
        while i < n {
            let m = tail(i);
            _mm512_mask_storeu_ps(
                p.add(i),
                m,
                _mm512_mul_ps(_mm512_maskz_loadu_ps(m, p.add(i)), inv),
            );
            i += 16;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic values in [-1, 1) without a dependency.
    fn values(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2654435761).wrapping_add(1);
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s as f32 / u32::MAX as f32) * 2.0 - 1.0
            })
            .collect()
    }

    fn close(a: f32, b: f32, n: usize) -> bool {
        (a - b).abs() <= 1e-5 * (n as f32).sqrt() * (1.0 + b.abs())
    }

    #[test]
    fn simd_matches_scalar_on_odd_lengths() {
        for n in [1usize, 7, 8, 15, 16, 17, 33, 64, 256, 4097] {
            let a = values(n, 1);
            let b = values(n, 2);
            let bf: Vec<u8> = b
                .iter()
                .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
                .collect();
            let hf: Vec<u8> = b
                .iter()
                .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
                .collect();
            let fb: Vec<u8> = b.iter().flat_map(|v| v.to_le_bytes()).collect();
            assert!(
                close(dot_f32(&a, &b), dot_f32_scalar(&a, &b), n),
                "f32 n={n}"
            );
            assert!(
                close(dot_bf16(&a, &bf), dot_bf16_scalar(&a, &bf), n),
                "bf16 n={n}"
            );
            assert!(
                close(dot_f16(&a, &hf), dot_f16_scalar(&a, &hf), n),
                "f16 n={n}"
            );
            assert!(
                close(dot_f32_bytes(&a, &fb), dot_f32_scalar(&a, &b), n),
                "f32 bytes n={n}"
            );
            let c = values(n, 3);
            let d = values(n, 4);
            let e = values(n, 5);
            let r = dot4_f32(&a, [&b, &c, &d, &e]);
            for (got, x) in r.iter().zip([&b, &c, &d, &e]) {
                assert!(close(*got, dot_f32_scalar(&a, x), n), "dot4 n={n}");
            }
            let f = values(n, 6);
            let r2 = dot2x4_f32([&a, &f], [&b, &c, &d, &e]);
            for (row, wr) in r2.iter().zip([&a, &f]) {
                for (got, x) in row.iter().zip([&b, &c, &d, &e]) {
                    assert!(close(*got, dot_f32_scalar(wr, x), n), "dot2x4 n={n}");
                }
            }
            let rows = values(5 * n, 8);
            let weights = [0.37, -1.25, 0.0, 2.5, -0.03];
            for m in [0, 1, 5] {
                let (mut y2, mut y2_ref) = (values(2 * n, 10), values(2 * n, 10));
                let other = [1.5, 0.25, -0.5, 0.0, 3.0];
                axpy_rows_x2_f32(&mut y2, &weights[..m], &other[..m], &rows);
                axpy_rows_f32_scalar(&mut y2_ref[..n], &weights[..m], &rows);
                axpy_rows_f32_scalar(&mut y2_ref[n..], &other[..m], &rows);
                for (got, want) in y2.iter().zip(&y2_ref) {
                    assert!(close(*got, *want, 5), "axpy_rows_x2 n={n} rows={m}");
                }
                let (mut y, mut y_ref) = (values(n, 9), values(n, 9));
                axpy_rows_f32(&mut y, &weights[..m], &rows);
                axpy_rows_f32_scalar(&mut y_ref, &weights[..m], &rows);
                for (got, want) in y.iter().zip(&y_ref) {
                    assert!(
                        close(*got, *want, 5),
                        "axpy_rows n={n} rows={m} {got} {want}"
                    );
                }
            }
            let (mut y, mut y_ref) = (values(n, 7), values(n, 7));
            axpy_f32(&mut y, 0.37, &a);
            axpy_f32_scalar(&mut y_ref, 0.37, &a);
            for (got, want) in y.iter().zip(&y_ref) {
                assert!(close(*got, *want, 1), "axpy n={n}");
            }
            let mut out = vec![0.0; n];
            let mut reference = vec![0.0; n];
            bf16_to_f32(&bf, &mut out);
            crate::quant::dequantize_row(crate::quant::DType::BF16, &bf, &mut reference);
            assert_eq!(out, reference);
            f16_to_f32(&hf, &mut out);
            crate::quant::dequantize_row(crate::quant::DType::F16, &hf, &mut reference);
            assert_eq!(out, reference);
        }
    }

    #[test]
    fn transposed_dots_match_scalar() {
        for d in [1usize, 7, 64, 128, 129] {
            for w in [16usize, 5] {
                let q = values(d, 21);
                let kt = values(d * w, 22);
                for n in [1, w / 2 + 1, w] {
                    let (mut a, mut b) = (vec![0.0; n], vec![0.0; n]);
                    dot_transposed(&q, &kt, w, &mut a);
                    dot_transposed_scalar(&q, &kt, w, &mut b);
                    for (x, y) in a.iter().zip(&b) {
                        assert!(close(*x, *y, d), "d={d} w={w} n={n}: {x} vs {y}");
                    }
                    // Four queries at once, into rows of a wider output.
                    let q4 = values(4 * d, 23);
                    let stride = w + 3;
                    let mut a4 = vec![7.0; 4 * stride];
                    dot_transposed_x4(&q4, &kt, w, &mut a4, stride, n);
                    for i in 0..4 {
                        let mut b = vec![0.0; n];
                        dot_transposed_scalar(&q4[i * d..(i + 1) * d], &kt, w, &mut b);
                        let row = &a4[i * stride..(i + 1) * stride];
                        for (x, y) in row.iter().zip(&b) {
                            assert!(close(*x, *y, d), "x4 d={d} w={w} n={n}: {x} vs {y}");
                        }
                        assert!(row[n..].iter().all(|&v| v == 7.0), "x4 wrote past n");
                    }
                }
            }
        }
    }

    #[test]
    fn silu_mul_matches_scalar() {
        for n in [1usize, 7, 16, 17, 3072] {
            let g: Vec<f32> = values(n, 12).iter().map(|v| v * 12.0).collect();
            let u = values(n, 13);
            let (mut a, mut b) = (vec![0.0; n], vec![0.0; n]);
            silu_mul(&g, &u, &mut a);
            silu_mul_scalar(&g, &u, &mut b);
            for (x, y) in a.iter().zip(&b) {
                assert!((x - y).abs() <= 1e-6 * (1.0 + y.abs()), "n={n}: {x} vs {y}");
            }
        }
    }

    #[test]
    fn softmax_matches_scalar() {
        for n in [1usize, 7, 8, 15, 16, 17, 33, 300, 2049] {
            let mut a: Vec<f32> = values(n, 11).iter().map(|v| v * 30.0).collect();
            let mut b = a.clone();
            softmax(&mut a);
            softmax_scalar(&mut b);
            for (x, y) in a.iter().zip(&b) {
                assert!(
                    (x - y).abs() <= 2e-6 * y.max(1e-30) + 1e-37,
                    "n={n}: {x} vs {y}"
                );
            }
            let sum: f32 = a.iter().sum();
            assert!((sum - 1.0).abs() < 1e-5, "n={n}: sums to {sum}");
        }
    }

    #[test]
    fn unaligned_rows_are_fine() {
        let a = values(33, 9);
        let b = values(34, 10);
        let bytes: Vec<u8> = b
            .iter()
            .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
            .collect();
        // Start one byte in, as a row inside a memory map may.
        let mut shifted = vec![0u8];
        shifted.extend_from_slice(&bytes[..66]);
        assert!(close(
            dot_bf16(&a, &shifted[1..]),
            dot_bf16_scalar(&a, &bytes[..66]),
            33
        ));
    }
}
