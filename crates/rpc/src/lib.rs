//! `mlx-serving rpc`: JSON-RPC 2.0 on stdin/stdout, one message per line, logs on stderr only.
//!
//! Every method runs through the same axum app as `serve` (in process, no socket): the same validation,
//! engines, scheduler and model registry; there is no second inference path. Methods (the original runtime's
//! names): `runtime/info`, `runtime/state`, `shutdown`, `load_model`, `unload_model`, `generate`, `tokenize`,
//! `check_draft`, `cancel`. `generate` answers with its `stream_id` once the app accepted it (a refusal is the
//! call's error), then sends `stream.chunk`
//! notifications (text and token ids), one `stream.stats` and one `stream.event` (`completed`, `cancelled` or
//! `error`). Many generations run at once over one pipe and batch in the engine. Output lines pass through a
//! bounded queue to one writer: a slow reader holds the generations back instead of growing memory.
//! A malformed line gets a parse error and the runtime goes on; EOF on stdin (or `shutdown`) stops reading,
//! lets the generations in flight finish, and exits.
//!
//! Must not know about: tensors, the engine's internals (it talks HTTP semantics to the app).

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use futures_util::StreamExt;
use serde_json::{json, Map, Value};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::task::{AbortHandle, JoinSet};
use tower::ServiceExt;

/// JSON-RPC's own codes.
pub const PARSE_ERROR: i64 = -32700;
pub const INVALID_REQUEST: i64 = -32600;
pub const METHOD_NOT_FOUND: i64 = -32601;
pub const INVALID_PARAMS: i64 = -32602;
/// The app refused the request (other than below); `data` has the HTTP status and the error's code.
pub const API_ERROR: i64 = -32000;
/// A model, stream or other thing named does not exist (HTTP 404).
pub const NOT_FOUND: i64 = -32004;
/// The name is taken by another model (HTTP 409).
pub const CONFLICT: i64 = -32009;
/// Too busy now; try again (HTTP 429).
pub const OVERLOADED: i64 = -32005;
/// Not available now (HTTP 503), or the runtime is shutting down.
pub const UNAVAILABLE: i64 = -32006;
/// A `generate` cancelled before its stream started.
pub const REQUEST_CANCELLED: i64 = -32800;

/// Lines waiting for the writer (beyond: senders wait).
const OUTPUT_QUEUE: usize = 256;

/// Calls in flight at once; beyond, stdin is not read until one finishes (with the bounded output queue, a
/// host that writes calls but never reads answers stalls the runtime instead of growing it).
const MAX_IN_FLIGHT: usize = 1024;

pub const METHODS: [&str; 9] = [
    "runtime/info",
    "runtime/state",
    "shutdown",
    "load_model",
    "unload_model",
    "generate",
    "tokenize",
    "check_draft",
    "cancel",
];

/// A JSON-RPC error.
#[derive(Debug)]
pub struct RpcError {
    pub code: i64,
    pub message: String,
    pub data: Option<Value>,
}

impl RpcError {
    fn new(code: i64, message: impl Into<String>) -> Self {
        Self { code, message: message.into(), data: None }
    }

    fn to_json(&self) -> Value {
        let mut e = json!({"code": self.code, "message": self.message});
        if let Some(d) = &self.data {
            e["data"] = d.clone();
        }
        e
    }
}

fn params_error(m: impl Into<String>) -> RpcError {
    RpcError::new(INVALID_PARAMS, m)
}

/// What `runtime/info` tells besides the models.
#[derive(Clone, Debug)]
pub struct RuntimeInfo {
    pub version: String,
    /// Lines longer than this are refused (the server's `max_body_bytes`).
    pub max_line_bytes: usize,
}

/// A generation in flight: its task, and the id of its `generate` call until that is answered.
struct Stream {
    task: AbortHandle,
    pending: Option<Value>,
}

struct Shared {
    app: axum::Router,
    out: mpsc::Sender<String>,
    /// Generations in flight by stream id.
    streams: Mutex<HashMap<String, Stream>>,
    next_stream: AtomicU64,
    info: RuntimeInfo,
}

impl Shared {
    async fn send(&self, v: Value) {
        // Only fails when the writer is gone (stdout closed): nothing left to tell.
        let _ = self.out.send(v.to_string()).await;
    }

