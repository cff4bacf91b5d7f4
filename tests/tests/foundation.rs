//! End-to-end tests of the tapgate foundation: DHCP, ARP and ICMP answered
//! for the guest, attach/detach hygiene and the error contract.
//!
//! Every test builds its own [`Topology`] (namespaces `guest`, `host`,
//! `world`) and runs the real `tapgate` binary in the host namespace. They
//! need root; run them with `cargo xtask test`.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use tapgate_tests::child::Child;
use tapgate_tests::dhcp::{DhcpClient, DhcpEvent};
use tapgate_tests::running::Running;
use tapgate_tests::scratch::ScratchDir;
use tapgate_tests::tcx::{self, TcxDirection};
use tapgate_tests::topology::{
    self, DEFAULT_DNS, DEFAULT_GATEWAY, DEFAULT_GATEWAY_MAC, DEFAULT_GUEST_ADDR, GUEST_IFACE,
    TAP_NAME, UPLINK_NAME,
};
use tapgate_tests::{GuestKind, Topology, fixtures, require_root};

/// How long an erroring tapgate may take to exit.
const ERROR_EXIT_TIMEOUT: Duration = Duration::from_secs(10);

/// This file's helpers on the shared fixture.
trait FoundationRun {
    /// Runs `argv` in the guest and returns stdout.
    fn guest(&self, argv: &[&str]) -> String;
    /// Runs `argv` in the host namespace and returns stdout.
    fn host(&self, argv: &[&str]) -> String;
    /// Asserts the guest's address and default route after DHCP.
    fn check_guest_config(&self, cidr: &str, gateway: &str);
}

impl FoundationRun for Running {
    fn guest(&self, argv: &[&str]) -> String {
        self.ok(self.topo.guest().stdout(argv))
    }

    fn host(&self, argv: &[&str]) -> String {
        self.ok(self.topo.host().stdout(argv))
    }

    fn check_guest_config(&self, cidr: &str, gateway: &str) {
        let addrs = self.guest(&["ip", "-4", "addr", "show", "dev", GUEST_IFACE]);
        self.check(
            addrs.contains(&format!("inet {cidr} ")),
            format!("guest eth0 lacks {cidr}:\n{addrs}"),
        );
        let routes = self.guest(&["ip", "-4", "route"]);
        self.check(
            routes.contains(&format!("default via {gateway} ")),
            format!("guest has no default route via {gateway}:\n{routes}"),
        );
    }
}

fn topology(kind: GuestKind) -> Topology {
    if let Err(e) = require_root() {
        panic!("{e}");
    }
    Topology::new(kind).unwrap_or_else(|e| panic!("cannot build the topology: {e:#}"))
}

fn assert_lease(run: &Running, lease: &DhcpEvent, ip: &str, mask: &str, router: &str, dns: &str) {
    let expect = |field: &str, got: &str, want: &str| {
        run.check(
            got == want,
            format!(
                "DHCP {field}: got {got:?}, want {want:?} (event: {})",
                lease.line
            ),
        );
    };
    expect("ip", &lease.ip, ip);
    expect("mask", &lease.mask, mask);
    expect("router", &lease.router, router);
    expect("dns", &lease.dns, dns);
    run.check(
        lease.lease.parse::<u32>().is_ok_and(|secs| secs > 0),
        format!("DHCP lease time missing or zero: {}", lease.line),
    );
    run.check(
        lease
            .mtu
            .parse::<u32>()
            .is_ok_and(|mtu| (576..=65535).contains(&mtu)),
        format!("DHCP MTU option missing or implausible: {}", lease.line),
    );
}

/// Checks DHCP with the default addressing, then the guest configuration.
fn dhcp_defaults(kind: GuestKind) -> Running {
    let run = Running::start(kind, &[]);
    let lease = run.dhcp();
    assert_lease(
        &run,
        &lease,
        DEFAULT_GUEST_ADDR,
        "24",
        DEFAULT_GATEWAY,
        DEFAULT_DNS,
    );
    run.check_guest_config(&format!("{DEFAULT_GUEST_ADDR}/24"), DEFAULT_GATEWAY);
    run
}

