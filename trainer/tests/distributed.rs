//! Data parallelism on CPU over MPI: `mpirun -np 2` trains exactly like one process with twice
//! the accumulation steps and the same global batch, and both ranks hold bit-identical
//! adapters after every step (`train.check_replicas_every = 1` fails the run otherwise).

use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Output};

use tch::Tensor;

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_modpo-trainer")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).to_string()
}

fn config(dir: &Path, output: &str, method: &str) -> String {
    let sample = format!(
        "{}/../../shared/data/pku_saferlhf_sample.jsonl",
        env!("CARGO_MANIFEST_DIR")
    );
    let text = format!(
        "[model]\npath = \"model\"\ndevice = \"cpu\"\n\
         [data]\nformat = \"pku-saferlhf\"\ntrain_file = \"{sample}\"\neval_fraction = 0.0\n\
         max_length = 96\nglobal_batch = 8\nmicro_batch = 4\ncache_dir = \"cache-{output}\"\n\
         [method]\nname = \"{method}\"\nbeta = 0.1\n\
         [train]\noutput_dir = \"{output}\"\nlearning_rate = 5e-3\nwarmup_ratio = 0.1\nmax_steps = 4\n\
         check_replicas_every = 1\n"
    );
    let path = dir.join(format!("{output}.toml"));
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_string()
}

/// `mpirun -np 2 modpo-trainer train --config CONFIG` on this machine (as root, oversubscribed).
fn train_on_two_ranks(config: &str) -> Command {
    let mut command = Command::new("mpirun");
    command.args([
        "--allow-run-as-root",
        "--oversubscribe",
        "-np",
        "2",
        bin(),
        "train",
        "--config",
        config,
    ]);
    command
}

fn tiny_model(dir: &Path) {
    let out = Command::new(bin())
        .args(["tiny-model", "--out", dir.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
}

fn adapters(run: &Path) -> HashMap<String, Tensor> {
    Tensor::read_safetensors(run.join("adapters.safetensors"))
        .unwrap()
        .into_iter()
        .collect()
}

fn two_ranks_equal_one_rank(method: &str) {
    let tmp = tempfile::tempdir().unwrap();
    tiny_model(&tmp.path().join("model"));

    // One rank: 8 pairs per step = 4 x 2 accumulation steps.
    let single = config(tmp.path(), "single", method);
    let out = Command::new(bin())
        .args(["train", "--config", &single])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));

    // Two ranks: 8 pairs per step = 4 x 1 x 2 ranks.
    let double = config(tmp.path(), "double", method);
    let out = train_on_two_ranks(&double)
        .output()
        .expect("mpirun is installed by `make setup`");
    assert!(
        out.status.success(),
        "mpirun -np 2 failed:\n{}",
        stderr(&out)
    );

    let (a, b) = (
        adapters(&tmp.path().join("single")),
        adapters(&tmp.path().join("double")),
    );
    // The two runs add the same micro-batch gradients in a different order (two backwards
    // into `.grad` on one rank, an all-reduce across two), so they agree to float rounding.
    // Adam's update m / (sqrt(v) + eps) magnifies that rounding up to lr / eps-fold where a
    // gradient entry is near zero, so after 4 steps a few entries differ by ~1e-5; 1e-4 is 2%
    // of one step at lr = 5e-3, while a sharding or scaling error moves adapters by ~lr.
    let mut largest_change = 0f64;
    for (name, t) in &a {
        let diff = (t - &b[name]).abs().max().double_value(&[]);
        assert!(
            diff <= 1e-4,
            "{method} {name}: 2 ranks vs 1 rank differ by {diff}"
        );
        largest_change = largest_change.max(t.abs().max().double_value(&[]));
    }
    assert!(largest_change > 0.0);
    // Rank 0 alone wrote the run: one metrics line per step.
    let metrics = std::fs::read_to_string(tmp.path().join("double/metrics.jsonl")).unwrap();
    let single_metrics = std::fs::read_to_string(tmp.path().join("single/metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), single_metrics.lines().count());
}

#[test]
fn curriculum_on_two_mpi_ranks_equals_one_rank() {
    two_ranks_equal_one_rank("curriculum");
}

#[test]
fn panacea_on_two_mpi_ranks_equals_one_rank() {
    two_ranks_equal_one_rank("panacea");
}

/// SIGKILL to one rank of `mpirun -np 2 ... train` ends the whole job, non-zero, in seconds
/// (the surviving rank must not wait forever in its next all-reduce).
#[test]
fn killing_one_rank_ends_the_job() {
    use std::time::{Duration, Instant};
    let tmp = tempfile::tempdir().unwrap();
    tiny_model(&tmp.path().join("model"));
    let text = std::fs::read_to_string(config(tmp.path(), "killed", "curriculum"))
        .unwrap()
        .replace("max_steps = 4", "max_steps = 100000\nepochs = 50");
    let path = tmp.path().join("killed.toml");
    std::fs::write(&path, text).unwrap();
    let mut job = train_on_two_ranks(path.to_str().unwrap())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Wait until training runs (metrics appear), then kill one rank.
    let started = Instant::now();
    while std::fs::read_to_string(tmp.path().join("killed/metrics.jsonl"))
        .map(|m| m.lines().count())
        .unwrap_or(0)
        < 2
    {
        assert!(
            job.try_wait().unwrap().is_none(),
            "the job ended before training started"
        );
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "training did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let ranks = Command::new("pgrep")
        .args(["-P", &job.id().to_string(), "-f", "modpo-trainer"])
        .output()
        .unwrap();
    let pids: Vec<String> = String::from_utf8_lossy(&ranks.stdout)
        .split_whitespace()
        .map(String::from)
        .collect();
    assert_eq!(pids.len(), 2, "two ranks under mpirun: {pids:?}");
    assert!(Command::new("kill")
        .args(["-KILL", &pids[1]])
        .status()
        .unwrap()
        .success());
    let killed_at = Instant::now();
    loop {
        if let Some(status) = job.try_wait().unwrap() {
            assert!(!status.success(), "the job must fail");
            break;
        }
        if killed_at.elapsed() > Duration::from_secs(30) {
            let _ = job.kill();
            panic!("the job still ran 30 s after one rank was killed");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!(
        "job ended {:.1} s after the kill",
        killed_at.elapsed().as_secs_f64()
    );
}
