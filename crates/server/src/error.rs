//! One error type for every API failure, written as OpenAI's envelope
//! `{"error": {"message", "type", "param", "code"}}` with the matching status code.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use mlx_serving_protocol::{ErrorBody, ErrorResponse};

#[derive(Clone, Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub param: Option<String>,
    pub code: Option<String>,
}

impl ApiError {
    pub fn bad_request(message: impl Into<String>, param: Option<&str>) -> Self {
        Self { status: StatusCode::BAD_REQUEST, message: message.into(), param: param.map(String::from), code: None }
    }

    pub fn with_code(mut self, code: &str) -> Self {
        self.code = Some(code.into());
        self
    }

    pub fn model_not_found(model: &str) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            message: format!("The model `{model}` does not exist."),
            param: Some("model".into()),
            code: Some("model_not_found".into()),
        }
    }

    pub fn unauthorized(message: &str) -> Self {
        Self {
            status: StatusCode::UNAUTHORIZED,
            message: message.into(),
            param: None,
            code: Some("invalid_api_key".into()),
        }
    }

    pub fn timeout(message: &str) -> Self {
        Self { status: StatusCode::GATEWAY_TIMEOUT, message: message.into(), param: None, code: Some("timeout".into()) }
    }

    pub fn overloaded(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::TOO_MANY_REQUESTS,
            message: message.into(),
            param: None,
            code: Some("overloaded".into()),
        }
    }

    /// A refusal with its own status: 403 (not allowed here), 409 (conflicts with what exists).
    pub fn refused(status: StatusCode, message: impl Into<String>, code: &str) -> Self {
        Self { status, message: message.into(), param: None, code: Some(code.into()) }
    }

    /// The service cannot take the request now (503, with `Retry-After`): no room to load its model.
    pub fn unavailable(message: impl Into<String>, code: &str) -> Self {
        Self { status: StatusCode::SERVICE_UNAVAILABLE, message: message.into(), param: None, code: Some(code.into()) }
    }

    /// A server-side failure the client should know about (500): a model that cannot load.
    pub fn server(message: impl Into<String>, code: &str) -> Self {
        Self {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: message.into(),
            param: None,
            code: Some(code.into()),
        }
    }

    /// A body that is not declared as JSON (415): answering it would let a web page make a browser send a
    /// `text/plain` "simple request" (no CORS preflight) to a local server.
    pub fn unsupported_media_type(given: &str) -> Self {
        Self {
            status: StatusCode::UNSUPPORTED_MEDIA_TYPE,
            message: format!("Content-Type `{given}` is not supported: send `application/json`"),
            param: None,
            code: Some("unsupported_media_type".into()),
        }
    }

    /// The body did not arrive whole in time (408).
    pub fn body_timeout(limit: std::time::Duration) -> Self {
        Self {
            status: StatusCode::REQUEST_TIMEOUT,
            message: format!("the request body did not arrive within {:.1} s", limit.as_secs_f64()),
            param: None,
            code: Some("request_timeout".into()),
        }
    }

    pub fn too_large(limit: usize) -> Self {
        Self {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            message: format!("request body exceeds {limit} bytes"),
            param: None,
            code: Some("request_too_large".into()),
        }
    }

    /// Internal failures: the client gets a generic message and the request id; details stay in the log.
    pub fn internal(request_id: &str) -> Self {
        Self {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: format!("internal error (request id {request_id})"),
            param: None,
            code: None,
        }
    }

    /// OpenAI's `type` for this status.
    pub fn kind(&self) -> &'static str {
        match self.status {
            StatusCode::BAD_REQUEST
            | StatusCode::PAYLOAD_TOO_LARGE
            | StatusCode::UNSUPPORTED_MEDIA_TYPE
            | StatusCode::REQUEST_TIMEOUT
            | StatusCode::CONFLICT => "invalid_request_error",
            StatusCode::FORBIDDEN => "permission_error",
            StatusCode::UNAUTHORIZED => "authentication_error",
            StatusCode::NOT_FOUND => "not_found_error",
            StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
            StatusCode::SERVICE_UNAVAILABLE => "service_unavailable",
            _ => "server_error",
        }
    }

    pub fn body(&self) -> ErrorResponse {
        ErrorResponse {
            error: ErrorBody {
                message: self.message.clone(),
                kind: self.kind().into(),
                param: self.param.clone(),
                code: self.code.clone(),
            },
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (self.status, axum::Json(self.body())).into_response();
        if matches!(self.status, StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE) {
            resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        resp
    }
}
