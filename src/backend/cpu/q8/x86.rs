//! x86-64 bodies of the 8-bit-activation kernels, written once and compiled per tier.
//!
//! The three tiers differ only in how a 32-byte run of unsigned weight bytes `u` meets the
//! signed activation bytes `x` (`acc += Σ u·x` over groups of four, in eight i32 lanes):
//! - `avx2`: `vpmaddubsw` to i16 pairs, then `vpmaddwd` by ones. Its i16 sums saturate above
//!   32767, so weights stay small: 4-, 5- and 6-bit quants are used unsigned (≤ 63) and their
//!   offsets applied through the activation sums; `Q8_0` moves its sign onto the activations
//!   (`|w|` times `sign(x, w)`).
//! - `avx-vnni`: `vpdpbusd` (VEX), one instruction, no saturation.
//! - `avx512`: `vpdpbusd` (EVEX, 256-bit here) for the row dots, and 512-bit for the packed
//!   prompt kernel, which holds 16 weight rows in one register.
//!
//! The row dots (decode) read blocks straight from the memory map with unaligned loads
//! (GGUF blocks are 18, 20, 34, 144, 176 and 210 bytes long).

// Kernels index several per-token arrays (accumulators, activation rows) with one counter.
#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;

use super::{Packed, Q8Act};
use crate::backend::cpu::isa::Isa;
use crate::quant::DType;

/// [`super::dot`] on an x86 tier.
pub fn dot(isa: Isa, dtype: DType, row: &[u8], x: &Q8Act) -> f32 {
    // SAFETY: the caller chose `isa` among the supported tiers; `row` holds the blocks of
    // `x.len()` elements (validated at load).
    unsafe {
        match isa {
            Isa::Avx512 => avx512::dot(dtype, row, x),
            Isa::AvxVnni => vnni::dot(dtype, row, x),
            _ => avx2::dot(dtype, row, x),
        }
    }
}

/// [`super::dot4`] on an x86 tier.
pub fn dot4(isa: Isa, dtype: DType, row: &[u8], x: [&Q8Act; 4]) -> [f32; 4] {
    // SAFETY: as in `dot`.
    unsafe {
        match isa {
            Isa::Avx512 => avx512::dot4(dtype, row, x),
            Isa::AvxVnni => vnni::dot4(dtype, row, x),
            _ => avx2::dot4(dtype, row, x),
        }
    }
}

/// [`super::gemm`] on a VNNI tier.
pub fn gemm(isa: Isa, p: &Packed, x: &[Q8Act], out: &mut [f32]) {
    assert!(p.biased && p.il == 4);
    // SAFETY: the tier is supported; `p` was packed with this tier's layout (asserted).
    unsafe {
        match isa {
            Isa::Avx512 => {
                assert_eq!(p.r, 16);
                gemm512(p, x, out)
            }
            Isa::AvxVnni => {
                assert_eq!(p.r, 8);
                vnni::gemm(p, x, out)
            }
            _ => unreachable!("no packed kernel on {isa}"),
        }
    }
}

