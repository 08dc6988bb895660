//! The three methods end to end on CPU: a tiny random Llama on the PKU-SafeRLHF sample.
//! - freezing: stage 1 moves psi only, stage 2 phi only (psi bit-identical), stage 3 both;
//! - (batched passes give the gradients of pass-by-pass execution: `step/tests.rs`);
//! - every method raises the training preference accuracy above its starting value.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use modpo_tests::{shared_data_dir, write_tiny_model};
use modpo_trainer::checkpoint::{self, ADAPTERS_FILE};
use modpo_trainer::config::RunConfig;
use modpo_trainer::data::{self, collate};
use modpo_trainer::logps::{sequence_logps, BatchTensors};
use modpo_trainer::method::{stages, MethodName};
use modpo_trainer::model::{load_model, Conditioning, LoadedModel};
use modpo_trainer::reference;
use modpo_trainer::tokenizer::ChatTokenizer;
use modpo_trainer::train::{train, Cluster};
use tch::{Device, Kind, Tensor};

/// A run directory with a tiny model and a config for `method`; `extra` is appended to the
/// `[train]` section.
fn setup(tmp: &Path, method: &str, lines: usize, extra: &str) -> (RunConfig, String) {
    let model = tmp.join("model");
    write_tiny_model(&model, 5);
    let sample: String =
        std::fs::read_to_string(shared_data_dir().join("pku_saferlhf_sample.jsonl"))
            .unwrap()
            .lines()
            .take(lines)
            .map(|l| format!("{l}\n"))
            .collect();
    std::fs::write(tmp.join("train.jsonl"), sample).unwrap();
    let text = format!(
        "[model]\npath = \"model\"\ndevice = \"cpu\"\n\n\
         [data]\nformat = \"pku-saferlhf\"\ntrain_file = \"train.jsonl\"\neval_fraction = 0.0\n\
         max_length = 96\nglobal_batch = 8\nmicro_batch = 4\n\n\
         [method]\nname = \"{method}\"\nbeta = 0.1\n\n\
         [train]\noutput_dir = \"run\"\nlearning_rate = 5e-3\nwarmup_ratio = 0.0\n{extra}\n"
    );
    let path = tmp.join("config.toml");
    std::fs::write(&path, &text).unwrap();
    (RunConfig::load(&path).unwrap(), text)
}

fn read_adapters(path: &Path) -> HashMap<String, Tensor> {
    Tensor::read_safetensors(path)
        .unwrap()
        .into_iter()
        .collect()
}

/// Sum over matching tensors of max |a - b| restricted to `filter`.
fn max_change(
    a: &HashMap<String, Tensor>,
    b: &HashMap<String, Tensor>,
    filter: impl Fn(&str) -> bool,
) -> f64 {
    a.iter()
        .filter(|(name, _)| filter(name))
        .map(|(name, t)| (t - &b[name]).abs().max().double_value(&[]))
        .fold(0.0, f64::max)
}

/// Column / row block `i` (rank r) of a stacked dimension tensor.
fn block(name: &str, t: &Tensor, i: i64, r: i64) -> Tensor {
    if name.ends_with("dims_a") {
        t.narrow(0, i * r, r)
    } else {
        t.narrow(1, i * r, r)
    }
}

