//! Per-request block tables over the [`BlockPool`], with prefix-cache lookups.
//!
//! ```text
//!   tokens:  [ block 0 full | block 1 full | block 2 partial ]
//!   hashes:    h0 = H(-, b0)  h1 = H(h0, b1)                 (full blocks only)
//!   table:   [ BlockId      , BlockId      , BlockId       ]  append-only while the request runs
//! ```

use crate::block_pool::{BlockId, BlockPool};
use crate::hash::{hash_block, BlockHash, HASH_SEED};
use std::collections::HashMap;

/// The caller's request identifier.
pub type RequestKey = u64;

/// Cached blocks covering a prompt's prefix.
/// Positions of a prompt whose tokens stand for content they do not spell out (an image's placeholder
/// tokens), and a hash of that content.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContentSpan {
    pub range: std::ops::Range<usize>,
    pub hash: u64,
}

/// The extra key of block `i`: the cache's own, mixed with the content hashes of the spans overlapping the
/// block (none: the cache's own, so text-only hashes do not change).
fn block_key(extra_key: u64, block_size: usize, i: usize, spans: &[ContentSpan]) -> u64 {
    let (lo, hi) = (i * block_size, (i + 1) * block_size);
    let mut key = extra_key;
    for s in spans.iter().filter(|s| s.range.start < hi && s.range.end > lo) {
        key = xxhash_rust::xxh3::xxh3_64_with_seed(&[key.to_le_bytes(), s.hash.to_le_bytes()].concat(), HASH_SEED);
    }
    key
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PrefixHit {
    pub blocks: Vec<BlockId>,
    /// Tokens covered: `blocks.len() * block_size`, always less than the prompt length.
    pub num_tokens: usize,
}

#[derive(Debug, Default)]
struct ReqBlocks {
    blocks: Vec<BlockId>,
    /// Hashes of the request's full blocks that have been registered in the cache (a prefix of `blocks`).
    hashes: Vec<BlockHash>,
}

#[derive(Debug)]
pub struct KvCacheManager {
    pool: BlockPool,
    block_size: usize,
    enable_prefix_caching: bool,
    extra_key: u64,
    reqs: HashMap<RequestKey, ReqBlocks>,
    /// Prompt tokens looked up in / served from the prefix cache (for metrics), each request counted once.
    pub prefix_queries: u64,
    pub prefix_hits: u64,
}

impl KvCacheManager {
    /// `extra_key` separates this cache's hashes from other models' (e.g. a hash of the model id).
    pub fn new(num_blocks: usize, block_size: usize, enable_prefix_caching: bool, extra_key: u64) -> Self {
        assert!(block_size > 0, "block_size must be positive");
        Self {
            pool: BlockPool::new(num_blocks),
            block_size,
            enable_prefix_caching,
            extra_key,
            reqs: HashMap::new(),
            prefix_queries: 0,
            prefix_hits: 0,
        }
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_blocks(&self) -> usize {
        self.pool.num_blocks()
    }

    pub fn num_free_blocks(&self) -> usize {
        self.pool.num_free_blocks()
    }

    pub fn usage(&self) -> f64 {
        self.pool.usage()
    }

    pub fn pool(&self) -> &BlockPool {
        &self.pool
    }

    /// Longest run of cached full blocks at the start of `prompt`, never covering its last token (whose
    /// logits must be computed). Takes no references; pass the hit to [`Self::allocate_slots`].
    pub fn find_prefix(&mut self, prompt: &[u32]) -> PrefixHit {
        self.find_prefix_with(prompt, &[])
    }

    /// [`Self::find_prefix`] for a prompt with content spans (images): each block's hash also covers the
    /// content hashes of the spans that overlap it.
    pub fn find_prefix_with(&mut self, prompt: &[u32], spans: &[ContentSpan]) -> PrefixHit {
        if !self.enable_prefix_caching || prompt.is_empty() {
            return PrefixHit::default();
        }
        let max_blocks = (prompt.len() - 1) / self.block_size;
        let mut hit = PrefixHit::default();
        let mut parent = None;
        for (i, chunk) in prompt.chunks_exact(self.block_size).take(max_blocks).enumerate() {
            let h = hash_block(parent, chunk, block_key(self.extra_key, self.block_size, i, spans));
            match self.pool.get_cached_block(h) {
                Some(id) => hit.blocks.push(id),
                None => break,
            }
            parent = Some(h);
        }
        hit.num_tokens = hit.blocks.len() * self.block_size;
        hit
    }

    /// Counts one request's prefix-cache lookup for metrics: `queried` prompt tokens, `hit` of them cached.
    /// The caller records each request once, when it is first admitted (as vLLM counts), not on every
    /// [`Self::find_prefix`] of a request that then had to keep waiting.
    pub fn record_prefix_lookup(&mut self, queried: usize, hit: usize) {
        if self.enable_prefix_caching {
            self.prefix_queries += queried as u64;
            self.prefix_hits += hit as u64;
        }
    }

    /// Makes `req`'s block table cover `num_tokens` tokens. On the request's first allocation `hit` (from
    /// `find_prefix`) becomes the start of its table. Returns false, changing nothing, when the pool cannot
    /// supply the blocks (the caller preempts).
    pub fn allocate_slots(&mut self, req: RequestKey, num_tokens: usize, hit: Option<&PrefixHit>) -> bool {
        let have = self.reqs.get(&req).map_or(0, |r| r.blocks.len());
        let hit_blocks: &[BlockId] = match hit {
            Some(h) if have == 0 => &h.blocks,
            _ => &[],
        };
        let need_total = num_tokens.div_ceil(self.block_size);
        let new_blocks = need_total.saturating_sub(have + hit_blocks.len());
        // Hit blocks sitting on the free list leave it when touched.
        let revived = hit_blocks.iter().filter(|b| self.pool.is_free(**b)).count();
        if new_blocks + revived > self.pool.num_free_blocks() {
            return false;
        }
        self.pool.touch(hit_blocks);
        let fresh = self.pool.get_new_blocks(new_blocks).expect("checked free count");
        let entry = self.reqs.entry(req).or_default();
        if !hit_blocks.is_empty() {
            entry.blocks.extend_from_slice(hit_blocks);
            // The hit's hashes are recomputed lazily by cache_blocks; the chain must match exactly.
        }
        entry.blocks.extend(fresh);
        true
    }

    /// Registers `req`'s newly completed full blocks in the prefix cache. `tokens` are all the request's
    /// tokens so far (prompt then output); `num_computed` of them have K/V written.
    pub fn cache_blocks(&mut self, req: RequestKey, tokens: &[u32], num_computed: usize) {
        self.cache_blocks_with(req, tokens, num_computed, &[])
    }

    /// [`Self::cache_blocks`] for a prompt with content spans (see [`Self::find_prefix_with`]).
    pub fn cache_blocks_with(&mut self, req: RequestKey, tokens: &[u32], num_computed: usize, spans: &[ContentSpan]) {
        if !self.enable_prefix_caching {
            return;
        }
        let (bs, extra) = (self.block_size, self.extra_key);
        let Some(r) = self.reqs.get_mut(&req) else {
            return;
        };
        let full = (num_computed.min(tokens.len()) / self.block_size).min(r.blocks.len());
        while r.hashes.len() < full {
            let i = r.hashes.len();
            let parent = r.hashes.last().copied();
            let h = hash_block(parent, &tokens[i * bs..(i + 1) * bs], block_key(extra, bs, i, spans));
            self.pool.cache_block(r.blocks[i], h);
            r.hashes.push(h);
        }
    }

    /// Frees all of `req`'s blocks (last block first, so a shared prefix outlives tails in the cache).
    pub fn free(&mut self, req: RequestKey) {
        if let Some(r) = self.reqs.remove(&req) {
            self.pool.free_blocks(r.blocks.iter().rev());
        }
    }

    pub fn block_table(&self, req: RequestKey) -> &[BlockId] {
        self.reqs.get(&req).map_or(&[], |r| &r.blocks)
    }

    pub fn num_requests(&self) -> usize {
        self.reqs.len()
    }

    /// For tests: pool invariants plus "every block in a table is in use".
    pub fn check_invariants(&self) {
        self.pool.check_invariants();
        let mut refs: HashMap<BlockId, u32> = HashMap::new();
        for r in self.reqs.values() {
            for b in &r.blocks {
                *refs.entry(*b).or_default() += 1;
            }
        }
        for (b, n) in refs {
            assert_eq!(self.pool.ref_cnt(b), n, "block {} referenced by {n} tables", b.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn toks(n: usize, salt: u32) -> Vec<u32> {
        (0..n as u32).map(|i| i * 7 + salt).collect()
    }

    #[test]
    fn prefix_hit_never_covers_the_last_prompt_token() {
        let mut m = KvCacheManager::new(16, 4, true, 0);
        let p = toks(8, 0);
        assert!(m.allocate_slots(1, 8, None));
        m.cache_blocks(1, &p, 8);
        m.free(1);
        // Exactly two full blocks, but the last token must be recomputed: only one block hits.
        let hit = m.find_prefix(&p);
        assert_eq!(hit.num_tokens, 4);
        let longer = toks(9, 0);
        assert_eq!(m.find_prefix(&longer).num_tokens, 8);
        m.check_invariants();
    }

    #[test]
    fn hit_blocks_are_shared_and_miss_after_divergence() {
        let mut m = KvCacheManager::new(16, 4, true, 0);
        let a = toks(12, 0);
        assert!(m.allocate_slots(1, 12, None));
        m.cache_blocks(1, &a, 12);
        let mut b = a.clone();
        b[6] = 999; // diverges inside block 1
        b.push(5);
        let hit = m.find_prefix(&b);
        assert_eq!(hit.num_tokens, 4);
        assert!(m.allocate_slots(2, b.len(), Some(&hit)));
        assert_eq!(m.block_table(2)[0], m.block_table(1)[0], "shared first block");
        assert_ne!(m.block_table(2)[1], m.block_table(1)[1]);
        assert_eq!(m.pool().ref_cnt(m.block_table(1)[0]), 2);
        m.check_invariants();
    }

    #[test]
    fn disabled_prefix_cache_never_hits() {
        let mut m = KvCacheManager::new(16, 4, false, 0);
        let a = toks(12, 0);
        assert!(m.allocate_slots(1, 12, None));
        m.cache_blocks(1, &a, 12);
        m.free(1);
        assert_eq!(m.find_prefix(&a).num_tokens, 0);
    }

    #[test]
    fn content_spans_separate_blocks_they_overlap_only() {
        let prompt: Vec<u32> = (0..12).collect();
        let img = |hash| [ContentSpan { range: 5..7, hash }];
        let mut m = KvCacheManager::new(16, 4, true, 0);
        m.allocate_slots(1, 12, None);
        m.cache_blocks_with(1, &prompt, 12, &img(7));
        // Same image: all of the first two blocks hit (the last block holds the last token).
        assert_eq!(m.find_prefix_with(&prompt, &img(7)).num_tokens, 8);
        // Another image in the second block: only the first block, which it does not touch, hits.
        assert_eq!(m.find_prefix_with(&prompt, &img(8)).num_tokens, 4);
        // No image at all: the same.
        assert_eq!(m.find_prefix(&prompt).num_tokens, 4);
    }

    #[test]
    fn extra_key_separates_caches() {
        let mut m1 = KvCacheManager::new(8, 4, true, 1);
        let a = toks(9, 0);
        assert!(m1.allocate_slots(1, 9, None));
        m1.cache_blocks(1, &a, 9);
        assert_eq!(m1.find_prefix(&a).num_tokens, 8);
        // Same tokens hashed under another extra key give other hashes.
        assert_ne!(hash_block(None, &a[..4], 1), hash_block(None, &a[..4], 2));
    }

    #[test]
    fn allocation_failure_changes_nothing() {
        let mut m = KvCacheManager::new(3, 4, true, 0);
        assert!(m.allocate_slots(1, 8, None));
        assert!(!m.allocate_slots(2, 8, None), "needs 2 blocks, 1 free");
        assert_eq!(m.num_free_blocks(), 1);
        assert!(m.block_table(2).is_empty());
        assert!(m.allocate_slots(1, 12, None));
        assert_eq!(m.num_free_blocks(), 0);
        m.free(1);
        assert_eq!(m.num_free_blocks(), 3);
        m.check_invariants();
    }

    #[test]
    fn evicted_prefix_is_a_miss() {
        let mut m = KvCacheManager::new(2, 4, true, 0);
        let a = toks(5, 0);
        assert!(m.allocate_slots(1, 5, None));
        m.cache_blocks(1, &a, 5);
        m.free(1);
        assert_eq!(m.find_prefix(&a).num_tokens, 4);
        // Another request takes both blocks: the cached one is reused for new data.
        assert!(m.allocate_slots(2, 8, None));
        assert_eq!(m.find_prefix(&a).num_tokens, 0);
        m.check_invariants();
    }

    #[derive(Debug, Clone)]
    enum Op {
        Add { req: u8, len: u8, shared: bool },
        Grow { req: u8, by: u8 },
        Free { req: u8 },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u8..6, 1u8..40, any::<bool>()).prop_map(|(req, len, shared)| Op::Add { req, len, shared }),
            (0u8..6, 1u8..10).prop_map(|(req, by)| Op::Grow { req, by }),
            (0u8..6).prop_map(|req| Op::Free { req }),
        ]
    }

    proptest! {
        /// Any sequence of add / grow / free keeps ref counts equal to table references, keeps the free
        /// list consistent, and returns every block once all requests are freed (no leaks).
        #[test]
        fn block_pool_invariants_hold(ops in proptest::collection::vec(op(), 1..80)) {
            let mut m = KvCacheManager::new(24, 4, true, 0);
            let mut lens: HashMap<u64, (Vec<u32>, usize)> = HashMap::new();
            for o in ops {
                match o {
                    Op::Add { req, len, shared } => {
                        let req = req as u64;
                        if lens.contains_key(&req) { continue; }
                        let t = toks(len as usize, if shared { 0 } else { req as u32 * 1000 + 1 });
                        let hit = m.find_prefix(&t);
                        prop_assert!(hit.num_tokens < t.len());
                        if m.allocate_slots(req, t.len(), Some(&hit)) {
                            m.cache_blocks(req, &t, t.len());
                            let n = t.len();
                            lens.insert(req, (t, n));
                        }
                    }
                    Op::Grow { req, by } => {
                        let req = req as u64;
                        if let Some((t, n)) = lens.get_mut(&req) {
                            let target = *n + by as usize;
                            if m.allocate_slots(req, target, None) {
                                while t.len() < target { t.push(t.len() as u32); }
                                *n = target;
                                m.cache_blocks(req, t, target);
                            }
                        }
                    }
                    Op::Free { req } => {
                        m.free(req as u64);
                        lens.remove(&(req as u64));
                    }
                }
                m.check_invariants();
                for (r, (_, n)) in &lens {
                    prop_assert!(m.block_table(*r).len() * 4 >= *n);
                }
            }
            for r in lens.keys().copied().collect::<Vec<_>>() { m.free(r); }
            m.check_invariants();
            prop_assert_eq!(m.num_free_blocks(), 24);
        }
    }
}
