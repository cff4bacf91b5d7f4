//! End-to-end tests of IPv6 fragments: tapgate reassembles what the
//! guest's kernel fragmented (a large UDP datagram to the world, a large
//! ping of the gateway) and fragments the gateway's own replies that
//! exceed the tap's MTU, with a Fragment header; and it takes the world's
//! fragments of datagrams of its flows (the echo of a large datagram, a
//! large datagram to a forwarded UDP port — the latter over IPv4 too),
//! reassembles them and cuts them again for the tap.
//!
//! Every test builds its own [`Topology`](tapgate_tests::topology::Topology)
//! and runs the real `tapgate` binary (root; `cargo xtask test`, or
//! `TAPGATE_BIN=... cargo test -p tapgate-tests --test ipv6_frag`). The
//! guest is behind a real tap and autoconfigures IPv6 by SLAAC (the
//! forwarded-port tests take a DHCP lease first).
#![allow(clippy::unwrap_used)]

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use tapgate_tests::control;
use tapgate_tests::icmp::ip_snmp;
use tapgate_tests::ipv6::{GATEWAY6, Ipv6Guest};
use tapgate_tests::netns::Netns;
use tapgate_tests::nsthread;
use tapgate_tests::running::Running;
use tapgate_tests::topology::{
    GUEST_IFACE, HOST_UPLINK_ADDR, HOST_UPLINK_ADDR6, WORLD_ADDR, WORLD_ADDR6, WORLD_FAR_ADDR6,
};
use tapgate_tests::{GuestKind, require_root};

/// UDP payload of the large datagram: 8 KiB, six fragments at MTU 1500.
const BIG: usize = 8192;
/// UDP payload of the datagram to a forwarded port: 5 KiB, four fragments
/// at MTU 1500 (either family).
const MEDIUM: usize = 5 * 1024;
/// The forwarded UDP port (`-u 5353:53`) and the guest's port behind it.
const FWD_PORT: u16 = 5353;
/// The guest's server port behind [`FWD_PORT`].
const GUEST_PORT: u16 = 53;
/// How long counters may lag behind what the guest saw.
const COUNTER_LAG: Duration = Duration::from_secs(5);

/// This file's helpers on the shared fixture (after `tests/ipv6.rs`).
trait Ipv6Run {
    /// `tapgate stats --json`'s `fragments` counter `key`.
    fn fragments(&self, key: &str) -> u64;
    /// Waits until `fragments.key` is at least `min`.
    fn wait_fragments(&self, key: &str, min: u64);
    /// The kernel counter `key` of `tapgate stats --json`.
    fn kernel(&self, key: &str) -> u64;
    /// Fails with `what` and the `fragments` and `kernel` sections of the
    /// stats.
    fn fail_stats(&self, what: String) -> !;
}

impl Ipv6Run for Running {
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

    fn kernel(&self, key: &str) -> u64 {
        let stats = self.ok(control::stats(&self.topo));
        stats["kernel"][key]
            .as_u64()
            .unwrap_or_else(|| self.fail(format!("stats lack kernel.{key}: {stats}")))
    }

    fn fail_stats(&self, what: String) -> ! {
        let stats = self.ok(control::stats(&self.topo));
        self.fail(format!(
            "{what}\nfragments: {}\nkernel: {}\npunts: {}",
            stats["fragments"], stats["kernel"], stats["punts"]
        ))
    }
}

fn start(args: &[&str]) -> Option<Running> {
    if let Err(e) = require_root() {
        eprintln!("skipping: {e}");
        return None;
    }
    Some(Running::start(GuestKind::RealTap, args))
}

/// [`start`], then a DHCP lease (the guest's MAC and IPv4 address, for
/// inbound forwards) and SLAAC.
fn start_leased(args: &[&str]) -> Option<Running> {
    if let Err(e) = require_root() {
        eprintln!("skipping: {e}");
        return None;
    }
    let run = Running::with_lease(GuestKind::RealTap, args);
    run.wait_slaac();
    Some(run)
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

/// Received by a recording UDP server: each datagram with its sender.
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
    recording_server(run, run.topo.world(), addr, want, how_long, true)
}

