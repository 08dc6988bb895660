//! Adapter files: the trainable state of a run, as safetensors with the run's description in
//! the file's metadata (`modpo` key: base model, k and dimension names, rank, alpha, shared
//! block), so a file can be checked before it is used and never silently applied to another
//! model or other dimensions. Written atomically (temporary file, fsync, rename).

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use serde::{Deserialize, Serialize};
use tch::{nn::VarStore, Kind, Tensor};

use crate::crash_point;
use crate::model::{AdapterKind, AdapterSpec};

type Result<T, E = CheckpointError> = std::result::Result<T, E>;

/// Any error, boxed, as the cause of a [`CheckpointError`] (so `{:#}` still prints it).
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// An error of reading or writing adapter files and checkpoints. A caller can tell a damaged
/// file ([`Corrupt`](CheckpointError::Corrupt), [`Unparsable`](CheckpointError::Unparsable))
/// from one written for something else ([`Version`](CheckpointError::Version),
/// [`NotAdapterFile`](CheckpointError::NotAdapterFile),
/// [`Incompatible`](CheckpointError::Incompatible)) and from a checkpoint that is not there
/// ([`Missing`](CheckpointError::Missing)). Every message names the file.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// A file system operation (`action`: create, read, write, sync, ...) on `path` failed.
    #[error("cannot {action} {}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// Renaming a finished temporary file or directory into place failed.
    #[error("cannot rename {} to {}", from.display(), to.display())]
    Rename {
        from: PathBuf,
        to: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// libtorch could not read or write a tensor file.
    #[error("cannot {action} {}", path.display())]
    Tensors {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: tch::TchError,
    },

    /// The contents of `path` could not be serialised.
    #[error("cannot serialise {}", path.display())]
    Serialize {
        path: PathBuf,
        #[source]
        source: BoxError,
    },

    /// The stage has no final checkpoint.
    #[error("no final checkpoint of stage {stage}: {} does not exist", dir.display())]
    Missing { stage: usize, dir: PathBuf },

    /// A checkpoint file whose bytes do not match the checksum written with it.
    #[error("{} does not match its checksum: the file is corrupted", path.display())]
    Corrupt { path: PathBuf },

    /// A checkpoint's checksum list has no entry for one of its files.
    #[error("{} lists no checksum for {file}", list.display())]
    ChecksumMissing { list: PathBuf, file: &'static str },

    /// A file that does not parse as what it should be (`expected`: "safetensors file",
    /// "checksum list", "trainer state").
    #[error("{} is not a {expected}", path.display())]
    Unparsable {
        path: PathBuf,
        expected: &'static str,
        #[source]
        source: BoxError,
    },

    /// A safetensors file without the `modpo` metadata of an adapter file.
    #[error("{} is not a modpo adapter file: no `modpo` metadata", path.display())]
    NotAdapterFile { path: PathBuf },

    /// An adapter file whose `modpo` metadata does not parse.
    #[error("{}: bad `modpo` metadata", path.display())]
    BadMetadata {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },

    /// A file of another layout version (`what`: "adapter format" or "checkpoint").
    #[error("{}: {what} version {found} (this build reads {supported})", path.display())]
    Version {
        path: PathBuf,
        what: &'static str,
        found: u32,
        supported: u32,
    },

    /// An adapter file whose tensors do not match the adapters it is loaded into: one missing,
    /// one unexpected, or one of another shape or dtype (`message` says which).
    #[error("{}: {message}", path.display())]
    Incompatible { path: PathBuf, message: String },
}

/// A [`CheckpointError::Io`] of `action` on `path`.
fn io(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError {
    let path = path.to_path_buf();
    move |source| CheckpointError::Io {
        action,
        path,
        source,
    }
}

/// A [`CheckpointError::Serialize`] of `path`.
fn serialize<E: Into<BoxError>>(path: &Path) -> impl FnOnce(E) -> CheckpointError {
    let path = path.to_path_buf();
    move |e| CheckpointError::Serialize {
        path,
        source: e.into(),
    }
}

/// A [`CheckpointError::Unparsable`] of `path`, which should be an `expected`.
fn unparsable<E: Into<BoxError>>(
    path: &Path,
    expected: &'static str,
) -> impl FnOnce(E) -> CheckpointError {
    let path = path.to_path_buf();
    move |e| CheckpointError::Unparsable {
        path,
        expected,
        source: e.into(),
    }
}

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
    /// LoRA or AdaLoRA (files written before AdaLoRA existed are LoRA).
    #[serde(default)]
    pub kind: AdapterKind,
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
            kind: spec.kind,
            rank: spec.rank,
            alpha: spec.alpha,
            shared: spec.shared,
        }
    }

    pub fn spec(&self) -> AdapterSpec {
        AdapterSpec {
            kind: self.kind,
            rank: self.rank,
            alpha: self.alpha,
            num_dimensions: self.dimensions.len() as i64,
            shared: self.shared,
        }
    }
}

