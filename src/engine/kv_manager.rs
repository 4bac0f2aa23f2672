//! The block pool of the engine's paged KV cache, with prefix caching.
//!
//! Every block is either held (reference count > 0), free, or free-but-cached: a block whose
//! contents are the keys and values of a known token prefix. A full block's identity is a
//! hash chained over the prefix — `hash(parent block's hash, this block's token ids)` — so
//! two sequences that share their first `k · block_size` tokens share their first `k`
//! blocks. Cached blocks that no sequence holds sit in an LRU list and are reused (and
//! forgotten) only when no never-cached block is left; a lookup that hits one takes it back
//! out of the list.
//!
//! Hashes are 64-bit; a hit is confirmed by comparing the stored parent hash and token ids,
//! so a collision can only cost a miss, never a wrong answer.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};

/// Default tokens per block.
pub const DEFAULT_BLOCK_SIZE: usize = 16;

/// The identity of a full block: its chained hash plus what was hashed, for confirmation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockKey {
    /// Hash of `parent` and `tokens`.
    pub hash: u64,
    /// Hash of the previous block of the prefix (`0` for the first block).
    pub parent: u64,
    /// The block's token ids.
    pub tokens: Vec<u32>,
}

impl BlockKey {
    /// The key of a block holding `tokens` after the block whose hash is `parent`.
    pub fn new(parent: u64, tokens: &[u32]) -> Self {
        // SipHash with fixed keys: stable within and across runs.
        #[allow(deprecated)]
        let mut h = std::hash::SipHasher::new_with_keys(0x7769_636b, 0x006b_7663_6163_6865);
        parent.hash(&mut h);
        tokens.hash(&mut h);
        BlockKey {
            hash: h.finish() | 1, // never 0, which stands for "no parent"
            parent,
            tokens: tokens.to_vec(),
        }
    }
}

/// Keys of the full blocks of `tokens`, continuing the chain of `known` (keys already
/// computed for the first `known.len()` blocks).
pub fn extend_keys(known: &mut Vec<BlockKey>, tokens: &[u32], block_size: usize) {
    let full = tokens.len() / block_size;
    while known.len() < full {
        let i = known.len();
        let parent = known.last().map_or(0, |k| k.hash);
        known.push(BlockKey::new(
            parent,
            &tokens[i * block_size..(i + 1) * block_size],
        ));
    }
}

/// Blocks, reference counts and the prefix cache.
///
/// Everything it keeps per block (counts, the cached keys, the LRU links, the hash index's
/// room) is allocated at creation, so that serving never allocates here and the memory does
/// not grow as the cache fills.
#[derive(Debug)]
pub struct KvManager {
    block_size: usize,
    ref_counts: Vec<u32>,
    /// Free blocks holding nothing reusable.
    free: Vec<u32>,
    /// Free blocks holding a cached prefix, least recently released first.
    lru: Lru,
    /// The hash of each cached block's key; 0 for a block that caches nothing. Empty when
    /// caching is off, as are `parents` and `tokens`.
    hashes: Vec<u64>,
    /// The parent hash of each cached block's key.
    parents: Vec<u64>,
    /// The token ids of each cached block's key, `block_size` per block.
    tokens: Vec<u32>,
    /// Cached blocks by hash.
    by_hash: HashMap<u64, u32>,
    caching: bool,
}

/// No block.
const NIL: u32 = u32::MAX;

/// A list of blocks threaded through per-block links, for O(1) removal from the middle
/// without allocating.
#[derive(Debug)]
struct Lru {
    prev: Vec<u32>,
    next: Vec<u32>,
    head: u32,
    tail: u32,
    len: usize,
}

impl Lru {
    fn new(n: usize) -> Self {
        Lru {
            prev: vec![NIL; n],
            next: vec![NIL; n],
            head: NIL,
            tail: NIL,
            len: 0,
        }
    }

    /// Whether `b` is in the list: the head, or a block with a predecessor.
    fn contains(&self, b: u32) -> bool {
        self.head == b || self.prev[b as usize] != NIL
    }

    /// Appends `b` at the most-recent end.
    fn push_back(&mut self, b: u32) {
        debug_assert!(!self.contains(b));
        let i = b as usize;
        self.prev[i] = self.tail;
        self.next[i] = NIL;
        match self.tail {
            NIL => self.head = b,
            t => self.next[t as usize] = b,
        }
        self.tail = b;
        self.len += 1;
    }

