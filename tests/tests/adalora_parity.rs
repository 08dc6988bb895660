//! Our AdaLoRA adapters against PEFT's AdaLoRA (peft 0.21.2, golden outputs written by
//! `tests/golden/make_adalora_golden.py`) for k = 0, one module per projection, which is what
//! PEFT represents: the forward logits, the orthogonality penalty and the gradients of one step,
//! then the rank allocator fed the same parameters and gradients as PEFT's over several steps
//! (importance averages, budgets, masked lambdas, kept triplets).

use std::collections::HashMap;

use modpo_tests::{golden_dir, golden_model};
use modpo_trainer::model::{
    load_model, next_token_logprobs, AdapterKind, AdapterSpec, Conditioning, LoadedModel,
};
use modpo_trainer::rank_allocation::{AllocationSchedule, RankAllocator};
use tch::{Device, Kind, Tensor};

const TOLERANCE: f64 = 1e-5;

fn golden() -> HashMap<String, Tensor> {
    let path = golden_dir().join("adalora/golden.safetensors");
    assert!(
        path.is_file(),
        "{} is missing: run `make golden`",
        path.display()
    );
    Tensor::read_safetensors(&path)
        .unwrap()
        .into_iter()
        .collect()
}

/// PEFT's AdaLoRA of the golden script: init_r 12, alpha 512, on every projection.
fn model() -> LoadedModel {
    let spec = AdapterSpec {
        kind: AdapterKind::AdaLora,
        rank: 12,
        alpha: 512.0,
        num_dimensions: 0,
        shared: true,
    };
    let dir = golden_model("llama3_untied_sharded");
    load_model(&dir, Some(&spec), Device::Cpu, Kind::Float).unwrap()
}

/// The trainable adapter tensors (Q, lambda, P of every projection), by name.
fn adapter_params(loaded: &LoadedModel) -> Vec<(String, Tensor)> {
    let mut params: Vec<(String, Tensor)> = loaded
        .adapters
        .variables()
        .into_iter()
        .filter(|(name, t)| !name.ends_with("_kept") && t.numel() > 0)
        .collect();
    params.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        params.len(),
        3 * 7 * 2,
        "Q, lambda, P x 7 projections x 2 layers"
    );
    params
}

/// Sets each parameter to `golden[{prefix}.{name}]`.
fn set_params(params: &[(String, Tensor)], golden: &HashMap<String, Tensor>, prefix: &str) {
    tch::no_grad(|| {
        for (name, t) in params {
            let key = format!("{prefix}.{name}");
            let value = golden
                .get(&key)
                .unwrap_or_else(|| panic!("golden lacks {key}"));
            t.shallow_clone().copy_(value);
        }
    });
}

