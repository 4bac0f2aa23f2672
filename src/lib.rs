//! wick runs Qwen3 language models on the CPU (rayon + SIMD) and, through `wgpu`, on GPUs.

pub mod backend;
pub mod bench;
pub mod chat_template;
pub mod config;
pub mod error;
pub mod generate;
pub mod kv_cache;
pub mod loader;
pub mod model;
pub mod quant;
pub mod reasoning;
pub mod runtime;
pub mod sampler;
pub mod session;
pub mod synth;
pub mod tokenizer;
pub mod tokenizer_gguf;

pub use error::{Error, Result};
