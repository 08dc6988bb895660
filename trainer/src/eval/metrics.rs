//! The arithmetic of evaluation (METHOD.md section 6), free of tensors: the label of a pair
//! at a weight vector, binary accuracy with ties excluded, percentile bootstrap intervals, and
//! the mean accuracy and win rate of the methods compared (the paper's Table 2).

use rand::Rng;

use crate::data::split::seeded_rng;

/// Relative tolerance under which `w . s_a` and `w . s_b` count as equal: scores are small
/// integers, so a real difference is never this small, while `0.3 * 1 + 0.7 * 2` and
/// `0.7 * 2 + 0.3 * 1` can differ by one rounding.
const TIE_TOLERANCE: f64 = 1e-9;

/// The label of a pair at `w`: `Some(true)` when `w . s_a > w . s_b` (y_a is the better
/// response under w), `Some(false)` when it is smaller, `None` on a tie (such a pair states no
/// preference at this w and is excluded from its accuracy).
pub fn label(weights: &[f64], scores_a: &[f64], scores_b: &[f64]) -> Option<bool> {
    assert_eq!(weights.len(), scores_a.len(), "one weight per dimension");
    assert_eq!(weights.len(), scores_b.len(), "one weight per dimension");
    let terms: Vec<f64> = weights
        .iter()
        .zip(scores_a.iter().zip(scores_b))
        .map(|(w, (a, b))| w * (a - b))
        .collect();
    let difference: f64 = terms.iter().sum();
    let scale: f64 = terms.iter().map(|t| t.abs()).sum();
    if difference.abs() <= TIE_TOLERANCE * scale || difference == 0.0 {
        None
    } else {
        Some(difference > 0.0)
    }
}

/// Whether each pair is predicted right at one weight vector: the model predicts y_a exactly
/// when its margin is > 0 (a margin of exactly 0 predicts y_b); a pair whose label is tied
/// gives `None` and is not counted.
pub fn outcomes(margins: &[f64], labels: &[Option<bool>]) -> Vec<Option<bool>> {
    assert_eq!(margins.len(), labels.len(), "one margin per label");
    margins
        .iter()
        .zip(labels)
        .map(|(&m, label)| label.map(|prefers_a| (m > 0.0) == prefers_a))
        .collect()
}

/// How the bootstrap intervals are drawn.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Bootstrap {
    /// Resamples of the pairs (0 disables the intervals).
    pub resamples: usize,
    /// Seed of the resampling; each weight vector draws its own stream from it.
    pub seed: u64,
    /// Coverage of the interval, e.g. 0.95.
    pub confidence: f64,
}

impl Default for Bootstrap {
    fn default() -> Self {
        Bootstrap {
            resamples: 1000,
            seed: 0,
            confidence: 0.95,
        }
    }
}

/// Accuracy at one weight vector.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Accuracy {
    /// Pairs whose label is not tied at this w.
    pub counted: usize,
    /// Pairs excluded because `w . s_a == w . s_b`.
    pub ties: usize,
    pub correct: usize,
    /// correct / counted; `None` when no pair is counted.
    pub accuracy: Option<f64>,
    /// The percentile bootstrap interval `[low, high]`; `None` when no pair is counted or
    /// the bootstrap is off.
    pub interval: Option<[f64; 2]>,
}

/// Accuracy of `outcomes` with its percentile bootstrap interval: `resamples` times, draw
/// `counted` of the counted pairs with replacement and take their accuracy; the interval is
/// the `(1 - confidence) / 2` and `(1 + confidence) / 2` quantiles of those accuracies
/// (linear interpolation between order statistics). `stream` picks the random stream, so
/// the same stream over the same counted pairs resamples the same pairs for every method
/// (a paired bootstrap).
pub fn accuracy(outcomes: &[Option<bool>], bootstrap: &Bootstrap, stream: u64) -> Accuracy {
    let counted: Vec<bool> = outcomes.iter().flatten().copied().collect();
    let n = counted.len();
    let correct = counted.iter().filter(|&&c| c).count();
    let ties = outcomes.len() - n;
    if n == 0 {
        return Accuracy {
            counted: 0,
            ties,
            correct: 0,
            accuracy: None,
            interval: None,
        };
    }
    let interval = (bootstrap.resamples > 0).then(|| {
        let mut rng = seeded_rng("eval-bootstrap", bootstrap.seed, stream);
        let mut accuracies: Vec<f64> = (0..bootstrap.resamples)
            .map(|_| {
                let hits = (0..n).filter(|_| counted[rng.random_range(0..n)]).count();
                hits as f64 / n as f64
            })
            .collect();
        accuracies.sort_by(f64::total_cmp);
        let tail = (1.0 - bootstrap.confidence) / 2.0;
        [
            quantile(&accuracies, tail),
            quantile(&accuracies, 1.0 - tail),
        ]
    });
    Accuracy {
        counted: n,
        ties,
        correct,
        accuracy: Some(correct as f64 / n as f64),
        interval,
    }
}

/// A mean with its percentile bootstrap interval.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MeanEstimate {
    pub mean: f64,
    /// `None` when the bootstrap is off.
    pub interval: Option<[f64; 2]>,
}

