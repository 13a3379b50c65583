//! The GPU executor on an NVIDIA GPU (#21): golden tokens, logits against the CPU model, batch invariance and
//! prefix caching. They need a GPU, so they are `#[ignore]`d here; `scripts/cuda-tests.sh` runs them on the
//! device machine (`--ignored`), with the models in `MLX_SERVING_MODELS_DIR`.

use mlx_serving_cuda::CudaModel;
use mlx_serving_engine::{EngineRequest, Executor, RequestId, SamplingParams, Scheduler, SchedulerConfig};
use mlx_serving_models::{
    argmax, ActivationPrecision, BatchInput, DeviceModel, LoadOptions, ModelBundle, SeqInput, StepLogits,
};
use mlx_serving_runner::{generate_with, last_position_logits, GenerateOptions, ModelExecutor};
use mlx_serving_test_support::golden::{check_greedy, COMPARE};
use mlx_serving_test_support::{qwen2_path, smollm2_path};
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

const BS: usize = 16;

fn gpu_model(bundle: &ModelBundle, blocks: usize) -> CudaModel {
    CudaModel::load(&bundle.path, bundle.model.config(), 0, BS, blocks).expect("load on the GPU")
}

fn gpu_executor(bundle: &Arc<ModelBundle>, blocks: usize) -> ModelExecutor {
    ModelExecutor::on_device(bundle.clone(), BS, Box::new(gpu_model(bundle, blocks)))
}

fn golden_on_gpu(path: &Path, ref_file: &str) {
    let bundle = Arc::new(ModelBundle::load(path, &LoadOptions::default()).unwrap());
    let blocks = 256;
    let start = Instant::now();
    let mut exec = gpu_executor(&bundle, blocks);
    println!("loaded on the GPU in {:.2} s", start.elapsed().as_secs_f64());
    let opts = GenerateOptions { eog_token_ids: bundle.special_tokens.eog.clone(), ..GenerateOptions::default() };
    // The reference's prompt ids go in as they are: that our tokenizer and template give the same ids is the CPU
    // golden test's check (crates/runner/tests/golden.rs), and tokenizing does not depend on the device.
    check_greedy(ref_file, |_, _, prompt_ids| {
        let params = SamplingParams::greedy(COMPARE as u32);
        generate_with(&bundle, &mut exec, blocks, prompt_ids, &params, &opts, |_| {}).unwrap().0.token_ids
    });
}

#[test]
#[ignore = "needs an NVIDIA GPU: scripts/cuda-tests.sh"]
fn smollm2_greedy_matches_transformers_on_gpu() {
    golden_on_gpu(&smollm2_path(), "greedy-SmolLM2-135M-Instruct-transformers-f32.json");
}

#[test]
#[ignore = "needs an NVIDIA GPU: scripts/cuda-tests.sh"]
fn qwen2_greedy_matches_transformers_on_gpu() {
    golden_on_gpu(&qwen2_path(), "greedy-Qwen2.5-Coder-0.5B-Instruct-transformers-f32.json");
}

/// A batch of one sequence's `tokens` at `start..`, in a cache whose blocks are `table`, logits for its last row.
fn forward_one(m: &mut CudaModel, tokens: &[u32], start: usize, table: &[u32]) -> Vec<f32> {
    forward_many(m, &[(tokens, start, table)])
}

/// One batch of several sequences `(tokens, start, table)`, logits for each one's last row.
fn forward_many(m: &mut CudaModel, seqs: &[(&[u32], usize, &[u32])]) -> Vec<f32> {
    let out = forward_select(m, seqs, &[]);
    assert!(out.tokens.iter().all(Option::is_none));
    assert!(out.logits.iter().all(|v| v.is_finite()), "non-finite logits");
    out.logits
}

