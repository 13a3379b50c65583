//! Where a model's tensors come from: a GGUF file or a Hugging Face directory of safetensors. The decoder
//! asks for tensors by their GGUF names (`blk.0.attn_q.weight`); each source maps them onto its own.

use crate::error::{Error, Result};
use crate::gguf::GgufFile;
use candle_core::quantized::QTensor;
use candle_core::Device;

pub trait TensorSource {
    /// Loads the tensor with this GGUF name, checking its shape (candle's order: `[out, in]` for a weight).
    fn tensor(&mut self, name: &str, shape: &[usize], device: &Device) -> Result<QTensor>;
    /// The error for a bad tensor, naming the file and the tensor.
    fn bad_tensor(&self, name: &str, reason: String) -> Error;
    /// Per-32-block offsets that go with the tensor `tensor(name)` returned (`[rows, cols / 32]`, see
    /// `QMatrix::with_block_mins`): MLX 8-bit weights come as Q8_0 blocks plus these.
    fn block_mins(&self, _name: &str) -> Option<&[f32]> {
        None
    }
}

/// Adds `mins` (one per 32 values, `block_mins`) to dequantized `values`.
pub(crate) fn add_block_mins(values: &mut [f32], mins: &[f32]) {
    for (v, &m) in values.chunks_exact_mut(32).zip(mins) {
        v.iter_mut().for_each(|x| *x += m);
    }
}

impl TensorSource for GgufFile {
    fn tensor(&mut self, name: &str, shape: &[usize], device: &Device) -> Result<QTensor> {
        GgufFile::tensor(self, name, shape, device)
    }

    fn bad_tensor(&self, name: &str, reason: String) -> Error {
        GgufFile::bad_tensor(self, name, reason)
    }
}
