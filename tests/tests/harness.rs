//! Self-tests of the namespace harness (no tapgate needed).
//!
//! They check that both guest kinds carry frames (and that the relay can
//! attach to an existing tap), that the world is reachable from the host,
//! that every namespace and process disappears on drop (also after a
//! panic), and that the DHCP helper works against busybox `udhcpd`.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tapgate_tests::dhcp::DhcpClient;
use tapgate_tests::relay::TapRelay;
use tapgate_tests::scratch::ScratchDir;
use tapgate_tests::topology::{self, GUEST_IFACE, TAP_NAME};
use tapgate_tests::{Child, GuestKind, Netns, Topology, require_root};

fn topo(kind: GuestKind) -> Topology {
    require_root().unwrap_or_else(|e| panic!("{e}"));
    Topology::new(kind).unwrap_or_else(|e| panic!("cannot build topology: {e:#}"))
}

fn ns_exists(name: &str) -> bool {
    Path::new("/run/netns").join(name).exists()
}

fn names(t: &Topology) -> Vec<String> {
    vec![
        t.guest().name().to_owned(),
        t.host().name().to_owned(),
        t.world().name().to_owned(),
    ]
}

/// Addresses the guest and tap ends directly and pings across.
fn ping_across(t: &Topology) {
    t.guest()
        .ip(&["addr", "add", "10.9.9.2/24", "dev", GUEST_IFACE])
        .unwrap();
    t.host()
        .ip(&["addr", "add", "10.9.9.1/24", "dev", TAP_NAME])
        .unwrap();
    topology::ping(t.guest(), "10.9.9.1", 3)
        .unwrap_or_else(|e| panic!("guest -> host: {e:#}\n{}", t.relay_summary()));
    topology::ping(t.host(), "10.9.9.2", 2)
        .unwrap_or_else(|e| panic!("host -> guest: {e:#}\n{}", t.relay_summary()));
}

#[test]
fn real_tap_relay_carries_frames() {
    let t = topo(GuestKind::RealTap);
    // The host side really is a tap device (tun driver), not a veth.
    let details = t
        .host()
        .stdout(&["ip", "-d", "link", "show", "dev", TAP_NAME])
        .unwrap();
    assert!(details.contains("tun type tap"), "{details}");
    let details = t
        .guest()
        .stdout(&["ip", "-d", "link", "show", "dev", GUEST_IFACE])
        .unwrap();
    assert!(details.contains("tun type tap"), "{details}");
    assert!(details.contains("mtu 1500"), "{details}");
    ping_across(&t);
    let stats = t.relay_stats().unwrap();
    assert!(
        stats.guest_to_host.load(Ordering::Relaxed) >= 5,
        "{}",
        stats.summary()
    );
    assert!(
        stats.host_to_guest.load(Ordering::Relaxed) >= 5,
        "{}",
        stats.summary()
    );
}

/// `TapRelay::attach` serves a persistent tap somebody else created (as a
/// CNI plugin leaves `tap0` in a pod for QEMU), and leaves it in place.
#[test]
fn relay_attaches_to_an_existing_tap() {
    require_root().unwrap();
    let pod = Netns::new("pod").unwrap();
    let guest = Netns::new("guest").unwrap();
    let missing = TapRelay::attach(&pod.path(), "tap0", &guest, "eth0").unwrap_err();
    assert!(
        format!("{missing:#}").contains("no interface tap0"),
        "{missing:#}"
    );
    pod.ip(&[
        "tuntap", "add", "dev", "tap0", "mode", "tap", "user", "107", "group", "107",
    ])
    .unwrap();
    pod.ip(&["link", "set", "tap0", "up"]).unwrap();
    pod.ip(&["addr", "add", "10.9.8.1/24", "dev", "tap0"])
        .unwrap();
    let relay = TapRelay::attach(&pod.path(), "tap0", &guest, "eth0").unwrap();
    guest.ip(&["link", "set", "eth0", "up"]).unwrap();
    guest
        .ip(&["addr", "add", "10.9.8.2/24", "dev", "eth0"])
        .unwrap();
    topology::ping(&guest, "10.9.8.1", 3)
        .unwrap_or_else(|e| panic!("{e:#}\n{}", relay.stats().summary()));
    drop(relay);
    let details = pod
        .stdout(&["ip", "-d", "link", "show", "dev", "tap0"])
        .unwrap();
    assert!(details.contains("tun type tap"), "{details}");
}

