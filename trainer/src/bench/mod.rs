//! `modpo-trainer bench`: training-step speed and memory of every stage and method, the
//! optimisations measured one at a time, and (on a CPU) the alternatives a user would run
//! instead, timed in the same run on the same model, data, lengths, LoRA rank and batch:
//! TRL's `DPOTrainer` with a PEFT LoRA adapter for single-objective DPO (our stage 1), and a
//! straightforward PyTorch stage-3 step (`bench/*.py`, run with the venv's Python).
//!
//! A case times `steps` optimizer steps after `warmup` ones, each step the training loop's own
//! [`StepRunner`]: collate, upload, passes and backward, gradient all-reduce and clipping,
//! AdamW, the metrics read back to the host; the batches come from the stage's pool as
//! training selects it. FLOPs per step count the batch's real tokens
//! ([`flops`]) and MFU divides their rate by the measured dense matmul rate.
//!
//! Presets: `cpu` (a small random Llama with the byte-level tokenizer on the PKU-SafeRLHF
//! sample, sized for 2 CPU cores) and `llama3-8b` (Llama-3-8B shapes with random bf16
//! weights on a GPU, synthetic pairs of 1024 tokens, plus the largest micro-batch that fits
//! with and without activation recomputation).

mod cases;
pub mod flops;
pub mod memory;
mod presets;
mod python;
mod report;

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use rand::seq::SliceRandom;
use serde::Serialize;
use tch::{nn::VarStore, Device, Kind, Tensor};

use modpo_launcher::Single;

pub use cases::{CaseResult, Variant};

use crate::data::split::seeded_rng;
use crate::data::{epoch_batches, BatchPlan, TokenizedPair};
use crate::logps::RowLayout;
use crate::method::{stages, MethodConfig, MethodName, Stage, UnitPasses, WeightSampling};
use crate::model::{self, AdapterSpec, CausalLm, LoraGemms, ModelConfig};
use crate::plan;
use crate::reference;
use crate::step::{ReferenceSource, StepRunner, StepSettings};
use crate::tokenizer::ChatTokenizer;
use cases::{all_cases, cases, median, search_cases, Case};
use flops::{row_pass_flops, PassAdapters};
use presets::{random_model, CPU_MAX_LENGTH};

/// Which benchmark to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
pub enum Preset {
    /// A small Llama on the PKU-SafeRLHF sample on this machine's CPU, against TRL + PEFT
    /// and a straightforward PyTorch stage-3 loop.
    Cpu,
    /// Llama-3-8B shapes, random bf16 weights, 1024-token pairs, on a GPU.
    Llama3_8b,
}

/// How to run the benchmark.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub preset: Preset,
    /// results.json goes here.
    pub out: PathBuf,
    /// Scratch: the model directory and the baselines' inputs.
    pub work: PathBuf,
    /// PKU-SafeRLHF JSONL (cpu preset).
    pub data_file: PathBuf,
    /// Python with torch, transformers, peft and trl, and the directory of the baseline
    /// scripts; None skips the baselines.
    pub python: Option<(PathBuf, PathBuf)>,
    pub warmup: usize,
    pub steps: usize,
    /// Head-to-head rounds against each baseline: ours timed again right before each of the
    /// baseline's runs, so that a machine whose speed drifts (a shared VM) slows both sides of
    /// a round alike; the ratio reported is the median of the rounds'.
    pub rounds: usize,
    /// Intra-op threads of libtorch (and of the Python baselines).
    pub threads: usize,
    /// At most this many training pairs (cpu preset).
    pub max_pairs: Option<usize>,
    /// Pairs per micro-batch (= per optimizer step: one micro-batch per step).
    pub micro_batch: usize,
    /// Decoder layers (overrides the preset's, for smoke runs of the GPU preset).
    pub layers: Option<i64>,
    /// Tokens per sequence of the llama3-8b preset.
    pub seq_len: usize,
    /// Measure each optimisation switched off, one at a time.
    pub ablations: bool,
    /// llama3-8b: search the largest micro-batch that fits, up to this many pairs.
    pub search_micro_batch: Option<usize>,
    pub device: Device,
    /// Only the cases whose name contains this.
    pub only: Option<String>,
    /// Set in the child process that times one case: its name and micro-batch.
    pub child: Option<(String, usize)>,
}

