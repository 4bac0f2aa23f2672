//! aarch64 bodies of the 8-bit-activation kernels, written once and compiled per tier.
//!
//! The tiers differ in how 16 signed weight bytes `w` meet 16 activation bytes `x`
//! (`acc += Σ w·x`, four i32 lanes):
//! - `neon`: `smull` + `smlal2` to i16 pairs, then `sadalp` into the i32 lanes (three
//!   instructions). Two products of |w| ≤ 128 and |x| ≤ 127 fit an i16, so any weight byte
//!   works; for the 4-, 5- and 6-bit quants (|w| ≤ 63) four products fit, and a 32-byte
//!   block costs five instructions instead of six.
//! - `dotprod`: one `sdot` (lane `i` sums the products of bytes `4i..4i + 4`).
//! - `i8mm`: the row dots are `dotprod`'s; the packed prompt kernel uses `smmla`, which
//!   multiplies a 2×8 tile of weights (two rows, eight columns) by an 8×2 tile of activations
//!   (two tokens): 32 multiply-adds per instruction where `sdot` does 16.
//!
//! Both operands are signed, so unlike x86's `vpmaddubsw`/`vpdpbusd` nothing needs moving
//! between operands. Quants are used as stored where the format has an offset term anyway
//! (`Q4_1`, `Q4_K`, `Q5_K`: unsigned, offset through [`Q8Act::dsum32`] as on x86), and centred
//! where it does not (`Q4_0`: `u − 8`, `Q6_K`: `u − 32`): the subtraction is done once per
//! weight block, while an offset term costs a load and a multiply-add per activation row.
//!
//! `sdot` and `smmla` are written with `asm!`: their Rust intrinsics (`vdotq_s32`,
//! `vmmlaq_s32`) are unstable, and so is the f16 vector type, so the f16 block scales are
//! converted with `fcvt` in `asm!` too.
//!
//! ## Instructions per weight block in the decode loop (one activation row)
//!
//! Counted in the compiled loops (rustc 1.95 `-O`, each format's kernel specialised, loop
//! overhead included), per 32 weights (`Q*_K`: a super-block's loop divided by 8), against
//! the AVX2 tier's row kernel in `x86.rs` (`vpmaddubsw` + `vpmaddwd`, one 256-bit register
//! per block):
//!
//! | format | AVX2 | NEON | dotprod |
//! |---|---:|---:|---:|
//! | Q8_0 | 16 | 13.5 | 10.8 |
//! | Q4_0 | 20 | 16 | 14.3 |
//! | Q4_1 | 21 | 16.5 | 14.5 |
//! | Q4_K | 25.4 | 15.8 | 13.8 |
//! | Q5_K | 30.3 | 21.8 | 18.6 |
//! | Q6_K | 40.4 | 22.8 | 18.6 |
//!
//! NEON needs two 128-bit registers per block where AVX2 needs one, and wins it back three
//! ways: `sdot` is one instruction per 16 bytes where AVX2 needs two per 32; the block sums
//! of four blocks (or sub-blocks) are gathered with pairwise adds (`addp`) into one vector,
//! so the int→float conversion and the scale multiply-add are paid once per four blocks, with
//! the four scales converted and multiplied as a vector; and the `Q4_K`/`Q5_K` scales and
//! minimums of a super-block are unpacked at once (llama.cpp's word shuffle) instead of per
//! sub-block, the minimums' offset term going into the same accumulator. With four
//! activation rows ([`dot4`]) the unpacking is shared: about 6 to 10 instructions per block
//! and row on `dotprod`.

use std::arch::aarch64::*;
use std::arch::asm;

use super::{Packed, Q8Act};
use crate::backend::cpu::isa::Isa;
use crate::quant::DType;

/// [`super::dot`] on an aarch64 tier.
pub fn dot(isa: Isa, dtype: DType, row: &[u8], x: &Q8Act) -> f32 {
    // SAFETY: the caller chose `isa` among the supported tiers; `row` holds the blocks of
    // `x.len()` elements (validated at load).
    unsafe {
        match isa {
            Isa::Dotprod | Isa::I8mm => sdot::dot(dtype, row, x),
            _ => neon::dot(dtype, row, x),
        }
    }
}

/// [`super::dot4`] on an aarch64 tier.
pub fn dot4(isa: Isa, dtype: DType, row: &[u8], x: [&Q8Act; 4]) -> [f32; 4] {
    // SAFETY: as in `dot`.
    unsafe {
        match isa {
            Isa::Dotprod | Isa::I8mm => sdot::dot4(dtype, row, x),
            _ => neon::dot4(dtype, row, x),
        }
    }
}

