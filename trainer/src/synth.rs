//! Seeded synthetic k-dimensional preference benchmarks with the structure the curriculum
//! addresses (METHOD.md sections 1 and 4): most pairs **agree** (one response is at least as
//! good on every dimension) and a minority **conflict** (better on one dimension, worse on
//! another). They need no download: the data is written in the generic JSONL format next to a
//! tiny random Llama with a byte-level tokenizer (`model::tiny`), so the whole method runs on
//! a CPU in minutes (`modpo-trainer synth`, `modpo-trainer demo`).
//!
//! Responses are short strings of lowercase words; every dimension's score is a count of
//! certain words, so the scores are exact and checkable from the text ([`score`]). The
//! [`Scenario`]s differ in how the dimensions relate, each described in its module:
//! [`independent`] (disjoint marker words, dimension 0 decides every pair), [`easy_hard`] (a
//! salient easy dimension and graded hard ones, as in PKU-SafeRLHF), [`interference`] (words
//! shared between dimensions with opposite signs) and [`length_bias`] (one dimension grows
//! with the response's length).
//!
//! Common to all: exactly `round(conflict_rate * pairs)` pairs conflict, at random positions;
//! which response is `response_a` is a coin flip, so position carries no signal; train and
//! eval files never share a prompt (every prompt carries its split and index).

pub mod demo;
pub mod easy_hard;
pub mod independent;
pub mod interference;
pub mod length_bias;
pub mod scorer;
pub mod sft;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use anyhow::{bail, Context, Result};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::json;

use crate::data::split::{self, PairKind};
use crate::model::tiny::{write_tiny_model, TinyModelSpec};

/// Words no dimension rewards.
pub const FILLERS: [&str; 16] = [
    "we", "can", "send", "the", "file", "now", "so", "it", "is", "done", "soon", "then", "our",
    "team", "will", "check",
];
/// Topics of the prompts.
const TOPICS: [&str; 8] = [
    "invoice", "meeting", "report", "delivery", "budget", "schedule", "backup", "contract",
];

/// How the dimensions of a synthetic benchmark relate (see each module).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    Independent,
    EasyHard,
    Interference,
    LengthBias,
}

impl Scenario {
    pub const ALL: [Scenario; 4] = [
        Scenario::Independent,
        Scenario::EasyHard,
        Scenario::Interference,
        Scenario::LengthBias,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Scenario::Independent => "independent",
            Scenario::EasyHard => "easy-hard",
            Scenario::Interference => "interference",
            Scenario::LengthBias => "length-bias",
        }
    }

    /// Every dimension name, in order; k dimensions are the first k.
    pub fn dimension_names(self) -> &'static [&'static str] {
        match self {
            Scenario::Independent => &independent::DIMENSIONS,
            Scenario::EasyHard => &easy_hard::DIMENSIONS,
            Scenario::Interference => &interference::DIMENSIONS,
            Scenario::LengthBias => &length_bias::DIMENSIONS,
        }
    }

    /// The share of conflict pairs when none is given: 20% for `easy-hard` (the PKU
    /// sample's 117 of 500), 25% otherwise (the first demo's).
    pub fn default_conflict_rate(self) -> f64 {
        match self {
            Scenario::EasyHard => 0.2,
            _ => 0.25,
        }
    }

    /// The two responses of one pair of the given kind (which goes first is decided later).
    fn draw_pair(self, rng: &mut ChaCha8Rng, k: usize, conflict: bool) -> (String, String) {
        match self {
            Scenario::Independent => independent::draw_pair(rng, k, conflict),
            Scenario::EasyHard => easy_hard::draw_pair(rng, k, conflict),
            Scenario::Interference => interference::draw_pair(rng, k, conflict),
            Scenario::LengthBias => length_bias::draw_pair(rng, k, conflict),
        }
    }
}

impl FromStr for Scenario {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        Scenario::ALL
            .into_iter()
            .find(|c| c.name() == s)
            .with_context(|| {
                let names: Vec<&str> = Scenario::ALL.iter().map(|c| c.name()).collect();
                format!("unknown scenario {s:?}: one of {}", names.join(", "))
            })
    }
}

/// The score of every dimension of `text` under `scenario` with `k` dimensions.
pub fn score(scenario: Scenario, text: &str, k: usize) -> Vec<f64> {
    match scenario {
        Scenario::Independent => independent::score(text, k),
        Scenario::EasyHard => easy_hard::score(text, k),
        Scenario::Interference => interference::score(text, k),
        Scenario::LengthBias => length_bias::score(text, k),
    }
}

