//! Differential tests of the engine on the real default model: batching, prefix caching and preemption
//! never change greedy tokens, and a seed gives the same tokens whatever else shares the batch.

mod common;
use common::*;
use mlx_serving_engine::{
    EngineHandle, EngineOutput, EngineRequest, FinishReason, Priority, RequestId, SamplingParams,
};
use std::collections::HashMap;
use std::sync::Arc;

#[test]
fn eight_concurrent_requests_match_each_alone() {
    let h = engine(|_| {});
    let ps: Vec<Vec<u32>> = prompts().into_iter().step_by(3).take(8).collect();
    let params = SamplingParams::greedy(24);
    let together = run_all(&h, ps.iter().map(|p| (p.clone(), params.clone())).collect());
    for (i, p) in ps.iter().enumerate() {
        assert_eq!(together[i].0, alone(p, &params), "prompt {i}: batched tokens differ from running alone");
    }
}

#[test]
fn prefix_cache_on_and_off_give_identical_tokens() {
    let shared: Vec<u32> = prompts().concat().into_iter().take(70).collect();
    let mk = |tail: u32| -> Vec<u32> { shared.iter().copied().chain([tail, tail + 1]).collect() };
    let params = SamplingParams::greedy(12);
    let reqs = || vec![(mk(260), params.clone()), (mk(504), params.clone()), (mk(1890), params.clone())];
    let on = engine(|_| {});
    let first = run_all(&on, vec![reqs()[0].clone()]);
    let cached = run_all(&on, reqs());
    let off = engine(|c| c.enable_prefix_caching = false);
    let uncached = run_all(&off, reqs());
    assert_eq!(first[0].0, uncached[0].0);
    for i in 0..3 {
        assert_eq!(cached[i].0, uncached[i].0, "request {i}: prefix cache changed the tokens");
        assert_eq!(uncached[i].2, 0);
    }
    assert_eq!(cached[0].2, 64, "the shared 70-token prefix hits four full blocks of 16");
}

#[test]
fn forced_preemption_gives_identical_tokens() {
    let ps: Vec<Vec<u32>> = prompts().into_iter().skip(12).take(4).collect();
    let params = SamplingParams { ignore_eos: true, ..SamplingParams::greedy(40) };
    // Each request needs about 5 blocks of 16 by the end; 10 blocks cannot hold four of them.
    let tight = engine(|c| {
        c.num_blocks = 10;
        c.enable_prefix_caching = false;
    });
    let got = run_all(&tight, ps.iter().map(|p| (p.clone(), params.clone())).collect());
    for (i, p) in ps.iter().enumerate() {
        assert_eq!(got[i].0, alone(p, &params), "prompt {i}");
        assert_eq!(got[i].1, FinishReason::Length);
    }
    assert!(tight.stats().preemptions.load(std::sync::atomic::Ordering::SeqCst) > 0, "the test must actually preempt");
}

#[test]
fn seeded_sampling_is_independent_of_the_batch() {
    let ps = prompts();
    let seeded = SamplingParams {
        temperature: 0.9,
        top_p: 0.95,
        seed: Some(1234),
        ignore_eos: true,
        max_tokens: 20,
        ..SamplingParams::default()
    };
    let solo = engine(|_| {});
    let a = run_all(&solo, vec![(ps[0].clone(), seeded.clone())]);
    let busy = engine(|_| {});
    let others = SamplingParams {
        temperature: 1.0,
        seed: Some(7),
        ignore_eos: true,
        max_tokens: 20,
        ..SamplingParams::default()
    };
    let b =
        run_all(&busy, vec![(ps[5].clone(), others.clone()), (ps[0].clone(), seeded.clone()), (ps[9].clone(), others)]);
    assert_eq!(a[0].0, b[1].0, "same seed, different batch companions, same tokens");
    let mut counts: HashMap<u32, usize> = HashMap::new();
    for t in &a[0].0 {
        *counts.entry(*t).or_default() += 1;
    }
    assert!(counts.len() > 3, "sampling should produce varied tokens");
}

