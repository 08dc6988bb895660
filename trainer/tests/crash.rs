//! Crash anywhere, resume anywhere: `tools/crash_test.sh` in a small form (random kills and
//! crash points, one process and `mpirun -np 2`), a requeued SLURM job killed before its first
//! checkpoint, a run directory of another run refused, and a full or read-only disk under the
//! checkpoints and the reference cache.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use support::{
    assert_success, bin, final_adapters, project_root, skip, stderr, stdout, workspace_with,
    TrainToml,
};

/// `tools/crash_test.sh ARGS` with this build's binary; panics with its output unless every
/// trial ended identical to the uninterrupted run.
fn crash_test(args: &[&str]) {
    let work = tempfile::tempdir().unwrap();
    let out = Command::new(project_root().join("tools/crash_test.sh"))
        .args(args)
        .args(["--bin", bin(), "--work", work.path().to_str().unwrap()])
        .output()
        .unwrap();
    let text = format!("{}{}", stdout(&out), stderr(&out));
    assert!(out.status.success(), "{text}");
    let trials = args[args.iter().position(|a| *a == "--trials").unwrap() + 1];
    assert!(
        text.contains(&format!("{trials} of {trials} trials identical")),
        "{text}"
    );
}

/// Four trials: two kill -9 at random moments, two at crash points drawn by the script (its
/// seed fixes which: the default 20-trial run covers every point).
#[test]
fn kills_at_random_moments_and_crash_points_then_resume_equal_an_uninterrupted_run() {
    crash_test(&["--trials", "4", "--pairs", "160", "--seed", "7"]);
}

/// One rank of `mpirun -np 2` killed (at a random moment, then at a crash point of rank 0 or
/// 1); mpirun ends the other; the job resumes on two ranks.
#[test]
fn one_rank_killed_under_mpirun_then_resume_equals_an_uninterrupted_run() {
    crash_test(&[
        "--np", "2", "--trials", "2", "--pairs", "160", "--seed", "3",
    ]);
}

/// The PKU sample's run of these tests: 10 steps, a checkpoint every 4, the reference cache
/// in the run directory (two chunks of 256 pairs).
fn run_toml() -> TrainToml {
    TrainToml {
        max_length: 96,
        max_steps: 10,
        train_extra: "checkpoint_every = 4\n".into(),
        ..TrainToml::default()
    }
}

/// The final adapters of `run_toml`'s run, uninterrupted, in `dir`.
fn uninterrupted(dir: &Path) -> std::collections::HashMap<String, tch::Tensor> {
    let config = workspace_with(dir, &run_toml());
    assert_success(&train(&config, &[], None));
    final_adapters(&dir.join("run"))
}

/// `train --config CONFIG ARGS` with `MODPO_CRASH_AT=crash_at` (when given).
fn train(config: &str, args: &[&str], crash_at: Option<&str>) -> Output {
    let mut command = Command::new(bin());
    command.args(["train", "--config", config]).args(args);
    if let Some(point) = crash_at {
        command.env("MODPO_CRASH_AT", point);
    }
    command.output().unwrap()
}

/// What `slurm/start_args.sh CONFIG [STAGE]` tells a batch job to pass to `train`.
fn start_args(config: &str, stage: Option<&str>) -> Vec<String> {
    let out = Command::new(project_root().join("slurm/start_args.sh"))
        .arg(config)
        .args(stage)
        .output()
        .unwrap();
    assert_success(&out);
    stdout(&out).split_whitespace().map(String::from).collect()
}

fn reference_events(run: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["event"] == "reference")
        .collect()
}

