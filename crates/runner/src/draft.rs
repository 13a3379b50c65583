//! The draft model of speculative decoding: a smaller model with the target's vocabulary, its own paged KV
//! cache and block tables, kept in step with each sequence's tokens.
//!
//! For every sequence it remembers the tokens whose K/V it holds. Before proposing it compares them with the
//! sequence's tokens now: the common prefix stays (rejected drafts and anything else that changed are simply
//! recomputed over), the rest runs in one batched catch-up pass whose last row gives the first draft token,
//! then each further draft token takes one batched single-token pass. Draft tokens are the draft's argmax:
//! the proposal is deterministic, as the verification rule in [`crate::speculative`] assumes.

use crate::executor::FlatBatch;
use crate::sampler::argmax;
use mlx_serving_engine::RequestId;
use mlx_serving_kv_cache::KvCacheManager;
use mlx_serving_models::{ModelBundle, PagedKvCache};
use std::collections::HashMap;
use std::sync::Arc;

pub struct DraftModel {
    bundle: Arc<ModelBundle>,
    cache: PagedKvCache,
    blocks: KvCacheManager,
    /// Per sequence, the tokens whose K/V the draft cache holds (positions 0..len).
    computed: HashMap<RequestId, Vec<u32>>,
    /// Cost of a draft token relative to a target decode step (the ratio of their weights' bytes).
    relative_cost: f64,
}

impl DraftModel {
    /// A draft for `target`, with a KV cache of `num_blocks` blocks of `block_size` tokens. Refuses a draft
    /// whose tokenizer differs from the target's: its tokens would mean other text.
    pub fn new(
        draft: Arc<ModelBundle>,
        target: &ModelBundle,
        block_size: usize,
        num_blocks: usize,
    ) -> Result<Self, String> {
        let (dv, tv) = (draft.tokenizer.get_vocab(true), target.tokenizer.get_vocab(true));
        if dv != tv {
            return Err(format!(
                "the draft model's vocabulary ({} tokens) differs from the target's ({} tokens)",
                dv.len(),
                tv.len()
            ));
        }
        let (dc, tc) = (draft.model.config(), target.model.config());
        if dc.vocab_size > tc.vocab_size {
            return Err(format!(
                "the draft model's output has {} rows, more than the target's {}",
                dc.vocab_size, tc.vocab_size
            ));
        }
        let bytes = |b: &ModelBundle| {
            mlx_serving_models::weight_bytes(&b.path).map_err(|e| format!("{}: {e}", b.path.display()))
        };
        let relative_cost = bytes(&draft)? as f64 / bytes(target)?.max(1) as f64;
        let cache = PagedKvCache::new(dc, block_size, num_blocks);
        let blocks = KvCacheManager::new(num_blocks, block_size, false, 0);
        Ok(Self { bundle: draft, cache, blocks, computed: HashMap::new(), relative_cost })
    }

    /// Bytes of the draft's KV cache for `num_blocks` blocks of `block_size` tokens.
    pub fn cache_bytes(draft: &ModelBundle, block_size: usize, num_blocks: usize) -> usize {
        PagedKvCache::bytes_per_block(draft.model.config(), block_size) * num_blocks
    }

    pub fn relative_cost(&self) -> f64 {
        self.relative_cost
    }

    /// Up to `k` draft tokens after each sequence's `tokens`. A sequence the draft cache has no room for
    /// gets none (and its draft state is dropped, giving its blocks to the others).
    pub fn propose(
        &mut self,
        wanted: &[&(RequestId, Vec<u32>, usize)],
    ) -> Result<HashMap<RequestId, Vec<u32>>, String> {
        let mut live: Vec<(RequestId, &[u32], usize)> = Vec::new();
        for (id, tokens, k) in wanted.iter().map(|w| (w.0, &w.1[..], w.2)) {
            if tokens.is_empty() || k == 0 {
                continue;
            }
            // The draft writes K/V up to the last draft token it feeds back: `tokens.len() + k - 1` positions.
            if !self.blocks.allocate_slots(id.0, tokens.len() + k - 1, None) {
                self.remove(id);
                continue;
            }
            live.push((id, tokens, k));
        }
        let mut drafts: HashMap<RequestId, Vec<u32>> = HashMap::new();
        if live.is_empty() {
            return Ok(drafts);
        }
        // Catch-up: each sequence's tokens after the common prefix with what the cache holds (at least its
        // last token, whose logits give the first draft).
        let tables: Vec<Vec<u32>> =
            live.iter().map(|(id, _, _)| self.blocks.block_table(id.0).iter().map(|b| b.0).collect()).collect();
        let mut batch = FlatBatch::new(self.cache.block_size());
        for ((id, tokens, _), table) in live.iter().zip(&tables) {
            let held = self.computed.get(id).map_or(&[][..], |c| &c[..]);
            let common = held.iter().zip(tokens.iter()).take_while(|(a, b)| a == b).count().min(tokens.len() - 1);
            batch.push(&tokens[common..], common, table, 1).map_err(|e| format!("draft batch: {e}"))?;
        }
        let mut next = self.run(&batch)?;
        for (id, tokens, _) in &live {
            self.computed.insert(*id, tokens.to_vec());
        }
        // Then one token per pass: in round `r`, `next` holds each sequence's draft token `r`, fed back at
        // position `len + r - 1` while the sequence wants more.
        let max_k = live.iter().map(|l| l.2).max().unwrap_or(0);
        for round in 1..=max_k {
            let mut batch = FlatBatch::new(self.cache.block_size());
            let mut fed = Vec::new();
            for (i, ((id, tokens, k), table)) in live.iter().zip(&tables).enumerate() {
                if round > *k {
                    continue;
                }
                drafts.entry(*id).or_default().push(next[i]);
                if round < *k {
                    batch
                        .push(&[next[i]], tokens.len() + round - 1, table, 1)
                        .map_err(|e| format!("draft batch: {e}"))?;
                    fed.push(i);
                }
            }
            if fed.is_empty() {
                break;
            }
            let out = self.run(&batch)?;
            for (&i, t) in fed.iter().zip(out) {
                self.computed.get_mut(&live[i].0).expect("inserted above").push(next[i]);
                next[i] = t;
            }
        }
        Ok(drafts)
    }

    /// Runs `batch` and returns each logits row's argmax.
    fn run(&mut self, batch: &FlatBatch) -> Result<Vec<u32>, String> {
        let logits = self.bundle.model.forward(&batch.input(), &mut self.cache).map_err(|e| e.to_string())?;
        let width = self.bundle.model.logits_width();
        Ok(logits.chunks_exact(width).map(argmax).collect())
    }

    /// Frees a sequence's draft blocks.
    pub fn remove(&mut self, id: RequestId) {
        self.blocks.free(id.0);
        self.computed.remove(&id);
    }
}
