// Device test and benchmark of the paged decode attention kernel (#21), against a CPU reference in f64 on
// the same inputs: random queries, random f16 K/V, block tables in shuffled order. Prints each case's
// error and fails (exit 1) past the bound; then times decode over a large batch and prints the bandwidth
// achieved against the bytes of K/V read.
//
// Build and run on the GPU machine (scripts/cuda-kernel-tests.sh does both):
//   nvcc -O3 -std=c++17 -arch=sm_90 -o /tmp/pa_test crates/kernels/cuda/tests/paged_attention_test.cu && /tmp/pa_test

#include "../paged_attention.cuh"
#include "check.cuh"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <random>
#include <vector>

using namespace mlx_serving;

struct Case {
    int num_seqs, num_heads, num_kv_heads, head_dim, block_size;
    std::vector<int> ctx;  // per sequence; repeated cyclically
};

struct Device {
    PagedDecodeParams p{};
    std::vector<void*> owned;
    template <class T>
    T* upload(const std::vector<T>& v) {
        void* d;
        CHECK(cudaMalloc(&d, std::max<size_t>(1, v.size() * sizeof(T))));
        CHECK(cudaMemcpy(d, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice));
        owned.push_back(d);
        return static_cast<T*>(d);
    }
    float* zeros(size_t n) {
        void* d;
        CHECK(cudaMalloc(&d, std::max<size_t>(1, n * sizeof(float))));
        owned.push_back(d);
        return static_cast<float*>(d);
    }
    ~Device() {
        for (void* d : owned) cudaFree(d);
    }
};

// Uploads the inputs and allocates the outputs and partial states for `lens.size()` sequences; `k` and `v`
// are device pointers already (the benchmark allocates them on the device).
static void bind_inputs(Device& dev, const std::vector<float>& q, const __half* k, const __half* v,
                 const std::vector<uint32_t>& tables, const std::vector<uint32_t>& lens, int H, int KVH, int D,
                 int BS, int max_blocks, float scale, int split = PA_SPLIT) {
    PagedDecodeParams& p = dev.p;
    const size_t S = lens.size();
    const int max_ctx = (int)*std::max_element(lens.begin(), lens.end());
    p.split = split;
    p.max_splits = (max_ctx + split - 1) / split;
    p.q = dev.upload(q);
    p.k_cache = k;
    p.v_cache = v;
    p.block_tables = dev.upload(tables);
    p.context_lens = dev.upload(lens);
    p.out = dev.zeros(S * H * D);
    p.part_max = dev.zeros(S * H * p.max_splits);
    p.part_sum = dev.zeros(S * H * p.max_splits);
    p.part_out = dev.zeros(S * H * p.max_splits * D);
    p.num_heads = H;
    p.num_kv_heads = KVH;
    p.head_dim = D;
    p.block_size = BS;
    p.max_blocks_per_seq = max_blocks;
    p.scale = scale;
}

