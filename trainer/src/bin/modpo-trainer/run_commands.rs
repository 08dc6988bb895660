//! The subcommands that load a finished run: `export`, `generate --run` and `eval`. All three
//! go through `saved_run` (config, adapters, the fingerprint check, the chat template), and
//! the two that take `--weights` check them the same way before any weight is read. `curves`
//! reads only the run's `metrics.jsonl`.

use anyhow::{bail, Result};
use modpo_trainer::export;
use modpo_trainer::model::{self, generate::GenerateOptions, Conditioning, DtypeChoice};
use modpo_trainer::saved_run::{self, SavedRun};
use modpo_trainer::tokenizer::ChatTokenizer;
use tch::Kind;

use crate::args::{CurvesArgs, EvalArgs, ExportArgs, GenerateArgs};

/// Reads the run at `dir` and checks `weights` is a point of the simplex over its dimensions:
/// the same check, and the same message, for every command that takes `--weights`.
fn read_run_for_weights(dir: &std::path::Path, weights: &[f64]) -> Result<SavedRun> {
    let run = saved_run::read_run(dir)?;
    export::validate_weights(weights, &run.meta.dimensions, "--weights")?;
    Ok(run)
}

pub fn export(args: &ExportArgs) -> Result<()> {
    let (out, w) = (&args.out, &args.weights);
    let run = read_run_for_weights(&args.run, w)?;
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
    let loaded = run.load(Some(args.device), Some(args.dtype))?;
    let model_path = &loaded.run.meta.model_path;
    if args.merge {
        export::write_merged_model(&loaded.model.model, &loaded.model.base, w, model_path, out)?;
        println!("merged model for w = {w:?} written to {}", out.display());
    } else {
        export::write_peft_adapter(&loaded.model.model, w, model_path, out)?;
        println!(
            "PEFT LoRA adapter for w = {w:?} written to {}",
            out.display()
        );
    }
    Ok(())
}

pub fn generate(args: &GenerateArgs) -> Result<()> {
    let (loaded, tokenizer, w) = match (&args.run, &args.model) {
        (Some(dir), _) => {
            let run = read_run_for_weights(dir, &args.weights)?;
            let loaded = run.load(args.device, args.dtype)?;
            let w = tch::Tensor::from_slice(&args.weights)
                .to_kind(Kind::Float)
                .to_device(loaded.device)
                .unsqueeze(0); // [1, k]
            (loaded.model, loaded.run.tokenizer, Some(w))
        }
        (None, Some(dir)) => {
            let device = model::select_device(args.device.unwrap_or_default(), 0)?;
            let kind = model::select_kind(args.dtype.unwrap_or(DtypeChoice::Auto), device);
            let loaded = model::load_model(dir, None, device, kind)?;
            (loaded, ChatTokenizer::from_model_dir(dir, None)?, None)
        }
        (None, None) => bail!("give --run or --model"),
    };
    let options = GenerateOptions {
        max_new_tokens: args.max_new_tokens,
        temperature: args.temperature,
        top_p: args.top_p,
        seed: args.seed,
        eos_token_id: Some(tokenizer.eos_token_id()),
    };
    let ids = tokenizer.encode_prompt(&args.prompt)?;
    let cond = match &w {
        Some(w) => Conditioning::Weighted(w),
        None => Conditioning::Reference,
    };
    let out = model::generate::generate(&loaded.model, &ids, cond, &options)?;
    println!("{}", tokenizer.decode(&out, true)?);
    Ok(())
}

pub fn eval(args: EvalArgs) -> Result<()> {
    use modpo_trainer::eval::{self, Bootstrap, CompareOptions};
    if args.generate {
        return eval_generate(args);
    }
    let out = args.out.unwrap_or_else(|| args.runs[0].join("eval"));
    let options = CompareOptions {
        runs: args.runs,
        device: args.device,
        dtype: args.dtype,
        micro_batch: args.micro_batch,
        bootstrap: Bootstrap {
            resamples: args.bootstrap,
            seed: args.seed,
            ..Bootstrap::default()
        },
    };
    let (comparison, written) = eval::evaluate_runs(&options, &out, args.force)?;
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

/// `eval --generate`: what the runs generate at each w, scored by the scenario's rule or a
/// reward model.
fn eval_generate(args: EvalArgs) -> Result<()> {
    use modpo_trainer::eval::generation::{self, Decoding, GenerationOptions, Scorer};
    use modpo_trainer::eval::Bootstrap;
    use modpo_trainer::synth::scorer::ScenarioScorer;
    let out = args
        .out
        .unwrap_or_else(|| args.runs[0].join("eval-generate"));
    if out.join(modpo_trainer::eval::report::RESULTS_JSON).exists() && !args.force {
        bail!(
            "{} already holds evaluation results: choose another --out or pass --force to \
             replace them",
            out.display()
        );
    }
    let dimensions = saved_run::read_run(&args.runs[0])?.meta.dimensions;
    let scorer: Box<dyn Scorer> = match (args.scenario, &args.reward_model) {
        (Some(scenario), None) => Box::new(ScenarioScorer::new(scenario, &dimensions)?),
        (None, Some(dir)) => {
            let device = model::select_device(args.device.unwrap_or_default(), 0)?;
            let kind = model::select_kind(args.dtype.unwrap_or(DtypeChoice::Auto), device);
            let rm = modpo_trainer::reward_model::RewardModel::load(dir, device, kind)?;
            Box::new(rm)
        }
        _ => bail!("--generate needs --scenario NAME (synthetic runs) or --reward-model DIR"),
    };
    let options = GenerationOptions {
        runs: args.runs,
        prompts: args.prompts,
        grid: args.grid,
        decoding: Decoding {
            max_new_tokens: args.max_new_tokens,
            temperature: args.temperature,
            top_p: args.top_p,
            seed: args.sampling_seed,
        },
        device: args.device,
        dtype: args.dtype,
        bootstrap: Bootstrap {
            resamples: args.bootstrap,
            seed: args.seed,
            ..Bootstrap::default()
        },
    };
    let comparison = generation::compare_generations(&options, scorer.as_ref())?;
    let written = generation::report::write(&comparison, &out, args.force)?;
    print!("{}", generation::report::summary_table(&comparison));
    println!();
    print!("{}", generation::report::vertex_gap_table(&comparison));
    println!(
        "{} prompts at {} weight vectors: {}, {} and {} plot(s) in {}",
        comparison.prompts,
        comparison.weights.len(),
        written.results_json.display(),
        written.results_md.display(),
        written.plots.len(),
        out.display()
    );
    Ok(())
}

pub fn curves(args: &CurvesArgs) -> Result<()> {
    let metrics = args.run.join("metrics.jsonl");
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| args.run.join("curves.png"));
    if out.exists() && !args.force {
        bail!(
            "{} already exists: pass --force to replace it, or choose --out",
            out.display()
        );
    }
    let title = format!("{}: training curves", args.run.display());
    modpo_trainer::eval::curves::write_curves(&metrics, &title, &out)?;
    println!("{}", out.display());
    Ok(())
}
