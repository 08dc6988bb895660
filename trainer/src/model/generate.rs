//! Autoregressive generation with a KV cache: greedy (temperature 0) or temperature + top-p
//! (nucleus) sampling, as Hugging Face `generate` with `TopPLogitsWarper` does it.

use anyhow::{ensure, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tch::{Kind, Tensor};

use super::{CausalLm, Conditioning, KvCache};

/// Sampling settings.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    /// 0 = greedy.
    pub temperature: f64,
    pub top_p: f64,
    pub seed: u64,
    /// Generation stops after this token (included in the output).
    pub eos_token_id: Option<u32>,
}

/// Picks the next token from logits [vocab] (f32 on any device): the argmax when greedy, else a
/// draw from `rng`.
pub fn pick(logits: &Tensor, opts: &GenerateOptions, rng: &mut ChaCha8Rng) -> Result<u32> {
    if opts.temperature <= 0.0 {
        return Ok(logits.argmax(-1, false).int64_value(&[]) as u32);
    }
    let probs = (logits.to_kind(Kind::Double) / opts.temperature).softmax(-1, Kind::Double);
    let (sorted, order) = probs.sort(-1, true); // descending
    let sorted = Vec::<f64>::try_from(sorted.to_device(tch::Device::Cpu))?;
    let order = Vec::<i64>::try_from(order.to_device(tch::Device::Cpu))?;
    // Keep the smallest prefix whose mass reaches top_p (at least one token).
    let mut mass = 0.0;
    let mut keep = 0;
    while keep < sorted.len() && (keep == 0 || mass < opts.top_p) {
        mass += sorted[keep];
        keep += 1;
    }
    let mut u = rng.random::<f64>() * mass;
    for (p, &id) in sorted[..keep].iter().zip(&order) {
        if u < *p {
            return Ok(id as u32);
        }
        u -= p;
    }
    Ok(order[keep - 1] as u32)
}

/// Generates up to `max_new_tokens` after `prompt` (token ids), one sequence, with a KV cache.
/// Returns the new tokens only.
pub fn generate(
    model: &CausalLm,
    prompt: &[u32],
    cond: Conditioning,
    opts: &GenerateOptions,
) -> Result<Vec<u32>> {
    ensure!(!prompt.is_empty(), "the prompt has no tokens");
    ensure!(
        opts.top_p > 0.0 && opts.top_p <= 1.0,
        "top_p {} is not in (0, 1]",
        opts.top_p
    );
    let device = model.embedding_device();
    let mut rng = ChaCha8Rng::seed_from_u64(opts.seed);
    let mut cache = KvCache::default();
    let ids: Vec<i64> = prompt.iter().map(|&t| i64::from(t)).collect();
    let mut input = Tensor::from_slice(&ids).unsqueeze(0).to_device(device); // [1, t]
    let mut out = Vec::new();
    let _guard = tch::no_grad_guard();
    while out.len() < opts.max_new_tokens {
        let logits = model.forward_cached(&input, &mut cache, cond); // [1, t, vocab]
        let last = logits.select(0, 0).select(0, -1).to_kind(Kind::Float); // [vocab]
        let next = pick(&last, opts, &mut rng)?;
        out.push(next);
        if Some(next) == opts.eos_token_id {
            break;
        }
        input = Tensor::from_slice(&[i64::from(next)])
            .unsqueeze(0)
            .to_device(device);
    }
    Ok(out)
}

/// Greedy decoding that recomputes the full forward each step (no cache): the reference the
/// KV-cache path is tested against.
pub fn greedy_uncached(
    model: &CausalLm,
    prompt: &[u32],
    cond: Conditioning,
    max_new_tokens: usize,
    eos_token_id: Option<u32>,
) -> Vec<u32> {
    let device = model.embedding_device();
    let mut ids: Vec<i64> = prompt.iter().map(|&t| i64::from(t)).collect();
    let start = ids.len();
    let _guard = tch::no_grad_guard();
    for _ in 0..max_new_tokens {
        let input = Tensor::from_slice(&ids).unsqueeze(0).to_device(device); // [1, t]
        let logits = model.forward(&input, &input.ones_like(), cond);
        let next = logits.select(1, -1).argmax(-1, false).int64_value(&[0]);
        ids.push(next);
        if Some(next as u32) == eos_token_id {
            break;
        }
    }
    ids[start..].iter().map(|&t| t as u32).collect()
}
