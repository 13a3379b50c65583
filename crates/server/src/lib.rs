//! The OpenAI-compatible HTTP API (axum): routes, the JSON extractor, SSE streaming, and the one place
//! errors become OpenAI error envelopes.
//!
//! Talks to the engine only through its `EngineHandle`. Every request gets an abort guard whose `Drop`
//! aborts it in the engine, so a client that goes away frees its KV blocks.
//! Must not know about: tensors, scheduling internals.

mod admin;
mod cache;
mod driver;
mod error;
#[doc(hidden)]
pub mod fuzzing;
mod generate;
pub mod images;
mod json;
pub mod metrics;
pub mod models;
pub mod openapi;
mod params;
mod prompts;
mod respond;
mod serve;
mod shared;
mod structured;
mod tools;

pub use error::ApiError;
pub use mlx_serving_http::{ConnLimits, MIN_HEADER_BYTES};
pub use mlx_serving_services::{Limits, ModelSpec, RegistryError};
pub use params::MAX_N;
pub use prompts::MAX_CHOICES;
pub use serve::serve;

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use metrics::{Metrics, ModelMetrics};
use mlx_serving_engine::EngineHandle;
use mlx_serving_models::ModelBundle;
use mlx_serving_services::Registry;
use models::{LoadedModel, ModelConfig, ModelLease, ModelSource, Models, ServeLoader, ServedModel};
use serde_json::json;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::Instrument;

/// Default for the largest request body accepted.
pub const MAX_BODY_BYTES: usize = 8 << 20;

/// A heartbeat older than this makes `/health` answer 503.
pub const HEARTBEAT_LIMIT: Duration = Duration::from_secs(10);

/// Server settings that are not the engine's.
#[derive(Clone, Debug)]
pub struct ServerOptions {
    /// Accepted bearer tokens for `/v1/*`, `/tokenize` and `/detokenize`; empty means no authentication.
    pub api_keys: Vec<String>,
    /// Origins allowed by CORS (`*` for any); empty means no CORS headers.
    pub cors_allowed_origins: Vec<String>,
    pub max_body_bytes: usize,
    /// Requests unfinished this long after arrival end with a timeout error (504).
    pub request_timeout: Option<Duration>,
    /// Most tokens in one prompt (beyond: 400 `prompt_too_long`); `None`: the model's context length.
    pub max_prompt_tokens: Option<usize>,
    /// Most completion tokens one request may ask for, `max_tokens` × its choices (prompts × `n`); beyond:
    /// 400 `too_many_tokens`. A request without `max_tokens` gets at most this divided among its choices.
    pub max_tokens_per_request: Option<usize>,
    /// Connections: how many at once, how long a request head may take, how large it may be.
    pub conn: mlx_serving_http::ConnLimits,
    /// A request body not received whole this long after its head ends with a 408 (and the connection
    /// closes), so trickled bodies cannot hold connection slots.
    pub body_read_timeout: Duration,
    /// A stream with nothing to send for this long sends an SSE comment (`: keep-alive`).
    pub sse_keepalive: Duration,
    /// Tokenize special-token texts inside chat messages as control tokens (lets a message forge turns).
    pub allow_special_tokens_in_chat: bool,
    /// Threads that tokenize, render templates and build large responses at once (the CPU pool), so that
    /// this work never runs on the async threads that answer `/health` and stream tokens.
    pub cpu_workers: usize,
    /// Identical deterministic requests in flight at once share one generation (they never change an answer).
    pub coalescing: bool,
    /// Where finished deterministic answers are kept and served from (`x-cache: hit`); none: no cache.
    pub response_cache: Option<Arc<dyn mlx_serving_services::CacheBackend>>,
    /// Requests under different API keys may share generations and cached answers.
    pub cache_shared_across_keys: bool,
    /// Most shared generations at once, and most requests sharing one; beyond, requests run on their own.
    pub max_coalesced: usize,
    pub max_coalesced_subscribers: usize,
    /// Images in chat messages: where they may come from, how large and how many.
    pub images: images::ImageOptions,
    /// Builds models registered at run time (`POST /v1/models`); `None`: registration is refused (403).
    pub model_factory: Option<Arc<dyn models::ModelFactory>>,
    /// Requests and tokens per minute for each API key (for all clients together without keys).
    pub rate_limits: mlx_serving_services::RateLimits,
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            api_keys: Vec::new(),
            cors_allowed_origins: Vec::new(),
            max_body_bytes: MAX_BODY_BYTES,
            request_timeout: None,
            conn: mlx_serving_http::ConnLimits::default(),
            max_prompt_tokens: None,
            max_tokens_per_request: None,
            body_read_timeout: Duration::from_secs(60),
            sse_keepalive: Duration::from_secs(15),
            allow_special_tokens_in_chat: false,
            // Leave a core to the engine and the async threads.
            cpu_workers: std::thread::available_parallelism().map_or(1, |n| n.get().saturating_sub(1).max(1)),
            coalescing: true,
            response_cache: None,
            cache_shared_across_keys: false,
            max_coalesced: 1024,
            max_coalesced_subscribers: 256,
            images: images::ImageOptions::default(),
            model_factory: None,
            rate_limits: mlx_serving_services::RateLimits::default(),
        }
    }
}

