//! Single-sequence generation over the paged KV cache: chunked prefill, then one token per step, with
//! sampling, end-of-generation tokens, stop strings and streamed text deltas.

use crate::executor::ModelExecutor;
use crate::sampler::Sampler;
use crate::speculative::Speculator;
use mlx_serving_engine::{
    EngineRequest, Executor, FinishReason, RequestId, SamplingParams, Scheduler, SchedulerConfig,
};
use mlx_serving_frontend::stop::StopOutcome;
use mlx_serving_frontend::{IncrementalDetokenizer, StopMatcher};
use mlx_serving_models::{BatchInput, Model, ModelBundle, PagedKvCache, SeqInput};
use std::sync::Arc;
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
    #[error("{0}")]
    Engine(String),
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
    check_request(model, prompt, params)?;
    let cfg = model.config();
    let total = prompt.len() + params.max_tokens as usize;
    let bs = opts.block_size.max(1);
    let num_blocks = total.div_ceil(bs);
    let source = PlainSource {
        model,
        cache: PagedKvCache::new(cfg, bs, num_blocks),
        // Blocks in reverse order: the model must follow the table, never assume contiguity.
        block_table: (0..num_blocks as u32).rev().collect(),
        sampler: Sampler::new(params).with_eos(&opts.eog_token_ids),
        prompt: prompt.to_vec(),
        tokens: prompt.to_vec(),
        computed: 0,
        chunk: opts.max_prefill_chunk.max(1),
    };
    drive(source, tokenizer, prompt, params, opts, &mut on_delta)
}

/// Checks a generation's request against `model`'s limits.
fn check_request(model: &Model, prompt: &[u32], params: &SamplingParams) -> Result<(), GenerateError> {
    let cfg = model.config();
    params.validate(cfg.vocab_size)?;
    if prompt.is_empty() {
        return Err(GenerateError::EmptyPrompt);
    }
    if prompt.len() + params.max_tokens as usize > cfg.max_position_embeddings {
        return Err(GenerateError::ContextLengthExceeded {
            prompt: prompt.len(),
            max_tokens: params.max_tokens as usize,
            max_model_len: cfg.max_position_embeddings,
        });
    }
    Ok(())
}

/// Speculative decoding's counts over one generation.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SpecCounts {
    /// Steps that verified draft tokens.
    pub drafts: u64,
    pub draft_tokens: u64,
    pub accepted_tokens: u64,
    /// Accepted draft tokens by position.
    pub accepted_per_position: Vec<u64>,
}

/// [`generate`] through the engine's scheduler and executor with `speculator` proposing draft tokens: the
/// same tokens as [`generate`], in fewer steps when drafts are accepted. Also returns the speculation counts.
pub fn generate_speculative(
    bundle: Arc<ModelBundle>,
    speculator: Speculator,
    prompt: &[u32],
    params: &SamplingParams,
    opts: &GenerateOptions,
    on_delta: impl FnMut(&str),
) -> Result<(Generation, SpecCounts), GenerateError> {
    // Checked before the executor's cache is sized from `max_tokens`.
    check_request(&bundle.model, prompt, params)?;
    let bs = opts.block_size.max(1);
    let most = speculator.config().num_speculative_tokens;
    let num_blocks = (prompt.len() + params.max_tokens as usize + most + 1).div_ceil(bs);
    let mut executor = ModelExecutor::new(bundle.clone(), bs, num_blocks).with_speculation(speculator);
    generate_with(&bundle, &mut executor, num_blocks, prompt, params, opts, on_delta)
}