/// The packed layout of [`gemm`]: 8 rows, 4-byte runs for `sdot` by lane (two registers of
/// four rows), 8-byte runs for `smmla` (four registers of two rows). Plain NEON has no
/// packed kernel: without `sdot`, a lane cannot sum four products of its own row cheaply.
pub fn gemm_layout(isa: Isa) -> Option<(usize, usize, bool)> {
    match isa {
        Isa::Dotprod => Some((8, 4, false)),
        Isa::I8mm => Some((8, 8, false)),
        _ => None,
    }
}

/// [`super::gemm`] on the `dotprod` or `i8mm` tier.
pub fn gemm(isa: Isa, p: &Packed, x: &[Q8Act], out: &mut [f32]) {
    assert!(
        gemm_layout(isa) == Some((p.r, p.il, p.biased)),
        "rows packed as ({}, {}, {}) for the {isa} kernel",
        p.r,
        p.il,
        p.biased
    );
    // SAFETY: the tier is supported; `p` was packed with this tier's layout (asserted), and
    // `out` holds `x.len()` rows of `p.r` (asserted by the caller).
    unsafe {
        match isa {
            Isa::I8mm => gemm_smmla(p, x, out),
            _ => gemm_sdot(p, x, out),
        }
    }
}

/// An f16 at `p` (any alignment) as f32; `fcvt` is base ARMv8.
#[inline(always)]
unsafe fn f16(p: *const u8) -> f32 {
    let v: f32;
    asm!(
        "ldr {v:h}, [{p}]",
        "fcvt {v:s}, {v:h}",
        p = in(reg) p,
        v = out(vreg) v,
        options(pure, readonly, nostack, preserves_flags)
    );
    v
}

/// Four f16s at `p`, `p + stride`, … (any alignment) as f32s; `fcvtl` is base NEON.
#[inline(always)]
unsafe fn f16x4(p: *const u8, stride: usize) -> float32x4_t {
    let h = [0, 1, 2, 3].map(|i| (p.add(i * stride) as *const u16).read_unaligned());
    let h = vld1_u16(h.as_ptr());
    let v: float32x4_t;
    asm!(
        "fcvtl {v:v}.4s, {h:v}.4h",
        h = in(vreg) h,
        v = lateout(vreg) v,
        options(pure, nomem, nostack, preserves_flags)
    );
    v
}

/// `acc + Σ a·b` over 16 bytes, four products per lane (`sdot`).
#[target_feature(enable = "neon,dotprod")]
#[inline]
unsafe fn sdot16(mut acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
    asm!(
        "sdot {acc:v}.4s, {a:v}.16b, {b:v}.16b",
        acc = inout(vreg) acc,
        a = in(vreg) a,
        b = in(vreg) b,
        options(pure, nomem, nostack, preserves_flags)
    );
    acc
}

/// `sdot16` of a block of 32 small weights (`|a| ≤ 63`).
#[target_feature(enable = "neon,dotprod")]
#[inline]
unsafe fn sdot32(a: [int8x16_t; 2], b: [int8x16_t; 2]) -> int32x4_t {
    sdot16(sdot16(vdupq_n_s32(0), a[0], b[0]), a[1], b[1])
}

/// `acc + Σ a·b` over 16 bytes (|a| ≤ 128, |b| ≤ 127) without `sdot`: pairs of products
/// in i16, then pairwise added into the i32 lanes.
#[target_feature(enable = "neon")]
#[inline]
unsafe fn neon16(acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
    let p = vmull_s8(vget_low_s8(a), vget_low_s8(b));
    vpadalq_s16(acc, vmlal_high_s8(p, a, b))
}

/// `Σ a·b` of a block of 32 small weights (`|a| ≤ 63`, so four products fit an i16).
#[target_feature(enable = "neon")]
#[inline]
unsafe fn neon32(a: [int8x16_t; 2], b: [int8x16_t; 2]) -> int32x4_t {
    let p = vmull_s8(vget_low_s8(a[0]), vget_low_s8(b[0]));
    let p = vmlal_high_s8(p, a[0], b[0]);
    let p = vmlal_s8(p, vget_low_s8(a[1]), vget_low_s8(b[1]));
    vpaddlq_s16(vmlal_high_s8(p, a[1], b[1]))
}

/// `acc + Σ a·b` over 16 bytes, `b` being four bytes at lane `L` of `x` broadcast: lane `i`
/// adds the products of `a`'s bytes `4i..4i + 4` with them (`sdot` by element).
#[target_feature(enable = "neon,dotprod")]
#[inline]
unsafe fn sdot_lane<const L: i32>(mut acc: int32x4_t, a: int8x16_t, x: int8x16_t) -> int32x4_t {
    asm!(
        "sdot {acc:v}.4s, {a:v}.16b, {x:v}.4b[{l}]",
        acc = inout(vreg) acc,
        a = in(vreg) a,
        x = in(vreg) x,
        l = const L,
        options(pure, nomem, nostack, preserves_flags)
    );
    acc
}

