//! What the benchmark sends: the built-in prompt set, JSONL files, or synthetic prompts of a given length.

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::path::Path;

/// One benchmark input: chat messages (always present) and a plain prompt for `/v1/completions`.
#[derive(Clone, Debug, PartialEq)]
pub struct Item {
    pub messages: Vec<Value>,
    pub prompt: String,
}

impl Item {
    pub fn from_prompt(prompt: &str) -> Self {
        Self { messages: vec![json!({"role": "user", "content": prompt})], prompt: prompt.to_string() }
    }

    /// A conversation; the completions prompt is the turns as `role: content` lines plus `assistant:`.
    pub fn from_messages(messages: Vec<Value>) -> Result<Self> {
        let mut prompt = String::new();
        for (i, m) in messages.iter().enumerate() {
            let role = m.get("role").and_then(Value::as_str).with_context(|| format!("messages[{i}].role"))?;
            let content = m.get("content").and_then(Value::as_str).with_context(|| format!("messages[{i}].content"))?;
            prompt.push_str(&format!("{role}: {content}\n"));
        }
        if messages.is_empty() {
            bail!("messages is empty");
        }
        prompt.push_str("assistant:");
        Ok(Self { messages, prompt })
    }
}

/// Single-turn prompts of varied kinds: questions, instructions, code, summaries, lists.
const BUILTIN_PROMPTS: &[&str] = &[
    "What is the capital of Australia, and why was it chosen over Sydney and Melbourne?",
    "Explain how a refrigerator keeps food cold, in terms a ten-year-old would understand.",
    "Write a short poem about a lighthouse keeper who has never seen the sea in daylight.",
    "List five practical tips for keeping houseplants alive during winter.",
    "Write a Python function that returns the n-th Fibonacci number using memoization.",
    "What are the main differences between TCP and UDP? Give one use case for each.",
    "Summarize the plot of Romeo and Juliet in three sentences.",
    "Translate into French: 'The train leaves at seven, so we should have breakfast early.'",
    "Write a SQL query that finds the ten customers with the highest total order value.",
    "Why is the sky blue? Keep the answer under one hundred words.",
    "Give me a recipe for a simple vegetable soup with ingredients and steps.",
    "Write a Rust function that reverses the words in a sentence without allocating more than once.",
    "What causes the seasons on Earth?",
    "Draft a polite email asking a colleague to review a pull request by Friday.",
    "Explain the difference between a process and a thread in an operating system.",
    "Describe the water cycle step by step.",
    "Write a haiku about a cat watching rain through a window.",
    "What is a hash table, and what is the average cost of a lookup?",
    "Give three arguments for and three against working from home.",
    "Write a bash one-liner that counts the lines of every .rs file under the current directory.",
    "Who was Ada Lovelace and why is she remembered?",
    "Explain what a neural network is to someone who knows only high-school algebra.",
    "Write a JavaScript function that debounces another function.",
    "What should I pack for a three-day hiking trip in the mountains?",
    "Compare the climates of Norway and Portugal.",
    "Write a limerick about a programmer who forgot to save their work.",
    "Explain compound interest with a worked example.",
    "What is the difference between weather and climate?",
    "Write a C function that checks whether a string is a palindrome.",
    "Suggest a name and a one-line description for a coffee shop run by robots.",
    "How do vaccines train the immune system?",
    "Rewrite this sentence to be more concise: 'At this point in time we are currently in the process of reviewing it.'",
];

/// Multi-turn conversations (user, assistant, user).
const BUILTIN_CONVERSATIONS: &[[&str; 3]] = &[
    [
        "I want to learn a new programming language. Any suggestions?",
        "It depends on your goals. Python is great for beginners and data work; Rust suits systems programming.",
        "I care about performance and safety. Which one, and where should I start?",
    ],
    [
        "Can you help me plan a dinner party for six people?",
        "Of course. Do any guests have dietary restrictions, and what kind of cuisine do you like?",
        "One guest is vegetarian and we like Italian food. What menu would you propose?",
    ],
    [
        "What's a good way to start running?",
        "Begin with a run-walk plan: alternate one minute of running with two of walking, three times a week.",
        "How long until I can run five kilometres without stopping?",
    ],
    [
        "Write a function that adds two numbers in Python.",
        "def add(a, b):\n    return a + b",
        "Now add type hints and a docstring, and handle strings that contain numbers.",
    ],
];

