//! The router on a fake engine: the engine loop is real, the executor replays a fixed reply, so the SSE
//! transcripts and JSON bodies are exact and snapshotted (`cargo insta review` after a deliberate change).
//!
//! The tokenizer and chat template are the default model's, so token ids and text are the real ones.
mod common;

use mlx_serving_engine::{
    EngineCore, Executor, ExecutorError, RequestId, RunnerOutput, SamplingParams, SchedulerOutput, TokenLogprobs,
};
use mlx_serving_models::{LoadOptions, ModelBundle};
use mlx_serving_runner::ModelExecutor;
use mlx_serving_server::AppState;
use mlx_serving_test_support::smollm2_path;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

const REPLY: &str = "Hello! How can I help you today?";

/// Replays `script` (then EOS) for every request. Prompts holding `fail_token` fail on their third step.
struct Scripted {
    script: Vec<u32>,
    eos: u32,
    fail_token: u32,
    seqs: HashMap<RequestId, (usize, Arc<SamplingParams>, bool)>,
}

impl Executor for Scripted {
    fn execute(&mut self, batch: &SchedulerOutput) -> Result<RunnerOutput, ExecutorError> {
        let mut out = RunnerOutput::default();
        for s in &batch.seqs {
            if let Some(new) = &s.new_request {
                let fails = new.prompt_token_ids.contains(&self.fail_token);
                self.seqs.insert(s.id, (0, new.params.clone(), fails));
            }
            if !s.sample {
                continue;
            }
            let (pos, params, fails) = self.seqs.get_mut(&s.id).ok_or_else(|| ExecutorError("unknown".into()))?;
            if *fails && *pos == 2 {
                return Err(ExecutorError("injected failure".into()));
            }
            let token = self.script.get(*pos).copied().unwrap_or(self.eos);
            let lp = -0.25 * (*pos as f32 + 1.0);
            if let Some(k) = params.logprobs {
                let top = (0..k).map(|j| (token + j, lp - j as f32)).collect();
                out.logprobs.insert(s.id, vec![TokenLogprobs { token, logprob: lp, top, ..Default::default() }]);
            }
            out.sampled.insert(s.id, vec![token]);
            *pos += 1;
        }
        Ok(out)
    }

    fn remove_request(&mut self, id: RequestId) {
        self.seqs.remove(&id);
    }
}

fn start() -> SocketAddr {
    let bundle = Arc::new(ModelBundle::load(smollm2_path(), &LoadOptions::default()).unwrap());
    let cfg = ModelExecutor::scheduler_config(&bundle, 16, 16 << 20);
    let exec = Scripted {
        script: bundle.encode(REPLY, false).unwrap(),
        eos: bundle.special_tokens.eog[0],
        fail_token: *bundle.encode(" boom", false).unwrap().last().unwrap(),
        seqs: HashMap::new(),
    };
    let (engine, _join) = EngineCore::spawn(cfg, exec);
    let state = Arc::new(AppState::new(engine, bundle, "smollm2".into()));
    common::serve(state)
}

/// POSTs `body` with a fixed `x-request-id` (so response ids are stable); returns status and body.
fn post(addr: SocketAddr, path: &str, body: &Value) -> (u16, String) {
    let (status, _, body) = common::request(addr, "POST", path, "x-request-id: snap\r\n", body.to_string().as_bytes());
    (status, body)
}

/// Zeroes `created` so the JSON is stable.
fn normalize(mut v: Value) -> Value {
    if v.get("created").is_some() {
        v["created"] = json!(0);
    }
    v
}

/// The SSE body as one line per event: `data: <normalized JSON>` or `data: [DONE]`.
fn transcript(body: &str) -> String {
    let mut lines = Vec::new();
    for event in body.split("\n\n").filter(|e| !e.trim().is_empty()) {
        let data = event.strip_prefix("data: ").unwrap_or_else(|| panic!("not a data event: {event:?}"));
        match serde_json::from_str::<Value>(data) {
            Ok(v) => lines.push(format!("data: {}", normalize(v))),
            Err(_) => lines.push(format!("data: {data}")),
        }
    }
    lines.join("\n") + "\n"
}

fn chat(extra: Value) -> Value {
    let mut v = json!({"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}], "stream": true});
    for (k, x) in extra.as_object().unwrap() {
        v[k] = x.clone();
    }
    v
}

#[test]
fn sse_transcripts() {
    let addr = start();
    let (st, body) = post(addr, "/v1/chat/completions", &chat(json!({"stream_options": {"include_usage": true}})));
    assert_eq!(st, 200, "{body}");
    insta::assert_snapshot!("chat_stream_with_usage", transcript(&body));

    let (st, body) = post(
        addr,
        "/v1/completions",
        &json!({"model": "smollm2", "prompt": "Say hello", "stream": true, "stop": [" can"], "max_tokens": 20}),
    );
    assert_eq!(st, 200, "{body}");
    insta::assert_snapshot!("completion_stream_stop_string", transcript(&body));

    let (st, body) = post(
        addr,
        "/v1/completions",
        &json!({"model": "smollm2", "prompt": "Say hello", "stream": true, "max_tokens": 3, "logprobs": 1, "return_token_ids": true}),
    );
    assert_eq!(st, 200, "{body}");
    insta::assert_snapshot!("completion_stream_logprobs_token_ids", transcript(&body));

    let (st, body) = post(
        addr,
        "/v1/completions",
        &json!({"model": "smollm2", "prompt": "Say hello", "stream": true, "echo": true, "max_tokens": 2}),
    );
    assert_eq!(st, 200, "{body}");
    insta::assert_snapshot!("completion_stream_echo", transcript(&body));

    let (st, body) =
        post(addr, "/v1/chat/completions", &chat(json!({"max_tokens": 4, "logprobs": true, "top_logprobs": 2})));
    assert_eq!(st, 200, "{body}");
    insta::assert_snapshot!("chat_stream_logprobs_length", transcript(&body));

    // Failure after the stream began: one error event, then the stream ends (no [DONE]).
    let (st, body) = post(
        addr,
        "/v1/chat/completions",
        &json!({"model": "smollm2", "messages": [{"role": "user", "content": "go boom"}], "stream": true}),
    );
    assert_eq!(st, 200, "{body}");
    insta::assert_snapshot!("chat_stream_error_mid_way", transcript(&body));
}

#[test]
fn json_bodies() {
    let addr = start();
    let (st, body) =
        post(addr, "/v1/chat/completions", &chat(json!({"stream": false, "n": 2, "return_token_ids": true})));
    assert_eq!(st, 200, "{body}");
    let v = normalize(serde_json::from_str(&body).unwrap());
    insta::assert_snapshot!("chat_n2_token_ids", serde_json::to_string_pretty(&v).unwrap());

    let (st, body) = post(
        addr,
        "/v1/completions",
        &json!({"model": "smollm2", "prompt": [1, 2, 3], "max_tokens": 3, "logprobs": 2}),
    );
    assert_eq!(st, 200, "{body}");
    let v = normalize(serde_json::from_str(&body).unwrap());
    insta::assert_snapshot!("completion_token_prompt_logprobs", serde_json::to_string_pretty(&v).unwrap());

    let (st, body) = post(
        addr,
        "/v1/chat/completions",
        &json!({"model": "smollm2", "messages": [{"role": "user", "content": "go boom"}]}),
    );
    assert_eq!(st, 500, "{body}");
    insta::assert_snapshot!("chat_engine_failure", body);
}
