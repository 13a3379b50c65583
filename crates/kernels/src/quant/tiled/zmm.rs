//! The integer kernels on 512-bit vectors (AVX-512 F, BW, VL and VNNI): two tiles at once.
//!
//! A vector holds the same word of two tiles, tile A (weight rows `r .. r + 8`) in lanes 0..8 and tile B (the
//! next eight rows) in lanes 8..16, so one `vpdpbusd` (8-bit activations) or `vpdpwssd` (16-bit) against the
//! broadcast activations does sixteen rows' products, each row in its own i32 lane, and one conversion and
//! one FMA apply sixteen rows' scales. The tile layout is the 256-bit kernels' (nothing is re-tiled); a run
//! with an odd count of tiles ends with one tile on the 256-bit VNNI kernel.
//!
//! Per (weight row, activation row) the integer block sums are the exact ones the 256-bit kernels compute
//! and the float operations are theirs in the same order, so the results are bitwise theirs (and so
//! independent of the batch).

use super::{check_bounds, tile_row_ymm, Out, TiledFormat, Widened, PREFETCH};
use crate::quant::{Q8Acts, QMatrix, BLOCK, TILE_ROWS};
use std::arch::x86_64::*;

/// `a` in the low 256 bits, `b` in the high ones.
#[inline(always)]
pub(super) unsafe fn join(a: __m256i, b: __m256i) -> __m512i {
    _mm512_inserti64x4(_mm512_castsi256_si512(a), b, 1)
}

/// `join` for f32.
#[inline(always)]
unsafe fn join_ps(a: __m256, b: __m256) -> __m512 {
    _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castpd256_pd512(_mm256_castps_pd(a)), _mm256_castps_pd(b), 1))
}

/// Q4_0 / Q4_1 words of two tiles: the 32 bytes at `a` and at `b` side by side, low nibbles (words `c`) and
/// high nibbles (words `c + 4`).
#[inline(always)]
pub(super) unsafe fn nibbles(a: *const u8, b: *const u8) -> [__m512i; 2] {
    let l = join(_mm256_loadu_si256(a as *const __m256i), _mm256_loadu_si256(b as *const __m256i));
    let mask = _mm512_set1_epi8(0x0F);
    [_mm512_and_si512(l, mask), _mm512_and_si512(_mm512_srli_epi16(l, 4), mask)]
}

/// `x` with the sign of `w` (`w`'s zero bytes leave `x`: their product with `|w|` is zero anyway).
#[inline(always)]
pub(super) unsafe fn sign_of(x: __m512i, w: __m512i) -> __m512i {
    _mm512_mask_sub_epi8(x, _mm512_movepi8_mask(w), _mm512_setzero_si512(), x)
}

/// Sixteen i16 pair sums of `|w|·x` with `w`'s sign moved onto `x` (`maddubs`, signed weights).
#[inline(always)]
unsafe fn signed_pairs(w: __m512i, x: __m512i) -> __m512i {
    _mm512_maddubs_epi16(_mm512_abs_epi8(w), sign_of(x, w))
}

/// Each row's four byte values `w0 w1 w2 w3` (a word, one per i32 lane) as i16 pairs: `(w0, w1)` and
/// `(w2, w3)` per lane, zero- or (`signed`) sign-extended.
#[inline(always)]
unsafe fn widen_pairs(w: __m512i, signed: bool) -> [__m512i; 2] {
    const Z: i8 = -128; // `vpshufb` zeroes the byte
    let (p, q) = if signed {
        // The byte into the high half of its i16, then an arithmetic shift.
        let p = _mm512_set4_epi32(
            i32::from_le_bytes([Z as u8, 12, Z as u8, 13]),
            i32::from_le_bytes([Z as u8, 8, Z as u8, 9]),
            i32::from_le_bytes([Z as u8, 4, Z as u8, 5]),
            i32::from_le_bytes([Z as u8, 0, Z as u8, 1]),
        );
        let q = _mm512_add_epi8(p, _mm512_set1_epi32(0x0200_0200));
        (_mm512_srai_epi16(_mm512_shuffle_epi8(w, p), 8), _mm512_srai_epi16(_mm512_shuffle_epi8(w, q), 8))
    } else {
        let p = _mm512_set4_epi32(
            i32::from_le_bytes([12, Z as u8, 13, Z as u8]),
            i32::from_le_bytes([8, Z as u8, 9, Z as u8]),
            i32::from_le_bytes([4, Z as u8, 5, Z as u8]),
            i32::from_le_bytes([0, Z as u8, 1, Z as u8]),
        );
        let q = _mm512_add_epi8(p, _mm512_set1_epi32(0x0002_0002));
        (_mm512_shuffle_epi8(w, p), _mm512_shuffle_epi8(w, q))
    };
    [p, q]
}

