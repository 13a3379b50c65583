//! Speculative decoding on real models (#20): with n-gram lookup and with a draft model whose distribution
//! differs from the target's (the MLX 4-bit SmolLM2 drafting for the GGUF Q4_1 one), greedy and sampled
//! tokens equal those of decoding without speculation, alone and 8 at once; rejected drafts, preemption and
//! the prefix cache leave every block free and the tokens unchanged.

mod common;
use common::*;
use mlx_serving_engine::{FinishReason, SamplingParams};
use mlx_serving_models::{LoadOptions, ModelBundle};
use mlx_serving_runner::{
    generate_speculative, DraftModel, GenerateOptions, SpecCounts, SpecMethod, SpeculativeConfig, Speculator,
};
use mlx_serving_test_support::mlx_dir;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};

fn draft_bundle() -> Arc<ModelBundle> {
    static B: OnceLock<Arc<ModelBundle>> = OnceLock::new();
    B.get_or_init(|| {
        Arc::new(ModelBundle::load(mlx_dir("SmolLM2-135M-Instruct-4bit"), &LoadOptions::default()).unwrap())
    })
    .clone()
}

fn ngram(k: usize, batch: usize) -> Speculator {
    let cfg = SpeculativeConfig {
        num_speculative_tokens: k,
        prompt_lookup_min: 1,
        prompt_lookup_max: 3,
        disable_by_batch_size: batch,
        // Free verification: always propose the most, so that every path is exercised.
        verify_cost: 0.0,
        ..SpeculativeConfig::default()
    };
    Speculator::new(cfg, None).unwrap()
}

fn drafted(k: usize, batch: usize, num_blocks: usize) -> Speculator {
    let cfg = SpeculativeConfig {
        method: SpecMethod::Draft,
        num_speculative_tokens: k,
        disable_by_batch_size: batch,
        verify_cost: 0.0,
        ..SpeculativeConfig::default()
    };
    let draft = DraftModel::new(draft_bundle(), &bundle(), 16, num_blocks).unwrap();
    Speculator::new(cfg, Some(draft)).unwrap()
}

fn speculate(s: Speculator, prompt: &[u32], params: &SamplingParams) -> (Vec<u32>, SpecCounts) {
    let b = bundle();
    let opts = GenerateOptions { eog_token_ids: b.special_tokens.eog.clone(), ..GenerateOptions::default() };
    let (g, counts) = generate_speculative(b, s, prompt, params, &opts, |_| {}).unwrap();
    (g.token_ids, counts)
}

/// A prompt that asks to repeat a passage: n-gram lookup finds long matches.
fn input_heavy() -> Vec<u32> {
    let b = bundle();
    let text = "Repeat this sentence exactly: the quick brown fox jumps over the lazy dog near the river bank.";
    b.encode_chat(&serde_json::json!([{"role": "user", "content": text}]), mlx_serving_models::ChatContent::Text)
        .unwrap()
}

#[test]
fn greedy_tokens_equal_plain_decoding_with_ngram_and_draft_alone() {
    let mut ps: Vec<Vec<u32>> = prompts().into_iter().step_by(4).take(5).collect();
    ps.push(input_heavy());
    let params = SamplingParams::greedy(40);
    let (mut ngram_counts, mut draft_counts) = (SpecCounts::default(), SpecCounts::default());
    for (i, p) in ps.iter().enumerate() {
        let want = alone(p, &params);
        let (got, c) = speculate(ngram(4, 8), p, &params);
        assert_eq!(got, want, "prompt {i}: n-gram speculation changed the tokens");
        ngram_counts.draft_tokens += c.draft_tokens;
        ngram_counts.accepted_tokens += c.accepted_tokens;
        let (got, c) = speculate(drafted(4, 8, 64), p, &params);
        assert_eq!(got, want, "prompt {i}: draft-model speculation changed the tokens");
        draft_counts.draft_tokens += c.draft_tokens;
        draft_counts.accepted_tokens += c.accepted_tokens;
    }
    for (name, c) in [("n-gram", ngram_counts), ("draft", draft_counts)] {
        assert!(c.accepted_tokens > 0, "{name}: no draft was ever accepted: {c:?}");
        assert!(c.accepted_tokens < c.draft_tokens, "{name}: no draft was ever rejected: {c:?}");
    }
}

