//! The engine's own time per step when the model costs nothing: a device that returns fixed logits at once
//! stands in for a fast GPU, so what is measured is scheduling, the executor and sampling, at 64 concurrent
//! streams of SmolLM2's vocabulary (49,152): greedy rows (returned as their argmax, as a GPU does) against
//! sampled rows (temperature 0.8, top-p 0.9: the logits go through the CPU sampler).
//!
//! `cargo bench -p mlx-serving-runner --bench engine_sampling` (needs the default model, as the tests do)

use criterion::{criterion_group, criterion_main, Criterion};
use mlx_serving_engine::{EngineCore, EngineRequest, Priority, RequestId, SamplingParams};
use mlx_serving_models::{BatchInput, DeviceModel, LoadOptions, ModelBundle, StepLogits};
use mlx_serving_runner::ModelExecutor;
use mlx_serving_test_support::rng::lm_logits;
use mlx_serving_test_support::smollm2_path;
use std::sync::Arc;

const STREAMS: usize = 64;
const TOKENS: u32 = 16;

/// Logits that cost nothing: one fixed row (a long tail and a few likely tokens) for every request.
struct FixedLogits {
    row: Vec<f32>,
}

impl DeviceModel for FixedLogits {
    fn forward(&mut self, b: &BatchInput<'_>, _: &dyn Fn() -> bool) -> mlx_serving_models::Result<Vec<f32>> {
        Ok(self.row.repeat(b.logits_indices.len()))
    }

    fn forward_select(
        &mut self,
        _batch: &BatchInput<'_>,
        argmax_only: &[bool],
        _progress: &dyn Fn() -> bool,
    ) -> mlx_serving_models::Result<StepLogits> {
        let full = argmax_only.iter().filter(|&&a| !a).count();
        let best = mlx_serving_models::argmax(&self.row);
        Ok(StepLogits {
            logits: self.row.repeat(full),
            tokens: argmax_only.iter().map(|&a| a.then_some(best)).collect(),
        })
    }

    fn describe(&self) -> String {
        "fixed logits".into()
    }
}

fn run(bundle: &Arc<ModelBundle>, params: &SamplingParams) {
    let mut cfg = ModelExecutor::scheduler_config(bundle, 16, 256 << 20);
    cfg.max_num_seqs = STREAMS;
    let device = FixedLogits { row: lm_logits(bundle.model.config().vocab_size) };
    let exec = ModelExecutor::on_device(bundle.clone(), cfg.block_size, Box::new(device));
    let h = EngineCore::spawn(cfg, exec).0;
    let prompt: Vec<u32> = (1..40).collect();
    let mut rxs = Vec::new();
    for i in 0..STREAMS {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let req = EngineRequest {
            id: RequestId(i as u64),
            prompt_token_ids: prompt.clone(),
            params: Arc::new(SamplingParams { seed: Some(i as u64), ..params.clone() }),
            priority: Priority::Normal,
            deadline: None,
            constraint: None,
            mm_inputs: Vec::new(),
        };
        h.add_request(req, tx).unwrap();
        rxs.push(rx);
    }
    for mut rx in rxs {
        while let Some(o) = rx.blocking_recv() {
            if o.finish_reason.is_some() {
                break;
            }
        }
    }
}

fn bench(c: &mut Criterion) {
    let bundle = Arc::new(ModelBundle::load(smollm2_path(), &LoadOptions::default()).unwrap());
    let greedy = SamplingParams { ignore_eos: true, ..SamplingParams::greedy(TOKENS) };
    let sampled = SamplingParams { temperature: 0.8, top_p: 0.9, ..greedy.clone() };
    let mut g = c.benchmark_group(format!("engine_{STREAMS}_streams_{TOKENS}_tokens"));
    g.sample_size(10);
    g.bench_function("greedy", |b| b.iter(|| run(&bundle, &greedy)));
    g.bench_function("sampled", |b| b.iter(|| run(&bundle, &sampled)));
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
