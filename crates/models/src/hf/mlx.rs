//! MLX's layouts: affine-quantized rows (`bits`-bit values packed low bits first in `u32` words, a scale and a
//! bias per group) as GGML blocks or f32, and channels-last convolution weights put back channels first.

use candle_core::quantized::GgmlDType;

/// MLX affine-quantized rows (`bits`-bit values packed low bits first in `words`, one scale and bias per
/// `group` inputs) as GGML data our kernels take, when `native` and the groups are a multiple of 32: 4 bits as
/// Q4_1 blocks; 8 bits as Q8_0 blocks (`q − 128`, `d = s`) plus an offset per block (`b + 128·s`,
/// returned). Else dequantized f32. Scales become f16 in the blocks: exact for bf16 or f16 scales in f16's
/// normal range (MLX's default), rounded to 11 bits for f32 ones.
pub(crate) fn affine_to_ggml(
    words: &[u32],
    scales: &[f32],
    biases: &[f32],
    [rows, cols]: [usize; 2],
    bits: usize,
    group: usize,
    native: bool,
) -> (GgmlDType, Vec<u8>, Option<Vec<f32>>) {
    let (per_word, groups) = (32 / bits, cols / group);
    let words_per_row = cols / per_word;
    let mask = (1u32 << bits) - 1;
    let q = |r: usize, c: usize| ((words[r * words_per_row + c / per_word] >> ((c % per_word) * bits)) & mask) as u8;
    if native && bits == 8 && group.is_multiple_of(32) {
        // Q8_0 blocks: f16 scale d, then 32 signed bytes; rows in parallel.
        let (nb, row_bytes) = (cols / 32, cols / 32 * 34);
        let mut out = vec![0u8; rows * row_bytes];
        mlx_serving_kernels::pool::for_each_chunk_mut(&mut out, row_bytes, |r, row| {
            let w = &words[r * words_per_row..(r + 1) * words_per_row];
            for (b, blk) in row.chunks_exact_mut(34).enumerate() {
                blk[..2].copy_from_slice(&half::f16::from_f32(scales[r * groups + b * 32 / group]).to_le_bytes());
                for (j, v) in blk[2..].iter_mut().enumerate() {
                    *v = ((w[8 * b + j / 4] >> (8 * (j % 4))) as u8) ^ 0x80; // q − 128 as i8
                }
            }
        });
        let mins = (0..rows * nb)
            .map(|i| {
                let g = i / nb * groups + i % nb * 32 / group;
                biases[g] + 128.0 * scales[g]
            })
            .collect();
        return (GgmlDType::Q8_0, out, Some(mins));
    }
    if native && bits == 4 && group.is_multiple_of(32) {
        // Q4_1 blocks: f16 scale d, f16 minimum m, 16 bytes holding q[j] (low nibble) and q[j + 16] (high);
        // a block's values are words 4b .. 4b + 4, eight nibbles each. Rows in parallel.
        let row_bytes = cols / 32 * 20;
        let mut out = vec![0u8; rows * row_bytes];
        mlx_serving_kernels::pool::for_each_chunk_mut(&mut out, row_bytes, |r, row| {
            let w = &words[r * words_per_row..(r + 1) * words_per_row];
            for (b, blk) in row.chunks_exact_mut(20).enumerate() {
                let g = r * groups + b * 32 / group;
                blk[..2].copy_from_slice(&half::f16::from_f32(scales[g]).to_le_bytes());
                blk[2..4].copy_from_slice(&half::f16::from_f32(biases[g]).to_le_bytes());
                for k in 0..2 {
                    let (lo, hi) = (w[4 * b + k], w[4 * b + k + 2]);
                    for i in 0..8 {
                        blk[4 + 8 * k + i] = ((lo >> (4 * i)) & 0xF) as u8 | ((((hi >> (4 * i)) & 0xF) as u8) << 4);
                    }
                }
            }
        });
        return (GgmlDType::Q4_1, out, None);
    }
    let mut out = Vec::with_capacity(rows * cols * 4);
    for r in 0..rows {
        for c in 0..cols {
            let g = r * groups + c / group;
            out.extend_from_slice(&(scales[g] * q(r, c) as f32 + biases[g]).to_le_bytes());
        }
    }
    (GgmlDType::F32, out, None)
}

/// A convolution weight stored channels last (`[out, ..., in]`, MLX's layout) as PyTorch's `[out, in, ...]`.
pub(super) fn channels_first(shape: &[usize], values: &[f32]) -> (Vec<usize>, Vec<f32>) {
    let (out, inp) = (shape[0], shape[shape.len() - 1]);
    let spatial: usize = shape[1..shape.len() - 1].iter().product();
    let mut v = vec![0.0; values.len()];
    for o in 0..out {
        for s in 0..spatial {
            for c in 0..inp {
                v[(o * inp + c) * spatial + s] = values[(o * spatial + s) * inp + c];
            }
        }
    }
    let mut new_shape = vec![out, inp];
    new_shape.extend_from_slice(&shape[1..shape.len() - 1]);
    (new_shape, v)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// MLX's `[out, kh, kw, in]` back to `[out, in, kh, kw]`.
    #[test]
    fn channels_last_convolutions_come_back_channels_first() {
        let values: Vec<f32> = (0..12).map(|v| v as f32).collect();
        let (shape, v) = channels_first(&[2, 1, 2, 3], &values);
        assert_eq!(shape, [2, 3, 1, 2]);
        assert_eq!(v, [0., 3., 1., 4., 2., 5., 6., 9., 7., 10., 8., 11.]);
    }
}
