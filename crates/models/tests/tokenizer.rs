//! The tokenizer built from each GGUF's metadata gives the same ids as the real Hugging Face tokenizer, and
//! the model's own chat template renders and tokenizes the reference chat prompts exactly.

use mlx_serving_models::{tokenizer_from_gguf, ChatTemplate, GgufFile, SpecialTokens};
use mlx_serving_test_support::{
    gemma3_path, qwen2_path, reference, reference_chat_template, reference_tokenizer, smollm2_path,
};
use std::path::Path;

const EXTRA_TEXTS: &[&str] = &[
    "",
    "Hello world",
    " leading space and trailing space ",
    "Café crème brûlée, naïve façade, Ångström, Übermäßig",
    "日本語のテキストと中文文本，还有한국어.",
    "Emoji: 😀🎉👩‍👩‍👧‍👦 🇫🇷 ✨",
    "fn main() {\n    let x: Vec<u32> = (0..10).map(|i| i * 2).collect();\n\tprintln!(\"{x:?}\");\n}\n",
    "def f(a, b):\n        return a**b  # tabs\t\tand spaces",
    "many     spaces\n\n\n\nnewlines\r\n\r\n   \t  mixed   ",
    "digits 1234567890 3.14159 1,000,000 2024-11-26 007",
    "I'm sure they'll say we've done it, isn't it? YOU'RE RIGHT",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "<tool_call>{\"name\": \"f\"}</tool_call> <|endoftext|>",
    "a\u{00a0}non-breaking\u{2003}em space\u{200b}zero width",
    "                                                                  ",
];

