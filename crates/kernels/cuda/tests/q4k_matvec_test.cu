// Device test and benchmark of the Q4_K matrix × vector kernel (#21) against a CPU reference in f64 on the
// same weights dequantized exactly (random 4-bit values, random 6-bit scales and mins, fixed d and dmin),
// for 1, 2, 4 and 8 activation vectors and 1, 2 and 4 rows per warp; as the executor launches it (a strided
// output, writing or adding; every vector bitwise the same for any vector count and rows per warp); then the
// bandwidth of weights read at Llama-3-8B's shapes, rotating over enough copies that the weights do not sit in
// L2. Run by scripts/cuda-kernel-tests.sh on the GPU and by tests/cuda_emu.py on the host (no timings there).

#include "../q4k_matvec.cuh"
#include "matvec_check.cuh"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <utility>
#include <vector>

using namespace mlx_serving;

static void scale_min(int j, const uint8_t* s, int& sc, int& m) {
    if (j < 4) {
        sc = s[j] & 63;
        m = s[j + 4] & 63;
    } else {
        sc = (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4);
        m = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
    }
}

// The reference's own decoding of one super-block into 256 values (in GGUF's order).
static void dequant_block(const uint8_t* b, double* out) {
    const double d = __half2float(*reinterpret_cast<const __half*>(b));
    const double dmin = __half2float(*reinterpret_cast<const __half*>(b + 2));
    const uint8_t* qs = b + 16;
    for (int g = 0; g < 4; ++g) {
        int sc0, m0, sc1, m1;
        scale_min(2 * g, b + 4, sc0, m0);
        scale_min(2 * g + 1, b + 4, sc1, m1);
        for (int l = 0; l < 32; ++l) {
            out[64 * g + l] = d * sc0 * (qs[32 * g + l] & 0xF) - dmin * m0;
            out[64 * g + 32 + l] = d * sc1 * (qs[32 * g + l] >> 4) - dmin * m1;
        }
    }
}

static std::vector<uint8_t> random_weights(int rows, int k, std::mt19937_64& rng) {
    std::vector<uint8_t> w((size_t)rows * (k / 256) * Q4K_BLOCK_BYTES);
    for (auto& b : w) b = (uint8_t)rng();
    for (size_t off = 0; off < w.size(); off += Q4K_BLOCK_BYTES) {
        const __half d = __float2half(0.0021f + 0.0001f * (rng() % 8)), dmin = __float2half(0.0006f);
        std::memcpy(&w[off], &d, 2);
        std::memcpy(&w[off + 2], &dmin, 2);
    }
    return w;
}

static bool check(int rows, int k, int nv, int r, uint64_t seed) {
    std::mt19937_64 rng(seed);
    std::uniform_real_distribution<float> uni(-1.f, 1.f);
    const std::vector<uint8_t> w = random_weights(rows, k, rng);
    std::vector<float> x((size_t)nv * k);
    for (auto& v : x) v = uni(rng);
    uint8_t* dw;
    float *dx, *dy;
    CHECK(cudaMalloc(&dw, w.size()));
    CHECK(cudaMalloc(&dx, x.size() * 4));
    CHECK(cudaMalloc(&dy, (size_t)nv * rows * 4));
    CHECK(cudaMemcpy(dw, w.data(), w.size(), cudaMemcpyHostToDevice));
    CHECK(cudaMemcpy(dx, x.data(), x.size() * 4, cudaMemcpyHostToDevice));
    CHECK(q4k_matvec_launch(dw, dx, dy, rows, k, nv, 0, r));
    std::vector<float> y((size_t)nv * rows);
    CHECK(cudaMemcpy(y.data(), dy, y.size() * 4, cudaMemcpyDeviceToHost));
    cudaFree(dw);
    cudaFree(dx);
    cudaFree(dy);
    double worst = 0, norm = 0;
    std::vector<double> vals(k);
    const int nb = k / 256;
    for (int r = 0; r < rows; ++r) {
        for (int b = 0; b < nb; ++b) dequant_block(&w[((size_t)r * nb + b) * Q4K_BLOCK_BYTES], &vals[(size_t)b * 256]);
        for (int v = 0; v < nv; ++v) {
            double ref = 0, mag = 0;
            for (int i = 0; i < k; ++i) {
                ref += vals[i] * x[(size_t)v * k + i];
                mag += std::fabs(vals[i] * x[(size_t)v * k + i]);
            }
            worst = std::max(worst, std::fabs(y[(size_t)v * rows + r] - ref) / std::max(mag, 1e-30));
            norm = std::max(norm, std::fabs(ref));
        }
    }
    // Error relative to Σ|w·x| (the sum's condition): f32 accumulation over k terms, about k·2^-24 at worst.
    const double bound = 1e-5;
    const bool ok = worst <= bound;
    std::printf("%-4s rows %5d k %5d vectors %d, %d row(s) per warp: max |err| / Σ|w·x| = %.2e (bound %.0e; max |y| %.1f)\n",
                ok ? "ok" : "FAIL", rows, k, nv, r, worst, bound, norm);
    return ok;
}

