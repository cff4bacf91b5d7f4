//! End-to-end tests of IPv6 fragments from the guest: tapgate reassembles
//! what the guest's kernel fragmented (a large UDP datagram to the world, a
//! large ping of the gateway) and fragments the gateway's own replies that
//! exceed the tap's MTU, with a Fragment header.
//!
//! Every test builds its own [`Topology`](tapgate_tests::topology::Topology)
//! and runs the real `tapgate` binary (root; `cargo xtask test`, or
//! `TAPGATE_BIN=... cargo test -p tapgate-tests --test ipv6_frag`). The
//! guest is behind a real tap and autoconfigures IPv6 by SLAAC.
#![allow(clippy::unwrap_used)]

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::Context;
use tapgate_tests::control;
use tapgate_tests::netns::Netns;
use tapgate_tests::nsthread;
use tapgate_tests::running::Running;
use tapgate_tests::topology::{GUEST_IFACE, HOST_UPLINK_ADDR6, WORLD_FAR_ADDR6};
use tapgate_tests::{GuestKind, require_root};

/// The gateway's link-local router address for the default MAC
/// 52:55:0a:00:02:02 (modified EUI-64).
const ROUTER_LL: &str = "fe80::5055:aff:fe00:202";
/// The gateway's global address.
const GATEWAY6: &str = "fd00::2";
/// Bound on the guest's autoconfiguration.
const SLAAC_TIMEOUT: Duration = Duration::from_secs(20);
/// UDP payload of the large datagram: 8 KiB, six fragments at MTU 1500.
const BIG: usize = 8192;
/// How long counters may lag behind what the guest saw.
const COUNTER_LAG: Duration = Duration::from_secs(5);

/// This file's helpers on the shared fixture (after `tests/ipv6.rs`).
trait Ipv6Run {
    /// Runs `argv` in the guest (bounded) and returns its output, whatever
    /// its exit status.
    fn guest_out(&self, argv: &[&str], timeout: Duration) -> (bool, String);
    /// Waits until the output of `argv` in the guest satisfies `cond`.
    fn wait_guest(&self, argv: &[&str], what: &str, cond: impl Fn(&str) -> bool) -> String;
    /// Waits for an autoconfigured address in fd00::/64 and the default
    /// route via the gateway's link-local address.
    fn wait_slaac(&self);
    /// `tapgate stats --json`'s `fragments` counter `key`.
    fn fragments(&self, key: &str) -> u64;
    /// Waits until `fragments.key` is at least `min`.
    fn wait_fragments(&self, key: &str, min: u64);
}

impl Ipv6Run for Running {
    fn guest_out(&self, argv: &[&str], timeout: Duration) -> (bool, String) {
        let out = self.ok(self.topo.guest().output_timeout(argv, timeout));
        let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.push_str(&String::from_utf8_lossy(&out.stderr));
        (out.status.success(), text)
    }