#[test]
fn veth_guest_carries_frames() {
    let t = topo(GuestKind::Veth);
    let details = t
        .host()
        .stdout(&["ip", "-d", "link", "show", "dev", TAP_NAME])
        .unwrap();
    assert!(details.contains("veth"), "{details}");
    assert!(t.relay_stats().is_none());
    ping_across(&t);
}

#[test]
fn host_reaches_world() {
    let t = topo(GuestKind::Veth);
    topology::ping(t.host(), topology::WORLD_ADDR, 2).unwrap();
    topology::ping(t.host(), topology::WORLD_FAR_ADDR, 2).unwrap();
    let routes = t.host().stdout(&["ip", "route"]).unwrap();
    assert!(routes.contains("default via 198.51.100.2"), "{routes}");
}

#[test]
fn taps_vanish_with_the_relay() {
    let t = topo(GuestKind::RealTap);
    let all = names(&t);
    drop(t);
    for name in &all {
        assert!(!ns_exists(name), "namespace {name} still exists");
    }
}

#[test]
fn namespaces_and_processes_are_gone_after_drop() {
    let t = topo(GuestKind::RealTap);
    let all = names(&t);
    for name in &all {
        assert!(ns_exists(name), "namespace {name} missing");
    }
    // A process left running in a namespace is killed by the drop.
    let mut sleeper = Child::spawn(
        {
            let mut c = t.world().cmd("sleep");
            c.arg("300");
            c
        },
        "sleep",
    )
    .unwrap();
    let pid = sleeper.pid();
    assert_eq!(t.world().pids().unwrap(), vec![pid as i32]);
    drop(t);
    for name in &all {
        assert!(!ns_exists(name), "namespace {name} still exists");
    }
    let status = sleeper.wait_exit(Duration::from_secs(5)).unwrap();
    assert!(!status.success(), "sleep should have been killed: {status}");
}

#[test]
fn namespaces_are_gone_after_a_panic() {
    let mut seen = Vec::new();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let t = topo(GuestKind::RealTap);
        seen.extend(names(&t));
        let mut c = t.guest().cmd("sleep");
        c.arg("300");
        let _sleeper = Child::spawn(c, "sleep").unwrap();
        panic!("deliberate panic inside a test body");
    }));
    assert!(result.is_err());
    assert_eq!(seen.len(), 3);
    for name in &seen {
        assert!(!ns_exists(name), "namespace {name} survived the panic");
    }
}

#[test]
fn netns_run_reports_stderr() {
    require_root().unwrap();
    let ns = Netns::new("err").unwrap();
    let err = ns
        .run(&["ip", "link", "show", "dev", "nosuch0"])
        .unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("nosuch0"), "{msg}");
    assert!(msg.contains("does not exist"), "{msg}");
}

#[test]
fn child_guard_captures_stderr_and_stops() {
    require_root().unwrap();
    let ns = Netns::new("child").unwrap();
    let mut cmd = ns.cmd("sh");
    cmd.args(["-c", "echo 'hello ready: now' >&2; trap 'echo bye >&2; exit 0' TERM; while :; do sleep 0.1; done"]);
    let mut child = Child::spawn(cmd, "sh").unwrap();
    child
        .wait_stderr_contains("ready: now", Duration::from_secs(5))
        .unwrap();
    let started = Instant::now();
    let status = child.stop().unwrap();
    assert!(status.success(), "{status}: {}", child.stderr());
    assert!(started.elapsed() < Duration::from_secs(4));
    assert!(child.stderr().contains("bye"));

    // A process exiting early makes wait_stderr_contains fail fast, with
    // the captured stderr in the error.
    let mut cmd = ns.cmd("sh");
    cmd.args(["-c", "echo 'tapgate: error: boom' >&2; exit 1"]);
    let mut child = Child::spawn(cmd, "sh").unwrap();
    let started = Instant::now();
    let err = child
        .wait_stderr_contains("never printed", Duration::from_secs(10))
        .unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(format!("{err:#}").contains("boom"), "{err:#}");
    assert_eq!(
        child.wait_exit(Duration::from_secs(1)).unwrap().code(),
        Some(1)
    );
}

