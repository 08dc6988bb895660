//! Reading Hugging Face safetensors checkpoints into the model's `VarStore`.
//!
//! One `model.safetensors`, or a sharded set listed by `model.safetensors.index.json`. Every
//! key the model expects must be present with the expected shape and every key present must be
//! expected: the first mismatch is a hard error naming the key and the file. Pickled `.bin`
//! checkpoints are refused, since unpickling executes code from the model file.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};
use sha2::{Digest, Sha256};
use tch::{nn::VarStore, Kind, Tensor};

const SINGLE_FILE: &str = "model.safetensors";
const INDEX_FILE: &str = "model.safetensors.index.json";

/// The safetensors files of a model directory, memory-mapped.
pub struct Checkpoint {
    files: Vec<(PathBuf, Mmap)>,
}

/// Where a tensor lives and what it is, read from the file headers.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub file: PathBuf,
    pub dtype: Dtype,
    pub shape: Vec<i64>,
}

impl Checkpoint {
    /// Finds and maps the checkpoint files of `dir`.
    pub fn open(dir: &Path) -> Result<Self> {
        let index = dir.join(INDEX_FILE);
        let single = dir.join(SINGLE_FILE);
        let paths: Vec<PathBuf> = if index.is_file() {
            shard_paths(&index)?
        } else if single.is_file() {
            vec![single]
        } else {
            refuse_pickles(dir)?;
            bail!(
                "no safetensors checkpoint in {}: expected {SINGLE_FILE} or {INDEX_FILE}",
                dir.display()
            );
        };
        let files = paths
            .into_iter()
            .map(|path| {
                let file =
                    File::open(&path).with_context(|| format!("cannot open {}", path.display()))?;
                // SAFETY: the map is read-only and the file is not modified while we hold it.
                let map = unsafe { Mmap::map(&file) }
                    .with_context(|| format!("cannot map {}", path.display()))?;
                Ok((path, map))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Checkpoint { files })
    }

    /// Every tensor of every file, by key; a key in two shards is an error.
    pub fn tensors(&self) -> Result<BTreeMap<String, TensorInfo>> {
        let mut all = BTreeMap::new();
        for (path, map) in &self.files {
            let st = SafeTensors::deserialize(map)
                .with_context(|| format!("{} is not a valid safetensors file", path.display()))?;
            for (name, view) in st.tensors() {
                let info = TensorInfo {
                    file: path.clone(),
                    dtype: view.dtype(),
                    shape: view.shape().iter().map(|&d| d as i64).collect(),
                };
                if let Some(previous) = all.insert(name.clone(), info) {
                    bail!(
                        "key `{name}` is in both {} and {}",
                        previous.file.display(),
                        path.display()
                    );
                }
            }
        }
        Ok(all)
    }

    /// Checks keys and shapes against what the model expects, without reading any data.
    pub fn verify(&self, expected: &[(String, Vec<i64>)]) -> Result<()> {
        let present = self.tensors()?;
        let expected_names: BTreeSet<&str> = expected.iter().map(|(n, _)| n.as_str()).collect();
        for (name, shape) in expected {
            let Some(info) = present.get(name) else {
                bail!("missing key `{name}`: not in {}", self.file_list());
            };
            if &info.shape != shape {
                bail!(
                    "key `{name}` in {} has shape {:?}, but config.json implies {:?}",
                    info.file.display(),
                    info.shape,
                    shape
                );
            }
            kind_of(info.dtype)
                .with_context(|| format!("key `{name}` in {}", info.file.display()))?;
        }
        if let Some((name, info)) = present
            .iter()
            .find(|(n, _)| !expected_names.contains(n.as_str()))
        {
            bail!(
                "unexpected key `{name}` in {}: the model built from config.json has no such parameter",
                info.file.display()
            );
        }
        Ok(())
    }

    /// Copies every tensor into the variable of the same name, converting to its dtype and
    /// device. Call [`Checkpoint::verify`] first.
    pub fn copy_into(&self, vs: &VarStore) -> Result<()> {
        let variables: HashMap<String, Tensor> = vs.variables();
        let _no_grad = tch::no_grad_guard();
        for (path, map) in &self.files {
            let st = SafeTensors::deserialize(map)?;
            for (name, view) in st.tensors() {
                let mut target = variables
                    .get(&name)
                    .with_context(|| format!("unexpected key `{name}` in {}", path.display()))?
                    .shallow_clone();
                let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
                let source = Tensor::f_from_data_size(view.data(), &shape, kind_of(view.dtype())?)
                    .with_context(|| format!("cannot read `{name}` from {}", path.display()))?;
                target.copy_(&source);
            }
        }
        Ok(())
    }

    /// A digest that changes when the weights change, without hashing gigabytes: each file's
    /// name, length and safetensors header (names, dtypes, shapes, offsets) plus 16 evenly
    /// spaced 64 KiB samples of its data, and `config.json`.
    pub fn fingerprint(&self, config_json: &[u8]) -> String {
        const SAMPLES: usize = 16;
        const SAMPLE_BYTES: usize = 64 * 1024;
        let mut hasher = Sha256::new();
        hasher.update(config_json);
        for (path, map) in &self.files {
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().to_string())
                .unwrap_or_default();
            hasher.update(name.as_bytes());
            hasher.update((map.len() as u64).to_le_bytes());
            let header_len = map
                .get(..8)
                .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")) as usize)
                .unwrap_or(0);
            let header_end = (8 + header_len).min(map.len());
            hasher.update(&map[..header_end]);
            let data = &map[header_end..];
            for i in 0..SAMPLES {
                let start = data.len() * i / SAMPLES;
                hasher.update(&data[start..(start + SAMPLE_BYTES).min(data.len())]);
            }
        }
        hex::encode(&hasher.finalize()[..16])
    }

