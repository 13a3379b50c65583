// The check every matrix × vector kernel test makes of its kernel as the GPU executor launches it (#21): into an
// output of row stride ldy = rows + 3 (a part of a q/k/v or gate/up stack), writing (add = 0) and adding (add = 1,
// the residual), for 1, 2, 4 and 8 vectors and 1, 2 and 4 rows per warp:
// - each entry against an f64 reference over the dequantized weights, relative to Σ|w·x| (f32 sums of k terms);
// - the entries past `rows` in each vector's stride and the vectors past the launch's count left alone;
// - every vector's sums bitwise the same for every vector count and rows per warp (what batch invariance of
//   decode rows rests on).
#pragma once
#include "check.cuh"

#include <cmath>
#include <cstring>
#include <random>

struct MatvecReport {
    double worst = 0;  // max |error| / Σ|w·x|
    bool untouched = true, invariant = true;
    bool ok(double bound) const { return worst <= bound && untouched && invariant; }
};

// `vals`: the weights dequantized, [rows, k]; `x`: 8 vectors of k; `launch(y, ldy, add, nv, r)` runs the kernel
// on the device's weights and `x` (already there) into `y`.
template <class Launch>
static MatvecReport check_matvec_launches(int rows, int k, const std::vector<double>& vals, const std::vector<float>& x,
                                          std::mt19937_64& rng, Launch launch) {
    std::uniform_real_distribution<float> uni(-1.f, 1.f);
    const int ldy = rows + 3;
    std::vector<float> init((size_t)8 * ldy);
    for (auto& v : init) v = uni(rng);
    float* dy;
    CHECK(cudaMalloc(&dy, init.size() * 4));
    MatvecReport rep;
    std::vector<float> base;  // the first plain launch's sums: 1 row per warp, 8 vectors
    for (int r : {1, 2, 4})
        for (int nv : {8, 4, 2, 1})
            for (int add : {0, 1}) {
                CHECK(cudaMemcpy(dy, init.data(), init.size() * 4, cudaMemcpyHostToDevice));
                launch(dy, ldy, add, nv, r);
                CHECK(cudaGetLastError());
                const std::vector<float> y = to_host(dy, init.size());
                for (int v = 0; v < 8; ++v)
                    for (int row = 0; row < ldy; ++row) {
                        const size_t at = (size_t)v * ldy + row;
                        if (v >= nv || row >= rows) {  // not this launch's to touch
                            rep.untouched = rep.untouched && std::memcmp(&y[at], &init[at], 4) == 0;
                            continue;
                        }
                        double ref = add ? init[at] : 0.0, mag = add ? std::fabs(init[at]) : 0.0;
                        for (int i = 0; i < k; ++i) {
                            const double p = vals[(size_t)row * k + i] * x[(size_t)v * k + i];
                            ref += p;
                            mag += std::fabs(p);
                        }
                        rep.worst = std::max(rep.worst, std::fabs(y[at] - ref) / std::max(mag, 1e-30));
                    }
                if (add) continue;
                if (base.empty()) base = y;
                for (int v = 0; v < nv; ++v)
                    rep.invariant = rep.invariant &&
                                    std::memcmp(&base[(size_t)v * ldy], &y[(size_t)v * ldy], (size_t)rows * 4) == 0;
            }
    cudaFree(dy);
    return rep;
}
