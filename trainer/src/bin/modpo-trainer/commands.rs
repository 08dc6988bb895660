//! The bodies of the subcommands that do not load a finished run: each calls the library and
//! prints what it did (the demo's output is compared byte for byte: keep it as it is).

use std::path::Path;

use anyhow::{bail, Context, Result};
use modpo_launcher::{run_or_abort, Topology};
use modpo_trainer::bench::{Bench, BenchOptions};
use modpo_trainer::config::RunConfig;
use modpo_trainer::model::{self, load::Checkpoint, ModelConfig};
use modpo_trainer::synth::demo::{self, DemoOptions};
use modpo_trainer::synth::SynthSpec;
use modpo_trainer::tokenizer::{ChatMessage, ChatTokenizer};
use modpo_trainer::train::{Cluster, TrainOptions};

use crate::args::{
    BenchArgs, DemoArgs, ImportGgufArgs, InfoArgs, PlanArgs, SynthArgs, TinyModelArgs, TrainArgs,
    TrainRmArgs,
};

pub fn info(args: &InfoArgs) -> Result<()> {
    let dir = args.model.as_path();
    let template_file = args.chat_template.as_deref();
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

pub fn inspect_data(config_path: &Path) -> Result<()> {
    let config = RunConfig::load(config_path)?;
    let tokenizer =
        ChatTokenizer::from_model_dir(&config.model.path, config.model.chat_template.as_deref())?;
    print!(
        "{}",
        modpo_trainer::data::inspect(&config.data, &tokenizer)?
    );
    Ok(())
}

/// One process per GPU (or CPU rank): `mpirun -np N modpo-trainer train ...` or `srun`.
pub fn train(args: &TrainArgs) -> Result<()> {
    let config_path = args.config.as_path();
    let options = TrainOptions {
        resume: args.resume,
        resume_from_stage: args.resume_from_stage,
        until_stage: args.until_stage,
    };
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

/// `train-rm`, one process per rank as `train`.
pub fn train_rm(args: &TrainRmArgs) -> Result<()> {
    use modpo_trainer::reward_model::{config::RewardModelConfig, train};
    let config = RewardModelConfig::load(&args.config)?;
    let text = std::fs::read_to_string(&args.config)?;
    let topology = Topology::from_env()?;
    let device = model::select_device(config.model.device, topology.local_rank)?;
    let (topology, collective) =
        modpo_launcher::init(config.train.collective_choice()?, device.is_cuda())?;
    let cluster = Cluster {
        topology,
        collective: collective.as_ref(),
    };
    let run = || train::train_reward_model(&config, &text, args.resume, &cluster);
    let summary = if topology.world_size == 1 {
        run()?
    } else {
        run_or_abort(collective.as_ref(), run)
    };
    if topology.is_main() && summary.stopped {
        println!(
            "stopped by signal after a checkpoint in {}; continue with --resume",
            summary.run_dir.display()
        );
    } else if topology.is_main() {
        print!("{}", train::accuracy_markdown(&summary));
        println!("reward model: {}", summary.run_dir.display());
    }
    Ok(())
}

pub fn import_gguf(args: &ImportGgufArgs) -> Result<()> {
    let (file, out) = (&args.file, &args.out);
    model::gguf_import::import_gguf(file, out)?;
    println!("{} imported to {}", file.display(), out.display());
    Ok(())
}

pub fn tiny_model(args: &TinyModelArgs) -> Result<()> {
    let (out, seed) = (&args.out, args.seed);
    if out.join("config.json").exists() {
        bail!("{} already holds a model", out.display());
    }
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    model::tiny::write_tiny_model(out, &Default::default(), seed)?;
    println!("tiny model written to {}", out.display());
    Ok(())
}

pub fn synth(args: &SynthArgs) -> Result<()> {
    let out = &args.out;
    let spec = &SynthSpec {
        scenario: args.scenario,
        dimensions: args.dimensions,
        pairs: args.pairs,
        eval_pairs: args.eval_pairs,
        conflict_rate: args
            .conflict_rate
            .unwrap_or(args.scenario.default_conflict_rate()),
        seed: args.seed,
    };
    let files = modpo_trainer::synth::write(out, spec)?;
    if args.sft_steps > 0 {
        let (first, last) = modpo_trainer::synth::warm_start(&files, spec, args.sft_steps)?;
        println!(
            "model warm-started: {} SFT steps, loss {first:.3} -> {last:.3} nats per response token",
            args.sft_steps
        );
    }
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

pub fn demo(args: DemoArgs) -> Result<()> {
    let config = args
        .config
        .map(|p| {
            std::fs::read_to_string(&p).with_context(|| format!("cannot read {}", p.display()))
        })
        .transpose()?;
    let options = DemoOptions {
        out: args.out,
        force: args.force,
        pairs: args.pairs,
        max_steps: args.max_steps,
        config,
        scenario: args.scenario,
        seeds: args.seeds.map(|n| n as usize),
        compute: args.compute,
    };
    let outputs = demo::run(&options)?;
    let md = std::fs::read_to_string(&outputs.summary_md)
        .with_context(|| format!("cannot read {}", outputs.summary_md.display()))?;
    println!("{md}");
    if let Some(aside) = &outputs.moved_aside {
        println!("earlier demo moved to  {}", aside.display());
    }
    println!("demo directory         {}", outputs.out.display());
    for scenario in &outputs.scenarios {
        for seed in &scenario.seeds {
            let times: Vec<String> = seed
                .seconds
                .iter()
                .map(|(what, s)| format!("{what} {s:.0} s"))
                .collect();
            println!(
                "{} seed {}: {} (eval tables {}; {})",
                scenario.scenario.name(),
                seed.seed,
                seed.dir.display(),
                seed.written.results_md.display(),
                times.join(", ")
            );
        }
    }
    println!("summary (tables)       {}", outputs.summary_md.display());
    println!("summary (json)         {}", outputs.summary_json.display());
    println!("wall time              {:.0} s", outputs.seconds);
    Ok(())
}

/// `bench`: in the parent, every case in a child process; in a child (`--child-case`), one.
pub fn bench(args: BenchArgs) -> Result<()> {
    let device = model::select_device(args.device, 0).context("--device")?;
    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    std::fs::create_dir_all(&args.work)
        .with_context(|| format!("cannot create {}", args.work.display()))?;
    let bench = Bench::prepare(BenchOptions {
        preset: args.preset,
        out: args.out,
        work: args.work,
        data_file: args.data,
        python: args.python.map(|p| (p, args.scripts)),
        warmup: args.warmup,
        steps: args.steps,
        rounds: args.rounds as usize,
        threads,
        max_pairs: args.max_pairs,
        micro_batch: args.micro_batch,
        layers: args.layers,
        seq_len: args.seq_len,
        ablations: !args.no_ablations,
        search_micro_batch: args.search_micro_batch,
        device,
        only: args.only,
        child: args.child_case.zip(args.child_micro_batch),
    })?;
    bench.run()
}

/// `plan`: the table of every stage's predicted peak and chosen setting; an error (exit status
/// 1) when some stage fits in no setting.
pub fn plan(args: &PlanArgs) -> Result<()> {
    if !(args.gpu_memory > 0.0 && args.gpu_memory.is_finite()) {
        bail!("--gpu-memory must be a positive number of GiB");
    }
    if args.world_size == 0 {
        bail!("--world-size must be at least 1");
    }
    let options = modpo_trainer::plan::config_plan::PlanOptions {
        config: args.config.clone(),
        budget: (args.gpu_memory * (1u64 << 30) as f64) as u64,
        world_size: args.world_size,
        target: args.device,
        model: args.model.clone(),
        architecture: args.architecture.clone(),
        row_tokens: args.row_tokens,
    };
    modpo_trainer::plan::config_plan::run(&options).map(|_| ())
}