pub struct AppState {
    /// Every model this server answers for, loaded on demand.
    pub models: Arc<Models>,
    /// Each registered model's series, in registration order (they outlive loads and unloads).
    model_metrics: std::sync::Mutex<Vec<(String, Arc<ModelMetrics>)>>,
    pub created: u64,
    pub options: ServerOptions,
    pub metrics: Metrics,
    next_id: AtomicU64,
    /// Makes generated request ids differ between server runs.
    id_salt: u64,
    /// Permits of the CPU pool (see [`ServerOptions::cpu_workers`]).
    cpu_pool: Arc<tokio::sync::Semaphore>,
    /// Identical deterministic requests in flight, sharing one generation.
    pub(crate) coalescer: Arc<mlx_serving_services::Coalescer<driver::Piece>>,
    /// Bytes of preprocessed image pixels held by requests in flight (bounded by `images.max_pixel_bytes_in_flight`).
    pub(crate) image_bytes: Arc<std::sync::atomic::AtomicUsize>,
    /// Per-key request and token budgets (`options.rate_limits`).
    pub(crate) rate_limiter: mlx_serving_services::RateLimiter,
}

/// The request id every log line and the `x-request-id` response header carry: the client's own
/// `x-request-id` when it sent a sane one, else one we make.
#[derive(Clone, Debug)]
pub struct RequestCtx {
    pub id: Arc<str>,
    /// Which API key the request authenticated with (a hash of it), when keys are required: requests of
    /// different keys never share a generation.
    pub tenant: Option<u64>,
}

impl AppState {
    /// One model, already loaded and running (tests, embedders): registered under `model_name`, pinned.
    pub fn new(engine: EngineHandle, bundle: Arc<ModelBundle>, model_name: String) -> Self {
        Self::with_options(engine, bundle, model_name, ServerOptions::default())
    }

    pub fn with_options(
        engine: EngineHandle,
        bundle: Arc<ModelBundle>,
        model_name: String,
        options: ServerOptions,
    ) -> Self {
        let spec = ModelSpec { name: model_name.clone(), pinned: true, ..ModelSpec::default() };
        let source = models::Prebuilt { bundle: bundle.clone(), engine: engine.clone() };
        let state = Self::with_models(vec![(spec, Box::new(source))], Limits::default(), options);
        let metrics = state.model_metrics.lock().unwrap()[0].1.clone();
        let loaded = LoadedModel { bundle, engine, engine_thread: None };
        let model = ServedModel::new(model_name.clone(), loaded, metrics);
        state.models.adopt(&model_name, model, 0).expect("the model was just registered");
        state
    }

