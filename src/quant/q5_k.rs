//! `Q5_K`: 256-element super-blocks of eight 32-element sub-blocks, 5-bit quants, and a
//! 6-bit scale and 6-bit minimum per sub-block.
//!
//! Block layout (176 bytes, little-endian):
//!
//! | bytes | field | meaning |
//! |---|---|---|
//! | 0..2 | `d` | f16 super-scale of the sub-block scales |
//! | 2..4 | `dmin` | f16 super-scale of the sub-block minimums |
//! | 4..16 | `scales[12]` | scales and minimums packed exactly as in `Q4_K` ([`super::q4_k::scale_min`]) |
//! | 16..48 | `qh[32]` | fifth bits: bit `s` of byte `l` belongs to element `l` of sub-block `s` |
//! | 48..176 | `qs[128]` | low 4 bits, laid out as the quants of `Q4_K` |
//!
//! Element `l` of sub-block `s = 2c + h` (chunk `c`, `h` = 0 for low / 1 for high nibbles) has
//! quant `q = nibble(qs[32c + l]) + 16 * bit(qh[l], s)` and value `(d * sc) * q - dmin * mn`.

use half::f16;

use super::q4_k::scale_min;

/// Elements per super-block.
pub const BLOCK_ELEMS: usize = 256;
/// Bytes per super-block.
pub const BLOCK_BYTES: usize = 176;

/// Dequantizes one super-block.
pub fn dequantize_block(block: &[u8; BLOCK_BYTES], out: &mut [f32; BLOCK_ELEMS]) {
    let d = f16::from_le_bytes([block[0], block[1]]).to_f32();
    let dmin = f16::from_le_bytes([block[2], block[3]]).to_f32();
    let scales: &[u8; 12] = block[4..16].try_into().unwrap();
    let qh = &block[16..48];
    let qs = &block[48..];
    for c in 0..4 {
        let (sc1, m1) = scale_min(2 * c, scales);
        let (sc2, m2) = scale_min(2 * c + 1, scales);
        let (d1, m1) = (d * sc1 as f32, dmin * m1 as f32);
        let (d2, m2) = (d * sc2 as f32, dmin * m2 as f32);
        let (u1, u2) = (1u8 << (2 * c), 1u8 << (2 * c + 1));
        let q = &qs[32 * c..32 * c + 32];
        let y = &mut out[64 * c..64 * c + 64];
        for l in 0..32 {
            let hi1 = if qh[l] & u1 != 0 { 16 } else { 0 };
            let hi2 = if qh[l] & u2 != 0 { 16 } else { 0 };
            y[l] = d1 * ((q[l] & 0xF) + hi1) as f32 - m1;
            y[l + 32] = d2 * ((q[l] >> 4) + hi2) as f32 - m2;
        }
    }
}

/// Dequantizes `dst.len()` elements (a whole number of super-blocks) from `src`.
///
/// Panics if `dst.len()` is not a multiple of [`BLOCK_ELEMS`] or `src` is shorter than the
/// matching number of blocks: tensor sizes are validated when a file is loaded.
pub fn dequantize_row(src: &[u8], dst: &mut [f32]) {
    super::check_row_lengths("Q5_K", src, dst, BLOCK_BYTES, BLOCK_ELEMS);
    for (b, o) in src
        .chunks_exact(BLOCK_BYTES)
        .zip(dst.chunks_exact_mut(BLOCK_ELEMS))
    {
        dequantize_block(b.try_into().unwrap(), o.try_into().unwrap());
    }
}

/// Reference quantizer, byte-exact with GGML's `quantize_row_q5_K_ref`: the `Q4_K` fit
/// ([`super::q4_k`]) with 31 levels and GGML's narrower search, then the fifth bits split
/// off into `qh`.
///
/// Panics under the same length rules as [`dequantize_row`].
pub fn quantize_row_ref(src: &[f32], dst: &mut [u8]) {
    super::check_row_lengths("Q5_K", dst, src, BLOCK_BYTES, BLOCK_ELEMS);
    for (x, b) in src
        .chunks_exact(BLOCK_ELEMS)
        .zip(dst.chunks_exact_mut(BLOCK_BYTES))
    {
        let x: &[f32; BLOCK_ELEMS] = x.try_into().unwrap();
        let mut l = [0u8; BLOCK_ELEMS];
        let (d, dmin, scales) = super::q4_k::quantize_sub_blocks(x, 31, -0.5, 0.1, 15, &mut l);
        b[..2].copy_from_slice(&d.to_le_bytes());
        b[2..4].copy_from_slice(&dmin.to_le_bytes());
        b[4..16].copy_from_slice(&scales);
        b[16..48].fill(0);
        for c in 0..4 {
            let (u1, u2) = (1u8 << (2 * c), 1u8 << (2 * c + 1));
            for i in 0..32 {
                let (mut l1, mut l2) = (l[64 * c + i], l[64 * c + 32 + i]);
                if l1 > 15 {
                    l1 -= 16;
                    b[16 + i] |= u1;
                }
                if l2 > 15 {
                    l2 -= 16;
                    b[16 + i] |= u2;
                }
                b[48 + 32 * c + i] = l1 | (l2 << 4);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fifth_bit_selects_sub_block_by_bit_position() {
        let mut b = [0u8; BLOCK_BYTES];
        b[..2].copy_from_slice(&f16::from_f32(1.0).to_le_bytes());
        b[2..4].copy_from_slice(&f16::from_f32(1.0).to_le_bytes());
        // Every sub-block: scale 1, minimum 0 (j < 4 bytes carry the low bits directly,
        // j >= 4 the low nibble of bytes 8..12).
        for j in 0..4 {
            b[4 + j] = 1;
        }
        for j in 8..12 {
            b[4 + j] = 1;
        }
        b[16 + 5] = 0b1000_0001; // element 5 of sub-blocks 0 and 7 gets +16
        b[48 + 96 + 5] = 0x32; // chunk 3, element 5: sub-block 6 q=2, sub-block 7 q=3
        b[48 + 5] = 0x01; // chunk 0, element 5: sub-block 0 q=1
        let mut out = [0.0; BLOCK_ELEMS];
        dequantize_block(&b, &mut out);
        assert_eq!(out[5], 17.0);
        assert_eq!(out[192 + 5], 2.0);
        assert_eq!(out[224 + 5], 19.0);
        assert_eq!(out[32 + 5], 0.0);
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
        for (xs, ys) in x.chunks(32).zip(y.chunks(32)) {
            let hi = xs.iter().fold(0f32, |m, v| m.max(*v));
            let lo = xs.iter().fold(0f32, |m, v| m.min(*v));
            for (a, b) in xs.iter().zip(ys) {
                assert!((a - b).abs() <= (hi - lo) / 31.0, "{a} vs {b}");
            }
        }
    }
}
