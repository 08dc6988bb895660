//! Comparing finished runs: each run directory (written by [`crate::train::train`]) is read
//! with [`crate::saved_run::read_run`] (its `resolved_config.json`, final
//! `adapters.safetensors` and tokenizer), its held-out conflict pairs are checked to be those
//! of every other run, and each model is loaded ([`SavedRun::load_model`]) and evaluated at
//! the paper's settings in turn (one model in memory at a time).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

use super::{
    conflict_pairs, evaluate, paper_settings, Batching, Bootstrap, ImplicitReward, MethodSummary,
    Setting, SettingResult,
};
use crate::config::RunConfig;
use crate::data::{self, PreferenceData, TokenizedPair};
use crate::model::{DeviceChoice, DtypeChoice};
use crate::reference;
use crate::saved_run::{self, SavedRun};

/// What to compare and how.
#[derive(Debug, Clone)]
pub struct CompareOptions {
    /// Run directories, in the order the report lists them.
    pub runs: Vec<PathBuf>,
    /// Device for every run instead of each run's `model.device`.
    pub device: Option<DeviceChoice>,
    /// Weight dtype for every run instead of each run's `model.dtype`.
    pub dtype: Option<DtypeChoice>,
    /// Pairs per micro-batch instead of each run's `data.micro_batch`.
    pub micro_batch: Option<usize>,
    pub bootstrap: Bootstrap,
}

/// One compared run, as the report names it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct RunInfo {
    /// The method name, or `method (directory)` when two runs share a method.
    pub label: String,
    pub method: String,
    pub run_dir: PathBuf,
    pub model_path: PathBuf,
    pub beta: f64,
}

/// Every run evaluated at every setting.
#[derive(Debug, Clone)]
pub struct Comparison {
    pub dimensions: Vec<String>,
    pub runs: Vec<RunInfo>,
    pub settings: Vec<Setting>,
    /// `results[r][s]`: run r at setting s.
    pub results: Vec<Vec<SettingResult>>,
    /// Per run: mean accuracy and win rate over the settings.
    pub summaries: Vec<MethodSummary>,
    /// Held-out pairs, and the conflict pairs among them that are evaluated.
    pub eval_pairs: usize,
    pub conflict_pairs: usize,
    pub bootstrap: Bootstrap,
}

/// A run directory read (config, adapter metadata, tokenizer) with its data, before any model
/// is loaded.
struct RunSetup {
    run: SavedRun,
    data: PreferenceData,
}

fn load_setup(dir: &Path) -> Result<RunSetup> {
    let run = saved_run::read_run(dir)?;
    // The adapters' dimensions were checked against the config's, which the data carries.
    let data = data::load(&run.config.data, &run.tokenizer)
        .with_context(|| format!("cannot load the data of run {}", dir.display()))?;
    Ok(RunSetup { run, data })
}

/// A digest of what evaluation reads from pairs: token ids, scores and source lines.
fn pairs_digest(pairs: &[&TokenizedPair]) -> String {
    let mut hasher = Sha256::new();
    for pair in pairs {
        for ids in [&pair.prompt_ids, &pair.response_a_ids, &pair.response_b_ids] {
            hasher.update((ids.len() as u64).to_le_bytes());
            ids.iter().for_each(|id| hasher.update(id.to_le_bytes()));
        }
        for s in pair.scores_a.iter().chain(&pair.scores_b) {
            hasher.update(s.to_le_bytes());
        }
        pair.source_lines
            .iter()
            .for_each(|l| hasher.update((*l as u64).to_le_bytes()));
    }
    hex::encode(hasher.finalize())
}

/// Refuses runs that do not share the dimensions and the held-out conflict pairs: their
/// accuracies would not be comparable.
fn check_comparable(setups: &[RunSetup]) -> Result<()> {
    let first = &setups[0];
    let first_pairs = conflict_pairs(&first.data.eval);
    let first_digest = pairs_digest(&first_pairs);
    for other in &setups[1..] {
        let (a, b) = (first.run.dir.display(), other.run.dir.display());
        if other.data.dimensions != first.data.dimensions {
            bail!(
                "runs {a} and {b} cannot be compared: their dimensions differ ([{}] vs [{}])",
                first.data.dimensions.join(", "),
                other.data.dimensions.join(", ")
            );
        }
        let pairs = conflict_pairs(&other.data.eval);
        if pairs.len() != first_pairs.len() || pairs_digest(&pairs) != first_digest {
            bail!(
                "runs {a} and {b} cannot be compared: their held-out conflict pairs differ \
                 ({} vs {} pairs{}); compare runs with the same data files, split, max_length \
                 and tokenizer",
                first_pairs.len(),
                pairs.len(),
                if pairs.len() == first_pairs.len() {
                    ", same count but other pairs or tokens"
                } else {
                    ""
                }
            );
        }
    }
    Ok(())
}

/// Report labels: the method name, or `method (directory name)` for methods run twice.
fn labels(setups: &[RunSetup]) -> Vec<String> {
    let runs: Vec<(String, &Path)> = setups
        .iter()
        .map(|s| (method_name(&s.run.config), s.run.dir.as_path()))
        .collect();
    run_labels(&runs)
}