    /// Models registered and not loaded yet (those marked `preload` load when [`AppState::preload`] runs).
    pub fn with_models(models: Vec<(ModelSpec, Box<dyn ModelSource>)>, limits: Limits, options: ServerOptions) -> Self {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        let mut model_metrics = Vec::new();
        let configs = models
            .into_iter()
            .map(|(spec, source)| {
                let metrics = Arc::new(ModelMetrics::default());
                model_metrics.push((spec.name.clone(), metrics.clone()));
                let cfg = ModelConfig { name: spec.name.clone(), source, metrics };
                (spec, cfg)
            })
            .collect();
        Self {
            models: Registry::new(ServeLoader, configs, limits),
            model_metrics: std::sync::Mutex::new(model_metrics),
            created: now.as_secs(),
            metrics: Metrics::default(),
            next_id: AtomicU64::new(1),
            id_salt: (now.as_nanos() as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
            cpu_pool: Arc::new(tokio::sync::Semaphore::new(options.cpu_workers.max(1))),
            coalescer: mlx_serving_services::Coalescer::new(options.max_coalesced, options.max_coalesced_subscribers),
            image_bytes: Default::default(),
            rate_limiter: mlx_serving_services::RateLimiter::new(options.rate_limits),
            options,
        }
    }

    /// Registers one more model (unloaded), with its own series.
    pub fn register_model(
        &self,
        spec: ModelSpec,
        source: Box<dyn ModelSource>,
    ) -> Result<(), mlx_serving_services::RegistryError> {
        // Held across the registration: the series stay in the registry's order.
        let mut series = self.model_metrics.lock().unwrap_or_else(|e| e.into_inner());
        let metrics = Arc::new(ModelMetrics::default());
        self.models
            .register(spec.clone(), ModelConfig { name: spec.name.clone(), source, metrics: metrics.clone() })?;
        series.push((spec.name, metrics));
        Ok(())
    }

    /// Loads the models marked `preload`; returns the failures (the rest serve regardless).
    pub async fn preload(&self) -> Vec<mlx_serving_services::RegistryError> {
        self.models.preload().await
    }

    /// The model a request names (loading it first if needed), held until the lease is dropped.
    pub(crate) async fn lease(&self, name: &str) -> Result<Arc<ModelLease>, ApiError> {
        let lease = self.models.acquire(name).await.map_err(models::registry_error)?;
        if lease.model().closing() {
            return Err(ApiError::unavailable(format!("the model `{name}` is being unloaded"), "model_busy"));
        }
        Ok(Arc::new(lease))
    }

    /// A fresh number, unique within this server run.
    fn next_number(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    fn new_request_id(&self) -> String {
        let n = self.next_number();
        format!("{:016x}", n.wrapping_mul(0xD1B5_4A32_D192_ED03) ^ self.id_salt)
    }

    /// Runs CPU-heavy request work (tokenizing, template rendering, large response bodies) on a blocking
    /// thread, at most `cpu_workers` at once; the caller waits without holding an async thread. The permit
    /// travels with the work: a client that disconnects drops its handler, not the running work's slot.
    pub(crate) async fn on_cpu_pool<T: Send + 'static>(
        &self,
        request_id: &str,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, ApiError> {
        let permit = self.cpu_pool.clone().acquire_owned().await.expect("the CPU pool's semaphore is never closed");
        let work = move || {
            let out = f();
            drop(permit);
            out
        };
        tokio::task::spawn_blocking(work).await.map_err(|e| {
            tracing::error!(error = %e, "CPU pool task failed");
            ApiError::internal(request_id)
        })
    }

    /// Renders and tokenizes a chat (message text is text unless `allow_special_tokens_in_chat`) with the
    /// request's tools and, for a vision model, each image's placeholder ids for its tile grid (returning
    /// their spans). Tools: given to a template that renders them; for one that does not,
    /// described in a system message, with earlier calls and results written out as text.
    pub(crate) fn encode_chat_tools(
        &self,
        m: &ServedModel,
        mut messages: Vec<serde_json::Value>,
        tools: Option<&tools::Tools>,
        image_grids: &[(usize, usize)],
    ) -> Result<(Vec<u32>, Vec<std::ops::Range<usize>>), ApiError> {
        let content = if self.options.allow_special_tokens_in_chat {
            mlx_serving_models::ChatContent::ParseSpecial
        } else {
            mlx_serving_models::ChatContent::Text
        };
        let native = m.bundle.chat_template.as_ref().is_some_and(|t| t.renders_tools());
        let declared =
            tools.filter(|t| t.choice != tools::Choice::None).map(|t| serde_json::Value::from(t.declared.clone()));
        let declared = match (native, declared) {
            (true, d) => d,
            (false, d) => {
                tools::calls_as_text(&mut messages);
                if let Some(serde_json::Value::Array(list)) = &d {
                    tools::describe_in_system_message(&mut messages, list);
                }
                None
            }
        };
        let bad = |e: mlx_serving_models::Error| ApiError::bad_request(e.to_string(), Some("messages"));
        match m.bundle.vision.is_some() {
            true => m.bundle.encode_chat_with_images(&messages, declared.as_ref(), content, image_grids).map_err(bad),
            false => {
                Ok((m.bundle.encode_chat_with_tools(&messages, declared.as_ref(), content).map_err(bad)?, Vec::new()))
            }
        }
    }
}

pub fn router(state: Arc<AppState>) -> Router {
    // Routes behind the API key (when one is set). `/health` and `/metrics` stay open, as in vLLM.
    let api = Router::new()
        .route("/v1/models", get(admin::list_models).post(admin::register_model))
        .route("/v1/models/{id}", get(admin::get_model))
        .route("/v1/models/{id}/load", post(admin::load_model))
        .route("/v1/models/{id}/unload", post(admin::unload_model))
        .route("/api/ps", get(admin::ollama_ps))
        .route("/v1/completions", post(generate::completions))
        .route("/v1/chat/completions", post(generate::chat_completions))
        .route("/tokenize", post(prompts::tokenize))
        .route("/detokenize", post(prompts::detokenize))
        .route_layer(middleware::from_fn_with_state(state.clone(), authenticate));
    let mut app = Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics_text))
        .route("/openapi.json", get(openapi_json))
        .merge(api)
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(state.options.max_body_bytes));
    if !state.options.cors_allowed_origins.is_empty() {
        app = app.layer(cors(&state.options.cors_allowed_origins));
    }
    app.layer(middleware::from_fn_with_state(state.clone(), request_context)).with_state(state)
}

