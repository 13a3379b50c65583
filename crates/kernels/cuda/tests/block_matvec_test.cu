// Device test of block_matvec.cuh's matrix × vector kernel (#21) in every format it serves (f16, bf16, Q4_0,
// Q4_1, Q5_0, Q5_1, Q8_0, Q6_K), against a CPU reference in f64 over the same weights dequantized by the
// format's own decoder (which tests/block_formats_host.py checks against the `gguf` package's): for 1, 2, 4 and
// 8 vectors and 1, 2 and 4 rows per warp, writing (`add` = 0) and adding into an output of a wider row stride
// (`ldy`, the q/k/v and gate/up stacks), the entries between the rows left alone. Then batch invariance: every
// vector's result is bitwise the same for every vector count and rows per warp. Run by
// scripts/cuda-kernel-tests.sh on the GPU and by tests/cuda_emu.py on the host.

#include "../block_matvec.cuh"
#include "matvec_check.cuh"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

using namespace mlx_serving;

template <int F, int NV, int R>
__global__ void __launch_bounds__(128) mv(const uint8_t* w, const float* x, float* y, int rows, int k, int ldy,
                                          int add) {
    block_matvec_body<F, NV, R>(w, x, y, rows, k, ldy, add);
}

// The matrix as f32, decoded on the device by the format's dequant8: a thread per 8 values.
template <int F>
__global__ void dequant(const uint8_t* w, float* out, int rows, int k) {
    const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (size_t)rows * (k / 8)) return;
    const size_t row = i / (k / 8);
    const int c = (int)(i % (k / 8)) * 8;
    row_dequant8<F>(w + row * row_bytes<F>(k), c, out + row * k + c);
}

template <int F>
static cudaError_t launch(const uint8_t* w, const float* x, float* y, int rows, int k, int ldy, int add, int nv,
                          int r) {
    const dim3 block(128);
#define MV_CASE(NV, R)                                                                         \
    if (nv == NV && r == R) {                                                                  \
        mv<F, NV, R><<<dim3((rows + 4 * R - 1) / (4 * R)), block, 0, 0>>>(w, x, y, rows, k, ldy, add); \
        return cudaGetLastError();                                                             \
    }
#define MV_R(R) MV_CASE(1, R) MV_CASE(2, R) MV_CASE(4, R) MV_CASE(8, R)
    MV_R(1)
    MV_R(2)
    MV_R(4)
#undef MV_R
#undef MV_CASE
    return cudaErrorInvalidValue;
}

struct Spec {
    const char* name;
    int values, bytes;
    std::vector<int> scales;  // byte offsets of f16 scale fields in a block
};

template <int F>
static Spec spec();
template <> Spec spec<FMT_F16>() { return {"f16", 8, 16, {}}; }
template <> Spec spec<FMT_BF16>() { return {"bf16", 8, 16, {}}; }
template <> Spec spec<FMT_Q4_0>() { return {"q4_0", 32, 18, {0}}; }
template <> Spec spec<FMT_Q4_1>() { return {"q4_1", 32, 20, {0, 2}}; }
template <> Spec spec<FMT_Q5_0>() { return {"q5_0", 32, 22, {0}}; }
template <> Spec spec<FMT_Q5_1>() { return {"q5_1", 32, 24, {0, 2}}; }
template <> Spec spec<FMT_Q8_0>() { return {"q8_0", 32, 34, {0}}; }
template <> Spec spec<FMT_Q6_K>() { return {"q6_k", 256, 210, {208}}; }

static uint16_t f16_bits(float v) {
    const __half h = __float2half(v);
    uint16_t u;
    std::memcpy(&u, &h, 2);
    return u;
}

