//! Forwarding one request: read and inspect the body (model, user, prompt text), pick an instance, send it
//! the same bytes, and pass the answer back chunk by chunk. A failure before any byte reached the client
//! (refused or timed-out connection, 5xx, 429) is retried on another instance within `max_retries`; a
//! stream whose instance dies mid-way ends with an SSE error event. Dropping the client's body drops the
//! instance's response, which closes that connection, which aborts the request there.

use crate::experiments::{bucket, FlagConfig, Sample};
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
/// The response header that names the experiment arm (`EXPERIMENT/ARM`) a request went to.
pub const ARM_HEADER: &str = "x-mlx-serving-arm";
/// The response header that lists the feature flags on for the request.
pub const FLAGS_HEADER: &str = "x-mlx-serving-flags";

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
    body: Value,
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
    // The prompt text is only read by cache_aware: filled in when that is the policy.
    Inspected { model, key: RouteKey { affinity, text: String::new() }, stream, body: v }
}

/// How many of the SSE events in `chunk` carry generated content (chat `delta.content`, tool calls or
/// reasoning; completion `text`): the opening role event and usage-only events do not. An event split
/// across chunks is not counted.
pub fn content_events(chunk: &[u8]) -> usize {
    let has = |v: &Value| {
        v.get("choices").and_then(Value::as_array).is_some_and(|cs| {
            cs.iter().any(|c| {
                let text = |x: Option<&Value>| x.and_then(Value::as_str).is_some_and(|t| !t.is_empty());
                let d = c.get("delta");
                text(c.get("text"))
                    || text(d.and_then(|d| d.get("content")))
                    || text(d.and_then(|d| d.get("reasoning_content")))
                    || d.and_then(|d| d.get("tool_calls")).is_some_and(|t| !t.is_null())
            })
        })
    };
    chunk
        .split(|&b| b == b'\n')
        .filter_map(|line| line.strip_prefix(b"data:"))
        .filter_map(|data| serde_json::from_slice::<Value>(data.trim_ascii()).ok())
        .filter(has)
        .count()
}

/// Where a request's outcome counts: an experiment's arm, a model's SLO.
#[derive(Clone, Copy, Debug, Default)]
struct Observe {
    arm: Option<(usize, usize)>,
    slo: Option<usize>,
}

impl Observe {
    fn any(&self) -> bool {
        self.arm.is_some() || self.slo.is_some()
    }

