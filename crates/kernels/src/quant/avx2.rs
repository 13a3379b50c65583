//! AVX2 activation quantizer (`quantize`): rounds activation rows to 8 or 16 bits per 32-value block for the
//! integer kernels (`tiled.rs`). `unsafe`: the caller guarantees AVX2, FMA and F16C and the slice sizes stated.

use super::BLOCK;
use std::arch::x86_64::*;

/// Rounds half away from zero, as `f32::round`: `trunc(x)`, plus `±1` where the (exact) fraction is ≥ 0.5.
#[inline(always)]
unsafe fn round_half_away(x: __m256) -> __m256 {
    let t = _mm256_round_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(x);
    let sign = _mm256_and_ps(x, _mm256_set1_ps(-0.0));
    let frac = _mm256_andnot_ps(_mm256_set1_ps(-0.0), _mm256_sub_ps(x, t));
    let up = _mm256_cmp_ps::<_CMP_GE_OQ>(frac, _mm256_set1_ps(0.5));
    _mm256_add_ps(t, _mm256_and_ps(up, _mm256_or_ps(sign, _mm256_set1_ps(1.0))))
}

/// NaN lanes to 0.
#[inline(always)]
unsafe fn nan_to_zero(x: __m256) -> __m256 {
    _mm256_and_ps(x, _mm256_cmp_ps::<_CMP_ORD_Q>(x, x))
}

/// Packs four vectors of i32 (each within i8 range) into 32 bytes in order.
#[inline(always)]
unsafe fn pack_i8(q: [__m256i; 4]) -> __m256i {
    // Packing works within 128-bit lanes; the permutation restores the order.
    let p = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
    _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7))
}

/// Packs four vectors of i32 (each within i16 range) into two vectors of 16 i16, in order.
#[inline(always)]
unsafe fn pack_i16(q: [__m256i; 4]) -> [__m256i; 2] {
    // Packing works within 128-bit lanes; the 64-bit permutation restores the order.
    let a = _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_packs_epi32(q[0], q[1]));
    let b = _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_packs_epi32(q[2], q[3]));
    [a, b]
}

/// Where a row's 32-value blocks come from, computed as they are rounded (no pass over memory in between).
pub trait Blocks {
    /// The 32 values of block `b`.
    ///
    /// # Safety
    /// AVX2 and FMA available; block `b` lies within the source's row.
    unsafe fn block(&self, b: usize) -> [__m256; 4];
}

/// Four vectors from `p`.
#[inline(always)]
unsafe fn load4(p: *const f32) -> [__m256; 4] {
    [_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8)), _mm256_loadu_ps(p.add(16)), _mm256_loadu_ps(p.add(24))]
}

/// Values as they are.
pub struct Plain(pub *const f32);
impl Blocks for Plain {
    #[inline(always)]
    unsafe fn block(&self, b: usize) -> [__m256; 4] {
        load4(self.0.add(b * BLOCK))
    }
}

/// `(x · inv) · w`: a row of RMS norm (`crate::vec::rms_norm`'s arithmetic).
pub struct Normed {
    pub x: *const f32,
    pub w: *const f32,
    pub inv: f32,
}
impl Blocks for Normed {
    #[inline(always)]
    unsafe fn block(&self, b: usize) -> [__m256; 4] {
        let (x, w, inv) = (load4(self.x.add(b * BLOCK)), load4(self.w.add(b * BLOCK)), _mm256_set1_ps(self.inv));
        [
            _mm256_mul_ps(_mm256_mul_ps(x[0], inv), w[0]),
            _mm256_mul_ps(_mm256_mul_ps(x[1], inv), w[1]),
            _mm256_mul_ps(_mm256_mul_ps(x[2], inv), w[2]),
            _mm256_mul_ps(_mm256_mul_ps(x[3], inv), w[3]),
        ]
    }
}

/// `silu(gate) · up` (`crate::vec::swiglu`'s AVX2 arithmetic).
pub struct Gated {
    pub gate: *const f32,
    pub up: *const f32,
}
impl Blocks for Gated {
    #[inline(always)]
    unsafe fn block(&self, b: usize) -> [__m256; 4] {
        let (g, u) = (load4(self.gate.add(b * BLOCK)), load4(self.up.add(b * BLOCK)));
        use crate::vec::simd::silu_mul;
        [silu_mul(g[0], u[0]), silu_mul(g[1], u[1]), silu_mul(g[2], u[2]), silu_mul(g[3], u[3])]
    }
}

/// `Q8Acts::quantize_portable`, bitwise the same (NaN and infinities included), for the `d.len()` blocks of
/// `src`: per 32-value block `d = max|x| / top` (127, or 32767 for 16 bits), `q = round(x · (1 / d))` clamped
/// to `±top`, `s = d · Σ q`; `q` goes to `qs` (8 bits) or `x16`.
///
/// SAFETY (caller): AVX2, FMA and F16C available; `src` has `d.len()` blocks; the buffer of the chosen width
/// (`qs` for 8 bits, `x16` for 16) holds 32 values per block; `s` one value per block.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn quantize<const WIDE: bool, S: Blocks>(
    src: &S,
    qs: &mut [i8],
    x16: &mut [i16],
    d: &mut [f32],
    s: &mut [f32],
) {
    let nb = d.len();
    assert!(s.len() == nb);
    assert!(if WIDE { x16.len() == nb * BLOCK } else { qs.len() == nb * BLOCK });
    let top = if WIDE { super::WIDE_MAX } else { 127.0 };
    let abs_mask = _mm256_set1_ps(-0.0);
    for b in 0..nb {
        let v = src.block(b);
        // NaN counts as 0 here and rounds to 0 below, as in the portable version (`f32::max` skips NaN,
        // `NaN as i32` is 0).
        let mut amax = nan_to_zero(_mm256_andnot_ps(abs_mask, v[0]));
        for vi in &v[1..] {
            amax = _mm256_max_ps(amax, nan_to_zero(_mm256_andnot_ps(abs_mask, *vi)));
        }
        let m = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
        let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
        let scale = amax / top;
        let inv = _mm256_set1_ps(super::inverse_scale(scale));
        let (lo_v, hi_v) = (_mm256_set1_ps(-top), _mm256_set1_ps(top));
        let qf: [__m256; 4] = std::array::from_fn(|i| {
            _mm256_min_ps(_mm256_max_ps(nan_to_zero(round_half_away(_mm256_mul_ps(v[i], inv))), lo_v), hi_v)
        });
        let q: [__m256i; 4] = std::array::from_fn(|i| _mm256_cvttps_epi32(qf[i]));
        let sum = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
        let sum = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
        let sum = _mm_add_epi32(sum, _mm_shuffle_epi32::<0b01_00_11_10>(sum));
        let sum = _mm_cvtsi128_si32(_mm_add_epi32(sum, _mm_shuffle_epi32::<0b10_11_00_01>(sum)));
        if WIDE {
            let out = x16.as_mut_ptr().add(b * BLOCK) as *mut __m256i;
            let [a, c] = pack_i16(q);
            _mm256_storeu_si256(out, a);
            _mm256_storeu_si256(out.add(1), c);
        } else {
            _mm256_storeu_si256(qs.as_mut_ptr().add(b * BLOCK) as *mut __m256i, pack_i8(q));
        }
        d[b] = scale;
        s[b] = scale * sum as f32;
    }
}
