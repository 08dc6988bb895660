//! Preference data (METHOD section 1): reading PKU-SafeRLHF, HelpSteer / HelpSteer2 and the
//! generic format from JSONL, gzip-compressed JSONL or Parquet; the agree / conflict split;
//! tokenization with the model's chat template; batching and sharding over ranks.
//!
//! One way through: `config` (the `[data]` section) -> `records` (a file's rows) -> `sources`
//! (preference pairs) -> `split` (kinds, per-dimension preferences, train / eval) -> `tokenize`
//! (ids, truncation, cache) -> [`PreferenceData`] -> `batch` (global batches, rank shards,
//! padded buffers). `inspect` reports on all of it. The module has no tensors in it: the
//! trainer turns [`batch::MicroBatch`] buffers into tensors.

pub mod batch;
pub mod config;
mod error;
pub mod inspect;
pub mod records;
pub mod sources;
pub mod split;
pub mod tokenize;

use std::collections::HashSet;
use std::path::PathBuf;

pub use batch::{collate, epoch_batches, eval_micro_batches, BatchPlan, EpochBatches, MicroBatch};
pub use config::{DataConfig, DataFormat};
pub use error::{BoxError, DataError, Location};
pub use inspect::inspect;
pub use sources::{read_source, PreferencePair, SourceData};
pub use split::{PairKind, Preference, PreferenceCounts};
pub use tokenize::{TokenizedPair, Truncation};

use crate::tokenizer::ChatTokenizer;
use tokenize::EncodedSource;

/// What was read from one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileSummary {
    pub path: PathBuf,
    /// Records (non-blank lines or rows).
    pub rows: usize,
    /// Pairs formed from them.
    pub pairs: usize,
    /// Whether the token ids came from the cache.
    pub from_cache: bool,
}

/// The train or the eval side.
#[derive(Debug, Clone)]
pub struct SplitData {
    /// The pairs that train or evaluate: neither tied nor identical; `pairs[i].id == i`.
    pub pairs: Vec<TokenizedPair>,
    /// Counts over every pair formed on this side, tied ones included.
    pub counts: PreferenceCounts,
    /// Distinct prompts on this side.
    pub prompts: usize,
    /// Pairs dropped because both responses have the same ids after truncation: the model
    /// could never tell them apart, so their loss would be a constant.
    pub identical_dropped: usize,
}

impl SplitData {
    /// Ids of the agree pairs (`D_agree`).
    pub fn agree(&self) -> Vec<usize> {
        self.ids_of(PairKind::Agree)
    }

    /// Ids of the conflict pairs (`D_conflict`).
    pub fn conflict(&self) -> Vec<usize> {
        self.ids_of(PairKind::Conflict)
    }

    fn ids_of(&self, kind: PairKind) -> Vec<usize> {
        self.pairs
            .iter()
            .filter(|p| p.kind == kind)
            .map(|p| p.id)
            .collect()
    }

    /// `(id, length)` of the given pairs, the input of [`epoch_batches`]: the length of the
    /// longer prompt + response row.
    pub fn pool(&self, ids: &[usize]) -> Vec<(usize, usize)> {
        self.pool_by(ids, TokenizedPair::seq_len)
    }

    /// `(id, length)` with the length a batch pads to measured by `length` (say
    /// [`TokenizedPair::shared_row_len`] when both responses share a row).
    pub fn pool_by(
        &self,
        ids: &[usize],
        length: fn(&TokenizedPair) -> usize,
    ) -> Vec<(usize, usize)> {
        ids.iter()
            .map(|&id| (id, length(&self.pairs[id])))
            .collect()
    }

    /// The pairs with the given ids, in that order (for [`collate`]).
    pub fn select(&self, ids: &[usize]) -> Vec<&TokenizedPair> {
        ids.iter().map(|&id| &self.pairs[id]).collect()
    }

    /// Pairs whose prompt was cut / whose responses were cut / either.
    pub fn truncated(&self) -> (usize, usize, usize) {
        let count = |f: &dyn Fn(&Truncation) -> bool| {
            self.pairs.iter().filter(|p| f(&p.truncation)).count()
        };
        (
            count(&|t| t.prompt_cut()),
            count(&|t| t.response_cut()),
            count(&|t| t.prompt_cut() || t.response_cut()),
        )
    }
}

/// The data of a run, tokenized and split.
#[derive(Debug, Clone)]
pub struct PreferenceData {
    pub dimensions: Vec<String>,
    /// The train file, then the eval file if there is one.
    pub files: Vec<FileSummary>,
    pub train: SplitData,
    pub eval: SplitData,
    /// Eval-file pairs dropped because their prompt is also in the train file (train and eval
    /// never share a prompt).
    pub eval_dropped_shared_prompt: usize,
    /// The run's seed (for [`PreferenceData::agree_subset`] and [`epoch_batches`]).
    pub seed: u64,
}

