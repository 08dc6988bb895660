//! A run config's plan: each stage of its method as [`StageLoad`], the configured setting's
//! predicted peak by part, the fastest setting that fits, and the table `plan` prints.

use std::fmt::Write;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use serde::Serialize;
use tch::Device;

use super::{Breakdown, Setting, StageContext, StageLoad, Target};
use crate::config::RunConfig;
use crate::method::{stages, MethodName};
use crate::model::{select_kind, ModelConfig};

/// Built-in shapes of the paper's base models, for planning without the weights at hand.
pub const ARCHITECTURES: [&str; 2] = ["llama3-8b", "mistral-7b"];

/// The config.json of a built-in architecture (Hugging Face's, as the paper's checkpoints
/// ship it: `alignment/alpaca-8b-reproduced-llama-3` is Llama-3-8B, `zephyr-7b-sft-full`
/// Mistral-7B-v0.1).
pub fn architecture_config(name: &str) -> Result<ModelConfig> {
    let json = match name {
        "llama3-8b" => {
            r#"{"model_type": "llama", "vocab_size": 128256, "hidden_size": 4096,
            "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
            "num_key_value_heads": 8, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
            "max_position_embeddings": 8192, "tie_word_embeddings": false}"#
        }
        "mistral-7b" => {
            r#"{"model_type": "mistral", "vocab_size": 32000, "hidden_size": 4096,
            "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
            "num_key_value_heads": 8, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
            "max_position_embeddings": 32768, "sliding_window": 4096,
            "tie_word_embeddings": false}"#
        }
        other => bail!(
            "unknown architecture `{other}`; known: {}",
            ARCHITECTURES.join(", ")
        ),
    };
    ModelConfig::from_json(json).context("a built-in architecture's config")
}

/// What `plan` was asked.
#[derive(Debug, Clone)]
pub struct PlanOptions {
    pub config: PathBuf,
    /// Memory of one device, bytes.
    pub budget: u64,
    pub world_size: usize,
    pub target: Target,
    /// The model's config.json directory instead of the config's `model.path`.
    pub model: Option<PathBuf>,
    /// A built-in architecture instead of any directory.
    pub architecture: Option<String>,
    /// The longest shared row to plan for, instead of the worst case of `max_length`.
    pub row_tokens: Option<i64>,
}

/// One stage's plan.
#[derive(Debug, Clone, Serialize)]
pub struct StagePlan {
    pub method: MethodName,
    pub stage: usize,
    pub name: String,
    pub load: StageLoad,
    pub configured: Breakdown,
    /// The fastest setting that fits, or the smallest peak of all when none does.
    pub chosen: Result<Breakdown, Breakdown>,
}

fn model_config(options: &PlanOptions, config: &RunConfig) -> Result<ModelConfig> {
    if let Some(name) = &options.architecture {
        return architecture_config(name);
    }
    let dir = options.model.as_deref().unwrap_or(&config.model.path);
    ModelConfig::from_model_dir(dir).with_context(|| {
        format!(
            "no model config at {} (give --model DIR with its config.json, or --architecture {})",
            dir.display(),
            ARCHITECTURES.join("|")
        )
    })
}

/// The worst pair `max_length` allows: a shared row `[prompt | a | b]` is longest when the
/// prompt is one token and both responses fill the rest, `2 max_length - 1` tokens; with
/// `row_tokens`, a row of that many tokens split the same way.
pub fn longest_pair(max_length: i64, row_tokens: Option<i64>) -> (i64, i64, i64) {
    let response = match row_tokens {
        Some(t) => ((t - 1) / 2).clamp(1, max_length - 1),
        None => max_length - 1,
    };
    (1, response, response)
}

/// Every stage of the config's method, planned.
pub fn plan_config(options: &PlanOptions) -> Result<Vec<StagePlan>> {
    let config = RunConfig::parse(
        &std::fs::read_to_string(&options.config)
            .with_context(|| format!("cannot read {}", options.config.display()))?,
        &options.config,
    )?;
    let model = model_config(options, &config)?;
    let device = match options.target {
        Target::Cpu => Device::Cpu,
        Target::Cuda => Device::Cuda(0),
    };
    let kind = select_kind(config.model.dtype, device);
    let k = config.data.dimension_names()?.len();
    let spec = config.method.adapter_spec(k);
    let global = config.data.global_batch;
    if !global.is_multiple_of(options.world_size) {
        bail!(
            "global_batch {global} does not split over {} ranks",
            options.world_size
        );
    }
    let configured = Setting {
        micro_batch: config.data.micro_batch,
        batch_passes: config.method.batch_passes_on(device),
        recompute: config.train.recompute_activations,
    };
    let context = StageContext {
        model: &model,
        kind,
        spec: &spec,
        k,
        longest_pair: longest_pair(config.data.max_length as i64, options.row_tokens),
        shared_prompt: config.train.share_prompt,
        rank_batch: global / options.world_size,
        world_size: options.world_size,
        target: options.target,
    };
    let mut plans = Vec::new();
    for stage in stages(config.method.name) {
        let load = StageLoad::of_stage(&stage, &context);
        let configured = load.predict(configured);
        let chosen = load.choose(options.budget);
        plans.push(StagePlan {
            method: config.method.name,
            stage: stage.number,
            name: stage.name.to_string(),
            load,
            configured,
            chosen,
        });
    }
    Ok(plans)
}

