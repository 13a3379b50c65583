//! Entry point for coverage-guided fuzzing of request bodies (`fuzz/`, run by `scripts/fuzz.sh`) and for
//! the regression tests that replay its finds: a body read as every request type the API deserializes,
//! then checked the way the handlers check it before any model work. Errors are the expected answer to
//! malformed input; a panic or a hang is a failure.

use crate::json::parse_body;
use crate::models::Registration;
use mlx_serving_protocol::{ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest};

pub fn request(data: &[u8]) {
    if let Ok(mut r) = parse_body::<CompletionRequest>(data) {
        let mut f = r.sampling_fields();
        f.logprobs = r.logprobs;
        let _ = crate::params::sampling_params(f, 16, 8, 2048, 49152);
        let _ = crate::structured::wanted(r.constraint_fields());
    }
    if let Ok(mut r) = parse_body::<ChatCompletionRequest>(data) {
        let _ = crate::params::sampling_params(r.sampling_fields(), 4096, 8, 2048, 49152);
        let _ = crate::structured::wanted(r.constraint_fields());
        if let Ok(Some(t)) = crate::tools::read(r.tools.as_ref(), r.tool_choice.as_ref(), r.parallel_tool_calls) {
            let _ = t.parameter_specs().count();
        }
        let _ = crate::prompts::normalize_messages(&r.messages, true);
    }
    let _ = parse_body::<TokenizeRequest>(data);
    let _ = parse_body::<DetokenizeRequest>(data);
    let _ = parse_body::<Registration>(data);
}
