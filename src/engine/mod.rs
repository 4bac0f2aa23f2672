//! The serving engine: many requests on one model, batched continuously over a paged KV
//! cache with prefix reuse. The server and the chat CLI run on it.
//!
//! ```text
//!  callers ──submit──▶ Engine ──commands──▶ engine thread (owns model, KV cache, scheduler)
//!     ▲                                          │ every step:
//!     │                                          │  1. scheduler hands out {request: tokens}
//!     └──── RequestStream ◀── EngineEvents ──────│  2. one forward pass over all of them
//!                                                │  3. sample, detokenize, split reasoning
//! ```
//!
//! - [`kv_manager`]: the block pool of the paged KV cache, with content-addressed full blocks
//!   (hash of the parent block's hash and the block's tokens), reference counts and an LRU of
//!   cached blocks that no sequence holds.
//! - [`scheduler`]: vLLM-v1-style scheduling without prefill or decode phases: each step gives
//!   every running sequence the tokens it still needs (one when decoding, a chunk of the prompt
//!   when prefilling) under a token budget and a sequence cap, admits waiting requests in FIFO
//!   order, and preempts the newest sequence (to be recomputed later) when blocks run out.
//! - [`worker`]: the loop on the engine thread: builds the [`crate::backend::Batch`], runs
//!   [`crate::model::Model::forward`], samples, and turns tokens into [`EngineEvent`]s.
//! - [`metrics`]: counters, gauges and latency histograms the server exports.
//! - [`embed`]: embedding requests, for an engine started with [`Task::Embed`]: prefill
//!   only, the last token's final hidden state L2-normalized ([`Engine::embed`]).
//!
//! A request is submitted with [`Engine::submit`] and answered through a [`RequestStream`],
//! which works both from async code ([`RequestStream::next`]) and from plain threads
//! ([`RequestStream::blocking_next`]). Dropping the stream, or [`RequestStream::cancel`],
//! frees the request's blocks at the next step.
//!
//! Multi-turn chats reuse the KV cache through the prefix cache. Qwen3's template renders
//! earlier turns identically except the previous answer, whose reasoning it drops; so after
//! a chat reply the engine also computes (when idle) the conversation as the template will
//! render it next turn and leaves those blocks in the prefix cache: the next turn then
//! prefills only the new user message.

pub mod bench;
pub mod embed;
pub mod kv_manager;
pub mod metrics;
pub mod scheduler;
pub mod worker;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use serde_json::Value;
use tokio::sync::mpsc;

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::generate::{prompt_opens_reasoning, FinishReason};
use crate::grammar::{Constraint, Grammars, ReplyStart};
use crate::model::Model;
use crate::sampler::{SamplingParams, TokenLogprobs};
use crate::text::chat_template::{ChatTemplate, RenderOptions};
use crate::text::tokenizer::Tokenizer;

pub use embed::{Embedding, EmbeddingHandle, Task};
pub use metrics::{Histogram, Metrics, MetricsSnapshot};

/// The KV cache budget in MiB when none is given.
pub const DEFAULT_KV_CACHE_MB: usize = 1024;

/// Sizes and policies of an [`Engine`].
#[derive(Clone, Debug)]
pub struct EngineOptions {
    /// Most sequences in one step (`--max-num-seqs`).
    pub max_num_seqs: usize,
    /// Most tokens in one step (`--max-num-batched-tokens`): the prefill chunk size.
    pub max_num_batched_tokens: usize,
    /// Longest sequence (prompt + reply); capped by the model's own.
    pub max_model_len: usize,
    /// Tokens per KV block.
    pub block_size: usize,
    /// KV cache budget in MiB (`--kv-cache-mb`). `None`: [`DEFAULT_KV_CACHE_MB`], but always
    /// room for at least one sequence of `max_model_len` tokens.
    pub kv_cache_mb: Option<usize>,
    /// Exact number of KV blocks, overriding `kv_cache_mb` (for tests and tuning).
    pub num_blocks: Option<usize>,
    /// Most requests waiting for admission; more are refused with [`Error::Overloaded`].
    /// `None`: unbounded.
    pub max_waiting: Option<usize>,
    /// Reuse cached KV blocks across requests.
    pub enable_prefix_caching: bool,
    /// After a chat reply, also cache the conversation as the template renders it next turn.
    pub cache_replies: bool,
    /// Generate text, or compute embeddings (`--task`).
    pub task: Task,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            max_num_seqs: 16,
            max_num_batched_tokens: 512,
            max_model_len: 8192,
            block_size: kv_manager::DEFAULT_BLOCK_SIZE,
            kv_cache_mb: None,
            num_blocks: None,
            max_waiting: None,
            enable_prefix_caching: true,
            cache_replies: true,
            task: Task::Generate,
        }
    }
}

