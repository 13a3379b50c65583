// Paged attention for decode on NVIDIA GPUs (#21): one query token per sequence attends to its K/V,
// read in place from the paged cache through the block tables the scheduler makes. The cache layout is the
// CPU kernels' (crates/kernels/src/attention.rs), per layer, K and V each f16:
//
//   index(block, slot, kv_head, d) = ((block * block_size + slot) * num_kv_heads + kv_head) * head_dim + d
//
// Flash-decoding: the context is cut into splits of SPLIT positions, each split of each (sequence, head)
// is one thread block that writes its partial softmax state (max, sum of exponentials, unnormalized
// output); a second kernel merges the splits. Long contexts thereby use the whole GPU even at batch 1.
// Grouped-query attention: query head h reads kv head h / (num_heads / num_kv_heads).
//
// Scores, softmax and outputs are accumulated in f32. The merge order is fixed (split 0, 1, ...), and a
// sequence's splits depend only on its own context length, so a sequence's result does not depend on its
// batch companions (batch invariance).

#pragma once
#ifndef __CUDACC_RTC__
#include <cuda_fp16.h>
#include <math_constants.h>
#include <stdint.h>
#endif

namespace mlx_serving {

constexpr int PA_SPLIT = 256;    // most context positions per split (`split` in the params: 64, 128 or 256)
constexpr int PA_THREADS = 128;  // 4 warps
constexpr int PA_MAX_HEAD_DIM = 256;

struct PagedDecodeParams {
    const float* q;              // [num_seqs, num_heads, head_dim]
    const __half* k_cache;       // one layer: [num_blocks, block_size, num_kv_heads, head_dim]
    const __half* v_cache;
    const uint32_t* block_tables;  // [num_seqs, max_blocks_per_seq]
    const uint32_t* context_lens;  // [num_seqs]
    float* out;                  // [num_seqs, num_heads, head_dim]
    float* part_max;             // [num_seqs, num_heads, max_splits]
    float* part_sum;             // [num_seqs, num_heads, max_splits]
    float* part_out;             // [num_seqs, num_heads, max_splits, head_dim]
    int num_heads, num_kv_heads, head_dim, block_size, max_blocks_per_seq, max_splits;
    int split;                   // context positions per split, at most PA_SPLIT (paged_decode_split_size)
    float scale;
};

__device__ __forceinline__ float warp_sum(float x) {
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    return x;
}

__device__ __forceinline__ float warp_max(float x) {
    for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
    return x;
}

// grid (num_heads, num_seqs, max_splits), block PA_THREADS. (Bodies are device functions so that the
// runtime-compiled module, crates/cuda, can give each an unmangled `extern "C"` entry point.)
__device__ __forceinline__ void paged_decode_split_body(const PagedDecodeParams& p) {
    const int head = blockIdx.x, seq = blockIdx.y, split = blockIdx.z;
    const int ctx = (int)p.context_lens[seq];
    const int start = split * p.split;
    const int size_ = p.head_dim;
    const size_t part = ((size_t)seq * p.num_heads + head) * p.max_splits + split;
    if (start >= ctx) {
        // An empty split: its state weighs nothing in the merge.
        if (threadIdx.x == 0) {
            p.part_max[part] = -CUDART_INF_F;
            p.part_sum[part] = 0.f;
        }
        return;
    }
    const int end = min(ctx, start + p.split);
    const int kv_head = head / (p.num_heads / p.num_kv_heads);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = PA_THREADS / 32;

    __shared__ float q_s[PA_MAX_HEAD_DIM];
    __shared__ float scores[PA_SPLIT];
    __shared__ float red[PA_THREADS / 32];
    const float* q = p.q + ((size_t)seq * p.num_heads + head) * size_;
    for (int d = threadIdx.x; d < size_; d += PA_THREADS) q_s[d] = q[d] * p.scale;
    __syncthreads();

    const uint32_t* table = p.block_tables + (size_t)seq * p.max_blocks_per_seq;
    // q·k: one warp per position, lanes over the head's dimensions in pairs (half2 loads).
    for (int pos = start + warp; pos < end; pos += warps) {
        const size_t slot = (size_t)table[pos / p.block_size] * p.block_size + pos % p.block_size;
        const __half2* k = reinterpret_cast<const __half2*>(p.k_cache + (slot * p.num_kv_heads + kv_head) * size_);
        float s = 0.f;
        for (int i = lane; i < size_ / 2; i += 32) {
            const float2 kf = __half22float2(k[i]);
            s += q_s[2 * i] * kf.x + q_s[2 * i + 1] * kf.y;
        }
        s = warp_sum(s);
        if (lane == 0) scores[pos - start] = s;
    }
    __syncthreads();

    // Softmax over the split (unnormalized: the merge divides).
    const int n = end - start;
    float m = -CUDART_INF_F;
    for (int i = threadIdx.x; i < n; i += PA_THREADS) m = fmaxf(m, scores[i]);
    m = warp_max(m);
    if (lane == 0) red[warp] = m;
    __syncthreads();
    m = red[0];
    for (int w = 1; w < warps; ++w) m = fmaxf(m, red[w]);
    __syncthreads();
    float l = 0.f;
    for (int i = threadIdx.x; i < n; i += PA_THREADS) {
        const float e = __expf(scores[i] - m);
        scores[i] = e;
        l += e;
    }
    l = warp_sum(l);
    if (lane == 0) red[warp] = l;
    __syncthreads();
    if (threadIdx.x == 0) {
        float total = 0.f;
        for (int w = 0; w < warps; ++w) total += red[w];
        p.part_max[part] = m;
        p.part_sum[part] = total;
    }

    // Σ e_i · v_i: each thread owns dimension pairs; positions in order (deterministic).
    float* o = p.part_out + part * size_;
    for (int i = threadIdx.x; i < size_ / 2; i += PA_THREADS) {
        float ax = 0.f, ay = 0.f;
        for (int pos = start; pos < end; ++pos) {
            const size_t slot = (size_t)table[pos / p.block_size] * p.block_size + pos % p.block_size;
            const __half2* v = reinterpret_cast<const __half2*>(p.v_cache + (slot * p.num_kv_heads + kv_head) * size_);
            const float2 vf = __half22float2(v[i]);
            const float e = scores[pos - start];
            ax += e * vf.x;
            ay += e * vf.y;
        }
        o[2 * i] = ax;
        o[2 * i + 1] = ay;
    }
}

__global__ void paged_decode_split(PagedDecodeParams p) { paged_decode_split_body(p); }

// grid (num_heads, num_seqs), block PA_THREADS: merges the splits in order.
__device__ __forceinline__ void paged_decode_merge_body(const PagedDecodeParams& p) {
    const int head = blockIdx.x, seq = blockIdx.y;
    const int splits = ((int)p.context_lens[seq] + p.split - 1) / p.split;
    const size_t base = ((size_t)seq * p.num_heads + head) * p.max_splits;
    float m = -CUDART_INF_F;
    for (int s = 0; s < splits; ++s) m = fmaxf(m, p.part_max[base + s]);
    float l = 0.f;
    for (int s = 0; s < splits; ++s) l += p.part_sum[base + s] * __expf(p.part_max[base + s] - m);
    const float inv = l > 0.f ? 1.f / l : 0.f;
    float* out = p.out + ((size_t)seq * p.num_heads + head) * p.head_dim;
    for (int d = threadIdx.x; d < p.head_dim; d += PA_THREADS) {
        float acc = 0.f;
        for (int s = 0; s < splits; ++s) acc += p.part_out[(base + s) * p.head_dim + d] * __expf(p.part_max[base + s] - m);
        out[d] = acc * inv;
    }
}

__global__ void paged_decode_merge(PagedDecodeParams p) { paged_decode_merge_body(p); }

// The grouped kernel: one thread block per (kv head, sequence, split) computes all G query heads that share the
// kv head, so each K/V row is read from memory once (the per-head kernel above reads it G times), with loads
// spread so that many are in flight:
// - scores: a warp takes 4 positions at a time, 8 lanes per position, each lane 16-byte loads of the K row;
//   the 8 lanes' partial dot products for the G heads are summed with 3 shuffles each;
// - softmax: a warp per head over the split;
// - values: threads are (position group, head, 8-dimension chunk); each loads 16 bytes of a V row per
//   position (the G heads' threads of one chunk read the same bytes in one transaction), the position groups'
//   partial sums are added in a fixed order.
// Needs head_dim a multiple of 64 and G · head_dim ≤ 2048 (G ≤ 8 at head size 256).
constexpr int PG_THREADS = 256;

template <int G>
__device__ __forceinline__ void paged_decode_split_grouped_body(const PagedDecodeParams& p) {
    const int kv_head = blockIdx.x, seq = blockIdx.y, split = blockIdx.z;
    const int ctx = (int)p.context_lens[seq];
    const int start = split * p.split;
    const int D = p.head_dim;
    const size_t part0 = ((size_t)seq * p.num_heads + (size_t)kv_head * G) * p.max_splits + split;
    if (start >= ctx) {
        if (threadIdx.x < G) {
            p.part_max[part0 + (size_t)threadIdx.x * p.max_splits] = -CUDART_INF_F;
            p.part_sum[part0 + (size_t)threadIdx.x * p.max_splits] = 0.f;
        }
        return;
    }
    const int end = min(ctx, start + p.split), n = end - start;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = PG_THREADS / 32;
    __shared__ __align__(16) float q_s[2048];          // [G][D]
    __shared__ float scores[G][PA_SPLIT];
    __shared__ __align__(16) float partial[2048];      // [position group][G][D] (≤ 2048 floats in all)
    __shared__ uint32_t slots[PA_SPLIT];
    for (int i = threadIdx.x; i < G * D; i += PG_THREADS) {
        const int g = i / D, d = i % D;
        q_s[i] = p.q[((size_t)seq * p.num_heads + kv_head * G + g) * D + d] * p.scale;
    }
    const uint32_t* table = p.block_tables + (size_t)seq * p.max_blocks_per_seq;
    for (int i = threadIdx.x; i < n; i += PG_THREADS) {
        const int pos = start + i;
        slots[i] = table[pos / p.block_size] * p.block_size + pos % p.block_size;
    }
    __syncthreads();

    // Scores: 8 lanes per position, 4 positions per warp step.
    const int sub = lane >> 3, l8 = lane & 7;
    for (int i = warp * 4 + sub; i - sub < n; i += warps * 4) {
        float dot[G];
#pragma unroll
        for (int g = 0; g < G; ++g) dot[g] = 0.f;
        if (i < n) {
            const __half* k = p.k_cache + ((size_t)slots[i] * p.num_kv_heads + kv_head) * D;
            for (int c = l8 * 8; c < D; c += 64) {
                const uint4 raw = *reinterpret_cast<const uint4*>(k + c);
                const __half2* h = reinterpret_cast<const __half2*>(&raw);
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const float2 kf = __half22float2(h[e]);
#pragma unroll
                    for (int g = 0; g < G; ++g) dot[g] += q_s[g * D + c + 2 * e] * kf.x + q_s[g * D + c + 2 * e + 1] * kf.y;
                }
            }
        }
#pragma unroll
        for (int g = 0; g < G; ++g) {
            float s = dot[g];
            s += __shfl_xor_sync(0xffffffffu, s, 4);
            s += __shfl_xor_sync(0xffffffffu, s, 2);
            s += __shfl_xor_sync(0xffffffffu, s, 1);
            if (l8 == 0 && i < n) scores[g][i] = s;
        }
    }
    __syncthreads();

