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

/// The predictor positions `nonzero` finds on the device from a response mask [rows, T]:
/// flat `row * T + j` where token j + 1 is a response token.
fn device_positions(response_mask: &Tensor) -> Vec<i64> {
    let t = response_mask.size()[1];
    let shifted = Tensor::cat(
        &[
            response_mask.narrow(1, 1, t - 1),
            response_mask.narrow(1, 0, 1).zeros_like(),
        ],
        1,
    );
    Vec::<i64>::try_from(shifted.reshape([-1]).nonzero().squeeze_dim(1)).unwrap()
}

fn values(t: &Tensor) -> Vec<i64> {
    Vec::<i64>::try_from(t).unwrap()
}

#[test]
fn host_positions_match_nonzero_and_survive_replication() {
    let micro = batch();
    let tensors = BatchTensors::new(&micro, Device::Cpu);
    let mask = Tensor::from_slice(&micro.response_mask).view([4, 5]);
    let found = values(&tensors.predictors);
    assert_eq!(found, device_positions(&mask));
    // Each predicts the next token (input ids are 0..20, row-major), summed into its row.
    assert_eq!(
        values(&tensors.targets),
        found.iter().map(|p| p + 1).collect::<Vec<_>>()
    );
    assert_eq!(
        values(&tensors.slots),
        found.iter().map(|p| p / 5).collect::<Vec<_>>()
    );
    assert_eq!(tensors.a_predictors, 2 + 4);
    assert_eq!(tensors.tokens, micro.attention_mask.iter().sum::<i64>());
    // Replicated rows [a x 3; b x 3], as `replicated` lays them out.
    let copies = 3;
    let replicated = tensors.replicated(copies);
    let (a, b) = (mask.narrow(0, 0, 2), mask.narrow(0, 2, 2));
    let expected_mask = Tensor::cat(&[a.repeat([copies, 1]), b.repeat([copies, 1])], 0);
    let positions = device_positions(&expected_mask);
    assert_eq!(values(&replicated.predictors), positions);
    let ids = values(&replicated.input_ids.reshape([-1]));
    assert_eq!(
        values(&replicated.targets),
        positions
            .iter()
            .map(|&p| ids[p as usize + 1])
            .collect::<Vec<_>>()
    );
    assert_eq!(
        values(&replicated.slots),
        positions.iter().map(|p| p / 5).collect::<Vec<_>>()
    );
    assert_eq!(replicated.a_predictors, 3 * tensors.a_predictors);
    assert_eq!(replicated.tokens, 3 * tensors.tokens);
    assert_eq!(replicated.input_ids.size(), [12, 5]);
}

/// The chunked LM head (`token_logps`, 3 rows per chunk for 10 positions, the last chunk
/// short) against the whole log-softmax at once, as the forward was before: the values,
/// and the gradients of a random weighting `sum_i g_i log p_i` with respect to the hidden
/// states. Without a gradient the chunked values come back detached.
#[test]
fn chunked_lm_head_equals_the_whole_log_softmax() {
    let dir = tempfile::tempdir().unwrap();
    crate::model::tiny::write_tiny_model(dir.path(), &Default::default(), 3).unwrap();
    let loaded = crate::model::load_model(dir.path(), None, Device::Cpu, Kind::Float).unwrap();
    let model = &loaded.model;
    tch::manual_seed(0);
    let hidden_size = model.config().hidden_size;
    let vocab = model.config().vocab_size;
    let scored = Tensor::randn([10, hidden_size], (Kind::Float, Device::Cpu));
    let targets = Tensor::randint(vocab, [10], (Kind::Int64, Device::Cpu));
    let weights = Tensor::randn([10], (Kind::Float, Device::Cpu));

    let leaf = scored.detach().set_requires_grad(true);
    let whole = model
        .logits_from_hidden(&leaf)
        .log_softmax(-1, Kind::Float)
        .gather(1, &targets.unsqueeze(1), false)
        .squeeze_dim(1);
    (&whole * &weights).sum(Kind::Float).backward();
    let whole_grad = leaf.grad();

    let leaf = scored.detach().set_requires_grad(true);
    let chunked = token_logps(model, &leaf, &targets, 3);
    (&chunked * &weights).sum(Kind::Float).backward();
    let max_diff = |a: &Tensor, b: &Tensor| f64::try_from((a - b).abs().max()).unwrap();
    assert!(max_diff(&chunked, &whole) <= 1e-6, "values differ");
    let scale = f64::try_from(whole_grad.abs().max()).unwrap();
    assert!(
        max_diff(&leaf.grad(), &whole_grad) <= 1e-5 * scale,
        "gradients differ"
    );

    let no_grad = token_logps(model, &scored, &targets, 4);
    assert!(!no_grad.requires_grad());
    assert!(max_diff(&no_grad, &whole) <= 1e-6);
    assert_eq!(
        token_logps(model, &scored.narrow(0, 0, 0), &targets, 3).size(),
        [0]
    );
}