/// The labels of runs given as (method, directory): the method name, or `method (directory
/// name)` for methods run twice, and `#n` after a label that would still repeat.
pub(super) fn run_labels(runs: &[(String, &Path)]) -> Vec<String> {
    let mut labels: Vec<String> = runs
        .iter()
        .map(|(method, dir)| {
            if runs.iter().filter(|(m, _)| m == method).count() > 1 {
                let dir = dir
                    .file_name()
                    .map(|n| n.to_string_lossy().to_string())
                    .unwrap_or_else(|| dir.display().to_string());
                format!("{method} ({dir})")
            } else {
                method.clone()
            }
        })
        .collect();
    for i in 0..labels.len() {
        if labels[..i].contains(&labels[i]) {
            labels[i] = format!("{} #{}", labels[i], i + 1);
        }
    }
    labels
}

pub(super) fn method_name(config: &RunConfig) -> String {
    serde_json::to_value(config.method.name)
        .ok()
        .and_then(|v| v.as_str().map(String::from))
        .unwrap_or_else(|| format!("{:?}", config.method.name))
}

/// Evaluates one run's final adapters on its held-out conflict pairs.
fn evaluate_run(
    setup: &RunSetup,
    settings: &[Setting],
    options: &CompareOptions,
) -> Result<Vec<SettingResult>> {
    let run = &setup.run;
    let config = &run.config;
    let (loaded, device, _) = run.load_model(options.device, options.dtype)?;
    let micro_batch = options.micro_batch.unwrap_or(config.data.micro_batch);
    let pad = run.tokenizer.pad_token_id();
    let cache_dir = config
        .data
        .cache_dir
        .clone()
        .unwrap_or_else(|| run.dir.join("cache"));
    let (reference, cached) = reference::load_or_compute(
        &cache_dir,
        &loaded.fingerprint,
        &loaded.model,
        &setup.data.eval.pairs,
        micro_batch,
        pad,
        device,
    )?;
    tracing::info!(run = %run.dir.display(), cached, "reference log-probs of the eval split ready");
    let pairs = conflict_pairs(&setup.data.eval);
    let k = setup.data.dimensions.len();
    let batching = Batching::like_training(micro_batch, k + 1, pad, device);
    let evaluation = evaluate(
        &loaded.model,
        &pairs,
        &reference,
        settings,
        ImplicitReward::of(&config.method),
        &batching,
        &options.bootstrap,
    );
    Ok(evaluation.results)
}

/// Loads every run, checks they can be compared, and evaluates each at the paper's settings.
pub fn compare(options: &CompareOptions) -> Result<Comparison> {
    if options.runs.is_empty() {
        bail!("no run to evaluate: give at least one --run DIR");
    }
    if options.micro_batch == Some(0) {
        bail!("--micro-batch must be at least 1");
    }
    if !(options.bootstrap.confidence > 0.0 && options.bootstrap.confidence < 1.0) {
        bail!(
            "the bootstrap confidence must be in (0, 1), got {}",
            options.bootstrap.confidence
        );
    }
    let setups = options
        .runs
        .iter()
        .map(|dir| load_setup(dir))
        .collect::<Result<Vec<_>>>()?;
    check_comparable(&setups)?;
    let first = &setups[0];
    let dimensions = first.data.dimensions.clone();
    let conflict = conflict_pairs(&first.data.eval).len();
    if conflict == 0 {
        bail!(
            "the held-out split of {} has no conflict pair to evaluate ({} held-out pairs): \
             give data.eval_file or a larger data.eval_fraction",
            first.run.dir.display(),
            first.data.eval.pairs.len()
        );
    }
    let settings = paper_settings(dimensions.len());
    let labels = labels(&setups);
    let mut runs = Vec::with_capacity(setups.len());
    let mut results = Vec::with_capacity(setups.len());
    for (setup, label) in setups.iter().zip(labels) {
        tracing::info!(run = %setup.run.dir.display(), settings = settings.len(), pairs = conflict, "evaluating");
        results.push(evaluate_run(setup, &settings, options)?);
        runs.push(RunInfo {
            label,
            method: method_name(&setup.run.config),
            run_dir: setup.run.dir.clone(),
            model_path: setup.run.meta.model_path.clone(),
            beta: setup.run.config.method.beta,
        });
    }
    let counted: Vec<usize> = (0..settings.len())
        .map(|s| results[0][s].accuracy.counted)
        .collect();
    let correct: Vec<Option<Vec<usize>>> = (0..settings.len())
        .map(|s| (counted[s] > 0).then(|| results.iter().map(|r| r[s].accuracy.correct).collect()))
        .collect();
    let summaries = super::metrics::summarise(&correct, &counted, runs.len());
    Ok(Comparison {
        dimensions,
        runs,
        settings,
        results,
        summaries,
        eval_pairs: first.data.eval.pairs.len(),
        conflict_pairs: conflict,
        bootstrap: options.bootstrap,
    })
}
