//! The engine's `Executor` on a real model: turns a `SchedulerOutput` into one flattened forward pass over
//! the paged KV cache, then samples every sequence that reached the end of its known tokens.
//!
//! Per-request sampler state (RNG, generated tokens for penalties) lives here from the request's first
//! step until `remove_request`, so a preempted request resumes with the same RNG stream.

use crate::sampler::{token_logprobs, Sampler};
use crate::speculative::{SpecState, Speculator};
use crate::vision::{mrope_positions, step_embeds, EncoderCache, SeqImage};
use mlx_serving_engine::{
    ConstraintState, Executor, ExecutorError, Heartbeat, RequestId, RunnerOutput, SchedulerConfig, SchedulerOutput,
};
use mlx_serving_engine::{ScheduledSeq, TokenLogprobs};
use mlx_serving_models::{BatchInput, DeviceModel, ModelBundle, PagedKvCache, SeqInput, StepLogits};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

struct SeqState {
    sampler: Sampler,
    prompt: Vec<u32>,
    output: Vec<u32>,
    /// The request's output constraint, advanced over every sampled token.
    constraint: Option<Box<dyn ConstraintState>>,
    /// Its acceptance history, which sets how many tokens to propose.
    spec: SpecState,
    /// Images in its prompt.
    images: Vec<SeqImage>,
    /// Its prompt logprobs so far (when asked for): entry `i` is prompt token `i + 1`'s. Kept across a
    /// preemption: a recomputed prompt adds nothing twice.
    prompt_logprobs: Vec<TokenLogprobs>,
}

impl SeqState {
    /// Whether this step's sample rows need only their argmax: sampled as the raw argmax (see
    /// [`Sampler::is_plain_argmax`]) with no constraint and no logprobs to report.
    fn argmax_suffices(&self) -> bool {
        let p = self.sampler.params();
        self.constraint.is_none()
            && p.logprobs.is_none()
            && p.prompt_logprobs.is_none()
            && self.sampler.is_plain_argmax(self.output.len())
    }

    /// The prompt positions of a chunk at `start..start + len` whose logits give prompt logprobs not yet
    /// computed (position `p` gives token `p + 1`'s), as `(first position, count)`; none when not asked for.
    fn prompt_logprob_rows(&self, start: usize, len: usize) -> Option<(usize, usize)> {
        self.sampler.params().prompt_logprobs?;
        let from = start.max(self.prompt_logprobs.len());
        let to = (start + len).min(self.prompt.len().saturating_sub(1));
        (from < to).then(|| (from, to - from))
    }
}

pub struct ModelExecutor {
    bundle: Arc<ModelBundle>,
    cache: PagedKvCache,
    states: HashMap<RequestId, SeqState>,
    /// Beaten after every layer's attention and MLP: a long prefill keeps `/health` green.
    heartbeat: Option<Heartbeat>,
    /// Proposes draft tokens after each step, when speculation is configured.
    speculator: Option<Speculator>,
    /// Recently encoded images' embeddings.
    encoder_cache: EncoderCache,
    /// The model on a GPU, run in place of the bundle's CPU model and `cache` when set.
    device: Option<Box<dyn DeviceModel>>,
}

/// Default bound of the encoder cache.
pub const DEFAULT_ENCODER_CACHE_BYTES: usize = 256 << 20;

impl ModelExecutor {
    /// A KV cache of `num_blocks` blocks of `block_size` tokens for `bundle`'s model.
    pub fn new(bundle: Arc<ModelBundle>, block_size: usize, num_blocks: usize) -> Self {
        let cache = PagedKvCache::new(bundle.model.config(), block_size, num_blocks);
        Self {
            bundle,
            cache,
            states: HashMap::new(),
            heartbeat: None,
            speculator: None,
            encoder_cache: EncoderCache::new(DEFAULT_ENCODER_CACHE_BYTES),
            device: None,
        }
    }

    /// An executor running the model on `device` (a GPU holding the weights and the paged KV cache, with blocks
    /// of `block_size` tokens) instead of the CPU. No CPU cache is allocated beyond one block.
    pub fn on_device(bundle: Arc<ModelBundle>, block_size: usize, device: Box<dyn DeviceModel>) -> Self {
        let mut me = Self::new(bundle, block_size, 1);
        me.device = Some(device);
        me
    }

