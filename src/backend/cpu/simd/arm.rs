//! The NEON bodies (every aarch64 CPU has NEON). Rows come straight from memory-mapped
//! files at any byte offset, so 16-bit and 32-bit data is loaded as bytes (`ld1 {v.16b}`
//! has no alignment requirement) and reinterpreted; aarch64 Linux is little-endian.
//!
//! f16 → f32 uses `fcvtl`/`fcvtl2` through `asm!`: they are base ARMv8 NEON and exact for
//! every f16 (subnormals become normal f32s, infinities stay, NaNs are quieted with their
//! payload kept, as `half` does), but the intrinsic `vcvt_f32_f16` takes the f16 vector type,
//! which is unstable.
//!
//! Each function is its namesake in `super` (same contract); they are `unsafe` only for the
//! `neon` target feature, which every aarch64 CPU has.

use std::arch::aarch64::*;
use std::arch::asm;

/// Eight f16s at `p` as two f32 vectors.
#[inline(always)]
unsafe fn load_f16x8(p: *const u8) -> (float32x4_t, float32x4_t) {
    let h = vld1q_u8(p);
    let (lo, hi): (float32x4_t, float32x4_t);
    asm!(
        "fcvtl {lo:v}.4s, {h:v}.4h",
        "fcvtl2 {hi:v}.4s, {h:v}.8h",
        h = in(vreg) h,
        // Written before `h` is read again: not `lateout`, which may share `h`'s register.
        lo = out(vreg) lo,
        hi = lateout(vreg) hi,
        options(pure, nomem, nostack, preserves_flags)
    );
    (lo, hi)
}

/// Eight bf16s at `p` as two f32 vectors: each 16-bit value becomes the high half of a lane.
#[inline(always)]
unsafe fn load_bf16x8(p: *const u8) -> (float32x4_t, float32x4_t) {
    let h = vreinterpretq_u16_u8(vld1q_u8(p));
    let z = vdupq_n_u16(0);
    (
        vreinterpretq_f32_u16(vzip1q_u16(z, h)),
        vreinterpretq_f32_u16(vzip2q_u16(z, h)),
    )
}

/// Four f32s at `p`, any alignment.
#[inline(always)]
unsafe fn load_f32x4(p: *const u8) -> float32x4_t {
    vreinterpretq_f32_u8(vld1q_u8(p))
}

/// [`super::dot_f32`] on NEON.
#[target_feature(enable = "neon")]
pub unsafe fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    // Four chains: a multiply-add has a latency of about four cycles.
    let mut acc = [vdupq_n_f32(0.0); 4];
    let mut i = 0;
    while i + 16 <= n {
        for (u, a) in acc.iter_mut().enumerate() {
            *a = vfmaq_f32(
                *a,
                vld1q_f32(pa.add(i + 4 * u)),
                vld1q_f32(pb.add(i + 4 * u)),
            );
        }
        i += 16;
    }
    while i + 4 <= n {
        acc[0] = vfmaq_f32(acc[0], vld1q_f32(pa.add(i)), vld1q_f32(pb.add(i)));
        i += 4;
    }
    let mut s = vaddvq_f32(vaddq_f32(
        vaddq_f32(acc[0], acc[1]),
        vaddq_f32(acc[2], acc[3]),
    ));
    while i < n {
        s += a[i] * b[i];
        i += 1;
    }
    s
}

/// [`super::axpy_rows_f32`] on NEON.
#[target_feature(enable = "neon")]
pub unsafe fn axpy_rows_f32(y: &mut [f32], a: &[f32], x: &[f32]) {
    let n = y.len();
    let (py, px) = (y.as_mut_ptr(), x.as_ptr());
    let mut i = 0;
    // 16 columns (four registers) at a time over every row, then 4, then one.
    while i + 16 <= n {
        let mut acc: [float32x4_t; 4] = std::array::from_fn(|c| vld1q_f32(py.add(i + 4 * c)));
        for (j, &aj) in a.iter().enumerate() {
            let row = px.add(j * n + i);
            for (c, acc) in acc.iter_mut().enumerate() {
                *acc = vfmaq_n_f32(*acc, vld1q_f32(row.add(4 * c)), aj);
            }
        }
        for (c, acc) in acc.iter().enumerate() {
            vst1q_f32(py.add(i + 4 * c), *acc);
        }
        i += 16;
    }
    while i + 4 <= n {
        let mut acc = vld1q_f32(py.add(i));
        for (j, &aj) in a.iter().enumerate() {
            acc = vfmaq_n_f32(acc, vld1q_f32(px.add(j * n + i)), aj);
        }
        vst1q_f32(py.add(i), acc);
        i += 4;
    }
    for i in i..n {
        for (j, &aj) in a.iter().enumerate() {
            y[i] += aj * x[j * n + i];
        }
    }
}

