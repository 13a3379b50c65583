#!/usr/bin/env python3
"""Writes testdata/reference/idefics3-pixels.json: for each PNG in testdata/images (plus a few sizes this script
draws into testdata/images/sizes/), the tile grid and a sha256 of the 8-bit tiles that transformers' Idefics3
image processor (Pillow) makes with SmolVLM-rand's preprocessor_config.json; our Rust preprocessing must give
the same bytes. Needs transformers, Pillow and numpy.

Usage: scripts/vlm-pixel-reference.py models/SmolVLM-rand
"""
import glob, hashlib, json, os, sys
import numpy as np
from PIL import Image
from transformers import AutoImageProcessor

root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
proc = AutoImageProcessor.from_pretrained(sys.argv[1])
sizes = os.path.join(root, "testdata/images/sizes")
os.makedirs(sizes, exist_ok=True)
for w, h in [(1600, 1200), (37, 59), (1, 700), (513, 511), (2000, 90), (64, 48), (1023, 1025)]:
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([(x * 255 // max(1, w - 1)), (y * 255 // max(1, h - 1)), ((x * 7 + y * 13) % 256)], -1)
    Image.fromarray(img.astype(np.uint8)).save(os.path.join(sizes, f"grad_{w}x{h}.png"), optimize=True)
out = []
for f in sorted(glob.glob(os.path.join(root, "testdata/images/*.png")) + glob.glob(os.path.join(sizes, "*.png"))):
    img = Image.open(f).convert("RGB")
    pv = proc(images=[[img]], return_tensors="np")["pixel_values"][0]
    u8 = np.rint((pv * 0.5 + 0.5) * 255).astype(np.uint8)
    out.append({"file": os.path.relpath(f, os.path.join(root, "testdata/images")), "width": img.width,
                "height": img.height, "tiles": int(pv.shape[0]), "sha256": hashlib.sha256(u8.tobytes()).hexdigest()})
json.dump({"processor": "transformers Idefics3ImageProcessor (Pillow), SmolVLM-rand preprocessor_config.json",
           "note": "sha256 of the tiles as uint8 [tiles, 3, 512, 512], global tile last", "items": out},
          open(os.path.join(root, "testdata/reference/idefics3-pixels.json"), "w"), indent=1)
print(f"{len(out)} images")
