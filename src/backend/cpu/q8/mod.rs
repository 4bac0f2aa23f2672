//! Quantized weights times 8-bit-quantized activations, as llama.cpp computes them.
//!
//! Activations are quantized once per matmul into [`Q8Act`]: i8 values, one f32 scale per
//! 32 elements (llama.cpp's `Q8_0`), and the sums of the values per 16 elements, which apply
//! the formats' offsets and minimums once per group instead of once per element. Every weight
//! format is read as signed 8-bit values `s` with a scale and an offset per 16 or 32 elements
//! (`w = d·s + m`, see [`unpack_row`]), so a product is integer multiply-adds over a group,
//! then one float fused multiply-add per group and row:
//! `Σ w·x = Σ_g dx_g · (d_g · Σ s·q + m_g · Σ q)`.
//!
//! Two shapes of work:
//! - **Decode** ([`dot`], [`dot4`]): a weight row meets one (or four) activation rows, read
//!   in its stored format and unpacked in registers (x86: AVX2 `vpmaddubsw`, AVX-VNNI and
//!   AVX-512 `vpdpbusd`; aarch64: NEON and `sdot`).
//! - **Prompts** ([`gemm`]): a group of weight rows is unpacked once into [`Packed`], rows
//!   interleaved so that one SIMD lane holds one row, then every token of the step meets it:
//!   the unpacking is paid once per step, and each multiply-add instruction serves a whole
//!   group of rows with no horizontal sums (x86 VNNI tiers, aarch64 `sdot` and `smmla`).
//!
//! - **Interleaved weights** ([`interleave::Interleaved`], VNNI tiers): the `Q4_0`, `Q8_0`,
//!   `Q4_K` and `Q6_K` matrices are re-laid once at load with 16 (or 8) rows interleaved, and
//!   [`gemm_interleaved`] serves decode and prompts alike with one row per SIMD lane. The
//!   K-quants ([`gemm_interleaved_k`]) read activations with one scale per 256 elements
//!   refined by powers of two ([`Q8KAct`]), so their sub-block scales apply to integer sums.
//!
//! The scalar functions here are the reference every SIMD tier is tested against. How exact
//! 8-bit activations are is measured, not assumed: see `wick perplexity --kl-divergence` and
//! the GGUF oracle tests; [`super::ActQuant::Q16`] keeps the 16-bit path for exact work.

#[cfg(target_arch = "aarch64")]
mod arm;
pub mod interleave;
#[cfg(target_arch = "x86_64")]
mod x86;

use super::isa::Isa;
use crate::quant::DType;

/// An activation row quantized to 8 bits in blocks of 32.
#[derive(Clone, Debug, Default)]
pub struct Q8Act {
    /// `[K]` quantized values, |q| ≤ 127.
    pub qs: Vec<i8>,
    /// `[K/32]` scale of each block.
    pub d: Vec<f32>,
    /// `[K/16]` sum of the quantized values of each 16-element group.
    pub sum16: Vec<i32>,
    /// `[K/16]` `d · sum16` of each group (the offset terms' factor, precomputed).
    pub dsum16: Vec<f32>,
    /// `[K/32]` `d · (sum16[2b] + sum16[2b+1])`.
    pub dsum32: Vec<f32>,
}

impl Q8Act {
    /// Quantizes `x` (length a multiple of 32) into `self`, reusing its buffers. Rounding is
    /// to nearest, as llama.cpp's `quantize_row_q8_0`.
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
        self.dsum16.resize(n / 16, 0.0);
        self.dsum32.resize(n / 32, 0.0);
        for (b, xb) in x.chunks_exact(32).enumerate() {
            let amax = xb.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let d = amax / 127.0;
            let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
            self.d[b] = d;
            let q = &mut self.qs[32 * b..32 * b + 32];
            for (qi, &v) in q.iter_mut().zip(xb) {
                *qi = super::round_half_away(v * inv) as i8;
            }
            for g in 0..2 {
                let s: i32 = q[16 * g..16 * g + 16].iter().map(|&v| v as i32).sum();
                self.sum16[2 * b + g] = s;
                self.dsum16[2 * b + g] = d * s as f32;
            }
            self.dsum32[b] = d * (self.sum16[2 * b] + self.sum16[2 * b + 1]) as f32;
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.qs.len()
    }

    /// Whether the row is empty.
    pub fn is_empty(&self) -> bool {
        self.qs.is_empty()
    }
}

