//! Sequence log-probabilities of responses under the policy: `log pi(y | x; w)`, the sum of
//! the response tokens' log-probabilities (prompt and padding excluded, METHOD.md section 2).
//! Both responses of every pair go through one concatenated forward.

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
    /// [2B, T] bool, true on response tokens (EOS included)
    pub response_mask: Tensor,
}

impl BatchTensors {
    pub fn new(batch: &MicroBatch, device: Device) -> Self {
        let shape = [2 * batch.pairs as i64, batch.seq_len as i64];
        let tensor = |values: &[i64]| Tensor::from_slice(values).view(shape).to_device(device);
        BatchTensors {
            pairs: batch.pairs as i64,
            input_ids: tensor(&batch.input_ids),
            attention_mask: tensor(&batch.attention_mask),
            response_mask: tensor(&batch.response_mask).ne(0),
        }
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
        BatchTensors {
            pairs: copies * b,
            input_ids: replicate(&self.input_ids),
            attention_mask: replicate(&self.attention_mask),
            response_mask: replicate(&self.response_mask),
        }
    }
}

/// Response log-probabilities of every row: [rows] in f32.
///
/// Only positions that predict a response token go through the LM head, so the `[rows, T,
/// vocab]` logits of prompts and padding are never built. rows: input_ids, attention_mask,
/// response_mask [rows, T]; a `Weighted` conditioning holds one weight vector per row.
pub fn response_logps(
    model: &CausalLm,
    input_ids: &Tensor,
    attention_mask: &Tensor,
    response_mask: &Tensor,
    conditioning: Conditioning,
) -> Tensor {
    let (rows, t) = (input_ids.size()[0], input_ids.size()[1]);
    let hidden = model.hidden_states(input_ids, attention_mask, conditioning); // [rows, T, H]
    let h = hidden.size()[2];
    // Position j predicts token j + 1: a response token at j + 1 is scored from hidden[j].
    let predicts_response = response_mask.narrow(1, 1, t - 1).reshape([-1]); // [rows (T-1)]
    let positions = predicts_response.nonzero().squeeze_dim(1); // [N]
    let predictors = hidden
        .narrow(1, 0, t - 1)
        .reshape([-1, h])
        .index_select(0, &positions); // [N, H]
    let targets = input_ids
        .narrow(1, 1, t - 1)
        .reshape([-1])
        .index_select(0, &positions); // [N]
    let logits = model.logits_from_hidden(&predictors); // [N, vocab]
    let token_logps = logits
        .log_softmax(-1, Kind::Float)
        .gather(1, &targets.unsqueeze(1), false)
        .squeeze_dim(1); // [N]
    let row_of = positions.floor_divide_scalar(t - 1); // [N]
    Tensor::zeros([rows], (Kind::Float, input_ids.device())).index_add(0, &row_of, &token_logps)
}

/// `(log pi(y_a | x; w), log pi(y_b | x; w))`, each [B]. `Weighted` conditioning holds one
/// weight vector per pair, [B, k]: both responses of a pair see the same `w`.
pub fn sequence_logps(
    model: &CausalLm,
    batch: &BatchTensors,
    conditioning: Conditioning,
) -> (Tensor, Tensor) {
    let per_row;
    let conditioning = match conditioning {
        Conditioning::Weighted(w) => {
            per_row = Tensor::cat(&[w, w], 0); // [2B, k]
            Conditioning::Weighted(&per_row)
        }
        other => other,
    };
    let logps = response_logps(
        model,
        &batch.input_ids,
        &batch.attention_mask,
        &batch.response_mask,
        conditioning,
    ); // [2B]
    (
        logps.narrow(0, 0, batch.pairs),
        logps.narrow(0, batch.pairs, batch.pairs),
    )
}
