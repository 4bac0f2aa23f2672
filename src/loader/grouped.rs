//! Group-wise integer weights, the form GPTQ, AWQ and compressed-tensors' integer
//! checkpoints share once unpacked, and how they become tensors wick computes with.
//!
//! Each format's reader ([`super::gptq`], [`super::awq`], [`super::compressed_tensors`])
//! unpacks its bit layout into a [`GroupedWeight`]: an unsigned code `q` per element of the
//! `[out, in]` matrix, and per output row and group a scale `s` and a zero point `z`, with
//! `w = s · (q − z)`. Input column `c` belongs to group `g_idx[c]` (`c / group_size`
//! unless the checkpoint reorders them, as GPTQ's `desc_act` does).
//!
//! **Where the mapping is exact.** A block of 32 consecutive input columns that lies in one
//! group maps onto wick's native blocks, which are along the input dimension too:
//!
//! - 4 bits, `z = 8` (symmetric): [`DType::Q4_0`] with `d = s`: `(q − 8) · d`, exact.
//! - 4 bits, any other zero: [`DType::Q4_1`] with `d = s` and `m = −s · z`:
//!   `q · d + m`. `q · d` is exact; `m` is rounded to f16 (the product of an 11-bit scale and
//!   a 4-bit zero needs up to 15 bits), an error of at most half an f16 ulp of `s · z` per
//!   group (none when `z` is a power of two or 0). So this mapping is **not** exact. Measured
//!   on the test fixtures (`tests/quantized_checkpoints.rs`): the weights move by at most
//!   2.4e-4 and the last logits by 4.3e-3 to 1.2e-2 (AWQ g32/g64, GPTQ g128,
//!   compressed-tensors W4A16_ASYM g32), exactly the figure the oracle computes for
//!   `m = f16(−s·z)`, and a tenth of what 8-bit activations cost on the same model. Q8_0
//!   with `d = s` would hold these weights exactly (`q − z` fits a byte), at 1.7 times the
//!   memory; [`IntScheme::exact`] (f32) is the exact path.
//! - 8 bits: [`DType::Q8_0`] with `d = s` and `q − z` as the signed byte, exact wherever
//!   `q − z` fits in −128…127: always for symmetric weights (`z = 128`). A block of an
//!   asymmetric matrix whose values do not fit is requantized to Q8_0 from its exact values
//!   (`d = max|w| / 127`, llama.cpp's rounding): one rounding of at most `max|w| / 254`. On
//!   the asymmetric per-row GPTQ fixture the logits move by 0.07–0.10, the oracle's figure
//!   for exactly that mix (`q8_0_mapped`), under the 0.09–0.12 of requantizing every block.
//!
//! The scale must be an f16 number for `d = s` (GPTQ's and AWQ's are f16; a bf16 or f32
//! scale of compressed-tensors usually is, and is checked). Everything else — groups that
//! do not cover whole blocks of 32 (`desc_act`'s reordered columns, a group size that is
//! not a multiple of 32), scales f16 cannot hold, bit widths other than 4 and 8 — is
//! dequantized exactly to f32 and requantized to Q8_0 ([`IntScheme::fallback`]), or kept
//! f32 when the rows are not whole blocks. Q8_0 rather than Q4_1 because a block of 32 that
//! mixes groups mixes scales: on the `desc_act` fixture (f32 compute) Q4_1 moves the last
//! logits by 2.3, Q8_0 by 0.14, exactly what llama.cpp's Q8_0 quantizer does on the same
//! weights (`desc_act_falls_back_to_q8_0_not_q4_1`). Permuting the input columns instead
//! (and the activations with them) would keep 4 bits exactly, but needs a gather in every
//! backend's matmul, or, for `down_proj` only, permuting `gate_proj`'s and `up_proj`'s rows;
//! not done.
//!
//! [`IntScheme::exact`] reads every weight into f32 instead: the checkpoint's exact values,
//! four to eight times the memory; what the oracle tests compare at 2e-3.

