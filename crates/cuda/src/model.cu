// The decoder's kernels between the matmuls and the attention (#21), and unmangled entry points for the
// templated kernels of crates/kernels/cuda. Compiled at run time by NVRTC after prelude.cuh,
// paged_attention.cuh and q4k_matvec.cuh (crates/cuda/src/module.rs).
//
// Activations are f32 rows; a matmul that goes through cuBLAS reads a 16-bit copy (`kind`: 1 = f16,
// 2 = bf16) that the kernel before it writes beside the f32 rows.

namespace mlx_serving {

constexpr int KIND_F16 = 1;
constexpr int KIND_BF16 = 2;

__device__ __forceinline__ float h2f(uint16_t h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}
__device__ __forceinline__ uint16_t f2h(float f) {
    uint16_t h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}
__device__ __forceinline__ float bf2f(uint16_t b) { return __uint_as_float(((uint32_t)b) << 16); }
// Round to nearest even; NaN stays NaN.
__device__ __forceinline__ uint16_t f2bf(float f) {
    uint32_t u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}
__device__ __forceinline__ float half_to_f32(uint16_t v, int kind) { return kind == KIND_BF16 ? bf2f(v) : h2f(v); }
__device__ __forceinline__ uint16_t f32_to_half(float v, int kind) { return kind == KIND_BF16 ? f2bf(v) : f2h(v); }

// Value `i` (< 256 · blocks) of a Q4_K row (see q4k_matvec.cuh for the layout).
__device__ __forceinline__ float q4k_value(const uint8_t* row, int i) {
    const uint8_t* blk = row + (size_t)(i / Q4K_BLOCK_VALUES) * Q4K_BLOCK_BYTES;
    const int within = i % Q4K_BLOCK_VALUES;
    const int j = within / 64, hi = (within % 64) / 32, p = within % 32;
    float sc, m;
    q4k_scale_min(2 * j + hi, blk + 4, sc, m);
    const float d = h2f(*reinterpret_cast<const uint16_t*>(blk));
    const float dmin = h2f(*reinterpret_cast<const uint16_t*>(blk + 2));
    const int q = (blk[16 + 32 * j + p] >> (4 * hi)) & 0xF;
    return d * sc * (float)q - dmin * m;
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

// x[r] = table[ids[r]] · scale for a 16-bit table. grid n, block 256.
extern "C" __global__ void embed_half(const uint16_t* table, int kind, const uint32_t* ids, float* x, int h,
                                      float scale) {
    const uint16_t* row = table + (size_t)ids[blockIdx.x] * h;
    float* out = x + (size_t)blockIdx.x * h;
    for (int i = threadIdx.x; i < h; i += blockDim.x) out[i] = half_to_f32(row[i], kind) * scale;
}

// The same for a Q4_K table.
extern "C" __global__ void embed_q4k(const uint8_t* table, const uint32_t* ids, float* x, int h, float scale) {
    const uint8_t* row = table + (size_t)ids[blockIdx.x] * (h / Q4K_BLOCK_VALUES) * Q4K_BLOCK_BYTES;
    float* out = x + (size_t)blockIdx.x * h;
    for (int i = threadIdx.x; i < h; i += blockDim.x) out[i] = q4k_value(row, i) * scale;
}

// A Q4_K matrix [rows, k] as f16 (the input of a cuBLAS GEMM for batches past the matvec kernels).
// grid rows · k / 256, block 256.
extern "C" __global__ void q4k_dequant_f16(const uint8_t* w, uint16_t* out, int k) {
    const size_t blk = blockIdx.x;
    const size_t per_row = k / Q4K_BLOCK_VALUES;
    const uint8_t* row = w + (blk / per_row) * per_row * Q4K_BLOCK_BYTES;
    const int i = (int)(blk % per_row) * Q4K_BLOCK_VALUES + threadIdx.x;
    out[blk * Q4K_BLOCK_VALUES + threadIdx.x] = f2h(q4k_value(row, i));
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

// y[v][r] (+)= Σ_k W[r][k] · x[v][k] for 16-bit weights (f16 or bf16, `KIND`), f32 activations and sums, v < NV:
// one warp per R rows, each lane 8 consecutive weights (a 16-byte load) per step of 256. A row's sum is
// taken in the same order whatever NV and R are, so a vector's result does not depend on its batch companions.
// Needs k a multiple of 8. grid ceil(rows / (4 · R)), block 128.
template <int NV, int R, int KIND>
__device__ __forceinline__ void half_matvec_body(const uint16_t* __restrict__ w, const float* __restrict__ x,
                                                 float* __restrict__ y, int rows, int k, int add) {
    const int lane = threadIdx.x & 31;
    const int row0 = (blockIdx.x * 4 + (threadIdx.x >> 5)) * R;
    if (row0 >= rows) return;
    float acc[R][NV];
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
        for (int v = 0; v < NV; ++v) acc[r][v] = 0.f;
    for (int c = lane * 8; c < k; c += 256) {
        float wf[R][8];
#pragma unroll
        for (int r = 0; r < R; ++r) {
            const int row = min(row0 + r, rows - 1);
            const uint4 raw = __ldg(reinterpret_cast<const uint4*>(w + (size_t)row * k + c));
            const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                wf[r][2 * e] = half_to_f32((uint16_t)(words[e] & 0xFFFF), KIND);
                wf[r][2 * e + 1] = half_to_f32((uint16_t)(words[e] >> 16), KIND);
            }
        }
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
#pragma unroll
    for (int r = 0; r < R; ++r) {
#pragma unroll
        for (int v = 0; v < NV; ++v) {
            const float s = warp_sum(acc[r][v]);
            if (lane == 0 && row0 + r < rows) {
                float* out = y + (size_t)v * rows + row0 + r;
                *out = add ? *out + s : s;
            }
        }
    }
}

#define HALF_MV(NV, R, KIND, NAME)                                                                          \
    extern "C" __global__ void __launch_bounds__(128)                                                       \
        NAME##_mv_##NV##_##R(const uint16_t* w, const float* x, float* y, int rows, int k, int add) {       \
        half_matvec_body<NV, R, KIND>(w, x, y, rows, k, add);                                               \
    }
#define HALF_MV_R(NV)                                                                                       \
    HALF_MV(NV, 1, KIND_F16, f16)                                                                           \
    HALF_MV(NV, 2, KIND_F16, f16)                                                                           \
    HALF_MV(NV, 4, KIND_F16, f16)                                                                           \
    HALF_MV(NV, 1, KIND_BF16, bf16)                                                                         \
    HALF_MV(NV, 2, KIND_BF16, bf16)                                                                         \
    HALF_MV(NV, 4, KIND_BF16, bf16)
HALF_MV_R(1)
HALF_MV_R(2)
HALF_MV_R(4)
HALF_MV_R(8)

#define Q4K_MV(NV, R)                                                                                        \
    extern "C" __global__ void __launch_bounds__(32 * Q4K_WARPS)                                             \
        q4k_mv_##NV##_##R(const uint8_t* w, const float* x, float* y, int rows, int k, int add) {            \
        q4k_matvec_body<NV, R>(w, x, y, rows, k, add);                                                       \
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
