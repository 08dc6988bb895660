//! The model's tokenizer and chat template, giving the token ids Hugging Face would.
//!
//! `tokenizer.json` is loaded with the `tokenizers` crate (the library `transformers` itself
//! wraps). The chat template is the model's own jinja template, rendered by `minijinja` in an
//! environment that copies `transformers`' (see [`hf_jinja`]), then tokenized without adding
//! special tokens: [`ChatTokenizer::encode_chat`] is
//! `tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=...)`.
//!
//! A model directory comes in two layouts, and both occur in the wild: transformers 5 writes the
//! template to `chat_template.jinja`; older versions keep it (a string, or a list of named
//! templates) inside `tokenizer_config.json`. Special tokens live in `tokenizer_config.json`
//! (strings or serialised `AddedToken` objects), with the eos id sometimes only in
//! `generation_config.json` / `config.json`.

pub mod byte_level;
mod hf_jinja;

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use minijinja::{Environment, Value};
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;
use sha2::{Digest, Sha256};
use tokenizers::Tokenizer;

/// One turn of a conversation, as chat templates read it (`message['role']`, `message['content']`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// The named special tokens `transformers` hands to every template (`special_tokens_map`).
const SPECIAL_TOKEN_NAMES: [&str; 7] = [
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
];

/// A compiled chat template and where it came from (for error messages).
#[derive(Clone)]
struct ChatTemplate {
    source: String,
    origin: String,
    env: Environment<'static>,
}

/// A tokenizer plus the chat template and special tokens of one model directory.
#[derive(Clone)]
pub struct ChatTokenizer {
    tokenizer: Tokenizer,
    /// `Err(message)` when the directory has no template: loading still succeeds (raw-text data
    /// needs none), rendering fails with the message.
    template: std::result::Result<ChatTemplate, String>,
    /// (name, content) of each named special token present, in `SPECIAL_TOKEN_NAMES` order (an eos
    /// found only through the model configs comes last).
    special_tokens: Vec<(String, String)>,
    eos_token: String,
    eos_token_id: u32,
    pad_token_id: u32,
    fingerprint: String,
}

impl std::fmt::Debug for ChatTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("special_tokens", &self.special_tokens)
            .field("eos_token_id", &self.eos_token_id)
            .field("pad_token_id", &self.pad_token_id)
            .field(
                "template",
                &self.template.as_ref().map(|t| t.origin.as_str()),
            )
            .field("fingerprint", &self.fingerprint)
            .finish()
    }
}

impl ChatTokenizer {
    /// Loads `dir/tokenizer.json`, the chat template (override string if given, else
    /// `dir/chat_template.jinja` (transformers 5.x layout), else `chat_template` in
    /// `dir/tokenizer_config.json`, which may be a string or a list of {name, template} where
    /// "default" is used), special tokens (bos_token / eos_token / pad_token ... in
    /// tokenizer_config.json, each either a string or an AddedToken object {"content": ...}),
    /// with `eos_token_id` falling back to `dir/generation_config.json` / `dir/config.json`
    /// `eos_token_id` (int or list: first) when tokenizer_config has none.
    pub fn from_model_dir(dir: &Path, template_override: Option<&str>) -> Result<Self> {
        let tokenizer_path = dir.join("tokenizer.json");
        let tokenizer_bytes = std::fs::read(&tokenizer_path)
            .with_context(|| format!("reading {}", tokenizer_path.display()))?;
        let tokenizer = parse_tokenizer(&tokenizer_bytes, &tokenizer_path)?;
        let config_path = dir.join("tokenizer_config.json");
        let config = read_json_if_exists(&config_path)?.unwrap_or(Json::Null);
        let mut special_tokens = special_tokens(dir, &config)?;
        let token_id = |token: &str, name: &str| {
            tokenizer.token_to_id(token).ok_or_else(|| {
                anyhow!(
                    "{name} {token:?} from {} is not in the vocabulary of {}",
                    config_path.display(),
                    tokenizer_path.display()
                )
            })
        };
        let (eos_token, eos_token_id) = match find_token(&special_tokens, "eos_token") {
            Some(token) => (token.to_owned(), token_id(token, "eos_token")?),
            None => {
                let (token, id) = eos_from_model_configs(dir, &tokenizer, &tokenizer_path)?;
                special_tokens.push(("eos_token".to_owned(), token.clone()));
                (token, id)
            }
        };
        let pad_token_id = match find_token(&special_tokens, "pad_token") {
            Some(token) => token_id(token, "pad_token")?,
            None => eos_token_id,
        };
        let template = compile_template(dir, &config, template_override)?;
        let fingerprint = fingerprint(&tokenizer_bytes, template.as_ref().ok(), &special_tokens);
        Ok(Self {
            tokenizer,
            template,
            special_tokens,
            eos_token,
            eos_token_id,
            pad_token_id,
            fingerprint,
        })
    }

