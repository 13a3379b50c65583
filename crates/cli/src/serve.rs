//! `mlx-serving serve`: the configuration (flags over environment over `runtime.yaml`), the models it
//! registers (each built from its files by a `sources::FileSource` when the registry loads it), and the server's
//! life from start to graceful shutdown.

use crate::config::{self, ModelEntry, RuntimeConfig};
use crate::sources::{registration, FileFactory};
use anyhow::{Context, Result};
use clap::Args;
use mlx_serving_server::{AppState, Limits};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// Every flag overrides the matching `runtime.yaml` key and has an `MLX_SERVING_*` environment variable
/// (flags win over the environment, the environment over the file).
#[derive(Args)]
pub struct ServeArgs {
    /// runtime.yaml with server and engine settings (see README).
    #[arg(long, env = "MLX_SERVING_CONFIG")]
    config: Option<PathBuf>,
    /// Print the resolved configuration as YAML (API keys masked) and exit.
    #[arg(long)]
    print_config: bool,
    /// GGUF file, Hugging Face or MLX directory, or repository id in the local HF cache, as `PATH` or
    /// `NAME=PATH`; repeat it to serve several models, each loaded on its first request [model.path, or
    /// models; default: the model scripts/fetch-model.sh fetches].
    #[arg(long, env = "MLX_SERVING_MODEL")]
    model: Vec<String>,
    /// Most models loaded at once [max_loaded_models; default: no limit].
    #[arg(long, env = "MLX_SERVING_MAX_LOADED_MODELS")]
    max_loaded_models: Option<usize>,
    /// MiB that loaded models (weights and KV caches) may take together [memory_budget_mb; default: no limit].
    #[arg(long, env = "MLX_SERVING_MEMORY_BUDGET_MB")]
    memory_budget_mb: Option<u64>,
    /// Seconds a request waits for room to load its model before a 503 [model_wait_seconds; default 60].
    #[arg(long, env = "MLX_SERVING_MODEL_WAIT_SECONDS")]
    model_wait_seconds: Option<f64>,
    /// Model name clients use [model.served_model_name; default: the file name without .gguf].
    #[arg(long, env = "MLX_SERVING_SERVED_MODEL_NAME")]
    served_model_name: Option<String>,
    /// Quantized matmul activations: `mixed` (16-bit into the head, q/k/v and gate/up, 8-bit into o and down), `int8`
    /// (fastest, least accurate), `int16`, or `f32` (float32 reference arithmetic, slowest)
    /// [model.activations; default mixed].
    #[arg(long, env = "MLX_SERVING_ACTIVATIONS")]
    activations: Option<String>,
    /// [server.host; default 127.0.0.1]
    #[arg(long, env = "MLX_SERVING_HOST")]
    host: Option<String>,
    /// [server.port; default 8080]
    #[arg(long, env = "MLX_SERVING_PORT")]
    port: Option<u16>,
    /// Require `Authorization: Bearer KEY` on /v1/*, /tokenize and /detokenize [server.api_keys].
    #[arg(long, env = "MLX_SERVING_API_KEY", conflicts_with = "api_key_file")]
    api_key: Option<String>,
    /// File of accepted API keys, one per line [server.api_key_file].
    #[arg(long, env = "MLX_SERVING_API_KEY_FILE")]
    api_key_file: Option<PathBuf>,
    /// Allowed CORS origin, repeatable or comma-separated; `*` for any [server.cors_allowed_origins].
    #[arg(long, env = "MLX_SERVING_CORS_ALLOWED_ORIGINS", value_delimiter = ',')]
    cors_allowed_origins: Vec<String>,
    /// Seconds in-flight requests get to finish after SIGTERM/SIGINT [server.shutdown_grace_seconds; default 30].
    #[arg(long, env = "MLX_SERVING_SHUTDOWN_GRACE_SECONDS")]
    shutdown_grace_seconds: Option<f64>,
    /// CPU threads for the model [engine.threads; default: all cores].
    #[arg(long, env = "MLX_SERVING_THREADS")]
    threads: Option<usize>,
    /// Where the models run: `cpu`, or `cuda[:N]` in a build with the `cuda` feature [engine.device; default cpu].
    #[arg(long, env = "MLX_SERVING_DEVICE")]
    device: Option<String>,
    /// KV cache budget in MiB, preallocated [engine.kv_cache_mb; default 512].
    #[arg(long, env = "MLX_SERVING_KV_CACHE_MB")]
    kv_cache_mb: Option<usize>,
    /// KV cache element type, `f16` or `f32` (twice the memory) [engine.kv_cache_dtype; default f16].
    #[arg(long, env = "MLX_SERVING_KV_CACHE_DTYPE")]
    kv_cache_dtype: Option<String>,
    /// [engine.block_size; default 16]
    #[arg(long, env = "MLX_SERVING_BLOCK_SIZE")]
    block_size: Option<usize>,
    /// [engine.max_num_seqs; default 16]
    #[arg(long, env = "MLX_SERVING_MAX_NUM_SEQS")]
    max_num_seqs: Option<usize>,
    /// [engine.max_num_batched_tokens; default 2048]
    #[arg(long, env = "MLX_SERVING_MAX_NUM_BATCHED_TOKENS")]
    max_num_batched_tokens: Option<usize>,
    /// Requests allowed to wait before new ones get 429 [engine.max_waiting_requests; default 256].
    #[arg(long, env = "MLX_SERVING_MAX_WAITING_REQUESTS")]
    max_waiting_requests: Option<usize>,
    /// Unfinished requests end with a timeout error after this many seconds [engine.request_timeout_seconds].
    #[arg(long, env = "MLX_SERVING_REQUEST_TIMEOUT_SECONDS")]
    request_timeout_seconds: Option<f64>,
    /// Turn the prefix cache off [engine.enable_prefix_caching = false].
    #[arg(long, env = "MLX_SERVING_NO_PREFIX_CACHING")]
    no_prefix_caching: bool,
    #[command(flatten)]
    speculative: crate::speculative::SpeculativeArgs,
    #[command(flatten)]
    cache: crate::cache::CacheArgs,
    /// `text` or `json` [logging.format; default text].
    #[arg(long, env = "MLX_SERVING_LOG_FORMAT")]
    log_format: Option<String>,
    /// Tracing filter such as `info` or `mlx_serving_server=debug,info` [logging.level; default info].
    #[arg(long, env = "MLX_SERVING_LOG_LEVEL")]
    log_level: Option<String>,
    /// Register this instance in a fleet router's Redis (`redis://HOST:PORT`), refreshed every second.
    #[arg(long, env = "MLX_SERVING_REGISTER")]
    register: Option<String>,
    /// The URL routers reach this instance at [default: http://HOST:PORT of the listener, unless HOST is a
    /// wildcard address].
    #[arg(long, env = "MLX_SERVING_ADVERTISE_URL", requires = "register")]
    advertise_url: Option<String>,
}

