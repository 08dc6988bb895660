//! The synthetic benchmark (`modpo_trainer::synth`) has the structure its documentation
//! states: the requested share of conflict pairs, agree pairs separated by dimension 0 alone,
//! scores that are the marker counts of the texts, the same files from the same seed, and a
//! file the generic reader accepts with the agree / conflict split the generator intended.

use modpo_trainer::data::{self, DataConfig, DataFormat, PairKind};
use modpo_trainer::synth::{self, generate, score, SynthSpec};
use modpo_trainer::tokenizer::ChatTokenizer;

fn spec(dimensions: usize, conflict_rate: f64, seed: u64) -> SynthSpec {
    SynthSpec {
        dimensions,
        pairs: 1000,
        eval_pairs: 200,
        conflict_rate,
        seed,
    }
}

fn sign(x: f64) -> i32 {
    (x > 0.0) as i32 - (x < 0.0) as i32
}

#[test]
fn conflict_rate_and_easy_dimension() {
    for (k, rate) in [(2, 0.25), (3, 0.1), (4, 0.5)] {
        let (train, eval) = generate(&spec(k, rate, 3)).unwrap();
        for (pairs, n) in [(&train, 1000.0), (&eval, 200.0)] {
            let conflicts = pairs
                .iter()
                .filter(|p| {
                    let d: Vec<f64> = p
                        .scores_a
                        .iter()
                        .zip(&p.scores_b)
                        .map(|(a, b)| a - b)
                        .collect();
                    d.iter().any(|&x| x > 0.0) && d.iter().any(|&x| x < 0.0)
                })
                .count();
            let measured = conflicts as f64 / n;
            assert!(
                (measured - rate).abs() <= 0.01,
                "k {k}: rate {measured} vs {rate}"
            );
            for p in pairs.iter() {
                assert_eq!(score(&p.response_a, k), p.scores_a);
                assert_eq!(score(&p.response_b, k), p.scores_b);
                let d: Vec<f64> = p
                    .scores_a
                    .iter()
                    .zip(&p.scores_b)
                    .map(|(a, b)| a - b)
                    .collect();
                // Dimension 0 always states a preference.
                assert_ne!(d[0], 0.0, "{p:?}");
                if p.conflict {
                    // Some other dimension prefers the other response.
                    assert!(d[1..].iter().any(|&x| sign(x) == -sign(d[0])), "{p:?}");
                } else {
                    // Dimension 0 alone separates an agree pair: no dimension disagrees.
                    assert!(
                        d.iter().all(|&x| x == 0.0 || sign(x) == sign(d[0])),
                        "{p:?}"
                    );
                }
            }
        }
        // Both positions hold the better response about equally often.
        let a_better = train
            .iter()
            .filter(|p| p.scores_a[0] > p.scores_b[0])
            .count();
        assert!((400..=600).contains(&a_better), "{a_better}");
        // Train and eval prompts are distinct.
        assert!(train
            .iter()
            .all(|t| eval.iter().all(|e| e.prompt != t.prompt)));
    }
}

#[test]
fn same_seed_same_data_other_seed_other_data() {
    assert_eq!(
        generate(&spec(2, 0.25, 7)).unwrap(),
        generate(&spec(2, 0.25, 7)).unwrap()
    );
    assert_ne!(
        generate(&spec(2, 0.25, 7)).unwrap().0,
        generate(&spec(2, 0.25, 8)).unwrap().0
    );
    // Written files are byte for byte the same too.
    let (one, two) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    synth::write(one.path(), &spec(3, 0.2, 5)).unwrap();
    synth::write(two.path(), &spec(3, 0.2, 5)).unwrap();
    for name in [
        "train.jsonl",
        "eval.jsonl",
        "model/model.safetensors",
        "model/config.json",
    ] {
        assert_eq!(
            std::fs::read(one.path().join(name)).unwrap(),
            std::fs::read(two.path().join(name)).unwrap(),
            "{name}"
        );
    }
    // Nothing is overwritten.
    let err = synth::write(one.path(), &spec(3, 0.2, 6))
        .unwrap_err()
        .to_string();
    assert!(err.contains("already exists"), "{err}");
}

#[test]
fn bad_specs_are_refused() {
    for (bad, key) in [
        (spec(1, 0.25, 0), "--dimensions"),
        (spec(5, 0.25, 0), "--dimensions"),
        (spec(2, 0.0, 0), "--conflict-rate"),
        (spec(2, 1.0, 0), "--conflict-rate"),
    ] {
        let err = generate(&bad).unwrap_err().to_string();
        assert!(err.contains(key), "{err}");
    }
}

#[test]
fn generic_reader_accepts_the_files() {
    let dir = tempfile::tempdir().unwrap();
    let spec = spec(3, 0.3, 1);
    let files = synth::write(dir.path(), &spec).unwrap();
    let config = DataConfig {
        format: DataFormat::Generic,
        train_file: files.train_file.clone(),
        eval_file: Some(files.eval_file.clone()),
        dimensions: Some(files.dimensions.clone()),
        eval_fraction: None,
        max_length: 128,
        min_prompt_tokens: None,
        seed: 0,
        cache_dir: None,
        global_batch: 8,
        micro_batch: 8,
        accumulation: None,
    };
    config.validate().unwrap();
    let tokenizer = ChatTokenizer::from_model_dir(&files.model_dir, None).unwrap();
    let loaded = data::load(&config, &tokenizer).unwrap();
    assert_eq!(loaded.dimensions, ["polite", "formal", "cheerful"]);
    assert_eq!(loaded.train.pairs.len(), spec.pairs);
    assert_eq!(loaded.eval.pairs.len(), spec.eval_pairs);
    assert_eq!(loaded.eval_dropped_shared_prompt, 0);
    assert_eq!(loaded.train.conflict().len(), files.train_conflicts);
    assert_eq!(loaded.eval.conflict().len(), files.eval_conflicts);
    assert_eq!(files.train_conflicts, 300);
    // Nothing is cut at max_length = 128 (the demo's setting).
    assert_eq!(loaded.train.truncated().2, 0);
    assert_eq!(loaded.eval.truncated().2, 0);
    let (train, _) = generate(&spec).unwrap();
    for (p, t) in loaded.train.pairs.iter().zip(&train) {
        assert_eq!(p.kind == PairKind::Conflict, t.conflict);
    }
}
