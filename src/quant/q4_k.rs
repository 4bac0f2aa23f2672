//! `Q4_K`: 256-element super-blocks of eight 32-element sub-blocks, 4-bit quants, and a
//! 6-bit scale and 6-bit minimum per sub-block.
//!
//! Block layout (144 bytes, little-endian):
//!
//! | bytes | field | meaning |
//! |---|---|---|
//! | 0..2 | `d` | f16 super-scale of the sub-block scales |
//! | 2..4 | `dmin` | f16 super-scale of the sub-block minimums |
//! | 4..16 | `scales[12]` | eight 6-bit scales and eight 6-bit minimums, packed (below) |
//! | 16..144 | `qs[128]` | 4-bit quants, four chunks of 32 bytes |
//!
//! Packing of `scales` for sub-block `j` (see [`scale_min`]): for `j < 4` the scale is the low
//! 6 bits of byte `j` and the minimum the low 6 bits of byte `j + 4`; for `j >= 4` the low 4
//! bits come from the low (scale) and high (minimum) nibble of byte `j + 4`, and the top 2 bits
//! from the top 2 bits of byte `j - 4` (scale) and byte `j` (minimum).
//!
//! Quants: chunk `c` (bytes `32c..32c+32` of `qs`) holds sub-block `2c` in its low nibbles and
//! sub-block `2c + 1` in its high nibbles. Element `l` of sub-block `s` with scale `sc`,
//! minimum `mn` and quant `q` is `(d * sc) * q - dmin * mn`, each product rounded to f32 as
//! GGML does.

use half::f16;

/// Elements per super-block.
pub const BLOCK_ELEMS: usize = 256;
/// Bytes per super-block.
pub const BLOCK_BYTES: usize = 144;

/// The 6-bit scale and 6-bit minimum of sub-block `j` (0..8) from the 12 packed bytes.
///
/// Shared by `Q4_K` and `Q5_K`, which pack their scales identically.
pub fn scale_min(j: usize, scales: &[u8; 12]) -> (u8, u8) {
    if j < 4 {
        (scales[j] & 63, scales[j + 4] & 63)
    } else {
        let sc = (scales[j + 4] & 0xF) | ((scales[j - 4] >> 6) << 4);
        let mn = (scales[j + 4] >> 4) | ((scales[j] >> 6) << 4);
        (sc, mn)
    }
}

/// Dequantizes one super-block.
pub fn dequantize_block(block: &[u8; BLOCK_BYTES], out: &mut [f32; BLOCK_ELEMS]) {
    let d = f16::from_le_bytes([block[0], block[1]]).to_f32();
    let dmin = f16::from_le_bytes([block[2], block[3]]).to_f32();
    let scales: &[u8; 12] = block[4..16].try_into().unwrap();
    let qs = &block[16..];
    for c in 0..4 {
        let (sc1, m1) = scale_min(2 * c, scales);
        let (sc2, m2) = scale_min(2 * c + 1, scales);
        let (d1, m1) = (d * sc1 as f32, dmin * m1 as f32);
        let (d2, m2) = (d * sc2 as f32, dmin * m2 as f32);
        let q = &qs[32 * c..32 * c + 32];
        let y = &mut out[64 * c..64 * c + 64];
        for l in 0..32 {
            y[l] = d1 * (q[l] & 0xF) as f32 - m1;
            y[l + 32] = d2 * (q[l] >> 4) as f32 - m2;
        }
    }
}

/// Dequantizes `dst.len()` elements (a whole number of super-blocks) from `src`.
///
/// Panics if `dst.len()` is not a multiple of [`BLOCK_ELEMS`] or `src` is shorter than the
/// matching number of blocks: tensor sizes are validated when a file is loaded.
pub fn dequantize_row(src: &[u8], dst: &mut [f32]) {
    super::check_row_lengths("Q4_K", src, dst, BLOCK_BYTES, BLOCK_ELEMS);
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

    /// Packs eight (scale, min) pairs the way the format stores them.
    pub(crate) fn pack(pairs: [(u8, u8); 8]) -> [u8; 12] {
        let mut s = [0u8; 12];
        for (j, (sc, mn)) in pairs.into_iter().enumerate() {
            if j < 4 {
                s[j] |= sc;
                s[j + 4] |= mn;
            } else {
                s[j + 4] = (sc & 0xF) | ((mn & 0xF) << 4);
                s[j - 4] |= (sc >> 4) << 6;
                s[j] |= (mn >> 4) << 6;
            }
        }
        s
    }

    #[test]
    fn scale_min_unpacks_every_sub_block() {
        let pairs = [
            (1, 63),
            (63, 0),
            (17, 42),
            (32, 5),
            (63, 63),
            (48, 1),
            (15, 16),
            (0, 33),
        ];
        let s = pack(pairs);
        for (j, p) in pairs.iter().enumerate() {
            assert_eq!(scale_min(j, &s), *p, "sub-block {j}");
        }
    }

    #[test]
    fn dequantizes_hand_made_block() {
        let mut b = [0u8; BLOCK_BYTES];
        b[..2].copy_from_slice(&f16::from_f32(0.5).to_le_bytes());
        b[2..4].copy_from_slice(&f16::from_f32(0.25).to_le_bytes());
        let s = pack([
            (2, 4),
            (3, 0),
            (1, 1),
            (1, 1),
            (1, 1),
            (1, 1),
            (10, 8),
            (1, 60),
        ]);
        b[4..16].copy_from_slice(&s);
        b[16] = 0x53; // sub-block 0 element 0: q=3; sub-block 1 element 0: q=5
        b[16 + 96 + 31] = 0xF7; // sub-block 6 element 31: q=7; sub-block 7 element 31: q=15
        let mut out = [0.0; BLOCK_ELEMS];
        dequantize_block(&b, &mut out);
        assert_eq!(out[0], 0.5 * 2.0 * 3.0 - 0.25 * 4.0);
        assert_eq!(out[32], 0.5 * 3.0 * 5.0);
        assert_eq!(out[1], -1.0);
        assert_eq!(out[192 + 31], 0.5 * 10.0 * 7.0 - 0.25 * 8.0);
        assert_eq!(out[255], 0.5 * 15.0 - 0.25 * 60.0);
    }
}