/// The lowest score each of the first `k` dimensions of `scenario` gives a response of its
/// data: the fixed reference point of the generation fronts (`eval --generate`). Counts start
/// at 0 (easy-hard's dimension 0 is 0 with the salient word); an `interference` dimension
/// loses one for each contested word of its neighbour, which a response of the data holds at
/// most twice (`interference::COUNT_PROBABILITIES`: 0, 1 or 2 occurrences), so its floor is -2.
/// Generated text can go below it; a point below the reference adds no hypervolume.
pub fn score_floor(scenario: Scenario, k: usize) -> Vec<f64> {
    let floor = match scenario {
        Scenario::Interference => -((interference::COUNT_PROBABILITIES.len() - 1) as f64),
        Scenario::Independent | Scenario::EasyHard | Scenario::LengthBias => 0.0,
    };
    vec![floor; k]
}

/// How often `word` appears in `text` (whole words).
fn count(text: &str, word: &str) -> usize {
    text.split_whitespace().filter(|w| *w == word).count()
}

/// Agree or conflict as the data reader decides it (`None`: tied on every dimension).
pub fn pair_kind(scores_a: &[f64], scores_b: &[f64]) -> Option<PairKind> {
    split::classify(&split::preferences(scores_a, scores_b))
}

/// The kind of a generated pair.
fn kind_of(conflict: bool) -> PairKind {
    if conflict {
        PairKind::Conflict
    } else {
        PairKind::Agree
    }
}

/// Two responses drawn independently by `draw_response`, redrawn together until their pair
/// has the kind asked for under `score` (a pair that ties on every dimension is never kept).
fn draw_independent_pair(
    rng: &mut ChaCha8Rng,
    k: usize,
    conflict: bool,
    draw_response: fn(&mut ChaCha8Rng, usize) -> String,
    score: fn(&str, usize) -> Vec<f64>,
) -> (String, String) {
    loop {
        let (a, b) = (draw_response(rng, k), draw_response(rng, k));
        if pair_kind(&score(&a, k), &score(&b, k)) == Some(kind_of(conflict)) {
            return (a, b);
        }
    }
}

/// What to generate.
#[derive(Debug, Clone, PartialEq)]
pub struct SynthSpec {
    pub scenario: Scenario,
    /// k, 2 to the scenario's number of dimensions.
    pub dimensions: usize,
    /// Training pairs.
    pub pairs: usize,
    /// Held-out pairs (a separate file, own prompts).
    pub eval_pairs: usize,
    /// Share of conflict pairs, in (0, 1).
    pub conflict_rate: f64,
    pub seed: u64,
}

impl Default for SynthSpec {
    fn default() -> Self {
        SynthSpec {
            scenario: Scenario::EasyHard,
            dimensions: 2,
            pairs: 2000,
            eval_pairs: 400,
            conflict_rate: Scenario::EasyHard.default_conflict_rate(),
            seed: 0,
        }
    }
}

impl SynthSpec {
    pub fn validate(&self) -> Result<()> {
        let most = self.scenario.dimension_names().len();
        if !(2..=most).contains(&self.dimensions) {
            bail!(
                "--dimensions: {} is not in 2..={most} (conflict needs two dimensions; scenario {} has {most})",
                self.dimensions,
                self.scenario.name(),
            );
        }
        if self.pairs == 0 || self.eval_pairs == 0 {
            bail!("--pairs: need at least one train and one eval pair");
        }
        if !(self.conflict_rate > 0.0 && self.conflict_rate < 1.0) {
            bail!("--conflict-rate: {} is not in (0, 1)", self.conflict_rate);
        }
        Ok(())
    }

    /// The dimension names of this spec, in order.
    pub fn dimension_names(&self) -> Vec<String> {
        self.scenario.dimension_names()[..self.dimensions]
            .iter()
            .map(|s| s.to_string())
            .collect()
    }
}

/// One generated pair, in the generic format's fields.
#[derive(Debug, Clone, PartialEq)]
pub struct SynthPair {
    pub prompt: String,
    pub response_a: String,
    pub response_b: String,
    pub scores_a: Vec<f64>,
    pub scores_b: Vec<f64>,
    /// Whether the pair was generated as a conflict pair.
    pub conflict: bool,
}

