//! AVX2 + FMA + F16C kernels (and the integer kernel's VNNI variant). Every function here is `unsafe`: the
//! caller guarantees the features it enables (`Isa::Avx2`; `Isa::Avx512Vnni` for `rows_int8_vnni`) and the
//! slice sizes stated on each.
//!
//! Activation rows go in groups of 4, then the remainder as one group of 3, 2 or 1: each group size is its
//! own fully unrolled instance, so the accumulators stay in registers, and one decoded weight block serves
//! the whole group. A row's arithmetic is the same in every group size, so results do not depend on the
//! batch.

use super::{Q8Acts, QMatrix, QuantFormat, RowRef, BLOCK, GROUP};
use std::arch::x86_64::*;

use crate::vec::simd::hsum;

/// One f16 to f32 with F16C.
#[inline(always)]
unsafe fn h2f(h: half::f16) -> f32 {
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(h.to_bits() as i32)))
}

#[inline(always)]
unsafe fn hsum128(v: __m128) -> f32 {
    let s = _mm_add_ps(v, _mm_movehl_ps(v, v));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
}

/// Runs `group::<G>(t0, out)` over `out` in groups of 4 rows, then one group of the remainder.
macro_rules! in_groups {
    ($out:expr, |$g:ident, $t0:ident, $o:ident| $body:expr) => {{
        let out: &mut [f32] = $out;
        let mut $t0 = 0;
        while out.len() - $t0 >= 4 {
            let $o = &mut out[$t0..$t0 + 4];
            {
                const $g: usize = 4;
                $body
            }
            $t0 += 4;
        }
        let $o = &mut out[$t0..];
        match $o.len() {
            3 => {
                const $g: usize = 3;
                $body
            }
            2 => {
                const $g: usize = 2;
                $body
            }
            1 => {
                const $g: usize = 1;
                $body
            }
            _ => {}
        }
    }};
}

/// Evaluates `$body` with `$F` naming the `IntFormat` type of `$format`.
macro_rules! with_format {
    ($format:expr, $F:ident => $body:expr) => {
        match $format {
            QuantFormat::Q4_0
            | QuantFormat::Q4_1
            | QuantFormat::Q5_0
            | QuantFormat::Q5_1
            | QuantFormat::Q8_0
            | QuantFormat::Q4_K => {
                unreachable!("tiled formats take the tiled kernels")
            }
            QuantFormat::Q6_K => {
                type $F = Q6K;
                $body
            }
        }
    };
}

// ---------------------------------------------------------------------------------------------------------
// f32 activations

#[inline(always)]
unsafe fn block_dot(w: &[__m256; 4], xb: *const f32) -> __m256 {
    let mut s = _mm256_mul_ps(w[0], _mm256_loadu_ps(xb));
    s = _mm256_fmadd_ps(w[1], _mm256_loadu_ps(xb.add(8)), s);
    s = _mm256_fmadd_ps(w[2], _mm256_loadu_ps(xb.add(16)), s);
    _mm256_fmadd_ps(w[3], _mm256_loadu_ps(xb.add(24)), s)
}

/// SAFETY (caller): AVX2, FMA and F16C available; `xs` holds `out.len()` rows of `nb * 32` floats and `xsums`
/// `out.len() * nb` block sums.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn rows_dot_f32(row: RowRef<'_>, xs: &[f32], xsums: &[f32], out: &mut [f32]) {
    let nb = row.nb;
    debug_assert!(xs.len() >= out.len() * nb * BLOCK && xsums.len() >= out.len() * nb);
    with_format!(row.format, F => {
        let values = Widened::<F>(row, std::marker::PhantomData);
        in_groups!(out, |G, t0, o| f32_group::<G>(row, &values, xs, xsums, t0, o))
    })
}

/// Where the f32 kernel's block values come from. Types with `inline(always)` methods rather than closures:
/// a closure does not inherit its caller's target features, and once it is not inlined its intrinsics are
/// calls (that made the f32 path several times slower).
trait Blocks {
    /// Block `b`'s 32 unscaled values as four vectors.
    unsafe fn get(&self, b: usize) -> [__m256; 4];
}

