//! One optimizer step, the same code for training and the benchmark: collate this rank's
//! micro-batches of a global batch -> the stage's passes and backward ([`passes`]) -> one
//! all-reduce of the gradients -> clipping -> AdamW -> the step's metrics, reduced over ranks.
//!
//! The runner owns the stage's optimizer; the loop around it (`train`) decides which global
//! batch comes next, the learning rate, and what happens between steps.

mod passes;

use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{bail, Context, Result};
use tch::{Device, Kind, Tensor};

use modpo_launcher::{Collective, Op};

use crate::data::{collate, BatchPlan, MicroBatch, TokenizedPair};
use crate::logps::{response_lengths, sequence_logps, BatchTensors, RowLayout};
use crate::loss::LengthCorrection;
use crate::method::{AdaLoraTraining, Stage, WeightSampling};
use crate::model::{CausalLm, Conditioning};
use crate::optim::AdamW;
use crate::rank_allocation::RankAllocator;
use crate::reference::ReferenceLogps;

use passes::{accumulate, MicroInputs, Normalisers, StepContext, StepStats};

/// How the passes of a step run, and the settings of the optimizer around them.
#[derive(Debug, Clone)]
pub struct StepSettings {
    /// DPO temperature beta.
    pub beta: f64,
    /// The passes of a step in one forward over replicated rows (else pass by pass).
    pub batch_passes: bool,
    /// Per-decoder-block activation recomputation ([`CausalLm::backward_recomputing`]).
    pub recompute_activations: bool,
    /// Responses a and b in separate forwards instead of one: never faster, kept so the
    /// benchmark can measure what the joint forward saves.
    pub split_responses: bool,
    /// Both responses of a pair in one row after one copy of the prompt, or a row each.
    pub row_layout: RowLayout,
    /// Global gradient-norm clipping; 0 disables it.
    pub max_grad_norm: f64,
    /// AdamW's betas, epsilon and decoupled weight decay.
    pub adam: (f64, f64, f64, f64),
    /// Seed and sampling of the drawn weights ([`WeightSampling::draw`]).
    pub seed: u64,
    pub weight_sampling: WeightSampling,
    /// AdaLoRA adapters' orthogonality penalty and rank allocation (panacea).
    pub adalora: Option<AdaLoraTraining>,
    /// How response length enters every loss's margin.
    pub length_correction: LengthCorrection,
}

/// Where the reference log-probs of a micro-batch come from.
#[derive(Clone, Copy)]
pub enum ReferenceSource<'a> {
    /// Computed once per dataset (what training does).
    Cached(&'a ReferenceLogps),
    /// A forward with the adapters off in every step (the benchmark's ablation).
    EveryStep,
}

/// What one step did, reduced over ranks.
#[derive(Debug, Clone)]
pub struct StepOutcome {
    /// The step's loss (mean over the global batch).
    pub loss: f64,
    /// The gradient norm before clipping.
    pub grad_norm: f64,
    /// Per dimension i, `sums[4 i .. 4 i + 4]`: the sums of chosen reward, rejected reward,
    /// correctly ordered pairs, and the count of pairs with a preference.
    pub dimension_sums: Vec<f64>,
    /// Real tokens through the policy (rows x passes) on every rank.
    pub tokens: i64,
    /// AdaLoRA runs: the orthogonality penalty (part of `loss`) and the kept triplets.
    pub adalora: Option<AdaLoraOutcome>,
    /// Whether any rank asked to stop (a signal) by the time the step's metrics were reduced.
    pub stop_requested: bool,
}

/// What AdaLoRA's extras did in a step.
#[derive(Debug, Clone, Copy)]
pub struct AdaLoraOutcome {
    /// The weighted orthogonality penalty added to the loss.
    pub orth_penalty: f64,
    /// SVD triplets kept by the rank allocator after the step, over the whole model.
    pub kept_triplets: i64,
}

/// Runs the optimizer steps of one stage.
pub struct StepRunner<'a> {
    model: &'a CausalLm,
    stage: &'a Stage,
    settings: StepSettings,
    collective: &'a dyn Collective,
    batch_plan: BatchPlan,
    rank: usize,
    k: usize,
    pad_token_id: u32,
    device: Device,
    /// Names of the trainable tensors, in the optimizer's order.
    pub param_names: Vec<String>,
    pub optimizer: AdamW,
    /// AdaLoRA's rank allocation, after each optimizer step.
    pub rank_allocator: Option<RankAllocator>,
}

