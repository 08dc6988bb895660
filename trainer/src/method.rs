//! The methods, declared in one place: each method's adapters and stages, and for each stage
//! the pool of pairs it draws from, the adapter blocks it trains, the passes of a step and the
//! loss of each (METHOD.md sections 4 and 5), with the pool selection, the freezing and the
//! weight draws those declarations stand for. The step runner and the training loop execute a
//! plan and know no method by name.
//!
//! Adding a method: a [`MethodName`], its [`stages`] and its [`MethodConfig::adapter_spec`].
//! Adding a loss for the drawn pass: a [`DrawnLoss`] variant, its arm in
//! [`DrawnLoss::per_row`] and the function in `loss.rs`.

use rand::Rng;
use serde::{Deserialize, Serialize};
use tch::Tensor;

use crate::data::split::{agree_subset, seeded_rng};
use crate::data::TokenizedPair;
use crate::invalid_key::InvalidKey;
use crate::loss;
use crate::model::{AdapterKind, AdapterSpec, CausalLm};
use crate::rank_allocation::AllocationSchedule;

/// `[method]` `name`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MethodName {
    /// The proposed three-stage curriculum.
    Curriculum,
    /// Panacea as the paper ran it: k + 1 AdaLoRA modules per projection trained jointly with
    /// linear scalarisation, with AdaLoRA's orthogonality penalty and rank allocation.
    Panacea,
    /// The same steps on the curriculum's own LoRA adapters: the ablation that isolates the
    /// curriculum from the adapter kind.
    PanaceaLora,
    /// k independent adapters, souped at inference.
    DpoSoup,
}

/// How the preference weight of a drawn pass is sampled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum WeightSampling {
    /// One w ~ Dirichlet(1) per pair (our default; passes with different w share a forward).
    #[default]
    PerRow,
    /// One w ~ Dirichlet(1) per optimizer step, as in the paper.
    PerStep,
}

impl WeightSampling {
    /// w ~ Dirichlet(1, .., 1) for each of `pairs` pairs of a global batch (or one w for all of
    /// them), drawn from (seed, stage, step) so that any world size and accumulation draws the
    /// same weights.
    pub fn draw(
        self,
        seed: u64,
        stage: usize,
        step: usize,
        pairs: usize,
        k: usize,
    ) -> Vec<Vec<f32>> {
        let mut rng = seeded_rng(&format!("weights/stage-{stage}"), seed, step as u64);
        let mut draw = || {
            // Normalised unit exponentials are Dirichlet(1).
            let e: Vec<f64> = (0..k).map(|_| -(1.0 - rng.random::<f64>()).ln()).collect();
            let total: f64 = e.iter().sum();
            e.iter().map(|x| (x / total) as f32).collect::<Vec<f32>>()
        };
        match self {
            WeightSampling::PerRow => (0..pairs).map(|_| draw()).collect(),
            WeightSampling::PerStep => {
                let w = draw();
                vec![w; pairs]
            }
        }
    }
}

/// `[method]`: the method and its hyperparameters.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MethodConfig {
    pub name: MethodName,
    /// DPO temperature beta.
    #[serde(default = "default_beta")]
    pub beta: f64,
    /// LoRA rank r of every block; default 8 (16 for dpo-soup). For panacea (AdaLoRA) the
    /// target rank per block after rank allocation (PEFT `target_r`), default 8.
    #[serde(default)]
    pub rank: Option<i64>,
    /// LoRA alpha; default 16 (32 for dpo-soup, 512 for panacea).
    #[serde(default)]
    pub alpha: Option<f64>,
    // The AdaLoRA keys: panacea only; the defaults are PEFT's `AdaLoraConfig` defaults.
    /// Triplets per block before rank allocation (PEFT `init_r`); default 12.
    #[serde(default)]
    pub init_rank: Option<i64>,
    /// Weight of the orthogonality penalty; default 0.5.
    #[serde(default)]
    pub orth_reg_weight: Option<f64>,
    /// Steps before rank allocation starts; default 0.
    #[serde(default)]
    pub tinit: Option<usize>,
    /// Steps at the end with the allocation fixed; default 0.
    #[serde(default)]
    pub tfinal: Option<usize>,
    /// Steps between allocations (PEFT `deltaT`); default 1.
    #[serde(default)]
    pub delta_t: Option<usize>,
    /// Smoothing factor of the sensitivity average; default 0.85.
    #[serde(default)]
    pub beta1: Option<f64>,
    /// Smoothing factor of the uncertainty average; default 0.85.
    #[serde(default)]
    pub beta2: Option<f64>,
    #[serde(default)]
    pub weight_sampling: WeightSampling,
    /// Run the passes of a step as one forward with rows replicated and per-row w ((passes)x
    /// activation memory; fills a GPU) instead of forward+backward pass by pass. Absent: by
    /// device ([`MethodConfig::batch_passes_on`]).
    #[serde(default)]
    pub batch_passes: Option<bool>,
    /// How response length enters the margins of every loss ([`loss::LengthCorrection`]):
    /// "none" (the paper), "per-token" or "r-dpo" (with `length_alpha`).
    #[serde(default)]
    pub length_correction: LengthCorrectionName,
    /// R-DPO's alpha (per token of length difference); required with "r-dpo" only.
    #[serde(default)]
    pub length_alpha: Option<f64>,
}

