//! Model hyper-parameters (`config.json`) and generation defaults (`generation_config.json`).
//!
//! Field names follow Hugging Face. Two spellings of the RoPE base exist in published
//! checkpoints: `rope_theta` at the top level (Qwen3-0.6B) and the newer
//! `rope_parameters: {"rope_theta": ...}`; both are accepted. GGUF files fill the same struct
//! from their metadata (see `loader::gguf`).

use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use crate::error::{Error, Result};

/// The model families wick runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Architecture {
    /// Qwen3 dense models: GQA attention with per-head RMSNorm of q and k.
    Qwen3,
    /// Llama (and SmolLM2, which uses it): like Qwen3 without the q/k norms.
    Llama,
}

/// The shape and constants of a model.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    /// Model family.
    pub architecture: Architecture,
    /// C: width of the residual stream.
    pub hidden_size: usize,
    /// F: width of the MLP.
    pub intermediate_size: usize,
    /// Number of transformer blocks.
    pub num_hidden_layers: usize,
    /// H: query heads.
    pub num_attention_heads: usize,
    /// Hkv: key/value heads (H is a multiple of Hkv).
    pub num_key_value_heads: usize,
    /// D: per-head width (not always C / H: Qwen3-0.6B has 16 × 128 = 2048 > 1024).
    pub head_dim: usize,
    /// V: vocabulary size (rows of the embedding).
    pub vocab_size: usize,
    /// Epsilon of every RMSNorm.
    pub rms_norm_eps: f32,
    /// RoPE base frequency.
    pub rope_theta: f32,
    /// The longest context the model was trained for.
    pub max_position_embeddings: usize,
    /// Whether the LM head reuses the embedding matrix.
    pub tie_word_embeddings: bool,
    /// Beginning-of-sequence token, if the model has one.
    pub bos_token_id: Option<u32>,
    /// End-of-sequence token(s) from `config.json`.
    pub eos_token_ids: Vec<u32>,
}

impl ModelConfig {
    /// Whether the attention block normalises q and k per head (Qwen3).
    pub fn has_qk_norm(&self) -> bool {
        self.architecture == Architecture::Qwen3
    }

    /// H × D: width of the query projection.
    pub fn q_dim(&self) -> usize {
        self.num_attention_heads * self.head_dim
    }

    /// Hkv × D: width of each of the key and value projections.
    pub fn kv_dim(&self) -> usize {
        self.num_key_value_heads * self.head_dim
    }

    /// Reads `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json_str(&text).map_err(|e| match e {
            Error::Json { message, .. } => Error::json(path, message),
            other => other,
        })
    }

    /// Parses the text of a `config.json`.
    pub fn from_json_str(text: &str) -> Result<Self> {
        let raw: RawConfig =
            serde_json::from_str(text).map_err(|e| Error::json("config.json", e))?;
        raw.into_config()
    }

    /// Checks the invariants the forward pass relies on.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::UnsupportedModel(m));
        if self.hidden_size == 0
            || self.num_hidden_layers == 0
            || self.num_attention_heads == 0
            || self.num_key_value_heads == 0
            || self.head_dim == 0
            || self.vocab_size == 0
            || self.intermediate_size == 0
        {
            return bad(format!(
                "a dimension in the configuration is zero: {self:?}"
            ));
        }
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            return bad(format!(
                "num_attention_heads ({}) is not a multiple of num_key_value_heads ({})",
                self.num_attention_heads, self.num_key_value_heads
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return bad(format!(
                "head_dim {} is odd; RoPE needs pairs",
                self.head_dim
            ));
        }
        let theta_ok = self.rope_theta.is_finite() && self.rope_theta > 0.0;
        let eps_ok = self.rms_norm_eps.is_finite() && self.rms_norm_eps >= 0.0;
        if !(theta_ok && eps_ok) {
            return bad(format!(
                "rope_theta {} / rms_norm_eps {} out of range",
                self.rope_theta, self.rms_norm_eps
            ));
        }
        Ok(())
    }
}

