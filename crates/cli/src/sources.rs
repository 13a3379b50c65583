//! Models served from files: a [`FileSource`] per configured model (estimated from the files' sizes, loaded
//! into a bundle with its own engine when the registry asks), and the [`FileFactory`] that builds one for a
//! model registered at run time (`POST /v1/models`, `load_model` with a local path over `rpc`).

use crate::config::{EngineSection, ResolvedModel, RuntimeConfig};
use crate::speculative::SpeculativeSection;
use anyhow::{Context, Result};
use mlx_serving_models::{ActivationPrecision, ComputeDevice, LoadOptions, ModelBundle};
use mlx_serving_server::models::{LoadedModel, ModelFactory, ModelSource, Registration};
use mlx_serving_server::ModelSpec;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// A model in files: estimated from their sizes, loaded into a bundle with its own engine.
struct FileSource {
    name: String,
    path: PathBuf,
    activations: ActivationPrecision,
    engine: EngineSection,
    speculative: Option<SpeculativeSection>,
}

impl ModelSource for FileSource {
    fn estimate(&self) -> Result<u64, String> {
        let path = mlx_serving_models::resolve_model(&self.path).map_err(|e| format!("{e:#}"))?;
        let weights = mlx_serving_models::weight_bytes(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let kv = (self.engine.kv_cache_mb as u64) << 20;
        // A draft model's weights, and its KV cache (as many blocks as the target's, each no larger).
        let draft = match &self.speculative {
            Some(s) if s.draft_model.is_some() => s.draft_bytes().map_err(|e| format!("{e:#}"))? + kv,
            _ => 0,
        };
        Ok(weights + kv + draft)
    }

    fn load(&self) -> Result<LoadedModel, String> {
        self.load_model().map_err(|e| format!("{e:#}"))
    }

    fn origin(&self) -> Option<String> {
        let canon = |p: &Path| mlx_serving_models::resolve_model(p).ok().and_then(|p| p.canonicalize().ok());
        let draft = self.speculative.as_ref().and_then(|s| s.draft_model.as_deref()).map(canon);
        Some(format!("{:?} {:?} {:?}", canon(&self.path)?, draft, self.activations))
    }
}

impl FileSource {
    fn load_model(&self) -> Result<LoadedModel> {
        let path = &mlx_serving_models::resolve_model(&self.path)?;
        let e = &self.engine;
        let opts = LoadOptions {
            activations: self.activations,
            kv_cache_dtype: e.kv_cache_dtype()?,
            ..LoadOptions::default()
        };
        let device: ComputeDevice = e.device.parse().map_err(|m: String| anyhow::anyhow!("engine.device: {m}"))?;
        // On a GPU the weights load there: the CPU bundle keeps the configuration and tokenizer.
        let bundle_opts = LoadOptions { config_only: device != ComputeDevice::Cpu, ..opts.clone() };
        let bundle =
            Arc::new(ModelBundle::load(path, &bundle_opts).with_context(|| format!("loading {}", path.display()))?);
        let mut cfg = mlx_serving_runner::ModelExecutor::scheduler_config(&bundle, e.block_size, e.kv_cache_mb << 20);
        cfg.max_num_seqs = e.max_num_seqs;
        cfg.max_num_batched_tokens = e.max_num_batched_tokens;
        cfg.max_waiting_requests = e.max_waiting_requests;
        cfg.max_waiting_tokens = e.max_waiting_tokens;
        cfg.enable_prefix_caching = e.enable_prefix_caching;
        cfg.aging_interval = Duration::from_secs_f64(e.priority_aging_seconds);
        let exec = match crate::device::device_model(device, path, &bundle, cfg.block_size, cfg.num_blocks)? {
            Some(d) => mlx_serving_runner::ModelExecutor::on_device(bundle.clone(), cfg.block_size, d),
            None => mlx_serving_runner::ModelExecutor::new(bundle.clone(), cfg.block_size, cfg.num_blocks),
        };
        let mut exec = exec.with_encoder_cache_bytes(e.encoder_cache_mb << 20);
        if let Some(s) = &self.speculative {
            exec = exec.with_speculation(s.speculator(&bundle, &opts, cfg.block_size, cfg.num_blocks)?);
            tracing::info!(name = %self.name, method = %s.method, draft = ?s.draft_model, "speculative decoding on");
        }
        tracing::info!(
            model = %path.display(),
            name = %self.name,
            kv_blocks = cfg.num_blocks,
            block_size = cfg.block_size,
            max_model_len = cfg.max_model_len,
            "engine ready"
        );
        let (engine, join) = mlx_serving_engine::EngineCore::spawn(cfg, exec);
        Ok(LoadedModel { bundle, engine, engine_thread: Some(join) })
    }
}

pub(crate) fn registration(m: ResolvedModel) -> (ModelSpec, Box<dyn ModelSource>) {
    let spec = ModelSpec {
        name: m.name.clone(),
        aliases: m.aliases,
        pinned: m.pinned,
        ttl: m.ttl_seconds.map(Duration::from_secs_f64),
        preload: m.preload,
    };
    let source = FileSource {
        name: m.name,
        path: m.path,
        activations: m.activations,
        engine: m.engine,
        speculative: m.speculative,
    };
    (spec, Box::new(source))
}

/// Builds the source of a model registered at run time, with the configuration's engine settings, activations
/// and speculative settings (a draft model given with it turns the `draft` method on).
#[derive(Debug)]
pub(crate) struct FileFactory {
    activations: ActivationPrecision,
    engine: EngineSection,
    speculative: Option<SpeculativeSection>,
}

impl FileFactory {
    pub(crate) fn new(c: &RuntimeConfig) -> Result<Self> {
        Ok(Self { activations: c.activations()?, engine: c.engine.clone(), speculative: c.speculative.clone() })
    }
}

impl ModelFactory for FileFactory {
    fn source(&self, r: &Registration) -> Result<Box<dyn ModelSource>, (&'static str, String)> {
        let path = PathBuf::from(r.path.as_deref().unwrap_or(&r.id));
        let check = |p: &Path, field: &'static str| -> Result<(), (&'static str, String)> {
            let resolved = mlx_serving_models::resolve_model(p).map_err(|e| (field, format!("{field}: {e:#}")))?;
            mlx_serving_models::weight_bytes(&resolved)
                .map_err(|e| (field, format!("{field}: {}: {e}", resolved.display())))?;
            mlx_serving_models::probe(&resolved).map_err(|e| (field, format!("{field}: {e:#}")))
        };
        check(&path, "path")?;
        let speculative = match &r.draft_model {
            Some(d) => {
                check(Path::new(d), "draft_model")?;
                let base = self.speculative.clone().unwrap_or_default();
                let s = SpeculativeSection { method: "draft".into(), draft_model: Some(d.into()), ..base };
                s.runner_config("draft_model").map_err(|e| ("draft_model", format!("{e:#}")))?;
                Some(s)
            }
            None => self.speculative.clone(),
        };
        Ok(Box::new(FileSource {
            name: r.id.clone(),
            path,
            activations: self.activations,
            engine: self.engine.clone(),
            speculative,
        }))
    }
}
