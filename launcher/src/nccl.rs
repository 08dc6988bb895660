//! [`Nccl`]: collectives on CUDA tensors through NCCL (cudarc's `result`-level API on the raw
//! device pointers of tch tensors), and [`cuda_ordinal`], the GPU a rank uses.
//!
//! Bootstrap as in llm.c: rank 0 creates the NCCL unique id, MPI broadcasts it, every rank joins
//! with `ncclCommInitRank`. A job of one process can make its id alone ([`Nccl::single`]): no
//! MPI, and still real NCCL calls, which is what a one-GPU machine can check.
//!
//! Streams: torch computes on its own stream and NCCL runs on a stream of ours, so every call
//! synchronises the torch device before the collective (the gradients and the bucket are
//! complete) and the NCCL stream after it (the result is complete before torch reads it).
//!
//! cudarc loads libcuda and libnccl at run time and panics if they are missing, so nothing here
//! touches cudarc before `tch::Cuda::is_available()` and a check that both libraries load.

use std::ffi::{c_void, CStr};
use std::io::Write;
use std::sync::Arc;

use cudarc::driver::result::DriverError;
use cudarc::driver::{CudaContext, CudaStream};
use cudarc::nccl::result::{self as nccl, NcclError};
use cudarc::nccl::sys;
use tch::{Device, Kind, Tensor};

use crate::bucket::Bucket;
use crate::{Collective, CollectiveError, Mpi, Op, Topology};

/// The GPU of a rank: its local rank, or device 0 when the process sees a single GPU (a
/// launcher that sets `CUDA_VISIBLE_DEVICES` per rank, or a one-GPU machine).
pub fn cuda_ordinal(local_rank: usize) -> Result<usize, CollectiveError> {
    if !tch::Cuda::is_available() {
        return Err(CollectiveError::NoCuda);
    }
    let device_count = tch::Cuda::device_count().max(0) as usize;
    match device_count {
        0 => Err(CollectiveError::NoCuda),
        1 => Ok(0),
        _ if local_rank < device_count => Ok(local_rank),
        _ => Err(CollectiveError::NoGpuForRank {
            local_rank,
            device_count,
        }),
    }
}

/// An NCCL communicator handle, destroyed on drop (aborted if a panic is unwinding, since the
/// other ranks may never take part again).
struct Communicator(sys::ncclComm_t);

impl Drop for Communicator {
    fn drop(&mut self) {
        // SAFETY: the handle came from a successful ncclCommInitRank and is dropped once.
        unsafe {
            let _ = if std::thread::panicking() {
                nccl::comm_abort(self.0)
            } else {
                nccl::comm_destroy(self.0)
            };
        }
    }
}

/// One rank of an NCCL communicator on one GPU.
pub struct Nccl {
    /// Declared first: destroyed before the stream, the context and MPI go.
    comm: Communicator,
    stream: Arc<CudaStream>,
    context: Arc<CudaContext>,
    ordinal: usize,
    rank: usize,
    world_size: usize,
    /// Present when MPI bootstrapped the job; kept alive (and used to abort) until drop.
    mpi: Option<Mpi>,
}

impl Nccl {
    /// Joins the job's communicator on GPU [`cuda_ordinal`]`(local_rank)`: rank 0 makes the
    /// unique id and `mpi` broadcasts it.
    ///
    /// Once MPI is up an error cannot simply be returned (the other ranks would wait in the
    /// broadcast or in `ncclCommInitRank` for ever), so a failure prints the error and aborts
    /// the whole job through MPI.
    pub fn init(topology: &Topology, mpi: Mpi) -> Self {
        let joined = (|| {
            let ordinal = cuda_ordinal(topology.local_rank)?;
            check_libraries()?;
            let mut id = [0u8; 128];
            if mpi.rank() == 0 {
                id = unique_id()?;
            }
            mpi.broadcast_bytes(&mut id);
            let (comm, stream, context) = join(ordinal, mpi.rank(), mpi.world_size(), id)?;
            Ok((comm, stream, context, ordinal))
        })();
        match joined {
            Ok((comm, stream, context, ordinal)) => Nccl {
                comm,
                stream,
                context,
                ordinal,
                rank: mpi.rank(),
                world_size: mpi.world_size(),
                mpi: Some(mpi),
            },
            Err(err) => {
                let err: CollectiveError = err;
                eprintln!("rank {}: error: cannot set up NCCL: {err}", mpi.rank());
                mpi.abort(1)
            }
        }
    }

