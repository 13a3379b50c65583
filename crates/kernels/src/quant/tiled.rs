//! AVX2 kernels for every format, tiled (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, and the K-quants' 32-value blocks), with
//! 8-, 16-bit or f32 activations.
//!
//! A tile holds one 32-value block of eight weight rows, the rows' quantized values interleaved in 4-byte
//! words (see `quant::tile`; a K-quant tile is a super-block of eight rows, its header then eight such blocks). One 32-byte vector is then one word of each of the eight rows: four
//! consecutive values per row. Broadcasting the matching four activation values against it (`maddubs`,
//! `vpdpbusd`, or `madd` on 16-bit values) puts each row's products in that row's own lane, so a block's
//! eight integer sums come out with no horizontal folding, and one conversion and one FMA apply eight
//! rows' scales at once. A tile's weight vectors, once decoded, serve up to four activation rows (a batch of
//! eight decodes each tile twice).
//!
//! Each (weight row, activation row) pair runs the same operations in the same order whatever the batch:
//! its block sums are exact integers, and its lane accumulates `d·dx·Σq·qx`, then `m·s`, block by block.

use super::{
    Q8Acts, QMatrix, QuantFormat, A4_QS, BLOCK, K4_MINS, K4_QS, K4_SCALES, K4_TILE, K6_BLOCK, K6_BLOCKS, K6_SCALES,
    K6_TILE, SUPER, TILE_ROWS,
};
use std::arch::x86_64::*;

/// Bytes ahead of the block being read that each block's prefetches touch. The hardware prefetcher alone left
/// a decode pass at 10–15 GiB/s of the machine's 25 (2 threads): each thread has a few hundred bytes of loads
/// in flight while it computes, where streaming at full speed needs a kilobyte or two. 3 KiB ahead took
/// SmolLM2's pass from 14.7 to 17–19 GiB/s (criterion `decode_pass`; 0.5–6 KiB all helped, within noise).
const PREFETCH: usize = 3072;

/// A tiled format as the kernels read it. Words `c` and `c + 4` of a block (`c` in 0..4) hold values
/// `4c .. 4c + 4` and `16 + 4c .. 16 + 4c + 4` of each row.
trait TiledFormat {
    const FORMAT: QuantFormat;
    /// Whether a block has a min of its own (Q4_1, Q5_1: stored after the scales; Q4_K) rather than `ZERO·d`.
    const HAS_MIN: bool;
    /// Without a stored min: `m = ZERO·d` (Q4_0: −8; Q8_0: 0, no min term).
    const ZERO: f32;
    /// How many steps of the block loop (two `pairs` results each) can be summed in i16 lanes without
    /// overflow before they are widened to i32; 0: none.
    const FOLD: usize;
    /// Whether `words` gives signed bytes (Q8_0) rather than unsigned ones.
    const SIGNED: bool = false;
    /// Whether a block is two 16-value halves with i8 scales of their own (Q6_K): words `c` (values 0..16) take
    /// the first, words `c + 4` the second. `words` then gives unsigned values with an offset of 32.
    const HALVES: bool = false;
    /// (`HALVES`) Block `b`'s eight rows' scales of each half as i32 lanes `(s, s)` of i16 (natural row order).
    #[inline(always)]
    unsafe fn half_scales(_tiles: *const u8, _b: usize) -> [__m256i; 2] {
        [_mm256_setzero_si256(); 2]
    }
    /// (`HALVES`) Block `b`'s eight rows' scales of each half as f32 (natural row order).
    #[inline(always)]
    unsafe fn f32_half_scales(_tiles: *const u8, _b: usize) -> [__m256; 2] {
        [_mm256_setzero_ps(); 2]
    }
    /// Whether `words16` gives rows 0..4 and rows 4..8 (so a 16-bit block sum's lanes are rows 0 1 4 5 |
    /// 2 3 6 7, see `wide_order`) rather than the in-lane order.
    const WIDE_PERMUTED: bool = false;
    /// Words `c` and `c + 4` of the eight rows, as bytes.
    unsafe fn words(q: *const u8, c: usize) -> [__m256i; 2];
    /// Words `c` and `c + 4` widened to i16, within 128-bit lanes: word `c` of rows 0, 1 | 4, 5, of rows
    /// 2, 3 | 6, 7, then word `c + 4`'s. Two i32 lanes per row; `hadd` of the two accumulators gives rows
    /// 0..8 in order.
    #[inline(always)]
    unsafe fn words16(q: *const u8, c: usize) -> [__m256i; 4] {
        let [a, b] = Self::words(q, c);
        let [a0, a1] = widen16(a);
        let [b0, b1] = widen16(b);
        [a0, a1, b0, b1]
    }
    /// Block `b` of a row of tiles: its quantized values, and the eight rows' scales and mins (`m`, or
    /// `ZERO·d`). The default reads a 32-value format's tile.
    #[inline(always)]
    unsafe fn block_at(tiles: *const u8, b: usize) -> (*const u8, __m256, __m256) {
        let tile = tiles.add(b * Self::FORMAT.tile_bytes());
        let d = _mm256_cvtph_ps(_mm_loadu_si128(tile as *const __m128i));
        let m = if Self::HAS_MIN {
            _mm256_cvtph_ps(_mm_loadu_si128(tile.add(2 * TILE_ROWS) as *const __m128i))
        } else {
            _mm256_mul_ps(d, _mm256_set1_ps(Self::ZERO))
        };
        (tile.add(Self::FORMAT.tile_qs()), d, m)
    }
    /// Bytes of a row of tiles per 32-value block (how far ahead to prefetch per block).
    #[inline(always)]
    fn block_stride() -> usize {
        Self::FORMAT.tile_bytes()
    }
    /// Sixteen i16 sums of adjacent products with four broadcast activation bytes (`maddubs`; the default
    /// takes `w` as unsigned bytes).
    #[inline(always)]
    unsafe fn pairs(w: __m256i, x: __m256i) -> __m256i {
        _mm256_maddubs_epi16(w, x)
    }
    /// `acc` plus each lane's four products (`vpdpbusd`; the default takes `w` as unsigned bytes).
    #[inline(always)]
    unsafe fn dot_vnni(acc: __m256i, w: __m256i, x: __m256i) -> __m256i {
        _mm256_dpbusd_epi32(acc, w, x)
    }
    /// (512-bit) `words` of two tiles' blocks at `qa` and `qb`: tile A's rows in lanes 0..8, B's in 8..16.
    #[inline(always)]
    unsafe fn words512(qa: *const u8, qb: *const u8, c: usize) -> [__m512i; 2] {
        let ([a0, a1], [b0, b1]) = (Self::words(qa, c), Self::words(qb, c));
        [zmm::join(a0, b0), zmm::join(a1, b1)]
    }
    /// (512-bit) `dot_vnni` on 64 bytes.
    #[inline(always)]
    unsafe fn dot512(acc: __m512i, w: __m512i, x: __m512i) -> __m512i {
        _mm512_dpbusd_epi32(acc, w, x)
    }
}

