//! `train-rm`: the reward model's loop, on the training run's data pipeline (`data::load`:
//! the same splits, chat template, truncation and dropped ties; `epoch_batches` and
//! `BatchPlan::shard`: the same global batches and rank shards; `collate`: the same rows),
//! AdamW, clipping and schedule (`optim`), gradients averaged over ranks by the launcher's
//! collective, then the held-out pairwise accuracy per dimension with bootstrap intervals.
//!
//! Rank 0 alone writes the run directory: `config.toml`, `resolved_config.json`,
//! `run_identity.json`, `metrics.jsonl` (one line per step), `checkpoints/` (every
//! `train.checkpoint_every` steps, on SIGTERM / SIGUSR1 and at the end; see `resume`),
//! `reward_model.safetensors`, `reward_model.json` and `accuracy.json` / `accuracy.md`. A new
//! run refuses a directory that already holds one; `--resume` continues it.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use serde_json::json;
use tch::{nn, Device, Kind, Tensor};

use modpo_launcher::Op;

use super::config::RewardModelConfig;
use super::resume::{self, Position};
use super::{
    lora_spec, rewards, save_weights, RewardHead, RewardModelMeta, META_FILE, WEIGHTS_FILE,
};
use crate::checkpoint::write_atomically;
use crate::crash_point;
use crate::data::{self, collate, epoch_batches, BatchPlan, MicroBatch, PreferenceData};
use crate::eval::metrics::{accuracy, Accuracy, Bootstrap};
use crate::model::{self, LoadedModel};
use crate::optim::{learning_rate, AdamW};
use crate::tokenizer::ChatTokenizer;
use crate::train::{stop_on_signals, Cluster};

/// Rewards of responses, `[response][dimension]`.
type Rewards = Vec<Vec<f64>>;

/// What `train-rm` leaves behind.
#[derive(Debug, Clone)]
pub struct RewardModelSummary {
    pub run_dir: PathBuf,
    pub steps: usize,
    pub dimensions: Vec<String>,
    /// Held-out pairwise accuracy per dimension (pairs where the dimension has a preference).
    pub accuracy: Vec<Accuracy>,
    pub reference_point: Vec<f64>,
    /// Stopped by SIGTERM / SIGUSR1 after a checkpoint (no accuracy yet); resume with
    /// `--resume`.
    pub stopped: bool,
}

/// The model, head and data of one `train-rm` run.
pub(super) struct RewardRun<'a> {
    pub config: &'a RewardModelConfig,
    pub cluster: &'a Cluster<'a>,
    pub data: PreferenceData,
    pub loaded: LoadedModel,
    pub head_store: nn::VarStore,
    head: RewardHead,
    lora: bool,
    pad: u32,
    device: Device,
    /// `metrics.jsonl`, appended to (rank 0).
    metrics: Option<std::fs::File>,
    /// Set by SIGTERM or SIGUSR1; reduced over ranks with each step's loss.
    stop: Arc<AtomicBool>,
}

