//! Batching: length-bucketed global batches in a deterministic per-epoch order, each split into
//! disjoint per-rank shards of micro-batches (METHOD section 9), and the padded buffers of one
//! micro-batch.
//!
//! Global batches are formed from the whole shuffled pool without looking at the world size;
//! only then is each one, in a fixed order, cut into `world_size x accumulation` contiguous
//! micro-batches, rank r taking micro-batches `r*acc .. (r+1)*acc`. So every (world size,
//! accumulation) with the same global batch trains on exactly the same pairs per step.

use rand::seq::SliceRandom;

use super::config::DataConfig;
use super::error::DataError;
use super::split::seeded_rng;
use super::tokenize::TokenizedPair;

/// Global batches per bucket: pairs of similar length are grouped within a window of this many
/// global batches, which cuts padding without making the order predictable by length.
pub const BUCKET_GLOBAL_BATCHES: usize = 16;

/// The batch geometry of a run: `global_batch = micro_batch x accumulation x world_size`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchPlan {
    pub global_batch: usize,
    pub micro_batch: usize,
    pub accumulation: usize,
    pub world_size: usize,
}

impl BatchPlan {
    /// The plan of `config` on `world_size` ranks; accumulation is derived when not given. The
    /// error names every factor.
    pub fn new(config: &DataConfig, world_size: usize) -> Result<Self, DataError> {
        BatchPlan::from_factors(
            config.global_batch,
            config.micro_batch,
            config.accumulation,
            world_size,
        )
    }

    pub fn from_factors(
        global_batch: usize,
        micro_batch: usize,
        accumulation: Option<usize>,
        world_size: usize,
    ) -> Result<Self, DataError> {
        let refused = DataError::BatchGeometry {
            global_batch,
            micro_batch,
            accumulation,
            world_size,
        };
        if world_size == 0 || micro_batch == 0 || accumulation == Some(0) {
            return Err(refused);
        }
        let accumulation = match accumulation {
            Some(acc) => acc,
            None => {
                if global_batch == 0 || !global_batch.is_multiple_of(micro_batch * world_size) {
                    return Err(refused);
                }
                global_batch / (micro_batch * world_size)
            }
        };
        if micro_batch * accumulation * world_size != global_batch {
            return Err(refused);
        }
        Ok(BatchPlan {
            global_batch,
            micro_batch,
            accumulation,
            world_size,
        })
    }

    /// This rank's micro-batches of one global batch (whose pairs are in the fixed order
    /// [`epoch_batches`] gives): `accumulation` disjoint contiguous slices.
    pub fn shard<'a>(&self, global: &'a [usize], rank: usize) -> Vec<&'a [usize]> {
        assert_eq!(
            global.len(),
            self.global_batch,
            "a global batch has global_batch pairs"
        );
        assert!(rank < self.world_size, "rank {rank} of {}", self.world_size);
        global
            .chunks(self.micro_batch)
            .skip(rank * self.accumulation)
            .take(self.accumulation)
            .collect()
    }
}

/// One epoch's global batches over a pool of pairs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EpochBatches {
    /// Pair ids; each batch sorted by length (ties by id), so contiguous micro-batches pad
    /// little.
    pub batches: Vec<Vec<usize>>,
    /// Pairs left out this epoch because they do not fill a last global batch (fewer than
    /// `global_batch`); a different random set every epoch.
    pub dropped: Vec<usize>,
}

