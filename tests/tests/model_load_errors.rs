//! Loading a broken model directory fails with a message that names the problem: a missing
//! key, an unexpected key, a mis-shaped tensor, a pickled `.bin` checkpoint, no config.json.
//! Each case starts from a copy of a golden model directory and breaks one thing.

use std::path::{Path, PathBuf};

use modpo_tests::golden_model;
use modpo_trainer::model::load_model;
use tch::{Device, Kind, Tensor};

/// A copy of the golden tied Llama directory, in a temporary directory kept alive by the guard.
fn copy_model() -> (tempfile::TempDir, PathBuf) {
    let source = golden_model("llama3_tied");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("model");
    std::fs::create_dir(&dir).unwrap();
    for name in ["config.json", "model.safetensors"] {
        std::fs::copy(source.join(name), dir.join(name)).unwrap();
    }
    (tmp, dir)
}

/// Rewrites `dir/model.safetensors` with `edit` applied to its (name, tensor) list.
fn rewrite_weights(dir: &Path, edit: impl FnOnce(&mut Vec<(String, Tensor)>)) {
    let path = dir.join("model.safetensors");
    let mut tensors = Tensor::read_safetensors(&path).unwrap();
    edit(&mut tensors);
    Tensor::write_safetensors(&tensors, &path).unwrap();
}

fn load_error(dir: &Path) -> String {
    match load_model(dir, None, Device::Cpu, Kind::Float) {
        Ok(_) => panic!("loading {} should fail", dir.display()),
        Err(err) => format!("{err:#}"),
    }
}

#[test]
fn the_unbroken_copy_loads() {
    let (_tmp, dir) = copy_model();
    load_model(&dir, None, Device::Cpu, Kind::Float).unwrap();
}

#[test]
fn missing_key_is_named() {
    let (_tmp, dir) = copy_model();
    rewrite_weights(&dir, |t| {
        t.retain(|(name, _)| name != "model.layers.1.mlp.up_proj.weight")
    });
    let err = load_error(&dir);
    assert!(
        err.contains("missing key `model.layers.1.mlp.up_proj.weight`"),
        "{err}"
    );
}

#[test]
fn unexpected_key_is_named() {
    let (_tmp, dir) = copy_model();
    rewrite_weights(&dir, |t| {
        t.push((
            "lm_head.extra.weight".into(),
            Tensor::zeros([2, 2], (Kind::Float, Device::Cpu)),
        ))
    });
    let err = load_error(&dir);
    assert!(
        err.contains("unexpected key `lm_head.extra.weight`"),
        "{err}"
    );
    assert!(
        err.contains("model.safetensors"),
        "the file is named: {err}"
    );
}

#[test]
fn wrong_shape_is_named() {
    let (_tmp, dir) = copy_model();
    rewrite_weights(&dir, |t| {
        let entry = t
            .iter_mut()
            .find(|(n, _)| n == "model.layers.0.self_attn.k_proj.weight")
            .unwrap();
        entry.1 = Tensor::zeros([8, 64], (Kind::Float, Device::Cpu));
    });
    let err = load_error(&dir);
    assert!(
        err.contains("key `model.layers.0.self_attn.k_proj.weight`"),
        "{err}"
    );
    assert!(
        err.contains("[8, 64]") && err.contains("[16, 64]"),
        "both shapes are given: {err}"
    );
}

#[test]
fn pickled_checkpoint_is_refused() {
    let (_tmp, dir) = copy_model();
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    std::fs::write(dir.join("pytorch_model.bin"), b"not read: refused by name").unwrap();
    let err = load_error(&dir);
    assert!(
        err.contains("pytorch_model.bin") && err.contains("pickled"),
        "{err}"
    );
    assert!(
        err.contains("safetensors"),
        "the message says what to do: {err}"
    );
}

#[test]
fn missing_config_is_named() {
    let (_tmp, dir) = copy_model();
    std::fs::remove_file(dir.join("config.json")).unwrap();
    let err = load_error(&dir);
    assert!(err.contains("config.json not found"), "{err}");
}

#[test]
fn missing_shard_is_named() {
    let source = golden_model("llama3_untied_sharded");
    let tmp = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(&source).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), tmp.path().join(entry.file_name())).unwrap();
    }
    std::fs::remove_file(tmp.path().join("model-00003-of-00012.safetensors")).unwrap();
    let err = load_error(tmp.path());
    assert!(
        err.contains("model-00003-of-00012.safetensors") && err.contains("does not exist"),
        "{err}"
    );
}