/// A row's blocks decoded as they go, through the integer kernels' 16-bit load (`values_f32`).
struct Widened<'a, F>(RowRef<'a>, std::marker::PhantomData<F>);
impl<F: IntFormat> Blocks for Widened<'_, F> {
    #[inline(always)]
    unsafe fn get(&self, b: usize) -> [__m256; 4] {
        values_f32::<F>(self.0, b)
    }
}

/// A row decoded beforehand (`RowRef::decode_raw`).
struct Decoded(*const f32);
impl Blocks for Decoded {
    #[inline(always)]
    unsafe fn get(&self, b: usize) -> [__m256; 4] {
        let p = self.0.add(b * BLOCK);
        [_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8)), _mm256_loadu_ps(p.add(16)), _mm256_loadu_ps(p.add(24))]
    }
}

/// Block `b`'s scale and min (the values `RowRef::scale_min` gives, with F16C conversions).
#[inline(always)]
unsafe fn scale_min_of(row: RowRef<'_>, b: usize) -> (f32, f32) {
    let (g, i) = (b / GROUP, b % GROUP);
    let (p, len) = (row.data.as_ptr(), (row.nb - g * GROUP).min(GROUP));
    with_format!(row.format, F => F::scale_min(p, g, i, len))
}

/// Eight i16 widened to f32.
#[inline(always)]
unsafe fn i16x8_to_ps(v: __m128i) -> __m256 {
    _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(v))
}

/// Block `b`'s 32 unscaled values as four vectors of f32: the integers `RowRef::block` gives (Q6_K's
/// sub-scales included), so the same arithmetic as the pre-decoded path.
#[inline(always)]
unsafe fn values_f32<F: IntFormat>(row: RowRef<'_>, b: usize) -> [__m256; 4] {
    let g = b / GROUP;
    let w = F::load16(row.data.as_ptr(), g, b % GROUP, (row.nb - g * GROUP).min(GROUP));
    [
        i16x8_to_ps(_mm256_castsi256_si128(w[0])),
        i16x8_to_ps(_mm256_extracti128_si256(w[0], 1)),
        i16x8_to_ps(_mm256_castsi256_si128(w[1])),
        i16x8_to_ps(_mm256_extracti128_si256(w[1], 1)),
    ]
}

/// `rows_dot_f32` with the blocks already decoded into `raw` (unscaled quantized values as f32, laid out
/// like `values_f32`): the same arithmetic in the same order, so bitwise the same results, without
/// decoding each block again for every few activation rows. For large batches (prefill).
///
/// SAFETY (caller): as `rows_dot_f32`, and `raw` holds `nb * 32` floats.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn rows_dot_f32_raw(row: RowRef<'_>, raw: &[f32], xs: &[f32], xsums: &[f32], out: &mut [f32]) {
    let nb = row.nb;
    debug_assert!(raw.len() >= nb * BLOCK && xs.len() >= out.len() * nb * BLOCK && xsums.len() >= out.len() * nb);
    let rp = raw.as_ptr();
    in_groups!(out, |G, t0, o| f32_group::<G>(row, &Decoded(rp), xs, xsums, t0, o));
}

/// Activation rows `t0 .. t0 + G` of `xs` against one weight row; `block(b)` yields block `b`'s values.
#[inline(always)]
#[allow(clippy::needless_range_loop)] // index loops over constant bounds: unrolled, registers
unsafe fn f32_group<const G: usize>(
    row: RowRef<'_>,
    block: &impl Blocks,
    xs: &[f32],
    xsums: &[f32],
    t0: usize,
    out: &mut [f32],
) {
    let nb = row.nb;
    let k = nb * BLOCK;
    let has_mins = !matches!(row.format, QuantFormat::Q8_0 | QuantFormat::Q6_K);
    let mut acc = [_mm256_setzero_ps(); G];
    let mut mins = [0f32; G];
    for b in 0..nb {
        let w = block.get(b);
        let (dw, mw) = scale_min_of(row, b);
        let d = _mm256_set1_ps(dw);
        for r in 0..G {
            let xb = xs.as_ptr().add((t0 + r) * k + b * BLOCK);
            acc[r] = _mm256_fmadd_ps(d, block_dot(&w, xb), acc[r]);
        }
        if has_mins {
            for r in 0..G {
                mins[r] += mw * *xsums.get_unchecked((t0 + r) * nb + b);
            }
        }
    }
    for r in 0..G {
        out[r] = hsum(acc[r]) + mins[r];
    }
}

