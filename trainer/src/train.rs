//! The training loop: every stage of the configured method, top to bottom.
//!
//! Per stage: freeze what the stage does not train, build AdamW over the rest, then for each
//! global batch: every micro-batch of this rank runs the stage's passes and backpropagates its
//! share of the loss (`step::accumulate`), gradients are averaged over ranks, clipped, and one
//! optimizer step is taken; metrics go to the log, `metrics.jsonl` and the progress bar. At the
//! end of a stage its adapters are written under the run directory.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use rand::Rng;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tch::{Device, Kind, Tensor};

use crate::checkpoint::{self, AdapterMeta, ADAPTERS_FILE};
use crate::config::RunConfig;
use crate::data::{self, collate, epoch_batches, split::seeded_rng, BatchPlan, PreferenceData};
use crate::logps::BatchTensors;
use crate::method::{stages, PairPool, Stage, Trainable, WeightSampling};
use crate::model::{self, CausalLm, LoadedModel};
use crate::optim::{learning_rate, AdamW, Schedule};
use crate::reference::{self, ReferenceLogps};
use crate::step::{self, MicroInputs, Normalisers, StepContext, StepStats};
use crate::tokenizer::ChatTokenizer;

/// `[train]`: the optimisation and where the run is written.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// The run directory: checkpoints, metrics, the resolved config.
    pub output_dir: PathBuf,
    #[serde(default = "defaults::learning_rate")]
    pub learning_rate: f64,
    #[serde(default = "defaults::warmup_ratio")]
    pub warmup_ratio: f64,
    #[serde(default)]
    pub weight_decay: f64,
    #[serde(default)]
    pub schedule: Schedule,
    /// Global gradient-norm clipping; 0 disables it.
    #[serde(default = "defaults::max_grad_norm")]
    pub max_grad_norm: f64,
    #[serde(default = "defaults::adam_beta1")]
    pub adam_beta1: f64,
    #[serde(default = "defaults::adam_beta2")]
    pub adam_beta2: f64,
    #[serde(default = "defaults::adam_eps")]
    pub adam_eps: f64,
    /// Passes over each stage's pairs.
    #[serde(default = "defaults::epochs")]
    pub epochs: usize,
    /// At most this many optimizer steps per stage (for short runs).
    #[serde(default)]
    pub max_steps: Option<usize>,
    /// Seed of the adapters' initialisation and of the weight draws.
    #[serde(default)]
    pub seed: u64,
}

mod defaults {
    pub fn learning_rate() -> f64 {
        5e-6
    }
    pub fn warmup_ratio() -> f64 {
        0.03
    }
    pub fn max_grad_norm() -> f64 {
        1.0
    }
    pub fn adam_beta1() -> f64 {
        0.9
    }
    pub fn adam_beta2() -> f64 {
        0.999
    }
    pub fn adam_eps() -> f64 {
        1e-8
    }
    pub fn epochs() -> usize {
        1
    }
}

impl TrainConfig {
    pub fn validate(&self) -> Result<()> {
        let positive = |v: f64| v > 0.0 && v.is_finite();
        if !positive(self.learning_rate) {
            bail!(
                "train.learning_rate must be a positive number, got {}",
                self.learning_rate
            );
        }
        if !(0.0..1.0).contains(&self.warmup_ratio) {
            bail!(
                "train.warmup_ratio must be in [0, 1), got {}",
                self.warmup_ratio
            );
        }
        if !(self.weight_decay >= 0.0 && self.weight_decay.is_finite()) {
            bail!("train.weight_decay must be >= 0, got {}", self.weight_decay);
        }
        if !(self.max_grad_norm >= 0.0 && self.max_grad_norm.is_finite()) {
            bail!(
                "train.max_grad_norm must be >= 0 (0 disables clipping), got {}",
                self.max_grad_norm
            );
        }
        for (key, beta) in [
            ("adam_beta1", self.adam_beta1),
            ("adam_beta2", self.adam_beta2),
        ] {
            if !(0.0..1.0).contains(&beta) {
                bail!("train.{key} must be in [0, 1), got {beta}");
            }
        }
        if !positive(self.adam_eps) {
            bail!("train.adam_eps must be positive, got {}", self.adam_eps);
        }
        if self.epochs == 0 {
            bail!("train.epochs must be at least 1");
        }
        if self.max_steps == Some(0) {
            bail!("train.max_steps must be at least 1 when given");
        }
        Ok(())
    }
}

