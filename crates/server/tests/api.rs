//! The HTTP API on the real default model: a table of bad requests, each with its status and error fields,
//! after which the server still serves; and client disconnects free the engine.

mod common;

use mlx_serving_engine::{EngineCore, EngineHandle};
use mlx_serving_models::{LoadOptions, ModelBundle};
use mlx_serving_runner::ModelExecutor;
use mlx_serving_server::{AppState, ServerOptions};
use mlx_serving_test_support::smollm2_path;
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn start() -> (SocketAddr, EngineHandle) {
    start_with(ServerOptions::default())
}

fn start_with(options: ServerOptions) -> (SocketAddr, EngineHandle) {
    let bundle = Arc::new(ModelBundle::load(smollm2_path(), &LoadOptions::default()).unwrap());
    let mut cfg = ModelExecutor::scheduler_config(&bundle, 16, 64 << 20);
    cfg.max_num_seqs = 8;
    let exec = ModelExecutor::new(bundle.clone(), cfg.block_size, cfg.num_blocks);
    let (engine, _join) = EngineCore::spawn(cfg, exec);
    let state = Arc::new(AppState::with_options(engine.clone(), bundle, "smollm2".into(), options));
    let addr = common::serve(state);
    (addr, engine)
}

/// One HTTP/1.1 request with `Connection: close`; returns (status, body).
fn http(addr: SocketAddr, method: &str, path: &str, body: &[u8]) -> (u16, String) {
    let (status, _, body) = common::request(addr, method, path, "", body);
    (status, body)
}

/// (name, path, body, status, param, code)
type Case<'a> = (&'a str, &'a str, Value, u16, Option<&'a str>, Option<&'a str>);

fn post(addr: SocketAddr, path: &str, v: &Value) -> (u16, Value) {
    let (status, body) = http(addr, "POST", path, v.to_string().as_bytes());
    (status, serde_json::from_str(&body).unwrap_or(Value::String(body)))
}

