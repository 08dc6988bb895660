//! The run configuration: one TOML file, one serde struct per section, unknown keys refused,
//! validated once at load time so the rest of the program can trust it.
//!
//! Each component owns its section's struct (`[model]` in `model`, `[data]` in `data`,
//! `[method]` in `method`); this module assembles them with the run's own `[train]` section
//! (`train.rs`: optimisation, run directory, checkpoints) and reports errors with the file and
//! key.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use crate::invalid_key::InvalidKey;
pub use train::TrainConfig;

use crate::data::{DataConfig, DataError};
use crate::method::MethodConfig;
use crate::model::ModelSection;
use crate::paths::resolve;

mod train;

/// Why a run configuration was refused. Every message names the file, and the key where
/// there is one.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("cannot read config file {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The text is not TOML, or has an unknown key, a missing one or a value of the wrong
    /// type; `message` is toml's, which names the key and shows the line.
    #[error("{}: {message}", path.display())]
    Parse { path: PathBuf, message: String },

    /// A value that parses but is not allowed (`key`: `section.name`); `message` is the whole
    /// explanation and starts with the key.
    #[error("invalid config {}: {message}", path.display())]
    Invalid {
        path: PathBuf,
        key: String,
        message: String,
    },

    /// `model.path` is not a directory.
    #[error(
        "invalid config {}: model.path: {} is not a directory",
        path.display(),
        model_path.display()
    )]
    ModelDirMissing { path: PathBuf, model_path: PathBuf },
}

/// The whole run configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    pub model: ModelSection,
    pub data: DataConfig,
    pub method: MethodConfig,
    pub train: TrainConfig,
}

impl RunConfig {
    /// Reads a TOML file and checks it, including that the model directory exists. Relative
    /// paths inside it are resolved against the file's directory, so a config works from any
    /// working directory.
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

