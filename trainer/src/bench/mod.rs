//! `modpo-trainer bench`: training-step speed and memory of every stage and method, the
//! optimisations measured one at a time, and (on a CPU) the alternatives a user would run
//! instead, timed in the same run on the same model, data, lengths, LoRA rank and batch:
//! TRL's `DPOTrainer` with a PEFT LoRA adapter for single-objective DPO (our stage 1), and a
//! straightforward PyTorch stage-3 step (`bench/*.py`, run with the venv's Python).
//!
//! A case times `steps` optimizer steps after `warmup` ones, each step the whole of what the
//! training loop does per step: collate, upload, passes and backward, gradient clipping,
//! AdamW, the metrics read back to the host. FLOPs per step count the batch's real tokens
//! ([`flops`]) and MFU divides their rate by the measured dense matmul rate.
//!
//! Presets: `cpu` (a small random Llama with the byte-level tokenizer on the PKU-SafeRLHF
//! sample, sized for 2 CPU cores) and `llama3-8b` (Llama-3-8B shapes with random bf16
//! weights on a GPU, synthetic pairs of 1024 tokens, plus the largest micro-batch that fits
//! with and without activation recomputation).

pub mod flops;
pub mod memory;
mod python;
mod report;

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use rand::seq::SliceRandom;
use rand::Rng;
use serde::{Deserialize, Serialize};
use tch::{nn::VarStore, Device, Kind, Tensor};

use crate::data::split::{seeded_rng, PairKind, Preference};
use crate::data::tokenize::Truncation;
use crate::data::{collate, epoch_batches, DataConfig, TokenizedPair};
use crate::logps::{sequence_logps, BatchTensors, RowLayout};
use crate::method::{stages, MethodConfig, MethodName, PairPool, Stage};
use crate::model::tiny::{write_tiny_model, TinyModelSpec};
use crate::model::{self, AdapterSpec, CausalLm, Conditioning, LoraGemms, ModelConfig};
use crate::optim::AdamW;
use crate::reference;
use crate::step::{self, MicroInputs, Normalisers, StepContext, StepStats};
use crate::tokenizer::ChatTokenizer;
use crate::train::{draw_weights, set_trainable};
use flops::{measure_matmul_rate, row_pass_flops, PassAdapters};

/// Which benchmark to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
pub enum Preset {
    /// A small Llama on the PKU-SafeRLHF sample on this machine's CPU, against TRL + PEFT
    /// and a straightforward PyTorch stage-3 loop.
    Cpu,
    /// Llama-3-8B shapes, random bf16 weights, 1024-token pairs, on a GPU.
    Llama3_8b,
}

/// How to run the benchmark.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub preset: Preset,
    /// results.json goes here.
    pub out: PathBuf,
    /// Scratch: the model directory and the baselines' inputs.
    pub work: PathBuf,
    /// PKU-SafeRLHF JSONL (cpu preset).
    pub data_file: PathBuf,
    /// Python with torch, transformers, peft and trl, and the directory of the baseline
    /// scripts; None skips the baselines.
    pub python: Option<(PathBuf, PathBuf)>,
    pub warmup: usize,
    pub steps: usize,
    /// Head-to-head rounds against each baseline: ours timed again right before each of the
    /// baseline's runs, so that a machine whose speed drifts (a shared VM) slows both sides of
    /// a round alike; the ratio reported is the median of the rounds'.
    pub rounds: usize,
    /// Intra-op threads of libtorch (and of the Python baselines).
    pub threads: usize,
    /// At most this many training pairs (cpu preset).
    pub max_pairs: Option<usize>,
    /// Pairs per micro-batch (= per optimizer step: one micro-batch per step).
    pub micro_batch: usize,
    /// Decoder layers (overrides the preset's, for smoke runs of the GPU preset).
    pub layers: Option<i64>,
    /// Tokens per sequence of the llama3-8b preset.
    pub seq_len: usize,
    /// Measure each optimisation switched off, one at a time.
    pub ablations: bool,
    /// llama3-8b: search the largest micro-batch that fits, up to this many pairs.
    pub search_micro_batch: Option<usize>,
    pub device: Device,
    /// Only the cases whose name contains this.
    pub only: Option<String>,
    /// Set in the child process that times one case: its name and micro-batch.
    pub child: Option<(String, usize)>,
}

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
const CPU_MAX_LENGTH: usize = 256;
/// LoRA rank and alpha of the curriculum and Panacea (DPO-Soup doubles both, as in the paper).
const BENCH_RANK: i64 = 8;
const BENCH_ALPHA: f64 = 16.0;
const BETA: f64 = 0.1;
const LEARNING_RATE: f64 = 1e-4;

