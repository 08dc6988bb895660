//! The training loop: every stage of the configured method, top to bottom.
//!
//! Per stage: freeze what the stage does not train, build AdamW over the rest, then for each
//! global batch: every micro-batch of this rank runs the stage's passes and backpropagates its
//! share of the loss (`step::accumulate`), gradients are averaged over ranks, clipped, and one
//! optimizer step is taken; metrics go to the log, `metrics.jsonl` and the progress bar. At the
//! end of a stage its adapters are written under the run directory.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use rand::Rng;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tch::{Device, Kind, Tensor};

use modpo_launcher::{Collective, CollectiveChoice, Op, Single, Topology};

use crate::checkpoint::{self, AdapterMeta, TrainerState, ADAPTERS_FILE};
use crate::config::{self, RunConfig};
use crate::data::{self, collate, epoch_batches, split::seeded_rng, BatchPlan, PreferenceData};
use crate::eval;
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
    /// Write a checkpoint every this many optimizer steps within a stage (0: only at the end
    /// of each stage, which always gets one).
    #[serde(default)]
    pub checkpoint_every: usize,
    /// Every this many optimizer steps, and at the end of each stage, evaluate conflict-pair
    /// accuracy on the held-out split at the paper's weight settings into `metrics.jsonl`
    /// (0: never).
    #[serde(default)]
    pub eval_every: usize,
    /// Every this many steps, check that all ranks hold bit-identical adapters (0: never).
    #[serde(default)]
    pub check_replicas_every: usize,
    /// How ranks reduce gradients: auto (NCCL on GPU, MPI on CPU, none for one process),
    /// single, mpi or nccl.
    #[serde(default = "defaults::collective")]
    pub collective: String,
    /// Periodic checkpoints kept (the newest); stage-final ones are always kept.
    #[serde(default = "defaults::keep_checkpoints")]
    pub keep_checkpoints: usize,
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
    pub fn collective() -> String {
        "auto".into()
    }
    pub fn keep_checkpoints() -> usize {
        2
    }
}

impl TrainConfig {
    /// `collective` as a launcher choice.
    pub fn collective_choice(&self) -> Result<CollectiveChoice> {
        self.collective
            .parse()
            .map_err(|e| anyhow::anyhow!("train.collective: {e}"))
    }

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
        self.collective_choice()?;
        if self.keep_checkpoints == 0 {
            bail!("train.keep_checkpoints must be at least 1");
        }
        if self.max_steps == Some(0) {
            bail!("train.max_steps must be at least 1 when given");
        }
        Ok(())
    }
}

/// This process's place in the job and how it talks to the other ranks.
pub struct Cluster<'a> {
    pub topology: Topology,
    pub collective: &'a dyn Collective,
}

impl Cluster<'static> {
    /// A process on its own.
    pub fn single() -> Self {
        Cluster {
            topology: Topology::single(),
            collective: &Single,
        }
    }
}

impl Cluster<'_> {
    fn is_main(&self) -> bool {
        self.topology.rank == 0
    }

    fn barrier(&self) -> Result<()> {
        self.collective.barrier().context("barrier")
    }
}

/// How `train` starts.
#[derive(Debug, Clone, Copy, Default)]
pub struct TrainOptions {
    /// Continue from the latest valid checkpoint of the run directory.
    pub resume: bool,
    /// Start stage N from the final checkpoint of stage N - 1.
    pub resume_from_stage: Option<usize>,
    /// Stop after the final checkpoint of stage N (a chain of batch jobs, one per stage).
    pub until_stage: Option<usize>,
}

/// What a run leaves behind.
#[derive(Debug, Clone)]
pub struct TrainSummary {
    pub run_dir: PathBuf,
    /// Optimizer steps taken in each stage run by this call (a stage resumed mid-way counts
    /// from its start).
    pub steps: Vec<usize>,
    /// The adapters after the last stage (absent when stopped early or before the last stage).
    pub adapters: PathBuf,
    /// The last stage that finished in this call.
    pub last_stage: usize,
    /// Stopped by SIGTERM / SIGUSR1 after writing a checkpoint; resume with `--resume`.
    pub stopped: bool,
}