/// [`forward_many`] with the last rows flagged in `argmax_only` returned as their argmax alone.
fn forward_select(m: &mut CudaModel, seqs: &[(&[u32], usize, &[u32])], argmax_only: &[bool]) -> StepLogits {
    let (mut ids, mut pos, mut slots, mut inputs, mut last) = (vec![], vec![], vec![], vec![], vec![]);
    for &(tokens, start, table) in seqs {
        for (j, &t) in tokens.iter().enumerate() {
            let p = start + j;
            ids.push(t);
            pos.push(p as u32);
            slots.push(table[p / BS] * BS as u32 + (p % BS) as u32);
        }
        inputs.push(SeqInput { query_len: tokens.len(), context_len: start + tokens.len(), block_table: table });
        last.push(ids.len() as u32 - 1);
    }
    let batch = BatchInput {
        token_ids: &ids,
        positions: &pos,
        slot_mapping: &slots,
        seqs: &inputs,
        logits_indices: &last,
        embeds: &[],
        mrope_positions: &[],
    };
    m.forward_select(&batch, argmax_only, &|| true).unwrap()
}

fn log_softmax(x: &[f32]) -> Vec<f64> {
    let max = x.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
    let lse = x.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln() + max;
    x.iter().map(|&v| v as f64 - lse).collect()
}

/// Largest difference of the reference's top-5 tokens' logprobs.
fn top5_gap(reference: &[f32], ours: &[f32]) -> f64 {
    let (r, o) = (log_softmax(reference), log_softmax(ours));
    let mut idx: Vec<usize> = (0..r.len()).collect();
    idx.sort_by(|&a, &b| r[b].total_cmp(&r[a]));
    idx[..5].iter().map(|&i| (r[i] - o[i]).abs()).fold(0.0, f64::max)
}

/// The GPU's logits against the CPU model in exact f32 arithmetic, for a prompt's last position computed two
/// ways: inside a prompt-sized batch (more than 8 rows: cuBLAS, f16 activations) and as a decode step after the
/// rest of the prompt (the matvec kernels, f32 activations).
fn logits_against_cpu(path: &Path, prefill_bound: f64, decode_bound: f64) {
    let f32_acts = LoadOptions { activations: ActivationPrecision::F32, ..LoadOptions::default() };
    let bundle = ModelBundle::load(path, &f32_acts).unwrap();
    let mut m = gpu_model(&bundle, 64);
    let texts = [
        "The capital of France is a city that many people",
        "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.",
        "1, 2, 3, 4, 5, 6, 7, 8,",
    ];
    let (mut worst_prefill, mut worst_decode) = (0f64, 0f64);
    for text in texts {
        let prompt = bundle.encode(text, true).unwrap();
        assert!(prompt.len() > 8, "{text:?}: a prompt of {} tokens would not reach the cuBLAS path", prompt.len());
        let want = last_position_logits(&bundle.model, &prompt).unwrap();
        let table: Vec<u32> = (0..prompt.len().div_ceil(BS) as u32).rev().collect();
        let whole = forward_one(&mut m, &prompt, 0, &table);
        let n = prompt.len();
        forward_one(&mut m, &prompt[..n - 1], 0, &table);
        let step = forward_one(&mut m, &prompt[n - 1..], n - 1, &table);
        let (p, d) = (top5_gap(&want, &whole), top5_gap(&want, &step));
        println!("{text:?} ({n} tokens): top-5 logprob gap prefill {p:.5}, decode {d:.5}");
        worst_prefill = worst_prefill.max(p);
        worst_decode = worst_decode.max(d);
    }
    assert!(worst_prefill < prefill_bound, "prefill top-5 gap {worst_prefill}");
    assert!(worst_decode < decode_bound, "decode top-5 gap {worst_decode}");
}

#[test]
#[ignore = "needs an NVIDIA GPU: scripts/cuda-tests.sh"]
fn smollm2_logits_match_the_cpu() {
    logits_against_cpu(&smollm2_path(), 0.1, 0.01);
}

#[test]
#[ignore = "needs an NVIDIA GPU: scripts/cuda-tests.sh"]
fn qwen2_logits_match_the_cpu() {
    logits_against_cpu(&qwen2_path(), 0.1, 0.01);
}

