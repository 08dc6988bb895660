//! The data pipeline on the real samples in `/work/shared/data` (PKU-SafeRLHF train and test,
//! HelpSteer), checked against `tests/golden/count_preferences.py`, an independent count in
//! plain Python (`json` only).
//!
//! When these tests were written the script gave (rows, pairs, agree, conflict, tied):
//! - `pku_saferlhf_sample.jsonl`: 500, 500, 383, 117, 0. By hand:
//!   `python3 -c "import json,collections; print(collections.Counter((r['better_response_id'], r['safer_response_id']) for r in map(json.loads, open('pku_saferlhf_sample.jsonl'))))"`
//!   gives (1,1): 290, (0,0): 93, (0,1): 66, (1,0): 51, so agree = 290 + 93, conflict = 66 + 51.
//! - `pku_saferlhf_test_sample.jsonl`: 254, 254, 200, 54, 0.
//! - `helpsteer_sample.jsonl`: 500 rows over 139 prompts with 4 (105 prompts), 3 (21), 2 (4)
//!   or 1 (9) responses, so 105*6 + 21*3 + 4*1 = 697 pairs: 455 agree, 133 conflict, 109
//!   tied, and 8 untied pairs whose two responses are the same text.
//!
//! The tests compare with the script's output at run time (and with the numbers above, so a
//! change of the sample files is noticed).

use std::path::{Path, PathBuf};
use std::process::Command;

use modpo_trainer::data::{self, DataConfig, DataFormat, PreferenceCounts};
use modpo_trainer::tokenizer::byte_level;
use modpo_trainer::tokenizer::ChatTokenizer;
use serde_json::{json, Value};

fn shared_data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/data")
        .join(name)
}

fn python() -> PathBuf {
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python");
    if venv.exists() {
        venv
    } else {
        PathBuf::from("python3")
    }
}

/// The golden script's counts for a file.
fn golden(format: &str, file: &Path) -> Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("golden/count_preferences.py");
    let output = Command::new(python())
        .arg(&script)
        .arg(format)
        .arg(file)
        .output()
        .expect("running python");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

fn as_usize(v: &Value) -> usize {
    v.as_u64().unwrap() as usize
}

/// Our counts (sources + split) against the script's, field by field.
fn check_counts(format: DataFormat, file: &str, expected: [usize; 5]) {
    let path = shared_data(file);
    let gold = golden(format.name(), &path);
    let dims: Vec<String> = format
        .native_dimensions()
        .unwrap()
        .iter()
        .map(|s| s.to_string())
        .collect();
    let source = data::read_source(&path, format, &dims).unwrap();
    let counts = PreferenceCounts::of(
        dims.len(),
        source
            .pairs
            .iter()
            .map(|p| (p.scores_a.as_slice(), p.scores_b.as_slice())),
    );
    let ours = [
        source.rows,
        counts.pairs,
        counts.agree,
        counts.conflict,
        counts.tied,
    ];
    let theirs = ["rows", "pairs", "agree", "conflict", "tied"].map(|k| as_usize(&gold[k]));
    assert_eq!(ours, theirs, "{file}: rows, pairs, agree, conflict, tied");
    assert_eq!(
        theirs, expected,
        "{file}: the sample changed since the doc comment"
    );
    for (i, dim) in dims.iter().enumerate() {
        let c = counts.per_dimension[i];
        let g: Vec<usize> = gold["per_dimension"][dim]
            .as_array()
            .unwrap()
            .iter()
            .map(as_usize)
            .collect();
        assert_eq!(vec![c.prefers_a, c.prefers_b, c.ties], g, "{file}: {dim}");
        for (j, other) in dims.iter().enumerate().skip(i + 1) {
            let g = as_usize(&gold["conflicts"][format!("{dim} x {other}")]);
            assert_eq!(counts.conflicts[i][j], g, "{file}: {dim} x {other}");
        }
    }
}

