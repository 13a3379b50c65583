// The decoder's kernels between the matmuls and the attention (#21), and unmangled entry points for the
// templated kernels of crates/kernels/cuda. Compiled at run time by NVRTC after prelude.cuh,
// paged_attention.cuh, q4k_matvec.cuh and block_matvec.cuh (crates/cuda/src/module.rs).
//
// Activations are f32 rows; a matmul that goes through cuBLAS reads a 16-bit copy (`kind`: 1 = f16,
// 2 = bf16) that the kernel before it writes beside the f32 rows.

namespace mlx_serving {

constexpr int KIND_BF16 = 2;

__device__ __forceinline__ uint16_t f2h(float f) {
    uint16_t h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}
// Round to nearest even; NaN stays NaN.
__device__ __forceinline__ uint16_t f2bf(float f) {
    uint32_t u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}
// f16 saturates at ±65504 instead of becoming inf (an outlier activation entering a cuBLAS matmul is clipped, not
// turned into NaNs downstream).
__device__ __forceinline__ uint16_t f32_to_half(float v, int kind) {
    return kind == KIND_BF16 ? f2bf(v) : f2h(fminf(fmaxf(v, -65504.f), 65504.f));
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

}  // namespace mlx_serving

using namespace mlx_serving;

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
extern "C" __global__ void rms_norm(const float* x, const uint32_t* rows, const float* w, float* out32,
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
extern "C" __global__ void qkv_rope_store(const float* qkv, const float* bias, const uint32_t* positions,
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
extern "C" __global__ void swiglu(const float* gu, float* out32, uint16_t* out16, int kind, int ffn) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= ffn) return;
    const size_t row = blockIdx.y;
    const float g = gu[row * 2 * ffn + i], u = gu[row * 2 * ffn + ffn + i];
    const float v = g / (1.f + expf(-g)) * u;
    out32[row * ffn + i] = v;
    if (out16) out16[row * ffn + i] = f32_to_half(v, kind);
}

// A 16-bit copy of n f32 values. grid ceil(n / 256), block 256.
extern "C" __global__ void to_half(const float* x, uint16_t* y, int kind, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = f32_to_half(x[i], kind);
}

// Entry points per format: embed_<f>, dequant_<f>, and mv_<f>_<NV>_<R> (the matvec, NV vectors, R rows per warp;
// R = 4 only for the 16-bit formats, where large output heads want it).
#define FORMAT_COMMON(F, NAME)                                                                               \
    extern "C" __global__ void embed_##NAME(const uint8_t* t, const uint32_t* ids, float* x, int h, float s) { \
        embed_body<F>(t, ids, x, h, s);                                                                      \
    }                                                                                                        \
    extern "C" __global__ void dequant_##NAME(const uint8_t* w, uint16_t* out, int kind, int rows, int k) { \
        dequant_body<F>(w, out, kind, rows, k);                                                              \
    }
#define MV(F, NAME, NV, R)                                                                                   \
    extern "C" __global__ void __launch_bounds__(128) mv_##NAME##_##NV##_##R(                                \
        const uint8_t* w, const float* x, float* y, int rows, int k, int ldy, int add) {                     \
        block_matvec_body<F, NV, R>(w, x, y, rows, k, ldy, add);                                             \
    }
#define MV_NV(F, NAME, R) MV(F, NAME, 1, R) MV(F, NAME, 2, R) MV(F, NAME, 4, R) MV(F, NAME, 8, R)
#define FORMAT_R2(F, NAME) FORMAT_COMMON(F, NAME) MV_NV(F, NAME, 1) MV_NV(F, NAME, 2)
#define FORMAT_R4(F, NAME) FORMAT_R2(F, NAME) MV_NV(F, NAME, 4)
FORMAT_R4(FMT_F16, f16)
FORMAT_R4(FMT_BF16, bf16)
FORMAT_R2(FMT_Q4_0, q4_0)
FORMAT_R2(FMT_Q4_1, q4_1)
FORMAT_R2(FMT_Q5_0, q5_0)
FORMAT_R2(FMT_Q5_1, q5_1)
FORMAT_R2(FMT_Q8_0, q8_0)
FORMAT_R2(FMT_Q6_K, q6_k)
FORMAT_COMMON(FMT_Q4_K, q4_k)
#define Q4K_MV(NV, R)                                                                                        \
    extern "C" __global__ void __launch_bounds__(32 * Q4K_WARPS)                                             \
        mv_q4_k_##NV##_##R(const uint8_t* w, const float* x, float* y, int rows, int k, int ldy, int add) {  \
        q4k_matvec_body<NV, R>(w, x, y, rows, k, ldy, add);                                                  \
    }
#define Q4K_MV_R(NV) Q4K_MV(NV, 1) Q4K_MV(NV, 2) Q4K_MV(NV, 4)
Q4K_MV_R(1)
Q4K_MV_R(2)
Q4K_MV_R(4)
Q4K_MV_R(8)

extern "C" __global__ void pa_split(PagedDecodeParams p) { paged_decode_split_body(p); }
extern "C" __global__ void pa_merge(PagedDecodeParams p) { paged_decode_merge_body(p); }
#define PA_GROUPED(G)                                                                                        \
    extern "C" __global__ void __launch_bounds__(PG_THREADS) pa_grouped_##G(PagedDecodeParams p) {           \
        paged_decode_split_grouped_body<G>(p);                                                               \
    }
PA_GROUPED(1)
PA_GROUPED(2)
PA_GROUPED(3)
PA_GROUPED(4)
PA_GROUPED(5)
PA_GROUPED(6)
PA_GROUPED(7)
PA_GROUPED(8)
