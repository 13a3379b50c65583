// Unmangled entry points, for the runtime-compiled module (crates/cuda/src/module.rs), of the kernels in
// crates/kernels/cuda: layer_ops.cuh (the steps between matmuls), block_matvec.cuh and q4k_matvec.cuh (the
// matvecs), paged_attention.cuh. Compiled by NVRTC after prelude.cuh and those headers.

using namespace mlx_serving;

extern "C" __global__ void rms_norm(const float* x, const uint32_t* rows, const float* w, float* out32,
                                    uint16_t* out16, int kind, int h, float eps) {
    rms_norm_body(x, rows, w, out32, out16, kind, h, eps);
}
extern "C" __global__ void qkv_rope_store(const float* qkv, const float* bias, const uint32_t* positions,
                                          const uint32_t* slots, const float* inv_freq, float* q,
                                          uint16_t* k_cache, uint16_t* v_cache, int nh, int nkv, int hd,
                                          int rope_dim, int neox) {
    qkv_rope_store_body(qkv, bias, positions, slots, inv_freq, q, k_cache, v_cache, nh, nkv, hd, rope_dim, neox);
}
extern "C" __global__ void swiglu(const float* gu, float* out32, uint16_t* out16, int kind, int ffn) {
    swiglu_body(gu, out32, out16, kind, ffn);
}
extern "C" __global__ void to_half(const float* x, uint16_t* y, int kind, int n) { to_half_body(x, y, kind, n); }
extern "C" __global__ void __launch_bounds__(ARGMAX_THREADS) argmax_rows(const float* logits, int vocab,
                                                                          uint32_t* out) {
    argmax_body(logits, vocab, out);
}

// Entry points per format: embed_<f>, dequant_<f>, and mv_<f>_<NV>_<R> (the matvec, NV vectors, R rows per warp;
// R = 4 only for the 16-bit formats, where large output heads want it).
#define FORMAT_COMMON(F, NAME)                                                                               \
    extern "C" __global__ void embed_##NAME(const uint8_t* t, const uint32_t* ids, float* x, int h, float s) { \
        embed_body<F>(t, ids, x, h, s);                                                                      \
    }                                                                                                        \
    extern "C" __global__ void dequant_##NAME(const uint8_t* w, uint16_t* out, int kind, int rows, int k) { \
        dequant_body<F>(w, out, kind, rows, k);                                                              \
    }
#define MV(F, NAME, NV, R)                                                                                   \
    extern "C" __global__ void __launch_bounds__(128) mv_##NAME##_##NV##_##R(                                \
        const uint8_t* w, const float* x, float* y, int rows, int k, int ldy, int add) {                     \
        block_matvec_body<F, NV, R>(w, x, y, rows, k, ldy, add);                                             \
    }
#define MV_NV(F, NAME, R) MV(F, NAME, 1, R) MV(F, NAME, 2, R) MV(F, NAME, 4, R) MV(F, NAME, 8, R)
#define FORMAT_R2(F, NAME) FORMAT_COMMON(F, NAME) MV_NV(F, NAME, 1) MV_NV(F, NAME, 2)
#define FORMAT_R4(F, NAME) FORMAT_R2(F, NAME) MV_NV(F, NAME, 4)
FORMAT_R4(FMT_F16, f16)
FORMAT_R4(FMT_BF16, bf16)
FORMAT_R2(FMT_Q4_0, q4_0)
FORMAT_R2(FMT_Q4_1, q4_1)
FORMAT_R2(FMT_Q5_0, q5_0)
FORMAT_R2(FMT_Q5_1, q5_1)
FORMAT_R2(FMT_Q8_0, q8_0)
FORMAT_R2(FMT_Q6_K, q6_k)
FORMAT_COMMON(FMT_Q4_K, q4_k)
#define Q4K_MV(NV, R)                                                                                        \
    extern "C" __global__ void __launch_bounds__(32 * Q4K_WARPS)                                             \
        mv_q4_k_##NV##_##R(const uint8_t* w, const float* x, float* y, int rows, int k, int ldy, int add) {  \
        q4k_matvec_body<NV, R>(w, x, y, rows, k, ldy, add);                                                  \
    }
#define Q4K_MV_R(NV) Q4K_MV(NV, 1) Q4K_MV(NV, 2) Q4K_MV(NV, 4)
Q4K_MV_R(1)
Q4K_MV_R(2)
Q4K_MV_R(4)
Q4K_MV_R(8)

extern "C" __global__ void pa_split(PagedDecodeParams p) { paged_decode_split_body(p); }
extern "C" __global__ void pa_merge(PagedDecodeParams p) { paged_decode_merge_body(p); }
#define PA_GROUPED(G)                                                                                        \
    extern "C" __global__ void __launch_bounds__(PG_THREADS) pa_grouped_##G(PagedDecodeParams p) {           \
        paged_decode_split_grouped_body<G>(p);                                                               \
    }
PA_GROUPED(1)
PA_GROUPED(2)
PA_GROUPED(3)
PA_GROUPED(4)
PA_GROUPED(5)
PA_GROUPED(6)
PA_GROUPED(7)
PA_GROUPED(8)
