//! Run-time skips that the test summary can see. Shared by the test crates the way
//! `link_torch.rs` is: `tests/src/lib.rs` and `launcher/tests/common/mod.rs` include this file
//! with `#[path]` (the launcher's tests cannot depend on `modpo-tests`, which depends on the
//! launcher). Standard library only.
//!
//! A test that cannot run here (no GPU, a reference `make golden` could not fetch) calls
//! [`skip`] and returns. cargo captures what a passing test prints and counts it as passed, so
//! [`skip`] also appends one line to the file named by `MODPO_SKIP_LOG` (`make test` sets it to
//! `target/test-skips.log`); `tools/summarize_tests.sh` lists those lines and counts them as
//! skipped, not passed.

use std::io::Write;
use std::path::Path;

/// Records that the running test skips, and why; the caller returns right after. The line,
/// `<package>/<test binary> <test name>: <reason>`, goes to stderr and, when `MODPO_SKIP_LOG`
/// is set, is appended to that file.
pub fn skip(reason: &str) {
    let log = std::env::var_os("MODPO_SKIP_LOG").filter(|path| !path.is_empty());
    skip_to(log.as_deref().map(Path::new), reason);
}

/// [`skip`] with the log file given: the line written is returned.
pub fn skip_to(log: Option<&Path>, reason: &str) -> String {
    let line = format!("{} {}: {}", test_binary(), test_name(), one_line(reason));
    eprintln!("SKIPPED {line}");
    if let Some(log) = log {
        // One `write_all` of a short line to a file opened for appending: lines written by
        // tests running in parallel do not interleave.
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .and_then(|mut file| file.write_all(format!("{line}\n").as_bytes()))
            .unwrap_or_else(|e| panic!("cannot append to the skip log {}: {e}", log.display()));
    }
    line
}

/// `<package>/<binary>`: the test executable's name without cargo's `-<hash>` suffix.
fn test_binary() -> String {
    let exe = std::env::current_exe()
        .ok()
        .and_then(|path| Some(path.file_stem()?.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "?".into());
    let binary = match exe.rsplit_once('-') {
        Some((name, hash)) if hash.chars().all(|c| c.is_ascii_hexdigit()) => name,
        _ => exe.as_str(),
    };
    format!("{}/{binary}", env!("CARGO_PKG_NAME"))
}

/// libtest runs each test on a thread named after it (`module::test`).
fn test_name() -> String {
    match std::thread::current().name() {
        Some(name) if name != "main" => name.to_string(),
        _ => "?".into(),
    }
}

/// The reason on one line, so that one skip is one line of the log.
fn one_line(reason: &str) -> String {
    reason.split_whitespace().collect::<Vec<_>>().join(" ")
}
