//! Helpers shared by the scheduler tests: a configuration, requests, and a fake model whose next token is
//! a function of the request and the position.
#![allow(dead_code)]

use mlx_serving_engine::*;
use std::sync::Arc;
use std::time::Instant;

/// The fake model's token at position `pos` of request `id`'s output stream: never EOS (0).
pub fn next_token(id: RequestId, pos: usize) -> u32 {
    1 + (id.0 as u32 * 7 + pos as u32) % 50
}

pub fn cfg(f: impl FnOnce(&mut SchedulerConfig)) -> SchedulerConfig {
    let mut c = SchedulerConfig {
        block_size: 4,
        num_blocks: 64,
        max_num_batched_tokens: 64,
        max_num_seqs: 8,
        eos_token_ids: vec![0],
        ..SchedulerConfig::default()
    };
    f(&mut c);
    c
}

pub fn req(id: u64, prompt: Vec<u32>, max_tokens: u32, priority: Priority) -> EngineRequest {
    EngineRequest {
        id: RequestId(id),
        prompt_token_ids: prompt,
        params: Arc::new(SamplingParams { max_tokens, ..SamplingParams::greedy(max_tokens) }),
        priority,
        deadline: None,
        constraint: None,
        mm_inputs: Vec::new(),
    }
}

pub fn prompt(n: usize, salt: u32) -> Vec<u32> {
    (0..n as u32).map(|i| 1 + i * 3 + salt * 1000).collect()
}

/// The fake model: the next token is a function of the request and its position, never EOS (0).
pub fn fake_run(out: &SchedulerOutput) -> RunnerOutput {
    fake_step(out, None)
}

/// A fake speculative proposer: `k` draft tokens per step, the model's own tokens except at positions that
/// are multiples of `wrong_every`, where the draft is off by one.
#[derive(Clone, Copy, Debug)]
pub struct FakeSpec {
    pub k: usize,
    pub wrong_every: usize,
}

/// The fake model's step, verifying draft tokens as the runner does (sample at each position, keep going while
/// the sample equals the draft), and with `spec` proposing drafts for the next step.
pub fn fake_step(out: &SchedulerOutput, spec: Option<FakeSpec>) -> RunnerOutput {
    let mut r = RunnerOutput::default();
    for s in out.seqs.iter().filter(|s| s.sample) {
        let n = s.num_draft_tokens;
        let first = s.start_pos + s.token_ids.len() - n;
        let drafts = &s.token_ids[s.token_ids.len() - n..];
        // The model's token at each position, kept while it equals the draft there; the first that differs
        // (or the one after the last draft) ends the step.
        let mut emitted = Vec::new();
        for (i, d) in drafts.iter().map(Some).chain([None]).enumerate() {
            let t = next_token(s.id, first + i);
            emitted.push(t);
            if d != Some(&t) {
                break;
            }
        }
        r.num_accepted.insert(s.id, emitted.len() - 1);
        if let Some(FakeSpec { k, wrong_every }) = spec {
            let from = first + emitted.len();
            let d = (from..from + k).map(|p| next_token(s.id, p) + u32::from(p % wrong_every == 0)).collect();
            r.drafts.insert(s.id, d);
        }
        r.sampled.insert(s.id, emitted);
    }
    r
}

/// Runs steps until idle; returns every output.
pub fn drain(s: &mut Scheduler, now: Instant) -> Vec<EngineOutput> {
    let mut all = Vec::new();
    for _ in 0..10_000 {
        if !s.has_work() {
            return all;
        }
        let out = s.schedule(now);
        all.extend(out.finished.clone());
        let run = fake_run(&out);
        all.extend(s.update_from_output(&out, &run));
    }
    panic!("scheduler did not finish");
}

pub fn tokens_of(outputs: &[EngineOutput], id: u64) -> Vec<u32> {
    outputs.iter().filter(|o| o.id.0 == id).flat_map(|o| o.new_token_ids.clone()).collect()
}