impl<'a> StepRunner<'a> {
    /// Freezes what `stage` does not train and builds AdamW over the rest (and the rank
    /// allocator of AdaLoRA adapters). `batch_plan` says how a global batch splits over the
    /// ranks and micro-batches of this job.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        model: &'a CausalLm,
        stage: &'a Stage,
        settings: StepSettings,
        collective: &'a dyn Collective,
        batch_plan: BatchPlan,
        rank: usize,
        k: usize,
        pad_token_id: u32,
    ) -> Result<Self> {
        let (param_names, params): (Vec<String>, Vec<Tensor>) =
            stage.trainable.apply(model).into_iter().unzip();
        let (beta1, beta2, eps, weight_decay) = settings.adam;
        let rank_allocator = settings
            .adalora
            .map(|a| RankAllocator::new(model, a.schedule))
            .transpose()?;
        Ok(StepRunner {
            model,
            stage,
            device: model.embedding_device(),
            settings,
            collective,
            batch_plan,
            rank,
            k,
            pad_token_id,
            param_names,
            optimizer: AdamW::new(params, beta1, beta2, eps, weight_decay),
            rank_allocator,
        })
    }

    /// One optimizer step over the global batch `global` (ids into `pairs`), the stage's
    /// `step`-th (0-based, it seeds the drawn weights), at learning rate `lr`. A non-finite
    /// loss or gradient norm is an error raised before the update.
    pub fn step(
        &mut self,
        pairs: &[TokenizedPair],
        global: &[usize],
        reference: ReferenceSource,
        step: usize,
        lr: f64,
        stop: &AtomicBool,
    ) -> Result<StepOutcome> {
        let (stats, penalty) = self.backward(pairs, global, reference, step);
        let mut outcome = self.update(stats, lr, step, stop)?;
        outcome.adalora = self
            .rank_allocator
            .as_ref()
            .map(|allocator| AdaLoraOutcome {
                orth_penalty: penalty,
                kept_triplets: allocator.kept(),
            });
        Ok(outcome)
    }

    /// The step's loss and gradients without the update, for checking a step against a
    /// reference: the backward of this rank's micro-batches and the penalty, then the
    /// all-reduce over ranks, i.e. what [`StepRunner::step`] hands to clipping and AdamW.
    /// Returns the loss (mean over the global batch) and each trainable tensor's gradient by
    /// name, and clears the gradients.
    pub fn gradients(
        &mut self,
        pairs: &[TokenizedPair],
        global: &[usize],
        reference: ReferenceSource,
        step: usize,
    ) -> Result<(f64, Vec<(String, Tensor)>)> {
        let (stats, _) = self.backward(pairs, global, reference, step);
        self.reduce_gradients()?;
        let mut loss = [stats.sums.double_value(&[0])];
        self.collective
            .all_reduce_f64(&mut loss, Op::Sum)
            .context("reducing the step's loss")?;
        let gradients = self
            .param_names
            .iter()
            .zip(&self.optimizer.params)
            .map(|(name, p)| (name.clone(), p.grad().copy()))
            .collect();
        self.optimizer.zero_grad();
        Ok((loss[0], gradients))
    }

    /// The passes and backward of this rank's micro-batches of `global`, then the AdaLoRA
    /// penalty: gradients accumulate in `.grad`. Returns the statistics and the penalty.
    fn backward(
        &self,
        pairs: &[TokenizedPair],
        global: &[usize],
        reference: ReferenceSource,
        step: usize,
    ) -> (StepStats, f64) {
        let (k, device) = (self.k, self.device);
        let selected: Vec<&TokenizedPair> = global.iter().map(|&i| &pairs[i]).collect();
        let norms = Normalisers::of(&selected, k, self.batch_plan.world_size);
        let drawn = self.stage.step.draws_weights().then(|| {
            self.settings.weight_sampling.draw(
                self.settings.seed,
                self.stage.number,
                step,
                global.len(),
                k,
            )
        });
        let context = StepContext {
            model: self.model,
            plan: self.stage.step,
            beta: self.settings.beta,
            batch_passes: self.settings.batch_passes,
            recompute_activations: self.settings.recompute_activations,
            split_responses: self.settings.split_responses,
            length_correction: self.settings.length_correction,
            k,
        };
        let mut stats = StepStats::new(k, device);
        for micro in self.batch_plan.shard(global, self.rank) {
            let micro_pairs: Vec<&TokenizedPair> = micro.iter().map(|&i| &pairs[i]).collect();
            let batch = collate(&micro_pairs, self.pad_token_id);
            let tensors = BatchTensors::with_layout(&batch, self.settings.row_layout, device);
            let (reference_a, reference_b) = match reference {
                ReferenceSource::Cached(cached) => cached.gather(&batch.pair_ids, device),
                ReferenceSource::EveryStep => {
                    tch::no_grad(|| sequence_logps(self.model, &tensors, Conditioning::Reference))
                }
            };
            let inputs = MicroInputs {
                tensors: &tensors,
                reference_a,
                reference_b,
                preferences: Tensor::from_slice(&batch.preferences)
                    .view([batch.pairs as i64, k as i64])
                    .to_device(device),
                drawn_weights: drawn
                    .as_ref()
                    .map(|w| micro_weights(w, global, &batch, k, device)),
                lengths: response_lengths(&micro_pairs, device),
            };
            accumulate(&context, &inputs, &norms, &mut stats);
        }
        let penalty = self.add_orthogonality_penalty(&mut stats);
        (stats, penalty)
    }

    /// AdaLoRA's orthogonality penalty, once per optimizer step (as PEFT adds it once to the
    /// loss of a forward). Every rank adds its gradient, so the mean over ranks is that
    /// gradient once; only rank 0 adds its value to the summed loss. Returns the penalty.
    fn add_orthogonality_penalty(&self, stats: &mut StepStats) -> f64 {
        let Some(adalora) = self.settings.adalora else {
            return 0.0;
        };
        if adalora.orth_reg_weight == 0.0 {
            return 0.0;
        }
        let penalty = self.model.orthogonality_penalty() * adalora.orth_reg_weight;
        penalty.backward();
        if self.rank == 0 {
            let mut loss = stats.sums.narrow(0, 0, 1);
            let _ = loss.g_add_(
                &penalty
                    .detach()
                    .to_kind(Kind::Double)
                    .to_device(self.device),
            );
        }
        penalty.double_value(&[])
    }

    /// The all-reduce of the optimizer's flat gradient buffers, one per dtype, in place (their
    /// mean over ranks), so that every rank then makes the same update.
    fn reduce_gradients(&self) -> Result<()> {
        let mut grads = self.optimizer.gradient_buffers();
        self.collective
            .all_reduce_mean(&mut grads)
            .context("all-reduce of the gradients")
    }

    /// All-reduce of the gradients, clipping, the metrics reduced over ranks (with this rank's
    /// `stop` flag as it is after the backward: one collective, and a sum above 0 means some
    /// rank asked), then (if both are finite) the AdamW update.
    fn update(
        &mut self,
        stats: StepStats,
        lr: f64,
        step: usize,
        stop: &AtomicBool,
    ) -> Result<StepOutcome> {
        self.reduce_gradients()?;
        let grad_norm = self.optimizer.clip_grad_norm(self.settings.max_grad_norm);
        let mut sums =
            Vec::<f64>::try_from(stats.sums.to_device(Device::Cpu).to_kind(Kind::Double))?;
        sums.push(stats.tokens as f64);
        sums.push(f64::from(u8::from(stop.load(Ordering::SeqCst))));
        self.collective
            .all_reduce_f64(&mut sums, Op::Sum)
            .context("reducing the step's metrics")?;
        let stop_requested = sums.pop().unwrap_or(0.0) > 0.0;
        let tokens = sums.pop().unwrap_or(0.0) as i64;
        let loss = sums[0];
        if !loss.is_finite() || !grad_norm.is_finite() {
            bail!(
                "stage {} step {step}: the loss is {loss} and the gradient norm {grad_norm}; \
                 stopping before the update (the last checkpoint is left as it was)",
                self.stage.number,
            );
        }
        self.optimizer.step(lr);
        if let Some(allocator) = &mut self.rank_allocator {
            // After the update and before the gradients are cleared, as PEFT documents it.
            allocator.update_and_allocate(step);
        }
        self.optimizer.zero_grad();
        Ok(StepOutcome {
            loss,
            grad_norm,
            dimension_sums: sums.split_off(1),
            tokens,
            adalora: None,
            stop_requested,
        })
    }
}

/// The drawn weights of a micro-batch's rows, looked up by each pair's position in the global
/// batch (`drawn[j]` belongs to `global[j]`): [B, k]
fn micro_weights(
    drawn: &[Vec<f32>],
    global: &[usize],
    batch: &MicroBatch,
    k: usize,
    device: Device,
) -> Tensor {
    let rows: Vec<f32> = batch
        .pair_ids
        .iter()
        .flat_map(|id| {
            let position = global
                .iter()
                .position(|g| g == id)
                .expect("pair of this batch");
            drawn[position].clone()
        })
        .collect();
    Tensor::from_slice(&rows)
        .view([batch.pairs as i64, k as i64])
        .to_device(device)
}

#[cfg(test)]
mod tests;
