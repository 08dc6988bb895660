//! The alternatives, run by the venv's Python on the benchmark's own model and pairs:
//! `bench/trl_dpo.py` (TRL `DPOTrainer` + PEFT LoRA, with TRL's default reference forward
//! every step and with `precompute_ref_log_probs`) and `bench/naive_stage3.py` (a
//! straightforward PyTorch stage-3 step). Each prints its figures as one JSON line.
//!
//! Each baseline runs in `--rounds` head-to-head rounds: the stage of ours it stands beside is
//! timed in a child process right before each of its runs, and the speed ratio is the median of
//! the rounds' ratios. On a shared VM whose speed drifts by tens of percent over minutes, a
//! ratio of two runs minutes apart measures the drift as much as the code.

use std::io::Write;
use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::{
    median, Bench, CaseResult, BENCH_ALPHA, BENCH_RANK, BETA, CPU_MAX_LENGTH, LEARNING_RATE,
};

/// One head-to-head round: ours, then the baseline, median step times of each.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Round {
    pub ours_median_ms: f64,
    pub baseline_median_ms: f64,
    /// Pairs per median step, ours over the baseline's.
    pub speed_ratio: f64,
}

/// What a baseline script reports (the fields after `versions` are filled in here, over all
/// rounds).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BaselineResult {
    pub name: String,
    pub ms_per_step: Vec<f64>,
    pub pairs_per_step: f64,
    pub policy_tokens_per_step: f64,
    pub peak_rss_bytes: Option<u64>,
    #[serde(default)]
    pub versions: serde_json::Value,
    /// Filled in here.
    #[serde(default)]
    pub median_ms: f64,
    #[serde(default)]
    pub pairs_per_s: f64,
    #[serde(default)]
    pub policy_tokens_per_s: f64,
    /// The stage of ours it stands in for.
    #[serde(default)]
    pub compares_with: String,
    /// Empty when ours was not run (filtered out with `--only`).
    #[serde(default)]
    pub rounds: Vec<Round>,
    /// Median of the rounds' speed ratios.
    #[serde(default)]
    pub speed_ratio: Option<f64>,
}

impl BaselineResult {
    /// Step times, rates and peak memory over every round's run.
    fn merge(runs: Vec<BaselineResult>) -> BaselineResult {
        let mut merged = runs[0].clone();
        merged.ms_per_step = runs.iter().flat_map(|r| r.ms_per_step.clone()).collect();
        merged.peak_rss_bytes = runs.iter().filter_map(|r| r.peak_rss_bytes).max();
        merged.pairs_per_step =
            runs.iter().map(|r| r.pairs_per_step).sum::<f64>() / runs.len() as f64;
        merged.policy_tokens_per_step =
            runs.iter().map(|r| r.policy_tokens_per_step).sum::<f64>() / runs.len() as f64;
        merged.fill_rates();
        merged
    }

    /// Rates per median step, as for our cases ([`CaseResult::fill_rates`]).
    fn fill_rates(&mut self) {
        self.median_ms = median(&self.ms_per_step);
        let median_s = self.median_ms / 1e3;
        self.pairs_per_s = self.pairs_per_step / median_s;
        self.policy_tokens_per_s = self.policy_tokens_per_step / median_s;
    }
}

/// Speed of ours over a baseline: pairs per median step time, ours over theirs. Medians, so
/// that one slow step (a late warm-up, a noisy neighbour) on either side does not decide it.
fn speed_ratio(ours: &CaseResult, baseline: &BaselineResult) -> f64 {
    let ours_rate = ours.micro_batch as f64 / ours.median_ms;
    let baseline_rate = baseline.pairs_per_step / baseline.median_ms;
    ours_rate / baseline_rate
}

fn write_jsonl(path: &Path, rows: &[serde_json::Value]) -> Result<()> {
    let mut file =
        std::fs::File::create(path).with_context(|| format!("cannot write {}", path.display()))?;
    for row in rows {
        writeln!(file, "{row}")?;
    }
    Ok(())
}