impl RewardRun<'_> {
    /// Input tensors of a micro-batch: ids, mask [2B, T]; preferences [B, k] f32.
    fn tensors(&self, batch: &MicroBatch) -> (Tensor, Tensor, Tensor) {
        let rows = [2 * batch.pairs as i64, batch.seq_len as i64];
        let ids = Tensor::from_slice(&batch.input_ids).view(rows);
        let mask = Tensor::from_slice(&batch.attention_mask).view(rows);
        let prefs = Tensor::from_slice(&batch.preferences)
            .view([batch.pairs as i64, batch.dimensions as i64])
            .to_kind(Kind::Float);
        (
            ids.to_device(self.device),
            mask.to_device(self.device),
            prefs.to_device(self.device),
        )
    }

    /// (r(y_a), r(y_b)), each [B, k].
    fn pair_rewards(&self, batch: &MicroBatch) -> (Tensor, Tensor, Tensor) {
        let (ids, mask, prefs) = self.tensors(batch);
        let r = rewards(&self.loaded.model, &self.head, self.lora, &ids, &mask); // [2B, k]
        let b = batch.pairs as i64;
        (r.narrow(0, 0, b), r.narrow(0, b, b), prefs)
    }

    /// One optimizer step on a global batch; returns its mean loss over the global batch's
    /// (pair, dimension) preferences and whether some rank was asked to stop.
    fn step(
        &self,
        optimizer: &mut AdamW,
        plan: &BatchPlan,
        global: &[usize],
        lr: f64,
    ) -> Result<(f64, bool)> {
        let pairs = &self.data.train.pairs;
        // Every rank knows the whole global batch, so the denominator is exact everywhere.
        let preferences: usize = global
            .iter()
            .map(|&id| {
                pairs[id]
                    .preferences
                    .iter()
                    .filter(|p| p.sign() != 0)
                    .count()
            })
            .sum();
        let world = plan.world_size as f64;
        let mut loss_sum = 0.0;
        for micro in plan.shard(global, self.cluster.topology.rank) {
            let refs: Vec<_> = micro.iter().map(|&id| &pairs[id]).collect();
            let batch = collate(&refs, self.pad);
            let (ra, rb, prefs) = self.pair_rewards(&batch);
            // -log sigma(p_i (r_a,i - r_b,i)) where p_i = +-1, masked where p_i = 0: [B, k]
            let nll = -(&prefs * (ra - rb)).log_sigmoid() * prefs.abs();
            let sum = nll.sum(Kind::Float);
            loss_sum += sum.double_value(&[]);
            // The all-reduce averages over ranks: scale so the average is the global mean.
            (sum * world / preferences.max(1) as f64).backward();
        }
        let mut grads = optimizer.gradient_buffers();
        self.cluster
            .collective
            .all_reduce_mean(&mut grads)
            .context("all-reduce of the reward model's gradients")?;
        optimizer.clip_grad_norm(self.config.train.max_grad_norm);
        optimizer.step(lr);
        optimizer.zero_grad();
        let mut sums = [
            loss_sum,
            f64::from(u8::from(self.stop.load(Ordering::Relaxed))),
        ];
        self.cluster
            .collective
            .all_reduce_f64(&mut sums, Op::Sum)
            .context("reducing the step's loss")?;
        Ok((sums[0] / preferences.max(1) as f64, sums[1] > 0.0))
    }

    /// Appends one line to `metrics.jsonl` (rank 0).
    pub fn write_metrics(&self, record: &serde_json::Value) -> Result<()> {
        if let Some(mut file) = self.metrics.as_ref() {
            writeln!(file, "{record}").context("cannot append to metrics.jsonl")?;
        }
        Ok(())
    }

    /// Rewards of every held-out pair on this process (the split is small next to training):
    /// (r(y_a), r(y_b)), each `[pairs][k]`.
    fn held_out_rewards(&self) -> Result<(Rewards, Rewards)> {
        let _no_grad = tch::no_grad_guard();
        let (mut all_a, mut all_b) = (Vec::new(), Vec::new());
        let pairs: Vec<_> = self.data.eval.pairs.iter().collect();
        for chunk in pairs.chunks(self.config.data.micro_batch) {
            let batch = collate(chunk, self.pad);
            let (ra, rb, _) = self.pair_rewards(&batch);
            for (r, out) in [(ra, &mut all_a), (rb, &mut all_b)] {
                let k = r.size()[1] as usize;
                let flat = Vec::<f32>::try_from(r.to_device(Device::Cpu).contiguous().view([-1]))?;
                out.extend(
                    flat.chunks(k)
                        .map(|c| c.iter().map(|&x| f64::from(x)).collect()),
                );
            }
        }
        Ok((all_a, all_b))
    }
}

/// Held-out accuracy per dimension: a pair counts for dimension i when i prefers one response;
/// it is right when the reward of the preferred one is higher.
pub fn held_out_accuracy(
    preferences: &[Vec<i64>],
    rewards_a: &[Vec<f64>],
    rewards_b: &[Vec<f64>],
    bootstrap: &Bootstrap,
) -> Vec<Accuracy> {
    let k = preferences.first().map_or(0, Vec::len);
    (0..k)
        .map(|i| {
            let outcomes: Vec<Option<bool>> = preferences
                .iter()
                .zip(rewards_a.iter().zip(rewards_b))
                .map(|(p, (a, b))| match p[i] {
                    0 => None,
                    sign => Some((a[i] > b[i]) == (sign > 0)),
                })
                .collect();
            accuracy(&outcomes, bootstrap, i as u64)
        })
        .collect()
}

