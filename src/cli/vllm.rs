//! vLLM's command-line flags that `wick serve` takes so that a deployment guide's
//! `vllm serve` (or `python -m vllm.entrypoints.openai.api_server`) line runs with the
//! program name replaced.
//!
//! The flags vLLM and wick share by meaning (`--max-model-len`, `--max-num-seqs`,
//! `--served-model-name`, `--kv-cache-dtype`, `--chat-template`, ...) live with the rest of
//! `wick serve`'s options. This module holds the others: flags that choose something wick
//! decides by itself (the reasoning and tool-call parsers, the weights' dtype), flags that
//! tune machinery wick does not have (CUDA graphs, Ray, uvicorn) and flags that ask for
//! something wick cannot do. [`VllmArgs::apply`] turns each into one of three outcomes: it is
//! honoured (`--quantization fp8` quantizes at load), accepted with a one-line notice on
//! stderr saying why nothing changes, or refused with an error saying why — never silently
//! ignored. Unknown flags are clap's errors.

use anyhow::{bail, Result};
use clap::Args;

use crate::QuantArg;

/// vLLM flags without a wick counterpart of the same name.
#[derive(Args, Default)]
#[command(next_help_heading = "vLLM compatibility (see the README's table)")]
pub struct VllmArgs {
    /// Weights' dtype: auto, half, float16, bfloat16, float or float32. wick keeps weights
    /// as stored (or --quantization's) and picks the compute precision per backend.
    #[arg(long, env = "WICK_DTYPE")]
    dtype: Option<String>,
    /// Quantize at load: fp8 (to Q8_0: 8-bit weights with a scale per 32), q8_0, q4_0,
    /// q4_k; gguf is accepted (the file says). AWQ, GPTQ and bitsandbytes are refused.
    #[arg(long, short = 'q', env = "WICK_QUANTIZATION")]
    quantization: Option<String>,
    /// qwen3 or deepseek_r1: wick always splits `<think>` blocks into the reasoning field.
    #[arg(long, env = "WICK_REASONING_PARSER")]
    reasoning_parser: Option<String>,
    /// Accepted: wick parses tool calls whenever a request has tools.
    #[arg(long, env = "WICK_ENABLE_AUTO_TOOL_CHOICE", value_parser = clap::builder::BoolishValueParser::new())]
    enable_auto_tool_choice: bool,
    /// hermes (Qwen3's `<tool_call>` blocks, which wick parses); others are refused.
    #[arg(long, env = "WICK_TOOL_CALL_PARSER")]
    tool_call_parser: Option<String>,
    /// 1 only: wick runs a model on one device.
    #[arg(long, env = "WICK_TENSOR_PARALLEL_SIZE")]
    tensor_parallel_size: Option<usize>,
    /// 1 only: wick runs a model on one device.
    #[arg(long, env = "WICK_PIPELINE_PARALLEL_SIZE")]
    pipeline_parallel_size: Option<usize>,
    /// 1 only: run several wick servers behind a load balancer instead.
    #[arg(long, env = "WICK_DATA_PARALLEL_SIZE")]
    data_parallel_size: Option<usize>,
    /// Accepted: wick has no CUDA graphs to turn off.
    #[arg(long, env = "WICK_ENFORCE_EAGER", value_parser = clap::builder::BoolishValueParser::new())]
    enforce_eager: bool,
    /// Accepted: wick logs through RUST_LOG (e.g. RUST_LOG=wick=info).
    #[arg(long, env = "WICK_UVICORN_LOG_LEVEL")]
    uvicorn_log_level: Option<String>,
    /// Accepted: wick does not log requests.
    #[arg(long, env = "WICK_DISABLE_LOG_REQUESTS", value_parser = clap::builder::BoolishValueParser::new())]
    disable_log_requests: bool,
    /// Print no periodic statistics line (see --log-stats-interval).
    #[arg(long, env = "WICK_DISABLE_LOG_STATS", value_parser = clap::builder::BoolishValueParser::new())]
    pub disable_log_stats: bool,
    /// Accepted: wick runs no code from model repositories.
    #[arg(long, env = "WICK_TRUST_REMOTE_CODE", value_parser = clap::builder::BoolishValueParser::new())]
    trust_remote_code: bool,
    /// Accepted: wick does not swap KV blocks to the host; it preempts and recomputes.
    #[arg(long, env = "WICK_SWAP_SPACE")]
    swap_space: Option<f64>,
    /// 0 only: wick does not offload weights.
    #[arg(long, env = "WICK_CPU_OFFLOAD_GB")]
    cpu_offload_gb: Option<f64>,
    /// Accepted: wick's KV blocks have a fixed size.
    #[arg(long, env = "WICK_BLOCK_SIZE")]
    block_size: Option<usize>,
    /// Accepted: wick has no CUDA graphs.
    #[arg(long, env = "WICK_MAX_SEQ_LEN_TO_CAPTURE")]
    max_seq_len_to_capture: Option<usize>,
    /// auto, safetensors or gguf: wick reads the format from the files.
    #[arg(long, env = "WICK_LOAD_FORMAT")]
    load_format: Option<String>,
    /// Only the model itself: wick reads the tokenizer from the model's files.
    #[arg(long, env = "WICK_TOKENIZER")]
    tokenizer: Option<String>,
    /// auto or hf: wick uses the Hugging Face tokenizers library either way.
    #[arg(long, env = "WICK_TOKENIZER_MODE")]
    tokenizer_mode: Option<String>,
    /// Accepted: wick always prefills long prompts in chunks of --max-num-batched-tokens.
    #[arg(long, env = "WICK_ENABLE_CHUNKED_PREFILL", value_parser = clap::builder::BoolishValueParser::new())]
    enable_chunked_prefill: bool,
    /// Accepted: wick's limit is 20 top logprobs per token.
    #[arg(long, env = "WICK_MAX_LOGPROBS")]
    max_logprobs: Option<usize>,
    /// Accepted: wick serves from one process.
    #[arg(long, env = "WICK_DISABLE_FRONTEND_MULTIPROCESSING", value_parser = clap::builder::BoolishValueParser::new())]
    disable_frontend_multiprocessing: bool,
    /// Refused: wick serves plain HTTP; put a TLS-terminating proxy in front.
    #[arg(long, env = "WICK_SSL_KEYFILE")]
    ssl_keyfile: Option<String>,
    /// Refused: wick serves plain HTTP; put a TLS-terminating proxy in front.
    #[arg(long, env = "WICK_SSL_CERTFILE")]
    ssl_certfile: Option<String>,
    /// Refused: wick does not serve LoRA adapters.
    #[arg(long, env = "WICK_ENABLE_LORA", value_parser = clap::builder::BoolishValueParser::new())]
    enable_lora: bool,
    /// Refused: wick does not do speculative decoding.
    #[arg(long, env = "WICK_SPECULATIVE_CONFIG")]
    speculative_config: Option<String>,
}

