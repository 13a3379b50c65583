use super::*;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A loader whose models are names with a size; loading takes `delay`, fails for names in `broken`, and is
/// counted per name.
#[derive(Default)]
struct Fake {
    sizes: HashMap<String, u64>,
    broken: Vec<String>,
    delay: Duration,
    loads: Mutex<HashMap<String, usize>>,
    live: Arc<AtomicUsize>,
    aborted: AtomicUsize,
}

struct FakeModel {
    live: Arc<AtomicUsize>,
}

impl Drop for FakeModel {
    fn drop(&mut self) {
        self.live.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Loader for Fake {
    type Config = String;
    type Model = FakeModel;
    fn estimate(&self, cfg: &String) -> Result<u64, String> {
        self.sizes.get(cfg).copied().ok_or_else(|| format!("{cfg}: no such file"))
    }
    fn load(&self, cfg: &String) -> Result<FakeModel, String> {
        std::thread::sleep(self.delay);
        *self.loads.lock().unwrap().entry(cfg.clone()).or_default() += 1;
        if self.broken.contains(cfg) {
            return Err(format!("{cfg}: not a GGUF file"));
        }
        self.live.fetch_add(1, Ordering::SeqCst);
        Ok(FakeModel { live: self.live.clone() })
    }
    fn abort_all(&self, _model: &FakeModel) {
        self.aborted.fetch_add(1, Ordering::SeqCst);
    }
}

fn spec(name: &str) -> ModelSpec {
    ModelSpec { name: name.into(), ..ModelSpec::default() }
}

fn registry(
    models: &[(&str, u64)],
    specs: Vec<ModelSpec>,
    limits: Limits,
    f: impl FnOnce(&mut Fake),
) -> Arc<Registry<Fake>> {
    let mut fake = Fake { sizes: models.iter().map(|(n, s)| (n.to_string(), *s)).collect(), ..Fake::default() };
    f(&mut fake);
    let entries = specs.into_iter().map(|s| (s.clone(), s.name.clone())).collect();
    Registry::new(fake, entries, limits)
}

fn states(r: &Registry<Fake>) -> Vec<(String, &'static str)> {
    r.list().into_iter().map(|m| (m.name, m.state.as_str())).collect()
}

fn loads(r: &Registry<Fake>, name: &str) -> usize {
    r.loader().loads.lock().unwrap().get(name).copied().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_share_one_load() {
    let r = registry(
        &[("a", 10)],
        vec![ModelSpec { aliases: vec!["alpha".into()], ..spec("a") }],
        Limits::default(),
        |f| f.delay = Duration::from_millis(100),
    );
    let tasks: Vec<_> = (0..8)
        .map(|i| {
            let r = r.clone();
            tokio::spawn(async move { r.acquire(if i % 2 == 0 { "a" } else { "alpha" }).await.map(|l| l.name()) })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap(), "a");
    }
    assert_eq!(loads(&r, "a"), 1);
    assert_eq!(r.info("a").unwrap().in_flight, 0);
    assert_eq!(r.counts(), Counts { loads: 1, load_failures: 0, unloads: 0 });
    assert!(matches!(r.acquire("b").await, Err(RegistryError::NotFound(_))));
}

/// A budget for two of three models: the least recently used idle one goes; a pinned one never does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_recently_used_idle_models_make_room() {
    let limits = Limits { memory_budget: Some(25), ..Limits::default() };
    let r = registry(&[("a", 10), ("b", 10), ("c", 10)], vec![spec("a"), spec("b"), spec("c")], limits, |_| {});
    drop(r.acquire("a").await.unwrap());
    drop(r.acquire("b").await.unwrap());
    drop(r.acquire("a").await.unwrap()); // a is now more recent than b
    drop(r.acquire("c").await.unwrap());
    assert_eq!(states(&r), vec![("a".into(), "loaded"), ("b".into(), "unloaded"), ("c".into(), "loaded")]);
    assert_eq!(r.loader().live.load(Ordering::SeqCst), 2, "the evicted model was released");
    assert_eq!(r.list().iter().map(|m| m.memory).sum::<u64>(), 20);
    // Pinned: with a pinned, c is the only one that can go.
    let limits = Limits { memory_budget: Some(25), ..Limits::default() };
    let r = registry(
        &[("a", 10), ("b", 10), ("c", 10)],
        vec![ModelSpec { pinned: true, ..spec("a") }, spec("b"), spec("c")],
        limits,
        |_| {},
    );
    for n in ["a", "b", "c", "b", "a", "c"] {
        drop(r.acquire(n).await.unwrap());
        assert_eq!(r.info("a").unwrap().state, State::Loaded, "after {n}");
    }
    // The model-count limit works the same way.
    let r = registry(
        &[("a", 1), ("b", 1)],
        vec![spec("a"), spec("b")],
        Limits { max_loaded: Some(1), ..Limits::default() },
        |_| {},
    );
    drop(r.acquire("a").await.unwrap());
    drop(r.acquire("b").await.unwrap());
    assert_eq!(states(&r), vec![("a".into(), "unloaded"), ("b".into(), "loaded")]);
}

/// A model in use is never unloaded under its requests: a request for another model waits for room up to the
/// bound, then is refused (503), and gets its model once the first request ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_in_use_are_never_evicted() {
    let limits = Limits { memory_budget: Some(15), wait_for_room: Duration::from_millis(150), ..Limits::default() };
    let r = registry(&[("a", 10), ("b", 10), ("huge", 99)], vec![spec("a"), spec("b"), spec("huge")], limits, |_| {});
    let held = r.acquire("a").await.unwrap();
    let t = Instant::now();
    assert!(matches!(r.acquire("b").await, Err(RegistryError::NoRoom(_))));
    assert!(t.elapsed() >= Duration::from_millis(140), "waited for room first");
    assert_eq!(r.info("a").unwrap().state, State::Loaded);
    // Released while b waits: b loads.
    let r2 = r.clone();
    let waiter = tokio::spawn(async move { r2.acquire("b").await.map(|l| l.name()) });
    tokio::time::sleep(Duration::from_millis(30)).await;
    drop(held);
    assert_eq!(waiter.await.unwrap().unwrap(), "b");
    assert_eq!(states(&r)[..2], [("a".into(), "unloaded"), ("b".into(), "loaded")]);
    assert!(matches!(r.acquire("huge").await, Err(RegistryError::TooLarge { need: 99, budget: 15, .. })));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_models_unload_after_their_ttl() {
    let ttl = Some(Duration::from_millis(50));
    let specs = vec![
        ModelSpec { ttl, ..spec("a") },
        ModelSpec { ttl, pinned: true, ..spec("p") },
        spec("forever"),
        ModelSpec { ttl, ..spec("busy") },
    ];
    let r = registry(&[("a", 1), ("p", 1), ("forever", 1), ("busy", 1)], specs, Limits::default(), |_| {});
    for n in ["a", "p", "forever"] {
        drop(r.acquire(n).await.unwrap());
    }
    let busy = r.acquire("busy").await.unwrap();
    assert!(r.unload_idle(Instant::now()).await.is_empty(), "nothing expired yet");
    let later = Instant::now() + Duration::from_millis(60);
    assert_eq!(r.unload_idle(later).await, vec!["a".to_string()]);
    assert_eq!(
        states(&r),
        vec![("a".into(), "unloaded"), ("p".into(), "loaded"), ("forever".into(), "loaded"), ("busy".into(), "loaded")]
    );
    drop(busy);
}

/// A broken model fails its requests with its error, and the others keep serving; a later request tries
/// again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_model_fails_alone() {
    let r = registry(
        &[("good", 1), ("bad", 1)],
        vec![spec("good"), spec("bad"), spec("missing")],
        Limits::default(),
        |f| f.broken = vec!["bad".into()],
    );
    let e = r.acquire("bad").await.err().unwrap();
    assert_eq!(e.to_string(), "the model `bad` failed to load: bad: not a GGUF file");
    assert_eq!(r.info("bad").unwrap().state, State::Failed("bad: not a GGUF file".into()));
    assert!(r.acquire("good").await.is_ok());
    assert!(r.acquire("bad").await.is_err());
    assert_eq!(loads(&r, "bad"), 2);
    assert!(matches!(r.acquire("missing").await, Err(RegistryError::LoadFailed { .. })));
    assert_eq!(r.counts().load_failures, 2);
}

/// An unload waits for the requests in flight (new ones wait for it); a forced one aborts them first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unload_waits_for_requests_or_aborts_them() {
    let r = registry(&[("a", 1)], vec![spec("a")], Limits::default(), |_| {});
    let held = r.acquire("a").await.unwrap();
    let r2 = r.clone();
    let unloading = tokio::spawn(async move { r2.unload("a", false).await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(r.info("a").unwrap().state, State::Unloading);
    assert!(!unloading.is_finished());
    drop(held);
    unloading.await.unwrap().unwrap();
    assert_eq!(r.info("a").unwrap().state, State::Unloaded);
    assert_eq!(r.loader().live.load(Ordering::SeqCst), 0);
    // Forced: the loader is told to abort; the request's lease then goes.
    let held = r.acquire("a").await.unwrap();
    let r2 = r.clone();
    let unloading = tokio::spawn(async move { r2.unload("a", true).await });
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(r.loader().aborted.load(Ordering::SeqCst), 1);
    drop(held);
    unloading.await.unwrap().unwrap();
    assert_eq!(r.counts().unloads, 2);
    // Preload loads what is marked.
    let r = registry(
        &[("x", 1), ("y", 1)],
        vec![ModelSpec { preload: true, ..spec("x") }, spec("y")],
        Limits::default(),
        |_| {},
    );
    assert!(r.preload().await.is_empty());
    assert_eq!(states(&r), vec![("x".into(), "loaded"), ("y".into(), "unloaded")]);
}

/// Steady traffic on a loaded model does not starve a request for another one under a one-model budget: once
/// a request waits for room, new requests for the model in the way wait too, and the models take turns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_in_steady_use_makes_way_in_turn() {
    let limits = Limits { memory_budget: Some(15), wait_for_room: Duration::from_secs(30), ..Limits::default() };
    let r = registry(&[("a", 10), ("b", 10)], vec![spec("a"), spec("b")], limits, |_| {});
    let a1 = r.acquire("a").await.unwrap();
    let rb = r.clone();
    let b = tokio::spawn(async move { rb.acquire("b").await.map(|l| l.name()) });
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!b.is_finished(), "b waits while a is in use");
    // A new request for `a` now waits too, instead of keeping `a` busy forever.
    let ra = r.clone();
    let a2 = tokio::spawn(async move { ra.acquire("a").await.map(|l| l.name()) });
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!a2.is_finished(), "a new request for a draining model waits");
    assert_eq!(r.info("a").unwrap().state, State::Loaded);
    drop(a1);
    assert_eq!(b.await.unwrap().unwrap(), "b");
    assert_eq!(a2.await.unwrap().unwrap(), "a", "then a loads again in its turn");
    assert_eq!((loads(&r, "a"), loads(&r, "b")), (2, 1));
}

