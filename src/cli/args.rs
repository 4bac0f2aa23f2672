//! The options the commands share: how to load a model ([`ModelArgs`]), how big the serving
//! engine is ([`EngineArgs`]), and the quantization mixes ([`QuantArg`]), with the parsers
//! of the values vLLM spells its own way.

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};

use wick::backend::cpu::ActQuant;
use wick::backend::KvDtype;
use wick::convert::scheme::QuantScheme;
use wick::loader::hub::HubOptions;
use wick::runtime::{Device, Runtime, RuntimeOptions};

#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum DeviceArg {
    /// A GPU if usable, else the CPU.
    Auto,
    /// The CPU.
    Cpu,
    /// A GPU, or fail (also spelled `cuda`, as vLLM command lines say).
    #[value(alias = "cuda")]
    Gpu,
}

/// Options every command that loads a model shares. Every one can also be set from the
/// environment (`WICK_` and the flag's name), as containers do.
#[derive(Args)]
pub struct ModelArgs {
    /// A local model directory, a .gguf file (the first part of a split one), a Hub id such as
    /// Qwen/Qwen3-0.6B, or a GGUF repository and quantization such as
    /// Qwen/Qwen3-0.6B-GGUF:Q8_0 (or as --model).
    #[arg(
        value_name = "MODEL",
        required_unless_present = "model",
        conflicts_with = "model"
    )]
    pub(crate) model_pos: Option<String>,
    /// The model, as a flag (vLLM's api_server spelling).
    #[arg(long, short, env = "WICK_MODEL", hide_short_help = true)]
    pub(crate) model: Option<String>,
    /// Where to run.
    #[arg(long, value_enum, default_value = "auto", env = "WICK_DEVICE")]
    pub(crate) device: DeviceArg,
    /// CPU threads (default: one per CPU the process may use: the affinity mask, capped by
    /// the cgroup CPU quota).
    #[arg(long, default_value_t = 0, env = "WICK_THREADS")]
    pub(crate) threads: usize,
    /// Pin to these CPUs (e.g. 0,2-3), as `taskset -c` would; threads default to their
    /// number.
    #[arg(long, env = "WICK_CPUS")]
    pub(crate) cpus: Option<String>,
    /// Never touch the network; use the Hugging Face cache only.
    #[arg(long, env = "WICK_OFFLINE", value_parser = clap::builder::BoolishValueParser::new())]
    pub(crate) offline: bool,
    /// Longest sequence (prompt + reply) to hold in the KV cache: a number of tokens, or
    /// with a suffix as vLLM reads it (8k = 8000, 8K = 8192).
    #[arg(long, default_value = "8192", value_parser = parse_len, env = "WICK_MAX_MODEL_LEN")]
    pub(crate) max_model_len: usize,
    /// Quantize float weights at load: q8_0, q4_0 or q4_k (llama-quantize's Q4_K_M mix).
    #[arg(long, value_enum, env = "WICK_QUANTIZE")]
    pub(crate) quantize: Option<QuantArg>,
    /// GPU adapter: an index or part of a name, as listed by `wick info` (default: the first).
    #[arg(long, env = "WICK_ADAPTER")]
    pub(crate) adapter: Option<String>,
    /// How the KV cache stores keys and values: f16 (half the memory, twice the tokens; also
    /// `auto`) or f32 (exact).
    #[arg(long, default_value = "auto", value_parser = parse_kv_dtype, env = "WICK_KV_CACHE_DTYPE")]
    pub(crate) kv_cache_dtype: KvDtype,
    /// CPU: precision of the activations that meet quantized weights: q8 (8-bit, as
    /// llama.cpp: fastest), q16 (16-bit: within about 1e-4 of f32) or f32 (exact).
    #[arg(long, default_value = "q8", value_parser = parse_act, env = "WICK_ACTIVATIONS")]
    pub(crate) activations: ActQuant,
    /// A chat template to use instead of the model's: a file, or the template itself.
    #[arg(long, env = "WICK_CHAT_TEMPLATE")]
    pub(crate) chat_template: Option<String>,
    /// Hub: the branch, tag or commit to fetch (default: main).
    #[arg(long, env = "WICK_REVISION")]
    pub(crate) revision: Option<String>,
    /// Hub: the cache directory to download to and load from (default: HF_HUB_CACHE, else
    /// ~/.cache/huggingface/hub).
    #[arg(long, env = "WICK_DOWNLOAD_DIR")]
    pub(crate) download_dir: Option<std::path::PathBuf>,
    /// Hub: the access token for gated or private repositories (default: HF_TOKEN, else the
    /// token file).
    #[arg(long, env = "WICK_HF_TOKEN", hide_env_values = true)]
    pub(crate) hf_token: Option<String>,
}

