//! End-to-end tests of forwarded TCP and UDP flows (IPv4): the guest
//! reaches servers in the world namespace through tapgate, the fast path
//! carries established flows, half-close, LastAck reaping and RSTs follow
//! the design, UDP flows expire, DNS is forwarded, and the host's own
//! addresses are off limits unless allowed.
//!
//! Every test builds its own [`Topology`] and runs the real `tapgate`
//! binary in the host namespace with a private control socket (the
//! harness's `--control-socket`); servers run in the world namespace
//! (busybox httpd, socat, or Rust threads from `tapgate_tests::servers`),
//! guest-side socket work runs on threads inside the guest namespace
//! (`tapgate_tests::nsthread`). The traffic patterns come from
//! `tapgate_tests::scenarios`, which `tests/scenarios.rs` also runs through
//! the kernel's own NAT to prove them right. Every wait is bounded. They
//! need root; run them with `cargo xtask test`.
//!
//! tapgate flags these tests rely on: `--control-socket`,
//! `--last-ack-timeout SECS`, `--udp-timeout SECS`, `--dns-upstream IP`,
//! `--allow-host`.
#![allow(clippy::unwrap_used)]

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::bail;
use serde_json::Value;
use tapgate_tests::GuestKind;
use tapgate_tests::bulk::{self, Direction, Hashes};
use tapgate_tests::clients::{self, Shape};
use tapgate_tests::control::{self, field, flow_matches};
use tapgate_tests::nsthread::{self};
use tapgate_tests::rawtcp;
use tapgate_tests::running::Running;
use tapgate_tests::scenarios::{self, THREAD_TIMEOUT, connect, udp_echo, udp_socket, world};
use tapgate_tests::servers::{DnsServer, HttpServer, TcpEchoServer, UdpEchoServer, serve_once};
use tapgate_tests::topology::{
    DEFAULT_DNS, DEFAULT_GATEWAY_MAC, DEFAULT_GUEST_ADDR, HOST_UPLINK_ADDR, WORLD_ADDR,
};

/// Bound on a 1 GiB transfer (both ends, hashing included).
const BULK_TIMEOUT: Duration = Duration::from_secs(240);
/// How long a flow may take to show up in `tapgate flows`.
const FLOW_VISIBLE: Duration = Duration::from_secs(5);
/// `--last-ack-timeout` used by the LastAck test.
const LAST_ACK_TIMEOUT_SECS: u64 = 3;
/// Time after the LastAck timeout within which the flow must be gone
/// (scan granularity).
const REAP_SLACK: Duration = Duration::from_secs(3);
/// `--udp-timeout` used by the UDP expiry test.
const UDP_TIMEOUT_SECS: u64 = 2;
/// Idle time after which the UDP flow must be gone: the documented bound
/// (`userspace/src/flow/mod.rs`: between 1× and 1.25× the timeout, plus
/// the one-second tick) and half a second for the test's own polling.
const UDP_EXPIRY_BOUND: Duration = Duration::from_millis(UDP_TIMEOUT_SECS * 1250 + 1500);
/// Idle time before which the UDP flow must still be listed (well inside
/// the 1× lower bound; the test measures from the guest's receive, just
/// after the flow's last packet).
const UDP_STILL_LISTED: Duration = Duration::from_millis(UDP_TIMEOUT_SECS * 750);

fn host_addr() -> Ipv4Addr {
    HOST_UPLINK_ADDR.parse().unwrap()
}

/// A state name compared loosely (`FinWait`, `fin_wait`, `FIN-WAIT`).
fn norm(state: &str) -> String {
    state
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .collect::<String>()
        .to_ascii_lowercase()
}

// ---------------------------------------------------------------------------
// HTTP, bulk transfers, many connections
// ---------------------------------------------------------------------------

#[test]
fn tcp_http_get_real_tap() {
    let run = Running::with_lease(GuestKind::RealTap, &[]);
    run.ok(scenarios::http_get(&run.topo));
}

#[test]
fn tcp_http_get_veth() {
    let run = Running::with_lease(GuestKind::Veth, &[]);
    run.ok(scenarios::http_get(&run.topo));
}

