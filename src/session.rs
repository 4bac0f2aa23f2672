//! One sequence on one model: a KV cache that persists across calls, so that a chat's next
//! turn computes only the tokens its prompt does not share with what is already cached.
//!
//! [`Session::extend`] appends tokens in chunks of at most `prefill_chunk` (prompt
//! processing is matrix-matrix work over a whole chunk) and reports the logits of the rows
//! the caller wants. [`Session::reuse_prefix`] keeps the longest cached prefix of a new prompt.
//! Its blocks come from the engine's [`KvManager`] (with prefix caching off: the session
//! keeps its own prefix), and its steps are laid out by the same [`Batch::push_seq`] as the
//! engine's.

use std::sync::Arc;

use crate::backend::{Backend, Batch, RowSampling};
use crate::engine::kv_manager::{KvManager, DEFAULT_BLOCK_SIZE};
use crate::error::{Error, Result};
use crate::model::{Model, RunState, NO_HEAD};

/// Sizes of a [`Session`].
#[derive(Clone, Copy, Debug)]
pub struct SessionOptions {
    /// The longest sequence (prompt + generated) the session can hold.
    pub max_model_len: usize,
    /// Most prompt tokens per forward step.
    pub prefill_chunk: usize,
    /// Most rows of logits per step when every position's logits are wanted.
    pub max_logits_rows: usize,
    /// Tokens per KV block.
    pub block_size: usize,
}

impl Default for SessionOptions {
    fn default() -> Self {
        SessionOptions {
            max_model_len: 8192,
            prefill_chunk: 512,
            max_logits_rows: 64,
            block_size: DEFAULT_BLOCK_SIZE,
        }
    }
}

/// Which logits [`Session::extend`] reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WantLogits {
    /// Only the last token's.
    Last,
    /// Every token's.
    All,
}

/// A single sequence with its own KV cache.
pub struct Session<B: Backend> {
    model: Arc<Model<B>>,
    state: RunState<B>,
    cache: B::KvCache,
    /// The pool, sized to one sequence of `max_model_len` tokens (no prefix caching: the
    /// session keeps its own prefix in `tokens`).
    kv: KvManager,
    /// The sequence's blocks, in order.
    blocks: Vec<u32>,
    tokens: Vec<u32>,
    opts: SessionOptions,
    batch: Batch,
    logits: Vec<f32>,
    /// Ids from the backend's sample op.
    sampled: Vec<u32>,
}

impl<B: Backend> Session<B> {
    /// A session with room for `opts.max_model_len` tokens.
    pub fn new(model: Arc<Model<B>>, opts: SessionOptions) -> Result<Self> {
        if !model.can_generate() {
            return Err(Error::UnsupportedModel(NO_HEAD.into()));
        }
        let max_len = opts
            .max_model_len
            .min(model.config.max_position_embeddings)
            .max(1);
        let opts = SessionOptions {
            max_model_len: max_len,
            ..opts
        };
        let num_blocks = max_len.div_ceil(opts.block_size);
        let cache = model.kv_cache(model.kv_layout(num_blocks, opts.block_size))?;
        let state = model.run_state(opts.prefill_chunk, opts.max_logits_rows);
        Ok(Session {
            state,
            cache,
            kv: KvManager::new(num_blocks, opts.block_size, false),
            blocks: Vec::new(),
            tokens: Vec::new(),
            opts,
            batch: Batch::default(),
            logits: Vec::new(),
            sampled: Vec::new(),
            model,
        })
    }

    /// The model.
    pub fn model(&self) -> &Arc<Model<B>> {
        &self.model
    }

    /// The longest sequence this session holds.
    pub fn max_model_len(&self) -> usize {
        self.opts.max_model_len
    }

    /// Tokens whose keys and values are cached, in order.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// Forgets everything.
    pub fn reset(&mut self) {
        self.kv.release_all(&mut self.blocks);
        self.tokens.clear();
    }

