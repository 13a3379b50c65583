//! The model endpoints: `/v1/models` (every registered model, loaded or not, with its state as extensions),
//! `/v1/models/{id}`, the admin `POST /v1/models/{id}/load` and `/unload` (`?force=true` aborts the requests
//! in flight), `POST /v1/models` (a model served from files at run time, where the server allows it), and
//! Ollama's `GET /api/ps` for the scripts its users have.

use crate::error::ApiError;
use crate::json::ApiJson;
use crate::models::{registry_error, Registration, ServedModel};
use crate::AppState;
use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::Json;
use mlx_serving_services::{ModelInfo, ModelSpec, RegistryError, State as ModelState};
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Seconds since the Unix epoch of a moment given as an `Instant`.
fn unix_seconds(t: Instant) -> f64 {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    now.saturating_sub(t.elapsed()).as_secs_f64()
}

/// A model's card: OpenAI's fields, then its state.
fn card(s: &AppState, info: &ModelInfo, model: Option<&ServedModel>) -> Value {
    let mut c = json!({
        "id": info.name,
        "object": "model",
        "created": s.created,
        "owned_by": "mlx-serving",
        "loaded": info.state == ModelState::Loaded,
        "state": info.state.as_str(),
        "memory_bytes": info.memory,
        "aliases": info.aliases,
        "pinned": info.pinned,
        "ttl_seconds": info.ttl.map(|t| t.as_secs_f64()),
        "in_flight": info.in_flight,
        "load_time_seconds": info.load_time.map(|d| d.as_secs_f64()),
        "last_used": info.last_use.map(unix_seconds),
    });
    if let Some(m) = model {
        c["max_model_len"] = json!(m.engine.config().max_model_len);
        let vision = m.bundle.vision.is_some();
        c["capabilities"] = json!({"vision": vision});
        c["input_modalities"] = if vision { json!(["text", "image"]) } else { json!(["text"]) };
    }
    if let ModelState::Failed(e) = &info.state {
        c["error"] = json!(e);
    }
    c
}

fn card_of(s: &AppState, name: &str) -> Result<Value, ApiError> {
    let info = s.models.info(name).ok_or_else(|| ApiError::model_not_found(name))?;
    let loaded = s.models.loaded();
    let model = loaded.iter().find(|(n, _)| *n == info.name).map(|(_, m)| m.as_ref());
    Ok(card(s, &info, model))
}

pub async fn list_models(State(s): State<Arc<AppState>>) -> Json<Value> {
    let loaded = s.models.loaded();
    let data: Vec<Value> = s
        .models
        .list()
        .iter()
        .map(|info| card(&s, info, loaded.iter().find(|(n, _)| *n == info.name).map(|(_, m)| m.as_ref())))
        .collect();
    Json(json!({"object": "list", "data": data}))
}

pub async fn get_model(State(s): State<Arc<AppState>>, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    card_of(&s, &id).map(Json)
}

/// Loads the model now (as its first request would) and answers with its card once it is loaded.
pub async fn load_model(State(s): State<Arc<AppState>>, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    s.models.load(&id).await.map_err(registry_error)?;
    card_of(&s, &id).map(Json)
}

/// A model name or alias: what `--model` names allow (non-empty, no control characters), bounded.
fn check_name(n: &str, field: &str) -> Result<(), ApiError> {
    if n.is_empty() || n.len() > 256 || n.chars().any(char::is_control) {
        let msg = format!("{field} must be 1 to 256 bytes without control characters");
        return Err(ApiError::bad_request(msg, Some(field)));
    }
    Ok(())
}

