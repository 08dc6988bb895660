//! The losses of METHOD.md section 3, on per-row implicit rewards.
//!
//! Notation: `u(y; w) = log pi(y | x; w) - log pi_ref(y | x)` and, for a pair, the margin
//! `m = u(y_a; w) - u(y_b; w)`. A dimension's preference `s` is +1 (prefers a), -1 (prefers b)
//! or 0 (no preference: the row is masked out of that dimension's loss). Every function returns
//! per-row losses; the training loop sums them and divides by a normaliser that is the same
//! on every rank (METHOD.md section 9). Everything goes through `log_sigmoid`, which is finite
//! for any finite input, never through `log(sigmoid(.))`, which underflows to -inf.

use tch::Tensor;

/// Per-dimension DPO (sigmoid loss), one row per pair:
///
/// `L = -log sigma(beta * s * m)`, 0 where `s = 0`.
///
/// Gradient: with `x = beta s m`, `dL/dx = -(1 - sigma(x)) = -sigma(-x)`, so
/// `dL/dm = -beta s sigma(-beta s m)`: it pushes the margin towards the preferred response and
/// vanishes as the pair becomes confidently ordered.
///
/// margins, preference: [B] -> [B]
pub fn dpo(margins: &Tensor, preference: &Tensor, beta: f64) -> Tensor {
    let sign = preference.to_kind(margins.kind());
    let x = margins * &sign * beta;
    -x.log_sigmoid() * sign.abs()
}

/// Linear scalarisation (Panacea): `L_LS(w) = sum_i w_i L_DPO,i`, with every dimension's DPO
/// loss evaluated on the same margin `m = u(y_a; w) - u(y_b; w)` of the pass at `w`.
///
/// Gradient: `dL/dm = -beta sum_i w_i s_i sigma(-beta s_i m)` (masked dimensions add 0).
///
/// margins: [B]; preferences: [B, k]; weights: [B, k] -> [B]
pub fn linear_scalarisation(
    margins: &Tensor,
    preferences: &Tensor,
    weights: &Tensor,
    beta: f64,
) -> Tensor {
    let sign = preferences.to_kind(margins.kind()); // [B, k]
    let x = margins.unsqueeze(1) * &sign * beta; // [B, k]
    let per_dimension = -x.log_sigmoid() * sign.abs(); // [B, k]
    (per_dimension * weights.to_kind(margins.kind())).sum_dim_intlist(1, false, margins.kind())
}

/// The teacher probability of the stage-3 KL loss as a logit:
/// `t = beta * sum_i w_i Delta_i`, `Delta_i = u(y_a; 1_i) - u(y_b; 1_i)`, so `p = sigma(t)`.
/// The per-dimension margins are detached: the teacher carries no gradient.
///
/// dimension_margins: [B, k]; weights: [B, k] -> [B]
pub fn teacher_logit(dimension_margins: &Tensor, weights: &Tensor, beta: f64) -> Tensor {
    let kind = dimension_margins.kind();
    (dimension_margins.detach() * weights.to_kind(kind)).sum_dim_intlist(1, false, kind) * beta
}

