//! What a model *generates* at each `w` (`modpo-trainer eval --generate`): the evaluation
//! MODPO, Rewarded Soups, RiC and Panacea report, beside the paper's implicit-reward accuracy.
//!
//! For a grid of weight vectors (the paper's five points per dimension pair, or `grid` points
//! between the two vertices of a k = 2 run), every run answers the same held-out prompts (the
//! first `prompts` distinct prompts of its eval split), all the grid's `w` of one prompt in one
//! batch, one `w` per row (`model::generate::generate_rows`), greedily or sampled with a seed
//! per prompt and `w`. A [`Scorer`] scores every answer on every dimension: the synthetic
//! scenario's exact rule, or the reward models of `train-rm`. Per run and `w`: the mean score
//! per dimension and the mean answer length in tokens, each with a bootstrap interval over the
//! prompts. Per run:
//!
//! - per dimension pair `(a, b)`, the **front**: the mean scores `(s_a, s_b)` at the pair's
//!   grid points, its non-dominated points and its **hypervolume** (the area the points
//!   dominate above the scorer's fixed reference point, stated in the results);
//! - **controllability**: per dimension i, Spearman's correlation between `w_i` and the mean
//!   score on i over the grid's distinct points, and the share of steps between adjacent
//!   points of a pair's line whose score on i moves the way `w_i` moves;
//! - the **vertex gaps**: score on i at `w = 1_i` minus at `w = 1_j`, paired over prompts
//!   (positive: the model trained toward i scores higher on i).

pub mod front;
pub mod plot;
pub mod report;
pub mod scorer;

use std::path::PathBuf;

use anyhow::{bail, ensure, Context, Result};
use rand::Rng;
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use super::metrics::{mean_estimate, weight_stream, Bootstrap, MeanEstimate};
use super::runs::{method_name, run_labels, RunInfo};
use super::{distinct_weights, paper_settings, Setting};
use crate::data::{self, split::seeded_rng};
use crate::model::generate::{generate_rows, GenerateOptions};
use crate::model::{Conditioning, DeviceChoice, DtypeChoice};
use crate::saved_run::{self, SavedRun};
pub use scorer::{Answer, Scorer};

/// How answers are decoded.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Decoding {
    pub max_new_tokens: usize,
    /// 0: greedy.
    pub temperature: f64,
    pub top_p: f64,
    /// Seed of the sampling (each prompt and `w` draws its own stream from it).
    pub seed: u64,
}

/// What to generate and how.
#[derive(Debug, Clone)]
pub struct GenerationOptions {
    /// Run directories, in the order the report lists them.
    pub runs: Vec<PathBuf>,
    /// Held-out prompts to answer.
    pub prompts: usize,
    /// Points of the simplex between the two vertices (k = 2 only) instead of the paper's five.
    pub grid: Option<usize>,
    pub decoding: Decoding,
    pub device: Option<DeviceChoice>,
    pub dtype: Option<DtypeChoice>,
    pub bootstrap: Bootstrap,
}

/// The grid: the paper's settings, or for k = 2 `n` evenly spaced points from (1, 0) to (0, 1).
pub fn generation_settings(k: usize, grid: Option<usize>) -> Result<Vec<Setting>> {
    let Some(n) = grid else {
        return Ok(paper_settings(k));
    };
    ensure!(
        k == 2,
        "--grid: {n} points between two vertices is for runs of 2 dimensions, these have {k} \
         (leave it out for the paper's 5 points per dimension pair)"
    );
    ensure!(
        n >= 2,
        "--grid: need at least 2 points (the two vertices), got {n}"
    );
    Ok((0..n)
        .map(|i| {
            let first = 1.0 - i as f64 / (n - 1) as f64;
            Setting {
                weights: vec![first, 1.0 - first],
                pair: Some((0, 1)),
                first_weight: first,
            }
        })
        .collect())
}

/// One grid point of one run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GridPoint {
    pub weights: Vec<f64>,
    /// Mean score per dimension over the prompts.
    pub scores: Vec<MeanEstimate>,
    /// Mean answer length in tokens (end-of-sequence token excluded).
    pub length: MeanEstimate,
}

/// The front of one dimension pair.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PairFront {
    pub pair: (usize, usize),
    /// The weight on the pair's first dimension at each point.
    pub first_weights: Vec<f64>,
    /// (mean score on the first dimension, on the second) at each point.
    pub points: Vec<[f64; 2]>,
    /// Indices of the non-dominated points, by increasing first score.
    pub front: Vec<usize>,
    /// Area dominated above `(reference[a], reference[b])`.
    pub hypervolume: f64,
}

