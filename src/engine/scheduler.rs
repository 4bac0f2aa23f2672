//! Which tokens of which sequences go into the next forward step.
//!
//! As in vLLM v1 there are no prefill and decode phases. A sequence is its token list
//! (prompt, then generated tokens) and the number of those whose keys and values are in the
//! KV cache; each step gives it some of the rest: all of it (one token) when decoding, a
//! chunk when prefilling. [`Scheduler::schedule`]:
//!
//! 1. walks the running sequences oldest first, giving each what it needs up to the step's
//!    token budget. When the pool has no block for one, the newest running sequence is
//!    preempted — its blocks released, its progress forgotten, and itself put back at the
//!    head of the queue, to be recomputed (its generated tokens are kept, so the caller sees
//!    only a delay);
//! 2. then, unless something was preempted, admits waiting sequences in FIFO order while the
//!    budget, the sequence cap and the pool allow, each first taking over the longest cached
//!    prefix of its tokens from the [`KvManager`]. A request that does not fit waits; none
//!    behind it jumps ahead.
//!
//! After the step, [`Scheduler::commit`] advances the sequences and registers their newly
//! filled blocks in the prefix cache. Nothing here knows about the model.

use std::collections::{HashMap, VecDeque};

use super::kv_manager::{extend_keys, BlockKey, KvManager};

/// Limits of one step.
#[derive(Clone, Copy, Debug)]
pub struct SchedulerConfig {
    /// Most sequences running at once.
    pub max_num_seqs: usize,
    /// Most tokens in one step.
    pub max_num_batched_tokens: usize,
}

/// A sequence as the scheduler sees it.
#[derive(Clone, Debug)]
pub struct Sequence {
    /// The caller's id.
    pub id: u64,
    /// Prompt, then generated tokens.
    pub tokens: Vec<u32>,
    /// Tokens whose K/V are in the cache.
    pub num_computed: usize,
    /// KV blocks, in logical order.
    pub blocks: Vec<u32>,
    /// Only compute the tokens (to fill the prefix cache); never sample.
    pub fill_only: bool,
    /// Prompt tokens taken from the prefix cache when the sequence was first admitted.
    pub cached_prompt_tokens: Option<usize>,
    /// Times preempted.
    pub preemptions: usize,
    keys: Vec<BlockKey>,
    num_registered: usize,
}

impl Sequence {
    /// A new sequence over `tokens`.
    pub fn new(id: u64, tokens: Vec<u32>, fill_only: bool) -> Self {
        Sequence {
            id,
            tokens,
            num_computed: 0,
            blocks: Vec::new(),
            fill_only,
            cached_prompt_tokens: None,
            preemptions: 0,
            keys: Vec::new(),
            num_registered: 0,
        }
    }
}

/// One sequence's share of a step: `tokens[start..start + len]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Scheduled {
    /// The sequence.
    pub id: u64,
    /// First token of the chunk (= tokens already cached).
    pub start: usize,
    /// Tokens in the chunk.
    pub len: usize,
    /// The chunk ends the sequence's known tokens: sample the next one from its last row.
    pub sample: bool,
}

/// What [`Scheduler::schedule`] decided.
#[derive(Clone, Debug, Default)]
pub struct StepPlan {
    /// Sequences in this step, in row order.
    pub seqs: Vec<Scheduled>,
    /// Sequences preempted in this step.
    pub preempted: Vec<u64>,
    /// Sequences admitted in this step with the prompt tokens their cache hit covered.
    pub admitted: Vec<(u64, usize)>,
}

impl StepPlan {
    /// Tokens in the step.
    pub fn num_tokens(&self) -> usize {
        self.seqs.iter().map(|s| s.len).sum()
    }
}

/// Waiting and running sequences over one [`KvManager`].
#[derive(Debug)]
pub struct Scheduler {
    cfg: SchedulerConfig,
    kv: KvManager,
    seqs: HashMap<u64, Sequence>,
    waiting: VecDeque<u64>,
    running: Vec<u64>,
}

impl Scheduler {
    /// A scheduler over `kv`.
    pub fn new(cfg: SchedulerConfig, kv: KvManager) -> Self {
        assert!(cfg.max_num_seqs > 0 && cfg.max_num_batched_tokens > 0);
        Scheduler {
            cfg,
            kv,
            seqs: HashMap::new(),
            waiting: VecDeque::new(),
            running: Vec::new(),
        }
    }

    /// The block pool.
    pub fn kv(&self) -> &KvManager {
        &self.kv
    }

