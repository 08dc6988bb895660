//! Training curves from a run's `metrics.jsonl`: the loss and the training accuracy of every
//! optimizer step against the step count over all stages, each as the raw values (faint) and
//! a trailing moving average within each stage, with the stage boundaries marked and, where the run evaluated
//! during training (`train.eval_every`), the held-out conflict-pair mean accuracy as points.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use plotters::prelude::*;

use super::plot::register_font;

/// Steps in the trailing moving average.
pub const SMOOTHING: usize = 20;

/// One optimizer step of the log.
#[derive(Debug, Clone, PartialEq)]
pub struct StepPoint {
    pub stage: usize,
    /// The step within its stage (1-based, as logged).
    pub step: usize,
    pub loss: f64,
    /// Correct over counted pairs, over every dimension of the step.
    pub accuracy: Option<f64>,
}

/// A held-out evaluation logged during training.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalPoint {
    pub stage: usize,
    pub step: usize,
    pub mean_accuracy: f64,
}

/// The steps and evaluations of `metrics.jsonl`, in stage and step order. A step logged twice
/// (a run resumed from a checkpoint before it) keeps its last line, which the final adapters
/// descend from.
pub fn read_metrics(path: &Path) -> Result<(Vec<StepPoint>, Vec<EvalPoint>)> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut steps = BTreeMap::new();
    let mut evals = BTreeMap::new();
    for (index, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = || format!("{}:{}", path.display(), index + 1);
        let record: serde_json::Value =
            serde_json::from_str(line).with_context(|| format!("{}: not JSON", at()))?;
        // Events (the reference pass, a resume or restart) are not points of a curve.
        if record.get("event").is_some() {
            continue;
        }
        let int = |key: &str| -> Result<usize> {
            record[key]
                .as_u64()
                .map(|v| v as usize)
                .with_context(|| format!("{}: no integer {key:?}", at()))
        };
        let (stage, step) = (int("stage")?, int("step")?);
        if let Some(eval) = record.get("eval") {
            if let Some(mean) = eval["mean_accuracy"].as_f64() {
                evals.insert((stage, step), mean);
            }
            continue;
        }
        let loss = record["loss"]
            .as_f64()
            .with_context(|| format!("{}: no number \"loss\"", at()))?;
        let (mut correct, mut counted) = (0.0, 0.0);
        if let Some(dimensions) = record["dimensions"].as_object() {
            for d in dimensions.values() {
                let pairs = d["pairs"].as_f64().unwrap_or(0.0);
                correct += d["accuracy"].as_f64().unwrap_or(0.0) * pairs;
                counted += pairs;
            }
        }
        let accuracy = (counted > 0.0).then(|| correct / counted);
        steps.insert((stage, step), (loss, accuracy));
    }
    if steps.is_empty() {
        bail!("{} holds no optimizer step", path.display());
    }
    let steps = steps
        .into_iter()
        .map(|((stage, step), (loss, accuracy))| StepPoint {
            stage,
            step,
            loss,
            accuracy,
        })
        .collect();
    let evals = evals
        .into_iter()
        .map(|((stage, step), mean_accuracy)| EvalPoint {
            stage,
            step,
            mean_accuracy,
        })
        .collect();
    Ok((steps, evals))
}

/// The trailing mean of the last `window` values at every position.
pub fn moving_average(values: &[f64], window: usize) -> Vec<f64> {
    let mut sum = 0.0;
    values
        .iter()
        .enumerate()
        .map(|(i, &v)| {
            sum += v;
            if i >= window {
                sum -= values[i - window];
            }
            sum / (i + 1).min(window) as f64
        })
        .collect()
}

/// [`moving_average`] within each stage: a stage's first steps average only its own steps, as
/// the stages' losses are on different scales (stage 1 has one DPO term, stage 2 k of them).
fn smooth_by_stage(values: &[f64], stages: &[usize]) -> Vec<f64> {
    let mut smooth = Vec::with_capacity(values.len());
    let mut start = 0;
    while start < values.len() {
        let end = (start..values.len())
            .find(|&i| stages[i] != stages[start])
            .unwrap_or(values.len());
        smooth.extend(moving_average(&values[start..end], SMOOTHING));
        start = end;
    }
    smooth
}

/// Draws `curves.png`-style figure of `metrics` into `out`: loss above, accuracy below.
pub fn write_curves(metrics: &Path, title: &str, out: &Path) -> Result<()> {
    let (steps, evals) = read_metrics(metrics)?;
    register_font()?;
    draw(&steps, &evals, title, out).map_err(|e| anyhow!("cannot draw {}: {e}", out.display()))
}