/// Runs busybox udhcpd on the host side of a topology, as a stand-in DHCP
/// server, to check the client helper independently of tapgate.
fn udhcpd(t: &Topology, dir: &ScratchDir, lease: u32) -> Child {
    t.host()
        .ip(&["addr", "add", "10.0.2.2/24", "dev", TAP_NAME])
        .unwrap();
    let conf = dir.join("udhcpd.conf");
    std::fs::write(
        &conf,
        format!(
            "start 10.0.2.15\nend 10.0.2.15\ninterface {TAP_NAME}\nmax_leases 1\n\
             lease_file {}\nmin_lease 1\noption subnet 255.255.255.0\noption router 10.0.2.2\n\
             option dns 10.0.2.3\noption lease {lease}\noption mtu 1500\n",
            dir.join("leases").display()
        ),
    )
    .unwrap();
    let mut cmd = t.host().cmd("busybox");
    cmd.args(["udhcpd", "-f"]).arg(&conf);
    let child = Child::spawn(cmd, "udhcpd").unwrap();
    std::thread::sleep(Duration::from_millis(300));
    child
}

#[test]
fn dhcp_helper_against_udhcpd() {
    let t = topo(GuestKind::RealTap);
    let dir = ScratchDir::new("udhcpd").unwrap();
    let _server = udhcpd(&t, &dir, 3600);
    let client = DhcpClient::new(t.guest(), GUEST_IFACE).unwrap();
    let lease = client
        .run_once()
        .unwrap_or_else(|e| panic!("{e:#}\n{}", t.relay_summary()));
    assert_eq!(lease.ip, "10.0.2.15", "{}", lease.line);
    assert_eq!(lease.mask, "24", "{}", lease.line);
    assert_eq!(lease.router, "10.0.2.2", "{}", lease.line);
    assert_eq!(lease.dns, "10.0.2.3", "{}", lease.line);
    assert_eq!(lease.mtu, "1500", "{}", lease.line);
    let addrs = t
        .guest()
        .stdout(&["ip", "-4", "addr", "show", "dev", GUEST_IFACE])
        .unwrap();
    assert!(addrs.contains("inet 10.0.2.15/24"), "{addrs}");
    let routes = t.guest().stdout(&["ip", "route"]).unwrap();
    assert!(routes.contains("default via 10.0.2.2"), "{routes}");
}

#[test]
fn dhcp_helper_sees_renewals() {
    let t = topo(GuestKind::RealTap);
    let dir = ScratchDir::new("udhcpd").unwrap();
    let _server = udhcpd(&t, &dir, 4);
    let mut client = DhcpClient::new(t.guest(), GUEST_IFACE).unwrap();
    client.start().unwrap();
    let bound = client
        .wait_event("bound", 0, Duration::from_secs(10))
        .unwrap();
    let started = Instant::now();
    let renew = client
        .wait_event("renew", 0, Duration::from_secs(20))
        .unwrap();
    eprintln!("renew {:?} after bound: {}", started.elapsed(), renew.line);
    assert_eq!(renew.ip, bound.ip);
}

#[test]
fn tcx_query_sees_attached_programs() {
    use tapgate_tests::tcx::{self, TcxDirection};
    let t = topo(GuestKind::RealTap);
    let none = tcx::attached_names(t.host(), TAP_NAME, TcxDirection::Ingress).unwrap();
    assert!(none.is_empty(), "{none:?}");
    let dir = tapgate_tests::scratch::ScratchDir::new("pass").unwrap();
    let object = tapgate_tests::fixtures::pass_ebpf_object(dir.path(), "tg_selftest").unwrap();
    let link = tcx::attach_pass_program(
        t.host(),
        TAP_NAME,
        TcxDirection::Ingress,
        &object,
        "tg_selftest",
    )
    .unwrap();
    let names = tcx::attached_names(t.host(), TAP_NAME, TcxDirection::Ingress).unwrap();
    assert_eq!(names, vec!["tg_selftest".to_owned()]);
    let egress = tcx::attached_names(t.host(), TAP_NAME, TcxDirection::Egress).unwrap();
    assert!(egress.is_empty(), "{egress:?}");
    // Another namespace's interface of the same name is unaffected.
    let other = topo(GuestKind::Veth);
    let names = tcx::attached_names(other.host(), TAP_NAME, TcxDirection::Ingress).unwrap();
    assert!(names.is_empty(), "{names:?}");
    // The pass program lets traffic through.
    ping_across(&t);
    drop(link);
    let names = tcx::attached_names(t.host(), TAP_NAME, TcxDirection::Ingress).unwrap();
    assert!(names.is_empty(), "{names:?}");
}
