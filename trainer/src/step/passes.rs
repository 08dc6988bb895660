//! One micro-batch of one optimizer step: the passes of the stage's [`StepPlan`], their losses
//! and backward (gradients accumulate in the adapters' `.grad`), and the statistics the loop
//! logs. The passes run either as one forward over replicated rows with per-row `w`, or pass
//! by pass with a backward after each (less memory); both give the same gradients.
//!
//! What each pass's loss is comes from the plan ([`UnitPasses`], [`DrawnLoss::per_row`]); this
//! file only runs the passes.

use tch::{Kind, Tensor};

use crate::data::{Preference, TokenizedPair};
use crate::logps::{
    logps_from_scored, pair_logps_from_scored, per_row, sequence_logps, BatchTensors, RowLayout,
};
use crate::loss;
use crate::method::{StepPlan, UnitPasses};
use crate::model::{CausalLm, Conditioning};

/// Divisors of a global batch's losses. They are computed from the whole global batch, which
/// every rank knows, so they are the same on every rank and for any split into micro-batches:
/// N ranks x 1 accumulation step and 1 rank x N steps give the same update.
#[derive(Debug, Clone)]
pub struct Normalisers {
    /// Pairs in the global batch (KL, linear scalarisation, shared DPO).
    pub pairs: f64,
    /// Pairs with a preference in dimension i (L_DPO,i is their mean), at least 1.
    pub preferred: Vec<f64>,
    /// Gradients are averaged over ranks, so each rank's sum is scaled up by the world size.
    pub world_size: f64,
}

impl Normalisers {
    /// global_batch: every pair of the global batch (k preferences each).
    pub fn of(global_batch: &[&TokenizedPair], k: usize, world_size: usize) -> Self {
        let preferred = (0..k)
            .map(|i| {
                global_batch
                    .iter()
                    .filter(|p| p.preferences[i] != Preference::None)
                    .count()
                    .max(1) as f64
            })
            .collect();
        Normalisers {
            pairs: global_batch.len().max(1) as f64,
            preferred,
            world_size: world_size as f64,
        }
    }
}

/// A micro-batch ready for the passes.
pub struct MicroInputs<'a> {
    pub tensors: &'a BatchTensors,
    /// log pi_ref(y_a | x), log pi_ref(y_b | x): [B]
    pub reference_a: Tensor,
    pub reference_b: Tensor,
    /// [B, k] in {-1, 0, +1}
    pub preferences: Tensor,
    /// [B, k] drawn weights of the last pass, for plans that draw.
    pub drawn_weights: Option<Tensor>,
    /// Response lengths in tokens `(|y_a|, |y_b|)`: [B] f32 each.
    pub lengths: (Tensor, Tensor),
}

/// Per-step statistics, summed over micro-batches (then over ranks): one f64 tensor
/// `[1 + 4k]`: the loss, then for each dimension the sums of chosen reward, rejected reward,
/// correctly ordered pairs, and the count of pairs with a preference.
pub struct StepStats {
    pub sums: Tensor,
    pub tokens: i64,
}

impl StepStats {
    pub fn new(k: usize, device: tch::Device) -> Self {
        StepStats {
            sums: Tensor::zeros([1 + 4 * k as i64], (Kind::Double, device)),
            tokens: 0,
        }
    }
}

/// The model and settings shared by every micro-batch of a stage.
pub struct StepContext<'a> {
    pub model: &'a CausalLm,
    pub plan: StepPlan,
    pub beta: f64,
    /// The passes of a step in one forward over replicated rows (else pass by pass).
    pub batch_passes: bool,
    /// Per-decoder-block activation recomputation ([`CausalLm::backward_recomputing`]).
    pub recompute_activations: bool,
    /// Responses a and b in separate forwards instead of one: never faster, kept so the
    /// benchmark can measure what the joint forward saves.
    pub split_responses: bool,
    /// How response length enters every loss's margin.
    pub length_correction: loss::LengthCorrection,
    pub k: usize,
}

