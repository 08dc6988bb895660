//! Reference log-probabilities `log pi_ref(y | x)`, computed once per dataset and cached.
//!
//! pi_ref is the base model with adapters off for every stage and method (METHOD.md section 2),
//! so its log-probs of a pair never change during a run. They are computed with no gradient and
//! reused by every stage, method and later run. The cache key hashes everything that changes
//! them: the model (see [`crate::model::load::Checkpoint::fingerprint`]), the dtype, and the
//! token ids of every pair — which already reflect the data, the tokenizer, the chat template
//! and max length.
//!
//! The pass runs over the pairs sorted by length (little padding) in micro-batches, cut into
//! chunks of whole micro-batches ([`PassPlan`]). Each chunk is its own cache file,
//! `<cache_dir>/reference-<key>/chunk-<index>.safetensors`, written atomically with the key,
//! its place in the pass, its pair ids and a checksum of its values, and verified on every
//! read. A pass killed midway so loses at most the chunks being computed; the next run reads
//! the chunks that verify and computes only the rest. In a job of several ranks each rank
//! computes every world-size-th chunk and the ranks then exchange values ([`gather`]): a chunk's
//! values do not depend on which rank computed it, since its micro-batches are the same.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tch::{Device, Kind, Tensor};

use modpo_launcher::{Collective, Op};

use crate::checkpoint::write_atomically_marked;
use crate::crash_point;
use crate::data::{collate, TokenizedPair};
use crate::logps::{sequence_logps, BatchTensors};
use crate::model::{CausalLm, Conditioning};

/// Pairs per cache chunk when the config does not say (`data.reference_chunk_pairs`).
pub const DEFAULT_CHUNK_PAIRS: usize = 256;

/// Reference log-probs of a split, indexed by pair id.
#[derive(Debug, Clone, PartialEq)]
pub struct ReferenceLogps {
    pub response_a: Vec<f32>,
    pub response_b: Vec<f32>,
}

impl ReferenceLogps {
    /// (log pi_ref(y_a), log pi_ref(y_b)) of the given pairs, each [B] on `device`.
    pub fn gather(&self, pair_ids: &[usize], device: Device) -> (Tensor, Tensor) {
        let pick = |values: &[f32]| {
            let picked: Vec<f32> = pair_ids.iter().map(|&i| values[i]).collect();
            Tensor::from_slice(&picked).to_device(device)
        };
        (pick(&self.response_a), pick(&self.response_b))
    }

    fn zeros(pairs: usize) -> Self {
        ReferenceLogps {
            response_a: vec![0.0; pairs],
            response_b: vec![0.0; pairs],
        }
    }
}

/// The cache key of a split's reference log-probs.
pub fn cache_key(model_fingerprint: &str, kind: Kind, pairs: &[TokenizedPair]) -> String {
    let mut hasher = Sha256::new();
    hasher.update(b"modpo reference logps v1\n");
    hasher.update(model_fingerprint.as_bytes());
    hasher.update(format!("{kind:?}\n").as_bytes());
    for pair in pairs {
        for ids in [&pair.prompt_ids, &pair.response_a_ids, &pair.response_b_ids] {
            hasher.update((ids.len() as u64).to_le_bytes());
            for id in ids {
                hasher.update(id.to_le_bytes());
            }
        }
    }
    hex::encode(&hasher.finalize()[..16])
}

/// How one pass over a split is cut: pair ids sorted by length, in micro-batches of
/// `batch_pairs`, grouped `chunk_pairs / batch_pairs` micro-batches to a chunk.
#[derive(Debug, Clone, PartialEq)]
pub struct PassPlan {
    pub batch_pairs: usize,
    /// The pair ids of each chunk, in the order they are computed.
    pub chunks: Vec<Vec<usize>>,
}

