//! `train-rm` checkpoints and `--resume` through the binary, on the tiny model and the
//! PKU-SafeRLHF sample: a run killed with SIGKILL after step 5 (its last checkpoint after step
//! 4), or stopped with SIGTERM, and resumed ends with exactly the head, adapters and held-out
//! accuracy of an uninterrupted run; a run directory of another config is refused, naming the
//! key, whether it holds a checkpoint or only its `run_identity.json`.

mod support;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use support::{assert_success, bin, modpo, pku_sample, stderr, tiny_model, Job};
use tch::Tensor;

/// 8 steps of 8 pairs, a checkpoint every 2; `learning_rate` varies for the refusal tests.
fn config_text(learning_rate: f64) -> String {
    format!(
        "[model]\npath = \"model\"\ndevice = \"cpu\"\n\
         [data]\nformat = \"pku-saferlhf\"\ntrain_file = \"{}\"\neval_fraction = 0.2\n\
         max_length = 96\nglobal_batch = 8\nmicro_batch = 4\n\
         [reward_model]\nlora = true\nrank = 4\nalpha = 8.0\nbootstrap = 50\n\
         [train]\noutput_dir = \"run\"\nlearning_rate = {learning_rate:?}\nwarmup_ratio = 0.1\n\
         max_steps = 8\ncheckpoint_every = 2\nkeep_checkpoints = 2\n",
        pku_sample().display()
    )
}

/// A directory with the tiny model and the config; returns the config's path.
fn workspace(dir: &Path, learning_rate: f64) -> String {
    std::fs::create_dir_all(dir).unwrap();
    if !dir.join("model").exists() {
        tiny_model(&dir.join("model"), 3);
    }
    let path = dir.join("rm.toml");
    std::fs::write(&path, config_text(learning_rate)).unwrap();
    path.to_str().unwrap().to_string()
}

/// `train-rm --config CONFIG [--resume]`, killed at the crash point `crash` if given.
fn train_rm(config: &str, resume: bool, crash: Option<&str>) -> Output {
    let mut command = Command::new(bin());
    command.args(["train-rm", "--config", config]);
    if resume {
        command.arg("--resume");
    }
    if let Some(point) = crash {
        command.env("MODPO_CRASH_AT", point);
    }
    command.output().expect("run modpo-trainer")
}

fn weights(run: &Path) -> HashMap<String, Tensor> {
    Tensor::read_safetensors(run.join("reward_model.safetensors"))
        .unwrap()
        .into_iter()
        .collect()
}

fn json(path: PathBuf) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// The reward model in `run` is the one in `whole` bit for bit: weights, held-out accuracy,
/// reference point.
fn assert_same_reward_model(run: &Path, whole: &Path) {
    let (expected, got) = (weights(whole), weights(run));
    assert_eq!(expected.len(), got.len());
    assert!(expected.keys().any(|n| n.starts_with("adapters.")));
    for (name, t) in &expected {
        assert!(
            got[name].equal(t),
            "{name} differs from the uninterrupted run"
        );
    }
    let accuracy = |dir: &Path| json(dir.join("accuracy.json"));
    assert_eq!(accuracy(run), accuracy(whole));
    let reference = |dir: &Path| json(dir.join("reward_model.json"))["reference_point"].clone();
    assert_eq!(reference(run), reference(whole));
    let final_state = json(run.join("checkpoints/stage-1-final/state.json"));
    assert_eq!(final_state["step"], 8);
}

#[test]
fn killed_after_step_5_then_resumed_equals_the_uninterrupted_run() {
    let tmp = tempfile::tempdir().unwrap();
    let whole = tmp.path().join("whole");
    assert_success(&modpo(&["train-rm", "--config", &workspace(&whole, 5e-3)]));

    let parts = tmp.path().join("parts");
    let config = workspace(&parts, 5e-3);
    let killed = train_rm(&config, false, Some("step:5"));
    assert!(!killed.status.success(), "the crash point kills the run");
    let run = parts.join("run");
    assert!(!run.join("reward_model.safetensors").exists());
    let latest = std::fs::read_to_string(run.join("checkpoints/latest")).unwrap();
    assert_eq!(latest, "stage-1-step-0000004");
    let resumed = train_rm(&config, true, None);
    assert_success(&resumed);
    assert!(
        stderr(&resumed).contains("resuming"),
        "{}",
        stderr(&resumed)
    );

    assert_same_reward_model(&run, &whole.join("run"));

    // SIGTERM once the first checkpoint is written: a checkpoint, exit 0, then resumed.
    let stopped = tmp.path().join("stopped");
    let config = workspace(&stopped, 5e-3);
    let run = stopped.join("run");
    let mut job = Job::modpo(&["train-rm", "--config", &config]);
    job.wait_until("the first checkpoint", Duration::from_millis(2), || {
        run.join("checkpoints/latest").exists()
    });
    job.signal("TERM");
    let end = job.finish();
    assert!(end.status.success(), "{}", end.stderr);
    assert!(end.stdout.contains("--resume"), "{}", end.stdout);
    assert!(!run.join("reward_model.safetensors").exists());
    assert_success(&train_rm(&config, true, None));
    assert_same_reward_model(&run, &whole.join("run"));
}

#[test]
fn resuming_the_run_of_another_config_is_refused_naming_the_key() {
    let tmp = tempfile::tempdir().unwrap();
    // With a checkpoint (after step 2; killed after step 3).
    let config = workspace(tmp.path(), 5e-3);
    assert!(!train_rm(&config, false, Some("step:3")).status.success());
    let config = workspace(tmp.path(), 1e-2);
    let refused = train_rm(&config, true, None);
    assert!(!refused.status.success());
    let err = stderr(&refused);
    assert!(err.contains("belongs to a different run"), "{err}");
    assert!(err.contains("train.learning_rate: 0.005 -> 0.01"), "{err}");

    // Without one (killed after step 1): by its run_identity.json.
    let other = tmp.path().join("other");
    let config = workspace(&other, 5e-3);
    assert!(!train_rm(&config, false, Some("step:1")).status.success());
    assert!(!other.join("run/checkpoints/latest").exists());
    let config = workspace(&other, 1e-2);
    let refused = train_rm(&config, true, None);
    let err = stderr(&refused);
    assert!(!refused.status.success());
    assert!(err.contains("run_identity.json"), "{err}");
    assert!(err.contains("train.learning_rate: 0.005 -> 0.01"), "{err}");
    // A new run into the same directory is refused too.
    let again = train_rm(&config, false, None);
    assert!(
        stderr(&again).contains("already holds a run"),
        "{}",
        stderr(&again)
    );
}