impl PreferenceData {
    /// `D_agree,sub`: |D_conflict| train agree pairs, uniform without replacement with the
    /// run's seed (all of `D_agree` when it is smaller, which `inspect` reports).
    pub fn agree_subset(&self) -> Vec<usize> {
        split::agree_subset(&self.train.agree(), self.train.conflict().len(), self.seed)
    }
}

/// Reads, splits and tokenizes the data of `config`.
pub fn load(config: &DataConfig, tokenizer: &ChatTokenizer) -> Result<PreferenceData, DataError> {
    config.validate()?;
    let dimensions = config.dimension_names()?;
    let k = dimensions.len();
    let cache_dir = config.cache_dir.as_deref();
    let train_source = read_source(&config.train_file, config.format, &dimensions)?;
    let train_encoded =
        tokenize::encode_source(&train_source, config.format, tokenizer, cache_dir)?;
    let mut files = vec![summary(&train_source, &train_encoded)];

    let (train, eval, eval_dropped_shared_prompt) = match &config.eval_file {
        Some(eval_path) => {
            let eval_source = read_source(eval_path, config.format, &dimensions)?;
            let eval_encoded =
                tokenize::encode_source(&eval_source, config.format, tokenizer, cache_dir)?;
            files.push(summary(&eval_source, &eval_encoded));
            let train_prompts: HashSet<&str> = train_source
                .pairs
                .iter()
                .map(|p| p.prompt.as_str())
                .collect();
            let (shared, kept): (Vec<usize>, Vec<usize>) = (0..eval_source.pairs.len())
                .partition(|&i| train_prompts.contains(eval_source.pairs[i].prompt.as_str()));
            let train = build_split(
                &train_source,
                &train_encoded,
                0..train_source.pairs.len(),
                config,
                k,
            );
            let eval = build_split(&eval_source, &eval_encoded, kept, config, k);
            (train, eval, shared.len())
        }
        None => {
            let fraction = config.effective_eval_fraction();
            let (held_out, kept): (Vec<usize>, Vec<usize>) = (0..train_source.pairs.len())
                .partition(|&i| split::is_held_out(&train_source.pairs[i].prompt, fraction));
            let train = build_split(&train_source, &train_encoded, kept, config, k);
            let eval = build_split(&train_source, &train_encoded, held_out, config, k);
            (train, eval, 0)
        }
    };
    Ok(PreferenceData {
        dimensions,
        files,
        train,
        eval,
        eval_dropped_shared_prompt,
        seed: config.seed,
    })
}

fn summary(source: &SourceData, encoded: &EncodedSource) -> FileSummary {
    FileSummary {
        path: source.path.clone(),
        rows: source.rows,
        pairs: source.pairs.len(),
        from_cache: encoded.from_cache,
    }
}