/// Trains the reward model of `config` (every rank calls it) and writes it (rank 0); with
/// `resume`, continues the run in `train.output_dir` from its latest valid checkpoint.
pub fn train_reward_model(
    config: &RewardModelConfig,
    config_text: &str,
    resume: bool,
    cluster: &Cluster,
) -> Result<RewardModelSummary> {
    let existing = resume::open_run_dir(config, config_text, resume, cluster)?;
    let run_dir = config.train.output_dir.clone();
    let stop = stop_on_signals()?;
    let device = model::select_device(config.model.device, cluster.topology.local_rank)?;
    let kind = model::select_kind(config.model.dtype, device);
    let tokenizer =
        ChatTokenizer::from_model_dir(&config.model.path, config.model.chat_template.as_deref())?;
    let data = data::load(&config.data, &tokenizer)?;
    let rm = &config.reward_model;
    tch::manual_seed(config.train.seed as i64);
    let spec = rm.lora.then(|| lora_spec(rm.rank, rm.alpha));
    let loaded = model::load_model(&config.model.path, spec.as_ref(), device, kind)?;
    let head_store = nn::VarStore::new(device);
    let hidden = loaded.model.config().hidden_size;
    let head = RewardHead::new(
        &head_store.root().sub("head"),
        hidden,
        data.dimensions.len() as i64,
    );
    let metrics = match cluster.topology.rank {
        0 => Some(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(run_dir.join("metrics.jsonl"))
                .with_context(|| format!("cannot open {}/metrics.jsonl", run_dir.display()))?,
        ),
        _ => None,
    };
    let run = RewardRun {
        config,
        cluster,
        pad: tokenizer.pad_token_id(),
        data,
        loaded,
        head_store,
        head,
        lora: rm.lora,
        device,
        metrics,
        stop,
    };
    let (names, params): (Vec<String>, Vec<Tensor>) = resume::trainable_in_order(&run)
        .into_iter()
        .filter(|(_, t)| t.numel() > 0)
        .unzip();
    let t = &config.train;
    let mut optimizer = AdamW::new(
        params,
        t.adam_beta1,
        t.adam_beta2,
        t.adam_eps,
        t.weight_decay,
    );
    let position = resume::starting_point(&run, &mut optimizer, &names, existing)?;
    // Every rank starts from rank 0's weights (fresh or resumed alike).
    tch::no_grad(|| cluster.collective.broadcast(&mut optimizer.params))
        .context("broadcasting the head")?;
    let (steps, stopped) = match position {
        Some(p) if p.finished => (p.step, false),
        position => train_steps(&run, &mut optimizer, &names, position)?,
    };
    if stopped {
        return Ok(RewardModelSummary {
            run_dir,
            steps,
            dimensions: run.data.dimensions.clone(),
            accuracy: vec![],
            reference_point: vec![],
            stopped: true,
        });
    }
    finish(&run, &run_dir, steps)
}

/// Every epoch's global batches in turn, until `train.epochs` or `train.max_steps`, from
/// `position` when resuming; checkpoints every `train.checkpoint_every` steps, when stopped
/// and at the end. Returns the steps taken in all and whether a signal stopped the run.
fn train_steps(
    run: &RewardRun,
    optimizer: &mut AdamW,
    names: &[String],
    position: Option<Position>,
) -> Result<(usize, bool)> {
    let config = run.config;
    let plan = BatchPlan::new(&config.data, run.cluster.topology.world_size)?;
    let pool: Vec<(usize, usize)> = run
        .data
        .train
        .pairs
        .iter()
        .map(|p| (p.id, p.seq_len()))
        .collect();
    let per_epoch = pool.len() / plan.global_batch;
    if per_epoch == 0 {
        bail!(
            "{} train pairs do not fill one global batch of {} (data.global_batch)",
            pool.len(),
            plan.global_batch
        );
    }
    let t = &config.train;
    let total = t
        .max_steps
        .unwrap_or(t.epochs * per_epoch)
        .min(t.epochs.max(1) * per_epoch);
    let (mut step, first_epoch, mut skip) = position
        .map(|p| (p.step, p.epoch, p.pairs_into_epoch / plan.global_batch))
        .unwrap_or((0, 0, 0));
    for epoch in first_epoch.. {
        let batches = epoch_batches(&pool, plan.global_batch, run.data.seed, epoch as u64);
        for (b, global) in batches.batches.iter().enumerate().skip(skip) {
            if step == total {
                break;
            }
            let lr = learning_rate(t.learning_rate, t.schedule, t.warmup_ratio, step, total);
            let (loss, stop) = run.step(optimizer, &plan, global, lr)?;
            if !loss.is_finite() {
                bail!("step {step}: the reward model's loss is {loss}");
            }
            step += 1;
            tracing::info!(step, total, loss, "reward model step");
            run.write_metrics(
                &json!({"step": step - 1, "epoch": epoch, "loss": loss, "learning_rate": lr}),
            )?;
            crash_point::reached("step");
            let cursor = (epoch, (b + 1) * plan.global_batch);
            let periodic = t.checkpoint_every > 0 && step.is_multiple_of(t.checkpoint_every);
            if step < total && (stop || periodic) {
                resume::write_checkpoint(run, optimizer, names, step, false, cursor)?;
            }
            if stop && step < total {
                tracing::warn!(
                    step,
                    "stopped by signal after a checkpoint; resume with --resume"
                );
                return Ok((step, true));
            }
            if step == total {
                resume::write_checkpoint(run, optimizer, names, step, true, cursor)?;
            }
        }
        skip = 0;
        if step == total {
            break;
        }
    }
    Ok((step, false))
}

