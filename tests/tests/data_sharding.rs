//! Sharding (METHOD section 9): for world sizes 1, 2 and 4 (and any accumulation) with the same
//! global batch, the shards of every global batch are disjoint and together are exactly that
//! global batch; the global batches themselves do not depend on the world size.

use std::collections::BTreeSet;
use std::path::Path;

use modpo_trainer::data::{self, collate, epoch_batches, BatchPlan, DataConfig};
use modpo_trainer::tokenizer::byte_level;
use modpo_trainer::tokenizer::ChatTokenizer;
use serde_json::json;

/// Every pair a rank sees in one global batch, over all ranks, for one plan.
fn shards_of(global: &[usize], plan: &BatchPlan) -> Vec<Vec<usize>> {
    (0..plan.world_size)
        .map(|rank| {
            let micro = plan.shard(global, rank);
            assert_eq!(
                micro.len(),
                plan.accumulation,
                "rank {rank}: accumulation steps"
            );
            assert!(micro.iter().all(|m| m.len() == plan.micro_batch));
            micro.concat()
        })
        .collect()
}

fn check_plans(pool: &[(usize, usize)], global_batch: usize, plans: &[BatchPlan]) {
    for epoch in 0..3 {
        let batches = epoch_batches(pool, global_batch, 1234, epoch);
        assert_eq!(batches.batches.len(), pool.len() / global_batch);
        assert_eq!(batches.dropped.len(), pool.len() % global_batch);
        let mut everything = BTreeSet::new();
        for global in &batches.batches {
            let expected: BTreeSet<usize> = global.iter().copied().collect();
            assert_eq!(
                expected.len(),
                global_batch,
                "no pair twice in a global batch"
            );
            for plan in plans {
                let shards = shards_of(global, plan);
                let all: Vec<usize> = shards.concat();
                let union: BTreeSet<usize> = all.iter().copied().collect();
                assert_eq!(all.len(), union.len(), "{plan:?}: a pair in two shards");
                assert_eq!(union, expected, "{plan:?}: shards are not the global batch");
            }
            for id in global {
                assert!(everything.insert(*id), "pair {id} in two global batches");
            }
        }
        for id in &batches.dropped {
            assert!(everything.insert(*id), "dropped pair {id} also in a batch");
        }
        assert_eq!(everything.len(), pool.len());
    }
}

#[test]
fn shards_cover_each_global_batch_once_for_1_2_4_ranks() {
    let pool: Vec<(usize, usize)> = (0..1003).map(|i| (i * 7, 50 + (i * 31) % 400)).collect();
    let plans: Vec<BatchPlan> = [
        (1, 8, None),
        (1, 1, Some(16)),
        (2, 2, None),
        (2, 4, Some(2)),
        (4, 1, None),
        (4, 4, Some(1)),
    ]
    .iter()
    .map(|&(world, micro, acc)| BatchPlan::from_factors(16, micro, acc, world).unwrap())
    .collect();
    assert_eq!(plans[0].accumulation, 2);
    assert_eq!(plans[4].accumulation, 4);
    check_plans(&pool, 16, &plans);
}

/// The same on the real PKU-SafeRLHF sample's conflict pairs, with the model buffers built
/// for every rank's micro-batches: each pair's rows hold its own tokens.
#[test]
fn real_conflict_pairs_shard_and_collate() {
    let dir = tempfile::tempdir().unwrap();
    byte_level::write_byte_level_tokenizer(dir.path()).unwrap();
    let tok = ChatTokenizer::from_model_dir(dir.path(), None).unwrap();
    let train_file =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/pku_saferlhf_sample.jsonl");
    let config: DataConfig = serde_json::from_value(json!({
        "format": "pku-saferlhf", "train_file": train_file, "eval_fraction": 0.0,
        "max_length": 256, "global_batch": 8, "micro_batch": 2, "seed": 3
    }))
    .unwrap();
    let data = data::load(&config, &tok).unwrap();
    let conflict = data.train.conflict();
    // 117 conflict pairs, less any whose responses are identical once cut to fit 256 bytes.
    assert!(conflict.len() <= 117 && conflict.len() + data.train.identical_dropped >= 117);
    let pool = data.train.pool(&conflict);
    let plans: Vec<BatchPlan> = [1, 2, 4]
        .iter()
        .map(|&world| BatchPlan::new(&config, world).unwrap())
        .collect();
    check_plans(&pool, 8, &plans);

    let epoch = epoch_batches(&pool, 8, data.seed, 0);
    for global in &epoch.batches {
        for rank in 0..4 {
            for micro in plans[2].shard(global, rank) {
                let batch = collate(&data.train.select(micro), tok.pad_token_id());
                assert!(batch.seq_len <= 256);
                for (row, &id) in micro.iter().enumerate() {
                    let pair = &data.train.pairs[id];
                    assert!(pair.is_conflict());
                    let t = batch.seq_len;
                    let tokens: Vec<u32> = batch.input_ids[row * t..(row + 1) * t]
                        .iter()
                        .zip(&batch.attention_mask[row * t..(row + 1) * t])
                        .filter(|(_, &m)| m == 1)
                        .map(|(&i, _)| i as u32)
                        .collect();
                    assert_eq!(
                        tokens,
                        [pair.prompt_ids.clone(), pair.response_a_ids.clone()].concat()
                    );
                    let response: i64 = batch.response_mask
                        [(micro.len() + row) * t..(micro.len() + row + 1) * t]
                        .iter()
                        .sum();
                    assert_eq!(response as usize, pair.response_b_ids.len());
                }
            }
        }
    }
}
