#!/usr/bin/env python3
"""Writes a Hugging Face model directory from a GGUF file with tools other than ours, for the loader's
golden tests: the `gguf` package (llama.cpp's own Python reader and dequantizer) and numpy.

  scripts/make-hf-dir.py MODEL.gguf OUT_DIR TOKENIZER_DIR [--dtype f32|bf16|f16]

Weights are dequantized to f32 and written as `--dtype` safetensors (bf16 rounds to nearest even); llama's
Q/K rows get back the order Hugging Face keeps (llama.cpp's converter permutes them for interleaved RoPE).
`config.json`, `generation_config.json`, `tokenizer_config.json` and `tokenizer.json(.gz)` are the model's
real Hugging Face files from TOKENIZER_DIR (testdata/tokenizers/<model>/); without them, `config.json` is made
from the GGUF metadata and `tokenizer_config.json` from TOKENIZER_DIR/chat_template.jinja.
Re-running with the same arguments is a no-op when OUT_DIR/model.safetensors exists.
"""
import gzip, json, pathlib, sys

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize

src, out, tok_dir = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), pathlib.Path(sys.argv[3])
dtype = sys.argv[sys.argv.index("--dtype") + 1] if "--dtype" in sys.argv else "f32"
if (out / "model.safetensors").exists():
    print(f"ok: {out}")
    sys.exit(0)

r = GGUFReader(str(src))


def meta(key, default=None):
    f = r.fields.get(key)
    if f is None:
        return default
    v = f.parts[f.data[0]]
    if f.types and f.types[0].name == "STRING":
        return bytes(v).decode()
    return v.tolist()[0] if len(v) == 1 else v.tolist()


arch = meta("general.architecture")
k = lambda name, default=None: meta(f"{arch}.{name}", default)
n_head, n_kv = k("attention.head_count"), k("attention.head_count_kv", k("attention.head_count"))
hidden = k("embedding_length")
names = {
    "token_embd.weight": "model.embed_tokens.weight", "output.weight": "lm_head.weight",
    "output_norm.weight": "model.norm.weight",
}
layer_names = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}


def hf_name(n):
    if n in names:
        return names[n]
    _, layer, module, suffix = n.split(".", 3)
    return f"model.layers.{layer}.{layer_names[module]}.{suffix}"


def unpermute(w, heads):
    # Inverse of llama.cpp's convert_hf_to_gguf `permute`: rows (heads, 2, d/2) <- (heads, d/2, 2).
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


tensors = {}
for t in r.tensors:
    shape = [int(x) for x in reversed(t.shape.tolist())]  # GGUF lists dims innermost first
    w = dequantize(t.data, t.tensor_type).astype(np.float32).reshape(shape)
    if arch == "llama" and ".attn_q." in t.name:
        w = unpermute(w, n_head)
    if arch == "llama" and ".attn_k." in t.name:
        w = unpermute(w, n_kv)
    tensors[hf_name(t.name)] = w


def encode(w):
    if dtype == "f32":
        return "F32", w.astype("<f4").tobytes()
    if dtype == "f16":
        return "F16", w.astype("<f2").tobytes()
    bits = w.astype("<f4").view("<u4").astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype("<u2")  # round to nearest even
    return "BF16", rounded.tobytes()


header, blobs, offset = {}, [], 0
for name in sorted(tensors):
    kind, data = encode(tensors[name])
    header[name] = {"dtype": kind, "shape": list(tensors[name].shape), "data_offsets": [offset, offset + len(data)]}
    blobs.append(data)
    offset += len(data)
head = json.dumps(header).encode()
head += b" " * (-len(head) % 8)
out.mkdir(parents=True, exist_ok=True)
tmp = out / "model.safetensors.part"
with open(tmp, "wb") as f:
    f.write(len(head).to_bytes(8, "little"))
    f.write(head)
    for b in blobs:
        f.write(b)

vocab = len(r.fields["tokenizer.ggml.tokens"].data)
config = {
    "architectures": ["LlamaForCausalLM" if arch == "llama" else "Qwen2ForCausalLM"],
    "model_type": arch,
    "hidden_size": hidden,
    "intermediate_size": k("feed_forward_length"),
    "num_hidden_layers": k("block_count"),
    "num_attention_heads": n_head,
    "num_key_value_heads": n_kv,
    "vocab_size": vocab,
    "max_position_embeddings": k("context_length"),
    "rope_theta": float(k("rope.freq_base", 10000.0)),
    "rms_norm_eps": float(k("attention.layer_norm_rms_epsilon", 1e-6)),
    "tie_word_embeddings": "lm_head.weight" not in tensors,
    "bos_token_id": meta("tokenizer.ggml.bos_token_id"),
    "eos_token_id": meta("tokenizer.ggml.eos_token_id"),
    "torch_dtype": {"f32": "float32", "bf16": "bfloat16", "f16": "float16"}[dtype],
}
# The model's real Hugging Face files where TOKENIZER_DIR has them; else made from the GGUF's metadata.
for name in ["config.json", "generation_config.json", "tokenizer_config.json"]:
    if (tok_dir / name).exists():
        (out / name).write_bytes((tok_dir / name).read_bytes())
if not (tok_dir / "config.json").exists():
    (out / "config.json").write_text(json.dumps(config, indent=2))
gz = tok_dir / "tokenizer.json.gz"
(out / "tokenizer.json").write_bytes(gzip.decompress(gz.read_bytes()) if gz.exists() else (tok_dir / "tokenizer.json").read_bytes())
if not (out / "tokenizer_config.json").exists():
    template = (tok_dir / "chat_template.jinja").read_text()
    (out / "tokenizer_config.json").write_text(json.dumps({"chat_template": template, "add_bos_token": False}, indent=2))
tmp.rename(out / "model.safetensors")
print(f"ok: {out} ({arch}, {len(tensors)} tensors, {dtype})")