/// w = 1_i for every row: [B, k]
fn unit_weights(b: i64, k: usize, i: usize, device: tch::Device) -> Tensor {
    let w = Tensor::zeros([b, k as i64], (Kind::Float, device));
    let _ = w.narrow(1, i as i64, 1).fill_(1.0);
    w
}

/// `u(y_a; w)` and `u(y_b; w)` of one pass: log-ratios of policy to reference, each [B].
struct PassRewards {
    a: Tensor,
    b: Tensor,
}

impl PassRewards {
    fn new(reference: (&Tensor, &Tensor), (logp_a, logp_b): (Tensor, Tensor)) -> Self {
        PassRewards {
            a: logp_a - reference.0,
            b: logp_b - reference.1,
        }
    }

    fn detach(&self) -> PassRewards {
        PassRewards {
            a: self.a.detach(),
            b: self.b.detach(),
        }
    }
}

/// `(log pi(y_a), log pi(y_b))` ([B] each) with responses a and b in two forwards (rows of
/// one response each).
fn split_pair_logps(
    model: &CausalLm,
    batch: &BatchTensors,
    cond: Conditioning,
) -> (Tensor, Tensor) {
    assert_eq!(
        batch.layout(),
        RowLayout::ResponsePerRow,
        "responses in separate forwards need a row per response"
    );
    let (b, n_a) = (batch.pairs, batch.a_predictors);
    let n_b = batch.predictors.size()[0] - n_a;
    // Rows [first_row, first_row + B) and their scored tokens [first, first + n).
    let half = |first_row: i64, first: i64, n: i64| {
        let ids = batch.input_ids.narrow(0, first_row, b); // [B, T]
        let mask = batch.attention_mask.narrow(0, first_row, b);
        let take = |x: &Tensor| x.narrow(0, first, n);
        // Positions and slots count from this half's first row.
        let predictors = take(&batch.predictors) - first_row * batch.seq_len();
        let scored = model.hidden_states_at(&ids, &model.padded_layout(&mask), cond, &predictors);
        logps_from_scored(
            model,
            &scored,
            &take(&batch.targets),
            &(take(&batch.slots) - first_row),
            b,
        )
    };
    (half(0, 0, n_a), half(b, n_a, n_b))
}

/// One forward of `batch` (conditioning per pair), the loss `loss_of` builds from
/// `(log pi(y_a), log pi(y_b))` ([B] each), and its backward; returns what `loss_of` returns
/// besides the loss.
fn forward_backward<R>(
    ctx: &StepContext,
    batch: &BatchTensors,
    conditioning: Conditioning,
    loss_of: impl FnOnce(Tensor, Tensor) -> (Tensor, R),
) -> R {
    if ctx.recompute_activations {
        let rows = per_row(batch, conditioning);
        return ctx.model.backward_recomputing(
            &batch.input_ids,
            &batch.token_layout(ctx.model),
            rows.as_conditioning(),
            &batch.predictors,
            |scored| {
                let (a, b) = pair_logps_from_scored(ctx.model, batch, scored);
                loss_of(a, b)
            },
        );
    }
    let (logp_a, logp_b) = match ctx.split_responses {
        true => split_pair_logps(ctx.model, batch, conditioning),
        false => sequence_logps(ctx.model, batch, conditioning),
    };
    let (loss, out) = loss_of(logp_a, logp_b);
    loss.backward();
    out
}

/// The losses of one micro-batch, from the rewards of its passes.
struct MicroLosses<'a> {
    ctx: &'a StepContext<'a>,
    inputs: &'a MicroInputs<'a>,
    norms: &'a Normalisers,
}

