//! Prompts: chat messages → the template's input, completion prompts → token ids, `/tokenize` and
//! `/detokenize`. Tokenizing and rendering are CPU work: the handlers run them on the bounded CPU pool
//! ([`AppState::on_cpu_pool`]), after the cheap checks (shape, counts, a byte bound on the length) that can
//! refuse a request without tokenizing it.

use crate::error::ApiError;
use crate::json::ApiJson;
use crate::models::ServedModel;
use crate::respond::Prompt;
use crate::{AppState, RequestCtx};
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use mlx_serving_protocol::ChatMessage;
use serde_json::{json, Value};
use std::sync::Arc;

/// Most engine requests (prompts × n) one HTTP request may start.
pub const MAX_CHOICES: usize = 64;

/// OpenAI messages → the `{role, content: string}` list chat templates expect (plus `name` when given).
/// Text parts are joined with newlines, as vLLM joins them. For a model that takes images (`vision`), every
/// content is a list of `{"type": "text", "text"}` and `{"type": "image"}` parts instead, as vision-language
/// templates read them; for one that does not, an image part is a 400.
pub(crate) fn normalize_messages(messages_in: &[ChatMessage], vision: bool) -> Result<Vec<Value>, ApiError> {
    let mut messages = Vec::with_capacity(messages_in.len());
    for (i, m) in messages_in.iter().enumerate() {
        if !matches!(m.role.as_str(), "system" | "user" | "assistant" | "tool") {
            return Err(ApiError::bad_request(
                format!("messages[{i}].role `{}` is not supported (system, user, assistant, tool)", m.role),
                Some("messages"),
            ));
        }
        let text_part = |t: &str| json!({"type": "text", "text": t});
        let content = match &m.content {
            Value::String(t) if vision => json!([text_part(t)]),
            Value::String(t) => json!(t),
            Value::Array(parts) => {
                let mut texts = Vec::with_capacity(parts.len());
                let mut list = Vec::with_capacity(parts.len());
                for (j, p) in parts.iter().enumerate() {
                    match (p.get("type").and_then(Value::as_str), p.get("text").and_then(Value::as_str)) {
                        (Some("text"), Some(t)) => {
                            texts.push(t);
                            list.push(text_part(t));
                        }
                        (Some("image_url"), _) if vision => list.push(json!({"type": "image"})),
                        (Some("image_url"), _) => {
                            let field = format!("messages[{i}].content[{j}]");
                            return Err(ApiError::bad_request(
                                format!("{field}: this model does not take images"),
                                Some(&field),
                            ));
                        }
                        _ => {
                            return Err(ApiError::bad_request(
                                format!("messages[{i}].content[{j}]: only text and image_url parts are supported"),
                                Some("messages"),
                            ))
                        }
                    }
                }
                if vision {
                    Value::Array(list)
                } else {
                    json!(texts.join("\n"))
                }
            }
            Value::Null if m.role == "assistant" && vision => json!([text_part("")]),
            Value::Null if m.role == "assistant" => json!(""),
            _ => {
                return Err(ApiError::bad_request(
                    format!("messages[{i}].content must be a string or a list of content parts"),
                    Some("messages"),
                ))
            }
        };
        let mut msg = json!({"role": m.role, "content": content});
        if let Some(name) = &m.name {
            msg["name"] = json!(name);
        }
        match (m.role.as_str(), &m.tool_calls, &m.tool_call_id) {
            ("assistant", Some(calls), None) => msg["tool_calls"] = template_calls(i, calls)?,
            ("tool", None, Some(id)) => msg["tool_call_id"] = json!(id),
            ("tool", None, None) => {
                return Err(ApiError::bad_request(
                    format!("messages[{i}]: a tool message needs the tool_call_id it answers"),
                    Some(&format!("messages[{i}].tool_call_id")),
                ))
            }
            (_, None, None) => {}
            (role, calls, _) => {
                let field = if calls.is_some() { "tool_calls" } else { "tool_call_id" };
                return Err(ApiError::bad_request(
                    format!(
                        "messages[{i}].{field}: tool_calls belong to assistant messages and tool_call_id to tool \
                         ones, not to a {role} message"
                    ),
                    Some(&format!("messages[{i}].{field}")),
                ));
            }
        }
        messages.push(msg);
    }
    Ok(messages)
}

