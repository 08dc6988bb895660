//! `train-rm`'s checkpoints and `--resume`, on the training run's machinery: the run directory
//! (`train::prepare_run_dir`), the identity a checkpoint must match (`train::RunIdentity`: the
//! model's fingerprint, the tokenized training pairs, the dimensions and the result-relevant
//! config, each difference named), and the checkpoint files (`checkpoint::write_checkpoint_of`:
//! written into a temporary directory, checksummed, renamed into place, `latest` last; the
//! newest that verifies is resumed, older periodic ones pruned to `train.keep_checkpoints`).
//!
//! A reward model checkpoint is a training checkpoint of one stage (`reward-model`): its
//! `adapters.safetensors` holds the head (`head.weight`, `head.bias`) and, with LoRA, the
//! adapters (`adapters.<name>`); `optimizer.safetensors` the AdamW moments; `state.json` the
//! position (step, epoch, pairs of the epoch consumed). The loop has no randomness after the
//! initialisation (the batch order is a function of the data seed and the epoch), so the
//! position is the whole state: a resumed run ends bit for bit where an uninterrupted one does.

use std::collections::HashMap;

use anyhow::{bail, Context, Result};
use serde_json::json;
use tch::Tensor;

use super::config::RewardModelConfig;
use super::lora_spec;
use super::train::RewardRun;
use crate::checkpoint::{self, write_atomically, AdapterMeta, TrainerState, ADAPTERS_FILE};
use crate::config::result_relevant;
use crate::optim::AdamW;
use crate::reference;
use crate::saved_run::RESOLVED_CONFIG_FILE;
use crate::train::{check_run_dir_holds, prepare_run_dir, Cluster, RunIdentity};

/// The stage name of a reward model checkpoint.
const STAGE_NAME: &str = "reward-model";

/// Where a resumed run continues.
pub(super) struct Position {
    pub step: usize,
    pub epoch: usize,
    pub pairs_into_epoch: usize,
    /// The run's final checkpoint: training is done, only the held-out accuracy remains.
    pub finished: bool,
}

/// A new run gets a fresh directory with its config; `resume` on a directory holding a run
/// (its `config.toml`) continues it, and on one holding none starts a new run. Returns
/// whether the run existed.
pub(super) fn open_run_dir(
    config: &RewardModelConfig,
    config_text: &str,
    resume: bool,
    cluster: &Cluster,
) -> Result<bool> {
    let dir = &config.train.output_dir;
    let existing = resume && dir.join("config.toml").is_file();
    if resume && !existing {
        tracing::info!("{} holds no run yet: starting a new one", dir.display());
    }
    cluster.collective.barrier().context("barrier")?;
    if cluster.topology.rank == 0 {
        if existing {
            checkpoint::remove_unfinished_checkpoints(&checkpoint::checkpoints_dir(dir))?;
        } else {
            prepare_run_dir(dir)?;
            write_atomically(&dir.join("config.toml"), config_text.as_bytes())?;
            let resolved = serde_json::to_string_pretty(config)?;
            write_atomically(&dir.join(RESOLVED_CONFIG_FILE), resolved.as_bytes())?;
        }
    }
    cluster.collective.barrier().context("barrier")?;
    Ok(existing)
}

/// The head's and the adapters' variables by their checkpoint names, sorted by name: the
/// order of the optimizer's parameters.
pub(super) fn trainable_in_order(run: &RewardRun) -> Vec<(String, Tensor)> {
    let mut named: Vec<(String, Tensor)> = trainable(run).into_iter().collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    named
}

fn trainable(run: &RewardRun) -> HashMap<String, Tensor> {
    let mut named = run.head_store.variables();
    named.extend(
        run.loaded
            .adapters
            .variables()
            .into_iter()
            .map(|(name, t)| (format!("adapters.{name}"), t)),
    );
    named
}

fn identity(run: &RewardRun) -> Result<RunIdentity> {
    let data = reference::cache_key(
        &run.loaded.fingerprint,
        run.loaded.model.kind(),
        &run.data.train.pairs,
    );
    let config = result_relevant(serde_json::to_value(run.config)?);
    Ok(RunIdentity::new(
        &run.loaded.fingerprint,
        data,
        &run.data.dimensions,
        config,
    ))
}

