// A host emulation of the part of CUDA our kernels and their test programs use (#21), so that the kernels'
// arithmetic and their batch invariance are checked in CI, which has no GPU (tests/cuda_emu.py compiles
// crates/kernels/cuda/tests/*_test.cu with g++ against this header; the GPU machine builds the same programs
// with nvcc and also times them).
//
// A thread block runs as one fiber per CUDA thread on the calling OS thread (ucontext): a fiber runs until
// it reaches a barrier (`__syncthreads`, or a warp shuffle's exchange), then the next one runs; a barrier
// opens when every thread of the block (of the warp, for a shuffle) that has not exited has reached it.
// Blocks run one after another, so `__shared__` (a function-local static here) is the block's shared
// memory. Memory is host memory: `cudaMalloc` is `malloc`, copies are `memcpy`, and a launch returns when
// its grid is done. Arithmetic is the host's: no fused multiply-adds unless the compiler contracts them, so
// results are compared with the error bounds the tests state, never bitwise against a GPU; batch invariance
// (a bitwise comparison of two launches' results) holds here as on the GPU when the kernel's summation order
// does not depend on the batch.
//
// Not emulated: timing (events read 0 ms; the tests skip their benchmarks under MLX_SERVING_EMU), streams
// (all work is synchronous), dynamic shared memory, warp votes, and inline PTX (the kernels use
// `__half2float`/`__float2half` where they convert, which is defined here with the host's _Float16).

#pragma once
#define MLX_SERVING_EMU 1

#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <vector>

#define __device__
#define __host__
#define __global__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))

struct dim3 {
    unsigned x, y, z;
    constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(16) uint4 { uint32_t x, y, z, w; };
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(8) float2 { float x, y; };
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }

struct alignas(2) __half { uint16_t x; };
struct alignas(4) __half2 { __half x, y; };
inline float __half2float(__half h) {
    _Float16 f;
    std::memcpy(&f, &h.x, 2);
    return (float)f;
}
inline __half __float2half(float v) {
    const _Float16 f = (_Float16)v;  // round to nearest even, as cvt.rn.f16.f32
    __half h;
    std::memcpy(&h.x, &f, 2);
    return h;
}
inline __half __ushort_as_half(unsigned short u) { return __half{u}; }
inline unsigned short __half_as_ushort(__half h) { return h.x; }
inline float2 __half22float2(__half2 h) { return {__half2float(h.x), __half2float(h.y)}; }
inline float __low2float(__half2 h) { return __half2float(h.x); }
inline float __high2float(__half2 h) { return __half2float(h.y); }

