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
}
