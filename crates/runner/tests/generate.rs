//! The generation loop on the real default model: stop strings, seeds, max_tokens, context limits.

use mlx_serving_engine::{FinishReason, SamplingParams};
use mlx_serving_models::{LoadOptions, ModelBundle};
use mlx_serving_runner::{generate, GenerateError, GenerateOptions};
use mlx_serving_test_support::smollm2_path;

fn bundle() -> ModelBundle {
    ModelBundle::load(smollm2_path(), &LoadOptions::default()).unwrap()
}

fn opts(b: &ModelBundle) -> GenerateOptions {
    GenerateOptions { eog_token_ids: b.special_tokens.eog.clone(), ..GenerateOptions::default() }
}

#[test]
fn stop_string_ends_generation_and_is_not_emitted() {
    let b = bundle();
    let prompt = b.encode("1, 2, 3, 4, 5,", true).unwrap();
    let free = generate(&b.model, &b.tokenizer, &prompt, &SamplingParams::greedy(12), &opts(&b), |_| {}).unwrap();
    assert!(free.text.contains(" 8,"), "greedy continuation should count on: {:?}", free.text);
    let params = SamplingParams { stop: vec![" 8,".into()], ..SamplingParams::greedy(12) };
    let mut streamed = String::new();
    let g = generate(&b.model, &b.tokenizer, &prompt, &params, &opts(&b), |d| streamed.push_str(d)).unwrap();
    assert_eq!(g.finish_reason, FinishReason::Stop);
    assert_eq!(g.text, free.text[..free.text.find(" 8,").unwrap()]);
    assert_eq!(streamed, g.text);
}

#[test]
fn max_tokens_gives_length_and_streamed_text_equals_decode() {
    let b = bundle();
    let prompt = b.encode("Once upon a time", true).unwrap();
    let mut streamed = String::new();
    let g = generate(
        &b.model,
        &b.tokenizer,
        &prompt,
        &SamplingParams { ignore_eos: true, ..SamplingParams::greedy(20) },
        &opts(&b),
        |d| streamed.push_str(d),
    )
    .unwrap();
    assert_eq!(g.finish_reason, FinishReason::Length);
    assert_eq!(g.token_ids.len(), 20);
    assert_eq!(streamed, b.tokenizer.decode(&g.token_ids, true).unwrap());
}

#[test]
fn seeded_sampling_is_reproducible() {
    let b = bundle();
    let prompt = b.encode("My favourite animal is", true).unwrap();
    let run = |seed| {
        let p = SamplingParams {
            temperature: 1.0,
            top_p: 0.95,
            seed: Some(seed),
            ignore_eos: true,
            max_tokens: 24,
            ..SamplingParams::default()
        };
        generate(&b.model, &b.tokenizer, &prompt, &p, &opts(&b), |_| {}).unwrap().token_ids
    };
    let (a, a2, c) = (run(1), run(1), run(2));
    assert_eq!(a, a2, "same seed, same tokens");
    assert_ne!(a, c, "different seeds should differ over 24 sampled tokens");
}

#[test]
fn prompt_plus_max_tokens_over_the_context_is_an_error() {
    let b = bundle();
    let err =
        generate(&b.model, &b.tokenizer, &[1, 2, 3], &SamplingParams::greedy(9000), &opts(&b), |_| {}).unwrap_err();
    assert!(matches!(err, GenerateError::ContextLengthExceeded { max_model_len: 8192, .. }), "{err}");
    let err = generate(
        &b.model,
        &b.tokenizer,
        &[1],
        &SamplingParams { temperature: 5.0, ..SamplingParams::greedy(1) },
        &opts(&b),
        |_| {},
    )
    .unwrap_err();
    assert!(err.to_string().contains("temperature"), "{err}");
}
