#!/usr/bin/env python3
"""Speculative decoding through `mlx-serving serve` and `generate`, driven by the official `openai` client.

Usage: speculative_server.py BINARY SMOLLM2_GGUF DRAFT_DIR OTHER_VOCAB_GGUF

A server without speculation gives the reference; servers with n-gram lookup (`--speculative-method ngram`)
and with a draft model (`--draft-model`, the MLX 4-bit SmolLM2, whose distribution differs) must give the same
token ids: greedy, alone and 8 at once, streamed and not, seeded sampling, a JSON schema; `speculative: false`
opts a request out; /metrics counts drafts, accepted tokens and accepted tokens per position; `generate` with
the same flags gives the same ids; bad settings and a draft with another vocabulary stop the start.
"""
import json, os, subprocess, sys, threading

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import check, http, metrics, start, stop  # noqa: E402
import harness  # noqa: E402
from openai import OpenAI  # noqa: E402

binary, model, draft, other = sys.argv[1:5]
COMMON = ["--model", model, "--served-model-name", "smol", "--threads", "2", "--kv-cache-mb", "64"]
PASSAGE = ("def area(radius):\n    return 3.14159 * radius * radius\n\n"
           "def perimeter(radius):\n    return 2 * 3.14159 * radius\n")
PROMPTS = [
    "Write a haiku about the sea.",
    "What is the capital of France?",
    f"Rewrite this code with type hints, changing nothing else:\n{PASSAGE}",
    "Repeat exactly: the quick brown fox jumps over the lazy dog, the quick brown fox jumps over the lazy dog.",
]
SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
          "required": ["name", "age"], "additionalProperties": False}


def chat(client, prompt, **kw):
    extra = {"return_token_ids": True, **kw.pop("extra", {})}
    r = client.chat.completions.create(model="smol", messages=[{"role": "user", "content": prompt}],
                                       max_tokens=kw.pop("max_tokens", 40), extra_body=extra, **kw)
    return r.choices[0].message.content, r.choices[0].model_extra["token_ids"]


def answers(client, **kw):
    return [chat(client, p, temperature=0, **kw) for p in PROMPTS]


def concurrent(client):
    out = [None] * 8
    def one(i):
        out[i] = chat(client, PROMPTS[i % len(PROMPTS)], temperature=0)
    ts = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    [t.start() for t in ts]
    [t.join() for t in ts]
    return out


def streamed(client, prompt):
    s = client.chat.completions.create(model="smol", messages=[{"role": "user", "content": prompt}], max_tokens=40,
                                       temperature=0, stream=True, stream_options={"include_usage": True})
    text, usage = "", None
    for c in s:
        if c.choices and c.choices[0].delta.content:
            text += c.choices[0].delta.content
        usage = c.usage or usage
    return text, usage.completion_tokens


def seeded(client):
    return [chat(client, p, temperature=0.8, top_p=0.95, seed=7 + i, max_tokens=24)[1] for i, p in enumerate(PROMPTS)]


def schema(client):
    r = client.chat.completions.create(
        model="smol", messages=[{"role": "user", "content": "Invent a person; answer in JSON with name and age."}],
        max_tokens=60, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}})
    return r.choices[0].message.content


# The reference: no speculation.
plain, port = start(binary, COMMON)
client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x")
want = answers(client)
want_stream = [streamed(client, p) for p in PROMPTS[2:]]
want_seeded = seeded(client)
want_schema = schema(client)
check(json.loads(want_schema).keys() == {"name", "age"}, "the reference JSON answer matches the schema")
stop(plain)

for name, flags in [("ngram", ["--speculative-method", "ngram"]), ("draft", ["--draft-model", draft])]:
    proc, port = start(binary, COMMON + flags + ["--num-speculative-tokens", "4"])
    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x")
    got = answers(client)
    for i, (g, w) in enumerate(zip(got, want)):
        check(g == w, f"{name}: prompt {i}: the same ids and text as without speculation")
    together = concurrent(client)
    check(all(t == want[i % len(PROMPTS)] for i, t in enumerate(together)), f"{name}: 8 at once give the same ids")
    check([streamed(client, p) for p in PROMPTS[2:]] == want_stream,
          f"{name}: streamed text and completion_tokens equal the reference")
    check(seeded(client) == want_seeded, f"{name}: seeded sampling gives the same ids as without speculation")
    check(schema(client) == want_schema, f"{name}: a JSON-schema answer is the same, constraint and all")
    m = metrics(port)
    drafts = m.get('mlx_serving:spec_decode_num_draft_tokens{model_name="smol"}', 0)
    accepted = m.get('mlx_serving:spec_decode_num_accepted_tokens{model_name="smol"}', 0)
    first = m.get('mlx_serving:spec_decode_num_accepted_tokens_per_pos{model_name="smol",position="0"}', -1)
    check(0 < accepted < drafts and m.get('mlx_serving:spec_decode_num_drafts{model_name="smol"}', 0) > 0,
          f"{name}: /metrics counts drafts ({drafts:.0f}) and accepted tokens ({accepted:.0f})")
    check(0 < first <= accepted, f"{name}: accepted tokens per position, position 0 = {first:.0f}")
    before = metrics(port)['mlx_serving:spec_decode_num_draft_tokens{model_name="smol"}']
    out = chat(client, PROMPTS[3], temperature=0, extra={"speculative": False})
    after = metrics(port)['mlx_serving:spec_decode_num_draft_tokens{model_name="smol"}']
    check(out == want[3] and after == before, f"{name}: `speculative: false` opts out (no drafts), same ids")
    status, _, body = http(port, "POST", "/v1/chat/completions",
                           {"model": "smol", "messages": [{"role": "user", "content": "hi"}], "speculative": "no"})
    check(status == 400 and body["error"]["type"] == "invalid_request_error", f"{name}: a non-boolean `speculative` is a 400")
    stop(proc)


def generate(extra):
    r = subprocess.run([binary, "generate", "--model", model, "--threads", "2", "--max-tokens", "40", "--json",
                        "--prompt", PROMPTS[3]] + extra, capture_output=True, text=True, check=True)
    return json.loads(r.stdout)


g_plain = generate([])
for extra in (["--speculative-method", "ngram"], ["--draft-model", draft, "--num-speculative-tokens", "3"]):
    g = generate(extra)
    check(g["token_ids"] == g_plain["token_ids"] and g["text"] == g_plain["text"],
          f"generate {' '.join(extra[:2])}: the same ids as without speculation")
    spec = g["speculative"]
    check(spec["draft_tokens"] > 0 and len(spec["accepted_per_position"]) <= 4,
          f"generate {' '.join(extra[:2])}: reports its drafts ({spec})")
check(g_plain["speculative"] is None, "generate without speculation reports none")


def fails(args, needle):
    r = subprocess.run([binary, "serve", "--port", "1"] + args, capture_output=True, text=True, timeout=300)
    return r.returncode != 0 and needle in r.stderr


check(fails(COMMON + ["--speculative-method", "medusa"], "speculative.method"), "an unknown method stops the start")
check(fails(COMMON + ["--speculative-method", "ngram", "--num-speculative-tokens", "0"], "num_speculative_tokens"),
      "zero speculative tokens stops the start")
check(fails(COMMON + ["--draft-model", other], "vocabulary"), "a draft with another vocabulary stops the start")
print(f"all {harness.checks} checks passed")
