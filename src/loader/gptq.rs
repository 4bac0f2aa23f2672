//! GPTQ checkpoints (`quant_method: gptq`, as AutoGPTQ, GPTQModel and optimum write them),
//! read into [`GroupedWeight`]s ([`super::grouped`] says what they become).
//!
//! Each quantized linear layer `X` is four tensors instead of `X.weight`:
//!
//! | tensor | type, shape | holds |
//! |---|---|---|
//! | `X.qweight` | I32 `[in · bits / 32, out]` | codes packed along the input dimension: code of input `c`, output `o` is bits `(c mod k) · bits …` of word `[c / k][o]`, `k = 32 / bits` |
//! | `X.qzeros` | I32 `[groups, out · bits / 32]` | zero points packed along the output dimension the same way |
//! | `X.scales` | F16 `[groups, out]` | scales |
//! | `X.g_idx` | I32 `[in]` | the group of each input column (optional; `c / group_size` without it) |
//!
//! `w[o][c] = scales[g][o] · (q[c][o] − z[g][o])` with `g = g_idx[c]`. In the original
//! format (`checkpoint_format: gptq`, "v1") the stored zero is one less than the zero:
//! `z = stored + 1`, as AutoGPTQ's reference dequantization reads it (so a zero of 0, which
//! v1 cannot store, reads as 2^bits: v1's known flaw, the reason for v2); `gptq_v2` stores
//! `z` itself. `sym: true` means `z = 2^(bits−1)` throughout (stored as 7 for 4 bits in v1).
//! `desc_act: true` quantizes the columns in another order and records it in `g_idx`: the
//! groups are then not runs of consecutive columns, and such weights are requantized
//! ([`super::grouped`]). `group_size: -1` is one group per row. Bit widths 2, 4 and 8 are
//! read (3-bit codes straddle words and are refused).

use rayon::prelude::*;
use serde_json::Value;

use super::grouped::{code, contiguous_groups, GroupedWeight, IntScheme};
use super::quantization::Parts;
use crate::error::{Error, Result};

/// What a GPTQ `quantization_config` says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GptqScheme {
    /// Bits per code: 2, 4 or 8.
    pub bits: u32,
    /// Columns per group; `None` for `group_size: -1` (one group per row).
    pub group_size: Option<usize>,
    /// Whether the stored zeros are the zeros (`gptq_v2`) rather than one less (v1).
    pub v2: bool,
    /// What the weights become.
    pub int: IntScheme,
}

impl GptqScheme {
    /// Reads a GPTQ `quantization_config` (`quant_method` already checked).
    pub fn from_config(q: &Value) -> std::result::Result<GptqScheme, String> {
        let bits = q.get("bits").and_then(Value::as_u64).unwrap_or(4);
        if !matches!(bits, 2 | 4 | 8) {
            return Err(format!("GPTQ with {bits} bits is not supported (2, 4, 8)"));
        }
        let group_size = match q.get("group_size").and_then(Value::as_i64) {
            None | Some(-1) => None,
            Some(g) if g > 0 => Some(g as usize),
            Some(g) => return Err(format!("GPTQ group_size {g} is not positive or -1")),
        };
        let format = q
            .get("checkpoint_format")
            .or_else(|| q.get("format"))
            .and_then(Value::as_str)
            .unwrap_or("gptq");
        let v2 = match format {
            "gptq" => false,
            "gptq_v2" => true,
            other => {
                return Err(format!(
                    "GPTQ checkpoint_format `{other}` is not supported (gptq, gptq_v2)"
                ))
            }
        };
        Ok(GptqScheme {
            bits: bits as u32,
            group_size,
            v2,
            int: IntScheme::default(),
        })
    }

    /// Unpacks layer `base` (`base.qweight`, `base.qzeros`, `base.scales`, `base.g_idx`).
    pub fn unpack(&self, base: &str, parts: &mut Parts) -> Result<GroupedWeight> {
        let bits = self.bits;
        let per = (32 / bits) as usize;
        let qweight = parts.take_i32(&format!("{base}.qweight"))?;
        let qzeros = parts.take_i32(&format!("{base}.qzeros"))?;
        let scales = parts.take_float(&format!("{base}.scales"))?;
        let g_idx = parts.take_optional_int(&format!("{base}.g_idx"))?;
        let [packed_in, out] = qweight.shape[..] else {
            return Err(bad_shape(
                &qweight.name,
                &qweight.shape,
                "[in·bits/32, out]",
            ));
        };
        let cols = packed_in * per;
        let groups = scales.groups(out)?;
        let zero_words = out.div_ceil(per);
        if qzeros.shape != [groups, zero_words] {
            return Err(bad_shape(
                &qzeros.name,
                &qzeros.shape,
                &format!("[{groups}, {zero_words}]"),
            ));
        }
        let g_idx = match g_idx {
            Some((name, v)) => {
                if v.len() != cols {
                    return Err(Error::UnsupportedModel(format!(
                        "`{name}` has {} entries for {cols} input columns",
                        v.len()
                    )));
                }
                v.into_iter()
                    .map(|g| u32::try_from(g).unwrap_or(u32::MAX))
                    .collect()
            }
            None => contiguous_groups(cols, self.group_size),
        };
        let words = qweight.i32s();
        let mut codes = vec![0u8; out * cols];
        // Row by row (an output feature's codes are a column of words), rows in parallel.
        codes
            .par_chunks_mut(cols.max(1))
            .enumerate()
            .for_each(|(o, row)| {
                for (cw, chunk) in row.chunks_exact_mut(per).enumerate() {
                    let w = words[cw * out + o];
                    for (k, c) in chunk.iter_mut().enumerate() {
                        *c = code(w, k, bits);
                    }
                }
            });
        let zwords = qzeros.i32s();
        let add = if self.v2 { 0 } else { 1 };
        let mut zeros = vec![0i32; out * groups];
        for g in 0..groups {
            for o in 0..out {
                let z = code(zwords[g * zero_words + o / per], o % per, bits) as i32;
                zeros[o * groups + g] = z + add;
            }
        }
        let mut s = vec![0f32; out * groups];
        for g in 0..groups {
            for o in 0..out {
                s[o * groups + g] = scales.values[g * out + o];
            }
        }
        Ok(GroupedWeight {
            name: format!("{base}.weight"),
            rows: out,
            cols,
            bits,
            codes,
            groups,
            scales: s,
            zeros,
            g_idx,
        })
    }
}

/// The error for a part of a packed weight whose shape is not the format's.
pub(crate) fn bad_shape(name: &str, shape: &[usize], want: &str) -> Error {
    Error::UnsupportedModel(format!("`{name}` has shape {shape:?}, expected {want}"))
}