/// `config.json` as published; only the fields wick reads.
#[derive(Deserialize)]
struct RawConfig {
    #[serde(default)]
    model_type: Option<String>,
    #[serde(default)]
    architectures: Vec<String>,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    #[serde(default)]
    num_key_value_heads: Option<usize>,
    #[serde(default)]
    head_dim: Option<usize>,
    vocab_size: usize,
    #[serde(default = "default_eps")]
    rms_norm_eps: f32,
    #[serde(default)]
    rope_theta: Option<f32>,
    #[serde(default)]
    rope_parameters: Option<Value>,
    #[serde(default)]
    rope_scaling: Option<Value>,
    #[serde(default = "default_max_pos")]
    max_position_embeddings: usize,
    #[serde(default)]
    tie_word_embeddings: Option<bool>,
    #[serde(default)]
    attention_bias: bool,
    #[serde(default)]
    bos_token_id: Option<u32>,
    #[serde(default)]
    eos_token_id: Option<Value>,
}

fn default_eps() -> f32 {
    1e-6
}

fn default_max_pos() -> usize {
    40960
}

impl RawConfig {
    fn into_config(self) -> Result<ModelConfig> {
        let model_type = self.model_type.clone().unwrap_or_default();
        let architecture = match model_type.as_str() {
            "qwen3" => Architecture::Qwen3,
            "llama" => Architecture::Llama,
            _ if self.architectures.iter().any(|a| a == "Qwen3ForCausalLM") => Architecture::Qwen3,
            _ if self.architectures.iter().any(|a| a == "LlamaForCausalLM") => Architecture::Llama,
            other => {
                return Err(Error::UnsupportedModel(format!(
                    "model_type `{other}` (architectures {:?}); wick runs qwen3 and llama",
                    self.architectures
                )))
            }
        };
        if self.attention_bias {
            return Err(Error::UnsupportedModel(
                "attention_bias = true is not supported".into(),
            ));
        }
        // The RoPE base may sit at the top level or inside `rope_parameters`; any scaling
        // other than the default would silently change positions, so it is refused.
        let mut rope_theta = self.rope_theta;
        for params in [&self.rope_parameters, &self.rope_scaling]
            .into_iter()
            .flatten()
        {
            if params.is_null() {
                continue;
            }
            let rope_type = params
                .get("rope_type")
                .or_else(|| params.get("type"))
                .and_then(Value::as_str)
                .unwrap_or("default");
            if rope_type != "default" {
                return Err(Error::UnsupportedModel(format!(
                    "RoPE scaling `{rope_type}` is not supported"
                )));
            }
            if let Some(t) = params.get("rope_theta").and_then(Value::as_f64) {
                rope_theta = Some(t as f32);
            }
        }
        let eos_token_ids = match &self.eos_token_id {
            Some(v) => ids_from_value(v),
            None => Vec::new(),
        };
        let head_dim = self
            .head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1));
        let config = ModelConfig {
            architecture,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_hidden_layers: self.num_hidden_layers,
            num_attention_heads: self.num_attention_heads,
            num_key_value_heads: self.num_key_value_heads.unwrap_or(self.num_attention_heads),
            head_dim,
            vocab_size: self.vocab_size,
            rms_norm_eps: self.rms_norm_eps,
            rope_theta: rope_theta.unwrap_or(10000.0),
            max_position_embeddings: self.max_position_embeddings,
            // Qwen3 and Llama configs default to untied in transformers; the key is
            // present in every published Qwen3 config.
            tie_word_embeddings: self.tie_word_embeddings.unwrap_or(false),
            bos_token_id: self.bos_token_id,
            eos_token_ids,
        };
        config.validate()?;
        Ok(config)
    }
}

/// A token id or a list of them (both spellings appear in configs).
fn ids_from_value(v: &Value) -> Vec<u32> {
    match v {
        Value::Number(n) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Value::Array(a) => a
            .iter()
            .filter_map(Value::as_u64)
            .map(|x| x as u32)
            .collect(),
        _ => Vec::new(),
    }
}

