//! The scheduler: a pure state machine over requests and KV blocks (vLLM v1's model).
//!
//! Every step has one token budget (`max_num_batched_tokens`). Each request has `num_computed_tokens` and
//! `num_tokens`; the step gives it `min(num_tokens - num_computed_tokens, budget left)` new tokens, so
//! chunked prefill, decode and prefix hits are the same thing. Speculative tokens ride along: a request whose
//! step reaches the end of its known tokens also runs the draft tokens proposed after its last step (as many
//! as the budget, its blocks, `max_tokens` and the context allow; never at the cost of a preemption), and
//! after the step keeps the accepted ones, its rejected positions rolled back (`num_computed_tokens` drops to
//! the accepted tokens, so their K/V is overwritten later and never registered in the prefix cache). Running requests go first, by class raised
//! with age, then by arrival. If blocks run out, the least urgent class's newest running request is preempted
//! (its blocks freed, its tokens recomputed later; if it was already scheduled this step, its tokens go back
//! to the budget); a request never preempts itself nor anything more urgent than itself: when nothing below
//! it is left it just waits for the next step, keeping its blocks. No waiting request is admitted in a step
//! that preempted or stalled.
//! Waiting requests are admitted by priority class, raised one class per `aging_interval` waited so low
//! priority is never starved, then by arrival. A preempted request keeps its arrival order, and the waiting
//! limit counts new requests only, so preemption never pushes the queue past its bound.
//!
//! No clocks are read here (`now` is passed in), no I/O, no tensors.

use crate::params::{FinishReason, ParamError};
use crate::request::{EngineOutput, EngineRequest, Request, RequestId, RequestStatus, TokenLogprobs};
use mlx_serving_kv_cache::KvCacheManager;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Clone, Debug)]
pub struct SchedulerConfig {
    pub max_num_seqs: usize,
    pub max_num_batched_tokens: usize,
    pub max_model_len: usize,
    pub block_size: usize,
    pub num_blocks: usize,
    pub enable_prefix_caching: bool,
    /// New requests allowed to wait (preempted ones do not count); more are refused at once (the server
    /// answers 429).
    pub max_waiting_requests: usize,
    /// Prompt tokens allowed to wait.
    pub max_waiting_tokens: usize,
    /// Waiting this long raises a request one priority class.
    pub aging_interval: Duration,
    /// End-of-generation token ids of the model.
    pub eos_token_ids: Vec<u32>,
    /// Separates this model's prefix-cache hashes from other models'.
    pub cache_extra_key: u64,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            max_num_seqs: 16,
            max_num_batched_tokens: 2048,
            max_model_len: 8192,
            block_size: 16,
            num_blocks: 1024,
            enable_prefix_caching: true,
            max_waiting_requests: 256,
            max_waiting_tokens: 1 << 20,
            aging_interval: Duration::from_secs(10),
            eos_token_ids: Vec::new(),
            cache_extra_key: 0,
        }
    }
}

impl SchedulerConfig {
    /// Checks that do not depend on load: a request failing them could never run.
    pub fn check_request(&self, r: &EngineRequest) -> Result<(), AddError> {
        if r.prompt_token_ids.is_empty() {
            return Err(AddError::EmptyPrompt);
        }
        let (prompt, max_tokens) = (r.prompt_token_ids.len(), r.params.max_tokens as usize);
        if prompt + max_tokens > self.max_model_len {
            return Err(AddError::ContextLengthExceeded { prompt, max_tokens, max_model_len: self.max_model_len });
        }
        let mut end = 0;
        for m in &r.mm_inputs {
            if m.span.start < end || m.span.end <= m.span.start || m.span.end > prompt {
                return Err(AddError::BadInputSpan(m.span.clone()));
            }
            end = m.span.end;
        }
        let needed = (prompt + max_tokens).div_ceil(self.block_size);
        if needed > self.num_blocks {
            return Err(AddError::TooLargeForCache { needed, available: self.num_blocks });
        }
        Ok(())
    }
}