/// An activation row quantized to 8 bits for the interleaved K-quant kernels: one scale
/// per 256 elements, refined per block of 32 by a power of two. With a scale shared across a
/// super-block, the weight's per-sub-block scales and minimums apply to integer sums and the
/// float work is once per super-block instead of once per sub-block (see
/// [`gemm_interleaved_k`]).
///
/// Element `i` is `d[i/256] · 2^sh[i/32] · qs[i]`. A block of 32 whose largest value is
/// below half, a quarter or an eighth of its super-block's takes a step 2, 4 or 8 times
/// finer (`sh` = 2, 1, 0; `sh` = 3 is the super-block's step `amax/127`), so a quiet block
/// next to an outlier keeps most of the precision a scale of its own would give. Measured on
/// the GGUF Q4_K_M fixture (worst top-10 |Δ log-prob| against the float oracle): one step per
/// 256 as llama.cpp's `Q8_K` 0.49 (llama.cpp's own run 0.34), these steps 0.23, [`Q8Act`]'s
/// per-32 scales 0.15. The integer sums are shifted left by `sh` before the weight's scales
/// apply.
#[derive(Clone, Debug, Default)]
pub struct Q8KAct {
    /// `[K]` quantized values, |q| ≤ 127.
    pub qs: Vec<i8>,
    /// `[K/256]` the finest step of each super-block (an eighth of `amax/127`).
    pub d: Vec<f32>,
    /// `[K/32]` the power of two (0..=3) of each block of 32's step over `d`.
    pub sh: Vec<i32>,
    /// `[K/32]` the sums of the two 16-element halves of each 32-element block, shifted by
    /// the block's `sh`, as a pair of i16 (low half first): the operand of a 16-bit pair
    /// multiply-add (`vpdpwssd`).
    pub sum16x2: Vec<i32>,
    /// `[K/64]` the sums of the two 32-element blocks of each 64, each shifted by its `sh`,
    /// as a pair of i16.
    pub sum32x2: Vec<i32>,
}

/// Two i16 halves in one i32: `lo` in the low 16 bits.
fn i16_pair(lo: i32, hi: i32) -> i32 {
    debug_assert!(i16::try_from(lo).is_ok() && i16::try_from(hi).is_ok());
    ((lo as u32 & 0xFFFF) | ((hi as u32) << 16)) as i32
}

