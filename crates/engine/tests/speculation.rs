//! Speculative steps in the scheduler, with a fake model and a fake proposer: the tokens equal those of plain
//! decoding whatever the drafts, rejected positions are rolled back, drafts never cost a preemption nor run
//! past `max_tokens` or the context, and every block is free at the end (after rejections, preemptions and
//! aborts).

mod common;
use common::*;
use mlx_serving_engine::*;
use std::time::Instant;

/// Runs steps until idle with `spec`, checking the pool's invariants after every step; returns every output
/// and the number of draft tokens scheduled.
fn drain_spec(s: &mut Scheduler, spec: FakeSpec, now: Instant) -> (Vec<EngineOutput>, usize) {
    let (mut all, mut drafted) = (Vec::new(), 0);
    for _ in 0..10_000 {
        if !s.has_work() {
            return (all, drafted);
        }
        let out = s.schedule(now);
        for q in &out.seqs {
            drafted += q.num_draft_tokens;
            assert!(q.num_draft_tokens == 0 || q.sample, "drafts only where the step samples");
            let r = s.request(q.id).expect("scheduled request exists");
            assert!(r.num_computed_tokens <= s.kv().block_table(q.id.0).len() * s.config().block_size);
        }
        all.extend(out.finished.clone());
        let run = fake_step(&out, Some(spec));
        all.extend(s.update_from_output(&out, &run));
        s.kv().check_invariants();
    }
    panic!("scheduler did not finish");
}

fn plain_tokens(id: u64, len: usize, max_tokens: u32) -> Vec<u32> {
    let now = Instant::now();
    let mut s = Scheduler::new(cfg(|_| {}));
    s.add_request(req(id, prompt(len, id as u32), max_tokens, Priority::Normal), now).unwrap();
    tokens_of(&drain(&mut s, now), id)
}

#[test]
fn speculative_tokens_equal_plain_ones_and_every_block_comes_back() {
    let now = Instant::now();
    let reqs: Vec<(u64, usize, u32)> = vec![(1, 6, 30), (2, 13, 17), (3, 3, 40), (4, 21, 9), (5, 1, 25)];
    let expected: Vec<Vec<u32>> = reqs.iter().map(|&(id, len, max)| plain_tokens(id, len, max)).collect();
    for k in [1, 2, 4, 7] {
        for wrong_every in [2, 3, 5, 1000] {
            for (num_blocks, budget) in [(64, 64), (14, 64), (64, 6)] {
                let mut s = Scheduler::new(cfg(|c| {
                    c.num_blocks = num_blocks;
                    c.max_num_batched_tokens = budget;
                }));
                for &(id, len, max) in &reqs {
                    s.add_request(req(id, prompt(len, id as u32), max, Priority::Normal), now).unwrap();
                }
                let (outs, drafted) = drain_spec(&mut s, FakeSpec { k, wrong_every }, now);
                let case = format!("k {k}, wrong every {wrong_every}, {num_blocks} blocks, budget {budget}");
                assert!(drafted > 0, "{case}: nothing was speculated");
                for (&(id, _, max), want) in reqs.iter().zip(&expected) {
                    assert_eq!(&tokens_of(&outs, id), want, "{case}: request {id}");
                    assert_eq!(want.len(), max as usize);
                }
                assert_eq!(s.kv().num_free_blocks(), num_blocks, "{case}: leaked blocks");
            }
        }
    }
}

/// A step that accepts some drafts emits them with the token after them in one output, and the rejected
/// positions are rolled back: the next step starts right after the last kept token.
#[test]
fn rejected_drafts_are_rolled_back() {
    let now = Instant::now();
    let mut s = Scheduler::new(cfg(|_| {}));
    let id = RequestId(1);
    s.add_request(req(1, prompt(5, 1), 50, Priority::Normal), now).unwrap();
    let o = s.schedule(now);
    let mut run = fake_step(&o, None);
    // Four drafts: the model's next two tokens, then two wrong ones.
    let d: Vec<u32> = vec![next_token(id, 6), next_token(id, 7), 0, 0];
    run.drafts.insert(id, d.clone());
    s.update_from_output(&o, &run);
    let o = s.schedule(now);
    let q = &o.seqs[0];
    assert_eq!((q.start_pos, q.num_draft_tokens, q.sample), (5, 4, true));
    assert_eq!(q.token_ids[1..], d[..], "the last known token, then the drafts");
    assert_eq!(o.num_batched_tokens, 5);
    let outs = s.update_from_output(&o, &fake_step(&o, None));
    assert_eq!(outs[0].new_token_ids, vec![next_token(id, 6), next_token(id, 7), next_token(id, 8)]);
    let r = s.request(id).unwrap();
    assert_eq!((r.num_tokens(), r.num_computed_tokens), (9, 8), "K/V of the rejected positions dropped");
    let o = s.schedule(now);
    assert_eq!((o.seqs[0].start_pos, o.seqs[0].token_ids.clone()), (8, vec![next_token(id, 8)]));
}

