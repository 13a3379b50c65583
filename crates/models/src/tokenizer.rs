//! Tokenizers: a `tokenizers::Tokenizer` built from a GGUF file's own vocabulary, merges, token types and
//! pre-tokenizer name, or the `tokenizer.json` that sits next to the model when there is one.

use crate::error::{Error, Result};
use crate::gguf::GgufFile;
use std::path::Path;
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::{Prepend, Replace, Sequence as NormalizerSequence};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

/// GGUF token types (llama.cpp's `llama_token_type`).
const TOKEN_TYPE_NORMAL: i64 = 1;
const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// The Qwen2 pre-tokenizer split (digits one at a time, letters with one leading non-letter).
const QWEN2_PATTERN: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// The Llama 3 split (digits in runs of up to three).
const LLAMA3_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Control tokens models use to end a turn; all of them end generation, as in llama.cpp.
pub(crate) const EOG_TEXTS: [&str; 6] =
    ["<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|end_of_text|>"];

/// Special token ids a generation loop needs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SpecialTokens {
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    /// Every id that ends generation (EOS plus the model's other end-of-turn tokens).
    pub eog: Vec<u32>,
    pub add_bos: bool,
}

impl SpecialTokens {
    /// Reads BOS/EOS from the GGUF; end-of-generation also covers the control tokens models use to end a
    /// turn (`<|im_end|>`, `<|endoftext|>`, `<|eot_id|>`, `<end_of_turn>`, …), as llama.cpp does.
    pub fn from_gguf(g: &GgufFile) -> Result<Self> {
        let bos = g.get_u64_opt("tokenizer.ggml.bos_token_id")?.map(|v| v as u32);
        let eos = g.get_u64_opt("tokenizer.ggml.eos_token_id")?.map(|v| v as u32);
        let add_bos = g.get_bool_opt("tokenizer.ggml.add_bos_token")?.unwrap_or(false);
        let mut eog: Vec<u32> = eos.into_iter().collect();
        if let Some(id) = g.get_u64_opt("tokenizer.ggml.eot_token_id")? {
            eog.push(id as u32);
        }
        let tokens = g.get_str_array("tokenizer.ggml.tokens")?;
        for (id, t) in tokens.iter().enumerate() {
            if EOG_TEXTS.contains(t) && !eog.contains(&(id as u32)) {
                eog.push(id as u32);
            }
        }
        Ok(Self { bos, eos, eog, add_bos })
    }
}

/// Builds the tokenizer described by the GGUF metadata: byte-level BPE (`gpt2`) or SentencePiece BPE
/// (`llama`, as gemma's).
pub fn tokenizer_from_gguf(g: &GgufFile) -> Result<Tokenizer> {
    let model = g.get_str("tokenizer.ggml.model")?;
    match model {
        "gpt2" => {}
        "llama" => return spm_tokenizer(g),
        _ => {
            return Err(Error::Tokenizer(format!(
                "{}: tokenizer.ggml.model `{model}` is not supported yet (byte-level BPE `gpt2` or SentencePiece `llama`); put a tokenizer.json next to the model",
                g.path().display()
            )))
        }
    }
    let tokens = g.get_str_array("tokenizer.ggml.tokens")?;
    let merges = g.get_str_array("tokenizer.ggml.merges")?;
    let types = g.get_int_array_opt("tokenizer.ggml.token_type")?.unwrap_or_default();
    let vocab: Vocab = tokens.iter().enumerate().map(|(i, t)| (t.to_string(), i as u32)).collect();
    let merges = merges
        .iter()
        .map(|m| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| Error::Tokenizer(format!("{}: malformed merge `{m}`", g.path().display())))
        })
        .collect::<Result<Vec<_>>>()?;
    let bpe = BPE::builder().vocab_and_merges(vocab, merges).build().map_err(|e| Error::Tokenizer(e.to_string()))?;
    let mut tok = Tokenizer::new(bpe);
    let pre = g.get_str_opt("tokenizer.ggml.pre")?.unwrap_or("default");
    tok.with_pre_tokenizer(Some(pre_tokenizer(pre)?));
    tok.with_decoder(Some(ByteLevelDecoder::default()));
    finish(g, tok, &tokens, &types)
}

