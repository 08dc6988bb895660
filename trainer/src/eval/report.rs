//! Writing a [`Comparison`]: `results.json` (everything, for tools), `results.md` (the
//! paper's tables for people) and the PNG figures of [`super::plot`].
//!
//! The output directory is created if needed; a directory that already holds a
//! `results.json` is refused unless `force` is set, so one evaluation never silently
//! replaces another.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use serde_json::json;

use super::runs::Comparison;
use super::Setting;
use crate::checkpoint::write_atomically;

pub const RESULTS_JSON: &str = "results.json";
pub const RESULTS_MD: &str = "results.md";

/// The files an evaluation wrote.
#[derive(Debug, Clone)]
pub struct Written {
    pub results_json: PathBuf,
    pub results_md: PathBuf,
    pub plots: Vec<PathBuf>,
}

/// Writes the JSON, the Markdown and the figures into `out`.
pub fn write(comparison: &Comparison, out: &Path, force: bool) -> Result<Written> {
    write_results(
        out,
        force,
        &to_json(comparison),
        &to_markdown(comparison),
        |out| super::plot::write_plots(comparison, out),
    )
}

/// `results.json`, `results.md` and the figures `plots` draws, into `out` (created if
/// needed); a directory that already holds a `results.json` is refused unless `force`.
/// Shared by `eval` and `eval --generate`.
pub fn write_results(
    out: &Path,
    force: bool,
    json: &serde_json::Value,
    markdown: &str,
    plots: impl FnOnce(&Path) -> Result<Vec<PathBuf>>,
) -> Result<Written> {
    let results_json = out.join(RESULTS_JSON);
    if results_json.exists() && !force {
        bail!(
            "{} already holds evaluation results: choose another --out or pass --force to \
             replace them",
            out.display()
        );
    }
    std::fs::create_dir_all(out)
        .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", out.display()))?;
    write_atomically(
        &results_json,
        serde_json::to_string_pretty(json)?.as_bytes(),
    )?;
    let results_md = out.join(RESULTS_MD);
    write_atomically(&results_md, markdown.as_bytes())?;
    let plots = plots(out)?;
    Ok(Written {
        results_json,
        results_md,
        plots,
    })
}

/// The setting's row label: "first / second" dimension names, or the only dimension (k = 1).
fn pair_label(comparison: &Comparison, setting: &Setting) -> String {
    pair_names(comparison, setting)
        .map(|[a, b]| format!("{a} / {b}"))
        .unwrap_or_else(|| comparison.dimensions[0].clone())
}

/// `(i, j)` as dimension names.
fn pair_names(comparison: &Comparison, setting: &Setting) -> Option<[String; 2]> {
    setting.pair.map(|(i, j)| {
        [
            comparison.dimensions[i].clone(),
            comparison.dimensions[j].clone(),
        ]
    })
}

/// The labels of the runs with the most correct pairs at setting `s` (none when it counts
/// no pair).
pub fn winners(comparison: &Comparison, s: usize) -> Vec<String> {
    let counted = comparison.results[0][s].accuracy.counted;
    if counted == 0 {
        return Vec::new();
    }
    let correct: Vec<usize> = comparison
        .results
        .iter()
        .map(|r| r[s].accuracy.correct)
        .collect();
    let best = correct.iter().copied().max().unwrap_or(0);
    comparison
        .runs
        .iter()
        .zip(&correct)
        .filter(|(_, &c)| c == best)
        .map(|(run, _)| run.label.clone())
        .collect()
}

/// Indices of the settings at the vertices `1_i`, the first occurrence of each: the
/// per-dimension accuracies of the paper's Table 1.
pub fn vertex_settings(comparison: &Comparison) -> Vec<(usize, usize)> {
    (0..comparison.dimensions.len())
        .filter_map(|i| {
            comparison
                .settings
                .iter()
                .position(|s| {
                    s.weights
                        .iter()
                        .enumerate()
                        .all(|(j, &w)| w == f64::from(u8::from(i == j)))
                })
                .map(|s| (i, s))
        })
        .collect()
}

