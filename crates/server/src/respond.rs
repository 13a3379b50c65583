//! Writing a response from the pieces of its choices: one JSON body, or SSE chunks (with keep-alive comments
//! while nothing is due); usage; logprobs in chat's and completions' shapes.

use crate::driver::Piece;
use crate::error::ApiError;
use crate::models::{ModelLease, ServedModel};
use crate::AppState;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use mlx_serving_engine::TokenLogprobs;
use mlx_serving_frontend::ToolEvent;
use mlx_serving_protocol::{PromptTokensDetails, Usage};
use serde_json::{json, Map, Value};
use std::convert::Infallible;
use std::sync::Arc;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tracing::Instrument;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    Completion,
    Chat,
}

/// One HTTP request, as the response writers need it.
pub(crate) struct Job {
    pub kind: Kind,
    /// The response's `id`.
    pub id: String,
    pub request_id: Arc<str>,
    /// One or more prompts (completions accept a batch); choice `i` answers prompt `i / n`.
    pub prompts: Vec<Prompt>,
    pub n: usize,
    pub stream: bool,
    pub include_usage: bool,
    /// Usage so far on every streamed chunk (`stream_options.continuous_usage_stats`).
    pub continuous_usage: bool,
    pub logprobs: bool,
    /// vLLM's `prompt_logprobs` was asked for: the prompt's logprobs in its shape (completions: per choice;
    /// chat: on the response).
    pub prompt_logprobs: bool,
    pub return_token_ids: bool,
    /// Chat with tools: their names (the output is parsed for calls).
    pub tool_names: Option<Vec<String>>,
    /// The model, held until the response is written.
    pub model: Arc<ModelLease>,
}

pub(crate) struct Prompt {
    pub ids: Vec<u32>,
    /// Images in the prompt (their spans, content hashes and pixels).
    pub mm: Vec<mlx_serving_engine::MmInput>,
    /// Completions with `echo`: the prompt text, which starts the text of this prompt's choices.
    pub echo: Option<String>,
}

impl Job {
    pub fn num_choices(&self) -> usize {
        self.prompts.len() * self.n
    }

    fn echo_of(&self, choice: usize) -> Option<&str> {
        self.prompts[choice / self.n].echo.as_deref()
    }

    /// Completions with `echo` and `logprobs`: the prompt's tokens lead the choice's logprobs.
    fn echo_logprobs(&self, choice: usize) -> bool {
        self.logprobs && self.echo_of(choice).is_some()
    }

    /// Whether the choice's first text waits for its prompt logprobs (which come with its first token).
    fn awaits_prompt(&self, choice: usize) -> bool {
        self.echo_logprobs(choice) || self.prompt_logprobs
    }

    /// `prompt_token_ids` for the response: the ids, or a list of them for a batch of prompts.
    fn prompt_token_ids(&self) -> Value {
        match self.prompts.as_slice() {
            [one] => json!(one.ids),
            many => many.iter().map(|p| json!(p.ids)).collect(),
        }
    }
}

/// Per-choice state of a response being assembled or streamed.
#[derive(Default)]
struct ChoiceAcc {
    text: String,
    tokens: Vec<u32>,
    logprobs: Vec<TokenLogprobs>,
    /// The prompt's logprobs, when asked for (one per prompt token after the first).
    prompt: Vec<TokenLogprobs>,
    /// Characters of generated text so far, counted by their first bytes (completions' `text_offset`).
    chars: usize,
    finish_reason: Option<&'static str>,
    generated: usize,
    /// Tokens streamed so far (the running usage).
    streamed: usize,
    cached: usize,
    /// Tool calls so far: id, function name, arguments.
    calls: Vec<(String, String, String)>,
}

impl ChoiceAcc {
    /// Takes a piece's tool-call events; returns each as the OpenAI delta that announces it (`id`, `type`
    /// and the name first, then pieces of `arguments`).
    fn take_calls(&mut self, s: &AppState, events: Vec<ToolEvent>) -> Vec<Value> {
        events
            .into_iter()
            .filter_map(|e| match e {
                ToolEvent::Start { index, name } => {
                    let id = format!("call_{}", s.new_request_id());
                    let d = json!({"index": index, "id": id, "type": "function", "function": {"name": name, "arguments": ""}});
                    self.calls.push((id, name, String::new()));
                    Some(d)
                }
                ToolEvent::Args { index, delta } => {
                    self.calls.get_mut(index)?.2.push_str(&delta);
                    Some(json!({"index": index, "function": {"arguments": delta}}))
                }
                ToolEvent::Text(_) => None,
            })
            .collect()
    }