/// The row-dot kernels, instantiated per tier with its multiply-add `$dp` and features.
macro_rules! row_kernels {
    ($feat:literal, $dp:path) => {
        use std::arch::x86_64::*;

        use crate::backend::cpu::q8::Q8Act;
        use crate::quant::DType;

        #[target_feature(enable = $feat)]
        unsafe fn f16(p: *const u8) -> f32 {
            let bits = (p as *const u16).read_unaligned();
            _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
        }

        #[target_feature(enable = $feat)]
        unsafe fn hsum(v: __m256) -> f32 {
            let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)))
        }

        /// The 32 activations of block `b`.
        #[target_feature(enable = $feat)]
        unsafe fn xb(x: &Q8Act, b: usize) -> __m256i {
            _mm256_loadu_si256(x.qs.as_ptr().add(32 * b) as *const __m256i)
        }

        /// 16 bytes of nibbles → 32 unsigned bytes: low nibbles (elements 0..16), then high
        /// nibbles (16..32), the order of `Q4_0`/`Q4_1` blocks.
        #[target_feature(enable = $feat)]
        unsafe fn nibbles32(p: *const u8) -> __m256i {
            let t = _mm_loadu_si128(p as *const __m128i);
            let both = _mm256_set_m128i(_mm_srli_epi16(t, 4), t);
            _mm256_and_si256(both, _mm256_set1_epi8(0xF))
        }

        /// 32 bytes of nibbles → (low nibbles, high nibbles), 32 unsigned bytes each (the two
        /// sub-blocks of a `Q4_K`/`Q5_K` chunk).
        #[target_feature(enable = $feat)]
        unsafe fn nibbles64(p: *const u8) -> (__m256i, __m256i) {
            let t = _mm256_loadu_si256(p as *const __m256i);
            let m = _mm256_set1_epi8(0xF);
            (
                _mm256_and_si256(t, m),
                _mm256_and_si256(_mm256_srli_epi16(t, 4), m),
            )
        }

        /// `Σ u·x` of one block as 8 i32 lanes (u unsigned ≤ 63, or any u8 on VNNI tiers).
        #[target_feature(enable = $feat)]
        unsafe fn mul(u: __m256i, x: __m256i) -> __m256i {
            $dp(_mm256_setzero_si256(), u, x)
        }

        /// `Σ w·x` of one block of signed weights `w` (|w| ≤ 127): the sign moves onto x.
        #[target_feature(enable = $feat)]
        unsafe fn mul_signed(w: __m256i, x: __m256i) -> __m256i {
            $dp(
                _mm256_setzero_si256(),
                _mm256_sign_epi8(w, w),
                _mm256_sign_epi8(x, w),
            )
        }

        /// The 128 unsigned 6-bit quants of half `n` of a `Q6_K` block, as four runs of 32
        /// elements (`32p..32p + 32` of the half).
        #[target_feature(enable = $feat)]
        unsafe fn q6_k_half(blk: *const u8, n: usize) -> [__m256i; 4] {
            let m4 = _mm256_set1_epi8(0xF);
            let m2 = _mm256_set1_epi8(0x30);
            let ql0 = _mm256_loadu_si256(blk.add(64 * n) as *const __m256i);
            let ql1 = _mm256_loadu_si256(blk.add(64 * n + 32) as *const __m256i);
            let qh = _mm256_loadu_si256(blk.add(128 + 32 * n) as *const __m256i);
            [
                _mm256_or_si256(
                    _mm256_and_si256(ql0, m4),
                    _mm256_and_si256(_mm256_slli_epi16(qh, 4), m2),
                ),
                _mm256_or_si256(
                    _mm256_and_si256(ql1, m4),
                    _mm256_and_si256(_mm256_slli_epi16(qh, 2), m2),
                ),
                _mm256_or_si256(
                    _mm256_and_si256(_mm256_srli_epi16(ql0, 4), m4),
                    _mm256_and_si256(qh, m2),
                ),
                _mm256_or_si256(
                    _mm256_and_si256(_mm256_srli_epi16(ql1, 4), m4),
                    _mm256_and_si256(_mm256_srli_epi16(qh, 2), m2),
                ),
            ]
        }

        /// The fifth bits of sub-blocks `2c` and `2c + 1` of a `Q5_K` block, as 16 in each
        /// byte that has it.
        #[target_feature(enable = $feat)]
        unsafe fn q5_high(qh: __m256i, c: usize) -> (__m256i, __m256i) {
            let sixteen = _mm256_set1_epi8(16);
            let b0 = _mm256_set1_epi8((1u8 << (2 * c)) as i8);
            let b1 = _mm256_set1_epi8((1u8 << (2 * c + 1)) as i8);
            (
                _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(qh, b0), b0), sixteen),
                _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(qh, b1), b1), sixteen),
            )
        }

        /// One row against `N` activation rows (`N` = 1 or 4): each weight block is unpacked
        /// once for all of them.
        #[target_feature(enable = $feat)]
        unsafe fn dot_n<const N: usize>(dtype: DType, row: &[u8], x: [&Q8Act; N]) -> [f32; N] {
            let mut acc = [_mm256_setzero_ps(); N];
            // Offset terms (Σ m·d·Σq) accumulated as scalars, once per group.
            let mut off = [0.0f32; N];
            let pr = row.as_ptr();
            let blocks = x[0].d.len();
            match dtype {
                DType::Q8_0 => {
                    for b in 0..blocks {
                        let blk = pr.add(34 * b);
                        let w = _mm256_loadu_si256(blk.add(2) as *const __m256i);
                        let dw = f16(blk);
                        for j in 0..N {
                            let s = mul_signed(w, xb(x[j], b));
                            let scale = _mm256_set1_ps(dw * *x[j].d.get_unchecked(b));
                            acc[j] = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(s), acc[j]);
                        }
                    }
                }
                DType::Q4_0 | DType::Q4_1 => {
                    let (bb, qo) = if dtype == DType::Q4_0 {
                        (18, 2)
                    } else {
                        (20, 4)
                    };
                    for b in 0..blocks {
                        let blk = pr.add(bb * b);
                        let u = nibbles32(blk.add(qo));
                        let dw = f16(blk);
                        // w = d·u + m with m = −8d (Q4_0) or the stored minimum (Q4_1).
                        let m = if dtype == DType::Q4_0 {
                            -8.0 * dw
                        } else {
                            f16(blk.add(2))
                        };
                        for j in 0..N {
                            let s = mul(u, xb(x[j], b));
                            let scale = _mm256_set1_ps(dw * *x[j].d.get_unchecked(b));
                            acc[j] = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(s), acc[j]);
                            off[j] += m * *x[j].dsum32.get_unchecked(b);
                        }
                    }
                }
                DType::Q4_K | DType::Q5_K => {
                    let five = dtype == DType::Q5_K;
                    let bb = if five { 176 } else { 144 };
                    for sb in 0..blocks / 8 {
                        let blk = pr.add(bb * sb);
                        let (d, dmin) = (f16(blk), f16(blk.add(2)));
                        let scales: &[u8; 12] = &*(blk.add(4) as *const [u8; 12]);
                        let qh = if five {
                            _mm256_loadu_si256(blk.add(16) as *const __m256i)
                        } else {
                            _mm256_setzero_si256()
                        };
                        let qs = blk.add(if five { 48 } else { 16 });
                        for c in 0..4 {
                            let (mut lo, mut hi) = nibbles64(qs.add(32 * c));
                            if five {
                                let (h0, h1) = q5_high(qh, c);
                                lo = _mm256_or_si256(lo, h0);
                                hi = _mm256_or_si256(hi, h1);
                            }
                            for (h, u) in [lo, hi].into_iter().enumerate() {
                                let sub = 2 * c + h;
                                let (sc, mn) = crate::quant::q4_k::scale_min(sub, scales);
                                let (ds, dm) = (d * sc as f32, dmin * mn as f32);
                                let b = 8 * sb + sub;
                                for j in 0..N {
                                    let s = mul(u, xb(x[j], b));
                                    let scale = _mm256_set1_ps(ds * *x[j].d.get_unchecked(b));
                                    acc[j] = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(s), acc[j]);
                                    off[j] -= dm * *x[j].dsum32.get_unchecked(b);
                                }
                            }
                        }
                    }
                }
                DType::Q6_K => {
                    for sb in 0..blocks / 8 {
                        let blk = pr.add(210 * sb);
                        let d = f16(blk.add(208));
                        for n in 0..2 {
                            let sc = blk.add(192 + 8 * n) as *const i8;
                            for (part, u) in q6_k_half(blk, n).into_iter().enumerate() {
                                let b = 8 * sb + 4 * n + part;
                                // Lanes 0..4 hold elements 0..16 (scale 2·part), 4..8 the rest.
                                let (s0, s1) =
                                    (*sc.add(2 * part) as i32, *sc.add(2 * part + 1) as i32);
                                let sv = _mm256_setr_epi32(s0, s0, s0, s0, s1, s1, s1, s1);
                                for j in 0..N {
                                    let s = _mm256_mullo_epi32(mul(u, xb(x[j], b)), sv);
                                    let scale = _mm256_set1_ps(d * *x[j].d.get_unchecked(b));
                                    acc[j] = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(s), acc[j]);
                                    // The stored offset of 32, per 16-element group.
                                    let ds = x[j].dsum16.as_ptr().add(2 * b);
                                    off[j] -= 32.0 * d * (s0 as f32 * *ds + s1 as f32 * *ds.add(1));
                                }
                            }
                        }
                    }
                }
                _ => panic!("no 8-bit-activation kernel for {dtype}"),
            }
            let mut out = [0.0f32; N];
            for j in 0..N {
                out[j] = hsum(acc[j]) + off[j];
            }
            out
        }

        pub unsafe fn dot(dtype: DType, row: &[u8], x: &Q8Act) -> f32 {
            dot_n::<1>(dtype, row, [x])[0]
        }

        pub unsafe fn dot4(dtype: DType, row: &[u8], x: [&Q8Act; 4]) -> [f32; 4] {
            dot_n::<4>(dtype, row, x)
        }
    };
}

