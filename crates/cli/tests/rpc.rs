//! `mlx-serving rpc` as a host process drives it: JSON-RPC 2.0 lines over a pipe, on real SmolLM2.

use mlx_serving_test_support::{reference, smollm2_path};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

struct Rpc {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<Value>,
    /// Every message read so far that no `call` has taken.
    seen: Vec<Value>,
}

impl Rpc {
    fn start(extra: &[&str]) -> Self {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_mlx-serving"));
        cmd.arg("rpc").arg("--model").arg(smollm2_path()).args(extra);
        Self::spawn(cmd)
    }

    fn spawn(mut cmd: Command) -> Self {
        let mut child = cmd
            .args(["--threads", "2", "--kv-cache-mb", "64", "--log-level", "warn"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start mlx-serving rpc");
        let out = child.stdout.take().unwrap();
        let (tx, lines) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let line = line.expect("stdout");
                let v: Value =
                    serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON on stdout ({e}): {line}"));
                if tx.send(v).is_err() {
                    break;
                }
            }
        });
        let stdin = child.stdin.take();
        Self { child, stdin, lines, seen: Vec::new() }
    }

    fn send_raw(&mut self, line: &str) {
        let w = self.stdin.as_mut().expect("stdin open");
        w.write_all(line.as_bytes()).unwrap();
        w.write_all(b"\n").unwrap();
        w.flush().unwrap();
    }

    fn send(&mut self, id: u64, method: &str, params: Value) {
        self.send_raw(&json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}).to_string());
    }

    /// Reads until `pred` matches a message (kept messages first); returns it, keeping the others.
    fn wait(&mut self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        if let Some(i) = self.seen.iter().position(&pred) {
            return self.seen.remove(i);
        }
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let v = self.lines.recv_timeout(left).unwrap_or_else(|_| panic!("no {what} within 120 s"));
            if pred(&v) {
                return v;
            }
            self.seen.push(v);
        }
    }

    fn call(&mut self, id: u64, method: &str, params: Value) -> Value {
        self.send(id, method, params);
        self.wait(&format!("answer to {id}"), |v| v["id"] == json!(id))
    }

    /// A generation's chunks' ids and text, its final event and its stats, after its `generate` answer.
    fn stream(&mut self, stream_id: &str) -> (Vec<u64>, String, Value, Value) {
        let (mut ids, mut text, mut stats) = (Vec::new(), String::new(), Value::Null);
        loop {
            let v = self.wait("stream message", |v| v["params"]["stream_id"] == json!(stream_id));
            match v["method"].as_str() {
                Some("stream.chunk") => {
                    ids.extend(v["params"]["token_ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap()));
                    text.push_str(v["params"]["token"].as_str().unwrap());
                }
                Some("stream.stats") => stats = v["params"].clone(),
                Some("stream.event") => return (ids, text, v["params"].clone(), stats),
                other => panic!("unexpected {other:?}: {v}"),
            }
        }
    }
}

impl Drop for Rpc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const PROMPTS: [&str; 4] =
    ["The capital of France is", "Once upon a time", "The three primary colours are", "def fibonacci(n):"];

fn gen(prompt: &str, stream_id: &str) -> Value {
    json!({"model": "SmolLM2-135M-Instruct.Q4_1", "prompt": prompt, "max_tokens": 16, "temperature": 0,
        "stream_id": stream_id})
}

/// Greedy ids over the pipe are the reference's (f32 numerics), and four generations at once over one pipe give
/// each the ids it gets alone; stats and a `completed` event close each stream.
#[test]
fn concurrent_generations_over_one_pipe() {
    let mut rpc = Rpc::start(&["--activations", "f32", "--kv-cache-dtype", "f32"]);
    let info = rpc.call(1, "runtime/info", json!({}));
    assert_eq!(info["result"]["name"], "mlx-serving");
    assert_eq!(info["result"]["models"][0]["id"], "SmolLM2-135M-Instruct.Q4_1");
    let mut alone = Vec::new();
    for (k, p) in PROMPTS.iter().enumerate() {
        let sid = format!("alone-{k}");
        let r = rpc.call(10 + k as u64, "generate", gen(p, &sid));
        assert_eq!(r["result"]["stream_id"], sid.as_str());
        let (ids, text, end, stats) = rpc.stream(&sid);
        assert_eq!((end["event"].as_str(), ids.len()), (Some("completed"), 16), "{end}");
        assert!(!text.is_empty());
        assert_eq!(stats["tokens_generated"], 16);
        assert!(stats["time_to_first_token_ms"].as_f64().unwrap() > 0.0);
        assert!(stats["prompt_tokens"].as_u64().unwrap() > 0);
        alone.push(ids);
    }
    let refs = reference("greedy-SmolLM2-135M-Instruct-transformers-f32.json");
    let want: Vec<u64> =
        refs["items"][0]["output_ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).collect();
    assert_eq!(alone[0][..10], want[..10], "the reference's greedy ids");
    for (k, p) in PROMPTS.iter().enumerate() {
        rpc.send(20 + k as u64, "generate", gen(p, &format!("together-{k}")));
    }
    for (k, ids) in alone.iter().enumerate() {
        let (got, _, end, _) = rpc.stream(&format!("together-{k}"));
        assert_eq!(&got, ids, "prompt {k} alone and with three others");
        assert_eq!(end["finish_reason"], "length");
    }
    let tok = rpc.call(30, "tokenize", json!({"model": "SmolLM2-135M-Instruct.Q4_1", "text": PROMPTS[0]}));
    let want_prompt: Vec<u64> =
        refs["items"][0]["prompt_ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).collect();
    let got: Vec<u64> = tok["result"]["tokens"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).collect();
    assert_eq!(got, want_prompt, "tokenize gives the reference's prompt ids");
    let same = rpc.call(
        31,
        "check_draft",
        json!({"model": "SmolLM2-135M-Instruct.Q4_1", "draft": "SmolLM2-135M-Instruct.Q4_1"}),
    );
    assert_eq!(same["result"]["compatible"], true);
}

/// `cancel` mid-stream ends the stream with a `cancelled` event and frees the engine; errors are JSON-RPC
/// errors with stable codes and the runtime goes on; EOF on stdin ends it cleanly after the work in flight.
#[test]
fn cancel_errors_and_eof() {
    let mut rpc = Rpc::start(&[]);
    let long = json!({"model": "SmolLM2-135M-Instruct.Q4_1", "prompt": "Tell me a long story.", "max_tokens": 2000,
        "ignore_eos": true, "stream_id": "long"});
    rpc.call(1, "generate", long);
    for _ in 0..3 {
        rpc.wait("a chunk", |v| v["method"] == "stream.chunk" && v["params"]["stream_id"] == "long");
    }
    let c = rpc.call(2, "cancel", json!({"stream_id": "long"}));
    assert_eq!(c["result"]["cancelled"], true);
    rpc.wait("cancelled event", |v| v["method"] == "stream.event" && v["params"]["event"] == "cancelled");
    let mut idle = false;
    for k in 0..100 {
        let st = rpc.call(100 + k, "runtime/state", json!({}));
        let h = &st["result"]["health"];
        if h["running"] == 0 && h["waiting"] == 0 && st["result"]["active_streams"] == json!([]) {
            idle = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(idle, "the engine is free after the cancel");
    assert_eq!(rpc.call(3, "cancel", json!({"stream_id": "long"}))["result"]["cancelled"], false);

    rpc.send_raw("{not json");
    let e = rpc.wait("parse error", |v| v["error"]["code"] == -32700);
    assert_eq!(e["id"], Value::Null);
    rpc.send_raw(r#"{"id": 4, "method": "tokenize"}"#);
    assert_eq!(rpc.wait("invalid request", |v| v["id"] == 4)["error"]["code"], -32600);
    assert_eq!(rpc.call(5, "warp_drive", json!({}))["error"]["code"], -32601);
    let bad = rpc.call(
        6,
        "generate",
        json!({"model": "SmolLM2-135M-Instruct.Q4_1", "prompt": "x", "max_tokens": -1,
        "stream_id": "bad"}),
    );
    assert_eq!(bad["error"]["code"], -32602, "{bad}");
    assert!(bad["error"]["message"].as_str().unwrap().contains("max_tokens"), "{bad}");
    assert_eq!(rpc.call(7, "generate", json!({"prompt": "x"}))["error"]["code"], -32602);
    let nope = rpc.call(8, "tokenize", json!({"model": "nope", "text": "x"}));
    assert_eq!(nope["error"]["code"], -32004, "{nope}");
    assert_eq!(nope["error"]["data"]["status"], 404);
    assert_eq!(rpc.call(9, "load_model", json!({"model": "x", "local_path": "/tmp/x.gguf"}))["error"]["code"], -32602);
    assert_eq!(rpc.call(10, "tokenize", json!("not an object"))["error"]["code"], -32602);
    // Still serving.
    let ok = rpc.call(11, "tokenize", json!({"model": "SmolLM2-135M-Instruct.Q4_1", "text": "hello"}));
    assert!(ok["result"]["count"].as_u64().unwrap() > 0);

    // A generation in flight when stdin closes still completes; then the runtime exits with success.
    rpc.call(12, "generate", gen(PROMPTS[1], "last"));
    drop(rpc.stdin.take());
    let (ids, _, end, _) = rpc.stream("last");
    assert_eq!((end["event"].as_str(), ids.len()), (Some("completed"), 16));
    let t = Instant::now();
    loop {
        if let Some(status) = rpc.child.try_wait().unwrap() {
            assert!(status.success(), "{status}");
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "the runtime did not exit after EOF");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `load_model` with a local path registers and loads a model under a new name (with a draft model too); it then
/// serves the same greedy ids as the configured model; the same call again is fine, a taken name with other
/// files is a conflict, a name that is neither served nor in the Hugging Face cache is not found.
#[test]
fn load_model_from_a_local_path() {
    let mut rpc = Rpc::start(&[]);
    let path = smollm2_path().display().to_string();
    let r = rpc.call(1, "load_model", json!({"model": "second", "localPath": path, "draft": path}));
    assert_eq!(r["result"]["state"], "loaded", "{r}");
    assert_eq!(r["result"]["id"], "second");
    let again = rpc.call(2, "load_model", json!({"model": "second", "local_path": path, "draft": path}));
    assert_eq!(again["result"]["state"], "loaded", "{again}");
    let taken = rpc.call(3, "load_model", json!({"model": "second", "local_path": path}));
    assert_eq!(taken["error"]["code"], -32009, "other files (no draft) under a taken name: {taken}");
    let nope = rpc.call(4, "load_model", json!({"model": "nobody/nothing"}));
    assert_eq!(nope["error"]["code"], -32004, "{nope}");
    assert!(nope["error"]["message"].as_str().unwrap().contains("Hugging Face cache"), "{nope}");
    let bad = rpc.call(5, "load_model", json!({"model": "third", "local_path": 7}));
    assert_eq!(bad["error"]["code"], -32602, "{bad}");
    let mut outputs = Vec::new();
    for (k, model) in ["SmolLM2-135M-Instruct.Q4_1", "second"].iter().enumerate() {
        let sid = format!("s{k}");
        let mut params = gen(PROMPTS[0], &sid);
        params["model"] = json!(model);
        rpc.call(10 + k as u64, "generate", params);
        let (ids, _, end, _) = rpc.stream(&sid);
        assert_eq!(end["event"], "completed", "{end}");
        outputs.push(ids);
    }
    assert_eq!(outputs[0], outputs[1], "the registered model (with its draft) gives the configured model's greedy ids");
    let info = rpc.call(20, "runtime/info", json!({}));
    let names: Vec<&str> =
        info["result"]["models"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(names, ["SmolLM2-135M-Instruct.Q4_1", "second"]);
    let un = rpc.call(21, "unload_model", json!({"model": "second"}));
    assert_eq!(un["result"]["state"], "unloaded", "{un}");
}

/// Started with no model (and no default model file where it runs), the runtime serves nothing until a
/// `load_model` with a local path.
#[test]
fn starts_empty_without_a_model() {
    let dir = std::env::temp_dir().join(format!("mlx-serving-rpc-empty-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_mlx-serving"));
    cmd.arg("rpc").current_dir(&dir).env_remove("MLX_SERVING_MODEL").env_remove("MLX_SERVING_CONFIG");
    let mut rpc = Rpc::spawn(cmd);
    let info = rpc.call(1, "runtime/info", json!({}));
    assert_eq!(info["result"]["models"], json!([]), "{info}");
    let r = rpc.call(2, "load_model", json!({"model": "smol", "local_path": smollm2_path()}));
    assert_eq!(r["result"]["state"], "loaded", "{r}");
    let mut params = gen(PROMPTS[0], "e");
    params["model"] = json!("smol");
    rpc.call(3, "generate", params);
    let (ids, _, end, _) = rpc.stream("e");
    assert_eq!((end["event"].as_str(), ids.len()), (Some("completed"), 16));
    let _ = std::fs::remove_dir_all(&dir);
}