/// What a finished run leaves behind.
#[derive(Debug, Clone)]
pub struct TrainSummary {
    pub run_dir: PathBuf,
    /// Optimizer steps taken in each stage.
    pub steps: Vec<usize>,
    /// The adapters after the last stage.
    pub adapters: PathBuf,
}

/// The run's model, data and reference log-probs, loaded once for every stage.
struct Run<'a> {
    config: &'a RunConfig,
    device: Device,
    loaded: LoadedModel,
    tokenizer: ChatTokenizer,
    data: PreferenceData,
    reference: ReferenceLogps,
    metrics: std::fs::File,
}

/// Trains every stage of the configured method. `config_text` is the TOML as given, saved in
/// the run directory beside the resolved config.
pub fn train(config: &RunConfig, config_text: &str) -> Result<TrainSummary> {
    let run_dir = config.train.output_dir.clone();
    prepare_run_dir(&run_dir)?;
    std::fs::write(run_dir.join("config.toml"), config_text)?;
    std::fs::write(
        run_dir.join("resolved_config.json"),
        serde_json::to_string_pretty(config)?,
    )?;

    let device = model::select_device(config.model.device, 0)?;
    let kind = model::select_kind(config.model.dtype, device);
    let tokenizer =
        ChatTokenizer::from_model_dir(&config.model.path, config.model.chat_template.as_deref())?;
    let data = data::load(&config.data, &tokenizer)?;
    tracing::info!(
        train_pairs = data.train.pairs.len(),
        agree = data.train.agree().len(),
        conflict = data.train.conflict().len(),
        "data loaded"
    );
    let spec = config.method.adapter_spec(data.dimensions.len());
    tch::manual_seed(config.train.seed as i64);
    let loaded = model::load_model(&config.model.path, Some(&spec), device, kind)?;
    let cache_dir = config
        .data
        .cache_dir
        .clone()
        .unwrap_or_else(|| run_dir.join("cache"));
    let (reference, cached) = reference::load_or_compute(
        &cache_dir,
        &loaded.fingerprint,
        &loaded.model,
        &data.train.pairs,
        config.data.micro_batch,
        tokenizer.pad_token_id(),
        device,
    )?;
    tracing::info!(cached, "reference log-probs ready");

    let metrics = std::fs::File::create(run_dir.join("metrics.jsonl"))?;
    let mut run = Run {
        config,
        device,
        loaded,
        tokenizer,
        data,
        reference,
        metrics,
    };
    let meta = AdapterMeta::new(
        &config.model.path,
        &run.loaded.fingerprint,
        &run.data.dimensions,
        &spec,
    );
    let mut steps = Vec::new();
    for stage in stages(config.method.name) {
        steps.push(run_stage(&mut run, &stage)?);
        let stage_file = run_dir
            .join(format!("stage-{}", stage.number))
            .join(ADAPTERS_FILE);
        checkpoint::save_adapters(&stage_file, &run.loaded.adapters, &meta)?;
        tracing::info!(stage = stage.number, path = %stage_file.display(), "stage finished");
    }
    let adapters = run_dir.join(ADAPTERS_FILE);
    checkpoint::save_adapters(&adapters, &run.loaded.adapters, &meta)?;
    Ok(TrainSummary {
        run_dir,
        steps,
        adapters,
    })
}

/// A new run never writes into a directory that holds a previous run's files.
fn prepare_run_dir(dir: &Path) -> Result<()> {
    if dir.join("config.toml").exists() || dir.join("metrics.jsonl").exists() {
        bail!(
            "{} already holds a run: choose another train.output_dir",
            dir.display()
        );
    }
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create run directory {}", dir.display()))
}

