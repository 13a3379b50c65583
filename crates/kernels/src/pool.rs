//! A fixed pool of worker threads for the kernels, sized once, that stays awake between the many short
//! parallel steps of a forward pass (four matmuls and an attention per layer).
//!
//! Rayon's workers went to sleep between jobs, so every matmul paid a wake-up and the caller thread only
//! waited. Here the caller works too, and workers spin briefly after each job before they park, so
//! back-to-back jobs start at once; after a forward pass the workers park again and cost nothing.
//!
//! Work is claimed task by task from an atomic counter, the calling thread included, so a slow or
//! descheduled worker delays only the tasks it has claimed, never the whole step.
//!
//! Jobs from two threads at once, or a job started from inside a job, run inline on the caller; so do all
//! jobs while as many forward passes run at once as the pool has threads ([`step`]).

use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long an idle worker keeps polling for the next job before it parks. Long enough to bridge the gap
/// between the jobs of one layer; measured on a 2-vCPU VM, 200 µs made decode slower (0.88×: the spinning
/// vCPU competes with the one doing the sequential work), 30 µs did not.
const SPIN: Duration = Duration::from_micros(30);

/// One job: `n` tasks of `f`, claimed through `next`.
struct Job {
    /// Erased lifetime: `run` keeps the closure alive until no worker can reach the job any more.
    f: *const (dyn Fn(usize, usize) + Sync),
    n: usize,
    next: AtomicUsize,
    remaining: AtomicUsize,
    /// A task panicked; `run` panics on the caller once the job is over.
    panicked: AtomicBool,
}

struct Shared {
    job: AtomicPtr<Job>,
    /// Workers currently between announcing themselves and leaving a job (see `run`).
    active: AtomicUsize,
    epoch: AtomicUsize,
    /// Parked workers. Changed only under `park`; read without it by `run`, so posting a job takes no lock
    /// unless someone is asleep.
    sleepers: AtomicUsize,
    park: Mutex<()>,
    wake: Condvar,
    busy: AtomicBool,
}

pub struct Pool {
    shared: Arc<Shared>,
    threads: usize,
}

static POOL: OnceLock<Pool> = OnceLock::new();
static REQUESTED: AtomicUsize = AtomicUsize::new(0);
/// Forward passes running now, on any thread (several engines serve several models).
static STEPS: AtomicUsize = AtomicUsize::new(0);

/// Marks a forward pass for as long as it lives (see [`step`]).
pub struct StepGuard(());