// The kernel as the GPU executor's module launches it: into an output of row stride `ldy` (a part of a q/k/v or
// gate/up stack), writing or adding (`add`, the residual).
template <int NV, int R>
__global__ void __launch_bounds__(32 * Q4K_WARPS) mv_strided(const uint8_t* w, const float* x, float* y, int rows,
                                                              int k, int ldy, int add) {
    q4k_matvec_body<NV, R>(w, x, y, rows, k, ldy, add);
}

static void launch_strided(const uint8_t* w, const float* x, float* y, int rows, int k, int ldy, int add, int nv, int r) {
    const dim3 block(32 * Q4K_WARPS);
#define STRIDED(NV, R)                                                                                      \
    if (nv == NV && r == R)                                                                                 \
        mv_strided<NV, R><<<dim3((rows + Q4K_WARPS * R - 1) / (Q4K_WARPS * R)), block, 0, 0>>>(w, x, y, rows, k, ldy, add);
#define STRIDED_R(R) STRIDED(1, R) STRIDED(2, R) STRIDED(4, R) STRIDED(8, R)
    STRIDED_R(1)
    STRIDED_R(2)
    STRIDED_R(4)
#undef STRIDED_R
#undef STRIDED
    CHECK(cudaGetLastError());
}

// The executor's launches (matvec_check.cuh): strided output, writing and adding, invariance.
static bool check_strided(int rows, int k, uint64_t seed) {
    std::mt19937_64 rng(seed);
    std::uniform_real_distribution<float> uni(-1.f, 1.f);
    const std::vector<uint8_t> w = random_weights(rows, k, rng);
    std::vector<float> x((size_t)8 * k);
    for (auto& v : x) v = uni(rng);
    uint8_t* dw = to_device(w);
    float* dx = to_device(x);
    const int nb = k / 256;
    std::vector<double> vals((size_t)rows * k);
    for (int r = 0; r < rows; ++r)
        for (int b = 0; b < nb; ++b) dequant_block(&w[((size_t)r * nb + b) * Q4K_BLOCK_BYTES], &vals[(size_t)r * k + b * 256]);
    const MatvecReport rep = check_matvec_launches(rows, k, vals, x, rng, [&](float* dy, int ldy, int add, int nv, int r) {
        launch_strided(dw, dx, dy, rows, k, ldy, add, nv, r);
    });
    cudaFree(dw);
    cudaFree(dx);
    const double bound = 1e-5;
    const bool ok = rep.ok(bound);
    std::printf("%-4s rows %5d k %5d, strided, writing and adding: max |err| / Σ|w·x| = %.2e (bound %.0e); other "
                "entries untouched: %s; vectors bitwise the same for 1-8 vectors, 1-4 rows per warp: %s\n",
                ok ? "ok" : "FAIL", rows, k, rep.worst, bound, rep.untouched ? "yes" : "NO", rep.invariant ? "yes" : "NO");
    return ok;
}

// nibble_at<P> (the kernel's conversion) against the integer conversion it replaces, for every position it is
// used at and every nibble value, among random neighbouring bits: counts the mismatches.
__global__ void nibble_check(unsigned* bad) {
    uint32_t s = 0x9E3779B9u * (blockIdx.x * blockDim.x + threadIdx.x + 1);
    unsigned wrong = 0;
    for (int i = 0; i < 256; ++i) {
        s ^= s << 13;
        s ^= s >> 17;
        s ^= s << 5;
        const uint32_t q = s;
        wrong += nibble_at<0>(q) != (float)(q & 15) || nibble_at<4>(q) != (float)((q >> 4) & 15) ||
                 nibble_at<8>(q) != (float)((q >> 8) & 15) || nibble_at<12>(q) != (float)((q >> 12) & 15) ||
                 nibble_at<16>(q) != (float)((q >> 16) & 15);
        // nib4 against the sums the old code formed, for both halves of each byte.
        const float4 x = make_float4(0.5f, -1.25f, 3.f, 0.125f);
        const float lo = (float)(q & 15) * x.x + (float)((q >> 8) & 15) * x.y + (float)((q >> 16) & 15) * x.z +
                         (float)((q >> 24) & 15) * x.w;
        const float hi = (float)((q >> 4) & 15) * x.x + (float)((q >> 12) & 15) * x.y + (float)((q >> 20) & 15) * x.z +
                         (float)((q >> 28) & 15) * x.w;
        wrong += nib4<false>(q, q >> 12, x) != lo || nib4<true>(q, q >> 12, x) != hi;
    }
    if (wrong) atomicAdd(bad, wrong);
}