    fn file_list(&self) -> String {
        let names: Vec<String> = self
            .files
            .iter()
            .map(|(p, _)| p.display().to_string())
            .collect();
        names.join(", ")
    }
}

fn kind_of(dtype: Dtype) -> Result<Kind> {
    match dtype {
        Dtype::F32 => Ok(Kind::Float),
        Dtype::F16 => Ok(Kind::Half),
        Dtype::BF16 => Ok(Kind::BFloat16),
        Dtype::F64 => Ok(Kind::Double),
        other => bail!("tensor dtype {other:?} is not supported for weights (F32, F16, BF16, F64)"),
    }
}

/// The shard files named by an index, each checked to exist.
fn shard_paths(index: &Path) -> Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string(index)
        .with_context(|| format!("cannot read {}", index.display()))?;
    let json: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not valid JSON", index.display()))?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .with_context(|| format!("{} has no `weight_map` object", index.display()))?;
    let dir = index.parent().unwrap_or(Path::new("."));
    let mut names = BTreeSet::new();
    for (key, file) in map {
        let file = file.as_str().with_context(|| {
            format!(
                "{}: weight_map[`{key}`] is not a file name",
                index.display()
            )
        })?;
        names.insert(file.to_string());
    }
    names
        .into_iter()
        .map(|name| {
            let path = dir.join(&name);
            if !path.is_file() {
                bail!(
                    "shard {} listed in {} does not exist",
                    path.display(),
                    index.display()
                );
            }
            Ok(path)
        })
        .collect()
}

/// A directory holding only pickled weights gets a message that says why we refuse them.
fn refuse_pickles(dir: &Path) -> Result<()> {
    let entries =
        std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))?;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        if name.ends_with(".bin") || name.ends_with(".pt") || name.ends_with(".pth") {
            bail!(
                "{} is a pickled PyTorch checkpoint, which is refused: unpickling runs code from the \
                 model file. Convert it to safetensors (e.g. `model.save_pretrained(dir, \
                 safe_serialization=True)` in transformers) and try again",
                entry.path().display()
            );
        }
    }
    Ok(())
}
