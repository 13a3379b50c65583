//! The engine loop with fake executors: a failing or panicking step fails only its requests, the engine
//! keeps serving, the heartbeat stays fresh, and admission refuses at once when the queue is full.

use mlx_serving_engine::*;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

/// Emits token 5 for every sampled sequence; panics or errors when a prompt starts with 666 or 777.
struct Flaky;

impl Executor for Flaky {
    fn execute(&mut self, batch: &SchedulerOutput) -> Result<RunnerOutput, ExecutorError> {
        for s in &batch.seqs {
            if s.start_pos == 0 && s.token_ids[0] == 666 {
                panic!("injected panic");
            }
            if s.start_pos == 0 && s.token_ids[0] == 777 {
                return Err(ExecutorError("injected error".into()));
            }
        }
        let mut r = RunnerOutput::default();
        for s in batch.seqs.iter().filter(|s| s.sample) {
            r.sampled.insert(s.id, vec![5]);
        }
        Ok(r)
    }
    fn remove_request(&mut self, _: RequestId) {}
}

fn cfg() -> SchedulerConfig {
    SchedulerConfig {
        block_size: 4,
        num_blocks: 64,
        max_num_seqs: 1,
        max_waiting_requests: 4,
        ..SchedulerConfig::default()
    }
}

fn submit(h: &EngineHandle, id: u64, first: u32, max_tokens: u32) -> Result<UnboundedReceiver<EngineOutput>, AddError> {
    let (tx, rx) = unbounded_channel();
    let r = EngineRequest {
        id: RequestId(id),
        prompt_token_ids: vec![first, 2, 3],
        params: Arc::new(SamplingParams::greedy(max_tokens)),
        priority: Priority::Normal,
        deadline: None,
        constraint: None,
        mm_inputs: Vec::new(),
    };
    h.add_request(r, tx).map(|_| rx)
}

fn finish(rx: &mut UnboundedReceiver<EngineOutput>) -> EngineOutput {
    loop {
        let o = rx.blocking_recv().expect("output");
        if o.finish_reason.is_some() {
            return o;
        }
    }
}

#[test]
fn a_panicking_or_failing_step_fails_only_its_requests() {
    let (h, _join) = EngineCore::spawn(cfg(), Flaky);
    let mut bad = submit(&h, 1, 666, 4).unwrap();
    let mut err = submit(&h, 2, 777, 4).unwrap();
    let mut good = submit(&h, 3, 1, 4).unwrap();
    let o = finish(&mut bad);
    assert_eq!(o.finish_reason, Some(FinishReason::Error));
    assert!(o.error.unwrap().contains("internal error"), "no panic details leak");
    let o = finish(&mut err);
    assert_eq!(o.finish_reason, Some(FinishReason::Error));
    assert!(o.error.unwrap().contains("injected error"));
    assert_eq!(finish(&mut good).finish_reason, Some(FinishReason::Length));
    // Still serving afterwards.
    let mut later = submit(&h, 4, 1, 2).unwrap();
    assert_eq!(finish(&mut later).finish_reason, Some(FinishReason::Length));
    assert!(h.heartbeat_age() < Duration::from_secs(2));
    assert_eq!(h.stats().failed_steps.load(std::sync::atomic::Ordering::SeqCst), 2);
}

#[test]
fn dropping_the_receiver_aborts_and_frees_blocks() {
    let (h, _join) = EngineCore::spawn(cfg(), Flaky);
    let rx = submit(&h, 1, 1, 200).unwrap();
    drop(rx);
    let mut next = submit(&h, 2, 1, 3).unwrap();
    assert_eq!(
        finish(&mut next).finish_reason,
        Some(FinishReason::Length),
        "the abandoned request does not block the only slot"
    );
}