    /// Sequences waiting (new or preempted).
    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Sequences running.
    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    /// Nothing waiting or running.
    pub fn is_idle(&self) -> bool {
        self.seqs.is_empty()
    }

    /// Waiting sequences that are not prefix-cache fills.
    pub fn num_waiting_requests(&self) -> usize {
        self.waiting
            .iter()
            .filter(|id| !self.seqs[*id].fill_only)
            .count()
    }

    /// A sequence by id.
    pub fn get(&self, id: u64) -> Option<&Sequence> {
        self.seqs.get(&id)
    }

    /// Ids of every sequence, waiting or running.
    pub fn ids(&self) -> Vec<u64> {
        self.seqs.keys().copied().collect()
    }

    /// Queues a sequence (its id must be new, its tokens non-empty).
    pub fn add(&mut self, seq: Sequence) {
        assert!(!seq.tokens.is_empty(), "empty sequence");
        let id = seq.id;
        assert!(
            self.seqs.insert(id, seq).is_none(),
            "duplicate sequence {id}"
        );
        self.waiting.push_back(id);
    }

    /// Appends a generated token to a running sequence.
    pub fn append_token(&mut self, id: u64, token: u32) {
        if let Some(s) = self.seqs.get_mut(&id) {
            s.tokens.push(token);
        }
    }

    /// Removes a sequence (finished, cancelled or failed), releasing its blocks.
    pub fn finish(&mut self, id: u64) -> Option<Sequence> {
        let mut seq = self.seqs.remove(&id)?;
        self.waiting.retain(|&w| w != id);
        self.running.retain(|&r| r != id);
        self.kv.release_all(&mut seq.blocks);
        Some(seq)
    }

    fn preempt(&mut self, id: u64) {
        let seq = self.seqs.get_mut(&id).expect("running sequence");
        self.kv.release_all(&mut seq.blocks);
        seq.num_computed = 0;
        seq.num_registered = 0;
        seq.preemptions += 1;
        self.waiting.push_front(id);
    }

    /// Grows `id`'s blocks to hold `tokens` tokens; `false` when the pool is short.
    fn reserve(&mut self, id: u64, tokens: usize) -> bool {
        let seq = self.seqs.get_mut(&id).expect("sequence");
        self.kv.reserve(&mut seq.blocks, tokens)
    }