// ---------------------------------------------------------------------------------------------------------
// 8-bit activations

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

/// `Q8Acts::quantize_portable`, bitwise the same (NaN and infinities included): per 32-value block `d = max|x| / top`
/// (127, or 32767 for 16 bits), `q = round(x · (1 / d))` clamped to `±top`, `s = d · Σ q`; `q` goes to `qs` (8 bits) or
/// `x16`.
///
/// SAFETY (caller): AVX2 and FMA available; `x.len()` a multiple of 32; the buffer of the chosen width
/// (`qs` for 8 bits, `x16` for 16) holds `x.len()` values; `d`, `s` hold one value per block.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn quantize<const WIDE: bool>(x: &[f32], qs: &mut [i8], x16: &mut [i16], d: &mut [f32], s: &mut [f32]) {
    assert!(d.len() == x.len() / BLOCK && s.len() == d.len());
    assert!(if WIDE { x16.len() == x.len() } else { qs.len() == x.len() });
    let top = if WIDE { super::WIDE_MAX } else { 127.0 };
    let abs_mask = _mm256_set1_ps(-0.0);
    for (b, blk) in x.chunks_exact(BLOCK).enumerate() {
        let v: [__m256; 4] = std::array::from_fn(|i| _mm256_loadu_ps(blk.as_ptr().add(8 * i)));
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

/// How far ahead of its current group the integer kernel prefetches each weight row, in bytes. The hardware
/// prefetcher alone left a decode pass at 10–15 GiB/s of the machine's 25 (2 threads): each thread has a
/// few hundred bytes of loads in flight while it computes, where streaming at full speed needs about a
/// kilobyte or two. With prefetches 3 KiB ahead: SmolLM2's pass 14.7 → 17–19 GiB/s, Qwen2.5-0.5B's
/// 10.5 → 14–16 (criterion `decode_pass*`; 0.5–6 KiB all helped, within noise of each other).
const PREFETCH: usize = 3072;

/// A weight format for the grouped integer kernels (the K-quants). A row is a run of groups of four 32-value
/// blocks (K-quant rows are whole super-blocks, so every group is full; `len` stays general); `row` points at
/// the row's stored bytes, `g` is a group and `i` a block in it, `len` the group's block count.
trait IntFormat {
    /// Bytes of a full group of four blocks (on average, for the K-quants).
    const GROUP_BYTES: usize;
    const HAS_MIN: bool;
    /// Whether `pairs(w, x)`'s i16 pair sums of four blocks can be folded in i16 (eight products per lane)
    /// without overflow; then the integer kernel folds with `hadd_epi16` and one `madd` per four blocks
    /// instead of one `madd` per block.
    const I16_FOLD: bool;
    /// A block's weights as the 8-bit dot product takes them.
    type W: Copy;
    unsafe fn zero() -> Self::W;
    /// A full group's four block scales and four mins (zeros without mins), as f32.
    unsafe fn scales(row: *const u8, g: usize) -> (__m128, __m128);
    /// One block's scale and min (a short last group).
    unsafe fn scale_min(row: *const u8, g: usize, i: usize, len: usize) -> (f32, f32);
    unsafe fn load(row: *const u8, g: usize, i: usize, len: usize) -> Self::W;
    /// The block's 32 values widened to i16: elements 0..16, then 16..32 (for 16-bit activations).
    unsafe fn load16(row: *const u8, g: usize, i: usize, len: usize) -> [__m256i; 2];
    /// `maddubs`: sixteen i16 sums of adjacent products with 32 activation bytes (formats with `I16_FOLD`).
    unsafe fn pairs(w: Self::W, x: __m256i) -> __m256i;
    /// The dot product with 32 activation bytes as eight i32 partial sums.
    unsafe fn dot(w: Self::W, x: __m256i) -> __m256i;
    /// `dot` with VNNI (the caller has AVX512-VNNI and AVX512-VL); the same sums.
    #[inline(always)]
    unsafe fn dot_vnni(w: Self::W, x: __m256i) -> __m256i {
        Self::dot(w, x)
    }
}

/// A block's dot product with 16-bit activations (`x[0]`: elements 0..16, `x[1]`: 16..32) as eight i32
/// partial sums, four products per lane. The worst case is Q6_K's `(q − 32)·s = 4096` against 32767: the
/// kernel's two folds then sum 16 products per lane, 2 147 418 112, within i32 by 65 535 (tested).
#[inline(always)]
unsafe fn dot16(w: [__m256i; 2], x: [__m256i; 2]) -> __m256i {
    _mm256_add_epi32(_mm256_madd_epi16(w[0], x[0]), _mm256_madd_epi16(w[1], x[1]))
}

#[inline(always)]
unsafe fn f16_read(p: *const u8) -> f32 {
    h2f((p as *const half::f16).read_unaligned())
}

/// Signed weights × signed bytes: `|w|` (unsigned) times `x` with `w`'s sign moved onto it; |w| ≤ 128 and
/// |x| ≤ 127, so each pair sum fits in i16.
#[inline(always)]
unsafe fn pairs_signed(w: __m256i, x: __m256i) -> __m256i {
    _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w))
}

