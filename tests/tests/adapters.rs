//! The adapted model end to end: response log-probs against transformers, which parameters a
//! weight vector moves, and the reference log-prob cache.

use std::collections::HashMap;
use std::path::Path;

use modpo_tests::{golden_model, shared_data_dir, write_tiny_model};
use modpo_trainer::data::{self, DataConfig};
use modpo_trainer::logps::response_logps;
use modpo_trainer::model::{load_model, AdapterKind, AdapterSpec, Conditioning};
use modpo_trainer::reference;
use modpo_trainer::tokenizer::ChatTokenizer;
use tch::{Device, Kind, Tensor};

/// `response_logps` sums transformers' per-token log-probs over the response positions: here
/// every token from position 2 on (the first 2 are "prompt"), padding excluded.
#[test]
fn response_logps_match_transformers() {
    let dir = golden_model("llama3_untied_sharded");
    let golden: HashMap<String, Tensor> = Tensor::read_safetensors(dir.join("golden.safetensors"))
        .unwrap()
        .into_iter()
        .collect();
    let (input_ids, attention_mask) = (&golden["input_ids"], &golden["attention_mask"]); // [3, 12]
    let t = input_ids.size()[1];
    let positions = Tensor::arange(t, (Kind::Int64, Device::Cpu)).unsqueeze(0);
    let response_mask = positions.ge(2).logical_and(&attention_mask.ne(0)); // [3, 12]
                                                                            // Expected: token_logprobs[r, j] scores token j + 1.
    let scored = response_mask.narrow(1, 1, t - 1).to_kind(Kind::Float);
    let expected = (&golden["token_logprobs"] * scored).sum_dim_intlist(1, false, Kind::Float);

    let spec = AdapterSpec {
        kind: AdapterKind::Lora,
        rank: 4,
        alpha: 8.0,
        num_dimensions: 2,
        shared: true,
    };
    let loaded = load_model(&dir, Some(&spec), Device::Cpu, Kind::Float).unwrap();
    let w = Tensor::from_slice(&[0.3f32, 0.7, 1.0, 0.0, 0.5, 0.5]).view([3, 2]);
    for cond in [
        Conditioning::Reference,
        Conditioning::SharedOnly,
        Conditioning::Weighted(&w),
    ] {
        // Fresh adapters (B = 0) leave the policy equal to the reference.
        let got = tch::no_grad(|| {
            response_logps(
                &loaded.model,
                input_ids,
                attention_mask,
                &response_mask,
                cond,
            )
        });
        let diff = (&got - &expected).abs().max().double_value(&[]);
        assert!(diff <= 1e-4, "{cond:?}: max abs diff {diff}");
    }
    assert!(
        expected.abs().min().double_value(&[]) > 0.1,
        "every row has response tokens"
    );
}

fn grad_abs_sum(t: &Tensor) -> f64 {
    let g = t.grad();
    if g.defined() {
        g.abs().sum(Kind::Double).double_value(&[])
    } else {
        0.0
    }
}

/// With w = 1_i for every row, the gradient reaches the shared block and block i only; the
/// other dimension blocks get exactly zero and the frozen base gets none at all.
#[test]
fn unit_weight_moves_only_shared_and_its_own_block() {
    let tmp = tempfile::tempdir().unwrap();
    write_tiny_model(tmp.path(), 7);
    let spec = AdapterSpec {
        kind: AdapterKind::Lora,
        rank: 2,
        alpha: 4.0,
        num_dimensions: 3,
        shared: true,
    };
    let loaded = load_model(tmp.path(), Some(&spec), Device::Cpu, Kind::Float).unwrap();
    tch::no_grad(|| {
        // With B = 0 no gradient reaches any A: give every B values first.
        for (name, mut var) in loaded.adapters.variables() {
            if name.ends_with("_b") {
                var.copy_(&(Tensor::randn(var.size(), (Kind::Float, Device::Cpu)) * 0.1));
            }
        }
    });
    let input_ids = Tensor::from_slice(&[5i64, 6, 7, 8, 9, 10, 11, 12]).view([2, 4]);
    let attention_mask = Tensor::ones([2, 4], (Kind::Int64, Device::Cpu));
    let response_mask =
        Tensor::from_slice(&[false, false, true, true, false, true, true, true]).view([2, 4]);
    let dimension = 1;
    let w = Tensor::zeros([2, 3], (Kind::Float, Device::Cpu));
    let _ = w.narrow(1, dimension, 1).fill_(1.0);
    let logps = response_logps(
        &loaded.model,
        &input_ids,
        &attention_mask,
        &response_mask,
        Conditioning::Weighted(&w),
    );
    logps.sum(Kind::Float).backward();

    let r = spec.rank;
    for (name, var) in loaded.adapters.variables() {
        if name.contains("shared") {
            assert!(grad_abs_sum(&var) > 0.0, "{name}: the shared block trains");
            continue;
        }
        let grad = var.grad();
        // dims_a: [k r, in], block i = rows i r..; dims_b: [out, k r], block i = columns.
        let axis = if name.ends_with("dims_a") { 0 } else { 1 };
        for block in 0..spec.num_dimensions {
            let g = grad
                .narrow(axis, block * r, r)
                .abs()
                .sum(Kind::Double)
                .double_value(&[]);
            if block == dimension {
                assert!(g > 0.0, "{name}: block {block} trains");
            } else {
                assert_eq!(g, 0.0, "{name}: block {block} must get no gradient");
            }
        }
    }
    for (name, var) in loaded.base.variables() {
        assert!(
            !var.requires_grad() && !var.grad().defined(),
            "{name}: base weights are frozen"
        );
    }
}