/// Sampling at temperature 1 (with top-p and a repetition penalty): a draft whose distribution differs from the
/// target's proposes, and the tokens are the very tokens plain sampling draws with the same seed, for each of
/// 24 seeds (so their distribution is the target's; the per-position generators' own distribution is tested
/// in the sampler).
#[test]
fn sampled_tokens_equal_plain_sampling_seed_for_seed() {
    let p = input_heavy();
    let mut total = SpecCounts::default();
    for seed in 0..24u64 {
        let params = SamplingParams {
            temperature: 1.0,
            top_p: 0.95,
            repetition_penalty: 1.1,
            seed: Some(seed),
            max_tokens: 12,
            ..SamplingParams::default()
        };
        let want = alone(&p, &params);
        let spec = if seed % 2 == 0 { drafted(3, 8, 64) } else { ngram(3, 8) };
        let (got, c) = speculate(spec, &p, &params);
        assert_eq!(got, want, "seed {seed}");
        total.draft_tokens += c.draft_tokens;
        total.accepted_tokens += c.accepted_tokens;
    }
    assert!(total.accepted_tokens > 0 && total.accepted_tokens < total.draft_tokens, "{total:?}");
}

/// Eight requests at once, speculating together (the batch-size cut-off above 8), with a draft model and with
/// n-gram: each gets the tokens it gets alone without speculation; then a second round of the same prompts hits
/// the prefix cache built by the first and still gives the same tokens; every block is free at the end.
#[test]
fn eight_concurrent_speculative_requests_match_plain_decoding() {
    let mut ps: Vec<Vec<u32>> = prompts().into_iter().step_by(3).take(7).collect();
    ps.push(input_heavy());
    let params = SamplingParams::greedy(24);
    let want: Vec<Vec<u32>> = ps.iter().map(|p| alone(p, &params)).collect();
    for spec in [drafted(4, 8, 512), ngram(4, 8)] {
        let h = engine_with(|_| {}, Some(spec));
        for round in 0..2 {
            let got = run_all(&h, ps.iter().map(|p| (p.clone(), params.clone())).collect());
            for (i, (toks, _, cached)) in got.iter().enumerate() {
                assert_eq!(toks, &want[i], "round {round}, prompt {i}");
                if round == 1 && ps[i].len() > 17 {
                    assert!(*cached > 0, "round 2, prompt {i}: no prefix hit");
                }
            }
        }
        let s = h.stats();
        assert!(s.spec_draft_tokens.load(Ordering::SeqCst) > 0, "nothing was speculated");
        assert!(s.spec_accepted_tokens.load(Ordering::SeqCst) > 0);
        assert_eq!(
            s.spec_accepted_per_position[0].load(Ordering::SeqCst),
            s.spec_accepted_per_position.iter().map(|c| c.load(Ordering::SeqCst)).max().unwrap(),
            "the first position is accepted most often"
        );
        assert_eq!(s.kv_usage_ppm.load(Ordering::SeqCst), 0, "blocks still held after every request finished");
    }
}

/// A cache too small for four requests with their drafts: preemption and dropped drafts, same tokens.
#[test]
fn preemption_with_speculation_gives_identical_tokens() {
    let ps: Vec<Vec<u32>> = prompts().into_iter().skip(12).take(4).collect();
    let params = SamplingParams { ignore_eos: true, ..SamplingParams::greedy(40) };
    let h = engine_with(
        |c| {
            c.num_blocks = 10;
            c.enable_prefix_caching = false;
        },
        Some(drafted(4, 8, 40)),
    );
    let got = run_all(&h, ps.iter().map(|p| (p.clone(), params.clone())).collect());
    for (i, p) in ps.iter().enumerate() {
        assert_eq!(got[i].0, alone(p, &params), "prompt {i}");
        assert_eq!(got[i].1, FinishReason::Length);
    }
    assert!(h.stats().preemptions.load(Ordering::SeqCst) > 0, "the test must actually preempt");
    assert_eq!(h.stats().kv_usage_ppm.load(Ordering::SeqCst), 0);
}

/// `speculative: false` opts a request out: nothing is proposed for it.
#[test]
fn a_request_can_opt_out() {
    let h = engine_with(|_| {}, Some(ngram(4, 8)));
    let params = SamplingParams { speculative: false, ..SamplingParams::greedy(24) };
    let got = run_all(&h, vec![(input_heavy(), params.clone())]);
    assert_eq!(got[0].0, alone(&input_heavy(), &params));
    assert_eq!(h.stats().spec_draft_tokens.load(Ordering::SeqCst), 0);
}

#[test]
fn a_draft_with_another_vocabulary_is_refused() {
    let qwen = ModelBundle::load(mlx_serving_test_support::qwen2_path(), &LoadOptions::default()).unwrap();
    let err = DraftModel::new(Arc::new(qwen), &bundle(), 16, 8).err().expect("refused");
    assert!(err.contains("vocabulary"), "{err}");
}
