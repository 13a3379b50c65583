#!/usr/bin/env python3
"""The official `openai` Python client against a real `mlx-serving serve` on the default model.

Starts the server binary given as argv[1] on a free port, runs the checks, stops the server. Exits non-zero
on the first failure. Run by scripts/test.sh inside the .venv it creates.
"""
import os, signal, socket, subprocess, sys, tempfile, threading, time, urllib.request

import openai
from openai import OpenAI

binary = sys.argv[1]
root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
model_path = os.path.join(root, "models", "SmolLM2-135M-Instruct.Q4_1.gguf")

def start_server(extra_args=(), env=None):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = [binary, "serve", "--model", model_path, "--served-model-name", "smollm2", "--port", str(port), "--threads", "2", "--kv-cache-mb", "128", *extra_args]
    proc = subprocess.Popen(args, env={**os.environ, **(env or {})})
    for _ in range(600):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                if r.status == 200:
                    return proc, port
        except Exception:
            if proc.poll() is not None:
                raise SystemExit(f"server exited with {proc.returncode}")
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("server did not become healthy")


# f32 activations and KV cache: the float32 reference's arithmetic, so greedy text can be checked against it
# exactly. The servers started further down run the default numerics (mixed 16/8-bit activations, f16 KV).
server, port = start_server(["--activations", "f32", "--kv-cache-dtype", "f32"])
try:
    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
    checks = 0

    def check(cond, what):
        global checks
        if not cond:
            raise SystemExit(f"FAILED: {what}")
        checks += 1
        print(f"ok - {what}")

    models = client.models.list()
    check([m.id for m in models.data] == ["smollm2"], "models.list returns the served model")

    chat = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "What is the capital of France?"}], temperature=0, max_tokens=20)
    check("Paris" in chat.choices[0].message.content, f"greedy chat answers Paris: {chat.choices[0].message.content!r}")
    check(chat.choices[0].finish_reason == "stop", "chat stops at end of turn")
    check(chat.usage.prompt_tokens == 37 and chat.usage.completion_tokens == 8, f"chat usage {chat.usage}")

    comp = client.completions.create(model="smollm2", prompt="The capital of France is", temperature=0, max_tokens=10)
    check(comp.choices[0].text == " Paris.\n\nThe answer is: 2", f"greedy completion matches the reference: {comp.choices[0].text!r}")
    check(comp.choices[0].finish_reason == "length", "completion stops at max_tokens")

    stream = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "What is the capital of France?"}], temperature=0, max_tokens=20, stream=True, stream_options={"include_usage": True})
    parts, finish, usage = [], None, None
    for ch in stream:
        if ch.usage:
            usage = ch.usage
        for c in ch.choices:
            if c.delta.content:
                parts.append(c.delta.content)
            finish = c.finish_reason or finish
    check("".join(parts) == chat.choices[0].message.content, "streamed chat text equals the non-streamed text")
    check(finish == "stop" and usage is not None and usage.completion_tokens == 8, "stream ends with finish_reason and usage")

    stopped = client.completions.create(model="smollm2", prompt="1, 2, 3, 4, 5,", temperature=0, max_tokens=20, stop=[" 8,"])
    check(" 8," not in stopped.choices[0].text and stopped.choices[0].finish_reason == "stop", f"stop string ends generation: {stopped.choices[0].text!r}")

    seeded = [client.completions.create(model="smollm2", prompt="My favourite animal is", temperature=1.0, seed=42, max_tokens=16).choices[0].text for _ in range(2)]
    check(seeded[0] == seeded[1], "same seed, same text")

    try:
        client.completions.create(model="nope", prompt="hi", max_tokens=1)
        check(False, "unknown model raises")
    except openai.NotFoundError as e:
        check(e.status_code == 404, "unknown model raises NotFoundError (404)")
    try:
        client.completions.create(model="smollm2", prompt="hi", max_tokens=10**6)
        check(False, "context overflow raises")
    except openai.BadRequestError as e:
        check(e.code == "context_length_exceeded", "context overflow raises BadRequestError with code context_length_exceeded")
    try:
        client.chat.completions.create(model="smollm2", messages=[], max_tokens=1)
        check(False, "empty messages raises")
    except openai.BadRequestError:
        check(True, "empty messages raises BadRequestError")
    try:
        client.completions.create(model="smollm2", prompt="hi", temperature=7, max_tokens=1)
        check(False, "temperature out of range raises")
    except openai.BadRequestError as e:
        check(e.body and e.body.get("param") == "temperature", "out-of-range temperature names the param")
    after = client.completions.create(model="smollm2", prompt="The capital of France is", temperature=0, max_tokens=2)
    check(after.choices[0].text == " Paris.", "still serves after bad requests")

    # n, logprobs, extensions.
    two = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "Name a colour."}], n=2, seed=7, temperature=1.0, max_tokens=12)
    check([c.index for c in two.choices] == [0, 1] and all(c.message.content for c in two.choices), "n=2 gives choices 0 and 1")
    again = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "Name a colour."}], n=2, seed=7, temperature=1.0, max_tokens=12)
    check([c.message.content for c in two.choices] == [c.message.content for c in again.choices], "n=2 with a seed is reproducible")
    stream = client.completions.create(model="smollm2", prompt="Once upon a time", n=2, seed=3, temperature=1.0, max_tokens=10, stream=True)
    texts, finishes = ["", ""], [None, None]
    for ch in stream:
        for c in ch.choices:
            texts[c.index] += c.text
            finishes[c.index] = c.finish_reason or finishes[c.index]
    check(finishes == ["length", "length"] and all(texts), f"streamed n=2 completes both choices: {texts}")

    lp = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "What is the capital of France?"}], temperature=0, max_tokens=8, logprobs=True, top_logprobs=3)
    content = lp.choices[0].logprobs.content
    check("".join(t.token for t in content) == lp.choices[0].message.content, "chat logprobs tokens spell the message")
    check(all(len(t.top_logprobs) == 3 and t.logprob <= 0 for t in content), "chat logprobs have 3 alternatives each")
    check(all(abs(t.logprob - t.top_logprobs[0].logprob) < 1e-5 for t in content), "greedy tokens are the top alternative")
    clp = client.completions.create(model="smollm2", prompt="The capital of France is", temperature=0, max_tokens=4, logprobs=2)
    check(clp.choices[0].logprobs.tokens[0] == " Paris" and len(clp.choices[0].logprobs.top_logprobs) == 4, "completion logprobs")
    echo = client.completions.create(model="smollm2", prompt="The capital of France is", temperature=0, max_tokens=2, echo=True)
    check(echo.choices[0].text == "The capital of France is Paris.", f"echo: {echo.choices[0].text!r}")
    ext = client.completions.create(model="smollm2", prompt="The capital of France is", temperature=0, max_tokens=2, extra_body={"return_token_ids": True, "priority": "high", "min_tokens": 2, "top_k": 5})
    check(ext.model_extra.get("prompt_token_ids") == [504, 3575, 282, 4649, 314] and len(ext.choices[0].model_extra.get("token_ids", [])) == 2, "return_token_ids (vLLM extension)")
    batch = client.completions.create(model="smollm2", prompt=["The capital of France is", "Hello"], temperature=0, max_tokens=2, n=2, extra_body={"return_token_ids": True})
    per_choice = [c.model_extra.get("prompt_token_ids") for c in sorted(batch.choices, key=lambda c: c.index)]
    check(per_choice[0] == per_choice[1] == [504, 3575, 282, 4649, 314] and per_choice[2] == per_choice[3] != per_choice[0]
          and batch.model_extra.get("prompt_token_ids") == [per_choice[0], per_choice[2]],
          "return_token_ids with a batch of prompts: each choice has its own prompt_token_ids")
    running = list(client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "What is the capital of France?"}], temperature=0, max_tokens=8, stream=True, stream_options={"include_usage": True, "continuous_usage_stats": True}))
    counts = [ch.usage.completion_tokens for ch in running if ch.choices]
    check(all(ch.usage is not None and ch.usage.prompt_tokens == 37 for ch in running) and counts == sorted(counts)
          and counts[0] == 0 and running[-1].usage.completion_tokens == 8 and counts[-1] == 8,
          f"stream_options.continuous_usage_stats: usage so far on every chunk ({counts})")
    raw = client.chat.completions.with_raw_response.create(model="smollm2", messages=[{"role": "user", "content": "Hi"}], max_tokens=1, extra_headers={"x-request-id": "client-chosen-1"})
    check(raw.headers.get("x-request-id") == "client-chosen-1", "x-request-id is echoed")
    try:
        client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "Hi"}], max_tokens=1, extra_body={"tools_choice": "auto"})
        check(False, "unknown field raises")
    except openai.BadRequestError as e:
        check(e.body and e.body.get("param") == "tools_choice", "an unsupported field is a 400 naming it")
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        metrics = r.read().decode()
    names = ["time_to_first_token_seconds", "inter_token_latency_seconds", "e2e_request_latency_seconds", "num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "prefix_cache_queries", "prefix_cache_hits", "prompt_tokens_total", "generation_tokens_total", "request_success_total"]
    check(all(f"mlx_serving:{n}" in metrics for n in names) and 'model_name="smollm2"' in metrics, "/metrics has the vLLM-named series")

    # Graceful shutdown: a stream in flight at SIGTERM still completes, then the server exits 0.
    result = {}
    started = threading.Event()

    def long_stream():
        s = client.completions.create(model="smollm2", prompt="Once upon a time", max_tokens=60, temperature=0, stream=True, extra_body={"ignore_eos": True})
        n, finish = 0, None
        for ch in s:
            n += 1
            started.set()
            finish = ch.choices[0].finish_reason or finish
        result["chunks"], result["finish"] = n, finish

    t = threading.Thread(target=long_stream)
    t.start()
    check(started.wait(60), "stream started")
    server.send_signal(signal.SIGTERM)
    t.join(120)
    check(result.get("finish") == "length", f"in-flight stream finished after SIGTERM: {result}")
    check(server.wait(timeout=60) == 0, "server exits 0 after SIGTERM")

    # Auth and runtime.yaml: keys from the environment, settings from a file.
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write("engine:\n  max_num_seqs: 4\nserver:\n  cors_allowed_origins: ['http://localhost:3000']\n")
    printed = subprocess.run([binary, "serve", "--config", f.name, "--print-config"], capture_output=True, text=True, timeout=60, env={**os.environ, "MLX_SERVING_API_KEY": "sk-local", "MLX_SERVING_PORT": "9999"})
    check(printed.returncode == 0 and "max_num_seqs: 4" in printed.stdout and "port: 9999" in printed.stdout and "sk-local" not in printed.stdout, "--print-config shows file and env settings, keys masked")
    bad = subprocess.run([binary, "serve", "--config", f.name, "--block-size", "0"], capture_output=True, text=True, timeout=60)
    check(bad.returncode != 0 and "engine.block_size" in bad.stderr, f"invalid settings name the key: {bad.stderr.strip()}")
    server, port = start_server(["--config", f.name], env={"MLX_SERVING_API_KEY": "sk-local"})
    keyed = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-local", max_retries=0)
    check(keyed.models.list().data[0].id == "smollm2", "the right key is accepted")
    try:
        OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-wrong", max_retries=0).models.list()
        check(False, "wrong key raises")
    except openai.AuthenticationError as e:
        check(e.status_code == 401, "a wrong key raises AuthenticationError (401)")
    server.terminate()
    server.wait(timeout=30)

    # Per-key rate limits (runtime.yaml): requests per minute, then tokens per minute.
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write("server:\n  api_keys: [sk-one, sk-two]\n  rate_limit:\n    requests_per_minute: 3\n")
    server, port = start_server(["--config", f.name, "--log-level", "debug"])
    one, two = (OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=k, max_retries=0) for k in ("sk-one", "sk-two"))
    for _ in range(3):
        one.completions.create(model="smollm2", prompt="Hi", max_tokens=1)
    try:
        one.completions.create(model="smollm2", prompt="Hi", max_tokens=1)
        check(False, "the fourth request in a minute is refused")
    except openai.RateLimitError as e:
        retry = int(e.response.headers.get("retry-after", "0"))
        check(e.status_code == 429 and e.body.get("code") == "rate_limit_exceeded" and 1 <= retry <= 20,
              f"a key past its requests per minute gets 429 rate_limit_exceeded with Retry-After ({retry} s)")
    check(two.completions.create(model="smollm2", prompt="Hi", max_tokens=1).choices, "another key has its own budget")
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    check("mlx_serving:rate_limited_requests_total 1" in text and "sk-one" not in text and "sk-two" not in text,
          "/metrics counts the refusal and shows no key")
    server.terminate()
    out, _ = server.communicate(timeout=30)
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write("server:\n  api_keys: [sk-one]\n  rate_limit:\n    tokens_per_minute: 100\n")
    log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
    port = None
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([binary, "serve", "--model", model_path, "--served-model-name", "smollm2", "--port", str(port),
                               "--threads", "2", "--kv-cache-mb", "64", "--config", f.name, "--log-level", "debug"],
                              stdout=log, stderr=log)
    for _ in range(600):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1):
                break
        except Exception:
            time.sleep(0.1)
    one = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-one", max_retries=0)
    one.completions.create(model="smollm2", prompt="Hi", max_tokens=60)  # charged ~61 of 100
    one.completions.create(model="smollm2", prompt="Hi", max_tokens=60)  # admitted (39 left), then in debt
    try:
        one.completions.create(model="smollm2", prompt="Hi", max_tokens=1)
        check(False, "a key in token debt is refused")
    except openai.RateLimitError as e:
        retry = int(e.response.headers.get("retry-after", "0"))
        check("tokens per minute" in e.message and 10 <= retry <= 60,
              f"a key past its tokens per minute waits its debt out (Retry-After {retry} s)")
    server.terminate()
    server.wait(timeout=30)
    log.seek(0)
    logged = log.read()
    check("sk-one" not in logged and "sk-two" not in logged and "request" in logged, "API keys never appear in the log (debug level)")
    print(f"{checks} checks passed")
finally:
    server.terminate()
    server.wait(timeout=30)
