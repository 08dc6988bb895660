//! The data cursor of a stage: its global batches epoch after epoch (length-bucketed, in the
//! seeded order of [`epoch_batches`]), resumable at any step boundary.

use crate::config::RunConfig;
use crate::data::{epoch_batches, SplitData};
use crate::method::Stage;

/// The global batches of one stage, from a position on.
pub(super) struct StageBatches {
    /// `(pair id, length of the row it becomes)` of the stage's pool.
    pool: Vec<(usize, usize)>,
    global_batch: usize,
    /// Seed of the stage's epoch orders.
    seed: u64,
    epochs: usize,
    /// The epoch being read, its batches, and the index of the next one.
    epoch: usize,
    batches: Vec<Vec<usize>>,
    next: usize,
    /// (epoch, pairs of it consumed) after the last batch handed out: where a checkpoint
    /// resumes.
    consumed: (usize, usize),
}

impl StageBatches {
    /// The batches of `stage` over the pool `pool` of `train`, from `start` = (epoch, pairs of
    /// it already consumed) or from the beginning.
    pub fn new(
        train: &SplitData,
        pool: &[usize],
        config: &RunConfig,
        stage: &Stage,
        start: Option<(usize, usize)>,
    ) -> Self {
        let row_length = crate::logps::RowLayout::new(config.train.share_prompt).row_length();
        let global_batch = config.data.global_batch;
        let (epoch, pairs_into_epoch) = start.unwrap_or((0, 0));
        let skip = pairs_into_epoch / global_batch;
        let mut batches = StageBatches {
            pool: train.pool_by(pool, row_length),
            global_batch,
            seed: config.data.seed.wrapping_add(stage.number as u64),
            // A pair-pass budget sets the stage's steps, which may run into a further epoch;
            // the training loop stops at them.
            epochs: match config.train.pair_passes {
                Some(_) => usize::MAX,
                None => config.train.epochs,
            },
            epoch,
            batches: Vec::new(),
            next: skip,
            consumed: (epoch, skip * global_batch),
        };
        batches.batches = batches.epoch_order(epoch);
        batches
    }

    fn epoch_order(&self, epoch: usize) -> Vec<Vec<usize>> {
        match epoch < self.epochs {
            true => epoch_batches(&self.pool, self.global_batch, self.seed, epoch as u64).batches,
            false => Vec::new(),
        }
    }

    /// The next global batch with its epoch; None after the last epoch.
    pub fn next(&mut self) -> Option<(usize, Vec<usize>)> {
        while self.next >= self.batches.len() {
            if self.epoch + 1 >= self.epochs {
                return None;
            }
            self.epoch += 1;
            self.next = 0;
            self.batches = self.epoch_order(self.epoch);
        }
        let batch = self.batches[self.next].clone();
        self.next += 1;
        self.consumed = (self.epoch, self.next * self.global_batch);
        Some((self.epoch, batch))
    }

    /// (epoch, pairs of it consumed) after the last batch handed out.
    pub fn cursor(&self) -> (usize, usize) {
        self.consumed
    }
}
