//! Sequence log-probabilities of responses under the policy: `log pi(y | x; w)`, the sum of
//! the response tokens' log-probabilities (prompt and padding excluded, METHOD.md section 2).
//! Both responses of every pair go through one concatenated forward.
//!
//! Which positions are scored is worked out on the host from the micro-batch's buffers, so a
//! training step never waits on the device for a `nonzero` (METHOD.md section 9, no host
//! synchronisation inside the step).

use tch::{Device, Kind, Tensor};

use crate::data::MicroBatch;
use crate::model::{CausalLm, Conditioning};

/// A micro-batch's buffers as tensors on the model's device.
#[derive(Debug)]
pub struct BatchTensors {
    /// B: pairs; the batch has 2B rows, responses a then responses b.
    pub pairs: i64,
    /// [2B, T] int64
    pub input_ids: Tensor,
    /// [2B, T] int64, 1 on tokens, 0 on right padding
    pub attention_mask: Tensor,
    /// [N] int64: flat indices into the `[2B, T - 1]` positions of the hidden states that
    /// predict a response token (position j predicts token j + 1), in row-major order.
    pub predictors: Tensor,
    /// How many of `predictors` lie in the a rows (they come first).
    pub a_predictors: i64,
    /// Real (non-padding) tokens of the 2B rows, counted on the host.
    pub tokens: i64,
}

/// Flat indices `row * (T - 1) + j` of the positions j whose next token is a response token.
fn predictor_positions(response_mask: &[i64], rows: usize, t: usize) -> Vec<i64> {
    let mut positions = Vec::new();
    for row in 0..rows {
        for j in 0..t.saturating_sub(1) {
            if response_mask[row * t + j + 1] != 0 {
                positions.push((row * (t - 1) + j) as i64);
            }
        }
    }
    positions
}

impl BatchTensors {
    pub fn new(batch: &MicroBatch, device: Device) -> Self {
        let (rows, t) = (2 * batch.pairs, batch.seq_len);
        let tensor = |values: &[i64]| {
            Tensor::from_slice(values)
                .view([rows as i64, t as i64])
                .to_device(device)
        };
        let predictors = predictor_positions(&batch.response_mask, rows, t);
        BatchTensors {
            pairs: batch.pairs as i64,
            input_ids: tensor(&batch.input_ids),
            attention_mask: tensor(&batch.attention_mask),
            a_predictors: predictors
                .iter()
                .filter(|&&p| p < (batch.pairs * (t - 1)) as i64)
                .count() as i64,
            predictors: Tensor::from_slice(&predictors).to_device(device),
            tokens: batch.attention_mask.iter().sum(),
        }
    }

    /// T: the padded sequence length.
    pub fn seq_len(&self) -> i64 {
        self.input_ids.size()[1]
    }

    /// The batch with every pair repeated `copies` times, as a batch of `copies * B` pairs:
    /// rows [a x copies; b x copies], so pair `c * B + j` is pair j. Several weight vectors
    /// then share one forward, one per copy.
    pub fn replicated(&self, copies: i64) -> BatchTensors {
        let b = self.pairs;
        let replicate = |t: &Tensor| {
            let a = t.narrow(0, 0, b).repeat([copies, 1]);
            let rejected = t.narrow(0, b, b).repeat([copies, 1]);
            Tensor::cat(&[a, rejected], 0)
        };
        // Predictor positions of the a rows come first (row-major). Copy c of a row of a sits
        // c B rows further down; copy c of a row of b, (copies - 1 + c) B rows further down.
        let per_half = b * (self.seq_len() - 1); // positions in B rows
        let (n_a, n) = (self.a_predictors, self.predictors.size()[0]);
        let (in_a, in_b) = (
            self.predictors.narrow(0, 0, n_a),
            self.predictors.narrow(0, n_a, n - n_a),
        );
        let mut parts: Vec<Tensor> = (0..copies).map(|c| &in_a + c * per_half).collect();
        parts.extend((0..copies).map(|c| &in_b + (copies - 1 + c) * per_half));
        BatchTensors {
            pairs: copies * b,
            input_ids: replicate(&self.input_ids),
            attention_mask: replicate(&self.attention_mask),
            predictors: Tensor::cat(&parts, 0),
            a_predictors: n_a * copies,
            tokens: self.tokens * copies,
        }
    }
}

/// Response log-probabilities of every row from the decoder's final hidden states: [rows] in
/// f32. Only the `predictors` positions ([N] flat indices into `[rows, T - 1]`) go through the
/// LM head, so the `[rows, T, vocab]` logits of prompts and padding are never built.
/// hidden: [rows, T, H]; input_ids: [rows, T].
pub fn logps_from_hidden(
    model: &CausalLm,
    hidden: &Tensor,
    input_ids: &Tensor,
    predictors: &Tensor,
) -> Tensor {
    let (rows, t, h) = (hidden.size()[0], hidden.size()[1], hidden.size()[2]);
    let scored = hidden
        .narrow(1, 0, t - 1)
        .reshape([-1, h])
        .index_select(0, predictors); // [N, H]
    let targets = input_ids
        .narrow(1, 1, t - 1)
        .reshape([-1])
        .index_select(0, predictors); // [N]
    let logits = model.logits_from_hidden(&scored); // [N, vocab]
    let token_logps = logits
        .log_softmax(-1, Kind::Float)
        .gather(1, &targets.unsqueeze(1), false)
        .squeeze_dim(1); // [N]
    let row_of = predictors.floor_divide_scalar(t - 1); // [N]
    Tensor::zeros([rows], (Kind::Float, hidden.device())).index_add(0, &row_of, &token_logps)
}

