#!/usr/bin/env python3
"""The official `openai` Python client against a real `mlx-serving serve` on the default model.

Starts the server binary given as argv[1] on a free port, runs the checks, stops the server. Exits non-zero
on the first failure. Run by scripts/test.sh inside the .venv it creates.
"""
import os, socket, subprocess, sys, time, urllib.request

import openai
from openai import OpenAI

binary = sys.argv[1]
root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
model_path = os.path.join(root, "models", "SmolLM2-135M-Instruct.Q4_1.gguf")

with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
server = subprocess.Popen([binary, "serve", "--model", model_path, "--served-model-name", "smollm2", "--port", str(port), "--threads", "2", "--kv-cache-mb", "128"])
try:
    for _ in range(600):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                if r.status == 200:
                    break
        except Exception:
            time.sleep(0.1)
    else:
        raise SystemExit("server did not become healthy")

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
    print(f"{checks} checks passed")
finally:
    server.terminate()
    server.wait(timeout=30)
