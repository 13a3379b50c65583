//! `runtime.yaml`: every server and engine setting of `mlx-serving serve`, resolved as
//! defaults ← the YAML file ← `MLX_SERVING_*` environment variables ← command-line flags.
//!
//! Unknown keys are rejected and every value is checked at start; errors name the key path
//! (`engine.block_size: must be at least 1`).

use crate::cache::CacheSection;
use crate::speculative::SpeculativeSection;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeConfig {
    /// The one model of a single-model server (used when `models` is empty).
    pub model: ModelSection,
    /// Several models behind one server, each loaded on its first request (or at start with `preload`).
    pub models: Vec<ModelEntry>,
    /// Most models loaded at once; loading another unloads the least recently used idle, unpinned one.
    pub max_loaded_models: Option<usize>,
    /// MiB that loaded models may take together (weights and KV caches).
    pub memory_budget_mb: Option<u64>,
    /// How long a request for a model that has no room waits for models in use to finish before it gets 503.
    pub model_wait_seconds: f64,
    pub server: ServerSection,
    pub engine: EngineSection,
    /// Speculative decoding for the model (each `models` entry may set its own); off when absent.
    pub speculative: Option<SpeculativeSection>,
    /// Request coalescing and the response cache.
    pub cache: CacheSection,
    pub logging: LoggingSection,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            model: ModelSection::default(),
            models: Vec::new(),
            max_loaded_models: None,
            memory_budget_mb: None,
            model_wait_seconds: 60.0,
            server: ServerSection::default(),
            engine: EngineSection::default(),
            speculative: None,
            cache: CacheSection::default(),
            logging: LoggingSection::default(),
        }
    }
}

/// One entry of `models:`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelEntry {
    /// The name clients use; default: the file name without `.gguf` (or the directory's name).
    #[serde(default)]
    pub name: Option<String>,
    /// GGUF file, Hugging Face or MLX directory, or repository id in the local HF cache.
    pub path: PathBuf,
    /// Other names clients may use.
    #[serde(default)]
    pub aliases: Vec<String>,
    /// Never unloaded to make room or by TTL.
    #[serde(default)]
    pub pinned: bool,
    /// Idle seconds before the model unloads by itself; none (the default) keeps it.
    #[serde(default)]
    pub ttl_seconds: Option<f64>,
    /// Load at start instead of on the first request.
    #[serde(default)]
    pub preload: bool,
    /// As `model.activations`; default: `model.activations`.
    #[serde(default)]
    pub activations: Option<String>,
    /// This model's engine settings over the `engine:` section (same keys, except `threads`: the kernel
    /// threads are shared by every model).
    #[serde(default)]
    pub engine: serde_yaml::Mapping,
    /// This model's speculative decoding; default: the top-level `speculative`.
    #[serde(default)]
    pub speculative: Option<SpeculativeSection>,
}

/// A model to register, resolved from `model` or `models`.
#[derive(Clone, Debug, PartialEq)]
pub struct ResolvedModel {
    pub name: String,
    pub path: PathBuf,
    pub aliases: Vec<String>,
    pub pinned: bool,
    pub ttl_seconds: Option<f64>,
    pub preload: bool,
    pub activations: mlx_serving_models::ActivationPrecision,
    pub engine: EngineSection,
    pub speculative: Option<SpeculativeSection>,
}

/// The name a model gets without one: a repository id as given, else the file name without `.gguf` (or the
/// directory's name).
pub fn default_model_name(path: &Path) -> String {
    if !path.exists() {
        return path.display().to_string();
    }
    let path = mlx_serving_models::resolve_model(path).unwrap_or_else(|_| path.to_path_buf());
    path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into())
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ModelSection {
    /// GGUF file, Hugging Face directory (safetensors), or repository id (`org/name`) in the local HF cache.
    pub path: PathBuf,
    /// The name clients use; default: the file name without `.gguf`.
    pub served_model_name: Option<String>,
    /// Quantized matmul activations: `mixed` (16-bit into the head, q/k/v and gate/up, 8-bit into o and
    /// down; the default), `int8` (rounded per 32-value block as llama.cpp does; fastest, least accurate), `int16`,
    /// or `f32` (the float32 reference's arithmetic; the slowest).
    pub activations: String,
}

