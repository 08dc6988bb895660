//! The alternatives, run by the venv's Python on the benchmark's own model and pairs:
//! `bench/trl_dpo.py` (TRL `DPOTrainer` + PEFT LoRA, with TRL's default reference forward
//! every step and with `precompute_ref_log_probs`) and `bench/naive_stage3.py` (a
//! straightforward PyTorch stage-3 step). Each prints its figures as one JSON line.

use std::io::Write;
use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::{median, Bench, BENCH_ALPHA, BENCH_RANK, BETA, CPU_MAX_LENGTH, LEARNING_RATE};

/// What a baseline script reports.
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
    let mean_s = result.ms_per_step.iter().sum::<f64>() / 1e3 / result.ms_per_step.len() as f64;
    result.median_ms = median(&result.ms_per_step);
    result.pairs_per_s = result.pairs_per_step / mean_s;
    result.policy_tokens_per_s = result.policy_tokens_per_step / mean_s;
    Ok(result)
}

/// TRL (reference every step, then precomputed) against stage 1; the PyTorch loop against
/// stage 3.
pub fn run_baselines(bench: &Bench, python: &Path, scripts: &Path) -> Result<Vec<BaselineResult>> {
    let o = &bench.options;
    let model = bench
        .model_dir()
        .context("the cpu preset has a model directory")?;
    let stage1 = o.work.join("stage1_pairs.jsonl");
    write_jsonl(&stage1, &bench.stage1_text_pairs()?)?;
    let stage3 = o.work.join("stage3_steps.jsonl");
    write_jsonl(&stage3, &bench.stage3_steps())?;
    let common = |name: &str| -> Vec<String> {
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
    };
    let mut results = Vec::new();
    for (name, precompute) in [
        ("trl-dpo+peft", false),
        ("trl-dpo+peft, precomputed reference", true),
    ] {
        let mut args = common(name);
        args.extend([
            "--pairs".into(),
            stage1.display().to_string(),
            "--batch".into(),
            o.micro_batch.to_string(),
            "--max-length".into(),
            (CPU_MAX_LENGTH + 8).to_string(),
        ]);
        if precompute {
            args.push("--precompute-ref".into());
        }
        let log = o
            .work
            .join(format!("{}.log", name.replace([' ', ',', '+'], "_")));
        let mut result = run_script(python, &scripts.join("trl_dpo.py"), &args, &log)?;
        result.compares_with = "curriculum stage 1".into();
        results.push(result);
    }
    let mut args = common("pytorch stage-3 loop");
    args.extend(["--steps-file".into(), stage3.display().to_string()]);
    let log = o.work.join("naive_stage3.log");
    let mut result = run_script(python, &scripts.join("naive_stage3.py"), &args, &log)?;
    result.compares_with = "curriculum stage 3".into();
    results.push(result);
    Ok(results)
}
