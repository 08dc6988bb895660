//! The benchmark's two presets: `cpu` (a small random Llama with the byte-level tokenizer on
//! the PKU-SafeRLHF sample) and `llama3-8b` (Llama-3-8B shapes with random weights on the
//! device and synthetic pairs), and preparing either.

use anyhow::{Context, Result};
use rand::Rng;
use tch::{nn::VarStore, Device, Kind};

use super::flops::measure_matmul_rate;
use super::{Bench, BenchOptions, Preset};
use crate::data::split::{seeded_rng, PairKind, Preference};
use crate::data::tokenize::Truncation;
use crate::data::{DataConfig, TokenizedPair};
use crate::model::tiny::{write_tiny_model, TinyModelSpec};
use crate::model::{AdapterSpec, CausalLm, ModelConfig};
use crate::tokenizer::ChatTokenizer;

/// The benchmark model's shape for the cpu preset: big enough that the GEMMs, not the
/// framework, dominate a step on 2 cores; small enough for a few minutes in all.
fn cpu_model_spec() -> TinyModelSpec {
    TinyModelSpec {
        hidden_size: 256,
        intermediate_size: 688,
        layers: 4,
        heads: 8,
        kv_heads: 4,
    }
}

/// Tokens per sequence at most in the cpu preset.
pub(super) const CPU_MAX_LENGTH: usize = 256;

/// Synthetic pairs of exactly `seq_len` tokens (prompt of a quarter, two responses), k = 2,
/// one in four a conflict pair, token ids uniform over the vocabulary.
fn synthetic_pairs(n: usize, seq_len: usize, vocab: i64) -> Vec<TokenizedPair> {
    let mut rng = seeded_rng("bench-synthetic", 0, 0);
    let prompt_len = seq_len / 4;
    let response_len = seq_len - prompt_len;
    let mut ids = |len: usize| -> Vec<u32> {
        (0..len)
            .map(|_| rng.random_range(0..vocab as u32))
            .collect()
    };
    (0..n)
        .map(|id| {
            let conflict = id % 4 == 0;
            let (scores_a, scores_b) = match conflict {
                true => (vec![1.0, 0.0], vec![0.0, 1.0]),
                false => (vec![1.0, 1.0], vec![0.0, 0.0]),
            };
            TokenizedPair {
                id,
                prompt_ids: ids(prompt_len),
                response_a_ids: ids(response_len),
                response_b_ids: ids(response_len),
                preferences: match conflict {
                    true => vec![Preference::A, Preference::B],
                    false => vec![Preference::A, Preference::A],
                },
                scores_a,
                scores_b,
                kind: match conflict {
                    true => PairKind::Conflict,
                    false => PairKind::Agree,
                },
                source_lines: [id, id],
                truncation: Truncation {
                    prompt_len,
                    response_a_len: response_len,
                    response_b_len: response_len,
                    kept_prompt: prompt_len,
                    kept_a: response_len,
                    kept_b: response_len,
                },
            }
        })
        .collect()
}

/// A model with the preset's shapes and random base weights (N(0, 0.02^2), norms 1) drawn
/// on the device, for shapes too big to write to disk first.
pub(super) fn random_model(
    config: &ModelConfig,
    spec: &AdapterSpec,
    device: Device,
    kind: Kind,
) -> (VarStore, VarStore, CausalLm) {
    let base = VarStore::new(device);
    let adapters = VarStore::new(device);
    let model = CausalLm::new(&base.root(), Some((&adapters.root(), spec)), config, kind);
    tch::no_grad(|| {
        for (name, mut t) in base.variables() {
            if name.ends_with("norm.weight") {
                let _ = t.fill_(1.0);
            } else {
                let _ = t.normal_(0.0, 0.02);
            }
        }
    });
    (base, adapters, model)
}

/// Llama-3-8B's config.json, with `layers` decoder layers.
fn llama3_8b_config(layers: i64) -> Result<ModelConfig> {
    ModelConfig::from_json(&format!(
        r#"{{"model_type": "llama", "vocab_size": 128256, "hidden_size": 4096,
            "intermediate_size": 14336, "num_hidden_layers": {layers}, "num_attention_heads": 32,
            "num_key_value_heads": 8, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
            "max_position_embeddings": 8192, "tie_word_embeddings": false}}"#
    ))
}

impl Bench {
    /// Builds the model directory and data of the preset and measures the matmul rate.
    pub fn prepare(options: BenchOptions) -> Result<Self> {
        tch::set_num_threads(options.threads as i32);
        match options.preset {
            Preset::Cpu => Self::prepare_cpu(options),
            Preset::Llama3_8b => {
                let config = llama3_8b_config(options.layers.unwrap_or(32))?;
                let kind = match options.device {
                    Device::Cpu => Kind::Float,
                    _ => Kind::BFloat16,
                };
                let n = options.micro_batch * (options.warmup + options.steps).max(4) * 4;
                let pairs = synthetic_pairs(n, options.seq_len, config.vocab_size);
                let rate_n = if options.device == Device::Cpu {
                    1024
                } else {
                    8192
                };
                let matmul_rate = measure_matmul_rate(options.device, kind, rate_n, 10);
                Ok(Bench {
                    options,
                    model_dir: None,
                    config,
                    kind,
                    pairs,
                    k: 2,
                    data_seed: 0,
                    pad_token_id: 0,
                    tokenizer: None,
                    matmul_rate,
                    best_matmul_rate: matmul_rate.into(),
                })
            }
        }
    }

    fn prepare_cpu(options: BenchOptions) -> Result<Self> {
        let model_dir = options.work.join("model");
        let mut spec = cpu_model_spec();
        if let Some(layers) = options.layers {
            spec.layers = layers;
        }
        write_tiny_model(&model_dir, &spec, 0)?;
        let config = ModelConfig::from_model_dir(&model_dir)?;
        let tokenizer = ChatTokenizer::from_model_dir(&model_dir, None)?;
        let data_config: DataConfig = toml::from_str(&format!(
            "format = \"pku-saferlhf\"\ntrain_file = {:?}\nmax_length = {CPU_MAX_LENGTH}\n\
             global_batch = {mb}\nmicro_batch = {mb}\neval_fraction = 0.0\n",
            options.data_file.display().to_string(),
            mb = options.micro_batch,
        ))
        .context("the benchmark's data config")?;
        let data = crate::data::load(&data_config, &tokenizer)
            .with_context(|| format!("loading {}", options.data_file.display()))?;
        let mut pairs = data.train.pairs;
        if let Some(max) = options.max_pairs {
            pairs.truncate(max);
        }
        let matmul_rate = measure_matmul_rate(options.device, Kind::Float, 1024, 10);
        Ok(Bench {
            options,
            model_dir: Some(model_dir),
            config,
            kind: Kind::Float,
            k: data.dimensions.len(),
            data_seed: data.seed,
            pairs,
            pad_token_id: tokenizer.pad_token_id(),
            tokenizer: Some(tokenizer),
            matmul_rate,
            best_matmul_rate: matmul_rate.into(),
        })
    }
}
