//! The paper's Figures 2-3: for each pair of dimensions, accuracy against the weight on the
//! pair's first dimension (0 to 1, the other dimensions at 0), one line per run with its
//! bootstrap interval as a shaded band. PNG through `plotters`' bitmap backend; text is drawn
//! with DejaVu Sans embedded from the `dejavu` crate, so no system font is needed.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{anyhow, Result};
use plotters::prelude::*;
use plotters::style::FontStyle;

use super::runs::Comparison;

/// Line colours, one per run (matplotlib's first eight).
pub(super) const COLOURS: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
];

pub(super) const SIZE: (u32, u32) = (720, 480);

/// Registers the embedded font once per process as plotters' `sans-serif`.
pub(super) fn register_font() -> Result<()> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| {
        plotters::style::register_font("sans-serif", FontStyle::Normal, dejavu::sans::regular())
            .is_ok()
    });
    if ok {
        Ok(())
    } else {
        Err(anyhow!("the embedded DejaVu Sans font could not be read"))
    }
}

/// `accuracy-<first>-<second>.png`, with any character other than letters, digits, `-` and
/// `_` in a dimension name replaced by `_`.
pub fn plot_file_name(first: &str, second: &str) -> String {
    pair_file_name("accuracy", first, second)
}

/// `<what>-<first>-<second>.png`, the dimension names cleaned as [`plot_file_name`] says.
pub fn pair_file_name(what: &str, first: &str, second: &str) -> String {
    let clean = |s: &str| -> String {
        s.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                    c
                } else {
                    '_'
                }
            })
            .collect()
    };
    format!("{what}-{}-{}.png", clean(first), clean(second))
}

/// One figure per dimension pair, written into `out`; returns their paths.
pub fn write_plots(comparison: &Comparison, out: &Path) -> Result<Vec<PathBuf>> {
    let mut pairs: Vec<(usize, usize)> =
        comparison.settings.iter().filter_map(|s| s.pair).collect();
    pairs.dedup();
    if pairs.is_empty() {
        return Ok(Vec::new());
    }
    register_font()?;
    pairs
        .into_iter()
        .map(|pair| {
            let path = out.join(plot_file_name(
                &comparison.dimensions[pair.0],
                &comparison.dimensions[pair.1],
            ));
            draw_pair(comparison, pair, &path)
                .map_err(|e| anyhow!("cannot draw {}: {e}", path.display()))?;
            Ok(path)
        })
        .collect()
}

/// A run's points of one pair: (4 x weight on the first dimension, accuracy %, interval %).
type Points = Vec<(f64, f64, Option<(f64, f64)>)>;

fn pair_points(comparison: &Comparison, run: usize, pair: (usize, usize)) -> Points {
    let mut points: Points = comparison
        .settings
        .iter()
        .zip(&comparison.results[run])
        .filter(|(s, _)| s.pair == Some(pair))
        .filter_map(|(s, r)| {
            let a = &r.accuracy;
            a.accuracy.map(|acc| {
                let band = a.interval.map(|[lo, hi]| (100.0 * lo, 100.0 * hi));
                (4.0 * s.first_weight, 100.0 * acc, band)
            })
        })
        .collect();
    points.sort_by(|a, b| a.0.total_cmp(&b.0));
    points
}

/// The y range: every point and band, padded and rounded out to multiples of 5, within
/// [0, 100].
fn y_range(all: &[Points]) -> (f64, f64) {
    let values = all
        .iter()
        .flatten()
        .flat_map(|&(_, y, band)| [Some(y), band.map(|b| b.0), band.map(|b| b.1)])
        .flatten();
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    if !lo.is_finite() {
        return (0.0, 100.0);
    }
    let lo = ((lo - 2.0) / 5.0).floor() * 5.0;
    let hi = ((hi + 2.0) / 5.0).ceil() * 5.0;
    (lo.max(0.0), hi.min(100.0).max(lo.max(0.0) + 5.0))
}