/// What to run the model on.
#[derive(Clone, Debug)]
pub enum Prompt {
    /// Token ids, used as given.
    Ids(Vec<u32>),
    /// Raw text, tokenized with the tokenizer's special tokens (BOS where the model has one).
    Text(String),
    /// A conversation, rendered with the model's chat template.
    Chat {
        /// OpenAI-style messages.
        messages: Vec<Value>,
        /// Thinking switch, tools and other template variables.
        render: RenderOptions,
    },
}

/// A prompt rendered, tokenized and checked by [`Engine::prepare`].
#[derive(Clone, Debug)]
pub struct Prepared {
    ids: Vec<u32>,
    /// The prompt leaves a `<think>` block open: the reply starts in the reasoning.
    pub start_in_reasoning: bool,
    /// Where the reply begins (for a grammar, which holds after the reasoning).
    reply_start: ReplyStart,
    chat: Option<(Vec<Value>, RenderOptions)>,
}

impl Prepared {
    /// The prompt's token ids.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }
}

/// One request to the engine.
#[derive(Clone, Debug)]
pub struct Request {
    /// The prompt.
    pub prompt: Prompt,
    /// Sampling, stopping and logprobs.
    pub params: SamplingParams,
}

/// Token counts of a request, as OpenAI's `usage` reports them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Usage {
    /// Tokens in the prompt.
    pub prompt_tokens: usize,
    /// Tokens generated (an end-of-sequence token counts).
    pub completion_tokens: usize,
    /// Prompt tokens whose KV came from the prefix cache instead of being computed.
    pub cached_tokens: usize,
}

/// The end of a request.
#[derive(Clone, Debug)]
pub struct Completion {
    /// Why it ended.
    pub finish_reason: FinishReason,
    /// Token counts.
    pub usage: Usage,
    /// Every generated id.
    pub token_ids: Vec<u32>,
    /// The whole answer.
    pub content: String,
    /// The whole reasoning, if any.
    pub reasoning: Option<String>,
    /// Time from submission to the first generated token.
    pub time_to_first_token: Duration,
    /// Time from submission to the end.
    pub total_time: Duration,
    /// Times the request was preempted and recomputed.
    pub preemptions: usize,
    /// Log-probabilities of every generated token (a final stop id's included), when
    /// requested.
    pub logprobs: Vec<TokenLogprobs>,
}

/// What a [`RequestStream`] yields.
#[derive(Clone, Debug)]
pub enum EngineEvent {
    /// New tokens and the text that became final with them (stop strings and `<think>` tags
    /// split across tokens are held back until decided). Either text may be empty.
    Delta {
        /// Ids generated since the last delta.
        token_ids: Vec<u32>,
        /// New reasoning text.
        reasoning: String,
        /// New answer text.
        content: String,
        /// Log-probabilities of `token_ids`, when requested.
        logprobs: Vec<TokenLogprobs>,
    },
    /// The request ended; nothing follows.
    Finished(Completion),
    /// The request failed (the engine stopped, or an internal error); nothing follows.
    Error(String),
}

