//! Quantized safetensors checkpoints: the `quantization_config` of `config.json` is read
//! here ([`scheme_of`]) and the packed tensors it describes become tensors wick computes
//! with ([`convert`]), each format in its own module:
//!
//! | `quant_method` | module | read into |
//! |---|---|---|
//! | `fp8` (block-wise e4m3, as Qwen/Qwen3-0.6B-FP8) | [`super::fp8`] | Q8_0 (requantized) |
//! | `gptq` (2/4/8 bits, v1 and v2 zeros, `desc_act`) | [`super::gptq`] | 4-bit: Q4_0 if symmetric (exact), else Q4_1 (`m` rounded to f16); 8-bit: Q8_0, exact where `q − z` fits a byte; reordered groups and 2-bit: Q8_0 (requantized) |
//! | `awq` (4 bits, GEMM packing) | [`super::awq`] | Q4_1 (Q4_0 if all zeros are 8) |
//! | `compressed-tensors` (`pack-quantized` 1–8 bits, `int-quantized`, `float-quantized`) | [`super::compressed_tensors`] | as GPTQ for ints; FP8 as `fp8` |
//! | any of them: the float embedding (`model.embed_tokens.weight`) and an untied `lm_head.weight` | here ([`embedding_into_q8_0`]) | Q8_0 (requantized); as stored with [`QuantScheme::keep_embedding`] |
//!
//! [`super::grouped`] says exactly where the integer formats' mapping is exact and where it
//! rounds. Every scheme has an exact variant ([`QuantScheme::exact`]) that reads the
//! weights into f32 and keeps the embedding as stored. Any other method (bitsandbytes, HQQ,
//! EETQ, …) is refused with an error naming it and the supported ones.
//!
//! **Why the embedding becomes Q8_0.** These checkpoints pack the linear layers only; the
//! embedding (which Qwen3-0.6B ties as the output head) and an untied head stay bf16. Decode
//! reads the head whole for every token's logits: on Qwen3-0.6B its 151936 × 1024 bf16 values
//! are 311 MB, more than all of its 4-bit layers, so a 4-bit checkpoint with its embedding
//! as stored decodes a quarter to a third slower than the GGUF file of the same blocks (the
//! README's measurements). Q8_0 (165 MB) is what llama.cpp's Q8_0 files hold it in (its 4-bit
//! mixes take Q6_K, smaller and coarser), and it moves the logits by the Q8_0 step only: on
//! the test fixtures (`tests/quantized_checkpoints.rs`, hidden size 64, so every row is two
//! blocks) by 0.07–0.10, the figure of llama.cpp's own Q8_0 quantizer for the same embedding,
//! which wick's lands on within 2e-3. It is done once at least one packed layer was read,
//! for rows of whole blocks. The command line reads a checkpoint as its `config.json` says
//! and has no switch for it; a library user loading through
//! [`load_dir_with`](super::safetensors::load_dir_with) keeps the embedding as stored with
//! [`QuantScheme::keep_embedding`].
//!
//! A packed weight with a missing part (`qzeros`, `weight_scale`, …), a part of the wrong
//! shape, or a packed tensor that belongs to no layer is an error naming the tensor.

use std::collections::BTreeMap;

use serde_json::Value;

use super::awq::AwqScheme;
use super::compressed_tensors::CtScheme;
use super::fp8::Fp8Scheme;
use super::gptq::GptqScheme;
use super::grouped::{GroupedWeight, IntScheme};
use super::safetensors::{RawDType, RawTensor};
use super::{HostTensor, TensorSet};
use crate::error::{Error, Result};
use crate::quant::{q8_0, DType};

/// What a checkpoint's `quantization_config` asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QuantScheme {
    /// `quant_method: fp8`.
    Fp8(Fp8Scheme),
    /// `quant_method: gptq`.
    Gptq(GptqScheme),
    /// `quant_method: awq`.
    Awq(AwqScheme),
    /// `quant_method: compressed-tensors`.
    CompressedTensors(CtScheme),
}

