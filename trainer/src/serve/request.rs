//! The OpenAI request bodies of `/v1/chat/completions` and `/v1/completions`, read and
//! checked into a [`Generation`]: token ids, sampling options, stop strings and one preference
//! weight vector. Fields OpenAI defines that this server does not use are ignored, as OpenAI
//! ignores unknown fields; every error names its field (`param`).

use serde::Deserialize;

use super::error::ApiError;
use super::ServedModel;
use crate::export::validate_weights;
use crate::model::generate::GenerateOptions;
use crate::tokenizer::ChatMessage;

/// A string or a list of strings (`stop`, `prompt`).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

/// A message's content: a string or a list of parts, of which the text parts are used.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Clone, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub text: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Message {
    pub role: String,
    #[serde(default)]
    pub content: Option<Content>,
}

#[derive(Debug, Clone, Deserialize, Default)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// The body of both endpoints: `messages` for chat, `prompt` for completions. One struct, not
/// a shared part flattened into two, so a type error's path names the field.
#[derive(Debug, Clone, Deserialize)]
pub struct RequestBody {
    pub model: String,
    #[serde(default)]
    pub messages: Option<Vec<Message>>,
    #[serde(default)]
    pub prompt: Option<OneOrMany>,
    #[serde(default)]
    pub max_tokens: Option<usize>,
    /// The newer name of `max_tokens` (chat).
    #[serde(default)]
    pub max_completion_tokens: Option<usize>,
    #[serde(default)]
    pub temperature: Option<f64>,
    #[serde(default)]
    pub top_p: Option<f64>,
    #[serde(default)]
    pub seed: Option<u64>,
    #[serde(default)]
    pub stop: Option<OneOrMany>,
    #[serde(default)]
    pub n: Option<usize>,
    #[serde(default)]
    pub stream: bool,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    /// modpo's extension: one weight per preference dimension, on the simplex.
    #[serde(default)]
    pub preference_weights: Option<Vec<f64>>,
}

/// A checked request: what the engine runs, `n` times.
#[derive(Debug, Clone)]
pub struct Generation {
    pub prompt: Vec<u32>,
    pub weights: Vec<f64>,
    pub options: GenerateOptions,
    pub n: usize,
    pub stops: Vec<String>,
    pub stream: bool,
    pub include_usage: bool,
}

/// OpenAI's limits on `temperature` and `stop`.
const MAX_TEMPERATURE: f64 = 2.0;
const MAX_STOPS: usize = 4;

/// Reads a JSON body as `T`, naming the field of a type error (`messages[0].content`).
pub fn parse_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let param = (path != ".").then_some(path);
        let message = match &param {
            Some(p) => format!("invalid request body at `{p}`: {}", e.inner()),
            None => format!("invalid request body: {}", e.inner()),
        };
        ApiError::invalid(param.as_deref(), message)
    })
}

/// The request must name the served model, as OpenAI's API does.
pub fn check_model(served: &ServedModel, body: &RequestBody) -> Result<(), ApiError> {
    if body.model != served.name {
        return Err(ApiError::model_not_found(&body.model));
    }
    Ok(())
}

/// The messages rendered with the model's chat template, the assistant turn opened.
pub fn chat_prompt(served: &ServedModel, body: &RequestBody) -> Result<Vec<u32>, ApiError> {
    let messages = body.messages.as_deref().unwrap_or_default();
    if messages.is_empty() {
        return Err(ApiError::invalid(
            Some("messages"),
            "`messages` is empty: give at least one message".into(),
        ));
    }
    let mut turns = Vec::with_capacity(messages.len());
    for (i, m) in messages.iter().enumerate() {
        let content = match &m.content {
            None => String::new(),
            Some(Content::Text(text)) => text.clone(),
            Some(Content::Parts(parts)) => parts
                .iter()
                .filter(|p| p.kind == "text")
                .filter_map(|p| p.text.clone())
                .collect::<Vec<_>>()
                .join(""),
        };
        if !matches!(
            m.role.as_str(),
            "system" | "developer" | "user" | "assistant"
        ) {
            return Err(ApiError::invalid(
                Some(&format!("messages[{i}].role")),
                format!(
                    "messages[{i}].role is {:?}: expected system, developer, user or assistant",
                    m.role
                ),
            ));
        }
        turns.push(ChatMessage::new(m.role.clone(), content));
    }
    served
        .tokenizer
        .encode_chat(&turns, true)
        .map_err(|e| ApiError::invalid(Some("messages"), format!("{e:#}")))
}