/// Model-independent facts about a running engine.
#[derive(Clone, Debug)]
pub struct EngineInfo {
    /// Longest sequence (prompt + reply).
    pub max_model_len: usize,
    /// KV blocks in the pool.
    pub num_blocks: usize,
    /// Tokens per block.
    pub block_size: usize,
    /// Most sequences per step.
    pub max_num_seqs: usize,
    /// What the model runs on.
    pub device: String,
    /// How the KV cache stores keys and values.
    pub kv_dtype: crate::backend::KvDtype,
    /// Bytes of the KV pool (every layer's K and V).
    pub kv_bytes: usize,
    /// Token ids the model can take: the embedding's rows, or fewer if the tokenizer has
    /// fewer entries (fine-tunes often add tokens to one and not the other).
    pub vocab_size: usize,
    /// What the engine's requests ask of the model.
    pub task: Task,
    /// C: the width of the model's hidden states (and of its embeddings).
    pub hidden_size: usize,
}

/// A prompt after rendering and tokenization, ready for the engine thread.
#[derive(Debug)]
pub(crate) struct Admitted {
    pub id: u64,
    pub prompt_ids: Vec<u32>,
    pub params: SamplingParams,
    pub eos_token_ids: Vec<u32>,
    pub start_in_reasoning: bool,
    /// The compiled grammar, when the request has one.
    pub constraint: Option<Constraint>,
    /// For chat prompts: the token ids of the conversation as the next turn will render it
    /// is computed after the reply (the messages and render options are kept for that).
    pub chat: Option<(Vec<Value>, RenderOptions)>,
    pub events: mpsc::UnboundedSender<EngineEvent>,
    pub cancelled: Arc<AtomicBool>,
    pub submitted: std::time::Instant,
}

/// Messages to the engine thread.
pub(crate) enum Command {
    Add(Box<Admitted>),
    Embed(Box<embed::EmbedAdmitted>),
    /// Stop accepting; finish what runs, then exit.
    Shutdown,
}

/// The text side of a model: what the engine needs besides the weights.
#[derive(Clone)]
pub struct TextModel {
    /// The tokenizer.
    pub tokenizer: Arc<Tokenizer>,
    /// The chat template, if the model has one.
    pub chat_template: Option<Arc<ChatTemplate>>,
    /// End-of-sequence ids.
    pub eos_token_ids: Vec<u32>,
}

impl TextModel {
    /// Renders a chat with the model's template.
    pub fn render_chat(&self, messages: &[Value], opts: &RenderOptions) -> Result<String> {
        let t = self.chat_template.as_ref().ok_or_else(|| {
            Error::Template("the model has no chat template; use a raw prompt".into())
        })?;
        t.render(messages, opts)
    }

    /// Renders and tokenizes a prompt, returning its ids and whether it leaves a `<think>`
    /// block open.
    pub fn tokenize_prompt(&self, prompt: &Prompt) -> Result<(Vec<u32>, bool)> {
        let (ids, start) = self.tokenize_with_start(prompt)?;
        Ok((ids, start == ReplyStart::InReasoning))
    }

    /// Renders and tokenizes a prompt, returning its ids and where its reply begins: inside
    /// an open `<think>` block, after a closed one (thinking off), or free to open one.
    fn tokenize_with_start(&self, prompt: &Prompt) -> Result<(Vec<u32>, ReplyStart)> {
        match prompt {
            Prompt::Ids(ids) => Ok((ids.clone(), ReplyStart::Answer)),
            Prompt::Text(text) => Ok((self.tokenizer.encode(text, true)?, ReplyStart::Answer)),
            Prompt::Chat { messages, render } => {
                let t = self.chat_template.as_ref().ok_or_else(|| {
                    Error::Template("the model has no chat template; use a raw prompt".into())
                })?;
                let (ids, text) = t.encode(&self.tokenizer, messages, render)?;
                let start = if prompt_opens_reasoning(&text) {
                    ReplyStart::InReasoning
                } else if render.assistant_prefix.is_some()
                    || text.trim_end().ends_with(crate::text::reasoning::THINK_END)
                {
                    ReplyStart::Answer
                } else {
                    ReplyStart::MayReason
                };
                Ok((ids, start))
            }
        }
    }
}

