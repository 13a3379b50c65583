// Device test of layer_ops.cuh (#21), the decoder's steps between the matmuls, each against a CPU reference:
// RMS norm (f32 rows and their 16-bit copies, through a row index), biases + RoPE (both pairings, a partial
// rotary width) + the K/V cache write at each row's slot, SwiGLU, the 16-bit conversions (f16 saturating at
// ±65504, bf16 rounding to nearest even, NaN kept), embedding rows and block dequantization, and the greedy
// argmax (the CPU sampler's tie and NaN rules). Run by scripts/cuda-kernel-tests.sh on the GPU and by
// tests/cuda_emu.py on the host.

#include "../layer_ops.cuh"
#include "check.cuh"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

using namespace mlx_serving;

__global__ void k_rms_norm(const float* x, const uint32_t* rows, const float* w, float* o32, uint16_t* o16, int kind,
                           int h, float eps) {
    rms_norm_body(x, rows, w, o32, o16, kind, h, eps);
}
__global__ void k_rope(const float* qkv, const float* bias, const uint32_t* pos, const uint32_t* slots,
                       const float* inv_freq, float* q, uint16_t* kc, uint16_t* vc, int nh, int nkv, int hd,
                       int rope_dim, int neox) {
    qkv_rope_store_body(qkv, bias, pos, slots, inv_freq, q, kc, vc, nh, nkv, hd, rope_dim, neox);
}
__global__ void k_swiglu(const float* gu, float* o32, uint16_t* o16, int kind, int ffn) {
    swiglu_body(gu, o32, o16, kind, ffn);
}
__global__ void k_to_half(const float* x, uint16_t* y, int kind, int n) { to_half_body(x, y, kind, n); }
__global__ void k_argmax(const float* logits, int vocab, uint32_t* out) { argmax_body(logits, vocab, out); }
__global__ void k_embed_q8(const uint8_t* t, const uint32_t* ids, float* x, int h, float s) {
    embed_body<FMT_Q8_0>(t, ids, x, h, s);
}
__global__ void k_dequant_q8(const uint8_t* w, uint16_t* out, int kind, int rows, int k) {
    dequant_body<FMT_Q8_0>(w, out, kind, rows, k);
}

template <class T>
static T* zeros(size_t n) {
    T* d;
    CHECK(cudaMalloc(&d, std::max<size_t>(1, n * sizeof(T))));
    CHECK(cudaMemset(d, 0, std::max<size_t>(1, n * sizeof(T))));
    return d;
}

static bool report(bool ok, const char* what, double err, double bound) {
    std::printf("%-4s %-58s max err %.2e (bound %.0e)\n", ok ? "ok" : "FAIL", what, err, bound);
    return ok;
}

// The references' 16-bit conversions, written independently of the kernels': f16 through CUDA's own host
// conversion after the clamp to ±65504; bf16 by choosing the nearer of the two neighbours in double, ties to
// the even one.
static uint16_t ref_f16(float v) {
    const float c = std::isnan(v) ? v : std::min(std::max(v, -65504.f), 65504.f);
    const __half h = __float2half(c);
    uint16_t u;
    std::memcpy(&u, &h, 2);
    return u;
}
static uint16_t ref_bf16(float v) {
    uint32_t b;
    std::memcpy(&b, &v, 4);
    if (std::isnan(v)) return 0x7FC0;  // any NaN; compared as "is NaN" below
    if (std::isinf(v)) return (uint16_t)(b >> 16);
    const uint32_t lo = b & 0xFFFF0000u, hi = lo + 0x10000u;
    float fl, fh;
    std::memcpy(&fl, &lo, 4);
    std::memcpy(&fh, &hi, 4);
    const double dl = std::fabs((double)v - fl), dh = std::fabs((double)fh - v);
    if (dl < dh || (dl == dh && ((lo >> 16) & 1) == 0)) return (uint16_t)(lo >> 16);
    return (uint16_t)(hi >> 16);
}
static bool same_half(uint16_t got, uint16_t want, int kind) {
    const bool nan_got = kind == 2 ? (got & 0x7F80) == 0x7F80 && (got & 0x7F) : (got & 0x7C00) == 0x7C00 && (got & 0x3FF);
    const bool nan_want = kind == 2 ? (want & 0x7F80) == 0x7F80 && (want & 0x7F) : (want & 0x7C00) == 0x7C00 && (want & 0x3FF);
    return nan_got || nan_want ? nan_got == nan_want : got == want;
}
static float f16_value(uint16_t u) {
    __half h;
    std::memcpy(&h, &u, 2);
    return __half2float(h);
}

