use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Errors from loading or running a model. Each variant carries what the user needs to find the problem.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: not a GGUF file: {reason}")]
    NotGguf { path: PathBuf, reason: String },
    #[error("{path}: invalid GGUF: {reason}")]
    BadGguf { path: PathBuf, reason: String },
    #[error("{path}: missing metadata key `{key}`")]
    MissingMetadata { path: PathBuf, key: String },
    #[error("{path}: metadata key `{key}`: {reason}")]
    BadMetadata { path: PathBuf, key: String, reason: String },
    #[error("{path}: missing tensor `{name}`")]
    MissingTensor { path: PathBuf, name: String },
    #[error("{path}: tensor `{name}`: {reason}")]
    BadTensor { path: PathBuf, name: String, reason: String },
    #[error("{path}: unsupported architecture `{arch}` (supported: llama, qwen2)")]
    UnsupportedArchitecture { path: PathBuf, arch: String },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    Template(String),
    #[error("invalid batch: {0}")]
    InvalidBatch(String),
    /// The caller's progress callback asked to stop (every request of the step was abandoned).
    #[error("step cancelled")]
    Cancelled,
    /// A GPU (driver, kernel compilation, memory) failed.
    #[error("{0}")]
    Device(String),
    #[error("tensor op: {}", candle_text(.0))]
    Candle(#[from] candle_core::Error),
}

/// A candle error's message without the backtrace candle attaches when `RUST_BACKTRACE` is set (messages reach
/// API clients; a backtrace is neither theirs to read nor useful to them).
pub fn candle_text(e: &candle_core::Error) -> String {
    match e {
        candle_core::Error::WithBacktrace { inner, .. } => candle_text(inner),
        e => e.to_string(),
    }
}
