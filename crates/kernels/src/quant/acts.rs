//! Activations rounded to 8- or 16-bit integers per 32-value block for the integer matmul paths (`Q8Acts`),
//! with the fused steps that produce them (RMS norm, SwiGLU).

use super::*;

/// Activations rounded per block to integers `v`: `x ≈ d · v`, and per block `s = d · Σ v`.
/// 8 bits: `v` in `qs`, within ±127. 16 bits: `v` in `x16`, within ±32767.
pub struct Q8Acts {
    pub(super) k: usize,
    /// 16-bit values (in `x16`) rather than 8-bit (in `qs`); kept apart from the buffers so that an empty
    /// batch still knows its width.
    pub(super) wide: bool,
    /// 8-bit values; empty for 16-bit activations.
    pub(super) qs: Vec<i8>,
    /// 16-bit values; empty for 8-bit activations.
    pub(super) x16: Vec<i16>,
    pub(super) d: Vec<f32>,
    pub(super) s: Vec<f32>,
}

/// `1 / scale`, or 0 where that would overflow (a block of values below ~1e-35, or all zeros): such a block
/// rounds to zeros instead of `0 · inf = NaN`.
#[inline(always)]
pub(super) fn inverse_scale(scale: f32) -> f32 {
    if scale >= f32::MIN_POSITIVE {
        1.0 / scale
    } else {
        0.0
    }
}

/// Largest 16-bit activation magnitude.
pub(super) const WIDE_MAX: f32 = 32767.0;