/// Drafts stop short of `max_tokens` and of the context: every draft kept plus the token after it must fit.
#[test]
fn drafts_never_run_past_max_tokens_or_the_context() {
    let now = Instant::now();
    let spec = FakeSpec { k: 8, wrong_every: 1000 };
    let mut s = Scheduler::new(cfg(|_| {}));
    s.add_request(req(1, prompt(4, 1), 6, Priority::Normal), now).unwrap();
    let (outs, _) = drain_spec(&mut s, spec, now);
    assert_eq!(tokens_of(&outs, 1).len(), 6);
    let mut s = Scheduler::new(cfg(|c| c.max_model_len = 12));
    s.add_request(req(2, prompt(4, 2), 8, Priority::Normal), now).unwrap();
    let o = s.schedule(now);
    s.update_from_output(&o, &fake_step(&o, Some(spec)));
    let o = s.schedule(now);
    // 5 tokens known; at most 12: the drafts may bring it to 11 and the token after them to 12.
    assert_eq!(o.seqs[0].num_draft_tokens, 6);
    let outs = s.update_from_output(&o, &fake_step(&o, Some(spec)));
    assert_eq!(outs[0].new_token_ids.len(), 7);
    assert_eq!(outs[0].finish_reason, Some(FinishReason::Length));
}

/// With blocks for the known tokens only, a request runs without its drafts rather than preempting another.
#[test]
fn drafts_are_dropped_before_anything_is_preempted() {
    let now = Instant::now();
    // Two requests of 8 prompt tokens in 5 blocks of 4: each takes 2 blocks, then a third for its first
    // output token; no room for 4 drafts.
    let mut s = Scheduler::new(cfg(|c| c.num_blocks = 5));
    s.add_request(req(1, prompt(7, 1), 3, Priority::Normal), now).unwrap();
    s.add_request(req(2, prompt(7, 2), 3, Priority::Normal), now).unwrap();
    let o = s.schedule(now);
    s.update_from_output(&o, &fake_step(&o, Some(FakeSpec { k: 4, wrong_every: 1000 })));
    let o = s.schedule(now);
    assert!(o.preempted.is_empty(), "{:?}", o.preempted);
    assert_eq!(o.seqs.len(), 2);
    let drafted: usize = o.seqs.iter().map(|q| q.num_draft_tokens).sum();
    assert!(drafted < 8, "not all drafts fit: {drafted}");
    s.kv().check_invariants();
}

/// An end-of-sequence token among the accepted drafts ends the request there; nothing after it is emitted.
#[test]
fn eos_inside_accepted_drafts_stops_there() {
    let now = Instant::now();
    let mut s = Scheduler::new(cfg(|_| {}));
    let id = RequestId(1);
    s.add_request(req(1, prompt(5, 1), 50, Priority::Normal), now).unwrap();
    let o = s.schedule(now);
    let mut run = fake_step(&o, None);
    run.drafts.insert(id, vec![7, 0, 9]);
    s.update_from_output(&o, &run);
    let o = s.schedule(now);
    let mut run = RunnerOutput::default();
    run.sampled.insert(id, vec![7, 0, 9, 4]);
    let outs = s.update_from_output(&o, &run);
    assert_eq!(outs[0].new_token_ids, vec![7, 0]);
    assert_eq!(outs[0].finish_reason, Some(FinishReason::Stop));
    assert!(!s.has_work());
    assert_eq!(s.kv().num_free_blocks(), s.config().num_blocks);
}

/// Random arrivals, aborts and a scarce cache with speculation: the pool's invariants hold after every step,
/// finished requests' tokens are a prefix of (or equal to) plain decoding's, and every block is free at the end.
#[test]
fn aborts_and_preemption_with_speculation_leak_nothing() {
    let now = Instant::now();
    for seed in 1..=40u64 {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut below = |n: u64| {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            x.wrapping_mul(0x2545_F491_4F6C_DD1D) % n
        };
        let num_blocks = 10 + below(20) as usize;
        let mut s = Scheduler::new(cfg(|c| {
            c.num_blocks = num_blocks;
            c.max_num_batched_tokens = 4 + below(30) as usize;
        }));
        let spec = FakeSpec { k: 1 + below(6) as usize, wrong_every: 2 + below(5) as usize };
        let mut next_id = 1;
        let mut outs = Vec::new();
        let mut sizes = Vec::new();
        for _step in 0..200 {
            if below(3) == 0 && next_id < 30 {
                let (len, max) = (1 + below(12) as usize, 1 + below(20) as u32);
                s.add_request(req(next_id, prompt(len, next_id as u32), max, Priority::Normal), now).unwrap();
                sizes.push((next_id, len, max));
                next_id += 1;
            }
            if below(7) == 0 && next_id > 1 {
                let victim = RequestId(1 + below(next_id - 1));
                outs.extend(s.abort(victim));
            }
            let o = s.schedule(now);
            outs.extend(o.finished.clone());
            let run = fake_step(&o, Some(spec));
            outs.extend(s.update_from_output(&o, &run));
            s.kv().check_invariants();
        }
        let (rest, _) = drain_spec(&mut s, spec, now);
        outs.extend(rest);
        assert_eq!(s.kv().num_free_blocks(), num_blocks, "seed {seed}: leaked blocks");
        for (id, len, max) in sizes {
            let got = tokens_of(&outs, id);
            let want = plain_tokens(id, len, max);
            assert!(want.starts_with(&got), "seed {seed} request {id}: {got:?} vs {want:?}");
        }
    }
}
