//! `convert --format hf` (#17): a GGUF written out as a Hugging Face directory loads back (through the
//! safetensors loader, with the tokenizer and chat template it wrote) and gives the GGUF's own tokens.

use mlx_serving_engine::SamplingParams;
use mlx_serving_models::export::{export, export_hf, ExportDtype, ExportFormat};
use mlx_serving_models::{ChatContent, LoadOptions, ModelBundle, ModelConfig};
use mlx_serving_runner::{generate, last_position_logits, GenerateOptions};
use mlx_serving_test_support::{gemma3_path, mlx_dir, reference, smollm2_path};
use std::path::Path;

#[test]
fn gguf_to_hf_and_back_gives_the_same_tokens() {
    roundtrip(&smollm2_path(), "greedy-SmolLM2-135M-Instruct-transformers-f32.json", &[0, 1, 2, 3, 12, 13, 14, 15]);
}

/// Gemma 3 through the Hugging Face layout: its norms written as `w - 1` and read back as `1 + w`, the four
/// norms per layer under Gemma's names, the sliding-window layout in `config.json`, the SentencePiece
/// tokenizer and the built-in chat format carried over.
#[test]
fn gemma3_gguf_to_hf_and_back_gives_the_same_tokens() {
    roundtrip(&gemma3_path(), "llama.cpp-greedy-gemma-3-270m.json", &[0, 5, 12, 14]);
}

/// Writes `gguf` as an f32 Hugging Face directory, loads it back, and checks that the reference `items`'
/// prompts encode alike and give the same 16 greedy ids as the GGUF dequantized at load (the same weights).
fn roundtrip(gguf: &Path, ref_file: &str, items: &[usize]) {
    let name = gguf.file_stem().unwrap().to_string_lossy();
    let out = std::env::temp_dir().join(format!("mlx-serving-convert-{name}-{}", std::process::id()));
    let mut calls = 0;
    export_hf(gguf, &out, ExportDtype::F32, |_, _| calls += 1).unwrap();
    assert!(calls > 100, "progress after each tensor");
    let hf = ModelBundle::load(&out, &LoadOptions::default()).unwrap();
    // The same f32 weights: the GGUF dequantized at load.
    let gguf = ModelBundle::load(gguf, &LoadOptions { dequantize: true, ..LoadOptions::default() }).unwrap();
    // The same hyper-parameters, but for llama's RoPE layout (the export undoes llama.cpp's Q/K permutation).
    let same_layout = ModelConfig { rope_style: hf.model.config().rope_style, ..gguf.model.config().clone() };
    assert_eq!(hf.model.config(), &same_layout);
    assert_eq!(hf.special_tokens.eog, gguf.special_tokens.eog);
    let refs = reference(ref_file);
    let opts = |b: &ModelBundle| GenerateOptions { eog_token_ids: b.special_tokens.eog.clone(), ..Default::default() };
    for &i in items {
        let item = &refs["items"][i];
        let (a, b) = match item["kind"].as_str().unwrap() {
            "completion" => {
                let p = item["prompt"].as_str().unwrap();
                (hf.encode(p, true).unwrap(), gguf.encode(p, true).unwrap())
            }
            _ => (
                hf.encode_chat(&item["prompt"], ChatContent::Text).unwrap(),
                gguf.encode_chat(&item["prompt"], ChatContent::Text).unwrap(),
            ),
        };
        assert_eq!(a, b, "the written tokenizer and chat template give the same prompt ids");
        let run = |m: &ModelBundle| {
            generate(&m.model, &m.tokenizer, &a, &SamplingParams::greedy(16), &opts(m), |_| {}).unwrap().token_ids
        };
        assert_eq!(run(&hf), run(&gguf), "prompt {:?}", item["prompt"]);
    }
    std::fs::remove_dir_all(&out).unwrap();
}