    async fn reply(&self, id: &Value, result: Result<Value, RpcError>) {
        let msg = match result {
            Ok(r) => json!({"jsonrpc": "2.0", "id": id, "result": r}),
            Err(e) => json!({"jsonrpc": "2.0", "id": id, "error": e.to_json()}),
        };
        self.send(msg).await;
    }

    async fn notify(&self, method: &str, params: Value) {
        self.send(json!({"jsonrpc": "2.0", "method": method, "params": params})).await;
    }

    /// One request through the app; the response's status and body (not read when `stream`).
    async fn http(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<axum::response::Response, RpcError> {
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header("content-type", "application/json")
            .body(body.map_or_else(Body::empty, |b| Body::from(b.to_string())))
            .map_err(|e| RpcError::new(INVALID_PARAMS, format!("bad request: {e}")))?;
        let resp = self.app.clone().oneshot(req).await.unwrap_or_else(|e| match e {});
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status();
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20).await.unwrap_or_default();
        Err(api_error(status, &bytes))
    }

    async fn json(&self, method: Method, path: &str, body: Option<&Value>) -> Result<Value, RpcError> {
        let resp = self.http(method, path, body).await?;
        let bytes = axum::body::to_bytes(resp.into_body(), 64 << 20)
            .await
            .map_err(|e| RpcError::new(API_ERROR, format!("reading the answer: {e}")))?;
        serde_json::from_slice(&bytes).map_err(|e| RpcError::new(API_ERROR, format!("the answer is not JSON: {e}")))
    }
}

/// The app's error envelope as a JSON-RPC error: the same message, the HTTP status and code in `data`.
fn api_error(status: StatusCode, body: &[u8]) -> RpcError {
    let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let e = &v["error"];
    let message = e["message"].as_str().map(String::from).unwrap_or_else(|| format!("HTTP {}", status.as_u16()));
    let code = match status {
        StatusCode::BAD_REQUEST | StatusCode::PAYLOAD_TOO_LARGE | StatusCode::UNPROCESSABLE_ENTITY => INVALID_PARAMS,
        StatusCode::NOT_FOUND => NOT_FOUND,
        StatusCode::CONFLICT => CONFLICT,
        StatusCode::TOO_MANY_REQUESTS => OVERLOADED,
        StatusCode::SERVICE_UNAVAILABLE => UNAVAILABLE,
        _ => API_ERROR,
    };
    RpcError {
        code,
        message,
        data: Some(json!({"status": status.as_u16(), "type": e["type"], "code": e["code"], "param": e["param"]})),
    }
}

fn obj(params: &Value) -> Result<&Map<String, Value>, RpcError> {
    match params {
        Value::Object(m) => Ok(m),
        _ => Err(params_error("params must be an object")),
    }
}

/// The model a request names (`model`, or the original's `model_id`).
fn model_of(p: &Map<String, Value>) -> Result<String, RpcError> {
    match p.get("model").or_else(|| p.get("model_id")) {
        Some(Value::String(m)) if !m.is_empty() => Ok(m.clone()),
        Some(_) => Err(params_error("model must be a non-empty string")),
        None => Err(params_error("model is required")),
    }
}

fn path_segment(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Reads one line of at most `max` bytes (the newline not counted); Ok(None) at EOF; Err(Some(n)) for a line
/// that was too long (its `n` bytes skipped).
async fn read_line<R: AsyncBufRead + Unpin>(r: &mut R, max: usize) -> std::io::Result<Result<Option<Vec<u8>>, usize>> {
    let mut line = Vec::new();
    let mut skipped = 0usize;
    loop {
        let buf = r.fill_buf().await?;
        if buf.is_empty() {
            return Ok(match (line.is_empty() && skipped == 0, skipped) {
                (true, _) => Ok(None),
                (false, 0) => Ok(Some(line)),
                (false, n) => Err(n),
            });
        }
        let (take, done) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (buf.len(), false),
        };
        let piece = &buf[..take - usize::from(done)];
        if skipped > 0 || line.len() + piece.len() > max {
            skipped += line.len() + piece.len();
            line.clear();
        } else {
            line.extend_from_slice(piece);
        }
        r.consume(take);
        if done {
            return Ok(if skipped > 0 { Err(skipped) } else { Ok(Some(line)) });
        }
    }
}