mod zmm;
use zmm::rows_as512;

/// Eight bytes at `p` as eight f32 (unsigned).
#[inline(always)]
unsafe fn u8x8_ps(p: *const u8) -> __m256 {
    _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(p as *const __m128i)))
}

/// Eight i8 at `p` as i32 lanes.
#[inline(always)]
unsafe fn i8x8_epi32(p: *const u8) -> __m256i {
    _mm256_cvtepi8_epi32(_mm_loadl_epi64(p as *const __m128i))
}

/// The low and high eight (unsigned) bytes of each 128-bit lane widened to i16: in-lane unpacks, no lane
/// crossing. (Q8_0, the signed format, widens its own: sign extension straight from memory is cheaper.)
#[inline(always)]
unsafe fn widen16(v: __m256i) -> [__m256i; 2] {
    let zero = _mm256_setzero_si256();
    [_mm256_unpacklo_epi8(v, zero), _mm256_unpackhi_epi8(v, zero)]
}

/// Q4_0 (`MIN` false, `m = −8·d`) and Q4_1: a 32-byte vector holds word `c` in its low nibbles and word
/// `c + 4` in its high ones (the file's byte `j` holds values `j` and `j + 16`).
struct Nibbles<const MIN: bool>;
impl<const MIN: bool> TiledFormat for Nibbles<MIN> {
    const FORMAT: QuantFormat = if MIN { QuantFormat::Q4_1 } else { QuantFormat::Q4_0 };
    const HAS_MIN: bool = MIN;
    const ZERO: f32 = -8.0;
    /// Values ≤ 15 and |x| ≤ 127: a block's eight pair sums stay within ±30 480.
    const FOLD: usize = 4;
    #[inline(always)]
    unsafe fn words(q: *const u8, c: usize) -> [__m256i; 2] {
        let l = _mm256_loadu_si256(q.add(32 * c) as *const __m256i);
        let mask = _mm256_set1_epi8(0x0F);
        [_mm256_and_si256(l, mask), _mm256_and_si256(_mm256_srli_epi16(l, 4), mask)]
    }
    #[inline(always)]
    unsafe fn words512(qa: *const u8, qb: *const u8, c: usize) -> [__m512i; 2] {
        zmm::nibbles(qa.add(32 * c), qb.add(32 * c))
    }
}

/// Q4_K: each 32-value sub-block's nibbles tiled as Q4_1's (see `quant::tile_q4k`), with scale `d·s` and min
/// `−dmin·m` per row (exact f32 products: the values the portable decoder gives).
struct K4;
impl TiledFormat for K4 {
    const FORMAT: QuantFormat = QuantFormat::Q4_K;
    const HAS_MIN: bool = true;
    const ZERO: f32 = 0.0;
    const FOLD: usize = 4;
    #[inline(always)]
    unsafe fn words(q: *const u8, c: usize) -> [__m256i; 2] {
        Nibbles::<true>::words(q, c)
    }
    #[inline(always)]
    unsafe fn words512(qa: *const u8, qb: *const u8, c: usize) -> [__m512i; 2] {
        Nibbles::<true>::words512(qa, qb, c)
    }
    #[inline(always)]
    unsafe fn block_at(tiles: *const u8, b: usize) -> (*const u8, __m256, __m256) {
        let (t, j) = (tiles.add(b / (SUPER / BLOCK) * K4_TILE), b % (SUPER / BLOCK));
        let d = _mm256_cvtph_ps(_mm_loadu_si128(t as *const __m128i));
        let dmin = _mm256_cvtph_ps(_mm_loadu_si128(t.add(2 * TILE_ROWS) as *const __m128i));
        let m = _mm256_mul_ps(dmin, u8x8_ps(t.add(K4_MINS + 8 * j)));
        (
            t.add(K4_QS + 128 * j),
            _mm256_mul_ps(d, u8x8_ps(t.add(K4_SCALES + 8 * j))),
            _mm256_xor_ps(m, _mm256_set1_ps(-0.0)),
        )
    }
    #[inline(always)]
    fn block_stride() -> usize {
        K4_TILE / (SUPER / BLOCK)
    }
}

/// The `A4` formats (see `quant::tile_a4`): `N` 32-value sub-blocks per tile, tiled as Q4_1's nibbles, sharing
/// the tile's eight scales and mins: a sub-block computes exactly as a Q4_1 block with those.
struct A4<const N: usize>;
impl<const N: usize> TiledFormat for A4<N> {
    const FORMAT: QuantFormat = if N == 2 { QuantFormat::A4_64 } else { QuantFormat::A4_128 };
    const HAS_MIN: bool = true;
    const ZERO: f32 = 0.0;
    const FOLD: usize = 4;
    #[inline(always)]
    unsafe fn words(q: *const u8, c: usize) -> [__m256i; 2] {
        Nibbles::<true>::words(q, c)
    }
    #[inline(always)]
    unsafe fn words512(qa: *const u8, qb: *const u8, c: usize) -> [__m512i; 2] {
        Nibbles::<true>::words512(qa, qb, c)
    }
    #[inline(always)]
    unsafe fn block_at(tiles: *const u8, b: usize) -> (*const u8, __m256, __m256) {
        let t = tiles.add(b / N * (A4_QS + 128 * N));
        let d = _mm256_cvtph_ps(_mm_loadu_si128(t as *const __m128i));
        let m = _mm256_cvtph_ps(_mm_loadu_si128(t.add(2 * TILE_ROWS) as *const __m128i));
        (t.add(A4_QS + 128 * (b % N)), d, m)
    }
    #[inline(always)]
    fn block_stride() -> usize {
        (A4_QS + 128 * N) / N
    }
}

