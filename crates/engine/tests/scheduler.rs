//! Scheduler behaviour with a fake executor: budgets, chunked prefill, priorities and aging, preemption,
//! abort, prefix hits and eviction, deadlines, admission bounds.

mod common;
use common::*;
use mlx_serving_engine::*;
use std::time::{Duration, Instant};

#[test]
fn token_budget_limits_each_step_and_prefill_is_chunked() {
    let now = Instant::now();
    let mut s = Scheduler::new(cfg(|c| c.max_num_batched_tokens = 10));
    s.add_request(req(1, prompt(25, 1), 3, Priority::Normal), now).unwrap();
    let steps: Vec<(usize, bool)> = (0..3)
        .map(|_| {
            let o = s.schedule(now);
            let r = fake_run(&o);
            s.update_from_output(&o, &r);
            (o.num_batched_tokens, o.seqs[0].sample)
        })
        .collect();
    assert_eq!(
        steps,
        vec![(10, false), (10, false), (5, true)],
        "25-token prompt in chunks of 10; sample only at the end"
    );
    let o = s.schedule(now);
    assert_eq!((o.num_batched_tokens, o.seqs[0].start_pos), (1, 25), "then one decode token");
}

#[test]
fn running_requests_are_scheduled_before_waiting_ones() {
    let now = Instant::now();
    let mut s = Scheduler::new(cfg(|c| c.max_num_batched_tokens = 8));
    s.add_request(req(1, prompt(8, 1), 5, Priority::Normal), now).unwrap();
    let o = s.schedule(now);
    s.update_from_output(&o, &fake_run(&o));
    s.add_request(req(2, prompt(20, 2), 5, Priority::Critical), now).unwrap();
    let o = s.schedule(now);
    assert_eq!(o.seqs[0].id, RequestId(1), "the running decode goes first");
    assert_eq!(o.seqs[0].token_ids.len(), 1);
    assert_eq!((o.seqs[1].id, o.seqs[1].token_ids.len()), (RequestId(2), 7), "the rest of the budget prefills");
}

#[test]
fn priority_order_then_arrival() {
    let now = Instant::now();
    let mut s = Scheduler::new(cfg(|c| c.max_num_seqs = 1));
    s.add_request(req(1, prompt(4, 1), 1, Priority::Low), now).unwrap();
    s.add_request(req(2, prompt(4, 2), 1, Priority::Normal), now).unwrap();
    s.add_request(req(3, prompt(4, 3), 1, Priority::Critical), now).unwrap();
    s.add_request(req(4, prompt(4, 4), 1, Priority::Critical), now).unwrap();
    let mut order = Vec::new();
    while s.has_work() {
        let o = s.schedule(now);
        order.extend(o.seqs.iter().map(|q| q.id.0));
        let r = fake_run(&o);
        s.update_from_output(&o, &r);
    }
    assert_eq!(order, vec![3, 4, 2, 1]);
}

#[test]
fn aging_lifts_low_priority_so_it_is_never_starved() {
    let t0 = Instant::now();
    let mut s = Scheduler::new(cfg(|c| {
        c.max_num_seqs = 1;
        c.aging_interval = Duration::from_secs(1);
    }));
    s.add_request(req(1, prompt(4, 1), 1, Priority::Low), t0).unwrap();
    // A normal request arrives 3 s later; by then the low one has aged three classes (to critical).
    let t3 = t0 + Duration::from_secs(3);
    s.add_request(req(2, prompt(4, 2), 1, Priority::Normal), t3).unwrap();
    let o = s.schedule(t3);
    assert_eq!(o.seqs[0].id, RequestId(1));
    // Without aging the newer normal request would win.
    let mut s = Scheduler::new(cfg(|c| {
        c.max_num_seqs = 1;
        c.aging_interval = Duration::ZERO;
    }));
    s.add_request(req(1, prompt(4, 1), 1, Priority::Low), t0).unwrap();
    s.add_request(req(2, prompt(4, 2), 1, Priority::Normal), t3).unwrap();
    assert_eq!(s.schedule(t3).seqs[0].id, RequestId(2));
}

