#!/usr/bin/env bash
# Soak and overload (#25): a release `mlx-serving serve` on the default model under twice its capacity for
# 10 minutes (SOAK_MINUTES), with streamed, non-streamed, cancelled, oversized and malformed requests, on
# loopback. See scripts/soak.py for the mix and the pass criteria; exits 1 when one fails.
# Usage: scripts/soak.sh [--json out.json] [-- extra serve flags]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-model.sh smollm2 >/dev/null
cargo build --release -q -p mlx-serving
exec python3 scripts/soak.py target/release/mlx-serving models/SmolLM2-135M-Instruct.Q4_1.gguf \
  --minutes "${SOAK_MINUTES:-10}" "$@"
