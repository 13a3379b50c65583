//! Images inside prefill: a sequence's image placeholder tokens take their image's encoder output as their
//! embeddings. An image is encoded when a step first computes one of its positions (a prefix-cache hit that
//! covers it all never encodes it), its embeddings kept with the sequence until its prompt has been
//! computed past the image, and in an [`EncoderCache`] (LRU by content hash, bounded in bytes) so that the
//! same image in another request, or this one after a preemption, is not encoded again. Any chunk boundary
//! works: each placeholder's embedding is found by its rank among its image's placeholder tokens.

use mlx_serving_engine::MmInput;
use mlx_serving_models::{ImagePixels, PixelLayout, VisionModel};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// One image of a sequence.
pub(crate) struct SeqImage {
    input: MmInput,
    /// Positions of its placeholder tokens (the embeddings' rows, in order).
    positions: Vec<usize>,
    embeds: Option<Arc<[f32]>>,
    /// With M-RoPE: its tokens' grid, `rows × cols` (its span holds exactly those placeholders, row-major).
    grid: Option<(usize, usize)>,
}

impl SeqImage {
    /// The image `input` of a prompt, for `vision`; an error when its pixels or span do not fit the model.
    pub(crate) fn new(input: &MmInput, prompt: &[u32], vision: &VisionModel) -> Result<Self, String> {
        let image_token = vision.image_token_id();
        let positions: Vec<usize> = input.span.clone().filter(|&p| prompt.get(p) == Some(&image_token)).collect();
        let grid = match vision.mrope_merge() {
            None => None,
            Some(m) => {
                let px = input.data.downcast_ref::<ImagePixels>().ok_or("an image input without pixels")?;
                let PixelLayout::Patches { rows, cols } = px.layout else {
                    return Err(format!("pixels laid out as {:?} are not for this model", px.layout));
                };
                let (r, c) = (rows / m, cols / m);
                if r * c == 0 || positions.len() != r * c || input.span.len() != r * c {
                    return Err(format!(
                        "an image of {r}x{c} tokens at a span of {} tokens ({} placeholders)",
                        input.span.len(),
                        positions.len()
                    ));
                }
                Some((r, c))
            }
        };
        Ok(Self { input: input.clone(), positions, embeds: None, grid })
    }
}

/// M-RoPE positions (temporal, row, column) of a sequence's tokens `start..start + len` into `out`. A text
/// token's three are its position; an image's tokens sit on its grid from the position of its first token
/// `s`: `(s, s + row, s + column)`; the text after an image continues from `s + max(rows, cols)`. `images`
/// in prompt order.
pub(crate) fn mrope_positions(images: &[SeqImage], start: usize, len: usize, out: &mut Vec<[u32; 3]>) {
    let grids: Vec<(&std::ops::Range<usize>, usize, usize)> =
        images.iter().filter_map(|i| i.grid.map(|(r, c)| (&i.input.span, r, c))).collect();
    let (mut k, mut delta) = (0, 0i64);
    for p in start..start + len {
        while grids.get(k).is_some_and(|g| g.0.end <= p) {
            let (_, r, c) = grids[k];
            delta += r.max(c) as i64 - (r * c) as i64;
            k += 1;
        }
        match grids.get(k) {
            Some(&(span, _, c)) if span.contains(&p) => {
                let s = (span.start as i64 + delta) as u32;
                let i = p - span.start;
                out.push([s, s + (i / c) as u32, s + (i % c) as u32]);
            }
            _ => {
                let q = (p as i64 + delta) as u32;
                out.push([q; 3]);
            }
        }
    }
}

/// Recently encoded images' embeddings by content hash, least recently used evicted beyond `max_bytes`.
pub struct EncoderCache {
    max_bytes: usize,
    bytes: usize,
    tick: u64,
    entries: HashMap<u64, (Arc<[f32]>, u64)>,
}

impl EncoderCache {
    pub fn new(max_bytes: usize) -> Self {
        Self { max_bytes, bytes: 0, tick: 0, entries: HashMap::new() }
    }

    fn get(&mut self, hash: u64) -> Option<Arc<[f32]>> {
        self.tick += 1;
        let tick = self.tick;
        self.entries.get_mut(&hash).map(|(e, t)| {
            *t = tick;
            e.clone()
        })
    }

