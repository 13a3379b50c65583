//! Times the vision encoder of a vision-language directory on random tiles:
//! `vision_encode DIR [TILES] [ROUNDS]`.
fn main() {
    let a: Vec<String> = std::env::args().collect();
    let dir = mlx_serving_models::hf::HfDir::open(&a[1]).unwrap();
    let tiles: usize = a.get(2).map_or(5, |s| s.parse().unwrap());
    let rounds: usize = a.get(3).map_or(3, |s| s.parse().unwrap());
    let (v, p) = mlx_serving_models::VisionModel::load(&dir).unwrap().unwrap();
    let n = tiles * 3 * p.tile * p.tile;
    let pixels: Vec<f32> = (0..n).map(|i| ((i * 7919) % 255) as f32 / 127.5 - 1.0).collect();
    for _ in 0..rounds {
        let t0 = std::time::Instant::now();
        let e = v.encode(&pixels, tiles, &|| true).unwrap();
        println!("{tiles} tiles: {:.1} ms ({} values)", t0.elapsed().as_secs_f64() * 1e3, e.len());
    }
}