/// What one case switches off, relative to how training runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Variant {
    pub reference_cache: bool,
    pub joint_responses: bool,
    pub batched_passes: bool,
    pub stacked_lora: bool,
    pub length_bucketing: bool,
    pub frozen_base: bool,
    pub recompute_activations: bool,
    pub shared_prompt: bool,
}

impl Variant {
    /// How `train` runs (recomputation is an option, off by default).
    pub const TRAINING: Variant = Variant {
        reference_cache: true,
        joint_responses: true,
        batched_passes: true,
        stacked_lora: true,
        length_bucketing: true,
        frozen_base: true,
        recompute_activations: false,
        shared_prompt: true,
    };
}

/// One timed configuration.
#[derive(Debug, Clone)]
struct Case {
    name: String,
    method: MethodName,
    /// 1-based stage of the method.
    stage: usize,
    variant: Variant,
}

impl Case {
    fn new(name: &str, method: MethodName, stage: usize) -> Self {
        Case {
            name: name.to_string(),
            method,
            stage,
            variant: Variant::TRAINING,
        }
    }

    fn with(mut self, name: &str, change: impl FnOnce(&mut Variant)) -> Self {
        self.name = name.to_string();
        change(&mut self.variant);
        self
    }
}

/// The measured figures of one case.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CaseResult {
    pub name: String,
    pub method: MethodName,
    pub stage: usize,
    pub variant: Variant,
    pub micro_batch: usize,
    /// Per timed step, milliseconds.
    pub ms_per_step: Vec<f64>,
    /// Real tokens through the policy (rows x passes) per timed step, on average.
    pub policy_tokens_per_step: f64,
    /// Model FLOPs per timed step, on average.
    pub flops_per_step: f64,
    /// The rates below are per median step (one slow step does not move them), filled in by
    /// [`CaseResult::fill_rates`].
    pub median_ms: f64,
    pub pairs_per_s: f64,
    pub policy_tokens_per_s: f64,
    /// FLOPs per second over the benchmark's dense matmul rate: the best of the rates
    /// measured during the run (one rate for every case, so MFU and throughput rank cases
    /// alike, and the MFU is not flattered by a measurement taken in a slow moment).
    pub mfu: f64,
    /// The dense matmul rate this case's process measured before it, FLOP/s.
    pub matmul_rate: f64,
    /// Peak resident set (CPU) or device memory in use (GPU), bytes.
    pub peak_memory_bytes: Option<u64>,
}

impl CaseResult {
    /// Median step time and the rates per median step, MFU against `matmul_rate` (FLOP/s).
    pub(crate) fn fill_rates(&mut self, matmul_rate: f64) {
        self.median_ms = median(&self.ms_per_step);
        let median_s = self.median_ms / 1e3;
        self.pairs_per_s = self.micro_batch as f64 / median_s;
        self.policy_tokens_per_s = self.policy_tokens_per_step / median_s;
        self.mfu = self.flops_per_step / median_s / matmul_rate;
    }
}

/// Everything the benchmark ran on, and what it measured.
pub struct Bench {
    options: BenchOptions,
    model_dir: Option<PathBuf>,
    config: ModelConfig,
    kind: Kind,
    pairs: Vec<TokenizedPair>,
    k: usize,
    pad_token_id: u32,
    tokenizer: Option<ChatTokenizer>,
    /// Dense matmul rate (FLOP/s) measured by this process before it ran anything.
    matmul_rate: f64,
    /// The best of this process's rate and its children's: what MFU is measured against. On
    /// a shared machine one measurement can land in a slow moment (this 2-vCPU VM measured
    /// 70 and 146 GFLOP/s minutes apart).
    best_matmul_rate: std::cell::Cell<f64>,
}

