//! From GGUF to wick's model: hyper-parameters from the metadata, tensors under their Hugging
//! Face names.
//!
//! [`GgufFile::model_config`] fills a [`ModelConfig`] from the `general.architecture` and
//! `{arch}.*` keys; [`GgufFile::tensor_set`] hands tensors to the model under their Hugging
//! Face names (through [`names`], the loader's one name table) with outermost-first shapes.
//!
//! **Llama q/k rows.** llama.cpp's converter reorders the rows of `attn_q` / `attn_k` of
//! `llama` models so that llama.cpp's interleaved ("normal") RoPE, which rotates adjacent
//! pairs, computes what the Hugging Face model's rotate-half RoPE computes. wick applies the
//! Hugging Face RoPE only, so [`GgufFile::tensor_set`] undoes the reordering for `llama`
//! files ([`unpermute_llama_rows`]). Rows are whole quantization blocks, so this is a row
//! shuffle of the raw bytes (into an owned buffer), not a requantization. `qwen3` files use
//! the rotate-half ("NEOX") RoPE in llama.cpp too and are left as stored.

use super::{dtype_of, GgufFile, GgufTensorInfo};
use crate::config::{Architecture, ModelConfig};
use crate::error::{Error, Result};
use crate::loader::{names, Bytes, HostTensor, TensorSet};
use crate::quant::DType;

impl GgufFile {
    /// The model's hyper-parameters from the metadata.
    ///
    /// Reads `general.architecture` (`qwen3` or `llama`) and the `{arch}.*` keys; the vocabulary
    /// size is the row count of `token_embd.weight` (or the length of `tokenizer.ggml.tokens`),
    /// embeddings are tied when there is no `output.weight`, and the stop tokens are
    /// `tokenizer.ggml.eos_token_id` plus `tokenizer.ggml.eot_token_id` when it differs.
    /// Features wick does not implement (RoPE scaling, partial rotary dimensions, value heads
    /// wider than key heads) are refused rather than ignored.
    pub fn model_config(&self) -> Result<ModelConfig> {
        let arch = self.require("general.architecture", self.get_str("general.architecture"))?;
        let architecture = match arch {
            "qwen3" => Architecture::Qwen3,
            "llama" => Architecture::Llama,
            other => {
                return Err(Error::UnsupportedModel(format!(
                    "{}: GGUF architecture `{other}`; wick runs qwen3 and llama",
                    self.path.display()
                )))
            }
        };
        let key = |k: &str| format!("{arch}.{k}");
        let opt_usize = |k: &str| -> Result<Option<usize>> {
            let k = key(k);
            match self.get_u64(&k)? {
                None => Ok(None),
                Some(v) => usize::try_from(v)
                    .map(Some)
                    .map_err(|_| self.malformed(format!("metadata key `{k}` = {v} is too large"))),
            }
        };
        let req_usize = |k: &str| self.require(&key(k), opt_usize(k));
        let unsupported =
            |m: String| Error::UnsupportedModel(format!("{}: {m}", self.path.display()));

        let hidden_size = req_usize("embedding_length")?;
        let num_hidden_layers = req_usize("block_count")?;
        let intermediate_size = req_usize("feed_forward_length")?;
        let num_attention_heads = req_usize("attention.head_count")?;
        let num_key_value_heads =
            opt_usize("attention.head_count_kv")?.unwrap_or(num_attention_heads);
        let head_dim = match opt_usize("attention.key_length")? {
            Some(d) => d,
            None => hidden_size.checked_div(num_attention_heads).unwrap_or(0),
        };
        if let Some(v) = opt_usize("attention.value_length")? {
            if v != head_dim {
                return Err(unsupported(format!(
                    "value head width {v} differs from key head width {head_dim}"
                )));
            }
        }
        if let Some(r) = opt_usize("rope.dimension_count")? {
            if r != head_dim {
                return Err(unsupported(format!(
                    "RoPE rotates {r} of {head_dim} head dimensions; partial rotary is not supported"
                )));
            }
        }
        if let Some(t) = self.get_str(&key("rope.scaling.type"))? {
            if t != "none" {
                return Err(unsupported(format!("RoPE scaling `{t}` is not supported")));
            }
        }
        let rms_norm_eps = self.require(
            &key("attention.layer_norm_rms_epsilon"),
            self.get_f32(&key("attention.layer_norm_rms_epsilon")),
        )?;
        let rope_theta = self.get_f32(&key("rope.freq_base"))?.unwrap_or(10000.0);
        let max_position_embeddings = req_usize("context_length")?;

        let vocab_size = match self.tensor_info("token_embd.weight") {
            Some(t) if t.dims.len() == 2 => t.dims[1] as usize,
            Some(t) => {
                return Err(self.malformed(format!(
                    "token_embd.weight has {} dimensions, expected 2",
                    t.dims.len()
                )))
            }
            None => match self.get_str_array("tokenizer.ggml.tokens")? {
                Some(tokens) => tokens.len(),
                None => {
                    return Err(Error::MissingTensor {
                        name: "token_embd.weight".into(),
                    })
                }
            },
        };
        let bos_token_id = self.get_u32("tokenizer.ggml.bos_token_id")?;
        let mut eos_token_ids = Vec::new();
        for k in ["tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"] {
            if let Some(id) = self.get_u32(k)? {
                if !eos_token_ids.contains(&id) {
                    eos_token_ids.push(id);
                }
            }
        }
        let config = ModelConfig {
            architecture,
            hidden_size,
            intermediate_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            vocab_size,
            rms_norm_eps,
            rope_theta,
            max_position_embeddings,
            tie_word_embeddings: self.tensor_info("output.weight").is_none(),
            bos_token_id,
            eos_token_ids,
        };
        config.validate()?;
        Ok(config)
    }