fn ping_gateway_and_dns(run: &Running) {
    run.ok(run.topo.ping_from_guest(DEFAULT_GATEWAY, 3));
    run.ok(run.topo.ping_from_guest(DEFAULT_DNS, 3));
}

#[test]
fn dhcp_lease_with_defaults() {
    let run = Running::start(GuestKind::RealTap, &[]);
    let lease = run.dhcp();
    assert_lease(
        &run,
        &lease,
        DEFAULT_GUEST_ADDR,
        "24",
        DEFAULT_GATEWAY,
        DEFAULT_DNS,
    );
    run.check(
        lease.subnet == "255.255.255.0" && !lease.serverid.is_empty(),
        format!("subnet mask / server id: {}", lease.line),
    );
    run.check_guest_config(&format!("{DEFAULT_GUEST_ADDR}/24"), DEFAULT_GATEWAY);
    // The script applied the MTU option to the interface.
    let link = run.guest(&["ip", "link", "show", "dev", GUEST_IFACE]);
    run.check(
        link.contains(&format!("mtu {} ", lease.mtu)),
        format!("guest MTU is not the leased {}:\n{link}", lease.mtu),
    );
}

#[test]
fn dhcp_lease_with_custom_addressing() {
    let run = Running::start(
        GuestKind::RealTap,
        &[
            "--address",
            "192.168.77.9/24",
            "--gateway",
            "192.168.77.1",
            "--dns",
            "192.168.77.53",
        ],
    );
    let lease = run.dhcp();
    assert_lease(
        &run,
        &lease,
        "192.168.77.9",
        "24",
        "192.168.77.1",
        "192.168.77.53",
    );
    run.check_guest_config("192.168.77.9/24", "192.168.77.1");
    run.ok(run.topo.ping_from_guest("192.168.77.1", 2));
}

#[test]
fn dhcp_lease_renews_on_timer() {
    let run = Running::start(GuestKind::RealTap, &["--dhcp-lease", "4"]);
    let mut client = run.ok(DhcpClient::new(run.topo.guest(), GUEST_IFACE));
    run.ok(client.start());
    let bound = client
        .wait_event("bound", 0, Duration::from_secs(10))
        .unwrap_or_else(|e| run.fail(format!("{e:#}")));
    run.check(
        bound.lease == "4",
        format!("lease time should be 4: {}", bound.line),
    );
    // busybox udhcpc raises leases shorter than 30 s to 30 s and renews at
    // half the lease, so the first renewal comes ~15 s after bound.
    let renew = client
        .wait_event("renew", 0, Duration::from_secs(25))
        .unwrap_or_else(|e| run.fail(format!("{e:#}")));
    run.check(
        renew.ip == bound.ip,
        format!(
            "renewal changed the address: {} -> {}",
            bound.line, renew.line
        ),
    );
    run.check_guest_config(&format!("{DEFAULT_GUEST_ADDR}/24"), DEFAULT_GATEWAY);
}

#[test]
fn dhcp_renew_on_request() {
    let run = Running::start(GuestKind::RealTap, &[]);
    let mut client = run.ok(DhcpClient::new(run.topo.guest(), GUEST_IFACE));
    run.ok(client.start());
    let bound = client
        .wait_event("bound", 0, Duration::from_secs(10))
        .unwrap_or_else(|e| run.fail(format!("{e:#}")));
    // SIGUSR1 makes udhcpc renew now (a unicast DHCPREQUEST to the server).
    run.ok(client.child().unwrap().signal(Signal::SIGUSR1));
    let renew = client
        .wait_event("renew", 0, Duration::from_secs(10))
        .unwrap_or_else(|e| run.fail(format!("{e:#}")));
    run.check(
        renew.ip == bound.ip && renew.router == bound.router && renew.dns == bound.dns,
        format!(
            "renewal changed the lease: {} -> {}",
            bound.line, renew.line
        ),
    );
}

#[test]
fn ping_gateway_and_dns_addresses() {
    let run = dhcp_defaults(GuestKind::RealTap);
    ping_gateway_and_dns(&run);
}