    /// The most draft tokens a step may verify per sequence (0 without speculation).
    pub fn max_draft_tokens(&self) -> usize {
        self.speculator.as_ref().map_or(0, |s| s.config().num_speculative_tokens)
    }

    /// Bounds the encoder cache (recently encoded images) to `bytes`.
    pub fn with_encoder_cache_bytes(mut self, bytes: usize) -> Self {
        self.encoder_cache = EncoderCache::new(bytes);
        self
    }

    /// Speculates with `speculator` (see [`crate::speculative`]).
    pub fn with_speculation(mut self, speculator: Speculator) -> Self {
        self.speculator = Some(speculator);
        self
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

    /// Draft tokens for the sequences of `batch` that sampled this step and may speculate.
    fn propose(&mut self, batch: &SchedulerOutput, out: &RunnerOutput) -> HashMap<RequestId, Vec<u32>> {
        let Some(spec) = self.speculator.as_mut() else {
            return HashMap::new();
        };
        if batch.seqs.len() > spec.config().disable_by_batch_size {
            return HashMap::new();
        }
        let (cost, most, drafting) = (spec.token_cost(), spec.config().num_speculative_tokens, spec.uses_draft());
        let mut wanted = Vec::new();
        for s in batch.seqs.iter().filter(|s| s.sample) {
            if !out.sampled.contains_key(&s.id) || out.completed.contains(&s.id) {
                continue;
            }
            let Some(st) = self.states.get_mut(&s.id) else { continue };
            let p = st.sampler.params();
            // Room for the drafts and the token after them.
            let room = (p.max_tokens as usize).saturating_sub(st.output.len() + 1);
            // A draft model's first proposal runs the whole prompt through it: it waits until the first token
            // has gone out, so that speculation does not delay the time to first token.
            if !p.speculative || room == 0 || drafting && st.output.len() < 2 {
                continue;
            }
            let k = st.spec.next_k(most.min(room), cost);
            if k > 0 {
                wanted.push((s.id, [&st.prompt[..], &st.output[..]].concat(), k));
            }
        }
        spec.propose(&wanted)
    }
}

/// A flattened batch under construction: each sequence's tokens, their positions and K/V slots, and the rows
/// whose logits are wanted.
pub(crate) struct FlatBatch<'a> {
    block_size: usize,
    token_ids: Vec<u32>,
    positions: Vec<u32>,
    slots: Vec<u32>,
    seqs: Vec<SeqInput<'a>>,
    logits_rows: Vec<u32>,
    /// M-RoPE positions of every row (M-RoPE models only).
    mrope: Vec<[u32; 3]>,
}

impl<'a> FlatBatch<'a> {
    pub(crate) fn new(block_size: usize) -> Self {
        Self {
            block_size,
            token_ids: Vec::new(),
            positions: Vec::new(),
            slots: Vec::new(),
            seqs: Vec::new(),
            logits_rows: Vec::new(),
            mrope: Vec::new(),
        }
    }

    /// Adds a sequence's `tokens` at positions `start..`, their K/V going to the blocks of `table`, with the
    /// logits of its last `logits_rows` tokens wanted.
    pub(crate) fn push(
        &mut self,
        tokens: &[u32],
        start: usize,
        table: &'a [u32],
        logits_rows: usize,
    ) -> Result<(), String> {
        let bs = self.block_size;
        self.token_ids.extend_from_slice(tokens);
        for p in start..start + tokens.len() {
            let block = *table.get(p / bs).ok_or_else(|| format!("block table too short for position {p}"))?;
            self.positions.push(p as u32);
            self.slots.push(block * bs as u32 + (p % bs) as u32);
        }
        self.seqs.push(SeqInput { query_len: tokens.len(), context_len: start + tokens.len(), block_table: table });
        let end = self.token_ids.len() as u32;
        self.logits_rows.extend(end - logits_rows.min(tokens.len()) as u32..end);
        Ok(())
    }