/// Q6_K: group `g` is half `g % 2` of super-block `g / 2`. A block's weights are `q − 32` as signed bytes,
/// with its two 16-value sub-scales as i16 lanes (`[s0 × 8 | s1 × 8]`, matching `maddubs`' pair sums).
struct Q6K;
impl Q6K {
    #[inline(always)]
    unsafe fn sb(row: *const u8, g: usize) -> *const u8 {
        row.add(g / 2 * 210)
    }
    /// Block `i` of the group as signed bytes `q − 32`, and its two sub-scales.
    #[inline(always)]
    unsafe fn values(row: *const u8, g: usize, i: usize) -> (__m256i, i16, i16) {
        let (sb, h) = (Self::sb(row, g), g % 2);
        let ql = _mm256_loadu_si256(sb.add(64 * h + 32 * (i % 2)) as *const __m256i);
        let qh = _mm256_loadu_si256(sb.add(128 + 32 * h) as *const __m256i);
        let mask = _mm256_set1_epi8(0x0F);
        let low = if i < 2 { _mm256_and_si256(ql, mask) } else { _mm256_and_si256(_mm256_srli_epi16(ql, 4), mask) };
        // Bits 2i, 2i+1 of qh to bits 4, 5.
        let high = match i {
            0 => _mm256_slli_epi16(qh, 4),
            1 => _mm256_slli_epi16(qh, 2),
            2 => qh,
            _ => _mm256_srli_epi16(qh, 2),
        };
        let q = _mm256_or_si256(low, _mm256_and_si256(high, _mm256_set1_epi8(0x30)));
        let sc = sb.add(192 + 8 * h + 2 * i) as *const i8;
        (_mm256_sub_epi8(q, _mm256_set1_epi8(32)), *sc as i16, *sc.add(1) as i16)
    }
}
impl IntFormat for Q6K {
    const GROUP_BYTES: usize = 105;
    const HAS_MIN: bool = false;
    /// The sub-scales are applied in the widening `madd`, per block.
    const I16_FOLD: bool = false;
    type W = (__m256i, __m256i);
    #[inline(always)]
    unsafe fn zero() -> Self::W {
        (_mm256_setzero_si256(), _mm256_setzero_si256())
    }
    #[inline(always)]
    unsafe fn scales(row: *const u8, g: usize) -> (__m128, __m128) {
        (_mm_set1_ps(f16_read(Self::sb(row, g).add(208))), _mm_setzero_ps())
    }
    #[inline(always)]
    unsafe fn scale_min(row: *const u8, g: usize, _i: usize, _len: usize) -> (f32, f32) {
        (f16_read(Self::sb(row, g).add(208)), 0.0)
    }
    #[inline(always)]
    unsafe fn load(row: *const u8, g: usize, i: usize, _len: usize) -> Self::W {
        let (q, s0, s1) = Self::values(row, g, i);
        (q, _mm256_setr_m128i(_mm_set1_epi16(s0), _mm_set1_epi16(s1)))
    }
    /// `(q − 32)·s` as i16 (|·| ≤ 4096): the sub-scales go into the weights.
    #[inline(always)]
    unsafe fn load16(row: *const u8, g: usize, i: usize, _len: usize) -> [__m256i; 2] {
        let (q, s0, s1) = Self::values(row, g, i);
        [
            _mm256_mullo_epi16(_mm256_cvtepi8_epi16(_mm256_castsi256_si128(q)), _mm256_set1_epi16(s0)),
            _mm256_mullo_epi16(_mm256_cvtepi8_epi16(_mm256_extracti128_si256(q, 1)), _mm256_set1_epi16(s1)),
        ]
    }
    #[inline(always)]
    unsafe fn pairs(w: Self::W, x: __m256i) -> __m256i {
        pairs_signed(w.0, x)
    }
    /// |q − 32| ≤ 32 and |x| ≤ 127: pair sums within ±8128; times |s| ≤ 128, two of them fit in i32.
    #[inline(always)]
    unsafe fn dot(w: Self::W, x: __m256i) -> __m256i {
        _mm256_madd_epi16(pairs_signed(w.0, x), w.1)
    }
}