inline float __uint_as_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
inline float __int_as_float(int32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
inline uint32_t __float_as_uint(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
inline int32_t __float_as_int(float f) { int32_t u; std::memcpy(&u, &f, 4); return u; }
inline float __expf(float x) { return std::exp(x); }
#define CUDART_INF_F __int_as_float(0x7f800000)
using std::max;
using std::min;
template <class T>
inline T __ldg(const T* p) { return *p; }

namespace emu {

constexpr size_t STACK_BYTES = 256 << 10;

struct Fiber {
    ucontext_t ctx;
    dim3 tid;
    bool done = false;
};

// The block being run: its fibers, the block barrier and one barrier per warp.
struct Block {
    std::vector<Fiber> fibers;
    std::vector<std::vector<char>> stacks;
    ucontext_t sched;
    std::function<void()> body;
    size_t cur = 0;
    int alive = 0, bar_count = 0;
    unsigned bar_gen = 0;
    std::vector<int> warp_alive, warp_count;
    std::vector<unsigned> warp_gen;
    std::vector<uint64_t> lanes;  // a shuffle's exchanged values, 32 per warp
    uint64_t events = 0;          // barrier arrivals and thread exits, for the deadlock check
};

inline Block& block() {
    static Block b;
    return b;
}
inline dim3 g_block_idx, g_block_dim, g_grid_dim;

inline void yield() {
    Block& b = block();
    swapcontext(&b.fibers[b.cur].ctx, &b.sched);
}

// Waits until every live thread of the group has arrived: `count` arrivals of `alive`, generation `gen`.
inline void arrive(int& count, int alive, unsigned& gen, uint64_t& events) {
    const unsigned mine = gen;
    ++events;
    if (++count == alive) {
        count = 0;
        ++gen;
        return;
    }
    while (gen == mine) yield();
}

inline void syncthreads() {
    Block& b = block();
    arrive(b.bar_count, b.alive, b.bar_gen, b.events);
}

inline void syncwarp() {
    Block& b = block();
    const size_t w = b.cur / 32;
    arrive(b.warp_count[w], b.warp_alive[w], b.warp_gen[w], b.events);
}

template <class T>
inline T shfl(T v, int src_lane_xor, bool is_xor) {
    static_assert(sizeof(T) <= 8, "a shuffle moves at most 8 bytes");
    Block& b = block();
    const size_t me = b.cur, w = me / 32, lane = me % 32;
    uint64_t bits = 0;
    std::memcpy(&bits, &v, sizeof(T));
    b.lanes[w * 32 + lane] = bits;
    syncwarp();
    const size_t src = is_xor ? (lane ^ (size_t)src_lane_xor) : (size_t)src_lane_xor % 32;
    T r;
    std::memcpy(&r, &b.lanes[w * 32 + src], sizeof(T));
    syncwarp();
    return r;
}

inline void fiber_main() {
    Block& b = block();
    b.body();
    Fiber& f = b.fibers[b.cur];
    f.done = true;
    --b.alive;
    --b.warp_alive[b.cur / 32];
    ++b.events;
    // Barriers the exited thread was counted into open once everyone else has arrived.
    if (b.bar_count > 0 && b.bar_count == b.alive) {
        b.bar_count = 0;
        ++b.bar_gen;
    }
    const size_t w = b.cur / 32;
    if (b.warp_count[w] > 0 && b.warp_count[w] == b.warp_alive[w]) {
        b.warp_count[w] = 0;
        ++b.warp_gen[w];
    }
}  // returns to uc_link: the scheduler

inline void run_block(const std::function<void()>& body) {
    Block& b = block();
    const size_t n = (size_t)g_block_dim.x * g_block_dim.y * g_block_dim.z, warps = (n + 31) / 32;
    if (n == 0 || n > 1024) {
        std::fprintf(stderr, "emu: a block of %zu threads\n", n);
        std::abort();
    }
    b.body = body;
    b.fibers.assign(n, Fiber{});
    if (b.stacks.size() < n) b.stacks.resize(n, std::vector<char>(STACK_BYTES));
    b.alive = (int)n;
    b.bar_count = 0;
    b.warp_alive.assign(warps, 0);
    b.warp_count.assign(warps, 0);
    b.warp_gen.assign(warps, 0);
    b.lanes.assign(warps * 32, 0);
    for (size_t i = 0; i < n; ++i) {
        Fiber& f = b.fibers[i];
        f.tid = dim3(i % g_block_dim.x, (i / g_block_dim.x) % g_block_dim.y, i / ((size_t)g_block_dim.x * g_block_dim.y));
        ++b.warp_alive[i / 32];
        getcontext(&f.ctx);
        f.ctx.uc_stack.ss_sp = b.stacks[i].data();
        f.ctx.uc_stack.ss_size = STACK_BYTES;
        f.ctx.uc_link = &b.sched;
        makecontext(&f.ctx, fiber_main, 0);
    }
    // Round robin until every fiber is done. A fiber runs until it arrives at a barrier or exits; one whose
    // barrier has not opened only looks and yields. A round in which nobody arrived anywhere or exited, with
    // threads left, is a deadlock: a barrier that some thread never reaches.
    for (;;) {
        bool any = false;
        const uint64_t before = b.events;
        for (size_t i = 0; i < n; ++i) {
            if (b.fibers[i].done) continue;
            any = true;
            b.cur = i;
            swapcontext(&b.sched, &b.fibers[i].ctx);
        }
        if (!any) return;
        if (b.events == before) {
            std::fprintf(stderr, "emu: deadlock in block (%u, %u, %u): a barrier not every thread reaches\n",
                         g_block_idx.x, g_block_idx.y, g_block_idx.z);
            std::abort();
        }
    }
}

// Runs `body` (the kernel called with its arguments) over the grid, block after block.
inline void launch(dim3 grid, dim3 blk, const std::function<void()>& body) {
    g_grid_dim = grid;
    g_block_dim = blk;
    for (unsigned z = 0; z < grid.z; ++z)
        for (unsigned y = 0; y < grid.y; ++y)
            for (unsigned x = 0; x < grid.x; ++x) {
                g_block_idx = dim3(x, y, z);
                run_block(body);
            }
}

inline const dim3& thread_idx() { return block().fibers[block().cur].tid; }

}  // namespace emu

#define threadIdx (emu::thread_idx())
#define blockIdx (emu::g_block_idx)
#define blockDim (emu::g_block_dim)
#define gridDim (emu::g_grid_dim)

// Fibers switch only at barriers, so a read-modify-write is atomic here.
template <class T>
inline T atomicAdd(T* p, T v) {
    const T old = *p;
    *p = old + v;
    return old;
}

inline void __syncthreads() { emu::syncthreads(); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu::syncwarp(); }
template <class T>
inline T __shfl_xor_sync(unsigned, T v, int lane_mask) { return emu::shfl(v, lane_mask, true); }
template <class T>
inline T __shfl_sync(unsigned, T v, int src_lane) { return emu::shfl(v, src_lane, false); }

// The runtime API, as far as the test programs use it.
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorMemoryAllocation = 2 };
enum cudaMemcpyKind { cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost, cudaMemcpyDeviceToDevice };
typedef void* cudaStream_t;
typedef int* cudaEvent_t;
struct cudaDeviceProp {
    char name[256];
    int multiProcessorCount;
};
inline const char* cudaGetErrorString(cudaError_t e) {
    return e == cudaSuccess ? "no error" : e == cudaErrorInvalidValue ? "invalid argument" : "out of memory";
}
// New memory is filled with 0xFF bytes (NaNs as floats), so that a kernel or test reading what nobody wrote
// sees garbage here too, not the zeros a fresh GPU allocation often happens to hold.
template <class T>
inline cudaError_t cudaMalloc(T** p, size_t bytes) {
    *p = static_cast<T*>(std::malloc(bytes ? bytes : 1));
    if (*p) std::memset(static_cast<void*>(*p), 0xFF, bytes ? bytes : 1);
    return *p ? cudaSuccess : cudaErrorMemoryAllocation;
}
inline cudaError_t cudaFree(void* p) { std::free(p); return cudaSuccess; }
inline cudaError_t cudaMemcpy(void* d, const void* s, size_t n, cudaMemcpyKind) { std::memcpy(d, s, n); return cudaSuccess; }
inline cudaError_t cudaMemset(void* d, int v, size_t n) { std::memset(d, v, n); return cudaSuccess; }
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }
inline cudaError_t cudaGetDeviceProperties(cudaDeviceProp* p, int) {
    std::snprintf(p->name, sizeof p->name, "host emulation (crates/kernels/cuda/emu)");
    p->multiProcessorCount = 132;  // an H100's, so that launch policies choose as they would there
    return cudaSuccess;
}
inline cudaError_t cudaEventCreate(cudaEvent_t* e) { *e = nullptr; return cudaSuccess; }
inline cudaError_t cudaEventRecord(cudaEvent_t, cudaStream_t = nullptr) { return cudaSuccess; }
inline cudaError_t cudaEventSynchronize(cudaEvent_t) { return cudaSuccess; }
inline cudaError_t cudaEventElapsedTime(float* ms, cudaEvent_t, cudaEvent_t) { *ms = 0.f; return cudaSuccess; }