#[test]
fn preemption_picks_lowest_priority_newest_and_resume_gives_the_same_tokens() {
    let now = Instant::now();
    // Alone, each request's tokens:
    let alone = |id: u64, pr: Priority| {
        let mut s = Scheduler::new(cfg(|_| {}));
        s.add_request(req(id, prompt(6, id as u32), 20, pr), now).unwrap();
        tokens_of(&drain(&mut s, now), id)
    };
    let (a1, a2, a3) = (alone(1, Priority::High), alone(2, Priority::Low), alone(3, Priority::Normal));
    // 12 blocks of 4 = 48 slots; three requests growing to 26 tokens each need 21 blocks: preemption.
    let mut s = Scheduler::new(cfg(|c| c.num_blocks = 12));
    s.add_request(req(1, prompt(6, 1), 20, Priority::High), now).unwrap();
    s.add_request(req(2, prompt(6, 2), 20, Priority::Low), now).unwrap();
    s.add_request(req(3, prompt(6, 3), 20, Priority::Normal), now).unwrap();
    let mut preempted = Vec::new();
    let mut all = Vec::new();
    while s.has_work() {
        let o = s.schedule(now);
        preempted.extend(o.preempted.iter().map(|p| p.0));
        assert!(s.kv().num_free_blocks() <= 12);
        let r = fake_run(&o);
        all.extend(s.update_from_output(&o, &r));
        s.kv().check_invariants();
    }
    assert_eq!(preempted.first(), Some(&2), "the low-priority request goes first: {preempted:?}");
    assert!(!preempted.contains(&1), "the high-priority request is never the victim");
    assert_eq!(tokens_of(&all, 1), a1);
    assert_eq!(tokens_of(&all, 2), a2, "a preempted request resumes with the same tokens");
    assert_eq!(tokens_of(&all, 3), a3);
    assert_eq!(s.kv().num_free_blocks(), 12, "no leaked blocks");
}

#[test]
fn abort_frees_blocks_at_once_wherever_the_request_is() {
    let now = Instant::now();
    let mut s = Scheduler::new(cfg(|c| c.max_num_seqs = 1));
    s.add_request(req(1, prompt(10, 1), 10, Priority::Normal), now).unwrap();
    s.add_request(req(2, prompt(10, 2), 10, Priority::Normal), now).unwrap();
    let o = s.schedule(now);
    s.update_from_output(&o, &fake_run(&o));
    assert!(s.kv().num_free_blocks() < 64);
    let out = s.abort(RequestId(1)).unwrap();
    assert_eq!(out.finish_reason, Some(FinishReason::Abort));
    assert_eq!(s.kv().num_free_blocks(), 64);
    assert_eq!(s.abort(RequestId(2)).unwrap().finish_reason, Some(FinishReason::Abort), "a waiting request too");
    assert!(!s.has_work());
    assert!(s.abort(RequestId(2)).is_none(), "aborting twice is a no-op");
}

#[test]
fn prefix_hit_reports_cached_tokens_and_skips_them() {
    let now = Instant::now();
    let mut s = Scheduler::new(cfg(|_| {}));
    s.add_request(req(1, prompt(11, 1), 2, Priority::Normal), now).unwrap();
    let first = drain(&mut s, now);
    assert_eq!(first[0].num_cached_tokens, Some(0));
    s.add_request(req(2, prompt(11, 1), 2, Priority::Normal), now).unwrap();
    let o = s.schedule(now);
    assert_eq!(o.seqs[0].start_pos, 8, "two full blocks of 4 hit; the last prompt token is recomputed");
    let outs = s.update_from_output(&o, &fake_run(&o));
    assert_eq!(outs[0].num_cached_tokens, Some(8));
}

#[test]
fn prefix_miss_after_eviction() {
    let now = Instant::now();
    let mut s = Scheduler::new(cfg(|c| c.num_blocks = 4));
    s.add_request(req(1, prompt(9, 1), 1, Priority::Normal), now).unwrap();
    drain(&mut s, now);
    // A different request takes every block, evicting the cached prefix.
    s.add_request(req(2, prompt(15, 2), 1, Priority::Normal), now).unwrap();
    drain(&mut s, now);
    s.add_request(req(3, prompt(9, 1), 1, Priority::Normal), now).unwrap();
    assert_eq!(s.schedule(now).seqs[0].start_pos, 0);
}

#[test]
fn deadline_finishes_with_timeout() {
    let t0 = Instant::now();
    let mut s = Scheduler::new(cfg(|_| {}));
    let mut r = req(1, prompt(4, 1), 100, Priority::Normal);
    r.deadline = Some(t0 + Duration::from_secs(1));
    s.add_request(r, t0).unwrap();
    let o = s.schedule(t0);
    s.update_from_output(&o, &fake_run(&o));
    let o = s.schedule(t0 + Duration::from_secs(2));
    assert_eq!(o.finished.len(), 1);
    assert_eq!(o.finished[0].finish_reason, Some(FinishReason::Timeout));
    assert!(o.seqs.is_empty() && !s.has_work());
    assert_eq!(s.kv().num_free_blocks(), 64);
}