impl Default for ModelSection {
    fn default() -> Self {
        Self {
            path: PathBuf::from("models/SmolLM2-135M-Instruct.Q4_1.gguf"),
            served_model_name: None,
            activations: "mixed".into(),
        }
    }
}

/// `server.rate_limit`: `null` (or absent) limits nothing.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimitSection {
    pub requests_per_minute: Option<u32>,
    pub tokens_per_minute: Option<u64>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ServerSection {
    pub host: String,
    pub port: u16,
    /// Accepted API keys (bearer tokens); empty: no authentication.
    pub api_keys: Vec<String>,
    /// A file with one API key per line (blank lines and `#` comments skipped), added to `api_keys`.
    pub api_key_file: Option<PathBuf>,
    /// Origins allowed by CORS (`"*"` for any); empty: no CORS headers.
    pub cors_allowed_origins: Vec<String>,
    /// Largest request body, in bytes (larger: 413).
    pub max_body_bytes: usize,
    /// After SIGTERM/SIGINT, how long in-flight requests may take to finish before the server exits.
    pub shutdown_grace_seconds: f64,
    /// A connection must send a whole request head this long after it opens (or after its last response).
    pub header_read_timeout_seconds: f64,
    /// Most connections served at once; more wait in the listen queue.
    pub max_connections: usize,
    /// Largest request head (request line and header fields), in bytes; larger: 431, and the connection closes.
    pub max_header_bytes: usize,
    /// Most header fields in one request; more: 431.
    pub max_headers: usize,
    /// Most tokens in one prompt (larger: 400 `prompt_too_long`); none: each model's context length.
    pub max_prompt_tokens: Option<usize>,
    /// Most completion tokens one request may ask for: `max_tokens` × its choices (`n` × prompts); more:
    /// 400 `too_many_tokens`. A request without `max_tokens` gets at most this, divided among its choices.
    pub max_tokens_per_request: Option<usize>,
    /// A request body must arrive whole this long after its head (else 408 and the connection closes).
    pub body_read_timeout_seconds: f64,
    /// A stream with nothing to send for this long sends an SSE comment, `: keep-alive`.
    pub sse_keepalive_seconds: f64,
    /// Tokenize special-token texts inside chat messages as control tokens, as before: lets a user's
    /// message forge a system or assistant turn. Off: message text is text.
    pub allow_special_tokens_in_chat: bool,
    /// Fetch `http(s)` image URLs in chat messages (from public addresses only, redirects followed by hand and
    /// checked, within max_image_bytes and remote_image_timeout_seconds).
    pub allow_remote_images: bool,
    /// A remote image URL as given may name a loopback or private address (e.g. an image server on the same
    /// network); a redirect's target still may not.
    pub allow_private_image_hosts: bool,
    /// All of one request's remote images must have arrived this long after their fetching starts.
    pub remote_image_timeout_seconds: f64,
    /// Directories images may be read from as local files (`file://` URLs or absolute paths); none by default.
    pub image_dirs: Vec<PathBuf>,
    /// Largest image file, in bytes.
    pub max_image_bytes: usize,
    /// Most pixels in one image (width × height, read from its header before decoding).
    pub max_image_pixels: u64,
    /// Most images in one request.
    pub max_images_per_request: usize,
    /// MiB of preprocessed pixels all requests in flight may hold at once (beyond: 429).
    pub max_image_mb_in_flight: usize,
    /// Requests and tokens per minute for each API key (without keys: for all clients together); beyond, 429
    /// with `Retry-After`. A generation is charged its prompt tokens plus `max_tokens` per choice.
    pub rate_limit: RateLimitSection,
    /// `POST /v1/models` may register a model from a path on this machine (with the engine settings of this
    /// file); off, models come only from this file and the flags. Always on in `rpc` (its caller started it).
    pub allow_model_registration: bool,
}

