#!/usr/bin/env python3
"""Aggregate output tok/s of an OpenAI-compatible server at several concurrency levels.

Sends N concurrent /v1/completions requests (greedy, ignore_eos, max_tokens=128) with distinct prompts
from testdata/reference/prompts.json and reports completion tokens / wall time. Standard library only.
Used to measure peers (llama.cpp's llama-server) beside `cargo run --example engine_bench`.

  scripts/openai-concurrency.py http://127.0.0.1:8090 [levels...]
"""
import json, sys, threading, time, urllib.request, pathlib

base = sys.argv[1].rstrip("/")
levels = [int(x) for x in sys.argv[2:]] or [1, 2, 4, 8, 16]
prompts = json.loads((pathlib.Path(__file__).parent.parent / "testdata/reference/prompts.json").read_text())["completion"]

def one(prompt, out):
    body = json.dumps({"prompt": prompt, "max_tokens": 128, "temperature": 0, "ignore_eos": True}).encode()
    req = urllib.request.Request(base + "/v1/completions", body, {"Content-Type": "application/json"})
    t0 = time.time()
    with urllib.request.urlopen(req, timeout=600) as r:
        resp = json.loads(r.read())
    out.append((resp["usage"]["completion_tokens"], time.time() - t0))

one(prompts[0], [])  # warm-up
single = None
for n in levels:
    out = []
    threads = [threading.Thread(target=one, args=(prompts[i % len(prompts)], out)) for i in range(n)]
    t0 = time.time()
    for t in threads: t.start()
    for t in threads: t.join()
    wall = time.time() - t0
    toks = sum(o[0] for o in out)
    tps = toks / wall
    single = single or tps
    print(f"concurrency {n:2}: {tps:7.1f} output tok/s aggregate ({tps/single:.2f}x single stream), wall {wall:.2f} s")