#[test]
fn admission_is_bounded() {
    let now = Instant::now();
    let mut s = Scheduler::new(cfg(|c| {
        c.max_waiting_requests = 2;
        c.max_waiting_tokens = 30;
        c.max_model_len = 64;
    }));
    s.add_request(req(1, prompt(10, 1), 1, Priority::Normal), now).unwrap();
    s.add_request(req(2, prompt(10, 2), 1, Priority::Normal), now).unwrap();
    assert!(matches!(s.add_request(req(3, prompt(1, 3), 1, Priority::Normal), now), Err(AddError::Overloaded(_))));
    let mut s2 = Scheduler::new(cfg(|c| c.max_waiting_tokens = 30));
    s2.add_request(req(1, prompt(20, 1), 1, Priority::Normal), now).unwrap();
    assert!(matches!(s2.add_request(req(2, prompt(20, 2), 1, Priority::Normal), now), Err(AddError::Overloaded(_))));
    assert!(matches!(
        s.add_request(req(4, prompt(60, 4), 10, Priority::Normal), now),
        Err(AddError::ContextLengthExceeded { .. })
    ));
    assert!(matches!(s.add_request(req(1, prompt(4, 1), 1, Priority::Normal), now), Err(AddError::DuplicateId(_))));
    assert!(matches!(s.add_request(req(5, vec![], 1, Priority::Normal), now), Err(AddError::EmptyPrompt)));
    // Admitting a request frees its waiting slot.
    let o = s.schedule(now);
    s.update_from_output(&o, &fake_run(&o));
    s.add_request(req(6, prompt(4, 6), 1, Priority::Normal), now).unwrap();
}

#[test]
fn eos_and_max_tokens_finish_requests() {
    let now = Instant::now();
    let mut s = Scheduler::new(cfg(|_| {}));
    s.add_request(req(1, prompt(4, 1), 3, Priority::Normal), now).unwrap();
    let outs = drain(&mut s, now);
    assert_eq!(tokens_of(&outs, 1).len(), 3);
    assert_eq!(outs.last().unwrap().finish_reason, Some(FinishReason::Length));
    // EOS (id 0) stops early.
    s.add_request(req(2, prompt(4, 2), 10, Priority::Normal), now).unwrap();
    let o = s.schedule(now);
    let mut run = RunnerOutput::default();
    run.sampled.insert(RequestId(2), vec![0]);
    let outs = s.update_from_output(&o, &run);
    assert_eq!(outs[0].finish_reason, Some(FinishReason::Stop));
    assert!(!s.has_work());
}

/// A small deterministic generator for the property tests (xorshift64*).
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % n
    }
}

/// Regression (#27, item 4): preemption inverted priorities. Running requests were visited in admission order
/// and the victim was chosen among the unvisited ones only, so a `critical` request could preempt itself, or a
/// high-class request lose its blocks while an earlier-admitted low-class one kept them. Over random mixes of
/// arrivals, priorities and lengths on a scarce cache: every preempted request is less urgent (class, then
/// newer) than every request still running after the step, and a request never preempts itself.
#[test]
fn preemption_never_takes_blocks_from_a_more_urgent_request() {
    let classes = [Priority::Critical, Priority::High, Priority::Normal, Priority::Low];
    let mut total_preemptions = 0;
    for seed in 1..=60u64 {
        let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        let mut s = Scheduler::new(cfg(|c| {
            c.num_blocks = 10 + rng.below(10) as usize;
            c.max_num_seqs = 6;
            c.max_num_batched_tokens = 16 + rng.below(48) as usize;
            c.max_model_len = 40;
            // Half the mixes age waiting and running requests (one class per 5 steps of a fake clock).
            c.aging_interval = if seed % 2 == 0 { Duration::ZERO } else { Duration::from_millis(5) };
        }));
        let start = Instant::now();
        let (mut next_id, mut steps) = (1u64, 0);
        while next_id <= 40 || s.has_work() {
            let now = start + Duration::from_millis(steps);
            for _ in 0..rng.below(3) {
                if next_id <= 40 {
                    let pr = classes[rng.below(4) as usize];
                    let len = 1 + rng.below(16) as usize;
                    let max_tokens = 1 + rng.below(20) as u32;
                    let _ = s.add_request(req(next_id, prompt(len, next_id as u32), max_tokens, pr), now);
                    next_id += 1;
                }
            }
            let out = s.schedule(now);
            let key = |id: &RequestId| {
                let r = s.request(*id).expect("request exists");
                (r.priority.rank(), r.seq)
            };
            for v in &out.preempted {
                assert!(!out.seqs.iter().any(|q| q.id == *v), "seed {seed}: {v:?} was scheduled and preempted");
                for r in s.running() {
                    assert!(
                        key(r) < key(v),
                        "seed {seed}: {v:?} {:?} was preempted while {r:?} {:?} keeps running",
                        key(v),
                        key(r)
                    );
                }
            }
            total_preemptions += out.preempted.len();
            let run = fake_run(&out);
            s.update_from_output(&out, &run);
            s.kv().check_invariants();
            steps += 1;
            assert!(steps < 5000, "seed {seed}: no progress");
        }
        assert_eq!(s.kv().num_free_blocks(), s.kv().num_blocks(), "seed {seed}: leaked blocks");
    }
    assert!(total_preemptions > 50, "the mixes must exercise preemption: {total_preemptions}");
}