/// LoRA rank and alpha of the curriculum and Panacea (DPO-Soup doubles both, as in the paper).
pub(super) const BENCH_RANK: i64 = 8;
pub(super) const BENCH_ALPHA: f64 = 16.0;
pub(super) const BETA: f64 = 0.1;
pub(super) const LEARNING_RATE: f64 = 1e-4;

/// Everything the benchmark ran on, and what it measured.
pub struct Bench {
    options: BenchOptions,
    model_dir: Option<PathBuf>,
    config: ModelConfig,
    kind: Kind,
    pairs: Vec<TokenizedPair>,
    k: usize,
    /// The data's seed: draws the stage-3 pool's agree subset as training does.
    data_seed: u64,
    pad_token_id: u32,
    tokenizer: Option<ChatTokenizer>,
    /// Dense matmul rate (FLOP/s) measured by this process before it ran anything.
    matmul_rate: f64,
    /// The best of this process's rate and its children's: what MFU is measured against. On
    /// a shared machine one measurement can land in a slow moment (this 2-vCPU VM measured
    /// 70 and 146 GFLOP/s minutes apart).
    best_matmul_rate: std::cell::Cell<f64>,
}

/// How a case's steps run: training's settings with the variant's optimisations switched off.
fn step_settings(v: &Variant) -> StepSettings {
    StepSettings {
        beta: BETA,
        batch_passes: v.batched_passes,
        recompute_activations: v.recompute_activations,
        split_responses: !v.joint_responses,
        row_layout: RowLayout::new(v.shared_prompt),
        max_grad_norm: 1.0,
        adam: (0.9, 0.999, 1e-8, 0.0),
        seed: 0,
        weight_sampling: WeightSampling::PerRow,
        adalora: None,
        length_correction: crate::loss::LengthCorrection::None,
    }
}

/// `steps` batches of `batch` pairs from `ids`: length-bucketed as training draws them (by
/// `row_length`, the length of the row a pair becomes), or plainly shuffled (so a batch pads
/// to its longest pair, whatever the others' lengths).
fn step_batches(
    pairs: &[TokenizedPair],
    ids: &[usize],
    batch: usize,
    steps: usize,
    bucketing: bool,
    row_length: fn(&TokenizedPair) -> usize,
) -> Vec<Vec<usize>> {
    let entries: Vec<(usize, usize)> = ids.iter().map(|&i| (i, row_length(&pairs[i]))).collect();
    let mut batches = Vec::new();
    let mut epoch = 0u64;
    while batches.len() < steps {
        let epoch_batches = if bucketing {
            epoch_batches(&entries, batch, 0, epoch).batches
        } else {
            let mut order = ids.to_vec();
            order.shuffle(&mut seeded_rng("bench-unbucketed", 0, epoch));
            order.chunks_exact(batch).map(<[usize]>::to_vec).collect()
        };
        if epoch_batches.is_empty() {
            break;
        }
        batches.extend(epoch_batches);
        epoch += 1;
    }
    batches.truncate(steps);
    batches
}

impl Bench {
    /// The method's config: curriculum and panacea-lora on the bench's LoRA rank and alpha (the
    /// TRL baseline's), the others on their own defaults (DPO-Soup rank 16, alpha 32;
    /// panacea AdaLoRA 12 -> 8 triplets per block, alpha 512, as in the paper).
    fn method_config(&self, method: MethodName) -> MethodConfig {
        let bench_lora = matches!(method, MethodName::Curriculum | MethodName::PanaceaLora);
        MethodConfig {
            beta: BETA,
            rank: bench_lora.then_some(BENCH_RANK),
            alpha: bench_lora.then_some(BENCH_ALPHA),
            ..MethodConfig::new(method)
        }
    }

