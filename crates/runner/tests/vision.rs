//! SmolVLM (Idefics3) against mlx-vlm (f32) on SmolVLM-rand: the prompt ids we build for chats with images
//! are the reference processor's, and greedy ids from one forward pass per step (image embeddings in place of
//! the placeholder tokens) equal the reference's or first differ at a near-tie (top-1/top-2 gap < 0.25).

use mlx_serving_frontend::image::{decode, idefics3::Idefics3Config, ImageLimits};
use mlx_serving_models::{
    ActivationPrecision, BatchInput, ChatContent, ImagePixels, ImageProcessing, LoadOptions, ModelBundle, PagedKvCache,
    PixelLayout, SeqInput,
};
use mlx_serving_test_support::{reference, smolvlm_dir, testdata};
use serde_json::{json, Value};

const NEAR_TIE: f64 = 0.25;

/// Each image's span in the prompt and its embeddings.
type Images = Vec<(std::ops::Range<usize>, Vec<f32>)>;

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

/// The reference chat with `{"type": "image", "image": FILE}` parts as the template sees them, and the files.
fn chat(item: &Value) -> (Value, Vec<String>) {
    let mut files = Vec::new();
    let messages = item["prompt"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            let parts: Vec<Value> = match &m["content"] {
                Value::String(t) => vec![json!({"type": "text", "text": t})],
                Value::Array(parts) => parts
                    .iter()
                    .map(|p| match p["type"].as_str().unwrap() {
                        "image" => {
                            files.push(p["image"].as_str().unwrap().to_string());
                            json!({"type": "image"})
                        }
                        _ => json!({"type": "text", "text": p["text"]}),
                    })
                    .collect(),
                other => panic!("content {other}"),
            };
            json!({"role": m["role"], "content": parts})
        })
        .collect();
    (Value::Array(messages), files)
}

fn processor(b: &ModelBundle) -> Idefics3Config {
    let ImageProcessing::Idefics3(p) = &b.vision.as_ref().unwrap().1 else { panic!("not Idefics3") };
    Idefics3Config {
        longest_edge: p.longest_edge,
        tile: p.tile,
        do_image_splitting: p.do_image_splitting,
        rescale_factor: p.rescale_factor,
        image_mean: p.image_mean,
        image_std: p.image_std,
    }
}

/// Prompt ids, and per image its span and its embeddings.
fn prepare(b: &ModelBundle, item: &Value) -> (Vec<u32>, Images) {
    let (messages, files) = chat(item);
    let proc = processor(b);
    let vision = &b.vision.as_ref().unwrap().0;
    let mut grids = Vec::new();
    let mut embeds = Vec::new();
    for f in &files {
        let bytes = std::fs::read(testdata().join("images").join(f)).unwrap();
        let img = proc.preprocess(&decode(&bytes, &ImageLimits::default()).unwrap());
        grids.push((img.rows, img.cols));
        let px = ImagePixels { pixels: img.pixels.clone(), layout: PixelLayout::Tiles(img.num_tiles()), held: None };
        embeds.push(vision.encode(&px, &|| true).unwrap());
    }
    let (prompt, spans) = b.encode_chat_with_images(&messages, None, ChatContent::Text, &grids).unwrap();
    (prompt, spans.into_iter().zip(embeds).collect())
}

#[test]
fn prompt_ids_match_the_reference_processor() {
    let b = ModelBundle::load(smolvlm_dir(), &LoadOptions::default()).unwrap();
    let refs = reference("greedy-SmolVLM-rand-mlx-vlm.json");
    for item in refs["items"].as_array().unwrap() {
        let (messages, files) = chat(item);
        let proc = processor(&b);
        let grids: Vec<(usize, usize)> = files
            .iter()
            .map(|f| {
                let img = decode(&std::fs::read(testdata().join("images").join(f)).unwrap(), &ImageLimits::default());
                let img = proc.preprocess(&img.unwrap());
                (img.rows, img.cols)
            })
            .collect();
        let (prompt, spans) = b.encode_chat_with_images(&messages, None, ChatContent::Text, &grids).unwrap();
        assert_eq!(prompt, ids(&item["prompt_ids"]), "{}", item["id"]);
        let image_tokens: usize = spans.iter().map(|s| prompt[s.clone()].iter().filter(|&&t| t == 49190).count()).sum();
        let want: u64 =
            item["images"].as_array().map_or(0, |a| a.iter().map(|i| i["image_tokens"].as_u64().unwrap()).sum());
        assert_eq!(image_tokens as u64, want, "{}", item["id"]);
    }
}

