//! The benchmark's tables on stdout and `results.json`.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use serde_json::json;
use tch::Device;

use super::python::BaselineResult;
use super::{Bench, CaseResult, Variant};

fn mib(bytes: Option<u64>) -> String {
    bytes.map_or("-".into(), |b| {
        format!("{:.0}", b as f64 / (1 << 20) as f64)
    })
}

/// The machine, as far as the benchmark can tell.
fn machine(bench: &Bench) -> serde_json::Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_default();
    json!({
        "cpu": cpu,
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "threads": bench.options.threads,
        "device": format!("{:?}", bench.options.device),
        "dtype": format!("{:?}", bench.kind),
        "dense_matmul_gflops": bench.best_matmul_rate.get() / 1e9,
    })
}

/// Prints the tables, and writes them with every figure to `<out>/results.json`.
pub fn write(
    bench: &Bench,
    results: &[CaseResult],
    baselines: &[BaselineResult],
    micro_batch_search: Option<&Vec<(bool, usize)>>,
) -> Result<()> {
    let (text, results_json) = render(bench, results, baselines, micro_batch_search)?;
    print!("{text}");
    save(&bench.options.out, &results_json)
}

/// The tables as text, and `results.json` (which holds the text too).
fn render(
    bench: &Bench,
    results: &[CaseResult],
    baselines: &[BaselineResult],
    micro_batch_search: Option<&Vec<(bool, usize)>>,
) -> Result<(String, serde_json::Value)> {
    let mut text = String::new();
    write_header(&mut text, bench)?;
    write_cases(&mut text, results)?;
    let ratios = write_baselines(&mut text, bench.options.rounds, baselines)?;
    let ablations = write_ablations(&mut text, results, bench.options.preset)?;
    if let Some(found) = micro_batch_search {
        write_micro_batch_search(&mut text, bench.options.seq_len, found)?;
    }
    let o = &bench.options;
    let c = &bench.config;
    let command: Vec<String> = std::env::args().collect();
    let results_json = json!({
        "command": command.join(" "),
        "preset": o.preset,
        "machine": machine(bench),
        "model": {
            "layers": c.num_layers, "hidden": c.hidden_size, "intermediate": c.intermediate_size,
            "heads": c.num_heads, "kv_heads": c.num_kv_heads, "vocab": c.vocab_size,
        },
        "settings": {
            "pairs_per_step": o.micro_batch, "lora_rank": super::BENCH_RANK,
            "lora_alpha": super::BENCH_ALPHA, "warmup_steps": o.warmup, "timed_steps": o.steps,
            "head_to_head_rounds": o.rounds,
            "max_length": if o.preset == super::Preset::Cpu { super::CPU_MAX_LENGTH } else { o.seq_len },
            "gpu": !matches!(o.device, Device::Cpu),
        },
        "cases": results,
        "baselines": baselines,
        "speed_ratios": ratios,
        "ablations": ablations,
        "largest_micro_batch": micro_batch_search.map(|f| f.iter().map(|(r, m)| json!({"recompute": r, "pairs": m})).collect::<Vec<_>>()),
        "table": text,
    });
    Ok((text, results_json))
}

/// The model and settings, the matmul rate, and the heading of the cases' table.
fn write_header(text: &mut String, bench: &Bench) -> Result<()> {
    let o = &bench.options;
    let c = &bench.config;
    writeln!(
        text,
        "model: {} layers, hidden {}, MLP {}, {} heads / {} KV heads, vocab {}; {:?} on {:?}; \
         {} pairs per step, LoRA rank {}; {} timed steps after {} warm-up",
        c.num_layers,
        c.hidden_size,
        c.intermediate_size,
        c.num_heads,
        c.num_kv_heads,
        c.vocab_size,
        bench.kind,
        o.device,
        o.micro_batch,
        super::BENCH_RANK,
        o.steps,
        o.warmup
    )?;
    writeln!(
        text,
        "dense matmul rate: {:.1} GFLOP/s ({:?}, {} threads; the best of the measurements before \
         each case)\n",
        bench.best_matmul_rate.get() / 1e9,
        bench.kind,
        o.threads
    )?;
    writeln!(
        text,
        "{:<40} {:>10} {:>8} {:>10} {:>10} {:>6} {:>9} {:>9}",
        "case", "median ms", "pairs/s", "tokens/s", "GFLOP/st", "MFU", "peak MiB", "plan MiB"
    )?;
    Ok(())
}

/// One row per case.
fn write_cases(text: &mut String, results: &[CaseResult]) -> Result<()> {
    for r in results {
        writeln!(
            text,
            "{:<40} {:>10.1} {:>8.2} {:>10.0} {:>10.2} {:>5.1}% {:>9} {:>9}",
            r.name,
            r.median_ms,
            r.pairs_per_s,
            r.policy_tokens_per_s,
            r.flops_per_step / 1e9,
            r.mfu * 100.0,
            mib(r.peak_memory_bytes),
            mib(r.predicted_peak_bytes)
        )?;
    }
    Ok(())
}

