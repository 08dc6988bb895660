//! `CausalLm::decode_rows`, the serving batch: sequences of different lengths, each at its own
//! preference weights and with its own KV cache, decoded one token per step together. Checked
//! against the plain full forward of each sequence alone (no cache), and for independence: a
//! row's logits are bit for bit the same whatever the other rows hold, at a fixed row count.

use modpo_tests::write_tiny_model;
use modpo_trainer::model::generate::greedy_uncached;
use modpo_trainer::model::{load_model, AdapterKind, AdapterSpec, Conditioning, KvCache};
use tch::{Device, Kind, Tensor};

const ROWS: usize = 4;
const STEPS: usize = 12;

/// The tiny model with two-dimension LoRA adapters set to random values (fresh ones have B = 0
/// and would make every weighting the same model).
fn model_with_adapters(dir: &std::path::Path) -> modpo_trainer::model::LoadedModel {
    write_tiny_model(dir, 5);
    let spec = AdapterSpec {
        kind: AdapterKind::Lora,
        rank: 4,
        alpha: 8.0,
        num_dimensions: 2,
        shared: true,
    };
    let loaded = load_model(dir, Some(&spec), Device::Cpu, Kind::Float).unwrap();
    tch::manual_seed(11);
    tch::no_grad(|| {
        for (_, mut value) in loaded.adapters.variables() {
            let random = value.randn_like() * 0.3;
            value.copy_(&random);
        }
    });
    loaded
}

/// Per sequence: prompt, weights; row ROWS - 1 stays a padding row.
fn sequences() -> Vec<(Vec<u32>, [f32; 2])> {
    vec![
        ((10..17).collect(), [1.0, 0.0]),
        ((40..43).collect(), [0.0, 1.0]),
        ((70..81).collect(), [0.3, 0.7]),
    ]
}

/// Prefills each sequence alone, then decodes greedily with `decode_rows`, rows in `active`
/// taking part; returns each row's tokens and each step's logits [ROWS, vocab].
fn decode(
    model: &modpo_trainer::model::CausalLm,
    active: &[bool; ROWS],
) -> (Vec<Vec<u32>>, Vec<Tensor>) {
    let _guard = tch::no_grad_guard();
    let seqs = sequences();
    let mut caches: Vec<KvCache> = (0..ROWS).map(|_| KvCache::default()).collect();
    let mut last = vec![0i64; ROWS];
    let mut tokens = vec![Vec::new(); ROWS];
    let mut w = vec![0f32; ROWS * 2];
    for (i, (prompt, weights)) in seqs.iter().enumerate() {
        if !active[i] {
            continue;
        }
        w[2 * i..2 * i + 2].copy_from_slice(weights);
        let ids: Vec<i64> = prompt.iter().map(|&t| i64::from(t)).collect();
        let input = Tensor::from_slice(&ids).unsqueeze(0); // [1, t]
        let wi = Tensor::from_slice(weights).unsqueeze(0); // [1, 2]
        let logits = model.forward_cached(&input, &mut caches[i], Conditioning::Weighted(&wi));
        last[i] = logits.select(1, -1).argmax(-1, false).int64_value(&[0]);
        tokens[i].push(last[i] as u32);
    }
    let w = Tensor::from_slice(&w).view([ROWS as i64, 2]); // [rows, 2]
    let mut all_logits = Vec::new();
    for _ in 1..STEPS {
        let input = Tensor::from_slice(&last).view([ROWS as i64, 1]); // [rows, 1]
        let logits = model.decode_rows(&input, &mut caches, active, Conditioning::Weighted(&w));
        let next = Vec::<i64>::try_from(logits.argmax(-1, false)).unwrap();
        for i in 0..ROWS {
            if active[i] {
                last[i] = next[i];
                tokens[i].push(next[i] as u32);
            }
        }
        all_logits.push(logits);
    }
    (tokens, all_logits)
}

#[test]
fn rows_at_different_positions_and_weights_decode_as_each_sequence_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let loaded = model_with_adapters(tmp.path());
    let model = &loaded.model;
    let (tokens, _) = decode(model, &[true, true, true, false]);
    for (i, (prompt, weights)) in sequences().iter().enumerate() {
        let w = Tensor::from_slice(weights).unsqueeze(0); // [1, 2]
        let alone = greedy_uncached(model, prompt, Conditioning::Weighted(&w), STEPS, None);
        assert_eq!(tokens[i], alone, "row {i}");
    }
    assert!(
        tokens[0] != tokens[1] && tokens[1] != tokens[2],
        "two weightings gave the same tokens: the test could not see rows mixed up: {tokens:?}"
    );
}

#[test]
fn a_rows_logits_do_not_depend_on_the_other_rows() {
    let tmp = tempfile::tempdir().unwrap();
    let loaded = model_with_adapters(tmp.path());
    let (_, together) = decode(&loaded.model, &[true, true, true, false]);
    let (_, alone) = decode(&loaded.model, &[false, false, true, false]);
    for (step, (a, b)) in together.iter().zip(&alone).enumerate() {
        assert!(
            a.get(2).equal(&b.get(2)),
            "step {step}: row 2's logits changed with the other rows"
        );
    }
    // The full forward agrees to float tolerance (it runs other kernels).
    let (prompt, weights) = &sequences()[2];
    let (tokens, _) = decode(&loaded.model, &[false, false, true, false]);
    let mut ids: Vec<i64> = prompt.iter().map(|&t| i64::from(t)).collect();
    ids.extend(tokens[2][..STEPS - 1].iter().map(|&t| i64::from(t)));
    let input = Tensor::from_slice(&ids).unsqueeze(0); // [1, t]
    let w = Tensor::from_slice(weights).unsqueeze(0); // [1, 2]
    let full = tch::no_grad(|| {
        loaded
            .model
            .forward(&input, &input.ones_like(), Conditioning::Weighted(&w))
    }); // [1, t, vocab]
    let t = ids.len() as i64;
    let expected = full
        .select(0, 0)
        .narrow(0, t - (STEPS as i64 - 1), STEPS as i64 - 1); // [steps - 1, vocab]
    let got = Tensor::stack(&alone.iter().map(|l| l.get(2)).collect::<Vec<_>>(), 0);
    let diff = (got - expected).abs().max().double_value(&[]);
    assert!(
        diff < 1e-4,
        "decode_rows and the full forward differ by {diff}"
    );
}