#[test]
fn pku_saferlhf_train_sample_counts() {
    check_counts(
        DataFormat::PkuSaferlhf,
        "pku_saferlhf_sample.jsonl",
        [500, 500, 383, 117, 0],
    );
}

#[test]
fn pku_saferlhf_test_sample_counts() {
    check_counts(
        DataFormat::PkuSaferlhf,
        "pku_saferlhf_test_sample.jsonl",
        [254, 254, 200, 54, 0],
    );
}

#[test]
fn helpsteer_sample_counts() {
    check_counts(
        DataFormat::Helpsteer,
        "helpsteer_sample.jsonl",
        [500, 697, 455, 133, 109],
    );
}

fn byte_tokenizer(dir: &Path) -> ChatTokenizer {
    byte_level::write_byte_level_tokenizer(dir).unwrap();
    ChatTokenizer::from_model_dir(dir, None).unwrap()
}

fn config(json: Value) -> DataConfig {
    let config: DataConfig = serde_json::from_value(json).unwrap();
    config.validate().unwrap();
    config
}

/// Through `load` with a one-token-per-byte tokenizer and no truncation: every untied pair is
/// kept except those whose responses are the same text.
#[test]
fn helpsteer_load_keeps_untied_distinct_pairs() {
    let dir = tempfile::tempdir().unwrap();
    let tok = byte_tokenizer(dir.path());
    let path = shared_data("helpsteer_sample.jsonl");
    let gold = golden("helpsteer", &path);
    let cfg = config(
        json!({"format": "helpsteer", "train_file": path, "eval_fraction": 0.0,
        "max_length": 1_000_000, "global_batch": 4, "micro_batch": 1}),
    );
    let data = data::load(&cfg, &tok).unwrap();
    let identical = as_usize(&gold["identical_untied"]);
    assert_eq!(identical, 8);
    assert_eq!(data.train.identical_dropped, identical);
    assert_eq!(
        data.train.pairs.len(),
        as_usize(&gold["agree"]) + as_usize(&gold["conflict"]) - identical
    );
    assert_eq!(data.train.truncated(), (0, 0, 0));
    assert_eq!(data.eval.pairs.len(), 0);
    for pair in &data.train.pairs {
        for response in [&pair.response_a_ids, &pair.response_b_ids] {
            let eos = response
                .iter()
                .filter(|&&t| t == byte_level::EOS_ID)
                .count();
            assert_eq!(
                (eos, response.last()),
                (1, Some(&byte_level::EOS_ID)),
                "line {:?}",
                pair.source_lines
            );
        }
    }
}

/// The hash split against Python's `hashlib`: a prompt is held out when the first 8 bytes of
/// its SHA-256, as a big-endian integer, are below fraction * 2^64.
#[test]
fn hash_split_matches_hashlib_and_never_shares_a_prompt() {
    let dir = tempfile::tempdir().unwrap();
    let tok = byte_tokenizer(dir.path());
    let path = shared_data("pku_saferlhf_sample.jsonl");
    let cfg = config(
        json!({"format": "pku-saferlhf", "train_file": path, "eval_fraction": 0.3,
        "global_batch": 4, "micro_batch": 1}),
    );
    let data = data::load(&cfg, &tok).unwrap();
    let script = "import hashlib, json, sys\n\
        rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]\n\
        held = lambda p: int(hashlib.sha256(p.encode()).hexdigest()[:16], 16) < 0.3 * 2**64\n\
        print(sum(held(r['prompt']) for r in rows), len({r['prompt'] for r in rows if held(r['prompt'])}))";
    let output = Command::new(python())
        .args(["-c", script])
        .arg(&path)
        .output()
        .unwrap();
    assert!(output.status.success());
    let text = String::from_utf8(output.stdout).unwrap();
    let numbers: Vec<usize> = text
        .split_whitespace()
        .map(|s| s.parse().unwrap())
        .collect();
    assert_eq!(
        vec![data.eval.counts.pairs, data.eval.prompts],
        numbers,
        "held-out pairs and prompts"
    );
    assert_eq!(data.train.counts.pairs + data.eval.counts.pairs, 500);
    assert!(data.eval.prompts > 100 && data.train.prompts > 300);

    let source = data::read_source(&path, DataFormat::PkuSaferlhf, &data.dimensions).unwrap();
    let prompt_of = |line: usize| source.pairs[line - 1].prompt.as_str();
    let train: std::collections::HashSet<&str> = data
        .train
        .pairs
        .iter()
        .map(|p| prompt_of(p.source_lines[0]))
        .collect();
    assert!(data
        .eval
        .pairs
        .iter()
        .all(|p| !train.contains(prompt_of(p.source_lines[0]))));
}