/// An assistant message's `tool_calls` for the chat template: each `{"id", "type": "function", "function":
/// {"name", "arguments"}}`, the arguments (a JSON string on the wire) parsed, as Hugging Face templates expect.
fn template_calls(i: usize, calls: &Value) -> Result<Value, ApiError> {
    let bad = |m: String| ApiError::bad_request(format!("messages[{i}].tool_calls: {m}"), Some("messages"));
    let list = calls.as_array().ok_or_else(|| bad("must be a list".into()))?;
    let mut out = Vec::with_capacity(list.len());
    for (j, c) in list.iter().enumerate() {
        let f = c.get("function").ok_or_else(|| bad(format!("[{j}] has no function")))?;
        let name = f
            .get("name")
            .and_then(Value::as_str)
            .ok_or_else(|| bad(format!("[{j}].function.name must be a string")))?;
        let arguments = match f.get("arguments") {
            Some(Value::String(a)) => serde_json::from_str::<Value>(a).unwrap_or_else(|_| Value::String(a.clone())),
            None => json!({}),
            Some(other) => other.clone(),
        };
        let mut call = json!({"type": "function", "function": {"name": name, "arguments": arguments}});
        if let Some(id) = c.get("id") {
            call["id"] = id.clone();
        }
        out.push(call);
    }
    Ok(Value::Array(out))
}

/// A lower bound on a text's token count from its length: no token is longer than `max_token_bytes`.
pub(crate) fn min_tokens(m: &ServedModel, text_bytes: usize) -> usize {
    text_bytes.div_ceil(m.bundle.max_token_bytes)
}

/// The cheap checks of a completion `prompt`, before any tokenizing: its shape and batch size. Returns a
/// lower bound on each prompt's length in tokens.
pub(crate) fn completion_prompt_bounds(s: &ServedModel, prompt: &Value) -> Result<Vec<usize>, ApiError> {
    let bad = |m: &str| ApiError::bad_request(m, Some("prompt"));
    let shape = "prompt must be a string, a list of strings, a list of token ids, or a list of token-id lists";
    match prompt {
        Value::String(t) => Ok(vec![min_tokens(s, t.len())]),
        Value::Array(items) if !items.is_empty() && items.iter().all(Value::is_number) => Ok(vec![items.len()]),
        Value::Array(items) if !items.is_empty() => {
            if items.len() > MAX_CHOICES {
                return Err(bad(&format!("at most {MAX_CHOICES} prompts per request, got {}", items.len())));
            }
            items
                .iter()
                .map(|item| match item {
                    Value::String(t) => Ok(min_tokens(s, t.len())),
                    Value::Array(ids) if ids.iter().all(Value::is_number) => Ok(ids.len()),
                    _ => Err(bad(shape)),
                })
                .collect()
        }
        _ => Err(bad(shape)),
    }
}

/// A lower bound on a chat prompt's length in tokens: its system and user texts alone, trimmed (templates
/// may trim them, or drop parts of assistant turns such as earlier reasoning, but keep the rest).
pub(crate) fn chat_prompt_bound(s: &ServedModel, messages: &[Value]) -> usize {
    messages
        .iter()
        .filter(|m| m["role"] != "assistant")
        .map(|m| min_tokens(s, m["content"].as_str().map_or(0, |c| c.trim().len())))
        .sum()
}

/// The model a `/tokenize` or `/detokenize` request names; without one, the only model registered.
fn request_model(s: &AppState, model: Option<&str>) -> Result<String, ApiError> {
    match (model, s.models.list().as_slice()) {
        (Some(m), _) => Ok(m.to_string()),
        (None, [only]) => Ok(only.name.clone()),
        (None, _) => Err(ApiError::bad_request("model is required: this server has several models", Some("model"))),
    }
}

