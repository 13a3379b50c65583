//! `GET /openapi.json`: an OpenAPI 3.1 document of every endpoint, its request bodies' schemas generated from
//! the very types the handlers deserialize (`mlx_serving_protocol`'s, with `schemars`), so the document cannot
//! drift from what the server accepts; responses and the error envelope likewise where they are typed.
//! `tests/api.rs` checks that every route the router serves is documented and every documented one is served.

use crate::models::Registration;
use mlx_serving_protocol::{
    ChatCompletionRequest, CompletionRequest, DetokenizeRequest, ErrorResponse, TokenizeRequest, Usage,
};
use schemars::generate::SchemaSettings;
use serde_json::{json, Map, Value};

/// Error statuses every API route may answer, with the envelope.
const API_ERRORS: [(&str, &str); 6] = [
    ("400", "The request is invalid (the message names the field: `error.param`)."),
    ("401", "A missing or wrong API key."),
    ("404", "No such model."),
    ("413", "The body is larger than `server.max_body_bytes`."),
    ("415", "The body is not declared as JSON."),
    ("429", "Too many requests (queue full, or the key's rate limit): retry after `Retry-After` seconds."),
];

fn error_response(description: &str) -> Value {
    json!({"description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}})
}

fn json_response(description: &str, schema: Value) -> Value {
    json!({"description": description, "content": {"application/json": {"schema": schema}}})
}

/// An operation: its summary, request body schema (if any), and its 200 answer; the error answers added.
fn op(summary: &str, body: Option<Value>, ok: Value, extra_errors: &[(&str, &str)]) -> Value {
    let mut responses = Map::new();
    responses.insert("200".into(), ok);
    for (code, d) in API_ERRORS.iter().chain(extra_errors) {
        responses.insert((*code).into(), error_response(d));
    }
    let mut o = json!({"summary": summary, "responses": responses});
    if let Some(schema) = body {
        o["requestBody"] = json!({"required": true, "content": {"application/json": {"schema": schema}}});
    }
    o
}

fn open_op(summary: &str, ok: Value) -> Value {
    json!({"summary": summary, "security": [], "responses": {"200": ok}})
}

const UNAVAILABLE: (&str, &str) = ("503", "The model cannot be loaded now (no room): retry after `Retry-After`.");
const SERVER: (&str, &str) = ("500", "The model failed to load (`model_load_failed`).");

/// One server-sent event of a stream (OpenAPI 3.1: the `text/event-stream` schema describes each event, as
/// `{data, event, id}`): its `data` is a chunk (JSON, `object` = `chunk_object`), an error envelope sent after
/// the stream began, or the closing `[DONE]`.
fn sse_event(chunk_object: &str, usage: &Value) -> Value {
    let chunk = json!({"type": "object", "required": ["id", "object", "created", "model", "choices"],
        "properties": {"id": {"type": "string"}, "object": {"const": chunk_object}, "created": {"type": "integer"},
            "model": {"type": "string"},
            "choices": {"type": "array", "items": {"type": "object", "required": ["index"],
                "properties": {"index": {"type": "integer", "minimum": 0}}}},
            "usage": {"anyOf": [usage, {"type": "null"}]}}});
    json!({"type": "object", "required": ["data"],
        "properties": {"data": {"type": "string", "if": {"const": "[DONE]"},
            "else": {"contentMediaType": "application/json",
                "contentSchema": {"anyOf": [chunk, {"$ref": "#/components/schemas/ErrorResponse"}]}}}}})
}

/// The document; `models` (the served names) become the `model` fields' examples, and example bodies use the
/// first, so that a fuzzer built on the document reaches the models.
pub fn document(models: &[String]) -> Value {
    let mut g = SchemaSettings::draft2020_12()
        .with(|s| {
            s.definitions_path = "/components/schemas".into();
            s.meta_schema = None;
        })
        .into_generator();
    let completion = g.subschema_for::<CompletionRequest>().to_value();
    let chat = g.subschema_for::<ChatCompletionRequest>().to_value();
    let tokenize = g.subschema_for::<TokenizeRequest>().to_value();
    let detokenize = g.subschema_for::<DetokenizeRequest>().to_value();
    let register = g.subschema_for::<Registration>().to_value();
    g.subschema_for::<ErrorResponse>();
    let usage = g.subschema_for::<Usage>().to_value();
    let mut schemas = g.take_definitions(true);
    for name in ["CompletionRequest", "ChatCompletionRequest", "TokenizeRequest", "DetokenizeRequest"] {
        if let Some(model) = schemas.get_mut(name).and_then(|s| s.pointer_mut("/properties/model")) {
            model["examples"] = json!(models);
        }
    }
    let example = |body: Value| -> Value {
        models.first().map_or(Value::Null, |m| {
            let mut b = body;
            b["model"] = json!(m);
            b
        })
    };
    let with_example = |schema: Value, body: Value| -> Value {
        match example(body) {
            Value::Null => schema,
            ex => json!({"allOf": [schema], "examples": [ex]}),
        }
    };
    let completion = with_example(completion, json!({"prompt": "The capital of France is", "max_tokens": 4}));
    let chat = with_example(chat, json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}));
    let tokenize = with_example(tokenize, json!({"prompt": "Hello, world"}));
    let detokenize = with_example(detokenize, json!({"tokens": [1, 2, 3]}));

    let model_card = json!({"type": "object", "required": ["id", "object"],
        "properties": {"id": {"type": "string"}, "object": {"const": "model"}, "created": {"type": "integer"},
            "owned_by": {"type": "string"}, "loaded": {"type": "boolean"}, "state": {"type": "string"},
            "memory_bytes": {"type": "integer"}, "aliases": {"type": "array", "items": {"type": "string"}},
            "pinned": {"type": "boolean"}, "max_model_len": {"type": "integer"},
            "capabilities": {"type": "object"}, "input_modalities": {"type": "array"}}});
    let generation = |object: &str, chunk_object: &str| {
        json!({"description": "The answer (JSON), or with `stream: true` server-sent events of chunks ending \
            `data: [DONE]`.",
            "content": {
                "application/json": {"schema": {"type": "object", "required": ["id", "object", "choices"],
                    "properties": {"id": {"type": "string"}, "object": {"const": object},
                        "created": {"type": "integer"}, "model": {"type": "string"},
                        "choices": {"type": "array", "items": {"type": "object"}}, "usage": usage}}},
                "text/event-stream": {"schema": sse_event(chunk_object, &usage)}}})
    };
    let model_param = json!([{"name": "id", "in": "path", "required": true, "schema": {"type": "string"}}]);
    let paths = json!({
        "/v1/completions": {"post": op("A completion (OpenAI's, with vLLM's and our extensions).", Some(completion),
            generation("text_completion", "text_completion"), &[UNAVAILABLE, SERVER])},
        "/v1/chat/completions": {"post": op("A chat completion (OpenAI's, with tools, images, structured output \
            and vLLM's extensions).", Some(chat), generation("chat.completion", "chat.completion.chunk"), &[UNAVAILABLE, SERVER])},
        "/v1/models": {
            "get": op("Every registered model with its state.", None,
                json_response("The models.", json!({"type": "object",
                    "properties": {"object": {"const": "list"}, "data": {"type": "array", "items": model_card}}})), &[]),
            "post": op("Registers a model from files at run time (`server.allow_model_registration`).",
                Some(register), json_response("The model's card.", model_card.clone()),
                &[("403", "Registration is off on this server."), ("409", "The name is taken."), UNAVAILABLE, SERVER])},
        "/v1/models/{id}": {"get": {"parameters": model_param,
            "summary": "One model's card.", "responses": {"200": json_response("The card.", model_card.clone()),
                "401": error_response(API_ERRORS[1].1), "404": error_response(API_ERRORS[2].1)}}},
        "/v1/models/{id}/load": {"post": {"parameters": model_param, "summary": "Loads the model now.",
            "responses": {"200": json_response("The card, once loaded.", model_card.clone()),
                "401": error_response(API_ERRORS[1].1), "404": error_response(API_ERRORS[2].1),
                "500": error_response(SERVER.1), "503": error_response(UNAVAILABLE.1)}}},
        "/v1/models/{id}/unload": {"post": {"summary": "Unloads the model (after its requests, or aborting them).",
            "parameters": [model_param[0].clone(), {"name": "force", "in": "query", "required": false,
                "schema": {"type": "boolean"}}],
            "responses": {"200": json_response("The card.", model_card.clone()),
                "400": error_response("A bad query parameter."), "401": error_response(API_ERRORS[1].1),
                "404": error_response(API_ERRORS[2].1)}}},
        "/api/ps": {"get": {"summary": "Ollama's list of loaded models.", "responses": {
            "200": json_response("The loaded models.", json!({"type": "object", "properties": {"models": {"type": "array"}}})),
            "401": error_response(API_ERRORS[1].1)}}},
        "/tokenize": {"post": op("vLLM's tokenize: a prompt, or chat messages with the model's template.",
            Some(tokenize), json_response("The ids.", json!({"type": "object", "required": ["tokens"],
                "properties": {"tokens": {"type": "array", "items": {"type": "integer"}}, "count": {"type": "integer"},
                    "max_model_len": {"type": "integer"}}})), &[UNAVAILABLE, SERVER])},
        "/detokenize": {"post": op("vLLM's detokenize.", Some(detokenize), json_response("The text.",
            json!({"type": "object", "properties": {"prompt": {"type": "string"}}})), &[UNAVAILABLE, SERVER])},
        "/health": {"get": {"summary": "200 while every loaded model's engine loop beats; the load.", "security": [],
            "responses": {"200": json_response("Healthy.", json!({"type": "object", "properties": {
                "status": {"type": "string"}, "running": {"type": "integer"}, "waiting": {"type": "integer"}}})),
                "503": json_response("An engine loop is silent.", json!({"type": "object"}))}}},
        "/metrics": {"get": open_op("Prometheus metrics.", json!({"description": "Prometheus text format.",
            "content": {"text/plain": {"schema": {"type": "string"}}}}))},
        "/openapi.json": {"get": open_op("This document.", json_response("OpenAPI 3.1.", json!({"type": "object"})))},
    });
    json!({
        "openapi": "3.1.0",
        "info": {"title": "mlx-serving", "version": env!("CARGO_PKG_VERSION"),
            "description": "OpenAI-compatible serving (chat, completions, models, streaming) with vLLM's extensions."},
        "security": [{"bearer": []}],
        "paths": paths,
        "components": {"schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                "description": "One of `server.api_keys` (none needed when the server has no keys)."}}},
    })
}
