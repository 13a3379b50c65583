//! Idefics3 / SmolVLM preprocessing, as its Hugging Face image processor does it:
//!
//! ```text
//!   RGB ─ resize longest edge to `size.longest_edge` (other edge truncated, then up to even)
//!       ─ resize each edge up to a multiple of the tile (`max_image_size.longest_edge`), aspect kept as far
//!         as the rounding allows ─ R × C tiles row-major, then the whole (resized) image squeezed to one
//!         tile as the global image, last
//!       ─ x / 255, (x − mean) / std, channel-major [3, tile, tile] per tile
//! ```
//!
//! Every resize is Pillow's LANCZOS on 8-bit pixels ([`super::resize`]). Without splitting (or when the
//! image already fits one tile) there is only the global tile and R = C = 0.

use super::resize::lanczos_resize;
use super::{crop, Rgb};

/// The numbers of a `preprocessor_config.json`.
#[derive(Clone, Debug, PartialEq)]
pub struct Idefics3Config {
    /// `size.longest_edge`: the first resize.
    pub longest_edge: usize,
    /// `max_image_size.longest_edge`: the tile (the encoder's input) size.
    pub tile: usize,
    pub do_image_splitting: bool,
    pub rescale_factor: f32,
    pub image_mean: [f32; 3],
    pub image_std: [f32; 3],
}

/// One image's tiles, `[n, 3, tile, tile]` f32, the global tile last, and the grid they came from.
#[derive(Clone, Debug)]
pub struct Idefics3Image {
    pub rows: usize,
    pub cols: usize,
    pub tile: usize,
    pub pixels: Vec<f32>,
}

impl Idefics3Image {
    pub fn num_tiles(&self) -> usize {
        self.pixels.len() / (3 * self.tile * self.tile)
    }
}

/// The size after resizing the longest edge to `max_len` (transformers' `_resize_output_size_rescale_to_max_len`).
pub fn longest_edge_size(width: usize, height: usize, max_len: usize) -> (usize, usize) {
    let aspect = width as f64 / height as f64;
    let (mut w, mut h);
    if width >= height {
        w = max_len;
        h = (w as f64 / aspect) as usize;
        if h % 2 != 0 {
            h += 1;
        }
    } else {
        h = max_len;
        w = (h as f64 * aspect) as usize;
        if w % 2 != 0 {
            w += 1;
        }
    }
    (w.max(1), h.max(1))
}

/// The size after growing each edge to a multiple of `tile` (`resize_for_vision_encoder`).
pub fn tile_multiple_size(width: usize, height: usize, tile: usize) -> (usize, usize) {
    let aspect = width as f64 / height as f64;
    if width >= height {
        let w = width.div_ceil(tile) * tile;
        let h = ((w as f64 / aspect) as usize).div_ceil(tile) * tile;
        (w, h)
    } else {
        let h = height.div_ceil(tile) * tile;
        let w = ((h as f64 * aspect) as usize).div_ceil(tile) * tile;
        (w, h)
    }
}

impl Idefics3Config {
    pub fn preprocess(&self, img: &Rgb) -> Idefics3Image {
        let t = self.tile;
        let (w, h) = longest_edge_size(img.width, img.height, self.longest_edge);
        let img = lanczos_resize(img, w, h);
        let mut tiles: Vec<Rgb> = Vec::new();
        let (mut rows, mut cols) = (0, 0);
        let global = if self.do_image_splitting {
            let (w, h) = tile_multiple_size(img.width, img.height, t);
            let img = lanczos_resize(&img, w, h);
            if img.width > t || img.height > t {
                rows = img.height.div_ceil(t);
                cols = img.width.div_ceil(t);
                let (th, tw) = (img.height.div_ceil(rows), img.width.div_ceil(cols));
                for r in 0..rows {
                    for c in 0..cols {
                        let (x, y) = (c * tw, r * th);
                        tiles.push(crop(&img, x, y, tw.min(img.width - x), th.min(img.height - y)));
                    }
                }
            }
            lanczos_resize(&img, t, t)
        } else {
            lanczos_resize(&img, t, t)
        };
        tiles.push(global);
        let mut pixels = Vec::with_capacity(tiles.len() * 3 * t * t);
        for tile in &tiles {
            debug_assert_eq!((tile.width, tile.height), (t, t));
            for ch in 0..3 {
                let (mean, std) = (self.image_mean[ch], self.image_std[ch]);
                pixels.extend(
                    tile.pixels[ch..].iter().step_by(3).map(|&p| (p as f32 * self.rescale_factor - mean) / std),
                );
            }
        }
        Idefics3Image { rows, cols, tile: t, pixels }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_follow_the_reference_rounding() {
        // The reference set's images (shared/reference/greedy-SmolVLM-rand-mlx-vlm.json: rows × cols).
        for ((w, h), grid) in [
            ((512, 512), (2, 2)),
            ((640, 480), (2, 2)),
            ((300, 800), (2, 1)),
            ((800, 300), (1, 2)),
            ((333, 517), (2, 2)),
            ((96, 64), (2, 2)),
        ] {
            let (w1, h1) = longest_edge_size(w, h, 1024);
            let (w2, h2) = tile_multiple_size(w1, h1, 512);
            assert_eq!((h2 / 512, w2 / 512), grid, "{w}x{h} -> {w1}x{h1} -> {w2}x{h2}");
        }
        assert_eq!(longest_edge_size(300, 800, 1024), (384, 1024));
        assert_eq!(longest_edge_size(96, 64, 1024), (1024, 682));
        assert_eq!(longest_edge_size(333, 517, 1024), (660, 1024));
    }

    #[test]
    fn extreme_aspect_ratios_still_make_whole_tiles() {
        let cfg = Idefics3Config {
            longest_edge: 1024,
            tile: 512,
            do_image_splitting: true,
            rescale_factor: 1.0 / 255.0,
            image_mean: [0.5; 3],
            image_std: [0.5; 3],
        };
        for (w, h) in [(1, 3000), (3000, 1), (1, 1), (2, 5000)] {
            let img = Rgb { width: w, height: h, pixels: vec![128; w * h * 3] };
            let out = cfg.preprocess(&img);
            assert_eq!(out.pixels.len(), out.num_tiles() * 3 * 512 * 512, "{w}x{h}");
            assert_eq!(out.num_tiles(), if out.rows == 0 { 1 } else { out.rows * out.cols + 1 }, "{w}x{h}");
            assert!(out.pixels.iter().all(|v| v.abs() < 0.01), "{w}x{h}: a flat grey image stays grey");
        }
    }
}