impl MicroLosses<'_> {
    /// The margin of a pass as every loss sees it: `u(y_a; w) - u(y_b; w)`, or its
    /// length-corrected form ([`loss::LengthCorrection`]): [B]
    fn margin(&self, pass: &PassRewards) -> Tensor {
        let (length_a, length_b) = &self.inputs.lengths;
        self.ctx
            .length_correction
            .margin(&pass.a, &pass.b, (length_a, length_b), self.ctx.beta)
    }

    /// L_DPO,i of pass i at w = 1_i, this rank's share of the global batch's mean.
    fn dimension(&self, i: usize, pass: &PassRewards) -> Tensor {
        let preference = self.inputs.preferences.select(1, i as i64);
        loss::dpo(&self.margin(pass), &preference, self.ctx.beta).sum(Kind::Float)
            * (self.norms.world_size / self.norms.preferred[i])
    }

    /// DPO at w = 0 on the preference every dimension with one shares (stage 1: they agree).
    fn shared(&self, pass: &PassRewards) -> Tensor {
        let shared = self
            .inputs
            .preferences
            .sum_dim_intlist(1, false, Kind::Int64)
            .sign();
        loss::dpo(&self.margin(pass), &shared, self.ctx.beta).sum(Kind::Float)
            * (self.norms.world_size / self.norms.pairs)
    }

    /// The drawn pass's loss, given the unit passes' detached rewards.
    fn drawn(&self, drawn: &PassRewards, unit: &[PassRewards]) -> Tensor {
        let plan = self.ctx.plan.drawn.expect("this plan has a drawn pass");
        let w = self
            .inputs
            .drawn_weights
            .as_ref()
            .expect("this plan draws weights");
        let unit_margins: Vec<Tensor> = unit.iter().map(|u| self.margin(u)).collect();
        let rows = plan.per_row(
            &self.margin(drawn),
            &unit_margins,
            &self.inputs.preferences,
            w,
            self.ctx.beta,
        );
        rows.sum(Kind::Float) * (self.norms.world_size / self.norms.pairs)
    }
}

/// Runs the passes of one micro-batch, backpropagates its share of the step's loss and adds
/// its statistics to `stats`. Nothing here waits on the device.
pub fn accumulate(
    ctx: &StepContext,
    inputs: &MicroInputs,
    norms: &Normalisers,
    stats: &mut StepStats,
) {
    let t = inputs.tensors;
    stats.tokens += t.tokens * ctx.plan.passes(ctx.k) as i64;
    let losses = MicroLosses { ctx, inputs, norms };
    let (loss, unit_passes) = match ctx.plan.unit {
        UnitPasses::Shared => shared_pass(&losses),
        UnitPasses::PerDimension if ctx.batch_passes => batched_passes(&losses),
        UnitPasses::PerDimension => passes_one_by_one(&losses),
    };
    add_statistics(ctx, inputs, norms, &loss, &unit_passes, stats);
}

/// Stage 1: one pass at w = 0. Returns the loss and the pass's detached rewards, once per
/// dimension (the statistics of every dimension are those of the one pass).
fn shared_pass(losses: &MicroLosses) -> (Tensor, Vec<PassRewards>) {
    let (ctx, inputs) = (losses.ctx, losses.inputs);
    let reference = (&inputs.reference_a, &inputs.reference_b);
    let (loss, pass) = forward_backward(ctx, inputs.tensors, Conditioning::SharedOnly, |a, b| {
        let pass = PassRewards::new(reference, (a, b));
        let loss = losses.shared(&pass);
        (loss.shallow_clone(), (loss.detach(), pass.detach()))
    });
    (loss, (0..ctx.k).map(|_| pass.detach()).collect())
}

/// The weights of the passes: 1_i for each dimension, then the drawn ones if the plan draws.
fn pass_weights(ctx: &StepContext, inputs: &MicroInputs) -> Vec<Tensor> {
    let (b, device) = (inputs.tensors.pairs, inputs.tensors.input_ids.device());
    let mut weights: Vec<Tensor> = (0..ctx.k)
        .map(|i| unit_weights(b, ctx.k, i, device))
        .collect();
    if ctx.plan.draws_weights() {
        let drawn = inputs
            .drawn_weights
            .as_ref()
            .expect("this plan draws weights");
        weights.push(drawn.shallow_clone());
    }
    weights
}