/// Response log-probabilities of every row: [rows] in f32, for callers holding only tensors
/// (the positions are found with a `nonzero`, which waits on the device).
/// input_ids, attention_mask, response_mask: [rows, T]; a `Weighted` conditioning holds one
/// weight vector per row.
pub fn response_logps(
    model: &CausalLm,
    input_ids: &Tensor,
    attention_mask: &Tensor,
    response_mask: &Tensor,
    conditioning: Conditioning,
) -> Tensor {
    let t = input_ids.size()[1];
    let hidden = model.hidden_states(input_ids, attention_mask, conditioning); // [rows, T, H]
    let predictors = response_mask
        .narrow(1, 1, t - 1)
        .reshape([-1])
        .nonzero()
        .squeeze_dim(1); // [N]
    logps_from_hidden(model, &hidden, input_ids, &predictors)
}

/// The conditioning of a batch's 2B rows: a `Weighted` one holds one weight vector per pair,
/// [B, k], and both responses of a pair see the same `w`, so it becomes [2B, k].
pub fn per_row(conditioning: Conditioning) -> RowConditioning {
    match conditioning {
        Conditioning::Weighted(w) => RowConditioning::Weighted(Tensor::cat(&[w, w], 0)),
        Conditioning::Reference => RowConditioning::Reference,
        Conditioning::SharedOnly => RowConditioning::SharedOnly,
    }
}

/// A [`Conditioning`] over the rows of a batch, owning its per-row weights.
pub enum RowConditioning {
    Reference,
    SharedOnly,
    /// [2B, k]
    Weighted(Tensor),
}

impl RowConditioning {
    pub fn as_conditioning(&self) -> Conditioning<'_> {
        match self {
            RowConditioning::Reference => Conditioning::Reference,
            RowConditioning::SharedOnly => Conditioning::SharedOnly,
            RowConditioning::Weighted(w) => Conditioning::Weighted(w),
        }
    }
}

/// `(log pi(y_a | x), log pi(y_b | x))`, each [B], from the final hidden states [2B, T, H].
pub fn pair_logps_from_hidden(
    model: &CausalLm,
    batch: &BatchTensors,
    hidden: &Tensor,
) -> (Tensor, Tensor) {
    let logps = logps_from_hidden(model, hidden, &batch.input_ids, &batch.predictors); // [2B]
    (
        logps.narrow(0, 0, batch.pairs),
        logps.narrow(0, batch.pairs, batch.pairs),
    )
}

/// `(log pi(y_a | x; w), log pi(y_b | x; w))`, each [B]. `Weighted` conditioning holds one
/// weight vector per pair, [B, k]: both responses of a pair see the same `w`.
pub fn sequence_logps(
    model: &CausalLm,
    batch: &BatchTensors,
    conditioning: Conditioning,
) -> (Tensor, Tensor) {
    let rows = per_row(conditioning);
    let hidden = model.hidden_states(
        &batch.input_ids,
        &batch.attention_mask,
        rows.as_conditioning(),
    ); // [2B, T, H]
    pair_logps_from_hidden(model, batch, &hidden)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A micro-batch of 2 pairs, T = 5: response tokens marked in `response_mask`.
    fn batch() -> MicroBatch {
        #[rustfmt::skip]
        let response_mask = vec![
            0, 0, 1, 1, 0, // a of pair 0
            0, 1, 1, 1, 1, // a of pair 1
            0, 0, 0, 1, 0, // b of pair 0
            0, 0, 1, 1, 1, // b of pair 1
        ];
        let attention_mask: Vec<i64> = response_mask
            .chunks(5)
            .flat_map(|row| {
                let last = row.iter().rposition(|&m| m == 1).unwrap();
                (0..5).map(move |t| i64::from(t <= last))
            })
            .collect();
        MicroBatch {
            pair_ids: vec![0, 1],
            pairs: 2,
            seq_len: 5,
            dimensions: 1,
            input_ids: (0..20).collect(),
            attention_mask,
            response_mask,
            preferences: vec![1, -1],
            scores_a: vec![1.0, 0.0],
            scores_b: vec![0.0, 1.0],
            conflict: vec![0, 0],
        }
    }

    /// The positions `nonzero` finds on the device, from a response mask [rows, T].
    fn device_positions(response_mask: &Tensor) -> Vec<i64> {
        let t = response_mask.size()[1];
        Vec::<i64>::try_from(
            response_mask
                .narrow(1, 1, t - 1)
                .reshape([-1])
                .nonzero()
                .squeeze_dim(1),
        )
        .unwrap()
    }

    #[test]
    fn host_positions_match_nonzero_and_survive_replication() {
        let micro = batch();
        let tensors = BatchTensors::new(&micro, Device::Cpu);
        let mask = Tensor::from_slice(&micro.response_mask).view([4, 5]);
        let found = Vec::<i64>::try_from(&tensors.predictors).unwrap();
        assert_eq!(found, device_positions(&mask));
        assert_eq!(tensors.a_predictors, 2 + 4);
        assert_eq!(tensors.tokens, micro.attention_mask.iter().sum::<i64>());
        // Replicated rows [a x 3; b x 3], as `replicated` lays them out.
        let copies = 3;
        let replicated = tensors.replicated(copies);
        let (a, b) = (mask.narrow(0, 0, 2), mask.narrow(0, 2, 2));
        let expected_mask = Tensor::cat(&[a.repeat([copies, 1]), b.repeat([copies, 1])], 0);
        assert_eq!(
            Vec::<i64>::try_from(&replicated.predictors).unwrap(),
            device_positions(&expected_mask)
        );
        assert_eq!(replicated.a_predictors, 3 * tensors.a_predictors);
        assert_eq!(replicated.tokens, 3 * tensors.tokens);
        assert_eq!(replicated.input_ids.size(), [12, 5]);
    }
}