// Random weights: random bytes with small f16 scales in block formats; random values in [-1, 1] for f16/bf16
// (random bytes would make NaNs there).
template <int F>
static std::vector<uint8_t> random_weights(int rows, int k, std::mt19937_64& rng) {
    const Spec s = spec<F>();
    std::vector<uint8_t> w((size_t)rows * (k / s.values) * s.bytes);
    std::uniform_real_distribution<float> uni(-1.f, 1.f);
    if constexpr (F == FMT_F16 || F == FMT_BF16) {
        for (size_t i = 0; i < w.size(); i += 2) {
            const float v = uni(rng);
            uint32_t b;
            std::memcpy(&b, &v, 4);
            const uint16_t u = F == FMT_F16 ? f16_bits(v) : (uint16_t)(b >> 16);
            std::memcpy(&w[i], &u, 2);
        }
    } else {
        for (auto& b : w) b = (uint8_t)rng();
        for (size_t off = 0; off < w.size(); off += s.bytes)
            for (int at : s.scales) {
                const uint16_t u = f16_bits(0.002f + 0.001f * (float)(rng() % 16) * (at == 2 ? -1.f : 1.f));
                std::memcpy(&w[off + at], &u, 2);
            }
    }
    return w;
}

// One format at one shape: every launch against the reference, and the invariance (matvec_check.cuh).
template <int F>
static bool check(int rows, int k, uint64_t seed) {
    const Spec s = spec<F>();
    std::mt19937_64 rng(seed);
    std::uniform_real_distribution<float> uni(-1.f, 1.f);
    const std::vector<uint8_t> w = random_weights<F>(rows, k, rng);
    std::vector<float> x((size_t)8 * k);
    for (auto& v : x) v = uni(rng);
    uint8_t* dw = to_device(w);
    float* dx = to_device(x);
    float* dvals;
    CHECK(cudaMalloc(&dvals, (size_t)rows * k * 4));
    const size_t threads = (size_t)rows * (k / 8);
    dequant<F><<<dim3((unsigned)((threads + 127) / 128)), dim3(128), 0, 0>>>(dw, dvals, rows, k);
    CHECK(cudaGetLastError());
    const std::vector<float> vals = to_host(dvals, (size_t)rows * k);
    cudaFree(dvals);

    const std::vector<double> vals_d(vals.begin(), vals.end());
    const MatvecReport rep = check_matvec_launches(rows, k, vals_d, x, rng, [&](float* dy, int ldy, int add, int nv, int r) {
        CHECK(launch<F>(dw, dx, dy, rows, k, ldy, add, nv, r));
    });
    cudaFree(dw);
    cudaFree(dx);
    const double bound = 1e-5;
    const bool ok = rep.ok(bound);
    std::printf("%-4s %-5s rows %4d k %5d, strided, writing and adding: max |err| / Σ|w·x| = %.2e (bound %.0e); "
                "other entries untouched: %s; vectors bitwise the same for 1-8 vectors, 1-4 rows per warp: %s\n",
                ok ? "ok" : "FAIL", s.name, rows, k, rep.worst, bound, rep.untouched ? "yes" : "NO",
                rep.invariant ? "yes" : "NO");
    return ok;
}

template <int F>
static bool check_format(uint64_t& seed) {
    const int k = spec<F>().values == 256 ? 512 : 256;
    bool ok = check<F>(37, k, seed++);
    ok = check<F>(21, 4096, seed++) && ok;
    return ok;
}

int main() {
    cudaDeviceProp prop;
    CHECK(cudaGetDeviceProperties(&prop, 0));
    std::printf("device: %s, %d SMs\n", prop.name, prop.multiProcessorCount);
    uint64_t seed = 1;
    bool all = true;
    all = check_format<FMT_F16>(seed) && all;
    all = check_format<FMT_BF16>(seed) && all;
    all = check_format<FMT_Q4_0>(seed) && all;
    all = check_format<FMT_Q4_1>(seed) && all;
    all = check_format<FMT_Q5_0>(seed) && all;
    all = check_format<FMT_Q5_1>(seed) && all;
    all = check_format<FMT_Q8_0>(seed) && all;
    all = check_format<FMT_Q6_K>(seed) && all;
    std::printf("%s\n", all ? "block_matvec: all cases passed" : "block_matvec: FAILED");
    return all ? 0 : 1;
}
