//! One optimizer step of every stage of every method (and of the length corrections) against
//! an implementation that is not
//! ours: `tests/python/reference_step.py`, plain PyTorch on the `transformers` model with its
//! own adapter modules, computing the loss of METHOD.md sections 3-5 pair by pair. For a tiny
//! model with random non-zero adapters, the first global batch of each stage's pool (PKU-SafeRLHF
//! pairs, k = 2; HelpSteer pairs with ties, k = 5) and the step's drawn weights, our step's loss
//! and the gradient of every trainable adapter tensor (after the all-reduce, before clipping
//! and AdamW) must match within 1e-5 of the tensor's largest gradient. The step runs as 2
//! micro-batches of 4 pairs, so the normalisers over the global batch are exercised too.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use modpo_launcher::Single;
use modpo_tests::{shared_data_dir, write_tiny_model};
use modpo_trainer::config::RunConfig;
use modpo_trainer::data::{self, BatchPlan, PreferenceData, TokenizedPair};
use modpo_trainer::logps::RowLayout;
use modpo_trainer::method::{
    stages, LengthCorrectionName, MethodConfig, MethodName, Stage, WeightSampling,
};
use modpo_trainer::model::{load_model, AdapterKind, LoadedModel};
use modpo_trainer::reference;
use modpo_trainer::step::{ReferenceSource, StepRunner, StepSettings};
use modpo_trainer::tokenizer::ChatTokenizer;
use safetensors::tensor::{Dtype, TensorView};
use tch::{Device, Kind, Tensor};

const BETA: f64 = 0.1;
const SEED: u64 = 3;
const GLOBAL_BATCH: usize = 8;

/// The tiny model and the first `lines` records of `sample` (in `format`), tokenized.
fn dataset(tmp: &Path, format: &str, sample: &str, lines: usize) -> PreferenceData {
    let model = tmp.join("model");
    if !model.exists() {
        write_tiny_model(&model, 5);
    }
    let rows: String = std::fs::read_to_string(shared_data_dir().join(sample))
        .unwrap()
        .lines()
        .take(lines)
        .map(|l| format!("{l}\n"))
        .collect();
    let train = tmp.join(format!("{format}.jsonl"));
    std::fs::write(&train, rows).unwrap();
    let text = format!(
        "[model]\npath = \"model\"\ndevice = \"cpu\"\n\n\
         [data]\nformat = \"{format}\"\ntrain_file = \"{}\"\neval_fraction = 0.0\n\
         max_length = 80\nglobal_batch = {GLOBAL_BATCH}\nmicro_batch = 4\n\n\
         [method]\nname = \"curriculum\"\n\n[train]\noutput_dir = \"run\"\n",
        train.display()
    );
    let config = RunConfig::parse(&text, &tmp.join("config.toml")).unwrap();
    let tokenizer = ChatTokenizer::from_model_dir(&config.model.path, None).unwrap();
    data::load(&config.data, &tokenizer).unwrap()
}

/// The method's model with random non-zero adapters (B = 0 or lambda = 0 at init would make
/// most gradients vanish).
fn model(dir: &Path, method: &MethodConfig, k: usize) -> LoadedModel {
    let spec = method.adapter_spec(k);
    let loaded = load_model(dir, Some(&spec), Device::Cpu, Kind::Float).unwrap();
    tch::manual_seed(7);
    tch::no_grad(|| {
        for (name, mut var) in loaded.adapters.variables() {
            if !name.ends_with("_kept") {
                // AdaLoRA's lambdas are scaled by alpha / r = 42.7: kept small, so that the
                // update is about as large as LoRA's and the logits stay moderate.
                let std = if name.ends_with("_e") { 0.02 } else { 0.1 };
                var.copy_(&(Tensor::randn(var.size(), (Kind::Float, Device::Cpu)) * std));
            }
        }
    });
    loaded
}

fn settings(method: &MethodConfig) -> StepSettings {
    StepSettings {
        beta: BETA,
        batch_passes: method.batch_passes_on(tch::Device::Cpu),
        recompute_activations: false,
        split_responses: false,
        row_layout: RowLayout::new(true),
        max_grad_norm: 1.0,
        adam: (0.9, 0.999, 1e-8, 0.0),
        seed: SEED,
        weight_sampling: method.weight_sampling,
        adalora: method.adalora(10),
        length_correction: method.length_correction(),
    }
}

