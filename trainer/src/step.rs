//! One micro-batch of one optimizer step: the passes of the stage's [`StepPlan`], their losses
//! and backward (gradients accumulate in the adapters' `.grad`), and the statistics the loop
//! logs. The passes run either as one forward over replicated rows with per-row `w`, or pass
//! by pass with a backward after each (less memory); both give the same gradients.

use tch::{Kind, Tensor};

use crate::data::{Preference, TokenizedPair};
use crate::logps::{
    logps_from_hidden, pair_logps_from_hidden, per_row, sequence_logps, BatchTensors, RowLayout,
};
use crate::loss;
use crate::method::StepPlan;
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
    pub k: usize,
}

impl<'a> StepContext<'a> {
    /// The training defaults: passes batched, no recomputation, joint forward.
    pub fn new(model: &'a CausalLm, plan: StepPlan, beta: f64, k: usize) -> Self {
        StepContext {
            model,
            plan,
            beta,
            batch_passes: true,
            recompute_activations: false,
            split_responses: false,
            k,
        }
    }
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

    /// u(y_a; w) - u(y_b; w): [B]
    fn margin(&self) -> Tensor {
        &self.a - &self.b
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
        let hidden = model.hidden_states(&ids, &mask, cond);
        let take = |x: &Tensor| x.narrow(0, first, n);
        // Positions and slots count from this half's first row.
        logps_from_hidden(
            model,
            &hidden,
            &(take(&batch.predictors) - first_row * batch.seq_len()),
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
            |hidden| {
                let (a, b) = pair_logps_from_hidden(ctx.model, batch, hidden);
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

/// Runs the passes of one micro-batch, backpropagates its share of the step's loss and adds
/// its statistics to `stats`. Nothing here waits on the device.
pub fn accumulate(
    ctx: &StepContext,
    inputs: &MicroInputs,
    norms: &Normalisers,
    stats: &mut StepStats,
) {
    let t = inputs.tensors;
    let (b, device, beta, k) = (t.pairs, t.input_ids.device(), ctx.beta, ctx.k);
    let reference = (&inputs.reference_a, &inputs.reference_b);
    stats.tokens += t.tokens * ctx.plan.passes(k) as i64;
    let dimension_loss = |i: usize, pass: &PassRewards| {
        loss::dpo(
            &pass.margin(),
            &inputs.preferences.select(1, i as i64),
            beta,
        )
        .sum(Kind::Float)
            * (norms.world_size / norms.preferred[i])
    };
    let plan = ctx.plan;
    let draws = plan.draws_weights();
    // The last pass's loss at the drawn w: the KL to the teacher built from the unit passes'
    // detached margins (curriculum stage 3), or linear scalarisation (Panacea).
    let drawn_loss = |drawn: &PassRewards, unit: &[PassRewards]| -> Tensor {
        let w = inputs
            .drawn_weights
            .as_ref()
            .expect("this plan draws weights");
        let rows = match plan {
            StepPlan::PerDimensionDpoAndKl => {
                let margins: Vec<Tensor> = unit.iter().map(PassRewards::margin).collect();
                let teacher = loss::teacher_logit(&Tensor::stack(&margins, 1), w, beta);
                loss::bernoulli_kl(&teacher, &(drawn.margin() * beta))
            }
            _ => loss::linear_scalarisation(&drawn.margin(), &inputs.preferences, w, beta),
        };
        rows.sum(Kind::Float) * (norms.world_size / norms.pairs)
    };

    let (loss, unit_passes): (Tensor, Vec<PassRewards>) = if plan == StepPlan::SharedDpo {
        // Every dimension with a preference agrees: their sign is the pair's preference.
        let shared = inputs
            .preferences
            .sum_dim_intlist(1, false, Kind::Int64)
            .sign();
        let (loss, pass) = forward_backward(ctx, t, Conditioning::SharedOnly, |a, b| {
            let pass = PassRewards::new(reference, (a, b));
            let loss = loss::dpo(&pass.margin(), &shared, beta).sum(Kind::Float)
                * (norms.world_size / norms.pairs);
            (loss.shallow_clone(), (loss.detach(), pass.detach()))
        });
        (loss, (0..k).map(|_| pass.detach()).collect())
    } else {
        let mut weights: Vec<Tensor> = (0..k).map(|i| unit_weights(b, k, i, device)).collect();
        if draws {
            weights.push(
                inputs
                    .drawn_weights
                    .as_ref()
                    .expect("this plan draws weights")
                    .shallow_clone(),
            );
        }
        if ctx.batch_passes {
            // All passes in one forward over replicated rows with per-row w.
            let passes = weights.len() as i64;
            let all_w = Tensor::cat(&weights, 0); // [P B, k]
            let replicated = t.replicated(passes);
            forward_backward(ctx, &replicated, Conditioning::Weighted(&all_w), |a, b_| {
                let chunk = |x: &Tensor, p: i64| x.narrow(0, p * b, b);
                let passes: Vec<PassRewards> = (0..passes)
                    .map(|p| PassRewards::new(reference, (chunk(&a, p), chunk(&b_, p))))
                    .collect();
                let unit: Vec<PassRewards> = passes[..k].iter().map(PassRewards::detach).collect();
                let mut loss = Tensor::zeros([], (Kind::Float, device));
                for (i, pass) in passes[..k].iter().enumerate() {
                    loss += dimension_loss(i, pass);
                }
                if draws {
                    loss += drawn_loss(&passes[k], &unit);
                }
                (loss.shallow_clone(), (loss.detach(), unit))
            })
        } else {
            // Pass by pass: a backward right after each forward frees its activations; the
            // detached rewards are kept for the teacher of the last pass.
            let mut total = Tensor::zeros([], (Kind::Float, device));
            let mut unit = Vec::with_capacity(k);
            for (i, w) in weights.iter().take(k).enumerate() {
                let (l, pass) = forward_backward(ctx, t, Conditioning::Weighted(w), |a, b| {
                    let pass = PassRewards::new(reference, (a, b));
                    let l = dimension_loss(i, &pass);
                    (l.shallow_clone(), (l.detach(), pass.detach()))
                });
                total += l;
                unit.push(pass);
            }
            if draws {
                let l = forward_backward(ctx, t, Conditioning::Weighted(&weights[k]), |a, b| {
                    let l = drawn_loss(&PassRewards::new(reference, (a, b)), &unit);
                    (l.shallow_clone(), l.detach())
                });
                total += l;
            }
            (total, unit)
        }
    };

    // Statistics at w = 1_i (w = 0 in stage 1) over the pairs where dimension i has a
    // preference: implicit rewards beta * u of the response it prefers (chosen) and of the
    // other (rejected), and whether the chosen one scores higher.
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
