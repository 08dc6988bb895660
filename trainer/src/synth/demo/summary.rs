//! The demo's tables across seeds: per seed, each method's accuracy at the settings shown and
//! its mean over every setting; then the mean over seeds with a 95% Student-t interval (the
//! seeds are the samples: data, tiny model and adapter initialisation all change with the
//! seed, so the interval covers all three sources of variation, not only the pairs).

use std::fmt::Write;

use anyhow::{ensure, Result};
use serde::Serialize;

use super::RunCompute;
use crate::eval::report::{percent, vertex_settings, weights_text};
use crate::eval::{Comparison, LengthView};

/// t_{0.975, df} for df = 1..=30 (scipy.stats.t.ppf(0.975, df), to 3 decimals); beyond 30 the
/// normal 1.960.
const T_975: [f64; 30] = [
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
    2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
    2.052, 2.048, 2.045, 2.042,
];

/// A mean over seeds and the half-width of its 95% t-interval (none from one seed).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct MeanInterval {
    pub mean: f64,
    pub half_width: Option<f64>,
}

impl MeanInterval {
    pub fn of(values: &[f64]) -> MeanInterval {
        let n = values.len();
        assert!(n > 0, "a mean needs a value");
        let mean = values.iter().sum::<f64>() / n as f64;
        let half_width = (n > 1).then(|| {
            let variance = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
            let t = T_975.get(n - 2).copied().unwrap_or(1.960);
            t * (variance / n as f64).sqrt()
        });
        MeanInterval { mean, half_width }
    }
}

/// One method over the seeds of a scenario.
#[derive(Debug, Clone, Serialize)]
pub struct MethodAcrossSeeds {
    pub method: String,
    /// Accuracy at each shown setting, one value per seed (`None`: the setting counted no pair).
    pub accuracy: Vec<Vec<Option<f64>>>,
    /// Mean accuracy over every setting (the eval's macro mean), one per seed.
    pub mean_accuracy: Vec<f64>,
    /// Share of settings won, one per seed.
    pub win_rate: Vec<f64>,
    /// The length-controlled view at each shown setting, one per seed.
    pub length: Vec<Vec<LengthView>>,
    pub compute: RunCompute,
}

/// A scenario's results over its seeds.
#[derive(Debug, Clone, Serialize)]
pub struct AcrossSeeds {
    pub scenario: String,
    pub dimensions: Vec<String>,
    pub seeds: Vec<u64>,
    /// Conflict pairs of each seed's held-out split.
    pub conflict_pairs: Vec<usize>,
    /// The settings shown, as weight vectors: all of them for k = 2, the vertices otherwise.
    pub shown: Vec<Vec<f64>>,
    pub methods: Vec<MethodAcrossSeeds>,
}

impl AcrossSeeds {
    /// Gathers the per-seed comparisons (same methods and settings in each) and each method's
    /// compute (the same for every seed: it depends on the config and the pool sizes only
    /// through the seed-independent conflict count).
    pub fn gather(
        scenario: &str,
        seeds: &[u64],
        comparisons: &[&Comparison],
        compute: &[RunCompute],
    ) -> Result<AcrossSeeds> {
        ensure!(
            !comparisons.is_empty() && comparisons.len() == seeds.len(),
            "one comparison per seed"
        );
        let first = comparisons[0];
        let shown: Vec<usize> = if first.dimensions.len() == 2 {
            (0..first.settings.len()).collect()
        } else {
            vertex_settings(first).into_iter().map(|(_, s)| s).collect()
        };
        let mut methods = Vec::new();
        for (m, run) in first.runs.iter().enumerate() {
            let mut method = MethodAcrossSeeds {
                method: run.label.clone(),
                accuracy: vec![Vec::new(); shown.len()],
                mean_accuracy: Vec::new(),
                win_rate: Vec::new(),
                length: vec![Vec::new(); shown.len()],
                compute: compute[m].clone(),
            };
            for c in comparisons {
                ensure!(
                    c.runs[m].label == run.label && c.settings == first.settings,
                    "the seeds' comparisons differ in methods or settings"
                );
                for (column, &s) in shown.iter().enumerate() {
                    method.accuracy[column].push(c.results[m][s].accuracy.accuracy);
                    method.length[column].push(c.results[m][s].length.clone());
                }
                let summary = &c.summaries[m];
                method
                    .mean_accuracy
                    .push(summary.mean_accuracy.unwrap_or(f64::NAN));
                method.win_rate.push(summary.win_rate.unwrap_or(f64::NAN));
            }
            methods.push(method);
        }
        Ok(AcrossSeeds {
            scenario: scenario.to_string(),
            dimensions: first.dimensions.clone(),
            seeds: seeds.to_vec(),
            conflict_pairs: comparisons.iter().map(|c| c.conflict_pairs).collect(),
            shown: shown
                .iter()
                .map(|&s| first.settings[s].weights.clone())
                .collect(),
            methods,
        })
    }

