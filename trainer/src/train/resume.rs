//! Checkpoints from the loop's side: what a checkpoint of this run holds, whether one may
//! resume it, and putting the optimizer back as it was.

use std::path::Path;

use anyhow::{bail, Context, Result};

use super::{Run, StagePosition};
use crate::checkpoint::{self, TrainerState};
use crate::config;
use crate::method::Stage;
use crate::optim::AdamW;
use crate::reference;

pub(super) fn data_fingerprint(run: &Run) -> String {
    reference::cache_key(
        &run.loaded.fingerprint,
        run.loaded.model.kind(),
        &run.data.train.pairs,
    )
}

/// A checkpoint resumes this run only if it was written for the same model, dimensions and
/// result-relevant config; the error lists every difference.
pub(super) fn check_resumable(run: &Run, state: &TrainerState, dir: &Path) -> Result<()> {
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
pub(super) fn prepare_run_dir(dir: &Path) -> Result<()> {
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
pub(super) fn restore_optimizer(
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