/// A bulk transfer of `bytes` in direction `dir` (port `port`).
fn bulk(run: &Running, dir: Direction, bytes: u64, port: u16) -> Hashes {
    let hashes = run.ok(bulk::transfer(&run.topo, dir, bytes, port, BULK_TIMEOUT));
    run.check(hashes.equal(), format!("{dir:?}: {hashes:?}"));
    hashes
}

#[test]
fn tcp_bulk_1gib_guest_to_world() {
    let run = Running::with_lease(GuestKind::Veth, &[]);
    bulk(&run, Direction::GuestToWorld, 1 << 30, 9000);
}

#[test]
fn tcp_bulk_1gib_world_to_guest() {
    let run = Running::with_lease(GuestKind::Veth, &[]);
    bulk(&run, Direction::WorldToGuest, 1 << 30, 9000);
}

#[test]
fn tcp_bulk_transfer_mostly_on_fast_path() {
    let run = Running::with_lease(GuestKind::Veth, &[]);
    let before = run.ok(control::stats(&run.topo));
    let (f0, s0) = run.ok(control::fast_slow(&before));
    bulk(&run, Direction::GuestToWorld, 256 << 20, 9001);
    bulk(&run, Direction::WorldToGuest, 256 << 20, 9002);
    let after = run.ok(control::stats(&run.topo));
    let (f1, s1) = run.ok(control::fast_slow(&after));
    let (fast, slow) = (f1.saturating_sub(f0), s1.saturating_sub(s0));
    let total = fast + slow;
    run.check(
        total >= 1000,
        format!("only {total} packets counted for 512 MiB: {before} -> {after}"),
    );
    let share = fast as f64 / total as f64;
    run.check(
        share >= 0.99,
        format!(
            "fast path handled {:.2}% ({fast} of {total}) packets, want >= 99%: {before} -> {after}",
            share * 100.0
        ),
    );
}

#[test]
fn tcp_gso_super_packets_on_the_fast_path() {
    // A veth guest sends TSO super-packets (up to 64 KiB) unless told not
    // to; the fast path must rewrite and forward them whole (checksums of
    // CHECKSUM_PARTIAL skbs, MTU checked per segment), never punt them.
    let run = Running::with_lease(GuestKind::Veth, &[]);
    let features = run.ok(run.topo.guest().stdout(&["ethtool", "-k", "eth0"]));
    run.check(
        features.contains("tcp-segmentation-offload: on"),
        format!("the guest's veth does not do TSO:\n{features}"),
    );
    let before = run.ok(control::stats(&run.topo));
    let (f0, _) = run.ok(control::fast_slow(&before));
    let b0 = before["fastpath_bytes"].as_u64().unwrap_or(0);
    bulk(&run, Direction::GuestToWorld, 128 << 20, 9003);
    let after = run.ok(control::stats(&run.topo));
    let (f1, _) = run.ok(control::fast_slow(&after));
    let b1 = after["fastpath_bytes"].as_u64().unwrap_or(0);
    let (packets, bytes) = (f1.saturating_sub(f0), b1.saturating_sub(b0));
    run.check(
        packets > 0 && bytes / packets > 1514,
        format!(
            "{bytes} bytes in {packets} fast-path packets: no super-packets forwarded \
             ({before} -> {after})"
        ),
    );
    let exceptions = after["punts"]["exception"].as_u64().unwrap_or(0);
    run.check(
        exceptions == 0,
        format!("{exceptions} packets punted as exceptions"),
    );
}

