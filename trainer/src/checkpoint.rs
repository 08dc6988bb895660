//! Adapter files: the trainable state of a run, as safetensors with the run's description in
//! the file's metadata (`modpo` key: base model, k and dimension names, rank, alpha, shared
//! block), so a file can be checked before it is used and never silently applied to another
//! model or other dimensions. Written atomically (temporary file, fsync, rename).

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use serde::{Deserialize, Serialize};
use tch::{nn::VarStore, Kind, Tensor};

use crate::model::AdapterSpec;

/// The adapter file of a run directory.
pub const ADAPTERS_FILE: &str = "adapters.safetensors";
const FORMAT_VERSION: u32 = 1;

/// What an adapter file is for, stored in its metadata.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdapterMeta {
    pub format_version: u32,
    /// The base model directory the adapters were trained on.
    pub model_path: PathBuf,
    /// The base model's fingerprint ([`crate::model::LoadedModel::fingerprint`]).
    pub model_fingerprint: String,
    pub dimensions: Vec<String>,
    pub rank: i64,
    pub alpha: f64,
    pub shared: bool,
}

impl AdapterMeta {
    pub fn new(
        model_path: &Path,
        model_fingerprint: &str,
        dimensions: &[String],
        spec: &AdapterSpec,
    ) -> Self {
        AdapterMeta {
            format_version: FORMAT_VERSION,
            model_path: model_path.to_path_buf(),
            model_fingerprint: model_fingerprint.to_string(),
            dimensions: dimensions.to_vec(),
            rank: spec.rank,
            alpha: spec.alpha,
            shared: spec.shared,
        }
    }

    pub fn spec(&self) -> AdapterSpec {
        AdapterSpec {
            rank: self.rank,
            alpha: self.alpha,
            num_dimensions: self.dimensions.len() as i64,
            shared: self.shared,
        }
    }
}

/// Writes every variable of `adapters` (f32) with `meta` to `path`, atomically.
pub fn save_adapters(path: &Path, adapters: &VarStore, meta: &AdapterMeta) -> Result<()> {
    let mut named: Vec<(String, Vec<i64>, Vec<u8>)> = adapters
        .variables()
        .into_iter()
        .map(|(name, t)| {
            let t = t
                .detach()
                .to_device(tch::Device::Cpu)
                .to_kind(Kind::Float)
                .contiguous();
            let values = Vec::<f32>::try_from(t.reshape([-1])).expect("f32 tensor");
            let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            (name, t.size(), bytes)
        })
        .collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    let views: Vec<(String, TensorView)> = named
        .iter()
        .map(|(name, shape, bytes)| {
            let shape: Vec<usize> = shape.iter().map(|&d| d as usize).collect();
            Ok((name.clone(), TensorView::new(Dtype::F32, shape, bytes)?))
        })
        .collect::<Result<_>>()?;
    let metadata = HashMap::from([("modpo".to_string(), serde_json::to_string(meta)?)]);
    let bytes = safetensors::serialize(views, Some(metadata))?;
    write_atomically(path, &bytes)
}

/// Writes `bytes` to a temporary file beside `path`, syncs it, then renames it over `path`:
/// a reader sees the old file or the new one, never a torn one.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let mut file =
        std::fs::File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))?;
    Ok(())
}

/// Reads only the metadata of an adapter file.
pub fn read_adapter_meta(path: &Path) -> Result<AdapterMeta> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let (_, header) = SafeTensors::read_metadata(&bytes)
        .with_context(|| format!("{} is not a safetensors file", path.display()))?;
    let text = header
        .metadata()
        .as_ref()
        .and_then(|m| m.get("modpo"))
        .with_context(|| {
            format!(
                "{} is not a modpo adapter file: no `modpo` metadata",
                path.display()
            )
        })?;
    let meta: AdapterMeta = serde_json::from_str(text)
        .with_context(|| format!("{}: bad `modpo` metadata", path.display()))?;
    if meta.format_version != FORMAT_VERSION {
        bail!(
            "{}: adapter format version {} (this build reads {FORMAT_VERSION})",
            path.display(),
            meta.format_version
        );
    }
    Ok(meta)
}

/// Loads an adapter file into `adapters`, whose variables must match it name for name and
/// shape for shape.
pub fn load_adapters(path: &Path, adapters: &VarStore) -> Result<()> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let file = SafeTensors::deserialize(&bytes)
        .with_context(|| format!("{} is not a safetensors file", path.display()))?;
    let variables = adapters.variables();
    let _no_grad = tch::no_grad_guard();
    for (name, var) in &variables {
        let view = file
            .tensor(name)
            .with_context(|| format!("{}: missing adapter `{name}`", path.display()))?;
        let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        if shape != var.size() || view.dtype() != Dtype::F32 {
            bail!(
                "{}: adapter `{name}` is {:?} {shape:?}, expected F32 {:?}",
                path.display(),
                view.dtype(),
                var.size()
            );
        }
        let values = Tensor::from_data_size(view.data(), &shape, Kind::Float);
        var.shallow_clone().copy_(&values);
    }
    if let Some(extra) = file
        .names()
        .into_iter()
        .find(|n| !variables.contains_key(*n))
    {
        bail!("{}: unexpected adapter `{extra}`", path.display());
    }
    Ok(())
}
