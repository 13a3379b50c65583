//! Paged KV cache bookkeeping: which physical blocks each request owns, and the prefix cache.
//!
//! Owns: the [`BlockPool`] (reference-counted blocks, an O(1) LRU free list, the hash → block map of cached
//! full blocks) and the [`KvCacheManager`] that gives requests block tables, finds prefix hits and frees
//! blocks. Pure Rust: no tensors (the model owns the K/V storage and follows the block tables given here).
//!
//! Invariants: a block is either in use (`ref_cnt > 0`) or on the free list, never both; a cached hash maps
//! to exactly one block; block tables are append-only while a request holds them; a prefix hit never covers
//! a request's last prompt token (its logits must be computed).
//! Must not know about: scheduling policy, tensors, requests beyond their token ids.

mod block_pool;
mod hash;
mod manager;

pub use block_pool::{BlockId, BlockPool};
pub use hash::{hash_block, BlockHash, HASH_SEED};
pub use manager::{ContentSpan, KvCacheManager, PrefixHit, RequestKey};