/// `vpmaddubsw` + `vpmaddwd`: the AVX2 multiply-add of unsigned by signed bytes.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dp_avx2(acc: __m256i, u: __m256i, x: __m256i) -> __m256i {
    let pairs = _mm256_maddubs_epi16(u, x);
    _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)))
}

#[target_feature(enable = "avx2,fma,f16c,avxvnni")]
unsafe fn dp_vnni(acc: __m256i, u: __m256i, x: __m256i) -> __m256i {
    _mm256_dpbusd_avx_epi32(acc, u, x)
}

#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn dp_avx512(acc: __m256i, u: __m256i, x: __m256i) -> __m256i {
    _mm256_dpbusd_epi32(acc, u, x)
}

mod avx2 {
    row_kernels!("avx2,fma,f16c", super::dp_avx2);
}

mod vnni {
    row_kernels!("avx2,fma,f16c,avxvnni", super::dp_vnni);

    use crate::backend::cpu::q8::Packed;

    /// The packed prompt kernel with 8 rows per register (see [`super::gemm512`]).
    #[target_feature(enable = "avx2,fma,f16c,avxvnni")]
    pub unsafe fn gemm(p: &Packed, x: &[Q8Act], out: &mut [f32]) {
        let mut t = 0;
        while t + 4 <= x.len() {
            tile::<4>(p, &x[t..t + 4], &mut out[t * 8..]);
            t += 4;
        }
        while t < x.len() {
            tile::<1>(p, &x[t..t + 1], &mut out[t * 8..]);
            t += 1;
        }
    }

