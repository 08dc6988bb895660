//! AdaLoRA's rank allocation, as PEFT's `RankAllocator` and `AdaLoraModel.update_and_allocate`
//! do it (peft 0.21.2, `tuners/adalora/layer.py` and `model.py`), over the SVD triplets of every
//! AdaLoRA block of the model.
//!
//! After each optimizer step (`step` 0-based, the gradients still in `.grad`):
//! - every parameter's sensitivity `I = |theta * grad|` is smoothed,
//!   `I_bar = beta1 I_bar + (1 - beta1) I`, and its uncertainty
//!   `U_bar = beta2 U_bar + (1 - beta2) |I - I_bar|`; an entry's score is `I_bar * U_bar`;
//! - a triplet's score is its lambda's score plus the mean score of its row of Q and the mean
//!   score of its column of P;
//! - the budget (triplets kept over the whole model) falls from `init_rank` per block to
//!   `target_rank` per block on a cubic schedule between `tinit` and `total_step - tfinal`,
//!   re-allocated every `delta_t` steps: every triplet scoring at or below the
//!   (initial - budget)-th smallest score gets lambda = 0;
//! - at `step == total_step - tfinal` the last allocation is fixed (and the averages reset);
//!   after it, every step re-applies that mask.
//!
//! Choice (METHOD.md section 5): one budget over every block of every projection, the k + 1
//! modules of a projection counting as PEFT's layers. The averages are checkpointed with the
//! optimizer ([`RankAllocator::state`]); which triplets are kept is an adapter variable
//! (`*_kept`), so the adapter file says which ranks an export keeps.

use std::collections::HashMap;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::model::CausalLm;

/// The budget schedule and the averages' factors (PEFT's `AdaLoraConfig` names in brackets).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AllocationSchedule {
    /// Triplets per block at the start (`init_r`): the blocks' size.
    pub init_rank: i64,
    /// Average triplets per block at the end (`target_r`).
    pub target_rank: i64,
    /// Steps at the full budget before allocation starts (`tinit`).
    pub tinit: usize,
    /// Steps at the end with the final allocation fixed (`tfinal`).
    pub tfinal: usize,
    /// Steps between re-allocations (`deltaT`).
    pub delta_t: usize,
    pub beta1: f64,
    pub beta2: f64,
    /// Optimizer steps of the run (`total_step`).
    pub total_step: usize,
}

impl AllocationSchedule {
    /// PEFT's check: there must be a budgeting phase.
    pub fn validate(&self) -> Result<()> {
        if self.tinit + self.tfinal >= self.total_step {
            bail!(
                "AdaLoRA's schedule has no budgeting phase: method.tinit = {} and method.tfinal = \
                 {} leave nothing of the stage's {} steps (need tinit < steps - tfinal)",
                self.tinit,
                self.tfinal,
                self.total_step
            );
        }
        Ok(())
    }

    /// The budget of `step` and whether to re-allocate in it (PEFT `budget_schedule`).
    pub fn budget(&self, step: usize, init_budget: i64, target_budget: i64) -> (i64, bool) {
        let end = self.total_step - self.tfinal;
        if step <= self.tinit {
            (init_budget, false)
        } else if step > end {
            (target_budget, true)
        } else {
            let progress = (step - self.tinit) as f64 / (end - self.tinit) as f64;
            let remaining = 1.0 - progress;
            // Python's `int(...)` truncates; `powf` is C's pow, as Python's `**` on floats.
            let budget = ((init_budget - target_budget) as f64 * remaining.powf(3.0)
                + target_budget as f64) as i64;
            (budget, step.is_multiple_of(self.delta_t))
        }
    }
}

/// The smoothed sensitivity and uncertainty of one parameter tensor.
struct Averages {
    sensitivity: Tensor,
    uncertainty: Tensor,
}

/// One AdaLoRA block group of a projection (the shared block, or the stacked dimension blocks):
/// its triplets' Q rows, lambdas and P columns.
struct TripletGroup {
    /// `model.layers.0.self_attn.q_proj.shared`: the parameters are `{name}_a`, `_e`, `_b`.
    name: String,
    /// Q [rows, in], lambda [rows], P [out, rows], kept [rows].
    q: Tensor,
    lambda: Tensor,
    p: Tensor,
    kept: Tensor,
    /// Of Q, lambda, P in that order.
    averages: [Averages; 3],
}