/// The x of every step: the step count over all stages (stage s's step i at the steps of
/// the stages before it + i), and where each stage starts.
fn step_axis(steps: &[StepPoint]) -> (Vec<usize>, BTreeMap<usize, usize>) {
    let mut starts = BTreeMap::new();
    let mut x = Vec::with_capacity(steps.len());
    let mut offset = 0;
    let mut last_stage = None;
    for p in steps {
        if last_stage != Some(p.stage) {
            offset = x.last().copied().unwrap_or(0);
            starts.insert(p.stage, offset);
            last_stage = Some(p.stage);
        }
        x.push(offset + p.step);
    }
    (x, starts)
}

type Panel<'a> = DrawingArea<BitMapBackend<'a>, plotters::coord::Shift>;
type DrawResult = Result<(), Box<dyn std::error::Error>>;

const LOSS_COLOUR: RGBColor = RGBColor(31, 119, 180);
const TRAIN_COLOUR: RGBColor = RGBColor(255, 127, 14);
const HELD_OUT_COLOUR: RGBColor = RGBColor(44, 160, 44);

fn draw(steps: &[StepPoint], evals: &[EvalPoint], title: &str, out: &Path) -> DrawResult {
    let (x, starts) = step_axis(steps);
    let root = BitMapBackend::new(out, (900, 640)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(title, ("sans-serif", 20))?;
    let (upper, lower) = root.split_vertically(300);
    draw_loss(&upper, steps, &x, &starts)?;
    draw_accuracy(&lower, steps, evals, &x, &starts)?;
    root.present()?;
    Ok(())
}

/// A vertical line at every stage start but the first.
fn stage_lines(
    starts: &BTreeMap<usize, usize>,
    low: f64,
    high: f64,
) -> Vec<PathElement<(f64, f64)>> {
    starts
        .values()
        .filter(|&&s| s > 0)
        .map(|&s| PathElement::new(vec![(s as f64, low), (s as f64, high)], BLACK.mix(0.4)))
        .collect()
}

fn draw_loss(
    panel: &Panel,
    steps: &[StepPoint],
    x: &[usize],
    starts: &BTreeMap<usize, usize>,
) -> DrawResult {
    let total = *x.last().unwrap_or(&1) as f64;
    let loss: Vec<f64> = steps.iter().map(|p| p.loss).collect();
    let (lo, hi) = loss
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &v| {
            (a.min(v), b.max(v))
        });
    let pad = ((hi - lo) * 0.05).max(1e-3);
    let (low, high) = (lo - pad, hi + pad);
    let mut chart = ChartBuilder::on(panel)
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(56)
        .build_cartesian_2d(0f64..total, low..high)?;
    chart
        .configure_mesh()
        .y_desc("loss")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .label_style(("sans-serif", 13))
        .axis_desc_style(("sans-serif", 14))
        .light_line_style(WHITE.mix(0.0))
        .draw()?;
    let xs = || x.iter().map(|&s| s as f64);
    chart.draw_series(LineSeries::new(
        xs().zip(loss.iter().copied()),
        LOSS_COLOUR.mix(0.25),
    ))?;
    let stages: Vec<usize> = steps.iter().map(|p| p.stage).collect();
    let smooth = smooth_by_stage(&loss, &stages);
    chart
        .draw_series(LineSeries::new(
            xs().zip(smooth),
            LOSS_COLOUR.stroke_width(2),
        ))?
        .label(format!("loss ({SMOOTHING}-step mean)"))
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], LOSS_COLOUR.stroke_width(2)));
    chart.draw_series(stage_lines(starts, low, high))?;
    chart.draw_series(starts.iter().map(|(&stage, &start)| {
        let at = (start as f64 + total * 0.01, high - pad * 0.2);
        Text::new(format!("stage {stage}"), at, ("sans-serif", 13))
    }))?;
    chart
        .configure_series_labels()
        .label_font(("sans-serif", 13))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.4))
        .position(SeriesLabelPosition::UpperRight)
        .draw()?;
    Ok(())
}

