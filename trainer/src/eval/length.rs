//! The length-controlled view of an evaluation: does a model's implicit reward prefer the
//! longer response? Per setting, the accuracy on conflict pairs whose labelled winner is the
//! longer response and on those where it is the shorter one (a reward that leans on length
//! scores high on the first and low on the second), and the Pearson correlation between the
//! implicit margin and the length difference `|y_a| - |y_b|` (in tokens, EOS included).

use serde::{Deserialize, Serialize};

use super::metrics::{self, Accuracy, Bootstrap};
use crate::data::TokenizedPair;

/// The length-controlled view of one setting.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LengthView {
    /// Pairs whose labelled winner at this w is the longer response.
    pub longer_wins: Accuracy,
    /// Pairs whose labelled winner is the shorter response.
    pub shorter_wins: Accuracy,
    /// Pearson correlation of the margins with `|y_a| - |y_b|` over every pair (labelled or
    /// not); `None` with fewer than two pairs or no spread.
    pub margin_length_correlation: Option<f64>,
    /// The same for the labels' score difference `w . (s_a - s_b)`: how much length the data
    /// itself ties to the preference at this w, the value an exact reward would show.
    pub score_length_correlation: Option<f64>,
}

/// `(|y_a| - |y_b|)` of each pair, in tokens.
pub fn length_differences(pairs: &[&TokenizedPair]) -> Vec<f64> {
    pairs
        .iter()
        .map(|p| p.response_a_ids.len() as f64 - p.response_b_ids.len() as f64)
        .collect()
}

/// `w . (s_a - s_b)` of each pair.
pub fn score_differences(pairs: &[&TokenizedPair], weights: &[f64]) -> Vec<f64> {
    pairs
        .iter()
        .map(|p| {
            (p.scores_a.iter().zip(&p.scores_b))
                .zip(weights)
                .map(|((a, b), w)| w * (a - b))
                .sum()
        })
        .collect()
}

/// The view of one setting from the pairs' length differences, their score differences and
/// labels at w (`Some(true)`: y_a wins), the model's outcomes and margins. Pairs of equal
/// length fall in neither split. `stream` is the setting's bootstrap stream (each split draws
/// its own).
pub fn length_view(
    differences: &[f64],
    scores: &[f64],
    labels: &[Option<bool>],
    outcomes: &[Option<bool>],
    margins: &[f64],
    bootstrap: &Bootstrap,
    stream: u64,
) -> LengthView {
    assert!(
        differences.len() == labels.len()
            && labels.len() == outcomes.len()
            && outcomes.len() == margins.len(),
        "one length difference, label, outcome and margin per pair"
    );
    let split = |longer: bool| -> Vec<Option<bool>> {
        differences
            .iter()
            .zip(labels.iter().zip(outcomes))
            .filter(|(&d, (label, _))| match label {
                // The winner is the longer response when a wins and a is longer, or b wins
                // and b is longer.
                Some(a_wins) if d != 0.0 => (*a_wins == (d > 0.0)) == longer,
                _ => false,
            })
            .map(|(_, (_, &outcome))| outcome)
            .collect()
    };
    LengthView {
        longer_wins: metrics::accuracy(&split(true), bootstrap, stream ^ 0x4c4f_4e47),
        shorter_wins: metrics::accuracy(&split(false), bootstrap, stream ^ 0x5348_4f52),
        margin_length_correlation: pearson(margins, differences),
        score_length_correlation: pearson(scores, differences),
    }
}

/// The Pearson correlation of `x` and `y`; `None` with fewer than two points or a constant
/// series.
pub fn pearson(x: &[f64], y: &[f64]) -> Option<f64> {
    assert_eq!(x.len(), y.len(), "paired series");
    let n = x.len() as f64;
    if x.len() < 2 {
        return None;
    }
    let (mx, my) = (x.iter().sum::<f64>() / n, y.iter().sum::<f64>() / n);
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for (a, b) in x.iter().zip(y) {
        sxy += (a - mx) * (b - my);
        sxx += (a - mx) * (a - mx);
        syy += (b - my) * (b - my);
    }
    (sxx > 0.0 && syy > 0.0).then(|| sxy / (sxx * syy).sqrt())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hand derivation: x = (1, 2, 3, 4), y = (2, 4, 5, 9): means 2.5 and 5; deviations
    /// (-1.5, -0.5, 0.5, 1.5) and (-3, -1, 0, 4); sxy = 4.5 + 0.5 + 0 + 6 = 11,
    /// sxx = 5, syy = 9 + 1 + 0 + 16 = 26; r = 11 / sqrt(130) = 0.9647638212377322.
    #[test]
    fn pearson_by_hand() {
        let r = pearson(&[1.0, 2.0, 3.0, 4.0], &[2.0, 4.0, 5.0, 9.0]).unwrap();
        assert!((r - 0.9647638212377322).abs() < 1e-12, "{r}");
        assert_eq!(pearson(&[1.0, 1.0], &[2.0, 3.0]), None);
        assert_eq!(pearson(&[1.0], &[2.0]), None);
    }

    /// Six pairs: length differences (+5, -3, +2, -4, 0, +1), labels (a, a, b, b, a, none),
    /// margins (2, 1, -1, 3, 0.5, -2). The longer response wins in pairs 0 (a, +5) and 3 (b,
    /// -4); the shorter in pairs 1 (a, -3) and 2 (b, +2); pair 4 has equal lengths, pair 5 no
    /// label. Outcomes (margin > 0 predicts a): pair 0 right, 3 wrong (predicts a), 1 right,
    /// 2 right (predicts b). So longer-wins 1 of 2, shorter-wins 2 of 2.
    #[test]
    fn splits_by_whether_the_longer_response_wins() {
        let differences = [5.0, -3.0, 2.0, -4.0, 0.0, 1.0];
        let labels = [
            Some(true),
            Some(true),
            Some(false),
            Some(false),
            Some(true),
            None,
        ];
        let margins = [2.0, 1.0, -1.0, 3.0, 0.5, -2.0];
        let outcomes = metrics::outcomes(&margins, &labels);
        let off = Bootstrap {
            resamples: 0,
            ..Bootstrap::default()
        };
        let scores = [1.0, 1.0, -1.0, -1.0, 1.0, 0.0];
        let view = length_view(&differences, &scores, &labels, &outcomes, &margins, &off, 7);
        assert_eq!((view.longer_wins.correct, view.longer_wins.counted), (1, 2));
        assert_eq!(
            (view.shorter_wins.correct, view.shorter_wins.counted),
            (2, 2)
        );
        assert_eq!(
            view.margin_length_correlation,
            pearson(&margins, &differences)
        );
        assert_eq!(
            view.score_length_correlation,
            pearson(&scores, &differences)
        );
    }
}