const PARTS: [&str; 3] = ["a", "e", "b"];

impl TripletGroup {
    /// Triplet scores [rows]: lambda's score + the mean score of the Q row + the mean score of
    /// the P column (PEFT `_combine_ipt`).
    fn scores(&self) -> Tensor {
        let score = |a: &Averages| &a.sensitivity * &a.uncertainty;
        let [q, lambda, p] = &self.averages;
        let q_rows = score(q).mean_dim([1i64].as_slice(), false, Kind::Float);
        let p_columns = score(p).mean_dim([0i64].as_slice(), false, Kind::Float);
        score(lambda) + (q_rows + p_columns)
    }
}

/// The rank allocator of one training stage.
pub struct RankAllocator {
    schedule: AllocationSchedule,
    groups: Vec<TripletGroup>,
    /// Triplets in the model (PEFT `init_bgt`) and the final budget (`target_bgt`).
    init_budget: i64,
    target_budget: i64,
}

impl RankAllocator {
    /// Over every AdaLoRA block of `model`. Errors if the model has no AdaLoRA adapters.
    pub fn new(model: &CausalLm, schedule: AllocationSchedule) -> Result<Self> {
        schedule.validate()?;
        let mut groups = Vec::new();
        let mut blocks = 0;
        for (module, projection) in model.projections() {
            let Some(adapter) = &projection.adapter else {
                continue;
            };
            for (group_name, pair) in adapter.groups() {
                let Some(singular) = &pair.singular else {
                    bail!("rank allocation needs AdaLoRA adapters; {module} has LoRA");
                };
                let zeros = |t: &Tensor| Averages {
                    sensitivity: t.zeros_like().detach(),
                    uncertainty: t.zeros_like().detach(),
                };
                let (q, lambda, p) = (&pair.a, &singular.values, &pair.b);
                if q.size()[0] == 0 {
                    continue; // k = 0: no dimension blocks
                }
                blocks += q.size()[0] / schedule.init_rank;
                groups.push(TripletGroup {
                    name: format!("{module}.{group_name}"),
                    averages: [zeros(q), zeros(lambda), zeros(p)],
                    q: q.shallow_clone(),
                    lambda: lambda.shallow_clone(),
                    p: p.shallow_clone(),
                    kept: singular.kept.shallow_clone(),
                });
            }
        }
        if groups.is_empty() {
            bail!("rank allocation needs AdaLoRA adapters; the model has none");
        }
        let init_budget = groups.iter().map(|g| g.q.size()[0]).sum();
        Ok(RankAllocator {
            schedule,
            groups,
            init_budget,
            target_budget: schedule.target_rank * blocks,
        })
    }

    /// Triplets in the model and the final budget.
    pub fn budgets(&self) -> (i64, i64) {
        (self.init_budget, self.target_budget)
    }

    /// PEFT's `update_and_allocate(step)`: call after the optimizer step of `step` (0-based)
    /// and before the gradients are cleared. Returns the budget when it re-allocated.
    pub fn update_and_allocate(&mut self, step: usize) -> Option<i64> {
        let _no_grad = tch::no_grad_guard();
        let end = self.schedule.total_step - self.schedule.tfinal;
        if step < end {
            self.update_averages();
            let (budget, allocate) =
                self.schedule
                    .budget(step, self.init_budget, self.target_budget);
            allocate.then(|| self.mask_to_budget(budget))
        } else if step == end {
            // The final allocation: no update of the averages, then they are reset.
            let (budget, _) = self
                .schedule
                .budget(step, self.init_budget, self.target_budget);
            let kept = self.mask_to_budget(budget);
            for group in &mut self.groups {
                for averages in &mut group.averages {
                    let _ = averages.sensitivity.zero_();
                    let _ = averages.uncertainty.zero_();
                }
            }
            Some(kept)
        } else {
            for group in &self.groups {
                let dropped = group.kept.eq(0.0);
                let _ = group.lambda.shallow_clone().masked_fill_(&dropped, 0.0);
            }
            None
        }
    }

