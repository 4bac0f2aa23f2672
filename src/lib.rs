//! wick runs Qwen3 language models on the CPU (rayon + SIMD) and, through `wgpu`, on GPUs.
//!
//! The principal types, from the outside in:
//!
//! - [`runtime::Runtime`]: load a model (a local directory, a `.gguf` file or a Hub id) on a
//!   device, then [`chat`](runtime::Runtime::chat) or [`generate`](runtime::Runtime::generate)
//!   with a streaming callback; both run on an engine of one sequence, whose prefix cache
//!   keeps a conversation's earlier turns.
//! - [`engine::Engine`]: the one path from request to token — many requests on one model at
//!   once, continuous batching over a paged KV cache with prefix caching, on its own thread,
//!   answered through streams ([`runtime::Runtime::start_engine`]).
//! - [`loader::checkpoint::Checkpoint`]: configuration, tokenizer, chat template and
//!   memory-mapped weights as found on disk.
//! - [`model::Model`]: the forward pass, written once over the [`backend::Backend`] trait and
//!   run by [`backend::cpu::CpuBackend`] or [`backend::wgpu::WgpuBackend`].
//! - [`text::reply::Reply`]: one reply's per-token pipeline (stop conditions, detokenizer,
//!   reasoning/content split).
//! - [`session::Session`]: one sequence driven directly, for tools that need every row's
//!   logits (perplexity, benchmarks); its blocks and batches are the engine's.
//!
//! ```no_run
//! use std::sync::atomic::AtomicBool;
//! use wick::runtime::{Runtime, RuntimeOptions};
//!
//! # fn main() -> wick::Result<()> {
//! let mut rt = Runtime::load("Qwen/Qwen3-0.6B", &RuntimeOptions::default())?;
//! let messages = vec![serde_json::json!({"role": "user", "content": "Name three rivers."})];
//! let mut opts = rt.chat_options();
//! opts.enable_thinking = false;
//! let reply = rt.chat(&messages, &opts, &AtomicBool::new(false), &mut |ev| {
//!     print!("{}", ev.delta.content);
//! })?;
//! assert!(reply.reasoning.is_none());
//! # Ok(())
//! # }
//! ```

pub mod backend;
pub mod bench;
pub mod config;
pub mod convert;
pub mod engine;
pub mod error;
pub mod generate;
pub mod grammar;
pub mod loader;
pub mod model;
pub mod perplexity;
pub mod quant;
pub mod resources;
pub mod runtime;
pub mod sampler;
#[cfg(feature = "server")]
pub mod server;
pub mod session;
pub mod synth;
pub mod text;

pub use error::{Error, Result};
