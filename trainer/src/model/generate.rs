//! Autoregressive generation with a KV cache: greedy (temperature 0) or temperature + top-p
//! (nucleus) sampling, as Hugging Face `generate` with `TopPLogitsWarper` does it; one sequence,
//! or several rows after one shared prompt (each row its own conditioning and sampling stream).

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
    let mut rows = generate_rows(model, prompt, cond, opts, &[opts.seed])?;
    Ok(rows.remove(0))
}

/// Generates after one `prompt` for `seeds.len()` rows at once, with a KV cache: the rows share
/// the prompt and differ in `cond` (e.g. `Conditioning::Weighted` with one weight vector per
/// row, [rows, k]). Row r samples from its own stream seeded by `seeds[r]`, so what a row
/// generates does not depend on the other rows of its batch. A row that has produced the
/// end-of-sequence token is fed it again until every row has (what it generates after it is
/// dropped). Returns each row's new tokens (its end-of-sequence token included).
pub fn generate_rows(
    model: &CausalLm,
    prompt: &[u32],
    cond: Conditioning,
    opts: &GenerateOptions,
    seeds: &[u64],
) -> Result<Vec<Vec<u32>>> {
    ensure!(!prompt.is_empty(), "the prompt has no tokens");
    ensure!(!seeds.is_empty(), "no row to generate");
    ensure!(
        opts.top_p > 0.0 && opts.top_p <= 1.0,
        "top_p {} is not in (0, 1]",
        opts.top_p
    );
    let rows = seeds.len() as i64;
    let device = model.embedding_device();
    let mut rngs: Vec<ChaCha8Rng> = seeds
        .iter()
        .map(|&s| ChaCha8Rng::seed_from_u64(s))
        .collect();
    let mut cache = KvCache::default();
    let ids: Vec<i64> = prompt.iter().map(|&t| i64::from(t)).collect();
    let mut input = Tensor::from_slice(&ids)
        .unsqueeze(0)
        .expand([rows, ids.len() as i64], false)
        .contiguous()
        .to_device(device); // [rows, t]
    let mut out: Vec<Vec<u32>> = vec![Vec::new(); seeds.len()];
    let mut done = vec![false; seeds.len()];
    let _guard = tch::no_grad_guard();
    for _ in 0..opts.max_new_tokens {
        let logits = model.forward_cached(&input, &mut cache, cond); // [rows, t, vocab]
        let last = logits.select(1, -1).to_kind(Kind::Float); // [rows, vocab]
        let mut next = Vec::with_capacity(seeds.len());
        for (r, rng) in rngs.iter_mut().enumerate() {
            let token = if done[r] {
                opts.eos_token_id.unwrap_or(0)
            } else {
                let token = pick(&last.get(r as i64), opts, rng)?;
                out[r].push(token);
                done[r] = Some(token) == opts.eos_token_id;
                token
            };
            next.push(i64::from(token));
        }
        if done.iter().all(|&d| d) {
            break;
        }
        input = Tensor::from_slice(&next).unsqueeze(1).to_device(device); // [rows, 1]
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
