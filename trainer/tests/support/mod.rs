//! Helpers shared by the tests of `trainer/tests`: running the `modpo-trainer` binary and
//! reading what it printed, a tiny model and a training config on the PKU-SafeRLHF sample,
//! and waiting for a condition or a child process with a deadline.
//!
//! Deadlines here only keep a broken test from hanging forever: they are minutes, far above
//! what a healthy run takes even on a loaded machine, and no test asserts how fast anything
//! was. (`tests/src/lib.rs` holds the helpers of the workspace's `tests/` crate; that crate
//! depends on this one, so these tests cannot use it without a dependency cycle.)

#![allow(dead_code)] // each test file uses a part

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use tch::Tensor;

/// Run-time skips the test summary lists (`tools/test_skip.rs`).
#[path = "../../../tools/test_skip.rs"]
mod test_skip;
#[allow(unused_imports)] // each test file uses a part
pub use test_skip::skip;

/// How long any wait of these tests may last before the test fails as hung.
pub const PATIENCE: Duration = Duration::from_secs(600);

/// The binary built with these tests.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_modpo-trainer")
}

/// `modpo-trainer ARGS`, run to the end with its output captured.
pub fn modpo(args: &[&str]) -> Output {
    Command::new(bin())
        .args(args)
        .output()
        .expect("run modpo-trainer")
}

pub fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).to_string()
}

pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).to_string()
}

/// Panics with the command's stderr unless it exited with status 0.
#[track_caller]
pub fn assert_success(output: &Output) {
    assert!(output.status.success(), "{}", stderr(output));
}

/// The project root (the workspace above `trainer/`).
pub fn project_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The PKU-SafeRLHF sample in `../shared/data`.
pub fn pku_sample() -> PathBuf {
    project_root().join("../shared/data/pku_saferlhf_sample.jsonl")
}

/// Writes the tiny random Llama model with the byte-level tokenizer into `dir` (what
/// `modpo-trainer tiny-model --out DIR --seed SEED` writes).
pub fn tiny_model(dir: &Path, seed: i64) {
    std::fs::create_dir_all(dir).unwrap();
    modpo_trainer::model::tiny::write_tiny_model(dir, &Default::default(), seed).unwrap();
}

/// A training config on the tiny model in `model/` beside it and the PKU-SafeRLHF sample,
/// on CPU: every test sets what it depends on and takes the rest from `Default`.
#[derive(Debug, Clone)]
pub struct TrainToml {
    pub max_length: usize,
    /// `data.cache_dir`, when the runs of a test must not share one.
    pub cache_dir: Option<String>,
    pub method: String,
    pub beta: f64,
    pub micro_batch: usize,
    pub output_dir: String,
    pub learning_rate: f64,
    pub warmup_ratio: f64,
    pub max_steps: usize,
    /// Further lines of `[train]`, each ending in a newline.
    pub train_extra: String,
}

impl Default for TrainToml {
    fn default() -> Self {
        TrainToml {
            max_length: 96,
            cache_dir: None,
            method: "curriculum".into(),
            beta: 0.1,
            micro_batch: 4,
            output_dir: "run".into(),
            learning_rate: 5e-3,
            warmup_ratio: 0.1,
            max_steps: 4,
            train_extra: String::new(),
        }
    }
}

impl TrainToml {
    pub fn text(&self) -> String {
        let sample = pku_sample();
        let cache = match &self.cache_dir {
            Some(dir) => format!("cache_dir = \"{dir}\"\n"),
            None => String::new(),
        };
        // `{:?}` keeps floats floats in TOML (`0.0`, not `0`).
        format!(
            "[model]\npath = \"model\"\ndevice = \"cpu\"\n\
             [data]\nformat = \"pku-saferlhf\"\ntrain_file = \"{}\"\neval_fraction = 0.0\n\
             max_length = {}\nglobal_batch = 8\nmicro_batch = {}\n{cache}\
             [method]\nname = \"{}\"\nbeta = {:?}\n\
             [train]\noutput_dir = \"{}\"\nlearning_rate = {:?}\nwarmup_ratio = {:?}\n\
             max_steps = {}\n{}",
            sample.display(),
            self.max_length,
            self.micro_batch,
            self.method,
            self.beta,
            self.output_dir,
            self.learning_rate,
            self.warmup_ratio,
            self.max_steps,
            self.train_extra,
        )
    }

    /// Writes the config to `path` and returns the path as the `--config` argument.
    pub fn write(&self, path: &Path) -> String {
        std::fs::write(path, self.text()).unwrap();
        path.to_str().unwrap().to_string()
    }
}