/// Sets which adapter tensors receive gradients; returns the trainable ones.
fn set_trainable(model: &CausalLm, trainable: Trainable) -> Vec<Tensor> {
    let mut params = Vec::new();
    for (_, projection) in model.projections() {
        let adapter = projection
            .adapter
            .as_ref()
            .expect("training needs adapters");
        for pair in adapter.shared.iter() {
            for t in [&pair.a, &pair.b] {
                let on = matches!(trainable, Trainable::Shared | Trainable::All);
                params.extend(on.then(|| t.shallow_clone()));
                let _ = t.shallow_clone().set_requires_grad(on);
            }
        }
        for t in [&adapter.dimensions.a, &adapter.dimensions.b] {
            let on = matches!(trainable, Trainable::Dimensions | Trainable::All);
            params.extend(on.then(|| t.shallow_clone()));
            let _ = t.shallow_clone().set_requires_grad(on);
        }
    }
    params
}

/// The training pairs of a stage's pool.
fn pool_ids(data: &PreferenceData, pool: PairPool) -> Vec<usize> {
    match pool {
        PairPool::Agree => data.train.agree(),
        PairPool::Conflict => data.train.conflict(),
        PairPool::All => (0..data.train.pairs.len()).collect(),
        PairPool::AgreeSubsetAndConflict => {
            let mut ids = data.agree_subset();
            ids.extend(data.train.conflict());
            ids.sort_unstable();
            ids
        }
    }
}

/// w ~ Dirichlet(1, .., 1) for each pair of a global batch (or one w for all of them), drawn
/// from (seed, stage, step) so that any world size and accumulation draws the same weights.
fn draw_weights(
    seed: u64,
    stage: usize,
    step: usize,
    pairs: usize,
    k: usize,
    sampling: WeightSampling,
) -> Vec<Vec<f32>> {
    let mut rng = seeded_rng(&format!("weights/stage-{stage}"), seed, step as u64);
    let mut draw = || {
        // Normalised unit exponentials are Dirichlet(1).
        let e: Vec<f64> = (0..k).map(|_| -(1.0 - rng.random::<f64>()).ln()).collect();
        let total: f64 = e.iter().sum();
        e.iter().map(|x| (x / total) as f32).collect::<Vec<f32>>()
    };
    match sampling {
        WeightSampling::PerRow => (0..pairs).map(|_| draw()).collect(),
        WeightSampling::PerStep => {
            let w = draw();
            vec![w; pairs]
        }
    }
}