    /// A communicator of this process alone (world size 1) on GPU `ordinal`, made without MPI.
    pub fn single(ordinal: usize) -> Result<Self, CollectiveError> {
        if !tch::Cuda::is_available() {
            return Err(CollectiveError::NoCuda);
        }
        check_libraries()?;
        let (comm, stream, context) = join(ordinal, 0, 1, unique_id()?)?;
        Ok(Nccl {
            comm,
            stream,
            context,
            ordinal,
            rank: 0,
            world_size: 1,
            mpi: None,
        })
    }

    /// The torch device this communicator reduces on.
    pub fn device(&self) -> Device {
        Device::Cuda(self.ordinal)
    }

    /// NCCL's version as an integer (e.g. 22805 for 2.28.5).
    pub fn version() -> Result<i32, CollectiveError> {
        nccl::get_nccl_version().map_err(|e| nccl_error("ncclGetVersion", e, None))
    }

    /// Runs `launch` (which queues NCCL calls on our stream) between the two synchronisations
    /// that order it after torch's pending work and before torch's next reads.
    fn on_stream(
        &self,
        call: &'static str,
        launch: impl FnOnce(sys::cudaStream_t) -> Result<(), NcclError>,
    ) -> Result<(), CollectiveError> {
        tch::Cuda::synchronize(self.ordinal as i64);
        self.context
            .bind_to_thread()
            .map_err(|e| cuda_error("cuCtxSetCurrent", e))?;
        launch(self.stream.cu_stream() as sys::cudaStream_t)
            .map_err(|e| nccl_error(call, e, Some(self.comm.0)))?;
        self.stream
            .synchronize()
            .map_err(|e| cuda_error("cuStreamSynchronize", e))
    }

    /// In-place all-reduce of a contiguous CUDA tensor ([numel]).
    ///
    /// # Safety
    /// `flat` must be contiguous, on this communicator's GPU, and outlive the stream sync.
    unsafe fn all_reduce_raw(
        &self,
        flat: &Tensor,
        dtype: sys::ncclDataType_t,
        op: sys::ncclRedOp_t,
        stream: sys::cudaStream_t,
    ) -> Result<(), NcclError> {
        let ptr = flat.data_ptr();
        nccl::all_reduce(ptr, ptr, flat.numel(), dtype, op, self.comm.0, stream).map(|_| ())
    }
}

/// The NCCL type of a tensor dtype we can average.
fn nccl_type(kind: Kind) -> Option<sys::ncclDataType_t> {
    use sys::ncclDataType_t::*;
    Some(match kind {
        Kind::Float => ncclFloat32,
        Kind::Double => ncclFloat64,
        Kind::BFloat16 => ncclBfloat16,
        Kind::Half => ncclFloat16,
        _ => return None,
    })
}

/// Refuses, with a hint, when cudarc could not load libcuda or libnccl (it would panic).
fn check_libraries() -> Result<(), CollectiveError> {
    // SAFETY: only tries to dlopen the candidate names.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(CollectiveError::LibraryMissing {
            library: "libcuda (the NVIDIA driver)",
            hint: "no libcuda.so / libcuda.so.1 on the library search path".into(),
        });
    }
    // SAFETY: as above.
    if !unsafe { cudarc::nccl::sys::is_culib_present() } {
        return Err(CollectiveError::LibraryMissing {
            library: "libnccl",
            hint: nccl_hint(),
        });
    }
    Ok(())
}