    /// Every tensor under its Hugging Face name, shapes outermost first, bytes mapped in place.
    ///
    /// Unknown tensor names and data types wick cannot compute with are refused by name, as
    /// are q/k norms in a `llama` file and tensors of layers beyond `config.num_hidden_layers`.
    /// For `llama` files the rows of the q and k projections are put back in Hugging Face
    /// order (see the module documentation); those two tensors per layer are copied, all
    /// others stay slices of the map.
    pub fn tensor_set(&self, config: &ModelConfig) -> Result<TensorSet> {
        let mut set = TensorSet::default();
        for info in &self.tensors {
            let Some(hf_name) = names::gguf_to_hf(&info.name) else {
                let why = names::unsupported_reason(&info.name)
                    .unwrap_or("it is not a tensor of the qwen3/llama architectures wick runs");
                return Err(Error::UnsupportedModel(format!(
                    "{}: tensor `{}`: {why}",
                    self.path.display(),
                    info.name
                )));
            };
            if let Some(layer) = names::layer_index(&info.name) {
                if layer >= config.num_hidden_layers {
                    return Err(self.malformed(format!(
                        "tensor `{}` belongs to layer {layer}, but the model has {} layers",
                        info.name, config.num_hidden_layers
                    )));
                }
            }
            let is_qk_norm =
                hf_name.contains(".self_attn.q_norm.") || hf_name.contains(".self_attn.k_norm.");
            if is_qk_norm && !config.has_qk_norm() {
                return Err(Error::UnsupportedModel(format!(
                    "{}: tensor `{}` (a q/k norm) in a {:?} model, which has none",
                    self.path.display(),
                    info.name,
                    config.architecture
                )));
            }
            let dtype = dtype_of(info)?;
            let shape = info.shape();
            let mut data = self.tensor_data(info);
            if config.architecture == Architecture::Llama {
                let n_head = if hf_name.contains(".self_attn.q_proj.") {
                    Some(config.num_attention_heads)
                } else if hf_name.contains(".self_attn.k_proj.") {
                    Some(config.num_key_value_heads)
                } else {
                    None
                };
                if let Some(n_head) = n_head {
                    data = self.unpermute(info, &hf_name, dtype, &shape, &data, n_head, config)?;
                }
            }
            set.insert(HostTensor {
                name: hf_name,
                dtype,
                shape,
                data,
            })?;
        }
        Ok(set)
    }

    /// Undoes the converter's q/k row order for one Llama projection (`n_head` heads).
    #[allow(clippy::too_many_arguments)]
    fn unpermute(
        &self,
        info: &GgufTensorInfo,
        hf_name: &str,
        dtype: DType,
        shape: &[usize],
        data: &Bytes,
        n_head: usize,
        config: &ModelConfig,
    ) -> Result<Bytes> {
        let rows = shape.first().copied().unwrap_or(0);
        let row_elems: usize = shape.iter().skip(1).product();
        let expected_rows = n_head * config.head_dim;
        if rows != expected_rows || dtype.bytes_for(row_elems).is_none() {
            let mut expected = shape.to_vec();
            if let Some(r) = expected.first_mut() {
                *r = expected_rows;
            }
            return Err(Error::ShapeMismatch {
                name: hf_name.to_string(),
                expected,
                found: shape.to_vec(),
            });
        }
        let permuted = unpermute_llama_rows(data.as_slice(), rows, n_head).ok_or_else(|| {
            self.malformed(format!(
                "tensor `{}`: cannot split {rows} rows into {n_head} heads of even width",
                info.name
            ))
        })?;
        Ok(Bytes::from_vec(permuted))
    }
}