fn data_config(train_file: &Path, max_length: usize) -> DataConfig {
    let text = format!(
        "format = \"pku-saferlhf\"\ntrain_file = {:?}\nmax_length = {max_length}\nglobal_batch = 4\nmicro_batch = 4\n",
        train_file.display().to_string()
    );
    toml::from_str(&text).unwrap()
}

/// The first `rows` rows of the PKU-SafeRLHF sample in `<dir>/train.jsonl`: the file and its
/// text.
fn write_pku_rows(dir: &Path, rows: usize) -> (std::path::PathBuf, String) {
    let sample: String =
        std::fs::read_to_string(shared_data_dir().join("pku_saferlhf_sample.jsonl"))
            .unwrap()
            .lines()
            .take(rows)
            .map(|l| format!("{l}\n"))
            .collect();
    let train_file = dir.join("train.jsonl");
    std::fs::write(&train_file, &sample).unwrap();
    (train_file, sample)
}

/// The cached reference log-probs equal a live computation, are reused, and are recomputed
/// when the data or max_length changes (both change the key).
#[test]
fn reference_cache_reuses_and_invalidates() {
    let tmp = tempfile::tempdir().unwrap();
    let model_dir = tmp.path().join("model");
    write_tiny_model(&model_dir, 3);
    let cache = tmp.path().join("cache");
    let tokenizer = ChatTokenizer::from_model_dir(&model_dir, None).unwrap();
    let loaded = load_model(&model_dir, None, Device::Cpu, Kind::Float).unwrap();
    // 40 rows of the real PKU-SafeRLHF sample keep the test quick.
    let (train_file, sample) = write_pku_rows(tmp.path(), 40);

    let run = |config: &DataConfig| {
        let pairs = data::load(config, &tokenizer).unwrap().train.pairs;
        let (logps, from_cache) = reference::load_or_compute(
            &cache,
            &loaded.fingerprint,
            &loaded.model,
            &pairs,
            3,
            tokenizer.pad_token_id(),
            Device::Cpu,
        )
        .unwrap();
        (pairs, logps, from_cache)
    };
    let config = data_config(&train_file, 96);
    let (pairs, first, from_cache) = run(&config);
    assert!(!from_cache && pairs.len() > 10);
    let live = reference::compute(
        &loaded.model,
        &pairs,
        5,
        tokenizer.pad_token_id(),
        Device::Cpu,
    );
    let max_diff = first
        .response_a
        .iter()
        .chain(&first.response_b)
        .zip(live.response_a.iter().chain(&live.response_b))
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(max_diff <= 1e-4, "cached vs live: {max_diff}");

    let (_, again, from_cache) = run(&config);
    assert!(from_cache, "same data and model: served from the cache");
    assert_eq!(again, first);

    let (_, shorter, from_cache) = run(&data_config(&train_file, 64));
    assert!(!from_cache, "max_length changed: recomputed");
    assert_ne!(shorter, first);

    std::fs::write(
        &train_file,
        sample
            .lines()
            .skip(1)
            .map(|l| format!("{l}\n"))
            .collect::<String>(),
    )
    .unwrap();
    let (_, _, from_cache) = run(&config);
    assert!(!from_cache, "data changed: recomputed");
}

