//! Everything needed to serve one model file: weights, tokenizer, chat template, special tokens.

use crate::chat_template::ChatTemplate;
use crate::chat_tokens::{SpecialTokenText, TokenBytes};
use crate::decoder::{LoadOptions, Model};
use crate::error::{Error, Result};
use crate::gguf::GgufFile;
use crate::hf::HfDir;
use crate::tokenizer::{load_tokenizer, SpecialTokens};
use crate::vision::{ImageProcessing, VisionModel};
use std::path::{Path, PathBuf};
use tokenizers::Tokenizer;

pub struct ModelBundle {
    pub path: PathBuf,
    pub model: Model,
    pub tokenizer: Tokenizer,
    pub chat_template: Option<ChatTemplate>,
    pub special_tokens: SpecialTokens,
    /// Each token's exact bytes (logprobs' `bytes`, `text_offset`).
    pub token_bytes: TokenBytes,
    /// The longest token in bytes: a text of more than `n × max_token_bytes` bytes has more than `n` tokens.
    pub max_token_bytes: usize,
    special_text: SpecialTokenText,
    /// A vision-language model's vision tower and connector, and how its images are prepared.
    pub vision: Option<(std::sync::Arc<VisionModel>, ImageProcessing)>,
}

/// How a chat's message strings are tokenized.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ChatContent {
    /// Special-token texts inside messages are plain text: only the template's markup is control tokens.
    #[default]
    Text,
    /// Special-token texts inside messages become control tokens (the old behaviour; lets a message forge
    /// turns).
    ParseSpecial,
}

impl std::fmt::Debug for ModelBundle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelBundle").field("path", &self.path).finish_non_exhaustive()
    }
}

/// The result of a scoped loading thread; a panic there is an error here.
fn joined<T>(h: std::thread::ScopedJoinHandle<'_, Result<T>>) -> Result<T> {
    h.join().map_err(|_| Error::Tokenizer("the tokenizer thread panicked".into()))?
}

