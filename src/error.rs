//! The library's one error type.
//!
//! Every variant carries the context a user needs to act on it: the path of the file, the
//! name of the tensor, what was expected and what was found. Binaries wrap it in `anyhow`;
//! the library never panics on user input and never returns `anyhow`.

use std::path::PathBuf;

/// Result alias used across the library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong when loading or running a model.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O error while touching a file.
    #[error("{path}: {source}")]
    Io {
        /// The file involved.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A JSON file (config, tokenizer, index) that does not parse or lacks a field.
    #[error("{path}: {message}")]
    Json {
        /// The file involved.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// A weights file that is malformed (bad header, out-of-range offsets, ...).
    #[error("{path}: malformed weights file: {message}")]
    MalformedWeights {
        /// The file involved.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// A tensor the model needs is absent from the checkpoint.
    #[error("tensor `{name}` is missing from the checkpoint")]
    MissingTensor {
        /// The tensor's (Hugging Face) name.
        name: String,
    },
    /// A tensor has the wrong shape.
    #[error("tensor `{name}` has shape {found:?}, expected {expected:?}")]
    ShapeMismatch {
        /// The tensor's name.
        name: String,
        /// The shape the model configuration implies.
        expected: Vec<usize>,
        /// The shape stored in the file.
        found: Vec<usize>,
    },
    /// A tensor is stored in a data type this build cannot use.
    #[error("tensor `{name}` has unsupported data type {dtype}")]
    UnsupportedDType {
        /// The tensor's name.
        name: String,
        /// The data type as the file names it.
        dtype: String,
    },
    /// The model's architecture or configuration is not one wick runs.
    #[error("unsupported model: {0}")]
    UnsupportedModel(String),
    /// A model id could not be resolved or downloaded.
    #[error("could not fetch `{model}`: {message}")]
    Hub {
        /// The Hub id the user gave.
        model: String,
        /// What went wrong.
        message: String,
    },
    /// Tokenizer construction, encoding or decoding failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// The chat template failed to render.
    #[error("chat template: {0}")]
    Template(String),
    /// A request that cannot be served as asked (prompt too long, bad parameter, ...).
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// A request parameter out of its range, naming the parameter
    /// ([`crate::sampler::SamplingParams::validate`]).
    #[error("invalid request: {message}")]
    InvalidParam {
        /// The parameter's name (a [`crate::sampler::SamplingParams`] field).
        param: &'static str,
        /// What is wrong with it, starting with its name.
        message: String,
    },
    /// The prompt does not fit in the model's context.
    #[error("prompt has {prompt_tokens} tokens, but the context holds {max_model_len} (including room for at least one generated token)")]
    PromptTooLong {
        /// Tokens in the prompt.
        prompt_tokens: usize,
        /// The maximum sequence length in tokens.
        max_model_len: usize,
    },
    /// The engine's queue is full; retry later.
    #[error("the server is busy: {waiting} requests are already waiting")]
    Overloaded {
        /// Requests waiting when this one arrived.
        waiting: usize,
    },
    /// The engine is shutting down and takes no new requests.
    #[error("the engine is shutting down")]
    ShuttingDown,
    /// The engine failed while running a request.
    #[error("engine: {0}")]
    Engine(String),
    /// The requested device is not available.
    #[error("device: {0}")]
    Device(String),
    /// The model and the smallest KV cache do not fit in the memory the process may use.
    #[error("out of memory: {0}")]
    OutOfMemory(String),
}

impl Error {
    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    /// A JSON error for `path`.
    pub fn json(path: impl Into<PathBuf>, message: impl std::fmt::Display) -> Self {
        Error::Json {
            path: path.into(),
            message: message.to_string(),
        }
    }
}
