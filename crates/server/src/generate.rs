//! `/v1/completions` and `/v1/chat/completions`: validate, submit one engine request per choice, turn
//! engine outputs into text (incremental detokenizer + stop strings) and answer as one JSON body or as SSE
//! chunks.
//!
//! ```text
//!   handler → n × engine.add_request ─┐
//!   n × drive (detokenize, stop strings, metrics) → pieces channel (bounded) → JSON body | SSE events
//! ```

use crate::error::ApiError;
use crate::json::ApiJson;
use crate::params::sampling_params;
use crate::{AppState, RequestCtx};
use axum::extract::State;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use mlx_serving_engine::{
    AddError, EngineHandle, EngineOutput, EngineRequest, FinishReason, RequestId, SamplingParams, TokenLogprobs,
};
use mlx_serving_frontend::stop::StopOutcome;
use mlx_serving_frontend::{IncrementalDetokenizer, StopMatcher};
use mlx_serving_protocol::{ChatCompletionRequest, CompletionRequest, PromptTokensDetails, SamplingFields, Usage};
use serde_json::{json, Map, Value};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tracing::Instrument;

/// Aborts the request in the engine when dropped before it finished (client gone, stop string hit).
struct AbortGuard {
    engine: EngineHandle,
    id: RequestId,
    finished: bool,
}

impl Drop for AbortGuard {
    fn drop(&mut self) {
        if !self.finished {
            self.engine.abort(self.id);
        }
    }
}

/// What an output driver yields for its choice.
enum Piece {
    /// New text and the tokens (with logprobs, when asked for) consumed since the last piece.
    Text {
        index: usize,
        text: String,
        tokens: Vec<u32>,
        logprobs: Vec<TokenLogprobs>,
    },
    Done {
        index: usize,
        finish_reason: &'static str,
        generated: usize,
        cached: usize,
    },
    Failed(ApiError),
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Completion,
    Chat,
}

/// One HTTP request, as the response writers need it.
struct Job {
    kind: Kind,
    /// The response's `id`.
    id: String,
    request_id: Arc<str>,
    /// One or more prompts (completions accept a batch); choice `i` answers prompt `i / n`.
    prompts: Vec<Prompt>,
    n: usize,
    stream: bool,
    include_usage: bool,
    logprobs: bool,
    return_token_ids: bool,
}

struct Prompt {
    ids: Vec<u32>,
    /// Completions with `echo`: the prompt text, which starts the text of this prompt's choices.
    echo: Option<String>,
}

impl Job {
    fn num_choices(&self) -> usize {
        self.prompts.len() * self.n
    }

    fn echo_of(&self, choice: usize) -> Option<&str> {
        self.prompts[choice / self.n].echo.as_deref()
    }

    /// `prompt_token_ids` for the response: the ids, or a list of them for a batch of prompts.
    fn prompt_token_ids(&self) -> Value {
        match self.prompts.as_slice() {
            [one] => json!(one.ids),
            many => many.iter().map(|p| json!(p.ids)).collect(),
        }
    }
}

/// Most engine requests (prompts × n) one HTTP request may start.
pub const MAX_CHOICES: usize = 64;

pub async fn completions(
    State(s): State<Arc<AppState>>,
    Extension(ctx): Extension<RequestCtx>,
    ApiJson(mut req): ApiJson<CompletionRequest>,
) -> Result<Response, ApiError> {
    s.check_model(&req.model)?;
    let prompts = completion_prompts(&s, &req.prompt, req.echo)?;
    let mut fields = req.sampling_fields();
    fields.logprobs = req.logprobs;
    if req.echo && req.logprobs.is_some() {
        return Err(ApiError::bad_request(
            "echo together with logprobs (prompt logprobs) is not supported yet",
            Some("echo"),
        ));
    }
    let job = Job {
        kind: Kind::Completion,
        id: format!("cmpl-{}", ctx.id),
        request_id: ctx.id,
        prompts,
        n: 1,
        stream: req.stream,
        include_usage: req.include_usage(),
        logprobs: req.logprobs.is_some(),
        return_token_ids: fields.return_token_ids,
    };
    // OpenAI's completions default is 16 tokens.
    run(s, job, fields, 16).await
}

