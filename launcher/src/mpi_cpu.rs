//! [`Mpi`]: collectives over MPI (rsmpi on Open MPI) for CPU tensors, for CPU runs and tests
//! under `mpirun -np N`; also the bootstrap that passes the NCCL unique id on GPU runs.
//!
//! Gradients are summed with `MPI_Allreduce(SUM)` and divided by the world size: f64 buckets in
//! f64, f32 / bf16 / f16 buckets in f32 (MPI has no 16-bit float type). MPI's default error
//! handler (`MPI_ERRORS_ARE_FATAL`) already aborts the job on a communication error.

use std::io::Write;

use ::mpi::collective::{CommunicatorCollectives, Root, SystemOperation};
use ::mpi::datatype::Equivalence;
use ::mpi::environment::Universe;
use ::mpi::topology::{Communicator, SimpleCommunicator};
use ::mpi::Threading;
use tch::{Device, Kind, Tensor};

use crate::bucket::Bucket;
use crate::{Collective, CollectiveError, Op, Topology};

/// Elements per MPI call: counts are C `int`s, so larger buckets go in several calls.
const MAX_COUNT: usize = 1 << 30;

/// MPI's world communicator. Owns the MPI [`Universe`]: MPI stays initialised as long as this
/// lives and is finalised when it is dropped.
pub struct Mpi {
    world: SimpleCommunicator,
    rank: usize,
    world_size: usize,
    /// Declared last so it is dropped last: `MPI_Finalize` after everything else.
    _universe: Universe,
}

impl Mpi {
    /// Initialises MPI (only the main thread will call it) and checks that MPI's ranks agree
    /// with the launcher's environment, which chose the GPU and the data shard.
    ///
    /// The only error returned is a failed `MPI_Init`. Once MPI is up a disagreement cannot
    /// be returned (dropping MPI would finalise it while the other ranks wait), so it prints
    /// the error and aborts the job.
    pub fn init(topology: &Topology) -> Result<Self, CollectiveError> {
        let (universe, _provided) = ::mpi::initialize_with_threading(Threading::Funneled)
            .ok_or(CollectiveError::MpiInit)?;
        let world = universe.world();
        let (rank, world_size) = (world.rank() as usize, world.size() as usize);
        let mpi = Mpi {
            world,
            rank,
            world_size,
            _universe: universe,
        };
        if (rank, world_size) != (topology.rank, topology.world_size) {
            let err = CollectiveError::MpiTopologyMismatch {
                mpi_rank: rank,
                mpi_size: world_size,
                env_rank: topology.rank,
                env_size: topology.world_size,
            };
            eprintln!("rank {rank}: error: {err}");
            mpi.abort(1);
        }
        Ok(mpi)
    }

    /// Overwrites `bytes` with rank 0's bytes.
    pub(crate) fn broadcast_bytes(&self, bytes: &mut [u8]) {
        let root = self.world.process_at_rank(0);
        for chunk in bytes.chunks_mut(MAX_COUNT) {
            root.broadcast_into(chunk);
        }
    }

    /// Replaces `values` by their element-wise `op` over all ranks.
    fn all_reduce_in_place<T>(&self, values: &mut [T], op: SystemOperation)
    where
        T: Equivalence + Copy + Default,
    {
        let mut reduced = vec![T::default(); values.len()];
        for (send, recv) in values.chunks(MAX_COUNT).zip(reduced.chunks_mut(MAX_COUNT)) {
            self.world.all_reduce_into(send, recv, op);
        }
        values.copy_from_slice(&reduced);
    }

    /// Sums a bucket over the ranks, divides by the world size, and returns the mean in the
    /// reduction dtype ([numel], f32 or f64). An f32 or f64 bucket is reduced in its own
    /// memory, so a lone contiguous member (an optimizer's flat gradient buffer) needs no copy
    /// but MPI's receive buffer; bf16 and f16 are reduced in an f32 copy.
    fn mean_of_bucket(&self, bucket: &Bucket) -> Result<Tensor, CollectiveError> {
        let flat = match bucket.kind {
            Kind::Double | Kind::Float => bucket.flat.shallow_clone(),
            _ => bucket
                .flat
                .f_to_kind(Kind::Float)
                .map_err(CollectiveError::torch("casting a bucket to f32"))?,
        };
        match flat.kind() {
            Kind::Double => self.sum_in_place::<f64>(&flat),
            _ => self.sum_in_place::<f32>(&flat),
        }
        let _ = tch::no_grad(|| flat.shallow_clone().f_div_scalar_(self.world_size as f64))
            .map_err(CollectiveError::torch(
                "dividing a bucket by the world size",
            ))?;
        Ok(flat)
    }

