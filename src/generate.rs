//! The generation loop of one request on one sequence: prefill (reusing the cached prefix),
//! then sample → [`Reply::on_token`] (stop checks, detokenizer, reasoning split), token by
//! token.
//! Requests without penalties or logprobs are sampled by the backend where the logits are
//! ([`Sampler::device_sampling`]; on the GPU one id is read back per token, not `[V]` logits).
//!
//! [`generate`] works on any [`SequenceRunner`] (a [`Session`] on any backend behind a trait
//! object, so the backend is chosen once at the edge). Text reaches the caller through a
//! callback as [`TokenEvent`]s whose reasoning and content deltas are final: stop strings
//! and `<think>` tags split across tokens are held back until decided. The caller can cancel
//! through an [`AtomicBool`] checked before every step.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::backend::{Backend, RowSampling};
use crate::error::{Error, Result};
use crate::reasoning::Delta;
use crate::reply::Reply;
use crate::sampler::{Sampler, SamplingParams, TokenLogprobs};
use crate::session::{Session, WantLogits};
use crate::tokenizer::Tokenizer;

/// What a generation loop needs from a sequence: the object-safe face of [`Session`].
pub trait SequenceRunner: Send {
    /// Tokens whose KV is cached.
    fn cached_tokens(&self) -> &[u32];
    /// Keeps the longest cached prefix of `ids` (never all of it); returns its length.
    fn reuse_prefix(&mut self, ids: &[u32]) -> usize;
    /// Appends `ids` and returns the logits after the last one (`[V]`).
    fn extend_last(&mut self, ids: &[u32], logits: &mut Vec<f32>) -> Result<()>;
    /// Appends `ids`, reporting the logits after every one of them.
    fn extend_all(&mut self, ids: &[u32], on_row: &mut dyn FnMut(usize, &[f32])) -> Result<()>;
    /// Appends `ids` (at least one) and returns the token `params` chooses after the last one,
    /// sampled by the backend where the logits are (on the GPU: one id read back, not `[V]`
    /// logits). The default reads the logits back and samples on the host.
    fn extend_sample(&mut self, ids: &[u32], params: &RowSampling) -> Result<u32> {
        let mut logits = Vec::new();
        self.extend_last(ids, &mut logits)?;
        Ok(crate::backend::sample::sample_row(
            &logits,
            params,
            &mut Vec::new(),
        ))
    }
    /// Forgets the cache.
    fn reset(&mut self);
    /// The longest sequence it holds.
    fn max_model_len(&self) -> usize;
}

impl<B: Backend> SequenceRunner for Session<B> {
    fn cached_tokens(&self) -> &[u32] {
        self.tokens()
    }
    fn reuse_prefix(&mut self, ids: &[u32]) -> usize {
        Session::reuse_prefix(self, ids)
    }
    fn extend_last(&mut self, ids: &[u32], logits: &mut Vec<f32>) -> Result<()> {
        self.extend(ids, WantLogits::Last, |_, row| {
            logits.clear();
            logits.extend_from_slice(row);
        })
    }
    fn extend_all(&mut self, ids: &[u32], on_row: &mut dyn FnMut(usize, &[f32])) -> Result<()> {
        self.extend(ids, WantLogits::All, on_row)
    }
    fn extend_sample(&mut self, ids: &[u32], params: &RowSampling) -> Result<u32> {
        Session::extend_sample(self, ids, params)
    }
    fn reset(&mut self) {
        Session::reset(self)
    }
    fn max_model_len(&self) -> usize {
        Session::max_model_len(self)
    }
}

/// One generation request on token ids.
#[derive(Clone, Debug)]
pub struct GenerateRequest {
    /// The prompt, already rendered and tokenized.
    pub prompt_ids: Vec<u32>,
    /// Sampling and stopping.
    pub params: SamplingParams,
    /// The model's end-of-sequence ids (stop unless `params.ignore_eos`).
    pub eos_token_ids: Vec<u32>,
    /// The prompt ends inside an open `<think>`: the first generated text is reasoning.
    pub start_in_reasoning: bool,
}

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
        prompt.rfind(crate::reasoning::THINK_START),
        prompt.rfind(crate::reasoning::THINK_END),
    ) {
        (Some(open), Some(close)) => open > close,
        (Some(_), None) => true,
        _ => false,
    }
}

/// Runs `req` on `runner`, reusing whatever prefix of the prompt is already cached, and
/// reports each token through `on_token`.
pub fn generate(
    runner: &mut dyn SequenceRunner,
    tokenizer: &Arc<Tokenizer>,
    req: &GenerateRequest,
    cancel: &AtomicBool,
    on_token: &mut dyn FnMut(&TokenEvent<'_>),
) -> Result<Generation> {
    req.params.validate()?;
    let prompt = &req.prompt_ids;
    if prompt.is_empty() {
        return Err(Error::InvalidRequest("the prompt is empty".into()));
    }
    let max_len = runner.max_model_len();
    if prompt.len() >= max_len {
        return Err(Error::PromptTooLong {
            prompt_tokens: prompt.len(),
            max_model_len: max_len,
        });
    }
    let max_new = req
        .params
        .max_tokens
        .unwrap_or(usize::MAX)
        .min(max_len - prompt.len());
    let mut out = Generation {
        prompt_tokens: prompt.len(),
        ..Default::default()
    };
    let mut sampler = Sampler::new(&req.params, prompt);
    let mut reply = Reply::new(
        tokenizer,
        &req.params,
        &req.eos_token_ids,
        req.start_in_reasoning,
        max_new,
    );

    // Appends `ids` and chooses the next token: where the logits are when the backend can
    // sample this request, otherwise on the host from the logits read back.
    let mut logits = Vec::new();
    let mut step = |runner: &mut dyn SequenceRunner,
                    ids: &[u32],
                    sampler: &mut Sampler|
     -> Result<(u32, Option<TokenLogprobs>)> {
        match sampler.device_sampling() {
            Some(row) => Ok((runner.extend_sample(ids, &row)?, None)),
            None => {
                runner.extend_last(ids, &mut logits)?;
                Ok(sampler.sample_with_logprobs(&mut logits))
            }
        }
    };

    let t0 = Instant::now();
    out.cached_tokens = runner.reuse_prefix(prompt);
    let mut next = step(runner, &prompt[out.cached_tokens..], &mut sampler)?;
    out.prefill_time = t0.elapsed();
    let t1 = Instant::now();

    let reason = loop {
        if cancel.load(Ordering::Relaxed) {
            break FinishReason::Cancelled;
        }
        let (id, lp) = next;
        sampler.accept(id);
        let outcome = reply.on_token(id, lp.clone())?;
        if let Some(delta) = &outcome.delta {
            on_token(&TokenEvent {
                id,
                delta,
                logprobs: lp.as_ref(),
            });
        }
        if let Some(reason) = outcome.finish {
            break reason;
        }
        next = step(runner, &[id], &mut sampler)?;
        out.decode_steps += 1;
    };
    let delta = reply.finish();
    if !delta.is_empty() {
        on_token(&TokenEvent {
            id: *reply.token_ids().last().unwrap_or(&0),
            delta: &delta,
            logprobs: None,
        });
    }
    out.decode_time = t1.elapsed();
    out.finish_reason = Some(reason);
    let parts = reply.into_parts();
    out.token_ids = parts.token_ids;
    out.content = parts.content;
    out.reasoning = parts.reasoning;
    out.logprobs = parts.logprobs;
    Ok(out)
}
