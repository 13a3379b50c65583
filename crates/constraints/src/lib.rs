//! Constrained decoding: JSON schemas, regular expressions, choices and Lark grammars, compiled with
//! [llguidance](https://github.com/guidance-ai/llguidance) against a model's vocabulary.
//!
//! ```text
//!   Vocab::new (once per model: the token trie from each token's bytes)
//!     → Vocab::compile(&Spec) → Arc<Compiled>          (before queueing: a bad schema is an error here)
//!     → engine::Constraint::start → a per-sequence Matcher (the executor, on the sequence's first step)
//!       → allowed() each step: the token mask → sample → advance(token)
//! ```
//!
//! The engine and the executor see only the traits `mlx_serving_engine::{Constraint, ConstraintState}`.

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{InferenceCapabilities, TokEnv, TokRxInfo, TokTrie, TokenizerEnv};
use llguidance::{Matcher, ParserFactory, TokenParser};
use mlx_serving_engine::{Constraint, ConstraintState};
use mlx_serving_models::ModelBundle;
use serde_json::{json, Value};
use std::sync::Arc;

/// What a request asks its output to match.
#[derive(Clone, Debug, PartialEq)]
pub enum Spec {
    /// Any JSON object (`response_format: {"type": "json_object"}`).
    JsonObject,
    /// A JSON document valid against this JSON schema.
    JsonSchema(Value),
    /// A string matching this regular expression (whole output).
    Regex(String),
    /// Exactly one of these strings.
    Choice(Vec<String>),
    /// A grammar in llguidance's Lark dialect (`start` is the start rule).
    Grammar(String),
    /// Tool calls in the Hermes / Qwen form, `<tool_call>\n{"name": ..., "arguments": ...}\n</tool_call>`,
    /// the arguments valid against the named tool's parameter schema.
    ToolCalls(ToolCalls),
}

/// What tool calls a request allows (see [`Spec::ToolCalls`]).
#[derive(Clone, Debug, PartialEq)]
pub struct ToolCalls {
    /// Each tool's name and parameter schema.
    pub tools: Vec<(String, Value)>,
    /// `false` (`tool_choice: "auto"`): the answer may be text; a call it starts is constrained from its
    /// opening tag on. `true` (`"required"` or a named function): the answer is calls only.
    pub required: bool,
    /// More than one call may follow (`parallel_tool_calls`).
    pub parallel: bool,
}

impl ToolCalls {
    /// The Lark grammar: one `%json` rule per tool (`{"name": const, "arguments": its schema}`), calls in
    /// tags, separated by newlines; with `required` false, text that never contains the opening tag may come
    /// first, or be all there is.
    pub fn grammar(&self) -> String {
        let more = if self.parallel { " (SEP call)*" } else { "" };
        let mut g = if self.required {
            format!("start: call{more}\n")
        } else {
            format!("start: TEXT | head body CLOSE{more}\nhead[lazy]: TEXT OPEN\n")
        };
        g.push_str("call: OPEN body CLOSE\n");
        let alts: Vec<String> = (0..self.tools.len()).map(|i| format!("fn_{i}")).collect();
        g.push_str(&format!("body: {}\n", alts.join(" | ")));
        for (i, (name, params)) in self.tools.iter().enumerate() {
            let schema = json!({
                "type": "object",
                "properties": {"name": {"const": name}, "arguments": params},
                "required": ["name", "arguments"],
                "additionalProperties": false,
                "x-guidance": {"whitespace_pattern": JSON_WHITESPACE},
            });
            g.push_str(&format!("fn_{i}: %json {schema}\n"));
        }
        g.push_str("OPEN: \"<tool_call>\\n\"\nCLOSE: \"\\n</tool_call>\"\nSEP: /[ \\n]{0,2}/\n");
        g.push_str("TEXT: /(.|\\n)*/ & ~/(.|\\n)*<tool_call>(.|\\n)*/\n");
        g
    }
}

impl Spec {
    /// A short name for metrics and logs: `json_object`, `json_schema`, `regex`, `choice` or `grammar`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::JsonObject => "json_object",
            Self::JsonSchema(_) => "json_schema",
            Self::Regex(_) => "regex",
            Self::Choice(_) => "choice",
            Self::Grammar(_) => "grammar",
            Self::ToolCalls(_) => "tool_calls",
        }
    }
}

/// Why a constraint did not compile (an invalid schema, regex or grammar), in llguidance's words.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct CompileError(pub String);

/// Whitespace JSON output may carry at each place JSON allows it: at most 16 characters of it, so a model
/// cannot spend its whole budget on blank lines (llguidance's default is unbounded).
pub const JSON_WHITESPACE: &str = r"[\x20\x0A\x0D\x09]{0,16}";

/// A model's vocabulary as llguidance needs it, built once per model.
pub struct Vocab {
    factory: ParserFactory,
    vocab_size: usize,
}

