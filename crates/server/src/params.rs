//! Wire request fields → engine `SamplingParams`, every value range-checked with the field named.

use crate::error::ApiError;
use mlx_serving_engine::{Priority, SamplingParams};
use mlx_serving_protocol::{SamplingFields as Fields, Stop};

/// Most choices one request may ask for.
pub const MAX_N: usize = 16;

/// Converts and validates. `default_max_tokens` applies when the client sends none.
/// Returns the parameters, the priority and the number of choices.
pub fn sampling_params(
    f: Fields,
    default_max_tokens: usize,
    prompt_len: usize,
    max_model_len: usize,
    vocab: usize,
) -> Result<(SamplingParams, Priority, usize), ApiError> {
    let n = match f.n {
        None => 1,
        Some(n) if (1..=MAX_N as i64).contains(&n) => n as usize,
        Some(n) => return Err(ApiError::bad_request(format!("n must be between 1 and {MAX_N}, got {n}"), Some("n"))),
    };
    let min_tokens = match f.min_tokens {
        None => 0,
        Some(m) if m >= 0 => u32::try_from(m).unwrap_or(u32::MAX),
        Some(m) => {
            return Err(ApiError::bad_request(format!("min_tokens must not be negative, got {m}"), Some("min_tokens")))
        }
    };
    let count = |v: Option<i64>, field: &str| match v {
        None => Ok(None),
        Some(k) if (0..=mlx_serving_engine::MAX_LOGPROBS as i64).contains(&k) => Ok(Some(k as u32)),
        Some(k) => Err(ApiError::bad_request(
            format!("{field} must be between 0 and {}, got {k}", mlx_serving_engine::MAX_LOGPROBS),
            Some(field),
        )),
    };
    let logprobs = count(f.logprobs, "logprobs")?;
    let prompt_logprobs = count(f.prompt_logprobs, "prompt_logprobs")?;
    let max_tokens = match f.max_tokens {
        Some(m) if m < 1 => {
            return Err(ApiError::bad_request(format!("max_tokens must be at least 1, got {m}"), Some("max_tokens")))
        }
        Some(m) => usize::try_from(m).unwrap_or(usize::MAX),
        None => default_max_tokens.max(1),
    };
    if prompt_len + max_tokens > max_model_len {
        return Err(ApiError::bad_request(
            format!(
                "This model's maximum context length is {max_model_len} tokens. However, you requested {} tokens ({prompt_len} in the prompt, {max_tokens} for the completion).",
                prompt_len.saturating_add(max_tokens)
            ),
            Some("max_tokens"),
        )
        .with_code("context_length_exceeded"));
    }
    let top_k = match f.top_k {
        None | Some(-1) | Some(0) => 0,
        Some(k) if k > 0 => u32::try_from(k).unwrap_or(u32::MAX),
        Some(k) => {
            return Err(ApiError::bad_request(format!("top_k must be -1 (off) or positive, got {k}"), Some("top_k")))
        }
    };
    let mut logit_bias = Vec::new();
    for (k, v) in f.logit_bias.unwrap_or_default() {
        let id: u32 = k.parse().map_err(|_| {
            ApiError::bad_request(format!("logit_bias key `{k}` is not a token id"), Some("logit_bias"))
        })?;
        logit_bias.push((id, v));
    }
    logit_bias.sort_by_key(|b| b.0);
    let priority = match f.priority.as_deref() {
        None | Some("normal") => Priority::Normal,
        Some("critical") => Priority::Critical,
        Some("high") => Priority::High,
        Some("low") => Priority::Low,
        Some(other) => {
            return Err(ApiError::bad_request(
                format!("priority must be critical, high, normal or low, got `{other}`"),
                Some("priority"),
            ))
        }
    };
    let p = SamplingParams {
        temperature: f.temperature.unwrap_or(1.0),
        top_p: f.top_p.unwrap_or(1.0),
        top_k,
        min_p: f.min_p.unwrap_or(0.0),
        repetition_penalty: f.repetition_penalty.unwrap_or(1.0),
        presence_penalty: f.presence_penalty.unwrap_or(0.0),
        frequency_penalty: f.frequency_penalty.unwrap_or(0.0),
        logit_bias,
        seed: f.seed.map(|s| s as u64),
        max_tokens: u32::try_from(max_tokens).unwrap_or(u32::MAX),
        stop: f.stop.map(Stop::into_vec).unwrap_or_default(),
        stop_token_ids: Vec::new(),
        ignore_eos: f.ignore_eos,
        min_tokens,
        logprobs,
        prompt_logprobs,
        speculative: f.speculative.unwrap_or(true),
    };
    p.validate(vocab).map_err(|e| ApiError::bad_request(e.message.clone(), Some(e.param)))?;
    Ok((p, priority, n))
}