    #[target_feature(enable = "avx2,fma,f16c,avxvnni")]
    unsafe fn tile<const N: usize>(p: &Packed, x: &[Q8Act], out: &mut [f32]) {
        let (g, k) = (p.g, p.k);
        let mut acc = [_mm256_setzero_ps(); N];
        let q = p.q.as_ptr();
        for gi in 0..k / g {
            let mut isum = [_mm256_setzero_si256(); N];
            for c in 0..g / 4 {
                let kk = gi * g + 4 * c;
                let w = _mm256_loadu_si256(q.add(kk * 8) as *const __m256i);
                for j in 0..N {
                    let xv = _mm256_set1_epi32(
                        (x[j].qs.as_ptr().add(kk) as *const i32).read_unaligned(),
                    );
                    isum[j] = _mm256_dpbusd_avx_epi32(isum[j], w, xv);
                }
            }
            let dv = _mm256_loadu_ps(p.d.as_ptr().add(gi * 8));
            let mv = _mm256_loadu_ps(p.m.as_ptr().add(gi * 8));
            for j in 0..N {
                let (dx, dsum) = if g == 32 {
                    (*x[j].d.get_unchecked(gi), *x[j].dsum32.get_unchecked(gi))
                } else {
                    (
                        *x[j].d.get_unchecked(gi / 2),
                        *x[j].dsum16.get_unchecked(gi),
                    )
                };
                let scaled = _mm256_mul_ps(dv, _mm256_set1_ps(dx));
                acc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[j]), scaled, acc[j]);
                acc[j] = _mm256_fmadd_ps(mv, _mm256_set1_ps(dsum), acc[j]);
            }
        }
        for j in 0..N {
            _mm256_storeu_ps(out.as_mut_ptr().add(j * 8), acc[j]);
        }
    }
}

mod avx512 {
    row_kernels!(
        "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni",
        super::dp_avx512
    );
}

/// The packed prompt kernel: 16 weight rows per 512-bit register (one i32 lane per row),
/// four tokens at a time. For each run of four columns, one `vpdpbusd` adds four products
/// to each of the 16 rows' sums; at the end of each scale group the sums become floats once:
/// `acc += cvt(Σ) · d·dx + m · dx·Σq`.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn gemm512(p: &Packed, x: &[Q8Act], out: &mut [f32]) {
    let mut t = 0;
    while t + 4 <= x.len() {
        tile512::<4>(p, &x[t..t + 4], &mut out[t * 16..]);
        t += 4;
    }
    while t < x.len() {
        tile512::<1>(p, &x[t..t + 1], &mut out[t * 16..]);
        t += 1;
    }
}

#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn tile512<const N: usize>(p: &Packed, x: &[Q8Act], out: &mut [f32]) {
    let (g, k) = (p.g, p.k);
    let mut acc = [_mm512_setzero_ps(); N];
    let q = p.q.as_ptr();
    for gi in 0..k / g {
        let mut isum = [_mm512_setzero_si512(); N];
        for c in 0..g / 4 {
            let kk = gi * g + 4 * c;
            let w = _mm512_loadu_si512(q.add(kk * 16) as *const _);
            for j in 0..N {
                let xv =
                    _mm512_set1_epi32((x[j].qs.as_ptr().add(kk) as *const i32).read_unaligned());
                isum[j] = _mm512_dpbusd_epi32(isum[j], w, xv);
            }
        }
        let dv = _mm512_loadu_ps(p.d.as_ptr().add(gi * 16));
        let mv = _mm512_loadu_ps(p.m.as_ptr().add(gi * 16));
        for j in 0..N {
            let (dx, dsum) = if g == 32 {
                (*x[j].d.get_unchecked(gi), *x[j].dsum32.get_unchecked(gi))
            } else {
                (
                    *x[j].d.get_unchecked(gi / 2),
                    *x[j].dsum16.get_unchecked(gi),
                )
            };
            let scaled = _mm512_mul_ps(dv, _mm512_set1_ps(dx));
            acc[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum[j]), scaled, acc[j]);
            acc[j] = _mm512_fmadd_ps(mv, _mm512_set1_ps(dsum), acc[j]);
        }
    }
    for j in 0..N {
        _mm512_storeu_ps(out.as_mut_ptr().add(j * 16), acc[j]);
    }
}