/// Regression (#27, item 5): preempted requests re-entered the waiting queue and counted against its limit,
/// pushing it past the bound and refusing new requests. The limit counts new requests only, and a preempted
/// request keeps its place (it is admitted again before a newer one of its class).
#[test]
fn waiting_limit_counts_new_requests_and_preempted_ones_keep_their_place() {
    let now = Instant::now();
    let mut s = Scheduler::new(cfg(|c| {
        c.num_blocks = 6;
        c.max_waiting_requests = 1;
    }));
    s.add_request(req(1, prompt(8, 1), 12, Priority::High), now).unwrap();
    let o = s.schedule(now);
    s.update_from_output(&o, &fake_run(&o));
    s.add_request(req(2, prompt(8, 2), 12, Priority::Normal), now).unwrap();
    // Run until request 2 is preempted by the high one.
    let mut steps = 0;
    loop {
        let o = s.schedule(now);
        let hit = o.preempted.contains(&RequestId(2));
        s.update_from_output(&o, &fake_run(&o));
        if hit {
            break;
        }
        steps += 1;
        assert!(steps < 100, "request 2 was never preempted");
    }
    assert_eq!(s.num_waiting(), 1);
    assert_eq!(s.num_waiting_new(), 0, "a preempted request is not a new one");
    s.add_request(req(3, prompt(8, 3), 4, Priority::Normal), now).expect("the limit holds for new requests only");
    assert!(matches!(s.add_request(req(4, prompt(8, 4), 4, Priority::Normal), now), Err(AddError::Overloaded(_))));
    // Request 2 (older) is admitted before request 3.
    let mut first_scheduled = Vec::new();
    while s.has_work() {
        let o = s.schedule(now);
        for q in &o.seqs {
            if (q.id.0 == 2 || q.id.0 == 3) && !first_scheduled.contains(&q.id.0) {
                first_scheduled.push(q.id.0);
            }
        }
        s.update_from_output(&o, &fake_run(&o));
    }
    assert_eq!(first_scheduled.first(), Some(&2), "{first_scheduled:?}");
}

/// Regression (#27, item 12): prefix-cache metrics counted every scheduling attempt of a waiting request, so a
/// request that waited for blocks was counted once per step. Each request is counted once, at admission.
#[test]
fn prefix_cache_metrics_count_each_request_once() {
    let now = Instant::now();
    // 8 blocks of 4: the first request (20 prompt + 8 output tokens = 7 blocks) leaves too few for the second.
    let mut s = Scheduler::new(cfg(|c| c.num_blocks = 8));
    s.add_request(req(1, prompt(20, 1), 8, Priority::Normal), now).unwrap();
    let o = s.schedule(now);
    s.update_from_output(&o, &fake_run(&o));
    s.add_request(req(2, prompt(12, 2), 4, Priority::Normal), now).unwrap();
    let mut steps_waiting = 0;
    while s.has_work() {
        let o = s.schedule(now);
        if !o.seqs.iter().any(|q| q.id.0 == 2) {
            steps_waiting += 1;
        }
        s.update_from_output(&o, &fake_run(&o));
    }
    assert!(steps_waiting > 2, "request 2 must wait for blocks over several steps: {steps_waiting}");
    assert_eq!(s.kv().prefix_queries, 20 + 12, "one lookup per request, in prompt tokens");
    assert_eq!(s.kv().prefix_hits, 0);
}

