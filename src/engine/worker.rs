//! The engine thread: owns the model's activations, the KV cache and the [`Scheduler`], and
//! runs step after step while there is work.
//!
//! Each step: take new requests from the command channel (blocking only when idle), drop
//! cancelled ones (a set cancel flag or a dropped stream), plan the step, lay it out as one
//! [`Batch`] (every sequence's chunk, with its positions, KV slots and block table), run the
//! model once, then, for each sequence whose chunk reached its last token, take the next
//! token and hand it to the request's [`Reply`] (stop checks, detokenizer, reasoning split).
//!
//! When every row to sample can be sampled by the backend ([`Sampler::device_sampling`]:
//! no penalties, no logprobs), the step is [`Model::forward_sample`] and reads back only the
//! token ids (on the GPU, 4 bytes per sequence instead of `[V]` logits); otherwise it is
//! [`Model::forward`], and the host samples those rows with the same race
//! ([`sample_row`]), so a seeded request draws the same tokens in any batch.
//!
//! A request with a grammar ([`crate::grammar`]) gets its allowed tokens computed before the
//! step (the constrained rows in parallel); they travel with its draw as a token mask (on
//! the GPU one bit per token is uploaded, for those rows only), or are applied to its
//! logits on the host when the step samples there.
//!
//! An engine started with [`Task::Embed`] runs [`Model::forward_hidden`] instead, and each
//! sequence whose last prompt chunk ran is answered with its last token's hidden state and
//! freed ([`super::embed`]).
//!
//! Chat replies that end normally leave behind a prefix-cache fill: the conversation as the
//! chat template will render it on the next turn (the answer without its reasoning), which
//! is computed when no request is waiting and released into the prefix cache.
//!
//! A step that panics fails the requests it was computing and the engine goes on; after
//! three such steps in a row it stops (its state is then not to be trusted), and
//! `wick serve` exits non-zero (70) for a supervisor to restart it.
//!
//! Test hook: `WICK_FAULT_STEP_PANIC=<k>[,<k>…]` makes the model steps numbered `k` (from 1,
//! counting the steps that run the model) panic before the model runs; `every` makes every
//! step panic. It lets tests against the real binary check what a failed step does to its
//! requests, to `/metrics` and to the process. The variable is read once, when the engine
//! starts (a value that is not such a list refuses to start it, and a set one is logged as a
//! warning); unset, it costs one comparison per step.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use rayon::prelude::*;
use serde_json::json;

use super::embed::{Embeds, Task};
use super::kv_manager::KvManager;
use super::metrics::Metrics;
use super::scheduler::{Scheduler, SchedulerConfig, Sequence, StepPlan};
use super::{
    Admitted, Command, Completion, EngineEvent, EngineInfo, EngineOptions, TextModel, Usage,
};
use crate::backend::sample::{mask_words, sample_row};
use crate::backend::{Backend, Batch, RowSampling};
use crate::error::{Error, Result};
use crate::generate::FinishReason;
use crate::grammar::{Constraint, NextToken};
use crate::model::{Model, RunState};
use crate::sampler::{Sampler, TokenLogprobs};
use crate::text::chat_template::RenderOptions;
use crate::text::reply::Reply;

/// Prefix-cache fills kept waiting at most; older ones are dropped.
const MAX_PENDING_FILLS: usize = 64;
/// Ids of prefix-cache fills start here, far from request ids.
const FILL_ID_BASE: u64 = 1 << 62;

