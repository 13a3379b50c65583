//! Matrix products with f32 weights for many activation rows (vision encoders, attention over a whole image):
//! `y[n, m] (+)= x[n, k] · Wᵀ` with `W` `[m, k]`.
//!
//! The weights are packed once into panels of 32 output columns, each `[k, 32]` contiguous and zero-padded:
//!
//! ```text
//!   panel p: for kk in 0..k: W[32p .. 32p+32][kk]      (one 64-byte line per kk, two 512-bit vectors)
//! ```
//!
//! With AVX-512 the micro-kernel keeps an 8 × 32 block of `y` in 16 registers: per `kk` it loads the panel's
//! two vectors once and adds them, scaled by each of 8 rows' `x[r][kk]` (broadcast), into the block: 16 fused
//! multiply-adds per 10 loads. Tasks (on the kernel pool) take runs of 8 activation rows. Elsewhere a plain
//! loop over the same panels runs (the compiler vectorizes it).

use crate::pool::for_each_chunk_mut;

/// Output columns per panel.
const NR: usize = 32;
/// Activation rows per micro-kernel call.
const MR: usize = 8;

/// A `[rows, cols]` f32 weight matrix, packed for [`f32_matmul`].
#[derive(Clone, Debug)]
pub struct F32Matrix {
    rows: usize,
    cols: usize,
    panels: Vec<f32>,
}

impl F32Matrix {
    /// Packs row-major `[rows, cols]` weights (a linear layer's `[out, in]`).
    pub fn from_rows(rows: usize, cols: usize, w: &[f32]) -> Self {
        assert_eq!(w.len(), rows * cols, "F32Matrix::from_rows: {rows} x {cols} does not fit {}", w.len());
        Self::pack(rows, cols, |r, c| w[r * cols + c])
    }

    /// Packs the transpose of row-major `[cols, rows]` values (the right-hand side of `x · B` with `B`
    /// `[k, m]`, e.g. attention's values).
    pub fn from_columns(rows: usize, cols: usize, b: &[f32]) -> Self {
        assert_eq!(b.len(), rows * cols, "F32Matrix::from_columns: {cols} x {rows} does not fit {}", b.len());
        Self::pack(rows, cols, |r, c| b[c * rows + r])
    }

