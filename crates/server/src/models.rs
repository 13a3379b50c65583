//! The models a server answers for. The registry (`mlx_serving_services`) decides when a model loads and
//! unloads; here is what a loaded model is (its bundle and its own engine loop, KV cache and prefix
//! cache), how it loads and unloads, and how a request holds one: handlers take a [`ModelLease`] for the
//! model they name and keep it until their response is written, so a model is never unloaded under them.
//!
//! How a model is built from its files belongs to a [`ModelSource`] (the binary's: it knows formats and
//! engine settings); draft models for speculative decoding can be registered beside their target the same way.

use crate::error::ApiError;
use crate::metrics::ModelMetrics;
use mlx_serving_engine::EngineHandle;
use mlx_serving_models::ModelBundle;
use mlx_serving_services::{Lease, Loader, Registry, RegistryError};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Builds one model (blocking).
pub trait ModelSource: Send + Sync + 'static {
    /// Bytes the model will take loaded (weights and KV cache), known before loading it.
    fn estimate(&self) -> Result<u64, String>;
    /// Reads the model and starts its engine.
    fn load(&self) -> Result<LoadedModel, String>;
    /// Where the model comes from (its files, its draft), comparable between sources: registering a model
    /// again from the same place is not a conflict. `None`: not comparable.
    fn origin(&self) -> Option<String> {
        None
    }
}

/// What `POST /v1/models` asks for: a model to serve from files, under a new name.
#[derive(Clone, Debug, serde::Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Registration {
    /// The name requests will use.
    pub id: String,
    /// A GGUF file, a model directory, or a repository id in the local Hugging Face cache; `id` when absent.
    #[serde(default)]
    pub path: Option<String>,
    /// A draft model (same kinds of path) for speculative decoding.
    #[serde(default)]
    pub draft_model: Option<String>,
    #[serde(default)]
    pub aliases: Vec<String>,
    #[serde(default)]
    pub pinned: bool,
    #[serde(default)]
    pub ttl_seconds: Option<f64>,
    /// Load it now (the answer waits for the load); else it loads on its first request.
    #[serde(default = "yes")]
    pub load: bool,
}

fn yes() -> bool {
    true
}

/// Builds sources for models registered at run time (the binary's: it knows formats and engine settings).
pub trait ModelFactory: Send + Sync + std::fmt::Debug + 'static {
    /// A source for `r`, after checking that its files are there and readable (an error says what is wrong;
    /// nothing is loaded yet).
    /// The error names the field at fault (`path`, `draft_model`).
    fn source(&self, r: &Registration) -> Result<Box<dyn ModelSource>, (&'static str, String)>;
}

/// What a source builds: the model and its running engine.
pub struct LoadedModel {
    pub bundle: Arc<ModelBundle>,
    pub engine: EngineHandle,
    /// The engine loop's thread, joined at unload (it ends when the last handle is dropped); `None` for an
    /// engine owned elsewhere.
    pub engine_thread: Option<JoinHandle<()>>,
}

/// One registered model: its name, where it comes from, and its series (which outlive its loads).
pub struct ModelConfig {
    pub name: String,
    pub source: Box<dyn ModelSource>,
    pub metrics: Arc<ModelMetrics>,
}

/// A loaded model as requests use it.
pub struct ServedModel {
    /// The registered name (requests may have used an alias).
    pub name: String,
    pub engine: EngineHandle,
    pub bundle: Arc<ModelBundle>,
    pub metrics: Arc<ModelMetrics>,
    /// A forced unload began: requests not yet submitted are refused.
    closing: AtomicBool,
    /// The vocabulary for constrained decoding, built on the first request that asks for a constraint.
    constraint_vocab: OnceLock<Result<Arc<mlx_serving_constraints::Vocab>, String>>,
    engine_thread: Option<JoinHandle<()>>,
}

impl ServedModel {
    pub fn new(name: String, loaded: LoadedModel, metrics: Arc<ModelMetrics>) -> Self {
        Self {
            name,
            engine: loaded.engine,
            bundle: loaded.bundle,
            metrics,
            closing: AtomicBool::new(false),
            constraint_vocab: OnceLock::new(),
            engine_thread: loaded.engine_thread,
        }
    }

