use super::*;
use mlx_serving_engine::mask_allows;
use mlx_serving_models::LoadOptions;
use std::sync::OnceLock;

fn bundle(which: &str) -> &'static Arc<ModelBundle> {
    static SMOL: OnceLock<Arc<ModelBundle>> = OnceLock::new();
    static QWEN: OnceLock<Arc<ModelBundle>> = OnceLock::new();
    static GEMMA: OnceLock<Arc<ModelBundle>> = OnceLock::new();
    let (cell, path) = match which {
        "smollm2" => (&SMOL, mlx_serving_test_support::smollm2_path()),
        "qwen2" => (&QWEN, mlx_serving_test_support::qwen2_path()),
        _ => (&GEMMA, mlx_serving_test_support::gemma3_path()),
    };
    cell.get_or_init(|| Arc::new(ModelBundle::load(path, &LoadOptions::default()).expect("model")))
}

fn vocab(which: &str) -> &'static Vocab {
    static V: OnceLock<std::sync::Mutex<Vec<(&'static str, &'static Vocab)>>> = OnceLock::new();
    let mut cache = V.get_or_init(Default::default).lock().unwrap();
    if let Some((_, v)) = cache.iter().find(|(w, _)| *w == which) {
        return v;
    }
    let name: &'static str = Box::leak(which.to_string().into_boxed_str());
    let v: &'static Vocab = Box::leak(Box::new(Vocab::for_model(bundle(which)).expect("vocab")));
    cache.push((name, v));
    v
}

fn encode(which: &str, text: &str) -> Vec<u32> {
    bundle(which).tokenizer.encode(text, false).unwrap().get_ids().to_vec()
}

/// Feeds `text`'s tokens one by one, each checked against the mask first. `Ok(accepting)` when every token
/// was allowed; `Err(i)` at the first refused token.
fn feed(which: &str, c: &Compiled, text: &str) -> Result<bool, usize> {
    let mut st = c.matcher().unwrap();
    for (i, t) in encode(which, text).into_iter().enumerate() {
        let mask = st.allowed().unwrap();
        if !mask_allows(&mask, t) {
            return Err(i);
        }
        st.advance(t).unwrap();
    }
    Ok(st.is_accepting() || st.is_complete())
}

const MODELS: [&str; 3] = ["smollm2", "qwen2", "gemma3"];

/// Every schema of `testdata/schemas`: its valid examples (compact JSON, keys in the schema's order) run
/// through the matcher token by token on all three vocabularies (GPT-2 byte-level BPE and SentencePiece), and
/// end accepting; its invalid ones are refused somewhere or end unfinished.
#[test]
fn schema_examples_are_accepted_and_violations_refused() {
    let dir = mlx_serving_test_support::testdata().join("schemas");
    let mut files: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    files.retain(|p| p.extension().is_some_and(|e| e == "json"));
    files.sort();
    assert!(files.len() >= 60, "{} schemas in {}", files.len(), dir.display());
    for which in MODELS {
        for f in &files {
            let case: Value = serde_json::from_slice(&std::fs::read(f).unwrap()).unwrap();
            let c = vocab(which)
                .compile(&Spec::JsonSchema(case["schema"].clone()))
                .unwrap_or_else(|e| panic!("{}: {e}", f.display()));
            for v in case["valid"].as_array().unwrap() {
                let text = v.to_string();
                assert_eq!(feed(which, &c, &text), Ok(true), "{which} {}: valid {text}", f.display());
            }
            for v in case["invalid"].as_array().unwrap() {
                let text = v.to_string();
                assert_ne!(feed(which, &c, &text), Ok(true), "{which} {}: invalid {text} accepted", f.display());
            }
        }
    }
}

