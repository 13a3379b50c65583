// Q4_K matrix × vector on NVIDIA GPUs (#21), reading the weights in GGUF's own layout: each row is K/256
// super-blocks of 144 bytes (f16 d, f16 dmin, 12 bytes of 6-bit scales and mins for 8 sub-blocks of 32,
// 128 bytes of 4-bit values; value = d·sc·q − dmin·m). Activations f32, accumulation f32: exact up to f32
// rounding (no activation quantization, unlike llama.cpp's q8_1 path).
//
// One warp per R output rows (R = 1, 2 or 4); a step of the warp covers 4 super-blocks of each. Lane l takes super-block
// l / 8 of the step and its 16 value bytes qs[16c .. 16c+16], c = l % 8 (a 16-byte load per row): their low
// nibbles are values 64j + p .. p+15 of sub-block 2j, their high nibbles values 64j + 32 + p .. p+15 of
// sub-block 2j+1, where j = c / 2 and p = 16 (c % 2). The lane's 32 activations are loaded once per step and
// serve all R rows (the activations, 8 bytes per weight byte, come from L1: sharing them across rows is
// what keeps L1 from being the limit). Up to NV activation vectors at once (small-batch decode) reuse each
// weight byte NV times.

#pragma once
#ifndef __CUDACC_RTC__
#include <cuda_fp16.h>
#include <stdint.h>
#include "matvec_store.cuh"
#endif

