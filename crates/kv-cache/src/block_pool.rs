//! Reference-counted KV blocks with an O(1) LRU free list and lazily evicted prefix-cache entries.
//!
//! ```text
//!   free list:  head (evicted first) <-> ... <-> tail (freed most recently)
//!   block:      ref_cnt > 0  → in use, not on the list
//!               ref_cnt == 0 → on the list; may still carry a hash (a cached prefix block, reusable until
//!                              it reaches the head and is handed out for new data)
//! ```

use crate::hash::BlockHash;
use std::collections::HashMap;

/// Index of a physical KV block.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockId(pub u32);

const NIL: u32 = u32::MAX;

#[derive(Clone, Debug)]
struct Block {
    ref_cnt: u32,
    hash: Option<BlockHash>,
    prev: u32,
    next: u32,
    on_free_list: bool,
}

#[derive(Debug)]
pub struct BlockPool {
    blocks: Vec<Block>,
    head: u32,
    tail: u32,
    num_free: usize,
    cached: HashMap<BlockHash, BlockId>,
}

impl BlockPool {
    pub fn new(num_blocks: usize) -> Self {
        assert!(num_blocks < NIL as usize, "too many blocks");
        let blocks = (0..num_blocks as u32)
            .map(|i| Block {
                ref_cnt: 0,
                hash: None,
                prev: if i == 0 { NIL } else { i - 1 },
                next: if i + 1 == num_blocks as u32 { NIL } else { i + 1 },
                on_free_list: true,
            })
            .collect();
        let (head, tail) = if num_blocks == 0 { (NIL, NIL) } else { (0, num_blocks as u32 - 1) };
        Self { blocks, head, tail, num_free: num_blocks, cached: HashMap::new() }
    }

    pub fn num_blocks(&self) -> usize {
        self.blocks.len()
    }

    pub fn num_free_blocks(&self) -> usize {
        self.num_free
    }

    /// Fraction of blocks in use, 0.0–1.0.
    pub fn usage(&self) -> f64 {
        if self.blocks.is_empty() {
            return 0.0;
        }
        1.0 - self.num_free as f64 / self.blocks.len() as f64
    }

    pub fn ref_cnt(&self, id: BlockId) -> u32 {
        self.blocks[id.0 as usize].ref_cnt
    }

    fn unlink(&mut self, i: u32) {
        let (prev, next) = (self.blocks[i as usize].prev, self.blocks[i as usize].next);
        if prev == NIL {
            self.head = next;
        } else {
            self.blocks[prev as usize].next = next;
        }
        if next == NIL {
            self.tail = prev;
        } else {
            self.blocks[next as usize].prev = prev;
        }
        let b = &mut self.blocks[i as usize];
        b.prev = NIL;
        b.next = NIL;
        b.on_free_list = false;
        self.num_free -= 1;
    }

    fn push_tail(&mut self, i: u32) {
        let tail = self.tail;
        {
            let b = &mut self.blocks[i as usize];
            b.prev = tail;
            b.next = NIL;
            b.on_free_list = true;
        }
        if tail == NIL {
            self.head = i;
        } else {
            self.blocks[tail as usize].next = i;
        }
        self.tail = i;
        self.num_free += 1;
    }

