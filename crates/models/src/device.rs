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

    /// [`forward`](Self::forward) where the logits rows flagged in `argmax_only` (one flag per
    /// `batch.logits_indices` entry, or none at all: every row's logits) come back as their [`argmax`] alone: a request sampled greedily with
    /// nothing that reads its logits (no penalties, biases, constraint or logprobs) needs only that, and a GPU
    /// then copies back one token id instead of a vocabulary of logits. This default computes every row's logits
    /// and takes the argmax here.
    fn forward_select(
        &mut self,
        batch: &crate::BatchInput<'_>,
        argmax_only: &[bool],
        progress: &dyn Fn() -> bool,
    ) -> crate::Result<StepLogits> {
        let rows = batch.logits_indices.len();
        if !argmax_only.is_empty() && argmax_only.len() != rows {
            return Err(crate::Error::InvalidBatch(format!(
                "{} argmax flags for {rows} logits rows",
                argmax_only.len()
            )));
        }
        let logits = self.forward(batch, progress)?;
        Ok(match argmax_only {
            [] => StepLogits::all(logits, rows),
            flags => StepLogits::select(logits, flags),
        })
    }

    /// The device, in words (for logs).
    fn describe(&self) -> String;
}

/// A step's output per logits row: its logits, or (rows asked for the argmax alone) its argmax.
#[derive(Debug, Default, PartialEq)]
pub struct StepLogits {
    /// The logits of the rows that have them, `[rows, vocab]` in row order.
    pub logits: Vec<f32>,
    /// One entry per logits row: `Some(argmax)` for a row given as its argmax, `None` for one in `logits`.
    pub tokens: Vec<Option<u32>>,
}

impl StepLogits {
    /// Every row's logits, `[rows, vocab]`.
    pub fn all(logits: Vec<f32>, rows: usize) -> Self {
        Self { logits, tokens: vec![None; rows] }
    }

    /// From every row's logits (`argmax_only.len()` rows of equal width): the rows of `argmax_only` reduced to
    /// their argmax.
    pub fn select(logits: Vec<f32>, argmax_only: &[bool]) -> Self {
        if !argmax_only.contains(&true) {
            return Self::all(logits, argmax_only.len());
        }
        let vocab = logits.len() / argmax_only.len().max(1);
        let mut kept = Vec::with_capacity(logits.len());
        let tokens = logits
            .chunks_exact(vocab.max(1))
            .zip(argmax_only)
            .map(|(row, &only)| {
                if only {
                    Some(argmax(row))
                } else {
                    kept.extend_from_slice(row);
                    None
                }
            })
            .collect();
        Self { logits: kept, tokens }
    }
}

/// The greedy choice: the first index of the largest logit (NaNs never compare greater, so a NaN is chosen
/// only at index 0, where the scan starts). GPU argmax kernels give the same index.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
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

    #[test]
    fn selected_rows_keep_their_logits_and_the_others_their_argmax() {
        // 4 rows of 3: ties go to the first index; a NaN wins only at index 0.
        let logits = vec![0.0, 2.0, 2.0, 5.0, 1.0, 0.0, f32::NAN, 9.0, 1.0, 1.0, f32::NAN, 3.0];
        let out = StepLogits::select(logits.clone(), &[true, false, true, true]);
        assert_eq!(out.tokens, vec![Some(1), None, Some(0), Some(2)]);
        assert_eq!(out.logits, vec![5.0, 1.0, 0.0]);
        let none = StepLogits::select(logits.clone(), &[false; 4]);
        assert_eq!(none.tokens, vec![None; 4]);
        assert_eq!(none.logits.len(), 12);
        assert_eq!(argmax(&[f32::NEG_INFINITY, f32::NEG_INFINITY]), 0);
    }
}
