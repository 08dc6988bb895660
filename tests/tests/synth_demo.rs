//! `modpo-trainer demo` end to end on a small budget: synthetic data, the four methods over two
//! seeds, the per-seed evaluations with intervals and plots, the tables across seeds; then a
//! second demo into the same directory is refused, and with `force` the first is moved aside,
//! not lost.

use modpo_trainer::synth::demo::{run, Compute, DemoOptions, ScenarioChoice, SeedOutputs, METHODS};
use modpo_trainer::synth::Scenario;

/// One seed of the first demo: runs, labels, compute, its config and its evaluation.
fn check_seed(seed: &SeedOutputs, i: usize) {
    assert_eq!(seed.seed, i as u64);
    assert_eq!(seed.runs.len(), METHODS.len());
    for run in &seed.runs {
        assert!(
            run.join("adapters.safetensors").is_file(),
            "{}",
            run.display()
        );
    }
    let labels: Vec<&str> = seed
        .comparison
        .runs
        .iter()
        .map(|r| r.label.as_str())
        .collect();
    assert_eq!(labels, METHODS);
    // Equal compute: a budget of 400 x 3 pair-passes gives every stage more than two
    // steps, so max_steps = 2 caps each: the curriculum's three stages take 1, 2 and 3
    // passes per step of 16 pairs (2 x 16 x 6 = 192), Panacea's one stage k + 1 = 3,
    // DPO-Soup's k = 2.
    let compute: Vec<(&str, usize, usize)> = seed
        .compute
        .iter()
        .map(|c| (c.method.as_str(), c.steps, c.pair_passes))
        .collect();
    assert_eq!(
        compute,
        [
            ("curriculum", 6, 192),
            ("panacea", 2, 96),
            ("panacea-lora", 2, 96),
            ("dpo-soup", 2, 64)
        ]
    );
    let config = std::fs::read_to_string(&seed.configs[0]).unwrap();
    assert!(config.contains("pair_passes = 1200"), "{config}");
    assert!(config.contains(&format!("seed = {i}")), "{config}");
    assert_eq!(
        seed.comparison.settings.len(),
        5,
        "k = 2: the five grid points"
    );
    assert_eq!(seed.comparison.conflict_pairs, seed.synth.eval_conflicts);
    for results in &seed.comparison.results {
        for r in results {
            assert!(r.accuracy.counted > 0);
            let [low, high] = r.accuracy.interval.expect("bootstrap interval");
            let a = r.accuracy.accuracy.unwrap();
            assert!(low <= a && a <= high);
        }
    }
    assert!(std::fs::read(&seed.written.plots[0])
        .unwrap()
        .starts_with(b"\x89PNG"));
}

#[test]
fn small_demo_runs_end_to_end_and_never_overwrites() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("demo");
    let options = DemoOptions {
        out: out.clone(),
        force: false,
        pairs: Some(400),
        max_steps: Some(2),
        config: None,
        scenario: None,
        seeds: Some(2),
        compute: None,
    };
    let outputs = run(&options).unwrap();
    assert_eq!(outputs.scenarios.len(), 1);
    let scenario = &outputs.scenarios[0];
    assert_eq!(
        scenario.scenario,
        Scenario::EasyHard,
        "the embedded default"
    );
    assert_eq!(scenario.seeds.len(), 2);
    for (i, seed) in scenario.seeds.iter().enumerate() {
        assert_eq!(seed.dir, outputs.out.join(format!("easy-hard/seed-{i}")));
        check_seed(seed, i);
    }
    // The seeds differ in their data.
    let [one, two] = [0, 1].map(|i| std::fs::read(&scenario.seeds[i].synth.train_file).unwrap());
    assert_ne!(one, two);
    // The tables across seeds: every method per seed, and the mean with its interval.
    let md = std::fs::read_to_string(&outputs.summary_md).unwrap();
    assert!(
        md.contains("## easy-hard: k = 2 (harmless, helpful), 2 seeds"),
        "{md}"
    );
    assert!(md.contains("Every method gets 1200 pair-passes"), "{md}");
    for method in METHODS {
        assert!(md.contains(&format!("| 1 | {method} |")), "{md}");
    }
    assert!(
        md.contains("Mean over the 2 seeds") && md.contains(" ± "),
        "{md}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&outputs.summary_json).unwrap()).unwrap();
    let curriculum = &json["scenarios"][0]["methods"][0];
    assert_eq!(curriculum["method"], "curriculum");
    let per_seed = curriculum["mean_accuracy"].as_array().unwrap();
    let expected: Vec<f64> = scenario
        .seeds
        .iter()
        .map(|s| s.comparison.summaries[0].mean_accuracy.unwrap())
        .collect();
    let got: Vec<f64> = per_seed.iter().map(|v| v.as_f64().unwrap()).collect();
    assert_eq!(got, expected);

    // A second demo into the same directory is refused and changes nothing...
    let before = std::fs::read(&outputs.summary_json).unwrap();
    let err = format!("{:#}", run(&options).unwrap_err());
    assert!(err.contains("already exists"), "{err}");
    assert_eq!(std::fs::read(&outputs.summary_json).unwrap(), before);
    // ...and with force the earlier one is renamed aside, intact; one epoch per stage and
    // another scenario by option.
    let forced = run(&DemoOptions {
        force: true,
        max_steps: Some(1),
        seeds: Some(1),
        scenario: Some(ScenarioChoice::One(Scenario::Interference)),
        compute: Some(Compute::Epoch),
        ..options
    })
    .unwrap();
    let aside = forced.moved_aside.expect("moved aside");
    assert_eq!(std::fs::read(aside.join("summary.json")).unwrap(), before);
    let md = std::fs::read_to_string(&forced.summary_md).unwrap();
    assert!(
        md.contains("## interference: k = 2 (candid, tactful), 1 seed"),
        "{md}"
    );
    assert!(md.contains("one epoch of every stage"), "{md}");
    assert!(!md.contains("Mean over"), "{md}");
    assert!(out.join("interference/seed-0/eval/results.json").is_file());
}

#[test]
fn bad_demo_settings_are_refused_before_anything_is_written() {
    let err = "mixed".parse::<ScenarioChoice>().unwrap_err().to_string();
    assert!(err.contains("easy-hard") && err.contains("or all"), "{err}");
    assert_eq!(
        "all".parse::<ScenarioChoice>().unwrap(),
        ScenarioChoice::All
    );
    let err = "fast".parse::<Compute>().unwrap_err().to_string();
    assert!(err.contains("equal or epoch"), "{err}");
    let embedded = modpo_trainer::synth::demo::DEFAULT_CONFIG;
    let tmp = tempfile::tempdir().unwrap();
    for (config, key) in [
        (embedded.replace("seeds = 3", "seeds = 0"), "demo.seeds"),
        (
            embedded.replace("scenario = \"easy-hard\"", ""),
            "demo.scenario",
        ),
        (
            embedded.replace("compute = \"equal\"", "compute = \"most\""),
            "demo.compute",
        ),
        (
            embedded.replace("dimensions = 2", "dimensions = 6"),
            "--dimensions",
        ),
    ] {
        let out = tmp.path().join("demo");
        let options = DemoOptions {
            out: out.clone(),
            config: Some(config),
            ..DemoOptions::default()
        };
        let err = format!("{:#}", run(&options).unwrap_err());
        assert!(err.contains(key), "{key}: {err}");
        assert!(!out.exists(), "{key}: nothing is written");
    }
}