impl std::fmt::Debug for Vocab {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vocab").field("vocab_size", &self.vocab_size).finish_non_exhaustive()
    }
}

/// How llguidance tokenizes text it must force (our tokenizer, without special tokens).
type Tokenize = dyn Fn(&[u8]) -> Vec<u32> + Send + Sync;

struct Env {
    trie: TokTrie,
    tokenize: Box<Tokenize>,
}

impl TokenizerEnv for Env {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<u32> {
        (self.tokenize)(s)
    }
}

/// One token of the vocabulary, as the trie holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Token {
    /// Text: its exact bytes (empty for ids the tokenizer does not define).
    Text(Vec<u8>),
    /// A special (control) token, by its name (`<|im_end|>`): never produced by text, allowed only where a
    /// grammar names it, or as end-of-sequence.
    Special(String),
}

impl Vocab {
    /// The vocabulary `tokens` (one per logit row: the model's vocabulary size), its end-of-sequence token
    /// `eos` (what a finished constraint allows), and the tokenizer.
    pub fn new(
        tokens: Vec<Token>,
        eos: u32,
        tokenize: impl Fn(&[u8]) -> Vec<u32> + Send + Sync + 'static,
    ) -> Result<Self, CompileError> {
        let vocab_size = tokens.len();
        let words: Vec<Vec<u8>> = tokens
            .into_iter()
            .map(|t| match t {
                Token::Text(b) => b,
                Token::Special(name) => {
                    let mut w = vec![TokTrie::SPECIAL_TOKEN_MARKER];
                    w.extend_from_slice(name.as_bytes());
                    w
                }
            })
            .collect();
        let info = TokRxInfo::new(vocab_size as u32, eos);
        let trie = TokTrie::from(&info, &words);
        let env: TokEnv = Arc::new(Env { trie, tokenize: Box::new(tokenize) });
        let mut factory = ParserFactory::new(
            &env,
            InferenceCapabilities { ff_tokens: false, backtrack: false, conditional_ff_tokens: false, fork: false },
            &llguidance::earley::SlicedBiasComputer::general_slices(),
        )
        .map_err(|e| CompileError(e.to_string()))?;
        factory.quiet();
        Ok(Self { factory, vocab_size })
    }

    /// `bundle`'s vocabulary: one token per logit row, each with its exact bytes (`TokenBytes`), special
    /// tokens by name; its first end-of-generation id as end-of-sequence; its tokenizer for forced text.
    pub fn for_model(bundle: &Arc<ModelBundle>) -> Result<Self, CompileError> {
        let added = bundle.tokenizer.get_added_tokens_decoder();
        let tokens = (0..bundle.model.config().vocab_size as u32)
            .map(|id| match added.get(&id) {
                Some(t) if t.special => Token::Special(t.content.clone()),
                _ => Token::Text(bundle.token_bytes.get(id).to_vec()),
            })
            .collect();
        let eos = *bundle
            .special_tokens
            .eog
            .first()
            .ok_or_else(|| CompileError("the model declares no end-of-generation token".into()))?;
        let b = bundle.clone();
        Self::new(tokens, eos, move |bytes| {
            let text = String::from_utf8_lossy(bytes);
            b.tokenizer.encode(text.as_ref(), false).map(|e| e.get_ids().to_vec()).unwrap_or_default()
        })
    }

    /// Logit rows the masks cover.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// Compiles `spec`: every error a schema, regex or grammar can have shows here, before the request runs.
    pub fn compile(&self, spec: &Spec) -> Result<Arc<Compiled>, CompileError> {
        let grammar = match spec {
            Spec::JsonObject => TopLevelGrammar::from_json_schema(bounded_whitespace(json!({"type": "object"}))),
            Spec::JsonSchema(schema) => {
                if !schema.is_object() && !schema.is_boolean() {
                    return Err(CompileError("a JSON schema must be an object or a boolean".into()));
                }
                let mut schema = schema.clone();
                strict_dates(&mut schema);
                TopLevelGrammar::from_json_schema(bounded_whitespace(schema))
            }
            Spec::Regex(rx) => TopLevelGrammar::from_regex(rx),
            Spec::Choice(choices) => {
                if choices.is_empty() {
                    return Err(CompileError("a choice needs at least one string".into()));
                }
                let alts: Vec<String> = choices.iter().map(|c| lark_string(c)).collect();
                TopLevelGrammar::from_lark(format!("start: {}", alts.join(" | ")))
            }
            Spec::Grammar(g) => TopLevelGrammar::from_lark(g.clone()),
            Spec::ToolCalls(t) => {
                if t.tools.is_empty() {
                    return Err(CompileError("tool calls need at least one tool".into()));
                }
                TopLevelGrammar::from_lark(t.grammar())
            }
        };
        let parser = self.factory.create_parser(grammar).map_err(|e| CompileError(e.to_string()))?;
        Ok(Arc::new(Compiled { parser, kind: spec.kind() }))
    }
}

