//! Hugging Face `config.json` -> a resolved, validated [`ModelConfig`].
//!
//! Follows candle's `llama.rs` split: a serde mirror of the file as Hugging Face writes it
//! ([`HfConfig`], every field optional where HF has a default) and a resolved config the model
//! code reads without further checks. Both layouts real users have are understood: the
//! transformers 4.x keys `rope_theta` + `rope_scaling`, and 5.x's `rope_parameters`.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use serde_json::Value;

/// The decoder families the model code implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    Llama,
    Mistral,
}

/// How rotary frequencies are derived from `rope_theta`.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE.
    None,
    /// Llama 3.1's frequency-dependent scaling (`rope_type = "llama3"`).
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
    /// Position interpolation (`rope_type = "linear"`): positions divided by `factor`.
    Linear { factor: f64 },
}

/// The resolved configuration the model is built from.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_layers: i64,
    pub num_heads: i64,
    pub num_kv_heads: i64,
    pub head_dim: i64,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub max_position_embeddings: i64,
    pub tie_word_embeddings: bool,
    /// Mistral: a token attends to at most this many positions (itself included).
    pub sliding_window: Option<i64>,
    pub attention_bias: bool,
    pub mlp_bias: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

/// `config.json` as Hugging Face writes it, for the fields we read.
#[derive(Debug, Deserialize)]
struct HfConfig {
    model_type: Option<String>,
    #[serde(default)]
    architectures: Vec<String>,
    vocab_size: Option<i64>,
    hidden_size: Option<i64>,
    intermediate_size: Option<i64>,
    num_hidden_layers: Option<i64>,
    num_attention_heads: Option<i64>,
    num_key_value_heads: Option<i64>,
    head_dim: Option<i64>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_scaling: Option<Value>,
    rope_parameters: Option<Value>,
    max_position_embeddings: Option<i64>,
    tie_word_embeddings: Option<bool>,
    sliding_window: Option<i64>,
    use_sliding_window: Option<bool>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    hidden_act: Option<String>,
    bos_token_id: Option<Value>,
    eos_token_id: Option<Value>,
}

impl ModelConfig {
    /// Reads `dir/config.json`.
    pub fn from_model_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        if !path.is_file() {
            bail!(
                "{} not found: a model directory needs a Hugging Face config.json",
                path.display()
            );
        }
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        Self::from_json(&text).with_context(|| format!("in {}", path.display()))
    }

    /// Parses and validates the text of a `config.json`.
    pub fn from_json(text: &str) -> Result<Self> {
        let hf: HfConfig = serde_json::from_str(text).context("config.json is not valid JSON")?;
        resolve(hf)
    }

    /// Grouped-query attention: query heads sharing one key/value head.
    pub fn queries_per_kv_head(&self) -> i64 {
        self.num_heads / self.num_kv_heads
    }
}

fn required(value: Option<i64>, key: &str) -> Result<i64> {
    match value {
        Some(v) if v > 0 => Ok(v),
        Some(v) => bail!("`{key}` must be positive, got {v}"),
        None => bail!("missing key `{key}`"),
    }
}