/// Sizes the KV pool, allocates it and the activations, and starts the engine thread.
pub(crate) fn spawn<B: Backend>(
    model: Arc<Model<B>>,
    text: TextModel,
    opts: &EngineOptions,
    metrics: Arc<Metrics>,
    commands: Receiver<Command>,
) -> Result<(EngineInfo, JoinHandle<()>)> {
    let max_model_len = opts
        .max_model_len
        .min(model.config.max_position_embeddings)
        .max(2);
    let bs = opts.block_size;
    let block_bytes = model.kv_layout(1, bs).bytes();
    let budget = opts.kv_cache_mb.unwrap_or(super::DEFAULT_KV_CACHE_MB) << 20;
    let min_blocks = max_model_len.div_ceil(bs);
    let mut num_blocks = opts.num_blocks.unwrap_or(budget / block_bytes);
    if num_blocks < min_blocks {
        if opts.kv_cache_mb.is_some() || opts.num_blocks.is_some() {
            return Err(Error::InvalidRequest(format!(
                "a KV cache of {num_blocks} blocks ({} MiB) holds {} tokens, fewer than one \
                 sequence of max_model_len {max_model_len}; raise the KV budget or lower \
                 max_model_len",
                (num_blocks * block_bytes) >> 20,
                num_blocks * bs,
            )));
        }
        num_blocks = min_blocks;
    }
    // A budget may ask for more than the device can bind as one pool: take what fits.
    let pool_block_bytes = block_bytes / (2 * model.config.num_hidden_layers);
    if let Some(max) = model.backend().max_kv_pool_bytes() {
        let fit = max / pool_block_bytes;
        if opts.num_blocks.is_none() && num_blocks > fit && fit >= min_blocks {
            tracing::warn!(
                "the KV budget asks for {num_blocks} blocks; the device binds at most {fit} \
                 per pool ({max} bytes), so the cache has {fit}"
            );
            num_blocks = fit;
        }
    }
    let faults = StepFaults::from_env()?;
    if faults != StepFaults::None {
        tracing::warn!("{}: steps {faults:?} will fail on purpose", StepFaults::VAR);
    }
    let cache = model.kv_cache(model.kv_layout(num_blocks, bs))?;
    let max_num_seqs = opts.max_num_seqs;
    let state = model.run_state(opts.max_num_batched_tokens, max_num_seqs);
    let info = EngineInfo {
        max_model_len,
        num_blocks,
        block_size: bs,
        max_num_seqs,
        device: model.backend().describe(),
        kv_dtype: model.kv_dtype(),
        kv_bytes: num_blocks * block_bytes,
        vocab_size: model.config.vocab_size.min(text.tokenizer.vocab_size()),
        task: opts.task,
        hidden_size: model.config.hidden_size,
    };
    Metrics::set(&metrics.kv_blocks_total, num_blocks);
    let sched = Scheduler::new(
        SchedulerConfig {
            max_num_seqs,
            // The activations hold at most this many tokens and logits rows.
            max_num_batched_tokens: state.max_tokens(),
        },
        KvManager::new(num_blocks, bs, opts.enable_prefix_caching),
    );
    let worker = Worker {
        model,
        state,
        cache,
        sched,
        text,
        metrics,
        reqs: HashMap::new(),
        embeds: Embeds::default(),
        task: opts.task,
        fills: VecDeque::new(),
        next_fill: FILL_ID_BASE,
        batch: Batch::default(),
        logits: Vec::new(),
        ids: Vec::new(),
        scratch: Vec::new(),
        max_model_len,
        cache_replies: opts.cache_replies && opts.enable_prefix_caching,
        shutting_down: false,
        panics_in_a_row: 0,
        faults,
        model_steps: 0,
    };
    let handle = std::thread::Builder::new()
        .name("wick-engine".into())
        .spawn(move || worker.run(commands))
        .map_err(|e| Error::Engine(format!("cannot start the engine thread: {e}")))?;
    Ok((info, handle))
}

/// A request's generation state.
struct ReqState {
    req: Box<Admitted>,
    sampler: Sampler,
    reply: Reply,
    /// The request's grammar (taken out of `req`).
    constraint: Option<Constraint>,
    /// Most tokens the reply may have, and how many it has.
    max_new: usize,
    generated: usize,
    first_token: Option<Instant>,
    last_token: Option<Instant>,
    scheduled: bool,
}

struct Worker<B: Backend> {
    model: Arc<Model<B>>,
    state: RunState<B>,
    cache: B::KvCache,
    sched: Scheduler,
    text: TextModel,
    metrics: Arc<Metrics>,
    reqs: HashMap<u64, ReqState>,
    /// Embedding requests (an engine of [`Task::Embed`] has only these).
    embeds: Embeds,
    task: Task,
    fills: VecDeque<Vec<u32>>,
    next_fill: u64,
    batch: Batch,
    logits: Vec<f32>,
    /// Token ids a step sampled on the backend.
    ids: Vec<u32>,
    /// Scratch of host sampling.
    scratch: Vec<(u32, f32)>,
    max_model_len: usize,
    cache_replies: bool,
    shutting_down: bool,
    /// Steps that panicked since the last one that did not.
    panics_in_a_row: u32,
    /// The test hook's steps (see the module docs).
    faults: StepFaults,
    /// Steps that ran (or were about to run) the model.
    model_steps: u64,
}

