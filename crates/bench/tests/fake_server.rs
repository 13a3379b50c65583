//! The bench against local fake OpenAI servers with known timing: the first token after 120 ms, then one
//! token every 25 ms, `max_tokens` tokens, usage in the last chunk (or not). Prompts holding `FAIL` get a
//! 500 and prompts holding `BREAK` have their stream cut. The computed latencies and throughput must match
//! the known timing, errors must be counted without stopping the run, and the JSON report must be complete.

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use mlx_serving_bench::{render_table, run, BenchConfig, DatasetSpec, Load};
use serde_json::{json, Value};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;
use tokio_stream::wrappers::ReceiverStream;

const FIRST: Duration = Duration::from_millis(120);
const GAP: Duration = Duration::from_millis(25);

#[derive(Clone, Copy)]
struct Fake {
    usage: bool,
}

async fn completions(State(f): State<Fake>, Json(req): Json<Value>) -> Response {
    let text = req.to_string();
    if text.contains("FAIL") {
        return (StatusCode::INTERNAL_SERVER_ERROR, Json(json!({"error": {"message": "boom"}}))).into_response();
    }
    let cut = text.contains("BREAK");
    let n = req["max_tokens"].as_u64().unwrap_or(16) as usize;
    let chat = req.get("messages").is_some();
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, Infallible>>(4);
    tokio::spawn(async move {
        let event = |v: Value| Ok(Bytes::from(format!("data: {v}\n\n")));
        if chat {
            let _ =
                tx.send(event(json!({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}))).await;
        }
        tokio::time::sleep(FIRST).await;
        for i in 0..n {
            if i > 0 {
                tokio::time::sleep(GAP).await;
            }
            if cut && i == 2 {
                return; // the connection ends without [DONE]
            }
            let choice = if chat {
                json!({"index": 0, "delta": {"content": "tok "}, "finish_reason": null})
            } else {
                json!({"index": 0, "text": "tok ", "finish_reason": null})
            };
            if tx.send(event(json!({"choices": [choice]}))).await.is_err() {
                return;
            }
        }
        if f.usage {
            let _ =
                tx.send(event(json!({"choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": n}}))).await;
        }
        let _ = tx.send(Ok(Bytes::from("data: [DONE]\n\n"))).await;
    });
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(Body::from_stream(ReceiverStream::new(rx)))
        .unwrap()
}

async fn models() -> Json<Value> {
    Json(json!({"object": "list", "data": [{"id": "fake-model", "object": "model"}]}))
}

async fn start(f: Fake) -> SocketAddr {
    let app = Router::new()
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(completions))
        .route("/v1/completions", post(completions))
        .with_state(f);
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
    addr
}

fn config(urls: Vec<String>) -> BenchConfig {
    BenchConfig {
        duplicate_ratio: 0.0,
        urls,
        model: None,
        dataset: DatasetSpec::Builtin,
        num_prompts: 8,
        loads: vec![Load::Concurrency(4)],
        max_tokens: 10,
        input_len: None,
        chat: true,
        ignore_eos: true,
        temperature: 0.0,
        warmup: 1,
        seed: 1,
        rounds: 1,
        timeout: Duration::from_secs(30),
        progress: false,
        constraint: None,
        constraint_ab: false,
    }
}

/// `constraint_ab` measures each URL plain and constrained: the constraint's fields reach only the second
/// endpoint's requests (here they hold `FAIL`, so the fake server refuses exactly those).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn constraint_ab_sends_the_fields_to_the_constrained_endpoint_only() {
    let a = start(Fake { usage: true }).await;
    let mut cfg = config(vec![format!("http://{a}")]);
    cfg.warmup = 0;
    cfg.constraint =
        Some(json!({"response_format": {"type": "json_schema", "json_schema": {"name": "FAIL", "schema": {}}}}));
    cfg.constraint_ab = true;
    let report = run(cfg.clone()).await.unwrap();
    let eps: Vec<(String, usize, usize)> =
        report.levels[0].endpoints.iter().map(|e| (e.url.clone(), e.completed, e.failed)).collect();
    assert_eq!(eps, vec![(format!("http://{a}"), 8, 0), (format!("http://{a} +constraint"), 0, 8)]);
    cfg.constraint_ab = false;
    let report = run(cfg).await.unwrap();
    assert_eq!(report.levels[0].endpoints.len(), 1);
    assert_eq!(report.levels[0].endpoints[0].failed, 8, "every request constrained");
}

