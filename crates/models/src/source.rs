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
}

impl TensorSource for GgufFile {
    fn tensor(&mut self, name: &str, shape: &[usize], device: &Device) -> Result<QTensor> {
        GgufFile::tensor(self, name, shape, device)
    }

    fn bad_tensor(&self, name: &str, reason: String) -> Error {
        GgufFile::bad_tensor(self, name, reason)
    }
}
