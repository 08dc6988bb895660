//! The arguments of each subcommand. Every argument has a help line (a unit test in `main.rs`
//! fails otherwise); `--device` and `--dtype` are the same enums, spelled the same, wherever
//! they appear, and `--weights` is parsed into numbers here and checked against a run's
//! dimensions by the command.

use std::path::PathBuf;

use clap::Args;
use modpo_trainer::bench::Preset;
use modpo_trainer::model::{DeviceChoice, DtypeChoice};
use modpo_trainer::synth::demo::{Compute, ScenarioChoice};
use modpo_trainer::synth::Scenario;

#[derive(Args)]
pub struct InfoArgs {
    /// A Hugging Face model directory (config.json, *.safetensors, tokenizer.json).
    #[arg(long)]
    pub model: PathBuf,
    /// A file holding a Jinja chat template to use instead of the model's own.
    #[arg(long)]
    pub chat_template: Option<PathBuf>,
}

#[derive(Args)]
pub struct TrainArgs {
    /// The run config (TOML: [model], [data], [method], [train]); see configs/.
    #[arg(long)]
    pub config: PathBuf,
    /// Continue the run in train.output_dir from its latest valid checkpoint.
    #[arg(long, conflicts_with = "resume_from_stage")]
    pub resume: bool,
    /// Start stage N from the final checkpoint of stage N - 1.
    #[arg(long, value_name = "N")]
    pub resume_from_stage: Option<usize>,
    /// Stop after stage N's final checkpoint (one batch job per stage).
    #[arg(long, value_name = "N")]
    pub until_stage: Option<usize>,
}

#[derive(Args)]
pub struct TrainRmArgs {
    /// The reward model config (TOML: [model], [data], [train] as for `train`, and
    /// [reward_model]); see configs/reward_model/.
    #[arg(long)]
    pub config: PathBuf,
    /// Continue the run in train.output_dir from its latest valid checkpoint.
    #[arg(long)]
    pub resume: bool,
}

#[derive(Args)]
pub struct ImportGgufArgs {
    /// The GGUF file.
    pub file: PathBuf,
    /// The directory to write (config.json, model.safetensors, tokenizer files).
    #[arg(long)]
    pub out: PathBuf,
}

/// One entry of `--weights`, naming the entry that is not a number.
fn parse_weight(text: &str) -> Result<f64, String> {
    text.trim()
        .parse::<f64>()
        .map_err(|_| format!("weight `{}` is not a number", text.trim()))
}

#[derive(Args)]
pub struct GenerateArgs {
    /// A run directory: its final adapters conditioned on --weights, its chat template,
    /// model.device and model.dtype.
    #[arg(long, conflicts_with = "model", requires = "weights")]
    pub run: Option<PathBuf>,
    /// Preference weights for --run, one per dimension, on the simplex: e.g. 0.3,0.7.
    #[arg(
        long,
        requires = "run",
        value_name = "W,..",
        value_delimiter = ',',
        value_parser = parse_weight,
        allow_hyphen_values = true
    )]
    pub weights: Vec<f64>,
    /// A Hugging Face model directory, without adapters.
    #[arg(long, required_unless_present = "run")]
    pub model: Option<PathBuf>,
    /// The user message, rendered through the chat template with the assistant turn opened.
    #[arg(long)]
    pub prompt: String,
    /// Stop after this many new tokens (or at the end-of-sequence token).
    #[arg(long, default_value_t = 256)]
    pub max_new_tokens: usize,
    /// Sampling temperature; 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    /// Nucleus sampling: sample from the smallest set of tokens holding this much probability.
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    /// Seed of the sampling (unused when greedy).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Device instead of the run's model.device (auto for --model).
    #[arg(long, value_enum)]
    pub device: Option<DeviceChoice>,
    /// Weight dtype instead of the run's model.dtype (auto for --model).
    #[arg(long, value_enum)]
    pub dtype: Option<DtypeChoice>,
}

#[derive(Args)]
pub struct TinyModelArgs {
    /// The directory to write (config.json, model.safetensors, tokenizer files).
    #[arg(long)]
    pub out: PathBuf,
    /// Seed of the random weights.
    #[arg(long, default_value_t = 0)]
    pub seed: i64,
}

#[derive(Args)]
pub struct ExportArgs {
    /// A run directory (holding resolved_config.json and adapters.safetensors).
    #[arg(long)]
    pub run: PathBuf,
    /// The weight vector w, one value per dimension, on the simplex: e.g. 0.3,0.7.
    #[arg(
        long,
        required = true,
        value_name = "W,..",
        value_delimiter = ',',
        value_parser = parse_weight,
        allow_hyphen_values = true
    )]
    pub weights: Vec<f64>,
    /// Output directory; must not exist or be empty.
    #[arg(long)]
    pub out: PathBuf,
    /// Write merged full weights instead of an adapter.
    #[arg(long)]
    pub merge: bool,
    /// Device to load the model on (cpu by default, whatever the run trained on).
    #[arg(long, value_enum, default_value_t = DeviceChoice::Cpu)]
    pub device: DeviceChoice,
    /// Weight dtype to load the base model in (f32 keeps a merged export exact).
    #[arg(long, value_enum, default_value_t = DtypeChoice::F32)]
    pub dtype: DtypeChoice,
}

