//! Runs the model for requests: batch metadata over the paged KV cache, logits processors, sampling.
//!
//! Owns: the per-request [`Sampler`], the engine's batched [`ModelExecutor`] (with images' encoder runs inside
//! prefill, [`vision`]), and a single-sequence
//! generation loop ([`generate`]) used by the `generate` CLI and the golden tests. Must not know about: HTTP, the wire format.

pub mod draft;
pub mod executor;
pub mod generate;
pub mod sampler;
pub mod speculative;
pub mod vision;

pub use draft::DraftModel;
pub use executor::{parallel_sampling_steps, ModelExecutor, DEFAULT_ENCODER_CACHE_BYTES};
pub use generate::{
    generate, generate_speculative, generate_with, last_position_logits, GenerateError, GenerateOptions, Generation,
    SpecCounts,
};
pub use sampler::{argmax, logprob, Sampler};
pub use speculative::{SpecMethod, SpeculativeConfig, Speculator};