pub async fn tokenize(
    State(s): State<Arc<AppState>>,
    Extension(ctx): Extension<RequestCtx>,
    ApiJson(req): ApiJson<mlx_serving_protocol::TokenizeRequest>,
) -> Result<Response, ApiError> {
    let lease = s.lease(&request_model(&s, req.model.as_deref())?).await?;
    let (st, m) = (s.clone(), lease.model().clone());
    let tokens = match (req.prompt, req.messages) {
        (Some(p), None) => {
            let add_special = req.add_special_tokens.unwrap_or(true);
            s.on_cpu_pool(&ctx.id, move || m.bundle.encode(&p, add_special))
                .await?
                .map_err(|e| ApiError::bad_request(e.to_string(), Some("prompt")))?
        }
        (None, Some(msgs)) => {
            if req.add_generation_prompt == Some(false) {
                return Err(ApiError::bad_request(
                    "add_generation_prompt = false is not supported yet",
                    Some("add_generation_prompt"),
                ));
            }
            let messages = normalize_messages(&msgs, m.bundle.vision.is_some())?;
            let mut parts = crate::images::find(&msgs, &s.options.images)?;
            crate::images::fetch_remote(&mut parts, &s.options.images).await?;
            s.on_cpu_pool(&ctx.id, move || {
                let grids: Vec<(usize, usize)> = match parts.is_empty() {
                    true => Vec::new(),
                    false => crate::images::prepare(&m.bundle, &parts, &st.options.images, &st.image_bytes)?
                        .into_iter()
                        .map(|p| p.grid)
                        .collect(),
                };
                Ok::<_, ApiError>(st.encode_chat_tools(&m, messages, None, &grids)?.0)
            })
            .await??
        }
        _ => return Err(ApiError::bad_request("give exactly one of prompt or messages", Some("prompt"))),
    };
    let max_model_len = lease.model().engine.config().max_model_len;
    Ok(Json(json!({"count": tokens.len(), "max_model_len": max_model_len, "tokens": tokens})).into_response())
}

pub async fn detokenize(
    State(s): State<Arc<AppState>>,
    Extension(ctx): Extension<RequestCtx>,
    ApiJson(req): ApiJson<mlx_serving_protocol::DetokenizeRequest>,
) -> Result<Response, ApiError> {
    let lease = s.lease(&request_model(&s, req.model.as_deref())?).await?;
    let m = lease.model().clone();
    let vocab = m.bundle.model.config().vocab_size;
    let ids = req
        .tokens
        .iter()
        .map(|&t| u32::try_from(t).ok().filter(|&id| (id as usize) < vocab))
        .collect::<Option<Vec<u32>>>()
        .ok_or_else(|| ApiError::bad_request(format!("tokens must be integers in [0, {vocab})"), Some("tokens")))?;
    let text = s
        .on_cpu_pool(&ctx.id, move || m.bundle.tokenizer.decode(&ids, false))
        .await?
        .map_err(|e| ApiError::bad_request(e.to_string(), Some("tokens")))?;
    Ok(Json(json!({"prompt": text})).into_response())
}

/// `prompt` as OpenAI allows it: a string, a list of strings, a list of token ids, or a list of token-id
/// lists. With `echo`, each prompt keeps its text (given, or decoded from its ids).
pub(crate) fn completion_prompts(s: &ServedModel, prompt: &Value, echo: bool) -> Result<Vec<Prompt>, ApiError> {
    let bad = |m: &str| ApiError::bad_request(m, Some("prompt"));
    let vocab = s.bundle.model.config().vocab_size;
    let from_text = |t: &str| -> Result<Prompt, ApiError> {
        let ids = s.bundle.encode(t, true).map_err(|e| bad(&e.to_string()))?;
        Ok(Prompt { ids, mm: Vec::new(), echo: echo.then(|| t.to_string()) })
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
        Ok(Prompt { ids, mm: Vec::new(), echo })
    };
    let shape = "prompt must be a string, a list of strings, a list of token ids, or a list of token-id lists";
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