/// `POST /v1/models`: serves one more model from files under a new name (`{"id", "path", "draft_model",
/// "aliases", "pinned", "ttl_seconds", "load"}`), answering with its card (once loaded, unless `load` is
/// false). Only where the server was given a model factory (`server.allow_model_registration`, and always
/// in `rpc`): otherwise 403, since a path names files on the server. The same id from the same files again
/// is not an error (it loads it); a taken id or alias is a 409.
pub async fn register_model(
    State(s): State<Arc<AppState>>,
    ApiJson(r): ApiJson<Registration>,
) -> Result<Json<Value>, ApiError> {
    let Some(factory) = s.options.model_factory.clone() else {
        let msg = "this server does not register models at run time (server.allow_model_registration is off)";
        return Err(ApiError::refused(StatusCode::FORBIDDEN, msg, "registration_disabled"));
    };
    check_name(&r.id, "id")?;
    for (i, a) in r.aliases.iter().enumerate() {
        check_name(a, &format!("aliases[{i}]"))?;
    }
    if r.aliases.len() > 16 {
        return Err(ApiError::bad_request("at most 16 aliases", Some("aliases")));
    }
    if let Some(t) = r.ttl_seconds.filter(|t| !(t.is_finite() && *t > 0.0 && *t <= 1e7)) {
        return Err(ApiError::bad_request(
            format!("ttl_seconds must be between 0 and 1e7, got {t}"),
            Some("ttl_seconds"),
        ));
    }
    let spec = ModelSpec {
        name: r.id.clone(),
        aliases: r.aliases.clone(),
        pinned: r.pinned,
        ttl: r.ttl_seconds.map(Duration::from_secs_f64),
        preload: false,
    };
    let req = r.clone();
    let source = s
        .on_cpu_pool("register", move || factory.source(&req))
        .await?
        .map_err(|(field, msg)| ApiError::bad_request(msg, Some(field)))?;
    let origin = source.origin();
    match s.register_model(spec, source) {
        Ok(()) => tracing::info!(model = %r.id, "model registered"),
        Err(RegistryError::Exists(n)) => {
            let same = n == r.id
                && origin.is_some()
                && s.models.config(&r.id).is_some_and(|c| c.name == r.id && c.source.origin() == origin);
            if !same {
                let msg = format!("the name `{n}` is already served (from other files, or as another model's name)");
                return Err(ApiError::refused(StatusCode::CONFLICT, msg, "model_exists"));
            }
        }
        Err(e) => return Err(registry_error(e)),
    }
    if r.load {
        s.models.load(&r.id).await.map_err(registry_error)?;
    }
    card_of(&s, &r.id).map(Json)
}

/// Unloads the model: waits for its requests in flight, or with `?force=true` aborts them (they end with
/// finish reason `abort`). New requests for it wait for the unload, then load it again.
pub async fn unload_model(
    State(s): State<Arc<AppState>>,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Json<Value>, ApiError> {
    let mut force = false;
    for pair in query.as_deref().unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=').unwrap_or((pair, "true")) {
            ("force", "true" | "1") => force = true,
            ("force", "false" | "0") => force = false,
            ("force", v) => {
                return Err(ApiError::bad_request(format!("force must be true or false, got `{v}`"), Some("force")))
            }
            (k, _) => return Err(ApiError::bad_request(format!("unknown query parameter `{k}`"), Some(k))),
        }
    }
    s.models.unload(&id, force).await.map_err(registry_error)?;
    card_of(&s, &id).map(Json)
}

/// Ollama's `GET /api/ps`: the loaded models.
pub async fn ollama_ps(State(s): State<Arc<AppState>>) -> Json<Value> {
    let loaded = s.models.loaded();
    let models: Vec<Value> = s
        .models
        .list()
        .iter()
        .filter_map(|info| {
            let (_, m) = loaded.iter().find(|(n, _)| *n == info.name)?;
            let arch = m.bundle.model.config().architecture.name();
            let format = if m.bundle.path.is_dir() { "safetensors" } else { "gguf" };
            // Ollama writes far-future expiry for models kept loaded.
            let expires = match (info.ttl, info.last_use) {
                (Some(ttl), Some(last)) => rfc3339(unix_seconds(last) + ttl.as_secs_f64()),
                _ => "9999-12-31T23:59:59Z".to_string(),
            };
            Some(json!({
                "name": info.name,
                "model": info.name,
                "size": info.memory,
                "digest": "",
                "details": {
                    "parent_model": "",
                    "format": format,
                    "family": arch,
                    "families": [arch],
                    "parameter_size": "",
                    "quantization_level": "",
                },
                "expires_at": expires,
                "size_vram": 0,
            }))
        })
        .collect();
    Json(json!({"models": models}))
}

/// `2026-12-04T20:00:07Z` for seconds since the Unix epoch (UTC; whole seconds).
fn rfc3339(unix: f64) -> String {
    let secs = Duration::try_from_secs_f64(unix).map_or(0, |d| d.as_secs());
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Days since 1970-01-01 to a civil date (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

#[cfg(test)]
mod tests {
    #[test]
    fn rfc3339_dates() {
        assert_eq!(super::rfc3339(0.0), "1970-01-01T00:00:00Z");
        assert_eq!(super::rfc3339(951_782_400.0), "2000-02-29T00:00:00Z");
        assert_eq!(super::rfc3339(1_796_414_407.0), "2026-12-04T20:00:07Z");
        // Out-of-range seconds give the epoch, never a panic.
        assert_eq!(super::rfc3339(f64::NAN), "1970-01-01T00:00:00Z");
        assert_eq!(super::rfc3339(-5.0), "1970-01-01T00:00:00Z");
    }
}
