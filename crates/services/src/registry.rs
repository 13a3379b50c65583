//! The model registry: every configured model by name and alias, loaded on its first request (one load
//! however many requests wait for it), unloaded least-recently-used first when the memory budget or the
//! loaded-model limit needs room, and after its idle time (TTL). A model with requests in flight is never
//! unloaded under them: a request holds a [`Lease`] for as long as it runs. A request that waits for room
//! asks the models in its way to drain (new requests for them wait), so that a model in steady use still
//! makes way in turn instead of starving the others.
//!
//! What a model is, how it loads and how big it is belongs to the [`Loader`]; the registry only schedules.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// Loads and releases models (the server's loader builds a bundle and an engine).
pub trait Loader: Send + Sync + 'static {
    /// What the registry holds per configured model (a path, engine settings).
    type Config: Send + Sync + 'static;
    /// A loaded model, shared by the requests that use it.
    type Model: Send + Sync + 'static;
    /// Bytes the model will take once loaded (weights and KV cache), known before loading.
    fn estimate(&self, cfg: &Self::Config) -> Result<u64, String>;
    /// Loads the model (blocking; the registry calls it on a blocking thread).
    fn load(&self, cfg: &Self::Config) -> Result<Self::Model, String>;
    /// Ends every request of `model` now (a forced unload); the leases they hold then drop.
    fn abort_all(&self, _model: &Self::Model) {}
    /// Releases a model no request holds any more (blocking).
    fn unload(&self, model: Self::Model) {
        drop(model)
    }
}

/// How one model is registered.
#[derive(Clone, Debug, Default)]
pub struct ModelSpec {
    pub name: String,
    pub aliases: Vec<String>,
    /// Never unloaded to make room or by TTL (an explicit unload still works).
    pub pinned: bool,
    /// Idle time after which the model unloads by itself; `None` keeps it.
    pub ttl: Option<Duration>,
    /// Load at start.
    pub preload: bool,
}

/// Registry-wide limits.
#[derive(Clone, Debug)]
pub struct Limits {
    pub max_loaded: Option<usize>,
    /// Bytes that loaded models (and those loading) may take together.
    pub memory_budget: Option<u64>,
    /// How long a request waits for room (models in use to finish) before it is refused.
    pub wait_for_room: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self { max_loaded: None, memory_budget: None, wait_for_room: Duration::ZERO }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum State {
    Unloaded,
    Loading,
    Loaded,
    Unloading,
    /// The last load failed, with this error; the next explicit load (or request) tries again.
    Failed(String),
}

impl State {
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Unloaded => "unloaded",
            Self::Loading => "loading",
            Self::Loaded => "loaded",
            Self::Unloading => "unloading",
            Self::Failed(_) => "failed",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    #[error("the model `{0}` does not exist")]
    NotFound(String),
    #[error("the model `{name}` failed to load: {reason}")]
    LoadFailed { name: String, reason: String },
    #[error("the model `{name}` needs {need} bytes, more than the whole memory budget ({budget})")]
    TooLarge { name: String, need: u64, budget: u64 },
    /// Every loaded model is in use or pinned: the caller answers 503 with `Retry-After`.
    #[error("no room to load `{0}`: every loaded model is pinned or in use")]
    NoRoom(String),
    #[error("the model `{0}` was unloaded while the request waited")]
    Unloaded(String),
    /// A registration whose name or alias is taken.
    #[error("the name `{0}` is already registered")]
    Exists(String),
    /// A registration beyond [`MAX_MODELS`].
    #[error("no more models can be registered (at most {MAX_MODELS})")]
    Full,
}

/// Most models one registry holds (configured and registered at run time together).
pub const MAX_MODELS: usize = 1024;

/// A model's state as the admin API and `/v1/models` show it.
#[derive(Clone, Debug)]
pub struct ModelInfo {
    pub name: String,
    pub aliases: Vec<String>,
    pub state: State,
    pub pinned: bool,
    pub ttl: Option<Duration>,
    /// Bytes it takes (or will take, while loading); 0 when unloaded.
    pub memory: u64,
    pub load_time: Option<Duration>,
    pub last_use: Option<Instant>,
    pub in_flight: usize,
}

/// Counters for `/metrics`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub loads: u64,
    pub load_failures: u64,
    pub unloads: u64,
}

