//! Tool calling on `/v1/chat/completions`: `tools`, `tool_choice` and `parallel_tool_calls` read and checked,
//! the tools handed to the model's chat template (or, for a template without tool support, described in a
//! system message in the Hermes form), and the constraint that keeps calls well formed: with `required` or a
//! named function the answer is calls only; with `auto` the model may answer in text, and a call it starts
//! is constrained from its opening tag on. The output is parsed by `mlx_serving_frontend::ToolCallParser`.

use crate::error::ApiError;
use crate::structured::valid_name;
use mlx_serving_constraints::{Spec, ToolCalls};
use serde_json::{json, Value};

/// Most tools one request may declare.
pub const MAX_TOOLS: usize = 128;

/// A request's tools, as checked.
#[derive(Clone, Debug)]
pub struct Tools {
    /// The `tools` array as given (what the chat template renders).
    pub declared: Vec<Value>,
    /// Each tool's name and parameter schema.
    pub schemas: Vec<(String, Value)>,
    pub choice: Choice,
    pub parallel: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Choice {
    None,
    Auto,
    Required,
    Named(String),
}

fn bad(msg: impl Into<String>, field: &str) -> ApiError {
    ApiError::bad_request(msg.into(), Some(field))
}

/// Reads `tools`, `tool_choice` and `parallel_tool_calls`. `None` when the request declares no tools.
pub fn read(
    tools: Option<&Value>,
    tool_choice: Option<&Value>,
    parallel: Option<bool>,
) -> Result<Option<Tools>, ApiError> {
    let declared = match tools {
        None | Some(Value::Null) => {
            return match tool_choice {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) if s == "none" => Ok(None),
                Some(_) => Err(bad("tool_choice is only allowed when tools are specified", "tool_choice")),
            };
        }
        Some(Value::Array(a)) => a,
        Some(_) => return Err(bad("must be a list of tools", "tools")),
    };
    if declared.is_empty() {
        return Err(bad("must not be empty (leave it out for no tools)", "tools"));
    }
    if declared.len() > MAX_TOOLS {
        return Err(bad(format!("at most {MAX_TOOLS} tools, got {}", declared.len()), "tools"));
    }
    let mut schemas = Vec::with_capacity(declared.len());
    for (i, t) in declared.iter().enumerate() {
        let field = format!("tools[{i}]");
        let o = t.as_object().ok_or_else(|| bad("must be an object", &field))?;
        if o.get("type").and_then(Value::as_str) != Some("function") {
            return Err(bad("type must be \"function\"", &format!("{field}.type")));
        }
        if let Some(k) = o.keys().find(|k| !matches!(k.as_str(), "type" | "function")) {
            return Err(bad(format!("unknown field `{k}`"), &field));
        }
        let f = o
            .get("function")
            .and_then(Value::as_object)
            .ok_or_else(|| bad("must be an object", &format!("{field}.function")))?;
        if let Some(k) = f.keys().find(|k| !matches!(k.as_str(), "name" | "description" | "parameters" | "strict")) {
            return Err(bad(format!("unknown field `{k}`"), &format!("{field}.function")));
        }
        let name = match f.get("name") {
            Some(Value::String(n)) if valid_name(n) => n.clone(),
            _ => {
                return Err(bad(
                    "a name of 1-64 of a-z, A-Z, 0-9, _ and - is required",
                    &format!("{field}.function.name"),
                ))
            }
        };
        if schemas.iter().any(|(n, _): &(String, Value)| *n == name) {
            return Err(bad(format!("two tools are named `{name}`"), &format!("{field}.function.name")));
        }
        let params = match f.get("parameters") {
            None => json!({"type": "object", "properties": {}}),
            Some(p @ Value::Object(_)) => p.clone(),
            Some(_) => return Err(bad("must be a JSON schema (an object)", &format!("{field}.function.parameters"))),
        };
        schemas.push((name, params));
    }
    let choice = match tool_choice {
        None | Some(Value::Null) => Choice::Auto,
        Some(Value::String(s)) => match s.as_str() {
            "none" => Choice::None,
            "auto" => Choice::Auto,
            "required" => Choice::Required,
            other => {
                return Err(bad(format!("must be none, auto, required or a function, got `{other}`"), "tool_choice"))
            }
        },
        Some(Value::Object(o)) => {
            let name = o
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str)
                .filter(|_| o.get("type").and_then(Value::as_str) == Some("function"))
                .ok_or_else(|| bad("must be {\"type\": \"function\", \"function\": {\"name\": ...}}", "tool_choice"))?;
            if !schemas.iter().any(|(n, _)| n == name) {
                return Err(bad(format!("names `{name}`, which is not in tools"), "tool_choice"));
            }
            Choice::Named(name.to_string())
        }
        Some(_) => return Err(bad("must be a string or an object", "tool_choice")),
    };
    Ok(Some(Tools { declared: declared.clone(), schemas, choice, parallel: parallel.unwrap_or(true) }))
}

