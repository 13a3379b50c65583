//! The model on the device `--device` names: nothing to build for the CPU (the bundle's model runs there), the
//! GPU executor's model for `cuda[:N]` (a binary built with `--features cuda`).

use anyhow::Result;
use mlx_serving_models::{ComputeDevice, DeviceModel, ModelBundle};
use std::path::Path;

/// The model at `path` (already loaded as `bundle`) on `device` with a paged KV cache of `num_blocks` blocks of
/// `block_size` tokens, or `None` on the CPU.
pub(crate) fn device_model(
    device: ComputeDevice,
    path: &Path,
    bundle: &ModelBundle,
    block_size: usize,
    num_blocks: usize,
) -> Result<Option<Box<dyn DeviceModel>>> {
    match device {
        ComputeDevice::Cpu => Ok(None),
        ComputeDevice::Cuda(n) => cuda(n, path, bundle, block_size, num_blocks).map(Some),
    }
}

#[cfg(feature = "cuda")]
fn cuda(
    n: usize,
    path: &Path,
    bundle: &ModelBundle,
    block_size: usize,
    num_blocks: usize,
) -> Result<Box<dyn DeviceModel>> {
    let start = std::time::Instant::now();
    let m = mlx_serving_cuda::CudaModel::load(path, bundle.model.config(), n, block_size, num_blocks)?;
    tracing::info!(device = %m.describe(), seconds = start.elapsed().as_secs_f64(), kv_blocks = num_blocks, "model on the GPU");
    Ok(Box::new(m))
}

#[cfg(not(feature = "cuda"))]
fn cuda(n: usize, _: &Path, _: &ModelBundle, _: usize, _: usize) -> Result<Box<dyn DeviceModel>> {
    let e = ComputeDevice::Cuda(n).check_available().err().unwrap_or_else(|| "no GPU executor in this build".into());
    anyhow::bail!("--device {e}")
}
