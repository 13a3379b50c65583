#!/usr/bin/env bash
# Runs the whole test suite on a fresh machine: fetches the real models the tests use (and writes Hugging Face
# directories from them with llama.cpp's `gguf` package, and MLX ones with mlx-lm), runs cargo test, then
# drives a real `mlx-serving serve` with the official `openai` Python client (installed into .venv).
set -euo pipefail
cd "$(dirname "$0")/.."
# The response cache's Redis tests start their own redis-server (Debian's package) on a free loopback port.
if ! command -v redis-server >/dev/null; then
  sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
  $sudo apt-get update -q && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q redis-server
fi
scripts/fetch-model.sh smollm2
scripts/fetch-model.sh qwen2.5-0.5b
scripts/fetch-model.sh gemma3-270m
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -c "import openai, gguf, numpy, safetensors, mlx_lm, jsonschema, rfc3339_validator, rfc3986_validator, fqdn, isoduration" 2>/dev/null ||
  .venv/bin/pip install -q openai gguf numpy safetensors "mlx[cpu]==0.32.4" "mlx-lm==0.32.2" jsonschema rfc3339-validator rfc3986-validator fqdn isoduration
# mlx-vlm (for its `convert` of the vision test models) without its server, audio and dataset dependencies.
.venv/bin/python -c "import mlx_vlm, PIL" 2>/dev/null || .venv/bin/pip install -q --no-deps "mlx-vlm==0.7.10" "Pillow==13.0.0"
# lm-evaluation-harness (its `local-completions` model scores a task through our API), kept apart from .venv's
# packages: installed into .venv/lmeval and put on PYTHONPATH for that one test.
[ -d .venv/lmeval/lm_eval ] || .venv/bin/pip install -q --target .venv/lmeval "lm-eval==0.4.13" tenacity aiohttp
# schemathesis (API fuzzing from our /openapi.json), likewise apart in .venv/schemathesis.
[ -d .venv/schemathesis/schemathesis ] || .venv/bin/pip install -q --target .venv/schemathesis "schemathesis==4.32.5"
scripts/fetch-model.sh hf
scripts/fetch-model.sh mlx
scripts/fetch-model.sh smolvlm-rand
scripts/fetch-model.sh qwen25vl-rand
scripts/fetch-model.sh vlm-mlx
cargo test --workspace "$@"
# The CUDA build (#21) compiles without CUDA (cudarc loads the driver, NVRTC and cuBLAS at run time), and NVRTC
# compiles every GPU kernel; the GPU tests themselves run on the device machine (scripts/cuda-tests.sh).
cargo check -p mlx-serving --features cuda
scripts/nvrtc-check.sh
# The GPU's weight-format decoding (block_matvec.cuh, compiled for the host) against the gguf package's dequantizer.
.venv/bin/python tests/block_formats_host.py
# The CUDA kernels' own test programs (each kernel against an f64 reference, batch invariance bitwise) under a
# host emulation of thread blocks, warps and shuffles (crates/kernels/cuda/emu); the GPU runs them too.
python3 tests/cuda_emu.py
cargo build -p mlx-serving
.venv/bin/python tests/openai_client.py target/debug/mlx-serving
# Structured output: 73 schemas, regexes, choices, grammars; every finished answer validated (jsonschema, re).
.venv/bin/python tests/structured_outputs.py target/debug/mlx-serving models/SmolLM2-135M-Instruct.Q4_1.gguf
.venv/bin/python tests/structured_outputs.py target/debug/mlx-serving models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf
# Tool calling round trips (required, named, auto; streamed and not; parallel) on Qwen2.5's own template.
.venv/bin/python tests/tool_calls.py target/debug/mlx-serving models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf
# Two models behind one server: routing, on-demand loads, LRU swaps under a budget, pinning, TTL, unloads.
.venv/bin/python tests/multi_model.py target/debug/mlx-serving models/SmolLM2-135M-Instruct.Q4_1.gguf models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf
# Speculative decoding (n-gram and a draft model) gives the same ids as without, through serve and generate.
.venv/bin/python tests/speculative_server.py target/debug/mlx-serving models/SmolLM2-135M-Instruct.Q4_1.gguf models/mlx/SmolLM2-135M-Instruct-4bit models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf
# Prompt logprobs (echo + logprobs, prompt_logprobs) against generation logprobs; lm-eval scoring a local task.
.venv/bin/python tests/prompt_logprobs.py target/debug/mlx-serving models/SmolLM2-135M-Instruct.Q4_1.gguf models/hf/SmolLM2-135M-Instruct-bf16 .venv/lmeval
# Property-based API fuzzing (schemathesis, bounded: 90 s): no 5xx, documented statuses and envelopes, engine alive.
.venv/bin/python tests/api_fuzz.py target/debug/mlx-serving models/SmolLM2-135M-Instruct.Q4_1.gguf .venv/schemathesis --max-time 90
# Identical deterministic requests share one generation; the response cache in memory and on disk.
.venv/bin/python tests/coalescing.py target/debug/mlx-serving models/SmolLM2-135M-Instruct.Q4_1.gguf
.venv/bin/python tests/response_cache.py target/debug/mlx-serving models/SmolLM2-135M-Instruct.Q4_1.gguf
# Images in chat messages on SmolVLM-rand and Qwen2.5-VL-rand: the references' prompt and output ids, batching,
# caches, bad images.
.venv/bin/python tests/vision_server.py target/debug/mlx-serving models/SmolVLM-rand models/SmolLM2-135M-Instruct.Q4_1.gguf models/Qwen2.5-VL-rand
# The same two architectures from mlx-vlm's 4-bit MLX directories: mlx-vlm's prompt and greedy ids.
.venv/bin/python tests/vision_mlx.py target/debug/mlx-serving models/mlx/SmolVLM-rand-4bit models/mlx/Qwen2.5-VL-rand-4bit
# The fleet router over three real instances: policies, failover under kill -9, the Redis registry.
.venv/bin/python tests/router.py target/debug/mlx-serving models/SmolLM2-135M-Instruct.Q4_1.gguf models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf
# The TypeScript package against the real binary, over HTTP and over stdio (`mlx-serving rpc`).
(cd clients/typescript && npm ci --no-audit --no-fund && npm run build && MLX_SERVING_BIN=../../target/debug/mlx-serving npm test)
# mlx-lm loads what `convert --format mlx` writes and agrees with us on it (llama and gemma3 layouts).
.venv/bin/python tests/mlx_lm_loads_ours.py target/debug/mlx-serving models/SmolLM2-135M-Instruct.Q4_1.gguf
.venv/bin/python tests/mlx_lm_loads_ours.py target/debug/mlx-serving models/gemma-3-270m-q4_k_m.gguf
