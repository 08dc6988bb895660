//! The decoder against Hugging Face `transformers` (eager attention) on tiny random models:
//! Llama 3 with GQA and llama3 rope scaling (tied / untied + attention bias, single / sharded
//! checkpoint, 4.x / 5.x config layout) and Mistral with a sliding window shorter than the batch.
//! The batch is right-padded with mixed lengths; only real token positions are compared.

use modpo_tests::golden_model;
use modpo_trainer::model::{load_model, next_token_logprobs, Conditioning};
use tch::{Device, Kind, Tensor};

const TOLERANCE: f64 = 1e-4;

fn max_abs_diff_on(mask: &Tensor, a: &Tensor, b: &Tensor) -> f64 {
    let diff = (a - b).abs() * mask;
    diff.max().double_value(&[])
}

fn check(name: &str) {
    let dir = golden_model(name);
    let golden: std::collections::HashMap<String, Tensor> =
        Tensor::read_safetensors(dir.join("golden.safetensors"))
            .unwrap()
            .into_iter()
            .collect();
    let input_ids = &golden["input_ids"]; // [b, t]
    let attention_mask = &golden["attention_mask"]; // [b, t]
    let loaded = load_model(&dir, None, Device::Cpu, Kind::Float).unwrap();
    let logits = tch::no_grad(|| {
        loaded
            .model
            .forward(input_ids, attention_mask, Conditioning::Reference)
    }); // [b, t, vocab]

    let token_mask = attention_mask.to_kind(Kind::Float).unsqueeze(-1); // [b, t, 1]
    let logits_diff = max_abs_diff_on(&token_mask, &logits, &golden["logits"]);
    assert!(
        logits_diff <= TOLERANCE,
        "{name}: logits differ by {logits_diff}"
    );

    let t = input_ids.size()[1];
    let target_mask = attention_mask.narrow(1, 1, t - 1).to_kind(Kind::Float); // [b, t-1]
    let logprobs = next_token_logprobs(&logits, input_ids);
    let logprob_diff = max_abs_diff_on(&target_mask, &logprobs, &golden["token_logprobs"]);
    assert!(
        logprob_diff <= TOLERANCE,
        "{name}: token log-probs differ by {logprob_diff}"
    );
    eprintln!("{name}: max |logits diff| {logits_diff:.2e}, max |logprob diff| {logprob_diff:.2e}");
}

#[test]
fn llama3_tied_embeddings_legacy_config_matches_transformers() {
    check("llama3_tied");
}

#[test]
fn llama3_untied_sharded_with_bias_matches_transformers() {
    check("llama3_untied_sharded");
}

#[test]
fn mistral_sliding_window_matches_transformers() {
    check("mistral_sliding");
}
