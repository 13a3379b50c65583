//! Resizing of 8-bit RGB images with Pillow's arithmetic (`Image.resize(size, Image.LANCZOS)` or
//! `Image.BICUBIC`), so that the pixels we feed a vision encoder are the ones the reference processors feed it.
//!
//! Pillow resamples separably, horizontal pass first (when the width changes), then vertical, each pass
//! rounding to 8 bits. Per output pixel it weights the input pixels within `support · max(scale, 1)` of the
//! pixel's centre with the filter's kernel (x in input pixels divided by `max(scale, 1)`): LANCZOS
//! `sinc(x) · sinc(x / 3)` with support 3, BICUBIC the cubic convolution kernel with `a = −0.5` and support 2.
//! The weights are normalized to sum 1 in double precision, then turned into fixed-point integers with 22
//! fractional bits; the sum starts at one half (rounding) and is shifted back and clamped to 0..=255.

use super::Rgb;

const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Pillow's resampling filters we use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Filter {
    Lanczos,
    Bicubic,
}

impl Filter {
    fn support(self) -> f64 {
        match self {
            Self::Lanczos => 3.0,
            Self::Bicubic => 2.0,
        }
    }

    fn weight(self, x: f64) -> f64 {
        match self {
            Self::Lanczos => lanczos(x),
            Self::Bicubic => bicubic(x),
        }
    }
}

fn sinc(x: f64) -> f64 {
    if x == 0.0 {
        1.0
    } else {
        let x = x * std::f64::consts::PI;
        x.sin() / x
    }
}

fn lanczos(x: f64) -> f64 {
    if (-3.0..3.0).contains(&x) {
        sinc(x) * sinc(x / 3.0)
    } else {
        0.0
    }
}

/// Keys' cubic convolution kernel with `a = −0.5`, as Pillow writes it.
fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// Per output pixel: the first input pixel and the fixed-point weights of the pixels from there.
struct Coeffs {
    bounds: Vec<(usize, usize)>,
    ksize: usize,
    weights: Vec<i32>,
}

fn coeffs(in_size: usize, out_size: usize, filter: Filter) -> Coeffs {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = filter.support() * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let mut bounds = Vec::with_capacity(out_size);
    let mut weights = vec![0i32; out_size * ksize];
    let mut k = vec![0f64; ksize];
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        // C's (int) cast truncates toward zero.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
        let n = xmax - xmin;
        let mut ww = 0.0;
        for (x, kx) in k.iter_mut().enumerate().take(n) {
            let w = filter.weight((x as f64 + xmin as f64 - center + 0.5) * ss);
            *kx = w;
            ww += w;
        }
        let row = &mut weights[xx * ksize..(xx + 1) * ksize];
        for x in 0..n {
            let v = if ww != 0.0 { k[x] / ww } else { k[x] };
            let f = v * (1u64 << PRECISION_BITS) as f64;
            row[x] = if v < 0.0 { (-0.5 + f) as i32 } else { (0.5 + f) as i32 };
        }
        bounds.push((xmin, n));
    }
    Coeffs { bounds, ksize, weights }
}