fn draw_pair(
    comparison: &Comparison,
    (i, j): (usize, usize),
    path: &Path,
) -> Result<(), Box<dyn std::error::Error>> {
    let (first, second) = (&comparison.dimensions[i], &comparison.dimensions[j]);
    let all: Vec<Points> = (0..comparison.runs.len())
        .map(|r| pair_points(comparison, r, (i, j)))
        .collect();
    let (y_lo, y_hi) = y_range(&all);
    let root = BitMapBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    // Pairs counted per point differ with the ties at each w: say their range (a w where
    // every pair ties has no point).
    let counted: Vec<usize> = comparison
        .settings
        .iter()
        .zip(&comparison.results[0])
        .filter(|(s, _)| s.pair == Some((i, j)))
        .map(|(_, r)| r.accuracy.counted)
        .filter(|&n| n > 0)
        .collect();
    let (fewest, most) = (
        counted.iter().min().copied().unwrap_or(0),
        counted.iter().max().copied().unwrap_or(0),
    );
    let n = if fewest == most {
        format!("{most}")
    } else {
        format!("{fewest}-{most}")
    };
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("{first} vs {second}: {n} conflict pairs per point"),
            ("sans-serif", 20),
        )
        .margin(14)
        .x_label_area_size(44)
        .y_label_area_size(56)
        // x in quarters (0..4), so the ticks fall on the grid's weights 0, .25, .., 1.
        .build_cartesian_2d(-0.12f64..4.12f64, y_lo..y_hi)?;
    chart
        .configure_mesh()
        .x_desc(format!("weight on {first} (1 - weight on {second})"))
        .y_desc("accuracy (%)")
        .x_labels(5)
        .y_labels(8)
        .x_label_formatter(&|x| format!("{:.2}", x / 4.0))
        .y_label_formatter(&|y| format!("{y:.0}"))
        .label_style(("sans-serif", 14))
        .axis_desc_style(("sans-serif", 15))
        .light_line_style(WHITE.mix(0.0))
        .draw()?;
    for (r, points) in all.iter().enumerate() {
        let colour = COLOURS[r % COLOURS.len()];
        let band: Vec<(f64, f64)> = points
            .iter()
            .filter_map(|&(x, _, b)| b.map(|(lo, _)| (x, lo)))
            .chain(
                points
                    .iter()
                    .rev()
                    .filter_map(|&(x, _, b)| b.map(|(_, hi)| (x, hi))),
            )
            .collect();
        if band.len() >= 3 {
            chart.draw_series(std::iter::once(Polygon::new(
                band,
                colour.mix(0.15).filled(),
            )))?;
        }
        let line: Vec<(f64, f64)> = points.iter().map(|&(x, y, _)| (x, y)).collect();
        chart
            .draw_series(LineSeries::new(line.clone(), colour.stroke_width(2)))?
            .label(comparison.runs[r].label.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(2))
            });
        chart.draw_series(line.into_iter().map(|p| Circle::new(p, 4, colour.filled())))?;
    }
    chart
        .configure_series_labels()
        .label_font(("sans-serif", 14))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.4))
        .position(SeriesLabelPosition::LowerRight)
        .draw()?;
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_are_safe() {
        assert_eq!(
            plot_file_name("helpfulness", "verbosity"),
            "accuracy-helpfulness-verbosity.png"
        );
        assert_eq!(plot_file_name("a b", "c/d"), "accuracy-a_b-c_d.png");
    }

    #[test]
    fn y_range_covers_points_and_bands() {
        let points = vec![vec![(0.0, 52.0, Some((40.0, 61.0))), (1.0, 70.0, None)]];
        assert_eq!(y_range(&points), (35.0, 75.0));
        assert_eq!(y_range(&[vec![]]), (0.0, 100.0));
        let high = vec![vec![(0.0, 99.0, Some((97.0, 100.0)))]];
        assert_eq!(y_range(&high), (95.0, 100.0));
    }
}