/// Writes every variable of `adapters` (f32) with `meta` to `path`, atomically.
pub fn save_adapters(path: &Path, adapters: &VarStore, meta: &AdapterMeta) -> Result<()> {
    save_tensors(path, &adapters.variables(), meta)
}

/// [`save_adapters`] of any named tensors (a reward model's head and adapters).
pub fn save_tensors(
    path: &Path,
    tensors: &HashMap<String, Tensor>,
    meta: &AdapterMeta,
) -> Result<()> {
    let mut named: Vec<(String, Vec<i64>, Vec<u8>)> = tensors
        .iter()
        .map(|(name, t)| {
            let t = t
                .detach()
                .to_device(tch::Device::Cpu)
                .to_kind(Kind::Float)
                .contiguous();
            let values = Vec::<f32>::try_from(t.reshape([-1])).expect("f32 tensor");
            let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            (name.clone(), t.size(), bytes)
        })
        .collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    let views: Vec<(String, TensorView)> = named
        .iter()
        .map(|(name, shape, bytes)| {
            let shape: Vec<usize> = shape.iter().map(|&d| d as usize).collect();
            let view = TensorView::new(Dtype::F32, shape, bytes).map_err(serialize(path))?;
            Ok((name.clone(), view))
        })
        .collect::<Result<_>>()?;
    let metadata = HashMap::from([(
        "modpo".to_string(),
        serde_json::to_string(meta).map_err(serialize(path))?,
    )]);
    let bytes = safetensors::serialize(views, Some(metadata)).map_err(serialize(path))?;
    write_atomically(path, &bytes)
}

/// Writes `bytes` to a temporary file beside `path`, syncs it, then renames it over `path`:
/// a reader sees the old file or the new one, never a torn one. On failure (a full disk, an
/// unwritable directory) the temporary file is removed and `path` is as it was.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    write_then_rename(path, bytes, None)
}

/// [`write_atomically`], passing the crash point `before_rename` once the temporary file is
/// complete (see [`crash_point`]).
pub fn write_atomically_marked(
    path: &Path,
    bytes: &[u8],
    before_rename: &'static str,
) -> Result<()> {
    write_then_rename(path, bytes, Some(before_rename))
}

fn write_then_rename(path: &Path, bytes: &[u8], before_rename: Option<&'static str>) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io("create", dir))?;
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let written = std::fs::File::create(&tmp)
        .map_err(io("create", &tmp))
        .and_then(|mut file| {
            file.write_all(bytes)
                .and_then(|()| file.sync_all())
                .map_err(io("write", &tmp))
        })
        .inspect(|()| before_rename.into_iter().for_each(crash_point::reached))
        .and_then(|()| rename(&tmp, path));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// Renames `from` to `to`, naming both on failure.
fn rename(from: &Path, to: &Path) -> Result<()> {
    std::fs::rename(from, to).map_err(|source| CheckpointError::Rename {
        from: from.to_path_buf(),
        to: to.to_path_buf(),
        source,
    })
}

/// Reads only the metadata of an adapter file.
pub fn read_adapter_meta(path: &Path) -> Result<AdapterMeta> {
    let bytes = std::fs::read(path).map_err(io("read", path))?;
    let (_, header) =
        SafeTensors::read_metadata(&bytes).map_err(unparsable(path, "safetensors file"))?;
    let text = header
        .metadata()
        .as_ref()
        .and_then(|m| m.get("modpo"))
        .ok_or_else(|| CheckpointError::NotAdapterFile {
            path: path.to_path_buf(),
        })?;
    let meta: AdapterMeta =
        serde_json::from_str(text).map_err(|source| CheckpointError::BadMetadata {
            path: path.to_path_buf(),
            source,
        })?;
    if meta.format_version != FORMAT_VERSION {
        return Err(CheckpointError::Version {
            path: path.to_path_buf(),
            what: "adapter format",
            found: meta.format_version,
            supported: FORMAT_VERSION,
        });
    }
    Ok(meta)
}

/// Loads an adapter file into `adapters`, whose variables must match it name for name and
/// shape for shape.
pub fn load_adapters(path: &Path, adapters: &VarStore) -> Result<()> {
    load_tensors(path, &adapters.variables())
}

/// [`load_adapters`] into any named tensors (those [`save_tensors`] wrote).
pub fn load_tensors(path: &Path, variables: &HashMap<String, Tensor>) -> Result<()> {
    let bytes = std::fs::read(path).map_err(io("read", path))?;
    let file = SafeTensors::deserialize(&bytes).map_err(unparsable(path, "safetensors file"))?;
    let incompatible = |message: String| CheckpointError::Incompatible {
        path: path.to_path_buf(),
        message,
    };
    let _no_grad = tch::no_grad_guard();
    for (name, var) in variables {
        let view = file
            .tensor(name)
            .map_err(|_| incompatible(format!("missing adapter `{name}`")))?;
        let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        if shape != var.size() || view.dtype() != Dtype::F32 {
            return Err(incompatible(format!(
                "adapter `{name}` is {:?} {shape:?}, expected F32 {:?}",
                view.dtype(),
                var.size()
            )));
        }
        let values = Tensor::from_data_size(view.data(), &shape, Kind::Float);
        var.shallow_clone().copy_(&values);
    }
    if let Some(extra) = file
        .names()
        .into_iter()
        .find(|n| !variables.contains_key(*n))
    {
        return Err(incompatible(format!("unexpected adapter `{extra}`")));
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
    let bytes = std::fs::read(path).map_err(io("read", path))?;
    Ok(hex::encode(Sha256::digest(&bytes)))
}

fn sync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io("sync", dir))
}