use rayon::prelude::*;

use super::{Bytes, HostTensor};
use crate::error::{Error, Result};
use crate::quant::{q8_0, DType};

/// How integer weights are read: into wick's native blocks where the mapping is exact
/// (the default), or all into f32.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IntScheme {
    /// Read every weight into f32 (exact, the most memory).
    pub exact: bool,
    /// The format of weights whose groups do not map onto blocks: [`DType::Q8_0`] by
    /// default (f32 when the rows are not whole blocks either).
    pub fallback: DType,
    /// Keep the float embedding and an untied head as stored instead of reading them into
    /// Q8_0 ([`super::quantization`] says why it does by default).
    pub keep_embedding: bool,
}

impl Default for IntScheme {
    fn default() -> Self {
        IntScheme {
            exact: false,
            fallback: DType::Q8_0,
            keep_embedding: false,
        }
    }
}

/// One linear weight, unpacked: `w[r][c] = scales[r][g] · (codes[r][c] − zeros[r][g])`
/// with `g = g_idx[c]`.
#[derive(Clone, Debug)]
pub struct GroupedWeight {
    /// The name of the tensor it becomes (`….weight`).
    pub name: String,
    /// Output features (rows).
    pub rows: usize,
    /// Input features (columns).
    pub cols: usize,
    /// Bits per code.
    pub bits: u32,
    /// `[rows, cols]` unsigned codes, `0 ≤ q < 2^bits`.
    pub codes: Vec<u8>,
    /// Groups per row.
    pub groups: usize,
    /// `[rows, groups]` scales.
    pub scales: Vec<f32>,
    /// `[rows, groups]` zero points, in the codes' unsigned domain.
    pub zeros: Vec<i32>,
    /// `[cols]` the group of each input column, `< groups`.
    pub g_idx: Vec<u32>,
}

/// The group of each of `cols` columns for groups of `group_size` (`None`: one group).
pub fn contiguous_groups(cols: usize, group_size: Option<usize>) -> Vec<u32> {
    let gs = group_size.unwrap_or(cols).max(1);
    (0..cols).map(|c| (c / gs) as u32).collect()
}

