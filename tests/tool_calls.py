#!/usr/bin/env python3
"""Tool calling through the official `openai` client against a real `mlx-serving serve`.

Usage: tool_calls.py BINARY MODEL_PATH   (Qwen2.5-Coder-0.5B in scripts/test.sh: its template renders tools)

A full round trip (call -> tool message -> final answer) with tool_choice required, named and auto, streamed
and not: every call is well formed (a known function, arguments that parse and validate against its
parameters), the client's own stream accumulation (`chat.completions.stream`) yields the same calls as the
whole response, no tool-call markup leaks into `content`, and parallel calls get their own indexes.
"""
import json, os, socket, subprocess, sys, time, urllib.request

import jsonschema
from openai import OpenAI

binary, model_path = sys.argv[1], sys.argv[2]

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Get the current weather in a city.",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "The city name", "maxLength": 40},
                                                           "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                          "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "description": "Get the current local time in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40}}, "required": ["city"]}}}
TOOLS = [WEATHER, TIME]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


def start_server():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([binary, "serve", "--model", model_path, "--served-model-name", "m", "--port", str(port),
                             "--threads", "2", "--kv-cache-mb", "256"])
    for _ in range(1200):
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


checks = 0


def check(cond, what):
    global checks
    if not cond:
        raise SystemExit(f"FAILED: {what}")
    checks += 1
    print(f"ok - {what}")


def valid_calls(calls, what, names=None):
    check(calls, f"{what}: made calls")
    for c in calls:
        check(c.type == "function" and c.id.startswith("call_"), f"{what}: call id {c.id!r}")
        check(c.function.name in (names or SCHEMAS), f"{what}: known function {c.function.name!r}")
        args = json.loads(c.function.arguments)
        jsonschema.validate(args, SCHEMAS[c.function.name])
    return calls


server, port = start_server()
try:
    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=600)
    ask = [{"role": "user", "content": "What is the weather like in Paris right now?"}]

    for choice in ["required", {"type": "function", "function": {"name": "get_weather"}}, "auto"]:
        label = choice if isinstance(choice, str) else "named"
        r = client.chat.completions.create(model="m", messages=ask, tools=TOOLS, tool_choice=choice, temperature=0, max_tokens=120)
        c = r.choices[0]
        if label == "auto" and not c.message.tool_calls:
            # The model may answer in text: then no markup may show.
            check("<tool_call>" not in (c.message.content or ""), f"auto text answer has no markup: {c.message.content!r}")
            continue
        calls = valid_calls(c.message.tool_calls, f"{label} (whole)", ["get_weather"] if label == "named" else None)
        check(c.finish_reason == "tool_calls", f"{label}: finish_reason {c.finish_reason}")
        check(not c.message.content or "<tool_call>" not in c.message.content, f"{label}: no markup in content {c.message.content!r}")
        check(label != "named" or len(calls) == 1, "a named function is called once")

        # The same, streamed, accumulated by the client itself.
        with client.chat.completions.stream(model="m", messages=ask, tools=TOOLS, tool_choice=choice, temperature=0, max_tokens=120) as stream:
            final = stream.get_final_completion()
        sc = final.choices[0]
        streamed = valid_calls(sc.message.tool_calls, f"{label} (streamed)")
        check([(x.function.name, json.loads(x.function.arguments)) for x in streamed] == [(x.function.name, json.loads(x.function.arguments)) for x in calls],
              f"{label}: streamed calls equal the whole response's")
        check(sc.finish_reason == "tool_calls", f"{label} streamed: finish_reason {sc.finish_reason}")

        # Round trip: the call and its result go back; the model answers in text.
        history = ask + [{"role": "assistant", "content": None, "tool_calls": [x.model_dump() for x in calls]}]
        for x in calls:
            history.append({"role": "tool", "tool_call_id": x.id, "content": json.dumps({"temperature": 21, "unit": "celsius", "sky": "clear"})})
        r2 = client.chat.completions.create(model="m", messages=history, tools=TOOLS, tool_choice="auto", temperature=0, max_tokens=60)
        answer = r2.choices[0].message.content or ""
        if r2.choices[0].message.tool_calls:
            valid_calls(r2.choices[0].message.tool_calls, f"{label}: the model calls again")
        else:
            check(answer.strip() and "<tool_call>" not in answer, f"{label}: final answer {answer!r}")
        print(f"  {label}: {[(x.function.name, x.function.arguments) for x in calls]} -> {answer!r}")

    # Parallel calls: each its own index, in the stream and in the whole response.
    both = [{"role": "user", "content": "What is the weather in Paris, and what time is it in Tokyo? Call both tools."}]
    r = client.chat.completions.create(model="m", messages=both, tools=TOOLS, tool_choice="required", temperature=0, max_tokens=200)
    calls = valid_calls(r.choices[0].message.tool_calls, "parallel (whole)")
    indexes = set()
    for chunk in client.chat.completions.create(model="m", messages=both, tools=TOOLS, tool_choice="required", temperature=0, max_tokens=200, stream=True):
        for ch in chunk.choices:
            for d in ch.delta.tool_calls or []:
                indexes.add(d.index)
                if d.id:
                    check(d.function.name and d.type == "function", f"first delta of call {d.index} names it")
            check(not (ch.delta.content or "").count("<tool_call>"), "no markup in streamed content")
    check(indexes == set(range(len(calls))), f"stream indexes {sorted(indexes)} for {len(calls)} calls")
    print(f"tool calls: {checks} checks passed")
finally:
    server.terminate()
    server.wait(timeout=30)
