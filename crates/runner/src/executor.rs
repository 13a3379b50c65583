//! The engine's `Executor` on a real model: turns a `SchedulerOutput` into one flattened forward pass over
//! the paged KV cache, then samples every sequence that reached the end of its known tokens.
//!
//! Per-request sampler state (RNG, generated tokens for penalties) lives here from the request's first
//! step until `remove_request`, so a preempted request resumes with the same RNG stream.

use crate::sampler::{token_logprobs, Sampler};
use mlx_serving_engine::{
    Executor, ExecutorError, Heartbeat, RequestId, RunnerOutput, SchedulerConfig, SchedulerOutput,
};
use mlx_serving_models::{BatchInput, ModelBundle, PagedKvCache, SeqInput};
use std::collections::HashMap;
use std::sync::Arc;

struct SeqState {
    sampler: Sampler,
    prompt: Vec<u32>,
    output: Vec<u32>,
}

pub struct ModelExecutor {
    bundle: Arc<ModelBundle>,
    cache: PagedKvCache,
    states: HashMap<RequestId, SeqState>,
    /// Beaten after every layer's attention and MLP: a long prefill keeps `/health` green.
    heartbeat: Option<Heartbeat>,
}

impl ModelExecutor {
    /// A KV cache of `num_blocks` blocks of `block_size` tokens for `bundle`'s model.
    pub fn new(bundle: Arc<ModelBundle>, block_size: usize, num_blocks: usize) -> Self {
        let cache = PagedKvCache::new(bundle.model.config(), block_size, num_blocks);
        Self { bundle, cache, states: HashMap::new(), heartbeat: None }
    }

    /// Scheduler settings matching this model: context length, EOS ids, and as many blocks as
    /// `kv_cache_bytes` holds.
    pub fn scheduler_config(bundle: &ModelBundle, block_size: usize, kv_cache_bytes: usize) -> SchedulerConfig {
        let cfg = bundle.model.config();
        let per_block = PagedKvCache::bytes_per_block(cfg, block_size);
        SchedulerConfig {
            block_size,
            num_blocks: (kv_cache_bytes / per_block).max(1),
            max_model_len: cfg.max_position_embeddings,
            eos_token_ids: bundle.special_tokens.eog.clone(),
            ..SchedulerConfig::default()
        }
    }
}

impl Executor for ModelExecutor {
    fn execute(&mut self, batch: &SchedulerOutput) -> Result<RunnerOutput, ExecutorError> {
        let n: usize = batch.seqs.iter().map(|s| s.token_ids.len()).sum();
        let bs = self.cache.block_size();
        let mut token_ids = Vec::with_capacity(n);
        let mut positions = Vec::with_capacity(n);
        let mut slots = Vec::with_capacity(n);
        let mut seqs = Vec::with_capacity(batch.seqs.len());
        let mut logits_rows = Vec::new();
        for s in &batch.seqs {
            if let Some(new) = &s.new_request {
                self.states.insert(
                    s.id,
                    SeqState {
                        sampler: Sampler::new(&new.params).with_eos(&self.bundle.special_tokens.eog),
                        prompt: new.prompt_token_ids.clone(),
                        output: Vec::new(),
                    },
                );
            }
            let len = s.token_ids.len();
            token_ids.extend_from_slice(&s.token_ids);
            for p in s.start_pos..s.start_pos + len {
                positions.push(p as u32);
                let block = *s
                    .block_table
                    .get(p / bs)
                    .ok_or_else(|| ExecutorError(format!("request {:?}: block table too short", s.id)))?;
                slots.push(block * bs as u32 + (p % bs) as u32);
            }
            seqs.push(SeqInput { query_len: len, context_len: s.start_pos + len, block_table: &s.block_table });
            if s.sample {
                logits_rows.push((token_ids.len() - 1) as u32);
            }
        }
        let input = BatchInput {
            token_ids: &token_ids,
            positions: &positions,
            slot_mapping: &slots,
            seqs: &seqs,
            logits_indices: &logits_rows,
        };
        let heartbeat = self.heartbeat.clone();
        // Beat, and stop early once every request of the step has been abandoned.
        let progress = move || {
            heartbeat.as_ref().is_none_or(|h| {
                h.beat();
                !h.step_abandoned()
            })
        };
        let mut logits = self
            .bundle
            .model
            .forward_with_progress(&input, &mut self.cache, &progress)
            .map_err(|e| ExecutorError(e.to_string()))?;
        let vocab = self.bundle.model.config().vocab_size;
        let mut out = RunnerOutput::default();
        for (s, row) in batch.seqs.iter().filter(|s| s.sample).zip(logits.chunks_mut(vocab)) {
            let st = self
                .states
                .get_mut(&s.id)
                .ok_or_else(|| ExecutorError(format!("request {:?} was never announced", s.id)))?;
            let raw = st.sampler.params().logprobs.map(|k| (row.to_vec(), k as usize));
            let token = st.sampler.sample(row, &st.prompt, &st.output);
            st.output.push(token);
            out.sampled.insert(s.id, token);
            if let Some((raw, k)) = raw {
                out.logprobs.insert(s.id, token_logprobs(&raw, token, k));
            }
        }
        Ok(out)
    }

    fn remove_request(&mut self, id: RequestId) {
        self.states.remove(&id);
    }

    fn set_heartbeat(&mut self, heartbeat: Heartbeat) {
        self.heartbeat = Some(heartbeat);
    }
}
