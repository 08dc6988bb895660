//! Loading a finished run directory, the one way `export`, `eval` and `generate --run` do it.
//!
//! A run directory (written by `modpo-trainer train`) holds `resolved_config.json`, the
//! [`RunConfig`] with every path absolute, and `adapters.safetensors`, the final adapters with
//! their [`AdapterMeta`]. Loading happens in two steps so a caller can refuse cheap mistakes
//! (weights off the simplex, an output directory in use) before reading gigabytes:
//!
//! - [`read_run`]: the config, the adapter metadata (checked against the config's dimensions)
//!   and the tokenizer with the run's chat template; no weight is read;
//! - [`SavedRun::load`] (or [`SavedRun::load_model`]): the base model on the run's device and
//!   dtype (or the caller's overrides), checked to be the model the adapters were trained on
//!   (its fingerprint), with the adapters loaded into it.
//!
//! [`load_run`] does both. Data stays out: `eval` loads it from the returned config.
//!
//! Errors are a [`RunLoadError`], whose variants a caller can branch on; each names the file or
//! directory at fault.

use std::path::{Path, PathBuf};

use anyhow::Context;
use tch::{Device, Kind};

use crate::checkpoint::{self, AdapterMeta, ADAPTERS_FILE};
use crate::config::RunConfig;
use crate::model::{self, DeviceChoice, DtypeChoice, LoadedModel};
use crate::tokenizer::ChatTokenizer;

/// The resolved config a run writes: the config with every path made absolute (the
/// `config.toml` beside it keeps paths relative to where the original file was).
pub const RESOLVED_CONFIG_FILE: &str = "resolved_config.json";

/// Why a run directory could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum RunLoadError {
    /// The directory holds no `resolved_config.json`: not a run, or not one of this trainer.
    #[error(
        "{} is not a run directory: it has no {} (run directories are written by \
         `modpo-trainer train`)",
        dir.display(),
        RESOLVED_CONFIG_FILE
    )]
    NotARun { dir: PathBuf },
    /// The run has no final `adapters.safetensors`: its training has not finished.
    #[error(
        "{} has no final adapters: {} is missing (did its training finish?)",
        dir.display(),
        path.display()
    )]
    NoFinalAdapters { dir: PathBuf, path: PathBuf },
    /// The base model's weights or config changed since the adapters were trained.
    #[error(
        "{} was trained on a different model than {} (fingerprints {trained} vs {found})",
        adapters.display(),
        model.display()
    )]
    ModelChanged {
        adapters: PathBuf,
        model: PathBuf,
        /// The fingerprint stored in the adapter file.
        trained: String,
        /// The fingerprint of the model directory now.
        found: String,
    },
    /// The adapters were trained on other dimensions than the run's config names.
    #[error(
        "{}: the adapters were trained on dimensions [{}] but the run's config has [{}]",
        adapters.display(),
        trained.join(", "),
        config.join(", ")
    )]
    DimensionsDiffer {
        adapters: PathBuf,
        trained: Vec<String>,
        config: Vec<String>,
    },
    /// Anything else (an unreadable file, a malformed config, weights that do not fit), with
    /// context naming the file.
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

/// A run directory read without its weights: what it is and how to tokenize for it.
pub struct SavedRun {
    pub dir: PathBuf,
    /// The run's `resolved_config.json`.
    pub config: RunConfig,
    /// The final adapters' metadata (base model, its fingerprint, dimensions, rank).
    pub meta: AdapterMeta,
    /// The final adapter file, `dir/adapters.safetensors`.
    pub adapters: PathBuf,
    /// The base model's tokenizer with the run's chat template (`model.chat_template`).
    pub tokenizer: ChatTokenizer,
}

/// A run with its base model and final adapters loaded.
pub struct LoadedRun {
    pub run: SavedRun,
    pub model: LoadedModel,
    pub device: Device,
    pub kind: Kind,
}

