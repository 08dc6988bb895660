//! Evaluation (METHOD.md section 6): implicit-reward accuracy on the conflict pairs of the
//! held-out split, at the paper's weight vectors, for one model ([`evaluate`], also what the
//! training loop calls) or for several finished runs compared side by side ([`compare`]:
//! the paper's Tables 1 and 2 and Figures 2-3, written by `modpo-trainer eval`).
//!
//! For a weight vector `w` the model's margin on a pair is `m(w) = beta * (u(y_a; w) -
//! u(y_b; w))` with `u = log pi(.|x; w) - log pi_ref(.|x)`; it predicts `y_a` exactly when
//! `m > 0`. The label is `w . s_a` against `w . s_b`; pairs where they are equal state no
//! preference at that `w` and are not counted for it. The metric is binary accuracy.
//!
//! **One code path for the three methods.** Curriculum and Panacea models are conditioned on
//! `w` by construction. DPO-Soup is evaluated as its weighted soup of full models, `W +
//! sum_i w_i (alpha/r) B_i A_i` on every projection (METHOD.md section 5). Our soup adapters
//! have no shared block, and the adapter forward with `Conditioning::Weighted(w)` computes
//! `W x + (alpha/r) sum_i w_i B_i A_i x = (W + sum_i w_i (alpha/r) B_i A_i) x`: the same linear
//! map as the souped weight (`Adapter::delta_weight` is exactly that update). So the soup's
//! model at `w` is the adapter model at `w`, and the same batched per-row-`w` forward
//! evaluates all three methods (tested against the merged model of `export`).
//!
//! - `margins`: the batched forwards;
//! - `metrics`: labels, accuracy, bootstrap intervals, mean accuracy and win rate;
//! - `runs`: loading run directories and comparing them;
//! - `report`: `results.json` and `results.md`; `plot`: the PNG figures.

pub mod curves;
pub mod generation;
pub mod length;
pub mod margins;
pub mod metrics;
pub mod plot;
pub mod report;
pub mod runs;

use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::data::{SplitData, TokenizedPair};
use crate::model::CausalLm;
use crate::reference::ReferenceLogps;

pub use length::LengthView;
pub use margins::{implicit_margins, Batching, ImplicitReward};
pub use metrics::{Accuracy, Bootstrap, MethodSummary};
pub use runs::{compare, CompareOptions, Comparison};

/// The weights of a dimension pair (first, second) in the paper's grid, first-dimension
/// weight descending: (1,0), (.75,.25), (.5,.5), (.25,.75), (0,1).
pub const PAIR_GRID: [f64; 5] = [1.0, 0.75, 0.5, 0.25, 0.0];

/// One weight vector of an evaluation and where it sits in the grid.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Setting {
    /// w, one entry per dimension, on the simplex.
    pub weights: Vec<f64>,
    /// The dimensions `(i, j)`, `i < j`, between which this w interpolates; `None` for the
    /// single vertex of a one-dimension run.
    pub pair: Option<(usize, usize)>,
    /// The weight on the pair's first dimension (the x axis of the figures).
    pub first_weight: f64,
}

/// The paper's settings for k dimensions: for every pair of dimensions `i < j` (in order),
/// the five weights of [`PAIR_GRID`] on that pair and 0 elsewhere. k = 5 gives C(5,2) x 5 =
/// 50 settings (Table 2), k = 2 the five points between the two vertices (whose ends are
/// Table 1). A vertex appears once per pair it belongs to, as in the paper's count.
pub fn paper_settings(k: usize) -> Vec<Setting> {
    if k == 1 {
        return vec![Setting {
            weights: vec![1.0],
            pair: None,
            first_weight: 1.0,
        }];
    }
    let mut settings = Vec::new();
    for i in 0..k {
        for j in i + 1..k {
            for &first in &PAIR_GRID {
                let mut weights = vec![0.0; k];
                weights[i] = first;
                weights[j] = 1.0 - first;
                settings.push(Setting {
                    weights,
                    pair: Some((i, j)),
                    first_weight: first,
                });
            }
        }
    }
    settings
}

/// The distinct weight vectors of `settings`, in first-seen order, and for every setting the
/// index of its vector: shared vertices are evaluated once.
pub fn distinct_weights(settings: &[Setting]) -> (Vec<Vec<f64>>, Vec<usize>) {
    let mut distinct: Vec<Vec<f64>> = Vec::new();
    let index = settings
        .iter()
        .map(|s| match distinct.iter().position(|w| *w == s.weights) {
            Some(i) => i,
            None => {
                distinct.push(s.weights.clone());
                distinct.len() - 1
            }
        })
        .collect();
    (distinct, index)
}

/// The conflict pairs of a split (evaluation is on conflict pairs only).
pub fn conflict_pairs(split: &SplitData) -> Vec<&TokenizedPair> {
    split.pairs.iter().filter(|p| p.is_conflict()).collect()
}

/// A setting's accuracy for one model, and its length-controlled view.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SettingResult {
    pub setting: Setting,
    #[serde(flatten)]
    pub accuracy: Accuracy,
    pub length: LengthView,
}

