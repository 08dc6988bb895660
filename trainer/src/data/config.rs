//! `[data]`: which preference data set to read, how to split it, tokenize it and batch it.
//!
//! The section is owned by the data module (the run config only embeds it), validated once by
//! [`DataConfig::validate`], whose errors name the offending key as `data.<key>`.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::error::DataError;

/// The layout of the preference records in `train_file` / `eval_file`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DataFormat {
    /// PKU-SafeRLHF: `prompt`, `response_0`, `response_1`, `better_response_id`,
    /// `safer_response_id`; dimensions helpfulness, harmlessness.
    PkuSaferlhf,
    /// HelpSteer / HelpSteer2: one row per response with five 0-4 scores; the responses to one
    /// prompt are paired (all pairs i < j).
    #[serde(alias = "helpsteer2")]
    Helpsteer,
    /// `{prompt, response_a, response_b, scores_a, scores_b}`; dimension names from the config.
    Generic,
}

impl DataFormat {
    /// The dimensions a native source carries, in its own order; `None` for `generic`, whose
    /// dimensions only the config knows.
    pub fn native_dimensions(self) -> Option<&'static [&'static str]> {
        match self {
            DataFormat::PkuSaferlhf => Some(&["helpfulness", "harmlessness"]),
            DataFormat::Helpsteer => Some(&[
                "helpfulness",
                "correctness",
                "coherence",
                "complexity",
                "verbosity",
            ]),
            DataFormat::Generic => None,
        }
    }

    /// The name used in the config file and in reports.
    pub fn name(self) -> &'static str {
        match self {
            DataFormat::PkuSaferlhf => "pku-saferlhf",
            DataFormat::Helpsteer => "helpsteer",
            DataFormat::Generic => "generic",
        }
    }
}

/// `[data]` section of the run configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// Record layout of the files.
    pub format: DataFormat,
    /// Training preferences: `.jsonl`, `.jsonl.gz` or `.parquet`.
    pub train_file: PathBuf,
    /// Held-out preferences; when absent, `eval_fraction` of the train prompts are held out.
    #[serde(default)]
    pub eval_file: Option<PathBuf>,
    /// Dimension names, in the order the model's adapters use. Required for `generic`; for the
    /// native formats a subset (in any order) of the source's dimensions, all by default.
    #[serde(default)]
    pub dimensions: Option<Vec<String>>,
    /// Share of prompts held out for evaluation when there is no `eval_file` (split by a hash
    /// of the prompt text, so the split is the same on every run and platform). Default 0.05.
    #[serde(default)]
    pub eval_fraction: Option<f64>,
    /// Most tokens in one sequence (prompt + response, EOS included).
    #[serde(default = "default_max_length")]
    pub max_length: usize,
    /// A prompt longer than the room left by its responses is cut from the left, but never
    /// below this many tokens: beyond that the responses are cut instead. Default
    /// `max_length / 2`.
    #[serde(default)]
    pub min_prompt_tokens: Option<usize>,
    /// Seed of the agree subset draw and of the per-epoch shuffle.
    #[serde(default)]
    pub seed: u64,
    /// Where tokenized files are cached; no cache when absent.
    #[serde(default)]
    pub cache_dir: Option<PathBuf>,
    /// Preference pairs per optimizer step, over all ranks.
    pub global_batch: usize,
    /// Pairs per forward pass on one rank (each pair is two sequences).
    pub micro_batch: usize,
    /// Micro-batches per optimizer step on one rank; derived from the world size when absent.
    #[serde(default)]
    pub accumulation: Option<usize>,
    /// Pairs per file of the reference log-prob cache (rounded up to whole micro-batches): a
    /// run killed during the reference pass loses at most one chunk per rank. Default 256.
    #[serde(default)]
    pub reference_chunk_pairs: Option<usize>,
}

fn default_max_length() -> usize {
    1024
}

/// Default held-out share when neither `eval_file` nor `eval_fraction` is given.
pub const DEFAULT_EVAL_FRACTION: f64 = 0.05;

impl DataConfig {
    /// Checks every key on its own and against the others; the error names the key.
    pub fn validate(&self) -> Result<(), DataError> {
        self.dimension_names()?;
        if let Some(fraction) = self.eval_fraction {
            if self.eval_file.is_some() {
                return Err(DataError::config(
                    "eval_fraction",
                    "cannot be combined with data.eval_file (which already is the held-out set)",
                ));
            }
            if !(0.0..1.0).contains(&fraction) {
                return Err(DataError::config(
                    "eval_fraction",
                    format!("{fraction} is not in [0, 1)"),
                ));
            }
        }
        if self.max_length < 2 {
            return Err(DataError::config(
                "max_length",
                format!(
                    "{} leaves no room for a prompt token and a response token",
                    self.max_length
                ),
            ));
        }
        if let Some(min_prompt) = self.min_prompt_tokens {
            if min_prompt == 0 || min_prompt >= self.max_length {
                return Err(DataError::config(
                    "min_prompt_tokens",
                    format!(
                        "{min_prompt} must be at least 1 and below data.max_length = {}",
                        self.max_length
                    ),
                ));
            }
        }
        if self.reference_chunk_pairs == Some(0) {
            return Err(DataError::config(
                "reference_chunk_pairs",
                "must be at least 1",
            ));
        }
        if self.micro_batch == 0 {
            return Err(DataError::config("micro_batch", "must be at least 1"));
        }
        if self.global_batch == 0 {
            return Err(DataError::config("global_batch", "must be at least 1"));
        }
        if self.accumulation == Some(0) {
            return Err(DataError::config("accumulation", "must be at least 1"));
        }
        let per_rank = self.micro_batch * self.accumulation.unwrap_or(1);
        if !self.global_batch.is_multiple_of(per_rank) {
            match self.accumulation {
                Some(acc) => {
                    return Err(DataError::config(
                        "global_batch",
                        format!(
                            "{} is not a multiple of micro_batch x accumulation = {} x {acc}",
                            self.global_batch, self.micro_batch
                        ),
                    ))
                }
                None => {
                    return Err(DataError::config(
                        "global_batch",
                        format!(
                            "{} is not a multiple of data.micro_batch = {}",
                            self.global_batch, self.micro_batch
                        ),
                    ))
                }
            }
        }
        Ok(())
    }