fn resolve(hf: HfConfig) -> Result<ModelConfig> {
    let architecture = match hf.model_type.as_deref() {
        Some("llama") => Architecture::Llama,
        Some("mistral") => Architecture::Mistral,
        Some(other) => bail!(
            "model_type `{other}` is not supported (architectures {:?}); supported: llama, mistral",
            hf.architectures
        ),
        None => bail!("missing key `model_type`"),
    };
    if let Some(act) = hf.hidden_act.as_deref() {
        if act != "silu" {
            bail!("hidden_act `{act}` is not supported; Llama and Mistral use `silu`");
        }
    }
    let hidden_size = required(hf.hidden_size, "hidden_size")?;
    let num_heads = required(hf.num_attention_heads, "num_attention_heads")?;
    let num_kv_heads = required(
        hf.num_key_value_heads.or(Some(num_heads)),
        "num_key_value_heads",
    )?;
    if num_heads % num_kv_heads != 0 {
        bail!("num_attention_heads {num_heads} is not a multiple of num_key_value_heads {num_kv_heads}");
    }
    let head_dim = match hf.head_dim {
        Some(d) => required(Some(d), "head_dim")?,
        None if hidden_size % num_heads == 0 => hidden_size / num_heads,
        None => bail!("hidden_size {hidden_size} is not divisible by num_attention_heads {num_heads} and no head_dim is given"),
    };
    if head_dim % 2 != 0 {
        bail!("head_dim {head_dim} must be even for rotary embeddings");
    }
    let (rope_theta, rope_scaling) = resolve_rope(&hf)?;
    let sliding_window = match (architecture, hf.sliding_window, hf.use_sliding_window) {
        (_, _, Some(false)) | (_, None, _) => None,
        (Architecture::Llama, Some(_), _) => {
            bail!("`sliding_window` is set but model_type is llama")
        }
        (Architecture::Mistral, Some(w), _) => Some(required(Some(w), "sliding_window")?),
    };
    Ok(ModelConfig {
        architecture,
        vocab_size: required(hf.vocab_size, "vocab_size")?,
        hidden_size,
        intermediate_size: required(hf.intermediate_size, "intermediate_size")?,
        num_layers: required(hf.num_hidden_layers, "num_hidden_layers")?,
        num_heads,
        num_kv_heads,
        head_dim,
        rms_norm_eps: hf.rms_norm_eps.unwrap_or(1e-6),
        rope_theta,
        rope_scaling,
        max_position_embeddings: hf.max_position_embeddings.unwrap_or(2048),
        tie_word_embeddings: hf.tie_word_embeddings.unwrap_or(false),
        sliding_window,
        attention_bias: hf.attention_bias.unwrap_or(false),
        mlp_bias: hf.mlp_bias.unwrap_or(false),
        bos_token_id: token_ids(hf.bos_token_id.as_ref(), "bos_token_id")?
            .first()
            .copied(),
        eos_token_ids: token_ids(hf.eos_token_id.as_ref(), "eos_token_id")?,
    })
}

/// `rope_parameters` (transformers 5) wins over `rope_theta` + `rope_scaling` (4.x).
fn resolve_rope(hf: &HfConfig) -> Result<(f64, RopeScaling)> {
    let params = hf.rope_parameters.as_ref().or(hf.rope_scaling.as_ref());
    let key = if hf.rope_parameters.is_some() {
        "rope_parameters"
    } else {
        "rope_scaling"
    };
    let number = |name: &str| -> Result<Option<f64>> {
        match params.and_then(|p| p.get(name)) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .with_context(|| format!("`{key}.{name}` must be a number, got {v}")),
        }
    };
    let theta = number("rope_theta")?.or(hf.rope_theta).unwrap_or(10000.0);
    if theta <= 0.0 {
        bail!("rope_theta must be positive, got {theta}");
    }
    let rope_type = params
        .and_then(|p| p.get("rope_type").or_else(|| p.get("type")))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let need = |name: &str| -> Result<f64> {
        number(name)?
            .with_context(|| format!("`{key}.{name}` is required for rope_type `{rope_type}`"))
    };
    let scaling = match rope_type {
        "default" => RopeScaling::None,
        "linear" => RopeScaling::Linear {
            factor: need("factor")?,
        },
        "llama3" => {
            let scaling = RopeScaling::Llama3 {
                factor: need("factor")?,
                low_freq_factor: need("low_freq_factor")?,
                high_freq_factor: need("high_freq_factor")?,
                original_max_position_embeddings: need("original_max_position_embeddings")?,
            };
            if let RopeScaling::Llama3 {
                low_freq_factor,
                high_freq_factor,
                ..
            } = scaling
            {
                if high_freq_factor <= low_freq_factor {
                    bail!("`{key}`: high_freq_factor {high_freq_factor} must exceed low_freq_factor {low_freq_factor}");
                }
            }
            scaling
        }
        other => bail!(
            "`{key}.rope_type` `{other}` is not supported (supported: default, linear, llama3)"
        ),
    };
    Ok((theta, scaling))
}