#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum AddError {
    #[error("server overloaded: {0}")]
    Overloaded(String),
    #[error(
        "prompt ({prompt} tokens) plus max_tokens ({max_tokens}) exceeds the model's context of {max_model_len} tokens"
    )]
    ContextLengthExceeded { prompt: usize, max_tokens: usize, max_model_len: usize },
    #[error("request needs {needed} KV blocks but the cache has {available}")]
    TooLargeForCache { needed: usize, available: usize },
    #[error("empty prompt")]
    EmptyPrompt,
    #[error("image span {0:?} is empty, overlaps another, or lies outside the prompt")]
    BadInputSpan(std::ops::Range<usize>),
    #[error("duplicate request id {0:?}")]
    DuplicateId(RequestId),
    #[error("invalid parameter {0}")]
    Param(#[from] ParamError),
}

/// First-time data the executor needs to set up a request's sampler.
#[derive(Clone, Debug)]
pub struct NewRequestData {
    pub prompt_token_ids: Vec<u32>,
    pub params: Arc<crate::params::SamplingParams>,
    pub constraint: Option<Arc<dyn crate::constraint::Constraint>>,
    /// Images in the prompt (spans, content hashes, the runner's pixels).
    pub mm_inputs: Arc<[crate::request::MmInput]>,
}

/// One request's share of a step.
#[derive(Clone, Debug)]
pub struct ScheduledSeq {
    pub id: RequestId,
    /// The tokens to run this step (K/V written at positions `start_pos..`).
    pub token_ids: Vec<u32>,
    pub start_pos: usize,
    /// Physical block ids covering positions `0 .. start_pos + token_ids.len()`.
    pub block_table: Vec<u32>,
    /// True when this step reaches the end of the known tokens: sample the next one.
    pub sample: bool,
    /// The last `num_draft_tokens` of `token_ids` are speculative (proposed, not yet verified): the executor
    /// samples at each of the last `num_draft_tokens + 1` positions and keeps drafts while they match.
    pub num_draft_tokens: usize,
    /// Set the first time the request is ever scheduled.
    pub new_request: Option<NewRequestData>,
}

#[derive(Clone, Debug, Default)]
pub struct SchedulerOutput {
    pub seqs: Vec<ScheduledSeq>,
    pub num_batched_tokens: usize,
    pub preempted: Vec<RequestId>,
    /// Requests finished while scheduling (deadlines); already removed.
    pub finished: Vec<EngineOutput>,
}

/// What the executor returns for a step: the tokens of every `sample` sequence (one, or with speculation the
/// accepted draft tokens then one more), and their logprobs for requests that asked for them.
#[derive(Clone, Debug, Default)]
pub struct RunnerOutput {
    pub sampled: HashMap<RequestId, Vec<u32>>,
    /// One entry per sampled token, for requests that asked for logprobs.
    pub logprobs: HashMap<RequestId, Vec<TokenLogprobs>>,
    /// With a request's first sampled token: its prompt logprobs (one per prompt token after the first), for
    /// requests that asked for them.
    pub prompt_logprobs: HashMap<RequestId, Vec<TokenLogprobs>>,
    /// Of a sequence's scheduled draft tokens, how many were accepted (a prefix of them).
    pub num_accepted: HashMap<RequestId, usize>,
    /// Draft tokens proposed for each sequence's next step.
    pub drafts: HashMap<RequestId, Vec<u32>>,
    /// Sequences whose constraint is complete with their sampled token: they finish with `Stop`.
    pub completed: std::collections::HashSet<RequestId>,
    /// Sequences that failed in this step, and why (a constraint that refused every token): they finish with
    /// `Error` and no token.
    pub failed: HashMap<RequestId, String>,
    /// How long each constrained sequence's token mask took this step.
    pub mask_times: Vec<std::time::Duration>,
    /// How long proposing the next step's draft tokens took.
    pub propose_time: std::time::Duration,
    /// Time each image encoded this step took (encoder-cache hits not included).
    pub encode_times: Vec<std::time::Duration>,
}