/// [`super::axpy_f32`] on NEON.
#[target_feature(enable = "neon")]
pub unsafe fn axpy_f32(y: &mut [f32], a: f32, x: &[f32]) {
    let n = y.len().min(x.len());
    let (py, px) = (y.as_mut_ptr(), x.as_ptr());
    let mut i = 0;
    while i + 8 <= n {
        let v0 = vfmaq_n_f32(vld1q_f32(py.add(i)), vld1q_f32(px.add(i)), a);
        let v1 = vfmaq_n_f32(vld1q_f32(py.add(i + 4)), vld1q_f32(px.add(i + 4)), a);
        vst1q_f32(py.add(i), v0);
        vst1q_f32(py.add(i + 4), v1);
        i += 8;
    }
    while i + 4 <= n {
        vst1q_f32(
            py.add(i),
            vfmaq_n_f32(vld1q_f32(py.add(i)), vld1q_f32(px.add(i)), a),
        );
        i += 4;
    }
    while i < n {
        y[i] += a * x[i];
        i += 1;
    }
}

/// [`super::dot4_f32`] on NEON.
#[target_feature(enable = "neon")]
pub unsafe fn dot4_f32(w: &[f32], x: [&[f32]; 4]) -> [f32; 4] {
    let n = w.len();
    let pw = w.as_ptr();
    let px = x.map(|r| r.as_ptr());
    // Two chains per row, eight accumulators in all.
    let mut acc = [[vdupq_n_f32(0.0); 2]; 4];
    let mut i = 0;
    while i + 8 <= n {
        let w0 = vld1q_f32(pw.add(i));
        let w1 = vld1q_f32(pw.add(i + 4));
        for j in 0..4 {
            acc[j][0] = vfmaq_f32(acc[j][0], w0, vld1q_f32(px[j].add(i)));
            acc[j][1] = vfmaq_f32(acc[j][1], w1, vld1q_f32(px[j].add(i + 4)));
        }
        i += 8;
    }
    let mut out = [0.0f32; 4];
    for j in 0..4 {
        out[j] = vaddvq_f32(vaddq_f32(acc[j][0], acc[j][1]));
        for k in i..n {
            out[j] += w[k] * x[j][k];
        }
    }
    out
}

/// [`super::dot2x4_f32`] on NEON.
#[target_feature(enable = "neon")]
pub unsafe fn dot2x4_f32(w: [&[f32]; 2], x: [&[f32]; 4]) -> [[f32; 4]; 2] {
    let n = w[0].len();
    let (pw0, pw1) = (w[0].as_ptr(), w[1].as_ptr());
    let px = x.map(|r| r.as_ptr());
    let mut a0 = [vdupq_n_f32(0.0); 4];
    let mut a1 = [vdupq_n_f32(0.0); 4];
    let mut i = 0;
    while i + 4 <= n {
        let w0 = vld1q_f32(pw0.add(i));
        let w1 = vld1q_f32(pw1.add(i));
        for j in 0..4 {
            let xv = vld1q_f32(px[j].add(i));
            a0[j] = vfmaq_f32(a0[j], w0, xv);
            a1[j] = vfmaq_f32(a1[j], w1, xv);
        }
        i += 4;
    }
    let mut out = [[0.0f32; 4]; 2];
    for j in 0..4 {
        out[0][j] = vaddvq_f32(a0[j]);
        out[1][j] = vaddvq_f32(a1[j]);
        for k in i..n {
            out[0][j] += w[0][k] * x[j][k];
            out[1][j] += w[1][k] * x[j][k];
        }
    }
    out
}

/// [`super::dot_bf16`] on NEON.
#[target_feature(enable = "neon")]
pub unsafe fn dot_bf16(x: &[f32], w: &[u8]) -> f32 {
    let n = x.len();
    let (px, pw) = (x.as_ptr(), w.as_ptr());
    let mut acc = [vdupq_n_f32(0.0); 4];
    let mut i = 0;
    while i + 16 <= n {
        let (w0, w1) = load_bf16x8(pw.add(2 * i));
        let (w2, w3) = load_bf16x8(pw.add(2 * i + 16));
        for (u, wv) in [w0, w1, w2, w3].into_iter().enumerate() {
            acc[u] = vfmaq_f32(acc[u], vld1q_f32(px.add(i + 4 * u)), wv);
        }
        i += 16;
    }
    while i + 8 <= n {
        let (w0, w1) = load_bf16x8(pw.add(2 * i));
        acc[0] = vfmaq_f32(acc[0], vld1q_f32(px.add(i)), w0);
        acc[1] = vfmaq_f32(acc[1], vld1q_f32(px.add(i + 4)), w1);
        i += 8;
    }
    let mut s = vaddvq_f32(vaddq_f32(
        vaddq_f32(acc[0], acc[1]),
        vaddq_f32(acc[2], acc[3]),
    ));
    while i < n {
        s += x[i] * half::bf16::from_le_bytes([w[2 * i], w[2 * i + 1]]).to_f32();
        i += 1;
    }
    s
}