/// What one model gets right at every setting, with the per-pair outcomes kept for the
/// comparison across runs.
#[derive(Debug, Clone)]
pub struct ModelEvaluation {
    pub results: Vec<SettingResult>,
    /// `outcomes[s][p]`: whether pair p is right at setting s (`None`: tied, not counted).
    pub outcomes: Vec<Vec<Option<bool>>>,
    /// `margins[s][p]` at setting s.
    pub margins: Vec<Vec<f64>>,
}

/// Evaluates `model` on `pairs` (conflict pairs of a split whose reference log-probs, indexed
/// by pair id, are `reference`) at every setting: the margins of each distinct weight vector
/// in batched forwards, then accuracy with its bootstrap interval. This is the call for
/// evaluation during training; it records no gradient and leaves the model as it was.
pub fn evaluate(
    model: &CausalLm,
    pairs: &[&TokenizedPair],
    reference: &ReferenceLogps,
    settings: &[Setting],
    reward: ImplicitReward,
    batching: &Batching,
    bootstrap: &Bootstrap,
) -> ModelEvaluation {
    let (distinct, index) = distinct_weights(settings);
    let distinct_margins = implicit_margins(model, pairs, reference, &distinct, reward, batching);
    let differences = length::length_differences(pairs);
    let mut evaluation = ModelEvaluation {
        results: Vec::with_capacity(settings.len()),
        outcomes: Vec::with_capacity(settings.len()),
        margins: Vec::with_capacity(settings.len()),
    };
    for (setting, &v) in settings.iter().zip(&index) {
        let labels: Vec<Option<bool>> = pairs
            .iter()
            .map(|p| metrics::label(&setting.weights, &p.scores_a, &p.scores_b))
            .collect();
        let margins = distinct_margins[v].clone();
        let outcomes = metrics::outcomes(&margins, &labels);
        let stream = metrics::weight_stream(&setting.weights);
        let accuracy = metrics::accuracy(&outcomes, bootstrap, stream);
        let length = length::length_view(
            &differences,
            &length::score_differences(pairs, &setting.weights),
            &labels,
            &outcomes,
            &margins,
            bootstrap,
            stream,
        );
        evaluation.results.push(SettingResult {
            setting: setting.clone(),
            accuracy,
            length,
        });
        evaluation.outcomes.push(outcomes);
        evaluation.margins.push(margins);
    }
    evaluation
}

/// What `modpo-trainer eval` does: compares the runs ([`compare`]) and writes the results
/// into `out` ([`report::write`]). An `out` already holding results is refused before any
/// model is loaded, unless `force`.
pub fn evaluate_runs(
    options: &CompareOptions,
    out: &std::path::Path,
    force: bool,
) -> anyhow::Result<(Comparison, report::Written)> {
    if out.join(report::RESULTS_JSON).exists() && !force {
        anyhow::bail!(
            "{} already holds evaluation results: choose another --out or pass --force to \
             replace them",
            out.display()
        );
    }
    let comparison = compare(options)?;
    let written = report::write(&comparison, out, force)?;
    Ok((comparison, written))
}

/// The `eval` object of a `metrics.jsonl` line: mean accuracy over the settings that count a
/// pair, and each setting's weights, counts and accuracy (interval included when computed).
pub fn metrics_record(
    dimensions: &[String],
    results: &[SettingResult],
    pairs: usize,
) -> serde_json::Value {
    let scored: Vec<f64> = results.iter().filter_map(|r| r.accuracy.accuracy).collect();
    let mean = (!scored.is_empty()).then(|| scored.iter().sum::<f64>() / scored.len() as f64);
    let settings: Vec<serde_json::Value> = results
        .iter()
        .map(|r| {
            json!({
                "weights": r.setting.weights,
                "pair": r.setting.pair.map(|(i, j)| [&dimensions[i], &dimensions[j]]),
                "accuracy": r.accuracy.accuracy,
                "interval": r.accuracy.interval,
                "correct": r.accuracy.correct,
                "counted": r.accuracy.counted,
            })
        })
        .collect();
    json!({
        "conflict_pairs": pairs,
        "mean_accuracy": mean,
        "settings": settings,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paper_grid_has_fifty_settings_for_five_dimensions() {
        let settings = paper_settings(5);
        assert_eq!(settings.len(), 50);
        for s in &settings {
            assert!((s.weights.iter().sum::<f64>() - 1.0).abs() < 1e-12);
            let (i, j) = s.pair.unwrap();
            assert!(i < j && j < 5);
            assert_eq!(s.weights[i], s.first_weight);
            assert_eq!(
                s.weights.iter().filter(|&&w| w > 0.0).count(),
                if s.first_weight == 0.0 || s.first_weight == 1.0 {
                    1
                } else {
                    2
                }
            );
        }
        // 5 vertices and 10 pairs x 3 interior points are distinct.
        let (distinct, index) = distinct_weights(&settings);
        assert_eq!(distinct.len(), 35);
        assert_eq!(index.len(), 50);
        // Pair (0, 1) then (0, 2): their first settings are the same vertex 1_0.
        assert_eq!(index[0], index[5]);
        let two = paper_settings(2);
        assert_eq!(two.len(), 5);
        assert_eq!(two[0].weights, vec![1.0, 0.0]);
        assert_eq!(two[4].weights, vec![0.0, 1.0]);
        assert_eq!(paper_settings(1)[0].weights, vec![1.0]);
    }
}