/// `acc + a·bᵀ`: `a` two rows of eight, `b` two rows of eight, `acc` the 2×2 result
/// row-major (`smmla`).
#[target_feature(enable = "neon,dotprod,i8mm")]
#[inline]
unsafe fn smmla(mut acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
    asm!(
        "smmla {acc:v}.4s, {a:v}.16b, {b:v}.16b",
        acc = inout(vreg) acc,
        a = in(vreg) a,
        b = in(vreg) b,
        options(pure, nomem, nostack, preserves_flags)
    );
    acc
}

/// The eight sub-block scales and minimums of a `Q4_K`/`Q5_K` super-block at `blk`, times
/// the block's `d` and `dmin`: (`d·sc`, `dmin·mn`), four sub-blocks per vector. The 6-bit
/// fields are unpacked with llama.cpp's word shuffle.
#[inline(always)]
unsafe fn k_scales(blk: *const u8) -> ([float32x4_t; 2], [float32x4_t; 2]) {
    const LOW6: u32 = 0x3f3f_3f3f;
    const LOW4: u32 = 0x0f0f_0f0f;
    const LOW2: u32 = 0x0303_0303;
    let w = |i: usize| (blk.add(4 + 4 * i) as *const u32).read_unaligned();
    let (w0, w1, w2) = (w(0), w(1), w(2));
    // Bytes: sc 0..4, sc 4..8, mn 0..4, mn 4..8 (as `quant::q4_k::scale_min`).
    let u = [
        w0 & LOW6,
        (w2 & LOW4) | (((w0 >> 6) & LOW2) << 4),
        w1 & LOW6,
        ((w2 >> 4) & LOW4) | (((w1 >> 6) & LOW2) << 4),
    ];
    let b = vreinterpretq_u8_u32(vld1q_u32(u.as_ptr()));
    let (sc, mn) = (vmovl_u8(vget_low_u8(b)), vmovl_high_u8(b));
    let f = |v: uint16x8_t, k: f32| {
        [
            vmulq_n_f32(vcvtq_f32_u32(vmovl_u16(vget_low_u16(v))), k),
            vmulq_n_f32(vcvtq_f32_u32(vmovl_high_u16(v)), k),
        ]
    };
    (f(sc, f16(blk)), f(mn, f16(blk.add(2))))
}

