//! podman (CNI backend, runc) as a real CNI client.
//!
//! `harness_reference_plugins` proves the [`Podman`] harness with the
//! reference plugins alone (bridge + host-local): address, traffic to the
//! node, and CNI DEL on `podman rm`; `harness_drop_after_panic_removes_everything`
//! its teardown.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use tapgate_tests::podman::{Container, Podman, mounts_below};
use tapgate_tests::servers::HttpServer;
use tapgate_tests::{Netns, require_root};

const BRIDGE: &str = "tgbr0";

fn root() {
    require_root().unwrap_or_else(|e| panic!("{e}"));
}

/// The primary network of both tests: a bridge in the node namespace with
/// the gateway address, host-local addresses from `subnet`, no NAT.
fn bridge_plugin(subnet: &str) -> Value {
    json!({
        "type": "bridge",
        "bridge": BRIDGE,
        "isGateway": true,
        "ipMasq": false,
        "ipam": {
            "type": "host-local",
            "ranges": [[{ "subnet": subnet }]],
            "routes": [{ "dst": "0.0.0.0/0" }]
        }
    })
}

/// The first IPv4 address of `iface` from `ip -4 -o addr show` output.
fn ipv4_of(ip_output: &str, iface: &str) -> Result<String> {
    ip_output
        .lines()
        .filter(|l| l.split_whitespace().nth(1) == Some(iface))
        .find_map(|l| {
            let mut words = l.split_whitespace();
            words.find(|w| *w == "inet")?;
            words.next()?.split('/').next().map(str::to_owned)
        })
        .with_context(|| format!("no IPv4 address on {iface} in:\n{ip_output}"))
}

/// The container's eth0 address, read in its network namespace.
fn pod_address(c: &Container<'_, '_>) -> Result<String> {
    let out = c.in_netns(&["ip", "-4", "-o", "addr", "show", "dev", "eth0"])?;
    ipv4_of(&String::from_utf8_lossy(&out.stdout), "eth0")
}

/// The bridge's (gateway) address in the node namespace.
fn bridge_address(node: &Netns) -> Result<String> {
    let out = node.stdout(&["ip", "-4", "-o", "addr", "show", "dev", BRIDGE])?;
    ipv4_of(&out, BRIDGE)
}

/// Polls `check` (every 100 ms, at most `timeout`) until it returns
/// `Ok(true)`; fails with `what` and the last error otherwise.
fn wait_until(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> Result<bool>,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let last = match check() {
            Ok(true) => return Ok(()),
            Ok(false) => String::new(),
            Err(e) => format!(": {e:#}"),
        };
        if Instant::now() >= deadline {
            bail!("{what} not within {timeout:?}{last}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn harness_reference_plugins() {
    root();
    let node = Netns::new("node").unwrap();
    let conflist = json!({
        "cniVersion": "1.0.0",
        "name": "tgref",
        "plugins": [bridge_plugin("10.88.7.0/24")]
    });
    let podman = Podman::new(&node, &conflist).unwrap();
    let dir = podman.dir().to_path_buf();
    let mut c = podman.run("ref", &["sleep", "600"]).unwrap();
    assert_eq!(c.id().len(), 64, "container id {:?}", c.id());
    let netns = c.netns().to_path_buf();
    assert!(netns.exists(), "no netns at {}", netns.display());

    // eth0 in the container's netns has the host-local address, and
    // host-local recorded the lease in the private data dir.
    let ip = pod_address(&c).unwrap();
    assert!(ip.starts_with("10.88.7."), "pod address {ip}");
    let lease = podman.lease_file(&ip);
    let owner = std::fs::read_to_string(&lease)
        .unwrap_or_else(|e| panic!("lease file {}: {e}", lease.display()));
    assert!(
        owner.contains(c.id()),
        "lease {} holds {owner:?}",
        lease.display()
    );
    // The same seen from inside the container.
    let inside = c
        .exec(&["ip", "-4", "-o", "addr", "show", "dev", "eth0"])
        .unwrap();
    assert!(
        String::from_utf8_lossy(&inside.stdout).contains(&format!("inet {ip}/24")),
        "inside the container: {}",
        String::from_utf8_lossy(&inside.stdout)
    );

    // A server in the node namespace on the bridge address, fetched from
    // inside the container.
    let gw = bridge_address(&node).unwrap();
    assert_eq!(gw, "10.88.7.1");
    let body: Vec<u8> = (0..20_000u32).map(|i| b'a' + (i % 26) as u8).collect();
    let addr: SocketAddr = format!("{gw}:8080").parse().unwrap();
    let server = HttpServer::start(&node, addr, &[("file.txt", &body)]).unwrap();
    // No `-T`: Debian's busybox 1.35 wget segfaults with it; podman's
    // bounded exec is the time limit.
    let got = c
        .exec(&["wget", "-q", "-O", "-", &server.url("file.txt")])
        .unwrap();
    assert!(
        got.stdout == body,
        "fetched {} bytes, want {}",
        got.stdout.len(),
        body.len()
    );

    // podman rm runs CNI DEL: the netns and the lease are gone.
    c.rm().unwrap();
    assert!(
        !netns.exists(),
        "netns {} survived podman rm",
        netns.display()
    );
    assert!(
        !lease.exists(),
        "lease {} survived podman rm",
        lease.display()
    );
    let ps = podman.podman(&["ps", "-a", "-q"]).unwrap();
    assert!(
        ps.stdout.is_empty(),
        "podman ps -a: {}",
        String::from_utf8_lossy(&ps.stdout)
    );
    drop(c);

    // Dropping the environment leaves no mount and no directory.
    drop(server);
    drop(podman);
    assert_eq!(mounts_below(&dir), Vec::<PathBuf>::new());
    assert!(!dir.exists(), "{} survived", dir.display());
}

/// A test that panics with a container running leaves nothing behind:
/// the guards' `Drop`s remove the container (CNI DEL), its netns, the lease,
/// every mount and the scratch directory.
#[test]
fn harness_drop_after_panic_removes_everything() {
    root();
    let node = Netns::new("node").unwrap();
    let conflist = json!({
        "cniVersion": "1.0.0",
        "name": "tgpanic",
        "plugins": [bridge_plugin("10.88.9.0/24")]
    });
    let mut seen: Option<(PathBuf, PathBuf, PathBuf, u32)> = None;
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let podman = Podman::new(&node, &conflist).unwrap();
        let c = podman.run("doomed", &["sleep", "600"]).unwrap();
        let ip = pod_address(&c).unwrap();
        seen = Some((
            podman.dir().to_path_buf(),
            c.netns().to_path_buf(),
            podman.lease_file(&ip),
            c.pid(),
        ));
        panic!("deliberate panic with a container running");
    }));
    assert!(result.is_err());
    let (dir, netns, lease, pid) = seen.unwrap();
    assert!(!netns.exists(), "netns {} survived", netns.display());
    assert!(!lease.exists(), "lease {} survived", lease.display());
    assert_eq!(mounts_below(&dir), Vec::<PathBuf>::new());
    assert!(!dir.exists(), "{} survived", dir.display());
    wait_until(
        "the container's process is gone",
        Duration::from_secs(10),
        || Ok(!Path::new(&format!("/proc/{pid}")).exists()),
    )
    .unwrap();
}