impl ServeArgs {
    /// Defaults ← runtime.yaml ← environment and flags; then validated.
    fn resolve(&self) -> Result<RuntimeConfig> {
        let mut c = match &self.config {
            Some(path) => RuntimeConfig::from_yaml_file(path)?,
            None => RuntimeConfig::default(),
        };
        fn set<T: Clone>(slot: &mut T, v: &Option<T>) {
            if let Some(v) = v {
                *slot = v.clone();
            }
        }
        match self.model.as_slice() {
            [] => {}
            [one] => {
                let (name, path) = model_flag(one);
                c.model.path = path;
                c.model.served_model_name = name;
                c.models.clear();
            }
            several => {
                c.models = several
                    .iter()
                    .map(|m| {
                        let (name, path) = model_flag(m);
                        ModelEntry { name, path, ..ModelEntry::default() }
                    })
                    .collect();
            }
        }
        if self.served_model_name.is_some() {
            c.model.served_model_name = self.served_model_name.clone();
        }
        if self.max_loaded_models.is_some() {
            c.max_loaded_models = self.max_loaded_models;
        }
        if self.memory_budget_mb.is_some() {
            c.memory_budget_mb = self.memory_budget_mb;
        }
        set(&mut c.model_wait_seconds, &self.model_wait_seconds);
        set(&mut c.model.activations, &self.activations);
        set(&mut c.server.host, &self.host);
        set(&mut c.server.port, &self.port);
        if let Some(k) = &self.api_key {
            c.server.api_keys = vec![k.clone()];
            c.server.api_key_file = None;
        }
        if self.api_key_file.is_some() {
            c.server.api_keys.clear();
            c.server.api_key_file = self.api_key_file.clone();
        }
        if !self.cors_allowed_origins.is_empty() {
            c.server.cors_allowed_origins = self.cors_allowed_origins.clone();
        }
        set(&mut c.server.shutdown_grace_seconds, &self.shutdown_grace_seconds);
        if self.threads.is_some() {
            c.engine.threads = self.threads;
        }
        set(&mut c.engine.device, &self.device);
        set(&mut c.engine.kv_cache_mb, &self.kv_cache_mb);
        set(&mut c.engine.kv_cache_dtype, &self.kv_cache_dtype);
        set(&mut c.engine.block_size, &self.block_size);
        set(&mut c.engine.max_num_seqs, &self.max_num_seqs);
        set(&mut c.engine.max_num_batched_tokens, &self.max_num_batched_tokens);
        set(&mut c.engine.max_waiting_requests, &self.max_waiting_requests);
        if self.request_timeout_seconds.is_some() {
            c.engine.request_timeout_seconds = self.request_timeout_seconds;
        }
        if self.no_prefix_caching {
            c.engine.enable_prefix_caching = false;
        }
        self.speculative.apply(&mut c.speculative);
        self.cache.apply(&mut c.cache);
        set(&mut c.logging.format, &self.log_format);
        set(&mut c.logging.level, &self.log_level);
        c.validate()?;
        Ok(c)
    }
}

