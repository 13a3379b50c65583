//! Matrix products with 16-bit float weights (bf16 or f16, as Hugging Face checkpoints store them) and f32
//! activations.
//!
//! The weights stay 16-bit in memory (half the bytes of f32: decode reads each weight once per step, so
//! its speed is the read bandwidth over these bytes) and widen to f32 in registers: bf16 by a 16-bit shift,
//! f16 by F16C's conversion, both exact. Products and sums are f32 (fused multiply-adds). Rounding the
//! activations to integers (the block formats' 8/16-bit paths) would only add error here: there is no
//! integer product of float weights to gain from, so every [`Activations`](crate::Activations) setting
//! runs this f32 path.
//!
//! Each (weight row, activation row) dot product is summed the same way whatever the batch: sixteen lanes
//! (two vectors, alternate 8-value runs), added lane-wise, then folded, then the tail past the last
//! multiple of 16 in order. Up to four activation rows share each load of a weight vector, which changes
//! nothing in any row's arithmetic: a row gets bitwise the same result alone, in a decode batch or in a
//! prefill.

use crate::quant::{activation_rows, rows_parallel_tasks, Isa, QuantError};
use half::{bf16, f16};

/// Which 16-bit float the weights are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HalfKind {
    Bf16,
    F16,
}

impl HalfKind {
    #[inline(always)]
    fn to_f32(self, bits: u16) -> f32 {
        match self {
            Self::Bf16 => bf16::from_bits(bits).to_f32(),
            Self::F16 => f16::from_bits(bits).to_f32(),
        }
    }
}

/// A `[rows, cols]` weight matrix of 16-bit floats, row-major.
#[derive(Clone, Debug)]
pub struct HalfMatrix {
    kind: HalfKind,
    rows: usize,
    cols: usize,
    data: Vec<u16>,
}

impl HalfMatrix {
    /// Takes the values' little-endian bytes (a safetensors or GGUF tensor's data).
    pub fn from_le_bytes(kind: HalfKind, rows: usize, cols: usize, bytes: &[u8]) -> Result<Self, QuantError> {
        let want = rows.checked_mul(cols).and_then(|v| v.checked_mul(2));
        if rows == 0 || cols == 0 || want != Some(bytes.len()) {
            return Err(QuantError::new(format!("{kind:?} [{rows}, {cols}] does not fit {} bytes", bytes.len())));
        }
        let mut data = crate::mapped::huge_zeroed::<u16>(rows * cols);
        for (d, b) in data.iter_mut().zip(bytes.chunks_exact(2)) {
            *d = u16::from_le_bytes([b[0], b[1]]);
        }
        Ok(Self { kind, rows, cols, data })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    pub fn kind(&self) -> HalfKind {
        self.kind
    }

    /// Bytes a product reads.
    pub fn weight_bytes(&self) -> usize {
        self.data.len() * 2
    }

    /// Row `r` as f32 (exact) into `out`.
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        let row = &self.data[r * self.cols..(r + 1) * self.cols];
        for (o, &b) in out.iter_mut().zip(row) {
            *o = self.kind.to_f32(b);
        }
    }

    /// Stacks matrices of one kind and column count (rows of the first, then the second, ...), so
    /// projections that read the same input run as one product.
    pub fn concat_rows(parts: &[HalfMatrix]) -> Result<Self, QuantError> {
        let first = parts.first().ok_or_else(|| QuantError::new("nothing to concatenate".into()))?;
        if parts.iter().any(|p| p.kind != first.kind || p.cols != first.cols) {
            return Err(QuantError::new("concatenated matrices must share kind and column count".into()));
        }
        let rows = parts.iter().map(|p| p.rows).sum();
        let mut data = crate::mapped::huge_zeroed::<u16>(rows * first.cols);
        for (d, s) in data.iter_mut().zip(parts.iter().flat_map(|p| p.data.iter())) {
            *d = *s;
        }
        Ok(Self { kind: first.kind, rows, cols: first.cols, data })
    }
}

/// `y = x · Wᵀ` (`x` `[n, cols]`, `y` `[n, rows]`), or `y += x · Wᵀ` with `add`.
pub fn half_matmul(w: &HalfMatrix, x: &[f32], y: &mut [f32], add: bool) {
    half_matmul_on(Isa::detected(), w, x, y, add)
}

