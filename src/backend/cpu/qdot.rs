//! Dot products of quantized weight rows with 16-bit-quantized activations (decode path).
//!
//! Decode reads every weight once per token, so its cost is the inner loop per weight block.
//! The activation row is quantized once per product in blocks of 32 ([`Q16Act`]: i16 values,
//! an f32 scale per block, and the sums of the values per 16 elements), and each weight
//! block meets it in integer arithmetic: weights widen from bytes to i16 in one instruction
//! and AVX2 `vpmaddwd` multiplies 16 pairs per instruction, where widening 4-bit weights to
//! f32 would cost several conversions per element. Offsets and minimums of the formats
//! (Q4_0's 8, Q6_K's 32, Q4_1/Q4_K's mins) are applied once per block through the sums.
//!
//! Why 16 bits and not llama.cpp's 8: measured on the oracle fixtures, 8-bit activations moved
//! the logits of a decode step by up to 0.27 (Q4_K_M, hidden 256), beyond the 0.1 the
//! references allow for 8-bit activations; 16 bits cost about one more instruction per 32
//! weights and move them by about 1e-4.
//!
//! A decode step of several sequences has several activation rows: [`dot4`] widens each
//! weight block once and meets four rows with it, so batched decode pays the unpacking once
//! per four tokens (on the Qwen3-0.6B shape, Q4_0 with a Q6_K output matrix, 2 threads: four
//! sequences decode at 2.06× one sequence's speed instead of 1.07×). Prefill (more than 16
//! rows, or formats without a four-row kernel) widens each weight row to f32 once and reuses
//! it for every token.
//!
//! Every format has a scalar version (`*_scalar`), the reference the AVX2 one is tested against.

use crate::quant::DType;

/// An activation row quantized to 16 bits in blocks of 32.
#[derive(Clone, Debug, Default)]
pub struct Q16Act {
    /// `[K]` quantized values, |q| ≤ 32767.
    pub qs: Vec<i16>,
    /// `[K/32]` scale of each block.
    pub d: Vec<f32>,
    /// `[K/16]` sum of the quantized values of each 16-element group.
    pub sum16: Vec<i32>,
}

impl Q16Act {
    /// Quantizes `x` (length a multiple of 32) into `self`, reusing its buffers.
    pub fn quantize(&mut self, x: &[f32]) {
        assert!(
            x.len().is_multiple_of(32),
            "activation length {} is not whole blocks",
            x.len()
        );
        let n = x.len();
        self.qs.resize(n, 0);
        self.d.resize(n / 32, 0.0);
        self.sum16.resize(n / 16, 0);
        for (b, xb) in x.chunks_exact(32).enumerate() {
            let amax = xb.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let d = amax / 32767.0;
            let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
            self.d[b] = d;
            let q = &mut self.qs[32 * b..32 * b + 32];
            for (qi, &v) in q.iter_mut().zip(xb) {
                *qi = super::round_half_away(v * inv) as i16;
            }
            for g in 0..2 {
                self.sum16[2 * b + g] = q[16 * g..16 * g + 16].iter().map(|&v| v as i32).sum();
            }
        }
    }
}

/// Whether `dtype` has an integer dot product here.
pub fn supported(dtype: DType) -> bool {
    matches!(
        dtype,
        DType::Q8_0 | DType::Q4_0 | DType::Q4_1 | DType::Q4_K | DType::Q6_K
    )
}

/// `Σ w·x` for one weight row stored as `dtype` and the quantized activations `x`.
pub fn dot(dtype: DType, row: &[u8], x: &Q16Act) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if super::simd::has_avx2() {
        // SAFETY: the CPU has AVX2/FMA/F16C; row and x cover the same number of blocks.
        unsafe {
            return match dtype {
                DType::Q8_0 => x86::dot_q8_0(row, x),
                DType::Q4_0 => x86::dot_q4_0(row, x),
                DType::Q4_1 => x86::dot_q4_1(row, x),
                DType::Q4_K => x86::dot_q4_k(row, x),
                DType::Q6_K => x86::dot_q6_k(row, x),
                _ => panic!("no integer dot for {dtype}"),
            };
        }
    }
    dot_scalar(dtype, row, x)
}

/// Whether [`dot4`] widens each block once for four rows (rather than running [`dot`] four
/// times).
pub fn has_dot4(dtype: DType) -> bool {
    supported(dtype) && super::simd::has_avx2()
}