/// The raw-text prompt of `/v1/completions` (no template, no special tokens added).
pub fn completion_prompt(served: &ServedModel, body: &RequestBody) -> Result<Vec<u32>, ApiError> {
    let Some(prompt) = body.prompt.clone() else {
        return Err(ApiError::invalid(
            Some("prompt"),
            "`prompt` is missing".into(),
        ));
    };
    let prompts = prompt.into_vec();
    let [text] = prompts.as_slice() else {
        return Err(ApiError::invalid(
            Some("prompt"),
            format!(
                "`prompt` holds {} strings: this server takes one prompt per request",
                prompts.len()
            ),
        ));
    };
    served
        .tokenizer
        .encode_text(text)
        .map_err(|e| ApiError::invalid(Some("prompt"), format!("{e:#}")))
}

/// Checks the shared fields against the model and `prompt` (already tokenized, from the field
/// `prompt_field`) and assembles the generation.
pub fn check(
    served: &ServedModel,
    body: RequestBody,
    prompt: Vec<u32>,
    prompt_field: &str,
) -> Result<Generation, ApiError> {
    let context = served.context_length;
    if prompt.is_empty() {
        return Err(ApiError::invalid(
            Some(prompt_field),
            format!("`{prompt_field}` has no tokens: the model needs at least one"),
        ));
    }
    if prompt.len() >= context {
        return Err(ApiError::invalid(
            Some(prompt_field),
            format!(
                "`{prompt_field}` is {} tokens, but the model's context is {context} tokens \
                 (prompt and answer together)",
                prompt.len()
            ),
        ));
    }
    let room = context - prompt.len();
    let (max_field, max_tokens) = match (body.max_completion_tokens, body.max_tokens) {
        (Some(m), _) => ("max_completion_tokens", Some(m)),
        (None, m) => ("max_tokens", m),
    };
    let max_new_tokens = match max_tokens {
        None => served.default_max_tokens.min(room),
        Some(0) => {
            return Err(ApiError::invalid(
                Some(max_field),
                format!("`{max_field}` is 0: ask for at least one token"),
            ))
        }
        Some(m) if m > room => {
            return Err(ApiError::invalid(
                Some(max_field),
                format!(
                    "`{max_field}` is {m}, but the prompt's {} tokens leave {room} of the \
                     model's context of {context}",
                    prompt.len()
                ),
            ))
        }
        Some(m) => m,
    };
    let (temperature, top_p) = check_sampling(&body)?;
    let weights = check_weights(served, body.preference_weights)?;
    let n = body.n.unwrap_or(1);
    if n == 0 || n > served.max_batch {
        return Err(ApiError::invalid(
            Some("n"),
            format!(
                "`n` is {n}: it must be between 1 and {} (--max-batch)",
                served.max_batch
            ),
        ));
    }
    let stops = body.stop.map(OneOrMany::into_vec).unwrap_or_default();
    if stops.len() > MAX_STOPS {
        return Err(ApiError::invalid(
            Some("stop"),
            format!("`stop` has {} strings: at most {MAX_STOPS}", stops.len()),
        ));
    }
    Ok(Generation {
        prompt,
        weights,
        options: GenerateOptions {
            max_new_tokens,
            temperature,
            top_p,
            seed: body.seed.unwrap_or_else(fresh_seed),
            eos_token_id: Some(served.tokenizer.eos_token_id()),
        },
        n,
        stops,
        stream: body.stream,
        include_usage: body.stream_options.is_some_and(|o| o.include_usage),
    })
}

/// The request's weights, or the server's default; on the simplex over the model's dimensions
/// (the one check of every weight vector, `export::validate_weights`).
fn check_weights(served: &ServedModel, given: Option<Vec<f64>>) -> Result<Vec<f64>, ApiError> {
    const FIELD: &str = "preference_weights";
    let Some(weights) = given else {
        return Ok(served.default_weights.clone());
    };
    if served.dimensions.is_empty() {
        return Err(ApiError::invalid(
            Some(FIELD),
            format!(
                "`{FIELD}` given, but {} is served without preference adapters (--model)",
                served.name
            ),
        ));
    }
    validate_weights(&weights, &served.dimensions, FIELD)
        .map_err(|e| ApiError::invalid(Some(FIELD), format!("{e:#}")))?;
    Ok(weights)
}

/// `temperature` in [0, 2] (default 1, as OpenAI) and `top_p` in (0, 1].
fn check_sampling(body: &RequestBody) -> Result<(f64, f64), ApiError> {
    let temperature = body.temperature.unwrap_or(1.0);
    if !(0.0..=MAX_TEMPERATURE).contains(&temperature) {
        return Err(ApiError::invalid(
            Some("temperature"),
            format!("`temperature` is {temperature}: it must be between 0 and {MAX_TEMPERATURE}"),
        ));
    }
    let top_p = body.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::invalid(
            Some("top_p"),
            format!("`top_p` is {top_p}: it must be in (0, 1]"),
        ));
    }
    Ok((temperature, top_p))
}

/// A seed for a request that gives none: the clock's nanoseconds.
fn fresh_seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}