/// Every pass in one forward over replicated rows with per-row w.
fn batched_passes(losses: &MicroLosses) -> (Tensor, Vec<PassRewards>) {
    let (ctx, inputs) = (losses.ctx, losses.inputs);
    let t = inputs.tensors;
    let (b, k) = (t.pairs, ctx.k);
    let reference = (&inputs.reference_a, &inputs.reference_b);
    let weights = pass_weights(ctx, inputs);
    let passes = weights.len() as i64;
    let all_w = Tensor::cat(&weights, 0); // [P B, k]
    let replicated = t.replicated(passes);
    forward_backward(ctx, &replicated, Conditioning::Weighted(&all_w), |a, b_| {
        let chunk = |x: &Tensor, p: i64| x.narrow(0, p * b, b);
        let passes: Vec<PassRewards> = (0..passes)
            .map(|p| PassRewards::new(reference, (chunk(&a, p), chunk(&b_, p))))
            .collect();
        let unit: Vec<PassRewards> = passes[..k].iter().map(PassRewards::detach).collect();
        let mut loss = Tensor::zeros([], (Kind::Float, t.input_ids.device()));
        for (i, pass) in passes[..k].iter().enumerate() {
            loss += losses.dimension(i, pass);
        }
        if ctx.plan.draws_weights() {
            loss += losses.drawn(&passes[k], &unit);
        }
        (loss.shallow_clone(), (loss.detach(), unit))
    })
}

/// Pass by pass: a backward right after each forward frees its activations; the detached
/// rewards are kept for the teacher of the last pass.
fn passes_one_by_one(losses: &MicroLosses) -> (Tensor, Vec<PassRewards>) {
    let (ctx, inputs) = (losses.ctx, losses.inputs);
    let t = inputs.tensors;
    let reference = (&inputs.reference_a, &inputs.reference_b);
    let mut total = Tensor::zeros([], (Kind::Float, t.input_ids.device()));
    let mut unit = Vec::with_capacity(ctx.k);
    for i in 0..ctx.k {
        // w = 1_i in every row: the k - 1 zero-weight dimension blocks are skipped.
        let conditioning = Conditioning::Dimension(i as i64);
        let (l, pass) = forward_backward(ctx, t, conditioning, |a, b| {
            let pass = PassRewards::new(reference, (a, b));
            let l = losses.dimension(i, &pass);
            (l.shallow_clone(), (l.detach(), pass.detach()))
        });
        total += l;
        unit.push(pass);
    }
    if ctx.plan.draws_weights() {
        let drawn = inputs
            .drawn_weights
            .as_ref()
            .expect("this plan draws weights"); // [B, k]
        let l = forward_backward(ctx, t, Conditioning::Weighted(drawn), |a, b| {
            let l = losses.drawn(&PassRewards::new(reference, (a, b)), &unit);
            (l.shallow_clone(), l.detach())
        });
        total += l;
    }
    (total, unit)
}

/// Statistics at w = 1_i (w = 0 in stage 1) over the pairs where dimension i has a
/// preference: implicit rewards beta * u of the response it prefers (chosen) and of the
/// other (rejected), and whether the chosen one scores higher.
fn add_statistics(
    ctx: &StepContext,
    inputs: &MicroInputs,
    norms: &Normalisers,
    loss: &Tensor,
    unit_passes: &[PassRewards],
    stats: &mut StepStats,
) {
    let beta = ctx.beta;
    let _no_grad = tch::no_grad_guard();
    let mut parts = vec![(loss.to_kind(Kind::Double) / norms.world_size).reshape([1])];
    for (i, pass) in unit_passes.iter().enumerate() {
        let sign = inputs.preferences.select(1, i as i64).to_kind(Kind::Double); // [B]
        let preferred = sign.abs();
        let prefers_a = sign.gt(0.0);
        let (reward_a, reward_b) = (
            pass.a.to_kind(Kind::Double) * beta,
            pass.b.to_kind(Kind::Double) * beta,
        );
        let chosen = reward_a.where_self(&prefers_a, &reward_b);
        let rejected = reward_b.where_self(&prefers_a, &reward_a);
        let correct = chosen.gt_tensor(&rejected).to_kind(Kind::Double);
        parts.push(Tensor::stack(
            &[
                (chosen * &preferred).sum(Kind::Double),
                (rejected * &preferred).sum(Kind::Double),
                (correct * &preferred).sum(Kind::Double),
                preferred.sum(Kind::Double),
            ],
            0,
        ));
    }
    stats.sums += Tensor::cat(&parts, 0);
}