/// [`super::gemm_interleaved`] on a VNNI tier.
pub fn gemm_interleaved(
    isa: Isa,
    w: &super::interleave::Interleaved,
    g: usize,
    x: &[Q8Act],
    out: &mut [f32],
) {
    // SAFETY: the tier is supported; `w` was interleaved with this tier's row count
    // (asserted), so every load stays inside the group's bytes.
    unsafe {
        match isa {
            Isa::Avx512 => {
                assert_eq!(w.r, 16);
                il512::gemm(w, g, x, out)
            }
            Isa::AvxVnni => {
                assert_eq!(w.r, 8);
                il256::gemm(w, g, x, out)
            }
            _ => unreachable!("no interleaved kernel on {isa}"),
        }
    }
}

/// [`super::gemm_interleaved_k`] on a VNNI tier.
pub fn gemm_interleaved_k(
    isa: Isa,
    w: &super::interleave::Interleaved,
    g: usize,
    x: &[super::Q8KAct],
    out: &mut [f32],
) {
    // SAFETY: as for `gemm_interleaved`.
    unsafe {
        match isa {
            Isa::Avx512 => {
                assert_eq!(w.r, 16);
                il512::gemm_k(w, g, x, out)
            }
            Isa::AvxVnni => {
                assert_eq!(w.r, 8);
                il256::gemm_k(w, g, x, out)
            }
            _ => unreachable!("no interleaved kernel on {isa}"),
        }
    }
}