/// With the PKU test sample as eval file, eval pairs whose prompt is in the train sample are
/// dropped and counted (the data README says a few prompts occur in both).
#[test]
fn eval_file_drops_prompts_shared_with_train() {
    let dir = tempfile::tempdir().unwrap();
    let tok = byte_tokenizer(dir.path());
    let (train_path, eval_path) = (
        shared_data("pku_saferlhf_sample.jsonl"),
        shared_data("pku_saferlhf_test_sample.jsonl"),
    );
    let cfg = config(json!({"format": "pku-saferlhf", "train_file": train_path,
        "eval_file": eval_path, "global_batch": 4, "micro_batch": 1}));
    let data = data::load(&cfg, &tok).unwrap();
    let script = "import json, sys\n\
        train = {json.loads(l)['prompt'] for l in open(sys.argv[1])}\n\
        print(sum(json.loads(l)['prompt'] in train for l in open(sys.argv[2])))";
    let output = Command::new(python())
        .args(["-c", script])
        .arg(&train_path)
        .arg(&eval_path)
        .output()
        .unwrap();
    assert!(output.status.success());
    let shared: usize = String::from_utf8(output.stdout)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(shared > 0, "the README promises a few shared prompts");
    assert_eq!(data.eval_dropped_shared_prompt, shared);
    assert_eq!(data.eval.counts.pairs, 254 - shared);
    assert_eq!(data.train.counts.pairs, 500);
}

/// `inspect` on PKU-SafeRLHF: the report carries the verified counts, and a second run reads
/// the token cache.
#[test]
fn inspect_reports_counts_and_uses_the_cache() {
    let dir = tempfile::tempdir().unwrap();
    let tok = byte_tokenizer(&dir.path().join("model"));
    let cfg = config(json!({"format": "pku-saferlhf",
        "train_file": shared_data("pku_saferlhf_sample.jsonl"), "eval_fraction": 0.0,
        "max_length": 512, "cache_dir": dir.path().join("cache"),
        "global_batch": 16, "micro_batch": 2}));
    let first = data::inspect(&cfg, &tok).unwrap();
    let line = |report: &str, label: &str| -> Vec<String> {
        report
            .lines()
            .find(|l| l.trim_start().starts_with(label))
            .unwrap_or_else(|| panic!("no `{label}` in\n{report}"))
            .split_whitespace()
            .map(str::to_owned)
            .collect()
    };
    assert_eq!(line(&first, "pairs formed")[2..], ["500", "0"]);
    assert_eq!(line(&first, "agree")[1..], ["383", "0"]);
    assert_eq!(line(&first, "conflict")[1..], ["117", "0"]);
    assert_eq!(
        line(&first, "helpfulness x harmlessness")[3..],
        ["117", "0"]
    );
    assert_eq!(line(&first, "helpfulness")[1..4], ["159", "341", "0"]);
    assert!(first.contains("(tokens computed)"), "{first}");
    // Stage 2 has 117 conflict pairs: 7 global batches of 16, 5 pairs dropped per epoch.
    assert_eq!(line(&first, "2 dimension-specific")[3..], ["117", "7", "5"]);
    let second = data::inspect(&cfg, &tok).unwrap();
    assert!(second.contains("(tokens from cache)"), "{second}");
    assert_eq!(
        first.replace("computed", "from cache"),
        second,
        "same report from the cache"
    );
}
