//! `/v1/completions` and `/v1/chat/completions`: cheap checks, prompts tokenized on the CPU pool, one engine
//! request per choice, then the response from the merged pieces of their output drivers.
//!
//! ```text
//!   handler → checks (shape, params, byte bound, queue room) → tokenize (CPU pool) → n × engine.add_request ─┐
//!   n × drive (detokenize, stop strings, metrics) → pieces channel (bounded) → JSON body | SSE events
//! ```

use crate::driver::{AbortGuard, Driver, Piece};
use crate::error::ApiError;
use crate::images;
use crate::json::ApiJson;
use crate::models::ServedModel;
use crate::params::sampling_params;
use crate::prompts::{
    chat_prompt_bound, completion_prompt_bounds, completion_prompts, normalize_messages, MAX_CHOICES,
};
use crate::respond::{collect_response, stream_response, Job, Kind, Prompt};
use crate::{shared, structured, tools};
use crate::{AppState, RequestCtx};
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use axum::Extension;
use mlx_serving_constraints::Compiled;
use mlx_serving_engine::{AddError, Constraint, EngineRequest, RequestId};
use mlx_serving_protocol::{ChatCompletionRequest, CompletionRequest, SamplingFields};
use mlx_serving_services::Join;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::mpsc;
use tracing::Instrument;

pub async fn completions(
    State(s): State<Arc<AppState>>,
    Extension(ctx): Extension<RequestCtx>,
    headers: HeaderMap,
    ApiJson(mut req): ApiJson<CompletionRequest>,
) -> Result<Response, ApiError> {
    let lease = s.lease(&req.model).await?;
    let m = lease.model().clone();
    let mut fields = req.sampling_fields();
    fields.logprobs = req.logprobs;
    let prompt_logprobs = fields.prompt_logprobs.is_some();
    // `echo` with `logprobs`: the prompt's logprobs too, with as many alternatives (computed in the prefill).
    if req.echo {
        if let Some(k) = req.logprobs {
            fields.prompt_logprobs = Some(fields.prompt_logprobs.unwrap_or(0).max(k));
        }
    }
    // OpenAI's completions default is 16 tokens.
    let bounds = completion_prompt_bounds(&m, &req.prompt)?;
    precheck(&s, &m, &fields, |_| 16, &bounds, "prompt")?;
    let wanted = structured::wanted(req.constraint_fields())?;
    let share = Share::new(&s, &ctx, &headers, &fields, wanted.as_ref());
    let (prompt, echo) = (std::mem::take(&mut req.prompt), req.echo);
    let rid = ctx.id.clone();
    let (prompts, constraint) = s
        .on_cpu_pool(&ctx.id, move || {
            let c = wanted.map(|w| structured::compile(&m, &w, &rid)).transpose()?;
            Ok::<_, ApiError>((completion_prompts(&m, &prompt, echo)?, c))
        })
        .await??;
    let job = Job {
        kind: Kind::Completion,
        id: format!("cmpl-{}", ctx.id),
        request_id: ctx.id,
        prompts,
        n: 1,
        stream: req.stream,
        include_usage: req.include_usage(),
        continuous_usage: req.continuous_usage(),
        logprobs: req.logprobs.is_some(),
        prompt_logprobs,
        return_token_ids: fields.return_token_ids,
        tool_names: None,
        model: lease,
    };
    run(s, job, fields, 16, constraint, share).await
}

