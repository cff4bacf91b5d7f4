//! ICMP and IPv4-fragment scenarios (issue 5), shared by tapgate's tests
//! (`tests/tests/icmp.rs`) and their kernel-twin self-tests
//! (`tests/tests/icmp_scenarios.rs`).
//!
//! # Theory of operation
//!
//! Like [`crate::scenarios`], every function here drives one behaviour
//! through whatever connects the guest of a [`Topology`] to its world, and
//! checks it the way a user would see it: `ping`, `nc -u`, `traceroute -n`
//! and `curl` from the guest, plus exact checks on sockets in the guest
//! namespace ([`crate::nsthread`]). Run against
//! [`crate::GuestKind::KernelRouted`] (a real Linux router with nft
//! masquerade, which sends and NATs ICMP errors itself) every scenario
//! passes, which proves the scenario right; a failure against tapgate is
//! then tapgate's.
//!
//! What the tools show (netcat-openbsd 1.219, traceroute 2.1.2, iputils
//! ping 20221126, curl 7.88, observed in these namespaces):
//!
//! * `nc -u` never prints "Connection refused": on `POLLERR` it exits 0
//!   silently. With `-v -z` it probes by writing `X` twice, then twice
//!   more one second apart; a refusal makes a write fail with
//!   `ECONNREFUSED` and nc exits 1 *without any message*, while an open
//!   (or silent) port prints `Connection to HOST PORT port [udp/*]
//!   succeeded!` and exits 0. So [`nc_udp_probe`] reads the exit status:
//!   the refusal has two seconds to arrive.
//! * `traceroute -n` prints ` 1  10.0.2.2  0.513 ms  0.486 ms  0.472 ms`
//!   per hop, `*` for an unanswered probe and `!H`, `!N`, `!X`, ... after
//!   the time for an unreachable answer.
//! * `ping` prints `From 10.0.2.2 icmp_seq=1 Destination Host Unreachable`
//!   (`... Net Unreachable`, `... Packet filtered` for administratively
//!   prohibited, `Frag needed and DF set (mtu = 1280)`) for errors.
//! * `curl -v` prints `connect to 192.0.2.1 port 80 failed: No route to
//!   host` (or `Network is unreachable`), then exits 7.
//! * The guest's `ip route get 198.51.100.2` after PMTUD prints a second
//!   line `cache expires 599sec mtu 1280`.
//!
//! The kernel rate-limits the ICMP errors it sends per destination (a
//! burst of 6, then one a second; a forwarding router spends two tokens
//! per error), which makes the world's port unreachables and the twin
//! router's errors run out within one scenario. [`quiet_kernel_limits`]
//! turns that off (`net.ipv4.icmp_ratelimit=0`) in the world namespace and,
//! for the kernel twin, in the host namespace; tapgate's own limiter is
//! untouched (it lives in tapgate, and the scenarios provoke only a few
//! errors each).
//!
//! "No route at all" is made with a `throw` route in the host's main table
//! ([`NO_ROUTE_NET`]): the lookup ends there as if nothing matched
//! (`ip route get` says "Network is unreachable") while the default route
//! the rest of the topology needs stays in place. [`UNREACHABLE_NET`] gets
//! a route of type `unreachable` (host unreachable).
//!
//! Malformed ICMP is sent with raw IPv4 sockets (`IPPROTO_RAW`, the kernel
//! only fills in the outer header's length and checksum) from the guest
//! towards the world and from the world towards the host's NAT address,
//! about a live UDP flow. Each malformed packet is followed by the
//! caller's `after_each` hook (tapgate's test polls its drop counter
//! there); the world-side run also proves the crafting right: the same
//! error, well formed, must reach the guest's socket as `ECONNREFUSED`,
//! while none of the malformed ones may.

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4, UdpSocket};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;

use crate::child::Child;
use crate::netns::Netns;
use crate::nsthread;
use crate::scenarios::{self, THREAD_TIMEOUT, pattern, world};
use crate::servers::{UdpEchoServer, serve_once};
use crate::topology::{
    DEFAULT_GATEWAY, DEFAULT_GUEST_ADDR, GuestKind, HOST_UPLINK_ADDR, Topology, UPLINK_NAME,
    WORLD_ADDR, WORLD_FAR_ADDR,
};

