//! Dataset readers: PKU-SafeRLHF, HelpSteer / HelpSteer2 and the generic format, each turning
//! the records of one file into k-dimensional preference pairs `(x, y_a, y_b, s_a, s_b)`
//! (METHOD section 1).
//!
//! Every field is checked here, once, and a bad one stops the run with the file, the line and
//! the field named: silently skipping a row would change the data set without anyone knowing.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::config::DataFormat;
use super::error::{DataError, Location};
use super::records::{Field, Record, RecordFile};

type Result<T, E = DataError> = std::result::Result<T, E>;

/// One preference sample as read from a source, before tokenization.
#[derive(Debug, Clone, PartialEq)]
pub struct PreferencePair {
    pub prompt: String,
    pub response_a: String,
    pub response_b: String,
    /// Scores of `response_a`, one per configured dimension, in the configured order.
    pub scores_a: Vec<f64>,
    pub scores_b: Vec<f64>,
    /// Lines (rows) of the records `response_a` and `response_b` come from; the same line
    /// twice for formats that hold a whole pair in one record.
    pub source_lines: [usize; 2],
}

/// All pairs of one file.
#[derive(Debug, Clone)]
pub struct SourceData {
    pub path: PathBuf,
    /// SHA-256 of the file's bytes (hex): the file part of the tokenization cache key.
    pub sha256: String,
    /// Records read (non-blank lines or Parquet rows).
    pub rows: usize,
    pub pairs: Vec<PreferencePair>,
}

/// Reads `path` in `format`, keeping the `dimensions` (already validated against the format by
/// `DataConfig::dimension_names`) in that order.
pub fn read_source(path: &Path, format: DataFormat, dimensions: &[String]) -> Result<SourceData> {
    let (file, pairs) = match format {
        DataFormat::PkuSaferlhf => read_pku(path, dimensions)?,
        DataFormat::Helpsteer => read_helpsteer(path, dimensions)?,
        DataFormat::Generic => read_generic(path, dimensions)?,
    };
    Ok(SourceData {
        path: file.path,
        sha256: file.sha256,
        rows: file.records.len(),
        pairs,
    })
}

/// Typed access to the requested columns of one record, with located errors.
struct Row<'a> {
    file: &'a RecordFile,
    record: &'a Record,
    columns: &'a [&'a str],
}

impl Row<'_> {
    fn at(&self) -> Box<Location> {
        Box::new(self.file.locate(self.record.line))
    }

    fn name(&self, index: usize) -> String {
        self.columns[index].to_owned()
    }

    fn field(&self, index: usize) -> Result<&Field> {
        match &self.record.fields[index] {
            None => Err(DataError::MissingField {
                at: self.at(),
                field: self.name(index),
            }),
            Some(Field::Null) => Err(DataError::NullField {
                at: self.at(),
                field: self.name(index),
            }),
            Some(field) => Ok(field),
        }
    }

    /// A [`DataError::WrongType`] of field `index` (of its score of `dimension` if given).
    fn wrong_type(
        &self,
        index: usize,
        dimension: Option<&str>,
        expected: impl Into<String>,
        got: &Field,
    ) -> DataError {
        DataError::WrongType {
            at: self.at(),
            field: self.name(index),
            dimension: dimension.map(str::to_owned),
            expected: expected.into(),
            got: got.describe(),
        }
    }

    /// A string that is not empty or only whitespace: an empty prompt or response has no
    /// tokens to learn from and almost always means a broken export.
    fn text(&self, index: usize) -> Result<String> {
        match self.field(index)? {
            Field::Str(s) if s.trim().is_empty() => Err(DataError::EmptyText {
                at: self.at(),
                field: self.name(index),
            }),
            Field::Str(s) => Ok(s.clone()),
            other => Err(self.wrong_type(index, None, "a string", other)),
        }
    }

    /// PKU-SafeRLHF's `better_response_id` / `safer_response_id`: 0 or 1.
    fn choice(&self, index: usize) -> Result<usize> {
        match self.field(index)? {
            Field::Int(i @ (0 | 1)) => Ok(*i as usize),
            Field::Float(x) if *x == 0.0 || *x == 1.0 => Ok(*x as usize),
            other => Err(self.wrong_type(index, None, "0 or 1", other)),
        }
    }

    /// A score on a fixed integer scale `low..=high` (HelpSteer's 0-4, METHOD section 1): a
    /// finite number first, then a whole one within the scale. A float column holding `3.0`
    /// is a whole number; `2.5` or `7` is not a point of the scale.
    fn scale_score(&self, index: usize, low: i64, high: i64) -> Result<f64> {
        let field = self.field(index)?;
        let value = self.score_value(index, None, field)?;
        if value.fract() == 0.0 && (low as f64..=high as f64).contains(&value) {
            Ok(value)
        } else {
            let expected = format!("an integer score from {low} to {high}");
            Err(self.wrong_type(index, None, expected, field))
        }
    }

    /// A score vector with one finite number per dimension.
    fn scores(&self, index: usize, dimensions: &[String]) -> Result<Vec<f64>> {
        let field = self.field(index)?;
        let Field::List(items) = field else {
            let expected = format!("a list of {} scores", dimensions.len());
            return Err(self.wrong_type(index, None, expected, field));
        };
        if items.len() != dimensions.len() {
            return Err(DataError::ScoreLength {
                at: self.at(),
                field: self.name(index),
                expected: dimensions.len(),
                got: items.len(),
                dimensions: dimensions.to_vec(),
            });
        }
        items
            .iter()
            .zip(dimensions)
            .map(|(item, dim)| self.score_value(index, Some(dim), item))
            .collect()
    }

    /// A finite number; NaN and infinities would poison every comparison made with them.
    fn score_value(&self, index: usize, dimension: Option<&str>, field: &Field) -> Result<f64> {
        let value = match field {
            Field::Int(i) => *i as f64,
            Field::Float(x) => *x,
            other => return Err(self.wrong_type(index, dimension, "a number", other)),
        };
        if value.is_finite() {
            Ok(value)
        } else {
            Err(DataError::NonFiniteScore {
                at: self.at(),
                field: self.name(index),
                dimension: dimension.map(str::to_owned),
                value,
            })
        }
    }
}