pub async fn chat_completions(
    State(s): State<Arc<AppState>>,
    Extension(ctx): Extension<RequestCtx>,
    headers: HeaderMap,
    ApiJson(mut req): ApiJson<ChatCompletionRequest>,
) -> Result<Response, ApiError> {
    let lease = s.lease(&req.model).await?;
    let m = lease.model().clone();
    if req.messages.is_empty() {
        return Err(ApiError::bad_request("messages must not be empty", Some("messages")));
    }
    let messages = normalize_messages(&req.messages, m.bundle.vision.is_some())?;
    let mut image_parts = images::find(&req.messages, &s.options.images)?;
    let mut fields = req.sampling_fields();
    fields.max_tokens = req.max_completion_tokens.or(fields.max_tokens);
    fields.logprobs = match (req.logprobs, req.top_logprobs) {
        (true, k) => Some(k.unwrap_or(0)),
        (false, None) => None,
        (false, Some(_)) => {
            return Err(ApiError::bad_request("top_logprobs requires logprobs to be true", Some("top_logprobs")))
        }
    };
    if let Some(k) = fields.logprobs {
        if !(0..=mlx_serving_engine::MAX_LOGPROBS as i64).contains(&k) {
            return Err(ApiError::bad_request(
                format!("top_logprobs must be between 0 and {}, got {k}", mlx_serving_engine::MAX_LOGPROBS),
                Some("top_logprobs"),
            ));
        }
    }
    // Chat's default is the rest of the context, capped at 4096 and at what the KV cache can hold, so that a
    // request without max_tokens runs on a small cache too.
    let cfg = m.engine.config();
    let room = cfg.max_model_len.min(cfg.num_blocks * cfg.block_size);
    let default_max = |prompt_len: usize| room.saturating_sub(prompt_len).min(4096);
    precheck(&s, &m, &fields, default_max, &[chat_prompt_bound(&m, &messages)], "messages")?;
    let tools = tools::read(req.tools.as_ref(), req.tool_choice.as_ref(), req.parallel_tool_calls)?;
    let mut wanted = structured::wanted(req.constraint_fields())?;
    if let Some(spec) = tools.as_ref().and_then(|t| t.spec()) {
        if let Some(w) = &wanted {
            return Err(ApiError::bad_request(
                "an output format cannot be combined with tool calls (unless tool_choice is none)",
                Some(w.field.split('.').next().unwrap_or("response_format")),
            ));
        }
        wanted = Some(structured::Wanted { spec, field: "tools".into() });
    }
    let share = Share::new(&s, &ctx, &headers, &fields, wanted.as_ref());
    images::fetch_remote(&mut image_parts, &s.options.images).await?;
    let (st, rid, t, mc) = (s.clone(), ctx.id.clone(), tools.clone(), m.clone());
    let prompt_ids = s
        .on_cpu_pool(&ctx.id, move || {
            // Each tool's schema alone first, so that a bad one is named.
            for (field, spec) in t.iter().flat_map(|t| t.parameter_specs()) {
                structured::compile(&mc, &structured::Wanted { spec, field }, &rid)?;
            }
            let c = wanted.map(|w| structured::compile(&mc, &w, &rid)).transpose()?;
            let prepared = match image_parts.is_empty() {
                true => Vec::new(),
                false => images::prepare(&mc.bundle, &image_parts, &st.options.images, &st.image_bytes)?,
            };
            let grids: Vec<(usize, usize)> = prepared.iter().map(|p| p.grid).collect();
            let (ids, spans) = st.encode_chat_tools(&mc, messages, t.as_ref(), &grids)?;
            Ok::<_, ApiError>((ids, images::mm_inputs(prepared, spans), c))
        })
        .await??;
    let (prompt_ids, mm, constraint) = prompt_ids;
    m.metrics.images.fetch_add(mm.len() as u64, std::sync::atomic::Ordering::Relaxed);
    let default_max = default_max(prompt_ids.len());
    let job = Job {
        kind: Kind::Chat,
        id: format!("chatcmpl-{}", ctx.id),
        request_id: ctx.id,
        prompts: vec![Prompt { ids: prompt_ids, mm, echo: None }],
        n: 1,
        stream: req.stream,
        include_usage: req.include_usage(),
        continuous_usage: req.continuous_usage(),
        logprobs: req.logprobs,
        prompt_logprobs: fields.prompt_logprobs.is_some(),
        return_token_ids: fields.return_token_ids,
        tool_names: tools.filter(|t| t.choice != tools::Choice::None).map(|t| t.names()),
        model: lease,
    };
    run(s, job, fields, default_max, constraint, share).await
}