    fn adapter_spec(&self, method: MethodName) -> AdapterSpec {
        self.method_config(method).adapter_spec(self.k)
    }

    /// The model of a method: from the preset's directory, or random on the device.
    fn model(&self, method: MethodName) -> Result<(VarStore, VarStore, CausalLm)> {
        let spec = self.adapter_spec(method);
        match &self.model_dir {
            Some(dir) => {
                let loaded = model::load_model(dir, Some(&spec), self.options.device, self.kind)?;
                Ok((loaded.base, loaded.adapters, loaded.model))
            }
            None => Ok(random_model(
                &self.config,
                &spec,
                self.options.device,
                self.kind,
            )),
        }
    }

    fn sync(&self) {
        if let Device::Cuda(i) = self.options.device {
            tch::Cuda::synchronize(i as i64);
        }
    }

    fn peak_memory(&self) -> Option<u64> {
        match self.options.device {
            Device::Cuda(i) => modpo_launcher::cuda_memory_in_use(i),
            _ => memory::peak_rss_bytes(),
        }
    }

    /// The batches a case steps through, as the stage would draw them.
    fn case_batches(
        &self,
        stage: &Stage,
        variant: &Variant,
        micro_batch: usize,
    ) -> Vec<Vec<usize>> {
        let ids = stage.pool.pair_ids(&self.pairs, self.data_seed);
        step_batches(
            &self.pairs,
            &ids,
            micro_batch,
            self.options.warmup + self.options.steps,
            variant.length_bucketing,
            RowLayout::new(variant.shared_prompt).row_length(),
        )
    }

    /// Reference log-probs of the pairs of `batches`. Training caches them for every pair once
    /// per run; the benchmark needs only these.
    fn reference_of(
        &self,
        model: &CausalLm,
        batches: &[Vec<usize>],
        micro_batch: usize,
    ) -> reference::ReferenceLogps {
        let mut ids: Vec<usize> = batches.iter().flatten().copied().collect();
        ids.sort_unstable();
        ids.dedup();
        reference::compute_for(
            model,
            &self.pairs,
            &ids,
            micro_batch,
            self.pad_token_id,
            self.options.device,
        )
    }