    pub(crate) fn input(&self) -> BatchInput<'_> {
        self.input_with(&[])
    }

    /// The batch with `embeds` in place of some rows' token embeddings.
    pub(crate) fn input_with<'b>(&'b self, embeds: &'b [(usize, &'b [f32])]) -> BatchInput<'b> {
        BatchInput {
            token_ids: &self.token_ids,
            positions: &self.positions,
            slot_mapping: &self.slots,
            seqs: &self.seqs,
            logits_indices: &self.logits_rows,
            embeds,
            mrope_positions: &self.mrope,
        }
    }

    fn num_rows(&self) -> usize {
        self.token_ids.len()
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
        let mut out = RunnerOutput::default();
        if let Some(spec) = self.speculator.as_mut() {
            // A preempted sequence recomputes from scratch; its draft blocks go back meanwhile.
            batch.preempted.iter().for_each(|&id| spec.remove(id));
        }
        let mut flat = FlatBatch::new(self.cache.block_size());
        let vision = self.bundle.vision.as_ref().map(|(v, _)| v.clone());
        let hidden = self.bundle.model.config().hidden_size;
        let mrope = self.bundle.model.config().mrope_section.is_some();
        let mut image_rows = Vec::new();
        // Logits rows each sequence asked for, in batch order.
        let mut row_counts = Vec::with_capacity(batch.seqs.len());
        // Encoders beat the heartbeat after each layer too (a large image takes seconds).
        let hb = self.heartbeat.clone();
        let beat = move || {
            hb.as_ref().is_none_or(|h| {
                h.beat();
                !h.step_abandoned()
            })
        };
        for s in &batch.seqs {
            if let Some(new) = &s.new_request {
                let images = match &vision {
                    Some(v) => {
                        let mut images: Vec<SeqImage> = Vec::with_capacity(new.mm_inputs.len());
                        let mut order: Vec<&mlx_serving_engine::MmInput> = new.mm_inputs.iter().collect();
                        order.sort_by_key(|m| m.span.start);
                        for m in order {
                            match SeqImage::new(m, &new.prompt_token_ids, v) {
                                Ok(i) => images.push(i),
                                Err(e) => {
                                    out.failed.insert(s.id, format!("image: {e}"));
                                    break;
                                }
                            }
                        }
                        images
                    }
                    None if !new.mm_inputs.is_empty() => {
                        out.failed.insert(s.id, "this model takes no images".into());
                        Vec::new()
                    }
                    None => Vec::new(),
                };
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
                        spec: SpecState::default(),
                        images,
                        prompt_logprobs: Vec::new(),
                    },
                );
            }
            if let (Some(v), Some(st)) = (&vision, self.states.get_mut(&s.id)) {
                if !st.images.is_empty() {
                    let (start, len, row0) = (s.start_pos, s.token_ids.len(), flat.num_rows());
                    let cache = &mut self.encoder_cache;
                    if let Err(e) = step_embeds(
                        v,
                        hidden,
                        cache,
                        &mut st.images,
                        start,
                        len,
                        row0,
                        &mut image_rows,
                        &mut out.encode_times,
                        &beat,
                    ) {
                        out.failed.insert(s.id, format!("image: {e}"));
                    }
                }
            }
            let sample_rows = if s.sample { s.num_draft_tokens + 1 } else { 0 };
            // Prompt logprobs want the logits of their positions too: every row from the first of them.
            let prompt_rows =
                self.states.get(&s.id).and_then(|st| st.prompt_logprob_rows(s.start_pos, s.token_ids.len()));
            let rows = match prompt_rows {
                Some((first, _)) => (s.start_pos + s.token_ids.len() - first).max(sample_rows),
                None => sample_rows,
            };
            row_counts.push(rows);
            flat.push(&s.token_ids, s.start_pos, &s.block_table, rows)
                .map_err(|e| ExecutorError(format!("request {:?}: {e}", s.id)))?;
            if mrope {
                let images = self.states.get(&s.id).map_or(&[][..], |st| &st.images[..]);
                mrope_positions(images, s.start_pos, s.token_ids.len(), &mut flat.mrope);
            }
        }
        let embeds: Vec<(usize, &[f32])> = image_rows.iter().map(|(r, e, off)| (*r, &e[*off..*off + hidden])).collect();
        let input = flat.input_with(&embeds);
        let heartbeat = self.heartbeat.clone();
        // Beat, and stop early once every request of the step has been abandoned.
        let progress = move || {
            heartbeat.as_ref().is_none_or(|h| {
                h.beat();
                !h.step_abandoned()
            })
        };
        // The constrained sequences' token masks (for their first sampled position) are computed on their own
        // thread while the model runs.
        let constrained: Vec<RequestId> = batch
            .seqs
            .iter()
            .filter(|s| s.sample && self.states.get(&s.id).is_some_and(|st| st.constraint.is_some()))
            .map(|s| s.id)
            .collect();
        // On a device, the sample rows of requests that take the plain argmax come back as that token alone.
        let argmax_only: Vec<bool> = match self.device {
            Some(_) => batch
                .seqs
                .iter()
                .zip(&row_counts)
                .flat_map(|(s, &count)| {
                    let only = s.sample && self.states.get(&s.id).is_some_and(SeqState::argmax_suffices);
                    let sampled = if s.sample { s.num_draft_tokens + 1 } else { 0 };
                    (0..count).map(move |i| only && i >= count - sampled)
                })
                .collect(),
            None => Vec::new(),
        };
        let (bundle, cache, states, device) = (&self.bundle, &mut self.cache, &mut self.states, &mut self.device);
        let (logits, masks) = std::thread::scope(|scope| {
            let masks = (!constrained.is_empty()).then(|| scope.spawn(|| masks_for(states, &constrained)));
            let logits = match device {
                Some(d) => d.forward_select(&input, &argmax_only, &progress),
                None => bundle
                    .model
                    .forward_with_progress(&input, cache, &progress)
                    .map(|l| StepLogits::all(l, input.logits_indices.len())),
            };
            (logits, masks.map(|h| h.join()))
        });
        let StepLogits { mut logits, tokens } = logits.map_err(|e| ExecutorError(e.to_string()))?;
        let mut masks = match masks {
            Some(Ok((masks, times))) => {
                out.mask_times = times;
                masks
            }
            Some(Err(_)) => return Err(ExecutorError("computing the token masks panicked".into())),
            None => HashMap::new(),
        };
        let vocab = self.bundle.model.config().vocab_size;
        let full_rows = tokens.iter().filter(|t| t.is_none()).count();
        if tokens.len() != row_counts.iter().sum::<usize>() || logits.len() != full_rows * vocab {
            return Err(ExecutorError(format!(
                "the model returned {} rows ({full_rows} of logits, {} floats) for {} wanted",
                tokens.len(),
                logits.len(),
                row_counts.iter().sum::<usize>()
            )));
        }
        let mut logits_rows = logits.chunks_mut(vocab);
        let mut rows = tokens.iter().map(|t| match t {
            Some(token) => Row::Token(*token),
            None => Row::Logits(logits_rows.next().unwrap_or_default()),
        });
        // Each sequence's prompt logprobs and samples touch only its own state and rows: a step with much of it
        // spreads them over threads (see `sample_all`).
        let items: Vec<(&ScheduledSeq, Vec<Row<'_>>)> = batch
            .seqs
            .iter()
            .zip(&row_counts)
            .map(|(s, &count)| (s, rows.by_ref().take(count).collect::<Vec<_>>()))
            .filter(|(s, r)| !r.is_empty() && !out.failed.contains_key(&s.id))
            .collect();
        let never = |s: &ScheduledSeq| ExecutorError(format!("request {:?} was never announced", s.id));
        // Sampling reads a row in about 0.3 ms at 49,152 tokens; an argmax (a greedy row on the CPU path) in
        // about a tenth of that (criterion `sampler`).
        let work_floats: usize = items
            .iter()
            .map(|(s, rows)| {
                let greedy = self.states.get(&s.id).is_some_and(|st| st.sampler.params().is_greedy());
                let logits_rows = rows.iter().filter(|r| matches!(r, Row::Logits(_))).count();
                logits_rows * if greedy { vocab / 8 } else { vocab }
            })
            .sum();
        let threads = sampling_threads(work_floats, items.len());
        if threads == 1 {
            for (s, rows) in items {
                let st = self.states.get_mut(&s.id).ok_or_else(|| never(s))?;
                SeqWork { s, st, rows, mask: masks.remove(&s.id) }.run(&mut out);
            }
        } else {
            let mut by_id: HashMap<RequestId, &mut SeqState> = self.states.iter_mut().map(|(k, v)| (*k, v)).collect();
            let work = items
                .into_iter()
                .map(|(s, rows)| {
                    let st = by_id.remove(&s.id).ok_or_else(|| never(s))?;
                    Ok(SeqWork { s, st, rows, mask: masks.remove(&s.id) })
                })
                .collect::<Result<Vec<_>, ExecutorError>>()?;
            sample_all(work, threads, &mut out)?;
        }
        let started = Instant::now();
        out.drafts = self.propose(batch, &out);
        out.propose_time = started.elapsed();
        Ok(out)
    }

    fn remove_request(&mut self, id: RequestId) {
        self.states.remove(&id);
        if let Some(spec) = self.speculator.as_mut() {
            spec.remove(id);
        }
    }

    fn set_heartbeat(&mut self, heartbeat: Heartbeat) {
        self.heartbeat = Some(heartbeat);
    }
}

