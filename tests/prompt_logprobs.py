#!/usr/bin/env python3
"""Prompt logprobs: `echo` with `logprobs` on /v1/completions and vLLM's `prompt_logprobs`, computed in the
prefill, through a real `mlx-serving serve` (f32 numerics) and the official `openai` client; then
lm-evaluation-harness's `local-completions` scoring a multiple-choice task from a local JSONL through them.

Usage: prompt_logprobs.py BINARY SMOLLM2_GGUF HF_TOKENIZER_DIR [LM_EVAL_PYTHONPATH]

1. Greedy generation with logprobs, then the prompt + generated ids echoed: each generated token's logprob as a
   prompt logprob equals its logprob when it was generated (prefill vs decode, within 2e-3); the first prompt
   token has none; alternatives hold the token; text and offsets follow the echoed text.
2. Streaming: the echo chunk carries the prompt's logprobs, then the generated tokens' follow.
3. Such requests compute the whole prompt (no prefix-cache hit), and repeat exactly.
4. vLLM's `prompt_logprobs`: per choice on completions, on the response for chat; ranks; bounds are 400s.
5. lm-eval 0.4.13 `local-completions` on testdata/eval/mc.jsonl (8 items): each choice's log-likelihood equals
   the sum of the continuation's echoed logprobs we compute here; accuracy is reported.
"""
import json, os, subprocess, sys, tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import check, http, start, stop  # noqa: E402
from openai import OpenAI  # noqa: E402

binary, model_path, tokenizer_dir = sys.argv[1], sys.argv[2], sys.argv[3]
lm_eval_path = sys.argv[4] if len(sys.argv) > 4 else None
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
M = "smol"
TOL = 2e-3

proc, port = start(binary, ["--model", model_path, "--served-model-name", M, "--threads", "2", "--kv-cache-mb", "64",
                            "--activations", "f32", "--kv-cache-dtype", "f32"])
client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=300)


def completion(**kw):
    st, _, body = http(port, "POST", "/v1/completions", {"model": M, "temperature": 0, **kw})
    check(st == 200, f"a completion answered ({st} {body if st != 200 else ''})")
    return body


# 1. Generation logprobs == echoed prompt logprobs.
prompt = "The three primary colours are"
gen = completion(prompt=prompt, max_tokens=10, logprobs=1, return_token_ids=True)
g = gen["choices"][0]
prompt_ids, out_ids = gen["prompt_token_ids"], g["token_ids"]
gen_lps = g["logprobs"]["token_logprobs"]
n = min(len(out_ids), len(gen_lps))
echo = completion(prompt=prompt_ids + out_ids[:n], max_tokens=1, logprobs=2, echo=True)
e = echo["choices"][0]["logprobs"]
k = len(prompt_ids)
check(len(e["tokens"]) == k + n + 1 and e["token_logprobs"][0] is None and e["top_logprobs"][0] is None,
      "echo: one entry per prompt token and the generated one; the first prompt token has no logprob")
diffs = [abs(a - b) for a, b in zip(e["token_logprobs"][k:k + n], gen_lps[:n])]
check(max(diffs) < TOL, f"each generated token's logprob again as a prompt logprob (max diff {max(diffs):.2e})")
check(all(t in alts and len(alts) <= 3 for t, alts in zip(e["tokens"][1:], e["top_logprobs"][1:])),
      "each prompt position's alternatives hold its token (up to logprobs + 1)")
check(all(lp <= 0 for lp in e["token_logprobs"][1:]), "logprobs are <= 0")
text = echo["choices"][0]["text"]
check(text.startswith("".join(e["tokens"][:k + n])), "the text starts with the echoed tokens")
offsets = e["text_offset"]
check(offsets == sorted(offsets) and offsets[0] == 0 and offsets[k] == len("".join(e["tokens"][:k])),
      "text offsets count the prompt's characters")
# The official client parses it.
r = client.completions.create(model=M, prompt=prompt, max_tokens=1, temperature=0, echo=True, logprobs=1)
lp = r.choices[0].logprobs
check(r.choices[0].text.startswith(prompt) and lp.token_logprobs[0] is None and len(lp.tokens) == k + 1,
      "the openai client reads echo + logprobs")

# 2. Streaming.
chunks = list(client.completions.create(model=M, prompt=prompt, max_tokens=4, temperature=0, echo=True,
                                        logprobs=1, stream=True))
first = chunks[0].choices[0]
check(first.text == prompt and first.logprobs is not None and len(first.logprobs.tokens) == k
      and first.logprobs.token_logprobs[0] is None, "the first streamed chunk is the echo with the prompt's logprobs")
streamed = [t for c in chunks[1:] for ch in c.choices if ch.logprobs for t in ch.logprobs.token_logprobs]
plain = completion(prompt=prompt, max_tokens=4, logprobs=1)["choices"][0]["logprobs"]["token_logprobs"]
check(len(streamed) == len(plain) and max(abs(a - b) for a, b in zip(streamed, plain)) < TOL,
      "then the generated tokens' logprobs, as without echo")

