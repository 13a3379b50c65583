#!/usr/bin/env bash
# Compiles every GPU kernel of the CUDA executor with NVRTC, as a model load does on a GPU machine, on a machine
# without a GPU (CI): NVRTC 13.0.88 (the GPU machine's version) from NVIDIA's PyPI wheel, cached in
# ~/.cache/nvrtc, then crates/cuda's `the_kernels_compile` test (ignored elsewhere) with it on LD_LIBRARY_PATH.
set -euo pipefail
cd "$(dirname "$0")/.."
cache=${NVRTC_CACHE:-$HOME/.cache/nvrtc}
url=https://files.pythonhosted.org/packages/c3/68/483a78f5e8f31b08fb1bb671559968c0ca3a065ac7acabfc7cee55214fd6/nvidia_cuda_nvrtc-13.0.88-py3-none-manylinux2010_x86_64.manylinux_2_12_x86_64.whl
sha=ad9b6d2ead2435f11cbb6868809d2adeeee302e9bb94bcf0539c7a40d80e8575
lib=$cache/x/nvidia/cu13/lib
if [ ! -f "$lib/libnvrtc.so.13" ]; then
  mkdir -p "$cache"
  python3 - "$url" "$cache/nvrtc.whl" "$sha" <<'PY'
import hashlib, sys, urllib.request
url, out, want = sys.argv[1:]
for attempt in range(3):
    try:
        data = urllib.request.urlopen(url, timeout=120).read()
        break
    except OSError:
        if attempt == 2:
            raise
if hashlib.sha256(data).hexdigest() != want:
    sys.exit(f"{url}: sha256 mismatch")
open(out, "wb").write(data)
PY
  python3 -m zipfile -e "$cache/nvrtc.whl" "$cache/x"
fi
LD_LIBRARY_PATH="$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
  cargo test -p mlx-serving-cuda --lib -- --ignored the_kernels_compile
