//! Writes the Idefics3 tiles of an image file as raw little-endian f32 (for comparing with the reference
//! processor): `idefics3_pixels IMAGE OUT LONGEST_EDGE TILE`.
fn main() {
    let a: Vec<String> = std::env::args().collect();
    let img = mlx_serving_frontend::image::decode(&std::fs::read(&a[1]).unwrap(), &Default::default()).unwrap();
    let cfg = mlx_serving_frontend::image::idefics3::Idefics3Config {
        longest_edge: a[3].parse().unwrap(),
        tile: a[4].parse().unwrap(),
        do_image_splitting: true,
        rescale_factor: 1.0 / 255.0,
        image_mean: [0.5; 3],
        image_std: [0.5; 3],
    };
    let t0 = std::time::Instant::now();
    let out = cfg.preprocess(&img);
    eprintln!("preprocess: {:.1} ms", t0.elapsed().as_secs_f64() * 1e3);
    eprintln!("rows {} cols {} tiles {}", out.rows, out.cols, out.num_tiles());
    std::fs::write(&a[2], out.pixels.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>()).unwrap();
}