/// The `i`-th (unaligned) i32 at `p` in every lane.
#[inline(always)]
unsafe fn broadcast(p: *const i32, i: usize) -> __m512i {
    _mm512_set1_epi32(p.add(i).read_unaligned())
}

/// `rows_as` on 512-bit vectors: pairs of tiles, a last odd one on the 256-bit VNNI kernel.
#[inline(always)]
pub(super) unsafe fn rows_as512<F: TiledFormat, const WIDE: bool>(w: &QMatrix, r0: usize, acts: &Q8Acts, out: Out) {
    let (rows, nb) = (out.rows, check_bounds::<WIDE>(w, r0, acts, out));
    let mut i0 = 0;
    while i0 < rows {
        let (r, left) = (r0 + i0, rows - i0);
        let ta = w.tile_row(r / TILE_ROWS).as_ptr();
        if left <= TILE_ROWS {
            let mut dec = Widened::take::<WIDE>(nb, out.n);
            tile_row_ymm::<F, WIDE, true>(ta, nb, acts, out, r, left, dec.ptr());
            dec.done();
            break;
        }
        // More than eight rows left: the next tile row exists.
        let tb = w.tile_row(r / TILE_ROWS + 1).as_ptr();
        let valid = left.min(2 * TILE_ROWS);
        let mut t0 = 0;
        while out.n - t0 >= 4 {
            put16(out, r, valid, t0, &tile_sums512::<F, WIDE, 4>(ta, tb, nb, acts, t0));
            t0 += 4;
        }
        match out.n - t0 {
            3 => put16(out, r, valid, t0, &tile_sums512::<F, WIDE, 3>(ta, tb, nb, acts, t0)),
            2 => put16(out, r, valid, t0, &tile_sums512::<F, WIDE, 2>(ta, tb, nb, acts, t0)),
            1 => put16(out, r, valid, t0, &tile_sums512::<F, WIDE, 1>(ta, tb, nb, acts, t0)),
            _ => {}
        }
        i0 += 2 * TILE_ROWS;
    }
}

/// Writes (or adds, `out.add`) the first `valid` lanes of `sums[g]` (weight rows `r ..`) into activation row
/// `t0 + g` of `y`.
#[inline(always)]
unsafe fn put16(out: Out, r: usize, valid: usize, t0: usize, sums: &[__m512]) {
    let mask = if valid >= 16 { u16::MAX } else { (1u16 << valid) - 1 };
    for (g, s) in sums.iter().enumerate() {
        let dst = out.y.add((t0 + g) * out.m + r);
        let v = if out.add { _mm512_add_ps(_mm512_maskz_loadu_ps(mask, dst), *s) } else { *s };
        _mm512_mask_storeu_ps(dst, mask, v);
    }
}