    /// Parses and validates the values of a config's text (`origin` names the file in errors
    /// and anchors relative paths); touches no other file.
    pub fn parse(text: &str, origin: &Path) -> Result<Self, ConfigError> {
        let mut config: RunConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
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

    /// The resolved config less the keys a resumed run may change without changing its
    /// result: where it writes, how often it checkpoints, how the global batch is split over
    /// ranks and micro-batches (the update is the same for any split, METHOD.md section 9),
    /// and where the model and data files are (their contents are compared instead, by
    /// fingerprint).
    pub fn result_relevant(&self) -> serde_json::Value {
        result_relevant(serde_json::to_value(self).expect("config serialises"))
    }

    /// Checks every section; the error names the key.
    fn validate(&self) -> Result<(), InvalidKey> {
        self.data.validate().map_err(|e| {
            let key = match &e {
                DataError::Config { key, .. } => key.clone(),
                _ => "data".into(),
            };
            InvalidKey {
                key,
                message: e.to_string(),
            }
        })?;
        self.method.validate()?;
        self.train.validate()
    }
}

/// [`RunConfig::result_relevant`] of a resolved config read back as JSON (a run directory's
/// `resolved_config.json`).
pub fn result_relevant(mut value: serde_json::Value) -> serde_json::Value {
    for (section, key) in [
        ("train", "output_dir"),
        ("model", "path"),
        ("data", "train_file"),
        ("data", "eval_file"),
        ("train", "checkpoint_every"),
        ("train", "keep_checkpoints"),
        ("train", "check_replicas_every"),
        ("train", "collective"),
        ("data", "micro_batch"),
        ("data", "accumulation"),
        ("data", "cache_dir"),
        ("data", "reference_chunk_pairs"),
        ("model", "device"),
        ("method", "batch_passes"),
        ("train", "plan_memory_gib"),
    ] {
        if let Some(table) = value.get_mut(section).and_then(|s| s.as_object_mut()) {
            table.remove(key);
        }
    }
    value
}

/// The keys whose values differ between two configs, as `section.key: old -> new` lines.
pub fn differences(old: &serde_json::Value, new: &serde_json::Value) -> Vec<String> {
    fn walk(prefix: &str, old: &serde_json::Value, new: &serde_json::Value, out: &mut Vec<String>) {
        match (old, new) {
            (serde_json::Value::Object(a), serde_json::Value::Object(b)) => {
                let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
                for key in keys {
                    let path = if prefix.is_empty() {
                        key.clone()
                    } else {
                        format!("{prefix}.{key}")
                    };
                    let null = serde_json::Value::Null;
                    walk(
                        &path,
                        a.get(key).unwrap_or(&null),
                        b.get(key).unwrap_or(&null),
                        out,
                    );
                }
            }
            (a, b) if a != b => out.push(format!("{prefix}: {a} -> {b}")),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk("", old, new, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every config shipped in `configs/` parses and passes validation.
    #[test]
    fn shipped_configs_are_valid() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                let text = std::fs::read_to_string(&path).unwrap();
                RunConfig::parse(&text, &path)
                    .unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
                seen += 1;
            }
        }
        assert!(
            seen >= 9,
            "tiny and paper configs for every method: found {seen}"
        );
    }

    const MINIMAL: &str = "[model]\npath = \"m\"\n[data]\nformat = \"pku-saferlhf\"\ntrain_file = \"t.jsonl\"\n\
        global_batch = 4\nmicro_batch = 2\n[method]\nname = \"curriculum\"\n[train]\noutput_dir = \"run\"\n";

    fn error(text: &str) -> String {
        format!(
            "{:#}",
            RunConfig::parse(text, Path::new("/cfg/run.toml")).unwrap_err()
        )
    }

    /// The kind of error is a variant: a bad value names its key, an unknown key is a parse
    /// error, a missing model directory its own.
    #[test]
    fn errors_are_typed() {
        let origin = Path::new("/cfg/run.toml");
        let bad_rate = MINIMAL.replace("[train]\n", "[train]\nlearning_rate = 0\n");
        match RunConfig::parse(&bad_rate, origin) {
            Err(ConfigError::Invalid { path, key, .. }) => {
                assert_eq!(
                    (path.as_path(), key.as_str()),
                    (origin, "train.learning_rate")
                )
            }
            other => panic!("expected Invalid, got {other:?}"),
        }
        let bad_batch = MINIMAL.replace("micro_batch = 2", "micro_batch = 3");
        let err = RunConfig::parse(&bad_batch, origin).unwrap_err();
        assert!(
            matches!(&err, ConfigError::Invalid { key, .. } if key == "data.global_batch"),
            "{err:?}"
        );
        let bad_beta = MINIMAL.replace("[method]\n", "[method]\nbeta = -1\n");
        let err = RunConfig::parse(&bad_beta, origin).unwrap_err();
        assert!(
            matches!(&err, ConfigError::Invalid { key, .. } if key == "method.beta"),
            "{err:?}"
        );
        let unknown = MINIMAL.replace("[train]\n", "[train]\nlearning_rat = 1e-5\n");
        assert!(matches!(
            RunConfig::parse(&unknown, origin),
            Err(ConfigError::Parse { .. })
        ));

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run.toml");
        assert!(matches!(
            RunConfig::load(&path),
            Err(ConfigError::Read { .. })
        ));
        std::fs::write(&path, MINIMAL).unwrap();
        match RunConfig::load(&path) {
            Err(ConfigError::ModelDirMissing { model_path, .. }) => {
                assert_eq!(model_path, dir.path().join("m"))
            }
            other => panic!("expected ModelDirMissing, got {other:?}"),
        }
    }

    #[test]
    fn bad_values_and_keys_are_named() {
        RunConfig::parse(MINIMAL, Path::new("/cfg/run.toml")).unwrap();
        assert!(
            error(&MINIMAL.replace("[train]\n", "[train]\nlearning_rate = 0\n"))
                .contains("train.learning_rate")
        );
        assert!(
            error(&MINIMAL.replace("[method]\n", "[method]\nbeta = -1\n")).contains("method.beta")
        );
        assert!(
            error(&MINIMAL.replace("[method]\n", "[method]\nrank = 0\n")).contains("method.rank")
        );
        let unknown = error(&MINIMAL.replace("[train]\n", "[train]\nlearning_rat = 1e-5\n"));
        assert!(
            unknown.contains("learning_rat") && unknown.contains("/cfg/run.toml"),
            "{unknown}"
        );
        assert!(
            error(&MINIMAL.replace("[train]\noutput_dir = \"run\"\n", "[train]\n"))
                .contains("output_dir")
        );
        assert!(error(&MINIMAL.replace(
            "format = \"pku-saferlhf\"",
            "format = \"generic\"\ndimensions = []"
        ))
        .contains("dimensions"));
    }
}
