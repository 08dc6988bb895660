//! Checkpoints from the loop's side: the run directory of a new or resumed run, where a run
//! starts, what a checkpoint of this run holds, whether one may resume it, and putting the
//! optimizer back as it was.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tch::Tensor;

use super::run::Run;
use super::{Cluster, TrainOptions};
use crate::checkpoint::{self, write_atomically, TrainerState, ADAPTERS_FILE};
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

/// Whether `train` found a run in its directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Opened {
    /// A new run: its config was just written.
    New,
    /// The directory holds a run, checked to be this one in [`starting_point`].
    Existing,
}

/// A fresh run gets a new directory with its config (as given and resolved); a resumed one
/// finds its run there. `--resume` where there is no run yet (a run killed before it wrote
/// its config, or a job script that always passes `--resume`) starts a new one;
/// `--resume-from-stage` needs the run.
pub(super) fn open_run_dir(
    config: &RunConfig,
    config_text: &str,
    options: &TrainOptions,
    cluster: &Cluster,
) -> Result<Opened> {
    let run_dir = &config.train.output_dir;
    let resuming = options.resume || options.resume_from_stage.is_some();
    let holds_run = run_dir.join("config.toml").is_file();
    let opened = match (resuming, holds_run) {
        (false, _) => Opened::New,
        (true, true) => Opened::Existing,
        (true, false) if options.resume_from_stage.is_none() => {
            tracing::info!("{} holds no run yet: starting a new one", run_dir.display());
            Opened::New
        }
        (true, false) => bail!("nothing to resume: {} holds no run", run_dir.display()),
    };
    // Every rank has looked before rank 0 writes anything.
    cluster.barrier()?;
    if cluster.is_main() {
        match opened {
            Opened::New => {
                prepare_run_dir(run_dir)?;
                write_atomically(&run_dir.join("config.toml"), config_text.as_bytes())?;
                let resolved = serde_json::to_string_pretty(config)?;
                write_atomically(&run_dir.join(RESOLVED_CONFIG_FILE), resolved.as_bytes())?;
            }
            Opened::Existing => {
                checkpoint::remove_unfinished_checkpoints(&checkpoint::checkpoints_dir(run_dir))?
            }
        }
    }
    cluster.barrier()?;
    Ok(opened)
}

/// The checkpoint `options` ask to resume from, if any: `--resume` finding no valid one is not
/// an error (the run starts from its beginning), `--resume-from-stage` is.
fn resume_checkpoint(
    options: &TrainOptions,
    checkpoints: &Path,
) -> Result<Option<(PathBuf, TrainerState)>> {
    Ok(match (options.resume_from_stage, options.resume) {
        (Some(1), _) => {
            bail!("--resume-from-stage 1 is a fresh start: train into a new output_dir instead")
        }
        (Some(stage), _) => Some(checkpoint::stage_final_checkpoint(checkpoints, stage - 1)?),
        (None, true) => checkpoint::latest_valid_checkpoint(checkpoints)?,
        (None, false) => None,
    })
}

/// The first stage to run and, when resuming inside it, the position: stage 1 from the start,
/// or after the checkpoint `options` name (whose adapters are loaded into the run's model).
///
/// A run directory resumed without a valid checkpoint must hold this run (its
/// [`RunIdentity`], or before that was written its config) and starts from the beginning,
/// reusing the reference cache. A new or restarted run records its identity first.
pub(super) fn starting_point(
    run: &Run,
    options: &TrainOptions,
    opened: Opened,
    stages: usize,
) -> Result<(usize, Option<StagePosition>)> {
    let found = match opened {
        Opened::New => None,
        Opened::Existing => resume_checkpoint(options, &run.checkpoints)?,
    };
    let Some((dir, state)) = found else {
        if opened == Opened::Existing {
            check_run_dir_holds_this_run(run)?;
            tracing::info!(
                "no valid checkpoint in {}: starting the run from its beginning",
                run.checkpoints.display()
            );
            run.write_metrics(&json!({"event": "restarted", "reason": "no valid checkpoint"}))?;
        }
        if run.cluster.is_main() {
            RunIdentity::of(run).record(&run.config.train.output_dir)?;
        }
        run.cluster.barrier()?;
        return Ok((1, None));
    };
    RunIdentity::of(run).check_checkpoint(&dir, &state)?;
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

/// What makes a run this run: the model, the tokenized training data, the dimensions and the
/// result-relevant config. A checkpoint's state holds it; before the first checkpoint the run
/// directory's `run_identity.json` does. `train-rm` checks its runs the same way.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct RunIdentity {
    model_fingerprint: String,
    data_fingerprint: String,
    dimensions: Vec<String>,
    config: serde_json::Value,
}

const IDENTITY_FILE: &str = "run_identity.json";

impl RunIdentity {
    /// `data_fingerprint`: [`reference::cache_key`] of the training pairs; `config`: the
    /// result-relevant config ([`config::result_relevant`]).
    pub(crate) fn new(
        model_fingerprint: &str,
        data_fingerprint: String,
        dimensions: &[String],
        config: serde_json::Value,
    ) -> Self {
        RunIdentity {
            model_fingerprint: model_fingerprint.to_string(),
            data_fingerprint,
            dimensions: dimensions.to_vec(),
            config,
        }
    }

