//! The whole evaluation on the HelpSteer sample (k = 5): short runs of the three methods on a
//! tiny random model, then one `eval` over the three runs must give the paper's 50 settings
//! for every method, win rates summing to 1, consistent means, intervals and winners, and one
//! figure per dimension pair (10). Runs that do not share the held-out pairs are refused, and
//! so is writing over earlier results.

use std::path::{Path, PathBuf};

use modpo_tests::{shared_data_dir, write_tiny_model};
use modpo_trainer::config::RunConfig;
use modpo_trainer::data::{self, TokenizedPair};
use modpo_trainer::eval::report::Written;
use modpo_trainer::eval::{self, conflict_pairs, Bootstrap, CompareOptions};
use modpo_trainer::tokenizer::ChatTokenizer;
use modpo_trainer::train::{train, Cluster};
use serde_json::Value;

const METHODS: [&str; 3] = ["curriculum", "panacea", "dpo-soup"];

fn config_text(method: &str) -> String {
    format!(
        "[model]\npath = \"model\"\ndevice = \"cpu\"\n\n\
         [data]\nformat = \"helpsteer\"\ntrain_file = \"{}\"\neval_fraction = 0.25\n\
         max_length = 96\nglobal_batch = 8\nmicro_batch = 4\ncache_dir = \"cache\"\n\n\
         [method]\nname = \"{method}\"\nbeta = 0.1\n\n\
         [train]\noutput_dir = \"run-{method}\"\nlearning_rate = 5e-3\nwarmup_ratio = 0.0\nmax_steps = 2\n",
        shared_data_dir().join("helpsteer_sample.jsonl").display()
    )
}

fn train_method(tmp: &Path, method: &str) -> PathBuf {
    let text = config_text(method);
    let path = tmp.join(format!("{method}.toml"));
    std::fs::write(&path, &text).unwrap();
    let config = RunConfig::load(&path).unwrap();
    train(&config, &text, Default::default(), &Cluster::single())
        .unwrap()
        .run_dir
}

fn options(runs: Vec<PathBuf>) -> CompareOptions {
    CompareOptions {
        runs,
        device: None,
        dtype: None,
        micro_batch: None,
        bootstrap: Bootstrap::default(),
    }
}

/// `w . s` in exact arithmetic: the grid weights are multiples of 1/4 and scores integers.
fn quarter_dot(w: &[f64], s: &[f64]) -> i64 {
    w.iter()
        .zip(s)
        .map(|(w, s)| (w * 4.0) as i64 * *s as i64)
        .sum()
}

#[test]
fn three_methods_fifty_settings_win_rates_and_plots() {
    let tmp = tempfile::tempdir().unwrap();
    write_tiny_model(&tmp.path().join("model"), 7);
    let runs: Vec<PathBuf> = METHODS
        .iter()
        .map(|m| train_method(tmp.path(), m))
        .collect();

    let out = tmp.path().join("eval");
    let (comparison, written) = eval::evaluate_runs(&options(runs.clone()), &out, false).unwrap();
    assert_eq!(comparison.dimensions.len(), 5);

    let json: Value =
        serde_json::from_str(&std::fs::read_to_string(&written.results_json).unwrap()).unwrap();
    let (per_method_sum, scored) = check_settings(&json, tmp.path());
    check_summary(&json, &per_method_sum, scored);
    check_plots_and_table(&written, &out);
    check_no_overwrite(&runs, &out, &written);
    check_other_held_out_pairs_refused(tmp.path(), &runs);
}

/// The 50 settings against the held-out conflict pairs of the curriculum run's config in
/// `tmp`: every setting's counts, and the sum of each method's accuracies over the settings
/// that counted a pair, with their number.
fn check_settings(json: &Value, tmp: &Path) -> ([f64; 3], usize) {
    let settings = json["settings"].as_array().unwrap();
    assert_eq!(settings.len(), 50, "C(5,2) pairs x 5 weights");
    let conflict = json["conflict_pairs"].as_u64().unwrap() as usize;
    assert!(
        conflict >= 20,
        "enough held-out conflict pairs to mean something: {conflict}"
    );

    // The counted pairs of every setting, from the data and exact arithmetic.
    let config = RunConfig::load(&tmp.join("curriculum.toml")).unwrap();
    let tokenizer = ChatTokenizer::from_model_dir(&config.model.path, None).unwrap();
    let data = data::load(&config.data, &tokenizer).unwrap();
    let pairs = conflict_pairs(&data.eval);
    assert_eq!(pairs.len(), conflict);

    let mut per_method_sum = [0.0; 3];
    let mut scored = 0;
    for setting in settings {
        if let Some(accuracies) = check_setting(setting, &pairs) {
            scored += 1;
            for (sum, accuracy) in per_method_sum.iter_mut().zip(accuracies) {
                *sum += accuracy;
            }
        }
    }
    // The vertex 1_0 appears in pairs (0,1) and (0,2): the same w, the same results.
    assert_eq!(settings[0]["weights"], settings[5]["weights"]);
    assert_eq!(settings[0]["results"], settings[5]["results"]);
    (per_method_sum, scored)
}