static bool check_nibbles() {
    unsigned* bad;
    CHECK(cudaMalloc(&bad, 4));
    CHECK(cudaMemset(bad, 0, 4));
    nibble_check<<<dim3(64), dim3(256), 0, 0>>>(bad);
    CHECK(cudaGetLastError());
    unsigned host = 0;
    CHECK(cudaMemcpy(&host, bad, 4, cudaMemcpyDeviceToHost));
    cudaFree(bad);
    std::printf("%-4s nibble_at / nib4 against integer conversions: %u mismatches in 4,194,304 words\n",
                host == 0 ? "ok" : "FAIL", host);
    return host == 0;
}

static void bench(int rows, int k, int nv, int r) {
    const size_t bytes = (size_t)rows * (k / 256) * Q4K_BLOCK_BYTES;
    const int copies = std::max<int>(2, (int)(400e6 / bytes) + 1);  // ≥ 400 MB in rotation: past the L2
    std::mt19937_64 rng(5);
    const std::vector<uint8_t> w = random_weights(rows, k, rng);
    std::vector<uint8_t*> dw(copies);
    for (auto& p : dw) {
        CHECK(cudaMalloc(&p, bytes));
        CHECK(cudaMemcpy(p, w.data(), bytes, cudaMemcpyHostToDevice));
    }
    float *dx, *dy;
    CHECK(cudaMalloc(&dx, (size_t)nv * k * 4));
    CHECK(cudaMemset(dx, 0, (size_t)nv * k * 4));
    CHECK(cudaMalloc(&dy, (size_t)nv * rows * 4));
    for (int i = 0; i < copies; ++i) CHECK(q4k_matvec_launch(dw[i], dx, dy, rows, k, nv, 0, r));
    cudaEvent_t a, b;
    CHECK(cudaEventCreate(&a));
    CHECK(cudaEventCreate(&b));
    const int calls = 40 * copies;
    std::vector<float> ms;
    for (int rep = 0; rep < 5; ++rep) {
        CHECK(cudaEventRecord(a));
        for (int i = 0; i < calls; ++i) CHECK(q4k_matvec_launch(dw[i % copies], dx, dy, rows, k, nv, 0, r));
        CHECK(cudaEventRecord(b));
        CHECK(cudaEventSynchronize(b));
        float t;
        CHECK(cudaEventElapsedTime(&t, a, b));
        ms.push_back(t / calls);
    }
    std::sort(ms.begin(), ms.end());
    const double s = ms[ms.size() / 2] * 1e-3;
    std::printf("bench %6d x %5d, %d vector(s), %d row(s) per warp: %.1f us per call, %.0f GB/s of weights (%.1f MB)\n",
                rows, k, nv, r, s * 1e6, bytes / s / 1e9, bytes / 1e6);
    for (auto p : dw) cudaFree(p);
    cudaFree(dx);
    cudaFree(dy);
}

int main() {
    cudaDeviceProp prop;
    CHECK(cudaGetDeviceProperties(&prop, 0));
    std::printf("device: %s, %d SMs\n", prop.name, prop.multiProcessorCount);
    bool all = true;
    uint64_t seed = 1;
    for (int r : {0, 1, 2, 4})  // 0: the launcher's choice
        for (int nv : {1, 2, 4, 8}) {
            all = check(37, 256, nv, r, seed++) && all;
            all = check(64, 4096, nv, r, seed++) && all;
            all = check(13, 14336, nv, r, seed++) && all;
        }
    all = check_nibbles() && all;
    all = check_strided(37, 512, seed++) && all;
    all = check_strided(21, 4096, seed++) && all;
#ifndef MLX_SERVING_EMU  // timings only on a GPU (tests/cuda_emu.py runs the checks on the host)
    // Llama-3-8B's matrices: q/o (4096×4096), k/v (1024×4096), gate/up (14336×4096), down (4096×14336), head;
    // each with 1, 2 and 4 rows per warp, to choose the launch policy from.
    const std::pair<int, int> shapes[] = {{4096, 4096}, {1024, 4096}, {14336, 4096}, {4096, 14336}, {128256, 4096}};
    for (int nv : {1, 8})
        for (const auto& [rows, k] : shapes)
            for (int r : {1, 2, 4}) bench(rows, k, nv, r);
#endif
    std::printf("%s\n", all ? "q4k_matvec: all cases passed" : "q4k_matvec: FAILED");
    return all ? 0 : 1;
}
