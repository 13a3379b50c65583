//! Tool calls in a model's output text, found as the text streams in.
//!
//! Two forms are recognized:
//! - Hermes / Qwen: `<tool_call>\n{"name": "f", "arguments": {...}}\n</tool_call>`, any number of them, after
//!   optional text. The markup never reaches `content`.
//! - Plain JSON: the whole output is `{"name": ..., "arguments": ...}` (or `"parameters"`), or a list of such
//!   objects, naming tools of the request. Such output is held back until it ends, then given as calls, or
//!   as text when it is not.
//!
//! A call is announced (`Start`, with its name) as soon as its name is complete, and its arguments stream as
//! they arrive (`Args`), so a client sees OpenAI's deltas: the name first, then pieces of `arguments`.

use serde_json::Value;

pub const OPEN: &str = "<tool_call>";
pub const CLOSE: &str = "</tool_call>";

/// What the parser finds in a piece of text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ToolEvent {
    /// Plain content.
    Text(String),
    /// Call `index` begins: the function's name.
    Start { index: usize, name: String },
    /// More of call `index`'s arguments (JSON text; all pieces joined are the arguments).
    Args { index: usize, delta: String },
}

/// A finished call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ToolCall {
    pub name: String,
    /// The arguments as JSON text (`{}` when the model gave none).
    pub arguments: String,
}

#[derive(Debug)]
enum State {
    /// Nothing but whitespace yet: the output may be plain JSON.
    Start,
    /// Ordinary text, watching for `<tool_call>`.
    Text,
    /// Holding all output back: it began like plain JSON (`{` or `[`).
    PlainJson,
    /// Inside `<tool_call>`, before the name is known.
    Head,
    /// Streaming the arguments value of the current call: `depth` of open brackets, inside a string or not,
    /// after a backslash or not.
    Args { depth: usize, in_str: bool, escaped: bool, started: bool },
    /// The arguments ended; skipping the rest of the call up to `</tool_call>`.
    Tail,
}

/// Finds tool calls in streamed output text.
#[derive(Debug)]
pub struct ToolCallParser {
    state: State,
    /// Text not yet decided on.
    buf: String,
    calls: Vec<ToolCall>,
    /// The request's tool names (what plain JSON must name to count as calls).
    names: Vec<String>,
}

impl ToolCallParser {
    pub fn new(names: Vec<String>) -> Self {
        Self { state: State::Start, buf: String::new(), calls: Vec::new(), names }
    }

    /// The calls completed so far.
    pub fn calls(&self) -> &[ToolCall] {
        &self.calls
    }

    /// Takes more output text; returns what it settles.
    pub fn push(&mut self, text: &str) -> Vec<ToolEvent> {
        self.buf.push_str(text);
        let mut out = Vec::new();
        loop {
            let progressed = match self.state {
                State::Start => self.start(),
                State::Text => self.text(&mut out),
                State::PlainJson => false,
                State::Head => self.head(&mut out),
                State::Args { .. } => self.args(&mut out),
                State::Tail => self.tail(),
            };
            if !progressed {
                return merge_text(out);
            }
        }
    }

    /// The output ended: settles everything held back.
    pub fn finish(&mut self) -> Vec<ToolEvent> {
        let rest = std::mem::take(&mut self.buf);
        let mut out = Vec::new();
        match std::mem::replace(&mut self.state, State::Text) {
            State::PlainJson => match self.plain_json(&rest) {
                Some(calls) => {
                    for c in calls {
                        let index = self.calls.len();
                        out.push(ToolEvent::Start { index, name: c.name.clone() });
                        out.push(ToolEvent::Args { index, delta: c.arguments.clone() });
                        self.calls.push(c);
                    }
                }
                None => out.push(ToolEvent::Text(rest)),
            },
            // Whitespace after the last call is markup; otherwise the rest is content.
            State::Start | State::Text => {
                if !rest.trim().is_empty() || self.calls.is_empty() {
                    out.push(ToolEvent::Text(rest));
                }
            }
            // A call cut short (max_tokens): what it streamed stands; nothing more is made up.
            State::Head | State::Args { .. } | State::Tail => {}
        }
        merge_text(out)
    }

    fn start(&mut self) -> bool {
        let t = self.buf.trim_start();
        match t.chars().next() {
            None => false,
            Some('{' | '[') if !self.names.is_empty() => {
                self.state = State::PlainJson;
                false
            }
            Some(_) => {
                self.state = State::Text;
                true
            }
        }
    }