/// `out[i * n + t] = Σ w[r0 + i]·x̂[t]` for the weight rows `r0 .. r0 + out.len() / n` and every activation
/// row `t` of `acts` (`n` rows). One call per parallel task, so per-row work stays inside the unrolled
/// loops: one activation row (decode) takes weight rows in pairs; several take activation rows in groups.
///
/// SAFETY (caller): AVX2, FMA and F16C available; `acts` holds `n` rows of `w.cols()` values with their
/// per-block scales and sums; the rows exist in `w`.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn rows_int8(w: &QMatrix, r0: usize, acts: &Q8Acts, n: usize, out: &mut [f32]) {
    rows_int8_on::<false>(w, r0, acts, n, out)
}

/// `rows_int8` with VNNI dot products (`vpdpbusd` for 8-bit activations, `vpdpwssd` for 16-bit): the same
/// integer sums, so bitwise the same results.
///
/// SAFETY (caller): as `rows_int8`, and AVX512-VNNI with AVX512-VL available.
#[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl")]
pub unsafe fn rows_int8_vnni(w: &QMatrix, r0: usize, acts: &Q8Acts, n: usize, out: &mut [f32]) {
    rows_int8_on::<true>(w, r0, acts, n, out)
}

#[inline(always)]
unsafe fn rows_int8_on<const VNNI: bool>(w: &QMatrix, r0: usize, acts: &Q8Acts, n: usize, out: &mut [f32]) {
    with_format!(w.format, F => rows_int8_as::<F, VNNI>(w, r0, acts, n, out))
}

#[inline(always)]
unsafe fn rows_int8_as<F: IntFormat, const VNNI: bool>(
    w: &QMatrix,
    r0: usize,
    acts: &Q8Acts,
    n: usize,
    out: &mut [f32],
) {
    if acts.is_wide() {
        rows_int8_fmt::<F, true, VNNI>(w, r0, acts, n, out)
    } else {
        rows_int8_fmt::<F, false, VNNI>(w, r0, acts, n, out)
    }
}

#[inline(always)]
unsafe fn rows_int8_fmt<F: IntFormat, const WIDE: bool, const VNNI: bool>(
    w: &QMatrix,
    r0: usize,
    acts: &Q8Acts,
    n: usize,
    out: &mut [f32],
) {
    let rows = out.len() / n;
    debug_assert!(r0 + rows <= w.rows && acts.k == w.cols && acts.d.len() >= n * w.cols / BLOCK);
    debug_assert_eq!(acts.is_wide(), WIDE);
    if n == 1 {
        let mut i = 0;
        while i + 2 <= rows {
            int8_tile::<F, WIDE, VNNI, 2, 1>([w.row(r0 + i), w.row(r0 + i + 1)], acts, 0, &mut out[i..i + 2]);
            i += 2;
        }
        if i < rows {
            int8_tile::<F, WIDE, VNNI, 1, 1>([w.row(r0 + i)], acts, 0, &mut out[i..i + 1]);
        }
        return;
    }
    for (i, o) in out.chunks_exact_mut(n).enumerate() {
        let row = [w.row(r0 + i)];
        in_groups!(o, |G, g0, og| int8_tile::<F, WIDE, VNNI, 1, G>(row, acts, g0, og));
    }
}

