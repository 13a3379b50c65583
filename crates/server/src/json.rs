//! `ApiJson<T>`: the JSON body extractor. A malformed body, a wrong type or an unknown field is an
//! OpenAI-shaped 400 that says what is wrong; an oversized body is a 413.

use crate::error::ApiError;
use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use serde::de::DeserializeOwned;

pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let limit = crate::MAX_BODY_BYTES;
        let bytes = Bytes::from_request(req, state).await.map_err(|_| ApiError::too_large(limit))?;
        if bytes.len() > limit {
            return Err(ApiError::too_large(limit));
        }
        let text =
            std::str::from_utf8(&bytes).map_err(|_| ApiError::bad_request("request body is not valid UTF-8", None))?;
        serde_json::from_str(text).map(ApiJson).map_err(|e| {
            let param = field_of(&e.to_string());
            ApiError::bad_request(format!("invalid request body: {e}"), param.as_deref())
        })
    }
}

/// Pulls a field name out of serde's messages ("unknown field `x`", "missing field `x`").
fn field_of(msg: &str) -> Option<String> {
    let start = msg.find('`')? + 1;
    let end = start + msg[start..].find('`')?;
    Some(msg[start..end].to_string())
}