/// A destination network the host reaches through a route of type
/// `unreachable` (see [`add_unreachable_routes`]).
pub const UNREACHABLE_NET: &str = "192.0.2.0/24";
/// An address in [`UNREACHABLE_NET`].
pub const UNREACHABLE_DST: &str = "192.0.2.1";
/// A destination network the host has no route for (a `throw` route).
pub const NO_ROUTE_NET: &str = "198.18.0.0/15";
/// An address in [`NO_ROUTE_NET`].
pub const NO_ROUTE_DST: &str = "198.18.0.1";
/// The uplink MTU of the PMTUD scenario.
pub const SMALL_UPLINK_MTU: u32 = 1280;
/// Size of the fragmented UDP datagram.
pub const BIG_DATAGRAM: usize = 8192;
/// Every ICMP kind of tapgate's `icmp` counters.
pub const KINDS: [&str; 13] = [
    "echo_request",
    "echo_reply",
    "net_unreachable",
    "host_unreachable",
    "protocol_unreachable",
    "port_unreachable",
    "frag_needed",
    "admin_prohibited",
    "unreachable_other",
    "time_exceeded",
    "reassembly_timeout",
    "param_problem",
    "other",
];
/// The per-kind sections of tapgate's `icmp` counters.
pub const KIND_SECTIONS: [&str; 4] = [
    "sent_to_guest",
    "sent_to_world",
    "translated_to_guest",
    "translated_to_world",
];
/// The plain numbers of tapgate's `fragments` counters.
pub const FRAGMENT_COUNTERS: [&str; 7] = [
    "from_guest",
    "from_world",
    "reassembled",
    "sent",
    "timed_out",
    "in_progress",
    "bytes_held",
];
/// The reasons of `fragments.dropped`.
pub const FRAGMENT_DROPS: [&str; 4] = ["malformed", "overlap", "too_big", "no_room"];
/// The reasons of `icmp.dropped`.
pub const ICMP_DROPS: [&str; 3] = ["malformed", "unknown_flow", "unsupported"];

/// Bound on one command-line tool run.
const TOOL_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a guest socket waits for an ICMP error to show.
const ERROR_WAIT: Duration = Duration::from_secs(3);

fn ip(addr: &str) -> Result<Ipv4Addr> {
    addr.parse()
        .with_context(|| format!("{addr} is not an IPv4 address"))
}

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// Turns off the kernel's ICMP error rate limit in the world namespace and,
/// for a kernel-routed topology, in the host (see the module docs).
pub fn quiet_kernel_limits(topo: &Topology) -> Result<()> {
    let quiet = ["sysctl", "-q", "-w", "net.ipv4.icmp_ratelimit=0"];
    topo.world().run(&quiet)?;
    if topo.kind() == GuestKind::KernelRouted {
        topo.host().run(&quiet)?;
    }
    Ok(())
}

/// A number in a stats document at `path` (e.g. `["icmp", "sent_to_guest",
/// "frag_needed"]`); the error shows the part that exists.
pub fn counter(stats: &Value, path: &[&str]) -> Result<u64> {
    let mut v = stats;
    for (i, key) in path.iter().enumerate() {
        v = v.get(key).with_context(|| {
            format!(
                "stats have no {:?} (at {:?}): {}",
                path.join("."),
                path[..i].join("."),
                v
            )
        })?;
    }
    v.as_u64()
        .with_context(|| format!("stats {:?} is not a number: {v}", path.join(".")))
}

/// Every documented `icmp` and `fragments` counter of a stats document, as
/// `(dotted path, value)`; fails naming the first one missing.
pub fn all_counters(stats: &Value) -> Result<Vec<(String, u64)>> {
    let mut paths: Vec<Vec<&str>> = Vec::new();
    for section in KIND_SECTIONS {
        for kind in KINDS {
            paths.push(vec!["icmp", section, kind]);
        }
    }
    paths.push(vec!["icmp", "rate_limited"]);
    for reason in ICMP_DROPS {
        paths.push(vec!["icmp", "dropped", reason]);
    }
    for name in FRAGMENT_COUNTERS {
        paths.push(vec!["fragments", name]);
    }
    for reason in FRAGMENT_DROPS {
        paths.push(vec!["fragments", "dropped", reason]);
    }
    paths
        .iter()
        .map(|p| Ok((p.join("."), counter(stats, p)?)))
        .collect()
}

/// Output of a tool run: exit code and stdout + stderr.
#[derive(Debug, Clone)]
pub struct ToolRun {
    /// The exit code (`None` if killed by a signal).
    pub code: Option<i32>,
    /// stdout followed by stderr.
    pub text: String,
    /// How long it ran.
    pub took: Duration,
}

/// Runs `argv` in `ns` (bounded by [`TOOL_TIMEOUT`]) whatever its exit
/// status.
pub fn tool(ns: &Netns, argv: &[&str]) -> Result<ToolRun> {
    let started = Instant::now();
    let out = ns.output_timeout(argv, TOOL_TIMEOUT)?;
    Ok(ToolRun {
        code: out.status.code(),
        text: format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
        took: started.elapsed(),
    })
}

/// `nc -u -v -z -w 2 HOST PORT` in the guest: `Ok(true)` if nc saw the
/// port refuse (exit 1, no "succeeded"), `Ok(false)` if it reported
/// success, an error for anything else.
pub fn nc_udp_probe(topo: &Topology, host: &str, port: u16) -> Result<bool> {
    let port = port.to_string();
    let run = tool(
        topo.guest(),
        &["nc", "-u", "-v", "-z", "-w", "2", host, &port],
    )?;
    match run.code {
        Some(1) if !run.text.contains("succeeded") => Ok(true),
        Some(0) if run.text.contains("succeeded") => Ok(false),
        _ => bail!("nc -uvz {host} {port}: unexpected result {run:?}"),
    }
}