/// How each row of activations is made before it is rounded (`Q8Acts::build`).
#[derive(Clone, Copy)]
pub(super) enum RowSource<'a> {
    /// `x` (`[n, k]`) as it is.
    Plain(&'a [f32]),
    /// The RMS norm of `x` (`[n, k]`) with weight `w` (`crate::vec::rms_norm`).
    Normed { x: &'a [f32], w: &'a [f32], eps: f32 },
    /// SwiGLU of `gate_up` (`[n, 2k]`: each row the `k` gate values, then the `k` up values; `crate::vec::swiglu`).
    Gated(&'a [f32]),
}

/// Activation rows per task when they are built over the pool; fewer than two tasks' worth run on the caller.
pub(super) const ROWS_PER_TASK: usize = 32;

/// The value buffers of a `Q8Acts` under construction, for tasks that each fill their own rows.
pub(super) struct RowsOut {
    pub(super) qs: *mut i8,
    pub(super) x16: *mut i16,
    pub(super) d: *mut f32,
    pub(super) s: *mut f32,
    pub(super) k: usize,
    pub(super) wide: bool,
}

// SAFETY: `row`'s contract makes concurrent writers disjoint; `Q8Acts::build` keeps the buffers alive and
// otherwise untouched while tasks run.
unsafe impl Sync for RowsOut {}

impl RowsOut {
    /// Row `r`'s values (the unused width's slice is empty), scales and sums.
    ///
    /// # Safety
    /// `r` is a row of the buffers, and no one else uses row `r` while the slices live.
    #[allow(clippy::mut_from_ref)]
    pub(super) unsafe fn row(&self, r: usize) -> (&mut [i8], &mut [i16], &mut [f32], &mut [f32]) {
        let (k, nb) = (self.k, self.k / BLOCK);
        let (qs, x16) = if self.wide {
            (&mut [][..], std::slice::from_raw_parts_mut(self.x16.add(r * k), k))
        } else {
            (std::slice::from_raw_parts_mut(self.qs.add(r * k), k), &mut [][..])
        };
        (
            qs,
            x16,
            std::slice::from_raw_parts_mut(self.d.add(r * nb), nb),
            std::slice::from_raw_parts_mut(self.s.add(r * nb), nb),
        )
    }
}

impl Q8Acts {
    /// `x` is `[n, k]`; each 32-value block gets its own scale `max|x| / 127`.
    pub fn quantize(x: &[f32], k: usize) -> Self {
        Self::quantize_to(x, k, false)
    }

    /// `quantize` to 16 bits: scale `max|x| / 32767`.
    pub fn quantize_wide(x: &[f32], k: usize) -> Self {
        Self::quantize_to(x, k, true)
    }

    pub(super) fn quantize_to(x: &[f32], k: usize, wide: bool) -> Self {
        Self::build(Isa::detected(), RowSource::Plain(x), x.len() / k.max(1), k, wide)
    }

    /// The plain version of `quantize_to` (the AVX2 one gives bitwise the same result).
    #[cfg(all(test, target_arch = "x86_64"))]
    pub(super) fn quantize_portable(x: &[f32], k: usize, wide: bool) -> Self {
        Self::build(Isa::Portable, RowSource::Plain(x), x.len() / k, k, wide)
    }

    /// The rows of `crate::vec::rms_norm(x, w, eps)` (`x` is `[n, w.len()]`), rounded as `quantize` (or
    /// `quantize_wide`) rounds them, bitwise, without the normed rows ever being written out: norm and
    /// rounding in one pass.
    pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, wide: bool) -> Self {
        Self::rms_norm_on(Isa::detected(), x, w, eps, wide)
    }

    /// `rms_norm` on a given instruction set (tests force each one).
    pub fn rms_norm_on(isa: Isa, x: &[f32], w: &[f32], eps: f32, wide: bool) -> Self {
        let k = w.len();
        assert!(k > 0 && x.len().is_multiple_of(k), "rms_norm: x is not whole rows of the weight's length");
        Self::build(isa, RowSource::Normed { x, w, eps }, x.len() / k, k, wide)
    }

    /// `silu(gate) · up` (`crate::vec::swiglu`) of each row of `gate_up` (`[n, 2k]`: the `k` gate values, then
    /// the `k` up values), rounded as `quantize` (or `quantize_wide`) rounds it, bitwise, in one pass.
    pub fn swiglu(gate_up: &[f32], k: usize, wide: bool) -> Self {
        Self::swiglu_on(Isa::detected(), gate_up, k, wide)
    }

    /// `swiglu` on a given instruction set (tests force each one).
    pub fn swiglu_on(isa: Isa, gate_up: &[f32], k: usize, wide: bool) -> Self {
        assert!(k > 0 && gate_up.len().is_multiple_of(2 * k), "swiglu: gate_up is not whole rows of 2k values");
        Self::build(isa, RowSource::Gated(gate_up), gate_up.len() / (2 * k), k, wide)
    }

    /// Activation rows held.
    pub fn rows(&self) -> usize {
        self.d.len() * BLOCK / self.k
    }

    /// Values per row.
    pub fn cols(&self) -> usize {
        self.k
    }

    /// Whether the values are 16-bit (`Activations::Int16`) rather than 8-bit.
    pub fn wide(&self) -> bool {
        self.is_wide()
    }

    /// `n` rows of `k` values from `src`, each row made and rounded in one pass; over the pool for long
    /// batches (rows are independent, so the split does not change any result).
    pub(super) fn build(isa: Isa, src: RowSource<'_>, n: usize, k: usize, wide: bool) -> Self {
        assert!(isa.on_this_cpu(), "{isa:?} kernels asked for on a CPU without them");
        assert!(k > 0 && k.is_multiple_of(BLOCK), "activation rows of {k} values are not whole 32-value blocks");
        let need = match src {
            RowSource::Plain(x) | RowSource::Normed { x, .. } => x.len(),
            RowSource::Gated(gu) => gu.len() / 2,
        };
        assert_eq!(need, n * k, "activation length");
        let nb_total = n * k / BLOCK;
        let (mut d, mut s) = (vec![0f32; nb_total], vec![0f32; nb_total]);
        let mut qs = vec![0i8; if wide { 0 } else { n * k }];
        let mut x16 = vec![0i16; if wide { n * k } else { 0 }];
        let out = RowsOut { qs: qs.as_mut_ptr(), x16: x16.as_mut_ptr(), d: d.as_mut_ptr(), s: s.as_mut_ptr(), k, wide };
        let fill = |r0: usize, r1: usize| {
            // The portable path's row of values before rounding (unused on AVX2), one per task.
            let mut vals = Vec::new();
            for r in r0..r1 {
                // SAFETY: `r < n`, and each row is filled by exactly one task.
                let (q, x, dd, ss) = unsafe { out.row(r) };
                fill_row(isa, src, r, k, &mut vals, q, x, dd, ss);
            }
        };
        let tasks = n / ROWS_PER_TASK;
        if tasks >= 2 {
            crate::pool::global().run(tasks, &|t, _| {
                let r1 = if t + 1 == tasks { n } else { (t + 1) * ROWS_PER_TASK };
                fill(t * ROWS_PER_TASK, r1)
            });
        } else {
            fill(0, n);
        }
        Self { k, wide, qs, x16, d, s }
    }

    pub(super) fn is_wide(&self) -> bool {
        self.wide
    }

    /// The integer value of activation `i` (over all rows).
    #[inline(always)]
    pub(super) fn value(&self, i: usize) -> i32 {
        if self.is_wide() {
            self.x16[i] as i32
        } else {
            self.qs[i] as i32
        }
    }
}

