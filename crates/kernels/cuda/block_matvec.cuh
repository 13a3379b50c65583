// Matrix × vector for the weight formats other than Q4_K (which has its own kernel, q4k_matvec.cuh) on NVIDIA
// GPUs (#21), reading each format in GGUF's own layout: f16, bf16, and the block formats Q4_0, Q4_1, Q5_0, Q5_1,
// Q8_0 (32 values per block) and Q6_K (256). Activations f32, sums f32: exact up to f32 rounding.
//
// One warp per R output rows; lane l takes the 8 consecutive values 8l + 256s of each row at step s (a step
// covers 256 values of a row), dequantizes them with the format's `dequant8` and multiplies them with the
// activations. A row's sum is taken in the same order whatever NV (vectors at once) and R are, so a vector's
// result does not depend on its batch companions. Needs k a multiple of 8 (of the block size for block formats).
//
// Block layouts (ggml's): Q4_0 {f16 d; u8 qs[16]} value j = d·(nibble − 8), low nibbles j < 16, high j ≥ 16;
// Q4_1 {d; m; qs[16]} d·q + m; Q5_0 {d; u8 qh[4]; qs[16]} fifth bit j of qh, d·(q − 16); Q5_1 {d; m; qh; qs}
// d·q + m; Q8_0 {d; i8 qs[32]} d·q; Q6_K {u8 ql[128]; u8 qh[64]; i8 scales[16]; f16 d}, see `dequant8`.

#pragma once
#ifndef __CUDACC_RTC__
#include <cuda_fp16.h>
#include <stdint.h>
#include "matvec_store.cuh"
#endif

namespace mlx_serving {

enum WeightFormat : int {
    FMT_F16 = 0,
    FMT_BF16 = 1,
    FMT_Q4_0 = 2,
    FMT_Q4_1 = 3,
    FMT_Q5_0 = 4,
    FMT_Q5_1 = 5,
    FMT_Q8_0 = 6,
    FMT_Q6_K = 7,
    FMT_Q4_K = 8,
};

__device__ __forceinline__ float bits_f16(uint16_t h) { return __half2float(__ushort_as_half(h)); }
__device__ __forceinline__ float f16_at(const uint8_t* p) {
    return bits_f16(*reinterpret_cast<const uint16_t*>(p));  // 2-byte aligned in every layout
}

template <int F>
struct Fmt;

// 8 16-bit floats (one 16-byte load) as f32: bf16 when `BF`, else f16.
template <bool BF>
__device__ __forceinline__ void half8(const uint8_t* b, float* out) {
    const uint4 raw = __ldg(reinterpret_cast<const uint4*>(b));
    const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int e = 0; e < 8; ++e) {
        const uint32_t h = (w[e / 2] >> (16 * (e % 2))) & 0xFFFF;
        out[e] = BF ? __uint_as_float(h << 16) : bits_f16((uint16_t)h);
    }
}

template <>
struct Fmt<FMT_F16> {
    static constexpr int VALUES = 8, BYTES = 16;
    __device__ static void dequant8(const uint8_t* b, int, float* out) { half8<false>(b, out); }
};

template <>
struct Fmt<FMT_BF16> {
    static constexpr int VALUES = 8, BYTES = 16;
    __device__ static void dequant8(const uint8_t* b, int, float* out) { half8<true>(b, out); }
};

// The 4-bit value j (< 32) of a 16-byte nibble array: low nibbles are values 0..15, high ones 16..31.
__device__ __forceinline__ int nibble32(const uint8_t* qs, int j) {
    return j < 16 ? (qs[j] & 0xF) : (qs[j - 16] >> 4);
}

template <>
struct Fmt<FMT_Q4_0> {
    static constexpr int VALUES = 32, BYTES = 18;
    __device__ static void dequant8(const uint8_t* b, int o, float* out) {
        const float d = f16_at(b);
#pragma unroll
        for (int t = 0; t < 8; ++t) out[t] = d * (float)(nibble32(b + 2, o + t) - 8);
    }
};

template <>
struct Fmt<FMT_Q4_1> {
    static constexpr int VALUES = 32, BYTES = 20;
    __device__ static void dequant8(const uint8_t* b, int o, float* out) {
        const float d = f16_at(b), m = f16_at(b + 2);
#pragma unroll
        for (int t = 0; t < 8; ++t) out[t] = d * (float)nibble32(b + 4, o + t) + m;
    }
};

__device__ __forceinline__ uint32_t u32_at(const uint8_t* p) {
    const uint16_t* h = reinterpret_cast<const uint16_t*>(p);  // 2-byte aligned
    return (uint32_t)h[0] | ((uint32_t)h[1] << 16);
}

template <>
struct Fmt<FMT_Q5_0> {
    static constexpr int VALUES = 32, BYTES = 22;
    __device__ static void dequant8(const uint8_t* b, int o, float* out) {
        const float d = f16_at(b);
        const uint32_t qh = u32_at(b + 2);
#pragma unroll
        for (int t = 0; t < 8; ++t) {
            const int j = o + t;
            out[t] = d * (float)((nibble32(b + 6, j) | (int)(((qh >> j) & 1) << 4)) - 16);  // signed: q − 16 < 0
        }
    }
};

template <>
struct Fmt<FMT_Q5_1> {
    static constexpr int VALUES = 32, BYTES = 24;
    __device__ static void dequant8(const uint8_t* b, int o, float* out) {
        const float d = f16_at(b), m = f16_at(b + 2);
        const uint32_t qh = u32_at(b + 4);
#pragma unroll
        for (int t = 0; t < 8; ++t) {
            const int j = o + t;
            out[t] = d * (float)(nibble32(b + 8, j) | (int)(((qh >> j) & 1) << 4)) + m;
        }
    }
};