#[test]
fn tcp_rst_for_unknown_segment_from_the_world() {
    // A non-SYN segment from the world to a NAT port that matches no flow
    // (here: the right port, the wrong remote port) gets an RST from the
    // host — the port is held by tapgate's bound socket, which neither
    // listens nor is connected — and the real flow is not disturbed.
    let run = Running::with_lease(GuestKind::RealTap, &[]);
    let _server = run.ok(TcpEchoServer::start(run.topo.world(), world(7011)));
    let (port_tx, port_rx) = mpsc::channel();
    let (release_tx, release_rx) = mpsc::channel::<()>();
    let guest = run.ok(nsthread::spawn_in(run.topo.guest(), "guest", move || {
        let mut s = connect(world(7011))?;
        s.write_all(b"hi")?;
        let mut buf = [0u8; 2];
        s.read_exact(&mut buf)?;
        let _ = port_tx.send(s.local_addr()?.port());
        let _ = release_rx.recv_timeout(THREAD_TIMEOUT);
        // Still usable after the stray segment.
        s.write_all(b"ok")?;
        s.read_exact(&mut buf)?;
        if &buf != b"ok" {
            bail!("echo after the stray segment: {buf:?}");
        }
        Ok(())
    }));
    let (port, guest) = run.recv(&port_rx, guest, "the guest did not connect");
    let guest_addr = format!("{DEFAULT_GUEST_ADDR}:{port}");
    let flow = run.ok(control::wait_flow(&run.topo, FLOW_VISIBLE, |f| {
        flow_matches(f, "tcp", &guest_addr, &world(7011).to_string())
    }));
    let nat: std::net::SocketAddrV4 = field(&flow, "nat")
        .parse()
        .unwrap_or_else(|_| run.fail(format!("nat is not ip:port: {flow}")));
    let probe = rawtcp::Probe {
        src_mac: run.ok(rawtcp::iface_mac(run.topo.world(), "wan0")),
        dst_mac: run.ok(rawtcp::iface_mac(run.topo.host(), "uplink0")),
        src: std::net::SocketAddrV4::new(WORLD_ADDR.parse().unwrap(), 7012),
        dst: nat,
        seq: 1000,
        ack: 2000,
        flags: rawtcp::Flags {
            ack: true,
            ..rawtcp::Flags::default()
        },
        payload: b"stray".to_vec(),
    };
    let seen = run.ok(rawtcp::exchange(
        run.topo.world(),
        "wan0",
        &probe,
        Duration::from_secs(2),
    ));
    run.check(
        seen.iter()
            .any(|s| s.flags.rst && s.src == nat && s.seq == 2000),
        format!("no RST (seq = the probe's ACK) from {nat}: {seen:?}"),
    );
    let _ = release_tx.send(());
    run.ok(guest.join(THREAD_TIMEOUT));
}

fn many(shape: Shape, n: usize) {
    let run = Running::with_lease(GuestKind::RealTap, &[]);
    let server = run.ok(TcpEchoServer::start(run.topo.world(), world(7000)));
    let report = run.ok(clients::connect_many(
        run.topo.guest(),
        server.addr(),
        n,
        shape,
        Duration::from_secs(120),
    ));
    run.check(
        report.all_completed(),
        format!("{shape:?}: {}", report.summary()),
    );
    let peers = server.peers();
    run.check(
        server.accepted() == n && peers.len() == n,
        format!(
            "server accepted {} connections from {} distinct peers, want {n}",
            server.accepted(),
            peers.len()
        ),
    );
    run.check(
        peers.iter().all(|p| p.ip() == host_addr()),
        format!("connections not from the host's address: {peers:?}"),
    );
}

#[test]
fn tcp_1000_concurrent_connections() {
    many(Shape::HoldAll, 1000);
}

#[test]
fn tcp_burst_of_2000_new_connections() {
    many(Shape::Burst, 2000);
}

// ---------------------------------------------------------------------------
// Half-close, flow listing, LastAck
// ---------------------------------------------------------------------------

#[test]
fn tcp_half_close_guest_first() {
    let run = Running::with_lease(GuestKind::RealTap, &[]);
    run.ok(scenarios::half_close_guest_first(&run.topo, 7001));
    closed_in_the_kernel(&run, 7001);
}

#[test]
fn tcp_half_close_server_first() {
    let run = Running::with_lease(GuestKind::RealTap, &[]);
    run.ok(scenarios::half_close_server_first(&run.topo, 7002));
    closed_in_the_kernel(&run, 7002);
}

