//! Output constraints as the engine carries them. A request's constraint (a JSON schema, a grammar, ...) is
//! compiled before it is queued; the executor makes each sequence's state from it on the sequence's first
//! step, masks the logits with it every step, and advances it over each sampled token. The engine itself
//! never looks inside: it passes the constraint along and ends the request when the executor says the
//! constraint is complete, or failed.

use std::fmt::Debug;

/// A compiled constraint on a request's output.
pub trait Constraint: Send + Sync + Debug {
    /// A fresh state for one sequence, at the start of its output.
    fn start(&self) -> Result<Box<dyn ConstraintState>, String>;
    /// A short name of the kind of constraint (`json_schema`, `regex`, ...), for metrics and logs.
    fn kind(&self) -> &'static str;
}

/// One sequence's progress through its constraint.
pub trait ConstraintState: Send {
    /// The tokens allowed next, as a bit mask over the vocabulary: token `t` is allowed when bit `t % 32` of
    /// word `t / 32` is set. Once the constraint is complete, only the end-of-sequence token.
    fn allowed(&mut self) -> Result<Vec<u32>, String>;
    /// Moves past `token`, which the last mask allowed.
    fn advance(&mut self, token: u32) -> Result<(), String>;
    /// The output matches and nothing more may follow: the sequence is done.
    fn is_complete(&self) -> bool;
}

/// Whether bit mask `mask` (see [`ConstraintState::allowed`]) allows `token`.
pub fn mask_allows(mask: &[u32], token: u32) -> bool {
    mask.get(token as usize / 32).is_some_and(|w| w >> (token % 32) & 1 == 1)
}

/// Bounds (seconds) of the mask-time histogram in [`crate::EngineStats`]: from 10 µs to 1 s.
pub const MASK_TIME_BUCKETS: [f64; 12] =
    [0.00001, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.1, 1.0];
