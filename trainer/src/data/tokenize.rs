//! Tokenization of preference pairs: the prompt through the model's chat template (a user turn
//! plus the generation prompt), each response as raw text followed by exactly one EOS, and the
//! truncation rule for pairs longer than `max_length`.
//!
//! Every distinct prompt and response of a file is encoded once, in parallel (`rayon`): in
//! HelpSteer a response occurs in up to three pairs and a prompt in up to six. The encodings are
//! cached on disk, before truncation, under a key of (file bytes, tokenizer fingerprint, data
//! format, cache format version); `max_length` is not part of the key because truncation is
//! applied after loading, so changing it reuses the cache instead of re-encoding.

use std::collections::HashMap;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use rayon::prelude::*;
use sha2::{Digest, Sha256};

use super::config::DataFormat;
use super::error::DataError;
use super::sources::SourceData;
use super::split::{PairKind, Preference};
use crate::tokenizer::ChatTokenizer;

/// Bump when the encoding or the cache layout changes: old cache files then miss.
pub const CACHE_FORMAT_VERSION: u32 = 1;
const CACHE_MAGIC: &[u8; 8] = b"MODPOTOK";

/// The encodings of one file's distinct texts, and for every pair which ones it uses.
#[derive(Debug, Clone)]
pub struct EncodedSource {
    /// Chat-templated prompt ids, one per distinct prompt.
    pub prompts: Vec<Vec<u32>>,
    /// Response ids, EOS-terminated (exactly one EOS), one per distinct response.
    pub responses: Vec<Vec<u32>>,
    /// Per pair of the source: (prompt, response_a, response_b) indices.
    pub pair_texts: Vec<[usize; 3]>,
    /// Whether the encodings came from the cache.
    pub from_cache: bool,
}

/// Encodes the distinct texts of `source`, reading and writing the cache in `cache_dir`.
pub fn encode_source(
    source: &SourceData,
    format: DataFormat,
    tokenizer: &ChatTokenizer,
    cache_dir: Option<&Path>,
) -> Result<EncodedSource, DataError> {
    let (prompt_texts, response_texts, pair_texts) = intern_texts(source);
    let cache = cache_dir.map(|dir| cache_path(dir, source, format, tokenizer));
    if let Some((path, key)) = &cache {
        match read_cache(path, key, prompt_texts.len(), response_texts.len()) {
            Ok(Some((prompts, responses))) => {
                tracing::info!(
                    "tokenized {} from cache {}",
                    source.path.display(),
                    path.display()
                );
                return Ok(EncodedSource {
                    prompts,
                    responses,
                    pair_texts,
                    from_cache: true,
                });
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(
                "ignoring unreadable token cache {}: {e:#}; re-tokenizing",
                path.display()
            ),
        }
    }
    let eos = tokenizer.eos_token_id();
    let prompts = prompt_texts
        .par_iter()
        .map(|text| {
            let ids = tokenizer
                .encode_prompt(text)
                .map_err(|e| tokenize_error(source, "prompt", text, e))?;
            // Response log-probabilities are read from the logits of the token before; a
            // response must never start a sequence.
            if ids.is_empty() {
                return Err(DataError::EmptyPrompt {
                    path: source.path.clone(),
                    text: excerpt(text),
                });
            }
            Ok(ids)
        })
        .collect::<Vec<_>>()
        .into_iter()
        .collect::<Result<Vec<_>, DataError>>()?;
    let responses = response_texts
        .par_iter()
        .map(|text| {
            let mut ids = tokenizer
                .encode_text(text)
                .map_err(|e| tokenize_error(source, "response", text, e))?;
            // Exactly one EOS: a response whose text already ends in the EOS string must not
            // teach the model to emit it twice.
            while ids.last() == Some(&eos) {
                ids.pop();
            }
            ids.push(eos);
            Ok(ids)
        })
        .collect::<Vec<_>>()
        .into_iter()
        .collect::<Result<Vec<_>, DataError>>()?;
    if let Some((path, key)) = &cache {
        write_cache(path, key, &prompts, &responses).map_err(|e| DataError::CacheWrite {
            path: path.clone(),
            source: e.into(),
        })?;
    }
    Ok(EncodedSource {
        prompts,
        responses,
        pair_texts,
        from_cache: false,
    })
}

/// A [`DataError::Tokenize`] of a prompt or response (`what`) of `source`.
fn tokenize_error(
    source: &SourceData,
    what: &'static str,
    text: &str,
    error: anyhow::Error,
) -> DataError {
    DataError::Tokenize {
        path: source.path.clone(),
        what,
        text: excerpt(text),
        source: error.into(),
    }
}

/// The first characters of a text, for error messages.
fn excerpt(text: &str) -> String {
    let short: String = text.chars().take(60).collect();
    if short.len() < text.len() {
        format!("{short:?}...")
    } else {
        format!("{short:?}")
    }
}

type Interned<'a> = (Vec<&'a str>, Vec<&'a str>, Vec<[usize; 3]>);

/// The distinct prompts and responses in order of first appearance, and each pair's indices.
fn intern_texts(source: &SourceData) -> Interned<'_> {
    fn intern<'a>(
        text: &'a str,
        texts: &mut Vec<&'a str>,
        index: &mut HashMap<&'a str, usize>,
    ) -> usize {
        *index.entry(text).or_insert_with(|| {
            texts.push(text);
            texts.len() - 1
        })
    }
    let (mut prompts, mut responses) = (Vec::new(), Vec::new());
    let (mut prompt_index, mut response_index) = (HashMap::new(), HashMap::new());
    let pair_texts = source
        .pairs
        .iter()
        .map(|pair| {
            [
                intern(&pair.prompt, &mut prompts, &mut prompt_index),
                intern(&pair.response_a, &mut responses, &mut response_index),
                intern(&pair.response_b, &mut responses, &mut response_index),
            ]
        })
        .collect();
    (prompts, responses, pair_texts)
}

