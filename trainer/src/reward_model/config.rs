//! The `train-rm` configuration: `[model]`, `[data]` and `[train]` exactly as a training run
//! has them (one serde struct each, owned by their modules), plus `[reward_model]`. Unknown
//! keys are refused; errors name the file and the key.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::config::{ConfigError, InvalidKey, TrainConfig};
use crate::data::{DataConfig, DataError};
use crate::model::ModelSection;
use crate::paths::resolve;

/// `[reward_model]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RewardModelSection {
    /// LoRA on every projection of the base (true) or a frozen base, the head alone (false).
    #[serde(default = "yes")]
    pub lora: bool,
    #[serde(default = "rank")]
    pub rank: i64,
    #[serde(default = "alpha")]
    pub alpha: f64,
    /// Bootstrap resamples of the held-out accuracy's 95% intervals.
    #[serde(default = "resamples")]
    pub bootstrap: usize,
}

fn yes() -> bool {
    true
}
fn rank() -> i64 {
    8
}
fn alpha() -> f64 {
    16.0
}
fn resamples() -> usize {
    1000
}

impl Default for RewardModelSection {
    fn default() -> Self {
        RewardModelSection {
            lora: yes(),
            rank: rank(),
            alpha: alpha(),
            bootstrap: resamples(),
        }
    }
}

/// The whole `train-rm` configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RewardModelConfig {
    pub model: ModelSection,
    pub data: DataConfig,
    #[serde(default)]
    pub reward_model: RewardModelSection,
    pub train: TrainConfig,
}

impl RewardModelConfig {
    /// Reads and checks a TOML file; relative paths are resolved against its directory.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let config = Self::parse(&text, path)?;
        if !config.model.path.is_dir() {
            return Err(ConfigError::ModelDirMissing {
                path: path.to_path_buf(),
                model_path: config.model.path,
            });
        }
        Ok(config)
    }

    pub fn parse(text: &str, origin: &Path) -> Result<Self, ConfigError> {
        let mut config: RewardModelConfig =
            toml::from_str(text).map_err(|e| ConfigError::Parse {
                path: origin.to_path_buf(),
                message: e.to_string().trim_end().to_owned(),
            })?;
        let base = origin.parent().unwrap_or(Path::new("."));
        config.model.path = resolve(base, &config.model.path);
        config.data.resolve_paths(base);
        config.train.output_dir = resolve(base, &config.train.output_dir);
        config
            .validate()
            .map_err(|InvalidKey { key, message }| ConfigError::Invalid {
                path: origin.to_path_buf(),
                key,
                message,
            })?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), InvalidKey> {
        self.data.validate().map_err(|e| InvalidKey {
            key: match &e {
                DataError::Config { key, .. } => key.clone(),
                _ => "data".into(),
            },
            message: e.to_string(),
        })?;
        let rm = &self.reward_model;
        if rm.rank < 1 {
            return Err(InvalidKey {
                key: "reward_model.rank".into(),
                message: format!("reward_model.rank: {} is not at least 1", rm.rank),
            });
        }
        if rm.alpha.is_nan() || rm.alpha <= 0.0 {
            return Err(InvalidKey {
                key: "reward_model.alpha".into(),
                message: format!("reward_model.alpha: {} is not positive", rm.alpha),
            });
        }
        self.train.validate()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
[model]
path = "m"
[data]
format = "pku-saferlhf"
train_file = "t.jsonl"
global_batch = 4
micro_batch = 2
[train]
output_dir = "out"
"#;

    #[test]
    fn defaults_and_bad_keys_are_named() {
        let config = RewardModelConfig::parse(BASE, Path::new("/x/rm.toml")).unwrap();
        assert_eq!(config.reward_model, RewardModelSection::default());
        assert_eq!(config.train.output_dir, Path::new("/x/out"));
        let unknown = format!("{BASE}\n[reward_model]\nheads = 2\n");
        let err = RewardModelConfig::parse(&unknown, Path::new("rm.toml")).unwrap_err();
        assert!(err.to_string().contains("heads"), "{err}");
        let rank = format!("{BASE}\n[reward_model]\nrank = 0\n");
        let err = RewardModelConfig::parse(&rank, Path::new("rm.toml")).unwrap_err();
        assert!(err.to_string().contains("reward_model.rank"), "{err}");
    }
}