/// One sequence's share of a step's sampling: its state, its logits rows, its constraint's first mask.
struct SeqWork<'a> {
    s: &'a ScheduledSeq,
    st: &'a mut SeqState,
    rows: Vec<Row<'a>>,
    mask: Option<Result<Vec<u32>, String>>,
}

impl SeqWork<'_> {
    /// Prompt logprobs from the rows that give them, then the samples (see `verify`), into `out`.
    fn run(self, out: &mut RunnerOutput) {
        let SeqWork { s, st, mut rows, mask } = self;
        if let Some((first, n)) = st.prompt_logprob_rows(s.start_pos, s.token_ids.len()) {
            // Rows start at position `first` (see the push in `execute`).
            let k = st.sampler.params().prompt_logprobs.unwrap_or(0) as usize;
            for (i, row) in rows.iter().take(n).enumerate() {
                // A request with prompt logprobs never has its rows reduced to the argmax (`argmax_suffices`).
                debug_assert!(matches!(row, Row::Logits(_)), "a prompt-logprob row came back as a token");
                if let Row::Logits(row) = row {
                    let target = st.prompt[first + i + 1];
                    st.prompt_logprobs.push(token_logprobs(row, target, k));
                }
            }
        }
        if !s.sample {
            return;
        }
        let sample_rows = rows.split_off(rows.len() - (s.num_draft_tokens + 1));
        let first_sample = st.output.is_empty();
        verify(st, s, sample_rows, mask, out);
        if first_sample && st.sampler.params().prompt_logprobs.is_some() && out.sampled.contains_key(&s.id) {
            out.prompt_logprobs.insert(s.id, st.prompt_logprobs.clone());
        }
    }
}

