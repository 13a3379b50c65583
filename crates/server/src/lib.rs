//! The OpenAI-compatible HTTP API (axum): routes, the JSON extractor, SSE streaming, and the one place
//! errors become OpenAI error envelopes.
//!
//! Talks to the engine only through its `EngineHandle`. Every request gets an abort guard whose `Drop`
//! aborts it in the engine, so a client that goes away frees its KV blocks.
//! Must not know about: tensors, scheduling internals.

mod error;
mod generate;
mod json;
mod params;

pub use error::ApiError;

use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use mlx_serving_engine::EngineHandle;
use mlx_serving_models::ModelBundle;
use serde_json::json;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

/// Largest request body accepted.
pub const MAX_BODY_BYTES: usize = 4 << 20;

/// A heartbeat older than this makes `/health` answer 503.
pub const HEARTBEAT_LIMIT: Duration = Duration::from_secs(10);

pub struct AppState {
    pub engine: EngineHandle,
    pub bundle: Arc<ModelBundle>,
    pub model_name: String,
    pub created: u64,
    next_id: AtomicU64,
}

impl AppState {
    pub fn new(engine: EngineHandle, bundle: Arc<ModelBundle>, model_name: String) -> Self {
        let created = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        Self { engine, bundle, model_name, created, next_id: AtomicU64::new(1) }
    }

    fn check_model(&self, model: &str) -> Result<(), ApiError> {
        if model == self.model_name {
            Ok(())
        } else {
            Err(ApiError::model_not_found(model))
        }
    }
}

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/v1/models", get(list_models))
        .route("/v1/models/{id}", get(get_model))
        .route("/v1/completions", post(generate::completions))
        .route("/v1/chat/completions", post(generate::chat_completions))
        .route("/tokenize", post(generate::tokenize))
        .route("/detokenize", post(generate::detokenize))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

async fn health(State(s): State<Arc<AppState>>) -> Response {
    let age = s.engine.heartbeat_age();
    if age < HEARTBEAT_LIMIT {
        Json(json!({"status": "ok"})).into_response()
    } else {
        let body =
            json!({"status": "unhealthy", "reason": format!("engine loop silent for {:.1} s", age.as_secs_f64())});
        (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
    }
}

fn model_card(s: &AppState) -> serde_json::Value {
    json!({
        "id": s.model_name,
        "object": "model",
        "created": s.created,
        "owned_by": "mlx-serving",
        "max_model_len": s.engine.config().max_model_len,
    })
}

async fn list_models(State(s): State<Arc<AppState>>) -> Json<serde_json::Value> {
    Json(json!({"object": "list", "data": [model_card(&s)]}))
}

async fn get_model(
    State(s): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    s.check_model(&id)?;
    Ok(Json(model_card(&s)))
}

async fn not_found() -> ApiError {
    ApiError {
        status: StatusCode::NOT_FOUND,
        message: "no such endpoint".into(),
        param: None,
        code: Some("not_found".into()),
    }
}