/// The global batches of `epoch` over `pool`, a list of `(pair id, length)`: shuffled by
/// (seed, epoch), the incomplete tail dropped, buckets of [`BUCKET_GLOBAL_BATCHES`] global
/// batches sorted by length and cut, and the batches shuffled again. The result depends only
/// on the set of pool entries, seed, epoch and `global_batch`.
pub fn epoch_batches(
    pool: &[(usize, usize)],
    global_batch: usize,
    seed: u64,
    epoch: u64,
) -> EpochBatches {
    assert!(global_batch > 0);
    let mut order = pool.to_vec();
    order.sort_unstable();
    let mut rng = seeded_rng("epoch-order", seed, epoch);
    order.shuffle(&mut rng);
    let full = order.len() / global_batch * global_batch;
    let dropped = order[full..].iter().map(|&(id, _)| id).collect();
    order.truncate(full);
    let mut batches = Vec::with_capacity(full / global_batch);
    for bucket in order.chunks_mut(global_batch * BUCKET_GLOBAL_BATCHES) {
        bucket.sort_unstable_by_key(|&(id, len)| (len, id));
        batches.extend(
            bucket
                .chunks(global_batch)
                .map(|batch| batch.iter().map(|&(id, _)| id).collect::<Vec<_>>()),
        );
    }
    batches.shuffle(&mut rng);
    EpochBatches { batches, dropped }
}

/// Evaluation micro-batches of this rank: every pair of `pool` exactly once over all ranks,
/// none dropped. Pairs are sorted by length (ties by id) and cut into micro-batches of
/// `micro_batch` (the last may be shorter); micro-batch j goes to rank `j % world_size`.
pub fn eval_micro_batches(
    pool: &[(usize, usize)],
    micro_batch: usize,
    world_size: usize,
    rank: usize,
) -> Vec<Vec<usize>> {
    assert!(micro_batch > 0 && rank < world_size);
    let mut order = pool.to_vec();
    order.sort_unstable_by_key(|&(id, len)| (len, id));
    order
        .chunks(micro_batch)
        .skip(rank)
        .step_by(world_size)
        .map(|chunk| chunk.iter().map(|&(id, _)| id).collect())
        .collect()
}

/// The model's input for one micro-batch of `B` pairs: `2B` sequences, rows `0..B` are
/// `prompt + response_a` of pairs `0..B`, rows `B..2B` are `prompt + response_b`, right-padded
/// to the longest, `T`. Buffers are row-major; turn them into tensors with their shapes.
#[derive(Debug, Clone, PartialEq)]
pub struct MicroBatch {
    /// Ids of the pairs, in row order.
    pub pair_ids: Vec<usize>,
    /// B.
    pub pairs: usize,
    /// T.
    pub seq_len: usize,
    /// k.
    pub dimensions: usize,
    /// `[2B, T]`; padding is the tokenizer's pad id.
    pub input_ids: Vec<i64>,
    /// `[2B, T]`; 1 on real tokens, 0 on padding.
    pub attention_mask: Vec<i64>,
    /// `[2B, T]`; 1 where `input_ids[r, t]` is a response token (EOS included), so
    /// `log pi(y | x) = sum_t response_mask[r, t] * log p(input_ids[r, t] | input_ids[r, <t])`,
    /// read from the logits at `t - 1` (a prompt always precedes, so t >= 1).
    pub response_mask: Vec<i64>,
    /// `[B, k]`; +1 where dimension i prefers response a, -1 b, 0 no preference (mask).
    pub preferences: Vec<i64>,
    /// `[B, k]` score vectors of response a and response b.
    pub scores_a: Vec<f32>,
    pub scores_b: Vec<f32>,
    /// `[B]`; 1 for a conflict pair, 0 for an agree pair.
    pub conflict: Vec<i64>,
}