impl Q8KAct {
    /// Quantizes `x` (length a multiple of 256) into `self`, reusing its buffers, rounding to
    /// nearest as [`Q8Act::quantize`] does.
    pub fn quantize(&mut self, x: &[f32]) {
        assert!(
            x.len().is_multiple_of(256),
            "activation length {} is not whole super-blocks",
            x.len()
        );
        let n = x.len();
        self.qs.resize(n, 0);
        self.d.resize(n / 256, 0.0);
        self.sh.resize(n / 32, 0);
        self.sum16x2.resize(n / 32, 0);
        self.sum32x2.resize(n / 64, 0);
        let amax = |v: &[f32]| v.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        for (sb, xs) in x.chunks_exact(256).enumerate() {
            let top = amax(xs);
            let d = top / 127.0 / 8.0;
            self.d[sb] = d;
            for (b, xb) in xs.chunks_exact(32).enumerate() {
                let a = amax(xb);
                // The finest step (of 8d, 4d, 2d, d) that still holds the block's largest
                // value within ±127.
                let mut sh = 3;
                while sh > 0 && a * 2.0 <= top / (1 << (3 - sh)) as f32 {
                    sh -= 1;
                }
                let step = d * (1 << sh) as f32;
                let inv = if step > 0.0 { 1.0 / step } else { 0.0 };
                let i = 8 * sb + b;
                self.sh[i] = sh;
                for (qi, &v) in self.qs[32 * i..32 * i + 32].iter_mut().zip(xb) {
                    *qi = super::round_half_away(v * inv).clamp(-127, 127) as i8;
                }
            }
        }
        let sum = |q: &[i8]| q.iter().map(|&v| v as i32).sum::<i32>();
        for (b, q) in self.qs.chunks_exact(32).enumerate() {
            let sh = self.sh[b];
            self.sum16x2[b] = i16_pair(sum(&q[..16]) << sh, sum(&q[16..]) << sh);
        }
        for (c, q) in self.qs.chunks_exact(64).enumerate() {
            let (s0, s1) = (
                sum(&q[..32]) << self.sh[2 * c],
                sum(&q[32..]) << self.sh[2 * c + 1],
            );
            self.sum32x2[c] = i16_pair(s0, s1);
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.qs.len()
    }

    /// Whether the row is empty.
    pub fn is_empty(&self) -> bool {
        self.qs.is_empty()
    }
}

/// Whether the interleaved kernel for `dtype` reads [`Q8KAct`] (per-256 activation scales,
/// the K-quants) rather than [`Q8Act`].
pub fn interleaved_wants_q8k(dtype: DType) -> bool {
    matches!(dtype, DType::Q4_K | DType::Q6_K)
}

/// Scalar reference for the interleaved K-quant kernels: the dequantized row against the
/// dequantized activations, summed in f64.
pub fn dot_scalar_k(dtype: DType, row: &[u8], x: &Q8KAct) -> f32 {
    let k = x.len();
    let mut w = vec![0.0f32; k];
    crate::quant::dequantize_row(dtype, row, &mut w);
    w.iter()
        .enumerate()
        .map(|(i, &w)| {
            let step = x.d[i / 256] as f64 * (1 << x.sh[i / 32]) as f64;
            w as f64 * step * x.qs[i] as f64
        })
        .sum::<f64>() as f32
}

/// Whether `dtype` has 8-bit-activation kernels.
pub fn supported(dtype: DType) -> bool {
    matches!(
        dtype,
        DType::Q8_0 | DType::Q4_0 | DType::Q4_1 | DType::Q4_K | DType::Q5_K | DType::Q6_K
    )
}

/// Elements per scale group of `dtype` in the unpacked form: 16 for `Q6_K` (a scale per 16
/// elements), 32 for the others.
pub fn group(dtype: DType) -> usize {
    if dtype == DType::Q6_K {
        16
    } else {
        32
    }
}

fn f16_at(b: &[u8], i: usize) -> f32 {
    half::f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// Unpacks one stored row of `K = s.len()` elements into signed values `s`, and a scale `d`
/// and offset `m` per group of [`group`]`(dtype)` elements, such that element `k` of group
/// `g` is `d[g]·s[k] + m[g]` (equal to the dequantized weight up to f32 rounding):
///
/// | format | `s` | `d` | `m` |
/// |---|---|---|---|
/// | Q8_0 | q | d | 0 |
/// | Q4_0 | q − 8 | d | 0 |
/// | Q4_1 | q − 8 | d | m + 8d |
/// | Q4_K | q − 8 | d·sc | 8·d·sc − dmin·mn |
/// | Q5_K | q − 16 | d·sc | 16·d·sc − dmin·mn |
/// | Q6_K | q − 32 | d·sc | 0 |
///
/// Centering the quants keeps `|s| ≤ 32` for the 4-, 5- and 6-bit formats, which the
/// saturating AVX2 `vpmaddubsw` and NEON's signed `sdot` both need.
pub fn unpack_row(dtype: DType, row: &[u8], s: &mut [i8], d: &mut [f32], m: &mut [f32]) {
    let k = s.len();
    let g = group(dtype);
    assert!(
        k.is_multiple_of(dtype.block_elems()) && d.len() == k / g && m.len() == k / g,
        "unpack_row: {k} elements of {dtype} into {} groups",
        d.len()
    );
    let bb = dtype.block_bytes();
    match dtype {
        DType::Q8_0 | DType::Q4_0 | DType::Q4_1 => {
            for (b, blk) in row.chunks_exact(bb).take(k / 32).enumerate() {
                let out = &mut s[32 * b..32 * b + 32];
                let db = f16_at(blk, 0);
                d[b] = db;
                match dtype {
                    DType::Q8_0 => {
                        for (o, &q) in out.iter_mut().zip(&blk[2..34]) {
                            *o = q as i8;
                        }
                        m[b] = 0.0;
                    }
                    DType::Q4_0 => {
                        for (j, &q) in blk[2..18].iter().enumerate() {
                            out[j] = (q & 0xF) as i8 - 8;
                            out[j + 16] = (q >> 4) as i8 - 8;
                        }
                        m[b] = 0.0;
                    }
                    _ => {
                        for (j, &q) in blk[4..20].iter().enumerate() {
                            out[j] = (q & 0xF) as i8 - 8;
                            out[j + 16] = (q >> 4) as i8 - 8;
                        }
                        m[b] = f16_at(blk, 2) + 8.0 * db;
                    }
                }
            }
        }
        DType::Q4_K | DType::Q5_K => {
            let five = dtype == DType::Q5_K;
            for (sb, blk) in row.chunks_exact(bb).take(k / 256).enumerate() {
                let (dd, dmin) = (f16_at(blk, 0), f16_at(blk, 2));
                let scales: &[u8; 12] = blk[4..16].try_into().expect("12 bytes");
                let (qh, qs) = if five {
                    (&blk[16..48], &blk[48..176])
                } else {
                    (&blk[0..0], &blk[16..144])
                };
                for j in 0..8 {
                    let (sc, mn) = crate::quant::q4_k::scale_min(j, scales);
                    let ds = dd * sc as f32;
                    let off = if five { 16 } else { 8 };
                    d[8 * sb + j] = ds;
                    m[8 * sb + j] = off as f32 * ds - dmin * mn as f32;
                    let chunk = &qs[32 * (j / 2)..32 * (j / 2) + 32];
                    let out = &mut s[256 * sb + 32 * j..256 * sb + 32 * j + 32];
                    for l in 0..32 {
                        let mut q = if j % 2 == 0 {
                            chunk[l] & 0xF
                        } else {
                            chunk[l] >> 4
                        } as i8;
                        if five && qh[l] & (1 << j) != 0 {
                            q += 16;
                        }
                        out[l] = q - off;
                    }
                }
            }
        }
        DType::Q6_K => {
            for (sb, blk) in row.chunks_exact(bb).take(k / 256).enumerate() {
                let dd = f16_at(blk, 208);
                for n in 0..2 {
                    let ql = &blk[64 * n..64 * n + 64];
                    let qh = &blk[128 + 32 * n..128 + 32 * n + 32];
                    let out = &mut s[256 * sb + 128 * n..256 * sb + 128 * n + 128];
                    for l in 0..32 {
                        out[l] = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i8 - 32;
                        out[l + 32] = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i8 - 32;
                        out[l + 64] = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i8 - 32;
                        out[l + 96] = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i8 - 32;
                    }
                    for g in 0..8 {
                        d[16 * sb + 8 * n + g] = dd * (blk[192 + 8 * n + g] as i8) as f32;
                        m[16 * sb + 8 * n + g] = 0.0;
                    }
                }
            }
        }
        _ => panic!("no 8-bit-activation kernels for {dtype}"),
    }
}

/// `Σ w·x` of one weight row stored as `dtype` with the quantized activations `x`, on `isa`.
pub fn dot(isa: Isa, dtype: DType, row: &[u8], x: &Q8Act) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if isa.is_x86() {
        return x86::dot(isa, dtype, row, x);
    }
    #[cfg(target_arch = "aarch64")]
    if isa.is_arm() {
        return arm::dot(isa, dtype, row, x);
    }
    let _ = isa;
    dot_scalar(dtype, row, x)
}

/// [`dot`] of one weight row with four activation rows, unpacking each weight block once.
pub fn dot4(isa: Isa, dtype: DType, row: &[u8], x: [&Q8Act; 4]) -> [f32; 4] {
    #[cfg(target_arch = "x86_64")]
    if isa.is_x86() {
        return x86::dot4(isa, dtype, row, x);
    }
    #[cfg(target_arch = "aarch64")]
    if isa.is_arm() {
        return arm::dot4(isa, dtype, row, x);
    }
    x.map(|x| dot(isa, dtype, row, x))
}

/// Scalar reference of [`dot`]: the unpacked row against the activations, group by group,
/// integer sums first.
pub fn dot_scalar(dtype: DType, row: &[u8], x: &Q8Act) -> f32 {
    let k = x.len();
    let g = group(dtype);
    let mut s = vec![0i8; k];
    let (mut d, mut m) = (vec![0.0; k / g], vec![0.0; k / g]);
    unpack_row(dtype, row, &mut s, &mut d, &mut m);
    let mut acc = 0.0f32;
    for gi in 0..k / g {
        let lo = gi * g;
        let isum: i32 = s[lo..lo + g]
            .iter()
            .zip(&x.qs[lo..lo + g])
            .map(|(&a, &b)| a as i32 * b as i32)
            .sum();
        let (dx, dsum) = if g == 32 {
            (x.d[gi], x.dsum32[gi])
        } else {
            (x.d[gi / 2], x.dsum16[gi])
        };
        acc += dx * d[gi] * isum as f32 + m[gi] * dsum;
    }
    acc
}

/// Weight rows unpacked for [`gemm`]: groups of `r` rows interleaved `il` bytes at a time.
///
/// Layout for a group of `r` rows and `K` columns:
/// - `q`: `[K/il][r][il]` — for each run of `il` columns, `il` consecutive values of row 0,
///   then of row 1, …; stored as i8 `s`, or as `s + 128` (u8) when `biased` (x86's
///   `vpdpbusd` multiplies unsigned by signed bytes).
/// - `d`, `m`: `[K/G][r]` — scale and offset of each group of G = [`group`] columns, with the
///   bias folded into `m` (`m − 128·d`) when `biased`.
///
/// Rows past the end of the matrix are zero (their results are not stored).
#[derive(Default)]
pub struct Packed {
    /// Interleaved values.
    pub q: Vec<u8>,
    /// Scales, `[K/G][r]`.
    pub d: Vec<f32>,
    /// Offsets, `[K/G][r]`.
    pub m: Vec<f32>,
    /// Columns.
    pub k: usize,
    /// Elements per scale group (16 or 32).
    pub g: usize,
    /// Rows per group.
    pub r: usize,
    /// Interleave width in bytes.
    pub il: usize,
    /// Whether values are stored as `s + 128` (u8) with `−128·d` folded into `m`.
    pub biased: bool,
    // Scratch for one unpacked row.
    s: Vec<i8>,
    sd: Vec<f32>,
    sm: Vec<f32>,
}

impl Packed {
    /// Unpacks up to `r` rows (`rows`, each a stored row of `k` elements of `dtype`) into
    /// `self`, interleaved `il` bytes at a time, biased to unsigned when `biased`.
    pub fn pack(
        &mut self,
        dtype: DType,
        rows: &[&[u8]],
        k: usize,
        r: usize,
        il: usize,
        biased: bool,
    ) {
        assert!(rows.len() <= r && k.is_multiple_of(32) && 32 % il == 0);
        let g = group(dtype);
        (self.k, self.g, self.r, self.il, self.biased) = (k, g, r, il, biased);
        self.q.clear();
        self.q.resize(k * r, if biased { 128 } else { 0 });
        self.d.clear();
        self.d.resize(k / g * r, 0.0);
        self.m.clear();
        self.m.resize(k / g * r, 0.0);
        self.s.resize(k, 0);
        self.sd.resize(k / g, 0.0);
        self.sm.resize(k / g, 0.0);
        for (ri, row) in rows.iter().enumerate() {
            unpack_row(dtype, row, &mut self.s, &mut self.sd, &mut self.sm);
            for c in 0..k / il {
                let dst = &mut self.q[(c * r + ri) * il..(c * r + ri + 1) * il];
                for (o, &v) in dst.iter_mut().zip(&self.s[c * il..(c + 1) * il]) {
                    *o = if biased {
                        (v as i16 + 128) as u8
                    } else {
                        v as u8
                    };
                }
            }
            for gi in 0..k / g {
                let (dv, mv) = (self.sd[gi], self.sm[gi]);
                self.d[gi * r + ri] = dv;
                self.m[gi * r + ri] = if biased { mv - 128.0 * dv } else { mv };
            }
        }
    }
}

/// The packing [`gemm`] wants on `isa`: rows per group, interleave bytes, biased, or `None`
/// where the tier has no packed kernel (the caller then uses [`dot`] row by row).
pub fn gemm_layout(isa: Isa) -> Option<(usize, usize, bool)> {
    match isa {
        Isa::Avx512 => Some((16, 4, true)),
        Isa::AvxVnni => Some((8, 4, true)),
        #[cfg(target_arch = "aarch64")]
        Isa::Dotprod | Isa::I8mm => arm::gemm_layout(isa),
        _ => None,
    }
}

/// Rows per group of the interleaved layout on `isa`, or `None` where the tier has no
/// interleaved kernel.
pub fn interleave_rows(isa: Isa) -> Option<usize> {
    match isa {
        Isa::Avx512 => Some(16),
        Isa::AvxVnni => Some(8),
        _ => None,
    }
}

/// [`gemm_interleaved`] for the formats of [`interleaved_wants_q8k`] (`Q4_K`, `Q6_K`): the
/// activations carry one scale per 256 elements, so each row's sub-block scales multiply
/// integer sums and the minimums (`Q4_K`) and the offset of 32 (`Q6_K`) are 16-bit pair
/// multiply-adds of the weight's 6-bit values with the activation sums: one float
/// multiply-add per sub-block and token, and the rest once per super-block.
pub fn gemm_interleaved_k(
    isa: Isa,
    w: &interleave::Interleaved,
    g: usize,
    x: &[Q8KAct],
    out: &mut [f32],
) {
    assert!(g < w.groups() && out.len() >= x.len() * w.r);
    assert!(interleaved_wants_q8k(w.dtype), "{} reads Q8Act", w.dtype);
    assert!(
        x.iter().all(|x| x.len() == w.k),
        "activation rows of {} columns",
        w.k
    );
    #[cfg(target_arch = "x86_64")]
    if interleave_rows(isa) == Some(w.r) {
        return x86::gemm_interleaved_k(isa, w, g, x, out);
    }
    panic!("{isa} has no interleaved kernel for {} rows", w.r)
}

/// `out[t·r + i] = Σ_k w[g·r + i][k] · x_t[k]` for the `r` rows of group `g` of `w`
/// (interleaved for `isa`, a format not in [`interleaved_wants_q8k`]) and every activation
/// row of `x`.
pub fn gemm_interleaved(
    isa: Isa,
    w: &interleave::Interleaved,
    g: usize,
    x: &[Q8Act],
    out: &mut [f32],
) {
    assert!(g < w.groups() && out.len() >= x.len() * w.r);
    assert!(!interleaved_wants_q8k(w.dtype), "{} reads Q8KAct", w.dtype);
    assert!(
        x.iter().all(|x| x.len() == w.k),
        "activation rows of {} columns",
        w.k
    );
    #[cfg(target_arch = "x86_64")]
    if interleave_rows(isa) == Some(w.r) {
        return x86::gemm_interleaved(isa, w, g, x, out);
    }
    panic!("{isa} has no interleaved kernel for {} rows", w.r)
}

/// `out[t][i] = Σ_k w_i[k] · x_t[k]` for the `p.r` rows of `p` (packed for `isa` with
/// [`gemm_layout`]) and every activation row of `x`; `out` is `[x.len()][p.r]`.
pub fn gemm(isa: Isa, p: &Packed, x: &[Q8Act], out: &mut [f32]) {
    assert!(out.len() >= x.len() * p.r);
    #[cfg(target_arch = "x86_64")]
    if isa.is_x86() && gemm_layout(isa).is_some() {
        return x86::gemm(isa, p, x, out);
    }
    #[cfg(target_arch = "aarch64")]
    if isa.is_arm() && gemm_layout(isa).is_some() {
        return arm::gemm(isa, p, x, out);
    }
    let _ = isa;
    gemm_scalar(p, x, out)
}

/// Scalar reference of [`gemm`], reading the packed layout.
pub fn gemm_scalar(p: &Packed, x: &[Q8Act], out: &mut [f32]) {
    let (r, il, g, k) = (p.r, p.il, p.g, p.k);
    for (t, xt) in x.iter().enumerate() {
        for ri in 0..r {
            let mut acc = 0.0f32;
            for gi in 0..k / g {
                let mut isum = 0i32;
                for kk in gi * g..(gi + 1) * g {
                    let v = p.q[(kk / il * r + ri) * il + kk % il];
                    let v = if p.biased { v as i32 } else { v as i8 as i32 };
                    isum += v * xt.qs[kk] as i32;
                }
                let (dx, dsum) = if g == 32 {
                    (xt.d[gi], xt.dsum32[gi])
                } else {
                    (xt.d[gi / 2], xt.dsum16[gi])
                };
                acc += dx * p.d[gi * r + ri] * isum as f32 + p.m[gi * r + ri] * dsum;
            }
            out[t * r + ri] = acc;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::dequantize_row;

    const FORMATS: [DType; 6] = [
        DType::Q8_0,
        DType::Q4_0,
        DType::Q4_1,
        DType::Q4_K,
        DType::Q5_K,
        DType::Q6_K,
    ];

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

    /// Random bytes for `blocks` blocks of `dtype`, with sane f16 scales.
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
                DType::Q4_1 | DType::Q4_K | DType::Q5_K => {
                    scale(blk, 0, v);
                    scale(blk, 2, v / 3.0);
                }
                DType::Q6_K => scale(blk, 208, v),
                _ => unreachable!(),
            }
        }
        bytes
    }

