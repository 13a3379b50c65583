//! Requests as the engine sees them: token ids, sampling parameters, priority, progress.

use crate::constraint::Constraint;
use crate::params::{FinishReason, SamplingParams};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Instant;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct RequestId(pub u64);

/// Scheduling class, most urgent first (the original system's four classes).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    Critical = 0,
    High = 1,
    #[default]
    Normal = 2,
    Low = 3,
}

impl Priority {
    pub fn rank(self) -> u32 {
        self as u32
    }
}

/// A non-text input in a prompt (an image): the positions its placeholder tokens take, a hash of its content
/// (mixed into the prefix-cache hashes of the blocks those positions fall in, so the same image hits the
/// cache and another never does), and the runner's data for it, opaque to the engine.
#[derive(Clone)]
pub struct MmInput {
    pub span: std::ops::Range<usize>,
    pub hash: u64,
    pub data: Arc<dyn std::any::Any + Send + Sync>,
}

impl std::fmt::Debug for MmInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmInput").field("span", &self.span).field("hash", &self.hash).finish_non_exhaustive()
    }
}

/// What a caller submits.
#[derive(Clone, Debug)]
pub struct EngineRequest {
    pub id: RequestId,
    pub prompt_token_ids: Vec<u32>,
    pub params: Arc<SamplingParams>,
    pub priority: Priority,
    /// Finish with `FinishReason::Timeout` if not done by then.
    pub deadline: Option<Instant>,
    /// What the output must match (a JSON schema, a grammar, ...), compiled.
    pub constraint: Option<Arc<dyn Constraint>>,
    /// Images in the prompt, in prompt order, their spans disjoint.
    pub mm_inputs: Vec<MmInput>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestStatus {
    Waiting,
    Running,
    /// Blocks taken back for another request; waits to recompute its tokens.
    Preempted,
}

/// A request inside the scheduler.
#[derive(Clone, Debug)]
pub struct Request {
    pub id: RequestId,
    /// Prompt then generated tokens.
    pub tokens: Vec<u32>,
    pub num_prompt_tokens: usize,
    pub params: Arc<SamplingParams>,
    pub priority: Priority,
    pub arrival: Instant,
    /// Admission order, the tie-breaker everywhere.
    pub seq: u64,
    pub deadline: Option<Instant>,
    pub constraint: Option<Arc<dyn Constraint>>,
    pub mm_inputs: Arc<[MmInput]>,
    pub status: RequestStatus,
    /// Tokens whose K/V are in the cache (or scheduled to be this step).
    pub num_computed_tokens: usize,
    /// Prompt tokens served from the prefix cache at first admission.
    pub num_cached_tokens: Option<usize>,
    pub num_preemptions: u32,
    /// Tokens proposed by the speculative proposer after the last step, to be verified in the next one.
    pub spec_token_ids: Vec<u32>,
}

impl Request {
    pub fn new(r: EngineRequest, arrival: Instant, seq: u64) -> Self {
        let n = r.prompt_token_ids.len();
        Self {
            id: r.id,
            tokens: r.prompt_token_ids,
            num_prompt_tokens: n,
            params: r.params,
            priority: r.priority,
            arrival,
            seq,
            deadline: r.deadline,
            constraint: r.constraint,
            mm_inputs: r.mm_inputs.into(),
            status: RequestStatus::Waiting,
            num_computed_tokens: 0,
            num_cached_tokens: None,
            num_preemptions: 0,
            spec_token_ids: Vec::new(),
        }
    }

    pub fn num_tokens(&self) -> usize {
        self.tokens.len()
    }

    pub fn output(&self) -> &[u32] {
        &self.tokens[self.num_prompt_tokens..]
    }

    pub fn prompt(&self) -> &[u32] {
        &self.tokens[..self.num_prompt_tokens]
    }
}

/// What the engine sends back to a request's owner after each step it took part in.
#[derive(Clone, Debug, PartialEq)]
pub struct EngineOutput {
    pub id: RequestId,
    pub new_token_ids: Vec<u32>,
    /// Set on the last output.
    pub finish_reason: Option<FinishReason>,
    /// Prompt tokens served from the prefix cache (set on the first output).
    pub num_cached_tokens: Option<usize>,
    /// Why the request failed, when `finish_reason` is `Error`.
    pub error: Option<String>,
    /// One entry per `new_token_ids` entry when the request asked for logprobs; empty otherwise.
    pub logprobs: Vec<TokenLogprobs>,
    /// With the first token of a request that asked for prompt logprobs: one entry per prompt token after the
    /// first (its logprob given the tokens before it); empty otherwise.
    pub prompt_logprobs: Vec<TokenLogprobs>,
}

/// Log-probabilities for one generated token, from the model's raw distribution (before temperature,
/// penalties and truncation), as vLLM reports them.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TokenLogprobs {
    pub token: u32,
    pub logprob: f32,
    /// The token's rank in the distribution (1: the most likely); 0 where it was not kept (a cached answer).
    pub rank: u32,
    /// The most likely tokens, most likely first.
    pub top: Vec<(u32, f32)>,
}
