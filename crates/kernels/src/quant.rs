//! Matrix products with GGUF-quantized weights and f32 activations.
//!
//! Activations stay in f32 (llama.cpp and candle round them to 8 bits first); only the weights are
//! quantized, so the result equals the float32 product with the dequantized weights up to summation order.
//! That is what the reference implementations compute, and it keeps first-step logprobs within 0.01.
//!
//! Block layouts (32 weights per block, little-endian):
//!
//! ```text
//!   Q4_1 (20 B): d: f16 | m: f16 | qs[16]: w[j] = d * (qs[j] & 0xF) + m, w[j+16] = d * (qs[j] >> 4) + m
//!   Q8_0 (34 B): d: f16 | qs[32] as i8: w[j] = d * qs[j]
//! ```
//!
//! For a block, `Σ w·x = d·Σ q·x + m·Σ x`, so each activation row's per-block sums `Σ x` are computed once.

use crate::pool::{for_each_chunk_mut, for_each_chunk_mut_with};
use half::f16;

pub const BLOCK: usize = 32;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QuantFormat {
    Q4_1,
    Q8_0,
}

impl QuantFormat {
    /// Bytes of quantized values per block once scales are split out.
    fn qs_bytes(self) -> usize {
        match self {
            Self::Q4_1 => 16,
            Self::Q8_0 => 32,
        }
    }

    pub fn block_bytes(self) -> usize {
        match self {
            Self::Q4_1 => 20,
            Self::Q8_0 => 34,
        }
    }
}

/// A `[rows, cols]` weight matrix, repacked at load from GGUF blocks: per-block scales (and mins) as f32,
/// quantized values contiguous per row (Q4_1: 16 bytes per block, nibbles as in GGUF; Q8_0: 32 bytes).
#[derive(Clone, Debug)]
pub struct QMatrix {
    format: QuantFormat,
    /// Round activations to 8 bits per block (Q4_1 only) and use integer dot products.
    int8_activations: bool,
    rows: usize,
    cols: usize,
    scales: Vec<f32>,
    mins: Vec<f32>,
    qs: Vec<u8>,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct QuantError(String);

impl QMatrix {
    /// Takes the tensor's raw GGUF bytes.
    pub fn new(format: QuantFormat, rows: usize, cols: usize, data: Vec<u8>) -> Result<Self, QuantError> {
        if !cols.is_multiple_of(BLOCK) {
            return Err(QuantError(format!("{cols} columns is not a multiple of {BLOCK}")));
        }
        let nblocks = rows * cols / BLOCK;
        let want = nblocks * format.block_bytes();
        if data.len() != want {
            return Err(QuantError(format!("{format:?} [{rows}, {cols}] needs {want} bytes, got {}", data.len())));
        }
        let mut scales = Vec::with_capacity(nblocks);
        let mut mins = Vec::new();
        let mut qs = Vec::with_capacity(nblocks * format.qs_bytes());
        for blk in data.chunks_exact(format.block_bytes()) {
            scales.push(f16_at(blk, 0));
            match format {
                QuantFormat::Q4_1 => {
                    mins.push(f16_at(blk, 2));
                    qs.extend_from_slice(&blk[4..20]);
                }
                QuantFormat::Q8_0 => qs.extend_from_slice(&blk[2..34]),
            }
        }
        Ok(Self { format, int8_activations: false, rows, cols, scales, mins, qs })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Q4_1 only: quantize activations to 8 bits per 32-value block (as llama.cpp does) and use integer
    /// dot products, about twice as fast; the `m·Σx` term stays exact. Other formats ignore it.
    pub fn with_int8_activations(mut self, on: bool) -> Self {
        self.int8_activations = on && self.format == QuantFormat::Q4_1;
        self
    }

    /// Stacks matrices with the same format and column count into one (rows of the first, then the
    /// second, ...), so projections that read the same input run as one matmul.
    pub fn concat_rows(parts: &[QMatrix]) -> Result<Self, QuantError> {
        let first = parts.first().ok_or_else(|| QuantError("nothing to concatenate".into()))?;
        if parts.iter().any(|p| p.format != first.format || p.cols != first.cols) {
            return Err(QuantError("concatenated matrices must share format and column count".into()));
        }
        Ok(Self {
            format: first.format,
            int8_activations: first.int8_activations,
            rows: parts.iter().map(|p| p.rows).sum(),
            cols: first.cols,
            scales: parts.iter().flat_map(|p| p.scales.iter().copied()).collect(),
            mins: parts.iter().flat_map(|p| p.mins.iter().copied()).collect(),
            qs: parts.iter().flat_map(|p| p.qs.iter().copied()).collect(),
        })
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    pub fn format(&self) -> QuantFormat {
        self.format
    }

    fn blocks_per_row(&self) -> usize {
        self.cols / BLOCK
    }

    fn row(&self, r: usize) -> RowRef<'_> {
        let nb = self.blocks_per_row();
        let qb = self.format.qs_bytes();
        RowRef {
            format: self.format,
            scales: &self.scales[r * nb..(r + 1) * nb],
            mins: if self.mins.is_empty() { &[] } else { &self.mins[r * nb..(r + 1) * nb] },
            qs: &self.qs[r * nb * qb..(r + 1) * nb * qb],
        }
    }

    /// Row `r` dequantized into `out` (`cols` floats).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        self.row(r).dequantize(out);
    }
}

#[derive(Clone, Copy)]
struct RowRef<'a> {
    format: QuantFormat,
    scales: &'a [f32],
    mins: &'a [f32],
    qs: &'a [u8],
}

