//! What can go wrong reading, checking and tokenizing preference data, as one type a caller can
//! match on: an unreadable file apart from a malformed line, a missing field, a score vector of
//! the wrong length, a score that is not finite or off its scale, a bad `[data]` key. Every
//! message names the file and the line (or row), or the config key, exactly as the data
//! readers always have.

use std::fmt;
use std::path::PathBuf;

use super::records::FileKind;

/// Any error, boxed, as the cause of a [`DataError`] (so `{:#}` still prints it).
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Where a record is: a line of a JSON Lines file or a row of a Parquet file (both 1-based).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    pub path: PathBuf,
    pub line: usize,
    pub kind: FileKind,
}

/// `file:line`, or `file row n` for Parquet.
impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            FileKind::Parquet => write!(f, "{} row {}", self.path.display(), self.line),
            _ => write!(f, "{}:{}", self.path.display(), self.line),
        }
    }
}

/// An error of the data module. The field variants name the field as written in the record;
/// `dimension` is set when the problem is one score of a score vector. Locations are boxed: an
/// error is rare, and a small one keeps every `Result` of the module small.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A `[data]` key is invalid on its own or against another; `key` is `data.<name>`.
    #[error("{key}: {message}")]
    Config { key: String, message: String },

    /// The batch factors do not multiply to the global batch (or one is zero).
    #[error("{}", batch_message(*global_batch, *micro_batch, *accumulation, *world_size))]
    BatchGeometry {
        global_batch: usize,
        micro_batch: usize,
        accumulation: Option<usize>,
        world_size: usize,
    },

    /// The data file cannot be read at all.
    #[error("cannot read data file {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A gzip file that does not decompress.
    #[error("{}: cannot decompress gzip data (truncated or corrupt file?)", path.display())]
    Decompress {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A Parquet file the reader refuses.
    #[error("{}: cannot read Parquet file", path.display())]
    Parquet {
        path: PathBuf,
        #[source]
        source: BoxError,
    },

    /// A Parquet file without a column the format needs.
    #[error("{}: missing column `{column}` (the file has: {})", path.display(), available.join(", "))]
    MissingColumn {
        path: PathBuf,
        column: String,
        available: Vec<String>,
    },

    /// The file holds no record.
    #[error("{}: no records (the file is empty)", path.display())]
    Empty { path: PathBuf },

    /// A JSON Lines line that is not JSON, or not a JSON object; `message` says which.
    #[error("{at}: {message}")]
    Malformed { at: Box<Location>, message: String },

    /// A record without a field the format needs.
    #[error("{at}: missing field `{field}`")]
    MissingField { at: Box<Location>, field: String },

    /// A field that is present but null.
    #[error("{at}: field `{field}` is null")]
    NullField { at: Box<Location>, field: String },

    /// A prompt or response that is empty or only whitespace.
    #[error("{at}: field `{field}` is empty")]
    EmptyText { at: Box<Location>, field: String },

    /// A field of the wrong type or value (a HelpSteer score off its 0-4 scale, a choice
    /// other than 0 or 1): `expected` and `got` describe both.
    #[error("{}: expected {expected}, got {got}", field_at(at, field, dimension.as_deref()))]
    WrongType {
        at: Box<Location>,
        field: String,
        dimension: Option<String>,
        expected: String,
        got: String,
    },

    /// A score that is NaN or infinite: a Parquet float, or a JSON number beyond an f64
    /// (`1e999`, which serde_json alone would refuse without naming the field).
    #[error("{}: score {value} is not a finite number", field_at(at, field, dimension.as_deref()))]
    NonFiniteScore {
        at: Box<Location>,
        field: String,
        dimension: Option<String>,
        value: f64,
    },

    /// A score vector with another length than the number of dimensions.
    #[error(
        "{at}: field `{field}` has {got} scores, expected {expected} (one per dimension: {})",
        dimensions.join(", ")
    )]
    ScoreLength {
        at: Box<Location>,
        field: String,
        expected: usize,
        got: usize,
        dimensions: Vec<String>,
    },

    /// The tokenizer failed on a prompt or a response (`what`); `text` is its beginning.
    #[error("{}: tokenizing {what} {text}", path.display())]
    Tokenize {
        path: PathBuf,
        what: &'static str,
        text: String,
        #[source]
        source: BoxError,
    },

    /// The chat template turns a prompt into no tokens; `text` is the prompt's beginning.
    #[error("{}: the chat template gives no tokens for prompt {text}", path.display())]
    EmptyPrompt { path: PathBuf, text: String },

    /// The token cache cannot be written.
    #[error("writing token cache {}", path.display())]
    CacheWrite {
        path: PathBuf,
        #[source]
        source: BoxError,
    },
}

impl DataError {
    /// A [`DataError::Config`] error of `data.<key>`.
    pub(crate) fn config(key: &str, message: impl Into<String>) -> Self {
        DataError::Config {
            key: format!("data.{key}"),
            message: message.into(),
        }
    }

    /// The record the error is about, for the per-record variants.
    pub fn location(&self) -> Option<&Location> {
        match self {
            DataError::Malformed { at, .. }
            | DataError::MissingField { at, .. }
            | DataError::NullField { at, .. }
            | DataError::EmptyText { at, .. }
            | DataError::WrongType { at, .. }
            | DataError::NonFiniteScore { at, .. }
            | DataError::ScoreLength { at, .. } => Some(at.as_ref()),
            _ => None,
        }
    }
}

/// `file:line: field `name``, with `, score of `dim`` for one score of a vector.
fn field_at(at: &Location, field: &str, dimension: Option<&str>) -> String {
    match dimension {
        Some(dim) => format!("{at}: field `{field}`, score of `{dim}`"),
        None => format!("{at}: field `{field}`"),
    }
}

/// The message of [`DataError::BatchGeometry`]: a zero factor, or the product that misses.
fn batch_message(
    global_batch: usize,
    micro_batch: usize,
    accumulation: Option<usize>,
    world_size: usize,
) -> String {
    if world_size == 0 || micro_batch == 0 || accumulation == Some(0) {
        return "world_size, micro_batch and accumulation must be at least 1".into();
    }
    match accumulation {
        None => format!(
            "global_batch {global_batch} is not a multiple of micro_batch x world_size = {micro_batch} x {world_size}"
        ),
        Some(acc) => format!(
            "global_batch {global_batch} is not micro_batch x accumulation x world_size = {micro_batch} x {acc} x {world_size}"
        ),
    }
}