    /// Plans the next step. An empty plan means there is nothing to run.
    pub fn schedule(&mut self) -> StepPlan {
        let mut plan = StepPlan::default();
        let mut budget = self.cfg.max_num_batched_tokens;
        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let id = self.running[i];
            let (start, need) = {
                let s = &self.seqs[&id];
                (s.num_computed, s.tokens.len() - s.num_computed)
            };
            let n = need.min(budget);
            let mut self_preempted = false;
            while !self.reserve(id, start + n) {
                let victim = self.running.pop().expect("running is not empty");
                self.preempt(victim);
                plan.preempted.push(victim);
                if victim == id {
                    self_preempted = true;
                    break;
                }
            }
            if self_preempted {
                break;
            }
            let s = &self.seqs[&id];
            plan.seqs.push(Scheduled {
                id,
                start,
                len: n,
                sample: !s.fill_only && start + n == s.tokens.len(),
            });
            budget -= n;
            i += 1;
        }
        if !plan.preempted.is_empty() {
            return plan;
        }
        while budget > 0 && self.running.len() < self.cfg.max_num_seqs {
            let Some(&id) = self.waiting.front() else {
                break;
            };
            let bs = self.kv.block_size();
            let seq = self.seqs.get_mut(&id).expect("waiting sequence");
            // Never the whole sequence: its last token must be computed for its logits.
            let limit = seq.tokens.len() - 1;
            extend_keys(&mut seq.keys, &seq.tokens[..limit], bs);
            let full = limit / bs;
            let hits = self.kv.count_hits(&seq.keys[..full]);
            let hit_tokens = hits * bs;
            let n = (seq.tokens.len() - hit_tokens).min(budget);
            let new_blocks = self.kv.blocks_for(hit_tokens + n) - hits;
            // Taking a hit that no sequence holds takes it out of the free list.
            let free_after_hits = self.kv.num_free() - self.kv.idle_among(&seq.keys[..hits]);
            if new_blocks > free_after_hits {
                break;
            }
            self.waiting.pop_front();
            let seq = self.seqs.get_mut(&id).expect("waiting sequence");
            self.kv.take_hits(&seq.keys, hits, &mut seq.blocks);
            for _ in 0..new_blocks {
                seq.blocks.push(self.kv.allocate().expect("counted free"));
            }
            seq.num_computed = hit_tokens;
            seq.num_registered = hits;
            if seq.cached_prompt_tokens.is_none() {
                seq.cached_prompt_tokens = Some(hit_tokens);
            }
            plan.admitted.push((id, hit_tokens));
            plan.seqs.push(Scheduled {
                id,
                start: hit_tokens,
                len: n,
                sample: !seq.fill_only && hit_tokens + n == seq.tokens.len(),
            });
            self.running.push(id);
            budget -= n;
        }
        plan
    }

    /// Advances the sequences of an executed `plan` and caches their newly filled blocks.
    pub fn commit(&mut self, plan: &StepPlan) {
        let bs = self.kv.block_size();
        for s in &plan.seqs {
            let Some(seq) = self.seqs.get_mut(&s.id) else {
                continue;
            };
            seq.num_computed = s.start + s.len;
            extend_keys(&mut seq.keys, &seq.tokens[..seq.num_computed], bs);
            let full = seq.num_computed / bs;
            for k in seq.num_registered..full {
                self.kv.register(seq.blocks[k], &seq.keys[k]);
            }
            seq.num_registered = seq.num_registered.max(full);
        }
    }

    /// Checks that every block is accounted for: the holders of each block are exactly the
    /// sequences that list it. Used by tests.
    pub fn check(&self) -> std::result::Result<(), String> {
        self.kv.check()?;
        let mut holders = vec![0u32; self.kv.num_blocks()];
        for s in self.seqs.values() {
            for &b in &s.blocks {
                holders[b as usize] += 1;
            }
            if s.blocks.len() < self.kv.blocks_for(s.num_computed) {
                return Err(format!("sequence {} has too few blocks", s.id));
            }
        }
        for (b, &h) in holders.iter().enumerate() {
            if self.kv.ref_count(b as u32) != h {
                return Err(format!(
                    "block {b}: {} references, {h} holders",
                    self.kv.ref_count(b as u32)
                ));
            }
        }
        if self.waiting.len() + self.running.len() != self.seqs.len() {
            return Err("a sequence is neither waiting nor running".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A stand-in for the model: a KV "cache" that records which token each slot holds, so
    /// that every step can check that a sequence's cached positions really hold its tokens
    /// (prefix sharing included).
    struct Sim {
        sched: Scheduler,
        slots: Vec<Option<u32>>,
        bs: usize,
        max_len: usize,
        next_id: u64,
        live: Vec<u64>,
    }

    impl Sim {
        fn new(num_blocks: usize, bs: usize, max_num_seqs: usize, budget: usize) -> Self {
            let sched = Scheduler::new(
                SchedulerConfig {
                    max_num_seqs,
                    max_num_batched_tokens: budget,
                },
                KvManager::new(num_blocks, bs, true),
            );
            Sim {
                sched,
                slots: vec![None; num_blocks * bs],
                bs,
                max_len: num_blocks * bs,
                next_id: 0,
                live: Vec::new(),
            }
        }

        fn slot(&self, seq: &Sequence, p: usize) -> usize {
            seq.blocks[p / self.bs] as usize * self.bs + p % self.bs
        }

        fn add(&mut self, tokens: Vec<u32>) {
            let id = self.next_id;
            self.next_id += 1;
            self.sched.add(Sequence::new(id, tokens, false));
            self.live.push(id);
        }

        fn finish(&mut self, pick: usize) {
            if self.live.is_empty() {
                return;
            }
            let id = self.live.remove(pick % self.live.len());
            assert!(self.sched.finish(id).is_some());
        }

        fn step(&mut self, sampled: u32) {
            let plan = self.sched.schedule();
            let mut rows = 0;
            for s in &plan.seqs {
                let seq = self.sched.get(s.id).unwrap();
                // What the cache holds for this sequence must be its own tokens.
                for p in 0..s.start {
                    assert_eq!(
                        self.slots[self.slot(seq, p)],
                        Some(seq.tokens[p]),
                        "sequence {} position {p} reads another sequence's KV",
                        s.id
                    );
                }
                assert!(s.len > 0 && s.start + s.len <= seq.tokens.len());
                rows += s.len;
            }
            assert!(rows <= self.sched.cfg.max_num_batched_tokens);
            assert!(plan.seqs.len() <= self.sched.cfg.max_num_seqs);
            // "Run" the step: write each chunk's tokens into its slots.
            for s in &plan.seqs {
                let seq = self.sched.get(s.id).unwrap();
                for p in s.start..s.start + s.len {
                    let slot = self.slot(seq, p);
                    self.slots[slot] = Some(seq.tokens[p]);
                }
            }
            self.sched.commit(&plan);
            for s in plan.seqs.iter().filter(|s| s.sample) {
                self.sched.append_token(s.id, sampled);
                let len = self.sched.get(s.id).unwrap().tokens.len();
                if len >= self.max_len.min(64) {
                    self.live.retain(|&l| l != s.id);
                    self.sched.finish(s.id);
                }
            }
            // Something always makes progress.
            assert!(
                !plan.seqs.is_empty() || !plan.preempted.is_empty() || self.sched.is_idle(),
                "nothing was scheduled although {} sequences wait",
                self.sched.num_waiting()
            );
        }
    }

    #[derive(Clone, Debug)]
    enum Op {
        Add(Vec<u32>),
        Step(u32),
        Finish(usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            // Few distinct tokens and shared starts, so that prefixes repeat.
            2 => (prop::collection::vec(0u32..3, 1..40), 0usize..3).prop_map(|(mut t, k)| {
                let shared: Vec<u32> = (0..(k * 8) as u32).collect();
                t.splice(0..0, shared);
                t.truncate(48);
                Op::Add(t)
            }),
            6 => (0u32..3).prop_map(Op::Step),
            1 => any::<usize>().prop_map(Op::Finish),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn blocks_are_never_leaked_or_double_freed(
            ops in prop::collection::vec(op(), 1..120),
            num_blocks in 4usize..24,
            bs in prop::sample::select(vec![1usize, 2, 4, 8]),
            max_num_seqs in 1usize..6,
            budget in 1usize..40,
        ) {
            // Every sequence must fit the pool on its own (the engine guarantees it by
            // sizing the pool for max_model_len).
            let num_blocks = num_blocks.max(64usize.div_ceil(bs));
            let mut sim = Sim::new(num_blocks, bs, max_num_seqs, budget);
            for op in ops {
                match op {
                    Op::Add(t) => sim.add(t),
                    Op::Step(tok) => sim.step(tok),
                    Op::Finish(i) => sim.finish(i),
                }
                sim.sched.check().map_err(TestCaseError::fail)?;
            }
            // Run everything to completion: every sequence ends, and every block returns.
            let mut guard = 0;
            while !sim.sched.is_idle() {
                sim.step(1);
                sim.sched.check().map_err(TestCaseError::fail)?;
                guard += 1;
                prop_assert!(guard < 10_000, "no progress");
            }
            prop_assert_eq!(sim.sched.kv().total_refs(), 0);
            prop_assert_eq!(sim.sched.kv().num_free(), num_blocks);
        }
    }

    #[test]
    fn newest_sequence_is_preempted_and_recomputed() {
        // 4 blocks of 4 tokens; two sequences of 8 tokens each need 2 blocks, then grow.
        let mut sim = Sim::new(4, 4, 4, 64);
        sim.add(vec![1; 8]);
        sim.add(vec![2; 8]);
        sim.step(9); // both prefilled: 9 tokens each after sampling
        let plan = sim.sched.schedule();
        // Each needs a third block; only the oldest gets one, by preempting the newest.
        assert_eq!(plan.preempted, vec![1]);
        assert_eq!(plan.seqs.len(), 1);
        assert_eq!(sim.sched.get(1).unwrap().num_computed, 0);
        assert_eq!(
            sim.sched.get(1).unwrap().tokens.len(),
            9,
            "its output is kept"
        );
        sim.sched.check().unwrap();
    }

    #[test]
    fn a_long_prompt_is_prefilled_in_chunks_alongside_decodes() {
        let mut sim = Sim::new(16, 4, 4, 8);
        sim.add(vec![1; 3]);
        sim.step(5); // the short one is running and decoding
        sim.add(vec![2; 20]);
        let plan = sim.sched.schedule();
        assert_eq!(plan.seqs[0].len, 1, "the decode goes first");
        assert_eq!(
            plan.seqs[1].len, 7,
            "the prompt gets the rest of the budget"
        );
        assert!(!plan.seqs[1].sample);
    }

    #[test]
    fn a_shared_prefix_is_computed_once() {
        let mut sim = Sim::new(16, 4, 4, 64);
        let prefix: Vec<u32> = (0..12).collect();
        sim.add([prefix.clone(), vec![100, 101]].concat());
        sim.step(7);
        sim.add([prefix, vec![200]].concat());
        let plan = sim.sched.schedule();
        assert_eq!(plan.admitted, vec![(1, 12)]);
        let s = plan.seqs.iter().find(|s| s.id == 1).unwrap();
        assert_eq!((s.start, s.len), (12, 1));
    }
}