#[derive(Args)]
pub struct EvalArgs {
    /// A run directory (written by `train`); repeat to compare runs.
    #[arg(long = "run", required = true, value_name = "DIR")]
    pub runs: Vec<PathBuf>,
    /// Output directory (created); default `<first run>/eval`.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Replace results already in the output directory.
    #[arg(long)]
    pub force: bool,
    /// Device for every run instead of each run's model.device.
    #[arg(long, value_enum)]
    pub device: Option<DeviceChoice>,
    /// Weight dtype for every run instead of each run's model.dtype.
    #[arg(long, value_enum)]
    pub dtype: Option<DtypeChoice>,
    /// Pairs per micro-batch instead of each run's `data.micro_batch`.
    #[arg(long)]
    pub micro_batch: Option<usize>,
    /// Bootstrap resamples of the pairs for the 95% intervals (0: no intervals).
    #[arg(long, default_value_t = 1000)]
    pub bootstrap: usize,
    /// Seed of the bootstrap.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Evaluate what the runs generate at each w instead (fronts, hypervolume,
    /// controllability); needs --scenario or --reward-model. Default --out `<first run>/eval-generate`.
    #[arg(long)]
    pub generate: bool,
    /// With --generate: held-out prompts to answer (the first distinct ones of the eval split).
    #[arg(long, default_value_t = 50, requires = "generate")]
    pub prompts: usize,
    /// With --generate: points of the simplex between the two vertices (k = 2 runs) instead
    /// of the paper's 5 per dimension pair.
    #[arg(long, value_name = "N", requires = "generate")]
    pub grid: Option<usize>,
    /// With --generate: score answers with this synthetic scenario's exact rule (runs trained
    /// on its data).
    #[arg(
        long,
        value_enum,
        requires = "generate",
        conflicts_with = "reward_model"
    )]
    pub scenario: Option<Scenario>,
    /// With --generate: score answers with the reward model of `train-rm` in this directory.
    #[arg(long, value_name = "DIR", requires = "generate")]
    pub reward_model: Option<PathBuf>,
    /// With --generate: most new tokens per answer.
    #[arg(long, default_value_t = 128, requires = "generate")]
    pub max_new_tokens: usize,
    /// With --generate: sampling temperature; 0 = greedy.
    #[arg(long, default_value_t = 0.0, requires = "generate")]
    pub temperature: f64,
    /// With --generate: nucleus sampling's probability mass.
    #[arg(long, default_value_t = 1.0, requires = "generate")]
    pub top_p: f64,
    /// With --generate: seed of the sampling (each prompt and w draws its own stream).
    #[arg(long, default_value_t = 0, requires = "generate")]
    pub sampling_seed: u64,
}

#[derive(Args)]
pub struct CurvesArgs {
    /// A run directory (written by `train`).
    #[arg(long, value_name = "DIR")]
    pub run: PathBuf,
    /// The PNG to write; default `<run>/curves.png`.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Replace an existing PNG.
    #[arg(long)]
    pub force: bool,
}

#[derive(Args)]
pub struct SynthArgs {
    /// Output directory: train.jsonl, eval.jsonl, model/.
    #[arg(long)]
    pub out: PathBuf,
    /// How the dimensions relate: independent (disjoint marker words, the first demo's data),
    /// easy-hard (a salient easy dimension, graded hard ones, 20% conflict, like
    /// PKU-SafeRLHF), interference (words shared by two dimensions with opposite signs) or
    /// length-bias (one dimension grows with the response's length). README: "Synthetic
    /// scenarios".
    #[arg(long, value_enum, default_value = "easy-hard")]
    pub scenario: Scenario,
    /// k, the number of dimensions (2 to 5; independent: 2 to 4).
    #[arg(long, default_value_t = 2)]
    pub dimensions: usize,
    /// Training pairs.
    #[arg(long, default_value_t = 2000)]
    pub pairs: usize,
    /// Held-out pairs.
    #[arg(long, default_value_t = 400)]
    pub eval_pairs: usize,
    /// Share of conflict pairs (default: 0.2 for easy-hard, 0.25 for the others).
    #[arg(long)]
    pub conflict_rate: Option<f64>,
    /// Seed of the pairs and of the tiny model's weights.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Steps of supervised warm start of the tiny model on the train responses, so that it
    /// answers in the data's words (for `eval --generate`); 0: the random model.
    #[arg(long, default_value_t = 0)]
    pub sft_steps: usize,
}

