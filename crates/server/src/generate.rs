//! `/v1/completions` and `/v1/chat/completions`: validate, submit to the engine, turn engine outputs into
//! text (incremental detokenizer + stop strings) and answer as one JSON body or as SSE chunks.

use crate::error::ApiError;
use crate::json::ApiJson;
use crate::params::sampling_params;
use crate::AppState;
use axum::extract::State;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use mlx_serving_engine::{AddError, EngineHandle, EngineOutput, EngineRequest, FinishReason, RequestId};
use mlx_serving_frontend::stop::StopOutcome;
use mlx_serving_frontend::{IncrementalDetokenizer, StopMatcher};
use mlx_serving_protocol::{ChatCompletionRequest, CompletionRequest, PromptTokensDetails, SamplingFields, Usage};
use serde_json::{json, Value};
use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

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

/// What the output driver yields.
enum Piece {
    Text(String),
    Done { finish_reason: &'static str, usage: Usage },
    Failed(ApiError),
}

#[derive(Clone, Copy)]
enum Kind {
    Completion,
    Chat,
}

struct Job {
    kind: Kind,
    id: String,
    prompt_ids: Vec<u32>,
    stream: bool,
    include_usage: bool,
}

pub async fn completions(
    State(s): State<Arc<AppState>>,
    ApiJson(mut req): ApiJson<CompletionRequest>,
) -> Result<Response, ApiError> {
    s.check_model(&req.model)?;
    let prompt_ids = completion_prompt(&s, &req.prompt)?;
    let fields = req.sampling_fields();
    // OpenAI's completions default is 16 tokens.
    let job = Job {
        kind: Kind::Completion,
        id: format!("cmpl-{}", s.next_id.load(Ordering::Relaxed)),
        prompt_ids,
        stream: req.stream,
        include_usage: req.include_usage(),
    };
    run(s, job, fields, 16).await
}

pub async fn chat_completions(
    State(s): State<Arc<AppState>>,
    ApiJson(mut req): ApiJson<ChatCompletionRequest>,
) -> Result<Response, ApiError> {
    s.check_model(&req.model)?;
    if req.messages.is_empty() {
        return Err(ApiError::bad_request("messages must not be empty", Some("messages")));
    }
    let messages = normalize_messages(&req.messages)?;
    let prompt_ids =
        s.bundle.encode_chat(&messages).map_err(|e| ApiError::bad_request(e.to_string(), Some("messages")))?;
    let max_model_len = s.engine.config().max_model_len;
    let mut fields = req.sampling_fields();
    fields.max_tokens = req.max_completion_tokens.or(fields.max_tokens);
    // Chat's default is the rest of the context, capped so that one request cannot claim the whole KV cache.
    let default_max = max_model_len.saturating_sub(prompt_ids.len()).min(4096);
    let job = Job {
        kind: Kind::Chat,
        id: format!("chatcmpl-{}", s.next_id.load(Ordering::Relaxed)),
        prompt_ids,
        stream: req.stream,
        include_usage: req.include_usage(),
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
            s.bundle.encode_chat(&messages).map_err(|e| ApiError::bad_request(e.to_string(), Some("messages")))?
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

fn completion_prompt(s: &AppState, prompt: &Value) -> Result<Vec<u32>, ApiError> {
    let bad = |m: &str| ApiError::bad_request(m, Some("prompt"));
    let vocab = s.bundle.model.config().vocab_size;
    let ids = match prompt {
        Value::String(t) => s.bundle.encode(t, true).map_err(|e| bad(&e.to_string()))?,
        Value::Array(items) if items.len() == 1 && items[0].is_string() => {
            s.bundle.encode(items[0].as_str().unwrap_or_default(), true).map_err(|e| bad(&e.to_string()))?
        }
        Value::Array(items) if items.iter().all(Value::is_number) => items
            .iter()
            .map(|v| v.as_u64().filter(|&id| (id as usize) < vocab).map(|id| id as u32))
            .collect::<Option<Vec<u32>>>()
            .ok_or_else(|| bad(&format!("token ids must be integers in [0, {vocab})")))?,
        Value::Array(items) if items.len() == 1 && items[0].is_array() => return completion_prompt(s, &items[0]),
        Value::Array(_) => return Err(bad("several prompts in one request are not supported yet; send one prompt")),
        _ => return Err(bad("prompt must be a string, a list of token ids, or a one-element list of either")),
    };
    if ids.is_empty() {
        return Err(bad("prompt is empty"));
    }
    Ok(ids)
}

async fn run(
    s: Arc<AppState>,
    job: Job,
    fields: SamplingFields,
    default_max_tokens: usize,
) -> Result<Response, ApiError> {
    let cfg = s.engine.config();
    let vocab = s.bundle.model.config().vocab_size;
    let (params, priority) =
        sampling_params(fields, default_max_tokens, job.prompt_ids.len(), cfg.max_model_len, vocab)?;
    let stops = params.stop.clone();
    let id = RequestId(s.next_id.fetch_add(1, Ordering::Relaxed));
    let (tx, rx) = mpsc::unbounded_channel();
    let req = EngineRequest {
        id,
        prompt_token_ids: job.prompt_ids.clone(),
        params: Arc::new(params),
        priority,
        deadline: None,
    };
    s.engine.add_request(req, tx).map_err(|e| match e {
        AddError::Overloaded(m) => ApiError::overloaded(m),
        AddError::TooLargeForCache { .. } => ApiError::bad_request(e.to_string(), Some("max_tokens")),
        AddError::ContextLengthExceeded { .. } => {
            ApiError::bad_request(e.to_string(), Some("max_tokens")).with_code("context_length_exceeded")
        }
        other => ApiError::bad_request(other.to_string(), None),
    })?;
    let guard = AbortGuard { engine: s.engine.clone(), id, finished: false };
    // Bounded: the driver waits for the HTTP side instead of buffering a whole generation.
    let (piece_tx, mut pieces) = mpsc::channel::<Piece>(64);
    let bundle = s.bundle.clone();
    let prompt_len = job.prompt_ids.len();
    tokio::spawn(drive(bundle, rx, guard, stops, prompt_len, piece_tx));
    if job.stream {
        return Ok(stream_response(s, job, pieces));
    }
    let mut text = String::new();
    while let Some(p) = pieces.recv().await {
        match p {
            Piece::Text(t) => text.push_str(&t),
            Piece::Failed(e) => return Err(e),
            Piece::Done { finish_reason, usage } => {
                let choice = match job.kind {
                    Kind::Completion => {
                        json!({"index": 0, "text": text, "logprobs": null, "finish_reason": finish_reason})
                    }
                    Kind::Chat => {
                        json!({"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": null, "finish_reason": finish_reason})
                    }
                };
                let object = match job.kind {
                    Kind::Completion => "text_completion",
                    Kind::Chat => "chat.completion",
                };
                let body = json!({"id": job.id, "object": object, "created": s.created, "model": s.model_name, "choices": [choice], "usage": usage});
                return Ok(Json(body).into_response());
            }
        }
    }
    Err(ApiError::internal(&job.id))
}

fn stream_response(s: Arc<AppState>, job: Job, pieces: mpsc::Receiver<Piece>) -> Response {
    let object = match job.kind {
        Kind::Completion => "text_completion",
        Kind::Chat => "chat.completion.chunk",
    };
    let chunk = move |choices: Value, usage: Option<&Usage>| -> Event {
        let mut v =
            json!({"id": job.id, "object": object, "created": s.created, "model": s.model_name, "choices": choices});
        if let Some(u) = usage {
            v["usage"] = json!(u);
        }
        Event::default().data(v.to_string())
    };
    let kind = job.kind;
    let include_usage = job.include_usage;
    let (ev_tx, ev_rx) = mpsc::channel::<Result<Event, Infallible>>(64);
    let mut pieces = pieces;
    // Pieces → SSE events. If the client disconnects the event channel closes, this task ends, the piece
    // channel closes, and the driver's abort guard frees the request in the engine.
    tokio::spawn(async move {
        if let Kind::Chat = kind {
            let first = chunk(
                json!([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}]),
                None,
            );
            if ev_tx.send(Ok(first)).await.is_err() {
                return;
            }
        }
        while let Some(p) = pieces.recv().await {
            let events: Vec<Event> = match p {
                Piece::Text(t) => vec![match kind {
                    Kind::Completion => {
                        chunk(json!([{"index": 0, "text": t, "logprobs": null, "finish_reason": null}]), None)
                    }
                    Kind::Chat => chunk(
                        json!([{"index": 0, "delta": {"content": t}, "logprobs": null, "finish_reason": null}]),
                        None,
                    ),
                }],
                Piece::Done { finish_reason, usage } => {
                    let mut ev = vec![match kind {
                        Kind::Completion => chunk(
                            json!([{"index": 0, "text": "", "logprobs": null, "finish_reason": finish_reason}]),
                            None,
                        ),
                        Kind::Chat => chunk(
                            json!([{"index": 0, "delta": {}, "logprobs": null, "finish_reason": finish_reason}]),
                            None,
                        ),
                    }];
                    if include_usage {
                        ev.push(chunk(json!([]), Some(&usage)));
                    }
                    ev.push(Event::default().data("[DONE]"));
                    ev
                }
                Piece::Failed(e) => vec![Event::default().data(serde_json::to_string(&e.body()).unwrap_or_default())],
            };
            for e in events {
                if ev_tx.send(Ok(e)).await.is_err() {
                    return;
                }
            }
        }
    });
    Sse::new(ReceiverStream::new(ev_rx)).into_response()
}

/// Engine outputs → text pieces. Owns the abort guard: if the HTTP side goes away (the piece channel
/// closes) or a stop string matches, dropping or finishing the guard aborts the engine request.
async fn drive(
    bundle: Arc<mlx_serving_models::ModelBundle>,
    mut rx: mpsc::UnboundedReceiver<EngineOutput>,
    mut guard: AbortGuard,
    stops: Vec<String>,
    prompt_len: usize,
    out: mpsc::Sender<Piece>,
) {
    let mut detok = IncrementalDetokenizer::new(&bundle.tokenizer, true);
    let mut stop = StopMatcher::new(&stops);
    let (mut generated, mut cached) = (0usize, 0usize);
    let usage = |generated: usize, cached: usize| Usage {
        prompt_tokens: prompt_len,
        completion_tokens: generated,
        total_tokens: prompt_len + generated,
        prompt_tokens_details: PromptTokensDetails { cached_tokens: cached },
    };
    while let Some(o) = rx.recv().await {
        if let Some(c) = o.num_cached_tokens {
            cached = c;
        }
        if let Some(err) = &o.error {
            guard.finished = true;
            let e = match o.finish_reason {
                Some(FinishReason::Timeout) => ApiError::bad_request(err.clone(), None).with_code("timeout"),
                _ => ApiError::internal(&format!("{:?}", o.id)),
            };
            let _ = out.send(Piece::Failed(e)).await;
            return;
        }
        for &t in &o.new_token_ids {
            generated += 1;
            let Some(delta) = detok.push(t) else { continue };
            match stop.push(&delta) {
                StopOutcome::Continue(text) => {
                    if !text.is_empty() && out.send(Piece::Text(text)).await.is_err() {
                        return; // client gone: the guard aborts the request
                    }
                }
                StopOutcome::Stopped(text) => {
                    if !text.is_empty() {
                        let _ = out.send(Piece::Text(text)).await;
                    }
                    // The guard (not finished) aborts the engine request on drop.
                    let _ = out.send(Piece::Done { finish_reason: "stop", usage: usage(generated, cached) }).await;
                    return;
                }
            }
        }
        if let Some(reason) = o.finish_reason {
            guard.finished = true;
            let mut finish = match reason {
                FinishReason::Length => "length",
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
            if !rest.is_empty() {
                let _ = out.send(Piece::Text(rest)).await;
            }
            let _ = out.send(Piece::Done { finish_reason: finish, usage: usage(generated, cached) }).await;
            return;
        }
    }
}