/// Two rows of tiles (`ta`, `tb`: sixteen weight rows) against activation rows `t0 .. t0 + G`: lane `i` for
/// weight row `i`.
#[inline(always)]
#[allow(clippy::needless_range_loop)] // index loops over constant bounds: unrolled, registers
unsafe fn tile_sums512<F: TiledFormat, const WIDE: bool, const G: usize>(
    ta: *const u8,
    tb: *const u8,
    nb: usize,
    acts: &Q8Acts,
    t0: usize,
) -> [__m512; G] {
    let k = nb * BLOCK;
    let stride = F::block_stride();
    let (xq, xl, xd, xs) = (acts.qs.as_ptr(), acts.x16.as_ptr(), acts.d.as_ptr(), acts.s.as_ptr());
    // With fewer than three activation rows, four accumulators per row keep enough multiply-accumulates in
    // flight (they chain through their accumulator); otherwise two. Their lanes are added as integers.
    let spread = if G <= 2 { 2 } else { 0 };
    let mut facc = [_mm512_setzero_ps(); G];
    for b in 0..nb {
        for line in 0..stride.div_ceil(64) {
            let ahead = b * stride + PREFETCH + 64 * line;
            _mm_prefetch::<_MM_HINT_T0>(ta.wrapping_add(ahead) as *const i8);
            _mm_prefetch::<_MM_HINT_T0>(tb.wrapping_add(ahead) as *const i8);
        }
        let ((qa, da, ma), (qb, db, mb)) = (F::block_at(ta, b), F::block_at(tb, b));
        let (d, m) = (join_ps(da, db), join_ps(ma, mb));
        // Q6_K: each half's scales, `(s, s)` i16 per i32 lane, natural row order (both widths want that here).
        let halves = if F::HALVES {
            let ([a0, a1], [b0, b1]) = (F::half_scales(ta, b), F::half_scales(tb, b));
            [join(a0, b0), join(a1, b1)]
        } else {
            [_mm512_setzero_si512(); 2]
        };
        let mut acc = [[_mm512_setzero_si512(); 4]; G];
        for c in 0..4 {
            let [w0, w1] = F::words512(qa, qb, c);
            if WIDE {
                // Values (4c, 4c+1) and (4c+2, 4c+3) of word `c` as i16 pairs, then word `c + 4`'s.
                let [mut p0, mut q0] = widen_pairs(w0, F::SIGNED);
                let [mut p1, mut q1] = widen_pairs(w1, F::SIGNED);
                if F::HALVES {
                    let off = _mm512_set1_epi16(32);
                    p0 = _mm512_mullo_epi16(_mm512_sub_epi16(p0, off), halves[0]);
                    q0 = _mm512_mullo_epi16(_mm512_sub_epi16(q0, off), halves[0]);
                    p1 = _mm512_mullo_epi16(_mm512_sub_epi16(p1, off), halves[1]);
                    q1 = _mm512_mullo_epi16(_mm512_sub_epi16(q1, off), halves[1]);
                }
                for g in 0..G {
                    // The i16 activations as i32 pairs: (4c, 4c+1) is pair `2c`.
                    let xp = xl.add((t0 + g) * k + b * BLOCK) as *const i32;
                    let a = &mut acc[g];
                    a[0] = _mm512_dpwssd_epi32(a[0], p0, broadcast(xp, 2 * c));
                    a[1] = _mm512_dpwssd_epi32(a[1], q0, broadcast(xp, 2 * c + 1));
                    a[spread] = _mm512_dpwssd_epi32(a[spread], p1, broadcast(xp, 8 + 2 * c));
                    a[spread + 1] = _mm512_dpwssd_epi32(a[spread + 1], q1, broadcast(xp, 9 + 2 * c));
                }
            } else {
                let (s0, s1) = if F::HALVES {
                    let off = _mm512_set1_epi8(32);
                    (_mm512_sub_epi8(w0, off), _mm512_sub_epi8(w1, off))
                } else {
                    (w0, w1)
                };
                for g in 0..G {
                    let xp = xq.add((t0 + g) * k + b * BLOCK) as *const i32;
                    let (x0, x1) = (broadcast(xp, c), broadcast(xp, 4 + c));
                    let a = &mut acc[g];
                    if F::HALVES {
                        // One i16 accumulator per half, as the 256-bit kernel's.
                        a[0] = _mm512_add_epi16(a[0], signed_pairs(s0, x0));
                        a[1] = _mm512_add_epi16(a[1], signed_pairs(s1, x1));
                    } else {
                        let j = if spread > 0 { 2 * (c % 2) } else { 0 };
                        a[j] = F::dot512(a[j], w0, x0);
                        a[j + 1] = F::dot512(a[j + 1], w1, x1);
                    }
                }
            }
        }
        for g in 0..G {
            let t = t0 + g;
            let a = &acc[g];
            let sum = if WIDE && F::HALVES {
                // Q6_K: the (4c, 4c+1) and (4c+2, 4c+3) sums each reach 2 147 418 112, so they are added as
                // floats (the 256-bit kernel's two lanes of a row).
                let p = _mm512_add_epi32(a[0], a[2]);
                let q = _mm512_add_epi32(a[1], a[3]);
                _mm512_add_ps(_mm512_cvtepi32_ps(p), _mm512_cvtepi32_ps(q))
            } else if F::HALVES {
                _mm512_cvtepi32_ps(_mm512_add_epi32(
                    _mm512_madd_epi16(a[0], halves[0]),
                    _mm512_madd_epi16(a[1], halves[1]),
                ))
            } else {
                _mm512_cvtepi32_ps(_mm512_add_epi32(_mm512_add_epi32(a[0], a[1]), _mm512_add_epi32(a[2], a[3])))
            };
            let sc = _mm512_mul_ps(d, _mm512_set1_ps(*xd.add(t * nb + b)));
            facc[g] = _mm512_fmadd_ps(sc, sum, facc[g]);
            if F::HAS_MIN || F::ZERO != 0.0 {
                facc[g] = _mm512_fmadd_ps(m, _mm512_set1_ps(*xs.add(t * nb + b)), facc[g]);
            }
        }
    }
    facc
}
