//! The causal LM: Hugging Face config, the Llama 3 / Mistral decoder, checkpoint loading.
//! Knows nothing of preference optimisation, stages or ranks.

pub mod adapter;
pub mod generate;
pub mod gguf;
pub mod gguf_import;
pub mod hf_config;
pub mod llama;
pub mod load;
pub mod rotary;
pub mod tiny;

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use tch::{nn::VarStore, Device, Kind, Tensor};

pub use adapter::{AdapterKind, AdapterSpec, Conditioning, LoraGemms};
pub use hf_config::{Architecture, ModelConfig, RopeScaling};
pub use llama::{AttentionPattern, CausalLm, KvCache, SharedPrefixRows, TokenLayout};

/// Which device the model runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum DeviceChoice {
    /// CUDA device of this rank when a GPU is present, else CPU.
    #[default]
    Auto,
    Cpu,
    Cuda,
}

/// Floating-point type of the frozen base weights and activations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum DtypeChoice {
    /// f32 on CPU, bf16 on GPU.
    #[default]
    Auto,
    F32,
    Bf16,
}

/// `[model]`: where the Hugging Face model directory is and how to run it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// A Hugging Face model directory (config.json, *.safetensors, tokenizer.json).
    pub path: PathBuf,
    #[serde(default)]
    pub device: DeviceChoice,
    #[serde(default)]
    pub dtype: DtypeChoice,
    /// A Jinja chat template that replaces the model's own.
    #[serde(default)]
    pub chat_template: Option<String>,
}

/// The device a run uses: `auto` is CUDA device `local_rank` when a GPU is present.
pub fn select_device(choice: DeviceChoice, local_rank: usize) -> Result<Device> {
    match choice {
        DeviceChoice::Cpu => Ok(Device::Cpu),
        DeviceChoice::Auto if !tch::Cuda::is_available() => Ok(Device::Cpu),
        DeviceChoice::Auto | DeviceChoice::Cuda => {
            let count = tch::Cuda::device_count() as usize;
            if count == 0 {
                bail!("model.device = \"cuda\" but no CUDA device is available");
            }
            if local_rank >= count {
                bail!("local rank {local_rank} has no GPU: this node has {count}");
            }
            Ok(Device::Cuda(local_rank))
        }
    }
}

/// The weight dtype: `auto` is f32 on CPU and bf16 on GPU.
pub fn select_kind(choice: DtypeChoice, device: Device) -> Kind {
    match (choice, device) {
        (DtypeChoice::F32, _) | (DtypeChoice::Auto, Device::Cpu) => Kind::Float,
        (DtypeChoice::Bf16, _) | (DtypeChoice::Auto, _) => Kind::BFloat16,
    }
}

/// A model loaded from a Hugging Face directory: the frozen base weights in one `VarStore`,
/// the adapters (if any) in another, so checkpoints and optimizers see only the adapters.
pub struct LoadedModel {
    pub base: VarStore,
    pub adapters: VarStore,
    pub model: CausalLm,
    /// Changes when the config or weights change: keys caches of model outputs.
    pub fingerprint: String,
}

/// Reads `dir/config.json`, builds the decoder (with fresh adapters of `adapter_spec`, if
/// given) and loads its safetensors weights.
pub fn load_model(
    dir: &Path,
    adapter_spec: Option<&AdapterSpec>,
    device: Device,
    kind: Kind,
) -> Result<LoadedModel> {
    let config = ModelConfig::from_model_dir(dir)?;
    let config_json = std::fs::read(dir.join("config.json"))?;
    let base = VarStore::new(device);
    let adapters = VarStore::new(device);
    let adapter_root = adapters.root();
    let model = CausalLm::new(
        &base.root(),
        adapter_spec.map(|s| (&adapter_root, s)),
        &config,
        kind,
    );
    let checkpoint = load::Checkpoint::open(dir)?;
    checkpoint
        .verify(&llama::parameter_shapes(&config))
        .and_then(|()| checkpoint.copy_into(&base))
        .with_context(|| format!("cannot load the weights of {}", dir.display()))?;
    let fingerprint = checkpoint.fingerprint(&config_json);
    Ok(LoadedModel {
        base,
        adapters,
        model,
        fingerprint,
    })
}

/// Log-probability of each next token: logits [b, t, vocab], input_ids [b, t]
/// -> [b, t - 1], entry (i, j) = log p(input_ids[i, j + 1] | input_ids[i, ..=j]), in f32.
pub fn next_token_logprobs(logits: &Tensor, input_ids: &Tensor) -> Tensor {
    let t = logits.size()[1];
    let predicted = logits.narrow(1, 0, t - 1).log_softmax(-1, Kind::Float); // [b, t-1, vocab]
    let targets = input_ids.narrow(1, 1, t - 1).unsqueeze(-1); // [b, t-1, 1]
    predicted.gather(-1, &targets, false).squeeze_dim(-1)
}