/// `--model` as `PATH` or `NAME=PATH` (a path that exists is a path, `=` and all).
fn model_flag(v: &str) -> (Option<String>, PathBuf) {
    match v.split_once('=') {
        Some((name, path)) if !name.is_empty() && !Path::new(v).exists() => (Some(name.into()), path.into()),
        _ => (None, v.into()),
    }
}

fn init_logging(c: &config::LoggingSection) -> Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_new(&c.level).context("logging.level")?;
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let result = if c.format == "json" { builder.json().try_init() } else { builder.try_init() };
    result.map_err(|e| anyhow::anyhow!("setting up logging: {e}"))
}

/// The served models and the server state built from resolved settings (shared by `serve` and `rpc`): the state,
/// the models' names, and whether one model was given the old way (then a failed preload ends the start).
pub(crate) fn build_state(c: &RuntimeConfig, no_models: bool) -> Result<(Arc<AppState>, Vec<String>, bool)> {
    let api_keys = c.api_keys()?;
    // One model given the old way is pinned and loaded before the server listens; a failure ends the start.
    let single = c.models.is_empty() && !no_models;
    let models: Vec<_> = match no_models {
        true => Vec::new(),
        false => c.resolve_models()?.into_iter().map(registration).collect(),
    };
    let names: Vec<String> = models.iter().map(|(s, _)| s.name.clone()).collect();
    let limits = Limits {
        max_loaded: c.max_loaded_models,
        memory_budget: c.memory_budget_mb.map(|mb| mb << 20),
        wait_for_room: Duration::from_secs_f64(c.model_wait_seconds),
    };
    let options = mlx_serving_server::ServerOptions {
        api_keys,
        cors_allowed_origins: c.server.cors_allowed_origins.clone(),
        max_body_bytes: c.server.max_body_bytes,
        request_timeout: c.engine.request_timeout_seconds.map(Duration::from_secs_f64),
        conn: mlx_serving_server::ConnLimits {
            max_connections: c.server.max_connections,
            header_read_timeout: Duration::from_secs_f64(c.server.header_read_timeout_seconds),
            max_header_bytes: c.server.max_header_bytes,
            max_headers: c.server.max_headers,
        },
        max_prompt_tokens: c.server.max_prompt_tokens,
        max_tokens_per_request: c.server.max_tokens_per_request,
        body_read_timeout: Duration::from_secs_f64(c.server.body_read_timeout_seconds),
        sse_keepalive: Duration::from_secs_f64(c.server.sse_keepalive_seconds),
        allow_special_tokens_in_chat: c.server.allow_special_tokens_in_chat,
        images: mlx_serving_server::images::ImageOptions {
            allow_remote: c.server.allow_remote_images,
            allow_private_hosts: c.server.allow_private_image_hosts,
            remote_timeout: Duration::from_secs_f64(c.server.remote_image_timeout_seconds),
            dirs: c.server.image_dirs.clone(),
            max_bytes: c.server.max_image_bytes,
            max_pixels: c.server.max_image_pixels,
            max_per_request: c.server.max_images_per_request,
            max_pixel_bytes_in_flight: c.server.max_image_mb_in_flight << 20,
        },
        coalescing: c.cache.coalescing,
        response_cache: c.cache.backend()?,
        cache_shared_across_keys: c.cache.shared_across_keys,
        rate_limits: mlx_serving_services::RateLimits {
            requests_per_minute: c.server.rate_limit.requests_per_minute,
            tokens_per_minute: c.server.rate_limit.tokens_per_minute,
        },
        model_factory: match c.server.allow_model_registration {
            true => Some(Arc::new(FileFactory::new(c)?)),
            false => None,
        },
        ..mlx_serving_server::ServerOptions::default()
    };
    Ok((Arc::new(AppState::with_models(models, limits, options)), names, single))
}