    fn update_averages(&mut self) {
        let (beta1, beta2) = (self.schedule.beta1, self.schedule.beta2);
        for group in &mut self.groups {
            let parameters = [&group.q, &group.lambda, &group.p];
            for (param, averages) in parameters.into_iter().zip(group.averages.iter_mut()) {
                let grad = param.grad();
                let sensitivity = (param * &grad).abs();
                // The same operations in the same order as PEFT, so the f32 results match.
                averages.sensitivity = &averages.sensitivity * beta1 + &sensitivity * (1.0 - beta1);
                averages.uncertainty = &averages.uncertainty * beta2
                    + (&sensitivity - &averages.sensitivity).abs() * (1.0 - beta2);
            }
        }
    }

    /// Zeroes the lambda of every triplet scoring at or below the (initial - budget)-th
    /// smallest score, and records which are kept; returns the budget.
    fn mask_to_budget(&mut self, budget: i64) -> i64 {
        let scores: Vec<Tensor> = self.groups.iter().map(TripletGroup::scores).collect();
        let to_drop = self.init_budget - budget;
        if to_drop <= 0 {
            // PEFT's `kthvalue(k = 0)` would raise; nothing to drop means all are kept.
            for group in &self.groups {
                let _ = group.kept.shallow_clone().fill_(1.0);
            }
            return budget;
        }
        let all = Tensor::cat(&scores, 0);
        let (threshold, _) = all.kthvalue(to_drop, 0, false);
        for (group, score) in self.groups.iter().zip(&scores) {
            let dropped = score.le_tensor(&threshold);
            let _ = group.lambda.shallow_clone().masked_fill_(&dropped, 0.0);
            group
                .kept
                .shallow_clone()
                .copy_(&dropped.logical_not().to_kind(Kind::Float));
        }
        budget
    }

    /// The smoothed averages by name (`rank_allocator.exp_avg_ipt.{param}` and
    /// `rank_allocator.exp_avg_unc.{param}`, PEFT's names), for a checkpoint.
    pub fn state(&self) -> Vec<(String, Tensor)> {
        let mut state = Vec::new();
        for group in &self.groups {
            for (part, averages) in PARTS.iter().zip(&group.averages) {
                let param = format!("{}_{part}", group.name);
                state.push((
                    format!("rank_allocator.exp_avg_ipt.{param}"),
                    averages.sensitivity.shallow_clone(),
                ));
                state.push((
                    format!("rank_allocator.exp_avg_unc.{param}"),
                    averages.uncertainty.shallow_clone(),
                ));
            }
        }
        state
    }

    /// Restores the averages of [`RankAllocator::state`] from a checkpoint.
    pub fn restore(&mut self, saved: &HashMap<String, Tensor>) -> Result<()> {
        for group in &mut self.groups {
            for (part, averages) in PARTS.iter().zip(group.averages.iter_mut()) {
                let param = format!("{}_{part}", group.name);
                for (what, target) in [
                    ("exp_avg_ipt", &mut averages.sensitivity),
                    ("exp_avg_unc", &mut averages.uncertainty),
                ] {
                    let name = format!("rank_allocator.{what}.{param}");
                    let tensor = saved
                        .get(&name)
                        .with_context(|| format!("checkpoint optimizer lacks `{name}`"))?;
                    if tensor.size() != target.size() {
                        bail!(
                            "checkpoint `{name}` is {:?}, expected {:?}",
                            tensor.size(),
                            target.size()
                        );
                    }
                    *target = tensor.to_device(target.device()).to_kind(Kind::Float);
                }
            }
        }
        Ok(())
    }

    /// The triplet scores of every group by name (`{module}.shared`, `{module}.dims`), for
    /// tests and diagnostics.
    pub fn scores(&self) -> Vec<(String, Tensor)> {
        self.groups
            .iter()
            .map(|g| (g.name.clone(), g.scores()))
            .collect()
    }

    /// Triplets kept at the last allocation, over the whole model.
    pub fn kept(&self) -> i64 {
        // One device-to-host read for the whole model.
        let per_group: Vec<Tensor> = self
            .groups
            .iter()
            .map(|g| g.kept.sum(Kind::Float))
            .collect();
        Tensor::stack(&per_group, 0)
            .sum(Kind::Float)
            .double_value(&[]) as i64
    }
}
