//! One tapgate per tap.
//!
//! # Theory of operation
//!
//! Two daemons on one tap would both answer DHCP and race for every flow.
//! Each daemon binds an abstract UNIX socket named after its tap. Abstract
//! sockets belong to the network namespace, so the same tap name in two
//! namespaces does not collide, and the kernel releases the name when the
//! process dies however it dies — there is no stale lock file to clean up.

use std::{
    io,
    os::{
        linux::net::SocketAddrExt,
        unix::net::{SocketAddr, UnixListener},
    },
};

use thiserror::Error;

/// Errors taking the per-tap lock.
#[derive(Debug, Error)]
pub enum InstanceError {
    /// Another tapgate holds the tap.
    #[error("another tapgate is already running on tap \"{0}\" in this network namespace")]
    AlreadyRunning(String),
    /// The lock socket could not be created.
    #[error("taking the instance lock for tap \"{tap}\": {source}")]
    Io {
        /// Tap name.
        tap: String,
        /// The OS error.
        source: io::Error,
    },
}

/// Held for as long as the daemon runs on the tap.
#[derive(Debug)]
pub struct InstanceLock {
    _socket: UnixListener,
}

impl InstanceLock {
    /// Takes the lock for `tap` in the current network namespace.
    pub fn acquire(tap: &str) -> Result<Self, InstanceError> {
        let io_err = |source| InstanceError::Io {
            tap: tap.to_owned(),
            source,
        };
        let addr = SocketAddr::from_abstract_name(format!("tapgate/tap/{tap}")).map_err(io_err)?;
        match UnixListener::bind_addr(&addr) {
            Ok(socket) => Ok(Self { _socket: socket }),
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
                Err(InstanceError::AlreadyRunning(tap.to_owned()))
            }
            Err(e) => Err(io_err(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_lock_refused_until_first_dropped() {
        let name = format!("unit-test-{}", std::process::id());
        let first = InstanceLock::acquire(&name).expect("first lock");
        let second = InstanceLock::acquire(&name);
        assert!(matches!(second, Err(InstanceError::AlreadyRunning(ref t)) if *t == name));
        drop(first);
        InstanceLock::acquire(&name).expect("lock free again");
    }
}
