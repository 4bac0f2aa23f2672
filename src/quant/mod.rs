//! Weight data types and block-quantized formats.
//!
//! Names follow GGML (`Q4_0`, `Q4_K`, ...). Each block format lives in its own module with a
//! scalar reference dequantization; the fast kernels of every backend are tested against it.
//! The byte layouts are those of GGUF files, so quantized tensors stay memory-mapped.
//!
//! - [`q8_0`], [`q4_0`], [`q4_1`]: 32-element blocks with one f16 scale (and minimum).
//! - [`q4_k`], [`q5_k`], [`q6_k`]: 256-element super-blocks with quantized sub-block scales.
//!
//! Every format has a reference quantizer (`quantize_row_ref`), byte-exact with GGML's
//! `quantize_row_*_ref` (what llama-quantize runs without an importance matrix);
//! [`crate::convert::scheme`] picks the format of each tensor of a checkpoint the way
//! llama-quantize does.

pub mod q4_0;
pub mod q4_1;
pub mod q4_k;
pub mod q5_k;
pub mod q6_k;
pub mod q8_0;

use std::fmt;

/// How the elements of a weight tensor are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[allow(non_camel_case_types)]
pub enum DType {
    /// IEEE float32.
    F32,
    /// IEEE float16.
    F16,
    /// bfloat16.
    BF16,
    /// 32 elements: f16 scale + 32 × i8.
    Q8_0,
    /// 32 elements: f16 scale + 32 × 4-bit (offset 8).
    Q4_0,
    /// 32 elements: f16 scale, f16 min + 32 × 4-bit.
    Q4_1,
    /// 256-element super-block, 4-bit with 6-bit sub-block scales and mins.
    Q4_K,
    /// 256-element super-block, 5-bit with 6-bit sub-block scales and mins.
    Q5_K,
    /// 256-element super-block, 6-bit with 8-bit sub-block scales.
    Q6_K,
}

impl DType {
    /// Elements per block (1 for plain floats).
    pub const fn block_elems(self) -> usize {
        match self {
            DType::F32 | DType::F16 | DType::BF16 => 1,
            DType::Q8_0 | DType::Q4_0 | DType::Q4_1 => 32,
            DType::Q4_K | DType::Q5_K | DType::Q6_K => 256,
        }
    }

    /// Bytes per block.
    pub const fn block_bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::Q8_0 => 34,
            DType::Q4_0 => 18,
            DType::Q4_1 => 20,
            DType::Q4_K => 144,
            DType::Q5_K => 176,
            DType::Q6_K => 210,
        }
    }

    /// Bytes taken by `n` elements, or `None` when `n` is not a whole number of blocks
    /// (or overflows).
    pub fn bytes_for(self, n: usize) -> Option<usize> {
        if !n.is_multiple_of(self.block_elems()) {
            return None;
        }
        (n / self.block_elems()).checked_mul(self.block_bytes())
    }

    /// Whether this is a block-quantized format.
    pub const fn is_quantized(self) -> bool {
        !matches!(self, DType::F32 | DType::F16 | DType::BF16)
    }

    /// The GGML name (`"Q4_K"`, `"F16"`, ...).
    pub const fn name(self) -> &'static str {
        match self {
            DType::F32 => "F32",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::Q8_0 => "Q8_0",
            DType::Q4_0 => "Q4_0",
            DType::Q4_1 => "Q4_1",
            DType::Q4_K => "Q4_K",
            DType::Q5_K => "Q5_K",
            DType::Q6_K => "Q6_K",
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Quantizes `src` (f32, a whole number of `dtype` blocks) into `dst` with the reference
/// quantizer of `dtype`. Float types are converted (round to nearest even).
///
/// Panics if the lengths do not match (`dst.len() == dtype.bytes_for(src.len())`).
pub fn quantize_row(dtype: DType, src: &[f32], dst: &mut [u8]) {
    match dtype {
        DType::F32 => {
            for (d, v) in dst.chunks_exact_mut(4).zip(src) {
                d.copy_from_slice(&v.to_le_bytes());
            }
        }
        DType::F16 => {
            for (d, v) in dst.chunks_exact_mut(2).zip(src) {
                d.copy_from_slice(&half::f16::from_f32(*v).to_le_bytes());
            }
        }
        DType::BF16 => {
            for (d, v) in dst.chunks_exact_mut(2).zip(src) {
                d.copy_from_slice(&half::bf16::from_f32(*v).to_le_bytes());
            }
        }
        DType::Q8_0 => q8_0::quantize_row_ref(src, dst),
        DType::Q4_0 => q4_0::quantize_row_ref(src, dst),
        DType::Q4_K => q4_k::quantize_row_ref(src, dst),
        DType::Q5_K => q5_k::quantize_row_ref(src, dst),
        DType::Q6_K => q6_k::quantize_row_ref(src, dst),
        DType::Q4_1 => q4_1::quantize_row_ref(src, dst),
    }
}

/// Scalar reference: dequantizes `n` elements stored as `dtype` in `src` into `dst`.
///
/// This is the ground truth the SIMD and GPU kernels are checked against, not a fast path.
/// Panics if `src` is shorter than `dtype.bytes_for(dst.len())` — callers validate tensor
/// sizes at load time.
pub fn dequantize_row(dtype: DType, src: &[u8], dst: &mut [f32]) {
    match dtype {
        DType::F32 => {
            for (d, c) in dst.iter_mut().zip(src.chunks_exact(4)) {
                *d = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        DType::F16 => {
            for (d, c) in dst.iter_mut().zip(src.chunks_exact(2)) {
                *d = half::f16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        DType::BF16 => {
            for (d, c) in dst.iter_mut().zip(src.chunks_exact(2)) {
                *d = half::bf16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        DType::Q8_0 => q8_0::dequantize_row(src, dst),
        DType::Q4_0 => q4_0::dequantize_row(src, dst),
        DType::Q4_1 => q4_1::dequantize_row(src, dst),
        DType::Q4_K => q4_k::dequantize_row(src, dst),
        DType::Q5_K => q5_k::dequantize_row(src, dst),
        DType::Q6_K => q6_k::dequantize_row(src, dst),
    }
}

/// Asserts that `elems` is a whole number of blocks and `bytes` holds at least those blocks
/// (extra trailing bytes are ignored, as [`dequantize_row`] promises).
///
/// A mismatch is a bug in the caller (sizes are validated at load time), hence a panic.
fn check_row_lengths(
    format: &str,
    bytes: &[u8],
    elems: &[f32],
    block_bytes: usize,
    block_elems: usize,
) {
    assert!(
        elems.len().is_multiple_of(block_elems)
            && bytes.len() >= elems.len() / block_elems * block_bytes,
        "{format}: {} elements need at least {} bytes in whole blocks of {block_elems}, got {}",
        elems.len(),
        elems.len().div_ceil(block_elems) * block_bytes,
        bytes.len()
    );
}
