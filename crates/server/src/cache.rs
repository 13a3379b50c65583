//! The response cache in the server (#22): a deterministic request's finished pieces stored under its sharing
//! key ([`crate::shared::key`]), and replayed through the same response writers on a hit, so a hit has the
//! shapes of a live answer (JSON or SSE) with a fresh `id` and `created`. Only whole answers are stored: every
//! choice done, none failed or aborted. An entry carries its full key and is checked against it on reading;
//! anything that does not decode is a miss.

use crate::driver::Piece;
use mlx_serving_engine::TokenLogprobs;
use mlx_serving_frontend::ToolEvent;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
struct Entry {
    key: String,
    pieces: Vec<Rec>,
}

#[derive(Serialize, Deserialize)]
enum Rec {
    Text { index: usize, text: String, tokens: Vec<u32>, logprobs: Vec<Lp>, calls: Vec<Call> },
    Done { index: usize, finish_reason: String, generated: usize, cached: usize },
}

#[derive(Serialize, Deserialize)]
struct Lp {
    token: u32,
    logprob: f32,
    top: Vec<(u32, f32)>,
}

#[derive(Serialize, Deserialize)]
enum Call {
    Text(String),
    Start { index: usize, name: String },
    Args { index: usize, delta: String },
}

/// The key an entry is stored under: a 128-bit hash of the sharing key (which the entry itself holds).
pub(crate) fn storage_key(key: &str) -> String {
    format!("mlx-serving:response:{:032x}", xxhash_rust::xxh3::xxh3_128(key.as_bytes()))
}

/// `pieces` as an entry, when they are a whole answer of `choices` choices (each one done, none failed).
pub(crate) fn encode(key: &str, pieces: &[Piece], choices: usize) -> Option<Vec<u8>> {
    let mut done = 0;
    let mut recs = Vec::with_capacity(pieces.len());
    for p in pieces {
        recs.push(match p {
            Piece::Text { index, text, tokens, logprobs, calls } => Rec::Text {
                index: *index,
                text: text.clone(),
                tokens: tokens.clone(),
                logprobs: logprobs
                    .iter()
                    .map(|l| Lp { token: l.token, logprob: l.logprob, top: l.top.clone() })
                    .collect(),
                calls: calls
                    .iter()
                    .map(|c| match c {
                        ToolEvent::Text(t) => Call::Text(t.clone()),
                        ToolEvent::Start { index, name } => Call::Start { index: *index, name: name.clone() },
                        ToolEvent::Args { index, delta } => Call::Args { index: *index, delta: delta.clone() },
                    })
                    .collect(),
            },
            Piece::Done { index, finish_reason, generated, cached } => {
                if *finish_reason == "abort" || *finish_reason == "error" {
                    return None;
                }
                done += 1;
                Rec::Done {
                    index: *index,
                    finish_reason: finish_reason.to_string(),
                    generated: *generated,
                    cached: *cached,
                }
            }
            // Prompt logprobs are not kept (such answers are not cached).
            Piece::Failed(_) | Piece::Prompt { .. } => return None,
        });
    }
    (done == choices).then(|| serde_json::to_vec(&Entry { key: key.to_string(), pieces: recs }).ok()).flatten()
}

/// The pieces of an entry stored for `key`; `None` when it is another key's or does not decode.
pub(crate) fn decode(key: &str, bytes: &[u8]) -> Option<Vec<Piece>> {
    let entry: Entry = serde_json::from_slice(bytes).ok()?;
    if entry.key != key {
        return None;
    }
    entry
        .pieces
        .into_iter()
        .map(|r| {
            Some(match r {
                Rec::Text { index, text, tokens, logprobs, calls } => Piece::Text {
                    index,
                    text,
                    tokens,
                    logprobs: logprobs
                        .into_iter()
                        .map(|l| TokenLogprobs { token: l.token, logprob: l.logprob, rank: 0, top: l.top })
                        .collect(),
                    calls: calls
                        .into_iter()
                        .map(|c| match c {
                            Call::Text(t) => ToolEvent::Text(t),
                            Call::Start { index, name } => ToolEvent::Start { index, name },
                            Call::Args { index, delta } => ToolEvent::Args { index, delta },
                        })
                        .collect(),
                },
                Rec::Done { index, finish_reason, generated, cached } => {
                    Piece::Done { index, finish_reason: finish_reason_str(&finish_reason)?, generated, cached }
                }
            })
        })
        .collect()
}

/// The stored finish reason as the static string the writers take.
fn finish_reason_str(s: &str) -> Option<&'static str> {
    ["stop", "length", "tool_calls"].into_iter().find(|r| *r == s)
}
