//! OpenAI wire types (serde). No logic: validation lives in the server/frontend.
//!
//! Request types reject unknown fields, so a field we do not honour is a 400 naming it rather than being
//! silently ignored.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// `stop` is a string or a list of strings.
#[derive(Clone, Debug, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

impl Stop {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            Self::One(s) => vec![s],
            Self::Many(v) => v,
        }
    }
}

#[derive(Clone, Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
    /// vLLM's: with `include_usage`, every chunk carries the usage so far.
    #[serde(default)]
    pub continuous_usage_stats: bool,
}

/// The sampling fields chat and completions share, moved out of a request by `sampling_fields`.
#[derive(Clone, Debug, Default)]
pub struct SamplingFields {
    pub max_tokens: Option<i64>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<i64>,
    pub min_p: Option<f32>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub logit_bias: Option<std::collections::HashMap<String, f32>>,
    pub seed: Option<i64>,
    pub stop: Option<Stop>,
    pub n: Option<i64>,
    pub priority: Option<String>,
    pub ignore_eos: bool,
    pub min_tokens: Option<i64>,
    /// Top alternatives per token when logprobs were asked for (`Some(0)`: only the chosen token's).
    pub logprobs: Option<i64>,
    /// vLLM's `prompt_logprobs`: each prompt token's logprob and this many alternatives (`Some(0)`: its own).
    pub prompt_logprobs: Option<i64>,
    pub return_token_ids: bool,
    /// Our extension: `false` opts the request out of speculative decoding (default: on where configured).
    pub speculative: Option<bool>,
    /// Our extension: `false` neither serves this request from the response cache nor stores its answer.
    pub cache: Option<bool>,
}