#[test]
fn curriculum_stages_train_only_their_parameters() {
    let tmp = tempfile::tempdir().unwrap();
    let (config, text) = setup(tmp.path(), "curriculum", 160, "max_steps = 3");
    let summary = train(&config, &text, Default::default(), &Cluster::single()).unwrap();
    assert_eq!(summary.steps, vec![3, 3, 3]);

    // The initial adapters: the same seed draws the same initialisation.
    let spec = config.method.adapter_spec(2);
    tch::manual_seed(config.train.seed as i64);
    let initial = load_model(&config.model.path, Some(&spec), Device::Cpu, Kind::Float).unwrap();
    let initial: HashMap<String, Tensor> = initial
        .adapters
        .variables()
        .into_iter()
        .map(|(n, t)| (n, t.detach().copy()))
        .collect();
    let stage = |n: usize| {
        read_adapters(
            &summary
                .run_dir
                .join(format!("checkpoints/stage-{n}-final"))
                .join(ADAPTERS_FILE),
        )
    };
    let (s1, s2, s3) = (stage(1), stage(2), stage(3));
    let shared = |n: &str| n.contains(".shared_");
    let dims = |n: &str| n.contains(".dims_");

    assert!(
        max_change(&initial, &s1, shared) > 0.0,
        "stage 1 trains psi"
    );
    assert_eq!(
        max_change(&initial, &s1, dims),
        0.0,
        "stage 1 leaves phi untouched"
    );
    assert_eq!(
        max_change(&s1, &s2, shared),
        0.0,
        "stage 2 leaves psi bit-identical"
    );
    for i in 0..2 {
        let changed = s1
            .iter()
            .filter(|(n, _)| dims(n))
            .map(|(n, t)| {
                (block(n, t, i, spec.rank) - block(n, &s2[n], i, spec.rank))
                    .abs()
                    .max()
                    .double_value(&[])
            })
            .fold(0.0, f64::max);
        assert!(changed > 0.0, "stage 2 trains phi_{i}");
    }
    assert!(
        max_change(&s2, &s3, shared) > 0.0 && max_change(&s2, &s3, dims) > 0.0,
        "stage 3 trains both"
    );
    // The final adapters are stage 3's.
    assert_eq!(
        max_change(&s3, &read_adapters(&summary.adapters), |_| true),
        0.0
    );
}

/// Share of (pair, dimension) with a preference whose implicit-reward margin at w = 1_i
/// orders the pair as dimension i does; a tie counts one half (so an untrained model scores
/// exactly 0.5).
fn training_accuracy(loaded: &LoadedModel, config: &RunConfig, tokenizer: &ChatTokenizer) -> f64 {
    let data = data::load(&config.data, tokenizer).unwrap();
    let refs = reference::compute(
        &loaded.model,
        &data.train.pairs,
        8,
        tokenizer.pad_token_id(),
        Device::Cpu,
    );
    let (mut score, mut count) = (0.0, 0.0);
    let ids: Vec<usize> = (0..data.train.pairs.len()).collect();
    for chunk in ids.chunks(8) {
        let batch = collate(&data.train.select(chunk), tokenizer.pad_token_id());
        let tensors = BatchTensors::new(&batch, Device::Cpu);
        let (ref_a, ref_b) = refs.gather(&batch.pair_ids, Device::Cpu);
        for i in 0..2 {
            let w = Tensor::zeros([batch.pairs as i64, 2], (Kind::Float, Device::Cpu));
            let _ = w.narrow(1, i, 1).fill_(1.0);
            let (a, b) = tch::no_grad(|| {
                sequence_logps(&loaded.model, &tensors, Conditioning::Weighted(&w))
            });
            let margins = Vec::<f32>::try_from((a - &ref_a) - (b - &ref_b)).unwrap();
            for (row, m) in margins.iter().enumerate() {
                let sign = batch.preferences[row * 2 + i as usize] as f32;
                if sign != 0.0 {
                    count += 1.0;
                    score += if m * sign > 0.0 {
                        1.0
                    } else if *m == 0.0 {
                        0.5
                    } else {
                        0.0
                    };
                }
            }
        }
    }
    score / count
}

fn accuracy_rises(method: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let (config, text) = setup(tmp.path(), method, 120, "epochs = 4");
    let tokenizer = ChatTokenizer::from_model_dir(&config.model.path, None).unwrap();
    let spec = config.method.adapter_spec(2);
    let before = training_accuracy(
        &load_model(&config.model.path, Some(&spec), Device::Cpu, Kind::Float).unwrap(),
        &config,
        &tokenizer,
    );
    let summary = train(&config, &text, Default::default(), &Cluster::single()).unwrap();
    let trained = load_model(&config.model.path, Some(&spec), Device::Cpu, Kind::Float).unwrap();
    checkpoint::load_adapters(&summary.adapters, &trained.adapters).unwrap();
    let after = training_accuracy(&trained, &config, &tokenizer);
    eprintln!("{method}: training preference accuracy {before:.3} -> {after:.3}");
    assert_eq!(before, 0.5, "fresh adapters leave every margin at 0");
    assert!(after > 0.6, "{method}: accuracy {before} -> {after}");
    let metrics = std::fs::read_to_string(summary.run_dir.join("metrics.jsonl")).unwrap();
    let expected_stages = stages(match method {
        "curriculum" => MethodName::Curriculum,
        "panacea" => MethodName::Panacea,
        "panacea-lora" => MethodName::PanaceaLora,
        _ => MethodName::DpoSoup,
    })
    .len();
    assert_eq!(summary.steps.len(), expected_stages);
    let step_lines = metrics.lines().filter(|l| !l.contains("\"event\"")).count();
    assert_eq!(step_lines, summary.steps.iter().sum::<usize>());
    let _: PathBuf = summary.run_dir.join("resolved_config.json");
}