// Returns the largest |gpu − ref| over all outputs (with the largest |ref| for scale), after checking.
static double run_case(const Case& c, int split, uint64_t seed, bool* ok) {
    std::mt19937_64 rng(seed);
    std::uniform_real_distribution<float> uni(-1.f, 1.f);
    const int S = c.num_seqs, H = c.num_heads, KVH = c.num_kv_heads, D = c.head_dim, BS = c.block_size;
    std::vector<int> ctx(S);
    for (int s = 0; s < S; ++s) ctx[s] = c.ctx[s % c.ctx.size()];
    const int max_ctx = *std::max_element(ctx.begin(), ctx.end());
    const int max_blocks = (max_ctx + BS - 1) / BS;
    int total_blocks = 0;
    for (int s = 0; s < S; ++s) total_blocks += (ctx[s] + BS - 1) / BS;
    total_blocks += 3;  // unused blocks around, so a wrong table reads garbage, not zeros
    // Physical blocks handed out in shuffled order.
    std::vector<uint32_t> phys(total_blocks);
    std::iota(phys.begin(), phys.end(), 0u);
    std::shuffle(phys.begin(), phys.end(), rng);
    std::vector<uint32_t> tables((size_t)S * max_blocks, 0xFFFFFFFFu);
    int next = 0;
    for (int s = 0; s < S; ++s)
        for (int b = 0; b < (ctx[s] + BS - 1) / BS; ++b) tables[(size_t)s * max_blocks + b] = phys[next++];
    const size_t cache_len = (size_t)total_blocks * BS * KVH * D;
    std::vector<__half> k(cache_len), v(cache_len);
    std::vector<float> kf(cache_len), vf(cache_len);
    for (size_t i = 0; i < cache_len; ++i) {
        k[i] = __float2half(uni(rng));
        v[i] = __float2half(uni(rng));
        kf[i] = __half2float(k[i]);
        vf[i] = __half2float(v[i]);
    }
    std::vector<float> q((size_t)S * H * D);
    for (auto& x : q) x = uni(rng);
    const float scale = 1.f / std::sqrt((float)D);
    std::vector<uint32_t> lens(ctx.begin(), ctx.end());
    Device dev;
    bind_inputs(dev, q, dev.upload(k), dev.upload(v), tables, lens, H, KVH, D, BS, max_blocks, scale, split);
    const PagedDecodeParams& p = dev.p;
    CHECK(paged_decode(p, S, 0));
    CHECK(cudaDeviceSynchronize());
    std::vector<float> out((size_t)S * H * D);
    CHECK(cudaMemcpy(out.data(), p.out, out.size() * sizeof(float), cudaMemcpyDeviceToHost));

    double worst = 0, biggest = 0;
    std::vector<double> sc;
    for (int s = 0; s < S; ++s) {
        for (int h = 0; h < H; ++h) {
            const int kvh = h / (H / KVH);
            sc.assign(ctx[s], 0.0);
            double m = -1e300;
            for (int t = 0; t < ctx[s]; ++t) {
                const size_t slot = (size_t)tables[(size_t)s * max_blocks + t / BS] * BS + t % BS;
                const float* kr = &kf[(slot * KVH + kvh) * D];
                double acc = 0;
                for (int d = 0; d < D; ++d) acc += (double)q[((size_t)s * H + h) * D + d] * scale * kr[d];
                sc[t] = acc;
                m = std::max(m, acc);
            }
            double l = 0;
            for (double& x : sc) l += (x = std::exp(x - m));
            for (int d = 0; d < D; ++d) {
                double acc = 0;
                for (int t = 0; t < ctx[s]; ++t) {
                    const size_t slot = (size_t)tables[(size_t)s * max_blocks + t / BS] * BS + t % BS;
                    acc += sc[t] * vf[(slot * KVH + kvh) * D + d];
                }
                const double ref = acc / l;
                const double got = out[((size_t)s * H + h) * D + d];
                worst = std::max(worst, std::fabs(got - ref));
                biggest = std::max(biggest, std::fabs(ref));
            }
        }
    }
    // f32 accumulation with __expf over up to a few thousand terms: 1e-4 absolute on outputs of magnitude ≤ 1.
    const double bound = 1e-4;
    *ok = worst <= bound;
    std::printf("%-4s seqs %3d heads %2d/%d dim %3d block %2d split %3d ctx %-12s max |err| %.2e (max |ref| %.2f, bound %.0e)\n",
                *ok ? "ok" : "FAIL", S, H, KVH, D, BS, split,
                [&] {
                    static char b[64];
                    std::snprintf(b, sizeof b, "%d..%d", *std::min_element(ctx.begin(), ctx.end()), max_ctx);
                    return b;
                }(),
                worst, biggest, bound);
    return worst;
}

// Batch invariance: a sequence's output alone equals its output among others, bitwise.
// The batch runs first; then each sequence runs alone on the same buffers (its q row, table and length).
static bool batch_invariance() {
    std::mt19937_64 rng(99);
    std::uniform_real_distribution<float> uni(-1.f, 1.f);
    const int H = 8, KVH = 2, D = 128, BS = 16;
    const std::vector<int> ctx{1500, 3, 700, 4100, 1, 64};
    const int S = (int)ctx.size(), max_blocks = (4100 + BS - 1) / BS, blocks = S * max_blocks;
    std::vector<uint32_t> tables((size_t)S * max_blocks);
    std::vector<uint32_t> phys(blocks);
    std::iota(phys.begin(), phys.end(), 0u);
    std::shuffle(phys.begin(), phys.end(), rng);
    for (size_t i = 0; i < tables.size(); ++i) tables[i] = phys[i];
    const size_t n = (size_t)blocks * BS * KVH * D;
    std::vector<__half> k(n), v(n);
    for (size_t i = 0; i < n; ++i) {
        k[i] = __float2half(uni(rng));
        v[i] = __float2half(uni(rng));
    }
    std::vector<float> q((size_t)S * H * D);
    for (auto& x : q) x = uni(rng);
    std::vector<uint32_t> lens(ctx.begin(), ctx.end());
    Device dev;
    bind_inputs(dev, q, dev.upload(k), dev.upload(v), tables, lens, H, KVH, D, BS, max_blocks, 0.088f);
    const PagedDecodeParams& p = dev.p;
    CHECK(paged_decode(p, S, 0));
    std::vector<float> batched((size_t)S * H * D);
    CHECK(cudaMemcpy(batched.data(), p.out, batched.size() * 4, cudaMemcpyDeviceToHost));
    bool same = true;
    for (int s = 0; s < S; ++s) {
        // Sequence s alone: its rows of q, table and length at index 0.
        PagedDecodeParams one = p;
        one.q = p.q + (size_t)s * H * D;
        one.block_tables = p.block_tables + (size_t)s * max_blocks;
        one.context_lens = p.context_lens + s;
        CHECK(paged_decode(one, 1, 0));
        std::vector<float> alone_out((size_t)H * D);
        CHECK(cudaMemcpy(alone_out.data(), p.out, alone_out.size() * 4, cudaMemcpyDeviceToHost));
        same = same && std::equal(alone_out.begin(), alone_out.end(), batched.begin() + (size_t)s * H * D,
                                  [](float a, float b) { return std::memcmp(&a, &b, 4) == 0; });
    }
    std::printf("%-4s batch invariance: each of %d sequences alone equals itself in the batch, bitwise\n",
                same ? "ok" : "FAIL", S);
    return same;
}