impl GroupedWeight {
    /// Checks the sizes of every field against `rows`, `cols` and `groups` and that every
    /// group index is in range: readers build these from file contents.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Error::UnsupportedModel(format!("`{}`: {m}", self.name));
        let n = self.rows.checked_mul(self.cols);
        let ng = self.rows.checked_mul(self.groups);
        if n != Some(self.codes.len())
            || ng != Some(self.scales.len())
            || ng != Some(self.zeros.len())
            || self.g_idx.len() != self.cols
        {
            return Err(bad(format!(
                "unpacked sizes do not agree: {} codes, {} scales, {} zeros and {} group \
                 indices for a {} × {} matrix in {} groups",
                self.codes.len(),
                self.scales.len(),
                self.zeros.len(),
                self.g_idx.len(),
                self.rows,
                self.cols,
                self.groups
            )));
        }
        if let Some(&g) = self.g_idx.iter().find(|&&g| g as usize >= self.groups) {
            return Err(bad(format!(
                "group index {g} is out of range ({} groups)",
                self.groups
            )));
        }
        if let Some(s) = self.scales.iter().find(|s| !s.is_finite()) {
            return Err(bad(format!("a scale is {s}")));
        }
        Ok(())
    }

    /// Row `r` dequantized exactly (`s · (q − z)` is an f32 product of a scale and a small
    /// integer).
    pub fn row_f32(&self, r: usize, out: &mut [f32]) {
        let codes = &self.codes[r * self.cols..(r + 1) * self.cols];
        let scales = &self.scales[r * self.groups..(r + 1) * self.groups];
        let zeros = &self.zeros[r * self.groups..(r + 1) * self.groups];
        for ((o, &q), &g) in out.iter_mut().zip(codes).zip(&self.g_idx) {
            let g = g as usize;
            *o = scales[g] * (q as i32 - zeros[g]) as f32;
        }
    }

    /// Whether every block of 32 columns lies in one group and every scale is an f16
    /// number: the condition for `d = s`.
    fn maps_onto_blocks(&self) -> bool {
        self.cols.is_multiple_of(32)
            && self
                .g_idx
                .chunks_exact(32)
                .all(|b| b.iter().all(|&g| g == b[0]))
            && self
                .scales
                .iter()
                .all(|&s| half::f16::from_f32(s).to_f32() == s)
    }

    /// The format this weight is read into under `scheme`.
    pub fn target(&self, scheme: IntScheme) -> DType {
        if scheme.exact {
            return DType::F32;
        }
        if !self.maps_onto_blocks() || !matches!(self.bits, 4 | 8) {
            return match scheme.fallback.bytes_for(self.cols) {
                Some(_) => scheme.fallback,
                None => DType::F32,
            };
        }
        match self.bits {
            4 if self.zeros.iter().all(|&z| z == 8) => DType::Q4_0,
            4 => DType::Q4_1,
            _ => DType::Q8_0,
        }
    }

    /// The tensor wick computes with ([`target`](Self::target) says which format).
    pub fn into_tensor(self, scheme: IntScheme) -> Result<HostTensor> {
        self.validate()?;
        let dtype = self.target(scheme);
        let row_bytes = dtype.bytes_for(self.cols).expect("checked by target");
        let mut out = vec![0u8; self.rows * row_bytes];
        let mapped = !scheme.exact && self.maps_onto_blocks() && matches!(self.bits, 4 | 8);
        out.par_chunks_mut(row_bytes.max(1))
            .enumerate()
            .for_each(|(r, dst)| {
                if mapped && self.bits == 4 {
                    return self.write_q4(r, dtype, dst);
                }
                let mut row = vec![0f32; self.cols];
                self.row_f32(r, &mut row);
                if mapped {
                    self.write_q8_0(r, &row, dst)
                } else {
                    crate::quant::quantize_row(dtype, &row, dst)
                }
            });
        Ok(HostTensor {
            name: self.name,
            dtype,
            shape: vec![self.rows, self.cols],
            data: Bytes::from_vec(out),
        })
    }

    /// Row `r` as Q4_0 (`z = 8`) or Q4_1 blocks with `d = s`.
    fn write_q4(&self, r: usize, dtype: DType, dst: &mut [u8]) {
        let codes = &self.codes[r * self.cols..(r + 1) * self.cols];
        let bb = dtype.block_bytes();
        for (b, (block, q)) in dst
            .chunks_exact_mut(bb)
            .zip(codes.chunks_exact(32))
            .enumerate()
        {
            let g = r * self.groups + self.g_idx[b * 32] as usize;
            let s = self.scales[g];
            block[..2].copy_from_slice(&half::f16::from_f32(s).to_le_bytes());
            let qs = if dtype == DType::Q4_1 {
                let m = -s * self.zeros[g] as f32;
                block[2..4].copy_from_slice(&half::f16::from_f32(m).to_le_bytes());
                &mut block[4..]
            } else {
                &mut block[2..]
            };
            for j in 0..16 {
                qs[j] = (q[j] & 0xF) | (q[j + 16] << 4);
            }
        }
    }

    /// Row `r` as Q8_0 blocks with `d = s` where `q − z` fits a signed byte; other blocks
    /// are requantized from their exact values `row`.
    fn write_q8_0(&self, r: usize, row: &[f32], dst: &mut [u8]) {
        let codes = &self.codes[r * self.cols..(r + 1) * self.cols];
        for (b, block) in dst.chunks_exact_mut(q8_0::BLOCK_BYTES).enumerate() {
            let g = r * self.groups + self.g_idx[b * 32] as usize;
            let (s, z) = (self.scales[g], self.zeros[g]);
            let q = &codes[b * 32..(b + 1) * 32];
            let fits = q.iter().all(|&q| (-128..=127).contains(&(q as i32 - z)));
            if fits {
                block[..2].copy_from_slice(&half::f16::from_f32(s).to_le_bytes());
                for (d, &q) in block[2..].iter_mut().zip(q) {
                    *d = (q as i32 - z) as i8 as u8;
                }
            } else {
                q8_0::quantize_row_ref(&row[b * 32..(b + 1) * 32], block);
            }
        }
    }
}

