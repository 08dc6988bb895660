//! `eval --generate` and `train-rm` end to end on a small synthetic run (easy-hard, k = 2, a
//! tiny model trained a few steps):
//!
//! - the answer the evaluation generates at each `w` (one batch, one `w` per row) is, greedily
//!   and token for token, the answer of the merged model `export --merge` writes for that `w`;
//! - the reported mean scores are the scenario's rule applied to those answers, and the results
//!   and figures are written;
//! - a reward model trained by `train-rm` and loaded back scores the held-out pairs as its own
//!   held-out accuracy did, and scores generated answers through `--reward-model`.

use std::path::{Path, PathBuf};

use modpo_trainer::config::RunConfig;
use modpo_trainer::eval::generation::{self, Decoding, GenerationOptions};
use modpo_trainer::eval::Bootstrap;
use modpo_trainer::export;
use modpo_trainer::model::generate::{generate, GenerateOptions};
use modpo_trainer::model::{load_model, Conditioning};
use modpo_trainer::reward_model::config::RewardModelConfig;
use modpo_trainer::reward_model::{train::train_reward_model, RewardModel};
use modpo_trainer::saved_run;
use modpo_trainer::synth::scorer::ScenarioScorer;
use modpo_trainer::synth::{self, Scenario, SynthFiles, SynthSpec};
use modpo_trainer::train::{train, Cluster, TrainOptions};
use tch::{Device, Kind};

const DATA: &str = r#"
format = "generic"
dimensions = ["harmless", "helpful"]
max_length = 160
global_batch = 16
micro_batch = 8
seed = 0
"#;

/// Small easy-hard data and its tiny model in `dir/data`.
fn synthetic(dir: &Path) -> SynthFiles {
    let spec = SynthSpec {
        scenario: Scenario::EasyHard,
        dimensions: 2,
        pairs: 96,
        eval_pairs: 16,
        conflict_rate: 0.25,
        seed: 3,
    };
    synth::write(&dir.join("data"), &spec).unwrap()
}

fn paths(files: &SynthFiles) -> String {
    format!(
        "[model]\npath = {:?}\ndevice = \"cpu\"\n\n[data]\ntrain_file = {:?}\neval_file = {:?}\n{DATA}",
        files.model_dir, files.train_file, files.eval_file
    )
}

/// The curriculum for 2 steps per stage at a high learning rate, so the adapters move.
fn trained_run(dir: &Path, files: &SynthFiles) -> PathBuf {
    let out = dir.join("run");
    let text = format!(
        "{}\n[method]\nname = \"curriculum\"\nbeta = 0.1\n\n[train]\noutput_dir = {out:?}\n\
         learning_rate = 3e-2\nwarmup_ratio = 0.0\nepochs = 1\nmax_steps = 2\n",
        paths(files)
    );
    let path = dir.join("run.toml");
    std::fs::write(&path, &text).unwrap();
    let config = RunConfig::load(&path).unwrap();
    train(&config, &text, TrainOptions::default(), &Cluster::single()).unwrap();
    out
}

fn options(run: &Path, prompts: usize) -> GenerationOptions {
    GenerationOptions {
        runs: vec![run.to_path_buf()],
        prompts,
        grid: None,
        decoding: Decoding {
            max_new_tokens: 24,
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
        },
        device: None,
        dtype: None,
        bootstrap: Bootstrap {
            resamples: 50,
            ..Bootstrap::default()
        },
    }
}

