//! `modpo-trainer`: the command line. Each subcommand parses its arguments, calls the library
//! and reports errors with their full context chain and a non-zero exit.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use modpo_trainer::checkpoint::{self, ADAPTERS_FILE};
use modpo_trainer::config::RunConfig;
use modpo_trainer::export;
use modpo_trainer::model::{self, load::Checkpoint, ModelConfig};
use modpo_trainer::tokenizer::{ChatMessage, ChatTokenizer};
use tch::{Device, Kind};

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
    Info {
        /// A Hugging Face model directory (config.json, *.safetensors, tokenizer.json).
        #[arg(long)]
        model: PathBuf,
        /// A file holding a Jinja chat template to use instead of the model's own.
        #[arg(long)]
        chat_template: Option<PathBuf>,
    },
    /// Train every stage of the configured method.
    Train {
        #[arg(long)]
        config: PathBuf,
    },
    /// Write a tiny random Llama model with a byte-level tokenizer (for smoke runs on CPU).
    TinyModel {
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 0)]
        seed: i64,
    },
    /// Inspect a run's preference data.
    Data {
        #[command(subcommand)]
        command: DataCommand,
    },
    /// Write the model for one preference weight vector as a PEFT LoRA adapter (or, with
    /// --merge, as full merged Hugging Face safetensors).
    Export {
        /// A run directory (holding adapters.safetensors).
        #[arg(long)]
        run: PathBuf,
        /// The weight vector w, one value per dimension, on the simplex: e.g. 0.3,0.7.
        #[arg(long)]
        weights: String,
        /// Output directory; must not exist or be empty.
        #[arg(long)]
        out: PathBuf,
        /// Write merged full weights instead of an adapter.
        #[arg(long)]
        merge: bool,
    },
}

#[derive(Subcommand)]
enum DataCommand {
    /// Print rows, pairs, agree / conflict / tied counts, per-dimension preferences,
    /// conflicts per dimension pair, token-length percentiles and truncation.
    Inspect {
        #[arg(long)]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Info {
            model,
            chat_template,
        } => info(&model, chat_template.as_deref()),
        Command::Train { config } => train(&config),
        Command::TinyModel { out, seed } => tiny_model(&out, seed),
        Command::Data {
            command: DataCommand::Inspect { config },
        } => inspect_data(&config),
        Command::Export {
            run,
            weights,
            out,
            merge,
        } => export(&run, &weights, &out, merge),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn info(dir: &Path, template_file: Option<&Path>) -> Result<()> {
    let config = ModelConfig::from_model_dir(dir)?;
    let shapes = model::llama::parameter_shapes(&config);
    // Keys and shapes are checked against the file headers; no weight is read.
    Checkpoint::open(dir)?.verify(&shapes).with_context(|| {
        format!(
            "checkpoint of {} does not match its config.json",
            dir.display()
        )
    })?;
    let parameters: i64 = shapes.iter().map(|(_, s)| s.iter().product::<i64>()).sum();

    println!("model            {}", dir.display());
    println!("architecture     {:?}", config.architecture);
    println!(
        "parameters       {parameters} ({:.3} B)",
        parameters as f64 / 1e9
    );
    println!("layers           {}", config.num_layers);
    println!(
        "hidden / ffn     {} / {}",
        config.hidden_size, config.intermediate_size
    );
    println!(
        "heads            {} query, {} key/value (head dim {})",
        config.num_heads, config.num_kv_heads, config.head_dim
    );
    println!("vocabulary       {}", config.vocab_size);
    println!(
        "rope             theta {} {:?}",
        config.rope_theta, config.rope_scaling
    );
    println!("sliding window   {:?}", config.sliding_window);
    println!("tied embeddings  {}", config.tie_word_embeddings);
    println!("rms norm eps     {}", config.rms_norm_eps);

    let template = template_file
        .map(|p| std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display())))
        .transpose()?;
    let tokenizer = ChatTokenizer::from_model_dir(dir, template.as_deref())?;
    let sample = [ChatMessage {
        role: "user".into(),
        content: "How do I bake bread?".into(),
    }];
    let rendered = tokenizer.render_chat(&sample, true)?;
    let ids = tokenizer.encode_chat(&sample, true)?;
    println!(
        "eos token        {:?} (id {})",
        tokenizer.eos_token(),
        tokenizer.eos_token_id()
    );
    println!(
        "sample prompt    {} tokens, rendered:\n{rendered}",
        ids.len()
    );
    Ok(())
}

fn inspect_data(config_path: &Path) -> Result<()> {
    let config = RunConfig::load(config_path)?;
    let tokenizer =
        ChatTokenizer::from_model_dir(&config.model.path, config.model.chat_template.as_deref())?;
    print!(
        "{}",
        modpo_trainer::data::inspect(&config.data, &tokenizer)?
    );
    Ok(())
}

fn export(run: &Path, weights: &str, out: &Path, merge: bool) -> Result<()> {
    let adapters_path = run.join(ADAPTERS_FILE);
    let meta = checkpoint::read_adapter_meta(&adapters_path)?;
    let w = export::parse_weights(weights)?;
    export::validate_weights(&w, &meta.dimensions).context("--weights")?;
    // Never write into a directory that already holds something.
    if out.exists()
        && std::fs::read_dir(out)
            .map(|mut d| d.next().is_some())
            .unwrap_or(true)
    {
        bail!(
            "{} already exists and is not empty: choose a new --out",
            out.display()
        );
    }
    let spec = meta.spec();
    let loaded = model::load_model(&meta.model_path, Some(&spec), Device::Cpu, Kind::Float)?;
    if loaded.fingerprint != meta.model_fingerprint {
        bail!(
            "{} was trained on a different model than {} (fingerprints {} vs {})",
            adapters_path.display(),
            meta.model_path.display(),
            meta.model_fingerprint,
            loaded.fingerprint
        );
    }
    checkpoint::load_adapters(&adapters_path, &loaded.adapters)?;
    if merge {
        export::write_merged_model(&loaded.model, &loaded.base, &w, &meta.model_path, out)?;
        println!("merged model for w = {w:?} written to {}", out.display());
    } else {
        export::write_peft_adapter(&loaded.model, &w, &meta.model_path, out)?;
        println!(
            "PEFT LoRA adapter for w = {w:?} written to {}",
            out.display()
        );
    }
    Ok(())
}

fn train(config_path: &Path) -> Result<()> {
    let config = RunConfig::load(config_path)?;
    let text = std::fs::read_to_string(config_path)?;
    let summary = modpo_trainer::train::train(&config, &text)?;
    println!(
        "trained {} stage(s) ({:?} steps); adapters: {}",
        summary.steps.len(),
        summary.steps,
        summary.adapters.display()
    );
    Ok(())
}

fn tiny_model(out: &Path, seed: i64) -> Result<()> {
    if out.join("config.json").exists() {
        bail!("{} already holds a model", out.display());
    }
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    model::tiny::write_tiny_model(out, &Default::default(), seed)?;
    println!("tiny model written to {}", out.display());
    Ok(())
}