pub async fn chat_completions(
    State(s): State<Arc<AppState>>,
    Extension(ctx): Extension<RequestCtx>,
    ApiJson(mut req): ApiJson<ChatCompletionRequest>,
) -> Result<Response, ApiError> {
    s.check_model(&req.model)?;
    if req.messages.is_empty() {
        return Err(ApiError::bad_request("messages must not be empty", Some("messages")));
    }
    let messages = normalize_messages(&req.messages)?;
    let prompt_ids = s
        .bundle
        .encode_chat(&messages, mlx_serving_models::ChatContent::Text)
        .map_err(|e| ApiError::bad_request(e.to_string(), Some("messages")))?;
    let max_model_len = s.engine.config().max_model_len;
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
    let cfg = s.engine.config();
    let room = max_model_len.min(cfg.num_blocks * cfg.block_size);
    let default_max = room.saturating_sub(prompt_ids.len()).min(4096);
    let job = Job {
        kind: Kind::Chat,
        id: format!("chatcmpl-{}", ctx.id),
        request_id: ctx.id,
        prompts: vec![Prompt { ids: prompt_ids, echo: None }],
        n: 1,
        stream: req.stream,
        include_usage: req.include_usage(),
        logprobs: req.logprobs,
        return_token_ids: fields.return_token_ids,
    };
    run(s, job, fields, default_max).await
}

/// OpenAI messages → the `{role, content: string}` list chat templates expect.
fn normalize_messages(messages_in: &[mlx_serving_protocol::ChatMessage]) -> Result<Vec<Value>, ApiError> {
    let mut messages = Vec::with_capacity(messages_in.len());
    for (i, m) in messages_in.iter().enumerate() {
        if !matches!(m.role.as_str(), "system" | "user" | "assistant") {
            return Err(ApiError::bad_request(
                format!("messages[{i}].role `{}` is not supported (system, user, assistant)", m.role),
                Some("messages"),
            ));
        }
        let content = match &m.content {
            Value::String(t) => t.clone(),
            Value::Array(parts) => {
                let mut text = String::new();
                for p in parts {
                    match (p.get("type").and_then(Value::as_str), p.get("text").and_then(Value::as_str)) {
                        (Some("text"), Some(t)) => text.push_str(t),
                        _ => {
                            return Err(ApiError::bad_request(
                                format!("messages[{i}].content: only text parts are supported"),
                                Some("messages"),
                            ))
                        }
                    }
                }
                text
            }
            Value::Null if m.role == "assistant" => String::new(),
            _ => {
                return Err(ApiError::bad_request(
                    format!("messages[{i}].content must be a string or a list of text parts"),
                    Some("messages"),
                ))
            }
        };
        messages.push(json!({"role": m.role, "content": content}));
    }
    Ok(messages)
}

pub async fn tokenize(
    State(s): State<Arc<AppState>>,
    ApiJson(req): ApiJson<mlx_serving_protocol::TokenizeRequest>,
) -> Result<Response, ApiError> {
    if let Some(m) = &req.model {
        s.check_model(m)?;
    }
    let tokens = match (&req.prompt, &req.messages) {
        (Some(p), None) => s
            .bundle
            .encode(p, req.add_special_tokens.unwrap_or(true))
            .map_err(|e| ApiError::bad_request(e.to_string(), Some("prompt")))?,
        (None, Some(msgs)) => {
            if req.add_generation_prompt == Some(false) {
                return Err(ApiError::bad_request(
                    "add_generation_prompt = false is not supported yet",
                    Some("add_generation_prompt"),
                ));
            }
            let messages = normalize_messages(msgs)?;
            s.bundle
                .encode_chat(&messages, mlx_serving_models::ChatContent::Text)
                .map_err(|e| ApiError::bad_request(e.to_string(), Some("messages")))?
        }
        _ => return Err(ApiError::bad_request("give exactly one of prompt or messages", Some("prompt"))),
    };
    let max_model_len = s.engine.config().max_model_len;
    Ok(Json(json!({"count": tokens.len(), "max_model_len": max_model_len, "tokens": tokens})).into_response())
}

