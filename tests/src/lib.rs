//! Shared helpers of the integration tests: where the golden files are.
//!
//! Golden files are produced by the Python scripts in `tests/golden/` (run by `make golden`,
//! which `make test` runs first) with Hugging Face `transformers` as the reference.

use std::path::PathBuf;

/// `MODPO_GOLDEN_DIR`, or `tests/golden/out`. A test that needs it and finds it missing fails:
/// a golden test must never pass by skipping.
pub fn golden_dir() -> PathBuf {
    let dir = std::env::var_os("MODPO_GOLDEN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("golden/out"));
    assert!(
        dir.is_dir(),
        "golden directory {} is missing: run `make golden` first",
        dir.display()
    );
    dir
}

/// A golden model directory written by `golden/make_model_golden.py`.
pub fn golden_model(name: &str) -> PathBuf {
    let dir = golden_dir().join("models").join(name);
    assert!(
        dir.join("golden.safetensors").is_file(),
        "{} has no golden.safetensors: run `make golden` first",
        dir.display()
    );
    dir
}

/// `../shared/data` of the project: the real dataset samples.
pub fn shared_data_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/data")
}

/// Writes a tiny random Llama model (4 heads / 2 KV heads, 2 layers) whose vocabulary is the
/// byte-level test tokenizer's (`modpo_trainer::data::fixtures`), with that tokenizer, into
/// `dir`: a model directory the whole pipeline can run on. Weights are drawn from `seed`.
pub fn write_tiny_model(dir: &std::path::Path, seed: i64) {
    use modpo_trainer::model::{llama::parameter_shapes, ModelConfig};
    use tch::{Kind, Tensor};
    modpo_trainer::data::fixtures::write_byte_level_tokenizer(dir).unwrap();
    let config = serde_json::json!({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"],
        "vocab_size": 260, "hidden_size": 32, "intermediate_size": 48,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5, "max_position_embeddings": 512, "rope_theta": 10000.0,
        "tie_word_embeddings": true, "hidden_act": "silu",
        "bos_token_id": null, "eos_token_id": modpo_trainer::data::fixtures::EOS_ID,
    });
    let text = serde_json::to_string_pretty(&config).unwrap();
    std::fs::write(dir.join("config.json"), &text).unwrap();
    let model_config = ModelConfig::from_json(&text).unwrap();
    tch::manual_seed(seed);
    let tensors: Vec<(String, Tensor)> = parameter_shapes(&model_config)
        .into_iter()
        .map(|(name, shape)| {
            let values = if name.ends_with("norm.weight") {
                Tensor::ones(shape.as_slice(), (Kind::Float, tch::Device::Cpu))
            } else {
                Tensor::randn(shape.as_slice(), (Kind::Float, tch::Device::Cpu)) * 0.2
            };
            (name, values)
        })
        .collect();
    Tensor::write_safetensors(&tensors, dir.join("model.safetensors")).unwrap();
}