/// The log-probs as they were computed before `hidden_states_at`: the whole decoder's final
/// hidden states [R, T, H], then the `predictors` positions ([N] flat indices into `[R * T]`).
fn logps_from_hidden(
    model: &CausalLm,
    hidden: &Tensor,
    predictors: &Tensor,
    targets: &Tensor,
    slots: &Tensor,
    outputs: i64,
) -> Tensor {
    let h = hidden.size()[2];
    let scored = hidden.reshape([-1, h]).index_select(0, predictors); // [N, H]
    logps_from_scored(model, &scored, targets, slots, outputs)
}

/// The last layer at the scored positions only (`hidden_states_at`, what
/// `sequence_logps` and the recomputing backward use) against the whole decoder's hidden
/// states followed by the selection, as the forward was before: the pair log-probs and
/// every adapter's gradient of `sum_i g_i log p_i`, with per-pair weights on adapters with
/// a shared block, in both row layouts; and the recomputing backward's gradients.
#[test]
fn the_last_layer_at_scored_positions_equals_the_whole_decoder() {
    use crate::model::{AdapterKind, AdapterSpec};
    let dir = tempfile::tempdir().unwrap();
    crate::model::tiny::write_tiny_model(dir.path(), &Default::default(), 5).unwrap();
    let spec = AdapterSpec {
        kind: AdapterKind::Lora,
        rank: 2,
        alpha: 4.0,
        num_dimensions: 2,
        shared: true,
    };
    let loaded =
        crate::model::load_model(dir.path(), Some(&spec), Device::Cpu, Kind::Float).unwrap();
    let model = &loaded.model;
    tch::manual_seed(4);
    let mut params: Vec<(String, Tensor)> = loaded.adapters.variables().into_iter().collect();
    params.sort_by(|a, b| a.0.cmp(&b.0));
    tch::no_grad(|| {
        for (_, p) in &params {
            p.shallow_clone().copy_(&(p.randn_like() * 0.3));
        }
    });
    let weights = Tensor::from_slice(&[0.25f32, 0.75, 0.6, 0.4]).view([2, 2]);
    let g = Tensor::from_slice(&[1.0f32, -0.5, 0.75, 2.0]);
    // The gradients of sum_i g_i log p_i by parameter, after `run` backpropagates it.
    let gradients = |run: &dyn Fn()| -> Vec<Tensor> {
        for (_, p) in &params {
            let mut grad = p.grad();
            if grad.defined() {
                let _ = grad.zero_();
            }
        }
        run();
        params.iter().map(|(_, p)| p.grad().copy()).collect()
    };
    let max_diff = |a: &Tensor, b: &Tensor| f64::try_from((a - b).abs().max()).unwrap();
    for layout in [RowLayout::ResponsePerRow, RowLayout::SharedPrompt] {
        let batch = BatchTensors::with_layout(&batch(), layout, Device::Cpu);
        let rows = per_row(&batch, Conditioning::Weighted(&weights));
        let whole = || {
            let hidden = model.hidden_states_in(
                &batch.input_ids,
                &batch.token_layout(model),
                rows.as_conditioning(),
            ); // [R, T, H]
            let b = batch.pairs;
            logps_from_hidden(
                model,
                &hidden,
                &batch.predictors,
                &batch.targets,
                &batch.slots,
                2 * b,
            )
        };
        let at_scored = || {
            let (a, b) = sequence_logps(model, &batch, Conditioning::Weighted(&weights));
            Tensor::cat(&[a, b], 0)
        };
        assert!(
            max_diff(&whole(), &at_scored()) <= 1e-5,
            "{layout:?}: log-probs differ"
        );
        let expected = gradients(&|| (whole() * &g).sum(Kind::Float).backward());
        let got = gradients(&|| (at_scored() * &g).sum(Kind::Float).backward());
        let recomputed = gradients(&|| {
            model.backward_recomputing(
                &batch.input_ids,
                &batch.token_layout(model),
                rows.as_conditioning(),
                &batch.predictors,
                |scored| {
                    let (a, b) = pair_logps_from_scored(model, &batch, scored);
                    ((Tensor::cat(&[a, b], 0) * &g).sum(Kind::Float), ())
                },
            )
        });
        for (i, (name, _)) in params.iter().enumerate() {
            let scale = f64::try_from(expected[i].abs().max()).unwrap().max(1e-3);
            assert!(
                max_diff(&got[i], &expected[i]) <= 1e-5 * scale,
                "{layout:?}: {name}: gradient differs"
            );
            assert!(
                max_diff(&recomputed[i], &expected[i]) <= 1e-5 * scale,
                "{layout:?}: {name}: recomputed gradient differs"
            );
        }
    }
}

