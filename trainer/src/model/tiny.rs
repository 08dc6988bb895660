//! A tiny random Llama with the byte-level tokenizer (`tokenizer::byte_level`): a model
//! directory the whole pipeline runs on in seconds on a CPU, for smoke runs, tests and demos
//! where no pretrained model can be downloaded.

use std::path::Path;

use anyhow::{Context, Result};
use serde_json::json;
use tch::{Device, Kind, Tensor};

use super::hf_config::ModelConfig;
use super::llama::parameter_shapes;
use crate::tokenizer::byte_level::{write_byte_level_tokenizer, EOS_ID};

/// Shape of the tiny model.
#[derive(Debug, Clone)]
pub struct TinyModelSpec {
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub layers: i64,
    pub heads: i64,
    pub kv_heads: i64,
}

impl Default for TinyModelSpec {
    fn default() -> Self {
        TinyModelSpec {
            hidden_size: 32,
            intermediate_size: 48,
            layers: 2,
            heads: 4,
            kv_heads: 2,
        }
    }
}

/// Writes config.json, model.safetensors (weights ~ N(0, 0.2^2), norms 1, drawn from `seed`)
/// and the tokenizer files into `dir`.
pub fn write_tiny_model(dir: &Path, spec: &TinyModelSpec, seed: i64) -> Result<()> {
    write_byte_level_tokenizer(dir)?;
    let config = json!({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"],
        "vocab_size": 260, "hidden_size": spec.hidden_size, "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.layers, "num_attention_heads": spec.heads,
        "num_key_value_heads": spec.kv_heads, "rms_norm_eps": 1e-5,
        "max_position_embeddings": 4096, "rope_theta": 10000.0,
        "tie_word_embeddings": true, "hidden_act": "silu",
        "bos_token_id": null, "eos_token_id": EOS_ID,
    });
    let text = serde_json::to_string_pretty(&config)?;
    std::fs::write(dir.join("config.json"), &text)
        .with_context(|| format!("cannot write {}", dir.join("config.json").display()))?;
    let model_config = ModelConfig::from_json(&text)?;
    // The draws come from libtorch's global generator: two threads seeding and drawing at the
    // same time would interleave and write different weights for the same seed (seen in
    // parallel tests as a model fingerprint that changed), so one model is drawn at a time.
    static DRAWING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _drawing = DRAWING
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    tch::manual_seed(seed);
    let tensors: Vec<(String, Tensor)> = parameter_shapes(&model_config)
        .into_iter()
        .map(|(name, shape)| {
            let values = if name.ends_with("norm.weight") {
                Tensor::ones(shape.as_slice(), (Kind::Float, Device::Cpu))
            } else {
                Tensor::randn(shape.as_slice(), (Kind::Float, Device::Cpu)) * 0.2
            };
            (name, values)
        })
        .collect();
    Tensor::write_safetensors(&tensors, dir.join("model.safetensors"))
        .with_context(|| format!("cannot write {}", dir.join("model.safetensors").display()))?;
    Ok(())
}
