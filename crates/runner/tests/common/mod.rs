//! Helpers shared by the engine tests on the real default model.
#![allow(dead_code)]

use mlx_serving_engine::{
    EngineCore, EngineHandle, EngineOutput, EngineRequest, FinishReason, Priority, RequestId, SamplingParams,
    SchedulerConfig,
};
use mlx_serving_models::{LoadOptions, ModelBundle};
use mlx_serving_runner::{generate, GenerateOptions, ModelExecutor, Speculator};
use mlx_serving_test_support::{reference, smollm2_path};
use std::sync::{Arc, OnceLock};

pub fn bundle() -> Arc<ModelBundle> {
    static B: OnceLock<Arc<ModelBundle>> = OnceLock::new();
    B.get_or_init(|| Arc::new(ModelBundle::load(smollm2_path(), &LoadOptions::default()).unwrap())).clone()
}

pub fn engine(f: impl FnOnce(&mut SchedulerConfig)) -> EngineHandle {
    engine_with(f, None)
}

/// An engine on the default model, speculating with `speculator` when given one.
pub fn engine_with(f: impl FnOnce(&mut SchedulerConfig), speculator: Option<Speculator>) -> EngineHandle {
    let b = bundle();
    let mut cfg = ModelExecutor::scheduler_config(&b, 16, 64 << 20);
    f(&mut cfg);
    let mut exec = ModelExecutor::new(b, cfg.block_size, cfg.num_blocks);
    if let Some(s) = speculator {
        exec = exec.with_speculation(s);
    }
    EngineCore::spawn(cfg, exec).0
}

/// Submits all requests at once and collects each one's tokens and finish reason.
pub fn run_all(h: &EngineHandle, reqs: Vec<(Vec<u32>, SamplingParams)>) -> Vec<(Vec<u32>, FinishReason, usize)> {
    let mut rxs = Vec::new();
    for (i, (prompt, params)) in reqs.into_iter().enumerate() {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let id = RequestId(1000 + i as u64 + rand_offset());
        h.add_request(
            EngineRequest {
                id,
                prompt_token_ids: prompt,
                params: Arc::new(params),
                priority: Priority::Normal,
                deadline: None,
                constraint: None,
                mm_inputs: Vec::new(),
            },
            tx,
        )
        .unwrap();
        rxs.push(rx);
    }
    rxs.into_iter()
        .map(|mut rx| {
            let mut toks = Vec::new();
            let mut cached = 0;
            loop {
                let o: EngineOutput = rx.blocking_recv().expect("engine output");
                toks.extend(o.new_token_ids);
                if let Some(c) = o.num_cached_tokens {
                    cached = c;
                }
                if let Some(f) = o.finish_reason {
                    assert!(o.error.is_none(), "request failed: {:?}", o.error);
                    return (toks, f, cached);
                }
            }
        })
        .collect()
}

pub fn rand_offset() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(100, Ordering::Relaxed)
}

pub fn prompts() -> Vec<Vec<u32>> {
    let refs = reference("greedy-SmolLM2-135M-Instruct-transformers-f32.json");
    refs["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["prompt_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect())
        .collect()
}

pub fn alone(prompt: &[u32], params: &SamplingParams) -> Vec<u32> {
    let b = bundle();
    let opts = GenerateOptions { eog_token_ids: b.special_tokens.eog.clone(), ..GenerateOptions::default() };
    generate(&b.model, &b.tokenizer, prompt, params, &opts, |_| {}).unwrap().token_ids
}