impl Default for ServerSection {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 8080,
            api_keys: Vec::new(),
            api_key_file: None,
            cors_allowed_origins: Vec::new(),
            max_body_bytes: mlx_serving_server::MAX_BODY_BYTES,
            shutdown_grace_seconds: 30.0,
            header_read_timeout_seconds: 10.0,
            max_connections: 1024,
            max_header_bytes: mlx_serving_server::ConnLimits::default().max_header_bytes,
            max_headers: mlx_serving_server::ConnLimits::default().max_headers,
            max_prompt_tokens: None,
            max_tokens_per_request: None,
            body_read_timeout_seconds: 60.0,
            sse_keepalive_seconds: 15.0,
            allow_special_tokens_in_chat: false,
            allow_remote_images: false,
            allow_private_image_hosts: false,
            remote_image_timeout_seconds: 10.0,
            image_dirs: Vec::new(),
            max_image_bytes: mlx_serving_server::images::ImageOptions::default().max_bytes,
            max_image_pixels: mlx_serving_server::images::ImageOptions::default().max_pixels,
            max_images_per_request: mlx_serving_server::images::ImageOptions::default().max_per_request,
            max_image_mb_in_flight: mlx_serving_server::images::ImageOptions::default().max_pixel_bytes_in_flight >> 20,
            allow_model_registration: false,
            rate_limit: RateLimitSection::default(),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct EngineSection {
    /// Where the model runs: `cpu` (the default) or `cuda[:N]` (a build with the `cuda` feature).
    pub device: String,
    /// CPU threads for the model; default: all cores.
    pub threads: Option<usize>,
    /// KV cache budget in MiB, preallocated.
    pub kv_cache_mb: usize,
    /// KV cache element type: `f16` (the default) or `f32` (twice the memory and attention bandwidth).
    pub kv_cache_dtype: String,
    /// Tokens per KV block.
    pub block_size: usize,
    /// Most sequences in one batch.
    pub max_num_seqs: usize,
    /// Most tokens in one step (prefill chunks plus decodes).
    pub max_num_batched_tokens: usize,
    /// Requests allowed to wait; beyond this new requests get 429.
    pub max_waiting_requests: usize,
    /// Prompt tokens allowed to wait; beyond this new requests get 429.
    pub max_waiting_tokens: usize,
    pub enable_prefix_caching: bool,
    /// Waiting this long raises a request one priority class (0: no aging).
    pub priority_aging_seconds: f64,
    /// Requests still unfinished this long after arrival end with a timeout error; none by default.
    pub request_timeout_seconds: Option<f64>,
    /// Vision models: MiB of recently encoded images' embeddings kept (LRU by image content).
    pub encoder_cache_mb: usize,
}

impl EngineSection {
    /// Checks every value; errors name the key under `prefix` (`engine`, `models[1].engine`).
    pub fn validate(&self, prefix: &str) -> Result<()> {
        let e = self;
        let positive = [
            ("kv_cache_mb", e.kv_cache_mb),
            ("block_size", e.block_size),
            ("max_num_seqs", e.max_num_seqs),
            ("max_num_batched_tokens", e.max_num_batched_tokens),
            ("max_waiting_requests", e.max_waiting_requests),
            ("max_waiting_tokens", e.max_waiting_tokens),
        ];
        for (key, v) in positive {
            if v == 0 {
                bail!("{prefix}.{key}: must be at least 1");
            }
        }
        self.kv_cache_dtype().map_err(|e| anyhow::anyhow!("{prefix}.{e}"))?;
        let device: mlx_serving_models::ComputeDevice =
            e.device.parse().map_err(|m| anyhow::anyhow!("{prefix}.device: {m}"))?;
        device.check_available().map_err(|m| anyhow::anyhow!("{prefix}.device: {m}"))?;
        if e.block_size > 1024 {
            bail!("{prefix}.block_size: at most 1024, got {}", e.block_size);
        }
        if e.max_num_seqs > 1024 {
            bail!("{prefix}.max_num_seqs: at most 1024, got {}", e.max_num_seqs);
        }
        if e.max_num_batched_tokens < e.max_num_seqs {
            bail!(
                "{prefix}.max_num_batched_tokens: must be at least {prefix}.max_num_seqs ({}), got {}",
                e.max_num_seqs,
                e.max_num_batched_tokens
            );
        }
        for (key, v) in [
            ("priority_aging_seconds", Some(e.priority_aging_seconds)),
            ("request_timeout_seconds", e.request_timeout_seconds),
        ] {
            if let Some(v) = v {
                if !(v.is_finite() && (0.0..=1e7).contains(&v)) {
                    bail!("{prefix}.{key}: must be a number of seconds between 0 and 1e7, got {v}");
                }
            }
        }
        if e.request_timeout_seconds == Some(0.0) {
            bail!("{prefix}.request_timeout_seconds: must be positive (leave it out for no timeout)");
        }
        Ok(())
    }