impl Drop for StepGuard {
    fn drop(&mut self) {
        STEPS.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Marks the calling thread's forward pass as running. While at least as many passes run as the pool has
/// threads (two engines on two cores), jobs run inline on their callers: each pass keeps a core of its own,
/// instead of one pass taking the pool and the other's thread preempting the pool's workers while its
/// caller spins waiting for them.
pub fn step() -> StepGuard {
    STEPS.fetch_add(1, Ordering::SeqCst);
    StepGuard(())
}

thread_local! {
    /// Set on pool workers and on a caller while it runs a job: nested jobs run inline.
    static IN_JOB: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Sets the number of threads (the caller included) before the pool is first used; later calls are ignored.
pub fn set_threads(n: usize) {
    REQUESTED.store(n.max(1), Ordering::SeqCst);
}

/// The global pool, created on first use with `set_threads`'s count or one thread per core.
pub fn global() -> &'static Pool {
    POOL.get_or_init(|| {
        let n = match REQUESTED.load(Ordering::SeqCst) {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        Pool::new(n)
    })
}

impl Pool {
    fn new(threads: usize) -> Self {
        let shared = Arc::new(Shared {
            job: AtomicPtr::new(std::ptr::null_mut()),
            active: AtomicUsize::new(0),
            epoch: AtomicUsize::new(0),
            sleepers: AtomicUsize::new(0),
            park: Mutex::new(()),
            wake: Condvar::new(),
            busy: AtomicBool::new(false),
        });
        for id in 1..threads {
            let s = shared.clone();
            std::thread::Builder::new()
                .name(format!("kernels-{id}"))
                .spawn(move || worker(&s, id))
                .expect("spawning a kernel worker thread");
        }
        Self { shared, threads }
    }

    /// Threads that run tasks, the caller included; worker ids passed to tasks are below this.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Runs `f(task, worker)` for every `task` in `0..n`, spread over the pool; returns when all are done.
    /// `worker` identifies the thread (0 = the caller), unique among concurrently running tasks.
    ///
    /// A panic in a task is caught; the other tasks still run, then `run` panics on the caller.
    pub fn run(&self, n: usize, f: &(dyn Fn(usize, usize) + Sync)) {
        let nested = IN_JOB.with(|c| c.get());
        let crowded = STEPS.load(Ordering::Relaxed) >= self.threads;
        if n <= 1 || self.threads == 1 || nested || crowded || self.shared.busy.swap(true, Ordering::Acquire) {
            (0..n).for_each(|t| f(t, 0));
            return;
        }
        IN_JOB.with(|c| c.set(true));
        // SAFETY: only the lifetime is erased; the job is unpublished and every worker has left it before
        // this function returns, so `f` outlives every use.
        let f: *const (dyn Fn(usize, usize) + Sync) = unsafe { std::mem::transmute(f) };
        let job =
            Job { f, n, next: AtomicUsize::new(0), remaining: AtomicUsize::new(n), panicked: AtomicBool::new(false) };
        let s = &*self.shared;
        s.job.store(&job as *const Job as *mut Job, Ordering::SeqCst);
        s.epoch.fetch_add(1, Ordering::SeqCst);
        // A worker raises `sleepers` and then re-reads `epoch` (both SeqCst, under `park`): if we read zero
        // here, its re-read comes after our increment and it does not park.
        if s.sleepers.load(Ordering::SeqCst) > 0 {
            let _guard = s.park.lock().unwrap_or_else(|e| e.into_inner());
            s.wake.notify_all();
        }
        work_on(&job, 0);
        while job.remaining.load(Ordering::Acquire) > 0 {
            std::hint::spin_loop();
        }
        // Unpublish, then wait for workers that may still hold the pointer. A worker announces itself
        // (`active`) before it loads `job`, so once `job` is null and `active` is zero nobody can reach it.
        s.job.store(std::ptr::null_mut(), Ordering::SeqCst);
        while s.active.load(Ordering::SeqCst) > 0 {
            std::hint::spin_loop();
        }
        IN_JOB.with(|c| c.set(false));
        s.busy.store(false, Ordering::Release);
        if job.panicked.load(Ordering::SeqCst) {
            // Re-raised on the caller, after the job is safely over, for the engine's per-step isolation.
            panic!("a kernel task panicked");
        }
    }
}

fn work_on(job: &Job, worker: usize) {
    loop {
        let t = job.next.fetch_add(1, Ordering::Relaxed);
        if t >= job.n {
            return;
        }
        // SAFETY: `run` keeps the closure alive while the job is reachable (see `Pool::run`).
        let f = unsafe { &*job.f };
        // A panicking task must neither kill a worker nor unwind the caller out of `run` while workers
        // still hold the job: catch it, count the task as done, and report it after the job.
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(t, worker))).is_err() {
            job.panicked.store(true, Ordering::SeqCst);
        }
        job.remaining.fetch_sub(1, Ordering::Release);
    }
}

fn worker(s: &Shared, id: usize) {
    IN_JOB.with(|c| c.set(true));
    let mut seen = 0usize;
    loop {
        // Spin for the next job, then park.
        let start = Instant::now();
        let mut spins = 0u32;
        while s.epoch.load(Ordering::SeqCst) == seen {
            std::hint::spin_loop();
            spins += 1;
            if spins.is_multiple_of(256) && start.elapsed() > SPIN {
                let mut guard = s.park.lock().unwrap_or_else(|e| e.into_inner());
                s.sleepers.fetch_add(1, Ordering::SeqCst);
                while s.epoch.load(Ordering::SeqCst) == seen {
                    guard = s.wake.wait(guard).unwrap_or_else(|e| e.into_inner());
                }
                s.sleepers.fetch_sub(1, Ordering::SeqCst);
                drop(guard);
                break;
            }
        }
        seen = s.epoch.load(Ordering::SeqCst);
        s.active.fetch_add(1, Ordering::SeqCst);
        let p = s.job.load(Ordering::SeqCst);
        if !p.is_null() {
            // SAFETY: `active` was raised before loading the pointer, so `run` has not returned yet.
            work_on(unsafe { &*p }, id);
        }
        s.active.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A raw pointer that may cross threads; the user guarantees disjoint access.
struct SendPtr<T>(*mut T);
unsafe impl<T: Send> Send for SendPtr<T> {}
unsafe impl<T: Send> Sync for SendPtr<T> {}

impl<T> SendPtr<T> {
    /// Through a method, so closures capture the wrapper (which is `Sync`), not the raw field.
    fn get(&self) -> *mut T {
        self.0
    }
}

/// Runs `f(chunk_index, chunk)` over `data` split into chunks of `chunk` items, in parallel.
pub fn for_each_chunk_mut<T: Send>(data: &mut [T], chunk: usize, f: impl Fn(usize, &mut [T]) + Sync) {
    for_each_chunk_mut_with(data, chunk, || (), |_, i, c| f(i, c));
}

/// As `for_each_chunk_mut`, with a scratch value per thread made by `init` (created once per call).
pub fn for_each_chunk_mut_with<T: Send, S: Send>(
    data: &mut [T],
    chunk: usize,
    init: impl Fn() -> S,
    f: impl Fn(&mut S, usize, &mut [T]) + Sync,
) {
    let chunk = chunk.max(1);
    let len = data.len();
    let part = |t: usize| (t * chunk, ((t + 1) * chunk).min(len));
    // SAFETY: consecutive chunks of `data`: in range and disjoint.
    unsafe { run_parts(data, len.div_ceil(chunk), part, init, f) }
}

/// `for_each_split_mut` with a scratch value per thread (made by `init`), as `for_each_chunk_mut_with`.
pub fn for_each_split_mut_with<T: Send, S: Send>(
    data: &mut [T],
    bounds: &[usize],
    init: impl Fn() -> S,
    f: impl Fn(&mut S, usize, &mut [T]) + Sync,
) {
    assert!(bounds.windows(2).all(|w| w[0] <= w[1]) && bounds.last().is_none_or(|&b| b <= data.len()));
    let part = |t: usize| (bounds[t], bounds[t + 1]);
    // SAFETY: ascending bounds within `data` (checked above): in range and disjoint.
    unsafe { run_parts(data, bounds.len().saturating_sub(1), part, init, f) }
}

/// Runs `f(scratch, t, &mut data[a .. b])` with `(a, b) = part(t)` for every task `t < n` over the pool, with
/// a scratch value per thread made by `init`.
///
/// # Safety
/// Every `part(t)` lies within `data`, and no two overlap.
unsafe fn run_parts<T: Send, S: Send>(
    data: &mut [T],
    n: usize,
    part: impl Fn(usize) -> (usize, usize) + Sync,
    init: impl Fn() -> S,
    f: impl Fn(&mut S, usize, &mut [T]) + Sync,
) {
    let pool = global();
    // One scratch value per thread of the pool (the caller is worker 0).
    let mut scratch: Vec<UnsafeCell<S>> = (0..pool.threads()).map(|_| UnsafeCell::new(init())).collect();
    let scratch_ptr = SendPtr(scratch.as_mut_ptr());
    let base = SendPtr(data.as_mut_ptr());
    let task = |t: usize, worker: usize| {
        let (start, end) = part(t);
        // SAFETY: tasks get disjoint ranges of `data` (the caller's contract), which outlives the job.
        let part = unsafe { std::slice::from_raw_parts_mut(base.get().add(start), end - start) };
        // SAFETY: `worker < threads` and worker ids are unique among running tasks, so each slot is used by
        // one thread at a time; `scratch` outlives the job.
        let slot = unsafe { &mut *(*scratch_ptr.get().add(worker)).get() };
        f(slot, t, part);
    };
    pool.run(n, &task);
    drop(scratch);
}

/// Runs `f(task, part)` in parallel over `data` split at `bounds` (ascending offsets: task `t` gets
/// `data[bounds[t] .. bounds[t + 1]]`; the last bound is `data.len()`). Tasks are claimed in order.
pub fn for_each_split_mut<T: Send>(data: &mut [T], bounds: &[usize], f: impl Fn(usize, &mut [T]) + Sync) {
    for_each_split_mut_with(data, bounds, || (), |_, t, part| f(t, part));
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    #[test]
    fn every_task_runs_once_and_chunks_are_disjoint() {
        let pool = Pool::new(3);
        for n in [0usize, 1, 2, 7, 1000] {
            let hits: Vec<AtomicU64> = (0..n).map(|_| AtomicU64::new(0)).collect();
            pool.run(n, &|t, w| {
                assert!(w < 3);
                hits[t].fetch_add(1, Ordering::Relaxed);
            });
            assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1), "n={n}");
        }
        let mut data = vec![0u32; 20];
        for_each_split_mut(&mut data, &[0, 7, 7, 12, 20], |t, part| part.iter_mut().for_each(|x| *x += t as u32 + 1));
        let want: Vec<u32> = [vec![1; 7], vec![3; 5], vec![4; 8]].concat();
        assert_eq!(data, want, "task 1 is empty; the others add their index + 1 to their own range");
        let mut data = vec![0u32; 1003];
        for_each_chunk_mut_with(&mut data, 10, Vec::<u32>::new, |scratch, i, c| {
            scratch.push(i as u32);
            c.iter_mut().for_each(|x| *x += i as u32 + 1);
        });
        assert!(data.iter().enumerate().all(|(j, &x)| x == (j / 10) as u32 + 1));
    }

    /// After the workers have parked, a new job wakes them: a lost wake-up would leave every task to the
    /// caller (worker 0), which this catches.
    #[test]
    fn parked_workers_wake_for_the_next_job() {
        let pool = Pool::new(2);
        for _ in 0..5 {
            std::thread::sleep(Duration::from_millis(5)); // far past SPIN: the worker parks
            let helped = AtomicU64::new(0);
            pool.run(8, &|_, w| {
                std::thread::sleep(Duration::from_millis(2));
                if w != 0 {
                    helped.fetch_add(1, Ordering::Relaxed);
                }
            });
            assert!(helped.load(Ordering::Relaxed) > 0, "the parked worker never joined");
        }
    }

    #[test]
    fn a_panicking_task_is_reported_after_the_job_and_the_pool_keeps_working() {
        let pool = Pool::new(2);
        let done = AtomicU64::new(0);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            pool.run(64, &|t, _| {
                if t == 13 {
                    panic!("injected");
                }
                done.fetch_add(1, Ordering::Relaxed);
            })
        }));
        assert!(r.is_err());
        assert_eq!(done.load(Ordering::Relaxed), 63, "the other tasks still ran");
        let again = AtomicU64::new(0);
        pool.run(10, &|_, _| {
            again.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(again.load(Ordering::Relaxed), 10);
    }

    #[test]
    fn nested_and_concurrent_jobs_run_inline() {
        let pool = Arc::new(Pool::new(2));
        let total = AtomicU64::new(0);
        pool.run(4, &|_, _| {
            pool.run(3, &|_, w| {
                assert_eq!(w, 0, "nested jobs run inline");
                total.fetch_add(1, Ordering::Relaxed);
            });
        });
        assert_eq!(total.load(Ordering::Relaxed), 12);
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let p = pool.clone();
                std::thread::spawn(move || {
                    let c = AtomicU64::new(0);
                    for _ in 0..200 {
                        p.run(5, &|_, _| {
                            c.fetch_add(1, Ordering::Relaxed);
                        });
                    }
                    c.load(Ordering::Relaxed)
                })
            })
            .collect();
        for h in handles {
            assert_eq!(h.join().unwrap(), 1000);
        }
    }
}
