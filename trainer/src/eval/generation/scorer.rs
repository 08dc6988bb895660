//! What scores a generated answer on every dimension: on synthetic data the scenario's own
//! rule (`synth::score`, the very function that labelled the data, so the front is exact), on
//! real data the reward models of `modpo-trainer train-rm` (`reward_model`). Each scorer has a
//! fixed reference point for the hypervolume, stated in the results.

use anyhow::{bail, Result};

use crate::reward_model::RewardModel;
use crate::synth::{self, Scenario};

/// One generated answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    /// The new tokens, the end-of-sequence token left out.
    pub ids: Vec<u32>,
    /// The new tokens decoded, special tokens skipped.
    pub text: String,
}

/// How answers are scored.
pub enum Scorer {
    /// The synthetic scenario's exact rule over the first `dimensions.len()` dimensions.
    Synthetic {
        scenario: Scenario,
        dimensions: Vec<String>,
    },
    /// A reward model trained by `train-rm`: one scalar per dimension.
    RewardModel(Box<RewardModel>),
}

impl Scorer {
    /// The scenario's rule for runs on `dimensions`, refused when they are not the scenario's
    /// first dimensions (the runs were not trained on its data).
    pub fn synthetic(scenario: Scenario, dimensions: &[String]) -> Result<Scorer> {
        let names = scenario.dimension_names();
        let k = dimensions.len();
        if k > names.len() || names[..k] != *dimensions {
            bail!(
                "--scenario {}: the runs' dimensions [{}] are not the scenario's first {k} ([{}])",
                scenario.name(),
                dimensions.join(", "),
                names[..k.min(names.len())].join(", ")
            );
        }
        Ok(Scorer::Synthetic {
            scenario,
            dimensions: dimensions.to_vec(),
        })
    }

    pub fn dimensions(&self) -> &[String] {
        match self {
            Scorer::Synthetic { dimensions, .. } => dimensions,
            Scorer::RewardModel(model) => &model.dimensions,
        }
    }

    /// The point the hypervolume is measured from, one entry per dimension.
    pub fn reference_point(&self) -> Vec<f64> {
        match self {
            Scorer::Synthetic {
                scenario,
                dimensions,
            } => synth::score_floor(*scenario, dimensions.len()),
            Scorer::RewardModel(model) => model.reference_point.clone(),
        }
    }

    /// What scores, and where the reference point comes from, in one line.
    pub fn description(&self) -> String {
        match self {
            Scorer::Synthetic { scenario, .. } => format!(
                "the exact rule of the synthetic scenario `{}` (the code that labelled the \
                 data); reference point: the lowest score a response of its data can have",
                scenario.name()
            ),
            Scorer::RewardModel(model) => format!(
                "the reward model {} (trained by train-rm); reference point: per dimension, the \
                 lowest reward it gives a response of its held-out split",
                model.dir.display()
            ),
        }
    }

    /// `scores[a][i]`: answer a to the prompt `prompt_ids` on dimension i.
    pub fn score(&self, prompt_ids: &[u32], answers: &[Answer]) -> Result<Vec<Vec<f64>>> {
        match self {
            Scorer::Synthetic {
                scenario,
                dimensions,
            } => Ok(answers
                .iter()
                .map(|a| synth::score(*scenario, &a.text, dimensions.len()))
                .collect()),
            Scorer::RewardModel(model) => {
                let responses: Vec<&[u32]> = answers.iter().map(|a| a.ids.as_slice()).collect();
                model.score(prompt_ids, &responses)
            }
        }
    }
}