/// Pads and stacks `pairs` (at least one) into a [`MicroBatch`].
pub fn collate(pairs: &[&TokenizedPair], pad_token_id: u32) -> MicroBatch {
    assert!(!pairs.is_empty(), "a micro-batch holds at least one pair");
    let b = pairs.len();
    let k = pairs[0].scores_a.len();
    let seq_len = pairs.iter().map(|p| p.seq_len()).max().unwrap_or(0);
    let rows = 2 * b;
    let mut input_ids = vec![i64::from(pad_token_id); rows * seq_len];
    let mut attention_mask = vec![0i64; rows * seq_len];
    let mut response_mask = vec![0i64; rows * seq_len];
    for (row, (pair, response)) in pairs
        .iter()
        .map(|p| (p, &p.response_a_ids))
        .chain(pairs.iter().map(|p| (p, &p.response_b_ids)))
        .enumerate()
    {
        let start = row * seq_len;
        let prompt_len = pair.prompt_ids.len();
        for (t, &id) in pair.prompt_ids.iter().chain(response).enumerate() {
            input_ids[start + t] = i64::from(id);
            attention_mask[start + t] = 1;
            response_mask[start + t] = i64::from(t >= prompt_len);
        }
    }
    let mut preferences = Vec::with_capacity(b * k);
    let mut scores_a = Vec::with_capacity(b * k);
    let mut scores_b = Vec::with_capacity(b * k);
    for pair in pairs {
        assert_eq!(pair.scores_a.len(), k, "every pair of a batch has k scores");
        preferences.extend(pair.preferences.iter().map(|p| i64::from(p.sign())));
        scores_a.extend(pair.scores_a.iter().map(|&s| s as f32));
        scores_b.extend(pair.scores_b.iter().map(|&s| s as f32));
    }
    MicroBatch {
        pair_ids: pairs.iter().map(|p| p.id).collect(),
        pairs: b,
        seq_len,
        dimensions: k,
        input_ids,
        attention_mask,
        response_mask,
        preferences,
        scores_a,
        scores_b,
        conflict: pairs.iter().map(|p| i64::from(p.is_conflict())).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_names_every_factor() {
        let err = BatchPlan::from_factors(6, 2, Some(2), 2)
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "global_batch 6 is not micro_batch x accumulation x world_size = 2 x 2 x 2"
        );
        let err = BatchPlan::from_factors(6, 2, None, 2)
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "global_batch 6 is not a multiple of micro_batch x world_size = 2 x 2"
        );
        assert_eq!(
            BatchPlan::from_factors(8, 2, None, 2).unwrap().accumulation,
            2
        );
    }

    #[test]
    fn epochs_are_deterministic_and_differ() {
        let pool: Vec<(usize, usize)> = (0..103).map(|i| (i, (i * 37) % 50)).collect();
        let e0 = epoch_batches(&pool, 8, 1, 0);
        let mut reversed = pool.clone();
        reversed.reverse();
        assert_eq!(e0, epoch_batches(&reversed, 8, 1, 0));
        assert_ne!(e0, epoch_batches(&pool, 8, 1, 1));
        assert_ne!(e0, epoch_batches(&pool, 8, 2, 0));
        assert_eq!(e0.batches.len(), 12);
        assert_eq!(e0.dropped.len(), 7);
        let mut seen: Vec<usize> = e0
            .batches
            .iter()
            .flatten()
            .chain(&e0.dropped)
            .copied()
            .collect();
        seen.sort_unstable();
        assert_eq!(seen, (0..103).collect::<Vec<_>>());
    }

    #[test]
    fn eval_batches_cover_every_pair_once() {
        let pool: Vec<(usize, usize)> = (0..23).map(|i| (i, (i * 5) % 7)).collect();
        for world in [1, 2, 4] {
            let mut seen: Vec<usize> = (0..world)
                .flat_map(|rank| eval_micro_batches(&pool, 3, world, rank))
                .inspect(|micro| assert!(!micro.is_empty() && micro.len() <= 3))
                .flatten()
                .collect();
            seen.sort_unstable();
            assert_eq!(seen, (0..23).collect::<Vec<_>>(), "world {world}");
        }
        let rank1 = eval_micro_batches(&pool, 3, 2, 1);
        assert_eq!(rank1.len(), 4); // micro-batches 1, 3, 5, 7 of 8
    }

    #[test]
    fn buckets_group_similar_lengths() {
        // 16 global batches of 4 form one bucket: every batch is a contiguous length range.
        let pool: Vec<(usize, usize)> = (0..64).map(|i| (i, 1000 - i)).collect();
        let epoch = epoch_batches(&pool, 4, 0, 0);
        for batch in &epoch.batches {
            let lens: Vec<usize> = batch.iter().map(|&id| 1000 - id).collect();
            assert!(lens.windows(2).all(|w| w[0] < w[1]), "{lens:?}");
            assert_eq!(lens[3] - lens[0], 3);
        }
    }
}
