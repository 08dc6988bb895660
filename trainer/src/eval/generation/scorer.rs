//! What scores a generated answer on every dimension. The evaluation knows scorers only
//! through [`Scorer`]: the synthetic scenarios' exact rule (`synth::ScenarioScorer`, the code
//! that labelled the data, so the front is exact) and the reward models of `train-rm`
//! (`reward_model::RewardModel`) implement it. Each has a fixed reference point for the
//! hypervolume, stated in the results.

use anyhow::Result;

/// One generated answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    /// The new tokens, the end-of-sequence token left out.
    pub ids: Vec<u32>,
    /// The new tokens decoded, special tokens skipped.
    pub text: String,
}

/// Scores answers on every dimension.
pub trait Scorer {
    /// The dimensions scored, in order.
    fn dimensions(&self) -> &[String];

    /// The point the hypervolume is measured from, one entry per dimension.
    fn reference_point(&self) -> Vec<f64>;

    /// What scores, and where the reference point comes from, in one line.
    fn description(&self) -> String;

    /// `scores[a][i]`: answer a to the prompt `prompt_ids` (chat-templated) on dimension i.
    fn score(&self, prompt_ids: &[u32], answers: &[Answer]) -> Result<Vec<Vec<f64>>>;
}