/// `half_matmul` on a given instruction set (tests force each one).
pub fn half_matmul_on(isa: Isa, w: &HalfMatrix, x: &[f32], y: &mut [f32], add: bool) {
    let (k, m) = (w.cols, w.rows);
    let n = activation_rows(isa, k, m, x, y);
    if n == 0 {
        return;
    }
    let wide = isa.for_rows(n) == Isa::Avx512;
    rows_parallel_tasks(y, n, m, add, |r0, out| {
        // Activation rows in blocks that stay in cache while every weight row of the task passes over them
        // (a prompt's whole activations would be streamed from memory once per weight row otherwise).
        for tb in (0..n).step_by(ACT_BLOCK) {
            let te = (tb + ACT_BLOCK).min(n);
            let rows = out.len() / n;
            // Four weight rows by four activation rows at a time in 512-bit registers where a prompt runs
            // them (`Isa::for_rows`): the same sums lane for lane as the 256-bit loop, so the same bits.
            let quads = if wide { rows / 4 * 4 } else { 0 };
            #[cfg(target_arch = "x86_64")]
            for i in (0..quads).step_by(4) {
                let w4 = &w.data[(r0 + i) * k..(r0 + i + 4) * k];
                for t0 in (tb..te).step_by(4).filter(|t0| t0 + 4 <= te) {
                    let mut r = [[0f32; 4]; 4];
                    // SAFETY: the 512-bit path means AVX-512 F/BW with AVX2, FMA and F16C were detected;
                    // `w4` holds four rows of `k`, the slice of `x` four rows of `k`.
                    unsafe {
                        match w.kind {
                            HalfKind::Bf16 => avx512::dots4x4::<true>(w4, k, &x[t0 * k..(t0 + 4) * k], &mut r),
                            HalfKind::F16 => avx512::dots4x4::<false>(w4, k, &x[t0 * k..(t0 + 4) * k], &mut r),
                        }
                    }
                    for (j, rj) in r.iter().enumerate() {
                        out[(i + j) * n + t0..(i + j) * n + t0 + 4].copy_from_slice(rj);
                    }
                }
            }
            for (i, o) in out.chunks_exact_mut(n).enumerate() {
                let row = &w.data[(r0 + i) * k..(r0 + i + 1) * k];
                for t0 in (tb..te).step_by(4) {
                    let t1 = (t0 + 4).min(te);
                    if i < quads && t1 - t0 == 4 {
                        continue; // done above
                    }
                    dots(isa, w.kind, row, &x[t0 * k..t1 * k], &mut o[t0..t1]);
                }
            }
        }
    });
}

/// Activation rows per cache block of `half_matmul_on`: 32 rows of 576 f32 are 72 KiB (L2), of 4096 576 KiB.
const ACT_BLOCK: usize = 32;

/// `out[j] = row · xs[j]` for the (up to four) activation rows in `xs`.
fn dots(isa: Isa, kind: HalfKind, row: &[u16], xs: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if isa.avx2() {
        // SAFETY: an AVX2 path means AVX2, FMA and F16C were detected; `xs` holds `out.len()` rows of
        // `row.len()` values.
        unsafe {
            match (kind, out.len()) {
                (HalfKind::Bf16, 1) => avx2::dots::<1, true>(row, xs, out),
                (HalfKind::Bf16, 2) => avx2::dots::<2, true>(row, xs, out),
                (HalfKind::Bf16, 3) => avx2::dots::<3, true>(row, xs, out),
                (HalfKind::Bf16, _) => avx2::dots::<4, true>(row, xs, out),
                (HalfKind::F16, 1) => avx2::dots::<1, false>(row, xs, out),
                (HalfKind::F16, 2) => avx2::dots::<2, false>(row, xs, out),
                (HalfKind::F16, 3) => avx2::dots::<3, false>(row, xs, out),
                (HalfKind::F16, _) => avx2::dots::<4, false>(row, xs, out),
            }
        }
        return;
    }
    let _ = isa;
    for (o, x) in out.iter_mut().zip(xs.chunks_exact(row.len())) {
        *o = dot_portable(kind, row, x);
    }
}

/// The sixteen-lane summation order of the module header, in scalar code.
fn dot_portable(kind: HalfKind, row: &[u16], x: &[f32]) -> f32 {
    let body = row.len() / 16 * 16;
    let mut lanes = [0f32; 16];
    for (w, x) in row[..body].chunks_exact(16).zip(x[..body].chunks_exact(16)) {
        for l in 0..16 {
            lanes[l] = kind.to_f32(w[l]).mul_add(x[l], lanes[l]);
        }
    }
    let mut v: [f32; 8] = std::array::from_fn(|l| lanes[l] + lanes[l + 8]);
    // The fold `hsum` does: halves, then pairs, then the last two.
    for half in [4, 2, 1] {
        for l in 0..half {
            v[l] += v[l + half];
        }
    }
    let mut s = v[0];
    for (w, x) in row[body..].iter().zip(&x[body..]) {
        s = kind.to_f32(*w).mul_add(*x, s);
    }
    s
}