/// `[method]` `length_correction`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum LengthCorrectionName {
    #[default]
    None,
    PerToken,
    RDpo,
}

fn default_beta() -> f64 {
    0.01
}

/// What an AdaLoRA run adds to each step: the orthogonality penalty's weight and the rank
/// allocator's schedule.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct AdaLoraTraining {
    pub orth_reg_weight: f64,
    pub schedule: AllocationSchedule,
}

impl MethodConfig {
    /// The method with every optional key at its default.
    pub fn new(name: MethodName) -> Self {
        MethodConfig {
            name,
            beta: default_beta(),
            rank: None,
            alpha: None,
            init_rank: None,
            orth_reg_weight: None,
            tinit: None,
            tfinal: None,
            delta_t: None,
            beta1: None,
            beta2: None,
            weight_sampling: WeightSampling::default(),
            batch_passes: None,
            length_correction: LengthCorrectionName::None,
            length_alpha: None,
        }
    }

    /// The length correction of every loss's margin.
    /// Whether the passes of a step run batched on `device`: as configured, else batched on
    /// CUDA only. On a CPU one pass at a time measured as fast or faster (docs/benchmarks.md:
    /// 1.27x median over 6 runs) at half the memory; batching pays where one pass under-fills
    /// the device.
    pub fn batch_passes_on(&self, device: tch::Device) -> bool {
        self.batch_passes.unwrap_or(device.is_cuda())
    }

    pub fn length_correction(&self) -> loss::LengthCorrection {
        match self.length_correction {
            LengthCorrectionName::None => loss::LengthCorrection::None,
            LengthCorrectionName::PerToken => loss::LengthCorrection::PerToken,
            LengthCorrectionName::RDpo => loss::LengthCorrection::RDpo {
                alpha: self
                    .length_alpha
                    .expect("validated: r-dpo has length_alpha"),
            },
        }
    }

    pub fn validate(&self) -> Result<(), InvalidKey> {
        let invalid = |key: &str, rule: String| Err(InvalidKey::new("method", key, rule));
        self.validate_adalora_keys()?;
        if !(self.beta > 0.0 && self.beta.is_finite()) {
            return invalid(
                "beta",
                format!("must be a positive number, got {}", self.beta),
            );
        }
        if let Some(r) = self.rank {
            if r <= 0 {
                return invalid("rank", format!("must be positive, got {r}"));
            }
        }
        if let Some(a) = self.alpha {
            if !(a > 0.0 && a.is_finite()) {
                return invalid("alpha", format!("must be a positive number, got {a}"));
            }
        }
        match (self.length_correction, self.length_alpha) {
            (LengthCorrectionName::RDpo, None) => {
                return invalid(
                    "length_alpha",
                    "is required with length_correction = \"r-dpo\"".into(),
                )
            }
            (LengthCorrectionName::RDpo, Some(a)) if !(a >= 0.0 && a.is_finite()) => {
                return invalid("length_alpha", format!("must be a number >= 0, got {a}"))
            }
            (LengthCorrectionName::None | LengthCorrectionName::PerToken, Some(_)) => {
                return invalid(
                    "length_alpha",
                    "applies only to length_correction = \"r-dpo\"".into(),
                )
            }
            _ => {}
        }
        Ok(())
    }

    /// The AdaLoRA keys: set only for panacea, and within PEFT's ranges.
    fn validate_adalora_keys(&self) -> Result<(), InvalidKey> {
        let invalid = |key: &str, rule: String| Err(InvalidKey::new("method", key, rule));
        if self.name != MethodName::Panacea {
            let given = [
                ("init_rank", self.init_rank.is_some()),
                ("orth_reg_weight", self.orth_reg_weight.is_some()),
                ("tinit", self.tinit.is_some()),
                ("tfinal", self.tfinal.is_some()),
                ("delta_t", self.delta_t.is_some()),
                ("beta1", self.beta1.is_some()),
                ("beta2", self.beta2.is_some()),
            ];
            if let Some((key, _)) = given.iter().find(|(_, set)| *set) {
                return invalid(
                    key,
                    format!(
                        "is an AdaLoRA key and applies only to method \"panacea\", not {:?}",
                        self.name
                    ),
                );
            }
            return Ok(());
        }
        let Some(training) = self.adalora(1) else {
            return Ok(());
        };
        let s = training.schedule;
        if s.init_rank <= 0 {
            return invalid(
                "init_rank",
                format!("must be positive, got {}", s.init_rank),
            );
        }
        if s.target_rank > s.init_rank {
            return invalid(
                "rank",
                format!(
                    "is the target rank and must be at most method.init_rank = {}, got {}",
                    s.init_rank, s.target_rank
                ),
            );
        }
        if !(training.orth_reg_weight >= 0.0 && training.orth_reg_weight.is_finite()) {
            return invalid(
                "orth_reg_weight",
                format!("must be a number >= 0, got {}", training.orth_reg_weight),
            );
        }
        if s.delta_t == 0 {
            return invalid("delta_t", "must be at least 1, got 0".into());
        }
        for (key, value) in [("beta1", s.beta1), ("beta2", s.beta2)] {
            if !(value > 0.0 && value < 1.0) {
                return invalid(key, format!("must be in (0, 1), got {value}"));
            }
        }
        Ok(())
    }