/// Runs the runtime over `input` and `output` until EOF or `shutdown`, then waits for the generations in
/// flight and flushes.
pub async fn run<R, W>(app: axum::Router, input: R, output: W, info: RuntimeInfo) -> std::io::Result<()>
where
    R: AsyncBufRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (tx, mut rx) = mpsc::channel::<String>(OUTPUT_QUEUE);
    let writer = tokio::spawn(async move {
        let mut w = output;
        while let Some(mut line) = rx.recv().await {
            line.push('\n');
            if w.write_all(line.as_bytes()).await.is_err() {
                break;
            }
            // Flush when nothing else is queued, so lines go out promptly without a syscall per line under load.
            if rx.is_empty() && w.flush().await.is_err() {
                break;
            }
        }
        let _ = w.flush().await;
    });
    let shared = Arc::new(Shared {
        app,
        out: tx,
        streams: Mutex::new(HashMap::new()),
        next_stream: AtomicU64::new(1),
        info: info.clone(),
    });
    let mut tasks = JoinSet::new();
    let mut input = input;
    loop {
        while tasks.len() >= MAX_IN_FLIGHT {
            tasks.join_next().await;
        }
        let line = match read_line(&mut input, info.max_line_bytes).await? {
            Ok(None) => break,
            Ok(Some(l)) => l,
            Err(n) => {
                let e = RpcError::new(INVALID_REQUEST, format!("a line of {n} bytes: over {}", info.max_line_bytes));
                shared.reply(&Value::Null, Err(e)).await;
                continue;
            }
        };
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let msg: Value = match serde_json::from_slice(&line) {
            Ok(v) => v,
            Err(e) => {
                shared.reply(&Value::Null, Err(RpcError::new(PARSE_ERROR, format!("not JSON: {e}")))).await;
                continue;
            }
        };
        let id = msg.get("id").cloned();
        let bad_id = !matches!(id, None | Some(Value::Null | Value::Number(_) | Value::String(_)));
        let method = msg.get("method").and_then(Value::as_str).map(String::from);
        let (Some(method), false, Some("2.0")) = (method, bad_id, msg.get("jsonrpc").and_then(Value::as_str)) else {
            let e = RpcError::new(INVALID_REQUEST, "expected {\"jsonrpc\": \"2.0\", \"method\": ..., \"id\": ...}");
            shared.reply(&id.unwrap_or(Value::Null), Err(e)).await;
            continue;
        };
        let params = msg.get("params").cloned().unwrap_or(Value::Object(Map::new()));
        let id = id.unwrap_or(Value::Null);
        if method == "shutdown" {
            shared.reply(&id, Ok(json!({"in_flight": shared.streams.lock().unwrap().len()}))).await;
            break;
        }
        if method == "generate" {
            match start_generation(&shared, &params) {
                Ok((stream_id, request)) => {
                    // The task starts once its entry is in the map (where `cancel` finds it).
                    let (go, ready) = tokio::sync::oneshot::channel::<()>();
                    let (s, sid) = (shared.clone(), stream_id.clone());
                    let task = tasks.spawn(async move {
                        if ready.await.is_ok() {
                            generate(s, sid, request).await;
                        }
                    });
                    shared.streams.lock().unwrap().insert(stream_id, Stream { task, pending: Some(id) });
                    let _ = go.send(());
                }
                Err(e) => shared.reply(&id, Err(e)).await,
            }
            continue;
        }
        let s = shared.clone();
        tasks.spawn(async move {
            let r = call(&s, &method, &params).await;
            s.reply(&id, r).await;
        });
        // Finished tasks are dropped as we go, so the set stays as small as the work in flight.
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
    drop(shared);
    let _ = writer.await;
    Ok(())
}