/// After a clean close of the only connection to `port`: the flow is reaped
/// on the final ACK (seconds, not the 60 s LastAck timeout), both FINs
/// were forwarded by the fast path (the slow path sent only the handshake
/// to the world), and the close counted as clean.
fn closed_in_the_kernel(run: &Running, port: u16) {
    let remote = world(port).to_string();
    run.ok(control::wait_flow_gone(
        &run.topo,
        Duration::from_secs(3),
        |f| field(f, "remote") == remote,
    ));
    let st = run.ok(control::stats(&run.topo));
    let n = |v: &Value| v.as_u64().unwrap_or(u64::MAX);
    run.check(
        n(&st["flows"]["tcp_closed_cleanly"]) == 1 && n(&st["flows"]["last_ack_timeouts"]) == 0,
        format!("not closed cleanly on the final ACK: {st}"),
    );
    run.check(
        n(&st["punts"]["event_fin"]) >= 2,
        format!("the kernel reported fewer than two FINs: {st}"),
    );
    // The SYN (and at most the guest's ACK racing the SYN-ACK's state
    // update): no data, no FIN went through user space.
    run.check(
        n(&st["flows"]["slow_to_world"]) <= 2 && n(&st["flows"]["slow_to_guest"]) <= 2,
        format!("the slow path carried more than the handshake: {st}"),
    );
}

#[test]
fn tcp_flows_lists_open_connection() {
    let run = Running::with_lease(GuestKind::RealTap, &[]);
    let server = run.ok(TcpEchoServer::start(run.topo.world(), world(7003)));
    let (port_tx, port_rx) = mpsc::channel();
    let (release_tx, release_rx) = mpsc::channel::<()>();
    let guest = run.ok(nsthread::spawn_in(run.topo.guest(), "guest", move || {
        let mut s = connect(world(7003))?;
        s.write_all(b"hi")?;
        let mut buf = [0u8; 2];
        s.read_exact(&mut buf)?;
        let _ = port_tx.send(s.local_addr()?.port());
        // Hold the connection open until the test has looked.
        let _ = release_rx.recv_timeout(THREAD_TIMEOUT);
        Ok(())
    }));
    let (port, guest) = run.recv(&port_rx, guest, "the guest did not connect");
    let guest_addr = format!("{DEFAULT_GUEST_ADDR}:{port}");
    let remote = world(7003).to_string();
    let flow = run.ok(control::wait_flow(&run.topo, FLOW_VISIBLE, |f| {
        flow_matches(f, "tcp", &guest_addr, &remote)
    }));
    run.check(
        norm(field(&flow, "state")) == "established",
        format!("state of an open connection: {flow}"),
    );
    let nat: SocketAddr = field(&flow, "nat")
        .parse()
        .unwrap_or_else(|_| run.fail(format!("nat is not ip:port: {flow}")));
    run.check(
        nat.ip() == host_addr(),
        format!("NAT address is not the host's uplink address: {flow}"),
    );
    run.check(
        server.peers().contains(&nat),
        format!("the server saw {:?}, tapgate says {nat}", server.peers()),
    );
    run.check(
        flow.get("fastpath_packets").is_some_and(Value::is_u64),
        format!("no fastpath_packets count: {flow}"),
    );
    let text = run.ok(control::query(&run.topo, &["flows"]));
    run.check(
        text.lines().any(|l| {
            l.contains(&guest_addr) && l.contains(&remote) && l.contains(&nat.to_string())
        }),
        format!("`tapgate flows` does not show the connection:\n{text}"),
    );
    let _ = release_tx.send(());
    run.ok(guest.join(THREAD_TIMEOUT));
}