/// The interleaved kernels, written once over a vector width: `$r` rows per register, with
/// the width's loads and multiply-adds supplied as small functions of the module (`ld`,
/// `dp`, …).
macro_rules! interleaved_kernels {
    ($feat:literal, $r:literal) => {
        use crate::backend::cpu::q8::interleave::Interleaved;
        use crate::backend::cpu::q8::{Q8Act, Q8KAct};
        use crate::quant::DType;

        /// `out[t·R + i] = Σ_k w[g·R + i][k] · x_t[k]` for the `R` rows of group `g`.
        #[target_feature(enable = $feat)]
        pub unsafe fn gemm(w: &Interleaved, g: usize, x: &[Q8Act], out: &mut [f32]) {
            let gp = w.group(g).as_ptr();
            let mut t = 0;
            while t + 4 <= x.len() {
                tile::<4>(w, gp, &x[t..t + 4], out.as_mut_ptr().add(t * $r));
                t += 4;
            }
            while t < x.len() {
                tile::<1>(w, gp, &x[t..t + 1], out.as_mut_ptr().add(t * $r));
                t += 1;
            }
        }

        /// [`gemm`] for the K-quants, against activations with a scale per 256 elements.
        #[target_feature(enable = $feat)]
        pub unsafe fn gemm_k(w: &Interleaved, g: usize, x: &[Q8KAct], out: &mut [f32]) {
            let gp = w.group(g).as_ptr();
            let mut t = 0;
            while t + 4 <= x.len() {
                tile_k::<4>(w, gp, &x[t..t + 4], out.as_mut_ptr().add(t * $r));
                t += 4;
            }
            while t < x.len() {
                tile_k::<1>(w, gp, &x[t..t + 1], out.as_mut_ptr().add(t * $r));
                t += 1;
            }
        }

        /// Four activation bytes of a row's quantized values `qs` at column `k`, in every
        /// lane.
        #[target_feature(enable = $feat)]
        unsafe fn bx(qs: &[i8], k: usize) -> I {
            set1i((qs.as_ptr().add(k) as *const i32).read_unaligned())
        }

        /// Asks for the cache lines of `bytes` bytes `PREFETCH` ahead of `p`: the weights
        /// stream once per step, and the hardware prefetcher alone left decode waiting on
        /// loads (measured: 61% of the bandwidth ceiling without this).
        #[target_feature(enable = $feat)]
        unsafe fn prefetch(p: *const u8, bytes: usize) {
            const PREFETCH: usize = 4096;
            let mut off = 0;
            while off < bytes {
                // A prefetch never faults, even past the end of the group.
                _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(PREFETCH + off) as *const i8);
                off += 64;
            }
        }

        #[target_feature(enable = $feat)]
        unsafe fn tile<const N: usize>(w: &Interleaved, gp: *const u8, x: &[Q8Act], out: *mut f32) {
            const R: usize = $r;
            let mut acc = [zerof(); N];
            let m4 = splat8(0xF);
            let blocks = w.k / w.dtype.block_elems();
            let bb = Interleaved::block_bytes(w.dtype, R);
            match w.dtype {
                DType::Q4_0 | DType::Q4_1 | DType::Q8_0 => {
                    let q8 = w.dtype == DType::Q8_0;
                    let q4_1 = w.dtype == DType::Q4_1;
                    // w = d·(nibble − 8), d·(u − 128) for Q8_0's biased bytes, or d·nibble + m
                    // for Q4_1: the offset, or the minimum, multiplies the activation block's
                    // sum.
                    let off = set1f(if q8 { -128.0 } else { -8.0 });
                    for b in 0..blocks {
                        let p = gp.add(b * bb);
                        prefetch(p, bb);
                        let dv = f16s(p);
                        let (mv, qs) = if q4_1 {
                            (f16s(p.add(2 * R)), p.add(4 * R))
                        } else {
                            (mul(dv, off), p.add(2 * R))
                        };
                        let mut isum = [zeroi(); N];
                        if q8 {
                            for c in 0..8 {
                                let u = ld(qs.add(c * 4 * R));
                                for j in 0..N {
                                    isum[j] = dp(isum[j], u, bx(&x[j].qs, 32 * b + 4 * c));
                                }
                            }
                        } else {
                            for c in 0..4 {
                                let v = ld(qs.add(c * 4 * R));
                                let lo = and(v, m4);
                                let hi = and(srli4(v), m4);
                                for j in 0..N {
                                    isum[j] = dp(isum[j], lo, bx(&x[j].qs, 32 * b + 4 * c));
                                    isum[j] = dp(isum[j], hi, bx(&x[j].qs, 32 * b + 16 + 4 * c));
                                }
                            }
                        }
                        for j in 0..N {
                            let dx = *x[j].d.get_unchecked(b);
                            let ds = *x[j].dsum32.get_unchecked(b);
                            acc[j] = fma(cvt(isum[j]), mul(dv, set1f(dx)), acc[j]);
                            acc[j] = fma(mv, set1f(ds), acc[j]);
                        }
                    }
                }
                _ => unreachable!("no interleaved layout for {}", w.dtype),
            }
            for j in 0..N {
                storef(out.add(j * R), acc[j]);
            }
        }

        /// The K-quant tile. Per super-block and token: the sub-block sums (integers, shifted
        /// by the activation block's power of two) times the rows' 6-bit scales accumulate in
        /// floats, the minimums or offsets accumulate
        /// as 16-bit pair products in integers, and the super-block's two scales apply once.
        #[target_feature(enable = $feat)]
        unsafe fn tile_k<const N: usize>(
            w: &Interleaved,
            gp: *const u8,
            x: &[Q8KAct],
            out: *mut f32,
        ) {
            const R: usize = $r;
            let mut acc = [zerof(); N];
            let m4 = splat8(0xF);
            let blocks = w.k / 256;
            let bb = Interleaved::block_bytes(w.dtype, R);
            match w.dtype {
                DType::Q4_K => {
                    for sb in 0..blocks {
                        let p = gp.add(sb * bb);
                        prefetch(p, bb);
                        let qs = p.add(20 * R);
                        let mut fs = [zerof(); N];
                        for c in 0..4 {
                            let mut lo_s = [zeroi(); N];
                            let mut hi_s = [zeroi(); N];
                            for q4 in 0..8 {
                                let v = ld(qs.add((8 * c + q4) * 4 * R));
                                let lo = and(v, m4);
                                let hi = and(srli4(v), m4);
                                let k0 = 256 * sb + 64 * c + 4 * q4;
                                for j in 0..N {
                                    lo_s[j] = dp(lo_s[j], lo, bx(&x[j].qs, k0));
                                    hi_s[j] = dp(hi_s[j], hi, bx(&x[j].qs, k0 + 32));
                                }
                            }
                            let sc_lo = u8s(p.add(4 * R + 2 * c * R));
                            let sc_hi = u8s(p.add(4 * R + (2 * c + 1) * R));
                            let b = 8 * sb + 2 * c;
                            for j in 0..N {
                                let (sh_lo, sh_hi) =
                                    (*x[j].sh.get_unchecked(b), *x[j].sh.get_unchecked(b + 1));
                                fs[j] = fma(cvt(shl(lo_s[j], sh_lo)), sc_lo, fs[j]);
                                fs[j] = fma(cvt(shl(hi_s[j], sh_hi)), sc_hi, fs[j]);
                            }
                        }
                        // Σ_sub mn·Σq, two sub-blocks per 16-bit pair multiply-add.
                        let mut ms = [zeroi(); N];
                        for pr in 0..4 {
                            let mn = u8pairs(p.add(12 * R + 2 * pr * R));
                            for j in 0..N {
                                let sums = *x[j].sum32x2.get_unchecked(4 * sb + pr);
                                ms[j] = dpw(ms[j], mn, set1i(sums));
                            }
                        }
                        let (dv, dminv) = (f16s(p), f16s(p.add(2 * R)));
                        for j in 0..N {
                            let dx = set1f(*x[j].d.get_unchecked(sb));
                            acc[j] = fma(fs[j], mul(dv, dx), acc[j]);
                            acc[j] = fnma(cvt(ms[j]), mul(dminv, dx), acc[j]);
                        }
                    }
                }
                DType::Q6_K => {
                    let m2 = splat8(0x30);
                    for sb in 0..blocks {
                        let p = gp.add(sb * bb);
                        prefetch(p, bb);
                        let (ql, qh) = (p.add(18 * R), p.add(146 * R));
                        let mut fs = [zerof(); N];
                        let mut os = [zeroi(); N];
                        for n in 0..2 {
                            // hl: elements l = 0..16 or 16..32 of each 32-run (one scale each).
                            for hl in 0..2 {
                                let mut s = [[zeroi(); N]; 4];
                                for c in 4 * hl..4 * hl + 4 {
                                    let l0 = ld(ql.add((16 * n + c) * 4 * R));
                                    let l1 = ld(ql.add((16 * n + 8 + c) * 4 * R));
                                    let h = ld(qh.add((8 * n + c) * 4 * R));
                                    let u = [
                                        or(and(l0, m4), and(slli4(h), m2)),
                                        or(and(l1, m4), and(slli2(h), m2)),
                                        or(and(srli4(l0), m4), and(h, m2)),
                                        or(and(srli4(l1), m4), and(srli2(h), m2)),
                                    ];
                                    for part in 0..4 {
                                        let k0 = 256 * sb + 128 * n + 32 * part + 4 * c;
                                        for j in 0..N {
                                            s[part][j] = dp(s[part][j], u[part], bx(&x[j].qs, k0));
                                        }
                                    }
                                }
                                for part in 0..4 {
                                    // The scales of both halves of this 32-run, as i16 pairs.
                                    let pr = 4 * n + part;
                                    let sp = i8pairs(p.add(2 * R + 2 * pr * R));
                                    let scale = cvt(if hl == 0 { lo16(sp) } else { hi16(sp) });
                                    let b = 8 * sb + pr;
                                    for j in 0..N {
                                        let v = shl(s[part][j], *x[j].sh.get_unchecked(b));
                                        fs[j] = fma(cvt(v), scale, fs[j]);
                                    }
                                    if hl == 1 {
                                        // Σ sc·Σq over both halves: the offset's factor.
                                        for j in 0..N {
                                            let sums = *x[j].sum16x2.get_unchecked(b);
                                            os[j] = dpw(os[j], sp, set1i(sums));
                                        }
                                    }
                                }
                            }
                        }
                        let dv = f16s(p);
                        for j in 0..N {
                            // Σ sc·Σ(u − 32)·q = Σ sc·Σ u·q − 32·Σ sc·Σ q.
                            let v = fma(cvt(os[j]), set1f(-32.0), fs[j]);
                            let dx = set1f(*x[j].d.get_unchecked(sb));
                            acc[j] = fma(v, mul(dv, dx), acc[j]);
                        }
                    }
                }
                _ => unreachable!("{} has no K-quant interleaved layout", w.dtype),
            }
            for j in 0..N {
                storef(out.add(j * R), acc[j]);
            }
        }
    };
}