#[test]
fn bad_requests_get_the_right_status_and_error_then_the_server_still_serves() {
    let (addr, _engine) = start();
    let ok_completion =
        json!({"model": "smollm2", "prompt": "The capital of France is", "max_tokens": 2, "temperature": 0});
    let with = |k: &str, v: Value| {
        let mut r = ok_completion.clone();
        r[k] = v;
        r
    };
    let chat = |messages: Value| json!({"model": "smollm2", "messages": messages, "max_tokens": 2});
    let thousand_stops: Vec<String> = (0..1000).map(|i| format!("s{i}")).collect();
    // (name, path, body, status, param, code)
    let cases: Vec<Case> = vec![
        ("wrong type", "/v1/completions", with("max_tokens", json!("ten")), 400, Some("max_tokens"), None),
        ("huge number", "/v1/completions", with("max_tokens", json!(1e30)), 400, Some("max_tokens"), None),
        ("negative max_tokens", "/v1/completions", with("max_tokens", json!(-5)), 400, Some("max_tokens"), None),
        (
            "context overflow",
            "/v1/completions",
            with("max_tokens", json!(100_000)),
            400,
            Some("max_tokens"),
            Some("context_length_exceeded"),
        ),
        (
            "more than the KV cache holds",
            "/v1/completions",
            with("max_tokens", json!(8000)),
            400,
            Some("max_tokens"),
            None,
        ),
        (
            "unknown model",
            "/v1/completions",
            with("model", json!("gpt-9")),
            404,
            Some("model"),
            Some("model_not_found"),
        ),
        ("unknown field", "/v1/completions", with("best_of", json!(3)), 400, Some("best_of"), None),
        ("temperature out of range", "/v1/completions", with("temperature", json!(9)), 400, Some("temperature"), None),
        ("top_p zero", "/v1/completions", with("top_p", json!(0)), 400, Some("top_p"), None),
        ("stop list of 1000", "/v1/completions", with("stop", json!(thousand_stops)), 400, Some("stop"), None),
        (
            "logit_bias out of vocab",
            "/v1/completions",
            with("logit_bias", json!({"999999": 5})),
            400,
            Some("logit_bias"),
            None,
        ),
        ("logit_bias bad key", "/v1/completions", with("logit_bias", json!({"abc": 5})), 400, Some("logit_bias"), None),
        ("empty prompt", "/v1/completions", with("prompt", json!("")), 400, Some("prompt"), None),
        ("empty prompt list", "/v1/completions", with("prompt", json!([])), 400, Some("prompt"), None),
        ("mixed prompt list", "/v1/completions", with("prompt", json!(["a", 5])), 400, Some("prompt"), None),
        ("prompt object", "/v1/completions", with("prompt", json!({"text": "a"})), 400, Some("prompt"), None),
        ("too many prompts", "/v1/completions", with("prompt", json!(vec!["a"; 65])), 400, Some("prompt"), None),
        (
            "too many completions",
            "/v1/completions",
            json!({"model": "smollm2", "prompt": vec!["a"; 8], "n": 9, "max_tokens": 1}),
            400,
            Some("prompt"),
            None,
        ),
        (
            "token id out of vocab",
            "/v1/completions",
            with("prompt", json!([1, 2, 99999999])),
            400,
            Some("prompt"),
            None,
        ),
        ("bad priority", "/v1/completions", with("priority", json!("urgent")), 400, Some("priority"), None),
        ("n too large", "/v1/completions", with("n", json!(17)), 400, Some("n"), None),
        ("n zero", "/v1/completions", with("n", json!(0)), 400, Some("n"), None),
        ("negative min_tokens", "/v1/completions", with("min_tokens", json!(-1)), 400, Some("min_tokens"), None),
        ("min_tokens over max_tokens", "/v1/completions", with("min_tokens", json!(5)), 400, Some("min_tokens"), None),
        ("logprobs too many", "/v1/completions", with("logprobs", json!(21)), 400, Some("logprobs"), None),
        ("logprobs wrong type", "/v1/completions", with("logprobs", json!(true)), 400, Some("logprobs"), None),
        (
            "prompt_logprobs too many",
            "/v1/completions",
            with("prompt_logprobs", json!(21)),
            400,
            Some("prompt_logprobs"),
            None,
        ),
        (
            "prompt_logprobs wrong type",
            "/v1/completions",
            with("prompt_logprobs", json!("x")),
            400,
            Some("prompt_logprobs"),
            None,
        ),
        (
            "top_logprobs without logprobs",
            "/v1/chat/completions",
            json!({"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}),
            400,
            Some("top_logprobs"),
            None,
        ),
        (
            "top_logprobs too many",
            "/v1/chat/completions",
            json!({"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], "logprobs": true, "top_logprobs": 50}),
            400,
            Some("top_logprobs"),
            None,
        ),
        ("empty messages", "/v1/chat/completions", chat(json!([])), 400, Some("messages"), None),
        (
            "bad role",
            "/v1/chat/completions",
            chat(json!([{"role": "wizard", "content": "hi"}])),
            400,
            Some("messages"),
            None,
        ),
        ("missing messages", "/v1/chat/completions", json!({"model": "smollm2"}), 400, Some("messages"), None),
    ];
    for (name, path, body, status, param, code) in cases {
        let (got, v) = post(addr, path, &body);
        assert_eq!(got, status, "{name}: {v}");
        let err = &v["error"];
        assert!(err["message"].is_string() && err["type"].is_string(), "{name}: not an OpenAI error envelope: {v}");
        assert_eq!(err["param"].as_str(), param, "{name}: {v}");
        if let Some(c) = code {
            assert_eq!(err["code"].as_str(), Some(c), "{name}: {v}");
        }
    }
    // Raw bodies: malformed JSON, invalid UTF-8, deep nesting, 10 MB.
    let deep = "[".repeat(100_000);
    let big = format!("{{\"model\":\"smollm2\",\"prompt\":\"{}\"}}", "a".repeat(10 << 20));
    let raw: Vec<(&str, Vec<u8>, u16)> = vec![
        ("malformed json", b"{\"model\": ".to_vec(), 400),
        ("invalid utf-8", b"{\"model\": \"\xff\xfe\"}".to_vec(), 400),
        ("deep nesting", deep.into_bytes(), 400),
        ("10 MB body", big.into_bytes(), 413),
    ];
    for (name, body, status) in raw {
        let (got, text) = http(addr, "POST", "/v1/completions", &body);
        assert_eq!(got, status, "{name}: {text}");
        let v: Value = serde_json::from_str(&text).unwrap_or_else(|_| panic!("{name}: not JSON: {text}"));
        assert!(v["error"]["message"].is_string(), "{name}: {v}");
    }
    let (got, v) = http(addr, "GET", "/v1/nothing", b"");
    assert_eq!(got, 404, "{v}");
    // Still serving, with the reference tokens.
    let (got, v) = post(addr, "/v1/completions", &ok_completion);
    assert_eq!(got, 200, "{v}");
    assert_eq!(v["choices"][0]["text"], " Paris.");
    let (got, v) = http(addr, "GET", "/health", b"");
    assert_eq!(got, 200, "{v}");
    let h: serde_json::Value = serde_json::from_str(&v).unwrap();
    assert_eq!((h["running"].as_u64(), h["waiting"].as_u64()), (Some(0), Some(0)), "the load, idle: {v}");
}

#[test]
fn dropped_streams_free_the_engine() {
    let (addr, engine) = start();
    let body = json!({"model": "smollm2", "prompt": "Once upon a time", "max_tokens": 150, "ignore_eos": true, "stream": true}).to_string();
    let mut conns = Vec::new();
    for _ in 0..8 {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
        let head = format!("POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len());
        s.write_all(head.as_bytes()).unwrap();
        conns.push(s);
    }
    // Wait until every stream has produced some output, then hang up.
    for s in conns.iter_mut() {
        let mut buf = [0u8; 2048];
        let mut seen = Vec::new();
        while !String::from_utf8_lossy(&seen).contains("\"text\"") {
            let n = s.read(&mut buf).unwrap();
            assert!(n > 0, "stream closed early");
            seen.extend_from_slice(&buf[..n]);
        }
    }
    let st = engine.stats();
    assert!(
        st.running.load(Ordering::SeqCst) > 0,
        "streams are running: waiting {} running {} steps {} failed steps {} kv {}",
        st.waiting.load(Ordering::SeqCst),
        st.running.load(Ordering::SeqCst),
        st.steps.load(Ordering::SeqCst),
        st.failed_steps.load(Ordering::SeqCst),
        st.kv_usage_ppm.load(Ordering::SeqCst)
    );
    drop(conns);
    // The engine notices at its next output for each request; wait for that (bounded), not for a fixed time.
    let deadline = Instant::now() + Duration::from_secs(60);
    while engine.stats().running.load(Ordering::SeqCst) > 0 || engine.stats().kv_usage_ppm.load(Ordering::SeqCst) > 0 {
        assert!(Instant::now() < deadline, "engine still busy after the clients left");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn tokenize_and_detokenize_round_trip() {
    let (addr, _engine) = start();
    let (st, v) = post(addr, "/tokenize", &json!({"model": "smollm2", "prompt": "The capital of France is"}));
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["tokens"], json!([504, 3575, 282, 4649, 314]), "the reference prompt ids");
    assert_eq!(v["count"], 5);
    let (st, v) = post(addr, "/detokenize", &json!({"tokens": [504, 3575, 282, 4649, 314]}));
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["prompt"], "The capital of France is");
    let (st, v) =
        post(addr, "/tokenize", &json!({"messages": [{"role": "user", "content": "What is the capital of France?"}]}));
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["count"], 37, "chat template applied: {v}");
    assert_eq!(v["tokens"][0], 1, "starts with <|im_start|>: {v}");
    let (st, v) = post(addr, "/detokenize", &json!({"tokens": [1, -4]}));
    assert_eq!((st, v["error"]["param"].as_str()), (400, Some("tokens")), "{v}");
    let (st, v) = post(addr, "/tokenize", &json!({"prompt": "a", "messages": []}));
    assert_eq!(st, 400, "{v}");
    let (st, v) = post(addr, "/tokenize", &json!({"model": "other", "prompt": "a"}));
    assert_eq!(st, 404, "{v}");
}

/// The extensions and the less common fields, on the real model: n, logprobs, echo, return_token_ids,
/// min_tokens, and the metrics they leave behind.
#[test]
fn choices_logprobs_echo_token_ids_and_metrics() {
    let (addr, _engine) = start();
    let prompt = "The capital of France is";
    // n = 2, seeded: two different samples, reproducible as a set.
    let req = json!({"model": "smollm2", "prompt": prompt, "max_tokens": 8, "n": 2, "seed": 11, "temperature": 1.0, "ignore_eos": true});
    let (st, a) = post(addr, "/v1/completions", &req);
    assert_eq!(st, 200, "{a}");
    let (_, b) = post(addr, "/v1/completions", &req);
    let texts = |v: &Value| -> Vec<String> {
        v["choices"].as_array().unwrap().iter().map(|c| c["text"].as_str().unwrap().to_string()).collect()
    };
    assert_eq!(texts(&a), texts(&b), "same seed, same choices");
    assert_eq!(a["choices"][1]["index"], 1);
    assert_ne!(texts(&a)[0], texts(&a)[1], "the two choices draw different streams");
    assert_eq!(a["usage"]["completion_tokens"], 16, "{a}");
    assert_eq!(a["usage"]["prompt_tokens"], 5, "prompt counted once: {a}");

    // Greedy logprobs: the chosen token is the most likely one, the alternatives are sorted.
    let (st, v) = post(
        addr,
        "/v1/completions",
        &json!({"model": "smollm2", "prompt": prompt, "max_tokens": 3, "temperature": 0, "logprobs": 3, "return_token_ids": true}),
    );
    assert_eq!(st, 200, "{v}");
    let lp = &v["choices"][0]["logprobs"];
    assert_eq!(lp["tokens"].as_array().unwrap().len(), 3, "{v}");
    assert_eq!(lp["tokens"][0], " Paris", "{v}");
    let first = lp["token_logprobs"][0].as_f64().unwrap();
    assert!(first < 0.0 && first > -1.0, "{v}");
    let top0 = lp["top_logprobs"][0].as_object().unwrap();
    assert!(top0.len() >= 3 && top0.values().all(|x| x.as_f64().unwrap() <= first + 1e-6), "{v}");
    assert_eq!(lp["text_offset"], json!([0, 6, 7]), "{v}");
    assert_eq!(v["prompt_token_ids"], json!([504, 3575, 282, 4649, 314]), "{v}");
    assert_eq!(v["choices"][0]["token_ids"].as_array().unwrap().len(), 3, "{v}");
    let joined: String = lp["tokens"].as_array().unwrap().iter().map(|t| t.as_str().unwrap()).collect();
    assert_eq!(joined, v["choices"][0]["text"].as_str().unwrap());

    // Chat logprobs shape.
    let (st, v) = post(
        addr,
        "/v1/chat/completions",
        &json!({"model": "smollm2", "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 2, "logprobs": true, "top_logprobs": 2}),
    );
    assert_eq!(st, 200, "{v}");
    let content = v["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(content.len(), 2, "{v}");
    assert_eq!(content[0]["top_logprobs"].as_array().unwrap().len(), 2, "{v}");
    assert!(content[0]["bytes"].is_array() && content[0]["token"].is_string(), "{v}");

    // A batch of prompts, as strings and as token-id lists: choice i answers prompt i / n.
    let (st, v) = post(
        addr,
        "/v1/completions",
        &json!({"model": "smollm2", "prompt": [prompt, "1, 2, 3,"], "max_tokens": 2, "temperature": 0, "n": 2}),
    );
    assert_eq!(st, 200, "{v}");
    assert_eq!(texts(&v), vec![" Paris.", " Paris.", " 4", " 4"], "{v}");
    assert_eq!(v["usage"]["prompt_tokens"], 5 + 8, "{v}");
    let (st, v) = post(
        addr,
        "/v1/completions",
        &json!({"model": "smollm2", "prompt": [[504, 3575, 282, 4649, 314], [504]], "max_tokens": 2, "temperature": 0, "echo": true, "return_token_ids": true}),
    );
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["choices"][0]["text"], "The capital of France is Paris.", "{v}");
    assert!(v["choices"][1]["text"].as_str().unwrap().starts_with("The"), "{v}");
    assert_eq!(v["prompt_token_ids"], json!([[504, 3575, 282, 4649, 314], [504]]), "{v}");

    // Echo puts the prompt in front.
    let (st, v) = post(
        addr,
        "/v1/completions",
        &json!({"model": "smollm2", "prompt": prompt, "max_tokens": 2, "temperature": 0, "echo": true}),
    );
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["choices"][0]["text"], "The capital of France is Paris.", "{v}");

    // min_tokens holds EOS back: this chat would otherwise end after a few tokens.
    let chat = |min: u32| json!({"model": "smollm2", "messages": [{"role": "user", "content": "Reply with one word: yes or no?"}], "max_tokens": 40, "temperature": 0, "min_tokens": min, "return_token_ids": true});
    let (_, short) = post(addr, "/v1/chat/completions", &chat(0));
    let n0 = short["usage"]["completion_tokens"].as_u64().unwrap();
    assert_eq!(short["choices"][0]["finish_reason"], "stop", "{short}");
    let token_ids = |v: &serde_json::Value| -> Vec<u64> {
        v["choices"][0]["token_ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).collect()
    };
    // <|im_end|> (id 2) ended the short answer; with min_tokens the sampler must not produce it early.
    assert_eq!(token_ids(&short).last(), Some(&2), "{short}");
    let (_, long) = post(addr, "/v1/chat/completions", &chat(n0 as u32 + 5));
    assert!(long["usage"]["completion_tokens"].as_u64().unwrap() >= n0 + 5, "{short} vs {long}");
    let early = &token_ids(&long)[..n0 as usize + 5];
    assert!(!early.contains(&2), "end of turn within min_tokens: {long}");

    // The metrics saw all of it.
    let (st, text) = http(addr, "GET", "/metrics", b"");
    assert_eq!(st, 200);
    let value = |name: &str| -> f64 {
        let line = text.lines().find(|l| l.starts_with(name)).unwrap_or_else(|| panic!("no {name} in {text}"));
        line.rsplit(' ').next().unwrap().parse().unwrap()
    };
    assert!(
        value("mlx_serving:generation_tokens_total{model_name=\"smollm2\"}") >= 16.0 + 16.0 + 3.0 + 2.0 + 8.0 + 4.0
    );
    assert!(value("mlx_serving:prompt_tokens_total{model_name=\"smollm2\"}") >= 5.0 * 5.0);
    assert!(value("mlx_serving:request_success_total{model_name=\"smollm2\",finished_reason=\"length\"}") >= 7.0);
    assert!(value("mlx_serving:request_success_total{model_name=\"smollm2\",finished_reason=\"stop\"}") >= 1.0);
    assert!(value("mlx_serving:time_to_first_token_seconds_count{model_name=\"smollm2\"}") >= 8.0);
    assert!(value("mlx_serving:prefix_cache_queries{model_name=\"smollm2\"}") > 0.0);
    // The gauge is the engine loop's snapshot, published at its next iteration: wait for it (bounded).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, text) = http(addr, "GET", "/metrics", b"");
        let line = text.lines().find(|l| l.starts_with("mlx_serving:num_requests_running{")).unwrap().to_string();
        if line.ends_with(" 0") {
            break;
        }
        assert!(Instant::now() < deadline, "requests still running after every response: {line}");
        std::thread::sleep(Duration::from_millis(20));
    }
    for name in [
        "inter_token_latency_seconds_bucket",
        "e2e_request_latency_seconds_sum",
        "kv_cache_usage_perc",
        "prefix_cache_hits",
        "num_requests_waiting",
    ] {
        assert!(text.contains(&format!("mlx_serving:{name}")), "{name} missing");
    }
}

/// #25: `max_prompt_tokens` and `max_tokens_per_request` (`max_tokens` × choices) are enforced before any
/// work starts, with the field named; a request without `max_tokens` has its default lowered to fit.
#[test]
fn prompt_and_request_token_limits() {
    let (addr, engine) = start_with(ServerOptions {
        max_prompt_tokens: Some(64),
        max_tokens_per_request: Some(40),
        ..ServerOptions::default()
    });
    // 100 KB: its lower bound from bytes alone is past 64, so it is refused before tokenizing ("at least").
    let long = "word ".repeat(20_000);
    // 90 bytes: the bound from bytes is under 64 but the count is not, so it is refused after tokenizing.
    let digits = "1 2 3 4 5 6 7 8 9 ".repeat(5);
    for (path, body, field, before) in [
        ("/v1/completions", json!({"model": "smollm2", "prompt": long, "max_tokens": 1}), "prompt", true),
        (
            "/v1/chat/completions",
            json!({"model": "smollm2", "messages": [{"role": "user", "content": long}], "max_tokens": 1}),
            "messages",
            true,
        ),
        ("/v1/completions", json!({"model": "smollm2", "prompt": digits, "max_tokens": 1}), "prompt", false),
        (
            "/v1/chat/completions",
            json!({"model": "smollm2", "messages": [{"role": "user", "content": digits}], "max_tokens": 1}),
            "messages",
            false,
        ),
    ] {
        let (st, v) = post(addr, path, &body);
        assert_eq!(st, 400, "{path}: {v}");
        assert_eq!(v["error"]["code"], "prompt_too_long", "{v}");
        assert_eq!(v["error"]["param"], field, "{v}");
        let msg = v["error"]["message"].as_str().unwrap();
        assert_eq!(msg.contains("has at least"), before, "{path}: {msg}");
    }
    let (st, v) = post(addr, "/v1/completions", &json!({"model": "smollm2", "prompt": "Hi", "max_tokens": 30}));
    assert_eq!(st, 200, "30 tokens for one choice fit 40: {v}");
    let (st, v) = post(addr, "/v1/completions", &json!({"model": "smollm2", "prompt": "Hi", "max_tokens": 30, "n": 2}));
    assert_eq!((st, &v["error"]["code"], &v["error"]["param"]), (400, &json!("too_many_tokens"), &json!("max_tokens")));
    let (st, v) = post(addr, "/v1/completions", &json!({"model": "smollm2", "prompt": ["Hi", "Yo"], "max_tokens": 21}));
    assert_eq!((st, &v["error"]["code"]), (400, &json!("too_many_tokens")), "2 prompts × 21 > 40: {v}");
    // Chat's default (up to 4096) is lowered to 40 / 4 = 10 tokens per choice.
    let (st, v) = post(
        addr,
        "/v1/chat/completions",
        &json!({"model": "smollm2", "messages": [{"role": "user", "content": "Tell a long story"}], "n": 4,
                "ignore_eos": true, "temperature": 0}),
    );
    assert_eq!(st, 200, "{v}");
    for c in v["choices"].as_array().unwrap() {
        assert_eq!(c["finish_reason"], "length", "{c}");
    }
    assert_eq!(v["usage"]["completion_tokens"], 40, "{v}");
    assert!(engine.stats().running.load(std::sync::atomic::Ordering::SeqCst) == 0);
}

#[test]
fn api_keys_guard_the_api_and_request_ids_come_back() {
    let (addr, _engine) = start_with(ServerOptions { api_keys: vec!["sk-test".into()], ..ServerOptions::default() });
    let send = |auth: Option<&str>, extra: &str| -> String {
        let auth = auth.map(|a| format!("Authorization: {a}\r\n")).unwrap_or_default();
        common::exchange(
            addr,
            &format!("GET /v1/models HTTP/1.1\r\nHost: t\r\n{auth}{extra}Connection: close\r\n\r\n"),
            b"",
        )
    };
    let missing = send(None, "");
    assert!(missing.starts_with("HTTP/1.1 401"), "{missing}");
    assert!(missing.contains("\"code\":\"invalid_api_key\""), "{missing}");
    assert!(send(Some("Bearer wrong"), "").starts_with("HTTP/1.1 401"));
    let ok = send(Some("Bearer sk-test"), "x-request-id: abc-123\r\n");
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
    assert!(ok.to_ascii_lowercase().contains("x-request-id: abc-123"), "the client's id is echoed: {ok}");
    let made = send(Some("bearer sk-test"), "");
    assert!(made.to_ascii_lowercase().contains("x-request-id: "), "{made}");
    // Health and metrics stay open.
    assert_eq!(http(addr, "GET", "/health", b"").0, 200);
    assert_eq!(http(addr, "GET", "/metrics", b"").0, 200);
}

#[test]
fn cors_preflight_and_request_timeouts() {
    let (addr, _engine) = start_with(ServerOptions {
        cors_allowed_origins: vec!["http://localhost:3000".into()],
        request_timeout: Some(Duration::from_millis(300)),
        ..ServerOptions::default()
    });
    let send = |head: &str| common::exchange(addr, head, b"").to_ascii_lowercase();
    let pre = send("OPTIONS /v1/chat/completions HTTP/1.1\r\nHost: t\r\nOrigin: http://localhost:3000\r\nAccess-Control-Request-Method: POST\r\nAccess-Control-Request-Headers: authorization, content-type\r\nConnection: close\r\n\r\n");
    assert!(pre.starts_with("http/1.1 200"), "{pre}");
    assert!(pre.contains("access-control-allow-origin: http://localhost:3000"), "{pre}");
    let other = send("OPTIONS /v1/models HTTP/1.1\r\nHost: t\r\nOrigin: http://evil.example\r\nAccess-Control-Request-Method: GET\r\nConnection: close\r\n\r\n");
    assert!(!other.contains("access-control-allow-origin"), "{other}");
    // 300 ms is far too short for 500 tokens: the request ends with a timeout error, and the engine is free.
    let (st, v) = post(
        addr,
        "/v1/completions",
        &json!({"model": "smollm2", "prompt": "Once upon a time", "max_tokens": 500, "ignore_eos": true}),
    );
    assert_eq!((st, v["error"]["code"].as_str()), (504, Some("timeout")), "{v}");
    let (st, v) = post(addr, "/v1/completions", &json!({"model": "smollm2", "prompt": "Hi", "max_tokens": 1}));
    assert_eq!(st, 200, "{v}");
}

/// `GET /openapi.json` documents exactly the routes the router serves (read from its source), and every
/// documented request body is a schema of the types the handlers deserialize: an unknown field is refused by
/// the schema (`additionalProperties: false`) as by the server.
#[test]
fn openapi_documents_every_route() {
    let src = include_str!("../src/lib.rs");
    let routed: std::collections::BTreeSet<String> =
        src.split(".route(\"").skip(1).map(|r| r.split('"').next().unwrap().to_string()).collect();
    let (addr, _engine) = start();
    let (status, body) = http(addr, "GET", "/openapi.json", b"");
    assert_eq!(status, 200);
    let doc: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(doc["openapi"], "3.1.0");
    let documented: std::collections::BTreeSet<String> = doc["paths"].as_object().unwrap().keys().cloned().collect();
    assert_eq!(routed, documented, "routes served vs documented");
    let schemas = &doc["components"]["schemas"];
    for name in ["CompletionRequest", "ChatCompletionRequest", "ChatMessage", "TokenizeRequest", "Registration"] {
        assert_eq!(schemas[name]["additionalProperties"], false, "{name} refuses unknown fields: {}", schemas[name]);
    }
    let completion = &schemas["CompletionRequest"]["properties"];
    for field in ["prompt", "max_tokens", "echo", "logprobs", "prompt_logprobs", "return_token_ids", "response_format"]
    {
        assert!(completion.get(field).is_some(), "CompletionRequest documents `{field}`");
    }
    assert_eq!(schemas["CompletionRequest"]["required"], json!(["model", "prompt"]));
    assert!(schemas["ErrorResponse"]["properties"]["error"].is_object());
    // Every documented path answers something other than the fallback 404 (`no such endpoint`).
    for (path, ops) in doc["paths"].as_object().unwrap() {
        let path = path.replace("{id}", "smollm2");
        for method in ops.as_object().unwrap().keys() {
            let (_, body) = http(addr, &method.to_uppercase(), &path, b"{}");
            assert!(!body.contains("no such endpoint"), "{method} {path} is served");
        }
    }
}