/// Most prompt tokens per step for a request computing prompt logprobs (every one of its rows becomes a
/// vocabulary-wide logits row: this bounds that memory).
pub const PROMPT_LOGPROBS_CHUNK: usize = 512;

/// The most tokens `r` may compute this step.
fn chunk_cap(r: &Request) -> usize {
    match r.params.prompt_logprobs {
        Some(_) if r.num_computed_tokens < r.num_prompt_tokens => PROMPT_LOGPROBS_CHUNK,
        _ => usize::MAX,
    }
}

/// The request's image spans as the prefix cache keys them.
fn content_spans(r: &Request) -> Vec<mlx_serving_kv_cache::ContentSpan> {
    r.mm_inputs.iter().map(|m| mlx_serving_kv_cache::ContentSpan { range: m.span.clone(), hash: m.hash }).collect()
}

#[derive(Debug)]
pub struct Scheduler {
    cfg: SchedulerConfig,
    kv: KvCacheManager,
    requests: HashMap<RequestId, Request>,
    waiting: Vec<RequestId>,
    running: Vec<RequestId>,
    announced: std::collections::HashSet<RequestId>,
    first_output_sent: std::collections::HashSet<RequestId>,
    waiting_prompt_tokens: usize,
    /// Waiting requests never admitted yet (the ones the waiting limit counts).
    num_waiting_new: usize,
    next_seq: u64,
    num_preemptions: u64,
}

impl Scheduler {
    pub fn new(cfg: SchedulerConfig) -> Self {
        let kv = KvCacheManager::new(cfg.num_blocks, cfg.block_size, cfg.enable_prefix_caching, cfg.cache_extra_key);
        Self {
            cfg,
            kv,
            requests: HashMap::new(),
            waiting: Vec::new(),
            running: Vec::new(),
            announced: Default::default(),
            first_output_sent: Default::default(),
            waiting_prompt_tokens: 0,
            num_waiting_new: 0,
            next_seq: 0,
            num_preemptions: 0,
        }
    }

    pub fn config(&self) -> &SchedulerConfig {
        &self.cfg
    }

    pub fn kv(&self) -> &KvCacheManager {
        &self.kv
    }

    /// Waiting requests, new and preempted.
    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Waiting requests never admitted yet: what the waiting limit bounds.
    pub fn num_waiting_new(&self) -> usize {
        self.num_waiting_new
    }

    /// Running requests, in admission order.
    pub fn running(&self) -> &[RequestId] {
        &self.running
    }

    /// Prompt tokens of requests not yet admitted.
    pub fn waiting_prompt_tokens(&self) -> usize {
        self.waiting_prompt_tokens
    }

    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    /// Preemptions since start.
    pub fn num_preemptions(&self) -> u64 {
        self.num_preemptions
    }

    pub fn has_work(&self) -> bool {
        !self.waiting.is_empty() || !self.running.is_empty()
    }

    pub fn request(&self, id: RequestId) -> Option<&Request> {
        self.requests.get(&id)
    }

    /// Validates and queues a request, or refuses it at once.
    pub fn add_request(&mut self, r: EngineRequest, now: Instant) -> Result<(), AddError> {
        let cfg = &self.cfg;
        if self.requests.contains_key(&r.id) {
            return Err(AddError::DuplicateId(r.id));
        }
        cfg.check_request(&r)?;
        let prompt = r.prompt_token_ids.len();
        if self.num_waiting_new >= cfg.max_waiting_requests {
            return Err(AddError::Overloaded(format!("{} requests already waiting", self.num_waiting_new)));
        }
        if self.waiting_prompt_tokens + prompt > cfg.max_waiting_tokens {
            return Err(AddError::Overloaded(format!("{} prompt tokens already waiting", self.waiting_prompt_tokens)));
        }
        let id = r.id;
        self.waiting_prompt_tokens += prompt;
        self.num_waiting_new += 1;
        self.requests.insert(id, Request::new(r, now, self.next_seq));
        self.next_seq += 1;
        self.waiting.push(id);
        Ok(())
    }