/// How well scores follow `w`, per dimension.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Controllability {
    /// Spearman's correlation of `w_i` with the mean score on i over the distinct grid points
    /// (`None` where either is constant).
    pub spearman: Vec<Option<f64>>,
    /// Steps between adjacent points of the pair lines through i whose score on i moves with
    /// `w_i`, and all such steps.
    pub following: Vec<[usize; 2]>,
    /// All dimensions' following steps over all their steps.
    pub share: Option<f64>,
}

/// Score on `dimension` at `w = 1_dimension` minus at `w = 1_against`, over the prompts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VertexGap {
    pub dimension: usize,
    pub against: usize,
    pub gap: MeanEstimate,
}

/// A prompt and the answer at every distinct grid point.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Example {
    pub prompt: String,
    pub answers: Vec<String>,
}

/// Everything measured for one run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunGeneration {
    pub run: RunInfo,
    /// One per distinct grid weight vector.
    pub points: Vec<GridPoint>,
    pub fronts: Vec<PairFront>,
    pub controllability: Controllability,
    pub vertex_gaps: Vec<VertexGap>,
    pub examples: Vec<Example>,
}

/// Every run's generations on one grid and one set of prompts.
#[derive(Debug, Clone)]
pub struct GenerationComparison {
    pub dimensions: Vec<String>,
    pub scorer: String,
    pub reference_point: Vec<f64>,
    pub settings: Vec<Setting>,
    /// The distinct weight vectors of `settings`, in first-seen order (the rows of a batch).
    pub weights: Vec<Vec<f64>>,
    pub prompts: usize,
    pub decoding: Decoding,
    pub bootstrap: Bootstrap,
    pub runs: Vec<RunGeneration>,
}

/// Answers kept as examples per run.
const EXAMPLES: usize = 2;

/// The first `n` distinct prompts (chat-templated token ids) of the run's held-out split.
pub fn held_out_prompts(run: &SavedRun, n: usize) -> Result<Vec<Vec<u32>>> {
    let data = data::load(&run.config.data, &run.tokenizer)
        .with_context(|| format!("cannot load the data of run {}", run.dir.display()))?;
    let mut prompts: Vec<Vec<u32>> = Vec::new();
    for pair in &data.eval.pairs {
        if prompts.len() == n {
            break;
        }
        if !prompts.contains(&pair.prompt_ids) {
            prompts.push(pair.prompt_ids.clone());
        }
    }
    if prompts.len() < n {
        bail!(
            "--prompts {n}: the held-out split of run {} has only {} distinct prompts",
            run.dir.display(),
            prompts.len()
        );
    }
    Ok(prompts)
}

/// The sampling seed of one prompt and `w`: independent of the batch it is generated in.
fn row_seed(seed: u64, prompt: usize, weights: &[f64]) -> u64 {
    seeded_rng("eval-generate", seed, prompt as u64).random::<u64>() ^ weight_stream(weights)
}

/// `answers[p][v]`: the run's answer to prompt p at weight vector v.
pub fn generate_answers(
    run: &SavedRun,
    prompts: &[Vec<u32>],
    weights: &[Vec<f64>],
    options: &GenerationOptions,
) -> Result<Vec<Vec<Answer>>> {
    let (loaded, device, _) = run.load_model(options.device, options.dtype)?;
    let eos = run.tokenizer.eos_token_id();
    let decoding = &options.decoding;
    let opts = GenerateOptions {
        max_new_tokens: decoding.max_new_tokens,
        temperature: decoding.temperature,
        top_p: decoding.top_p,
        seed: decoding.seed,
        eos_token_id: Some(eos),
    };
    let k = weights[0].len() as i64;
    let flat: Vec<f64> = weights.iter().flatten().copied().collect();
    let w = Tensor::from_slice(&flat)
        .to_kind(Kind::Float)
        .view([weights.len() as i64, k])
        .to_device(device); // [rows, k]
    let mut answers = Vec::with_capacity(prompts.len());
    for (p, prompt) in prompts.iter().enumerate() {
        let seeds: Vec<u64> = weights
            .iter()
            .map(|w| row_seed(decoding.seed, p, w))
            .collect();
        let rows = generate_rows(
            &loaded.model,
            prompt,
            Conditioning::Weighted(&w),
            &opts,
            &seeds,
        )
        .with_context(|| format!("generating for run {}", run.dir.display()))?;
        let row_answers = rows
            .into_iter()
            .map(|mut ids| {
                if ids.last() == Some(&eos) {
                    ids.pop();
                }
                let text = run.tokenizer.decode(&ids, true)?;
                Ok(Answer { ids, text })
            })
            .collect::<Result<Vec<_>>>()?;
        answers.push(row_answers);
    }
    Ok(answers)
}