#[test]
fn curriculum_raises_training_accuracy() {
    accuracy_rises("curriculum");
}

#[test]
fn panacea_raises_training_accuracy() {
    accuracy_rises("panacea");
}

#[test]
fn panacea_lora_raises_training_accuracy() {
    accuracy_rises("panacea-lora");
}

/// Panacea on AdaLoRA: the metrics carry the orthogonality penalty and the kept triplets, which
/// fall from 12 to 8 per block over the run (the budget of PEFT's schedule at the last step).
#[test]
fn panacea_allocates_ranks_down_to_the_target() {
    let tmp = tempfile::tempdir().unwrap();
    let (config, text) = setup(tmp.path(), "panacea", 64, "");
    let summary = train(&config, &text, Default::default(), &Cluster::single()).unwrap();
    let metrics = std::fs::read_to_string(summary.run_dir.join("metrics.jsonl")).unwrap();
    let kept: Vec<i64> = metrics
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|r| r.get("event").is_none())
        .map(|r| {
            assert!(r["orth_penalty"].as_f64().unwrap() > 0.0);
            r["kept_triplets"].as_i64().unwrap()
        })
        .collect();
    // 2 layers x 7 projections x (k + 1 = 3) blocks.
    let blocks = 2 * 7 * 3;
    let steps = kept.len();
    assert!(steps >= 5, "{steps} steps");
    assert_eq!(kept[0], 12 * blocks, "step 0 keeps every triplet");
    assert!(kept.windows(2).all(|w| w[1] <= w[0]), "{kept:?}");
    // PEFT's budget at the last step t = T - 1: int(4 blocks (1/T)^3 + 8 blocks).
    let remaining = 1.0 / steps as f64;
    let last = ((4 * blocks) as f64 * remaining.powi(3) + (8 * blocks) as f64) as i64;
    assert_eq!(*kept.last().unwrap(), last, "{kept:?}");
    let adapters = checkpoint::read_adapter_meta(&summary.adapters).unwrap();
    assert_eq!(adapters.kind, modpo_trainer::model::AdapterKind::AdaLora);
}

#[test]
fn dpo_soup_raises_training_accuracy() {
    accuracy_rises("dpo-soup");
}

/// `train.eval_every` appends held-out conflict accuracy to metrics.jsonl during training
/// (every 2 steps and at each stage's end).
#[test]
fn evaluation_during_training_goes_to_metrics() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, text) = setup(
        tmp.path(),
        "curriculum",
        200,
        "max_steps = 3\neval_every = 2",
    );
    let text = text.replace("eval_fraction = 0.0", "eval_fraction = 0.3");
    std::fs::write(tmp.path().join("config.toml"), &text).unwrap();
    let config = RunConfig::load(&tmp.path().join("config.toml")).unwrap();
    let summary = train(&config, &text, Default::default(), &Cluster::single()).unwrap();
    let metrics = std::fs::read_to_string(summary.run_dir.join("metrics.jsonl")).unwrap();
    let evals: Vec<serde_json::Value> = metrics
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v.get("eval").is_some())
        .collect();
    // Steps 2 and 3 (the end) of each of the three stages.
    assert_eq!(evals.len(), 6, "{metrics}");
    for e in &evals {
        let accuracy = e["eval"]["mean_accuracy"]
            .as_f64()
            .expect("a mean accuracy");
        assert!((0.0..=1.0).contains(&accuracy));
        assert!(e["eval"]["conflict_pairs"].as_u64().unwrap() > 0);
    }
}