fn cors(origins: &[String]) -> tower_http::cors::CorsLayer {
    use tower_http::cors::{AllowOrigin, Any, CorsLayer};
    let layer = CorsLayer::new()
        .allow_methods([Method::GET, Method::POST, Method::OPTIONS])
        .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE, header::HeaderName::from_static("x-request-id")])
        .expose_headers([header::HeaderName::from_static("x-request-id")]);
    if origins.iter().any(|o| o == "*") {
        layer.allow_origin(Any)
    } else {
        layer.allow_origin(AllowOrigin::list(origins.iter().filter_map(|o| HeaderValue::from_str(o).ok())))
    }
}

/// Gives every request an id (and a tracing span carrying it), logs its outcome, counts its status, and
/// sets `x-request-id` on the response.
async fn request_context(State(s): State<Arc<AppState>>, mut req: Request, next: Next) -> Response {
    let id = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map(String::from)
        .unwrap_or_else(|| s.new_request_id());
    let span = tracing::info_span!("request", request_id = %id);
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    req.extensions_mut().insert(RequestCtx { id: id.clone().into(), tenant: None });
    let start = Instant::now();
    let mut resp = next.run(req).instrument(span.clone()).await;
    let status = resp.status().as_u16();
    s.metrics.response(status);
    span.in_scope(|| {
        let ms = start.elapsed().as_secs_f64() * 1e3;
        if status >= 500 {
            tracing::error!(%method, %path, status, ms, "response");
        } else {
            tracing::info!(%method, %path, status, ms, "response");
        }
    });
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert("x-request-id", v);
    }
    resp
}