/// Q6_K (see `quant::tile_q6k`): each 32-value block's low four bits tiled as Q4_1's nibbles and the top two
/// bits in two vectors (word vector `c`'s in nibble `c % 2` of vector `c / 2`: bits 0..2 for word `c`, 2..4 for
/// word `c + 4`); values `q − 32` times the half's scale, times `d`.
struct K6;
impl TiledFormat for K6 {
    const FORMAT: QuantFormat = QuantFormat::Q6_K;
    const HAS_MIN: bool = false;
    const ZERO: f32 = 0.0;
    /// Unused: the halves keep their own accumulators, and their own product (`HALVES` in `tile_sums`).
    const FOLD: usize = 0;
    const HALVES: bool = true;
    #[inline(always)]
    unsafe fn words(q: *const u8, c: usize) -> [__m256i; 2] {
        let [lo, hi] = Nibbles::<false>::words(q, c);
        let hv = _mm256_loadu_si256(q.add(128 + 32 * (c / 2)) as *const __m256i);
        let hv = if c % 2 == 1 { _mm256_srli_epi16(hv, 4) } else { hv };
        // Bits 0..2 and 2..4 of each byte moved to bits 4..6 (the mask drops what crossed bytes).
        let top = _mm256_set1_epi8(0x30);
        [
            _mm256_or_si256(lo, _mm256_and_si256(_mm256_slli_epi16(hv, 4), top)),
            _mm256_or_si256(hi, _mm256_and_si256(_mm256_slli_epi16(hv, 2), top)),
        ]
    }
    #[inline(always)]
    unsafe fn block_at(tiles: *const u8, b: usize) -> (*const u8, __m256, __m256) {
        let (t, j) = (tiles.add(b / (SUPER / BLOCK) * K6_TILE), b % (SUPER / BLOCK));
        let d = _mm256_cvtph_ps(_mm_loadu_si128(t as *const __m128i));
        (t.add(K6_BLOCKS + K6_BLOCK * j), d, _mm256_setzero_ps())
    }
    #[inline(always)]
    fn block_stride() -> usize {
        K6_TILE / (SUPER / BLOCK)
    }
    #[inline(always)]
    unsafe fn half_scales(tiles: *const u8, b: usize) -> [__m256i; 2] {
        let (t, j) = (tiles.add(b / (SUPER / BLOCK) * K6_TILE), b % (SUPER / BLOCK));
        let mut out = [_mm256_setzero_si256(); 2];
        for (h, o) in out.iter_mut().enumerate() {
            let s = i8x8_epi32(t.add(K6_SCALES + 8 * (2 * j + h)));
            *o = _mm256_or_si256(_mm256_and_si256(s, _mm256_set1_epi32(0xFFFF)), _mm256_slli_epi32(s, 16));
        }
        out
    }
    #[inline(always)]
    unsafe fn f32_half_scales(tiles: *const u8, b: usize) -> [__m256; 2] {
        let (t, j) = (tiles.add(b / (SUPER / BLOCK) * K6_TILE), b % (SUPER / BLOCK));
        let s = t.add(K6_SCALES + 16 * j);
        [_mm256_cvtepi32_ps(i8x8_epi32(s)), _mm256_cvtepi32_ps(i8x8_epi32(s.add(8)))]
    }
}

/// Q5_0 (`MIN` false, `m = −16·d`) and Q5_1: nibbles as `Nibbles`, and the high bits' plane (32 bytes
/// before the nibbles) holds bit 4 of byte `j` of word vector `i` as its byte `j`'s bit `i`.
struct Five<const MIN: bool>;
impl<const MIN: bool> TiledFormat for Five<MIN> {
    const FORMAT: QuantFormat = if MIN { QuantFormat::Q5_1 } else { QuantFormat::Q5_0 };
    const HAS_MIN: bool = MIN;
    const ZERO: f32 = -16.0;
    /// Values ≤ 31 and |x| ≤ 127: four pair sums stay within ±31 496.
    const FOLD: usize = 2;
    #[inline(always)]
    unsafe fn words(q: *const u8, c: usize) -> [__m256i; 2] {
        let [lo, hi] = Nibbles::<MIN>::words(q, c);
        let plane = _mm256_loadu_si256(q.sub(32) as *const __m256i);
        // Bit `c` (word `c`) and bit `c + 4` (word `c + 4`) of each byte moved to bit 4: 16-bit shifts, then
        // the mask drops what crossed from the neighbouring byte.
        let (a, b) = match c {
            0 => (_mm256_slli_epi16(plane, 4), plane),
            1 => (_mm256_slli_epi16(plane, 3), _mm256_srli_epi16(plane, 1)),
            2 => (_mm256_slli_epi16(plane, 2), _mm256_srli_epi16(plane, 2)),
            _ => (_mm256_slli_epi16(plane, 1), _mm256_srli_epi16(plane, 3)),
        };
        let bit4 = _mm256_set1_epi8(0x10);
        [_mm256_or_si256(lo, _mm256_and_si256(a, bit4)), _mm256_or_si256(hi, _mm256_and_si256(b, bit4))]
    }
}

/// Q8_0: eight 32-byte vectors of signed values, word `c` in vector `c`.
struct Bytes;
impl TiledFormat for Bytes {
    const FORMAT: QuantFormat = QuantFormat::Q8_0;
    const HAS_MIN: bool = false;
    const ZERO: f32 = 0.0;
    /// A pair sum reaches 2·128·127 = 32 512: no room for a second one.
    const FOLD: usize = 0;
    const SIGNED: bool = true;
    const WIDE_PERMUTED: bool = true;
    #[inline(always)]
    unsafe fn words(q: *const u8, c: usize) -> [__m256i; 2] {
        let p = q as *const __m256i;
        [_mm256_loadu_si256(p.add(c)), _mm256_loadu_si256(p.add(c + 4))]
    }
    /// Rows 0..4 and rows 4..8 of each word, sign-extended straight from memory.
    #[inline(always)]
    unsafe fn words16(q: *const u8, c: usize) -> [__m256i; 4] {
        let mut out = [_mm256_setzero_si256(); 4];
        for (o, i) in out.iter_mut().zip([2 * c, 2 * c + 1, 2 * c + 8, 2 * c + 9]) {
            *o = _mm256_cvtepi8_epi16(_mm_loadu_si128(q.add(16 * i) as *const __m128i));
        }
        out
    }
    /// `|w|` (unsigned) times `x` with `w`'s sign moved onto it.
    #[inline(always)]
    unsafe fn pairs(w: __m256i, x: __m256i) -> __m256i {
        _mm256_maddubs_epi16(_mm256_abs_epi8(w), _mm256_sign_epi8(x, w))
    }
    #[inline(always)]
    unsafe fn dot_vnni(acc: __m256i, w: __m256i, x: __m256i) -> __m256i {
        _mm256_dpbusd_epi32(acc, _mm256_abs_epi8(w), _mm256_sign_epi8(x, w))
    }
    #[inline(always)]
    unsafe fn dot512(acc: __m512i, w: __m512i, x: __m512i) -> __m512i {
        _mm512_dpbusd_epi32(acc, _mm512_abs_epi8(w), zmm::sign_of(x, w))
    }
}