/// SentencePiece's BPE (`tokenizer.ggml.model = llama`) as a `tokenizers` BPE: spaces become `▁` (with one
/// prepended when `add_space_prefix`), and every split of a normal piece into two pieces is a merge, ranked by
/// the merged piece's score, highest first. Merging the best-scoring adjacent pair first is exactly what
/// SentencePiece (and llama.cpp's `llm_tokenizer_spm`) does; characters outside the vocabulary fall back to
/// their bytes (`<0xAB>` pieces).
fn spm_tokenizer(g: &GgufFile) -> Result<Tokenizer> {
    let tokens = g.get_str_array("tokenizer.ggml.tokens")?;
    let scores = g.get_f32_array("tokenizer.ggml.scores")?;
    let types = g.get_int_array_opt("tokenizer.ggml.token_type")?.unwrap_or_default();
    if scores.len() != tokens.len() {
        return Err(Error::Tokenizer(format!(
            "{}: {} scores for {} tokens",
            g.path().display(),
            scores.len(),
            tokens.len()
        )));
    }
    let vocab: Vocab = tokens.iter().enumerate().map(|(i, t)| (t.to_string(), i as u32)).collect();
    let normal = |id: usize| types.get(id).is_none_or(|&t| t == TOKEN_TYPE_NORMAL);
    let mut merges: Vec<(f32, u32, String, String)> = Vec::new();
    for (id, piece) in tokens.iter().enumerate() {
        if !normal(id) {
            continue;
        }
        for (cut, _) in piece.char_indices().skip(1) {
            let (a, b) = piece.split_at(cut);
            let known = |t: &str| vocab.get(t).is_some_and(|&i| normal(i as usize));
            if known(a) && known(b) {
                merges.push((scores[id], id as u32, a.to_string(), b.to_string()));
            }
        }
    }
    merges.sort_by(|x, y| y.0.total_cmp(&x.0).then(x.1.cmp(&y.1)));
    let merges = merges.into_iter().map(|(_, _, a, b)| (a, b)).collect();
    let mut builder = BPE::builder().vocab_and_merges(vocab, merges).byte_fallback(true);
    if let Some(unk) = g.get_u64_opt("tokenizer.ggml.unknown_token_id")?.and_then(|i| tokens.get(i as usize)) {
        builder = builder.unk_token(unk.to_string());
    }
    let bpe = builder.build().map_err(|e| Error::Tokenizer(e.to_string()))?;
    let mut tok = Tokenizer::new(bpe);
    let space = |e: tokenizers::Error| Error::Tokenizer(e.to_string());
    let replace = Replace::new(" ", "\u{2581}").map_err(space)?;
    if g.get_bool_opt("tokenizer.ggml.add_space_prefix")?.unwrap_or(true) {
        let prepend = Prepend::new("\u{2581}".into());
        tok.with_normalizer(Some(NormalizerSequence::new(vec![prepend.into(), replace.into()]))).map_err(space)?;
        tok.with_decoder(Some(DecoderSequence::new(vec![
            Replace::new("\u{2581}", " ").map_err(space)?.into(),
            ByteFallback::new().into(),
            Fuse::new().into(),
            Strip::new(' ', 1, 0).into(),
        ])));
    } else {
        tok.with_normalizer(Some(replace)).map_err(space)?;
        tok.with_decoder(Some(DecoderSequence::new(vec![
            Replace::new("\u{2581}", " ").map_err(space)?.into(),
            ByteFallback::new().into(),
            Fuse::new().into(),
        ])));
    }
    finish(g, tok, &tokens, &types)
}

/// The control and user-defined tokens as added tokens (matched whole before the model runs), and BOS
/// prepended when the file asks for it.
fn finish(g: &GgufFile, mut tok: Tokenizer, tokens: &[&str], types: &[i64]) -> Result<Tokenizer> {
    let mut added = Vec::new();
    for (id, ty) in types.iter().enumerate() {
        let special = match *ty {
            TOKEN_TYPE_CONTROL => true,
            TOKEN_TYPE_USER_DEFINED => false,
            _ => continue,
        };
        added.push(AddedToken::from(tokens[id].to_string(), special).normalized(false));
    }
    tok.add_tokens(added).map_err(|e| Error::Tokenizer(e.to_string()))?;

    let specials = SpecialTokens::from_gguf(g)?;
    if specials.add_bos {
        let bos =
            specials.bos.ok_or_else(|| Error::Tokenizer("add_bos_token is set but there is no bos_token_id".into()))?;
        let bos_text = tokens
            .get(bos as usize)
            .ok_or_else(|| Error::Tokenizer(format!("bos_token_id {bos} is outside the vocabulary")))?;
        let tp = TemplateProcessing::builder()
            .try_single(format!("{bos_text} $A"))
            .and_then(|b| b.try_pair(format!("{bos_text} $A {bos_text} $B")))
            .map_err(|e| Error::Tokenizer(e.to_string()))?
            .special_tokens(vec![(bos_text.to_string(), bos)])
            .build()
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        tok.with_post_processor(Some(tp));
    }
    Ok(tok)
}

/// Maps llama.cpp's `tokenizer.ggml.pre` names onto Hugging Face pre-tokenizers.
fn pre_tokenizer(pre: &str) -> Result<PreTokenizerWrapper> {
    let split_then_bytes = |pattern: &str| -> Result<PreTokenizerWrapper> {
        let split = Split::new(SplitPattern::Regex(pattern.into()), SplitDelimiterBehavior::Isolated, false)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(Sequence::new(vec![split.into(), ByteLevel::new(false, true, false).into()]).into())
    };
    match pre {
        // GPT-2's own regex, applied by the byte-level pre-tokenizer itself.
        "default" | "gpt2" | "smollm" | "olmo" => Ok(ByteLevel::new(false, true, true).into()),
        "qwen2" | "deepseek-r1-qwen" => split_then_bytes(QWEN2_PATTERN),
        "llama3" | "llama-bpe" | "smaug-bpe" => split_then_bytes(LLAMA3_PATTERN),
        other => Err(Error::Tokenizer(format!(
            "pre-tokenizer `{other}` is not supported yet (supported: gpt2, smollm, qwen2, llama-bpe); put a tokenizer.json next to the model"
        ))),
    }
}

/// Loads `tokenizer.json` from the model's folder when present, otherwise builds one from the GGUF.
pub fn load_tokenizer(model_path: &Path, g: &GgufFile) -> Result<Tokenizer> {
    if let Some(json) = model_path.parent().map(|d| d.join("tokenizer.json")).filter(|p| p.is_file()) {
        return Tokenizer::from_file(&json).map_err(|e| Error::Tokenizer(format!("{}: {e}", json.display())));
    }
    tokenizer_from_gguf(g)
}
