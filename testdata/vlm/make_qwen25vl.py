"""Writes "Qwen2.5-VL-rand": a tiny Qwen2.5-VL (model_type qwen2_5_vl) Hugging Face directory, deterministically.
usage: make_qwen25vl.py OUT_DIR QWEN25_HF_DIR
  QWEN25_HF_DIR: a Qwen2.5 Hugging Face directory (scripts/fetch-model.sh hf makes Qwen2.5-Coder-0.5B-Instruct-bf16):
  only its tokenizer.json is used (every Qwen2.5 tokenizer has the vision tokens at ids 151652..151656).
All weights random with a fixed seed, f32, in the original Qwen2.5-VL checkpoint layout (`model.*` text,
`visual.*` vision, `lm_head`): a 2-layer Qwen2 text model (hidden 128, 4 heads of 32, 2 KV heads, M-RoPE sections
[4, 6, 6]) and a 4-layer vision tower (hidden 64, 4 heads, window attention with full attention in blocks 1 and 3,
windows of 56 px, patch 14, temporal patch 2, 2x2 patch merger). Images: at most 28*28*256 px after resizing (at
most 256 image tokens). numpy + safetensors only."""
import json, os, shutil, sys
import numpy as np
from safetensors.numpy import save_file

if len(sys.argv) < 3: sys.exit(__doc__)
out, src = sys.argv[1], sys.argv[2]
SEED = 20261205
rng = np.random.default_rng(SEED)

VOCAB, HID, LAYERS, HEADS, KV_HEADS, INTER = 151936, 128, 2, 4, 2, 256
MROPE = [4, 6, 6]                              # sums to head_dim / 2 = 16
V_HID, V_HEADS, V_DEPTH, V_INTER = 64, 4, 4, 128
PATCH, TPATCH, MERGE, WINDOW, FULL = 14, 2, 2, 56, [1, 3]
MIN_PIXELS, MAX_PIXELS = 56 * 56, 28 * 28 * 256

# Qwen2.5-VL-Instruct's chat template, verbatim.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in content"
    " or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture "
    "{{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'video'"
    " or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video "
    "{{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}"
    "{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}")


def normal(shape, std):
    return (rng.standard_normal(shape, dtype=np.float64) * std).astype(np.float32)


def norm(name, w, n):
    w[name + ".weight"] = (1.0 + normal((n,), 0.1)).astype(np.float32)


def linear(name, w, n_out, n_in, bias, gain=1.0):
    w[name + ".weight"] = normal((n_out, n_in), gain / np.sqrt(n_in))
    if bias:
        w[name + ".bias"] = normal((n_out,), 0.1)


w = {}
# --- vision tower (the order of generation defines the weights) ---
w["visual.patch_embed.proj.weight"] = normal((V_HID, 3, TPATCH, PATCH, PATCH), 1.0 / np.sqrt(3 * TPATCH * PATCH * PATCH))
for i in range(V_DEPTH):
    p = f"visual.blocks.{i}."
    norm(p + "norm1", w, V_HID)
    linear(p + "attn.qkv", w, 3 * V_HID, V_HID, True)
    linear(p + "attn.proj", w, V_HID, V_HID, True)
    norm(p + "norm2", w, V_HID)
    linear(p + "mlp.gate_proj", w, V_INTER, V_HID, True)
    linear(p + "mlp.up_proj", w, V_INTER, V_HID, True)
    linear(p + "mlp.down_proj", w, V_HID, V_INTER, True)
norm("visual.merger.ln_q", w, V_HID)
linear("visual.merger.mlp.0", w, V_HID * MERGE * MERGE, V_HID * MERGE * MERGE, True)
# image features about as large as token embeddings (std 1 below)
linear("visual.merger.mlp.2", w, HID, V_HID * MERGE * MERGE, True)
# --- text model ---
w["model.embed_tokens.weight"] = normal((VOCAB, HID), 1.0)
HD = HID // HEADS
for i in range(LAYERS):
    p = f"model.layers.{i}."
    norm(p + "input_layernorm", w, HID)
    linear(p + "self_attn.q_proj", w, HEADS * HD, HID, True)
    linear(p + "self_attn.k_proj", w, KV_HEADS * HD, HID, True)
    linear(p + "self_attn.v_proj", w, KV_HEADS * HD, HID, True)
    linear(p + "self_attn.o_proj", w, HID, HEADS * HD, False)
    norm(p + "post_attention_layernorm", w, HID)
    linear(p + "mlp.gate_proj", w, INTER, HID, False)
    linear(p + "mlp.up_proj", w, INTER, HID, False)
    linear(p + "mlp.down_proj", w, HID, INTER, False)
norm("model.norm", w, HID)
# logits with a spread of a few units: greedy choices are rarely near-ties
linear("lm_head", w, VOCAB, HID, False, gain=4.0)

os.makedirs(out, exist_ok=True)
save_file(w, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})

cfg = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"],
    "model_type": "qwen2_5_vl",
    "hidden_size": HID, "intermediate_size": INTER, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
    "num_key_value_heads": KV_HEADS, "hidden_act": "silu", "max_position_embeddings": 32768, "max_window_layers": LAYERS,
    "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768, "use_sliding_window": False,
    "rope_scaling": {"type": "mrope", "mrope_section": MROPE},
    "vocab_size": VOCAB, "tie_word_embeddings": False, "bos_token_id": 151643, "eos_token_id": 151645,
    "image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652, "vision_end_token_id": 151653,
    "vision_token_id": 151654, "torch_dtype": "float32", "use_cache": True, "attention_dropout": 0.0,
    "vision_config": {
        "model_type": "qwen2_5_vl", "depth": V_DEPTH, "hidden_size": V_HID, "hidden_act": "silu",
        "intermediate_size": V_INTER, "num_heads": V_HEADS, "in_chans": 3, "out_hidden_size": HID,
        "patch_size": PATCH, "spatial_merge_size": MERGE, "spatial_patch_size": PATCH, "temporal_patch_size": TPATCH,
        "window_size": WINDOW, "fullatt_block_indexes": FULL, "tokens_per_second": 2, "torch_dtype": "float32",
    },
}
json.dump(cfg, open(os.path.join(out, "config.json"), "w"), indent=2)
json.dump({
    "min_pixels": MIN_PIXELS, "max_pixels": MAX_PIXELS, "size": {"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS},
    "patch_size": PATCH, "temporal_patch_size": TPATCH, "merge_size": MERGE,
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
    "do_rescale": True, "rescale_factor": 0.00392156862745098, "do_normalize": True, "do_resize": True,
    "do_convert_rgb": True, "resample": 3,
    "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor",
}, open(os.path.join(out, "preprocessor_config.json"), "w"), indent=2)
shutil.copy(os.path.join(src, "tokenizer.json"), os.path.join(out, "tokenizer.json"))
json.dump({
    "tokenizer_class": "Qwen2Tokenizer", "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
    "unk_token": None, "model_max_length": 32768, "add_prefix_space": False, "errors": "replace",
    "chat_template": CHAT_TEMPLATE, "processor_class": "Qwen2_5_VLProcessor",
}, open(os.path.join(out, "tokenizer_config.json"), "w"), indent=2)
json.dump({"chat_template": CHAT_TEMPLATE}, open(os.path.join(out, "chat_template.json"), "w"), indent=2)
json.dump({"bos_token_id": 151643, "eos_token_id": [151645, 151643], "do_sample": False},
          open(os.path.join(out, "generation_config.json"), "w"), indent=2)
print(f"wrote {out}")