    /// The scenario's tables in Markdown: compute, per seed, mean over seeds.
    pub fn markdown(&self, compute_rule: &str) -> String {
        let mut md = String::new();
        let n = self.seeds.len();
        let _ = writeln!(
            md,
            "## {}: k = {} ({}), {n} seed{}\n",
            self.scenario,
            self.dimensions.len(),
            self.dimensions.join(", "),
            if n == 1 { "" } else { "s" }
        );
        let _ = writeln!(md, "Compute: {compute_rule}\n");
        let _ = writeln!(
            md,
            "| method | optimizer steps | pair-passes |\n|---|---|---|"
        );
        for m in &self.methods {
            let c = &m.compute;
            let _ = writeln!(md, "| {} | {} | {} |", m.method, c.steps, c.pair_passes);
        }
        let columns: Vec<String> = self.shown.iter().map(|w| weights_text(w)).collect();
        let _ = writeln!(
            md,
            "\nAccuracy (%) on each seed's held-out conflict pairs ({} pairs), at each w:\n",
            self.conflict_pairs
                .iter()
                .map(|c| c.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
        let _ = writeln!(md, "{}", table_header(Some("seed"), &columns));
        for (i, seed) in self.seeds.iter().enumerate() {
            for m in &self.methods {
                let cells: Vec<String> = m.accuracy.iter().map(|a| percent(a[i])).collect();
                let _ = writeln!(
                    md,
                    "| {seed} | {} | {} | {} | {:.2} |",
                    m.method,
                    cells.join(" | "),
                    percent(Some(m.mean_accuracy[i])),
                    m.win_rate[i]
                );
            }
        }
        if n > 1 {
            let _ = writeln!(
                md,
                "\nMean over the {n} seeds ± the half-width of a 95% Student-t interval over \
                 seeds:\n"
            );
            let _ = writeln!(md, "{}", table_header(None, &columns));
            for m in &self.methods {
                let cells: Vec<String> = m
                    .accuracy
                    .iter()
                    .map(|a| match a.iter().copied().collect::<Option<Vec<f64>>>() {
                        Some(values) => percent_interval(MeanInterval::of(&values), 100.0),
                        None => "n/a".into(),
                    })
                    .collect();
                let _ = writeln!(
                    md,
                    "| {} | {} | {} | {} |",
                    m.method,
                    cells.join(" | "),
                    percent_interval(MeanInterval::of(&m.mean_accuracy), 100.0),
                    percent_interval(MeanInterval::of(&m.win_rate), 1.0)
                );
            }
        }
        self.length_markdown(&columns, &mut md);
        md
    }

    /// The length-controlled view over seeds: per method and shown setting, the mean
    /// accuracy where the labelled winner is the longer response (L), where it is the shorter
    /// one (S), and the mean margin-length correlation (r).
    fn length_markdown(&self, columns: &[String], md: &mut String) {
        let _ = writeln!(
            md,
            "\nLength-controlled view, mean over the seeds (± 95% t half-width): L, accuracy \
             (%) where the labelled winner is the longer response; S, where it is the shorter \
             one; r, the correlation of the implicit margin with the length difference. The \
             labels' row is the correlation of the score difference `w . (s_a - s_b)` with the \
             length difference: what an exact reward would show. A reward that leans on \
             length more than the labels has L > S and r above the labels' r.\n"
        );
        let _ = writeln!(
            md,
            "| method | {} |\n|---|{}",
            columns.join(" | "),
            "---|".repeat(columns.len())
        );
        for m in &self.methods {
            let mean = |values: Vec<Option<f64>>, scale: f64| -> String {
                match values.into_iter().collect::<Option<Vec<f64>>>() {
                    Some(v) if !v.is_empty() => percent_interval(MeanInterval::of(&v), scale),
                    _ => "n/a".into(),
                }
            };
            let cells: Vec<String> = m
                .length
                .iter()
                .map(|views| {
                    let longer = views.iter().map(|v| v.longer_wins.accuracy).collect();
                    let shorter = views.iter().map(|v| v.shorter_wins.accuracy).collect();
                    let r = views.iter().map(|v| v.margin_length_correlation).collect();
                    format!(
                        "L {} / S {} / r {}",
                        mean(longer, 100.0),
                        mean(shorter, 100.0),
                        mean(r, 1.0)
                    )
                })
                .collect();
            let _ = writeln!(md, "| {} | {} |", m.method, cells.join(" | "));
        }
        if let Some(m) = self.methods.first() {
            let cells: Vec<String> = m
                .length
                .iter()
                .map(|views| {
                    let r: Option<Vec<f64>> =
                        views.iter().map(|v| v.score_length_correlation).collect();
                    match r {
                        Some(r) if !r.is_empty() => {
                            format!("r {}", percent_interval(MeanInterval::of(&r), 1.0))
                        }
                        _ => "n/a".into(),
                    }
                })
                .collect();
            let _ = writeln!(md, "| labels | {} |", cells.join(" | "));
        }
    }
}

/// The header of an accuracy table: an optional first column, the method, one column per
/// shown setting, the mean and the win rate.
fn table_header(first: Option<&str>, settings: &[String]) -> String {
    let mut names: Vec<&str> = first.into_iter().collect();
    names.push("method");
    names.extend(settings.iter().map(String::as_str));
    names.extend(["mean (all settings)", "win rate"]);
    format!("| {} |\n|{}", names.join(" | "), "---|".repeat(names.len()))
}

/// `mean ± half-width`, both times `scale` (100 for percent, 1 for a rate).
fn percent_interval(m: MeanInterval, scale: f64) -> String {
    let digits = if scale == 1.0 { 2 } else { 1 };
    match m.half_width {
        Some(h) => format!("{:.*} ± {:.*}", digits, scale * m.mean, digits, scale * h),
        None => format!("{:.*}", digits, scale * m.mean),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hand derivation: values 0.90, 0.80, 0.85: mean 0.85; sample variance
    /// (0.0025 + 0.0025 + 0) / 2 = 0.0025, sd 0.05; t_{0.975,2} = 4.303 (scipy.stats.t.ppf);
    /// half-width 4.303 x 0.05 / sqrt(3) = 0.124217...
    #[test]
    fn t_interval_of_three_seeds() {
        let m = MeanInterval::of(&[0.90, 0.80, 0.85]);
        assert!((m.mean - 0.85).abs() < 1e-12);
        assert!((m.half_width.unwrap() - 0.124_217_3).abs() < 1e-6, "{m:?}");
        assert_eq!(MeanInterval::of(&[0.5]).half_width, None);
        assert_eq!(percent_interval(m, 100.0), "85.0 ± 12.4");
    }
}
