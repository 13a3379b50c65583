//! The HTTP API on the real default model: a table of bad requests, each with its status and error fields,
//! after which the server still serves; and client disconnects free the engine.

use mlx_serving_engine::{EngineCore, EngineHandle};
use mlx_serving_models::{LoadOptions, ModelBundle};
use mlx_serving_runner::ModelExecutor;
use mlx_serving_server::{router, AppState};
use mlx_serving_test_support::smollm2_path;
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn start() -> (SocketAddr, EngineHandle) {
    let bundle = Arc::new(ModelBundle::load(smollm2_path(), &LoadOptions::default()).unwrap());
    let mut cfg = ModelExecutor::scheduler_config(&bundle, 16, 64 << 20);
    cfg.max_num_seqs = 8;
    let exec = ModelExecutor::new(bundle.clone(), cfg.block_size, cfg.num_blocks);
    let (engine, _join) = EngineCore::spawn(cfg, exec);
    let state = Arc::new(AppState::new(engine.clone(), bundle, "smollm2".into()));
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    listener.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(async move {
            let l = tokio::net::TcpListener::from_std(listener).unwrap();
            axum::serve(l, router(state)).await.unwrap();
        });
    });
    (addr, engine)
}

/// One HTTP/1.1 request with `Connection: close`; returns (status, body).
fn http(addr: SocketAddr, method: &str, path: &str, body: &[u8]) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    // The server may answer (413) before reading a huge body; a failed write is fine then.
    let _ = s.write_all(body);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
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
        (
            "token id out of vocab",
            "/v1/completions",
            with("prompt", json!([1, 2, 99999999])),
            400,
            Some("prompt"),
            None,
        ),
        ("bad priority", "/v1/completions", with("priority", json!("urgent")), 400, Some("priority"), None),
        ("n = 2 (not yet)", "/v1/completions", with("n", json!(2)), 400, Some("n"), None),
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
    assert!(engine.stats().running.load(Ordering::SeqCst) > 0);
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