/// The row-dot kernels, instantiated per tier with its 16-byte multiply-add `$dp16`, its
/// 32-byte one for small weights `$dp32`, and its features.
macro_rules! row_kernels {
    ($feat:literal, $dp16:path, $dp32:path) => {
        use std::arch::aarch64::*;

        use super::{f16, f16x4, k_scales};
        use crate::backend::cpu::q8::Q8Act;
        use crate::quant::DType;

        /// The 32 activations of block `b`.
        #[target_feature(enable = $feat)]
        #[inline]
        unsafe fn xb(x: &Q8Act, b: usize) -> [int8x16_t; 2] {
            let p = x.qs.as_ptr().add(32 * b);
            [vld1q_s8(p), vld1q_s8(p.add(16))]
        }

        #[target_feature(enable = $feat)]
        #[inline]
        unsafe fn s8(v: uint8x16_t) -> int8x16_t {
            vreinterpretq_s8_u8(v)
        }

        /// The 128 6-bit quants of half `n` of a `Q6_K` block, centred (`u − 32`), as four
        /// runs of 32 elements (`32p..32p + 32` of the half); each run is two groups of 16
        /// with their own scales.
        #[target_feature(enable = $feat)]
        #[inline]
        unsafe fn q6_k_half(blk: *const u8, n: usize) -> [[int8x16_t; 2]; 4] {
            let m3 = vdupq_n_u8(3);
            let m30 = vdupq_n_u8(0x30);
            let c32 = vdupq_n_s8(32);
            let mut out = [[vdupq_n_s8(0); 2]; 4];
            for h in 0..2 {
                let ql0 = vld1q_u8(blk.add(64 * n + 16 * h));
                let ql1 = vld1q_u8(blk.add(64 * n + 32 + 16 * h));
                let qh = vld1q_u8(blk.add(128 + 32 * n + 16 * h));
                // `sli`/`sri` insert the shifted high bits and keep the other nibble's place.
                let u = [
                    vsliq_n_u8::<4>(ql0, vandq_u8(qh, m3)),
                    vsliq_n_u8::<4>(ql1, vandq_u8(vshrq_n_u8::<2>(qh), m3)),
                    vsriq_n_u8::<4>(vandq_u8(qh, m30), ql0),
                    vsriq_n_u8::<4>(vandq_u8(vshrq_n_u8::<2>(qh), m30), ql1),
                ];
                for p in 0..4 {
                    out[p][h] = vsubq_s8(s8(u[p]), c32);
                }
            }
            out
        }

        const Q8_0: u8 = 0;
        const Q4_0: u8 = 1;
        const Q4_1: u8 = 2;

        /// The 32 weights of a `Q8_0`, `Q4_0` (centred) or `Q4_1` (unsigned) block.
        #[target_feature(enable = $feat)]
        #[inline]
        unsafe fn weights32<const F: u8>(blk: *const u8) -> [int8x16_t; 2] {
            if F == Q8_0 {
                return [
                    vld1q_s8(blk.add(2) as *const i8),
                    vld1q_s8(blk.add(18) as *const i8),
                ];
            }
            let t = vld1q_u8(blk.add(if F == Q4_0 { 2 } else { 4 }));
            let u = [s8(vandq_u8(t, vdupq_n_u8(0xF))), s8(vshrq_n_u8::<4>(t))];
            if F == Q4_0 {
                let c8 = vdupq_n_s8(8);
                [vsubq_s8(u[0], c8), vsubq_s8(u[1], c8)]
            } else {
                u
            }
        }

        /// `Σ w·x` of one block as four i32 lanes.
        #[target_feature(enable = $feat)]
        #[inline]
        unsafe fn sum32<const F: u8>(w: [int8x16_t; 2], x: [int8x16_t; 2]) -> int32x4_t {
            if F == Q8_0 {
                // |w| ≤ 128: the general multiply-add.
                $dp16($dp16(vdupq_n_s32(0), w[0], x[0]), w[1], x[1])
            } else {
                $dp32(w, x)
            }
        }

        /// The formats with a scale (and `Q4_1` a minimum) per block of 32: four blocks at
        /// a time, their sums gathered into one vector (lane `i`, block `i`) so that each
        /// activation row pays one conversion and one float multiply-add per four blocks.
        #[target_feature(enable = $feat)]
        #[inline]
        unsafe fn dot_32<const N: usize, const F: u8>(
            pr: *const u8,
            x: [&Q8Act; N],
            acc: &mut [float32x4_t; N],
            off: &mut [f32; N],
        ) {
            let bb = [34, 18, 20][F as usize];
            let blocks = x[0].d.len();
            let mut b = 0;
            while b + 4 <= blocks {
                let blk = pr.add(bb * b);
                let w = [
                    weights32::<F>(blk),
                    weights32::<F>(blk.add(bb)),
                    weights32::<F>(blk.add(2 * bb)),
                    weights32::<F>(blk.add(3 * bb)),
                ];
                let d = f16x4(blk, bb);
                // Q4_1: w = d·u + m.
                let m = if F == Q4_1 {
                    f16x4(blk.add(2), bb)
                } else {
                    vdupq_n_f32(0.0)
                };
                for j in 0..N {
                    let s = [
                        sum32::<F>(w[0], xb(x[j], b)),
                        sum32::<F>(w[1], xb(x[j], b + 1)),
                        sum32::<F>(w[2], xb(x[j], b + 2)),
                        sum32::<F>(w[3], xb(x[j], b + 3)),
                    ];
                    let s = vpaddq_s32(vpaddq_s32(s[0], s[1]), vpaddq_s32(s[2], s[3]));
                    let scale = vmulq_f32(d, vld1q_f32(x[j].d.as_ptr().add(b)));
                    acc[j] = vfmaq_f32(acc[j], vcvtq_f32_s32(s), scale);
                    if F == Q4_1 {
                        acc[j] = vfmaq_f32(acc[j], m, vld1q_f32(x[j].dsum32.as_ptr().add(b)));
                    }
                }
                b += 4;
            }
            for b in b..blocks {
                let blk = pr.add(bb * b);
                let w = weights32::<F>(blk);
                let dw = f16(blk);
                for j in 0..N {
                    let s = sum32::<F>(w, xb(x[j], b));
                    let scale = dw * *x[j].d.get_unchecked(b);
                    acc[j] = vfmaq_n_f32(acc[j], vcvtq_f32_s32(s), scale);
                    if F == Q4_1 {
                        off[j] += f16(blk.add(2)) * *x[j].dsum32.get_unchecked(b);
                    }
                }
            }
        }

        /// One row against `N` activation rows (`N` = 1 or 4): each weight block is unpacked
        /// once for all of them.
        #[target_feature(enable = $feat)]
        unsafe fn dot_n<const N: usize>(dtype: DType, row: &[u8], x: [&Q8Act; N]) -> [f32; N] {
            let mut acc = [vdupq_n_f32(0.0); N];
            // Offset terms (Σ m·d·Σq) accumulated as scalars, once per group.
            let mut off = [0.0f32; N];
            let pr = row.as_ptr();
            let blocks = x[0].d.len();
            let m4 = vdupq_n_u8(0xF);
            let zero = vdupq_n_s32(0);
            match dtype {
                DType::Q8_0 => dot_32::<N, Q8_0>(pr, x, &mut acc, &mut off),
                DType::Q4_0 => dot_32::<N, Q4_0>(pr, x, &mut acc, &mut off),
                DType::Q4_1 => dot_32::<N, Q4_1>(pr, x, &mut acc, &mut off),
                DType::Q4_K | DType::Q5_K => {
                    let five = dtype == DType::Q5_K;
                    let bb = if five { 176 } else { 144 };
                    let sixteen = vdupq_n_u8(16);
                    for sb in 0..blocks / 8 {
                        let blk = pr.add(bb * sb);
                        let (ds, dm) = k_scales(blk);
                        // Per row: the eight sub-blocks' `d·sc·dx`, and the offsets
                        // `−dmin·mn·dx·Σq` straight into the accumulator.
                        let mut scale = [[vdupq_n_f32(0.0); 2]; N];
                        for j in 0..N {
                            let xd = x[j].d.as_ptr().add(8 * sb);
                            let xs = x[j].dsum32.as_ptr().add(8 * sb);
                            for h in 0..2 {
                                scale[j][h] = vmulq_f32(ds[h], vld1q_f32(xd.add(4 * h)));
                                acc[j] = vfmsq_f32(acc[j], dm[h], vld1q_f32(xs.add(4 * h)));
                            }
                        }
                        let qh = if five {
                            [vld1q_u8(blk.add(16)), vld1q_u8(blk.add(32))]
                        } else {
                            [vdupq_n_u8(0); 2]
                        };
                        let qs = blk.add(if five { 48 } else { 16 });
                        let mut pair = [zero; N];
                        for c in 0..4 {
                            let t = [vld1q_u8(qs.add(32 * c)), vld1q_u8(qs.add(32 * c + 16))];
                            let mut lo = [vandq_u8(t[0], m4), vandq_u8(t[1], m4)];
                            let mut hi = [vshrq_n_u8::<4>(t[0]), vshrq_n_u8::<4>(t[1])];
                            if five {
                                // The fifth bit of sub-block `s` is bit `s` of `qh[l]`.
                                let b0 = vdupq_n_u8(1 << (2 * c));
                                let b1 = vdupq_n_u8(1 << (2 * c + 1));
                                for h in 0..2 {
                                    let h0 = vandq_u8(vtstq_u8(qh[h], b0), sixteen);
                                    let h1 = vandq_u8(vtstq_u8(qh[h], b1), sixteen);
                                    lo[h] = vorrq_u8(lo[h], h0);
                                    hi[h] = vorrq_u8(hi[h], h1);
                                }
                            }
                            let lo = [s8(lo[0]), s8(lo[1])];
                            let hi = [s8(hi[0]), s8(hi[1])];
                            let b = 8 * sb + 2 * c;
                            for j in 0..N {
                                let sl = $dp32(lo, xb(x[j], b));
                                let sh = $dp32(hi, xb(x[j], b + 1));
                                // Pairwise sums: after two chunks, lane i is sub-block
                                // `4·(c / 2) + i`'s sum.
                                let p = vpaddq_s32(sl, sh);
                                if c % 2 == 0 {
                                    pair[j] = p;
                                } else {
                                    let s = vcvtq_f32_s32(vpaddq_s32(pair[j], p));
                                    acc[j] = vfmaq_f32(acc[j], s, scale[j][c / 2]);
                                }
                            }
                        }
                    }
                }
                DType::Q6_K => {
                    for sb in 0..blocks / 8 {
                        let blk = pr.add(210 * sb);
                        let d = f16(blk.add(208));
                        // `d·sc` of the 16 groups, four per vector.
                        let sc = vld1q_s8(blk.add(192) as *const i8);
                        let (sl, sh) = (vmovl_s8(vget_low_s8(sc)), vmovl_high_s8(sc));
                        let dsc = [
                            vmulq_n_f32(vcvtq_f32_s32(vmovl_s16(vget_low_s16(sl))), d),
                            vmulq_n_f32(vcvtq_f32_s32(vmovl_high_s16(sl)), d),
                            vmulq_n_f32(vcvtq_f32_s32(vmovl_s16(vget_low_s16(sh))), d),
                            vmulq_n_f32(vcvtq_f32_s32(vmovl_high_s16(sh)), d),
                        ];
                        // Per row, group `g` of the super-block gets `d·sc_g·dx_{g/2}`.
                        let mut scale = [[vdupq_n_f32(0.0); 4]; N];
                        for j in 0..N {
                            let xd = x[j].d.as_ptr().add(8 * sb);
                            let (xd0, xd1) = (vld1q_f32(xd), vld1q_f32(xd.add(4)));
                            scale[j] = [
                                vmulq_f32(dsc[0], vzip1q_f32(xd0, xd0)),
                                vmulq_f32(dsc[1], vzip2q_f32(xd0, xd0)),
                                vmulq_f32(dsc[2], vzip1q_f32(xd1, xd1)),
                                vmulq_f32(dsc[3], vzip2q_f32(xd1, xd1)),
                            ];
                        }
                        for n in 0..2 {
                            let mut pair = [zero; N];
                            for (part, w) in q6_k_half(blk, n).into_iter().enumerate() {
                                let b = 8 * sb + 4 * n + part;
                                for j in 0..N {
                                    let xv = xb(x[j], b);
                                    let p0 = $dp16(zero, w[0], xv[0]);
                                    let p1 = $dp16(zero, w[1], xv[1]);
                                    // Lanes: group sums of parts `part − 1` and `part`.
                                    let p = vpaddq_s32(p0, p1);
                                    if part % 2 == 0 {
                                        pair[j] = p;
                                    } else {
                                        let s = vcvtq_f32_s32(vpaddq_s32(pair[j], p));
                                        let q = 2 * n + part / 2;
                                        acc[j] = vfmaq_f32(acc[j], s, scale[j][q]);
                                    }
                                }
                            }
                        }
                    }
                }
                _ => panic!("no 8-bit-activation kernel for {dtype}"),
            }
            let mut out = [0.0f32; N];
            for j in 0..N {
                out[j] = vaddvq_f32(acc[j]) + off[j];
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

mod neon {
    row_kernels!("neon", super::neon16, super::neon32);
}

mod sdot {
    row_kernels!("neon,dotprod", super::sdot16, super::sdot32);
}

/// The scale terms of group `gi` for one activation row: (`dx`, `dx·Σq`).
#[inline(always)]
unsafe fn group_terms(x: &Q8Act, g: usize, gi: usize) -> (f32, f32) {
    if g == 32 {
        (*x.d.get_unchecked(gi), *x.dsum32.get_unchecked(gi))
    } else {
        (*x.d.get_unchecked(gi / 2), *x.dsum16.get_unchecked(gi))
    }
}

/// The `sdot` prompt kernel: 8 weight rows in two registers (one i32 lane per row), up to
/// four tokens at a time. For each run of 16 columns, one 16-byte load per token and 8
/// `sdot`s by lane add four products to each row's sum; at the end of each scale group the
/// sums become floats once: `acc += cvt(Σ) · d·dx + m · dx·Σq`.
#[target_feature(enable = "neon,dotprod")]
unsafe fn gemm_sdot(p: &Packed, x: &[Q8Act], out: &mut [f32]) {
    let mut t = 0;
    while t + 4 <= x.len() {
        tile_sdot::<4>(p, &x[t..t + 4], &mut out[t * 8..]);
        t += 4;
    }
    while t < x.len() {
        tile_sdot::<1>(p, &x[t..t + 1], &mut out[t * 8..]);
        t += 1;
    }
}

#[target_feature(enable = "neon,dotprod")]
unsafe fn tile_sdot<const N: usize>(p: &Packed, x: &[Q8Act], out: &mut [f32]) {
    let (g, k) = (p.g, p.k);
    let mut acc = [[vdupq_n_f32(0.0); 2]; N];
    // `[K/4][8][4]`: 32 bytes per four columns, rows 0..4 then rows 4..8.
    let q = p.q.as_ptr() as *const i8;
    for gi in 0..k / g {
        let mut isum = [[vdupq_n_s32(0); 2]; N];
        for c in 0..g / 16 {
            let kk = gi * g + 16 * c;
            let w: [int8x16_t; 8] = std::array::from_fn(|i| vld1q_s8(q.add(8 * kk + 16 * i)));
            for j in 0..N {
                let xv = vld1q_s8(x[j].qs.as_ptr().add(kk));
                let s = &mut isum[j];
                s[0] = sdot_lane::<0>(s[0], w[0], xv);
                s[1] = sdot_lane::<0>(s[1], w[1], xv);
                s[0] = sdot_lane::<1>(s[0], w[2], xv);
                s[1] = sdot_lane::<1>(s[1], w[3], xv);
                s[0] = sdot_lane::<2>(s[0], w[4], xv);
                s[1] = sdot_lane::<2>(s[1], w[5], xv);
                s[0] = sdot_lane::<3>(s[0], w[6], xv);
                s[1] = sdot_lane::<3>(s[1], w[7], xv);
            }
        }
        let dv = [
            vld1q_f32(p.d.as_ptr().add(gi * 8)),
            vld1q_f32(p.d.as_ptr().add(gi * 8 + 4)),
        ];
        let mv = [
            vld1q_f32(p.m.as_ptr().add(gi * 8)),
            vld1q_f32(p.m.as_ptr().add(gi * 8 + 4)),
        ];
        for j in 0..N {
            let (dx, dsum) = group_terms(&x[j], g, gi);
            for h in 0..2 {
                let scaled = vmulq_n_f32(dv[h], dx);
                acc[j][h] = vfmaq_f32(acc[j][h], vcvtq_f32_s32(isum[j][h]), scaled);
                acc[j][h] = vfmaq_n_f32(acc[j][h], mv[h], dsum);
            }
        }
    }
    for (j, a) in acc.iter().enumerate() {
        vst1q_f32(out.as_mut_ptr().add(8 * j), a[0]);
        vst1q_f32(out.as_mut_ptr().add(8 * j + 4), a[1]);
    }
}

/// The `smmla` prompt kernel: 8 weight rows as four 2-row registers, tokens in pairs (a
/// lone last token is paired with itself and its copy dropped). For each run of 8 columns,
/// 4 weight loads and one 2-token load per pair feed 4 `smmla`s per pair, each adding
/// 2 rows × 2 tokens × 8 products; a sum register holds `[r0·t0, r0·t1, r1·t0, r1·t1]`.
#[target_feature(enable = "neon,dotprod,i8mm")]
unsafe fn gemm_smmla(p: &Packed, x: &[Q8Act], out: &mut [f32]) {
    let mut t = 0;
    while t + 4 <= x.len() {
        tile_smmla::<2>(p, &x[t..t + 4], &mut out[t * 8..]);
        t += 4;
    }
    while t < x.len() {
        let n = (x.len() - t).min(2);
        tile_smmla::<1>(p, &x[t..t + n], &mut out[t * 8..]);
        t += n;
    }
}

/// `P` token pairs; `x` holds `2P` or `2P − 1` tokens.
#[target_feature(enable = "neon,dotprod,i8mm")]
unsafe fn tile_smmla<const P: usize>(p: &Packed, x: &[Q8Act], out: &mut [f32]) {
    let (g, k) = (p.g, p.k);
    let tok = |i: usize| &x[i.min(x.len() - 1)];
    let mut acc = [[vdupq_n_f32(0.0); 4]; P];
    // `[K/8][8][8]`: 64 bytes per eight columns, 16 per pair of rows.
    let q = p.q.as_ptr() as *const i8;
    for gi in 0..k / g {
        let mut isum = [[vdupq_n_s32(0); 4]; P];
        for c in 0..g / 8 {
            let kk = gi * g + 8 * c;
            let w: [int8x16_t; 4] = std::array::from_fn(|i| vld1q_s8(q.add(8 * kk + 16 * i)));
            for (pp, s) in isum.iter_mut().enumerate() {
                let x0 = vld1_s8(tok(2 * pp).qs.as_ptr().add(kk));
                let x1 = vld1_s8(tok(2 * pp + 1).qs.as_ptr().add(kk));
                let xv = vcombine_s8(x0, x1);
                for rp in 0..4 {
                    s[rp] = smmla(s[rp], w[rp], xv);
                }
            }
        }
        let d = [
            vld1q_f32(p.d.as_ptr().add(gi * 8)),
            vld1q_f32(p.d.as_ptr().add(gi * 8 + 4)),
        ];
        let m = [
            vld1q_f32(p.m.as_ptr().add(gi * 8)),
            vld1q_f32(p.m.as_ptr().add(gi * 8 + 4)),
        ];
        // Row pair `rp` as lanes `[r0, r0, r1, r1]`.
        let dr = [
            vzip1q_f32(d[0], d[0]),
            vzip2q_f32(d[0], d[0]),
            vzip1q_f32(d[1], d[1]),
            vzip2q_f32(d[1], d[1]),
        ];
        let mr = [
            vzip1q_f32(m[0], m[0]),
            vzip2q_f32(m[0], m[0]),
            vzip1q_f32(m[1], m[1]),
            vzip2q_f32(m[1], m[1]),
        ];
        for pp in 0..P {
            // Token pair as lanes `[t0, t1, t0, t1]`.
            let (dx0, ds0) = group_terms(tok(2 * pp), g, gi);
            let (dx1, ds1) = group_terms(tok(2 * pp + 1), g, gi);
            let dx = vld1_f32([dx0, dx1].as_ptr());
            let ds = vld1_f32([ds0, ds1].as_ptr());
            let (dx, ds) = (vcombine_f32(dx, dx), vcombine_f32(ds, ds));
            for rp in 0..4 {
                let scaled = vmulq_f32(dr[rp], dx);
                acc[pp][rp] = vfmaq_f32(acc[pp][rp], vcvtq_f32_s32(isum[pp][rp]), scaled);
                acc[pp][rp] = vfmaq_f32(acc[pp][rp], mr[rp], ds);
            }
        }
    }
    let o = out.as_mut_ptr();
    for (pp, a) in acc.iter().enumerate() {
        // Even lanes are token 2pp, odd lanes token 2pp + 1.
        let t0 = 2 * pp;
        vst1q_f32(o.add(8 * t0), vuzp1q_f32(a[0], a[1]));
        vst1q_f32(o.add(8 * t0 + 4), vuzp1q_f32(a[2], a[3]));
        if t0 + 1 < x.len() {
            vst1q_f32(o.add(8 * t0 + 8), vuzp2q_f32(a[0], a[1]));
            vst1q_f32(o.add(8 * t0 + 12), vuzp2q_f32(a[2], a[3]));
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::backend::cpu::isa::Isa;
    use crate::backend::cpu::q8::{dot, dot4, dot_scalar, Q8Act};
    use crate::quant::DType;

    fn xorshift(s: &mut u64) -> u64 {
        *s ^= *s << 13;
        *s ^= *s >> 7;
        *s ^= *s << 17;
        *s
    }

    /// The 32-element formats go four blocks at a time with a one-block tail; the shared
    /// tests' rows are whole multiples of 256 elements and never reach the tail.
    #[test]
    fn block_counts_that_leave_a_tail_match_the_scalar_dots() {
        let mut seed = 0x5EED_u64;
        for isa in Isa::supported().into_iter().filter(|i| i.is_arm()) {
            for (dtype, bb) in [(DType::Q8_0, 34), (DType::Q4_0, 18), (DType::Q4_1, 20)] {
                for blocks in [1usize, 2, 3, 5, 6, 7] {
                    let mut row: Vec<u8> = (0..blocks * bb)
                        .map(|_| xorshift(&mut seed) as u8)
                        .collect();
                    for (i, blk) in row.chunks_exact_mut(bb).enumerate() {
                        let d = half::f16::from_f32(0.01 + 0.002 * i as f32).to_le_bytes();
                        let m = half::f16::from_f32(-0.03 * i as f32).to_le_bytes();
                        blk[..2].copy_from_slice(&d);
                        if dtype == DType::Q4_1 {
                            blk[2..4].copy_from_slice(&m);
                        }
                    }
                    let xs: Vec<Q8Act> = (0..4)
                        .map(|_| {
                            let v: Vec<f32> = (0..32 * blocks)
                                .map(|_| {
                                    (xorshift(&mut seed) >> 40) as f32 / (1 << 23) as f32 - 1.0
                                })
                                .collect();
                            let mut q = Q8Act::default();
                            q.quantize(&v);
                            q
                        })
                        .collect();
                    let four = dot4(isa, dtype, &row, [&xs[0], &xs[1], &xs[2], &xs[3]]);
                    for (j, x) in xs.iter().enumerate() {
                        let want = dot_scalar(dtype, &row, x);
                        let tol = 1e-4 * (1.0 + want.abs());
                        let one = dot(isa, dtype, &row, x);
                        assert!(
                            (one - want).abs() <= tol,
                            "{isa} {dtype} {blocks}: {one} vs {want}"
                        );
                        let got = four[j];
                        assert!(
                            (got - want).abs() <= tol,
                            "{isa} {dtype} {blocks} dot4[{j}]: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }

    /// `.ci/aarch64` runs the kernel tests on emulated cores chosen for the tiers they have;
    /// this fails if the core does not expose the one expected (the other tests would
    /// still pass, on fewer tiers).
    #[test]
    fn emulated_core_has_the_expected_tier() {
        let Ok(want) = std::env::var("WICK_EXPECT_ISA") else {
            return;
        };
        let want = Isa::parse(&want).expect("WICK_EXPECT_ISA names a tier");
        assert_eq!(Isa::best(), want, "supported: {:?}", Isa::supported());
    }
}