/// A tensor as safetensors stores it: dtype, shape, little-endian bytes.
type Serialized = (Dtype, Vec<usize>, Vec<u8>);

/// safetensors bytes of an f32 or i64 tensor.
fn view_bytes(t: &Tensor) -> Serialized {
    let shape = t.size().iter().map(|&d| d as usize).collect();
    let flat = t.contiguous().view([-1]);
    match t.kind() {
        Kind::Int64 => {
            let values = Vec::<i64>::try_from(&flat).unwrap();
            (
                Dtype::I64,
                shape,
                values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            )
        }
        _ => {
            let values = Vec::<f32>::try_from(&flat.to_kind(Kind::Float)).unwrap();
            (
                Dtype::F32,
                shape,
                values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            )
        }
    }
}

/// The reference's input: the spec, the pairs' token ids, preferences, drawn weights and the
/// adapters.
fn write_input(path: &Path, spec: serde_json::Value, tensors: Vec<(String, Tensor)>) {
    let bytes: Vec<(String, Serialized)> = tensors
        .iter()
        .map(|(n, t)| (n.clone(), view_bytes(t)))
        .collect();
    let views: Vec<(String, TensorView)> = bytes
        .iter()
        .map(|(n, (dtype, shape, data))| {
            (
                n.clone(),
                TensorView::new(*dtype, shape.clone(), data).unwrap(),
            )
        })
        .collect();
    let metadata = HashMap::from([("spec".to_string(), spec.to_string())]);
    std::fs::write(path, safetensors::serialize(views, Some(metadata)).unwrap()).unwrap();
}

fn ids(tokens: &[u32]) -> Tensor {
    Tensor::from_slice(&tokens.iter().map(|&t| i64::from(t)).collect::<Vec<_>>())
}

/// One step prepared for the reference: our loss and gradients, and where the reference reads
/// the step's inputs and writes its own.
struct Prepared {
    what: String,
    ours: (f64, Vec<(String, Tensor)>),
    input: PathBuf,
    output: PathBuf,
}

/// Our step for `stage` of `method`, and the reference's input for the same step.
fn prepare(tmp: &Path, data: &PreferenceData, method: &MethodConfig, stage: &Stage) -> Prepared {
    let k = data.dimensions.len();
    let pairs = &data.train.pairs;
    let loaded = model(&tmp.join("model"), method, k);
    let pool = stage.pool.pair_ids(pairs, data.seed);
    let global: Vec<usize> = pool.iter().take(GLOBAL_BATCH).copied().collect();
    assert_eq!(global.len(), GLOBAL_BATCH);
    let tokenizer = ChatTokenizer::from_model_dir(&tmp.join("model"), None).unwrap();
    let pad = tokenizer.pad_token_id();
    let cached = reference::compute_for(&loaded.model, pairs, &global, 4, pad, Device::Cpu);
    let plan = BatchPlan::from_factors(GLOBAL_BATCH, 4, Some(2), 1).unwrap();
    let settings = settings(method);
    let drawn = settings
        .weight_sampling
        .draw(SEED, stage.number, 0, GLOBAL_BATCH, k);
    let mut runner =
        StepRunner::new(&loaded.model, stage, settings, &Single, plan, 0, k, pad).unwrap();
    let ours = runner
        .gradients(pairs, &global, ReferenceSource::Cached(&cached), 0)
        .unwrap();

    // The same pairs, weights and adapters for the reference.
    let selected: Vec<&TokenizedPair> = global.iter().map(|&i| &pairs[i]).collect();
    let mut tensors = Vec::new();
    for (j, pair) in selected.iter().enumerate() {
        tensors.push((format!("pair{j}.prompt"), ids(&pair.prompt_ids)));
        tensors.push((format!("pair{j}.a"), ids(&pair.response_a_ids)));
        tensors.push((format!("pair{j}.b"), ids(&pair.response_b_ids)));
    }
    let preferences: Vec<i64> = selected
        .iter()
        .flat_map(|p| p.preferences.iter().map(|&x| x.sign() as i64))
        .collect();
    tensors.push((
        "preferences".into(),
        Tensor::from_slice(&preferences).view([GLOBAL_BATCH as i64, k as i64]),
    ));
    let weights: Vec<f32> = drawn.iter().flatten().copied().collect();
    tensors.push((
        "weights".into(),
        Tensor::from_slice(&weights).view([GLOBAL_BATCH as i64, k as i64]),
    ));
    for (name, var) in loaded.adapters.variables() {
        if !name.ends_with("_kept") {
            tensors.push((name, var.detach()));
        }
    }
    let spec = loaded.model.adapter_spec().unwrap();
    let spec = serde_json::json!({
        "model_dir": tmp.join("model"), "beta": BETA, "k": k,
        "method": serde_json::to_value(method.name).unwrap(), "stage": stage.number,
        "rank": spec.rank, "alpha": spec.alpha, "shared": spec.shared,
        "adapter_kind": if spec.kind == AdapterKind::AdaLora { "adalora" } else { "lora" },
        "orth_reg_weight": method.adalora(10).map_or(0.0, |a| a.orth_reg_weight),
        "length_correction": serde_json::to_value(method.length_correction).unwrap(),
        "length_alpha": method.length_alpha.unwrap_or(0.0),
    });
    let what = format!(
        "{:?} stage {} ({:?}, length {:?})",
        method.name, stage.number, method.weight_sampling, method.length_correction
    );
    let name = what.replace([' ', '(', ')'], "_");
    let input = tmp.join(format!("{name}.in.safetensors"));
    write_input(&input, spec, tensors);
    let output = tmp.join(format!("{name}.out.safetensors"));
    Prepared {
        what,
        ours,
        input,
        output,
    }
}