static bool test_rms_norm(std::mt19937_64& rng) {
    std::uniform_real_distribution<float> uni(-2.f, 2.f);
    const int n = 6, h = 576, m = 3;
    const float eps = 1e-5f;
    std::vector<float> x((size_t)n * h), w(h);
    for (auto& v : x) v = uni(rng);
    for (auto& v : w) v = uni(rng);
    w[7] = 3e5f;  // an output past f16's range: the 16-bit copy saturates
    const std::vector<uint32_t> rows{4, 0, 4};
    bool ok = true;
    for (int kind : {1, 2}) {
        float* o32 = zeros<float>((size_t)m * h);
        uint16_t* o16 = zeros<uint16_t>((size_t)m * h);
        float *dx = to_device(x), *dw = to_device(w);
        uint32_t* dr = to_device(rows);
        k_rms_norm<<<dim3(m), dim3(256), 0, 0>>>(dx, dr, dw, o32, o16, kind, h, eps);
        CHECK(cudaGetLastError());
        const std::vector<float> y = to_host(o32, (size_t)m * h);
        const std::vector<uint16_t> y16 = to_host(o16, (size_t)m * h);
        double worst = 0;
        bool halves = true;
        for (int r = 0; r < m; ++r) {
            const float* xr = &x[(size_t)rows[r] * h];
            double ss = 0;
            for (int i = 0; i < h; ++i) ss += (double)xr[i] * xr[i];
            const double inv = 1.0 / std::sqrt(ss / h + eps);
            for (int i = 0; i < h; ++i) {
                const double ref = xr[i] * inv * w[i];
                const float got = y[(size_t)r * h + i];
                worst = std::max(worst, std::fabs(got - ref) / std::max(1.0, std::fabs(ref)));
                const uint16_t want = kind == 2 ? ref_bf16(got) : ref_f16(got);
                halves = halves && same_half(y16[(size_t)r * h + i], want, kind);
            }
        }
        ok = report(worst < 1e-5 && halves, kind == 2 ? "rms_norm, rows by index, bf16 copy" : "rms_norm, rows by index, f16 copy (saturating)", worst, 1e-5) && ok;
        if (!halves) std::printf("FAIL rms_norm: a 16-bit copy is not the rounded f32 value\n");
        for (void* p : {(void*)o32, (void*)o16, (void*)dx, (void*)dw, (void*)dr}) cudaFree(p);
    }
    return ok;
}