    fn remove(&mut self, b: u32) {
        debug_assert!(self.contains(b));
        let i = b as usize;
        let (p, n) = (self.prev[i], self.next[i]);
        match p {
            NIL => self.head = n,
            p => self.next[p as usize] = n,
        }
        match n {
            NIL => self.tail = p,
            n => self.prev[n as usize] = p,
        }
        (self.prev[i], self.next[i]) = (NIL, NIL);
        self.len -= 1;
    }

    /// Takes the least recently appended block.
    fn pop_front(&mut self) -> Option<u32> {
        let b = self.head;
        (b != NIL).then(|| {
            self.remove(b);
            b
        })
    }

    /// The blocks, least recent first.
    fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        std::iter::successors((self.head != NIL).then_some(self.head), |&b| {
            let n = self.next[b as usize];
            (n != NIL).then_some(n)
        })
    }
}

impl KvManager {
    /// `num_blocks` blocks of `block_size` tokens; `caching` turns prefix reuse on.
    pub fn new(num_blocks: usize, block_size: usize, caching: bool) -> Self {
        use crate::resources::resident_zeroed;
        assert!(block_size > 0);
        let cached = if caching { num_blocks } else { 0 };
        // The index's table is written once through so that its memory, too, is resident
        // from the start; `clear` keeps the table.
        let mut by_hash = HashMap::with_capacity(cached);
        by_hash.extend((0..cached as u64).map(|h| (h, 0)));
        by_hash.clear();
        KvManager {
            block_size,
            ref_counts: resident_zeroed(num_blocks),
            free: (0..num_blocks as u32).rev().collect(),
            lru: Lru::new(cached),
            hashes: resident_zeroed(cached),
            parents: resident_zeroed(cached),
            tokens: resident_zeroed(cached * block_size),
            by_hash,
            caching,
        }
    }

    /// Whether `block` holds a cached prefix.
    fn is_cached(&self, block: u32) -> bool {
        self.caching && self.hashes[block as usize] != 0
    }

    /// The cached token ids of `block`.
    fn tokens_of(&self, block: u32) -> &[u32] {
        let bs = self.block_size;
        &self.tokens[block as usize * bs..][..bs]
    }

    /// Tokens per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Whether prefix caching is on.
    pub fn caching(&self) -> bool {
        self.caching
    }

    /// Blocks in the pool.
    pub fn num_blocks(&self) -> usize {
        self.ref_counts.len()
    }

    /// Blocks that can be allocated (free, cached or not).
    pub fn num_free(&self) -> usize {
        self.free.len() + self.lru.len
    }

    /// Free blocks that still hold a cached prefix.
    pub fn num_cached_free(&self) -> usize {
        self.lru.len
    }

    /// Blocks held by at least one sequence.
    pub fn num_used(&self) -> usize {
        self.num_blocks() - self.num_free()
    }

    /// Reference count of `block`.
    pub fn ref_count(&self, block: u32) -> u32 {
        self.ref_counts[block as usize]
    }

