//! The model's own Jinja chat template, rendered with minijinja plus the Python-compatible helpers that
//! Hugging Face templates rely on (`str.strip()`, `dict.items()`, `raise_exception`, a `tojson` that writes
//! what Python's `json.dumps` writes).

use crate::error::{Error, Result};
use minijinja::value::{Kwargs, Value};
use minijinja::{Environment, ErrorKind};
use serde::Serialize;

/// Gemma's turn format (the template its instruction-tuned checkpoints ship, written for this project): a
/// system message becomes the start of the first user turn, assistant turns are `model` turns.
const GEMMA_TEMPLATE: &str = r#"{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
{%- set first_user_prefix = messages[0]['content'] + '

' -%}
{%- set loop_messages = messages[1:] -%}
{%- else -%}
{%- set first_user_prefix = '' -%}
{%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
{%- endif -%}
{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}
{{ '<start_of_turn>' + role + '
' + (first_user_prefix if loop.first else '') + message['content'] | trim + '<end_of_turn>
' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{ '<start_of_turn>model
' }}
{%- endif -%}"#;

/// The chat format of a model family whose files may come without a template (gemma base checkpoints).
pub(crate) fn builtin(arch: crate::config::Architecture) -> Option<&'static str> {
    match arch {
        crate::config::Architecture::Gemma3 => Some(GEMMA_TEMPLATE),
        _ => None,
    }
}

pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
    renders_tools: bool,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").finish_non_exhaustive()
    }
}

#[derive(Serialize)]
struct Context<'a, M: Serialize, T: Serialize> {
    messages: &'a M,
    add_generation_prompt: bool,
    bos_token: &'a str,
    eos_token: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    tools: Option<&'a T>,
}

/// Instructions one rendering may run (a long chat with tools takes a few million at most): a hostile or
/// broken template's loops stop with an error instead of running on.
pub const TEMPLATE_FUEL: u64 = 50_000_000;

/// Largest rendered prompt, in bytes: beyond, rendering stops with an error while the output grows.
pub const MAX_RENDERED_BYTES: usize = 64 << 20;

/// Collects rendered output up to [`MAX_RENDERED_BYTES`].
struct Bounded(Vec<u8>);

