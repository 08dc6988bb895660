//! AdamW, gradient clipping and the learning-rate schedule, written out so their state can be
//! checkpointed and their arithmetic matches PyTorch's (`torch.optim.AdamW`,
//! `clip_grad_norm_`) and Hugging Face's schedules (`get_linear_schedule_with_warmup`,
//! `get_cosine_schedule_with_warmup`).

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

/// AdamW over a fixed list of parameters (only what a stage trains), kept as llm.c keeps them:
/// per dtype one contiguous buffer each for the parameters, their gradients and the two
/// moments. Every parameter, and its `.grad`, is a view into its dtype's buffers, so autograd
/// accumulates straight into the flat gradient buffer (its accumulation is in place once a
/// gradient exists), the all-reduce takes that buffer as it is ([`AdamW::gradient_buffers`]),
/// and clipping, the update and clearing are a handful of kernels over whole buffers.
///
/// Every parameter is updated at every step. Before the buffers, a parameter that had never
/// received a gradient was skipped (as PyTorch skips `grad is None`); no run relied on that,
/// since the all-reduce refused an undefined gradient.
#[derive(Debug)]
pub struct AdamW {
    /// The parameters as the model holds them (views into the flat buffers), in list order.
    pub params: Vec<Tensor>,
    groups: Vec<FlatGroup>,
    /// Steps taken.
    pub step: i64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

/// The parameters of one dtype and device, with their gradients and moments, each one
/// contiguous buffer: [sum of the members' numel].
#[derive(Debug)]
struct FlatGroup {
    /// (position in `AdamW::params`, offset into the buffers, numel), in list order.
    members: Vec<(usize, i64, i64)>,
    params: Tensor,
    grads: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
}

impl FlatGroup {
    /// Member `member`'s part of `buffer`, shaped as the parameter.
    fn view(&self, buffer: &Tensor, member: usize, shape: &[i64]) -> Tensor {
        let (_, offset, numel) = self.members[member];
        buffer.narrow(0, offset, numel).view(shape)
    }
}

impl AdamW {
    /// Moves `params` (each must require grad) into flat buffers, one set per dtype and
    /// device, and points each parameter's data and gradient at its part of them. Values and
    /// any gradient already accumulated are kept.
    pub fn new(params: Vec<Tensor>, beta1: f64, beta2: f64, eps: f64, weight_decay: f64) -> Self {
        for (i, p) in params.iter().enumerate() {
            assert!(
                p.requires_grad(),
                "AdamW: parameter {i} ({:?}) does not require grad",
                p.size()
            );
        }
        // tch has no setter for `.grad`; a backward of 0 * sum(p) gives each parameter without
        // one a gradient of zeros (and adds 0 to the others), whose data is then pointed at
        // the flat gradient buffer.
        if !params.is_empty() {
            let zero = tch::with_grad(|| {
                params
                    .iter()
                    .map(|p| p.sum(Kind::Double) * 0.0)
                    .reduce(|a, b| a + b)
                    .expect("non-empty")
            });
            zero.backward();
        }
        let _no_grad = tch::no_grad_guard();
        let mut keys: Vec<(Kind, Device)> = Vec::new();
        for p in &params {
            if !keys.contains(&(p.kind(), p.device())) {
                keys.push((p.kind(), p.device()));
            }
        }
        let groups = keys
            .into_iter()
            .map(|(kind, device)| {
                let mut members = Vec::new();
                let mut offset = 0i64;
                for (i, p) in params.iter().enumerate() {
                    if (p.kind(), p.device()) == (kind, device) {
                        let numel = p.numel() as i64;
                        members.push((i, offset, numel));
                        offset += numel;
                    }
                }
                let flatten = |of: &dyn Fn(&Tensor) -> Tensor| {
                    let parts: Vec<Tensor> = members
                        .iter()
                        .map(|&(i, _, _)| of(&params[i]).reshape([-1]))
                        .collect();
                    Tensor::cat(&parts, 0) // [n]
                };
                let group = FlatGroup {
                    params: flatten(&|p| p.detach()),
                    grads: flatten(&|p| p.grad()),
                    exp_avg: Tensor::zeros([offset], (kind, device)),
                    exp_avg_sq: Tensor::zeros([offset], (kind, device)),
                    members,
                };
                for (member, &(i, _, _)) in group.members.iter().enumerate() {
                    let mut p = params[i].shallow_clone();
                    let shape = p.size();
                    p.set_data(&group.view(&group.params, member, &shape));
                    p.grad().set_data(&group.view(&group.grads, member, &shape));
                }
                group
            })
            .collect();
        AdamW {
            params,
            groups,
            step: 0,
            beta1,
            beta2,
            eps,
            weight_decay,
        }
    }

