//! Implicit-reward margins `m(w) = beta * (u(y_a; w) - u(y_b; w))`, `u = log pi(.|x; w) -
//! log pi_ref(.|x)`, of many pairs at many weight vectors, in batched no-grad forwards.
//!
//! Like the batched passes of a training step (`step.rs`), one forward carries the rows of a
//! micro-batch replicated once per weight vector, each copy with its own `w` (per-row
//! `Conditioning::Weighted`), so evaluating 35 weight vectors costs a few large forwards
//! instead of 35 small ones. How many copies share a forward is bounded by `rows_per_forward`
//! so memory stays bounded whatever the number of weight vectors.

use tch::{Device, Kind, Tensor};

use crate::data::{collate, TokenizedPair};
use crate::logps::{response_lengths, sequence_logps, BatchTensors};
use crate::loss::LengthCorrection;
use crate::method::MethodConfig;
use crate::model::{CausalLm, Conditioning};
use crate::reference::ReferenceLogps;

/// The implicit reward an evaluation ranks pairs by: `beta` times the log-ratio `u`, summed
/// over the response's tokens or, for a run trained with `length_correction = "per-token"`,
/// averaged over them (that run's reward). R-DPO's length term is a prior added to the
/// training logit, not part of the reward: such runs are ranked by the summed `u`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ImplicitReward {
    pub beta: f64,
    pub per_token: bool,
}

impl ImplicitReward {
    /// The paper's reward `beta u` with summed log-ratios.
    pub fn summed(beta: f64) -> Self {
        ImplicitReward {
            beta,
            per_token: false,
        }
    }

    /// The reward of a run trained with `method`.
    pub fn of(method: &MethodConfig) -> Self {
        ImplicitReward {
            beta: method.beta,
            per_token: method.length_correction() == LengthCorrection::PerToken,
        }
    }
}

/// How the forwards of an evaluation are cut.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Batching {
    /// Pairs per micro-batch (pairs of similar length are grouped, so padding stays small).
    pub micro_batch: usize,
    /// Most pairs in one forward, replicated copies included: a micro-batch of B pairs
    /// evaluates `max(1, rows_per_forward / B)` weight vectors per forward. Each pair is two
    /// sequences, so a forward holds at most `2 * rows_per_forward` sequences.
    pub rows_per_forward: usize,
    pub pad_token_id: u32,
    pub device: Device,
}

impl Batching {
    /// The batching a training step with batched passes already uses: `micro_batch` pairs
    /// times `passes` weight vectors per forward (with gradients, so without them it fits).
    pub fn like_training(
        micro_batch: usize,
        passes: usize,
        pad_token_id: u32,
        device: Device,
    ) -> Self {
        Batching {
            micro_batch,
            rows_per_forward: micro_batch * passes.max(1),
            pad_token_id,
            device,
        }
    }
}

/// `margins[v][p]`: the implicit-reward margin of `pairs[p]` at `weights[v]` (each of length
/// k), in f64 from f32 log-probs. `reference` holds `log pi_ref` of the split the pairs come
/// from, indexed by pair id. No gradient is recorded.
pub fn implicit_margins(
    model: &CausalLm,
    pairs: &[&TokenizedPair],
    reference: &ReferenceLogps,
    weights: &[Vec<f64>],
    reward: ImplicitReward,
    batching: &Batching,
) -> Vec<Vec<f64>> {
    let _no_grad = tch::no_grad_guard();
    let mut margins = vec![vec![0.0; pairs.len()]; weights.len()];
    if pairs.is_empty() || weights.is_empty() {
        return margins;
    }
    let k = weights[0].len();
    assert!(
        weights.iter().all(|w| w.len() == k),
        "every weight vector has k entries"
    );
    let device = batching.device;
    // Positions in `pairs`, sorted by length (ties by position) to keep padding small.
    let mut order: Vec<usize> = (0..pairs.len()).collect();
    order.sort_by_key(|&p| (pairs[p].seq_len(), p));
    for chunk in order.chunks(batching.micro_batch.max(1)) {
        let selected: Vec<&TokenizedPair> = chunk.iter().map(|&p| pairs[p]).collect();
        let batch = collate(&selected, batching.pad_token_id);
        let tensors = BatchTensors::new(&batch, device);
        let b = tensors.pairs;
        let (reference_a, reference_b) = reference.gather(&batch.pair_ids, device); // [B] each

        // Per-token rewards divide each response's log-ratio by its length: [1, B] each.
        let per_token = reward.per_token.then(|| {
            let (a, b) = response_lengths(&selected, device);
            (a.unsqueeze(0), b.unsqueeze(0))
        });
        let per_forward = (batching.rows_per_forward / chunk.len()).max(1);
        for (group_index, group) in weights.chunks(per_forward).enumerate() {
            let copies = group.len() as i64;
            // [copies B, k]: copy c of every pair carries group[c].
            let rows: Vec<f32> = group
                .iter()
                .flat_map(|w| (0..b).flat_map(move |_| w.iter().map(|&x| x as f32)))
                .collect();
            let w = Tensor::from_slice(&rows)
                .view([copies * b, k as i64])
                .to_device(device);
            let replicated = tensors.replicated(copies);
            let (logp_a, logp_b) = sequence_logps(model, &replicated, Conditioning::Weighted(&w)); // [copies B]
            let u_a = logp_a.view([copies, b]) - reference_a.unsqueeze(0); // [copies, B]
            let u_b = logp_b.view([copies, b]) - reference_b.unsqueeze(0);
            let difference = match &per_token {
                None => u_a - u_b,
                Some((length_a, length_b)) => u_a / length_a - u_b / length_b,
            };
            let m = (difference * reward.beta)
                .to_kind(Kind::Double)
                .to_device(Device::Cpu)
                .reshape([-1]);
            let m = Vec::<f64>::try_from(m).expect("f64 margins");
            for c in 0..group.len() {
                let v = group_index * per_forward + c;
                for (j, &p) in chunk.iter().enumerate() {
                    margins[v][p] = m[c * chunk.len() + j];
                }
            }
        }
    }
    margins
}
