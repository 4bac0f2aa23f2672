//! AWQ checkpoints (`quant_method: awq`, `version: gemm`, as AutoAWQ writes them), read into
//! [`GroupedWeight`]s ([`super::grouped`] says what they become).
//!
//! Each quantized linear layer `X` is three tensors instead of `X.weight`:
//!
//! | tensor | type, shape | holds |
//! |---|---|---|
//! | `X.qweight` | I32 `[in, out / 8]` | 4-bit codes packed along the **output** dimension, eight to a word in the interleaved order of AWQ's GEMM kernel: nibble `k` of word `[c][j]` is output `8j + [0, 2, 4, 6, 1, 3, 5, 7][k]` |
//! | `X.qzeros` | I32 `[groups, out / 8]` | zero points, packed the same way |
//! | `X.scales` | F16 `[groups, out]` | scales |
//!
//! `w[o][c] = scales[g][o] · (q[c][o] − z[g][o])` with `g = c / group_size`: the zeros are
//! stored as they are (no GPTQ-style offset). AWQ's other layouts (`gemv`, `gemv_fast`,
//! `marlin`, `exllama`) pack differently and are refused, as are bit widths other than 4.

use rayon::prelude::*;
use serde_json::Value;

use super::gptq::bad_shape;
use super::grouped::{code, contiguous_groups, GroupedWeight, IntScheme};
use super::quantization::Parts;
use crate::error::Result;

/// Nibble `k` of a packed word holds output column `ORDER[k]` of its eight.
const ORDER: [usize; 8] = [0, 2, 4, 6, 1, 3, 5, 7];
/// Output column `o` of eight is in nibble `INVERSE[o]` (`ORDER[INVERSE[o]] == o`).
const INVERSE: [usize; 8] = [0, 4, 1, 5, 2, 6, 3, 7];

/// What an AWQ `quantization_config` says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AwqScheme {
    /// Columns per group; `None` for one group per row.
    pub group_size: Option<usize>,
    /// What the weights become.
    pub int: IntScheme,
}

impl AwqScheme {
    /// Reads an AWQ `quantization_config` (`quant_method` already checked).
    pub fn from_config(q: &Value) -> std::result::Result<AwqScheme, String> {
        let bits = q
            .get("bits")
            .or_else(|| q.get("w_bit"))
            .and_then(Value::as_u64)
            .unwrap_or(4);
        if bits != 4 {
            return Err(format!("AWQ with {bits} bits is not supported (4)"));
        }
        let version = q
            .get("version")
            .and_then(Value::as_str)
            .unwrap_or("gemm")
            .to_ascii_lowercase();
        if version != "gemm" {
            return Err(format!(
                "AWQ version `{version}` is not supported (gemm; other versions pack differently)"
            ));
        }
        let group_size = match q
            .get("group_size")
            .or_else(|| q.get("q_group_size"))
            .and_then(Value::as_i64)
        {
            None | Some(-1) => None,
            Some(g) if g > 0 => Some(g as usize),
            Some(g) => return Err(format!("AWQ group_size {g} is not positive or -1")),
        };
        Ok(AwqScheme {
            group_size,
            int: IntScheme::default(),
        })
    }

    /// Unpacks layer `base` (`base.qweight`, `base.qzeros`, `base.scales`).
    pub fn unpack(&self, base: &str, parts: &mut Parts) -> Result<GroupedWeight> {
        let qweight = parts.take_i32(&format!("{base}.qweight"))?;
        let qzeros = parts.take_i32(&format!("{base}.qzeros"))?;
        let scales = parts.take_float(&format!("{base}.scales"))?;
        let [cols, words] = qweight.shape[..] else {
            return Err(bad_shape(&qweight.name, &qweight.shape, "[in, out/8]"));
        };
        let rows = words * 8;
        let groups = scales.groups(rows)?;
        if qzeros.shape != [groups, words] {
            return Err(bad_shape(
                &qzeros.name,
                &qzeros.shape,
                &format!("[{groups}, {words}]"),
            ));
        }
        let g_idx = contiguous_groups(cols, self.group_size);
        let q = qweight.i32s();
        let mut codes = vec![0u8; rows * cols];
        // Row by row (output `8j + o` is nibble INVERSE[o] of column j's words), in parallel.
        codes
            .par_chunks_mut(cols.max(1))
            .enumerate()
            .for_each(|(r, row)| {
                let (j, k) = (r / 8, INVERSE[r % 8]);
                for (c, x) in row.iter_mut().enumerate() {
                    *x = code(q[c * words + j], k, 4);
                }
            });
        let zq = qzeros.i32s();
        let mut zeros = vec![0i32; rows * groups];
        let mut s = vec![0f32; rows * groups];
        for g in 0..groups {
            for j in 0..words {
                for (k, &o) in ORDER.iter().enumerate() {
                    zeros[(8 * j + o) * groups + g] = code(zq[g * words + j], k, 4) as i32;
                }
            }
            for o in 0..rows {
                s[o * groups + g] = scales.values[g * rows + o];
            }
        }
        Ok(GroupedWeight {
            name: format!("{base}.weight"),
            rows,
            cols,
            bits: 4,
            codes,
            groups,
            scales: s,
            zeros,
            g_idx,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// AutoAWQ's packing order and the unpacking's inverse agree (AutoAWQ's own
    /// `AWQ_REVERSE_ORDER` is `INVERSE`).
    #[test]
    fn interleaved_order_inverts() {
        for o in 0..8 {
            assert_eq!(ORDER[INVERSE[o]], o);
        }
    }
}