pub async fn detokenize(
    State(s): State<Arc<AppState>>,
    ApiJson(req): ApiJson<mlx_serving_protocol::DetokenizeRequest>,
) -> Result<Response, ApiError> {
    if let Some(m) = &req.model {
        s.check_model(m)?;
    }
    let vocab = s.bundle.model.config().vocab_size;
    let ids = req
        .tokens
        .iter()
        .map(|&t| u32::try_from(t).ok().filter(|&id| (id as usize) < vocab))
        .collect::<Option<Vec<u32>>>()
        .ok_or_else(|| ApiError::bad_request(format!("tokens must be integers in [0, {vocab})"), Some("tokens")))?;
    let text =
        s.bundle.tokenizer.decode(&ids, false).map_err(|e| ApiError::bad_request(e.to_string(), Some("tokens")))?;
    Ok(Json(json!({"prompt": text})).into_response())
}

/// `prompt` as OpenAI allows it: a string, a list of strings, a list of token ids, or a list of token-id
/// lists. With `echo`, each prompt keeps its text (given, or decoded from its ids).
fn completion_prompts(s: &AppState, prompt: &Value, echo: bool) -> Result<Vec<Prompt>, ApiError> {
    let bad = |m: &str| ApiError::bad_request(m, Some("prompt"));
    let vocab = s.bundle.model.config().vocab_size;
    let from_text = |t: &str| -> Result<Prompt, ApiError> {
        let ids = s.bundle.encode(t, true).map_err(|e| bad(&e.to_string()))?;
        Ok(Prompt { ids, echo: echo.then(|| t.to_string()) })
    };
    let from_ids = |items: &[Value]| -> Result<Prompt, ApiError> {
        let ids = items
            .iter()
            .map(|v| v.as_u64().filter(|&id| (id as usize) < vocab).map(|id| id as u32))
            .collect::<Option<Vec<u32>>>()
            .ok_or_else(|| bad(&format!("token ids must be integers in [0, {vocab})")))?;
        let echo = match echo {
            true => Some(s.bundle.tokenizer.decode(&ids, false).map_err(|e| bad(&e.to_string()))?),
            false => None,
        };
        Ok(Prompt { ids, echo })
    };
    let shape = "prompt must be a string, a list of strings, a list of token ids, or a list of token-id lists";
    // Refuse an oversized batch before tokenizing any of it.
    if let Value::Array(items) = prompt {
        if items.len() > MAX_CHOICES && !items.iter().all(Value::is_number) {
            return Err(bad(&format!("at most {MAX_CHOICES} prompts per request, got {}", items.len())));
        }
    }
    let prompts = match prompt {
        Value::String(t) => vec![from_text(t)?],
        Value::Array(items) if !items.is_empty() && items.iter().all(Value::is_number) => vec![from_ids(items)?],
        Value::Array(items) if !items.is_empty() => items
            .iter()
            .map(|item| match item {
                Value::String(t) => from_text(t),
                Value::Array(ids) if ids.iter().all(Value::is_number) => from_ids(ids),
                _ => Err(bad(shape)),
            })
            .collect::<Result<Vec<_>, _>>()?,
        _ => return Err(bad(shape)),
    };
    if prompts.iter().any(|p| p.ids.is_empty()) {
        return Err(bad("prompt is empty"));
    }
    Ok(prompts)
}