namespace mlx_serving {

constexpr int Q4K_BLOCK_VALUES = 256;
constexpr int Q4K_BLOCK_BYTES = 144;
constexpr int Q4K_WARPS = 4;  // warps per thread block

__device__ __forceinline__ void q4k_scale_min(int j, const uint8_t* s, float& sc, float& m) {
    if (j < 4) {
        sc = (float)(s[j] & 63);
        m = (float)(s[j + 4] & 63);
    } else {
        sc = (float)((s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4));
        m = (float)((s[j + 4] >> 4) | ((s[j] >> 6) << 4));
    }
}

// The nibble at bits [P, P + 4) of q as an exact float without an integer-to-float conversion (on sm_90 those
// issue at 16 per clock and SM against 128 FMAs, and this kernel needs two per weight byte): OR-ing the masked bits
// into the mantissa of 2^23 gives 2^23 + n·2^P (P ≤ 19 keeps them inside it), and one FMA scales and subtracts,
// exactly (every intermediate is an integer times a power of two that f32 holds).
template <int P>
__device__ __forceinline__ float nibble_at(uint32_t q) {
    static_assert(P >= 0 && P <= 19, "the nibble must sit inside the mantissa");
    const float f = __uint_as_float(0x4B000000u | (q & (0xFu << P)));
    return fmaf(f, 1.f / (float)(1u << P), -(float)(1u << (23 - P)));
}

// Σ over the low (HI false) or high nibbles of q's 4 bytes times 4 activations; q12 = q >> 12 brings the top
// bytes' nibbles inside the mantissa. The same values in the same order as (float)((q >> s) & 0xF) would give.
template <bool HI>
__device__ __forceinline__ float nib4(uint32_t q, uint32_t q12, float4 x) {
    if (HI)
        return nibble_at<4>(q) * x.x + nibble_at<12>(q) * x.y + nibble_at<8>(q12) * x.z + nibble_at<16>(q12) * x.w;
    return nibble_at<0>(q) * x.x + nibble_at<8>(q) * x.y + nibble_at<16>(q) * x.z + nibble_at<12>(q12) * x.w;
}

// y[v · ldy + r] = Σ_k W[r][k] · x[v][k] for v < NV (`add`: += that, a residual added in the same pass; `ldy`:
// the output's row stride, rows unless this matrix is one part of a wider output). grid ceil(rows / (Q4K_WARPS
// · R)), block 32·Q4K_WARPS.
template <int NV, int R>
__device__ __forceinline__ void q4k_matvec_body(const uint8_t* __restrict__ w, const float* __restrict__ x,
                                                float* __restrict__ y, int rows, int k, int ldy, int add) {
    const int lane = threadIdx.x & 31;
    const int row0 = (blockIdx.x * Q4K_WARPS + (threadIdx.x >> 5)) * R;
    if (row0 >= rows) return;
    const int nb = k / Q4K_BLOCK_VALUES;
    const int c = lane & 7, j = c >> 1, p = 16 * (c & 1);
    const size_t row_bytes = (size_t)nb * Q4K_BLOCK_BYTES;
    float acc[R][NV];
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
        for (int v = 0; v < NV; ++v) acc[r][v] = 0.f;
    // Two steps unrolled: the next step's weight loads are issued before this step's arithmetic.
#pragma unroll 2
    for (int b = lane >> 3; b < nb; b += 4) {
        uint4 q[R];
        float d[R], dmin[R], sc0[R], m0[R], sc1[R], m1[R];
#pragma unroll
        for (int r = 0; r < R; ++r) {
            const int row = min(row0 + r, rows - 1);
            const uint8_t* blk = w + row * row_bytes + (size_t)b * Q4K_BLOCK_BYTES;
            q[r] = __ldg(reinterpret_cast<const uint4*>(blk + 16 + 16 * c));
            const __half2 dd = *reinterpret_cast<const __half2*>(blk);
            d[r] = __low2float(dd);
            dmin[r] = __high2float(dd);
            q4k_scale_min(2 * j, blk + 4, sc0[r], m0[r]);
            q4k_scale_min(2 * j + 1, blk + 4, sc1[r], m1[r]);
        }
        const int base = b * Q4K_BLOCK_VALUES + 64 * j + p;
#pragma unroll
        for (int v = 0; v < NV; ++v) {
            const float4* xl = reinterpret_cast<const float4*>(x + (size_t)v * k + base);
            const float4* xh = reinterpret_cast<const float4*>(x + (size_t)v * k + base + 32);
            const float4 l0 = xl[0], l1 = xl[1], l2 = xl[2], l3 = xl[3];
            const float4 h0 = xh[0], h1 = xh[1], h2 = xh[2], h3 = xh[3];
            const float slo = l0.x + l0.y + l0.z + l0.w + l1.x + l1.y + l1.z + l1.w + l2.x + l2.y + l2.z + l2.w +
                              l3.x + l3.y + l3.z + l3.w;
            const float shi = h0.x + h0.y + h0.z + h0.w + h1.x + h1.y + h1.z + h1.w + h2.x + h2.y + h2.z + h2.w +
                              h3.x + h3.y + h3.z + h3.w;
#pragma unroll
            for (int r = 0; r < R; ++r) {
                // Σ (d·sc·q − dmin·m)·x = d·sc·Σ q·x − dmin·m·Σ x, per sub-block.
                const uint32_t x12 = q[r].x >> 12, y12 = q[r].y >> 12, z12 = q[r].z >> 12, w12 = q[r].w >> 12;
                const float qlo = nib4<false>(q[r].x, x12, l0) + nib4<false>(q[r].y, y12, l1) +
                                  nib4<false>(q[r].z, z12, l2) + nib4<false>(q[r].w, w12, l3);
                const float qhi = nib4<true>(q[r].x, x12, h0) + nib4<true>(q[r].y, y12, h1) +
                                  nib4<true>(q[r].z, z12, h2) + nib4<true>(q[r].w, w12, h3);
                acc[r][v] += d[r] * (sc0[r] * qlo + sc1[r] * qhi) - dmin[r] * (m0[r] * slo + m1[r] * shi);
            }
        }
    }
    matvec_store<R, NV>(acc, lane, row0, rows, y, ldy, add);
}

template <int NV, int R>
__global__ void q4k_matvec(const uint8_t* __restrict__ w, const float* __restrict__ x, float* __restrict__ y,
                           int rows, int k) {
    q4k_matvec_body<NV, R>(w, x, y, rows, k, rows, 0);
}

#ifndef __CUDACC_RTC__
template <int NV>
inline void q4k_matvec_rows(const uint8_t* w, const float* x, float* y, int rows, int k, int r, cudaStream_t stream) {
    const dim3 grid((rows + Q4K_WARPS * r - 1) / (Q4K_WARPS * r)), block(32 * Q4K_WARPS);
    switch (r) {
        case 1: q4k_matvec<NV, 1><<<grid, block, 0, stream>>>(w, x, y, rows, k); break;
        case 2: q4k_matvec<NV, 2><<<grid, block, 0, stream>>>(w, x, y, rows, k); break;
        default: q4k_matvec<NV, 4><<<grid, block, 0, stream>>>(w, x, y, rows, k); break;
    }
}

// Launches for nv activation vectors (1, 2, 4 or 8) with `r` rows per warp (1, 2 or 4; 0 chooses);
// `k` must be a multiple of 256 and `x` 16-byte aligned.
inline cudaError_t q4k_matvec_launch(const uint8_t* w, const float* x, float* y, int rows, int k, int nv,
                                     cudaStream_t stream, int r = 0) {
    if (k % Q4K_BLOCK_VALUES != 0 || (r != 0 && r != 1 && r != 2 && r != 4)) return cudaErrorInvalidValue;
    // Measured on an H100 (BENCHMARKS.md, session 25): fewer rows per warp give small matrices more warps;
    // more rows per warp share each activation load over more weights, which wins on large ones and with
    // several vectors.
    if (r == 0) r = nv == 1 ? (rows <= 2048 ? 1 : rows <= 32768 ? 2 : 4) : (rows <= 2048 ? 2 : 4);
    switch (nv) {
        case 1: q4k_matvec_rows<1>(w, x, y, rows, k, r, stream); break;
        case 2: q4k_matvec_rows<2>(w, x, y, rows, k, r, stream); break;
        case 4: q4k_matvec_rows<4>(w, x, y, rows, k, r, stream); break;
        case 8: q4k_matvec_rows<8>(w, x, y, rows, k, r, stream); break;
        default: return cudaErrorInvalidValue;
    }
    return cudaGetLastError();
}

#endif  // __CUDACC_RTC__

}  // namespace mlx_serving
