//! `mlx-serving router`: the fleet front over many `serve` instances (crate `mlx-serving-router`).

use anyhow::{Context, Result};
use clap::Args;
use mlx_serving_router::{BackendConfig, PolicyName, Router, RouterConfig};
use std::path::PathBuf;

#[derive(Args)]
pub struct RouterArgs {
    /// A YAML file of router settings (flags override it).
    #[arg(long, env = "MLX_SERVING_ROUTER_CONFIG")]
    config: Option<PathBuf>,
    #[arg(long)]
    host: Option<String>,
    #[arg(long)]
    port: Option<u16>,
    /// An instance's base URL (`http://HOST:PORT`); repeat for more. Added to the configuration's `backends`.
    #[arg(long = "backend")]
    backends: Vec<String>,
    /// round_robin, least_outstanding (default), weighted, consistent_hash or cache_aware.
    #[arg(long)]
    policy: Option<String>,
    /// Read instances registered by `serve --register` from this Redis (`redis://HOST:PORT`).
    #[arg(long)]
    redis_url: Option<String>,
    /// A tracing filter, e.g. `info` or `mlx_serving_router=debug`.
    #[arg(long, default_value = "info")]
    log_level: String,
    /// Print the resolved settings as YAML and exit.
    #[arg(long)]
    print_config: bool,
}

impl RouterArgs {
    fn resolve(&self) -> Result<RouterConfig> {
        let mut c: RouterConfig = match &self.config {
            Some(p) => {
                let text = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
                let de = serde_yaml::Deserializer::from_str(&text);
                serde_path_to_error::deserialize(de).map_err(|e| {
                    let path = e.path().to_string();
                    anyhow::anyhow!("{}: {path}: {}", p.display(), e.into_inner())
                })?
            }
            None => RouterConfig::default(),
        };
        if let Some(h) = &self.host {
            c.host = h.clone();
        }
        if let Some(p) = self.port {
            c.port = p;
        }
        for b in &self.backends {
            c.backends.push(BackendConfig { url: b.clone(), weight: 1 });
        }
        if let Some(p) = &self.policy {
            c.policy = PolicyName::parse(p).with_context(|| {
                format!(
                    "--policy {p}: expected round_robin, least_outstanding, weighted, consistent_hash or cache_aware"
                )
            })?;
        }
        if let Some(u) = &self.redis_url {
            c.redis_url = Some(u.clone());
        }
        c.validate().map_err(anyhow::Error::msg)?;
        Ok(c)
    }
}

pub fn run_router(a: RouterArgs) -> Result<()> {
    let c = a.resolve()?;
    if a.print_config {
        print!("{}", serde_yaml::to_string(&c)?);
        return Ok(());
    }
    let filter = tracing_subscriber::EnvFilter::try_new(&a.log_level).context("--log-level")?;
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
    if c.backends.is_empty() && c.redis_url.is_none() {
        anyhow::bail!("no instances: give --backend URL (or backends: in --config) or --redis-url");
    }
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(async move {
        let addr = format!("{}:{}", c.host, c.port);
        let listener = tokio::net::TcpListener::bind(&addr).await.with_context(|| format!("binding {addr}"))?;
        let n = c.backends.len();
        let r = Router::new(c).map_err(anyhow::Error::msg)?;
        tracing::info!("routing on http://{addr} over {n} configured instances");
        mlx_serving_router::run(r, listener, crate::serve::shutdown_signal()).await?;
        Ok(())
    })
}
