//! Images for vision-language models: decoding an image file's bytes within limits, and each model family's
//! preprocessing (resize, tiles, normalization) into the pixel tensors its encoder takes.
//!
//! Decoding reads the header first and refuses an image whose pixel count is over the limit before any
//! pixel is decoded (no decompression bombs); PNG, JPEG, WebP and GIF (its first frame) are read, every
//! colour type becomes 8-bit RGB (grayscale replicated, alpha dropped, as PIL's `convert("RGB")`).

pub mod idefics3;
pub mod qwen2vl;
pub mod resize;

use std::io::Cursor;

/// An 8-bit RGB image, rows top to bottom, `[r, g, b]` per pixel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rgb {
    pub width: usize,
    pub height: usize,
    pub pixels: Vec<u8>,
}

/// Bounds on one image, checked before the work they bound.
#[derive(Clone, Copy, Debug)]
pub struct ImageLimits {
    pub max_bytes: usize,
    pub max_pixels: u64,
    /// Longest edge in pixels. Resizing an extreme strip (1 × 40 M pixels is within the pixel bound) down to
    /// the model's size would need a filter window of hundreds of thousands of taps per output pixel, and
    /// memory to match; no real picture comes near this bound.
    pub max_edge: u32,
}

impl Default for ImageLimits {
    fn default() -> Self {
        Self { max_bytes: 20 << 20, max_pixels: 40_000_000, max_edge: 16_384 }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum ImageError {
    #[error("the image is {0} bytes, over the limit of {1}")]
    TooManyBytes(usize, usize),
    #[error("the image is {0}x{1} pixels, over the limit of {2} pixels")]
    TooManyPixels(u32, u32, u64),
    #[error("not an image in a supported format (PNG, JPEG, WebP, GIF)")]
    UnknownFormat,
    #[error("the image could not be decoded: {0}")]
    Decode(String),
    #[error("the image has no pixels")]
    Empty,
    #[error("the image is {0}x{1} pixels, an edge over the limit of {2}")]
    TooLong(u32, u32, u32),
}

/// Decodes an image file's bytes into RGB within `limits`.
pub fn decode(bytes: &[u8], limits: &ImageLimits) -> Result<Rgb, ImageError> {
    if bytes.len() > limits.max_bytes {
        return Err(ImageError::TooManyBytes(bytes.len(), limits.max_bytes));
    }
    let reader = || {
        image::ImageReader::new(Cursor::new(bytes)).with_guessed_format().map_err(|e| ImageError::Decode(e.to_string()))
    };
    let r = reader()?;
    if r.format().is_none() {
        return Err(ImageError::UnknownFormat);
    }
    let (w, h) = r.into_dimensions().map_err(|e| ImageError::Decode(e.to_string()))?;
    if w.max(h) > limits.max_edge {
        return Err(ImageError::TooLong(w, h, limits.max_edge));
    }
    if w as u64 * h as u64 > limits.max_pixels {
        return Err(ImageError::TooManyPixels(w, h, limits.max_pixels));
    }
    if w == 0 || h == 0 {
        return Err(ImageError::Empty);
    }
    let mut r = reader()?;
    let mut l = image::Limits::default();
    l.max_image_width = Some(w);
    l.max_image_height = Some(h);
    l.max_alloc = Some(limits.max_pixels.saturating_mul(16).max(1 << 20));
    r.limits(l);
    let img = r.decode().map_err(|e| ImageError::Decode(e.to_string()))?;
    let rgb = img.into_rgb8();
    Ok(Rgb { width: rgb.width() as usize, height: rgb.height() as usize, pixels: rgb.into_raw() })
}

/// Cuts the `w × h` rectangle at `(x, y)` out of `img`.
pub fn crop(img: &Rgb, x: usize, y: usize, w: usize, h: usize) -> Rgb {
    let mut pixels = Vec::with_capacity(w * h * 3);
    for row in y..y + h {
        let start = (row * img.width + x) * 3;
        pixels.extend_from_slice(&img.pixels[start..start + w * 3]);
    }
    Rgb { width: w, height: h, pixels }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(w: u32, h: u32) -> Vec<u8> {
        let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb([x as u8, y as u8, 7]));
        let mut out = Vec::new();
        img.write_to(&mut Cursor::new(&mut out), image::ImageFormat::Png).unwrap();
        out
    }

    #[test]
    fn decodes_within_limits_and_refuses_beyond_them() {
        let bytes = png(5, 3);
        let img = decode(&bytes, &ImageLimits::default()).unwrap();
        assert_eq!((img.width, img.height), (5, 3));
        assert_eq!(&img.pixels[3 * (5 + 2)..3 * (5 + 2) + 3], &[2, 1, 7]);
        let small = ImageLimits { max_bytes: 1 << 20, max_pixels: 14, max_edge: 100 };
        assert_eq!(decode(&bytes, &small), Err(ImageError::TooManyPixels(5, 3, 14)));
        let tiny = ImageLimits { max_bytes: 10, max_pixels: 100, max_edge: 100 };
        let short = ImageLimits { max_edge: 4, ..ImageLimits::default() };
        assert_eq!(decode(&bytes, &short), Err(ImageError::TooLong(5, 3, 4)));
        assert_eq!(decode(&bytes, &tiny), Err(ImageError::TooManyBytes(bytes.len(), 10)));
        assert_eq!(decode(b"not an image at all", &ImageLimits::default()), Err(ImageError::UnknownFormat));
        assert!(matches!(decode(&bytes[..bytes.len() / 2], &ImageLimits::default()), Err(ImageError::Decode(_))));
    }

    #[test]
    fn every_supported_format_decodes_to_rgb() {
        let img = image::RgbImage::from_fn(6, 4, |x, y| image::Rgb([40 * x as u8, 60 * y as u8, 100]));
        for format in
            [image::ImageFormat::Png, image::ImageFormat::Jpeg, image::ImageFormat::Gif, image::ImageFormat::WebP]
        {
            let mut bytes = Vec::new();
            image::DynamicImage::ImageRgb8(img.clone()).write_to(&mut Cursor::new(&mut bytes), format).unwrap();
            let got = decode(&bytes, &ImageLimits::default()).unwrap_or_else(|e| panic!("{format:?}: {e}"));
            assert_eq!((got.width, got.height, got.pixels.len()), (6, 4, 72), "{format:?}");
        }
        // Grayscale and RGBA become RGB (grey replicated, alpha dropped).
        let grey = image::GrayImage::from_fn(3, 2, |x, _| image::Luma([50 * x as u8]));
        let mut bytes = Vec::new();
        grey.write_to(&mut Cursor::new(&mut bytes), image::ImageFormat::Png).unwrap();
        assert_eq!(&decode(&bytes, &ImageLimits::default()).unwrap().pixels[3..6], &[50, 50, 50]);
        let rgba = image::RgbaImage::from_fn(2, 1, |_, _| image::Rgba([1, 2, 3, 0]));
        let mut bytes = Vec::new();
        rgba.write_to(&mut Cursor::new(&mut bytes), image::ImageFormat::Png).unwrap();
        assert_eq!(decode(&bytes, &ImageLimits::default()).unwrap().pixels, vec![1, 2, 3, 1, 2, 3]);
    }

    #[test]
    fn crop_takes_the_rectangle() {
        let img = Rgb { width: 3, height: 2, pixels: (0..18).collect() };
        assert_eq!(crop(&img, 1, 1, 2, 1).pixels, vec![12, 13, 14, 15, 16, 17]);
    }
}