/// `Authorization: Bearer KEY` against the configured keys (compared in constant time), then the key's request
/// budget (`rate_limits`; one budget for all clients when there are no keys): 429 with `Retry-After` when spent.
async fn authenticate(State(s): State<Arc<AppState>>, mut req: Request, next: Next) -> Response {
    if req.method() == Method::OPTIONS {
        return next.run(req).await;
    }
    let mut tenant = None;
    if !s.options.api_keys.is_empty() {
        let given = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| {
            let (scheme, key) = v.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| key.trim())
        });
        match given {
            Some(k) if s.options.api_keys.iter().any(|good| constant_time_eq(good.as_bytes(), k.as_bytes())) => {
                tenant = Some(tenant_of(k));
                if let Some(ctx) = req.extensions_mut().get_mut::<RequestCtx>() {
                    ctx.tenant = tenant;
                }
            }
            Some(_) => return ApiError::unauthorized("Incorrect API key provided.").into_response(),
            None => {
                return ApiError::unauthorized("Missing API key: send `Authorization: Bearer <key>`.").into_response()
            }
        }
    }
    if let Err(refusal) = s.rate_limiter.admit(tenant.unwrap_or(0), Instant::now()) {
        s.metrics.rate_limited.fetch_add(1, Ordering::Relaxed);
        return rate_limited(refusal);
    }
    next.run(req).await
}

/// 429 `rate_limit_exceeded` with `Retry-After` in whole seconds (at least 1).
fn rate_limited(refusal: mlx_serving_services::Refusal) -> Response {
    let e = ApiError {
        status: StatusCode::TOO_MANY_REQUESTS,
        message: refusal.message,
        param: None,
        code: Some("rate_limit_exceeded".into()),
    };
    let mut resp = e.into_response();
    let secs = refusal.retry_after.as_secs_f64().ceil().max(1.0) as u64;
    resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
    resp
}

/// A stable identity for an API key (the same on every instance), without keeping the key itself around.
fn tenant_of(key: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    "mlx-serving tenant".hash(&mut h);
    key.hash(&mut h);
    h.finish()
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn metrics_text(State(s): State<Arc<AppState>>) -> Response {
    let series = s.model_metrics.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let (infos, loaded) = (s.models.list(), s.models.loaded());
    let views: Vec<metrics::ModelView> = infos
        .iter()
        .zip(&series)
        .map(|(info, (_, m))| metrics::ModelView {
            info,
            metrics: m,
            engine: loaded.iter().find(|(n, _)| *n == info.name).map(|(_, model)| &model.engine),
        })
        .collect();
    let cache = s.options.response_cache.as_ref().map(|c| c.is_local().then(|| c.stats()));
    let body = s.metrics.render(&views, cache);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], body).into_response()
}

/// Healthy while every loaded model's engine loop is alive (models not loaded have no loop to check).
/// `/health`: 200 while every loaded model's engine loop beats, with the load (requests running, and waiting
/// or not yet scheduled, over all loaded models: what a fleet router reads); else 503 naming the silent one.
async fn health(State(s): State<Arc<AppState>>) -> Response {
    let loaded = s.models.loaded();
    let count = |f: fn(&mlx_serving_engine::EngineStats) -> usize| -> usize {
        loaded.iter().map(|(_, m)| f(m.engine.stats())).sum()
    };
    let running = count(|st| st.running.load(Ordering::Relaxed));
    let waiting = count(|st| st.waiting.load(Ordering::Relaxed) + st.pending.load(Ordering::Relaxed));
    let silent =
        loaded.iter().map(|(name, m)| (name, m.engine.heartbeat_age())).find(|(_, age)| *age >= HEARTBEAT_LIMIT);
    match silent {
        None => Json(json!({"status": "ok", "running": running, "waiting": waiting})).into_response(),
        Some((name, age)) => {
            let reason = format!("the engine loop of `{name}` silent for {:.1} s", age.as_secs_f64());
            (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"status": "unhealthy", "reason": reason}))).into_response()
        }
    }
}

/// The OpenAPI document, with the models served now as the `model` fields' examples.
async fn openapi_json(State(s): State<Arc<AppState>>) -> Response {
    let names: Vec<String> = s.models.list().into_iter().map(|m| m.name).collect();
    Json(openapi::document(&names)).into_response()
}

async fn not_found() -> ApiError {
    ApiError {
        status: StatusCode::NOT_FOUND,
        message: "no such endpoint".into(),
        param: None,
        code: Some("not_found".into()),
    }
}