/// Sets each parameter's `.grad` to `golden[{prefix}.{name}]`: the gradient of `sum(p * g)`.
fn set_grads(params: &[(String, Tensor)], golden: &HashMap<String, Tensor>, prefix: &str) {
    for (name, t) in params {
        let mut grad = t.grad();
        if grad.defined() {
            let _ = grad.zero_();
        }
        let g = &golden[&format!("{prefix}.{name}")];
        (t * g).sum(Kind::Float).backward();
    }
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

#[test]
fn forward_penalty_and_gradients_match_peft() {
    let golden = golden();
    let loaded = model();
    let params = adapter_params(&loaded);
    set_params(&params, &golden, "init");
    for (_, t) in &params {
        let _ = t.shallow_clone().set_requires_grad(true);
    }
    let (input_ids, attention_mask) = (&golden["input_ids"], &golden["attention_mask"]);
    let logits = loaded
        .model
        .forward(input_ids, attention_mask, Conditioning::SharedOnly); // [b, t, vocab]
    let token_mask = attention_mask.to_kind(Kind::Float).unsqueeze(-1);
    let logits_diff = ((&logits - &golden["logits"]).abs() * &token_mask)
        .max()
        .double_value(&[]);
    let base = tch::no_grad(|| {
        loaded
            .model
            .forward(input_ids, attention_mask, Conditioning::Reference)
    });
    let moved = ((&logits - base).abs() * &token_mask)
        .max()
        .double_value(&[]);
    assert!(
        moved > 0.05,
        "the adapters must move the logits (by {moved})"
    );
    assert!(
        logits_diff <= TOLERANCE,
        "logits differ from PEFT's by {logits_diff}"
    );

    // transformers' causal LM loss: mean over the real next tokens.
    let t = input_ids.size()[1];
    let targets = attention_mask.narrow(1, 1, t - 1).to_kind(Kind::Float); // [b, t-1]
    let logprobs = next_token_logprobs(&logits, input_ids);
    let ce = -(logprobs * &targets).sum(Kind::Float) / targets.sum(Kind::Float);
    let penalty = loaded.model.orthogonality_penalty() * 0.5;
    let penalty_diff = max_diff(&penalty, &golden["orth_penalty"]);
    assert!(
        penalty_diff <= TOLERANCE,
        "penalty {penalty} vs PEFT's {}",
        golden["orth_penalty"]
    );
    let loss = &ce + &penalty;
    assert!(
        max_diff(&loss, &golden["loss"]) <= TOLERANCE,
        "loss {loss} vs PEFT's"
    );
    loss.backward();
    for (name, t) in &params {
        let expected = &golden[&format!("grad.{name}")];
        let diff = max_diff(&t.grad(), expected);
        let scale = expected.abs().max().double_value(&[]);
        assert!(scale > 0.0, "{name}: PEFT's gradient is zero");
        assert!(
            diff <= TOLERANCE,
            "{name}: gradient differs from PEFT's by {diff} (max {scale})"
        );
    }
    eprintln!("max |logits diff| {logits_diff:.2e}, logits moved by {moved:.3}, penalty diff {penalty_diff:.2e}");
}

#[test]
fn rank_allocation_matches_peft_step_by_step() {
    let golden = golden();
    let loaded = model();
    let params = adapter_params(&loaded);
    for (_, t) in &params {
        let _ = t.shallow_clone().set_requires_grad(true);
    }
    let steps = golden.keys().filter(|k| k.ends_with(".budget")).count();
    assert!(steps >= 3, "the golden trace has {steps} steps");
    let schedule = AllocationSchedule {
        init_rank: 12,
        target_rank: 8,
        tinit: 0,
        tfinal: 0,
        delta_t: 1,
        beta1: 0.85,
        beta2: 0.85,
        total_step: steps,
    };
    let mut allocator = RankAllocator::new(&loaded.model, schedule).unwrap();
    let (init, target) = allocator.budgets();
    assert_eq!(init as f64, golden["init_bgt"].double_value(&[]));
    assert_eq!(target as f64, golden["target_bgt"].double_value(&[]));
    let mut masked_steps = 0;
    for step in 0..steps {
        let prefix = format!("step{step}");
        set_params(&params, &golden, &format!("{prefix}.param"));
        set_grads(&params, &golden, &format!("{prefix}.grad"));
        let budget = allocator.update_and_allocate(step);
        let peft_masked = golden[&format!("{prefix}.masked")].double_value(&[]) != 0.0;
        assert_eq!(
            budget.is_some(),
            peft_masked,
            "step {step}: whether it allocates"
        );
        if let Some(budget) = budget {
            masked_steps += 1;
            let peft_budget = golden[&format!("{prefix}.budget")].double_value(&[]);
            assert_eq!(budget as f64, peft_budget, "step {step}: budget");
        }
        for (name, tensor) in allocator.state() {
            // rank_allocator.exp_avg_ipt.{param} -> step{s}.exp_avg_ipt.{param}
            let key = name.replacen("rank_allocator", &prefix, 1);
            let diff = max_diff(&tensor, &golden[&key]);
            let scale = golden[&key].abs().max().double_value(&[]);
            assert!(
                diff <= 1e-6 * scale.max(1e-12),
                "{key}: differs by {diff} (max {scale})"
            );
        }
        for (group, scores) in allocator.scores() {
            let expected =
                &golden[&format!("{prefix}.score.{}", group.trim_end_matches(".shared"))];
            let diff = max_diff(&scores, expected);
            let scale = expected.abs().max().double_value(&[]);
            assert!(
                diff <= 1e-6 * scale,
                "step {step} {group}: triplet scores differ by {diff}"
            );
        }
        for (name, t) in params.iter().filter(|(n, _)| n.ends_with("_e")) {
            let module = name.trim_end_matches(".shared_e");
            let lambda = &golden[&format!("{prefix}.lambda.{module}")];
            assert!(
                t.equal(lambda),
                "step {step} {module}: lambda after masking differs"
            );
            let kept = &golden[&format!("{prefix}.kept.{module}")];
            let ours =
                loaded.adapters.variables()[&format!("{module}.shared_kept")].shallow_clone();
            assert!(
                ours.equal(kept),
                "step {step} {module}: kept triplets differ"
            );
        }
    }
    assert!(
        masked_steps >= 2,
        "the trace must allocate in several steps"
    );
    assert!(allocator.kept() < init, "some triplets were dropped");
}
