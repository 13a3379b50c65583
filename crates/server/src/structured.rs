//! Structured output on the wire: OpenAI's `response_format` and vLLM's `structured_outputs`, read into a
//! [`Spec`] and compiled against the model's vocabulary before the request is queued. A field that asks for
//! a constraint is honoured or refused with a 400 naming it; it is never accepted and ignored.

use crate::error::ApiError;
use crate::models::ServedModel;
use mlx_serving_constraints::{Compiled, Spec};
use serde_json::Value;
use std::sync::Arc;

/// Largest schema, regex, grammar or choice list a request may carry, serialized (bytes).
pub const MAX_CONSTRAINT_BYTES: usize = 64 * 1024;

/// The constraint a request asks for, and the field that asked (for errors).
pub struct Wanted {
    pub spec: Spec,
    pub field: String,
}

fn bad(msg: impl Into<String>, field: &str) -> ApiError {
    ApiError::bad_request(msg.into(), Some(field))
}

/// Reads `response_format`, `structured_outputs` and vLLM's older `guided_json` / `guided_regex` /
/// `guided_choice` / `guided_grammar` (at most one of them may constrain).
pub fn wanted(
    (response_format, structured_outputs, guided): (Option<&Value>, Option<&Value>, Vec<(&'static str, &Value)>),
) -> Result<Option<Wanted>, ApiError> {
    let from_rf = response_format.map(read_response_format).transpose()?.flatten();
    let from_guided = match guided.as_slice() {
        [] => None,
        [(key, value)] => {
            let member = key.trim_start_matches("guided_");
            let mut w = read_structured_outputs(&serde_json::json!({ member: value })).map_err(|mut e| {
                e.param = Some(key.to_string());
                e
            })?;
            w.field = key.to_string();
            Some(w)
        }
        _ => {
            return Err(bad(
                "give at most one of guided_json, guided_regex, guided_choice, guided_grammar",
                guided[1].0,
            ))
        }
    };
    let from_so = structured_outputs.map(read_structured_outputs).transpose()?;
    let from_so = match (from_so, from_guided) {
        (Some(_), Some(g)) => {
            return Err(bad("give either structured_outputs or a guided_* field, not both", &g.field))
        }
        (a, b) => a.or(b),
    };
    let w = match (from_rf, from_so) {
        (Some(_), Some(_)) => {
            return Err(bad("give either response_format or structured_outputs, not both", "structured_outputs"))
        }
        (a, b) => a.or(b),
    };
    if let Some(w) = &w {
        let size = match &w.spec {
            Spec::JsonObject => 0,
            Spec::JsonSchema(v) => v.to_string().len(),
            Spec::Regex(s) | Spec::Grammar(s) => s.len(),
            Spec::Choice(c) => c.iter().map(|s| s.len() + 3).sum(),
            // Bounded by the body size and `MAX_TOOLS`; never built from these fields.
            Spec::ToolCalls(_) => 0,
        };
        if size > MAX_CONSTRAINT_BYTES {
            return Err(bad(format!("at most {MAX_CONSTRAINT_BYTES} bytes, got {size}"), &w.field));
        }
    }
    Ok(w)
}

/// OpenAI's `response_format`: `{"type": "text"}` (no constraint), `{"type": "json_object"}`, or
/// `{"type": "json_schema", "json_schema": {"name", "schema", "strict", "description"}}`.
fn read_response_format(v: &Value) -> Result<Option<Wanted>, ApiError> {
    let f = "response_format";
    let o = v.as_object().ok_or_else(|| bad("must be an object with a `type`", f))?;
    let allow = |keys: &[&str], obj: &serde_json::Map<String, Value>, field: &str| -> Result<(), ApiError> {
        match obj.keys().find(|k| !keys.contains(&k.as_str())) {
            Some(k) => Err(bad(format!("unknown field `{k}`"), field)),
            None => Ok(()),
        }
    };
    match o.get("type").and_then(Value::as_str) {
        Some("text") => {
            allow(&["type"], o, f)?;
            Ok(None)
        }
        Some("json_object") => {
            allow(&["type"], o, f)?;
            Ok(Some(Wanted { spec: Spec::JsonObject, field: f.into() }))
        }
        Some("json_schema") => {
            allow(&["type", "json_schema"], o, f)?;
            let f = "response_format.json_schema";
            let js = o.get("json_schema").and_then(Value::as_object).ok_or_else(|| bad("must be an object", f))?;
            allow(&["name", "schema", "strict", "description"], js, f)?;
            match js.get("name") {
                Some(Value::String(n)) if valid_name(n) => {}
                Some(Value::String(n)) => {
                    return Err(bad(
                        format!("`{n}` is not a valid name (1-64 of a-z, A-Z, 0-9, _ and -)"),
                        "response_format.json_schema.name",
                    ))
                }
                _ => return Err(bad("a string `name` is required", "response_format.json_schema.name")),
            }
            if js.get("strict").is_some_and(|s| !s.is_boolean()) {
                return Err(bad("must be a boolean", "response_format.json_schema.strict"));
            }
            let field = "response_format.json_schema.schema".to_string();
            // OpenAI allows the schema to be left out: then any JSON object.
            let spec = match js.get("schema") {
                None => Spec::JsonObject,
                Some(s @ (Value::Object(_) | Value::Bool(_))) => Spec::JsonSchema(s.clone()),
                Some(_) => return Err(bad("must be a JSON schema (an object)", &field)),
            };
            Ok(Some(Wanted { spec, field }))
        }
        Some(other) => {
            Err(bad(format!("type must be text, json_object or json_schema, got `{other}`"), "response_format.type"))
        }
        None => Err(bad("a string `type` is required", "response_format.type")),
    }
}

/// OpenAI's rule for function and schema names.
pub fn valid_name(n: &str) -> bool {
    (1..=64).contains(&n.len()) && n.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// vLLM's `structured_outputs`: exactly one of `json` (a schema, or its JSON text), `regex`, `choice`,
/// `grammar` (Lark), `json_object: true`.
fn read_structured_outputs(v: &Value) -> Result<Wanted, ApiError> {
    let f = "structured_outputs";
    let o = v.as_object().ok_or_else(|| bad("must be an object", f))?;
    const KINDS: [&str; 5] = ["json", "regex", "choice", "grammar", "json_object"];
    if let Some(k) = o.keys().find(|k| !KINDS.contains(&k.as_str())) {
        return Err(bad(format!("unknown field `{k}` (one of json, regex, choice, grammar, json_object)"), f));
    }
    let set: Vec<(&String, &Value)> = o.iter().filter(|(_, v)| !v.is_null()).collect();
    let [(key, value)] = set[..] else {
        return Err(bad(format!("exactly one of json, regex, choice, grammar or json_object, got {}", set.len()), f));
    };
    let field = format!("structured_outputs.{key}");
    let spec = match (key.as_str(), value) {
        ("json", Value::String(text)) => match serde_json::from_str::<Value>(text) {
            Ok(s @ (Value::Object(_) | Value::Bool(_))) => Spec::JsonSchema(s),
            Ok(_) => return Err(bad("must be a JSON schema (an object)", &field)),
            Err(e) => return Err(bad(format!("not valid JSON: {e}"), &field)),
        },
        ("json", s @ (Value::Object(_) | Value::Bool(_))) => Spec::JsonSchema(s.clone()),
        ("json", _) => return Err(bad("must be a JSON schema (an object, or its JSON text)", &field)),
        ("regex", Value::String(r)) => Spec::Regex(r.clone()),
        ("regex", _) => return Err(bad("must be a string", &field)),
        ("grammar", Value::String(g)) => Spec::Grammar(g.clone()),
        ("grammar", _) => return Err(bad("must be a string (a Lark grammar)", &field)),
        ("choice", Value::Array(items)) => {
            let choices: Option<Vec<String>> = items.iter().map(|c| c.as_str().map(str::to_string)).collect();
            match choices {
                Some(c) if !c.is_empty() => Spec::Choice(c),
                _ => return Err(bad("must be a non-empty list of strings", &field)),
            }
        }
        ("choice", _) => return Err(bad("must be a non-empty list of strings", &field)),
        ("json_object", Value::Bool(true)) => Spec::JsonObject,
        ("json_object", _) => return Err(bad("must be true", &field)),
        _ => unreachable!("keys checked above"),
    };
    Ok(Wanted { spec, field })
}

/// Compiles `w` against the model (building its vocabulary on first use); a bad schema, regex or grammar is a
/// 400 naming the field. Blocking: run it on the CPU pool (a large schema takes milliseconds).
pub fn compile(s: &ServedModel, w: &Wanted, request_id: &str) -> Result<Arc<Compiled>, ApiError> {
    let vocab = s.constraint_vocab().map_err(|e| {
        tracing::error!(error = %e, "building the constraint vocabulary failed");
        ApiError::internal(request_id)
    })?;
    vocab.compile(&w.spec).map_err(|e| bad(format!("invalid {}: {e}", w.spec.kind()), &w.field))
}