/// One setting: its weights, counted pairs and ties, and (when it counted any pair) every
/// method's accuracy, interval and the winners; returns the accuracies in that case.
fn check_setting(setting: &Value, pairs: &[&TokenizedPair]) -> Option<[f64; 3]> {
    let w: Vec<f64> = setting["weights"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    assert!(
        (w.iter().sum::<f64>() - 1.0).abs() < 1e-12 && w.iter().filter(|&&x| x > 0.0).count() <= 2
    );
    let counted = setting["counted"].as_u64().unwrap() as usize;
    let hand_counted = pairs
        .iter()
        .filter(|p| quarter_dot(&w, &p.scores_a) != quarter_dot(&w, &p.scores_b))
        .count();
    assert_eq!(counted, hand_counted, "w {w:?}");
    assert_eq!(
        counted + setting["ties"].as_u64().unwrap() as usize,
        pairs.len()
    );

    let results = setting["results"].as_array().unwrap();
    let labels: Vec<&str> = results
        .iter()
        .map(|r| r["label"].as_str().unwrap())
        .collect();
    assert_eq!(labels, METHODS, "three methods per setting, in run order");
    if counted == 0 {
        return None;
    }
    let correct: Vec<u64> = results
        .iter()
        .map(|r| r["correct"].as_u64().unwrap())
        .collect();
    let mut accuracies = [0.0; 3];
    for (m, r) in results.iter().enumerate() {
        let accuracy = r["accuracy"].as_f64().unwrap();
        // (JSON numbers parse back to within an ulp.)
        assert!((accuracy - correct[m] as f64 / counted as f64).abs() < 1e-12);
        let interval = r["interval"].as_array().unwrap();
        let (low, high) = (interval[0].as_f64().unwrap(), interval[1].as_f64().unwrap());
        assert!(
            0.0 <= low && low <= accuracy && accuracy <= high && high <= 1.0,
            "{r}"
        );
        accuracies[m] = accuracy;
    }
    check_winners(setting, &correct);
    Some(accuracies)
}

/// The winners of a setting: every method with the most correct pairs, in run order.
fn check_winners(setting: &Value, correct: &[u64]) {
    let best = *correct.iter().max().unwrap();
    let winners: Vec<&str> = setting["winners"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_str().unwrap())
        .collect();
    let expected: Vec<&str> = METHODS
        .iter()
        .zip(correct)
        .filter(|(_, &c)| c == best)
        .map(|(m, _)| *m)
        .collect();
    assert_eq!(winners, expected);
}

/// Win rates summing to 1, and each method's mean accuracy over the `scored` settings.
fn check_summary(json: &Value, per_method_sum: &[f64; 3], scored: usize) {
    let summary = json["summary"].as_array().unwrap();
    assert_eq!(summary.len(), 3);
    let total: f64 = summary
        .iter()
        .map(|s| s["win_rate"].as_f64().unwrap())
        .sum();
    assert!((total - 1.0).abs() < 1e-9, "win rates sum to 1: {total}");
    for (m, s) in summary.iter().enumerate() {
        let mean = s["mean_accuracy"].as_f64().unwrap();
        assert!(
            (mean - per_method_sum[m] / scored as f64).abs() < 1e-12,
            "{s}"
        );
    }
    assert_eq!(json["per_dimension"].as_array().unwrap().len(), 5);
}

/// One figure per dimension pair, each a PNG, and the Markdown table.
fn check_plots_and_table(written: &Written, out: &Path) {
    assert_eq!(written.plots.len(), 10);
    let pngs: Vec<PathBuf> = std::fs::read_dir(out)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "png"))
        .collect();
    assert_eq!(pngs.len(), 10);
    for png in &pngs {
        let bytes = std::fs::read(png).unwrap();
        assert!(
            bytes.starts_with(b"\x89PNG\r\n\x1a\n") && bytes.len() > 5_000,
            "{}",
            png.display()
        );
    }
    assert!(out.join("accuracy-helpfulness-correctness.png").is_file());
    let md = std::fs::read_to_string(&written.results_md).unwrap();
    assert!(md.contains("Table 2") && md.contains("dpo-soup") && md.lines().count() > 50);
}

/// Results already there are not overwritten without --force.
fn check_no_overwrite(runs: &[PathBuf], out: &Path, written: &Written) {
    let before = std::fs::read(&written.results_json).unwrap();
    let err = eval::evaluate_runs(&options(runs.to_vec()), out, false).unwrap_err();
    assert!(
        format!("{err:#}").contains("already holds evaluation results"),
        "{err:#}"
    );
    assert_eq!(std::fs::read(&written.results_json).unwrap(), before);
}

/// A run whose held-out pairs differ (another max_length) cannot be compared, and nothing is
/// written for the refused comparison.
fn check_other_held_out_pairs_refused(tmp: &Path, runs: &[PathBuf]) {
    let other = tmp.join("run-other");
    std::fs::create_dir_all(&other).unwrap();
    for file in ["resolved_config.json", "adapters.safetensors"] {
        std::fs::copy(runs[1].join(file), other.join(file)).unwrap();
    }
    let resolved = other.join("resolved_config.json");
    let mut value: Value =
        serde_json::from_str(&std::fs::read_to_string(&resolved).unwrap()).unwrap();
    value["data"]["max_length"] = Value::from(64);
    std::fs::write(&resolved, value.to_string()).unwrap();
    let err = eval::evaluate_runs(
        &options(vec![runs[0].clone(), other]),
        &tmp.join("eval-2"),
        false,
    )
    .unwrap_err();
    let message = format!("{err:#}");
    assert!(
        message.contains("cannot be compared")
            && message.contains("held-out conflict pairs differ"),
        "{message}"
    );
    assert!(
        !tmp.join("eval-2").exists(),
        "nothing written for a refused comparison"
    );
}