/// The proposed KL loss of stage 3: `KL(Bernoulli(p) || Bernoulli(sigma(z)))` with
/// `p = sigma(t)` (see [`teacher_logit`]) and student logit `z = beta * m` at `w`:
///
/// ```text
/// L = p (log p - log sigma(z)) + (1 - p) (log(1 - p) - log(1 - sigma(z)))
///   = sigma(t) (ls(t) - ls(z)) + sigma(-t) (ls(-t) - ls(-z)),   ls = log_sigmoid
/// ```
///
/// using `1 - sigma(a) = sigma(-a)`. Gradient (paper, App. A): `d ls(z)/dz = sigma(-z)` and
/// `d ls(-z)/dz = -sigma(z)`, so `dL/dz = -p sigma(-z) + (1 - p) sigma(z) = sigma(z) - p`.
/// Only `z` carries gradient; L >= 0 with equality iff `z = t`.
///
/// teacher_logits, student_logits: [B] -> [B]
pub fn bernoulli_kl(teacher_logits: &Tensor, student_logits: &Tensor) -> Tensor {
    let t = teacher_logits.detach();
    let z = student_logits;
    let p = t.sigmoid();
    let q = (-&t).sigmoid(); // 1 - p
    &p * (t.log_sigmoid() - z.log_sigmoid()) + &q * ((-&t).log_sigmoid() - (-z).log_sigmoid())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;

    fn t(values: &[f64]) -> Tensor {
        Tensor::from_slice(values).to_kind(Kind::Double)
    }

    fn values(t: &Tensor) -> Vec<f64> {
        Vec::<f64>::try_from(t.to_kind(Kind::Double)).unwrap()
    }

    fn close(a: f64, b: f64, tol: f64) -> bool {
        (a - b).abs() <= tol
    }

    /// Hand derivation: beta = 0.5.
    /// - m = 2, s = +1: x = 1, L = -ln sigma(1) = ln(1 + e^-1) = 0.31326168751822286
    /// - m = 2, s = -1: x = -1, L = ln(1 + e) = 1.3132616875182228
    /// - m = 0, s = +1: L = ln 2 = 0.6931471805599453
    /// - m = 5, s = 0: masked, 0
    /// - m = -2000, s = +1: x = -1000, L = ln(1 + e^1000) = 1000 (finite; log(sigmoid) gives inf)
    #[test]
    fn dpo_values() {
        let got = values(&dpo(
            &t(&[2.0, 2.0, 0.0, 5.0, -2000.0]),
            &t(&[1.0, -1.0, 1.0, 0.0, 1.0]),
            0.5,
        ));
        let expected = [
            0.31326168751822286,
            1.3132616875182228,
            std::f64::consts::LN_2,
            0.0,
            1000.0,
        ];
        for (g, e) in got.iter().zip(expected) {
            assert!(close(*g, e, 1e-12), "{got:?} vs {expected:?}");
        }
    }

    /// Hand derivation: beta = 1, m = 1, s = (+1, -1, 0), w = (0.25, 0.5, 0.25):
    /// L = 0.25 ln(1 + e^-1) + 0.5 ln(1 + e) + 0.25 * 0
    ///   = 0.25 * 0.31326168751822286 + 0.5 * 1.3132616875182228 = 0.7349462656386672
    #[test]
    fn linear_scalarisation_values() {
        let got = linear_scalarisation(
            &t(&[1.0]),
            &t(&[1.0, -1.0, 0.0]).view([1, 3]),
            &t(&[0.25, 0.5, 0.25]).view([1, 3]),
            1.0,
        );
        assert!(close(values(&got)[0], 0.7349462656386672, 1e-12));
    }

    /// Hand derivation of KL(Bern(p) || Bern(q)) = p ln(p/q) + (1-p) ln((1-p)/(1-q)):
    /// - t = 0 (p = 0.5), z = 0 (q = 0.5): 0
    /// - t = 0 (p = 0.5), z = ln 3 (q = 0.75): 0.5 ln(0.5/0.75) + 0.5 ln(0.5/0.25)
    ///   = 0.5 (ln 2 - ln 1.5) = 0.5 ln(4/3) = 0.14384103622589045
    /// - t = ln 3 (p = 0.75), z = 0 (q = 0.5): 0.75 ln 1.5 + 0.25 ln 0.5 = 0.13081203594113694
    /// - t = 40, z = -40: p ~ 1, q ~ e^-40: L ~ -ln q = 40 + ln(1 + e^-40) ~ 40 (finite)
    #[test]
    fn bernoulli_kl_values() {
        let ln3 = 3f64.ln();
        let got = values(&bernoulli_kl(
            &t(&[0.0, 0.0, ln3, 40.0]),
            &t(&[0.0, ln3, 0.0, -40.0]),
        ));
        let expected = [0.0, 0.14384103622589045, 0.13081203594113694, 40.0];
        for (g, e) in got.iter().zip(expected) {
            assert!(close(*g, e, 1e-9), "{got:?} vs {expected:?}");
        }
    }

    /// teacher_logit: beta = 0.1, Delta = (2, -4), w = (0.75, 0.25): 0.1 (1.5 - 1) = 0.05.
    #[test]
    fn teacher_is_linear_scalarisation_of_margins() {
        let got = teacher_logit(
            &t(&[2.0, -4.0]).view([1, 2]),
            &t(&[0.75, 0.25]).view([1, 2]),
            0.1,
        );
        assert!(close(values(&got)[0], 0.05, 1e-12));
    }

    /// Central finite differences of sum(loss) against autograd, in f64.
    fn check_gradient(f: impl Fn(&Tensor) -> Tensor, x: &[f64]) {
        let input = t(x).set_requires_grad(true);
        f(&input).sum(Kind::Double).backward();
        let autograd = values(&input.grad());
        let h = 1e-6;
        for i in 0..x.len() {
            let mut plus = x.to_vec();
            let mut minus = x.to_vec();
            plus[i] += h;
            minus[i] -= h;
            let numeric = (f(&t(&plus)).sum(Kind::Double).double_value(&[])
                - f(&t(&minus)).sum(Kind::Double).double_value(&[]))
                / (2.0 * h);
            assert!(
                close(autograd[i], numeric, 1e-6),
                "d/dx[{i}]: autograd {} vs numeric {numeric}",
                autograd[i]
            );
        }
    }

    #[test]
    fn gradients_match_finite_differences() {
        let margins = [1.3, -0.7, 0.0, 4.0, -2.5];
        check_gradient(|m| dpo(m, &t(&[1.0, -1.0, 1.0, 0.0, -1.0]), 0.3), &margins);
        let prefs = t(&[1.0, -1.0, 0.0, 1.0, -1.0, 1.0, 0.0, 0.0, 1.0, -1.0]).view([5, 2]);
        let weights = t(&[0.2, 0.8, 0.5, 0.5, 1.0, 0.0, 0.3, 0.7, 0.9, 0.1]).view([5, 2]);
        check_gradient(|m| linear_scalarisation(m, &prefs, &weights, 0.7), &margins);
        let teacher = t(&[0.4, -1.2, 0.0, 2.0, 0.1]);
        check_gradient(|z| bernoulli_kl(&teacher, z), &margins);
    }

    /// dL/dz = sigma(z) - p, and the teacher receives no gradient.
    #[test]
    fn kl_gradient_is_sigmoid_minus_teacher() {
        let teacher = t(&[0.4, -1.2, 0.0, 2.0, 30.0]).set_requires_grad(true);
        let z = t(&[1.3, -0.7, 0.0, 4.0, -30.0]).set_requires_grad(true);
        bernoulli_kl(&teacher, &z).sum(Kind::Double).backward();
        let expected = values(&(z.detach().sigmoid() - teacher.detach().sigmoid()));
        for (g, e) in values(&z.grad()).iter().zip(expected) {
            assert!(close(*g, e, 1e-12));
        }
        assert!(
            !teacher.grad().defined()
                || teacher.grad().abs().sum(Kind::Double).double_value(&[]) == 0.0
        );
    }
}