/// The built-in set: every single-turn prompt, then the conversations.
pub fn builtin() -> Vec<Item> {
    let mut items: Vec<Item> = BUILTIN_PROMPTS.iter().map(|p| Item::from_prompt(p)).collect();
    for [u1, a1, u2] in BUILTIN_CONVERSATIONS {
        let messages = vec![
            json!({"role": "user", "content": u1}),
            json!({"role": "assistant", "content": a1}),
            json!({"role": "user", "content": u2}),
        ];
        items.push(Item::from_messages(messages).expect("built-in conversations are well formed"));
    }
    items
}

/// Reads JSONL: one `{"prompt": "..."}` or `{"messages": [...]}` object per line; blank lines skipped.
pub fn from_jsonl(path: &Path) -> Result<Vec<Item>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut items = Vec::new();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let at = || format!("{}:{}", path.display(), i + 1);
        let v: Value = serde_json::from_str(line).with_context(at)?;
        let item = match (v.get("prompt"), v.get("messages")) {
            (Some(Value::String(p)), None) => Item::from_prompt(p),
            (None, Some(Value::Array(m))) => Item::from_messages(m.clone()).with_context(at)?,
            _ => bail!("{}: expected {{\"prompt\": string}} or {{\"messages\": [...]}}", at()),
        };
        items.push(item);
    }
    if items.is_empty() {
        bail!("{} holds no prompts", path.display());
    }
    Ok(items)
}

/// Common English words, each one token (with its leading space) in most BPE vocabularies.
const WORDS: &[&str] = &[
    "the", "of", "and", "to", "in", "is", "was", "that", "for", "on", "with", "as", "by", "at", "from", "his", "her",
    "they", "this", "which", "time", "people", "year", "way", "day", "man", "thing", "woman", "life", "child", "world",
    "school", "state", "family", "group", "country", "problem", "hand", "part", "place", "case", "week", "company",
    "system", "program", "question", "work", "number", "night", "point", "home", "water", "room", "mother", "area",
    "money", "story", "fact", "month", "lot", "right", "study", "book", "eye", "job", "word", "business", "issue",
    "side", "kind", "head", "house", "service", "friend", "father", "power", "hour", "game", "line", "end", "member",
    "law", "car", "city", "name", "team", "minute", "idea", "body", "back", "parent",
];

/// `count` prompts of about `input_len` tokens each: random common words, then a request to continue, so the
/// model has something to do. Token counts are approximate; the report uses the server's `usage`.
pub fn synthetic(input_len: usize, count: usize, rng: &mut SplitMix) -> Vec<Item> {
    (0..count)
        .map(|_| {
            let words: Vec<&str> =
                (0..input_len.saturating_sub(8).max(1)).map(|_| WORDS[rng.below(WORDS.len())]).collect();
            Item::from_prompt(&format!("{}. Continue this text with a story:", words.join(" ")))
        })
        .collect()
}

/// Questions asked about the shared documents.
const QUESTIONS: &[&str] = &[
    "Summarize the text above in one sentence.",
    "Which word appears most often above?",
    "Give the text above a title.",
    "What is the first word of the text above?",
    "Write one question about the text above.",
    "Is the text above a story or a list?",
    "Name three words from the text above.",
    "Continue the text above with one more sentence.",
];

