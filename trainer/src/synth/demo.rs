//! `modpo-trainer demo`: the main job end to end on the synthetic benchmark, with no download
//! and on a CPU: generate the data and a tiny model (`synth`), train the curriculum, Panacea
//! (AdaLoRA, as the paper ran it), Panacea on LoRA and DPO-Soup on it with one shared config (embedded in the binary from
//! `configs/demo/demo.toml`), then compare the four runs on the held-out conflict pairs
//! (`eval::evaluate_runs`: tables with bootstrap intervals and the plots).
//!
//! Layout of the demo directory: `data/` (train.jsonl, eval.jsonl, model/), `configs/` (the
//! config of each run, as trained), `runs/<method>/` and `eval/`. An existing non-empty
//! directory is never written into: without `force` the demo refuses, with it the old
//! directory is renamed aside (`<dir>.old-<UTC time>`) first, so nothing is lost.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};

use super::{SynthFiles, SynthSpec};
use crate::config::RunConfig;
use crate::eval::{self, report::Written, Bootstrap, CompareOptions, Comparison};
use crate::method::stages;
use crate::train::{train, Cluster, TrainOptions};

/// The embedded default: `[demo]` (the synthetic data) and the run config of every method.
pub const DEFAULT_CONFIG: &str = include_str!("../../../configs/demo/demo.toml");

/// The methods, in the order they are trained and reported.
pub const METHODS: [&str; 4] = ["curriculum", "panacea", "panacea-lora", "dpo-soup"];

/// How to run the demo.
#[derive(Debug, Clone, Default)]
pub struct DemoOptions {
    pub out: PathBuf,
    /// Rename an existing non-empty `out` aside instead of refusing.
    pub force: bool,
    /// Overrides `[demo] pairs` (shorter runs, e.g. in tests).
    pub pairs: Option<usize>,
    /// Overrides `[train] max_steps`.
    pub max_steps: Option<usize>,
    /// A config text in the layout of `configs/demo/demo.toml` instead of the embedded one.
    pub config: Option<String>,
}

/// What the demo wrote.
#[derive(Debug)]
pub struct DemoOutputs {
    pub out: PathBuf,
    /// Where an earlier demo directory was moved, if it was.
    pub moved_aside: Option<PathBuf>,
    pub synth: SynthFiles,
    pub configs: Vec<PathBuf>,
    pub runs: Vec<PathBuf>,
    pub comparison: Comparison,
    pub written: Written,
    /// Wall seconds of the synth, each training run, and the evaluation.
    pub seconds: Vec<(String, f64)>,
    /// What each run trained with, in run order.
    pub compute: Vec<RunCompute>,
}

/// The compute a run spent: optimizer steps over all its stages, and pair-passes (a forward
/// and backward of one pair under one `w`: a step of stage s costs global batch x passes(s)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunCompute {
    pub method: String,
    pub steps: usize,
    pub pair_passes: usize,
}

/// `[demo]` of the embedded config.
fn synth_spec(table: &toml::Table, pairs: Option<usize>) -> Result<SynthSpec> {
    let demo = table
        .get("demo")
        .and_then(|d| d.as_table())
        .context("the demo config has no [demo] table")?;
    let int = |key: &str| -> Result<usize> {
        demo.get(key)
            .and_then(|v| v.as_integer())
            .and_then(|v| usize::try_from(v).ok())
            .with_context(|| format!("demo.{key}: expected a non-negative integer"))
    };
    let spec = SynthSpec {
        dimensions: int("dimensions")?,
        pairs: pairs.unwrap_or(int("pairs")?),
        eval_pairs: int("eval_pairs")?,
        conflict_rate: demo
            .get("conflict_rate")
            .and_then(|v| v.as_float())
            .context("demo.conflict_rate: expected a number")?,
        seed: int("seed")? as u64,
    };
    spec.validate().context("[demo]")?;
    Ok(spec)
}

/// The run config of `method` as TOML text: the embedded config less `[demo]`, with the
/// paths of this demo and the method filled in.
fn run_config_text(
    table: &toml::Table,
    synth: &SynthFiles,
    method: &str,
    run_dir: &Path,
    max_steps: Option<usize>,
) -> Result<String> {
    let mut table = table.clone();
    table.remove("demo");
    let path = |p: &Path| toml::Value::String(p.display().to_string());
    let mut set = |section: &str, key: &str, value: toml::Value| -> Result<()> {
        table
            .get_mut(section)
            .and_then(|s| s.as_table_mut())
            .with_context(|| format!("the demo config has no [{section}] table"))?
            .insert(key.to_string(), value);
        Ok(())
    };
    set("model", "path", path(&synth.model_dir))?;
    set("data", "train_file", path(&synth.train_file))?;
    set("data", "eval_file", path(&synth.eval_file))?;
    set(
        "data",
        "dimensions",
        toml::Value::Array(
            synth
                .dimensions
                .iter()
                .map(|d| toml::Value::String(d.clone()))
                .collect(),
        ),
    )?;
    set("method", "name", toml::Value::String(method.to_string()))?;
    set("train", "output_dir", path(run_dir))?;
    if let Some(steps) = max_steps {
        set("train", "max_steps", toml::Value::Integer(steps as i64))?;
    }
    let body = toml::to_string(&table).context("serialising the demo run config")?;
    Ok(format!(
        "# Written by `modpo-trainer demo` from its embedded config; method {method}.\n{body}"
    ))
}