#[test]
fn tcp_last_ack_reaped_after_timeout() {
    let timeout = LAST_ACK_TIMEOUT_SECS.to_string();
    let run = Running::with_lease(GuestKind::RealTap, &["--last-ack-timeout", &timeout]);
    let port = 7004;
    let (eof_tx, eof_rx) = mpsc::channel::<()>();
    let (close_tx, close_rx) = mpsc::channel::<()>();
    let server = run.ok(serve_once(
        run.topo.world(),
        world(port),
        THREAD_TIMEOUT,
        move |mut s, _| {
            s.set_read_timeout(Some(scenarios::IO_TIMEOUT))?;
            let mut got = Vec::new();
            s.read_to_end(&mut got)?;
            let _ = eof_tx.send(());
            // Close (send our FIN) only once the test has armed the drop.
            if close_rx.recv_timeout(THREAD_TIMEOUT).is_err() {
                bail!("never told to close");
            }
            drop(s);
            Ok(())
        },
    ));
    let (port_tx, port_rx) = mpsc::channel();
    let guest = run.ok(nsthread::spawn_in(run.topo.guest(), "guest", move || {
        let mut s = connect(world(port))?;
        let _ = port_tx.send(s.local_addr()?.port());
        s.write_all(b"bye")?;
        s.shutdown(Shutdown::Write)?;
        // Returns at the server's FIN.
        let mut rest = Vec::new();
        s.read_to_end(&mut rest)?;
        Ok(())
    }));
    let (guest_port, guest) = run.recv(&port_rx, guest, "the guest did not connect");
    let ((), server) = run.recv(&eof_rx, server, "the server never saw the guest's FIN");
    let guest_addr = format!("{DEFAULT_GUEST_ADDR}:{guest_port}");
    let remote = world(port).to_string();
    let this_flow = |f: &Value| flow_matches(f, "tcp", &guest_addr, &remote);
    run.ok(control::wait_flow(&run.topo, FLOW_VISIBLE, |f| {
        this_flow(f) && norm(field(f, "state")) == "finwait"
    }));
    // From now on the guest's only pure ACK is the final one (it has shut
    // down its sending side; the server sends nothing but its FIN).
    run.ok(scenarios::drop_guest_pure_acks(&run.topo, port));
    let _ = close_tx.send(());
    let closed = Instant::now();
    run.ok(server.join(THREAD_TIMEOUT));
    let flow = run.ok(control::wait_flow(&run.topo, FLOW_VISIBLE, |f| {
        this_flow(f) && norm(field(f, "state")) == "lastack"
    }));
    // Still there a second before the timeout: never reaped early.
    let early = Duration::from_secs(LAST_ACK_TIMEOUT_SECS - 1);
    std::thread::sleep(early.saturating_sub(closed.elapsed()));
    let listed = run.ok(control::flows(&run.topo));
    run.check(
        listed.iter().any(this_flow),
        format!("LastAck flow reaped before {early:?}: was {flow}"),
    );
    let bound = Duration::from_secs(LAST_ACK_TIMEOUT_SECS) + REAP_SLACK;
    run.ok(control::wait_flow_gone(
        &run.topo,
        bound.saturating_sub(closed.elapsed()),
        this_flow,
    ));
    let dropped = run.ok(scenarios::nft_counter(run.topo.guest(), "output"));
    run.check(
        dropped > 0,
        "the guest's final ACK was never dropped: the test proved nothing",
    );
    run.ok(guest.join(THREAD_TIMEOUT));
}

// ---------------------------------------------------------------------------
// RSTs
// ---------------------------------------------------------------------------

#[test]
fn tcp_rst_for_stale_flow_after_restart() {
    let mut run = Running::with_lease(GuestKind::RealTap, &[]);
    let _server = run.ok(TcpEchoServer::start(run.topo.world(), world(7005)));
    let (ready_tx, ready_rx) = mpsc::channel::<()>();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let guest = run.ok(nsthread::spawn_in(run.topo.guest(), "guest", move || {
        let mut s = connect(world(7005))?;
        s.write_all(b"one")?;
        let mut buf = [0u8; 3];
        s.read_exact(&mut buf)?;
        let _ = ready_tx.send(());
        if go_rx.recv_timeout(THREAD_TIMEOUT).is_err() {
            bail!("never told to go on");
        }
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        // The write may succeed locally; the RST shows on the next read.
        let write = s.write_all(b"two");
        let mut buf = [0u8; 16];
        match (write, s.read(&mut buf)) {
            (Err(e), _) | (_, Err(e)) if e.kind() == ErrorKind::ConnectionReset => Ok(()),
            (_, Ok(n)) => bail!("no RST: read returned {n} bytes after the restart"),
            (_, Err(e)) => bail!("no RST: read failed with {e} ({:?})", e.kind()),
        }
    }));
    let ((), guest) = run.recv(&ready_rx, guest, "the connection never worked");
    let stopped = run.tapgate.stop();
    let status = run.ok(stopped);
    run.check(status.success(), format!("tapgate exited with {status}"));
    run.tapgate = run
        .topo
        .start_tapgate(&[])
        .unwrap_or_else(|e| run.fail(format!("restarting tapgate: {e:#}")));
    let _ = go_tx.send(());
    run.ok(guest.join(THREAD_TIMEOUT));
}