/// A UDP server in `ns` at `addr` that records what it receives (and
/// echoes it if `echo`), for `how_long` or until a datagram of `want`
/// bytes came. The receiver says when the socket is bound.
fn recording_server(
    run: &Running,
    ns: &Netns,
    addr: SocketAddr,
    want: usize,
    how_long: Duration,
    echo: bool,
) -> (nsthread::NsThread<Received>, std::sync::mpsc::Receiver<()>) {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let thread = run.ok(nsthread::spawn_in(ns, "udp-recorder", move || {
        let s = UdpSocket::bind(addr).with_context(|| format!("bind {addr}"))?;
        s.set_read_timeout(Some(Duration::from_millis(200)))?;
        let _ = ready_tx.send(());
        let deadline = Instant::now() + how_long;
        let mut got: Received = Vec::new();
        let mut buf = vec![0u8; 65536];
        while Instant::now() < deadline && !got.iter().any(|(d, _)| d.len() == want) {
            if let Ok((n, peer)) = s.recv_from(&mut buf) {
                if echo {
                    let _ = s.send_to(&buf[..n], peer);
                }
                got.push((buf[..n].to_vec(), peer));
            }
        }
        Ok(got)
    }));
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
/// (its MTU is 1500). The echo is not awaited here (see
/// `fragmented_udp_echo_from_the_world_reaches_the_guest_whole`).
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

/// An 8 KiB UDP echo over IPv6: the guest's datagram leaves in fragments
/// (reassembled, cut again for the uplink), the world's echo comes back in
/// fragments (the world's kernel cuts it at 1500 bytes), which the uplink
/// program takes because the first one belongs to the guest's flow: the
/// first tracked in `TG_FRAGS`, every one punted, reassembled by tapgate
/// and cut again for the tap, put together by the guest's kernel.
#[test]
fn fragmented_udp_echo_from_the_world_reaches_the_guest_whole() {
    let Some(run) = start(&[]) else {
        return;
    };
    run.wait_slaac();
    let server: SocketAddr = format!("[{WORLD_FAR_ADDR6}]:7").parse().unwrap();
    let (thread, ready) = recording_echo(&run, server, BIG, Duration::from_secs(10));
    ready.recv_timeout(Duration::from_secs(5)).unwrap();
    let (world0, reassembled0) = (run.fragments("from_world"), run.fragments("reassembled"));
    let tracked0 = run.kernel("frags_tracked");
    let guest_reasm0 = snmp6(run.topo.guest(), "Ip6ReasmOKs");
    let world_frags0 = snmp6(run.topo.world(), "Ip6FragCreates");
    let sent = pattern(BIG);
    let echo = nsthread::run_in(
        run.topo.guest(),
        "guest",
        Duration::from_secs(15),
        move || {
            let s = UdpSocket::bind("[::]:0")?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            s.send_to(&sent, server)?;
            let mut buf = vec![0u8; 65536];
            let (n, peer) = s.recv_from(&mut buf).context("waiting for the echo")?;
            ensure!(peer == server, "the echo came from {peer}, not {server}");
            Ok(buf[..n].to_vec())
        },
    );
    let got = run.ok(thread.join(Duration::from_secs(15)));
    let world_frags = snmp6(run.topo.world(), "Ip6FragCreates") - world_frags0;
    let echo = echo.unwrap_or_else(|e| {
        let summary: Vec<(usize, SocketAddr)> = got.iter().map(|(d, p)| (d.len(), *p)).collect();
        run.fail_stats(format!(
            "no echo of the {BIG}-byte datagram in the guest: {e:#}; the world's server got {summary:?} and made {world_frags} fragments"
        ))
    });
    run.check(
        echo.len() == BIG && echo == pattern(BIG),
        format!("the echo has {} bytes, not the {BIG} sent", echo.len()),
    );
    run.check(
        world_frags >= 6,
        format!("the world made {world_frags} fragments of its echo, want 6"),
    );
    // Six fragments from the world, the two datagrams (the guest's, the
    // world's) reassembled, the world's datagram tracked by the kernel.
    run.wait_fragments("from_world", world0 + 6);
    run.wait_fragments("reassembled", reassembled0 + 2);
    let tracked = run.kernel("frags_tracked") - tracked0;
    run.check(
        tracked >= 1,
        format!("kernel.frags_tracked went up by {tracked}, want 1"),
    );
    // tapgate cut the echo again for the tap: the guest reassembled it.
    let guest_reasm = snmp6(run.topo.guest(), "Ip6ReasmOKs") - guest_reasm0;
    run.check(
        guest_reasm >= 1,
        format!("the guest reassembled {guest_reasm} datagrams, want 1"),
    );
    for key in ["in_progress", "bytes_held"] {
        run.check(
            run.fragments(key) == 0,
            format!("fragments.{key} is not back to 0"),
        );
    }
}

/// What [`send_to_forwarded_port`] saw.
struct Forwarded {
    /// The guest's datagrams, with their senders as the guest saw them.
    got: Received,
    /// `fragments.from_world`, `fragments.reassembled` and
    /// `kernel.frags_tracked` before.
    before: (u64, u64, u64),
}

/// Sends one [`MEDIUM`]-byte UDP datagram (patterned) from the world to
/// `to` (the host's address, port [`FWD_PORT`]; the world's kernel
/// fragments it at 1500 bytes) and returns what a recording server on the
/// guest's `[::]:`[`GUEST_PORT`] got within 10 s.
fn send_to_forwarded_port(run: &Running, to: SocketAddr) -> Forwarded {
    let listen = SocketAddr::from(([0u16; 8], GUEST_PORT));
    let (thread, ready) = recording_server(
        run,
        run.topo.guest(),
        listen,
        MEDIUM,
        Duration::from_secs(10),
        false,
    );
    ready.recv_timeout(Duration::from_secs(5)).unwrap();
    let before = (
        run.fragments("from_world"),
        run.fragments("reassembled"),
        run.kernel("frags_tracked"),
    );
    let sent = pattern(MEDIUM);
    run.ok(nsthread::run_in(
        run.topo.world(),
        "world client",
        Duration::from_secs(10),
        move || {
            let s = UdpSocket::bind(SocketAddr::new(
                if to.is_ipv6() {
                    IpAddr::from([0u16; 8])
                } else {
                    IpAddr::from([0u8; 4])
                },
                0,
            ))?;
            s.send_to(&sent, to)?;
            Ok(())
        },
    ));
    let got = run.ok(thread.join(Duration::from_secs(15)));
    Forwarded { got, before }
}

/// Checks that the guest got the [`MEDIUM`]-byte datagram whole, from
/// `client` (the world's address, as the guest sees it), and that it came
/// in at least four fragments that the kernel tracked and tapgate
/// reassembled.
fn check_forwarded(run: &Running, f: &Forwarded, client: IpAddr) {
    let summary: Vec<(usize, SocketAddr)> = f.got.iter().map(|(d, p)| (d.len(), *p)).collect();
    let Some((bytes, peer)) = f.got.iter().find(|(d, _)| d.len() == MEDIUM) else {
        run.fail_stats(format!(
            "the guest's server did not get the {MEDIUM}-byte datagram (got {summary:?})"
        ));
    };
    run.check(
        *bytes == pattern(MEDIUM),
        "the datagram arrived with other bytes than were sent",
    );
    run.check(
        peer.ip().to_canonical() == client,
        format!("the guest saw the datagram from {peer}, not from {client}"),
    );
    // 5120 + 8 bytes: four fragments at 1500 bytes (either family).
    run.wait_fragments("from_world", f.before.0 + 4);
    run.wait_fragments("reassembled", f.before.1 + 1);
    let tracked = run.kernel("frags_tracked") - f.before.2;
    run.check(
        tracked >= 1,
        format!("kernel.frags_tracked went up by {tracked}, want 1"),
    );
    for key in ["in_progress", "bytes_held"] {
        run.check(
            run.fragments(key) == 0,
            format!("fragments.{key} is not back to 0"),
        );
    }
}

/// A 5 KiB datagram from the world to a forwarded UDP port over IPv6
/// (`[2001:db8:1::1]:5353` → the guest's `:53`): the uplink program takes
/// its first fragment as an opening of the forwarded port and the later
/// ones as fragments of a tracked datagram; tapgate reassembles it, opens
/// the inbound flow, and cuts the datagram again for the tap.
#[test]
fn fragmented_datagram_to_a_forwarded_port_over_ipv6_reaches_the_guest_whole() {
    let Some(run) = start_leased(&["-u", "5353:53"]) else {
        return;
    };
    let reasm0 = snmp6(run.topo.guest(), "Ip6ReasmOKs");
    let to = SocketAddr::new(HOST_UPLINK_ADDR6.parse().unwrap(), FWD_PORT);
    let f = send_to_forwarded_port(&run, to);
    check_forwarded(&run, &f, WORLD_ADDR6.parse().unwrap());
    let reasm = snmp6(run.topo.guest(), "Ip6ReasmOKs") - reasm0;
    run.check(
        reasm >= 1,
        format!("the guest reassembled {reasm} datagrams, want 1"),
    );
}

/// The same over IPv4 (`198.51.100.1:5353`), the path IPv4 had already.
#[test]
fn fragmented_datagram_to_a_forwarded_port_over_ipv4_reaches_the_guest_whole() {
    let Some(run) = start_leased(&["-u", "5353:53"]) else {
        return;
    };
    let reasm0 = run.ok(ip_snmp(run.topo.guest(), "ReasmOKs"));
    let to = SocketAddr::new(HOST_UPLINK_ADDR.parse().unwrap(), FWD_PORT);
    let f = send_to_forwarded_port(&run, to);
    check_forwarded(&run, &f, WORLD_ADDR.parse().unwrap());
    let reasm = run.ok(ip_snmp(run.topo.guest(), "ReasmOKs")) - reasm0;
    run.check(
        reasm >= 1,
        format!("the guest reassembled {reasm} datagrams, want 1"),
    );
}
