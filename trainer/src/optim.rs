//! AdamW, gradient clipping and the learning-rate schedule, written out so their state can be
//! checkpointed and their arithmetic matches PyTorch's (`torch.optim.AdamW`,
//! `clip_grad_norm_`) and Hugging Face's schedules (`get_linear_schedule_with_warmup`,
//! `get_cosine_schedule_with_warmup`).

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

/// AdamW over a fixed list of parameters: only what a stage trains.
#[derive(Debug)]
pub struct AdamW {
    pub params: Vec<Tensor>,
    /// First and second moment estimates, one per parameter.
    pub exp_avg: Vec<Tensor>,
    pub exp_avg_sq: Vec<Tensor>,
    /// Steps taken.
    pub step: i64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl AdamW {
    pub fn new(params: Vec<Tensor>, beta1: f64, beta2: f64, eps: f64, weight_decay: f64) -> Self {
        let zeros = |p: &Tensor| p.zeros_like().detach();
        AdamW {
            exp_avg: params.iter().map(zeros).collect(),
            exp_avg_sq: params.iter().map(zeros).collect(),
            params,
            step: 0,
            beta1,
            beta2,
            eps,
            weight_decay,
        }
    }

    /// One update with learning rate `lr` from the gradients now in `.grad()`; a parameter
    /// without a gradient is left alone (as PyTorch does).
    pub fn step(&mut self, lr: f64) {
        let _no_grad = tch::no_grad_guard();
        self.step += 1;
        let bias_correction1 = 1.0 - self.beta1.powi(self.step as i32);
        let bias_correction2_sqrt = (1.0 - self.beta2.powi(self.step as i32)).sqrt();
        for ((param, m), v) in self
            .params
            .iter()
            .zip(&mut self.exp_avg)
            .zip(&mut self.exp_avg_sq)
        {
            let grad = param.grad();
            if !grad.defined() {
                continue;
            }
            let mut p = param.shallow_clone();
            if self.weight_decay != 0.0 {
                let _ = p.g_mul_scalar_(1.0 - lr * self.weight_decay);
            }
            let _ = m
                .g_mul_scalar_(self.beta1)
                .g_add_(&(&grad * (1.0 - self.beta1)));
            let _ = v
                .g_mul_scalar_(self.beta2)
                .g_add_(&(grad.square() * (1.0 - self.beta2)));
            let denom = v.sqrt() / bias_correction2_sqrt + self.eps;
            let _ = p.g_sub_(&(&*m / denom * (lr / bias_correction1)));
        }
    }

    /// The moments by name (`exp_avg.{i}`, `exp_avg_sq.{i}`, i in the order of `params`), as a
    /// checkpoint's `optimizer.safetensors` holds them.
    pub fn moments(&self) -> Vec<(String, Tensor)> {
        let mut moments = Vec::with_capacity(2 * self.params.len());
        for (i, (m, v)) in self.exp_avg.iter().zip(&self.exp_avg_sq).enumerate() {
            moments.push((format!("exp_avg.{i}"), m.shallow_clone()));
            moments.push((format!("exp_avg_sq.{i}"), v.shallow_clone()));
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
        for (i, (m, v)) in self
            .exp_avg
            .iter_mut()
            .zip(self.exp_avg_sq.iter_mut())
            .enumerate()
        {
            for (name, target) in [(format!("exp_avg.{i}"), m), (format!("exp_avg_sq.{i}"), v)] {
                let value = saved
                    .get(&name)
                    .ok_or_else(|| anyhow::anyhow!("checkpoint optimizer lacks `{name}`"))?;
                target.copy_(value);
            }
        }
        self.step = steps;
        Ok(())
    }

    pub fn zero_grad(&mut self) {
        for p in &mut self.params {
            let mut grad = p.grad();
            if grad.defined() {
                let _ = grad.detach_().zero_();
            }
        }
    }

    /// Scales gradients so their global L2 norm is at most `max_norm` (skipped when
    /// `max_norm <= 0`); returns the norm before clipping.
    pub fn clip_grad_norm(&mut self, max_norm: f64) -> f64 {
        let _no_grad = tch::no_grad_guard();
        let grads: Vec<Tensor> = self
            .params
            .iter()
            .map(|p| p.grad())
            .filter(|g| g.defined())
            .collect();
        if grads.is_empty() {
            return 0.0;
        }
        let squares: Vec<Tensor> = grads
            .iter()
            .map(|g| g.to_kind(Kind::Double).square().sum(Kind::Double))
            .collect();
        let total = Tensor::stack(&squares, 0)
            .sum(Kind::Double)
            .sqrt()
            .double_value(&[]);
        if max_norm > 0.0 {
            let coef = max_norm / (total + 1e-6);
            if coef < 1.0 {
                for mut g in grads {
                    let _ = g.g_mul_scalar_(coef);
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
    use tch::Device;

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
