//! AVX2 build of the attention inner loop (`attend_range`, and `attend_block` for several query tokens of a
//! prefill at once), for head sizes that are a multiple of 8.
//!
//! Per tile of `TILE` positions and per query head: scores for eight positions at a time, with one
//! accumulator per position and a transposing reduction at the end (instead of a horizontal sum per dot
//! product); a vectorized `exp` for the softmax weights; then the values accumulated with the head's output
//! held in registers across the tile. The arithmetic order per output element is the portable loop's
//! (positions in order), only the rounding of `exp` and of the dot products' partial sums differ.

use super::{KvElem, Partial, Span, TILE};
use std::arch::x86_64::*;

/// `[Σ a[0], Σ a[1], …, Σ a[7]]`: eight horizontal sums in one vector.
#[inline(always)]
unsafe fn transpose_sum(a: &[__m256; 8]) -> __m256 {
    let t0 = _mm256_hadd_ps(a[0], a[1]);
    let t1 = _mm256_hadd_ps(a[2], a[3]);
    let t2 = _mm256_hadd_ps(a[4], a[5]);
    let t3 = _mm256_hadd_ps(a[6], a[7]);
    // Lane halves: [a0 a1 a2 a3 | a0 a1 a2 a3] partial sums, then the same for a4..a7.
    let u0 = _mm256_hadd_ps(t0, t1);
    let u1 = _mm256_hadd_ps(t2, t3);
    let lo = _mm256_permute2f128_ps(u0, u1, 0x20);
    let hi = _mm256_permute2f128_ps(u0, u1, 0x31);
    _mm256_add_ps(lo, hi)
}

#[inline(always)]
unsafe fn hmax(v: __m256) -> f32 {
    let m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    let m = _mm_max_ss(m, _mm_movehdup_ps(m));
    _mm_cvtss_f32(m)
}

/// `exp(x)` per lane for `x ≤ 0` (softmax weights): `2^n · p(r)` with `x = n·ln 2 + r`, `|r| ≤ ln 2 / 2`, and
/// `p` the Taylor polynomial of degree 7 (relative error below 1e-8 from the polynomial, about one ulp in
/// all). Lanes below -87 (where f32 `exp` goes subnormal) and `-inf` give exactly 0.
#[inline(always)]
pub(crate) unsafe fn exp_nonpositive(x: __m256) -> __m256 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split so that n · LN2_HI is exact for the n that occur here.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let floor = _mm256_set1_ps(-87.0);
    let keep = _mm256_cmp_ps::<_CMP_GE_OQ>(x, floor);
    let x = _mm256_max_ps(x, floor);
    let n =
        _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(x, _mm256_set1_ps(LOG2E)));
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HI), x);
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_LO), r);
    let mut p = _mm256_set1_ps(1.0 / 5040.0);
    for c in [1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
    }
    let pow2 = _mm256_slli_epi32::<23>(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)));
    _mm256_and_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(pow2)), keep)
}

/// `acc[d0 .. d0 + 8·NV] += Σ_j w[j] · V[offs[j]][d0 ..]`, the accumulator in registers across positions.
#[inline(always)]
unsafe fn accumulate<T: KvElem, const NV: usize>(acc: *mut f32, w: *const f32, vp: *const T, offs: &[usize]) {
    let mut a = [_mm256_setzero_ps(); NV];
    for (i, r) in a.iter_mut().enumerate() {
        *r = _mm256_loadu_ps(acc.add(8 * i));
    }
    for (j, &o) in offs.iter().enumerate() {
        let wj = _mm256_broadcast_ss(&*w.add(j));
        for (i, r) in a.iter_mut().enumerate() {
            *r = _mm256_fmadd_ps(wj, T::load8(vp.add(o + 8 * i)), *r);
        }
    }
    for (i, r) in a.iter().enumerate() {
        _mm256_storeu_ps(acc.add(8 * i), *r);
    }
}

