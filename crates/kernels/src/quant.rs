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

use half::f16;
use rayon::prelude::*;

pub const BLOCK: usize = 32;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QuantFormat {
    Q4_1,
    Q8_0,
}

impl QuantFormat {
    pub fn block_bytes(self) -> usize {
        match self {
            Self::Q4_1 => 20,
            Self::Q8_0 => 34,
        }
    }
}

/// A `[rows, cols]` weight matrix stored row by row in GGUF blocks.
#[derive(Clone, Debug)]
pub struct QMatrix {
    format: QuantFormat,
    rows: usize,
    cols: usize,
    data: Vec<u8>,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct QuantError(String);

impl QMatrix {
    pub fn new(format: QuantFormat, rows: usize, cols: usize, data: Vec<u8>) -> Result<Self, QuantError> {
        if cols % BLOCK != 0 {
            return Err(QuantError(format!("{cols} columns is not a multiple of {BLOCK}")));
        }
        let want = rows * cols / BLOCK * format.block_bytes();
        if data.len() != want {
            return Err(QuantError(format!("{format:?} [{rows}, {cols}] needs {want} bytes, got {}", data.len())));
        }
        Ok(Self { format, rows, cols, data })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    pub fn format(&self) -> QuantFormat {
        self.format
    }

    fn row_bytes(&self) -> usize {
        self.cols / BLOCK * self.format.block_bytes()
    }

    /// Row `r` dequantized into `out` (`cols` floats).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        let row = &self.data[r * self.row_bytes()..(r + 1) * self.row_bytes()];
        let bb = self.format.block_bytes();
        for (b, blk) in row.chunks_exact(bb).enumerate() {
            let o = &mut out[b * BLOCK..(b + 1) * BLOCK];
            let d = f16_at(blk, 0);
            match self.format {
                QuantFormat::Q4_1 => {
                    let m = f16_at(blk, 2);
                    for j in 0..16 {
                        o[j] = d * (blk[4 + j] & 0xF) as f32 + m;
                        o[j + 16] = d * (blk[4 + j] >> 4) as f32 + m;
                    }
                }
                QuantFormat::Q8_0 => {
                    for j in 0..32 {
                        o[j] = d * blk[2 + j] as i8 as f32;
                    }
                }
            }
        }
    }
}

#[inline(always)]
fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// `Σ q[j]·x[j]` over one Q4_1 block's 32 nibbles.
#[inline(always)]
fn q4_dot(qs: &[u8], x: &[f32]) -> f32 {
    let (x_lo, x_hi) = (&x[..16], &x[16..32]);
    let mut acc = [0f32; 16];
    for j in 0..16 {
        let q = qs[j];
        acc[j] = (q & 0xF) as f32 * x_lo[j] + (q >> 4) as f32 * x_hi[j];
    }
    acc.iter().sum()
}

#[inline(always)]
fn q8_dot(qs: &[u8], x: &[f32]) -> f32 {
    let mut acc = [0f32; 32];
    for j in 0..32 {
        acc[j] = qs[j] as i8 as f32 * x[j];
    }
    acc.iter().sum()
}

/// Dot of weight row `row` (raw blocks) with activation row `x`, given `x`'s per-block sums.
#[inline]
fn row_dot(format: QuantFormat, row: &[u8], x: &[f32], xsum: &[f32]) -> f32 {
    let bb = format.block_bytes();
    let mut s = 0f32;
    match format {
        QuantFormat::Q4_1 => {
            for (b, blk) in row.chunks_exact(bb).enumerate() {
                let (d, m) = (f16_at(blk, 0), f16_at(blk, 2));
                s += d * q4_dot(&blk[4..20], &x[b * BLOCK..(b + 1) * BLOCK]) + m * xsum[b];
            }
        }
        QuantFormat::Q8_0 => {
            for (b, blk) in row.chunks_exact(bb).enumerate() {
                s += f16_at(blk, 0) * q8_dot(&blk[2..34], &x[b * BLOCK..(b + 1) * BLOCK]);
            }
        }
    }
    s
}

/// Rows of weights per parallel task: large enough to amortize scheduling, small enough to balance.
const ROWS_PER_TASK: usize = 32;

/// `y = x · wᵀ`: `x` is `[n, cols]`, `y` is `[n, rows]`, both row-major.
///
/// Parallel over weight rows; each task reads its weight rows once and applies them to every activation row
/// (the weight read is shared across the batch, which is where batching pays on a CPU).
pub fn qmatmul(w: &QMatrix, x: &[f32], y: &mut [f32]) {
    let (k, m) = (w.cols, w.rows);
    let n = x.len() / k;
    assert_eq!(x.len(), n * k, "activation length");
    assert_eq!(y.len(), n * m, "output length");
    let nb = k / BLOCK;
    let xsum: Vec<f32> = x.chunks_exact(BLOCK).map(|c| c.iter().sum()).collect();
    let rb = w.row_bytes();
    // yt is [m, n]: each task owns a contiguous run of output features.
    let mut yt = vec![0f32; m * n];
    yt.par_chunks_mut(ROWS_PER_TASK * n).enumerate().for_each(|(t, out)| {
        let r0 = t * ROWS_PER_TASK;
        for (i, o) in out.chunks_exact_mut(n).enumerate() {
            let row = &w.data[(r0 + i) * rb..(r0 + i + 1) * rb];
            for (t, ot) in o.iter_mut().enumerate() {
                *ot = row_dot(w.format, row, &x[t * k..(t + 1) * k], &xsum[t * nb..(t + 1) * nb]);
            }
        }
    });
    if n == 1 {
        y.copy_from_slice(&yt);
    } else {
        for (r, col) in yt.chunks_exact(n).enumerate() {
            for (t, v) in col.iter().enumerate() {
                y[t * m + r] = *v;
            }
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
            y[t * m + r] = row.iter().zip(&x[t * k..(t + 1) * k]).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>() as f32;
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
            for &(rows, cols, n) in &[(1, 32, 1), (33, 64, 1), (70, 576, 3), (96, 1536, 7), (40, 96, 64)] {
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
    fn wrong_sizes_are_errors() {
        assert!(QMatrix::new(QuantFormat::Q8_0, 2, 30, vec![0; 68]).is_err());
        assert!(QMatrix::new(QuantFormat::Q8_0, 2, 32, vec![0; 67]).is_err());
    }
}
