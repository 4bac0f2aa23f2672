//! FP8 checkpoints as Qwen publishes them (`Qwen/Qwen3-0.6B-FP8`), read into Q8_0 at load;
//! compressed-tensors' `float-quantized` FP8 weights take the same path
//! ([`super::compressed_tensors`]). [`super::quantization`] reads the `quantization_config`.
//!
//! `config.json` says `"quantization_config": {"quant_method": "fp8", "activation_scheme":
//! "dynamic", "weight_block_size": [128, 128], …}`. Each quantized linear weight `X.weight` is
//! stored as `F8_E4M3` (1 sign bit, 4 exponent bits with bias 7, 3 mantissa bits, no
//! infinities, `0x7F`/`0xFF` NaN) beside `X.weight_scale_inv`, a float32 grid of shape
//! `[⌈rows/bᵣ⌉, ⌈cols/b꜀⌉]`. Block `(i, j)` covers rows `bᵣ·i …` and columns `b꜀·j …`, the
//! last ones partial at the edges, as vLLM and DeepSeek's reference kernel read them:
//! `w[r][c] = e4m3(q[r][c]) · scale_inv[r / bᵣ][c / b꜀]`. Without `weight_block_size` the
//! block follows from the scale's shape: one number for the whole matrix, or a grid
//! `[gᵣ, g꜀]` of blocks `⌈rows/gᵣ⌉ × ⌈cols/g꜀⌉` (compressed-tensors' per-channel scales are
//! `[rows, 1]`, and it calls them `weight_scale`). The embedding and the norms are bf16 in
//! the file.
//!
//! **Why Q8_0.** The weights are dequantized exactly (an e4m3 value times an f32 scale is
//! an f32 product) and requantized to Q8_0, wick's native 8-bit format: 34 bytes per 32
//! weights against FP8's 32 (+ the scale grid), and every backend's 8-bit kernels apply. An
//! e4m3 value carries 3 mantissa bits; Q8_0 holds each block of 32 in 255 steps of its
//! largest magnitude, so the requantization error is small against FP8's own rounding
//! (measured against the transformers oracle in `tests/qwen3_tiny.rs`: on qwen3-tiny, FP8
//! itself moves the last logits by 0.5–1.0 from bf16, the requantization by 0.12–0.40 more,
//! exactly what llama.cpp's own Q8_0 quantizer gives on the same weights). Rows whose length
//! is not whole Q8_0 blocks stay f32. [`Fp8Scheme::exact`] reads the weights into f32
//! instead: exact, four times the memory. A native FP8 path would save 6% of the bytes and
//! needs e4m3 decoding in every kernel.
//!
//! Read into Q8_0, the bf16 embedding becomes Q8_0 too, as with every quantized checkpoint
//! ([`super::quantization`] does it and says why); the norms stay as they are.
//!
//! Static activation scales (`activation_scheme: static`) are refused: wick quantizes
//! activations itself, per block, which is what `dynamic` means.

use rayon::prelude::*;
use serde_json::Value;

use super::safetensors::{RawDType, RawTensor};
use super::{Bytes, HostTensor, TensorSet};
use crate::error::{Error, Result};
use crate::quant::DType;

/// What an FP8 `quantization_config` asks for (the block shape of the weight scales, or
/// `None` for the shape the scales imply), and what the weights become.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fp8Scheme {
    /// `[rows, columns]` per scale block.
    pub block: Option<[usize; 2]>,
    /// The format the weights are read into: [`DType::Q8_0`] (the default), or
    /// [`DType::F32`] for the exact values (four times the memory).
    pub into: DType,
    /// The suffix of the scales beside `X.weight`: `weight_scale_inv` (transformers' FP8)
    /// or `weight_scale` (compressed-tensors); both multiply.
    pub scale: &'static str,
    /// Keep the float embedding and an untied head as stored instead of reading them into
    /// Q8_0 with the weights ([`super::quantization`] does that).
    pub keep_embedding: bool,
}

impl Fp8Scheme {
    /// Weights with scales named `scale`, in blocks of `block` (or as the scales' shape
    /// says), read into Q8_0.
    pub fn new(block: Option<[usize; 2]>, scale: &'static str) -> Fp8Scheme {
        Fp8Scheme {
            block,
            into: DType::Q8_0,
            scale,
            keep_embedding: false,
        }
    }

    /// The same scheme read into f32: exact, for tests and for users who want no
    /// requantization.
    pub fn exact(self) -> Fp8Scheme {
        Fp8Scheme {
            into: DType::F32,
            ..self
        }
    }

