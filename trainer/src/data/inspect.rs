//! `modpo-trainer data inspect`: a report of what the data of a run is before training on it —
//! rows and pairs, agree / conflict / tied, per-dimension preferences, conflicts between every
//! two dimensions, token lengths, truncation, and the batches each curriculum stage gets.

use std::fmt::Write;

use super::{load, DataConfig, DataError, PreferenceData, SplitData};
use crate::tokenizer::ChatTokenizer;

/// Loads the data of `config` (reading and writing the token cache like a training run) and
/// returns the report as text.
pub fn inspect(config: &DataConfig, tokenizer: &ChatTokenizer) -> Result<String, DataError> {
    let data = load(config, tokenizer)?;
    Ok(report(config, &data))
}

/// Columns right-aligned after a left-aligned label column.
struct Table {
    rows: Vec<Vec<String>>,
}

impl Table {
    fn new(header: &[&str]) -> Self {
        Table {
            rows: vec![header.iter().map(|s| s.to_string()).collect()],
        }
    }

    fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    fn render(&self, out: &mut String) {
        let columns = self.rows.iter().map(Vec::len).max().unwrap_or(0);
        let widths: Vec<usize> = (0..columns)
            .map(|c| {
                self.rows
                    .iter()
                    .map(|r| r.get(c).map_or(0, |s| s.chars().count()))
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        for row in &self.rows {
            let mut line = String::new();
            for (c, cell) in row.iter().enumerate() {
                if c == 0 {
                    let _ = write!(line, "  {cell:<width$}", width = widths[0]);
                } else {
                    let _ = write!(line, "  {cell:>width$}", width = widths[c]);
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
    }
}

/// The nearest-rank percentile `p` (0-100) of sorted values.
fn percentile(sorted: &[usize], p: usize) -> usize {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (p * sorted.len()).div_ceil(100).max(1);
    sorted[rank - 1]
}

fn length_row(label: &str, mut values: Vec<usize>) -> Vec<String> {
    values.sort_unstable();
    let mut row = vec![label.to_owned()];
    row.extend(
        [50, 90, 99, 100]
            .iter()
            .map(|&p| percentile(&values, p).to_string()),
    );
    row
}

/// The train and the eval side, by name, as the report's columns.
type Sides<'a> = [(&'static str, &'a SplitData); 2];

/// The report of loaded data.
pub fn report(config: &DataConfig, data: &PreferenceData) -> String {
    let mut out = String::new();
    write_files(&mut out, config, data);
    let sides: Sides = [("train", &data.train), ("eval", &data.eval)];
    write_pairs(&mut out, config, &sides);
    write_preferences(&mut out, &data.dimensions, &sides);
    write_conflicts(&mut out, &data.dimensions, &sides);
    for (name, side) in sides {
        write_lengths(&mut out, name, side);
    }
    write_stage_batches(&mut out, config, data);
    out
}

/// The format and dimensions, each file read, and how the eval side was formed.
fn write_files(out: &mut String, config: &DataConfig, data: &PreferenceData) {
    let _ = writeln!(
        out,
        "format {}, {} dimensions: {}",
        config.format.name(),
        data.dimensions.len(),
        data.dimensions.join(", ")
    );
    for (i, file) in data.files.iter().enumerate() {
        let _ = writeln!(
            out,
            "{} file {}: {} rows, {} pairs (tokens {})",
            if i == 0 { "train" } else { "eval" },
            file.path.display(),
            file.rows,
            file.pairs,
            if file.from_cache {
                "from cache"
            } else {
                "computed"
            }
        );
    }
    match &config.eval_file {
        Some(_) => {
            let _ = writeln!(
                out,
                "eval pairs dropped because their prompt is also in the train file: {}",
                data.eval_dropped_shared_prompt
            );
        }
        None => {
            let _ = writeln!(
                out,
                "eval = {}% of the train prompts, by SHA-256 of the prompt text",
                config.effective_eval_fraction() * 100.0
            );
        }
    }
}

/// Prompts and pairs of each side: formed, agree / conflict, dropped, kept, truncated.
fn write_pairs(out: &mut String, config: &DataConfig, sides: &Sides) {
    out.push_str("\npairs\n");
    let mut table = Table::new(&["", "train", "eval"]);
    let mut add = |label: &str, f: &dyn Fn(&SplitData) -> usize| {
        let mut row = vec![label.to_owned()];
        row.extend(sides.iter().map(|(_, s)| f(s).to_string()));
        table.row(row);
    };
    add("prompts", &|s| s.prompts);
    add("pairs formed", &|s| s.counts.pairs);
    add("  agree", &|s| s.counts.agree);
    add("  conflict", &|s| s.counts.conflict);
    add("  tied (dropped)", &|s| s.counts.tied);
    add("  identical responses (dropped)", &|s| s.identical_dropped);
    add("pairs kept", &|s| s.pairs.len());
    add("  agree", &|s| s.agree().len());
    add("  conflict", &|s| s.conflict().len());
    add(
        &format!("truncated to max_length {}: prompt", config.max_length),
        &|s| s.truncated().0,
    );
    add("  response", &|s| s.truncated().1);
    add("  pairs (either)", &|s| s.truncated().2);
    table.render(out);
}

/// Per dimension, how many pairs prefer a, b, or neither, on each side.
fn write_preferences(out: &mut String, dimensions: &[String], sides: &Sides) {
    out.push_str("\nper-dimension preference (over agree + conflict pairs formed; tie = masked)\n");
    let mut table = Table::new(&["", "train a", "b", "tie", "eval a", "b", "tie"]);
    for (i, name) in dimensions.iter().enumerate() {
        let mut row = vec![name.clone()];
        for (_, side) in sides {
            let c = side.counts.per_dimension[i];
            row.extend([c.prefers_a, c.prefers_b, c.ties].map(|n| n.to_string()));
        }
        table.row(row);
    }
    table.render(out);
}

/// For every two dimensions, the pairs where they prefer different responses.
fn write_conflicts(out: &mut String, dimensions: &[String], sides: &Sides) {
    out.push_str(
        "\nconflicts between dimensions (pairs where the two prefer different responses)\n",
    );
    let mut table = Table::new(&["", "train", "eval"]);
    for i in 0..dimensions.len() {
        for j in i + 1..dimensions.len() {
            let mut row = vec![format!("{} x {}", dimensions[i], dimensions[j])];
            row.extend(
                sides
                    .iter()
                    .map(|(_, s)| s.counts.conflicts[i][j].to_string()),
            );
            table.row(row);
        }
    }
    if dimensions.len() < 2 {
        table.row(vec!["(one dimension: no pairs of dimensions)".into()]);
    }
    table.render(out);
}

/// Percentiles of the prompt, response and pair lengths of one side's kept pairs.
fn write_lengths(out: &mut String, name: &str, side: &SplitData) {
    let _ = writeln!(
        out,
        "\n{name} token lengths before truncation (kept pairs; responses include EOS)"
    );
    let mut table = Table::new(&["", "p50", "p90", "p99", "max"]);
    let t: Vec<_> = side.pairs.iter().map(|p| p.truncation).collect();
    table.row(length_row(
        "prompt",
        t.iter().map(|t| t.prompt_len).collect(),
    ));
    table.row(length_row(
        "response",
        t.iter()
            .flat_map(|t| [t.response_a_len, t.response_b_len])
            .collect(),
    ));
    table.row(length_row(
        "pair (prompt + longer response)",
        t.iter().map(|t| t.pair_len()).collect(),
    ));
    table.render(out);
}

/// The pairs and global batches each curriculum stage trains on per epoch.
fn write_stage_batches(out: &mut String, config: &DataConfig, data: &PreferenceData) {
    let g = config.global_batch;
    let _ = writeln!(
        out,
        "\ntrain batches per epoch (global_batch {g}; the last incomplete global batch is dropped each epoch)"
    );
    let (agree, conflict) = (data.train.agree().len(), data.train.conflict().len());
    let subset = data.agree_subset().len();
    let mut table = Table::new(&["stage", "pairs", "global batches", "pairs dropped"]);
    for (stage, pairs) in [
        ("1 general (D_agree)", agree),
        ("2 dimension-specific (D_conflict)", conflict),
        (
            "3 conditioned (D_agree,sub + D_conflict)",
            subset + conflict,
        ),
    ] {
        table.row(vec![
            stage.into(),
            pairs.to_string(),
            (pairs / g).to_string(),
            (pairs % g).to_string(),
        ]);
    }
    table.render(out);
    if subset < conflict {
        let _ = writeln!(
            out,
            "note: D_agree has only {agree} pairs, fewer than |D_conflict| = {conflict}: stage 3 uses all of them"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Nearest rank: p-th percentile is the value at rank ceil(p/100 * n).
    #[test]
    fn percentiles_are_nearest_rank() {
        let values: Vec<usize> = (1..=10).collect();
        assert_eq!(percentile(&values, 50), 5);
        assert_eq!(percentile(&values, 90), 9);
        assert_eq!(percentile(&values, 99), 10);
        assert_eq!(percentile(&values, 100), 10);
        assert_eq!(percentile(&[7], 50), 7);
        assert_eq!(percentile(&[], 50), 0);
    }
}
