//! Paths as written in a config file.

use std::path::{Path, PathBuf};

/// `path` as written in a config file, made absolute against the file's directory `base`.
pub fn resolve(base: &Path, path: &Path) -> PathBuf {
    if path.is_absolute() {
        path.to_path_buf()
    } else {
        base.join(path)
    }
}