    /// Replaces the elements of `flat` (a contiguous CPU tensor of `T`, [numel]) by their sum
    /// over all ranks.
    fn sum_in_place<T>(&self, flat: &Tensor)
    where
        T: Equivalence + Copy + Default + tch::kind::Element,
    {
        assert!(
            flat.is_contiguous() && flat.device() == Device::Cpu && flat.kind() == T::KIND,
            "sum_in_place needs a contiguous CPU tensor of its element type"
        );
        // SAFETY: checked above: `flat` is a contiguous CPU tensor of `T` holding `numel`
        // elements from `data_ptr`; nothing else reads or writes it during the call.
        let values =
            unsafe { std::slice::from_raw_parts_mut(flat.data_ptr() as *mut T, flat.numel()) };
        self.all_reduce_in_place(values, SystemOperation::sum());
    }
}

impl Drop for Mpi {
    /// A panic unwinding through the owner of MPI must not reach `MPI_Finalize`: the other
    /// ranks would wait for this one in their next collective, forever. Abort the job instead.
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "rank {}: panicked with MPI initialised; aborting the MPI job",
                self.rank
            );
            let _ = std::io::stderr().flush();
            self.world.abort(101);
        }
    }
}

impl Collective for Mpi {
    fn name(&self) -> &'static str {
        "mpi"
    }

    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world_size
    }

    fn all_reduce_mean(&self, tensors: &mut [Tensor]) -> Result<(), CollectiveError> {
        let buckets = Bucket::group(tensors, Device::Cpu, "mpi")?;
        // Check every dtype before the first call, so that no rank is left half-way.
        for bucket in &buckets {
            if !matches!(
                bucket.kind,
                Kind::Float | Kind::Double | Kind::BFloat16 | Kind::Half
            ) {
                return Err(CollectiveError::UnsupportedKind {
                    index: bucket.first_member(),
                    kind: bucket.kind,
                    backend: "mpi",
                    what: "average",
                });
            }
        }
        for bucket in &buckets {
            let mean = self.mean_of_bucket(bucket)?; // [numel]
            bucket.scatter(&mean, tensors)?;
        }
        Ok(())
    }

    fn broadcast(&self, tensors: &mut [Tensor]) -> Result<(), CollectiveError> {
        // Sent as raw bytes, so any dtype goes through unchanged.
        for bucket in Bucket::group(tensors, Device::Cpu, "mpi")? {
            let numel = bucket.numel();
            let mut bytes = vec![0u8; numel * bucket.kind.elt_size_in_bytes()];
            bucket
                .flat
                .f_copy_data_u8(&mut bytes, numel)
                .map_err(CollectiveError::torch("copying a bucket to host memory"))?;
            self.broadcast_bytes(&mut bytes);
            // [numel]
            let values = Tensor::f_from_data_size(&bytes, &[numel as i64], bucket.kind)
                .map_err(CollectiveError::torch("rebuilding a broadcast bucket"))?;
            bucket.scatter(&values, tensors)?;
        }
        Ok(())
    }

    fn barrier(&self) -> Result<(), CollectiveError> {
        self.world.barrier();
        Ok(())
    }

    fn all_reduce_f64(&self, values: &mut [f64], op: Op) -> Result<(), CollectiveError> {
        match op {
            Op::Sum => self.all_reduce_in_place(values, SystemOperation::sum()),
            Op::Max => self.all_reduce_in_place(values, SystemOperation::max()),
            Op::Mean => {
                self.all_reduce_in_place(values, SystemOperation::sum());
                let n = self.world_size as f64;
                values.iter_mut().for_each(|v| *v /= n);
            }
        }
        Ok(())
    }

    /// `MPI_Abort`: mpirun (or srun) kills every rank and exits with a non-zero status.
    fn abort(&self, code: i32) -> ! {
        let _ = std::io::stderr().flush();
        self.world.abort(code)
    }
}
