#!/usr/bin/env python3
"""Writes testdata/reference/qwen25vl-rand-transformers.json: what transformers (f32, eager attention) computes on
Qwen2.5-VL-rand (testdata/vlm/make_qwen25vl.py) for a set of chats with images from testdata/images: the prompt
ids its processor builds (Qwen2VLImageProcessorPil: Pillow BICUBIC), each image's patch grid and a sha256 of its
pixels as uint8, the first step's top logits, and 12 greedy ids with each step's top-1/top-2 logit gap. Also
`pixels`: grid and hash for every image in testdata/images and testdata/images/sizes.
Needs torch, transformers (5.x), Pillow, numpy.

Usage: scripts/vlm-qwen-reference.py models/Qwen2.5-VL-rand
"""
import glob, hashlib, json, os, sys
import numpy as np
import torch
from PIL import Image
from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
d = sys.argv[1]
pre = json.load(open(os.path.join(d, "preprocessor_config.json")))
ip = Qwen2VLImageProcessorPil(min_pixels=pre["min_pixels"], max_pixels=pre["max_pixels"])
tok = AutoTokenizer.from_pretrained(d)
# No torchvision here (the video processor needs it): skip the processor's class check of its (absent) video part.
Qwen2_5_VLProcessor.check_argument_for_proper_class = lambda self, name, arg: None
proc = Qwen2_5_VLProcessor(image_processor=ip, tokenizer=tok, chat_template=json.load(open(os.path.join(d, "chat_template.json")))["chat_template"])
model = Qwen2_5_VLForConditionalGeneration.from_pretrained(d, dtype=torch.float32, attn_implementation="eager").eval()
MEAN, STD = np.array(pre["image_mean"], np.float32), np.array(pre["image_std"], np.float32)


def pixel_hash(pv):
    """pv: [patches, 3 * 2 * 14 * 14] -> uint8 values (both temporal copies) hashed."""
    x = pv.reshape(pv.shape[0], 3, -1)
    u8 = np.rint((x * STD[None, :, None] + MEAN[None, :, None]) * 255).astype(np.uint8)
    return hashlib.sha256(u8.tobytes()).hexdigest()


def load(name):
    return Image.open(os.path.join(root, "testdata/images", name)).convert("RGB")


pixels = []
for f in sorted(glob.glob(os.path.join(root, "testdata/images/*.png")) + glob.glob(os.path.join(root, "testdata/images/sizes/*.png"))):
    name = os.path.relpath(f, os.path.join(root, "testdata/images"))
    img = load(name)
    try:
        r = ip(images=[img], return_tensors="np")
    except ValueError as e:  # aspect ratio over 200
        pixels.append({"file": name, "width": img.width, "height": img.height, "error": str(e)})
        continue
    t, h, w = (int(v) for v in r["image_grid_thw"][0])
    pixels.append({"file": name, "width": img.width, "height": img.height, "grid": [t, h, w],
                   "sha256": pixel_hash(r["pixel_values"])})

CHATS = [
    ("one", [("red_circle_512.png",)], "What is in this picture?"),
    ("wide", [("stripes_800x300.png",)], "Describe it."),
    ("tall", [("checker_300x800.png",)], "What pattern is this?"),
    ("small", [("green_square_96x64.png",)], "Color?"),
    ("odd", [("shapes_333x517.png",)], "Count the shapes."),
    ("big", [("sizes/grad_1600x1200.png",)], "Describe the gradient."),
    ("two", [("gradient_640x480.png",), ("gray_ramp_400x400.png",)], "Compare the two images."),
    ("text-between", [("sizes/grad_64x48.png",), ("red_circle_512.png",)], None),
]
items = []
for name, imgs, text in CHATS:
    content = []
    if text is None:  # images with text between them
        content = [{"type": "text", "text": "First:"}, {"type": "image"}, {"type": "text", "text": "and second:"},
                   {"type": "image"}, {"type": "text", "text": "Which is brighter?"}]
    else:
        content = [{"type": "image"} for _ in imgs] + [{"type": "text", "text": text}]
    messages = [{"role": "user", "content": content}]
    prompt = proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    images = [load(i[0]) for i in imgs]
    inputs = proc(text=[prompt], images=images, return_tensors="pt")
    ids = inputs["input_ids"][0].tolist()
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=12, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=151643, eos_token_id=[])
    gen = out.sequences[0, len(ids):].tolist()
    gaps, first_top = [], None
    for step, lg in enumerate(out.logits):
        v, i = torch.topk(lg[0].float(), 20)
        gaps.append(float(v[0] - v[1]))
        if step == 0:
            first_top = [[int(a), float(b)] for a, b in zip(i, v)]
    grids = inputs["image_grid_thw"].tolist()
    items.append({"name": name, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": imgs[k][0]}} if c["type"] == "image" else c
        for k, c in zip(np.cumsum([c["type"] == "image" for c in content]) - 1, content)]}],
        "images": [i[0] for i in imgs], "grids": grids, "prompt_ids": ids, "greedy_ids": gen, "gaps": gaps,
        "first_top_logits": first_top})
    print(name, grids, len(ids), gen[:6], min(gaps))

json.dump({"model": "Qwen2.5-VL-rand (testdata/vlm/make_qwen25vl.py)",
           "reference": "transformers %s, float32, eager attention, Qwen2VLImageProcessorPil" % __import__("transformers").__version__,
           "note": "messages: image_url urls are file names under testdata/images",
           "items": items, "pixels": pixels},
          open(os.path.join(root, "testdata/reference/qwen25vl-rand-transformers.json"), "w"), indent=1)
print(f"{len(items)} chats, {len(pixels)} images")
