//! A supervised warm start of the synthetic tiny model (`synth --sft-steps`, `[demo]
//! sft_steps`): next-token cross-entropy on the responses of the train split, every weight of
//! the model trained, written back over its `model.safetensors`.
//!
//! Why: the paper's runs start from SFT models, which already answer in the data's language.
//! The random tiny model writes random bytes, so what it *generates* scores nothing on any
//! dimension at any `w`, and `eval --generate` would measure nothing. After a few hundred steps
//! on both responses of every train pair (good and bad alike, so the warm start itself prefers
//! neither), it writes responses of the data's kind, and preference training can move them.
//! Implicit-reward evaluation does not need it; it is off by default, so the demo's published
//! accuracy tables are unchanged.

use std::path::Path;

use anyhow::{ensure, Context, Result};
use rand::Rng;
use tch::{Device, Kind, Tensor};

use super::SynthPair;
use crate::data::split::seeded_rng;
use crate::model::{self, next_token_logprobs, Conditioning};
use crate::optim::AdamW;
use crate::tokenizer::ChatTokenizer;

/// How long and how fast the warm start trains.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SftSpec {
    pub steps: usize,
    /// Sequences (prompt + one response) per step.
    pub batch: usize,
    pub learning_rate: f64,
    pub seed: u64,
}

impl SftSpec {
    pub fn new(steps: usize, seed: u64) -> SftSpec {
        SftSpec {
            steps,
            batch: 32,
            learning_rate: 3e-3,
            seed,
        }
    }
}

/// One sequence: the chat-templated prompt, then the response and EOS; `first_target` is
/// where the response starts.
struct Sequence {
    ids: Vec<i64>,
    first_target: usize,
}

fn sequences(tokenizer: &ChatTokenizer, pairs: &[SynthPair]) -> Result<Vec<Sequence>> {
    let mut all = Vec::with_capacity(2 * pairs.len());
    for pair in pairs {
        let prompt = tokenizer.encode_prompt(&pair.prompt)?;
        for response in [&pair.response_a, &pair.response_b] {
            let mut ids: Vec<i64> = prompt.iter().map(|&t| i64::from(t)).collect();
            let first_target = ids.len();
            ids.extend(
                tokenizer
                    .encode_text(response)?
                    .iter()
                    .map(|&t| i64::from(t)),
            );
            ids.push(i64::from(tokenizer.eos_token_id()));
            all.push(Sequence { ids, first_target });
        }
    }
    Ok(all)
}

/// Right-padded ids [b, t], attention mask [b, t] and the mask of predicted response tokens
/// [b, t - 1] (entry j: token j + 1 is a response token).
fn collate(batch: &[&Sequence], pad: i64) -> (Tensor, Tensor, Tensor) {
    let t = batch.iter().map(|s| s.ids.len()).max().unwrap_or(1);
    let (mut ids, mut mask, mut targets) = (Vec::new(), Vec::new(), Vec::new());
    for s in batch {
        for j in 0..t {
            ids.push(s.ids.get(j).copied().unwrap_or(pad));
            mask.push(i64::from(j < s.ids.len()));
            if j + 1 < t {
                let target = j + 1 >= s.first_target && j + 1 < s.ids.len();
                targets.push(f32::from(u8::from(target)));
            }
        }
    }
    let b = batch.len() as i64;
    let t = t as i64;
    (
        Tensor::from_slice(&ids).view([b, t]),
        Tensor::from_slice(&mask).view([b, t]),
        Tensor::from_slice(&targets).view([b, t - 1]),
    )
}

/// Trains the model in `model_dir` on the responses of `pairs` and writes its weights back.
/// Returns the mean loss (nats per response token) of the first and the last step.
pub fn warm_start(model_dir: &Path, pairs: &[SynthPair], spec: &SftSpec) -> Result<(f64, f64)> {
    ensure!(
        spec.batch > 0 && !pairs.is_empty(),
        "sft: no sequence to train on"
    );
    let tokenizer = ChatTokenizer::from_model_dir(model_dir, None)?;
    let sequences = sequences(&tokenizer, pairs)?;
    let loaded = model::load_model(model_dir, None, Device::Cpu, Kind::Float)
        .with_context(|| format!("sft: cannot load {}", model_dir.display()))?;
    let mut variables: Vec<(String, Tensor)> = loaded.base.variables().into_iter().collect();
    variables.sort_by(|a, b| a.0.cmp(&b.0));
    // The model holds shallow copies of these tensors: switching their gradients on here
    // switches them on in the model.
    let params: Vec<Tensor> = variables
        .iter_mut()
        .map(|(_, t)| t.requires_grad_(true).shallow_clone())
        .collect();
    let mut optimizer = AdamW::new(params, 0.9, 0.999, 1e-8, 0.0);
    let pad = i64::from(tokenizer.pad_token_id());
    let mut rng = seeded_rng("synth-sft", spec.seed, 0);
    let mut losses = Vec::with_capacity(spec.steps);
    for _ in 0..spec.steps {
        let batch: Vec<&Sequence> = (0..spec.batch)
            .map(|_| &sequences[rng.random_range(0..sequences.len())])
            .collect();
        let (ids, mask, targets) = collate(&batch, pad);
        let logits = loaded.model.forward(&ids, &mask, Conditioning::Reference); // [b, t, vocab]
        let logps = next_token_logprobs(&logits, &ids); // [b, t - 1]
        let loss = -(logps * &targets).sum(Kind::Float) / targets.sum(Kind::Float);
        optimizer.zero_grad();
        loss.backward();
        optimizer.step(spec.learning_rate);
        losses.push(loss.double_value(&[]));
    }
    let _no_grad = tch::no_grad_guard();
    let tensors: Vec<(String, Tensor)> = variables
        .iter()
        .map(|(name, t)| (name.clone(), t.detach().contiguous()))
        .collect();
    let path = model_dir.join("model.safetensors");
    Tensor::write_safetensors(&tensors, &path)
        .with_context(|| format!("sft: cannot write {}", path.display()))?;
    Ok((
        losses.first().copied().unwrap_or(f64::NAN),
        losses.last().copied().unwrap_or(f64::NAN),
    ))
}
