//! `EngineCore`: the loop that owns the scheduler and the executor on one thread, and the handle other
//! threads use to talk to it.
//!
//! ```text
//!   loop { drain commands → schedule() → executor.execute() → update_from_output() → send outputs }
//! ```
//!
//! A failed or panicking step fails only the requests in it; the loop goes on. The loop stamps a heartbeat
//! every iteration (and while idle), and the executor stamps it from inside a step as it makes progress (per
//! layer), so liveness checks see a stuck engine but not a long step.

use crate::constraint::MASK_TIME_BUCKETS;
use crate::request::{EngineOutput, EngineRequest, RequestId};
use crate::scheduler::{AddError, RunnerOutput, Scheduler, SchedulerConfig, SchedulerOutput};
use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tokio::sync::mpsc::UnboundedSender;

/// Runs scheduled batches on a model. Implemented by the runner; tests use fakes.
pub trait Executor: Send + 'static {
    fn execute(&mut self, batch: &SchedulerOutput) -> Result<RunnerOutput, ExecutorError>;
    /// Drops per-request state (the request finished, failed or was aborted).
    fn remove_request(&mut self, id: RequestId);
    /// Called once before the loop starts: an executor whose steps can be long should `beat()` as it makes
    /// progress inside a step, so that `/health` reads a long prefill as alive.
    fn set_heartbeat(&mut self, _heartbeat: Heartbeat) {}
}

/// The engine's liveness stamp. The loop beats every iteration; executors beat from inside long steps, and
/// ask it whether the step is still wanted.
#[derive(Clone, Debug)]
pub struct Heartbeat {
    stats: Arc<EngineStats>,
    started: Instant,
    step: Arc<StepWatch>,
}

impl Heartbeat {
    pub fn beat(&self) {
        self.stats.heartbeat_ms.store(self.started.elapsed().as_millis() as u64, Ordering::SeqCst);
        self.stats.beats.fetch_add(1, Ordering::SeqCst);
    }

    /// True when every request of the step now executing has been aborted (their clients left): the
    /// executor may stop the step early, since nobody will use its results.
    pub fn step_abandoned(&self) -> bool {
        self.step.abandoned()
    }
}

/// The requests of the step being executed that have not been aborted. `abort` takes a request out at
/// once (the loop itself only sees the abort command after the step), so a long prefill whose clients all
/// left can stop mid-step instead of running to its end. The set is reused from step to step.
#[derive(Debug, Default)]
struct StepWatch(std::sync::Mutex<LiveSet>);

/// Bound on `LiveSet::early`: aborts between two steps beyond this many are left to the loop's abort commands
/// (the step they race runs on; nothing is lost but the early stop).
const MAX_EARLY_ABORTS: usize = 4096;

#[derive(Debug, Default)]
struct LiveSet {
    running: bool,
    live: std::collections::HashSet<RequestId>,
    /// Aborted while no step ran (the loop had already scheduled the next step, or will see the abort
    /// command only after it): the next step does not count them live. Cleared at every step start.
    early: std::collections::HashSet<RequestId>,
}