struct Entry<C, M> {
    spec: ModelSpec,
    cfg: Arc<C>,
    state: State,
    model: Option<Arc<M>>,
    memory: u64,
    in_flight: usize,
    /// Requests waiting for room that need this model out: while any does, new requests for it wait
    /// instead of extending its use, so that a model under steady traffic still makes way in turn.
    drain: usize,
    last_use: Option<Instant>,
    load_time: Option<Duration>,
}

impl<C, M> Entry<C, M> {
    /// A model registered and not loaded yet.
    fn unloaded(spec: ModelSpec, cfg: C) -> Self {
        Self {
            spec,
            cfg: Arc::new(cfg),
            state: State::Unloaded,
            model: None,
            memory: 0,
            in_flight: 0,
            drain: 0,
            last_use: None,
            load_time: None,
        }
    }
}

struct Inner<C, M> {
    entries: Vec<Entry<C, M>>,
    counts: Counts,
}

/// The registry (see the module header). Shared as `Arc<Registry<L>>`.
pub struct Registry<L: Loader> {
    loader: Arc<L>,
    limits: Limits,
    inner: Mutex<Inner<L::Config, L::Model>>,
    /// Bumped on every change that a waiting request may care about.
    changed: watch::Sender<u64>,
}

/// A request's hold on a loaded model: the model stays loaded until every lease on it is dropped.
pub struct Lease<L: Loader> {
    registry: Arc<Registry<L>>,
    index: usize,
    model: Arc<L::Model>,
}

impl<L: Loader> Lease<L> {
    pub fn model(&self) -> &Arc<L::Model> {
        &self.model
    }

    /// The model's registered name (also when it was asked for by an alias).
    pub fn name(&self) -> String {
        self.registry.lock().entries[self.index].spec.name.clone()
    }
}

impl<L: Loader> Drop for Lease<L> {
    fn drop(&mut self) {
        let mut g = self.registry.lock();
        let e = &mut g.entries[self.index];
        e.in_flight -= 1;
        e.last_use = Some(Instant::now());
        drop(g);
        self.registry.bump();
    }
}

/// The models a request waiting for room has asked to drain (see `Entry::drain`); dropping it withdraws the
/// ask, also when the request is cancelled.
struct Drain<L: Loader> {
    registry: Arc<Registry<L>>,
    entries: Vec<usize>,
}

impl<L: Loader> Drain<L> {
    fn new(registry: &Arc<Registry<L>>) -> Self {
        Self { registry: registry.clone(), entries: Vec::new() }
    }

    /// Asks the loaded, unpinned models that would make room for entry `i` now (least recently used first,
    /// in use or not) to drain, instead of those asked before.
    fn set(&mut self, g: &mut Inner<L::Config, L::Model>, i: usize) {
        for &j in &self.entries {
            g.entries[j].drain -= 1;
        }
        self.entries.clear();
        let registry = &self.registry;
        let need = g.entries[i].memory.max(registry.loader.estimate(&g.entries[i].cfg).unwrap_or(0));
        let occupying =
            |e: &Entry<L::Config, L::Model>| matches!(e.state, State::Loaded | State::Loading | State::Unloading);
        let mut used: u64 = g.entries.iter().filter(|e| occupying(e)).map(|e| e.memory).sum();
        let mut count = g.entries.iter().filter(|e| occupying(e)).count();
        let limits = &registry.limits;
        let fits = |used: u64, count: usize| {
            limits.memory_budget.is_none_or(|b| used + need <= b) && limits.max_loaded.is_none_or(|m| count < m)
        };
        let mut candidates: Vec<usize> = (0..g.entries.len())
            .filter(|&j| j != i && g.entries[j].state == State::Loaded && !g.entries[j].spec.pinned)
            .collect();
        candidates.sort_by_key(|&j| g.entries[j].last_use);
        for j in candidates {
            if fits(used, count) {
                break;
            }
            g.entries[j].drain += 1;
            self.entries.push(j);
            used -= g.entries[j].memory;
            count -= 1;
        }
    }
}

impl<L: Loader> Drop for Drain<L> {
    fn drop(&mut self) {
        if self.entries.is_empty() {
            return;
        }
        let mut g = self.registry.lock();
        for &j in &self.entries {
            g.entries[j].drain -= 1;
        }
        drop(g);
        self.registry.bump();
    }
}

/// Models to unload before a load: (entry index, the model).
type Victims<M> = Vec<(usize, Arc<M>)>;