    /// The flat gradient buffers, one per dtype and device: what the all-reduce averages in
    /// place. Shallow copies: writing them writes every parameter's `.grad`.
    pub fn gradient_buffers(&self) -> Vec<Tensor> {
        self.groups
            .iter()
            .map(|g| g.grads.shallow_clone())
            .collect()
    }

    /// One update with learning rate `lr` from the gradients now in the buffers, as
    /// `torch.optim.AdamW` computes it per parameter.
    pub fn step(&mut self, lr: f64) {
        let _no_grad = tch::no_grad_guard();
        self.step += 1;
        let bias_correction1 = 1.0 - self.beta1.powi(self.step as i32);
        let bias_correction2_sqrt = (1.0 - self.beta2.powi(self.step as i32)).sqrt();
        for group in &mut self.groups {
            let grad = &group.grads;
            if self.weight_decay != 0.0 {
                let _ = group.params.g_mul_scalar_(1.0 - lr * self.weight_decay);
            }
            let _ = group
                .exp_avg
                .g_mul_scalar_(self.beta1)
                .g_add_(&(grad * (1.0 - self.beta1)));
            let _ = group
                .exp_avg_sq
                .g_mul_scalar_(self.beta2)
                .g_add_(&(grad.square() * (1.0 - self.beta2)));
            let denom = group.exp_avg_sq.sqrt() / bias_correction2_sqrt + self.eps;
            let _ = group
                .params
                .g_sub_(&(&group.exp_avg / denom * (lr / bias_correction1)));
        }
    }

    /// The moments by name (`exp_avg.{i}`, `exp_avg_sq.{i}`, i in the order of `params`), as a
    /// checkpoint's `optimizer.safetensors` holds them: views into the flat buffers.
    pub fn moments(&self) -> Vec<(String, Tensor)> {
        let mut by_param: Vec<Option<(Tensor, Tensor)>> =
            (0..self.params.len()).map(|_| None).collect();
        for group in &self.groups {
            for (member, &(i, _, _)) in group.members.iter().enumerate() {
                let shape = self.params[i].size();
                by_param[i] = Some((
                    group.view(&group.exp_avg, member, &shape),
                    group.view(&group.exp_avg_sq, member, &shape),
                ));
            }
        }
        let mut moments = Vec::with_capacity(2 * self.params.len());
        for (i, pair) in by_param.into_iter().enumerate() {
            let (m, v) = pair.expect("every parameter is in a group");
            moments.push((format!("exp_avg.{i}"), m));
            moments.push((format!("exp_avg_sq.{i}"), v));
        }
        moments
    }

    /// Puts back the moments of [`AdamW::moments`] and the step count of a checkpoint.
    pub fn restore_moments(
        &mut self,
        saved: &std::collections::HashMap<String, Tensor>,
        steps: i64,
    ) -> anyhow::Result<()> {
        let _no_grad = tch::no_grad_guard();
        for (name, mut target) in self.moments() {
            let value = saved
                .get(&name)
                .ok_or_else(|| anyhow::anyhow!("checkpoint optimizer lacks `{name}`"))?;
            anyhow::ensure!(
                value.size() == target.size(),
                "checkpoint optimizer's `{name}` has shape {:?}, this run's {:?}",
                value.size(),
                target.size()
            );
            target.copy_(value);
        }
        self.step = steps;
        Ok(())
    }