/// Defaults from `generation_config.json`: stop ids and sampling.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GenerationConfig {
    /// Tokens that end generation (Qwen3: `<|im_end|>` and `<|endoftext|>`).
    pub eos_token_ids: Vec<u32>,
    /// Default temperature, if the model suggests one.
    pub temperature: Option<f32>,
    /// Default top-k.
    pub top_k: Option<usize>,
    /// Default top-p.
    pub top_p: Option<f32>,
    /// Default min-p.
    pub min_p: Option<f32>,
    /// Default repetition penalty.
    pub repetition_penalty: Option<f32>,
    /// Whether the model's authors sample by default (`do_sample`).
    pub do_sample: Option<bool>,
}

impl GenerationConfig {
    /// Reads `generation_config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let v: Value = serde_json::from_str(&text).map_err(|e| Error::json(path, e))?;
        Ok(Self::from_value(&v))
    }

    /// Extracts the known fields from a parsed `generation_config.json`.
    pub fn from_value(v: &Value) -> Self {
        let f = |k: &str| v.get(k).and_then(Value::as_f64).map(|x| x as f32);
        GenerationConfig {
            eos_token_ids: v
                .get("eos_token_id")
                .map(ids_from_value)
                .unwrap_or_default(),
            temperature: f("temperature"),
            top_k: v.get("top_k").and_then(Value::as_u64).map(|x| x as usize),
            top_p: f("top_p"),
            min_p: f("min_p"),
            repetition_penalty: f("repetition_penalty"),
            do_sample: v.get("do_sample").and_then(Value::as_bool),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const QWEN3_06B: &str = r#"{
      "architectures": ["Qwen3ForCausalLM"], "attention_bias": false, "bos_token_id": 151643,
      "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu", "hidden_size": 1024,
      "intermediate_size": 3072, "max_position_embeddings": 40960, "model_type": "qwen3",
      "num_attention_heads": 16, "num_hidden_layers": 28, "num_key_value_heads": 8,
      "rms_norm_eps": 1e-06, "rope_scaling": null, "rope_theta": 1000000,
      "tie_word_embeddings": true, "vocab_size": 151936}"#;

    #[test]
    fn reads_qwen3_06b_config_with_top_level_rope_theta() {
        let c = ModelConfig::from_json_str(QWEN3_06B).unwrap();
        assert_eq!(c.architecture, Architecture::Qwen3);
        assert_eq!((c.q_dim(), c.kv_dim(), c.head_dim), (2048, 1024, 128));
        assert_eq!(c.rope_theta, 1e6);
        assert!(c.tie_word_embeddings);
        assert_eq!(c.eos_token_ids, vec![151645]);
    }

    #[test]
    fn reads_rope_parameters_object() {
        let text = QWEN3_06B.replace(
            r#""rope_theta": 1000000"#,
            r#""rope_parameters": {"rope_type": "default", "rope_theta": 5000.0}"#,
        );
        let c = ModelConfig::from_json_str(&text).unwrap();
        assert_eq!(c.rope_theta, 5000.0);
    }

    #[test]
    fn refuses_rope_scaling_it_cannot_apply() {
        let text = QWEN3_06B.replace(
            r#""rope_scaling": null"#,
            r#""rope_scaling": {"rope_type": "yarn", "factor": 4.0}"#,
        );
        let err = ModelConfig::from_json_str(&text).unwrap_err().to_string();
        assert!(err.contains("yarn"), "{err}");
    }

    #[test]
    fn refuses_unknown_architecture() {
        let text = QWEN3_06B.replace(r#""model_type": "qwen3""#, r#""model_type": "gpt2""#);
        let text = text.replace("Qwen3ForCausalLM", "GPT2LMHeadModel");
        let err = ModelConfig::from_json_str(&text).unwrap_err().to_string();
        assert!(err.contains("gpt2"), "{err}");
    }

    #[test]
    fn fixture_generation_config_has_both_stop_ids() {
        let p = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../shared/fixtures/qwen3-tiny/generation_config.json");
        let g = GenerationConfig::from_file(&p).expect("fixture generation_config.json");
        assert_eq!(g.eos_token_ids, vec![151645, 151643]);
        assert_eq!(
            (g.temperature, g.top_k, g.top_p),
            (Some(0.6), Some(20), Some(0.95))
        );
    }
}