fn gib(bytes: u64) -> String {
    format!("{:.2}", bytes as f64 / (1u64 << 30) as f64)
}

fn describe(s: Setting) -> String {
    format!(
        "micro-batch {}, passes {}, {}",
        s.micro_batch,
        if s.batch_passes {
            "batched"
        } else {
            "one by one"
        },
        if s.recompute {
            "recomputation"
        } else {
            "no recomputation"
        }
    )
}

/// One part of a breakdown.
type Part = fn(&Breakdown) -> u64;

/// The parts of two breakdowns side by side.
fn write_parts(text: &mut String, load: &StageLoad, a: &Breakdown, b: &Breakdown) -> Result<()> {
    let layers = load.dims.layers as u64;
    let rows = |x: &Breakdown| load.rows(x.setting);
    let lines: [(String, Part); 10] = [
        (format!("base weights ({})", load.dtype_name), |x| x.weights),
        ("adapters (f32)".into(), |x| x.adapters),
        ("adapter gradients (f32)".into(), |x| x.gradients),
        ("AdamW moments (+ AdaLoRA averages), f32".into(), |x| {
            x.optimizer
        }),
        ("all-reduce buffer".into(), |x| x.communication),
        ("saved per layer, kept".into(), |x| x.activations.per_layer),
        ("saved per layer, recomputed (block input)".into(), |x| {
            x.activations.per_layer_recomputed
        }),
        ("LM head + log-softmax chunk".into(), |x| {
            x.activations.lm_head
        }),
        (format!("activations at the peak ({layers} layers)"), |x| {
            x.activations.peak
        }),
        ("runtime (context, libraries)".into(), |x| x.runtime),
    ];
    for (name, part) in lines {
        writeln!(
            text,
            "  {name:<44} {:>10} {:>10}",
            gib(part(a)),
            gib(part(b))
        )?;
    }
    writeln!(
        text,
        "  {:<44} {:>10} {:>10}",
        "total",
        gib(a.total),
        gib(b.total)
    )?;
    let (ra, rb) = (rows(a), rows(b));
    writeln!(
        text,
        "  {:<44} {:>10} {:>10}",
        "rows x tokens of a forward",
        format!("{}x{}", ra.rows, ra.seq_len),
        format!("{}x{}", rb.rows, rb.seq_len)
    )?;
    Ok(())
}

/// The table `plan` prints; the second value is whether every stage fits.
pub fn render(plans: &[StagePlan], options: &PlanOptions) -> Result<(String, bool)> {
    let mut text = String::new();
    let mut all_fit = true;
    if let Some(first) = plans.first() {
        let (p, a, b) = first.load.longest_pair;
        writeln!(
            text,
            "{}: {} on {} {} of {} GiB; longest pair planned: prompt {p} + {a} + {b} tokens{}",
            options.config.display(),
            method_name(first.method),
            options.world_size,
            match options.target {
                Target::Cuda => "GPU(s)",
                Target::Cpu => "CPU process(es)",
            },
            gib(options.budget),
            match options.row_tokens {
                Some(_) => " (--row-tokens)",
                None => " (the worst case of data.max_length)",
            }
        )?;
        writeln!(
            text,
            "reference log-probs: cached on the host, 8 bytes per pair; their pass before \
             stage 1 is a no-grad forward, below stage 1's peak"
        )?;
    }
    for plan in plans {
        let (chosen, fits) = match plan.chosen {
            Ok(b) => (b, true),
            Err(b) => (b, false),
        };
        all_fit &= fits;
        writeln!(
            text,
            "\nstage {} ({}): {} pass(es) per step, {} pairs per rank per step",
            plan.stage, plan.name, plan.load.passes, plan.load.rank_batch
        )?;
        writeln!(
            text,
            "  {:<44} {:>10} {:>10}",
            "GiB", "configured", "chosen"
        )?;
        write_parts(&mut text, &plan.load, &plan.configured, &chosen)?;
        let verdict = |b: &Breakdown| match b.total <= options.budget {
            true => "fits",
            false => "does NOT fit",
        };
        writeln!(
            text,
            "  configured: {} ({})",
            describe(plan.configured.setting),
            verdict(&plan.configured)
        )?;
        match fits {
            true => writeln!(
                text,
                "  chosen (fastest that fits): {}",
                describe(chosen.setting)
            )?,
            false => writeln!(
                text,
                "  NOTHING FITS: the smallest peak is {} GiB ({})",
                gib(chosen.total),
                describe(chosen.setting)
            )?,
        }
    }
    Ok((text, all_fit))
}

fn method_name(method: MethodName) -> String {
    serde_json::to_value(method)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

/// `plan`: prints the table; Err when some stage fits in no setting.
pub fn run(options: &PlanOptions) -> Result<Vec<StagePlan>> {
    let plans = plan_config(options)?;
    let (text, all_fit) = render(&plans, options)?;
    print!("{text}");
    if !all_fit {
        bail!(
            "{}: some stage fits in no setting within {} GiB (see the table)",
            options.config.display(),
            gib(options.budget)
        );
    }
    Ok(plans)
}