impl RowRef<'_> {
    fn dequantize(&self, out: &mut [f32]) {
        let qb = self.format.qs_bytes();
        for (b, q) in self.qs.chunks_exact(qb).enumerate() {
            let o = &mut out[b * BLOCK..(b + 1) * BLOCK];
            let d = self.scales[b];
            match self.format {
                QuantFormat::Q4_1 => {
                    let m = self.mins[b];
                    for j in 0..16 {
                        o[j] = d * (q[j] & 0xF) as f32 + m;
                        o[j + 16] = d * (q[j] >> 4) as f32 + m;
                    }
                }
                QuantFormat::Q8_0 => {
                    for j in 0..32 {
                        o[j] = d * q[j] as i8 as f32;
                    }
                }
            }
        }
    }

    /// `Σ w·x` for this row, given `x`'s per-block sums (used for the Q4_1 minimums).
    #[inline]
    fn dot(&self, x: &[f32], xsum: &[f32]) -> f32 {
        #[cfg(target_arch = "x86_64")]
        if simd::has_avx2() {
            let mut out = 0f32;
            // SAFETY: AVX2 and FMA were detected at run time; `x` holds one row of `cols` floats and `xsum`
            // one sum per block (sized by the caller, `qmatmul`).
            unsafe { simd::rows_dot_avx2(*self, x, xsum, std::slice::from_mut(&mut out)) };
            return out;
        }
        self.dot_scalar(x, xsum)
    }

    /// `out[t] = Σ w·x[t]` for each activation row of `xs` (`[out.len(), cols]`): each block is decoded
    /// once and applied to every row.
    #[inline]
    fn dot_rows(&self, xs: &[f32], xsums: &[f32], out: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if simd::has_avx2() {
            // SAFETY: AVX2 and FMA were detected at run time; `xs` holds `out.len()` rows of `cols` floats and
            // `xsums` one sum per block per row (checked by the caller, `qmatmul`).
            unsafe { simd::rows_dot_avx2(*self, xs, xsums, out) };
            return;
        }
        let (k, nb) = (self.scales.len() * BLOCK, self.scales.len());
        for (t, o) in out.iter_mut().enumerate() {
            *o = self.dot_scalar(&xs[t * k..(t + 1) * k], &xsums[t * nb..(t + 1) * nb]);
        }
    }

    /// `dot_rows` for large batches: decodes the row into `raw` once, then runs the same arithmetic.
    fn dot_rows_predecoded(&self, raw: &mut [f32], xs: &[f32], xsums: &[f32], out: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if simd::has_avx2() {
            self.decode_raw(raw);
            // SAFETY: AVX2 and FMA were detected at run time; `raw` holds the decoded row, `xs` and `xsums`
            // are sized by the caller, `qmatmul`.
            unsafe { simd::rows_dot_raw_avx2(*self, raw, xs, xsums, out) };
            return;
        }
        self.dot_rows(xs, xsums, out);
    }

    /// The row's quantized values as f32, unscaled, in block order (what the fused kernel decodes per block).
    fn decode_raw(&self, out: &mut [f32]) {
        let qb = self.format.qs_bytes();
        for (b, q) in self.qs.chunks_exact(qb).enumerate() {
            let o = &mut out[b * BLOCK..(b + 1) * BLOCK];
            match self.format {
                QuantFormat::Q4_1 => {
                    for j in 0..16 {
                        o[j] = (q[j] & 0xF) as f32;
                        o[j + 16] = (q[j] >> 4) as f32;
                    }
                }
                QuantFormat::Q8_0 => {
                    for j in 0..32 {
                        o[j] = q[j] as i8 as f32;
                    }
                }
            }
        }
    }

    /// Q4_1 row × each 8-bit activation row of `acts` (`out.len()` rows).
    fn dot_rows_q8(&self, acts: &Q8Acts, out: &mut [f32]) {
        debug_assert_eq!(self.format, QuantFormat::Q4_1);
        #[cfg(target_arch = "x86_64")]
        if simd::has_avx2() {
            // SAFETY: AVX2 and FMA were detected at run time; `acts` holds `out.len()` rows of `cols` values.
            unsafe { simd::rows_dot_q4_q8_avx2(*self, acts, out) };
            return;
        }
        self.dot_rows_q8_scalar(acts, out);
    }

    fn dot_rows_q8_scalar(&self, acts: &Q8Acts, out: &mut [f32]) {
        let nb = self.scales.len();
        for (t, o) in out.iter_mut().enumerate() {
            let mut s = 0f32;
            for b in 0..nb {
                let q = &self.qs[b * 16..b * 16 + 16];
                let xq = &acts.qs[t * acts.k + b * BLOCK..t * acts.k + (b + 1) * BLOCK];
                let mut isum = 0i32;
                for j in 0..16 {
                    isum += (q[j] & 0xF) as i32 * xq[j] as i32 + (q[j] >> 4) as i32 * xq[j + 16] as i32;
                }
                s += self.scales[b] * acts.d[t * nb + b] * isum as f32 + self.mins[b] * acts.sums[t * nb + b];
            }
            *o = s;
        }
    }

    fn dot_scalar(&self, x: &[f32], xsum: &[f32]) -> f32 {
        let qb = self.format.qs_bytes();
        let mut s = 0f32;
        for (b, q) in self.qs.chunks_exact(qb).enumerate() {
            let xb = &x[b * BLOCK..(b + 1) * BLOCK];
            let mut acc = 0f32;
            match self.format {
                QuantFormat::Q4_1 => {
                    for j in 0..16 {
                        acc += (q[j] & 0xF) as f32 * xb[j] + (q[j] >> 4) as f32 * xb[j + 16];
                    }
                    s += self.scales[b] * acc + self.mins[b] * xsum[b];
                }
                QuantFormat::Q8_0 => {
                    for j in 0..32 {
                        acc += q[j] as i8 as f32 * xb[j];
                    }
                    s += self.scales[b] * acc;
                }
            }
        }
        s
    }
}

