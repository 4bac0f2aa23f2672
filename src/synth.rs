//! Random-weight checkpoints with the exact shape of published models, so that anyone can
//! benchmark wick (and quantize the result) without downloading real weights.
//!
//! The output is a Hugging Face directory: `config.json`, `generation_config.json`, a bf16
//! `model.safetensors`, and the tokenizer files copied from a given directory (the real Qwen3
//! tokenizer ships with the test fixtures). Weights are uniform with the standard deviation
//! transformers initialises with (0.02); norm weights are near 1, so activations stay in range
//! through all layers.

use std::path::Path;

use rayon::prelude::*;
use serde_json::json;

use crate::config::ModelConfig;
use crate::error::{Error, Result};

/// Shapes wick can synthesise.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Preset {
    /// Qwen3-0.6B: 28 layers, hidden 1024, 16/8 heads of 128, FFN 3072, vocab 151936, tied.
    Qwen3_0_6B,
}

impl Preset {
    /// Parses a preset name (`qwen3-0.6b`).
    pub fn parse(name: &str) -> Result<Self> {
        match name.to_ascii_lowercase().as_str() {
            "qwen3-0.6b" => Ok(Preset::Qwen3_0_6B),
            other => Err(Error::InvalidRequest(format!(
                "unknown preset `{other}` (known: qwen3-0.6b)"
            ))),
        }
    }

    /// The `config.json` of the preset.
    pub fn config_json(self) -> serde_json::Value {
        match self {
            Preset::Qwen3_0_6B => json!({
                "architectures": ["Qwen3ForCausalLM"],
                "attention_bias": false,
                "attention_dropout": 0.0,
                "bos_token_id": 151643,
                "eos_token_id": 151645,
                "head_dim": 128,
                "hidden_act": "silu",
                "hidden_size": 1024,
                "initializer_range": 0.02,
                "intermediate_size": 3072,
                "max_position_embeddings": 40960,
                "max_window_layers": 28,
                "model_type": "qwen3",
                "num_attention_heads": 16,
                "num_hidden_layers": 28,
                "num_key_value_heads": 8,
                "rms_norm_eps": 1e-06,
                "rope_scaling": null,
                "rope_theta": 1000000,
                "sliding_window": null,
                "tie_word_embeddings": true,
                "torch_dtype": "bfloat16",
                "use_cache": true,
                "use_sliding_window": false,
                "vocab_size": 151936
            }),
        }
    }
}

/// Names and shapes of every tensor of a Qwen3/Llama checkpoint with `config`.
pub fn tensor_shapes(config: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    let (c, f, v) = (
        config.hidden_size,
        config.intermediate_size,
        config.vocab_size,
    );
    let (q, kv, d) = (config.q_dim(), config.kv_dim(), config.head_dim);
    let mut out = vec![("model.embed_tokens.weight".to_string(), vec![v, c])];
    for i in 0..config.num_hidden_layers {
        let p = format!("model.layers.{i}");
        out.push((format!("{p}.input_layernorm.weight"), vec![c]));
        out.push((format!("{p}.self_attn.q_proj.weight"), vec![q, c]));
        out.push((format!("{p}.self_attn.k_proj.weight"), vec![kv, c]));
        out.push((format!("{p}.self_attn.v_proj.weight"), vec![kv, c]));
        if config.has_qk_norm() {
            out.push((format!("{p}.self_attn.q_norm.weight"), vec![d]));
            out.push((format!("{p}.self_attn.k_norm.weight"), vec![d]));
        }
        out.push((format!("{p}.self_attn.o_proj.weight"), vec![c, q]));
        out.push((format!("{p}.post_attention_layernorm.weight"), vec![c]));
        out.push((format!("{p}.mlp.gate_proj.weight"), vec![f, c]));
        out.push((format!("{p}.mlp.up_proj.weight"), vec![f, c]));
        out.push((format!("{p}.mlp.down_proj.weight"), vec![c, f]));
    }
    out.push(("model.norm.weight".to_string(), vec![c]));
    if !config.tie_word_embeddings {
        out.push(("lm_head.weight".to_string(), vec![v, c]));
    }
    out
}

