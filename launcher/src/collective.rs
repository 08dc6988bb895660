//! The [`Collective`] trait: what data-parallel training needs from the other ranks (the mean
//! of the gradients, rank 0's initial adapters, a barrier, summed metrics), the reduction
//! [`Op`] for host-side metrics, and [`CollectiveError`].
//!
//! Every rank must make the same calls in the same order with the same tensor lists (same
//! dtypes, shapes and order): a collective pairs calls across ranks by order alone.

use tch::{Device, Kind, Tensor};

/// How [`Collective::all_reduce_f64`] combines the ranks' values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Sum,
    /// Sum divided by the world size.
    Mean,
    Max,
}

/// Communication between the ranks of one job.
///
/// Tensor methods take `&mut [Tensor]` because they overwrite the tensors' storage in place
/// (a gradient from `var.grad()` or a variable from `trainable_variables()` shares storage with
/// the model, so the model sees the result).
pub trait Collective {
    /// Short name for logs: "single", "mpi", "nccl".
    fn name(&self) -> &'static str;

    fn rank(&self) -> usize;

    fn world_size(&self) -> usize;

    /// Replaces every tensor by its element-wise mean over all ranks.
    ///
    /// The tensors are grouped by dtype, each group flattened into one contiguous buffer and
    /// reduced with a single collective call, then copied back: one call per dtype, however
    /// many tensors (per-tensor calls would pay the latency once per LoRA matrix).
    fn all_reduce_mean(&self, tensors: &mut [Tensor]) -> Result<(), CollectiveError>;

    /// Overwrites every tensor with rank 0's values (the initial adapters), one call per dtype.
    fn broadcast(&self, tensors: &mut [Tensor]) -> Result<(), CollectiveError>;

    /// Returns once every rank has entered the barrier.
    fn barrier(&self) -> Result<(), CollectiveError>;

    /// Combines host-side numbers (losses, counts, accuracies) across ranks, in place.
    fn all_reduce_f64(&self, values: &mut [f64], op: Op) -> Result<(), CollectiveError>;

    /// Ends every process of the job with exit status `code`, now: a rank that cannot go on
    /// must not leave the others blocked in their next collective.
    fn abort(&self, code: i32) -> !;
}

/// Why a collective could not be set up or run.
#[derive(Debug, thiserror::Error)]
pub enum CollectiveError {
    #[error(transparent)]
    Topology(#[from] crate::TopologyError),
    #[error("collective `{choice}` cannot be used here: {reason}")]
    Unusable {
        choice: crate::CollectiveChoice,
        reason: String,
    },
    #[error("MPI_Init failed or MPI was already initialised in this process")]
    MpiInit,
    #[error(
        "MPI says this is rank {mpi_rank} of {mpi_size}, the launcher environment says rank \
         {env_rank} of {env_size}"
    )]
    MpiTopologyMismatch {
        mpi_rank: usize,
        mpi_size: usize,
        env_rank: usize,
        env_size: usize,
    },
    #[error("tensor {index} is undefined (a variable that received no gradient?)")]
    Undefined { index: usize },
    #[error("tensor {index} is on {found:?}, but the {backend} collective works on {expected:?}")]
    WrongDevice {
        index: usize,
        found: Device,
        expected: Device,
        backend: &'static str,
    },
    #[error("tensor {index} has dtype {kind:?}, which the {backend} collective cannot {what}")]
    UnsupportedKind {
        index: usize,
        kind: Kind,
        backend: &'static str,
        what: &'static str,
    },
    #[error("torch failed while {what}: {source}")]
    Torch {
        what: &'static str,
        #[source]
        source: tch::TchError,
    },
    #[error("no CUDA device is available to torch, so NCCL cannot be used")]
    NoCuda,
    #[error("local rank {local_rank} has no GPU: torch sees {device_count} CUDA device(s)")]
    NoGpuForRank {
        local_rank: usize,
        device_count: usize,
    },
    #[error("{library} cannot be loaded: {hint}")]
    LibraryMissing { library: &'static str, hint: String },
    #[error("CUDA driver call {call} failed: {message}")]
    Cuda { call: &'static str, message: String },
    #[error("NCCL call {call} failed: {message}")]
    Nccl { call: &'static str, message: String },
}

impl CollectiveError {
    /// Wraps a torch error with what we were doing.
    pub(crate) fn torch(what: &'static str) -> impl FnOnce(tch::TchError) -> Self {
        move |source| CollectiveError::Torch { what, source }
    }
}
