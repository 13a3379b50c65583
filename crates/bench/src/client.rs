//! One streamed request against an OpenAI-compatible endpoint, timed event by event.

use serde_json::Value;
use std::time::{Duration, Instant};

/// How one request went. Times are measured from just before the request was sent.
#[derive(Clone, Debug, Default)]
pub struct Outcome {
    /// `None` when the request succeeded; else its kind: `http_<status>`, `connect`, `send` (the request
    /// could not be written, e.g. the server closed the connection), `timeout`,
    /// `stream_broken` (the stream ended without `[DONE]`), `stream_error` (an error event in the stream),
    /// `event_too_large` (more than `MAX_EVENT_BYTES` without an event's end).
    pub error: Option<String>,
    /// Time to the first event carrying output text.
    pub ttft: Option<Duration>,
    /// Gaps between successive events carrying output text.
    pub itl: Vec<Duration>,
    pub e2e: Duration,
    /// Output tokens: the server's `usage.completion_tokens` when it sent usage, else the number of events
    /// carrying text.
    pub output_tokens: usize,
    pub prompt_tokens: Option<usize>,
    /// True when `output_tokens` came from the server's usage.
    pub tokens_from_usage: bool,
}

/// Sends `body` (which must ask for `stream: true`) to `url` and follows the SSE stream to the end.
pub async fn stream_request(client: &reqwest::Client, url: &str, body: &Value, timeout: Duration) -> Outcome {
    let start = Instant::now();
    let mut out = Outcome::default();
    let run = follow(client, url, body, start, &mut out);
    match tokio::time::timeout(timeout, run).await {
        Ok(Ok(())) => {}
        Ok(Err(kind)) => out.error = Some(kind),
        Err(_) => out.error = Some("timeout".into()),
    }
    out.e2e = start.elapsed();
    out
}

async fn follow(
    client: &reqwest::Client,
    url: &str,
    body: &Value,
    start: Instant,
    out: &mut Outcome,
) -> Result<(), String> {
    let resp =
        client.post(url).header("content-type", "application/json").body(body.to_string()).send().await.map_err(
            |e| {
                if e.is_timeout() {
                    "timeout".to_string()
                } else if e.is_connect() {
                    "connect".to_string()
                } else {
                    "send".to_string()
                }
            },
        )?;
    let status = resp.status().as_u16();
    if !(200..300).contains(&status) {
        return Err(format!("http_{status}"));
    }
    let mut resp = resp;
    let mut reader = SseReader::default();
    loop {
        let chunk = match resp.chunk().await {
            Ok(Some(c)) => c,
            Ok(None) => return Err("stream_broken".into()),
            Err(_) => return Err("stream_broken".into()),
        };
        if reader.feed(&chunk, Instant::now(), start, out)? {
            return Ok(());
        }
    }
}

/// Largest event the client holds while waiting for its end (a blank line); a peer that sends more without
/// one ends the request with `event_too_large`.
pub const MAX_EVENT_BYTES: usize = 16 << 20;

/// Reads an SSE stream of OpenAI chunks, as the bytes arrive.
#[derive(Default)]
pub struct SseReader {
    buf: Vec<u8>,
    /// Bytes of `buf` already searched for an event's end.
    scanned: usize,
    last_text: Option<Instant>,
    text_events: usize,
}

impl SseReader {
    /// Takes the next bytes of the stream (received at `now`; the request began at `start`), recording
    /// into `out`; `Ok(true)` once `[DONE]` arrived, `Err(kind)` for an error event or an oversized event.
    pub fn feed(&mut self, chunk: &[u8], now: Instant, start: Instant, out: &mut Outcome) -> Result<bool, String> {
        self.buf.extend_from_slice(chunk);
        // Events end with a blank line; a chunk may hold several events or part of one.
        loop {
            // A separator may straddle the previous search's end: look again from 3 bytes before it.
            let from = self.scanned.saturating_sub(3);
            let Some((end, sep)) = find_event_end(&self.buf[from..]).map(|(e, s)| (from + e, s)) else {
                self.scanned = self.buf.len();
                if self.buf.len() > MAX_EVENT_BYTES {
                    return Err("event_too_large".into());
                }
                return Ok(false);
            };
            let event: Vec<u8> = self.buf.drain(..end + sep).collect();
            self.scanned = 0;
            if self.event(&String::from_utf8_lossy(&event[..end]), now, start, out)? {
                return Ok(true);
            }
        }
    }