impl ModelBundle {
    /// Loads a GGUF file, or a Hugging Face directory (told apart by what `path` is).
    pub fn load(path: impl AsRef<Path>, opts: &LoadOptions) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        if path.is_dir() {
            return Self::load_hf_dir(path, opts);
        }
        let g = GgufFile::open(&path)?;
        // The tokenizer builds on its own thread while the weights load (a large vocabulary's merges take
        // about as long as the weights).
        let (tokenizer, model) = std::thread::scope(|s| {
            let tokenizer = s.spawn(|| load_tokenizer(&path, &g));
            let model = Model::from_gguf(&g, opts, &candle_core::Device::Cpu);
            (joined(tokenizer), model)
        });
        let (tokenizer, model) = (tokenizer?, model?);
        let special_tokens = SpecialTokens::from_gguf(&g)?;
        let token_text = |id: Option<u32>| id.and_then(|i| tokenizer.id_to_token(i)).unwrap_or_default();
        let (bos, eos) = (token_text(special_tokens.bos), token_text(special_tokens.eos));
        // A file without a template (a base model) gets its family's format where there is one.
        let source = chat_template_source(&path, &g)?
            .or_else(|| crate::chat_template::builtin(model.config().architecture).map(String::from));
        let chat_template = match source {
            Some(src) => Some(ChatTemplate::new(&src, bos, eos)?),
            None => None,
        };
        Self::assemble(path, model, tokenizer, chat_template, special_tokens)
    }

    /// A Hugging Face directory: `config.json`, safetensors, `tokenizer.json`, the chat template from
    /// `tokenizer_config.json` or `chat_template.jinja`.
    fn load_hf_dir(path: PathBuf, opts: &LoadOptions) -> Result<Self> {
        if !HfDir::is_model_dir(&path) {
            return Err(Error::Io {
                path: path.join("config.json"),
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "not a model directory (no config.json)"),
            });
        }
        let dir = HfDir::open(&path)?;
        let cfg = dir.model_config()?;
        let vision = VisionModel::load(&dir)?.map(|(v, p)| (std::sync::Arc::new(v), p));
        let json = path.join("tokenizer.json");
        let (tokenizer, model) = std::thread::scope(|s| {
            let tokenizer = s.spawn(|| {
                Tokenizer::from_file(&json).map_err(|e| Error::Tokenizer(format!("{}: {e}", json.display())))
            });
            let model = Model::from_source(&dir, cfg.clone(), opts, &candle_core::Device::Cpu);
            (joined(tokenizer), model)
        });
        let (tokenizer, model) = (tokenizer?, model?);
        let special_tokens = dir.special_tokens(&tokenizer)?;
        let token_text = |id: Option<u32>| id.and_then(|i| tokenizer.id_to_token(i)).unwrap_or_default();
        let (bos, eos) = (token_text(special_tokens.bos), token_text(special_tokens.eos));
        let source =
            dir_chat_template(&path)?.or_else(|| crate::chat_template::builtin(cfg.architecture).map(String::from));
        let chat_template = match source {
            Some(src) => Some(ChatTemplate::new(&src, bos, eos)?),
            None => None,
        };
        let mut me = Self::assemble(path, model, tokenizer, chat_template, special_tokens)?;
        me.vision = vision;
        Ok(me)
    }

    fn assemble(
        path: PathBuf,
        model: Model,
        tokenizer: Tokenizer,
        chat_template: Option<ChatTemplate>,
        special_tokens: SpecialTokens,
    ) -> Result<Self> {
        let token_bytes = TokenBytes::new(&tokenizer, model.config().vocab_size);
        // Special tokens' texts count too: a raw prompt parses them as one token each.
        let special_len = tokenizer.get_added_tokens_decoder().values().map(|t| t.content.len()).max().unwrap_or(0);
        let max_token_bytes = (0..model.config().vocab_size as u32)
            .map(|id| token_bytes.get(id).len())
            .max()
            .unwrap_or(1)
            .max(special_len)
            .max(1);
        let special_text = SpecialTokenText::new(&tokenizer)?;
        Ok(Self {
            path,
            model,
            tokenizer,
            chat_template,
            special_tokens,
            token_bytes,
            max_token_bytes,
            special_text,
            vision: None,
        })
    }

    /// Renders a chat with the model's template and tokenizes it (the template writes any BOS itself). With
    /// [`ChatContent::Text`], special-token texts inside the messages are tokenized as text, so a message
    /// cannot forge a turn; only the template's own markup becomes control tokens.
    pub fn encode_chat<M: serde::Serialize>(&self, messages: &M, content: ChatContent) -> Result<Vec<u32>> {
        self.encode_chat_with_tools(messages, None, content)
    }

    /// `encode_chat` with a `tools` list for the template (OpenAI's `tools` array as given). With
    /// `ChatContent::Text`, special-token texts in the tools' descriptions stay text too.
    pub fn encode_chat_with_tools<M: serde::Serialize>(
        &self,
        messages: &M,
        tools: Option<&serde_json::Value>,
        content: ChatContent,
    ) -> Result<Vec<u32>> {
        let tmpl = self
            .chat_template
            .as_ref()
            .ok_or_else(|| Error::Template(format!("{} has no chat template", self.path.display())))?;
        match content {
            ChatContent::ParseSpecial => {
                let text = tmpl.render(messages, tools, true)?;
                self.encode(&text, false)
            }
            ChatContent::Text => {
                let messages = serde_json::to_value(messages).map_err(|e| Error::Template(e.to_string()))?;
                let both = serde_json::json!({"messages": messages, "tools": tools});
                self.special_text.encode_rendered_chat(&both, |v| {
                    tmpl.render(&v["messages"], Some(&v["tools"]).filter(|t| !t.is_null()), true)
                })
            }
        }
    }

    /// The token ids one image stands for in a prompt, as the model's processor writes them, for an image
    /// whose layout is `rows × cols`:
    ///
    /// - Idefics3: `rows × cols` tiles plus the global tile (0 × 0: the global tile alone):
    ///   `<fake_token_around_image><row_r_col_c>` + the tile's image tokens per tile, a newline after each row,
    ///   then a newline, `<fake_token_around_image><global-img>`, the global tile's image tokens and
    ///   `<fake_token_around_image>` (the newlines as the tokenizer reads them: `\n` and `\n\n`).
    /// - Qwen2-VL: a grid of `rows × cols` image tokens (patches / merge in each direction), one `<|image_pad|>`
    ///   each (the template writes the `<|vision_start|>` and `<|vision_end|>` around them).
    pub fn image_prompt_ids(&self, rows: usize, cols: usize) -> Result<Vec<u32>> {
        let Some((v, p)) = &self.vision else {
            return Err(Error::Template(format!("{} takes no images", self.path.display())));
        };
        let p = match p {
            ImageProcessing::Idefics3(p) => p,
            ImageProcessing::Qwen2Vl(_) => return Ok(vec![v.image_token_id(); rows * cols]),
        };
        let id = |t: &str| {
            self.tokenizer
                .token_to_id(t)
                .ok_or_else(|| Error::Tokenizer(format!("the tokenizer has no {t} token for images")))
        };
        let (fake, image) = (id("<fake_token_around_image>")?, v.image_token_id());
        let mut ids = Vec::new();
        for r in 1..=rows {
            for c in 1..=cols {
                ids.push(fake);
                ids.push(id(&format!("<row_{r}_col_{c}>"))?);
                ids.extend(std::iter::repeat_n(image, p.image_seq_len));
            }
            ids.extend(self.encode("\n", false)?);
        }
        if rows > 0 {
            // The last row's newline and the one before the global tile are one token.
            let n = self.encode("\n", false)?.len();
            ids.truncate(ids.len() - n);
            ids.extend(self.encode("\n\n", false)?);
        }
        ids.push(fake);
        ids.push(id("<global-img>")?);
        ids.extend(std::iter::repeat_n(image, p.image_seq_len));
        ids.push(fake);
        Ok(ids)
    }

    /// A chat whose messages hold images: rendered and tokenized as [`Self::encode_chat_with_tools`] (the
    /// template writes one image token per image part), then each of the template's image tokens expanded,
    /// in order, into `grids[i]`'s ids ([`Self::image_prompt_ids`]). Returns the ids and each image's span
    /// (first to one past its last id).
    pub fn encode_chat_with_images<M: serde::Serialize>(
        &self,
        messages: &M,
        tools: Option<&serde_json::Value>,
        content: ChatContent,
        grids: &[(usize, usize)],
    ) -> Result<(Vec<u32>, Vec<std::ops::Range<usize>>)> {
        let rendered = self.encode_chat_with_tools(messages, tools, content)?;
        let Some((v, _)) = &self.vision else {
            return Err(Error::Template(format!("{} takes no images", self.path.display())));
        };
        let image = v.image_token_id();
        let found = rendered.iter().filter(|&&t| t == image).count();
        if found != grids.len() {
            return Err(Error::Template(format!(
                "the chat template wrote {found} image tokens for {} images",
                grids.len()
            )));
        }
        let mut ids = Vec::with_capacity(rendered.len() + grids.len() * 5 * 66);
        let mut spans = Vec::with_capacity(grids.len());
        let mut next = grids.iter();
        for t in rendered {
            match (t == image).then(|| next.next()).flatten() {
                Some(&(rows, cols)) => {
                    let start = ids.len();
                    ids.extend(self.image_prompt_ids(rows, cols)?);
                    spans.push(start..ids.len());
                }
                None => ids.push(t),
            }
        }
        Ok((ids, spans))
    }

    /// Tokenizes raw text, adding BOS when the model asks for it and `add_special_tokens` is set.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self.tokenizer.encode(text, add_special_tokens).map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }
}

