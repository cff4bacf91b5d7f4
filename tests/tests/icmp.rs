//! End-to-end tests of ICMP and IPv4 fragments through tapgate (issue 5):
//! echo flows NATed by ICMP id on the fast path, the world's ICMP errors
//! translated back to the guest, the errors the gateway synthesizes
//! (fragmentation needed, time exceeded, host/net unreachable,
//! administratively prohibited, port unreachable), fragmented datagrams in
//! both directions, malformed ICMP dropped and counted, and the `icmp` /
//! `fragments` counters of `tapgate stats --json`.
//!
//! # Theory of operation
//!
//! Every test builds its own [`Topology`], starts the real `tapgate` in the
//! host namespace ([`Running`]) and runs one scenario of
//! `tapgate_tests::icmp` — the same code `tests/icmp_scenarios.rs` runs
//! through the kernel's own router and NAT, which proves it right — then
//! checks tapgate's counters (`tapgate_tests::control`), polling them with
//! a bound where a counter may lag the packet. Errors tapgate synthesizes
//! are expected from the gateway address `10.0.2.2`, as a router's are.
//! The guest link is the real tap (the configuration tapgate is built
//! for) except where a veth is enough. They need root; run them with
//! `cargo xtask test`.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use serde_json::Value;
use tapgate_tests::control::{self, field};
use tapgate_tests::icmp::{self, SMALL_UPLINK_MTU};
use tapgate_tests::running::Running;
use tapgate_tests::topology::DEFAULT_GUEST_ADDR;
use tapgate_tests::{GuestKind, Topology, require_root};

/// How long a counter may lag the packet that moves it.
const COUNTER_LAG: Duration = Duration::from_secs(3);

/// Builds a topology of `kind`, runs `prepare` on it, then starts tapgate
/// and takes a DHCP lease (which must be the default address).
fn start_after(kind: GuestKind, prepare: impl FnOnce(&Topology) -> anyhow::Result<()>) -> Running {
    require_root().unwrap_or_else(|e| panic!("{e}"));
    let topo = Topology::new(kind).unwrap_or_else(|e| panic!("cannot build topology: {e:#}"));
    prepare(&topo).unwrap_or_else(|e| panic!("cannot prepare the topology: {e:#}"));
    let tapgate = topo
        .start_tapgate(&[])
        .unwrap_or_else(|e| panic!("cannot start tapgate: {e:#}"));
    let run = Running { tapgate, topo };
    let lease = run.dhcp();
    run.check(
        lease.ip == DEFAULT_GUEST_ADDR,
        format!("unexpected lease: {}", lease.line),
    );
    run
}

trait IcmpRun {
    fn stats(&self) -> Value;
    fn count(&self, stats: &Value, path: &[&str]) -> u64;
    fn wait_count(&self, path: &[&str], min: u64) -> u64;
    fn try_wait_count(&self, path: &[&str], min: u64) -> anyhow::Result<u64>;
    fn try_wait_sum(&self, paths: &[&[&str]], min: u64) -> anyhow::Result<u64>;
    fn alive(&mut self);
}

impl IcmpRun for Running {
    fn stats(&self) -> Value {
        self.ok(control::stats(&self.topo))
    }

    fn count(&self, stats: &Value, path: &[&str]) -> u64 {
        self.ok(icmp::counter(stats, path))
    }

    /// [`IcmpRun::try_wait_count`], failing with the context.
    fn wait_count(&self, path: &[&str], min: u64) -> u64 {
        self.ok(self.try_wait_count(path, min))
    }

    /// Polls the counter at `path` until it reaches `min` (at most
    /// [`COUNTER_LAG`]); the error shows the `icmp` and `fragments`
    /// sections.
    fn try_wait_count(&self, path: &[&str], min: u64) -> anyhow::Result<u64> {
        self.try_wait_sum(&[path], min)
    }