    fn event(&mut self, event: &str, now: Instant, start: Instant, out: &mut Outcome) -> Result<bool, String> {
        for line in event.lines() {
            let Some(data) = line.strip_prefix("data:") else { continue };
            let data = data.trim();
            if data == "[DONE]" {
                if !out.tokens_from_usage {
                    out.output_tokens = self.text_events;
                }
                return Ok(true);
            }
            let Ok(v) = serde_json::from_str::<Value>(data) else { continue };
            if v.get("error").is_some() {
                return Err("stream_error".into());
            }
            if let Some(u) = v.get("usage").filter(|u| u.is_object()) {
                if let Some(c) = u.get("completion_tokens").and_then(Value::as_u64) {
                    out.output_tokens = usize::try_from(c).unwrap_or(usize::MAX);
                    out.tokens_from_usage = true;
                }
                out.prompt_tokens =
                    u.get("prompt_tokens").and_then(Value::as_u64).map(|p| usize::try_from(p).unwrap_or(usize::MAX));
            }
            if has_text(&v) {
                self.text_events += 1;
                match self.last_text {
                    None => out.ttft = Some(now.saturating_duration_since(start)),
                    Some(prev) => out.itl.push(now.saturating_duration_since(prev)),
                }
                self.last_text = Some(now);
            }
        }
        Ok(false)
    }
}

/// Fuzzing entry (`fuzz/`, and the regression tests that replay its finds): the stream in `data[1..]`, fed
/// in pieces of `data[0] % 61 + 1` bytes.
#[doc(hidden)]
pub fn fuzz_sse(data: &[u8]) {
    let Some((&k, rest)) = data.split_first() else { return };
    let (mut reader, mut out) = (SseReader::default(), Outcome::default());
    let start = Instant::now();
    for piece in rest.chunks(usize::from(k % 61) + 1) {
        match reader.feed(piece, Instant::now(), start, &mut out) {
            Ok(false) => {}
            Ok(true) | Err(_) => return,
        }
    }
}

/// The end of the first complete event in `buf` and the length of its separator.
fn find_event_end(buf: &[u8]) -> Option<(usize, usize)> {
    let lf = buf.windows(2).position(|w| w == b"\n\n").map(|i| (i, 2));
    let crlf = buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| (i, 4));
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(if a.0 < b.0 { a } else { b }),
        (a, b) => a.or(b),
    }
}

/// Whether a chunk carries output text: chat's `delta.content` or completions' `text`, non-empty.
fn has_text(v: &Value) -> bool {
    let Some(choices) = v.get("choices").and_then(Value::as_array) else { return false };
    choices.iter().any(|c| {
        let chat = c.get("delta").and_then(|d| d.get("content")).and_then(Value::as_str);
        let completion = c.get("text").and_then(Value::as_str);
        chat.or(completion).is_some_and(|t| !t.is_empty())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The same stream, cut into pieces of every size, reads the same; an event without an end is bounded.
    #[test]
    fn a_stream_reads_the_same_however_it_is_cut() {
        let stream = b"data: {\"choices\":[{\"text\":\"a\"}]}\r\n\r\n: keep-alive\n\ndata: {\"choices\":[{\"delta\":{\"content\":\"b\"}}]}\n\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":2}}\n\ndata: [DONE]\n\n";
        for size in 1..stream.len() {
            let (mut r, mut out, start) = (SseReader::default(), Outcome::default(), Instant::now());
            let done =
                stream.chunks(size).map(|c| r.feed(c, Instant::now(), start, &mut out)).find(|d| d != &Ok(false));
            assert_eq!(done, Some(Ok(true)), "pieces of {size}");
            assert_eq!((out.output_tokens, out.prompt_tokens, out.itl.len()), (2, Some(3), 1), "pieces of {size}");
            assert!(out.ttft.is_some());
        }
        let (mut r, mut out, start) = (SseReader::default(), Outcome::default(), Instant::now());
        let piece = vec![b'x'; 1 << 20];
        let ends: Vec<_> = (0..17).map(|_| r.feed(&piece, Instant::now(), start, &mut out)).collect();
        assert_eq!(ends.last(), Some(&Err("event_too_large".to_string())));
        assert!(ends[..16].iter().all(|e| e == &Ok(false)));
    }

    #[test]
    fn events_are_split_on_blank_lines_of_either_style() {
        assert_eq!(find_event_end(b"data: a\n\ndata: b"), Some((7, 2)));
        assert_eq!(find_event_end(b"data: a\r\n\r\n"), Some((7, 4)));
        assert_eq!(find_event_end(b"data: a\n"), None);
    }

    #[test]
    fn text_is_found_in_chat_and_completion_chunks() {
        assert!(has_text(&json!({"choices": [{"delta": {"content": "x"}}]})));
        assert!(has_text(&json!({"choices": [{"text": "x"}]})));
        assert!(!has_text(&json!({"choices": [{"delta": {"role": "assistant", "content": ""}}]})));
        assert!(!has_text(&json!({"choices": [], "usage": {"completion_tokens": 3}})));
    }
}
