//! Build script shared by every crate that links libtorch (through `tch`).
//!
//! Two things cargo would otherwise get wrong (see `../shared/BUILD-NOTES.md`):
//! - Rust links with `--as-needed`, and nothing in tch-sys references a `torch_cuda` symbol, so
//!   `libtorch_cuda.so` is dropped from the binary and `tch::Cuda::is_available()` is false even
//!   on a GPU machine. We link it explicitly with `--no-as-needed`.
//! - The binary should run without a hand-set `LD_LIBRARY_PATH`: we bake in an rpath to the
//!   torch `lib/` it was built against (an `LD_LIBRARY_PATH` set at run time still wins).
//!
//! The torch location comes from `LIBTORCH` if set, else from the `python3` first on `PATH`
//! (the Makefile puts `.venv/bin` there), exactly as tch-sys finds it with
//! `LIBTORCH_USE_PYTORCH=1`.
use std::path::PathBuf;
use std::process::Command;

fn torch_lib_dir() -> Option<PathBuf> {
    if let Ok(root) = std::env::var("LIBTORCH") {
        return Some(PathBuf::from(root).join("lib"));
    }
    let python = std::env::var("PYTHON_SYS_EXECUTABLE").unwrap_or_else(|_| "python3".into());
    let output = Command::new(python)
        .args([
            "-c",
            "import os, torch; print(os.path.join(os.path.dirname(torch.__file__), 'lib'))",
        ])
        .output()
        .ok()?;
    if !output.status.success() {
        return None;
    }
    Some(PathBuf::from(String::from_utf8(output.stdout).ok()?.trim()))
}

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-env-changed=LIBTORCH_USE_PYTORCH");
    println!("cargo:rerun-if-env-changed=PYTHON_SYS_EXECUTABLE");
    println!("cargo:rerun-if-env-changed=PATH");
    let Some(lib) = torch_lib_dir() else {
        println!("cargo:warning=torch not found: binaries will need LD_LIBRARY_PATH at run time");
        return;
    };
    let lib = lib.display();
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    if std::path::Path::new(&format!("{lib}/libtorch_cuda.so")).exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-L{lib}");
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
}
