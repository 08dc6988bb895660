//! The synthetic benchmark's files (`modpo_trainer::synth`; the structure of each scenario is
//! checked by its unit tests): the same files from the same seed, nothing overwritten, bad
//! specs refused, and files of every scenario that the generic reader accepts whole, with the
//! agree / conflict split the generator intended.

use modpo_trainer::data::{self, DataConfig, DataFormat, PairKind};
use modpo_trainer::synth::{self, generate, Scenario, SynthSpec};
use modpo_trainer::tokenizer::ChatTokenizer;

fn spec(dimensions: usize, conflict_rate: f64, seed: u64) -> SynthSpec {
    SynthSpec {
        scenario: Scenario::Independent,
        dimensions,
        pairs: 1000,
        eval_pairs: 200,
        conflict_rate,
        seed,
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
        (
            SynthSpec {
                scenario: Scenario::EasyHard,
                ..spec(6, 0.25, 0)
            },
            "--dimensions",
        ),
        (spec(2, 0.0, 0), "--conflict-rate"),
        (spec(2, 1.0, 0), "--conflict-rate"),
    ] {
        let err = generate(&bad).unwrap_err().to_string();
        assert!(err.contains(key), "{err}");
    }
}

#[test]
fn generic_reader_accepts_every_scenario_whole() {
    for scenario in Scenario::ALL {
        let dir = tempfile::tempdir().unwrap();
        let k = scenario.dimension_names().len();
        let spec = SynthSpec {
            scenario,
            dimensions: k,
            conflict_rate: 0.3,
            ..spec(k, 0.3, 1)
        };
        let files = synth::write(dir.path(), &spec).unwrap();
        let config = DataConfig {
            format: DataFormat::Generic,
            train_file: files.train_file.clone(),
            eval_file: Some(files.eval_file.clone()),
            dimensions: Some(files.dimensions.clone()),
            eval_fraction: None,
            max_length: 160,
            min_prompt_tokens: None,
            seed: 0,
            cache_dir: None,
            global_batch: 8,
            micro_batch: 8,
            accumulation: None,
            reference_chunk_pairs: None,
        };
        config.validate().unwrap();
        let tokenizer = ChatTokenizer::from_model_dir(&files.model_dir, None).unwrap();
        let loaded = data::load(&config, &tokenizer).unwrap();
        assert_eq!(loaded.dimensions, scenario.dimension_names());
        assert_eq!(loaded.train.pairs.len(), spec.pairs);
        assert_eq!(loaded.eval.pairs.len(), spec.eval_pairs);
        assert_eq!(loaded.eval_dropped_shared_prompt, 0);
        assert_eq!(loaded.train.conflict().len(), files.train_conflicts);
        assert_eq!(loaded.eval.conflict().len(), files.eval_conflicts);
        assert_eq!(files.train_conflicts, 300);
        // Nothing is cut at max_length = 160 (the demo's setting), even at the largest k.
        assert_eq!(loaded.train.truncated().2, 0, "{scenario:?}");
        assert_eq!(loaded.eval.truncated().2, 0, "{scenario:?}");
        let (train, _) = generate(&spec).unwrap();
        for (p, t) in loaded.train.pairs.iter().zip(&train) {
            assert_eq!(p.kind == PairKind::Conflict, t.conflict);
        }
    }
}
