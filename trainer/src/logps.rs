//! Sequence log-probabilities of responses under the policy: `log pi(y | x; w)`, the sum of
//! the response tokens' log-probabilities (prompt and padding excluded, METHOD.md section 2).
//! Both responses of every pair go through one concatenated forward.
//!
//! Which positions are scored is worked out on the host from the micro-batch's buffers, so a
//! training step never waits on the device for a `nonzero` (METHOD.md section 9, no host
//! synchronisation inside the step).

use tch::{Device, Kind, Tensor};

use crate::data::{MicroBatch, TokenizedPair};
use crate::model::{CausalLm, Conditioning, SharedPrefixRows, TokenLayout};

/// How the rows of a [`BatchTensors`] hold a micro-batch's pairs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowLayout {
    /// 2B right-padded rows: prompt + response a of every pair, then prompt + response b.
    ResponsePerRow,
    /// B rows of prompt + response a + response b: the prompt goes through the model once for
    /// both responses. Response b attends to the prompt and itself only, at the positions it
    /// would have after the prompt in a row of its own, so its log-probabilities are those of
    /// [`RowLayout::ResponsePerRow`] (and so are the gradients, the prompt's summed).
    SharedPrompt,
}

impl RowLayout {
    /// The layout training uses for `[train] share_prompt`.
    pub fn new(share_prompt: bool) -> Self {
        match share_prompt {
            true => RowLayout::SharedPrompt,
            false => RowLayout::ResponsePerRow,
        }
    }

    /// The length of the row a pair becomes in this layout: what batches are grouped by, so
    /// that they pad little.
    pub fn row_length(self) -> fn(&TokenizedPair) -> usize {
        match self {
            RowLayout::ResponsePerRow => TokenizedPair::seq_len,
            RowLayout::SharedPrompt => TokenizedPair::shared_row_len,
        }
    }
}

/// Token ids used for padding in shared-prompt rows: padding is never attended to nor
/// scored, so any id in the vocabulary does.
const SHARED_PROMPT_PAD_ID: i64 = 0;

/// A micro-batch's buffers as tensors on the model's device.
#[derive(Debug)]
pub struct BatchTensors {
    /// B: pairs.
    pub pairs: i64,
    /// [R, T] int64, R = 2B rows (responses a, then b) or B rows (shared prompt)
    pub input_ids: Tensor,
    /// [R, T] int64, 1 on tokens, 0 on right padding
    pub attention_mask: Tensor,
    /// Shared prompt only: each token's segment (prompt, response a, response b, padding),
    /// its position (restarting after the prompt for response b), and the indices through
    /// which response b attends the prompt and itself without a mask.
    pub shared_prompt: Option<SharedPrefixRows>,
    /// [N] int64: flat indices into the `[R * T]` hidden states of the positions that predict
    /// a response token, those predicting response a first (row-major), then response b.
    pub predictors: Tensor,
    /// [N] int64: the response token each predictor predicts.
    pub targets: Tensor,
    /// [N] int64: which log-probability each token adds to: pair j's response a to j, its
    /// response b to B + j.
    pub slots: Tensor,
    /// How many of `predictors` predict response a (they come first).
    pub a_predictors: i64,
    /// Real tokens of the pairs as prompt + response sequences (the prompt counted for each
    /// response, whatever the layout, so throughput compares across layouts), on the host.
    pub tokens: i64,
}

/// One scored token on the host: `(flat predictor position, target token, slot)`.
type Scored = (i64, i64, i64);

/// The scored tokens of one row of `batch` (one response after its prompt), predicted from
/// the row's own positions: row r of 2B, its tokens t >= 1 in the response mask.
fn response_row_scored(batch: &MicroBatch, row: usize) -> Vec<Scored> {
    let t = batch.seq_len;
    (1..t)
        .filter(|&j| batch.response_mask[row * t + j] != 0)
        .map(|j| {
            (
                (row * t + j - 1) as i64,
                batch.input_ids[row * t + j],
                row as i64,
            )
        })
        .collect()
}

/// Prompt length and the prompt + response tokens of a row of `batch` (2B rows).
fn row_parts(batch: &MicroBatch, row: usize) -> (usize, &[i64]) {
    let t = batch.seq_len;
    let ids = &batch.input_ids[row * t..(row + 1) * t];
    let mask = &batch.response_mask[row * t..(row + 1) * t];
    let len = batch.attention_mask[row * t..(row + 1) * t]
        .iter()
        .filter(|&&m| m != 0)
        .count();
    let prompt = mask.iter().position(|&m| m != 0).unwrap_or(len);
    (prompt, &ids[..len])
}