    /// The conversation as the chat template writes it, the string `apply_chat_template(...,
    /// tokenize=False)` returns.
    pub fn render_chat(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let template = self
            .template
            .as_ref()
            .map_err(|message| anyhow!("{message}"))?;
        if messages.is_empty() {
            bail!("cannot apply the chat template to an empty conversation");
        }
        // What transformers passes: the messages, tools / documents (None), the flag, and every
        // named special token by its name.
        let mut ctx: Vec<(&str, Value)> = vec![
            ("messages", Value::from_serialize(messages)),
            ("tools", Value::from(())),
            ("documents", Value::from(())),
            ("add_generation_prompt", Value::from(add_generation_prompt)),
        ];
        for (name, token) in &self.special_tokens {
            ctx.push((name.as_str(), Value::from(token.as_str())));
        }
        let ctx: Value = ctx.into_iter().collect();
        template
            .env
            .get_template(hf_jinja::TEMPLATE_NAME)
            .and_then(|t| t.render(ctx))
            .map_err(|e| match (e.kind(), e.detail()) {
                // raise_exception(msg): the template rejected the conversation; say so plainly.
                (minijinja::ErrorKind::InvalidOperation, Some(detail)) => anyhow!(
                    "the chat template from {} rejected the conversation: {detail}",
                    template.origin
                ),
                _ => anyhow!(
                    "rendering the chat template from {}: {e:#}",
                    template.origin
                ),
            })
    }

