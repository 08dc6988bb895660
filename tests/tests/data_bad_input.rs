//! Bad preference data: each case must stop with an error that says what is wrong and where
//! (file and line, or the config key), never skip the row.

use std::path::{Path, PathBuf};

use modpo_trainer::data::{self, DataConfig, DataFormat};
use modpo_trainer::tokenizer::byte_level;
use modpo_trainer::tokenizer::ChatTokenizer;
use serde_json::json;

fn dims(names: &[&str]) -> Vec<String> {
    names.iter().map(|s| s.to_string()).collect()
}

fn write(dir: &Path, name: &str, bytes: impl AsRef<[u8]>) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

/// The error of reading `text` as `format`, with its whole context chain.
fn read_error(format: DataFormat, dimensions: &[&str], name: &str, text: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), name, text);
    let err = data::read_source(&path, format, &dims(dimensions))
        .expect_err("bad input must be an error");
    format!("{err:#}")
}

fn assert_contains(err: &str, parts: &[&str]) {
    for part in parts {
        assert!(err.contains(part), "`{part}` not in: {err}");
    }
}

const GENERIC_OK: &str = r#"{"prompt": "p", "response_a": "a", "response_b": "b", "scores_a": [1, 0], "scores_b": [0, 1]}"#;
const PKU_OK: &str = r#"{"prompt": "p", "response_0": "a", "response_1": "b", "better_response_id": 0, "safer_response_id": 1}"#;

#[test]
fn malformed_json_line_names_file_and_line() {
    let text = format!("{GENERIC_OK}\n{GENERIC_OK}\n{{\"prompt\": \"p\", \"response_a\": \n");
    let err = read_error(DataFormat::Generic, &["x", "y"], "broken.jsonl", &text);
    assert_contains(&err, &["broken.jsonl:3: malformed JSON"]);
}

#[test]
fn missing_field_is_named() {
    let text = format!(
        "{PKU_OK}\n{}\n",
        PKU_OK.replace(", \"safer_response_id\": 1", "")
    );
    let err = read_error(
        DataFormat::PkuSaferlhf,
        &["helpfulness", "harmlessness"],
        "pku.jsonl",
        &text,
    );
    assert_contains(&err, &["pku.jsonl:2: missing field `safer_response_id`"]);
}

#[test]
fn score_vector_of_wrong_length() {
    let text = GENERIC_OK.replace("\"scores_b\": [0, 1]", "\"scores_b\": [0, 1, 2]");
    let err = read_error(DataFormat::Generic, &["x", "y"], "g.jsonl", &text);
    assert_contains(
        &err,
        &["g.jsonl:1: field `scores_b` has 3 scores, expected 2 (one per dimension: x, y)"],
    );
}

#[test]
fn non_numeric_score() {
    let row = json!({"prompt": "p", "response": "r", "helpfulness": "high", "verbosity": 2});
    let err = read_error(
        DataFormat::Helpsteer,
        &["verbosity", "helpfulness"],
        "hs.jsonl",
        &format!("{row}\n"),
    );
    assert_contains(
        &err,
        &["hs.jsonl:1: field `helpfulness`: expected a number, got string \"high\""],
    );
    let text = GENERIC_OK.replace("[1, 0]", "[1, null]");
    let err = read_error(DataFormat::Generic, &["x", "y"], "g.jsonl", &text);
    assert_contains(
        &err,
        &["g.jsonl:1: field `scores_a`, score of `y`: expected a number, got null"],
    );
}

/// Python's `json.dumps` writes `float('nan')` as a bare `NaN`, which JSON does not allow.
/// (A NaN stored in a Parquet float column is tested in the trainer's `data::sources` tests.)
#[test]
fn nan_score() {
    let text = format!(
        "{GENERIC_OK}\n{}\n",
        GENERIC_OK.replace("[1, 0]", "[NaN, 0]")
    );
    let err = read_error(DataFormat::Generic, &["x", "y"], "nan.jsonl", &text);
    assert_contains(
        &err,
        &[
            "nan.jsonl:2: malformed JSON",
            "NaN and Infinity are not JSON numbers",
        ],
    );
}

#[test]
fn empty_response() {
    let text = PKU_OK.replace("\"response_1\": \"b\"", "\"response_1\": \"  \"");
    let err = read_error(
        DataFormat::PkuSaferlhf,
        &["helpfulness"],
        "pku.jsonl",
        &text,
    );
    assert_contains(&err, &["pku.jsonl:1: field `response_1` is empty"]);
}

#[test]
fn unknown_dimension_name() {
    let config: DataConfig = serde_json::from_value(json!({
        "format": "helpsteer", "train_file": "x.jsonl", "dimensions": ["helpfulness", "honesty"],
        "global_batch": 4, "micro_batch": 2
    }))
    .unwrap();
    let err = format!("{:#}", config.validate().unwrap_err());
    assert_contains(
        &err,
        &[
            "data.dimensions: unknown dimension `honesty`",
            "known: helpfulness, correctness",
        ],
    );
    // `load` validates too, before touching any file.
    let dir = tempfile::tempdir().unwrap();
    byte_level::write_byte_level_tokenizer(dir.path()).unwrap();
    let tok = ChatTokenizer::from_model_dir(dir.path(), None).unwrap();
    let err = format!("{:#}", data::load(&config, &tok).unwrap_err());
    assert_contains(&err, &["`honesty`"]);
}

#[test]
fn empty_file() {
    for text in ["", "\n  \n"] {
        let err = read_error(DataFormat::Generic, &["x"], "empty.jsonl", text);
        assert_contains(&err, &["empty.jsonl: no records (the file is empty)"]);
    }
}

/// CRC-32 (IEEE), for writing a gzip member by hand.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// A gzip file (RFC 1952) holding `data` in one stored deflate block (RFC 1951, BTYPE 00).
fn gzip_stored(data: &[u8]) -> Vec<u8> {
    let len = u16::try_from(data.len()).unwrap();
    let mut out = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff];
    out.push(1); // BFINAL = 1, BTYPE = stored
    out.extend(len.to_le_bytes());
    out.extend((!len).to_le_bytes());
    out.extend(data);
    out.extend(crc32(data).to_le_bytes());
    out.extend((data.len() as u32).to_le_bytes());
    out
}

#[test]
fn truncated_gzip_file() {
    let text = format!("{GENERIC_OK}\n{GENERIC_OK}\n");
    let gz = gzip_stored(text.as_bytes());
    let dir = tempfile::tempdir().unwrap();
    // The whole file reads: what fails below is the truncation, not the hand-made gzip.
    let whole = write(dir.path(), "whole.jsonl.gz", &gz);
    let source = data::read_source(&whole, DataFormat::Generic, &dims(&["x", "y"])).unwrap();
    assert_eq!(source.pairs.len(), 2);
    for cut in [gz.len() - 4, gz.len() / 2, 12] {
        let path = write(dir.path(), "cut.jsonl.gz", &gz[..cut]);
        let err = format!(
            "{:#}",
            data::read_source(&path, DataFormat::Generic, &dims(&["x", "y"])).unwrap_err()
        );
        assert_contains(
            &err,
            &["cut.jsonl.gz: cannot decompress gzip data (truncated or corrupt file?)"],
        );
    }
}

#[test]
fn bad_batch_factors_name_every_factor() {
    let err = data::BatchPlan::from_factors(6, 2, Some(2), 2)
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        "global_batch 6 is not micro_batch x accumulation x world_size = 2 x 2 x 2"
    );
}