impl QuantScheme {
    /// The same scheme reading every weight into f32: the checkpoint's exact values.
    pub fn exact(self) -> QuantScheme {
        self.with_int(|i| i.exact = true)
    }

    /// The same scheme with integer weights whose groups do not map onto blocks read into
    /// `dtype` (Q8_0 by default).
    pub fn with_fallback(self, dtype: DType) -> QuantScheme {
        self.with_int(|i| i.fallback = dtype)
    }

    /// The same scheme keeping the float embedding and an untied head as stored (bf16 in
    /// the published checkpoints) instead of reading them into Q8_0: the checkpoint's own
    /// values, at the decode speed the module doc gives.
    pub fn keep_embedding(self) -> QuantScheme {
        self.with_int(|i| i.keep_embedding = true)
    }

    /// Changes the settings every format shares; FP8's are the same ones in its own terms
    /// (exact is `into` f32).
    fn with_int(self, f: impl Fn(&mut IntScheme)) -> QuantScheme {
        match self {
            QuantScheme::Fp8(s) => {
                let mut i = IntScheme {
                    exact: s.into == DType::F32,
                    keep_embedding: s.keep_embedding,
                    ..IntScheme::default()
                };
                f(&mut i);
                let s = if i.exact { s.exact() } else { s };
                QuantScheme::Fp8(Fp8Scheme {
                    keep_embedding: i.keep_embedding,
                    ..s
                })
            }
            QuantScheme::Gptq(mut s) => {
                f(&mut s.int);
                QuantScheme::Gptq(s)
            }
            QuantScheme::Awq(mut s) => {
                f(&mut s.int);
                QuantScheme::Awq(s)
            }
            QuantScheme::CompressedTensors(mut s) => {
                f(&mut s.int);
                if s.int.exact {
                    s.fp8 = s.fp8.exact();
                }
                s.fp8.keep_embedding = s.int.keep_embedding;
                QuantScheme::CompressedTensors(s)
            }
        }
    }

    /// Whether the float embedding and an untied head are read into Q8_0: unless the
    /// scheme is exact or keeps them as stored.
    fn embedding_into_q8_0(self) -> bool {
        match self {
            QuantScheme::Fp8(s) => s.into == DType::Q8_0 && !s.keep_embedding,
            QuantScheme::Gptq(GptqScheme { int, .. })
            | QuantScheme::Awq(AwqScheme { int, .. })
            | QuantScheme::CompressedTensors(CtScheme { int, .. }) => {
                !int.exact && !int.keep_embedding
            }
        }
    }
}

/// What the `quantization_config` of a `config.json` (given whole) asks for: nothing, a
/// supported scheme, or an error naming a method (or a variant of one) wick does not load.
pub fn scheme_of(config_json: &Value) -> Result<Option<QuantScheme>> {
    let Some(q) = config_json
        .get("quantization_config")
        .filter(|q| !q.is_null())
    else {
        return Ok(None);
    };
    let scheme = match q.get("quant_method").and_then(Value::as_str) {
        Some("fp8") => Fp8Scheme::from_config(q)
            .and_then(|s| s.ok_or_else(|| "not FP8".to_string()))
            .map(QuantScheme::Fp8),
        Some("gptq") => GptqScheme::from_config(q).map(QuantScheme::Gptq),
        Some("awq") => AwqScheme::from_config(q).map(QuantScheme::Awq),
        Some("compressed-tensors") => CtScheme::from_config(q).map(QuantScheme::CompressedTensors),
        _ => return Err(Error::UnsupportedModel(unsupported(q, None))),
    };
    scheme
        .map(Some)
        .map_err(|why| Error::UnsupportedModel(unsupported(q, Some(why))))
}

