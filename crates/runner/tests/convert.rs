//! `convert --format hf` (#17): a GGUF written out as a Hugging Face directory loads back (through the
//! safetensors loader, with the tokenizer and chat template it wrote) and gives the GGUF's own tokens.

use mlx_serving_engine::SamplingParams;
use mlx_serving_models::export::{export_hf, ExportDtype};
use mlx_serving_models::{ChatContent, LoadOptions, ModelBundle};
use mlx_serving_runner::{generate, GenerateOptions};
use mlx_serving_test_support::{reference, smollm2_path};

#[test]
fn gguf_to_hf_and_back_gives_the_same_tokens() {
    let out = std::env::temp_dir().join(format!("mlx-serving-convert-{}", std::process::id()));
    let mut calls = 0;
    export_hf(&smollm2_path(), &out, ExportDtype::F32, |_, _| calls += 1).unwrap();
    assert!(calls > 100, "progress after each tensor");
    let hf = ModelBundle::load(&out, &LoadOptions::default()).unwrap();
    // The same f32 weights: the GGUF dequantized at load.
    let gguf = ModelBundle::load(smollm2_path(), &LoadOptions { dequantize: true, ..LoadOptions::default() }).unwrap();
    assert_eq!(hf.special_tokens.eog, gguf.special_tokens.eog);
    let refs = reference("greedy-SmolLM2-135M-Instruct-transformers-f32.json");
    let opts = |b: &ModelBundle| GenerateOptions { eog_token_ids: b.special_tokens.eog.clone(), ..Default::default() };
    for item in refs["items"].as_array().unwrap().iter().take(8) {
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