/// A length as vLLM's `--max-model-len` takes it: digits, optionally with a decimal part
/// and a suffix (k, m, g: powers of 1000; K, M, G: powers of 1024).
fn parse_len(s: &str) -> std::result::Result<usize, String> {
    let t = s.trim();
    let (num, mult) = match t.chars().last() {
        Some('k') => (&t[..t.len() - 1], 1e3),
        Some('m') => (&t[..t.len() - 1], 1e6),
        Some('g') => (&t[..t.len() - 1], 1e9),
        Some('K') => (&t[..t.len() - 1], 1024.0),
        Some('M') => (&t[..t.len() - 1], 1024.0 * 1024.0),
        Some('G') => (&t[..t.len() - 1], 1024.0 * 1024.0 * 1024.0),
        _ => (t, 1.0),
    };
    let bad = || {
        format!(
            "`{s}` is not a length: give a number of tokens such as 8192, 8k or 8K \
             (`auto` and -1 are not supported: wick does not size the context from free memory)"
        )
    };
    let x: f64 = num.parse().map_err(|_| bad())?;
    let n = x * mult;
    if !((1.0..=1e9).contains(&n) && n.fract() == 0.0) {
        return Err(bad());
    }
    Ok(n as usize)
}

/// `--kv-cache-dtype` as vLLM spells it: `auto` is f16, the default.
fn parse_kv_dtype(s: &str) -> std::result::Result<KvDtype, String> {
    match s.to_ascii_lowercase().as_str() {
        "auto" | "fp16" => Ok(KvDtype::F16),
        "fp32" => Ok(KvDtype::F32),
        l if l.starts_with("fp8") || l == "bfloat16" || l == "bf16" => Err(format!(
            "wick stores the KV cache as f16 or f32, not {s} (use auto, f16 or f32)"
        )),
        _ => s.parse(),
    }
}

fn parse_act(s: &str) -> std::result::Result<ActQuant, String> {
    ActQuant::parse(s).ok_or_else(|| format!("{s:?} is not one of q8, q16, f32"))
}

impl ModelArgs {
    /// The model, as given positionally or by --model.
    pub(crate) fn model(&self) -> &str {
        self.model_pos
            .as_deref()
            .or(self.model.as_deref())
            .unwrap_or_default()
    }

    pub(crate) fn load(&self) -> Result<Runtime> {
        // Before the CPU threads start: they inherit the mask.
        if let Some(list) = &self.cpus {
            let cpus = wick::resources::parse_cpu_list(list).context("--cpus")?;
            wick::resources::pin(&cpus).context("--cpus")?;
        }
        let opts = RuntimeOptions {
            device: match self.device {
                DeviceArg::Auto => Device::Auto,
                DeviceArg::Cpu => Device::Cpu,
                DeviceArg::Gpu => Device::Gpu,
            },
            threads: self.threads,
            max_model_len: self.max_model_len,
            quantize: self.quantize.map(QuantArg::scheme),
            adapter: self.adapter.clone(),
            kv_dtype: self.kv_cache_dtype,
            cpu_act: self.activations,
            hub: HubOptions {
                offline: self.offline,
                revision: self.revision.clone(),
                cache_dir: self.download_dir.clone(),
                token: self.hf_token.clone(),
                ..HubOptions::default()
            },
            ..RuntimeOptions::default()
        };
        let model = self.model();
        let mut rt = Runtime::load(model, &opts).with_context(|| format!("loading {model}"))?;
        if let Some(t) = &self.chat_template {
            let source = chat_template_source(t)?;
            rt.set_chat_template(&source).context("--chat-template")?;
        }
        eprintln!("wick: {} on {}", rt.name(), rt.device());
        eprintln!("wick: load: {}", rt.load_times());
        Ok(rt)
    }
}

