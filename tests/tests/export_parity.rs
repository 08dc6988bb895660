//! Exports checked by the tools that will serve them: our PEFT adapters loaded by `peft`, and
//! our merged models loaded by `transformers`, give the logits we compute for the same `w`
//! (vertices and interior points), on the golden tiny Llama with random, non-zero adapters.

use std::path::{Path, PathBuf};
use std::process::Command;

use modpo_tests::golden_model;
use modpo_trainer::checkpoint::{self, AdapterMeta, ADAPTERS_FILE};
use modpo_trainer::export;
use modpo_trainer::model::{load_model, AdapterKind, AdapterSpec, Conditioning, LoadedModel};
use tch::{Device, Kind, Tensor};

#[test]
fn peft_and_merged_exports_reproduce_our_logits() {
    exports_reproduce_our_logits(AdapterSpec {
        kind: AdapterKind::Lora,
        rank: 4,
        alpha: 8.0,
        num_dimensions: 2,
        shared: true,
    });
}

/// An AdaLoRA run's adapters (Panacea): k + 1 = 3 modules of 12 triplets per projection, some
/// dropped by rank allocation (lambda = 0, kept = 0), a different number in each projection
/// and all of them in one, so the PEFT export has a rank pattern and skips a projection.
#[test]
fn adalora_exports_reproduce_our_logits() {
    exports_reproduce_our_logits(AdapterSpec {
        kind: AdapterKind::AdaLora,
        rank: 12,
        alpha: 512.0,
        num_dimensions: 2,
        shared: true,
    });
}

/// Random non-zero adapters of `spec` on the golden tiny Llama, through the adapter file, then
/// PEFT and merged exports at vertices and interior points, checked by `peft`/`transformers`.
fn exports_reproduce_our_logits(spec: AdapterSpec) {
    let base_dir = golden_model("llama3_untied_sharded");
    let tmp = tempfile::tempdir().unwrap();
    let dimensions = vec!["helpfulness".to_string(), "harmlessness".to_string()];
    let loaded = load_model(&base_dir, Some(&spec), Device::Cpu, Kind::Float).unwrap();
    randomize_adapters(&loaded);
    // Through the adapter file, as `modpo-trainer export` reads it.
    let run = tmp.path().join("run");
    let meta = AdapterMeta::new(&base_dir, &loaded.fingerprint, &dimensions, &spec);
    checkpoint::save_adapters(&run.join(ADAPTERS_FILE), &loaded.adapters, &meta).unwrap();
    let reloaded = load_model(
        &base_dir,
        Some(
            &checkpoint::read_adapter_meta(&run.join(ADAPTERS_FILE))
                .unwrap()
                .spec(),
        ),
        Device::Cpu,
        Kind::Float,
    )
    .unwrap();
    checkpoint::load_adapters(&run.join(ADAPTERS_FILE), &reloaded.adapters).unwrap();

    let golden: std::collections::HashMap<String, Tensor> =
        Tensor::read_safetensors(base_dir.join("golden.safetensors"))
            .unwrap()
            .into_iter()
            .collect();
    let (input_ids, attention_mask) = (&golden["input_ids"], &golden["attention_mask"]);
    let rows = input_ids.size()[0];
    let mut ours = vec![
        ("input_ids".to_string(), input_ids.shallow_clone()),
        ("attention_mask".to_string(), attention_mask.shallow_clone()),
    ];
    let mut exports = Vec::new();
    let weights: [[f64; 2]; 4] = [[1.0, 0.0], [0.0, 1.0], [0.3, 0.7], [0.5, 0.5]];
    for (index, w) in weights.iter().enumerate() {
        let w_rows = Tensor::from_slice(&[w[0] as f32, w[1] as f32])
            .unsqueeze(0)
            .repeat([rows, 1]);
        let logits = tch::no_grad(|| {
            reloaded
                .model
                .forward(input_ids, attention_mask, Conditioning::Weighted(&w_rows))
        });
        let kind = if index % 2 == 0 { "peft" } else { "merged" };
        let out: PathBuf = tmp.path().join(format!("{kind}_{index}"));
        if kind == "peft" {
            export::write_peft_adapter(&reloaded.model, w, &base_dir, &out).unwrap();
        } else {
            export::write_merged_model(&reloaded.model, &reloaded.base, w, &base_dir, &out)
                .unwrap();
        }
        let base = tch::no_grad(|| {
            reloaded
                .model
                .forward(input_ids, attention_mask, Conditioning::Reference)
        });
        let effect = (&logits - base).abs().max().double_value(&[]);
        assert!(
            effect > 0.5,
            "w = {w:?}: the adapters barely move the logits ({effect})"
        );
        ours.push((format!("logits_{index}"), logits));
        exports.push(format!("{kind}={}", out.display()));
    }
    if spec.kind == AdapterKind::AdaLora {
        check_rank_pattern(&tmp.path().join("peft_0"));
    }
    // Also check both formats at an interior point.
    let w = [0.3, 0.7];
    let out = tmp.path().join("merged_interior");
    export::write_merged_model(&reloaded.model, &reloaded.base, &w, &base_dir, &out).unwrap();
    ours.push((
        format!("logits_{}", exports.len()),
        ours[2 + 2].1.shallow_clone(),
    ));
    exports.push(format!("merged={}", out.display()));

    let ours_path = tmp.path().join("ours.safetensors");
    Tensor::write_safetensors(&ours, &ours_path).unwrap();
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("python/check_exports.py");
    let output = Command::new("python3")
        .arg(&script)
        .arg(&base_dir)
        .arg(&ours_path)
        .args(&exports)
        .output()
        .expect("python3 from .venv (run through `make test`)");
    let stdout = String::from_utf8_lossy(&output.stdout);
    eprintln!("{stdout}{}", String::from_utf8_lossy(&output.stderr));
    assert!(
        output.status.success(),
        "exports differ from our logits:\n{stdout}"
    );
    assert_eq!(
        stdout
            .lines()
            .filter(|l| l.contains("max abs logits diff"))
            .count(),
        exports.len()
    );
}

