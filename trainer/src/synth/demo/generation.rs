//! The demo's generation table: for every seed and method, what `eval --generate` measured on
//! the answers to a few held-out prompts, scored by the scenario's exact rule (written under
//! the accuracy tables of `summary.md`, and in `summary.json`).
//!
//! For k = 2 every number is shown: the hypervolume of the one pair, Spearman per dimension and
//! both vertex gaps. For k > 2 the row would be dozens of columns, so it shows the mean
//! hypervolume over the pairs, the mean Spearman over the dimensions and the mean and smallest
//! vertex gap (each seed's `eval-generate/results.md` has them all).

use std::fmt::Write;

use serde_json::json;

use crate::eval::generation::report::decoding_text;
use crate::eval::generation::{GenerationComparison, RunGeneration};

fn mean(values: &[f64]) -> Option<f64> {
    (!values.is_empty()).then(|| values.iter().sum::<f64>() / values.len() as f64)
}

fn two(x: Option<f64>) -> String {
    x.map(|x| format!("{x:.2}")).unwrap_or_else(|| "n/a".into())
}

/// The cells of one run's row after the seed and method.
fn row_cells(run: &RunGeneration, k: usize) -> Vec<String> {
    let mut cells = Vec::new();
    let hypervolumes: Vec<f64> = run.fronts.iter().map(|f| f.hypervolume).collect();
    let gaps: Vec<f64> = run.vertex_gaps.iter().map(|g| g.gap.mean).collect();
    let spearman = &run.controllability.spearman;
    if k == 2 {
        cells.push(format!("{:.3}", hypervolumes[0]));
        cells.extend(spearman.iter().map(|s| two(*s)));
    } else {
        cells.push(format!("{:.3}", mean(&hypervolumes).unwrap_or(0.0)));
        let defined: Vec<f64> = spearman.iter().flatten().copied().collect();
        cells.push(format!(
            "{} ({} of {k} defined)",
            two(mean(&defined)),
            defined.len()
        ));
    }
    let [follow, steps] = run
        .controllability
        .following
        .iter()
        .fold([0, 0], |[f, s], [a, b]| [f + a, s + b]);
    cells.push(format!("{follow} / {steps}"));
    if k == 2 {
        for g in &run.vertex_gaps {
            let interval = g
                .gap
                .interval
                .map(|[lo, hi]| format!(" [{lo:.2}, {hi:.2}]"))
                .unwrap_or_default();
            cells.push(format!("{:.2}{interval}", g.gap.mean));
        }
    } else {
        let smallest = gaps.iter().copied().fold(f64::INFINITY, f64::min);
        cells.push(format!("{} (smallest {smallest:.2})", two(mean(&gaps))));
    }
    cells
}

/// The table of every seed's comparison of one scenario (the seeds share dimensions, methods
/// and grid).
pub fn markdown(seeds: &[(u64, &GenerationComparison)]) -> String {
    let Some((_, first)) = seeds.first() else {
        return String::new();
    };
    let dims = &first.dimensions;
    let k = dims.len();
    let mut md = String::new();
    let _ = writeln!(
        md,
        "Generation at each w (`eval --generate`), {} held-out prompts per seed, {}; scored by the \
         scenario's exact rule, hypervolume above the reference point ({}). Spearman: of w_i \
         with the mean score on i over the grid. Steps following w: adjacent grid points where \
         a dimension's score moves the way its weight moves. Vertex gap: score on i at w = 1_i \
         minus at w = 1_j, 95% bootstrap interval over the prompts.\n",
        first.prompts,
        decoding_text(first),
        first
            .reference_point
            .iter()
            .map(|r| r.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    let mut header = vec!["seed".to_string(), "method".to_string()];
    if k == 2 {
        header.push(format!("hypervolume {} / {}", dims[0], dims[1]));
        header.extend(dims.iter().map(|d| format!("Spearman {d}")));
    } else {
        header.push("mean hypervolume over pairs".into());
        header.push("mean Spearman".into());
    }
    header.push("steps following w".into());
    if k == 2 {
        for g in &first.runs[0].vertex_gaps {
            header.push(format!(
                "{} at 1_{} - at 1_{}",
                dims[g.dimension], dims[g.dimension], dims[g.against]
            ));
        }
    } else {
        header.push("mean vertex gap".into());
    }
    let _ = writeln!(md, "| {} |", header.join(" | "));
    let _ = writeln!(md, "|{}", "---|".repeat(header.len()));
    for (seed, comparison) in seeds {
        for run in &comparison.runs {
            let _ = writeln!(
                md,
                "| {seed} | {} | {} |",
                run.run.label,
                row_cells(run, k).join(" | ")
            );
        }
    }
    md
}

/// The same numbers for `summary.json`.
pub fn to_json(seeds: &[(u64, &GenerationComparison)]) -> serde_json::Value {
    let rows: Vec<serde_json::Value> = seeds
        .iter()
        .flat_map(|(seed, c)| {
            c.runs.iter().map(move |run| {
                json!({
                    "seed": seed,
                    "method": run.run.label,
                    "hypervolumes": run.fronts.iter().map(|f| json!({
                        "pair": [&c.dimensions[f.pair.0], &c.dimensions[f.pair.1]],
                        "hypervolume": f.hypervolume,
                    })).collect::<Vec<_>>(),
                    "controllability": run.controllability,
                    "vertex_gaps": run.vertex_gaps,
                })
            })
        })
        .collect();
    json!(rows)
}