/// [`generate`] through the engine's scheduler and `executor` (e.g. one running the model on a GPU, see
/// [`ModelExecutor::on_device`]), whose cache must hold `num_blocks` blocks of `opts.block_size` tokens, at
/// least enough for the prompt, `max_tokens` and the executor's draft tokens. Also returns the speculation counts
/// (zero without a speculator). The executor can serve further generations afterwards.
pub fn generate_with(
    bundle: &ModelBundle,
    executor: &mut ModelExecutor,
    num_blocks: usize,
    prompt: &[u32],
    params: &SamplingParams,
    opts: &GenerateOptions,
    mut on_delta: impl FnMut(&str),
) -> Result<(Generation, SpecCounts), GenerateError> {
    check_request(&bundle.model, prompt, params)?;
    let most = executor.max_draft_tokens();
    let (scheduler, id) = one_request(bundle, prompt, params, opts, num_blocks, opts.max_prefill_chunk.max(most + 1))?;
    let mut source = EngineSource { scheduler, executor, id, counts: SpecCounts::default() };
    let g = drive(&mut source, &bundle.tokenizer, prompt, params, opts, &mut on_delta);
    source.executor.remove_request(id);
    Ok((g?, source.counts))
}

/// A scheduler for one request (prompt caching off) with `num_blocks` cache blocks, and the request's id.
fn one_request(
    bundle: &ModelBundle,
    prompt: &[u32],
    params: &SamplingParams,
    opts: &GenerateOptions,
    num_blocks: usize,
    max_num_batched_tokens: usize,
) -> Result<(Scheduler, RequestId), GenerateError> {
    let cfg = SchedulerConfig {
        block_size: opts.block_size.max(1),
        num_blocks,
        max_num_seqs: 1,
        max_num_batched_tokens,
        max_model_len: bundle.model.config().max_position_embeddings,
        enable_prefix_caching: false,
        eos_token_ids: opts.eog_token_ids.clone(),
        ..SchedulerConfig::default()
    };
    let mut scheduler = Scheduler::new(cfg);
    let id = RequestId(0);
    let request = EngineRequest {
        id,
        prompt_token_ids: prompt.to_vec(),
        params: Arc::new(params.clone()),
        priority: Default::default(),
        deadline: None,
        constraint: None,
        mm_inputs: Vec::new(),
    };
    scheduler.add_request(request, Instant::now()).map_err(|e| GenerateError::Engine(e.to_string()))?;
    Ok((scheduler, id))
}

/// Where a generation's tokens come from: each call runs model steps until it has new tokens, or says why the
/// source has stopped.
trait TokenSource {
    fn next(&mut self) -> Result<(Vec<u32>, Option<FinishReason>), GenerateError>;
}

impl<T: TokenSource> TokenSource for &mut T {
    fn next(&mut self) -> Result<(Vec<u32>, Option<FinishReason>), GenerateError> {
        (**self).next()
    }
}

/// One sequence on the model directly: chunked prefill, then a token per step.
struct PlainSource<'a> {
    model: &'a Model,
    cache: PagedKvCache,
    block_table: Vec<u32>,
    sampler: Sampler,
    prompt: Vec<u32>,
    /// Prompt and output so far.
    tokens: Vec<u32>,
    computed: usize,
    chunk: usize,
}

impl TokenSource for PlainSource<'_> {
    fn next(&mut self) -> Result<(Vec<u32>, Option<FinishReason>), GenerateError> {
        let bs = self.cache.block_size();
        loop {
            let (computed, tokens) = (self.computed, &self.tokens);
            let chunk = (tokens.len() - computed).min(self.chunk);
            let ids = &tokens[computed..computed + chunk];
            let positions: Vec<u32> = (computed..computed + chunk).map(|p| p as u32).collect();
            let slots: Vec<u32> =
                (computed..computed + chunk).map(|p| self.block_table[p / bs] * bs as u32 + (p % bs) as u32).collect();
            let seqs = [SeqInput { query_len: chunk, context_len: computed + chunk, block_table: &self.block_table }];
            self.computed += chunk;
            let last = [chunk as u32 - 1];
            let want_logits = self.computed == tokens.len();
            let batch = BatchInput {
                token_ids: ids,
                positions: &positions,
                slot_mapping: &slots,
                seqs: &seqs,
                logits_indices: if want_logits { &last } else { &[] },
                embeds: &[],
                mrope_positions: &[],
            };
            let mut logits = self.model.forward(&batch, &mut self.cache)?;
            if !want_logits {
                continue;
            }
            let next = self.sampler.sample(&mut logits, &self.prompt, &self.tokens[self.prompt.len()..]);
            self.tokens.push(next);
            return Ok((vec![next], None));
        }
    }
}

