//! compressed-tensors checkpoints (`quant_method: compressed-tensors`, as llm-compressor
//! and the `compressed-tensors` library write them, e.g. the `W4A16`, `W8A16` and
//! `FP8_DYNAMIC` presets).
//!
//! `quantization_config` has a `format` and `config_groups`, each with `weights`
//! arguments (`num_bits`, `type` int/float, `symmetric`, `strategy` tensor/channel/group/
//! block, `group_size`) and optional `input_activations`. Per layer `X`, the tensors tell
//! which form it takes:
//!
//! - **`pack-quantized`** (int weights of 1–8 bits): `X.weight_packed` I32
//!   `[out, ⌈in · bits / 32⌉]`, the signed codes plus `2^(bits−1)` packed densely along the
//!   input dimension (code `c` of a row at bits `c · bits …` of the row's words, a code may
//!   straddle two words); `X.weight_shape` I64 `[2]`; `X.weight_scale` `[out, groups]`
//!   (`[out, 1]` per channel); for asymmetric weights `X.weight_zero_point`, the signed zero
//!   points packed the same way along the **output** dimension, `[⌈out · bits / 32⌉,
//!   groups]`; `X.weight_g_idx` I32 `[in]` when the columns were quantized in another order
//!   (`actorder`). `w = s · (q − z)`, read into a [`GroupedWeight`] ([`super::grouped`]
//!   says what it becomes: symmetric 4-bit is exactly Q4_0, asymmetric Q4_1, 8-bit Q8_0).
//! - **`int-quantized`** / **`naive-quantized`** (int8): `X.weight` I8 `[out, in]` with
//!   `X.weight_scale` and an optional I8 `X.weight_zero_point` `[out, groups]`, read the
//!   same way.
//! - **`float-quantized`** (FP8): `X.weight` F8_E4M3 `[out, in]` with `X.weight_scale`,
//!   one number (per tensor), `[out, 1]` (per channel) or a block grid: read into Q8_0 (or
//!   f32) by [`super::fp8`], the block shape following from the scale's shape.
//!
//! Layers not quantized (`ignore`, e.g. `lm_head`) are plain float tensors. Activation
//! quantization that is `dynamic` is what wick does itself and needs nothing from the file;
//! static activation scales (`input_scale`) and the micro-scaled float formats (NVFP4,
//! MXFP4, …) are refused.

use serde_json::Value;

use super::fp8::Fp8Scheme;
use super::gptq::bad_shape;
use super::grouped::{contiguous_groups, GroupedWeight, IntScheme};
use super::quantization::Parts;
use super::safetensors::RawDType;
use crate::error::{Error, Result};

/// What a compressed-tensors `quantization_config` says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CtScheme {
    /// Bits of the integer weights (all config groups agree), if any are integer.
    pub bits: Option<u32>,
    /// Columns per group of `group`-strategy integer weights.
    pub group_size: Option<usize>,
    /// What the integer weights become.
    pub int: IntScheme,
    /// How the FP8 weights are read.
    pub fp8: Fp8Scheme,
}