/// The tokenized pairs of `selection` (source pair indices, in order): tied pairs counted and
/// dropped, every pair truncated to `max_length`, identical ones counted and dropped.
fn build_split(
    source: &SourceData,
    encoded: &EncodedSource,
    selection: impl IntoIterator<Item = usize>,
    config: &DataConfig,
    k: usize,
) -> SplitData {
    let mut counts = PreferenceCounts::new(k);
    let mut prompts = HashSet::new();
    let mut pairs = Vec::new();
    let mut identical_dropped = 0;
    for i in selection {
        let pair = &source.pairs[i];
        prompts.insert(pair.prompt.as_str());
        let preferences = split::preferences(&pair.scores_a, &pair.scores_b);
        counts.add(&preferences);
        let Some(kind) = split::classify(&preferences) else {
            continue;
        };
        let [prompt, a, b] = encoded.pair_texts[i];
        let (prompt, a, b) = (
            &encoded.prompts[prompt],
            &encoded.responses[a],
            &encoded.responses[b],
        );
        let cut = tokenize::truncation(
            prompt.len(),
            a.len(),
            b.len(),
            config.max_length,
            config.effective_min_prompt_tokens(),
        );
        let (a, b) = (&a[..cut.kept_a], &b[..cut.kept_b]);
        if a == b {
            identical_dropped += 1;
            continue;
        }
        pairs.push(TokenizedPair {
            id: pairs.len(),
            prompt_ids: prompt[prompt.len() - cut.kept_prompt..].to_vec(),
            response_a_ids: a.to_vec(),
            response_b_ids: b.to_vec(),
            scores_a: pair.scores_a.clone(),
            scores_b: pair.scores_b.clone(),
            preferences,
            kind,
            source_lines: pair.source_lines,
            truncation: cut,
        });
    }
    SplitData {
        pairs,
        counts,
        prompts: prompts.len(),
        identical_dropped,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenizer::byte_level;
    use std::path::Path;

    fn config(dir: &Path, body: &str) -> DataConfig {
        let text = format!(
            "format = \"generic\"\ndimensions = [\"x\", \"y\"]\ntrain_file = \"{}\"\nglobal_batch = 2\nmicro_batch = 1\neval_fraction = 0.0\n{body}",
            dir.join("data.jsonl").display()
        );
        toml::from_str(&text).unwrap()
    }

    fn line(prompt: &str, a: &str, b: &str, sa: [f64; 2], sb: [f64; 2]) -> String {
        serde_json::json!({"prompt": prompt, "response_a": a, "response_b": b, "scores_a": sa, "scores_b": sb})
            .to_string()
            + "\n"
    }

    fn tokenizer(dir: &Path) -> ChatTokenizer {
        byte_level::write_byte_level_tokenizer(&dir.join("model")).unwrap();
        ChatTokenizer::from_model_dir(&dir.join("model"), None).unwrap()
    }

    #[test]
    fn pairs_are_templated_eos_terminated_and_truncated() {
        let dir = tempfile::tempdir().unwrap();
        let tok = tokenizer(dir.path());
        let long_prompt = "q".repeat(100);
        let text = [
            line("hi", "yes", "no<|im_end|>", [1.0, 0.0], [0.0, 1.0]), // conflict
            line("hi", "same", "other", [1.0, 1.0], [1.0, 1.0]),       // tied
            line(
                &long_prompt,
                "abcdefgh-1",
                "abcdefgh-2",
                [2.0, 2.0],
                [1.0, 2.0],
            ), // agree, cut
            line("hi", "same", "same", [0.0, 0.0], [0.0, 1.0]),        // identical
        ]
        .concat();
        std::fs::write(dir.path().join("data.jsonl"), text).unwrap();
        let cfg = config(dir.path(), "max_length = 40\nmin_prompt_tokens = 30\n");
        let data = load(&cfg, &tok).unwrap();
        let train = &data.train;
        assert_eq!(
            (
                train.counts.pairs,
                train.counts.tied,
                train.identical_dropped
            ),
            (4, 1, 1)
        );
        assert_eq!(train.pairs.len(), 2);
        assert_eq!(data.eval.counts.pairs, 0);

        let first = &train.pairs[0];
        assert_eq!(first.prompt_ids, tok.encode_prompt("hi").unwrap());
        let mut yes = tok.encode_text("yes").unwrap();
        yes.push(byte_level::EOS_ID);
        assert_eq!(first.response_a_ids, yes);
        // The EOS already in the text is not doubled.
        let mut no = tok.encode_text("no").unwrap();
        no.push(byte_level::EOS_ID);
        assert_eq!(first.response_b_ids, no);
        assert_eq!(first.kind, PairKind::Conflict);
        assert_eq!(first.preferences, vec![Preference::A, Preference::B]);

        // 100 + 19 template tokens: the prompt keeps its last 30, the responses (11 with EOS)
        // are cut to 40 - 30 = 10: the EOS goes, the last character still differs.
        let cut = &train.pairs[1];
        let full_prompt = tok.encode_prompt(&long_prompt).unwrap();
        assert_eq!(cut.prompt_ids, full_prompt[full_prompt.len() - 30..]);
        assert_eq!(cut.response_a_ids, tok.encode_text("abcdefgh-1").unwrap());
        assert!(cut.truncation.prompt_cut() && cut.truncation.response_cut());
        assert_eq!(cut.seq_len(), 40);
        assert_eq!(train.truncated(), (1, 1, 1));
        assert_eq!(train.agree(), vec![1]);
        assert_eq!(train.conflict(), vec![0]);
    }

    #[test]
    fn pairs_identical_after_truncation_are_dropped_and_counted() {
        let dir = tempfile::tempdir().unwrap();
        let tok = tokenizer(dir.path());
        let text = line(
            "hi",
            "abcdefghijklmnopqrstuvwxyz-1",
            "abcdefghijklmnopqrstuvwxyz-2",
            [1.0, 0.0],
            [0.0, 1.0],
        );
        std::fs::write(dir.path().join("data.jsonl"), text).unwrap();
        let cfg = config(dir.path(), "max_length = 30\nmin_prompt_tokens = 20\n");
        let data = load(&cfg, &tok).unwrap();
        assert_eq!(
            (data.train.pairs.len(), data.train.identical_dropped),
            (0, 1)
        );
    }

    #[test]
    fn cache_is_reused_keyed_and_survives_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let tok = tokenizer(dir.path());
        let data_path = dir.path().join("data.jsonl");
        std::fs::write(&data_path, line("hi", "a", "b", [1.0, 0.0], [0.0, 0.0])).unwrap();
        let cache = dir.path().join("cache");
        let cfg = config(
            dir.path(),
            &format!("cache_dir = \"{}\"\n", cache.display()),
        );
        let first = load(&cfg, &tok).unwrap();
        assert!(!first.files[0].from_cache);
        let entries = || {
            std::fs::read_dir(&cache)
                .unwrap()
                .map(|e| e.unwrap().path())
                .collect::<Vec<_>>()
        };
        assert_eq!(
            entries().len(),
            1,
            "one cache file, no temporary left behind"
        );
        let second = load(&cfg, &tok).unwrap();
        assert!(second.files[0].from_cache);
        assert_eq!(first.train.pairs, second.train.pairs);

        // Another template: another fingerprint, another key.
        let other = ChatTokenizer::from_model_dir(
            &dir.path().join("model"),
            Some("{{ messages[0]['content'] }}!"),
        )
        .unwrap();
        let third = load(&cfg, &other).unwrap();
        assert!(!third.files[0].from_cache);
        assert_eq!(
            third.train.pairs[0].prompt_ids,
            other.encode_text("hi!").unwrap()
        );

        // Other bytes in the file: another key.
        std::fs::write(&data_path, line("hi", "a", "c", [1.0, 0.0], [0.0, 0.0])).unwrap();
        assert!(!load(&cfg, &tok).unwrap().files[0].from_cache);
        assert!(load(&cfg, &tok).unwrap().files[0].from_cache);

        // A corrupt cache file is recomputed, not trusted and not fatal.
        for path in entries() {
            let bytes = std::fs::read(&path).unwrap();
            std::fs::write(&path, &bytes[..bytes.len() - 3]).unwrap();
        }
        let again = load(&cfg, &tok).unwrap();
        assert!(!again.files[0].from_cache);
        assert_eq!(
            again.train.pairs[0].response_b_ids,
            vec![u32::from(b'c'), byte_level::EOS_ID]
        );
    }

    #[test]
    fn collate_pads_right_and_marks_response_tokens() {
        let dir = tempfile::tempdir().unwrap();
        let tok = tokenizer(dir.path());
        let text = [
            line("hi", "yes", "no", [1.0, 0.0], [0.0, 1.0]),
            line("hello", "a", "bb", [1.0, 1.0], [0.0, 1.0]),
        ]
        .concat();
        std::fs::write(dir.path().join("data.jsonl"), text).unwrap();
        let data = load(&config(dir.path(), ""), &tok).unwrap();
        let pairs = data.train.select(&[1, 0]);
        let batch = collate(&pairs, tok.pad_token_id());
        let (p0, p1) = (pairs[0].prompt_ids.len(), pairs[1].prompt_ids.len());
        assert_eq!((batch.pairs, batch.dimensions), (2, 2));
        assert_eq!(batch.seq_len, (p0 + 3).max(p1 + 4));
        let t = batch.seq_len;
        assert_eq!(batch.input_ids.len(), 4 * t);
        // Row 3 is pair 0 ("hi")'s response b: prompt, "no", EOS, then padding.
        let row = &batch.input_ids[3 * t..4 * t];
        let mut expected: Vec<i64> = pairs[1].prompt_ids.iter().map(|&i| i64::from(i)).collect();
        expected.extend([
            i64::from(b'n'),
            i64::from(b'o'),
            i64::from(byte_level::EOS_ID),
        ]);
        expected.resize(t, i64::from(byte_level::PAD_ID));
        assert_eq!(row, expected.as_slice());
        let mask_sum = |m: &[i64], r: usize| m[r * t..(r + 1) * t].iter().sum::<i64>();
        assert_eq!(mask_sum(&batch.response_mask, 3), 3);
        assert_eq!(mask_sum(&batch.attention_mask, 3), (p1 + 3) as i64);
        assert_eq!(mask_sum(&batch.response_mask, 0), 2); // "a" + EOS
        assert_eq!(batch.response_mask[p0], 1);
        assert_eq!(batch.response_mask[p0 - 1], 0);
        assert_eq!(batch.preferences, vec![1, 0, 1, -1]);
        assert_eq!(batch.scores_b, vec![0.0, 1.0, 0.0, 1.0]);
        assert_eq!(batch.conflict, vec![0, 1]);
        assert_eq!(batch.pair_ids, vec![1, 0]);
    }
}
