//! The three methods as plans: which stages run, on which pairs, training which adapters, with
//! which passes and loss per step (METHOD.md sections 4 and 5). The training loop executes a
//! plan and knows no method by name.

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use crate::model::AdapterSpec;

/// `[method]` `name`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MethodName {
    /// The proposed three-stage curriculum.
    Curriculum,
    /// Joint training of the k + 1 adapters with linear scalarisation.
    Panacea,
    /// k independent adapters, souped at inference.
    DpoSoup,
}

/// How the preference weight of a drawn pass is sampled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum WeightSampling {
    /// One w ~ Dirichlet(1) per pair (our default; passes with different w share a forward).
    #[default]
    PerRow,
    /// One w ~ Dirichlet(1) per optimizer step, as in the paper.
    PerStep,
}

/// `[method]`: the method and its hyperparameters.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MethodConfig {
    pub name: MethodName,
    /// DPO temperature beta.
    #[serde(default = "default_beta")]
    pub beta: f64,
    /// LoRA rank r of every block; default 8 (16 for dpo-soup).
    #[serde(default)]
    pub rank: Option<i64>,
    /// LoRA alpha; default 16 (32 for dpo-soup).
    #[serde(default)]
    pub alpha: Option<f64>,
    #[serde(default)]
    pub weight_sampling: WeightSampling,
    /// Run the passes of a step as one forward with rows replicated and per-row w (faster,
    /// (passes)x activation memory) instead of forward+backward pass by pass.
    #[serde(default = "default_true")]
    pub batch_passes: bool,
}

fn default_beta() -> f64 {
    0.01
}

fn default_true() -> bool {
    true
}

impl MethodConfig {
    pub fn validate(&self) -> Result<()> {
        if !(self.beta > 0.0 && self.beta.is_finite()) {
            bail!("method.beta must be a positive number, got {}", self.beta);
        }
        if let Some(r) = self.rank {
            if r <= 0 {
                bail!("method.rank must be positive, got {r}");
            }
        }
        if let Some(a) = self.alpha {
            if !(a > 0.0 && a.is_finite()) {
                bail!("method.alpha must be a positive number, got {a}");
            }
        }
        Ok(())
    }

    /// The adapters the method trains, for k dimensions.
    pub fn adapter_spec(&self, num_dimensions: usize) -> AdapterSpec {
        let soup = self.name == MethodName::DpoSoup;
        AdapterSpec {
            rank: self.rank.unwrap_or(if soup { 16 } else { 8 }),
            alpha: self.alpha.unwrap_or(if soup { 32.0 } else { 16.0 }),
            num_dimensions: num_dimensions as i64,
            shared: !soup,
        }
    }
}

/// Which training pairs a stage draws its batches from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum PairPool {
    Agree,
    Conflict,
    /// `D_agree,sub` (|D_conflict| agree pairs drawn with the seed) plus `D_conflict`.
    AgreeSubsetAndConflict,
    /// Every training pair.
    All,
}

/// Which adapter parameters a stage trains; the rest are frozen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Trainable {
    /// psi: the shared block.
    Shared,
    /// phi_1..phi_k: the dimension blocks.
    Dimensions,
    All,
}

/// The passes of one step and the loss each contributes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum StepPlan {
    /// Stage 1: one pass at w = 0 (shared block only); DPO on the preference all dimensions
    /// share.
    SharedDpo,
    /// k passes at w = 1_i; sum_i L_DPO,i (pass i only moves h_0 and h_i).
    PerDimensionDpo,
    /// The k passes of `PerDimensionDpo`, then one at w ~ Dirichlet(1) with the Bernoulli KL
    /// loss whose teacher is built from the k passes' detached margins.
    PerDimensionDpoAndKl,
    /// Panacea: the k passes at 1_i (where L_LS(1_i) = L_DPO,i) plus one at a drawn w with
    /// L_LS(w).
    PerDimensionDpoAndLinearScalarisation,
}

impl StepPlan {
    /// Passes per step for k dimensions.
    pub fn passes(self, k: usize) -> usize {
        match self {
            StepPlan::SharedDpo => 1,
            StepPlan::PerDimensionDpo => k,
            StepPlan::PerDimensionDpoAndKl | StepPlan::PerDimensionDpoAndLinearScalarisation => {
                k + 1
            }
        }
    }

    /// Whether the last pass uses a drawn weight vector.
    pub fn draws_weights(self) -> bool {
        self.passes(1) == 2
    }
}

/// One stage of a method.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Stage {
    /// 1-based, as in the paper.
    pub number: usize,
    pub name: &'static str,
    pub pool: PairPool,
    pub trainable: Trainable,
    pub step: StepPlan,
}

/// The stages of a method, in order.
pub fn stages(method: MethodName) -> Vec<Stage> {
    match method {
        MethodName::Curriculum => vec![
            Stage {
                number: 1,
                name: "general",
                pool: PairPool::Agree,
                trainable: Trainable::Shared,
                step: StepPlan::SharedDpo,
            },
            Stage {
                number: 2,
                name: "dimension-specific",
                pool: PairPool::Conflict,
                trainable: Trainable::Dimensions,
                step: StepPlan::PerDimensionDpo,
            },
            Stage {
                number: 3,
                name: "conditioned",
                pool: PairPool::AgreeSubsetAndConflict,
                trainable: Trainable::All,
                step: StepPlan::PerDimensionDpoAndKl,
            },
        ],
        MethodName::Panacea => vec![Stage {
            number: 1,
            name: "panacea",
            pool: PairPool::All,
            trainable: Trainable::All,
            step: StepPlan::PerDimensionDpoAndLinearScalarisation,
        }],
        // The adapters have no shared block, so `All` is phi_1..phi_k and pass i moves phi_i
        // alone: k independent DPO runs sharing batches. A pair trains adapter i only where
        // dimension i has a preference (the others are masked).
        MethodName::DpoSoup => vec![Stage {
            number: 1,
            name: "dpo-soup",
            pool: PairPool::All,
            trainable: Trainable::All,
            step: StepPlan::PerDimensionDpo,
        }],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn curriculum_has_the_papers_three_stages() {
        let s = stages(MethodName::Curriculum);
        assert_eq!(
            s.iter().map(|s| s.trainable).collect::<Vec<_>>(),
            [Trainable::Shared, Trainable::Dimensions, Trainable::All]
        );
        assert_eq!(s[2].step.passes(5), 6);
        assert!(s[2].step.draws_weights() && !s[1].step.draws_weights());
    }

    #[test]
    fn soup_has_no_shared_block_and_bigger_rank() {
        let config: MethodConfig = toml::from_str("name = \"dpo-soup\"").unwrap();
        let spec = config.adapter_spec(2);
        assert_eq!((spec.rank, spec.alpha, spec.shared), (16, 32.0, false));
        let config: MethodConfig = toml::from_str("name = \"curriculum\"\nrank = 4").unwrap();
        assert_eq!(config.adapter_spec(2).rank, 4);
    }

    #[test]
    fn invalid_values_name_the_key() {
        let bad = |text: &str| {
            toml::from_str::<MethodConfig>(text)
                .unwrap()
                .validate()
                .unwrap_err()
                .to_string()
        };
        assert!(bad("name = \"panacea\"\nbeta = 0").contains("method.beta"));
        assert!(bad("name = \"panacea\"\nrank = 0").contains("method.rank"));
        assert!(toml::from_str::<MethodConfig>("name = \"soup\"").is_err());
    }
}
