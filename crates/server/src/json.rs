//! `ApiJson<T>`: the JSON body extractor. A malformed body, a wrong type or an unknown field is an
//! OpenAI-shaped 400 that says what is wrong; an oversized body is a 413; a body declared as anything but
//! JSON (`application/json`, `*/*+json`, or no Content-Type at all) is a 415, as FastAPI (and so vLLM)
//! answers, so that a web page cannot drive a keyless local server with a no-preflight `text/plain` POST.

use crate::error::ApiError;
use crate::AppState;
use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use serde::de::DeserializeOwned;
use std::sync::Arc;

pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned> FromRequest<Arc<AppState>> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &Arc<AppState>) -> Result<Self, ApiError> {
        if let Some(ct) = req.headers().get(axum::http::header::CONTENT_TYPE) {
            let given = String::from_utf8_lossy(ct.as_bytes());
            if !is_json(&given) {
                return Err(ApiError::unsupported_media_type(&given));
            }
        }
        let limit = state.options.max_body_bytes;
        let deadline = state.options.body_read_timeout;
        let bytes = tokio::time::timeout(deadline, Bytes::from_request(req, state))
            .await
            .map_err(|_| ApiError::body_timeout(deadline))?
            .map_err(|_| ApiError::too_large(limit))?;
        if bytes.len() > limit {
            return Err(ApiError::too_large(limit));
        }
        parse_body(&bytes).map(ApiJson)
    }
}

/// A request body as `T`: UTF-8 JSON with every field known and typed; the error names the field.
pub(crate) fn parse_body<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let text =
        std::str::from_utf8(bytes).map_err(|_| ApiError::bad_request("request body is not valid UTF-8", None))?;
    let mut de = serde_json::Deserializer::from_str(text);
    serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner().to_string();
        // Wrong types are located by their path; at the root, unknown/missing fields name themselves in
        // serde's message.
        let param = if path == "." { field_of(&inner) } else { Some(path.clone()) };
        let at = if path == "." { String::new() } else { format!(" (at `{path}`)") };
        ApiError::bad_request(format!("invalid request body: {inner}{at}"), param.as_deref())
    })
}

/// `application/json` or any `type/subtype+json`, parameters (`; charset=utf-8`) ignored.
fn is_json(content_type: &str) -> bool {
    let mime = content_type.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    let Some((kind, subtype)) = mime.split_once('/') else {
        return false;
    };
    !kind.is_empty() && (subtype == "json" && kind == "application" || subtype.ends_with("+json"))
}

/// Pulls a field name out of serde's messages ("unknown field `x`", "missing field `x`").
fn field_of(msg: &str) -> Option<String> {
    let start = msg.find('`')? + 1;
    let end = start + msg[start..].find('`')?;
    Some(msg[start..end].to_string())
}