/// Logits floats (weighted: a greedy row counts an eighth) a step's sampling must read before it is spread over
/// threads: about 5 sampled rows of 49,152 tokens or 2 of 128,256, 1.5-2 ms of work (BENCHMARKS.md, session 27),
/// against tens of microseconds to start a thread.
const PARALLEL_SAMPLING_FLOATS: usize = 1 << 18;

/// Threads for a step's sampling of `floats` (weighted) logits over `seqs` sequences: one below
/// [`PARALLEL_SAMPLING_FLOATS`], else up to one per core.
fn sampling_threads(floats: usize, seqs: usize) -> usize {
    // (available_parallelism reads the cgroup's quota from files on Linux: once, not every step.)
    static CORES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    match floats / PARALLEL_SAMPLING_FLOATS {
        0 => 1,
        n => (n + 1).min(seqs).min(*CORES.get_or_init(|| std::thread::available_parallelism().map_or(1, |c| c.get()))),
    }
}

/// Steps whose sampling ran on several threads, since the process started (for tests and logs).
static PARALLEL_SAMPLING_STEPS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// How many steps so far spread their sampling over several threads (see [`sample_all`]).
pub fn parallel_sampling_steps() -> u64 {
    PARALLEL_SAMPLING_STEPS.load(std::sync::atomic::Ordering::Relaxed)
}

