//! The GPU layout of block-quantized weights: GGUF blocks padded to whole 32-bit words.
//!
//! WGSL reads storage buffers as `array<u32>`, and GGUF blocks are 18 (`Q4_0`), 34 (`Q8_0`)
//! or 210 (`Q6_K`) bytes: a block would start mid-word and its quants straddle words. So
//! rows are repacked once, at upload, into blocks of [`block_words`] words, keeping GGUF's
//! field order and moving fields only as far as needed for every quant array to start on a
//! word boundary (the shader side is `shaders/include/weight_quant.wgsl`):
//!
//! | format | GGUF bytes | GPU words | GPU layout (bytes) |
//! |---|---:|---:|---|
//! | `Q8_0` | 34 | 9 | `d` f16 @0, zero @2..4, `qs[32]` @4..36 |
//! | `Q4_0` | 18 | 5 | `d` f16 @0, zero @2..4, `qs[16]` @4..20 |
//! | `Q4_1` | 20 | 5 | unchanged: `d` @0, `m` @2, `qs[16]` @4..20 |
//! | `Q4_K` | 144 | 36 | unchanged |
//! | `Q5_K` | 176 | 44 | unchanged |
//! | `Q6_K` | 210 | 53 | unchanged, then two zero bytes |
//!
//! A weight segment is `[rows, K / block_elems, block_words]` u32; the padding costs 11 %
//! for `Q4_0`, 6 % for `Q8_0` and 1 % for `Q6_K`. Scales stay f16 and are widened in the
//! shader, so dequantization is exactly the scalar reference's.

use crate::quant::DType;

/// Words per repacked block of `dtype`, or `None` for formats the GPU reads as plain floats.
pub const fn block_words(dtype: DType) -> Option<usize> {
    match dtype {
        DType::F32 | DType::F16 | DType::BF16 => None,
        DType::Q8_0 => Some(9),
        DType::Q4_0 | DType::Q4_1 => Some(5),
        DType::Q4_K => Some(36),
        DType::Q5_K => Some(44),
        DType::Q6_K => Some(53),
    }
}

/// Repacks whole GGUF blocks of `dtype` from `src` into `dst` (which must be zeroed and
/// exactly `block_words(dtype) · 4` bytes per block of `src`).
pub fn repack_blocks(dtype: DType, src: &[u8], dst: &mut [u8]) {
    let words = block_words(dtype).expect("a block-quantized format");
    let (sb, db) = (dtype.block_bytes(), 4 * words);
    assert!(
        src.len().is_multiple_of(sb) && dst.len() == src.len() / sb * db,
        "repack {dtype}: {} source bytes into {}",
        src.len(),
        dst.len()
    );
    for (s, d) in src.chunks_exact(sb).zip(dst.chunks_exact_mut(db)) {
        match dtype {
            // The f16 scale, two bytes of padding, then the quants on a word boundary.
            DType::Q8_0 | DType::Q4_0 => {
                d[..2].copy_from_slice(&s[..2]);
                d[4..4 + sb - 2].copy_from_slice(&s[2..]);
            }
            _ => d[..sb].copy_from_slice(s),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repacked_blocks_are_words_and_keep_every_byte() {
        for dtype in [
            DType::Q8_0,
            DType::Q4_0,
            DType::Q4_1,
            DType::Q4_K,
            DType::Q5_K,
            DType::Q6_K,
        ] {
            let words = block_words(dtype).unwrap();
            assert!(4 * words >= dtype.block_bytes() && 4 * words < dtype.block_bytes() + 4);
            let src: Vec<u8> = (0..2 * dtype.block_bytes())
                .map(|i| (i % 251) as u8 + 1)
                .collect();
            let mut dst = vec![0u8; 2 * 4 * words];
            repack_blocks(dtype, &src, &mut dst);
            // Same bytes, in order, with only zero padding added.
            let kept: Vec<u8> = dst.iter().copied().filter(|&b| b != 0).collect();
            assert_eq!(kept, src, "{dtype}");
        }
        assert_eq!(block_words(DType::BF16), None);
    }
}