/// What decides, besides the job and its parameters, whether two requests may share a generation or a cached
/// answer, and whether this one uses the cache.
struct Share {
    /// The output constraint asked for (its spec, printed), or `None`.
    constraint: String,
    tenant: Option<u64>,
    /// The API key whose rate limits the request counts against (`None`: no keys; all clients share one).
    payer: Option<u64>,
    /// Serve it from the cache (not with `Cache-Control: no-cache`, `no-store` or `cache: false`).
    lookup: bool,
    /// Store its answer (not with `no-store` or `cache: false`).
    store: bool,
}

impl Share {
    fn new(
        s: &AppState,
        ctx: &RequestCtx,
        headers: &HeaderMap,
        fields: &SamplingFields,
        wanted: Option<&structured::Wanted>,
    ) -> Self {
        let directives: Vec<String> = headers
            .get_all(axum::http::header::CACHE_CONTROL)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(',').map(|d| d.trim().to_ascii_lowercase()))
            .collect();
        let has = |d: &str| directives.iter().any(|x| x == d);
        let on = fields.cache != Some(false);
        Self {
            constraint: format!("{:?}", wanted.map(|w| &w.spec)),
            tenant: if s.options.cache_shared_across_keys { None } else { ctx.tenant },
            payer: ctx.tenant,
            lookup: on && !has("no-cache") && !has("no-store"),
            store: on && !has("no-store"),
        }
    }
}

/// The checks that need no tokenizing, run before it: every parameter, `prompts × n`, the context length
/// and `max_prompt_tokens` against a lower bound of each prompt's token count (`bounds`), the request's
/// completion tokens, and room in the waiting queue. A request that must fail fails here without costing a
/// tokenizer pass over a multi-megabyte prompt.
fn precheck(
    s: &AppState,
    m: &ServedModel,
    fields: &SamplingFields,
    default_max_tokens: impl Fn(usize) -> usize,
    bounds: &[usize],
    prompt_field: &str,
) -> Result<(), ApiError> {
    let cfg = m.engine.config();
    let vocab = m.bundle.model.config().vocab_size;
    let longest = bounds.iter().copied().max().unwrap_or(0);
    let (mut params, _, n) =
        sampling_params(fields.clone(), default_max_tokens(longest), longest, cfg.max_model_len, vocab).map_err(
            |mut e| {
                if e.code.as_deref() == Some("context_length_exceeded") {
                    e.message = format!(
                        "This model's maximum context length is {} tokens, and the prompt alone has at least \
                         {longest} tokens (from its length in bytes) plus the tokens requested for the completion.",
                        cfg.max_model_len
                    );
                }
                e
            },
        )?;
    check_choices(bounds.len(), n)?;
    check_token_limits(
        &s.options,
        Longest::AtLeast(longest),
        prompt_field,
        bounds.len() * n,
        fields,
        &mut params.max_tokens,
    )?;
    if m.engine.queue_full() {
        return Err(ApiError::overloaded("server overloaded: the waiting queue is full"));
    }
    Ok(())
}