static bool test_rope(std::mt19937_64& rng) {
    std::uniform_real_distribution<float> uni(-1.f, 1.f);
    const int n = 3, nh = 4, nkv = 2, hd = 64, width = (nh + 2 * nkv) * hd, num_slots = 40;
    const std::vector<uint32_t> pos{0, 17, 4099}, slots{31, 2, 17};
    bool ok = true;
    for (int neox : {0, 1})
        for (int rope_dim : {64, 32})
            for (bool with_bias : {false, true}) {
                std::vector<float> qkv((size_t)n * width), bias(width), inv(rope_dim / 2);
                for (auto& v : qkv) v = uni(rng);
                for (auto& v : bias) v = uni(rng);
                for (int i = 0; i < rope_dim / 2; ++i) inv[i] = (float)std::pow(10000.0, -2.0 * i / rope_dim);
                float *dqkv = to_device(qkv), *db = with_bias ? to_device(bias) : nullptr, *dinv = to_device(inv);
                uint32_t *dp = to_device(pos), *ds = to_device(slots);
                float* q = zeros<float>((size_t)n * nh * hd);
                uint16_t *kc = zeros<uint16_t>((size_t)num_slots * nkv * hd), *vc = zeros<uint16_t>((size_t)num_slots * nkv * hd);
                k_rope<<<dim3(n, nh + nkv), dim3(64), 0, 0>>>(dqkv, db, dp, ds, dinv, q, kc, vc, nh, nkv, hd, rope_dim, neox);
                CHECK(cudaGetLastError());
                const std::vector<float> qo = to_host(q, (size_t)n * nh * hd);
                const std::vector<uint16_t> ko = to_host(kc, (size_t)num_slots * nkv * hd), vo = to_host(vc, (size_t)num_slots * nkv * hd);
                double worst = 0;
                bool cache_ok = true;
                for (int r = 0; r < n; ++r)
                    for (int head = 0; head < nh + nkv; ++head) {
                        const int col = head < nh ? head * hd : nh * hd + (head - nh) * hd;
                        auto val = [&](int c) { return (double)qkv[(size_t)r * width + c] + (with_bias ? bias[c] : 0.0); };
                        for (int i = 0; i < hd; ++i) {
                            double ref = val(col + i);
                            if (i < rope_dim) {
                                const int half = rope_dim / 2;
                                const int pair = neox ? i % half : i / 2;
                                const bool first = neox ? i < half : i % 2 == 0;
                                const int other = neox ? (first ? i + half : i - half) : (first ? i + 1 : i - 1);
                                const double angle = (double)((float)pos[r] * inv[pair]);  // the angle in f32, as the kernel
                                const double c = std::cos(angle), s = std::sin(angle), o = val(col + other);
                                ref = first ? ref * c - o * s : ref * c + o * s;
                            }
                            if (head < nh) {
                                worst = std::max(worst, std::fabs(qo[((size_t)r * nh + head) * hd + i] - ref));
                            } else {
                                const size_t at = ((size_t)slots[r] * nkv + (head - nh)) * hd + i;
                                // f16 holds 11 significant bits: within 2^-11 of the value, relative.
                                cache_ok = cache_ok && std::fabs(f16_value(ko[at]) - ref) <= std::fabs(ref) * 1e-3 + 1e-6;
                                const double v = val(nh * hd + nkv * hd + (head - nh) * hd + i);
                                cache_ok = cache_ok && std::fabs(f16_value(vo[at]) - v) <= std::fabs(v) * 1e-3 + 1e-7;
                            }
                        }
                    }
                // Untouched slots stay zero.
                for (int sl = 0; sl < num_slots; ++sl) {
                    if (std::find(slots.begin(), slots.end(), (uint32_t)sl) != slots.end()) continue;
                    for (int i = 0; i < nkv * hd; ++i) cache_ok = cache_ok && ko[(size_t)sl * nkv * hd + i] == 0 && vo[(size_t)sl * nkv * hd + i] == 0;
                }
                char what[96];
                std::snprintf(what, sizeof what, "qkv_rope_store, %s pairs, rotary %d of %d, %s bias", neox ? "neox" : "adjacent",
                              rope_dim, hd, with_bias ? "with" : "no");
                ok = report(worst < 2e-5 && cache_ok, what, worst, 2e-5) && ok;
                if (!cache_ok) std::printf("FAIL qkv_rope_store: the K/V cache entries are wrong or misplaced\n");
                for (void* p : {(void*)dqkv, (void*)db, (void*)dinv, (void*)dp, (void*)ds, (void*)q, (void*)kc, (void*)vc}) cudaFree(p);
            }
    return ok;
}

