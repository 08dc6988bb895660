//! Who am I and how do I talk to the other ranks. Defines [`Topology`] (rank, local rank,
//! world size from `mpirun` / PMI / `srun`), the [`Collective`] trait with its three
//! implementations ([`Single`], [`Mpi`] for CPU tensors, [`Nccl`] for CUDA tensors), [`init`]
//! which picks one, and the failure helpers [`run_or_abort`] / [`abort_job`]. Knows nothing of
//! models.
//!
//! # Use from the trainer
//!
//! ```no_run
//! use modpo_launcher::{init, run_or_abort, CollectiveChoice, Collective};
//! # fn train(_: &dyn Collective) -> Result<(), String> { Ok(()) }
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // An error here is safe to return: either MPI is not up, or the job was already aborted.
//! let (topology, collective) = init(CollectiveChoice::Auto, /* device_is_cuda */ true)?;
//! // Place the model on `modpo_launcher::cuda_ordinal(topology.local_rank)?` when on GPU.
//! // From here on, an error or a panic on any rank must end the whole job, never leave the
//! // other ranks blocked in their next all-reduce: run the job inside `run_or_abort`.
//! run_or_abort(collective.as_ref(), || train(collective.as_ref()));
//! drop(collective); // MPI_Finalize, after every rank finished
//! # Ok(())
//! # }
//! ```
//!
//! In the loop: `collective.broadcast(&mut trainable_variables)` once before the first step
//! (rank 0's initial adapters), then per optimizer step
//! `collective.all_reduce_mean(&mut gradients)` and
//! `collective.all_reduce_f64(&mut [loss_sum, pair_count], Op::Sum)` for the logged metrics.

mod bucket;
mod collective;
mod device_memory;
mod mpi_cpu;
mod nccl;
mod single;
mod topology;

use std::fmt;
use std::io::Write;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::str::FromStr;

pub use collective::{Collective, CollectiveError, Op};
pub use device_memory::cuda_memory_in_use;
pub use mpi_cpu::Mpi;
pub use nccl::{cuda_ordinal, Nccl};
pub use single::Single;
pub use topology::{Launcher, Topology, TopologyError};

/// Which collective to use; `Auto` decides from the world size and the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CollectiveChoice {
    /// NCCL on GPU with several ranks, MPI with several CPU ranks, single otherwise.
    #[default]
    Auto,
    Single,
    Mpi,
    Nccl,
}

impl CollectiveChoice {
    /// The collective this choice means for `world_size` ranks on CUDA or CPU, or why it
    /// cannot work there.
    pub fn resolve(
        self,
        world_size: usize,
        device_is_cuda: bool,
    ) -> Result<CollectiveChoice, CollectiveError> {
        let unusable = |reason: String| CollectiveError::Unusable {
            choice: self,
            reason,
        };
        match self {
            CollectiveChoice::Auto if world_size == 1 => Ok(CollectiveChoice::Single),
            CollectiveChoice::Auto if device_is_cuda => Ok(CollectiveChoice::Nccl),
            CollectiveChoice::Auto => Ok(CollectiveChoice::Mpi),
            CollectiveChoice::Single if world_size > 1 => Err(unusable(format!(
                "the launcher started {world_size} ranks, which would train apart"
            ))),
            CollectiveChoice::Mpi if world_size == 1 => Err(unusable(
                "this process was not started by mpirun or srun (world size 1); use `single` \
                 or `auto`"
                    .into(),
            )),
            CollectiveChoice::Mpi if device_is_cuda => Err(unusable(
                "it reduces CPU tensors and the model is on CUDA; use `nccl` or `auto`".into(),
            )),
            CollectiveChoice::Nccl if !device_is_cuda => Err(unusable(
                "it reduces CUDA tensors and the model is on the CPU; use `mpi` or `auto`".into(),
            )),
            choice => Ok(choice),
        }
    }
}

impl fmt::Display for CollectiveChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CollectiveChoice::Auto => "auto",
            CollectiveChoice::Single => "single",
            CollectiveChoice::Mpi => "mpi",
            CollectiveChoice::Nccl => "nccl",
        })
    }
}

/// `s` is not one of auto, single, mpi, nccl.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("unknown collective {0:?}: expected auto, single, mpi or nccl")]
pub struct UnknownCollective(pub String);