    pub fn kv_cache_dtype(&self) -> Result<mlx_serving_kernels::KvDtype> {
        self.kv_cache_dtype.parse().map_err(|e| anyhow::anyhow!("kv_cache_dtype: {e}"))
    }
}

impl Default for EngineSection {
    fn default() -> Self {
        let s = mlx_serving_engine::SchedulerConfig::default();
        Self {
            device: "cpu".into(),
            threads: None,
            kv_cache_mb: 512,
            kv_cache_dtype: "f16".into(),
            block_size: s.block_size,
            max_num_seqs: s.max_num_seqs,
            max_num_batched_tokens: s.max_num_batched_tokens,
            max_waiting_requests: s.max_waiting_requests,
            max_waiting_tokens: s.max_waiting_tokens,
            enable_prefix_caching: true,
            priority_aging_seconds: s.aging_interval.as_secs_f64(),
            request_timeout_seconds: None,
            encoder_cache_mb: 256,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LoggingSection {
    /// `text` or `json` (one object per line).
    pub format: String,
    /// A tracing filter: `info`, `debug`, `mlx_serving_server=debug,info`, ...
    pub level: String,
}

impl Default for LoggingSection {
    fn default() -> Self {
        Self { format: "text".into(), level: "info".into() }
    }
}

impl RuntimeConfig {
    /// Reads a YAML file; unknown keys and wrong types fail with the key path named.
    pub fn from_yaml_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Self::from_yaml_str(&text).with_context(|| format!("in {}", path.display()))
    }

    pub fn from_yaml_str(text: &str) -> Result<Self> {
        if text.trim().is_empty() {
            return Ok(Self::default());
        }
        let de = serde_yaml::Deserializer::from_str(text);
        serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            if path == "." {
                anyhow::anyhow!("{inner}")
            } else {
                anyhow::anyhow!("{path}: {inner}")
            }
        })
    }

    /// Checks every value; the error names the key path.
    pub fn activations(&self) -> Result<mlx_serving_models::ActivationPrecision> {
        self.model.activations.parse().map_err(|e| anyhow::anyhow!("model.activations: {e}"))
    }

