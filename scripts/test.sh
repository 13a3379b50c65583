#!/usr/bin/env bash
# Runs the whole test suite on a fresh machine: fetches the real models the tests use, runs cargo test, then
# drives a real `mlx-serving serve` with the official `openai` Python client (installed into .venv).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-model.sh smollm2
scripts/fetch-model.sh qwen2.5-0.5b
cargo test --workspace "$@"
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -c "import openai" 2>/dev/null || .venv/bin/pip install -q openai
cargo build -p mlx-serving
.venv/bin/python tests/openai_client.py target/debug/mlx-serving