#[test]
fn admission_refuses_at_once_when_the_queue_is_full() {
    /// Blocks every step until the test opens the gate, so the queue stays full while we submit.
    struct Gated(std::sync::mpsc::Receiver<()>);
    impl Executor for Gated {
        fn execute(&mut self, batch: &SchedulerOutput) -> Result<RunnerOutput, ExecutorError> {
            let _ = self.0.recv();
            Ok(RunnerOutput {
                sampled: batch.seqs.iter().filter(|s| s.sample).map(|s| (s.id, vec![5])).collect(),
                ..Default::default()
            })
        }
        fn remove_request(&mut self, _: RequestId) {}
    }
    let (gate, rx) = std::sync::mpsc::channel();
    let (h, _join) = EngineCore::spawn(cfg(), Gated(rx));
    let mut rxs = Vec::new();
    let mut refused = 0;
    for id in 0..20 {
        match submit(&h, id, 1, 50) {
            Ok(rx) => rxs.push(rx),
            Err(AddError::Overloaded(_)) => refused += 1,
            Err(e) => panic!("unexpected {e}"),
        }
    }
    // At most one running plus max_waiting_requests = 4 queued are admitted.
    assert!(refused >= 15, "refused only {refused}");
    drop(gate);
    for mut rx in rxs {
        assert!(finish(&mut rx).finish_reason.is_some());
    }
    // The prompt-token bound refuses at once too (the queue is stuck behind the gate).
    let big = EngineRequest {
        id: RequestId(98),
        prompt_token_ids: vec![1; 3000],
        params: Arc::new(SamplingParams::greedy(10)),
        priority: Priority::Normal,
        deadline: None,
        constraint: None,
        mm_inputs: Vec::new(),
    };
    let (h2, _j2) = EngineCore::spawn(SchedulerConfig { max_waiting_tokens: 2000, num_blocks: 1024, ..cfg() }, Flaky);
    let r = h2.add_request(big, unbounded_channel().0);
    assert!(matches!(r, Err(AddError::Overloaded(_))), "{r:?}");
    let too_long = EngineRequest {
        id: RequestId(99),
        prompt_token_ids: vec![1; 9000],
        params: Arc::new(SamplingParams::greedy(10)),
        priority: Priority::Normal,
        deadline: None,
        constraint: None,
        mm_inputs: Vec::new(),
    };
    assert!(matches!(h.add_request(too_long, unbounded_channel().0), Err(AddError::ContextLengthExceeded { .. })));
}

/// Regression (#27, item 5): under overload a request could pass admission and then be refused inside the
/// loop (the loop lowered `pending` before it raised `waiting`, so concurrent admissions undercounted), which
/// the server turned into a 500 instead of a 429. Every request is either refused at `add_request` or runs
/// to its end.
#[test]
fn overload_refuses_at_admission_never_after() {
    struct Slow;
    impl Executor for Slow {
        fn execute(&mut self, batch: &SchedulerOutput) -> Result<RunnerOutput, ExecutorError> {
            std::thread::sleep(Duration::from_micros(200));
            Ok(RunnerOutput {
                sampled: batch.seqs.iter().filter(|s| s.sample).map(|s| (s.id, vec![5])).collect(),
                ..Default::default()
            })
        }
        fn remove_request(&mut self, _: RequestId) {}
    }
    let (h, _join) = EngineCore::spawn(SchedulerConfig { max_num_seqs: 2, max_waiting_requests: 3, ..cfg() }, Slow);
    let threads: Vec<_> = (0..6u64)
        .map(|t| {
            let h = h.clone();
            std::thread::spawn(move || {
                let (mut accepted, mut refused) = (Vec::new(), 0);
                for i in 0..1500 {
                    match submit(&h, t * 100_000 + i, 1, 1) {
                        Ok(rx) => accepted.push(rx),
                        Err(AddError::Overloaded(_)) => refused += 1,
                        Err(e) => panic!("unexpected {e}"),
                    }
                }
                let failed: Vec<String> = accepted
                    .iter_mut()
                    .map(finish)
                    .filter(|o| o.finish_reason != Some(FinishReason::Length))
                    .map(|o| format!("{:?}: {:?}", o.finish_reason, o.error))
                    .collect();
                (accepted.len(), refused, failed)
            })
        })
        .collect();
    let (mut accepted, mut refused) = (0, 0);
    for t in threads {
        let (a, r, failed) = t.join().unwrap();
        assert!(failed.is_empty(), "accepted requests failed: {:?}", &failed[..failed.len().min(3)]);
        (accepted, refused) = (accepted + a, refused + r);
    }
    assert!(accepted > 0 && refused > 0, "accepted {accepted}, refused {refused}");
}

