#!/usr/bin/env python3
"""Greedy reference ids from a running llama.cpp `llama-server` (the peer) on the shared prompt set.

Usage: scripts/llama-reference.py URL MODEL_NAME SOURCE_FILE OUT.json [--chat gemma]

Each prompt is tokenized by llama.cpp itself (`/tokenize`, BOS added as the GGUF asks); chat prompts are
rendered first in the model's chat format (`--chat gemma`: Gemma's turn markers, written here by hand, not
with our template code). Output: the first 32 greedy ids (top-k 1, no prompt cache) and, per step, llama.cpp's
own top-1 minus top-2 log-probability (= the logit gap), the same shape as the shared reference files.
"""
import json, sys, urllib.request

url, name, source, out = sys.argv[1:5]
chat = sys.argv[6] if len(sys.argv) > 6 and sys.argv[5] == "--chat" else None
N = 32


def post(path, body):
    req = urllib.request.Request(url + path, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req) as r:
        return json.load(r)


def render_gemma(messages):
    # Gemma's format: a system message is folded into the first user turn; assistant turns are "model".
    text, prefix = "<bos>", ""
    if messages and messages[0]["role"] == "system":
        prefix = messages[0]["content"] + "\n\n"
        messages = messages[1:]
    for i, m in enumerate(messages):
        role = "model" if m["role"] == "assistant" else m["role"]
        text += f"<start_of_turn>{role}\n" + (prefix if i == 0 else "") + m["content"].strip() + "<end_of_turn>\n"
    return text + "<start_of_turn>model\n"


import os
prompts = json.load(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "testdata", "reference", "prompts.json")))
items = []
kinds = [("completion", p) for p in prompts["completion"]]
if chat:
    kinds += [("chat", p) for p in prompts["chat"]]
for kind, p in kinds:
    if kind == "completion":
        ids = post("/tokenize", {"content": p, "add_special": True})["tokens"]
    else:
        ids = post("/tokenize", {"content": render_gemma(p), "add_special": False, "parse_special": True})["tokens"]
    r = post("/completion", {"prompt": ids, "n_predict": N, "top_k": 1, "samplers": ["top_k"], "n_probs": 2,
                             "cache_prompt": False, "return_tokens": True})
    probs = r["completion_probabilities"]
    out_ids = [s["id"] for s in probs]
    gaps = [s["top_logprobs"][0]["logprob"] - s["top_logprobs"][1]["logprob"] for s in probs]
    items.append({"kind": kind, "prompt": p, "prompt_ids": ids, "output_ids": out_ids, "step_gaps": gaps,
                  "text": r["content"], "finish": r.get("stop_type")})
json.dump({"model": name, "source_file": source, "engine": "llama.cpp llama-server",
           "engine_version": "llama.cpp 0c1e57098 (llama-cpp-python 0.3.36 vendor, CPU, 2 threads)",
           "notes": "Greedy (top_k sampler only), prompt ids from llama.cpp's own /tokenize, no prompt cache; "
                    "output_ids include a stop token; step_gaps are llama.cpp's top-1 minus top-2 logprob "
                    "(its own quantized arithmetic), the near-tie measure.",
           "items": items}, open(out, "w"), indent=1)
print(f"{len(items)} items -> {out}")