#[test]
fn tcp_rst_for_unknown_non_syn_segment() {
    let run = Running::with_lease(GuestKind::RealTap, &[]);
    // The answers must come from tapgate: the world sees none of it.
    run.ok(scenarios::nft_rule(
        run.topo.world(),
        "input",
        "tcp dport 80 counter",
    ));
    let gateway_mac = run.ok(rawtcp::parse_mac(DEFAULT_GATEWAY_MAC));
    run.ok(scenarios::unknown_segments_get_rsts(
        &run.topo,
        gateway_mac,
        true,
    ));
    let leaked = run.ok(scenarios::nft_counter(run.topo.world(), "input"));
    run.check(
        leaked == 0,
        format!("{leaked} segments of no flow reached the world"),
    );
}

// ---------------------------------------------------------------------------
// UDP and DNS
// ---------------------------------------------------------------------------

#[test]
fn udp_request_response_both_ways() {
    let run = Running::with_lease(GuestKind::RealTap, &[]);
    let outcome = run.ok(scenarios::udp_round_trips(&run.topo, 7007));
    // 5 datagrams out, 10 back: only the first went through user space.
    let st = run.ok(control::stats(&run.topo));
    let n = |v: &Value| v.as_u64().unwrap_or(0);
    run.check(
        n(&st["flows"]["slow_to_world"]) == 1 && n(&st["fastpath_packets"]) >= 14,
        format!("UDP after the first datagram should run in the kernel: {st}"),
    );
    let guest_addr = format!("{DEFAULT_GUEST_ADDR}:{}", outcome.guest.port());
    let flow = run.ok(control::wait_flow(&run.topo, FLOW_VISIBLE, |f| {
        flow_matches(f, "udp", &guest_addr, &world(7007).to_string())
    }));
    let peers = &outcome.world_peers;
    run.check(
        peers.len() == 1 && peers[0].ip() == host_addr(),
        format!("datagrams should come from one NAT address of the host: {peers:?}"),
    );
    run.check(
        peers[0].to_string() == field(&flow, "nat"),
        format!("server saw {peers:?}, tapgate says {flow}"),
    );
}

#[test]
fn udp_empty_datagrams() {
    let run = Running::with_lease(GuestKind::RealTap, &[]);
    run.ok(scenarios::udp_empty_datagrams(&run.topo, 7008));
}

#[test]
fn udp_flow_expires_when_idle() {
    let timeout = UDP_TIMEOUT_SECS.to_string();
    let run = Running::with_lease(GuestKind::RealTap, &["--udp-timeout", &timeout]);
    let _server = run.ok(UdpEchoServer::start(run.topo.world(), world(7009)));
    let (local, last) = run.ok(nsthread::run_in(
        run.topo.guest(),
        "guest",
        THREAD_TIMEOUT,
        || {
            let s = udp_socket(world(7009))?;
            udp_echo(&s, b"ping")?;
            Ok((s.local_addr()?, Instant::now()))
        },
    ));
    let guest_addr = format!("{DEFAULT_GUEST_ADDR}:{}", local.port());
    let remote = world(7009).to_string();
    let this_flow = |f: &Value| flow_matches(f, "udp", &guest_addr, &remote);
    run.ok(control::wait_flow(&run.topo, FLOW_VISIBLE, this_flow));
    // Idle for most of the timeout: still there.
    std::thread::sleep(UDP_STILL_LISTED.saturating_sub(last.elapsed()));
    let listed = run.ok(control::flows(&run.topo));
    run.check(
        listed.iter().any(this_flow),
        format!(
            "UDP flow gone after {:?} idle (timeout {UDP_TIMEOUT_SECS} s)",
            last.elapsed()
        ),
    );
    let gone = control::wait_flow_gone(
        &run.topo,
        UDP_EXPIRY_BOUND.saturating_sub(last.elapsed()),
        this_flow,
    );
    if let Err(e) = gone {
        run.fail(format!(
            "UDP flow not expired {UDP_EXPIRY_BOUND:?} after its last datagram: {e:#}"
        ));
    }
}