    /// The constraint compiler's view of the model (built once; blocking: call it on the CPU pool).
    pub(crate) fn constraint_vocab(&self) -> Result<Arc<mlx_serving_constraints::Vocab>, String> {
        self.constraint_vocab
            .get_or_init(|| mlx_serving_constraints::Vocab::for_model(&self.bundle).map(Arc::new).map_err(|e| e.0))
            .clone()
    }

    pub(crate) fn closing(&self) -> bool {
        self.closing.load(Ordering::SeqCst)
    }
}

/// The registry's loader for served models.
pub struct ServeLoader;

/// How long an unload waits for the engine thread to end before leaving it to end by itself.
const ENGINE_JOIN_LIMIT: Duration = Duration::from_secs(10);

impl Loader for ServeLoader {
    type Config = ModelConfig;
    type Model = ServedModel;

    fn estimate(&self, cfg: &ModelConfig) -> Result<u64, String> {
        cfg.source.estimate()
    }

    fn load(&self, cfg: &ModelConfig) -> Result<ServedModel, String> {
        let started = Instant::now();
        tracing::info!(model = %cfg.name, "loading model");
        match cfg.source.load() {
            Ok(loaded) => {
                let took = started.elapsed();
                cfg.metrics.loads.fetch_add(1, Ordering::Relaxed);
                cfg.metrics.load_seconds.observe(took);
                tracing::info!(model = %cfg.name, seconds = took.as_secs_f64(), "model loaded");
                Ok(ServedModel::new(cfg.name.clone(), loaded, cfg.metrics.clone()))
            }
            Err(e) => {
                cfg.metrics.load_failures.fetch_add(1, Ordering::Relaxed);
                tracing::error!(model = %cfg.name, error = %e, "model failed to load");
                Err(e)
            }
        }
    }

    fn abort_all(&self, model: &ServedModel) {
        model.closing.store(true, Ordering::SeqCst);
        model.engine.abort_all();
    }

    fn unload(&self, mut model: ServedModel) {
        let (name, metrics, thread) = (model.name.clone(), model.metrics.clone(), model.engine_thread.take());
        // The last engine handle goes with the model; the loop sees its channel close and returns.
        drop(model);
        if let Some(thread) = thread {
            let started = Instant::now();
            while !thread.is_finished() && started.elapsed() < ENGINE_JOIN_LIMIT {
                std::thread::sleep(Duration::from_millis(5));
            }
            if thread.is_finished() {
                let _ = thread.join();
            } else {
                tracing::warn!(model = %name, "the engine loop did not stop after its model was unloaded");
            }
        }
        metrics.unloads.fetch_add(1, Ordering::Relaxed);
        tracing::info!(model = %name, "model unloaded");
    }
}

pub type Models = Registry<ServeLoader>;
pub type ModelLease = Lease<ServeLoader>;

/// A source for a model built before the server starts (tests, embedders): "loading" hands out the same
/// bundle and engine again, and unloading leaves the engine running for its owner.
pub struct Prebuilt {
    pub bundle: Arc<ModelBundle>,
    pub engine: EngineHandle,
}

impl ModelSource for Prebuilt {
    fn estimate(&self) -> Result<u64, String> {
        Ok(0)
    }

    fn load(&self) -> Result<LoadedModel, String> {
        Ok(LoadedModel { bundle: self.bundle.clone(), engine: self.engine.clone(), engine_thread: None })
    }
}

/// The API error for a registry refusal.
pub(crate) fn registry_error(e: RegistryError) -> ApiError {
    match e {
        RegistryError::NotFound(name) => ApiError::model_not_found(&name),
        RegistryError::NoRoom(_) | RegistryError::Unloaded(_) => ApiError::unavailable(e.to_string(), "model_busy"),
        RegistryError::LoadFailed { .. } => ApiError::server(e.to_string(), "model_load_failed"),
        RegistryError::TooLarge { .. } => ApiError::server(e.to_string(), "model_too_large"),
        RegistryError::Exists(_) => ApiError::refused(axum::http::StatusCode::CONFLICT, e.to_string(), "model_exists"),
        RegistryError::Full => ApiError::refused(axum::http::StatusCode::CONFLICT, e.to_string(), "too_many_models"),
    }
}
