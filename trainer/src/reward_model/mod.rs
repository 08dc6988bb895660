//! Reward models for scoring generated answers on real data (`modpo-trainer train-rm`, then
//! `eval --generate --reward-model DIR`).
//!
//! One model with k scalar heads: the base causal LM (frozen, or with a LoRA adapter on every
//! projection, the adapters' shared block alone) reads `prompt + response` (the data
//! pipeline's chat-templated pairs, the response ending in EOS); a linear head [hidden -> k] on
//! the final hidden state of the last response token gives one reward per dimension. Each
//! dimension's head is trained with the Bradley-Terry loss on that dimension's preferences,
//! `-log sigma(r_i(y_c) - r_i(y_r))`, pairs where the dimension has no preference masked (as
//! the DPO losses mask them, METHOD.md section 1); the loss is the mean over every
//! (pair, dimension) preference of the global batch.
//!
//! - `config`: the TOML (`[model]`, `[data]`, `[train]` as in a training run, plus
//!   `[reward_model]`);
//! - `resume`: checkpoints and `--resume`, on the training run's machinery;
//! - `train`: the loop, on the training loop's data pipeline (splits, epoch batches, rank
//!   shards, micro-batch collation), AdamW and schedule, gradients averaged over ranks; the
//!   held-out pairwise accuracy per dimension with bootstrap intervals;
//! - [`RewardModel`]: a trained one loaded for scoring.

pub mod config;
mod resume;
pub mod train;

use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use tch::{nn, Device, Kind, Tensor};

use crate::eval::generation::{Answer, Scorer};
use crate::model::{self, AdapterKind, AdapterSpec, CausalLm, Conditioning, LoadedModel};
use crate::tokenizer::ChatTokenizer;

/// The trained weights (head and, with LoRA, the adapters) in a reward model directory.
pub const WEIGHTS_FILE: &str = "reward_model.safetensors";
/// What the weights are: [`RewardModelMeta`].
pub const META_FILE: &str = "reward_model.json";

/// What a reward model directory says about itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RewardModelMeta {
    pub model_path: PathBuf,
    /// Of the base model the head was trained on; loading refuses another.
    pub model_fingerprint: String,
    pub dimensions: Vec<String>,
    /// LoRA rank and alpha of the adapters on the base; `None`: the base was frozen.
    pub lora: Option<(i64, f64)>,
    pub chat_template: Option<String>,
    /// Per dimension, the lowest reward of a response of the held-out split: the reference
    /// point of the hypervolume when this model scores.
    pub reference_point: Vec<f64>,
}

/// The head and the base model's hidden size.
pub struct RewardHead {
    /// [k, hidden]
    pub weight: Tensor,
    /// [k]
    pub bias: Tensor,
}

impl RewardHead {
    /// `head.weight` ~ N(0, 0.02^2) (Hugging Face's initializer range), `head.bias` = 0, f32.
    pub fn new(path: &nn::Path, hidden: i64, k: i64) -> RewardHead {
        let init = nn::Init::Randn {
            mean: 0.0,
            stdev: 0.02,
        };
        RewardHead {
            weight: path.var("weight", &[k, hidden], init),
            bias: path.var("bias", &[k], nn::Init::Const(0.0)),
        }
    }
}

/// The adapter spec of a LoRA reward model: the shared block only (no dimension blocks).
pub fn lora_spec(rank: i64, alpha: f64) -> AdapterSpec {
    AdapterSpec {
        kind: AdapterKind::Lora,
        rank,
        alpha,
        num_dimensions: 0,
        shared: true,
    }
}

/// Rewards of right-padded rows: input_ids, attention_mask [rows, t] -> [rows, k] (f32), read
/// from the final hidden state of each row's last token.
pub fn rewards(
    model: &CausalLm,
    head: &RewardHead,
    lora: bool,
    input_ids: &Tensor,
    attention_mask: &Tensor,
) -> Tensor {
    let cond = if lora {
        Conditioning::SharedOnly
    } else {
        Conditioning::Reference
    };
    let hidden = model.hidden_states(input_ids, attention_mask, cond); // [rows, t, hidden]
    let (rows, t, h) = (hidden.size()[0], hidden.size()[1], hidden.size()[2]);
    let last = attention_mask.sum_dim_intlist(1, false, Kind::Int64) - 1; // [rows]
    let flat_index = Tensor::arange(rows, (Kind::Int64, hidden.device())) * t + last; // [rows]
    let final_states = hidden
        .view([rows * t, h])
        .index_select(0, &flat_index)
        .to_kind(Kind::Float); // [rows, hidden]
    final_states.linear(&head.weight, Some(&head.bias))
}

/// A trained reward model, ready to score.
pub struct RewardModel {
    pub dir: PathBuf,
    pub dimensions: Vec<String>,
    pub reference_point: Vec<f64>,
    lora: bool,
    loaded: LoadedModel,
    head: RewardHead,
    _head_store: nn::VarStore,
    tokenizer: ChatTokenizer,
    device: Device,
}