#[test]
fn dns_lookup_through_forwarder() {
    let run = Running::start(GuestKind::RealTap, &["--dns-upstream", WORLD_ADDR]);
    let dns = run.ok(DnsServer::start(
        run.topo.world(),
        world(53),
        Ipv4Addr::new(192, 0, 2, 77),
    ));
    let lease = run.dhcp();
    run.check(
        lease.ip == DEFAULT_GUEST_ADDR,
        format!("unexpected lease: {}", lease.line),
    );
    let answer = run.ok(scenarios::dig(&run.topo, DEFAULT_DNS, "example.test"));
    run.check(
        answer == "192.0.2.77",
        format!(
            "dig @{DEFAULT_DNS} example.test: {answer:?} (upstream saw {} queries)",
            dns.queries()
        ),
    );
    let peers = dns.peers();
    run.check(
        dns.queries() >= 1 && peers.iter().all(|p| p.ip() == host_addr()),
        format!("upstream queries should come from the host: {peers:?}"),
    );
}

// ---------------------------------------------------------------------------
// The host's own addresses
// ---------------------------------------------------------------------------

/// Fetches `http://198.51.100.1:8080/secret` (served in the host
/// namespace) from the guest; returns curl's exit code, stdout and how long
/// it took.
fn curl_host(run: &Running) -> (Option<i32>, Vec<u8>, Duration) {
    let addr = SocketAddr::from((host_addr(), 8080));
    let http = run.ok(HttpServer::start(
        run.topo.host(),
        addr,
        &[("secret", b"host-only\n")],
    ));
    let url = http.url("secret");
    let started = Instant::now();
    let out = run.ok(run.topo.guest().output_timeout(
        &["curl", "-sS", "--max-time", "8", &url],
        Duration::from_secs(20),
    ));
    (out.status.code(), out.stdout, started.elapsed())
}

#[test]
fn host_unreachable_by_default() {
    let run = Running::with_lease(GuestKind::RealTap, &[]);
    let (code, body, took) = curl_host(&run);
    run.check(
        !body.windows(9).any(|w| w == b"host-only"),
        "the guest read a page served by the host",
    );
    // 7: connection refused (RST or ICMP), 56: reset after connecting.
    run.check(
        matches!(code, Some(7 | 56)) && took < Duration::from_secs(4),
        format!("want a quick refusal, got curl exit {code:?} after {took:?}"),
    );
}

#[test]
fn host_reachable_with_allow_host() {
    let run = Running::with_lease(GuestKind::RealTap, &["--allow-host"]);
    let (fast_before, _) = run.ok(control::fast_slow(&run.ok(control::stats(&run.topo))));
    let (code, body, took) = curl_host(&run);
    run.check(
        code == Some(0) && body == b"host-only\n",
        format!(
            "curl exit {code:?} after {took:?}, body {:?}",
            String::from_utf8_lossy(&body)
        ),
    );
    // After the handshake the exchange runs in the kernel: into the host
    // through loopback, back through the uplink's egress program.
    let (fast_after, _) = run.ok(control::fast_slow(&run.ok(control::stats(&run.topo))));
    run.check(
        fast_after >= fast_before + 4,
        format!("only {} packets on the fast path", fast_after - fast_before),
    );
}