/// `server.max_prompt_tokens` against the longest prompt (`Longest::AtLeast`: a lower bound before
/// tokenizing), and `server.max_tokens_per_request` against `choices × max_tokens`; a request that sent no
/// `max_tokens` has its default lowered to fit instead.
fn check_token_limits(
    o: &crate::ServerOptions,
    longest: Longest,
    prompt_field: &str,
    choices: usize,
    fields: &SamplingFields,
    max_tokens: &mut u32,
) -> Result<(), ApiError> {
    let (n, at_least) = match longest {
        Longest::AtLeast(n) => (n, "at least "),
        Longest::Exactly(n) => (n, ""),
    };
    if let Some(limit) = o.max_prompt_tokens.filter(|&l| n > l) {
        return Err(ApiError::bad_request(
            format!(
                "the prompt has {at_least}{n} tokens; this server accepts at most {limit} (server.max_prompt_tokens)"
            ),
            Some(prompt_field),
        )
        .with_code("prompt_too_long"));
    }
    let Some(limit) = o.max_tokens_per_request else { return Ok(()) };
    let share = u32::try_from(limit / choices.max(1)).unwrap_or(u32::MAX);
    if fields.max_tokens.is_none() && share >= 1 {
        *max_tokens = (*max_tokens).min(share);
    }
    let asked = choices.saturating_mul(*max_tokens as usize);
    if asked > limit {
        return Err(ApiError::bad_request(
            format!(
                "{choices} completion(s) × max_tokens = {max_tokens} asks for {asked} tokens; this server allows at \
                 most {limit} per request (server.max_tokens_per_request)"
            ),
            Some(if fields.max_tokens.is_some() { "max_tokens" } else { "n" }),
        )
        .with_code("too_many_tokens"));
    }
    Ok(())
}

/// A prompt length in tokens: a lower bound from its bytes (before tokenizing), or the count.
#[derive(Clone, Copy)]
enum Longest {
    AtLeast(usize),
    Exactly(usize),
}

fn check_choices(prompts: usize, n: usize) -> Result<(), ApiError> {
    if prompts * n > MAX_CHOICES {
        return Err(ApiError::bad_request(
            format!("{prompts} prompts × n = {n} asks for more than {MAX_CHOICES} completions"),
            Some("prompt"),
        ));
    }
    Ok(())
}

