//! Sampling parameters (OpenAI's plus vLLM's extensions) and why a request finished.

use serde::{Deserialize, Serialize};

/// Why a sequence stopped. Maps one to one onto OpenAI's `finish_reason`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum FinishReason {
    /// An end-of-generation token or a stop string.
    Stop,
    /// `max_tokens` reached, or the model's context is full.
    Length,
    /// The request was aborted (client went away, or a stop string matched downstream).
    Abort,
    /// The request's deadline passed.
    Timeout,
    /// Executing a step that included this request failed; the engine itself keeps running.
    Error,
}

impl FinishReason {
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
            Self::Abort => "abort",
            Self::Timeout => "timeout",
            Self::Error => "error",
        }
    }
}

/// Per-request sampling configuration. `temperature == 0` (or below [`MIN_TEMPERATURE`]) means greedy.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SamplingParams {
    pub temperature: f32,
    /// Nucleus sampling: keep the smallest set of tokens whose probability reaches `top_p` (1 = off).
    pub top_p: f32,
    /// Keep the `top_k` most likely tokens (0 = off).
    pub top_k: u32,
    /// Drop tokens whose probability is below `min_p` times the top token's (0 = off).
    pub min_p: f32,
    /// Divides positive logits (multiplies negative ones) of tokens seen in the prompt or output (1 = off).
    pub repetition_penalty: f32,
    /// Subtracted once from the logit of every token already generated (OpenAI semantics, -2..2).
    pub presence_penalty: f32,
    /// Subtracted per occurrence from the logit of generated tokens (OpenAI semantics, -2..2).
    pub frequency_penalty: f32,
    /// Added to the logits of the given token ids (OpenAI semantics, -100..100).
    pub logit_bias: Vec<(u32, f32)>,
    /// Makes sampling reproducible; `None` draws a fresh seed.
    pub seed: Option<u64>,
    pub max_tokens: u32,
    /// Strings that end generation; not included in the output.
    pub stop: Vec<String>,
    /// Extra token ids that end generation.
    pub stop_token_ids: Vec<u32>,
    /// Keep generating past end-of-generation tokens (benchmarks).
    pub ignore_eos: bool,
    /// End-of-generation and stop tokens cannot end the output before this many tokens (vLLM's `min_tokens`).
    pub min_tokens: u32,
    /// Return the sampled token's logprob and this many of the most likely alternatives per step.
    pub logprobs: Option<u32>,
    /// Return every prompt token's logprob (after the first) and this many of the most likely alternatives
    /// at each prompt position, computed in the prefill (vLLM's `prompt_logprobs`; `echo` with `logprobs`).
    /// Such a request computes its whole prompt: no prefix-cache hit.
    #[serde(default)]
    pub prompt_logprobs: Option<u32>,
    /// Let the engine speculate for this request when it is configured to (the extension field
    /// `speculative: false` opts out). Speculation never changes the tokens, only how fast they come.
    #[serde(default = "yes")]
    pub speculative: bool,
}

fn yes() -> bool {
    true
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            logit_bias: Vec::new(),
            seed: None,
            max_tokens: 16,
            stop: Vec::new(),
            stop_token_ids: Vec::new(),
            ignore_eos: false,
            min_tokens: 0,
            logprobs: None,
            prompt_logprobs: None,
            speculative: true,
        }
    }
}

/// A parameter outside its valid range; `param` is the OpenAI field name.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("{param}: {message}")]
pub struct ParamError {
    pub param: &'static str,
    pub message: String,
}

pub const MAX_STOP_STRINGS: usize = 16;

/// Most alternatives a request may ask for per step (OpenAI's limit for `top_logprobs`).
pub const MAX_LOGPROBS: u32 = 20;

/// Temperatures below this sample greedily (vLLM's `_SAMPLING_EPS`).
pub const MIN_TEMPERATURE: f32 = 1e-5;

impl SamplingParams {
    pub fn greedy(max_tokens: u32) -> Self {
        Self { temperature: 0.0, max_tokens, ..Self::default() }
    }