/// single_node.sbatch's logic without SLURM: the first job starts the run and is killed (by
/// a crash point) after the first chunk of the reference pass, before any checkpoint; the
/// requeued job passes `--resume` because the run directory exists, reads that chunk,
/// computes the other and ends with the adapters of an uninterrupted run.
#[test]
fn a_requeued_job_killed_in_the_reference_pass_finishes_like_an_uninterrupted_run() {
    let tmp = tempfile::tempdir().unwrap();
    let expected = uninterrupted(&tmp.path().join("uninterrupted"));

    let dir = tmp.path().join("requeued");
    let config = workspace_with(&dir, &run_toml());
    let first = start_args(&config, None);
    assert!(first.is_empty(), "a new run: {first:?}");
    let killed = train(&config, &[], Some("reference-chunk-written:1"));
    assert!(!killed.status.success(), "killed: {}", stderr(&killed));
    assert!(
        !dir.join("run/checkpoints").exists(),
        "killed before any checkpoint"
    );

    let again = start_args(&config, None);
    assert_eq!(again, ["--resume"]);
    assert_eq!(
        start_args(&config, Some("1")),
        ["--resume"],
        "stage.sbatch, stage 1"
    );
    let args: Vec<&str> = again.iter().map(String::as_str).collect();
    let resumed = train(&config, &args, None);
    assert_success(&resumed);
    assert!(
        stderr(&resumed).contains("starting the run from its beginning"),
        "{}",
        stderr(&resumed)
    );
    let events = reference_events(&dir.join("run"));
    assert_eq!(
        events.len(),
        1,
        "the killed run never finished its pass: {events:?}"
    );
    assert_eq!(
        (
            &events[0]["chunks"],
            &events[0]["found"],
            &events[0]["computed"]
        ),
        (&2.into(), &1.into(), &1.into()),
        "the chunk written before the kill is reused"
    );
    let got = final_adapters(&dir.join("run"));
    assert_eq!(got.len(), expected.len());
    for (name, t) in &expected {
        assert!(got[name].equal(t), "adapter {name} differs");
    }
}

/// `--resume` without a checkpoint still refuses a directory that holds another run, with
/// the differences, whether it recorded its identity (killed in the reference pass) or only
/// its config (killed while loading the data).
#[test]
fn resume_without_a_checkpoint_refuses_another_run_with_the_differences() {
    for (crash_at, by) in [
        ("reference-chunk-written:1", "run_identity.json"),
        ("data-loaded:1", "resolved_config.json"),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let config = workspace_with(tmp.path(), &run_toml());
        assert!(!train(&config, &[], Some(crash_at)).status.success());
        let changed = TrainToml {
            learning_rate: 1e-3,
            ..run_toml()
        };
        let config = workspace_with(tmp.path(), &changed);
        let out = train(&config, &["--resume"], None);
        assert!(!out.status.success());
        let run = tmp.path().join("run");
        assert!(
            stderr(&out).contains(&format!(
                "run directory {} belongs to a different run (by its {by}):\n  \
                 train.learning_rate: 0.005 -> 0.001",
                run.display()
            )),
            "{}",
            stderr(&out)
        );
        // Without --resume the directory is still refused.
        let out = train(&config, &[], None);
        assert!(
            stderr(&out).contains("already holds a run"),
            "{}",
            stderr(&out)
        );
    }
}

/// A tmpfs of `kib` KiB mounted at `dir` (created), unmounted on drop; `None` where this
/// process may not mount (not root, or a container without the capability).
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, kib: usize) -> Option<Tmpfs> {
        std::fs::create_dir_all(dir).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={kib}k"), "tmpfs"])
            .arg(dir)
            .output()
            .is_ok_and(|o| o.status.success());
        ok.then(|| Tmpfs(dir.to_path_buf()))
    }

    /// Fills the file system but `room` bytes.
    fn fill_leaving(&self, room: u64) {
        let free = Command::new("df")
            .args(["--output=avail", "-B1"])
            .arg(&self.0)
            .output()
            .unwrap();
        let free: u64 = stdout(&free)
            .lines()
            .nth(1)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let filler = vec![0u8; free.saturating_sub(room) as usize];
        std::fs::write(self.0.join("filler"), filler).unwrap();
    }

    fn remount_read_only(&self) {
        let out = Command::new("mount")
            .args(["-o", "remount,ro"])
            .arg(&self.0)
            .output()
            .unwrap();
        assert_success(&out);
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).output();
    }
}

