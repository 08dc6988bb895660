//! Shared helpers of the integration tests: where the golden files are.
//!
//! Golden files are produced by the Python scripts in `tests/golden/` (run by `make golden`,
//! which `make test` runs first) with Hugging Face `transformers` as the reference.

use std::path::PathBuf;

/// `MODPO_GOLDEN_DIR`, or `tests/golden/out`. A test that needs it and finds it missing fails:
/// a golden test must never pass by skipping.
pub fn golden_dir() -> PathBuf {
    let dir = std::env::var_os("MODPO_GOLDEN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("golden/out"));
    assert!(
        dir.is_dir(),
        "golden directory {} is missing: run `make golden` first",
        dir.display()
    );
    dir
}

/// A golden model directory written by `golden/make_model_golden.py`.
pub fn golden_model(name: &str) -> PathBuf {
    let dir = golden_dir().join("models").join(name);
    assert!(
        dir.join("golden.safetensors").is_file(),
        "{} has no golden.safetensors: run `make golden` first",
        dir.display()
    );
    dir
}

/// `../shared/data` of the project: the real dataset samples.
pub fn shared_data_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/data")
}

/// Writes a tiny random Llama model with the byte-level test tokenizer into `dir`.
pub fn write_tiny_model(dir: &std::path::Path, seed: i64) {
    std::fs::create_dir_all(dir).unwrap();
    modpo_trainer::model::tiny::write_tiny_model(dir, &Default::default(), seed).unwrap();
}