/// Every stage of every method on `data`, through one run of the reference: the loss and each
/// gradient within 1e-5 of the tensor's largest gradient; the same tensors trained on both
/// sides.
fn check(tmp: &Path, data: &PreferenceData) {
    let prepared: Vec<Prepared> = methods()
        .iter()
        .flat_map(|method| {
            stages(method.name)
                .into_iter()
                .map(|stage| prepare(tmp, data, method, &stage))
                .collect::<Vec<_>>()
        })
        .collect();
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("python/reference_step.py");
    let out = Command::new("python3")
        .arg(&script)
        .args(prepared.iter().flat_map(|p| [&p.input, &p.output]))
        .output()
        .expect("python3 from .venv (run through `make test`)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for Prepared {
        what, ours, output, ..
    } in &prepared
    {
        let reference: HashMap<String, Tensor> = Tensor::read_safetensors(output)
            .unwrap()
            .into_iter()
            .collect();
        let (loss, gradients) = ours;
        let expected_loss = reference["loss"].double_value(&[]);
        assert!(
            (loss - expected_loss).abs() <= 1e-5 * expected_loss.abs().max(1.0),
            "{what}: loss {loss} vs the reference's {expected_loss}"
        );
        let names = reference.keys().filter(|n| n.starts_with("grad.")).count();
        assert_eq!(names, gradients.len(), "{what}: trained tensors");
        let mut worst = 0f64;
        for (name, ours) in gradients {
            let expected = &reference[&format!("grad.{name}")];
            let scale = expected.abs().max().double_value(&[]);
            let diff = (ours - expected).abs().max().double_value(&[]);
            assert!(
                scale > 0.0,
                "{what} {name}: the reference's gradient is zero"
            );
            assert!(
                diff <= 1e-5 * scale,
                "{what} {name}: differs by {diff} (largest {scale})"
            );
            worst = worst.max(diff / scale);
        }
        eprintln!("{what}: loss {loss:.6}, worst gradient difference {worst:.1e} of the largest");
    }
}

fn methods() -> Vec<MethodConfig> {
    let per_step = MethodConfig {
        weight_sampling: WeightSampling::PerStep,
        ..MethodConfig::new(MethodName::Curriculum)
    };
    // The length corrections: the curriculum's three stages (DPO, per-dimension DPO, the
    // teacher and student of the KL) and Panacea's linear scalarisation. R-DPO's alpha / beta
    // = 0.1 keeps the length term (up to ~6 for these responses) near the margins' scale; at
    // alpha = 0.05 (a term up to ~30) one run had a gradient 1.03e-5 of its tensor's largest
    // off, just over the tolerance, while the f64 finite-difference test in loss.rs passes.
    let corrected = |name, correction, alpha| MethodConfig {
        length_correction: correction,
        length_alpha: alpha,
        ..MethodConfig::new(name)
    };
    vec![
        MethodConfig::new(MethodName::Curriculum),
        per_step,
        MethodConfig::new(MethodName::PanaceaLora),
        MethodConfig::new(MethodName::Panacea),
        MethodConfig::new(MethodName::DpoSoup),
        corrected(MethodName::Curriculum, LengthCorrectionName::PerToken, None),
        corrected(
            MethodName::Curriculum,
            LengthCorrectionName::RDpo,
            Some(0.01),
        ),
        corrected(
            MethodName::PanaceaLora,
            LengthCorrectionName::RDpo,
            Some(0.01),
        ),
    ]
}