/// The alternatives' table (nothing when none ran); returns the speed ratios by
/// `ours / baseline`.
fn write_baselines(
    text: &mut String,
    rounds: usize,
    baselines: &[BaselineResult],
) -> Result<serde_json::Map<String, serde_json::Value>> {
    let mut ratios = serde_json::Map::new();
    if baselines.is_empty() {
        return Ok(ratios);
    }
    writeln!(
        text,
        "\nalternatives (same model, pairs, rank and batch, and our glibc malloc setting: no \
         mmap, no trimming), {} rounds each; speed: pairs per median step, ours timed right \
         before each round's run; the median round's ratio, every round's in brackets. The \
         headline for stage 1 is TRL with a precomputed reference (ours reads cached \
         reference log-probs too); TRL's default, a reference forward every step, follows",
        rounds
    )?;
    for b in baselines {
        let speedup = b.speed_ratio;
        let each_round: Vec<String> = b
            .rounds
            .iter()
            .map(|r| format!("{:.2}", r.speed_ratio))
            .collect();
        writeln!(
            text,
            "{:<40} {:>10.1} {:>8.2} {:>10.0} {:>10} {:>6} {:>9}   ours ({}) is {}",
            b.name,
            b.median_ms,
            b.pairs_per_s,
            b.policy_tokens_per_s,
            "",
            "",
            mib(b.peak_rss_bytes),
            b.compares_with,
            speedup.map_or("-".into(), |s| format!(
                "{s:.2}x as fast [{}]",
                each_round.join(" ")
            )),
        )?;
        if let Some(s) = speedup {
            ratios.insert(format!("{} / {}", b.compares_with, b.name), json!(s));
        }
    }
    Ok(ratios)
}

/// Each variant (an optimisation switched off, or recomputation on): the stage's real-token
/// throughput relative to the default (tokens/s, not step time: without bucketing the batches
/// differ), and its peak memory; returns both by case name.
fn write_ablations(
    text: &mut String,
    results: &[CaseResult],
    preset: super::Preset,
) -> Result<serde_json::Map<String, serde_json::Value>> {
    let training = Variant::training(preset);
    let mut ablations = serde_json::Map::new();
    let ablated: Vec<&CaseResult> = results
        .iter()
        .filter(|r| r.variant != training && r.name.contains(", "))
        .collect();
    if ablated.is_empty() {
        return Ok(ablations);
    }
    writeln!(
        text,
        "\nvariants of the default (an optimisation switched off, or recomputation switched \
         on): throughput (real tokens/s) and peak memory relative to the default"
    )?;
    for r in ablated {
        let default = results
            .iter()
            .find(|f| f.variant == training && f.method == r.method && f.stage == r.stage);
        let Some(default) = default else {
            continue;
        };
        let speed = r.policy_tokens_per_s / default.policy_tokens_per_s;
        let memory = match (r.peak_memory_bytes, default.peak_memory_bytes) {
            (Some(a), Some(b)) => Some(a as f64 / b as f64),
            _ => None,
        };
        writeln!(
            text,
            "{:<40} throughput {:>5.2}x, peak memory {:>6}",
            r.name,
            speed,
            memory.map_or("-".into(), |m| format!("{m:.2}x"))
        )?;
        ablations.insert(
            r.name.clone(),
            json!({"throughput_vs_default": speed, "peak_memory_vs_default": memory}),
        );
    }
    Ok(ablations)
}

/// The largest stage-3 micro-batch found with and without recomputation.
fn write_micro_batch_search(
    text: &mut String,
    seq_len: usize,
    found: &[(bool, usize)],
) -> Result<()> {
    writeln!(
        text,
        "\nlargest stage-3 micro-batch that fits ({} tokens per sequence):",
        seq_len
    )?;
    for (recompute, pairs) in found {
        writeln!(
            text,
            "  {} recomputation: {pairs} pairs",
            if *recompute { "with" } else { "without" }
        )?;
    }
    Ok(())
}

/// Writes `out/results.json`, aside and renamed, so an interrupted run never leaves half a
/// file.
fn save(out: &Path, results_json: &serde_json::Value) -> Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let path = out.join("results.json");
    let partial = out.join("results.json.partial");
    std::fs::write(&partial, serde_json::to_string_pretty(results_json)?)
        .with_context(|| format!("cannot write {}", partial.display()))?;
    std::fs::rename(&partial, &path)
        .with_context(|| format!("cannot rename {} to {}", partial.display(), path.display()))?;
    eprintln!("bench: wrote {}", path.display());
    Ok(())
}