    /// Takes `n` blocks from the head of the free list (evicting their cached hashes), each with
    /// `ref_cnt = 1`. `None`, and no change, when fewer than `n` are free.
    pub fn get_new_blocks(&mut self, n: usize) -> Option<Vec<BlockId>> {
        if n > self.num_free {
            return None;
        }
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let i = self.head;
            self.unlink(i);
            let b = &mut self.blocks[i as usize];
            if let Some(h) = b.hash.take() {
                if self.cached.get(&h) == Some(&BlockId(i)) {
                    self.cached.remove(&h);
                }
            }
            b.ref_cnt = 1;
            out.push(BlockId(i));
        }
        Some(out)
    }

    /// Takes another reference to blocks found in the prefix cache (they may be on the free list).
    pub fn touch(&mut self, ids: &[BlockId]) {
        for id in ids {
            if self.blocks[id.0 as usize].on_free_list {
                self.unlink(id.0);
            }
            self.blocks[id.0 as usize].ref_cnt += 1;
        }
    }

    /// Drops one reference from each block; blocks reaching zero go to the tail of the free list, keeping
    /// their hash. Pass a request's blocks last-first so its tail is evicted before its shared prefix.
    pub fn free_blocks<'a>(&mut self, ids: impl IntoIterator<Item = &'a BlockId>) {
        for id in ids {
            let b = &mut self.blocks[id.0 as usize];
            assert!(b.ref_cnt > 0, "double free of block {}", id.0);
            b.ref_cnt -= 1;
            if b.ref_cnt == 0 {
                self.push_tail(id.0);
            }
        }
    }

    /// Registers a full block under `hash`. If another block already holds that hash the first one stays
    /// the cached copy and this block stays unhashed.
    pub fn cache_block(&mut self, id: BlockId, hash: BlockHash) {
        if self.blocks[id.0 as usize].hash.is_some() {
            return;
        }
        if let std::collections::hash_map::Entry::Vacant(e) = self.cached.entry(hash) {
            e.insert(id);
            self.blocks[id.0 as usize].hash = Some(hash);
        }
    }

    pub fn get_cached_block(&self, hash: BlockHash) -> Option<BlockId> {
        self.cached.get(&hash).copied()
    }

    pub fn is_free(&self, id: BlockId) -> bool {
        self.blocks[id.0 as usize].on_free_list
    }

    /// Checks every invariant; for tests. Panics with the first violation.
    pub fn check_invariants(&self) {
        let mut seen = 0;
        let mut i = self.head;
        let mut prev = NIL;
        while i != NIL {
            let b = &self.blocks[i as usize];
            assert!(b.on_free_list && b.ref_cnt == 0, "block {i} on the free list with ref_cnt {}", b.ref_cnt);
            assert_eq!(b.prev, prev, "broken back link at {i}");
            prev = i;
            i = b.next;
            seen += 1;
            assert!(seen <= self.blocks.len(), "cycle in the free list");
        }
        assert_eq!(prev, self.tail, "tail mismatch");
        assert_eq!(seen, self.num_free, "free count mismatch");
        for (n, b) in self.blocks.iter().enumerate() {
            assert_eq!(
                b.on_free_list,
                b.ref_cnt == 0,
                "block {n}: ref_cnt {} but on_free_list {}",
                b.ref_cnt,
                b.on_free_list
            );
            if let Some(h) = b.hash {
                assert_eq!(self.cached.get(&h), Some(&BlockId(n as u32)), "block {n} hash not in the map");
            }
        }
        for (h, id) in &self.cached {
            assert_eq!(self.blocks[id.0 as usize].hash, Some(*h), "map entry for block {} is stale", id.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocation_is_fifo_and_bounded() {
        let mut p = BlockPool::new(4);
        assert_eq!(p.get_new_blocks(3).unwrap(), vec![BlockId(0), BlockId(1), BlockId(2)]);
        assert!(p.get_new_blocks(2).is_none(), "only one left");
        assert_eq!(p.num_free_blocks(), 1);
        p.check_invariants();
    }

    #[test]
    fn freed_blocks_go_to_the_tail_and_keep_their_hash_until_reused() {
        let mut p = BlockPool::new(3);
        let b = p.get_new_blocks(3).unwrap();
        p.cache_block(b[0], BlockHash(7));
        p.free_blocks(b.iter().rev());
        assert_eq!(p.get_cached_block(BlockHash(7)), Some(b[0]), "lazy eviction keeps the hash");
        // Free order was 2, 1, 0: block 2 is handed out first, the cached block 0 last.
        assert_eq!(p.get_new_blocks(2).unwrap(), vec![b[2], b[1]]);
        assert_eq!(p.get_cached_block(BlockHash(7)), Some(b[0]));
        assert_eq!(p.get_new_blocks(1).unwrap(), vec![b[0]]);
        assert_eq!(p.get_cached_block(BlockHash(7)), None, "evicted when reused");
        p.check_invariants();
    }

    #[test]
    fn touch_revives_a_free_cached_block_and_shares_a_used_one() {
        let mut p = BlockPool::new(2);
        let b = p.get_new_blocks(1).unwrap();
        p.cache_block(b[0], BlockHash(1));
        p.free_blocks(&b);
        assert_eq!(p.num_free_blocks(), 2);
        p.touch(&b);
        assert_eq!((p.num_free_blocks(), p.ref_cnt(b[0])), (1, 1));
        p.touch(&b);
        assert_eq!(p.ref_cnt(b[0]), 2);
        p.free_blocks(&b);
        assert!(!p.is_free(b[0]));
        p.free_blocks(&b);
        assert!(p.is_free(b[0]));
        p.check_invariants();
    }

    #[test]
    fn duplicate_hash_keeps_the_first_block() {
        let mut p = BlockPool::new(2);
        let b = p.get_new_blocks(2).unwrap();
        p.cache_block(b[0], BlockHash(5));
        p.cache_block(b[1], BlockHash(5));
        assert_eq!(p.get_cached_block(BlockHash(5)), Some(b[0]));
        p.check_invariants();
    }

    #[test]
    #[should_panic(expected = "double free")]
    fn double_free_is_caught() {
        let mut p = BlockPool::new(1);
        let b = p.get_new_blocks(1).unwrap();
        p.free_blocks(&b);
        p.free_blocks(&b);
    }
}