    /// Removes a request wherever it is and frees its blocks at once.
    pub fn abort(&mut self, id: RequestId) -> Option<EngineOutput> {
        self.finish(id, FinishReason::Abort, None)
    }

    /// Fails requests whose step could not be executed.
    pub fn fail(&mut self, ids: &[RequestId], message: &str) -> Vec<EngineOutput> {
        ids.iter().filter_map(|&id| self.finish(id, FinishReason::Error, Some(message.to_string()))).collect()
    }

    fn finish(&mut self, id: RequestId, reason: FinishReason, error: Option<String>) -> Option<EngineOutput> {
        let req = self.requests.remove(&id)?;
        if let Some(i) = self.waiting.iter().position(|&w| w == id) {
            self.waiting.remove(i);
            if req.num_cached_tokens.is_none() {
                self.waiting_prompt_tokens -= req.num_prompt_tokens;
                self.num_waiting_new -= 1;
            }
        }
        self.running.retain(|&r| r != id);
        self.kv.free(id.0);
        self.announced.remove(&id);
        let first = self.first_output_sent.remove(&id);
        Some(EngineOutput {
            id,
            new_token_ids: Vec::new(),
            finish_reason: Some(reason),
            num_cached_tokens: if first { None } else { req.num_cached_tokens },
            error,
            logprobs: Vec::new(),
            prompt_logprobs: Vec::new(),
        })
    }

    fn effective_rank(&self, r: &Request, now: Instant) -> u32 {
        let waited = now.saturating_duration_since(r.arrival);
        let steps = if self.cfg.aging_interval.is_zero() {
            0
        } else {
            (waited.as_nanos() / self.cfg.aging_interval.as_nanos()) as u32
        };
        r.priority.rank().saturating_sub(steps)
    }

    /// Preemption order: larger is preempted first (least urgent class, then newest).
    fn preempt_key(&self, id: &RequestId) -> (u32, u64) {
        let r = &self.requests[id];
        (r.priority.rank(), r.seq)
    }

    fn preempt(&mut self, id: RequestId) {
        self.kv.free(id.0);
        self.running.retain(|&r| r != id);
        let r = self.requests.get_mut(&id).expect("running request exists");
        r.status = RequestStatus::Preempted;
        r.num_computed_tokens = 0;
        r.spec_token_ids.clear();
        r.num_preemptions += 1;
        self.num_preemptions += 1;
        self.waiting.push(id);
    }