/// The executor's verdicts on constrained sequences: one whose constraint completed finishes with `Stop`
/// and its token (even without EOS, far from max_tokens), one that failed finishes with `Error`, the reason and
/// no token; both free their blocks. An unaffected request goes on.
#[test]
fn completed_and_failed_constraints_end_their_requests() {
    let now = Instant::now();
    let mut s = Scheduler::new(cfg(|_| {}));
    for id in 1..=3 {
        s.add_request(req(id, prompt(4, id as u32), 50, Priority::Normal), now).unwrap();
    }
    let o = s.schedule(now);
    let mut run = fake_run(&o);
    run.completed.insert(RequestId(1));
    run.sampled.remove(&RequestId(2));
    run.failed.insert(RequestId(2), "output constraint: no token is allowed here".into());
    let outs = s.update_from_output(&o, &run);
    let by = |id: u64| outs.iter().find(|x| x.id == RequestId(id)).unwrap().clone();
    assert_eq!(by(1).finish_reason, Some(mlx_serving_engine::FinishReason::Stop));
    assert_eq!(by(1).new_token_ids.len(), 1);
    assert_eq!(by(2).finish_reason, Some(mlx_serving_engine::FinishReason::Error));
    assert_eq!(by(2).error.as_deref(), Some("output constraint: no token is allowed here"));
    assert!(by(2).new_token_ids.is_empty());
    assert_eq!(by(3).finish_reason, None);
    let o = s.schedule(now);
    assert_eq!(o.seqs.iter().map(|q| q.id).collect::<Vec<_>>(), vec![RequestId(3)]);
}

fn with_image(mut r: EngineRequest, span: std::ops::Range<usize>, hash: u64) -> EngineRequest {
    r.mm_inputs = vec![MmInput { span, hash, data: std::sync::Arc::new(()) }];
    r
}

#[test]
#[allow(clippy::single_range_in_vec_init)] // lists of spans, some of one span
fn image_spans_must_lie_in_the_prompt_in_order_and_apart() {
    let now = Instant::now();
    let mut s = Scheduler::new(cfg(|_| {}));
    let cases: [&[std::ops::Range<usize>]; 4] = [&[3..3], &[2..20], &[1..5, 4..8], &[5..8, 1..3]];
    for (i, spans) in cases.into_iter().enumerate() {
        let mut r = req(10 + i as u64, prompt(12, 1), 2, Priority::Normal);
        r.mm_inputs =
            spans.iter().map(|sp| MmInput { span: sp.clone(), hash: 1, data: std::sync::Arc::new(()) }).collect();
        assert!(matches!(s.add_request(r, now), Err(AddError::BadInputSpan(_))), "{spans:?}");
    }
    s.add_request(with_image(req(1, prompt(12, 1), 2, Priority::Normal), 2..9, 7), now).unwrap();
}

#[test]
fn the_prefix_cache_tells_images_apart_by_content() {
    let now = Instant::now();
    let mut s = Scheduler::new(cfg(|_| {}));
    // Blocks of 4: the image at 5..7 lies in the second block.
    s.add_request(with_image(req(1, prompt(13, 1), 1, Priority::Normal), 5..7, 7), now).unwrap();
    drain(&mut s, now);
    s.add_request(with_image(req(2, prompt(13, 1), 1, Priority::Normal), 5..7, 7), now).unwrap();
    assert_eq!(s.schedule(now).seqs[0].start_pos, 12, "the same image: all three full blocks hit");
    let mut s = Scheduler::new(cfg(|_| {}));
    s.add_request(with_image(req(1, prompt(13, 1), 1, Priority::Normal), 5..7, 7), now).unwrap();
    drain(&mut s, now);
    s.add_request(with_image(req(2, prompt(13, 1), 1, Priority::Normal), 5..7, 8), now).unwrap();
    assert_eq!(s.schedule(now).seqs[0].start_pos, 4, "another image: only the block before it hits");
}

#[test]
fn a_prefill_chunk_the_runner_failed_ends_the_request_and_caches_nothing() {
    let now = Instant::now();
    let mut s = Scheduler::new(cfg(|c| c.max_num_batched_tokens = 8));
    s.add_request(with_image(req(1, prompt(20, 1), 2, Priority::Normal), 2..10, 7), now).unwrap();
    let o = s.schedule(now);
    assert!(!o.seqs[0].sample, "a prefill chunk");
    let mut run = fake_run(&o);
    run.failed.insert(RequestId(1), "image: the encoder failed".into());
    let outs = s.update_from_output(&o, &run);
    assert_eq!(outs.len(), 1);
    assert_eq!(outs[0].finish_reason, Some(FinishReason::Error));
    assert!(outs[0].error.as_deref().unwrap().contains("encoder"));
    assert!(!s.has_work());
    // Its blocks were not registered: the same request again starts from scratch.
    s.add_request(with_image(req(2, prompt(20, 1), 2, Priority::Normal), 2..10, 7), now).unwrap();
    assert_eq!(s.schedule(now).seqs[0].start_pos, 0);
}
