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

/// The whole message, after the temporary directory: `name:line: ...` exactly.
fn assert_message(err: &str, expected: &str) {
    assert!(
        err.ends_with(&format!("/{expected}")),
        "expected `.../{expected}`, got: {err}"
    );
}

/// A HelpSteer row: `scores` overrides the five scores, 2 by default.
fn helpsteer_row(response: &str, scores: serde_json::Value) -> String {
    let mut row = json!({"prompt": "p", "response": response, "helpfulness": 2,
        "correctness": 2, "coherence": 2, "complexity": 2, "verbosity": 2});
    for (key, value) in scores.as_object().unwrap() {
        row[key] = value.clone();
    }
    format!("{row}\n")
}

const HELPSTEER_DIMS: [&str; 5] = [
    "helpfulness",
    "correctness",
    "coherence",
    "complexity",
    "verbosity",
];

/// HelpSteer scores are integers 0 to 4 (METHOD section 1, the HelpSteer data card): a score
/// off the scale or between two of its points is refused with the line and the field.
#[test]
fn helpsteer_score_off_the_zero_to_four_scale() {
    let ok = helpsteer_row("a", json!({}));
    for (value, dims, expected) in [
        (
            json!({"helpfulness": 7}),
            &HELPSTEER_DIMS[..],
            "hs.jsonl:2: field `helpfulness`: expected an integer score from 0 to 4, got integer 7",
        ),
        (
            json!({"verbosity": -1}),
            &["verbosity"][..],
            "hs.jsonl:2: field `verbosity`: expected an integer score from 0 to 4, got integer -1",
        ),
        (
            json!({"coherence": 5}),
            &["coherence", "helpfulness"][..],
            "hs.jsonl:2: field `coherence`: expected an integer score from 0 to 4, got integer 5",
        ),
        (
            json!({"correctness": 2.5}),
            &HELPSTEER_DIMS[..],
            "hs.jsonl:2: field `correctness`: expected an integer score from 0 to 4, got number 2.5",
        ),
        (
            json!({"complexity": 4.5}),
            &HELPSTEER_DIMS[..],
            "hs.jsonl:2: field `complexity`: expected an integer score from 0 to 4, got number 4.5",
        ),
    ] {
        let text = format!("{ok}{}", helpsteer_row("b", value.clone()));
        let err = read_error(DataFormat::Helpsteer, dims, "hs.jsonl", &text);
        assert_message(&err, expected);
    }
    // A score off the scale in a dimension the config leaves out is not read at all.
    let text = format!("{ok}{}", helpsteer_row("b", json!({"helpfulness": 7})));
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "hs.jsonl", &text);
    let source = data::read_source(&path, DataFormat::Helpsteer, &dims(&["verbosity"])).unwrap();
    assert_eq!(source.pairs.len(), 1);
    // Both ends of the scale, and a whole number written as a float, are points of it.
    let text = format!(
        "{}{}",
        helpsteer_row("a", json!({"helpfulness": 0, "verbosity": 4.0})),
        helpsteer_row("b", json!({"helpfulness": 4, "verbosity": 0.0}))
    );
    let path = write(dir.path(), "edges.jsonl", &text);
    let source = data::read_source(
        &path,
        DataFormat::Helpsteer,
        &dims(&["helpfulness", "verbosity"]),
    )
    .unwrap();
    assert_eq!(source.pairs[0].scores_a, vec![0.0, 4.0]);
    assert_eq!(source.pairs[0].scores_b, vec![4.0, 0.0]);
}

