//! The benchmark's cases: which method and stage each times, with which optimisations switched
//! off, and the figures measured for each.

use serde::{Deserialize, Serialize};

use super::Preset;
use crate::method::MethodName;

/// What one case switches off, relative to how training runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Variant {
    pub reference_cache: bool,
    pub joint_responses: bool,
    pub batched_passes: bool,
    pub stacked_lora: bool,
    pub length_bucketing: bool,
    pub frozen_base: bool,
    pub recompute_activations: bool,
    pub shared_prompt: bool,
}

impl Variant {
    /// How `train` runs on the preset's device (recomputation is an option, off by default):
    /// the k + 1 passes batched on the GPU, one by one on the CPU, as
    /// `MethodConfig::batch_passes_on` decides when the config does not say.
    pub fn training(preset: Preset) -> Variant {
        Variant {
            reference_cache: true,
            joint_responses: true,
            batched_passes: preset == Preset::Llama3_8b,
            stacked_lora: true,
            length_bucketing: true,
            frozen_base: true,
            recompute_activations: false,
            shared_prompt: true,
        }
    }
}

/// One timed configuration.
#[derive(Debug, Clone)]
pub(super) struct Case {
    pub name: String,
    pub method: MethodName,
    /// 1-based stage of the method.
    pub stage: usize,
    pub variant: Variant,
}

impl Case {
    pub fn new(name: &str, method: MethodName, stage: usize, preset: Preset) -> Self {
        Case {
            name: name.to_string(),
            method,
            stage,
            variant: Variant::training(preset),
        }
    }

    pub fn with(mut self, name: &str, change: impl FnOnce(&mut Variant)) -> Self {
        self.name = name.to_string();
        change(&mut self.variant);
        self
    }
}

/// The measured figures of one case.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CaseResult {
    pub name: String,
    pub method: MethodName,
    pub stage: usize,
    pub variant: Variant,
    pub micro_batch: usize,
    /// Per timed step, milliseconds.
    pub ms_per_step: Vec<f64>,
    /// Real tokens through the policy (rows x passes) per timed step, on average.
    pub policy_tokens_per_step: f64,
    /// Model FLOPs per timed step, on average.
    pub flops_per_step: f64,
    /// The rates below are per median step (one slow step does not move them), filled in by
    /// [`CaseResult::fill_rates`].
    pub median_ms: f64,
    pub pairs_per_s: f64,
    pub policy_tokens_per_s: f64,
    /// FLOPs per second over the benchmark's dense matmul rate: the best of the rates
    /// measured during the run (one rate for every case, so MFU and throughput rank cases
    /// alike, and the MFU is not flattered by a measurement taken in a slow moment).
    pub mfu: f64,
    /// The dense matmul rate this case's process measured before it, FLOP/s.
    pub matmul_rate: f64,
    /// Peak resident set (CPU) or device memory in use (GPU), bytes.
    pub peak_memory_bytes: Option<u64>,
    /// The memory planner's prediction of that peak (`plan`), at the case's largest batch;
    /// None for the variants it does not model.
    #[serde(default)]
    pub predicted_peak_bytes: Option<u64>,
}

impl CaseResult {
    /// Median step time and the rates per median step, MFU against `matmul_rate` (FLOP/s).
    pub(crate) fn fill_rates(&mut self, matmul_rate: f64) {
        self.median_ms = median(&self.ms_per_step);
        let median_s = self.median_ms / 1e3;
        self.pairs_per_s = self.micro_batch as f64 / median_s;
        self.policy_tokens_per_s = self.policy_tokens_per_step / median_s;
        self.mfu = self.flops_per_step / median_s / matmul_rate;
    }
}

/// Median of a non-empty list.
pub(super) fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
    }
}

/// The cases of the preset: every stage and method, then (optionally) stage 3 with each
/// optimisation switched off.
pub(super) fn cases(preset: Preset, ablations: bool) -> Vec<Case> {
    let mut cases = vec![
        Case::new("curriculum stage 1", MethodName::Curriculum, 1, preset),
        Case::new("curriculum stage 2", MethodName::Curriculum, 2, preset),
        Case::new("curriculum stage 3", MethodName::Curriculum, 3, preset),
    ];
    if preset == Preset::Cpu {
        cases.push(Case::new("panacea", MethodName::Panacea, 1, preset));
        cases.push(Case::new(
            "panacea-lora",
            MethodName::PanaceaLora,
            1,
            preset,
        ));
        cases.push(Case::new("dpo-soup", MethodName::DpoSoup, 1, preset));
    }
    if preset == Preset::Llama3_8b {
        let stage3 = Case::new("", MethodName::Curriculum, 3, preset);
        cases.push(stage3.with("stage 3, recomputation", |v| v.recompute_activations = true));
    }
    if ablations {
        let stage1 = Case::new("", MethodName::Curriculum, 1, preset);
        cases.push(stage1.clone().with("stage 1, reference every step", |v| {
            v.reference_cache = false
        }));
        cases.push(stage1.with("stage 1, a row per response", |v| v.shared_prompt = false));
        let stage3 = Case::new("", MethodName::Curriculum, 3, preset);
        for (name, off) in [
            (
                "reference every step",
                (|v: &mut Variant| v.reference_cache = false) as fn(&mut Variant),
            ),
            ("a row per response", |v| v.shared_prompt = false),
            ("a row per response, in two forwards", |v| {
                v.shared_prompt = false;
                v.joint_responses = false
            }),
            ("LoRA GEMMs per block", |v| v.stacked_lora = false),
            ("no length bucketing", |v| v.length_bucketing = false),
            ("gradients for the base", |v| v.frozen_base = false),
            ("activation recomputation", |v| {
                v.recompute_activations = true
            }),
        ] {
            cases.push(stage3.clone().with(&format!("stage 3, {name}"), off));
        }
        // The other way of running the k + 1 passes than the device's default.
        let passes = match Variant::training(preset).batched_passes {
            true => "stage 3, k + 1 passes one by one",
            false => "stage 3, k + 1 passes batched",
        };
        cases.push(
            stage3
                .clone()
                .with(passes, |v| v.batched_passes = !v.batched_passes),
        );
        let naive = stage3.with("stage 3, all of them off", |v| {
            *v = Variant {
                reference_cache: false,
                joint_responses: false,
                batched_passes: false,
                stacked_lora: false,
                length_bucketing: false,
                frozen_base: false,
                recompute_activations: false,
                shared_prompt: false,
            }
        });
        cases.push(naive);
    }
    cases
}

/// The two cases of the micro-batch search: stage 3 without and with recomputation.
pub(super) fn search_cases(preset: Preset) -> [Case; 2] {
    let stage3 = Case::new("", MethodName::Curriculum, 3, preset);
    [
        stage3.clone().with("micro-batch search", |_| {}),
        stage3.with("micro-batch search, recomputation", |v| {
            v.recompute_activations = true
        }),
    ]
}

/// Every case a child process may be asked to time.
pub(super) fn all_cases(preset: Preset, ablations: bool) -> Vec<Case> {
    let mut all = cases(preset, ablations);
    all.extend(search_cases(preset));
    all
}