fn to_tensor(values: &[i64], shape: &[i64], device: Device) -> Tensor {
    Tensor::from_slice(values).view(shape).to_device(device)
}

fn scored_tensors(scored: &[Scored], device: Device) -> [Tensor; 3] {
    let column = |f: fn(&Scored) -> i64| {
        Tensor::from_slice(&scored.iter().map(f).collect::<Vec<_>>()).to_device(device)
    };
    [column(|s| s.0), column(|s| s.1), column(|s| s.2)]
}

impl BatchTensors {
    /// 2B rows, one response each ([`RowLayout::ResponsePerRow`]).
    pub fn new(batch: &MicroBatch, device: Device) -> Self {
        let (b, rows, t) = (batch.pairs, 2 * batch.pairs, batch.seq_len);
        let scored: Vec<Scored> = (0..rows)
            .flat_map(|row| response_row_scored(batch, row))
            .collect();
        let [predictors, targets, slots] = scored_tensors(&scored, device);
        BatchTensors {
            pairs: b as i64,
            input_ids: to_tensor(&batch.input_ids, &[rows as i64, t as i64], device),
            attention_mask: to_tensor(&batch.attention_mask, &[rows as i64, t as i64], device),
            shared_prompt: None,
            a_predictors: scored.iter().filter(|s| s.2 < b as i64).count() as i64,
            predictors,
            targets,
            slots,
            tokens: batch.attention_mask.iter().sum(),
        }
    }

    /// B rows of prompt + response a + response b ([`RowLayout::SharedPrompt`]), from the
    /// same micro-batch.
    pub fn shared_prompt(batch: &MicroBatch, device: Device) -> Self {
        let b = batch.pairs;
        // Per pair: the prompt, then each response.
        let parts: Vec<(&[i64], &[i64], &[i64])> = (0..b)
            .map(|j| {
                let (prompt_len, row_a) = row_parts(batch, j);
                let (prompt_len_b, row_b) = row_parts(batch, b + j);
                debug_assert_eq!(row_a[..prompt_len], row_b[..prompt_len_b]);
                (
                    &row_a[..prompt_len],
                    &row_a[prompt_len..],
                    &row_b[prompt_len_b..],
                )
            })
            .collect();
        let t = parts
            .iter()
            .map(|(p, a, r)| p.len() + a.len() + r.len())
            .max()
            .unwrap_or(0);
        let mut input_ids = vec![SHARED_PROMPT_PAD_ID; b * t];
        let mut attention_mask = vec![0i64; b * t];
        let mut segments = vec![-1i64; b * t];
        let mut positions = vec![0i64; b * t];
        // Response b's view [prompt | b | padding] of each row, and where each token's
        // attention output comes from (the row's, or a_end + its place in the view).
        let t2 = parts
            .iter()
            .map(|(p, _, r)| p.len() + r.len())
            .max()
            .unwrap_or(0);
        let mut b_view = vec![0i64; b * t2];
        // The first attention runs over the rows' first a_end tokens: every prompt and a.
        let a_end = parts
            .iter()
            .map(|(p, a, _)| p.len() + a.len())
            .max()
            .unwrap_or(0);
        let mut merge: Vec<i64> = (0..b).flat_map(|_| 0..t as i64).collect();
        let (mut scored_a, mut scored_b): (Vec<Scored>, Vec<Scored>) = (Vec::new(), Vec::new());
        for (j, (prompt, a, rejected)) in parts.iter().enumerate() {
            let row = j * t;
            let p = prompt.len();
            assert!(p >= 1, "a prompt precedes every response");
            let tokens = prompt.iter().chain(a.iter()).chain(rejected.iter());
            for (i, &id) in tokens.enumerate() {
                input_ids[row + i] = id;
                attention_mask[row + i] = 1;
                let (segment, position) = match i {
                    i if i < p => (0, i),
                    i if i < p + a.len() => (1, i),
                    i => (2, i - a.len()),
                };
                segments[row + i] = segment;
                positions[row + i] = position as i64;
                // Prompt and b tokens sit in b's view at their position.
                if segment != 1 {
                    b_view[j * t2 + position] = i as i64;
                }
                if segment == 2 {
                    merge[row + i] = (a_end + position) as i64;
                }
            }
            // Response a as in its own row: token i at p + i, predicted from p + i - 1.
            for (i, &id) in a.iter().enumerate() {
                scored_a.push(((row + p + i - 1) as i64, id, j as i64));
            }
            // Response b: its first token is predicted from the prompt's last position, the
            // others from the previous b token.
            let b_start = p + a.len();
            for (i, &id) in rejected.iter().enumerate() {
                let from = if i == 0 { p - 1 } else { b_start + i - 1 };
                scored_b.push(((row + from) as i64, id, (b + j) as i64));
            }
        }
        let a_predictors = scored_a.len() as i64;
        scored_a.extend(scored_b);
        let [predictors, targets, slots] = scored_tensors(&scored_a, device);
        let shape = [b as i64, t as i64];
        BatchTensors {
            pairs: b as i64,
            input_ids: to_tensor(&input_ids, &shape, device),
            attention_mask: to_tensor(&attention_mask, &shape, device),
            shared_prompt: Some(SharedPrefixRows {
                segments: to_tensor(&segments, &shape, device),
                positions: to_tensor(&positions, &shape, device),
                a_end: a_end as i64,
                b_view: to_tensor(&b_view, &[b as i64, t2 as i64], device),
                merge: to_tensor(&merge, &shape, device),
            }),
            predictors,
            targets,
            slots,
            a_predictors,
            tokens: batch.attention_mask.iter().sum(),
        }
    }