    fn text(&mut self, out: &mut Vec<ToolEvent>) -> bool {
        if let Some(at) = self.buf.find(OPEN) {
            let before: String = self.buf.drain(..at + OPEN.len()).collect();
            let before = &before[..at];
            // Whitespace just before a call is the call's markup, not content.
            if !before.trim().is_empty() {
                out.push(ToolEvent::Text(before.trim_end().to_string()));
            }
            self.state = State::Head;
            return true;
        }
        // Hold back a tail that could be the start of `<tool_call>`, and whitespace that may precede one.
        let n = self.buf.len();
        let keep = (1..OPEN.len().min(n + 1))
            .rev()
            .find(|&k| self.buf.is_char_boundary(n - k) && OPEN.starts_with(&self.buf[n - k..]))
            .unwrap_or(0);
        let upto = self.buf[..n - keep].trim_end().len();
        if upto > 0 {
            out.push(ToolEvent::Text(self.buf.drain(..upto).collect()));
        }
        false
    }

    fn head(&mut self, out: &mut Vec<ToolEvent>) -> bool {
        match parse_head(&self.buf) {
            Head::NeedMore => false,
            Head::Named { name, args_at } => {
                let index = self.calls.len();
                self.calls.push(ToolCall { name: name.clone(), arguments: String::new() });
                out.push(ToolEvent::Start { index, name });
                self.buf.drain(..args_at);
                self.state = State::Args { depth: 0, in_str: false, escaped: false, started: false };
                true
            }
            Head::Other => {
                // Not the streamable shape (e.g. "arguments" first): take the whole call at its end.
                let Some(end) = self.buf.find(CLOSE) else { return false };
                let body: String = self.buf.drain(..end + CLOSE.len()).collect();
                let body = &body[..end];
                match serde_json::from_str::<Value>(body.trim()).ok().and_then(|v| call_of(&v)) {
                    Some(c) => {
                        let index = self.calls.len();
                        out.push(ToolEvent::Start { index, name: c.name.clone() });
                        out.push(ToolEvent::Args { index, delta: c.arguments.clone() });
                        self.calls.push(c);
                    }
                    // Not a call after all: give it back as text.
                    None => out.push(ToolEvent::Text(format!("{OPEN}{body}{CLOSE}"))),
                }
                self.state = State::Text;
                true
            }
        }
    }

    fn args(&mut self, out: &mut Vec<ToolEvent>) -> bool {
        let State::Args { mut depth, mut in_str, mut escaped, mut started } = self.state else { unreachable!() };
        let mut end = None;
        for (i, ch) in self.buf.char_indices() {
            if !started {
                if ch.is_whitespace() {
                    continue;
                }
                started = true;
            }
            if in_str {
                match (escaped, ch) {
                    (true, _) => escaped = false,
                    (false, '\\') => escaped = true,
                    (false, '"') => in_str = false,
                    _ => {}
                }
                if !in_str && depth == 0 {
                    end = Some(i + 1); // a string value ends
                    break;
                }
                continue;
            }
            match ch {
                '"' => in_str = true,
                '{' | '[' => depth += 1,
                '}' | ']' if depth > 0 => {
                    depth -= 1;
                    if depth == 0 {
                        end = Some(i + 1);
                        break;
                    }
                }
                // A scalar value ends at the outer object's `,` or `}`.
                ',' | '}' if depth == 0 => {
                    end = Some(i);
                    break;
                }
                _ => {}
            }
        }
        let index = self.calls.len() - 1;
        let take = end.unwrap_or(self.buf.len());
        let piece: String = self.buf.drain(..take).collect();
        let piece = if self.calls[index].arguments.is_empty() { piece.trim_start().to_string() } else { piece };
        if !piece.is_empty() {
            self.calls[index].arguments.push_str(&piece);
            out.push(ToolEvent::Args { index, delta: piece });
        }
        if end.is_some() {
            self.state = State::Tail;
            return true;
        }
        self.state = State::Args { depth, in_str, escaped, started };
        false
    }

    fn tail(&mut self) -> bool {
        match self.buf.find(CLOSE) {
            Some(end) => {
                self.buf.drain(..end + CLOSE.len());
                self.state = State::Text;
                true
            }
            None => false,
        }
    }

    /// The whole output as plain-JSON calls, if it is one (or a list of them) naming the request's tools.
    fn plain_json(&self, text: &str) -> Option<Vec<ToolCall>> {
        let v: Value = serde_json::from_str(text.trim()).ok()?;
        let items = match &v {
            Value::Array(a) if !a.is_empty() => a.iter().collect(),
            Value::Object(_) => vec![&v],
            _ => return None,
        };
        let calls: Option<Vec<ToolCall>> = items.into_iter().map(call_of).collect();
        calls.filter(|cs| cs.iter().all(|c| self.names.contains(&c.name)))
    }
}