/// The records of `path` with their `columns`, handed row by row to `each`.
fn for_each_row(
    path: &Path,
    columns: &[&str],
    mut each: impl FnMut(&Row) -> Result<()>,
) -> Result<RecordFile> {
    let file = RecordFile::read(path, columns)?;
    for record in &file.records {
        each(&Row {
            file: &file,
            record,
            columns,
        })?;
    }
    Ok(file)
}

/// PKU-SafeRLHF: the scores are indicators, `s_r = (1[better = r], 1[safer = r])`.
fn read_pku(path: &Path, dimensions: &[String]) -> Result<(RecordFile, Vec<PreferencePair>)> {
    const COLUMNS: [&str; 5] = [
        "prompt",
        "response_0",
        "response_1",
        "better_response_id",
        "safer_response_id",
    ];
    let mut pairs = Vec::new();
    let file = for_each_row(path, &COLUMNS, |row| {
        let prompt = row.text(0)?;
        let response_a = row.text(1)?;
        let response_b = row.text(2)?;
        let better = row.choice(3)?;
        let safer = row.choice(4)?;
        let indicator = |winner: usize, response: usize| f64::from(u8::from(winner == response));
        let scores = |response: usize| -> Vec<f64> {
            dimensions
                .iter()
                .map(|dim| match dim.as_str() {
                    "helpfulness" => indicator(better, response),
                    _ => indicator(safer, response),
                })
                .collect()
        };
        pairs.push(PreferencePair {
            prompt,
            response_a,
            response_b,
            scores_a: scores(0),
            scores_b: scores(1),
            source_lines: [row.record.line; 2],
        });
        Ok(())
    })?;
    Ok((file, pairs))
}

/// The scale of every HelpSteer / HelpSteer2 score: whole numbers 0 to 4 (METHOD section 1;
/// the data cards of `nvidia/HelpSteer` and `nvidia/HelpSteer2`).
const HELPSTEER_SCALE: (i64, i64) = (0, 4);

