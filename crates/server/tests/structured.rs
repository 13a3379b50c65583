//! Structured output against a real server on the default model: bad constraints are 400s naming the field
//! (and the server serves the next request normally), and constrained requests batched with each other and
//! with plain ones give exactly the tokens each gives alone, greedy and seeded.

mod common;

use mlx_serving_engine::{EngineCore, SchedulerConfig};
use mlx_serving_models::{LoadOptions, ModelBundle};
use mlx_serving_runner::ModelExecutor;
use mlx_serving_server::AppState;
use mlx_serving_test_support::{smollm2_path, testdata};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

fn addr() -> SocketAddr {
    static A: OnceLock<SocketAddr> = OnceLock::new();
    *A.get_or_init(|| {
        let bundle = Arc::new(ModelBundle::load(smollm2_path(), &LoadOptions::default()).unwrap());
        let cfg = SchedulerConfig { max_num_seqs: 16, ..ModelExecutor::scheduler_config(&bundle, 16, 128 << 20) };
        let exec = ModelExecutor::new(bundle.clone(), cfg.block_size, cfg.num_blocks);
        let (engine, _join) = EngineCore::spawn(cfg, exec);
        common::serve(Arc::new(AppState::new(engine, bundle, "smollm2".into())))
    })
}

fn post(path: &str, v: &Value) -> (u16, Value) {
    let (status, _, body) = common::request(addr(), "POST", path, "", v.to_string().as_bytes());
    (status, serde_json::from_str(&body).unwrap_or(Value::String(body)))
}

fn chat(extra: Value) -> Value {
    let mut body = json!({
        "model": "smollm2",
        "messages": [{"role": "user", "content": "Describe a person as JSON."}],
        "max_tokens": 48,
        "temperature": 0,
        "return_token_ids": true,
    });
    body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    body
}

