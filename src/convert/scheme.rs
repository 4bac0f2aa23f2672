//! Quantizing a whole checkpoint: which block format each tensor gets, and the conversion.
//!
//! The mixes are llama-quantize's (`llama_tensor_get_type` in llama.cpp), so a file wick writes
//! has the tensor types of the file llama.cpp would write for the same checkpoint:
//!
//! | scheme | matrices | tied embedding / `output` | more bits |
//! |---|---|---|---|
//! | `q8_0` (file type 7) | `Q8_0` | `Q8_0` | — |
//! | `q4_0` (file type 2) | `Q4_0` | `Q6_K` (`Q8_0` if rows are not whole 256-blocks) | — |
//! | `q4_k_m` (file type 15) | `Q4_K` | as `q4_0` | `attn_v`, `ffn_down` → `Q6_K` in the layers [`use_more_bits`] picks |
//!
//! Vectors (norms) stay `F32`. A matrix whose rows are not whole blocks of the chosen format
//! falls back as llama.cpp does (`Q6_K` → `Q8_0`), with one deliberate difference: llama.cpp
//! falls back from `Q4_K` to `Q5_0`, a format wick does not implement, so wick uses `Q8_0`
//! there (more bits, never less accuracy). Only models whose hidden size is not a multiple
//! of 256 (test models) see this.
//!
//! The block quantizers are the bit-exact references of each format module; all input goes
//! through f32 first, as in llama-quantize (bf16 → f32 is exact).

use std::fmt;

use crate::error::{Error, Result};
use crate::loader::{names, TensorSet};
use crate::quant::DType;

/// A quantization mix, named after llama.cpp's file types.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[allow(non_camel_case_types)]
pub enum QuantScheme {
    /// Every matrix `Q8_0`.
    Q8_0,
    /// `Q4_0` matrices, a higher-precision tied embedding / output.
    Q4_0,
    /// llama.cpp's `Q4_K_M`: `Q4_K` with `Q6_K` for the output and some value / down projections.
    Q4_K_M,
}

impl QuantScheme {
    /// Parses `q8_0`, `q4_0`, `q4_k_m` (or `q4_k`), case-insensitively.
    pub fn parse(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "q8_0" => Ok(QuantScheme::Q8_0),
            "q4_0" => Ok(QuantScheme::Q4_0),
            "q4_k_m" | "q4_k" => Ok(QuantScheme::Q4_K_M),
            other => Err(Error::InvalidRequest(format!(
                "unknown quantization `{other}`; expected q8_0, q4_0 or q4_k_m"
            ))),
        }
    }

    /// The lower-case name (`"q4_k_m"`).
    pub const fn name(self) -> &'static str {
        match self {
            QuantScheme::Q8_0 => "q8_0",
            QuantScheme::Q4_0 => "q4_0",
            QuantScheme::Q4_K_M => "q4_k_m",
        }
    }

    /// llama.cpp's `llama_ftype`, stored as `general.file_type`.
    pub const fn file_type(self) -> u32 {
        match self {
            QuantScheme::Q8_0 => 7,
            QuantScheme::Q4_0 => 2,
            QuantScheme::Q4_K_M => 15,
        }
    }

    /// The format of an ordinary matrix.
    const fn base(self) -> DType {
        match self {
            QuantScheme::Q8_0 => DType::Q8_0,
            QuantScheme::Q4_0 => DType::Q4_0,
            QuantScheme::Q4_K_M => DType::Q4_K,
        }
    }

    /// The storage type of GGUF tensor `gguf_name` with `shape` (outermost first) in a model
    /// of `n_layers` blocks; `tied` says whether `token_embd` doubles as the output matrix.
    pub fn tensor_type(
        self,
        gguf_name: &str,
        shape: &[usize],
        n_layers: usize,
        tied: bool,
    ) -> DType {
        let cols = shape.last().copied().unwrap_or(0);
        if shape.len() < 2 || !gguf_name.ends_with(".weight") {
            return DType::F32;
        }
        let is_output = gguf_name == "output.weight" || (tied && gguf_name == "token_embd.weight");
        let layer = names::layer_index(gguf_name).unwrap_or(0);
        let wanted = if is_output {
            // llama.cpp tests the row length against 256 here whatever the base format.
            if !cols.is_multiple_of(256) || self.base() == DType::Q8_0 {
                DType::Q8_0
            } else {
                DType::Q6_K
            }
        } else if self == QuantScheme::Q4_K_M
            && (gguf_name.ends_with(".attn_v.weight") || gguf_name.ends_with(".ffn_down.weight"))
            && use_more_bits(layer, n_layers)
        {
            DType::Q6_K
        } else {
            self.base()
        };
        fallback(wanted, cols)
    }
}

