//! The NCCL collective on real GPUs. Without a CUDA device these tests skip at run time
//! (`test_skip::skip`, listed by the test summary); `tools/gpu_nccl_check.sh` runs the same
//! check on a GPU machine that has no Rust toolchain.

mod common;

use std::process::Command;
use std::time::Duration;

use common::test_skip::skip;
use common::{library_path_with, mpirun, nccl_link_dir, run_with_deadline, CHECK};

/// NCCL set-up takes seconds; this only keeps a hang from hanging the test.
const LIMIT: Duration = Duration::from_secs(300);

/// Points the check at torch's NCCL (cudarc opens `libnccl.so`, torch ships `libnccl.so.2`).
fn with_nccl_link(command: &mut Command) {
    if let Some(dir) = nccl_link_dir() {
        command.env("LD_LIBRARY_PATH", library_path_with(&dir));
    }
}

#[test]
fn one_rank_nccl_all_reduce_equals_the_local_gradients() {
    if !tch::Cuda::is_available() {
        skip("no CUDA device");
        return;
    }
    let mut command = Command::new(CHECK);
    command.arg("--nccl-single");
    with_nccl_link(&mut command);
    let run = run_with_deadline(command, LIMIT);
    assert_eq!(run.code, Some(0), "output:\n{}", run.output);
    assert!(
        run.output
            .contains("all-reduced gradients equal the local ones: yes"),
        "{}",
        run.output
    );
}

#[test]
fn two_ranks_on_two_gpus_pass_every_check() {
    if !tch::Cuda::is_available() {
        skip("no CUDA device");
        return;
    }
    if tch::Cuda::device_count() < 2 {
        skip("fewer than 2 CUDA devices");
        return;
    }
    let mut command = mpirun(2);
    command.arg("--cuda");
    with_nccl_link(&mut command);
    // mpirun passes LD_LIBRARY_PATH on to the ranks it starts on this node.
    let run = run_with_deadline(command, LIMIT);
    assert_eq!(run.code, Some(0), "output:\n{}", run.output);
    for rank in 0..2 {
        assert!(
            run.output
                .contains(&format!("rank {rank}/2 [nccl]: all_reduce_mean")),
            "{}",
            run.output
        );
        assert!(run
            .output
            .contains(&format!("rank {rank}: all checks passed")));
    }
}

#[test]
fn without_cuda_nccl_is_refused_with_an_error_not_a_panic() {
    if tch::Cuda::is_available() {
        skip("a CUDA device is present (the tests above cover it)");
        return;
    }
    // cudarc panics when libcuda is missing: reaching it would crash the check.
    let mut command = Command::new(CHECK);
    command.arg("--nccl-single");
    let run = run_with_deadline(command, LIMIT);
    assert_eq!(run.code, Some(0), "{}", run.output);
    assert!(
        run.output.contains("skipped: no CUDA device"),
        "{}",
        run.output
    );
    let mut command = Command::new(CHECK);
    command.args(["--collective", "nccl", "--cuda"]);
    let run = run_with_deadline(command, LIMIT);
    assert_eq!(run.code, Some(1), "{}", run.output);
    assert!(
        run.output
            .contains("no CUDA device is available to torch, so NCCL cannot be used"),
        "{}",
        run.output
    );
}
