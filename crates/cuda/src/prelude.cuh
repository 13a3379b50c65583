// What the kernels need from CUDA's headers, for NVRTC: the module is compiled at run time with no include
// path, so that a machine with the driver and NVRTC (no toolkit) can run it. nvcc builds of the same kernels
// (crates/kernels/cuda/tests) include the real headers instead.

typedef unsigned char uint8_t;
typedef unsigned short uint16_t;
typedef unsigned int uint32_t;
typedef int int32_t;
typedef signed char int8_t;
typedef decltype(sizeof(0)) size_t;

#define CUDART_INF_F __int_as_float(0x7f800000)

struct __align__(2) __half {
    unsigned short x;
};
struct __align__(4) __half2 {
    __half x, y;
};

__device__ __forceinline__ float __half2float(__half h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h.x));
    return f;
}
__device__ __forceinline__ __half __ushort_as_half(unsigned short u) {
    __half h;
    h.x = u;
    return h;
}
__device__ __forceinline__ unsigned short __half_as_ushort(__half h) { return h.x; }
__device__ __forceinline__ __half __float2half(float f) {
    __half h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h.x) : "f"(f));
    return h;
}
__device__ __forceinline__ float2 __half22float2(__half2 h) {
    return make_float2(__half2float(h.x), __half2float(h.y));
}
__device__ __forceinline__ float __low2float(__half2 h) { return __half2float(h.x); }
__device__ __forceinline__ float __high2float(__half2 h) { return __half2float(h.y); }
