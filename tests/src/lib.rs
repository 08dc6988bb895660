//! Shared helpers of the integration tests: where the golden files are.
//!
//! Golden files are produced by the Python scripts in `tests/golden/` (run by `make golden`,
//! which `make test` runs first) with Hugging Face `transformers` as the reference. A test that
//! cannot run here calls [`skip`] (`tools/test_skip.rs`) so that the summary counts it as skipped.

use std::path::PathBuf;

#[path = "../../tools/test_skip.rs"]
mod test_skip;
pub use test_skip::{skip, skip_to};

/// `MODPO_ALLOW_MISSING_REFERENCES=1` (`make test ALLOW_MISSING_REFERENCES=1`): a test whose
/// reference `make golden` could not fetch skips instead of failing.
pub fn missing_references_allowed() -> bool {
    std::env::var("MODPO_ALLOW_MISSING_REFERENCES").is_ok_and(|v| v == "1")
}

/// The running test needs `what`, which `make golden` could not produce (`why`): a run-time skip
/// when [`missing_references_allowed`], otherwise a failure that says how to allow it. The
/// caller returns right after.
pub fn skip_missing_reference(what: &str, why: &str) {
    assert!(
        missing_references_allowed(),
        "{what} is missing: {why}. Run `make golden` where it can be fetched, or let the tests \
         that need it skip: `make test ALLOW_MISSING_REFERENCES=1` \
         (`MODPO_ALLOW_MISSING_REFERENCES=1` for a plain `cargo test`)"
    );
    skip(&format!("{what} is missing: {why}"));
}

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
