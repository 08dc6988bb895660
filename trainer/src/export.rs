//! Serving the model for one weight vector `w` with tools that know nothing of modpo.
//!
//! - A standard PEFT LoRA adapter of rank `R = blocks * r`: `A = [A_0; A_1; ...; A_k]` and
//!   `B = s [B_0, w_1 B_1, ..., w_k B_k]` (the scale `s = alpha / r` and the weights folded into
//!   B, `lora_alpha = R` so PEFT's own scaling is 1). Then `B A x = s (B_0 A_0 + sum_i w_i B_i
//!   A_i) x`, exactly `pi(. ; w)`. For AdaLoRA adapters `A_j = Q_j * lambda_j` and only the
//!   triplets the rank allocator kept are written (a dropped one has lambda = 0 and adds
//!   nothing), so each projection's rank is its number of kept triplets, given to PEFT as
//!   `rank_pattern` (with `alpha_pattern` equal to it); a projection that kept none is left out
//!   of `target_modules`.
//! - With `merge`, full Hugging Face safetensors with `W + delta(w)` on every projection, in the
//!   checkpoint's own dtype, beside copies of the config and tokenizer files.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde_json::json;
use tch::{Kind, Tensor};

use crate::model::llama::PROJECTIONS;
use crate::model::CausalLm;

/// How far the sum of a weight vector may be from 1 and still be on the simplex: room for
/// decimal input like `0.1,0.2,0.7`, whose binary sum is not exactly 1.
pub const WEIGHT_SUM_TOLERANCE: f64 = 1e-6;

/// Checks `weights`, read from `source` (a command-line flag or a config key), is a point of
/// the simplex over `dimensions`: one entry per dimension, each finite and >= 0, summing to 1
/// within [`WEIGHT_SUM_TOLERANCE`]. The one check of every weight vector a user gives; the
/// message names `source`, the vector and the offending entry.
pub fn validate_weights(weights: &[f64], dimensions: &[String], source: &str) -> Result<()> {
    let given = weights
        .iter()
        .map(|w| w.to_string())
        .collect::<Vec<_>>()
        .join(",");
    if weights.len() != dimensions.len() {
        let n = weights.len();
        bail!(
            "{source} {given}: {n} {}, but the run has k = {} dimensions ({})",
            if n == 1 { "weight" } else { "weights" },
            dimensions.len(),
            dimensions.join(", ")
        );
    }
    for (w, dimension) in weights.iter().zip(dimensions) {
        if !w.is_finite() {
            bail!("{source} {given}: the weight of `{dimension}` is {w}, not a finite number");
        }
        if *w < 0.0 {
            bail!(
                "{source} {given}: the weight of `{dimension}` is {w}, but weights must be \
                 non-negative"
            );
        }
    }
    let sum: f64 = weights.iter().sum();
    if (sum - 1.0).abs() > WEIGHT_SUM_TOLERANCE {
        bail!(
            "{source} {given} is not on the simplex: the weights sum to {sum}, not 1 \
             (tolerance {WEIGHT_SUM_TOLERANCE:e})"
        );
    }
    Ok(())
}

