//! The figures of `eval --generate`, per dimension pair `(a, b)`:
//!
//! - `front-<a>-<b>.png`: every run's points in the plane of the mean scores on a and b, joined
//!   in grid order and each labelled by its weight on a; the reference point of the
//!   hypervolume as a grey cross;
//! - `scores-<a>-<b>.png`: the mean score on a (circles) and on b (triangles) against the
//!   weight on a, one colour per run, with the bootstrap interval as a vertical bar.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, Result};
use plotters::prelude::*;

use super::{GenerationComparison, PairFront};
use crate::eval::plot::{pair_file_name, register_font, COLOURS, SIZE};

/// Every figure, written into `out`; returns their paths.
pub fn write_plots(c: &GenerationComparison, out: &Path) -> Result<Vec<PathBuf>> {
    register_font()?;
    let mut written = Vec::new();
    for (f, front) in c.runs[0].fronts.iter().enumerate() {
        let (a, b) = front.pair;
        let (first, second) = (&c.dimensions[a], &c.dimensions[b]);
        let path = out.join(pair_file_name("front", first, second));
        draw_front(c, f, &path).map_err(|e| anyhow!("cannot draw {}: {e}", path.display()))?;
        written.push(path);
        let path = out.join(pair_file_name("scores", first, second));
        draw_scores(c, f, &path).map_err(|e| anyhow!("cannot draw {}: {e}", path.display()))?;
        written.push(path);
    }
    Ok(written)
}

/// `lo..hi` padded by a tenth of its span (at least 0.1 either side).
fn padded(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    let pad = ((hi - lo) / 10.0).max(0.1);
    (lo - pad, hi + pad)
}

/// "1", ".75", "0": a weight as short as it reads.
fn weight_label(w: f64) -> String {
    let text = format!("{w:.2}");
    let text = text.trim_end_matches('0').trim_end_matches('.');
    text.strip_prefix("0.")
        .map(|t| format!(".{t}"))
        .unwrap_or_else(|| text.to_string())
}

fn draw_front(
    c: &GenerationComparison,
    f: usize,
    path: &Path,
) -> Result<(), Box<dyn std::error::Error>> {
    let (a, b) = c.runs[0].fronts[f].pair;
    let fronts: Vec<&PairFront> = c.runs.iter().map(|r| &r.fronts[f]).collect();
    let reference = (c.reference_point[a], c.reference_point[b]);
    let all = || fronts.iter().flat_map(|fr| fr.points.iter());
    let (x_lo, x_hi) = padded(all().map(|p| p[0]).chain([reference.0]));
    let (y_lo, y_hi) = padded(all().map(|p| p[1]).chain([reference.1]));
    let root = BitMapBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!(
                "Generated answers, {} prompts: {} vs {}",
                c.prompts, c.dimensions[a], c.dimensions[b]
            ),
            ("sans-serif", 20),
        )
        .margin(14)
        .x_label_area_size(44)
        .y_label_area_size(56)
        .build_cartesian_2d(x_lo..x_hi, y_lo..y_hi)?;
    chart
        .configure_mesh()
        .x_desc(format!("mean score on {}", c.dimensions[a]))
        .y_desc(format!("mean score on {}", c.dimensions[b]))
        .label_style(("sans-serif", 14))
        .axis_desc_style(("sans-serif", 15))
        .light_line_style(WHITE.mix(0.0))
        .draw()?;
    chart.draw_series(std::iter::once(Cross::new(reference, 6, BLACK.mix(0.5))))?;
    for (r, front) in fronts.iter().enumerate() {
        let colour = COLOURS[r % COLOURS.len()];
        let line: Vec<(f64, f64)> = front.points.iter().map(|p| (p[0], p[1])).collect();
        chart
            .draw_series(LineSeries::new(line.clone(), colour.stroke_width(2)))?
            .label(format!(
                "{} (hypervolume {:.3})",
                c.runs[r].run.label, front.hypervolume
            ))
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(2))
            });
        chart.draw_series(line.iter().map(|&p| Circle::new(p, 4, colour.filled())))?;
        chart.draw_series(line.iter().zip(&front.first_weights).map(|(&p, &w)| {
            Text::new(
                weight_label(w),
                p,
                ("sans-serif", 12).into_font().color(&colour),
            )
        }))?;
    }
    chart
        .configure_series_labels()
        .label_font(("sans-serif", 14))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.4))
        .position(SeriesLabelPosition::LowerLeft)
        .draw()?;
    root.present()?;
    Ok(())
}