/// Every method but `generate` and `shutdown`.
async fn call(s: &Arc<Shared>, method: &str, params: &Value) -> Result<Value, RpcError> {
    let p = obj(params)?;
    match method {
        "runtime/info" => {
            let models = s.json(Method::GET, "/v1/models", None).await?;
            Ok(json!({"name": "mlx-serving", "version": s.info.version, "protocol": "jsonrpc-2.0",
                "methods": METHODS, "models": models["data"]}))
        }
        "runtime/state" => {
            let health = s.json(Method::GET, "/health", None).await.unwrap_or_else(|e| json!({"status": e.message}));
            let models = s.json(Method::GET, "/v1/models", None).await?;
            let streams: Vec<String> = s.streams.lock().unwrap().keys().cloned().collect();
            Ok(json!({"health": health, "models": models["data"], "active_streams": streams}))
        }
        "load_model" => load_model(s, p).await,
        "unload_model" => {
            let m = model_of(p)?;
            let force = p.get("force").and_then(Value::as_bool).unwrap_or(false);
            let q = if force { "?force=true" } else { "" };
            s.json(Method::POST, &format!("/v1/models/{}/unload{q}", path_segment(&m)), None).await
        }
        "tokenize" => {
            let m = model_of(p)?;
            let text = match p.get("text").or_else(|| p.get("prompt")) {
                Some(Value::String(t)) => t.clone(),
                _ => return Err(params_error("text must be a string")),
            };
            let add = p.get("add_special_tokens").or_else(|| p.get("add_bos")).and_then(Value::as_bool).unwrap_or(true);
            let r = s
                .json(Method::POST, "/tokenize", Some(&json!({"model": m, "prompt": text, "add_special_tokens": add})))
                .await?;
            Ok(json!({"tokens": r["tokens"], "count": r["count"]}))
        }
        "check_draft" => check_draft(s, p).await,
        "cancel" => {
            let sid = stream_key(p.get("stream_id")).ok_or_else(|| params_error("stream_id is required"))?;
            let entry = s.streams.lock().unwrap().remove(&sid);
            let Some(stream) = entry else { return Ok(json!({"cancelled": false})) };
            // Aborting the task drops the response body: the app aborts the request in the engine.
            stream.task.abort();
            if let Some(id) = stream.pending {
                let e = RpcError::new(REQUEST_CANCELLED, format!("stream `{sid}` was cancelled before it started"));
                s.reply(&id, Err(e)).await;
            }
            s.notify("stream.event", json!({"stream_id": sid, "event": "cancelled"})).await;
            Ok(json!({"cancelled": true}))
        }
        other => Err(RpcError::new(METHOD_NOT_FOUND, format!("no method `{other}` (methods: {})", METHODS.join(", ")))),
    }
}

/// `load_model {model, local_path?, draft?}`: a model the runtime serves is loaded; with `local_path` (a model
/// file or directory) or `draft` (a draft model's path, for speculative decoding) it is registered under
/// `model` first (again from the same files is fine); an unknown `model` alone is looked up as a repository
/// id in the local Hugging Face cache. Answers with the model's card once it is loaded.
async fn load_model(s: &Arc<Shared>, p: &Map<String, Value>) -> Result<Value, RpcError> {
    let m = model_of(p)?;
    let text = |keys: &[&str]| -> Result<Option<String>, RpcError> {
        match keys.iter().find_map(|k| p.get(*k)) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(v)) if !v.is_empty() => Ok(Some(v.clone())),
            Some(_) => Err(params_error(format!("{} must be a non-empty string", keys[0]))),
        }
    };
    let (local, draft) = (text(&["local_path", "localPath"])?, text(&["draft", "draft_model"])?);
    let load = format!("/v1/models/{}/load", path_segment(&m));
    if local.is_none() && draft.is_none() {
        match s.json(Method::POST, &load, None).await {
            Err(e) if e.code == NOT_FOUND => {
                // Not a served name: a repository id in the local cache, or nothing.
                let body = json!({"id": m, "path": m});
                return s.json(Method::POST, "/v1/models", Some(&body)).await.map_err(|r| match r.code {
                    INVALID_PARAMS => RpcError::new(
                        NOT_FOUND,
                        format!("{} and not a model in the local Hugging Face cache ({})", e.message, r.message),
                    ),
                    _ => r,
                });
            }
            other => return other,
        }
    }
    let body = json!({"id": m, "path": local, "draft_model": draft});
    s.json(Method::POST, "/v1/models", Some(&body)).await
}