/// Runs one stage; returns the optimizer steps taken.
fn run_stage(run: &mut Run, stage: &Stage) -> Result<usize> {
    let config = run.config;
    let (k, device) = (run.data.dimensions.len(), run.device);
    let params = set_trainable(&run.loaded.model, stage.trainable);
    let t = &config.train;
    let mut optimizer = AdamW::new(
        params,
        t.adam_beta1,
        t.adam_beta2,
        t.adam_eps,
        t.weight_decay,
    );
    let (rank, world_size) = (0, 1);
    let plan = BatchPlan::new(&config.data, world_size)?;
    let pool = pool_ids(&run.data, stage.pool);
    let steps_per_epoch = pool.len() / config.data.global_batch;
    if steps_per_epoch == 0 {
        bail!(
            "stage {} ({}) has {} training pairs, fewer than data.global_batch = {}",
            stage.number,
            stage.name,
            pool.len(),
            config.data.global_batch
        );
    }
    let total_steps = (steps_per_epoch * t.epochs).min(t.max_steps.unwrap_or(usize::MAX));
    let context = StepContext {
        model: &run.loaded.model,
        plan: stage.step,
        beta: config.method.beta,
        batch_passes: config.method.batch_passes,
        k,
    };
    let progress = indicatif::ProgressBar::new(total_steps as u64).with_style(
        indicatif::ProgressStyle::with_template(
            "stage {msg} [{bar:30}] {pos}/{len} steps, {elapsed} < {eta}",
        )
        .expect("valid template"),
    );
    progress.set_message(format!("{} {}", stage.number, stage.name));
    tracing::info!(
        stage = stage.number,
        name = stage.name,
        pairs = pool.len(),
        total_steps,
        "stage starts"
    );

    let mut step = 0;
    'epochs: for epoch in 0..t.epochs {
        let stage_seed = config.data.seed.wrapping_add(stage.number as u64);
        let batches = epoch_batches(
            &run.data.train.pool(&pool),
            config.data.global_batch,
            stage_seed,
            epoch as u64,
        );
        for global in &batches.batches {
            if step == total_steps {
                break 'epochs;
            }
            let started = Instant::now();
            let pairs = run.data.train.select(global);
            let preference_signs: Vec<Vec<i8>> = pairs
                .iter()
                .map(|p| p.preferences.iter().map(|x| x.sign()).collect())
                .collect();
            let norms = Normalisers::of(
                &preference_signs
                    .iter()
                    .map(Vec::as_slice)
                    .collect::<Vec<_>>(),
                k,
                world_size,
            );
            let drawn = stage.step.draws_weights().then(|| {
                draw_weights(
                    t.seed,
                    stage.number,
                    step,
                    global.len(),
                    k,
                    config.method.weight_sampling,
                )
            });
            let mut stats = StepStats::new(k, device);
            for micro in plan.shard(global, rank) {
                let batch = collate(&run.data.train.select(micro), run.tokenizer.pad_token_id());
                let tensors = BatchTensors::new(&batch, device);
                let (reference_a, reference_b) = run.reference.gather(&batch.pair_ids, device);
                let drawn_weights = drawn.as_ref().map(|w| {
                    // Rows of this micro-batch, by position in the global batch.
                    let rows: Vec<f32> = batch
                        .pair_ids
                        .iter()
                        .flat_map(|id| {
                            w[global
                                .iter()
                                .position(|g| g == id)
                                .expect("pair of this batch")]
                            .clone()
                        })
                        .collect();
                    Tensor::from_slice(&rows)
                        .view([batch.pairs as i64, k as i64])
                        .to_device(device)
                });
                let preferences = Tensor::from_slice(&batch.preferences)
                    .view([batch.pairs as i64, k as i64])
                    .to_device(device);
                let inputs = MicroInputs {
                    tensors: &tensors,
                    reference_a,
                    reference_b,
                    preferences,
                    drawn_weights,
                };
                step::accumulate(&context, &inputs, &norms, &mut stats);
            }
            let grad_norm = optimizer.clip_grad_norm(t.max_grad_norm);
            let lr = learning_rate(
                t.learning_rate,
                t.schedule,
                t.warmup_ratio,
                step,
                total_steps,
            );
            let sums =
                Vec::<f64>::try_from(stats.sums.to_device(Device::Cpu).to_kind(Kind::Double))?;
            if !sums[0].is_finite() || !grad_norm.is_finite() {
                bail!(
                    "stage {} step {step}: the loss is {} and the gradient norm {grad_norm}; stopping \
                     before the update (the last checkpoint is left as it was)",
                    stage.number,
                    sums[0]
                );
            }
            optimizer.step(lr);
            optimizer.zero_grad();
            step += 1;
            let record = metrics_record(
                stage,
                epoch,
                step,
                lr,
                grad_norm,
                &sums,
                &run.data.dimensions,
                stats.tokens,
                started,
            );
            writeln!(run.metrics, "{record}")?;
            tracing::debug!(%record, "step");
            progress.inc(1);
        }
    }
    progress.finish_and_clear();
    tracing::info!(stage = stage.number, steps = step, "stage done");
    Ok(step)
}

/// One line of `metrics.jsonl`.
#[allow(clippy::too_many_arguments)]
fn metrics_record(
    stage: &Stage,
    epoch: usize,
    step: usize,
    lr: f64,
    grad_norm: f64,
    sums: &[f64],
    dimensions: &[String],
    tokens: i64,
    started: Instant,
) -> serde_json::Value {
    let per_dimension: serde_json::Map<String, serde_json::Value> = dimensions
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let (chosen, rejected, correct, count) = (
                sums[1 + 4 * i],
                sums[2 + 4 * i],
                sums[3 + 4 * i],
                sums[4 + 4 * i],
            );
            let n = count.max(1.0);
            let value = json!({
                "chosen_reward": chosen / n,
                "rejected_reward": rejected / n,
                "margin": (chosen - rejected) / n,
                "accuracy": correct / n,
                "pairs": count,
            });
            (name.clone(), value)
        })
        .collect();
    let seconds = started.elapsed().as_secs_f64();
    json!({
        "stage": stage.number,
        "stage_name": stage.name,
        "epoch": epoch,
        "step": step,
        "loss": sums[0],
        "learning_rate": lr,
        "grad_norm": grad_norm,
        "tokens_per_second": tokens as f64 / seconds.max(1e-9),
        "seconds": seconds,
        "dimensions": per_dimension,
    })
}