    /// Greedy at temperature 0 and at temperatures too small to sample at (below [`MIN_TEMPERATURE`]), as
    /// vLLM does: scaling by their inverse overflows f32 (1e-38 and below) and the result is the argmax anyway.
    pub fn is_greedy(&self) -> bool {
        self.temperature < MIN_TEMPERATURE
    }

    /// Checks every field against its range. `vocab_size` bounds `logit_bias` keys.
    pub fn validate(&self, vocab_size: usize) -> Result<(), ParamError> {
        let err = |param, message: String| Err(ParamError { param, message });
        if !(0.0..=2.0).contains(&self.temperature) {
            return err("temperature", format!("must be between 0 and 2, got {}", self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return err("top_p", format!("must be in (0, 1], got {}", self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return err("min_p", format!("must be in [0, 1], got {}", self.min_p));
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty <= 10.0) {
            return err("repetition_penalty", format!("must be in (0, 10], got {}", self.repetition_penalty));
        }
        if !(-2.0..=2.0).contains(&self.presence_penalty) {
            return err("presence_penalty", format!("must be between -2 and 2, got {}", self.presence_penalty));
        }
        if !(-2.0..=2.0).contains(&self.frequency_penalty) {
            return err("frequency_penalty", format!("must be between -2 and 2, got {}", self.frequency_penalty));
        }
        for &(id, bias) in &self.logit_bias {
            if id as usize >= vocab_size {
                return err("logit_bias", format!("token id {id} is outside the vocabulary (size {vocab_size})"));
            }
            if !(-100.0..=100.0).contains(&bias) {
                return err("logit_bias", format!("bias for token {id} must be between -100 and 100, got {bias}"));
            }
        }
        if self.max_tokens == 0 {
            return err("max_tokens", "must be at least 1".into());
        }
        if self.min_tokens > self.max_tokens {
            return err(
                "min_tokens",
                format!("must not exceed max_tokens ({}), got {}", self.max_tokens, self.min_tokens),
            );
        }
        if let Some(k) = self.prompt_logprobs.filter(|&k| k > MAX_LOGPROBS) {
            return err("prompt_logprobs", format!("at most {MAX_LOGPROBS} top logprobs, got {k}"));
        }
        if let Some(k) = self.logprobs {
            if k > MAX_LOGPROBS {
                return err("logprobs", format!("at most {MAX_LOGPROBS} top logprobs, got {k}"));
            }
        }
        if self.stop.len() > MAX_STOP_STRINGS {
            return err("stop", format!("at most {MAX_STOP_STRINGS} stop strings, got {}", self.stop.len()));
        }
        if self.stop.iter().any(|s| s.is_empty()) {
            return err("stop", "stop strings must not be empty".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validate_names_the_offending_field() {
        let v = 100;
        assert_eq!(SamplingParams::greedy(8).validate(v), Ok(()));
        let cases: Vec<(SamplingParams, &str)> = vec![
            (SamplingParams { temperature: -0.1, ..SamplingParams::default() }, "temperature"),
            (SamplingParams { top_p: 0.0, ..SamplingParams::default() }, "top_p"),
            (SamplingParams { min_p: 1.5, ..SamplingParams::default() }, "min_p"),
            (SamplingParams { repetition_penalty: 0.0, ..SamplingParams::default() }, "repetition_penalty"),
            (SamplingParams { presence_penalty: 3.0, ..SamplingParams::default() }, "presence_penalty"),
            (SamplingParams { frequency_penalty: -2.5, ..SamplingParams::default() }, "frequency_penalty"),
            (SamplingParams { logit_bias: vec![(100, 1.0)], ..SamplingParams::default() }, "logit_bias"),
            (SamplingParams { logit_bias: vec![(1, 101.0)], ..SamplingParams::default() }, "logit_bias"),
            (SamplingParams { max_tokens: 0, ..SamplingParams::default() }, "max_tokens"),
            (SamplingParams { stop: vec![String::new()], ..SamplingParams::default() }, "stop"),
        ];
        for (p, field) in cases {
            assert_eq!(p.validate(v).unwrap_err().param, field);
        }
    }
}
