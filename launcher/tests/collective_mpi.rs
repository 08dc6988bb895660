//! The MPI collective across processes: `modpo-collective-check` under `mpirun -np N` checks
//! all-reduce means of mixed f32/f64/bf16 tensors against closed-form means, broadcast,
//! metric reductions and the barrier; a rank that fails in any way must end the whole job
//! with a non-zero status and the failure's message rather than leave the others waiting.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{mpirun, run_with_deadline, Run, CHECK};

/// Only keeps a hung job from hanging the test: a healthy run takes ~2 s, but how long one
/// takes on a loaded machine is not what these tests check.
const LIMIT: Duration = Duration::from_secs(300);

fn assert_all_passed(run: &Run, ranks: usize, backend: &str) {
    assert_eq!(run.code, Some(0), "output:\n{}", run.output);
    for rank in 0..ranks {
        assert!(
            run.output
                .contains(&format!("rank {rank}: all checks passed")),
            "rank {rank} did not finish; output:\n{}",
            run.output
        );
        assert!(
            run.output
                .contains(&format!("rank {rank}/{ranks} [{backend}]: barrier ok")),
            "rank {rank} did not use {backend}; output:\n{}",
            run.output
        );
    }
}

#[test]
fn two_ranks_pass_every_check() {
    let run = run_with_deadline(mpirun(2), LIMIT);
    assert_all_passed(&run, 2, "mpi");
}

#[test]
fn three_ranks_pass_every_check() {
    // An odd world size: the mean divides by 3, and rank 2 differs from both others.
    let run = run_with_deadline(mpirun(3), LIMIT);
    assert_all_passed(&run, 3, "mpi");
}

#[test]
fn a_process_on_its_own_needs_no_mpirun() {
    let run = run_with_deadline(Command::new(CHECK), LIMIT);
    assert_all_passed(&run, 1, "single");
}

#[test]
fn asking_for_mpi_without_mpirun_is_an_error() {
    let mut command = Command::new(CHECK);
    command.args(["--collective", "mpi"]);
    let run = run_with_deadline(command, LIMIT);
    assert_eq!(run.code, Some(1), "output:\n{}", run.output);
    assert!(
        run.output.contains("not started by mpirun or srun"),
        "{}",
        run.output
    );
}

#[test]
fn asking_for_single_under_mpirun_is_an_error() {
    let mut command = mpirun(2);
    command.args(["--collective", "single"]);
    let run = run_with_deadline(command, LIMIT);
    assert_ne!(run.code, Some(0), "output:\n{}", run.output);
    assert!(
        run.output.contains("which would train apart"),
        "{}",
        run.output
    );
}

/// Rank 1 fails after the first all-reduce while rank 0 waits in the second: the job must end
/// (non-zero, before `LIMIT`) with the failure's message, and rank 0 must not finish.
fn assert_failure_aborts_the_job(how: &str, message: &str) {
    let mut command = mpirun(2);
    command.args(["--fail-rank", "1", "--fail-how", how]);
    let run = run_with_deadline(command, LIMIT);
    assert!(
        matches!(run.code, Some(code) if code != 0) || run.code.is_none(),
        "{how}: exit {:?}; output:\n{}",
        run.code,
        run.output
    );
    assert!(
        run.output.contains(message),
        "{how}: no {message:?} in output:\n{}",
        run.output
    );
    assert!(
        !run.output.contains("all checks passed"),
        "{how}: a rank finished although rank 1 failed:\n{}",
        run.output
    );
    eprintln!("{how}: the job ended after {:?}", run.elapsed);
}

#[test]
fn an_error_on_one_rank_aborts_the_job() {
    assert_failure_aborts_the_job("error", "rank 1: error: injected failure on rank 1");
}

#[test]
fn a_panic_on_one_rank_aborts_the_job() {
    assert_failure_aborts_the_job("panic", "rank 1: panicked; aborting the job");
}

#[test]
fn a_panic_outside_run_or_abort_still_aborts_the_job() {
    assert_failure_aborts_the_job(
        "panic-unguarded",
        "rank 1: panicked with MPI initialised; aborting the MPI job",
    );
}

#[test]
fn a_killed_rank_ends_the_job() {
    assert_failure_aborts_the_job("kill", "exited on signal 9");
}
