//! The training loop: every stage of the configured method, top to bottom.
//!
//! [`train`] prepares the run directory, loads the run once ([`Run::load`]: model, data),
//! finds where to start (fresh or a checkpoint), gets the reference log-probs
//! ([`Run::load_reference_logps`]) and runs the stages.
//! [`run_stage`] is the loop of one stage: take the next global batch, one optimizer step
//! ([`StepRunner`]: collate, passes, all-reduce, clip, AdamW), then the hooks between steps:
//! the metrics line, held-out evaluation, the stop signal, the replica check and checkpoints.
//!
//! `run` holds what a run loads, `resume` the checkpoint side, `records` the metrics lines,
//! `batches` the stage's data cursor.

mod batches;
mod records;
mod resume;
mod run;

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use tch::Kind;

use modpo_launcher::{Collective, Op, Single, Topology};

use crate::checkpoint::{self, ADAPTERS_FILE};
use crate::config::RunConfig;
use crate::crash_point;
use crate::data::{BatchPlan, TokenizedPair};
use crate::logps::RowLayout;
use crate::method::{stages, Stage};
use crate::optim::learning_rate;
use crate::step::{ReferenceSource, StepRunner, StepSettings};

use batches::StageBatches;
pub(crate) use resume::{check_run_dir_holds, prepare_run_dir, RunIdentity};
use resume::{restore_optimizer, write_checkpoint, StagePosition};
pub(crate) use run::stop_on_signals;
use run::Run;

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
    let opened = resume::open_run_dir(config, config_text, &options, cluster)?;
    let mut run = Run::load(config, cluster)?;
    let plan = stages(config.method.name);
    let (first_stage, mut position) = resume::starting_point(&run, &options, opened, plan.len())?;
    run.load_reference_logps()?;
    // Every rank starts from rank 0's adapters (AdaLoRA's kept masks included), fresh or
    // resumed alike, in the same (name) order everywhere.
    let mut named: Vec<_> = run.loaded.adapters.variables().into_iter().collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    let mut adapter_tensors: Vec<tch::Tensor> = named.into_iter().map(|(_, t)| t).collect();
    tch::no_grad(|| cluster.collective.broadcast(&mut adapter_tensors))
        .context("broadcasting the adapters from rank 0")?;

    let last_stage = options.until_stage.unwrap_or(plan.len()).min(plan.len());
    let adapters = run_dir.join(ADAPTERS_FILE);
    let mut steps = Vec::new();
    for stage in plan
        .iter()
        .filter(|s| (first_stage..=last_stage).contains(&s.number))
    {
        match run_stage(&run, stage, position.take())? {
            StageEnd::Finished(n) => steps.push(n),
            StageEnd::Stopped => {
                return Ok(TrainSummary {
                    run_dir,
                    steps,
                    adapters,
                    last_stage: stage.number - 1,
                    stopped: true,
                })
            }
        }
    }
    if cluster.is_main() && last_stage == plan.len() {
        checkpoint::save_adapters(&adapters, &run.loaded.adapters, &run.meta)?;
        crash_point::reached("final-adapters-written");
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

/// The step settings of this run's config, for a stage of `total_steps` steps.
fn step_settings(config: &RunConfig, total_steps: usize, device: tch::Device) -> StepSettings {
    let t = &config.train;
    StepSettings {
        beta: config.method.beta,
        batch_passes: config.method.batch_passes_on(device),
        recompute_activations: t.recompute_activations,
        split_responses: false,
        row_layout: RowLayout::new(t.share_prompt),
        max_grad_norm: t.max_grad_norm,
        adam: (t.adam_beta1, t.adam_beta2, t.adam_eps, t.weight_decay),
        seed: t.seed,
        weight_sampling: config.method.weight_sampling,
        adalora: config.method.adalora(total_steps),
        length_correction: config.method.length_correction(),
    }
}

/// The stage's step settings and batch split: the config's, or with `train.plan_memory_gib`
/// the memory planner's fastest setting that fits (logged).
fn stage_setting(
    run: &Run,
    stage: &Stage,
    pool: &[usize],
    total_steps: usize,
) -> Result<(StepSettings, BatchPlan)> {
    let config = run.config;
    let world_size = run.cluster.topology.world_size;
    let mut settings = step_settings(config, total_steps, run.loaded.model.embedding_device());
    let Some(gib) = config.train.plan_memory_gib else {
        return Ok((settings, BatchPlan::new(&config.data, world_size)?));
    };
    let pairs: Vec<&TokenizedPair> = pool.iter().map(|&i| &run.data.train.pairs[i]).collect();
    let shape = (
        run.data.dimensions.len(),
        config.data.global_batch,
        world_size,
    );
    let chosen = crate::plan::auto::choose_for_stage(
        &run.loaded.model,
        stage,
        &pairs,
        config.train.share_prompt,
        shape,
        gib,
    )?;
    let s = chosen.setting;
    settings.batch_passes = s.batch_passes;
    settings.recompute_activations = s.recompute;
    tracing::info!(
        stage = stage.number,
        micro_batch = s.micro_batch,
        batch_passes = s.batch_passes,
        recompute_activations = s.recompute,
        predicted_peak_gib = format!("{:.2}", chosen.total as f64 / (1u64 << 30) as f64),
        budget_gib = gib,
        "memory plan"
    );
    let batch_plan =
        BatchPlan::from_factors(config.data.global_batch, s.micro_batch, None, world_size)?;
    Ok((settings, batch_plan))
}

/// Runs one stage (from `position` when resuming within it), with periodic and final
/// checkpoints; returns how it ended.
fn run_stage(run: &Run, stage: &Stage, position: Option<StagePosition>) -> Result<StageEnd> {
    let config = run.config;
    let t = &config.train;
    let topology = run.cluster.topology;
    let pool = stage.pool.pair_ids(&run.data.train.pairs, run.data.seed);
    let total_steps = stage_steps(run, stage)?;
    let (settings, batch_plan) = stage_setting(run, stage, &pool, total_steps)?;
    let mut runner = StepRunner::new(
        &run.loaded.model,
        stage,
        settings,
        run.cluster.collective,
        batch_plan,
        topology.rank,
        run.data.dimensions.len(),
        run.tokenizer.pad_token_id(),
    )?;
    let mut batches = StageBatches::new(
        &run.data.train,
        &pool,
        config,
        stage,
        position.as_ref().map(|p| (p.epoch, p.pairs_into_epoch)),
    );
    let mut step = 0;
    if let Some(p) = &position {
        restore_optimizer(&mut runner, p)?;
        step = p.step;
    }
    let progress = run.progress_bar(stage, total_steps, step);
    tracing::info!(
        stage = stage.number,
        name = stage.name,
        pairs = pool.len(),
        total_steps,
        "stage starts"
    );

    while step < total_steps {
        let Some((epoch, global)) = batches.next() else {
            break;
        };
        let started = Instant::now();
        let lr = learning_rate(
            t.learning_rate,
            t.schedule,
            t.warmup_ratio,
            step,
            total_steps,
        );
        let reference = ReferenceSource::Cached(&run.reference);
        let outcome = runner.step(
            &run.data.train.pairs,
            &global,
            reference,
            step,
            lr,
            &run.stop,
        )?;
        step += 1;
        run.record_step(stage, epoch, step, lr, &outcome, started)?;
        crash_point::reached("step");
        progress.inc(1);

        // Between steps: evaluation, the stop signal (reduced with the step's metrics), the
        // replica check, checkpoints.
        if t.eval_every > 0 && (step % t.eval_every == 0 || step == total_steps) {
            run.record_evaluation(stage, step)?;
        }
        let stop = outcome.stop_requested;
        if t.check_replicas_every > 0 && step % t.check_replicas_every == 0 {
            check_replicas(
                run.cluster.collective,
                &runner.optimizer.params,
                stage.number,
                step,
            )?;
        }
        let periodic = t.checkpoint_every > 0 && step % t.checkpoint_every == 0;
        if step < total_steps && (stop || periodic) {
            write_checkpoint(run, stage, step, false, batches.cursor(), &runner)?;
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
    progress.finish_and_clear();
    write_checkpoint(run, stage, step, true, batches.cursor(), &runner)?;
    tracing::info!(stage = stage.number, steps = step, "stage done");
    crash_point::reached("stage-done");
    Ok(StageEnd::Finished(step))
}

/// Optimizer steps of `stage`: whole global batches over its pool, `train.epochs` times or
/// its share of `train.pair_passes`, at most `train.max_steps`.
fn stage_steps(run: &Run, stage: &Stage) -> Result<usize> {
    let config = run.config;
    let batch = config.data.global_batch;
    let k = run.data.dimensions.len();
    let steps_per_epoch = |s: &Stage| -> Result<usize> {
        let pool_pairs = s.pool.pair_ids(&run.data.train.pairs, run.data.seed).len();
        if pool_pairs < batch {
            bail!(
                "stage {} ({}) has {pool_pairs} training pairs, fewer than data.global_batch = {batch}",
                s.number,
                s.name,
            );
        }
        Ok(pool_pairs / batch)
    };
    let t = &config.train;
    let steps = match t.pair_passes {
        None => steps_per_epoch(stage)? * t.epochs,
        Some(budget) => {
            let epoch_cost =
                |s: &Stage| -> Result<usize> { Ok(steps_per_epoch(s)? * batch * s.step.passes(k)) };
            let mut epoch_costs = Vec::new();
            for s in &stages(config.method.name) {
                epoch_costs.push(epoch_cost(s)?);
            }
            let stage_cost = batch * stage.step.passes(k);
            steps_from_budget(budget, &epoch_costs, stage.number - 1, stage_cost)
        }
    };
    Ok(steps.min(t.max_steps.unwrap_or(usize::MAX)))
}

/// Steps of stage `stage` (0-based) under a budget of `budget` pair-passes: its share of the
/// budget is its share of one epoch of every stage (`epoch_costs`, in pair-passes), divided
/// by what one of its steps costs, rounded, at least one step.
fn steps_from_budget(
    budget: usize,
    epoch_costs: &[usize],
    stage: usize,
    step_cost: usize,
) -> usize {
    let all_stages: usize = epoch_costs.iter().sum();
    let share = budget as f64 * epoch_costs[stage] as f64 / all_stages as f64;
    ((share / step_cost as f64).round() as usize).max(1)
}

/// Verifies every rank holds the same trainable parameters: three sums over all of them
/// (plain, squared, position-weighted) must be bit-identical on every rank.
fn check_replicas(
    collective: &dyn Collective,
    params: &[tch::Tensor],
    stage: usize,
    step: usize,
) -> Result<()> {
    let _no_grad = tch::no_grad_guard();
    let mut sums = [0f64; 3];
    for p in params {
        let flat = p.detach().to_kind(Kind::Double).reshape([-1]);
        let positions = tch::Tensor::arange(flat.size()[0], (Kind::Double, flat.device())) / 1024.0;
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

#[cfg(test)]
mod tests {
    use super::steps_from_budget;

    /// The demo's default, easy-hard with k = 2: 2000 pairs, 400 conflict, global batch 16.
    /// One epoch of each curriculum stage: stage 1 over the 1600 agree pairs, 100 steps of
    /// 16 x 1 passes = 1600 pair-passes; stage 2 over the 400 conflict pairs, 25 steps of
    /// 16 x 2 = 800; stage 3 over 400 agree + 400 conflict, 50 steps of 16 x 3 = 2400; 4800
    /// in all. A budget of 6000 (one Panacea epoch, 2000 x 3) gives stage 1 6000 x 1600 / 4800
    /// = 2000 pair-passes = 125 steps, stage 2 1000 / 32 = 31.25 -> 31 steps, stage 3
    /// 3000 / 48 = 62.5 -> 63 steps (f64::round rounds half away from zero).
    #[test]
    fn a_budget_is_shared_as_one_epoch_of_each_stage_would() {
        let epochs = [1600, 800, 2400];
        assert_eq!(steps_from_budget(6000, &epochs, 0, 16), 125);
        assert_eq!(steps_from_budget(6000, &epochs, 1, 32), 31);
        assert_eq!(steps_from_budget(6000, &epochs, 2, 48), 63);
        // DPO-Soup, one stage over all 2000 pairs at k = 2 passes: 6000 / 32 = 187.5 -> 188.
        assert_eq!(steps_from_budget(6000, &[4000], 0, 32), 188);
        // A tiny budget still takes a step.
        assert_eq!(steps_from_budget(1, &epochs, 1, 32), 1);
    }
}
