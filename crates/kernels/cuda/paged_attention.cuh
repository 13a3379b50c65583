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
#include <cuda_fp16.h>
#include <math_constants.h>
#include <stdint.h>

namespace mlx_serving {

constexpr int PA_SPLIT = 512;    // context positions per split
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

// grid (num_heads, num_seqs, max_splits), block PA_THREADS.
__global__ void paged_decode_split(PagedDecodeParams p) {
    const int head = blockIdx.x, seq = blockIdx.y, split = blockIdx.z;
    const int ctx = (int)p.context_lens[seq];
    const int start = split * PA_SPLIT;
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
    const int end = min(ctx, start + PA_SPLIT);
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

// grid (num_heads, num_seqs), block PA_THREADS: merges the splits in order.
__global__ void paged_decode_merge(PagedDecodeParams p) {
    const int head = blockIdx.x, seq = blockIdx.y;
    const int splits = ((int)p.context_lens[seq] + PA_SPLIT - 1) / PA_SPLIT;
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

// Launches both kernels on `stream`. `max_splits` must be at least ceil(max context / PA_SPLIT); the
// partial buffers hold num_seqs × num_heads × max_splits states.
inline cudaError_t paged_decode(const PagedDecodeParams& p, int num_seqs, cudaStream_t stream) {
    if (p.head_dim % 2 != 0 || p.head_dim > PA_MAX_HEAD_DIM || p.num_heads % p.num_kv_heads != 0) {
        return cudaErrorInvalidValue;
    }
    paged_decode_split<<<dim3(p.num_heads, num_seqs, p.max_splits), PA_THREADS, 0, stream>>>(p);
    paged_decode_merge<<<dim3(p.num_heads, num_seqs), PA_THREADS, 0, stream>>>(p);
    return cudaGetLastError();
}

}  // namespace mlx_serving
