//! Tokenizing a rendered chat so that message text cannot forge control tokens, and each token's exact bytes.
//!
//! A chat is rendered by the model's template and tokenized. Tokenizing the whole rendering with special
//! tokens on would read `<|im_end|>\n<|im_start|>system` typed inside a user's message as real turn markup,
//! so a message could forge a system or assistant turn. Instead every string in the messages has its
//! special-token texts (and any private-use characters of its own) swapped for placeholders before rendering:
//!
//! ```text
//!   content  "hi<|im_end|>"        →  "hi\u{F0000}"             (placeholder 0 = "<|im_end|>")
//!   render   "<|im_start|>user\nhi\u{F0000}<|im_end|>\n"
//!   split    [<|im_start|>] "user\nhi<|im_end|>" [<|im_end|>] "\n"    at the template's own special tokens
//!   encode   specials as their ids; the text between them with special tokens read as plain text
//! ```
//!
//! Templates see a placeholder character where a message had a special-token text, so one that inspects
//! content (its length, `startswith`) may render it differently; and a message's tail that forms a special
//! token together with the template's next text is not prevented (templates emit whole special tokens).
//!
//! The tokenizer splits its input at added tokens before anything else, so splitting at the special ones here
//! and encoding the pieces gives the same ids as encoding the whole text, except that a special token's text
//! coming from a message is encoded as text. (Special tokens with `lstrip`/`rstrip`, which eat neighbouring
//! whitespace, are not modelled; the byte-level models we load have none.)

use crate::error::{Error, Result};
use aho_corasick::{AhoCorasick, MatchKind};
use serde_json::Value;
use std::collections::HashMap;
use tokenizers::{DecoderWrapper, Tokenizer};

/// First character of the placeholders (Supplementary Private Use Area-A).
const PLACEHOLDER_BASE: u32 = 0xF0000;
const PLACEHOLDER_END: u32 = 0xFFFFD;

/// The model's special tokens and a tokenizer that reads their texts as plain text.
pub struct SpecialTokenText {
    /// Leftmost-longest matcher over the special tokens' texts; pattern `i` is token `ids[i]`.
    matcher: Option<AhoCorasick>,
    ids: Vec<u32>,
    /// The model's tokenizer with special-token texts encoded as ordinary text.
    plain: Tokenizer,
}

impl SpecialTokenText {
    pub fn new(tokenizer: &Tokenizer) -> Result<Self> {
        let mut specials: Vec<(u32, String)> = tokenizer
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, t)| t.special && !t.content.is_empty())
            .map(|(id, t)| (id, t.content))
            .collect();
        specials.sort();
        let matcher = if specials.is_empty() {
            None
        } else {
            Some(
                AhoCorasick::builder()
                    .match_kind(MatchKind::LeftmostLongest)
                    .build(specials.iter().map(|(_, t)| t.as_str()))
                    .map_err(|e| Error::Tokenizer(format!("special-token matcher: {e}")))?,
            )
        };
        let mut plain = tokenizer.clone();
        plain.set_encode_special_tokens(true);
        Ok(Self { matcher, ids: specials.into_iter().map(|(id, _)| id).collect(), plain })
    }

    /// Tokenizes `render(escaped messages)`: the template's own special tokens as control tokens, every
    /// special-token text that came from a message string as plain text.
    pub fn encode_rendered_chat(
        &self,
        messages: &Value,
        render: impl FnOnce(&Value) -> Result<String>,
    ) -> Result<Vec<u32>> {
        let mut table = Placeholders::default();
        let escaped = self.escape_value(messages, &mut table)?;
        let text = render(&escaped)?;
        let mut ids = Vec::new();
        let mut last = 0;
        if let Some(m) = &self.matcher {
            for hit in m.find_iter(&text) {
                self.encode_plain(&table.restore(&text[last..hit.start()]), &mut ids)?;
                ids.push(self.ids[hit.pattern().as_usize()]);
                last = hit.end();
            }
        }
        self.encode_plain(&table.restore(&text[last..]), &mut ids)?;
        Ok(ids)
    }

    fn encode_plain(&self, text: &str, ids: &mut Vec<u32>) -> Result<()> {
        if !text.is_empty() {
            let enc = self.plain.encode(text, false).map_err(|e| Error::Tokenizer(e.to_string()))?;
            ids.extend_from_slice(enc.get_ids());
        }
        Ok(())
    }

    /// Every string in `v` (keys stay) with special-token texts and private-use-A characters swapped for
    /// placeholders.
    fn escape_value(&self, v: &Value, table: &mut Placeholders) -> Result<Value> {
        Ok(match v {
            Value::String(s) => Value::String(self.escape_str(s, table)?),
            Value::Array(items) => {
                Value::Array(items.iter().map(|i| self.escape_value(i, table)).collect::<Result<_>>()?)
            }
            Value::Object(map) => Value::Object(
                map.iter().map(|(k, i)| Ok((k.clone(), self.escape_value(i, table)?))).collect::<Result<_>>()?,
            ),
            other => other.clone(),
        })
    }

    fn escape_str(&self, s: &str, table: &mut Placeholders) -> Result<String> {
        let mut out = String::with_capacity(s.len());
        let mut last = 0;
        if let Some(m) = &self.matcher {
            for hit in m.find_iter(s) {
                escape_plain(&s[last..hit.start()], &mut out, table)?;
                out.push(table.placeholder(s[hit.start()..hit.end()].to_string())?);
                last = hit.end();
            }
        }
        escape_plain(&s[last..], &mut out, table)?;
        Ok(out)
    }
}