/// Loads the models to preload: with one model given the old way its failure ends the start, else it is logged
/// (its requests try again).
pub(crate) async fn preload(state: &AppState, single: bool) -> Result<()> {
    for e in state.preload().await {
        if single {
            return Err(anyhow::anyhow!("{e}"));
        }
        tracing::error!(error = %e, "preloading a model failed; its requests will try again");
    }
    Ok(())
}

/// A front end's starting point: the resolved settings and the state built from them.
pub(crate) struct Prepared {
    pub c: RuntimeConfig,
    pub state: Arc<AppState>,
    pub names: Vec<String>,
    /// One model given the old way: a failed preload ends the start.
    pub single: bool,
}

/// Resolves the settings, sets up logging (stderr) and threads, and builds the state; None after
/// `--print-config`.
/// With `rpc`: model registration is on (the caller started the runtime and may load models from its own
/// paths), and a runtime given no model at all, whose default model file is absent, starts with no model
/// (the caller loads them) instead of failing.
pub(crate) fn prepare(a: &ServeArgs, rpc: bool) -> Result<Option<Prepared>> {
    let mut c = a.resolve()?;
    let mut empty = false;
    if rpc {
        c.server.allow_model_registration = true;
        let default = config::ModelSection::default().path;
        empty = c.models.is_empty() && c.model.path == default && !default.exists();
    }
    if a.print_config {
        print!("{}", c.to_yaml_redacted()?);
        return Ok(None);
    }
    init_logging(&c.logging)?;
    crate::init_threads(c.engine.threads)?;
    let (state, names, single) = build_state(&c, empty)?;
    Ok(Some(Prepared { c, state, names, single }))
}

pub fn run_serve(a: ServeArgs) -> Result<()> {
    let (register, advertise_url) = (a.register.clone(), a.advertise_url.clone());
    let Some(Prepared { c, state, names, single }) = prepare(&a, false)? else { return Ok(()) };
    let grace = Duration::from_secs_f64(c.server.shutdown_grace_seconds);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(async move {
        preload(&state, single).await?;
        let addr = format!("{}:{}", c.server.host, c.server.port);
        let listener = tokio::net::TcpListener::bind(&addr).await.with_context(|| format!("binding {addr}"))?;
        tracing::info!("serving {} on http://{addr}", names.join(", "));
        let registered = match &register {
            Some(redis) => {
                let url = match advertise_url {
                    Some(u) => u,
                    None if ["0.0.0.0", "::", "[::]"].contains(&c.server.host.as_str()) => {
                        anyhow::bail!("--register with a wildcard --host needs --advertise-url")
                    }
                    None => format!("http://{}", listener.local_addr()?),
                };
                Some(crate::register::start(redis, &url, names.clone())?)
            }
            None => None,
        };
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = mlx_serving_server::serve(listener, state, async move {
            shutdown_signal().await;
            tracing::info!(
                grace_seconds = grace.as_secs_f64(),
                "shutting down: no new connections, finishing in-flight requests"
            );
            // Out of the fleet's registry first, so routers stop sending while requests finish.
            if let Some(r) = registered {
                r.leave().await;
            }
            let _ = stop_tx.send(());
        });
        let server = tokio::spawn(server);
        // Once the signal came, in-flight requests get `grace` to finish; then we exit regardless.
        let deadline = async move {
            if stop_rx.await.is_ok() {
                tokio::time::sleep(grace).await;
            } else {
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            r = server => { r.context("server task")??; tracing::info!("all requests finished; exiting"); }
            _ = deadline => tracing::warn!("grace period over with requests still running; exiting"),
        }
        Ok(())
    })
}

pub(crate) async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        if let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            s.recv().await;
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
