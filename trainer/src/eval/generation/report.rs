//! Writing a [`GenerationComparison`]: `results.json` (everything), `results.md` (the tables)
//! and the figures of [`super::plot`], as `eval` writes its own. A directory that already
//! holds a `results.json` is refused unless `force`.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Result;
use serde_json::json;

use super::{GenerationComparison, RunGeneration};
use crate::eval::metrics::MeanEstimate;
use crate::eval::report::{weights_text, write_results, Written};

/// Writes the JSON, the Markdown and the figures into `out`.
pub fn write(comparison: &GenerationComparison, out: &Path, force: bool) -> Result<Written> {
    write_results(
        out,
        force,
        &to_json(comparison),
        &to_markdown(comparison),
        |out| super::plot::write_plots(comparison, out),
    )
}

pub fn to_json(c: &GenerationComparison) -> serde_json::Value {
    json!({
        "dimensions": c.dimensions,
        "scorer": c.scorer,
        "reference_point": c.reference_point,
        "settings": c.settings,
        "weights": c.weights,
        "prompts": c.prompts,
        "decoding": c.decoding,
        "bootstrap": c.bootstrap,
        "runs": c.runs,
    })
}

/// `1.23 [1.01, 1.40]`, or the mean alone without an interval.
pub fn estimate_text(e: &MeanEstimate) -> String {
    match e.interval {
        Some([lo, hi]) => format!("{:.2} [{lo:.2}, {hi:.2}]", e.mean),
        None => format!("{:.2}", e.mean),
    }
}

fn optional(x: Option<f64>) -> String {
    x.map(|x| format!("{x:.2}")).unwrap_or_else(|| "n/a".into())
}

/// How the answers were decoded, in words.
pub fn decoding_text(c: &GenerationComparison) -> String {
    let d = &c.decoding;
    let how = if d.temperature <= 0.0 {
        "greedy".to_string()
    } else {
        format!(
            "sampled at temperature {}, top-p {}, seed {}",
            d.temperature, d.top_p, d.seed
        )
    };
    format!("{how}, at most {} new tokens", d.max_new_tokens)
}

/// One row per run: hypervolume per pair, Spearman per dimension, following steps.
pub fn summary_table(c: &GenerationComparison) -> String {
    let dims = &c.dimensions;
    let mut md = String::from("| run |");
    for f in &c.runs[0].fronts {
        let _ = write!(md, " hypervolume {} / {} |", dims[f.pair.0], dims[f.pair.1]);
    }
    for d in dims {
        let _ = write!(md, " Spearman {d} |");
    }
    md.push_str(" steps following w |\n|---|");
    md.push_str(&"---|".repeat(c.runs[0].fronts.len() + dims.len() + 1));
    md.push('\n');
    for run in &c.runs {
        let _ = write!(md, "| {} |", run.run.label);
        for f in &run.fronts {
            let _ = write!(md, " {:.3} |", f.hypervolume);
        }
        for s in &run.controllability.spearman {
            let _ = write!(md, " {} |", optional(*s));
        }
        let (follow, steps) = run
            .controllability
            .following
            .iter()
            .fold((0, 0), |(f, s), [a, b]| (f + a, s + b));
        let share = run.controllability.share.map(|s| 100.0 * s);
        let _ = writeln!(
            md,
            " {follow} / {steps} ({}%) |",
            share.map(|s| format!("{s:.0}")).unwrap_or("n/a".into())
        );
    }
    md
}

/// One row per run: score on i at `1_i` minus at `1_j`, for every ordered pair of vertices.
pub fn vertex_gap_table(c: &GenerationComparison) -> String {
    let dims = &c.dimensions;
    let mut md = String::from("| run |");
    let gaps = &c.runs[0].vertex_gaps;
    for g in gaps {
        let _ = write!(
            md,
            " {} at 1_{} - at 1_{} |",
            dims[g.dimension], dims[g.dimension], dims[g.against]
        );
    }
    md.push_str("\n|---|");
    md.push_str(&"---|".repeat(gaps.len()));
    md.push('\n');
    for run in &c.runs {
        let _ = write!(md, "| {} |", run.run.label);
        for g in &run.vertex_gaps {
            let _ = write!(md, " {} |", estimate_text(&g.gap));
        }
        md.push('\n');
    }
    md
}

fn points_table(c: &GenerationComparison, run: &RunGeneration) -> String {
    let mut md = String::from("| w |");
    for d in &c.dimensions {
        let _ = write!(md, " {d} |");
    }
    md.push_str(" length (tokens) |\n|---|");
    md.push_str(&"---|".repeat(c.dimensions.len() + 1));
    md.push('\n');
    for p in &run.points {
        let _ = write!(md, "| {} |", weights_text(&p.weights));
        for s in &p.scores {
            let _ = write!(md, " {} |", estimate_text(s));
        }
        let _ = writeln!(md, " {} |", estimate_text(&p.length));
    }
    md
}

fn header(c: &GenerationComparison) -> String {
    let reference: Vec<String> = c
        .dimensions
        .iter()
        .zip(&c.reference_point)
        .map(|(d, r)| format!("{d} {r}"))
        .collect();
    let intervals = if c.bootstrap.resamples > 0 {
        format!(
            "{:.0}% percentile bootstrap intervals over the prompts ({} resamples, seed {})",
            100.0 * c.bootstrap.confidence,
            c.bootstrap.resamples,
            c.bootstrap.seed
        )
    } else {
        "no intervals (bootstrap off)".into()
    };
    format!(
        "Scored by {}. Reference point of the hypervolume: {}.\n\n{} held-out prompts, every \
         run at {} weight vectors ({}); {intervals}.\n",
        c.scorer,
        reference.join(", "),
        c.prompts,
        c.weights.len(),
        decoding_text(c),
    )
}

pub fn to_markdown(c: &GenerationComparison) -> String {
    let mut md = String::from("# Generation at each w: fronts, hypervolume, controllability\n\n");
    md.push_str(&header(c));
    md.push_str(
        "\n## Per run\n\nHypervolume: the area the pair's points dominate above the reference \
         point. Spearman: rank correlation of w_i with the mean score on i over the grid. Steps \
         following w: steps between adjacent points of a pair's line where the score on a \
         dimension moves the way its weight moves.\n\n",
    );
    md.push_str(&summary_table(c));
    md.push_str(
        "\n## Vertex gaps\n\nScore on i at w = 1_i minus at w = 1_j, paired over the prompts \
         (positive: the model pointed at i scores higher on i).\n\n",
    );
    md.push_str(&vertex_gap_table(c));
    md.push_str("\n## Mean score and answer length at each w\n");
    for run in &c.runs {
        let _ = write!(md, "\n### {}\n\n", run.run.label);
        md.push_str(&points_table(c, run));
    }
    md.push_str("\n## Examples\n");
    for run in &c.runs {
        for (e, example) in run.examples.iter().enumerate() {
            let _ = write!(
                md,
                "\n{} (prompt {}: `{}`):\n\n",
                run.run.label,
                e + 1,
                example.prompt.replace('`', "'").replace('\n', " ")
            );
            for (w, answer) in c.weights.iter().zip(&example.answers) {
                let _ = writeln!(
                    md,
                    "- {}: `{}`",
                    weights_text(w),
                    answer.replace('`', "'").replace('\n', " ")
                );
            }
        }
    }
    md
}
