//! Where a model's tensors come from: a GGUF file or a Hugging Face directory of safetensors. The decoder
//! asks for tensors by their GGUF names (`blk.0.attn_q.weight`); each source maps them onto its own, and hands
//! out slices of its mapped files where the stored layout is one our kernels take (GGUF blocks, 16-bit
//! floats), so that loading copies each weight once: into its tiles.

use crate::error::{Error, Result};
use crate::gguf::GgufFile;
use candle_core::quantized::{ggml_file::qtensor_from_ggml, GgmlDType, QTensor};
use candle_core::Device;
use std::borrow::Cow;

/// One tensor's data in GGML's layout for `dtype`: borrowed from a mapped file, or owned where the loader
/// repacked it (MLX affine weights, gemma's norms).
pub struct TensorData<'a> {
    pub dtype: GgmlDType,
    /// Candle's order: `[out, in]` for a weight.
    pub shape: Vec<usize>,
    pub bytes: Cow<'a, [u8]>,
    /// Offsets per 32-value block, `[rows, cols / 32]` (see `QMatrix::with_block_mins`): MLX 8-bit weights
    /// come as Q8_0 blocks plus these.
    pub mins: Option<Vec<f32>>,
}

impl TensorData<'_> {
    /// A candle tensor of the data (a copy; offsets not included).
    pub fn to_qtensor(&self, device: &Device) -> candle_core::Result<QTensor> {
        // candle reads the bytes as a slice of its block or float type, which must be aligned: a tensor in a
        // mapped safetensors file can start at any byte (the format does not align its offsets), so such a
        // slice goes through a fresh allocation first (the allocator aligns those to 16 bytes).
        let aligned = |b: &[u8]| (b.as_ptr() as usize).is_multiple_of(16);
        if aligned(&self.bytes) {
            return qtensor_from_ggml(self.dtype, &self.bytes, self.shape.clone(), device);
        }
        let copy = self.bytes.to_vec();
        if !aligned(&copy) {
            return Err(candle_core::Error::Msg("could not get a 16-byte aligned buffer for the tensor".into()));
        }
        qtensor_from_ggml(self.dtype, &copy, self.shape.clone(), device)
    }

    /// The values, dequantized, offsets included.
    pub fn to_f32(&self) -> candle_core::Result<Vec<f32>> {
        let mut v = if self.dtype == GgmlDType::F32 {
            self.bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
        } else {
            let qt = self.to_qtensor(&Device::Cpu)?;
            qt.dequantize(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?
        };
        if let Some(m) = &self.mins {
            add_block_mins(&mut v, m);
        }
        Ok(v)
    }
}

pub trait TensorSource {
    /// The tensor with this GGUF name, checking its shape (candle's order: `[out, in]` for a weight).
    fn tensor_data(&self, name: &str, shape: &[usize]) -> Result<TensorData<'_>>;
    /// The error for a bad tensor, naming the file and the tensor.
    fn bad_tensor(&self, name: &str, reason: String) -> Error;

    /// The tensor dequantized to f32 (norms, biases, embeddings that stay dense).
    fn f32_values(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        self.tensor_data(name, shape)?.to_f32().map_err(|e| self.bad_tensor(name, e.to_string()))
    }
}

impl TensorSource for GgufFile {
    fn tensor_data(&self, name: &str, shape: &[usize]) -> Result<TensorData<'_>> {
        GgufFile::tensor_data(self, name, shape)
    }

    fn bad_tensor(&self, name: &str, reason: String) -> Error {
        GgufFile::bad_tensor(self, name, reason)
    }
}

/// Adds `mins` (one per 32 values) to dequantized `values`.
pub(crate) fn add_block_mins(values: &mut [f32], mins: &[f32]) {
    for (v, &m) in values.chunks_exact_mut(32).zip(mins) {
        v.iter_mut().for_each(|x| *x += m);
    }
}