/// Raw measurements of one run: `scores[v][p][i]` and `lengths[v][p]`.
struct Measured {
    scores: Vec<Vec<Vec<f64>>>,
    lengths: Vec<Vec<f64>>,
}

fn measure(
    answers: &[Vec<Answer>],
    prompts: &[Vec<u32>],
    scorer: &dyn Scorer,
    rows: usize,
) -> Result<Measured> {
    let mut measured = Measured {
        scores: vec![Vec::new(); rows],
        lengths: vec![Vec::new(); rows],
    };
    for (prompt, row_answers) in prompts.iter().zip(answers) {
        let scores = scorer.score(prompt, row_answers)?;
        for (v, (s, a)) in scores.into_iter().zip(row_answers).enumerate() {
            measured.scores[v].push(s);
            measured.lengths[v].push(a.ids.len() as f64);
        }
    }
    Ok(measured)
}

/// The grid points, fronts, controllability and vertex gaps of one run's measurements.
fn summarise(
    measured: &Measured,
    settings: &[Setting],
    weights: &[Vec<f64>],
    reference: &[f64],
    bootstrap: &Bootstrap,
) -> (
    Vec<GridPoint>,
    Vec<PairFront>,
    Controllability,
    Vec<VertexGap>,
) {
    let k = reference.len();
    let points: Vec<GridPoint> = weights
        .iter()
        .enumerate()
        .map(|(v, w)| {
            let stream = weight_stream(w);
            let scores = (0..k)
                .map(|i| {
                    let values: Vec<f64> = measured.scores[v].iter().map(|s| s[i]).collect();
                    mean_estimate(&values, bootstrap, stream)
                })
                .collect();
            let length = mean_estimate(&measured.lengths[v], bootstrap, stream);
            GridPoint {
                weights: w.clone(),
                scores,
                length,
            }
        })
        .collect();
    let (_, index) = distinct_weights(settings);
    let fronts = pair_fronts(&points, settings, &index, reference);
    let controllability = controllability(&points, settings, &index, k);
    let gaps = vertex_gaps(measured, weights, bootstrap);
    (points, fronts, controllability, gaps)
}

/// The pairs of `settings`, in order of first appearance.
pub fn setting_pairs(settings: &[Setting]) -> Vec<(usize, usize)> {
    let mut pairs: Vec<(usize, usize)> = Vec::new();
    for pair in settings.iter().filter_map(|s| s.pair) {
        if !pairs.contains(&pair) {
            pairs.push(pair);
        }
    }
    pairs
}

fn pair_fronts(
    points: &[GridPoint],
    settings: &[Setting],
    index: &[usize],
    reference: &[f64],
) -> Vec<PairFront> {
    setting_pairs(settings)
        .into_iter()
        .map(|(a, b)| {
            let on_pair: Vec<(f64, [f64; 2])> = settings
                .iter()
                .zip(index)
                .filter(|(s, _)| s.pair == Some((a, b)))
                .map(|(s, &v)| {
                    let p = &points[v];
                    (s.first_weight, [p.scores[a].mean, p.scores[b].mean])
                })
                .collect();
            let xy: Vec<[f64; 2]> = on_pair.iter().map(|(_, p)| *p).collect();
            PairFront {
                pair: (a, b),
                first_weights: on_pair.iter().map(|(w, _)| *w).collect(),
                front: front::pareto_front(&xy),
                hypervolume: front::hypervolume_2d(&xy, [reference[a], reference[b]]),
                points: xy,
            }
        })
        .collect()
}