impl StepWatch {
    fn lock(&self) -> std::sync::MutexGuard<'_, LiveSet> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn start(&self, ids: impl IntoIterator<Item = RequestId>) {
        let mut s = self.lock();
        let LiveSet { live, early, .. } = &mut *s;
        live.clear();
        live.extend(ids.into_iter().filter(|id| !early.contains(id)));
        early.clear();
        s.running = true;
    }

    fn end(&self) {
        self.lock().running = false;
    }

    /// Every request of the running step is aborted (the engine is being shut down).
    fn aborted_all(&self) {
        self.lock().live.clear();
    }

    fn aborted(&self, id: RequestId) {
        let mut s = self.lock();
        if s.running {
            s.live.remove(&id);
        } else if s.early.len() < MAX_EARLY_ABORTS {
            s.early.insert(id);
        }
    }

    fn abandoned(&self) -> bool {
        let s = self.lock();
        s.running && s.live.is_empty()
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ExecutorError(pub String);

enum Command {
    Add(EngineRequest, UnboundedSender<EngineOutput>),
    Abort(RequestId),
    AbortAll,
}

/// Counters the engine publishes for admission control, metrics and liveness.
#[derive(Debug, Default)]
pub struct EngineStats {
    /// Milliseconds since the engine started at its last loop iteration.
    pub heartbeat_ms: AtomicU64,
    /// Heartbeats so far (loop iterations and progress inside steps).
    pub beats: AtomicU64,
    /// Adds sent but not yet seen by the loop.
    pub pending: AtomicUsize,
    pub pending_tokens: AtomicUsize,
    /// Waiting requests, new and preempted.
    pub waiting: AtomicUsize,
    /// Waiting requests never admitted yet: what `max_waiting_requests` bounds.
    pub waiting_new: AtomicUsize,
    pub waiting_tokens: AtomicUsize,
    pub running: AtomicUsize,
    /// KV cache usage in millionths.
    pub kv_usage_ppm: AtomicU64,
    pub prefix_queries: AtomicU64,
    pub prefix_hits: AtomicU64,
    pub steps: AtomicU64,
    pub preemptions: AtomicU64,
    pub failed_steps: AtomicU64,
    /// Requests added with an output constraint.
    pub constrained_requests: AtomicU64,
    /// Constrained sequences ended by their constraint refusing every token or failing.
    pub constraint_failures: AtomicU64,
    /// Token masks computed, by time taken: one count per bound of `MASK_TIME_BUCKETS` plus the overflow (not
    /// cumulative), and their total in microseconds.
    pub mask_time_counts: [AtomicU64; MASK_TIME_BUCKETS.len() + 1],
    pub mask_time_micros: AtomicU64,
    /// Speculation: sequences whose step verified draft tokens, the draft tokens verified, those accepted,
    /// and accepted ones by position (the first draft token, the second, ...).
    pub spec_drafts: AtomicU64,
    pub spec_draft_tokens: AtomicU64,
    pub spec_accepted_tokens: AtomicU64,
    pub spec_accepted_per_position: [AtomicU64; MAX_SPECULATIVE_TOKENS],
    /// Time spent proposing draft tokens, in microseconds.
    pub spec_propose_micros: AtomicU64,
    /// Images run through a vision encoder (an encoder-cache hit is not one), by encoding time as for masks.
    pub encoder_time_counts: [AtomicU64; ENCODER_TIME_BUCKETS.len() + 1],
    pub encoder_time_micros: AtomicU64,
}

/// Bounds (seconds) of the encoder-time histogram's buckets.
pub const ENCODER_TIME_BUCKETS: [f64; 11] = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

/// Adds `times` to a histogram of per-bucket counts (`buckets` bounds plus the overflow) and a total.
fn record_times(counts: &[AtomicU64], micros: &AtomicU64, buckets: &[f64], times: &[Duration]) {
    for t in times {
        let secs = t.as_secs_f64();
        let i = buckets.iter().position(|&b| secs <= b).unwrap_or(buckets.len());
        counts[i].fetch_add(1, Ordering::Relaxed);
        micros.fetch_add(t.as_micros() as u64, Ordering::Relaxed);
    }
}

/// Most draft tokens one sequence may verify in a step.
pub const MAX_SPECULATIVE_TOKENS: usize = 16;

impl EngineStats {
    fn record_speculation(&self, sched: &SchedulerOutput, run: &RunnerOutput) {
        self.spec_propose_micros.fetch_add(run.propose_time.as_micros() as u64, Ordering::Relaxed);
        for s in sched.seqs.iter().filter(|s| s.num_draft_tokens > 0) {
            let accepted = run.num_accepted.get(&s.id).copied().unwrap_or(0).min(s.num_draft_tokens);
            self.spec_drafts.fetch_add(1, Ordering::Relaxed);
            self.spec_draft_tokens.fetch_add(s.num_draft_tokens as u64, Ordering::Relaxed);
            self.spec_accepted_tokens.fetch_add(accepted as u64, Ordering::Relaxed);
            for c in self.spec_accepted_per_position.iter().take(accepted) {
                c.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn record_masks(&self, times: &[Duration]) {
        record_times(&self.mask_time_counts, &self.mask_time_micros, &MASK_TIME_BUCKETS, times);
    }

    fn record_encodes(&self, times: &[Duration]) {
        record_times(&self.encoder_time_counts, &self.encoder_time_micros, &ENCODER_TIME_BUCKETS, times);
    }
}

/// The engine's address: cheap to clone, usable from any thread.
#[derive(Clone)]
pub struct EngineHandle {
    tx: Sender<Command>,
    step: Arc<StepWatch>,
    stats: Arc<EngineStats>,
    cfg: Arc<SchedulerConfig>,
    started: Instant,
}

impl EngineHandle {
    /// Queues a request; refuses it at once when the waiting queue is full or the request can never run.
    /// Outputs arrive on `sink`; dropping the receiver aborts the request.
    pub fn add_request(&self, r: EngineRequest, sink: UnboundedSender<EngineOutput>) -> Result<(), AddError> {
        let cfg = &self.cfg;
        cfg.check_request(&r)?;
        let prompt = r.prompt_token_ids.len();
        // The loop raises `waiting_new` before it lowers `pending` for a request it takes in, so this sum never
        // undercounts: a request refused by the scheduler after passing here (a 500 instead of a 429) cannot
        // happen.
        let constrained = r.constraint.is_some();
        let queued = self.stats.pending.fetch_add(1, Ordering::SeqCst) + self.stats.waiting_new.load(Ordering::SeqCst);
        let queued_tokens = self.stats.pending_tokens.fetch_add(prompt, Ordering::SeqCst)
            + self.stats.waiting_tokens.load(Ordering::SeqCst);
        let undo = || {
            self.stats.pending.fetch_sub(1, Ordering::SeqCst);
            self.stats.pending_tokens.fetch_sub(prompt, Ordering::SeqCst);
        };
        if queued >= cfg.max_waiting_requests {
            undo();
            return Err(AddError::Overloaded(format!("{queued} requests already waiting")));
        }
        if queued_tokens + prompt > cfg.max_waiting_tokens {
            undo();
            return Err(AddError::Overloaded(format!("{queued_tokens} prompt tokens already waiting")));
        }
        if self.tx.send(Command::Add(r, sink)).is_err() {
            undo();
            return Err(AddError::Overloaded("engine stopped".into()));
        }
        if constrained {
            self.stats.constrained_requests.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    /// True when a new request would now be refused for lack of room in the waiting queue: a cheap check
    /// front ends make before tokenizing a prompt (`add_request` still decides).
    pub fn queue_full(&self) -> bool {
        self.stats.pending.load(Ordering::SeqCst) + self.stats.waiting_new.load(Ordering::SeqCst)
            >= self.cfg.max_waiting_requests
    }

    /// Aborts a request and frees its KV blocks (a no-op if it already finished).
    pub fn abort(&self, id: RequestId) {
        self.step.aborted(id);
        // The loop may have exited; nothing left to free then.
        let _ = self.tx.send(Command::Abort(id));
    }

    /// Aborts every request the engine holds now, queued or running (a forced unload of its model). Requests
    /// added after this call run as usual.
    pub fn abort_all(&self) {
        self.step.aborted_all();
        let _ = self.tx.send(Command::AbortAll);
    }

    pub fn stats(&self) -> &EngineStats {
        &self.stats
    }

    pub fn config(&self) -> &SchedulerConfig {
        &self.cfg
    }

    /// Time since the loop last stamped its heartbeat.
    pub fn heartbeat_age(&self) -> Duration {
        let now = self.started.elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(self.stats.heartbeat_ms.load(Ordering::SeqCst)))
    }
}

pub struct EngineCore<E: Executor> {
    scheduler: Scheduler,
    executor: E,
    rx: Receiver<Command>,
    sinks: HashMap<RequestId, UnboundedSender<EngineOutput>>,
    heartbeat: Heartbeat,
}

impl<E: Executor> EngineCore<E> {
    /// Starts the loop on its own thread. It stops when every handle is dropped.
    pub fn spawn(cfg: SchedulerConfig, executor: E) -> (EngineHandle, JoinHandle<()>) {
        let (tx, rx) = channel();
        let stats = Arc::new(EngineStats::default());
        let started = Instant::now();
        let step = Arc::new(StepWatch::default());
        let handle = EngineHandle { tx, step: step.clone(), stats: stats.clone(), cfg: Arc::new(cfg.clone()), started };
        let heartbeat = Heartbeat { stats: stats.clone(), started, step };
        let mut executor = executor;
        executor.set_heartbeat(heartbeat.clone());
        let mut core = EngineCore { scheduler: Scheduler::new(cfg), executor, rx, sinks: HashMap::new(), heartbeat };
        let join = std::thread::Builder::new()
            .name("engine-core".into())
            .spawn(move || core.run())
            .expect("spawn engine thread");
        (handle, join)
    }

    fn run(&mut self) {
        loop {
            self.beat();
            if !self.scheduler.has_work() {
                match self.rx.recv_timeout(Duration::from_millis(100)) {
                    Ok(cmd) => self.handle(cmd),
                    Err(RecvTimeoutError::Timeout) => continue,
                    Err(RecvTimeoutError::Disconnected) => return,
                }
            }
            while let Ok(cmd) = self.rx.try_recv() {
                self.handle(cmd);
            }
            self.step();
        }
    }

    fn beat(&self) {
        self.heartbeat.beat();
    }

    fn stats(&self) -> &EngineStats {
        &self.heartbeat.stats
    }

    fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Add(r, sink) => {
                let (id, prompt) = (r.id, r.prompt_token_ids.len());
                let added = self.scheduler.add_request(r, Instant::now());
                // Publish the new waiting count before the request leaves `pending`, so that admission's sum
                // of the two never misses it.
                self.publish();
                self.stats().pending.fetch_sub(1, Ordering::SeqCst);
                self.stats().pending_tokens.fetch_sub(prompt, Ordering::SeqCst);
                match added {
                    Ok(()) => {
                        self.sinks.insert(id, sink);
                    }
                    Err(e) => {
                        let _ = sink.send(EngineOutput {
                            id,
                            new_token_ids: Vec::new(),
                            finish_reason: Some(crate::FinishReason::Error),
                            num_cached_tokens: None,
                            error: Some(e.to_string()),
                            logprobs: Vec::new(),
                            prompt_logprobs: Vec::new(),
                        });
                    }
                }
            }
            Command::Abort(id) => {
                if let Some(out) = self.scheduler.abort(id) {
                    self.publish();
                    self.deliver(out);
                }
            }
            Command::AbortAll => {
                let ids: Vec<RequestId> = self.sinks.keys().copied().collect();
                for id in ids {
                    if let Some(out) = self.scheduler.abort(id) {
                        self.deliver(out);
                    }
                }
                self.publish();
            }
        }
        self.publish();
    }

    /// One engine step.
    fn step(&mut self) {
        let mut sched = self.scheduler.schedule(Instant::now());
        if !sched.finished.is_empty() {
            self.publish();
        }
        for out in std::mem::take(&mut sched.finished) {
            self.deliver(out);
        }
        if sched.seqs.is_empty() {
            self.publish();
            if self.scheduler.has_work() {
                // Nothing fits this step (all blocks held); wait for a command rather than spin.
                if let Ok(cmd) = self.rx.recv_timeout(Duration::from_millis(10)) {
                    self.handle(cmd);
                }
            }
            return;
        }
        // The step's live set before the counters: once a request shows as running, an abort of it reaches the
        // step (an abort before that is remembered, see `LiveSet::early`).
        let step = &self.heartbeat.step;
        step.start(sched.seqs.iter().map(|s| s.id));
        // Counters next: a long step should show its requests as running, not waiting.
        self.publish();
        let result = catch_unwind(AssertUnwindSafe(|| self.executor.execute(&sched)));
        let abandoned = step.abandoned();
        step.end();
        self.stats().steps.fetch_add(1, Ordering::SeqCst);
        let outputs = match result {
            Ok(Ok(run)) => {
                self.stats().record_masks(&run.mask_times);
                self.stats().record_encodes(&run.encode_times);
                self.stats().record_speculation(&sched, &run);
                self.stats().constraint_failures.fetch_add(run.failed.len() as u64, Ordering::Relaxed);
                self.scheduler.update_from_output(&sched, &run)
            }
            // Every request of the step was aborted while it ran (the executor may have stopped early): they
            // end as aborted, and their blocks, holding partly written K/V, are freed.
            Ok(Err(_)) if abandoned => sched.seqs.iter().filter_map(|s| self.scheduler.abort(s.id)).collect(),
            Ok(Err(e)) => self.fail_step(&sched, &format!("step failed: {e}")),
            Err(_) => self.fail_step(&sched, "internal error while executing the step"),
        };
        // Publish first, so whoever sees an output also sees counters that include its step; and again
        // after, for requests a vanished receiver aborted during delivery.
        self.publish();
        for out in outputs {
            self.deliver(out);
        }
        self.publish();
    }

    fn fail_step(&mut self, sched: &SchedulerOutput, msg: &str) -> Vec<EngineOutput> {
        self.stats().failed_steps.fetch_add(1, Ordering::Relaxed);
        let ids: Vec<RequestId> = sched.seqs.iter().map(|s| s.id).collect();
        self.scheduler.fail(&ids, msg)
    }

    fn deliver(&mut self, out: EngineOutput) {
        let id = out.id;
        let finished = out.finish_reason.is_some();
        let delivered = self.sinks.get(&id).is_some_and(|s| s.send(out).is_ok());
        if finished {
            self.sinks.remove(&id);
            self.executor.remove_request(id);
        } else if !delivered {
            // The receiver is gone (client disconnected): stop generating and free the blocks now.
            self.sinks.remove(&id);
            self.scheduler.abort(id);
            self.executor.remove_request(id);
        }
    }

    fn publish(&self) {
        let s = self.stats();
        s.waiting.store(self.scheduler.num_waiting(), Ordering::SeqCst);
        s.waiting_new.store(self.scheduler.num_waiting_new(), Ordering::SeqCst);
        s.waiting_tokens.store(self.scheduler.waiting_prompt_tokens(), Ordering::SeqCst);
        s.running.store(self.scheduler.num_running(), Ordering::SeqCst);
        let kv = self.scheduler.kv();
        s.kv_usage_ppm.store((kv.usage() * 1e6) as u64, Ordering::Relaxed);
        s.prefix_queries.store(kv.prefix_queries, Ordering::Relaxed);
        s.prefix_hits.store(kv.prefix_hits, Ordering::Relaxed);
        s.preemptions.store(self.scheduler.num_preemptions(), Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Regression: the loop published its `running` counter before the step's live set, and an abort in
    /// between (or any abort after the step was scheduled but before it started) was not seen by the step,
    /// which then ran to its end (`a_step_whose_requests_were_all_aborted_stops_early` failed now and then).
    /// An abort while no step runs now counts against the next step.
    #[test]
    fn an_abort_just_before_a_step_counts_against_it() {
        let w = StepWatch::default();
        w.aborted(RequestId(1));
        w.start([RequestId(1)]);
        assert!(w.abandoned(), "the step's only request was aborted before it started");
        w.end();
        w.aborted(RequestId(1));
        w.start([RequestId(1), RequestId(2)]);
        assert!(!w.abandoned(), "request 2 is still live");
        w.aborted(RequestId(2));
        assert!(w.abandoned());
        w.end();
        // Early aborts are forgotten at each start: they do not linger into later steps.
        w.start([RequestId(1)]);
        assert!(!w.abandoned());
        w.end();
        // And their set is bounded while no step runs.
        for i in 0..2 * MAX_EARLY_ABORTS as u64 {
            w.aborted(RequestId(1000 + i));
        }
        assert_eq!(w.lock().early.len(), MAX_EARLY_ABORTS);
    }
}
