//! Runs the model for requests: batch metadata over the paged KV cache, logits processors, sampling.
//!
//! Owns (so far): the per-request [`Sampler`] and a single-sequence generation loop ([`generate`]) used by
//! the `generate` CLI and the golden tests; the batched `Executor` for the engine builds on the same
//! pieces. Must not know about: HTTP, the wire format.

pub mod generate;
pub mod sampler;

pub use generate::{generate, GenerateError, GenerateOptions, Generation};
pub use sampler::{argmax, logprob, Sampler};
