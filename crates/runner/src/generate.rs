//! Single-sequence generation over the paged KV cache: chunked prefill, then one token per step, with
//! sampling, end-of-generation tokens, stop strings and streamed text deltas.

use crate::sampler::Sampler;
use mlx_serving_engine::{FinishReason, SamplingParams};
use mlx_serving_frontend::stop::StopOutcome;
use mlx_serving_frontend::{IncrementalDetokenizer, StopMatcher};
use mlx_serving_models::{BatchInput, Model, PagedKvCache, SeqInput};
use std::time::{Duration, Instant};
use tokenizers::Tokenizer;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GenerateError {
    #[error("invalid parameter {0}")]
    Param(#[from] mlx_serving_engine::ParamError),
    #[error(
        "prompt ({prompt} tokens) plus max_tokens ({max_tokens}) exceeds the model's context of {max_model_len} tokens"
    )]
    ContextLengthExceeded { prompt: usize, max_tokens: usize, max_model_len: usize },
    #[error("empty prompt")]
    EmptyPrompt,
    #[error(transparent)]
    Model(#[from] mlx_serving_models::Error),
}

#[derive(Clone, Debug)]
pub struct GenerateOptions {
    pub block_size: usize,
    /// Longest prompt chunk per forward pass.
    pub max_prefill_chunk: usize,
    /// End-of-generation token ids (ignored with `params.ignore_eos`).
    pub eog_token_ids: Vec<u32>,
    pub skip_special_tokens: bool,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self { block_size: 16, max_prefill_chunk: 512, eog_token_ids: Vec::new(), skip_special_tokens: true }
    }
}

#[derive(Clone, Debug)]
pub struct Generation {
    pub prompt_token_ids: Vec<u32>,
    /// Generated ids, including the end-of-generation token when that is why it stopped.
    pub token_ids: Vec<u32>,
    pub text: String,
    pub finish_reason: FinishReason,
    pub prompt_time: Duration,
    pub decode_time: Duration,
}

