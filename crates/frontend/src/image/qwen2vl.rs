//! Qwen2-VL / Qwen2.5-VL preprocessing, as its Hugging Face image processor (`Qwen2VLImageProcessor`, Pillow)
//! does it:
//!
//! ```text
//!   RGB ─ resize to (H, W), each a multiple of patch · merge, H · W within [min_pixels, max_pixels], aspect kept
//!         as far as the rounding allows ("smart resize", Pillow BICUBIC)
//!       ─ x · rescale, (x − mean) / std
//!       ─ patches of 14 × 14, ordered merge block by merge block (each 2 × 2 block's patches consecutive, blocks
//!         row-major), each patch's values channel-major, the frame repeated `temporal_patch_size` times
//!         → [grid_h · grid_w, 3 · T · P · P]
//! ```

use super::resize::{resize, Filter};
use super::Rgb;

/// The numbers of a Qwen2-VL `preprocessor_config.json`.
#[derive(Clone, Debug, PartialEq)]
pub struct Qwen2VlConfig {
    pub min_pixels: usize,
    pub max_pixels: usize,
    pub patch: usize,
    pub temporal_patch: usize,
    pub merge: usize,
    pub rescale_factor: f32,
    pub image_mean: [f32; 3],
    pub image_std: [f32; 3],
}

/// One image's patches and their grid (in patches; the text model sees `grid / merge` in each direction).
#[derive(Clone, Debug)]
pub struct Qwen2VlImage {
    pub grid_h: usize,
    pub grid_w: usize,
    /// `[grid_h · grid_w, 3 · temporal_patch · patch · patch]`.
    pub pixels: Vec<f32>,
}

/// Why an image cannot be prepared.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AspectError {
    pub width: usize,
    pub height: usize,
}

impl std::fmt::Display for AspectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the image's aspect ratio ({}x{}) is over 200", self.width, self.height)
    }
}

/// The processor's `smart_resize`: `(height, width)` after resizing. Python's `round` rounds half to even.
pub fn smart_resize(
    height: usize,
    width: usize,
    factor: usize,
    min_pixels: usize,
    max_pixels: usize,
) -> Result<(usize, usize), AspectError> {
    let (h, w, f) = (height as f64, width as f64, factor as f64);
    if h.max(w) / h.min(w) > 200.0 {
        return Err(AspectError { width, height });
    }
    let mut hb = (h / f).round_ties_even() as usize * factor;
    let mut wb = (w / f).round_ties_even() as usize * factor;
    if hb * wb > max_pixels {
        let beta = ((h * w) / max_pixels as f64).sqrt();
        hb = factor.max((h / beta / f).floor() as usize * factor);
        wb = factor.max((w / beta / f).floor() as usize * factor);
    } else if hb * wb < min_pixels {
        let beta = (min_pixels as f64 / (h * w)).sqrt();
        hb = (h * beta / f).ceil() as usize * factor;
        wb = (w * beta / f).ceil() as usize * factor;
    }
    Ok((hb, wb))
}

impl Qwen2VlConfig {
    /// The patch grid `(grid_h, grid_w)` an image of this size becomes.
    pub fn grid(&self, width: usize, height: usize) -> Result<(usize, usize), AspectError> {
        let (h, w) = smart_resize(height, width, self.patch * self.merge, self.min_pixels, self.max_pixels)?;
        Ok((h / self.patch, w / self.patch))
    }

    pub fn preprocess(&self, img: &Rgb) -> Result<Qwen2VlImage, AspectError> {
        let (grid_h, grid_w) = self.grid(img.width, img.height)?;
        let (p, m, tp) = (self.patch, self.merge, self.temporal_patch);
        let img = resize(img, grid_w * p, grid_h * p, Filter::Bicubic);
        let width = img.width;
        // The normalized image, channel-major.
        let plane = img.width * img.height;
        let mut chw = vec![0f32; 3 * plane];
        for (i, px) in img.pixels.chunks_exact(3).enumerate() {
            for ch in 0..3 {
                chw[ch * plane + i] = (px[ch] as f32 * self.rescale_factor - self.image_mean[ch]) / self.image_std[ch];
            }
        }
        let per_patch = 3 * tp * p * p;
        let mut pixels = Vec::with_capacity(grid_h * grid_w * per_patch);
        for by in 0..grid_h / m {
            for bx in 0..grid_w / m {
                for i in 0..m {
                    for j in 0..m {
                        let (y0, x0) = ((by * m + i) * p, (bx * m + j) * p);
                        for ch in 0..3 {
                            let start = pixels.len();
                            for y in 0..p {
                                let row = ch * plane + (y0 + y) * width + x0;
                                pixels.extend_from_slice(&chw[row..row + p]);
                            }
                            // The still image is every frame of the temporal patch.
                            for _ in 1..tp {
                                pixels.extend_from_within(start..start + p * p);
                            }
                        }
                    }
                }
            }
        }
        Ok(Qwen2VlImage { grid_h, grid_w, pixels })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smart_resize_rounds_like_python() {
        // Qwen2.5-VL's defaults: factor 28, 56·56 ..= 28·28·1280 pixels.
        let (lo, hi) = (56 * 56, 28 * 28 * 1280);
        assert_eq!(smart_resize(512, 512, 28, lo, hi), Ok((504, 504)));
        // 42 / 28 = 1.5 rounds to 2 (even), 70 / 28 = 2.5 rounds to 2 (even): then under min_pixels
        assert_eq!(smart_resize(42, 70, 28, 0, hi), Ok((56, 56)));
        assert_eq!(smart_resize(10, 10, 28, lo, hi), Ok((56, 56)));
        assert_eq!(smart_resize(4000, 3000, 28, lo, hi), Ok((1148, 840)));
        assert!(smart_resize(1, 700, 28, lo, hi).is_err());
    }

    #[test]
    fn patches_are_grouped_by_merge_block_and_repeated_in_time() {
        let cfg = Qwen2VlConfig {
            min_pixels: 0,
            max_pixels: 1 << 30,
            patch: 2,
            temporal_patch: 2,
            merge: 2,
            rescale_factor: 1.0,
            image_mean: [0.0; 3],
            image_std: [1.0; 3],
        };
        // 8 × 4 pixels (x + 10 y in every channel, plus 100 · channel): grid 2 × 4 patches.
        let mut px = Vec::new();
        for y in 0..4 {
            for x in 0..8 {
                px.extend((0..3).map(|c| (x + 10 * y + 100 * c) as u8));
            }
        }
        let out = cfg.preprocess(&Rgb { width: 8, height: 4, pixels: px }).unwrap();
        assert_eq!((out.grid_h, out.grid_w), (2, 4));
        assert_eq!(out.pixels.len(), 8 * 3 * 2 * 2 * 2);
        let patch = |k: usize| &out.pixels[k * 24..(k + 1) * 24];
        // Block 0: patches (0,0), (0,1), (1,0), (1,1); block 1 starts at patch column 2.
        assert_eq!(&patch(0)[..8], &[0., 1., 10., 11., 0., 1., 10., 11.]);
        assert_eq!(&patch(1)[..4], &[2., 3., 12., 13.]);
        assert_eq!(&patch(2)[..4], &[20., 21., 30., 31.]);
        assert_eq!(&patch(4)[..4], &[4., 5., 14., 15.]);
        assert_eq!(&patch(0)[8..12], &[100., 101., 110., 111.]);
    }
}