/// Writes a checkpoint into `<checkpoints>/<name>`: every file into a temporary directory,
/// flushed, with a checksum list, then the directory renamed into place and the `latest`
/// pointer replaced last. A crash at any point leaves the previous checkpoint and pointer
/// intact; an error (a full disk, an unwritable directory) also removes the temporary
/// directory, so nothing partial is left.
pub fn write_checkpoint(
    checkpoints: &Path,
    adapters: &VarStore,
    meta: &AdapterMeta,
    optimizer_state: &[(String, Tensor)],
    state: &TrainerState,
) -> Result<PathBuf> {
    write_checkpoint_of(
        checkpoints,
        &adapters.variables(),
        meta,
        optimizer_state,
        state,
    )
}

/// [`write_checkpoint`] of any named trainable tensors in place of the adapters (a reward
/// model's head and adapters, `train-rm`), read back by [`load_tensors`].
pub fn write_checkpoint_of(
    checkpoints: &Path,
    trainable: &HashMap<String, Tensor>,
    meta: &AdapterMeta,
    optimizer_state: &[(String, Tensor)],
    state: &TrainerState,
) -> Result<PathBuf> {
    let name = checkpoint_name(state.stage, state.step, state.stage_finished);
    let tmp = checkpoints.join(format!("{TMP_PREFIX}{name}-{}", std::process::id()));
    let written = write_checkpoint_files(&tmp, trainable, meta, optimizer_state, state);
    if written.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    written?;
    crash_point::reached("checkpoint-files-written");
    let target = checkpoints.join(&name);
    if target.exists() {
        // Only a resumed run rewrites a name, with the same state: replace it.
        std::fs::remove_dir_all(&target).map_err(io("replace", &target))?;
    }
    rename(&tmp, &target).inspect_err(|_| {
        let _ = std::fs::remove_dir_all(&tmp);
    })?;
    sync_dir(checkpoints)?;
    crash_point::reached("checkpoint-renamed");
    write_atomically(&checkpoints.join(LATEST_FILE), name.as_bytes())?;
    crash_point::reached("checkpoint-written");
    Ok(target)
}

/// Prefix of a checkpoint directory being written.
const TMP_PREFIX: &str = ".tmp-";