/// `--chat-template`'s value: a file's contents, or the template itself (vLLM reads it the
/// same way).
pub(crate) fn chat_template_source(value: &str) -> Result<String> {
    let path = std::path::Path::new(value);
    if path.is_file() {
        return std::fs::read_to_string(path)
            .with_context(|| format!("--chat-template: reading {}", path.display()));
    }
    anyhow::ensure!(
        value.contains("{{") || value.contains("{%"),
        "--chat-template: `{value}` is neither a file nor a Jinja template"
    );
    Ok(value.to_string())
}

/// Sizes of the serving engine.
#[derive(Args, Clone)]
pub struct EngineArgs {
    /// Most sequences decoding at once.
    #[arg(long, default_value_t = 16, env = "WICK_MAX_NUM_SEQS")]
    pub(crate) max_num_seqs: usize,
    /// Most tokens per forward step (long prompts are prefilled in chunks of this size).
    #[arg(long, default_value_t = 512, env = "WICK_MAX_NUM_BATCHED_TOKENS")]
    pub(crate) max_num_batched_tokens: usize,
    /// KV cache budget in MiB (default 1024, and never less than one max-model-len sequence).
    #[arg(long, env = "WICK_KV_CACHE_MB")]
    pub(crate) kv_cache_mb: Option<usize>,
    /// KV blocks (of 16 tokens) in the cache, whatever --kv-cache-mb says: vLLM's flag, for
    /// testing preemption with a small pool. At least one max-model-len sequence.
    #[arg(long, env = "WICK_NUM_GPU_BLOCKS_OVERRIDE")]
    pub(crate) num_gpu_blocks_override: Option<usize>,
    /// Do not reuse cached KV blocks across requests (also --no-enable-prefix-caching).
    #[arg(
        long,
        alias = "no-enable-prefix-caching",
        overrides_with = "enable_prefix_caching",
        env = "WICK_NO_PREFIX_CACHING",
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub(crate) no_prefix_caching: bool,
    /// Reuse cached KV blocks across requests (the default).
    #[arg(long, overrides_with = "no_prefix_caching", hide_short_help = true)]
    pub(crate) enable_prefix_caching: bool,
}

impl EngineArgs {
    pub(crate) fn options(&self, max_model_len: usize) -> wick::engine::EngineOptions {
        wick::engine::EngineOptions {
            max_num_seqs: self.max_num_seqs,
            max_num_batched_tokens: self.max_num_batched_tokens,
            max_model_len,
            kv_cache_mb: self.kv_cache_mb,
            num_blocks: self.num_gpu_blocks_override,
            enable_prefix_caching: !self.no_prefix_caching,
            ..wick::engine::EngineOptions::default()
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, ValueEnum)]
pub(crate) enum QuantArg {
    #[value(name = "q8_0")]
    Q8_0,
    #[value(name = "q4_0")]
    Q4_0,
    #[value(name = "q4_k_m", alias = "q4_k")]
    Q4KM,
}

impl QuantArg {
    pub(crate) fn scheme(self) -> QuantScheme {
        match self {
            QuantArg::Q8_0 => QuantScheme::Q8_0,
            QuantArg::Q4_0 => QuantScheme::Q4_0,
            QuantArg::Q4KM => QuantScheme::Q4_K_M,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_read_as_vllm_reads_them() {
        for (s, n) in [
            ("8192", 8192),
            ("8k", 8000),
            ("8K", 8192),
            ("25.6k", 25600),
            ("1m", 1_000_000),
        ] {
            assert_eq!(parse_len(s), Ok(n), "{s}");
        }
        for s in ["auto", "-1", "0", "1.5", "k", "NaN", "8q"] {
            assert!(parse_len(s).is_err(), "{s}");
        }
    }

    #[test]
    fn kv_cache_dtypes_as_vllm_spells_them() {
        assert_eq!(parse_kv_dtype("auto"), Ok(KvDtype::F16));
        assert_eq!(parse_kv_dtype("f32"), Ok(KvDtype::F32));
        assert!(parse_kv_dtype("fp8_e4m3")
            .unwrap_err()
            .contains("f16 or f32"));
    }
}
