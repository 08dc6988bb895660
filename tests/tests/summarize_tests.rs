//! `tools/summarize_tests.sh`, the closing line of `make test`, on a hand-written cargo log and
//! a skip log written by `modpo_tests::skip_to` (`tools/test_skip.rs`): tests that skipped at
//! run time are named with their reason and counted as skipped, not passed.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Two binaries as `cargo test` prints them: five tests pass (two of them skipped at run time,
/// which cargo cannot tell), one is `#[ignore]`d.
const CARGO_LOG: &str = "\
     Running tests/gguf_smollm2.rs (target/release/deps/gguf_smollm2-0123456789abcdef)

running 3 tests
test imported_smollm2_logits_match_transformers ... ok
test imported_smollm2_greedy_answer_names_paris ... ok
test tokenizer_matches ... ok

test result: ok. 3 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.01s

     Running tests/collective_nccl.rs (target/release/deps/collective_nccl-fedcba9876543210)

running 3 tests
test slow_one ... ignored, takes an hour
test one_rank ... ok
test refused ... ok

test result: ok. 2 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.01s

   Doc-tests modpo_trainer

running 0 tests

test result: ok. 0 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.00s
";

const SKIP_LOG: &str = "\
modpo-tests/gguf_smollm2 imported_smollm2_logits_match_transformers: the SmolLM2 wheel is missing
modpo-tests/gguf_smollm2 imported_smollm2_greedy_answer_names_paris: the SmolLM2 wheel is missing
";

/// Runs the script on `log` (and `skips`, when given) with no `MODPO_SKIP_LOG` from outside:
/// its exit code and standard output.
fn summarize(dir: &Path, log: &str, skips: Option<&str>) -> (Option<i32>, String) {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tools/summarize_tests.sh");
    std::fs::write(dir.join("test.log"), log).unwrap();
    let mut command = Command::new("bash");
    command
        .arg(script)
        .arg(dir.join("test.log"))
        .env_remove("MODPO_SKIP_LOG");
    if let Some(skips) = skips {
        std::fs::write(dir.join("skips.log"), skips).unwrap();
        command.arg(dir.join("skips.log"));
    }
    let output = command.output().expect("running bash");
    assert!(output.stderr.is_empty(), "{output:?}");
    (
        output.status.code(),
        String::from_utf8(output.stdout).unwrap(),
    )
}

#[test]
fn run_time_skips_are_listed_with_their_reason_and_not_counted_as_passed() {
    let dir = tempfile::tempdir().unwrap();
    let (code, out) = summarize(dir.path(), CARGO_LOG, Some(SKIP_LOG));
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(
        out,
        "skipped at run time (2):\n  \
         modpo-tests/gguf_smollm2 imported_smollm2_logits_match_transformers: the SmolLM2 wheel \
         is missing\n  \
         modpo-tests/gguf_smollm2 imported_smollm2_greedy_answer_names_paris: the SmolLM2 wheel \
         is missing\n\
         ignored (1):\n  collective_nccl slow_one\n\
         total: 3 passed, 0 failed, 3 skipped\n"
    );
}

#[test]
fn without_a_skip_log_the_counts_are_cargos() {
    let dir = tempfile::tempdir().unwrap();
    let (code, out) = summarize(dir.path(), CARGO_LOG, None);
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(
        out,
        "ignored (1):\n  collective_nccl slow_one\ntotal: 5 passed, 0 failed, 1 skipped\n"
    );
}

#[test]
fn a_failure_is_named_and_the_exit_status_is_non_zero() {
    let dir = tempfile::tempdir().unwrap();
    let log = CARGO_LOG
        .replace("test refused ... ok", "test refused ... FAILED")
        .replace(
            "2 passed; 0 failed; 1 ignored",
            "1 passed; 1 failed; 1 ignored",
        );
    let (code, out) = summarize(dir.path(), &log, Some(SKIP_LOG));
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.ends_with(
            "failed (1):\n  collective_nccl refused\ntotal: 2 passed, 1 failed, 3 skipped\n"
        ),
        "{out}"
    );
}

/// What `skip_to` appends is one line per call, named after this binary and this test, that
/// the summary reads back.
#[test]
fn skip_writes_the_line_the_summary_lists() {
    let dir = tempfile::tempdir().unwrap();
    let skips = dir.path().join("skips.log");
    let line = modpo_tests::skip_to(Some(&skips), "no CUDA device\n  (none here)");
    assert_eq!(
        line,
        "modpo-tests/summarize_tests skip_writes_the_line_the_summary_lists: \
         no CUDA device (none here)"
    );
    modpo_tests::skip_to(Some(&skips), "a second reason, not listed again");
    let written = std::fs::read_to_string(&skips).unwrap();
    assert_eq!(written.lines().count(), 2, "{written}");
    let (code, out) = summarize(dir.path(), CARGO_LOG, Some(&written));
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(
        out,
        format!(
            "skipped at run time (1):\n  {line}\nignored (1):\n  collective_nccl slow_one\n\
             total: 4 passed, 0 failed, 2 skipped\n"
        )
    );
}