    /// Times one case; `micro_batch` pairs per step, each step through the training loop's
    /// [`StepRunner`] (collate, passes, all-reduce, clip, AdamW, metrics).
    fn run_case(&self, case: &Case, micro_batch: usize) -> Result<CaseResult> {
        let (k, v) = (self.k, case.variant);
        let stage = stages(case.method)
            .into_iter()
            .find(|s| s.number == case.stage)
            .context("no such stage")?;
        let (base, _adapters, mut model) = self.model(case.method)?;
        if !v.stacked_lora {
            model.set_lora_gemms(LoraGemms::PerBlock);
        }
        let spec = self.adapter_spec(case.method);
        let batches = self.case_batches(&stage, &v, micro_batch);
        if batches.len() < self.options.warmup + self.options.steps {
            bail!(
                "{}: stage {} has too few pairs for {} steps of {micro_batch}",
                case.name,
                stage.number,
                self.options.warmup + self.options.steps
            );
        }
        let reference = v
            .reference_cache
            .then(|| self.reference_of(&model, &batches, micro_batch));
        // Base weights that require gradients: what an unfrozen base costs in the backward.
        let base_params: Vec<Tensor> = base.trainable_variables();
        for p in base.variables().values() {
            let _ = p.shallow_clone().set_requires_grad(!v.frozen_base);
        }
        let mut settings = step_settings(&v);
        settings.adalora = self.method_config(case.method).adalora(batches.len());
        let mut runner = StepRunner::new(
            &model,
            &stage,
            settings,
            &Single,
            BatchPlan::from_factors(micro_batch, micro_batch, Some(1), 1)?,
            0,
            k,
            self.pad_token_id,
        )?;
        let adapters_of_pass = match stage.step.unit {
            UnitPasses::Shared => PassAdapters::SharedOnly,
            UnitPasses::PerDimension => PassAdapters::AllBlocks,
        };

        self.sync();
        memory::reset_peak_rss();
        let (mut times, mut tokens, mut flops) = (Vec::new(), 0i64, 0f64);
        let never = std::sync::atomic::AtomicBool::new(false); // no stop signal in a benchmark
        for (step_index, global) in batches.iter().enumerate() {
            let started = Instant::now();
            let source = match &reference {
                Some(cached) => ReferenceSource::Cached(cached),
                None => ReferenceSource::EveryStep,
            };
            let outcome = runner.step(
                &self.pairs,
                global,
                source,
                step_index,
                LEARNING_RATE,
                &never,
            )?;
            for p in &base_params {
                let mut g = p.grad();
                if g.defined() {
                    let _ = g.zero_();
                }
            }
            self.sync();
            let elapsed = started.elapsed().as_secs_f64();
            if step_index >= self.options.warmup {
                times.push(elapsed * 1e3);
                tokens += outcome.tokens;
                let selected: Vec<&TokenizedPair> =
                    global.iter().map(|&i| &self.pairs[i]).collect();
                flops += self.batch_flops(
                    &selected,
                    &spec,
                    adapters_of_pass,
                    stage.step.passes(k),
                    v.shared_prompt,
                );
            }
        }
        let steps = times.len() as f64;
        let mut result = CaseResult {
            name: case.name.clone(),
            method: case.method,
            stage: case.stage,
            variant: v,
            micro_batch,
            ms_per_step: times,
            policy_tokens_per_step: tokens as f64 / steps,
            flops_per_step: flops / steps,
            median_ms: 0.0,
            pairs_per_s: 0.0,
            policy_tokens_per_s: 0.0,
            mfu: 0.0,
            matmul_rate: self.matmul_rate,
            peak_memory_bytes: self.peak_memory(),
            predicted_peak_bytes: self.predicted_peak(case, &stage, &batches, micro_batch),
        };
        // This process's own rate; the parent fills the rates in again against the best one.
        result.fill_rates(self.matmul_rate);
        Ok(result)
    }

    /// The memory planner's peak for `case` (`plan::StageLoad`), the largest over its
    /// batches; None for what the planner does not model (the reference every step, two
    /// forwards, per-block GEMMs, gradients for the base).
    fn predicted_peak(
        &self,
        case: &Case,
        stage: &Stage,
        batches: &[Vec<usize>],
        micro_batch: usize,
    ) -> Option<u64> {
        let v = case.variant;
        if !(v.reference_cache && v.joint_responses && v.stacked_lora && v.frozen_base) {
            return None;
        }
        let spec = self.adapter_spec(case.method);
        let context = plan::StageContext {
            model: &self.config,
            kind: self.kind,
            spec: &spec,
            k: self.k,
            longest_pair: (1, 1, 1),
            shared_prompt: v.shared_prompt,
            rank_batch: micro_batch,
            world_size: 1,
            target: match self.options.device {
                Device::Cpu => plan::Target::Cpu,
                _ => plan::Target::Cuda,
            },
        };
        let load = plan::StageLoad::of_stage(stage, &context);
        let setting = plan::Setting {
            micro_batch,
            batch_passes: v.batched_passes,
            recompute: v.recompute_activations,
        };
        let len = |ids: &[u32]| ids.len() as i64;
        batches
            .iter()
            .map(|batch| {
                let lengths: Vec<(i64, i64, i64)> = batch
                    .iter()
                    .map(|&i| &self.pairs[i])
                    .map(|p| {
                        (
                            len(&p.prompt_ids),
                            len(&p.response_a_ids),
                            len(&p.response_b_ids),
                        )
                    })
                    .collect();
                let rows = plan::Rows::of_pairs(&lengths, v.shared_prompt);
                let rows = match v.batched_passes {
                    true => rows.replicated(load.passes),
                    false => rows,
                };
                load.predict_rows(setting, rows).total
            })
            .max()
    }