    fn pack(rows: usize, cols: usize, at: impl Fn(usize, usize) -> f32) -> Self {
        let np = rows.div_ceil(NR);
        let mut panels = vec![0f32; np * cols * NR];
        for (p, panel) in panels.chunks_exact_mut(cols * NR).enumerate() {
            for (kk, line) in panel.chunks_exact_mut(NR).enumerate() {
                for (j, v) in line.iter_mut().enumerate() {
                    let r = p * NR + j;
                    if r < rows {
                        *v = at(r, kk);
                    }
                }
            }
        }
        Self { rows, cols, panels }
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Row `r` (exact) into `out`.
    pub fn row(&self, r: usize, out: &mut [f32]) {
        let panel = &self.panels[r / NR * self.cols * NR..(r / NR + 1) * self.cols * NR];
        for (o, line) in out.iter_mut().zip(panel.chunks_exact(NR)) {
            *o = line[r % NR];
        }
    }
}

/// `y[n, rows] = x[n, cols] · Wᵀ` (`add`: `y +=`), `n = x.len() / cols`.
pub fn f32_matmul(w: &F32Matrix, x: &[f32], y: &mut [f32], add: bool) {
    let (k, m) = (w.cols, w.rows);
    assert!(k > 0 && x.len().is_multiple_of(k), "f32_matmul: {} activations for {k} columns", x.len());
    let n = x.len() / k;
    assert_eq!(y.len(), n * m, "f32_matmul: output of {} for {n} x {m}", y.len());
    if n == 0 {
        return;
    }
    let wide = avx512();
    let threads = crate::pool::global().threads();
    let blocks = n.div_ceil(MR);
    if blocks >= threads * 2 {
        // Many rows (prompts, images): tasks of whole micro-kernel row blocks, a few per thread so each panel
        // is read few times.
        let per_task = blocks.div_ceil(threads * 2).max(1);
        for_each_chunk_mut(y, per_task * MR * m, |t, out| {
            let r0 = t * per_task * MR;
            let rows = out.len() / m;
            product(w, &x[r0 * k..(r0 + rows) * k], out, add, wide);
        });
        return;
    }
    // Few rows (decode): tasks of panels, each writing its panels' `[n, 32]` results into a panel-major
    // buffer, copied into `y` after.
    let np = w.panels.len() / (k * NR);
    let per_task = np.div_ceil(threads * 4).max(1);
    let mut yt = vec![0f32; np * n * NR];
    for_each_chunk_mut(&mut yt, per_task * n * NR, |t, out| {
        for (i, o) in out.chunks_exact_mut(n * NR).enumerate() {
            let p = t * per_task + i;
            panel_rows(&w.panels[p * k * NR..(p + 1) * k * NR], x, k, wide, |r, acc| {
                o[r * NR..(r + 1) * NR].copy_from_slice(acc)
            });
        }
    });
    for (p, panel) in yt.chunks_exact(n * NR).enumerate() {
        let (c0, width) = (p * NR, NR.min(m - p * NR));
        for (r, src) in panel.chunks_exact(NR).enumerate() {
            let dst = &mut y[r * m + c0..r * m + c0 + width];
            if add {
                dst.iter_mut().zip(src).for_each(|(d, v)| *d += v);
            } else {
                dst.copy_from_slice(&src[..width]);
            }
        }
    }
}

/// [`f32_matmul`] on the calling thread only (for callers that are themselves tasks on the pool).
pub fn f32_matmul_serial(w: &F32Matrix, x: &[f32], y: &mut [f32], add: bool) {
    let (k, m) = (w.cols, w.rows);
    assert!(k > 0 && x.len().is_multiple_of(k), "f32_matmul: {} activations for {k} columns", x.len());
    assert_eq!(y.len(), x.len() / k * m, "f32_matmul: output of {} for {} x {m}", y.len(), x.len() / k);
    product(w, x, y, add, avx512());
}

/// Activation values per band of rows in [`product`] (512 KB): a band stays in the L2 cache while every panel passes
/// over it.
const BAND_VALUES: usize = 131072;

/// `out[rows, m] (+)= xs[rows, k] · Wᵀ`: bands of rows (a multiple of 8, about `BAND_VALUES` activations),
/// each band panel by panel, 8 rows at a time.
fn product(w: &F32Matrix, xs: &[f32], out: &mut [f32], add: bool, wide: bool) {
    let (k, m) = (w.cols, w.rows);
    let band = (BAND_VALUES / k).max(1).div_ceil(MR) * MR;
    for (xb, ob) in xs.chunks(band * k).zip(out.chunks_mut(band * m)) {
        for (p, panel) in w.panels.chunks_exact(k * NR).enumerate() {
            let (c0, width) = (p * NR, NR.min(m - p * NR));
            panel_rows(panel, xb, k, wide, |r, acc| {
                let dst = &mut ob[r * m + c0..r * m + c0 + width];
                if add {
                    dst.iter_mut().zip(acc).for_each(|(d, v)| *d += v);
                } else {
                    dst.copy_from_slice(&acc[..width]);
                }
            });
        }
    }
}

/// One panel's 32 outputs for every row of `xs`, handed to `put(row, outputs)`, 8 rows at a time.
fn panel_rows(panel: &[f32], xs: &[f32], k: usize, wide: bool, mut put: impl FnMut(usize, &[f32; NR])) {
    let rows = xs.len() / k;
    for b in (0..rows).step_by(MR) {
        let r = MR.min(rows - b);
        let mut acc = [[0f32; NR]; MR];
        #[cfg(target_arch = "x86_64")]
        if wide {
            // SAFETY: AVX-512F was detected; `xs` holds `r` rows of `k` from row `b`, `panel` `k` lines.
            unsafe { avx512_block(&xs[b * k..(b + r) * k], k, r, panel, &mut acc) };
        } else {
            block(&xs[b * k..(b + r) * k], k, r, panel, &mut acc);
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = wide;
            block(&xs[b * k..(b + r) * k], k, r, panel, &mut acc);
        }
        for (i, a) in acc.iter().enumerate().take(r) {
            put(b + i, a);
        }
    }
}

fn avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        crate::quant::Isa::detected() == crate::quant::Isa::Avx512 && std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// The portable micro-kernel: `acc[i] = Σ_kk x[i][kk] · panel[kk]` for `r` rows.
fn block(x: &[f32], k: usize, r: usize, panel: &[f32], acc: &mut [[f32; NR]; MR]) {
    for (i, a) in acc.iter_mut().enumerate().take(r) {
        let xr = &x[i * k..(i + 1) * k];
        for (xv, line) in xr.iter().zip(panel.chunks_exact(NR)) {
            for (o, w) in a.iter_mut().zip(line) {
                *o += xv * w;
            }
        }
    }
}

/// The AVX-512 micro-kernel (see the module header), for `r ≤ 8` rows.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn avx512_block(x: &[f32], k: usize, r: usize, panel: &[f32], acc: &mut [[f32; NR]; MR]) {
    match r {
        8 => avx512_rows::<8>(x, k, panel, acc),
        7 => avx512_rows::<7>(x, k, panel, acc),
        6 => avx512_rows::<6>(x, k, panel, acc),
        5 => avx512_rows::<5>(x, k, panel, acc),
        4 => avx512_rows::<4>(x, k, panel, acc),
        3 => avx512_rows::<3>(x, k, panel, acc),
        2 => avx512_rows::<2>(x, k, panel, acc),
        _ => avx512_rows::<1>(x, k, panel, acc),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn avx512_rows<const R: usize>(x: &[f32], k: usize, panel: &[f32], acc: &mut [[f32; NR]; MR]) {
    use std::arch::x86_64::*;
    debug_assert!(x.len() >= R * k && panel.len() >= k * NR);
    let mut lo = [_mm512_setzero_ps(); R];
    let mut hi = [_mm512_setzero_ps(); R];
    let (xp, pp) = (x.as_ptr(), panel.as_ptr());
    for kk in 0..k {
        // SAFETY: `kk < k`, so line `kk` of the panel (32 values) and `x[i][kk]` for `i < R` are in bounds.
        let b0 = _mm512_loadu_ps(pp.add(kk * NR));
        let b1 = _mm512_loadu_ps(pp.add(kk * NR + 16));
        for i in 0..R {
            let a = _mm512_set1_ps(*xp.add(i * k + kk));
            lo[i] = _mm512_fmadd_ps(a, b0, lo[i]);
            hi[i] = _mm512_fmadd_ps(a, b1, hi[i]);
        }
    }
    for i in 0..R {
        _mm512_storeu_ps(acc[i].as_mut_ptr(), lo[i]);
        _mm512_storeu_ps(acc[i].as_mut_ptr().add(16), hi[i]);
    }
}

/// The plain product, in f64 (for tests).
pub fn f32_matmul_reference(w: &[f32], rows: usize, cols: usize, x: &[f32]) -> Vec<f32> {
    x.chunks_exact(cols)
        .flat_map(|xr| {
            (0..rows).map(move |r| {
                w[r * cols..(r + 1) * cols].iter().zip(xr).map(|(&a, &b)| a as f64 * b as f64).sum::<f64>() as f32
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rand(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn matches_the_reference_on_odd_shapes_and_adds() {
        // (1100, 250, 40): several bands of rows (`BAND_VALUES`), the last one short.
        for (n, k, m) in [
            (1, 1, 1),
            (3, 5, 7),
            (8, 64, 32),
            (9, 33, 65),
            (21, 100, 31),
            (64, 384, 96),
            (130, 17, 200),
            (1100, 250, 40),
        ] {
            let w = rand(m * k, (n * 31 + k * 7 + m) as u64);
            let x = rand(n * k, (n + k + m) as u64);
            let want = f32_matmul_reference(&w, m, k, &x);
            let mut y = vec![0f32; n * m];
            f32_matmul(&F32Matrix::from_rows(m, k, &w), &x, &mut y, false);
            let tol = 1e-5 * k as f32;
            for (a, b) in y.iter().zip(&want) {
                assert!((a - b).abs() <= tol, "{n}x{k}x{m}: {a} vs {b}");
            }
            let mut y2 = vec![1f32; n * m];
            f32_matmul(&F32Matrix::from_rows(m, k, &w), &x, &mut y2, true);
            for (a, b) in y2.iter().zip(&want) {
                assert!((a - 1.0 - b).abs() <= tol, "add {n}x{k}x{m}: {a} vs {b}");
            }
            // The same product from the transposed layout.
            let mut wt = vec![0f32; m * k];
            for r in 0..m {
                for c in 0..k {
                    wt[c * m + r] = w[r * k + c];
                }
            }
            let mut y3 = vec![0f32; n * m];
            f32_matmul(&F32Matrix::from_columns(m, k, &wt), &x, &mut y3, false);
            assert_eq!(y3, y, "{n}x{k}x{m}: from_columns");
            let mut y4 = vec![0f32; n * m];
            f32_matmul_serial(&F32Matrix::from_rows(m, k, &w), &x, &mut y4, false);
            assert_eq!(y4, y, "{n}x{k}x{m}: serial");
            let mut row = vec![0f32; k];
            F32Matrix::from_rows(m, k, &w).row(m - 1, &mut row);
            assert_eq!(row, w[(m - 1) * k..]);
        }
    }

    #[test]
    fn the_portable_kernel_agrees_with_the_fast_one() {
        let (n, k, m) = (13, 70, 40);
        let (w, x) = (rand(m * k, 1), rand(n * k, 2));
        let wm = F32Matrix::from_rows(m, k, &w);
        let mut fast = vec![0f32; n * m];
        f32_matmul(&wm, &x, &mut fast, false);
        let panel = &wm.panels[..k * NR];
        let mut acc = [[0f32; NR]; MR];
        block(&x[..MR * k], k, MR, panel, &mut acc);
        for i in 0..MR {
            for j in 0..NR {
                assert!((acc[i][j] - fast[i * m + j]).abs() <= 1e-4, "{i},{j}");
            }
        }
    }
}