    /// The adapters the method trains, for k dimensions.
    pub fn adapter_spec(&self, num_dimensions: usize) -> AdapterSpec {
        let (kind, rank, alpha) = match self.name {
            MethodName::DpoSoup => (AdapterKind::Lora, self.rank.unwrap_or(16), 32.0),
            MethodName::Curriculum | MethodName::PanaceaLora => {
                (AdapterKind::Lora, self.rank.unwrap_or(8), 16.0)
            }
            // The blocks hold init_rank triplets; `rank` is the allocation's target.
            MethodName::Panacea => (AdapterKind::AdaLora, self.init_rank.unwrap_or(12), 512.0),
        };
        AdapterSpec {
            kind,
            rank,
            alpha: self.alpha.unwrap_or(alpha),
            num_dimensions: num_dimensions as i64,
            shared: self.name != MethodName::DpoSoup,
        }
    }

    /// For panacea, the penalty and rank allocation of a stage of `total_step` optimizer
    /// steps (PEFT's defaults where a key is not set).
    pub fn adalora(&self, total_step: usize) -> Option<AdaLoraTraining> {
        (self.name == MethodName::Panacea).then(|| AdaLoraTraining {
            orth_reg_weight: self.orth_reg_weight.unwrap_or(0.5),
            schedule: AllocationSchedule {
                init_rank: self.init_rank.unwrap_or(12),
                target_rank: self.rank.unwrap_or(8),
                tinit: self.tinit.unwrap_or(0),
                tfinal: self.tfinal.unwrap_or(0),
                delta_t: self.delta_t.unwrap_or(1),
                beta1: self.beta1.unwrap_or(0.85),
                beta2: self.beta2.unwrap_or(0.85),
                total_step,
            },
        })
    }
}

/// Which training pairs a stage draws its batches from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum PairPool {
    Agree,
    Conflict,
    /// `D_agree,sub` (|D_conflict| agree pairs drawn with the seed) plus `D_conflict`.
    AgreeSubsetAndConflict,
    /// Every training pair.
    All,
}

impl PairPool {
    /// The ids of the pool's pairs among the training pairs (`pairs[i].id == i`); `seed` draws
    /// `D_agree,sub` (the data's seed).
    pub fn pair_ids(self, pairs: &[TokenizedPair], seed: u64) -> Vec<usize> {
        let of_kind = |conflict: bool| -> Vec<usize> {
            pairs
                .iter()
                .filter(|p| p.is_conflict() == conflict)
                .map(|p| p.id)
                .collect()
        };
        match self {
            PairPool::Agree => of_kind(false),
            PairPool::Conflict => of_kind(true),
            PairPool::All => pairs.iter().map(|p| p.id).collect(),
            PairPool::AgreeSubsetAndConflict => {
                let conflict = of_kind(true);
                let mut ids = agree_subset(&of_kind(false), conflict.len(), seed);
                ids.extend(conflict);
                ids.sort_unstable();
                ids
            }
        }
    }
}

/// Which adapter parameters a stage trains; the rest are frozen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Trainable {
    /// psi: the shared block.
    Shared,
    /// phi_1..phi_k: the dimension blocks.
    Dimensions,
    All,
}

impl Trainable {
    /// Sets which adapter tensors of `model` receive gradients; returns the trainable ones with
    /// their names.
    pub fn apply(self, model: &CausalLm) -> Vec<(String, Tensor)> {
        let shared_on = matches!(self, Trainable::Shared | Trainable::All);
        let dimensions_on = matches!(self, Trainable::Dimensions | Trainable::All);
        let mut params = Vec::new();
        for (module, projection) in model.projections() {
            let adapter = projection
                .adapter
                .as_ref()
                .expect("training needs adapters");
            for (group, pair) in adapter.groups() {
                let on = if group == "shared" {
                    shared_on
                } else {
                    dimensions_on
                };
                let singular = pair.singular.as_ref().map(|s| ("e", &s.values));
                for (part, tensor) in [("a", &pair.a), ("b", &pair.b)].into_iter().chain(singular) {
                    let _ = tensor.shallow_clone().set_requires_grad(on);
                    if on {
                        params.push((format!("{module}.{group}_{part}"), tensor.shallow_clone()));
                    }
                }
            }
        }
        params
    }
}

