//! `modpo-trainer`: the command line. Each subcommand parses its arguments, calls the library
//! and reports errors with their full context chain and a non-zero exit.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use modpo_trainer::model::{self, load::Checkpoint, ModelConfig};
use modpo_trainer::tokenizer::{ChatMessage, ChatTokenizer};

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
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn info(dir: &std::path::Path, template_file: Option<&std::path::Path>) -> Result<()> {
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