#[inline(always)]
fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// Rows of weights per parallel task: large enough to amortize scheduling, small enough to balance.
const ROWS_PER_TASK: usize = 16;

/// `y = x · wᵀ`: `x` is `[n, cols]`, `y` is `[n, rows]`, both row-major.
///
/// Parallel over weight rows; each task reads its weight rows once and applies them to every activation row
/// (the weight read is shared across the batch, which is where batching pays on a CPU). One row (decode):
/// fused dequantize-and-dot. Several rows (prefill, batched decode): each weight row is dequantized once to
/// f32 and dotted with the activation rows four at a time.
/// Above this many activation rows, weight rows are decoded once and reused (same arithmetic).
const SMALL_BATCH: usize = 16;

pub fn qmatmul(w: &QMatrix, x: &[f32], y: &mut [f32]) {
    let (k, m) = (w.cols, w.rows);
    let n = x.len() / k;
    assert_eq!(x.len(), n * k, "activation length");
    assert_eq!(y.len(), n * m, "output length");
    if w.int8_activations {
        return qmatmul_int8(w, x, y, n);
    }
    if n == 1 {
        let xsum: Vec<f32> = x.chunks_exact(BLOCK).map(|c| c.iter().sum()).collect();
        for_each_chunk_mut(y, ROWS_PER_TASK, |t, out| {
            for (i, o) in out.iter_mut().enumerate() {
                *o = w.row(t * ROWS_PER_TASK + i).dot(x, &xsum);
            }
        });
        return;
    }
    // yt is [m, n]: each task owns a contiguous run of output features. Every batch size runs the same
    // arithmetic (the fused kernel's block order), so a row's result is bitwise the same whether it is
    // computed alone, in a decode batch or in a prefill: a prompt served from the prefix cache samples exactly
    // as it would have cold. Large batches decode each weight row once up front instead of per few rows.
    let mut yt = vec![0f32; m * n];
    let xsums: Vec<f32> = x.chunks_exact(BLOCK).map(|c| c.iter().sum()).collect();
    if n <= SMALL_BATCH {
        for_each_chunk_mut(&mut yt, ROWS_PER_TASK * n, |t, out| {
            for (i, o) in out.chunks_exact_mut(n).enumerate() {
                w.row(t * ROWS_PER_TASK + i).dot_rows(x, &xsums, o);
            }
        });
    } else {
        for_each_chunk_mut_with(
            &mut yt,
            ROWS_PER_TASK * n,
            || vec![0f32; k],
            |raw, t, out| {
                for (i, o) in out.chunks_exact_mut(n).enumerate() {
                    w.row(t * ROWS_PER_TASK + i).dot_rows_predecoded(raw, x, &xsums, o);
                }
            },
        );
    }
    for (r, col) in yt.chunks_exact(n).enumerate() {
        for (t, v) in col.iter().enumerate() {
            y[t * m + r] = *v;
        }
    }
}