    pub fn validate(&self) -> Result<()> {
        for (key, v) in [
            ("server.max_body_bytes", self.server.max_body_bytes),
            ("server.max_connections", self.server.max_connections),
            ("server.max_headers", self.server.max_headers),
            ("server.max_prompt_tokens", self.server.max_prompt_tokens.unwrap_or(1)),
            ("server.max_tokens_per_request", self.server.max_tokens_per_request.unwrap_or(1)),
            ("server.max_image_bytes", self.server.max_image_bytes),
            ("server.max_image_mb_in_flight", self.server.max_image_mb_in_flight),
        ] {
            if v == 0 {
                bail!("{key}: must be at least 1");
            }
        }
        if self.server.max_header_bytes < mlx_serving_server::MIN_HEADER_BYTES {
            bail!(
                "server.max_header_bytes: must be at least {} (hyper's smallest read buffer), got {}",
                mlx_serving_server::MIN_HEADER_BYTES,
                self.server.max_header_bytes
            );
        }
        if self.server.max_image_pixels == 0 {
            bail!("server.max_image_pixels: must be at least 1");
        }
        if self.engine.threads == Some(0) {
            bail!("engine.threads: must be at least 1");
        }
        self.activations()?;
        self.engine.validate("engine")?;
        if self.max_loaded_models == Some(0) {
            bail!("max_loaded_models: must be at least 1");
        }
        if self.memory_budget_mb == Some(0) {
            bail!("memory_budget_mb: must be at least 1");
        }
        self.resolve_models()?;
        self.cache.validate()?;
        let seconds = [
            ("model_wait_seconds", Some(self.model_wait_seconds)),
            ("server.shutdown_grace_seconds", Some(self.server.shutdown_grace_seconds)),
            ("server.header_read_timeout_seconds", Some(self.server.header_read_timeout_seconds)),
            ("server.body_read_timeout_seconds", Some(self.server.body_read_timeout_seconds)),
            ("server.sse_keepalive_seconds", Some(self.server.sse_keepalive_seconds)),
            ("server.remote_image_timeout_seconds", Some(self.server.remote_image_timeout_seconds)),
        ];
        for (key, v) in seconds {
            if let Some(v) = v {
                if !(v.is_finite() && (0.0..=1e7).contains(&v)) {
                    bail!("{key}: must be a number of seconds between 0 and 1e7, got {v}");
                }
            }
        }
        for (key, v) in [
            ("server.header_read_timeout_seconds", self.server.header_read_timeout_seconds),
            ("server.body_read_timeout_seconds", self.server.body_read_timeout_seconds),
            ("server.sse_keepalive_seconds", self.server.sse_keepalive_seconds),
            ("server.remote_image_timeout_seconds", self.server.remote_image_timeout_seconds),
        ] {
            if v < 0.01 {
                bail!("{key}: must be at least 0.01 seconds, got {v}");
            }
        }
        if self.server.host.is_empty() {
            bail!("server.host: must not be empty");
        }
        for (i, k) in self.server.api_keys.iter().enumerate() {
            if k.is_empty() || k.chars().any(|c| c.is_whitespace() || c.is_control()) {
                bail!("server.api_keys[{i}]: must be non-empty, without spaces or control characters");
            }
        }
        let rl = &self.server.rate_limit;
        if rl.requests_per_minute == Some(0) || rl.tokens_per_minute == Some(0) {
            bail!("server.rate_limit: a limit must be at least 1 (or null for none)");
        }
        for (i, o) in self.server.cors_allowed_origins.iter().enumerate() {
            if o != "*" && !(o.starts_with("http://") || o.starts_with("https://")) {
                bail!("server.cors_allowed_origins[{i}]: `{o}` is not `*` or an http(s) origin");
            }
        }
        if !matches!(self.logging.format.as_str(), "text" | "json") {
            bail!("logging.format: must be `text` or `json`, got `{}`", self.logging.format);
        }
        if let Err(err) = tracing_subscriber::EnvFilter::try_new(&self.logging.level) {
            bail!("logging.level: `{}` is not a valid filter: {err}", self.logging.level);
        }
        if let Some(name) = &self.model.served_model_name {
            if name.is_empty() {
                bail!("model.served_model_name: must not be empty");
            }
        }
        Ok(())
    }

    /// The models to register: `models`, or else the single `model`, which is pinned and loaded at start. Names
    /// and aliases must be unique; each model's engine section is `engine` with its overrides.
    pub fn resolve_models(&self) -> Result<Vec<ResolvedModel>> {
        if self.models.is_empty() {
            let name = self.model.served_model_name.clone().unwrap_or_else(|| default_model_name(&self.model.path));
            return Ok(vec![ResolvedModel {
                name,
                path: self.model.path.clone(),
                aliases: Vec::new(),
                pinned: true,
                ttl_seconds: None,
                preload: true,
                activations: self.activations()?,
                engine: self.engine.clone(),
                speculative: self.checked_speculative(self.speculative.as_ref(), "speculative")?,
            }]);
        }
        if self.model.served_model_name.is_some() {
            bail!("model.served_model_name: give each entry of `models` its `name` instead");
        }
        let mut seen = std::collections::HashSet::new();
        let mut out = Vec::new();
        for (i, m) in self.models.iter().enumerate() {
            let key = format!("models[{i}]");
            let name = m.name.clone().unwrap_or_else(|| default_model_name(&m.path));
            for n in std::iter::once(&name).chain(&m.aliases) {
                if n.is_empty() || n.chars().any(char::is_control) {
                    bail!("{key}: a model name or alias must be non-empty, without control characters");
                }
                if !seen.insert(n.clone()) {
                    bail!("{key}: the name `{n}` is used twice");
                }
            }
            if let Some(t) = m.ttl_seconds {
                if !(t.is_finite() && t > 0.0 && t <= 1e7) {
                    bail!("{key}.ttl_seconds: must be a number of seconds between 0 and 1e7 (or null), got {t}");
                }
            }
            let activations = m.activations.as_deref().unwrap_or(&self.model.activations);
            let activations = activations.parse().map_err(|e| anyhow::anyhow!("{key}.activations: {e}"))?;
            if m.engine.contains_key("threads") {
                bail!("{key}.engine.threads: the kernel threads are shared by every model; set engine.threads");
            }
            let mut engine = serde_yaml::to_value(&self.engine)?;
            if let serde_yaml::Value::Mapping(base) = &mut engine {
                for (k, v) in &m.engine {
                    base.insert(k.clone(), v.clone());
                }
            }
            let engine: EngineSection = serde_path_to_error::deserialize(engine).map_err(|e| {
                let path = match e.path().to_string() {
                    p if p == "." => String::new(),
                    p => format!(".{p}"),
                };
                anyhow::anyhow!("{key}.engine{path}: {}", e.into_inner())
            })?;
            engine.validate(&format!("{key}.engine"))?;
            out.push(ResolvedModel {
                name,
                path: m.path.clone(),
                aliases: m.aliases.clone(),
                pinned: m.pinned,
                ttl_seconds: m.ttl_seconds,
                preload: m.preload,
                activations,
                engine,
                speculative: match &m.speculative {
                    Some(s) => self.checked_speculative(Some(s), &format!("{key}.speculative"))?,
                    None => self.checked_speculative(self.speculative.as_ref(), "speculative")?,
                },
            });
        }
        Ok(out)
    }