    /// Polls the sum of the counters at `paths` until it reaches `min`.
    fn try_wait_sum(&self, paths: &[&[&str]], min: u64) -> anyhow::Result<u64> {
        let deadline = Instant::now() + COUNTER_LAG;
        loop {
            let stats = control::stats(&self.topo)?;
            let mut n = 0;
            for path in paths {
                n += icmp::counter(&stats, path)?;
            }
            if n >= min {
                return Ok(n);
            }
            if Instant::now() >= deadline {
                let names: Vec<String> = paths.iter().map(|p| p.join(".")).collect();
                anyhow::bail!(
                    "{} is {n}, want >= {min} within {COUNTER_LAG:?}\nicmp: {}\nfragments: {}\nkernel: {}",
                    names.join(" + "),
                    stats["icmp"],
                    stats["fragments"],
                    stats["kernel"]
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Fails if tapgate has exited.
    fn alive(&mut self) {
        let status = self.tapgate.try_wait();
        if let Some(status) = self.ok(status) {
            self.fail(format!("tapgate exited with {status}"));
        }
    }
}

#[test]
fn icmp_and_fragment_counters_present_at_zero() {
    let run = Running::start(GuestKind::Veth, &[]);
    let stats = run.stats();
    let counters = run.ok(icmp::all_counters(&stats));
    let nonzero: Vec<_> = counters.iter().filter(|(_, n)| *n != 0).collect();
    run.check(
        nonzero.is_empty(),
        format!("counters not zero before any traffic: {nonzero:?}"),
    );
}

#[test]
fn ping_gateway_is_answered() {
    let run = Running::with_lease(GuestKind::Veth, &[]);
    run.ok(icmp::ping_gateway(&run.topo));
}

#[test]
fn ping_world_nated_on_the_fast_path() {
    let run = Running::with_lease(GuestKind::RealTap, &[]);
    let (fast0, _) = run.ok(control::fast_slow(&run.stats()));
    let sent = run.ok(icmp::ping_world(&run.topo));
    let (fast1, _) = run.ok(control::fast_slow(&run.stats()));
    // 32 packets in four echo flows; at most the first request and reply
    // of each may take the slow path.
    run.check(
        fast1 - fast0 >= 2 * sent - 8,
        format!(
            "only {} of {} echo packets on the fast path",
            fast1 - fast0,
            2 * sent
        ),
    );
}

#[test]
fn world_port_unreachable_reaches_the_guest() {
    let run = Running::with_lease(GuestKind::RealTap, &[]);
    run.ok(icmp::udp_refused_by_world(&run.topo, 7201));
    // One for the socket, at least one for nc.
    run.wait_count(&["icmp", "translated_to_guest", "port_unreachable"], 2);
}

#[test]
fn pmtud_upload_through_a_small_uplink() {
    let run = start_after(GuestKind::RealTap, |topo| {
        icmp::set_uplink_mtu(topo, SMALL_UPLINK_MTU)
    });
    run.ok(icmp::pmtud_upload(&run.topo, 9201, icmp::UPLOAD_100MIB));
    // At least one for the TCP upload and one for the DF ping.
    run.wait_count(&["icmp", "sent_to_guest", "frag_needed"], 2);
}

/// The same through a veth guest, which sends TSO super-packets: once the
/// flow is on the fast path, segments too big for the uplink must still
/// get fragmentation needed instead of vanishing in the redirect.
#[test]
fn pmtud_upload_through_a_small_uplink_gso() {
    let run = start_after(GuestKind::Veth, |topo| {
        icmp::set_uplink_mtu(topo, SMALL_UPLINK_MTU)
    });
    run.ok(icmp::pmtud_upload(&run.topo, 9202, icmp::UPLOAD_100MIB));
    run.wait_count(&["icmp", "sent_to_guest", "frag_needed"], 2);
}

#[test]
fn traceroute_shows_the_gateway_as_first_hop() {
    let run = Running::with_lease(GuestKind::RealTap, &[]);
    run.ok(icmp::traceroute_through_gateway(&run.topo));
    // UDP probes, then ICMP echo probes.
    run.wait_count(&["icmp", "sent_to_guest", "time_exceeded"], 2);
}

#[test]
fn unreachable_destinations_fail_at_once() {
    let run = start_after(GuestKind::RealTap, icmp::add_unreachable_routes);
    run.ok(icmp::unreachable_destinations(&run.topo));
    run.wait_count(&["icmp", "sent_to_guest", "host_unreachable"], 2);
    run.wait_count(&["icmp", "sent_to_guest", "net_unreachable"], 2);
}

#[test]
fn host_address_is_administratively_prohibited() {
    let run = Running::with_lease(GuestKind::Veth, &[]);
    run.ok(icmp::host_admin_prohibited(&run.topo, 7202));
    // The ping and the UDP socket.
    run.wait_count(&["icmp", "sent_to_guest", "admin_prohibited"], 2);
}

#[test]
fn gateway_port_unreachable() {
    let run = Running::with_lease(GuestKind::Veth, &[]);
    run.ok(icmp::gateway_port_unreachable(&run.topo, 7203));
    run.wait_count(&["icmp", "sent_to_guest", "port_unreachable"], 2);
}

#[test]
fn fragmented_udp_echo_both_ways() {
    let run = Running::with_lease(GuestKind::RealTap, &[]);
    run.ok(icmp::fragmented_udp_echo(&run.topo, 7204));
    // 8192 + 8 bytes in 1480-byte pieces: six fragments each way.
    run.wait_count(&["fragments", "reassembled"], 2);
    let stats = run.stats();
    for (path, min) in [
        (["fragments", "from_guest"], 6),
        (["fragments", "from_world"], 6),
    ] {
        let n = run.count(&stats, &path);
        run.check(
            n >= min,
            format!(
                "{} is {n}, want >= {min}: {}",
                path.join("."),
                stats["fragments"]
            ),
        );
    }
    for path in [["fragments", "in_progress"], ["fragments", "bytes_held"]] {
        let n = run.count(&stats, &path);
        run.check(
            n == 0,
            format!("{} is {n} after every datagram completed", path.join(".")),
        );
    }
}

#[test]
fn malformed_icmp_dropped_and_counted() {
    let mut run = Running::with_lease(GuestKind::RealTap, &[]);
    let path = ["icmp", "dropped", "malformed"];
    let mut dropped = run.count(&run.stats(), &path);
    let r = &run;
    // The scenario adds which packet this was to the error.
    let mut counted = |_: &str| -> anyhow::Result<()> {
        dropped = r.try_wait_count(&path, dropped + 1)?;
        Ok(())
    };
    run.ok(icmp::malformed_icmp_from_guest(
        &run.topo,
        7205,
        &mut counted,
    ));
    // From the world, tapgate takes only what it can show to be about one
    // of its flows (the rest is the host's, as without tapgate): an error
    // quoting a flow that fails to parse is dropped in user space
    // (`icmp.dropped.malformed`); ICMP too short to read, or quoting
    // something unreadable, is counted by the kernel (`icmp_unparsed`)
    // and left to the host stack.
    let world_paths: [&[&str]; 2] = [&path, &["kernel", "icmp_unparsed"]];
    let stats = run.stats();
    let mut seen = run.count(&stats, &path) + run.count(&stats, world_paths[1]);
    let mut counted_world = |_: &str| -> anyhow::Result<()> {
        seen = r.try_wait_sum(&world_paths, seen + 1)?;
        Ok(())
    };
    let nat = run.ok(icmp::malformed_icmp_from_world(
        &run.topo,
        7206,
        &mut counted_world,
    ));
    // The NAT address the world saw is the flow's, as `tapgate flows` says.
    let nat = nat.to_string();
    run.ok(control::wait_flow(&run.topo, COUNTER_LAG, |f| {
        field(f, "proto").eq_ignore_ascii_case("udp") && field(f, "nat") == nat
    }));
    run.alive();
    run.wait_count(&["icmp", "translated_to_guest", "port_unreachable"], 1);
}
