//! A seeded synthetic k-dimensional preference benchmark with the structure the curriculum
//! addresses (METHOD.md sections 1 and 4): most pairs **agree** (one response is at least as
//! good on every dimension) and a minority **conflict** (better on one dimension, worse on
//! another). It needs no download: the data is written in the generic JSONL format next to a
//! tiny random Llama with a byte-level tokenizer (`model::tiny`), so the whole method runs on
//! a CPU in minutes (`modpo-trainer synth`, `modpo-trainer demo`).
//!
//! **What each dimension rewards.** A response is [`WORDS_PER_RESPONSE`] lowercase words. Each
//! dimension `i` owns one marker word ([`MARKERS`]); its score is the number of times that
//! word appears in the response (0 to [`MAX_COUNT`]). The other words are fillers drawn from
//! [`FILLERS`], which no dimension rewards. With k = 2, "polite" rewards `please`, "formal"
//! rewards `indeed`; k = 3 adds "cheerful" (`great`), k = 4 "precise" (`exactly`). Since every
//! response has the same number of words, a marker replaces a filler: length carries no
//! signal, only which words are there.
//!
//! **The structure.** Dimension 0 is the *easy* one: in every agree pair the better response
//! has strictly more of dimension 0's marker and at least as many of every other marker, so
//! dimension 0 alone separates the agree pairs (and the total number of markers does too).
//! In a conflict pair the response with more of dimension 0's marker has strictly fewer of
//! another dimension `j`'s marker (j drawn uniformly from 1..k); the remaining dimensions are
//! drawn independently (for k >= 3, draws whose markers would not fit in the words are
//! redrawn). Exactly `round(conflict_rate * pairs)` pairs conflict, at random
//! positions. Which response is `response_a` is a coin flip, so position carries no signal.
//! A model that only learns "more markers is better" (what the agree pairs teach) is at chance
//! on the conflict pairs at the vertices; telling the dimensions apart needs the dimension
//! adapters.
//!
//! Train and eval files never share a prompt: every prompt carries its split and index.

pub mod demo;

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::json;

use crate::model::tiny::{write_tiny_model, TinyModelSpec};

/// Dimension names, in order; a run with k dimensions uses the first k.
pub const DIMENSIONS: [&str; 4] = ["polite", "formal", "cheerful", "precise"];
/// The word dimension i rewards (its score is how often the word appears).
pub const MARKERS: [&str; 4] = ["please", "indeed", "great", "exactly"];
/// Words no dimension rewards.
pub const FILLERS: [&str; 16] = [
    "we", "can", "send", "the", "file", "now", "so", "it", "is", "done", "soon", "then", "our",
    "team", "will", "check",
];
/// Topics of the prompts.
const TOPICS: [&str; 8] = [
    "invoice", "meeting", "report", "delivery", "budget", "schedule", "backup", "contract",
];
/// Words in every response.
pub const WORDS_PER_RESPONSE: usize = 8;
/// Most occurrences of one marker in a response.
pub const MAX_COUNT: usize = 3;

/// What to generate.
#[derive(Debug, Clone, PartialEq)]
pub struct SynthSpec {
    /// k, 2 to 4.
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
            dimensions: 2,
            pairs: 2000,
            eval_pairs: 400,
            conflict_rate: 0.25,
            seed: 0,
        }
    }
}