    pub fn schedule(&mut self, now: Instant) -> SchedulerOutput {
        let mut out = SchedulerOutput::default();
        let expired: Vec<RequestId> =
            self.requests.values().filter(|r| r.deadline.is_some_and(|d| d <= now)).map(|r| r.id).collect();
        for id in expired {
            out.finished.extend(self.finish(id, FinishReason::Timeout, Some("deadline exceeded".into())));
        }
        let mut budget = self.cfg.max_num_batched_tokens;
        // (request, known tokens, draft tokens) to run this step.
        let mut scheduled: Vec<(RequestId, usize, usize)> = Vec::new();
        // A running request that got no blocks this step (nothing less urgent left to preempt).
        let mut stalled = false;

        // Running requests first, by class raised with age (as waiting ones are admitted), then by arrival: a
        // running request of a low class is not starved of tokens by a stream of urgent prefills.
        let mut order = self.running.clone();
        order.sort_by_key(|id| {
            let r = &self.requests[id];
            (self.effective_rank(r, now), r.seq)
        });
        for id in order {
            if budget == 0 {
                break;
            }
            if !self.running.contains(&id) {
                continue; // preempted earlier this step
            }
            let mut drafts = usize::MAX;
            loop {
                let r = &self.requests[&id];
                let left = r.num_tokens() - r.num_computed_tokens;
                let num_new = left.min(budget).min(chunk_cap(r));
                // Drafts only where this step reaches the end of the known tokens, and only as many as can be
                // kept: every accepted draft and the token after it must fit `max_tokens` and the context.
                if num_new < left {
                    drafts = 0;
                }
                let room = (r.params.max_tokens as usize)
                    .saturating_sub(r.output().len() + 1)
                    .min(self.cfg.max_model_len.saturating_sub(r.num_tokens() + 1));
                drafts = drafts.min(r.spec_token_ids.len()).min(budget - num_new).min(room);
                let target = r.num_computed_tokens + num_new;
                if self.kv.allocate_slots(id.0, target + drafts, None) {
                    scheduled.push((id, num_new, drafts));
                    budget -= num_new + drafts;
                    break;
                }
                // Speculation never costs a preemption: try again without drafts first.
                if drafts > 0 {
                    drafts = 0;
                    continue;
                }
                // Out of blocks: preempt the least urgent class's newest running request, if it is less urgent
                // than this one (never this request itself); one already scheduled this step gives its tokens
                // back.
                let key = self.preempt_key(&id);
                let victim = self
                    .running
                    .iter()
                    .copied()
                    .filter(|v| *v != id)
                    .max_by_key(|v| self.preempt_key(v))
                    .filter(|v| self.preempt_key(v) > key);
                match victim {
                    Some(v) => {
                        if let Some(at) = scheduled.iter().position(|(s, _, _)| *s == v) {
                            let (_, n, d) = scheduled.remove(at);
                            budget += n + d;
                        }
                        self.preempt(v);
                        out.preempted.push(v);
                    }
                    None => {
                        stalled = true;
                        break;
                    }
                }
            }
        }

        // Then waiting requests, unless this step had to preempt or a running request found no blocks.
        if out.preempted.is_empty() && !stalled {
            let mut order: Vec<RequestId> = self.waiting.clone();
            order.sort_by_key(|id| {
                let r = &self.requests[id];
                (self.effective_rank(r, now), r.seq)
            });
            for id in order {
                if self.running.len() >= self.cfg.max_num_seqs || budget == 0 {
                    break;
                }
                let r = &self.requests[&id];
                // A request computing prompt logprobs needs every prompt position's logits: no prefix hit.
                let hit =
                    r.params.prompt_logprobs.is_none().then(|| self.kv.find_prefix_with(&r.tokens, &content_spans(r)));
                let cached = hit.as_ref().map_or(0, |h| h.num_tokens);
                let num_new = (r.num_tokens() - cached).min(budget).min(chunk_cap(r));
                if !self.kv.allocate_slots(id.0, cached + num_new, hit.as_ref()) {
                    break;
                }
                let r = self.requests.get_mut(&id).expect("waiting request exists");
                if r.num_cached_tokens.is_none() {
                    r.num_cached_tokens = Some(cached);
                    self.waiting_prompt_tokens -= r.num_prompt_tokens;
                    self.num_waiting_new -= 1;
                    // Counted once per request, at its first admission (a request that kept waiting for
                    // blocks was looked up on every attempt).
                    self.kv.record_prefix_lookup(r.num_prompt_tokens, cached);
                }
                r.num_computed_tokens = cached;
                r.status = RequestStatus::Running;
                self.waiting.retain(|&w| w != id);
                self.running.push(id);
                scheduled.push((id, num_new, 0));
                budget -= num_new;
            }
        }

        for (id, num_new, drafts) in scheduled {
            let r = self.requests.get_mut(&id).expect("scheduled request exists");
            let start = r.num_computed_tokens;
            r.num_computed_tokens += num_new;
            let sample = r.num_computed_tokens == r.num_tokens();
            let mut token_ids = r.tokens[start..start + num_new].to_vec();
            token_ids.extend_from_slice(&r.spec_token_ids[..drafts]);
            r.num_computed_tokens += drafts;
            // Proposals are for one step only; the next come with this step's output.
            r.spec_token_ids.clear();
            let new_request = self.announced.insert(id).then(|| NewRequestData {
                prompt_token_ids: r.prompt().to_vec(),
                params: r.params.clone(),
                constraint: r.constraint.clone(),
                mm_inputs: r.mm_inputs.clone(),
            });
            out.seqs.push(ScheduledSeq {
                id,
                token_ids,
                start_pos: start,
                block_table: self.kv.block_table(id.0).iter().map(|b| b.0).collect(),
                sample,
                num_draft_tokens: drafts,
                new_request,
            });
            out.num_batched_tokens += num_new + drafts;
        }
        out
    }