/// An AdaLoRA export's ranks differ per projection, and the projection that kept nothing is
/// not adapted.
fn check_rank_pattern(export: &Path) {
    let config = std::fs::read_to_string(export.join("adapter_config.json")).unwrap();
    let config: serde_json::Value = serde_json::from_str(&config).unwrap();
    assert!(
        !config["rank_pattern"].as_object().unwrap().is_empty(),
        "ranks differ per projection: {config}"
    );
    assert_eq!(
        config["target_modules"].as_array().unwrap().len(),
        2 * 7 - 1
    );
}

/// Random adapters: large enough to move the logits by whole units (checked by the caller),
/// small enough that f32 rounding of merged weights stays well under the tolerance. AdaLoRA's
/// lambdas are scaled by alpha / r = 42.7, so they stay small, and some triplets are dropped.
fn randomize_adapters(loaded: &LoadedModel) {
    tch::manual_seed(11);
    tch::no_grad(|| {
        let mut variables: Vec<_> = loaded.adapters.variables().into_iter().collect();
        variables.sort_by(|a, b| a.0.cmp(&b.0));
        for (index, (name, mut var)) in variables.into_iter().enumerate() {
            if name.ends_with("_kept") {
                continue;
            }
            let std = if name.ends_with("_e") { 0.05 } else { 0.15 };
            var.copy_(&(Tensor::randn(var.size(), (Kind::Float, Device::Cpu)) * std));
            if name.ends_with("_e") {
                drop_triplets(loaded, &name, &var, index);
            }
        }
    });
}

/// Drops some triplets of an AdaLoRA group as the rank allocator does (lambda = 0, kept = 0):
/// the first `index % 5` of each block, or all of them in `layers.1.mlp.up_proj`'s groups.
fn drop_triplets(loaded: &LoadedModel, lambda_name: &str, lambda: &Tensor, index: usize) {
    let kept_name = format!("{}_kept", lambda_name.strip_suffix("_e").unwrap());
    let kept = loaded.adapters.variables()[&kept_name].shallow_clone();
    let rows = lambda.size()[0];
    let mut mask = vec![1f32; rows as usize];
    for (row, keep) in mask.iter_mut().enumerate() {
        let all = lambda_name.contains("layers.1.mlp.up_proj");
        if all || row % 12 < index % 5 {
            *keep = 0.0;
        }
    }
    let mask = Tensor::from_slice(&mask);
    kept.shallow_clone().copy_(&mask);
    lambda.shallow_clone().copy_(&(lambda * &mask));
}