/// Every file of a checkpoint, flushed, into the directory `tmp`.
fn write_checkpoint_files(
    tmp: &Path,
    trainable: &HashMap<String, Tensor>,
    meta: &AdapterMeta,
    optimizer_state: &[(String, Tensor)],
    state: &TrainerState,
) -> Result<()> {
    if tmp.exists() {
        std::fs::remove_dir_all(tmp).map_err(io("clear", tmp))?;
    }
    std::fs::create_dir_all(tmp).map_err(io("create", tmp))?;
    save_tensors(&tmp.join(ADAPTERS_FILE), trainable, meta)?;
    crash_point::reached("checkpoint-adapters-written");
    let optimizer_path = tmp.join(OPTIMIZER_FILE);
    if optimizer_state.is_empty() {
        let empty = safetensors::serialize(Vec::<(String, TensorView)>::new(), None)
            .map_err(serialize(&optimizer_path))?;
        write_atomically(&optimizer_path, &empty)?;
    } else {
        Tensor::write_safetensors(optimizer_state, &optimizer_path).map_err(|source| {
            CheckpointError::Tensors {
                action: "write",
                path: optimizer_path.clone(),
                source,
            }
        })?;
        std::fs::File::open(&optimizer_path)
            .and_then(|f| f.sync_all())
            .map_err(io("sync", &optimizer_path))?;
    }
    let state_path = tmp.join(STATE_FILE);
    let state_json = serde_json::to_string_pretty(state).map_err(serialize(&state_path))?;
    write_atomically(&state_path, state_json.as_bytes())?;
    let mut checksums = std::collections::BTreeMap::new();
    for file in [ADAPTERS_FILE, OPTIMIZER_FILE, STATE_FILE] {
        checksums.insert(file.to_string(), sha256_file(&tmp.join(file))?);
    }
    let list = tmp.join(CHECKSUMS_FILE);
    let list_json = serde_json::to_string_pretty(&checksums).map_err(serialize(&list))?;
    write_atomically(&list, list_json.as_bytes())?;
    sync_dir(tmp)
}

/// Removes checkpoint directories a killed run left half-written (never trusted: their names
/// are not checkpoint names). Call before the run writes checkpoints of its own.
pub fn remove_unfinished_checkpoints(checkpoints: &Path) -> Result<()> {
    let entries = match std::fs::read_dir(checkpoints) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io("list", checkpoints)(e)),
    };
    for entry in entries.flatten() {
        if entry.file_name().to_string_lossy().starts_with(TMP_PREFIX) {
            let path = entry.path();
            tracing::info!("removing the unfinished checkpoint {}", path.display());
            std::fs::remove_dir_all(&path).map_err(io("remove", &path))?;
        }
    }
    Ok(())
}

/// Checks every file of a checkpoint against its checksum and reads its state; the error
/// names the file that does not match.
pub fn verify_checkpoint(dir: &Path) -> Result<TrainerState> {
    let list = dir.join(CHECKSUMS_FILE);
    let text = std::fs::read_to_string(&list).map_err(io("read", &list))?;
    let checksums: std::collections::BTreeMap<String, String> =
        serde_json::from_str(&text).map_err(unparsable(&list, "checksum list"))?;
    for file in [ADAPTERS_FILE, OPTIMIZER_FILE, STATE_FILE] {
        let expected = checksums
            .get(file)
            .ok_or_else(|| CheckpointError::ChecksumMissing {
                list: list.clone(),
                file,
            })?;
        let path = dir.join(file);
        if &sha256_file(&path)? != expected {
            return Err(CheckpointError::Corrupt { path });
        }
    }
    let state_path = dir.join(STATE_FILE);
    let text = std::fs::read_to_string(&state_path).map_err(io("read", &state_path))?;
    let state: TrainerState =
        serde_json::from_str(&text).map_err(unparsable(&state_path, "trainer state"))?;
    if state.version != CHECKPOINT_VERSION {
        return Err(CheckpointError::Version {
            path: state_path,
            what: "checkpoint",
            found: state.version,
            supported: CHECKPOINT_VERSION,
        });
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
        Err(e) => return Err(io("list", checkpoints)(e)),
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
            Err(err) => {
                // Through anyhow for `{:#}`, which prints the causes too (an io error's).
                let err = anyhow::Error::new(err);
                tracing::warn!("skipping checkpoint {}: {err:#}", dir.display())
            }
        }
    }
    Ok(None)
}

/// The verified final checkpoint of `stage`.
pub fn stage_final_checkpoint(checkpoints: &Path, stage: usize) -> Result<(PathBuf, TrainerState)> {
    let dir = checkpoints.join(checkpoint_name(stage, 0, true));
    if !dir.is_dir() {
        return Err(CheckpointError::Missing { stage, dir });
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
        std::fs::remove_dir_all(&dir).map_err(io("remove old checkpoint", &dir))?;
    }
    Ok(())
}

/// The optimizer moments of a checkpoint, by name (`exp_avg.{i}`, `exp_avg_sq.{i}`).
pub fn read_optimizer_state(dir: &Path) -> Result<HashMap<String, Tensor>> {
    let path = dir.join(OPTIMIZER_FILE);
    let tensors = Tensor::read_safetensors(&path).map_err(|source| CheckpointError::Tensors {
        action: "read",
        path: path.clone(),
        source,
    })?;
    Ok(tensors.into_iter().collect())
}

/// Creates `dir` if needed; used by the trainer for the checkpoints directory.
pub fn checkpoints_dir(run_dir: &Path) -> PathBuf {
    run_dir.join("checkpoints")
}

#[cfg(test)]
mod tests;
