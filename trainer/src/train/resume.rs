//! Checkpoints from the loop's side: the run directory of a new or resumed run, where a run
//! starts, what a checkpoint of this run holds, whether one may resume it, and putting the
//! optimizer back as it was.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde_json::json;
use tch::Tensor;

use super::run::Run;
use super::{Cluster, TrainOptions};
use crate::checkpoint::{self, TrainerState, ADAPTERS_FILE};
use crate::config::{self, RunConfig};
use crate::method::Stage;
use crate::reference;
use crate::saved_run::RESOLVED_CONFIG_FILE;
use crate::step::StepRunner;

/// Where a stage resumes within itself.
pub(super) struct StagePosition {
    pub step: usize,
    pub epoch: usize,
    pub pairs_into_epoch: usize,
    optimizer: HashMap<String, Tensor>,
    optimizer_steps: i64,
    optimizer_params: Vec<String>,
}

/// A fresh run gets a new directory with its config (as given and resolved); a resumed one
/// must find its run there.
pub(super) fn open_run_dir(
    config: &RunConfig,
    config_text: &str,
    options: &TrainOptions,
    cluster: &Cluster,
) -> Result<()> {
    let run_dir = &config.train.output_dir;
    if options.resume || options.resume_from_stage.is_some() {
        if !run_dir.join("config.toml").is_file() {
            bail!("nothing to resume: {} holds no run", run_dir.display());
        }
    } else if cluster.is_main() {
        prepare_run_dir(run_dir)?;
        std::fs::write(run_dir.join("config.toml"), config_text)?;
        std::fs::write(
            run_dir.join(RESOLVED_CONFIG_FILE),
            serde_json::to_string_pretty(config)?,
        )?;
    }
    cluster.barrier()
}

/// The checkpoint `options` ask to resume from, if any.
fn resume_checkpoint(
    options: &TrainOptions,
    checkpoints: &Path,
) -> Result<Option<(PathBuf, TrainerState)>> {
    Ok(match (options.resume_from_stage, options.resume) {
        (Some(1), _) => {
            bail!("--resume-from-stage 1 is a fresh start: train into a new output_dir instead")
        }
        (Some(stage), _) => Some(checkpoint::stage_final_checkpoint(checkpoints, stage - 1)?),
        (None, true) => Some(
            checkpoint::latest_valid_checkpoint(checkpoints)?
                .with_context(|| format!("no valid checkpoint in {}", checkpoints.display()))?,
        ),
        (None, false) => None,
    })
}

/// The first stage to run and, when resuming inside it, the position: stage 1 from the start,
/// or after the checkpoint `options` name (whose adapters are loaded into the run's model).
pub(super) fn starting_point(
    run: &Run,
    options: &TrainOptions,
    stages: usize,
) -> Result<(usize, Option<StagePosition>)> {
    let Some((dir, state)) = resume_checkpoint(options, &run.checkpoints)? else {
        return Ok((1, None));
    };
    check_resumable(run, &state, &dir)?;
    checkpoint::load_adapters(&dir.join(ADAPTERS_FILE), &run.loaded.adapters)?;
    let (first_stage, position) = match state.stage_finished {
        true => (state.stage + 1, None),
        false => (
            state.stage,
            Some(StagePosition {
                step: state.step,
                epoch: state.epoch,
                pairs_into_epoch: state.pairs_into_epoch,
                optimizer: checkpoint::read_optimizer_state(&dir)?,
                optimizer_steps: state.optimizer_steps,
                optimizer_params: state.optimizer_params.clone(),
            }),
        ),
    };
    if first_stage > stages && options.resume_from_stage.is_some() {
        bail!("the method has {stages} stages; there is no stage {first_stage}");
    }
    tracing::info!(checkpoint = %dir.display(), stage = first_stage, step = state.step, "resuming");
    run.write_metrics(
        &json!({"event": "resumed", "checkpoint": dir.display().to_string(),
                              "stage": state.stage, "step": state.step}),
    )?;
    Ok((first_stage, position))
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

/// Writes a checkpoint of the current adapters, optimizer and position.
pub(super) fn write_checkpoint(
    run: &Run,
    stage: &Stage,
    step: usize,
    stage_finished: bool,
    (epoch, pairs_into_epoch): (usize, usize),
    runner: &StepRunner,
) -> Result<()> {
    let (optimizer, param_names) = (&runner.optimizer, &runner.param_names);
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
    if let Some(allocator) = &runner.rank_allocator {
        moments.extend(allocator.state());
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

/// Loads a checkpoint's optimizer moments (and rank-allocation averages) into a fresh runner
/// over the same parameters.
pub(super) fn restore_optimizer(runner: &mut StepRunner, position: &StagePosition) -> Result<()> {
    if position.optimizer_params != runner.param_names {
        bail!("the checkpoint's optimizer holds other parameters than this stage trains");
    }
    let _no_grad = tch::no_grad_guard();
    let optimizer = &mut runner.optimizer;
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
    if let Some(allocator) = &mut runner.rank_allocator {
        allocator.restore(&position.optimizer)?;
    }
    Ok(())
}