/// Scores of query head `g` (`q`) against the tile's `padded` K rows at `kp + offs[p]` (rows from `tl` on are
/// masked), the online-softmax update of `st`'s head `g`, and the tile's weights left in `sc`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn score_tile<T: KvElem>(
    st: &mut Partial<'_>,
    g: usize,
    q: *const f32,
    kp: *const T,
    offs: &[usize],
    tl: usize,
    sc: *mut f32,
    scale: f32,
) {
    let hd = st.acc.len() / st.m.len();
    let padded = tl.div_ceil(8) * 8;
    for j0 in (0..padded).step_by(8) {
        let mut a = [_mm256_setzero_ps(); 8];
        for d in (0..hd).step_by(8) {
            let qv = _mm256_loadu_ps(q.add(d));
            for (p, r) in a.iter_mut().enumerate() {
                *r = _mm256_fmadd_ps(qv, T::load8(kp.add(offs[j0 + p] + d)), *r);
            }
        }
        _mm256_storeu_ps(sc.add(j0), _mm256_mul_ps(transpose_sum(&a), _mm256_set1_ps(scale)));
    }
    for j in tl..padded {
        *sc.add(j) = f32::NEG_INFINITY;
    }
    let mut mx = _mm256_loadu_ps(sc);
    for j0 in (8..padded).step_by(8) {
        mx = _mm256_max_ps(mx, _mm256_loadu_ps(sc.add(j0)));
    }
    let m_new = st.m[g].max(hmax(mx));
    if st.m[g] != m_new {
        // exp(-inf) = 0 clears the empty initial state.
        let corr = (st.m[g] - m_new).exp();
        st.l[g] *= corr;
        st.acc[g * hd..(g + 1) * hd].iter_mut().for_each(|a| *a *= corr);
        st.m[g] = m_new;
    }
    let mv = _mm256_set1_ps(m_new);
    let mut sum = _mm256_setzero_ps();
    for j0 in (0..padded).step_by(8) {
        let e = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(sc.add(j0)), mv));
        _mm256_storeu_ps(sc.add(j0), e);
        sum = _mm256_add_ps(sum, e);
    }
    st.l[g] += crate::vec::simd::hsum(sum);
}

/// `acc[..hd] += Σ_j w[j] · V[offs[j]]` for one head, 64, 32 or 8 dimensions at a time.
#[inline(always)]
unsafe fn accumulate_head<T: KvElem>(acc: *mut f32, w: *const f32, vp: *const T, offs: &[usize], hd: usize) {
    let mut d0 = 0;
    while d0 + 64 <= hd {
        accumulate::<T, 8>(acc.add(d0), w, vp.add(d0), offs);
        d0 += 64;
    }
    while d0 + 32 <= hd {
        accumulate::<T, 4>(acc.add(d0), w, vp.add(d0), offs);
        d0 += 32;
    }
    while d0 < hd {
        accumulate::<T, 1>(acc.add(d0), w, vp.add(d0), offs);
        d0 += 8;
    }
}

/// The cache offsets of the tile's `tl` positions from `t0`, then (up to a multiple of 8) its last one again:
/// valid reads whose scores are masked. Returns the padded count.
#[inline(always)]
fn tile_offsets<T: KvElem>(sp: &Span<'_, T>, t0: usize, tl: usize, offs: &mut [usize; TILE]) -> usize {
    let hd = sp.layout.head_dim;
    for (j, o) in offs[..tl].iter_mut().enumerate() {
        *o = sp.layout.offset((sp.slot_of)(t0 + j), sp.kvh);
        debug_assert!(*o + hd <= sp.k_cache.len() && *o + hd <= sp.v_cache.len());
    }
    let padded = tl.div_ceil(8) * 8;
    let last = offs[tl - 1];
    offs[tl..padded].fill(last);
    padded
}

/// Folds `sp` into `st` (see the portable `attend_range_impl`).
///
/// # Safety
/// AVX2, FMA and F16C available; `head_dim % 8 == 0`; every slot of `sp.range` lies inside both caches (what
/// `check` establishes for the block tables); `scores.len() ≥ group · TILE`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn attend_range<T: KvElem>(st: &mut Partial<'_>, sp: &Span<'_, T>, scores: &mut [f32]) {
    let hd = sp.layout.head_dim;
    let group = sp.qg.len() / hd;
    debug_assert!(hd.is_multiple_of(8) && scores.len() >= group * TILE);
    let (kp, vp) = (sp.k_cache.as_ptr(), sp.v_cache.as_ptr());
    let mut offs = [0usize; TILE];
    let mut t0 = sp.range.start;
    while t0 < sp.range.end {
        let tl = TILE.min(sp.range.end - t0);
        tile_offsets(sp, t0, tl, &mut offs);
        for g in 0..group {
            score_tile(st, g, sp.qg.as_ptr().add(g * hd), kp, &offs, tl, scores.as_mut_ptr().add(g * TILE), sp.scale);
        }
        for g in 0..group {
            accumulate_head(st.acc.as_mut_ptr().add(g * hd), scores.as_ptr().add(g * TILE), vp, &offs[..tl], hd);
        }
        t0 += tl;
    }
}