/// `{"name": s, "arguments" | "parameters": v}` as a call (`v` a string of JSON is taken as it is).
fn call_of(v: &Value) -> Option<ToolCall> {
    let o = v.as_object()?;
    let name = o.get("name")?.as_str()?.to_string();
    let args = o.get("arguments").or_else(|| o.get("parameters"));
    if o.keys().any(|k| !matches!(k.as_str(), "name" | "arguments" | "parameters")) {
        return None;
    }
    let arguments = match args {
        None => "{}".to_string(),
        Some(Value::String(s)) => s.clone(),
        Some(a) => a.to_string(),
    };
    Some(ToolCall { name, arguments })
}

enum Head {
    NeedMore,
    /// `{"name": "...", "arguments":` seen: the name, and where the arguments value starts.
    Named {
        name: String,
        args_at: usize,
    },
    Other,
}

/// Reads `\s*{\s*"name"\s*:\s*"<name>"\s*,\s*"arguments"\s*:` at the start of `s`.
fn parse_head(s: &str) -> Head {
    let b = s.as_bytes();
    let mut i = 0;
    let ws = |i: &mut usize| {
        while *i < b.len() && b[*i].is_ascii_whitespace() {
            *i += 1;
        }
    };
    // Each expected piece: a byte, or a JSON string (the name).
    macro_rules! expect {
        ($lit:expr) => {{
            ws(&mut i);
            let lit: &[u8] = $lit;
            let n = lit.len().min(b.len() - i);
            if b[i..i + n] != lit[..n] {
                return Head::Other;
            }
            if n < lit.len() {
                return Head::NeedMore;
            }
            i += n;
        }};
    }
    expect!(b"{");
    expect!(b"\"name\"");
    expect!(b":");
    ws(&mut i);
    if i >= b.len() {
        return Head::NeedMore;
    }
    if b[i] != b'"' {
        return Head::Other;
    }
    let start = i;
    i += 1;
    let mut escaped = false;
    loop {
        if i >= b.len() {
            return Head::NeedMore;
        }
        match (escaped, b[i]) {
            (true, _) => escaped = false,
            (false, b'\\') => escaped = true,
            (false, b'"') => break,
            _ => {}
        }
        i += 1;
    }
    i += 1;
    let Ok(name) = serde_json::from_str::<String>(&s[start..i]) else { return Head::Other };
    expect!(b",");
    ws(&mut i);
    if i >= b.len() {
        return Head::NeedMore;
    }
    let key = if b[i..].starts_with(b"\"p") { b"\"parameters\"" as &[u8] } else { b"\"arguments\"" };
    expect!(key);
    expect!(b":");
    Head::Named { name, args_at: i }
}