    /// Model FLOPs of one step over `pairs`: every pass over both responses of every pair,
    /// with the prompt once per pair when it is shared (causal attention makes the cost
    /// additive over tokens, so a shared row costs its two rows less one prompt).
    fn batch_flops(
        &self,
        pairs: &[&TokenizedPair],
        spec: &AdapterSpec,
        adapters: PassAdapters,
        passes: usize,
        shared_prompt: bool,
    ) -> f64 {
        let row = |tokens: usize, response: usize| {
            row_pass_flops(&self.config, spec, adapters, tokens as i64, response as i64)
        };
        let per_pass: f64 = pairs
            .iter()
            .map(|p| {
                let prompt = p.prompt_ids.len();
                let (a, b) = (p.response_a_ids.len(), p.response_b_ids.len());
                let rows = row(prompt + a, a) + row(prompt + b, b);
                match shared_prompt {
                    true => rows - row(prompt, 0),
                    false => rows,
                }
            })
            .sum();
        per_pass * passes as f64
    }

    /// Runs every case (and the baselines), prints the tables and writes results.json. Each
    /// case runs in a child process of its own, so that its peak memory is its own and no
    /// case inherits another's allocator state; a child that fails (out of memory, say) is an
    /// error, except in the micro-batch search, where it means "does not fit".
    pub fn run(&self) -> Result<()> {
        if let Some((name, micro_batch)) = &self.options.child {
            let case = all_cases(self.options.preset, self.options.ablations)
                .into_iter()
                .find(|c| &c.name == name)
                .with_context(|| format!("no benchmark case {name:?}"))?;
            let result = self.run_case(&case, *micro_batch)?;
            println!("{}", serde_json::to_string(&result)?);
            return Ok(());
        }
        let selected: Vec<Case> = cases(self.options.preset, self.options.ablations)
            .into_iter()
            .filter(|c| {
                self.options
                    .only
                    .as_ref()
                    .is_none_or(|only| c.name.contains(only.as_str()))
            })
            .collect();
        let mut results = Vec::new();
        for case in &selected {
            eprintln!("bench: {}", case.name);
            results.push(self.time_case(case)?);
        }
        let baselines = match (&self.options.python, self.options.preset) {
            (Some((python, scripts)), Preset::Cpu) => {
                // Ours again, right before each baseline run (when the case is selected).
                let mut ours = |name: &str| -> Result<Option<CaseResult>> {
                    let Some(case) = selected.iter().find(|c| c.name == name) else {
                        return Ok(None);
                    };
                    eprintln!("bench: {name} (head to head)");
                    self.time_case(case).map(Some)
                };
                python::run_baselines(self, python, scripts, &mut ours)?
            }
            _ => Vec::new(),
        };
        let micro_batch_search = match self.options.search_micro_batch {
            Some(limit) => Some(self.search_micro_batch(limit)?),
            None => None,
        };
        let rate = self.best_matmul_rate.get();
        for result in &mut results {
            result.fill_rates(rate);
        }
        report::write(self, &results, &baselines, micro_batch_search.as_ref())
    }

    /// Times `case` at the benchmark's micro-batch in a child process; its failure is an error.
    fn time_case(&self, case: &Case) -> Result<CaseResult> {
        self.run_child(case, self.options.micro_batch)?
            .with_context(|| format!("benchmark case {:?} failed", case.name))
    }

    /// Times `case` in a child process (this binary, `bench --child-case`); None when the
    /// child fails.
    fn run_child(&self, case: &Case, micro_batch: usize) -> Result<Option<CaseResult>> {
        let exe = std::env::current_exe().context("cannot find this executable")?;
        let mut args: Vec<String> = std::env::args().skip(1).collect();
        args.extend([
            "--child-case".into(),
            case.name.clone(),
            "--child-micro-batch".into(),
            micro_batch.to_string(),
        ]);
        let output = std::process::Command::new(exe)
            .args(&args)
            .stderr(std::process::Stdio::inherit())
            .output()
            .context("cannot start a benchmark child process")?;
        if !output.status.success() {
            eprintln!(
                "bench: {} with {micro_batch} pairs failed ({})",
                case.name, output.status
            );
            return Ok(None);
        }
        let stdout = String::from_utf8_lossy(&output.stdout);
        let last = stdout.lines().last().unwrap_or("");
        let result: CaseResult = serde_json::from_str(last)
            .with_context(|| format!("{}: no result line in {last:?}", case.name))?;
        self.best_matmul_rate
            .set(self.best_matmul_rate.get().max(result.matmul_rate));
        Ok(Some(result))
    }