/// Generates from `prompt` and calls `on_delta` with each piece of final text.
pub fn generate(
    model: &Model,
    tokenizer: &Tokenizer,
    prompt: &[u32],
    params: &SamplingParams,
    opts: &GenerateOptions,
    mut on_delta: impl FnMut(&str),
) -> Result<Generation, GenerateError> {
    let cfg = model.config();
    params.validate(cfg.vocab_size)?;
    if prompt.is_empty() {
        return Err(GenerateError::EmptyPrompt);
    }
    let total = prompt.len() + params.max_tokens as usize;
    if total > cfg.max_position_embeddings {
        return Err(GenerateError::ContextLengthExceeded {
            prompt: prompt.len(),
            max_tokens: params.max_tokens as usize,
            max_model_len: cfg.max_position_embeddings,
        });
    }
    let bs = opts.block_size.max(1);
    let num_blocks = total.div_ceil(bs);
    let mut cache = PagedKvCache::new(cfg, bs, num_blocks);
    // Blocks in reverse order: the model must follow the table, never assume contiguity.
    let block_table: Vec<u32> = (0..num_blocks as u32).rev().collect();
    let mut sampler = Sampler::new(params).with_eos(&opts.eog_token_ids);
    let mut detok = IncrementalDetokenizer::new(tokenizer, opts.skip_special_tokens);
    let mut stops = StopMatcher::new(&params.stop);
    let mut text = String::new();
    let mut tokens: Vec<u32> = prompt.to_vec();
    let mut output: Vec<u32> = Vec::new();
    let mut computed = 0usize;
    let mut stopped_by_string = false;
    let start = Instant::now();
    let mut prompt_time = Duration::ZERO;
    let finish_reason = loop {
        let chunk = (tokens.len() - computed).min(opts.max_prefill_chunk.max(1));
        let ids = &tokens[computed..computed + chunk];
        let positions: Vec<u32> = (computed..computed + chunk).map(|p| p as u32).collect();
        let slots: Vec<u32> =
            (computed..computed + chunk).map(|p| block_table[p / bs] * bs as u32 + (p % bs) as u32).collect();
        let seqs = [SeqInput { query_len: chunk, context_len: computed + chunk, block_table: &block_table }];
        computed += chunk;
        let last = [chunk as u32 - 1];
        let want_logits = computed == tokens.len();
        let batch = BatchInput {
            token_ids: ids,
            positions: &positions,
            slot_mapping: &slots,
            seqs: &seqs,
            logits_indices: if want_logits { &last } else { &[] },
        };
        let mut logits = model.forward(&batch, &mut cache)?;
        if !want_logits {
            continue;
        }
        if output.is_empty() {
            prompt_time = start.elapsed();
        }
        let next = sampler.sample(&mut logits, prompt, &output);
        output.push(next);
        tokens.push(next);
        let is_eog = !params.ignore_eos && opts.eog_token_ids.contains(&next);
        if is_eog || params.stop_token_ids.contains(&next) {
            break FinishReason::Stop;
        }
        if let Some(delta) = detok.push(next) {
            if let StopOutcome::Stopped(t) = push_text(&mut stops, &delta, &mut text, &mut on_delta) {
                emit(&mut text, &t, &mut on_delta);
                stopped_by_string = true;
                break FinishReason::Stop;
            }
        }
        if output.len() >= params.max_tokens as usize {
            break FinishReason::Length;
        }
    };
    let mut finish_reason = finish_reason;
    if !stopped_by_string {
        // Release text held back for an incomplete character or a possible stop string.
        let rest = detok.flush().unwrap_or_default();
        match push_text(&mut stops, &rest, &mut text, &mut on_delta) {
            StopOutcome::Stopped(t) => {
                emit(&mut text, &t, &mut on_delta);
                finish_reason = FinishReason::Stop;
            }
            StopOutcome::Continue(_) => {
                let held = stops.flush();
                emit(&mut text, &held, &mut on_delta);
            }
        }
    }
    Ok(Generation {
        prompt_token_ids: prompt.to_vec(),
        token_ids: output,
        text,
        finish_reason,
        prompt_time,
        decode_time: start.elapsed() - prompt_time,
    })
}

/// Feeds a delta through the stop matcher, emitting what is safe; returns the matcher's verdict.
fn push_text(stops: &mut StopMatcher, delta: &str, text: &mut String, on_delta: &mut impl FnMut(&str)) -> StopOutcome {
    match stops.push(delta) {
        StopOutcome::Continue(t) => {
            emit(text, &t, on_delta);
            StopOutcome::Continue(String::new())
        }
        stopped => stopped,
    }
}

fn emit(text: &mut String, t: &str, on_delta: &mut impl FnMut(&str)) {
    if !t.is_empty() {
        text.push_str(t);
        on_delta(t);
    }
}

/// The logits of `prompt`'s last position, from one forward pass over the whole prompt in a cache of its own
/// (for tests and tools that compare models' next-token distributions).
pub fn last_position_logits(model: &Model, prompt: &[u32]) -> mlx_serving_models::Result<Vec<f32>> {
    let bs = 16;
    let nb = prompt.len().div_ceil(bs);
    let mut cache = PagedKvCache::new(model.config(), bs, nb);
    let table: Vec<u32> = (0..nb as u32).collect();
    let positions: Vec<u32> = (0..prompt.len() as u32).collect();
    let seqs = [SeqInput { query_len: prompt.len(), context_len: prompt.len(), block_table: &table }];
    let last = [prompt.len().saturating_sub(1) as u32];
    let batch = BatchInput {
        token_ids: prompt,
        positions: &positions,
        slot_mapping: &positions,
        seqs: &seqs,
        logits_indices: &last,
    };
    model.forward(&batch, &mut cache)
}
