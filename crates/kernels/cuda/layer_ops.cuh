// The decoder's steps between the matmuls and the attention on NVIDIA GPUs (#21): embedding rows, block
// dequantization for cuBLAS, RMS norm, biases + RoPE + the K/V cache write, SwiGLU, 16-bit copies of activations,
// and the greedy sampler's argmax. Device functions only: crates/cuda/src/model.cu gives each an unmangled entry
// point in the runtime-compiled module; tests/layer_ops_test.cu checks each against a CPU reference (on the GPU,
// and under the host emulation in CI).
//
// Activations are f32 rows; a matmul that goes through cuBLAS reads a 16-bit copy (`kind`: 1 = f16, 2 = bf16)
// that the kernel before it writes beside the f32 rows.

#pragma once
#ifndef __CUDACC_RTC__
#include <cuda_fp16.h>
#include <math_constants.h>
#include <stdint.h>
#include "block_matvec.cuh"
#include "paged_attention.cuh"
#endif

namespace mlx_serving {


constexpr int KIND_BF16 = 2;

// Round to nearest even, as cvt.rn.f16.f32.
__device__ __forceinline__ uint16_t f2h(float f) { return __half_as_ushort(__float2half(f)); }
// Round to nearest even; NaN stays NaN.
__device__ __forceinline__ uint16_t f2bf(float f) {
    uint32_t u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}
// f16 saturates at ±65504 instead of becoming inf (an outlier activation entering a cuBLAS matmul is clipped, not
// turned into NaNs downstream); a NaN stays NaN (fmaxf would have made it -65504, hiding it).
__device__ __forceinline__ uint16_t f32_to_half(float v, int kind) {
    if (kind == KIND_BF16) return f2bf(v);
    return f2h(v != v ? v : fminf(fmaxf(v, -65504.f), 65504.f));
}

__device__ __forceinline__ float block_sum(float v, float* red) {
    v = warp_sum(v);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
    if (lane == 0) red[warp] = v;
    __syncthreads();
    float total = 0.f;
    for (int w = 0; w < warps; ++w) total += red[w];
    __syncthreads();
    return total;
}

// x[r] = table[ids[r]] · scale, the table in format F. grid n, block 128.
template <int F>
__device__ __forceinline__ void embed_body(const uint8_t* table, const uint32_t* ids, float* x, int h, float scale) {
    const uint8_t* row = table + (size_t)ids[blockIdx.x] * row_bytes<F>(h);
    float* out = x + (size_t)blockIdx.x * h;
    for (int c = threadIdx.x * 8; c < h; c += blockDim.x * 8) {
        float v[8];
        row_dequant8<F>(row, c, v);
#pragma unroll
        for (int t = 0; t < 8; ++t) out[c + t] = v[t] * scale;
    }
}

// A matrix [rows, k] in format F as 16-bit floats of `kind` (the input of a cuBLAS GEMM for batches past the
// matvec kernels). grid ceil(rows · k / 8 / 256), block 256: a thread per 8 values.
template <int F>
__device__ __forceinline__ void dequant_body(const uint8_t* w, uint16_t* out, int kind, int rows, int k) {
    const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    const size_t per_row = k / 8;
    if (i >= (size_t)rows * per_row) return;
    const size_t row = i / per_row;
    const int c = (int)(i % per_row) * 8;
    float v[8];
    row_dequant8<F>(w + row * row_bytes<F>(k), c, v);
#pragma unroll
    for (int t = 0; t < 8; ++t) out[i * 8 + t] = f32_to_half(v[t], kind);
}

// RMS norm of rows (`rows[r]` of x when `rows` is given, else row r), times w: f32 into out32, and a 16-bit copy
// into out16 when given. grid m, block 256.
__device__ __forceinline__ void rms_norm_body(const float* x, const uint32_t* rows, const float* w, float* out32,
                                    uint16_t* out16, int kind, int h, float eps) {
    __shared__ float red[32];
    const size_t src = rows ? rows[blockIdx.x] : blockIdx.x;
    const float* xr = x + src * h;
    float ss = 0.f;
    for (int i = threadIdx.x; i < h; i += blockDim.x) ss += xr[i] * xr[i];
    ss = block_sum(ss, red);
    const float inv = 1.f / sqrtf(ss / (float)h + eps);
    for (int i = threadIdx.x; i < h; i += blockDim.x) {
        const float v = xr[i] * inv * w[i];
        out32[(size_t)blockIdx.x * h + i] = v;
        if (out16) out16[(size_t)blockIdx.x * h + i] = f32_to_half(v, kind);
    }
}

// Biases, RoPE and the cache write over the q/k/v projection's output rows [n, (nh + 2 nkv) · hd]: query heads
// rotated into q [n, nh · hd], key heads rotated and value heads into the layer's f16 cache at each row's slot.
// `neox`: pairs (i, i + rope_dim / 2), else (2i, 2i + 1); dimensions past rope_dim are not turned.
// grid (n, nh + nkv), block 64.
__device__ __forceinline__ void qkv_rope_store_body(const float* qkv, const float* bias, const uint32_t* positions,
                                          const uint32_t* slots, const float* inv_freq, float* q,
                                          uint16_t* k_cache, uint16_t* v_cache, int nh, int nkv, int hd,
                                          int rope_dim, int neox) {
    const int row = blockIdx.x, head = blockIdx.y;
    const int width = (nh + 2 * nkv) * hd;
    const float* src = qkv + (size_t)row * width;
    const bool is_q = head < nh;
    const int col = is_q ? head * hd : nh * hd + (head - nh) * hd;
    const float pos = (float)positions[row];
    const int half_dim = rope_dim / 2;
    float* qdst = q + ((size_t)row * nh + head) * hd;
    const size_t cache_at = ((size_t)slots[row] * nkv + (head - nh)) * hd;
    for (int i = threadIdx.x; i < hd; i += blockDim.x) {
        // Each thread writes dimension i: its pair partner is read, both rotated the same way.
        float v = src[col + i] + (bias ? bias[col + i] : 0.f);
        if (i < rope_dim) {
            const int pair = neox ? i % half_dim : i / 2;
            const bool first = neox ? i < half_dim : (i % 2 == 0);
            const int other = neox ? (first ? i + half_dim : i - half_dim) : (first ? i + 1 : i - 1);
            const float o = src[col + other] + (bias ? bias[col + other] : 0.f);
            float s, c;
            sincosf(pos * inv_freq[pair], &s, &c);
            v = first ? v * c - o * s : v * c + o * s;
        }
        if (is_q) {
            qdst[i] = v;
        } else {
            k_cache[cache_at + i] = f2h(v);
        }
    }
    if (!is_q) {
        const int vcol = (nh + nkv) * hd + (head - nh) * hd;
        for (int i = threadIdx.x; i < hd; i += blockDim.x)
            v_cache[cache_at + i] = f2h(src[vcol + i] + (bias ? bias[vcol + i] : 0.f));
    }
}

// silu(gate) · up over rows [n, 2 ffn] (gate then up): f32 into out32, a 16-bit copy into out16 when given.
// grid (ceil(ffn / 256), n), block 256.
__device__ __forceinline__ void swiglu_body(const float* gu, float* out32, uint16_t* out16, int kind, int ffn) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= ffn) return;
    const size_t row = blockIdx.y;
    const float g = gu[row * 2 * ffn + i], u = gu[row * 2 * ffn + ffn + i];
    const float v = g / (1.f + expf(-g)) * u;
    out32[row * ffn + i] = v;
    if (out16) out16[row * ffn + i] = f32_to_half(v, kind);
}

