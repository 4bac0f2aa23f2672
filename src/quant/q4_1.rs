//! `Q4_1`: 32 elements per block, an f16 scale, an f16 minimum and 4-bit unsigned quants.
//!
//! Block layout (20 bytes, little-endian):
//!
//! | bytes | field | meaning |
//! |---|---|---|
//! | 0..2 | `d` | f16 scale |
//! | 2..4 | `m` | f16 minimum (offset added to every element) |
//! | 4..20 | `qs[16]` | byte `j` holds element `j` in its low nibble and element `j + 16` in its high nibble |
//!
//! Element `j < 16` is `(qs[j] & 0xF) * d + m`; element `j + 16` is `(qs[j] >> 4) * d + m`
//! (a multiply then an add, both rounded, as GGML does).

use half::f16;

/// Elements per block.
pub const BLOCK_ELEMS: usize = 32;
/// Bytes per block.
pub const BLOCK_BYTES: usize = 20;

/// Dequantizes one block.
pub fn dequantize_block(block: &[u8; BLOCK_BYTES], out: &mut [f32; BLOCK_ELEMS]) {
    let d = f16::from_le_bytes([block[0], block[1]]).to_f32();
    let m = f16::from_le_bytes([block[2], block[3]]).to_f32();
    let (lo, hi) = out.split_at_mut(16);
    for ((&q, a), b) in block[4..].iter().zip(lo).zip(hi) {
        *a = (q & 0xF) as f32 * d + m;
        *b = (q >> 4) as f32 * d + m;
    }
}

/// Dequantizes `dst.len()` elements (a whole number of blocks) from `src`.
///
/// Panics if `dst.len()` is not a multiple of [`BLOCK_ELEMS`] or `src` is shorter than the
/// matching number of blocks: tensor sizes are validated when a file is loaded.
pub fn dequantize_row(src: &[u8], dst: &mut [f32]) {
    super::check_row_lengths("Q4_1", src, dst, BLOCK_BYTES, BLOCK_ELEMS);
    for (b, o) in src
        .chunks_exact(BLOCK_BYTES)
        .zip(dst.chunks_exact_mut(BLOCK_ELEMS))
    {
        dequantize_block(b.try_into().unwrap(), o.try_into().unwrap());
    }
}

/// Reference quantizer, bit-exact with GGML's `quantize_row_q4_1_ref`: `m` is the block's
/// minimum, `d = (max - min) / 15`, quants `min(15, trunc((x - min) / d + 0.5))`.
///
/// Panics under the same length rules as [`dequantize_row`].
pub fn quantize_row_ref(src: &[f32], dst: &mut [u8]) {
    super::check_row_lengths("Q4_1", dst, src, BLOCK_BYTES, BLOCK_ELEMS);
    for (x, b) in src
        .chunks_exact(BLOCK_ELEMS)
        .zip(dst.chunks_exact_mut(BLOCK_BYTES))
    {
        let (mut min, mut max) = (f32::MAX, -f32::MAX);
        for &v in x {
            min = min.min(v);
            max = max.max(v);
        }
        let d = (max - min) / 15.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        b[..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
        b[2..4].copy_from_slice(&f16::from_f32(min).to_le_bytes());
        // `as u8` truncates toward zero like GGML's `(uint8_t)` cast of a non-negative value.
        let quant = |v: f32| (((v - min) * id + 0.5) as u8).min(15);
        for j in 0..16 {
            b[4 + j] = quant(x[j]) | (quant(x[j + 16]) << 4);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dequantizes_hand_made_block() {
        let mut b = [0u8; BLOCK_BYTES];
        b[..2].copy_from_slice(&f16::from_f32(0.25).to_le_bytes());
        b[2..4].copy_from_slice(&f16::from_f32(-1.0).to_le_bytes());
        b[4] = 0xF0;
        b[19] = 0x04;
        let mut out = [0.0; BLOCK_ELEMS];
        dequantize_block(&b, &mut out);
        assert_eq!((out[0], out[16], out[15], out[31]), (-1.0, 2.75, 0.0, -1.0));
    }
}