/// Runs the sequences' sampling on `threads` threads (many sampled rows over a large vocabulary; greedy rows a
/// GPU reduced to their argmax cost nothing). The outcome does not depend on the spreading: each sequence draws
/// from its own seeded generator and state.
fn sample_all(work: Vec<SeqWork<'_>>, threads: usize, out: &mut RunnerOutput) -> Result<(), ExecutorError> {
    if work.is_empty() {
        return Ok(());
    }
    PARALLEL_SAMPLING_STEPS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let per_thread = work.len().div_ceil(threads);
    let mut work = work.into_iter();
    let parts = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                let share: Vec<SeqWork<'_>> = work.by_ref().take(per_thread).collect();
                scope.spawn(move || {
                    let mut part = RunnerOutput::default();
                    share.into_iter().for_each(|w| w.run(&mut part));
                    part
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join()).collect::<Vec<_>>()
    });
    for part in parts {
        let part = part.map_err(|_| ExecutorError("sampling panicked".into()))?;
        // Every field, so that a new one is not forgotten here.
        let RunnerOutput {
            sampled,
            logprobs,
            prompt_logprobs,
            num_accepted,
            drafts,
            completed,
            failed,
            mask_times,
            propose_time: _,
            encode_times,
        } = part;
        out.sampled.extend(sampled);
        out.logprobs.extend(logprobs);
        out.prompt_logprobs.extend(prompt_logprobs);
        out.num_accepted.extend(num_accepted);
        out.drafts.extend(drafts);
        out.completed.extend(completed);
        out.failed.extend(failed);
        out.mask_times.extend(mask_times);
        out.encode_times.extend(encode_times);
    }
    Ok(())
}

/// A logits row of the step: its logits, or its argmax when the device returned that alone (see
/// [`SeqState::argmax_suffices`]).
enum Row<'a> {
    Logits(&'a mut [f32]),
    Token(u32),
}

/// Samples a sequence at each of its scheduled positions (`rows`: the last known token's logits, then each
/// draft token's) as decoding without speculation would, keeping draft tokens while they equal the sample;
/// records the emitted tokens, their logprobs and the accepted count in `out`. `first_mask` is the
/// constraint's mask for the first position, computed during the forward; later positions' masks are
/// computed here, after the constraint has advanced over the tokens before them.
fn verify(
    st: &mut SeqState,
    s: &ScheduledSeq,
    rows: Vec<Row<'_>>,
    first_mask: Option<Result<Vec<u32>, String>>,
    out: &mut RunnerOutput,
) {
    let n = s.num_draft_tokens;
    let drafts = &s.token_ids[s.token_ids.len() - n..];
    let (mut emitted, mut logprobs) = (Vec::with_capacity(n + 1), Vec::new());
    let mut first_mask = first_mask;
    let mut accepted = 0;
    // A failure at the first position fails the request; at a later one (after accepted drafts) the tokens
    // before it are kept and the next step, sampling that same position again, meets it.
    let mut fail = |emitted: &Vec<u32>, why: String| {
        if emitted.is_empty() {
            out.failed.insert(s.id, why);
        }
    };
    for (i, row) in rows.into_iter().enumerate() {
        let mask = match i {
            0 => first_mask.take(),
            _ => st.constraint.as_mut().map(|c| {
                let t0 = Instant::now();
                let m = c.allowed();
                out.mask_times.push(t0.elapsed());
                m
            }),
        };
        let mask = match mask {
            Some(Err(e)) => {
                fail(&emitted, format!("output constraint: {e}"));
                break;
            }
            Some(Ok(m)) => Some(m),
            None => None,
        };
        let (token, raw) = match row {
            // The device's argmax: what sample_masked would have drawn (no mask, processors or logprobs here).
            Row::Token(t) => (Some(t), None),
            Row::Logits(row) => {
                let raw = st.sampler.params().logprobs.map(|k| (row.to_vec(), k as usize));
                (st.sampler.sample_masked(row, &st.prompt, &st.output, mask.as_deref()), raw)
            }
        };
        let Some(token) = token else {
            fail(&emitted, "output constraint: no token is allowed here".into());
            break;
        };
        let mut complete = false;
        if let Some(c) = st.constraint.as_mut() {
            if let Err(e) = c.advance(token) {
                // The constraint's state is unknown now: the request fails, whatever came before.
                out.failed.insert(s.id, format!("output constraint: {e}"));
                emitted.clear();
                break;
            }
            complete = c.is_complete();
        }
        st.output.push(token);
        emitted.push(token);
        if let Some((raw, k)) = raw {
            logprobs.push(token_logprobs(&raw, token, k));
        }
        let kept = i < n && drafts[i] == token;
        accepted += usize::from(kept);
        if complete {
            out.completed.insert(s.id);
            break;
        }
        if !kept {
            break;
        }
    }
    if n > 0 {
        st.spec.record(n, accepted);
        out.num_accepted.insert(s.id, accepted);
    }
    if !emitted.is_empty() {
        out.sampled.insert(s.id, emitted);
        if !logprobs.is_empty() {
            out.logprobs.insert(s.id, logprobs);
        }
    }
}