/// Fills `out` with bf16 values: uniform with standard deviation `std` around `mean`.
fn random_bf16(seed: u64, mean: f32, std: f32, out: &mut [u8]) {
    let half_width = std * 3f32.sqrt();
    out.par_chunks_mut(2 * 4096)
        .enumerate()
        .for_each(|(chunk, bytes)| {
            // splitmix64 per chunk: reproducible whatever the thread count.
            let mut s = seed ^ (chunk as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            let mut next = || {
                s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
                let mut z = s;
                z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
                z ^ (z >> 31)
            };
            for b in bytes.chunks_exact_mut(2) {
                let u = (next() >> 40) as f32 / (1u64 << 24) as f32; // [0, 1)
                let v = mean + (2.0 * u - 1.0) * half_width;
                b.copy_from_slice(&half::bf16::from_f32(v).to_le_bytes());
            }
        });
}

/// Writes a random checkpoint of `preset` to `out`, copying the tokenizer files from
/// `tokenizer_dir` (`tokenizer.json`, `tokenizer_config.json`).
pub fn write_checkpoint(preset: Preset, out: &Path, tokenizer_dir: &Path, seed: u64) -> Result<()> {
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let config_json = preset.config_json();
    let config = ModelConfig::from_json_str(&config_json.to_string())?;
    let write = |name: &str, text: String| {
        let p = out.join(name);
        std::fs::write(&p, text).map_err(|e| Error::io(&p, e))
    };
    write(
        "config.json",
        serde_json::to_string_pretty(&config_json).expect("json"),
    )?;
    write(
        "generation_config.json",
        serde_json::to_string_pretty(&json!({
            "bos_token_id": 151643, "eos_token_id": [151645, 151643], "pad_token_id": 151643,
            "do_sample": true, "temperature": 0.6, "top_k": 20, "top_p": 0.95
        }))
        .expect("json"),
    )?;
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        let src = tokenizer_dir.join(f);
        let dst = out.join(f);
        // Replace rather than overwrite: the source may be read-only, and so its earlier copy.
        let _ = std::fs::remove_file(&dst);
        std::fs::copy(&src, &dst).map_err(|e| Error::io(&src, e))?;
        let mut perms = std::fs::metadata(&dst)
            .map_err(|e| Error::io(&dst, e))?
            .permissions();
        #[allow(clippy::permissions_set_readonly_false)]
        perms.set_readonly(false);
        std::fs::set_permissions(&dst, perms).map_err(|e| Error::io(&dst, e))?;
    }
    let shapes = tensor_shapes(&config);
    let mut buffers = Vec::with_capacity(shapes.len());
    for (i, (name, shape)) in shapes.iter().enumerate() {
        let n: usize = shape.iter().product();
        let mut data = vec![0u8; 2 * n];
        let is_norm = shape.len() == 1;
        let (mean, std) = if is_norm { (1.0, 0.1) } else { (0.0, 0.02) };
        random_bf16(seed.wrapping_add(i as u64 * 7919), mean, std, &mut data);
        buffers.push((name.clone(), shape.clone(), data));
    }
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = buffers
        .iter()
        .map(|(name, shape, data)| {
            let view =
                safetensors::tensor::TensorView::new(safetensors::Dtype::BF16, shape.clone(), data)
                    .expect("sizes match");
            (name.clone(), view)
        })
        .collect();
    let path = out.join("model.safetensors");
    let meta = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(views, Some(meta), &path).map_err(|e| {
        Error::MalformedWeights {
            path: path.clone(),
            message: e.to_string(),
        }
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensor_list_matches_a_real_checkpoint() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures/qwen3-tiny");
        let config = ModelConfig::from_file(&dir.join("config.json")).expect("fixture config");
        let set = crate::loader::safetensors::load_dir(&dir).expect("fixture weights");
        let mut ours: Vec<(String, Vec<usize>)> = tensor_shapes(&config);
        ours.sort();
        let theirs: Vec<(String, Vec<usize>)> = set
            .names()
            .map(|n| (n.to_string(), set.get(n).unwrap().shape.clone()))
            .collect();
        assert_eq!(ours, theirs);
    }

    #[test]
    fn preset_config_is_qwen3_06b() {
        let c = ModelConfig::from_json_str(&Preset::Qwen3_0_6B.config_json().to_string()).unwrap();
        let params: usize = tensor_shapes(&c)
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum();
        // 596.05 M parameters, as the published model (tied embedding counted once).
        assert_eq!(params, 596_049_920);
        assert_eq!(Preset::parse("Qwen3-0.6B").unwrap(), Preset::Qwen3_0_6B);
        assert!(Preset::parse("gpt2").is_err());
    }
}
