#!/usr/bin/env bash
# On the GPU machine (it has nvcc; CI has no GPU): builds every CUDA kernel test in crates/kernels/cuda/tests
# and runs it. Each test checks its kernel against a CPU reference on random inputs (the error bound printed
# with each case), checks batch invariance where it applies, and prints its benchmark's bandwidth.
# Usage: scripts/cuda-kernel-tests.sh   (NVCC, CUDA_ARCH: default /usr/local/cuda/bin/nvcc and sm_90)
#   COMPILE_ONLY=1: compile them and stop (no GPU needed; e.g. with the nvcc of ../shared/gpu/build-cuda.sh
#   --print-env, before spending device time). Without a GPU, tests/cuda_emu.py runs them under emulation.
set -euo pipefail
cd "$(dirname "$0")/.."
nvcc=${NVCC:-/usr/local/cuda/bin/nvcc}
arch=${CUDA_ARCH:-sm_90}
status=0
for t in crates/kernels/cuda/tests/*_test.cu; do
  exe=/tmp/$(basename "$t" .cu)
  echo "== $t"
  if [ -n "${COMPILE_ONLY:-}" ]; then
    "$nvcc" -c -O3 -std=c++17 -arch="$arch" -lineinfo -o "$exe.o" "$t" || status=1
    continue
  fi
  "$nvcc" -O3 -std=c++17 -arch="$arch" -lineinfo -o "$exe" "$t"
  "$exe" || status=1
done
exit $status
