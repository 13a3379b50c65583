//! `speculative:` in `runtime.yaml` (top level, or per entry of `models:`), the `--speculative-method`,
//! `--draft-model` and `--num-speculative-tokens` flags of `serve` and `generate`, and building the runner's
//! [`Speculator`] for a loaded model.

use anyhow::{bail, Context, Result};
use clap::Args;
use mlx_serving_models::{LoadOptions, ModelBundle};
use mlx_serving_runner::{DraftModel, SpecMethod, SpeculativeConfig, Speculator};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::sync::Arc;

/// Speculative decoding; off when the section is absent.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SpeculativeSection {
    /// `ngram` (prompt lookup, no extra model) or `draft` (a draft model with the target's vocabulary).
    pub method: String,
    /// The draft model for `draft`: a GGUF file, Hugging Face or MLX directory.
    pub draft_model: Option<PathBuf>,
    /// Most draft tokens per sequence and step; fewer when a sequence's drafts are often rejected.
    pub num_speculative_tokens: usize,
    /// Shortest and longest n-grams the prompt lookup matches.
    pub prompt_lookup_min: usize,
    pub prompt_lookup_max: usize,
    /// Steps with more sequences than this do not speculate.
    pub disable_by_batch_size: usize,
    /// Cost of verifying one more token relative to a decode step, for choosing how many to propose.
    pub verify_cost: f64,
    /// The draft proposes only among the first this many token ids (byte-level BPE puts frequent tokens first;
    /// the output head is a large part of a small model's step); 0: the whole vocabulary.
    pub draft_vocab: usize,
}

impl Default for SpeculativeSection {
    fn default() -> Self {
        let d = SpeculativeConfig::default();
        Self {
            method: "ngram".into(),
            draft_model: None,
            num_speculative_tokens: d.num_speculative_tokens,
            prompt_lookup_min: d.prompt_lookup_min,
            prompt_lookup_max: d.prompt_lookup_max,
            disable_by_batch_size: d.disable_by_batch_size,
            verify_cost: d.verify_cost,
            draft_vocab: 65536,
        }
    }
}

impl SpeculativeSection {
    /// The runner's settings; errors name the key under `prefix` (`speculative`, `models[1].speculative`).
    pub fn runner_config(&self, prefix: &str) -> Result<SpeculativeConfig> {
        let method = match (self.method.as_str(), &self.draft_model) {
            ("ngram", None) => SpecMethod::Ngram,
            ("ngram", Some(_)) => bail!("{prefix}.draft_model: only the `draft` method uses a draft model"),
            ("draft", Some(_)) => SpecMethod::Draft,
            ("draft", None) => bail!("{prefix}.draft_model: the `draft` method needs a draft model"),
            (other, _) => bail!("{prefix}.method: must be `ngram` or `draft`, got `{other}`"),
        };
        let cfg = SpeculativeConfig {
            method,
            num_speculative_tokens: self.num_speculative_tokens,
            prompt_lookup_min: self.prompt_lookup_min,
            prompt_lookup_max: self.prompt_lookup_max,
            disable_by_batch_size: self.disable_by_batch_size,
            verify_cost: self.verify_cost,
        };
        cfg.validate().map_err(|e| anyhow::anyhow!("{prefix}: {e}"))?;
        Ok(cfg)
    }

    /// Bytes the draft model's weights take (0 for n-gram).
    pub fn draft_bytes(&self) -> Result<u64> {
        match &self.draft_model {
            None => Ok(0),
            Some(p) => {
                let path = mlx_serving_models::resolve_model(p)?;
                mlx_serving_models::weight_bytes(&path).with_context(|| format!("{}", path.display()))
            }
        }
    }