/// Whether `draft` can draft for `model`: both served, and they tokenize a set of probe texts identically
/// (speculative decoding needs the same vocabulary).
async fn check_draft(s: &Arc<Shared>, p: &Map<String, Value>) -> Result<Value, RpcError> {
    let model = model_of(p)?;
    let draft = match p.get("draft").or_else(|| p.get("draft_model")) {
        Some(Value::String(d)) if !d.is_empty() => d.clone(),
        _ => return Err(params_error("draft must be a non-empty string")),
    };
    const PROBES: [&str; 4] = [
        "The quick brown fox jumps over the lazy dog.",
        "def main():\n    print(\"hello, world\")\n",
        "Zürich, 東京, and São Paulo — 3.14159 × 2 = 6.28318!",
        "<|im_start|>user\nHi<|im_end|>\n",
    ];
    for probe in PROBES {
        let ids = |m: &str| json!({"model": m, "prompt": probe, "add_special_tokens": false});
        let a = s.json(Method::POST, "/tokenize", Some(&ids(&model))).await?;
        let b = s.json(Method::POST, "/tokenize", Some(&ids(&draft))).await?;
        if a["tokens"] != b["tokens"] {
            return Ok(json!({"compatible": false,
                "reason": format!("the two tokenize {probe:?} differently: another vocabulary")}));
        }
    }
    Ok(json!({"compatible": true}))
}

