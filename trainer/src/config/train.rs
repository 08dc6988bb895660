//! `[train]`: the optimisation settings and where the run is written, validated once. It is
//! the run's own section, so it lives beside the run config that assembles the others.

use std::path::PathBuf;

use modpo_launcher::CollectiveChoice;
use serde::{Deserialize, Serialize};

use crate::invalid_key::InvalidKey;
use crate::optim::Schedule;

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
    /// A compute budget for the whole run in pair-passes (one forward and backward of one pair
    /// under one `w`), instead of `epochs`: each stage gets the share of the budget that it
    /// takes of one epoch of every stage, so methods can be compared at equal compute while the
    /// curriculum keeps its one-epoch balance between stages. A stage of s passes per step
    /// then runs round(share / (global_batch x s)) steps, at least one.
    #[serde(default)]
    pub pair_passes: Option<usize>,
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
    /// Recompute each decoder block's activations in the backward instead of keeping them:
    /// about a third more compute for activation memory of one block plus the block inputs
    /// (long sequences, big models).
    #[serde(default)]
    pub recompute_activations: bool,
    /// Put both responses of a pair in one row after a single copy of the prompt, so the
    /// prompt goes through the model once per pass instead of twice (same log-probabilities
    /// and gradients; false: a row per response, as TRL does).
    #[serde(default = "defaults::share_prompt")]
    pub share_prompt: bool,
    /// Periodic checkpoints kept (the newest); stage-final ones are always kept.
    #[serde(default = "defaults::keep_checkpoints")]
    pub keep_checkpoints: usize,
    /// Memory of one device in GiB: each stage then runs the fastest setting the memory
    /// planner predicts to fit (`modpo-trainer plan`: micro-batch, passes batched or one by
    /// one, recomputation) for the stage's longest pair, in place of `data.micro_batch`,
    /// `method.batch_passes` and `recompute_activations`, and logs it. The update is the same
    /// for any of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan_memory_gib: Option<f64>,
}

mod defaults {
    pub fn share_prompt() -> bool {
        true
    }
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
    pub fn collective_choice(&self) -> Result<CollectiveChoice, InvalidKey> {
        self.collective.parse().map_err(|e| InvalidKey {
            key: "train.collective".into(),
            message: format!("train.collective: {e}"),
        })
    }

    pub fn validate(&self) -> Result<(), InvalidKey> {
        let invalid = |key: &str, rule: String| Err(InvalidKey::new("train", key, rule));
        let positive = |v: f64| v > 0.0 && v.is_finite();
        if !positive(self.learning_rate) {
            let rate = self.learning_rate;
            return invalid(
                "learning_rate",
                format!("must be a positive number, got {rate}"),
            );
        }
        if !(0.0..1.0).contains(&self.warmup_ratio) {
            let ratio = self.warmup_ratio;
            return invalid("warmup_ratio", format!("must be in [0, 1), got {ratio}"));
        }
        if !(self.weight_decay >= 0.0 && self.weight_decay.is_finite()) {
            let decay = self.weight_decay;
            return invalid("weight_decay", format!("must be >= 0, got {decay}"));
        }
        if !(self.max_grad_norm >= 0.0 && self.max_grad_norm.is_finite()) {
            let norm = self.max_grad_norm;
            let rule = format!("must be >= 0 (0 disables clipping), got {norm}");
            return invalid("max_grad_norm", rule);
        }
        for (key, beta) in [
            ("adam_beta1", self.adam_beta1),
            ("adam_beta2", self.adam_beta2),
        ] {
            if !(0.0..1.0).contains(&beta) {
                return invalid(key, format!("must be in [0, 1), got {beta}"));
            }
        }
        if !positive(self.adam_eps) {
            let eps = self.adam_eps;
            return invalid("adam_eps", format!("must be positive, got {eps}"));
        }
        if self.epochs == 0 {
            return invalid("epochs", "must be at least 1".into());
        }
        self.collective_choice()?;
        if self.keep_checkpoints == 0 {
            return invalid("keep_checkpoints", "must be at least 1".into());
        }
        if self.pair_passes == Some(0) {
            return invalid("pair_passes", "must be at least 1 when given".into());
        }
        if self.pair_passes.is_some() && self.epochs != defaults::epochs() {
            let rule = "give epochs or pair_passes, not both (the budget sets each stage's steps)";
            return invalid("pair_passes", rule.into());
        }
        if self
            .plan_memory_gib
            .is_some_and(|gib| !(gib > 0.0 && gib.is_finite()))
        {
            let rule = "must be a positive number of GiB when given";
            return invalid("plan_memory_gib", rule.into());
        }
        if self.max_steps == Some(0) {
            return invalid("max_steps", "must be at least 1 when given".into());
        }
        Ok(())
    }
}