    /// Reads a `quantization_config`: `Ok(None)` if it is not FP8, an error if it is an FP8
    /// variant wick cannot load (static activation scales, a malformed block size, a scale
    /// format other than float).
    pub fn from_config(q: &Value) -> std::result::Result<Option<Fp8Scheme>, String> {
        if q.get("quant_method").and_then(Value::as_str) != Some("fp8") {
            return Ok(None);
        }
        match q.get("activation_scheme").and_then(Value::as_str) {
            None | Some("dynamic") => {}
            Some(other) => {
                return Err(format!(
                    "FP8 with activation_scheme `{other}` is not supported (only `dynamic`)"
                ))
            }
        }
        match q.get("fmt").and_then(Value::as_str) {
            None | Some("e4m3") => {}
            Some(other) => return Err(format!("FP8 format `{other}` is not supported (e4m3)")),
        }
        match q.get("scale_fmt").and_then(Value::as_str) {
            None | Some("float") => {}
            Some(other) => {
                return Err(format!(
                    "FP8 scale format `{other}` is not supported (float32 scales)"
                ))
            }
        }
        let block = match q.get("weight_block_size") {
            None | Some(Value::Null) => None,
            Some(v) => {
                let dims: Option<Vec<usize>> = v.as_array().map(|a| {
                    a.iter()
                        .filter_map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
                        .filter(|&d| d > 0)
                        .collect()
                });
                match dims.as_deref() {
                    Some(&[r, c]) => Some([r, c]),
                    _ => {
                        return Err(format!(
                            "FP8 weight_block_size {v} is not two positive integers"
                        ))
                    }
                }
            }
        };
        Ok(Some(Fp8Scheme::new(block, "weight_scale_inv")))
    }
}

/// The value of an e4m3 byte (`float8_e4m3fn`).
pub fn e4m3_to_f32(b: u8) -> f32 {
    let sign = if b & 0x80 != 0 { -1.0 } else { 1.0 };
    let exp = (b >> 3) & 0xF;
    let man = (b & 7) as f32;
    if b & 0x7F == 0x7F {
        return f32::NAN;
    }
    let mag = if exp == 0 {
        man / 8.0 * 2f32.powi(-6)
    } else {
        (1.0 + man / 8.0) * 2f32.powi(exp as i32 - 7)
    };
    sign * mag
}

