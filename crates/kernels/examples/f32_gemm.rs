//! Times `f32_matmul` on a vision encoder's and a text prefill's shapes: `f32_gemm [ROUNDS]`.
use mlx_serving_kernels::{f32_matmul, F32Matrix};

fn main() {
    let rounds: usize = std::env::args().nth(1).map_or(5, |s| s.parse().unwrap());
    for (n, k, m) in
        [(5120, 384, 1152), (5120, 384, 1536), (5120, 1536, 384), (345, 576, 1536), (345, 1536, 576), (1024, 64, 1024)]
    {
        let w: Vec<f32> = (0..m * k).map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5).collect();
        let x: Vec<f32> = (0..n * k).map(|i| ((i * 104729) % 1000) as f32 / 1000.0 - 0.5).collect();
        let w = F32Matrix::from_rows(m, k, &w);
        let mut y = vec![0f32; n * m];
        let mut best = f64::MAX;
        for _ in 0..rounds {
            let t0 = std::time::Instant::now();
            f32_matmul(&w, &x, &mut y, false);
            best = best.min(t0.elapsed().as_secs_f64());
        }
        let gf = 2.0 * (n * k * m) as f64 / best / 1e9;
        println!("{n} x {k} x {m}: {:.2} ms, {gf:.1} GFLOP/s", best * 1e3);
    }
    // One thread (attention's per-head products).
    for (n, k, m) in [(64, 64, 1024), (64, 1024, 64)] {
        let w: Vec<f32> = (0..m * k).map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5).collect();
        let x: Vec<f32> = (0..n * k).map(|i| ((i * 104729) % 1000) as f32 / 1000.0 - 0.5).collect();
        let w = F32Matrix::from_rows(m, k, &w);
        let mut y = vec![0f32; n * m];
        let mut best = f64::MAX;
        for _ in 0..rounds * 20 {
            let t0 = std::time::Instant::now();
            mlx_serving_kernels::f32_matmul_serial(&w, &x, &mut y, false);
            best = best.min(t0.elapsed().as_secs_f64());
        }
        let gf = 2.0 * (n * k * m) as f64 / best / 1e9;
        println!("serial {n} x {k} x {m}: {:.3} ms, {gf:.1} GFLOP/s", best * 1e3);
    }
}