/// Activations rounded to 8 bits per block: `x ≈ d · q`, plus the exact f32 block sums.
pub struct Q8Acts {
    k: usize,
    qs: Vec<i8>,
    d: Vec<f32>,
    sums: Vec<f32>,
}

impl Q8Acts {
    pub fn quantize(x: &[f32], k: usize) -> Self {
        let nb_total = x.len() / BLOCK;
        let mut qs = Vec::with_capacity(x.len());
        let mut d = Vec::with_capacity(nb_total);
        let mut sums = Vec::with_capacity(nb_total);
        for blk in x.chunks_exact(BLOCK) {
            let amax = blk.iter().fold(0f32, |a, v| a.max(v.abs()));
            let scale = amax / 127.0;
            let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
            qs.extend(blk.iter().map(|v| (v * inv).round() as i8));
            d.push(scale);
            sums.push(blk.iter().sum());
        }
        Self { k, qs, d, sums }
    }
}

/// Q4_1 weights × 8-bit activations. Parallel over weight rows like `qmatmul`; each weight block is decoded
/// once per group of four activation rows.
fn qmatmul_int8(w: &QMatrix, x: &[f32], y: &mut [f32], n: usize) {
    let (k, m) = (w.cols, w.rows);
    let acts = Q8Acts::quantize(x, k);
    if n == 1 {
        for_each_chunk_mut(y, ROWS_PER_TASK, |t, out| {
            for (i, o) in out.iter_mut().enumerate() {
                w.row(t * ROWS_PER_TASK + i).dot_rows_q8(&acts, std::slice::from_mut(o));
            }
        });
        return;
    }
    let mut yt = vec![0f32; m * n];
    for_each_chunk_mut(&mut yt, ROWS_PER_TASK * n, |t, out| {
        for (i, o) in out.chunks_exact_mut(n).enumerate() {
            w.row(t * ROWS_PER_TASK + i).dot_rows_q8(&acts, o);
        }
    });
    for (r, col) in yt.chunks_exact(n).enumerate() {
        for (t, v) in col.iter().enumerate() {
            y[t * m + r] = *v;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod simd {
    use super::{QuantFormat, RowRef, BLOCK};
    use std::arch::x86_64::*;

    pub use crate::vec::simd::{has_avx2, hsum};

    /// Eight bytes (the low half of `v`) widened to f32.
    #[inline(always)]
    unsafe fn u8x8_to_ps(v: __m128i) -> __m256 {
        _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v))
    }

    #[inline(always)]
    unsafe fn i8x8_to_ps(v: __m128i) -> __m256 {
        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v))
    }

    /// The 32 weights of block `b` as four vectors of unscaled quantized values.
    #[inline(always)]
    unsafe fn block_values(format: QuantFormat, qp: *const u8, b: usize) -> [__m256; 4] {
        match format {
            QuantFormat::Q4_1 => {
                let mask = _mm_set1_epi8(0x0F);
                let q = _mm_loadu_si128(qp.add(b * 16) as *const __m128i);
                let lo = _mm_and_si128(q, mask);
                let hi = _mm_and_si128(_mm_srli_epi16(q, 4), mask);
                [u8x8_to_ps(lo), u8x8_to_ps(_mm_srli_si128(lo, 8)), u8x8_to_ps(hi), u8x8_to_ps(_mm_srli_si128(hi, 8))]
            }
            QuantFormat::Q8_0 => {
                let q = _mm256_loadu_si256(qp.add(b * 32) as *const __m256i);
                let q0 = _mm256_castsi256_si128(q);
                let q1 = _mm256_extracti128_si256(q, 1);
                [i8x8_to_ps(q0), i8x8_to_ps(_mm_srli_si128(q0, 8)), i8x8_to_ps(q1), i8x8_to_ps(_mm_srli_si128(q1, 8))]
            }
        }
    }

    #[inline(always)]
    unsafe fn block_dot(w: &[__m256; 4], xb: *const f32) -> __m256 {
        let mut s = _mm256_mul_ps(w[0], _mm256_loadu_ps(xb));
        s = _mm256_fmadd_ps(w[1], _mm256_loadu_ps(xb.add(8)), s);
        s = _mm256_fmadd_ps(w[2], _mm256_loadu_ps(xb.add(16)), s);
        _mm256_fmadd_ps(w[3], _mm256_loadu_ps(xb.add(24)), s)
    }

    /// SAFETY (caller): AVX2 and FMA available; `xs` holds `out.len()` rows of `nb * 32` floats and `xsums`
    /// `out.len() * nb` block sums.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn rows_dot_avx2(row: RowRef<'_>, xs: &[f32], xsums: &[f32], out: &mut [f32]) {
        let qp = row.qs.as_ptr();
        rows_dot_body(row, |b| block_values(row.format, qp, b), xs, xsums, out);
    }

    /// `rows_dot_avx2` with the blocks already decoded into `raw` (unscaled quantized values as f32, laid
    /// out like `block_values`): the same arithmetic in the same order, so bitwise the same results, without
    /// decoding each block again for every few activation rows. For large batches (prefill).
    ///
    /// SAFETY (caller): as `rows_dot_avx2`, and `raw` holds `nb * 32` floats.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn rows_dot_raw_avx2(row: RowRef<'_>, raw: &[f32], xs: &[f32], xsums: &[f32], out: &mut [f32]) {
        debug_assert!(raw.len() >= row.scales.len() * BLOCK);
        let rp = raw.as_ptr();
        let load = |b: usize| {
            let p = rp.add(b * BLOCK);
            [_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8)), _mm256_loadu_ps(p.add(16)), _mm256_loadu_ps(p.add(24))]
        };
        rows_dot_body(row, load, xs, xsums, out);
    }

    /// Shared body of the fused dot kernels; `block(b)` yields block `b`'s 32 unscaled values. Activation
    /// rows go in groups of 4, then the remainder as one group of 3, 2 or 1: each group size is its own
    /// fully unrolled instance, so the accumulators stay in registers (a dynamic row count kept them on the
    /// stack, and every block waited on a store and a reload). Each row's arithmetic is the same in every
    /// group size, so results do not depend on the batch.
    #[inline(always)]
    unsafe fn rows_dot_body(
        row: RowRef<'_>,
        block: impl Fn(usize) -> [__m256; 4] + Copy,
        xs: &[f32],
        xsums: &[f32],
        out: &mut [f32],
    ) {
        let nb = row.scales.len();
        debug_assert!(xs.len() >= out.len() * nb * BLOCK && xsums.len() >= out.len() * nb);
        let mut t0 = 0;
        while out.len() - t0 >= 4 {
            rows_dot_group::<4>(row, block, xs, xsums, t0, &mut out[t0..t0 + 4]);
            t0 += 4;
        }
        match out.len() - t0 {
            3 => rows_dot_group::<3>(row, block, xs, xsums, t0, &mut out[t0..]),
            2 => rows_dot_group::<2>(row, block, xs, xsums, t0, &mut out[t0..]),
            1 => rows_dot_group::<1>(row, block, xs, xsums, t0, &mut out[t0..]),
            _ => {}
        }
    }

    /// Activation rows `t0 .. t0 + G` of `xs` against one weight row.
    #[inline(always)]
    #[allow(clippy::needless_range_loop)] // index loops over constant bounds: unrolled, registers
    unsafe fn rows_dot_group<const G: usize>(
        row: RowRef<'_>,
        block: impl Fn(usize) -> [__m256; 4],
        xs: &[f32],
        xsums: &[f32],
        t0: usize,
        out: &mut [f32],
    ) {
        let nb = row.scales.len();
        let k = nb * BLOCK;
        let has_mins = row.format == QuantFormat::Q4_1;
        let mut acc = [_mm256_setzero_ps(); G];
        let mut mins = [0f32; G];
        for b in 0..nb {
            let w = block(b);
            let d = _mm256_set1_ps(*row.scales.get_unchecked(b));
            for r in 0..G {
                let xb = xs.as_ptr().add((t0 + r) * k + b * BLOCK);
                acc[r] = _mm256_fmadd_ps(d, block_dot(&w, xb), acc[r]);
            }
            if has_mins {
                let m = *row.mins.get_unchecked(b);
                for r in 0..G {
                    mins[r] += m * *xsums.get_unchecked((t0 + r) * nb + b);
                }
            }
        }
        for r in 0..G {
            out[r] = hsum(acc[r]) + mins[r];
        }
    }

    /// SAFETY (caller): AVX2 and FMA available; `acts` holds `out.len()` rows of `row.scales.len() * 32`
    /// quantized values with their scales and sums.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn rows_dot_q4_q8_avx2(row: RowRef<'_>, acts: &super::Q8Acts, out: &mut [f32]) {
        const R: usize = 4;
        let nb = row.scales.len();
        let k = acts.k;
        let qp = row.qs.as_ptr();
        let xp = acts.qs.as_ptr();
        let mask = _mm_set1_epi8(0x0F);
        let ones = _mm256_set1_epi16(1);
        let mut t0 = 0;
        while t0 < out.len() {
            let rows = R.min(out.len() - t0);
            let mut acc = [_mm256_setzero_ps(); R];
            let mut mins = [0f32; R];
            for b in 0..nb {
                let q = _mm_loadu_si128(qp.add(b * 16) as *const __m128i);
                let lo = _mm_and_si128(q, mask);
                let hi = _mm_and_si128(_mm_srli_epi16(q, 4), mask);
                let w = _mm256_set_m128i(hi, lo);
                let dw = *row.scales.get_unchecked(b);
                let m = *row.mins.get_unchecked(b);
                for (r, (a, mn)) in acc.iter_mut().zip(mins.iter_mut()).enumerate().take(rows) {
                    let t = t0 + r;
                    let xq = _mm256_loadu_si256(xp.add(t * k + b * BLOCK) as *const __m256i);
                    let p = _mm256_madd_epi16(_mm256_maddubs_epi16(w, xq), ones);
                    let d = _mm256_set1_ps(dw * *acts.d.get_unchecked(t * nb + b));
                    *a = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(p), *a);
                    *mn += m * *acts.sums.get_unchecked(t * nb + b);
                }
            }
            for r in 0..rows {
                out[t0 + r] = hsum(acc[r]) + mins[r];
            }
            t0 += rows;
        }
    }
}