/// A token id field: absent, null, an integer, or a list of integers.
fn token_ids(value: Option<&Value>, key: &str) -> Result<Vec<u32>> {
    let as_id = |v: &Value| -> Result<u32> {
        v.as_u64()
            .and_then(|id| u32::try_from(id).ok())
            .with_context(|| format!("`{key}` must hold token ids, got {v}"))
    };
    match value {
        None | Some(Value::Null) => Ok(vec![]),
        Some(Value::Array(items)) => items.iter().map(as_id).collect(),
        Some(v) => Ok(vec![as_id(v)?]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LLAMA3_V4: &str = r#"{
        "model_type": "llama", "vocab_size": 128, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 64,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
        "tie_word_embeddings": true, "bos_token_id": 1, "eos_token_id": [2, 3]
    }"#;

    #[test]
    fn llama3_legacy_layout_resolves() {
        let c = ModelConfig::from_json(LLAMA3_V4).unwrap();
        assert_eq!(c.architecture, Architecture::Llama);
        assert_eq!(c.head_dim, 8);
        assert_eq!(c.queries_per_kv_head(), 4);
        assert_eq!(c.rope_theta, 500000.0);
        assert!(matches!(c.rope_scaling, RopeScaling::Llama3 { factor, .. } if factor == 8.0));
        assert!(c.tie_word_embeddings);
        assert_eq!(c.eos_token_ids, vec![2, 3]);
        assert_eq!(c.bos_token_id, Some(1));
    }

    #[test]
    fn rope_parameters_layout_resolves() {
        let text = LLAMA3_V4
            .replace("\"rope_scaling\"", "\"rope_parameters\"")
            .replace(
                "\"rope_type\": \"llama3\"",
                "\"rope_type\": \"llama3\", \"rope_theta\": 1000.0",
            );
        let c = ModelConfig::from_json(&text).unwrap();
        assert_eq!(c.rope_theta, 1000.0, "rope_parameters.rope_theta wins");
    }

    #[test]
    fn errors_name_the_key() {
        let err = |text: String| format!("{:#}", ModelConfig::from_json(&text).unwrap_err());
        assert!(err(LLAMA3_V4.replace("\"hidden_size\": 64,", "")).contains("`hidden_size`"));
        assert!(
            err(LLAMA3_V4.replace("\"num_key_value_heads\": 2", "\"num_key_value_heads\": 3"))
                .contains("not a multiple")
        );
        assert!(err(LLAMA3_V4.replace("\"low_freq_factor\": 1.0,", "")).contains("low_freq_factor"));
        assert!(err(LLAMA3_V4.replace("llama3", "yarn")).contains("`yarn` is not supported"));
        assert!(err(LLAMA3_V4.replace("\"llama\"", "\"gpt2\"")).contains("`gpt2` is not supported"));
    }

    #[test]
    fn mistral_sliding_window() {
        let text = LLAMA3_V4.replace("\"llama\"", "\"mistral\"").replace(
            "\"tie_word_embeddings\": true",
            "\"tie_word_embeddings\": false, \"sliding_window\": 4",
        );
        let c = ModelConfig::from_json(&text).unwrap();
        assert_eq!(c.sliding_window, Some(4));
        let disabled = text.replace(
            "\"sliding_window\": 4",
            "\"sliding_window\": 4, \"use_sliding_window\": false",
        );
        assert_eq!(
            ModelConfig::from_json(&disabled).unwrap().sliding_window,
            None
        );
    }
}