/// The GGUF's `tokenizer.chat_template`, else `chat_template` from a `tokenizer_config.json` beside the
/// model, else a `chat_template.jinja` beside it.
fn chat_template_source(path: &Path, g: &GgufFile) -> Result<Option<String>> {
    if let Some(t) = g.get_str_opt("tokenizer.chat_template")? {
        return Ok(Some(t.to_string()));
    }
    match path.parent() {
        Some(dir) => dir_chat_template(dir),
        None => Ok(None),
    }
}

/// `chat_template` from `dir/tokenizer_config.json` (a string, or the entry named `default` of a list),
/// else `dir/chat_template.jinja`.
pub(crate) fn dir_chat_template(dir: &Path) -> Result<Option<String>> {
    let cfg = dir.join("tokenizer_config.json");
    if cfg.is_file() {
        let text = std::fs::read_to_string(&cfg).map_err(|source| Error::Io { path: cfg.clone(), source })?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| Error::Template(format!("{}: {e}", cfg.display())))?;
        match v.get("chat_template") {
            Some(serde_json::Value::String(t)) => return Ok(Some(t.clone())),
            Some(serde_json::Value::Array(named)) => {
                let default = named.iter().find(|t| t["name"] == "default").and_then(|t| t["template"].as_str());
                if let Some(t) = default {
                    return Ok(Some(t.to_string()));
                }
            }
            _ => {}
        }
    }
    let jinja = dir.join("chat_template.jinja");
    if jinja.is_file() {
        return std::fs::read_to_string(&jinja).map(Some).map_err(|source| Error::Io { path: jinja, source });
    }
    Ok(None)
}