    /// Token ids exactly as `tokenizer.apply_chat_template(messages, tokenize=True,
    /// add_generation_prompt=...)`.
    pub fn encode_chat(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<Vec<u32>> {
        let rendered = self.render_chat(messages, add_generation_prompt)?;
        // The template writes BOS itself, so apply_chat_template tokenizes with
        // add_special_tokens=False.
        self.encode_text(&rendered)
    }

    /// A single-turn prompt: [{"role":"user","content":prompt}] with add_generation_prompt = true.
    pub fn encode_prompt(&self, prompt: &str) -> Result<Vec<u32>> {
        self.encode_chat(&[ChatMessage::new("user", prompt)], true)
    }

    /// Raw text tokens, no special tokens added (the caller appends EOS). Special-token strings
    /// inside `text` still become their ids, as in `encode(text, add_special_tokens=False)`.
    pub fn encode_text(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| anyhow!("tokenizing {} characters: {e}", text.len()))?;
        Ok(encoding.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.tokenizer
            .decode(ids, skip_special_tokens)
            .map_err(|e| anyhow!("decoding {} token ids: {e}", ids.len()))
    }

    pub fn eos_token_id(&self) -> u32 {
        self.eos_token_id
    }

    /// pad_token's id if defined, else eos.
    pub fn pad_token_id(&self) -> u32 {
        self.pad_token_id
    }

    pub fn bos_token(&self) -> Option<&str> {
        find_token(&self.special_tokens, "bos_token")
    }

    pub fn eos_token(&self) -> &str {
        &self.eos_token
    }

    /// Vocabulary size including added tokens (`len(tokenizer)` in Python).
    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    pub fn chat_template(&self) -> Option<&str> {
        self.template.as_ref().ok().map(|t| t.source.as_str())
    }

    /// A short hex digest (sha256) of tokenizer.json bytes + the template + special tokens: two
    /// tokenizers with the same fingerprint produce the same ids, so it keys tokenized caches.
    pub fn fingerprint(&self) -> String {
        self.fingerprint.clone()
    }
}

/// `tokenizer.json` (read from `path`) with the truncation and padding it may carry switched
/// off: transformers switches them off unless the call asks for them, and
/// apply_chat_template asks for neither.
fn parse_tokenizer(bytes: &[u8], path: &Path) -> Result<Tokenizer> {
    let mut tokenizer =
        Tokenizer::from_bytes(bytes).map_err(|e| anyhow!("parsing {}: {e}", path.display()))?;
    tokenizer
        .with_truncation(None)
        .map_err(|e| anyhow!("disabling truncation of {}: {e}", path.display()))?;
    tokenizer.with_padding(None);
    Ok(tokenizer)
}

/// (name, content) of each named special token in `tokenizer_config.json` (its contents:
/// `config`), else in the legacy `special_tokens_map.json`, in `SPECIAL_TOKEN_NAMES` order.
fn special_tokens(dir: &Path, config: &Json) -> Result<Vec<(String, String)>> {
    let config_path = dir.join("tokenizer_config.json");
    let legacy_map = read_json_if_exists(&dir.join("special_tokens_map.json"))?;
    let mut special_tokens = Vec::new();
    for name in SPECIAL_TOKEN_NAMES {
        let from_config = token_content(config.get(name))
            .with_context(|| format!("{name} in {}", config_path.display()))?;
        let token = match from_config {
            Some(token) => Some(token),
            None => token_content(legacy_map.as_ref().and_then(|m| m.get(name)))
                .with_context(|| format!("{name} in {}/special_tokens_map.json", dir.display()))?,
        };
        if let Some(token) = token {
            special_tokens.push((name.to_owned(), token));
        }
    }
    Ok(special_tokens)
}

/// The eos token and id when `tokenizer_config.json` names none: the id from the model
/// configs, its text from the vocabulary of `tokenizer` (read from `tokenizer_path`).
fn eos_from_model_configs(
    dir: &Path,
    tokenizer: &Tokenizer,
    tokenizer_path: &Path,
) -> Result<(String, u32)> {
    let id = eos_id_from_model_configs(dir)?.ok_or_else(|| {
        anyhow!(
            "no eos token: neither eos_token in {} nor eos_token_id in {}/generation_config.json or {}/config.json",
            dir.join("tokenizer_config.json").display(),
            dir.display(),
            dir.display()
        )
    })?;
    let token = tokenizer.id_to_token(id).ok_or_else(|| {
        anyhow!(
            "eos_token_id {id} is outside the vocabulary of {}",
            tokenizer_path.display()
        )
    })?;
    Ok((token, id))
}

/// The compiled chat template, or `Err(message)` when the directory has none (loading still
/// succeeds; rendering fails with the message). A template that does not compile is an error.
fn compile_template(
    dir: &Path,
    config: &Json,
    template_override: Option<&str>,
) -> Result<std::result::Result<ChatTemplate, String>> {
    Ok(match load_template(dir, config, template_override)? {
        Some((source, origin)) => {
            let env = hf_jinja::compile(&source)
                .map_err(|e| anyhow!("compiling the chat template from {origin}: {e:#}"))?;
            Ok(ChatTemplate {
                source,
                origin,
                env,
            })
        }
        None => Err(format!(
            "no chat template: neither {}/chat_template.jinja nor chat_template in {}; \
             set model.chat_template in the config",
            dir.display(),
            dir.join("tokenizer_config.json").display()
        )),
    })
}

/// The content of the special token called `name` (`"bos_token"`, ...), if present.
fn find_token<'a>(special_tokens: &'a [(String, String)], name: &str) -> Option<&'a str> {
    special_tokens
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, token)| token.as_str())
}