/// Starts tapgate with `--log-level LEVEL`, pings the gateway from a guest
/// with a static address and returns tapgate's stderr after it stopped.
fn log_after_ping(level: &str) -> String {
    let topo = topology(GuestKind::Veth);
    let mut tapgate = topo
        .spawn_tapgate(&[
            "run",
            "--tap",
            TAP_NAME,
            "--uplink",
            UPLINK_NAME,
            "--log-level",
            level,
        ])
        .unwrap();
    tapgate
        .wait_stderr_contains(topology::READY_MARKER, topology::READY_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e:#}"));
    topo.guest()
        .ip(&["addr", "add", "10.0.2.15/24", "dev", GUEST_IFACE])
        .unwrap();
    topo.ping_from_guest(DEFAULT_GATEWAY, 2)
        .unwrap_or_else(|e| panic!("{e:#}\n{}", tapgate.stderr()));
    let status = tapgate.stop().unwrap();
    assert!(status.success(), "tapgate exited with {status}");
    tapgate.stderr()
}

#[test]
fn ebpf_log_lines_follow_the_log_level() {
    // At trace level the punt exit logs every punted frame (origin 1 = tap,
    // reason 2 = IPv4 without a flow: the pings); the daemon
    // forwards those records under the eBPF crate's target.
    let trace = log_after_ping("trace");
    assert!(
        trace
            .lines()
            .any(|l| l.contains("TRACE datapath_ebpf") && l.contains("punt: origin 1 reason 2")),
        "no eBPF trace line for the punted pings:\n{trace}"
    );
    // At debug level the kernel filters them out before they are written.
    let debug = log_after_ping("debug");
    assert!(
        !debug.contains("datapath_ebpf"),
        "eBPF trace lines at debug level:\n{debug}"
    );
}

fn arping_resolves(run: &Running, target: &str, mac: &str) {
    let out = run.guest(&["arping", "-c", "2", "-w", "4", "-I", GUEST_IFACE, target]);
    run.check(
        out.to_lowercase().contains(&mac.to_lowercase()),
        format!("arping {target} did not resolve to {mac}:\n{out}"),
    );
}

#[test]
fn arp_resolves_gateway_mac() {
    let run = dhcp_defaults(GuestKind::RealTap);
    arping_resolves(&run, DEFAULT_GATEWAY, DEFAULT_GATEWAY_MAC);
    arping_resolves(&run, DEFAULT_DNS, DEFAULT_GATEWAY_MAC);
}

#[test]
fn arp_resolves_custom_mac() {
    let mac = "02:aa:bb:cc:dd:ee";
    let run = Running::start(GuestKind::RealTap, &["--mac", mac]);
    let lease = run.dhcp();
    run.check(
        lease.ip == DEFAULT_GUEST_ADDR,
        format!("lease: {}", lease.line),
    );
    arping_resolves(&run, DEFAULT_GATEWAY, mac);
    let neigh = run.guest(&["ip", "neigh", "show", "dev", GUEST_IFACE]);
    run.check(
        !neigh.contains("52:55:0a:00:02:02"),
        format!("default MAC still in use:\n{neigh}"),
    );
}

#[test]
fn attached_with_tcx_and_host_traffic_unaffected() {
    let run = Running::start(GuestKind::RealTap, &[]);
    let ready = run.tapgate.stderr();
    run.check(
        ready.contains(&format!("ready: tap={TAP_NAME} uplink={UPLINK_NAME}")),
        "readiness line names the wrong interfaces",
    );
    let tap = run.ok(tcx::attached_names(
        run.topo.host(),
        TAP_NAME,
        TcxDirection::Ingress,
    ));
    run.check(
        tcx::contains_program(&tap, "tg_tap_ingress"),
        format!("tg_tap_ingress not attached to {TAP_NAME} tcx ingress: {tap:?}"),
    );
    let uplink = run.ok(tcx::attached_names(
        run.topo.host(),
        UPLINK_NAME,
        TcxDirection::Ingress,
    ));
    run.check(
        tcx::contains_program(&uplink, "tg_uplink_ingress"),
        format!("tg_uplink_ingress not attached to {UPLINK_NAME} tcx ingress: {uplink:?}"),
    );
    // The host namespace's own traffic still flows over the uplink.
    run.ok(topology::ping(run.topo.host(), topology::WORLD_ADDR, 3));
    run.ok(topology::ping(run.topo.host(), topology::WORLD_FAR_ADDR, 2));
    // And the world can still reach the host.
    run.ok(topology::ping(
        run.topo.world(),
        topology::HOST_UPLINK_ADDR,
        2,
    ));
}

#[test]
fn detach_leaves_no_residue() {
    let mut run = Running::start(GuestKind::RealTap, &[]);
    let qdisc_before = run.host(&["tc", "qdisc", "show", "dev", TAP_NAME]);
    let lease = run.dhcp();
    run.check(
        lease.ip == DEFAULT_GUEST_ADDR,
        format!("lease: {}", lease.line),
    );
    let pid = run.tapgate.pid();
    let status = run
        .tapgate
        .stop()
        .unwrap_or_else(|e| run.fail(format!("stopping tapgate: {e:#}")));
    run.check(
        status.code() == Some(0),
        format!("tapgate exited with {status} after SIGTERM"),
    );
    run.check(
        run.tapgate.stderr().contains("detached"),
        "no `detached` line after SIGTERM",
    );
    run.check(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        format!("tapgate pid {pid} still exists"),
    );
    for iface in [TAP_NAME, UPLINK_NAME] {
        for direction in [TcxDirection::Ingress, TcxDirection::Egress] {
            let left = run.ok(tcx::attached_names(run.topo.host(), iface, direction));
            run.check(
                left.is_empty(),
                format!("programs left on {iface} {direction:?}: {left:?}"),
            );
        }
        let net = run.host(&["bpftool", "net", "show", "dev", iface]);
        run.check(
            !net.contains("tg_"),
            format!("bpftool net show dev {iface}:\n{net}"),
        );
        let qdisc = run.host(&["tc", "qdisc", "show", "dev", iface]);
        let had_clsact = iface == TAP_NAME && qdisc_before.contains("clsact");
        run.check(
            had_clsact || !qdisc.contains("clsact"),
            format!("clsact qdisc left on {iface}:\n{qdisc}"),
        );
        let filters = run.host(&["tc", "filter", "show", "dev", iface, "ingress"]);
        run.check(
            !filters.contains("tg_"),
            format!("tc filters left on {iface}:\n{filters}"),
        );
    }
    // No program is held by the (gone) daemon any more. Other tests'
    // tapgates legitimately hold programs of the same names, so only this
    // pid is checked.
    let progs = run.host(&["bpftool", "prog", "show"]);
    run.check(
        !progs.contains(&format!("tapgate({pid})")),
        format!("programs still held by pid {pid}:\n{progs}"),
    );
}

/// Runs tapgate with `args` (spawned by `spawn`), expects exit status 1
/// within [`ERROR_EXIT_TIMEOUT`] with a `tapgate: error: ` line containing
/// `needle`, and returns the stderr.
fn expect_error(mut child: Child, needle: &str) -> String {
    let started = Instant::now();
    let status = child
        .wait_exit(ERROR_EXIT_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e:#}"));
    let stderr = child.stderr();
    assert_eq!(
        status.code(),
        Some(1),
        "tapgate should exit with status 1 (took {:?}); stderr:\n{stderr}",
        started.elapsed()
    );
    let error_line = stderr
        .lines()
        .find(|l| l.starts_with("tapgate: error: "))
        .unwrap_or_else(|| panic!("no `tapgate: error: ` line in stderr:\n{stderr}"));
    assert!(
        stderr.contains(needle),
        "stderr lacks {needle:?}; error line: {error_line}\nstderr:\n{stderr}"
    );
    stderr
}

#[test]
fn error_tap_missing() {
    let topo = topology(GuestKind::RealTap);
    let child = topo
        .spawn_tapgate(&["run", "--tap", "nosuch0", "--uplink", UPLINK_NAME])
        .unwrap();
    expect_error(child, "tap: interface \"nosuch0\" not found");
}

#[test]
fn error_uplink_missing() {
    let topo = topology(GuestKind::RealTap);
    let child = topo
        .spawn_tapgate(&["run", "--tap", TAP_NAME, "--uplink", "nosuch1"])
        .unwrap();
    expect_error(child, "uplink: interface \"nosuch1\" not found");
}

#[test]
fn error_not_root() {
    let topo = topology(GuestKind::RealTap);
    let bin = topology::tapgate_bin_str().unwrap();
    let mut cmd = topo.host().cmd("setpriv");
    cmd.args([
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        &bin,
        "run",
        "--tap",
        TAP_NAME,
        "--uplink",
        UPLINK_NAME,
    ]);
    let child = Child::spawn(cmd, "tapgate (unprivileged)").unwrap();
    expect_error(child, "must run as root");
    let left = tcx::attached_names(topo.host(), TAP_NAME, TcxDirection::Ingress).unwrap();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn error_second_instance_on_same_tap() {
    let mut run = Running::start(GuestKind::RealTap, &[]);
    let child = run
        .topo
        .spawn_tapgate(&["run", "--tap", TAP_NAME, "--uplink", UPLINK_NAME])
        .unwrap();
    expect_error(child, &format!("already running on tap \"{TAP_NAME}\""));
    // The first instance is unharmed.
    let status = run.tapgate.try_wait().unwrap();
    run.check(
        status.is_none(),
        format!("first instance exited: {status:?}"),
    );
    let lease = run.dhcp();
    run.check(
        lease.ip == DEFAULT_GUEST_ADDR,
        format!("lease: {}", lease.line),
    );
    let tap = run.ok(tcx::attached_names(
        run.topo.host(),
        TAP_NAME,
        TcxDirection::Ingress,
    ));
    run.check(
        tap.iter()
            .filter(|n| n.as_str() == tcx::kernel_name("tg_tap_ingress"))
            .count()
            == 1,
        format!("expected exactly one tg_tap_ingress: {tap:?}"),
    );
}

#[test]
fn error_verifier_rejection() {
    let topo = topology(GuestKind::RealTap);
    let dir = ScratchDir::new("ebpf").unwrap();
    let object = fixtures::invalid_ebpf_object(dir.path()).unwrap();
    let object = object.to_str().unwrap();
    let child = topo
        .spawn_tapgate(&[
            "run",
            "--tap",
            TAP_NAME,
            "--uplink",
            UPLINK_NAME,
            "--ebpf-object",
            object,
        ])
        .unwrap();
    let stderr = expect_error(child, "rejected by the kernel verifier");
    assert!(
        stderr.contains("R2") || stderr.contains("invalid"),
        "verifier log missing from stderr:\n{stderr}"
    );
    for iface in [TAP_NAME, UPLINK_NAME] {
        let left = tcx::attached_names(topo.host(), iface, TcxDirection::Ingress).unwrap();
        assert!(left.is_empty(), "programs left on {iface}: {left:?}");
    }
}

#[test]
fn same_tap_name_in_two_namespaces() {
    let mut first = Running::start(GuestKind::RealTap, &[]);
    let mut second = Running::start(GuestKind::RealTap, &[]);
    assert_ne!(first.topo.host().name(), second.topo.host().name());
    for run in [&first, &second] {
        let lease = run.dhcp();
        assert_lease(
            run,
            &lease,
            DEFAULT_GUEST_ADDR,
            "24",
            DEFAULT_GATEWAY,
            DEFAULT_DNS,
        );
        run.ok(run.topo.ping_from_guest(DEFAULT_GATEWAY, 2));
    }
    for run in [&mut first, &mut second] {
        let status = run.tapgate.try_wait().unwrap();
        run.check(status.is_none(), format!("an instance exited: {status:?}"));
    }
}

#[test]
fn default_control_sockets_of_two_namespaces_do_not_collide() {
    // Two daemons on taps called tap0 in two namespaces, both with the
    // default control socket; each namespace's client reaches its own.
    let topos = [topology(GuestKind::Veth), topology(GuestKind::Veth)];
    let mut daemons = Vec::new();
    for topo in &topos {
        let mut d = topo
            .spawn_tapgate(&["run", "--tap", TAP_NAME, "--uplink", UPLINK_NAME])
            .unwrap();
        d.wait_stderr_contains(topology::READY_MARKER, topology::READY_TIMEOUT)
            .unwrap_or_else(|e| panic!("{e:#}"));
        daemons.push(d);
    }
    let bin = tapgate_tests::tapgate_bin().unwrap();
    let bin = bin.to_str().unwrap();
    let mut paths = Vec::new();
    for (topo, d) in topos.iter().zip(&daemons) {
        let out = topo
            .host()
            .stdout(&[bin, "stats", "--json", "--tap", TAP_NAME]);
        let out = out.unwrap_or_else(|e| panic!("{e:#}\n{}", d.stderr()));
        assert!(out.contains("fastpath_packets"), "{out}");
        let line = d.stderr();
        let path = line
            .split("control=")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap_or_else(|| panic!("no control= in the ready line:\n{line}"))
            .to_owned();
        paths.push(path);
    }
    assert_ne!(paths[0], paths[1], "both daemons use {}", paths[0]);
    for mut d in daemons {
        assert!(d.stop().unwrap().success(), "{}", d.stderr());
    }
    for p in &paths {
        let p = std::path::Path::new(p);
        assert!(!p.exists(), "{} left behind", p.display());
        assert!(
            !p.parent().unwrap().exists(),
            "{} left behind",
            p.parent().unwrap().display()
        );
    }
}

#[test]
fn veth_guest_dhcp_and_ping() {
    let run = dhcp_defaults(GuestKind::Veth);
    ping_gateway_and_dns(&run);
    arping_resolves(&run, DEFAULT_GATEWAY, DEFAULT_GATEWAY_MAC);
}

#[test]
fn exits_when_its_tap_goes() {
    let topo = topology(GuestKind::RealTap);
    let child = topo.start_tapgate(&[]).unwrap_or_else(|e| panic!("{e:#}"));
    // The guest is gone (what a hypervisor's exit does to its tap).
    topo.host().ip(&["link", "del", TAP_NAME]).unwrap();
    let stderr = expect_error(child, "tap tap0 disappeared");
    assert!(stderr.contains("detached"), "{stderr}");
    for direction in [TcxDirection::Ingress, TcxDirection::Egress] {
        let left = tcx::attached_names(topo.host(), UPLINK_NAME, direction).unwrap();
        assert!(left.is_empty(), "programs left on the uplink: {left:?}");
    }
}

#[test]
fn run_serves_prometheus_metrics() {
    // Loopback of the host namespace: nothing leaves it.
    let run = Running::start(GuestKind::RealTap, &["--metrics", "127.0.0.1:9465"]);
    let lease = run.dhcp();
    run.check(
        lease.ip == DEFAULT_GUEST_ADDR,
        format!("lease: {}", lease.line),
    );
    let metrics = run.host(&[
        "curl",
        "-sS",
        "--max-time",
        "5",
        "http://127.0.0.1:9465/metrics",
    ]);
    let sample = |name: &str| -> Option<f64> {
        metrics
            .lines()
            .find(|l| {
                l.starts_with(&format!(
                    "{name}{{namespace=\"\",pod=\"\",interface=\"tap0\"}} "
                ))
            })
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    };
    run.check(
        sample("tapgate_dhcp_replies_total").is_some_and(|v| v >= 2.0),
        format!("DHCP replies (OFFER, ACK) not counted:\n{metrics}"),
    );
    run.check(
        sample("tapgate_slowpath_packets_total").is_some_and(|v| v >= 2.0),
        format!("punted packets not counted:\n{metrics}"),
    );
    run.check(
        metrics.ends_with("# EOF\n"),
        "not an OpenMetrics exposition",
    );
    let health = run.host(&[
        "curl",
        "-sS",
        "--max-time",
        "5",
        "http://127.0.0.1:9465/healthz",
    ]);
    run.check(health == "ok\n", format!("/healthz: {health:?}"));
}
