//! The edge between wire requests and the engine, and the per-request output stream.
//!
//! Owns (so far): incremental detokenization that never emits broken UTF-8, and stop-string matching that
//! catches a stop string split across deltas and never emits it, tool calls found in the output as it
//! streams, images decoded within limits and preprocessed for vision encoders. Must not know about: tensors, scheduling.

pub mod detokenizer;
pub mod image;
pub mod stop;
pub mod tool_calls;

pub use detokenizer::IncrementalDetokenizer;
pub use stop::StopMatcher;
pub use tool_calls::{ToolCall, ToolCallParser, ToolEvent};