/// What the vLLM flags change in wick's own settings.
#[derive(Default, Debug, PartialEq)]
pub struct Applied {
    /// Load-time quantization chosen by `--quantization`.
    pub quantize: Option<QuantArg>,
    /// One line per flag accepted without effect.
    pub notices: Vec<String>,
}

impl VllmArgs {
    /// Checks every flag given: what it changes, a notice for each accepted without effect,
    /// an error for the first that cannot be honoured. `model` is the model as given (for
    /// `--tokenizer`).
    pub fn apply(&self, model: &str) -> Result<Applied> {
        let mut out = Applied::default();
        let mut note = |flag: &str, why: &str| out.notices.push(format!("{flag}: {why}"));

        if let Some(d) = &self.dtype {
            match d.to_ascii_lowercase().as_str() {
                "auto" => {}
                "half" | "float16" | "bfloat16" | "float" | "float32" => note(
                    &format!("--dtype {d}"),
                    "accepted; wick keeps weights as stored (or as --quantization makes them) \
                     and computes in f32 on the CPU, f32 with f16 storage on the GPU",
                ),
                _ => bail!("--dtype {d}: expected auto, half, float16, bfloat16, float or float32"),
            }
        }
        if let Some(q) = &self.quantization {
            out.quantize = match q.to_ascii_lowercase().as_str() {
                "fp8" => {
                    note(
                        "--quantization fp8",
                        "quantizing float weights to Q8_0 at load (8-bit, a scale per 32 \
                         weights: wick's 8-bit format)",
                    );
                    Some(QuantArg::Q8_0)
                }
                "q8_0" => Some(QuantArg::Q8_0),
                "q4_0" => Some(QuantArg::Q4_0),
                "q4_k" | "q4_k_m" => Some(QuantArg::Q4KM),
                "gguf" | "none" => None,
                m @ ("gptq" | "gptq_marlin" | "awq" | "awq_marlin" | "compressed-tensors") => {
                    note(
                        &format!("--quantization {m}"),
                        "accepted; the checkpoint's quantization_config says how its weights \
                         are read (GPTQ, AWQ and compressed-tensors load as stored)",
                    );
                    None
                }
                other => bail!(
                    "--quantization {other}: not supported by wick (it loads float, FP8, \
                     GPTQ, AWQ and compressed-tensors safetensors and GGUF files, and \
                     quantizes at load with fp8, q8_0, q4_0 or q4_k); use a GGUF build of the \
                     model instead"
                ),
            };
        }
        if let Some(p) = &self.reasoning_parser {
            match p.as_str() {
                "qwen3" | "deepseek_r1" => {}
                other => bail!(
                    "--reasoning-parser {other}: wick splits Qwen3's <think> blocks (qwen3 or \
                     deepseek_r1), nothing else"
                ),
            }
        }
        if let Some(p) = &self.tool_call_parser {
            if p != "hermes" {
                bail!(
                    "--tool-call-parser {p}: Qwen3 writes Hermes-style <tool_call> blocks, \
                     which is the one format wick parses (use hermes)"
                );
            }
        }
        for (flag, n) in [
            ("--tensor-parallel-size", self.tensor_parallel_size),
            ("--pipeline-parallel-size", self.pipeline_parallel_size),
        ] {
            match n {
                None | Some(1) => {}
                Some(n) => bail!(
                    "{flag} {n}: wick runs a model on one device (a small model fits on one); \
                     use 1"
                ),
            }
        }
        match self.data_parallel_size {
            None | Some(1) => {}
            Some(n) => bail!(
                "--data-parallel-size {n}: one wick server runs one engine; run {n} servers \
                 behind a load balancer instead"
            ),
        }
        if let Some(g) = self.cpu_offload_gb {
            if g != 0.0 {
                bail!(
                    "--cpu-offload-gb {g}: wick does not offload weights (use 0 or --device cpu)"
                );
            }
        }
        if self.ssl_keyfile.is_some() || self.ssl_certfile.is_some() {
            bail!(
                "--ssl-keyfile/--ssl-certfile: wick serves plain HTTP; put a TLS-terminating \
                 proxy (nginx, caddy) in front"
            );
        }
        if self.enable_lora {
            bail!("--enable-lora: wick does not serve LoRA adapters; merge the adapter first");
        }
        if self.speculative_config.is_some() {
            bail!("--speculative-config: wick does not do speculative decoding");
        }
        if let Some(f) = &self.load_format {
            match f.as_str() {
                "auto" | "safetensors" | "gguf" => {}
                other => bail!(
                    "--load-format {other}: wick reads safetensors and GGUF (auto, \
                     safetensors, gguf)"
                ),
            }
        }
        if let Some(t) = &self.tokenizer {
            if t != model {
                bail!(
                    "--tokenizer {t}: wick reads the tokenizer from the model's own files; \
                     only the model itself is accepted"
                );
            }
        }
        if let Some(m) = &self.tokenizer_mode {
            match m.as_str() {
                "auto" | "hf" | "slow" => {}
                other => bail!("--tokenizer-mode {other}: expected auto, hf or slow"),
            }
        }

        // Flags accepted without effect, each with why nothing changes.
        let accepted = [
            (
                self.tensor_parallel_size.is_some(),
                "--tensor-parallel-size 1",
                "accepted; wick runs on one device",
            ),
            (
                self.pipeline_parallel_size.is_some(),
                "--pipeline-parallel-size 1",
                "accepted; wick runs on one device",
            ),
            (
                self.data_parallel_size.is_some(),
                "--data-parallel-size 1",
                "accepted; one server runs one engine",
            ),
            (
                self.enforce_eager,
                "--enforce-eager",
                "accepted; wick has no CUDA graphs to turn off",
            ),
            (
                self.uvicorn_log_level.is_some(),
                "--uvicorn-log-level",
                "accepted; set RUST_LOG (e.g. RUST_LOG=wick=info) for wick's logs",
            ),
            (
                self.disable_log_requests,
                "--disable-log-requests",
                "accepted; wick does not log requests",
            ),
            (
                self.trust_remote_code,
                "--trust-remote-code",
                "accepted; wick runs no code from model repositories",
            ),
            (
                self.swap_space.is_some(),
                "--swap-space",
                "accepted; wick preempts and recomputes instead of swapping KV blocks",
            ),
            (
                self.cpu_offload_gb.is_some(),
                "--cpu-offload-gb 0",
                "accepted; wick does not offload weights",
            ),
            (
                self.block_size.is_some(),
                "--block-size",
                "accepted; wick's KV blocks have a fixed size of 16 tokens",
            ),
            (
                self.max_seq_len_to_capture.is_some(),
                "--max-seq-len-to-capture",
                "accepted; wick has no CUDA graphs",
            ),
            (
                self.enable_chunked_prefill,
                "--enable-chunked-prefill",
                "accepted; wick always prefills in chunks of --max-num-batched-tokens",
            ),
            (
                self.max_logprobs.is_some(),
                "--max-logprobs",
                "accepted; wick returns at most 20 top logprobs per token",
            ),
            (
                self.disable_frontend_multiprocessing,
                "--disable-frontend-multiprocessing",
                "accepted; wick serves from one process",
            ),
            (
                self.enable_auto_tool_choice,
                "--enable-auto-tool-choice",
                "accepted; wick parses tool calls whenever a request has tools",
            ),
        ];
        for (given, flag, why) in accepted {
            if given {
                note(flag, why);
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        v: VllmArgs,
    }

    fn apply(args: &[&str]) -> Result<Applied> {
        let cli = Cli::try_parse_from(std::iter::once("wick").chain(args.iter().copied()))?;
        cli.v.apply("Qwen/Qwen3-0.6B")
    }

    #[test]
    fn a_guides_flags_are_accepted_each_with_a_notice() {
        let a = apply(&[
            "--tensor-parallel-size",
            "1",
            "--dtype",
            "half",
            "--enforce-eager",
            "--uvicorn-log-level",
            "warning",
            "--disable-log-requests",
            "--trust-remote-code",
        ])
        .unwrap();
        assert_eq!(a.quantize, None);
        assert_eq!(a.notices.len(), 6, "{:?}", a.notices);
        for flag in ["--tensor-parallel-size", "--dtype half", "--enforce-eager"] {
            assert!(a.notices.iter().any(|n| n.starts_with(flag)), "{flag}");
        }
    }

    #[test]
    fn honoured_flags_change_settings() {
        assert_eq!(
            apply(&["--quantization", "fp8"]).unwrap().quantize,
            Some(QuantArg::Q8_0)
        );
        assert_eq!(
            apply(&["-q", "q4_k"]).unwrap().quantize,
            Some(QuantArg::Q4KM)
        );
        let a = apply(&[
            "--reasoning-parser",
            "qwen3",
            "--tool-call-parser",
            "hermes",
            "--tokenizer",
            "Qwen/Qwen3-0.6B",
            "--dtype",
            "auto",
        ])
        .unwrap();
        assert!(a.notices.is_empty(), "{:?}", a.notices);
    }

    #[test]
    fn what_cannot_be_honoured_is_refused_with_the_reason() {
        for (args, says) in [
            (&["--tensor-parallel-size", "2"][..], "one device"),
            (&["--pipeline-parallel-size", "2"][..], "one device"),
            (&["--data-parallel-size", "2"][..], "load balancer"),
            (&["--quantization", "bitsandbytes"][..], "not supported"),
            (&["--reasoning-parser", "granite"][..], "qwen3"),
            (&["--tool-call-parser", "mistral"][..], "hermes"),
            (&["--ssl-keyfile", "k.pem"][..], "TLS"),
            (&["--enable-lora"][..], "LoRA"),
            (&["--dtype", "int3"][..], "expected"),
            (&["--cpu-offload-gb", "4"][..], "offload"),
            (&["--tokenizer", "other/tok"][..], "tokenizer"),
        ] {
            let e = apply(args).unwrap_err().to_string();
            assert!(e.contains(says), "{args:?}: {e}");
        }
    }
}
