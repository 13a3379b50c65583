//! `mlx-serving make-model`'s random-weight GGUF files (#21): every storage type loads as a whole bundle
//! (model, byte-level tokenizer, ChatML template) and gives finite logits; the same seed gives the same bytes.

mod common;

use common::step;
use mlx_serving_models::random::{write_random_gguf, RandomDtype, RandomShape};
use mlx_serving_models::{LoadOptions, ModelBundle, PagedKvCache};

fn tmp(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("mlx-serving-random-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

#[test]
fn every_dtype_loads_and_runs() {
    for dtype in ["f16", "bf16", "q8_0", "q4_k"] {
        let p = tmp(&format!("tiny-{dtype}.gguf"));
        let size = write_random_gguf(&p, &RandomShape::TINY, dtype.parse().unwrap(), 7, |_, _| {}).unwrap();
        assert_eq!(size, std::fs::metadata(&p).unwrap().len());
        let b = ModelBundle::load(&p, &LoadOptions::default()).unwrap_or_else(|e| panic!("{dtype}: {e}"));
        let cfg = b.model.config();
        assert_eq!((cfg.vocab_size, cfg.hidden_size, cfg.num_layers), (512, 256, 2));
        // Byte-level: a prompt's tokens are its bytes.
        let ids = b.tokenizer.encode("Hello", false).unwrap().get_ids().to_vec();
        assert_eq!(ids.len(), 5, "{dtype}: {ids:?}");
        let chat = b.chat_template.as_ref().expect("a chat template");
        let text = chat.render(&serde_json::json!([{"role": "user", "content": "Hi"}]), None::<&()>, true).unwrap();
        assert_eq!(text, "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n");
        let mut cache = PagedKvCache::new(cfg, 16, 4);
        let logits = step(&b.model, &mut cache, &[0, 1, 2, 3], &ids, 0, ids.len());
        assert!(logits.iter().flatten().all(|x| x.is_finite()), "{dtype}: finite logits");
        let spread =
            logits[4].iter().fold(f32::MIN, |a, &x| a.max(x)) - logits[4].iter().fold(f32::MAX, |a, &x| a.min(x));
        assert!(spread > 0.0, "{dtype}: the logits are not all equal");
    }
}

#[test]
fn the_seed_fixes_the_bytes_and_sizes_add_up() {
    let (a, b, c) = (tmp("a.gguf"), tmp("b.gguf"), tmp("c.gguf"));
    write_random_gguf(&a, &RandomShape::TINY, RandomDtype::Q4K, 1, |_, _| {}).unwrap();
    write_random_gguf(&b, &RandomShape::TINY, RandomDtype::Q4K, 1, |_, _| {}).unwrap();
    write_random_gguf(&c, &RandomShape::TINY, RandomDtype::Q4K, 2, |_, _| {}).unwrap();
    let (a, b, c) = (std::fs::read(a).unwrap(), std::fs::read(b).unwrap(), std::fs::read(c).unwrap());
    assert!(a == b && a != c && a.len() == c.len());
    // The named shapes have the parameter counts of the models they stand for.
    assert_eq!(RandomShape::LLAMA3_8B.parameters(), 8_030_261_248);
    assert_eq!(RandomShape::QWEN25_7B.parameters(), 7_615_616_512);
}
