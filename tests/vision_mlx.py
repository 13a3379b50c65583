#!/usr/bin/env python3
"""Vision models from mlx-vlm's MLX directories (4-bit text model and connector, channels-last convolutions,
`language_model.` / `vision_model.` / `vision_tower.` names), through `mlx-serving serve` and the official client.

Usage: vision_mlx.py BINARY SMOLVLM_MLX_DIR QWEN25VL_MLX_DIR   (scripts/fetch-model.sh vlm-mlx)

For each: /v1/models says it takes images; /tokenize gives mlx-vlm's prompt ids; greedy ids equal mlx-vlm's or
first differ where mlx-vlm's top-1/top-2 gap is under 0.25 (testdata/reference/vlm-mlx-rand-mlx-vlm.json,
scripts/vlm-mlx-reference.py); four chats at once give the ids each gives alone.
"""
import base64, hashlib, json, os, sys, threading

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import check, http, start, stop  # noqa: E402
from openai import OpenAI  # noqa: E402

binary, dirs = sys.argv[1], sys.argv[2:]
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
REF = json.load(open(os.path.join(ROOT, "testdata/reference/vlm-mlx-rand-mlx-vlm.json")))
IMAGES = os.path.join(ROOT, "testdata/images")
NEAR_TIE = 0.25


def messages(item):
    with open(os.path.join(IMAGES, item["image"]), "rb") as f:
        url = "data:image/png;base64," + base64.b64encode(f.read()).decode()
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": item["text"]}]}]


for d in dirs:
    ref = next(m for m in REF["models"] if m["dir"] == os.path.basename(os.path.normpath(d)))
    with open(os.path.join(d, "model.safetensors"), "rb") as f:
        check(hashlib.sha256(f.read()).hexdigest() == ref["model_sha256"], f"{ref['dir']}: the files the reference used")
    proc, port = start(binary, ["--model", d, "--served-model-name", "vlm", "--threads", "2", "--kv-cache-mb", "64",
                        "--kv-cache-dtype", "f32", "--activations", "f32"])
    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=300)
    card = http(port, "GET", "/v1/models/vlm")[2]
    check(card.get("capabilities", {}).get("vision") is True, f"{ref['dir']}: /v1/models says it takes images")

    def chat(item):
        r = client.chat.completions.create(model="vlm", messages=messages(item), max_tokens=REF["max_new_tokens"],
                                           temperature=0, extra_body={"return_token_ids": True})
        return r.choices[0].model_extra["token_ids"]

    alone = {}
    for item in ref["items"]:
        st, _, tok = http(port, "POST", "/tokenize", {"model": "vlm", "messages": messages(item)})
        check(st == 200 and tok["tokens"] == item["prompt_ids"], f"{ref['dir']} {item['name']}: mlx-vlm's prompt ids")
        ids = chat(item)
        want, gaps = item["output_ids"], item["gaps"]
        k = next((i for i, (a, b) in enumerate(zip(ids, want)) if a != b), None)
        same = k is None and ids[:len(want)] == want
        check(same or k is not None and gaps[k] < NEAR_TIE,
              f"{ref['dir']} {item['name']}: greedy ids match mlx-vlm's "
              f"({'identical' if same else f'first differ at {k}, gap {gaps[k] if k is not None else None}'})")
        alone[item["name"]] = ids
    got = {}
    threads = [threading.Thread(target=lambda it=it: got.__setitem__(it["name"], chat(it))) for it in ref["items"]]
    [t.start() for t in threads]
    [t.join() for t in threads]
    check(all(got[n] == alone[n] for n in alone), f"{ref['dir']}: four at a time, the same ids")
    stop(proc)
print("vision_mlx: all checks passed")
