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

// ---------------------------------------------------------------------------------------
// Training checkpoints: adapters + optimizer + trainer state, one directory each.

/// Bumped when the checkpoint layout changes; older checkpoints are refused.
pub const CHECKPOINT_VERSION: u32 = 1;
const OPTIMIZER_FILE: &str = "optimizer.safetensors";
const STATE_FILE: &str = "state.json";
const CHECKSUMS_FILE: &str = "checksums.json";
const LATEST_FILE: &str = "latest";

/// Where training stands, and what it must match to be resumed.
///
/// All randomness during training is a pure function of the seeds and the position (batch
/// order from (seed, stage, epoch), weight draws from (seed, stage, step)), so the position is
/// the RNG state; the adapters' initialisation is only drawn at the start of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    pub version: u32,
    /// 1-based stage number and name.
    pub stage: usize,
    pub stage_name: String,
    /// Optimizer steps taken in this stage.
    pub step: usize,
    /// Whether the stage is complete (a stage-final checkpoint).
    pub stage_finished: bool,
    /// Data cursor: the epoch, and pairs of it consumed (a multiple of the global batch),
    /// which does not depend on the world size.
    pub epoch: usize,
    pub pairs_into_epoch: usize,
    /// Names of the optimizer's parameters, in the order of `optimizer.safetensors`.
    pub optimizer_params: Vec<String>,
    pub optimizer_steps: i64,
    pub model_fingerprint: String,
    /// Hash of the model, dtype and every training pair's token ids
    /// ([`crate::reference::cache_key`]): same data, tokenizer, template and max length.
    pub data_fingerprint: String,
    pub dimensions: Vec<String>,
    /// The resolved config less what may change on resume (see
    /// [`crate::config::RunConfig::result_relevant`]).
    pub config: serde_json::Value,
    /// World size when written (information only: resuming on another one is allowed).
    pub world_size: usize,
}

/// A checkpoint directory's name: stage-final ones sort after the periodic ones of the stage.
pub fn checkpoint_name(stage: usize, step: usize, stage_finished: bool) -> String {
    if stage_finished {
        format!("stage-{stage}-final")
    } else {
        format!("stage-{stage}-step-{step:07}")
    }
}

fn sha256_file(path: &Path) -> Result<String> {
    use sha2::{Digest, Sha256};
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(hex::encode(Sha256::digest(&bytes)))
}

fn sync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("cannot sync {}", dir.display()))
}

