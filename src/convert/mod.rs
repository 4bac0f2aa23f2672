//! `wick quantize`: a Hugging Face Qwen3 checkpoint directory → a quantized GGUF file.
//!
//! The file carries what llama.cpp's converter (`convert_hf_to_gguf.py`) followed by
//! llama-quantize writes for the same checkpoint, so llama.cpp and other GGUF readers load it
//! like theirs:
//!
//! - `general.*`: architecture `qwen3`, type, name (from the directory name), size label
//!   (from the parameter count), sampling defaults from `generation_config.json`, file type
//!   and quantization version 2;
//! - `qwen3.*`: the hyper-parameters of `config.json`;
//! - `tokenizer.*`: the byte-level BPE vocabulary, token types, merges, special token ids,
//!   `add_bos_token` and the chat template, from `tokenizer.json` / `tokenizer_config.json`.
//!
//! Tensor types follow [`QuantScheme`] (the mixes of llama-quantize, in [`scheme`], which
//! also quantizes a checkpoint at load); names go through the loader's one name table.

pub mod scheme;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

use self::scheme::{convert_tensor, QuantScheme};
use crate::config::{Architecture, GenerationConfig, ModelConfig};
use crate::error::{Error, Result};
use crate::loader::gguf::{MetaArray, MetaValue};
use crate::loader::gguf_write::GgufWriter;
use crate::loader::{names, safetensors, HostTensor, TensorSet};

/// GGUF token types (llama.cpp's `llama_token_type`).
const TOKEN_NORMAL: i32 = 1;
const TOKEN_CONTROL: i32 = 3;
const TOKEN_USER_DEFINED: i32 = 4;
const TOKEN_UNUSED: i32 = 5;

/// Progress of [`quantize_checkpoint`]: called with (tensors done, tensors in all, name).
pub type Progress<'a> = &'a mut dyn FnMut(usize, usize, &str);

/// Quantizes the checkpoint in `dir` with `scheme` and writes the GGUF file `out`.
pub fn quantize_checkpoint(
    dir: &Path,
    out: &Path,
    scheme: QuantScheme,
    progress: Progress<'_>,
) -> Result<()> {
    let config = ModelConfig::from_file(&dir.join("config.json"))?;
    if config.architecture != Architecture::Qwen3 {
        return Err(Error::UnsupportedModel(format!(
            "{}: wick quantize writes Qwen3 checkpoints only",
            dir.display()
        )));
    }
    let tensors = safetensors::load_dir(dir)?;
    let mut w = GgufWriter::new();
    for (k, v) in qwen3_metadata(dir, &config, &tensors, scheme)? {
        w.add_meta(&k, v);
    }
    let order = gguf_order(&tensors, config.num_hidden_layers)?;
    let tied = tensors.try_get("lm_head.weight").is_none();
    for (i, (gguf_name, hf_name)) in order.iter().enumerate() {
        progress(i, order.len(), gguf_name);
        let t = tensors.get(hf_name)?;
        let dtype = scheme.tensor_type(gguf_name, &t.shape, config.num_hidden_layers, tied);
        let q: HostTensor = convert_tensor(t, dtype)?;
        w.add_tensor(gguf_name, q.dtype, &q.shape, q.data)?;
    }
    progress(order.len(), order.len(), "");
    w.write_file(out)
}

/// (GGUF name, Hugging Face name) of every tensor in the order llama.cpp's converter writes
/// them: the embedding, each block in turn, the final norm, the output matrix. A tensor the
/// name table does not know is an error (the model would be incomplete without it).
fn gguf_order(tensors: &TensorSet, n_layers: usize) -> Result<Vec<(String, String)>> {
    let mut order: Vec<(usize, usize, String, String)> = Vec::new();
    for hf in tensors.names() {
        let g = names::hf_to_gguf(hf)
            .ok_or_else(|| Error::UnsupportedModel(format!("tensor `{hf}` has no GGUF name")))?;
        // Within a block the converter keeps the checkpoint's (sorted) order.
        let key = match (names::layer_index(hf), g.as_str()) {
            (_, "token_embd.weight") => (0, 0),
            (Some(l), _) if l < n_layers => (1 + l, 0),
            (Some(l), _) => {
                return Err(Error::UnsupportedModel(format!(
                    "tensor `{hf}` belongs to layer {l}, but the model has {n_layers}"
                )))
            }
            (None, "output_norm.weight") => (n_layers + 1, 0),
            (None, _) => (n_layers + 1, 1),
        };
        order.push((key.0, key.1, hf.to_string(), g));
    }
    order.sort();
    Ok(order.into_iter().map(|(_, _, h, g)| (g, h)).collect())
}

