//! What a stage trains and on what: the trainable parameters, the pool of pairs, and the
//! drawn preference weights.

use rand::Rng;
use tch::Tensor;

use crate::data::{split::seeded_rng, PreferenceData};
use crate::method::{PairPool, Trainable, WeightSampling};
use crate::model::CausalLm;

/// Sets which adapter tensors receive gradients; returns the trainable ones with their names.
pub fn set_trainable(model: &CausalLm, trainable: Trainable) -> Vec<(String, Tensor)> {
    let shared_on = matches!(trainable, Trainable::Shared | Trainable::All);
    let dimensions_on = matches!(trainable, Trainable::Dimensions | Trainable::All);
    let mut params = Vec::new();
    for (module, projection) in model.projections() {
        let adapter = projection
            .adapter
            .as_ref()
            .expect("training needs adapters");
        let mut tensors = vec![];
        if let Some(shared) = &adapter.shared {
            tensors.push(("shared_a", &shared.a, shared_on));
            tensors.push(("shared_b", &shared.b, shared_on));
        }
        tensors.push(("dims_a", &adapter.dimensions.a, dimensions_on));
        tensors.push(("dims_b", &adapter.dimensions.b, dimensions_on));
        for (name, tensor, on) in tensors {
            let _ = tensor.shallow_clone().set_requires_grad(on);
            if on {
                params.push((format!("{module}.{name}"), tensor.shallow_clone()));
            }
        }
    }
    params
}

/// The training pairs of a stage's pool.
pub(super) fn pool_ids(data: &PreferenceData, pool: PairPool) -> Vec<usize> {
    match pool {
        PairPool::Agree => data.train.agree(),
        PairPool::Conflict => data.train.conflict(),
        PairPool::All => (0..data.train.pairs.len()).collect(),
        PairPool::AgreeSubsetAndConflict => {
            let mut ids = data.agree_subset();
            ids.extend(data.train.conflict());
            ids.sort_unstable();
            ids
        }
    }
}

/// w ~ Dirichlet(1, .., 1) for each pair of a global batch (or one w for all of them), drawn
/// from (seed, stage, step) so that any world size and accumulation draws the same weights.
pub fn draw_weights(
    seed: u64,
    stage: usize,
    step: usize,
    pairs: usize,
    k: usize,
    sampling: WeightSampling,
) -> Vec<Vec<f32>> {
    let mut rng = seeded_rng(&format!("weights/stage-{stage}"), seed, step as u64);
    let mut draw = || {
        // Normalised unit exponentials are Dirichlet(1).
        let e: Vec<f64> = (0..k).map(|_| -(1.0 - rng.random::<f64>()).ln()).collect();
        let total: f64 = e.iter().sum();
        e.iter().map(|x| (x / total) as f32).collect::<Vec<f32>>()
    };
    match sampling {
        WeightSampling::PerRow => (0..pairs).map(|_| draw()).collect(),
        WeightSampling::PerStep => {
            let w = draw();
            vec![w; pairs]
        }
    }
}