/// A step with many sampled rows (8 here: 8 × 49,152 logits, past the executor's threshold) spreads its
/// sampling over threads where the machine has more than one core: every request still gets exactly the tokens
/// it gets alone.
#[test]
fn sampling_spread_over_threads_gives_each_request_its_own_tokens() {
    let ps = prompts();
    let mk = |i: usize| SamplingParams {
        temperature: 0.7 + 0.05 * i as f32,
        top_p: 0.9,
        top_k: if i.is_multiple_of(2) { 0 } else { 40 },
        seed: Some(100 + i as u64),
        ignore_eos: true,
        max_tokens: 12,
        logprobs: (i == 3).then_some(2),
        ..SamplingParams::default()
    };
    let reqs: Vec<(Vec<u32>, SamplingParams)> = (0..8).map(|i| (ps[i].clone(), mk(i))).collect();
    let spread_before = mlx_serving_runner::parallel_sampling_steps();
    let together = run_all(&engine(|_| {}), reqs.clone());
    if std::thread::available_parallelism().map_or(1, |n| n.get()) > 1 {
        assert!(
            mlx_serving_runner::parallel_sampling_steps() > spread_before,
            "the steps of 8 sampled rows ran on one thread"
        );
    }
    for (i, r) in reqs.into_iter().enumerate() {
        let alone = run_all(&engine(|_| {}), vec![r]);
        assert_eq!(together[i].0, alone[0].0, "request {i}: sampled among 8 differs from alone");
    }
}

/// An engine doing a 1,500-token prompt in one step, with that step just started: (engine, the request's
/// output receiver, the heartbeat count when the step began).
fn one_long_step(id: u64, salt: u32) -> (EngineHandle, tokio::sync::mpsc::UnboundedReceiver<EngineOutput>, u64) {
    use std::sync::atomic::Ordering;
    let h = engine(|c| c.max_num_batched_tokens = 4096);
    let prompt: Vec<u32> = (0..1500).map(|i| 100 + (i * salt) % 5000).collect();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let request = EngineRequest {
        id: RequestId(id),
        prompt_token_ids: prompt,
        params: Arc::new(SamplingParams::greedy(1)),
        priority: Priority::Normal,
        deadline: None,
        constraint: None,
        mm_inputs: Vec::new(),
    };
    h.add_request(request, tx).unwrap();
    // The loop publishes `running` just before it executes the step.
    while h.stats().running.load(Ordering::SeqCst) == 0 {
        std::hint::spin_loop();
    }
    let at_start = h.stats().beats.load(Ordering::SeqCst);
    (h, rx, at_start)
}

/// Regression (#27, item 1): the heartbeat was written only between steps, so one long prefill step made
/// `/health` answer 503 for its whole length. The model beats after every layer's attention and MLP: while
/// a single long step runs (no step finished yet), heartbeats keep arriving.
#[test]
fn the_heartbeat_advances_inside_a_long_step() {
    use std::sync::atomic::Ordering;
    let (h, mut rx, at_start) = one_long_step(1, 7);
    let st = h.stats();
    let mut inside = at_start;
    loop {
        let beats = st.beats.load(Ordering::SeqCst);
        // Read after the beats: while no step has finished, those beats came from inside the one step.
        if st.steps.load(Ordering::SeqCst) > 0 {
            break;
        }
        inside = beats;
        std::thread::yield_now();
    }
    let o = rx.blocking_recv().unwrap();
    assert_eq!(o.finish_reason, Some(FinishReason::Length), "one step did the whole prompt");
    assert!(inside > at_start, "no heartbeat from inside the {}-layer step", bundle().model.config().num_layers);
}

/// Regression (#27, item 3): a long prefill whose client left ran to its end (a single step of a big
/// `max_num_batched_tokens` can take minutes on a CPU). When every request of the running step is aborted,
/// the model stops at its next layer and the request ends as aborted.
#[test]
fn a_step_whose_requests_were_all_aborted_stops_early() {
    use std::sync::atomic::Ordering;
    let (h, mut rx, at_start) = one_long_step(7, 11);
    let st = h.stats();
    h.abort(RequestId(7));
    let o = rx.blocking_recv().unwrap();
    assert_eq!(o.finish_reason, Some(FinishReason::Abort), "{o:?}");
    assert!(o.new_token_ids.is_empty());
    let layers = bundle().model.config().num_layers as u64;
    let beats = st.beats.load(Ordering::SeqCst) - at_start;
    assert!(beats < layers, "the step ran on for {beats} beats ({layers} layers, two beats each)");
    assert_eq!(st.failed_steps.load(Ordering::SeqCst), 0, "a cancelled step is not a failure");
    // The engine serves on.
    let out = run_all(&h, vec![((1..20).collect(), SamplingParams::greedy(3))]);
    assert_eq!(out[0].0.len(), 3);
}