    fn quantized(x: &[f32]) -> Q8Act {
        let mut q = Q8Act::default();
        q.quantize(x);
        q
    }

    /// What the quantized activations stand for.
    fn dequantized(q: &Q8Act) -> Vec<f32> {
        q.qs.iter()
            .enumerate()
            .map(|(i, &v)| v as f32 * q.d[i / 32])
            .collect()
    }

    fn close(got: f32, want: f32, scale: f32) -> bool {
        (got - want).abs() <= 1e-5 * scale + 1e-4 * want.abs()
    }

    #[test]
    fn unpacked_rows_are_the_dequantized_weights() {
        for dtype in FORMATS {
            let k = 2 * dtype.block_elems().max(32) * if dtype.block_elems() == 32 { 4 } else { 1 };
            let row = random_row(dtype, k / dtype.block_elems(), 7);
            let g = group(dtype);
            let mut s = vec![0i8; k];
            let (mut d, mut m) = (vec![0.0; k / g], vec![0.0; k / g]);
            unpack_row(dtype, &row, &mut s, &mut d, &mut m);
            let mut want = vec![0.0; k];
            dequantize_row(dtype, &row, &mut want);
            for i in 0..k {
                let got = d[i / g] * s[i] as f32 + m[i / g];
                assert!(
                    (got - want[i]).abs() <= 1e-5 * (1.0 + want[i].abs()),
                    "{dtype} [{i}]: {got} vs {}",
                    want[i]
                );
            }
        }
    }

