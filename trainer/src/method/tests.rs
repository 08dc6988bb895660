use super::*;

#[test]
fn curriculum_has_the_papers_three_stages() {
    let s = stages(MethodName::Curriculum);
    assert_eq!(
        s.iter().map(|s| s.trainable).collect::<Vec<_>>(),
        [Trainable::Shared, Trainable::Dimensions, Trainable::All]
    );
    assert_eq!(s[2].step.passes(5), 6);
    assert!(s[2].step.draws_weights() && !s[1].step.draws_weights());
}

#[test]
fn soup_has_no_shared_block_and_bigger_rank() {
    let config: MethodConfig = toml::from_str("name = \"dpo-soup\"").unwrap();
    let spec = config.adapter_spec(2);
    assert_eq!((spec.rank, spec.alpha, spec.shared), (16, 32.0, false));
    let config: MethodConfig = toml::from_str("name = \"curriculum\"\nrank = 4").unwrap();
    assert_eq!(config.adapter_spec(2).rank, 4);
}

#[test]
fn invalid_values_name_the_key() {
    let bad = |text: &str| {
        toml::from_str::<MethodConfig>(text)
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string()
    };
    assert!(bad("name = \"panacea\"\nbeta = 0").contains("method.beta"));
    assert!(bad("name = \"panacea\"\nrank = 0").contains("method.rank"));
    assert!(toml::from_str::<MethodConfig>("name = \"soup\"").is_err());
    // The AdaLoRA keys: panacea only, within PEFT's ranges.
    let message = bad("name = \"curriculum\"\ninit_rank = 12");
    assert!(message.contains("method.init_rank") && message.contains("panacea"));
    assert!(
        bad("name = \"panacea-lora\"\north_reg_weight = 0.5").contains("method.orth_reg_weight")
    );
    assert!(bad("name = \"panacea\"\nrank = 16").contains("method.rank"));
    assert!(bad("name = \"panacea\"\nbeta1 = 1.0").contains("method.beta1"));
    assert!(bad("name = \"panacea\"\ndelta_t = 0").contains("method.delta_t"));
    assert!(bad("name = \"panacea\"\north_reg_weight = -1.0").contains("method.orth_reg_weight"));
    // The length correction: alpha with r-dpo only, and r-dpo needs it.
    let r_dpo = "name = \"curriculum\"\nlength_correction = \"r-dpo\"";
    assert!(bad(r_dpo).contains("method.length_alpha is required"));
    assert!(bad(&format!("{r_dpo}\nlength_alpha = -0.1")).contains("must be a number >= 0"));
    assert!(
        bad("name = \"curriculum\"\nlength_correction = \"per-token\"\nlength_alpha = 0.1")
            .contains("method.length_alpha applies only")
    );
    let config: MethodConfig = toml::from_str(&format!("{r_dpo}\nlength_alpha = 0.02")).unwrap();
    config.validate().unwrap();
    assert_eq!(
        config.length_correction(),
        loss::LengthCorrection::RDpo { alpha: 0.02 }
    );
    assert!(
        toml::from_str::<MethodConfig>("name = \"curriculum\"\nlength_correction = \"simpo\"")
            .is_err()
    );
}

#[test]
fn panacea_is_the_papers_adalora_and_panacea_lora_the_curriculums_lora() {
    let panacea: MethodConfig = toml::from_str("name = \"panacea\"").unwrap();
    let spec = panacea.adapter_spec(2);
    assert_eq!(
        (spec.kind, spec.rank, spec.alpha, spec.shared),
        (AdapterKind::AdaLora, 12, 512.0, true)
    );
    let training = panacea.adalora(100).unwrap();
    assert_eq!(training.orth_reg_weight, 0.5);
    let s = training.schedule;
    assert_eq!(
        (s.init_rank, s.target_rank, s.tinit, s.tfinal, s.delta_t),
        (12, 8, 0, 0, 1)
    );
    assert_eq!((s.beta1, s.beta2, s.total_step), (0.85, 0.85, 100));
    let lora: MethodConfig = toml::from_str("name = \"panacea-lora\"").unwrap();
    let spec = lora.adapter_spec(2);
    assert_eq!(
        (spec.kind, spec.rank, spec.alpha),
        (AdapterKind::Lora, 8, 16.0)
    );
    assert!(lora.adalora(100).is_none());
    assert_eq!(
        stages(MethodName::Panacea)[0].step,
        stages(MethodName::PanaceaLora)[0].step
    );
}

/// Dirichlet(1) draws: every row on the simplex; over many draws each dimension's mean is
/// 1/k (standard error sqrt((k-1)/(k^2 (k+1) n)) < 0.002 at n = 20000, so 0.01 is five of
/// them); per-step mode repeats one w over the batch, and the draw depends only on
/// (seed, stage, step).
#[test]
fn weight_draws_are_uniform_on_the_simplex() {
    for k in 2..=5 {
        let draws = WeightSampling::PerRow.draw(7, 3, 0, 20_000, k);
        let mut mean = vec![0f64; k];
        for w in &draws {
            assert_eq!(w.len(), k);
            assert!(w.iter().all(|x| *x >= 0.0));
            let sum: f32 = w.iter().sum();
            assert!((sum - 1.0).abs() < 1e-5, "{w:?} sums to {sum}");
            for (m, x) in mean.iter_mut().zip(w) {
                *m += f64::from(*x) / draws.len() as f64;
            }
        }
        for m in &mean {
            assert!((m - 1.0 / k as f64).abs() < 0.01, "k = {k}: means {mean:?}");
        }
    }
    let step = WeightSampling::PerStep.draw(7, 3, 4, 16, 3);
    assert!(step.iter().all(|w| w == &step[0]), "one w per step");
    assert_ne!(step[0], WeightSampling::PerStep.draw(7, 3, 5, 16, 3)[0]);
    assert_eq!(step, WeightSampling::PerStep.draw(7, 3, 4, 16, 3), "seeded");
    let rows = WeightSampling::PerRow.draw(7, 3, 4, 16, 3);
    assert_ne!(rows[0], rows[1], "one w per pair");
}

/// PEFT's cubic budget schedule (`RankAllocator.budget_schedule`), by hand for init 168,
/// target 112, T = 6: step 0 <= tinit keeps all; step t: int(56 (1 - t/6)^3 + 112).
#[test]
fn budget_schedule_is_pefts() {
    let schedule = AllocationSchedule {
        init_rank: 12,
        target_rank: 8,
        tinit: 0,
        tfinal: 0,
        delta_t: 1,
        beta1: 0.85,
        beta2: 0.85,
        total_step: 6,
    };
    let budgets: Vec<(i64, bool)> = (0..6).map(|t| schedule.budget(t, 168, 112)).collect();
    // 56 (5/6)^3 = 32.4, (4/6)^3 -> 16.6, (3/6)^3 -> 7, (2/6)^3 -> 2.07, (1/6)^3 -> 0.26
    assert_eq!(
        budgets,
        [
            (168, false),
            (144, true),
            (128, true),
            (119, true),
            (114, true),
            (112, true)
        ]
    );
    let late = AllocationSchedule {
        tinit: 5,
        tfinal: 1,
        ..schedule
    };
    assert!(late.validate().is_err(), "no budgeting phase");
}
