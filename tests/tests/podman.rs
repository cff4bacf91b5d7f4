//! podman (CNI backend, runc) as a real CNI client.
//!
//! `harness_reference_plugins` proves the [`Podman`] harness with the
//! reference plugins alone (bridge + host-local): address, traffic to the
//! node, and CNI DEL on `podman rm`;
//! `harness_drop_after_panic_removes_everything` its teardown.
//! `podman_vm_pod_through_tapgate` runs the conflist a VM pod gets under
//! Multus — the primary network first, then `tapgate-cni` — against a
//! `tapgate agent`, with a relay standing in for QEMU on the pod's `tap0`;
//! it needs the `tapgate` and `tapgate-cni` binaries.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use tapgate_tests::child::{check_output, run_with_timeout};
use tapgate_tests::cni::Agent;
use tapgate_tests::dhcp::DhcpClient;
use tapgate_tests::podman::{Container, Podman, mounts_below};
use tapgate_tests::relay::TapRelay;
use tapgate_tests::scratch::ScratchDir;
use tapgate_tests::servers::{HttpServer, TcpEchoServer};
use tapgate_tests::{Netns, require_root, tapgate_cni_bin};

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

/// `GET http://agent<path>` over the agent's UNIX socket (curl, so the test
/// does not depend on the agent's Rust client).
fn agent_get(socket: &Path, path: &str) -> Result<String> {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "-f", "--max-time", "5", "--unix-socket"])
        .arg(socket)
        .arg(format!("http://agent{path}"));
    let out = check_output(
        &format!("curl --unix-socket {} {path}", socket.display()),
        run_with_timeout(&mut cmd, Duration::from_secs(10))?,
    )?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn attachments(socket: &Path) -> Result<Vec<Value>> {
    let text = agent_get(socket, "/v1/attachments")?;
    let list: Value = serde_json::from_str(&text).with_context(|| format!("not JSON: {text}"))?;
    list.get("attachments")
        .and_then(Value::as_array)
        .cloned()
        .with_context(|| format!("no attachments array: {text}"))
}

/// Prometheus samples `(name, labels, value)` whose metric name starts with
/// `tapgate_` and one of whose label values is exactly `label_value`.
fn samples_for(exposition: &str, label_value: &str) -> Vec<(String, String, f64)> {
    let quoted = format!("=\"{label_value}\"");
    exposition
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (name, labels) = series.split_once('{').unwrap_or((series, ""));
            if !name.starts_with("tapgate_") || !labels.contains(&quoted) {
                return None;
            }
            Some((
                name.to_owned(),
                labels.to_owned(),
                value.trim().parse().ok()?,
            ))
        })
        .collect()
}