#[test]
fn bad_constraints_are_400s_naming_the_field() {
    let schema =
        |s: Value| json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": s}}});
    let cases: Vec<(Value, &str)> = vec![
        (
            schema(json!({"type": "object", "properties": {"a": {"$ref": "#/$defs/nope"}}})),
            "response_format.json_schema.schema",
        ),
        (schema(json!({"type": "strnig"})), "response_format.json_schema.schema"),
        (schema(json!({"type": "string", "pattern": "[a-"})), "response_format.json_schema.schema"),
        (schema(json!(42)), "response_format.json_schema.schema"),
        (
            json!({"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}}),
            "response_format.json_schema.name",
        ),
        (
            json!({"response_format": {"type": "json_schema", "json_schema": {"name": "bad name!", "schema": {}}}}),
            "response_format.json_schema.name",
        ),
        (json!({"response_format": {"type": "json_schema"}}), "response_format.json_schema"),
        (json!({"response_format": {"type": "yaml"}}), "response_format.type"),
        (json!({"response_format": {"type": "json_object", "extra": 1}}), "response_format"),
        (json!({"response_format": "json"}), "response_format"),
        (json!({"structured_outputs": {"regex": "(unclosed"}}), "structured_outputs.regex"),
        (json!({"structured_outputs": {"grammar": "start: (("}}), "structured_outputs.grammar"),
        (json!({"structured_outputs": {"grammar": "start: missing_rule"}}), "structured_outputs.grammar"),
        (json!({"structured_outputs": {"choice": []}}), "structured_outputs.choice"),
        (json!({"structured_outputs": {"choice": ["a", 1]}}), "structured_outputs.choice"),
        (json!({"structured_outputs": {"json": "{not json"}}), "structured_outputs.json"),
        (json!({"structured_outputs": {"regex": "a", "choice": ["a"]}}), "structured_outputs"),
        (json!({"structured_outputs": {}}), "structured_outputs"),
        (json!({"structured_outputs": {"xml": "a"}}), "structured_outputs"),
        (
            json!({"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}}),
            "structured_outputs",
        ),
        (json!({"structured_outputs": {"regex": "a".repeat(70_000)}}), "structured_outputs.regex"),
        // vLLM's older spellings.
        (json!({"guided_regex": "(unclosed"}), "guided_regex"),
        (json!({"guided_choice": "red"}), "guided_choice"),
        (json!({"guided_json": {"type": "nonsense"}}), "guided_json"),
        (json!({"guided_regex": "a", "guided_choice": ["a"]}), "guided_choice"),
        (json!({"guided_regex": "a", "structured_outputs": {"regex": "a"}}), "guided_regex"),
    ];
    for (extra, field) in cases {
        let (status, body) = post("/v1/chat/completions", &chat(extra.clone()));
        assert_eq!(status, 400, "{extra}: {body}");
        assert_eq!(body["error"]["param"], field, "{extra}: {body}");
        assert_eq!(body["error"]["type"], "invalid_request_error", "{extra}");
        // Completions read the same fields.
        let mut c = extra.clone();
        c.as_object_mut()
            .unwrap()
            .extend(json!({"model": "smollm2", "prompt": "x", "max_tokens": 4}).as_object().unwrap().clone());
        let (status, body) = post("/v1/completions", &c);
        assert_eq!((status, body["error"]["param"].clone()), (400, json!(field)), "completions {extra}: {body}");
    }
    // `text` is no constraint; the server serves normally after all of the above.
    let (status, body) = post("/v1/chat/completions", &chat(json!({"response_format": {"type": "text"}})));
    assert_eq!(status, 200, "{body}");
    for extra in [json!({"structured_outputs": {"choice": ["yes", "no"]}}), json!({"guided_choice": ["yes", "no"]})] {
        let (status, body) = post("/v1/chat/completions", &chat(extra));
        assert_eq!(status, 200, "{body}");
        assert!(["yes", "no"].contains(&body["choices"][0]["message"]["content"].as_str().unwrap()), "{body}");
    }
}

/// What a request generates alone: content, finish reason and token ids.
fn run(body: &Value) -> (String, String, Value) {
    let (status, r) = post("/v1/chat/completions", body);
    assert_eq!(status, 200, "{r}");
    let c = &r["choices"][0];
    (c["message"]["content"].as_str().unwrap().to_string(), c["finish_reason"].to_string(), c["token_ids"].clone())
}

/// Eight constrained requests with different schemas, a regex and a choice, mixed with plain ones, greedy and
/// seeded-sampled, all at once: each gives exactly what it gives alone.
#[test]
fn constrained_requests_batch_with_others_and_match_their_solo_runs() {
    let mut bodies = Vec::new();
    for (i, name) in [
        "01-user-profile",
        "03-order-line-items",
        "14-bank-transaction",
        "19-tool-call",
        "11-geojson-point",
        "06-weather-report",
        "09-log-record",
        "23-feature-flags",
    ]
    .iter()
    .enumerate()
    {
        let path = testdata().join("schemas").join(format!("{name}.json"));
        let case: Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
        let sampling = if i % 2 == 0 { json!({"temperature": 0}) } else { json!({"temperature": 0.9, "seed": i}) };
        let mut extra = json!({
            "messages": [{"role": "user", "content": case["prompt"]}],
            "max_tokens": 64,
            "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": case["schema"]}},
        });
        extra.as_object_mut().unwrap().extend(sampling.as_object().unwrap().clone());
        bodies.push(chat(extra));
    }
    bodies.push(chat(json!({"structured_outputs": {"regex": "[A-Z][a-z]{1,10} is [0-9]{1,3} years old\\."}})));
    bodies
        .push(chat(json!({"structured_outputs": {"choice": ["red", "green", "blue"]}, "temperature": 1.0, "seed": 5})));
    for seed in 0..4 {
        bodies.push(chat(json!({"temperature": 0.8, "seed": seed})));
    }
    bodies.push(chat(json!({})));
    let alone: Vec<_> = bodies.iter().map(run).collect();
    let together: Vec<_> = std::thread::scope(|s| {
        let hs: Vec<_> = bodies.iter().map(|b| s.spawn(move || run(b))).collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (i, (a, t)) in alone.iter().zip(&together).enumerate() {
        assert_eq!(a, t, "request {i} differs in a batch: {}", bodies[i]);
    }
    // The constrained ones really were constrained: the JSON ones that finished parse.
    for (content, finish, _) in &alone[..8] {
        if finish == "\"stop\"" {
            serde_json::from_str::<Value>(content).unwrap_or_else(|e| panic!("{e}: {content}"));
        }
    }
}

fn weather_tool() -> Value {
    json!({"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40}}, "required": ["city"]}}})
}

#[test]
fn bad_tools_are_400s_naming_the_field() {
    let tools = json!([weather_tool()]);
    let bad_params = json!([{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"a": {"$ref": "#/$defs/x"}}}}}]);
    let cases: Vec<(Value, &str)> = vec![
        (json!({"tools": tools, "tool_choice": {"type": "function", "function": {"name": "nope"}}}), "tool_choice"),
        (json!({"tools": tools, "tool_choice": "sometimes"}), "tool_choice"),
        (json!({"tool_choice": "required"}), "tool_choice"),
        (json!({"tools": bad_params}), "tools[0].function.parameters"),
        (json!({"tools": [{"type": "retrieval"}]}), "tools[0].type"),
        (json!({"tools": [{"type": "function", "function": {"name": "has space"}}]}), "tools[0].function.name"),
        (json!({"tools": [weather_tool(), weather_tool()]}), "tools[1].function.name"),
        (json!({"tools": []}), "tools"),
        (json!({"tools": tools, "response_format": {"type": "json_object"}}), "response_format"),
        (json!({"messages": [{"role": "tool", "content": "sunny"}]}), "messages[0].tool_call_id"),
        (json!({"messages": [{"role": "user", "content": "hi", "tool_call_id": "x"}]}), "messages[0].tool_call_id"),
        (json!({"messages": [{"role": "user", "content": "hi", "tool_calls": []}]}), "messages[0].tool_calls"),
    ];
    for (extra, field) in cases {
        let (status, body) = post("/v1/chat/completions", &chat(extra.clone()));
        assert_eq!(status, 400, "{extra}: {body}");
        assert_eq!(body["error"]["param"], field, "{extra}: {body}");
    }
    // tool_choice none with a format is fine; so is the server afterwards.
    let (status, body) = post(
        "/v1/chat/completions",
        &chat(json!({"tools": tools, "tool_choice": "none", "structured_outputs": {"choice": ["a", "b"]}})),
    );
    assert_eq!(status, 200, "{body}");
}

/// SmolLM2's template has no tools: they go into a system message, and `required` makes the model call one,
/// well formed, whatever it would have said (one call: without `parallel_tool_calls: false` this small model
/// repeats it until max_tokens).
#[test]
fn required_tool_calls_on_a_template_without_tools() {
    let body = chat(json!({
        "messages": [{"role": "user", "content": "What is the weather in Paris?"}],
        "tools": [weather_tool()],
        "tool_choice": "required",
        "parallel_tool_calls": false,
        "max_tokens": 60,
    }));
    let (status, r) = post("/v1/chat/completions", &body);
    assert_eq!(status, 200, "{r}");
    let c = &r["choices"][0];
    assert_eq!(c["finish_reason"], "tool_calls", "{r}");
    assert!(c["message"]["content"].is_null(), "{r}");
    let call = &c["message"]["tool_calls"][0];
    assert_eq!(call["type"], "function");
    assert_eq!(call["function"]["name"], "get_weather");
    assert!(call["id"].as_str().unwrap().starts_with("call_"));
    let args: Value = serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
    assert!(args["city"].is_string(), "{args}");
    // A history with the call and its result renders and runs.
    let follow = chat(json!({
        "messages": [
            {"role": "user", "content": "What is the weather in Paris?"},
            {"role": "assistant", "content": null, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": call["id"], "content": "{\"temp_c\": 21, \"sky\": \"clear\"}"},
        ],
        "tools": [weather_tool()],
        "tool_choice": "none",
        "max_tokens": 20,
    }));
    let (status, r) = post("/v1/chat/completions", &follow);
    assert_eq!(status, 200, "{r}");
    assert!(r["choices"][0]["message"]["tool_calls"].is_null(), "{r}");
}

/// Constraints keep working with `n`, seeds, logprobs and stop strings: every choice obeys its constraint,
/// logprobs come with every token, and a stop string still cuts the output.
#[test]
fn constraints_work_with_n_logprobs_and_stop() {
    let colors = ["red", "green", "blue", "yellow"];
    let (status, r) = post(
        "/v1/chat/completions",
        &chat(
            json!({"structured_outputs": {"choice": colors}, "n": 6, "temperature": 1.5, "seed": 11, "logprobs": true, "top_logprobs": 2}),
        ),
    );
    assert_eq!(status, 200, "{r}");
    for c in r["choices"].as_array().unwrap() {
        let text = c["message"]["content"].as_str().unwrap();
        assert!(colors.contains(&text), "{text}");
        assert_eq!(c["finish_reason"], "stop");
        let lps = c["logprobs"]["content"].as_array().unwrap();
        assert!(!lps.is_empty() && lps.iter().all(|l| l["top_logprobs"].as_array().unwrap().len() == 2), "{c}");
    }
    let (status, r) = post(
        "/v1/completions",
        &json!({"model": "smollm2", "prompt": "Numbers:", "max_tokens": 30, "temperature": 0, "stop": ["5"],
                "structured_outputs": {"regex": "( [0-9]){1,20}"}}),
    );
    assert_eq!(status, 200, "{r}");
    let text = r["choices"][0]["text"].as_str().unwrap();
    assert!(!text.contains('5') && text.chars().all(|c| c == ' ' || c.is_ascii_digit()), "{text:?}");
}

/// Preempted constrained requests (a KV cache too small for all of them at once) resume with their matcher
/// and give exactly their solo output.
#[test]
fn preempted_constrained_requests_resume_exactly() {
    let bundle = Arc::new(ModelBundle::load(smollm2_path(), &LoadOptions::default()).unwrap());
    let cfg =
        SchedulerConfig { num_blocks: 20, max_num_seqs: 8, ..ModelExecutor::scheduler_config(&bundle, 16, 128 << 20) };
    let exec = ModelExecutor::new(bundle.clone(), cfg.block_size, cfg.num_blocks);
    let (engine, _join) = EngineCore::spawn(cfg, exec);
    let addr = common::serve(Arc::new(AppState::new(engine.clone(), bundle, "smollm2".into())));
    let run_on = |body: &Value| {
        let (status, _, text) = common::request(addr, "POST", "/v1/chat/completions", "", body.to_string().as_bytes());
        assert_eq!(status, 200, "{text}");
        let r: Value = serde_json::from_str(&text).unwrap();
        r["choices"][0]["token_ids"].clone()
    };
    let schema = json!({"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 999}, "minItems": 30, "maxItems": 30});
    let bodies: Vec<Value> = (0..4)
        .map(|i| {
            chat(json!({"max_tokens": 90, "temperature": 0.7, "seed": i,
                "messages": [{"role": "user", "content": format!("List thirty numbers, set {i}.")}],
                "structured_outputs": {"json": schema}}))
        })
        .collect();
    let alone: Vec<Value> = bodies.iter().map(run_on).collect();
    let together: Vec<Value> = std::thread::scope(|s| {
        let hs: Vec<_> = bodies.iter().map(|b| s.spawn(move || run_on(b))).collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(
        engine.stats().preemptions.load(std::sync::atomic::Ordering::SeqCst) > 0,
        "the cache was big enough: no preemption"
    );
    assert_eq!(alone, together);
}