/// Submits one engine request per choice, then answers from the merged pieces.
async fn run(
    s: Arc<AppState>,
    mut job: Job,
    fields: SamplingFields,
    default_max_tokens: usize,
    constraint: Option<Arc<Compiled>>,
    share: Share,
) -> Result<Response, ApiError> {
    let m = job.model.model().clone();
    if m.closing() {
        return Err(ApiError::unavailable(format!("the model `{}` is being unloaded", m.name), "model_busy"));
    }
    let cfg = m.engine.config();
    let vocab = m.bundle.model.config().vocab_size;
    let longest = job.prompts.iter().map(|p| p.ids.len()).max().unwrap_or(0);
    let (mut params, priority, n) =
        sampling_params(fields.clone(), default_max_tokens, longest, cfg.max_model_len, vocab)?;
    job.n = n;
    check_choices(job.prompts.len(), n)?;
    let field = if job.kind == Kind::Chat { "messages" } else { "prompt" };
    check_token_limits(
        &s.options,
        Longest::Exactly(longest),
        field,
        job.num_choices(),
        &fields,
        &mut params.max_tokens,
    )?;
    // The key's token budget pays for what this request may use: its prompts and max_tokens per choice.
    let may_use: usize =
        job.prompts.iter().map(|p| p.ids.len()).sum::<usize>() + job.num_choices() * params.max_tokens as usize;
    s.rate_limiter.charge(share.payer.unwrap_or(0), may_use as u64, Instant::now());
    let key = (s.options.coalescing || s.options.response_cache.is_some())
        .then(|| shared::key(&job, &params, &share.constraint, share.tenant))
        .flatten();
    // A finished answer to the same deterministic request: replayed through the writers.
    let cache = s.options.response_cache.clone().zip(key.clone());
    // With the cache on every answer says whether it came from it.
    let x_cache = s.options.response_cache.as_ref().map(|_| "miss");
    if let Some((c, k)) = cache.as_ref().filter(|_| share.lookup) {
        if let Some(pieces) = shared::cached(&s, c.as_ref(), k).await {
            let (tx, rx) = mpsc::channel(pieces.len().max(1));
            for p in pieces {
                let _ = tx.try_send(p);
            }
            drop(tx);
            return respond(s, job, rx, Some("hit")).await;
        }
    }
    // An identical deterministic request in flight: read its generation instead of running another.
    let publisher = match key.as_ref().filter(|_| s.options.coalescing).map(|k| s.coalescer.join(k)) {
        Some(Join::Follower(sub)) => {
            m.metrics.coalesced.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::debug!("joined an identical request's generation");
            return respond(s, job, shared::forward(sub), x_cache).await;
        }
        Some(Join::Leader(publisher, sub)) => Some((publisher, sub)),
        Some(Join::Alone) | None => None,
    };
    let store =
        cache.filter(|_| share.store).map(|(c, k)| shared::Store { cache: c, key: k, choices: job.num_choices() });
    // Bounded: the drivers wait for the HTTP side instead of buffering whole generations.
    let (piece_tx, pieces) = mpsc::channel::<Piece>(64);
    let arrival = Instant::now();
    let mut submitted: Vec<RequestId> = Vec::with_capacity(job.num_choices());
    for index in 0..job.num_choices() {
        let prompt = &job.prompts[index / n];
        let mut p = params.clone();
        // Each choice draws its own stream; with a seed, choice i uses seed + i % n, so the set is
        // reproducible and the same prompt gets the same samples wherever it sits in a batch.
        p.seed = p.seed.map(|seed| seed.wrapping_add((index % n) as u64));
        let id = RequestId(s.next_number());
        let (tx, rx) = mpsc::unbounded_channel();
        let p = Arc::new(p);
        let req = EngineRequest {
            id,
            prompt_token_ids: prompt.ids.clone(),
            params: p.clone(),
            priority,
            deadline: s.options.request_timeout.map(|t| arrival + t),
            constraint: constraint.clone().map(|c| c as Arc<dyn Constraint>),
            mm_inputs: prompt.mm.clone(),
        };
        if let Err(e) = m.engine.add_request(req, tx) {
            for &done in &submitted {
                m.engine.abort(done);
            }
            return Err(add_error(e));
        }
        submitted.push(id);
        m.metrics.prompt_tokens.fetch_add(prompt.ids.len() as u64, std::sync::atomic::Ordering::Relaxed);
        let guard = AbortGuard { engine: m.engine.clone(), id, finished: false };
        let d = Driver {
            model: job.model.clone(),
            index,
            params: p,
            arrival,
            request_id: job.request_id.clone(),
            eog: m.bundle.special_tokens.eog.clone().into(),
            tool_names: job.tool_names.clone(),
        };
        tokio::spawn(d.drive(rx, guard, piece_tx.clone()).in_current_span());
    }
    drop(piece_tx);
    tracing::debug!(prompts = job.prompts.len(), longest, n, stream = job.stream, "submitted");
    let pieces = match (publisher, store) {
        (None, None) => pieces,
        (publisher, store) => shared::tee(s.clone(), pieces, publisher, store),
    };
    respond(s, job, pieces, x_cache).await
}

/// Writes the response from `pieces`: SSE events, or one JSON body; with the response cache on, `x-cache`.
async fn respond(
    s: Arc<AppState>,
    job: Job,
    pieces: mpsc::Receiver<Piece>,
    x_cache: Option<&'static str>,
) -> Result<Response, ApiError> {
    let mut resp = if job.stream { stream_response(s, job, pieces) } else { collect_response(s, job, pieces).await? };
    if let Some(v) = x_cache {
        resp.headers_mut().insert("x-cache", axum::http::HeaderValue::from_static(v));
    }
    Ok(resp)
}

fn add_error(e: AddError) -> ApiError {
    match e {
        AddError::Overloaded(m) => ApiError::overloaded(m),
        AddError::TooLargeForCache { .. } => ApiError::bad_request(e.to_string(), Some("max_tokens")),
        AddError::ContextLengthExceeded { .. } => {
            ApiError::bad_request(e.to_string(), Some("max_tokens")).with_code("context_length_exceeded")
        }
        other => ApiError::bad_request(other.to_string(), None),
    }
}
