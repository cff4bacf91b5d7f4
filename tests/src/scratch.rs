//! Private temporary directories.
//!
//! # Theory of operation
//!
//! [`ScratchDir::new`] creates a fresh directory under the system temporary
//! directory, named after the process id, a per-process counter and a
//! caller-chosen label, so parallel tests and parallel runs never share one.
//! Creation uses `create_dir` (which fails if the path exists) and retries
//! with the next counter value a bounded number of times. `Drop` removes the
//! directory and everything in it unless [`ScratchDir::keep`] was called.
//! A run killed by SIGKILL cannot run its `Drop`s, so the first
//! [`ScratchDir::new`] of a process removes directories of this naming
//! scheme whose owning process no longer exists.

use std::path::{Path, PathBuf};
use std::sync::Once;
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context, Result};

static COUNTER: AtomicU32 = AtomicU32::new(0);
static REAP_ONCE: Once = Once::new();

/// Prefix of every scratch directory's name.
const PREFIX: &str = "tapgate-tests-";

/// A temporary directory removed on drop.
#[derive(Debug)]
pub struct ScratchDir {
    path: PathBuf,
    keep: bool,
}

impl ScratchDir {
    /// Creates a new, empty, uniquely named directory; `label` ends up in its
    /// name to help debugging.
    pub fn new(label: &str) -> Result<ScratchDir> {
        let base = std::env::temp_dir();
        REAP_ONCE.call_once(|| reap_stale(&base));
        let pid = std::process::id();
        let mut last_err = None;
        for _ in 0..64 {
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            let path = base.join(format!("{PREFIX}{pid}-{n}-{label}"));
            match std::fs::create_dir(&path) {
                Ok(()) => return Ok(ScratchDir { path, keep: false }),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last_err = Some(e),
                Err(e) => {
                    return Err(e)
                        .with_context(|| format!("cannot create directory {}", path.display()));
                }
            }
        }
        Err(last_err.map_or_else(
            || anyhow::anyhow!("cannot create a scratch directory"),
            anyhow::Error::from,
        ))
        .context("cannot find a free scratch directory name")
    }

    /// The directory's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Path of `name` inside the directory.
    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// Leaves the directory in place on drop (for debugging a failure).
    pub fn keep(&mut self) {
        self.keep = true;
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// Removes scratch directories left by processes that no longer exist.
fn reap_stale(base: &Path) {
    let Ok(entries) = std::fs::read_dir(base) else {
        return;
    };
    let me = std::process::id();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(PREFIX)
            .and_then(|rest| rest.split_once('-'))
            .and_then(|(pid, _)| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != me && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}