/// Greedy decoding of one sequence, one forward pass per step; returns the ids.
fn greedy(b: &ModelBundle, prompt: &[u32], images: &Images, n: usize, stop: &[u32]) -> Vec<u32> {
    let m = &b.model;
    let h = m.config().hidden_size;
    let bs = 16;
    let nb = (prompt.len() + n).div_ceil(bs);
    let mut cache = PagedKvCache::new(m.config(), bs, nb);
    let table: Vec<u32> = (0..nb as u32).collect();
    let image_id = b.vision.as_ref().unwrap().0.image_token_id();
    // Each image token's row gets the next embedding of its image.
    let mut rows: Vec<(usize, &[f32])> = Vec::new();
    for (span, e) in images {
        let mut k = 0;
        for p in span.clone() {
            if prompt[p] == image_id {
                rows.push((p, &e[k * h..(k + 1) * h]));
                k += 1;
            }
        }
        assert_eq!(k * h, e.len());
    }
    let mut tokens = prompt.to_vec();
    let mut out = Vec::new();
    let mut done = 0;
    while out.len() < n {
        let q = &tokens[done..];
        let positions: Vec<u32> = (done as u32..tokens.len() as u32).collect();
        let seqs = [SeqInput { query_len: q.len(), context_len: tokens.len(), block_table: &table }];
        let last = [q.len() as u32 - 1];
        let embeds: Vec<(usize, &[f32])> =
            rows.iter().filter(|(p, _)| *p >= done).map(|&(p, e)| (p - done, e)).collect();
        let batch = BatchInput {
            token_ids: q,
            positions: &positions,
            slot_mapping: &positions,
            seqs: &seqs,
            logits_indices: &last,
            embeds: &embeds,
            mrope_positions: &[],
        };
        let logits = m.forward(&batch, &mut cache).unwrap();
        let next = logits.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0 as u32;
        done = tokens.len();
        tokens.push(next);
        out.push(next);
        if stop.contains(&next) {
            break;
        }
    }
    out
}