/// 16 rows per 512-bit register (the `avx512` tier).
mod il512 {
    use std::arch::x86_64::*;
    type I = __m512i;
    type F = __m512;

    macro_rules! ops512 {
        ($($name:ident($($a:ident: $t:ty),*) -> $ret:ty $body:block)*) => {
            $(
                #[inline]
                #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
                unsafe fn $name($($a: $t),*) -> $ret $body
            )*
        };
    }
    ops512! {
        ld(p: *const u8) -> I { _mm512_loadu_si512(p as *const _) }
        and(a: I, b: I) -> I { _mm512_and_si512(a, b) }
        or(a: I, b: I) -> I { _mm512_or_si512(a, b) }
        srli4(a: I) -> I { _mm512_srli_epi16::<4>(a) }
        srli2(a: I) -> I { _mm512_srli_epi16::<2>(a) }
        slli4(a: I) -> I { _mm512_slli_epi16::<4>(a) }
        slli2(a: I) -> I { _mm512_slli_epi16::<2>(a) }
        splat8(v: i8) -> I { _mm512_set1_epi8(v) }
        set1i(v: i32) -> I { _mm512_set1_epi32(v) }
        zeroi() -> I { _mm512_setzero_si512() }
        dp(acc: I, u: I, x: I) -> I { _mm512_dpbusd_epi32(acc, u, x) }
        cvt(a: I) -> F { _mm512_cvtepi32_ps(a) }
        zerof() -> F { _mm512_setzero_ps() }
        set1f(v: f32) -> F { _mm512_set1_ps(v) }
        mul(a: F, b: F) -> F { _mm512_mul_ps(a, b) }
        fma(a: F, b: F, c: F) -> F { _mm512_fmadd_ps(a, b, c) }
        fnma(a: F, b: F, c: F) -> F { _mm512_fnmadd_ps(a, b, c) }
        dpw(acc: I, a: I, b: I) -> I { _mm512_dpwssd_epi32(acc, a, b) }
        u8pairs(p: *const u8) -> I { _mm512_cvtepu8_epi16(_mm256_loadu_si256(p as *const __m256i)) }
        i8pairs(p: *const u8) -> I { _mm512_cvtepi8_epi16(_mm256_loadu_si256(p as *const __m256i)) }
        lo16(a: I) -> I { _mm512_srai_epi32::<16>(_mm512_slli_epi32::<16>(a)) }
        hi16(a: I) -> I { _mm512_srai_epi32::<16>(a) }
        shl(a: I, n: i32) -> I { _mm512_sll_epi32(a, _mm_cvtsi32_si128(n)) }
        f16s(p: *const u8) -> F { _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i)) }
        u8s(p: *const u8) -> F { _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(p as *const __m128i))) }
        storef(p: *mut f32, v: F) -> () { _mm512_storeu_ps(p, v) }
    }

    interleaved_kernels!("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni", 16);
}