fn stream_key(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// Checks a `generate` call and builds its request for the app: (stream id, endpoint, body).
fn start_generation(s: &Arc<Shared>, params: &Value) -> Result<(String, (String, Value)), RpcError> {
    let p = obj(params)?;
    let model = model_of(p)?;
    let stream_id = match p.get("stream_id") {
        None => format!("s{}", s.next_stream.fetch_add(1, Ordering::Relaxed)),
        v => stream_key(v).ok_or_else(|| params_error("stream_id must be a non-empty string or a number"))?,
    };
    if s.streams.lock().unwrap().contains_key(&stream_id) {
        return Err(params_error(format!("stream_id `{stream_id}` is already in flight")));
    }
    let mut body = Map::new();
    for (k, v) in p {
        match k.as_str() {
            "stream_id" | "model_id" | "model" | "stream" | "stream_options" => {}
            "stop_sequences" => {
                body.insert("stop".into(), v.clone());
            }
            _ => {
                body.insert(k.clone(), v.clone());
            }
        }
    }
    let chat = body.contains_key("messages");
    if !chat && !body.contains_key("prompt") {
        return Err(params_error("give prompt (or messages)"));
    }
    body.insert("model".into(), Value::String(model));
    body.insert("stream".into(), Value::Bool(true));
    body.insert("stream_options".into(), json!({"include_usage": true}));
    body.insert("return_token_ids".into(), Value::Bool(true));
    let path = if chat { "/v1/chat/completions" } else { "/v1/completions" };
    Ok((stream_id, (path.to_string(), Value::Object(body))))
}

/// One generation: the `generate` call answered once the app accepted it (or refused it: then the answer is
/// the error), then the app's stream as notifications.
async fn generate(s: Arc<Shared>, stream_id: String, (path, body): (String, Value)) {
    let t0 = Instant::now();
    let started = s.http(Method::POST, &path, Some(&body)).await;
    // The call's id, unless a `cancel` came first (it answered the call).
    let id = s.streams.lock().unwrap().get_mut(&stream_id).and_then(|st| st.pending.take());
    let Some(id) = id else { return };
    let resp = match started {
        Ok(r) => {
            s.reply(&id, Ok(json!({"stream_id": stream_id}))).await;
            r
        }
        Err(e) => {
            s.streams.lock().unwrap().remove(&stream_id);
            s.reply(&id, Err(e)).await;
            return;
        }
    };
    let outcome = relay(&s, &stream_id, resp, t0).await;
    s.streams.lock().unwrap().remove(&stream_id);
    match outcome {
        Ok((stats, finish)) => {
            s.notify("stream.stats", stats).await;
            s.notify("stream.event", json!({"stream_id": stream_id, "event": "completed", "finish_reason": finish}))
                .await;
        }
        Err(e) => {
            s.notify("stream.event", json!({"stream_id": stream_id, "event": "error", "error": e.to_json()})).await;
        }
    }
}

/// Reads the app's SSE answer and sends a `stream.chunk` per event with text or ids; returns the stats and the
/// finish reason.
async fn relay(
    s: &Arc<Shared>,
    stream_id: &str,
    resp: axum::response::Response,
    t0: Instant,
) -> Result<(Value, Value), RpcError> {
    let mut data = resp.into_body().into_data_stream();
    let mut buf: Vec<u8> = Vec::new();
    let (mut first, mut last) = (None::<Instant>, t0);
    let (mut generated, mut index) = (0u64, 0u64);
    let mut usage = Value::Null;
    let mut finish = Value::Null;
    while let Some(piece) = data.next().await {
        let piece = piece.map_err(|e| RpcError::new(API_ERROR, format!("the answer broke off: {e}")))?;
        buf.extend_from_slice(&piece);
        while let Some(end) = buf.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = buf.drain(..end + 2).collect();
            for line in event.split(|&b| b == b'\n') {
                let Some(d) = line.strip_prefix(b"data:") else { continue };
                let d = d.trim_ascii();
                if d == b"[DONE]" {
                    continue;
                }
                let v: Value = serde_json::from_slice(d)
                    .map_err(|e| RpcError::new(API_ERROR, format!("a malformed stream event: {e}")))?;
                if let Some(e) = v.get("error") {
                    let mut err = RpcError::new(API_ERROR, e["message"].as_str().unwrap_or("the generation failed"));
                    err.data = Some(json!({"code": e["code"], "type": e["type"]}));
                    return Err(err);
                }
                if !v["usage"].is_null() {
                    usage = v["usage"].clone();
                }
                let Some(c) = v["choices"].get(0) else { continue };
                if !c["finish_reason"].is_null() {
                    finish = c["finish_reason"].clone();
                }
                let text = c["text"].as_str().or_else(|| c["delta"]["content"].as_str()).unwrap_or("");
                let ids = c["token_ids"].as_array().cloned().unwrap_or_default();
                if text.is_empty() && ids.is_empty() {
                    continue;
                }
                let now = Instant::now();
                first.get_or_insert(now);
                last = now;
                generated += ids.len() as u64;
                s.notify(
                    "stream.chunk",
                    json!({"stream_id": stream_id, "index": index, "token": text,
                    "token_ids": ids}),
                )
                .await;
                index += 1;
            }
        }
    }
    let end = Instant::now();
    let tokens = usage["completion_tokens"].as_u64().unwrap_or(generated);
    let ttft = first.map_or(end, |f| f) - t0;
    let rate = match first {
        Some(f) if tokens > 1 && last > f => (tokens - 1) as f64 / (last - f).as_secs_f64(),
        _ => 0.0,
    };
    let stats = json!({"stream_id": stream_id, "prompt_tokens": usage["prompt_tokens"], "tokens_generated": tokens,
        "time_to_first_token_ms": ttft.as_secs_f64() * 1e3, "tokens_per_second": rate,
        "total_time_ms": (end - t0).as_secs_f64() * 1e3});
    Ok((stats, finish))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn lines_are_bounded() {
        let input: &[u8] = b"short\n0123456789abcdef\n\nlast";
        let mut r = tokio::io::BufReader::with_capacity(4, input);
        assert_eq!(read_line(&mut r, 8).await.unwrap(), Ok(Some(b"short".to_vec())));
        assert_eq!(read_line(&mut r, 8).await.unwrap(), Err(16), "a long line is skipped whole");
        assert_eq!(read_line(&mut r, 8).await.unwrap(), Ok(Some(Vec::new())));
        assert_eq!(read_line(&mut r, 8).await.unwrap(), Ok(Some(b"last".to_vec())), "the last line needs no newline");
        assert_eq!(read_line(&mut r, 8).await.unwrap(), Ok(None));
    }

    #[test]
    fn http_errors_map_to_stable_codes() {
        let body = br#"{"error": {"message": "the model `x` does not exist", "type": "invalid_request_error", "param": "model", "code": "model_not_found"}}"#;
        let e = api_error(StatusCode::NOT_FOUND, body);
        assert_eq!((e.code, e.message.as_str()), (NOT_FOUND, "the model `x` does not exist"));
        assert_eq!(e.data.unwrap()["code"], "model_not_found");
        assert_eq!(api_error(StatusCode::BAD_REQUEST, b"{}").code, INVALID_PARAMS);
        assert_eq!(api_error(StatusCode::TOO_MANY_REQUESTS, b"").code, OVERLOADED);
        assert_eq!(api_error(StatusCode::INTERNAL_SERVER_ERROR, b"").message, "HTTP 500");
        assert_eq!(path_segment("a b/c"), "a%20b%2Fc");
    }
}