/// The template text and a description of where it came from, or `None` when there is none.
fn load_template(
    dir: &Path,
    config: &Json,
    template_override: Option<&str>,
) -> Result<Option<(String, String)>> {
    if let Some(source) = template_override {
        return Ok(Some((
            source.to_owned(),
            "model.chat_template in the config".to_owned(),
        )));
    }
    let jinja_path = dir.join("chat_template.jinja");
    if jinja_path.exists() {
        let source = std::fs::read_to_string(&jinja_path)
            .with_context(|| format!("reading {}", jinja_path.display()))?;
        return Ok(Some((source, jinja_path.display().to_string())));
    }
    let config_path = dir.join("tokenizer_config.json");
    let origin = format!("chat_template in {}", config_path.display());
    match config.get("chat_template") {
        None | Some(Json::Null) => Ok(None),
        Some(Json::String(source)) => Ok(Some((source.clone(), origin))),
        Some(Json::Array(named)) => {
            let mut names = Vec::new();
            for entry in named {
                let name = entry.get("name").and_then(Json::as_str);
                let source = entry.get("template").and_then(Json::as_str);
                match (name, source) {
                    (Some("default"), Some(source)) => {
                        return Ok(Some((source.to_owned(), format!("{origin} (\"default\")"))))
                    }
                    (Some(name), Some(_)) => names.push(name.to_owned()),
                    _ => bail!("{origin}: every entry of the list needs a string \"name\" and \"template\", got {entry}"),
                }
            }
            bail!(
                "{origin} lists templates {names:?} but none is named \"default\"; \
                 set model.chat_template in the config"
            )
        }
        Some(other) => {
            bail!("{origin} must be a string or a list of {{name, template}}, got {other}")
        }
    }
}

/// A special token's text: a plain string, or a serialised `AddedToken` (`{"content": ...}`).
fn token_content(value: Option<&Json>) -> Result<Option<String>> {
    match value {
        None | Some(Json::Null) => Ok(None),
        Some(Json::String(token)) => Ok(Some(token.clone())),
        Some(Json::Object(fields)) => match fields.get("content") {
            Some(Json::String(token)) => Ok(Some(token.clone())),
            _ => bail!(
                "an AddedToken object needs a string \"content\", got {}",
                Json::Object(fields.clone())
            ),
        },
        Some(other) => bail!("expected a string or an AddedToken object, got {other}"),
    }
}

/// `eos_token_id` from `generation_config.json`, else `config.json`: an int, or a list whose
/// first entry is taken.
fn eos_id_from_model_configs(dir: &Path) -> Result<Option<u32>> {
    for file in ["generation_config.json", "config.json"] {
        let path = dir.join(file);
        let Some(json) = read_json_if_exists(&path)? else {
            continue;
        };
        let id = match json.get("eos_token_id") {
            None | Some(Json::Null) => continue,
            Some(Json::Array(ids)) => ids.first(),
            Some(id) => Some(id),
        };
        let Some(id) = id else { continue };
        let id = id
            .as_u64()
            .and_then(|id| u32::try_from(id).ok())
            .ok_or_else(|| anyhow!("eos_token_id in {} is not a token id: {id}", path.display()))?;
        return Ok(Some(id));
    }
    Ok(None)
}

fn read_json_if_exists(path: &Path) -> Result<Option<Json>> {
    if !path.exists() {
        return Ok(None);
    }
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let json =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    Ok(Some(json))
}

/// First 16 hex digits of sha256(tokenizer.json, template, special tokens), fields separated by
/// NUL so that moving text from one field to the next changes the digest.
fn fingerprint(
    tokenizer_json: &[u8],
    template: Option<&ChatTemplate>,
    special: &[(String, String)],
) -> String {
    let mut hasher = Sha256::new();
    hasher.update(tokenizer_json);
    hasher.update([0u8]);
    if let Some(template) = template {
        hasher.update(template.source.as_bytes());
    }
    for (name, token) in special {
        hasher.update([0u8]);
        hasher.update(name.as_bytes());
        hasher.update(b"=");
        hasher.update(token.as_bytes());
    }
    hex::encode(&hasher.finalize()[..8])
}

#[cfg(test)]
mod tests;
