#!/usr/bin/env python3
"""Identical deterministic requests in flight share one generation (#22), through a real `mlx-serving serve` and
the official `openai` client.

Usage: coalescing.py BINARY SMOLLM2_GGUF

- 16 identical greedy streams started together: one engine request (the prompt-token counter moves once,
  `coalesced_requests_total` counts 15), every stream complete and identical to the same request run alone.
- Seeded sampling shares too; non-streamed callers get the same body as streamed ones' text.
- 8 identical streams of which 4 disconnect early: the other 4 finish whole; the engine ends idle.
- Never shared: unseeded sampling, or a request differing in one field (max_tokens, the seed, the API key).
"""
import os, sys, threading, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import check, metrics, start, stop  # noqa: E402
import harness  # noqa: E402
from openai import OpenAI  # noqa: E402

binary, model = sys.argv[1:3]
PROMPT = "Write a long story about a lighthouse keeper and the sea."
LABEL = '{model_name="smol"}'


def together(fns):
    """Runs the callables at once (released by a barrier); returns their results in order."""
    out, gate = [None] * len(fns), threading.Barrier(len(fns))
    def one(i):
        gate.wait()
        out[i] = fns[i]()
    ts = [threading.Thread(target=one, args=(i,)) for i in range(len(fns))]
    [t.start() for t in ts]
    [t.join() for t in ts]
    return out


def stream(client, stop_after=None, **kw):
    s = client.chat.completions.create(model="smol", messages=[{"role": "user", "content": PROMPT}], stream=True,
                                       **{"max_tokens": 160, "temperature": 0, **kw})
    text, chunks = "", 0
    for c in s:
        if c.choices and c.choices[0].delta.content:
            text += c.choices[0].delta.content
        chunks += 1
        if stop_after is not None and chunks >= stop_after:
            s.close()
            return None
    return text


def whole(client, **kw):
    r = client.chat.completions.create(model="smol", messages=[{"role": "user", "content": PROMPT}],
                                       **{"max_tokens": 160, "temperature": 0, **kw})
    return r.choices[0].message.content


def counters(port):
    m = metrics(port)
    return m.get(f"mlx_serving:prompt_tokens_total{LABEL}", 0), m.get(f"mlx_serving:coalesced_requests_total{LABEL}", 0)


proc, port = start(binary, ["--model", model, "--served-model-name", "smol", "--threads", "2", "--kv-cache-mb", "64",
                            "--api-key", "alpha"])
client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="alpha")
solo = stream(client, extra_body={"ignore_eos": True})
p0, c0 = counters(port)
prompt_len = p0  # one request so far
got = together([lambda: stream(client, extra_body={"ignore_eos": True}) for _ in range(16)])
p1, c1 = counters(port)
check(all(g == solo for g in got), "16 identical streams are complete and equal to the request alone")
check(p1 - p0 == prompt_len, f"one engine request for the 16 ({(p1 - p0) / prompt_len:.0f} ran)")
check(c1 - c0 == 15, f"15 requests joined the first one's generation ({c1 - c0:.0f})")

seeded = dict(temperature=0.9, seed=11, extra_body={"ignore_eos": True})
alone = stream(client, **seeded)
p0, c0 = counters(port)
got = together([lambda: stream(client, **seeded)] * 3 + [lambda: whole(client, **seeded)] * 3)
p1, c1 = counters(port)
check(all(g == alone for g in got), "seeded sampling shares too; whole bodies equal the streamed text")
check(p1 - p0 == prompt_len and c1 - c0 == 5, "six seeded requests, one generation")

p0, c0 = counters(port)
got = together([lambda: stream(client, extra_body={"ignore_eos": True})] * 4
               + [lambda i=i: stream(client, stop_after=3 + i, extra_body={"ignore_eos": True}) for i in range(4)])
check(all(g == solo for g in got[:4]), "4 of 8 shared streams disconnect early: the other 4 finish whole")
for _ in range(100):
    m = metrics(port)
    if m.get(f"mlx_serving:num_requests_running{LABEL}", 1) == 0 and m.get(f"mlx_serving:kv_cache_usage_perc{LABEL}", 1) == 0:
        break
    time.sleep(0.1)
check(m[f"mlx_serving:num_requests_running{LABEL}"] == 0 and m[f"mlx_serving:kv_cache_usage_perc{LABEL}"] == 0,
      "the engine ends idle, every block free")

p0, c0 = counters(port)
together([lambda: stream(client, temperature=0.9, max_tokens=40)] * 4)
p1, c1 = counters(port)
check(c1 == c0 and p1 - p0 == 4 * prompt_len, "unseeded sampling is never shared")
together([lambda i=i: stream(client, max_tokens=60 + i, extra_body={"ignore_eos": True}) for i in range(3)]
         + [lambda i=i: stream(client, temperature=0.9, seed=100 + i, max_tokens=40) for i in range(3)])
p2, c2 = counters(port)
check(c2 == c1 and p2 - p1 == 6 * prompt_len, "requests differing in max_tokens or the seed are not shared")
stop(proc)

# Two API keys: the same request under different keys is never shared (one tenant cannot learn another's
# prompts from timing).
import tempfile  # noqa: E402
keys = tempfile.NamedTemporaryFile("w", suffix=".keys", delete=False)
keys.write("alpha\nbeta\n")
keys.close()
proc, port = start(binary, ["--model", model, "--served-model-name", "smol", "--threads", "2", "--kv-cache-mb", "64",
                            "--api-key-file", keys.name])
a = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="alpha")
b = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="beta")
stream(a, max_tokens=8)
p0, c0 = counters(port)
got = together([lambda: stream(a, extra_body={"ignore_eos": True}), lambda: stream(b, extra_body={"ignore_eos": True})])
p1, c1 = counters(port)
check(got[0] == got[1] == solo and c1 == c0 and p1 - p0 == 2 * prompt_len, "different API keys never share")
stop(proc)
os.unlink(keys.name)
print(f"all {harness.checks} checks passed")