impl PassPlan {
    /// The plan over the pairs `ids` of `pairs`. Chunks hold whole micro-batches: a chunk of
    /// `chunk_pairs` rounded up to a multiple of `batch_pairs`.
    pub fn new(
        pairs: &[TokenizedPair],
        ids: &[usize],
        batch_pairs: usize,
        chunk_pairs: usize,
    ) -> Self {
        let batch_pairs = batch_pairs.max(1);
        let chunk_pairs = chunk_pairs.max(1).div_ceil(batch_pairs) * batch_pairs;
        let mut order = ids.to_vec();
        // A stable sort: equal lengths keep their id order, so the plan is the same every run.
        order.sort_by_key(|&id| pairs[id].seq_len());
        PassPlan {
            batch_pairs,
            chunks: order.chunks(chunk_pairs).map(<[usize]>::to_vec).collect(),
        }
    }
}

/// Which chunks of a pass this process computes: every `world`-th from `rank`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Share {
    pub rank: usize,
    pub world: usize,
}

impl Share {
    /// The whole pass, in one process.
    pub const ALL: Share = Share { rank: 0, world: 1 };

    fn owns(self, chunk: usize) -> bool {
        chunk % self.world == self.rank
    }
}

/// What a rank's share of a pass found in the cache and computed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PassReport {
    /// Chunks of the whole pass.
    pub chunks: usize,
    /// Chunks of this share read from the cache (verified).
    pub found: usize,
    /// Chunks of this share computed (and written, when there is a cache).
    pub computed: usize,
}

/// Computes the reference log-probs of `pairs` (whose ids must be 0..n) in micro-batches of
/// `batch_pairs`, with adapters off and no gradient.
pub fn compute(
    model: &CausalLm,
    pairs: &[TokenizedPair],
    batch_pairs: usize,
    pad_token_id: u32,
    device: Device,
) -> ReferenceLogps {
    let all: Vec<usize> = (0..pairs.len()).collect();
    compute_for(model, pairs, &all, batch_pairs, pad_token_id, device)
}

/// [`compute`] for the pairs `ids` of `pairs` only (the others' entries stay 0): what a
/// benchmark that steps through a few batches needs.
pub fn compute_for(
    model: &CausalLm,
    pairs: &[TokenizedPair],
    ids: &[usize],
    batch_pairs: usize,
    pad_token_id: u32,
    device: Device,
) -> ReferenceLogps {
    let mut result = ReferenceLogps::zeros(pairs.len());
    let plan = PassPlan::new(pairs, ids, batch_pairs, ids.len());
    for chunk in &plan.chunks {
        let values = compute_chunk(model, pairs, chunk, plan.batch_pairs, pad_token_id, device);
        fill(&mut result, chunk, &values);
    }
    result
}

/// The reference log-probs of the pairs `chunk` (in that order), in micro-batches of
/// `batch_pairs`: `[(log pi_ref(y_a), log pi_ref(y_b))]`.
fn compute_chunk(
    model: &CausalLm,
    pairs: &[TokenizedPair],
    chunk: &[usize],
    batch_pairs: usize,
    pad_token_id: u32,
    device: Device,
) -> Vec<(f32, f32)> {
    let _no_grad = tch::no_grad_guard();
    let mut by_id = HashMap::with_capacity(chunk.len());
    for ids in chunk.chunks(batch_pairs) {
        let members: Vec<&TokenizedPair> = ids.iter().map(|&id| &pairs[id]).collect();
        let batch = collate(&members, pad_token_id);
        let tensors = BatchTensors::new(&batch, device);
        let (logp_a, logp_b) = sequence_logps(model, &tensors, Conditioning::Reference);
        let logp_a: Vec<f32> = Vec::try_from(logp_a.to_device(Device::Cpu)).expect("f32 logps");
        let logp_b: Vec<f32> = Vec::try_from(logp_b.to_device(Device::Cpu)).expect("f32 logps");
        for (slot, &id) in batch.pair_ids.iter().enumerate() {
            by_id.insert(id, (logp_a[slot], logp_b[slot]));
        }
    }
    chunk.iter().map(|id| by_id[id]).collect()
}

fn fill(result: &mut ReferenceLogps, chunk: &[usize], values: &[(f32, f32)]) {
    for (&id, &(a, b)) in chunk.iter().zip(values) {
        result.response_a[id] = a;
        result.response_b[id] = b;
    }
}

