//! Times the vision encoder of a vision-language directory on random pixels:
//! `vision_encode DIR [SIZE] [ROUNDS]`: SIZE tiles (Idefics3, default 5) or an image of SIZE × SIZE patches
//! (Qwen2-VL, default 36: a 504 × 504 image).
use mlx_serving_models::{ImagePixels, ImageProcessing, PixelLayout};

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let dir = mlx_serving_models::hf::HfDir::open(&a[1]).unwrap();
    let size: Option<usize> = a.get(2).map(|s| s.parse().unwrap());
    let rounds: usize = a.get(3).map_or(3, |s| s.parse().unwrap());
    let (v, p) = mlx_serving_models::VisionModel::load(&dir).unwrap().unwrap();
    let (n, layout) = match &p {
        ImageProcessing::Idefics3(p) => {
            let tiles = size.unwrap_or(5);
            (tiles * 3 * p.tile * p.tile, PixelLayout::Tiles(tiles))
        }
        ImageProcessing::Qwen2Vl(p) => {
            let side = size.unwrap_or(36);
            (side * side * 3 * p.temporal_patch * p.patch * p.patch, PixelLayout::Patches { rows: side, cols: side })
        }
    };
    let pixels: Vec<f32> = (0..n).map(|i| ((i * 7919) % 255) as f32 / 127.5 - 1.0).collect();
    let image = ImagePixels { pixels, layout, held: None };
    for _ in 0..rounds {
        let t0 = std::time::Instant::now();
        let e = v.encode(&image, &|| true).unwrap();
        println!("{layout:?}: {:.1} ms ({} values)", t0.elapsed().as_secs_f64() * 1e3, e.len());
    }
}