/// `attend_range` for several query tokens at once (a prefill block): token `i` (queries `qs[i]`, state in
/// `states`' `i`-th stretch, see `Partial::of`) over positions `start .. ends[i]`; `sp` gives the caches, kv
/// head and scale (its `qg` and `range` are not read). Each tile's K and V rows are converted to f32 once for
/// all of them; per token the operations and their order are `attend_range`'s on the same values, so the
/// results are bitwise its results.
///
/// # Safety
/// As `attend_range`, for every token's range; `scores.len() ≥ tokens · group · TILE`, `rows.len() ≥ 2 · TILE
/// · head_dim`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn attend_block<T: KvElem>(
    states: &mut [f32],
    qs: &[&[f32]],
    ends: &[usize],
    start: usize,
    sp: &Span<'_, T>,
    scores: &mut [f32],
    rows: &mut [f32],
) {
    let hd = sp.layout.head_dim;
    let group = qs[0].len() / hd;
    let stride = group * (hd + 2);
    debug_assert!(hd.is_multiple_of(8) && scores.len() >= qs.len() * group * TILE && rows.len() >= 2 * TILE * hd);
    let (kp, vp) = (sp.k_cache.as_ptr(), sp.v_cache.as_ptr());
    let (kb, vb) = rows.split_at_mut(TILE * hd);
    let mut offs = [0usize; TILE];
    let mut local = [0usize; TILE];
    for (j, o) in local.iter_mut().enumerate() {
        *o = j * hd;
    }
    let end = ends.iter().copied().max().unwrap_or(start);
    let mut t0 = start;
    while t0 < end {
        let tl = TILE.min(end - t0);
        let padded = tile_offsets(sp, t0, tl, &mut offs);
        for (j, &o) in offs[..padded].iter().enumerate() {
            for d in (0..hd).step_by(8) {
                _mm256_storeu_ps(kb.as_mut_ptr().add(j * hd + d), T::load8(kp.add(o + d)));
            }
        }
        for (j, &o) in offs[..tl].iter().enumerate() {
            for d in (0..hd).step_by(8) {
                _mm256_storeu_ps(vb.as_mut_ptr().add(j * hd + d), T::load8(vp.add(o + d)));
            }
        }
        for (i, buf) in states.chunks_exact_mut(stride).enumerate() {
            if ends[i] <= t0 {
                continue;
            }
            let st = &mut Partial::of(buf, group);
            let tli = tl.min(ends[i] - t0);
            let sc = scores.as_mut_ptr().add(i * group * TILE);
            for g in 0..group {
                let q = qs[i].as_ptr().add(g * hd);
                score_tile::<f32>(st, g, q, kb.as_ptr(), &local, tli, sc.add(g * TILE), sp.scale);
            }
            for g in 0..group {
                let acc = st.acc.as_mut_ptr().add(g * hd);
                accumulate_head::<f32>(acc, sc.add(g * TILE), vb.as_ptr(), &local[..tli], hd);
            }
        }
        t0 += tl;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_libm_over_the_softmax_range() {
        if !crate::vec::simd::has_avx2() {
            return;
        }
        #[target_feature(enable = "avx2,fma")]
        unsafe fn exp8(xs: &[f32; 8]) -> [f32; 8] {
            let mut got = [0f32; 8];
            _mm256_storeu_ps(got.as_mut_ptr(), exp_nonpositive(_mm256_loadu_ps(xs.as_ptr())));
            got
        }
        let mut worst = 0f64;
        let mut x = -90.0f32;
        while x <= 0.0 {
            let xs = [x, x * 0.5, x * 0.25, x * 0.125, x * 1e-3, x * 1e-6, -0.0, f32::NEG_INFINITY];
            // SAFETY: AVX2 and FMA detected above.
            let got = unsafe { exp8(&xs) };
            for (&xi, &g) in xs.iter().zip(&got) {
                let want = (xi as f64).exp();
                if xi < -87.0 {
                    assert_eq!(g, 0.0, "exp({xi})");
                } else {
                    let rel = ((g as f64 - want) / want).abs();
                    worst = worst.max(rel);
                }
            }
            x += 0.0137;
        }
        assert!(worst < 4e-7, "worst relative error {worst}");
    }
}