pub fn to_json(comparison: &Comparison) -> serde_json::Value {
    let settings: Vec<serde_json::Value> = comparison
        .settings
        .iter()
        .enumerate()
        .map(|(s, setting)| {
            let first = &comparison.results[0][s].accuracy;
            let results: Vec<serde_json::Value> = comparison
                .runs
                .iter()
                .zip(&comparison.results)
                .map(|(run, r)| {
                    let a = &r[s].accuracy;
                    json!({
                        "label": run.label,
                        "correct": a.correct,
                        "accuracy": a.accuracy,
                        "interval": a.interval,
                        "length": r[s].length,
                    })
                })
                .collect();
            json!({
                "weights": setting.weights,
                "pair": pair_names(comparison, setting),
                "first_weight": setting.first_weight,
                "counted": first.counted,
                "ties": first.ties,
                "results": results,
                "winners": winners(comparison, s),
            })
        })
        .collect();
    let summary: Vec<serde_json::Value> = comparison
        .runs
        .iter()
        .zip(&comparison.summaries)
        .map(|(run, m)| {
            json!({
                "label": run.label,
                "method": run.method,
                "mean_accuracy": m.mean_accuracy,
                "wins": m.wins,
                "win_rate": m.win_rate,
            })
        })
        .collect();
    let per_dimension: Vec<serde_json::Value> = vertex_settings(comparison)
        .into_iter()
        .map(|(i, s)| {
            let results: Vec<serde_json::Value> = comparison
                .runs
                .iter()
                .zip(&comparison.results)
                .map(|(run, r)| {
                    json!({
                        "label": run.label,
                        "accuracy": r[s].accuracy.accuracy,
                        "interval": r[s].accuracy.interval,
                    })
                })
                .collect();
            json!({
                "dimension": comparison.dimensions[i],
                "counted": comparison.results[0][s].accuracy.counted,
                "results": results,
            })
        })
        .collect();
    json!({
        "dimensions": comparison.dimensions,
        "eval_pairs": comparison.eval_pairs,
        "conflict_pairs": comparison.conflict_pairs,
        "bootstrap": comparison.bootstrap,
        "tie_rule": "a pair whose w.s_a equals w.s_b is not counted at that w; a setting's win is shared equally by the runs with the best accuracy; settings that count no pair are left out of mean accuracy and win rate",
        "runs": comparison.runs,
        "summary": summary,
        "per_dimension": per_dimension,
        "settings": settings,
    })
}

/// An accuracy in percent to one decimal, `n/a` when there is none.
pub fn percent(x: Option<f64>) -> String {
    x.map(|v| format!("{:.1}", 100.0 * v))
        .unwrap_or_else(|| "n/a".into())
}

pub fn weights_text(weights: &[f64]) -> String {
    let parts: Vec<String> = weights.iter().map(|w| format!("{w}")).collect();
    format!("({})", parts.join(", "))
}

/// One cell: accuracy and interval in percent, bold for a winner.
fn cell(comparison: &Comparison, run: usize, s: usize, winners: &[String]) -> String {
    let a = &comparison.results[run][s].accuracy;
    let mut text = percent(a.accuracy);
    if winners.contains(&comparison.runs[run].label) {
        text = format!("**{text}**");
    }
    if let Some([low, high]) = a.interval {
        let _ = write!(text, " [{:.1}, {:.1}]", 100.0 * low, 100.0 * high);
    }
    text
}

