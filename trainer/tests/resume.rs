//! Checkpoints and resume through the binary, on a tiny model and the PKU-SafeRLHF sample:
//! a run killed with SIGKILL inside stage 2, stopped with SIGTERM, restarted from stage 3, or
//! resumed past a corrupted checkpoint ends with exactly the adapters of an uninterrupted run.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use tch::Tensor;

fn modpo(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_modpo-trainer"))
        .args(args)
        .output()
        .expect("run modpo-trainer")
}

fn spawn(args: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_modpo-trainer"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run modpo-trainer")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).to_string()
}

/// A directory with the tiny model, training data and a config writing to `run`.
fn workspace(dir: &Path, extra_train: &str) -> String {
    std::fs::create_dir_all(dir).unwrap();
    if !dir.join("model").exists() {
        let out = modpo(&[
            "tiny-model",
            "--out",
            dir.join("model").to_str().unwrap(),
            "--seed",
            "3",
        ]);
        assert!(out.status.success(), "{}", stderr(&out));
    }
    let sample = format!(
        "{}/../../shared/data/pku_saferlhf_sample.jsonl",
        env!("CARGO_MANIFEST_DIR")
    );
    let text = format!(
        "[model]\npath = \"model\"\ndevice = \"cpu\"\n\
         [data]\nformat = \"pku-saferlhf\"\ntrain_file = \"{sample}\"\neval_fraction = 0.0\n\
         max_length = 192\nglobal_batch = 8\nmicro_batch = 4\n\
         [method]\nname = \"curriculum\"\nbeta = 0.1\n\
         [train]\noutput_dir = \"run\"\nlearning_rate = 2e-3\nwarmup_ratio = 0.1\nmax_steps = 12\n\
         checkpoint_every = 1\nkeep_checkpoints = 3\n{extra_train}"
    );
    let path = dir.join("run.toml");
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_string()
}

fn final_adapters(run: &Path) -> HashMap<String, Tensor> {
    Tensor::read_safetensors(run.join("adapters.safetensors"))
        .unwrap()
        .into_iter()
        .collect()
}

fn assert_same_adapters(got: &HashMap<String, Tensor>, expected: &HashMap<String, Tensor>) {
    assert_eq!(got.len(), expected.len());
    for (name, t) in expected {
        assert!(
            got[name].equal(t),
            "adapter {name} differs from the uninterrupted run"
        );
    }
}

