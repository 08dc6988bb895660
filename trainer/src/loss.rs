//! The losses of METHOD.md section 3, on per-row implicit rewards.
//!
//! Notation: `u(y; w) = log pi(y | x; w) - log pi_ref(y | x)` and, for a pair, the margin
//! `m = u(y_a; w) - u(y_b; w)`. A dimension's preference `s` is +1 (prefers a), -1 (prefers b)
//! or 0 (no preference: the row is masked out of that dimension's loss). Every function returns
//! per-row losses; the training loop sums them and divides by a normaliser that is the same
//! on every rank (METHOD.md section 9). Everything goes through `log_sigmoid`, which is finite
//! for any finite input, never through `log(sigmoid(.))`, which underflows to -inf.

use tch::Tensor;

/// How response length enters the margin `m` of every loss of a run: the DPO losses, linear
/// scalarisation, and both sides of the stage-3 KL (the teacher's per-dimension margins
/// `Delta_i` and the student's margin at `w`). Lengths count response tokens, EOS included.
///
/// The paper's stage-3 teacher `sigma(beta sum_i w_i Delta_i)` inherits whatever length bias
/// the implicit rewards carry; these options change what the rewards are.
///
/// Set by `[method] length_correction` ("none", "per-token", "r-dpo") and `length_alpha`.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum LengthCorrection {
    /// `m = u(y_a) - u(y_b)`: sums of token log-ratios, as in the paper.
    #[default]
    None,
    /// Per-token means, as length-normalised DPO and SimPO use:
    /// `m = u(y_a) / |y_a| - u(y_b) / |y_b|`.
    ///
    /// Every loss sees mean log-ratios, about `1 / |y|` the size of the sums, so beta must
    /// grow accordingly (SimPO uses beta around 2). In stage 3 the KL is 0 where
    /// `m(w) = sum_i w_i Delta_i` on this per-token scale: the teacher no longer rewards a
    /// response for being longer.
    PerToken,
    /// R-DPO (Park et al. 2024, "Disentangling Length from Quality in DPO"): the DPO logit of
    /// the winner `y_w` over the loser `y_l` is `beta (u(y_w) - u(y_l)) + alpha (|y_w| - |y_l|)`.
    /// In the signed form of [`dpo`] (winner a when s = +1, b when s = -1) that is
    /// `s (beta m + alpha (|y_a| - |y_b|))`, so the margin the losses see is
    ///
    /// `m' = m + (alpha / beta) (|y_a| - |y_b|)`.
    ///
    /// A longer winner already has part of its logit from length, so the loss stops pushing
    /// its log-ratio earlier: the learned implicit reward carries less length. The gradient
    /// with respect to `m` is unchanged in form: `dL/dm = -beta s sigma(-beta s m')`.
    ///
    /// In stage 3 the term appears on both sides and cancels at the KL's minimum: with
    /// `sum_i w_i = 1`, `t = beta sum_i w_i Delta_i + alpha L` and `z = beta m(w) + alpha L`
    /// (`L = |y_a| - |y_b|`), so `z = t` where `m(w) = sum_i w_i Delta_i`. The correction
    /// reaches the teacher through the `Delta_i`, which stages 2 and 3 train with R-DPO.
    RDpo { alpha: f64 },
}

impl LengthCorrection {
    /// The margin the losses see, from the implicit rewards `u(y_a)`, `u(y_b)` and the
    /// response lengths (in tokens, as floats).
    ///
    /// u_a, u_b, length_a, length_b: [B] -> [B]
    pub fn margin(
        self,
        u_a: &Tensor,
        u_b: &Tensor,
        (length_a, length_b): (&Tensor, &Tensor),
        beta: f64,
    ) -> Tensor {
        match self {
            LengthCorrection::None => u_a - u_b,
            LengthCorrection::PerToken => u_a / length_a - u_b / length_b,
            LengthCorrection::RDpo { alpha } => u_a - u_b + (length_a - length_b) * (alpha / beta),
        }
    }
}

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

    /// Hand derivation: u_a = 2, u_b = 1, |y_a| = 4, |y_b| = 2, beta = 0.5, alpha = 0.1.
    /// - none: m = 1
    /// - per-token: 2/4 - 1/2 = 0
    /// - r-dpo: 1 + (0.1 / 0.5)(4 - 2) = 1.4. As R-DPO writes it with a the winner:
    ///   beta (u_w - u_l) + alpha (|y_w| - |y_l|) = 0.5 + 0.2 = 0.7 = beta m', so
    ///   L = ln(1 + e^-0.7) = 0.4031860488854579; with b the winner the logit is
    ///   0.5 (1 - 2) + 0.1 (2 - 4) = -0.7 and L = ln(1 + e^0.7) = 1.103186048885458.
    #[test]
    fn length_corrected_margins_and_the_r_dpo_loss() {
        let (u_a, u_b) = (t(&[2.0]), t(&[1.0]));
        let lengths = (t(&[4.0]), t(&[2.0]));
        let margin =
            |c: LengthCorrection| values(&c.margin(&u_a, &u_b, (&lengths.0, &lengths.1), 0.5))[0];
        assert_eq!(margin(LengthCorrection::None), 1.0);
        assert_eq!(margin(LengthCorrection::PerToken), 0.0);
        let r_dpo = LengthCorrection::RDpo { alpha: 0.1 };
        assert!(close(margin(r_dpo), 1.4, 1e-12));
        let m = r_dpo.margin(&u_a, &u_b, (&lengths.0, &lengths.1), 0.5);
        let losses = values(&dpo(&m.repeat([2]), &t(&[1.0, -1.0]), 0.5));
        assert!(close(losses[0], 0.4031860488854579, 1e-12), "{losses:?}");
        assert!(close(losses[1], 1.103186048885458, 1e-12), "{losses:?}");
        // `none` is the plain difference, bit for bit: today's margins.
        let (a, b) = (t(&[-3.25, 0.1, 7.0]), t(&[-1.5, 0.3, 2.0]));
        let (la, lb) = (t(&[3.0, 5.0, 9.0]), t(&[4.0, 1.0, 2.0]));
        assert!(LengthCorrection::None
            .margin(&a, &b, (&la, &lb), 0.1)
            .equal(&(&a - &b)));
    }

    /// Every correction's gradient through DPO and through the stage-3 KL (the student's
    /// margin at w; the teacher from detached unit margins) against finite differences, with
    /// respect to u(y_a) and u(y_b).
    #[test]
    fn length_corrected_gradients_match_finite_differences() {
        let (la, lb) = (t(&[3.0, 5.0, 9.0, 2.0]), t(&[4.0, 1.0, 2.0, 2.0]));
        let prefs = t(&[1.0, -1.0, 1.0, 0.0]);
        let teacher = t(&[0.4, -1.2, 0.0, 2.0]);
        let u_b = t(&[-0.5, 0.25, 1.0, -2.0]);
        let u_a = [1.3, -0.7, 0.0, 4.0];
        for c in [
            LengthCorrection::None,
            LengthCorrection::PerToken,
            LengthCorrection::RDpo { alpha: 0.05 },
        ] {
            let beta = 0.3;
            check_gradient(
                |a| dpo(&c.margin(a, &u_b, (&la, &lb), beta), &prefs, beta),
                &u_a,
            );
            check_gradient(
                |b| dpo(&c.margin(&t(&u_a), b, (&la, &lb), beta), &prefs, beta),
                &[-0.5, 0.25, 1.0, -2.0],
            );
            check_gradient(
                |a| bernoulli_kl(&teacher, &(c.margin(a, &u_b, (&la, &lb), beta) * beta)),
                &u_a,
            );
        }
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