/// Plain reference: f64 sums of the exact products.
pub fn half_matmul_reference(w: &HalfMatrix, x: &[f32], y: &mut [f32]) {
    let k = w.cols;
    for (xr, yr) in x.chunks_exact(k).zip(y.chunks_exact_mut(w.rows)) {
        for (r, o) in yr.iter_mut().enumerate() {
            let row = &w.data[r * k..(r + 1) * k];
            *o = row.iter().zip(xr).map(|(&b, &v)| w.kind.to_f32(b) as f64 * v as f64).sum::<f64>() as f32;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// Eight weights at `p` as f32: bf16 shifted into the high half, or f16 converted.
    #[inline(always)]
    unsafe fn load8<const BF16: bool>(p: *const u16) -> __m256 {
        let h = _mm_loadu_si128(p as *const __m128i);
        if BF16 {
            _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
        } else {
            _mm256_cvtph_ps(h)
        }
    }

    /// `(((v0+v4)+(v2+v6)) + ((v1+v5)+(v3+v7)))`: halves, pairs, then the last two (the portable fold).
    #[inline(always)]
    pub(super) unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    /// `out[j] = row · x_j` for `R` activation rows `xs` (`[R, row.len()]`).
    ///
    /// # Safety
    /// AVX2, FMA and F16C available; `xs.len() == R · row.len()`, `out.len() == R`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dots<const R: usize, const BF16: bool>(row: &[u16], xs: &[f32], out: &mut [f32]) {
        let k = row.len();
        debug_assert!(xs.len() == R * k && out.len() == R);
        let body = k / 16 * 16;
        let (wp, xp) = (row.as_ptr(), xs.as_ptr());
        let mut a0 = [_mm256_setzero_ps(); R];
        let mut a1 = [_mm256_setzero_ps(); R];
        let mut i = 0;
        while i < body {
            let w0 = load8::<BF16>(wp.add(i));
            let w1 = load8::<BF16>(wp.add(i + 8));
            for j in 0..R {
                a0[j] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xp.add(j * k + i)), a0[j]);
                a1[j] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xp.add(j * k + i + 8)), a1[j]);
            }
            i += 16;
        }
        for j in 0..R {
            out[j] = finish::<BF16>(_mm256_add_ps(a0[j], a1[j]), wp, xp.add(j * k), body, k);
        }
    }

    /// A pair's sum from its lane-wise added accumulators: folded, then the tail `body .. k` in order.
    #[inline(always)]
    pub(super) unsafe fn finish<const BF16: bool>(
        v: __m256,
        wp: *const u16,
        xp: *const f32,
        body: usize,
        k: usize,
    ) -> f32 {
        let mut s = hsum(v);
        for c in body..k {
            let w = if BF16 {
                f32::from_bits((*wp.add(c) as u32) << 16)
            } else {
                half::f16::from_bits(*wp.add(c)).to_f32()
            };
            s = w.mul_add(*xp.add(c), s);
        }
        s
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::avx2::finish;
    use std::arch::x86_64::*;

    /// Sixteen weights at `p` as f32.
    #[inline(always)]
    unsafe fn load16<const BF16: bool>(p: *const u16) -> __m512 {
        let h = _mm256_loadu_si256(p as *const __m256i);
        if BF16 {
            _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16))
        } else {
            _mm512_cvtph_ps(h)
        }
    }

    /// `out[r][t] = w_r · x_t` for four weight rows `w4` (`[4, k]`) and four activation rows `xs` (`[4, k]`):
    /// one 16-lane accumulator per pair, whose lanes 0..8 and 8..16 are the 256-bit loop's two accumulators,
    /// added and folded as it does.
    ///
    /// # Safety
    /// AVX-512 F with AVX2, FMA and F16C available; `w4.len() == xs.len() == 4 · k`.
    #[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
    pub(super) unsafe fn dots4x4<const BF16: bool>(w4: &[u16], k: usize, xs: &[f32], out: &mut [[f32; 4]; 4]) {
        debug_assert!(w4.len() == 4 * k && xs.len() == 4 * k);
        let body = k / 16 * 16;
        let (wp, xp) = (w4.as_ptr(), xs.as_ptr());
        let mut acc = [[_mm512_setzero_ps(); 4]; 4];
        let mut i = 0;
        while i < body {
            let w = [
                load16::<BF16>(wp.add(i)),
                load16::<BF16>(wp.add(k + i)),
                load16::<BF16>(wp.add(2 * k + i)),
                load16::<BF16>(wp.add(3 * k + i)),
            ];
            for t in 0..4 {
                let x = _mm512_loadu_ps(xp.add(t * k + i));
                for (a, wr) in acc.iter_mut().zip(&w) {
                    a[t] = _mm512_fmadd_ps(*wr, x, a[t]);
                }
            }
            i += 16;
        }
        for r in 0..4 {
            for t in 0..4 {
                let a = acc[r][t];
                let lo = _mm512_castps512_ps256(a);
                let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1));
                out[r][t] = finish::<BF16>(_mm256_add_ps(lo, hi), wp.add(r * k), xp.add(t * k), body, k);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random(n: usize, seed: &mut u64) -> Vec<f32> {
        (0..n)
            .map(|_| {
                *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    fn matrix(kind: HalfKind, rows: usize, cols: usize, seed: &mut u64) -> HalfMatrix {
        let bytes: Vec<u8> = random(rows * cols, seed)
            .into_iter()
            .flat_map(|v| match kind {
                HalfKind::Bf16 => bf16::from_f32(v).to_le_bytes(),
                HalfKind::F16 => f16::from_f32(v).to_le_bytes(),
            })
            .collect();
        HalfMatrix::from_le_bytes(kind, rows, cols, &bytes).unwrap()
    }

    /// Random shapes (columns with and without a 16-value tail, row counts across task splits, 1..9
    /// activation rows) against the f64 reference, on every instruction set of this CPU, stored and added.
    #[test]
    fn matches_the_reference_on_random_shapes() {
        let mut seed = 7;
        for kind in [HalfKind::Bf16, HalfKind::F16] {
            for (rows, cols, n) in
                [(1, 16, 1), (37, 72, 3), (64, 576, 9), (130, 40, 5), (9, 7, 2), (300, 256, 1), (23, 136, 67)]
            {
                let w = matrix(kind, rows, cols, &mut seed);
                let x = random(n * cols, &mut seed);
                let mut want = vec![0f32; n * rows];
                half_matmul_reference(&w, &x, &mut want);
                for isa in Isa::all_on_this_cpu() {
                    let mut y = vec![0f32; n * rows];
                    half_matmul_on(isa, &w, &x, &mut y, false);
                    let err = y.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                    assert!(err < 1e-4 * (cols as f32).sqrt(), "{kind:?} {isa:?} [{rows}, {cols}] x {n}: {err}");
                    let mut y2 = vec![1f32; n * rows];
                    half_matmul_on(isa, &w, &x, &mut y2, true);
                    assert!(y2.iter().zip(&y).all(|(a, b)| (a - 1.0 - b).abs() < 1e-5), "{kind:?} {isa:?}: add");
                }
            }
        }
    }

    /// A row's result is bitwise the same alone and in any batch (decode or prefill: 70 rows run the 512-bit
    /// four-by-four blocks where the CPU has them, one row the 256-bit loop), on every ISA; the portable path
    /// sums in the same order as the vector ones.
    #[test]
    fn rows_are_bitwise_independent_of_the_batch() {
        let mut seed = 11;
        for (kind, n) in [(HalfKind::Bf16, 7), (HalfKind::F16, 7), (HalfKind::Bf16, 70), (HalfKind::F16, 70)] {
            let (rows, cols) = (42, 200);
            let w = matrix(kind, rows, cols, &mut seed);
            let x = random(n * cols, &mut seed);
            let mut first: Option<Vec<f32>> = None;
            for isa in Isa::all_on_this_cpu() {
                let mut all = vec![0f32; n * rows];
                half_matmul_on(isa, &w, &x, &mut all, false);
                for t in 0..n {
                    let mut one = vec![0f32; rows];
                    half_matmul_on(isa, &w, &x[t * cols..(t + 1) * cols], &mut one, false);
                    assert_eq!(one[..], all[t * rows..(t + 1) * rows], "{kind:?} {isa:?}: row {t}");
                }
                match &first {
                    None => first = Some(all),
                    Some(f) => assert_eq!(f[..], all[..], "{kind:?} {isa:?} differs from the first ISA"),
                }
            }
        }
    }

    #[test]
    fn concat_and_rows_round_trip() {
        let mut seed = 3;
        let a = matrix(HalfKind::Bf16, 3, 32, &mut seed);
        let b = matrix(HalfKind::Bf16, 5, 32, &mut seed);
        let c = HalfMatrix::concat_rows(&[a.clone(), b.clone()]).unwrap();
        assert_eq!(c.rows(), 8);
        let (mut r1, mut r2) = (vec![0f32; 32], vec![0f32; 32]);
        c.dequantize_row(4, &mut r1);
        b.dequantize_row(1, &mut r2);
        assert_eq!(r1, r2);
        assert!(HalfMatrix::concat_rows(&[a, matrix(HalfKind::F16, 1, 32, &mut seed)]).is_err());
        assert!(HalfMatrix::from_le_bytes(HalfKind::F16, 2, 2, &[0; 6]).is_err());
    }
}