/// Puts the rows of a Llama q or k projection converted by llama.cpp back in Hugging Face
/// order. `src` is `rows` equal-sized rows (whole quantization blocks each) forming `n_head`
/// heads of `rows / n_head` rows; returns `None` if that split is not possible or the head
/// width is odd.
///
/// The converter stores, within each head of width `D`, Hugging Face row `j * D/2 + i` at
/// position `2 * i + j` (`i < D/2`, `j < 2`): it interleaves the two halves that rotate-half
/// RoPE pairs up, so that adjacent rows are RoPE pairs. This function applies the inverse.
pub fn unpermute_llama_rows(src: &[u8], rows: usize, n_head: usize) -> Option<Vec<u8>> {
    if rows == 0 || n_head == 0 || !rows.is_multiple_of(n_head) || !src.len().is_multiple_of(rows) {
        return None;
    }
    let head_dim = rows / n_head;
    if !head_dim.is_multiple_of(2) {
        return None;
    }
    let half = head_dim / 2;
    let row_bytes = src.len() / rows;
    let mut out = vec![0u8; src.len()];
    for h in 0..n_head {
        for j in 0..2 {
            for i in 0..half {
                let hf_row = h * head_dim + j * half + i;
                let gguf_row = h * head_dim + 2 * i + j;
                out[hf_row * row_bytes..(hf_row + 1) * row_bytes]
                    .copy_from_slice(&src[gguf_row * row_bytes..(gguf_row + 1) * row_bytes]);
            }
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The converter's row order, written as its reshape/swap of axes: viewing the rows as
    /// `[n_head, 2, D/2]` and swapping the last two axes gives `[n_head, D/2, 2]`.
    fn permute_like_converter(rows: &[u32], n_head: usize) -> Vec<u32> {
        let d = rows.len() / n_head;
        let half = d / 2;
        let mut out = vec![0; rows.len()];
        for h in 0..n_head {
            for a in 0..half {
                for b in 0..2 {
                    // out[h][a][b] = in[h][b][a]
                    out[h * d + a * 2 + b] = rows[h * d + b * half + a];
                }
            }
        }
        out
    }

    #[test]
    fn unpermute_inverts_the_converter_on_a_synthetic_matrix() {
        for (n_head, head_dim, row_bytes) in [(1, 2, 1), (3, 8, 18), (4, 64, 34), (9, 64, 20)] {
            let rows = n_head * head_dim;
            let hf: Vec<u32> = (0..rows as u32).collect();
            let gguf_order = permute_like_converter(&hf, n_head);
            // Build a byte matrix whose row r is filled with a pattern naming HF row r.
            let mut bytes = Vec::new();
            for &r in &gguf_order {
                bytes.extend((0..row_bytes).map(|k| (r as usize * 7 + k) as u8));
            }
            let back = unpermute_llama_rows(&bytes, rows, n_head).unwrap();
            for (r, row) in back.chunks(row_bytes).enumerate() {
                let want: Vec<u8> = (0..row_bytes).map(|k| (r * 7 + k) as u8).collect();
                assert_eq!(row, want, "row {r} of {n_head}x{head_dim}");
            }
        }
        // A concrete case, head_dim 4: stored rows [0, 2, 1, 3] come back as [0, 1, 2, 3].
        assert_eq!(permute_like_converter(&[0, 1, 2, 3], 1), [0, 2, 1, 3]);
        assert_eq!(
            unpermute_llama_rows(&[0, 2, 1, 3], 4, 1).unwrap(),
            [0, 1, 2, 3]
        );
    }

    #[test]
    fn unpermute_refuses_impossible_splits() {
        assert!(unpermute_llama_rows(&[0; 12], 6, 4).is_none()); // 6 rows, 4 heads
        assert!(unpermute_llama_rows(&[0; 6], 6, 2).is_none()); // head width 3 is odd
        assert!(unpermute_llama_rows(&[0; 7], 4, 2).is_none()); // ragged rows
        assert!(unpermute_llama_rows(&[], 0, 1).is_none());
    }
}