/// The mean of `values` (at least one) with its percentile bootstrap interval, drawn as
/// [`accuracy`] draws its own: `resamples` means of `n` values drawn with replacement, their
/// `(1 -+ confidence) / 2` quantiles. The same `stream` over as many values resamples the same
/// positions, so estimates over the same items (prompts) are paired.
pub fn mean_estimate(values: &[f64], bootstrap: &Bootstrap, stream: u64) -> MeanEstimate {
    assert!(!values.is_empty(), "the mean of no values");
    let n = values.len();
    let mean = values.iter().sum::<f64>() / n as f64;
    let interval = (bootstrap.resamples > 0).then(|| {
        let mut rng = seeded_rng("eval-bootstrap-mean", bootstrap.seed, stream);
        let mut means: Vec<f64> = (0..bootstrap.resamples)
            .map(|_| (0..n).map(|_| values[rng.random_range(0..n)]).sum::<f64>() / n as f64)
            .collect();
        means.sort_by(f64::total_cmp);
        let tail = (1.0 - bootstrap.confidence) / 2.0;
        [quantile(&means, tail), quantile(&means, 1.0 - tail)]
    });
    MeanEstimate { mean, interval }
}

/// The `q` quantile of sorted values, interpolating linearly between order statistics (what
/// numpy's default `percentile` does).
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    assert!(!sorted.is_empty(), "quantile of no values");
    let position = q.clamp(0.0, 1.0) * (sorted.len() - 1) as f64;
    let (low, high) = (position.floor() as usize, position.ceil() as usize);
    sorted[low] + (sorted[high] - sorted[low]) * (position - low as f64)
}

