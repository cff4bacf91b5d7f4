//! Self-tests of the ICMP and fragment scenarios (`tapgate_tests::icmp`)
//! through the kernel's own routing and nft masquerade instead of tapgate
//! ([`Topology::new_kernel_router`]).
//!
//! # Theory of operation
//!
//! A Linux router with conntrack NATs echo flows by ICMP id, translates the
//! world's ICMP errors back to the guest, sends fragmentation needed, time
//! exceeded and unreachables itself, and reassembles and refragments
//! datagrams. Every scenario passing here shows the scenario is right, so
//! when the same scenario fails in `tests/icmp.rs` the fault is tapgate's.
//! Where tapgate's behaviour is a policy, the twin is configured to match:
//! the host's address is rejected with "administratively prohibited" by an
//! nft rule ([`icmp::kernel_deny_host`]). The malformed-ICMP scenarios
//! cannot count drops here; they prove the crafted packets harm no flow and
//! that the well-formed twin of the world-side error does reach the guest.
//! These need no tapgate binary, but need root like every end-to-end test.
#![allow(clippy::unwrap_used)]

use tapgate_tests::icmp::{self, SMALL_UPLINK_MTU};
use tapgate_tests::scenarios::{self, world};
use tapgate_tests::servers::UdpEchoServer;
use tapgate_tests::topology::WORLD_ADDR;
use tapgate_tests::{Topology, require_root};

fn kernel() -> Topology {
    require_root().unwrap_or_else(|e| panic!("{e}"));
    Topology::new_kernel_router().unwrap_or_else(|e| panic!("cannot build topology: {e:#}"))
}

fn ok<T>(r: anyhow::Result<T>) -> T {
    r.unwrap_or_else(|e| panic!("{e:#}"))
}

#[test]
fn kernel_ping_world_and_gateway() {
    let topo = kernel();
    let sent = ok(icmp::ping_world(&topo));
    assert_eq!(sent, 16);
    ok(icmp::ping_gateway(&topo));
}

#[test]
fn kernel_udp_refused_by_world() {
    let topo = kernel();
    ok(icmp::udp_refused_by_world(&topo, 7101));
}

/// The nc probe tells an open port from a refusing one (so its exit status
/// means what `icmp::nc_udp_probe` says).
#[test]
fn kernel_nc_probe_reports_an_open_port() {
    let topo = kernel();
    let _echo = ok(UdpEchoServer::start(topo.world(), world(7102)));
    assert!(!ok(icmp::nc_udp_probe(&topo, WORLD_ADDR, 7102)));
    assert!(ok(icmp::nc_udp_probe(&topo, WORLD_ADDR, 7103)));
}

#[test]
fn kernel_pmtud_upload() {
    let topo = kernel();
    ok(icmp::set_uplink_mtu(&topo, SMALL_UPLINK_MTU));
    ok(icmp::pmtud_upload(&topo, 9101, icmp::UPLOAD_100MIB));
}

/// With the router's frag-needed errors dropped, the upload through the
/// small uplink stalls (so the scenario fails when no one sends them).
#[test]
fn kernel_pmtud_upload_stalls_without_frag_needed() {
    let topo = kernel();
    ok(icmp::set_uplink_mtu(&topo, SMALL_UPLINK_MTU));
    ok(scenarios::nft_rule(
        topo.host(),
        "output",
        "icmp type destination-unreachable icmp code frag-needed counter drop",
    ));
    let err = icmp::pmtud_upload(&topo, 9103, 8).unwrap_err();
    assert!(format!("{err:#}").contains("stalled"), "{err:#}");
    assert!(ok(scenarios::nft_counter(topo.host(), "output")) >= 1);
}

/// Without the small uplink the route learns no MTU (so the scenario's
/// check can fail).
#[test]
fn kernel_no_pmtu_without_small_uplink() {
    let topo = kernel();
    ok(icmp::upload(&topo, 9102, 4));
    let route = ok(icmp::guest_route_to_world(&topo));
    assert!(!route.contains(" mtu "), "{route}");
}