/// Sends one datagram from a connected UDP socket in the guest to `to` and
/// returns the error the socket reports within [`ERROR_WAIT`] (three sends,
/// as the first error may race the first receive), or `None` if every
/// receive timed out. A datagram coming back is an error.
pub fn guest_udp_error(topo: &Topology, to: SocketAddr) -> Result<Option<std::io::Error>> {
    nsthread::run_in(topo.guest(), "guest-udp", THREAD_TIMEOUT, move || {
        let s = UdpSocket::bind("0.0.0.0:0")?;
        s.connect(to)?;
        s.set_read_timeout(Some(ERROR_WAIT / 3))?;
        let mut buf = [0u8; 2048];
        for _ in 0..3 {
            if let Err(e) = s.send(b"anyone there?") {
                return Ok(Some(e));
            }
            match s.recv(&mut buf) {
                Ok(n) => bail!("{to} answered with {n} bytes instead of an error"),
                Err(e) if is_timeout(&e) => {}
                Err(e) => return Ok(Some(e)),
            }
        }
        Ok(None)
    })
}

fn is_timeout(e: &std::io::Error) -> bool {
    matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)
}

fn describe(e: &Option<std::io::Error>) -> String {
    match e {
        Some(e) => format!("{e} (errno {:?})", e.raw_os_error()),
        None => format!("no error within {ERROR_WAIT:?}"),
    }
}

/// Runs `ping -n ARGS` in the guest and returns its output (any status).
pub fn guest_ping(topo: &Topology, args: &[&str]) -> Result<ToolRun> {
    let mut argv = vec!["ping", "-n"];
    argv.extend_from_slice(args);
    tool(topo.guest(), &argv)
}

