//! One choice's output driver: engine outputs → incremental detokenizer → stop strings → pieces for the
//! response writer, with its metrics. It owns the choice's abort guard, so the engine request is aborted
//! as soon as the response side goes away, whether or not a token is due: a request abandoned while queued
//! or prefilling leaves the engine at once.

use crate::error::ApiError;
use crate::models::ModelLease;
use mlx_serving_engine::{EngineHandle, EngineOutput, FinishReason, RequestId, SamplingParams, TokenLogprobs};
use mlx_serving_frontend::stop::StopOutcome;
use mlx_serving_frontend::{IncrementalDetokenizer, StopMatcher, ToolCallParser, ToolEvent};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::mpsc;

/// Aborts the request in the engine when dropped before it finished (client gone, stop string hit).
pub(crate) struct AbortGuard {
    pub engine: EngineHandle,
    pub id: RequestId,
    pub finished: bool,
}

impl Drop for AbortGuard {
    fn drop(&mut self) {
        if !self.finished {
            self.engine.abort(self.id);
        }
    }
}

/// What an output driver yields for its choice.
#[derive(Clone)]
pub(crate) enum Piece {
    /// New text and the tokens (with logprobs, when asked for) consumed since the last piece.
    Text {
        index: usize,
        text: String,
        tokens: Vec<u32>,
        logprobs: Vec<TokenLogprobs>,
        /// Tool calls found (`ToolEvent::Start` and `Args` only; their text never reaches `text`).
        calls: Vec<ToolEvent>,
    },
    /// The prompt's logprobs (one per prompt token after the first), before the choice's first text, for
    /// requests that asked for them.
    Prompt {
        index: usize,
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

/// Turns one choice's engine outputs into pieces, and records its metrics.
pub(crate) struct Driver {
    /// The model, held until the choice is done.
    pub model: Arc<ModelLease>,
    pub index: usize,
    pub params: Arc<SamplingParams>,
    pub arrival: Instant,
    pub request_id: Arc<str>,
    /// The model's end-of-generation ids.
    pub eog: Arc<[u32]>,
    /// Chat with tools: the tool names, and the output is parsed for calls.
    pub tool_names: Option<Vec<String>>,
}

/// Tokens (and their logprobs) consumed since the last piece was sent.
#[derive(Default)]
struct Pending {
    tokens: Vec<u32>,
    logprobs: Vec<TokenLogprobs>,
}

impl Driver {
    /// Sends `text` with the pending tokens, through the tool-call parser when there is one (`last`: the
    /// output ends here, so the parser settles what it held); false when the HTTP side has gone away.
    async fn send(
        &self,
        out: &mpsc::Sender<Piece>,
        text: String,
        p: &mut Pending,
        tools: &mut Option<ToolCallParser>,
        last: bool,
    ) -> bool {
        let (text, calls) = match tools {
            None => (text, Vec::new()),
            Some(parser) => {
                let mut events = parser.push(&text);
                if last {
                    events.extend(parser.finish());
                }
                let mut content = String::new();
                let calls = events
                    .into_iter()
                    .filter_map(|e| match e {
                        ToolEvent::Text(t) => {
                            content.push_str(&t);
                            None
                        }
                        call => Some(call),
                    })
                    .collect();
                (content, calls)
            }
        };
        let piece = Piece::Text {
            index: self.index,
            text,
            tokens: std::mem::take(&mut p.tokens),
            logprobs: std::mem::take(&mut p.logprobs),
            calls,
        };
        out.send(piece).await.is_ok()
    }

    /// OpenAI's `tool_calls` finish reason for a choice that stopped after making calls.
    fn finish_reason(reason: &'static str, tools: &Option<ToolCallParser>) -> &'static str {
        match tools {
            Some(t) if reason == "stop" && !t.calls().is_empty() => "tool_calls",
            _ => reason,
        }
    }

    async fn done(&self, out: &mpsc::Sender<Piece>, reason: &'static str, generated: usize, cached: usize) {
        let m = &self.model.model().metrics;
        m.finished(reason);
        m.e2e.observe(self.arrival.elapsed());
        tracing::info!(choice = self.index, finish_reason = reason, generated, cached, "finished");
        let _ = out.send(Piece::Done { index: self.index, finish_reason: reason, generated, cached }).await;
    }

    /// Owns the abort guard: if the HTTP side goes away (the piece channel closes) or a stop string
    /// matches, dropping the unfinished guard aborts the engine request.
    pub async fn drive(
        self,
        mut rx: mpsc::UnboundedReceiver<EngineOutput>,
        mut guard: AbortGuard,
        out: mpsc::Sender<Piece>,
    ) {
        let model = self.model.model().clone();
        let m = &model.metrics;
        let mut detok = IncrementalDetokenizer::new(&model.bundle.tokenizer, true);
        let mut stop = StopMatcher::new(&self.params.stop);
        let min_tokens = self.params.min_tokens as usize;
        let (mut generated, mut cached) = (0usize, 0usize);
        let mut pending = Pending::default();
        let mut tools = self.tool_names.clone().map(ToolCallParser::new);
        let mut last = self.arrival;
        loop {
            let o = tokio::select! {
                o = rx.recv() => match o {
                    Some(o) => o,
                    None => return,
                },
                // The response side is gone (client disconnected, or the stream ended): drop the guard now,
                // which aborts the engine request wherever it is, instead of at its next token.
                _ = out.closed() => {
                    m.finished("abort");
                    return;
                }
            };
            if let Some(c) = o.num_cached_tokens {
                cached = c;
            }
            if let Some(err) = &o.error {
                guard.finished = true;
                m.failed.fetch_add(1, Ordering::Relaxed);
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
                if generated == 0 && self.params.prompt_logprobs.is_some() {
                    let piece = Piece::Prompt { index: self.index, logprobs: o.prompt_logprobs.clone() };
                    if out.send(piece).await.is_err() {
                        m.finished("abort");
                        return;
                    }
                }
                if generated == 0 {
                    m.ttft.observe(now - self.arrival);
                } else {
                    m.itl.observe(now - last);
                }
                last = now;
                m.generation_tokens.fetch_add(o.new_token_ids.len() as u64, Ordering::Relaxed);
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
                            && !self.send(&out, text, &mut pending, &mut tools, false).await
                        {
                            m.finished("abort");
                            return; // client gone: the guard aborts the request
                        }
                    }
                    StopOutcome::Stopped(text) => {
                        self.send(&out, text, &mut pending, &mut tools, true).await;
                        // The guard (not finished) aborts the engine request on drop.
                        self.done(&out, Self::finish_reason("stop", &tools), generated, cached).await;
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
                if !rest.is_empty() || !pending.tokens.is_empty() || tools.is_some() {
                    self.send(&out, rest, &mut pending, &mut tools, true).await;
                }
                self.done(&out, Self::finish_reason(finish, &tools), generated, cached).await;
                return;
            }
        }
    }
}