/// The cache directory of one split's reference log-probs.
pub struct ReferenceCache {
    dir: PathBuf,
    key: String,
}

/// What a chunk file says of itself, in its `modpo_reference` metadata.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct ChunkHeader {
    key: String,
    index: usize,
    chunks: usize,
    batch_pairs: usize,
    /// SHA-256 of the `pair_ids`, `response_a` and `response_b` bytes, in that order.
    sha256: String,
}

const HEADER_KEY: &str = "modpo_reference";

impl ReferenceCache {
    pub fn new(cache_dir: &Path, key: &str) -> Self {
        ReferenceCache {
            dir: cache_dir.join(format!("reference-{key}")),
            key: key.to_string(),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn chunk_path(&self, index: usize) -> PathBuf {
        self.dir.join(format!("chunk-{index:06}.safetensors"))
    }

    /// The verified values of chunk `index` of `plan`; `Ok(None)` when there is no file. A
    /// file that does not verify is an error that says why.
    fn read_chunk(&self, plan: &PassPlan, index: usize) -> Result<Option<Vec<(f32, f32)>>> {
        let path = self.chunk_path(index);
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        };
        let file = SafeTensors::deserialize(&bytes)
            .with_context(|| format!("{} is not a safetensors file", path.display()))?;
        let (_, metadata) = SafeTensors::read_metadata(&bytes)?;
        let header: ChunkHeader = metadata
            .metadata()
            .as_ref()
            .and_then(|m| m.get(HEADER_KEY))
            .and_then(|text| serde_json::from_str(text).ok())
            .with_context(|| format!("{}: no `{HEADER_KEY}` header", path.display()))?;
        let ids = &plan.chunks[index];
        let column = |name: &str| -> Result<&[u8]> {
            let view = file
                .tensor(name)
                .with_context(|| format!("{}: no tensor `{name}`", path.display()))?;
            Ok(view.data())
        };
        let (id_bytes, a_bytes, b_bytes) = (
            column("pair_ids")?,
            column("response_a")?,
            column("response_b")?,
        );
        let expected = ChunkHeader {
            key: self.key.clone(),
            index,
            chunks: plan.chunks.len(),
            batch_pairs: plan.batch_pairs,
            sha256: checksum(&[id_bytes, a_bytes, b_bytes]),
        };
        if header != expected {
            bail!(
                "{}: written for {header:?}, this pass needs {expected:?}",
                path.display()
            );
        }
        if id_bytes != i64_bytes(ids) {
            bail!(
                "{}: holds other pairs than chunk {index} of this pass",
                path.display()
            );
        }
        let a = f32_values(a_bytes);
        let b = f32_values(b_bytes);
        if a.len() != ids.len() || b.len() != ids.len() {
            bail!(
                "{}: {} and {} values for {} pairs",
                path.display(),
                a.len(),
                b.len(),
                ids.len()
            );
        }
        Ok(Some(a.into_iter().zip(b).collect()))
    }

    /// Writes chunk `index` atomically (temporary file, fsync, rename).
    fn write_chunk(&self, plan: &PassPlan, index: usize, values: &[(f32, f32)]) -> Result<()> {
        let path = self.chunk_path(index);
        let id_bytes = i64_bytes(&plan.chunks[index]);
        let a_bytes: Vec<u8> = values.iter().flat_map(|(a, _)| a.to_le_bytes()).collect();
        let b_bytes: Vec<u8> = values.iter().flat_map(|(_, b)| b.to_le_bytes()).collect();
        let header = ChunkHeader {
            key: self.key.clone(),
            index,
            chunks: plan.chunks.len(),
            batch_pairs: plan.batch_pairs,
            sha256: checksum(&[&id_bytes, &a_bytes, &b_bytes]),
        };
        let n = values.len();
        let views = [
            ("pair_ids", TensorView::new(Dtype::I64, vec![n], &id_bytes)?),
            (
                "response_a",
                TensorView::new(Dtype::F32, vec![n], &a_bytes)?,
            ),
            (
                "response_b",
                TensorView::new(Dtype::F32, vec![n], &b_bytes)?,
            ),
        ];
        let metadata = HashMap::from([(HEADER_KEY.to_string(), serde_json::to_string(&header)?)]);
        let bytes = safetensors::serialize(views, Some(metadata))
            .with_context(|| format!("cannot serialise {}", path.display()))?;
        write_atomically_marked(&path, &bytes, "reference-chunk-tmp-written")
            .context("cannot write a reference cache chunk")?;
        crash_point::reached("reference-chunk-written");
        Ok(())
    }
}

fn checksum(parts: &[&[u8]]) -> String {
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update(part);
    }
    hex::encode(hasher.finalize())
}