/// The refusal of a `quantization_config`: the method, its main settings, and what wick loads.
fn unsupported(q: &Value, why: Option<String>) -> String {
    let method = q
        .get("quant_method")
        .and_then(Value::as_str)
        .map(|m| format!("`{m}`"))
        .unwrap_or_else(|| "(none given)".into());
    let details: Vec<String> = ["bits", "format", "fmt", "version", "weight_block_size"]
        .into_iter()
        .filter_map(|k| q.get(k).map(|v| format!("{k} {v}")))
        .collect();
    let details = if details.is_empty() {
        String::new()
    } else {
        format!(" ({})", details.join(", "))
    };
    let why = why.map(|w| format!(": {w}")).unwrap_or_default();
    format!(
        "the checkpoint is quantized with quantization_config.quant_method {method}{details}, \
         which wick does not load{why}. Supported: unquantized safetensors (F32, F16, BF16), \
         optionally quantized at load with --quantization q8_0|q4_0|q4_k; quant_method `fp8` \
         (e4m3 with dynamic activations, as Qwen/Qwen3-0.6B-FP8), `gptq` (2, 4 or 8 bits, \
         v1 or v2 zeros, desc_act), `awq` (4 bits, version gemm) and `compressed-tensors` \
         (pack-quantized and int-quantized integers, float-quantized FP8; dynamic \
         activations); and GGUF files (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K; \
         from the Hub as owner/name:QUANT, e.g. Qwen/Qwen3-0.6B-GGUF:Q8_0)"
    )
}

/// Replaces the packed tensors of `raw` (and their scales and zeros in `set`) by the
/// tensors `scheme` reads them into, and then, unless the scheme says otherwise, the float
/// embedding and an untied head by Q8_0 ([`embedding_into_q8_0`]).
pub fn convert(scheme: QuantScheme, raw: Vec<RawTensor>, set: &mut TensorSet) -> Result<()> {
    let packed = convert_packed(scheme, raw, set)?;
    // A checkpoint with no packed layer (an FP8 config over float weights) keeps its floats.
    if packed > 0 && scheme.embedding_into_q8_0() {
        embedding_into_q8_0(set)?;
    }
    Ok(())
}

/// The packed part of [`convert`]; returns how many packed layers there were.
fn convert_packed(scheme: QuantScheme, raw: Vec<RawTensor>, set: &mut TensorSet) -> Result<usize> {
    match scheme {
        QuantScheme::Fp8(s) => {
            let n = raw.len();
            super::fp8::convert(s, raw, set)?;
            Ok(n)
        }
        QuantScheme::Gptq(s) => {
            let mut parts = Parts::new(raw, set);
            let n = parts.convert_layers(".qweight", s.int, |b, p| s.unpack(b, p))?;
            none_packed(n, "gptq", "`*.qweight`")?;
            parts.finish()?;
            Ok(n)
        }
        QuantScheme::Awq(s) => {
            let mut parts = Parts::new(raw, set);
            let n = parts.convert_layers(".qweight", s.int, |b, p| s.unpack(b, p))?;
            none_packed(n, "awq", "`*.qweight`")?;
            parts.finish()?;
            Ok(n)
        }
        QuantScheme::CompressedTensors(s) => {
            let mut parts = Parts::new(raw, set);
            let mut n =
                parts.convert_layers(".weight_packed", s.int, |b, p| s.unpack_packed(b, p))?;
            let int8: Vec<String> = parts
                .raw
                .values()
                .filter(|t| t.dtype == RawDType::I8 && t.name.ends_with(".weight"))
                .map(|t| t.name.clone())
                .collect();
            n += int8.len();
            for name in int8 {
                let base = name.strip_suffix(".weight").expect("filtered");
                let w = s.unpack_int8(base, &mut parts)?;
                parts.set.insert(w.into_tensor(s.int)?)?;
            }
            let fp8 = parts.take_all(RawDType::F8_E4M3);
            n += fp8.len();
            none_packed(
                n,
                "compressed-tensors",
                "`*.weight_packed`, int8 or FP8 weight",
            )?;
            parts.finish()?;
            super::fp8::convert(s.fp8, fp8, set)?;
            Ok(n)
        }
    }
}

/// The tensors decode reads whole for every token's logits: the embedding (the head of a
/// tied model) and an untied head.
const HEAD: [&str; 2] = ["model.embed_tokens.weight", "lm_head.weight"];