/// Makes row `r` of `src` (`k` values) and rounds it into that row's buffers (`qs` or `x16` by width); the
/// portable path makes the row in `vals` first.
#[allow(clippy::too_many_arguments)]
pub(super) fn fill_row(
    isa: Isa,
    src: RowSource<'_>,
    r: usize,
    k: usize,
    vals: &mut Vec<f32>,
    qs: &mut [i8],
    x16: &mut [i16],
    d: &mut [f32],
    s: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if isa.avx2() {
        let wide = !x16.is_empty();
        // SAFETY: an AVX2 path means AVX2, FMA and F16C were detected; each source reads row `r` (checked
        // lengths in `build`), and the buffers hold this row's `k` values and `k / 32` scales and sums.
        unsafe {
            match src {
                RowSource::Plain(x) => round_row(&avx2::Plain(x[r * k..(r + 1) * k].as_ptr()), wide, qs, x16, d, s),
                RowSource::Normed { x, w, eps } => {
                    let xr = &x[r * k..(r + 1) * k];
                    let inv = crate::vec::inv_rms_on(isa, xr, eps);
                    round_row(&avx2::Normed { x: xr.as_ptr(), w: w.as_ptr(), inv }, wide, qs, x16, d, s)
                }
                RowSource::Gated(gu) => {
                    let gr = &gu[2 * r * k..2 * (r + 1) * k];
                    round_row(&avx2::Gated { gate: gr.as_ptr(), up: gr[k..].as_ptr() }, wide, qs, x16, d, s)
                }
            }
        }
        return;
    }
    let row: &[f32] = match src {
        RowSource::Plain(x) => &x[r * k..(r + 1) * k],
        RowSource::Normed { x, w, eps } => {
            vals.resize(k, 0.0);
            crate::vec::rms_norm_on(isa, &x[r * k..(r + 1) * k], w, eps, vals);
            vals
        }
        RowSource::Gated(gu) => {
            let gr = &gu[2 * r * k..2 * (r + 1) * k];
            vals.clear();
            vals.extend_from_slice(&gr[..k]);
            crate::vec::swiglu_on(isa, vals, &gr[k..]);
            vals
        }
    };
    round_row_portable(row, qs, x16, d, s);
}

/// `avx2::quantize` at the buffers' width.
///
/// SAFETY (caller): as `avx2::quantize`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(super) unsafe fn round_row<S: avx2::Blocks>(
    src: &S,
    wide: bool,
    qs: &mut [i8],
    x16: &mut [i16],
    d: &mut [f32],
    s: &mut [f32],
) {
    if wide {
        avx2::quantize::<true, S>(src, qs, x16, d, s)
    } else {
        avx2::quantize::<false, S>(src, qs, x16, d, s)
    }
}

/// Rounds `x` per 32-value block into `qs` (8 bits) or, where `x16` is not empty, `x16` (16 bits), with the
/// blocks' scales in `d` and `scale · Σ q` in `s`.
pub(super) fn round_row_portable(x: &[f32], qs: &mut [i8], x16: &mut [i16], d: &mut [f32], s: &mut [f32]) {
    let wide = !x16.is_empty();
    let top = if wide { WIDE_MAX } else { 127.0 };
    for (i, blk) in x.chunks_exact(BLOCK).enumerate() {
        let amax = blk.iter().fold(0f32, |a, v| a.max(v.abs()));
        let scale = amax / top;
        let inv = inverse_scale(scale);
        let mut sum = 0i32;
        for (j, v) in blk.iter().enumerate() {
            let q = ((v * inv).round() as i32).clamp(-(top as i32), top as i32);
            if wide {
                x16[i * BLOCK + j] = q as i16;
            } else {
                qs[i * BLOCK + j] = q as i8;
            }
            sum += q;
        }
        d[i] = scale;
        s[i] = scale * sum as f32;
    }
}