/// cudarc asks for `libnccl.so` (and `.so.1`, `.so.9` to `.so.13`), while the PyPI NCCL that
/// torch loads is only `libnccl.so.2`: name the file torch loaded, so the fix is one symlink.
fn nccl_hint() -> String {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
    let loaded = maps
        .lines()
        .filter_map(|line| line.split_whitespace().nth(5))
        .find(|path| path.contains("libnccl.so"));
    let target = loaded.unwrap_or("<dir>/libnccl.so.2");
    format!(
        "cudarc looks for libnccl.so, which is not on the library search path; torch loaded \
         {}. Link it: `mkdir -p /tmp/nccl && ln -sf {target} /tmp/nccl/libnccl.so` and put \
         /tmp/nccl on LD_LIBRARY_PATH (tools/gpu_nccl_check.sh does this)",
        loaded.unwrap_or("no libnccl")
    )
}

/// A new NCCL unique id, as bytes for MPI.
fn unique_id() -> Result<[u8; 128], CollectiveError> {
    let id = nccl::get_uniqueid().map_err(|e| nccl_error("ncclGetUniqueId", e, None))?;
    Ok(id.internal.map(|c| c as u8))
}

/// Binds GPU `ordinal`'s primary context (the one torch uses), makes our stream, and joins
/// the communicator as `rank` of `world_size`.
fn join(
    ordinal: usize,
    rank: usize,
    world_size: usize,
    id: [u8; 128],
) -> Result<(Communicator, Arc<CudaStream>, Arc<CudaContext>), CollectiveError> {
    let context =
        CudaContext::new(ordinal).map_err(|e| cuda_error("cuDevicePrimaryCtxRetain", e))?;
    let stream = context
        .new_stream()
        .map_err(|e| cuda_error("cuStreamCreate", e))?;
    let id = sys::ncclUniqueId {
        internal: id.map(|b| b as std::ffi::c_char),
    };
    let mut comm: sys::ncclComm_t = std::ptr::null_mut();
    // SAFETY: `comm` is a valid out-pointer; the context of `ordinal` is current.
    unsafe { nccl::comm_init_rank(&mut comm, world_size as i32, id, rank as i32) }
        .map_err(|e| nccl_error("ncclCommInitRank", e, None))?;
    Ok((Communicator(comm), stream, context))
}

fn cuda_error(call: &'static str, err: DriverError) -> CollectiveError {
    CollectiveError::Cuda {
        call,
        message: err.to_string(),
    }
}

/// NCCL's own description of `err`, and the communicator's last error message when there is one.
fn nccl_error(
    call: &'static str,
    err: NcclError,
    comm: Option<sys::ncclComm_t>,
) -> CollectiveError {
    let text = |ptr: *const std::ffi::c_char| {
        // SAFETY: NCCL returns NUL-terminated static or per-communicator strings.
        (!ptr.is_null()).then(|| {
            unsafe { CStr::from_ptr(ptr) }
                .to_string_lossy()
                .into_owned()
        })
    };
    // SAFETY: plain queries on an error code and a live communicator.
    let described = text(unsafe { sys::ncclGetErrorString(err.0) });
    let last = comm.and_then(|c| text(unsafe { sys::ncclGetLastError(c) }));
    let mut message = format!("{:?}", err.0);
    for part in [described, last]
        .into_iter()
        .flatten()
        .filter(|s| !s.is_empty())
    {
        message.push_str(": ");
        message.push_str(&part);
    }
    CollectiveError::Nccl { call, message }
}

