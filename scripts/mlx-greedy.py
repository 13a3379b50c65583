#!/usr/bin/env python3
"""mlx-lm's own greedy ids on an MLX (or Hugging Face) directory, for the reference prompt set: the other side of
our MLX loader's differential test. Needs `mlx[cpu]` and `mlx-lm` (they run on x86 Linux).

  scripts/mlx-greedy.py MODEL_DIR REFERENCE.json OUT.json [max_tokens=32]

REFERENCE.json is one of testdata/reference/greedy-*.json (its items' `prompt_ids` are used as they are).
Writes {"model", "items": [{"prompt_ids", "output_ids"}]}, stopping early at an end-of-generation token.
"""
import json, sys

import mlx.core as mx
from mlx_lm import load
from mlx_lm.generate import generate_step

model_dir, ref, out = sys.argv[1], sys.argv[2], sys.argv[3]
max_tokens = int(sys.argv[4]) if len(sys.argv) > 4 else 32
model, tokenizer = load(model_dir)
eos = set(tokenizer.eos_token_ids)
items = []
for item in json.load(open(ref))["items"]:
    ids = []
    steps = generate_step(mx.array(item["prompt_ids"]), model, max_tokens=max_tokens,
                          sampler=lambda logits: mx.argmax(logits, axis=-1))
    for token, _ in steps:
        ids.append(int(token))
        if int(token) in eos:
            break
    items.append({"prompt_ids": item["prompt_ids"], "output_ids": ids})
    print(f"item {len(items)}: {len(ids)} tokens", flush=True)
json.dump({"model": model_dir, "items": items}, open(out, "w"))
print(f"ok: {out} ({len(items)} items)")