#[test]
fn podman_vm_pod_through_tapgate() {
    root();
    let cni = tapgate_cni_bin().unwrap();
    let node = Netns::new("node").unwrap();
    let guest = Netns::new("guest").unwrap();
    // The node agent (it enters each pod's namespace by path itself).
    let agent = Agent::start().unwrap();
    let socket = agent.socket().to_path_buf();

    // Multus's order: the primary network, then the binding plugin.
    let conflist = json!({
        "cniVersion": "1.0.0",
        "name": "tgvm",
        "plugins": [
            bridge_plugin("10.88.8.0/24"),
            {
                "type": "tapgate-cni",
                "agentSocket": socket,
                "tap": { "owner": 107, "group": 107 }
            }
        ]
    });
    let podman = Podman::new(&node, &conflist).unwrap();
    podman.add_plugin("tapgate-cni", &cni).unwrap();
    let mut pod = podman
        .run("vmpod", &["sleep", "600"])
        .unwrap_or_else(|e| panic!("{e:#}\nagent stderr:\n{}", agent.stderr()));
    let pod_ip = pod_address(&pod).unwrap();
    assert!(pod_ip.starts_with("10.88.8."), "pod address {pod_ip}");
    let lease = podman.lease_file(&pod_ip);
    assert!(lease.exists(), "no lease {}", lease.display());
    let netns = pod.netns().to_path_buf();
    let netns_str = netns.to_str().unwrap().to_owned();

    // tap0 exists in the pod, owned by 107:107 (read from a sysfs mounted
    // in a private mount namespace inside the pod's network namespace).
    let owner = pod
        .in_netns(&[
            "unshare",
            "-m",
            "sh",
            "-c",
            "mount -t sysfs sysfs /sys && cat /sys/class/net/tap0/owner /sys/class/net/tap0/group",
        ])
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&owner.stdout)
            .split_whitespace()
            .collect::<Vec<_>>(),
        ["107", "107"]
    );

    // The agent holds exactly this pod's attachment, running.
    wait_until("the attachment is running", Duration::from_secs(20), || {
        let list = attachments(&socket)?;
        let ours: Vec<&Value> = list
            .iter()
            .filter(|a| a["containerId"] == pod.id())
            .collect();
        if list.len() != 1 || ours.len() != 1 {
            bail!("want one attachment of {}, have {list:?}", pod.id());
        }
        match ours[0]["phase"].as_str() {
            Some("running") => Ok(true),
            Some("failed" | "stopped") => bail!("attachment {}", ours[0]),
            _ => Ok(false),
        }
    })
    .unwrap_or_else(|e| panic!("{e:#}\nagent stderr:\n{}", agent.stderr()));

    // The VM: a relay holding the pod's tap0 and a tap in the guest
    // namespace, which takes a DHCP lease from tapgate.
    let relay = TapRelay::attach(&netns_str, "tap0", &guest, "eth0").unwrap();
    guest.ip(&["link", "set", "eth0", "up"]).unwrap();
    let lease_event = DhcpClient::new(&guest, "eth0")
        .unwrap()
        .run_once()
        .unwrap_or_else(|e| {
            panic!(
                "{e:#}\n{}\nagent:\n{}",
                relay.stats().summary(),
                agent.stderr()
            )
        });
    assert_eq!(lease_event.ip, "10.0.2.15", "{}", lease_event.line);

    // A file from a server outside the pod (node namespace, bridge
    // address), through tapgate and the pod's eth0; checked by sha256.
    let gw = bridge_address(&node).unwrap();
    let mut blob = vec![0u8; 1 << 20];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom").unwrap(), &mut blob)
        .unwrap();
    let server = HttpServer::start(
        &node,
        format!("{gw}:8080").parse().unwrap(),
        &[("blob", &blob)],
    )
    .unwrap();
    let out_dir = ScratchDir::new("fetch").unwrap();
    let fetched = out_dir.join("blob");
    guest
        .run(&[
            "curl",
            "-sS",
            "-f",
            "--max-time",
            "30",
            "-o",
            fetched.to_str().unwrap(),
            &server.url("blob"),
        ])
        .unwrap_or_else(|e| panic!("{e:#}\n{}", relay.stats().summary()));
    let source = out_dir.join("source");
    std::fs::write(&source, &blob).unwrap();
    let sums = check_output(
        "sha256sum",
        run_with_timeout(
            Command::new("sha256sum").arg(&source).arg(&fetched),
            Duration::from_secs(30),
        )
        .unwrap(),
    )
    .unwrap();
    let sums: Vec<String> = String::from_utf8_lossy(&sums.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect();
    assert_eq!(sums.len(), 2);
    assert_eq!(
        sums[0], sums[1],
        "sha256 of the served and the fetched file"
    );

    // The world sees the pod's address (tapgate NATs the VM to it).
    let echo = TcpEchoServer::start(&node, format!("{gw}:8081").parse().unwrap()).unwrap();
    guest
        .run(&[
            "sh",
            "-c",
            &format!("echo hello | socat -t 5 - TCP:{gw}:8081,connect-timeout=5"),
        ])
        .unwrap();
    let peers: Vec<String> = echo.peers().iter().map(|p| p.ip().to_string()).collect();
    assert_eq!(
        peers,
        std::slice::from_ref(&pod_ip),
        "peers of the node's echo server"
    );

    // /metrics: at least one `tapgate_*` sample labelled with this pod
    // (its name, podman's K8S_POD_NAME, or its container id) is nonzero —
    // the guest's DHCP exchange and the fetch above went through this
    // attachment, so its packet and DHCP counters cannot all be zero.
    let metrics = agent_get(&socket, "/metrics").unwrap();
    let mut ours = samples_for(&metrics, pod.name());
    ours.extend(samples_for(&metrics, pod.id()));
    assert!(
        ours.iter().any(|(_, _, v)| *v > 0.0),
        "no nonzero tapgate_ sample labelled {} or {}:\n{metrics}",
        pod.name(),
        pod.id()
    );
    eprintln!("metrics of the pod: {ours:?}");

    // The VM stops first (as QEMU does before the sandbox goes), then
    // podman rm runs CNI DEL through both plugins.
    drop(relay);
    pod.rm()
        .unwrap_or_else(|e| panic!("{e:#}\nagent stderr:\n{}", agent.stderr()));
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
    wait_until(
        "the agent's attachment list is empty",
        Duration::from_secs(10),
        || Ok(attachments(&socket)?.is_empty()),
    )
    .unwrap_or_else(|e| panic!("{e:#}\nagent stderr:\n{}", agent.stderr()));
    wait_until(
        "nothing is pinned any more",
        Duration::from_secs(10),
        || Ok(agent.bpffs().pins().is_empty()),
    )
    .unwrap_or_else(|e| panic!("{e:#}: {:?}", agent.bpffs().pins()));
}