/// What `acquire` decided under the lock.
enum Step<M> {
    Ready(Arc<M>),
    Wait,
    /// Load it, after unloading these (index, model).
    Load(Victims<M>),
}

impl<L: Loader> Registry<L> {
    /// Registers `models` (names and aliases must be unique: the first wins otherwise).
    pub fn new(loader: L, models: Vec<(ModelSpec, L::Config)>, limits: Limits) -> Arc<Self> {
        let entries = models.into_iter().map(|(spec, cfg)| Entry::unloaded(spec, cfg)).collect();
        let inner = Inner { entries, counts: Counts::default() };
        Arc::new(Self { loader: Arc::new(loader), limits, inner: Mutex::new(inner), changed: watch::channel(0).0 })
    }

    fn lock(&self) -> MutexGuard<'_, Inner<L::Config, L::Model>> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn bump(&self) {
        self.changed.send_modify(|v| *v += 1);
    }

    fn index(g: &Inner<L::Config, L::Model>, name: &str) -> Option<usize> {
        g.entries
            .iter()
            .position(|e| e.spec.name == name)
            .or_else(|| g.entries.iter().position(|e| e.spec.aliases.iter().any(|a| a == name)))
    }

    pub fn loader(&self) -> &L {
        &self.loader
    }

    /// Every model, in registration order.
    pub fn list(&self) -> Vec<ModelInfo> {
        self.lock().entries.iter().map(info).collect()
    }

    pub fn info(&self, name: &str) -> Option<ModelInfo> {
        let g = self.lock();
        Self::index(&g, name).map(|i| info(&g.entries[i]))
    }

    pub fn counts(&self) -> Counts {
        self.lock().counts.clone()
    }

    /// The configuration `name` (or alias) was registered with.
    pub fn config(&self, name: &str) -> Option<Arc<L::Config>> {
        let g = self.lock();
        Self::index(&g, name).map(|i| g.entries[i].cfg.clone())
    }

    /// Registers one more model at run time (unloaded; it loads on its first request or [`Registry::load`]).
    /// Its name and aliases must be new and non-empty.
    pub fn register(&self, spec: ModelSpec, cfg: L::Config) -> Result<(), RegistryError> {
        let mut g = self.lock();
        let mut seen = std::collections::HashSet::new();
        for n in std::iter::once(&spec.name).chain(&spec.aliases) {
            let taken = g.entries.iter().any(|e| e.spec.name == *n || e.spec.aliases.contains(n));
            if n.is_empty() || taken || !seen.insert(n) {
                return Err(RegistryError::Exists(n.clone()));
            }
        }
        if g.entries.len() >= MAX_MODELS {
            return Err(RegistryError::Full);
        }
        g.entries.push(Entry::unloaded(spec, cfg));
        drop(g);
        self.bump();
        Ok(())
    }

    /// Marks `name` loaded with `model`, built elsewhere (at start, or by a test), taking `memory` bytes of the
    /// budget. Fails for an unknown name; replaces nothing (a model already loaded keeps its instance).
    pub fn adopt(&self, name: &str, model: L::Model, memory: u64) -> Result<(), RegistryError> {
        let mut g = self.lock();
        let i = Self::index(&g, name).ok_or_else(|| RegistryError::NotFound(name.to_string()))?;
        let e = &mut g.entries[i];
        if matches!(e.state, State::Unloaded | State::Failed(_)) {
            e.state = State::Loaded;
            e.model = Some(Arc::new(model));
            e.memory = memory;
            e.last_use = Some(Instant::now());
        }
        drop(g);
        self.bump();
        Ok(())
    }

    /// Every loaded model with its name, without using them (no lease, no change to last use): for metrics
    /// and health checks. Holding one delays its unload, so drop them soon.
    pub fn loaded(&self) -> Vec<(String, Arc<L::Model>)> {
        self.lock().entries.iter().filter_map(|e| Some((e.spec.name.clone(), e.model.clone()?))).collect()
    }

    /// The model `name` (or alias), loading it first if needed; the lease keeps it loaded.
    pub async fn acquire(self: &Arc<Self>, name: &str) -> Result<Lease<L>, RegistryError> {
        let deadline = Instant::now() + self.limits.wait_for_room;
        // Set while this request waits for room: the models it needs out; released however this ends.
        let mut draining: Option<Drain<L>> = None;
        loop {
            let mut rx = self.changed.subscribe();
            let (index, step) = {
                let mut g = self.lock();
                let i = Self::index(&g, name).ok_or_else(|| RegistryError::NotFound(name.to_string()))?;
                let step = match g.entries[i].state.clone() {
                    State::Loaded if g.entries[i].drain > 0 => Step::Wait,
                    State::Loaded => {
                        let e = &mut g.entries[i];
                        e.in_flight += 1;
                        e.last_use = Some(Instant::now());
                        Step::Ready(e.model.clone().expect("a loaded model"))
                    }
                    State::Loading | State::Unloading => Step::Wait,
                    State::Unloaded | State::Failed(_) => match self.make_room(&mut g, i)? {
                        Some(victims) => {
                            let e = &mut g.entries[i];
                            e.state = State::Loading;
                            Step::Load(victims)
                        }
                        None if Instant::now() >= deadline => {
                            return Err(RegistryError::NoRoom(g.entries[i].spec.name.clone()))
                        }
                        None => {
                            draining.get_or_insert_with(|| Drain::new(self)).set(&mut g, i);
                            Step::Wait
                        }
                    },
                };
                (i, step)
            };
            match step {
                Step::Ready(model) => return Ok(Lease { registry: self.clone(), index, model }),
                Step::Wait => {
                    // Woken by any change; a wait for room ends at the deadline.
                    let left = deadline.saturating_duration_since(Instant::now());
                    let waiting_for_room =
                        matches!(self.lock().entries[index].state, State::Unloaded | State::Failed(_));
                    if waiting_for_room {
                        let _ = tokio::time::timeout(left.max(Duration::from_millis(1)), rx.changed()).await;
                    } else {
                        let _ = rx.changed().await;
                    }
                }
                Step::Load(victims) => {
                    drop(draining.take());
                    return self.load_now(index, victims).await;
                }
            }
        }
    }

    /// Room for entry `i` (its estimate in the budget, one more loaded model): `Some(victims)` to unload first
    /// (marked unloading here), `None` when the models in the way are in use or pinned now.
    fn make_room(
        &self,
        g: &mut Inner<L::Config, L::Model>,
        i: usize,
    ) -> Result<Option<Victims<L::Model>>, RegistryError> {
        let name = g.entries[i].spec.name.clone();
        let need = self
            .loader
            .estimate(&g.entries[i].cfg)
            .map_err(|reason| RegistryError::LoadFailed { name: name.clone(), reason })?;
        if let Some(budget) = self.limits.memory_budget {
            if need > budget {
                return Err(RegistryError::TooLarge { name, need, budget });
            }
        }
        let occupying =
            |e: &Entry<L::Config, L::Model>| matches!(e.state, State::Loaded | State::Loading | State::Unloading);
        let mut used: u64 = g.entries.iter().filter(|e| occupying(e)).map(|e| e.memory).sum();
        let mut count = g.entries.iter().filter(|e| occupying(e)).count();
        let fits = |used: u64, count: usize| {
            self.limits.memory_budget.is_none_or(|b| used + need <= b)
                && self.limits.max_loaded.is_none_or(|m| count < m)
        };
        // Least recently used first, among loaded models nobody uses that are not pinned.
        let mut candidates: Vec<usize> = (0..g.entries.len())
            .filter(|&j| {
                let e = &g.entries[j];
                j != i && e.state == State::Loaded && e.in_flight == 0 && !e.spec.pinned
            })
            .collect();
        candidates.sort_by_key(|&j| g.entries[j].last_use);
        let mut victims = Vec::new();
        for j in candidates {
            if fits(used, count) {
                break;
            }
            victims.push(j);
            used -= g.entries[j].memory;
            count -= 1;
        }
        if !fits(used, count) {
            return Ok(None);
        }
        g.entries[i].memory = need;
        Ok(Some(
            victims
                .into_iter()
                .map(|j| {
                    let e = &mut g.entries[j];
                    e.state = State::Unloading;
                    (j, e.model.take().expect("a loaded model"))
                })
                .collect(),
        ))
    }

    /// Unloads `victims`, then loads entry `index` (marked loading) and hands out the first lease.
    async fn load_now(
        self: &Arc<Self>,
        index: usize,
        victims: Vec<(usize, Arc<L::Model>)>,
    ) -> Result<Lease<L>, RegistryError> {
        for (j, model) in victims {
            self.finish_unload(j, model).await;
        }
        let (loader, cfg) = (self.loader.clone(), self.lock().entries[index].cfg.clone());
        let started = Instant::now();
        let result = tokio::task::spawn_blocking(move || loader.load(&cfg))
            .await
            .unwrap_or_else(|e| Err(format!("the loading thread failed: {e}")));
        let took = started.elapsed();
        let mut g = self.lock();
        let out = match result {
            Ok(model) => {
                let model = Arc::new(model);
                g.counts.loads += 1;
                let e = &mut g.entries[index];
                e.state = State::Loaded;
                e.model = Some(model.clone());
                e.load_time = Some(took);
                e.in_flight += 1;
                e.last_use = Some(Instant::now());
                Ok(Lease { registry: self.clone(), index, model })
            }
            Err(reason) => {
                g.counts.load_failures += 1;
                let e = &mut g.entries[index];
                e.state = State::Failed(reason.clone());
                e.memory = 0;
                Err(RegistryError::LoadFailed { name: e.spec.name.clone(), reason })
            }
        };
        drop(g);
        self.bump();
        out
    }

    /// Waits until nobody else holds `model` (entry `j`, marked unloading), then releases it.
    async fn finish_unload(&self, j: usize, model: Arc<L::Model>) {
        let mut model = model;
        let owned = loop {
            match Arc::try_unwrap(model) {
                Ok(m) => break m,
                Err(shared) => {
                    model = shared;
                    let mut rx = self.changed.subscribe();
                    if self.lock().entries[j].in_flight > 0 {
                        let _ = rx.changed().await;
                    } else {
                        // Leases are gone but a clone is still in flight elsewhere (a response being written).
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
            }
        };
        let loader = self.loader.clone();
        let _ = tokio::task::spawn_blocking(move || loader.unload(owned)).await;
        let mut g = self.lock();
        g.counts.unloads += 1;
        let e = &mut g.entries[j];
        e.state = State::Unloaded;
        e.memory = 0;
        drop(g);
        self.bump();
    }

    /// Loads `name` now (admin), as a request would; returns once it is loaded.
    pub async fn load(self: &Arc<Self>, name: &str) -> Result<(), RegistryError> {
        self.acquire(name).await.map(drop)
    }

    /// Unloads `name` (admin): new requests wait; with `force` the requests in flight are aborted, else
    /// they finish first. A no-op for a model that is not loaded.
    pub async fn unload(self: &Arc<Self>, name: &str, force: bool) -> Result<(), RegistryError> {
        let (j, model) = {
            let mut g = self.lock();
            let j = Self::index(&g, name).ok_or_else(|| RegistryError::NotFound(name.to_string()))?;
            let e = &mut g.entries[j];
            if e.state != State::Loaded {
                return Ok(());
            }
            e.state = State::Unloading;
            (j, e.model.take().expect("a loaded model"))
        };
        self.bump();
        if force {
            self.loader.abort_all(&model);
        }
        self.finish_unload(j, model).await;
        Ok(())
    }

    /// Unloads every loaded, unpinned, idle model whose TTL has passed at `now`; returns their names.
    pub async fn unload_idle(self: &Arc<Self>, now: Instant) -> Vec<String> {
        let expired: Vec<String> = self
            .lock()
            .entries
            .iter()
            .filter(|e| {
                e.state == State::Loaded
                    && e.in_flight == 0
                    && !e.spec.pinned
                    && e.spec.ttl.zip(e.last_use).is_some_and(|(ttl, last)| now.saturating_duration_since(last) >= ttl)
            })
            .map(|e| e.spec.name.clone())
            .collect();
        for name in &expired {
            let _ = self.unload(name, false).await;
        }
        expired
    }

    /// Loads every model marked `preload`; returns the failures.
    pub async fn preload(self: &Arc<Self>) -> Vec<RegistryError> {
        let names: Vec<String> =
            self.lock().entries.iter().filter(|e| e.spec.preload).map(|e| e.spec.name.clone()).collect();
        let mut errors = Vec::new();
        for n in names {
            if let Err(e) = self.load(&n).await {
                errors.push(e);
            }
        }
        errors
    }
}

fn info<C, M>(e: &Entry<C, M>) -> ModelInfo {
    ModelInfo {
        name: e.spec.name.clone(),
        aliases: e.spec.aliases.clone(),
        state: e.state.clone(),
        pinned: e.spec.pinned,
        ttl: e.spec.ttl,
        memory: if e.state == State::Unloaded { 0 } else { e.memory },
        load_time: e.load_time,
        last_use: e.last_use,
        in_flight: e.in_flight,
    }
}