/// The chunked reference cache: chunks hold whole micro-batches of the length-sorted pairs;
/// shares of two ranks put together equal the whole pass bit for bit; a damaged chunk, one
/// of another key or one for other pairs is recomputed (and rewritten), never trusted.
#[test]
fn reference_cache_chunks_verify_and_shares_add_up() {
    use reference::{PassPlan, ReferenceCache, Share};
    let tmp = tempfile::tempdir().unwrap();
    let model_dir = tmp.path().join("model");
    write_tiny_model(&model_dir, 3);
    let tokenizer = ChatTokenizer::from_model_dir(&model_dir, None).unwrap();
    let loaded = load_model(&model_dir, None, Device::Cpu, Kind::Float).unwrap();
    let (train_file, _) = write_pku_rows(tmp.path(), 30);
    let pairs = data::load(&data_config(&train_file, 96), &tokenizer)
        .unwrap()
        .train
        .pairs;
    let n = pairs.len();
    let ids: Vec<usize> = (0..n).collect();
    // Chunks of 7 pairs round up to 9: three micro-batches of 3.
    let plan = PassPlan::new(&pairs, &ids, 3, 7);
    assert!(plan.chunks[..plan.chunks.len() - 1]
        .iter()
        .all(|c| c.len() == 9));
    let mut flat: Vec<usize> = plan.chunks.concat();
    let lengths: Vec<usize> = flat.iter().map(|&i| pairs[i].seq_len()).collect();
    assert!(lengths.windows(2).all(|w| w[0] <= w[1]), "sorted by length");
    flat.sort();
    assert_eq!(flat, ids, "every pair once");

    let key = reference::cache_key(&loaded.fingerprint, Kind::Float, &pairs);
    let cache = ReferenceCache::new(&tmp.path().join("cache"), &key);
    let pass = |cache: Option<&ReferenceCache>, share: Share| {
        reference::load_or_compute_share(cache, &loaded.model, &pairs, &plan, share, 0, Device::Cpu)
            .unwrap()
    };
    let (whole, report) = pass(Some(&cache), Share::ALL);
    assert_eq!((report.found, report.computed), (0, plan.chunks.len()));
    // The same micro-batches as the one-shot computation, so the same bits.
    assert_eq!(
        whole,
        reference::compute(&loaded.model, &pairs, 3, 0, Device::Cpu)
    );
    let (even, _) = pass(None, Share { rank: 0, world: 2 });
    let (odd, _) = pass(None, Share { rank: 1, world: 2 });
    let added: Vec<f32> = even
        .response_a
        .iter()
        .zip(&odd.response_a)
        .map(|(a, b)| a + b)
        .collect();
    assert_eq!(added, whole.response_a, "each pair from exactly one share");

    let (again, report) = pass(Some(&cache), Share::ALL);
    assert_eq!((report.found, report.computed), (plan.chunks.len(), 0));
    assert_eq!(again, whole);

    // A flipped value byte fails the checksum; a chunk copied from another index holds other
    // pairs; a chunk under another key's directory names its key.
    let chunk = |dir: &Path, i: usize| dir.join(format!("chunk-{i:06}.safetensors"));
    let mut bytes = std::fs::read(chunk(cache.dir(), 1)).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(chunk(cache.dir(), 1), &bytes).unwrap();
    std::fs::copy(chunk(cache.dir(), 0), chunk(cache.dir(), 2)).unwrap();
    let other = ReferenceCache::new(&tmp.path().join("cache"), "another-key");
    std::fs::create_dir_all(other.dir()).unwrap();
    std::fs::copy(chunk(cache.dir(), 0), chunk(other.dir(), 0)).unwrap();
    let (repaired, report) = pass(Some(&cache), Share::ALL);
    assert_eq!((report.found, report.computed), (plan.chunks.len() - 2, 2));
    assert_eq!(repaired, whole);
    let (_, report) = pass(Some(&cache), Share::ALL);
    assert_eq!(report.computed, 0, "the recomputed chunks were rewritten");
    let single = PassPlan::new(&pairs, &ids, 3, 9);
    let (_, report) = reference::load_or_compute_share(
        Some(&other),
        &loaded.model,
        &pairs,
        &single,
        Share::ALL,
        0,
        Device::Cpu,
    )
    .unwrap();
    assert_eq!(report.found, 0, "a chunk of another key is not read");
}