/// One request through the scheduler and the executor (with speculation).
struct EngineSource<'a> {
    scheduler: Scheduler,
    executor: &'a mut ModelExecutor,
    id: RequestId,
    counts: SpecCounts,
}

impl TokenSource for EngineSource<'_> {
    fn next(&mut self) -> Result<(Vec<u32>, Option<FinishReason>), GenerateError> {
        loop {
            if !self.scheduler.has_work() {
                return Ok((Vec::new(), Some(FinishReason::Stop)));
            }
            let step = self.scheduler.schedule(Instant::now());
            let run = self.executor.execute(&step).map_err(|e| GenerateError::Engine(e.to_string()))?;
            for s in step.seqs.iter().filter(|s| s.num_draft_tokens > 0) {
                let c = &mut self.counts;
                let accepted = run.num_accepted.get(&s.id).copied().unwrap_or(0);
                c.drafts += 1;
                c.draft_tokens += s.num_draft_tokens as u64;
                c.accepted_tokens += accepted as u64;
                if c.accepted_per_position.len() < s.num_draft_tokens {
                    c.accepted_per_position.resize(s.num_draft_tokens, 0);
                }
                c.accepted_per_position.iter_mut().take(accepted).for_each(|n| *n += 1);
            }
            let mut tokens = Vec::new();
            let mut finish = None;
            for o in self.scheduler.update_from_output(&step, &run) {
                if o.id != self.id {
                    continue;
                }
                if let Some(e) = o.error {
                    return Err(GenerateError::Engine(e));
                }
                tokens.extend(o.new_token_ids);
                finish = finish.or(o.finish_reason);
            }
            if !tokens.is_empty() || finish.is_some() {
                return Ok((tokens, finish));
            }
        }
    }
}

/// Runs `source` to the end of the generation: end-of-generation and stop tokens, stop strings, `max_tokens`,
/// with text deltas to `on_delta`.
fn drive(
    mut source: impl TokenSource,
    tokenizer: &Tokenizer,
    prompt: &[u32],
    params: &SamplingParams,
    opts: &GenerateOptions,
    on_delta: &mut impl FnMut(&str),
) -> Result<Generation, GenerateError> {
    let mut detok = IncrementalDetokenizer::new(tokenizer, opts.skip_special_tokens);
    let mut stops = StopMatcher::new(&params.stop);
    let mut text = String::new();
    let mut output: Vec<u32> = Vec::new();
    let mut stopped_by_string = false;
    let start = Instant::now();
    let mut prompt_time = Duration::ZERO;
    let finish_reason = 'outer: loop {
        let (new, finished) = source.next()?;
        if output.is_empty() {
            prompt_time = start.elapsed();
        }
        for next in new {
            output.push(next);
            let is_eog = !params.ignore_eos && opts.eog_token_ids.contains(&next);
            if is_eog || params.stop_token_ids.contains(&next) {
                break 'outer FinishReason::Stop;
            }
            if let Some(delta) = detok.push(next) {
                if let StopOutcome::Stopped(t) = push_text(&mut stops, &delta, &mut text, on_delta) {
                    emit(&mut text, &t, on_delta);
                    stopped_by_string = true;
                    break 'outer FinishReason::Stop;
                }
            }
            if output.len() >= params.max_tokens as usize {
                break 'outer FinishReason::Length;
            }
        }
        if let Some(reason) = finished {
            break reason;
        }
    };
    let mut finish_reason = finish_reason;
    if !stopped_by_string {
        // Release text held back for an incomplete character or a possible stop string.
        let rest = detok.flush().unwrap_or_default();
        match push_text(&mut stops, &rest, &mut text, on_delta) {
            StopOutcome::Stopped(t) => {
                emit(&mut text, &t, on_delta);
                finish_reason = FinishReason::Stop;
            }
            StopOutcome::Continue(_) => {
                let held = stops.flush();
                emit(&mut text, &held, on_delta);
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
        embeds: &[],
        mrope_positions: &[],
    };
    model.forward(&batch, &mut cache)
}