/// `count` prompts over `groups` shared documents of about `prefix_len` tokens each (random common words): each
/// prompt is one document followed by a question and a number, so prompts of a group share a long prefix and
/// differ after it. A workload for prefix caches and cache-aware routing.
pub fn shared_prefix(prefix_len: usize, groups: usize, count: usize, rng: &mut SplitMix) -> Vec<Item> {
    let docs: Vec<String> = (0..groups.max(1))
        .map(|g| {
            let words: Vec<&str> = (0..prefix_len.max(1)).map(|_| WORDS[rng.below(WORDS.len())]).collect();
            format!("Document {g}: {}.", words.join(" "))
        })
        .collect();
    (0..count)
        .map(|i| {
            let q = QUESTIONS[rng.below(QUESTIONS.len())];
            Item::from_prompt(&format!("{}\n\nQuestion {i}: {q}", docs[rng.below(docs.len())]))
        })
        .collect()
}

/// A small seeded RNG (SplitMix64) for prompt order, synthetic text and Poisson arrivals.
#[derive(Clone, Debug)]
pub struct SplitMix(u64);

impl SplitMix {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// An exponential variate with the given rate (the gap between Poisson arrivals).
    pub fn exp(&mut self, rate: f64) -> f64 {
        -(1.0 - self.next_f64()).ln() / rate
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_prefix_prompts_share_documents() {
        let items = shared_prefix(50, 3, 30, &mut SplitMix::new(7));
        assert_eq!(items.len(), 30);
        let doc = |it: &Item| it.prompt.split("\n\n").next().unwrap().to_string();
        let mut docs: Vec<String> = items.iter().map(doc).collect();
        docs.sort();
        docs.dedup();
        assert_eq!(docs.len(), 3, "three documents");
        assert!(docs.iter().all(|d| d.split(' ').count() >= 50));
        let mut prompts: Vec<&str> = items.iter().map(|i| i.prompt.as_str()).collect();
        prompts.sort();
        prompts.dedup();
        assert_eq!(prompts.len(), 30, "every prompt distinct after its document");
    }

    #[test]
    fn builtin_set_is_varied_and_well_formed() {
        let items = builtin();
        assert!(items.len() >= 32);
        assert!(items.iter().any(|i| i.messages.len() == 3), "multi-turn conversations included");
        assert!(items.iter().any(|i| i.prompt.contains("function")), "code prompts included");
        assert!(items.iter().all(|i| i.messages.last().unwrap()["role"] == "user"));
    }

    #[test]
    fn jsonl_accepts_prompts_and_messages_and_names_bad_lines() {
        let dir = std::env::temp_dir().join(format!("bench-ds-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("good.jsonl");
        std::fs::write(&good, "{\"prompt\": \"hi\"}\n\n{\"messages\": [{\"role\": \"user\", \"content\": \"yo\"}]}\n")
            .unwrap();
        let items = from_jsonl(&good).unwrap();
        assert_eq!(items.len(), 2);
        assert_eq!(items[1].prompt, "user: yo\nassistant:");
        let bad = dir.join("bad.jsonl");
        std::fs::write(&bad, "{\"prompt\": \"hi\"}\n{\"text\": 3}\n").unwrap();
        let e = from_jsonl(&bad).unwrap_err().to_string();
        assert!(e.contains("bad.jsonl:2"), "{e}");
    }

    #[test]
    fn synthetic_prompts_have_about_the_asked_length_and_follow_the_seed() {
        let a = synthetic(128, 3, &mut SplitMix::new(1));
        let b = synthetic(128, 3, &mut SplitMix::new(1));
        assert_eq!(a, b);
        let words = a[0].prompt.split_whitespace().count();
        assert!((120..=130).contains(&words), "{words}");
        assert_ne!(a[0], a[1]);
    }

    #[test]
    fn exponential_gaps_have_the_right_mean() {
        let mut r = SplitMix::new(9);
        let n = 20_000;
        let mean = (0..n).map(|_| r.exp(4.0)).sum::<f64>() / n as f64;
        assert!((mean - 0.25).abs() < 0.01, "{mean}");
    }
}