/// The cache file of a source, and its full key (SHA-256 of everything the encodings depend
/// on). The file name carries a prefix of the key, so a stale entry is simply not found.
fn cache_path(
    dir: &Path,
    source: &SourceData,
    format: DataFormat,
    tokenizer: &ChatTokenizer,
) -> (PathBuf, [u8; 32]) {
    let mut hasher = Sha256::new();
    for part in [
        format!("modpo-token-cache v{CACHE_FORMAT_VERSION}"),
        source.sha256.clone(),
        format.name().to_owned(),
        tokenizer.fingerprint(),
    ] {
        hasher.update((part.len() as u64).to_le_bytes());
        hasher.update(part.as_bytes());
    }
    let key: [u8; 32] = hasher.finalize().into();
    let stem = source
        .path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "data".into());
    let name = format!("{stem}.{}.tokens", hex::encode(&key[..8]));
    (dir.join(name), key)
}

fn write_u32s(out: &mut impl Write, values: &[u32]) -> std::io::Result<()> {
    out.write_all(&(values.len() as u32).to_le_bytes())?;
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    out.write_all(&bytes)
}

/// Layout (little-endian): magic, version u32, key [32], prompt count u64, response count u64,
/// then every sequence as a u32 length and its u32 ids. Written to a temporary file in the
/// same directory and renamed over the final name, so readers never see a partial file (ranks
/// sharing a node may race; the last rename wins with identical content).
fn write_cache(
    path: &Path,
    key: &[u8; 32],
    prompts: &[Vec<u32>],
    responses: &[Vec<u32>],
) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    // Unique per process and call: ranks on one node, or two loads in one process, never
    // write the same temporary file.
    static WRITES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let serial = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let temp = path.with_extension(format!("tmp.{}.{serial}", std::process::id()));
    let result = (|| -> std::io::Result<()> {
        let mut out = BufWriter::new(std::fs::File::create(&temp)?);
        out.write_all(CACHE_MAGIC)?;
        out.write_all(&CACHE_FORMAT_VERSION.to_le_bytes())?;
        out.write_all(key)?;
        out.write_all(&(prompts.len() as u64).to_le_bytes())?;
        out.write_all(&(responses.len() as u64).to_le_bytes())?;
        for ids in prompts.iter().chain(responses) {
            write_u32s(&mut out, ids)?;
        }
        let file = out.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        std::fs::rename(&temp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    Ok(result?)
}

/// `Ok(None)` when there is no cache file or its key or counts differ (a stale entry).
#[allow(clippy::type_complexity)]
fn read_cache(
    path: &Path,
    key: &[u8; 32],
    prompts: usize,
    responses: usize,
) -> Result<Option<(Vec<Vec<u32>>, Vec<Vec<u32>>)>> {
    let file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let mut input = BufReader::new(file);
    let mut header = [0u8; 8 + 4 + 32 + 8 + 8];
    input.read_exact(&mut header)?;
    if &header[..8] != CACHE_MAGIC {
        bail!("not a token cache file");
    }
    let version = u32::from_le_bytes(header[8..12].try_into()?);
    let counts = (
        u64::from_le_bytes(header[44..52].try_into()?) as usize,
        u64::from_le_bytes(header[52..60].try_into()?) as usize,
    );
    if version != CACHE_FORMAT_VERSION || &header[12..44] != key || counts != (prompts, responses) {
        return Ok(None);
    }
    let mut read_seq = || -> Result<Vec<u32>> {
        let mut len = [0u8; 4];
        input.read_exact(&mut len)?;
        let mut bytes = vec![0u8; u32::from_le_bytes(len) as usize * 4];
        input.read_exact(&mut bytes)?;
        Ok(bytes
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes(c.try_into().expect("chunk of 4")))
            .collect())
    };
    let prompt_ids = (0..prompts)
        .map(|_| read_seq())
        .collect::<Result<Vec<_>>>()?;
    let response_ids = (0..responses)
        .map(|_| read_seq())
        .collect::<Result<Vec<_>>>()?;
    Ok(Some((prompt_ids, response_ids)))
}

/// A preference pair ready for the model: token ids after truncation, scores and the
/// per-dimension preferences. Tied pairs never become one.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenizedPair {
    /// Index of the pair in its split (`PreferenceData::train` or `eval`); stable for a given
    /// data file and config, so it can key per-pair caches (reference log-probabilities).
    pub id: usize,
    /// Chat-templated prompt (user turn + generation prompt), possibly cut from the left.
    pub prompt_ids: Vec<u32>,
    /// Response ids ending in one EOS, unless cut from the right.
    pub response_a_ids: Vec<u32>,
    pub response_b_ids: Vec<u32>,
    pub scores_a: Vec<f64>,
    pub scores_b: Vec<f64>,
    pub preferences: Vec<Preference>,
    pub kind: PairKind,
    /// Lines (rows) of the source records of response a and response b.
    pub source_lines: [usize; 2],
    pub truncation: Truncation,
}

