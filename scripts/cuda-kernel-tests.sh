#!/usr/bin/env bash
# On the GPU machine (it has nvcc; CI has no GPU): builds every CUDA kernel test in crates/kernels/cuda/tests
# and runs it. Each test checks its kernel against a CPU reference on random inputs (the error bound printed
# with each case), checks batch invariance where it applies, and prints its benchmark's bandwidth.
# Usage: scripts/cuda-kernel-tests.sh   (NVCC, CUDA_ARCH: default /usr/local/cuda/bin/nvcc and sm_90)
set -euo pipefail
cd "$(dirname "$0")/.."
nvcc=${NVCC:-/usr/local/cuda/bin/nvcc}
arch=${CUDA_ARCH:-sm_90}
status=0
for t in crates/kernels/cuda/tests/*_test.cu; do
  exe=/tmp/$(basename "$t" .cu)
  echo "== $t"
  "$nvcc" -O3 -std=c++17 -arch="$arch" -lineinfo -o "$exe" "$t"
  "$exe" || status=1
done
exit $status
