// Q4_K matrix × vector on NVIDIA GPUs (#21), reading the weights in GGUF's own layout: each row is K/256
// super-blocks of 144 bytes (f16 d, f16 dmin, 12 bytes of 6-bit scales and mins for 8 sub-blocks of 32,
// 128 bytes of 4-bit values; value = d·sc·q − dmin·m). Activations f32, accumulation f32: exact up to f32
// rounding (no activation quantization, unlike llama.cpp's q8_1 path).
//
// One warp per output row. For a super-block, lane l reads the 4 bytes qs[4l .. 4l+4] (the warp reads the
// 128 value bytes in one coalesced 128-byte transaction): their low nibbles are values 64j + p .. p+3 of
// sub-block 2j, their high nibbles values 64j + 32 + p .. of sub-block 2j+1, where j = l / 8, p = 4(l % 8).
// Up to NV activation vectors at once (small-batch decode) reuse each weight byte NV times.

#pragma once
#include <cuda_fp16.h>
#include <stdint.h>

namespace mlx_serving {

constexpr int Q4K_BLOCK_VALUES = 256;
constexpr int Q4K_BLOCK_BYTES = 144;
constexpr int Q4K_WARPS = 4;  // rows per thread block

__device__ __forceinline__ void q4k_scale_min(int j, const uint8_t* s, float& sc, float& m) {
    if (j < 4) {
        sc = (float)(s[j] & 63);
        m = (float)(s[j + 4] & 63);
    } else {
        sc = (float)((s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4));
        m = (float)((s[j + 4] >> 4) | ((s[j] >> 6) << 4));
    }
}

// y[v][r] = Σ_k W[r][k] · x[v][k] for v < NV. grid ceil(rows / Q4K_WARPS), block 32·Q4K_WARPS.
template <int NV>
__global__ void q4k_matvec(const uint8_t* __restrict__ w, const float* __restrict__ x, float* __restrict__ y,
                           int rows, int k) {
    const int lane = threadIdx.x & 31;
    const int row = blockIdx.x * Q4K_WARPS + (threadIdx.x >> 5);
    if (row >= rows) return;
    const int nb = k / Q4K_BLOCK_VALUES;
    const uint8_t* rw = w + (size_t)row * nb * Q4K_BLOCK_BYTES;
    const int j = lane >> 3, p = 4 * (lane & 7);
    float acc[NV];
#pragma unroll
    for (int v = 0; v < NV; ++v) acc[v] = 0.f;
    for (int b = 0; b < nb; ++b) {
        const uint8_t* blk = rw + (size_t)b * Q4K_BLOCK_BYTES;
        const float d = __half2float(*reinterpret_cast<const __half*>(blk));
        const float dmin = __half2float(*reinterpret_cast<const __half*>(blk + 2));
        float sc0, m0, sc1, m1;
        q4k_scale_min(2 * j, blk + 4, sc0, m0);
        q4k_scale_min(2 * j + 1, blk + 4, sc1, m1);
        const uint32_t q = *reinterpret_cast<const uint32_t*>(blk + 16 + 4 * lane);
        const int base = b * Q4K_BLOCK_VALUES + 64 * j + p;
#pragma unroll
        for (int v = 0; v < NV; ++v) {
            const float4 lo = *reinterpret_cast<const float4*>(x + (size_t)v * k + base);
            const float4 hi = *reinterpret_cast<const float4*>(x + (size_t)v * k + base + 32);
            // Σ (d·sc·q − dmin·m)·x = d·sc·Σ q·x − dmin·m·Σ x, per sub-block.
            const float qlo = (float)(q & 0xF) * lo.x + (float)((q >> 8) & 0xF) * lo.y +
                              (float)((q >> 16) & 0xF) * lo.z + (float)((q >> 24) & 0xF) * lo.w;
            const float qhi = (float)((q >> 4) & 0xF) * hi.x + (float)((q >> 12) & 0xF) * hi.y +
                              (float)((q >> 20) & 0xF) * hi.z + (float)((q >> 28) & 0xF) * hi.w;
            const float slo = lo.x + lo.y + lo.z + lo.w, shi = hi.x + hi.y + hi.z + hi.w;
            acc[v] += d * (sc0 * qlo + sc1 * qhi) - dmin * (m0 * slo + m1 * shi);
        }
    }
#pragma unroll
    for (int v = 0; v < NV; ++v) {
        float s = acc[v];
        for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
        if (lane == 0) y[(size_t)v * rows + row] = s;
    }
}

// Launches for nv activation vectors (1, 2, 4 or 8); `k` must be a multiple of 256 and `x` 16-byte aligned.
inline cudaError_t q4k_matvec_launch(const uint8_t* w, const float* x, float* y, int rows, int k, int nv,
                                     cudaStream_t stream) {
    if (k % Q4K_BLOCK_VALUES != 0) return cudaErrorInvalidValue;
    const dim3 grid((rows + Q4K_WARPS - 1) / Q4K_WARPS), block(32 * Q4K_WARPS);
    switch (nv) {
        case 1: q4k_matvec<1><<<grid, block, 0, stream>>>(w, x, y, rows, k); break;
        case 2: q4k_matvec<2><<<grid, block, 0, stream>>>(w, x, y, rows, k); break;
        case 4: q4k_matvec<4><<<grid, block, 0, stream>>>(w, x, y, rows, k); break;
        case 8: q4k_matvec<8><<<grid, block, 0, stream>>>(w, x, y, rows, k); break;
        default: return cudaErrorInvalidValue;
    }
    return cudaGetLastError();
}

}  // namespace mlx_serving
