//! Hot loops that candle does not do fast enough on the CPU.
//!
//! Owns: paged attention over a block-structured KV cache (optionally over a sliding window), matrix products
//! with GGUF block-quantized weights (`quant`), with 16-bit float weights (`half_matmul`) and with f32 weights for
//! many rows (`f32_matmul`), the worker pool,
//! RoPE, the small vector primitives they need, and read-only file maps (`mapped`: the one place model files are
//! mapped, as it needs `unsafe`).
//! Every fast kernel here has a plain reference version (`*_reference`) and a randomized test against it.
//! Must not know about: models, tokenizers, requests, candle tensors. Inputs are plain slices with the
//! layouts documented on each function, so the engine crates stay free of candle.

pub mod attention;
pub mod f32_matmul;
pub mod half_matmul;
pub mod mapped;
pub mod pool;
pub mod quant;
pub mod rope;
pub mod vec;

pub use attention::{paged_attention, paged_attention_reference, AttnSeq, KvDtype, KvElem, KvLayout};
pub use f32_matmul::{f32_matmul, f32_matmul_serial, F32Matrix};
pub use half_matmul::{half_matmul, HalfKind, HalfMatrix};
pub use quant::{qmatmul, qmatmul_reference, Activations, Isa, QMatrix, QuantFormat};
