//! A topology with tapgate running in it: the fixture of the end-to-end
//! tests.
//!
//! # Theory of operation
//!
//! Every end-to-end test builds a [`Topology`], starts tapgate in it and
//! then asserts; when an assertion fails, what explains it is tapgate's own
//! log and the relay's counters. [`Running`] holds both guards (tapgate
//! first, so it stops before the namespaces go) and funnels every failure
//! through [`Running::fail`], which panics with that context. Test files add
//! their own helpers as extension traits.

use std::fmt::Display;
use std::sync::mpsc;
use std::time::Duration;

use anyhow::Result;

use crate::child::Child;
use crate::dhcp::{DhcpClient, DhcpEvent};
use crate::nsthread::NsThread;
use crate::topology::{DEFAULT_GUEST_ADDR, GUEST_IFACE};
use crate::{GuestKind, Topology, require_root};

/// How long [`Running::recv`] waits for a helper thread's message.
pub const RECV_TIMEOUT: Duration = Duration::from_secs(30);

/// A topology with tapgate running in it. Fields drop in order: tapgate is
/// stopped before the namespaces go.
pub struct Running {
    /// The tapgate daemon.
    pub tapgate: Child,
    /// Its namespaces.
    pub topo: Topology,
}

impl Running {
    /// Builds a topology of `kind` and starts tapgate with `args` (panics,
    /// with the reason, if either fails or this is not root).
    pub fn start(kind: GuestKind, args: &[&str]) -> Running {
        require_root().unwrap_or_else(|e| panic!("{e}"));
        let topo = Topology::new(kind).unwrap_or_else(|e| panic!("cannot build topology: {e:#}"));
        let tapgate = topo
            .start_tapgate(args)
            .unwrap_or_else(|e| panic!("cannot start tapgate {args:?}: {e:#}"));
        Running { tapgate, topo }
    }

    /// [`Running::start`], then a DHCP lease in the guest, which must be the
    /// default address.
    pub fn with_lease(kind: GuestKind, args: &[&str]) -> Running {
        let run = Running::start(kind, args);
        let lease = run.dhcp();
        run.check(
            lease.ip == DEFAULT_GUEST_ADDR,
            format!("unexpected lease: {}", lease.line),
        );
        run
    }

    /// Panics with `what`, the relay counters and tapgate's stderr.
    pub fn fail(&self, what: impl Display) -> ! {
        panic!(
            "{what}\n{}\n--- tapgate stderr ---\n{}",
            self.topo.relay_summary(),
            self.tapgate.stderr()
        )
    }

    /// Unwraps `result` or fails with the context of [`Running::fail`].
    pub fn ok<T>(&self, result: Result<T>) -> T {
        result.unwrap_or_else(|e| self.fail(format!("{e:#}")))
    }

    /// Asserts `cond`, failing with `what` and the context.
    pub fn check(&self, cond: bool, what: impl Display) {
        if !cond {
            self.fail(what);
        }
    }

    /// Runs a one-shot DHCP exchange in the guest and returns the lease.
    pub fn dhcp(&self) -> DhcpEvent {
        let client = self.ok(DhcpClient::new(self.topo.guest(), GUEST_IFACE));
        self.ok(client.run_once())
    }

    /// Waits (at most [`RECV_TIMEOUT`]) for a message from a helper
    /// thread; if none comes, fails with the thread's own error.
    pub fn recv<T, U>(
        &self,
        rx: &mpsc::Receiver<T>,
        thread: NsThread<U>,
        what: &str,
    ) -> (T, NsThread<U>) {
        match rx.recv_timeout(RECV_TIMEOUT) {
            Ok(v) => (v, thread),
            Err(_) => {
                let why = thread
                    .join(Duration::from_secs(5))
                    .err()
                    .map_or_else(|| "it ended without error".to_owned(), |e| format!("{e:#}"));
                self.fail(format!("{what}: {why}"))
            }
        }
    }
}