/// The passes of a step at fixed weights, each with its DPO loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum UnitPasses {
    /// One pass at w = 0 (shared block only): DPO on the preference every dimension shares.
    Shared,
    /// k passes at w = 1_i: sum_i L_DPO,i (pass i moves only h_0 and h_i).
    PerDimension,
}

/// The loss of the extra pass at a drawn w ~ Dirichlet(1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum DrawnLoss {
    /// Bernoulli KL to the teacher built from the unit passes' detached margins (curriculum
    /// stage 3, METHOD.md section 3).
    BernoulliKl,
    /// Linear scalarisation L_LS(w) (Panacea).
    LinearScalarisation,
}

impl DrawnLoss {
    /// The loss of each row at its drawn weights `w` [B, k]: `drawn_margin` is
    /// u(y_a; w) - u(y_b; w) [B] of the drawn pass, `unit_margins` the k detached margins at
    /// w = 1_i ([B] each), `preferences` [B, k] in {-1, 0, +1}. Returns [B].
    pub fn per_row(
        self,
        drawn_margin: &Tensor,
        unit_margins: &[Tensor],
        preferences: &Tensor,
        w: &Tensor,
        beta: f64,
    ) -> Tensor {
        match self {
            DrawnLoss::BernoulliKl => {
                let teacher = loss::teacher_logit(&Tensor::stack(unit_margins, 1), w, beta);
                loss::bernoulli_kl(&teacher, &(drawn_margin * beta))
            }
            DrawnLoss::LinearScalarisation => {
                loss::linear_scalarisation(drawn_margin, preferences, w, beta)
            }
        }
    }
}

/// The passes of one step and the loss each contributes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct StepPlan {
    pub unit: UnitPasses,
    /// The pass at drawn weights, after the unit passes, if the stage has one.
    pub drawn: Option<DrawnLoss>,
}

impl StepPlan {
    /// Passes per step for k dimensions.
    pub fn passes(self, k: usize) -> usize {
        let unit = match self.unit {
            UnitPasses::Shared => 1,
            UnitPasses::PerDimension => k,
        };
        unit + usize::from(self.drawn.is_some())
    }

    /// Whether the last pass uses a drawn weight vector.
    pub fn draws_weights(self) -> bool {
        self.drawn.is_some()
    }
}

/// One stage of a method.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Stage {
    /// 1-based, as in the paper.
    pub number: usize,
    pub name: &'static str,
    pub pool: PairPool,
    pub trainable: Trainable,
    pub step: StepPlan,
}

/// The stages of a method, in order.
pub fn stages(method: MethodName) -> Vec<Stage> {
    match method {
        MethodName::Curriculum => vec![
            Stage {
                number: 1,
                name: "general",
                pool: PairPool::Agree,
                trainable: Trainable::Shared,
                step: StepPlan {
                    unit: UnitPasses::Shared,
                    drawn: None,
                },
            },
            Stage {
                number: 2,
                name: "dimension-specific",
                pool: PairPool::Conflict,
                trainable: Trainable::Dimensions,
                step: StepPlan {
                    unit: UnitPasses::PerDimension,
                    drawn: None,
                },
            },
            Stage {
                number: 3,
                name: "conditioned",
                pool: PairPool::AgreeSubsetAndConflict,
                trainable: Trainable::All,
                step: StepPlan {
                    unit: UnitPasses::PerDimension,
                    drawn: Some(DrawnLoss::BernoulliKl),
                },
            },
        ],
        MethodName::Panacea | MethodName::PanaceaLora => vec![Stage {
            number: 1,
            name: "panacea",
            pool: PairPool::All,
            trainable: Trainable::All,
            step: StepPlan {
                unit: UnitPasses::PerDimension,
                drawn: Some(DrawnLoss::LinearScalarisation),
            },
        }],
        // The adapters have no shared block, so `All` is phi_1..phi_k and pass i moves phi_i
        // alone: k independent DPO runs sharing batches. A pair trains adapter i only where
        // dimension i has a preference (the others are masked).
        MethodName::DpoSoup => vec![Stage {
            number: 1,
            name: "dpo-soup",
            pool: PairPool::All,
            trainable: Trainable::All,
            step: StepPlan {
                unit: UnitPasses::PerDimension,
                drawn: None,
            },
        }],
    }
}

#[cfg(test)]
mod tests;