/// One pair, prompt [10, 11], response a [12], response b [13, 14], padded to T = 4 as
/// rows of their own. Shared, the row is [10 11 12 13 14]: segments 0 0 1 2 2, positions
/// 0 1 2 2 3 (b restarts after the prompt); 12 and 13 are both predicted from position 1
/// (the prompt's last token), 14 from position 3 (13's). Slots: a to 0, b to B + 0 = 1.
/// Response b's view is the prompt and b, row positions 0 1 3 4.
#[test]
fn shared_prompt_rows_by_hand() {
    let micro = MicroBatch {
        pair_ids: vec![0],
        pairs: 1,
        seq_len: 4,
        dimensions: 1,
        input_ids: vec![10, 11, 12, 99, 10, 11, 13, 14],
        attention_mask: vec![1, 1, 1, 0, 1, 1, 1, 1],
        response_mask: vec![0, 0, 1, 0, 0, 0, 1, 1],
        preferences: vec![1],
        scores_a: vec![1.0],
        scores_b: vec![0.0],
        conflict: vec![0],
    };
    let shared = BatchTensors::shared_prompt(&micro, Device::Cpu);
    assert_eq!(
        values(&shared.input_ids.reshape([-1])),
        [10, 11, 12, 13, 14]
    );
    let rows = shared.shared_prompt.as_ref().unwrap();
    let (segments, positions) = (&rows.segments, &rows.positions);
    assert_eq!(values(&segments.reshape([-1])), [0, 0, 1, 2, 2]);
    assert_eq!(values(&positions.reshape([-1])), [0, 1, 2, 2, 3]);
    // b's view [10 11 13 14] (row positions 0 1 3 4); b's outputs come from it, at
    // a_end + 2 and a_end + 3, a_end = 3 the prompt and a.
    assert_eq!(values(&rows.b_view.reshape([-1])), [0, 1, 3, 4]);
    assert_eq!(rows.a_end, 3);
    assert_eq!(values(&rows.merge.reshape([-1])), [0, 1, 2, 5, 6]);
    assert_eq!(values(&shared.predictors), [1, 1, 3]);
    assert_eq!(values(&shared.targets), [12, 13, 14]);
    assert_eq!(values(&shared.slots), [0, 1, 1]);
    assert_eq!((shared.a_predictors, shared.tokens), (1, 7));
    // Two copies: rows [pair; pair], b slots after both copies' a slots.
    let twice = shared.replicated(2);
    assert_eq!(twice.input_ids.size(), [2, 5]);
    assert_eq!(twice.shared_prompt.as_ref().unwrap().b_view.size(), [2, 4]);
    assert_eq!(values(&twice.predictors), [1, 6, 1, 3, 6, 8]);
    assert_eq!(values(&twice.targets), [12, 12, 13, 14, 13, 14]);
    assert_eq!(values(&twice.slots), [0, 1, 2, 2, 3, 3]);
}