#[test]
fn greedy_ids_match_mlx_vlm_in_f32() {
    let opts = LoadOptions { dequantize: true, activations: ActivationPrecision::F32, ..Default::default() };
    let b = ModelBundle::load(smolvlm_dir(), &opts).unwrap();
    let refs = reference("greedy-SmolVLM-rand-mlx-vlm.json");
    let stop = ids(&refs["stop_token_ids"]);
    let mut failures = Vec::new();
    for item in refs["items"].as_array().unwrap() {
        let (prompt, images) = prepare(&b, item);
        let want = ids(&item["output_ids"]);
        let got = greedy(&b, &prompt, &images, want.len(), &stop);
        let gaps: Vec<f64> = item["step_gaps"].as_array().unwrap().iter().map(|g| g.as_f64().unwrap()).collect();
        match got.iter().zip(&want).position(|(a, b)| a != b) {
            None if got.len() == want.len() => println!("{}: identical", item["id"]),
            Some(k) if gaps[k] < NEAR_TIE => {
                println!("{}: first differs at {k}, a near-tie (gap {})", item["id"], gaps[k])
            }
            k => failures.push(format!(
                "{}: first differs at {k:?} (gap {:?})\n  got  {got:?}\n  want {want:?}",
                item["id"],
                k.map(|k| gaps[k])
            )),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The reference items through the batched engine: image embeddings from the executor's encoder, prefill in
/// chunks of 96 tokens (so chunk boundaries fall inside images).
mod engine {
    use super::*;
    use mlx_serving_engine::{EngineCore, EngineHandle, EngineRequest, MmInput, Priority, RequestId, SamplingParams};
    use mlx_serving_runner::ModelExecutor;
    use std::sync::atomic::Ordering;
    use std::sync::Arc;

    pub(super) fn engine(b: &Arc<ModelBundle>, budget: usize) -> EngineHandle {
        engine_with(b, budget, 256 << 20)
    }

    pub(super) fn engine_with(b: &Arc<ModelBundle>, budget: usize, kv_bytes: usize) -> EngineHandle {
        let mut cfg = ModelExecutor::scheduler_config(b, 16, kv_bytes);
        cfg.max_num_batched_tokens = budget;
        let exec = ModelExecutor::new(b.clone(), cfg.block_size, cfg.num_blocks);
        EngineCore::spawn(cfg, exec).0
    }

    /// Prompt ids and image inputs of a reference item (`files` replaced by `swap` where given).
    pub(super) fn request(b: &ModelBundle, item: &Value, swap: Option<&str>) -> (Vec<u32>, Vec<MmInput>) {
        let (messages, files) = chat(item);
        let proc = processor(b);
        let mut grids = Vec::new();
        let mut pixels = Vec::new();
        for f in &files {
            let bytes = std::fs::read(testdata().join("images").join(swap.unwrap_or(f))).unwrap();
            let img = proc.preprocess(&decode(&bytes, &ImageLimits::default()).unwrap());
            grids.push((img.rows, img.cols));
            let num_tiles = img.num_tiles();
            pixels.push(ImagePixels { pixels: img.pixels, layout: PixelLayout::Tiles(num_tiles), held: None });
        }
        let (prompt, spans) = b.encode_chat_with_images(&messages, None, ChatContent::Text, &grids).unwrap();
        let inputs = spans
            .into_iter()
            .zip(pixels)
            .map(|(span, px)| MmInput { span, hash: px.content_hash(), data: Arc::new(px) })
            .collect();
        (prompt, inputs)
    }

    /// Submits all at once; each request's ids and cached prompt tokens.
    pub(super) fn run(
        h: &EngineHandle,
        reqs: Vec<(Vec<u32>, Vec<MmInput>)>,
        max_tokens: u32,
    ) -> Vec<(Vec<u32>, usize)> {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let rxs: Vec<_> = reqs
            .into_iter()
            .map(|(prompt, mm_inputs)| {
                let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
                let r = EngineRequest {
                    id: RequestId(NEXT.fetch_add(1, Ordering::Relaxed)),
                    prompt_token_ids: prompt,
                    params: Arc::new(SamplingParams::greedy(max_tokens)),
                    priority: Priority::Normal,
                    deadline: None,
                    constraint: None,
                    mm_inputs,
                };
                h.add_request(r, tx).unwrap();
                rx
            })
            .collect();
        rxs.into_iter()
            .map(|mut rx| {
                let (mut ids, mut cached) = (Vec::new(), 0);
                loop {
                    let o = rx.blocking_recv().expect("engine output");
                    assert!(o.error.is_none(), "{:?}", o.error);
                    ids.extend(o.new_token_ids);
                    cached = o.num_cached_tokens.unwrap_or(cached);
                    if o.finish_reason.is_some() {
                        return (ids, cached);
                    }
                }
            })
            .collect()
    }

    pub(super) fn encodes(h: &EngineHandle) -> u64 {
        h.stats().encoder_time_counts.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }
}

#[test]
fn the_engine_matches_the_reference_alone_and_batched_with_chunked_prefill() {
    let b = std::sync::Arc::new(ModelBundle::load(smolvlm_dir(), &LoadOptions::default()).unwrap());
    let refs = reference("greedy-SmolVLM-rand-mlx-vlm.json");
    let items = refs["items"].as_array().unwrap();
    let h = engine::engine(&b, 96);
    let max_tokens = 32;
    let alone: Vec<Vec<u32>> =
        items.iter().map(|it| engine::run(&h, vec![engine::request(&b, it, None)], max_tokens).remove(0).0).collect();
    let mut failures = Vec::new();
    for (item, got) in items.iter().zip(&alone) {
        let want = ids(&item["output_ids"]);
        let gaps: Vec<f64> = item["step_gaps"].as_array().unwrap().iter().map(|g| g.as_f64().unwrap()).collect();
        match got.iter().zip(&want).position(|(a, b)| a != b) {
            None if got.len() == want.len() => println!("{}: identical", item["id"]),
            Some(k) if gaps[k] < NEAR_TIE => println!("{}: first differs at {k}, a near-tie ({})", item["id"], gaps[k]),
            k => failures.push(format!("{}: differs at {k:?}\n  got  {got:?}\n  want {want:?}", item["id"])),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // Four at a time: the same ids.
    for chunk in items.chunks(4).zip(alone.chunks(4)) {
        let reqs = chunk.0.iter().map(|it| engine::request(&b, it, None)).collect();
        let got: Vec<Vec<u32>> = engine::run(&h, reqs, max_tokens).into_iter().map(|(ids, _)| ids).collect();
        assert_eq!(got, chunk.1, "batched");
    }
}

#[test]
fn the_prefix_cache_keys_image_content_and_the_encoder_cache_skips_repeats() {
    let b = std::sync::Arc::new(ModelBundle::load(smolvlm_dir(), &LoadOptions::default()).unwrap());
    let refs = reference("greedy-SmolVLM-rand-mlx-vlm.json");
    let item = &refs["items"][0]; // red_circle_512.png, then text
    let h = engine::engine(&b, 2048);
    let (prompt, inputs) = engine::request(&b, item, None);
    let span = inputs[0].span.clone();
    let first = engine::run(&h, vec![(prompt.clone(), inputs.clone())], 8).remove(0);
    assert_eq!(engine::encodes(&h), 1);
    // The same image again: the prefix cache covers the image, nothing is encoded, the same ids.
    let again = engine::run(&h, vec![(prompt.clone(), inputs)], 8).remove(0);
    // Every full block before the last prompt token hits, and those cover the whole image.
    assert_eq!(again.1, (prompt.len() - 1) / 16 * 16);
    assert!(again.1 >= span.end, "cached {} of span {span:?}", again.1);
    assert_eq!(again.0, first.0);
    assert_eq!(engine::encodes(&h), 1);
    // Another image of the same size: the same prompt ids, but no cached block may hold image positions.
    let (other_prompt, other) = engine::request(&b, item, Some("gray_ramp_400x400.png"));
    assert_eq!(other_prompt, prompt, "same grid, same placeholder ids");
    let o = engine::run(&h, vec![(other_prompt, other)], 8).remove(0);
    assert_eq!(o.1, span.start / 16 * 16, "only the blocks before the image hit ({span:?})");
    assert_eq!(engine::encodes(&h), 2);
    assert_ne!(o.0, first.0, "another image, another answer");
}

#[test]
fn image_requests_survive_preemption() {
    let b = std::sync::Arc::new(ModelBundle::load(smolvlm_dir(), &LoadOptions::default()).unwrap());
    let refs = reference("greedy-SmolVLM-rand-mlx-vlm.json");
    let items: Vec<&Value> =
        refs["items"].as_array().unwrap().iter().filter(|i| i["images"].is_array()).take(4).collect();
    let alone: Vec<Vec<u32>> = {
        let h = engine::engine(&b, 2048);
        items.iter().map(|it| engine::run(&h, vec![engine::request(&b, it, None)], 24).remove(0).0).collect()
    };
    // 40 blocks of 16 tokens: each request (about 350 + 24 tokens) fits alone, four at once do not.
    let per_block = mlx_serving_models::PagedKvCache::bytes_per_block(b.model.config(), 16);
    // Prefill in chunks of 64: all four are admitted a chunk at a time and run out of blocks part way.
    let h = engine::engine_with(&b, 64, 40 * per_block);
    let got: Vec<Vec<u32>> = engine::run(&h, items.iter().map(|it| engine::request(&b, it, None)).collect(), 24)
        .into_iter()
        .map(|(ids, _)| ids)
        .collect();
    let preemptions = h.stats().preemptions.load(std::sync::atomic::Ordering::Relaxed);
    assert!(preemptions > 0, "the cache was too small to hold all four");
    assert_eq!(got, alone, "preempted image requests recompute to the same ids");
}
