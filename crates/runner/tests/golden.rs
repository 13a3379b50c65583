//! Golden tests: greedy output of the real GGUF models against Hugging Face transformers (f32 on the
//! dequantized GGUF weights).
//!
//! For every prompt the first 32 output ids must be identical to the reference, or first differ where the
//! reference's top-1/top-2 logit gap is under 0.5 (a near-tie that quantized arithmetic may flip: llama.cpp's
//! own divergences sit at gaps ≤ 0.22). A divergence at a wider gap is a bug.

use mlx_serving_engine::SamplingParams;
use mlx_serving_kernels::{Isa, KvDtype};
use mlx_serving_models::{ActivationPrecision, ChatContent, LoadOptions, ModelBundle};
use mlx_serving_runner::{generate, last_position_logits, logprob, GenerateOptions};
use mlx_serving_test_support::golden::{check_greedy, ids, COMPARE};
use mlx_serving_test_support::{gemma3_path, hf_dir, mlx_dir, qwen2_path, reference, smollm2_path};
use std::path::Path;

fn run_golden(path: &Path, ref_file: &str, opts: &LoadOptions) {
    println!("isa: {:?}", Isa::detected());
    let bundle = ModelBundle::load(path, opts).unwrap();
    let gen_opts = GenerateOptions { eog_token_ids: bundle.special_tokens.eog.clone(), ..GenerateOptions::default() };
    check_greedy(ref_file, |n, item, prompt_ids| {
        let ours_prompt = match item["kind"].as_str().unwrap() {
            "completion" => bundle.encode(item["prompt"].as_str().unwrap(), true).unwrap(),
            _ => bundle.encode_chat(&item["prompt"], ChatContent::Text).unwrap(),
        };
        assert_eq!(ours_prompt, prompt_ids, "item {n}: prompt ids");
        let params = SamplingParams::greedy(COMPARE as u32);
        generate(&bundle.model, &bundle.tokenizer, prompt_ids, &params, &gen_opts, |_| {}).unwrap().token_ids
    });
}

#[test]
fn smollm2_greedy_matches_transformers() {
    run_golden(&smollm2_path(), "greedy-SmolLM2-135M-Instruct-transformers-f32.json", &LoadOptions::default());
}

/// The default numerics on the portable kernels (see `on_portable_kernels`).
#[test]
fn smollm2_greedy_matches_transformers_portable_kernels() {
    on_portable_kernels("smollm2_greedy_matches_transformers");
}

#[test]
fn qwen2_greedy_matches_transformers() {
    run_golden(&qwen2_path(), "greedy-Qwen2.5-Coder-0.5B-Instruct-transformers-f32.json", &LoadOptions::default());
}

/// Hugging Face directories (#17) written from the GGUFs by the `gguf` package's dequantizer (not our code):
/// f32 and bf16 safetensors, the models' real `config.json`, `tokenizer.json` and `tokenizer_config.json`.
#[test]
fn smollm2_hf_dir_f32_greedy_matches_transformers() {
    run_golden(
        &hf_dir("SmolLM2-135M-Instruct-f32"),
        "greedy-SmolLM2-135M-Instruct-transformers-f32.json",
        &LoadOptions::default(),
    );
}

#[test]
fn smollm2_hf_dir_bf16_greedy_matches_transformers() {
    run_golden(
        &hf_dir("SmolLM2-135M-Instruct-bf16"),
        "greedy-SmolLM2-135M-Instruct-transformers-f32.json",
        &LoadOptions::default(),
    );
}

#[test]
fn qwen2_hf_dir_bf16_greedy_matches_transformers() {
    run_golden(
        &hf_dir("Qwen2.5-Coder-0.5B-Instruct-bf16"),
        "greedy-Qwen2.5-Coder-0.5B-Instruct-transformers-f32.json",
        &LoadOptions::default(),
    );
}