    // Softmax: a warp per head (unnormalized; the merge divides).
    for (int g = warp; g < G; g += warps) {
        float m = -CUDART_INF_F;
        for (int i = lane; i < n; i += 32) m = fmaxf(m, scores[g][i]);
        m = warp_max(m);
        float l = 0.f;
        for (int i = lane; i < n; i += 32) {
            const float e = __expf(scores[g][i] - m);
            scores[g][i] = e;
            l += e;
        }
        l = warp_sum(l);
        if (lane == 0) {
            p.part_max[part0 + (size_t)g * p.max_splits] = m;
            p.part_sum[part0 + (size_t)g * p.max_splits] = l;
        }
    }
    __syncthreads();

    // Values: thread = (position group, head, chunk of 8 dimensions).
    const int chunks = D / 8, per_group = G * chunks, groups = PG_THREADS / per_group;
    const int pg = threadIdx.x / per_group, g = (threadIdx.x % per_group) / chunks, c = threadIdx.x % chunks;
    if (pg < groups) {
        float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
#pragma unroll 4
        for (int i = pg; i < n; i += groups) {
            const uint4 raw = *reinterpret_cast<const uint4*>(
                p.v_cache + ((size_t)slots[i] * p.num_kv_heads + kv_head) * D + 8 * c);
            const __half2* h = reinterpret_cast<const __half2*>(&raw);
            const float e = scores[g][i];
#pragma unroll
            for (int t = 0; t < 4; ++t) {
                const float2 vf = __half22float2(h[t]);
                acc[2 * t] += e * vf.x;
                acc[2 * t + 1] += e * vf.y;
            }
        }
#pragma unroll
        for (int t = 0; t < 8; ++t) partial[(pg * G + g) * D + 8 * c + t] = acc[t];
    }
    __syncthreads();
    for (int i = threadIdx.x; i < G * D; i += PG_THREADS) {
        float sum = 0.f;
        for (int q = 0; q < groups; ++q) sum += partial[q * G * D + i];
        const int gg = i / D, d = i % D;
        p.part_out[(part0 + (size_t)gg * p.max_splits) * D + d] = sum;
    }
}