fn draw_accuracy(
    panel: &Panel,
    steps: &[StepPoint],
    evals: &[EvalPoint],
    x: &[usize],
    starts: &BTreeMap<usize, usize>,
) -> DrawResult {
    let total = *x.last().unwrap_or(&1) as f64;
    let (accuracy, stages): (Vec<(f64, f64)>, Vec<usize>) = steps
        .iter()
        .zip(x)
        .filter_map(|(p, &x)| p.accuracy.map(|a| ((x as f64, 100.0 * a), p.stage)))
        .unzip();
    let mut chart = ChartBuilder::on(panel)
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(56)
        .build_cartesian_2d(0f64..total, 0f64..100f64)?;
    chart
        .configure_mesh()
        .x_desc("optimizer steps, all stages")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_desc("accuracy (%)")
        .label_style(("sans-serif", 13))
        .axis_desc_style(("sans-serif", 14))
        .light_line_style(WHITE.mix(0.0))
        .draw()?;
    chart.draw_series(LineSeries::new(accuracy.clone(), TRAIN_COLOUR.mix(0.25)))?;
    let values: Vec<f64> = accuracy.iter().map(|p| p.1).collect();
    let smooth = smooth_by_stage(&values, &stages);
    chart
        .draw_series(LineSeries::new(
            accuracy.iter().map(|p| p.0).zip(smooth),
            TRAIN_COLOUR.stroke_width(2),
        ))?
        .label(format!("training pairs ({SMOOTHING}-step mean)"))
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], TRAIN_COLOUR.stroke_width(2)));
    let held_out: Vec<(f64, f64)> = evals
        .iter()
        .filter_map(|e| {
            let start = starts.get(&e.stage)?;
            Some(((start + e.step) as f64, 100.0 * e.mean_accuracy))
        })
        .collect();
    if !held_out.is_empty() {
        chart
            .draw_series(
                held_out
                    .into_iter()
                    .map(|p| Circle::new(p, 4, HELD_OUT_COLOUR.filled())),
            )?
            .label("held-out conflict pairs, mean over settings")
            .legend(|(x, y)| Circle::new((x + 10, y), 4, HELD_OUT_COLOUR.filled()));
    }
    chart.draw_series(stage_lines(starts, 0.0, 100.0))?;
    chart
        .configure_series_labels()
        .label_font(("sans-serif", 13))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.4))
        .position(SeriesLabelPosition::LowerRight)
        .draw()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn moving_average_is_trailing() {
        // By hand: [1], [1,3], [1,3,5], [3,5,7] -> 1, 2, 3, 5.
        assert_eq!(
            moving_average(&[1.0, 3.0, 5.0, 7.0], 3),
            [1.0, 2.0, 3.0, 5.0]
        );
    }

    #[test]
    fn metrics_keep_the_last_line_of_a_step_read_evaluations_and_skip_events() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.jsonl");
        let dims = r#""dimensions": {"a": {"accuracy": 0.5, "pairs": 4}, "b": {"accuracy": 1.0, "pairs": 4}}"#;
        let text = format!(
            "{{\"event\": \"reference\", \"chunks\": 2, \"found\": 0, \"computed\": 2}}\n\
             {{\"stage\": 1, \"step\": 1, \"loss\": 0.7, {dims}}}\n\
             {{\"stage\": 1, \"step\": 2, \"loss\": 0.6, {dims}}}\n\
             {{\"event\": \"resumed\", \"checkpoint\": \"c\", \"stage\": 1, \"step\": 1}}\n\
             {{\"stage\": 1, \"step\": 2, \"loss\": 0.5, {dims}}}\n\
             {{\"stage\": 1, \"step\": 2, \"eval\": {{\"mean_accuracy\": 0.8}}}}\n\
             {{\"stage\": 2, \"step\": 1, \"loss\": 0.4, \"dimensions\": {{}}}}\n"
        );
        std::fs::write(&path, text).unwrap();
        let (steps, evals) = read_metrics(&path).unwrap();
        let losses: Vec<f64> = steps.iter().map(|s| s.loss).collect();
        assert_eq!(losses, [0.7, 0.5, 0.4]);
        // (0.5 x 4 + 1.0 x 4) / 8 = 0.75; no dimension counted in the last step.
        assert_eq!(steps[0].accuracy, Some(0.75));
        assert_eq!(steps[2].accuracy, None);
        assert_eq!(
            evals,
            [EvalPoint {
                stage: 1,
                step: 2,
                mean_accuracy: 0.8
            }]
        );
        let png = dir.path().join("curves.png");
        write_curves(&path, "test", &png).unwrap();
        assert!(std::fs::read(&png).unwrap().starts_with(b"\x89PNG"));
        std::fs::write(&path, "{\"stage\": 1}\n").unwrap();
        let err = format!("{:#}", read_metrics(&path).unwrap_err());
        assert!(
            err.contains("metrics.jsonl:1") && err.contains("step"),
            "{err}"
        );
    }
}