/// 8 rows per 256-bit register (the `avx-vnni` tier).
mod il256 {
    use std::arch::x86_64::*;
    type I = __m256i;
    type F = __m256;

    macro_rules! ops256 {
        ($($name:ident($($a:ident: $t:ty),*) -> $ret:ty $body:block)*) => {
            $(
                #[inline]
                #[target_feature(enable = "avx2,fma,f16c,avxvnni")]
                unsafe fn $name($($a: $t),*) -> $ret $body
            )*
        };
    }
    ops256! {
        ld(p: *const u8) -> I { _mm256_loadu_si256(p as *const __m256i) }
        and(a: I, b: I) -> I { _mm256_and_si256(a, b) }
        or(a: I, b: I) -> I { _mm256_or_si256(a, b) }
        srli4(a: I) -> I { _mm256_srli_epi16::<4>(a) }
        srli2(a: I) -> I { _mm256_srli_epi16::<2>(a) }
        slli4(a: I) -> I { _mm256_slli_epi16::<4>(a) }
        slli2(a: I) -> I { _mm256_slli_epi16::<2>(a) }
        splat8(v: i8) -> I { _mm256_set1_epi8(v) }
        set1i(v: i32) -> I { _mm256_set1_epi32(v) }
        zeroi() -> I { _mm256_setzero_si256() }
        dp(acc: I, u: I, x: I) -> I { _mm256_dpbusd_avx_epi32(acc, u, x) }
        cvt(a: I) -> F { _mm256_cvtepi32_ps(a) }
        zerof() -> F { _mm256_setzero_ps() }
        set1f(v: f32) -> F { _mm256_set1_ps(v) }
        mul(a: F, b: F) -> F { _mm256_mul_ps(a, b) }
        fma(a: F, b: F, c: F) -> F { _mm256_fmadd_ps(a, b, c) }
        fnma(a: F, b: F, c: F) -> F { _mm256_fnmadd_ps(a, b, c) }
        dpw(acc: I, a: I, b: I) -> I { _mm256_dpwssd_avx_epi32(acc, a, b) }
        u8pairs(p: *const u8) -> I { _mm256_cvtepu8_epi16(_mm_loadu_si128(p as *const __m128i)) }
        i8pairs(p: *const u8) -> I { _mm256_cvtepi8_epi16(_mm_loadu_si128(p as *const __m128i)) }
        lo16(a: I) -> I { _mm256_srai_epi32::<16>(_mm256_slli_epi32::<16>(a)) }
        hi16(a: I) -> I { _mm256_srai_epi32::<16>(a) }
        shl(a: I, n: i32) -> I { _mm256_sll_epi32(a, _mm_cvtsi32_si128(n)) }
        f16s(p: *const u8) -> F { _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)) }
        u8s(p: *const u8) -> F { _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(p as *const __m128i))) }
        storef(p: *mut f32, v: F) -> () { _mm256_storeu_ps(p, v) }
    }

    interleaved_kernels!("avx2,fma,f16c,avxvnni", 8);
}