/// A running engine. Cheap to share behind an `Arc`; every method takes `&self`.
pub struct Engine {
    text: TextModel,
    grammars: Grammars,
    info: EngineInfo,
    metrics: Arc<Metrics>,
    commands: std::sync::mpsc::Sender<Command>,
    next_id: std::sync::atomic::AtomicU64,
    accepting: AtomicBool,
    max_waiting: Option<usize>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Engine {
    /// Starts the engine thread for `model`. Fails when the KV cache cannot be allocated.
    pub fn start<B: Backend>(
        model: Arc<Model<B>>,
        text: TextModel,
        opts: &EngineOptions,
    ) -> Result<Engine> {
        if opts.max_num_seqs == 0 || opts.max_num_batched_tokens == 0 || opts.block_size == 0 {
            return Err(Error::InvalidRequest(
                "max_num_seqs, max_num_batched_tokens and block_size must be at least 1".into(),
            ));
        }
        if opts.task == Task::Generate && !model.can_generate() {
            return Err(Error::UnsupportedModel(crate::model::NO_HEAD.into()));
        }
        let metrics = Arc::new(Metrics::default());
        let (tx, rx) = std::sync::mpsc::channel();
        // Masks cover the logits, which are as wide as the embedding.
        let logits_width = model.config.vocab_size;
        let (info, thread) = worker::spawn(model, text.clone(), opts, metrics.clone(), rx)?;
        let grammars = Grammars::new(text.tokenizer.clone(), logits_width, &text.eos_token_ids);
        Ok(Engine {
            grammars,
            text,
            info,
            metrics,
            commands: tx,
            next_id: std::sync::atomic::AtomicU64::new(1),
            accepting: AtomicBool::new(true),
            max_waiting: opts.max_waiting,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Sizes of the running engine.
    pub fn info(&self) -> &EngineInfo {
        &self.info
    }

    /// Tokenizer, chat template and end-of-sequence ids.
    pub fn text(&self) -> &TextModel {
        &self.text
    }

    /// Live counters and histograms.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Renders a chat with the model's template ([`TextModel::render_chat`]).
    pub fn render_chat(&self, messages: &[Value], opts: &RenderOptions) -> Result<String> {
        self.text.render_chat(messages, opts)
    }

    /// Renders and tokenizes a prompt ([`TextModel::tokenize_prompt`]).
    pub fn tokenize_prompt(&self, prompt: &Prompt) -> Result<(Vec<u32>, bool)> {
        self.text.tokenize_prompt(prompt)
    }

    /// Validates, renders and tokenizes `req` and queues it. Errors are the caller's:
    /// [`Error::InvalidParam`] (a sampling parameter out of range, from
    /// [`SamplingParams::validate`](crate::sampler::SamplingParams::validate)),
    /// [`Error::InvalidRequest`] (empty prompt, ids outside the vocabulary),
    /// [`Error::PromptTooLong`], [`Error::Template`], [`Error::Overloaded`] when the queue is
    /// full, [`Error::ShuttingDown`] after [`Engine::shutdown`].
    pub fn submit(&self, req: Request) -> Result<RequestStream> {
        self.check_task(Task::Generate)?;
        self.admit(1)?;
        req.params.validate()?;
        let prepared = self.prepare(req.prompt)?;
        self.submit_prepared(&prepared, req.params)
    }

    /// Fails fast when the engine would refuse `count` more requests now (shut down, or the
    /// waiting queue full): a check that costs nothing, for callers to make before they
    /// render or tokenize anything.
    pub fn admit(&self, count: usize) -> Result<()> {
        if !self.accepting.load(Ordering::SeqCst) {
            return Err(Error::ShuttingDown);
        }
        if let Some(max) = self.max_waiting {
            let waiting = self.metrics.snapshot().waiting as usize;
            if waiting + count > max {
                return Err(Error::Overloaded { waiting });
            }
        }
        Ok(())
    }

    /// Renders and tokenizes a prompt and checks it, once for any number of
    /// [`Engine::submit_prepared`] calls (the `n` choices of a request).
    pub fn prepare(&self, prompt: Prompt) -> Result<Prepared> {
        let (ids, reply_start) = self.text.tokenize_with_start(&prompt)?;
        self.check_prompt(&ids)?;
        let chat = match prompt {
            Prompt::Chat { messages, render } => Some((messages, render)),
            _ => None,
        };
        Ok(Prepared {
            ids,
            start_in_reasoning: reply_start == ReplyStart::InReasoning,
            reply_start,
            chat,
        })
    }

    /// Queues a prepared prompt with `params`; errors as [`Engine::submit`]'s.
    pub fn submit_prepared(
        &self,
        prepared: &Prepared,
        params: SamplingParams,
    ) -> Result<RequestStream> {
        self.check_task(Task::Generate)?;
        self.admit(1)?;
        params.validate()?;
        self.check_ids(&params.stop_token_ids, "stop_token_ids: token id")?;
        let biased: Vec<u32> = params.logit_bias.iter().map(|&(id, _)| id).collect();
        self.check_ids(&biased, "logit_bias: token id")?;
        let constraint = match &params.grammar {
            Some(g) => Some(self.grammars.compile(g, prepared.reply_start)?),
            None => None,
        };
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::unbounded_channel();
        let cancelled = Arc::new(AtomicBool::new(false));
        let admitted = Admitted {
            id,
            prompt_ids: prepared.ids.clone(),
            params,
            eos_token_ids: self.text.eos_token_ids.clone(),
            start_in_reasoning: prepared.start_in_reasoning,
            constraint,
            chat: prepared.chat.clone(),
            events: tx,
            cancelled: cancelled.clone(),
            submitted: std::time::Instant::now(),
        };
        self.metrics.on_submit();
        self.commands
            .send(Command::Add(Box::new(admitted)))
            .map_err(|_| Error::ShuttingDown)?;
        Ok(RequestStream {
            id,
            events: rx,
            cancelled,
        })
    }

    /// Queues an embedding request for `prompt_ids` (an engine started with [`Task::Embed`];
    /// see [`embed`]). The ids are used as given: text inputs are tokenized by
    /// [`Engine::tokenize_input`]. Errors: [`Error::InvalidRequest`] (an engine that
    /// generates, an empty prompt, ids outside the vocabulary), [`Error::PromptTooLong`],
    /// [`Error::Overloaded`], [`Error::ShuttingDown`].
    pub fn embed(&self, prompt_ids: Vec<u32>) -> Result<EmbeddingHandle> {
        Ok(self.embed_batch(vec![prompt_ids])?.remove(0))
    }

    /// Queues one embedding request per input, all or none: every input is checked before
    /// any is queued, and the batch is admitted as one request (the waiting-queue bound
    /// refuses later requests while its inputs wait, but never a batch for its size).
    /// Errors as [`Engine::embed`]'s.
    pub fn embed_batch(&self, inputs: Vec<Vec<u32>>) -> Result<Vec<EmbeddingHandle>> {
        self.check_task(Task::Embed)?;
        self.admit(1)?;
        for ids in &inputs {
            self.check_prompt(ids)?;
        }
        let mut handles = Vec::with_capacity(inputs.len());
        for prompt_ids in inputs {
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            let (req, handle) = embed::EmbedAdmitted::new(id, prompt_ids);
            self.metrics.on_submit();
            self.commands
                .send(Command::Embed(Box::new(req)))
                .map_err(|_| Error::ShuttingDown)?;
            handles.push(handle);
        }
        Ok(handles)
    }

    /// Tokenizes one text input of an embedding request as the model's tokenizer does by
    /// default, special tokens included (Qwen3-Embedding's post-processor appends
    /// `<|endoftext|>`, whose hidden state is the embedding).
    pub fn tokenize_input(&self, text: &str) -> Result<Vec<u32>> {
        self.text.tokenizer.encode(text, true)
    }

    fn check_task(&self, task: Task) -> Result<()> {
        match (self.info.task, task) {
            (a, b) if a == b => Ok(()),
            (Task::Embed, _) => Err(Error::InvalidRequest(
                "this engine computes embeddings (task embed); it does not generate".into(),
            )),
            (Task::Generate, _) => Err(Error::InvalidRequest(
                "this engine generates text; embeddings need an engine started with task embed"
                    .into(),
            )),
        }
    }

    /// Checks that every id is one the model and the tokenizer both know (`what` names the
    /// ids in the error).
    pub fn check_ids(&self, ids: &[u32], what: &str) -> Result<()> {
        let vocab = self.info.vocab_size;
        match ids.iter().find(|&&id| id as usize >= vocab) {
            Some(bad) => Err(Error::InvalidRequest(format!(
                "{what} {bad} is outside the vocabulary ({vocab})"
            ))),
            None => Ok(()),
        }
    }

    /// Checks a prompt against the vocabulary and the context length.
    pub fn check_prompt(&self, ids: &[u32]) -> Result<()> {
        if ids.is_empty() {
            return Err(Error::InvalidRequest("the prompt is empty".into()));
        }
        self.check_ids(ids, "token id")?;
        if ids.len() >= self.info.max_model_len {
            return Err(Error::PromptTooLong {
                prompt_tokens: ids.len(),
                max_model_len: self.info.max_model_len,
            });
        }
        Ok(())
    }

    /// Stops accepting requests; running and queued ones finish. Returns at once; see
    /// [`Engine::join`].
    pub fn shutdown(&self) {
        self.accepting.store(false, Ordering::SeqCst);
        let _ = self.commands.send(Command::Shutdown);
    }

    /// Whether [`Engine::submit`] still accepts requests.
    pub fn is_accepting(&self) -> bool {
        self.accepting.load(Ordering::SeqCst)
    }

    /// Whether the engine thread is still running (it stops after [`Engine::shutdown`] once
    /// its requests are done, or if a step fails irrecoverably).
    pub fn is_running(&self) -> bool {
        self.thread
            .lock()
            .ok()
            .and_then(|h| h.as_ref().map(|h| !h.is_finished()))
            .unwrap_or(false)
    }

    /// Waits for the engine thread to exit (after [`Engine::shutdown`]).
    pub fn join(&self) {
        let handle = self.thread.lock().ok().and_then(|mut h| h.take());
        if let Some(h) = handle {
            let _ = h.join();
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.shutdown();
        // Requests still queued get an error event when the thread exits; their streams
        // may outlive the engine.
        self.join();
    }
}

/// The answer to one request: a stream of [`EngineEvent`]s ending with `Finished` or
/// `Error`. Dropping it cancels the request.
pub struct RequestStream {
    id: u64,
    events: mpsc::UnboundedReceiver<EngineEvent>,
    cancelled: Arc<AtomicBool>,
}

impl RequestStream {
    /// The engine's id of the request.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The next event, or `None` after the last one.
    pub async fn next(&mut self) -> Option<EngineEvent> {
        self.events.recv().await
    }

    /// The next event, blocking the thread; `None` after the last one. From async code,
    /// prefer [`RequestStream::next`]: this one blocks the task's thread.
    pub fn blocking_next(&mut self) -> Option<EngineEvent> {
        // Not `blocking_recv`, which panics inside an async runtime: an app that embeds the
        // library may well call this from one of its tasks.
        pollster::block_on(self.events.recv())
    }

    /// Asks the engine to stop the request; its stream then ends with `Finished` and
    /// [`FinishReason::Cancelled`].
    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::SeqCst);
    }

    /// A handle that cancels this request from elsewhere (another task or thread).
    pub fn cancel_handle(&self) -> Arc<AtomicBool> {
        self.cancelled.clone()
    }

    /// Blocks until the request ends and returns its completion, calling `on_delta` for each
    /// delta.
    pub fn wait(mut self, mut on_delta: impl FnMut(&EngineEvent)) -> Result<Completion> {
        while let Some(ev) = self.blocking_next() {
            match ev {
                EngineEvent::Finished(c) => return Ok(c),
                EngineEvent::Error(e) => return Err(Error::Engine(e)),
                ev => on_delta(&ev),
            }
        }
        Err(Error::Engine("the engine stopped".into()))
    }
}

impl Drop for RequestStream {
    fn drop(&mut self) {
        self.cancelled.store(true, Ordering::SeqCst);
    }
}
