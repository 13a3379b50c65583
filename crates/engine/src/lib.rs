//! The engine core: requests, the scheduler, and the `EngineCore` loop on its own thread.
//!
//! Invariants: no tensors and no I/O in the scheduler; everything is plain data so it compiles and tests in
//! seconds. The model is reached only through the [`Executor`] trait. Must not know about: candle,
//! tokenizers, HTTP.

pub mod constraint;
pub mod core;
pub mod ngram;
pub mod params;
pub mod request;
pub mod scheduler;

pub use crate::core::{
    EngineCore, EngineHandle, EngineStats, Executor, ExecutorError, Heartbeat, ENCODER_TIME_BUCKETS,
    MAX_SPECULATIVE_TOKENS,
};
pub use constraint::{mask_allows, Constraint, ConstraintState, MASK_TIME_BUCKETS};
pub use params::{FinishReason, ParamError, SamplingParams, MAX_LOGPROBS};
pub use request::{EngineOutput, EngineRequest, MmInput, Priority, Request, RequestId, RequestStatus, TokenLogprobs};
pub use scheduler::{
    AddError, NewRequestData, RunnerOutput, ScheduledSeq, Scheduler, SchedulerConfig, SchedulerOutput,
};
