//! The passes of a step give the same gradients however they are executed: batched or pass
//! by pass, with or without activation recomputation, a shared prompt row or a row per
//! response (in one forward or two); for every step plan of every method.

use std::path::Path;

use tch::{Device, Kind, Tensor};

use super::passes::{accumulate, MicroInputs, Normalisers, StepContext, StepStats};
use crate::config::RunConfig;
use crate::data::{self, collate, PreferenceData};
use crate::logps::{sequence_logps, BatchTensors};
use crate::method::{stages, MethodName, StepPlan};
use crate::model::tiny::write_tiny_model;
use crate::model::{load_model, Conditioning, LoadedModel};
use crate::reference;
use crate::tokenizer::ChatTokenizer;

/// A tiny random Llama and the first `lines` rows of the PKU-SafeRLHF sample in `tmp`, and a
/// curriculum config over them.
fn tiny_run(tmp: &Path, lines: usize) -> (RunConfig, ChatTokenizer, PreferenceData) {
    let model = tmp.join("model");
    std::fs::create_dir_all(&model).unwrap();
    write_tiny_model(&model, &Default::default(), 5).unwrap();
    let sample =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/pku_saferlhf_sample.jsonl");
    let rows: String = std::fs::read_to_string(&sample)
        .unwrap_or_else(|e| panic!("{}: {e}", sample.display()))
        .lines()
        .take(lines)
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(tmp.join("train.jsonl"), rows).unwrap();
    let text = "[model]\npath = \"model\"\ndevice = \"cpu\"\n\n\
         [data]\nformat = \"pku-saferlhf\"\ntrain_file = \"train.jsonl\"\neval_fraction = 0.0\n\
         max_length = 96\nglobal_batch = 8\nmicro_batch = 4\n\n\
         [method]\nname = \"curriculum\"\nbeta = 0.1\n\n\
         [train]\noutput_dir = \"run\"\nlearning_rate = 5e-3\nwarmup_ratio = 0.0\n";
    let config = RunConfig::parse(text, &tmp.join("config.toml")).unwrap();
    let tokenizer = ChatTokenizer::from_model_dir(&config.model.path, None).unwrap();
    let data = data::load(&config.data, &tokenizer).unwrap();
    (config, tokenizer, data)
}

/// How a step is executed; every way gives the same gradients.
#[derive(Debug, Clone, Copy)]
struct Execution {
    batched: bool,
    recompute: bool,
    split: bool,
    /// Both responses after one copy of the prompt (else a row per response).
    shared_prompt: bool,
}

/// Gradients of every adapter tensor after one micro-batch of `plan`.
fn gradients(
    loaded: &LoadedModel,
    plan: StepPlan,
    execution: Execution,
    inputs: &MicroInputs,
    norms: &Normalisers,
) -> Vec<(String, Tensor)> {
    for (_, t) in loaded.adapters.variables() {
        let _ = t.set_requires_grad(true);
        let mut g = t.grad();
        if g.defined() {
            let _ = g.zero_();
        }
    }
    let context = StepContext {
        model: &loaded.model,
        plan,
        beta: 0.1,
        batch_passes: execution.batched,
        recompute_activations: execution.recompute,
        split_responses: execution.split,
        length_correction: crate::loss::LengthCorrection::None,
        k: 2,
    };
    let mut stats = StepStats::new(2, Device::Cpu);
    accumulate(&context, inputs, norms, &mut stats);
    let mut grads: Vec<(String, Tensor)> = loaded
        .adapters
        .variables()
        .into_iter()
        .map(|(n, t)| {
            // Stage 1 leaves the dimension blocks without a gradient.
            let g = t.grad();
            (
                n,
                if g.defined() {
                    g.copy()
                } else {
                    t.zeros_like()
                },
            )
        })
        .collect();
    grads.sort_by(|a, b| a.0.cmp(&b.0));
    grads
}

/// The default execution (batched passes, shared prompt) and each alternative to compare with
/// it: pass by pass, per-block activation recomputation (batched and pass by pass), a row per
/// response (in one forward, in two, pass by pass).
fn executions() -> (Execution, [Execution; 6]) {
    let default = Execution {
        batched: true,
        recompute: false,
        split: false,
        shared_prompt: true,
    };
    let per_response_rows = Execution {
        shared_prompt: false,
        ..default
    };
    let alternatives = [
        Execution {
            batched: false,
            ..default
        },
        Execution {
            recompute: true,
            ..default
        },
        Execution {
            batched: false,
            recompute: true,
            ..default
        },
        per_response_rows,
        Execution {
            split: true,
            ..per_response_rows
        },
        Execution {
            batched: false,
            ..per_response_rows
        },
    ];
    (default, alternatives)
}