/// Median of a non-empty list.
fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
    }
}

/// The pairs of a stage's pool. `D_agree,sub` is the first |D_conflict| agree pairs: a
/// benchmark needs the same sizes as training, not the seeded draw.
fn pool(pairs: &[TokenizedPair], pool: PairPool) -> Vec<usize> {
    let agree: Vec<usize> = pairs
        .iter()
        .filter(|p| !p.is_conflict())
        .map(|p| p.id)
        .collect();
    let conflict: Vec<usize> = pairs
        .iter()
        .filter(|p| p.is_conflict())
        .map(|p| p.id)
        .collect();
    match pool {
        PairPool::Agree => agree,
        PairPool::Conflict => conflict,
        PairPool::All => pairs.iter().map(|p| p.id).collect(),
        PairPool::AgreeSubsetAndConflict => {
            let mut ids: Vec<usize> = agree.into_iter().take(conflict.len()).collect();
            ids.extend(conflict);
            ids.sort_unstable();
            ids
        }
    }
}

/// `steps` batches of `batch` pairs from `ids`: length-bucketed as training draws them (by
/// `row_length`, the length of the row a pair becomes), or plainly shuffled (so a batch pads
/// to its longest pair, whatever the others' lengths).
fn step_batches(
    pairs: &[TokenizedPair],
    ids: &[usize],
    batch: usize,
    steps: usize,
    bucketing: bool,
    row_length: fn(&TokenizedPair) -> usize,
) -> Vec<Vec<usize>> {
    let entries: Vec<(usize, usize)> = ids.iter().map(|&i| (i, row_length(&pairs[i]))).collect();
    let mut batches = Vec::new();
    let mut epoch = 0u64;
    while batches.len() < steps {
        let epoch_batches = if bucketing {
            epoch_batches(&entries, batch, 0, epoch).batches
        } else {
            let mut order = ids.to_vec();
            order.shuffle(&mut seeded_rng("bench-unbucketed", 0, epoch));
            order.chunks_exact(batch).map(<[usize]>::to_vec).collect()
        };
        if epoch_batches.is_empty() {
            break;
        }
        batches.extend(epoch_batches);
        epoch += 1;
    }
    batches.truncate(steps);
    batches
}

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
fn random_model(
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
            pairs,
            pad_token_id: tokenizer.pad_token_id(),
            tokenizer: Some(tokenizer),
            matmul_rate,
            best_matmul_rate: matmul_rate.into(),
        })
    }

    fn adapter_spec(&self, method: MethodName) -> AdapterSpec {
        let soup = method == MethodName::DpoSoup;
        MethodConfig {
            name: method,
            beta: BETA,
            // DPO-Soup keeps its own defaults (rank 16, alpha 32, as in the paper).
            rank: (!soup).then_some(BENCH_RANK),
            alpha: (!soup).then_some(BENCH_ALPHA),
            weight_sampling: Default::default(),
            batch_passes: true,
        }
        .adapter_spec(self.k)
    }

    /// The model of a method: from the preset's directory, or random on the device.
    fn model(&self, method: MethodName) -> Result<(VarStore, VarStore, CausalLm)> {
        let spec = self.adapter_spec(method);
        match &self.model_dir {
            Some(dir) => {
                let loaded = model::load_model(dir, Some(&spec), self.options.device, self.kind)?;
                Ok((loaded.base, loaded.adapters, loaded.model))
            }
            None => Ok(random_model(
                &self.config,
                &spec,
                self.options.device,
                self.kind,
            )),
        }
    }

    fn sync(&self) {
        if let Device::Cuda(i) = self.options.device {
            tch::Cuda::synchronize(i as i64);
        }
    }

    fn peak_memory(&self) -> Option<u64> {
        match self.options.device {
            Device::Cuda(i) => modpo_launcher::cuda_memory_in_use(i),
            _ => memory::peak_rss_bytes(),
        }
    }

    /// The batches a case steps through, as the stage would draw them.
    fn case_batches(
        &self,
        stage: &Stage,
        variant: &Variant,
        micro_batch: usize,
    ) -> Vec<Vec<usize>> {
        let ids = pool(&self.pairs, stage.pool);
        step_batches(
            &self.pairs,
            &ids,
            micro_batch,
            self.options.warmup + self.options.steps,
            variant.length_bucketing,
            RowLayout::new(variant.shared_prompt).row_length(),
        )
    }

    /// Times one case; `micro_batch` pairs per step.
    fn run_case(&self, case: &Case, micro_batch: usize) -> Result<CaseResult> {
        let (device, k, v) = (self.options.device, self.k, case.variant);
        let stage = stages(case.method)
            .into_iter()
            .find(|s| s.number == case.stage)
            .context("no such stage")?;
        let (base, _adapters, mut model) = self.model(case.method)?;
        if !v.stacked_lora {
            model.set_lora_gemms(LoraGemms::PerBlock);
        }
        let spec = self.adapter_spec(case.method);
        let batches = self.case_batches(&stage, &v, micro_batch);
        if batches.len() < self.options.warmup + self.options.steps {
            bail!(
                "{}: stage {} has too few pairs for {} steps of {micro_batch}",
                case.name,
                stage.number,
                self.options.warmup + self.options.steps
            );
        }
        let reference = match v.reference_cache {
            // Training caches them for every pair once per run; the benchmark needs only these.
            true => {
                let mut ids: Vec<usize> = batches.iter().flatten().copied().collect();
                ids.sort_unstable();
                ids.dedup();
                Some(reference::compute_for(
                    &model,
                    &self.pairs,
                    &ids,
                    micro_batch,
                    self.pad_token_id,
                    device,
                ))
            }
            false => None,
        };
        // Base weights that require gradients: what an unfrozen base costs in the backward.
        let base_params: Vec<Tensor> = base.trainable_variables();
        for p in base.variables().values() {
            let _ = p.shallow_clone().set_requires_grad(!v.frozen_base);
        }
        let (_, params): (Vec<String>, Vec<Tensor>) =
            set_trainable(&model, stage.trainable).into_iter().unzip();
        let mut optimizer = AdamW::new(params, 0.9, 0.999, 1e-8, 0.0);
        let mut context = StepContext::new(&model, stage.step, BETA, k);
        context.batch_passes = v.batched_passes;
        context.split_responses = !v.joint_responses;
        context.recompute_activations = v.recompute_activations;
        let adapters_of_pass = match stage.step {
            crate::method::StepPlan::SharedDpo => PassAdapters::SharedOnly,
            _ => PassAdapters::AllBlocks,
        };

        let layout = RowLayout::new(v.shared_prompt);
        self.sync();
        memory::reset_peak_rss();
        let (mut times, mut tokens, mut flops) = (Vec::new(), 0i64, 0f64);
        for (step_index, global) in batches.iter().enumerate() {
            let started = Instant::now();
            let selected: Vec<&TokenizedPair> = global.iter().map(|&i| &self.pairs[i]).collect();
            let norms = Normalisers::of(&selected, k, 1);
            let mut stats = StepStats::new(k, device);
            let batch = collate(&selected, self.pad_token_id);
            let tensors = BatchTensors::with_layout(&batch, layout, device);
            let (reference_a, reference_b) = match &reference {
                Some(cached) => cached.gather(&batch.pair_ids, device),
                None => tch::no_grad(|| sequence_logps(&model, &tensors, Conditioning::Reference)),
            };
            let drawn_weights = stage.step.draws_weights().then(|| {
                let w = draw_weights(
                    0,
                    stage.number,
                    step_index,
                    global.len(),
                    k,
                    Default::default(),
                );
                let flat: Vec<f32> = w.into_iter().flatten().collect();
                Tensor::from_slice(&flat)
                    .view([global.len() as i64, k as i64])
                    .to_device(device)
            });
            let inputs = MicroInputs {
                tensors: &tensors,
                reference_a,
                reference_b,
                preferences: Tensor::from_slice(&batch.preferences)
                    .view([batch.pairs as i64, k as i64])
                    .to_device(device),
                drawn_weights,
            };
            step::accumulate(&context, &inputs, &norms, &mut stats);
            // What the loop does after the micro-batches: clip (reads the norm), step, and
            // read the metrics back.
            let _grad_norm = optimizer.clip_grad_norm(1.0);
            optimizer.step(LEARNING_RATE);
            optimizer.zero_grad();
            for p in &base_params {
                let mut g = p.grad();
                if g.defined() {
                    let _ = g.zero_();
                }
            }
            let _sums = Vec::<f64>::try_from(stats.sums.to_device(Device::Cpu))?;
            self.sync();
            let elapsed = started.elapsed().as_secs_f64();
            if step_index >= self.options.warmup {
                times.push(elapsed * 1e3);
                tokens += stats.tokens;
                flops += self.batch_flops(
                    &selected,
                    &spec,
                    adapters_of_pass,
                    stage.step.passes(k),
                    v.shared_prompt,
                );
            }
        }
        let peak = self.peak_memory();
        let steps = times.len() as f64;
        let mut result = CaseResult {
            name: case.name.clone(),
            method: case.method,
            stage: case.stage,
            variant: v,
            micro_batch,
            ms_per_step: times,
            policy_tokens_per_step: tokens as f64 / steps,
            flops_per_step: flops / steps,
            median_ms: 0.0,
            pairs_per_s: 0.0,
            policy_tokens_per_s: 0.0,
            mfu: 0.0,
            matmul_rate: self.matmul_rate,
            peak_memory_bytes: peak,
        };
        // This process's own rate; the parent fills the rates in again against the best one.
        result.fill_rates(self.matmul_rate);
        Ok(result)
    }

    /// Model FLOPs of one step over `pairs`: every pass over both responses of every pair,
    /// with the prompt once per pair when it is shared (causal attention makes the cost
    /// additive over tokens, so a shared row costs its two rows less one prompt).
    fn batch_flops(
        &self,
        pairs: &[&TokenizedPair],
        spec: &AdapterSpec,
        adapters: PassAdapters,
        passes: usize,
        shared_prompt: bool,
    ) -> f64 {
        let row = |tokens: usize, response: usize| {
            row_pass_flops(&self.config, spec, adapters, tokens as i64, response as i64)
        };
        let per_pass: f64 = pairs
            .iter()
            .map(|p| {
                let prompt = p.prompt_ids.len();
                let (a, b) = (p.response_a_ids.len(), p.response_b_ids.len());
                let rows = row(prompt + a, a) + row(prompt + b, b);
                match shared_prompt {
                    true => rows - row(prompt, 0),
                    false => rows,
                }
            })
            .sum();
        per_pass * passes as f64
    }

    /// The cases of the preset: every stage and method, then (optionally) stage 3 with each
    /// optimisation switched off.
    fn cases(&self) -> Vec<Case> {
        let mut cases = vec![
            Case::new("curriculum stage 1", MethodName::Curriculum, 1),
            Case::new("curriculum stage 2", MethodName::Curriculum, 2),
            Case::new("curriculum stage 3", MethodName::Curriculum, 3),
        ];
        if self.options.preset == Preset::Cpu {
            cases.push(Case::new("panacea", MethodName::Panacea, 1));
            cases.push(Case::new("dpo-soup", MethodName::DpoSoup, 1));
        }
        if self.options.preset == Preset::Llama3_8b {
            let stage3 = Case::new("", MethodName::Curriculum, 3);
            cases.push(stage3.with("stage 3, recomputation", |v| v.recompute_activations = true));
        }
        if self.options.ablations {
            let stage1 = Case::new("", MethodName::Curriculum, 1);
            cases.push(stage1.clone().with("stage 1, reference every step", |v| {
                v.reference_cache = false
            }));
            cases.push(stage1.with("stage 1, a row per response", |v| v.shared_prompt = false));
            let stage3 = Case::new("", MethodName::Curriculum, 3);
            for (name, off) in [
                (
                    "reference every step",
                    (|v: &mut Variant| v.reference_cache = false) as fn(&mut Variant),
                ),
                ("a row per response", |v| v.shared_prompt = false),
                ("a row per response, in two forwards", |v| {
                    v.shared_prompt = false;
                    v.joint_responses = false
                }),
                ("k + 1 passes one by one", |v| v.batched_passes = false),
                ("LoRA GEMMs per block", |v| v.stacked_lora = false),
                ("no length bucketing", |v| v.length_bucketing = false),
                ("gradients for the base", |v| v.frozen_base = false),
                ("activation recomputation", |v| {
                    v.recompute_activations = true
                }),
            ] {
                cases.push(stage3.clone().with(&format!("stage 3, {name}"), off));
            }
            let naive = stage3.with("stage 3, all of them off", |v| {
                *v = Variant {
                    reference_cache: false,
                    joint_responses: false,
                    batched_passes: false,
                    stacked_lora: false,
                    length_bucketing: false,
                    frozen_base: false,
                    recompute_activations: false,
                    shared_prompt: false,
                }
            });
            cases.push(naive);
        }
        cases
    }

    /// Runs every case (and the baselines), prints the tables and writes results.json. Each
    /// case runs in a child process of its own, so that its peak memory is its own and no
    /// case inherits another's allocator state; a child that fails (out of memory, say) is an
    /// error, except in the micro-batch search, where it means "does not fit".
    pub fn run(&self) -> Result<()> {
        if let Some((name, micro_batch)) = &self.options.child {
            let case = self
                .all_cases()
                .into_iter()
                .find(|c| &c.name == name)
                .with_context(|| format!("no benchmark case {name:?}"))?;
            let result = self.run_case(&case, *micro_batch)?;
            println!("{}", serde_json::to_string(&result)?);
            return Ok(());
        }
        let selected: Vec<Case> = self
            .cases()
            .into_iter()
            .filter(|c| {
                self.options
                    .only
                    .as_ref()
                    .is_none_or(|only| c.name.contains(only.as_str()))
            })
            .collect();
        let mut results = Vec::new();
        for case in &selected {
            eprintln!("bench: {}", case.name);
            results.push(self.time_case(case)?);
        }
        let baselines = match (&self.options.python, self.options.preset) {
            (Some((python, scripts)), Preset::Cpu) => {
                // Ours again, right before each baseline run (when the case is selected).
                let mut ours = |name: &str| -> Result<Option<CaseResult>> {
                    let Some(case) = selected.iter().find(|c| c.name == name) else {
                        return Ok(None);
                    };
                    eprintln!("bench: {name} (head to head)");
                    self.time_case(case).map(Some)
                };
                python::run_baselines(self, python, scripts, &mut ours)?
            }
            _ => Vec::new(),
        };
        let micro_batch_search = match self.options.search_micro_batch {
            Some(limit) => Some(self.search_micro_batch(limit)?),
            None => None,
        };
        let rate = self.best_matmul_rate.get();
        for result in &mut results {
            result.fill_rates(rate);
        }
        report::write(self, &results, &baselines, micro_batch_search.as_ref())
    }

    /// Times `case` at the benchmark's micro-batch in a child process; its failure is an error.
    fn time_case(&self, case: &Case) -> Result<CaseResult> {
        self.run_child(case, self.options.micro_batch)?
            .with_context(|| format!("benchmark case {:?} failed", case.name))
    }

    /// Times `case` in a child process (this binary, `bench --child-case`); None when the
    /// child fails.
    fn run_child(&self, case: &Case, micro_batch: usize) -> Result<Option<CaseResult>> {
        let exe = std::env::current_exe().context("cannot find this executable")?;
        let mut args: Vec<String> = std::env::args().skip(1).collect();
        args.extend([
            "--child-case".into(),
            case.name.clone(),
            "--child-micro-batch".into(),
            micro_batch.to_string(),
        ]);
        let output = std::process::Command::new(exe)
            .args(&args)
            .stderr(std::process::Stdio::inherit())
            .output()
            .context("cannot start a benchmark child process")?;
        if !output.status.success() {
            eprintln!(
                "bench: {} with {micro_batch} pairs failed ({})",
                case.name, output.status
            );
            return Ok(None);
        }
        let stdout = String::from_utf8_lossy(&output.stdout);
        let last = stdout.lines().last().unwrap_or("");
        let result: CaseResult = serde_json::from_str(last)
            .with_context(|| format!("{}: no result line in {last:?}", case.name))?;
        self.best_matmul_rate
            .set(self.best_matmul_rate.get().max(result.matmul_rate));
        Ok(Some(result))
    }

    /// The two cases of the micro-batch search: stage 3 without and with recomputation.
    fn search_cases() -> [Case; 2] {
        let stage3 = Case::new("", MethodName::Curriculum, 3);
        [
            stage3.clone().with("micro-batch search", |_| {}),
            stage3.with("micro-batch search, recomputation", |v| {
                v.recompute_activations = true
            }),
        ]
    }

    fn all_cases(&self) -> Vec<Case> {
        let mut cases = self.cases();
        cases.extend(Self::search_cases());
        cases
    }

    /// The largest micro-batch of a stage-3 step that runs, without and with activation
    /// recomputation: doubling until a run fails (out of memory), then bisecting.
    fn search_micro_batch(&self, limit: usize) -> Result<Vec<(bool, usize)>> {
        let mut found = Vec::new();
        for case in Self::search_cases() {
            let fits = |m: usize| -> Result<bool> {
                eprintln!("bench: {} with {m} pairs", case.name);
                Ok(self.run_child(&case, m)?.is_some())
            };
            let (mut good, mut bad) = (0, None);
            let mut m = 1;
            while m <= limit {
                if fits(m)? {
                    good = m;
                    m *= 2;
                } else {
                    bad = Some(m);
                    break;
                }
            }
            if let Some(mut high) = bad {
                while high - good > 1 {
                    let mid = (good + high) / 2;
                    if fits(mid)? {
                        good = mid;
                    } else {
                        high = mid;
                    }
                }
            }
            found.push((case.variant.recompute_activations, good));
        }
        Ok(found)
    }

    /// Pairs of the timed stage-1 steps as text, for TRL: `(prompt, chosen, rejected, tokens)`.
    fn stage1_text_pairs(&self) -> Result<Vec<serde_json::Value>> {
        let tokenizer = self
            .tokenizer
            .as_ref()
            .context("the cpu preset has a tokenizer")?;
        let stage = &stages(MethodName::Curriculum)[0];
        let mut rows = Vec::new();
        for batch in self.case_batches(stage, &Variant::TRAINING, self.options.micro_batch) {
            for id in batch {
                let p = &self.pairs[id];
                let prefers_a = p.preferences.iter().map(|x| x.sign() as i32).sum::<i32>() > 0;
                let (chosen, rejected) = match prefers_a {
                    true => (&p.response_a_ids, &p.response_b_ids),
                    false => (&p.response_b_ids, &p.response_a_ids),
                };
                rows.push(serde_json::json!({
                    "prompt": tokenizer.decode(&p.prompt_ids, false)?,
                    "chosen": tokenizer.decode(chosen, false)?,
                    "rejected": tokenizer.decode(rejected, false)?,
                    "tokens": 2 * p.prompt_ids.len() + chosen.len() + rejected.len(),
                }));
            }
        }
        Ok(rows)
    }

    /// The timed stage-3 steps as token ids with their drawn weights, for the PyTorch loop.
    fn stage3_steps(&self) -> Vec<serde_json::Value> {
        let stage = &stages(MethodName::Curriculum)[2];
        self.case_batches(stage, &Variant::TRAINING, self.options.micro_batch)
            .iter()
            .enumerate()
            .map(|(step_index, batch)| {
                let pairs: Vec<serde_json::Value> = batch
                    .iter()
                    .map(|&id| {
                        let p = &self.pairs[id];
                        serde_json::json!({
                            "prompt_ids": p.prompt_ids, "a_ids": p.response_a_ids,
                            "b_ids": p.response_b_ids,
                            "preferences": p.preferences.iter().map(|x| x.sign()).collect::<Vec<_>>(),
                        })
                    })
                    .collect();
                let weights = draw_weights(0, 3, step_index, batch.len(), self.k, Default::default());
                serde_json::json!({"pairs": pairs, "weights": weights})
            })
            .collect()
    }

    fn model_dir(&self) -> Option<&Path> {
        self.model_dir.as_deref()
    }
}
