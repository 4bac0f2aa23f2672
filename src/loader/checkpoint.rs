//! Everything a model source provides, loaded in one call: configuration, generation
//! defaults, tokenizer, chat template and the memory-mapped weights, with the time each
//! phase of getting them took ([`Checkpoint::times`]: download, map, repack).

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use super::gguf::GgufFile;
use super::hub::{resolve_model_timed, HubOptions, ModelKind};
use super::{LoadTimes, TensorSet};
use crate::config::{GenerationConfig, ModelConfig};
use crate::error::{Error, Result};
use crate::loader::gguf_tokenizer::tokenizer_from_gguf;
use crate::text::chat_template::ChatTemplate;
use crate::text::tokenizer::Tokenizer;

/// A model as found on disk (or fetched from the Hub), ready to be put on a backend.
pub struct Checkpoint {
    /// The name clients call the model by: the Hub id, or the directory / file name.
    pub name: String,
    /// Hyper-parameters.
    pub config: ModelConfig,
    /// Generation defaults and stop ids.
    pub generation: GenerationConfig,
    /// The tokenizer.
    pub tokenizer: Arc<Tokenizer>,
    /// The chat template, if the model has one.
    pub chat_template: Option<Arc<ChatTemplate>>,
    /// The weights, by Hugging Face name.
    pub tensors: TensorSet,
    /// The pooling a sentence-transformers embedding model declares (`modules.json` with a
    /// Pooling module): `lasttoken` for Qwen3-Embedding, else `mean_tokens`, `cls_token`, …
    /// (the `pooling_mode_*` set in its config). `None` for other models.
    pub pooling: Option<String>,
    /// How long getting it took: `download`, `map` and `repack` (conversion of quantized weights) are filled,
    /// `total` is their sum.
    pub times: LoadTimes,
}

impl Checkpoint {
    /// Loads `spec`: a local directory, a local `.gguf` file, or a Hub id.
    pub fn open(spec: &str, hub: &HubOptions) -> Result<Self> {
        let start = Instant::now();
        let (resolved, download) = resolve_model_timed(spec, hub)?;
        let local = Path::new(spec).exists();
        let mut ckpt = match resolved.kind {
            ModelKind::SafetensorsDir => {
                let name = if local {
                    dir_name(&resolved.dir)
                } else {
                    spec.to_string()
                };
                Self::open_dir(&resolved.dir, name)?
            }
            ModelKind::Gguf(path) => {
                let name = if local {
                    path.file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_else(|| spec.to_string())
                } else {
                    spec.to_string()
                };
                Self::open_gguf(&path, name)?
            }
        };
        // Resolving a cached Hub id (looking in the cache) counts as opening the files.
        let total = start.elapsed();
        ckpt.times.download = download;
        ckpt.times.map = total.saturating_sub(download + ckpt.times.repack);
        ckpt.times.total = total;
        Ok(ckpt)
    }