/// Activation block at value offset `off`: 32 bytes (the second vector unused), or 32 i16 in two vectors.
#[inline(always)]
unsafe fn load_acts<const WIDE: bool>(xq: *const i8, x16: *const i16, off: usize) -> [__m256i; 2] {
    if WIDE {
        let p = x16.add(off) as *const __m256i;
        [_mm256_loadu_si256(p), _mm256_loadu_si256(p.add(1))]
    } else {
        [_mm256_loadu_si256(xq.add(off) as *const __m256i), _mm256_setzero_si256()]
    }
}

/// Block `i` of group `g`: as loaded for 8-bit activations, or widened to i16 (the other part zeros).
#[inline(always)]
unsafe fn load_weights<F: IntFormat, const WIDE: bool>(
    row: *const u8,
    g: usize,
    i: usize,
    len: usize,
) -> (F::W, [__m256i; 2]) {
    if WIDE {
        (F::zero(), F::load16(row, g, i, len))
    } else {
        (F::load(row, g, i, len), [_mm256_setzero_si256(); 2])
    }
}

/// The block's eight i32 partial sums (`load_weights` against `load_acts`).
#[inline(always)]
unsafe fn int_dot<F: IntFormat, const WIDE: bool, const VNNI: bool>(
    w: (F::W, [__m256i; 2]),
    x: [__m256i; 2],
) -> __m256i {
    match (WIDE, VNNI) {
        (true, false) => dot16(w.1, x),
        // One `madd`, then the second pair of vectors multiplied and added by one `vpdpwssd`.
        (true, true) => _mm256_dpwssd_epi32(_mm256_madd_epi16(w.1[0], x[0]), w.1[1], x[1]),
        (false, false) => F::dot(w.0, x[0]),
        (false, true) => F::dot_vnni(w.0, x[0]),
    }
}