    /// The largest micro-batch of a stage-3 step that runs, without and with activation
    /// recomputation: doubling until a run fails (out of memory), then bisecting.
    fn search_micro_batch(&self, limit: usize) -> Result<Vec<(bool, usize)>> {
        let mut found = Vec::new();
        for case in search_cases(self.options.preset) {
            let fits = |m: usize| -> Result<bool> {
                eprintln!("bench: {} with {m} pairs", case.name);
                Ok(self.run_child(&case, m)?.is_some())
            };
            let (mut good, mut bad) = (0, None);
            let mut m = 1;
            while m <= limit {
                if fits(m)? {
                    good = m;
                    m *= 2;
                } else {
                    bad = Some(m);
                    break;
                }
            }
            if let Some(mut high) = bad {
                while high - good > 1 {
                    let mid = (good + high) / 2;
                    if fits(mid)? {
                        good = mid;
                    } else {
                        high = mid;
                    }
                }
            }
            found.push((case.variant.recompute_activations, good));
        }
        Ok(found)
    }

    /// Pairs of the timed stage-1 steps as text, for TRL: `(prompt, chosen, rejected, tokens)`.
    fn stage1_text_pairs(&self) -> Result<Vec<serde_json::Value>> {
        let tokenizer = self
            .tokenizer
            .as_ref()
            .context("the cpu preset has a tokenizer")?;
        let stage = &stages(MethodName::Curriculum)[0];
        let mut rows = Vec::new();
        for batch in self.case_batches(
            stage,
            &Variant::training(self.options.preset),
            self.options.micro_batch,
        ) {
            for id in batch {
                let p = &self.pairs[id];
                let prefers_a = p.preferences.iter().map(|x| x.sign() as i32).sum::<i32>() > 0;
                let (chosen, rejected) = match prefers_a {
                    true => (&p.response_a_ids, &p.response_b_ids),
                    false => (&p.response_b_ids, &p.response_a_ids),
                };
                rows.push(serde_json::json!({
                    "prompt": tokenizer.decode(&p.prompt_ids, false)?,
                    "chosen": tokenizer.decode(chosen, false)?,
                    "rejected": tokenizer.decode(rejected, false)?,
                    "tokens": 2 * p.prompt_ids.len() + chosen.len() + rejected.len(),
                }));
            }
        }
        Ok(rows)
    }

    /// The timed stage-3 steps as token ids with their drawn weights, for the PyTorch loop.
    fn stage3_steps(&self) -> Vec<serde_json::Value> {
        let stage = &stages(MethodName::Curriculum)[2];
        self.case_batches(
            stage,
            &Variant::training(self.options.preset),
            self.options.micro_batch,
        )
        .iter()
        .enumerate()
        .map(|(step_index, batch)| {
            let pairs: Vec<serde_json::Value> = batch
                .iter()
                .map(|&id| {
                    let p = &self.pairs[id];
                    serde_json::json!({
                        "prompt_ids": p.prompt_ids, "a_ids": p.response_a_ids,
                        "b_ids": p.response_b_ids,
                        "preferences": p.preferences.iter().map(|x| x.sign()).collect::<Vec<_>>(),
                    })
                })
                .collect();
            let weights = WeightSampling::PerRow.draw(0, 3, step_index, batch.len(), self.k);
            serde_json::json!({"pairs": pairs, "weights": weights})
        })
        .collect()
    }

    fn model_dir(&self) -> Option<&Path> {
        self.model_dir.as_deref()
    }
}