/// The texts' prompts, each in its own 8 blocks (the tables), with all but their last token computed.
fn prefilled(m: &mut CudaModel, bundle: &ModelBundle, texts: &[&str]) -> (Vec<Vec<u32>>, Vec<Vec<u32>>) {
    let prompts: Vec<Vec<u32>> = texts.iter().map(|t| bundle.encode(t, true).unwrap()).collect();
    let tables: Vec<Vec<u32>> = (0..prompts.len() as u32).map(|i| (i * 8..i * 8 + 8).collect()).collect();
    for (p, t) in prompts.iter().zip(&tables) {
        assert!(p.len() >= 2, "each prompt needs a prefix and a last token");
        forward_one(m, &p[..p.len() - 1], 0, t);
    }
    (prompts, tables)
}

/// Each prompt's last token as a decode row `(tokens, start, table)` for [`forward_many`].
fn last_tokens<'a>(prompts: &'a [Vec<u32>], tables: &'a [Vec<u32>]) -> Vec<(&'a [u32], usize, &'a [u32])> {
    prompts.iter().zip(tables).map(|(p, t)| (&p[p.len() - 1..], p.len() - 1, &t[..])).collect()
}

/// A decode row's logits are bitwise the same alone and with other sequences' rows beside it (up to 8 rows).
#[test]
#[ignore = "needs an NVIDIA GPU: scripts/cuda-tests.sh"]
fn decode_rows_are_batch_invariant() {
    let bundle = ModelBundle::load(smollm2_path(), &LoadOptions::default()).unwrap();
    let mut m = gpu_model(&bundle, 256);
    let vocab = bundle.model.config().vocab_size;
    let texts = [
        "Once upon a time",
        "SELECT name FROM users WHERE",
        "The quick brown fox jumps over the lazy dog. Then",
        "Q: 2+2? A:",
        "Rust is a language",
        "import numpy as np\n",
        "Hello there, my friend",
        "Lists: a, b,",
    ];
    let (prompts, tables) = prefilled(&mut m, &bundle, &texts);
    let last = last_tokens(&prompts, &tables);
    let alone: Vec<Vec<f32>> = last.iter().map(|&(t, start, table)| forward_one(&mut m, t, start, table)).collect();
    for size in [2, 3, 5, 8] {
        let together = forward_many(&mut m, &last[..size]);
        for (i, a) in alone.iter().take(size).enumerate() {
            assert!(
                together[i * vocab..(i + 1) * vocab].iter().zip(a).all(|(x, y)| x.to_bits() == y.to_bits()),
                "sequence {i} in a batch of {size} differs from alone"
            );
        }
    }
}

/// Rows asked for their argmax alone (greedy requests) give the argmax of their logits, taken on the GPU with the
/// CPU sampler's rules; the other rows' logits come back in order, bitwise those of a plain forward.
#[test]
#[ignore = "needs an NVIDIA GPU: scripts/cuda-tests.sh"]
fn argmax_rows_are_the_argmax_of_their_logits() {
    let bundle = ModelBundle::load(smollm2_path(), &LoadOptions::default()).unwrap();
    let mut m = gpu_model(&bundle, 64);
    let vocab = bundle.model.config().vocab_size;
    let texts = ["Once upon a time", "SELECT name FROM", "The quick brown fox", "Q: 2+2? A:"];
    let (prompts, tables) = prefilled(&mut m, &bundle, &texts);
    let seqs = last_tokens(&prompts, &tables);
    let full = forward_many(&mut m, &seqs);
    for flags in [[true, false, true, true], [false, true, false, false], [true; 4]] {
        let out = forward_select(&mut m, &seqs, &flags);
        let mut kept = out.logits.chunks(vocab);
        for (i, &only) in flags.iter().enumerate() {
            let row = &full[i * vocab..(i + 1) * vocab];
            if only {
                assert_eq!(out.tokens[i], Some(argmax(row)), "row {i} of {flags:?}");
            } else {
                assert_eq!(out.tokens[i], None);
                let got = kept.next().expect("a logits row for each unflagged row");
                assert!(got.iter().zip(row).all(|(a, b)| a.to_bits() == b.to_bits()), "row {i} of {flags:?}");
            }
        }
        assert!(kept.next().is_none(), "logits rows beyond the unflagged ones");
    }
}