    pub(crate) fn data_fingerprint(&self) -> &str {
        &self.data_fingerprint
    }

    pub(crate) fn config(&self) -> &serde_json::Value {
        &self.config
    }

    fn of(run: &Run) -> Self {
        Self::new(
            &run.loaded.fingerprint,
            data_fingerprint(run),
            &run.data.dimensions,
            run.config.result_relevant(),
        )
    }

    /// Writes `run_identity.json` into `run_dir` (rank 0, once a run starts from its
    /// beginning).
    pub(crate) fn record(&self, run_dir: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self)?;
        write_atomically(&run_dir.join(IDENTITY_FILE), text.as_bytes())?;
        Ok(())
    }

    /// Refuses the checkpoint `dir` (its `state`) unless it is of this run, listing every
    /// difference.
    pub(crate) fn check_checkpoint(&self, dir: &Path, state: &TrainerState) -> Result<()> {
        let problems = RunIdentity::of_checkpoint(state).differences(self);
        if !problems.is_empty() {
            bail!(
                "checkpoint {} belongs to a different run:\n  {}",
                dir.display(),
                problems.join("\n  ")
            );
        }
        Ok(())
    }

    fn of_checkpoint(state: &TrainerState) -> Self {
        RunIdentity {
            model_fingerprint: state.model_fingerprint.clone(),
            data_fingerprint: state.data_fingerprint.clone(),
            dimensions: state.dimensions.clone(),
            config: state.config.clone(),
        }
    }

    /// Every way `now` differs from this recorded run, one line each.
    fn differences(&self, now: &RunIdentity) -> Vec<String> {
        let mut problems = Vec::new();
        if self.model_fingerprint != now.model_fingerprint {
            problems.push(format!(
                "model: fingerprint {} -> {}",
                self.model_fingerprint, now.model_fingerprint
            ));
        }
        if self.data_fingerprint != now.data_fingerprint {
            problems.push("training data: the tokenized pairs differ (data file, tokenizer, template or max_length)".into());
        }
        if self.dimensions != now.dimensions {
            problems.push(format!(
                "dimensions: {:?} -> {:?}",
                self.dimensions, now.dimensions
            ));
        }
        problems.extend(config::differences(&self.config, &now.config));
        problems
    }
}

/// A run directory without a valid checkpoint resumes only if it holds this run: the same
/// [`RunIdentity`], or, killed before that was written, the same result-relevant config. The
/// error lists every difference, as for a checkpoint.
fn check_run_dir_holds_this_run(run: &Run) -> Result<()> {
    check_run_dir_holds(&run.config.train.output_dir, &RunIdentity::of(run))
}

/// [`check_run_dir_holds_this_run`] for any run directory and identity (also `train-rm`'s).
pub(crate) fn check_run_dir_holds(run_dir: &Path, now: &RunIdentity) -> Result<()> {
    let identity_path = run_dir.join(IDENTITY_FILE);
    let (file, problems) = match std::fs::read_to_string(&identity_path) {
        Ok(text) => {
            let recorded: RunIdentity = serde_json::from_str(&text)
                .with_context(|| format!("{} is not a run identity", identity_path.display()))?;
            (IDENTITY_FILE, recorded.differences(now))
        }
        Err(_) => {
            let path = run_dir.join(RESOLVED_CONFIG_FILE);
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            let saved: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("{} is not JSON", path.display()))?;
            let problems = config::differences(&config::result_relevant(saved), &now.config);
            (RESOLVED_CONFIG_FILE, problems)
        }
    };
    if !problems.is_empty() {
        bail!(
            "run directory {} belongs to a different run (by its {file}):\n  {}",
            run_dir.display(),
            problems.join("\n  ")
        );
    }
    Ok(())
}

/// A new run never writes into a directory that holds a previous run's files (`train` and
/// `train-rm`).
pub(crate) fn prepare_run_dir(dir: &Path) -> Result<()> {
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
    let mut moments = optimizer.moments();
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
    )
    .with_context(|| {
        let name = checkpoint::checkpoint_name(stage.number, step, stage_finished);
        let target = run.checkpoints.join(name);
        format!(
            "cannot write checkpoint {} (the previous one stays valid)",
            target.display()
        )
    })?;
    tracing::info!(checkpoint = %dir.display(), "checkpoint written");
    run.cluster.barrier()
}

/// Loads a checkpoint's optimizer moments (and rank-allocation averages) into a fresh runner
/// over the same parameters.
pub(super) fn restore_optimizer(runner: &mut StepRunner, position: &StagePosition) -> Result<()> {
    if position.optimizer_params != runner.param_names {
        bail!("the checkpoint's optimizer holds other parameters than this stage trains");
    }
    runner
        .optimizer
        .restore_moments(&position.optimizer, position.optimizer_steps)?;
    let _no_grad = tch::no_grad_guard();
    if let Some(allocator) = &mut runner.rank_allocator {
        allocator.restore(&position.optimizer)?;
    }
    Ok(())
}