/// Writes `adapter_config.json` and `adapter_model.safetensors` of the PEFT adapter for `w`.
pub fn write_peft_adapter(
    model: &CausalLm,
    w: &[f64],
    base_model: &Path,
    out: &Path,
) -> Result<()> {
    let spec = model
        .adapter_spec()
        .context("the model has no adapters to export")?;
    let mut tensors = Vec::new();
    // Each projection's rank: the kept rank features of its stacked blocks.
    let mut ranks: Vec<(String, i64)> = Vec::new();
    for (name, projection) in model.projections() {
        let adapter = projection
            .adapter
            .as_ref()
            .expect("every projection is adapted");
        let (a_cat, b_cat) = adapter.stacked(Kind::Float); // [R, in], [out, R]
        let column_scales = block_scales(w, spec.shared, spec.rank, spec.scale()); // [R]
        let b_scaled = b_cat * Tensor::from_slice(&column_scales).unsqueeze(0);
        let kept = adapter
            .stacked_kept()
            .to_device(a_cat.device())
            .nonzero()
            .squeeze_dim(1);
        let rank = kept.size()[0];
        if rank == 0 {
            continue;
        }
        let key = format!("base_model.model.{name}");
        tensors.push((
            format!("{key}.lora_A.weight"),
            a_cat.index_select(0, &kept).contiguous(),
        ));
        tensors.push((
            format!("{key}.lora_B.weight"),
            b_scaled.index_select(1, &kept).contiguous(),
        ));
        ranks.push((name, rank));
    }
    let config = peft_config(&ranks, model.projections().len(), base_model)?;
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    std::fs::write(
        out.join("adapter_config.json"),
        serde_json::to_string_pretty(&config)?,
    )
    .with_context(|| format!("cannot write {}", out.join("adapter_config.json").display()))?;
    Tensor::write_safetensors(&tensors, out.join("adapter_model.safetensors")).with_context(
        || {
            format!(
                "cannot write {}",
                out.join("adapter_model.safetensors").display()
            )
        },
    )?;
    Ok(())
}

/// PEFT's `adapter_config.json` of a LoRA with the given rank per projection, each with
/// `lora_alpha` equal to its rank (scaling 1). One rank everywhere is the plain form; otherwise
/// the most common rank is the default and the others go into `rank_pattern` and
/// `alpha_pattern` under their full module names, which PEFT matches exactly.
fn peft_config(
    ranks: &[(String, i64)],
    projections: usize,
    base_model: &Path,
) -> Result<serde_json::Value> {
    let mut counts: std::collections::BTreeMap<i64, usize> = Default::default();
    for (_, rank) in ranks {
        *counts.entry(*rank).or_default() += 1;
    }
    let Some((&common, _)) = counts.iter().max_by_key(|(rank, n)| (**n, **rank)) else {
        bail!("no projection kept any rank: the adapters are all zero, nothing to export");
    };
    let pattern: serde_json::Map<String, serde_json::Value> = ranks
        .iter()
        .filter(|(_, rank)| *rank != common)
        .map(|(name, rank)| (name.clone(), json!(rank)))
        .collect();
    // A projection that kept no rank is not adapted at all (PEFT refuses r = 0).
    let target_modules: Vec<String> = if ranks.len() == projections {
        PROJECTIONS
            .iter()
            .map(|p| p.rsplit('.').next().unwrap().to_string())
            .collect()
    } else {
        ranks.iter().map(|(name, _)| name.clone()).collect()
    };
    Ok(json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model.display().to_string(),
        "r": common,
        "lora_alpha": common,
        "rank_pattern": pattern,
        "alpha_pattern": pattern,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": false,
        "target_modules": target_modules,
        "use_rslora": false,
        "use_dora": false,
        "inference_mode": true,
        "modules_to_save": null,
    }))
}

/// `s * [1, w_1 .. w_k]` (without the 1 when there is no shared block), each repeated r times.
fn block_scales(w: &[f64], shared: bool, rank: i64, scale: f64) -> Vec<f32> {
    let blocks = shared.then_some(1.0).into_iter().chain(w.iter().copied());
    blocks
        .flat_map(|b| std::iter::repeat_n((b * scale) as f32, rank as usize))
        .collect()
}

