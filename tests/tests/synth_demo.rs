//! `modpo-trainer demo` end to end on a small budget: synthetic data, the four methods, the
//! evaluation with intervals and the plot; then a second demo into the same directory is
//! refused, and with `force` the first is moved aside, not lost.

use modpo_trainer::synth::demo::{run, DemoOptions, METHODS};

#[test]
fn small_demo_runs_end_to_end_and_never_overwrites() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("demo");
    let options = DemoOptions {
        out: out.clone(),
        force: false,
        pairs: Some(400),
        max_steps: Some(4),
        config: None,
    };
    let outputs = run(&options).unwrap();
    assert_eq!(outputs.runs.len(), METHODS.len());
    for run in &outputs.runs {
        assert!(
            run.join("adapters.safetensors").is_file(),
            "{}",
            run.display()
        );
    }
    let labels: Vec<&str> = outputs
        .comparison
        .runs
        .iter()
        .map(|r| r.label.as_str())
        .collect();
    assert_eq!(labels, METHODS);
    // max_steps = 4 per stage, 16 pairs per step, k = 2: the curriculum's three stages take
    // 1, 2 and 3 passes (4 x 16 x 6 = 384), Panacea's one stage k + 1 = 3, DPO-Soup's k = 2.
    let compute: Vec<(&str, usize, usize)> = outputs
        .compute
        .iter()
        .map(|c| (c.method.as_str(), c.steps, c.pair_passes))
        .collect();
    assert_eq!(
        compute,
        [
            ("curriculum", 12, 384),
            ("panacea", 4, 192),
            ("panacea-lora", 4, 192),
            ("dpo-soup", 4, 128)
        ]
    );
    assert_eq!(
        outputs.comparison.settings.len(),
        5,
        "k = 2: the five grid points"
    );
    assert_eq!(
        outputs.comparison.conflict_pairs,
        outputs.synth.eval_conflicts
    );
    for results in &outputs.comparison.results {
        for r in results {
            assert!(r.accuracy.counted > 0);
            let [low, high] = r.accuracy.interval.expect("bootstrap interval");
            let a = r.accuracy.accuracy.unwrap();
            assert!(low <= a && a <= high);
        }
    }
    assert_eq!(outputs.written.plots.len(), 1);
    assert!(std::fs::read(&outputs.written.plots[0])
        .unwrap()
        .starts_with(b"\x89PNG"));
    let md = std::fs::read_to_string(&outputs.written.results_md).unwrap();
    assert!(md.contains("polite") && md.contains("dpo-soup"));

    // A second demo into the same directory is refused and changes nothing...
    let before = std::fs::read(&outputs.written.results_json).unwrap();
    let err = format!("{:#}", run(&options).unwrap_err());
    assert!(err.contains("already exists"), "{err}");
    assert_eq!(
        std::fs::read(&outputs.written.results_json).unwrap(),
        before
    );
    // ...and with force the earlier one is renamed aside, intact.
    let forced = run(&DemoOptions {
        force: true,
        max_steps: Some(1),
        ..options
    })
    .unwrap();
    let aside = forced.moved_aside.expect("moved aside");
    assert_eq!(
        std::fs::read(aside.join("eval/results.json")).unwrap(),
        before
    );
    assert!(out.join("eval/results.json").is_file());
}