/// [`dot`] of one weight row with four activation rows: with AVX2 every format widens each
/// block once for all four, so a decode step of four sequences costs far less than four
/// steps of one.
pub fn dot4(dtype: DType, row: &[u8], x: [&Q16Act; 4]) -> [f32; 4] {
    #[cfg(target_arch = "x86_64")]
    if super::simd::has_avx2() {
        // SAFETY: as in `dot`.
        unsafe {
            match dtype {
                DType::Q8_0 => return x86::dot4_q8_0(row, x),
                DType::Q4_0 => return x86::dot4_q4_0(row, x),
                DType::Q4_1 => return x86::dot4_q4_1(row, x),
                DType::Q4_K => return x86::dot4_q4_k(row, x),
                DType::Q6_K => return x86::dot4_q6_k(row, x),
                _ => {}
            }
        }
    }
    x.map(|x| dot(dtype, row, x))
}

/// Scalar reference of [`dot`].
pub fn dot_scalar(dtype: DType, row: &[u8], x: &Q16Act) -> f32 {
    match dtype {
        DType::Q8_0 => dot_q8_0_scalar(row, x),
        DType::Q4_0 => dot_q4_0_scalar(row, x),
        DType::Q4_1 => dot_q4_1_scalar(row, x),
        DType::Q4_K => dot_q4_k_scalar(row, x),
        DType::Q6_K => dot_q6_k_scalar(row, x),
        _ => panic!("no integer dot for {dtype}"),
    }
}