    fn checked_speculative(&self, s: Option<&SpeculativeSection>, key: &str) -> Result<Option<SpeculativeSection>> {
        if let Some(s) = s {
            s.runner_config(key)?;
        }
        Ok(s.cloned())
    }

    /// All accepted API keys: `server.api_keys` plus the lines of `server.api_key_file`.
    pub fn api_keys(&self) -> Result<Vec<String>> {
        let mut keys = self.server.api_keys.clone();
        if let Some(f) = &self.server.api_key_file {
            let text =
                std::fs::read_to_string(f).with_context(|| format!("server.api_key_file: reading {}", f.display()))?;
            let from_file: Vec<String> = text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(String::from)
                .collect();
            if from_file.is_empty() {
                bail!("server.api_key_file: {} holds no key", f.display());
            }
            keys.extend(from_file);
        }
        Ok(keys)
    }

    /// The resolved configuration as YAML, API keys masked.
    pub fn to_yaml_redacted(&self) -> Result<String> {
        let mut c = self.clone();
        for k in &mut c.server.api_keys {
            *k = "<redacted>".into();
        }
        Ok(serde_yaml::to_string(&c)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(yaml: &str) -> String {
        match RuntimeConfig::from_yaml_str(yaml).and_then(|c| c.validate()) {
            Ok(()) => panic!("accepted: {yaml}"),
            Err(e) => format!("{e:#}"),
        }
    }

    #[test]
    fn defaults_round_trip_through_yaml() {
        let c = RuntimeConfig::default();
        c.validate().unwrap();
        let back = RuntimeConfig::from_yaml_str(&c.to_yaml_redacted().unwrap()).unwrap();
        assert_eq!(back, c);
        assert_eq!(RuntimeConfig::from_yaml_str("").unwrap(), c);
    }

    #[test]
    fn partial_files_keep_the_other_defaults() {
        let c = RuntimeConfig::from_yaml_str("engine:\n  block_size: 32\nserver:\n  port: 9000\n").unwrap();
        assert_eq!((c.engine.block_size, c.server.port), (32, 9000));
        assert_eq!(c.engine.kv_cache_mb, EngineSection::default().kv_cache_mb);
    }

    #[test]
    fn errors_name_the_key_path() {
        assert!(
            err("engine:\n  blok_size: 4\n").contains("engine: unknown field `blok_size`"),
            "{}",
            err("engine:\n  blok_size: 4\n")
        );
        assert!(err("server:\n  port: eighty\n").starts_with("server.port:"));
        assert!(err("server:\n  port: 70000\n").starts_with("server.port:"));
        assert!(err("engine:\n  block_size: 0\n").starts_with("engine.block_size:"));
        assert!(err("engine:\n  max_num_seqs: 64\n  max_num_batched_tokens: 8\n")
            .starts_with("engine.max_num_batched_tokens:"));
        assert!(err("logging:\n  format: xml\n").starts_with("logging.format:"));
        assert!(err("server:\n  api_keys: [\"a b\"]\n").starts_with("server.api_keys[0]:"));
        assert!(
            err("server:\n  cors_allowed_origins: [\"example.com\"]\n").starts_with("server.cors_allowed_origins[0]:")
        );
        assert!(err("engine:\n  request_timeout_seconds: -1\n").starts_with("engine.request_timeout_seconds:"));
        assert!(err("colour: blue\n").contains("unknown field `colour`"));
        assert!(err("server:\n  max_connections: 0\n").starts_with("server.max_connections:"));
        assert!(err("server:\n  max_header_bytes: 100\n").starts_with("server.max_header_bytes:"));
        assert!(err("engine:\n  device: tpu\n").starts_with("engine.device: `tpu`"));
        if !cfg!(feature = "cuda") {
            // A CPU-only build refuses a GPU; a `cuda` build takes it (the GPU is looked for at load).
            let cuda = err("engine:\n  device: cuda:1\n");
            assert!(cuda.starts_with("engine.device: cuda:1: "), "{cuda}");
        }
        assert!(err("server:\n  max_tokens_per_request: 0\n").starts_with("server.max_tokens_per_request:"));
        assert!(err("server:\n  max_prompt_tokens: 0\n").starts_with("server.max_prompt_tokens:"));
        assert!(err("server:\n  header_read_timeout_seconds: 0\n").starts_with("server.header_read_timeout_seconds:"));
        assert!(err("server:\n  sse_keepalive_seconds: -3\n").starts_with("server.sse_keepalive_seconds:"));
    }

    #[test]
    fn models_resolve_with_engine_overrides_and_unique_names() {
        let yaml = "engine:\n  kv_cache_mb: 64\nmax_loaded_models: 1\nmodels:\n  - name: a\n    path: x.gguf\n    aliases: [b]\n    ttl_seconds: 30\n    engine:\n      kv_cache_mb: 16\n  - path: dir/y.gguf\n    pinned: true\n    preload: true\n";
        let c = RuntimeConfig::from_yaml_str(yaml).unwrap();
        c.validate().unwrap();
        let m = c.resolve_models().unwrap();
        assert_eq!(m.len(), 2);
        assert_eq!((m[0].name.as_str(), m[0].engine.kv_cache_mb, m[0].ttl_seconds), ("a", 16, Some(30.0)));
        assert_eq!(m[0].engine.block_size, EngineSection::default().block_size);
        // A missing file's name is the path as given (it may be a repository id).
        assert_eq!(
            (m[1].name.as_str(), m[1].engine.kv_cache_mb, m[1].pinned, m[1].preload),
            ("dir/y.gguf", 64, true, true)
        );
        assert!(!m[0].pinned && !m[0].preload);
        // The single-model form: pinned and loaded at start.
        let one = RuntimeConfig::default().resolve_models().unwrap();
        assert_eq!(one.len(), 1);
        assert!(one[0].pinned && one[0].preload);
        assert!(one[0].name.contains("SmolLM2-135M-Instruct.Q4_1"), "{}", one[0].name);
    }

    #[test]
    fn bad_model_entries_name_the_entry() {
        assert!(err("models:\n  - name: a\n    path: x\n  - name: a\n    path: y\n")
            .starts_with("models[1]: the name `a` is used twice"));
        assert!(err("models:\n  - name: a\n    path: x\n  - name: b\n    aliases: [a]\n    path: y\n")
            .starts_with("models[1]:"));
        assert!(err("models:\n  - path: x\n    engine:\n      kv_cache_mb: 0\n")
            .starts_with("models[0].engine.kv_cache_mb:"));
        assert!(
            err("models:\n  - path: x\n    engine:\n      kv_cache_mbb: 3\n").contains("unknown field `kv_cache_mbb`")
        );
        assert!(err("models:\n  - path: x\n    engine:\n      threads: 3\n").starts_with("models[0].engine.threads:"));
        assert!(err("models:\n  - path: x\n    ttl_seconds: -1\n").starts_with("models[0].ttl_seconds:"));
        assert!(err("models:\n  - path: x\n    activations: int3\n").starts_with("models[0].activations:"));
        assert!(err("models:\n  - path: x\n    colour: red\n").contains("unknown field `colour`"));
        assert!(err("max_loaded_models: 0\n").starts_with("max_loaded_models:"));
        assert!(err("model_wait_seconds: -1\n").starts_with("model_wait_seconds:"));
    }
}
