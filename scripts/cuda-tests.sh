#!/usr/bin/env bash
# The GPU checks of #21, on the device machine (it has the driver, NVRTC, cuBLAS and nvcc; CI has no GPU):
#   1. every CUDA kernel test program against its CPU reference (scripts/cuda-kernel-tests.sh, nvcc);
#   2. the GPU executor's tests (crates/cuda/tests/gpu.rs, `--ignored`): golden tokens of the real models,
#      logits against the CPU model, batch invariance of decode rows, batched == alone, prefix-cached == uncached.
# Usage: scripts/cuda-tests.sh GPU_TEST_BINARY [TEST_NAME_FILTER...]
#   GPU_TEST_BINARY: built here with `cargo test -p mlx-serving-cuda --no-run` (the path cargo prints), carried
#   over; the models are read from MLX_SERVING_MODELS_DIR (default: models/).
set -uo pipefail
cd "$(dirname "$0")/.."
bin=${1:?usage: scripts/cuda-tests.sh GPU_TEST_BINARY [FILTER...]}
shift
status=0
scripts/cuda-kernel-tests.sh || status=1
echo "== GPU executor tests"
"$bin" --ignored --test-threads=1 --nocapture "$@" || status=1
exit $status