impl CtScheme {
    /// Reads a compressed-tensors `quantization_config` (`quant_method` already checked).
    pub fn from_config(q: &Value) -> std::result::Result<CtScheme, String> {
        let top = q.get("format").and_then(Value::as_str);
        let groups = q
            .get("config_groups")
            .and_then(Value::as_object)
            .filter(|g| !g.is_empty())
            .ok_or("compressed-tensors config without config_groups")?;
        let (mut bits, mut group_size) = (None, None);
        for (gname, g) in groups {
            let format = g.get("format").and_then(Value::as_str).or(top);
            match format {
                Some("pack-quantized" | "int-quantized" | "naive-quantized")
                | Some("float-quantized") => {}
                Some(other) => {
                    return Err(format!(
                        "compressed-tensors format `{other}` is not supported (pack-quantized, \
                         int-quantized, float-quantized)"
                    ))
                }
                None => return Err("compressed-tensors config without a format".into()),
            }
            if let Some(a) = g.get("input_activations").filter(|a| !a.is_null()) {
                if a.get("dynamic").and_then(Value::as_bool) != Some(true) {
                    return Err(format!(
                        "config group `{gname}` has static activation scales (only dynamic \
                         activation quantization is supported)"
                    ));
                }
            }
            let Some(w) = g.get("weights").filter(|w| !w.is_null()) else {
                continue;
            };
            let n = w.get("num_bits").and_then(Value::as_u64).unwrap_or(0);
            let ty = w.get("type").and_then(Value::as_str).unwrap_or("int");
            let strategy = w
                .get("strategy")
                .and_then(Value::as_str)
                .unwrap_or("tensor");
            match ty {
                "float" if n == 8 => {
                    if !matches!(strategy, "tensor" | "channel" | "block") {
                        return Err(format!("FP8 weights with strategy `{strategy}`"));
                    }
                }
                "int" if (1..=8).contains(&n) => {
                    if bits.is_some_and(|b| b != n as u32) {
                        return Err("config groups with different bit widths".into());
                    }
                    bits = Some(n as u32);
                    match strategy {
                        "group" => {
                            let gs = w.get("group_size").and_then(Value::as_u64).unwrap_or(0);
                            if gs == 0 || group_size.is_some_and(|g| g != gs as usize) {
                                return Err(format!("group_size {gs} (or several of them)"));
                            }
                            group_size = Some(gs as usize);
                        }
                        "channel" | "tensor" => {}
                        other => return Err(format!("int weights with strategy `{other}`")),
                    }
                }
                _ => return Err(format!("{n}-bit {ty} weights")),
            }
        }
        Ok(CtScheme {
            bits,
            group_size,
            int: IntScheme::default(),
            fp8: Fp8Scheme::new(None, "weight_scale"),
        })
    }

    /// Unpacks `base.weight_packed` and its scales and zeros.
    pub fn unpack_packed(&self, base: &str, parts: &mut Parts) -> Result<GroupedWeight> {
        let bits = self.bits.ok_or_else(|| {
            Error::UnsupportedModel(format!(
                "`{base}.weight_packed` is packed integers, but no config group has int weights"
            ))
        })?;
        let packed = parts.take_i32(&format!("{base}.weight_packed"))?;
        let shape_name = format!("{base}.weight_shape");
        let shape = parts
            .take_optional_int(&shape_name)?
            .ok_or(Error::MissingTensor {
                name: shape_name.clone(),
            })?
            .1;
        let &[rows, cols] = &shape[..] else {
            return Err(bad_shape(&shape_name, &[shape.len()], "[2]"));
        };
        let (rows, cols) = (to_usize(rows, &shape_name)?, to_usize(cols, &shape_name)?);
        let words = (cols * bits as usize).div_ceil(32);
        if packed.shape != [rows, words] {
            return Err(bad_shape(
                &packed.name,
                &packed.shape,
                &format!("[{rows}, {words}] for a {rows} × {cols} matrix of {bits} bits"),
            ));
        }
        let offset = 1i32 << (bits - 1);
        let p = packed.i32s();
        let mut codes = vec![0u8; rows * cols];
        for (r, row) in p.chunks_exact(words).enumerate() {
            for c in 0..cols {
                codes[r * cols + c] = dense_code(row, c, bits);
            }
        }
        let (scales, groups) = self.scales(base, parts, rows)?;
        let zp_name = format!("{base}.weight_zero_point");
        let zeros = if parts.has_raw(&zp_name) {
            let zp = parts.take_i32(&zp_name)?;
            let zwords = (rows * bits as usize).div_ceil(32);
            if zp.shape != [zwords, groups] {
                return Err(bad_shape(
                    &zp.name,
                    &zp.shape,
                    &format!("[{zwords}, {groups}] (packed along the outputs)"),
                ));
            }
            let z = zp.i32s();
            // Packed along dimension 0: column g of the words holds the zeros of group g.
            let mut zeros = vec![0i32; rows * groups];
            for g in 0..groups {
                let col: Vec<i32> = (0..zwords).map(|w| z[w * groups + g]).collect();
                for r in 0..rows {
                    zeros[r * groups + g] = dense_code(&col, r, bits) as i32;
                }
            }
            zeros
        } else {
            vec![offset; rows * groups]
        };
        let g_idx = self.g_idx(base, parts, cols, groups)?;
        Ok(GroupedWeight {
            name: format!("{base}.weight"),
            rows,
            cols,
            bits,
            codes,
            groups,
            scales,
            zeros,
            g_idx,
        })
    }