/// Runs `python script args`, its stderr to `log`, and parses the last stdout line.
fn run_script(python: &Path, script: &Path, args: &[String], log: &Path) -> Result<BaselineResult> {
    eprintln!("bench: {} {}", script.display(), args.join(" "));
    let output = Command::new(python)
        .arg(script)
        .args(args)
        // The allocator setting `modpo-trainer` gives itself (main.rs, `keep_freed_memory`):
        // no mmap'd chunks and no trimming, through glibc's environment variables.
        .env("MALLOC_MMAP_MAX_", "0")
        .env("MALLOC_TRIM_THRESHOLD_", i32::MAX.to_string())
        .stderr(std::fs::File::create(log)?)
        .output()
        .with_context(|| format!("cannot run {} {}", python.display(), script.display()))?;
    if !output.status.success() {
        bail!(
            "{} failed ({}); its log is {}",
            script.display(),
            output.status,
            log.display()
        );
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let last = stdout
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("");
    let mut result: BaselineResult = serde_json::from_str(last)
        .with_context(|| format!("{} printed no result line: {last:?}", script.display()))?;
    result.fill_rates();
    Ok(result)
}

/// One alternative: its name, script, the script's own arguments, and the case of ours it
/// stands beside.
struct Baseline {
    name: &'static str,
    script: &'static str,
    args: Vec<String>,
    compares_with: &'static str,
}

/// TRL (reference every step, then precomputed) against stage 1; the PyTorch loop against
/// stage 3; each in `rounds` rounds, with `ours(case name)` timing our stage right before each
/// run (None when that case is not selected).
pub fn run_baselines(
    bench: &Bench,
    python: &Path,
    scripts: &Path,
    ours: &mut dyn FnMut(&str) -> Result<Option<CaseResult>>,
) -> Result<Vec<BaselineResult>> {
    let o = &bench.options;
    let model = bench
        .model_dir()
        .context("the cpu preset has a model directory")?;
    let stage1 = o.work.join("stage1_pairs.jsonl");
    write_jsonl(&stage1, &bench.stage1_text_pairs()?)?;
    let stage3 = o.work.join("stage3_steps.jsonl");
    write_jsonl(&stage3, &bench.stage3_steps())?;
    let baselines = baselines(bench, &stage1, &stage3);

    // per baseline: each round's (ours, baseline)
    let mut measured: Vec<Vec<(Option<CaseResult>, BaselineResult)>> =
        vec![Vec::new(); baselines.len()];
    for round in 1..=o.rounds {
        for (baseline, so_far) in baselines.iter().zip(&mut measured) {
            eprintln!("bench: round {round} of {}: {}", o.rounds, baseline.name);
            let ours_now = ours(baseline.compares_with)?;
            let mut args = common_args(bench, model, baseline.name);
            args.extend(baseline.args.iter().cloned());
            let log = o.work.join(format!(
                "{}.log",
                baseline.name.replace([' ', ',', '+'], "_")
            ));
            let result = run_script(python, &scripts.join(baseline.script), &args, &log)?;
            so_far.push((ours_now, result));
        }
    }
    Ok(baselines
        .iter()
        .zip(measured)
        .map(|(baseline, pairs)| summarise(baseline.compares_with, pairs))
        .collect())
}

/// TRL without and with a precomputed reference on the stage-1 pairs in `stage1`, and the
/// PyTorch stage-3 loop on the steps in `stage3`.
fn baselines(bench: &Bench, stage1: &Path, stage3: &Path) -> Vec<Baseline> {
    let mut runs = Vec::new();
    // The precomputed reference first: it is the like-for-like comparison (our timed stage-1
    // step reads cached reference log-probs too), so its ratio is the headline.
    for (name, precompute) in [
        ("trl-dpo+peft, precomputed reference", true),
        ("trl-dpo+peft", false),
    ] {
        let mut args = vec![
            "--pairs".into(),
            stage1.display().to_string(),
            "--batch".into(),
            bench.options.micro_batch.to_string(),
            "--max-length".into(),
            (CPU_MAX_LENGTH + 8).to_string(),
        ];
        if precompute {
            args.push("--precompute-ref".into());
        }
        runs.push(Baseline {
            name,
            script: "trl_dpo.py",
            args,
            compares_with: "curriculum stage 1",
        });
    }
    runs.push(Baseline {
        name: "pytorch stage-3 loop",
        script: "naive_stage3.py",
        args: vec!["--steps-file".into(), stage3.display().to_string()],
        compares_with: "curriculum stage 3",
    });
    runs
}

/// The arguments every baseline script takes: the model, the step counts, threads, LoRA
/// and optimiser settings, and the run's name.
fn common_args(bench: &Bench, model: &Path, name: &str) -> Vec<String> {
    let o = &bench.options;
    [
        "--model",
        &model.display().to_string(),
        "--warmup",
        &o.warmup.to_string(),
        "--steps",
        &o.steps.to_string(),
        "--threads",
        &o.threads.to_string(),
        "--rank",
        &BENCH_RANK.to_string(),
        "--alpha",
        &BENCH_ALPHA.to_string(),
        "--beta",
        &BETA.to_string(),
        "--lr",
        &LEARNING_RATE.to_string(),
        "--name",
        name,
    ]
    .map(String::from)
    .to_vec()
}

/// One baseline over all its rounds: the merged figures, each round's ratio where ours ran,
/// and the median of those ratios.
fn summarise(
    compares_with: &str,
    pairs: Vec<(Option<CaseResult>, BaselineResult)>,
) -> BaselineResult {
    let round_figures: Vec<Round> = pairs
        .iter()
        .filter_map(|(ours, baseline)| {
            ours.as_ref().map(|ours| Round {
                ours_median_ms: ours.median_ms,
                baseline_median_ms: baseline.median_ms,
                speed_ratio: speed_ratio(ours, baseline),
            })
        })
        .collect();
    let mut result = BaselineResult::merge(pairs.into_iter().map(|(_, b)| b).collect());
    result.compares_with = compares_with.to_string();
    result.speed_ratio = (!round_figures.is_empty()).then(|| {
        median(
            &round_figures
                .iter()
                .map(|r| r.speed_ratio)
                .collect::<Vec<_>>(),
        )
    });
    result.rounds = round_figures;
    result
}