#[test]
fn choice_regex_and_grammar_constrain_the_tokens() {
    for which in MODELS {
        let v = vocab(which);
        let choice = v.compile(&Spec::Choice(vec!["yes".into(), "no".into(), "maybe so".into()])).unwrap();
        for ok in ["yes", "no", "maybe so"] {
            assert_eq!(feed(which, &choice, ok), Ok(true), "{which} {ok}");
        }
        assert!(feed(which, &choice, "nope").is_err() || feed(which, &choice, "nope") == Ok(false));
        // Every allowed first token is a prefix of a choice.
        let mut st = choice.matcher().unwrap();
        let mask = st.allowed().unwrap();
        let tb = &bundle(which).token_bytes;
        let allowed: Vec<u32> = (0..v.vocab_size() as u32).filter(|&t| mask_allows(&mask, t)).collect();
        assert!(!allowed.is_empty());
        for t in allowed {
            let b = tb.get(t);
            assert!(
                ["yes", "no", "maybe so"].iter().any(|c| c.as_bytes().starts_with(b) && !b.is_empty()),
                "{which}: token {t} {:?} allowed first",
                String::from_utf8_lossy(b)
            );
        }

        let rx = v.compile(&Spec::Regex(r"[A-Z][a-z]{2,5}-\d{3}".into())).unwrap();
        assert_eq!(feed(which, &rx, "Abc-123"), Ok(true), "{which}");
        assert_ne!(feed(which, &rx, "abc-123"), Ok(true), "{which}");
        assert_ne!(feed(which, &rx, "Abc-12"), Ok(true), "{which}");

        let g = v.compile(&Spec::Grammar("start: expr\nexpr: NUM | expr \"+\" NUM\nNUM: /[0-9]+/".into())).unwrap();
        assert_eq!(feed(which, &g, "1+22+333"), Ok(true), "{which}");
        assert_ne!(feed(which, &g, "1++2"), Ok(true), "{which}");
    }
}

/// Once a JSON object closes, the constraint is complete: the mask is end-of-sequence alone.
#[test]
fn a_finished_document_allows_only_end_of_sequence() {
    for which in MODELS {
        let v = vocab(which);
        let c = v.compile(&Spec::JsonObject).unwrap();
        let mut st = c.matcher().unwrap();
        for t in encode(which, r#"{"a": [1, 2]}"#) {
            assert!(mask_allows(&st.allowed().unwrap(), t));
            st.advance(t).unwrap();
        }
        let mask = st.allowed().unwrap();
        let allowed: Vec<u32> = (0..v.vocab_size() as u32).filter(|&t| mask_allows(&mask, t)).collect();
        assert_eq!(allowed, vec![bundle(which).special_tokens.eog[0]], "{which}");
    }
}

/// JSON whitespace is bounded: after `{`, a run of 16 spaces is the most one place admits.
#[test]
fn json_whitespace_is_bounded() {
    let v = vocab("smollm2");
    let c = v.compile(&Spec::JsonObject).unwrap();
    let space = encode("smollm2", " ");
    assert_eq!(space.len(), 1);
    let mut st = c.matcher().unwrap();
    st.advance(encode("smollm2", "{")[0]).unwrap();
    let mut n = 0;
    while mask_allows(&st.allowed().unwrap(), space[0]) {
        st.advance(space[0]).unwrap();
        n += 1;
        assert!(n <= 16);
    }
    assert_eq!(n, 16);
}

#[test]
fn bad_constraints_are_compile_errors() {
    let v = vocab("smollm2");
    let cases = [
        Spec::Regex("[a-z".into()),
        Spec::Grammar("start: (".into()),
        Spec::Grammar("start: undefined_rule".into()),
        Spec::JsonSchema(json!({"$ref": "#/$defs/missing"})),
        Spec::JsonSchema(json!({"type": "nonsense"})),
        Spec::JsonSchema(json!({"type": "string", "format": "not-a-format"})),
        Spec::JsonSchema(json!([1, 2])),
        Spec::JsonSchema(json!({"type": "integer", "minimum": 5, "maximum": 1})),
        Spec::Choice(vec![]),
    ];
    for spec in cases {
        let e = v.compile(&spec).expect_err(&format!("{spec:?} compiled"));
        assert!(!e.0.is_empty());
    }
}