    /// `message.tool_calls` of a whole response.
    fn tool_calls_json(&self) -> Value {
        self.calls
            .iter()
            .map(
                |(id, name, args)| json!({"id": id, "type": "function", "function": {"name": name, "arguments": args}}),
            )
            .collect()
    }
}

/// Prompt tokens count once per prompt (not per choice); cached tokens are those of each prompt's first choice.
fn usage(job: &Job, choices: &[ChoiceAcc]) -> Usage {
    usage_with(job, choices, choices.iter().map(|c| c.generated).sum())
}

/// The usage while streaming: the tokens streamed so far.
fn running_usage(job: &Job, choices: &[ChoiceAcc]) -> Usage {
    usage_with(job, choices, choices.iter().map(|c| c.streamed).sum())
}

fn usage_with(job: &Job, choices: &[ChoiceAcc], completion_tokens: usize) -> Usage {
    let prompt_tokens = job.prompts.iter().map(|p| p.ids.len()).sum();
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

pub(crate) async fn collect_response(
    s: Arc<AppState>,
    job: Job,
    mut pieces: mpsc::Receiver<Piece>,
) -> Result<Response, ApiError> {
    let mut acc: Vec<ChoiceAcc> = (0..job.num_choices()).map(|_| ChoiceAcc::default()).collect();
    let mut open = acc.len();
    while open > 0 {
        match pieces.recv().await {
            Some(Piece::Text { index, text, tokens, logprobs, calls }) => {
                let c = &mut acc[index];
                c.text.push_str(&text);
                c.tokens.extend(tokens);
                c.logprobs.extend(logprobs);
                c.take_calls(&s, calls);
            }
            Some(Piece::Prompt { index, logprobs }) => acc[index].prompt = logprobs,
            Some(Piece::Done { index, finish_reason, generated, cached }) => {
                let c = &mut acc[index];
                (c.finish_reason, c.generated, c.cached) = (Some(finish_reason), generated, cached);
                open -= 1;
            }
            Some(Piece::Failed(e)) => return Err(e),
            None => return Err(ApiError::internal(&job.request_id)),
        }
    }
    // With logprobs the body decodes up to 21 tokens per generated token: build it off the async threads.
    if job.logprobs || job.prompt_logprobs {
        let (st, request_id) = (s.clone(), job.request_id.clone());
        s.on_cpu_pool(&request_id, move || response_body(&st, &job, acc)).await.map(|b| Json(b).into_response())
    } else {
        Ok(Json(response_body(&s, &job, acc)).into_response())
    }
}

fn response_body(s: &AppState, job: &Job, mut acc: Vec<ChoiceAcc>) -> Value {
    let choices: Vec<Value> = acc
        .iter_mut()
        .enumerate()
        .map(|(index, c)| {
            let echo = job.echo_of(index).unwrap_or("");
            let model = job.model.model();
            let logprobs = job.logprobs.then(|| {
                let generated = logprobs_json(model, job.kind, &c.logprobs, &mut c.chars, echo.chars().count());
                match job.echo_logprobs(index) {
                    true => echo_logprobs_json(model, &job.prompts[index / job.n].ids, &c.prompt, generated),
                    false => generated,
                }
            });
            let mut v = match job.kind {
                Kind::Completion => {
                    let text = format!("{echo}{}", c.text);
                    json!({"index": index, "text": text, "logprobs": logprobs, "finish_reason": c.finish_reason})
                }
                Kind::Chat if !c.calls.is_empty() => json!({
                    "index": index,
                    "message": {
                        "role": "assistant",
                        "content": if c.text.is_empty() { Value::Null } else { json!(c.text) },
                        "tool_calls": c.tool_calls_json(),
                    },
                    "logprobs": logprobs,
                    "finish_reason": c.finish_reason,
                }),
                Kind::Chat => json!({
                    "index": index,
                    "message": {"role": "assistant", "content": c.text},
                    "logprobs": logprobs,
                    "finish_reason": c.finish_reason,
                }),
            };
            if job.return_token_ids {
                v["token_ids"] = json!(c.tokens);
                if job.kind == Kind::Completion {
                    // vLLM's per-choice field (with a batch of prompts, each choice's own).
                    v["prompt_token_ids"] = json!(job.prompts[index / job.n].ids);
                }
            }
            if job.prompt_logprobs && job.kind == Kind::Completion {
                v["prompt_logprobs"] = vllm_prompt_logprobs(model, &c.prompt);
            }
            v
        })
        .collect();
    let mut body = json!({
        "id": job.id,
        "object": object_name(job.kind, false),
        "created": s.created,
        "model": job.model.model().name,
        "choices": choices,
        "usage": usage(job, &acc),
    });
    if job.return_token_ids {
        body["prompt_token_ids"] = job.prompt_token_ids();
    }
    if job.prompt_logprobs && job.kind == Kind::Chat {
        body["prompt_logprobs"] =
            acc.first().map_or(Value::Null, |c| vllm_prompt_logprobs(job.model.model(), &c.prompt));
    }
    body
}

/// Completions' `logprobs` with the prompt's tokens first (`echo`): the first prompt token has no logprob
/// (`null`, as OpenAI writes it), each later one its logprob given the tokens before it and its alternatives;
/// then `generated`'s entries. Prompt offsets count the prompt tokens' characters from 0.
fn echo_logprobs_json(s: &ServedModel, ids: &[u32], prompt: &[TokenLogprobs], generated: Value) -> Value {
    let (mut tokens, mut token_logprobs, mut top, mut offsets) = (vec![], vec![], vec![], vec![]);
    let mut chars = 0usize;
    for (i, &id) in ids.iter().enumerate() {
        let b = s.bundle.token_bytes.get(id);
        let continues = b.first().is_some_and(|&x| is_continuation(x));
        offsets.push(json!(chars - usize::from(continues && chars > 0)));
        chars += b.iter().filter(|&&x| !is_continuation(x)).count();
        tokens.push(json!(token_text(s, id)));
        match i.checked_sub(1).and_then(|j| prompt.get(j)) {
            Some(l) => {
                token_logprobs.push(json!(finite(l.logprob)));
                let mut alts = Map::new();
                for &(alt, lp) in &l.top {
                    alts.insert(token_text(s, alt), json!(finite(lp)));
                }
                alts.insert(token_text(s, l.token), json!(finite(l.logprob)));
                top.push(Value::Object(alts));
            }
            None => {
                token_logprobs.push(Value::Null);
                top.push(Value::Null);
            }
        }
    }
    let extend = |list: &mut Vec<Value>, key: &str| {
        if let Some(Value::Array(more)) = generated.get(key) {
            list.extend(more.iter().cloned());
        }
    };
    extend(&mut tokens, "tokens");
    extend(&mut token_logprobs, "token_logprobs");
    extend(&mut top, "top_logprobs");
    extend(&mut offsets, "text_offset");
    json!({"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets})
}

/// vLLM's `prompt_logprobs`: `null` for the first prompt token, then per token `{"<id>": {"logprob", "rank",
/// "decoded_token"}}` for the token itself and its alternatives.
fn vllm_prompt_logprobs(s: &ServedModel, prompt: &[TokenLogprobs]) -> Value {
    let entry =
        |lp: f32, rank: u32, id: u32| json!({"logprob": finite(lp), "rank": rank, "decoded_token": token_text(s, id)});
    std::iter::once(Value::Null)
        .chain(prompt.iter().map(|l| {
            let mut m = Map::new();
            for (r, &(id, lp)) in l.top.iter().enumerate() {
                m.insert(id.to_string(), entry(lp, r as u32 + 1, id));
            }
            m.insert(l.token.to_string(), entry(l.logprob, l.rank, l.token));
            Value::Object(m)
        }))
        .collect()
}

/// A token as text, for logprobs: its own decoding, special tokens included.
fn token_text(s: &ServedModel, id: u32) -> String {
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
/// `{"tokens", "token_logprobs", "top_logprobs", "text_offset"}`.
///
/// Chat's `bytes` are each token's own bytes, so joining them gives the content's UTF-8 even where a token
/// holds part of a character. Completions' `text_offset` counts characters (as OpenAI and vLLM do): a
/// token's offset is the index of the character holding its first byte. `chars` carries the count of
/// generated characters across chunks; `base` is the echoed prompt's length in characters.
fn logprobs_json(s: &ServedModel, kind: Kind, lps: &[TokenLogprobs], chars: &mut usize, base: usize) -> Value {
    let bytes = |id: u32| s.bundle.token_bytes.get(id);
    match kind {
        Kind::Chat => {
            let entry =
                |id: u32, lp: f32| json!({"token": token_text(s, id), "logprob": finite(lp), "bytes": bytes(id)});
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
                let b = bytes(l.token);
                // A token that starts inside a character belongs at that character, counted already.
                let continues = b.first().is_some_and(|&x| is_continuation(x));
                offsets.push(base + *chars - usize::from(continues && *chars > 0));
                *chars += b.iter().filter(|&&x| !is_continuation(x)).count();
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

/// A streamed choice's first chunk when it waits for its prompt's logprobs: the echo with them (completions),
/// and vLLM's `prompt_logprobs` when asked for.
fn prompt_choice(job: &Job, index: usize, logprobs: &[TokenLogprobs]) -> Value {
    let model = job.model.model();
    let mut choice = match job.kind {
        Kind::Completion => {
            let lp = match job.echo_logprobs(index) {
                true => echo_logprobs_json(model, &job.prompts[index / job.n].ids, logprobs, json!({})),
                false => Value::Null,
            };
            let text = job.echo_of(index).unwrap_or("");
            json!({"index": index, "text": text, "logprobs": lp, "finish_reason": null})
        }
        Kind::Chat => json!({"index": index, "delta": {}, "logprobs": null, "finish_reason": null}),
    };
    if job.prompt_logprobs {
        choice["prompt_logprobs"] = vllm_prompt_logprobs(model, logprobs);
    }
    choice
}

/// A UTF-8 continuation byte (`10xxxxxx`): not the start of a character.
fn is_continuation(b: u8) -> bool {
    b & 0xC0 == 0x80
}

pub(crate) fn stream_response(s: Arc<AppState>, job: Job, mut pieces: mpsc::Receiver<Piece>) -> Response {
    let keepalive = s.options.sse_keepalive;
    let (ev_tx, ev_rx) = mpsc::channel::<Result<Event, Infallible>>(64);
    // Pieces → SSE events. If the client disconnects the event channel closes, this task ends, the piece
    // channel closes, and every driver's abort guard frees its request in the engine.
    let job = Arc::new(job);
    let task = async move {
        let mut first = true;
        let mut chunk = |choices: Value, usage: Option<Usage>| -> Event {
            let mut v = json!({
                "id": job.id,
                "object": object_name(job.kind, true),
                "created": s.created,
                "model": job.model.model().name,
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
                    job.continuous_usage.then(|| running_usage(&job, &acc)),
                )),
                // With prompt logprobs the echo goes out with them (they come with the first token).
                (Kind::Completion, Some(_)) if job.awaits_prompt(index) => {}
                (Kind::Completion, Some(prompt)) => opening.push(chunk(
                    json!([{"index": index, "text": prompt, "logprobs": null, "finish_reason": null}]),
                    job.continuous_usage.then(|| running_usage(&job, &acc)),
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
            let piece = tokio::select! {
                p = pieces.recv() => p,
                // The client is gone: end now, so the drivers see their piece channel close and abort.
                _ = ev_tx.closed() => return,
            };
            let events: Vec<Event> = match piece {
                // A long prompt's logprobs make a large chunk: built on the CPU pool, off the async threads.
                Some(Piece::Prompt { index, logprobs }) => {
                    let j = job.clone();
                    match s.on_cpu_pool(&job.request_id, move || prompt_choice(&j, index, &logprobs)).await {
                        Ok(choice) => {
                            vec![chunk(json!([choice]), job.continuous_usage.then(|| running_usage(&job, &acc)))]
                        }
                        Err(e) => {
                            let _ = ev_tx.send(Ok(Event::default().data(json!(e.body()).to_string()))).await;
                            return;
                        }
                    }
                }
                Some(Piece::Text { index, text, tokens, logprobs, calls }) => {
                    acc[index].streamed += tokens.len();
                    let running = job.continuous_usage.then(|| running_usage(&job, &acc));
                    let c = &mut acc[index];
                    let call_deltas = c.take_calls(&s, calls);
                    let mut ev = Vec::with_capacity(1 + call_deltas.len());
                    if !text.is_empty() || job.logprobs || job.return_token_ids {
                        let lp = if job.logprobs {
                            let base = job.echo_of(index).map_or(0, |e| e.chars().count());
                            logprobs_json(job.model.model(), job.kind, &logprobs, &mut c.chars, base)
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
                        ev.push(chunk(json!([choice]), running.clone()));
                    }
                    // Each call's name, then pieces of its arguments, as OpenAI streams them.
                    for d in call_deltas {
                        let choice = json!({"index": index, "delta": {"tool_calls": [d]}, "logprobs": null, "finish_reason": null});
                        ev.push(chunk(json!([choice]), running.clone()));
                    }
                    ev
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
                    let running = job.continuous_usage.then(|| running_usage(&job, &acc));
                    let mut ev = vec![chunk(json!([choice]), running)];
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
    // Comments while nothing is due (queued, or a long prefill) keep proxies and clients with idle timeouts
    // from dropping the stream.
    Sse::new(ReceiverStream::new(ev_rx))
        .keep_alive(KeepAlive::new().interval(keepalive).text("keep-alive"))
        .into_response()
}