/// The run's model, data and reference log-probs, loaded once for every stage.
struct Run<'a> {
    config: &'a RunConfig,
    cluster: &'a Cluster<'a>,
    device: Device,
    loaded: LoadedModel,
    tokenizer: ChatTokenizer,
    data: PreferenceData,
    reference: ReferenceLogps,
    /// Rank 0 only.
    metrics: Option<std::fs::File>,
    meta: AdapterMeta,
    checkpoints: PathBuf,
    /// Held-out conflict pairs and their reference log-probs, on rank 0 when
    /// `train.eval_every` > 0.
    evaluation: Option<ReferenceLogps>,
    /// Set by SIGTERM or SIGUSR1: stop at the next step boundary with a checkpoint.
    stop: Arc<AtomicBool>,
}

/// Where a stage resumes within itself.
struct StagePosition {
    step: usize,
    epoch: usize,
    pairs_into_epoch: usize,
    optimizer: HashMap<String, Tensor>,
    optimizer_steps: i64,
    optimizer_params: Vec<String>,
}

/// How a stage ended.
enum StageEnd {
    Finished(usize),
    Stopped,
}

/// Trains every stage of the configured method, or the rest of them after a checkpoint.
/// `config_text` is the TOML as given, saved in the run directory with the resolved config.
///
/// Every rank calls it; rank 0 alone writes files. Every rank takes the same stage
/// transitions, since all of them decide from the same data, config and reduced numbers.
pub fn train(
    config: &RunConfig,
    config_text: &str,
    options: TrainOptions,
    cluster: &Cluster,
) -> Result<TrainSummary> {
    let run_dir = config.train.output_dir.clone();
    let checkpoints = checkpoint::checkpoints_dir(&run_dir);
    let resuming = options.resume || options.resume_from_stage.is_some();
    if resuming {
        if !run_dir.join("config.toml").is_file() {
            bail!("nothing to resume: {} holds no run", run_dir.display());
        }
    } else if cluster.is_main() {
        prepare_run_dir(&run_dir)?;
        std::fs::write(run_dir.join("config.toml"), config_text)?;
        std::fs::write(
            run_dir.join("resolved_config.json"),
            serde_json::to_string_pretty(config)?,
        )?;
    }
    cluster.barrier()?;
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGUSR1] {
        signal_hook::flag::register(signal, Arc::clone(&stop))
            .context("cannot install signal handlers")?;
    }

    let device = model::select_device(config.model.device, cluster.topology.local_rank)?;
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
    // Rank 0 computes (or finds) the reference log-probs and caches them; the other ranks
    // read that cache after the barrier rather than compute the same numbers again.
    let load_reference = || {
        reference::load_or_compute(
            &cache_dir,
            &loaded.fingerprint,
            &loaded.model,
            &data.train.pairs,
            config.data.micro_batch,
            tokenizer.pad_token_id(),
            device,
        )
    };
    let main_reference = if cluster.is_main() {
        Some(load_reference()?)
    } else {
        None
    };
    cluster.barrier()?;
    let (reference, cached) = match main_reference {
        Some(found) => found,
        None => load_reference()?,
    };
    tracing::info!(cached, "reference log-probs ready");

    let meta = AdapterMeta::new(
        &config.model.path,
        &loaded.fingerprint,
        &data.dimensions,
        &spec,
    );
    // Where to start: stage 1 step 0, or a checkpoint's position.
    let resume_point = match (options.resume_from_stage, options.resume) {
        (Some(1), _) => {
            bail!("--resume-from-stage 1 is a fresh start: train into a new output_dir instead")
        }
        (Some(stage), _) => Some(checkpoint::stage_final_checkpoint(&checkpoints, stage - 1)?),
        (None, true) => Some(
            checkpoint::latest_valid_checkpoint(&checkpoints)?
                .with_context(|| format!("no valid checkpoint in {}", checkpoints.display()))?,
        ),
        (None, false) => None,
    };
    let evaluation = if cluster.is_main() && config.train.eval_every > 0 {
        let pairs = &data.eval.pairs;
        let (logps, _) = reference::load_or_compute(
            &cache_dir,
            &loaded.fingerprint,
            &loaded.model,
            pairs,
            config.data.micro_batch,
            tokenizer.pad_token_id(),
            device,
        )?;
        if eval::conflict_pairs(&data.eval).is_empty() {
            tracing::warn!("train.eval_every is set but the held-out split has no conflict pair");
        }
        Some(logps)
    } else {
        None
    };
    let metrics = match cluster.is_main() {
        true => Some(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(run_dir.join("metrics.jsonl"))?,
        ),
        false => None,
    };
    let mut run = Run {
        config,
        cluster,
        device,
        loaded,
        tokenizer,
        data,
        reference,
        metrics,
        meta,
        checkpoints,
        evaluation,
        stop,
    };
    let plan = stages(config.method.name);
    let (mut first_stage, mut position) = (1, None);
    if let Some((dir, state)) = resume_point {
        check_resumable(&run, &state, &dir)?;
        checkpoint::load_adapters(&dir.join(ADAPTERS_FILE), &run.loaded.adapters)?;
        if state.stage_finished {
            first_stage = state.stage + 1;
        } else {
            first_stage = state.stage;
            position = Some(StagePosition {
                step: state.step,
                epoch: state.epoch,
                pairs_into_epoch: state.pairs_into_epoch,
                optimizer: checkpoint::read_optimizer_state(&dir)?,
                optimizer_steps: state.optimizer_steps,
                optimizer_params: state.optimizer_params.clone(),
            });
        }
        if first_stage > plan.len() && options.resume_from_stage.is_some() {
            bail!(
                "the method has {} stages; there is no stage {first_stage}",
                plan.len()
            );
        }
        tracing::info!(checkpoint = %dir.display(), stage = first_stage, step = state.step, "resuming");
        if let Some(metrics) = run.metrics.as_mut() {
            let event = json!({"event": "resumed", "checkpoint": dir.display().to_string(),
                               "stage": state.stage, "step": state.step});
            writeln!(metrics, "{event}")?;
        }
    }
    // Every rank starts from rank 0's adapters, fresh or resumed alike.
    let mut adapter_tensors = run.loaded.adapters.trainable_variables();
    tch::no_grad(|| cluster.collective.broadcast(&mut adapter_tensors))
        .context("broadcasting the adapters from rank 0")?;

    let last_stage = options.until_stage.unwrap_or(plan.len()).min(plan.len());
    let mut steps = Vec::new();
    for stage in plan
        .iter()
        .filter(|s| (first_stage..=last_stage).contains(&s.number))
    {
        match run_stage(&mut run, stage, position.take())? {
            StageEnd::Finished(n) => steps.push(n),
            StageEnd::Stopped => {
                return Ok(TrainSummary {
                    run_dir: run_dir.clone(),
                    steps,
                    adapters: run_dir.join(ADAPTERS_FILE),
                    last_stage: stage.number - 1,
                    stopped: true,
                })
            }
        }
    }
    let adapters = run_dir.join(ADAPTERS_FILE);
    if cluster.is_main() && last_stage == plan.len() {
        checkpoint::save_adapters(&adapters, &run.loaded.adapters, &run.meta)?;
    }
    cluster.barrier()?;
    Ok(TrainSummary {
        run_dir,
        steps,
        adapters,
        last_stage,
        stopped: false,
    })
}

