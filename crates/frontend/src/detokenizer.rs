//! Incremental detokenizer.
//!
//! Decoding token by token breaks multi-byte characters (a byte-level BPE token may hold half an emoji) and
//! loses spaces some decoders add between tokens. So we decode a sliding window and emit only the text that
//! became final:
//!
//! ```text
//!   ids:   ... [prefix_offset ........ read_offset ........ len]
//!   prefix = decode(ids[prefix_offset..read_offset])     (already emitted)
//!   full   = decode(ids[prefix_offset..len])
//!   delta  = full[prefix.len()..]   unless it ends in U+FFFD (an incomplete character: wait for more ids)
//! ```
//!
//! Joined deltas plus [`IncrementalDetokenizer::flush`] equal `decode(all ids)`.

use tokenizers::Tokenizer;

pub struct IncrementalDetokenizer<'t> {
    tokenizer: &'t Tokenizer,
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
    skip_special_tokens: bool,
}

impl<'t> IncrementalDetokenizer<'t> {
    pub fn new(tokenizer: &'t Tokenizer, skip_special_tokens: bool) -> Self {
        Self { tokenizer, ids: Vec::new(), prefix_offset: 0, read_offset: 0, skip_special_tokens }
    }

    fn decode(&self, ids: &[u32]) -> String {
        self.tokenizer.decode(ids, self.skip_special_tokens).unwrap_or_default()
    }

    /// Adds one token; returns the text that became final, if any.
    pub fn push(&mut self, id: u32) -> Option<String> {
        self.ids.push(id);
        let prefix = self.decode(&self.ids[self.prefix_offset..self.read_offset]);
        let full = self.decode(&self.ids[self.prefix_offset..]);
        if full.len() > prefix.len()
            && !full.ends_with('\u{FFFD}')
            && full.is_char_boundary(prefix.len())
            && full.starts_with(&prefix)
        {
            let delta = full[prefix.len()..].to_string();
            // The next window starts at the tokens just emitted: they are the left context that decoders
            // which strip a leading space at the start of a text need to decode the new token correctly.
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            Some(delta)
        } else {
            None
        }
    }

    /// Text not yet emitted (held back because it ended in an incomplete character).
    pub fn flush(&mut self) -> Option<String> {
        let prefix = self.decode(&self.ids[self.prefix_offset..self.read_offset]);
        let full = self.decode(&self.ids[self.prefix_offset..]);
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        match full.strip_prefix(prefix.as_str()) {
            Some(rest) if !rest.is_empty() => Some(rest.to_string()),
            _ => None,
        }
    }

    pub fn ids(&self) -> &[u32] {
        &self.ids
    }
}