/// (weight on the pair's first dimension, mean score, interval) at each point of a line.
type ScoreLine = Vec<(f64, f64, Option<[f64; 2]>)>;

fn draw_scores(
    c: &GenerationComparison,
    f: usize,
    path: &Path,
) -> Result<(), Box<dyn std::error::Error>> {
    let (a, b) = c.runs[0].fronts[f].pair;
    // Per run and dimension (a, then b): (weight on a, mean, interval) at the pair's points.
    let series: Vec<[ScoreLine; 2]> = c
        .runs
        .iter()
        .map(|run| {
            let on_pair = |dim: usize| {
                let mut points: ScoreLine = run
                    .points
                    .iter()
                    .filter(|p| {
                        (0..p.weights.len()).all(|i| i == a || i == b || p.weights[i] == 0.0)
                    })
                    .map(|p| (p.weights[a], p.scores[dim].mean, p.scores[dim].interval))
                    .collect();
                points.sort_by(|x, y| x.0.total_cmp(&y.0));
                points
            };
            [on_pair(a), on_pair(b)]
        })
        .collect();
    let values = series.iter().flatten().flatten().flat_map(|&(_, m, i)| {
        [Some(m), i.map(|i| i[0]), i.map(|i| i[1])]
            .into_iter()
            .flatten()
    });
    let (y_lo, y_hi) = padded(values);
    let root = BitMapBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!(
                "Score against w: {} (circles), {} (triangles)",
                c.dimensions[a], c.dimensions[b]
            ),
            ("sans-serif", 20),
        )
        .margin(14)
        .x_label_area_size(44)
        .y_label_area_size(56)
        .build_cartesian_2d(-0.03f64..1.03f64, y_lo..y_hi)?;
    chart
        .configure_mesh()
        .x_desc(format!(
            "weight on {} (1 - weight on {})",
            c.dimensions[a], c.dimensions[b]
        ))
        .y_desc("mean score")
        .label_style(("sans-serif", 14))
        .axis_desc_style(("sans-serif", 15))
        .light_line_style(WHITE.mix(0.0))
        .draw()?;
    for (r, [on_a, on_b]) in series.iter().enumerate() {
        let colour = COLOURS[r % COLOURS.len()];
        for (d, points) in [on_a, on_b].into_iter().enumerate() {
            let line: Vec<(f64, f64)> = points.iter().map(|&(x, y, _)| (x, y)).collect();
            let drawn = chart.draw_series(LineSeries::new(line.clone(), colour.stroke_width(2)))?;
            if d == 0 {
                drawn
                    .label(c.runs[r].run.label.clone())
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(2))
                    });
            }
            chart.draw_series(points.iter().filter_map(|&(x, _, i)| {
                i.map(|[lo, hi]| PathElement::new(vec![(x, lo), (x, hi)], colour.mix(0.5)))
            }))?;
            if d == 0 {
                chart.draw_series(line.iter().map(|&p| Circle::new(p, 4, colour.filled())))?;
            } else {
                chart.draw_series(
                    line.iter()
                        .map(|&p| TriangleMarker::new(p, 5, colour.filled())),
                )?;
            }
        }
    }
    chart
        .configure_series_labels()
        .label_font(("sans-serif", 14))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.4))
        .position(SeriesLabelPosition::UpperRight)
        .draw()?;
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_read_short() {
        assert_eq!(weight_label(1.0), "1");
        assert_eq!(weight_label(0.75), ".75");
        assert_eq!(weight_label(0.5), ".5");
        assert_eq!(weight_label(0.0), "0");
    }
}