/// A directory with the tiny model (seed 3) and `toml` in `run.toml`; returns the config's
/// path.
pub fn workspace_with(dir: &Path, toml: &TrainToml) -> String {
    std::fs::create_dir_all(dir).unwrap();
    if !dir.join("model").exists() {
        tiny_model(&dir.join("model"), 3);
    }
    toml.write(&dir.join("run.toml"))
}

/// The adapters a finished run wrote, by name.
pub fn final_adapters(run: &Path) -> std::collections::HashMap<String, Tensor> {
    Tensor::read_safetensors(run.join("adapters.safetensors"))
        .unwrap()
        .into_iter()
        .collect()
}

/// Polls `done` every `every` until it holds; panics if `PATIENCE` passes first.
#[track_caller]
pub fn wait_until(what: &str, every: Duration, mut done: impl FnMut() -> bool) {
    let started = Instant::now();
    while !done() {
        assert!(
            started.elapsed() < PATIENCE,
            "{what}: still not the case after {PATIENCE:?}"
        );
        std::thread::sleep(every);
    }
}

/// A child process in its own process group (so that a hung one can be killed with everything
/// it started, e.g. the ranks under `mpirun`), its stdout and stderr going to files rather than
/// pipes: nothing blocks on a full pipe, nor on a straggler holding one open.
pub struct Job {
    child: Child,
    stdout: tempfile::NamedTempFile,
    stderr: tempfile::NamedTempFile,
    what: String,
}

/// How a `Job` ended and what it printed.
#[derive(Debug)]
pub struct Finished {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Job {
    pub fn spawn(mut command: Command) -> Job {
        let stdout = tempfile::NamedTempFile::new().expect("temporary file");
        let stderr = tempfile::NamedTempFile::new().expect("temporary file");
        let what = format!("{command:?}");
        let child = command
            .stdout(Stdio::from(stdout.reopen().expect("reopen")))
            .stderr(Stdio::from(stderr.reopen().expect("reopen")))
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
        Job {
            child,
            stdout,
            stderr,
            what,
        }
    }

    /// `modpo-trainer ARGS` as a `Job`.
    pub fn modpo(args: &[&str]) -> Job {
        let mut command = Command::new(bin());
        command.args(args);
        Job::spawn(command)
    }

    pub fn id(&self) -> u32 {
        self.child.id()
    }

    fn read(file: &tempfile::NamedTempFile) -> String {
        let mut text = String::new();
        let _ = file.reopen().and_then(|mut f| f.read_to_string(&mut text));
        text
    }

    /// What the job printed to stderr so far.
    pub fn stderr(&self) -> String {
        Job::read(&self.stderr)
    }

    /// Sends `signal` (e.g. "TERM") to the job's main process.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &self.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill -{signal} {}", self.id());
    }

    /// SIGKILL to the whole process group, then waits for the main process.
    fn kill_group(&mut self) {
        let group = format!("-{}", self.id());
        let _ = Command::new("kill").args(["-KILL", "--", &group]).status();
        let _ = self.child.wait();
    }

    /// Polls `done` until it holds; panics (killing the job) if the job ends first or
    /// `PATIENCE` passes.
    #[track_caller]
    pub fn wait_until(&mut self, what: &str, every: Duration, mut done: impl FnMut() -> bool) {
        let started = Instant::now();
        while !done() {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!(
                    "the job ended ({status}) before {what}; stderr:\n{}",
                    self.stderr()
                );
            }
            if started.elapsed() > PATIENCE {
                self.kill_group();
                panic!(
                    "not {what} after {PATIENCE:?}; killed {}; stderr:\n{}",
                    self.what,
                    self.stderr()
                );
            }
            std::thread::sleep(every);
        }
    }

    /// Waits for the job to end; if it still runs after `PATIENCE`, kills its process group
    /// and panics with what it printed.
    #[track_caller]
    pub fn finish(mut self) -> Finished {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Finished {
                    status,
                    stdout: Job::read(&self.stdout),
                    stderr: Job::read(&self.stderr),
                };
            }
            if started.elapsed() > PATIENCE {
                self.kill_group();
                panic!(
                    "{} still running after {PATIENCE:?}; killed its process group. \
                     stderr:\n{}",
                    self.what,
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL to the main process only, then waits for it.
    pub fn kill(mut self) -> ExitStatus {
        self.child.kill().unwrap();
        self.child.wait().unwrap()
    }
}

impl Drop for Job {
    /// A job still running when its test ends (a failed assertion) goes with it.
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.kill_group();
        }
    }
}