impl SynthSpec {
    pub fn validate(&self) -> Result<()> {
        if !(2..=DIMENSIONS.len()).contains(&self.dimensions) {
            bail!(
                "--dimensions: {} is not in 2..={} (conflict needs two dimensions; there are {} marker words)",
                self.dimensions,
                DIMENSIONS.len(),
                DIMENSIONS.len()
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
        DIMENSIONS[..self.dimensions]
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

/// The score of every dimension of `text`: how often its marker word appears.
pub fn score(text: &str, dimensions: usize) -> Vec<f64> {
    MARKERS[..dimensions]
        .iter()
        .map(|m| text.split_whitespace().filter(|w| w == m).count() as f64)
        .collect()
}

/// Marker counts of the better (by dimension 0) and the worse response.
fn draw_counts(rng: &mut ChaCha8Rng, k: usize, conflict: bool) -> (Vec<usize>, Vec<usize>) {
    let mut hi = vec![0; k];
    let mut lo = vec![0; k];
    // Dimension 0: strictly more in `hi`, in both kinds.
    lo[0] = rng.random_range(0..MAX_COUNT);
    hi[0] = rng.random_range(lo[0] + 1..=MAX_COUNT);
    let against = conflict.then(|| rng.random_range(1..k));
    for i in 1..k {
        if Some(i) == against {
            // Strictly fewer in `hi`: the conflict.
            hi[i] = rng.random_range(0..MAX_COUNT);
            lo[i] = rng.random_range(hi[i] + 1..=MAX_COUNT);
        } else if conflict {
            hi[i] = rng.random_range(0..=MAX_COUNT);
            lo[i] = rng.random_range(0..=MAX_COUNT);
        } else {
            // Agree: at least as many in `hi`.
            lo[i] = rng.random_range(0..=MAX_COUNT);
            hi[i] = rng.random_range(lo[i]..=MAX_COUNT);
        }
    }
    (hi, lo)
}

/// A response with the given marker counts, filled up with fillers, in random order. Needs
/// `sum(counts) <= WORDS_PER_RESPONSE`, which `generate_split` ensures by redrawing.
fn render(rng: &mut ChaCha8Rng, counts: &[usize]) -> String {
    let mut words: Vec<&str> = Vec::with_capacity(WORDS_PER_RESPONSE);
    for (i, &c) in counts.iter().enumerate() {
        words.extend(std::iter::repeat_n(MARKERS[i], c));
    }
    // For k >= 3 the draw can exceed the words (3k markers); the caller redraws those.
    debug_assert!(words.len() <= WORDS_PER_RESPONSE);
    while words.len() < WORDS_PER_RESPONSE {
        words.push(FILLERS[rng.random_range(0..FILLERS.len())]);
    }
    words.shuffle(rng);
    words.join(" ")
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
            // Redraw until both responses fit in WORDS_PER_RESPONSE words (k >= 3 can exceed
            // it).
            let (hi, lo) = loop {
                let (hi, lo) = draw_counts(&mut rng, k, conflict);
                let fits = |c: &[usize]| c.iter().sum::<usize>() <= WORDS_PER_RESPONSE;
                if fits(&hi) && fits(&lo) {
                    break (hi, lo);
                }
            };
            let better = render(&mut rng, &hi);
            let worse = render(&mut rng, &lo);
            let topic = TOPICS[rng.random_range(0..TOPICS.len())];
            let prompt = format!("Reply {split}-{index} on the {topic}.");
            let as_scores = |c: &[usize]| c.iter().map(|&x| x as f64).collect::<Vec<f64>>();
            let (response_a, response_b, scores_a, scores_b) = if rng.random_bool(0.5) {
                (better, worse, as_scores(&hi), as_scores(&lo))
            } else {
                (worse, better, as_scores(&lo), as_scores(&hi))
            };
            SynthPair {
                prompt,
                response_a,
                response_b,
                scores_a,
                scores_b,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scores_are_marker_counts_and_structure_holds() {
        for k in 2..=4 {
            let spec = SynthSpec {
                dimensions: k,
                pairs: 500,
                eval_pairs: 10,
                ..SynthSpec::default()
            };
            let (train, _) = generate(&spec).unwrap();
            for p in &train {
                assert_eq!(score(&p.response_a, k), p.scores_a);
                assert_eq!(score(&p.response_b, k), p.scores_b);
                assert_eq!(p.response_a.split(' ').count(), WORDS_PER_RESPONSE);
                let d: Vec<f64> = p
                    .scores_a
                    .iter()
                    .zip(&p.scores_b)
                    .map(|(a, b)| a - b)
                    .collect();
                let conflict = d.iter().any(|&x| x > 0.0) && d.iter().any(|&x| x < 0.0);
                assert_eq!(conflict, p.conflict, "{p:?}");
                assert!(d[0] != 0.0);
            }
        }
    }
}