template <>
struct Fmt<FMT_Q8_0> {
    static constexpr int VALUES = 32, BYTES = 34;
    __device__ static void dequant8(const uint8_t* b, int o, float* out) {
        const float d = f16_at(b);
        const int8_t* qs = reinterpret_cast<const int8_t*>(b + 2);
#pragma unroll
        for (int t = 0; t < 8; ++t) out[t] = d * (float)qs[o + t];
    }
};

// Q6_K: value i of a 256-value block is in half n = i / 128, group g = (i % 128) / 32, at l = i % 32: its low
// four bits are ql[64n + l + 32 (g & 1)] (the high nibble when g ≥ 2), its top two bits (qh[32n + l] >> 2g) & 3,
// its scale scales[8n + l / 16 + 2g]; value = d · scale · (q − 32).
template <>
struct Fmt<FMT_Q6_K> {
    static constexpr int VALUES = 256, BYTES = 210;
    __device__ static void dequant8(const uint8_t* b, int o, float* out) {
        const int n = o / 128, g = (o % 128) / 32, l0 = o % 32;
        const float ds = f16_at(b + 208) * (float)reinterpret_cast<const int8_t*>(b + 192)[8 * n + l0 / 16 + 2 * g];
        const uint8_t* ql = b + 64 * n + 32 * (g & 1);
        const uint8_t* qh = b + 128 + 32 * n;
        const int shift = 4 * (g >> 1);
#pragma unroll
        for (int t = 0; t < 8; ++t) {
            const int l = l0 + t;
            const int q = ((ql[l] >> shift) & 0xF) | (((qh[l] >> (2 * g)) & 3) << 4);
            out[t] = ds * (float)(q - 32);
        }
    }
};

// Q4_K (dequantization only: embeddings and the GEMM path; its matvec is q4k_matvec.cuh). Value i: super-block
// 144 bytes {f16 d; f16 dmin; 12 bytes of 6-bit scales and mins; 128 bytes of nibbles}, see q4k_matvec.cuh.
template <>
struct Fmt<FMT_Q4_K> {
    static constexpr int VALUES = 256, BYTES = 144;
    __device__ static void dequant8(const uint8_t* b, int o, float* out) {
        const int j = o / 64, hi = (o % 64) / 32, p = o % 32;
        const uint8_t* s = b + 4;
        const int sb = 2 * j + hi;
        float sc, m;
        if (sb < 4) {
            sc = (float)(s[sb] & 63);
            m = (float)(s[sb + 4] & 63);
        } else {
            sc = (float)((s[sb + 4] & 0xF) | ((s[sb - 4] >> 6) << 4));
            m = (float)((s[sb + 4] >> 4) | ((s[sb] >> 6) << 4));
        }
        const float d = f16_at(b) * sc, dm = f16_at(b + 2) * m;
#pragma unroll
        for (int t = 0; t < 8; ++t) out[t] = d * (float)((b[16 + 32 * j + p + t] >> (4 * hi)) & 0xF) - dm;
    }
};

// Values c .. c+8 (c a multiple of 8) of a row in format F.
template <int F>
__device__ __forceinline__ void row_dequant8(const uint8_t* row, int c, float* out) {
    Fmt<F>::dequant8(row + (size_t)(c / Fmt<F>::VALUES) * Fmt<F>::BYTES, c % Fmt<F>::VALUES, out);
}

template <int F>
__device__ __forceinline__ size_t row_bytes(int k) {
    return (size_t)(k / Fmt<F>::VALUES) * Fmt<F>::BYTES;
}

// y[v · ldy + r] (+)= Σ_k W[r][k] · x[v][k], v < NV. grid ceil(rows / (4 · R)), block 128.
template <int F, int NV, int R>
__device__ __forceinline__ void block_matvec_body(const uint8_t* __restrict__ w, const float* __restrict__ x,
                                                  float* __restrict__ y, int rows, int k, int ldy, int add) {
    const int lane = threadIdx.x & 31;
    const int row0 = (blockIdx.x * 4 + (threadIdx.x >> 5)) * R;
    if (row0 >= rows) return;
    const size_t rb = row_bytes<F>(k);
    float acc[R][NV];
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
        for (int v = 0; v < NV; ++v) acc[r][v] = 0.f;
    // Unrolled so that the loads of later steps are in flight during this one's arithmetic: a 16-bit matrix is
    // read at 16 bytes per lane and step, too little in flight per SM to reach the memory's bandwidth alone.
#pragma unroll(Fmt<F>::VALUES == 8 ? 4 : 2)
    for (int c = lane * 8; c < k; c += 256) {
        float wf[R][8];
#pragma unroll
        for (int r = 0; r < R; ++r) row_dequant8<F>(w + (size_t)min(row0 + r, rows - 1) * rb, c, wf[r]);
#pragma unroll
        for (int v = 0; v < NV; ++v) {
            const float4 x0 = *reinterpret_cast<const float4*>(x + (size_t)v * k + c);
            const float4 x1 = *reinterpret_cast<const float4*>(x + (size_t)v * k + c + 4);
#pragma unroll
            for (int r = 0; r < R; ++r) {
                acc[r][v] += wf[r][0] * x0.x + wf[r][1] * x0.y + wf[r][2] * x0.z + wf[r][3] * x0.w +
                             wf[r][4] * x1.x + wf[r][5] * x1.y + wf[r][6] * x1.z + wf[r][7] * x1.w;
            }
        }
    }
    matvec_store<R, NV>(acc, lane, row0, rows, y, ldy, add);
}

}  // namespace mlx_serving