/// Submits one engine request per choice, then answers from the merged pieces.
async fn run(
    s: Arc<AppState>,
    mut job: Job,
    fields: SamplingFields,
    default_max_tokens: usize,
) -> Result<Response, ApiError> {
    let cfg = s.engine.config();
    let vocab = s.bundle.model.config().vocab_size;
    let longest = job.prompts.iter().map(|p| p.ids.len()).max().unwrap_or(0);
    let (params, priority, n) = sampling_params(fields, default_max_tokens, longest, cfg.max_model_len, vocab)?;
    job.n = n;
    if job.num_choices() > MAX_CHOICES {
        return Err(ApiError::bad_request(
            format!("{} prompts × n = {n} asks for more than {MAX_CHOICES} completions", job.prompts.len()),
            Some("prompt"),
        ));
    }
    // Bounded: the drivers wait for the HTTP side instead of buffering whole generations.
    let (piece_tx, pieces) = mpsc::channel::<Piece>(64);
    let arrival = Instant::now();
    let mut submitted: Vec<RequestId> = Vec::with_capacity(job.num_choices());
    for index in 0..job.num_choices() {
        let prompt_ids = &job.prompts[index / n].ids;
        let mut p = params.clone();
        // Each choice draws its own stream; with a seed, choice i uses seed + i % n, so the set is
        // reproducible and the same prompt gets the same samples wherever it sits in a batch.
        p.seed = p.seed.map(|seed| seed.wrapping_add((index % n) as u64));
        let id = RequestId(s.next_number());
        let (tx, rx) = mpsc::unbounded_channel();
        let p = Arc::new(p);
        let req = EngineRequest {
            id,
            prompt_token_ids: prompt_ids.clone(),
            params: p.clone(),
            priority,
            deadline: s.options.request_timeout.map(|t| arrival + t),
        };
        if let Err(e) = s.engine.add_request(req, tx) {
            for &done in &submitted {
                s.engine.abort(done);
            }
            return Err(add_error(e));
        }
        submitted.push(id);
        s.metrics.prompt_tokens.fetch_add(prompt_ids.len() as u64, std::sync::atomic::Ordering::Relaxed);
        let guard = AbortGuard { engine: s.engine.clone(), id, finished: false };
        let d = Driver {
            s: s.clone(),
            index,
            params: p,
            arrival,
            request_id: job.request_id.clone(),
            eog: s.bundle.special_tokens.eog.clone().into(),
        };
        tokio::spawn(d.drive(rx, guard, piece_tx.clone()).in_current_span());
    }
    drop(piece_tx);
    tracing::debug!(prompts = job.prompts.len(), longest, n, stream = job.stream, "submitted");
    if job.stream {
        return Ok(stream_response(s, job, pieces));
    }
    collect_response(s, job, pieces).await
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

/// Per-choice state of a response being assembled or streamed.
#[derive(Default)]
struct ChoiceAcc {
    text: String,
    tokens: Vec<u32>,
    logprobs: Vec<TokenLogprobs>,
    /// Completions' `text_offset` position of the next token.
    offset: usize,
    finish_reason: Option<&'static str>,
    generated: usize,
    cached: usize,
}

/// Prompt tokens count once per prompt (not per choice); cached tokens are those of each prompt's first choice.
fn usage(job: &Job, choices: &[ChoiceAcc]) -> Usage {
    let prompt_tokens = job.prompts.iter().map(|p| p.ids.len()).sum();
    let completion_tokens = choices.iter().map(|c| c.generated).sum();
    let cached_tokens = choices.iter().step_by(job.n).map(|c| c.cached).sum();
    Usage {
        prompt_tokens,
        completion_tokens,
        total_tokens: prompt_tokens + completion_tokens,
        prompt_tokens_details: PromptTokensDetails { cached_tokens },
    }
}

fn object_name(kind: Kind, stream: bool) -> &'static str {
    match (kind, stream) {
        (Kind::Completion, _) => "text_completion",
        (Kind::Chat, false) => "chat.completion",
        (Kind::Chat, true) => "chat.completion.chunk",
    }
}