/// Declares a request type with its own fields plus the shared sampling and streaming fields, listed once
/// here. (`#[serde(flatten)]` would lose `deny_unknown_fields`, which is how unknown fields become 400s.)
macro_rules! openai_request {
    ($(#[$m:meta])* pub struct $name:ident { $($(#[$fm:meta])* pub $f:ident : $t:ty,)* }) => {
        $(#[$m])*
        #[derive(Clone, Debug, Deserialize, JsonSchema)]
        #[serde(deny_unknown_fields)]
        pub struct $name {
            $($(#[$fm])* pub $f: $t,)*
            pub max_tokens: Option<i64>,
            pub temperature: Option<f32>,
            pub top_p: Option<f32>,
            pub top_k: Option<i64>,
            pub min_p: Option<f32>,
            pub presence_penalty: Option<f32>,
            pub frequency_penalty: Option<f32>,
            pub repetition_penalty: Option<f32>,
            pub logit_bias: Option<std::collections::HashMap<String, f32>>,
            pub seed: Option<i64>,
            pub stop: Option<Stop>,
            pub n: Option<i64>,
            #[serde(default)]
            pub stream: bool,
            pub stream_options: Option<StreamOptions>,
            pub user: Option<String>,
            pub priority: Option<String>,
            #[serde(default)]
            pub ignore_eos: bool,
            pub min_tokens: Option<i64>,
            /// vLLM's extension: each choice gets `token_ids`, the response `prompt_token_ids`.
            pub return_token_ids: Option<bool>,
            /// vLLM's extension: the prompt tokens' logprobs (and this many alternatives each).
            pub prompt_logprobs: Option<i64>,
            /// Our extension: `false` opts out of speculative decoding.
            pub speculative: Option<bool>,
            /// Our extension: `false` bypasses the response cache.
            pub cache: Option<bool>,
            /// OpenAI's `{"type": "text" | "json_object" | "json_schema", ...}` (read by the server).
            pub response_format: Option<Value>,
            /// vLLM's `{"json" | "regex" | "choice" | "grammar" | "json_object": ...}` (read by the server).
            pub structured_outputs: Option<Value>,
            /// vLLM's older spellings of `structured_outputs`' members, still sent by many clients.
            pub guided_json: Option<Value>,
            pub guided_regex: Option<Value>,
            pub guided_choice: Option<Value>,
            pub guided_grammar: Option<Value>,
        }

        impl $name {
            /// Moves the shared sampling fields out.
            pub fn sampling_fields(&mut self) -> SamplingFields {
                SamplingFields {
                    max_tokens: self.max_tokens,
                    temperature: self.temperature,
                    top_p: self.top_p,
                    top_k: self.top_k,
                    min_p: self.min_p,
                    presence_penalty: self.presence_penalty,
                    frequency_penalty: self.frequency_penalty,
                    repetition_penalty: self.repetition_penalty,
                    logit_bias: self.logit_bias.take(),
                    seed: self.seed,
                    stop: self.stop.take(),
                    n: self.n,
                    priority: self.priority.take(),
                    ignore_eos: self.ignore_eos,
                    min_tokens: self.min_tokens,
                    logprobs: None,
                    prompt_logprobs: self.prompt_logprobs,
                    return_token_ids: self.return_token_ids.unwrap_or(false),
                    speculative: self.speculative,
                    cache: self.cache,
                }
            }

            /// The structured-output fields: `response_format`, `structured_outputs`, and the `guided_*` ones
            /// as (name, value) pairs.
            pub fn constraint_fields(&self) -> (Option<&Value>, Option<&Value>, Vec<(&'static str, &Value)>) {
                let guided = [
                    ("guided_json", &self.guided_json),
                    ("guided_regex", &self.guided_regex),
                    ("guided_choice", &self.guided_choice),
                    ("guided_grammar", &self.guided_grammar),
                ];
                let guided = guided.into_iter().filter_map(|(k, v)| v.as_ref().filter(|v| !v.is_null()).map(|v| (k, v))).collect();
                (self.response_format.as_ref(), self.structured_outputs.as_ref(), guided)
            }

            pub fn include_usage(&self) -> bool {
                self.stream_options.as_ref().is_some_and(|o| o.include_usage)
            }

            /// `include_usage` with `continuous_usage_stats`: usage on every chunk.
            pub fn continuous_usage(&self) -> bool {
                self.stream_options.as_ref().is_some_and(|o| o.include_usage && o.continuous_usage_stats)
            }
        }
    };
}

openai_request! {
    pub struct CompletionRequest {
        pub model: String,
        /// A string, a list of strings, a list of token ids, or a list of token-id lists.
        pub prompt: Value,
        /// Number of top alternatives to return with each token's logprob (0 = only the chosen token's).
        pub logprobs: Option<i64>,
        #[serde(default)]
        pub echo: bool,
    }
}

/// Unknown fields are refused (a 400 naming them) rather than dropped.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ChatMessage {
    pub role: String,
    /// A string or a list of `{"type": "text", "text": ...}` parts.
    #[serde(default)]
    pub content: Value,
    /// The participant's name (passed to the chat template).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// An assistant turn's calls: `[{"id", "type": "function", "function": {"name", "arguments"}}]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Value>,
    /// A `tool` turn: the call it answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
}

openai_request! {
    pub struct ChatCompletionRequest {
        pub model: String,
        pub messages: Vec<ChatMessage>,
        pub max_completion_tokens: Option<i64>,
        #[serde(default)]
        pub logprobs: bool,
        pub top_logprobs: Option<i64>,
        /// `[{"type": "function", "function": {"name", "description", "parameters"}}]`.
        pub tools: Option<Value>,
        /// `none`, `auto`, `required`, or `{"type": "function", "function": {"name"}}`.
        pub tool_choice: Option<Value>,
        pub parallel_tool_calls: Option<bool>,
    }
}

#[derive(Clone, Debug, Serialize, JsonSchema)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
    pub prompt_tokens_details: PromptTokensDetails,
}

#[derive(Clone, Debug, Serialize, JsonSchema)]
pub struct PromptTokensDetails {
    pub cached_tokens: usize,
}

#[derive(Clone, Debug, Serialize, JsonSchema)]
pub struct ErrorBody {
    pub message: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub param: Option<String>,
    pub code: Option<String>,
}

#[derive(Clone, Debug, Serialize, JsonSchema)]
pub struct ErrorResponse {
    pub error: ErrorBody,
}

/// `POST /tokenize` (vLLM's shape): a raw prompt, or chat messages rendered with the model's template.
#[derive(Clone, Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TokenizeRequest {
    pub model: Option<String>,
    pub prompt: Option<String>,
    pub messages: Option<Vec<ChatMessage>>,
    pub add_special_tokens: Option<bool>,
    pub add_generation_prompt: Option<bool>,
}

/// `POST /detokenize` (vLLM's shape).
#[derive(Clone, Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DetokenizeRequest {
    pub model: Option<String>,
    pub tokens: Vec<i64>,
}