# 3. No prefix-cache hit, and the same numbers again (a prompt of several KV blocks, seen before).
long = "Red, yellow and blue are the three primary colours of paint, and artists mix them. " * 4
completion(prompt=long, max_tokens=1)
first_lp = completion(prompt=long, max_tokens=1, logprobs=2, echo=True)
again = completion(prompt=long, max_tokens=1, logprobs=2, echo=True)
check(first_lp["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
      and again["usage"]["prompt_tokens_details"]["cached_tokens"] == 0,
      "a prompt-logprobs request computes its whole prompt, cached or not")
check(again["choices"][0]["logprobs"]["token_logprobs"] == first_lp["choices"][0]["logprobs"]["token_logprobs"],
      "and repeats exactly")
plain_again = completion(prompt=long, max_tokens=1)
check(plain_again["usage"]["prompt_tokens_details"]["cached_tokens"] > 0, "while a plain request hits the cache it left")

# Past one step's prompt-logprobs chunk (512 tokens): a position's logprob depends only on the tokens before it.
ids = http(port, "POST", "/tokenize", {"model": M, "prompt": long * 10})[2]["tokens"][:700]
whole = completion(prompt=ids, max_tokens=1, logprobs=0, echo=True)["choices"][0]["logprobs"]["token_logprobs"]
part = completion(prompt=ids[:600], max_tokens=1, logprobs=0, echo=True)["choices"][0]["logprobs"]["token_logprobs"]
check(len(whole) == 701 and whole[:600] == part[:600] and all(x is not None for x in whole[1:]),
      "a 700-token prompt's logprobs (two chunks) equal a 600-token prefix's, position by position")

# 4. vLLM's prompt_logprobs.
v = completion(prompt=prompt, max_tokens=2, prompt_logprobs=3)["choices"][0]["prompt_logprobs"]
check(len(v) == k and v[0] is None, "completions: prompt_logprobs per choice, null first")
ok = True
for pos, entry in enumerate(v[1:], start=1):
    own = entry[str(prompt_ids[pos])]
    ranks = sorted(x["rank"] for x in entry.values())
    ok &= own["logprob"] <= 0 and ranks == sorted({1, 2, 3} | {own["rank"]})
check(ok, "each position: the prompt token with its rank, and the top alternatives ranked 1..3")
check(abs(v[1][str(prompt_ids[1])]["logprob"] - e["token_logprobs"][1]) < TOL, "the same numbers as echo's")
st, _, chat = http(port, "POST", "/v1/chat/completions", {"model": M, "messages": [{"role": "user", "content": "Hi"}],
                                                          "max_tokens": 2, "prompt_logprobs": 0})
check(st == 200 and len(chat["prompt_logprobs"]) == chat["usage"]["prompt_tokens"] and chat["prompt_logprobs"][0] is None,
      "chat: prompt_logprobs on the response, one per prompt token")
for bad in [{"prompt_logprobs": 21}, {"prompt_logprobs": -1}]:
    st, _, body = http(port, "POST", "/v1/completions", {"model": M, "prompt": "x", **bad})
    check(st == 400 and body["error"]["param"] == "prompt_logprobs", f"{bad}: a 400 naming prompt_logprobs")

# 5. lm-evaluation-harness, local-completions, on a multiple-choice task from a local file.
if lm_eval_path:
    items = [json.loads(line) for line in open(os.path.join(ROOT, "testdata/eval/mc.jsonl"))]
    tmp = tempfile.mkdtemp()
    with open(os.path.join(tmp, "mlx_mc.yaml"), "w") as f:
        f.write(f"""task: mlx_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {os.path.join(os.path.abspath(ROOT), "testdata/eval/mc.jsonl")}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{gold}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
""")
    env = {**os.environ, "PYTHONPATH": lm_eval_path, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    args = f"model={M},base_url=http://127.0.0.1:{port}/v1/completions,tokenizer_backend=huggingface," \
           f"tokenizer={tokenizer_dir},num_concurrent=2"
    out = os.path.join(tmp, "out")
    r = subprocess.run([sys.executable, "-m", "lm_eval", "--model", "local-completions", "--model_args", args,
                        "--tasks", "mlx_mc", "--include_path", tmp, "--output_path", out, "--log_samples"],
                       env=env, capture_output=True, text=True, timeout=900)
    check(r.returncode == 0, f"lm_eval ran ({r.stderr[-2000:]})")
    samples = [json.loads(line) for root, _, files in os.walk(out) for f in files
               if f.startswith("samples_") for line in open(os.path.join(root, f))]
    check(len(samples) == len(items), f"lm_eval scored all {len(items)} items")
    worst = 0.0
    for s in samples:
        doc = s["doc"]
        ctx = http(port, "POST", "/tokenize", {"model": M, "prompt": doc["question"]})[2]["tokens"]
        for choice, resp in zip(doc["choices"], s["filtered_resps"]):
            full = http(port, "POST", "/tokenize", {"model": M, "prompt": doc["question"] + choice})[2]["tokens"]
            lps = completion(prompt=full, max_tokens=1, logprobs=0, echo=True)["choices"][0]["logprobs"]
            ours = sum(lps["token_logprobs"][len(ctx):len(full)])
            worst = max(worst, abs(float(resp[0]) - ours))
    check(worst < TOL, f"lm_eval's log-likelihoods are the continuations' echoed logprobs (max diff {worst:.2e})")
    acc = sum(s["acc"] for s in samples) / len(samples)
    print(f"lm_eval mlx_mc (8 items, SmolLM2-135M): acc {acc:.3f}")
    check(acc >= 0.5, f"and the easy task mostly right (acc {acc:.3f})")
stop(proc)
print(f"prompt_logprobs: all {harness.checks} checks passed")
