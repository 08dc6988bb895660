//! KV-cache decoding (`CausalLm::forward_cached`, `generate`) against recomputing the full
//! forward each step: the same greedy tokens on a tiny model (with adapters conditioned on w),
//! the golden Llama 3 models and Mistral with a sliding window shorter than the sequence; the
//! cached logits match the full forward's at every position.

use modpo_tests::{golden_model, write_tiny_model};
use modpo_trainer::model::generate::{generate, greedy_uncached, GenerateOptions};
use modpo_trainer::model::{load_model, AdapterKind, AdapterSpec, CausalLm, Conditioning, KvCache};
use tch::{Device, Kind, Tensor};

fn greedy(max_new_tokens: usize) -> GenerateOptions {
    GenerateOptions {
        max_new_tokens,
        temperature: 0.0,
        top_p: 1.0,
        seed: 0,
        eos_token_id: None,
    }
}

/// Cached logits, fed in chunks of 3 then 1 token at a time, equal the full forward's.
fn check_cached_logits(model: &CausalLm, ids: &[i64], cond: Conditioning) {
    let full = tch::no_grad(|| {
        let input = Tensor::from_slice(ids).unsqueeze(0);
        model.forward(&input, &input.ones_like(), cond)
    }); // [1, t, vocab]
    let mut cache = KvCache::default();
    let mut pieces = vec![tch::no_grad(|| {
        model.forward_cached(
            &Tensor::from_slice(&ids[..3]).unsqueeze(0),
            &mut cache,
            cond,
        )
    })];
    for &id in &ids[3..] {
        pieces.push(tch::no_grad(|| {
            model.forward_cached(&Tensor::from_slice(&[id]).unsqueeze(0), &mut cache, cond)
        }));
    }
    assert_eq!(cache.len(), ids.len() as i64);
    let cached = Tensor::cat(&pieces, 1);
    let diff = (&cached - &full).abs().max().double_value(&[]);
    assert!(diff <= 1e-4, "cached logits differ by {diff}");
}

fn check_golden(name: &str, new_tokens: usize) {
    let dir = golden_model(name);
    let loaded = load_model(&dir, None, Device::Cpu, Kind::Float).unwrap();
    let vocab = loaded.model.config().vocab_size;
    let prompt: Vec<u32> = (0..5).map(|i| ((i * 37 + 11) % vocab) as u32).collect();
    let cached = generate(
        &loaded.model,
        &prompt,
        Conditioning::Reference,
        &greedy(new_tokens),
    )
    .unwrap();
    let full = greedy_uncached(
        &loaded.model,
        &prompt,
        Conditioning::Reference,
        new_tokens,
        None,
    );
    assert_eq!(cached, full, "{name}");
    assert_eq!(cached.len(), new_tokens);
    let ids: Vec<i64> = prompt
        .iter()
        .chain(&cached)
        .map(|&t| i64::from(t))
        .collect();
    check_cached_logits(&loaded.model, &ids, Conditioning::Reference);
}

#[test]
fn kv_cache_matches_full_forward_on_golden_llama() {
    check_golden("llama3_tied", 12);
    check_golden("llama3_untied_sharded", 12);
}

#[test]
fn kv_cache_matches_full_forward_on_mistral_sliding_window() {
    let window = load_model(
        &golden_model("mistral_sliding"),
        None,
        Device::Cpu,
        Kind::Float,
    )
    .unwrap()
    .model
    .config()
    .sliding_window
    .expect("the golden Mistral has a sliding window");
    // Prompt + generated tokens run well past the window.
    check_golden("mistral_sliding", 3 * window as usize);
}

#[test]
fn kv_cache_matches_full_forward_on_tiny_model_with_adapters() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_model(dir.path(), 3);
    let spec = AdapterSpec {
        kind: AdapterKind::Lora,
        rank: 4,
        alpha: 8.0,
        num_dimensions: 2,
        shared: true,
    };
    let loaded = load_model(dir.path(), Some(&spec), Device::Cpu, Kind::Float).unwrap();
    // Fresh adapters have B = 0: perturb them so the conditioning changes the logits.
    tch::no_grad(|| {
        for (_, mut v) in loaded.adapters.variables() {
            let noise = v.randn_like() * 0.05;
            let _ = v.f_add_(&noise).unwrap();
        }
    });
    let w = Tensor::from_slice(&[0.3f32, 0.7]).unsqueeze(0); // [1, k]
    let cond = Conditioning::Weighted(&w);
    let prompt: Vec<u32> = b"Hello there".iter().map(|&b| u32::from(b)).collect();
    let cached = generate(&loaded.model, &prompt, cond, &greedy(16)).unwrap();
    assert_eq!(
        cached,
        greedy_uncached(&loaded.model, &prompt, cond, 16, None)
    );
    let ids: Vec<i64> = prompt
        .iter()
        .chain(&cached)
        .map(|&t| i64::from(t))
        .collect();
    check_cached_logits(&loaded.model, &ids, cond);
    // Sampling: reproducible for a seed, top_p in (0, 1] enforced.
    let opts = GenerateOptions {
        temperature: 1.0,
        top_p: 0.9,
        seed: 7,
        ..greedy(16)
    };
    let a = generate(&loaded.model, &prompt, cond, &opts).unwrap();
    assert_eq!(a, generate(&loaded.model, &prompt, cond, &opts).unwrap());
    let bad = GenerateOptions { top_p: 0.0, ..opts };
    assert!(generate(&loaded.model, &prompt, cond, &bad).is_err());
}