fn f16_at(b: &[u8], i: usize) -> f32 {
    half::f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

fn dot_q8_0_scalar(row: &[u8], x: &Q16Act) -> f32 {
    let mut acc = 0.0;
    for (b, blk) in row.chunks_exact(34).enumerate().take(x.d.len()) {
        let xs = &x.qs[32 * b..32 * b + 32];
        let s: i32 = blk[2..]
            .iter()
            .zip(xs)
            .map(|(&w, &v)| w as i8 as i32 * v as i32)
            .sum();
        acc += f16_at(blk, 0) * x.d[b] * s as f32;
    }
    acc
}

fn dot_q4_0_scalar(row: &[u8], x: &Q16Act) -> f32 {
    let mut acc = 0.0;
    for (b, blk) in row.chunks_exact(18).enumerate().take(x.d.len()) {
        let xs = &x.qs[32 * b..32 * b + 32];
        let mut s = 0i32;
        for (j, &q) in blk[2..].iter().enumerate() {
            s += ((q & 0xF) as i32 - 8) * xs[j] as i32 + ((q >> 4) as i32 - 8) * xs[j + 16] as i32;
        }
        acc += f16_at(blk, 0) * x.d[b] * s as f32;
    }
    acc
}

fn dot_q4_1_scalar(row: &[u8], x: &Q16Act) -> f32 {
    let mut acc = 0.0;
    for (b, blk) in row.chunks_exact(20).enumerate().take(x.d.len()) {
        let xs = &x.qs[32 * b..32 * b + 32];
        let mut s = 0i32;
        for (j, &q) in blk[4..].iter().enumerate() {
            s += (q & 0xF) as i32 * xs[j] as i32 + (q >> 4) as i32 * xs[j + 16] as i32;
        }
        let sx = (x.sum16[2 * b] + x.sum16[2 * b + 1]) as f32;
        acc += x.d[b] * (f16_at(blk, 0) * s as f32 + f16_at(blk, 2) * sx);
    }
    acc
}

fn dot_q4_k_scalar(row: &[u8], x: &Q16Act) -> f32 {
    let mut acc = 0.0;
    for (sb, blk) in row.chunks_exact(144).enumerate().take(x.d.len() / 8) {
        let (d, dmin) = (f16_at(blk, 0), f16_at(blk, 2));
        let scales: &[u8; 12] = blk[4..16].try_into().expect("12 bytes");
        let qs = &blk[16..];
        for j in 0..8 {
            let (sc, m) = crate::quant::q4_k::scale_min(j, scales);
            let q = &qs[32 * (j / 2)..32 * (j / 2) + 32];
            let xb = 8 * sb + j;
            let xs = &x.qs[32 * xb..32 * xb + 32];
            let s: i32 = q
                .iter()
                .zip(xs)
                .map(|(&qq, &v)| if j % 2 == 0 { qq & 0xF } else { qq >> 4 } as i32 * v as i32)
                .sum();
            let sx = (x.sum16[2 * xb] + x.sum16[2 * xb + 1]) as f32;
            acc += x.d[xb] * (d * sc as f32 * s as f32 - dmin * m as f32 * sx);
        }
    }
    acc
}

/// The 6-bit quant of element `e` (0..128) of half `n` of a Q6_K block, and its scale index.
fn q6_k_quant(blk: &[u8], n: usize, e: usize) -> (i32, usize) {
    let ql = &blk[64 * n..64 * n + 64];
    let qh = &blk[128 + 32 * n..128 + 32 * n + 32];
    let (l, part) = (e % 32, e / 32);
    let low = match part {
        0 => ql[l] & 0xF,
        1 => ql[l + 32] & 0xF,
        2 => ql[l] >> 4,
        _ => ql[l + 32] >> 4,
    };
    let high = (qh[l] >> (2 * part)) & 3;
    ((low | (high << 4)) as i32, 8 * n + e / 16)
}

fn dot_q6_k_scalar(row: &[u8], x: &Q16Act) -> f32 {
    let mut acc = 0.0;
    for (sb, blk) in row.chunks_exact(210).enumerate().take(x.d.len() / 8) {
        let d = f16_at(blk, 208);
        for n in 0..2 {
            for part in 0..4 {
                // Elements 32·part..32·part+32 of half n: one activation block.
                let xb = 8 * sb + 4 * n + part;
                let xs = &x.qs[32 * xb..32 * xb + 32];
                let mut s = 0i32;
                for (i, &v) in xs.iter().enumerate() {
                    let (q, is) = q6_k_quant(blk, n, 32 * part + i);
                    s += (blk[192 + is] as i8 as i32) * (q - 32) * v as i32;
                }
                acc += d * x.d[xb] * s as f32;
            }
        }
    }
    acc
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    //! AVX2 bodies. Every block is read with unaligned loads: GGUF blocks are 18, 20, 34, 144
    //! and 210 bytes long. Weights are widened to i16 and meet the activations in
    //! `vpmaddwd`, which multiplies 16 pairs and adds neighbours into 8 i32 lanes.
    use super::Q16Act;
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn f16(p: *const u8) -> f32 {
        let bits = (p as *const u16).read_unaligned();
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)))
    }

    /// 16 activations starting at element `i`.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn xload(x: &Q16Act, i: usize) -> __m256i {
        _mm256_loadu_si256(x.qs.as_ptr().add(i) as *const __m256i)
    }

    /// Σ of 32 products: unsigned weight bytes `lo` (elements 0..16) and `hi` (16..32)
    /// with the activations at `i`, as 8 i32 lanes.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn dot32_u8(lo: __m128i, hi: __m128i, x: &Q16Act, i: usize) -> __m256i {
        let a = _mm256_madd_epi16(_mm256_cvtepu8_epi16(lo), xload(x, i));
        let b = _mm256_madd_epi16(_mm256_cvtepu8_epi16(hi), xload(x, i + 16));
        _mm256_add_epi32(a, b)
    }

    /// Low and high nibbles of 16 bytes.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn nibbles(b: __m128i) -> (__m128i, __m128i) {
        let m = _mm_set1_epi8(0xF);
        (_mm_and_si128(b, m), _mm_and_si128(_mm_srli_epi16(b, 4), m))
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_q8_0(row: &[u8], x: &Q16Act) -> f32 {
        let mut acc = _mm256_setzero_ps();
        let pr = row.as_ptr();
        for b in 0..x.d.len() {
            let blk = pr.add(34 * b);
            let lo = _mm_loadu_si128(blk.add(2) as *const __m128i);
            let hi = _mm_loadu_si128(blk.add(18) as *const __m128i);
            let s = _mm256_add_epi32(
                _mm256_madd_epi16(_mm256_cvtepi8_epi16(lo), xload(x, 32 * b)),
                _mm256_madd_epi16(_mm256_cvtepi8_epi16(hi), xload(x, 32 * b + 16)),
            );
            let scale = _mm256_set1_ps(f16(blk) * *x.d.get_unchecked(b));
            acc = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(s), acc);
        }
        hsum(acc)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_q4_0(row: &[u8], x: &Q16Act) -> f32 {
        let mut acc = _mm256_setzero_ps();
        let pr = row.as_ptr();
        let eight = _mm_set1_epi8(8);
        for b in 0..x.d.len() {
            let blk = pr.add(18 * b);
            let (lo, hi) = nibbles(_mm_loadu_si128(blk.add(2) as *const __m128i));
            // The stored quants are offset by 8: subtract it before widening with sign.
            let s = _mm256_add_epi32(
                _mm256_madd_epi16(
                    _mm256_cvtepi8_epi16(_mm_sub_epi8(lo, eight)),
                    xload(x, 32 * b),
                ),
                _mm256_madd_epi16(
                    _mm256_cvtepi8_epi16(_mm_sub_epi8(hi, eight)),
                    xload(x, 32 * b + 16),
                ),
            );
            let scale = _mm256_set1_ps(f16(blk) * *x.d.get_unchecked(b));
            acc = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(s), acc);
        }
        hsum(acc)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_q4_1(row: &[u8], x: &Q16Act) -> f32 {
        let mut acc = _mm256_setzero_ps();
        let mut mins = 0.0f32;
        let pr = row.as_ptr();
        for b in 0..x.d.len() {
            let blk = pr.add(20 * b);
            let (lo, hi) = nibbles(_mm_loadu_si128(blk.add(4) as *const __m128i));
            let dx = *x.d.get_unchecked(b);
            let s = dot32_u8(lo, hi, x, 32 * b);
            acc = _mm256_fmadd_ps(_mm256_set1_ps(f16(blk) * dx), _mm256_cvtepi32_ps(s), acc);
            let sx = *x.sum16.get_unchecked(2 * b) + *x.sum16.get_unchecked(2 * b + 1);
            mins += f16(blk.add(2)) * dx * sx as f32;
        }
        hsum(acc) + mins
    }

    /// Four rows of activations against one block's widened weights `wl`, `wh` (elements
    /// 0..16 and 16..32, i16), scaled by `dw` and each row's block scale.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn block4(
        wl: __m256i,
        wh: __m256i,
        dw: f32,
        x: &[&Q16Act; 4],
        b: usize,
        acc: &mut [__m256; 4],
    ) {
        for j in 0..4 {
            let s = _mm256_add_epi32(
                _mm256_madd_epi16(wl, xload(x[j], 32 * b)),
                _mm256_madd_epi16(wh, xload(x[j], 32 * b + 16)),
            );
            let scale = _mm256_set1_ps(dw * *x[j].d.get_unchecked(b));
            acc[j] = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(s), acc[j]);
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot4_q8_0(row: &[u8], x: [&Q16Act; 4]) -> [f32; 4] {
        let mut acc = [_mm256_setzero_ps(); 4];
        let pr = row.as_ptr();
        for b in 0..x[0].d.len() {
            let blk = pr.add(34 * b);
            let wl = _mm256_cvtepi8_epi16(_mm_loadu_si128(blk.add(2) as *const __m128i));
            let wh = _mm256_cvtepi8_epi16(_mm_loadu_si128(blk.add(18) as *const __m128i));
            block4(wl, wh, f16(blk), &x, b, &mut acc);
        }
        acc.map(|a| hsum(a))
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot4_q4_0(row: &[u8], x: [&Q16Act; 4]) -> [f32; 4] {
        let mut acc = [_mm256_setzero_ps(); 4];
        let pr = row.as_ptr();
        let eight = _mm_set1_epi8(8);
        for b in 0..x[0].d.len() {
            let blk = pr.add(18 * b);
            let (lo, hi) = nibbles(_mm_loadu_si128(blk.add(2) as *const __m128i));
            let wl = _mm256_cvtepi8_epi16(_mm_sub_epi8(lo, eight));
            let wh = _mm256_cvtepi8_epi16(_mm_sub_epi8(hi, eight));
            block4(wl, wh, f16(blk), &x, b, &mut acc);
        }
        acc.map(|a| hsum(a))
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot4_q4_1(row: &[u8], x: [&Q16Act; 4]) -> [f32; 4] {
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut mins = [0.0f32; 4];
        let pr = row.as_ptr();
        for b in 0..x[0].d.len() {
            let blk = pr.add(20 * b);
            let (lo, hi) = nibbles(_mm_loadu_si128(blk.add(4) as *const __m128i));
            let wl = _mm256_cvtepu8_epi16(lo);
            let wh = _mm256_cvtepu8_epi16(hi);
            block4(wl, wh, f16(blk), &x, b, &mut acc);
            let m = f16(blk.add(2));
            for j in 0..4 {
                let xj = x[j];
                let sx = *xj.sum16.get_unchecked(2 * b) + *xj.sum16.get_unchecked(2 * b + 1);
                mins[j] += m * *xj.d.get_unchecked(b) * sx as f32;
            }
        }
        let mut out = acc.map(|a| hsum(a));
        for j in 0..4 {
            out[j] += mins[j];
        }
        out
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_q4_k(row: &[u8], x: &Q16Act) -> f32 {
        let mut acc = _mm256_setzero_ps();
        let mut mins = 0.0f32;
        let pr = row.as_ptr();
        for sb in 0..x.d.len() / 8 {
            let blk = pr.add(144 * sb);
            let (d, dmin) = (f16(blk), f16(blk.add(2)));
            let scales: &[u8; 12] = &*(blk.add(4) as *const [u8; 12]);
            for c in 0..4 {
                // 32 bytes: low nibbles are sub-block 2c, high nibbles sub-block 2c + 1.
                let (lo0, hi0) = nibbles(_mm_loadu_si128(blk.add(16 + 32 * c) as *const __m128i));
                let (lo1, hi1) = nibbles(_mm_loadu_si128(blk.add(32 + 32 * c) as *const __m128i));
                for (h, (a, b)) in [(lo0, lo1), (hi0, hi1)].into_iter().enumerate() {
                    let j = 2 * c + h;
                    let (sc, m) = crate::quant::q4_k::scale_min(j, scales);
                    let xb = 8 * sb + j;
                    let dx = *x.d.get_unchecked(xb);
                    let s = dot32_u8(a, b, x, 32 * xb);
                    acc = _mm256_fmadd_ps(
                        _mm256_set1_ps(d * sc as f32 * dx),
                        _mm256_cvtepi32_ps(s),
                        acc,
                    );
                    let sx = *x.sum16.get_unchecked(2 * xb) + *x.sum16.get_unchecked(2 * xb + 1);
                    mins += dmin * m as f32 * dx * sx as f32;
                }
            }
        }
        hsum(acc) - mins
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot4_q4_k(row: &[u8], x: [&Q16Act; 4]) -> [f32; 4] {
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut mins = [0.0f32; 4];
        let pr = row.as_ptr();
        for sb in 0..x[0].d.len() / 8 {
            let blk = pr.add(144 * sb);
            let (d, dmin) = (f16(blk), f16(blk.add(2)));
            let scales: &[u8; 12] = &*(blk.add(4) as *const [u8; 12]);
            for c in 0..4 {
                // 32 bytes: low nibbles are sub-block 2c, high nibbles sub-block 2c + 1.
                let (lo0, hi0) = nibbles(_mm_loadu_si128(blk.add(16 + 32 * c) as *const __m128i));
                let (lo1, hi1) = nibbles(_mm_loadu_si128(blk.add(32 + 32 * c) as *const __m128i));
                for (h, (a, b)) in [(lo0, lo1), (hi0, hi1)].into_iter().enumerate() {
                    let j = 2 * c + h;
                    let (sc, m) = crate::quant::q4_k::scale_min(j, scales);
                    let xb = 8 * sb + j;
                    block4(
                        _mm256_cvtepu8_epi16(a),
                        _mm256_cvtepu8_epi16(b),
                        d * sc as f32,
                        &x,
                        xb,
                        &mut acc,
                    );
                    let dm = dmin * m as f32;
                    for i in 0..4 {
                        let xi = x[i];
                        let sx =
                            *xi.sum16.get_unchecked(2 * xb) + *xi.sum16.get_unchecked(2 * xb + 1);
                        mins[i] += dm * *xi.d.get_unchecked(xb) * sx as f32;
                    }
                }
            }
        }
        let mut out = acc.map(|a| hsum(a));
        for i in 0..4 {
            out[i] -= mins[i];
        }
        out
    }

    /// The 128 quants of half `n` (0 or 1) of a Q6_K block, with the stored offset of 32
    /// removed, as signed bytes: four vectors of 32 elements, part `p` holding elements
    /// `32p..32p + 32` of the half (scales `2p` and `2p + 1`).
    #[target_feature(enable = "avx2,fma")]
    unsafe fn q6_k_half(blk: *const u8, n: usize) -> [__m256i; 4] {
        let m4 = _mm256_set1_epi8(0xF);
        let m2 = _mm256_set1_epi8(3);
        let m32 = _mm256_set1_epi8(32);
        let ql0 = _mm256_loadu_si256(blk.add(64 * n) as *const __m256i);
        let ql1 = _mm256_loadu_si256(blk.add(64 * n + 32) as *const __m256i);
        let qh = _mm256_loadu_si256(blk.add(128 + 32 * n) as *const __m256i);
        let low = [
            _mm256_and_si256(ql0, m4),
            _mm256_and_si256(ql1, m4),
            _mm256_and_si256(_mm256_srli_epi16(ql0, 4), m4),
            _mm256_and_si256(_mm256_srli_epi16(ql1, 4), m4),
        ];
        let high = [
            qh,
            _mm256_srli_epi16(qh, 2),
            _mm256_srli_epi16(qh, 4),
            _mm256_srli_epi16(qh, 6),
        ];
        let mut q = [_mm256_setzero_si256(); 4];
        for part in 0..4 {
            let hi = _mm256_and_si256(high[part], m2);
            q[part] = _mm256_sub_epi8(_mm256_or_si256(low[part], _mm256_slli_epi16(hi, 4)), m32);
        }
        q
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot4_q6_k(row: &[u8], x: [&Q16Act; 4]) -> [f32; 4] {
        let mut acc = [_mm256_setzero_ps(); 4];
        let pr = row.as_ptr();
        for sb in 0..x[0].d.len() / 8 {
            let blk = pr.add(210 * sb);
            let d = f16(blk.add(208));
            for n in 0..2 {
                let sc = blk.add(192 + 8 * n) as *const i8;
                for (part, q) in q6_k_half(blk, n).into_iter().enumerate() {
                    let wl = _mm256_cvtepi8_epi16(_mm256_castsi256_si128(q));
                    let wh = _mm256_cvtepi8_epi16(_mm256_extracti128_si256(q, 1));
                    let xb = 8 * sb + 4 * n + part;
                    let s0 = _mm256_set1_epi32(*sc.add(2 * part) as i32);
                    let s1 = _mm256_set1_epi32(*sc.add(2 * part + 1) as i32);
                    for j in 0..4 {
                        let a = _mm256_madd_epi16(wl, xload(x[j], 32 * xb));
                        let b = _mm256_madd_epi16(wh, xload(x[j], 32 * xb + 16));
                        let scaled =
                            _mm256_add_epi32(_mm256_mullo_epi32(a, s0), _mm256_mullo_epi32(b, s1));
                        let dx = *x[j].d.get_unchecked(xb);
                        acc[j] = _mm256_fmadd_ps(
                            _mm256_set1_ps(d * dx),
                            _mm256_cvtepi32_ps(scaled),
                            acc[j],
                        );
                    }
                }
            }
        }
        acc.map(|a| hsum(a))
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_q6_k(row: &[u8], x: &Q16Act) -> f32 {
        let mut acc = _mm256_setzero_ps();
        let pr = row.as_ptr();
        for sb in 0..x.d.len() / 8 {
            let blk = pr.add(210 * sb);
            let d = f16(blk.add(208));
            for n in 0..2 {
                let sc = blk.add(192 + 8 * n) as *const i8;
                for (part, q) in q6_k_half(blk, n).into_iter().enumerate() {
                    let xb = 8 * sb + 4 * n + part;
                    // Elements 0..16 of this part have scale 2·part, 16..32 the next one.
                    let (s0, s1) = (*sc.add(2 * part) as i32, *sc.add(2 * part + 1) as i32);
                    let a = _mm256_madd_epi16(
                        _mm256_cvtepi8_epi16(_mm256_castsi256_si128(q)),
                        xload(x, 32 * xb),
                    );
                    let b = _mm256_madd_epi16(
                        _mm256_cvtepi8_epi16(_mm256_extracti128_si256(q, 1)),
                        xload(x, 32 * xb + 16),
                    );
                    // |lane| ≤ 2 · (2·32·32767·128) < 2³¹.
                    let scaled = _mm256_add_epi32(
                        _mm256_mullo_epi32(a, _mm256_set1_epi32(s0)),
                        _mm256_mullo_epi32(b, _mm256_set1_epi32(s1)),
                    );
                    let dx = *x.d.get_unchecked(xb);
                    acc = _mm256_fmadd_ps(_mm256_set1_ps(d * dx), _mm256_cvtepi32_ps(scaled), acc);
                }
            }
        }
        hsum(acc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::dequantize_row;

    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// Random bytes for a row of `blocks` blocks of `dtype`, with sane f16 scales.
    fn random_row(dtype: DType, blocks: usize, seed: u64) -> Vec<u8> {
        let bb = dtype.block_bytes();
        let mut s = seed | 1;
        let mut bytes: Vec<u8> = (0..blocks * bb)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                s as u8
            })
            .collect();
        let scale = |b: &mut [u8], at: usize, v: f32| {
            b[at..at + 2].copy_from_slice(&half::f16::from_f32(v).to_le_bytes())
        };
        for (i, blk) in bytes.chunks_exact_mut(bb).enumerate() {
            let v = 0.01 + 0.001 * (i % 7) as f32;
            match dtype {
                DType::Q8_0 | DType::Q4_0 => scale(blk, 0, v),
                DType::Q4_1 | DType::Q4_K => {
                    scale(blk, 0, v);
                    scale(blk, 2, v / 3.0);
                }
                DType::Q6_K => scale(blk, 208, v),
                _ => unreachable!(),
            }
        }
        bytes
    }

    #[test]
    fn quantized_dots_match_scalar_and_float_reference() {
        for dtype in [
            DType::Q8_0,
            DType::Q4_0,
            DType::Q4_1,
            DType::Q4_K,
            DType::Q6_K,
        ] {
            for blocks in [1usize, 3, 4] {
                let k = blocks * dtype.block_elems();
                let row = random_row(dtype, blocks, 5 + blocks as u64);
                let x = values(k, 3);
                let mut q = Q16Act::default();
                q.quantize(&x);
                let fast = dot(dtype, &row, &q);
                let scalar = dot_scalar(dtype, &row, &q);
                assert!(
                    (fast - scalar).abs() <= 1e-4 * (1.0 + scalar.abs()),
                    "{dtype} k={k}: {fast} vs {scalar}"
                );
                // Against f32 math on the exactly dequantized row and the dequantized activations.
                let mut w = vec![0.0; k];
                dequantize_row(dtype, &row, &mut w);
                let xd: Vec<f32> =
                    q.qs.iter()
                        .enumerate()
                        .map(|(i, &v)| v as f32 * q.d[i / 32])
                        .collect();
                let exact: f32 = w.iter().zip(&xd).map(|(a, b)| a * b).sum();
                assert!(
                    (scalar - exact).abs() <= 1e-4 * (1.0 + exact.abs()),
                    "{dtype} k={k}: {scalar} vs {exact}"
                );
                // And the activation quantization error stays small against f32 x.
                let full: f32 = w.iter().zip(&x).map(|(a, b)| a * b).sum();
                let wmax = w.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                assert!(
                    (exact - full).abs() <= wmax * k as f32 / 127.0,
                    "{dtype}: {exact} vs {full}"
                );
            }
        }
    }

    #[test]
    fn four_row_dots_equal_single_row_dots() {
        for dtype in [
            DType::Q8_0,
            DType::Q4_0,
            DType::Q4_1,
            DType::Q4_K,
            DType::Q6_K,
        ] {
            for blocks in [1usize, 3] {
                let k = blocks * dtype.block_elems();
                let row = random_row(dtype, blocks, 11 + blocks as u64);
                let qs: Vec<Q16Act> = (0..4)
                    .map(|j| {
                        let mut q = Q16Act::default();
                        q.quantize(&values(k, 20 + j));
                        q
                    })
                    .collect();
                let got = dot4(dtype, &row, [&qs[0], &qs[1], &qs[2], &qs[3]]);
                for (j, q) in qs.iter().enumerate() {
                    let want = dot_scalar(dtype, &row, q);
                    assert!(
                        (got[j] - want).abs() <= 1e-4 * (1.0 + want.abs()),
                        "{dtype} k={k} row {j}: {} vs {want}",
                        got[j]
                    );
                }
            }
        }
    }

    #[test]
    fn activation_quantization_round_trips_within_half_a_step() {
        let x = values(96, 9);
        let mut q = Q16Act::default();
        q.quantize(&x);
        for (i, &v) in x.iter().enumerate() {
            let d = q.d[i / 32];
            assert!((q.qs[i] as f32 * d - v).abs() <= 0.5 * d + 1e-9);
        }
        for g in 0..6 {
            let s: i32 = q.qs[16 * g..16 * g + 16].iter().map(|&v| v as i32).sum();
            assert_eq!(q.sum16[g], s);
        }
    }
}
