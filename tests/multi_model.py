#!/usr/bin/env python3
"""Several models behind one `mlx-serving serve`, driven by the official `openai` client.

Usage: multi_model.py BINARY SMOLLM2_GGUF QWEN_GGUF

1. Single-model servers give each model's greedy token ids for a few prompts (the reference).
2. One server with both models (`--model smol=... --model qwen=...`), loaded on demand: concurrent clients of
   both get exactly the reference ids; the client switches models request by request; /v1/models, /api/ps and
   /metrics show what is loaded; unload waits for a request in flight, `?force=true` aborts one; a corrupt model
   file fails its own requests (500, model_load_failed) while the others serve; unknown models are 404.
3. A memory budget that fits one model at a time: concurrent clients of both force LRU swaps, and no request
   fails (requests wait for room); the metrics count the loads and unloads.
4. runtime.yaml `models:` with a pinned model, a one-model limit and a short wait: the pinned model is never
   unloaded, the other model's requests get 503 with Retry-After; a TTL unloads an idle model by itself.
5. `POST /v1/models` registers a model from files at run time (only with `server.allow_model_registration`):
   it serves the reference ids, with a draft model too; taken names are 409s, bad paths and corrupt files 400s.
"""
import os, sys, tempfile, threading, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import check, http, metrics, stop  # noqa: E402

import openai
from openai import OpenAI

binary, smol_path, qwen_path = sys.argv[1], sys.argv[2], sys.argv[3]
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time", "1, 2, 3, 4,"]
MAX_TOKENS = 12
COMMON = ["--threads", "2", "--kv-cache-mb", "64"]



def start(args):
    return harness.start(binary, args)


def models(port):
    return {m["id"]: m for m in http(port, "GET", "/v1/models")[2]["data"]}


def ps(port):
    return sorted(m["name"] for m in http(port, "GET", "/api/ps")[2]["models"])


def ids(client, model, prompt, max_tokens=MAX_TOKENS):
    r = client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                  extra_body={"return_token_ids": True})
    return r.choices[0].model_extra["token_ids"]


def client(port):
    return OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=300)


