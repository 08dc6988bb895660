//! `modpo-trainer`: the command line. Each subcommand parses its arguments, calls the library
//! and reports errors with their full context chain and a non-zero exit.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use modpo_launcher::{run_or_abort, Topology};
use modpo_trainer::checkpoint::{self, ADAPTERS_FILE};
use modpo_trainer::config::RunConfig;
use modpo_trainer::export;
use modpo_trainer::model::{self, load::Checkpoint, ModelConfig};
use modpo_trainer::tokenizer::{ChatMessage, ChatTokenizer};
use modpo_trainer::train::{Cluster, TrainOptions};
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
        /// Continue the run in train.output_dir from its latest valid checkpoint.
        #[arg(long, conflicts_with = "resume_from_stage")]
        resume: bool,
        /// Start stage N from the final checkpoint of stage N - 1.
        #[arg(long, value_name = "N")]
        resume_from_stage: Option<usize>,
        /// Stop after stage N's final checkpoint (one batch job per stage).
        #[arg(long, value_name = "N")]
        until_stage: Option<usize>,
    },
    /// Convert a Llama GGUF file (F32, F16, BF16, Q8_0, Q4_0, Q4_1) into a Hugging Face directory.
    ImportGguf {
        /// The GGUF file.
        file: PathBuf,
        /// The directory to write (config.json, model.safetensors, tokenizer files).
        #[arg(long)]
        out: PathBuf,
    },
    /// Answer one prompt (rendered through the chat template) with a KV cache.
    Generate {
        /// A run directory: its adapters.safetensors conditioned on --weights.
        #[arg(long, conflicts_with = "model", requires = "weights")]
        run: Option<PathBuf>,
        /// Preference weights for --run, e.g. 0.3,0.7.
        #[arg(long)]
        weights: Option<String>,
        /// A Hugging Face model directory, without adapters.
        #[arg(long, required_unless_present = "run")]
        model: Option<PathBuf>,
        #[arg(long)]
        prompt: String,
        #[arg(long, default_value_t = 256)]
        max_new_tokens: usize,
        /// 0 = greedy.
        #[arg(long, default_value_t = 0.0)]
        temperature: f64,
        #[arg(long, default_value_t = 1.0)]
        top_p: f64,
        #[arg(long, default_value_t = 0)]
        seed: u64,
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
    /// Implicit-reward accuracy of finished runs on their held-out conflict pairs at the
    /// paper's weight vectors: results.json, results.md (Tables 1-2) and one PNG per dimension
    /// pair (Figures 2-3). Runs must share the dimensions and the held-out data.
    Eval {
        /// A run directory (written by `train`); repeat to compare runs.
        #[arg(long = "run", required = true, value_name = "DIR")]
        runs: Vec<PathBuf>,
        /// Output directory (created); default `<first run>/eval`.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Replace results already in the output directory.
        #[arg(long)]
        force: bool,
        /// Device for every run instead of each run's `model.device`.
        #[arg(long, value_parser = ["auto", "cpu", "cuda"])]
        device: Option<String>,
        /// Pairs per micro-batch instead of each run's `data.micro_batch`.
        #[arg(long)]
        micro_batch: Option<usize>,
        /// Bootstrap resamples of the pairs for the 95% intervals (0: no intervals).
        #[arg(long, default_value_t = 1000)]
        bootstrap: usize,
        /// Seed of the bootstrap.
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Write a seeded synthetic k-dimensional preference benchmark (generic JSONL: most pairs
    /// agree, a share conflict; dimension i rewards its marker word) and a tiny model for it.
    Synth {
        /// Output directory: train.jsonl, eval.jsonl, model/.
        #[arg(long)]
        out: PathBuf,
        /// k, the number of dimensions (2 to 4).
        #[arg(long, default_value_t = 2)]
        dimensions: usize,
        /// Training pairs.
        #[arg(long, default_value_t = 2000)]
        pairs: usize,
        /// Held-out pairs.
        #[arg(long, default_value_t = 400)]
        eval_pairs: usize,
        /// Share of conflict pairs.
        #[arg(long, default_value_t = 0.25)]
        conflict_rate: f64,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// The main job on an embedded default, on CPU in minutes: synthetic data and a tiny
    /// model, the curriculum, Panacea and DPO-Soup trained on it, then the evaluation table
    /// and plots.
    Demo {
        /// The demo directory (created; an existing non-empty one is refused).
        #[arg(long, default_value = "runs/demo")]
        out: PathBuf,
        /// Move an existing --out aside (renamed with a timestamp, never deleted).
        #[arg(long)]
        force: bool,
        /// Train pairs instead of the embedded default.
        #[arg(long)]
        pairs: Option<usize>,
        /// Optimizer steps per stage instead of the embedded default.
        #[arg(long)]
        max_steps: Option<usize>,
        /// A demo config (the layout of configs/demo/demo.toml) instead of the embedded one.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Training-step speed and memory of every stage and method, each optimisation switched
    /// off in turn, and (cpu preset) TRL + PEFT and a plain PyTorch stage-3 loop on the same
    /// model and pairs: a table on stdout and <out>/results.json.
    Bench {
        #[arg(long, value_enum, default_value = "cpu")]
        preset: modpo_trainer::bench::Preset,
        /// Where results.json goes.
        #[arg(long, default_value = "bench")]
        out: PathBuf,
        /// Scratch directory (model, the baselines' inputs and logs).
        #[arg(long, default_value = "target/bench")]
        work: PathBuf,
        /// PKU-SafeRLHF JSONL of the cpu preset.
        #[arg(long, default_value = "../shared/data/pku_saferlhf_sample.jsonl")]
        data: PathBuf,
        /// Python with torch, transformers, peft and trl (the baselines are skipped without).
        #[arg(long)]
        python: Option<PathBuf>,
        /// Directory of trl_dpo.py and naive_stage3.py.
        #[arg(long, default_value = "bench")]
        scripts: PathBuf,
        #[arg(long, default_value_t = 2)]
        warmup: usize,
        #[arg(long, default_value_t = 8)]
        steps: usize,
        /// Head-to-head rounds against each baseline (cpu preset): ours is timed again right
        /// before each run of the baseline, and the speed ratio is the median of the rounds'.
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..))]
        rounds: u64,
        /// Intra-op threads (default: every core).
        #[arg(long)]
        threads: Option<usize>,
        /// Pairs per step.
        #[arg(long, default_value_t = 8)]
        micro_batch: usize,
        /// Use at most this many training pairs (cpu preset).
        #[arg(long)]
        max_pairs: Option<usize>,
        /// Decoder layers instead of the preset's (smoke runs of the llama3-8b preset).
        #[arg(long)]
        layers: Option<i64>,
        /// Tokens per sequence (llama3-8b preset).
        #[arg(long, default_value_t = 1024)]
        seq_len: usize,
        /// Skip timing each optimisation switched off.
        #[arg(long)]
        no_ablations: bool,
        /// Search the largest stage-3 micro-batch that fits, up to this many pairs.
        #[arg(long)]
        search_micro_batch: Option<usize>,
        /// cpu, cuda, or auto (the GPU when there is one).
        #[arg(long, default_value = "auto")]
        device: String,
        /// Only the cases whose name contains this (e.g. "stage 3").
        #[arg(long)]
        only: Option<String>,
        /// Internal: time this one case and print its result (each case runs in a child).
        #[arg(long, hide = true, requires = "child_micro_batch")]
        child_case: Option<String>,
        #[arg(long, hide = true)]
        child_micro_batch: Option<usize>,
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
    keep_freed_memory();
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
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Info {
            model,
            chat_template,
        } => info(&model, chat_template.as_deref()),
        Command::Train {
            config,
            resume,
            resume_from_stage,
            until_stage,
        } => train(
            &config,
            TrainOptions {
                resume,
                resume_from_stage,
                until_stage,
            },
        ),
        Command::TinyModel { out, seed } => tiny_model(&out, seed),
        Command::ImportGguf { file, out } => import_gguf(&file, &out),
        Command::Generate {
            run,
            weights,
            model,
            prompt,
            max_new_tokens,
            temperature,
            top_p,
            seed,
        } => generate(
            run.as_deref(),
            weights.as_deref(),
            model.as_deref(),
            &prompt,
            model::generate::GenerateOptions {
                max_new_tokens,
                temperature,
                top_p,
                seed,
                eos_token_id: None,
            },
        ),
        Command::Data {
            command: DataCommand::Inspect { config },
        } => inspect_data(&config),
        Command::Export {
            run,
            weights,
            out,
            merge,
        } => export(&run, &weights, &out, merge),
        Command::Eval {
            runs,
            out,
            force,
            device,
            micro_batch,
            bootstrap,
            seed,
        } => eval(
            runs,
            out,
            force,
            device.as_deref(),
            micro_batch,
            bootstrap,
            seed,
        ),
        Command::Synth {
            out,
            dimensions,
            pairs,
            eval_pairs,
            conflict_rate,
            seed,
        } => synth(
            &out,
            &modpo_trainer::synth::SynthSpec {
                dimensions,
                pairs,
                eval_pairs,
                conflict_rate,
                seed,
            },
        ),
        Command::Demo {
            out,
            force,
            pairs,
            max_steps,
            config,
        } => config
            .map(|p| {
                std::fs::read_to_string(&p).with_context(|| format!("cannot read {}", p.display()))
            })
            .transpose()
            .and_then(|config| {
                demo(modpo_trainer::synth::demo::DemoOptions {
                    out,
                    force,
                    pairs,
                    max_steps,
                    config,
                })
            }),
        Command::Bench {
            preset,
            out,
            work,
            data,
            python,
            scripts,
            warmup,
            steps,
            rounds,
            threads,
            micro_batch,
            max_pairs,
            layers,
            seq_len,
            no_ablations,
            search_micro_batch,
            device,
            only,
            child_case,
            child_micro_batch,
        } => bench_device(&device).and_then(|device| {
            let threads = threads
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
            std::fs::create_dir_all(&work)
                .with_context(|| format!("cannot create {}", work.display()))?;
            let bench = modpo_trainer::bench::Bench::prepare(modpo_trainer::bench::BenchOptions {
                preset,
                out,
                work,
                data_file: data,
                python: python.map(|p| (p, scripts)),
                warmup,
                steps,
                rounds: rounds as usize,
                threads,
                max_pairs,
                micro_batch,
                layers,
                seq_len,
                ablations: !no_ablations,
                search_micro_batch,
                device,
                only,
                child: child_case.zip(child_micro_batch),
            })?;
            bench.run()
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// `--device` of `bench`.
fn bench_device(choice: &str) -> Result<Device> {
    match choice {
        "cpu" => Ok(Device::Cpu),
        "cuda" if !tch::Cuda::is_available() => bail!("--device cuda: no CUDA device"),
        "cuda" => Ok(Device::Cuda(0)),
        "auto" => Ok(Device::cuda_if_available()),
        other => bail!("--device {other:?}: expected cpu, cuda or auto"),
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

/// One process per GPU (or CPU rank): `mpirun -np N modpo-trainer train ...` or `srun`.
fn train(config_path: &Path, options: TrainOptions) -> Result<()> {
    let config = RunConfig::load(config_path)?;
    let text = std::fs::read_to_string(config_path)?;
    let topology = Topology::from_env()?;
    let device = model::select_device(config.model.device, topology.local_rank)?;
    let (topology, collective) =
        modpo_launcher::init(config.train.collective_choice()?, device.is_cuda())?;
    let cluster = Cluster {
        topology,
        collective: collective.as_ref(),
    };
    let run = || modpo_trainer::train::train(&config, &text, options, &cluster);
    // Alone, an error returns as usual; in a job it must end every rank, not leave the others
    // waiting in their next collective.
    let summary = if topology.world_size == 1 {
        run()?
    } else {
        run_or_abort(collective.as_ref(), run)
    };
    if !topology.is_main() {
        return Ok(());
    }
    if summary.stopped {
        println!(
            "stopped by signal after a checkpoint in {}; continue with --resume",
            summary.run_dir.display()
        );
        return Ok(());
    }
    if summary.adapters.is_file() {
        println!(
            "trained {} stage(s) ({:?} steps); adapters: {}",
            summary.steps.len(),
            summary.steps,
            summary.adapters.display()
        );
    } else {
        println!(
            "stage {} finished ({:?} steps); continue with --resume-from-stage {}",
            summary.last_stage,
            summary.steps,
            summary.last_stage + 1
        );
    }
    Ok(())
}

fn import_gguf(file: &Path, out: &Path) -> Result<()> {
    model::gguf_import::import_gguf(file, out)?;
    println!("{} imported to {}", file.display(), out.display());
    Ok(())
}

fn generate(
    run: Option<&Path>,
    weights: Option<&str>,
    model_dir: Option<&Path>,
    prompt: &str,
    mut opts: model::generate::GenerateOptions,
) -> Result<()> {
    let device = model::select_device(modpo_trainer::model::DeviceChoice::Auto, 0)?;
    let (loaded, w, dir) = match (run, model_dir) {
        (Some(run), _) => {
            let adapters_path = run.join(ADAPTERS_FILE);
            let meta = checkpoint::read_adapter_meta(&adapters_path)?;
            let w = export::parse_weights(weights.unwrap_or_default())?;
            export::validate_weights(&w, &meta.dimensions).context("--weights")?;
            let loaded =
                model::load_model(&meta.model_path, Some(&meta.spec()), device, Kind::Float)?;
            checkpoint::load_adapters(&adapters_path, &loaded.adapters)?;
            let w = tch::Tensor::from_slice(&w)
                .to_kind(Kind::Float)
                .to_device(device)
                .unsqueeze(0); // [1, k]
            (loaded, Some(w), meta.model_path)
        }
        (None, Some(dir)) => (
            model::load_model(dir, None, device, Kind::Float)?,
            None,
            dir.to_path_buf(),
        ),
        (None, None) => bail!("give --run or --model"),
    };
    let tokenizer = modpo_trainer::tokenizer::ChatTokenizer::from_model_dir(&dir, None)?;
    opts.eos_token_id = Some(tokenizer.eos_token_id());
    let ids = tokenizer.encode_prompt(prompt)?;
    let cond = match &w {
        Some(w) => model::Conditioning::Weighted(w),
        None => model::Conditioning::Reference,
    };
    let out = model::generate::generate(&loaded.model, &ids, cond, &opts)?;
    println!("{}", tokenizer.decode(&out, true)?);
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

fn eval(
    runs: Vec<PathBuf>,
    out: Option<PathBuf>,
    force: bool,
    device: Option<&str>,
    micro_batch: Option<usize>,
    resamples: usize,
    seed: u64,
) -> Result<()> {
    use modpo_trainer::eval::{self, Bootstrap, CompareOptions};
    use modpo_trainer::model::DeviceChoice;
    let out = out.unwrap_or_else(|| runs[0].join("eval"));
    let device = device.map(|d| match d {
        "cpu" => DeviceChoice::Cpu,
        "cuda" => DeviceChoice::Cuda,
        _ => DeviceChoice::Auto,
    });
    let options = CompareOptions {
        runs,
        device,
        dtype: None,
        micro_batch,
        bootstrap: Bootstrap {
            resamples,
            seed,
            ..Bootstrap::default()
        },
    };
    let (comparison, written) = eval::evaluate_runs(&options, &out, force)?;
    for (run, summary) in comparison.runs.iter().zip(&comparison.summaries) {
        println!(
            "{:<24} win rate {:>5}  mean accuracy {:>5}",
            run.label,
            summary
                .win_rate
                .map(|r| format!("{r:.2}"))
                .unwrap_or_else(|| "n/a".into()),
            summary
                .mean_accuracy
                .map(|a| format!("{:.1}", 100.0 * a))
                .unwrap_or_else(|| "n/a".into())
        );
    }
    println!(
        "{} settings on {} conflict pairs: {}, {} and {} plot(s) in {}",
        comparison.settings.len(),
        comparison.conflict_pairs,
        written.results_json.display(),
        written.results_md.display(),
        written.plots.len(),
        out.display()
    );
    Ok(())
}

fn synth(out: &Path, spec: &modpo_trainer::synth::SynthSpec) -> Result<()> {
    let files = modpo_trainer::synth::write(out, spec)?;
    println!(
        "{} train pairs ({} conflict): {}\n{} eval pairs ({} conflict): {}\nmodel: {}",
        spec.pairs,
        files.train_conflicts,
        files.train_file.display(),
        spec.eval_pairs,
        files.eval_conflicts,
        files.eval_file.display(),
        files.model_dir.display()
    );
    println!(
        "data config: format = \"generic\", dimensions = {:?}",
        files.dimensions
    );
    Ok(())
}

fn demo(options: modpo_trainer::synth::demo::DemoOptions) -> Result<()> {
    let outputs = modpo_trainer::synth::demo::run(&options)?;
    let md = std::fs::read_to_string(&outputs.written.results_md)
        .with_context(|| format!("cannot read {}", outputs.written.results_md.display()))?;
    println!("{md}");
    if let Some(aside) = &outputs.moved_aside {
        println!("earlier demo moved to  {}", aside.display());
    }
    println!("demo directory         {}", outputs.out.display());
    println!(
        "train data             {}",
        outputs.synth.train_file.display()
    );
    println!(
        "eval data              {}",
        outputs.synth.eval_file.display()
    );
    println!(
        "model                  {}",
        outputs.synth.model_dir.display()
    );
    for (config, run) in outputs.configs.iter().zip(&outputs.runs) {
        println!(
            "run                    {} (config {})",
            run.display(),
            config.display()
        );
    }
    println!(
        "results (json)         {}",
        outputs.written.results_json.display()
    );
    println!(
        "results (tables)       {}",
        outputs.written.results_md.display()
    );
    for plot in &outputs.written.plots {
        println!("plot                   {}", plot.display());
    }
    let times: Vec<String> = outputs
        .seconds
        .iter()
        .map(|(what, s)| format!("{what} {s:.0} s"))
        .collect();
    println!("wall time              {}", times.join(", "));
    Ok(())
}