/// `n` pairs of `split` ("train" or "eval"), `round(conflict_rate * n)` of them conflicting.
fn generate_split(spec: &SynthSpec, split: &str, n: usize, stream: u64) -> Vec<SynthPair> {
    let k = spec.dimensions;
    let mut rng = ChaCha8Rng::seed_from_u64(spec.seed);
    rng.set_stream(stream);
    let conflicts = ((spec.conflict_rate * n as f64).round() as usize).min(n);
    let mut kinds: Vec<bool> = (0..n).map(|i| i < conflicts).collect();
    kinds.shuffle(&mut rng);
    kinds
        .into_iter()
        .enumerate()
        .map(|(index, conflict)| {
            let (first, second) = spec.scenario.draw_pair(&mut rng, k, conflict);
            let topic = TOPICS[rng.random_range(0..TOPICS.len())];
            let prompt = format!("Reply {split}-{index} on the {topic}.");
            let (response_a, response_b) = if rng.random_bool(0.5) {
                (first, second)
            } else {
                (second, first)
            };
            SynthPair {
                prompt,
                scores_a: score(spec.scenario, &response_a, k),
                scores_b: score(spec.scenario, &response_b, k),
                response_a,
                response_b,
                conflict,
            }
        })
        .collect()
}

/// The train and eval pairs of `spec` (a pure function of it).
pub fn generate(spec: &SynthSpec) -> Result<(Vec<SynthPair>, Vec<SynthPair>)> {
    spec.validate()?;
    Ok((
        generate_split(spec, "train", spec.pairs, 1),
        generate_split(spec, "eval", spec.eval_pairs, 2),
    ))
}

/// Where [`write`] put things.
#[derive(Debug, Clone)]
pub struct SynthFiles {
    pub train_file: PathBuf,
    pub eval_file: PathBuf,
    pub model_dir: PathBuf,
    pub dimensions: Vec<String>,
    pub train_conflicts: usize,
    pub eval_conflicts: usize,
}

/// The tiny model the synthetic data is sized for: a little wider than the default smoke
/// model, still seconds per hundred steps on a CPU.
pub fn model_spec() -> TinyModelSpec {
    TinyModelSpec {
        hidden_size: 64,
        intermediate_size: 128,
        layers: 2,
        heads: 4,
        kv_heads: 2,
    }
}

fn write_jsonl(path: &Path, pairs: &[SynthPair]) -> Result<()> {
    let file =
        std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let mut out = std::io::BufWriter::new(file);
    for p in pairs {
        let line = json!({
            "prompt": p.prompt, "response_a": p.response_a, "response_b": p.response_b,
            "scores_a": p.scores_a, "scores_b": p.scores_b,
        });
        writeln!(out, "{line}").with_context(|| format!("cannot write {}", path.display()))?;
    }
    out.flush()
        .with_context(|| format!("cannot write {}", path.display()))
}

/// Writes `train.jsonl`, `eval.jsonl` (generic format) and `model/` (tiny random Llama with a
/// byte-level tokenizer, from `seed`) into `dir`, which must not hold any of them.
pub fn write(dir: &Path, spec: &SynthSpec) -> Result<SynthFiles> {
    let (train, eval) = generate(spec)?;
    let files = SynthFiles {
        train_file: dir.join("train.jsonl"),
        eval_file: dir.join("eval.jsonl"),
        model_dir: dir.join("model"),
        dimensions: spec.dimension_names(),
        train_conflicts: train.iter().filter(|p| p.conflict).count(),
        eval_conflicts: eval.iter().filter(|p| p.conflict).count(),
    };
    for path in [&files.train_file, &files.eval_file, &files.model_dir] {
        if path.exists() {
            bail!(
                "{} already exists: choose a new --out (nothing is overwritten)",
                path.display()
            );
        }
    }
    std::fs::create_dir_all(&files.model_dir)
        .with_context(|| format!("cannot create {}", files.model_dir.display()))?;
    write_jsonl(&files.train_file, &train)?;
    write_jsonl(&files.eval_file, &eval)?;
    write_tiny_model(&files.model_dir, &model_spec(), spec.seed as i64)
        .with_context(|| format!("writing the tiny model into {}", files.model_dir.display()))?;
    Ok(files)
}

/// The SFT warm start ([`sft`]) of the model [`write`] put in `files.model_dir`, on the train
/// pairs of `spec` (regenerated: they are a pure function of it), for `steps` steps seeded by
/// the spec's seed. Returns the loss of the first and the last step.
pub fn warm_start(files: &SynthFiles, spec: &SynthSpec, steps: usize) -> Result<(f64, f64)> {
    let (train, _) = generate(spec)?;
    sft::warm_start(
        &files.model_dir,
        &train,
        &sft::SftSpec::new(steps, spec.seed),
    )
}

#[cfg(test)]
mod tests;
