//! `modpo-trainer demo`: the main job end to end on synthetic data, with no download and on a
//! CPU. For each scenario (`synth::Scenario`; default `easy-hard`) and each seed (default
//! three; a seed changes the data, the tiny model and the adapters' initialisation): generate
//! the data and a tiny model (`synth`), train the curriculum, Panacea (AdaLoRA, as the paper
//! ran it), Panacea on LoRA and DPO-Soup with one shared config (embedded in the binary from
//! `configs/demo/demo.toml`), by default at equal compute (`train.pair_passes`), then compare
//! the runs on the held-out conflict pairs (`eval::evaluate_runs`: tables with bootstrap
//! intervals and the plots). Last, the tables across seeds (`summary`): per seed, and the mean
//! with a t-interval over seeds.
//!
//! Layout of the demo directory: `summary.md` and `summary.json`, and for every scenario and
//! seed `<scenario>/seed-<seed>/` holding `data/` (train.jsonl, eval.jsonl, model/),
//! `configs/` (the config of each run, as trained), `runs/<method>/` and `eval/`. An existing
//! non-empty directory is never written into: without `force` the demo refuses, with it the
//! old directory is renamed aside (`<dir>.old-<UTC time>`) first, so nothing is lost.

pub mod generation;
pub mod summary;

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Instant;

use anyhow::{bail, Context, Result};

use super::{Scenario, SynthFiles, SynthSpec};
use crate::config::RunConfig;
use crate::eval::generation::{self as gen, Decoding, GenerationComparison, GenerationOptions};
use crate::eval::{self, report::Written, Bootstrap, CompareOptions, Comparison};
use crate::method::stages;
use crate::train::{train, Cluster, TrainOptions};
use summary::AcrossSeeds;

/// The embedded default: `[demo]` (the synthetic data) and the run config of every method.
pub const DEFAULT_CONFIG: &str = include_str!("../../../configs/demo/demo.toml");

/// The methods, in the order they are trained and reported.
pub const METHODS: [&str; 4] = ["curriculum", "panacea", "panacea-lora", "dpo-soup"];

/// Which scenarios a demo runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScenarioChoice {
    One(Scenario),
    All,
}

impl FromStr for ScenarioChoice {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "all" => Ok(ScenarioChoice::All),
            name => match name.parse() {
                Ok(scenario) => Ok(ScenarioChoice::One(scenario)),
                Err(e) => bail!("{e}, or all"),
            },
        }
    }
}

/// How much each method trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compute {
    /// Every method gets pairs x (k + 1) pair-passes (`train.pair_passes`): one epoch of
    /// Panacea, the method that spends most per pair.
    Equal,
    /// One epoch of every stage (`train.epochs = 1`): the methods spend different compute.
    Epoch,
}

impl FromStr for Compute {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "equal" => Ok(Compute::Equal),
            "epoch" => Ok(Compute::Epoch),
            other => bail!("unknown compute {other:?}: equal or epoch"),
        }
    }
}

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
    /// Overrides `[demo] scenario`.
    pub scenario: Option<ScenarioChoice>,
    /// Overrides `[demo] seeds`.
    pub seeds: Option<usize>,
    /// Overrides `[demo] compute`.
    pub compute: Option<Compute>,
}

/// What one seed of one scenario wrote (under `<out>/<scenario>/seed-<seed>/`).
#[derive(Debug)]
pub struct SeedOutputs {
    pub seed: u64,
    pub dir: PathBuf,
    pub synth: SynthFiles,
    pub configs: Vec<PathBuf>,
    pub runs: Vec<PathBuf>,
    pub comparison: Comparison,
    pub written: Written,
    /// What the runs generate at each w (`<seed>/eval-generate/`).
    pub generation: GenerationComparison,
    /// Wall seconds of the synth, each training run, and the evaluation.
    pub seconds: Vec<(String, f64)>,
    /// What each run trained with, in run order.
    pub compute: Vec<RunCompute>,
}

/// A scenario's seeds and their tables across seeds.
#[derive(Debug)]
pub struct ScenarioOutputs {
    pub scenario: Scenario,
    pub seeds: Vec<SeedOutputs>,
    pub summary: AcrossSeeds,
}

/// What the demo wrote.
#[derive(Debug)]
pub struct DemoOutputs {
    pub out: PathBuf,
    /// Where an earlier demo directory was moved, if it was.
    pub moved_aside: Option<PathBuf>,
    pub scenarios: Vec<ScenarioOutputs>,
    /// `summary.md`: every scenario's tables; `summary.json`: their numbers.
    pub summary_md: PathBuf,
    pub summary_json: PathBuf,
    pub seconds: f64,
}