/// The uninterrupted run, shared by the tests of this file: its directory and final adapters.
fn reference() -> (PathBuf, HashMap<String, Tensor>) {
    static REFERENCE: OnceLock<PathBuf> = OnceLock::new();
    let dir = REFERENCE.get_or_init(|| {
        let dir =
            std::env::temp_dir().join(format!("modpo-resume-reference-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let config = workspace(&dir, "");
        let out = modpo(&["train", "--config", &config]);
        assert!(out.status.success(), "{}", stderr(&out));
        dir
    });
    (dir.clone(), final_adapters(&dir.join("run")))
}

fn latest(run: &Path) -> String {
    std::fs::read_to_string(run.join("checkpoints/latest")).unwrap_or_default()
}

/// Waits until the run's latest checkpoint is a step inside stage 2.
fn wait_for_stage_2(child: &mut Child, run: &Path) {
    let started = Instant::now();
    while !latest(run).starts_with("stage-2-step-") {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before stage 2 was reached"
        );
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "stage 2 not reached in 5 minutes"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Starts a run in `dir` and returns once it has checkpointed inside stage 2:
/// (config path, run directory, the running process).
fn start_and_reach_stage_2(dir: &Path) -> (String, PathBuf, Child) {
    let config = workspace(dir, "");
    let run = dir.join("run");
    let mut child = spawn(&["train", "--config", &config]);
    wait_for_stage_2(&mut child, &run);
    (config, run, child)
}

#[test]
fn kill_9_inside_stage_2_then_resume_equals_uninterrupted_run() {
    let (_, expected) = &reference();
    let tmp = tempfile::tempdir().unwrap();
    let (config, run, mut child) = start_and_reach_stage_2(tmp.path());
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(
        !run.join("adapters.safetensors").exists(),
        "killed before the end"
    );

    let out = modpo(&["train", "--config", &config, "--resume"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_same_adapters(&final_adapters(&run), expected);
}

#[test]
fn sigterm_checkpoints_exits_zero_and_resumes_exactly() {
    let (_, expected) = &reference();
    let tmp = tempfile::tempdir().unwrap();
    let (config, run, child) = start_and_reach_stage_2(tmp.path());
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "SIGTERM ends the job cleanly: {}",
        stderr(&out)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("--resume"));
    assert!(
        latest(&run).starts_with("stage-2-step-") || latest(&run).starts_with("stage-3-step-"),
        "{}",
        latest(&run)
    );

    let out = modpo(&["train", "--config", &config, "--resume"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_same_adapters(&final_adapters(&run), expected);
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

#[test]
fn resume_from_stage_3_equals_full_run() {
    let (reference_dir, expected) = &reference();
    let tmp = tempfile::tempdir().unwrap();
    let config = workspace(tmp.path(), "");
    let run = tmp.path().join("run");
    copy_dir(&reference_dir.join("run"), &run);
    // Keep stages 1 and 2 only.
    std::fs::remove_file(run.join("adapters.safetensors")).unwrap();
    for entry in std::fs::read_dir(run.join("checkpoints")).unwrap() {
        let path = entry.unwrap().path();
        if path
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("stage-3")
        {
            std::fs::remove_dir_all(path).unwrap();
        }
    }
    let out = modpo(&["train", "--config", &config, "--resume-from-stage", "3"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_same_adapters(&final_adapters(&run), expected);
}

#[test]
fn corrupted_and_half_written_checkpoints_fall_back_to_the_previous_one() {
    let (_, expected) = &reference();
    let tmp = tempfile::tempdir().unwrap();
    let (config, run, mut child) = start_and_reach_stage_2(tmp.path());
    child.kill().unwrap();
    child.wait().unwrap();

    // The newest checkpoint loses a byte, and a write died half-way (kill -9 during a write
    // leaves only a temporary directory behind).
    let newest = run.join("checkpoints").join(latest(&run).trim());
    let adapters = newest.join("adapters.safetensors");
    let mut bytes = std::fs::read(&adapters).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&adapters, bytes).unwrap();
    let partial = run.join("checkpoints/.tmp-stage-2-step-0000099-1");
    std::fs::create_dir_all(&partial).unwrap();
    std::fs::write(partial.join("adapters.safetensors"), b"half").unwrap();

    let out = modpo(&["train", "--config", &config, "--resume"]);
    let log = stderr(&out);
    assert!(out.status.success(), "{log}");
    assert!(
        log.contains(&adapters.display().to_string()) && log.contains("checksum"),
        "the corrupted file is named: {log}"
    );
    assert_same_adapters(&final_adapters(&run), expected);
}

#[test]
fn a_checkpoint_of_another_config_is_refused_with_the_differences() {
    let (reference_dir, _) = &reference();
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&reference_dir.join("run"), &tmp.path().join("run"));
    std::fs::remove_file(tmp.path().join("run/adapters.safetensors")).unwrap();
    let config = workspace(tmp.path(), "");
    let changed = std::fs::read_to_string(&config)
        .unwrap()
        .replace("learning_rate = 2e-3", "learning_rate = 1e-3")
        .replace("beta = 0.1", "beta = 0.2");
    std::fs::write(&config, changed).unwrap();
    let out = modpo(&["train", "--config", &config, "--resume-from-stage", "3"]);
    let log = stderr(&out);
    assert!(!out.status.success());
    assert!(
        log.contains("train.learning_rate: 0.002 -> 0.001")
            && log.contains("method.beta: 0.1 -> 0.2"),
        "{log}"
    );

    // A different split of the same global batch is allowed.
    let config = workspace(tmp.path(), "");
    let split = std::fs::read_to_string(&config)
        .unwrap()
        .replace("micro_batch = 4", "micro_batch = 2");
    std::fs::write(&config, split).unwrap();
    let out = modpo(&["train", "--config", &config, "--resume-from-stage", "3"]);
    assert!(out.status.success(), "{}", stderr(&out));
}

/// The chain of slurm/stage.sbatch: one process per stage, each ending with --until-stage.
#[test]
fn one_job_per_stage_equals_full_run() {
    let (_, expected) = &reference();
    let tmp = tempfile::tempdir().unwrap();
    let config = workspace(tmp.path(), "");
    let run = tmp.path().join("run");
    for args in [
        vec!["--until-stage", "1"],
        vec!["--resume-from-stage", "2", "--until-stage", "2"],
        vec!["--resume-from-stage", "3", "--until-stage", "3"],
    ] {
        let mut all = vec!["train", "--config", config.as_str()];
        all.extend(args.iter());
        let out = modpo(&all);
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
        let stage = args.last().unwrap();
        assert!(run
            .join(format!("checkpoints/stage-{stage}-final"))
            .is_dir());
        assert_eq!(run.join("adapters.safetensors").exists(), *stage == "3");
    }
    assert_same_adapters(&final_adapters(&run), expected);
}