/// MLX-quantized directories written by mlx-lm's own `convert` (group 64, f32 scales, from the bf16 Hugging
/// Face directory) against mlx-lm's own greedy ids on those files (`scripts/mlx-greedy.py`, run once; the
/// files' hashes are checked by `scripts/fetch-model.sh mlx`): all but `allowed`
/// prompts identical over their tokens, and at every divergence our own top-1 minus top-2 logit under 0.5 (a
/// near-tie that either side's rounding may flip).
fn run_mlx_differential(name: &str, opts: &LoadOptions, allowed: usize) {
    run_mlx_against(name, &format!("mlx-lm-greedy-{name}.json"), opts, allowed);
}

/// `run_mlx_differential` against the reference file `ref_file`, over its first 32 tokens.
fn run_mlx_against(name: &str, ref_file: &str, opts: &LoadOptions, allowed: usize) {
    let dir = mlx_dir(name);
    let bundle = ModelBundle::load(&dir, opts).unwrap();
    let theirs = reference(ref_file);
    let gen_opts = GenerateOptions { eog_token_ids: bundle.special_tokens.eog.clone(), ..GenerateOptions::default() };
    let (mut identical, mut failures) = (0, Vec::new());
    let items = theirs["items"].as_array().unwrap();
    for (n, item) in items.iter().enumerate() {
        let prompt = ids(&item["prompt_ids"]);
        let mut want = ids(&item["output_ids"]);
        want.truncate(COMPARE);
        let g = generate(
            &bundle.model,
            &bundle.tokenizer,
            &prompt,
            &SamplingParams::greedy(want.len() as u32),
            &gen_opts,
            |_| {},
        )
        .unwrap();
        match (0..want.len()).find(|&j| g.token_ids.get(j) != Some(&want[j])) {
            None => identical += 1,
            Some(j) => {
                let mut context = prompt.clone();
                context.extend_from_slice(&want[..j]);
                let mut logits = first_step_logits(&bundle, &context);
                logits.sort_by(|a, b| b.total_cmp(a));
                let gap = logits[0] - logits[1];
                println!("item {n:2}: first difference at {j}, our gap {gap:.4}");
                if gap >= 0.5 {
                    failures.push(format!("item {n}: diverged at {j} where our top-1 leads by {gap:.4}"));
                }
            }
        }
    }
    println!("{name} vs {ref_file}: {identical}/{} identical", items.len());
    assert!(identical + allowed >= items.len(), "only {identical} of {} identical", items.len());
    assert!(failures.is_empty(), "divergences at non-tie positions:\n{}", failures.join("\n"));
}

/// 4 bits run on our Q4_1 kernels. With f32 activations (mlx-lm's arithmetic) nearly every prompt is
/// identical; with our default numerics (16/8-bit rounded activations) near-ties flip, only at near-ties.
#[test]
fn smollm2_mlx_4bit_matches_mlx_lm() {
    let f32_acts = LoadOptions { activations: ActivationPrecision::F32, ..LoadOptions::default() };
    run_mlx_differential("SmolLM2-135M-Instruct-4bit", &f32_acts, 2);
    run_mlx_differential("SmolLM2-135M-Instruct-4bit", &LoadOptions::default(), 24);
}

/// 8 bits on our Q8_0 kernels plus per-block offsets (16-bit activations, as Q8_0 weights always take):
/// identical.
#[test]
fn smollm2_mlx_8bit_matches_mlx_lm() {
    run_mlx_differential("SmolLM2-135M-Instruct-8bit", &LoadOptions::default(), 1);
}