    /// Loads a Hugging Face checkpoint directory.
    pub fn open_dir(dir: &Path, name: String) -> Result<Self> {
        let start = Instant::now();
        let mut times = LoadTimes::default();
        let config = ModelConfig::from_file(&dir.join("config.json"))?;
        let gen_path = dir.join("generation_config.json");
        let mut generation = if gen_path.exists() {
            GenerationConfig::from_file(&gen_path)?
        } else {
            GenerationConfig::default()
        };
        if generation.eos_token_ids.is_empty() {
            generation.eos_token_ids = config.eos_token_ids.clone();
        }
        let tokenizer = Arc::new(Tokenizer::from_file(dir.join("tokenizer.json"))?);
        let tc = dir.join("tokenizer_config.json");
        let chat_template = if tc.exists() {
            match ChatTemplate::from_tokenizer_config(&tc) {
                Ok(t) => Some(Arc::new(t)),
                Err(e) => {
                    tracing::warn!("no usable chat template: {e}");
                    None
                }
            }
        } else {
            None
        };
        let config_path = dir.join("config.json");
        let config_json: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(&config_path).map_err(|e| Error::io(&config_path, e))?,
        )
        .map_err(|e| Error::json(&config_path, e))?;
        let scheme = super::quantization::scheme_of(&config_json)?;
        let tensors = super::safetensors::load_dir_timed(dir, scheme, &mut times)?;
        let pooling = declared_pooling(dir);
        times.total = start.elapsed();
        times.map = times.total.saturating_sub(times.repack);
        Ok(Checkpoint {
            name,
            config,
            generation,
            tokenizer,
            chat_template,
            tensors,
            pooling,
            times,
        })
    }

    /// Loads a GGUF file: weights, configuration, tokenizer and chat template all come from
    /// the file itself.
    pub fn open_gguf(path: &Path, name: String) -> Result<Self> {
        let start = Instant::now();
        let file = GgufFile::open(path)?;
        let config = file.model_config()?;
        let tensors = file.tensor_set(&config)?;
        let tokenizer = Arc::new(tokenizer_from_gguf(&file)?);
        let chat_template = match file.chat_template() {
            Some(src) => {
                let token = |key: &str| -> Option<String> {
                    let id = file.get_u32(key).ok().flatten()?;
                    tokenizer.id_to_token(id)
                };
                match ChatTemplate::new(
                    src,
                    token("tokenizer.ggml.bos_token_id"),
                    token("tokenizer.ggml.eos_token_id"),
                ) {
                    Ok(t) => Some(Arc::new(t)),
                    Err(e) => {
                        tracing::warn!("no usable chat template: {e}");
                        None
                    }
                }
            }
            None => None,
        };
        let elapsed = start.elapsed();
        let mut eos = config.eos_token_ids.clone();
        // Chat models end turns with their template's end token, which GGUF files do not
        // always list as EOS (Qwen3 GGUFs name <|im_end|>; others name <|endoftext|>).
        for t in ["<|im_end|>", "<|endoftext|>", "<|eot_id|>"] {
            if let Some(id) = tokenizer.token_to_id(t) {
                if !eos.contains(&id) {
                    eos.push(id);
                }
            }
        }
        Ok(Checkpoint {
            name,
            generation: GenerationConfig {
                eos_token_ids: eos,
                ..GenerationConfig::default()
            },
            config,
            tokenizer,
            chat_template,
            tensors,
            pooling: None,
            times: LoadTimes {
                map: elapsed,
                total: elapsed,
                ..LoadTimes::default()
            },
        })
    }

    /// Ids that end generation: the generation config's, else the model config's.
    pub fn eos_token_ids(&self) -> &[u32] {
        &self.generation.eos_token_ids
    }
}

/// The pooling of a sentence-transformers model in `dir`: the Pooling module of
/// `modules.json`, and the `pooling_mode_*` its config sets (`unknown` when it cannot be
/// read). Nothing for a directory without `modules.json` or without a Pooling module.
fn declared_pooling(dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(dir.join("modules.json")).ok()?;
    let modules: serde_json::Value = serde_json::from_str(&text).ok()?;
    let pooling = modules.as_array()?.iter().find(|m| {
        m.get("type")
            .and_then(|t| t.as_str())
            .is_some_and(|t| t.ends_with("models.Pooling"))
    })?;
    let sub = pooling.get("path").and_then(|p| p.as_str()).unwrap_or("");
    // The path comes from a file: stay inside the directory.
    let mode = (!sub.contains("..") && !sub.starts_with('/'))
        .then(|| std::fs::read_to_string(dir.join(sub).join("config.json")).ok())
        .flatten()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|c| {
            c.as_object()?.iter().find_map(|(k, v)| {
                let mode = k.strip_prefix("pooling_mode_")?;
                (v.as_bool() == Some(true)).then(|| mode.to_string())
            })
        });
    Some(mode.unwrap_or_else(|| "unknown".into()))
}

/// The last component of a path, for naming a model loaded from disk.
fn dir_name(p: &Path) -> String {
    p.canonicalize()
        .ok()
        .and_then(|c| c.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| p.display().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_pooling_a_sentence_transformers_model_declares() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        assert_eq!(declared_pooling(d), None);
        let modules = r#"[{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]"#;
        std::fs::write(d.join("modules.json"), modules).unwrap();
        assert_eq!(declared_pooling(d).as_deref(), Some("unknown"));
        std::fs::create_dir(d.join("1_Pooling")).unwrap();
        let config = |mode: &str| {
            format!(
                r#"{{"word_embedding_dimension": 64, "pooling_mode_cls_token": false, "pooling_mode_{mode}": true}}"#
            )
        };
        std::fs::write(d.join("1_Pooling/config.json"), config("lasttoken")).unwrap();
        assert_eq!(declared_pooling(d).as_deref(), Some("lasttoken"));
        std::fs::write(d.join("1_Pooling/config.json"), config("mean_tokens")).unwrap();
        assert_eq!(declared_pooling(d).as_deref(), Some("mean_tokens"));
        // A path leaving the directory is not followed.
        std::fs::write(
            d.join("modules.json"),
            modules.replace("1_Pooling", "../1_Pooling"),
        )
        .unwrap();
        assert_eq!(declared_pooling(d).as_deref(), Some("unknown"));
    }
}