/// Weight rows `rows` against activation rows `t0 .. t0 + G`; `out` is `[R, G]`. Blocks go four at a time:
/// their four scales are converted and multiplied by the activation scales as one vector
/// `[d0 d1 d2 d3 | d0 d1 d2 d3]`, the four blocks' i32 partial sums are folded into the matching lanes
/// and scaled by it with one FMA; the min terms (`m·s`) accumulate four blocks per FMA. A tail of fewer than
/// four blocks goes one by one. Each (weight row, activation row) pair runs
/// the same operations in the same order whatever `R` and `G` are.
#[inline(always)]
#[allow(clippy::needless_range_loop)] // index loops over constant bounds: unrolled, registers
unsafe fn int8_tile<F: IntFormat, const WIDE: bool, const VNNI: bool, const R: usize, const G: usize>(
    rows: [RowRef<'_>; R],
    acts: &Q8Acts,
    t0: usize,
    out: &mut [f32],
) {
    let nb = rows[0].nb;
    let k = nb * BLOCK;
    const { assert!(GROUP == 4, "the block loop folds four blocks") };
    let base: [*const u8; R] = std::array::from_fn(|r| rows[r].data.as_ptr());
    let xq = acts.qs.as_ptr();
    let xl = acts.x16.as_ptr();
    let xd = acts.d.as_ptr();
    let xs = acts.s.as_ptr();
    let mut acc = [[_mm256_setzero_ps(); G]; R];
    let mut macc = [[_mm_setzero_ps(); G]; R];
    let mut b = 0;
    while b + GROUP <= nb {
        let gi = b / GROUP;
        // Prefetches never fault, so running past the row (into the next rows, or past the matrix) is fine.
        for r in 0..R {
            let p = base[r].wrapping_add(gi * F::GROUP_BYTES + PREFETCH);
            for line in 0..F::GROUP_BYTES.div_ceil(64) {
                _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(64 * line) as *const i8);
            }
        }
        let wsc: [(__m128, __m128); R] = std::array::from_fn(|r| F::scales(base[r], gi));
        let mut sc = [[_mm256_setzero_ps(); G]; R];
        for g in 0..G {
            let t = t0 + g;
            let dx = _mm_loadu_ps(xd.add(t * nb + b));
            let sx = _mm_loadu_ps(xs.add(t * nb + b));
            for r in 0..R {
                // The four blocks' combined scales, in both halves (see the block loop).
                let d4 = _mm_mul_ps(wsc[r].0, dx);
                sc[r][g] = _mm256_insertf128_ps(_mm256_castps128_ps256(d4), d4, 1);
                if F::HAS_MIN {
                    macc[r][g] = _mm_fmadd_ps(wsc[r].1, sx, macc[r][g]);
                }
            }
        }
        // Blocks in pairs: `hadd` folds the pair's eight i32 partial sums each to four, then the two pairs
        // fold again, leaving [b0 b1 b2 b3 | b0 b1 b2 b3] (each half the sum of half a block's lanes): one
        // conversion and one FMA against the scales for four blocks. With 8-bit activations on formats that
        // allow it (`I16_FOLD`), the folds run on the i16 `maddubs` results and one `madd` widens the four
        // blocks at the end: the same integer sums, with three multiply-unit instructions fewer per four
        // blocks.
        // With VNNI one `vpdpbusd` gives a block's i32 sums directly: no i16 fold.
        let i16_fold = F::I16_FOLD && !WIDE && !VNNI;
        let mut pairs = [[[_mm256_setzero_si256(); G]; R]; 2];
        for (jp, pair) in pairs.iter_mut().enumerate() {
            let j = 2 * jp;
            let x0: [[__m256i; 2]; G] =
                std::array::from_fn(|g| load_acts::<WIDE>(xq, xl, (t0 + g) * k + (b + j) * BLOCK));
            let x1: [[__m256i; 2]; G] =
                std::array::from_fn(|g| load_acts::<WIDE>(xq, xl, (t0 + g) * k + (b + j + 1) * BLOCK));
            for r in 0..R {
                let w0 = load_weights::<F, WIDE>(base[r], gi, j, GROUP);
                let w1 = load_weights::<F, WIDE>(base[r], gi, j + 1, GROUP);
                for g in 0..G {
                    pair[r][g] = if i16_fold {
                        _mm256_hadd_epi16(F::pairs(w0.0, x0[g][0]), F::pairs(w1.0, x1[g][0]))
                    } else {
                        _mm256_hadd_epi32(int_dot::<F, WIDE, VNNI>(w0, x0[g]), int_dot::<F, WIDE, VNNI>(w1, x1[g]))
                    };
                }
            }
        }
        for r in 0..R {
            for g in 0..G {
                let folded = if i16_fold {
                    _mm256_madd_epi16(_mm256_hadd_epi16(pairs[0][r][g], pairs[1][r][g]), _mm256_set1_epi16(1))
                } else {
                    _mm256_hadd_epi32(pairs[0][r][g], pairs[1][r][g])
                };
                let p = _mm256_cvtepi32_ps(folded);
                acc[r][g] = _mm256_fmadd_ps(sc[r][g], p, acc[r][g]);
            }
        }
        b += GROUP;
    }
    // A last group of `len` < GROUP blocks (none for the K-quants' whole super-blocks).
    let len = nb - b;
    let mut tail_min = [[0f32; G]; R];
    for i in 0..len {
        for r in 0..R {
            let (dw, mw) = F::scale_min(base[r], b / GROUP, i, len);
            let wv = load_weights::<F, WIDE>(base[r], b / GROUP, i, len);
            for g in 0..G {
                let t = t0 + g;
                if F::HAS_MIN {
                    tail_min[r][g] += mw * *xs.add(t * nb + b + i);
                }
                let x = load_acts::<WIDE>(xq, xl, t * k + (b + i) * BLOCK);
                let p = _mm256_cvtepi32_ps(int_dot::<F, WIDE, VNNI>(wv, x));
                acc[r][g] = _mm256_fmadd_ps(_mm256_set1_ps(dw * *xd.add(t * nb + b + i)), p, acc[r][g]);
            }
        }
    }
    for r in 0..R {
        for g in 0..G {
            out[r * G + g] = hsum(acc[r][g]) + hsum128(macc[r][g]) + tail_min[r][g];
        }
    }
}