/// Joins adjacent `Text` events.
fn merge_text(events: Vec<ToolEvent>) -> Vec<ToolEvent> {
    let mut out: Vec<ToolEvent> = Vec::with_capacity(events.len());
    for e in events {
        match (out.last_mut(), e) {
            (Some(ToolEvent::Text(a)), ToolEvent::Text(b)) => a.push_str(&b),
            (_, ToolEvent::Text(t)) if t.is_empty() => {}
            (_, e) => out.push(e),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `text` in pieces of `step` characters; returns the joined content, the calls (name and joined
    /// argument deltas) as the events gave them, and the parser's own calls.
    fn run(names: &[&str], text: &str, step: usize) -> (String, Vec<(String, String)>, Vec<ToolCall>) {
        let mut p = ToolCallParser::new(names.iter().map(|s| s.to_string()).collect());
        let chars: Vec<char> = text.chars().collect();
        let mut events = Vec::new();
        for piece in chars.chunks(step) {
            events.extend(p.push(&piece.iter().collect::<String>()));
        }
        events.extend(p.finish());
        let (mut content, mut calls) = (String::new(), Vec::<(String, String)>::new());
        for e in events {
            match e {
                ToolEvent::Text(t) => content.push_str(&t),
                ToolEvent::Start { index, name } => {
                    assert_eq!(index, calls.len(), "calls are announced in order");
                    calls.push((name, String::new()));
                }
                ToolEvent::Args { index, delta } => calls[index].1.push_str(&delta),
            }
        }
        (content, calls, p.calls().to_vec())
    }

    fn same_for_every_chunking(names: &[&str], text: &str) -> (String, Vec<(String, String)>) {
        let whole = run(names, text, usize::MAX);
        for step in [1, 2, 3, 7] {
            let r = run(names, text, step);
            assert_eq!((&r.0, &r.1), (&whole.0, &whole.1), "step {step}: {text:?}");
        }
        let from_parser: Vec<(String, String)> =
            whole.2.iter().map(|c| (c.name.clone(), c.arguments.clone())).collect();
        assert_eq!(from_parser, whole.1, "events and calls agree");
        (whole.0, whole.1)
    }

    fn call(name: &str, args: &str) -> (String, String) {
        (name.to_string(), args.to_string())
    }

    #[test]
    fn hermes_calls_stream_their_name_then_arguments_and_leave_no_markup() {
        let t = "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\", \"unit\": \"c\"}}\n</tool_call>";
        let (content, calls) = same_for_every_chunking(&["get_weather"], t);
        assert_eq!(content, "");
        assert_eq!(calls, vec![call("get_weather", r#"{"city": "Paris", "unit": "c"}"#)]);
        // The name comes out before the arguments are complete.
        let mut p = ToolCallParser::new(vec![]);
        let ev = p.push("<tool_call>\n{\"name\": \"f\", \"arguments\": {\"a\": ");
        assert_eq!(
            ev,
            vec![
                ToolEvent::Start { index: 0, name: "f".into() },
                ToolEvent::Args { index: 0, delta: "{\"a\": ".into() }
            ]
        );
    }

    #[test]
    fn text_before_and_between_calls() {
        let t = "Let me check both.\n\n<tool_call>\n{\"name\": \"a\", \"arguments\": {\"q\": \"x } y\", \"n\": [1, {\"z\": 2}]}}\n</tool_call>\n<tool_call>\n{\"name\": \"b\", \"arguments\": {}}\n</tool_call>\n";
        let (content, calls) = same_for_every_chunking(&["a", "b"], t);
        assert_eq!(content, "Let me check both.");
        assert_eq!(calls, vec![call("a", r#"{"q": "x } y", "n": [1, {"z": 2}]}"#), call("b", "{}")]);
    }

    #[test]
    fn plain_text_passes_through_even_with_angle_brackets() {
        let t = "Use a <tool> or <tool_cal to fix it. {\"name\": 1}\n";
        let (content, calls) = same_for_every_chunking(&["f"], t);
        assert_eq!((content.as_str(), calls.len()), (t, 0));
    }

    #[test]
    fn plain_json_calls_are_recognized_only_when_they_name_a_tool() {
        let one = r#"  {"name": "get_weather", "arguments": {"city": "Oslo"}}"#;
        let (content, calls) = same_for_every_chunking(&["get_weather"], one);
        assert_eq!((content.as_str(), calls), ("", vec![call("get_weather", r#"{"city":"Oslo"}"#)]));
        let list = r#"[{"name": "a", "parameters": {"x": 1}}, {"name": "b"}]"#;
        let (_, calls) = same_for_every_chunking(&["a", "b"], list);
        assert_eq!(calls, vec![call("a", r#"{"x":1}"#), call("b", "{}")]);
        // Unknown name, other keys, or no tools at all: plain content.
        for (names, t) in
            [(&["x"][..], one), (&["get_weather"][..], r#"{"name": "get_weather", "city": "Oslo"}"#), (&[][..], one)]
        {
            let (content, calls) = same_for_every_chunking(names, t);
            assert_eq!((content.as_str(), calls.len()), (t, 0));
        }
    }

    #[test]
    fn other_key_orders_are_taken_whole_at_the_close() {
        let t = "<tool_call>{\"arguments\": {\"k\": true}, \"name\": \"f\"}</tool_call>";
        let (content, calls) = same_for_every_chunking(&["f"], t);
        assert_eq!((content.as_str(), calls), ("", vec![call("f", r#"{"k":true}"#)]));
        // Not a call inside the tags: given back as text.
        let t = "<tool_call>not json</tool_call>";
        let (content, calls) = same_for_every_chunking(&["f"], t);
        assert_eq!((content.as_str(), calls.len()), (t, 0));
    }

    #[test]
    fn a_call_cut_short_keeps_what_streamed() {
        let t = "<tool_call>\n{\"name\": \"f\", \"arguments\": {\"a\": 1";
        let (content, calls) = same_for_every_chunking(&["f"], t);
        assert_eq!((content.as_str(), calls), ("", vec![call("f", r#"{"a": 1"#)]));
    }

    #[test]
    fn scalar_and_string_arguments_end_at_the_object() {
        let t = "<tool_call>{\"name\": \"f\", \"arguments\": \"{\\\"a\\\": 1}\"}</tool_call><tool_call>{\"name\": \"g\", \"arguments\": 5}</tool_call>";
        let (_, calls) = same_for_every_chunking(&["f", "g"], t);
        assert_eq!(calls, vec![call("f", r#""{\"a\": 1}""#), call("g", "5")]);
    }
}