/// The metadata llama.cpp writes for a Qwen3 checkpoint, in its order.
pub fn qwen3_metadata(
    dir: &Path,
    config: &ModelConfig,
    tensors: &TensorSet,
    scheme: QuantScheme,
) -> Result<Vec<(String, MetaValue)>> {
    use MetaValue::*;
    let mut m: Vec<(String, MetaValue)> = Vec::new();
    let mut put = |k: &str, v: MetaValue| m.push((k.to_string(), v));
    put("general.architecture", Str("qwen3".into()));
    put("general.type", Str("model".into()));
    let gen_path = dir.join("generation_config.json");
    if gen_path.exists() {
        let g = GenerationConfig::from_file(&gen_path)?;
        if let Some(k) = g.top_k {
            put(
                "general.sampling.top_k",
                I32(k.min(i32::MAX as usize) as i32),
            );
        }
        if let Some(p) = g.top_p {
            put("general.sampling.top_p", F32(p));
        }
        if let Some(t) = g.temperature {
            put("general.sampling.temp", F32(t));
        }
    }
    put("general.name", Str(model_name(dir)));
    let n_params: usize = tensors
        .names()
        .filter_map(|n| tensors.get(n).ok())
        .map(|t| t.numel())
        .sum();
    put("general.size_label", Str(size_label(n_params)));
    let c = config;
    let u32_of = |v: usize| U32(v.min(u32::MAX as usize) as u32);
    put("qwen3.block_count", u32_of(c.num_hidden_layers));
    put("qwen3.context_length", u32_of(c.max_position_embeddings));
    put("qwen3.embedding_length", u32_of(c.hidden_size));
    put("qwen3.feed_forward_length", u32_of(c.intermediate_size));
    put("qwen3.attention.head_count", u32_of(c.num_attention_heads));
    put(
        "qwen3.attention.head_count_kv",
        u32_of(c.num_key_value_heads),
    );
    put("qwen3.rope.freq_base", F32(c.rope_theta));
    put(
        "qwen3.attention.layer_norm_rms_epsilon",
        F32(c.rms_norm_eps),
    );
    put("qwen3.attention.key_length", u32_of(c.head_dim));
    put("qwen3.attention.value_length", u32_of(c.head_dim));
    put("general.file_type", U32(scheme.file_type()));
    put("general.quantization_version", U32(2));
    for (k, v) in tokenizer_metadata(dir, config)? {
        put(&k, v);
    }
    Ok(m)
}