static bool test_swiglu(std::mt19937_64& rng) {
    std::uniform_real_distribution<float> uni(-6.f, 6.f);
    const int n = 2, ffn = 600;
    std::vector<float> gu((size_t)n * 2 * ffn);
    for (auto& v : gu) v = uni(rng);
    gu[5] = -200.f;  // exp(200) overflows: silu is -0
    gu[ffn + 9] = 1e6f;
    gu[9] = 50.f;  // 50 · 1e6 > 65504: the f16 copy saturates
    bool ok = true;
    for (int kind : {1, 2}) {
        float* dgu = to_device(gu);
        float* o32 = zeros<float>((size_t)n * ffn);
        uint16_t* o16 = zeros<uint16_t>((size_t)n * ffn);
        k_swiglu<<<dim3((ffn + 255) / 256, n), dim3(256), 0, 0>>>(dgu, o32, o16, kind, ffn);
        CHECK(cudaGetLastError());
        const std::vector<float> y = to_host(o32, (size_t)n * ffn);
        const std::vector<uint16_t> y16 = to_host(o16, (size_t)n * ffn);
        double worst = 0;
        bool halves = true;
        for (int r = 0; r < n; ++r)
            for (int i = 0; i < ffn; ++i) {
                const double g = gu[(size_t)r * 2 * ffn + i], u = gu[(size_t)r * 2 * ffn + ffn + i];
                const double ref = g / (1.0 + std::exp(-g)) * u;
                const float got = y[(size_t)r * ffn + i];
                worst = std::max(worst, std::fabs(got - ref) / std::max(1.0, std::fabs(ref)));
                halves = halves && same_half(y16[(size_t)r * ffn + i], kind == 2 ? ref_bf16(got) : ref_f16(got), kind);
            }
        ok = report(worst < 1e-5 && halves, kind == 2 ? "swiglu, bf16 copy" : "swiglu, f16 copy (saturating)", worst, 1e-5) && ok;
        if (!halves) std::printf("FAIL swiglu: a 16-bit copy is not the rounded f32 value\n");
        for (void* p : {(void*)dgu, (void*)o32, (void*)o16}) cudaFree(p);
    }
    return ok;
}

static bool test_to_half(std::mt19937_64& rng) {
    std::vector<float> x{0.f, -0.f, 1.f, -2.5f, 65504.f, 65519.f, 65520.f, 1e9f, -1e9f, 1e-8f, 5.96e-8f,
                         1.00390625f /* bf16 tie: to 1.0 */, 1.01171875f /* bf16 tie: to 1.015625 */,
                         std::nanf(""), INFINITY, -INFINITY};
    std::uniform_real_distribution<float> uni(-100.f, 100.f);
    for (int i = 0; i < 1000; ++i) x.push_back(uni(rng));
    const int n = (int)x.size();
    bool ok = true;
    for (int kind : {1, 2}) {
        float* dx = to_device(x);
        uint16_t* dy = zeros<uint16_t>(n);
        k_to_half<<<dim3((n + 255) / 256), dim3(256), 0, 0>>>(dx, dy, kind, n);
        CHECK(cudaGetLastError());
        const std::vector<uint16_t> y = to_host(dy, n);
        int bad = 0;
        for (int i = 0; i < n; ++i) {
            const uint16_t want = kind == 2 ? ref_bf16(x[i]) : ref_f16(x[i]);
            if (!same_half(y[i], want, kind) && bad++ < 3)
                std::printf("     to_half kind %d: %g gave 0x%04x, want 0x%04x\n", kind, x[i], y[i], want);
        }
        ok = report(bad == 0, kind == 2 ? "to_half bf16: nearest even, NaN kept" : "to_half f16: ±65504 saturation, NaN kept", bad, 0) && ok;
        cudaFree(dx);
        cudaFree(dy);
    }
    return ok;
}

// Embedding rows and 16-bit dequantization of a Q8_0 table: values d · q, exactly (d an f16, q an int8).
static bool test_embed_dequant(std::mt19937_64& rng) {
    const int vocab = 7, h = 96, blocks = h / 32;
    std::vector<uint8_t> t((size_t)vocab * blocks * 34);
    for (auto& b : t) b = (uint8_t)rng();
    std::vector<double> ref((size_t)vocab * h);
    for (int r = 0; r < vocab; ++r)
        for (int b = 0; b < blocks; ++b) {
            uint8_t* blk = &t[((size_t)r * blocks + b) * 34];
            const __half d = __float2half(0.01f * (float)(1 + rng() % 9));
            std::memcpy(blk, &d, 2);
            for (int j = 0; j < 32; ++j) ref[(size_t)r * h + b * 32 + j] = (double)__half2float(d) * (int8_t)blk[2 + j];
        }
    const std::vector<uint32_t> ids{6, 0, 6, 3};
    const float scale = 2.f;
    uint8_t* dt = to_device(t);
    uint32_t* di = to_device(ids);
    float* x = zeros<float>(ids.size() * h);
    k_embed_q8<<<dim3((unsigned)ids.size()), dim3(128), 0, 0>>>(dt, di, x, h, scale);
    uint16_t* d16 = zeros<uint16_t>((size_t)vocab * h);
    k_dequant_q8<<<dim3((vocab * h / 8 + 255) / 256), dim3(256), 0, 0>>>(dt, d16, 1, vocab, h);
    CHECK(cudaGetLastError());
    const std::vector<float> xe = to_host(x, ids.size() * h);
    const std::vector<uint16_t> w16 = to_host(d16, (size_t)vocab * h);
    double worst = 0;
    for (size_t r = 0; r < ids.size(); ++r)
        for (int i = 0; i < h; ++i) worst = std::max(worst, std::fabs(xe[r * h + i] - scale * ref[(size_t)ids[r] * h + i]));
    bool halves = true;
    for (size_t i = 0; i < w16.size(); ++i) halves = halves && w16[i] == ref_f16((float)ref[i]);
    for (void* p : {(void*)dt, (void*)di, (void*)x, (void*)d16}) cudaFree(p);
    bool ok = report(worst < 1e-6, "embed (Q8_0 table, repeated ids, scale)", worst, 1e-6);
    return report(halves, "dequant (Q8_0 to f16)", halves ? 0 : 1, 0) && ok;
}