/// `y[t * m + r] = Σ w[r]·x̂[t]` for the weight rows `r0 .. r0 + rows` (`r0` a multiple of 8) and every
/// activation row `t` of `acts` (`n` rows); `y` is `[n, m]`, `m = w.rows()`.
///
/// SAFETY (caller): AVX2, FMA and F16C available; `w` is tiled; `acts` holds `n` rows of `w.cols()` values
/// with their per-block scales and sums; the rows exist in `w`; `y` points to `n · m` floats that nothing
/// else reads or writes at these places meanwhile.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn rows_tiled(w: &QMatrix, r0: usize, rows: usize, acts: &Q8Acts, n: usize, y: Dst) {
    by_format::<Ymm<false>>(w, r0, rows, acts, n, y)
}

/// `rows_tiled` with VNNI dot products: the same integer sums, so bitwise the same results.
///
/// SAFETY (caller): as `rows_tiled`, and AVX512-VNNI with AVX512-VL available.
#[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl")]
pub unsafe fn rows_tiled_vnni(w: &QMatrix, r0: usize, rows: usize, acts: &Q8Acts, n: usize, y: Dst) {
    by_format::<Ymm<true>>(w, r0, rows, acts, n, y)
}

/// `rows_tiled` on 512-bit vectors (see `tile_sums512`): the same integer sums and float operations per
/// (weight row, activation row), so bitwise the same results.
///
/// SAFETY (caller): as `rows_tiled`, and AVX512 F, BW, VL and VNNI available.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub unsafe fn rows_tiled_512(w: &QMatrix, r0: usize, rows: usize, acts: &Q8Acts, n: usize, y: Dst) {
    by_format::<Zmm>(w, r0, rows, acts, n, y)
}

/// A kernel over whole rows of tiles, for any format and activation width (what `by_format` picks).
trait Rows {
    unsafe fn rows<F: TiledFormat, const WIDE: bool>(w: &QMatrix, r0: usize, acts: &Q8Acts, out: Out);
}

/// The 256-bit kernels (`VNNI`: with `vpdpbusd` / `vpdpwssd`).
struct Ymm<const VNNI: bool>;
impl<const VNNI: bool> Rows for Ymm<VNNI> {
    #[inline(always)]
    unsafe fn rows<F: TiledFormat, const WIDE: bool>(w: &QMatrix, r0: usize, acts: &Q8Acts, out: Out) {
        rows_as::<F, WIDE, VNNI>(w, r0, acts, out)
    }
}

/// The 512-bit kernels: two tiles per vector.
struct Zmm;
impl Rows for Zmm {
    #[inline(always)]
    unsafe fn rows<F: TiledFormat, const WIDE: bool>(w: &QMatrix, r0: usize, acts: &Q8Acts, out: Out) {
        rows_as512::<F, WIDE>(w, r0, acts, out)
    }
}

/// Runs `R`'s kernel for `w`'s format and the activations' width.
#[inline(always)]
unsafe fn by_format<R: Rows>(w: &QMatrix, r0: usize, rows: usize, acts: &Q8Acts, n: usize, y: Dst) {
    let out = Out { y: y.y, add: y.add, m: w.rows, rows, n };
    match (w.format, acts.is_wide()) {
        (QuantFormat::Q4_0, false) => R::rows::<Nibbles<false>, false>(w, r0, acts, out),
        (QuantFormat::Q4_0, true) => R::rows::<Nibbles<false>, true>(w, r0, acts, out),
        (QuantFormat::Q4_1, false) => R::rows::<Nibbles<true>, false>(w, r0, acts, out),
        (QuantFormat::Q4_1, true) => R::rows::<Nibbles<true>, true>(w, r0, acts, out),
        (QuantFormat::Q5_0, false) => R::rows::<Five<false>, false>(w, r0, acts, out),
        (QuantFormat::Q5_0, true) => R::rows::<Five<false>, true>(w, r0, acts, out),
        (QuantFormat::Q5_1, false) => R::rows::<Five<true>, false>(w, r0, acts, out),
        (QuantFormat::Q5_1, true) => R::rows::<Five<true>, true>(w, r0, acts, out),
        (QuantFormat::Q8_0, false) => R::rows::<Bytes, false>(w, r0, acts, out),
        (QuantFormat::Q8_0, true) => R::rows::<Bytes, true>(w, r0, acts, out),
        (QuantFormat::Q4_K, false) => R::rows::<K4, false>(w, r0, acts, out),
        (QuantFormat::Q4_K, true) => R::rows::<K4, true>(w, r0, acts, out),
        (QuantFormat::Q6_K, false) => R::rows::<K6, false>(w, r0, acts, out),
        (QuantFormat::Q6_K, true) => R::rows::<K6, true>(w, r0, acts, out),
        (QuantFormat::A4_64, false) => R::rows::<A4<2>, false>(w, r0, acts, out),
        (QuantFormat::A4_64, true) => R::rows::<A4<2>, true>(w, r0, acts, out),
        (QuantFormat::A4_128, false) => R::rows::<A4<4>, false>(w, r0, acts, out),
        (QuantFormat::A4_128, true) => R::rows::<A4<4>, true>(w, r0, acts, out),
    }
}

/// The `[n, m]` output of a tiled kernel: results are stored into `y`, or added to what it holds (`add`).
#[derive(Clone, Copy)]
pub struct Dst {
    pub y: *mut f32,
    pub add: bool,
}

// SAFETY: a `Dst` is shared by the tasks of one product, and the kernels' contract (`rows_tiled`) keeps their
// writes to disjoint places.
unsafe impl Sync for Dst {}

