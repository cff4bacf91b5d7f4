//! Network-namespace test harness for tapgate.
//!
//! This crate builds throw-away network topologies out of Linux network
//! namespaces and runs tapgate (and guest-side tools such as busybox
//! `udhcpc`, `ping` and `arping`) inside them. It is used by the end-to-end
//! tests in `tests/tests/` and by `cargo xtask demo`.
//!
//! # Theory of operation
//!
//! Everything happens inside namespaces this crate creates; the machine's
//! own interfaces are never touched:
//!
//! ```text
//!  guest ns              host ns                         world ns
//!  eth0 ──(relay|veth)── tap0  [tapgate]  uplink0 ───veth─── wan0
//!                                         198.51.100.1       198.51.100.2
//!                                                            203.0.113.10/32 (dummy0 or lo)
//! ```
//!
//! * [`netns::Netns`] owns one uniquely named namespace and deletes it (after
//!   killing whatever still runs inside) when dropped.
//! * [`child::Child`] owns one background process and its captured stderr.
//! * [`relay::TapRelay`] plays the hypervisor: it holds two tap file
//!   descriptors (`tap0` in the host namespace, `eth0` in the guest one) and
//!   copies Ethernet frames between them.
//! * [`topology::Topology`] wires the three namespaces together and starts
//!   tapgate in the host namespace.
//! * [`dhcp`] drives busybox `udhcpc` with a private event script.
//! * [`tcx`] lists the eBPF programs attached to an interface with tcx
//!   (which Debian's bpftool 7.1 cannot show).
//! * [`fixtures`] builds small artefacts the tests need (an eBPF object the
//!   verifier rejects).
//! * [`nsthread`] runs Rust code (plain or on a tokio runtime) on a thread
//!   inside a namespace, for socket work the command-line tools cannot do.
//! * [`servers`] starts world-side servers (busybox httpd, TCP and UDP
//!   echo, a fixed-answer DNS server); [`clients`] opens thousands of TCP
//!   connections at once; [`bulk`] streams gigabytes checked by sha256;
//!   [`rawtcp`] sends hand-made TCP segments and captures the answers.
//! * [`scenarios`] are the traffic patterns of the flow tests, written
//!   once and run both through tapgate and through the kernel's own NAT
//!   (which proves the scenario itself right).
//! * [`icmp`] are the ICMP and IPv4-fragment scenarios (issue 5), run
//!   the same two ways, plus raw-socket crafting of malformed ICMP.
//! * [`control`] reads `tapgate stats` / `tapgate flows` from the
//!   topology's control socket.
//! * [`podman::Podman`] runs a real container runtime (podman 4 with its
//!   CNI backend and runc) against a test's CNI configuration, isolated in
//!   a temporary directory and a "node" namespace; [`podman::Container`]
//!   owns one container and removes it (CNI DEL) when dropped.
//! * [`paced`] streams a self-checking pattern slowly enough to span a
//!   daemon restart, and timestamps what arrives.
//! * [`bpffs::Bpffs`] mounts a private bpffs for a test's pins.
//! * [`cni`] runs `tapgate-cni` as a runtime does, builds a pod namespace
//!   with an uplink and starts `tapgate agent`.
//! * [`progtest::ProgTest`] loads the datapath's programs with private
//!   maps and runs single frames through them with `BPF_PROG_TEST_RUN`
//!   (the kernel fixtures of `tests/tests/kernel_fixtures.rs`).
//!
//! All guards tear down in `Drop`, so a failing or panicking test leaves no
//! namespace, process or temporary directory behind; every wait is bounded.

pub mod bpffs;
pub mod bulk;
pub mod child;
pub mod clients;
pub mod cni;
pub mod control;
pub mod dhcp;
pub mod fixtures;
pub mod icmp;
pub mod ipv6;
pub mod netns;
pub mod nsthread;
pub mod paced;
pub mod podman;
pub mod progtest;
pub mod rawtcp;
pub mod relay;
pub mod running;
pub mod scenarios;
pub mod scratch;
pub mod servers;
pub mod tcx;
pub mod topology;

use std::path::PathBuf;

use anyhow::{Context, Result, bail};

pub use child::Child;
pub use netns::Netns;
pub use topology::{GuestKind, Topology};

/// Message used when the end-to-end tests are run without root privileges.
pub const NEED_ROOT: &str = "end-to-end tests need root: run `cargo xtask test` as root";

/// Fails with [`NEED_ROOT`] unless the effective user is root.
pub fn require_root() -> Result<()> {
    if nix::unistd::geteuid().is_root() {
        Ok(())
    } else {
        bail!("{NEED_ROOT}")
    }
}

/// Path of the `tapgate` binary under test.
///
/// Uses `$TAPGATE_BIN` when set. Otherwise the binary is looked up next to
/// the running executable: a test executable lives in
/// `target/<profile>/deps/`, the binary in `target/<profile>/tapgate`; an
/// executable directly in `target/<profile>/` (such as xtask) is handled too.
pub fn tapgate_bin() -> Result<PathBuf> {
    target_bin("tapgate", "TAPGATE_BIN")
}

/// Path of the `tapgate-cni` plugin binary under test: `$TAPGATE_CNI_BIN`,
/// else `tapgate-cni` found like [`tapgate_bin`].
pub fn tapgate_cni_bin() -> Result<PathBuf> {
    target_bin("tapgate-cni", "TAPGATE_CNI_BIN")
}

/// Path of the workspace binary `name`: the file named by environment
/// variable `env` when set, else `name` in the running executable's
/// `target/<profile>/` directory.
pub fn target_bin(name: &str, env: &str) -> Result<PathBuf> {
    if let Some(path) = std::env::var_os(env) {
        let path = PathBuf::from(path);
        if !path.is_file() {
            bail!("{env}={} does not exist or is not a file", path.display());
        }
        return Ok(path);
    }
    let exe = std::env::current_exe().context("cannot locate the running executable")?;
    let mut dir = exe
        .parent()
        .with_context(|| format!("executable {} has no parent directory", exe.display()))?
        .to_path_buf();
    if dir.file_name().is_some_and(|name| name == "deps") {
        dir.pop();
    }
    let candidate = dir.join(name);
    if candidate.is_file() {
        Ok(candidate)
    } else {
        bail!(
            "{name} binary not found at {}: build it with `cargo build --bins` \
             or run `cargo xtask test` (or set {env})",
            candidate.display()
        )
    }
}
