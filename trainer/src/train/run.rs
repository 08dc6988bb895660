//! What a run loads once for every stage (model, tokenizer, data, reference log-probs, the
//! metrics file) and the loop's hooks that use it: the metrics lines, held-out evaluation and
//! the stop signal.

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use tch::Device;

use modpo_launcher::Op;

use super::records::{evaluate_held_out, metrics_record};
use super::Cluster;
use crate::checkpoint::{self, AdapterMeta};
use crate::config::RunConfig;
use crate::crash_point;
use crate::data::{self, PreferenceData};
use crate::eval;
use crate::method::Stage;
use crate::model::{self, LoadedModel};
use crate::reference::{self, PassPlan, ReferenceCache, ReferenceLogps, Share};
use crate::step::StepOutcome;
use crate::tokenizer::ChatTokenizer;

/// The run's metrics file in its directory: one JSON line per step and event.
const METRICS_FILE: &str = "metrics.jsonl";

/// The run's model, data and reference log-probs, loaded once for every stage.
pub(super) struct Run<'a> {
    pub config: &'a RunConfig,
    pub cluster: &'a Cluster<'a>,
    pub device: Device,
    pub loaded: LoadedModel,
    pub tokenizer: ChatTokenizer,
    pub data: PreferenceData,
    pub reference: ReferenceLogps,
    /// Rank 0 only.
    pub metrics: Option<std::fs::File>,
    pub meta: AdapterMeta,
    pub checkpoints: PathBuf,
    /// Held-out conflict pairs and their reference log-probs, on rank 0 when
    /// `train.eval_every` > 0.
    pub evaluation: Option<ReferenceLogps>,
    /// Set by SIGTERM or SIGUSR1: stop at the next step boundary with a checkpoint. Reduced
    /// over ranks with each step's metrics, so a signal to one rank stops every rank at the
    /// same step.
    pub stop: Arc<AtomicBool>,
}

impl<'a> Run<'a> {
    /// Loads the tokenizer, data and model (fresh adapters seeded by `train.seed`); the
    /// reference log-probs come after, from [`Run::load_reference_logps`].
    pub fn load(config: &'a RunConfig, cluster: &'a Cluster<'a>) -> Result<Self> {
        let stop = stop_on_signals()?;
        let run_dir = &config.train.output_dir;
        let device = model::select_device(config.model.device, cluster.topology.local_rank)?;
        let kind = model::select_kind(config.model.dtype, device);
        let tokenizer = ChatTokenizer::from_model_dir(
            &config.model.path,
            config.model.chat_template.as_deref(),
        )?;
        let data = data::load(&config.data, &tokenizer)?;
        crash_point::reached("data-loaded");
        tracing::info!(
            train_pairs = data.train.pairs.len(),
            agree = data.train.agree().len(),
            conflict = data.train.conflict().len(),
            "data loaded"
        );
        let spec = config.method.adapter_spec(data.dimensions.len());
        tch::manual_seed(config.train.seed as i64);
        let loaded = model::load_model(&config.model.path, Some(&spec), device, kind)?;
        let metrics = match cluster.is_main() {
            true => Some(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(run_dir.join(METRICS_FILE))
                    .with_context(|| {
                        format!("cannot open {}", run_dir.join(METRICS_FILE).display())
                    })?,
            ),
            false => None,
        };
        let meta = AdapterMeta::new(
            &config.model.path,
            &loaded.fingerprint,
            &data.dimensions,
            &spec,
        );
        Ok(Run {
            config,
            cluster,
            device,
            loaded,
            tokenizer,
            data,
            reference: ReferenceLogps {
                response_a: vec![],
                response_b: vec![],
            },
            metrics,
            meta,
            checkpoints: checkpoint::checkpoints_dir(run_dir),
            evaluation: None,
            stop,
        })
    }