/// HelpSteer / HelpSteer2: one row per response. The responses to one prompt (exact text) are
/// paired in file order, every pair i < j; prompts in order of first appearance. A prompt with
/// a single response gives no pair.
fn read_helpsteer(path: &Path, dimensions: &[String]) -> Result<(RecordFile, Vec<PreferencePair>)> {
    let mut columns = vec!["prompt", "response"];
    columns.extend(dimensions.iter().map(String::as_str));
    struct Response {
        text: String,
        scores: Vec<f64>,
        line: usize,
    }
    let mut prompts: Vec<(String, Vec<Response>)> = Vec::new();
    let mut index_of: HashMap<String, usize> = HashMap::new();
    let file = for_each_row(path, &columns, |row| {
        let prompt = row.text(0)?;
        let text = row.text(1)?;
        let scores = (0..dimensions.len())
            .map(|d| row.scale_score(2 + d, HELPSTEER_SCALE.0, HELPSTEER_SCALE.1))
            .collect::<Result<Vec<_>>>()?;
        let slot = *index_of.entry(prompt.clone()).or_insert_with(|| {
            prompts.push((prompt, Vec::new()));
            prompts.len() - 1
        });
        prompts[slot].1.push(Response {
            text,
            scores,
            line: row.record.line,
        });
        Ok(())
    })?;
    let mut pairs = Vec::new();
    for (prompt, responses) in &prompts {
        for (i, a) in responses.iter().enumerate() {
            for b in &responses[i + 1..] {
                pairs.push(PreferencePair {
                    prompt: prompt.clone(),
                    response_a: a.text.clone(),
                    response_b: b.text.clone(),
                    scores_a: a.scores.clone(),
                    scores_b: b.scores.clone(),
                    source_lines: [a.line, b.line],
                });
            }
        }
    }
    Ok((file, pairs))
}

