//! The engine core's vocabulary: per-request sampling parameters, finish reasons, and (with the batching
//! work) the scheduler and the `EngineCore` loop.
//!
//! Invariants: no tensors and no I/O here; everything is plain data so the scheduler compiles and tests in
//! seconds. Must not know about: candle, tokenizers, HTTP.

pub mod params;

pub use params::{FinishReason, ParamError, SamplingParams};