/// Where the run starts: `None`, from the beginning (a new run, or an existing one without a
/// valid checkpoint, which must hold this run); or the latest valid checkpoint, checked to be
/// of this run, loaded into the head, adapters and `optimizer` (whose parameters are `names`).
pub(super) fn starting_point(
    run: &RewardRun,
    optimizer: &mut AdamW,
    names: &[String],
    existing: bool,
) -> Result<Option<Position>> {
    let run_dir = &run.config.train.output_dir;
    let now = identity(run)?;
    let found = match existing {
        true => checkpoint::latest_valid_checkpoint(&checkpoint::checkpoints_dir(run_dir))?,
        false => None,
    };
    let Some((dir, state)) = found else {
        if existing {
            check_run_dir_holds(run_dir, &now)?;
            tracing::info!("no valid checkpoint: starting the run from its beginning");
            run.write_metrics(&json!({"event": "restarted", "reason": "no valid checkpoint"}))?;
        }
        if run.cluster.topology.rank == 0 {
            now.record(run_dir)?;
        }
        run.cluster.collective.barrier().context("barrier")?;
        return Ok(None);
    };
    now.check_checkpoint(&dir, &state)?;
    if state.optimizer_params != names {
        bail!(
            "checkpoint {}: its optimizer holds other parameters than this reward model trains",
            dir.display()
        );
    }
    checkpoint::load_tensors(&dir.join(ADAPTERS_FILE), &trainable(run))?;
    optimizer.restore_moments(
        &checkpoint::read_optimizer_state(&dir)?,
        state.optimizer_steps,
    )?;
    tracing::info!(checkpoint = %dir.display(), step = state.step, "resuming");
    run.write_metrics(
        &json!({"event": "resumed", "checkpoint": dir.display().to_string(),
                              "step": state.step}),
    )?;
    Ok(Some(Position {
        step: state.step,
        epoch: state.epoch,
        pairs_into_epoch: state.pairs_into_epoch,
        finished: state.stage_finished,
    }))
}

/// Writes a checkpoint after `step` steps (rank 0; every rank waits for it), then prunes the
/// periodic ones beyond `train.keep_checkpoints`.
pub(super) fn write_checkpoint(
    run: &RewardRun,
    optimizer: &AdamW,
    names: &[String],
    step: usize,
    finished: bool,
    (epoch, pairs_into_epoch): (usize, usize),
) -> Result<()> {
    let cluster = run.cluster;
    if cluster.topology.rank == 0 {
        let config = run.config;
        let now = identity(run)?;
        let rm = &config.reward_model;
        let state = TrainerState {
            version: checkpoint::CHECKPOINT_VERSION,
            stage: 1,
            stage_name: STAGE_NAME.into(),
            step,
            stage_finished: finished,
            epoch,
            pairs_into_epoch,
            optimizer_params: names.to_vec(),
            optimizer_steps: optimizer.step,
            model_fingerprint: run.loaded.fingerprint.clone(),
            data_fingerprint: now.data_fingerprint().to_string(),
            dimensions: run.data.dimensions.clone(),
            config: now.config().clone(),
            world_size: cluster.topology.world_size,
        };
        // The adapter metadata describes the base and the LoRA settings (for a frozen base,
        // the unused ones of the config); the file also holds the head.
        let meta = AdapterMeta::new(
            &config.model.path,
            &run.loaded.fingerprint,
            &run.data.dimensions,
            &lora_spec(rm.rank, rm.alpha),
        );
        let checkpoints = checkpoint::checkpoints_dir(&config.train.output_dir);
        let dir = checkpoint::write_checkpoint_of(
            &checkpoints,
            &trainable(run),
            &meta,
            &optimizer.moments(),
            &state,
        )
        .context("cannot write the reward model's checkpoint (the previous one stays valid)")?;
        tracing::info!(checkpoint = %dir.display(), "checkpoint written");
        checkpoint::prune_checkpoints(&checkpoints, config.train.keep_checkpoints)?;
    }
    cluster.collective.barrier().context("barrier")
}
