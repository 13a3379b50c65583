//! Forwarding one request: read and inspect the body (model, user, prompt text), pick an instance, send it
//! the same bytes, and pass the answer back chunk by chunk. A failure before any byte reached the client
//! (refused or timed-out connection, 5xx, 429) is retried on another instance within `max_retries`; a
//! stream whose instance dies mid-way ends with an SSE error event. Dropping the client's body drops the
//! instance's response, which closes that connection, which aborts the request there.

use crate::policy::RouteKey;
use crate::pool::InFlight;
use crate::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

/// Headers that belong to one connection, not to the request (never forwarded either way).
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
];

/// The response header that names the instance that answered.
pub const INSTANCE_HEADER: &str = "x-mlx-serving-instance";

/// An OpenAI error envelope.
pub fn error(status: StatusCode, message: &str, code: &str) -> Response {
    let kind = if status.is_server_error() { "server_error" } else { "invalid_request_error" };
    let body = json!({"error": {"message": message, "type": kind, "param": null, "code": code}});
    (status, axum::Json(body)).into_response()
}

fn forwardable(name: &HeaderName) -> bool {
    !HOP_BY_HOP.contains(&name.as_str())
}

/// The prompt as one string, for the prefix index: chat messages' roles and text in order, or the
/// completion prompt.
pub fn prompt_text(body: &Value) -> String {
    let mut out = String::new();
    if let Some(msgs) = body.get("messages").and_then(Value::as_array) {
        for m in msgs {
            out.push_str(m.get("role").and_then(Value::as_str).unwrap_or(""));
            out.push('\n');
            match m.get("content") {
                Some(Value::String(s)) => out.push_str(s),
                Some(Value::Array(parts)) => {
                    for p in parts {
                        if let Some(t) = p.get("text").and_then(Value::as_str) {
                            out.push_str(t);
                        } else if let Some(u) = p.pointer("/image_url/url").and_then(Value::as_str) {
                            // An image counts by its URL (a data: URL is its content).
                            out.push_str(u);
                        }
                    }
                }
                _ => {}
            }
            out.push('\n');
        }
    } else if let Some(p) = body.get("prompt") {
        match p {
            Value::String(s) => out.push_str(s),
            other => out.push_str(&other.to_string()),
        }
    }
    out
}

/// What the router reads from a request body.
struct Inspected {
    model: Option<String>,
    key: RouteKey,
    stream: bool,
}

fn inspect(body: &[u8], headers: &HeaderMap, affinity_header: &str) -> Inspected {
    let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let model = v.get("model").and_then(Value::as_str).map(String::from);
    let affinity = v
        .get("user")
        .and_then(Value::as_str)
        .map(String::from)
        .or_else(|| headers.get(affinity_header).and_then(|h| h.to_str().ok()).map(String::from));
    let stream = v.get("stream").and_then(Value::as_bool).unwrap_or(false);
    Inspected { model, key: RouteKey { affinity, text: prompt_text(&v) }, stream }
}

