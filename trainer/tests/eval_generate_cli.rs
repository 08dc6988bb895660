//! `eval --generate` through the binary: two tiny runs (curriculum and DPO-Soup, 2 steps per
//! stage on small easy-hard data) evaluated in one call write `results.json`, `results.md`
//! and the front and score plots, and `results.json` has, for each run, the hypervolume of
//! the dimension pair and Spearman's correlation per dimension. (What the numbers are is
//! checked in `tests/tests/eval_generate.rs` and the unit tests of `eval/generation/`.)

mod support;

use std::path::{Path, PathBuf};

use modpo_trainer::synth::{self, Scenario, SynthSpec};
use support::{assert_success, modpo, stdout};

/// A run of `method` on `data`'s files, trained by `modpo-trainer train`.
fn trained_run(dir: &Path, files: &synth::SynthFiles, method: &str) -> PathBuf {
    let out = dir.join(method);
    let text = format!(
        "[model]\npath = {:?}\ndevice = \"cpu\"\n\
         [data]\nformat = \"generic\"\ntrain_file = {:?}\neval_file = {:?}\n\
         dimensions = [\"harmless\", \"helpful\"]\nmax_length = 160\nglobal_batch = 16\n\
         micro_batch = 8\nseed = 0\n\
         [method]\nname = \"{method}\"\nbeta = 0.1\n\
         [train]\noutput_dir = {out:?}\nlearning_rate = 3e-2\nwarmup_ratio = 0.0\n\
         max_steps = 2\n",
        files.model_dir, files.train_file, files.eval_file
    );
    let config = dir.join(format!("{method}.toml"));
    std::fs::write(&config, text).unwrap();
    assert_success(&modpo(&["train", "--config", config.to_str().unwrap()]));
    out
}

#[test]
fn eval_generate_writes_results_and_plots_for_every_run() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = SynthSpec {
        scenario: Scenario::EasyHard,
        dimensions: 2,
        pairs: 64,
        eval_pairs: 8,
        conflict_rate: 0.25,
        seed: 5,
    };
    let files = synth::write(&tmp.path().join("data"), &spec).unwrap();
    let runs = [
        trained_run(tmp.path(), &files, "curriculum"),
        trained_run(tmp.path(), &files, "dpo-soup"),
    ];
    let out = tmp.path().join("eval-generate");
    let done = modpo(&[
        "eval",
        "--generate",
        "--run",
        runs[0].to_str().unwrap(),
        "--run",
        runs[1].to_str().unwrap(),
        "--scenario",
        "easy-hard",
        "--prompts",
        "2",
        "--max-new-tokens",
        "8",
        "--bootstrap",
        "20",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_success(&done);
    assert!(!stdout(&done).is_empty());

    for file in [
        "results.json",
        "results.md",
        "front-harmless-helpful.png",
        "scores-harmless-helpful.png",
    ] {
        let path = out.join(file);
        assert!(
            std::fs::metadata(&path).is_ok_and(|m| m.len() > 0),
            "{} missing or empty",
            path.display()
        );
    }
    let results: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
    assert_eq!(
        results["dimensions"],
        serde_json::json!(["harmless", "helpful"])
    );
    let evaluated = results["runs"].as_array().unwrap();
    assert_eq!(evaluated.len(), 2);
    for run in evaluated {
        let fronts = run["fronts"].as_array().unwrap();
        assert_eq!(fronts.len(), 1, "one dimension pair");
        let hypervolume = fronts[0]["hypervolume"].as_f64().unwrap();
        assert!(
            hypervolume.is_finite() && hypervolume >= 0.0,
            "{hypervolume}"
        );
        let spearman = run["controllability"]["spearman"].as_array().unwrap();
        assert_eq!(spearman.len(), 2);
        // Each is a correlation, or null where the scores do not vary over the grid.
        for s in spearman {
            assert!(
                s.is_null() || s.as_f64().is_some_and(|x| (-1.0..=1.0).contains(&x)),
                "{s}"
            );
        }
    }
    let md = std::fs::read_to_string(out.join("results.md")).unwrap();
    assert!(md.contains("curriculum") && md.contains("dpo-soup"), "{md}");
}