async fn collect_response(s: Arc<AppState>, job: Job, mut pieces: mpsc::Receiver<Piece>) -> Result<Response, ApiError> {
    let mut acc: Vec<ChoiceAcc> = (0..job.num_choices()).map(|_| ChoiceAcc::default()).collect();
    let mut open = acc.len();
    while open > 0 {
        match pieces.recv().await {
            Some(Piece::Text { index, text, tokens, logprobs }) => {
                let c = &mut acc[index];
                c.text.push_str(&text);
                c.tokens.extend(tokens);
                c.logprobs.extend(logprobs);
            }
            Some(Piece::Done { index, finish_reason, generated, cached }) => {
                let c = &mut acc[index];
                (c.finish_reason, c.generated, c.cached) = (Some(finish_reason), generated, cached);
                open -= 1;
            }
            Some(Piece::Failed(e)) => return Err(e),
            None => return Err(ApiError::internal(&job.request_id)),
        }
    }
    let choices: Vec<Value> = acc
        .iter_mut()
        .enumerate()
        .map(|(index, c)| {
            let echo = job.echo_of(index).unwrap_or("");
            let logprobs = job.logprobs.then(|| logprobs_json(&s, job.kind, &c.logprobs, &mut c.offset, echo.len()));
            let mut v = match job.kind {
                Kind::Completion => {
                    let text = format!("{echo}{}", c.text);
                    json!({"index": index, "text": text, "logprobs": logprobs, "finish_reason": c.finish_reason})
                }
                Kind::Chat => json!({
                    "index": index,
                    "message": {"role": "assistant", "content": c.text},
                    "logprobs": logprobs,
                    "finish_reason": c.finish_reason,
                }),
            };
            if job.return_token_ids {
                v["token_ids"] = json!(c.tokens);
            }
            v
        })
        .collect();
    let mut body = json!({
        "id": job.id,
        "object": object_name(job.kind, false),
        "created": s.created,
        "model": s.model_name,
        "choices": choices,
        "usage": usage(&job, &acc),
    });
    if job.return_token_ids {
        body["prompt_token_ids"] = job.prompt_token_ids();
    }
    Ok(Json(body).into_response())
}

/// A token as text, for logprobs: its own decoding, special tokens included.
fn token_text(s: &AppState, id: u32) -> String {
    s.bundle.tokenizer.decode(&[id], false).unwrap_or_default()
}

/// JSON cannot hold -inf; report what vLLM reports for impossible tokens.
fn finite(lp: f32) -> f32 {
    if lp.is_finite() {
        lp
    } else {
        -9999.0
    }
}