fn check_model(path: &Path, hf_name: &str, ref_file: &str) {
    let g = GgufFile::open(path).unwrap();
    let ours = tokenizer_from_gguf(&g).unwrap();
    let theirs = reference_tokenizer(hf_name);
    assert_eq!(ours.get_vocab_size(true), theirs.get_vocab_size(true), "vocab size with added tokens");
    let prompts = reference("prompts.json");
    let refs = reference(ref_file);
    let mut texts: Vec<String> = EXTRA_TEXTS.iter().map(|s| s.to_string()).collect();
    texts.extend(prompts["completion"].as_array().unwrap().iter().map(|p| p.as_str().unwrap().to_string()));
    texts.extend(
        refs["items"].as_array().unwrap().iter().filter_map(|i| i["rendered_prompt"].as_str().map(String::from)),
    );
    for text in &texts {
        let a = ours.encode(text.as_str(), false).unwrap();
        let b = theirs.encode(text.as_str(), false).unwrap();
        assert_eq!(a.get_ids(), b.get_ids(), "{hf_name}: ids differ for {text:?}");
        let da = ours.decode(a.get_ids(), false).unwrap();
        let db = theirs.decode(b.get_ids(), false).unwrap();
        assert_eq!(da, db, "{hf_name}: decode differs for {text:?}");
        assert_eq!(&da, text, "{hf_name}: decode does not round-trip");
    }
    // The completion prompts' ids in the reference file came from the real tokenizer too.
    for item in refs["items"].as_array().unwrap().iter().filter(|i| i["kind"] == "completion") {
        let ids: Vec<u32> = item["prompt_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        assert_eq!(ours.encode(item["prompt"].as_str().unwrap(), true).unwrap().get_ids(), &ids[..]);
    }
}

#[test]
fn smollm2_gguf_tokenizer_matches_hugging_face() {
    check_model(&smollm2_path(), "SmolLM2-135M-Instruct", "greedy-SmolLM2-135M-Instruct-transformers-f32.json");
}

#[test]
fn qwen2_gguf_tokenizer_matches_hugging_face() {
    check_model(
        &qwen2_path(),
        "Qwen2.5-Coder-0.5B-Instruct",
        "greedy-Qwen2.5-Coder-0.5B-Instruct-transformers-f32.json",
    );
}

fn check_template(path: &Path, hf_name: &str, ref_file: &str) {
    let g = GgufFile::open(path).unwrap();
    let tok = tokenizer_from_gguf(&g).unwrap();
    let specials = SpecialTokens::from_gguf(&g).unwrap();
    let text = |id: Option<u32>| id.and_then(|i| tok.id_to_token(i)).unwrap_or_default();
    let src = g.get_str("tokenizer.chat_template").unwrap();
    let ours = ChatTemplate::new(src, text(specials.bos), text(specials.eos)).unwrap();
    let hf = ChatTemplate::new(&reference_chat_template(hf_name), text(specials.bos), text(specials.eos)).unwrap();
    let refs = reference(ref_file);
    let mut n = 0;
    for item in refs["items"].as_array().unwrap().iter().filter(|i| i["kind"] == "chat") {
        let rendered = ours.render(&item["prompt"], None::<&()>, true).unwrap();
        assert_eq!(rendered, item["rendered_prompt"].as_str().unwrap(), "{hf_name}: rendering differs");
        assert_eq!(hf.render(&item["prompt"], None::<&()>, true).unwrap(), rendered, "GGUF and HF templates disagree");
        let ids: Vec<u32> = item["prompt_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        assert_eq!(
            tok.encode(rendered.as_str(), false).unwrap().get_ids(),
            &ids[..],
            "{hf_name}: chat prompt ids differ"
        );
        n += 1;
    }
    assert_eq!(n, 12);
}

#[test]
fn smollm2_chat_template_renders_reference_prompts() {
    check_template(&smollm2_path(), "SmolLM2-135M-Instruct", "greedy-SmolLM2-135M-Instruct-transformers-f32.json");
}

#[test]
fn qwen2_chat_template_renders_reference_prompts() {
    check_template(
        &qwen2_path(),
        "Qwen2.5-Coder-0.5B-Instruct",
        "greedy-Qwen2.5-Coder-0.5B-Instruct-transformers-f32.json",
    );
}

#[test]
fn qwen2_template_renders_tools() {
    let g = GgufFile::open(qwen2_path()).unwrap();
    let t = ChatTemplate::new(g.get_str("tokenizer.chat_template").unwrap(), "", "<|im_end|>").unwrap();
    let tools = serde_json::json!([{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]);
    let msgs = serde_json::json!([{"role": "user", "content": "Weather in Paris?"}]);
    let out = t.render(&msgs, Some(&tools), true).unwrap();
    assert!(
        out.contains(r#"{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}"#),
        "{out}"
    );
    assert!(out.ends_with("<|im_start|>assistant\n"));
}

#[test]
fn special_tokens_come_from_the_gguf() {
    let s = SpecialTokens::from_gguf(&GgufFile::open(smollm2_path()).unwrap()).unwrap();
    assert_eq!((s.bos, s.eos, s.add_bos), (Some(1), Some(2), false));
    assert!(s.eog.contains(&2) && s.eog.contains(&0), "{:?}", s.eog);
    let q = SpecialTokens::from_gguf(&GgufFile::open(qwen2_path()).unwrap()).unwrap();
    assert!(q.eog.contains(&151645) && q.eog.contains(&151643), "{:?}", q.eog);
}

/// Gemma's SentencePiece tokenizer, built from the GGUF alone (scores, byte fallback, user-defined tokens),
/// against llama.cpp's own tokenizer on the same file (`testdata/reference/llama.cpp-tokens-gemma-3-270m.json`:
/// spaces, tabs and newline runs, accents, CJK, emoji, bytes outside the vocabulary, control characters), and
/// decoding gives the text back.
#[test]
fn gemma3_gguf_tokenizer_matches_llama_cpp() {
    let g = GgufFile::open(gemma3_path()).unwrap();
    let ours = tokenizer_from_gguf(&g).unwrap();
    let refs = reference("llama.cpp-tokens-gemma-3-270m.json");
    for item in refs["items"].as_array().unwrap() {
        let text = item["text"].as_str().unwrap();
        let want: Vec<u32> = item["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        let got = ours.encode(text, false).unwrap();
        assert_eq!(got.get_ids(), &want[..], "ids differ for {text:?}");
        assert_eq!(ours.decode(got.get_ids(), false).unwrap(), text, "decode does not round-trip");
    }
    // BOS is prepended as the file asks.
    assert_eq!(ours.encode("Hello", true).unwrap().get_ids()[0], 2);
}