    /// Either layout of `batch`.
    pub fn with_layout(batch: &MicroBatch, layout: RowLayout, device: Device) -> Self {
        match layout {
            RowLayout::ResponsePerRow => Self::new(batch, device),
            RowLayout::SharedPrompt => Self::shared_prompt(batch, device),
        }
    }

    /// How the rows hold the pairs: shared-prompt rows are the ones with segments.
    pub fn layout(&self) -> RowLayout {
        match self.shared_prompt {
            Some(_) => RowLayout::SharedPrompt,
            None => RowLayout::ResponsePerRow,
        }
    }

    /// T: the padded sequence length.
    pub fn seq_len(&self) -> i64 {
        self.input_ids.size()[1]
    }

    /// The attention pattern and rotary positions the model runs these rows with.
    pub fn token_layout(&self, model: &CausalLm) -> TokenLayout {
        match &self.shared_prompt {
            None => model.padded_layout(&self.attention_mask),
            Some(rows) => model.shared_prefix_layout(rows),
        }
    }

    /// The batch with every pair repeated `copies` times, as a batch of `copies * B` pairs in
    /// which pair `c * B + j` is pair j. Several weight vectors then share one forward, one per
    /// copy. Rows: [a x copies; b x copies] one response per row, [rows x copies] with a
    /// shared prompt. Computed on the device, without waiting on it.
    pub fn replicated(&self, copies: i64) -> BatchTensors {
        let b = self.pairs;
        let t = self.seq_len();
        let replicate = |x: &Tensor| match self.layout() {
            RowLayout::ResponsePerRow => {
                let a = x.narrow(0, 0, b).repeat([copies, 1]);
                let rejected = x.narrow(0, b, b).repeat([copies, 1]);
                Tensor::cat(&[a, rejected], 0)
            }
            RowLayout::SharedPrompt => x.repeat([copies, 1]),
        };
        // Copy c of a row sits c B rows further down, and with a row per response, the b rows
        // of every copy sit after all the a rows: (copies - 1) B rows further still.
        let b_rows_after_a = match self.layout() {
            RowLayout::ResponsePerRow => (copies - 1) * b,
            RowLayout::SharedPrompt => 0,
        };
        let (n_a, n) = (self.a_predictors, self.predictors.size()[0]);
        let split = |x: &Tensor| (x.narrow(0, 0, n_a), x.narrow(0, n_a, n - n_a));
        let (predictors_a, predictors_b) = split(&self.predictors);
        let (targets_a, targets_b) = split(&self.targets);
        let (slots_a, slots_b) = split(&self.slots);
        let mut predictors: Vec<Tensor> = (0..copies).map(|c| &predictors_a + c * b * t).collect();
        predictors.extend((0..copies).map(|c| &predictors_b + (b_rows_after_a + c * b) * t));
        // Slots: a of pair c B + j at c B + j; b at copies B + c B + j.
        let mut slots: Vec<Tensor> = (0..copies).map(|c| &slots_a + c * b).collect();
        slots.extend((0..copies).map(|c| &slots_b + (copies - 1 + c) * b));
        BatchTensors {
            pairs: copies * b,
            input_ids: replicate(&self.input_ids),
            attention_mask: replicate(&self.attention_mask),
            shared_prompt: self.shared_prompt.as_ref().map(|r| r.repeated(copies)),
            predictors: Tensor::cat(&predictors, 0),
            targets: Tensor::cat(&[targets_a.repeat([copies]), targets_b.repeat([copies])], 0),
            slots: Tensor::cat(&slots, 0),
            a_predictors: n_a * copies,
            tokens: self.tokens * copies,
        }
    }
}

