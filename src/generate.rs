//! What a generation gives back: the per-token [`TokenEvent`]s a caller's callback sees, the
//! [`Generation`] at the end and its [`FinishReason`]. [`crate::runtime::Runtime::chat`] and
//! [`crate::runtime::Runtime::generate`] produce them from the engine's events; the engine's
//! own per-token pipeline is [`crate::text::reply::Reply`].

use std::time::Duration;

use crate::sampler::TokenLogprobs;
use crate::text::reasoning::Delta;

/// Why generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// An end-of-sequence token, a stop token or a stop string.
    Stop,
    /// `max_tokens` or the context length was reached.
    Length,
    /// The caller cancelled.
    Cancelled,
}

/// One generated token as the caller sees it.
#[derive(Debug)]
pub struct TokenEvent<'a> {
    /// The token id.
    pub id: u32,
    /// Text that became final with this token, split into reasoning and content.
    pub delta: &'a Delta,
    /// Log-probabilities, when requested.
    pub logprobs: Option<&'a TokenLogprobs>,
}

/// The outcome of a request.
#[derive(Clone, Debug, Default)]
pub struct Generation {
    /// Tokens in the prompt.
    pub prompt_tokens: usize,
    /// Prompt tokens whose KV was already cached (not recomputed).
    pub cached_tokens: usize,
    /// Generated ids, including a final end-of-sequence id if one was sampled.
    pub token_ids: Vec<u32>,
    /// The answer.
    pub content: String,
    /// The thinking, if the model produced any.
    pub reasoning: Option<String>,
    /// Why generation ended (`None` only while running).
    pub finish_reason: Option<FinishReason>,
    /// Per-token log-probabilities, when requested.
    pub logprobs: Vec<TokenLogprobs>,
    /// Time to compute the prompt and the first token's logits.
    pub prefill_time: Duration,
    /// Time of the decode steps that followed.
    pub decode_time: Duration,
    /// Decode steps run (forward passes after the prefill).
    pub decode_steps: usize,
}

impl Generation {
    /// Prompt tokens computed per second of prefill.
    pub fn prefill_tok_s(&self) -> f64 {
        let computed = (self.prompt_tokens - self.cached_tokens) as f64;
        computed / self.prefill_time.as_secs_f64().max(1e-9)
    }

    /// Tokens decoded per second (each decode step yields one token).
    pub fn decode_tok_s(&self) -> f64 {
        self.decode_steps as f64 / self.decode_time.as_secs_f64().max(1e-9)
    }
}

/// Whether a rendered prompt leaves a `<think>` block open (the model then starts inside
/// its reasoning).
pub fn prompt_opens_reasoning(prompt: &str) -> bool {
    match (
        prompt.rfind(crate::text::reasoning::THINK_START),
        prompt.rfind(crate::text::reasoning::THINK_END),
    ) {
        (Some(open), Some(close)) => open > close,
        (Some(_), None) => true,
        _ => false,
    }
}