fn weather_tools(required: bool, parallel: bool) -> Spec {
    let city = json!({"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}, "unit": {"enum": ["c", "f"]}}, "required": ["city"], "additionalProperties": false});
    let time = json!({"type": "object", "properties": {"zone": {"type": "string"}}, "required": ["zone"]});
    Spec::ToolCalls(ToolCalls {
        tools: vec![("get_weather".into(), city), ("get_time".into(), time)],
        required,
        parallel,
    })
}

const CALL: &str =
    "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\", \"unit\": \"c\"}}\n</tool_call>";

/// `required` (or a named function): calls only, each valid against its tool's schema; one unless parallel.
#[test]
fn required_tool_calls_are_well_formed() {
    for which in ["qwen2", "smollm2"] {
        let v = vocab(which);
        let one = v.compile(&weather_tools(true, false)).unwrap();
        assert_eq!(feed(which, &one, CALL), Ok(true), "{which}");
        assert!(feed(which, &one, "Sure! ").is_err(), "{which}: text first");
        let two = format!(
            "{CALL}\n{}",
            CALL.replace("get_weather", "get_time")
                .replace("\"city\": \"Paris\", \"unit\": \"c\"", "\"zone\": \"UTC\"")
        );
        assert_ne!(feed(which, &one, &two), Ok(true), "{which}: a second call without parallel");
        let par = v.compile(&weather_tools(true, true)).unwrap();
        assert_eq!(feed(which, &par, &two), Ok(true), "{which}");
        // Arguments against the schema: an unknown unit, a missing city, an unknown tool.
        for bad in [
            CALL.replace("\"c\"", "\"k\""),
            CALL.replace("\"city\": \"Paris\", ", ""),
            CALL.replace("get_weather", "get_news"),
        ] {
            assert_ne!(feed(which, &one, &bad), Ok(true), "{which}: {bad}");
        }
    }
}

/// `auto`: plain text is a complete answer; text may lead into a call; once the opening tag is out, the call
/// is constrained like a required one.
#[test]
fn auto_tool_calls_allow_text_and_constrain_calls_from_their_tag() {
    for which in ["qwen2", "smollm2"] {
        let v = vocab(which);
        let auto = v.compile(&weather_tools(false, true)).unwrap();
        assert_eq!(feed(which, &auto, "The weather is nice."), Ok(true), "{which}");
        assert_eq!(feed(which, &auto, CALL), Ok(true), "{which}");
        assert_eq!(feed(which, &auto, &format!("Let me check.\n{CALL}")), Ok(true), "{which}");
        assert!(feed(which, &auto, "<tool_call>\nI think it is sunny").is_err(), "{which}: free text after the tag");
        assert!(feed(which, &auto, &format!("{CALL} and more text")).is_err(), "{which}: text after a call");
    }
}

#[test]
fn tool_parameter_schemas_are_checked() {
    let v = vocab("smollm2");
    let bad = Spec::ToolCalls(ToolCalls {
        tools: vec![("f".into(), json!({"type": "object", "properties": {"a": {"$ref": "#/$defs/nope"}}}))],
        required: true,
        parallel: false,
    });
    assert!(v.compile(&bad).is_err());
    let none = Spec::ToolCalls(ToolCalls { tools: vec![], required: true, parallel: false });
    assert!(v.compile(&none).is_err());
}

/// Regression: llguidance's `date-time` follows RFC 3339's grammar, and a seeded sampled answer on Qwen2.5
/// wrote `0000-01-01T00:00:00.000-00:00`, which `jsonschema`'s format checker refuses (year 0). Dates are now
/// real calendar dates: no year 0, no 31 April, 29 February in leap years only.
#[test]
fn dates_are_real_calendar_dates() {
    let v = vocab("qwen2");
    let schema = json!({
        "type": "object",
        "properties": {"when": {"type": "string", "format": "date-time"}, "day": {"type": "string", "format": "date"}},
        "required": ["when", "day"],
        "additionalProperties": false
    });
    let c = v.compile(&Spec::JsonSchema(schema)).unwrap();
    let doc = |when: &str, day: &str| format!(r#"{{"when":"{when}","day":"{day}"}}"#);
    for (when, day) in [
        ("2024-02-29T12:30:00Z", "2000-02-29"),
        ("1999-12-31T23:59:59.123+05:30", "0001-01-01"),
        ("2023-04-30T00:00:00-08:00", "2023-11-30"),
    ] {
        assert_eq!(feed("qwen2", &c, &doc(when, day)), Ok(true), "{when} {day}");
    }
    for (when, day) in [
        ("0000-01-01T00:00:00.000-00:00", "2024-01-01"),
        ("2023-02-29T00:00:00Z", "2024-01-01"),
        ("2024-01-01T00:00:00Z", "1900-02-29"),
        ("2024-01-01T00:00:00Z", "2024-04-31"),
        ("2024-01-01T24:00:00Z", "2024-01-01"),
    ] {
        assert_ne!(feed("qwen2", &c, &doc(when, day)), Ok(true), "{when} {day} was accepted");
    }
    // `const` and `enum` values are data, not schemas: left as they are.
    let mut s = json!({"const": {"format": "date"}, "properties": {"d": {"format": "date", "pattern": "^x$"}}});
    strict_dates(&mut s);
    assert_eq!(s, json!({"const": {"format": "date"}, "properties": {"d": {"format": "date", "pattern": "^x$"}}}));
}
