"""The GPU's weight-format decoding checked without a GPU (#21).

Compiles crates/kernels/cuda/block_matvec.cuh's format decoders (every `Fmt<F>::dequant8`: f16, bf16, Q4_0, Q4_1,
Q5_0, Q5_1, Q8_0, Q6_K, Q4_K) as host C++ with g++ against the host emulation of CUDA's device functions
(crates/kernels/cuda/emu/cuda_emu.h), dequantizes random blocks with them, and compares every value with the
`gguf` package's own dequantizer (llama.cpp's Python reference, not our code). The GPU tests
(scripts/cuda-tests.sh) run the same code on a GPU.

usage: python tests/block_formats_host.py
"""

import pathlib
import subprocess
import sys
import tempfile

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import quants

ROOT = pathlib.Path(__file__).resolve().parent.parent
KERNELS = ROOT / "crates/kernels/cuda"

# (format id as in the header's WeightFormat, GGML type, values per block, bytes per block, f16 scale offsets)
CASES = [
    (0, T.F16, 8, 16, []),
    (1, T.BF16, 8, 16, []),
    (2, T.Q4_0, 32, 18, [0]),
    (3, T.Q4_1, 32, 20, [0, 2]),
    (4, T.Q5_0, 32, 22, [0]),
    (5, T.Q5_1, 32, 24, [0, 2]),
    (6, T.Q8_0, 32, 34, [0]),
    (7, T.Q6_K, 256, 210, [208]),
    (8, T.Q4_K, 256, 144, [0, 2]),
]

DRIVER = """
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>
#include "block_matvec.cuh"
using namespace mlx_serving;
template <int F> static void run(const char* in, const char* out) {
    FILE* f = fopen(in, "rb");
    std::vector<uint8_t> b(1 << 22);
    size_t n = fread(b.data(), 1, b.size(), f);
    fclose(f);
    size_t blocks = n / Fmt<F>::BYTES;
    std::vector<float> o(blocks * Fmt<F>::VALUES);
    for (size_t i = 0; i < blocks; ++i)
        for (int c = 0; c < Fmt<F>::VALUES; c += 8) Fmt<F>::dequant8(b.data() + i * Fmt<F>::BYTES, c, &o[i * Fmt<F>::VALUES + c]);
    f = fopen(out, "wb");
    fwrite(o.data(), 4, o.size(), f);
    fclose(f);
}
int main(int argc, char** argv) {
    switch (atoi(argv[1])) {
        case 0: run<0>(argv[2], argv[3]); break;
        case 1: run<1>(argv[2], argv[3]); break;
        case 2: run<2>(argv[2], argv[3]); break;
        case 3: run<3>(argv[2], argv[3]); break;
        case 4: run<4>(argv[2], argv[3]); break;
        case 5: run<5>(argv[2], argv[3]); break;
        case 6: run<6>(argv[2], argv[3]); break;
        case 7: run<7>(argv[2], argv[3]); break;
        case 8: run<8>(argv[2], argv[3]); break;
        default: return 2;
    }
}
"""


def random_blocks(rng, fid, values, size, scales, blocks) -> bytes:
    if fid == 0:
        return rng.standard_normal(blocks * values).astype(np.float16).tobytes()
    if fid == 1:
        f = rng.standard_normal(blocks * values).astype(np.float32)
        return (f.view(np.uint32) >> 16).astype(np.uint16).tobytes()
    b = bytearray(rng.integers(0, 256, blocks * size, dtype=np.uint8).tobytes())
    for i in range(blocks):
        for at in scales:
            b[i * size + at : i * size + at + 2] = np.float16(0.002 + 0.02 * rng.random()).tobytes()
    return bytes(b)


def main() -> int:
    rng = np.random.default_rng(21)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        (tmp / "formats.cpp").write_text(DRIVER)
        emu = KERNELS / "emu"
        subprocess.run(["g++", "-O1", "-std=c++17", "-fno-strict-aliasing", "-I", str(emu), "-I", str(KERNELS),
                        "-include", "cuda_emu.h", "-o", str(tmp / "formats"), str(tmp / "formats.cpp")], check=True)
        failures = 0
        for fid, ggml, values, size, scales in CASES:
            raw = random_blocks(rng, fid, values, size, scales, 4096 // values * 16)
            (tmp / "in.bin").write_bytes(raw)
            subprocess.run([str(tmp / "formats"), str(fid), str(tmp / "in.bin"), str(tmp / "out.bin")], check=True)
            ours = np.fromfile(tmp / "out.bin", dtype=np.float32)
            ref = quants.dequantize(np.frombuffer(raw, dtype=np.uint8), ggml).astype(np.float32).reshape(-1)
            same = ours.shape == ref.shape and np.array_equal(ours, ref)
            print(f"{ggml.name:5} {ref.size:6} values: {'identical' if same else 'DIFFERENT'}")
            failures += not same
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