/// Reference: dequantize each row and accumulate in f64.
pub fn qmatmul_reference(w: &QMatrix, x: &[f32], y: &mut [f32]) {
    let (k, m) = (w.cols, w.rows);
    let n = x.len() / k;
    let mut row = vec![0f32; k];
    for r in 0..m {
        w.dequantize_row(r, &mut row);
        for t in 0..n {
            y[t * m + r] =
                row.iter().zip(&x[t * k..(t + 1) * k]).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>() as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            self.0 >> 33
        }
        fn f32(&mut self) -> f32 {
            (self.next() % 20001) as f32 / 10000.0 - 1.0
        }
    }

    fn random_matrix(rng: &mut Lcg, format: QuantFormat, rows: usize, cols: usize) -> QMatrix {
        let mut data = Vec::new();
        for _ in 0..rows * cols / BLOCK {
            data.extend_from_slice(&f16::from_f32(rng.f32() * 0.05).to_le_bytes());
            if format == QuantFormat::Q4_1 {
                data.extend_from_slice(&f16::from_f32(rng.f32() * 0.1).to_le_bytes());
            }
            let n = if format == QuantFormat::Q4_1 { 16 } else { 32 };
            data.extend((0..n).map(|_| rng.next() as u8));
        }
        QMatrix::new(format, rows, cols, data).unwrap()
    }

    /// Relative error bound 1e-4 of the output scale: f32 accumulation over ≤ 1536 terms.
    #[test]
    fn fast_matches_reference_for_each_format_and_batch_size() {
        let mut rng = Lcg(9);
        for format in [QuantFormat::Q4_1, QuantFormat::Q8_0] {
            for &(rows, cols, n) in
                &[(1, 32, 1), (33, 64, 1), (70, 576, 3), (96, 1536, 7), (40, 96, 64), (5, 64, 16), (5, 64, 17)]
            {
                let w = random_matrix(&mut rng, format, rows, cols);
                let x: Vec<f32> = (0..n * cols).map(|_| rng.f32()).collect();
                let (mut fast, mut slow) = (vec![0f32; n * rows], vec![0f32; n * rows]);
                qmatmul(&w, &x, &mut fast);
                qmatmul_reference(&w, &x, &mut slow);
                let scale = slow.iter().fold(1e-3f32, |a, b| a.max(b.abs()));
                let err = fast.iter().zip(&slow).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                assert!(err <= 1e-4 * scale, "{format:?} [{rows},{cols}] n={n}: error {err} at scale {scale}");
            }
        }
    }

    /// The 8-bit-activation path equals exact arithmetic on the rounded activations (bound 1e-4 of the
    /// output scale), for the SIMD and the portable kernels, at every batch size; and stays within 2 % of the
    /// output scale of the f32 result (the rounding of activations to 8 bits).
    #[test]
    fn int8_activation_path_matches_its_reference() {
        let mut rng = Lcg(21);
        for &(rows, cols, n) in &[(1, 32, 1), (33, 64, 1), (70, 576, 3), (20, 1536, 7), (17, 96, 33)] {
            let w = random_matrix(&mut rng, QuantFormat::Q4_1, rows, cols).with_int8_activations(true);
            let x: Vec<f32> = (0..n * cols).map(|_| rng.f32()).collect();
            let acts = Q8Acts::quantize(&x, cols);
            let xr: Vec<f32> = acts.qs.iter().enumerate().map(|(i, &q)| q as f32 * acts.d[i / BLOCK]).collect();
            let mut want = vec![0f32; n * rows];
            let mut wrow = vec![0f32; cols];
            for r in 0..rows {
                w.dequantize_row(r, &mut wrow);
                let (d, mn) = (&w.scales[r * cols / BLOCK..], &w.mins[r * cols / BLOCK..]);
                for t in 0..n {
                    // d·Σq·x̂ + m·Σx: the min term uses the exact activations, as the kernel does.
                    let mut s = 0f64;
                    for b in 0..cols / BLOCK {
                        let xs = &xr[t * cols + b * BLOCK..t * cols + (b + 1) * BLOCK];
                        let qdot: f64 = (0..BLOCK)
                            .map(|j| ((wrow[b * BLOCK + j] - mn[b]) / d[b]).round() as f64 * xs[j] as f64)
                            .sum();
                        s += d[b] as f64 * qdot + mn[b] as f64 * acts.sums[t * cols / BLOCK + b] as f64;
                    }
                    want[t * rows + r] = s as f32;
                }
            }
            let mut fast = vec![0f32; n * rows];
            qmatmul(&w, &x, &mut fast);
            let mut portable = vec![0f32; n * rows];
            for r in 0..rows {
                let mut col = vec![0f32; n];
                w.row(r).dot_rows_q8_scalar(&acts, &mut col);
                for t in 0..n {
                    portable[t * rows + r] = col[t];
                }
            }
            let mut exact = vec![0f32; n * rows];
            qmatmul_reference(&w, &x, &mut exact);
            let scale = want.iter().fold(1e-3f32, |a, b| a.max(b.abs()));
            for (name, got) in [("simd", &fast), ("portable", &portable)] {
                let err = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                assert!(err <= 1e-4 * scale, "{name} [{rows},{cols}] n={n}: error {err} at scale {scale}");
            }
            let err = fast.iter().zip(&exact).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(err <= 2e-2 * scale, "[{rows},{cols}] n={n}: 8-bit rounding error {err} at scale {scale}");
        }
    }

    /// The portable path (used where AVX2 is missing) against the reference.
    #[test]
    fn scalar_path_matches_reference() {
        let mut rng = Lcg(3);
        for format in [QuantFormat::Q4_1, QuantFormat::Q8_0] {
            let w = random_matrix(&mut rng, format, 9, 160);
            let x: Vec<f32> = (0..160).map(|_| rng.f32()).collect();
            let xsum: Vec<f32> = x.chunks_exact(BLOCK).map(|c| c.iter().sum()).collect();
            let mut slow = vec![0f32; 9];
            qmatmul_reference(&w, &x, &mut slow);
            for (r, want) in slow.iter().enumerate() {
                let got = w.row(r).dot_scalar(&x, &xsum);
                assert!((got - want).abs() <= 1e-4 * want.abs().max(1.0), "{format:?} row {r}: {got} vs {want}");
            }
        }
    }

    /// Each activation row gets bitwise the same result alone, in a decode batch and in a prefill batch
    /// (what keeps seeded sampling independent of batching and of the prefix cache).
    #[test]
    fn results_are_bitwise_independent_of_batch_size() {
        let mut rng = Lcg(7);
        for format in [QuantFormat::Q4_1, QuantFormat::Q8_0] {
            let (rows, cols) = (24, 96);
            let w = random_matrix(&mut rng, format, rows, cols);
            for n in [2usize, 5, 16, 17, 40] {
                let x: Vec<f32> = (0..n * cols).map(|_| rng.f32()).collect();
                let mut batched = vec![0f32; n * rows];
                qmatmul(&w, &x, &mut batched);
                for t in 0..n {
                    let mut alone = vec![0f32; rows];
                    qmatmul(&w, &x[t * cols..(t + 1) * cols], &mut alone);
                    assert_eq!(&batched[t * rows..(t + 1) * rows], &alone[..], "{format:?} n={n} row {t}");
                }
            }
        }
    }

    #[test]
    fn dequantize_follows_the_block_layout() {
        // Q4_1 block with d = 1, m = -8: w[j] = (qs[j] & 0xF) - 8, w[j + 16] = (qs[j] >> 4) - 8.
        let mut data = f16::from_f32(1.0).to_le_bytes().to_vec();
        data.extend_from_slice(&f16::from_f32(-8.0).to_le_bytes());
        data.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
        let w = QMatrix::new(QuantFormat::Q4_1, 1, 32, data).unwrap();
        let mut row = vec![0f32; 32];
        w.dequantize_row(0, &mut row);
        assert_eq!(row[0], -8.0);
        assert_eq!(row[15], 7.0);
        assert_eq!(row[16], 7.0);
        assert_eq!(row[31], -8.0);
    }

    #[test]
    fn concatenated_rows_give_the_same_products() {
        let mut rng = Lcg(11);
        let (a, b) =
            (random_matrix(&mut rng, QuantFormat::Q4_1, 7, 64), random_matrix(&mut rng, QuantFormat::Q4_1, 5, 64));
        let ab = QMatrix::concat_rows(&[a.clone(), b.clone()]).unwrap();
        let x: Vec<f32> = (0..2 * 64).map(|_| rng.f32()).collect();
        let (mut ya, mut yb, mut yab) = (vec![0f32; 14], vec![0f32; 10], vec![0f32; 24]);
        qmatmul(&a, &x, &mut ya);
        qmatmul(&b, &x, &mut yb);
        qmatmul(&ab, &x, &mut yab);
        for t in 0..2 {
            assert_eq!(&yab[t * 12..t * 12 + 7], &ya[t * 7..t * 7 + 7]);
            assert_eq!(&yab[t * 12 + 7..t * 12 + 12], &yb[t * 5..t * 5 + 5]);
        }
        assert!(QMatrix::concat_rows(&[a, random_matrix(&mut rng, QuantFormat::Q8_0, 1, 64)]).is_err());
    }

    #[test]
    fn wrong_sizes_are_errors() {
        assert!(QMatrix::new(QuantFormat::Q8_0, 2, 30, vec![0; 68]).is_err());
        assert!(QMatrix::new(QuantFormat::Q8_0, 2, 32, vec![0; 67]).is_err());
    }
}