/// The compute a run spent: optimizer steps over all its stages, and pair-passes (a forward
/// and backward of one pair under one `w`: a step of stage s costs global batch x passes(s)).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RunCompute {
    pub method: String,
    pub steps: usize,
    pub pair_passes: usize,
}

/// `[demo]` of the config, with the options' overrides.
#[derive(Debug, Clone)]
struct DemoSettings {
    scenarios: Vec<Scenario>,
    dimensions: usize,
    pairs: usize,
    eval_pairs: usize,
    /// `None`: each scenario's default.
    conflict_rate: Option<f64>,
    first_seed: u64,
    seeds: usize,
    compute: Compute,
    /// Held-out prompts each run answers at every w (`[demo] generate_prompts`, default
    /// [`GENERATE_PROMPTS`]).
    generate_prompts: usize,
    /// `[demo] generate_tokens`: most new tokens per answer.
    generate_tokens: usize,
    /// `[demo] sft_steps` (default 0): the SFT warm start of each seed's tiny model.
    sft_steps: usize,
}

/// Prompts of the generation table when the config does not say: few, so the demo stays short.
pub const GENERATE_PROMPTS: usize = 8;
/// Most new tokens of a demo answer when the config does not say (`[demo] generate_tokens`):
/// the synthetic responses are 8 to 13 words, about 50 to 80 bytes of the byte-level tokenizer.
pub const GENERATE_TOKENS: usize = 64;

impl DemoSettings {
    fn new(table: &toml::Table, options: &DemoOptions) -> Result<DemoSettings> {
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
        let text = |key: &str| -> Result<&str> {
            demo.get(key)
                .and_then(|v| v.as_str())
                .with_context(|| format!("demo.{key}: expected a string"))
        };
        let scenario = match options.scenario {
            Some(choice) => choice,
            None => text("scenario")?.parse().context("demo.scenario")?,
        };
        let conflict_rate = match demo.get("conflict_rate") {
            None => None,
            Some(v) => Some(
                v.as_float()
                    .context("demo.conflict_rate: expected a number")?,
            ),
        };
        let settings = DemoSettings {
            scenarios: match scenario {
                ScenarioChoice::One(s) => vec![s],
                ScenarioChoice::All => Scenario::ALL.to_vec(),
            },
            dimensions: int("dimensions")?,
            pairs: options.pairs.map_or_else(|| int("pairs"), Ok)?,
            eval_pairs: int("eval_pairs")?,
            conflict_rate,
            first_seed: int("seed")? as u64,
            seeds: options.seeds.map_or_else(|| int("seeds"), Ok)?,
            compute: match options.compute {
                Some(c) => c,
                None => text("compute")?.parse().context("demo.compute")?,
            },
            generate_prompts: match demo.get("generate_prompts") {
                None => GENERATE_PROMPTS,
                Some(_) => int("generate_prompts")?,
            },
            generate_tokens: match demo.get("generate_tokens") {
                None => GENERATE_TOKENS,
                Some(_) => int("generate_tokens")?,
            },
            sft_steps: match demo.get("sft_steps") {
                None => 0,
                Some(_) => int("sft_steps")?,
            },
        };
        if settings.generate_prompts == 0 || settings.generate_tokens == 0 {
            bail!("demo.generate_prompts and demo.generate_tokens: need at least 1");
        }
        if settings.seeds == 0 {
            bail!("demo.seeds: need at least one seed");
        }
        for &scenario in &settings.scenarios {
            settings
                .spec(scenario, settings.first_seed)
                .validate()
                .context("[demo]")?;
        }
        Ok(settings)
    }

    fn spec(&self, scenario: Scenario, seed: u64) -> SynthSpec {
        SynthSpec {
            scenario,
            dimensions: self.dimensions,
            pairs: self.pairs,
            eval_pairs: self.eval_pairs,
            conflict_rate: self
                .conflict_rate
                .unwrap_or(scenario.default_conflict_rate()),
            seed,
        }
    }

    /// The pair-pass budget of every run under [`Compute::Equal`].
    fn budget(&self) -> Option<usize> {
        (self.compute == Compute::Equal).then_some(self.pairs * (self.dimensions + 1))
    }

    /// How the runs' compute was set, for the tables.
    fn compute_rule(&self, max_steps: Option<usize>) -> String {
        let rule = match self.budget() {
            Some(budget) => format!(
                "equal. Every method gets {budget} pair-passes (pairs x (k + 1): one epoch of \
                 Panacea, the method that spends most per pair). A stage of s passes per step \
                 runs round(share / (global batch x s)) steps; the curriculum's stages share \
                 the budget as one epoch of each would."
            ),
            None => "one epoch of every stage; the methods spend different compute.".into(),
        };
        match max_steps {
            Some(m) => format!("{rule} Capped at {m} optimizer steps per stage."),
            None => rule,
        }
    }
}