impl RewardModel {
    /// Loads `dir` (written by `train-rm`) on `device`, refusing a base model that changed.
    pub fn load(dir: &Path, device: Device, kind: Kind) -> Result<RewardModel> {
        let meta_path = dir.join(META_FILE);
        let text = std::fs::read_to_string(&meta_path).with_context(|| {
            format!(
                "{} is not a reward model directory: cannot read {} (written by train-rm)",
                dir.display(),
                meta_path.display()
            )
        })?;
        let meta: RewardModelMeta = serde_json::from_str(&text)
            .with_context(|| format!("{}: not a reward model description", meta_path.display()))?;
        let spec = meta.lora.map(|(rank, alpha)| lora_spec(rank, alpha));
        let loaded = model::load_model(&meta.model_path, spec.as_ref(), device, kind)?;
        if loaded.fingerprint != meta.model_fingerprint {
            bail!(
                "{} was trained on a different model than {} (fingerprints {} vs {})",
                dir.display(),
                meta.model_path.display(),
                meta.model_fingerprint,
                loaded.fingerprint
            );
        }
        let head_store = nn::VarStore::new(device);
        let hidden = loaded.model.config().hidden_size;
        let head = RewardHead::new(
            &head_store.root().sub("head"),
            hidden,
            meta.dimensions.len() as i64,
        );
        load_weights(&dir.join(WEIGHTS_FILE), &head_store, &loaded.adapters)?;
        let tokenizer =
            ChatTokenizer::from_model_dir(&meta.model_path, meta.chat_template.as_deref())?;
        Ok(RewardModel {
            dir: dir.to_path_buf(),
            dimensions: meta.dimensions,
            reference_point: meta.reference_point,
            lora: meta.lora.is_some(),
            loaded,
            head,
            _head_store: head_store,
            tokenizer,
            device,
        })
    }

    /// `rewards[r][i]` of each response (token ids, no EOS) after the chat-templated prompt,
    /// as the data pipeline lays out a pair: prompt, response, EOS.
    pub fn rewards(&self, prompt_ids: &[u32], responses: &[&[u32]]) -> Result<Vec<Vec<f64>>> {
        ensure!(!responses.is_empty(), "no response to score");
        let eos = self.tokenizer.eos_token_id();
        let pad = i64::from(self.tokenizer.pad_token_id());
        let rows: Vec<Vec<i64>> = responses
            .iter()
            .map(|r| {
                prompt_ids
                    .iter()
                    .chain(r.iter())
                    .chain(std::iter::once(&eos))
                    .map(|&t| i64::from(t))
                    .collect()
            })
            .collect();
        let t = rows.iter().map(Vec::len).max().unwrap_or(1);
        let mut ids = Vec::with_capacity(rows.len() * t);
        let mut mask = Vec::with_capacity(rows.len() * t);
        for row in &rows {
            ids.extend(
                row.iter()
                    .copied()
                    .chain(std::iter::repeat_n(pad, t - row.len())),
            );
            mask.extend((0..t).map(|j| i64::from(j < row.len())));
        }
        let shape = [rows.len() as i64, t as i64];
        let ids = Tensor::from_slice(&ids).view(shape).to_device(self.device);
        let mask = Tensor::from_slice(&mask).view(shape).to_device(self.device);
        let _no_grad = tch::no_grad_guard();
        let r = rewards(&self.loaded.model, &self.head, self.lora, &ids, &mask); // [rows, k]
        let flat = Vec::<f32>::try_from(r.to_device(Device::Cpu).contiguous().view([-1]))?;
        let k = self.dimensions.len();
        Ok(flat
            .chunks(k)
            .map(|c| c.iter().map(|&x| f64::from(x)).collect())
            .collect())
    }
}

impl Scorer for RewardModel {
    fn dimensions(&self) -> &[String] {
        &self.dimensions
    }

    fn reference_point(&self) -> Vec<f64> {
        self.reference_point.clone()
    }

    fn description(&self) -> String {
        format!(
            "the reward model {} (trained by train-rm); reference point: per dimension, the \
             lowest reward it gives a response of its held-out split",
            self.dir.display()
        )
    }

    fn score(&self, prompt_ids: &[u32], answers: &[Answer]) -> Result<Vec<Vec<f64>>> {
        let responses: Vec<&[u32]> = answers.iter().map(|a| a.ids.as_slice()).collect();
        self.rewards(prompt_ids, &responses)
    }
}

/// Writes the head (`head.*`) and the adapters (`adapters.*`) into one safetensors file.
pub fn save_weights(path: &Path, head: &nn::VarStore, adapters: &nn::VarStore) -> Result<()> {
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    for (prefix, store) in [("", head), ("adapters.", adapters)] {
        let mut named: Vec<(String, Tensor)> = store.variables().into_iter().collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, t) in named {
            if t.numel() > 0 {
                tensors.push((format!("{prefix}{name}"), t.detach().to_device(Device::Cpu)));
            }
        }
    }
    Tensor::write_safetensors(&tensors, path)
        .with_context(|| format!("cannot write {}", path.display()))
}

fn load_weights(path: &Path, head: &nn::VarStore, adapters: &nn::VarStore) -> Result<()> {
    let tensors = Tensor::read_safetensors(path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let head_vars = head.variables();
    let adapter_vars = adapters.variables();
    let _no_grad = tch::no_grad_guard();
    let mut loaded = 0;
    for (name, value) in tensors {
        let target = match name.strip_prefix("adapters.") {
            Some(rest) => adapter_vars.get(rest),
            None => head_vars.get(&name),
        };
        let mut target = target
            .with_context(|| format!("{}: unexpected tensor `{name}`", path.display()))?
            .shallow_clone();
        ensure!(
            target.size() == value.size(),
            "{}: `{name}` has shape {:?}, the model expects {:?}",
            path.display(),
            value.size(),
            target.size()
        );
        target.copy_(&value);
        loaded += 1;
    }
    let expected = head_vars.len() + adapter_vars.values().filter(|t| t.numel() > 0).count();
    ensure!(
        loaded == expected,
        "{}: {loaded} tensors, the model has {expected}",
        path.display()
    );
    Ok(())
}