fn i64_bytes(ids: &[usize]) -> Vec<u8> {
    ids.iter()
        .flat_map(|&id| (id as i64).to_le_bytes())
        .collect()
}

fn f32_values(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

/// This share's chunks of the pass over `pairs`: read from `cache` where a chunk verifies,
/// computed (and written to `cache`) otherwise. The other shares' entries stay 0; [`gather`]
/// fills them in.
pub fn load_or_compute_share(
    cache: Option<&ReferenceCache>,
    model: &CausalLm,
    pairs: &[TokenizedPair],
    plan: &PassPlan,
    share: Share,
    pad_token_id: u32,
    device: Device,
) -> Result<(ReferenceLogps, PassReport)> {
    let mut result = ReferenceLogps::zeros(pairs.len());
    let mut report = PassReport {
        chunks: plan.chunks.len(),
        ..PassReport::default()
    };
    for (index, chunk) in plan.chunks.iter().enumerate() {
        if !share.owns(index) {
            continue;
        }
        if let Some(cache) = cache {
            match cache.read_chunk(plan, index) {
                Ok(Some(values)) => {
                    fill(&mut result, chunk, &values);
                    report.found += 1;
                    continue;
                }
                Ok(None) => {}
                Err(why) => tracing::warn!("recomputing reference chunk {index}: {why:#}"),
            }
        }
        let values = compute_chunk(model, pairs, chunk, plan.batch_pairs, pad_token_id, device);
        if let Some(cache) = cache {
            cache.write_chunk(plan, index, &values)?;
        }
        fill(&mut result, chunk, &values);
        report.computed += 1;
    }
    Ok((result, report))
}

/// Every rank's share put together on every rank. Each pair's values come from exactly one
/// rank and are 0 on the others, so the sum is exact.
pub fn gather(collective: &dyn Collective, share: ReferenceLogps) -> Result<ReferenceLogps> {
    let n = share.response_a.len();
    let mut values: Vec<f64> = share
        .response_a
        .iter()
        .chain(&share.response_b)
        .map(|&v| f64::from(v))
        .collect();
    collective
        .all_reduce_f64(&mut values, Op::Sum)
        .context("exchanging the reference log-probs between ranks")?;
    let (a, b) = values.split_at(n);
    Ok(ReferenceLogps {
        response_a: a.iter().map(|&v| v as f32).collect(),
        response_b: b.iter().map(|&v| v as f32).collect(),
    })
}

/// The cached log-probs of the whole split, computed where missing, in one process: chunks of
/// [`DEFAULT_CHUNK_PAIRS`] pairs under `<cache_dir>/reference-<key>/`. Also says whether every
/// chunk came from the cache.
#[allow(clippy::too_many_arguments)]
pub fn load_or_compute(
    cache_dir: &Path,
    model_fingerprint: &str,
    model: &CausalLm,
    pairs: &[TokenizedPair],
    batch_pairs: usize,
    pad_token_id: u32,
    device: Device,
) -> Result<(ReferenceLogps, bool)> {
    let cache = ReferenceCache::new(
        cache_dir,
        &cache_key(model_fingerprint, model.kind(), pairs),
    );
    let all: Vec<usize> = (0..pairs.len()).collect();
    let plan = PassPlan::new(pairs, &all, batch_pairs, DEFAULT_CHUNK_PAIRS);
    let (logps, report) = load_or_compute_share(
        Some(&cache),
        model,
        pairs,
        &plan,
        Share::ALL,
        pad_token_id,
        device,
    )?;
    Ok((logps, report.computed == 0))
}