fn data_fingerprint(run: &Run) -> String {
    reference::cache_key(
        &run.loaded.fingerprint,
        run.loaded.model.kind(),
        &run.data.train.pairs,
    )
}

/// A checkpoint resumes this run only if it was written for the same model, dimensions and
/// result-relevant config; the error lists every difference.
fn check_resumable(run: &Run, state: &TrainerState, dir: &Path) -> Result<()> {
    let mut problems = Vec::new();
    if state.model_fingerprint != run.loaded.fingerprint {
        problems.push(format!(
            "model: fingerprint {} -> {}",
            state.model_fingerprint, run.loaded.fingerprint
        ));
    }
    if state.data_fingerprint != data_fingerprint(run) {
        problems.push("training data: the tokenized pairs differ (data file, tokenizer, template or max_length)".into());
    }
    if state.dimensions != run.data.dimensions {
        problems.push(format!(
            "dimensions: {:?} -> {:?}",
            state.dimensions, run.data.dimensions
        ));
    }
    problems.extend(config::differences(
        &state.config,
        &run.config.result_relevant(),
    ));
    if !problems.is_empty() {
        bail!(
            "checkpoint {} belongs to a different run:\n  {}",
            dir.display(),
            problems.join("\n  ")
        );
    }
    Ok(())
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

/// Sets which adapter tensors receive gradients; returns the trainable ones with their names.
fn set_trainable(model: &CausalLm, trainable: Trainable) -> Vec<(String, Tensor)> {
    let shared_on = matches!(trainable, Trainable::Shared | Trainable::All);
    let dimensions_on = matches!(trainable, Trainable::Dimensions | Trainable::All);
    let mut params = Vec::new();
    for (module, projection) in model.projections() {
        let adapter = projection
            .adapter
            .as_ref()
            .expect("training needs adapters");
        let mut tensors = vec![];
        if let Some(shared) = &adapter.shared {
            tensors.push(("shared_a", &shared.a, shared_on));
            tensors.push(("shared_b", &shared.b, shared_on));
        }
        tensors.push(("dims_a", &adapter.dimensions.a, dimensions_on));
        tensors.push(("dims_b", &adapter.dimensions.b, dimensions_on));
        for (name, tensor, on) in tensors {
            let _ = tensor.shallow_clone().set_requires_grad(on);
            if on {
                params.push((format!("{module}.{name}"), tensor.shallow_clone()));
            }
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

/// Runs one stage (from `position` when resuming within it), with periodic and final
/// checkpoints; returns how it ended.
fn run_stage(run: &mut Run, stage: &Stage, position: Option<StagePosition>) -> Result<StageEnd> {
    let config = run.config;
    let (k, device) = (run.data.dimensions.len(), run.device);
    let (param_names, params): (Vec<String>, Vec<Tensor>) =
        set_trainable(&run.loaded.model, stage.trainable)
            .into_iter()
            .unzip();
    let t = &config.train;
    let mut optimizer = AdamW::new(
        params,
        t.adam_beta1,
        t.adam_beta2,
        t.adam_eps,
        t.weight_decay,
    );
    let (mut step, start_epoch, mut skip_batches) = match &position {
        None => (0, 0, 0),
        Some(p) => {
            restore_optimizer(&mut optimizer, &param_names, p)?;
            (
                p.step,
                p.epoch,
                p.pairs_into_epoch / config.data.global_batch,
            )
        }
    };
    let (rank, world_size) = (run.cluster.topology.rank, run.cluster.topology.world_size);
    let collective = run.cluster.collective;
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
    if !run.cluster.is_main() {
        progress.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    progress.set_message(format!("{} {}", stage.number, stage.name));
    tracing::info!(
        stage = stage.number,
        name = stage.name,
        pairs = pool.len(),
        total_steps,
        "stage starts"
    );

    progress.set_position(step as u64);
    // The data cursor after the last step: (epoch, pairs of it consumed).
    let mut cursor = (start_epoch, skip_batches * config.data.global_batch);
    'epochs: for epoch in start_epoch..t.epochs {
        let stage_seed = config.data.seed.wrapping_add(stage.number as u64);
        let batches = epoch_batches(
            &run.data.train.pool(&pool),
            config.data.global_batch,
            stage_seed,
            epoch as u64,
        );
        let skip = std::mem::take(&mut skip_batches);
        for (batch_index, global) in batches.batches.iter().enumerate().skip(skip) {
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
            // One flat all-reduce per dtype of the gradients, then identical updates everywhere.
            let mut grads: Vec<Tensor> = optimizer.params.iter().map(Tensor::grad).collect();
            collective
                .all_reduce_mean(&mut grads)
                .context("all-reduce of the gradients")?;
            let grad_norm = optimizer.clip_grad_norm(t.max_grad_norm);
            let lr = learning_rate(
                t.learning_rate,
                t.schedule,
                t.warmup_ratio,
                step,
                total_steps,
            );
            let mut sums =
                Vec::<f64>::try_from(stats.sums.to_device(Device::Cpu).to_kind(Kind::Double))?;
            sums.push(stats.tokens as f64);
            collective
                .all_reduce_f64(&mut sums, Op::Sum)
                .context("reducing the step's metrics")?;
            let tokens = sums.pop().unwrap_or(0.0) as i64;
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
            cursor = (epoch, (batch_index + 1) * config.data.global_batch);
            let record = metrics_record(
                stage,
                epoch,
                step,
                lr,
                grad_norm,
                &sums,
                &run.data.dimensions,
                tokens,
                started,
            );
            if let Some(metrics) = run.metrics.as_mut() {
                writeln!(metrics, "{record}")?;
            }
            tracing::debug!(%record, "step");
            progress.inc(1);
            // SIGTERM / SIGUSR1: checkpoint at this step boundary and stop.
            if t.eval_every > 0 && (step % t.eval_every == 0 || step == total_steps) {
                let record = evaluate_held_out(run, stage, step);
                if let (Some(metrics), Some(record)) = (run.metrics.as_mut(), record) {
                    writeln!(metrics, "{record}")?;
                }
            }
            // A signal to any rank stops every rank at this same step.
            let mut stop_flag = [f64::from(u8::from(run.stop.load(Ordering::SeqCst)))];
            collective
                .all_reduce_f64(&mut stop_flag, Op::Max)
                .context("reducing the stop flag")?;
            let stop = stop_flag[0] > 0.0;
            if t.check_replicas_every > 0 && step % t.check_replicas_every == 0 {
                check_replicas(collective, &optimizer.params, stage.number, step)?;
            }
            let periodic = t.checkpoint_every > 0 && step % t.checkpoint_every == 0;
            if step < total_steps && (stop || periodic) {
                write_checkpoint(run, stage, step, false, cursor, &optimizer, &param_names)?;
                if run.cluster.is_main() {
                    checkpoint::prune_checkpoints(&run.checkpoints, t.keep_checkpoints)?;
                }
            }
            if stop {
                progress.abandon();
                tracing::warn!(
                    stage = stage.number,
                    step,
                    "stopped by signal after a checkpoint; resume with --resume"
                );
                return Ok(StageEnd::Stopped);
            }
        }
    }
    progress.finish_and_clear();
    write_checkpoint(run, stage, step, true, cursor, &optimizer, &param_names)?;
    tracing::info!(stage = stage.number, steps = step, "stage done");
    Ok(StageEnd::Finished(step))
}

/// Rank 0 evaluates the held-out conflict pairs at the paper's settings (METHOD.md
/// section 6): the `metrics.jsonl` line, on rank 0 when there is something to evaluate.
fn evaluate_held_out(run: &Run, stage: &Stage, step: usize) -> Option<serde_json::Value> {
    let reference = run.evaluation.as_ref()?;
    let pairs = eval::conflict_pairs(&run.data.eval);
    if pairs.is_empty() {
        return None;
    }
    let k = run.data.dimensions.len();
    let batching = eval::Batching::like_training(
        run.config.data.micro_batch,
        k + 1,
        run.tokenizer.pad_token_id(),
        run.device,
    );
    let bootstrap = eval::Bootstrap {
        resamples: 200,
        ..Default::default()
    };
    let evaluation = eval::evaluate(
        &run.loaded.model,
        &pairs,
        reference,
        &eval::paper_settings(k),
        run.config.method.beta,
        &batching,
        &bootstrap,
    );
    let record = eval::metrics_record(&run.data.dimensions, &evaluation.results, pairs.len());
    tracing::info!(stage = stage.number, step, mean_accuracy = %record["mean_accuracy"], "held-out conflict accuracy");
    Some(json!({"stage": stage.number, "stage_name": stage.name, "step": step, "eval": record}))
}

/// Verifies every rank holds the same trainable parameters: three sums over all of them
/// (plain, squared, position-weighted) must be bit-identical on every rank.
fn check_replicas(
    collective: &dyn Collective,
    params: &[Tensor],
    stage: usize,
    step: usize,
) -> Result<()> {
    let _no_grad = tch::no_grad_guard();
    let mut sums = [0f64; 3];
    for p in params {
        let flat = p.detach().to_kind(Kind::Double).reshape([-1]);
        let positions = Tensor::arange(flat.size()[0], (Kind::Double, flat.device())) / 1024.0;
        sums[0] += flat.sum(Kind::Double).double_value(&[]);
        sums[1] += flat.square().sum(Kind::Double).double_value(&[]);
        sums[2] += (&flat * positions.cos())
            .sum(Kind::Double)
            .double_value(&[]);
    }
    // Max of x and max of -x over ranks give the largest and smallest value of each sum.
    let mut high = sums;
    let mut low = sums.map(|v| -v);
    collective
        .all_reduce_f64(&mut high, Op::Max)
        .context("replica check")?;
    collective
        .all_reduce_f64(&mut low, Op::Max)
        .context("replica check")?;
    let low = low.map(|v| -v);
    if low != high {
        bail!("stage {stage} step {step}: the ranks' adapters differ (checksums from {low:?} to {high:?})");
    }
    tracing::debug!(stage, step, checksum = sums[0], "replicas identical");
    Ok(())
}

/// Writes a checkpoint of the current adapters, optimizer and position.
fn write_checkpoint(
    run: &Run,
    stage: &Stage,
    step: usize,
    stage_finished: bool,
    (epoch, pairs_into_epoch): (usize, usize),
    optimizer: &AdamW,
    param_names: &[String],
) -> Result<()> {
    if !run.cluster.is_main() {
        return run.cluster.barrier();
    }
    let mut moments = Vec::with_capacity(2 * param_names.len());
    for (i, (m, v)) in optimizer
        .exp_avg
        .iter()
        .zip(&optimizer.exp_avg_sq)
        .enumerate()
    {
        moments.push((format!("exp_avg.{i}"), m.shallow_clone()));
        moments.push((format!("exp_avg_sq.{i}"), v.shallow_clone()));
    }
    let state = TrainerState {
        version: checkpoint::CHECKPOINT_VERSION,
        stage: stage.number,
        stage_name: stage.name.to_string(),
        step,
        stage_finished,
        epoch,
        pairs_into_epoch,
        optimizer_params: param_names.to_vec(),
        optimizer_steps: optimizer.step,
        model_fingerprint: run.loaded.fingerprint.clone(),
        data_fingerprint: data_fingerprint(run),
        dimensions: run.data.dimensions.clone(),
        config: run.config.result_relevant(),
        world_size: run.cluster.topology.world_size,
    };
    let dir = checkpoint::write_checkpoint(
        &run.checkpoints,
        &run.loaded.adapters,
        &run.meta,
        &moments,
        &state,
    )?;
    tracing::info!(checkpoint = %dir.display(), "checkpoint written");
    run.cluster.barrier()
}

/// Loads a checkpoint's optimizer moments into a fresh optimizer over the same parameters.
fn restore_optimizer(
    optimizer: &mut AdamW,
    param_names: &[String],
    position: &StagePosition,
) -> Result<()> {
    if position.optimizer_params != param_names {
        bail!("the checkpoint's optimizer holds other parameters than this stage trains");
    }
    let _no_grad = tch::no_grad_guard();
    for (i, (m, v)) in optimizer
        .exp_avg
        .iter_mut()
        .zip(optimizer.exp_avg_sq.iter_mut())
        .enumerate()
    {
        for (name, target) in [(format!("exp_avg.{i}"), m), (format!("exp_avg_sq.{i}"), v)] {
            let saved = position
                .optimizer
                .get(&name)
                .with_context(|| format!("checkpoint optimizer lacks `{name}`"))?;
            target.copy_(saved);
        }
    }
    optimizer.step = position.optimizer_steps;
    Ok(())
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