/// Pings `target` from the guest expecting no reply and at least one error
/// line containing `want` (e.g. "Destination Host Unreachable"), coming
/// from one of `sources`.
fn ping_gets_error(topo: &Topology, target: &str, want: &str, sources: &[&str]) -> Result<()> {
    let run = guest_ping(topo, &["-c", "3", "-i", "0.3", "-W", "1", target])?;
    let errors: Vec<&str> = run.text.lines().filter(|l| l.contains(want)).collect();
    ensure!(
        !errors.is_empty(),
        "ping {target}: no \"{want}\" line:\n{}",
        run.text
    );
    ensure!(
        errors
            .iter()
            .all(|l| sources.iter().any(|s| l.starts_with(&format!("From {s} ")))),
        "ping {target}: \"{want}\" from an unexpected source (want one of {sources:?}):\n{}",
        run.text
    );
    ensure!(
        !run.text.contains("bytes from"),
        "ping {target} got a reply:\n{}",
        run.text
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// 1. Echo
// ---------------------------------------------------------------------------

/// Pings the world (`198.51.100.2`, `203.0.113.10`) from the guest with
/// every reply back, then two pings (different ICMP ids) at once to the
/// same host; the world must see all echo requests coming from the host's
/// address (counted by an nft rule in the world's input). Returns how many
/// echo requests the guest sent to the world.
pub fn ping_world(topo: &Topology) -> Result<u64> {
    scenarios::nft_rule(
        topo.world(),
        "input",
        &format!("ip saddr {HOST_UPLINK_ADDR} icmp type echo-request counter"),
    )?;
    let mut sent = 0;
    for target in [WORLD_ADDR, WORLD_FAR_ADDR] {
        let run = guest_ping(topo, &["-c", "3", "-i", "0.2", "-W", "2", target])?;
        ensure!(
            run.code == Some(0) && run.text.contains(" 0% packet loss"),
            "ping {target} from the guest:\n{}",
            run.text
        );
        sent += 3;
    }
    let mut pings = Vec::new();
    for i in 0..2 {
        let mut cmd = topo.guest().cmd("ping");
        cmd.args(["-n", "-c", "5", "-i", "0.2", "-W", "2", WORLD_ADDR]);
        pings.push(Child::spawn(cmd, &format!("ping {i}"))?);
    }
    for mut p in pings {
        let status = p.wait_exit(TOOL_TIMEOUT)?;
        let out = p.stdout();
        ensure!(
            status.success() && out.contains(" 0% packet loss"),
            "{} (concurrent with another ping to {WORLD_ADDR}) lost replies:\n{out}",
            p.label()
        );
        sent += 5;
    }
    let seen = scenarios::nft_counter(topo.world(), "input")?;
    ensure!(
        seen >= sent,
        "the world saw {seen} echo requests from {HOST_UPLINK_ADDR}, the guest sent {sent}"
    );
    Ok(sent)
}

/// Pings the gateway `10.0.2.2` from the guest (every reply back).
pub fn ping_gateway(topo: &Topology) -> Result<()> {
    let run = guest_ping(topo, &["-c", "3", "-i", "0.2", "-W", "2", DEFAULT_GATEWAY])?;
    ensure!(
        run.code == Some(0) && run.text.contains(" 0% packet loss"),
        "ping {DEFAULT_GATEWAY} from the guest:\n{}",
        run.text
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// 2. Errors from the world about a flow
// ---------------------------------------------------------------------------

/// UDP to a closed port of the world (`198.51.100.2:port`, nothing bound):
/// a connected socket in the guest gets `ECONNREFUSED`, and `nc -uvz`
/// reports the refusal (see the module docs).
pub fn udp_refused_by_world(topo: &Topology, port: u16) -> Result<()> {
    quiet_kernel_limits(topo)?;
    let err = guest_udp_error(topo, world(port))?;
    ensure!(
        err.as_ref().and_then(std::io::Error::raw_os_error) == Some(libc::ECONNREFUSED),
        "UDP to closed {}: want ECONNREFUSED, got {}",
        world(port),
        describe(&err)
    );
    ensure!(
        nc_udp_probe(topo, WORLD_ADDR, port)?,
        "nc -uvz {WORLD_ADDR} {port} reported success: the refusal never reached the guest"
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// 3. Errors the gateway synthesizes
// ---------------------------------------------------------------------------

/// Sets the host's uplink MTU (before tapgate starts). The world's end
/// keeps 1500, so the world's SYN-ACK still offers MSS 1460 and the guest
/// sends full-size segments that only the host's uplink cannot carry.
pub fn set_uplink_mtu(topo: &Topology, mtu: u32) -> Result<()> {
    topo.host()
        .ip(&["link", "set", UPLINK_NAME, "mtu", &mtu.to_string()])?;
    Ok(())
}

/// The guest's `ip route get 198.51.100.2`.
pub fn guest_route_to_world(topo: &Topology) -> Result<String> {
    topo.guest().stdout(&["ip", "route", "get", WORLD_ADDR])
}

/// Blocks of [`upload`] making about 100 MiB.
pub const UPLOAD_100MIB: usize = 102;
/// Length of the repeating block of [`upload`]'s stream: a whole number of
/// [`pattern`] periods (251 bytes), so block after block continues it.
const UPLOAD_BLOCK: usize = 251 * 4096;
/// Bound on one read or write of [`upload`]: a black-holed connection
/// fails after twice this long (the first blocked write returns what it
/// copied when the bound runs out, the next one the timeout).
const UPLOAD_STALL: Duration = Duration::from_secs(5);

/// Sends `blocks` × [`UPLOAD_BLOCK`] bytes of [`pattern`] over one TCP
/// connection from the guest to `198.51.100.2:port`; the world's server
/// checks every byte against the pattern at its offset and the total.
/// Any read or write stalling for [`UPLOAD_STALL`] fails it.
pub fn upload(topo: &Topology, port: u16, blocks: usize) -> Result<()> {
    let block = pattern(UPLOAD_BLOCK, 11);
    let want_total = (blocks * UPLOAD_BLOCK) as u64;
    let expected = block.clone();
    let server = serve_once(
        topo.world(),
        world(port),
        THREAD_TIMEOUT,
        move |mut s, _| {
            s.set_read_timeout(Some(UPLOAD_STALL))?;
            let mut buf = vec![0u8; 1 << 16];
            let mut total = 0u64;
            loop {
                let n = match s.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) => {
                        return Err(e).with_context(|| format!("server read after {total} bytes"));
                    }
                };
                let mut done = 0;
                while done < n {
                    let at = (total as usize + done) % UPLOAD_BLOCK;
                    let len = (n - done).min(UPLOAD_BLOCK - at);
                    ensure!(
                        buf[done..done + len] == expected[at..at + len],
                        "bytes {}..{} differ from the pattern",
                        total + done as u64,
                        total + (done + len) as u64
                    );
                    done += len;
                }
                total += n as u64;
            }
            ensure!(
                total == want_total,
                "server received {total} bytes, want {want_total}"
            );
            Ok(total)
        },
    )?;
    let sent = nsthread::run_in(topo.guest(), "guest", THREAD_TIMEOUT, move || {
        let mut s = scenarios::connect(world(port))?;
        s.set_write_timeout(Some(UPLOAD_STALL))?;
        for i in 0..blocks {
            s.write_all(&block).with_context(|| {
                format!("guest write stalled in block {i} of {blocks} (black hole?)")
            })?;
        }
        s.shutdown(Shutdown::Write)?;
        Ok(())
    });
    let received = server.join(THREAD_TIMEOUT);
    sent?;
    received?;
    Ok(())
}

/// PMTUD through a small uplink (the caller has set it to
/// [`SMALL_UPLINK_MTU`] with [`set_uplink_mtu`]): the guest's route has no
/// learnt MTU before, an [`upload`] of `blocks` blocks to
/// `198.51.100.2:port` arrives whole, and the guest's route then shows
/// `mtu 1280`; after flushing that, a DF ping too big for the uplink gets
/// "Frag needed and DF set (mtu = 1280)" from the gateway.
pub fn pmtud_upload(topo: &Topology, port: u16, blocks: usize) -> Result<()> {
    quiet_kernel_limits(topo)?;
    let want = format!("mtu {SMALL_UPLINK_MTU}");
    let before = guest_route_to_world(topo)?;
    ensure!(
        !before.contains(" mtu "),
        "the guest's route has an MTU before the transfer: {before}"
    );
    upload(topo, port, blocks)
        .context("upload through the small uplink (a stall means no PMTUD)")?;
    let after = guest_route_to_world(topo)?;
    ensure!(
        after.contains(&want),
        "after the upload the guest's route does not show {want:?}: {after}"
    );
    topo.guest().run(&["ip", "route", "flush", "cache"])?;
    let size = (SMALL_UPLINK_MTU + 100).to_string();
    let run = guest_ping(
        topo,
        &["-c", "1", "-W", "2", "-M", "do", "-s", &size, WORLD_ADDR],
    )?;
    let line = format!(
        "From {DEFAULT_GATEWAY} icmp_seq=1 Frag needed and DF set (mtu = {SMALL_UPLINK_MTU})"
    );
    ensure!(
        run.text.contains(&line),
        "DF ping of {size} bytes: want {line:?}, got:\n{}",
        run.text
    );
    Ok(())
}

/// One hop of `traceroute -n` output: its number and the addresses that
/// answered, with the raw line.
#[derive(Debug, Clone)]
pub struct Hop {
    /// Hop number.
    pub n: u32,
    /// Addresses that answered (in order, without repeats).
    pub addrs: Vec<String>,
    /// The whole line.
    pub line: String,
}

/// Parses `traceroute -n` output.
pub fn parse_traceroute(text: &str) -> Vec<Hop> {
    text.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            let n = words.next()?.parse().ok()?;
            let mut addrs: Vec<String> = Vec::new();
            for w in words {
                if w.parse::<Ipv4Addr>().is_ok() && !addrs.iter().any(|a| a == w) {
                    addrs.push(w.to_owned());
                }
            }
            Some(Hop {
                n,
                addrs,
                line: line.to_owned(),
            })
        })
        .collect()
}

/// `traceroute -n` (UDP probes, then ICMP echo probes with `-I`) from the
/// guest to `203.0.113.10`: hop 1 is the gateway `10.0.2.2` (time
/// exceeded, no `!` annotation), hop 2 — the last — is the destination.
pub fn traceroute_through_gateway(topo: &Topology) -> Result<()> {
    quiet_kernel_limits(topo)?;
    for mode in [None, Some("-I")] {
        let mut argv = vec!["traceroute", "-n", "-q", "3", "-w", "1", "-m", "4"];
        argv.extend(mode);
        argv.push(WORLD_FAR_ADDR);
        let run = tool(topo.guest(), &argv)?;
        let hops = parse_traceroute(&run.text);
        let shown = || format!("`{}`:\n{}", argv.join(" "), run.text);
        ensure!(run.code == Some(0), "failed: {}", shown());
        let hop1 = hops
            .first()
            .with_context(|| format!("no hops in {}", shown()))?;
        ensure!(
            hop1.n == 1 && hop1.addrs == [DEFAULT_GATEWAY] && !hop1.line.contains('!'),
            "hop 1 should be {DEFAULT_GATEWAY} (time exceeded) alone: {}",
            shown()
        );
        ensure!(
            hops.len() == 2 && hops[1].n == 2 && hops[1].addrs == [WORLD_FAR_ADDR],
            "hop 2 (the last) should be {WORLD_FAR_ADDR}: {}",
            shown()
        );
    }
    Ok(())
}

/// Adds, in the host, a route of type `unreachable` for
/// [`UNREACHABLE_NET`] and a `throw` route for [`NO_ROUTE_NET`] (no route
/// at all; see the module docs). Before or after tapgate starts.
pub fn add_unreachable_routes(topo: &Topology) -> Result<()> {
    topo.host()
        .ip(&["route", "add", "unreachable", UNREACHABLE_NET])?;
    topo.host().ip(&["route", "add", "throw", NO_ROUTE_NET])?;
    Ok(())
}

/// With [`add_unreachable_routes`] in place: `curl` from the guest to
/// [`UNREACHABLE_DST`] fails at once (exit 7, under 3 s) with "No route to
/// host", to [`NO_ROUTE_DST`] with "Network is unreachable"; `ping` shows
/// "Destination Host Unreachable" / "Destination Net Unreachable" from the
/// gateway.
pub fn unreachable_destinations(topo: &Topology) -> Result<()> {
    quiet_kernel_limits(topo)?;
    for (dst, errno, ping_text) in [
        (
            UNREACHABLE_DST,
            "No route to host",
            "Destination Host Unreachable",
        ),
        (
            NO_ROUTE_DST,
            "Network is unreachable",
            "Destination Net Unreachable",
        ),
    ] {
        let url = format!("http://{dst}/");
        let run = tool(
            topo.guest(),
            &["curl", "-sS", "-v", "--max-time", "4", &url],
        )?;
        let want = format!("connect to {dst} port 80 failed: {errno}");
        ensure!(
            run.code == Some(7) && run.text.contains(&want) && run.took < Duration::from_secs(3),
            "curl {url}: want exit 7 with {want:?} at once, got exit {:?} after {:?}:\n{}",
            run.code,
            run.took,
            run.text
        );
        ping_gets_error(topo, dst, ping_text, &[DEFAULT_GATEWAY])?;
    }
    Ok(())
}

/// For the kernel twin: rejects guest traffic to the host's own address
/// with "administratively prohibited" (tapgate's default policy).
pub fn kernel_deny_host(topo: &Topology) -> Result<()> {
    scenarios::nft_rule(
        topo.host(),
        "input",
        &format!(
            "iifname \"{}\" ip daddr {HOST_UPLINK_ADDR} reject with icmp type admin-prohibited",
            topo.tap_name()
        ),
    )
}

/// The host's own address `198.51.100.1`, denied by policy: ping shows
/// "Packet filtered" (administratively prohibited, from the gateway or
/// the host address) and a connected UDP socket to `198.51.100.1:port`
/// gets `EHOSTUNREACH`.
pub fn host_admin_prohibited(topo: &Topology, port: u16) -> Result<()> {
    quiet_kernel_limits(topo)?;
    ping_gets_error(
        topo,
        HOST_UPLINK_ADDR,
        "Packet filtered",
        &[DEFAULT_GATEWAY, HOST_UPLINK_ADDR],
    )?;
    let to = SocketAddr::from((ip(HOST_UPLINK_ADDR)?, port));
    let err = guest_udp_error(topo, to)?;
    ensure!(
        err.as_ref().and_then(std::io::Error::raw_os_error) == Some(libc::EHOSTUNREACH),
        "UDP to {to}: want EHOSTUNREACH (admin prohibited), got {}",
        describe(&err)
    );
    Ok(())
}

/// UDP to the gateway `10.0.2.2:port` where nothing serves: a connected
/// socket gets `ECONNREFUSED`, `nc -uvz` reports the refusal.
pub fn gateway_port_unreachable(topo: &Topology, port: u16) -> Result<()> {
    quiet_kernel_limits(topo)?;
    let to = SocketAddr::from((ip(DEFAULT_GATEWAY)?, port));
    let err = guest_udp_error(topo, to)?;
    ensure!(
        err.as_ref().and_then(std::io::Error::raw_os_error) == Some(libc::ECONNREFUSED),
        "UDP to {to}: want ECONNREFUSED, got {}",
        describe(&err)
    );
    ensure!(
        nc_udp_probe(topo, DEFAULT_GATEWAY, port)?,
        "nc -uvz {DEFAULT_GATEWAY} {port} reported success"
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// 4. Fragments
// ---------------------------------------------------------------------------

/// A counter of the `Ip:` line of `/proc/net/snmp` in `ns`.
pub fn ip_snmp(ns: &Netns, name: &str) -> Result<u64> {
    let text = ns.stdout(&["cat", "/proc/net/snmp"])?;
    let mut lines = text.lines().filter(|l| l.starts_with("Ip:"));
    let (names, values) = (lines.next(), lines.next());
    let (Some(names), Some(values)) = (names, values) else {
        bail!("no Ip: lines in /proc/net/snmp: {text}");
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == name)
        .and_then(|(_, v)| v.parse().ok())
        .with_context(|| format!("no Ip counter {name} in {names}"))
}

/// An [`BIG_DATAGRAM`]-byte UDP datagram from the guest to a world echo
/// server at `198.51.100.2:port` and its echo both arrive byte-exact, and
/// both crossed in fragments: the guest fragmented (`FragCreates`) and
/// reassembled (`ReasmOKs`), and so did the world.
pub fn fragmented_udp_echo(topo: &Topology, port: u16) -> Result<()> {
    let _server = UdpEchoServer::start(topo.world(), world(port))?;
    let snmp = |ns: &Netns| -> Result<(u64, u64)> {
        Ok((ip_snmp(ns, "FragCreates")?, ip_snmp(ns, "ReasmOKs")?))
    };
    let (g0, w0) = (snmp(topo.guest())?, snmp(topo.world())?);
    nsthread::run_in(topo.guest(), "guest", THREAD_TIMEOUT, move || {
        let s = scenarios::udp_socket(world(port))?;
        scenarios::udp_echo(&s, &pattern(BIG_DATAGRAM, 9))
            .context("8 KiB datagram through fragments")?;
        scenarios::udp_echo(&s, &pattern(100, 10)).context("small datagram after it")
    })?;
    let (g1, w1) = (snmp(topo.guest())?, snmp(topo.world())?);
    ensure!(
        g1.0 >= g0.0 + 6 && g1.1 > g0.1,
        "guest (FragCreates, ReasmOKs) went {g0:?} -> {g1:?}: the datagrams did not cross fragmented"
    );
    ensure!(
        w1.0 >= w0.0 + 6 && w1.1 > w0.1,
        "world (FragCreates, ReasmOKs) went {w0:?} -> {w1:?}: the datagrams did not cross fragmented"
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// 5. Malformed ICMP
// ---------------------------------------------------------------------------

/// The Internet checksum of `data`.
pub fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An IPv4 header (20 bytes, checksum filled in) followed by `payload`.
pub fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, payload: &[u8]) -> Vec<u8> {
    let len = (20 + payload.len()) as u16;
    let mut p = vec![0x45, 0];
    p.extend_from_slice(&len.to_be_bytes());
    p.extend_from_slice(&[0x12, 0x34, 0, 0, 64, proto, 0, 0]);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    let sum = checksum(&p);
    p[10..12].copy_from_slice(&sum.to_be_bytes());
    p.extend_from_slice(payload);
    p
}

/// A UDP datagram `src → dst` (checksum 0: none) inside an IPv4 header.
pub fn udp_packet(src: SocketAddrV4, dst: SocketAddrV4, data: &[u8]) -> Vec<u8> {
    let mut u = Vec::new();
    u.extend_from_slice(&src.port().to_be_bytes());
    u.extend_from_slice(&dst.port().to_be_bytes());
    u.extend_from_slice(&((8 + data.len()) as u16).to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u.extend_from_slice(data);
    ipv4(*src.ip(), *dst.ip(), libc::IPPROTO_UDP as u8, &u)
}

/// An ICMP message (type, code, the 4 "rest of header" bytes, body) with
/// its checksum.
pub fn icmp_message(kind: u8, code: u8, rest: [u8; 4], body: &[u8]) -> Vec<u8> {
    let mut m = vec![kind, code, 0, 0];
    m.extend_from_slice(&rest);
    m.extend_from_slice(body);
    let sum = checksum(&m);
    m[2..4].copy_from_slice(&sum.to_be_bytes());
    m
}

/// ICMP type of an echo request.
const ECHO_REQUEST: u8 = 8;

/// One crafted ICMP message (the IP payload) and what is wrong with it.
#[derive(Debug, Clone)]
pub struct Crafted {
    /// What it is, for messages.
    pub what: &'static str,
    /// The ICMP bytes.
    pub icmp: Vec<u8>,
}

/// The malformed ICMP messages of the scenarios. `quoted` is a real packet
/// of a flow (as it travelled in the other direction) that a well-formed
/// error would quote.
pub fn malformed_set(quoted: &[u8]) -> Vec<Crafted> {
    let mut bad_sum = icmp_message(ECHO_REQUEST, 0, [0x4a, 0x11, 0, 1], b"bad checksum ping");
    bad_sum[2] ^= 0x5a;
    let mut bad_sum_error = icmp_message(3, 3, [0; 4], quoted);
    bad_sum_error[3] ^= 0xa5;
    let mut garbage = quoted.to_vec();
    garbage[0] = 0x23; // version 2, IHL 3
    vec![
        Crafted {
            what: "echo request with a bad checksum",
            icmp: bad_sum,
        },
        Crafted {
            what: "port unreachable with a bad checksum",
            icmp: bad_sum_error,
        },
        Crafted {
            what: "truncated ICMP header (4 bytes)",
            icmp: vec![3, 3, 0xfc, 0xfc],
        },
        Crafted {
            what: "port unreachable quoting a truncated inner header (12 bytes)",
            icmp: icmp_message(3, 3, [0; 4], &quoted[..12]),
        },
        Crafted {
            what: "port unreachable quoting a garbage inner header",
            icmp: icmp_message(3, 3, [0; 4], &garbage[..28]),
        },
    ]
}

/// Sends `icmp` from `ns` to `dst` in one IPv4 packet with a raw socket
/// (source: the routing's choice).
pub fn send_raw_icmp(ns: &Netns, dst: Ipv4Addr, icmp: &[u8]) -> Result<()> {
    let packet = ipv4(Ipv4Addr::UNSPECIFIED, dst, libc::IPPROTO_ICMP as u8, icmp);
    nsthread::run_in(ns, "raw-send", THREAD_TIMEOUT, move || {
        // SAFETY: plain socket(2); the descriptor is owned right away.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
        ensure!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
        // SAFETY: fd is a fresh descriptor nobody else owns.
        let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        let addr = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes(dst.octets()),
            },
            sin_zero: [0; 8],
        };
        // SAFETY: the buffer and address are valid for the call.
        let n = unsafe {
            libc::sendto(
                std::os::fd::AsRawFd::as_raw_fd(&fd),
                packet.as_ptr().cast(),
                packet.len(),
                0,
                std::ptr::from_ref(&addr).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
        ensure!(
            n == packet.len() as isize,
            "raw sendto {dst}: {}",
            std::io::Error::last_os_error()
        );
        Ok(())
    })
}

/// Pings `198.51.100.2` once from the guest; fails unless the reply comes.
pub fn ping_still_works(topo: &Topology) -> Result<()> {
    let run = guest_ping(topo, &["-c", "1", "-W", "2", WORLD_ADDR])?;
    ensure!(
        run.code == Some(0),
        "ping {WORLD_ADDR} after malformed ICMP:\n{}",
        run.text
    );
    Ok(())
}

/// Messages between the test and the guest thread of the world-side run.
enum Step {
    /// Echo once more; no error may be pending.
    Echo,
    /// Expect `ECONNREFUSED` (the well-formed error was sent).
    Refused,
}

/// Malformed ICMP from the guest towards the world: for each of
/// [`malformed_set`] (quoting a datagram of a UDP flow from the world to
/// the guest), sends it from the guest to `198.51.100.2` and calls
/// `after_each(what)`; then the guest can still ping the world.
pub fn malformed_icmp_from_guest(
    topo: &Topology,
    port: u16,
    mut after_each: impl FnMut(&str) -> Result<()>,
) -> Result<()> {
    let world_end = SocketAddrV4::new(ip(WORLD_ADDR)?, port);
    let guest_end = SocketAddrV4::new(ip(DEFAULT_GUEST_ADDR)?, 40_000 + port % 1000);
    let quoted = udp_packet(world_end, guest_end, b"datagram from the world");
    for c in malformed_set(&quoted) {
        send_raw_icmp(topo.guest(), *world_end.ip(), &c.icmp)
            .with_context(|| format!("sending {}", c.what))?;
        after_each(c.what).with_context(|| format!("after the guest sent {}", c.what))?;
    }
    ping_still_works(topo)
}

/// Malformed ICMP from the world about a live UDP flow: the guest keeps a
/// connected socket to a world echo server at `198.51.100.2:port`; the
/// world sends each error of [`malformed_set`] (quoting the flow's datagram as
/// the world received it, from the NAT address) to the NAT address and
/// calls `after_each(what)`, after which the guest's echo must still work
/// with no error pending. Then the same port unreachable, well formed,
/// must reach the guest's socket as `ECONNREFUSED` (proving the crafting),
/// and the guest can still ping. Returns the NAT address the world saw.
pub fn malformed_icmp_from_world(
    topo: &Topology,
    port: u16,
    mut after_each: impl FnMut(&str) -> Result<()>,
) -> Result<SocketAddrV4> {
    let server = UdpEchoServer::start(topo.world(), world(port))?;
    let (step_tx, step_rx) = mpsc::channel::<Step>();
    let (done_tx, done_rx) = mpsc::channel::<Result<()>>();
    let guest = nsthread::spawn_in(topo.guest(), "guest", move || {
        let s = scenarios::udp_socket(world(port))?;
        scenarios::udp_echo(&s, b"open the flow")?;
        let _ = done_tx.send(Ok(()));
        while let Ok(step) = step_rx.recv_timeout(THREAD_TIMEOUT) {
            let result = match step {
                Step::Echo => scenarios::udp_echo(&s, b"still there?")
                    .context("echo after a malformed error (a socket error means it was taken)"),
                Step::Refused => {
                    let mut buf = [0u8; 64];
                    s.set_read_timeout(Some(ERROR_WAIT))?;
                    match s.recv(&mut buf) {
                        Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => Ok(()),
                        Err(e) if is_timeout(&e) => Err(anyhow::anyhow!(
                            "the well-formed port unreachable did not reach the guest's socket"
                        )),
                        other => Err(anyhow::anyhow!(
                            "want ECONNREFUSED after the well-formed error, got {other:?}"
                        )),
                    }
                }
            };
            let last = matches!(step, Step::Refused);
            let _ = done_tx.send(result);
            if last {
                break;
            }
        }
        Ok(())
    })?;
    let wait = |what: &str| -> Result<()> {
        done_rx
            .recv_timeout(THREAD_TIMEOUT)
            .with_context(|| format!("the guest thread did not answer ({what})"))?
    };
    wait("opening the flow")?;
    let peers = server.peers();
    let nat = match peers.iter().next() {
        Some(SocketAddr::V4(a)) if peers.len() == 1 => *a,
        _ => bail!("the echo server should have seen one IPv4 peer: {peers:?}"),
    };
    let world_end = SocketAddrV4::new(ip(WORLD_ADDR)?, port);
    let quoted = udp_packet(nat, world_end, b"open the flow");
    // An echo request to the host's address is the host's own business,
    // not a flow's: only the errors are sent from the world.
    for c in malformed_set(&quoted)
        .into_iter()
        .filter(|c| c.icmp[0] != ECHO_REQUEST)
    {
        send_raw_icmp(topo.world(), *nat.ip(), &c.icmp)
            .with_context(|| format!("sending {}", c.what))?;
        after_each(c.what).with_context(|| format!("after the world sent {}", c.what))?;
        let _ = step_tx.send(Step::Echo);
        wait(c.what).with_context(|| format!("after the world sent {}", c.what))?;
    }
    send_raw_icmp(
        topo.world(),
        *nat.ip(),
        &icmp_message(3, 3, [0; 4], &quoted),
    )?;
    let _ = step_tx.send(Step::Refused);
    wait("the well-formed port unreachable")?;
    guest.join(THREAD_TIMEOUT)?;
    ping_still_works(topo)?;
    Ok(nat)
}