template <int G>
__global__ void __launch_bounds__(PG_THREADS) paged_decode_split_grouped(PagedDecodeParams p) {
    paged_decode_split_grouped_body<G>(p);
}

#ifndef __CUDACC_RTC__
// The split length for a step: 256 positions, shortened to 128 or 64 while the step would have fewer than
// `sms` · 2 thread blocks (small batches, short contexts), so that every SM has work. A sequence's splits then
// depend on its batch companions' number: set `batch_invariant` to keep 256 always (results are then
// bitwise independent of the batch).
inline int paged_decode_split_size(int num_seqs, int num_kv_heads, int max_ctx, int sms, bool batch_invariant) {
    int split = PA_SPLIT;
    while (!batch_invariant && split > 64 &&
           (long long)num_seqs * num_kv_heads * ((max_ctx + split - 1) / split) < 2LL * sms)
        split /= 2;
    return split;
}

// Launches the split and merge kernels on `stream`: the grouped split kernel where the shape allows it
// (head_dim a multiple of 64, G ≤ 8, G · head_dim ≤ 2048), else the per-head one. `max_splits` must be at
// least ceil(max context / split); the partial buffers hold num_seqs × num_heads × max_splits states.
inline cudaError_t paged_decode(const PagedDecodeParams& p, int num_seqs, cudaStream_t stream) {
    if (p.head_dim % 2 != 0 || p.head_dim > PA_MAX_HEAD_DIM || p.num_heads % p.num_kv_heads != 0 ||
        p.split < 1 || p.split > PA_SPLIT) {
        return cudaErrorInvalidValue;
    }
    const int G = p.num_heads / p.num_kv_heads;
    const dim3 grouped(p.num_kv_heads, num_seqs, p.max_splits);
    const bool fits = p.head_dim % 64 == 0 && G * p.head_dim <= 2048;
    switch (fits ? G : 0) {
        case 1: paged_decode_split_grouped<1><<<grouped, PG_THREADS, 0, stream>>>(p); break;
        case 2: paged_decode_split_grouped<2><<<grouped, PG_THREADS, 0, stream>>>(p); break;
        case 3: paged_decode_split_grouped<3><<<grouped, PG_THREADS, 0, stream>>>(p); break;
        case 4: paged_decode_split_grouped<4><<<grouped, PG_THREADS, 0, stream>>>(p); break;
        case 5: paged_decode_split_grouped<5><<<grouped, PG_THREADS, 0, stream>>>(p); break;
        case 6: paged_decode_split_grouped<6><<<grouped, PG_THREADS, 0, stream>>>(p); break;
        case 7: paged_decode_split_grouped<7><<<grouped, PG_THREADS, 0, stream>>>(p); break;
        case 8: paged_decode_split_grouped<8><<<grouped, PG_THREADS, 0, stream>>>(p); break;
        default: paged_decode_split<<<dim3(p.num_heads, num_seqs, p.max_splits), PA_THREADS, 0, stream>>>(p);
    }
    paged_decode_merge<<<dim3(p.num_heads, num_seqs), PA_THREADS, 0, stream>>>(p);
    return cudaGetLastError();
}

#endif  // __CUDACC_RTC__

}  // namespace mlx_serving