    /// Appends sampled tokens (with speculation, the accepted drafts and the token after them, up to the first
    /// that ends the request), rolls back rejected draft positions, applies stop conditions, registers full
    /// blocks in the prefix cache, and returns one output per request that produced tokens or finished.
    pub fn update_from_output(&mut self, sched: &SchedulerOutput, run: &RunnerOutput) -> Vec<EngineOutput> {
        let mut outputs = Vec::new();
        for seq in &sched.seqs {
            let Some(r) = self.requests.get_mut(&seq.id) else {
                continue;
            };
            if !seq.sample {
                if let Some(why) = run.failed.get(&seq.id) {
                    // Its K/V from this step is not to be trusted (nor cached).
                    outputs.extend(self.finish(seq.id, FinishReason::Error, Some(why.clone())));
                    continue;
                }
                self.kv.cache_blocks_with(seq.id.0, &r.tokens, r.num_computed_tokens, &content_spans(r));
                continue;
            }
            let tokens = match run.sampled.get(&seq.id) {
                Some(t) if !t.is_empty() && t.len() <= seq.num_draft_tokens + 1 => t,
                _ => {
                    let why = run.failed.get(&seq.id).cloned().unwrap_or_else(|| "no token sampled".into());
                    outputs.extend(self.finish(seq.id, FinishReason::Error, Some(why)));
                    continue;
                }
            };
            // K/V is valid for the known tokens and the accepted drafts: every token kept but the last one.
            let known = r.num_computed_tokens - seq.num_draft_tokens;
            let mut new_token_ids = Vec::with_capacity(tokens.len());
            let mut finish = None;
            for (i, &token) in tokens.iter().enumerate() {
                r.tokens.push(token);
                new_token_ids.push(token);
                let p = &r.params;
                let may_stop = r.output().len() > p.min_tokens as usize;
                let last = i + 1 == tokens.len();
                finish = if last && run.completed.contains(&seq.id)
                    || may_stop
                        && ((!p.ignore_eos && self.cfg.eos_token_ids.contains(&token))
                            || p.stop_token_ids.contains(&token))
                {
                    Some(FinishReason::Stop)
                } else if r.output().len() >= p.max_tokens as usize || r.num_tokens() >= self.cfg.max_model_len {
                    Some(FinishReason::Length)
                } else {
                    None
                };
                if finish.is_some() {
                    break;
                }
            }
            r.num_computed_tokens = known + new_token_ids.len() - 1;
            if finish.is_none() {
                r.spec_token_ids = run.drafts.get(&seq.id).cloned().unwrap_or_default();
            }
            self.kv.cache_blocks_with(seq.id.0, &r.tokens, r.num_computed_tokens, &content_spans(r));
            let cached = if self.first_output_sent.insert(seq.id) { r.num_cached_tokens } else { None };
            let mut logprobs = run.logprobs.get(&seq.id).cloned().unwrap_or_default();
            logprobs.truncate(new_token_ids.len());
            outputs.push(EngineOutput {
                id: seq.id,
                new_token_ids,
                finish_reason: finish.clone(),
                num_cached_tokens: cached,
                error: None,
                logprobs,
                prompt_logprobs: run.prompt_logprobs.get(&seq.id).cloned().unwrap_or_default(),
            });
            if finish.is_some() {
                self.requests.remove(&seq.id);
                self.running.retain(|&x| x != seq.id);
                self.kv.free(seq.id.0);
                self.announced.remove(&seq.id);
                self.first_output_sent.remove(&seq.id);
            }
        }
        outputs
    }
}
