//! Bulk TCP transfers between the guest and the world, checked end to end
//! with sha256.
//!
//! # Theory of operation
//!
//! [`transfer`] streams `bytes` bytes of `/dev/urandom` over one TCP
//! connection with `socat`, hashing them with `sha256sum` on both ends, so
//! nothing is ever stored (1 GiB costs no disk or memory) and any loss,
//! duplication or corruption shows as different hashes. The sender is
//! `head -c N /dev/urandom | tee >(sha256sum > sent) | socat ...`, the
//! receiver `socat ... | sha256sum > received`; the server side (always in
//! the world namespace, listening on `198.51.100.2:PORT`) is a background
//! [`Child`], the client side (the guest) a bounded foreground command.
//! `set -o pipefail` makes a failure anywhere in a pipeline count, socat's
//! `connect-timeout=10` bounds connecting, and the whole run is bounded by
//! the caller's timeout. The process substitution may finish writing its
//! hash after its shell exits, so the hash files are polled (bounded).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::child::Child;
use crate::scratch::ScratchDir;
use crate::servers::{READY_TIMEOUT, wait_tcp_listening};
use crate::topology::{Topology, WORLD_ADDR};

/// Which way the data flows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// The guest sends, the world receives.
    GuestToWorld,
    /// The world sends, the guest receives.
    WorldToGuest,
}

/// The sha256 (hex) of what was sent and of what was received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hashes {
    /// Hash of the bytes sent.
    pub sent: String,
    /// Hash of the bytes received.
    pub received: String,
}

impl Hashes {
    /// Whether both ends saw the same bytes.
    pub fn equal(&self) -> bool {
        self.sent == self.received
    }
}

/// Reads a `sha256sum` output file, waiting (at most 15 s) for the hash.
fn read_hash(path: &Path) -> Result<String> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if let Some(hash) = text.split_whitespace().next().filter(|h| h.len() == 64) {
            return Ok(hash.to_owned());
        }
        if Instant::now() >= deadline {
            bail!("no sha256 in {} (got {text:?})", path.display());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Sends `bytes` random bytes in direction `dir` over one TCP connection
/// to `198.51.100.2:port` (the world listens), within `timeout`; returns
/// both ends' hashes.
pub fn transfer(
    topo: &Topology,
    dir: Direction,
    bytes: u64,
    port: u16,
    timeout: Duration,
) -> Result<Hashes> {
    transfer_at(topo, WORLD_ADDR, dir, bytes, port, timeout)
}

/// [`transfer`] with the world's server on `server` (an IPv4 or IPv6
/// address of the world namespace).
pub fn transfer_at(
    topo: &Topology,
    server: &str,
    dir: Direction,
    bytes: u64,
    port: u16,
    timeout: Duration,
) -> Result<Hashes> {
    let scratch = ScratchDir::new("bulk")?;
    let sent_path = scratch.join("sent.sha256");
    let received_path = scratch.join("received.sha256");
    let sent = sent_path.to_str().context("path is not UTF-8")?;
    let received = received_path.to_str().context("path is not UTF-8")?;
    let source = format!("head -c {bytes} /dev/urandom | tee >(sha256sum > {sent})");
    let (listen, connect) = if server.contains(':') {
        (
            format!("TCP6-LISTEN:{port},bind=[{server}],reuseaddr"),
            format!("TCP6:[{server}]:{port},connect-timeout=10"),
        )
    } else {
        (
            format!("TCP-LISTEN:{port},bind={server},reuseaddr"),
            format!("TCP:{server}:{port},connect-timeout=10"),
        )
    };
    let (server_script, client_script) = match dir {
        Direction::GuestToWorld => (
            format!("socat -u {listen} STDOUT | sha256sum > {received}"),
            format!("{source} | socat -u STDIN {connect}"),
        ),
        Direction::WorldToGuest => (
            format!("{source} | socat -u STDIN {listen}"),
            format!("socat -u {connect} STDOUT | sha256sum > {received}"),
        ),
    };
    let mut server_cmd = topo.world().cmd("bash");
    server_cmd.args(["-c", &format!("set -o pipefail; {server_script}")]);
    let mut server = Child::spawn(server_cmd, "bulk server")?;
    wait_tcp_listening(topo.world(), port, READY_TIMEOUT)?;
    topo.guest()
        .run_timeout(
            &["bash", "-c", &format!("set -o pipefail; {client_script}")],
            timeout,
        )
        .with_context(|| format!("bulk client ({dir:?}, {bytes} bytes)"))?;
    let status = server.wait_exit(Duration::from_secs(30))?;
    if !status.success() {
        bail!("bulk server exited with {status}: {}", server.stderr());
    }
    Ok(Hashes {
        sent: read_hash(&sent_path)?,
        received: read_hash(&received_path)?,
    })
}