    /// Clears every gradient: one fill per buffer.
    pub fn zero_grad(&mut self) {
        for group in &mut self.groups {
            let _ = group.grads.zero_();
        }
    }

    /// Scales gradients so their global L2 norm is at most `max_norm` (skipped when
    /// `max_norm <= 0`); returns the norm before clipping. The norm is summed in f64 over
    /// whole buffers.
    pub fn clip_grad_norm(&mut self, max_norm: f64) -> f64 {
        let _no_grad = tch::no_grad_guard();
        if self.groups.is_empty() {
            return 0.0;
        }
        let squares: Vec<Tensor> = self
            .groups
            .iter()
            .map(|g| {
                g.grads
                    .to_kind(Kind::Double)
                    .square()
                    .sum(Kind::Double)
                    .to_device(Device::Cpu)
            })
            .collect();
        let total = Tensor::stack(&squares, 0)
            .sum(Kind::Double)
            .sqrt()
            .double_value(&[]);
        if max_norm > 0.0 {
            let coef = max_norm / (total + 1e-6);
            if coef < 1.0 {
                for group in &mut self.groups {
                    let _ = group.grads.g_mul_scalar_(coef);
                }
            }
        }
        total
    }
}

/// The decay after warmup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    #[default]
    Linear,
    Cosine,
    Constant,
}