    #[test]
    fn scalar_dot_is_the_exact_product_of_the_quantized_operands() {
        for dtype in FORMATS {
            for blocks in [1usize, 3] {
                let k = blocks * dtype.block_elems().max(256);
                let row = random_row(dtype, k / dtype.block_elems(), 5 + blocks as u64);
                let x = quantized(&values(k, 3));
                let mut w = vec![0.0; k];
                dequantize_row(dtype, &row, &mut w);
                let exact: f32 = w.iter().zip(dequantized(&x)).map(|(a, b)| a * b).sum();
                let scale: f32 = w.iter().map(|v| v.abs()).sum();
                let got = dot_scalar(dtype, &row, &x);
                assert!(close(got, exact, scale), "{dtype} k={k}: {got} vs {exact}");
            }
        }
    }

    /// Every tier this CPU has, every format, against the scalar reference.
    #[test]
    fn every_tier_matches_the_scalar_dots() {
        for isa in Isa::supported() {
            for dtype in FORMATS {
                for blocks in [1usize, 2, 3] {
                    let k = blocks * dtype.block_elems().max(256);
                    let row = random_row(dtype, k / dtype.block_elems(), 11 + blocks as u64);
                    let mut w = vec![0.0; k];
                    dequantize_row(dtype, &row, &mut w);
                    let scale: f32 = w.iter().map(|v| v.abs()).sum();
                    let xs: Vec<Q8Act> = (0..4).map(|j| quantized(&values(k, 20 + j))).collect();
                    let four = dot4(isa, dtype, &row, [&xs[0], &xs[1], &xs[2], &xs[3]]);
                    for (j, x) in xs.iter().enumerate() {
                        let want = dot_scalar(dtype, &row, x);
                        let one = dot(isa, dtype, &row, x);
                        assert!(
                            close(one, want, scale),
                            "{isa} {dtype} k={k}: {one} vs {want}"
                        );
                        assert!(
                            close(four[j], want, scale),
                            "{isa} {dtype} k={k} dot4[{j}]: {} vs {want}",
                            four[j]
                        );
                    }
                }
            }
        }
    }

