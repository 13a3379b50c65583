//! Where a model runs: `cpu` (the default) or `cuda[:N]`, the N-th NVIDIA GPU (`--device`, `engine.device`).

/// A compute device named by `--device`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ComputeDevice {
    #[default]
    Cpu,
    Cuda(usize),
}

impl std::str::FromStr for ComputeDevice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("`{s}`: expected cpu, cuda or cuda:N (N a GPU's index)");
        match s.trim().to_ascii_lowercase().as_str() {
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(0)),
            d => d.strip_prefix("cuda:").and_then(|n| n.parse().ok()).map(Self::Cuda).ok_or_else(bad),
        }
    }
}

impl std::fmt::Display for ComputeDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl ComputeDevice {
    /// Whether this binary can run a model here; the error says why not and what to do.
    pub fn check_available(self) -> Result<(), String> {
        match self {
            Self::Cpu => Ok(()),
            Self::Cuda(_) if !cfg!(feature = "cuda") => Err(format!(
                "{self}: this binary was built without CUDA; build it with `cargo build --release --features cuda` \
                 or run on the CPU (`--device cpu`, the default)"
            )),
            Self::Cuda(_) => Ok(()),
        }
    }
}

/// A model whose weights and paged KV cache live on a device (a GPU), stepping the same flattened batches as
/// the CPU [`Model`](crate::Model) with its [`PagedKvCache`](crate::PagedKvCache): the runner's executor calls
/// it in their place, and everything around the forward pass (scheduling, sampling, constraints, speculation)
/// stays as it is.
pub trait DeviceModel: Send {
    /// [`Model::forward_with_progress`](crate::Model::forward_with_progress) on the device: K/V written into the
    /// device's cache at each token's slot, and the logits of `batch.logits_indices` returned row-major
    /// `[logits_indices.len(), vocab_size]`.
    fn forward(&mut self, batch: &crate::BatchInput<'_>, progress: &dyn Fn() -> bool) -> crate::Result<Vec<f32>>;
    /// The device, in words (for logs).
    fn describe(&self) -> String;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_parse_and_a_cpu_build_refuses_cuda() {
        assert_eq!("cpu".parse(), Ok(ComputeDevice::Cpu));
        assert_eq!("CUDA".parse(), Ok(ComputeDevice::Cuda(0)));
        assert_eq!("cuda:3".parse(), Ok(ComputeDevice::Cuda(3)));
        for bad in ["gpu", "cuda:", "cuda:x", "cuda:-1", "metal"] {
            assert!(bad.parse::<ComputeDevice>().unwrap_err().contains("expected cpu, cuda or cuda:N"), "{bad}");
        }
        assert!(ComputeDevice::Cpu.check_available().is_ok());
        let e = ComputeDevice::Cuda(1).check_available().unwrap_err();
        assert!(e.starts_with("cuda:1: "), "{e}");
        if !cfg!(feature = "cuda") {
            assert!(e.contains("--features cuda"), "{e}");
        }
    }
}