/// `(|y_a|, |y_b|)` of a micro-batch's pairs, in tokens (EOS included), in the order
/// [`crate::data::collate`] keeps them: [B] f32 each.
pub fn response_lengths(pairs: &[&TokenizedPair], device: Device) -> (Tensor, Tensor) {
    let lengths = |of: fn(&TokenizedPair) -> usize| {
        let values: Vec<f32> = pairs.iter().map(|p| of(p) as f32).collect();
        Tensor::from_slice(&values).to_device(device)
    };
    (
        lengths(|p| p.response_a_ids.len()),
        lengths(|p| p.response_b_ids.len()),
    )
}

/// Sums of scored tokens' log-probabilities from the final hidden states of the scored
/// positions ([`CausalLm::hidden_states_at`]): scored [N, H] -> [outputs] in f32. Only those
/// positions go through the LM head, so the `[R, T, vocab]` logits of prompts and padding are
/// never built; each token's log-probability of its `targets` id ([N]) adds to its `slots`
/// entry ([N]).
pub fn logps_from_scored(
    model: &CausalLm,
    scored: &Tensor,
    targets: &Tensor,
    slots: &Tensor,
    outputs: i64,
) -> Tensor {
    let chunk_rows = (LOGITS_CHUNK_ELEMENTS / model.config().vocab_size).max(1);
    let token_logps = token_logps(model, scored, targets, chunk_rows); // [N]
    Tensor::zeros([outputs], (Kind::Float, scored.device())).index_add(0, slots, &token_logps)
}

/// Rows of `[rows, vocab]` logits that exist at once when tokens are scored: 2^26 f32 values
/// (256 MiB, 512 rows of Llama-3's 128k vocabulary), where all N scored positions of a
/// micro-batch at the paper's scale would take several GiB.
const LOGITS_CHUNK_ELEMENTS: i64 = 1 << 26;

