//! `Q4_0`: 32 elements per block, one f16 scale and 4-bit quants with an implicit offset of 8.
//!
//! Block layout (18 bytes, little-endian):
//!
//! | bytes | field | meaning |
//! |---|---|---|
//! | 0..2 | `d` | f16 scale |
//! | 2..18 | `qs[16]` | byte `j` holds element `j` in its low nibble and element `j + 16` in its high nibble |
//!
//! Element `j < 16` is `((qs[j] & 0xF) - 8) * d`; element `j + 16` is `((qs[j] >> 4) - 8) * d`.
//! The split into halves (not adjacent pairs) lets SIMD code unpack a block with one mask and
//! one shift.
//!
//! ```
//! use wick::quant::q4_0;
//! let x: Vec<f32> = (0..32).map(|i| i as f32 - 16.0).collect();
//! let mut q = vec![0u8; q4_0::BLOCK_BYTES];
//! q4_0::quantize_row_ref(&x, &mut q);
//! let mut y = vec![0.0; 32];
//! q4_0::dequantize_row(&q, &mut y);
//! assert_eq!(y[0], -16.0); // the element of largest magnitude is exact
//! ```

use half::f16;

/// Elements per block.
pub const BLOCK_ELEMS: usize = 32;
/// Bytes per block.
pub const BLOCK_BYTES: usize = 18;

/// Dequantizes one block.
pub fn dequantize_block(block: &[u8; BLOCK_BYTES], out: &mut [f32; BLOCK_ELEMS]) {
    let d = f16::from_le_bytes([block[0], block[1]]).to_f32();
    let (lo, hi) = out.split_at_mut(16);
    for ((&q, a), b) in block[2..].iter().zip(lo).zip(hi) {
        *a = ((q & 0xF) as i32 - 8) as f32 * d;
        *b = ((q >> 4) as i32 - 8) as f32 * d;
    }
}

/// Dequantizes `dst.len()` elements (a whole number of blocks) from `src`.
///
/// Panics if `dst.len()` is not a multiple of [`BLOCK_ELEMS`] or `src` is shorter than the
/// matching number of blocks: tensor sizes are validated when a file is loaded.
pub fn dequantize_row(src: &[u8], dst: &mut [f32]) {
    super::check_row_lengths("Q4_0", src, dst, BLOCK_BYTES, BLOCK_ELEMS);
    for (b, o) in src
        .chunks_exact(BLOCK_BYTES)
        .zip(dst.chunks_exact_mut(BLOCK_ELEMS))
    {
        dequantize_block(b.try_into().unwrap(), o.try_into().unwrap());
    }
}

/// Reference quantizer, bit-exact with GGML's `quantize_row_q4_0_ref`.
///
/// The scale is `d = m / -8` where `m` is the element of largest magnitude (the first one on
/// ties), so `m` itself lands exactly on quant 0 and the other side gets the extra level;
/// quants are `min(15, trunc(x / d + 8.5))`.
///
/// Panics under the same length rules as [`dequantize_row`].
pub fn quantize_row_ref(src: &[f32], dst: &mut [u8]) {
    super::check_row_lengths("Q4_0", dst, src, BLOCK_BYTES, BLOCK_ELEMS);
    for (x, b) in src
        .chunks_exact(BLOCK_ELEMS)
        .zip(dst.chunks_exact_mut(BLOCK_BYTES))
    {
        let (mut amax, mut max) = (0.0f32, 0.0f32);
        for &v in x {
            if amax < v.abs() {
                amax = v.abs();
                max = v;
            }
        }
        let d = max / -8.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        b[..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
        // `as i8` truncates toward zero like GGML's `(int8_t)` cast.
        let quant = |v: f32| ((v * id + 8.5) as i8).min(15) as u8;
        for j in 0..16 {
            b[2 + j] = quant(x[j]) | (quant(x[j + 16]) << 4);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dequantizes_hand_made_block() {
        let mut b = [0u8; BLOCK_BYTES];
        b[..2].copy_from_slice(&f16::from_f32(2.0).to_le_bytes());
        b[2] = 0xF0; // element 0: 0 - 8, element 16: 15 - 8
        b[17] = 0x89; // element 15: 9 - 8, element 31: 8 - 8
        let mut out = [0.0; BLOCK_ELEMS];
        dequantize_block(&b, &mut out);
        assert_eq!((out[0], out[16], out[15], out[31]), (-16.0, 14.0, 2.0, 0.0));
        assert_eq!(out[1], -16.0);
    }

    #[test]
    fn round_trip_error_is_within_one_step() {
        let x: Vec<f32> = (0..64)
            .map(|i| ((i * 29 % 31) as f32 - 15.0) * 0.21)
            .collect();
        let mut q = vec![0u8; 2 * BLOCK_BYTES];
        quantize_row_ref(&x, &mut q);
        let mut y = vec![0.0; 64];
        dequantize_row(&q, &mut y);
        for (xb, yb) in x.chunks(32).zip(y.chunks(32)) {
            let step = xb.iter().fold(0.0f32, |m, v| m.max(v.abs())) / 8.0;
            for (a, b) in xb.iter().zip(yb) {
                assert!((a - b).abs() <= step * 1.01, "{a} vs {b}");
            }
        }
    }
}