impl TokenizedPair {
    /// Tokens in the longer of the pair's two sequences (prompt + response).
    pub fn seq_len(&self) -> usize {
        self.prompt_ids.len() + self.response_a_ids.len().max(self.response_b_ids.len())
    }

    /// Tokens of the pair as one row, the prompt once and both responses after it (the
    /// shared-prompt layout of training).
    pub fn shared_row_len(&self) -> usize {
        self.prompt_ids.len() + self.response_a_ids.len() + self.response_b_ids.len()
    }

    pub fn is_conflict(&self) -> bool {
        self.kind == PairKind::Conflict
    }
}

/// How a pair was cut to fit `max_length`: the lengths it had before (responses with EOS).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Truncation {
    pub prompt_len: usize,
    pub response_a_len: usize,
    pub response_b_len: usize,
    /// Tokens kept of each (prompt from the end, responses from the start).
    pub kept_prompt: usize,
    pub kept_a: usize,
    pub kept_b: usize,
}

impl Truncation {
    /// Pair length before truncation: the longer of its two sequences.
    pub fn pair_len(&self) -> usize {
        self.prompt_len + self.response_a_len.max(self.response_b_len)
    }

    pub fn prompt_cut(&self) -> bool {
        self.kept_prompt < self.prompt_len
    }

    pub fn response_cut(&self) -> bool {
        self.kept_a < self.response_a_len || self.kept_b < self.response_b_len
    }
}

/// The truncation rule: when `prompt + longer response` exceeds `max_length`, the prompt is
/// cut from the left (its end, next to the response, is what the response answers) as far as
/// needed, but not below `min_prompt` tokens; if that is not enough, the responses are cut
/// from the right (a cut response loses its EOS: it did not end there).
///
/// `min_prompt` must be at least 1 and below `max_length` (`DataConfig::validate`).
pub fn truncation(
    prompt: usize,
    a: usize,
    b: usize,
    max_length: usize,
    min_prompt: usize,
) -> Truncation {
    let longer = a.max(b);
    let kept_prompt = if prompt + longer <= max_length {
        prompt
    } else {
        max_length
            .saturating_sub(longer)
            .max(prompt.min(min_prompt))
            .min(prompt)
    };
    let room = max_length - kept_prompt;
    Truncation {
        prompt_len: prompt,
        response_a_len: a,
        response_b_len: b,
        kept_prompt,
        kept_a: a.min(room),
        kept_b: b.min(room),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_pairs_are_untouched() {
        let t = truncation(10, 5, 7, 17, 8);
        assert_eq!((t.kept_prompt, t.kept_a, t.kept_b), (10, 5, 7));
        assert!(!t.prompt_cut() && !t.response_cut());
    }

    #[test]
    fn prompt_is_cut_first() {
        // 10 + 7 = 17 > 15: the prompt gives up 2 tokens, the responses keep everything.
        let t = truncation(10, 5, 7, 15, 4);
        assert_eq!((t.kept_prompt, t.kept_a, t.kept_b), (8, 5, 7));
        assert!(t.prompt_cut() && !t.response_cut());
        assert_eq!(t.pair_len(), 17);
    }

    #[test]
    fn responses_are_cut_once_the_prompt_reaches_its_floor() {
        // Prompt may shrink to 4; the longer response is cut to 12 - 4 = 8.
        let t = truncation(10, 5, 20, 12, 4);
        assert_eq!((t.kept_prompt, t.kept_a, t.kept_b), (4, 5, 8));
        // A prompt shorter than the floor is kept whole.
        let t = truncation(3, 5, 20, 12, 4);
        assert_eq!((t.kept_prompt, t.kept_a, t.kept_b), (3, 5, 9));
        for (p, a, b) in [(1, 1, 1), (50, 3, 90), (7, 200, 1), (300, 300, 300)] {
            let t = truncation(p, a, b, 64, 32);
            assert!(t.kept_prompt + t.kept_a.max(t.kept_b) <= 64);
            assert!(t.kept_prompt >= 1 && t.kept_a >= 1 && t.kept_b >= 1);
        }
    }
}