#[test]
fn kernel_traceroute() {
    let topo = kernel();
    ok(icmp::traceroute_through_gateway(&topo));
}

#[test]
fn kernel_unreachable_destinations() {
    let topo = kernel();
    ok(icmp::add_unreachable_routes(&topo));
    ok(icmp::unreachable_destinations(&topo));
}

#[test]
fn kernel_host_admin_prohibited() {
    let topo = kernel();
    ok(icmp::kernel_deny_host(&topo));
    ok(icmp::host_admin_prohibited(&topo, 7104));
}

#[test]
fn kernel_gateway_port_unreachable() {
    let topo = kernel();
    ok(icmp::gateway_port_unreachable(&topo, 7105));
}

#[test]
fn kernel_fragmented_udp_echo() {
    let topo = kernel();
    ok(icmp::fragmented_udp_echo(&topo, 7106));
}

#[test]
fn kernel_malformed_icmp() {
    let topo = kernel();
    let mut seen = Vec::new();
    ok(icmp::malformed_icmp_from_guest(&topo, 7107, |what| {
        seen.push(what.to_owned());
        Ok(())
    }));
    let nat = ok(icmp::malformed_icmp_from_world(&topo, 7108, |what| {
        seen.push(what.to_owned());
        Ok(())
    }));
    assert_eq!(seen.len(), 9, "{seen:?}");
    assert_eq!(nat.ip().to_string(), "198.51.100.1");
}

/// With every ICMP error the host sends or forwards dropped, the error
/// scenarios fail (so they cannot pass without the errors).
#[test]
fn kernel_error_scenarios_fail_without_icmp_errors() {
    let topo = kernel();
    ok(icmp::add_unreachable_routes(&topo));
    for hook in ["output", "forward"] {
        ok(scenarios::nft_rule(
            topo.host(),
            hook,
            "icmp type { destination-unreachable, time-exceeded } counter drop",
        ));
    }
    // Each fails at its first check that needs an error.
    let results = [
        (
            icmp::udp_refused_by_world(&topo, 7109),
            "want ECONNREFUSED, got no error",
        ),
        (
            icmp::gateway_port_unreachable(&topo, 7110),
            "want ECONNREFUSED, got no error",
        ),
        (
            icmp::traceroute_through_gateway(&topo),
            "hop 1 should be 10.0.2.2",
        ),
        (icmp::unreachable_destinations(&topo), "want exit 7"),
    ];
    for (result, want) in results {
        let err = format!("{:#}", result.unwrap_err());
        assert!(err.contains(want), "want {want:?} in: {err}");
    }
    assert!(ok(scenarios::nft_counter(topo.host(), "output")) >= 1);
    assert!(ok(scenarios::nft_counter(topo.host(), "forward")) >= 1);
}

#[test]
fn traceroute_parser() {
    let text = "traceroute to 203.0.113.10 (203.0.113.10), 4 hops max, 60 byte packets\n \
                1  10.0.2.2  0.513 ms * 0.472 ms\n 2  203.0.113.10  0.459 ms  0.017 ms  0.012 ms\n";
    let hops = icmp::parse_traceroute(text);
    assert_eq!(hops.len(), 2);
    assert_eq!(
        (hops[0].n, hops[0].addrs.clone()),
        (1, vec!["10.0.2.2".into()])
    );
    assert_eq!(hops[1].addrs, ["203.0.113.10"]);
}

#[test]
fn checksum_of_a_known_header() {
    // RFC 1071-style example: an IPv4 header whose checksum is 0xb861.
    let h = [
        0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8, 0x00,
        0x01, 0xc0, 0xa8, 0x00, 0xc7,
    ];
    assert_eq!(icmp::checksum(&h), 0xb861);
}
