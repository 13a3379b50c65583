//! Our Idefics3 preprocessing gives transformers' (Pillow's) tiles byte for byte: every image of
//! testdata/images (and testdata/images/sizes, 1x700 to 2000x90) against the hashes that
//! scripts/vlm-pixel-reference.py recorded from the reference processor.

use mlx_serving_frontend::image::{decode, idefics3::Idefics3Config, ImageLimits};
use mlx_serving_test_support::{reference, testdata};
use sha2::{Digest, Sha256};

#[test]
fn tiles_are_the_reference_processors_bytes() {
    let cfg = Idefics3Config {
        longest_edge: 1024,
        tile: 512,
        do_image_splitting: true,
        rescale_factor: 1.0 / 255.0,
        image_mean: [0.5; 3],
        image_std: [0.5; 3],
    };
    let refs = reference("idefics3-pixels.json");
    let items = refs["items"].as_array().unwrap();
    assert!(items.len() >= 14);
    for item in items {
        let file = item["file"].as_str().unwrap();
        let bytes = std::fs::read(testdata().join("images").join(file)).unwrap();
        let img = cfg.preprocess(&decode(&bytes, &ImageLimits::default()).unwrap());
        assert_eq!(img.num_tiles() as u64, item["tiles"].as_u64().unwrap(), "{file}: tiles");
        let u8s: Vec<u8> = img.pixels.iter().map(|v| ((v * 0.5 + 0.5) * 255.0).round() as u8).collect();
        let got = format!("{:x}", Sha256::digest(&u8s));
        assert_eq!(got, item["sha256"].as_str().unwrap(), "{file}: pixels");
    }
}