/// The generic format `{prompt, response_a, response_b, scores_a, scores_b}`.
fn read_generic(path: &Path, dimensions: &[String]) -> Result<(RecordFile, Vec<PreferencePair>)> {
    const COLUMNS: [&str; 5] = ["prompt", "response_a", "response_b", "scores_a", "scores_b"];
    let mut pairs = Vec::new();
    let file = for_each_row(path, &COLUMNS, |row| {
        pairs.push(PreferencePair {
            prompt: row.text(0)?,
            response_a: row.text(1)?,
            response_b: row.text(2)?,
            scores_a: row.scores(3, dimensions)?,
            scores_b: row.scores(4, dimensions)?,
            source_lines: [row.record.line; 2],
        });
        Ok(())
    })?;
    Ok((file, pairs))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &tempfile::TempDir, name: &str, text: &str) -> PathBuf {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    fn dims(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn pku_scores_are_indicators_in_configured_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            &dir,
            "p.jsonl",
            r#"{"prompt": "p", "response_0": "r0", "response_1": "r1", "better_response_id": 0, "safer_response_id": 1, "extra": {"x": 1}}"#,
        );
        let data = read_source(
            &path,
            DataFormat::PkuSaferlhf,
            &dims(&["harmlessness", "helpfulness"]),
        )
        .unwrap();
        assert_eq!(data.rows, 1);
        assert_eq!(data.pairs[0].scores_a, vec![0.0, 1.0]);
        assert_eq!(data.pairs[0].scores_b, vec![1.0, 0.0]);
    }

    #[test]
    fn helpsteer_pairs_all_responses_of_a_prompt() {
        let dir = tempfile::tempdir().unwrap();
        let row = |p: &str, r: &str, h: i32| {
            format!(
                "{{\"prompt\": \"{p}\", \"response\": \"{r}\", \"helpfulness\": {h}, \"correctness\": 1, \"coherence\": 1, \"complexity\": 1, \"verbosity\": 1}}\n"
            )
        };
        let text = [
            row("x", "a", 1),
            row("y", "only", 2),
            row("x", "b", 2),
            row("x", "c", 3),
        ]
        .concat();
        let path = write(&dir, "h.jsonl", &text);
        let data = read_source(
            &path,
            DataFormat::Helpsteer,
            &dims(&["verbosity", "helpfulness"]),
        )
        .unwrap();
        assert_eq!(data.rows, 4);
        let got: Vec<(&str, &str, [usize; 2])> = data
            .pairs
            .iter()
            .map(|p| (p.response_a.as_str(), p.response_b.as_str(), p.source_lines))
            .collect();
        assert_eq!(
            got,
            vec![("a", "b", [1, 3]), ("a", "c", [1, 4]), ("b", "c", [3, 4])]
        );
        assert_eq!(data.pairs[2].scores_a, vec![1.0, 2.0]);
        assert_eq!(data.pairs[2].scores_b, vec![1.0, 3.0]);
    }

    /// Writes `columns` as a one-row-group Parquet file (snappy, as `datasets` writes them).
    fn write_parquet(path: &Path, columns: Vec<(&str, arrow_array::ArrayRef)>) {
        use parquet::arrow::ArrowWriter;
        use parquet::basic::Compression;
        use parquet::file::properties::WriterProperties;
        let batch = arrow_array::RecordBatch::try_from_iter(columns).unwrap();
        let props = WriterProperties::builder()
            .set_compression(Compression::SNAPPY)
            .build();
        let file = std::fs::File::create(path).unwrap();
        let mut writer = ArrowWriter::try_new(file, batch.schema(), Some(props)).unwrap();
        writer.write(&batch).unwrap();
        writer.close().unwrap();
    }

    fn strings(values: &[&str]) -> arrow_array::ArrayRef {
        std::sync::Arc::new(arrow_array::StringArray::from(values.to_vec()))
    }

    fn score_lists(rows: Vec<Vec<f64>>) -> arrow_array::ArrayRef {
        use arrow_array::types::Float64Type;
        std::sync::Arc::new(arrow_array::ListArray::from_iter_primitive::<
            Float64Type,
            _,
            _,
        >(
            rows.into_iter().map(|r| Some(r.into_iter().map(Some)))
        ))
    }

    #[test]
    fn generic_parquet_reads_list_scores() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.parquet");
        write_parquet(
            &path,
            vec![
                ("prompt", strings(&["p1", "p2"])),
                ("response_a", strings(&["a1", "a2"])),
                ("response_b", strings(&["b1", "b2"])),
                (
                    "scores_a",
                    score_lists(vec![vec![1.0, 0.5], vec![0.0, 2.0]]),
                ),
                (
                    "scores_b",
                    score_lists(vec![vec![0.0, 1.5], vec![0.0, 2.0]]),
                ),
                ("unused", strings(&["x", "y"])),
            ],
        );
        let data = read_source(&path, DataFormat::Generic, &dims(&["x", "y"])).unwrap();
        assert_eq!(data.rows, 2);
        assert_eq!(data.pairs[0].scores_a, vec![1.0, 0.5]);
        assert_eq!(data.pairs[1].scores_b, vec![0.0, 2.0]);
        assert_eq!(data.pairs[1].response_b, "b2");
        assert_eq!(data.pairs[1].source_lines, [2, 2]);
    }

    #[test]
    fn pku_and_helpsteer_parquet_with_integer_columns() {
        use arrow_array::{ArrayRef, Int64Array};
        use std::sync::Arc;
        let dir = tempfile::tempdir().unwrap();
        let ints = |v: &[i64]| -> ArrayRef { Arc::new(Int64Array::from(v.to_vec())) };
        let path = dir.path().join("pku.parquet");
        write_parquet(
            &path,
            vec![
                ("prompt", strings(&["p"])),
                ("response_0", strings(&["r0"])),
                ("response_1", strings(&["r1"])),
                ("better_response_id", ints(&[1])),
                ("safer_response_id", ints(&[0])),
            ],
        );
        let data = read_source(
            &path,
            DataFormat::PkuSaferlhf,
            &dims(&["helpfulness", "harmlessness"]),
        )
        .unwrap();
        assert_eq!(data.pairs[0].scores_a, vec![0.0, 1.0]);
        assert_eq!(data.pairs[0].scores_b, vec![1.0, 0.0]);

        let path = dir.path().join("hs.parquet");
        let mut columns = vec![
            ("prompt", strings(&["p", "p"])),
            ("response", strings(&["x", "y"])),
        ];
        for name in DataFormat::Helpsteer.native_dimensions().unwrap() {
            columns.push((name, ints(&[4, 1])));
        }
        write_parquet(&path, columns);
        let data = read_source(&path, DataFormat::Helpsteer, &dims(&["coherence"])).unwrap();
        assert_eq!(data.pairs.len(), 1);
        assert_eq!(
            (data.pairs[0].scores_a[0], data.pairs[0].scores_b[0]),
            (4.0, 1.0)
        );
    }

    #[test]
    fn parquet_nan_score_and_missing_column_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nan.parquet");
        write_parquet(
            &path,
            vec![
                ("prompt", strings(&["p1", "p2"])),
                ("response_a", strings(&["a1", "a2"])),
                ("response_b", strings(&["b1", "b2"])),
                ("scores_a", score_lists(vec![vec![1.0], vec![f64::NAN]])),
                ("scores_b", score_lists(vec![vec![0.0], vec![1.0]])),
            ],
        );
        let err = read_source(&path, DataFormat::Generic, &dims(&["x"]))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("nan.parquet row 2: field `scores_a`, score of `x`: score NaN is not a finite number"),
            "{err}"
        );

        let path = dir.path().join("short.parquet");
        write_parquet(
            &path,
            vec![("prompt", strings(&["p"])), ("response", strings(&["r"]))],
        );
        let err = read_source(&path, DataFormat::Helpsteer, &dims(&["verbosity"]))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("short.parquet: missing column `verbosity`"),
            "{err}"
        );
    }

    /// Parquet float columns can hold what JSON cannot (NaN, inf) and HelpSteer scores
    /// between the points of its 0-4 scale: each is refused with the row and the field.
    #[test]
    fn parquet_helpsteer_scores_off_the_scale_or_not_finite() {
        use arrow_array::{ArrayRef, Float64Array};
        use std::sync::Arc;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hs.parquet");
        let floats = |v: &[f64]| -> ArrayRef { Arc::new(Float64Array::from(v.to_vec())) };
        let cases = [
            (f64::NAN, "score NaN is not a finite number"),
            (f64::INFINITY, "score inf is not a finite number"),
            (f64::NEG_INFINITY, "score -inf is not a finite number"),
            (2.5, "expected an integer score from 0 to 4, got number 2.5"),
            (
                4.0000001,
                "expected an integer score from 0 to 4, got number 4.0000001",
            ),
            (
                -0.5,
                "expected an integer score from 0 to 4, got number -0.5",
            ),
        ];
        for (bad, message) in cases {
            write_parquet(
                &path,
                vec![
                    ("prompt", strings(&["p", "p"])),
                    ("response", strings(&["x", "y"])),
                    ("helpfulness", floats(&[3.0, 1.0])),
                    ("verbosity", floats(&[4.0, bad])),
                ],
            );
            let err = read_source(
                &path,
                DataFormat::Helpsteer,
                &dims(&["helpfulness", "verbosity"]),
            )
            .unwrap_err()
            .to_string();
            let expected = format!("{} row 2: field `verbosity`: {message}", path.display());
            assert_eq!(err, expected);
        }
        let path = dir.path().join("g.parquet");
        write_parquet(
            &path,
            vec![
                ("prompt", strings(&["p1"])),
                ("response_a", strings(&["a1"])),
                ("response_b", strings(&["b1"])),
                ("scores_a", score_lists(vec![vec![1.0, 0.0]])),
                ("scores_b", score_lists(vec![vec![0.0, f64::NEG_INFINITY]])),
            ],
        );
        let err = read_source(&path, DataFormat::Generic, &dims(&["x", "y"]))
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            format!(
                "{} row 1: field `scores_b`, score of `y`: score -inf is not a finite number",
                path.display()
            )
        );
    }

    /// A caller can tell a malformed line from an unreadable file, and read where it is.
    #[test]
    fn errors_are_typed_with_their_location() {
        let dir = tempfile::tempdir().unwrap();
        let ok = r#"{"prompt": "p", "response_a": "a", "response_b": "b", "scores_a": [1], "scores_b": [0]}"#;
        let path = write(&dir, "g.jsonl", &format!("{ok}\n\n{{\"prompt\": \n"));
        match read_source(&path, DataFormat::Generic, &dims(&["x"])) {
            Err(DataError::Malformed { at, message }) => {
                assert_eq!((at.path.as_path(), at.line), (path.as_path(), 3));
                assert!(message.starts_with("malformed JSON"), "{message}");
            }
            other => panic!("expected Malformed, got {other:?}"),
        }

        let path = write(&dir, "short.jsonl", &ok.replace("[0]", "[0, 1]"));
        let err = read_source(&path, DataFormat::Generic, &dims(&["x"])).unwrap_err();
        assert!(
            matches!(
                &err,
                DataError::ScoreLength { field, expected: 1, got: 2, .. } if field == "scores_b"
            ),
            "{err:?}"
        );
        assert_eq!(err.location().map(|at| at.line), Some(1));

        let missing = dir.path().join("absent.jsonl");
        let err = read_source(&missing, DataFormat::Generic, &dims(&["x"])).unwrap_err();
        assert!(
            matches!(&err, DataError::Read { path, .. } if *path == missing),
            "{err:?}"
        );
    }

    #[test]
    fn pku_choice_must_be_zero_or_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            &dir,
            "p.jsonl",
            r#"{"prompt": "p", "response_0": "r0", "response_1": "r1", "better_response_id": 2, "safer_response_id": 1}"#,
        );
        let err = read_source(&path, DataFormat::PkuSaferlhf, &dims(&["helpfulness"]))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("p.jsonl:1: field `better_response_id`: expected 0 or 1, got integer 2"),
            "{err}"
        );
    }
}
