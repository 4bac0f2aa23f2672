//! `Q8_0`: 32 elements per block, one f16 scale and 32 signed bytes.
//!
//! The simplest block format and the one activations are quantized to for integer dot
//! products. Block layout (34 bytes, little-endian):
//!
//! | bytes | field | meaning |
//! |---|---|---|
//! | 0..2 | `d` | f16 scale |
//! | 2..34 | `qs[32]` | i8 quants, element `j` is `qs[j]` |
//!
//! Element `j` is `qs[j] as f32 * d`.
//!
//! ```
//! use wick::quant::q8_0;
//! let x: Vec<f32> = (0..32).map(|i| i as f32 - 16.0).collect();
//! let mut q = vec![0u8; q8_0::BLOCK_BYTES];
//! q8_0::quantize_row_ref(&x, &mut q);
//! let mut y = vec![0.0; 32];
//! q8_0::dequantize_row(&q, &mut y);
//! assert!(x.iter().zip(&y).all(|(a, b)| (a - b).abs() <= 16.0 / 127.0));
//! ```

use half::f16;

/// Elements per block.
pub const BLOCK_ELEMS: usize = 32;
/// Bytes per block.
pub const BLOCK_BYTES: usize = 34;

/// Dequantizes one block.
pub fn dequantize_block(block: &[u8; BLOCK_BYTES], out: &mut [f32; BLOCK_ELEMS]) {
    let d = f16::from_le_bytes([block[0], block[1]]).to_f32();
    for (o, &q) in out.iter_mut().zip(&block[2..]) {
        *o = (q as i8) as f32 * d;
    }
}

/// Dequantizes `dst.len()` elements (a whole number of blocks) from `src`.
///
/// Panics if `dst.len()` is not a multiple of [`BLOCK_ELEMS`] or `src` is shorter than the
/// matching number of blocks: tensor sizes are validated when a file is loaded.
pub fn dequantize_row(src: &[u8], dst: &mut [f32]) {
    super::check_row_lengths("Q8_0", src, dst, BLOCK_BYTES, BLOCK_ELEMS);
    for (b, o) in src
        .chunks_exact(BLOCK_BYTES)
        .zip(dst.chunks_exact_mut(BLOCK_ELEMS))
    {
        dequantize_block(b.try_into().unwrap(), o.try_into().unwrap());
    }
}

/// Reference quantizer (round to nearest, ties away from zero), bit-exact with GGML's
/// `quantize_row_q8_0_ref`: `d = max|x| / 127`, `q = round(x / d)`.
///
/// Panics under the same length rules as [`dequantize_row`].
pub fn quantize_row_ref(src: &[f32], dst: &mut [u8]) {
    super::check_row_lengths("Q8_0", dst, src, BLOCK_BYTES, BLOCK_ELEMS);
    for (x, b) in src
        .chunks_exact(BLOCK_ELEMS)
        .zip(dst.chunks_exact_mut(BLOCK_BYTES))
    {
        let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        // GGML multiplies by the reciprocal rather than dividing; the rounding of the two
        // differs in the last bit, so the reciprocal is kept for bit-exact files.
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        b[..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
        for (q, &v) in b[2..].iter_mut().zip(x) {
            *q = ((v * id).round() as i8) as u8;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dequantizes_hand_made_block() {
        let mut b = [0u8; BLOCK_BYTES];
        b[..2].copy_from_slice(&f16::from_f32(0.5).to_le_bytes());
        b[2] = 3;
        b[3] = (-128i8) as u8;
        b[33] = 127;
        let mut out = [0.0; BLOCK_ELEMS];
        dequantize_block(&b, &mut out);
        assert_eq!((out[0], out[1], out[2], out[31]), (1.5, -64.0, 0.0, 63.5));
    }

    #[test]
    fn round_trip_error_is_within_half_a_step() {
        let x: Vec<f32> = (0..96)
            .map(|i| ((i * 37 % 23) as f32 - 11.0) * 0.37)
            .collect();
        let mut q = vec![0u8; 3 * BLOCK_BYTES];
        quantize_row_ref(&x, &mut q);
        let mut y = vec![0.0; 96];
        dequantize_row(&q, &mut y);
        for (xb, yb) in x.chunks(32).zip(y.chunks(32)) {
            let step = xb.iter().fold(0.0f32, |m, v| m.max(v.abs())) / 127.0;
            for (a, b) in xb.iter().zip(yb) {
                assert!(
                    (a - b).abs() <= 0.5 * step * 1.01 + 1e-3 * step,
                    "{a} vs {b}"
                );
            }
        }
    }

    #[test]
    fn all_zero_block_quantizes_to_zero() {
        let mut q = vec![0xAAu8; BLOCK_BYTES];
        quantize_row_ref(&[0.0; 32], &mut q);
        assert!(q.iter().all(|&b| b == 0));
    }
}