/// A request that gives up waiting for room withdraws its ask: the model it wanted out serves again at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_withdrawn_wait_stops_the_drain() {
    let limits = Limits { memory_budget: Some(15), wait_for_room: Duration::from_millis(100), ..Limits::default() };
    let r = registry(&[("a", 10), ("b", 10)], vec![spec("a"), spec("b")], limits, |_| {});
    let a1 = r.acquire("a").await.unwrap();
    assert!(matches!(r.acquire("b").await, Err(RegistryError::NoRoom(_))));
    let a2 = tokio::time::timeout(Duration::from_secs(1), r.acquire("a")).await.expect("not draining").unwrap();
    // A cancelled waiter (a client that went away) withdraws too.
    let rb = r.clone();
    let b = tokio::spawn(async move { rb.acquire("b").await.map(drop) });
    tokio::time::sleep(Duration::from_millis(30)).await;
    b.abort();
    let _ = b.await;
    let a3 = tokio::time::timeout(Duration::from_secs(1), r.acquire("a")).await.expect("not draining").unwrap();
    drop((a1, a2, a3));
    assert_eq!(loads(&r, "b"), 0);
}

/// A model registered at run time loads, and takes part in eviction, like a configured one; taken names are
/// refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_registered_at_run_time_load_and_make_room() {
    let limits = Limits { memory_budget: Some(15), ..Limits::default() };
    let r = registry(&[("a", 10), ("b", 10)], vec![spec("a")], limits, |_| {});
    r.load("a").await.unwrap();
    assert!(matches!(r.register(spec("a"), "b".into()), Err(RegistryError::Exists(n)) if n == "a"));
    let dup = ModelSpec { aliases: vec!["x".into(), "x".into()], ..spec("b") };
    assert!(matches!(r.register(dup, "b".into()), Err(RegistryError::Exists(n)) if n == "x"));
    assert!(matches!(r.register(spec(""), "b".into()), Err(RegistryError::Exists(_))));
    r.register(ModelSpec { aliases: vec!["beta".into()], ..spec("b") }, "b".into()).unwrap();
    assert_eq!(states(&r), vec![("a".into(), "loaded"), ("b".into(), "unloaded")]);
    assert_eq!(r.config("beta").as_deref(), Some(&"b".to_string()));
    let lease = r.acquire("beta").await.unwrap();
    assert_eq!(lease.name(), "b");
    assert_eq!(states(&r), vec![("a".into(), "unloaded"), ("b".into(), "loaded")]);
    assert!(matches!(r.register(ModelSpec { aliases: vec!["beta".into()], ..spec("c") }, "c".into()),
        Err(RegistryError::Exists(n)) if n == "beta"));
}