/// Panicking steps in a row after which the engine stops.
const MAX_STEP_PANICS: u32 = 3;

/// The steps the `WICK_FAULT_STEP_PANIC` test hook makes panic.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
enum StepFaults {
    /// None: the variable is unset or empty.
    #[default]
    None,
    /// These model steps, numbered from 1.
    Steps(BTreeSet<u64>),
    /// Every step.
    Every,
}

impl StepFaults {
    const VAR: &'static str = "WICK_FAULT_STEP_PANIC";

    fn from_env() -> Result<Self> {
        match std::env::var_os(Self::VAR) {
            None => Ok(StepFaults::None),
            Some(v) => Self::parse(&v.to_string_lossy()),
        }
    }

    /// `every`, or step numbers separated by commas; empty is none.
    fn parse(s: &str) -> Result<Self> {
        let s = s.trim();
        if s.is_empty() {
            return Ok(StepFaults::None);
        }
        if s.eq_ignore_ascii_case("every") {
            return Ok(StepFaults::Every);
        }
        s.split(',')
            .map(|k| k.trim().parse::<u64>().ok().filter(|&k| k > 0))
            .collect::<Option<BTreeSet<u64>>>()
            .map(StepFaults::Steps)
            .ok_or_else(|| {
                Error::Engine(format!(
                    "{}=`{s}`: expected step numbers from 1, separated by commas, or `every`",
                    Self::VAR
                ))
            })
    }

    fn hits(&self, step: u64) -> bool {
        match self {
            StepFaults::None => false,
            StepFaults::Steps(steps) => steps.contains(&step),
            StepFaults::Every => true,
        }
    }
}

