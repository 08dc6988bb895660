//! Records from one file, whatever its container: JSON Lines, gzip-compressed JSON Lines or
//! Parquet, the three ways Hugging Face publishes preference data sets.
//!
//! Every container becomes the same thing, a list of [`Record`]s holding only the columns the
//! dataset format asked for, each tagged with its line (JSONL) or row (Parquet) number, so that
//! the dataset readers in `sources.rs` are written once and every error can name the file and
//! the line. The file's bytes are hashed on the way (SHA-256) for the tokenization cache key.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::cast::AsArray;
use arrow_array::types::{
    Float16Type, Float32Type, Float64Type, Int16Type, Int32Type, Int64Type, Int8Type, UInt16Type,
    UInt32Type, UInt64Type, UInt8Type,
};
use arrow_array::{Array, ArrayRef};
use arrow_schema::DataType;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ProjectionMask;
use rayon::prelude::*;
use sha2::{Digest, Sha256};

use super::error::{BoxError, DataError, Location};

type Result<T, E = DataError> = std::result::Result<T, E>;

/// The container of a data file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    Jsonl,
    JsonlGz,
    Parquet,
}

impl FileKind {
    /// By extension (`.parquet`, `.gz`, `.jsonl`/`.json`), else by the first bytes (`PAR1`,
    /// the gzip magic), else JSON Lines.
    fn detect(path: &Path, bytes: &[u8]) -> FileKind {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().to_lowercase())
            .unwrap_or_default();
        if name.ends_with(".parquet") {
            FileKind::Parquet
        } else if name.ends_with(".gz") {
            FileKind::JsonlGz
        } else if name.ends_with(".jsonl") || name.ends_with(".json") {
            FileKind::Jsonl
        } else if bytes.starts_with(b"PAR1") {
            FileKind::Parquet
        } else if bytes.starts_with(&[0x1f, 0x8b]) {
            FileKind::JsonlGz
        } else {
            FileKind::Jsonl
        }
    }
}

/// One value of a record, in the few shapes preference data uses. Not `serde_json::Value`,
/// because Parquet floats may be NaN, which must reach the score check to be reported as such.
#[derive(Debug, Clone, PartialEq)]
pub enum Field {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    List(Vec<Field>),
    /// A value of a type no dataset field has (an object, a struct column): its type name.
    Other(String),
}

impl Field {
    /// What the value is, for error messages.
    pub fn describe(&self) -> String {
        match self {
            Field::Null => "null".into(),
            Field::Bool(b) => format!("boolean {b}"),
            Field::Int(i) => format!("integer {i}"),
            Field::Float(x) => format!("number {x}"),
            Field::Str(s) if s.chars().count() > 40 => {
                format!("string \"{}...\"", s.chars().take(40).collect::<String>())
            }
            Field::Str(s) => format!("string \"{s}\""),
            Field::List(items) => format!("list of {} items", items.len()),
            Field::Other(kind) => kind.clone(),
        }
    }

    fn from_json(value: serde_json::Value) -> Field {
        use serde_json::Value;
        match value {
            Value::Null => Field::Null,
            Value::Bool(b) => Field::Bool(b),
            Value::Number(n) => match n.as_i64() {
                Some(i) => Field::Int(i),
                None => Field::Float(n.as_f64().unwrap_or(f64::NAN)),
            },
            Value::String(s) => Field::Str(s),
            Value::Array(items) => Field::List(items.into_iter().map(Field::from_json).collect()),
            Value::Object(_) => Field::Other("an object".into()),
        }
    }
}

/// One record: the requested columns, in the order they were requested (`None`: absent).
#[derive(Debug, Clone)]
pub struct Record {
    /// 1-based line (JSONL) or row (Parquet) number.
    pub line: usize,
    pub fields: Vec<Option<Field>>,
}

/// The records of one file.
#[derive(Debug, Clone)]
pub struct RecordFile {
    pub path: PathBuf,
    pub kind: FileKind,
    /// SHA-256 of the file's bytes as stored (compressed or not), hex.
    pub sha256: String,
    pub records: Vec<Record>,
}