    /// Extreme activations: a block holding ±127 everywhere is where saturating
    /// multiply-adds break.
    #[test]
    fn saturating_inputs_stay_exact() {
        for isa in Isa::supported() {
            for dtype in FORMATS {
                let k = dtype.block_elems().max(256);
                let mut row = random_row(dtype, k / dtype.block_elems(), 3);
                if dtype == DType::Q8_0 {
                    // Weights of ±127 and −128 against activations of ±127.
                    for (i, blk) in row.chunks_exact_mut(34).enumerate() {
                        for (j, b) in blk[2..].iter_mut().enumerate() {
                            *b = [127u8, 128, 129, 1][(i + j) % 4];
                        }
                    }
                }
                let x: Vec<f32> = (0..k)
                    .map(|i| if i % 3 == 0 { -1.0 } else { 1.0 })
                    .collect();
                let x = quantized(&x);
                let mut w = vec![0.0; k];
                dequantize_row(dtype, &row, &mut w);
                let scale: f32 = w.iter().map(|v| v.abs()).sum();
                let want = dot_scalar(dtype, &row, &x);
                let got = dot(isa, dtype, &row, &x);
                assert!(close(got, want, scale), "{isa} {dtype}: {got} vs {want}");
            }
        }
    }

    /// The packed prompt kernel of every tier that has one, on partial row groups and token
    /// counts around its tile of four, against the row dots.
    #[test]
    fn packed_kernels_match_row_dots() {
        let mut isas: Vec<Isa> = Isa::supported();
        isas.retain(|&i| gemm_layout(i).is_some());
        // The scalar reading of each tier's layout, even where the CPU lacks the tier.
        let layouts = [(16, 4, true), (8, 4, true), (4, 4, false), (2, 8, false)];
        for dtype in FORMATS {
            let k = 2 * dtype.block_elems().max(256);
            let bpr = k / dtype.block_elems();
            let nrows = 11;
            let data: Vec<Vec<u8>> = (0..nrows)
                .map(|i| random_row(dtype, bpr, 100 + i as u64))
                .collect();
            for t in [1usize, 3, 4, 5, 9] {
                let xs: Vec<Q8Act> = (0..t)
                    .map(|j| quantized(&values(k, 40 + j as u64)))
                    .collect();
                let want: Vec<Vec<f32>> = xs
                    .iter()
                    .map(|x| data.iter().map(|r| dot_scalar(dtype, r, x)).collect())
                    .collect();
                let scale = |i: usize| {
                    let mut w = vec![0.0; k];
                    dequantize_row(dtype, &data[i], &mut w);
                    w.iter().map(|v| v.abs()).sum::<f32>()
                };
                let check = |name: &str,
                             r: usize,
                             il: usize,
                             biased: bool,
                             run: &dyn Fn(&Packed, &mut [f32])| {
                    let mut p = Packed::default();
                    for g0 in (0..nrows).step_by(r) {
                        let rows: Vec<&[u8]> = data[g0..nrows.min(g0 + r)]
                            .iter()
                            .map(|v| v.as_slice())
                            .collect();
                        p.pack(dtype, &rows, k, r, il, biased);
                        let mut out = vec![f32::NAN; t * r];
                        run(&p, &mut out);
                        for (tt, w) in want.iter().enumerate() {
                            for i in 0..rows.len() {
                                let got = out[tt * r + i];
                                assert!(
                                    close(got, w[g0 + i], scale(g0 + i)),
                                    "{name} {dtype} t={t} token {tt} row {}: {got} vs {}",
                                    g0 + i,
                                    w[g0 + i]
                                );
                            }
                        }
                    }
                };
                for (r, il, biased) in layouts {
                    check("scalar", r, il, biased, &|p, out| gemm_scalar(p, &xs, out));
                }
                for &isa in &isas {
                    let (r, il, biased) = gemm_layout(isa).unwrap();
                    check(isa.name(), r, il, biased, &|p, out| gemm(isa, p, &xs, out));
                }
            }
        }
    }

    #[test]
    fn activation_quantization_round_trips_within_half_a_step() {
        let x = values(96, 9);
        let q = quantized(&x);
        for (i, &v) in x.iter().enumerate() {
            let d = q.d[i / 32];
            assert!((q.qs[i] as f32 * d - v).abs() <= 0.5 * d + 1e-9);
            assert!(q.qs[i] != i8::MIN);
        }
        for g in 0..6 {
            let s: i32 = q.qs[16 * g..16 * g + 16].iter().map(|&v| v as i32).sum();
            assert_eq!(q.sum16[g], s);
            assert_eq!(q.dsum16[g], q.d[g / 2] * s as f32);
        }
        // An all-zero block has scale 0 and zero values.
        let z = quantized(&[0.0; 32]);
        assert_eq!((z.d[0], z.sum16[0]), (0.0, 0));
    }
}