impl std::io::Write for Bounded {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.0.len() + buf.len() > MAX_RENDERED_BYTES {
            return Err(std::io::Error::other(format!("the rendered prompt passes {MAX_RENDERED_BYTES} bytes")));
        }
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl ChatTemplate {
    pub fn new(source: &str, bos_token: impl Into<String>, eos_token: impl Into<String>) -> Result<Self> {
        let mut env = Environment::new();
        // transformers renders with trim_blocks and lstrip_blocks on.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        // The sandbox: bounded work (fuel; minijinja bounds recursion itself) and bounded output (`render`).
        env.set_fuel(Some(TEMPLATE_FUEL));
        env.add_function("raise_exception", |msg: String| -> std::result::Result<Value, minijinja::Error> {
            Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_filter("tojson", tojson);
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| Error::Template(format!("cannot parse the chat template: {e}")))?;
        let renders_tools = source.contains("tools");
        Ok(Self { env, bos_token: bos_token.into(), eos_token: eos_token.into(), renders_tools })
    }

    /// Whether the template renders a `tools` list (Qwen's and Llama 3's do; SmolLM2's does not).
    pub fn renders_tools(&self) -> bool {
        self.renders_tools
    }

    /// Renders `messages` (OpenAI-shaped: objects with `role` and `content`, possibly `tool_calls`).
    pub fn render<M: Serialize, T: Serialize>(
        &self,
        messages: &M,
        tools: Option<&T>,
        add_generation_prompt: bool,
    ) -> Result<String> {
        let tmpl = self.env.get_template("chat").map_err(|e| Error::Template(e.to_string()))?;
        let ctx =
            Context { messages, add_generation_prompt, bos_token: &self.bos_token, eos_token: &self.eos_token, tools };
        let mut out = Bounded(Vec::new());
        tmpl.render_captured_to(ctx, &mut out).map_err(|e| Error::Template(format!("cannot render: {e}")))?;
        String::from_utf8(out.0).map_err(|e| Error::Template(format!("cannot render: {e}")))
    }
}

/// Python's `json.dumps(value, ensure_ascii=False, indent=indent)`: `", "` and `": "` separators, non-ASCII
/// kept, no HTML escaping (minijinja's built-in `tojson` escapes `<`, `>` and `&` for HTML).
fn tojson(value: Value, kwargs: Kwargs) -> std::result::Result<Value, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    kwargs.assert_all_used()?;
    let json =
        serde_json::to_value(&value).map_err(|e| minijinja::Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
    let mut out = String::new();
    write_py_json(&json, indent, 0, &mut out);
    Ok(Value::from_safe_string(out))
}

fn write_py_json(v: &serde_json::Value, indent: Option<usize>, level: usize, out: &mut String) {
    use serde_json::Value as J;
    let newline = |out: &mut String, level: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.extend(std::iter::repeat_n(' ', n * level));
        }
    };
    let sep = if indent.is_some() { "," } else { ", " };
    match v {
        J::Array(items) if !items.is_empty() => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(sep);
                }
                newline(out, level + 1);
                write_py_json(item, indent, level + 1, out);
            }
            newline(out, level);
            out.push(']');
        }
        J::Object(map) if !map.is_empty() => {
            out.push('{');
            for (i, (k, item)) in map.iter().enumerate() {
                if i > 0 {
                    out.push_str(sep);
                }
                newline(out, level + 1);
                out.push_str(&serde_json::to_string(k).unwrap_or_default());
                out.push_str(": ");
                write_py_json(item, indent, level + 1, out);
            }
            newline(out, level);
            out.push('}');
        }
        other => out.push_str(&serde_json::to_string(other).unwrap_or_default()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn renders_generation_prompt_and_python_helpers() {
        let src = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'].strip() }}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}";
        let t = ChatTemplate::new(src, "<s>", "</s>").unwrap();
        let msgs = json!([{"role": "user", "content": "  hi  "}]);
        assert_eq!(t.render(&msgs, None::<&()>, true).unwrap(), "<user>hi<assistant>");
        assert_eq!(t.render(&msgs, None::<&()>, false).unwrap(), "<user>hi");
    }

    /// Hostile templates end with an error, quickly and in bounded memory: endless loops run out of fuel,
    /// runaway recursion hits minijinja's depth limit, huge output stops at the byte bound.
    #[test]
    fn hostile_templates_are_bounded() {
        let t0 = std::time::Instant::now();
        for (src, why) in [
            ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "fuel"),
            ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "recursion"),
            ("{% for i in range(100000) %}{{ 'x' * 10000 }}{% endfor %}", "output"),
            ("{{ 'x' * 1000000000 }}", "one huge value"),
        ] {
            let t = ChatTemplate::new(src, "", "").unwrap();
            let err = t.render(&json!([]), None::<&()>, true);
            assert!(err.is_err(), "{why}: rendered {} bytes", err.map(|s| s.len()).unwrap_or(0));
        }
        assert!(t0.elapsed() < std::time::Duration::from_secs(30), "bounded time: {:?}", t0.elapsed());
    }

    #[test]
    fn raise_exception_is_a_template_error() {
        let t = ChatTemplate::new("{{ raise_exception('roles must alternate') }}", "", "").unwrap();
        let err = t.render(&json!([]), None::<&()>, true).unwrap_err().to_string();
        assert!(err.contains("roles must alternate"), "{err}");
    }

    #[test]
    fn tojson_matches_python_json_dumps() {
        let t = ChatTemplate::new("{{ tools[0] | tojson }}", "", "").unwrap();
        let tools = json!([{"name": "f", "d": "<é>", "p": [1, 2]}]);
        assert_eq!(t.render(&json!([]), Some(&tools), true).unwrap(), r#"{"name": "f", "d": "<é>", "p": [1, 2]}"#);
    }
}