/// What `run_engine` saw: each request's tokens, the most sequences in one step, the prompt tokens served from
/// the prefix cache.
struct EngineRun {
    tokens: Vec<Vec<u32>>,
    widest_step: usize,
    cached_tokens: usize,
}

/// Requests through the scheduler and the GPU executor: all at once or one after another, greedy.
fn run_engine(
    exec: &mut ModelExecutor,
    blocks: usize,
    prompts: &[Vec<u32>],
    together: bool,
    prefix: bool,
) -> EngineRun {
    let cfg = SchedulerConfig {
        block_size: BS,
        num_blocks: blocks,
        max_num_seqs: 8,
        max_num_batched_tokens: 256,
        max_model_len: 2048,
        enable_prefix_caching: prefix,
        ..SchedulerConfig::default()
    };
    let mut sched = Scheduler::new(cfg);
    let mut run = EngineRun { tokens: vec![Vec::new(); prompts.len()], widest_step: 0, cached_tokens: 0 };
    let params = Arc::new(SamplingParams { ignore_eos: true, ..SamplingParams::greedy(24) });
    let add = |sched: &mut Scheduler, i: usize| {
        let req = EngineRequest {
            id: RequestId(i as u64),
            prompt_token_ids: prompts[i].clone(),
            params: params.clone(),
            priority: Default::default(),
            deadline: None,
            constraint: None,
            mm_inputs: Vec::new(),
        };
        sched.add_request(req, Instant::now()).unwrap();
    };
    let mut next = 0;
    while next < prompts.len() || sched.has_work() {
        if !sched.has_work() || (together && next < prompts.len()) {
            add(&mut sched, next);
            next += 1;
            continue;
        }
        let step = sched.schedule(Instant::now());
        run.widest_step = run.widest_step.max(step.seqs.len());
        let out = exec.execute(&step).unwrap();
        for o in sched.update_from_output(&step, &out) {
            assert!(o.error.is_none(), "{:?}", o.error);
            run.tokens[o.id.0 as usize].extend(o.new_token_ids);
            run.cached_tokens += o.num_cached_tokens.unwrap_or(0);
            if o.finish_reason.is_some() {
                exec.remove_request(o.id);
            }
        }
    }
    run
}

/// Sequences batched by the scheduler give the tokens they give one at a time; prompts that share a prefix
/// give the same tokens with the prefix served from the cache.
#[test]
#[ignore = "needs an NVIDIA GPU: scripts/cuda-tests.sh"]
fn batched_and_prefix_cached_equal_alone() {
    let bundle = Arc::new(ModelBundle::load(smollm2_path(), &LoadOptions::default()).unwrap());
    let blocks = 512;
    let mut exec = gpu_executor(&bundle, blocks);
    let shared = "You are a careful assistant. Answer in one short sentence, and never use lists. ".repeat(3);
    let texts = [
        "What is the tallest mountain?",
        "Name a prime number.",
        "Why is the sky blue?",
        "What is Rust?",
        "Say hello.",
    ];
    let prompts: Vec<Vec<u32>> = texts.iter().map(|t| bundle.encode(&format!("{shared}{t}"), true).unwrap()).collect();
    let alone = run_engine(&mut exec, blocks, &prompts, false, false);
    let batched = run_engine(&mut exec, blocks, &prompts, true, false);
    let cached = run_engine(&mut exec, blocks, &prompts, false, true);
    // Each run did what it is named after.
    assert_eq!(alone.widest_step, 1);
    assert!(batched.widest_step > 1, "the scheduler never batched the requests");
    assert!(cached.cached_tokens >= 4 * BS, "only {} prompt tokens came from the cache", cached.cached_tokens);
    for i in 0..prompts.len() {
        assert_eq!(alone.tokens[i].len(), 24);
        assert_eq!(batched.tokens[i], alone.tokens[i], "prompt {i}: batched");
        assert_eq!(cached.tokens[i], alone.tokens[i], "prompt {i}: prefix cached");
    }
}
