//! `mlx-serving rpc`: the JSON-RPC runtime over stdio (crate `mlx-serving-rpc`), on the same settings, models
//! and app as `serve`. Only JSON-RPC goes to stdout; logs go to stderr.

use crate::serve::{prepare, Prepared, ServeArgs};
use anyhow::Result;

pub fn run_rpc(a: ServeArgs) -> Result<()> {
    let Some(Prepared { c, state, single, .. }) = prepare(&a, true)? else { return Ok(()) };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(async move {
        crate::serve::preload(&state, single).await?;
        let info = mlx_serving_rpc::RuntimeInfo {
            version: env!("CARGO_PKG_VERSION").to_string(),
            max_line_bytes: c.server.max_body_bytes,
        };
        let app = mlx_serving_server::router(state);
        let stdin = tokio::io::BufReader::new(tokio::io::stdin());
        mlx_serving_rpc::run(app, stdin, tokio::io::stdout(), info).await?;
        Ok(())
    })
}
