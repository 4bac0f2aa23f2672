//! `Q6_K`: 256-element super-blocks of sixteen 16-element sub-blocks, 6-bit quants with an
//! implicit offset of 32, and a signed 8-bit scale per sub-block.
//!
//! Block layout (210 bytes, little-endian):
//!
//! | bytes | field | meaning |
//! |---|---|---|
//! | 0..128 | `ql[128]` | low 4 bits of the quants |
//! | 128..192 | `qh[64]` | high 2 bits of the quants, four per byte |
//! | 192..208 | `scales[16]` | i8 scale of each 16-element sub-block |
//! | 208..210 | `d` | f16 super-scale |
//!
//! The block is two halves of 128 elements; half `n` uses `ql[64n..64n+64]`,
//! `qh[32n..32n+32]` and `scales[8n..8n+8]`. Within a half, for `l` in `0..32`, byte `qh[l]`
//! holds (from its low bits up) the high bits of elements `l`, `l + 32`, `l + 64`, `l + 96`;
//! their low bits are the low nibble of `ql[l]`, the low nibble of `ql[l + 32]`, the high
//! nibble of `ql[l]` and the high nibble of `ql[l + 32]`. Element `e` of the half has quant
//! `q - 32` and value `(d * scales[e / 16]) * (q - 32)`.

use half::f16;

/// Elements per super-block.
pub const BLOCK_ELEMS: usize = 256;
/// Bytes per super-block.
pub const BLOCK_BYTES: usize = 210;

/// Dequantizes one super-block.
pub fn dequantize_block(block: &[u8; BLOCK_BYTES], out: &mut [f32; BLOCK_ELEMS]) {
    let d = f16::from_le_bytes([block[208], block[209]]).to_f32();
    for n in 0..2 {
        let ql = &block[64 * n..64 * n + 64];
        let qh = &block[128 + 32 * n..128 + 32 * n + 32];
        let sc = &block[192 + 8 * n..192 + 8 * n + 8];
        let y = &mut out[128 * n..128 * n + 128];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
            let s = |k: usize| d * (sc[k] as i8) as f32;
            y[l] = s(is) * q1 as f32;
            y[l + 32] = s(is + 2) * q2 as f32;
            y[l + 64] = s(is + 4) * q3 as f32;
            y[l + 96] = s(is + 6) * q4 as f32;
        }
    }
}

/// Dequantizes `dst.len()` elements (a whole number of super-blocks) from `src`.
///
/// Panics if `dst.len()` is not a multiple of [`BLOCK_ELEMS`] or `src` is shorter than the
/// matching number of blocks: tensor sizes are validated when a file is loaded.
pub fn dequantize_row(src: &[u8], dst: &mut [f32]) {
    super::check_row_lengths("Q6_K", src, dst, BLOCK_BYTES, BLOCK_ELEMS);
    for (b, o) in src
        .chunks_exact(BLOCK_BYTES)
        .zip(dst.chunks_exact_mut(BLOCK_ELEMS))
    {
        dequantize_block(b.try_into().unwrap(), o.try_into().unwrap());
    }
}

/// Reference quantizer, byte-exact with GGML's `quantize_row_q6_K_ref`.
///
/// Each 16-element sub-block gets a signed scale from `fit_symmetric` (weights `x²`); the
/// sixteen scales are quantized to i8 against the one of largest magnitude (which maps to
/// -128), and the elements re-quantized with the rounded scales.
///
/// Panics under the same length rules as [`dequantize_row`].
pub fn quantize_row_ref(src: &[f32], dst: &mut [u8]) {
    super::check_row_lengths("Q6_K", dst, src, BLOCK_BYTES, BLOCK_ELEMS);
    for (x, b) in src
        .chunks_exact(BLOCK_ELEMS)
        .zip(dst.chunks_exact_mut(BLOCK_BYTES))
    {
        quantize_block(x.try_into().unwrap(), b.try_into().unwrap());
    }
}

/// GGML's `GROUP_MAX_EPS`: sub-blocks whose largest magnitude is below it count as zero.
const GROUP_MAX_EPS: f32 = 1e-15;

fn quantize_block(x: &[f32; BLOCK_ELEMS], b: &mut [u8; BLOCK_BYTES]) {
    // Quants with the +32 offset applied: 0..=63.
    let mut l = [0u8; BLOCK_ELEMS];
    let mut scales = [0f32; 16];
    let (mut max_scale, mut max_abs_scale) = (0f32, 0f32);
    for ib in 0..16 {
        let xs: &[f32; 16] = x[16 * ib..16 * ib + 16].try_into().unwrap();
        let ls: &mut [u8; 16] = (&mut l[16 * ib..16 * ib + 16]).try_into().unwrap();
        let scale = fit_symmetric(xs, 32, ls);
        scales[ib] = scale;
        if scale.abs() > max_abs_scale {
            max_abs_scale = scale.abs();
            max_scale = scale;
        }
    }
    b.fill(0);
    if max_abs_scale < GROUP_MAX_EPS {
        return;
    }
    let iscale = -128.0 / max_scale;
    let d = f16::from_f32(1.0 / iscale);
    b[208..].copy_from_slice(&d.to_le_bytes());
    let mut sc = [0i8; 16];
    for (s, &v) in sc.iter_mut().zip(&scales) {
        *s = nearest_int(iscale * v).min(127) as i8;
    }
    for (j, &s) in sc.iter().enumerate() {
        let dj = d.to_f32() * s as f32;
        if dj == 0.0 {
            continue;
        }
        for i in 0..16 {
            let q = nearest_int(x[16 * j + i] / dj).clamp(-32, 31);
            l[16 * j + i] = (q + 32) as u8;
        }
    }
    for n in 0..2 {
        let l = &l[128 * n..128 * n + 128];
        for i in 0..32 {
            let (q1, q2, q3, q4) = (l[i], l[i + 32], l[i + 64], l[i + 96]);
            b[64 * n + i] = (q1 & 0xF) | ((q3 & 0xF) << 4);
            b[64 * n + 32 + i] = (q2 & 0xF) | ((q4 & 0xF) << 4);
            b[128 + 32 * n + i] =
                (q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4) | ((q4 >> 4) << 6);
        }
    }
    for (o, s) in b[192..208].iter_mut().zip(sc) {
        *o = s as u8;
    }
}

