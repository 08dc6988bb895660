//! The lines of `metrics.jsonl`: one per optimizer step, and held-out evaluations.

use std::time::Instant;

use serde_json::json;

use super::run::Run;
use crate::eval;
use crate::method::Stage;
use crate::step::StepOutcome;

/// Rank 0 evaluates the held-out conflict pairs at the paper's settings (METHOD.md
/// section 6): the `metrics.jsonl` line, on rank 0 when there is something to evaluate.
pub(super) fn evaluate_held_out(
    run: &Run,
    stage: &Stage,
    step: usize,
) -> Option<serde_json::Value> {
    let reference = run.evaluation.as_ref()?;
    let pairs = eval::conflict_pairs(&run.data.eval);
    if pairs.is_empty() {
        return None;
    }
    let k = run.data.dimensions.len();
    let batching = eval::Batching::like_training(
        run.config.data.micro_batch,
        k + 1,
        run.tokenizer.pad_token_id(),
        run.device,
    );
    let bootstrap = eval::Bootstrap {
        resamples: 200,
        ..Default::default()
    };
    let evaluation = eval::evaluate(
        &run.loaded.model,
        &pairs,
        reference,
        &eval::paper_settings(k),
        eval::ImplicitReward::of(&run.config.method),
        &batching,
        &bootstrap,
    );
    let record = eval::metrics_record(&run.data.dimensions, &evaluation.results, pairs.len());
    tracing::info!(stage = stage.number, step, mean_accuracy = %record["mean_accuracy"], "held-out conflict accuracy");
    Some(json!({"stage": stage.number, "stage_name": stage.name, "step": step, "eval": record}))
}

/// One line of `metrics.jsonl`: the step's loss, learning rate, gradient norm, throughput and
/// per-dimension rewards and accuracy (and for AdaLoRA the penalty and the kept triplets).
pub(super) fn metrics_record(
    stage: &Stage,
    epoch: usize,
    step: usize,
    lr: f64,
    outcome: &StepOutcome,
    dimensions: &[String],
    started: Instant,
) -> serde_json::Value {
    let sums = &outcome.dimension_sums;
    let per_dimension: serde_json::Map<String, serde_json::Value> = dimensions
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let (chosen, rejected, correct, count) = (
                sums[4 * i],
                sums[1 + 4 * i],
                sums[2 + 4 * i],
                sums[3 + 4 * i],
            );
            let n = count.max(1.0);
            let value = json!({
                "chosen_reward": chosen / n,
                "rejected_reward": rejected / n,
                "margin": (chosen - rejected) / n,
                "accuracy": correct / n,
                "pairs": count,
            });
            (name.clone(), value)
        })
        .collect();
    let seconds = started.elapsed().as_secs_f64();
    let mut record = json!({
        "stage": stage.number,
        "stage_name": stage.name,
        "epoch": epoch,
        "step": step,
        "loss": outcome.loss,
        "learning_rate": lr,
        "grad_norm": outcome.grad_norm,
        "tokens_per_second": outcome.tokens as f64 / seconds.max(1e-9),
        "seconds": seconds,
        "dimensions": per_dimension,
    });
    if let Some(adalora) = &outcome.adalora {
        // The loss above includes the penalty; kept = triplets the rank allocator keeps.
        record["orth_penalty"] = json!(adalora.orth_penalty);
        record["kept_triplets"] = json!(adalora.kept_triplets);
    }
    record
}