/// Reads `dir`'s config, adapter metadata and tokenizer (no weights) and checks that the
/// adapters were trained on the config's dimensions.
pub fn read_run(dir: &Path) -> Result<SavedRun, RunLoadError> {
    let config_path = dir.join(RESOLVED_CONFIG_FILE);
    if !config_path.is_file() {
        return Err(RunLoadError::NotARun {
            dir: dir.to_path_buf(),
        });
    }
    let config = read_config(&config_path)?;
    let adapters = dir.join(ADAPTERS_FILE);
    if !adapters.is_file() {
        return Err(RunLoadError::NoFinalAdapters {
            dir: dir.to_path_buf(),
            path: adapters,
        });
    }
    let meta = checkpoint::read_adapter_meta(&adapters)
        .with_context(|| format!("cannot read the final adapters of run {}", dir.display()))?;
    let dimensions = config
        .data
        .dimension_names()
        .with_context(|| format!("{}: data.dimensions", config_path.display()))?;
    if dimensions != meta.dimensions {
        return Err(RunLoadError::DimensionsDiffer {
            adapters,
            trained: meta.dimensions,
            config: dimensions,
        });
    }
    let tokenizer =
        ChatTokenizer::from_model_dir(&config.model.path, config.model.chat_template.as_deref())
            .with_context(|| {
                format!(
                    "cannot load the tokenizer of run {} (model.path {})",
                    dir.display(),
                    config.model.path.display()
                )
            })?;
    Ok(SavedRun {
        dir: dir.to_path_buf(),
        config,
        meta,
        adapters,
        tokenizer,
    })
}

/// Reads and loads a run: [`read_run`], then [`SavedRun::load`].
pub fn load_run(
    dir: &Path,
    device: Option<DeviceChoice>,
    dtype: Option<DtypeChoice>,
) -> Result<LoadedRun, RunLoadError> {
    read_run(dir)?.load(device, dtype)
}

fn read_config(path: &Path) -> Result<RunConfig, RunLoadError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::Error::new(e).context(format!("cannot read {}", path.display())))?;
    let config = serde_json::from_str(&text).map_err(|e| {
        anyhow::Error::new(e).context(format!("{}: not a run configuration", path.display()))
    })?;
    Ok(config)
}

impl SavedRun {
    /// The device and dtype the run's model loads with: the overrides where given, else the
    /// run's `model.device` and `model.dtype`.
    pub fn device_and_kind(
        &self,
        device: Option<DeviceChoice>,
        dtype: Option<DtypeChoice>,
    ) -> Result<(Device, Kind), RunLoadError> {
        let device = model::select_device(device.unwrap_or(self.config.model.device), 0)?;
        let kind = model::select_kind(dtype.unwrap_or(self.config.model.dtype), device);
        Ok((device, kind))
    }

    /// Loads the base model the adapters were trained on, refusing it when its fingerprint is
    /// not the one in the adapter file (its weights or config changed: the adapters would
    /// silently mean something else), and loads the final adapters into it.
    pub fn load_model(
        &self,
        device: Option<DeviceChoice>,
        dtype: Option<DtypeChoice>,
    ) -> Result<(LoadedModel, Device, Kind), RunLoadError> {
        let (device, kind) = self.device_and_kind(device, dtype)?;
        let loaded =
            model::load_model(&self.meta.model_path, Some(&self.meta.spec()), device, kind)?;
        if loaded.fingerprint != self.meta.model_fingerprint {
            return Err(RunLoadError::ModelChanged {
                adapters: self.adapters.clone(),
                model: self.meta.model_path.clone(),
                trained: self.meta.model_fingerprint.clone(),
                found: loaded.fingerprint,
            });
        }
        checkpoint::load_adapters(&self.adapters, &loaded.adapters)
            .with_context(|| format!("cannot load the adapters of run {}", self.dir.display()))?;
        Ok((loaded, device, kind))
    }

    /// [`SavedRun::load_model`], keeping the run beside its model.
    pub fn load(
        self,
        device: Option<DeviceChoice>,
        dtype: Option<DtypeChoice>,
    ) -> Result<LoadedRun, RunLoadError> {
        let (model, device, kind) = self.load_model(device, dtype)?;
        Ok(LoadedRun {
            run: self,
            model,
            device,
            kind,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_without_a_config_is_not_a_run() {
        let tmp = tempfile::tempdir().unwrap();
        let err = read_run(tmp.path()).err().expect("not a run");
        assert!(matches!(&err, RunLoadError::NotARun { dir } if dir == tmp.path()));
        let message = err.to_string();
        assert!(
            message.contains(&tmp.path().display().to_string())
                && message.contains(RESOLVED_CONFIG_FILE),
            "{message}"
        );
    }
}