    fn wait_guest(&self, argv: &[&str], what: &str, cond: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + SLAAC_TIMEOUT;
        loop {
            let text = self.ok(self.topo.guest().stdout(argv));
            if cond(&text) {
                return text;
            }
            if Instant::now() > deadline {
                self.fail(format!("{what} within {SLAAC_TIMEOUT:?}; last:\n{text}"));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn wait_slaac(&self) {
        let show = ["ip", "-6", "addr", "show", "dev", GUEST_IFACE];
        self.wait_guest(&show, "a SLAAC address in fd00::/64", |t| {
            t.lines().any(|l| {
                l.contains("inet6 fd00::") && l.contains("scope global") && !l.contains("tentative")
            }) && !t
                .lines()
                .any(|l| l.contains("fe80") && l.contains("tentative"))
        });
        self.wait_guest(
            &["ip", "-6", "route", "show", "default"],
            "a default route via the router's link-local address",
            |t| t.contains(&format!("default via {ROUTER_LL} dev {GUEST_IFACE}")),
        );
    }

    fn fragments(&self, key: &str) -> u64 {
        let stats = self.ok(control::stats(&self.topo));
        stats["fragments"][key]
            .as_u64()
            .unwrap_or_else(|| self.fail(format!("stats lack fragments.{key}: {stats}")))
    }

    fn wait_fragments(&self, key: &str, min: u64) {
        let deadline = Instant::now() + COUNTER_LAG;
        loop {
            let n = self.fragments(key);
            if n >= min {
                return;
            }
            if Instant::now() > deadline {
                let stats = self.ok(control::stats(&self.topo));
                self.fail(format!(
                    "fragments.{key} is {n}, want >= {min}\nfragments: {}\nicmp: {}",
                    stats["fragments"], stats["icmp"]
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn start(args: &[&str]) -> Option<Running> {
    if let Err(e) = require_root() {
        eprintln!("skipping: {e}");
        return None;
    }
    Some(Running::start(GuestKind::RealTap, args))
}

/// An `Ip6...` counter of `/proc/net/snmp6` in `ns`.
fn snmp6(ns: &Netns, name: &str) -> u64 {
    let text = ns.stdout(&["cat", "/proc/net/snmp6"]).unwrap();
    text.lines()
        .filter_map(|l| l.split_once(char::is_whitespace))
        .find(|(n, _)| *n == name)
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in /proc/net/snmp6:\n{text}"))
}

/// Patterned bytes.
fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
}

/// Received by the world's UDP server: each datagram with its sender.
type Received = Vec<(Vec<u8>, SocketAddr)>;

/// A UDP echo server in the world at `addr` that also records what it
/// receives (the bytes, not just the count, so the datagram can be
/// compared), for `how_long` or until a datagram of `want` bytes came.
fn recording_echo(
    run: &Running,
    addr: SocketAddr,
    want: usize,
    how_long: Duration,
) -> (nsthread::NsThread<Received>, std::sync::mpsc::Receiver<()>) {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let thread = run.ok(nsthread::spawn_in(
        run.topo.world(),
        "udp6-echo",
        move || {
            let s = UdpSocket::bind(addr).with_context(|| format!("bind {addr}"))?;
            s.set_read_timeout(Some(Duration::from_millis(200)))?;
            let _ = ready_tx.send(());
            let deadline = Instant::now() + how_long;
            let mut got: Received = Vec::new();
            let mut buf = vec![0u8; 65536];
            while Instant::now() < deadline && !got.iter().any(|(d, _)| d.len() == want) {
                if let Ok((n, peer)) = s.recv_from(&mut buf) {
                    let _ = s.send_to(&buf[..n], peer);
                    got.push((buf[..n].to_vec(), peer));
                }
            }
            Ok(got)
        },
    ));
    (thread, ready_rx)
}

/// What [`send_big_udp`] saw.
struct BigUdp {
    /// The world server's datagrams.
    got: Received,
    /// Fragments the guest's kernel made of the datagram.
    guest_frags: u64,
    /// `fragments.from_guest` and `fragments.reassembled` before.
    before: (u64, u64),
}

/// Sends one [`BIG`]-byte UDP datagram (patterned) from the guest to a
/// recording echo server at `[WORLD_FAR_ADDR6]:7` and waits (10 s at most)
/// for the server to get it. The guest's kernel fragments the datagram
/// (its MTU is 1500). The echo is not awaited: the world's kernel
/// fragments it, and tapgate's uplink side does not take IPv6 fragments
/// yet.
fn send_big_udp(run: &Running) -> BigUdp {
    let server: SocketAddr = format!("[{WORLD_FAR_ADDR6}]:7").parse().unwrap();
    let (thread, ready) = recording_echo(run, server, BIG, Duration::from_secs(10));
    ready.recv_timeout(Duration::from_secs(5)).unwrap();
    let before = (run.fragments("from_guest"), run.fragments("reassembled"));
    let frags0 = snmp6(run.topo.guest(), "Ip6FragCreates");
    let sent = pattern(BIG);
    run.ok(nsthread::run_in(
        run.topo.guest(),
        "guest",
        Duration::from_secs(10),
        move || {
            let s = UdpSocket::bind("[::]:0")?;
            s.send_to(&sent, server)?;
            Ok(())
        },
    ));
    let got = run.ok(thread.join(Duration::from_secs(15)));
    let guest_frags = snmp6(run.topo.guest(), "Ip6FragCreates") - frags0;
    BigUdp {
        got,
        guest_frags,
        before,
    }
}

#[test]
fn fragmented_udp_datagram_from_the_guest_is_reassembled() {
    let Some(run) = start(&[]) else {
        return;
    };
    run.wait_slaac();
    let big = send_big_udp(&run);
    run.check(
        big.guest_frags >= 6,
        format!("the guest made {} fragments, want 6", big.guest_frags),
    );
    // 8192 + 8 bytes of UDP in 1448-byte pieces: six fragments, one
    // datagram, nothing left held.
    run.wait_fragments("from_guest", big.before.0 + 6);
    run.wait_fragments("reassembled", big.before.1 + 1);
    for key in ["in_progress", "bytes_held"] {
        run.check(
            run.fragments(key) == 0,
            format!("fragments.{key} is not back to 0"),
        );
    }
    // The whole datagram went on to the flow manager: a UDP flow for it
    // (a fragment on its own never makes one).
    let remote = format!("[{WORLD_FAR_ADDR6}]:7");
    run.ok(control::wait_flow(&run.topo, COUNTER_LAG, |f| {
        control::field(f, "proto").eq_ignore_ascii_case("udp")
            && control::field(f, "remote") == remote
            && control::field(f, "guest").starts_with("[fd00::")
    }));
}

/// The whole datagram at the world's server, from the host's address:
/// tapgate reassembles the guest's 1500-byte fragments and, since the
/// guest already chose to fragment, cuts the datagram again for the uplink
/// instead of answering Packet Too Big.
#[test]
fn fragmented_udp_datagram_from_the_guest_reaches_the_world_whole() {
    let Some(run) = start(&[]) else {
        return;
    };
    run.wait_slaac();
    let big = send_big_udp(&run);
    let summary: Vec<(usize, SocketAddr)> = big.got.iter().map(|(d, p)| (d.len(), *p)).collect();
    let stats = run.ok(control::stats(&run.topo));
    let Some((bytes, peer)) = big.got.iter().find(|(d, _)| d.len() == BIG) else {
        run.fail(format!(
            "the world's server did not get the {BIG}-byte datagram (got {summary:?}); the guest made {} fragments\nfragments: {}\nicmp: {}",
            big.guest_frags, stats["fragments"], stats["icmp"]
        ));
    };
    run.check(
        *bytes == pattern(BIG),
        "the datagram arrived with other bytes than were sent",
    );
    run.check(
        peer.ip() == HOST_UPLINK_ADDR6.parse::<IpAddr>().unwrap(),
        format!("the datagram came from {peer}, not the host's address"),
    );
    run.wait_fragments("reassembled", big.before.1 + 1);
}

#[test]
fn large_ping_of_the_gateway_is_reassembled_and_its_reply_fragmented() {
    let Some(run) = start(&[]) else {
        return;
    };
    run.wait_slaac();
    let (from_guest0, reassembled0) = (run.fragments("from_guest"), run.fragments("reassembled"));
    let reasm0 = snmp6(run.topo.guest(), "Ip6ReasmOKs");
    // 4000 bytes of echo data: 4048-byte packets, three fragments each
    // way at MTU 1500.
    let (ok, out) = run.guest_out(
        &[
            "ping", "-6", "-n", "-c", "3", "-i", "0.2", "-W", "2", "-s", "4000", GATEWAY6,
        ],
        Duration::from_secs(15),
    );
    run.check(
        ok && out.contains(" 0% packet loss")
            && out.contains(&format!("4008 bytes from {GATEWAY6}")),
        format!("ping -6 -s 4000 {GATEWAY6}:\n{out}"),
    );
    run.wait_fragments("from_guest", from_guest0 + 9);
    run.wait_fragments("reassembled", reassembled0 + 3);
    // The replies came in fragments, which the guest put together.
    let reasm = snmp6(run.topo.guest(), "Ip6ReasmOKs") - reasm0;
    run.check(
        reasm >= 3,
        format!("the guest reassembled {reasm} replies, want 3"),
    );
}

#[test]
fn lost_fragments_get_time_exceeded_from_the_gateway() {
    let Some(run) = start(&[]) else {
        return;
    };
    run.wait_slaac();
    // The guest's own fragments past the first never leave it (dropped
    // after fragmentation, on the way out of eth0).
    let guest = run.topo.guest();
    run.ok(guest.run(&["nft", "add", "table", "netdev", "lossy"]));
    run.ok(guest.run(&[
        "nft",
        &format!(
            "add chain netdev lossy out {{ type filter hook egress device \"{GUEST_IFACE}\" priority 0; policy accept; }}"
        ),
    ]));
    run.ok(guest.run(&[
        "nft",
        "add rule netdev lossy out meta protocol ip6 frag frag-off != 0 counter drop",
    ]));
    let exceeded0 = snmp6(guest, "Icmp6InTimeExcds");
    let timed_out0 = run.fragments("timed_out");
    let server: SocketAddr = format!("[{WORLD_FAR_ADDR6}]:9").parse().unwrap();
    let sent = pattern(BIG);
    let began = Instant::now();
    run.ok(nsthread::run_in(
        guest,
        "guest",
        Duration::from_secs(10),
        move || {
            let s = UdpSocket::bind("[::]:0")?;
            s.send_to(&sent, server)?;
            Ok(())
        },
    ));
    // Only the first fragment left the guest: its kernel gives up on the
    // datagram at the first fragment dropped.
    run.wait_fragments("in_progress", 1);
    let list = ["nft", "list", "chain", "netdev", "lossy", "out"];
    let dropped = run.ok(guest.stdout(&list));
    run.check(
        !dropped.contains("counter packets 0 "),
        format!("the guest dropped none of its later fragments:\n{dropped}"),
    );
    // After the reassembly timeout (30 s), the gateway says so; the guest's
    // kernel counts the ICMPv6 time exceeded.
    let deadline = began + Duration::from_secs(40);
    loop {
        let stats = run.ok(control::stats(&run.topo));
        let sent = stats["icmp"]["sent_to_guest"]["reassembly_timeout"]
            .as_u64()
            .unwrap_or(0);
        let timed_out = stats["fragments"]["timed_out"].as_u64().unwrap_or(0);
        let exceeded = snmp6(guest, "Icmp6InTimeExcds");
        if sent >= 1 && timed_out > timed_out0 && exceeded > exceeded0 {
            run.check(
                began.elapsed() >= Duration::from_secs(29),
                format!("timed out after only {:?}", began.elapsed()),
            );
            break;
        }
        if Instant::now() > deadline {
            run.fail(format!(
                "no time exceeded after {:?}: sent {sent}, timed_out {timed_out}, guest Icmp6InTimeExcds {exceeded0} -> {exceeded}\nfragments: {}",
                began.elapsed(),
                stats["fragments"]
            ));
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    run.check(
        run.fragments("in_progress") == 0 && run.fragments("bytes_held") == 0,
        "the timed-out datagram is still held",
    );
}