/// (#27, item 1) The loop hands its heartbeat to the executor before the first step, so an executor can beat
/// from inside a long step (the real model's beats are tested in `runner/tests/engine.rs`).
#[test]
fn the_loop_hands_the_executor_its_heartbeat() {
    struct Beating(Option<Heartbeat>);
    impl Executor for Beating {
        fn execute(&mut self, batch: &SchedulerOutput) -> Result<RunnerOutput, ExecutorError> {
            for _ in 0..5 {
                std::thread::sleep(Duration::from_millis(20));
                self.0.as_ref().expect("heartbeat set before the loop starts").beat();
            }
            Ok(RunnerOutput {
                sampled: batch.seqs.iter().filter(|s| s.sample).map(|s| (s.id, vec![5])).collect(),
                ..Default::default()
            })
        }
        fn remove_request(&mut self, _: RequestId) {}
        fn set_heartbeat(&mut self, heartbeat: Heartbeat) {
            self.0 = Some(heartbeat);
        }
    }
    let (h, _join) = EngineCore::spawn(cfg(), Beating(None));
    let before = h.stats().beats.load(std::sync::atomic::Ordering::SeqCst);
    let mut rx = submit(&h, 1, 1, 1).unwrap();
    finish(&mut rx);
    // Five beats from inside the one step, plus the loop's own.
    assert!(h.stats().beats.load(std::sync::atomic::Ordering::SeqCst) >= before + 5);
}

#[test]
fn abort_all_ends_queued_and_running_requests_and_the_loop_ends_with_its_handles() {
    // A slow executor so that the requests are still running or queued when abort_all comes.
    struct Slow;
    impl Executor for Slow {
        fn execute(&mut self, batch: &SchedulerOutput) -> Result<RunnerOutput, ExecutorError> {
            std::thread::sleep(Duration::from_millis(5));
            let mut r = RunnerOutput::default();
            for s in batch.seqs.iter().filter(|s| s.sample) {
                r.sampled.insert(s.id, vec![5]);
            }
            Ok(r)
        }
        fn remove_request(&mut self, _: RequestId) {}
    }
    let (h, join) = EngineCore::spawn(cfg(), Slow);
    let mut running = submit(&h, 1, 1, 200).unwrap();
    let mut queued = submit(&h, 2, 1, 200).unwrap();
    // The first request is running once it has produced a token.
    assert!(running.blocking_recv().expect("a first output").finish_reason.is_none());
    h.abort_all();
    assert_eq!(finish(&mut running).finish_reason, Some(FinishReason::Abort));
    assert_eq!(finish(&mut queued).finish_reason, Some(FinishReason::Abort));
    // The gauge is published by the loop just after it delivers the outputs: wait for it (bounded).
    let t = std::time::Instant::now();
    while h.stats().running.load(std::sync::atomic::Ordering::SeqCst) != 0 {
        assert!(t.elapsed() < Duration::from_secs(5), "requests still counted as running");
        std::thread::sleep(Duration::from_millis(1));
    }
    // A request added afterwards runs as usual.
    let mut after = submit(&h, 3, 1, 2).unwrap();
    assert_eq!(finish(&mut after).finish_reason, Some(FinishReason::Length));
    drop(h);
    let t = std::time::Instant::now();
    while !join.is_finished() {
        assert!(t.elapsed() < Duration::from_secs(5), "the loop outlived its last handle");
        std::thread::sleep(Duration::from_millis(10));
    }
}
