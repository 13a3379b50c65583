#!/usr/bin/env bash
# Runs the whole test suite on a fresh machine: fetches the real models the tests use, then cargo test.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-model.sh smollm2
scripts/fetch-model.sh qwen2.5-0.5b
exec cargo test --workspace "$@"
