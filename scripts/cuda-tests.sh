#!/usr/bin/env bash
# The GPU checks of #21, on the device machine (it has the driver, NVRTC, cuBLAS and nvcc; CI has no GPU):
#   1. every CUDA kernel test program against its CPU reference (scripts/cuda-kernel-tests.sh, nvcc);
#   2. the GPU executor's tests, `--ignored` (they need a GPU): the crate's unit tests (every weight format's
#      matvec and cuBLAS path against candle's dequantization) and crates/cuda/tests/gpu.rs (golden tokens of the
#      real models, logits against the CPU model, batch invariance of decode rows, batched == alone,
#      prefix-cached == uncached).
# Usage: scripts/cuda-tests.sh TEST_BINARY...      (FILTER="name ..." limits the tests run by name)
#   The test binaries are built here with `cargo test -p mlx-serving-cuda --no-run` (cargo prints their paths:
#   `unittests src/lib.rs` and `tests/gpu.rs`) and carried over; the models are read from MLX_SERVING_MODELS_DIR
#   (default: models/).
set -uo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 1 ] || { echo "usage: scripts/cuda-tests.sh TEST_BINARY..." >&2; exit 2; }
status=0
scripts/cuda-kernel-tests.sh || status=1
for bin in "$@"; do
  echo "== $bin"
  # shellcheck disable=SC2086 # FILTER is a list of names
  "$bin" --ignored --test-threads=1 --nocapture ${FILTER:-} || status=1
done
exit $status
