//! `serve --register redis://HOST:PORT`: the instance's entry in the fleet's Redis registry, refreshed on a
//! heartbeat (its expiry is three heartbeats, so a killed instance leaves within seconds) and deleted on a
//! clean stop.

use anyhow::{Context, Result};
use mlx_serving_services::fleet::{InstanceRecord, Registration};
use std::sync::Arc;
use std::time::Duration;

/// Between heartbeats.
pub const HEARTBEAT: Duration = Duration::from_secs(1);

/// The running registration: its heartbeat task, and the entry to delete at the end.
pub struct Registered {
    reg: Arc<Registration>,
    task: tokio::task::JoinHandle<()>,
}

/// Starts the heartbeat for an instance at `url` serving `models`.
pub fn start(redis_url: &str, url: &str, models: Vec<String>) -> Result<Registered> {
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        anyhow::bail!("--advertise-url: expected http://HOST:PORT, got `{url}`");
    }
    let reg =
        Arc::new(Registration::new(redis_url, url, HEARTBEAT * 3).map_err(anyhow::Error::msg).context("--register")?);
    let record = InstanceRecord { url: url.trim_end_matches('/').to_string(), models };
    let r = reg.clone();
    let task = tokio::spawn(async move {
        loop {
            if let Err(e) = r.beat(&record).await {
                tracing::debug!(error = %e, "registry heartbeat failed");
            }
            tokio::time::sleep(HEARTBEAT).await;
        }
    });
    tracing::info!(registry = redis_url, url, "registered in the fleet");
    Ok(Registered { reg, task })
}

impl Registered {
    /// Stops the heartbeat and deletes the entry.
    pub async fn leave(self) {
        self.task.abort();
        if let Err(e) = self.reg.leave().await {
            tracing::warn!(error = %e, "could not remove this instance from the registry; it expires by itself");
        }
    }
}
