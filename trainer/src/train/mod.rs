//! The training loop: every stage of the configured method, top to bottom.
//!
//! Per stage: freeze what the stage does not train, build AdamW over the rest, then for each
//! global batch: every micro-batch of this rank runs the stage's passes and backpropagates its
//! share of the loss (`step::accumulate`), gradients are averaged over ranks, clipped, and one
//! optimizer step is taken; metrics go to the log, `metrics.jsonl` and the progress bar. At the
//! end of a stage its adapters are written under the run directory.
//!
//! `train_config` holds the `[train]` section, `stage_setup` what a stage trains on, `resume` the
//! checkpoint side, `records` the metrics lines.

mod records;
mod resume;
mod stage_setup;
mod train_config;

pub use stage_setup::{draw_weights, set_trainable};
pub use train_config::TrainConfig;

use records::{evaluate_held_out, metrics_record};
use resume::{check_resumable, prepare_run_dir, restore_optimizer, write_checkpoint};
use stage_setup::pool_ids;

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde_json::json;
use tch::{Device, Kind, Tensor};

use modpo_launcher::{Collective, Op, Single, Topology};

use crate::checkpoint::{self, AdapterMeta, ADAPTERS_FILE};
use crate::config::RunConfig;
use crate::data::{self, collate, epoch_batches, BatchPlan, PreferenceData};
use crate::eval;
use crate::logps::{BatchTensors, RowLayout};
use crate::method::{stages, Stage};
use crate::model::{self, LoadedModel};
use crate::optim::{learning_rate, AdamW};
use crate::reference::{self, ReferenceLogps};
use crate::step::{self, MicroInputs, Normalisers, StepContext, StepStats};
use crate::tokenizer::ChatTokenizer;

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
    let mut context = StepContext::new(&run.loaded.model, stage.step, config.method.beta, k);
    context.batch_passes = config.method.batch_passes;
    context.recompute_activations = t.recompute_activations;
    let row_layout = RowLayout::new(t.share_prompt);
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
            &run.data.train.pool_by(&pool, row_layout.row_length()),
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
            let norms = Normalisers::of(&pairs, k, world_size);
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
                let tensors = BatchTensors::with_layout(&batch, row_layout, device);
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
