//! Self-tests of the flow-test scenarios (`tapgate_tests::scenarios`, the
//! servers, clients and probes) through the kernel's own routing and nft
//! masquerade instead of tapgate ([`Topology::new_kernel_router`]).
//!
//! A real NAT passing a scenario shows the scenario is right, so when the
//! same scenario fails in `tests/flows.rs`, the fault is tapgate's. These
//! need no tapgate binary, but need root like every end-to-end test.
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown};
use std::sync::mpsc;
use std::time::Duration;

use tapgate_tests::bulk::{self, Direction};
use tapgate_tests::clients::{self, Shape};
use tapgate_tests::scenarios::{self, THREAD_TIMEOUT, connect, world};
use tapgate_tests::servers::{DnsServer, TcpEchoServer, serve_once};
use tapgate_tests::topology::{HOST_UPLINK_ADDR, TAP_NAME, WORLD_ADDR};
use tapgate_tests::{Topology, nsthread, rawtcp, require_root};

fn kernel() -> Topology {
    require_root().unwrap_or_else(|e| panic!("{e}"));
    Topology::new_kernel_router().unwrap_or_else(|e| panic!("cannot build topology: {e:#}"))
}

fn host_addr() -> Ipv4Addr {
    HOST_UPLINK_ADDR.parse().unwrap()
}

fn ok<T>(r: anyhow::Result<T>) -> T {
    r.unwrap_or_else(|e| panic!("{e:#}"))
}

#[test]
fn kernel_router_is_configured() {
    let topo = kernel();
    let nft = ok(topo.host().stdout(&["nft", "list", "ruleset"]));
    assert!(
        nft.contains("masquerade") && nft.contains("tg_bench"),
        "{nft}"
    );
    let fwd = ok(topo.host().stdout(&["sysctl", "-n", "net.ipv4.ip_forward"]));
    assert_eq!(fwd.trim(), "1");
    ok(tapgate_tests::topology::ping(topo.guest(), WORLD_ADDR, 2));
}

#[test]
fn kernel_http_get() {
    let topo = kernel();
    ok(scenarios::http_get(&topo));
}

#[test]
fn kernel_bulk_both_ways() {
    let topo = kernel();
    for (dir, port) in [
        (Direction::GuestToWorld, 9001),
        (Direction::WorldToGuest, 9002),
    ] {
        let hashes = ok(bulk::transfer(
            &topo,
            dir,
            64 << 20,
            port,
            Duration::from_secs(120),
        ));
        assert!(hashes.equal(), "{dir:?}: {hashes:?}");
    }
}

#[test]
fn kernel_many_connections() {
    let topo = kernel();
    let server = ok(TcpEchoServer::start(topo.world(), world(7000)));
    let mut total = 0;
    for (shape, n) in [(Shape::HoldAll, 1000), (Shape::Burst, 2000)] {
        let report = ok(clients::connect_many(
            topo.guest(),
            server.addr(),
            n,
            shape,
            Duration::from_secs(120),
        ));
        assert!(report.all_completed(), "{shape:?}: {}", report.summary());
        total += n;
    }
    assert_eq!(server.accepted(), total);
    assert!(server.peers().iter().all(|p| p.ip() == host_addr()));
}

#[test]
fn kernel_half_close_both_ways() {
    let topo = kernel();
    ok(scenarios::half_close_guest_first(&topo, 7001));
    ok(scenarios::half_close_server_first(&topo, 7002));
}

#[test]
fn kernel_udp() {
    let topo = kernel();
    let outcome = ok(scenarios::udp_round_trips(&topo, 7007));
    assert_eq!(outcome.world_peers.len(), 1, "{outcome:?}");
    assert_eq!(outcome.world_peers[0].ip(), host_addr());
    ok(scenarios::udp_empty_datagrams(&topo, 7008));
}

#[test]
fn kernel_dns_server_answers() {
    let topo = kernel();
    let dns = ok(DnsServer::start(
        topo.world(),
        world(53),
        Ipv4Addr::new(192, 0, 2, 77),
    ));
    let answer = ok(scenarios::dig(&topo, WORLD_ADDR, "example.test"));
    assert_eq!(answer, "192.0.2.77");
    assert!(dns.queries() >= 1);
    assert!(dns.peers().iter().all(|p| p.ip() == host_addr()));
}

/// The LastAck test's mechanics: after the guest half-closed, the rule
/// drops exactly the guest's final ACK, and the guest still sees the
/// server's FIN.
#[test]
fn kernel_final_ack_drop_rule() {
    let topo = kernel();
    let port = 7004;
    let (eof_tx, eof_rx) = mpsc::channel::<()>();
    let (close_tx, close_rx) = mpsc::channel::<()>();
    let server = ok(serve_once(
        topo.world(),
        world(port),
        THREAD_TIMEOUT,
        move |mut s, _| {
            s.set_read_timeout(Some(scenarios::IO_TIMEOUT))?;
            let mut got = Vec::new();
            s.read_to_end(&mut got)?;
            let _ = eof_tx.send(());
            close_rx.recv_timeout(THREAD_TIMEOUT)?;
            drop(s);
            Ok(got)
        },
    ));
    let guest = ok(nsthread::spawn_in(topo.guest(), "guest", move || {
        let mut s = connect(world(port))?;
        s.write_all(b"bye")?;
        s.shutdown(Shutdown::Write)?;
        let mut rest = Vec::new();
        s.read_to_end(&mut rest)?;
        Ok(rest.len())
    }));
    eof_rx
        .recv_timeout(Duration::from_secs(30))
        .expect("server saw no FIN");
    ok(scenarios::drop_guest_pure_acks(&topo, port));
    close_tx.send(()).unwrap();
    assert_eq!(ok(server.join(THREAD_TIMEOUT)), b"bye");
    assert_eq!(ok(guest.join(THREAD_TIMEOUT)), 0);
    // The server retransmits its FIN while the ACKs are dropped.
    std::thread::sleep(Duration::from_millis(700));
    let dropped = ok(scenarios::nft_counter(topo.guest(), "output"));
    assert!(dropped >= 1, "no ACK dropped");
    let ss = ok(topo.world().stdout(&["ss", "-Htn", "state", "last-ack"]));
    assert!(
        ss.contains(&format!("{WORLD_ADDR}:{port}")),
        "server not in LAST-ACK: {ss:?}"
    );
}

#[test]
fn kernel_unknown_segments_get_rsts() {
    let topo = kernel();
    // The guest's gateway is the host's tap0 here.
    let mac = ok(rawtcp::iface_mac(topo.host(), TAP_NAME));
    // The kernel has no flow for these either; the world's stack answers.
    ok(scenarios::unknown_segments_get_rsts(&topo, mac, false));
}
