//! `[train] plan_memory_gib`: the setting a training stage runs with, chosen by the planner
//! for the stage's own longest pair.

use anyhow::{anyhow, Result};
use tch::Device;

use super::{Breakdown, StageContext, StageLoad, Target};
use crate::data::TokenizedPair;
use crate::method::Stage;
use crate::model::CausalLm;

/// The fastest setting of `stage` that fits `gib` GiB for its longest pair among `pool`
/// (every row planned at that length), or an error naming the smallest peak.
pub fn choose_for_stage(
    model: &CausalLm,
    stage: &Stage,
    pool: &[&TokenizedPair],
    shared_prompt: bool,
    (k, global_batch, world_size): (usize, usize, usize),
    gib: f64,
) -> Result<Breakdown> {
    let len = |ids: &[u32]| ids.len() as i64;
    let lengths = |p: &&TokenizedPair| {
        (
            len(&p.prompt_ids),
            len(&p.response_a_ids),
            len(&p.response_b_ids),
        )
    };
    let row = |&(p, a, b): &(i64, i64, i64)| match shared_prompt {
        true => p + a + b,
        false => p + a.max(b),
    };
    let longest_pair = pool
        .iter()
        .map(lengths)
        .max_by_key(row)
        .unwrap_or((1, 1, 1));
    let spec = model
        .adapter_spec()
        .ok_or_else(|| anyhow!("training needs adapters"))?;
    let context = StageContext {
        model: model.config(),
        kind: model.kind(),
        spec,
        k,
        longest_pair,
        shared_prompt,
        rank_batch: global_batch / world_size,
        world_size,
        target: match model.embedding_device() {
            Device::Cpu => Target::Cpu,
            _ => Target::Cuda,
        },
    };
    let load = StageLoad::of_stage(stage, &context);
    let budget = (gib * (1u64 << 30) as f64) as u64;
    load.choose(budget).map_err(|smallest| {
        anyhow!(
            "stage {}: no setting fits train.plan_memory_gib = {gib} GiB; the smallest predicted \
             peak is {:.2} GiB (micro-batch {}, passes {}, recomputation {})",
            stage.number,
            smallest.total as f64 / (1u64 << 30) as f64,
            smallest.setting.micro_batch,
            if smallest.setting.batch_passes {
                "batched"
            } else {
                "one by one"
            },
            smallest.setting.recompute,
        )
    })
}