fn controllability(
    points: &[GridPoint],
    settings: &[Setting],
    index: &[usize],
    k: usize,
) -> Controllability {
    let spearman = (0..k)
        .map(|i| {
            let w: Vec<f64> = points.iter().map(|p| p.weights[i]).collect();
            let s: Vec<f64> = points.iter().map(|p| p.scores[i].mean).collect();
            front::spearman(&w, &s)
        })
        .collect();
    let mut following = vec![[0usize; 2]; k];
    for (a, b) in setting_pairs(settings) {
        let mut line: Vec<usize> = settings
            .iter()
            .zip(index)
            .filter(|(s, _)| s.pair == Some((a, b)))
            .map(|(_, &v)| v)
            .collect();
        line.sort_by(|&x, &y| points[x].weights[a].total_cmp(&points[y].weights[a]));
        for i in [a, b] {
            let w: Vec<f64> = line.iter().map(|&v| points[v].weights[i]).collect();
            let s: Vec<f64> = line.iter().map(|&v| points[v].scores[i].mean).collect();
            let (follow, steps) = front::moves_with_weight(&w, &s);
            following[i][0] += follow;
            following[i][1] += steps;
        }
    }
    let (follow, steps) = following
        .iter()
        .fold((0, 0), |(f, s), [a, b]| (f + a, s + b));
    Controllability {
        spearman,
        following,
        share: (steps > 0).then(|| follow as f64 / steps as f64),
    }
}

/// Per ordered pair of vertices present in the grid: score on i at 1_i minus at 1_j.
fn vertex_gaps(measured: &Measured, weights: &[Vec<f64>], bootstrap: &Bootstrap) -> Vec<VertexGap> {
    let k = weights[0].len();
    let vertex = |i: usize| weights.iter().position(|w| w[i] == 1.0);
    let mut gaps = Vec::new();
    for i in 0..k {
        for j in (0..k).filter(|&j| j != i) {
            let (Some(vi), Some(vj)) = (vertex(i), vertex(j)) else {
                continue;
            };
            let differences: Vec<f64> = measured.scores[vi]
                .iter()
                .zip(&measured.scores[vj])
                .map(|(at_i, at_j)| at_i[i] - at_j[i])
                .collect();
            let stream = weight_stream(&[i as f64, j as f64]);
            gaps.push(VertexGap {
                dimension: i,
                against: j,
                gap: mean_estimate(&differences, bootstrap, stream),
            });
        }
    }
    gaps
}