def concurrently(jobs):
    """Runs (model, prompt) jobs on threads; returns [(model, prompt, ids or exception)]."""
    out = [None] * len(jobs)

    def run(i, c, model, prompt):
        try:
            out[i] = (model, prompt, ids(c, model, prompt))
        except Exception as e:  # noqa: BLE001 - reported by the caller
            out[i] = (model, prompt, e)

    threads = [threading.Thread(target=run, args=(i, c, m, p)) for i, (c, m, p) in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


# 1. The reference: each model alone.
reference = {}
for name, path in [("smol", smol_path), ("qwen", qwen_path)]:
    proc, port = start(["--model", path, "--served-model-name", name] + COMMON)
    c = client(port)
    reference[name] = {p: ids(c, name, p) for p in PROMPTS}
    stop(proc)
check(all(len(v) == MAX_TOKENS for r in reference.values() for v in r.values()), "single-model servers give the reference ids")

# 2. Both models in one server, loaded on demand; a third whose file is corrupt.
tmp = tempfile.mkdtemp()
broken = os.path.join(tmp, "broken.gguf")
with open(broken, "wb") as f:
    f.write(b"GGUF" + os.urandom(4096))
proc, port = start(["--model", f"smol={smol_path}", "--model", f"qwen={qwen_path}", "--model", f"broken={broken}"] + COMMON)
c = client(port)
m = models(port)
check(sorted(m) == ["broken", "qwen", "smol"] and not any(v["loaded"] for v in m.values()), "/v1/models lists every model, none loaded at start")
check(ps(port) == [], "/api/ps is empty before any request")
check(http(port, "GET", "/v1/models/qwen")[2]["state"] == "unloaded", "GET /v1/models/{id} shows the state")
# The client switches models request by request.
for p in PROMPTS[:2]:
    for name in ["smol", "qwen"]:
        check(ids(c, name, p) == reference[name][p], f"{name} on its first use answers as a single-model server ({p!r})")
m = models(port)
check(m["smol"]["loaded"] and m["qwen"]["loaded"] and m["smol"]["memory_bytes"] > 0 and m["qwen"]["memory_bytes"] > m["smol"]["memory_bytes"],
      "both loaded, each with its memory")
check(ps(port) == ["qwen", "smol"], "/api/ps lists the loaded models")
chat = c.chat.completions.create(model="qwen", messages=[{"role": "user", "content": "Say hi"}], max_tokens=4)
check(chat.model == "qwen" and chat.choices[0].message.content, "chat on the second model")
# Concurrent clients of both models.
jobs = [(client(port), name, p) for p in PROMPTS for name in ["smol", "qwen"]] * 2
results = concurrently(jobs)
bad = [(n, p, r) for n, p, r in results if r != reference[n][p]]
check(not bad, f"16 concurrent requests over two models give the single-model ids ({bad[:1]})")
met = metrics(port)
check(met['mlx_serving:models_loaded'] == 2 and met['mlx_serving:model_loaded{model_name="smol"}'] == 1
      and met['mlx_serving:model_loads_total{model_name="qwen"}'] == 1, "/metrics: two loaded, each loaded once")
# Identical concurrent requests share one generation (coalescing): the engine counters count generations, and
# coalesced_requests_total the requests that joined one.
joined = {n: met.get(f'mlx_serving:coalesced_requests_total{{model_name="{n}"}}', 0) for n in ("smol", "qwen")}
check(met['mlx_serving:request_success_total{model_name="qwen",finished_reason="length"}'] + joined["qwen"] >= 10
      and met['mlx_serving:generation_tokens_total{model_name="smol"}'] >= (10 - joined["smol"]) * MAX_TOKENS,
      f"/metrics counts requests per model (coalesced: {joined})")
# A corrupt model fails its own requests and nothing else.
try:
    c.completions.create(model="broken", prompt="x", max_tokens=2)
    check(False, "a corrupt model's request fails")
except openai.InternalServerError as e:
    check(e.body.get("code") == "model_load_failed" and "broken" in e.body.get("message", ""), "a corrupt model's request is a 500 model_load_failed naming it")
info = http(port, "GET", "/v1/models/broken")[2]
check(info["state"] == "failed" and info.get("error"), "the corrupt model's state is failed, with the error")
check(ids(c, "smol", PROMPTS[2]) == reference["smol"][PROMPTS[2]], "the other models keep serving")
try:
    c.completions.create(model="nope", prompt="x", max_tokens=2)
    check(False, "unknown model")
except openai.NotFoundError as e:
    check(e.body.get("code") == "model_not_found", "an unknown model is a 404 model_not_found")
status, _, body = http(port, "POST", "/v1/models", {"id": "more", "path": qwen_path})
check(status == 403 and body["error"]["code"] == "registration_disabled" and "more" not in models(port),
      "POST /v1/models is a 403 unless server.allow_model_registration is on")
# Unload waits for a request in flight.
stream_result, stream_started = {}, {"wait": threading.Event(), "force": threading.Event()}


def long_stream(model, key):
    s = c.completions.create(model=model, prompt="Count: 1, 2, 3,", max_tokens=120, temperature=0, stream=True,
                             extra_body={"ignore_eos": True})
    finish, n = None, 0
    for ch in s:
        n += 1
        stream_started[key].set()
        if ch.choices and ch.choices[0].finish_reason:
            finish = ch.choices[0].finish_reason
    stream_result[key] = (finish, n)


t = threading.Thread(target=long_stream, args=("smol", "wait"))
t.start()
# Unload once the stream is running in the engine (a request still being prepared is refused with a 503).
stream_started["wait"].wait(60)
check(models(port)["smol"]["in_flight"] >= 1, "a request in flight is counted")
status, _, card = http(port, "POST", "/v1/models/smol/unload")
t.join()
check(status == 200 and card["state"] == "unloaded" and stream_result["wait"][0] == "length",
      "unload waited for the request in flight, which finished normally")
check(ps(port) == ["qwen"] and not models(port)["smol"]["loaded"], "/api/ps and /v1/models after the unload")
check(http(port, "POST", "/v1/models/smol/load")[2]["state"] == "loaded", "POST /v1/models/{id}/load loads it again")
t = threading.Thread(target=long_stream, args=("smol", "force"))
t.start()
stream_started["force"].wait(60)
status, _, card = http(port, "POST", "/v1/models/smol/unload?force=true")
t.join()
check(status == 200 and card["state"] == "unloaded" and stream_result["force"][0] == "abort",
      "a forced unload aborts the request in flight (finish_reason abort)")
check(http(port, "POST", "/v1/models/smol/unload?force=maybe")[0] == 400, "a bad force value is a 400")
check(ids(c, "smol", PROMPTS[3]) == reference["smol"][PROMPTS[3]], "the next request loads it again, same answers")
met = metrics(port)
check(met['mlx_serving:model_unloads_total{model_name="smol"}'] == 2 and met['mlx_serving:model_loads_total{model_name="smol"}'] == 3
      and met['mlx_serving:model_load_failures_total{model_name="broken"}'] >= 1, "/metrics counts loads, unloads and failures")
check(met['mlx_serving:model_load_seconds_count{model_name="smol"}'] == 3, "/metrics has the load time histogram")
stop(proc)

# 3. A budget for one model at a time: swaps under concurrent load, no failed request.
sizes = {n: v["memory_bytes"] for n, v in m.items() if n != "broken"}
budget_mb = max(sizes.values()) // (1 << 20) + 8
check(budget_mb * (1 << 20) < sum(sizes.values()), f"a {budget_mb} MiB budget fits one model, not both")
proc, port = start(["--model", f"smol={smol_path}", "--model", f"qwen={qwen_path}", "--memory-budget-mb", str(budget_mb)] + COMMON)
c = client(port)
for rnd in range(3):
    results = concurrently([(client(port), name, p) for name in ["smol", "qwen"] for p in PROMPTS[:2]])
    bad = [(n, p, r) for n, p, r in results if r != reference[n][p]]
    check(not bad, f"round {rnd}: concurrent requests over two models under a one-model budget all succeed with the reference ids ({bad[:1]})")
    check(len(ps(port)) == 1, f"round {rnd}: one model loaded at a time")
met = metrics(port)
loads = met['mlx_serving:model_loads_total{model_name="smol"}'] + met['mlx_serving:model_loads_total{model_name="qwen"}']
unloads = met['mlx_serving:model_unloads_total{model_name="smol"}'] + met['mlx_serving:model_unloads_total{model_name="qwen"}']
check(loads >= 2 and unloads == loads - 1, f"the models were swapped ({loads:.0f} loads, {unloads:.0f} unloads)")
stop(proc)

# 4. runtime.yaml: a pinned model, a one-model limit, a short wait; then a TTL.
cfg = os.path.join(tmp, "runtime.yaml")
with open(cfg, "w") as f:
    f.write(f"""max_loaded_models: 1
model_wait_seconds: 0.5
engine:
  kv_cache_mb: 64
models:
  - name: smol
    path: {smol_path}
    aliases: [small]
    pinned: true
    preload: true
  - name: qwen
    path: {qwen_path}
""")
proc, port = start(["--config", cfg, "--threads", "2"])
c = client(port)
check(models(port)["smol"]["loaded"] and models(port)["smol"]["pinned"], "a preloaded, pinned model is loaded at start")
check(ids(c, "small", PROMPTS[0]) == reference["smol"][PROMPTS[0]], "a model answers to its alias")
status, headers, body = http(port, "POST", "/v1/completions", {"model": "qwen", "prompt": "x", "max_tokens": 2})
check(status == 503 and headers.get("retry-after") and body["error"]["code"] == "model_busy",
      "no room (the only slot is pinned): 503 with Retry-After")
check(ps(port) == ["smol"], "the pinned model stayed loaded")
stop(proc)
with open(cfg, "w") as f:
    f.write(f"""engine:
  kv_cache_mb: 64
models:
  - name: qwen
    path: {qwen_path}
    ttl_seconds: 1
  - name: smol
    path: {smol_path}
""")
proc, port = start(["--config", cfg, "--threads", "2"])
c = client(port)
ids(c, "qwen", PROMPTS[0], 2)
ids(c, "smol", PROMPTS[0], 2)
check(ps(port) == ["qwen", "smol"], "both loaded")
deadline = time.time() + 10
while "qwen" in ps(port) and time.time() < deadline:
    time.sleep(0.2)
check(ps(port) == ["smol"], "the idle model past its TTL unloaded by itself; the one without a TTL stayed")
check(ids(c, "qwen", PROMPTS[1]) == reference["qwen"][PROMPTS[1]], "and loads again on its next request")
stop(proc)

# 5. Models registered at run time.
with open(cfg, "w") as f:
    f.write(f"""server:
  allow_model_registration: true
engine:
  kv_cache_mb: 64
models:
  - name: smol
    path: {smol_path}
""")
# RUST_BACKTRACE on: errors about corrupt files still carry no backtrace.
port = harness.free_port()
proc = harness.start_command([binary, "serve", "--port", str(port), "--config", cfg, "--threads", "2"], port,
                             env={**os.environ, "RUST_BACKTRACE": "1"})
c = client(port)
status, _, card = http(port, "POST", "/v1/models", {"id": "qwen", "path": qwen_path, "aliases": ["q"]})
check(status == 200 and card["id"] == "qwen" and card["state"] == "loaded" and card["aliases"] == ["q"],
      f"POST /v1/models registers and loads a model from a path ({status} {card})")
check(ids(c, "q", PROMPTS[0]) == reference["qwen"][PROMPTS[0]], "the registered model serves the reference ids (by its alias)")
status, _, card = http(port, "POST", "/v1/models", {"id": "qwen", "path": qwen_path})
check(status == 200 and card["state"] == "loaded", "the same id from the same file again is not an error")
for body, code, what in [
    ({"id": "qwen", "path": smol_path}, "model_exists", "the id taken by other files"),
    ({"id": "smol", "path": qwen_path}, "model_exists", "a configured model's name"),
    ({"id": "other", "path": smol_path, "aliases": ["q"]}, "model_exists", "an alias taken"),
]:
    status, _, r = http(port, "POST", "/v1/models", body)
    check(status == 409 and r["error"]["code"] == code, f"{what}: 409 {code} ({status} {r})")
for body, param, what in [
    ({"id": "x", "path": os.path.join(tmp, "missing.gguf")}, "path", "a missing file"),
    ({"id": "x", "path": broken}, "path", "a corrupt file"),
    ({"id": "x", "path": smol_path, "draft_model": broken}, "draft_model", "a corrupt draft model"),
    ({"id": "", "path": smol_path}, "id", "an empty id"),
    ({"id": "x", "path": smol_path, "ttl_seconds": -1}, "ttl_seconds", "a negative TTL"),
    ({"id": "x", "path": smol_path, "weights": "y"}, "weights", "an unknown field"),
]:
    status, _, r = http(port, "POST", "/v1/models", body)
    check(status == 400 and r["error"]["param"] == param and "\n" not in r["error"]["message"],
          f"{what}: 400 naming {param}, one line ({status} {r})")
check("x" not in models(port), "a refused registration registers nothing")
status, _, card = http(port, "POST", "/v1/models", {"id": "smol-spec", "path": smol_path, "draft_model": smol_path, "load": False})
check(status == 200 and card["state"] == "unloaded", "load: false registers without loading")
check(all(ids(c, "smol-spec", p) == reference["smol"][p] for p in PROMPTS[:2]),
      "a model registered with a draft model (speculative decoding) gives the same greedy ids")
met = metrics(port)
check(met['mlx_serving:model_loads_total{model_name="qwen"}'] == 1
      and met['mlx_serving:model_loads_total{model_name="smol-spec"}'] == 1, "/metrics has series for registered models")
check(met.get('mlx_serving:spec_decode_num_draft_tokens{model_name="smol-spec"}', 0) > 0,
      "the registered model's draft model proposed tokens")
stop(proc)
print(f"all {harness.checks} checks passed")
