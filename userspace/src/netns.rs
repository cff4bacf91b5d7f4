//! Network namespaces: entering one on the current thread, and naming them.
//!
//! # Theory of operation
//!
//! The node agent serves many pods from one process: each attachment's
//! datapath runs on its own thread, which `setns(CLONE_NEWNET)`s into the
//! pod's network namespace before it opens anything. A network namespace is
//! per thread, so everything that thread creates afterwards — the tap and
//! uplink lookups, the tcx links, the raw and packet sockets, the NAT-port
//! sockets, the abstract per-tap lock — lives in the pod's namespace, and
//! the very same code serves `tapgate run` on the main thread.
//!
//! Anything that names "this namespace" must therefore ask for the
//! *thread's* view: `/proc/thread-self/...`, never `/proc/self/...` (which
//! is the thread-group leader's) or `/proc/net` (a link to
//! `/proc/self/net`).
//!
//! A namespace is identified by the inode of its nsfs file. The agent
//! watches an attachment's namespace path (`/run/netns/...`): once that
//! path is gone or names another namespace, the pod is gone and the
//! attachment is torn down.

use std::{
    fs::File,
    io,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use nix::sched::{CloneFlags, setns};
use thiserror::Error;

/// This thread's network namespace file.
pub const THREAD_NETNS: &str = "/proc/thread-self/ns/net";

/// Errors entering a namespace.
#[derive(Debug, Error)]
pub enum NetnsError {
    /// The namespace file could not be opened.
    #[error("opening network namespace {path}: {source}")]
    Open {
        /// The path given.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// `setns` refused.
    #[error("entering network namespace {path}: {source}")]
    Enter {
        /// The path given.
        path: PathBuf,
        /// The OS error.
        source: nix::Error,
    },
}

/// The inode of the network namespace `path` names (`None` if it cannot
/// be read).
pub fn id_of(path: &Path) -> Option<u64> {
    std::fs::metadata(path).ok().map(|m| m.ino())
}

/// The inode of this thread's network namespace.
pub fn current_id() -> Option<u64> {
    id_of(Path::new(THREAD_NETNS))
}

/// Moves the calling thread into the network namespace at `path` and
/// returns its inode. Only this thread moves.
pub fn enter(path: &Path) -> Result<u64, NetnsError> {
    let file = File::open(path).map_err(|source| NetnsError::Open {
        path: path.to_owned(),
        source,
    })?;
    let ino = file
        .metadata()
        .map_err(|source| NetnsError::Open {
            path: path.to_owned(),
            source,
        })?
        .ino();
    setns(&file, CloneFlags::CLONE_NEWNET).map_err(|source| NetnsError::Enter {
        path: path.to_owned(),
        source,
    })?;
    Ok(ino)
}

/// Whether `path` still names the namespace with inode `ino` (a pod's
/// namespace path disappears, or is reused, when the pod goes).
pub fn still_names(path: &Path, ino: u64) -> bool {
    id_of(path) == Some(ino)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_namespace_is_named_by_thread_self() {
        let own = current_id();
        assert!(own.is_some());
        assert!(still_names(Path::new(THREAD_NETNS), own.unwrap_or(0)));
        assert!(!still_names(
            Path::new("/nonexistent/netns"),
            own.unwrap_or(0)
        ));
    }

    #[test]
    fn entering_a_missing_namespace_is_an_error() {
        let e = enter(Path::new("/nonexistent/netns")).err();
        assert!(matches!(e, Some(NetnsError::Open { .. })));
    }
}