    fn record(&self, r: &Router, instance: Option<&str>, s: Sample) {
        if let Some((e, a)) = self.arm {
            r.experiments[e].record(a, s);
        }
        if let Some(k) = self.slo {
            r.slos[k].record(instance, s);
        }
    }
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
    let mut seen = inspect(&body, &parts.headers, &r.cfg.affinity_header);
    // Users key experiments and flags; a request without one is its own user.
    let user = seen
        .key
        .affinity
        .clone()
        .unwrap_or_else(|| format!("request-{}", r.metrics.anonymous.fetch_add(1, Ordering::Relaxed)));
    let flags: Vec<&FlagConfig> = r.cfg.flags.iter().filter(|f| bucket(&f.name, &user) < f.percent).collect();
    let exp = seen.model.as_ref().and_then(|m| r.experiments.iter().position(|e| &e.cfg.model == m));
    let arm = exp.map(|e| {
        let forced = flags.iter().find_map(|f| {
            let (x, a) = f.arm.as_deref()?.split_once('/')?;
            (x == r.experiments[e].cfg.name).then(|| r.experiments[e].arm_index(a)).flatten()
        });
        forced.unwrap_or_else(|| r.experiments[e].assign(&user))
    });
    let arm_model = exp.zip(arm).and_then(|(e, a)| r.experiments[e].arms[a].model.clone());
    let mut body = body;
    let sets = flags.iter().any(|f| !f.set.is_empty());
    if (sets || arm_model.is_some()) && seen.body.is_object() {
        let obj = seen.body.as_object_mut().expect("checked");
        for f in &flags {
            for (k, v) in &f.set {
                obj.insert(k.clone(), v.clone());
            }
        }
        if let Some(m) = &arm_model {
            obj.insert("model".into(), Value::String(m.clone()));
        }
        body = Bytes::from(serde_json::to_vec(&seen.body).unwrap_or_default());
    }
    let model = arm_model.clone().or(seen.model.clone());
    if let (Some(m), None) = (&model, exp) {
        if !r.pool.knows(m) {
            return error(StatusCode::NOT_FOUND, &format!("the model `{m}` does not exist"), "model_not_found");
        }
    }
    let mut tags = HeaderMap::new();
    if let (Some(e), Some(a)) = (exp, arm) {
        let name = format!("{}/{}", r.experiments[e].cfg.name, r.experiments[e].arms[a].name);
        if let Ok(v) = HeaderValue::from_str(&name) {
            tags.insert(ARM_HEADER, v);
        }
    }
    if !flags.is_empty() {
        let names: Vec<&str> = flags.iter().map(|f| f.name.as_str()).collect();
        if let Ok(v) = HeaderValue::from_str(&names.join(",")) {
            tags.insert(FLAGS_HEADER, v);
        }
    }
    let slo = seen.model.as_ref().and_then(|m| r.slos.iter().position(|s| &s.cfg.model == m));
    if let Some(k) = slo.filter(|&k| r.slos[k].shedding()) {
        if seen.body.get("priority").and_then(Value::as_str) == Some("low") {
            r.slos[k].shed.fetch_add(1, Ordering::Relaxed);
            let m = "the model is missing its service-level objective: low-priority requests are shed for now";
            let mut out = error(StatusCode::TOO_MANY_REQUESTS, m, "slo_shed");
            out.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            return out;
        }
    }
    let observe = Observe { arm: exp.zip(arm), slo };
    let outcome = |out: Response| {
        observe.record(&r, None, Sample { error: true, ..Sample::default() });
        out
    };
    let policy = seen.model.as_ref().and_then(|m| r.cfg.model_policies.get(m)).copied().unwrap_or(r.cfg.policy);
    if policy == crate::config::PolicyName::CacheAware {
        seen.key.text = prompt_text(&seen.body);
    }
    let arm_backends = observe.arm.map(|(e, a)| &r.experiments[e].arms[a].backends);
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str()).to_string();
    let mut headers = reqwest::header::HeaderMap::new();
    for (k, v) in parts.headers.iter().filter(|(k, _)| forwardable(k) && *k != header::CONTENT_LENGTH) {
        headers.append(k.clone(), v.clone());
    }
    let mut tried: Vec<String> = Vec::new();
    let mut failed: Option<Failed> = None;
    let mut sends = 0;
    while sends <= r.cfg.max_retries {
        let mut cands = r.pool.candidates(model.as_deref(), &tried);
        if let Some(urls) = arm_backends {
            cands.retain(|i| urls.contains(&i.url));
        }
        // Degraded instances (an SLO found them slower than their peers) get one request in ten.
        let degraded = |i: &Arc<crate::pool::Instance>| i.degraded.load(Ordering::Relaxed);
        if cands.iter().any(|i| !degraded(i)) && r.metrics.degraded_turn.fetch_add(1, Ordering::Relaxed) % 10 != 0 {
            cands.retain(|i| !degraded(i));
        }
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
        let mut resp = match sent {
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
            // Kept to pass on if no instance does better: its first 64 KiB (an error envelope is small).
            let mut body = Vec::new();
            while let Ok(Some(piece)) = resp.chunk().await {
                body.extend_from_slice(&piece[..piece.len().min((64 << 10) - body.len())]);
                if body.len() >= 64 << 10 {
                    break;
                }
            }
            let body = Bytes::from(body);
            failed = Some(Failed { status, headers, body });
            continue;
        }
        inst.record(true, &r.cfg.breaker);
        let observe = if status.is_success() { observe } else { Observe::default() };
        let mut out = pass_back(r.clone(), resp, guard, seen.stream, t0, observe);
        out.headers_mut().extend(tags);
        return out;
    }
    if let Some(f) = failed {
        let mut out = Response::new(Body::from(f.body));
        *out.status_mut() = f.status;
        copy_headers(&f.headers, out.headers_mut(), true);
        out.headers_mut().extend(tags);
        return outcome(out);
    }
    r.metrics.no_instance.fetch_add(1, Ordering::Relaxed);
    let what = seen.model.as_deref().map_or(String::new(), |m| format!(" for `{m}`"));
    let mut out = error(StatusCode::SERVICE_UNAVAILABLE, &format!("no instance available{what}"), "no_instance");
    out.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    out.headers_mut().extend(tags);
    outcome(out)
}