/// Learning rate of optimizer step `step` (0-based) of `total`: linear warmup over
/// `ceil(warmup_ratio * total)` steps from 0, then the decay to 0 (as Hugging Face's
/// schedulers, whose first step in warmup has learning rate 0).
pub fn learning_rate(
    peak: f64,
    schedule: Schedule,
    warmup_ratio: f64,
    step: usize,
    total: usize,
) -> f64 {
    let warmup = (warmup_ratio * total as f64).ceil() as usize;
    if step < warmup {
        return peak * step as f64 / warmup.max(1) as f64;
    }
    let progress = (step - warmup) as f64 / (total - warmup).max(1) as f64;
    match schedule {
        Schedule::Constant => peak,
        Schedule::Linear => peak * (1.0 - progress).max(0.0),
        Schedule::Cosine => peak * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two AdamW steps on p = [1, -2] (f64) with gradients g1 = [0.5, -1], g2 = [0.1, 0.3],
    /// lr = 0.1, betas (0.9, 0.999), eps 1e-8, weight decay 0.01. Reference, torch 2.11:
    /// `p = torch.tensor([1., -2.], dtype=torch.float64, requires_grad=True)`;
    /// `opt = torch.optim.AdamW([p], lr=0.1, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)`;
    /// set `p.grad` to g1, `opt.step()`, then g2, `opt.step()`
    /// -> `[0.8177969063826518, -1.8533171424282264]`.
    #[test]
    fn adamw_matches_hand_derivation() {
        let p = Tensor::from_slice(&[1.0f64, -2.0]).set_requires_grad(true);
        let mut opt = AdamW::new(vec![p.shallow_clone()], 0.9, 0.999, 1e-8, 0.01);
        for g in [[0.5f64, -1.0], [0.1, 0.3]] {
            (&p * Tensor::from_slice(&g)).sum(Kind::Double).backward();
            opt.step(0.1);
            opt.zero_grad();
        }
        let got = Vec::<f64>::try_from(p.detach()).unwrap();
        let expected = [0.8177969063826518, -1.8533171424282264];
        assert!(
            (got[0] - expected[0]).abs() < 1e-12 && (got[1] - expected[1]).abs() < 1e-12,
            "{got:?}"
        );
    }

    /// The per-tensor AdamW and clipping these buffers replaced (each tensor its own kernels,
    /// as `torch.optim.AdamW(foreach=False)` and `clip_grad_norm_` run them), on plain tensors.
    struct PerTensor {
        params: Vec<Tensor>,
        exp_avg: Vec<Tensor>,
        exp_avg_sq: Vec<Tensor>,
        step: i64,
    }

    impl PerTensor {
        fn clip(&mut self, grads: &mut [Tensor], max_norm: f64) -> f64 {
            let squares: Vec<Tensor> = grads
                .iter()
                .map(|g| g.to_kind(Kind::Double).square().sum(Kind::Double))
                .collect();
            let total = Tensor::stack(&squares, 0)
                .sum(Kind::Double)
                .sqrt()
                .double_value(&[]);
            let coef = max_norm / (total + 1e-6);
            if max_norm > 0.0 && coef < 1.0 {
                grads.iter_mut().for_each(|g| {
                    let _ = g.g_mul_scalar_(coef);
                });
            }
            total
        }

        fn step(&mut self, grads: &[Tensor], lr: f64, (b1, b2, eps, wd): (f64, f64, f64, f64)) {
            self.step += 1;
            let bc1 = 1.0 - b1.powi(self.step as i32);
            let bc2_sqrt = (1.0 - b2.powi(self.step as i32)).sqrt();
            for (((p, m), v), g) in self
                .params
                .iter_mut()
                .zip(&mut self.exp_avg)
                .zip(&mut self.exp_avg_sq)
                .zip(grads)
            {
                let _ = p.g_mul_scalar_(1.0 - lr * wd);
                let _ = m.g_mul_scalar_(b1).g_add_(&(g * (1.0 - b1)));
                let _ = v.g_mul_scalar_(b2).g_add_(&(g.square() * (1.0 - b2)));
                let denom = v.sqrt() / bc2_sqrt + eps;
                let _ = p.g_sub_(&(&*m / denom * (lr / bc1)));
            }
        }
    }

    /// Flat buffers against the per-tensor update, on three parameters of two dtypes (so two
    /// groups, one of two members), five steps of gradients accumulated by two backwards each,
    /// weight decay, and clipping in the last two steps. Without clipping every element is the
    /// same kernel on the same values, so the parameters must be bitwise equal; clipping sums
    /// the norm per buffer instead of per tensor, which may move its last bits, so there the
    /// bound is 1e-6 relative. Also: each `.grad` is a view of the flat gradient buffer, and
    /// `zero_grad` clears the gradients autograd accumulated there.
    #[test]
    fn flat_buffers_match_the_per_tensor_update() {
        let adam = (0.9, 0.999, 1e-8, 0.01);
        let init = || {
            tch::manual_seed(7);
            vec![
                Tensor::randn([3, 4], (Kind::Float, Device::Cpu)),
                Tensor::randn([5], (Kind::Double, Device::Cpu)),
                Tensor::randn([2, 1], (Kind::Float, Device::Cpu)),
            ]
        };
        // A loss with different gradients at every step: sum_j c_j(step, pass) . sin(p_j).
        let loss = |params: &[Tensor], step: i64, pass: i64| -> Tensor {
            params
                .iter()
                .enumerate()
                .map(|(j, p)| {
                    let c = Tensor::arange(p.numel() as i64, (Kind::Double, Device::Cpu))
                        .view(p.size().as_slice())
                        * (0.3 + 0.1 * (step + 2 * pass + j as i64) as f64);
                    (p.to_kind(Kind::Double).sin() * c).sum(Kind::Double)
                })
                .reduce(|a, b| a + b)
                .unwrap()
        };
        let flat_params: Vec<Tensor> = init()
            .into_iter()
            .map(|p| p.set_requires_grad(true))
            .collect();
        let (b1, b2, eps, wd) = adam;
        let mut flat = AdamW::new(
            flat_params.iter().map(|p| p.shallow_clone()).collect(),
            b1,
            b2,
            eps,
            wd,
        );
        let mut reference = PerTensor {
            params: init(),
            exp_avg: init().iter().map(|p| p.zeros_like()).collect(),
            exp_avg_sq: init().iter().map(|p| p.zeros_like()).collect(),
            step: 0,
        };
        for step in 0..5i64 {
            let max_norm = if step >= 3 { 1.0 } else { 0.0 };
            for pass in 0..2 {
                loss(&flat_params, step, pass).backward();
            }
            for (p, buffer) in flat_params.iter().zip([0usize, 1, 0]) {
                let buffer = &flat.gradient_buffers()[buffer];
                let (start, ptr) = (buffer.data_ptr() as usize, p.grad().data_ptr() as usize);
                let end = start + buffer.numel() * buffer.kind().elt_size_in_bytes();
                assert!((start..end).contains(&ptr), "a .grad outside its buffer");
            }
            let mut grads: Vec<Tensor> = reference
                .params
                .iter()
                .map(|p| {
                    let leaf = p.detach().set_requires_grad(true);
                    leaf.shallow_clone()
                })
                .collect();
            let mut accumulated: Vec<Tensor> = grads.iter().map(|g| g.zeros_like()).collect();
            for pass in 0..2 {
                let g = Tensor::run_backward(&[loss(&grads, step, pass)], &grads, false, false);
                for (a, g) in accumulated.iter_mut().zip(g) {
                    let _ = a.g_add_(&g);
                }
            }
            grads = accumulated;
            let norm_flat = flat.clip_grad_norm(max_norm);
            let norm_reference = reference.clip(&mut grads, max_norm);
            assert!((norm_flat - norm_reference).abs() <= 1e-12 * norm_reference);
            flat.step(0.05);
            flat.zero_grad();
            reference.step(&grads, 0.05, adam);
            for (j, (got, want)) in flat_params.iter().zip(&reference.params).enumerate() {
                let got = got.detach();
                if max_norm == 0.0 {
                    assert!(
                        got.equal(want),
                        "step {step}, parameter {j}: {got:?} {want:?}"
                    );
                } else {
                    let err = (&got - want).abs().max().double_value(&[]);
                    let scale = want.abs().max().double_value(&[]);
                    assert!(err <= 1e-6 * scale, "step {step}, parameter {j}: {err}");
                }
            }
            for p in &flat_params {
                assert_eq!(p.grad().abs().sum(Kind::Double).double_value(&[]), 0.0);
            }
        }
        // The checkpoint's names and shapes are the per-tensor ones.
        let moments = flat.moments();
        assert_eq!(moments[2].0, "exp_avg.1");
        assert_eq!(moments[5].1.size(), [2, 1]);
        assert!(moments[2].1.equal(&reference.exp_avg[1]));
    }

    /// Gradients [3, 4] have norm 5; clipping to 1 scales them by 1 / (5 + 1e-6).
    #[test]
    fn clipping_scales_to_the_max_norm() {
        let p = Tensor::zeros([2], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        (&p * Tensor::from_slice(&[3.0f32, 4.0]))
            .sum(Kind::Float)
            .backward();
        let mut opt = AdamW::new(vec![p.shallow_clone()], 0.9, 0.999, 1e-8, 0.0);
        assert!((opt.clip_grad_norm(1.0) - 5.0).abs() < 1e-6);
        let g = Vec::<f32>::try_from(p.grad()).unwrap();
        assert!(
            (g[0] - 0.6).abs() < 1e-5 && (g[1] - 0.8).abs() < 1e-5,
            "{g:?}"
        );
    }

    /// total 100, warmup ratio 0.03 -> 3 warmup steps: 0, 1/3, 2/3 of peak; then linear from
    /// peak at step 3 to 1/97 of peak at step 99.
    #[test]
    fn schedule_follows_hugging_face() {
        let lr = |s| learning_rate(1.0, Schedule::Linear, 0.03, s, 100);
        assert_eq!(lr(0), 0.0);
        assert!((lr(1) - 1.0 / 3.0).abs() < 1e-12);
        assert_eq!(lr(3), 1.0);
        assert!((lr(99) - 1.0 / 97.0).abs() < 1e-12);
        let cos = |s| learning_rate(1.0, Schedule::Cosine, 0.0, s, 10);
        assert_eq!(cos(0), 1.0);
        assert!((cos(5) - 0.5).abs() < 1e-12);
    }
}
