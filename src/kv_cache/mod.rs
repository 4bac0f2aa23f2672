//! The paged KV cache's bookkeeping: which fixed-size blocks of the backend's K/V pools
//! belong to which sequence.
//!
//! The storage itself is the backend's ([`crate::backend::Backend::KvCache`]); this module
//! hands out block numbers. A sequence owns a [`BlockTable`] (its logical blocks in order);
//! token `p` of the sequence lives in slot `table[p / block_size] · block_size + p %
//! block_size`. Blocks are reference-counted so that sequences can share a cached prefix.

use crate::backend::SeqSpan;

/// Default tokens per block.
pub const DEFAULT_BLOCK_SIZE: usize = 16;

/// A pool of `num_blocks` KV blocks with reference counts.
#[derive(Debug)]
pub struct BlockPool {
    block_size: usize,
    ref_counts: Vec<u32>,
    free: Vec<u32>,
}

impl BlockPool {
    /// A pool of `num_blocks` free blocks of `block_size` tokens.
    pub fn new(num_blocks: usize, block_size: usize) -> Self {
        assert!(block_size > 0);
        BlockPool {
            block_size,
            ref_counts: vec![0; num_blocks],
            // Popped from the end: hand out low block numbers first.
            free: (0..num_blocks as u32).rev().collect(),
        }
    }

    /// Tokens per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Total blocks.
    pub fn num_blocks(&self) -> usize {
        self.ref_counts.len()
    }

    /// Blocks not held by anyone.
    pub fn num_free(&self) -> usize {
        self.free.len()
    }

    /// Blocks needed to hold `tokens` tokens.
    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_size)
    }

    /// Takes a free block, or `None` when the pool is exhausted.
    pub fn allocate(&mut self) -> Option<u32> {
        let b = self.free.pop()?;
        debug_assert_eq!(self.ref_counts[b as usize], 0);
        self.ref_counts[b as usize] = 1;
        Some(b)
    }

    /// Adds a holder to a block that is in use.
    pub fn retain(&mut self, block: u32) {
        let rc = &mut self.ref_counts[block as usize];
        assert!(*rc > 0, "retain of free block {block}");
        *rc += 1;
    }

    /// Drops one holder of `block`; the block is free again when none remain.
    pub fn release(&mut self, block: u32) {
        let rc = &mut self.ref_counts[block as usize];
        assert!(*rc > 0, "double free of block {block}");
        *rc -= 1;
        if *rc == 0 {
            self.free.push(block);
        }
    }

    /// Reference count of `block`.
    pub fn ref_count(&self, block: u32) -> u32 {
        self.ref_counts[block as usize]
    }
}

/// The blocks of one sequence, in logical order, and how many tokens they hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BlockTable {
    /// Physical block of each logical block.
    pub blocks: Vec<u32>,
    /// Tokens whose K/V are in the cache (`num_computed_tokens` in vLLM's words).
    pub num_tokens: usize,
}

impl BlockTable {
    /// Grows the table so that it can hold `tokens` tokens. Returns `false` (and allocates
    /// nothing) when the pool has too few free blocks.
    pub fn reserve(&mut self, pool: &mut BlockPool, tokens: usize) -> bool {
        let need = pool.blocks_for(tokens).saturating_sub(self.blocks.len());
        if need > pool.num_free() {
            return false;
        }
        for _ in 0..need {
            self.blocks
                .push(pool.allocate().expect("checked free count"));
        }
        true
    }

    /// Forgets every token from `tokens` on, releasing blocks no longer needed.
    pub fn truncate(&mut self, pool: &mut BlockPool, tokens: usize) {
        let keep = pool.blocks_for(tokens);
        for b in self.blocks.drain(keep.min(self.blocks.len())..) {
            pool.release(b);
        }
        self.num_tokens = self.num_tokens.min(tokens);
    }

    /// Releases every block.
    pub fn free(&mut self, pool: &mut BlockPool) {
        self.truncate(pool, 0);
    }

    /// Slot of token position `pos`.
    pub fn slot(&self, pos: usize, block_size: usize) -> u32 {
        (self.blocks[pos / block_size] as usize * block_size + pos % block_size) as u32
    }

    /// The span this sequence contributes to a batch when `len` new tokens start at row
    /// `start` (the caller has reserved room for them).
    pub fn span(&self, start: usize, len: usize) -> SeqSpan {
        SeqSpan {
            start: start as u32,
            len: len as u32,
            context_len: (self.num_tokens + len) as u32,
            block_table: self.blocks.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserve_truncate_and_free_return_every_block() {
        let mut pool = BlockPool::new(4, 16);
        let mut a = BlockTable::default();
        assert!(a.reserve(&mut pool, 33));
        assert_eq!((a.blocks.len(), pool.num_free()), (3, 1));
        let mut b = BlockTable::default();
        assert!(!b.reserve(&mut pool, 17), "only one block is left");
        assert_eq!(pool.num_free(), 1, "a failed reserve allocates nothing");
        a.num_tokens = 33;
        a.truncate(&mut pool, 16);
        assert_eq!((a.blocks.len(), a.num_tokens, pool.num_free()), (1, 16, 3));
        a.free(&mut pool);
        assert_eq!(pool.num_free(), 4);
    }

    #[test]
    fn shared_block_is_freed_by_its_last_holder() {
        let mut pool = BlockPool::new(2, 4);
        let blk = pool.allocate().unwrap();
        pool.retain(blk);
        pool.release(blk);
        assert_eq!(pool.num_free(), 1);
        pool.release(blk);
        assert_eq!(pool.num_free(), 2);
    }
}