#[test]
fn generation_at_w_is_the_merged_model_at_w_and_is_scored_by_the_rule() {
    let tmp = tempfile::tempdir().unwrap();
    let files = synthetic(tmp.path());
    let run_dir = trained_run(tmp.path(), &files);
    let options = options(&run_dir, 2);
    let run = saved_run::read_run(&run_dir).unwrap();
    let prompts = generation::held_out_prompts(&run, 2).unwrap();
    let weights: Vec<Vec<f64>> = (0..5)
        .map(|i| vec![1.0 - 0.25 * i as f64, 0.25 * i as f64])
        .collect();
    let answers = generation::generate_answers(&run, &prompts, &weights, &options).unwrap();

    let (loaded, _, _) = run.load_model(None, None).unwrap();
    let greedy = GenerateOptions {
        max_new_tokens: 24,
        temperature: 0.0,
        top_p: 1.0,
        seed: 0,
        eos_token_id: Some(run.tokenizer.eos_token_id()),
    };
    let strip = |mut ids: Vec<u32>| {
        if ids.last() == Some(&run.tokenizer.eos_token_id()) {
            ids.pop();
        }
        ids
    };
    let mut differs_from_base = false;
    for (v, w) in weights.iter().enumerate() {
        let merged_dir = tmp.path().join(format!("merged-{v}"));
        export::write_merged_model(
            &loaded.model,
            &loaded.base,
            w,
            &run.meta.model_path,
            &merged_dir,
        )
        .unwrap();
        let merged = load_model(&merged_dir, None, Device::Cpu, Kind::Float).unwrap();
        for (p, prompt) in prompts.iter().enumerate() {
            let ids = generate(&merged.model, prompt, Conditioning::Reference, &greedy).unwrap();
            assert_eq!(strip(ids), answers[p][v].ids, "w {w:?}, prompt {p}");
            let base = generate(&loaded.model, prompt, Conditioning::Reference, &greedy).unwrap();
            differs_from_base |= strip(base) != answers[p][v].ids;
        }
    }
    assert!(
        differs_from_base,
        "the trained adapters never changed an answer"
    );

    // The report's means are the rule applied to these very answers.
    let scorer = ScenarioScorer::new(Scenario::EasyHard, &files.dimensions).unwrap();
    let comparison = generation::compare_generations(&options, &scorer).unwrap();
    let run_result = &comparison.runs[0];
    assert_eq!(comparison.weights, weights);
    for (v, point) in run_result.points.iter().enumerate() {
        for i in 0..2 {
            let by_rule: f64 = answers
                .iter()
                .map(|row| synth::score(Scenario::EasyHard, &row[v].text, 2)[i])
                .sum::<f64>()
                / 2.0;
            assert!(
                (point.scores[i].mean - by_rule).abs() < 1e-12,
                "w {v} dim {i}"
            );
        }
    }
    let out = tmp.path().join("eval-generate");
    let written = generation::report::write(&comparison, &out, false).unwrap();
    assert!(out.join("front-harmless-helpful.png").is_file());
    assert!(out.join("scores-harmless-helpful.png").is_file());
    let md = std::fs::read_to_string(&written.results_md).unwrap();
    assert!(md.contains("Reference point of the hypervolume: harmless 0, helpful 0"));
    let err = generation::report::write(&comparison, &out, false).unwrap_err();
    assert!(err.to_string().contains("already holds"), "{err}");
}

#[test]
fn a_reward_model_scores_as_its_held_out_accuracy_says() {
    let tmp = tempfile::tempdir().unwrap();
    let files = synthetic(tmp.path());
    let out = tmp.path().join("rm");
    let text = format!(
        "{}\n[reward_model]\nlora = true\nrank = 4\nalpha = 8\nbootstrap = 50\n\n[train]\n\
         output_dir = {out:?}\nlearning_rate = 1e-2\nwarmup_ratio = 0.0\nepochs = 1\n",
        paths(&files)
    );
    let path = tmp.path().join("rm.toml");
    std::fs::write(&path, &text).unwrap();
    let config = RewardModelConfig::load(&path).unwrap();
    let summary = train_reward_model(&config, &text, false, &Cluster::single()).unwrap();
    assert_eq!(summary.steps, 96 / 16);
    let err = train_reward_model(&config, &text, false, &Cluster::single()).unwrap_err();
    assert!(err.to_string().contains("already holds"), "{err}");

    // Loaded back, the model reproduces the held-out accuracy pair by pair.
    let rm = RewardModel::load(&out, Device::Cpu, Kind::Float).unwrap();
    let (_, eval) = synth::generate(&SynthSpec {
        scenario: Scenario::EasyHard,
        dimensions: 2,
        pairs: 96,
        eval_pairs: 16,
        conflict_rate: 0.25,
        seed: 3,
    })
    .unwrap();
    let tokenizer =
        modpo_trainer::tokenizer::ChatTokenizer::from_model_dir(&files.model_dir, None).unwrap();
    let mut correct = [0usize; 2];
    let mut counted = [0usize; 2];
    for pair in &eval {
        let prompt = tokenizer.encode_prompt(&pair.prompt).unwrap();
        let a = tokenizer.encode_text(&pair.response_a).unwrap();
        let b = tokenizer.encode_text(&pair.response_b).unwrap();
        let r = rm.rewards(&prompt, &[&a, &b]).unwrap();
        for i in 0..2 {
            if pair.scores_a[i] != pair.scores_b[i] {
                counted[i] += 1;
                correct[i] +=
                    usize::from((r[0][i] > r[1][i]) == (pair.scores_a[i] > pair.scores_b[i]));
            }
        }
    }
    for i in 0..2 {
        assert_eq!(summary.accuracy[i].counted, counted[i], "dimension {i}");
        assert_eq!(summary.accuracy[i].correct, correct[i], "dimension {i}");
    }
    assert_eq!(rm.reference_point.len(), 2);

    // And it scores generated answers.
    let run_dir = trained_run(tmp.path(), &files);
    let comparison = generation::compare_generations(&options(&run_dir, 1), &rm).unwrap();
    assert_eq!(comparison.reference_point, summary.reference_point);
    assert!(comparison.runs[0].points[0].scores[0].mean.is_finite());
}