/// Names of the entries of `dir`, sorted.
fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// The checkpoints directory on a small tmpfs that fills up after the first checkpoint: the
/// run fails naming the file it could not write, leaves no partial checkpoint, keeps the
/// first one valid, and (space freed) resumes from it to the uninterrupted run's adapters.
#[test]
fn a_full_disk_while_checkpointing_fails_cleanly_and_the_run_resumes_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let expected = uninterrupted(&tmp.path().join("uninterrupted"));

    let dir = tmp.path().join("full");
    let config = workspace_with(&dir, &run_toml());
    let checkpoints = dir.join("run/checkpoints");
    let Some(disk) = Tmpfs::mount(&checkpoints, 16384) else {
        skip("cannot mount a tmpfs here (needs root with CAP_SYS_ADMIN)");
        return;
    };
    // Room for one checkpoint and a half (every checkpoint of a run has the same size).
    let one = std::fs::read_dir(
        tmp.path()
            .join("uninterrupted/run/checkpoints/stage-1-final"),
    )
    .unwrap()
    .flatten()
    .map(|e| e.metadata().unwrap().len())
    .sum::<u64>();
    disk.fill_leaving(one * 3 / 2);
    let out = train(&config, &[], None);
    let log = stderr(&out);
    assert!(!out.status.success());
    assert!(
        log.contains(&format!(
            "cannot write checkpoint {}/stage-1-step-0000008 (the previous one stays valid): \
             cannot write {}/.tmp-stage-1-step-0000008-",
            checkpoints.display(),
            checkpoints.display()
        )) && log.contains("No space left on device"),
        "{log}"
    );
    assert_eq!(
        entries(&checkpoints),
        ["filler", "latest", "stage-1-step-0000004"],
        "no partial checkpoint is left"
    );

    std::fs::remove_file(checkpoints.join("filler")).unwrap();
    assert_success(&train(&config, &["--resume"], None));
    let got = final_adapters(&dir.join("run"));
    for (name, t) in &expected {
        assert!(got[name].equal(t), "adapter {name} differs");
    }
}

/// The reference cache on a full, then a read-only, file system: the run fails naming the
/// chunk it could not write and leaves no partial chunk.
#[test]
fn a_full_or_read_only_cache_fails_naming_the_chunk() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let toml = TrainToml {
        cache_dir: Some(cache.display().to_string()),
        ..run_toml()
    };
    let config = workspace_with(tmp.path(), &toml);
    let Some(disk) = Tmpfs::mount(&cache, 16384) else {
        skip("cannot mount a tmpfs here (needs root with CAP_SYS_ADMIN)");
        return;
    };
    // A first run leaves the token cache (and reference chunks, removed) in `cache`.
    assert_success(&train(&config, &["--until-stage", "1"], None));
    let reference_dir = entries(&cache)
        .into_iter()
        .find(|n| n.starts_with("reference-"))
        .unwrap();
    std::fs::remove_dir_all(cache.join(&reference_dir)).unwrap();
    std::fs::remove_dir_all(tmp.path().join("run")).unwrap();
    disk.fill_leaving(1024);
    let out = train(&config, &[], None);
    let log = stderr(&out);
    assert!(!out.status.success());
    assert!(
        log.contains("cannot write a reference cache chunk")
            && log.contains(&format!(
                "{}/chunk-000000.tmp",
                cache.join(&reference_dir).display()
            ))
            && log.contains("No space left on device"),
        "{log}"
    );
    assert!(
        entries(&cache.join(&reference_dir)).is_empty(),
        "no partial chunk"
    );

    std::fs::remove_file(cache.join("filler")).unwrap();
    std::fs::remove_dir_all(cache.join(&reference_dir)).unwrap();
    disk.remount_read_only();
    std::fs::remove_dir_all(tmp.path().join("run")).unwrap();
    let out = train(&config, &[], None);
    let log = stderr(&out);
    assert!(!out.status.success());
    assert!(
        log.contains(&format!(
            "cannot create {}",
            cache.join(&reference_dir).display()
        )) && log.contains("Read-only file system"),
        "{log}"
    );
}