    /// Reads `base.weight` stored as I8 (`int-quantized`) with its scales and zeros.
    pub fn unpack_int8(&self, base: &str, parts: &mut Parts) -> Result<GroupedWeight> {
        let name = format!("{base}.weight");
        let w = parts.take_raw(&name, RawDType::I8)?;
        let [rows, cols] = w.shape[..] else {
            return Err(bad_shape(&name, &w.shape, "[out, in]"));
        };
        let codes = w
            .data
            .as_slice()
            .iter()
            .map(|&b| (b as i8 as i32 + 128) as u8)
            .collect();
        let (scales, groups) = self.scales(base, parts, rows)?;
        let zp_name = format!("{base}.weight_zero_point");
        let zeros = match parts.take_optional_int(&zp_name)? {
            Some((_, z)) if z.len() == rows * groups => z.iter().map(|&z| z as i32 + 128).collect(),
            Some((_, z)) => {
                return Err(bad_shape(
                    &zp_name,
                    &[z.len()],
                    &format!("[{rows}, {groups}]"),
                ))
            }
            None => vec![128; rows * groups],
        };
        let g_idx = self.g_idx(base, parts, cols, groups)?;
        Ok(GroupedWeight {
            name,
            rows,
            cols,
            bits: 8,
            codes,
            groups,
            scales,
            zeros,
            g_idx,
        })
    }

    /// `base.weight_scale` as `[rows, groups]` (one number per tensor is spread to every
    /// row).
    fn scales(&self, base: &str, parts: &mut Parts, rows: usize) -> Result<(Vec<f32>, usize)> {
        let scale = parts.take_float(&format!("{base}.weight_scale"))?;
        match scale.shape[..] {
            [] | [1] => Ok((vec![scale.values[0]; rows], 1)),
            [r, g] if r == rows && g > 0 => Ok((scale.values, g)),
            _ => Err(bad_shape(
                &scale.name,
                &scale.shape,
                &format!("[{rows}, groups]"),
            )),
        }
    }

    /// The group of each column: `base.weight_g_idx` if present, else runs of
    /// `group_size` (one group for channel-wise scales).
    fn g_idx(&self, base: &str, parts: &mut Parts, cols: usize, groups: usize) -> Result<Vec<u32>> {
        match parts.take_optional_int(&format!("{base}.weight_g_idx"))? {
            Some((name, v)) => {
                if v.len() != cols {
                    return Err(bad_shape(&name, &[v.len()], &format!("[{cols}]")));
                }
                Ok(v.iter()
                    .map(|&g| u32::try_from(g).unwrap_or(u32::MAX))
                    .collect())
            }
            None if groups == 1 => Ok(vec![0; cols]),
            None => Ok(contiguous_groups(
                cols,
                Some(self.group_size.unwrap_or(cols.div_ceil(groups))),
            )),
        }
    }
}

/// Code `i` of `bits` bits packed densely, lowest bits first, into `words` (it may
/// straddle two words), as compressed-tensors' `pack_to_int32` lays them out.
fn dense_code(words: &[i32], i: usize, bits: u32) -> u8 {
    let bit = i * bits as usize;
    let lo = words[bit / 32] as u32 as u64;
    let hi = words.get(bit / 32 + 1).map_or(0, |&w| w as u32 as u64);
    (((lo | hi << 32) >> (bit % 32)) & ((1 << bits) - 1)) as u8
}

fn to_usize(v: i64, name: &str) -> Result<usize> {
    usize::try_from(v).map_err(|_| Error::UnsupportedModel(format!("`{name}` holds {v}")))
}
