//! Checkpoints and resume through the binary, on a tiny model and the PKU-SafeRLHF sample:
//! a run killed with SIGKILL inside stage 2, stopped with SIGTERM, restarted from stage 3, or
//! resumed past a corrupted checkpoint ends with exactly the adapters of an uninterrupted run.

mod support;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use support::{assert_success, final_adapters, modpo, stderr, workspace_with, Job, TrainToml};
use tch::Tensor;

/// The runs of this file: 12 steps into `run` with a checkpoint after each, the 3 newest kept.
fn run_toml() -> TrainToml {
    TrainToml {
        max_length: 192,
        learning_rate: 2e-3,
        max_steps: 12,
        train_extra: "checkpoint_every = 1\nkeep_checkpoints = 3\n".into(),
        ..TrainToml::default()
    }
}

/// A directory with the tiny model and the config of `run_toml`.
fn workspace(dir: &Path) -> String {
    workspace_with(dir, &run_toml())
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
        let config = workspace(&dir);
        assert_success(&modpo(&["train", "--config", &config]));
        dir
    });
    (dir.clone(), final_adapters(&dir.join("run")))
}

fn latest(run: &Path) -> String {
    std::fs::read_to_string(run.join("checkpoints/latest")).unwrap_or_default()
}

/// Starts a run in `dir` and returns once it has checkpointed inside stage 2 (polling often:
/// a stage lasts a few steps): (config path, run directory, the running job).
fn start_and_reach_stage_2(dir: &Path) -> (String, PathBuf, Job) {
    let config = workspace(dir);
    let run = dir.join("run");
    let mut job = Job::modpo(&["train", "--config", &config]);
    job.wait_until(
        "a checkpoint inside stage 2",
        Duration::from_millis(2),
        || latest(&run).starts_with("stage-2-step-"),
    );
    (config, run, job)
}

#[test]
fn kill_9_inside_stage_2_then_resume_equals_uninterrupted_run() {
    let (_, expected) = &reference();
    let tmp = tempfile::tempdir().unwrap();
    let (config, run, job) = start_and_reach_stage_2(tmp.path());
    job.kill(); // SIGKILL
    assert!(
        !run.join("adapters.safetensors").exists(),
        "killed before the end"
    );

    assert_success(&modpo(&["train", "--config", &config, "--resume"]));
    assert_same_adapters(&final_adapters(&run), expected);
}

#[test]
fn sigterm_checkpoints_exits_zero_and_resumes_exactly() {
    let (_, expected) = &reference();
    let tmp = tempfile::tempdir().unwrap();
    let (config, run, job) = start_and_reach_stage_2(tmp.path());
    job.signal("TERM");
    let end = job.finish();
    assert!(
        end.status.success(),
        "SIGTERM ends the job cleanly: {}",
        end.stderr
    );
    assert!(end.stdout.contains("--resume"));
    assert!(
        latest(&run).starts_with("stage-2-step-") || latest(&run).starts_with("stage-3-step-"),
        "{}",
        latest(&run)
    );

    assert_success(&modpo(&["train", "--config", &config, "--resume"]));
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
    let config = workspace(tmp.path());
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
    assert_success(&modpo(&[
        "train",
        "--config",
        &config,
        "--resume-from-stage",
        "3",
    ]));
    assert_same_adapters(&final_adapters(&run), expected);
}

#[test]
fn corrupted_and_half_written_checkpoints_fall_back_to_the_previous_one() {
    let (_, expected) = &reference();
    let tmp = tempfile::tempdir().unwrap();
    let (config, run, job) = start_and_reach_stage_2(tmp.path());
    job.kill();

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
    let changed = TrainToml {
        learning_rate: 1e-3,
        beta: 0.2,
        ..run_toml()
    };
    let config = workspace_with(tmp.path(), &changed);
    let out = modpo(&["train", "--config", &config, "--resume-from-stage", "3"]);
    let log = stderr(&out);
    assert!(!out.status.success());
    assert!(
        log.contains("train.learning_rate: 0.002 -> 0.001")
            && log.contains("method.beta: 0.1 -> 0.2"),
        "{log}"
    );

    // A different split of the same global batch is allowed.
    let split = TrainToml {
        micro_batch: 2,
        ..run_toml()
    };
    let config = workspace_with(tmp.path(), &split);
    assert_success(&modpo(&[
        "train",
        "--config",
        &config,
        "--resume-from-stage",
        "3",
    ]));
}

/// The chain of slurm/stage.sbatch: one process per stage, each ending with --until-stage.
#[test]
fn one_job_per_stage_equals_full_run() {
    let (_, expected) = &reference();
    let tmp = tempfile::tempdir().unwrap();
    let config = workspace(tmp.path());
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

/// Panacea on AdaLoRA, killed with SIGKILL inside its one stage and resumed, ends with exactly
/// the adapters of an uninterrupted run: the rank allocator's averages come back from the
/// checkpoint, and its masks (`*_kept`, which have dropped triplets by then) match too.
#[test]
fn kill_9_inside_panacea_then_resume_equals_uninterrupted_run() {
    let toml = TrainToml {
        method: "panacea".into(),
        ..run_toml()
    };
    let tmp = tempfile::tempdir().unwrap();
    let uninterrupted = tmp.path().join("uninterrupted");
    let config = workspace_with(&uninterrupted, &toml);
    assert_success(&modpo(&["train", "--config", &config]));
    let expected = final_adapters(&uninterrupted.join("run"));
    let dropped = expected
        .iter()
        .filter(|(name, _)| name.ends_with("_kept"))
        .map(|(_, kept)| kept.numel() as f64 - kept.sum(tch::Kind::Float).double_value(&[]))
        .sum::<f64>();
    assert!(dropped > 0.0, "rank allocation dropped triplets by the end");

    let dir = tmp.path().join("killed");
    let config = workspace_with(&dir, &toml);
    let run = dir.join("run");
    let mut job = Job::modpo(&["train", "--config", &config]);
    job.wait_until(
        "a checkpoint after step 4",
        Duration::from_millis(2),
        || latest(&run).as_str() >= "stage-1-step-0000004",
    );
    job.kill(); // SIGKILL
    assert!(
        !run.join("adapters.safetensors").exists(),
        "killed before the end"
    );
    assert_success(&modpo(&["train", "--config", &config, "--resume"]));
    assert_same_adapters(&final_adapters(&run), &expected);
}