pub fn to_markdown(comparison: &Comparison) -> String {
    let mut md = String::new();
    let labels: Vec<&str> = comparison.runs.iter().map(|r| r.label.as_str()).collect();
    let b = &comparison.bootstrap;
    let _ = writeln!(
        md,
        "# Implicit-reward accuracy on held-out conflict pairs\n"
    );
    let _ = writeln!(
        md,
        "{} conflict pairs of {} held-out pairs; dimensions: {}. Accuracy in %, with a {:.0}% \
         percentile bootstrap interval over pairs ({} resamples, seed {}). A pair whose \
         `w . s_a` equals `w . s_b` is not counted at that `w`; a margin of exactly 0 \
         predicts `y_b`. Win rate: the share of settings where a run has the best accuracy, a \
         tie splitting the win equally.\n",
        comparison.conflict_pairs,
        comparison.eval_pairs,
        comparison.dimensions.join(", "),
        100.0 * b.confidence,
        b.resamples,
        b.seed
    );
    let _ = writeln!(md, "| run | method | beta | directory |\n|---|---|---|---|");
    for run in &comparison.runs {
        let _ = writeln!(
            md,
            "| {} | {} | {} | `{}` |",
            run.label,
            run.method,
            run.beta,
            run.run_dir.display()
        );
    }
    let scored = (0..comparison.settings.len())
        .filter(|&s| comparison.results[0][s].accuracy.counted > 0)
        .count();
    let _ = writeln!(
        md,
        "\n## Summary over {scored} settings (Table 2)\n\n{} of the {} settings count at \
         least one pair.\n\n| run | win rate | mean accuracy |\n|---|---|---|",
        scored,
        comparison.settings.len()
    );
    for (run, m) in comparison.runs.iter().zip(&comparison.summaries) {
        let rate = m
            .win_rate
            .map(|r| format!("{r:.2}"))
            .unwrap_or_else(|| "n/a".into());
        let _ = writeln!(
            md,
            "| {} | {rate} | {} |",
            run.label,
            percent(m.mean_accuracy)
        );
    }
    let vertices = vertex_settings(comparison);
    if !vertices.is_empty() {
        let _ = writeln!(md, "\n## Per dimension, at w = 1_i (Table 1)\n");
        let header: Vec<String> = vertices
            .iter()
            .map(|&(i, s)| {
                format!(
                    "{} (n = {})",
                    comparison.dimensions[i], comparison.results[0][s].accuracy.counted
                )
            })
            .collect();
        let _ = writeln!(md, "| run | {} |", header.join(" | "));
        let _ = writeln!(md, "|---|{}", "---|".repeat(vertices.len()));
        for (r, run) in comparison.runs.iter().enumerate() {
            let cells: Vec<String> = vertices
                .iter()
                .map(|&(_, s)| cell(comparison, r, s, &winners(comparison, s)))
                .collect();
            let _ = writeln!(md, "| {} | {} |", run.label, cells.join(" | "));
        }
    }
    let _ = writeln!(md, "\n## Every setting\n");
    let _ = writeln!(md, "| dimensions | w | counted | {} |", labels.join(" | "));
    let _ = writeln!(md, "|---|---|---|{}", "---|".repeat(labels.len()));
    for (s, setting) in comparison.settings.iter().enumerate() {
        let won = winners(comparison, s);
        let cells: Vec<String> = (0..comparison.runs.len())
            .map(|r| cell(comparison, r, s, &won))
            .collect();
        let pair = pair_label(comparison, setting);
        let _ = writeln!(
            md,
            "| {pair} | {} | {} | {} |",
            weights_text(&setting.weights),
            comparison.results[0][s].accuracy.counted,
            cells.join(" | ")
        );
    }
    length_section(comparison, &mut md);
    md
}

/// The length-controlled view: per setting and run, accuracy where the labelled winner is the
/// longer response and where it is the shorter one, and the margin-length correlation.
fn length_section(comparison: &Comparison, md: &mut String) {
    let _ = writeln!(
        md,
        "\n## Length-controlled view\n\nAccuracy in % (pairs counted) where the labelled \
         winner at `w` is the longer response, and where it is the shorter one (pairs of equal \
         length in neither); r: Pearson correlation of the implicit margin with `|y_a| - |y_b|` \
         (tokens) over every conflict pair, and labels r: that of the score difference \
         `w . (s_a - s_b)`, what an exact reward would show. A reward that leans on length \
         more than the labels is high on the first, low on the second, with r above labels r.\n"
    );
    let header: Vec<String> = comparison
        .runs
        .iter()
        .map(|r| format!("{0} longer wins | {0} shorter wins | {0} r", r.label))
        .collect();
    let _ = writeln!(md, "| dimensions | w | labels r | {} |", header.join(" | "));
    let _ = writeln!(
        md,
        "|---|---|---|{}",
        "---|".repeat(3 * comparison.runs.len())
    );
    for (s, setting) in comparison.settings.iter().enumerate() {
        let pair = pair_label(comparison, setting);
        let cells: Vec<String> = comparison
            .results
            .iter()
            .map(|r| {
                let view = &r[s].length;
                let split =
                    |a: &super::Accuracy| format!("{} ({})", percent(a.accuracy), a.counted);
                let r = view
                    .margin_length_correlation
                    .map(|r| format!("{r:+.2}"))
                    .unwrap_or_else(|| "n/a".into());
                format!(
                    "{} | {} | {r}",
                    split(&view.longer_wins),
                    split(&view.shorter_wins)
                )
            })
            .collect();
        let labels_r = comparison.results[0][s]
            .length
            .score_length_correlation
            .map(|r| format!("{r:+.2}"))
            .unwrap_or_else(|| "n/a".into());
        let _ = writeln!(
            md,
            "| {pair} | {} | {labels_r} | {} |",
            weights_text(&setting.weights),
            cells.join(" | ")
        );
    }
}