/// Writes the merged model for `w` into `out`: `model.safetensors` with every projection's
/// weight replaced by `W + delta(w)`, in the dtype each tensor has in `base_model`, plus copies
/// of the config, generation config and tokenizer files.
pub fn write_merged_model(
    model: &CausalLm,
    base_vars: &tch::nn::VarStore,
    w: &[f64],
    base_model: &Path,
    out: &Path,
) -> Result<()> {
    let original = crate::model::load::Checkpoint::open(base_model)?.tensors()?;
    let mut merged: std::collections::BTreeMap<String, Tensor> = base_vars
        .variables()
        .into_iter()
        .map(|(name, t)| (name, t.detach()))
        .collect();
    for (name, projection) in model.projections() {
        let adapter = projection
            .adapter
            .as_ref()
            .expect("every projection is adapted");
        let key = format!("{name}.weight");
        let weight = merged
            .get(&key)
            .with_context(|| format!("no base weight `{key}`"))?;
        let delta = adapter.delta_weight(w).to_device(weight.device()); // [out, in] f32
        let updated = weight.to_kind(Kind::Float) + delta;
        merged.insert(key, updated);
    }
    let tensors: Vec<(String, Tensor)> = merged
        .into_iter()
        .map(|(name, t)| {
            let kind = match original.get(&name).map(|info| info.dtype) {
                Some(safetensors::Dtype::BF16) => Kind::BFloat16,
                Some(safetensors::Dtype::F16) => Kind::Half,
                _ => Kind::Float,
            };
            (
                name,
                t.to_kind(kind).to_device(tch::Device::Cpu).contiguous(),
            )
        })
        .collect();
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    for file in [
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "chat_template.jinja",
    ] {
        let source = base_model.join(file);
        if source.is_file() {
            std::fs::copy(&source, out.join(file))
                .with_context(|| format!("cannot copy {}", source.display()))?;
        }
    }
    Tensor::write_safetensors(&tensors, out.join("model.safetensors"))
        .with_context(|| format!("cannot write {}", out.join("model.safetensors").display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dims(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    /// Each refusal, worded as `validate_weights` documents it: the source, the vector as
    /// given, and the entry or the sum that is wrong.
    #[test]
    fn weights_off_the_simplex_are_refused() {
        let d = dims(&["helpfulness", "harmlessness"]);
        let check = |w: &[f64]| validate_weights(w, &d, "--weights");
        assert!(check(&[0.3, 0.7]).is_ok());
        assert!(check(&[1.0, 0.0]).is_ok());
        // Within the tolerance of 1e-6, and just outside it.
        assert!(check(&[0.5, 0.5 + 0.9e-6]).is_ok());
        assert!(check(&[0.5, 0.5 + 1.1e-6]).is_err());
        let refused = |w: &[f64]| check(w).unwrap_err().to_string();
        assert_eq!(
            refused(&[0.25, 0.25, 0.5]),
            "--weights 0.25,0.25,0.5: 3 weights, but the run has k = 2 dimensions \
             (helpfulness, harmlessness)"
        );
        assert_eq!(
            refused(&[1.0]),
            "--weights 1: 1 weight, but the run has k = 2 dimensions (helpfulness, harmlessness)"
        );
        assert_eq!(
            refused(&[0.5, 0.75]),
            "--weights 0.5,0.75 is not on the simplex: the weights sum to 1.25, not 1 \
             (tolerance 1e-6)"
        );
        assert_eq!(
            refused(&[0.25, 0.5]),
            "--weights 0.25,0.5 is not on the simplex: the weights sum to 0.75, not 1 \
             (tolerance 1e-6)"
        );
        assert_eq!(
            refused(&[1.5, -0.5]),
            "--weights 1.5,-0.5: the weight of `harmlessness` is -0.5, but weights must be \
             non-negative"
        );
        assert_eq!(
            refused(&[f64::NAN, 1.0]),
            "--weights NaN,1: the weight of `helpfulness` is NaN, not a finite number"
        );
        assert_eq!(
            refused(&[1.0, f64::INFINITY]),
            "--weights 1,inf: the weight of `harmlessness` is inf, not a finite number"
        );
        assert_eq!(
            refused(&[f64::NEG_INFINITY, 1.0]),
            "--weights -inf,1: the weight of `helpfulness` is -inf, not a finite number"
        );
        // The source is whatever the caller read the vector from.
        let err = validate_weights(&[0.5, 0.6], &d, "test.w")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("test.w 0.5,0.6 is not on the simplex"),
            "{err}"
        );
    }

    #[test]
    fn block_scales_fold_scale_and_weights() {
        assert_eq!(
            block_scales(&[0.25, 0.75], true, 2, 2.0),
            vec![2.0, 2.0, 0.5, 0.5, 1.5, 1.5]
        );
        assert_eq!(block_scales(&[0.25, 0.75], false, 1, 2.0), vec![0.5, 1.5]);
    }
}