/// MLX directories as mlx-community ships them (mlx-lm's `convert` with its default bf16 scales and biases,
/// from the bf16 Hugging Face directories) against the shared reference ids
/// (`greedy-*-mlx-lm-*.json`: mlx-lm 0.32.2 on such conversions of the same weights, computed in f32): at least
/// 22 of 24 prompts identical over 32 tokens with f32 activations (mlx-lm's arithmetic), every divergence where
/// our own top-1 leads by under 0.5; with the default numerics (16/8-bit rounded activations) near-ties flip
/// more often (17/24 identical on SmolLM2 4-bit), still only at near-ties.
#[test]
fn mlx_bf16_scales_match_the_shared_mlx_lm_references() {
    let f32_acts = LoadOptions { activations: ActivationPrecision::F32, ..LoadOptions::default() };
    for (dir, file) in [
        ("SmolLM2-135M-Instruct-4bit-bf16", "greedy-SmolLM2-135M-Instruct-mlx-lm-4bit.json"),
        ("SmolLM2-135M-Instruct-8bit-bf16", "greedy-SmolLM2-135M-Instruct-mlx-lm-8bit.json"),
        ("Qwen2.5-Coder-0.5B-Instruct-4bit-bf16", "greedy-Qwen2.5-Coder-0.5B-Instruct-mlx-lm-4bit.json"),
    ] {
        run_mlx_against(dir, file, &f32_acts, 2);
        run_mlx_against(dir, file, &LoadOptions::default(), 24);
    }
}

/// Logits of the prompt's last position, one forward over the whole prompt.
fn first_step_logits(bundle: &ModelBundle, prompt: &[u32]) -> Vec<f32> {
    last_position_logits(&bundle.model, prompt).unwrap()
}

fn check_top5(opts: &LoadOptions, tolerance: f32) {
    println!("isa: {:?}", Isa::detected());
    let bundle = ModelBundle::load(smollm2_path(), opts).unwrap();
    let refs = reference("greedy-SmolLM2-135M-Instruct-transformers-f32.json");
    let mut worst = 0f32;
    for case in refs["top5_first_step"].as_array().unwrap() {
        let logits = first_step_logits(&bundle, &ids(&case["prompt_ids"]));
        let top5 = case["top5"].as_array().unwrap();
        let best = mlx_serving_runner::argmax(&logits);
        assert_eq!(best as u64, top5[0]["id"].as_u64().unwrap(), "top-1 for {}", case["prompt"]);
        for t in top5 {
            let id = t["id"].as_u64().unwrap() as u32;
            let want = t["logprob"].as_f64().unwrap() as f32;
            let got = logprob(&logits, id);
            println!("{:?} token {id}: logprob {got:.4} vs reference {want:.4}", case["prompt"].as_str().unwrap());
            worst = worst.max((got - want).abs());
        }
    }
    println!("largest logprob difference: {worst:.4} (tolerance {tolerance})");
    assert!(worst <= tolerance, "largest logprob difference {worst} exceeds {tolerance}");
}

/// The default path: quantized weights; activations rounded to 16 bits into the head, q/k/v and gate/up, 8 bits into o
/// and down; an f16 KV cache. The bound is 0.25; llama.cpp (f16 cache, 8-bit activations everywhere) is at 0.19
/// by the figures, 0.16 as measured here; measured 0.080 (0.125 on the portable kernels, 0.117 with an f32
/// cache; session 15's eight-lane norm sums redrew these from 0.078, 0.139 and 0.081). 8 bits everywhere measured 0.18–0.32, 16 bits only into the head and q/k/v 0.12–0.22 (0.15 now), and
/// 16 bits into the head, q/k/v and up only 0.11, depending on the kernels' summation order: 8-bit rounding is noise
/// that small changes redraw.
#[test]
fn smollm2_first_step_top5_logprobs_quantized() {
    check_top5(&LoadOptions::default(), 0.25);
}

/// The same on the portable kernels (what a CPU without AVX2 runs): the kernel choice is made once per
/// process, so this runs the test above in a child process with `MLX_SERVING_ISA=portable`.
#[test]
fn smollm2_first_step_top5_logprobs_quantized_portable_kernels() {
    on_portable_kernels("smollm2_first_step_top5_logprobs_quantized");
}

