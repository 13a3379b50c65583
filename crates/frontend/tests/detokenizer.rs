//! Incremental detokenization with the real SmolLM2 and Qwen2.5 tokenizers.

use mlx_serving_frontend::IncrementalDetokenizer;
use mlx_serving_test_support::reference_tokenizer;

const TEXTS: &[&str] = &[
    "Plain English text, with punctuation!",
    "Emoji 😀🎉 and a family 👩‍👩‍👧‍👦 and flags 🇫🇷🇯🇵",
    "日本語のテキスト、中文文本，한국어 텍스트",
    "Accents: café, naïve, Ångström, Übermäßig — “quotes”",
    "code:\n    fn main() {\n\t\tprintln!(\"hi\");\n    }\n",
];

#[test]
fn deltas_are_valid_utf8_and_join_to_the_full_decode() {
    for model in ["SmolLM2-135M-Instruct", "Qwen2.5-Coder-0.5B-Instruct"] {
        let tok = reference_tokenizer(model);
        let mut held_back = 0;
        for text in TEXTS {
            let ids = tok.encode(*text, false).unwrap().get_ids().to_vec();
            let mut d = IncrementalDetokenizer::new(&tok, true);
            let mut joined = String::new();
            for &id in &ids {
                match d.push(id) {
                    Some(delta) => {
                        assert!(!delta.contains('\u{FFFD}'), "{model}: broken character in delta {delta:?}");
                        joined.push_str(&delta);
                    }
                    None => held_back += 1,
                }
            }
            if let Some(rest) = d.flush() {
                joined.push_str(&rest);
            }
            assert_eq!(joined, tok.decode(&ids, true).unwrap(), "{model}: {text:?}");
            assert_eq!(&joined, text);
        }
        // Byte-level BPE splits emoji and CJK characters across tokens: those tokens must have been held.
        assert!(held_back > 0, "{model}: no token was ever held back, so the UTF-8 split case was not exercised");
    }
}

#[test]
fn invalid_utf8_at_the_end_is_released_by_flush() {
    let tok = reference_tokenizer("SmolLM2-135M-Instruct");
    // The first token of a multi-token emoji alone is an incomplete UTF-8 sequence.
    let ids = tok.encode("😀", false).unwrap().get_ids().to_vec();
    assert!(ids.len() > 1, "emoji should take several byte-level tokens: {ids:?}");
    let mut d = IncrementalDetokenizer::new(&tok, true);
    assert_eq!(d.push(ids[0]), None);
    assert_eq!(d.flush(), Some(tok.decode(&ids[..1], true).unwrap()));
}