/// Held-out accuracy and reference point, then (rank 0) the weights and descriptions.
fn finish(run: &RewardRun, run_dir: &std::path::Path, steps: usize) -> Result<RewardModelSummary> {
    let config = run.config;
    let (ra, rb) = run.held_out_rewards()?;
    let preferences: Vec<Vec<i64>> = run
        .data
        .eval
        .pairs
        .iter()
        .map(|p| p.preferences.iter().map(|x| i64::from(x.sign())).collect())
        .collect();
    let bootstrap = Bootstrap {
        resamples: config.reward_model.bootstrap,
        ..Bootstrap::default()
    };
    let acc = held_out_accuracy(&preferences, &ra, &rb, &bootstrap);
    let k = run.data.dimensions.len();
    let reference_point: Vec<f64> = (0..k)
        .map(|i| {
            ra.iter()
                .chain(&rb)
                .map(|r| r[i])
                .fold(f64::INFINITY, f64::min)
        })
        .map(|m| if m.is_finite() { m } else { 0.0 })
        .collect();
    let summary = RewardModelSummary {
        run_dir: run_dir.to_path_buf(),
        steps,
        dimensions: run.data.dimensions.clone(),
        accuracy: acc,
        reference_point,
        stopped: false,
    };
    if run.cluster.topology.rank == 0 {
        write_outputs(run, &summary)?;
    }
    Ok(summary)
}

fn write_outputs(run: &RewardRun, summary: &RewardModelSummary) -> Result<()> {
    let dir = &summary.run_dir;
    let rm = &run.config.reward_model;
    save_weights(
        &dir.join(WEIGHTS_FILE),
        &run.head_store,
        &run.loaded.adapters,
    )?;
    let meta = RewardModelMeta {
        model_path: run.config.model.path.clone(),
        model_fingerprint: run.loaded.fingerprint.clone(),
        dimensions: summary.dimensions.clone(),
        lora: rm.lora.then_some((rm.rank, rm.alpha)),
        chat_template: run.config.model.chat_template.clone(),
        reference_point: summary.reference_point.clone(),
    };
    write_atomically(
        &dir.join(META_FILE),
        serde_json::to_string_pretty(&meta)?.as_bytes(),
    )?;
    let json = json!({
        "steps": summary.steps,
        "held_out_pairs": run.data.eval.pairs.len(),
        "dimensions": summary.dimensions,
        "accuracy": summary.accuracy,
    });
    write_atomically(
        &dir.join("accuracy.json"),
        serde_json::to_string_pretty(&json)?.as_bytes(),
    )?;
    write_atomically(
        &dir.join("accuracy.md"),
        accuracy_markdown(summary).as_bytes(),
    )?;
    Ok(())
}

/// The held-out accuracy table.
pub fn accuracy_markdown(summary: &RewardModelSummary) -> String {
    let mut md = format!(
        "Held-out pairwise accuracy of the reward model after {} steps (pairs where the \
         dimension prefers one response; 95% bootstrap interval):\n\n| dimension | pairs | \
         accuracy (%) |\n|---|---|---|\n",
        summary.steps
    );
    for (d, a) in summary.dimensions.iter().zip(&summary.accuracy) {
        let interval = a
            .interval
            .map(|[lo, hi]| format!(" [{:.1}, {:.1}]", 100.0 * lo, 100.0 * hi))
            .unwrap_or_default();
        let value = a
            .accuracy
            .map(|x| format!("{:.1}", 100.0 * x))
            .unwrap_or("n/a".into());
        let _ = writeln!(md, "| {d} | {} | {value}{interval} |", a.counted);
    }
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accuracy_counts_only_preferring_dimensions() {
        // Pair 0: dim 0 prefers a (right: 2 > 1), dim 1 none. Pair 1: dim 0 prefers b (wrong:
        // 3 > 0 for a), dim 1 prefers b (right: 1 < 5). Pair 2: dim 1 prefers a, rewards tie
        // (wrong: a tie is not a win).
        let prefs = vec![vec![1, 0], vec![-1, -1], vec![0, 1]];
        let ra = vec![vec![2.0, 0.0], vec![3.0, 1.0], vec![0.0, 4.0]];
        let rb = vec![vec![1.0, 9.0], vec![0.0, 5.0], vec![0.0, 4.0]];
        let off = Bootstrap {
            resamples: 0,
            ..Bootstrap::default()
        };
        let acc = held_out_accuracy(&prefs, &ra, &rb, &off);
        assert_eq!((acc[0].counted, acc[0].correct), (2, 1));
        assert_eq!((acc[1].counted, acc[1].correct), (2, 1));
    }
}