/// Pillow sums in 32-bit ints: 8-bit values times weights of 22 fractional bits whose magnitudes sum to under
/// 2 stay far inside `i32`.
fn clip8(v: i32) -> u8 {
    (v >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Runs `f(first_row, rows)` over `out` split into bands of whole rows (`row` values each), on up to as many
/// threads as the machine has (images are large enough for it to pay).
fn bands(out: &mut [u8], row: usize, f: impl Fn(usize, &mut [u8]) + Sync) {
    let rows = out.len() / row.max(1);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(8);
    let per = rows.div_ceil(threads).max(64);
    if rows <= per {
        f(0, out);
        return;
    }
    std::thread::scope(|s| {
        for (b, band) in out.chunks_mut(per * row).enumerate() {
            let f = &f;
            s.spawn(move || f(b * per, band));
        }
    });
}

fn horizontal(img: &Rgb, out_w: usize, filter: Filter) -> Rgb {
    let c = coeffs(img.width, out_w, filter);
    let mut out = vec![0u8; out_w * img.height * 3];
    bands(&mut out, out_w * 3, |y0, band| {
        for (dy, dst) in band.chunks_exact_mut(out_w * 3).enumerate() {
            let y = y0 + dy;
            let src = &img.pixels[y * img.width * 3..(y + 1) * img.width * 3];
            for (xx, &(xmin, n)) in c.bounds.iter().enumerate() {
                let k = &c.weights[xx * c.ksize..xx * c.ksize + n];
                // The three channels of each input pixel together (the same sums, one pass over the weights).
                let mut ss = [1i32 << (PRECISION_BITS - 1); 3];
                for (p, &w) in src[xmin * 3..(xmin + n) * 3].chunks_exact(3).zip(k) {
                    ss[0] += p[0] as i32 * w;
                    ss[1] += p[1] as i32 * w;
                    ss[2] += p[2] as i32 * w;
                }
                dst[xx * 3..xx * 3 + 3].copy_from_slice(&ss.map(clip8));
            }
        }
    });
    Rgb { width: out_w, height: img.height, pixels: out }
}

fn vertical(img: &Rgb, out_h: usize, filter: Filter) -> Rgb {
    let c = coeffs(img.height, out_h, filter);
    let row = img.width * 3;
    let mut out = vec![0u8; row * out_h];
    bands(&mut out, row, |y0, band| {
        let mut acc = vec![0i32; row];
        for (dy, dst) in band.chunks_exact_mut(row).enumerate() {
            let yy = y0 + dy;
            let (ymin, n) = c.bounds[yy];
            let k = &c.weights[yy * c.ksize..yy * c.ksize + n];
            acc.iter_mut().for_each(|a| *a = 1 << (PRECISION_BITS - 1));
            for (y, &w) in k.iter().enumerate() {
                let src = &img.pixels[(ymin + y) * row..(ymin + y + 1) * row];
                for (a, &p) in acc.iter_mut().zip(src) {
                    *a += p as i32 * w;
                }
            }
            for (o, &a) in dst.iter_mut().zip(&acc) {
                *o = clip8(a);
            }
        }
    });
    Rgb { width: img.width, height: out_h, pixels: out }
}

/// `img` resized to `width × height` with Pillow's LANCZOS.
pub fn lanczos_resize(img: &Rgb, width: usize, height: usize) -> Rgb {
    resize(img, width, height, Filter::Lanczos)
}

/// `img` resized to `width × height` with Pillow's `filter`. The passes run in Pillow 13's order: vertical first
/// when the height shrinks by more than twice as many pixels as the width does, else horizontal first (each
/// pass rounds to 8 bits, so the order shows in the result).
pub fn resize(img: &Rgb, width: usize, height: usize, filter: Filter) -> Rgb {
    let shrink_h = img.height as i64 - height as i64;
    let shrink_w = img.width as i64 - width as i64;
    if shrink_h > 0 && shrink_h > 2 * shrink_w {
        let tall = vertical(img, height, filter);
        return if width != tall.width { horizontal(&tall, width, filter) } else { tall };
    }
    let wide = if width != img.width { horizontal(img, width, filter) } else { img.clone() };
    if height != wide.height {
        vertical(&wide, height, filter)
    } else {
        wide
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_sum_to_one_and_a_flat_image_stays_flat() {
        let sizes = [(100, 37), (37, 100), (512, 512), (1024, 512), (3, 1024)];
        for ((i, o), filter) in sizes.into_iter().flat_map(|s| [(s, Filter::Lanczos), (s, Filter::Bicubic)]) {
            let c = coeffs(i, o, filter);
            for (xx, &(_, n)) in c.bounds.iter().enumerate() {
                let s: i64 = c.weights[xx * c.ksize..xx * c.ksize + n].iter().map(|&w| w as i64).sum();
                let abs: i64 = c.weights[xx * c.ksize..xx * c.ksize + n].iter().map(|&w| (w as i64).abs()).sum();
                assert!(255 * abs + (1 << PRECISION_BITS) < i32::MAX as i64, "{i}->{o}: sums could overflow i32");
                assert!((s - (1 << PRECISION_BITS)).abs() <= n as i64, "{i}->{o} pixel {xx}: {s}");
            }
        }
        let flat = Rgb { width: 7, height: 5, pixels: [10u8, 200, 77].repeat(35) };
        for filter in [Filter::Lanczos, Filter::Bicubic] {
            let r = resize(&flat, 23, 3, filter);
            assert_eq!((r.width, r.height), (23, 3));
            assert!(r.pixels.chunks(3).all(|p| p == [10, 200, 77]), "{filter:?}: {:?}", &r.pixels[..9]);
        }
    }

    #[test]
    fn same_size_is_a_copy() {
        let img = Rgb { width: 2, height: 2, pixels: (0..12).map(|v| v as u8 * 20).collect() };
        assert_eq!(lanczos_resize(&img, 2, 2).pixels, img.pixels);
    }
}
