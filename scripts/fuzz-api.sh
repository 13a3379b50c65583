#!/usr/bin/env bash
# The longer API fuzzing run by hand (#25): schemathesis from our /openapi.json against a release server for
# FUZZ_MINUTES (30), more examples per operation; prints the test-case counts. Needs .venv/schemathesis
# (scripts/test.sh installs it).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p mlx-serving
exec .venv/bin/python tests/api_fuzz.py target/release/mlx-serving models/SmolLM2-135M-Instruct.Q4_1.gguf \
  .venv/schemathesis --max-time $(( ${FUZZ_MINUTES:-30} * 60 )) --max-examples 100 --seed "${FUZZ_SEED:-7}"