/// Replaces every `F8_E4M3` weight in `fp8` and its scales in `set` by a Q8_0 tensor (f32
/// if its rows are not whole blocks).
pub fn convert(scheme: Fp8Scheme, fp8: Vec<RawTensor>, set: &mut TensorSet) -> Result<()> {
    let table: Vec<f32> = (0..=255u8).map(e4m3_to_f32).collect();
    for t in fp8 {
        let RawTensor {
            name,
            dtype,
            shape,
            data: bytes,
        } = t;
        if dtype != RawDType::F8_E4M3 {
            return Err(Error::UnsupportedDType {
                name,
                dtype: format!("{dtype:?} in an FP8 checkpoint"),
            });
        }
        let bad = |m: String| Error::UnsupportedModel(format!("FP8 tensor `{name}`: {m}"));
        let [rows, cols] = shape[..] else {
            return Err(bad(format!("shape {shape:?} is not a matrix")));
        };
        let Some(base) = name.strip_suffix(".weight") else {
            return Err(bad("only `.weight` tensors can be FP8".into()));
        };
        let scale_name = format!("{base}.{}", scheme.scale);
        let scale = set.remove(&scale_name).ok_or_else(|| {
            bad(format!(
                "its scales `{scale_name}` are not in the checkpoint"
            ))
        })?;
        let numel: usize = scale.shape.iter().product();
        // Without a configured block, the scale's shape says it: one number, or a grid.
        let [br, bc] = match (scheme.block, &scale.shape[..]) {
            (Some(b), _) => b,
            (None, &[gr, gc]) if gr > 0 && gc > 0 && numel > 1 => {
                [rows.div_ceil(gr).max(1), cols.div_ceil(gc).max(1)]
            }
            (None, _) => [rows.max(1), cols.max(1)],
        };
        let grid = [rows.div_ceil(br), cols.div_ceil(bc)];
        let shape_ok = scale.shape == grid || (grid == [1, 1] && numel == 1);
        if !shape_ok {
            return Err(bad(format!(
                "scales of shape {:?}, expected {grid:?} for blocks of {br} × {bc}",
                scale.shape
            )));
        }
        let scales = scale.to_f32();
        if let Some(s) = scales.iter().find(|s| !s.is_finite()) {
            return Err(bad(format!("a scale is {s}")));
        }
        let q = bytes.as_slice();
        let dtype = match scheme.into {
            DType::Q8_0 if cols.is_multiple_of(32) => DType::Q8_0,
            _ => DType::F32,
        };
        let row_bytes = dtype.bytes_for(cols).expect("whole blocks");
        let mut out = vec![0u8; rows * row_bytes];
        let nan = out
            .par_chunks_mut(row_bytes.max(1))
            .enumerate()
            .map(|(r, dst)| {
                let srow = &scales[(r / br) * grid[1]..(r / br + 1) * grid[1]];
                let row: Vec<f32> = q[r * cols..(r + 1) * cols]
                    .iter()
                    .enumerate()
                    .map(|(c, &b)| table[b as usize] * srow[c / bc])
                    .collect();
                let nan = row.iter().any(|v| v.is_nan());
                crate::quant::quantize_row(dtype, &row, dst);
                nan
            })
            .reduce(|| false, |a, b| a || b);
        if nan {
            return Err(bad("holds NaN (e4m3 byte 0x7F or 0xFF)".into()));
        }
        set.insert(HostTensor {
            name: name.clone(),
            dtype,
            shape,
            data: Bytes::from_vec(out),
        })?;
    }
    let suffix = format!(".{}", scheme.scale);
    if let Some(left) = set.names().find(|n| n.ends_with(&suffix)) {
        return Err(Error::UnsupportedModel(format!(
            "`{left}` has no FP8 weight beside it"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(name: &str, shape: Vec<usize>, bytes: Vec<u8>) -> RawTensor {
        RawTensor {
            name: name.into(),
            dtype: RawDType::F8_E4M3,
            shape,
            data: Bytes::from_vec(bytes),
        }
    }

    #[test]
    fn e4m3_values() {
        assert_eq!(e4m3_to_f32(0x00), 0.0);
        assert_eq!(e4m3_to_f32(0x38), 1.0);
        assert_eq!(e4m3_to_f32(0xC0), -2.0);
        assert_eq!(e4m3_to_f32(0x7E), 448.0);
        assert_eq!(e4m3_to_f32(0x01), 2f32.powi(-9));
        assert_eq!(e4m3_to_f32(0x08), 2f32.powi(-6));
        assert_eq!(e4m3_to_f32(0x3C), 1.5);
        assert!(e4m3_to_f32(0x7F).is_nan() && e4m3_to_f32(0xFF).is_nan());
    }

    #[test]
    fn reads_the_config() {
        let parse = |s: &str| Fp8Scheme::from_config(&serde_json::from_str(s).unwrap());
        assert_eq!(
            parse(
                r#"{"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}"#
            ),
            Ok(Some(Fp8Scheme {
                block: Some([128, 128]),
                into: DType::Q8_0,
                scale: "weight_scale_inv",
                keep_embedding: false,
            }))
        );
        assert_eq!(
            parse(r#"{"quant_method": "fp8"}"#),
            Ok(Some(Fp8Scheme {
                block: None,
                into: DType::Q8_0,
                scale: "weight_scale_inv",
                keep_embedding: false,
            }))
        );
        assert_eq!(parse(r#"{"quant_method": "gptq"}"#), Ok(None));
        for bad in [
            r#"{"quant_method": "fp8", "activation_scheme": "static"}"#,
            r#"{"quant_method": "fp8", "weight_block_size": [128]}"#,
            r#"{"quant_method": "fp8", "weight_block_size": [0, 128]}"#,
            r#"{"quant_method": "fp8", "scale_fmt": "ue8m0"}"#,
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }

    /// Partial blocks at the edges: a 3 × 64 matrix in blocks of 2 × 40 has a 2 × 2 grid
    /// whose last row and column of blocks are partial; every element takes its own block's
    /// scale.
    #[test]
    fn partial_blocks_take_their_own_scale() {
        let (rows, cols) = (3usize, 64usize);
        // All ones (0x38), so each dequantized element is its block's scale.
        let q = vec![0x38u8; rows * cols];
        let scales = [1.0f32, 2.0, 4.0, 8.0];
        let mut set = TensorSet::default();
        set.insert(HostTensor {
            name: "w.weight_scale_inv".into(),
            dtype: DType::F32,
            shape: vec![2, 2],
            data: Bytes::from_vec(scales.iter().flat_map(|s| s.to_le_bytes()).collect()),
        })
        .unwrap();
        let scheme = Fp8Scheme::new(Some([2, 40]), "weight_scale_inv");
        convert(scheme, vec![raw("w.weight", vec![rows, cols], q)], &mut set).unwrap();
        let w = set.get("w.weight").unwrap();
        assert_eq!(w.dtype, DType::Q8_0);
        let values = w.to_f32();
        for r in 0..rows {
            for c in 0..cols {
                let want = scales[(r / 2) * 2 + c / 40];
                assert!(
                    (values[r * cols + c] - want).abs() <= want / 127.0,
                    "({r}, {c})"
                );
            }
        }
        assert!(set.try_get("w.weight_scale_inv").is_none());
    }

    #[test]
    fn missing_or_misshapen_scales_are_errors() {
        let scheme = Fp8Scheme::new(Some([32, 32]), "weight_scale_inv");
        let w = || vec![raw("w.weight", vec![64, 64], vec![0x38; 64 * 64])];
        let mut empty = TensorSet::default();
        assert!(convert(scheme, w(), &mut empty)
            .unwrap_err()
            .to_string()
            .contains("w.weight_scale_inv"));
        let mut wrong = TensorSet::default();
        wrong
            .insert(HostTensor {
                name: "w.weight_scale_inv".into(),
                dtype: DType::F32,
                shape: vec![1, 2],
                data: Bytes::from_vec(vec![0; 8]),
            })
            .unwrap();
        assert!(convert(scheme, w(), &mut wrong)
            .unwrap_err()
            .to_string()
            .contains("[2, 2]"));
    }
}