/// Where a task's results go: `y` (`[n, m]`; stored, or added with `add`), for `rows` weight rows.
#[derive(Clone, Copy)]
struct Out {
    y: *mut f32,
    add: bool,
    m: usize,
    rows: usize,
    n: usize,
}

#[inline(always)]
unsafe fn rows_as<F: TiledFormat, const WIDE: bool, const VNNI: bool>(w: &QMatrix, r0: usize, acts: &Q8Acts, out: Out) {
    let (rows, nb) = (out.rows, check_bounds::<WIDE>(w, r0, acts, out));
    let mut dec = Widened::take::<WIDE>(nb, out.n);
    for i0 in (0..rows).step_by(TILE_ROWS) {
        let tiles = w.tile_row((r0 + i0) / TILE_ROWS).as_ptr();
        tile_row_ymm::<F, WIDE, VNNI>(tiles, nb, acts, out, r0 + i0, (rows - i0).min(TILE_ROWS), dec.ptr());
    }
    dec.done();
}

/// This thread's buffer for a row of tiles' widened 16-bit weights (`decode16`), taken out of the
/// thread-local for one task (so no other user can touch it meanwhile) and put back by `done`; empty when
/// the product does not widen (8-bit activations, or four activation rows or fewer: one pass per tile row).
pub(super) struct Widened(Vec<__m256i>);

impl Widened {
    #[inline(always)]
    pub(super) fn take<const WIDE: bool>(nb: usize, n: usize) -> Self {
        if !(WIDE && n > 4) {
            return Self(Vec::new());
        }
        let mut v = DECODED.take();
        // Only ever grown (`decode16` writes the `nb · 16` vectors a task reads), so alternating matrices of
        // different widths do not zero it again each time. SAFETY: an all-zero __m256i is a valid value.
        if v.len() < nb * 16 {
            v.resize_with(nb * 16, || unsafe { std::mem::zeroed() });
        }
        Self(v)
    }

    #[inline(always)]
    pub(super) fn ptr(&mut self) -> *mut __m256i {
        self.0.as_mut_ptr()
    }

    #[inline(always)]
    pub(super) fn done(self) {
        if !self.0.is_empty() {
            DECODED.set(self.0);
        }
    }
}

/// Checks what keeps the kernels' raw pointers in range (whole tiles of `w`, `n` rows of activations);
/// returns the blocks per row.
#[inline(always)]
fn check_bounds<const WIDE: bool>(w: &QMatrix, r0: usize, acts: &Q8Acts, out: Out) -> usize {
    let (nb, n) = (w.cols / BLOCK, out.n);
    assert!(r0.is_multiple_of(TILE_ROWS) && r0 + out.rows <= w.rows, "tiled tasks cover whole tiles of `w`");
    let values = if WIDE { acts.x16.len() } else { acts.qs.len() };
    assert!(acts.k == w.cols && values >= n * w.cols && acts.d.len() >= n * nb && acts.s.len() >= n * nb);
    nb
}

/// One row of tiles (weight rows `r ..`, `valid` of them) against every activation row, four at a time.
/// With 16-bit activations and more than four rows, the tile row's weights are widened once into `dec`
/// (`Widened`: `nb · 16` vectors) and every pass reads them from there.
#[inline(always)]
unsafe fn tile_row_ymm<F: TiledFormat, const WIDE: bool, const VNNI: bool>(
    tiles: *const u8,
    nb: usize,
    acts: &Q8Acts,
    out: Out,
    r: usize,
    valid: usize,
    dec: *mut __m256i,
) {
    if WIDE && out.n > 4 {
        decode16::<F>(tiles, nb, dec);
        tile_passes::<F, WIDE, VNNI, true>(tiles, nb, acts, out, r, valid, dec);
    } else {
        tile_passes::<F, WIDE, VNNI, false>(tiles, nb, acts, out, r, valid, std::ptr::null());
    }
}