    /// The dimension names of this run, checked against the source: for the native formats
    /// every name must be one the source carries (an unknown name is an error naming it and
    /// the known ones), for `generic` they must be given. No name may repeat.
    pub fn dimension_names(&self) -> Result<Vec<String>, DataError> {
        let names: Vec<String> = match (&self.dimensions, self.format.native_dimensions()) {
            (Some(names), native) => {
                if let Some(native) = native {
                    for name in names {
                        if !native.contains(&name.as_str()) {
                            return Err(DataError::config(
                                "dimensions",
                                format!(
                                    "unknown dimension `{name}` for format {}; known: {}",
                                    self.format.name(),
                                    native.join(", ")
                                ),
                            ));
                        }
                    }
                }
                names.clone()
            }
            (None, Some(native)) => native.iter().map(|s| s.to_string()).collect(),
            (None, None) => {
                return Err(DataError::config(
                    "dimensions",
                    "required for format generic (the names of the score vector components)",
                ))
            }
        };
        if names.is_empty() {
            return Err(DataError::config(
                "dimensions",
                "must name at least one dimension",
            ));
        }
        for (i, name) in names.iter().enumerate() {
            if name.trim().is_empty() {
                return Err(DataError::config(
                    "dimensions",
                    format!("entry {i} is an empty name"),
                ));
            }
            if names[..i].contains(name) {
                return Err(DataError::config(
                    "dimensions",
                    format!("`{name}` is listed twice"),
                ));
            }
        }
        Ok(names)
    }

    /// The held-out share of train prompts (0 when an eval file is given).
    pub fn effective_eval_fraction(&self) -> f64 {
        match (&self.eval_file, self.eval_fraction) {
            (Some(_), _) => 0.0,
            (None, Some(fraction)) => fraction,
            (None, None) => DEFAULT_EVAL_FRACTION,
        }
    }

    /// The prompt floor of truncation (see `min_prompt_tokens`).
    pub fn effective_min_prompt_tokens(&self) -> usize {
        self.min_prompt_tokens.unwrap_or(self.max_length / 2).max(1)
    }

    /// Makes relative paths absolute against `base` (the config file's directory), so a config
    /// works from any working directory.
    pub fn resolve_paths(&mut self, base: &Path) {
        use crate::paths::resolve;
        self.train_file = resolve(base, &self.train_file);
        self.eval_file = self.eval_file.as_deref().map(|p| resolve(base, p));
        self.cache_dir = self.cache_dir.as_deref().map(|p| resolve(base, p));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<DataConfig, toml::de::Error> {
        toml::from_str(text)
    }

    const BASE: &str = "train_file = \"t.jsonl\"\nglobal_batch = 8\nmicro_batch = 2\n";

    #[test]
    fn native_formats_default_their_dimensions() {
        let cfg = parse(&format!("format = \"helpsteer\"\n{BASE}")).unwrap();
        cfg.validate().unwrap();
        assert_eq!(cfg.dimension_names().unwrap().len(), 5);
        assert_eq!(cfg.effective_eval_fraction(), DEFAULT_EVAL_FRACTION);
        assert_eq!(cfg.effective_min_prompt_tokens(), 512);
    }

    #[test]
    fn unknown_dimension_is_named() {
        let cfg = parse(&format!(
            "format = \"pku-saferlhf\"\ndimensions = [\"harmlessness\", \"honesty\"]\n{BASE}"
        ))
        .unwrap();
        let err = cfg.validate().unwrap_err().to_string();
        assert!(
            err.contains("data.dimensions") && err.contains("`honesty`"),
            "{err}"
        );
    }

    #[test]
    fn generic_requires_dimensions() {
        let cfg = parse(&format!("format = \"generic\"\n{BASE}")).unwrap();
        let err = cfg.validate().unwrap_err().to_string();
        assert!(
            err.contains("data.dimensions") && err.contains("required"),
            "{err}"
        );
    }

    #[test]
    fn unknown_key_is_refused() {
        let err = parse(&format!("format = \"generic\"\nbatch = 3\n{BASE}"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown field `batch`"), "{err}");
    }

    #[test]
    fn batch_factors_are_checked() {
        let cfg = parse(
            "format = \"helpsteer\"\ntrain_file = \"t\"\nglobal_batch = 6\nmicro_batch = 2\naccumulation = 2\n",
        )
        .unwrap();
        let err = cfg.validate().unwrap_err().to_string();
        assert!(
            err.contains(
                "data.global_batch: 6 is not a multiple of micro_batch x accumulation = 2 x 2"
            ),
            "{err}"
        );
    }

    #[test]
    fn eval_fraction_and_eval_file_exclude_each_other() {
        let cfg = parse(&format!(
            "format = \"helpsteer\"\neval_file = \"e.jsonl\"\neval_fraction = 0.1\n{BASE}"
        ))
        .unwrap();
        assert!(cfg
            .validate()
            .unwrap_err()
            .to_string()
            .contains("data.eval_fraction"));
    }
}