    /// The proposer for `target`, loading the draft model (with `opts`) with a KV cache of `num_blocks` blocks
    /// of `block_size` tokens.
    pub fn speculator(
        &self,
        target: &ModelBundle,
        opts: &LoadOptions,
        block_size: usize,
        num_blocks: usize,
    ) -> Result<Speculator> {
        let cfg = self.runner_config("speculative")?;
        let draft = match &self.draft_model {
            None => None,
            Some(p) => {
                let path = mlx_serving_models::resolve_model(p)?;
                let mut bundle = ModelBundle::load(&path, opts)
                    .with_context(|| format!("loading the draft model {}", path.display()))?;
                if self.draft_vocab > 0 {
                    bundle.model.limit_logits(self.draft_vocab);
                }
                let d = DraftModel::new(Arc::new(bundle), target, block_size, num_blocks)
                    .map_err(|e| anyhow::anyhow!("draft model {}: {e}", path.display()))?;
                Some(d)
            }
        };
        Speculator::new(cfg, draft).map_err(|e| anyhow::anyhow!("{e}"))
    }
}

/// The speculative-decoding flags `serve` and `generate` share.
#[derive(Args, Clone, Debug, Default)]
pub struct SpeculativeArgs {
    /// Speculative decoding: `ngram` (prompt lookup) or `draft` (with --draft-model) [speculative.method].
    #[arg(long, env = "MLX_SERVING_SPECULATIVE_METHOD")]
    pub speculative_method: Option<String>,
    /// Draft model for speculative decoding, with the target's vocabulary; implies `--speculative-method
    /// draft` [speculative.draft_model].
    #[arg(long, env = "MLX_SERVING_DRAFT_MODEL")]
    pub draft_model: Option<PathBuf>,
    /// Most draft tokens per sequence and step [speculative.num_speculative_tokens; default 5].
    #[arg(long, env = "MLX_SERVING_NUM_SPECULATIVE_TOKENS")]
    pub num_speculative_tokens: Option<usize>,
    /// The draft proposes among the first N token ids only; 0: all [speculative.draft_vocab; default 65536].
    #[arg(long, env = "MLX_SERVING_DRAFT_VOCAB")]
    pub draft_vocab: Option<usize>,
}

impl SpeculativeArgs {
    /// Applies the flags over `section` (creating it when a flag asks for speculation).
    pub fn apply(&self, section: &mut Option<SpeculativeSection>) {
        if self.speculative_method.is_none()
            && self.draft_model.is_none()
            && self.num_speculative_tokens.is_none()
            && self.draft_vocab.is_none()
        {
            return;
        }
        let s = section.get_or_insert_with(SpeculativeSection::default);
        if let Some(p) = &self.draft_model {
            s.draft_model = Some(p.clone());
            s.method = "draft".into();
        }
        if let Some(m) = &self.speculative_method {
            s.method = m.clone();
        }
        if let Some(k) = self.num_speculative_tokens {
            s.num_speculative_tokens = k;
        }
        if let Some(v) = self.draft_vocab {
            s.draft_vocab = v;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_create_and_override_the_section() {
        let mut none = None;
        SpeculativeArgs::default().apply(&mut none);
        assert_eq!(none, None, "no flag, no speculation");
        let args = SpeculativeArgs { draft_model: Some("d.gguf".into()), ..Default::default() };
        args.apply(&mut none);
        let s = none.clone().unwrap();
        assert_eq!((s.method.as_str(), s.draft_model.as_deref()), ("draft", Some(std::path::Path::new("d.gguf"))));
        assert_eq!(s.runner_config("speculative").unwrap().method, SpecMethod::Draft);
        let k = SpeculativeArgs { num_speculative_tokens: Some(3), ..Default::default() };
        let mut some = Some(SpeculativeSection::default());
        k.apply(&mut some);
        assert_eq!(some.unwrap().num_speculative_tokens, 3);
    }

    #[test]
    fn bad_sections_name_the_key() {
        let err = |f: fn(&mut SpeculativeSection)| {
            let mut s = SpeculativeSection::default();
            f(&mut s);
            format!("{:#}", s.runner_config("models[0].speculative").unwrap_err())
        };
        assert!(err(|s| s.method = "medusa".into()).contains("models[0].speculative.method"));
        assert!(err(|s| s.method = "draft".into()).contains("speculative.draft_model"));
        assert!(err(|s| s.num_speculative_tokens = 0).contains("num_speculative_tokens"));
        assert!(err(|s| s.prompt_lookup_min = 9).contains("prompt_lookup_min"));
    }
}
