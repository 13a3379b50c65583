//! In-cache kernel probe: multiply-adds per second of one quantized matmul (the weights stay in cache), per
//! activation precision and batch size. `MLX_SERVING_THREADS=1 cargo run --release -p mlx-serving-kernels
//! --example probe [format] [rows] [cols]`.

use half::f16;
use mlx_serving_kernels::quant::{qmatmul, Activations, QMatrix, QuantFormat};
use std::time::Instant;

fn main() {
    if let Ok(n) = std::env::var("MLX_SERVING_THREADS") {
        mlx_serving_kernels::pool::set_threads(n.parse().expect("MLX_SERVING_THREADS"));
    }
    let args: Vec<String> = std::env::args().collect();
    let format = match args.get(1).map(String::as_str) {
        Some("q8_0") => QuantFormat::Q8_0,
        Some("q4_0") => QuantFormat::Q4_0,
        Some("q5_0") => QuantFormat::Q5_0,
        Some("q4_k") => QuantFormat::Q4_K,
        Some("q6_k") => QuantFormat::Q6_K,
        Some("a4_64") => QuantFormat::A4_64,
        Some("a4_128") => QuantFormat::A4_128,
        _ => QuantFormat::Q4_1,
    };
    let rows: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(1536);
    let cols: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(576);
    let mut seed = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let bb = format.block_bytes();
    let mut data: Vec<u8> = (0..rows * cols / format.block_len() * bb).map(|_| next() as u8).collect();
    for blk in data.chunks_exact_mut(bb) {
        for &o in format.f16_offsets() {
            blk[o..o + 2].copy_from_slice(&f16::from_f32(0.01).to_le_bytes());
        }
    }
    // `PROBE_COPIES=k`: cycle through k copies of the matrix (more than the caches hold: each product then
    // reads its weights from memory, as a model's layers do).
    let copies: usize = std::env::var("PROBE_COPIES").ok().and_then(|v| v.parse().ok()).unwrap_or(1);
    for a in [Activations::Int8, Activations::Int16] {
        let ms: Vec<QMatrix> =
            (0..copies).map(|_| QMatrix::new(format, rows, cols, data.clone()).unwrap().with_activations(a)).collect();
        for n in [1usize, 4, 8] {
            let x: Vec<f32> = (0..n * cols).map(|i| ((i * 7919) % 201) as f32 / 100.0 - 1.0).collect();
            let mut y = vec![0f32; n * rows];
            let reps = (200_000_000 / (rows * cols * n)).max(3).next_multiple_of(copies);
            let mut best = f64::MAX;
            for _ in 0..5 {
                let t = Instant::now();
                for i in 0..reps {
                    qmatmul(&ms[i % copies], &x, &mut y);
                }
                best = best.min(t.elapsed().as_secs_f64() / reps as f64);
            }
            let gmacs = (rows * cols * n) as f64 / best / 1e9;
            let gbs = ms[0].weight_bytes() as f64 / best / 1e9;
            println!("{format:?} {rows}x{cols} {a:?} n={n}: {:.1} us, {gmacs:.1} GMAC/s, {gbs:.1} GB/s", best * 1e6);
        }
    }
}