    fn insert(&mut self, hash: u64, e: Arc<[f32]>) {
        let size = e.len() * 4;
        if size > self.max_bytes {
            return;
        }
        while self.bytes + size > self.max_bytes {
            let Some((&old, _)) = self.entries.iter().min_by_key(|(_, (_, t))| *t) else { break };
            if let Some((e, _)) = self.entries.remove(&old) {
                self.bytes -= e.len() * 4;
            }
        }
        self.tick += 1;
        if let Some((e, _)) = self.entries.insert(hash, (e, self.tick)) {
            self.bytes -= e.len() * 4;
        }
        self.bytes += size;
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// The embedding rows of a sequence's step over positions `start..start + len`, whose first token is row
/// `row0` of the flattened batch: `(batch row, embeddings, offset of the row's values)` per placeholder.
/// Encodes (or finds in `cache`) each image the step touches; `times` gets each encoding's duration.
#[allow(clippy::too_many_arguments)]
pub(crate) fn step_embeds(
    vision: &VisionModel,
    hidden: usize,
    cache: &mut EncoderCache,
    images: &mut [SeqImage],
    start: usize,
    len: usize,
    row0: usize,
    rows: &mut Vec<(usize, Arc<[f32]>, usize)>,
    times: &mut Vec<Duration>,
    progress: &dyn Fn() -> bool,
) -> Result<(), String> {
    let end = start + len;
    for img in images.iter_mut() {
        let span = img.input.span.clone();
        if span.end <= start || span.start >= end {
            continue;
        }
        let embeds = match &img.embeds {
            Some(e) => e.clone(),
            None => {
                let e = match cache.get(img.input.hash) {
                    Some(e) => e,
                    None => {
                        let px = img
                            .input
                            .data
                            .downcast_ref::<ImagePixels>()
                            .ok_or("an image input without pixels for this model")?;
                        let t0 = Instant::now();
                        let e: Arc<[f32]> = vision.encode(px, progress).map_err(|e| e.to_string())?.into();
                        times.push(t0.elapsed());
                        cache.insert(img.input.hash, e.clone());
                        e
                    }
                };
                if e.len() != img.positions.len() * hidden {
                    return Err(format!(
                        "the image has {} placeholder tokens but its encoder gave {} embeddings",
                        img.positions.len(),
                        e.len() / hidden.max(1)
                    ));
                }
                img.embeds = Some(e.clone());
                e
            }
        };
        for (k, &p) in img.positions.iter().enumerate() {
            if (start..end).contains(&p) {
                rows.push((row0 + p - start, embeds.clone(), k * hidden));
            }
        }
        if end >= span.end {
            // The prompt is past this image: its embeddings live on in the encoder cache only.
            img.embeds = None;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(span: std::ops::Range<usize>, rows: usize, cols: usize) -> SeqImage {
        let input = MmInput { span, hash: 0, data: Arc::new(()) };
        SeqImage { input, positions: Vec::new(), embeds: None, grid: Some((rows, cols)) }
    }

    #[test]
    fn mrope_positions_place_images_on_their_grid_and_text_after_the_largest_side() {
        // 3 text tokens, a 2 x 3 image (6 tokens), 2 text tokens, a 1 x 1 image, 1 text token.
        let images = [image(3..9, 2, 3), image(11..12, 1, 1)];
        let mut out = Vec::new();
        mrope_positions(&images, 0, 13, &mut out);
        let want: Vec<[u32; 3]> = vec![
            [0; 3],
            [1; 3],
            [2; 3],
            [3, 3, 3],
            [3, 3, 4],
            [3, 3, 5],
            [3, 4, 3],
            [3, 4, 4],
            [3, 4, 5],
            // after the image: 3 + max(2, 3)
            [6; 3],
            [7; 3],
            [8, 8, 8],
            [9; 3],
        ];
        assert_eq!(out, want);
        // Any window of the sequence gives the same positions (chunked prefill, decode steps).
        for start in 0..13 {
            let mut part = Vec::new();
            mrope_positions(&images, start, 13 - start, &mut part);
            assert_eq!(part, want[start..], "from {start}");
        }
        // Past the prompt: decode positions continue.
        let mut next = Vec::new();
        mrope_positions(&images, 13, 2, &mut next);
        assert_eq!(next, vec![[10; 3], [11; 3]]);
    }

    #[test]
    fn the_encoder_cache_evicts_the_least_recently_used_within_its_bytes() {
        let mut c = EncoderCache::new(3 * 4 * 10);
        for h in 0..3 {
            c.insert(h, vec![h as f32; 10].into());
        }
        assert!(c.get(0).is_some());
        c.insert(3, vec![3.0; 10].into());
        assert!(c.get(1).is_none(), "1 was the least recently used");
        assert!(c.get(0).is_some() && c.get(2).is_some() && c.get(3).is_some());
        c.insert(9, vec![0.0; 100].into());
        assert!(c.get(9).is_none(), "larger than the whole cache: not kept");
        assert_eq!(c.len(), 3);
    }
}