impl RecordFile {
    /// Reads `path`, keeping only `columns` of every record. A Parquet file lacking one of them
    /// is an error here; a JSON record lacking one is reported by the dataset reader, which
    /// knows whether the field is required.
    pub fn read(path: &Path, columns: &[&str]) -> Result<RecordFile> {
        let bytes = std::fs::read(path).map_err(|source| DataError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let sha256 = hex::encode(Sha256::digest(&bytes));
        let kind = FileKind::detect(path, &bytes);
        let records = match kind {
            FileKind::Jsonl => parse_jsonl(path, kind, &bytes, columns)?,
            FileKind::JsonlGz => {
                let mut text = Vec::new();
                flate2::read::MultiGzDecoder::new(&bytes[..])
                    .read_to_end(&mut text)
                    .map_err(|source| DataError::Decompress {
                        path: path.to_path_buf(),
                        source,
                    })?;
                parse_jsonl(path, kind, &text, columns)?
            }
            FileKind::Parquet => read_parquet(path, bytes, columns)?,
        };
        if records.is_empty() {
            return Err(DataError::Empty {
                path: path.to_path_buf(),
            });
        }
        Ok(RecordFile {
            path: path.to_path_buf(),
            kind,
            sha256,
            records,
        })
    }

    /// Where a record comes from, for error messages: `file:line` or `file row n`.
    pub fn locate(&self, line: usize) -> Location {
        Location {
            path: self.path.clone(),
            line,
            kind: self.kind,
        }
    }
}

/// Parses JSON Lines in parallel; blank lines are skipped, any other line must be a JSON
/// object. The first bad line in file order is the one reported.
fn parse_jsonl(path: &Path, kind: FileKind, text: &[u8], columns: &[&str]) -> Result<Vec<Record>> {
    let lines: Vec<(usize, &[u8])> = text
        .split(|&b| b == b'\n')
        .enumerate()
        .filter(|(_, line)| !line.iter().all(u8::is_ascii_whitespace))
        .map(|(i, line)| (i + 1, line))
        .collect();
    let malformed = |line: usize, message: String| DataError::Malformed {
        at: Box::new(Location {
            path: path.to_path_buf(),
            line,
            kind,
        }),
        message,
    };
    let parsed: Vec<Result<Record>> = lines
        .par_iter()
        .map(|&(line, bytes)| {
            let (value, overflows) = parse_line(bytes).map_err(|e| {
                // Python's json.dumps writes float('nan') as a bare NaN, which is not JSON.
                let text = String::from_utf8_lossy(bytes);
                let hint = if text.contains("NaN") || text.contains("Infinity") {
                    " (NaN and Infinity are not JSON numbers, and a score must be finite)"
                } else {
                    ""
                };
                malformed(line, format!("malformed JSON: {e}{hint}"))
            })?;
            let serde_json::Value::Object(mut object) = value else {
                let got = Field::from_json(value).describe();
                return Err(malformed(
                    line,
                    format!("expected a JSON object, got {got}"),
                ));
            };
            let mut fields: Vec<Option<Field>> = columns
                .iter()
                .map(|name| object.remove(*name).map(Field::from_json))
                .collect();
            for overflow in overflows {
                overflow.restore(columns, &mut fields);
            }
            Ok(Record { line, fields })
        })
        .collect();
    parsed.into_iter().collect()
}

/// One line as JSON. serde_json refuses a number literal beyond the range of an f64
/// (`1e999`) as "number out of range", without saying which field holds it; such a line is
/// parsed again with those literals read as null, and each is put back afterwards as the
/// infinity it stands for, so that the dataset reader names the field and the dimension.
fn parse_line(bytes: &[u8]) -> Result<(serde_json::Value, Vec<Overflow>), serde_json::Error> {
    match serde_json::from_slice(bytes) {
        Ok(value) => Ok((value, Vec::new())),
        Err(e) if e.to_string().starts_with("number out of range") => {
            let (text, overflows) = null_overflowing_numbers(bytes);
            match serde_json::from_slice(&text) {
                Ok(value) => Ok((value, overflows)),
                Err(_) => Err(e),
            }
        }
        Err(e) => Err(e),
    }
}

/// A number literal of a line whose value is beyond an f64 (+-inf), as the value of the
/// top-level field `key` or as item `index` of the list that is that value.
#[derive(Debug, Clone, PartialEq)]
struct Overflow {
    key: String,
    index: Option<usize>,
    value: f64,
}

impl Overflow {
    /// Puts the value back in place of the null that stood for it, if `key` is a requested
    /// column (a literal anywhere else is in a field nobody reads).
    fn restore(&self, columns: &[&str], fields: &mut [Option<Field>]) {
        let Some(column) = columns.iter().position(|c| *c == self.key) else {
            return;
        };
        let slot = match (&mut fields[column], self.index) {
            (Some(field), None) => field,
            (Some(Field::List(items)), Some(i)) if i < items.len() => &mut items[i],
            _ => return,
        };
        if *slot == Field::Null {
            *slot = Field::Float(self.value);
        }
    }
}

/// Where a scan of a JSON text is: inside an object (with the key of the value being read,
/// `None` while a key is expected) or a list (with the index of the item being read).
enum Frame {
    Object(Option<String>),
    List(usize),
}

/// `text` with every number literal that overflows an f64 replaced by `null`, and where each
/// was (top-level key, and list index one level below). A lexical scan: strings are copied
/// untouched, so a digit inside one is never taken for a number.
fn null_overflowing_numbers(text: &[u8]) -> (Vec<u8>, Vec<Overflow>) {
    let mut out = Vec::with_capacity(text.len());
    let mut overflows = Vec::new();
    let mut stack: Vec<Frame> = Vec::new();
    let mut i = 0;
    while i < text.len() {
        let start = i;
        match text[i] {
            b'"' => {
                i += 1;
                while i < text.len() && text[i] != b'"' {
                    i += if text[i] == b'\\' { 2 } else { 1 };
                }
                i = (i + 1).min(text.len());
                if let Some(Frame::Object(key @ None)) = stack.last_mut() {
                    *key = Some(serde_json::from_slice(&text[start..i]).unwrap_or_default());
                }
            }
            b'{' | b'[' => {
                stack.push(match text[i] {
                    b'{' => Frame::Object(None),
                    _ => Frame::List(0),
                });
                i += 1;
            }
            b'}' | b']' => {
                stack.pop();
                i += 1;
            }
            b',' => {
                match stack.last_mut() {
                    Some(Frame::Object(key)) => *key = None,
                    Some(Frame::List(index)) => *index += 1,
                    None => {}
                }
                i += 1;
            }
            b'-' | b'0'..=b'9' => {
                while i < text.len()
                    && matches!(text[i], b'0'..=b'9' | b'+' | b'-' | b'.' | b'e' | b'E')
                {
                    i += 1;
                }
                let literal = std::str::from_utf8(&text[start..i]).unwrap_or_default();
                if let Ok(value) = literal.parse::<f64>() {
                    if value.is_infinite() {
                        let at = match &stack[..] {
                            [Frame::Object(Some(key))] => Some((key.clone(), None)),
                            [Frame::Object(Some(key)), Frame::List(index)] => {
                                Some((key.clone(), Some(*index)))
                            }
                            _ => None,
                        };
                        if let Some((key, index)) = at {
                            overflows.push(Overflow { key, index, value });
                        }
                        out.extend_from_slice(b"null");
                        continue;
                    }
                }
            }
            _ => i += 1,
        }
        out.extend_from_slice(&text[start..i]);
    }
    (out, overflows)
}

/// Reads the requested columns of a Parquet file through Arrow, row by row.
fn read_parquet(path: &Path, bytes: Vec<u8>, columns: &[&str]) -> Result<Vec<Record>> {
    let refused = |source: BoxError| DataError::Parquet {
        path: path.to_path_buf(),
        source,
    };
    let builder = ParquetRecordBatchReaderBuilder::try_new(bytes::Bytes::from(bytes))
        .map_err(|e| refused(e.into()))?;
    let schema = builder.schema().clone();
    let missing = |column: &str, schema: &arrow_schema::Schema| DataError::MissingColumn {
        path: path.to_path_buf(),
        column: column.to_owned(),
        available: schema.fields().iter().map(|f| f.name().clone()).collect(),
    };
    let mut roots = Vec::with_capacity(columns.len());
    for name in columns {
        match schema.index_of(name) {
            Ok(index) => roots.push(index),
            Err(_) => return Err(missing(name, &schema)),
        }
    }
    let mask = ProjectionMask::roots(builder.parquet_schema(), roots);
    let reader = builder
        .with_projection(mask)
        .with_batch_size(4096)
        .build()
        .map_err(|e| refused(e.into()))?;
    let mut records = Vec::new();
    for batch in reader {
        let batch = batch.map_err(|e| refused(e.into()))?;
        let arrays: Vec<ArrayRef> = columns
            .iter()
            .map(|name| {
                batch
                    .column_by_name(name)
                    .cloned()
                    .ok_or_else(|| missing(name, &batch.schema()))
            })
            .collect::<Result<_>>()?;
        for row in 0..batch.num_rows() {
            let line = records.len() + 1;
            let fields = arrays
                .iter()
                .map(|array| Some(cell(array.as_ref(), row)))
                .collect();
            records.push(Record { line, fields });
        }
    }
    Ok(records)
}

/// One Arrow cell as a [`Field`]; a type no dataset field has becomes [`Field::Other`], which
/// the dataset reader reports with the field's name.
fn cell(array: &dyn Array, row: usize) -> Field {
    if array.is_null(row) {
        return Field::Null;
    }
    let int = |i: i64| Field::Int(i);
    match array.data_type() {
        DataType::Null => Field::Null,
        DataType::Boolean => Field::Bool(array.as_boolean().value(row)),
        DataType::Utf8 => Field::Str(array.as_string::<i32>().value(row).to_owned()),
        DataType::LargeUtf8 => Field::Str(array.as_string::<i64>().value(row).to_owned()),
        DataType::Utf8View => Field::Str(array.as_string_view().value(row).to_owned()),
        DataType::Int8 => int(array.as_primitive::<Int8Type>().value(row).into()),
        DataType::Int16 => int(array.as_primitive::<Int16Type>().value(row).into()),
        DataType::Int32 => int(array.as_primitive::<Int32Type>().value(row).into()),
        DataType::Int64 => int(array.as_primitive::<Int64Type>().value(row)),
        DataType::UInt8 => int(array.as_primitive::<UInt8Type>().value(row).into()),
        DataType::UInt16 => int(array.as_primitive::<UInt16Type>().value(row).into()),
        DataType::UInt32 => int(array.as_primitive::<UInt32Type>().value(row).into()),
        DataType::UInt64 => {
            let v = array.as_primitive::<UInt64Type>().value(row);
            i64::try_from(v)
                .map(Field::Int)
                .unwrap_or(Field::Float(v as f64))
        }
        DataType::Float16 => Field::Float(array.as_primitive::<Float16Type>().value(row).to_f64()),
        DataType::Float32 => Field::Float(array.as_primitive::<Float32Type>().value(row).into()),
        DataType::Float64 => Field::Float(array.as_primitive::<Float64Type>().value(row)),
        DataType::List(_) => list(array.as_list::<i32>().value(row)),
        DataType::LargeList(_) => list(array.as_list::<i64>().value(row)),
        DataType::FixedSizeList(_, _) => list(array.as_fixed_size_list().value(row)),
        other => Field::Other(format!("a value of Arrow type {other}")),
    }
}

fn list(items: Arc<dyn Array>) -> Field {
    Field::List((0..items.len()).map(|i| cell(items.as_ref(), i)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn jsonl_keeps_requested_columns_and_line_numbers() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.jsonl");
        std::fs::write(&path, "{\"a\": 1, \"b\": \"x\"}\n\n{\"b\": [1, 2.5]}\n").unwrap();
        let file = RecordFile::read(&path, &["b", "a"]).unwrap();
        assert_eq!(file.kind, FileKind::Jsonl);
        assert_eq!(file.records.len(), 2);
        assert_eq!(
            file.records[0].fields,
            vec![Some(Field::Str("x".into())), Some(Field::Int(1))]
        );
        assert_eq!(file.records[1].line, 3);
        assert_eq!(
            file.records[1].fields,
            vec![
                Some(Field::List(vec![Field::Int(1), Field::Float(2.5)])),
                None
            ]
        );
    }

    #[test]
    fn gzip_round_trips_and_truncation_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let text: String = (0..200)
            .map(|i| format!("{{\"a\": {i}, \"pad\": \"{}\"}}\n", "y".repeat(i)))
            .collect();
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        encoder.write_all(text.as_bytes()).unwrap();
        let gz = encoder.finish().unwrap();
        let path = dir.path().join("x.jsonl.gz");
        std::fs::write(&path, &gz).unwrap();
        let file = RecordFile::read(&path, &["a"]).unwrap();
        assert_eq!(file.kind, FileKind::JsonlGz);
        assert_eq!(file.records.len(), 200);
        assert_eq!(file.records[199].fields[0], Some(Field::Int(199)));

        std::fs::write(&path, &gz[..gz.len() / 2]).unwrap();
        let err = format!("{:#}", RecordFile::read(&path, &["a"]).unwrap_err());
        assert!(err.contains("x.jsonl.gz") && err.contains("gzip"), "{err}");
    }

    /// `1e999` is beyond an f64: serde_json refuses the line, the reader reads it as inf in
    /// its field (or list item), wherever it is, and leaves strings and other numbers alone.
    #[test]
    fn overflowing_numbers_become_infinities_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.jsonl");
        let text = concat!(
            r#"{"s": "1e999 \" [", "a": -1e999, "b": [1, 2e400, {"c": 3e999}, 1e-999], "#,
            r#""other": {"d": 1e999}}"#,
            "\n",
            r#"{"a": 1E+999}"#,
            "\n"
        );
        std::fs::write(&path, text).unwrap();
        let file = RecordFile::read(&path, &["s", "a", "b", "other"]).unwrap();
        assert_eq!(
            file.records[0].fields,
            vec![
                Some(Field::Str("1e999 \" [".into())),
                Some(Field::Float(f64::NEG_INFINITY)),
                Some(Field::List(vec![
                    Field::Int(1),
                    Field::Float(f64::INFINITY),
                    Field::Other("an object".into()),
                    Field::Float(0.0),
                ])),
                Some(Field::Other("an object".into())),
            ]
        );
        assert_eq!(file.records[1].fields[1], Some(Field::Float(f64::INFINITY)));
    }

    #[test]
    fn non_object_line_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.jsonl");
        std::fs::write(&path, "{\"a\": 1}\n[1, 2]\n").unwrap();
        let err = RecordFile::read(&path, &["a"]).unwrap_err().to_string();
        assert!(err.contains("x.jsonl:2: expected a JSON object"), "{err}");
    }
}