/// A failed attempt's answer, kept to return if no instance does better.
struct Failed {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

/// The handler for every proxied path.
pub async fn forward(State(r): State<Arc<Router>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let body = match axum::body::to_bytes(body, r.cfg.max_body_bytes).await {
        Ok(b) => b,
        Err(_) => {
            let m = format!("the request body is over {} bytes", r.cfg.max_body_bytes);
            return error(StatusCode::PAYLOAD_TOO_LARGE, &m, "body_too_large");
        }
    };
    let seen = inspect(&body, &parts.headers, &r.cfg.affinity_header);
    if let Some(m) = &seen.model {
        if !r.pool.knows(m) {
            return error(StatusCode::NOT_FOUND, &format!("the model `{m}` does not exist"), "model_not_found");
        }
    }
    let policy = seen.model.as_ref().and_then(|m| r.cfg.model_policies.get(m)).copied().unwrap_or(r.cfg.policy);
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str()).to_string();
    let mut headers = reqwest::header::HeaderMap::new();
    for (k, v) in parts.headers.iter().filter(|(k, _)| forwardable(k) && *k != header::CONTENT_LENGTH) {
        headers.append(k.clone(), v.clone());
    }
    let mut tried: Vec<String> = Vec::new();
    let mut failed: Option<Failed> = None;
    let mut sends = 0;
    while sends <= r.cfg.max_retries {
        let cands = r.pool.candidates(seen.model.as_deref(), &tried);
        if cands.is_empty() {
            break;
        }
        let (k, reason) = r.policies.pick(policy, &cands, &seen.key, &r.cfg.cache_aware);
        let inst = cands[k].clone();
        tried.push(inst.url.clone());
        if !inst.admit(Instant::now()) {
            continue;
        }
        r.metrics.count_reason(reason);
        if sends > 0 {
            r.metrics.retries.fetch_add(1, Ordering::Relaxed);
        }
        sends += 1;
        let guard = inst.start();
        let t0 = Instant::now();
        let sent = r
            .client
            .request(parts.method.clone(), format!("{}{path}", inst.url))
            .headers(headers.clone())
            .body(body.clone())
            .send()
            .await;
        let resp = match sent {
            Err(e) => {
                tracing::warn!(instance = %inst.url, error = %e.without_url(), "instance unreachable; trying another");
                inst.record(false, &r.cfg.breaker);
                inst.stats.retries_from.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            Ok(resp) => resp,
        };
        let status = resp.status();
        if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS {
            // 429 is a busy instance, not a broken one: its breaker stays as it is.
            if status.is_server_error() {
                inst.record(false, &r.cfg.breaker);
            } else {
                inst.record_busy();
            }
            inst.stats.retries_from.fetch_add(1, Ordering::Relaxed);
            let headers = resp.headers().clone();
            let body = resp.bytes().await.unwrap_or_default();
            failed = Some(Failed { status, headers, body });
            continue;
        }
        inst.record(true, &r.cfg.breaker);
        return pass_back(r.clone(), resp, guard, seen.stream, t0);
    }
    if let Some(f) = failed {
        let mut out = Response::new(Body::from(f.body));
        *out.status_mut() = f.status;
        copy_headers(&f.headers, out.headers_mut(), true);
        return out;
    }
    r.metrics.no_instance.fetch_add(1, Ordering::Relaxed);
    let what = seen.model.as_deref().map_or(String::new(), |m| format!(" for `{m}`"));
    let mut out = error(StatusCode::SERVICE_UNAVAILABLE, &format!("no instance available{what}"), "no_instance");
    out.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    out
}

fn copy_headers(from: &HeaderMap, to: &mut HeaderMap, keep_length: bool) {
    for (k, v) in from.iter().filter(|(k, _)| forwardable(k) && (keep_length || *k != header::CONTENT_LENGTH)) {
        to.append(k.clone(), v.clone());
    }
}

/// The instance's answer as the client's, chunk by chunk.
fn pass_back(r: Arc<Router>, resp: reqwest::Response, guard: InFlight, stream: bool, t0: Instant) -> Response {
    let status = resp.status();
    let mut headers = HeaderMap::new();
    let sse = stream
        || resp
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"));
    copy_headers(resp.headers(), &mut headers, !sse);
    if let Ok(v) = HeaderValue::from_str(&guard.0.url) {
        headers.insert(INSTANCE_HEADER, v);
    }
    struct St {
        resp: reqwest::Response,
        guard: InFlight,
        first: bool,
        done: bool,
    }
    let st = St { resp, guard, first: true, done: false };
    let body = futures_util::stream::unfold(st, move |mut st| {
        let r = r.clone();
        async move {
            if st.done {
                return None;
            }
            match st.resp.chunk().await {
                Ok(Some(b)) => {
                    if st.first {
                        st.first = false;
                        let s = &st.guard.0.stats;
                        s.ttfb_us_sum.fetch_add(t0.elapsed().as_micros() as u64, Ordering::Relaxed);
                        s.ttfb_count.fetch_add(1, Ordering::Relaxed);
                    }
                    Some((Ok::<Bytes, std::io::Error>(b), st))
                }
                Ok(None) => None,
                Err(e) => {
                    st.done = true;
                    let inst = &st.guard.0;
                    tracing::warn!(instance = %inst.url, error = %e.without_url(), "instance failed mid-answer");
                    inst.record(false, &r.cfg.breaker);
                    r.metrics.broken_streams.fetch_add(1, Ordering::Relaxed);
                    if !sse {
                        return Some((Err(std::io::Error::other("the instance failed mid-answer")), st));
                    }
                    let ev = json!({"error": {"message": "the instance serving this stream failed mid-way",
                        "type": "server_error", "param": null, "code": "instance_failed"}});
                    Some((Ok(Bytes::from(format!("data: {ev}\n\n"))), st))
                }
            }
        }
    });
    let mut out = Response::new(Body::from_stream(body));
    *out.status_mut() = status;
    *out.headers_mut() = headers;
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_text_flattens_chats_and_prompts() {
        let chat = json!({"messages": [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hi"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]});
        assert_eq!(prompt_text(&chat), "system\nBe brief.\nuser\nHidata:image/png;base64,AAAA\n");
        assert_eq!(prompt_text(&json!({"prompt": "Once upon"})), "Once upon");
        assert_eq!(prompt_text(&json!({"prompt": [1, 2, 3]})), "[1,2,3]");
        assert_eq!(prompt_text(&json!({})), "");
    }

    #[test]
    fn inspect_reads_model_user_and_stream() {
        let mut h = HeaderMap::new();
        h.insert("x-session-id", HeaderValue::from_static("s1"));
        let i = inspect(br#"{"model": "m", "stream": true, "prompt": "p"}"#, &h, "x-session-id");
        assert_eq!((i.model.as_deref(), i.key.affinity.as_deref(), i.stream), (Some("m"), Some("s1"), true));
        let i = inspect(br#"{"model": "m", "user": "u9"}"#, &h, "x-session-id");
        assert_eq!(i.key.affinity.as_deref(), Some("u9"), "the body's user wins over the header");
        let i = inspect(b"not json", &HeaderMap::new(), "x-session-id");
        assert!(i.model.is_none() && i.key.affinity.is_none() && !i.stream);
    }
}