impl Collective for Nccl {
    fn name(&self) -> &'static str {
        "nccl"
    }

    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world_size
    }

    fn all_reduce_mean(&self, tensors: &mut [Tensor]) -> Result<(), CollectiveError> {
        let buckets = Bucket::group(tensors, self.device(), "nccl")?;
        let types = buckets
            .iter()
            .map(|b| {
                nccl_type(b.kind).ok_or(CollectiveError::UnsupportedKind {
                    index: b.first_member(),
                    kind: b.kind,
                    backend: "nccl",
                    what: "average",
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        // One grouped launch for all dtypes; ncclAvg sums then divides by the world size.
        self.on_stream("ncclAllReduce", |stream| {
            nccl::group_start()?;
            for (bucket, dtype) in buckets.iter().zip(&types) {
                // SAFETY: the bucket is a contiguous tensor on our GPU (a fresh buffer, or a
                // lone contiguous member reduced where it lies), alive until the stream is
                // synchronised; on_stream synchronises the device before the launch.
                unsafe {
                    self.all_reduce_raw(&bucket.flat, *dtype, sys::ncclRedOp_t::ncclAvg, stream)?
                };
            }
            nccl::group_end().map(|_| ())
        })?;
        for bucket in &buckets {
            bucket.scatter(&bucket.flat, tensors)?;
        }
        Ok(())
    }

    fn broadcast(&self, tensors: &mut [Tensor]) -> Result<(), CollectiveError> {
        let buckets = Bucket::group(tensors, self.device(), "nccl")?;
        // Sent as raw bytes, so any dtype goes through unchanged.
        self.on_stream("ncclBroadcast", |stream| {
            nccl::group_start()?;
            for bucket in &buckets {
                let ptr: *mut c_void = bucket.flat.data_ptr();
                let bytes = bucket.numel() * bucket.kind.elt_size_in_bytes();
                // SAFETY: as in all_reduce_mean.
                unsafe {
                    nccl::broadcast(
                        ptr,
                        ptr,
                        bytes,
                        sys::ncclDataType_t::ncclUint8,
                        0,
                        self.comm.0,
                        stream,
                    )?
                };
            }
            nccl::group_end().map(|_| ())
        })?;
        for bucket in &buckets {
            bucket.scatter(&bucket.flat, tensors)?;
        }
        Ok(())
    }

    /// An all-reduce of one element: no rank gets past it before every rank has joined.
    fn barrier(&self) -> Result<(), CollectiveError> {
        let token = Tensor::f_zeros([1], (Kind::Float, self.device()))
            .map_err(CollectiveError::torch("allocating the barrier token"))?;
        self.on_stream("ncclAllReduce (barrier)", |stream| unsafe {
            // SAFETY: a fresh contiguous tensor on our GPU, alive until the stream sync.
            self.all_reduce_raw(
                &token,
                sys::ncclDataType_t::ncclFloat32,
                sys::ncclRedOp_t::ncclSum,
                stream,
            )
        })
    }

    fn all_reduce_f64(&self, values: &mut [f64], op: Op) -> Result<(), CollectiveError> {
        if values.is_empty() {
            return Ok(());
        }
        // [len] on the GPU
        let on_gpu = Tensor::f_from_slice(values)
            .and_then(|t| t.f_to_device(self.device()))
            .map_err(CollectiveError::torch("copying metrics to the GPU"))?;
        let nccl_op = match op {
            Op::Sum | Op::Mean => sys::ncclRedOp_t::ncclSum,
            Op::Max => sys::ncclRedOp_t::ncclMax,
        };
        self.on_stream("ncclAllReduce (metrics)", |stream| unsafe {
            // SAFETY: a fresh contiguous tensor on our GPU, alive until the stream sync.
            self.all_reduce_raw(&on_gpu, sys::ncclDataType_t::ncclFloat64, nccl_op, stream)
        })?;
        on_gpu
            .f_copy_data(values, values.len())
            .map_err(CollectiveError::torch("copying metrics from the GPU"))?;
        if op == Op::Mean {
            let n = self.world_size as f64;
            values.iter_mut().for_each(|v| *v /= n);
        }
        Ok(())
    }

    /// Aborts the communicator (frees this rank from pending NCCL work), then the job.
    fn abort(&self, code: i32) -> ! {
        // SAFETY: the handle is live; after this the process ends without using it again.
        unsafe {
            let _ = nccl::comm_abort(self.comm.0);
        }
        let _ = std::io::stderr().flush();
        match &self.mpi {
            Some(mpi) => mpi.abort(code),
            None => std::process::exit(code),
        }
    }
}
