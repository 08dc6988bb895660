//! The run configuration: one TOML file, one serde struct per section, unknown keys refused,
//! validated once at load time so the rest of the program can trust it.
//!
//! Each component owns its section's struct (`data::DataConfig`, ...); this module only
//! assembles them and reports errors with the file and key.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::Deserialize;

/// Which device the model runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum DeviceChoice {
    /// CUDA device of this rank when a GPU is present, else CPU.
    #[default]
    Auto,
    Cpu,
    Cuda,
}

/// Floating-point type of the frozen base weights and activations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum DtypeChoice {
    /// f32 on CPU, bf16 on GPU.
    #[default]
    Auto,
    F32,
    Bf16,
}

/// `[model]`: where the Hugging Face model directory is and how to run it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// A Hugging Face model directory (config.json, *.safetensors, tokenizer.json).
    pub path: PathBuf,
    #[serde(default)]
    pub device: DeviceChoice,
    #[serde(default)]
    pub dtype: DtypeChoice,
    /// A Jinja chat template that replaces the model's own.
    #[serde(default)]
    pub chat_template: Option<String>,
}

/// The whole run configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    pub model: ModelSection,
    pub data: crate::data::DataConfig,
}

impl RunConfig {
    /// Reads and validates a TOML file; relative paths inside it are resolved against the
    /// file's directory so a config works from any working directory.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        let mut config: RunConfig = toml::from_str(&text)
            .map_err(|e| anyhow::anyhow!("{}: {}", path.display(), e.to_string().trim_end()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        config.model.path = resolve(base, &config.model.path);
        config.data.resolve_paths(base);
        config
            .validate()
            .with_context(|| format!("invalid config {}", path.display()))?;
        Ok(config)
    }

    fn validate(&self) -> Result<()> {
        if !self.model.path.is_dir() {
            bail!(
                "model.path: {} is not a directory",
                self.model.path.display()
            );
        }
        Ok(())
    }
}

/// `path` as written in a config file, made absolute against the file's directory.
pub fn resolve(base: &Path, path: &Path) -> PathBuf {
    if path.is_absolute() {
        path.to_path_buf()
    } else {
        base.join(path)
    }
}