fn near(got: f64, want: f64, tol: f64, what: &str) {
    assert!((got - want).abs() <= tol, "{what}: got {got:.1}, want {want:.1} ± {tol}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latencies_and_throughput_match_the_known_timing() {
    let a = start(Fake { usage: true }).await;
    let b = start(Fake { usage: false }).await;
    let mut cfg = config(vec![format!("http://{a}"), format!("http://{b}/v1")]);
    cfg.rounds = 2;
    cfg.loads = vec![Load::Concurrency(1), Load::Concurrency(4)];
    let report = run(cfg).await.unwrap();
    assert_eq!(report.endpoints[0].model, "fake-model", "model taken from /v1/models");
    let e2e = FIRST.as_secs_f64() * 1e3 + 9.0 * GAP.as_secs_f64() * 1e3;
    for level in &report.levels {
        for e in &level.endpoints {
            assert_eq!((e.completed, e.failed), (16, 0), "{}", e.url);
            assert_eq!(e.total_output_tokens, 160);
            near(e.ttft_ms.p50, 120.0, 40.0, "TTFT p50");
            near(e.itl_ms.p50, 25.0, 10.0, "ITL p50");
            near(e.tpot_ms.p50, 25.0, 10.0, "TPOT p50");
            near(e.e2e_ms.p50, e2e, 60.0, "E2E p50");
            let conc = match level.load {
                Load::Concurrency(c) => c as f64,
                _ => unreachable!(),
            };
            // Closed loop: `conc` requests of ~e2e each in flight, 10 tokens per request.
            let want = conc * 10.0 / (e2e / 1e3);
            near(e.output_throughput, want, want * 0.3, "output tok/s");
            assert_eq!(e.rounds.len(), 2);
        }
        assert_eq!(level.endpoints[0].token_count_source, "usage");
        assert_eq!(level.endpoints[0].total_input_tokens, 16 * 11);
        assert_eq!(level.endpoints[1].token_count_source, "chunks");
        let r = &level.ratios[0];
        assert_eq!(r.metrics["output_throughput"].rounds, 2);
        near(r.metrics["output_throughput"].median, 1.0, 0.3, "same servers, ratio near 1");
    }
    let table = render_table(&report, true);
    assert_eq!(table.lines().count(), 2 + 2 * 3, "{table}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_are_counted_and_do_not_stop_the_run() {
    let a = start(Fake { usage: true }).await;
    let dir = std::env::temp_dir().join(format!("bench-fake-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("prompts.jsonl");
    std::fs::write(
        &file,
        "{\"prompt\": \"fine one\"}\n{\"prompt\": \"FAIL please\"}\n{\"prompt\": \"BREAK it\"}\n{\"messages\": [{\"role\": \"user\", \"content\": \"fine two\"}]}\n",
    )
    .unwrap();
    let mut cfg = config(vec![format!("http://{a}"), "http://127.0.0.1:9".into()]);
    cfg.dataset = DatasetSpec::File(file);
    cfg.warmup = 0;
    cfg.chat = false;
    cfg.model = Some("fake-model".into());
    let report = run(cfg).await.unwrap();
    let e = &report.levels[0].endpoints[0];
    assert_eq!((e.completed, e.failed), (4, 4), "{e:?}");
    assert_eq!(e.errors.get("http_500"), Some(&2));
    assert_eq!(e.errors.get("stream_broken"), Some(&2));
    let dead = &report.levels[0].endpoints[1];
    assert_eq!((dead.completed, dead.errors.get("connect")), (0, Some(&8)), "{dead:?}");
    assert_eq!(dead.token_count_source, "none");

    // The JSON report has every field.
    let v = serde_json::to_value(&report).unwrap();
    for key in ["tool", "started_unix", "config", "endpoints", "levels"] {
        assert!(v.get(key).is_some(), "report.{key}");
    }
    let ep = &v["levels"][0]["endpoints"][0];
    for key in [
        "url",
        "completed",
        "failed",
        "errors",
        "duration_s",
        "request_throughput",
        "output_throughput",
        "total_input_tokens",
        "total_output_tokens",
        "token_count_source",
        "ttft_ms",
        "itl_ms",
        "tpot_ms",
        "e2e_ms",
        "rounds",
    ] {
        assert!(ep.get(key).is_some(), "endpoint.{key} in {ep}");
    }
    for key in ["n", "mean", "p50", "p90", "p99"] {
        assert!(ep["ttft_ms"].get(key).is_some(), "ttft_ms.{key}");
    }
    assert!(v["config"]["loads"][0]["concurrency"].is_number(), "{}", v["config"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poisson_arrivals_send_every_request() {
    let a = start(Fake { usage: true }).await;
    let mut cfg = config(vec![format!("http://{a}")]);
    cfg.loads = vec![Load::RequestRate { rate: 20.0, max_concurrency: None }];
    cfg.num_prompts = 12;
    cfg.input_len = Some(64);
    let report = run(cfg).await.unwrap();
    let e = &report.levels[0].endpoints[0];
    assert_eq!(e.completed, 12);
    // 12 arrivals at 20/s take ~0.6 s, plus the last request's ~345 ms.
    assert!(e.duration_s > 0.5 && e.duration_s < 3.0, "{}", e.duration_s);
}
