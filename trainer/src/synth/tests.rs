//! Every scenario's stated structure, checked on generated pairs for every k it allows.

use super::*;

fn spec(scenario: Scenario, k: usize, seed: u64) -> SynthSpec {
    SynthSpec {
        scenario,
        dimensions: k,
        pairs: 600,
        eval_pairs: 20,
        conflict_rate: scenario.default_conflict_rate(),
        seed,
    }
}

fn differences(p: &SynthPair) -> Vec<f64> {
    p.scores_a
        .iter()
        .zip(&p.scores_b)
        .map(|(a, b)| a - b)
        .collect()
}

fn words(text: &str) -> usize {
    text.split_whitespace().count()
}

#[test]
fn every_scenario_has_the_asked_conflicts_and_no_all_ties() {
    for scenario in Scenario::ALL {
        for k in 2..=scenario.dimension_names().len() {
            let (train, eval) = generate(&spec(scenario, k, 1)).unwrap();
            let conflicts = train.iter().filter(|p| p.conflict).count();
            let expected = (scenario.default_conflict_rate() * 600.0).round() as usize;
            assert_eq!(conflicts, expected, "{scenario:?} k {k}");
            for p in train.iter().chain(&eval) {
                assert_eq!(p.scores_a, score(scenario, &p.response_a, k));
                assert_eq!(p.scores_a.len(), k);
                assert_eq!(
                    pair_kind(&p.scores_a, &p.scores_b),
                    Some(kind_of(p.conflict)),
                    "{p:?}"
                );
            }
            let a_first = train.iter().filter(|p| p.scores_a > p.scores_b).count();
            assert!(
                (200..=400).contains(&a_first),
                "{scenario:?} k {k}: {a_first}"
            );
        }
    }
}

#[test]
fn independent_dimension_zero_decides_every_pair() {
    for k in 2..=4 {
        let (train, _) = generate(&spec(Scenario::Independent, k, 2)).unwrap();
        for p in &train {
            assert_eq!(words(&p.response_a), independent::WORDS_PER_RESPONSE);
            let d = differences(p);
            assert_ne!(d[0], 0.0, "{p:?}");
            let against = d[1..].iter().any(|&x| x * d[0] < 0.0);
            assert_eq!(against, p.conflict, "{p:?}");
        }
    }
}

#[test]
fn easy_hard_dimension_zero_alone_separates_most_agree_pairs() {
    for k in 2..=5 {
        let (train, _) = generate(&spec(Scenario::EasyHard, k, 3)).unwrap();
        let mut easy_only = 0;
        let mut agree = 0;
        for p in &train {
            assert_eq!(words(&p.response_a), easy_hard::WORDS_PER_RESPONSE);
            let d = differences(p);
            // Exactly one response holds the salient word.
            assert_eq!(d[0].abs(), 1.0, "{p:?}");
            // Graded dimensions differ by at most their range.
            assert!(d[1..]
                .iter()
                .all(|x| x.abs() <= easy_hard::MAX_GRADED as f64));
            if p.conflict {
                assert!(d[1..].iter().any(|&x| x * d[0] < 0.0), "{p:?}");
            } else {
                agree += 1;
                easy_only += usize::from(d[1..].iter().all(|&x| x == 0.0));
            }
        }
        // 70% of agree pairs tie on every graded dimension (binomial sd about 2%).
        let share = easy_only as f64 / agree as f64;
        assert!((0.62..0.78).contains(&share), "k {k}: {share}");
    }
}

#[test]
fn interference_contested_words_score_opposite_signs() {
    // "bluntly" is +1 candid, -1 tactful; "softly" +1 tactful, -1 candid (k = 2), and with
    // k = 3 "softly" is -1 playful instead and "lol" -1 candid.
    assert_eq!(interference::score("bluntly we can", 2), [1.0, -1.0]);
    assert_eq!(interference::score("softly softly frankly", 2), [-1.0, 2.0]);
    assert_eq!(interference::score("softly lol", 3), [-1.0, 1.0, 0.0]);
    for k in 2..=5 {
        let (train, _) = generate(&spec(Scenario::Interference, k, 4)).unwrap();
        let contested = train
            .iter()
            .filter(|p| {
                let text = format!("{} {}", p.response_a, p.response_b);
                interference::CONTESTED[..k]
                    .iter()
                    .any(|w| count(&text, w) > 0)
            })
            .count();
        assert!(contested > 500, "k {k}: {contested}");
        assert!(train
            .iter()
            .all(|p| words(&p.response_a) == interference::WORDS_PER_RESPONSE));
    }
}

/// Pearson correlation of two equally long samples.
fn correlation(x: &[f64], y: &[f64]) -> f64 {
    let n = x.len() as f64;
    let (mx, my) = (x.iter().sum::<f64>() / n, y.iter().sum::<f64>() / n);
    let cov: f64 = x.iter().zip(y).map(|(a, b)| (a - mx) * (b - my)).sum();
    let vx: f64 = x.iter().map(|a| (a - mx).powi(2)).sum();
    let vy: f64 = y.iter().map(|b| (b - my).powi(2)).sum();
    cov / (vx * vy).sqrt()
}

#[test]
fn length_bias_only_dimension_zero_follows_length() {
    for k in 2..=5 {
        let (train, _) = generate(&spec(Scenario::LengthBias, k, 5)).unwrap();
        let length: Vec<f64> = train.iter().map(|p| words(&p.response_a) as f64).collect();
        let dim = |i: usize| -> Vec<f64> { train.iter().map(|p| p.scores_a[i]).collect() };
        // The mechanism: a response is its base plus one word per detail word.
        for p in &train {
            for (text, scores) in [(&p.response_a, &p.scores_a), (&p.response_b, &p.scores_b)] {
                let base = words(text) - scores[0] as usize;
                assert!(length_bias::BASE_WORDS.contains(&base), "{text}");
            }
        }
        // Length = base (8..=9, uniform) + detail words (0..=4): corr about 0.9 for the
        // detail count. A marker replaces a filler, so only the choice of agree pairs (a
        // dominating response tends to hold more of everything) ties it to length: for
        // k = 5 about 0.2.
        let detailed = correlation(&dim(0), &length);
        assert!(detailed > 0.8, "k {k}: {detailed}");
        for i in 1..k {
            let other = correlation(&dim(i), &length);
            assert!(other.abs() < 0.3, "k {k} dimension {i}: {other}");
        }
    }
}

#[test]
fn same_seed_same_pairs_other_seed_other_pairs() {
    for scenario in Scenario::ALL {
        let one = generate(&spec(scenario, 2, 7)).unwrap();
        assert_eq!(one, generate(&spec(scenario, 2, 7)).unwrap());
        assert_ne!(one.0, generate(&spec(scenario, 2, 8)).unwrap().0);
    }
}

#[test]
fn scenario_names_parse_and_bad_dimensions_are_refused() {
    for scenario in Scenario::ALL {
        assert_eq!(scenario.name().parse::<Scenario>().unwrap(), scenario);
    }
    let err = "mixed".parse::<Scenario>().unwrap_err().to_string();
    assert!(err.contains("easy-hard"), "{err}");
    let err = generate(&spec(Scenario::Independent, 5, 0))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("--dimensions") && err.contains("independent"),
        "{err}"
    );
    let err = generate(&spec(Scenario::EasyHard, 6, 0))
        .unwrap_err()
        .to_string();
    assert!(err.contains("--dimensions"), "{err}");
}