    /// Blocks needed for `tokens` tokens.
    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_size)
    }

    /// Takes a block: a never-cached one if any, else the least recently released cached
    /// one (which is forgotten). `None` when every block is held.
    pub fn allocate(&mut self) -> Option<u32> {
        let b = match self.free.pop() {
            Some(b) => b,
            None => {
                let b = self.lru.pop_front()?;
                let hash = std::mem::take(&mut self.hashes[b as usize]);
                self.by_hash.remove(&hash);
                b
            }
        };
        debug_assert_eq!(self.ref_counts[b as usize], 0);
        self.ref_counts[b as usize] = 1;
        Some(b)
    }

    /// Drops one holder of `block`. A block nobody holds becomes free; if it is cached it
    /// goes to the most-recent end of the LRU list.
    pub fn release(&mut self, block: u32) {
        let rc = &mut self.ref_counts[block as usize];
        assert!(*rc > 0, "double free of KV block {block}");
        *rc -= 1;
        if *rc == 0 {
            if self.is_cached(block) {
                self.lru.push_back(block);
            } else {
                self.free.push(block);
            }
        }
    }

    /// Grows a sequence's `blocks` to hold `tokens` tokens; `false`, taking nothing, when
    /// the pool is short.
    pub fn reserve(&mut self, blocks: &mut Vec<u32>, tokens: usize) -> bool {
        let need = self.blocks_for(tokens).saturating_sub(blocks.len());
        if need > self.num_free() {
            return false;
        }
        for _ in 0..need {
            blocks.push(self.allocate().expect("counted free"));
        }
        true
    }

    /// Shrinks a sequence's `blocks` to those `tokens` tokens need, releasing the rest (last
    /// block first).
    pub fn truncate(&mut self, blocks: &mut Vec<u32>, tokens: usize) {
        let keep = self.blocks_for(tokens);
        while blocks.len() > keep {
            let b = blocks.pop().expect("longer than keep");
            self.release(b);
        }
    }

    /// Releases a sequence's blocks, last block first, so that a prefix's tail is evicted
    /// before its head.
    pub fn release_all(&mut self, blocks: &mut Vec<u32>) {
        while let Some(b) = blocks.pop() {
            self.release(b);
        }
    }

    /// The cached block holding `key`, if any.
    fn find(&self, key: &BlockKey) -> Option<u32> {
        let &b = self.by_hash.get(&key.hash)?;
        let same = self.hashes[b as usize] == key.hash
            && self.parents[b as usize] == key.parent
            && self.tokens_of(b) == key.tokens;
        same.then_some(b)
    }

    /// How many of `keys` (a prefix's blocks, in order) are cached, from the first on.
    pub fn count_hits(&self, keys: &[BlockKey]) -> usize {
        if !self.caching {
            return 0;
        }
        keys.iter().take_while(|k| self.find(k).is_some()).count()
    }

    /// How many of the cached blocks of `keys` no sequence holds.
    pub fn idle_among(&self, keys: &[BlockKey]) -> usize {
        keys.iter()
            .filter_map(|k| self.find(k))
            .filter(|&b| self.ref_counts[b as usize] == 0)
            .count()
    }

    /// Takes a reference to each of the first `n` blocks of `keys`, which must be cached
    /// ([`KvManager::count_hits`] ≥ `n`), and appends them to `blocks`.
    pub fn take_hits(&mut self, keys: &[BlockKey], n: usize, blocks: &mut Vec<u32>) {
        for key in &keys[..n] {
            let b = self.find(key).expect("counted as a hit");
            if self.ref_counts[b as usize] == 0 {
                self.lru.remove(b);
            }
            self.ref_counts[b as usize] += 1;
            blocks.push(b);
        }
    }

    /// Records that held block `block` now holds the full block `key`. Does nothing when
    /// caching is off, the block is already cached, or another block holds the same key.
    pub fn register(&mut self, block: u32, key: &BlockKey) {
        if !self.caching || self.is_cached(block) || key.tokens.len() != self.block_size {
            return;
        }
        debug_assert!(self.ref_counts[block as usize] > 0);
        if self.by_hash.contains_key(&key.hash) {
            return;
        }
        self.by_hash.insert(key.hash, block);
        let i = block as usize;
        self.hashes[i] = key.hash;
        self.parents[i] = key.parent;
        let bs = self.block_size;
        self.tokens[i * bs..][..bs].copy_from_slice(&key.tokens);
    }

    /// Sum of all reference counts (for invariant checks).
    pub fn total_refs(&self) -> u64 {
        self.ref_counts.iter().map(|&r| r as u64).sum()
    }

    /// Checks the pool's internal consistency; used by tests.
    pub fn check(&self) -> std::result::Result<(), String> {
        let n = self.num_blocks();
        let mut seen = vec![false; n];
        for b in self.free.iter().copied().chain(self.lru.iter()) {
            if std::mem::replace(&mut seen[b as usize], true) {
                return Err(format!("block {b} is free twice"));
            }
            if self.ref_counts[b as usize] != 0 {
                return Err(format!("free block {b} has holders"));
            }
        }
        for (b, &rc) in self.ref_counts.iter().enumerate() {
            if rc == 0 && !seen[b] {
                return Err(format!("block {b} leaked"));
            }
        }
        if self.lru.iter().count() != self.lru.len {
            return Err("the LRU list's length is off".into());
        }
        for b in self.lru.iter() {
            if !self.is_cached(b) {
                return Err(format!("uncached block {b} in the LRU list"));
            }
        }
        for (h, &b) in &self.by_hash {
            if self.hashes[b as usize] != *h {
                return Err(format!("hash index points at block {b} with another key"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(tokens: &[u32], bs: usize) -> Vec<BlockKey> {
        let mut k = Vec::new();
        extend_keys(&mut k, tokens, bs);
        k
    }

    #[test]
    fn reserve_truncate_and_release_return_every_block() {
        let mut kv = KvManager::new(4, 16, false);
        let mut a = Vec::new();
        assert!(kv.reserve(&mut a, 33));
        assert_eq!((a.len(), kv.num_free()), (3, 1));
        let mut b = Vec::new();
        assert!(!kv.reserve(&mut b, 17), "only one block is left");
        assert_eq!(kv.num_free(), 1, "a failed reserve allocates nothing");
        kv.truncate(&mut a, 16);
        assert_eq!((a.len(), kv.num_free()), (1, 3));
        kv.release_all(&mut a);
        assert_eq!(kv.num_free(), 4);
        kv.check().unwrap();
    }

    #[test]
    fn a_released_prefix_is_found_again_and_shared() {
        let mut kv = KvManager::new(8, 4, true);
        let prompt: Vec<u32> = (0..10).collect();
        let ks = keys(&prompt, 4);
        assert_eq!(ks.len(), 2);
        let mut a = Vec::new();
        for k in &ks {
            let b = kv.allocate().unwrap();
            kv.register(b, k);
            a.push(b);
        }
        // A second sequence with the same first 8 tokens shares both blocks.
        assert_eq!(kv.count_hits(&ks), 2);
        let mut b = Vec::new();
        kv.take_hits(&ks, 2, &mut b);
        assert_eq!(a, b);
        assert_eq!(kv.ref_count(a[0]), 2);
        kv.release_all(&mut a);
        kv.release_all(&mut b);
        assert_eq!((kv.num_free(), kv.num_cached_free()), (8, 2));
        // Still cached after release; a different second block only matches the first.
        let other: Vec<u32> = (0..4).chain(100..104).collect();
        assert_eq!(kv.count_hits(&keys(&other, 4)), 1);
        kv.check().unwrap();
    }

    #[test]
    fn cached_blocks_are_evicted_last_and_tail_first() {
        let mut kv = KvManager::new(3, 2, true);
        let ks = keys(&[1, 2, 3, 4], 2);
        let mut held = Vec::new();
        for k in &ks {
            let b = kv.allocate().unwrap();
            kv.register(b, k);
            held.push(b);
        }
        kv.release_all(&mut held);
        // The never-cached block goes first, then the tail of the prefix.
        let x = kv.allocate().unwrap();
        assert_eq!(kv.count_hits(&ks), 2);
        let y = kv.allocate().unwrap();
        assert_eq!(kv.count_hits(&ks), 1, "the tail block was evicted");
        let z = kv.allocate().unwrap();
        assert_eq!(kv.count_hits(&ks), 0);
        assert!(kv.allocate().is_none());
        for b in [x, y, z] {
            kv.release(b);
        }
        kv.check().unwrap();
        assert_eq!(kv.total_refs(), 0);
    }

    #[test]
    fn same_tokens_after_a_different_prefix_do_not_match() {
        let a = keys(&[1, 2, 3, 4], 2);
        let b = keys(&[9, 9, 3, 4], 2);
        assert_ne!(a[1], b[1]);
        let mut kv = KvManager::new(4, 2, true);
        let blk = kv.allocate().unwrap();
        kv.register(blk, &a[1]);
        assert_eq!(kv.count_hits(&b[1..]), 0);
    }

    #[test]
    fn caching_off_never_hits() {
        let mut kv = KvManager::new(2, 2, false);
        let ks = keys(&[1, 2], 2);
        let b = kv.allocate().unwrap();
        kv.register(b, &ks[0]);
        kv.release(b);
        assert_eq!(kv.count_hits(&ks), 0);
        assert_eq!(kv.num_cached_free(), 0);
    }
}