impl FromStr for CollectiveChoice {
    type Err = UnknownCollective;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(CollectiveChoice::Auto),
            "single" => Ok(CollectiveChoice::Single),
            "mpi" => Ok(CollectiveChoice::Mpi),
            "nccl" => Ok(CollectiveChoice::Nccl),
            _ => Err(UnknownCollective(s.to_string())),
        }
    }
}

/// Reads the topology from the environment and sets up the collective `choice` resolves to.
///
/// MPI is initialised only when the environment says there are several ranks (a process on
/// its own needs no `mpirun`); an explicit `Nccl` with one rank makes its NCCL id without MPI.
/// The returned collective owns MPI: drop it last, after the job, to finalise MPI.
///
/// An `Err` is always safe to return from `main`: errors found after MPI is up abort the
/// whole job instead of being returned (see [`Mpi::init`], [`Nccl::init`]).
pub fn init(
    choice: CollectiveChoice,
    device_is_cuda: bool,
) -> Result<(Topology, Box<dyn Collective>), CollectiveError> {
    let topology = Topology::from_env()?;
    let collective: Box<dyn Collective> =
        match choice.resolve(topology.world_size, device_is_cuda)? {
            CollectiveChoice::Single | CollectiveChoice::Auto => Box::new(Single),
            CollectiveChoice::Mpi => Box::new(Mpi::init(&topology)?),
            CollectiveChoice::Nccl if topology.world_size == 1 => {
                Box::new(Nccl::single(cuda_ordinal(topology.local_rank)?)?)
            }
            CollectiveChoice::Nccl => Box::new(Nccl::init(&topology, Mpi::init(&topology)?)),
        };
    Ok((topology, collective))
}

/// Prints nothing, flushes the standard streams and ends every rank of the job with `code`
/// (`MPI_Abort` under MPI, so `mpirun` / `srun` exits non-zero at once).
pub fn abort_job(collective: &dyn Collective, code: i32) -> ! {
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    collective.abort(code)
}

/// Runs `body`; if it returns an error, prints `rank R: error: {error:#}` (the whole chain for
/// an `anyhow::Error`) and aborts the job with status 1; if it panics (the panic message is
/// already printed), aborts with status 101. Never returns otherwise.
pub fn run_or_abort<T, E: fmt::Display>(
    collective: &dyn Collective,
    body: impl FnOnce() -> Result<T, E>,
) -> T {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(value)) => value,
        Ok(Err(error)) => {
            eprintln!("rank {}: error: {error:#}", collective.rank());
            abort_job(collective, 1)
        }
        Err(_) => {
            eprintln!("rank {}: panicked; aborting the job", collective.rank());
            abort_job(collective, 101)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{run_or_abort, CollectiveChoice};
    use CollectiveChoice::*;

    #[test]
    fn auto_picks_by_world_size_and_device() {
        assert_eq!(Auto.resolve(1, false).unwrap(), Single);
        assert_eq!(Auto.resolve(1, true).unwrap(), Single);
        assert_eq!(Auto.resolve(4, true).unwrap(), Nccl);
        assert_eq!(Auto.resolve(2, false).unwrap(), Mpi);
    }

    #[test]
    fn explicit_choices_that_cannot_work_say_why() {
        let err = Single.resolve(2, false).unwrap_err().to_string();
        assert_eq!(
            err,
            "collective `single` cannot be used here: the launcher started 2 ranks, which \
             would train apart"
        );
        assert!(Mpi
            .resolve(1, false)
            .unwrap_err()
            .to_string()
            .contains("mpirun"));
        assert!(Mpi
            .resolve(2, true)
            .unwrap_err()
            .to_string()
            .contains("CUDA"));
        assert!(Nccl
            .resolve(2, false)
            .unwrap_err()
            .to_string()
            .contains("CPU"));
        assert_eq!(Nccl.resolve(1, true).unwrap(), Nccl);
        assert_eq!(Mpi.resolve(3, false).unwrap(), Mpi);
    }

    #[test]
    fn choices_parse_and_print() {
        for choice in [Auto, Single, Mpi, Nccl] {
            assert_eq!(choice.to_string().parse::<CollectiveChoice>(), Ok(choice));
        }
        assert_eq!(" NCCL ".parse::<CollectiveChoice>(), Ok(Nccl));
        assert_eq!(
            "gloo".parse::<CollectiveChoice>().unwrap_err().to_string(),
            "unknown collective \"gloo\": expected auto, single, mpi or nccl"
        );
    }

    #[test]
    fn run_or_abort_returns_the_value_on_success() {
        assert_eq!(run_or_abort(&super::Single, || Ok::<_, String>(7)), 7);
    }
}