/// Runs test `name` of this binary in a child process on the portable kernels.
fn on_portable_kernels(name: &str) {
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", name, "--nocapture", "--test-threads", "1"])
        .env("MLX_SERVING_ISA", "portable")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    println!("{text}");
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("1 passed"), "{name} ran");
    assert!(text.contains("isa: Portable"), "{name} ran on the portable kernels");
}

/// `--activations int8`: 8 bits into every matmul but the Q8_0 head (16 bits: see `ActivationPrecision::for_weight`).
/// Measured 0.21; 0.32 with the head at 8 bits too (over the bound: 8-bit rounding is noise that any change redraws).
#[test]
fn smollm2_first_step_top5_logprobs_int8() {
    check_top5(&LoadOptions { activations: ActivationPrecision::Int8, ..LoadOptions::default() }, 0.25);
}

/// 16-bit activations everywhere: measured 0.005.
#[test]
fn smollm2_first_step_top5_logprobs_int16() {
    check_top5(&LoadOptions { activations: ActivationPrecision::Int16, ..LoadOptions::default() }, 0.01);
}

/// With every weight dequantized to f32 the arithmetic is the reference's, up to summation order.
#[test]
fn smollm2_first_step_top5_logprobs_exact_f32() {
    check_top5(&LoadOptions { dequantize: true, kv_cache_dtype: KvDtype::F32, ..LoadOptions::default() }, 0.01);
}

/// Quantized matmuls with f32 activations and an f32 KV cache: the reference's arithmetic up to
/// summation order.
const EXACT: LoadOptions = LoadOptions {
    dequantize: false,
    activations: ActivationPrecision::F32,
    kv_cache_dtype: KvDtype::F32,
    config_only: false,
};

#[test]
fn smollm2_greedy_matches_transformers_f32_activations() {
    run_golden(&smollm2_path(), "greedy-SmolLM2-135M-Instruct-transformers-f32.json", &EXACT);
}

#[test]
fn smollm2_first_step_top5_logprobs_f32_activations() {
    check_top5(&EXACT, 0.01);
}

/// The f32 KV cache (`--kv-cache-dtype f32`) with the default activations: greedy output still differs
/// from the reference only at near-ties, and first-step logprobs stay within the bound (measured 0.08).
#[test]
fn smollm2_greedy_matches_transformers_f32_kv() {
    let opts = LoadOptions { kv_cache_dtype: KvDtype::F32, ..LoadOptions::default() };
    run_golden(&smollm2_path(), "greedy-SmolLM2-135M-Instruct-transformers-f32.json", &opts);
}

#[test]
fn smollm2_first_step_top5_logprobs_f32_kv() {
    check_top5(&LoadOptions { kv_cache_dtype: KvDtype::F32, ..LoadOptions::default() }, 0.25);
}

/// With f32 activations, the f16 cache alone moves first-step logprobs by at most 0.005 (measured 0.0035).
#[test]
fn smollm2_first_step_top5_logprobs_f16_kv_alone() {
    check_top5(
        &LoadOptions { activations: ActivationPrecision::F32, kv_cache_dtype: KvDtype::F16, ..LoadOptions::default() },
        0.005,
    );
}

/// Gemma 3 (sliding-window and global layers, q/k and post norms, GELU, SentencePiece tokenizer from the GGUF,
/// the built-in chat format) against llama.cpp on the same file: `scripts/llama-reference.py` ran the peer's
/// `llama-server`; its prompt ids come from llama.cpp's own tokenizer and its gaps from its own arithmetic.
/// `scripts/f32-gaps.py` added mlx-lm's f32 gaps on the same weights: one prompt (19, position 15) has
/// llama.cpp's top-1 ahead by 0.69 where exact arithmetic has the two within 0.016, and picks ours.
#[test]
fn gemma3_greedy_matches_llama_cpp() {
    run_golden(&gemma3_path(), "llama.cpp-greedy-gemma-3-270m.json", &LoadOptions::default());
}
