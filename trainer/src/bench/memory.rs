//! Peak memory of a benchmark case: the process's peak resident set on a CPU (Linux
//! `VmHWM`, which writing `5` to `/proc/self/clear_refs` resets), the device memory in use
//! on a GPU (read after each step: the caching allocator keeps what the step needed).

/// Resets the peak resident set size; false where the kernel does not allow it.
pub fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// The peak resident set size since the last reset (or the start), in bytes.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peak_rss_grows_with_an_allocation_and_resets() {
        let Some(before) = peak_rss_bytes() else {
            eprintln!("no /proc/self/status: skipped");
            return;
        };
        let block = vec![1u8; 256 << 20];
        std::hint::black_box(&block);
        let during = peak_rss_bytes().unwrap();
        assert!(during >= before.max(256 << 20), "{during} after 256 MiB");
        drop(block);
        if reset_peak_rss() {
            assert!(peak_rss_bytes().unwrap() < during);
        }
    }
}