#[derive(Args)]
pub struct DemoArgs {
    /// The demo directory (created; an existing non-empty one is refused).
    #[arg(long, default_value = "runs/demo")]
    pub out: PathBuf,
    /// Move an existing --out aside (renamed with a timestamp, never deleted).
    #[arg(long)]
    pub force: bool,
    /// Train pairs instead of the embedded default.
    #[arg(long)]
    pub pairs: Option<usize>,
    /// Optimizer steps per stage instead of the embedded default.
    #[arg(long)]
    pub max_steps: Option<usize>,
    /// A demo config (the layout of configs/demo/demo.toml) instead of the embedded one.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// The scenario (independent, easy-hard, interference, length-bias) or "all" instead of
    /// the embedded easy-hard.
    #[arg(long)]
    pub scenario: Option<ScenarioChoice>,
    /// Seeds per scenario instead of the embedded 3 (each changes data, model and init).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub seeds: Option<u64>,
    /// "equal" (every method the same pair-passes, the embedded default) or "epoch" (one
    /// epoch per stage).
    #[arg(long)]
    pub compute: Option<Compute>,
}

#[derive(Args)]
pub struct BenchArgs {
    /// Model, data and sequence shapes: cpu (tiny model, PKU sample) or llama3-8b (GPU).
    #[arg(long, value_enum, default_value = "cpu")]
    pub preset: Preset,
    /// Where results.json goes.
    #[arg(long, default_value = "bench")]
    pub out: PathBuf,
    /// Scratch directory (model, the baselines' inputs and logs).
    #[arg(long, default_value = "target/bench")]
    pub work: PathBuf,
    /// PKU-SafeRLHF JSONL of the cpu preset.
    #[arg(long, default_value = "../shared/data/pku_saferlhf_sample.jsonl")]
    pub data: PathBuf,
    /// Python with torch, transformers, peft and trl (the baselines are skipped without).
    #[arg(long)]
    pub python: Option<PathBuf>,
    /// Directory of trl_dpo.py and naive_stage3.py.
    #[arg(long, default_value = "bench")]
    pub scripts: PathBuf,
    /// Untimed steps before the timed ones of each case.
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    /// Timed steps of each case.
    #[arg(long, default_value_t = 8)]
    pub steps: usize,
    /// Head-to-head rounds against each baseline (cpu preset): ours is timed again right
    /// before each run of the baseline, and the speed ratio is the median of the rounds'.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..))]
    pub rounds: u64,
    /// Intra-op threads (default: every core).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Pairs per step.
    #[arg(long, default_value_t = 8)]
    pub micro_batch: usize,
    /// Use at most this many training pairs (cpu preset).
    #[arg(long)]
    pub max_pairs: Option<usize>,
    /// Decoder layers instead of the preset's (smoke runs of the llama3-8b preset).
    #[arg(long)]
    pub layers: Option<i64>,
    /// Tokens per sequence (llama3-8b preset).
    #[arg(long, default_value_t = 1024)]
    pub seq_len: usize,
    /// Skip timing each optimisation switched off.
    #[arg(long)]
    pub no_ablations: bool,
    /// Search the largest stage-3 micro-batch that fits, up to this many pairs.
    #[arg(long)]
    pub search_micro_batch: Option<usize>,
    /// Device to benchmark on (auto: the GPU when there is one).
    #[arg(long, value_enum, default_value_t = DeviceChoice::Auto)]
    pub device: DeviceChoice,
    /// Only the cases whose name contains this (e.g. "stage 3").
    #[arg(long)]
    pub only: Option<String>,
    /// Internal: time this one case and print its result (each case runs in a child).
    #[arg(long, hide = true, requires = "child_micro_batch")]
    pub child_case: Option<String>,
    /// Internal: the micro-batch of the case timed by --child-case.
    #[arg(long, hide = true)]
    pub child_micro_batch: Option<usize>,
}

#[derive(Args)]
pub struct PlanArgs {
    /// The run config (TOML) to plan; its model's config.json is read from `model.path`
    /// unless --model or --architecture says otherwise.
    #[arg(long)]
    pub config: PathBuf,
    /// Memory of one device, GiB (2^30 bytes).
    #[arg(long, default_value_t = 80.0)]
    pub gpu_memory: f64,
    /// Ranks the global batch splits over (the paper's runs: 8).
    #[arg(long, default_value_t = 1)]
    pub world_size: usize,
    /// Where the run would train: the runtime's memory, the dtype `auto` picks, how
    /// gradients are reduced and the speed ranking.
    #[arg(long, value_enum, default_value = "cuda")]
    pub device: modpo_trainer::plan::Target,
    /// A model directory holding config.json, instead of the config's `model.path`.
    #[arg(long, conflicts_with = "architecture")]
    pub model: Option<PathBuf>,
    /// A built-in model shape instead of any directory: llama3-8b or mistral-7b.
    #[arg(long)]
    pub architecture: Option<String>,
    /// Plan for shared rows of at most this many tokens (the longest row `data inspect`
    /// reports) instead of the worst case of data.max_length (2 max_length - 1).
    #[arg(long)]
    pub row_tokens: Option<i64>,
}
