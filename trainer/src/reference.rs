//! Reference log-probabilities `log pi_ref(y | x)`, computed once per dataset and cached.
//!
//! pi_ref is the base model with adapters off for every stage and method (METHOD.md section 2),
//! so its log-probs of a pair never change during a run. They are computed with no gradient,
//! written to `<cache_dir>/reference-<key>.safetensors` and reused by every stage, method and
//! later run. The key hashes everything that changes them: the model (see
//! [`crate::model::load::Checkpoint::fingerprint`]), the dtype, and the token ids of every
//! pair — which already reflect the data, the tokenizer, the chat template and max length.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use tch::{Device, Kind, Tensor};

use crate::data::{collate, TokenizedPair};
use crate::logps::{sequence_logps, BatchTensors};
use crate::model::{CausalLm, Conditioning};

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
    let _no_grad = tch::no_grad_guard();
    let mut result = ReferenceLogps {
        response_a: vec![0.0; pairs.len()],
        response_b: vec![0.0; pairs.len()],
    };
    // Sorting by length keeps padding, and so wasted compute, small.
    let mut order: Vec<&TokenizedPair> = ids.iter().map(|&id| &pairs[id]).collect();
    order.sort_by_key(|p| p.seq_len());
    for chunk in order.chunks(batch_pairs.max(1)) {
        let batch = collate(chunk, pad_token_id);
        let tensors = BatchTensors::new(&batch, device);
        let (logp_a, logp_b) = sequence_logps(model, &tensors, Conditioning::Reference);
        let logp_a: Vec<f32> = Vec::try_from(logp_a.to_device(Device::Cpu)).expect("f32 logps");
        let logp_b: Vec<f32> = Vec::try_from(logp_b.to_device(Device::Cpu)).expect("f32 logps");
        for (slot, &id) in batch.pair_ids.iter().enumerate() {
            result.response_a[id] = logp_a[slot];
            result.response_b[id] = logp_b[slot];
        }
    }
    result
}

fn cache_path(cache_dir: &Path, key: &str) -> PathBuf {
    cache_dir.join(format!("reference-{key}.safetensors"))
}

/// Reads the cached log-probs of `key`, if any; a file that does not hold `expected_pairs`
/// pairs is an error (it cannot be ours).
pub fn read_cached(
    cache_dir: &Path,
    key: &str,
    expected_pairs: usize,
) -> Result<Option<ReferenceLogps>> {
    let path = cache_path(cache_dir, key);
    if !path.is_file() {
        return Ok(None);
    }
    let tensors: HashMap<String, Tensor> = Tensor::read_safetensors(&path)
        .with_context(|| format!("cannot read reference cache {}", path.display()))?
        .into_iter()
        .collect();
    let column = |name: &str| -> Result<Vec<f32>> {
        let t = tensors
            .get(name)
            .with_context(|| format!("{}: no tensor `{name}`", path.display()))?;
        let values = Vec::<f32>::try_from(t)
            .with_context(|| format!("{}: `{name}` is not f32", path.display()))?;
        if values.len() != expected_pairs {
            bail!(
                "{}: `{name}` has {} entries for {expected_pairs} pairs",
                path.display(),
                values.len()
            );
        }
        Ok(values)
    };
    Ok(Some(ReferenceLogps {
        response_a: column("response_a")?,
        response_b: column("response_b")?,
    }))
}

/// Writes atomically: a temporary file in the same directory, then a rename.
pub fn write_cached(cache_dir: &Path, key: &str, logps: &ReferenceLogps) -> Result<()> {
    std::fs::create_dir_all(cache_dir)
        .with_context(|| format!("cannot create {}", cache_dir.display()))?;
    let path = cache_path(cache_dir, key);
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let tensors = [
        ("response_a", Tensor::from_slice(&logps.response_a)),
        ("response_b", Tensor::from_slice(&logps.response_b)),
    ];
    Tensor::write_safetensors(&tensors, &tmp)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, &path)
        .with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))?;
    Ok(())
}

/// The cached log-probs for this key, or computed and cached now.
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
    let key = cache_key(model_fingerprint, model.kind(), pairs);
    if let Some(cached) = read_cached(cache_dir, &key, pairs.len())? {
        return Ok((cached, true));
    }
    let logps = compute(model, pairs, batch_pairs, pad_token_id, device);
    write_cached(cache_dir, &key, &logps)?;
    Ok((logps, false))
}