#[test]
fn every_stage_matches_the_reference_on_pku_saferlhf_pairs() {
    let tmp = tempfile::tempdir().unwrap();
    let data = dataset(tmp.path(), "pku-saferlhf", "pku_saferlhf_sample.jsonl", 120);
    check(tmp.path(), &data);
}

/// HelpSteer: k = 5, and ties (no preference in a dimension) that the masks must drop.
#[test]
fn every_stage_matches_the_reference_on_helpsteer_pairs_with_ties() {
    let tmp = tempfile::tempdir().unwrap();
    let data = dataset(tmp.path(), "helpsteer", "helpsteer_sample.jsonl", 60);
    let ties = data
        .train
        .pairs
        .iter()
        .filter(|p| p.preferences.iter().any(|x| x.sign() == 0));
    assert!(ties.count() > 0, "the pairs have ties");
    check(tmp.path(), &data);
}

/// Data parallelism before the optimizer: the same global batch on 2 ranks (each its shard, 1
/// micro-batch of 4) gives gradients whose mean over the ranks (what the all-reduce computes)
/// is the 1-rank gradient (2 micro-batches of 4), and losses that sum to its loss, for the
/// plans where the normalisers differ most: HelpSteer's ties (per-dimension counts), stage 3's
/// teacher and Panacea's penalty (added on every rank, counted once). A wrong world-size
/// factor, a shard normalised by its own size or a penalty counted per rank fails it.
#[test]
fn two_ranks_average_to_the_one_rank_step() {
    let tmp = tempfile::tempdir().unwrap();
    let data = dataset(tmp.path(), "helpsteer", "helpsteer_sample.jsonl", 60);
    let k = data.dimensions.len();
    let pairs = &data.train.pairs;
    for method in [
        MethodConfig::new(MethodName::Curriculum),
        MethodConfig::new(MethodName::Panacea),
    ] {
        let loaded = model(&tmp.path().join("model"), &method, k);
        let tokenizer = ChatTokenizer::from_model_dir(&tmp.path().join("model"), None).unwrap();
        let pad = tokenizer.pad_token_id();
        let stage = stages(method.name).pop().unwrap();
        let global: Vec<usize> = stage
            .pool
            .pair_ids(pairs, data.seed)
            .into_iter()
            .take(GLOBAL_BATCH)
            .collect();
        let cached = reference::compute_for(&loaded.model, pairs, &global, 4, pad, Device::Cpu);
        // `Single`'s all-reduce leaves each rank's own gradients, which the test averages.
        let step = |accumulation: usize, world_size: usize, rank: usize| {
            let plan =
                BatchPlan::from_factors(GLOBAL_BATCH, 4, Some(accumulation), world_size).unwrap();
            let mut runner = StepRunner::new(
                &loaded.model,
                &stage,
                settings(&method),
                &Single,
                plan,
                rank,
                k,
                pad,
            )
            .unwrap();
            runner
                .gradients(pairs, &global, ReferenceSource::Cached(&cached), 0)
                .unwrap()
        };
        let (one_loss, one) = step(2, 1, 0);
        let (loss_0, rank_0) = step(1, 2, 0);
        let (loss_1, rank_1) = step(1, 2, 1);
        let what = format!("{:?} stage {}", method.name, stage.number);
        assert!(
            (loss_0 + loss_1 - one_loss).abs() <= 1e-5 * one_loss.abs(),
            "{what}: losses {loss_0} + {loss_1} vs {one_loss}"
        );
        for (((name, g), (_, g0)), (_, g1)) in one.iter().zip(&rank_0).zip(&rank_1) {
            let scale = g.abs().max().double_value(&[]);
            let diff = ((g0 + g1) / 2.0 - g).abs().max().double_value(&[]);
            assert!(
                scale > 0.0 && diff <= 1e-5 * scale,
                "{what} {name}: differs by {diff}"
            );
            assert!(
                !g0.allclose(g, 1e-3, 1e-3, false),
                "{what} {name}: the shards differ"
            );
        }
    }
}