/// Generates, scores and summarises every run (one model in memory at a time).
pub fn compare_generations(
    options: &GenerationOptions,
    scorer: &dyn Scorer,
) -> Result<GenerationComparison> {
    ensure!(
        !options.runs.is_empty(),
        "no run to evaluate: give at least one --run DIR"
    );
    ensure!(options.prompts > 0, "--prompts: need at least one prompt");
    ensure!(
        options.decoding.max_new_tokens > 0,
        "--max-new-tokens: need at least one token"
    );
    let runs = options
        .runs
        .iter()
        .map(|dir| saved_run::read_run(dir).map_err(anyhow::Error::from))
        .collect::<Result<Vec<_>>>()?;
    let dimensions = runs[0].meta.dimensions.clone();
    for run in &runs {
        if run.meta.dimensions != dimensions {
            bail!(
                "runs {} and {} cannot be compared: their dimensions differ ([{}] vs [{}])",
                runs[0].dir.display(),
                run.dir.display(),
                dimensions.join(", "),
                run.meta.dimensions.join(", ")
            );
        }
    }
    if scorer.dimensions() != dimensions {
        bail!(
            "the scorer scores [{}] but the runs have dimensions [{}]",
            scorer.dimensions().join(", "),
            dimensions.join(", ")
        );
    }
    let settings = generation_settings(dimensions.len(), options.grid)?;
    let (weights, _) = distinct_weights(&settings);
    let prompts = held_out_prompts(&runs[0], options.prompts)?;
    for run in &runs[1..] {
        if held_out_prompts(run, options.prompts)? != prompts {
            bail!(
                "runs {} and {} cannot be compared: their first {} held-out prompts differ \
                 (other eval data, split or tokenizer)",
                runs[0].dir.display(),
                run.dir.display(),
                options.prompts
            );
        }
    }
    let reference = scorer.reference_point();
    let named: Vec<(String, &std::path::Path)> = runs
        .iter()
        .map(|r| (method_name(&r.config), r.dir.as_path()))
        .collect();
    let labels = run_labels(&named);
    let mut results = Vec::with_capacity(runs.len());
    for (run, label) in runs.iter().zip(labels) {
        tracing::info!(run = %run.dir.display(), prompts = prompts.len(), grid = weights.len(), "generating");
        let answers = generate_answers(run, &prompts, &weights, options)?;
        let measured = measure(&answers, &prompts, scorer, weights.len())?;
        let (points, fronts, controllability, vertex_gaps) = summarise(
            &measured,
            &settings,
            &weights,
            &reference,
            &options.bootstrap,
        );
        let examples = prompts
            .iter()
            .zip(&answers)
            .take(EXAMPLES)
            .map(|(prompt, row)| {
                Ok(Example {
                    prompt: run.tokenizer.decode(prompt, true)?,
                    answers: row.iter().map(|a| a.text.clone()).collect(),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        results.push(RunGeneration {
            run: RunInfo {
                label,
                method: method_name(&run.config),
                run_dir: run.dir.clone(),
                model_path: run.meta.model_path.clone(),
                beta: run.config.method.beta,
            },
            points,
            fronts,
            controllability,
            vertex_gaps,
            examples,
        });
    }
    Ok(GenerationComparison {
        dimensions,
        scorer: scorer.description(),
        reference_point: reference,
        settings,
        weights,
        prompts: prompts.len(),
        decoding: options.decoding,
        bootstrap: options.bootstrap,
        runs: results,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_grid_of_n_points_runs_from_one_vertex_to_the_other() {
        let grid = generation_settings(2, Some(3)).unwrap();
        let weights: Vec<Vec<f64>> = grid.iter().map(|s| s.weights.clone()).collect();
        assert_eq!(
            weights,
            vec![vec![1.0, 0.0], vec![0.5, 0.5], vec![0.0, 1.0]]
        );
        assert_eq!(generation_settings(5, None).unwrap().len(), 50);
        let err = generation_settings(3, Some(4)).unwrap_err().to_string();
        assert!(err.contains("--grid") && err.contains("have 3"), "{err}");
        assert!(generation_settings(2, Some(1)).is_err());
    }

    /// The paper's k = 2 grid, w_0 = 1, .75, .5, .25, 0, one prompt, scores (3, 0), (2, 1),
    /// (2, 1), (1, 2), (0, 3) above the reference (0, 0).
    /// - Hypervolume: (3, 0) and (0, 3) are not above the reference; (2, 1) adds 2 x 1 and
    ///   (1, 2) the strip 1 x (2 - 1): 3.
    /// - Spearman of w_0 (ranks 5..1) with s_0 (3, 2, 2, 1, 0: ranks 5, 3.5, 3.5, 2, 1):
    ///   centred (2, 1, 0, -1, -2) and (2, .5, .5, -1, -2), sum xy = 9.5, sum xx = 10,
    ///   sum yy = 9.5, rho = 9.5 / sqrt(95); the same for dimension 1 by symmetry.
    /// - Steps: along w_0 rising, s_0 goes 0, 1, 2, 2, 3: 3 of 4 steps follow; likewise s_1
    ///   as w_1 falls; 6 of 8 in all.
    /// - Vertex gaps: s_0 at 1_0 minus at 1_1 = 3 - 0 = 3; s_1 at 1_1 minus at 1_0 = 3.
    #[test]
    fn summaries_of_a_hand_made_grid() {
        let settings = paper_settings(2);
        let (weights, _) = distinct_weights(&settings);
        let scores = [[3.0, 0.0], [2.0, 1.0], [2.0, 1.0], [1.0, 2.0], [0.0, 3.0]];
        let measured = Measured {
            scores: scores.iter().map(|s| vec![s.to_vec()]).collect(),
            lengths: vec![vec![4.0]; 5],
        };
        let off = Bootstrap {
            resamples: 0,
            ..Bootstrap::default()
        };
        let (points, fronts, control, gaps) =
            summarise(&measured, &settings, &weights, &[0.0, 0.0], &off);
        assert_eq!(points.len(), 5);
        assert_eq!(points[1].scores[0].mean, 2.0);
        assert_eq!(points[1].length.mean, 4.0);
        assert_eq!(fronts.len(), 1);
        assert_eq!(fronts[0].hypervolume, 3.0);
        assert_eq!(fronts[0].first_weights, vec![1.0, 0.75, 0.5, 0.25, 0.0]);
        // (2, 1) appears twice: the first is kept.
        assert_eq!(fronts[0].front, vec![4, 3, 1, 0]);
        let rho = 9.5 / 95f64.sqrt();
        for s in &control.spearman {
            assert!((s.unwrap() - rho).abs() < 1e-12, "{s:?}");
        }
        assert_eq!(control.following, vec![[3, 4], [3, 4]]);
        assert_eq!(control.share, Some(0.75));
        assert_eq!(gaps.len(), 2);
        assert_eq!(
            (gaps[0].dimension, gaps[0].against, gaps[0].gap.mean),
            (0, 1, 3.0)
        );
        assert_eq!(
            (gaps[1].dimension, gaps[1].against, gaps[1].gap.mean),
            (1, 0, 3.0)
        );
    }
}