/// Reads the embedding and an untied head into Q8_0 (as llama.cpp's Q8_0 files hold them)
/// where they are float matrices of whole Q8_0 blocks; the module doc says why.
pub fn embedding_into_q8_0(set: &mut TensorSet) -> Result<()> {
    for name in HEAD {
        let convert = set.try_get(name).is_some_and(|t| {
            matches!(t.dtype, DType::BF16 | DType::F16 | DType::F32)
                && t.shape.len() == 2
                && t.shape[1].is_multiple_of(q8_0::BLOCK_ELEMS)
        });
        if convert {
            let t = set.remove(name).expect("present");
            set.insert(super::convert_tensor(&t, DType::Q8_0)?)?;
        }
    }
    Ok(())
}

/// A checkpoint whose config names a method but that holds none of its packed tensors
/// (a config copied onto float weights, say) is refused rather than run as floats.
fn none_packed(n: usize, method: &str, what: &str) -> Result<()> {
    if n > 0 {
        return Ok(());
    }
    Err(Error::UnsupportedModel(format!(
        "config.json says quant_method `{method}`, but the checkpoint has no {what} tensor: \
         its weights are not quantized the way the config says"
    )))
}

/// The packed tensors of a checkpoint (`raw`) and its float ones (`set`), taken apart
/// layer by layer by the format readers.
pub struct Parts<'a> {
    raw: BTreeMap<String, RawTensor>,
    /// The float tensors (scales live here) and, once converted, the weights.
    pub set: &'a mut TensorSet,
}

/// An I32 tensor, read.
pub struct Ints {
    /// Its name.
    pub name: String,
    /// Its shape.
    pub shape: Vec<usize>,
    values: Vec<i32>,
}

impl Ints {
    /// The values, row-major.
    pub fn i32s(&self) -> &[i32] {
        &self.values
    }
}

/// A float tensor (F16, BF16 or F32), widened to f32.
pub struct Floats {
    /// Its name.
    pub name: String,
    /// Its shape.
    pub shape: Vec<usize>,
    /// The values, row-major.
    pub values: Vec<f32>,
}

impl Floats {
    /// The number of groups of a `[groups, out]` scale grid (GPTQ's and AWQ's layout); an
    /// error naming the tensor for any other shape.
    pub fn groups(&self, out: usize) -> Result<usize> {
        match self.shape[..] {
            [g, o] if o == out && g > 0 => Ok(g),
            _ => Err(super::gptq::bad_shape(
                &self.name,
                &self.shape,
                &format!("[groups, {out}]"),
            )),
        }
    }
}

impl<'a> Parts<'a> {
    /// The raw tensors by name, beside `set`.
    pub fn new(raw: Vec<RawTensor>, set: &'a mut TensorSet) -> Self {
        let raw = raw.into_iter().map(|t| (t.name.clone(), t)).collect();
        Parts { raw, set }
    }

    /// Converts every layer that has a raw tensor named `<base><marker>`: `unpack` reads
    /// it, the result goes into the set as `<base>.weight`. Returns how many there were.
    fn convert_layers(
        &mut self,
        marker: &str,
        int: IntScheme,
        unpack: impl Fn(&str, &mut Parts) -> Result<GroupedWeight>,
    ) -> Result<usize> {
        let bases: Vec<String> = self
            .raw
            .keys()
            .filter_map(|n| n.strip_suffix(marker).map(str::to_string))
            .collect();
        for base in &bases {
            let w = unpack(base, self)?;
            self.set.insert(w.into_tensor(int)?)?;
        }
        Ok(bases.len())
    }

    /// Whether a raw tensor `name` is left.
    pub fn has_raw(&self, name: &str) -> bool {
        self.raw.contains_key(name)
    }