thread_local! {
    /// A row of tiles' 16-bit weights (`decode16`), reused across calls.
    static DECODED: std::cell::RefCell<Vec<__m256i>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `tile_sums` over every activation row, four at a time (`DEC`: the weights come widened in `dec`).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn tile_passes<F: TiledFormat, const WIDE: bool, const VNNI: bool, const DEC: bool>(
    tiles: *const u8,
    nb: usize,
    acts: &Q8Acts,
    out: Out,
    r: usize,
    valid: usize,
    dec: *const __m256i,
) {
    let n = out.n;
    let mut t0 = 0;
    while n - t0 >= 4 {
        put(out, r, valid, t0, &tile_sums::<F, WIDE, VNNI, DEC, 4>(tiles, nb, acts, t0, dec));
        t0 += 4;
    }
    match n - t0 {
        3 => put(out, r, valid, t0, &tile_sums::<F, WIDE, VNNI, DEC, 3>(tiles, nb, acts, t0, dec)),
        2 => put(out, r, valid, t0, &tile_sums::<F, WIDE, VNNI, DEC, 2>(tiles, nb, acts, t0, dec)),
        1 => put(out, r, valid, t0, &tile_sums::<F, WIDE, VNNI, DEC, 1>(tiles, nb, acts, t0, dec)),
        _ => {}
    }
}

/// Prefetches the lines `PREFETCH` bytes past block `b` of a row of tiles (`stride` bytes a block). Prefetches
/// never fault, so running past the matrix is fine.
#[inline(always)]
unsafe fn prefetch_ahead(tiles: *const u8, b: usize, stride: usize) {
    for line in 0..stride.div_ceil(64) {
        _mm_prefetch::<_MM_HINT_T0>(tiles.wrapping_add(b * stride + PREFETCH + 64 * line) as *const i8);
    }
}

/// Q6_K: block `b`'s half scales in the 16-bit words' row order (rows 0, 1, 4, 5 and 2, 3, 6, 7, four values a
/// row), where they multiply the weights `q − 32` (|·| ≤ 4096).
#[inline(always)]
unsafe fn wide_scales<F: TiledFormat>(tiles: *const u8, b: usize) -> [__m256i; 4] {
    let halves = F::half_scales(tiles, b);
    let (ra, rb) = (_mm256_setr_epi32(0, 0, 1, 1, 4, 4, 5, 5), _mm256_setr_epi32(2, 2, 3, 3, 6, 6, 7, 7));
    [
        _mm256_permutevar8x32_epi32(halves[0], ra),
        _mm256_permutevar8x32_epi32(halves[0], rb),
        _mm256_permutevar8x32_epi32(halves[1], ra),
        _mm256_permutevar8x32_epi32(halves[1], rb),
    ]
}

/// Words `c` and `c + 4` of a block as the 16-bit kernel multiplies them (`words16`; Q6_K: `(q − 32)·s`).
#[inline(always)]
unsafe fn words16_scaled<F: TiledFormat>(q: *const u8, c: usize, scales: &[__m256i; 4]) -> [__m256i; 4] {
    let mut wv = F::words16(q, c);
    if F::HALVES {
        for (w, s) in wv.iter_mut().zip(scales) {
            *w = _mm256_mullo_epi16(_mm256_sub_epi16(*w, _mm256_set1_epi16(32)), *s);
        }
    }
    wv
}

/// Every block's `words16_scaled` of a row of tiles into `dec`: 16 vectors per block, word `c`'s four at
/// `16b + 4c`.
#[inline(always)]
unsafe fn decode16<F: TiledFormat>(tiles: *const u8, nb: usize, dec: *mut __m256i) {
    let stride = F::block_stride();
    for b in 0..nb {
        prefetch_ahead(tiles, b, stride);
        let (q, _, _) = F::block_at(tiles, b);
        let scales = if F::HALVES { wide_scales::<F>(tiles, b) } else { [_mm256_setzero_si256(); 4] };
        for c in 0..4 {
            for (i, w) in words16_scaled::<F>(q, c, &scales).into_iter().enumerate() {
                _mm256_store_si256(dec.add(16 * b + 4 * c + i), w);
            }
        }
    }
}

/// Writes (or adds, `out.add`) the first `valid` lanes of `sums[g]` (weight rows `r ..`) into activation row
/// `t0 + g` of `y`.
#[inline(always)]
unsafe fn put(out: Out, r: usize, valid: usize, t0: usize, sums: &[__m256]) {
    for (g, s) in sums.iter().enumerate() {
        let dst = out.y.add((t0 + g) * out.m + r);
        if valid == TILE_ROWS {
            let v = if out.add { _mm256_add_ps(_mm256_loadu_ps(dst), *s) } else { *s };
            _mm256_storeu_ps(dst, v);
        } else {
            let mut lanes = [0f32; TILE_ROWS];
            _mm256_storeu_ps(lanes.as_mut_ptr(), *s);
            for (i, v) in lanes[..valid].iter().enumerate() {
                *dst.add(i) = if out.add { *dst.add(i) + v } else { *v };
            }
        }
    }
}

/// Lane order of a 16-bit block sum when `words16` gives rows 0..4 and 4..8: rows 0 1 4 5 | 2 3 6 7. Its
/// own inverse.
#[inline(always)]
unsafe fn wide_order() -> __m256i {
    _mm256_setr_epi32(0, 1, 4, 5, 2, 3, 6, 7)
}

/// One row of tiles (`nb` blocks of eight weight rows) against activation rows `t0 .. t0 + G`: eight
/// results per activation row, lane `i` for weight row `i`.
#[inline(always)]
#[allow(clippy::needless_range_loop)] // index loops over constant bounds: unrolled, registers
unsafe fn tile_sums<F: TiledFormat, const WIDE: bool, const VNNI: bool, const DEC: bool, const G: usize>(
    tiles: *const u8,
    nb: usize,
    acts: &Q8Acts,
    t0: usize,
    dec: *const __m256i,
) -> [__m256; G] {
    let k = nb * BLOCK;
    let stride = F::block_stride();
    let (xq, xl, xd, xs) = (acts.qs.as_ptr(), acts.x16.as_ptr(), acts.d.as_ptr(), acts.s.as_ptr());
    let ones = _mm256_set1_epi16(1);
    let mut facc = [_mm256_setzero_ps(); G];
    for b in 0..nb {
        if !DEC {
            prefetch_ahead(tiles, b, stride);
        }
        let (q, mut d, mut m) = F::block_at(tiles, b);
        if WIDE && F::WIDE_PERMUTED {
            d = _mm256_permutevar8x32_ps(d, wide_order());
            m = _mm256_permutevar8x32_ps(m, wide_order());
        }
        // Integer block sums: 8-bit, one accumulator per activation row (i16 pair sums, or i32); 16-bit,
        // one for rows 0, 1, 4, 5 and one for rows 2, 3, 6, 7 (two i32 lanes per row). (VNNI: more, below.)
        // VNNI's multiply-accumulates
        // chain through their accumulator (5 cycles each), so the products go round `chains` accumulators
        // per row (four with one or two activation rows to interleave, two with more), summed at the end of
        // the block.
        let chains = if !VNNI {
            1
        } else if G < 3 {
            4 / G
        } else {
            2
        };
        // Q6_K: each half's scales, in the 8-bit accumulators' lane order, and for the 16-bit words
        // (`wide_scales`; already applied when the weights come widened).
        let halves = if F::HALVES && !WIDE { F::half_scales(tiles, b) } else { [_mm256_setzero_si256(); 2] };
        let scales = if F::HALVES && WIDE && !DEC { wide_scales::<F>(tiles, b) } else { [_mm256_setzero_si256(); 4] };
        let mut acc = [[_mm256_setzero_si256(); 4]; G];
        for c in 0..4 {
            if WIDE {
                let wv = if DEC {
                    let p = dec.add(16 * b + 4 * c);
                    [
                        _mm256_load_si256(p),
                        _mm256_load_si256(p.add(1)),
                        _mm256_load_si256(p.add(2)),
                        _mm256_load_si256(p.add(3)),
                    ]
                } else {
                    words16_scaled::<F>(q, c, &scales)
                };
                for g in 0..G {
                    let xp = xl.add((t0 + g) * k + b * BLOCK);
                    let x0 = _mm256_set1_epi64x((xp.add(4 * c) as *const i64).read_unaligned());
                    let x1 = _mm256_set1_epi64x((xp.add(16 + 4 * c) as *const i64).read_unaligned());
                    let a = &mut acc[g];
                    if VNNI {
                        // Rows 0, 1, 4, 5 in accumulators 0 and 2, rows 2, 3, 6, 7 in 1 and 3.
                        let j = if chains > 1 { 2 } else { 0 };
                        a[0] = _mm256_dpwssd_epi32(a[0], wv[0], x0);
                        a[1] = _mm256_dpwssd_epi32(a[1], wv[1], x0);
                        a[j] = _mm256_dpwssd_epi32(a[j], wv[2], x1);
                        a[j + 1] = _mm256_dpwssd_epi32(a[j + 1], wv[3], x1);
                    } else {
                        let lo = _mm256_add_epi32(_mm256_madd_epi16(wv[0], x0), _mm256_madd_epi16(wv[2], x1));
                        let hi = _mm256_add_epi32(_mm256_madd_epi16(wv[1], x0), _mm256_madd_epi16(wv[3], x1));
                        a[0] = _mm256_add_epi32(a[0], lo);
                        a[1] = _mm256_add_epi32(a[1], hi);
                    }
                }
            } else {
                let [w0, w1] = F::words(q, c);
                // Q6_K: the signed weights `q − 32` (|·| ≤ 32), multiplied as Q8_0's are (`Bytes::pairs`).
                let (s0, s1) = if F::HALVES {
                    (_mm256_sub_epi8(w0, _mm256_set1_epi8(32)), _mm256_sub_epi8(w1, _mm256_set1_epi8(32)))
                } else {
                    (w0, w1)
                };
                for g in 0..G {
                    let xp = xq.add((t0 + g) * k + b * BLOCK);
                    let x0 = _mm256_set1_epi32((xp.add(4 * c) as *const i32).read_unaligned());
                    let x1 = _mm256_set1_epi32((xp.add(16 + 4 * c) as *const i32).read_unaligned());
                    if F::HALVES {
                        // One i16 accumulator per half: pair sums ≤ 2·32·127, four steps ≤ 32 512.
                        let a = &mut acc[g];
                        a[0] = _mm256_add_epi16(a[0], Bytes::pairs(s0, x0));
                        a[1] = _mm256_add_epi16(a[1], Bytes::pairs(s1, x1));
                        continue;
                    }
                    if VNNI {
                        let j = (2 * c) % chains;
                        let j1 = if chains > 1 { j + 1 } else { 0 };
                        acc[g][j] = F::dot_vnni(acc[g][j], w0, x0);
                        acc[g][j1] = F::dot_vnni(acc[g][j1], w1, x1);
                        continue;
                    }
                    // i32 sums in accumulator 0; with `FOLD`, i16 pair sums in 1, widened every `FOLD` steps.
                    let a = &mut acc[g];
                    if F::FOLD > 0 {
                        a[1] = _mm256_add_epi16(a[1], _mm256_add_epi16(F::pairs(w0, x0), F::pairs(w1, x1)));
                        if (c + 1) % F::FOLD == 0 {
                            a[0] = _mm256_add_epi32(a[0], _mm256_madd_epi16(a[1], ones));
                            a[1] = _mm256_setzero_si256();
                        }
                    } else {
                        let p = _mm256_add_epi32(
                            _mm256_madd_epi16(F::pairs(w0, x0), ones),
                            _mm256_madd_epi16(F::pairs(w1, x1), ones),
                        );
                        a[0] = _mm256_add_epi32(a[0], p);
                    }
                }
            }
        }
        for g in 0..G {
            let t = t0 + g;
            let a = &acc[g];
            let sum = if WIDE && F::HALVES {
                // Q6_K: a lane reaches 2 147 418 112 (16 products of 4096 · 32767), so a row's two lanes are
                // added as floats.
                // The chains' lanes add up to the single chain's exact lane sums (within i32), so the result
                // does not depend on the batch.
                let (l, r) = if VNNI && chains > 1 {
                    (_mm256_add_epi32(a[0], a[2]), _mm256_add_epi32(a[1], a[3]))
                } else {
                    (a[0], a[1])
                };
                let (l, r) = (_mm256_cvtepi32_ps(l), _mm256_cvtepi32_ps(r));
                _mm256_hadd_ps(l, r)
            } else if WIDE {
                _mm256_cvtepi32_ps(if VNNI && chains > 1 {
                    _mm256_hadd_epi32(_mm256_add_epi32(a[0], a[2]), _mm256_add_epi32(a[1], a[3]))
                } else {
                    _mm256_hadd_epi32(a[0], a[1])
                })
            } else if F::HALVES {
                // Each half's pair sums times its scale: |·| ≤ 4·32 512·128 = 16 646 144, under 2^24, so the
                // conversion is exact too.
                _mm256_cvtepi32_ps(_mm256_add_epi32(
                    _mm256_madd_epi16(a[0], halves[0]),
                    _mm256_madd_epi16(a[1], halves[1]),
                ))
            } else if VNNI {
                let mut s = a[0];
                for part in &a[1..chains] {
                    s = _mm256_add_epi32(s, *part);
                }
                _mm256_cvtepi32_ps(s)
            } else {
                _mm256_cvtepi32_ps(a[0])
            };
            let sc = _mm256_mul_ps(d, _mm256_set1_ps(*xd.add(t * nb + b)));
            facc[g] = _mm256_fmadd_ps(sc, sum, facc[g]);
            if F::HAS_MIN || F::ZERO != 0.0 {
                facc[g] = _mm256_fmadd_ps(m, _mm256_set1_ps(*xs.add(t * nb + b)), facc[g]);
            }
        }
    }
    if WIDE && F::WIDE_PERMUTED {
        for f in &mut facc {
            *f = _mm256_permutevar8x32_ps(*f, wide_order());
        }
    }
    facc
}

/// `y[t * m + r] = Σ w[r]·x[t]` with f32 activations `xs` (`[n, k]`, per-block sums in `xsums`), for the
/// weight rows `r0 .. r0 + rows` (`r0` a multiple of 8): the float32 product with the dequantized weights, up
/// to summation order. Each activation row runs alone, so results do not depend on the batch.
///
/// SAFETY (caller): as `rows_tiled`, with `xs` and `xsums` holding `n` rows.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn rows_tiled_f32(w: &QMatrix, r0: usize, rows: usize, xs: &[f32], xsums: &[f32], n: usize, y: Dst) {
    let out = Out { y: y.y, add: y.add, m: w.rows, rows, n };
    match w.format {
        QuantFormat::Q4_0 => rows_f32::<Nibbles<false>>(w, r0, xs, xsums, out),
        QuantFormat::Q4_1 => rows_f32::<Nibbles<true>>(w, r0, xs, xsums, out),
        QuantFormat::Q5_0 => rows_f32::<Five<false>>(w, r0, xs, xsums, out),
        QuantFormat::Q5_1 => rows_f32::<Five<true>>(w, r0, xs, xsums, out),
        QuantFormat::Q8_0 => rows_f32::<Bytes>(w, r0, xs, xsums, out),
        QuantFormat::Q4_K => rows_f32::<K4>(w, r0, xs, xsums, out),
        QuantFormat::Q6_K => rows_f32::<K6>(w, r0, xs, xsums, out),
        QuantFormat::A4_64 => rows_f32::<A4<2>>(w, r0, xs, xsums, out),
        QuantFormat::A4_128 => rows_f32::<A4<4>>(w, r0, xs, xsums, out),
    }
}