    /// Keeps the longest cached prefix of `ids` — but never all of `ids`, since the logits
    /// of its last token must be computed — and drops the rest. Returns the tokens kept.
    pub fn reuse_prefix(&mut self, ids: &[u32]) -> usize {
        let common = self
            .tokens
            .iter()
            .zip(ids)
            .take_while(|(a, b)| a == b)
            .count()
            .min(ids.len().saturating_sub(1));
        self.kv.truncate(&mut self.blocks, common);
        self.tokens.truncate(common);
        common
    }

    /// Runs the model over `ids` after the cached tokens, calling `on_logits(i, row)` for
    /// each `ids[i]` whose logits are wanted (`row` is `[V]`).
    pub fn extend(
        &mut self,
        ids: &[u32],
        want: WantLogits,
        on_logits: impl FnMut(usize, &[f32]),
    ) -> Result<()> {
        self.run(ids, want, None, on_logits).map(|_| ())
    }

    /// Runs the model over `ids` after the cached tokens and returns the token `params`
    /// chooses from the logits after the last one, sampled by the backend where the logits
    /// are ([`Model::forward_sample`]: on the GPU the last step reads back one id, not `[V]`
    /// logits). `ids` must not be empty.
    pub fn extend_sample(&mut self, ids: &[u32], params: &RowSampling) -> Result<u32> {
        assert!(!ids.is_empty(), "extend_sample needs a token");
        let id = self.run(ids, WantLogits::Last, Some(params), |_, _| {})?;
        Ok(id.expect("the last chunk samples"))
    }

    /// [`Session::extend`], and with `sample` the last chunk ends in the backend's sample op
    /// instead of reading logits back; returns its token.
    fn run(
        &mut self,
        ids: &[u32],
        want: WantLogits,
        sample: Option<&RowSampling>,
        mut on_logits: impl FnMut(usize, &[f32]),
    ) -> Result<Option<u32>> {
        let total = self.tokens.len() + ids.len();
        if total > self.opts.max_model_len {
            return Err(Error::PromptTooLong {
                prompt_tokens: total,
                max_model_len: self.opts.max_model_len,
            });
        }
        let vocab = self.model.config.vocab_size;
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= vocab) {
            return Err(Error::InvalidRequest(format!(
                "token id {bad} is outside the vocabulary ({vocab})"
            )));
        }
        let chunk = match want {
            WantLogits::Last => self.state.max_tokens(),
            WantLogits::All => self.state.max_tokens().min(self.state.max_logits_rows()),
        };
        let bs = self.kv.block_size();
        let mut done = 0;
        let mut sampled = None;
        while done < ids.len() {
            let n = chunk.min(ids.len() - done);
            let part = &ids[done..done + n];
            let start = self.tokens.len();
            assert!(
                self.kv.reserve(&mut self.blocks, start + n),
                "pool sized for max_model_len"
            );
            let b = &mut self.batch;
            b.clear();
            b.push_seq(part, start, &self.blocks, bs);
            let last_chunk = done + n == ids.len();
            match want {
                WantLogits::All => b.logits_rows.extend(0..n as u32),
                WantLogits::Last if last_chunk => b.logits_rows.push(n as u32 - 1),
                WantLogits::Last => {}
            }
            debug_assert_eq!(b.check(bs), Ok(()));
            match sample {
                Some(p) if last_chunk => {
                    self.model.forward_sample(
                        &mut self.state,
                        &mut self.cache,
                        b,
                        std::slice::from_ref(p),
                        &[],
                        &mut self.sampled,
                    );
                    sampled = self.sampled.first().copied();
                    self.logits.clear();
                }
                _ => self
                    .model
                    .forward(&mut self.state, &mut self.cache, b, &mut self.logits),
            }
            self.tokens.extend_from_slice(part);
            for (r, &row) in self.batch.logits_rows.iter().enumerate() {
                if self.logits.is_empty() {
                    break;
                }
                on_logits(
                    done + row as usize,
                    &self.logits[r * vocab..(r + 1) * vocab],
                );
            }
            done += n;
        }
        Ok(sampled)
    }
}

/// What tools driving one sequence need from it: the object-safe face of [`Session`], for
/// tools that need every row's logits (benchmarks, perplexity).
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