use super::q4_k::nearest_int;

/// GGML's `make_qx_quants` with `rmse_type = 1`: a symmetric fit `x ≈ scale * (l - nmax)`
/// with `l - nmax` in `-nmax..nmax`, weights `x²`, trying 19 scales around `-nmax / max`
/// (max = the element of largest magnitude) and keeping the best least-squares fit.
/// Leaves `l` in `0..2·nmax` and returns the scale (negative when `max` is positive).
fn fit_symmetric(x: &[f32; 16], nmax: i32, l: &mut [u8; 16]) -> f32 {
    let (mut max, mut amax) = (0f32, 0f32);
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    if amax < GROUP_MAX_EPS {
        l.fill(0);
        return 0.0;
    }
    let nmaxf = nmax as f32;
    let quant = |iscale: f32, v: f32| nearest_int(iscale * v).clamp(-nmax, nmax - 1);
    let sums = |iscale: f32| {
        let (mut sumlx, mut suml2) = (0f32, 0f32);
        for &v in x {
            let q = quant(iscale, v) as f32;
            let w = v * v;
            sumlx += w * v * q;
            suml2 += w * q * q;
        }
        (sumlx, suml2)
    };
    let mut iscale = -nmaxf / max;
    let (sumlx, suml2) = sums(iscale);
    for (o, &v) in l.iter_mut().zip(x) {
        *o = (quant(iscale, v) + nmax) as u8;
    }
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    let mut best = scale * sumlx;
    for is in -9..=9 {
        if is == 0 {
            continue;
        }
        iscale = -(nmaxf + 0.1 * is as f32) / max;
        let (sumlx, suml2) = sums(iscale);
        if suml2 > 0.0 && sumlx * sumlx > best * suml2 {
            for (o, &v) in l.iter_mut().zip(x) {
                *o = (quant(iscale, v) + nmax) as u8;
            }
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    scale
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dequantizes_hand_made_block() {
        let mut b = [0u8; BLOCK_BYTES];
        b[208..].copy_from_slice(&f16::from_f32(0.5).to_le_bytes());
        for (k, s) in b[192..208].iter_mut().enumerate() {
            *s = (k as i8 - 8) as u8;
        }
        // Second half, l = 17: elements 128+17, 128+49, 128+81, 128+113.
        b[64 + 17] = 0x2F; // low nibbles: 15 (elem +17), 2 (elem +81)
        b[64 + 49] = 0x90; // low nibbles: 0 (elem +49), 9 (elem +113)
        b[128 + 32 + 17] = 0b11_10_01_00; // high bits: 0, 1, 2, 3
        let mut out = [0.0; BLOCK_ELEMS];
        dequantize_block(&b, &mut out);
        // Sub-block scales in the second half are scales[8 + e / 16] = e / 16.
        assert_eq!(out[128 + 17], 0.5 * 1.0 * (15 - 32) as f32);
        assert_eq!(out[128 + 49], 0.5 * 3.0 * (16 - 32) as f32);
        assert_eq!(out[128 + 81], 0.5 * 5.0 * (2 + 32 - 32) as f32);
        assert_eq!(out[128 + 113], 0.5 * 7.0 * (9 + 48 - 32) as f32);
        // First half, element 0: q = 0 - 32, scale -8.
        assert_eq!(out[0], 0.5 * -8.0 * -32.0);
    }

    #[test]
    fn round_trip_error_is_within_one_sub_block_step() {
        let x: Vec<f32> = (0..512)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.013)
            .collect();
        let mut q = vec![0u8; 2 * BLOCK_BYTES];
        quantize_row_ref(&x, &mut q);
        let mut y = vec![0.0; 512];
        dequantize_row(&q, &mut y);
        for (xs, ys) in x.chunks(16).zip(y.chunks(16)) {
            let amax = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
            for (a, b) in xs.iter().zip(ys) {
                assert!((a - b).abs() <= amax / 31.0 * 1.05, "{a} vs {b}");
            }
        }
    }

    #[test]
    fn all_zero_block_quantizes_to_zero() {
        let mut q = vec![0xAAu8; BLOCK_BYTES];
        quantize_row_ref(&[0.0; BLOCK_ELEMS], &mut q);
        assert!(q.iter().all(|&b| b == 0));
    }
}
