//! Model architectures, weight loading, tokenizers and chat templates.
//!
//! Owns: reading GGUF files into a [`Model`] (one decoder with capability flags covering the llama family
//! and qwen2), the paged KV cache storage the decoder reads and writes, building a `tokenizers::Tokenizer`
//! from GGUF metadata, and rendering the model's own Jinja chat template.
//!
//! Invariants: models are immutable after load; all per-request state (KV blocks, positions) is passed
//! into [`Model::forward`] from outside. Load errors name the file and the tensor or key; nothing here panics
//! on bad input files.
//!
//! Must not know about: requests, scheduling, sampling, HTTP.

pub mod bundle;
pub mod chat_template;
pub mod chat_tokens;
pub mod config;
pub mod decoder;
pub mod device;
pub mod error;
pub mod export;
#[doc(hidden)]
pub mod fuzzing;
pub mod gguf;
mod gguf_header;
pub mod hf;
pub mod kv;
pub mod random;
pub mod resolve;
pub mod source;
pub mod tokenizer;
pub mod vision;

pub use bundle::{ChatContent, ModelBundle};
pub use chat_template::ChatTemplate;
pub use chat_tokens::{SpecialTokenText, TokenBytes};
pub use config::{Architecture, FfnActivation, ModelConfig, RopeStyle, SlidingWindow};
pub use decoder::{ActivationPrecision, LoadOptions, Model};
pub use device::{argmax, ComputeDevice, DeviceModel, StepLogits};
pub use error::{Error, Result};
pub use gguf::GgufFile;
pub use kv::{BatchInput, PagedKvCache, SeqInput};
pub use mlx_serving_kernels::Activations;
pub use resolve::{probe, resolve_model, weight_bytes};
pub use tokenizer::{load_tokenizer, tokenizer_from_gguf, SpecialTokens};
pub use vision::{HeldBytes, ImagePixels, ImageProcessing, PixelLayout, VisionModel};
