//! The engine's `Executor` on a real model: turns a `SchedulerOutput` into one flattened forward pass over
//! the paged KV cache, then samples every sequence that reached the end of its known tokens.
//!
//! Per-request sampler state (RNG, generated tokens for penalties) lives here from the request's first
//! step until `remove_request`, so a preempted request resumes with the same RNG stream.

use crate::sampler::{token_logprobs, Sampler};
use mlx_serving_engine::{
    ConstraintState, Executor, ExecutorError, Heartbeat, RequestId, RunnerOutput, SchedulerConfig, SchedulerOutput,
};
use mlx_serving_models::{BatchInput, ModelBundle, PagedKvCache, SeqInput};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

struct SeqState {
    sampler: Sampler,
    prompt: Vec<u32>,
    output: Vec<u32>,
    /// The request's output constraint, advanced over every sampled token.
    constraint: Option<Box<dyn ConstraintState>>,
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

/// The allowed-token masks of the sequences `ids` (each with a constraint), and how long each took.
type Masks = (HashMap<RequestId, Result<Vec<u32>, String>>, Vec<Duration>);

fn masks_for(states: &mut HashMap<RequestId, SeqState>, ids: &[RequestId]) -> Masks {
    let (mut masks, mut times) = (HashMap::with_capacity(ids.len()), Vec::with_capacity(ids.len()));
    for id in ids {
        if let Some(c) = states.get_mut(id).and_then(|st| st.constraint.as_mut()) {
            let t0 = Instant::now();
            masks.insert(*id, c.allowed());
            times.push(t0.elapsed());
        }
    }
    (masks, times)
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
        let mut out = RunnerOutput::default();
        for s in &batch.seqs {
            if let Some(new) = &s.new_request {
                let constraint = match new.constraint.as_ref().map(|c| c.start()) {
                    Some(Err(e)) => {
                        out.failed.insert(s.id, format!("output constraint: {e}"));
                        None
                    }
                    Some(Ok(c)) => Some(c),
                    None => None,
                };
                self.states.insert(
                    s.id,
                    SeqState {
                        sampler: Sampler::new(&new.params).with_eos(&self.bundle.special_tokens.eog),
                        prompt: new.prompt_token_ids.clone(),
                        output: Vec::new(),
                        constraint,
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
        // The constrained sequences' token masks are computed on their own thread while the model runs.
        let constrained: Vec<RequestId> = batch
            .seqs
            .iter()
            .filter(|s| s.sample && self.states.get(&s.id).is_some_and(|st| st.constraint.is_some()))
            .map(|s| s.id)
            .collect();
        let (bundle, cache, states) = (&self.bundle, &mut self.cache, &mut self.states);
        let (logits, masks) = std::thread::scope(|scope| {
            let masks = (!constrained.is_empty()).then(|| scope.spawn(|| masks_for(states, &constrained)));
            let logits = bundle.model.forward_with_progress(&input, cache, &progress);
            (logits, masks.map(|h| h.join()))
        });
        let mut logits = logits.map_err(|e| ExecutorError(e.to_string()))?;
        let mut masks = match masks {
            Some(Ok((masks, times))) => {
                out.mask_times = times;
                masks
            }
            Some(Err(_)) => return Err(ExecutorError("computing the token masks panicked".into())),
            None => HashMap::new(),
        };
        let vocab = self.bundle.model.config().vocab_size;
        for (s, row) in batch.seqs.iter().filter(|s| s.sample).zip(logits.chunks_mut(vocab)) {
            if out.failed.contains_key(&s.id) {
                continue;
            }
            let st = self
                .states
                .get_mut(&s.id)
                .ok_or_else(|| ExecutorError(format!("request {:?} was never announced", s.id)))?;
            let mask = match masks.remove(&s.id) {
                Some(Err(e)) => {
                    out.failed.insert(s.id, format!("output constraint: {e}"));
                    continue;
                }
                Some(Ok(m)) => Some(m),
                None => None,
            };
            let raw = st.sampler.params().logprobs.map(|k| (row.to_vec(), k as usize));
            let Some(token) = st.sampler.sample_masked(row, &st.prompt, &st.output, mask.as_deref()) else {
                out.failed.insert(s.id, "output constraint: no token is allowed here".into());
                continue;
            };
            if let Some(c) = st.constraint.as_mut() {
                if let Err(e) = c.advance(token) {
                    out.failed.insert(s.id, format!("output constraint: {e}"));
                    continue;
                }
                if c.is_complete() {
                    out.completed.insert(s.id);
                }
            }
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
