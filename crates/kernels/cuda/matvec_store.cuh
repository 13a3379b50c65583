// The end of every matrix × vector kernel (q4k_matvec.cuh, block_matvec.cuh): a warp's R × NV partial sums are
// summed over its 32 lanes, and lane 0 writes them (or adds them, `add`) at y[v · ldy + row].

#pragma once

namespace mlx_serving {

template <int R, int NV>
__device__ __forceinline__ void matvec_store(float (&acc)[R][NV], int lane, int row0, int rows, float* __restrict__ y,
                                             int ldy, int add) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
#pragma unroll
        for (int v = 0; v < NV; ++v) {
            float s = acc[r][v];
            for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
            if (lane == 0 && row0 + r < rows) {
                float* out = y + (size_t)v * ldy + row0 + r;
                *out = add ? *out + s : s;
            }
        }
    }
}

}  // namespace mlx_serving