/// The `logprobs` object of a choice (or chunk) for `lps`: chat's `{"content": [...]}` or completions'
/// `{"tokens", "token_logprobs", "top_logprobs", "text_offset"}`. `offset` carries completions' text
/// offsets across chunks; `base` is where the generated text starts (after an echoed prompt).
fn logprobs_json(s: &AppState, kind: Kind, lps: &[TokenLogprobs], offset: &mut usize, base: usize) -> Value {
    match kind {
        Kind::Chat => {
            let entry = |id: u32, lp: f32| {
                let t = token_text(s, id);
                json!({"token": t, "logprob": finite(lp), "bytes": t.as_bytes()})
            };
            let content: Vec<Value> = lps
                .iter()
                .map(|l| {
                    let mut e = entry(l.token, l.logprob);
                    e["top_logprobs"] = l.top.iter().map(|&(id, lp)| entry(id, lp)).collect();
                    e
                })
                .collect();
            json!({"content": content})
        }
        Kind::Completion => {
            let (mut tokens, mut token_logprobs, mut top, mut offsets) = (vec![], vec![], vec![], vec![]);
            for l in lps {
                let t = token_text(s, l.token);
                offsets.push(base + *offset);
                *offset += t.len();
                token_logprobs.push(finite(l.logprob));
                // As in vLLM, each step's alternatives include the chosen token.
                let mut alts = Map::new();
                for &(id, lp) in &l.top {
                    alts.insert(token_text(s, id), json!(finite(lp)));
                }
                alts.insert(t.clone(), json!(finite(l.logprob)));
                top.push(Value::Object(alts));
                tokens.push(t);
            }
            json!({"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets})
        }
    }
}

fn stream_response(s: Arc<AppState>, job: Job, mut pieces: mpsc::Receiver<Piece>) -> Response {
    let (ev_tx, ev_rx) = mpsc::channel::<Result<Event, Infallible>>(64);
    // Pieces → SSE events. If the client disconnects the event channel closes, this task ends, the piece
    // channel closes, and every driver's abort guard frees its request in the engine.
    let task = async move {
        let mut first = true;
        let mut chunk = |choices: Value, usage: Option<Usage>| -> Event {
            let mut v = json!({
                "id": job.id,
                "object": object_name(job.kind, true),
                "created": s.created,
                "model": s.model_name,
                "choices": choices,
            });
            if let Some(u) = usage {
                v["usage"] = json!(u);
            }
            if std::mem::take(&mut first) && job.return_token_ids {
                v["prompt_token_ids"] = job.prompt_token_ids();
            }
            Event::default().data(v.to_string())
        };
        let mut acc: Vec<ChoiceAcc> = (0..job.num_choices()).map(|_| ChoiceAcc::default()).collect();
        let mut opening = Vec::new();
        for index in 0..acc.len() {
            match (job.kind, job.echo_of(index)) {
                (Kind::Chat, _) => opening.push(chunk(
                    json!([{"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}]),
                    None,
                )),
                (Kind::Completion, Some(prompt)) => opening.push(chunk(
                    json!([{"index": index, "text": prompt, "logprobs": null, "finish_reason": null}]),
                    None,
                )),
                (Kind::Completion, None) => {}
            }
        }
        for e in opening {
            if ev_tx.send(Ok(e)).await.is_err() {
                return;
            }
        }
        let mut open = acc.len();
        while open > 0 {
            let events: Vec<Event> = match pieces.recv().await {
                Some(Piece::Text { index, text, tokens, logprobs }) => {
                    if text.is_empty() && !job.logprobs && !job.return_token_ids {
                        continue;
                    }
                    let c = &mut acc[index];
                    let lp = if job.logprobs {
                        logprobs_json(&s, job.kind, &logprobs, &mut c.offset, job.echo_of(index).map_or(0, str::len))
                    } else {
                        Value::Null
                    };
                    let mut choice = match job.kind {
                        Kind::Completion => {
                            json!({"index": index, "text": text, "logprobs": lp, "finish_reason": null})
                        }
                        Kind::Chat => {
                            json!({"index": index, "delta": {"content": text}, "logprobs": lp, "finish_reason": null})
                        }
                    };
                    if job.return_token_ids {
                        choice["token_ids"] = json!(tokens);
                    }
                    vec![chunk(json!([choice]), None)]
                }
                Some(Piece::Done { index, finish_reason, generated, cached }) => {
                    let c = &mut acc[index];
                    (c.finish_reason, c.generated, c.cached) = (Some(finish_reason), generated, cached);
                    open -= 1;
                    let choice = match job.kind {
                        Kind::Completion => {
                            json!({"index": index, "text": "", "logprobs": null, "finish_reason": finish_reason})
                        }
                        Kind::Chat => {
                            json!({"index": index, "delta": {}, "logprobs": null, "finish_reason": finish_reason})
                        }
                    };
                    let mut ev = vec![chunk(json!([choice]), None)];
                    if open == 0 {
                        if job.include_usage {
                            ev.push(chunk(json!([]), Some(usage(&job, &acc))));
                        }
                        ev.push(Event::default().data("[DONE]"));
                    }
                    ev
                }
                // An error after the stream began: one error event, then the stream ends.
                Some(Piece::Failed(e)) => {
                    let _ = ev_tx.send(Ok(Event::default().data(json!(e.body()).to_string()))).await;
                    return;
                }
                None => {
                    let e = ApiError::internal(&job.request_id);
                    let _ = ev_tx.send(Ok(Event::default().data(json!(e.body()).to_string()))).await;
                    return;
                }
            };
            for e in events {
                if ev_tx.send(Ok(e)).await.is_err() {
                    return;
                }
            }
        }
    };
    tokio::spawn(task.in_current_span());
    Sse::new(ReceiverStream::new(ev_rx)).into_response()
}

/// Turns one choice's engine outputs into pieces, and records its metrics.
struct Driver {
    s: Arc<AppState>,
    index: usize,
    params: Arc<SamplingParams>,
    arrival: Instant,
    request_id: Arc<str>,
    /// The model's end-of-generation ids.
    eog: Arc<[u32]>,
}

/// Tokens (and their logprobs) consumed since the last piece was sent.
#[derive(Default)]
struct Pending {
    tokens: Vec<u32>,
    logprobs: Vec<TokenLogprobs>,
}

impl Driver {
    /// Sends `text` with the pending tokens; false when the HTTP side has gone away.
    async fn send(&self, out: &mpsc::Sender<Piece>, text: String, p: &mut Pending) -> bool {
        let piece = Piece::Text {
            index: self.index,
            text,
            tokens: std::mem::take(&mut p.tokens),
            logprobs: std::mem::take(&mut p.logprobs),
        };
        out.send(piece).await.is_ok()
    }

    async fn done(&self, out: &mpsc::Sender<Piece>, reason: &'static str, generated: usize, cached: usize) {
        self.s.metrics.finished(reason);
        self.s.metrics.e2e.observe(self.arrival.elapsed());
        tracing::info!(choice = self.index, finish_reason = reason, generated, cached, "finished");
        let _ = out.send(Piece::Done { index: self.index, finish_reason: reason, generated, cached }).await;
    }

    /// Owns the abort guard: if the HTTP side goes away (the piece channel closes) or a stop string
    /// matches, dropping the unfinished guard aborts the engine request.
    async fn drive(
        self,
        mut rx: mpsc::UnboundedReceiver<EngineOutput>,
        mut guard: AbortGuard,
        out: mpsc::Sender<Piece>,
    ) {
        let m = &self.s.metrics;
        let mut detok = IncrementalDetokenizer::new(&self.s.bundle.tokenizer, true);
        let mut stop = StopMatcher::new(&self.params.stop);
        let min_tokens = self.params.min_tokens as usize;
        let (mut generated, mut cached) = (0usize, 0usize);
        let mut pending = Pending::default();
        let mut last = self.arrival;
        while let Some(o) = rx.recv().await {
            if let Some(c) = o.num_cached_tokens {
                cached = c;
            }
            if let Some(err) = &o.error {
                guard.finished = true;
                m.failed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let e = match o.finish_reason {
                    Some(FinishReason::Timeout) => ApiError::timeout(err),
                    _ => {
                        tracing::error!(error = %err, "request failed in the engine");
                        ApiError::internal(&self.request_id)
                    }
                };
                let _ = out.send(Piece::Failed(e)).await;
                return;
            }
            if !o.new_token_ids.is_empty() {
                let now = Instant::now();
                if generated == 0 {
                    m.ttft.observe(now - self.arrival);
                } else {
                    m.itl.observe(now - last);
                }
                last = now;
                m.generation_tokens.fetch_add(o.new_token_ids.len() as u64, std::sync::atomic::Ordering::Relaxed);
            }
            for (j, &t) in o.new_token_ids.iter().enumerate() {
                generated += 1;
                pending.tokens.push(t);
                // The end-of-generation token that finishes a choice has no text; like OpenAI, logprobs
                // leave it out (token_ids keep it, as vLLM's do).
                let ends = o.finish_reason.is_some() && j + 1 == o.new_token_ids.len() && self.eog.contains(&t);
                if let Some(lp) = o.logprobs.get(j).filter(|_| !ends) {
                    pending.logprobs.push(lp.clone());
                }
                let Some(delta) = detok.push(t) else { continue };
                // As in vLLM, a stop string must end at or after the `min_tokens`-th token; one that starts
                // before it still counts.
                let outcome = if generated < min_tokens {
                    StopOutcome::Continue(stop.push_unarmed(&delta))
                } else {
                    stop.push(&delta)
                };
                match outcome {
                    StopOutcome::Continue(text) => {
                        if (!text.is_empty() || !pending.tokens.is_empty())
                            && !self.send(&out, text, &mut pending).await
                        {
                            m.finished("abort");
                            return; // client gone: the guard aborts the request
                        }
                    }
                    StopOutcome::Stopped(text) => {
                        self.send(&out, text, &mut pending).await;
                        // The guard (not finished) aborts the engine request on drop.
                        self.done(&out, "stop", generated, cached).await;
                        return;
                    }
                }
            }
            if let Some(reason) = o.finish_reason {
                guard.finished = true;
                let mut finish = match reason {
                    FinishReason::Length => "length",
                    FinishReason::Abort => "abort",
                    _ => "stop",
                };
                let tail = detok.flush().unwrap_or_default();
                let rest = match stop.push(&tail) {
                    StopOutcome::Continue(t) => t + &stop.flush(),
                    StopOutcome::Stopped(t) => {
                        finish = "stop";
                        t
                    }
                };
                if !rest.is_empty() || !pending.tokens.is_empty() {
                    self.send(&out, rest, &mut pending).await;
                }
                self.done(&out, finish, generated, cached).await;
                return;
            }
        }
    }
}
