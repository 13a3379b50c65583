//! Our kernels decode every GGUF format the loader hands them exactly as candle (which follows ggml) does:
//! random blocks of each format, dequantized by both. An independent check of the block layouts that the
//! kernels' own tests (which compare each kernel with our portable decoder) cannot make.

use candle_core::quantized::{ggml_file::qtensor_from_ggml, GgmlDType};
use candle_core::Device;
use half::f16;
use mlx_serving_kernels::{QMatrix, QuantFormat};

struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> u8 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (self.0 >> 33) as u8
    }
    fn scale(&mut self, size: f32) -> [u8; 2] {
        f16::from_f32((self.next() as f32 / 255.0 - 0.5) * size).to_le_bytes()
    }
}

/// Random file bytes for `rows × cols` of `format`, with finite f16 scales at the format's scale offsets.
fn random_blocks(rng: &mut Lcg, format: QuantFormat, rows: usize, cols: usize) -> Vec<u8> {
    let bb = format.block_bytes();
    let mut data: Vec<u8> = (0..rows * cols / format.block_len() * bb).map(|_| rng.next()).collect();
    for blk in data.chunks_exact_mut(bb) {
        for &o in format.f16_offsets() {
            blk[o..o + 2].copy_from_slice(&rng.scale(0.1));
        }
    }
    data
}

#[test]
fn every_format_dequantizes_as_candle_does() {
    let mut rng = Lcg(5);
    let formats = [
        (QuantFormat::Q4_0, GgmlDType::Q4_0),
        (QuantFormat::Q4_1, GgmlDType::Q4_1),
        (QuantFormat::Q5_0, GgmlDType::Q5_0),
        (QuantFormat::Q5_1, GgmlDType::Q5_1),
        (QuantFormat::Q8_0, GgmlDType::Q8_0),
        (QuantFormat::Q4_K, GgmlDType::Q4K),
        (QuantFormat::Q6_K, GgmlDType::Q6K),
    ];
    for (ours, theirs) in formats {
        // 17 rows: every lane of a tile, a second tile row and a padded third; for the 32-value formats an odd
        // number of blocks per row.
        let (rows, cols) = (17, if ours.block_len() == 32 { 7 * 32 } else { 2 * 256 });
        let data = random_blocks(&mut rng, ours, rows, cols);
        let want = qtensor_from_ggml(theirs, &data, vec![rows, cols], &Device::Cpu)
            .and_then(|q| q.dequantize(&Device::Cpu))
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f32>())
            .unwrap();
        let m = QMatrix::new(ours, rows, cols, data).unwrap();
        let mut got = vec![0f32; rows * cols];
        for (r, row) in got.chunks_exact_mut(cols).enumerate() {
            m.dequantize_row(r, row);
        }
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            // Q6_K: we multiply `d · (s·q)` (one rounding), ggml `(d·s)·q` (two): within an f32 ulp or so.
            let tol = if ours == QuantFormat::Q6_K { 2.5e-7 * w.abs() } else { 0.0 };
            assert!(
                (g - w).abs() <= tol,
                "{ours:?} value {i} (row {}, col {}): ours {g}, candle {w}",
                i / cols,
                i % cols
            );
        }
    }
}