/// `convert --format mlx`: the MLX 4- and 8-bit directories we write load back (4-bit through the Q4_1
/// repacking), and wherever the f32 model is sure of its next token the quantized ones pick it too: 8-bit
/// where the top-1 leads by 0.25 logits, 4-bit by 3. (Requantizing SmolLM2's Q4_1 weights to 4 bits in groups
/// of 64 flips first tokens up to a 2.5-logit lead; mlx-lm's own `convert` of the same weights flips more.
/// mlx-lm loading our output and agreeing is checked by hand, see BENCHMARKS.md.)
#[test]
fn gguf_to_mlx_loads_and_keeps_the_confident_tokens() {
    let f32_model =
        ModelBundle::load(smollm2_path(), &LoadOptions { dequantize: true, ..LoadOptions::default() }).unwrap();
    let refs = reference("greedy-SmolLM2-135M-Instruct-transformers-f32.json");
    for (bits, sure, at_least) in [(4, 3.0, 3), (8, 0.25, 15)] {
        let out = std::env::temp_dir().join(format!("mlx-serving-convert-mlx{bits}-{}", std::process::id()));
        export(&smollm2_path(), &out, ExportFormat::Mlx { bits, group_size: 64 }, |_, _| {}).unwrap();
        let q = ModelBundle::load(&out, &LoadOptions::default()).unwrap();
        let mut confident = 0;
        for item in refs["items"].as_array().unwrap() {
            let prompt: Vec<u32> =
                item["prompt_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
            let want = last_position_logits(&f32_model.model, &prompt).unwrap();
            let mut sorted = want.clone();
            sorted.sort_by(|a, b| b.total_cmp(a));
            if sorted[0] - sorted[1] < sure {
                continue;
            }
            confident += 1;
            let top = |l: &[f32]| (0..l.len()).max_by(|&a, &b| l[a].total_cmp(&l[b])).unwrap();
            assert_eq!(
                top(&last_position_logits(&q.model, &prompt).unwrap()),
                top(&want),
                "{bits} bits: {:?}",
                item["prompt"]
            );
        }
        assert!(confident >= at_least, "{bits} bits: only {confident} confident prompts");
        std::fs::remove_dir_all(&out).unwrap();
    }
}

/// Directories convert too: mlx-lm's own 8-bit directory written as f32 Hugging Face safetensors holds
/// exactly the values our loader reads from the MLX file (Q8_0 blocks plus offsets, dequantized), so the two
/// give the same greedy ids; written back as MLX 4-bit it keeps the first token wherever the source leads by
/// over 3 logits.
#[test]
fn mlx_dir_converts_to_hf_and_back_to_mlx() {
    let src = mlx_dir("SmolLM2-135M-Instruct-8bit");
    let tmp = |what: &str| std::env::temp_dir().join(format!("mlx-serving-convert-{what}-{}", std::process::id()));
    let (hf, mlx4) = (tmp("from-mlx-hf"), tmp("from-mlx-mlx4"));
    export_hf(&src, &hf, ExportDtype::F32, |_, _| {}).unwrap();
    export(&src, &mlx4, ExportFormat::Mlx { bits: 4, group_size: 64 }, |_, _| {}).unwrap();
    let exact = LoadOptions { dequantize: true, ..LoadOptions::default() };
    let (a, b) = (ModelBundle::load(&src, &exact).unwrap(), ModelBundle::load(&hf, &exact).unwrap());
    let q4 = ModelBundle::load(&mlx4, &LoadOptions::default()).unwrap();
    let refs = reference("greedy-SmolLM2-135M-Instruct-transformers-f32.json");
    let opts = GenerateOptions { eog_token_ids: a.special_tokens.eog.clone(), ..Default::default() };
    let mut confident = 0;
    for (n, item) in refs["items"].as_array().unwrap().iter().enumerate() {
        let prompt: Vec<u32> =
            item["prompt_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        let run = |m: &ModelBundle| {
            generate(&m.model, &m.tokenizer, &prompt, &SamplingParams::greedy(16), &opts, |_| {}).unwrap().token_ids
        };
        if n < 4 {
            assert_eq!(run(&a), run(&b), "prompt {:?}", item["prompt"]);
        }
        // Requantized to 4 bits, the first token stays where the source leads by over 3 logits (as for GGUF
        // sources, `gguf_to_mlx_loads_and_keeps_the_confident_tokens`).
        let mut logits: Vec<(f32, u32)> =
            last_position_logits(&a.model, &prompt).unwrap().into_iter().zip(0..).collect();
        logits.sort_by(|x, y| y.0.total_cmp(&x.0));
        if logits[0].0 - logits[1].0 > 3.0 {
            confident += 1;
            assert_eq!(run(&q4)[0], logits[0].1, "4-bit first token, prompt {:?}", item["prompt"]);
        }
    }
    assert!(confident >= 2, "only {confident} confident prompts: the 4-bit check would be vacuous");
    assert_eq!(b.encode_chat(&refs["items"][12]["prompt"], ChatContent::Text).unwrap(), {
        a.encode_chat(&refs["items"][12]["prompt"], ChatContent::Text).unwrap()
    });
    std::fs::remove_dir_all(&hf).unwrap();
    std::fs::remove_dir_all(&mlx4).unwrap();
}
