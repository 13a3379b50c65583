#!/usr/bin/env python3
"""Adds exact-arithmetic step gaps to a reference file: mlx-lm (f32) on a Hugging Face f32 directory of the same
weights, teacher-forced along the reference's own output ids, gives at each output position its top-1 minus
top-2 logit as `f32_step_gaps`. A quantized peer's own gaps (llama.cpp's `step_gaps`) carry its rounding; these
say where the model itself is at a near-tie.

  scripts/f32-gaps.py HF_F32_DIR REFERENCE.json   (rewrites REFERENCE.json)

Needs `mlx[cpu]` and `mlx-lm`. The directory: `mlx-serving convert --from MODEL.gguf --to DIR --dtype f32`.
"""
import json, sys

import mlx.core as mx
from mlx_lm import load

model_dir, ref = sys.argv[1], sys.argv[2]
model, _ = load(model_dir)
d = json.load(open(ref))
for it in d["items"]:
    out = it["output_ids"]
    logits = model(mx.array([it["prompt_ids"] + out]))[0].astype(mx.float32)
    n = len(it["prompt_ids"])
    gaps = []
    for j in range(len(out)):
        top2 = mx.sort(logits[n - 1 + j])[-2:].tolist()
        gaps.append(top2[1] - top2[0])
    it["f32_step_gaps"] = gaps
d["f32_step_gaps_source"] = (f"mlx-lm 0.32.2 in f32 on {model_dir} (the GGUF's weights dequantized to f32 by "
                             "`mlx-serving convert --dtype f32`), teacher-forced along output_ids")
json.dump(d, open(ref, "w"), indent=1)
print(f"{len(d['items'])} items: f32_step_gaps added to {ref}")