/// RFC 3339 `full-date` as the calendar has it: years 0001–9999 (year 0000 matches RFC 3339's grammar, but
/// Python's `datetime`, and so `jsonschema`'s format checker, refuse it), each month's own last day, and
/// 29 February in leap years only.
const FULL_DATE: &str = concat!(
    r"(?:(?:[1-9][0-9]{3}|0[1-9][0-9]{2}|00[1-9][0-9]|000[1-9])-",
    r"(?:(?:0[13578]|1[02])-(?:0[1-9]|[12][0-9]|3[01])|(?:0[469]|11)-(?:0[1-9]|[12][0-9]|30)|02-(?:0[1-9]|1[0-9]|2[0-8]))",
    r"|(?:[0-9]{2}(?:0[48]|[2468][048]|[13579][26])|(?:0[48]|[2468][048]|[13579][26])00)-02-29)"
);

/// RFC 3339 `full-time` without leap seconds, with an upper-case `Z` or a numeric offset.
const FULL_TIME: &str =
    r"(?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](?:\.[0-9]{1,9})?(?:Z|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])";

/// Replaces the `date-time` and `date` formats of `schema` (where no `pattern` is given) by patterns that accept
/// real calendar dates only: llguidance's formats follow RFC 3339's grammar, which lets a model write
/// `0000-01-01` or `2023-02-31`, answers that common validators reject. Data-valued keywords (`const`,
/// `enum`, `default`, `examples`) are left alone.
fn strict_dates(schema: &mut Value) {
    match schema {
        Value::Object(m) => {
            let pattern = match m.get("format").and_then(Value::as_str) {
                Some("date-time") => Some(format!("^{FULL_DATE}T{FULL_TIME}$")),
                Some("date") => Some(format!("^{FULL_DATE}$")),
                _ => None,
            };
            if let Some(p) = pattern.filter(|_| !m.contains_key("pattern")) {
                m.remove("format");
                m.insert("pattern".into(), Value::String(p));
            }
            for (k, v) in m.iter_mut() {
                if !matches!(k.as_str(), "const" | "enum" | "default" | "examples") {
                    strict_dates(v);
                }
            }
        }
        Value::Array(a) => a.iter_mut().for_each(strict_dates),
        _ => {}
    }
}

/// `schema` with `x-guidance`'s whitespace bound (`JSON_WHITESPACE`) unless it sets its own.
fn bounded_whitespace(schema: Value) -> Value {
    match schema {
        Value::Object(mut m) => {
            m.entry("x-guidance").or_insert_with(|| json!({"whitespace_pattern": JSON_WHITESPACE}));
            Value::Object(m)
        }
        // `true` (anything) and `false` (nothing): no room for options; `true` becomes `{}` with them.
        Value::Bool(true) => bounded_whitespace(json!({})),
        other => other,
    }
}

/// `s` as a Lark string literal (JSON's escaping is Lark's).
fn lark_string(s: &str) -> String {
    Value::String(s.to_string()).to_string()
}

/// A compiled constraint: the parser each sequence's matcher starts from.
pub struct Compiled {
    parser: TokenParser,
    kind: &'static str,
}

impl std::fmt::Debug for Compiled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Compiled").field("kind", &self.kind).finish_non_exhaustive()
    }
}

impl Compiled {
    /// What kind of constraint this is (`Spec::kind`).
    pub fn kind(&self) -> &'static str {
        self.kind
    }

    /// A fresh matcher at the start of the output.
    pub fn matcher(&self) -> Result<State, String> {
        let m = Matcher::new(Ok(self.parser.deep_clone()));
        match m.get_error() {
            Some(e) => Err(e),
            None => Ok(State { m }),
        }
    }
}

impl Constraint for Compiled {
    fn start(&self) -> Result<Box<dyn ConstraintState>, String> {
        Ok(Box::new(self.matcher()?))
    }

    fn kind(&self) -> &'static str {
        self.kind
    }
}

/// One sequence's matcher.
pub struct State {
    m: Matcher,
}

impl State {
    /// Advances over several tokens (tests: a document's tokens), stopping at the first refused one.
    pub fn advance_all(&mut self, tokens: &[u32]) -> Result<(), String> {
        tokens.iter().try_for_each(|&t| self.advance(t))
    }

    /// Whether the output so far is a complete match (end-of-sequence allowed here).
    pub fn is_accepting(&mut self) -> bool {
        self.m.is_accepting().unwrap_or(false)
    }
}

impl ConstraintState for State {
    fn allowed(&mut self) -> Result<Vec<u32>, String> {
        let mask = self.m.compute_mask_or_eos().map_err(|e| e.to_string())?;
        Ok(mask.as_slice().to_vec())
    }

    fn advance(&mut self, token: u32) -> Result<(), String> {
        self.m.consume_token(token).map_err(|e| e.to_string())
    }

    fn is_complete(&self) -> bool {
        self.m.is_stopped()
    }
}

#[cfg(test)]
mod tests;