#[inline(always)]
unsafe fn rows_f32<F: TiledFormat>(w: &QMatrix, r0: usize, xs: &[f32], xsums: &[f32], out: Out) {
    let Out { rows, n, .. } = out;
    let (k, nb) = (w.cols, w.cols / BLOCK);
    assert!(r0.is_multiple_of(TILE_ROWS) && r0 + rows <= w.rows, "tiled tasks cover whole tiles of `w`");
    assert!(xs.len() >= n * k && xsums.len() >= n * nb);
    for i0 in (0..rows).step_by(TILE_ROWS) {
        let tiles = w.tile_row((r0 + i0) / TILE_ROWS).as_ptr();
        let (r, valid) = (r0 + i0, (rows - i0).min(TILE_ROWS));
        for t in 0..n {
            let sums = tile_f32::<F>(tiles, nb, xs.as_ptr().add(t * k), xsums.as_ptr().add(t * nb));
            put(out, r, valid, t, &[sums]);
        }
    }
}

/// Eight bytes widened to eight f32 (sign-extended for `F::SIGNED`).
#[inline(always)]
unsafe fn bytes_f32<F: TiledFormat>(v: __m128i) -> __m256 {
    _mm256_cvtepi32_ps(if F::SIGNED { _mm256_cvtepi8_epi32(v) } else { _mm256_cvtepu8_epi32(v) })
}