    /// Takes raw tensor `name`, which must be of type `dtype`.
    pub fn take_raw(&mut self, name: &str, dtype: RawDType) -> Result<RawTensor> {
        let Some(t) = self.raw.remove(name) else {
            return Err(match self.set.try_get(name) {
                Some(f) => Error::UnsupportedDType {
                    name: name.into(),
                    dtype: format!("{} (a packed {dtype:?} tensor was expected)", f.dtype),
                },
                None => Error::MissingTensor { name: name.into() },
            });
        };
        if t.dtype != dtype {
            return Err(Error::UnsupportedDType {
                name: name.into(),
                dtype: format!("{:?} ({dtype:?} was expected)", t.dtype),
            });
        }
        Ok(t)
    }

    /// Takes I32 tensor `name`.
    pub fn take_i32(&mut self, name: &str) -> Result<Ints> {
        let t = self.take_raw(name, RawDType::I32)?;
        let values = t
            .data
            .as_slice()
            .chunks_exact(4)
            .map(|c| i32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect();
        Ok(Ints {
            name: t.name,
            shape: t.shape,
            values,
        })
    }

    /// Takes integer tensor `name` of any integer type, if present.
    pub fn take_optional_int(&mut self, name: &str) -> Result<Option<(String, Vec<i64>)>> {
        match self.raw.remove(name) {
            None => Ok(None),
            Some(t) => match t.to_i64() {
                Some(v) => Ok(Some((t.name, v))),
                None => Err(Error::UnsupportedDType {
                    name: name.into(),
                    dtype: format!("{:?} (integers were expected)", t.dtype),
                }),
            },
        }
    }

    /// Takes float tensor `name` (a scale) out of the set.
    pub fn take_float(&mut self, name: &str) -> Result<Floats> {
        let Some(t) = self.set.remove(name) else {
            return Err(match self.raw.get(name) {
                Some(r) => Error::UnsupportedDType {
                    name: name.into(),
                    dtype: format!("{:?} (float scales were expected)", r.dtype),
                },
                None => Error::MissingTensor { name: name.into() },
            });
        };
        let values = HostTensor::to_f32(&t);
        Ok(Floats {
            name: t.name,
            shape: t.shape,
            values,
        })
    }

    /// Takes every raw tensor of type `dtype`.
    fn take_all(&mut self, dtype: RawDType) -> Vec<RawTensor> {
        let names: Vec<String> = self
            .raw
            .values()
            .filter(|t| t.dtype == dtype)
            .map(|t| t.name.clone())
            .collect();
        names.iter().filter_map(|n| self.raw.remove(n)).collect()
    }

    /// Ends the conversion: a packed tensor left over belongs to no layer, an error.
    fn finish(self) -> Result<()> {
        match self.raw.into_values().next() {
            None => Ok(()),
            Some(t) => Err(Error::UnsupportedModel(format!(
                "tensor `{}` ({:?} {:?}) belongs to no quantized layer the \
                 quantization_config describes",
                t.name, t.dtype, t.shape
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loader::Bytes;

    fn floats(name: &str, dtype: DType, shape: Vec<usize>) -> HostTensor {
        let n: usize = shape.iter().product();
        let values: Vec<f32> = (0..n)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 64.0)
            .collect();
        let mut data = vec![0u8; dtype.bytes_for(n).unwrap()];
        crate::quant::quantize_row(dtype, &values, &mut data);
        HostTensor {
            name: name.into(),
            dtype,
            shape,
            data: Bytes::from_vec(data),
        }
    }

    /// An FP8 checkpoint's parts: one 64 × 64 layer of ones with its scale (without
    /// `layers`, none), a bf16 embedding, an untied f16 head `head_cols` wide, a norm.
    fn fp8_checkpoint(layers: bool, head_cols: usize) -> (Vec<RawTensor>, TensorSet) {
        let mut set = TensorSet::default();
        set.insert(floats(
            "model.embed_tokens.weight",
            DType::BF16,
            vec![8, 64],
        ))
        .unwrap();
        set.insert(floats("lm_head.weight", DType::F16, vec![8, head_cols]))
            .unwrap();
        set.insert(floats("model.norm.weight", DType::BF16, vec![64]))
            .unwrap();
        if !layers {
            return (Vec::new(), set);
        }
        set.insert(floats("w.weight_scale_inv", DType::F32, vec![1, 1]))
            .unwrap();
        let raw = vec![RawTensor {
            name: "w.weight".into(),
            dtype: RawDType::F8_E4M3,
            shape: vec![64, 64],
            data: Bytes::from_vec(vec![0x38; 64 * 64]),
        }];
        (raw, set)
    }

    fn dtype(set: &TensorSet, name: &str) -> DType {
        set.get(name).unwrap().dtype
    }

    /// By default the float embedding and an untied head of whole blocks become Q8_0 (the
    /// embedding within one Q8_0 step, `max |w| / 127` per block, of its values); exact
    /// schemes, `keep_embedding` (kept through `with_fallback`), a head of partial blocks,
    /// the norms and a checkpoint with no packed layer keep theirs.
    #[test]
    fn the_embedding_becomes_q8_0_unless_kept() {
        let fp8 = QuantScheme::Fp8(Fp8Scheme::new(None, "weight_scale_inv"));
        let (raw, mut set) = fp8_checkpoint(true, 64);
        let want = set.get("model.embed_tokens.weight").unwrap().to_f32();
        convert(fp8, raw, &mut set).unwrap();
        assert_eq!(dtype(&set, "w.weight"), DType::Q8_0);
        assert_eq!(dtype(&set, "model.embed_tokens.weight"), DType::Q8_0);
        assert_eq!(dtype(&set, "lm_head.weight"), DType::Q8_0);
        assert_eq!(dtype(&set, "model.norm.weight"), DType::BF16);
        let got = set.get("model.embed_tokens.weight").unwrap().to_f32();
        for (w, g) in want.chunks_exact(32).zip(got.chunks_exact(32)) {
            let step = w.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0;
            for (a, b) in w.iter().zip(g) {
                assert!((a - b).abs() <= step, "{a} {b}");
            }
        }

        for (scheme, layers, head_cols) in [
            (fp8.keep_embedding(), true, 64),
            (fp8.exact(), true, 64),
            (fp8.keep_embedding().with_fallback(DType::Q4_1), true, 64),
            (fp8, false, 64),
        ] {
            let (raw, mut set) = fp8_checkpoint(layers, head_cols);
            convert(scheme, raw, &mut set).unwrap();
            assert_eq!(
                dtype(&set, "model.embed_tokens.weight"),
                DType::BF16,
                "{scheme:?}"
            );
            assert_eq!(dtype(&set, "lm_head.weight"), DType::F16, "{scheme:?}");
        }
        let (raw, mut set) = fp8_checkpoint(true, 48);
        convert(fp8, raw, &mut set).unwrap();
        assert_eq!(dtype(&set, "model.embed_tokens.weight"), DType::Q8_0);
        assert_eq!(dtype(&set, "lm_head.weight"), DType::F16);
    }

    /// `keep_embedding` and `exact` reach every format's settings, in either order, and
    /// compressed-tensors' FP8 part follows its integer part.
    #[test]
    fn keep_embedding_and_exact_compose() {
        let ct = with(
            r#"{"quant_method": "compressed-tensors", "format": "pack-quantized",
                "config_groups": {"g": {"weights": {"num_bits": 4, "type": "int",
                "strategy": "group", "group_size": 32}}}}"#,
        )
        .unwrap()
        .unwrap();
        let gptq = with(r#"{"quant_method": "gptq", "bits": 4, "group_size": 32}"#)
            .unwrap()
            .unwrap();
        let fp8 = with(r#"{"quant_method": "fp8"}"#).unwrap().unwrap();
        for s in [ct, gptq, fp8] {
            assert!(s.embedding_into_q8_0(), "{s:?}");
            for kept in [
                s.keep_embedding(),
                s.exact(),
                s.keep_embedding().exact(),
                s.exact().keep_embedding(),
            ] {
                assert!(!kept.embedding_into_q8_0(), "{kept:?}");
            }
            let both = s.exact().keep_embedding();
            assert_eq!(both, s.keep_embedding().exact());
            match both {
                QuantScheme::Fp8(f) => assert!(f.into == DType::F32 && f.keep_embedding),
                QuantScheme::CompressedTensors(c) => {
                    assert!(c.int.exact && c.int.keep_embedding);
                    assert!(c.fp8.into == DType::F32 && c.fp8.keep_embedding);
                }
                QuantScheme::Gptq(g) => assert!(g.int.exact && g.int.keep_embedding),
                QuantScheme::Awq(_) => unreachable!(),
            }
        }
    }

    fn with(q: &str) -> Result<Option<QuantScheme>> {
        let v: Value = serde_json::from_str(&format!("{{\"quantization_config\": {q}}}")).unwrap();
        scheme_of(&v)
    }

    #[test]
    fn other_methods_and_variants_are_refused_naming_them() {
        for (q, named) in [
            (
                r#"{"quant_method": "bitsandbytes", "load_in_4bit": true}"#,
                &["`bitsandbytes`"][..],
            ),
            (
                r#"{"quant_method": "hqq", "bits": 4}"#,
                &["`hqq`", "bits 4"],
            ),
            (
                r#"{"quant_method": "gptq", "bits": 3, "group_size": 128}"#,
                &["`gptq`", "bits 3", "3 bits"],
            ),
            (
                r#"{"quant_method": "awq", "bits": 4, "version": "gemv"}"#,
                &["`awq`", "version `gemv`"],
            ),
            (
                r#"{"quant_method": "fp8", "activation_scheme": "static"}"#,
                &["`fp8`", "activation_scheme `static`"],
            ),
            (
                r#"{"quant_method": "compressed-tensors", "format": "nvfp4-pack-quantized",
                    "config_groups": {"g": {"weights": {"num_bits": 4, "type": "float"}}}}"#,
                &["`compressed-tensors`", "nvfp4-pack-quantized"],
            ),
            (
                r#"{"quant_method": "compressed-tensors", "format": "float-quantized",
                    "config_groups": {"g": {"weights": {"num_bits": 8, "type": "float",
                    "strategy": "tensor"}, "input_activations": {"num_bits": 8,
                    "type": "float", "dynamic": false}}}}"#,
                &["`compressed-tensors`", "static activation scales"],
            ),
            (r#"{"bits": 8}"#, &["(none given)", "bits 8"]),
        ] {
            match with(q) {
                Err(Error::UnsupportedModel(m)) => {
                    for n in named {
                        assert!(m.contains(n), "{q}: {m}");
                    }
                    for supported in ["`gptq`", "`awq`", "`compressed-tensors`", "`fp8`", "Q4_K"] {
                        assert!(m.contains(supported), "{m}");
                    }
                }
                other => panic!("{q}: {other:?}"),
            }
        }
        assert_eq!(with("null").unwrap(), None);
        assert_eq!(scheme_of(&serde_json::json!({})).unwrap(), None);
    }

    #[test]
    fn reads_the_supported_configs() {
        let gptq = with(
            r#"{"quant_method": "gptq", "bits": 8, "group_size": -1, "desc_act": true,
                "sym": false, "checkpoint_format": "gptq_v2"}"#,
        )
        .unwrap();
        let Some(QuantScheme::Gptq(g)) = gptq else {
            panic!("{gptq:?}")
        };
        assert_eq!((g.bits, g.group_size, g.v2), (8, None, true));
        let awq =
            with(r#"{"quant_method": "awq", "bits": 4, "group_size": 32, "version": "GEMM"}"#)
                .unwrap();
        assert!(matches!(awq, Some(QuantScheme::Awq(a)) if a.group_size == Some(32)));
        let ct = with(
            r#"{"quant_method": "compressed-tensors", "format": "pack-quantized",
                "config_groups": {"group_0": {"targets": ["Linear"], "weights": {"num_bits": 4,
                "type": "int", "symmetric": true, "strategy": "group", "group_size": 32}}}}"#,
        )
        .unwrap();
        assert!(
            matches!(ct, Some(QuantScheme::CompressedTensors(c)) if c.bits == Some(4) && c.group_size == Some(32))
        );
    }
}