// A 16-bit copy of n f32 values. grid ceil(n / 256), block 256.
__device__ __forceinline__ void to_half_body(const float* x, uint16_t* y, int kind, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = f32_to_half(x[i], kind);
}

// The greedy sampler's choice per row of logits [m, vocab]: the first index of the largest value, as the CPU's
// `argmax` (crates/runner/src/sampler.rs) picks it: NaNs never win, except that a NaN at index 0 gives 0 (the
// CPU's scan starts there and nothing compares greater than NaN). grid m, block a multiple of 32 up to
// ARGMAX_THREADS.
constexpr int ARGMAX_THREADS = 256;

// Whether (v, i) beats (bv, bi): a larger value, or the same value at a lower index; NaN below everything.
__device__ __forceinline__ bool argmax_beats(float v, int i, float bv, int bi) {
    const float a = v != v ? -CUDART_INF_F : v, b = bv != bv ? -CUDART_INF_F : bv;
    return a > b || (a == b && i < bi);
}

__device__ __forceinline__ void argmax_body(const float* logits, int vocab, uint32_t* out) {
    __shared__ float best_v[ARGMAX_THREADS / 32];
    __shared__ int best_i[ARGMAX_THREADS / 32];
    const float* row = logits + (size_t)blockIdx.x * vocab;
    float bv = -CUDART_INF_F;
    int bi = vocab;  // loses every tie
    for (int i = threadIdx.x; i < vocab; i += blockDim.x)
        if (argmax_beats(row[i], i, bv, bi)) {
            bv = row[i];
            bi = i;
        }
    for (int o = 16; o > 0; o >>= 1) {
        const float v = __shfl_xor_sync(0xffffffffu, bv, o);
        const int i = __shfl_xor_sync(0xffffffffu, bi, o);
        if (argmax_beats(v, i, bv, bi)) {
            bv = v;
            bi = i;
        }
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) {
        best_v[warp] = bv;
        best_i[warp] = bi;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int w = 1; w < (int)(blockDim.x + 31) / 32; ++w)
            if (argmax_beats(best_v[w], best_i[w], bv, bi)) {
                bv = best_v[w];
                bi = best_i[w];
            }
        out[blockIdx.x] = row[0] != row[0] || bi >= vocab ? 0u : (uint32_t)bi;
    }
}

}  // namespace mlx_serving