/// Refuses (or, with `force`, renames aside) a non-empty `out`; returns where it went.
fn claim_out_dir(out: &Path, force: bool) -> Result<Option<PathBuf>> {
    let occupied = out.exists()
        && std::fs::read_dir(out)
            .map(|mut d| d.next().is_some())
            .unwrap_or(true);
    let moved = if occupied {
        if !force {
            bail!(
                "{} already exists and is not empty: choose another --out, or pass --force to \
                 move it aside (it is renamed, not deleted)",
                out.display()
            );
        }
        let stamp = chrono::Utc::now().format("%Y%m%dT%H%M%SZ");
        let mut aside = PathBuf::from(format!("{}.old-{stamp}", out.display()));
        let mut n = 1;
        while aside.exists() {
            aside = PathBuf::from(format!("{}.old-{stamp}-{n}", out.display()));
            n += 1;
        }
        std::fs::rename(out, &aside).with_context(|| {
            format!("cannot move {} aside to {}", out.display(), aside.display())
        })?;
        Some(aside)
    } else {
        None
    };
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    Ok(moved)
}

/// Runs the whole demo into `options.out` (see the module doc).
pub fn run(options: &DemoOptions) -> Result<DemoOutputs> {
    let table: toml::Table = toml::from_str(options.config.as_deref().unwrap_or(DEFAULT_CONFIG))
        .context("parsing the demo config")?;
    let spec = synth_spec(&table, options.pairs)?;
    let moved_aside = claim_out_dir(&options.out, options.force)?;
    // Absolute paths, so the written configs work from anywhere.
    let out = std::fs::canonicalize(&options.out)
        .with_context(|| format!("cannot resolve {}", options.out.display()))?;
    let mut seconds = Vec::new();

    let started = Instant::now();
    let synth = super::write(&out.join("data"), &spec).context("generating the synthetic data")?;
    seconds.push(("synth".to_string(), started.elapsed().as_secs_f64()));
    tracing::info!(
        "synthetic data: {} train pairs ({} conflict), {} eval pairs ({} conflict), dimensions {}",
        spec.pairs,
        synth.train_conflicts,
        spec.eval_pairs,
        synth.eval_conflicts,
        synth.dimensions.join(", ")
    );

    let config_dir = out.join("configs");
    std::fs::create_dir_all(&config_dir)
        .with_context(|| format!("cannot create {}", config_dir.display()))?;
    let mut configs = Vec::new();
    let mut runs = Vec::new();
    let mut compute = Vec::new();
    for method in METHODS {
        let run_dir = out.join("runs").join(method);
        let text = run_config_text(&table, &synth, method, &run_dir, options.max_steps)?;
        let path = config_dir.join(format!("{method}.toml"));
        std::fs::write(&path, &text).with_context(|| format!("cannot write {}", path.display()))?;
        let config = RunConfig::load(&path)?;
        let started = Instant::now();
        tracing::info!("training {method}");
        let summary = train(&config, &text, TrainOptions::default(), &Cluster::single())
            .with_context(|| format!("training {method} ({})", path.display()))?;
        seconds.push((method.to_string(), started.elapsed().as_secs_f64()));
        compute.push(run_compute(
            method,
            &config,
            &summary.steps,
            synth.dimensions.len(),
        ));
        configs.push(path);
        runs.push(summary.run_dir);
    }

    let started = Instant::now();
    let compare = CompareOptions {
        runs: runs.clone(),
        device: None,
        dtype: None,
        micro_batch: None,
        bootstrap: Bootstrap::default(),
    };
    let (comparison, written) =
        eval::evaluate_runs(&compare, &out.join("eval"), false).context("evaluating the runs")?;
    seconds.push(("eval".to_string(), started.elapsed().as_secs_f64()));
    Ok(DemoOutputs {
        out,
        moved_aside,
        synth,
        configs,
        runs,
        comparison,
        written,
        seconds,
        compute,
    })
}

/// The steps and pair-passes of a finished run whose stages took `steps` optimizer steps each.
fn run_compute(method: &str, config: &RunConfig, steps: &[usize], k: usize) -> RunCompute {
    let pair_passes = stages(config.method.name)
        .iter()
        .zip(steps)
        .map(|(stage, steps)| steps * config.data.global_batch * stage.step.passes(k))
        .sum();
    RunCompute {
        method: method.to_string(),
        steps: steps.iter().sum(),
        pair_passes,
    }
}