/// Writes a checkpoint into `<checkpoints>/<name>`: every file into a temporary directory,
/// flushed, with a checksum list, then the directory renamed into place and the `latest`
/// pointer replaced last. A crash at any point leaves the previous checkpoint and pointer
/// intact.
pub fn write_checkpoint(
    checkpoints: &Path,
    adapters: &VarStore,
    meta: &AdapterMeta,
    optimizer_state: &[(String, Tensor)],
    state: &TrainerState,
) -> Result<PathBuf> {
    let name = checkpoint_name(state.stage, state.step, state.stage_finished);
    let tmp = checkpoints.join(format!(".tmp-{name}-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).with_context(|| format!("cannot clear {}", tmp.display()))?;
    }
    std::fs::create_dir_all(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    save_adapters(&tmp.join(ADAPTERS_FILE), adapters, meta)?;
    let optimizer_path = tmp.join(OPTIMIZER_FILE);
    if optimizer_state.is_empty() {
        write_atomically(
            &optimizer_path,
            &safetensors::serialize(Vec::<(String, TensorView)>::new(), None)?,
        )?;
    } else {
        Tensor::write_safetensors(optimizer_state, &optimizer_path)
            .with_context(|| format!("cannot write {}", optimizer_path.display()))?;
        std::fs::File::open(&optimizer_path)?.sync_all()?;
    }
    write_atomically(
        &tmp.join(STATE_FILE),
        serde_json::to_string_pretty(state)?.as_bytes(),
    )?;
    let mut checksums = std::collections::BTreeMap::new();
    for file in [ADAPTERS_FILE, OPTIMIZER_FILE, STATE_FILE] {
        checksums.insert(file.to_string(), sha256_file(&tmp.join(file))?);
    }
    write_atomically(
        &tmp.join(CHECKSUMS_FILE),
        serde_json::to_string_pretty(&checksums)?.as_bytes(),
    )?;
    sync_dir(&tmp)?;
    let target = checkpoints.join(&name);
    if target.exists() {
        // Only a resumed run rewrites a name, with the same state: replace it.
        std::fs::remove_dir_all(&target)
            .with_context(|| format!("cannot replace {}", target.display()))?;
    }
    std::fs::rename(&tmp, &target)
        .with_context(|| format!("cannot rename {} to {}", tmp.display(), target.display()))?;
    sync_dir(checkpoints)?;
    write_atomically(&checkpoints.join(LATEST_FILE), name.as_bytes())?;
    Ok(target)
}

/// Checks every file of a checkpoint against its checksum and reads its state; the error
/// names the file that does not match.
pub fn verify_checkpoint(dir: &Path) -> Result<TrainerState> {
    let list = dir.join(CHECKSUMS_FILE);
    let text = std::fs::read_to_string(&list)
        .with_context(|| format!("cannot read {}", list.display()))?;
    let checksums: std::collections::BTreeMap<String, String> = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a checksum list", list.display()))?;
    for file in [ADAPTERS_FILE, OPTIMIZER_FILE, STATE_FILE] {
        let expected = checksums
            .get(file)
            .with_context(|| format!("{} lists no checksum for {file}", list.display()))?;
        let path = dir.join(file);
        if &sha256_file(&path)? != expected {
            bail!(
                "{} does not match its checksum: the file is corrupted",
                path.display()
            );
        }
    }
    let state_path = dir.join(STATE_FILE);
    let state: TrainerState = serde_json::from_str(&std::fs::read_to_string(&state_path)?)
        .with_context(|| format!("{} is not a trainer state", state_path.display()))?;
    if state.version != CHECKPOINT_VERSION {
        bail!(
            "{}: checkpoint version {} (this build reads {CHECKPOINT_VERSION})",
            state_path.display(),
            state.version
        );
    }
    Ok(state)
}

/// Checkpoint directories (not temporaries), newest first: by stage, then final after any
/// step, then step.
fn checkpoint_dirs(checkpoints: &Path) -> Result<Vec<PathBuf>> {
    let mut found: Vec<(usize, usize, PathBuf)> = Vec::new();
    let entries = match std::fs::read_dir(checkpoints) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
        Err(e) => return Err(e).with_context(|| format!("cannot list {}", checkpoints.display())),
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        let Some(rest) = name.strip_prefix("stage-") else {
            continue;
        };
        let (stage, step) = match rest.split_once('-') {
            Some((stage, "final")) => (stage.parse().ok(), Some(usize::MAX)),
            Some((stage, step)) => (
                stage.parse().ok(),
                step.strip_prefix("step-").and_then(|s| s.parse().ok()),
            ),
            None => (None, None),
        };
        if let (Some(stage), Some(step)) = (stage, step) {
            found.push((stage, step, entry.path()));
        }
    }
    found.sort_by_key(|(stage, step, _)| std::cmp::Reverse((*stage, *step)));
    Ok(found.into_iter().map(|(_, _, p)| p).collect())
}

/// The newest checkpoint that verifies: the one `latest` names, else the newest valid one.
/// Every checkpoint skipped is logged with the reason.
pub fn latest_valid_checkpoint(checkpoints: &Path) -> Result<Option<(PathBuf, TrainerState)>> {
    let mut candidates = Vec::new();
    if let Ok(name) = std::fs::read_to_string(checkpoints.join(LATEST_FILE)) {
        candidates.push(checkpoints.join(name.trim()));
    }
    candidates.extend(checkpoint_dirs(checkpoints)?);
    for dir in candidates {
        match verify_checkpoint(&dir) {
            Ok(state) => return Ok(Some((dir, state))),
            Err(err) => tracing::warn!("skipping checkpoint {}: {err:#}", dir.display()),
        }
    }
    Ok(None)
}

/// The verified final checkpoint of `stage`.
pub fn stage_final_checkpoint(checkpoints: &Path, stage: usize) -> Result<(PathBuf, TrainerState)> {
    let dir = checkpoints.join(checkpoint_name(stage, 0, true));
    if !dir.is_dir() {
        bail!(
            "no final checkpoint of stage {stage}: {} does not exist",
            dir.display()
        );
    }
    let state = verify_checkpoint(&dir)?;
    Ok((dir, state))
}

/// Deletes periodic checkpoints beyond the newest `keep`; stage-final ones always stay.
pub fn prune_checkpoints(checkpoints: &Path, keep: usize) -> Result<()> {
    let periodic: Vec<PathBuf> = checkpoint_dirs(checkpoints)?
        .into_iter()
        .filter(|p| !p.to_string_lossy().ends_with("-final"))
        .collect();
    let latest = std::fs::read_to_string(checkpoints.join(LATEST_FILE)).unwrap_or_default();
    for dir in periodic.into_iter().skip(keep) {
        if dir
            .file_name()
            .is_some_and(|n| n.to_string_lossy() == latest.trim())
        {
            continue;
        }
        std::fs::remove_dir_all(&dir)
            .with_context(|| format!("cannot remove old checkpoint {}", dir.display()))?;
    }
    Ok(())
}

/// The optimizer moments of a checkpoint, by name (`exp_avg.{i}`, `exp_avg_sq.{i}`).
pub fn read_optimizer_state(dir: &Path) -> Result<HashMap<String, Tensor>> {
    let path = dir.join(OPTIMIZER_FILE);
    Ok(Tensor::read_safetensors(&path)
        .with_context(|| format!("cannot read {}", path.display()))?
        .into_iter()
        .collect())
}

/// Creates `dir` if needed; used by the trainer for the checkpoints directory.
pub fn checkpoints_dir(run_dir: &Path) -> PathBuf {
    run_dir.join("checkpoints")
}