/// A stable stream number for the bootstrap of one weight vector: the same w draws the same
/// resamples wherever it appears (a vertex shared by several dimension pairs).
pub fn weight_stream(weights: &[f64]) -> u64 {
    weights.iter().fold(0xcbf2_9ce4_8422_2325u64, |hash, w| {
        (hash ^ w.to_bits()).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Mean accuracy and win rate of each method over settings.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MethodSummary {
    /// Mean over the settings that count at least one pair of the per-setting accuracy (a
    /// macro average: every setting weighs the same, as in the paper's Table 2).
    pub mean_accuracy: Option<f64>,
    /// Settings won, a tie for the best accuracy between m methods giving each 1/m.
    pub wins: f64,
    /// wins / settings with at least one counted pair; over the methods compared these sum
    /// to 1.
    pub win_rate: Option<f64>,
}

/// `correct[s][m]`: pairs method m gets right at setting s, `None` for a setting that counts
/// no pair. Every method is scored on the same pairs of a setting, so comparing correct
/// counts compares accuracies exactly (no float ties to worry about). A setting is won by the
/// methods with the most correct pairs; when several share the best, each gets an equal share
/// of the win, so the win rates over the methods sum to 1. Settings that count no pair are
/// left out of both the mean and the win rate.
pub fn summarise(
    correct: &[Option<Vec<usize>>],
    counted: &[usize],
    methods: usize,
) -> Vec<MethodSummary> {
    assert_eq!(correct.len(), counted.len(), "one count per setting");
    let mut wins = vec![0.0; methods];
    let mut accuracy_sums = vec![0.0; methods];
    let mut scored = 0usize;
    for (setting, &n) in correct.iter().zip(counted) {
        let Some(per_method) = setting else { continue };
        assert_eq!(per_method.len(), methods, "one count per method");
        assert!(n > 0, "a scored setting counts pairs");
        scored += 1;
        let best = per_method.iter().copied().max().unwrap_or(0);
        let winners = per_method.iter().filter(|&&c| c == best).count();
        for (m, &c) in per_method.iter().enumerate() {
            accuracy_sums[m] += c as f64 / n as f64;
            if c == best {
                wins[m] += 1.0 / winners as f64;
            }
        }
    }
    (0..methods)
        .map(|m| MethodSummary {
            mean_accuracy: (scored > 0).then(|| accuracy_sums[m] / scored as f64),
            wins: wins[m],
            win_rate: (scored > 0).then(|| wins[m] / scored as f64),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_compare_weighted_scores_and_tie() {
        // s_a = (3, 1), s_b = (1, 3): d = (2, -2).
        let (a, b) = ([3.0, 1.0], [1.0, 3.0]);
        assert_eq!(label(&[1.0, 0.0], &a, &b), Some(true));
        assert_eq!(label(&[0.75, 0.25], &a, &b), Some(true)); // 1.5 - 0.5
        assert_eq!(label(&[0.5, 0.5], &a, &b), None); // 1 - 1
        assert_eq!(label(&[0.25, 0.75], &a, &b), Some(false));
        // 0.3 * 7 vs 0.7 * 3: both 2.1, but 0.3 * 7 rounds differently from 0.7 * 3.
        assert_eq!(label(&[0.3, 0.7], &[7.0, 0.0], &[0.0, 3.0]), None);
        assert_eq!(label(&[0.0, 1.0], &[1.0, 2.0], &[4.0, 2.0]), None);
    }

    #[test]
    fn outcomes_predict_a_only_on_positive_margins() {
        let labels = [Some(true), Some(true), Some(false), Some(false), None];
        let margins = [0.5, 0.0, -0.1, 0.0, 3.0];
        assert_eq!(
            outcomes(&margins, &labels),
            vec![Some(true), Some(false), Some(true), Some(true), None]
        );
    }

    #[test]
    fn accuracy_excludes_ties_and_intervals_bracket_it() {
        // 3 of 4 counted pairs right, 2 ties.
        let o = [Some(true), None, Some(false), Some(true), None, Some(true)];
        let acc = accuracy(&o, &Bootstrap::default(), 7);
        assert_eq!((acc.counted, acc.ties, acc.correct), (4, 2, 3));
        assert_eq!(acc.accuracy, Some(0.75));
        let [low, high] = acc.interval.unwrap();
        assert!(low <= 0.75 && 0.75 <= high && low < high, "{low} {high}");
        // Resampled accuracies of 4 pairs are multiples of 1/4 and at most 1.
        assert!(high <= 1.0 && low >= 0.0);
        // Same stream, same interval; all right gives [1, 1].
        assert_eq!(accuracy(&o, &Bootstrap::default(), 7), acc);
        let all = accuracy(&[Some(true); 5], &Bootstrap::default(), 1);
        assert_eq!(all.interval, Some([1.0, 1.0]));
        let none = accuracy(&[None, None], &Bootstrap::default(), 1);
        assert_eq!((none.accuracy, none.interval, none.ties), (None, None, 2));
    }

    #[test]
    fn bootstrap_interval_matches_the_normal_approximation() {
        // 400 pairs at 60%: the sampling sd is sqrt(0.6 * 0.4 / 400) = 0.0245, so a 95%
        // interval is about 0.6 +- 1.96 * 0.0245 = [0.552, 0.648].
        let o: Vec<Option<bool>> = (0..400).map(|i| Some(i % 5 < 3)).collect();
        let acc = accuracy(&o, &Bootstrap::default(), 3);
        let [low, high] = acc.interval.unwrap();
        assert!(
            (low - 0.552).abs() < 0.012 && (high - 0.648).abs() < 0.012,
            "{low} {high}"
        );
    }

    #[test]
    fn mean_intervals_bracket_the_mean_and_collapse_on_constants() {
        // 400 values alternating 0 and 2: mean 1, sd 1, so the 95% interval of the mean is
        // about 1 +- 1.96 * 1 / sqrt(400) = [0.902, 1.098].
        let values: Vec<f64> = (0..400).map(|i| 2.0 * (i % 2) as f64).collect();
        let estimate = mean_estimate(&values, &Bootstrap::default(), 5);
        assert_eq!(estimate.mean, 1.0);
        let [low, high] = estimate.interval.unwrap();
        assert!(
            (low - 0.902).abs() < 0.02 && (high - 1.098).abs() < 0.02,
            "{low} {high}"
        );
        let constant = mean_estimate(&[3.0; 7], &Bootstrap::default(), 1);
        assert_eq!(constant.interval, Some([3.0, 3.0]));
        let off = Bootstrap {
            resamples: 0,
            ..Bootstrap::default()
        };
        assert_eq!(mean_estimate(&[1.0, 2.0], &off, 1).interval, None);
    }

    #[test]
    fn quantiles_interpolate() {
        let v = [0.0, 1.0, 2.0, 3.0];
        assert_eq!(quantile(&v, 0.0), 0.0);
        assert_eq!(quantile(&v, 1.0), 3.0);
        assert_eq!(quantile(&v, 0.5), 1.5);
        assert!((quantile(&v, 0.025) - 0.075).abs() < 1e-12);
    }

    #[test]
    fn wins_split_on_ties_and_rates_sum_to_one() {
        // Setting 0: method 1 wins. Setting 1: methods 0 and 2 tie (1/2 each).
        // Setting 2: no counted pair, left out. Setting 3: all three tie (1/3 each).
        let correct = vec![
            Some(vec![3, 5, 4]),
            Some(vec![6, 2, 6]),
            None,
            Some(vec![1, 1, 1]),
        ];
        let counted = [10, 10, 0, 2];
        let s = summarise(&correct, &counted, 3);
        let third = 1.0 / 3.0;
        let expected_wins = [0.5 + third, 1.0 + third, 0.5 + third];
        for (m, summary) in s.iter().enumerate() {
            assert!(
                (summary.wins - expected_wins[m]).abs() < 1e-12,
                "{m}: {summary:?}"
            );
            assert!((summary.win_rate.unwrap() - expected_wins[m] / 3.0).abs() < 1e-12);
        }
        let total: f64 = s.iter().map(|x| x.win_rate.unwrap()).sum();
        assert!((total - 1.0).abs() < 1e-12);
        // Method 0: (0.3 + 0.6 + 0.5) / 3.
        assert!((s[0].mean_accuracy.unwrap() - 1.4 / 3.0).abs() < 1e-12);
        let empty = summarise(&[None], &[0], 2);
        assert_eq!(empty[0].win_rate, None);
    }
}