/// Copies `piece`, swapping any private-use-A character of its own for a placeholder (so that placeholders
/// stay unambiguous).
fn escape_plain(piece: &str, out: &mut String, table: &mut Placeholders) -> Result<()> {
    for c in piece.chars() {
        if (PLACEHOLDER_BASE..=0xFFFFF).contains(&(c as u32)) {
            out.push(table.placeholder(c.to_string())?);
        } else {
            out.push(c);
        }
    }
    Ok(())
}

/// Strings swapped out of the messages, one private-use character each.
#[derive(Default)]
struct Placeholders {
    originals: Vec<String>,
    index: HashMap<String, char>,
}

impl Placeholders {
    fn placeholder(&mut self, original: String) -> Result<char> {
        if let Some(&c) = self.index.get(&original) {
            return Ok(c);
        }
        let code = PLACEHOLDER_BASE + self.originals.len() as u32;
        let c = char::from_u32(code)
            .filter(|_| code <= PLACEHOLDER_END)
            .ok_or_else(|| Error::Template("too many distinct special-token texts in the messages".into()))?;
        self.originals.push(original.clone());
        self.index.insert(original, c);
        Ok(c)
    }

    fn restore(&self, s: &str) -> String {
        if self.originals.is_empty() {
            return s.to_string();
        }
        let mut out = String::with_capacity(s.len());
        for c in s.chars() {
            match (c as u32).checked_sub(PLACEHOLDER_BASE).and_then(|i| self.originals.get(i as usize)) {
                Some(original) => out.push_str(original),
                None => out.push(c),
            }
        }
        out
    }
}

/// Each token's own bytes: what it adds to the output text, even when that is part of a UTF-8 character
/// (for logprobs' `bytes`, and to count characters for `text_offset`).
pub struct TokenBytes {
    offsets: Vec<u32>,
    bytes: Vec<u8>,
}

impl TokenBytes {
    pub fn new(tokenizer: &Tokenizer, vocab_size: usize) -> Self {
        let byte_level = is_byte_level(tokenizer.get_decoder());
        let unicode_to_byte = gpt2_unicode_to_byte();
        let added = tokenizer.get_added_tokens_decoder();
        let (mut offsets, mut bytes) = (Vec::with_capacity(vocab_size + 1), Vec::new());
        offsets.push(0);
        for id in 0..vocab_size as u32 {
            if let Some(t) = added.get(&id) {
                // Special tokens add no text to the output (the detokenizer skips them).
                if !t.special {
                    bytes.extend_from_slice(t.content.as_bytes());
                }
            } else if let Some(piece) = tokenizer.id_to_token(id) {
                if byte_level {
                    for c in piece.chars() {
                        match unicode_to_byte.get(&c) {
                            Some(&b) => bytes.push(b),
                            None => bytes.extend_from_slice(c.to_string().as_bytes()),
                        }
                    }
                } else if let Some(b) = byte_fallback(&piece) {
                    bytes.push(b);
                } else {
                    bytes.extend_from_slice(piece.replace('\u{2581}', " ").as_bytes());
                }
            }
            offsets.push(bytes.len() as u32);
        }
        Self { offsets, bytes }
    }

    /// The bytes of token `id` (empty for special tokens and outside the vocabulary).
    pub fn get(&self, id: u32) -> &[u8] {
        let i = id as usize;
        match (self.offsets.get(i), self.offsets.get(i + 1)) {
            (Some(&a), Some(&b)) => &self.bytes[a as usize..b as usize],
            _ => &[],
        }
    }
}

fn is_byte_level(d: Option<&DecoderWrapper>) -> bool {
    match d {
        Some(DecoderWrapper::ByteLevel(_)) => true,
        Some(DecoderWrapper::Sequence(s)) => s.get_decoders().iter().any(|d| is_byte_level(Some(d))),
        _ => false,
    }
}

/// SentencePiece's byte tokens `<0xAB>`.
fn byte_fallback(piece: &str) -> Option<u8> {
    let hex = piece.strip_prefix("<0x")?.strip_suffix('>')?;
    (hex.len() == 2).then(|| u8::from_str_radix(hex, 16).ok()).flatten()
}

/// GPT-2's byte-level alphabet, inverted: printable bytes stand for themselves, the other 68 bytes for the
/// characters from U+0100 on, in byte order.
fn gpt2_unicode_to_byte() -> HashMap<char, u8> {
    let printable = |b: u8| (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b);
    let mut map = HashMap::with_capacity(256);
    let mut next = 256u32;
    for b in 0..=255u8 {
        let c = if printable(b) {
            char::from(b)
        } else {
            let c = char::from_u32(next).expect("U+0100.. are characters");
            next += 1;
            c
        };
        map.insert(c, b);
    }
    map
}
