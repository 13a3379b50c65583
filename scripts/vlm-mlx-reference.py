#!/usr/bin/env python3
"""Writes testdata/reference/vlm-mlx-rand-mlx-vlm.json: what mlx-vlm computes on the MLX-quantized conversions of
the two vision test models (`scripts/fetch-model.sh vlm-mlx`: `mlx_vlm convert -q --q-bits 4 --q-group-size 64`
of SmolVLM-rand and Qwen2.5-VL-rand, f32 like their sources) for chats with one image from testdata/images: the
prompt ids its processor builds, and 16 greedy ids with each step's top-1/top-2 log-probability gap (the logit
gap: log-softmax keeps differences), from the same run.

Needs mlx[cpu]==0.32.4, mlx-vlm==0.7.10 (installed with --no-deps; it then needs Pillow and transformers 5.x).

Usage: scripts/vlm-mlx-reference.py models/mlx/SmolVLM-rand-4bit models/mlx/Qwen2.5-VL-rand-4bit
"""
import hashlib, json, os, sys
import mlx.core as mx
import mlx_vlm
from mlx_vlm import load
from mlx_vlm.generate.dispatch import _prepare_generation_inputs, stream_generate
from mlx_vlm.prompt_utils import apply_chat_template

root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
CHATS = [
    ("circle", "red_circle_512.png", "Describe this image."),
    ("wide", "stripes_800x300.png", "What colours are these stripes?"),
    ("small", "green_square_96x64.png", "Color?"),
    ("odd", "shapes_333x517.png", "Count the shapes."),
]
MAX_NEW = 16


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


out = {"engine": f"mlx-vlm {mlx_vlm.__version__}, mlx {mx.__version__} ({mx.default_device()})",
       "max_new_tokens": MAX_NEW,
       "notes": "Greedy (temperature 0), batch 1; the chat is one user message: the image, then the text. "
                "prompt_ids from mlx-vlm's processor; output_ids include the stop token when finish is 'stop'; "
                "gaps[k] = top-1 minus top-2 log-probability at output step k.",
       "models": []}
for d in sys.argv[1:]:
    model, processor = load(d)
    config = model.config
    items = []
    for name, image, text in CHATS:
        path = os.path.join(root, "testdata/images", image)
        prompt = apply_chat_template(processor, config, text, num_images=1)
        input_ids, _, _, _ = _prepare_generation_inputs(model, processor, prompt, [path], None, None, {})
        ids, gaps, finish = [], [], "length"
        for r in stream_generate(model, processor, prompt, image=[path], max_tokens=MAX_NEW, temperature=0.0):
            if r.token is None:
                continue
            lp = mx.array(r.logprobs) if not isinstance(r.logprobs, mx.array) else r.logprobs
            top2 = mx.sort(lp.reshape(-1))[-2:].tolist()
            ids.append(int(r.token))
            gaps.append(round(top2[1] - top2[0], 4))
            if r.finish_reason:
                finish = r.finish_reason
        items.append({"name": name, "image": image, "text": text, "prompt_text": prompt,
                      "prompt_ids": input_ids.flatten().tolist(), "output_ids": ids[:MAX_NEW],
                      "gaps": gaps[:MAX_NEW], "finish": finish})
        print(d, name, ids[:8], min(gaps) if gaps else None, file=sys.stderr)
    out["models"].append({"dir": os.path.basename(os.path.normpath(d)),
                          "model_sha256": sha256(os.path.join(d, "model.safetensors")), "items": items})
dst = os.path.join(root, "testdata/reference/vlm-mlx-rand-mlx-vlm.json")
with open(dst, "w") as f:
    json.dump(out, f, indent=1)
print("wrote", dst, file=sys.stderr)
