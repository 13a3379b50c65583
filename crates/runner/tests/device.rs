//! The executor's device path (#21) on the CPU: a `DeviceModel` that runs the CPU model stands in for a GPU,
//! so that what the executor does around a device (rows returned as their argmax alone for requests sampled
//! greedily without processors, logits for the others) is checked without one. The tokens must be exactly the
//! CPU executor's, and the argmax-only path must be taken exactly where it may be.

mod common;
use common::*;
use mlx_serving_engine::{EngineCore, SamplingParams};
use mlx_serving_models::{BatchInput, DeviceModel, ModelBundle, PagedKvCache, StepLogits};
use mlx_serving_runner::ModelExecutor;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// The CPU model behind the device interface, counting the rows it was asked to reduce to their argmax.
struct CpuAsDevice {
    bundle: Arc<ModelBundle>,
    cache: PagedKvCache,
    argmax_rows: Arc<AtomicUsize>,
    logits_rows: Arc<AtomicUsize>,
}

impl DeviceModel for CpuAsDevice {
    fn forward(&mut self, batch: &BatchInput<'_>, progress: &dyn Fn() -> bool) -> mlx_serving_models::Result<Vec<f32>> {
        self.bundle.model.forward_with_progress(batch, &mut self.cache, progress)
    }

    fn forward_select(
        &mut self,
        batch: &BatchInput<'_>,
        argmax_only: &[bool],
        progress: &dyn Fn() -> bool,
    ) -> mlx_serving_models::Result<StepLogits> {
        let only = argmax_only.iter().filter(|&&a| a).count();
        self.argmax_rows.fetch_add(only, Ordering::SeqCst);
        self.logits_rows.fetch_add(argmax_only.len() - only, Ordering::SeqCst);
        Ok(StepLogits::select(self.forward(batch, progress)?, argmax_only))
    }

    fn describe(&self) -> String {
        "the CPU, as a device".into()
    }
}

/// Runs `reqs` on an engine whose executor steps through `CpuAsDevice`; returns the tokens and the numbers of
/// rows returned as argmax alone and as logits.
fn run_on_device(reqs: Vec<(Vec<u32>, SamplingParams)>) -> (Vec<Vec<u32>>, usize, usize) {
    let b = bundle();
    let cfg = ModelExecutor::scheduler_config(&b, 16, 64 << 20);
    let (argmax_rows, logits_rows) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let device = CpuAsDevice {
        bundle: b.clone(),
        cache: PagedKvCache::new(b.model.config(), cfg.block_size, cfg.num_blocks),
        argmax_rows: argmax_rows.clone(),
        logits_rows: logits_rows.clone(),
    };
    let exec = ModelExecutor::on_device(b, cfg.block_size, Box::new(device));
    let h = EngineCore::spawn(cfg, exec).0;
    let tokens = run_all(&h, reqs).into_iter().map(|(t, _, _)| t).collect();
    (tokens, argmax_rows.load(Ordering::SeqCst), logits_rows.load(Ordering::SeqCst))
}

#[test]
fn argmax_only_rows_give_the_cpu_executors_tokens() {
    let ps: Vec<Vec<u32>> = prompts().into_iter().step_by(4).take(6).collect();
    let greedy = SamplingParams { ignore_eos: true, ..SamplingParams::greedy(10) };
    let params = [
        greedy.clone(),                                                       // argmax alone
        SamplingParams { logprobs: Some(2), ..greedy.clone() },               // logits: logprobs
        SamplingParams { temperature: 0.8, seed: Some(7), ..greedy.clone() }, // logits: sampled
        SamplingParams { repetition_penalty: 1.3, ..greedy.clone() },         // logits: a penalty
        SamplingParams { min_tokens: 4, ..greedy.clone() },                   // logits, then argmax alone
        greedy.clone(),
    ];
    let reqs: Vec<(Vec<u32>, SamplingParams)> = ps.iter().cloned().zip(params.iter().cloned()).collect();
    let (on_device, argmax_rows, logits_rows) = run_on_device(reqs.clone());
    let on_cpu = run_all(&engine(|_| {}), reqs);
    for (i, (d, c)) in on_device.iter().zip(&on_cpu).enumerate() {
        assert_eq!(d, &c.0, "request {i} ({:?}): the device path changed the tokens", params[i]);
        assert_eq!(d.len(), 10);
    }
    // Two plain greedy requests (10 tokens each, every one sampled from an argmax row) and the min_tokens one
    // from its fifth token on (after 4 tokens are out): 26 rows. The others' 30 rows and min_tokens' first 4
    // came back as logits.
    assert_eq!(argmax_rows, 2 * 10 + 6, "rows returned as their argmax alone");
    assert_eq!(logits_rows, 3 * 10 + 4, "rows returned as logits");
}
