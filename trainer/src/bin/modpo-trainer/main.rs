//! `modpo-trainer`: the command line. Each subcommand parses its arguments (`args.rs`), calls
//! the library (`commands.rs`; `run_commands.rs` for the commands that load a finished run)
//! and reports errors with their full context chain and a non-zero exit.

mod args;
mod commands;
mod run_commands;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use modpo_launcher::Topology;

use args::{
    BenchArgs, CurvesArgs, DemoArgs, EvalArgs, ExportArgs, GenerateArgs, ImportGgufArgs, InfoArgs,
    PlanArgs, SynthArgs, TinyModelArgs, TrainArgs, TrainRmArgs,
};

#[derive(Parser)]
#[command(
    name = "modpo-trainer",
    version,
    about = "Controllable multi-objective preference optimisation of LLMs"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print a model directory's resolved config, parameter count and chat template rendering.
    Info(InfoArgs),
    /// Train every stage of the configured method.
    Train(TrainArgs),
    /// Train a reward model with one scalar head per dimension (Bradley-Terry loss per
    /// dimension, LoRA on the base or a frozen base) on a run config's data, for scoring
    /// generated answers (`eval --generate --reward-model DIR`).
    TrainRm(TrainRmArgs),
    /// Convert a Llama GGUF file (F32, F16, BF16, Q8_0, Q4_0, Q4_1) into a Hugging Face directory.
    ImportGguf(ImportGgufArgs),
    /// Answer one prompt (rendered through the chat template) with a KV cache.
    Generate(GenerateArgs),
    /// Write a tiny random Llama model with a byte-level tokenizer (for smoke runs on CPU).
    TinyModel(TinyModelArgs),
    /// Inspect a run's preference data.
    Data {
        #[command(subcommand)]
        command: DataCommand,
    },
    /// Write the model for one preference weight vector as a PEFT LoRA adapter (or, with
    /// --merge, as full merged Hugging Face safetensors).
    Export(ExportArgs),
    /// Implicit-reward accuracy of finished runs on their held-out conflict pairs at the
    /// paper's weight vectors: results.json, results.md (Tables 1-2) and one PNG per dimension
    /// pair (Figures 2-3). Runs must share the dimensions and the held-out data.
    Eval(EvalArgs),
    /// Plot a run's training curves from its metrics.jsonl: loss and training accuracy per
    /// optimizer step over all stages (raw and a 20-step mean), held-out evaluations as points.
    Curves(CurvesArgs),
    /// Write a seeded synthetic k-dimensional preference benchmark (generic JSONL: most pairs
    /// agree, a share conflict; one of four scenarios of how the dimensions relate) and a tiny
    /// model for it.
    Synth(SynthArgs),
    /// The main job on an embedded default, on CPU in minutes: synthetic data and a tiny
    /// model for each scenario and seed, the curriculum, Panacea and DPO-Soup trained on it at
    /// equal compute, then the evaluation tables per seed and across seeds, and plots.
    Demo(DemoArgs),
    /// Training-step speed and memory of every stage and method, each optimisation switched
    /// off in turn, and (cpu preset) TRL + PEFT and a plain PyTorch stage-3 loop on the same
    /// model and pairs: a table on stdout and <out>/results.json.
    Bench(BenchArgs),
    /// The predicted peak memory of every stage's step, by part (weights, activations with and
    /// without recomputation, LM head, adapters with gradients and AdamW, all-reduce buffer,
    /// runtime), and the fastest setting that fits --gpu-memory; exits non-zero when some
    /// stage fits in no setting.
    Plan(PlanArgs),
    /// Serve a run (or a model) behind an OpenAI-compatible HTTP endpoint with per-request
    /// preference weights, continuous batching and a playground page at `/`.
    Serve(modpo_trainer::serve::ServeArgs),
}

#[derive(Subcommand)]
enum DataCommand {
    /// Print rows, pairs, agree / conflict / tied counts, per-dimension preferences,
    /// conflicts per dimension pair, token-length percentiles and truncation.
    Inspect {
        /// The run config (TOML) whose [model] tokenizer and [data] files to inspect.
        #[arg(long)]
        config: std::path::PathBuf,
    },
}

/// glibc serves allocations above 32 MiB with fresh `mmap` pages and unmaps them on free, so
/// every training step page-faults its activations in again: a CPU stage-3 step spent a third
/// of its time in the kernel (`bench`, 2.2M minor faults in 4 steps). Allocating from the heap
/// only, and never trimming it, keeps freed pages for the next step.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn keep_freed_memory() {
    const M_TRIM_THRESHOLD: std::ffi::c_int = -1;
    const M_MMAP_MAX: std::ffi::c_int = -4;
    extern "C" {
        fn mallopt(param: std::ffi::c_int, value: std::ffi::c_int) -> std::ffi::c_int;
    }
    // SAFETY: mallopt only changes glibc malloc's tuning; called before any other thread.
    unsafe {
        mallopt(M_MMAP_MAX, 0);
        mallopt(M_TRIM_THRESHOLD, std::ffi::c_int::MAX);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn keep_freed_memory() {}

fn main() -> ExitCode {
    // MODPO_KEEP_FREED_MEMORY=0 leaves glibc's defaults (and GLIBC_TUNABLES) in force: how
    // the memory planner's CPU figures were checked against live memory.
    if std::env::var_os("MODPO_KEEP_FREED_MEMORY").is_none_or(|v| v != "0") {
        keep_freed_memory();
    }
    // Rank 0 tells the story; the other ranks of a job only warn (RUST_LOG overrides both).
    let is_main_rank = Topology::from_env().map(|t| t.is_main()).unwrap_or(true);
    let default_level = if is_main_rank { "info" } else { "warn" };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| default_level.into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let result = match Cli::parse().command {
        Command::Info(args) => commands::info(&args),
        Command::Train(args) => commands::train(&args),
        Command::TrainRm(args) => commands::train_rm(&args),
        Command::TinyModel(args) => commands::tiny_model(&args),
        Command::ImportGguf(args) => commands::import_gguf(&args),
        Command::Generate(args) => run_commands::generate(&args),
        Command::Data {
            command: DataCommand::Inspect { config },
        } => commands::inspect_data(&config),
        Command::Export(args) => run_commands::export(&args),
        Command::Eval(args) => run_commands::eval(args),
        Command::Curves(args) => run_commands::curves(&args),
        Command::Synth(args) => commands::synth(&args),
        Command::Demo(args) => commands::demo(args),
        Command::Bench(args) => commands::bench(args),
        Command::Plan(args) => commands::plan(&args),
        Command::Serve(args) => modpo_trainer::serve::serve(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::Cli;

    /// Every argument of `command` and its subcommands without help text, as `path --arg`.
    fn arguments_without_help(command: &clap::Command, path: &str, missing: &mut Vec<String>) {
        let path = format!("{path} {}", command.get_name()).trim().to_string();
        for arg in command.get_arguments() {
            let id = arg.get_id().as_str();
            if matches!(id, "help" | "version") {
                continue; // clap's own
            }
            if arg.get_help().is_none() && arg.get_long_help().is_none() {
                missing.push(format!("{path} --{id}"));
            }
        }
        for sub in command.get_subcommands() {
            arguments_without_help(sub, &path, missing);
        }
    }

    #[test]
    fn every_argument_has_help() {
        let mut missing = Vec::new();
        arguments_without_help(&Cli::command(), "", &mut missing);
        assert!(missing.is_empty(), "arguments without help: {missing:?}");
    }

    #[test]
    fn the_cli_is_well_formed() {
        Cli::command().debug_assert();
    }
}