#[test]
fn every_step_execution_gives_the_same_gradients() {
    let tmp = tempfile::tempdir().unwrap();
    let (config, tokenizer, data) = tiny_run(tmp.path(), 40);
    let spec = config.method.adapter_spec(2);
    let loaded = load_model(&config.model.path, Some(&spec), Device::Cpu, Kind::Float).unwrap();
    tch::no_grad(|| {
        for (_, mut t) in loaded.adapters.variables() {
            t.copy_(&(Tensor::randn(t.size(), (Kind::Float, Device::Cpu)) * 0.1));
        }
    });
    // Two conflict pairs and two agree pairs (stage 1 learns from the agree ones only).
    let ids: Vec<usize> = data
        .train
        .conflict()
        .into_iter()
        .take(2)
        .chain(data.train.agree().into_iter().take(2))
        .collect();
    let batch = collate(&data.train.select(&ids), tokenizer.pad_token_id());
    let refs = reference::compute(
        &loaded.model,
        &data.train.pairs,
        4,
        tokenizer.pad_token_id(),
        Device::Cpu,
    );
    let per_response = BatchTensors::new(&batch, Device::Cpu);
    let shared = BatchTensors::shared_prompt(&batch, Device::Cpu);
    assert_eq!(
        shared.tokens, per_response.tokens,
        "tokens count as rows of their own"
    );
    assert!(shared.input_ids.size()[0] * shared.seq_len() < per_response.input_ids.numel() as i64);
    let inputs_of = |tensors| {
        let (reference_a, reference_b) = refs.gather(&batch.pair_ids, Device::Cpu);
        let preferences = Tensor::from_slice(&batch.preferences).view([4, 2]);
        let drawn = Tensor::from_slice(&[0.2f32, 0.8, 0.5, 0.5, 0.9, 0.1, 0.3, 0.7]).view([4, 2]);
        MicroInputs {
            tensors,
            reference_a,
            reference_b,
            preferences,
            drawn_weights: Some(drawn),
            lengths: crate::logps::response_lengths(&data.train.select(&ids), Device::Cpu),
        }
    };
    let (per_response_inputs, shared_inputs) = (inputs_of(&per_response), inputs_of(&shared));
    // The same log-probabilities either way, per-row w included.
    let w = per_response_inputs.drawn_weights.as_ref().unwrap();
    let (a, b) =
        tch::no_grad(|| sequence_logps(&loaded.model, &per_response, Conditioning::Weighted(w)));
    let (shared_a, shared_b) =
        tch::no_grad(|| sequence_logps(&loaded.model, &shared, Conditioning::Weighted(w)));
    for (x, y) in [(a, shared_a), (b, shared_b)] {
        let diff = (&x - &y).abs().max().double_value(&[]);
        assert!(
            diff < 1e-4,
            "shared-prompt log-probs differ by {diff}: {x} {y}"
        );
    }
    let norms = Normalisers::of(&data.train.select(&ids), 2, 1);
    let (default, alternatives) = executions();
    let inputs = |execution: Execution| match execution.shared_prompt {
        true => &shared_inputs,
        false => &per_response_inputs,
    };
    // Every step plan of every method.
    let mut plans: Vec<StepPlan> = Vec::new();
    for method in [
        MethodName::Curriculum,
        MethodName::Panacea,
        MethodName::PanaceaLora,
        MethodName::DpoSoup,
    ] {
        for stage in stages(method) {
            if !plans.contains(&stage.step) {
                plans.push(stage.step);
            }
        }
    }
    assert_eq!(plans.len(), 4, "stage 1, stage 2 / soup, stage 3, Panacea");
    for plan in plans {
        let expected = gradients(&loaded, plan, default, inputs(default), &norms);
        for execution in alternatives {
            let got = gradients(&loaded, plan, execution, inputs(execution), &norms);
            let mut largest = 0f64;
            for ((name, a), (_, b)) in expected.iter().zip(&got) {
                let diff = (a - b).abs().max().double_value(&[]);
                assert!(
                    diff <= 1e-5,
                    "{plan:?} {name}: {execution:?} gradients differ from the default's by {diff}"
                );
                largest = largest.max(a.abs().max().double_value(&[]));
            }
            assert!(largest > 0.0, "{plan:?}: gradients are not all zero");
        }
    }
}