fn copy_headers(from: &HeaderMap, to: &mut HeaderMap, keep_length: bool) {
    for (k, v) in from.iter().filter(|(k, _)| forwardable(k) && (keep_length || *k != header::CONTENT_LENGTH)) {
        to.append(k.clone(), v.clone());
    }
}

/// The instance's answer as the client's, chunk by chunk; with `observe` (experiment, arm), the answer's
/// times (or its failure) count for that arm when it ends (not when the client leaves first).
fn pass_back(
    r: Arc<Router>,
    resp: reqwest::Response,
    guard: InFlight,
    stream: bool,
    t0: Instant,
    observe: Observe,
) -> Response {
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
        /// The first chunk's arrival (the instance's time to first byte).
        first_byte: bool,
        /// Stream events with content: the first's and the last's arrival, and how many (observed only).
        first: Option<Instant>,
        last: Instant,
        events: usize,
        done: bool,
    }
    let st = St { resp, guard, first_byte: true, first: None, last: t0, events: 0, done: false };
    let body = futures_util::stream::unfold(st, move |mut st| {
        let r = r.clone();
        async move {
            if st.done {
                return None;
            }
            match st.resp.chunk().await {
                Ok(Some(b)) => {
                    let now = Instant::now();
                    if std::mem::take(&mut st.first_byte) {
                        let s = &st.guard.0.stats;
                        s.ttfb_us_sum.fetch_add((now - t0).as_micros() as u64, Ordering::Relaxed);
                        s.ttfb_count.fetch_add(1, Ordering::Relaxed);
                    }
                    if observe.any() {
                        let n = if sse { content_events(&b) } else { 1 };
                        if n > 0 {
                            st.first.get_or_insert(now);
                            st.last = now;
                            st.events += n;
                        }
                    }
                    Some((Ok::<Bytes, std::io::Error>(b), st))
                }
                Ok(None) => {
                    if observe.any() {
                        let first = st.first.unwrap_or(st.last);
                        let itl =
                            (sse && st.events >= 2).then(|| (st.last - first).as_secs_f64() / (st.events - 1) as f64);
                        let sample = Sample { ttft: Some((first - t0).as_secs_f64()), itl, error: false };
                        observe.record(&r, Some(&st.guard.0.url), sample);
                    }
                    None
                }
                Err(e) => {
                    st.done = true;
                    observe.record(&r, Some(&st.guard.0.url), Sample { error: true, ..Sample::default() });
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
    fn content_events_skip_the_opening_and_usage() {
        let role = br#"data: {"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}"#;
        assert_eq!(content_events(role), 0);
        let two = b"data: {\"choices\":[{\"delta\":{\"content\":\"Hi\"}}]}\n\ndata: {\"choices\":[{\"text\":\" there\"}]}\n\n";
        assert_eq!(content_events(two), 2);
        let usage = b"data: {\"choices\":[],\"usage\":{\"completion_tokens\":3}}\n\ndata: [DONE]\n\n";
        assert_eq!(content_events(usage), 0);
        let tool = br#"data: {"choices":[{"delta":{"tool_calls":[{"index":0}]}}]}"#;
        assert_eq!(content_events(tool), 1);
        assert_eq!(content_events(b"data: {\"choices\":[{\"delta\":{\"content\":\"cut"), 0);
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