/// What one run of the demo trains with, besides the embedded config.
struct RunSetting<'a> {
    synth: &'a SynthFiles,
    method: &'a str,
    run_dir: &'a Path,
    seed: u64,
    pair_passes: Option<usize>,
    max_steps: Option<usize>,
}

/// The run config of one run as TOML text: the embedded config less `[demo]`, with the paths,
/// method, seed and compute of this run filled in.
fn run_config_text(table: &toml::Table, run: &RunSetting) -> Result<String> {
    let mut table = table.clone();
    table.remove("demo");
    let path = |p: &Path| toml::Value::String(p.display().to_string());
    let mut set = |section: &str, key: &str, value: Option<toml::Value>| -> Result<()> {
        let section = table
            .get_mut(section)
            .and_then(|s| s.as_table_mut())
            .with_context(|| format!("the demo config has no [{section}] table"))?;
        match value {
            Some(value) => section.insert(key.to_string(), value),
            None => section.remove(key),
        };
        Ok(())
    };
    let int = |n: usize| Some(toml::Value::Integer(n as i64));
    set("model", "path", Some(path(&run.synth.model_dir)))?;
    set("data", "train_file", Some(path(&run.synth.train_file)))?;
    set("data", "eval_file", Some(path(&run.synth.eval_file)))?;
    let dimensions = run
        .synth
        .dimensions
        .iter()
        .cloned()
        .map(toml::Value::String);
    set(
        "data",
        "dimensions",
        Some(toml::Value::Array(dimensions.collect())),
    )?;
    set("data", "seed", int(run.seed as usize))?;
    set(
        "method",
        "name",
        Some(toml::Value::String(run.method.to_string())),
    )?;
    set("train", "output_dir", Some(path(run.run_dir)))?;
    set("train", "seed", int(run.seed as usize))?;
    if let Some(budget) = run.pair_passes {
        set("train", "epochs", None)?;
        set("train", "pair_passes", int(budget))?;
    }
    if let Some(steps) = run.max_steps {
        set("train", "max_steps", int(steps))?;
    }
    let body = toml::to_string(&table).context("serialising the demo run config")?;
    Ok(format!(
        "# Written by `modpo-trainer demo` from its embedded config; method {}, seed {}.\n{body}",
        run.method, run.seed
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
    let settings = DemoSettings::new(&table, options)?;
    let moved_aside = claim_out_dir(&options.out, options.force)?;
    // Absolute paths, so the written configs work from anywhere.
    let out = std::fs::canonicalize(&options.out)
        .with_context(|| format!("cannot resolve {}", options.out.display()))?;
    let started = Instant::now();
    let compute_rule = settings.compute_rule(options.max_steps);
    let mut scenarios = Vec::new();
    for &scenario in &settings.scenarios {
        let mut seeds = Vec::new();
        for seed in (0..settings.seeds as u64).map(|i| settings.first_seed + i) {
            let dir = out.join(scenario.name()).join(format!("seed-{seed}"));
            let spec = settings.spec(scenario, seed);
            let outputs = run_seed(&table, &spec, &dir, &settings, options.max_steps)
                .with_context(|| format!("scenario {}, seed {seed}", scenario.name()))?;
            seeds.push(outputs);
        }
        let comparisons: Vec<&Comparison> = seeds.iter().map(|s| &s.comparison).collect();
        let seed_numbers: Vec<u64> = seeds.iter().map(|s| s.seed).collect();
        let summary = AcrossSeeds::gather(
            scenario.name(),
            &seed_numbers,
            &comparisons,
            &seeds[0].compute,
        )?;
        scenarios.push(ScenarioOutputs {
            scenario,
            seeds,
            summary,
        });
    }

    let summaries: Vec<&AcrossSeeds> = scenarios.iter().map(|s| &s.summary).collect();
    let mut md = String::from(
        "# Demo: implicit-reward accuracy on held-out conflict pairs, per scenario and seed\n\n",
    );
    let mut generation_json = Vec::new();
    for (summary, scenario) in summaries.iter().zip(&scenarios) {
        md.push_str(&summary.markdown(&compute_rule));
        md.push('\n');
        let seeds: Vec<(u64, &GenerationComparison)> = scenario
            .seeds
            .iter()
            .map(|s| (s.seed, &s.generation))
            .collect();
        md.push_str(&generation::markdown(&seeds));
        md.push('\n');
        generation_json.push(serde_json::json!({
            "scenario": scenario.scenario.name(),
            "runs": generation::to_json(&seeds),
        }));
    }
    let summary_md = out.join("summary.md");
    let summary_json = out.join("summary.json");
    std::fs::write(&summary_md, &md)
        .with_context(|| format!("cannot write {}", summary_md.display()))?;
    let json = serde_json::json!({
        "compute": compute_rule,
        "scenarios": summaries,
        "generation": generation_json,
    });
    std::fs::write(&summary_json, serde_json::to_string_pretty(&json)?)
        .with_context(|| format!("cannot write {}", summary_json.display()))?;
    Ok(DemoOutputs {
        out,
        moved_aside,
        scenarios,
        summary_md,
        summary_json,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// One seed of one scenario into `dir`: the data and tiny model, every method, the evaluation.
fn run_seed(
    table: &toml::Table,
    spec: &SynthSpec,
    dir: &Path,
    settings: &DemoSettings,
    max_steps: Option<usize>,
) -> Result<SeedOutputs> {
    let pair_passes = settings.budget();
    let mut seconds = Vec::new();
    let started = Instant::now();
    let synth = super::write(&dir.join("data"), spec).context("generating the synthetic data")?;
    if settings.sft_steps > 0 {
        let (first, last) = super::warm_start(&synth, spec, settings.sft_steps)
            .context("warm-starting the tiny model")?;
        tracing::info!(
            "SFT warm start, {} steps: loss {first:.3} -> {last:.3}",
            settings.sft_steps
        );
    }
    seconds.push(("synth".to_string(), started.elapsed().as_secs_f64()));
    tracing::info!(
        "{} seed {}: {} train pairs ({} conflict), {} eval pairs ({} conflict), dimensions {}",
        spec.scenario.name(),
        spec.seed,
        spec.pairs,
        synth.train_conflicts,
        spec.eval_pairs,
        synth.eval_conflicts,
        synth.dimensions.join(", ")
    );

    let config_dir = dir.join("configs");
    std::fs::create_dir_all(&config_dir)
        .with_context(|| format!("cannot create {}", config_dir.display()))?;
    let mut configs = Vec::new();
    let mut runs = Vec::new();
    let mut compute = Vec::new();
    for method in METHODS {
        let run_dir = dir.join("runs").join(method);
        let setting = RunSetting {
            synth: &synth,
            method,
            run_dir: &run_dir,
            seed: spec.seed,
            pair_passes,
            max_steps,
        };
        let text = run_config_text(table, &setting)?;
        let path = config_dir.join(format!("{method}.toml"));
        std::fs::write(&path, &text).with_context(|| format!("cannot write {}", path.display()))?;
        let config = RunConfig::load(&path)?;
        let started = Instant::now();
        tracing::info!("training {method}");
        let summary = train(&config, &text, TrainOptions::default(), &Cluster::single())
            .with_context(|| format!("training {method} ({})", path.display()))?;
        if summary.stopped {
            // A signal (SIGTERM, SIGUSR1) asked the run to stop: the whole demo stops with it,
            // not only this method's training.
            bail!(
                "stopped by a signal while training {method}; {} holds its checkpoint \
                 (`modpo-trainer train --config {} --resume` continues that run)",
                summary.run_dir.display(),
                path.display()
            );
        }
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
        eval::evaluate_runs(&compare, &dir.join("eval"), false).context("evaluating the runs")?;
    seconds.push(("eval".to_string(), started.elapsed().as_secs_f64()));
    let started = Instant::now();
    let generation = generate_and_score(&runs, spec, &synth, settings, dir)?;
    seconds.push(("generate".to_string(), started.elapsed().as_secs_f64()));
    Ok(SeedOutputs {
        seed: spec.seed,
        dir: dir.to_path_buf(),
        synth,
        configs,
        runs,
        comparison,
        written,
        generation,
        seconds,
        compute,
    })
}

/// `eval --generate` on the seed's runs: greedy answers to `generate_prompts` held-out prompts at the
/// paper's grid, scored by the scenario's rule, written into `<dir>/eval-generate/`.
fn generate_and_score(
    runs: &[PathBuf],
    spec: &SynthSpec,
    synth: &SynthFiles,
    settings: &DemoSettings,
    dir: &Path,
) -> Result<GenerationComparison> {
    let scorer = super::scorer::ScenarioScorer::new(spec.scenario, &synth.dimensions)?;
    let options = GenerationOptions {
        runs: runs.to_vec(),
        prompts: settings.generate_prompts.min(spec.eval_pairs),
        grid: None,
        decoding: Decoding {
            max_new_tokens: settings.generate_tokens,
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
        },
        device: None,
        dtype: None,
        bootstrap: Bootstrap::default(),
    };
    let comparison = gen::compare_generations(&options, &scorer)
        .context("generating from the runs (eval --generate)")?;
    gen::report::write(&comparison, &dir.join("eval-generate"), false)?;
    Ok(comparison)
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