impl fmt::Display for QuantScheme {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// llama.cpp's choice of layers that get more bits in `Q4_K_M`: the first and last eighth of
/// the blocks and every third block in between.
pub fn use_more_bits(layer: usize, n_layers: usize) -> bool {
    let (i, n) = (layer as i64, n_layers as i64);
    i < n / 8 || i >= 7 * n / 8 || (i - n / 8) % 3 == 2
}

/// A format whose blocks fit rows of `cols` elements: `wanted`, or llama.cpp's fallback.
fn fallback(wanted: DType, cols: usize) -> DType {
    if cols.is_multiple_of(wanted.block_elems()) {
        return wanted;
    }
    let next = match wanted {
        // llama.cpp: Q4_K → Q5_0 (not implemented here, see the module docs), Q5_K → Q5_1.
        DType::Q4_K | DType::Q5_K | DType::Q6_K => DType::Q8_0,
        other => other,
    };
    if cols.is_multiple_of(next.block_elems()) {
        next
    } else {
        DType::F16
    }
}

pub use crate::quant::quantize_row;

pub use crate::loader::convert_tensor;

/// The storage type `scheme` gives Hugging Face tensor `hf_name`, or `None` for tensors the
/// GGUF name table does not know (they are left as they are).
pub fn hf_tensor_type(
    scheme: QuantScheme,
    hf_name: &str,
    shape: &[usize],
    n_layers: usize,
    tied: bool,
) -> Option<DType> {
    let g = names::hf_to_gguf(hf_name)?;
    Some(scheme.tensor_type(&g, shape, n_layers, tied))
}

/// Quantizes every tensor of `set` the way `scheme` mixes them (tensors already stored in a
/// block format are kept as they are); `on_tensor(name)` is called before each tensor.
pub fn quantize_set(
    set: &TensorSet,
    scheme: QuantScheme,
    n_layers: usize,
    on_tensor: &mut dyn FnMut(&str),
) -> Result<TensorSet> {
    let tied = set.try_get("lm_head.weight").is_none();
    let mut out = TensorSet::default();
    for name in set.names() {
        let t = set.get(name)?;
        on_tensor(name);
        let dtype = match hf_tensor_type(scheme, name, &t.shape, n_layers, tied) {
            Some(d) if !t.dtype.is_quantized() => d,
            _ => t.dtype,
        };
        out.insert(convert_tensor(t, dtype)?)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn use_more_bits_matches_llama_cpp_for_28_layers() {
        // Qwen3-0.6B has 28 blocks: 0..3, 24..27, and 5, 8, ..., 23.
        let picked: Vec<usize> = (0..28).filter(|&i| use_more_bits(i, 28)).collect();
        assert_eq!(picked, [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 24, 25, 26, 27]);
        assert_eq!(
            (0..2).filter(|&i| use_more_bits(i, 2)).collect::<Vec<_>>(),
            [1]
        );
    }

    #[test]
    fn narrow_rows_fall_back() {
        let s = QuantScheme::Q4_K_M;
        assert_eq!(
            s.tensor_type("blk.0.attn_q.weight", &[128, 64], 2, true),
            DType::Q8_0
        );
        assert_eq!(
            s.tensor_type("blk.0.attn_q.weight", &[256, 256], 2, true),
            DType::Q4_K
        );
        assert_eq!(
            s.tensor_type("token_embd.weight", &[1000, 64], 2, true),
            DType::Q8_0
        );
        assert_eq!(
            s.tensor_type("token_embd.weight", &[1000, 256], 2, false),
            DType::Q4_K
        );
        assert_eq!(
            s.tensor_type("blk.0.attn_norm.weight", &[256], 2, true),
            DType::F32
        );
        assert_eq!(
            QuantScheme::Q4_0.tensor_type("blk.0.ffn_up.weight", &[4, 48], 2, true),
            DType::F16
        );
    }

    #[test]
    fn parse_refuses_unknown_names() {
        assert_eq!(QuantScheme::parse("Q4_K").unwrap(), QuantScheme::Q4_K_M);
        assert!(QuantScheme::parse("q3_k").is_err());
    }
}