/// [`super::dot_f16`] on NEON.
#[target_feature(enable = "neon")]
pub unsafe fn dot_f16(x: &[f32], w: &[u8]) -> f32 {
    let n = x.len();
    let (px, pw) = (x.as_ptr(), w.as_ptr());
    let mut acc = [vdupq_n_f32(0.0); 4];
    let mut i = 0;
    while i + 16 <= n {
        let (w0, w1) = load_f16x8(pw.add(2 * i));
        let (w2, w3) = load_f16x8(pw.add(2 * i + 16));
        for (u, wv) in [w0, w1, w2, w3].into_iter().enumerate() {
            acc[u] = vfmaq_f32(acc[u], vld1q_f32(px.add(i + 4 * u)), wv);
        }
        i += 16;
    }
    while i + 8 <= n {
        let (w0, w1) = load_f16x8(pw.add(2 * i));
        acc[0] = vfmaq_f32(acc[0], vld1q_f32(px.add(i)), w0);
        acc[1] = vfmaq_f32(acc[1], vld1q_f32(px.add(i + 4)), w1);
        i += 8;
    }
    let mut s = vaddvq_f32(vaddq_f32(
        vaddq_f32(acc[0], acc[1]),
        vaddq_f32(acc[2], acc[3]),
    ));
    while i < n {
        s += x[i] * half::f16::from_le_bytes([w[2 * i], w[2 * i + 1]]).to_f32();
        i += 1;
    }
    s
}

/// [`super::dot_f32_bytes`] on NEON.
#[target_feature(enable = "neon")]
pub unsafe fn dot_f32_bytes(x: &[f32], w: &[u8]) -> f32 {
    let n = x.len();
    let (px, pw) = (x.as_ptr(), w.as_ptr());
    let mut acc = [vdupq_n_f32(0.0); 2];
    let mut i = 0;
    while i + 8 <= n {
        acc[0] = vfmaq_f32(acc[0], vld1q_f32(px.add(i)), load_f32x4(pw.add(4 * i)));
        acc[1] = vfmaq_f32(
            acc[1],
            vld1q_f32(px.add(i + 4)),
            load_f32x4(pw.add(4 * i + 16)),
        );
        i += 8;
    }
    while i + 4 <= n {
        acc[0] = vfmaq_f32(acc[0], vld1q_f32(px.add(i)), load_f32x4(pw.add(4 * i)));
        i += 4;
    }
    let mut s = vaddvq_f32(vaddq_f32(acc[0], acc[1]));
    while i < n {
        let b = &w[4 * i..4 * i + 4];
        s += x[i] * f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        i += 1;
    }
    s
}

/// [`super::bf16_to_f32`] on NEON.
#[target_feature(enable = "neon")]
pub unsafe fn bf16_to_f32(src: &[u8], dst: &mut [f32]) {
    let n = dst.len();
    let pd = dst.as_mut_ptr();
    let mut i = 0;
    while i + 8 <= n {
        let (lo, hi) = load_bf16x8(src.as_ptr().add(2 * i));
        vst1q_f32(pd.add(i), lo);
        vst1q_f32(pd.add(i + 4), hi);
        i += 8;
    }
    while i < n {
        dst[i] = half::bf16::from_le_bytes([src[2 * i], src[2 * i + 1]]).to_f32();
        i += 1;
    }
}

/// [`super::f16_to_f32`] on NEON.
#[target_feature(enable = "neon")]
pub unsafe fn f16_to_f32(src: &[u8], dst: &mut [f32]) {
    let n = dst.len();
    let pd = dst.as_mut_ptr();
    let mut i = 0;
    while i + 8 <= n {
        let (lo, hi) = load_f16x8(src.as_ptr().add(2 * i));
        vst1q_f32(pd.add(i), lo);
        vst1q_f32(pd.add(i + 4), hi);
        i += 8;
    }
    while i < n {
        dst[i] = half::f16::from_le_bytes([src[2 * i], src[2 * i + 1]]).to_f32();
        i += 1;
    }
}

#[cfg(test)]
mod tests {
    /// Every f16 bit pattern, converted 8 at a time, against `half` bit for bit: subnormals,
    /// infinities and NaN payloads included (the shared tests only see finite values).
    #[test]
    fn f16_conversion_is_exact_for_every_bit_pattern() {
        let src: Vec<u8> = (0..=u16::MAX).flat_map(|b| b.to_le_bytes()).collect();
        let mut dst = vec![0.0f32; 1 << 16];
        // SAFETY: every aarch64 CPU has NEON.
        unsafe { super::f16_to_f32(&src, &mut dst) };
        for (b, got) in (0..=u16::MAX).zip(&dst) {
            let want = half::f16::from_bits(b).to_f32();
            assert_eq!(got.to_bits(), want.to_bits(), "f16 bits {b:#06x}");
        }
    }
}
