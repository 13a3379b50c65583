//! Images inside prefill: a sequence's image placeholder tokens take their image's encoder output as their
//! embeddings. An image is encoded when a step first computes one of its positions (a prefix-cache hit that
//! covers it all never encodes it), its embeddings kept with the sequence until its prompt has been
//! computed past the image, and in an [`EncoderCache`] (LRU by content hash, bounded in bytes) so that the
//! same image in another request, or this one after a preemption, is not encoded again. Any chunk boundary
//! works: each placeholder's embedding is found by its rank among its image's placeholder tokens.

use mlx_serving_engine::MmInput;
use mlx_serving_models::{ImagePixels, VisionModel};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// One image of a sequence.
pub(crate) struct SeqImage {
    input: MmInput,
    /// Positions of its placeholder tokens (the embeddings' rows, in order).
    positions: Vec<usize>,
    embeds: Option<Arc<[f32]>>,
}

impl SeqImage {
    pub(crate) fn new(input: &MmInput, prompt: &[u32], image_token: u32) -> Self {
        let positions = input.span.clone().filter(|&p| prompt.get(p) == Some(&image_token)).collect();
        Self { input: input.clone(), positions, embeds: None }
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
                        let e: Arc<[f32]> =
                            vision.encode(&px.pixels, px.num_tiles, progress).map_err(|e| e.to_string())?.into();
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
