#!/usr/bin/env python3
"""Rewrites a GGUF with every 2-D weight in another type (llama.cpp's `gguf` package does the arithmetic),
for benchmarks against llama.cpp on the same weights: `BF16` (the bf16 Hugging Face directory's values) or
`Q4_0` (the bits per weight nearest MLX 4-bit). Norms and other 1-D tensors stay f32; metadata is copied.

Usage: scripts/requant-gguf.py IN.gguf OUT.gguf BF16|Q4_0|Q8_0
"""
import sys

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter
from gguf.quants import dequantize, quantize

src, dst, kind = sys.argv[1], sys.argv[2], sys.argv[3]
qtype = GGMLQuantizationType[kind]
r = GGUFReader(src)
arch = r.fields["general.architecture"].contents()
w = GGUFWriter(dst, arch)
for name, f in r.fields.items():
    if name.startswith("GGUF.") or name in ("general.architecture", "general.file_type"):
        continue
    vt = f.types[0]
    if vt == GGUFValueType.ARRAY:
        w.add_array(name, f.contents())
    elif vt == GGUFValueType.STRING:
        w.add_string(name, f.contents())
    else:
        w.add_key_value(name, f.contents(), vt)
w.add_file_type({"BF16": 32, "Q4_0": 2, "Q8_0": 7}[kind])
for t in r.tensors:
    values = dequantize(t.data, t.tensor_type).reshape([int(d) for d in reversed(t.shape)]).astype(np.float32)
    if values.ndim == 2 and values.shape[1] % 32 == 0:
        data = quantize(values, qtype)
        w.add_tensor(t.name, data, raw_dtype=qtype)
    else:
        w.add_tensor(t.name, values)
w.write_header_to_file()
w.write_kv_data_to_file()
w.write_tensors_to_file()
w.close()
print(f"{src} -> {dst} ({kind})")