// Decode over a large batch: bytes of K and V read per call against the time.
static void bench(int S, int ctx_len, int H, int KVH, int D, int split) {
    const int BS = 16, max_blocks = (ctx_len + BS - 1) / BS, blocks = S * max_blocks;
    const size_t n = (size_t)blocks * BS * KVH * D;
    std::vector<uint32_t> tables((size_t)S * max_blocks);
    std::iota(tables.begin(), tables.end(), 0u);
    std::vector<uint32_t> lens(S, ctx_len);
    std::vector<float> q((size_t)S * H * D, 0.01f);
    Device dev;
    __half *k, *v;
    CHECK(cudaMalloc(&k, n * 2));
    CHECK(cudaMalloc(&v, n * 2));
    CHECK(cudaMemset(k, 0, n * 2));
    CHECK(cudaMemset(v, 0, n * 2));
    dev.owned.push_back(k);
    dev.owned.push_back(v);
    bind_inputs(dev, q, k, v, tables, lens, H, KVH, D, BS, max_blocks, 0.088f, split);
    const PagedDecodeParams& p = dev.p;
    for (int i = 0; i < 3; ++i) CHECK(paged_decode(p, S, 0));
    cudaEvent_t a, b;
    CHECK(cudaEventCreate(&a));
    CHECK(cudaEventCreate(&b));
    const int iters = 20;
    std::vector<float> ms(iters);
    for (int i = 0; i < iters; ++i) {
        CHECK(cudaEventRecord(a));
        CHECK(paged_decode(p, S, 0));
        CHECK(cudaEventRecord(b));
        CHECK(cudaEventSynchronize(b));
        CHECK(cudaEventElapsedTime(&ms[i], a, b));
    }
    std::sort(ms.begin(), ms.end());
    const double med = ms[iters / 2] * 1e-3;
    // K and V of every position once per kv head (the query heads of a group reread them from L2).
    const double bytes = 2.0 * S * ctx_len * KVH * D * 2;
    std::printf("bench seqs %3d ctx %5d heads %d/%d dim %d split %3d: median %.1f us, %.0f GB/s of K/V\n", S, ctx_len,
                H, KVH, D, split, med * 1e6, bytes / med / 1e9);
}

int main() {
    int dev = 0;
    cudaDeviceProp prop;
    CHECK(cudaGetDeviceProperties(&prop, dev));
    std::printf("device: %s, %d SMs\n", prop.name, prop.multiProcessorCount);
    const std::vector<Case> cases = {
        {1, 4, 4, 64, 16, {1}},
        {3, 8, 2, 64, 16, {17, 1, 300}},
        {4, 32, 8, 128, 16, {1, 511, 512, 513}},
        {2, 28, 4, 128, 32, {5000, 77}},
        {5, 14, 2, 64, 16, {1024, 3, 1025, 2048, 9}},
        {2, 8, 1, 256, 16, {600, 1200}},
        {1, 16, 16, 128, 8, {9000}},
        // The per-head kernel: a head size that is not a multiple of 64, and 16 query heads per kv head.
        {2, 6, 2, 96, 16, {700, 40}},
        {1, 16, 1, 64, 16, {300}},
    };
    bool all = true;
    uint64_t seed = 1;
    for (const Case& c : cases) {
        for (int split : {64, 128, 256}) {
            bool ok = false;
            run_case(c, split, seed, &ok);
            all = all && ok;
        }
        ++seed;
    }
    all = batch_invariance() && all;
    // Each shape at 256-position splits and, where it differs, at the split paged_decode_split_size picks.
#ifndef MLX_SERVING_EMU  // timings only on a GPU (tests/cuda_emu.py runs the checks on the host)
    const int shapes[][2] = {{1, 4096}, {16, 4096}, {64, 4096}, {256, 1024}, {1, 32768}};
    for (const auto& sh : shapes) {
        bench(sh[0], sh[1], 32, 8, 128, PA_SPLIT);
        const int chosen = paged_decode_split_size(sh[0], 8, sh[1], prop.multiProcessorCount, false);
        if (chosen != PA_SPLIT) bench(sh[0], sh[1], 32, 8, 128, chosen);
    }
#endif
    std::printf("%s\n", all ? "paged_attention: all cases passed" : "paged_attention: FAILED");
    return all ? 0 : 1;
}