/// `log p(target_i | h_i)` of each scored hidden state: [N] in f32, from scored [N, H] and
/// targets [N], with the LM head and the log-softmax run over `chunk_rows` rows at a time, so
/// that no more than one chunk of logits exists, in the forward or the backward.
///
/// Each token's log-probability depends on its own hidden row only, so when `scored` needs a
/// gradient, each chunk also yields `J_i = d log p_i / d h_i` ([H], by `autograd.grad` on the
/// chunk: `(onehot(target_i) - softmax_i) W`), and the result is
/// `value + (h_i . J_i - stop_gradient(h_i . J_i))`: its value is exactly the log-probability
/// (the two dot products cancel to 0) and its gradient with respect to `h_i` is `g_i J_i`, what
/// the backward of the whole log-softmax would give. The matrix product the backward would do
/// moves into the forward, and only `J` ([N, H]) is kept for the backward. The head's weight
/// gets no gradient this way; it is frozen in training.
pub fn token_logps(model: &CausalLm, scored: &Tensor, targets: &Tensor, chunk_rows: i64) -> Tensor {
    let n = scored.size()[0];
    let needs_gradient = scored.requires_grad();
    let (mut values, mut jacobians) = (Vec::new(), Vec::new());
    for start in (0..n).step_by(chunk_rows.max(1) as usize) {
        let rows = chunk_rows.min(n - start);
        let h = scored.narrow(0, start, rows).detach(); // [rows, H]
        let h = if needs_gradient {
            h.set_requires_grad(true)
        } else {
            h
        };
        let logps = model
            .logits_from_hidden(&h) // [rows, vocab]
            .log_softmax(-1, Kind::Float)
            .gather(1, &targets.narrow(0, start, rows).unsqueeze(1), false)
            .squeeze_dim(1); // [rows]
        if needs_gradient {
            let sum = logps.sum(Kind::Float);
            jacobians.push(Tensor::run_backward(&[&sum], &[&h], false, false).remove(0));
        }
        values.push(logps.detach());
    }
    if values.is_empty() {
        return Tensor::zeros([0], (Kind::Float, scored.device()));
    }
    let values = Tensor::cat(&values, 0); // [N]
    if !needs_gradient {
        return values;
    }
    let jacobian = Tensor::cat(&jacobians, 0); // [N, H]
    let dot = (scored * &jacobian).sum_dim_intlist(-1, false, Kind::Float); // [N]
    values + (&dot - dot.detach())
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
    let (rows, t) = (input_ids.size()[0], input_ids.size()[1]);
    // Position j predicts token j + 1; the last position predicts nothing.
    let shift =
        |x: &Tensor| Tensor::cat(&[x.narrow(1, 1, t - 1), x.narrow(1, 0, 1).zeros_like()], 1);
    let predictors = shift(response_mask).reshape([-1]).nonzero().squeeze_dim(1); // [N]
    let targets = shift(input_ids).reshape([-1]).index_select(0, &predictors); // [N]
    let slots = predictors.floor_divide_scalar(t); // [N]
    let layout = model.padded_layout(attention_mask);
    let scored = model.hidden_states_at(input_ids, &layout, conditioning, &predictors); // [N, H]
    logps_from_scored(model, &scored, &targets, &slots, rows)
}

/// The conditioning of a batch's rows: a `Weighted` one holds one weight vector per pair,
/// [B, k]; with a row per response both rows of a pair see it, so it becomes [2B, k].
pub fn per_row(batch: &BatchTensors, conditioning: Conditioning) -> RowConditioning {
    match conditioning {
        Conditioning::Weighted(w) => RowConditioning::Weighted(match batch.layout() {
            RowLayout::ResponsePerRow => Tensor::cat(&[w, w], 0),
            RowLayout::SharedPrompt => w.shallow_clone(),
        }),
        Conditioning::Reference => RowConditioning::Reference,
        Conditioning::SharedOnly => RowConditioning::SharedOnly,
        Conditioning::Dimension(i) => RowConditioning::Dimension(i),
    }
}

/// A [`Conditioning`] over the rows of a batch, owning its per-row weights.
pub enum RowConditioning {
    Reference,
    SharedOnly,
    /// [R, k]
    Weighted(Tensor),
    Dimension(i64),
}

impl RowConditioning {
    pub fn as_conditioning(&self) -> Conditioning<'_> {
        match self {
            RowConditioning::Reference => Conditioning::Reference,
            RowConditioning::SharedOnly => Conditioning::SharedOnly,
            RowConditioning::Weighted(w) => Conditioning::Weighted(w),
            RowConditioning::Dimension(i) => Conditioning::Dimension(*i),
        }
    }
}

/// `(log pi(y_a | x), log pi(y_b | x))`, each [B], from the final hidden states at the
/// batch's predictor positions, [N, H] in the order of `batch.predictors`.
pub fn pair_logps_from_scored(
    model: &CausalLm,
    batch: &BatchTensors,
    scored: &Tensor,
) -> (Tensor, Tensor) {
    let b = batch.pairs;
    let logps = logps_from_scored(model, scored, &batch.targets, &batch.slots, 2 * b); // [2B]
    (logps.narrow(0, 0, b), logps.narrow(0, b, b))
}

/// `(log pi(y_a | x; w), log pi(y_b | x; w))`, each [B]. `Weighted` conditioning holds one
/// weight vector per pair, [B, k]: both responses of a pair see the same `w`.
pub fn sequence_logps(
    model: &CausalLm,
    batch: &BatchTensors,
    conditioning: Conditioning,
) -> (Tensor, Tensor) {
    let rows = per_row(batch, conditioning);
    let layout = batch.token_layout(model);
    let scored = model.hidden_states_at(
        &batch.input_ids,
        &layout,
        rows.as_conditioning(),
        &batch.predictors,
    ); // [N, H]
    pair_logps_from_scored(model, batch, &scored)
}

#[cfg(test)]
mod tests;