/// `qwen3-tiny` → `Qwen3 Tiny`: llama.cpp's converter names a model after its directory.
fn model_name(dir: &Path) -> String {
    let base = dir
        .canonicalize()
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "model".into());
    base.split(['-', '_'])
        .filter(|w| !w.is_empty())
        .map(|w| {
            let mut c = w.chars();
            c.next()
                .map(|f| f.to_uppercase().chain(c).collect::<String>())
                .unwrap_or_default()
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// llama.cpp's size label: the parameter count in K/M/B/T with at least two significant
/// digits (`9.8e6` → `10M`, `596e6` → `596M`, `1.5e9` → `1.5B`).
pub fn size_label(n: usize) -> String {
    let n = n as f64;
    let (scaled, suffix) = if n > 1e12 {
        (n * 1e-12, "T")
    } else if n > 1e9 {
        (n * 1e-9, "B")
    } else if n > 1e6 {
        (n * 1e-6, "M")
    } else {
        (n * 1e-3, "K")
    };
    let digits = format!("{}", scaled.round() as u64);
    let digits = digits.trim_start_matches('0').len();
    let fix = 2usize.saturating_sub(digits);
    format!("{scaled:.fix$}{suffix}")
}

/// The `tokenizer.*` keys from `tokenizer.json` and `tokenizer_config.json`.
fn tokenizer_metadata(dir: &Path, config: &ModelConfig) -> Result<Vec<(String, MetaValue)>> {
    use MetaValue::*;
    let tj_path = dir.join("tokenizer.json");
    let tj = read_json(&tj_path)?;
    let tc_path = dir.join("tokenizer_config.json");
    let tc = if tc_path.exists() {
        read_json(&tc_path)?
    } else {
        Value::Null
    };
    let model = &tj["model"];
    if model["type"].as_str() != Some("BPE") {
        return Err(Error::json(
            &tj_path,
            "only byte-level BPE tokenizers are supported",
        ));
    }
    let vocab = model["vocab"]
        .as_object()
        .ok_or_else(|| Error::json(&tj_path, "model.vocab is missing"))?;
    let mut by_id: HashMap<u64, (String, i32)> = HashMap::new();
    for (tok, id) in vocab {
        let id = id
            .as_u64()
            .ok_or_else(|| Error::json(&tj_path, format!("vocab id of `{tok}` is not a number")))?;
        by_id.insert(id, (tok.clone(), TOKEN_NORMAL));
    }
    for a in tj["added_tokens"].as_array().into_iter().flatten() {
        let (Some(id), Some(content)) = (a["id"].as_u64(), a["content"].as_str()) else {
            return Err(Error::json(&tj_path, "an added token lacks id or content"));
        };
        let special = a["special"].as_bool().unwrap_or(false);
        let ty = if special || looks_special(content) {
            TOKEN_CONTROL
        } else {
            TOKEN_USER_DEFINED
        };
        by_id.insert(id, (content.to_string(), ty));
    }
    let n_vocab = config
        .vocab_size
        .max(by_id.keys().max().map_or(0, |m| *m as usize + 1));
    let mut tokens = Vec::with_capacity(n_vocab);
    let mut types = Vec::with_capacity(n_vocab);
    for id in 0..n_vocab as u64 {
        match by_id.remove(&id) {
            Some((t, ty)) => {
                tokens.push(t);
                types.push(ty);
            }
            None => {
                tokens.push(format!("[PAD{id}]"));
                types.push(TOKEN_UNUSED);
            }
        }
    }
    let mut merges = Vec::new();
    for mg in model["merges"].as_array().into_iter().flatten() {
        match mg {
            Value::String(s) => merges.push(s.clone()),
            Value::Array(pair) if pair.len() == 2 => {
                let (Some(a), Some(b)) = (pair[0].as_str(), pair[1].as_str()) else {
                    return Err(Error::json(&tj_path, "a merge is not two strings"));
                };
                merges.push(format!("{a} {b}"));
            }
            _ => {
                return Err(Error::json(
                    &tj_path,
                    "a merge is neither a string nor a pair",
                ))
            }
        }
    }
    let token_id = |v: &Value| -> Option<u32> {
        let s = v.as_str().or_else(|| v["content"].as_str())?;
        tokens.iter().position(|t| t == s).map(|i| i as u32)
    };
    let config_json = read_json(&dir.join("config.json"))?;
    let special = |kind: &str| -> Option<u32> {
        token_id(&tc[format!("{kind}_token")]).or_else(|| {
            config_json[format!("{kind}_token_id")]
                .as_u64()
                .map(|v| v as u32)
        })
    };
    let (eos, pad, bos) = (special("eos"), special("pad"), special("bos"));

    let mut m: Vec<(String, MetaValue)> = vec![
        ("tokenizer.ggml.model".into(), Str("gpt2".into())),
        ("tokenizer.ggml.pre".into(), Str("qwen2".into())),
        (
            "tokenizer.ggml.tokens".into(),
            Array(MetaArray::Str(tokens)),
        ),
        (
            "tokenizer.ggml.token_type".into(),
            Array(MetaArray::I32(types)),
        ),
        (
            "tokenizer.ggml.merges".into(),
            Array(MetaArray::Str(merges)),
        ),
    ];
    for (k, v) in [("eos", eos), ("padding", pad), ("bos", bos)] {
        if let Some(id) = v {
            m.push((format!("tokenizer.ggml.{k}_token_id"), U32(id)));
        }
    }
    for k in ["add_bos_token", "add_eos_token"] {
        if let Some(b) = tc[k].as_bool() {
            m.push((format!("tokenizer.ggml.{k}"), Bool(b)));
        }
    }
    if let Some(t) = tc["chat_template"].as_str() {
        m.push(("tokenizer.chat_template".into(), Str(t.to_string())));
    }
    Ok(m)
}

/// llama.cpp's converter marks added tokens that look like control tokens as control even
/// when the tokenizer does not flag them special (`<|fim_prefix|>` and the like).
fn looks_special(t: &str) -> bool {
    matches!(t, "<pad>" | "<mask>" | "<2mass>" | "[@BOS@]")
        || (t.starts_with("<|") && t.ends_with("|>"))
        || (t.starts_with("<｜") && t.ends_with("｜>"))
        || (t.starts_with("<unused") && t.ends_with('>'))
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::json(path, e))
}

/// A file `wick quantize` wrote, as it reports it.
#[derive(Clone, Debug)]
pub struct QuantizedFile {
    /// Where.
    pub path: PathBuf,
    /// With which scheme.
    pub scheme: QuantScheme,
    /// Its size in bytes (0 when it cannot be read).
    pub bytes: u64,
}

impl QuantizedFile {
    /// The file at `path`, quantized with `scheme`, with its size as it is now.
    pub fn stat(path: &Path, scheme: QuantScheme) -> QuantizedFile {
        QuantizedFile {
            path: path.to_path_buf(),
            scheme,
            bytes: std::fs::metadata(path).map(|m| m.len()).unwrap_or(0),
        }
    }
}

impl std::fmt::Display for QuantizedFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "wrote {} ({}, {:.1} MiB)",
            self.path.display(),
            self.scheme,
            self.bytes as f64 / (1 << 20) as f64
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_labels_round_like_llama_cpp() {
        assert_eq!(size_label(9_822_656), "10M");
        assert_eq!(size_label(40_470_016), "40M");
        assert_eq!(size_label(596_049_920), "596M");
        assert_eq!(size_label(1_543_714_304), "1.5B");
    }

    #[test]
    fn control_tokens_by_look() {
        assert!(looks_special("<|fim_prefix|>"));
        assert!(!looks_special("<think>"));
    }
}
