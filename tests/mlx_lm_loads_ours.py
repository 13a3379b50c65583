#!/usr/bin/env python3
"""`convert --format mlx` output is a real MLX directory: mlx-lm loads what our `convert` wrote and its greedy
ids on it equal ours on it, up to near-ties (where they first differ, mlx-lm's own top-1 minus top-2 logit is
under 0.5).

  tests/mlx_lm_loads_ours.py MLX_SERVING_BINARY GGUF

Needs `mlx[cpu]` and `mlx-lm` (scripts/test.sh installs them). mlx-lm runs in f32 (the bf16 scales widened on
load): MLX's bf16 arithmetic is emulated on x86 and far slower.
"""
import json, os, subprocess, sys, tempfile

import mlx.core as mx
from mlx.utils import tree_map
from mlx_lm import load
from mlx_lm.generate import generate_step

binary, gguf = sys.argv[1], sys.argv[2]
root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
prompts = json.load(open(os.path.join(root, "testdata", "reference", "prompts.json")))["completion"][:6]
N, NEAR_TIE = 24, 0.5

with tempfile.TemporaryDirectory() as out:
    subprocess.run([binary, "convert", "--from", gguf, "--to", out, "--format", "mlx", "--bits", "4"], check=True)
    model, tokenizer = load(out)
    model.update(tree_map(lambda a: a.astype(mx.float32) if a.dtype == mx.bfloat16 else a, model.parameters()))
    failures, identical = [], 0
    for p in prompts:
        ours = json.loads(subprocess.run([binary, "generate", "--model", out, "--prompt", p, "--max-tokens", str(N),
                                          "--ignore-eos", "--json"], check=True, capture_output=True).stdout)
        theirs, gaps = [], []
        steps = generate_step(mx.array(ours["prompt_token_ids"]), model, max_tokens=N,
                              sampler=lambda logprobs: mx.argmax(logprobs, axis=-1))
        for token, logprobs in steps:
            top2 = mx.sort(logprobs)[-2:].tolist()
            theirs.append(int(token))
            gaps.append(top2[1] - top2[0])
        # mlx-lm's ids continue from its own choices; compare up to the first difference.
        j = next((i for i, (a, b) in enumerate(zip(ours["token_ids"], theirs)) if a != b), None)
        if j is None:
            identical += 1
            print(f"{p[:40]!r}: identical ({len(theirs)} tokens)")
        else:
            print(f"{p[:40]!r}: first difference at {j}, mlx-lm's gap {gaps[j]:.4f}")
            if gaps[j] >= NEAR_TIE:
                failures.append(f"{p!r}: differs at {j} where mlx-lm's top-1 leads by {gaps[j]:.4f}")
    print(f"{identical}/{len(prompts)} identical over {N} tokens")
    if failures:
        sys.exit("divergences at non-tie positions:\n" + "\n".join(failures))