impl Tools {
    /// The constraint for the calls (none with `tool_choice: "none"`).
    pub fn spec(&self) -> Option<Spec> {
        let (tools, required) = match &self.choice {
            Choice::None => return None,
            Choice::Auto => (self.schemas.clone(), false),
            Choice::Required => (self.schemas.clone(), true),
            Choice::Named(n) => (self.schemas.iter().filter(|(name, _)| name == n).cloned().collect(), true),
        };
        // A named function is called once.
        let parallel = self.parallel && !matches!(self.choice, Choice::Named(_));
        Some(Spec::ToolCalls(ToolCalls { tools, required, parallel }))
    }

    /// The names the output parser accepts for plain-JSON calls.
    pub fn names(&self) -> Vec<String> {
        self.schemas.iter().map(|(n, _)| n.clone()).collect()
    }

    /// Each tool's parameter schema on its own, to name the tool whose schema does not compile.
    pub fn parameter_specs(&self) -> impl Iterator<Item = (String, Spec)> + '_ {
        self.schemas
            .iter()
            .enumerate()
            .map(|(i, (_, p))| (format!("tools[{i}].function.parameters"), Spec::JsonSchema(p.clone())))
    }
}

/// For a chat template that does not render tools: the tools described in a system message (Hermes'
/// wording, which Qwen's own template uses), merged into the first system message or put first.
pub fn describe_in_system_message(messages: &mut Vec<Value>, declared: &[Value]) {
    let mut text = String::from(
        "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with \
         function signatures within <tools></tools> XML tags:\n<tools>",
    );
    for t in declared {
        text.push('\n');
        text.push_str(&t.to_string());
    }
    text.push_str(
        "\n</tools>\n\nFor each function call, return a json object with function name and arguments within \
         <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": \
         <args-json-object>}\n</tool_call>",
    );
    match messages.first_mut() {
        Some(m) if m["role"] == "system" => {
            let content = m["content"].as_str().unwrap_or("").to_string();
            m["content"] = json!(format!("{content}\n\n{text}"));
        }
        _ => messages.insert(0, json!({"role": "system", "content": text})),
    }
}

/// For a chat template that does not render tools: assistant calls as their Hermes text and tool results as
/// user turns in `<tool_response>` tags.
pub fn calls_as_text(messages: &mut [Value]) {
    for m in messages.iter_mut() {
        if m["role"] == "assistant" {
            if let Some(calls) = m.get("tool_calls").and_then(Value::as_array).cloned() {
                let mut content = m["content"].as_str().unwrap_or("").to_string();
                for c in calls {
                    let f = &c["function"];
                    let call = json!({"name": f["name"], "arguments": f["arguments"]});
                    if !content.is_empty() {
                        content.push('\n');
                    }
                    content.push_str(&format!("<tool_call>\n{call}\n</tool_call>"));
                }
                *m = json!({"role": "assistant", "content": content});
            }
        } else if m["role"] == "tool" {
            let content = m["content"].as_str().unwrap_or("").to_string();
            *m = json!({"role": "user", "content": format!("<tool_response>\n{content}\n</tool_response>")});
        }
    }
}