    /// The reference log-probs of the training pairs, and of the held-out ones on rank 0 when
    /// evaluating: read from the chunked cache where a chunk verifies, the rest computed with
    /// every rank taking its share of the chunks (see [`reference`]).
    pub fn load_reference_logps(&mut self) -> Result<()> {
        let config = self.config;
        let cache_dir = config
            .data
            .cache_dir
            .clone()
            .unwrap_or_else(|| config.train.output_dir.join("cache"));
        let chunk_pairs = config
            .data
            .reference_chunk_pairs
            .unwrap_or(reference::DEFAULT_CHUNK_PAIRS);
        let pass = |pairs: &[data::TokenizedPair], share: Share| {
            let key =
                reference::cache_key(&self.loaded.fingerprint, self.loaded.model.kind(), pairs);
            let ids: Vec<usize> = (0..pairs.len()).collect();
            let plan = PassPlan::new(pairs, &ids, config.data.micro_batch, chunk_pairs);
            reference::load_or_compute_share(
                Some(&ReferenceCache::new(&cache_dir, &key)),
                &self.loaded.model,
                pairs,
                &plan,
                share,
                self.tokenizer.pad_token_id(),
                self.device,
            )
        };
        let topology = self.cluster.topology;
        let share = Share {
            rank: topology.rank,
            world: topology.world_size,
        };
        let (mine, report) = pass(&self.data.train.pairs, share)?;
        let mut counts = [report.found as f64, report.computed as f64];
        self.cluster
            .collective
            .all_reduce_f64(&mut counts, Op::Sum)
            .context("adding up the reference chunks")?;
        self.reference = reference::gather(self.cluster.collective, mine)?;
        let [found, computed] = counts.map(|c| c as usize);
        tracing::info!(
            chunks = report.chunks,
            found,
            computed,
            "reference log-probs ready"
        );
        self.write_metrics(&serde_json::json!({"event": "reference", "split": "train",
            "chunks": report.chunks, "found": found, "computed": computed}))?;
        if self.cluster.is_main() && config.train.eval_every > 0 {
            if eval::conflict_pairs(&self.data.eval).is_empty() {
                tracing::warn!(
                    "train.eval_every is set but the held-out split has no conflict pair"
                );
            }
            self.evaluation = Some(pass(&self.data.eval.pairs, Share::ALL)?.0);
        }
        Ok(())
    }

    /// Appends one line to `metrics.jsonl` (rank 0).
    pub fn write_metrics(&self, record: &serde_json::Value) -> Result<()> {
        if let Some(mut metrics) = self.metrics.as_ref() {
            writeln!(metrics, "{record}").with_context(|| {
                let path = self.config.train.output_dir.join(METRICS_FILE);
                format!("cannot append to {}", path.display())
            })?;
        }
        Ok(())
    }

    /// The metrics line of an optimizer step.
    pub fn record_step(
        &self,
        stage: &Stage,
        epoch: usize,
        step: usize,
        lr: f64,
        outcome: &StepOutcome,
        started: Instant,
    ) -> Result<()> {
        let record = metrics_record(
            stage,
            epoch,
            step,
            lr,
            outcome,
            &self.data.dimensions,
            started,
        );
        tracing::debug!(%record, "step");
        self.write_metrics(&record)
    }

    /// Held-out conflict accuracy at the paper's settings into `metrics.jsonl` (rank 0).
    pub fn record_evaluation(&self, stage: &Stage, step: usize) -> Result<()> {
        match evaluate_held_out(self, stage, step) {
            Some(record) => self.write_metrics(&record),
            None => Ok(()),
        }
    }

    /// The stage's progress bar (hidden on ranks other than 0), at `step` of `total_steps`.
    pub fn progress_bar(
        &self,
        stage: &Stage,
        total_steps: usize,
        step: usize,
    ) -> indicatif::ProgressBar {
        let progress = indicatif::ProgressBar::new(total_steps as u64).with_style(
            indicatif::ProgressStyle::with_template(
                "stage {msg} [{bar:30}] {pos}/{len} steps, {elapsed} < {eta}",
            )
            .expect("valid template"),
        );
        if !self.cluster.is_main() {
            progress.set_draw_target(indicatif::ProgressDrawTarget::hidden());
        }
        progress.set_message(format!("{} {}", stage.number, stage.name));
        progress.set_position(step as u64);
        progress
    }
}

/// SIGTERM or SIGUSR1 (SLURM's warning before the time limit) set the returned flag.
pub(crate) fn stop_on_signals() -> Result<Arc<AtomicBool>> {
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGUSR1] {
        signal_hook::flag::register(signal, Arc::clone(&stop))
            .context("cannot install signal handlers")?;
    }
    Ok(stop)
}
