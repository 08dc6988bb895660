//! `modpo-trainer bench` end to end on a tiny budget (one decoder layer, one timed step): every
//! stage and method and one ablation in child processes, the TRL + PEFT and PyTorch baselines
//! when the venv has them, and results.json with the ratios the report promises. The figures
//! themselves are not checked (they are machine-dependent); that they exist and are sane is.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;
use support::{bin, pku_sample, project_root};

fn venv_python() -> Option<PathBuf> {
    let python = project_root().join(".venv/bin/python");
    let has_trl = Command::new(&python)
        .args(["-c", "import trl, peft"])
        .status()
        .is_ok_and(|s| s.success());
    has_trl.then_some(python)
}

/// `bench` of stage 1 only, 2 rounds of 2 timed steps on one layer, writing to `out`.
fn bench_command(work: &Path, out: &Path, python: Option<&Path>) -> Command {
    let mut command = Command::new(bin());
    command.args([
        "bench",
        "--device",
        "cpu",
        "--layers",
        "1",
        "--max-pairs",
        "96",
    ]);
    command.args([
        "--micro-batch",
        "4",
        "--warmup",
        "0",
        "--steps",
        "2",
        "--threads",
        "2",
        "--rounds",
        "2",
    ]);
    command.args(["--only", "stage 1"]);
    command.arg("--out").arg(out);
    command.arg("--work").arg(work);
    command.arg("--data").arg(pku_sample());
    command.arg("--scripts").arg(project_root().join("bench"));
    if let Some(python) = python {
        command.arg("--python").arg(python);
    } else {
        eprintln!("no .venv with trl and peft: the baselines are not exercised");
    }
    command
}

#[test]
fn tiny_bench_writes_every_case_and_ratio() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let python = venv_python();
    let output = bench_command(&tmp.path().join("work"), &out, python.as_deref())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("dense matmul rate"), "{stdout}");

    let results: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
    assert!(!out.join("results.json.partial").exists());
    check_cases(&results);
    check_ablations(&results);
    if python.is_some() {
        check_baselines(&results);
        assert!(stdout.contains("as fast"), "{stdout}");
    }
}

/// The cases `--only` kept, in order, each with sane rates.
fn check_cases(results: &Value) {
    let cases = results["cases"].as_array().unwrap();
    let names: Vec<&str> = cases.iter().map(|c| c["name"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        [
            "curriculum stage 1",
            "stage 1, reference every step",
            "stage 1, a row per response"
        ],
        "--only keeps the matching cases, in order"
    );
    // Every case's rates are per median step and its MFU is against the one rate the table
    // prints: the best of the rates each child measured, which drift on a shared machine.
    let rate = results["machine"]["dense_matmul_gflops"].as_f64().unwrap() * 1e9;
    for case in cases {
        check_case_rates(case, rate);
    }
    assert!(results["machine"]["dense_matmul_gflops"].as_f64().unwrap() > 0.0);
}

/// One case: its MFU against `rate` (FLOP/s), pairs and tokens per second at its median step.
fn check_case_rates(case: &Value, rate: f64) {
    assert!(case["matmul_rate"].as_f64().unwrap() <= rate * (1.0 + 1e-12));
    let ms = case["median_ms"].as_f64().unwrap();
    let mfu = case["mfu"].as_f64().unwrap();
    let at_median = |per_step: f64| per_step / (ms / 1e3);
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-9 * b.abs();
    let flops = case["flops_per_step"].as_f64().unwrap();
    assert!(
        close(mfu, at_median(flops) / rate),
        "MFU {mfu} of {}",
        case["name"]
    );
    let pairs = case["micro_batch"].as_f64().unwrap();
    assert!(close(
        case["pairs_per_s"].as_f64().unwrap(),
        at_median(pairs)
    ));
    let tokens = case["policy_tokens_per_step"].as_f64().unwrap();
    assert!(close(
        case["policy_tokens_per_s"].as_f64().unwrap(),
        at_median(tokens)
    ));
    assert!(ms > 0.0 && pairs > 0.0 && tokens > 0.0);
    assert!(mfu > 0.0 && mfu < 1.0, "MFU {mfu} of {}", case["name"]);
    assert!(case["flops_per_step"].as_f64().unwrap() > 0.0);
    assert!(case["peak_memory_bytes"].as_u64().unwrap() > 0);
    assert_eq!(case["ms_per_step"].as_array().unwrap().len(), 2);
}

/// The two ablations against the default case: their throughput ratios and model FLOPs.
fn check_ablations(results: &Value) {
    let cases = results["cases"].as_array().unwrap();
    assert!(results["ablations"]["stage 1, a row per response"]["throughput_vs_default"].is_f64());
    // Model FLOPs count the training passes only: the same batches give the same count, and the
    // ablation's extra reference forward shows as lower MFU, not as more useful work.
    assert_eq!(cases[0]["flops_per_step"], cases[1]["flops_per_step"]);
    // The prompt twice, once per response, is more model FLOPs than once per pair.
    assert!(cases[2]["flops_per_step"].as_f64() > cases[0]["flops_per_step"].as_f64());
    assert!(
        results["ablations"]["stage 1, reference every step"]["throughput_vs_default"].is_f64()
    );
}

/// The TRL + PEFT and PyTorch baselines and the speed ratios against them.
fn check_baselines(results: &Value) {
    let baselines: Vec<&str> = results["baselines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["name"].as_str().unwrap())
        .collect();
    assert_eq!(baselines.len(), 3, "{baselines:?}");
    let ratios = results["speed_ratios"].as_object().unwrap();
    // Stage 3 was filtered out by --only, so only the two TRL ratios have a partner.
    assert_eq!(ratios.len(), 2, "{ratios:?}");
    assert!(ratios.values().all(|r| r.as_f64().unwrap() > 0.0));
    // Two head-to-head rounds each: ours re-timed before every TRL run; the stage-3 loop
    // ran twice too but has no partner, so no rounds and no ratio.
    for baseline in results["baselines"].as_array().unwrap() {
        check_baseline_rounds(results, baseline);
    }
}

/// One baseline: 2 rounds of 2 timed steps, and its ratio the median of its rounds' ratios
/// when it has a partner among our cases.
fn check_baseline_rounds(results: &Value, baseline: &Value) {
    let rounds = baseline["rounds"].as_array().unwrap();
    let runs = baseline["ms_per_step"].as_array().unwrap().len();
    assert_eq!(runs, 4, "two rounds of two timed steps: {baseline}");
    if baseline["compares_with"] == "curriculum stage 1" {
        assert_eq!(rounds.len(), 2, "{baseline}");
        let ratios: Vec<f64> = rounds
            .iter()
            .map(|r| r["speed_ratio"].as_f64().unwrap())
            .collect();
        let reported = baseline["speed_ratio"].as_f64().unwrap();
        // The median of two is their mean.
        assert!((reported - (ratios[0] + ratios[1]) / 2.0).abs() < 1e-9);
        let key = format!(
            "curriculum stage 1 / {}",
            baseline["name"].as_str().unwrap()
        );
        assert_eq!(ratios_json(results, &key), reported);
    } else {
        assert!(
            rounds.is_empty() && baseline["speed_ratio"].is_null(),
            "{baseline}"
        );
    }
}

fn ratios_json(results: &Value, key: &str) -> f64 {
    results["speed_ratios"][key].as_f64().unwrap()
}
