//! Running `modpo-collective-check` (alone or under `mpirun`) with a deadline: a collective that
//! hangs must fail the test, not hang it. And [`test_skip::skip`], a run-time skip the test
//! summary sees.

#![allow(dead_code)] // each test file uses a part

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[path = "../../../tools/test_skip.rs"]
pub mod test_skip;

/// The check binary built with these tests.
pub const CHECK: &str = env!("CARGO_BIN_EXE_modpo-collective-check");

/// What a finished run left.
#[derive(Debug)]
pub struct Run {
    /// None when killed by a signal.
    pub code: Option<i32>,
    /// Standard output and error, interleaved by stream (stdout first).
    pub output: String,
    pub elapsed: Duration,
}

/// `mpirun` as CI runs it: as root, and with more ranks than the 2 cores.
pub fn mpirun(ranks: usize) -> Command {
    let found = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|dir| dir.join("mpirun").is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "mpirun is not on PATH: `make setup` installs it (Debian openmpi-bin)"
    );
    let mut command = Command::new("mpirun");
    command.args([
        "--allow-run-as-root",
        "--oversubscribe",
        "-np",
        &ranks.to_string(),
        CHECK,
    ]);
    command
}

/// Runs `command` in its own process group; if it is still running after `limit`, kills the
/// whole group (mpirun and its ranks) and panics with what it printed so far. Output goes to
/// files, not pipes, so a straggler holding them open cannot block the test.
pub fn run_with_deadline(mut command: Command, limit: Duration) -> Run {
    let stdout = tempfile::NamedTempFile::new().expect("temporary file");
    let stderr = tempfile::NamedTempFile::new().expect("temporary file");
    let start = Instant::now();
    let mut child = command
        .stdout(Stdio::from(stdout.reopen().expect("reopen")))
        .stderr(Stdio::from(stderr.reopen().expect("reopen")))
        .process_group(0)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {command:?}: {e}"));
    let read = || {
        let mut output = String::new();
        for file in [&stdout, &stderr] {
            let _ = file
                .reopen()
                .and_then(|mut f| f.read_to_string(&mut output));
        }
        output
    };
    loop {
        if let Some(status) = child.try_wait().expect("waiting for the child") {
            return Run {
                code: status.code(),
                output: read(),
                elapsed: start.elapsed(),
            };
        }
        if start.elapsed() > limit {
            let group = format!("-{}", child.id());
            let _ = Command::new("kill").args(["-KILL", "--", &group]).status();
            let _ = child.wait();
            panic!(
                "{command:?} still running after {limit:?}; killed its process group. \
                 Output:\n{}",
                read()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// cudarc opens `libnccl.so`, while torch's NCCL is `libnccl.so.2`: a directory holding the
/// link, for LD_LIBRARY_PATH. Looks for the NCCL this (torch-linked) test process loaded.
pub fn nccl_link_dir() -> Option<PathBuf> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    let nccl = maps
        .lines()
        .filter_map(|line| line.split_whitespace().nth(5))
        .find(|path| path.contains("/libnccl.so"))?
        .to_string();
    let dir = std::env::temp_dir().join(format!("modpo-nccl-link-{}", std::process::id()));
    std::fs::create_dir_all(&dir).ok()?;
    let link = dir.join("libnccl.so");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(nccl, &link).ok()?;
    Some(dir)
}

/// `LD_LIBRARY_PATH` with `dir` in front.
pub fn library_path_with(dir: &std::path::Path) -> String {
    match std::env::var("LD_LIBRARY_PATH") {
        Ok(old) if !old.is_empty() => format!("{}:{old}", dir.display()),
        _ => dir.display().to_string(),
    }
}
