//! Memory in use on a CUDA device, from the driver (`cuMemGetInfo`): total minus free, so it
//! counts every allocation on the device, PyTorch's cached blocks and the CUDA context
//! included. Benchmarks read it after a step to report what the step held at its peak.

use cudarc::driver::CudaContext;

/// Bytes in use on CUDA device `ordinal`, or None without a driver or device.
pub fn cuda_memory_in_use(ordinal: usize) -> Option<u64> {
    // SAFETY: only tries to dlopen the driver library's candidate names.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return None;
    }
    let context = CudaContext::new(ordinal).ok()?;
    let (free, total) = context.mem_get_info().ok()?;
    Some((total - free) as u64)
}