/// Lanes of rows `2p` and `2p + 1`, four each: how a word vector's bytes `8p .. 8p + 8` widen.
#[inline(always)]
unsafe fn pair_lanes(p: usize) -> __m256i {
    let (a, b) = (2 * p as i32, 2 * p as i32 + 1);
    _mm256_setr_epi32(a, a, a, a, b, b, b, b)
}

/// Eight weight bytes as f32: the values (Q6_K: `(q − 32)·s`, `s` the half's scales in `scale`).
#[inline(always)]
unsafe fn weights_f32<F: TiledFormat>(v: __m128i, scale: __m256) -> __m256 {
    let w = bytes_f32::<F>(v);
    if F::HALVES {
        _mm256_mul_ps(_mm256_sub_ps(w, _mm256_set1_ps(32.0)), scale)
    } else {
        w
    }
}

/// One row of tiles against one f32 activation row (`x`, its block sums `xsum`): lane `i` for weight row
/// `i`. A word vector's bytes 8p .. 8p + 8 are rows 2p and 2p + 1, four values each, so accumulator `p` holds
/// four partial sums of each of those two rows; a block's partial sums take the rows' scales, and the eight
/// rows' sums are folded out at the end.
#[inline(always)]
#[allow(clippy::needless_range_loop)] // index loops over constant bounds: unrolled, registers
unsafe fn tile_f32<F: TiledFormat>(tiles: *const u8, nb: usize, x: *const f32, xsum: *const f32) -> __m256 {
    let stride = F::block_stride();
    let mut facc = [_mm256_setzero_ps(); 4];
    let mut macc = _mm256_setzero_ps();
    for b in 0..nb {
        prefetch_ahead(tiles, b, stride);
        let (q, d, m) = F::block_at(tiles, b);
        // Q6_K: each half's scales for the four row pairs (`pair_lanes`), applied to `q − 32`.
        let mut hs = [[_mm256_setzero_ps(); 4]; 2];
        if F::HALVES {
            for (h, s) in F::f32_half_scales(tiles, b).into_iter().enumerate() {
                for p in 0..4 {
                    hs[h][p] = _mm256_permutevar8x32_ps(s, pair_lanes(p));
                }
            }
        }
        let mut acc = [_mm256_setzero_ps(); 4];
        for c in 0..4 {
            let [w0, w1] = F::words(q, c);
            let xb = x.add(b * BLOCK + 4 * c);
            let (x0, x1) = (_mm256_broadcast_ps(&_mm_loadu_ps(xb)), _mm256_broadcast_ps(&_mm_loadu_ps(xb.add(16))));
            for (h, (wv, xv)) in [(w0, x0), (w1, x1)].into_iter().enumerate() {
                let (lo, hi) = (_mm256_castsi256_si128(wv), _mm256_extracti128_si256(wv, 1));
                acc[0] = _mm256_fmadd_ps(weights_f32::<F>(lo, hs[h][0]), xv, acc[0]);
                acc[1] = _mm256_fmadd_ps(weights_f32::<F>(_mm_srli_si128(lo, 8), hs[h][1]), xv, acc[1]);
                acc[2] = _mm256_fmadd_ps(weights_f32::<F>(hi, hs[h][2]), xv, acc[2]);
                acc[3] = _mm256_fmadd_ps(weights_f32::<F>(_mm_srli_si128(hi, 8), hs[h][3]), xv, acc[3]);
            }
        }
        for p in 0..4 {
            facc[p] = _mm256_fmadd_ps(acc[p], _mm256_permutevar8x32_ps(d, pair_lanes(p)), facc[p]);
        }
        if F::HAS_MIN || F::ZERO != 0.0 {
            macc = _mm256_fmadd_ps(m, _mm256_set1_ps(*xsum.add(b)), macc);
        }
    }
    // [r0 r0 r2 r2 | r1 r1 r3 r3], [r4 r4 r6 r6 | r5 r5 r7 r7], then [r0 r2 r4 r6 | r1 r3 r5 r7].
    let h = _mm256_hadd_ps(_mm256_hadd_ps(facc[0], facc[1]), _mm256_hadd_ps(facc[2], facc[3]));
    _mm256_add_ps(_mm256_permutevar8x32_ps(h, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)), macc)
}