impl<B: Backend> Worker<B> {
    fn run(mut self, commands: Receiver<Command>) {
        loop {
            if self.reqs.is_empty() && self.embeds.is_empty() {
                if self.shutting_down {
                    break;
                }
                if self.sched.is_idle() && self.fills.is_empty() {
                    match commands.recv() {
                        Ok(cmd) => self.handle(cmd),
                        Err(_) => break,
                    }
                }
            }
            loop {
                match commands.try_recv() {
                    Ok(cmd) => self.handle(cmd),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        self.shutting_down = true;
                        break;
                    }
                }
            }
            self.reap_cancelled();
            self.queue_fill();
            if self.sched.is_idle() {
                self.update_gauges();
                continue;
            }
            if !self.guarded_step() {
                break;
            }
            self.update_gauges();
        }
        for id in self.sched.ids() {
            self.sched.finish(id);
        }
        for (_, r) in self.reqs.drain() {
            let _ = r
                .req
                .events
                .send(EngineEvent::Error("the engine stopped".into()));
            self.metrics.on_finish(None);
        }
        for _ in 0..self.embeds.fail_all("the engine stopped") {
            self.metrics.on_finish(None);
        }
        self.update_gauges();
    }

    fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Shutdown => {
                self.shutting_down = true;
                self.fills.clear();
            }
            Command::Embed(req) => {
                self.metrics.in_channel.fetch_sub(1, Ordering::Relaxed);
                Metrics::add(&self.metrics.prompt_tokens, req.prompt_ids.len());
                self.sched
                    .add(Sequence::new(req.id, req.prompt_ids.clone(), false));
                self.embeds.add(*req);
            }
            Command::Add(mut req) => {
                self.metrics.in_channel.fetch_sub(1, Ordering::Relaxed);
                let id = req.id;
                let prompt_len = req.prompt_ids.len();
                // `Engine::submit` checked the request: a prompt of 1 to max_model_len - 1
                // tokens, max_tokens at least 1.
                let max_new = req
                    .params
                    .max_tokens
                    .unwrap_or(usize::MAX)
                    .min(self.max_model_len - prompt_len);
                debug_assert!(prompt_len > 0 && max_new > 0);
                Metrics::add(&self.metrics.prompt_tokens, prompt_len);
                let state = ReqState {
                    constraint: req.constraint.take(),
                    max_new,
                    generated: 0,
                    sampler: Sampler::new(&req.params, &req.prompt_ids),
                    reply: Reply::new(
                        &self.text.tokenizer,
                        &req.params,
                        &req.eos_token_ids,
                        req.start_in_reasoning,
                        max_new,
                    ),
                    first_token: None,
                    last_token: None,
                    scheduled: false,
                    req,
                };
                self.sched
                    .add(Sequence::new(id, state.req.prompt_ids.clone(), false));
                self.reqs.insert(id, state);
            }
        }
    }

    /// Ends requests whose caller cancelled or dropped the stream.
    fn reap_cancelled(&mut self) {
        let gone: Vec<u64> = self
            .reqs
            .iter()
            .filter(|(_, r)| r.req.cancelled.load(Ordering::Relaxed) || r.req.events.is_closed())
            .map(|(&id, _)| id)
            .collect();
        for id in gone {
            self.finish(id, FinishReason::Cancelled);
        }
        for id in self.embeds.cancelled() {
            self.embeds.remove(id);
            self.sched.finish(id);
            self.metrics.on_finish(Some(FinishReason::Cancelled));
        }
    }

    /// Moves one prefix-cache fill into the scheduler when nothing else waits.
    fn queue_fill(&mut self) {
        if self.sched.num_waiting() > 0 || self.shutting_down {
            return;
        }
        if let Some(tokens) = self.fills.pop_front() {
            let id = self.next_fill;
            self.next_fill += 1;
            self.sched.add(Sequence::new(id, tokens, true));
        }
    }

    fn update_gauges(&self) {
        let m = &self.metrics;
        // Fills first: a reader that sees nothing running then sees the fills too.
        let fills_running = self.sched.num_waiting() + self.sched.num_running()
            - self.reqs.len()
            - self.embeds.len();
        Metrics::set(&m.pending_fills, self.fills.len() + fills_running);
        Metrics::set(&m.waiting, self.sched.num_waiting_requests());
        Metrics::set(&m.running, self.sched.num_running());
        Metrics::set(&m.kv_blocks_used, self.sched.kv().num_used());
        Metrics::set(&m.kv_blocks_cached, self.sched.kv().num_cached_free());
    }

    /// Runs a step; a panic inside it fails the requests that were running (500 for their
    /// clients) and the engine goes on. Returns false after [`MAX_STEP_PANICS`] panics in a
    /// row: the engine's state is then not to be trusted and the thread ends (the server
    /// then exits non-zero for its supervisor to restart it).
    fn guarded_step(&mut self) -> bool {
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.step()));
        match outcome {
            Ok(()) => {
                self.panics_in_a_row = 0;
                true
            }
            Err(payload) => {
                let what = payload
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| payload.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "a panic".into());
                self.panics_in_a_row += 1;
                tracing::error!(
                    "a step failed ({what}); failing its requests ({} in a row)",
                    self.panics_in_a_row
                );
                // Counted before the requests hear of it, so that a client that got its 500
                // finds the failure in /metrics.
                Metrics::add(&self.metrics.step_failures, 1);
                let running: Vec<u64> = self
                    .reqs
                    .iter()
                    .filter(|(_, r)| r.scheduled)
                    .map(|(&id, _)| id)
                    .collect();
                for id in running {
                    self.fail(id, "internal error while computing this request");
                }
                for id in self.embeds.scheduled() {
                    if self
                        .embeds
                        .fail(id, "internal error while computing this request")
                    {
                        self.metrics.on_finish(None);
                    }
                    self.sched.finish(id);
                }
                self.panics_in_a_row < MAX_STEP_PANICS
            }
        }
    }

    fn step(&mut self) {
        let plan = self.sched.schedule();
        Metrics::add(&self.metrics.preemptions, plan.preempted.len());
        for &(id, hit) in &plan.admitted {
            if let Some(r) = self.reqs.get_mut(&id) {
                if !r.scheduled {
                    r.scheduled = true;
                    self.metrics.queue_time.observe(r.req.submitted.elapsed());
                    Metrics::add(&self.metrics.prefix_cache_hit_tokens, hit);
                    Metrics::add(
                        &self.metrics.prefix_cache_query_tokens,
                        r.req.prompt_ids.len(),
                    );
                }
            } else if let Some((submitted, len)) = self.embeds.schedule(id) {
                self.metrics.queue_time.observe(submitted.elapsed());
                Metrics::add(&self.metrics.prefix_cache_hit_tokens, hit);
                Metrics::add(&self.metrics.prefix_cache_query_tokens, len);
            }
        }
        if plan.seqs.is_empty() {
            return;
        }
        self.model_steps += 1;
        if self.faults.hits(self.model_steps) {
            panic!(
                "{} made step {} fail on purpose",
                StepFaults::VAR,
                self.model_steps
            );
        }
        let sampled = self.build_batch(&plan);
        if self.task == Task::Embed {
            return self.embed_step(&plan, &sampled);
        }
        // Grammar masks first, over the constrained rows in parallel: they depend only on
        // the tokens so far.
        let vocab = self.model.config.vocab_size;
        let mut next: HashMap<usize, NextToken> = HashMap::new();
        // Requests whose grammar failed: they get an error instead of a token.
        let mut broken: Vec<(u64, String)> = Vec::new();
        let any_constrained = sampled
            .iter()
            .any(|id| self.reqs.get(id).is_some_and(|r| r.constraint.is_some()));
        if any_constrained {
            let mut constrained: Vec<(usize, u64, &mut Constraint, usize)> = Vec::new();
            let mut by_id: HashMap<u64, &mut ReqState> =
                self.reqs.iter_mut().map(|(&id, r)| (id, r)).collect();
            for (row, id) in sampled.iter().enumerate() {
                if let Some(r) = by_id.remove(id) {
                    if let Some(c) = r.constraint.as_mut() {
                        constrained.push((row, *id, c, r.max_new - r.generated));
                    }
                }
            }
            let decided: Vec<_> = constrained
                .par_iter_mut()
                .map(|(row, id, c, left)| (*row, *id, c.next(Some(*left))))
                .collect();
            for (row, id, n) in decided {
                match n {
                    Ok(n) => {
                        next.insert(row, n);
                    }
                    Err(e) => broken.push((id, e.to_string())),
                }
            }
        }
        // Each sampled row's draw, taken now so that its seed comes from the request's
        // random stream in token order; `None` rows need their logits on the host. A
        // grammar's mask goes with the draw.
        let words = mask_words(vocab);
        let mut masks: Vec<u32> = Vec::new();
        let rows: Vec<Option<RowSampling>> = sampled
            .iter()
            .enumerate()
            .map(|(row, id)| match self.reqs.get_mut(id) {
                Some(r) => {
                    let mut draw = r.sampler.device_sampling()?;
                    if let Some(mask) = next.get(&row).and_then(|n| n.mask_words(words)) {
                        draw.mask = (masks.len() / words) as u32;
                        masks.extend_from_slice(&mask);
                    }
                    Some(draw)
                }
                None => Some(RowSampling::greedy()),
            })
            .collect();
        let mut chosen: Vec<(u32, Option<TokenLogprobs>)> = Vec::with_capacity(rows.len());
        if rows.iter().all(Option::is_some) {
            // The backend samples every row: on the GPU the step reads back R ids (and
            // uploads the masks of the constrained rows).
            let params: Vec<RowSampling> = rows.into_iter().flatten().collect();
            let mut ids = std::mem::take(&mut self.ids);
            self.model.forward_sample(
                &mut self.state,
                &mut self.cache,
                &self.batch,
                &params,
                &masks,
                &mut ids,
            );
            chosen.extend(ids.iter().map(|&t| (t, None)));
            self.ids = ids;
        } else {
            self.model.forward(
                &mut self.state,
                &mut self.cache,
                &self.batch,
                &mut self.logits,
            );
            for (row, (id, params)) in sampled.iter().zip(&rows).enumerate() {
                let logits = &mut self.logits[row * vocab..(row + 1) * vocab];
                if let Some(n) = next.get(&row) {
                    Constraint::apply(n, logits);
                }
                chosen.push(match (params, self.reqs.get_mut(id)) {
                    (Some(p), _) => (sample_row(logits, p, &mut self.scratch), None),
                    (None, Some(r)) => r.sampler.sample_with_logprobs(logits),
                    (None, None) => (0, None),
                });
            }
        }
        Metrics::add(&self.metrics.computed_tokens, self.batch.num_tokens());
        Metrics::add(&self.metrics.steps, 1);
        self.sched.commit(&plan);
        for (id, (tok, lp)) in sampled.into_iter().zip(chosen) {
            if !broken.iter().any(|(b, _)| *b == id) {
                self.on_token(id, tok, lp);
            }
        }
        for (id, e) in broken {
            self.fail(id, &e);
        }
        // Fills whose tokens are all computed are done: their blocks go to the prefix cache.
        for s in &plan.seqs {
            if s.id >= FILL_ID_BASE {
                let done = self
                    .sched
                    .get(s.id)
                    .is_some_and(|q| q.num_computed == q.tokens.len());
                if done {
                    self.sched.finish(s.id);
                }
            }
        }
    }

    /// The step of an embedding engine: the model stops at the hidden states, and each
    /// sequence whose prompt is now computed is answered and freed.
    fn embed_step(&mut self, plan: &StepPlan, done: &[u64]) {
        // The logits buffer holds the hidden states `[R, C]` here.
        self.model.forward_hidden(
            &mut self.state,
            &mut self.cache,
            &self.batch,
            &mut self.logits,
        );
        Metrics::add(&self.metrics.computed_tokens, self.batch.num_tokens());
        Metrics::add(&self.metrics.steps, 1);
        self.sched.commit(plan);
        let c = self.model.config.hidden_size;
        for (row, &id) in done.iter().enumerate() {
            let seq = self.sched.finish(id);
            let cached = seq.and_then(|s| s.cached_prompt_tokens).unwrap_or(0);
            self.embeds
                .deliver(id, &self.logits[row * c..(row + 1) * c], cached);
            self.metrics.on_finish(Some(FinishReason::Stop));
        }
    }

    /// Lays `plan` out as the step's batch; returns the ids of the sequences to sample, in
    /// logits-row order.
    fn build_batch(&mut self, plan: &StepPlan) -> Vec<u64> {
        let bs = self.sched.kv().block_size();
        let b = &mut self.batch;
        b.clear();
        let mut sample = Vec::new();
        for s in &plan.seqs {
            let seq = self.sched.get(s.id).expect("scheduled sequence");
            let tokens = &seq.tokens[s.start..s.start + s.len];
            let row = b.push_seq(tokens, s.start, &seq.blocks, bs);
            if s.sample {
                b.logits_rows.push((row + s.len - 1) as u32);
                sample.push(s.id);
            }
        }
        debug_assert_eq!(b.check(bs), Ok(()));
        sample
    }

    /// Records `id`'s next token and reports it.
    fn on_token(&mut self, id: u64, tok: u32, lp: Option<TokenLogprobs>) {
        let Some(r) = self.reqs.get_mut(&id) else {
            return;
        };
        r.sampler.accept(tok);
        r.generated += 1;
        let grammar_done = match r.constraint.as_mut().map(|c| c.accept(tok)) {
            None | Some(Ok(false)) => false,
            Some(Ok(true)) => true,
            Some(Err(e)) => {
                self.fail(id, &e.to_string());
                return;
            }
        };
        self.sched.append_token(id, tok);
        Metrics::add(&self.metrics.generation_tokens, 1);
        let now = Instant::now();
        match r.last_token {
            None => {
                r.first_token = Some(now);
                self.metrics
                    .time_to_first_token
                    .observe(now - r.req.submitted);
            }
            Some(t) => self.metrics.inter_token_latency.observe(now - t),
        }
        r.last_token = Some(now);
        let outcome = match r.reply.on_token(tok, lp.clone()) {
            Ok(o) => o,
            Err(e) => {
                self.fail(id, &e.to_string());
                return;
            }
        };
        if let Some(delta) = outcome.delta {
            let _ = r.req.events.send(EngineEvent::Delta {
                token_ids: vec![tok],
                reasoning: delta.reasoning,
                content: delta.content,
                logprobs: lp.into_iter().collect::<Vec<TokenLogprobs>>(),
            });
        }
        if let Some(reason) = outcome.finish {
            self.finish(id, reason);
        } else if grammar_done {
            // The grammar is complete: nothing else may follow.
            self.finish(id, FinishReason::Stop);
        }
    }

    /// Fails a request with an internal error.
    fn fail(&mut self, id: u64, message: &str) {
        tracing::error!("request {id} failed: {message}");
        if let Some(r) = self.reqs.remove(&id) {
            let _ = r.req.events.send(EngineEvent::Error(message.to_string()));
            self.metrics.on_finish(None);
        }
        self.sched.finish(id);
    }

    /// Flushes what the request's decoder, stop matcher and parser hold, sends the last
    /// delta and the completion, and frees the sequence.
    fn finish(&mut self, id: u64, reason: FinishReason) {
        let Some(ReqState {
            req,
            mut reply,
            first_token,
            ..
        }) = self.reqs.remove(&id)
        else {
            return;
        };
        let delta = reply.finish();
        if !delta.is_empty() {
            let _ = req.events.send(EngineEvent::Delta {
                token_ids: Vec::new(),
                reasoning: delta.reasoning,
                content: delta.content,
                logprobs: Vec::new(),
            });
        }
        let seq = self.sched.finish(id);
        let now = Instant::now();
        let reply = reply.into_parts();
        let completion = Completion {
            finish_reason: reason,
            usage: Usage {
                prompt_tokens: req.prompt_ids.len(),
                completion_tokens: reply.token_ids.len(),
                cached_tokens: seq
                    .as_ref()
                    .and_then(|s| s.cached_prompt_tokens)
                    .unwrap_or(0),
            },
            token_ids: reply.token_ids,
            reasoning: reply.reasoning,
            time_to_first_token: first_token.map_or(now - req.submitted, |t| t - req.submitted),
            total_time: now - req.submitted,
            preemptions: seq.as_ref().map_or(0, |s| s.preemptions),
            content: reply.content,
            logprobs: reply.logprobs,
        };
        self.metrics.e2e_latency.observe(completion.total_time);
        self.metrics.on_finish(Some(reason));
        if reason != FinishReason::Cancelled && self.cache_replies && !self.shutting_down {
            if let Some((messages, render)) = &req.chat {
                if let Some(ids) = self.next_turn_prefix(messages, render, &completion.content) {
                    if self.fills.len() >= MAX_PENDING_FILLS {
                        self.fills.pop_front();
                    }
                    self.fills.push_back(ids);
                }
            }
        }
        let _ = req.events.send(EngineEvent::Finished(completion));
    }

    /// The token ids the next turn of this conversation will start with: the conversation
    /// with the reply appended, as far as it renders the same whatever the next user says.
    fn next_turn_prefix(
        &self,
        messages: &[serde_json::Value],
        render: &RenderOptions,
        answer: &str,
    ) -> Option<Vec<u32>> {
        let template = self.text.chat_template.as_ref()?;
        let opts = RenderOptions {
            add_generation_prompt: false,
            ..render.clone()
        };
        let mut conv = messages.to_vec();
        // A reply that the prompt started (a forced tool call) includes that start.
        let answer = format!(
            "{}{answer}",
            render.assistant_prefix.as_deref().unwrap_or("")
        );
        conv.push(json!({"role": "assistant", "content": answer}));
        let mut render_with = |user: &str| -> Option<Vec<u32>> {
            conv.push(json!({"role": "user", "content": user}));
            let ids = template.encode(&self.text.tokenizer, &conv, &opts).ok();
            conv.pop();
            ids.map(|(ids, _)| ids)
        };
        let a = render_with("a")?;
        let b = render_with("b")?;
        let common = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
        // Nothing to gain below one block; nothing that could not be a prompt.
        (common > self.sched.kv().block_size() && common < self.max_model_len)
            .then(|| a[..common].to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::StepFaults;

    #[test]
    fn the_fault_hook_reads_step_lists_and_every() {
        assert_eq!(StepFaults::parse("").unwrap(), StepFaults::None);
        assert_eq!(StepFaults::parse(" ").unwrap(), StepFaults::None);
        let f = StepFaults::parse("1, 4").unwrap();
        assert!(f.hits(1) && f.hits(4) && !f.hits(2) && !f.hits(5));
        let f = StepFaults::parse("Every").unwrap();
        assert!(f.hits(1) && f.hits(1000));
        assert!(!StepFaults::None.hits(1));
        for bad in ["0", "x", "1,,2", "-1", "1;2", "all"] {
            let e = StepFaults::parse(bad).unwrap_err().to_string();
            assert!(e.contains("WICK_FAULT_STEP_PANIC"), "{bad}: {e}");
        }
    }
}
