//! Registering owned descriptors with tokio.
//!
//! # Theory of operation
//!
//! tokio's safe `AsyncFd` constructors are deprecated because they cannot
//! prove the descriptor outlives the registration. Every descriptor tapgate
//! registers is owned by the value moved into the `AsyncFd` (a socket, a
//! ring buffer map, the log forwarder's map) and is closed only when that
//! value drops, which is exactly tokio's requirement; [`register`] states
//! that once.

use std::{io, os::fd::AsRawFd};

use tokio::io::{Interest, unix::AsyncFd};

/// Registers `inner`, which must own the descriptor it returns from
/// `as_raw_fd` for its whole lifetime (true of `OwnedFd`, aya maps and
/// aya-log's logger). Must be called inside a tokio runtime.
pub fn register<T: AsRawFd>(inner: T, interest: Interest) -> io::Result<AsyncFd<T>> {
    // SAFETY: `inner` owns its descriptor (see the function contract), so it
    // stays open and unchanged until the AsyncFd, which owns `inner`, drops.
    unsafe { AsyncFd::register_with_interest(inner, interest) }.map_err(|e| e.into_parts().1)
}