/// JSON has no infinity, but a literal beyond an f64 (`1e999`) stands for one: it is refused
/// as a non-finite score in its field (and dimension), in every format that reads numbers.
#[test]
fn number_beyond_f64_is_a_non_finite_score() {
    let err = read_error(
        DataFormat::Helpsteer,
        &HELPSTEER_DIMS,
        "hs.jsonl",
        &format!(
            "{}{}",
            helpsteer_row("a", json!({})),
            helpsteer_row("b", json!({})).replace("\"verbosity\":2", "\"verbosity\":1e999")
        ),
    );
    assert_message(
        &err,
        "hs.jsonl:2: field `verbosity`: score inf is not a finite number",
    );

    let text = format!(
        "{GENERIC_OK}\n{}\n",
        GENERIC_OK.replace("[1, 0]", "[1e999, 0]")
    );
    let err = read_error(DataFormat::Generic, &["x", "y"], "g.jsonl", &text);
    assert_message(
        &err,
        "g.jsonl:2: field `scores_a`, score of `x`: score inf is not a finite number",
    );
    let text = GENERIC_OK.replace("[0, 1]", "[0, -1e400]");
    let err = read_error(DataFormat::Generic, &["x", "y"], "g.jsonl", &text);
    assert_message(
        &err,
        "g.jsonl:1: field `scores_b`, score of `y`: score -inf is not a finite number",
    );

    // PKU-SafeRLHF reads its scores from the two choices, which must be 0 or 1.
    let text = PKU_OK.replace("\"safer_response_id\": 1", "\"safer_response_id\": 1E+999");
    let err = read_error(
        DataFormat::PkuSaferlhf,
        &["helpfulness", "harmlessness"],
        "pku.jsonl",
        &text,
    );
    assert_message(
        &err,
        "pku.jsonl:1: field `safer_response_id`: expected 0 or 1, got number inf",
    );

    // In a field the format does not read, such a number is no reason to refuse the row.
    let text = GENERIC_OK.replace("{\"prompt\"", "{\"extra\": 1e999, \"prompt\"");
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "g.jsonl", &text);
    let source = data::read_source(&path, DataFormat::Generic, &dims(&["x", "y"])).unwrap();
    assert_eq!(source.pairs[0].scores_a, vec![1.0, 0.0]);
}

/// No format reads numbers from strings: "inf" or "NaN" in quotes is a wrong type, named.
#[test]
fn score_written_as_a_string_is_refused() {
    let text = GENERIC_OK.replace("[0, 1]", "[0, \"NaN\"]");
    let err = read_error(DataFormat::Generic, &["x", "y"], "g.jsonl", &text);
    assert_message(
        &err,
        "g.jsonl:1: field `scores_b`, score of `y`: expected a number, got string \"NaN\"",
    );
    let err = read_error(
        DataFormat::Helpsteer,
        &["helpfulness"],
        "hs.jsonl",
        &helpsteer_row("a", json!({"helpfulness": "inf"})),
    );
    assert_message(
        &err,
        "hs.jsonl:1: field `helpfulness`: expected a number, got string \"inf\"",
    );
    let text = PKU_OK.replace("\"better_response_id\": 0", "\"better_response_id\": \"1\"");
    let err = read_error(
        DataFormat::PkuSaferlhf,
        &["helpfulness"],
        "pku.jsonl",
        &text,
    );
    assert_message(
        &err,
        "pku.jsonl:1: field `better_response_id`: expected 0 or 1, got string \"1\"",
    );
}

/// A generic score vector must hold exactly one score per configured dimension, in any row:
/// too long, too short, empty, or not a list.
#[test]
fn generic_score_vector_of_wrong_length_in_any_row() {
    for (bad, expected) in [
        (
            GENERIC_OK.replace("[1, 0]", "[1]"),
            "g.jsonl:3: field `scores_a` has 1 scores, expected 2 (one per dimension: x, y)",
        ),
        (
            GENERIC_OK.replace("[1, 0]", "[]"),
            "g.jsonl:3: field `scores_a` has 0 scores, expected 2 (one per dimension: x, y)",
        ),
        (
            GENERIC_OK.replace("[0, 1]", "[0, 1, 0.5, 2]"),
            "g.jsonl:3: field `scores_b` has 4 scores, expected 2 (one per dimension: x, y)",
        ),
        (
            GENERIC_OK.replace("[0, 1]", "1"),
            "g.jsonl:3: field `scores_b`: expected a list of 2 scores, got integer 1",
        ),
    ] {
        let text = format!("{GENERIC_OK}\n\n{bad}\n{GENERIC_OK}\n");
        let err = read_error(DataFormat::Generic, &["x", "y"], "g.jsonl", &text);
        assert_message(&err, expected);
    }
}