/// Reads `bits`-wide codes packed `32 / bits` to an `i32` word, lowest bits first: value `k`
/// of `word` (GPTQ's and AWQ's layout; AWQ then permutes them).
#[inline]
pub fn code(word: i32, k: usize, bits: u32) -> u8 {
    ((word as u32 >> (k as u32 * bits)) & ((1u32 << bits) - 1)) as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weight(bits: u32, zeros: i32, g_idx: Vec<u32>, groups: usize) -> GroupedWeight {
        let (rows, cols) = (3, g_idx.len());
        GroupedWeight {
            name: "w.weight".into(),
            rows,
            cols,
            bits,
            codes: (0..rows * cols)
                .map(|i| ((i * 7 + 3) % (1 << bits)) as u8)
                .collect(),
            groups,
            scales: (0..rows * groups).map(|i| (3 + i) as f32 / 256.0).collect(),
            zeros: vec![zeros; rows * groups],
            g_idx,
        }
    }

    fn values(w: &GroupedWeight) -> Vec<f32> {
        let mut v = vec![0.0; w.rows * w.cols];
        for (r, row) in v.chunks_exact_mut(w.cols).enumerate() {
            w.row_f32(r, row);
        }
        v
    }

    /// Symmetric 4-bit becomes Q4_0, asymmetric Q4_1, 8-bit Q8_0, each equal to the exact
    /// values (the scales and zeros here are chosen so that `m` is an f16 number).
    #[test]
    fn aligned_groups_map_exactly() {
        for (bits, z, dtype) in [
            (4, 8, DType::Q4_0),
            (4, 3, DType::Q4_1),
            (8, 128, DType::Q8_0),
        ] {
            let w = weight(bits, z, contiguous_groups(128, Some(64)), 2);
            let want = values(&w);
            let t = w.into_tensor(IntScheme::default()).unwrap();
            assert_eq!(t.dtype, dtype);
            assert_eq!(t.to_f32(), want, "{dtype}");
        }
    }

    /// Columns of several groups in one block of 32 (desc_act) fall back to Q8_0; rows that
    /// are not whole blocks to f32; the exact scheme to f32.
    #[test]
    fn unaligned_groups_fall_back() {
        let mut g: Vec<u32> = (0..64).map(|c| (c % 2) as u32).collect();
        let w = weight(4, 8, g.clone(), 2);
        assert_eq!(w.target(IntScheme::default()), DType::Q8_0);
        let want = values(&w);
        let got = w.into_tensor(IntScheme::default()).unwrap().to_f32();
        let max = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        for (a, b) in want.iter().zip(&got) {
            assert!((a - b).abs() <= max / 127.0);
        }
        g.truncate(40);
        assert_eq!(weight(4, 8, g, 2).target(IntScheme::default()), DType::F32);
        let exact = IntScheme {
            exact: true,
            ..IntScheme::default()
        };
        let w = weight(4, 3, contiguous_groups(64, None), 1);
        let want = values(&w);
        let t = w.into_tensor(exact).unwrap();
        assert_eq!((t.dtype, t.to_f32()), (DType::F32, want));
    }

    #[test]
    fn bad_group_index_is_an_error() {
        let w = weight(4, 8, vec![0, 1, 2, 5], 3);
        let e = w.into_tensor(IntScheme::default()).unwrap_err().to_string();
        assert!(e.contains("group index 5") && e.contains("w.weight"), "{e}");
    }
}