// The CPU sampler's argmax: the first index of a value greater than every earlier one, from index 0.
static uint32_t cpu_argmax(const float* l, int n) {
    int best = 0;
    for (int i = 0; i < n; ++i)
        if (l[i] > l[best]) best = i;
    return (uint32_t)best;
}

static bool test_argmax(std::mt19937_64& rng) {
    const int vocab = 49152 + 7;
    std::uniform_real_distribution<float> uni(-30.f, 30.f);
    std::vector<std::vector<float>> rows;
    for (int i = 0; i < 4; ++i) {  // random rows
        rows.emplace_back(vocab);
        for (auto& v : rows.back()) v = uni(rng);
    }
    auto row = [&](float fill) { rows.emplace_back(vocab, fill); return &rows.back(); };
    (*row(0.f))[vocab - 1] = 1.f;                                          // the last index
    { auto& r = *row(-1.f); r[4000] = 5.f; r[300] = 5.f; r[40000] = 5.f; }  // ties: the first
    { auto& r = *row(-1.f); r[0] = NAN; r[7] = 3.f; }                      // NaN at 0: 0
    { auto& r = *row(-1.f); r[12] = NAN; r[9] = 2.f; r[13] = 2.f; }        // NaN elsewhere never wins
    row(-INFINITY);                                                          // all -inf: 0
    { auto& r = *row(NAN); r[0] = -INFINITY; r[5] = -INFINITY; }           // -inf among NaNs: 0
    { auto& r = *row(-INFINITY); r[33333] = INFINITY; r[2] = NAN; }        // +inf wins
    row(0.f);                                                                // all equal: 0
    std::vector<float> flat;
    for (auto& r : rows) flat.insert(flat.end(), r.begin(), r.end());
    const int m = (int)rows.size();
    float* dl = to_device(flat);
    uint32_t* out = zeros<uint32_t>(m);
    k_argmax<<<dim3(m), dim3(ARGMAX_THREADS), 0, 0>>>(dl, vocab, out);
    CHECK(cudaGetLastError());
    const std::vector<uint32_t> got = to_host(out, m);
    int bad = 0;
    for (int r = 0; r < m; ++r) {
        const uint32_t want = cpu_argmax(rows[r].data(), vocab);
        if (got[r] != want) {
            ++bad;
            std::printf("     argmax row %d: %u, the CPU's %u\n", r, got[r], want);
        }
    }
    cudaFree(dl);
    cudaFree(out);
    return report(bad == 0, "argmax: ties, NaN, infinities, as the CPU sampler", bad, 0);
}

int main() {
    cudaDeviceProp prop;
    CHECK(cudaGetDeviceProperties(&prop, 0));
    std::printf("device: %s, %d SMs\n", prop.name, prop.multiProcessorCount);
    std::mt19937_64 rng(7);
    bool all = test_rms_norm(rng);
    all = test_rope(rng) && all;
    all = test_swiglu(rng) && all;
    all = test_to_half(rng) && all;
    all = test_embed_dequant(rng) && all;
    all = test_argmax(rng) && all;
    std::printf("%s\n", all ? "layer_ops: all cases passed" : "layer_ops: FAILED");
    return all ? 0 : 1;
}
