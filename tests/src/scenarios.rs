//! Traffic scenarios shared by the flow tests and their self-tests.
//!
//! # Theory of operation
//!
//! Each function here drives one piece of guest ↔ world traffic through
//! whatever connects the guest of a [`Topology`] to its world — tapgate in
//! `tests/tests/flows.rs`, or the kernel's own routing and NAT
//! ([`crate::GuestKind::KernelRouted`]) in `tests/tests/scenarios.rs`. The
//! kernel run proves the scenario itself right (a real NAT passes it), so a
//! failure against tapgate is tapgate's. Every scenario expects the guest
//! to have `10.0.2.15` and a default route already, starts its own servers
//! in the world namespace, bounds every wait, and returns an error that
//! says what was seen instead of what was expected.

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};

use crate::netns::Netns;
use crate::nsthread;
use crate::rawtcp::{self, Flags, Probe, Segment};
use crate::servers::{HttpServer, UdpEchoServer, serve_once};
use crate::topology::{DEFAULT_GUEST_ADDR, GUEST_IFACE, Topology, WORLD_ADDR};

/// Bound on connecting from the guest.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Socket read/write bound in the guest and world threads.
pub const IO_TIMEOUT: Duration = Duration::from_secs(20);
/// Bound on a guest or world helper thread.
pub const THREAD_TIMEOUT: Duration = Duration::from_secs(60);
/// Name of the nft table the scenarios add (in the guest or world).
pub const NFT_TABLE: &str = "tg_test";

/// `198.51.100.2:port`.
pub fn world(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::new(198, 51, 100, 2), port))
}

/// `len` bytes of a recognisable pattern (differs with `seed`).
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| ((i * 31 + usize::from(seed)) % 251) as u8)
        .collect()
}

/// Connects to `addr` (bounded) and sets the I/O timeouts.
pub fn connect(addr: SocketAddr) -> Result<TcpStream> {
    let s = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)
        .with_context(|| format!("connecting to {addr}"))?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(s)
}

/// Serves a 200 kB file with busybox httpd at `198.51.100.2:80` and
/// fetches it from the guest with `curl -sS --max-time 10`.
pub fn http_get(topo: &Topology) -> Result<()> {
    let content: Vec<u8> = (0..200_000u32)
        .map(|i| b"abcdefghijklmnopqrstuvwxyz0123456789\n"[(i % 37) as usize])
        .collect();
    let http = HttpServer::start(topo.world(), world(80), &[("file", &content)])?;
    let url = http.url("file");
    let out = topo.guest().output_timeout(
        &["curl", "-sS", "--max-time", "10", &url],
        Duration::from_secs(20),
    )?;
    ensure!(
        out.status.success(),
        "curl {url} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    ensure!(
        out.stdout == content,
        "curl {url}: got {} bytes, want {} (equal prefix: {})",
        out.stdout.len(),
        content.len(),
        out.stdout
            .iter()
            .zip(&content)
            .take_while(|(a, b)| a == b)
            .count()
    );
    Ok(())
}

/// The guest sends 300 kB and shuts down its sending side; only then does
/// the server answer with 1 MiB, which must arrive whole (data towards the
/// guest on a connection the guest half-closed).
pub fn half_close_guest_first(topo: &Topology, port: u16) -> Result<()> {
    half_close_guest_first_at(topo, world(port))
}

/// [`half_close_guest_first`] against a server at `at` (either family).
pub fn half_close_guest_first_at(topo: &Topology, at: SocketAddr) -> Result<()> {
    let request = pattern(300_000, 1);
    let response = pattern(1 << 20, 2);
    let (want_request, reply) = (request.clone(), response.clone());
    let server = serve_once(topo.world(), at, THREAD_TIMEOUT, move |mut s, _| {
        s.set_read_timeout(Some(IO_TIMEOUT))?;
        s.set_write_timeout(Some(IO_TIMEOUT))?;
        let mut got = Vec::new();
        s.read_to_end(&mut got)
            .context("server reading the request")?;
        ensure!(
            got == want_request,
            "server got {} request bytes, want {}",
            got.len(),
            want_request.len()
        );
        s.write_all(&reply)
            .context("server writing after the guest's FIN")?;
        Ok(())
    })?;
    let got = nsthread::run_in(topo.guest(), "guest", THREAD_TIMEOUT, move || {
        let mut s = connect(at)?;
        s.write_all(&request)?;
        s.shutdown(Shutdown::Write)?;
        let mut got = Vec::new();
        s.read_to_end(&mut got)
            .context("guest reading the response")?;
        Ok(got)
    });
    let server = server.join(THREAD_TIMEOUT);
    let got = got?;
    server?;
    ensure!(
        got == response,
        "guest got {} response bytes, want {}",
        got.len(),
        response.len()
    );
    Ok(())
}

/// The server sends 256 KiB and shuts down its sending side first; the
/// guest reads it all, then sends 512 KiB, which the server must receive
/// whole (data towards the world on a connection the world half-closed).
pub fn half_close_server_first(topo: &Topology, port: u16) -> Result<()> {
    half_close_server_first_at(topo, world(port))
}

/// [`half_close_server_first`] against a server at `at` (either family).
pub fn half_close_server_first_at(topo: &Topology, at: SocketAddr) -> Result<()> {
    let greeting = pattern(256 << 10, 3);
    let answer = pattern(512 << 10, 4);
    let to_send = greeting.clone();
    let server = serve_once(topo.world(), at, THREAD_TIMEOUT, move |mut s, _| {
        s.set_read_timeout(Some(IO_TIMEOUT))?;
        s.set_write_timeout(Some(IO_TIMEOUT))?;
        s.write_all(&to_send)?;
        s.shutdown(Shutdown::Write)?;
        let mut got = Vec::new();
        s.read_to_end(&mut got)
            .context("server reading after its FIN")?;
        Ok(got)
    })?;
    let reply = answer.clone();
    let got_greeting = nsthread::run_in(topo.guest(), "guest", THREAD_TIMEOUT, move || {
        let mut s = connect(at)?;
        let mut got = Vec::new();
        s.read_to_end(&mut got)
            .context("guest reading the greeting")?;
        s.write_all(&reply)
            .context("guest writing after the server's FIN")?;
        s.shutdown(Shutdown::Write)?;
        Ok(got)
    });
    let got_answer = server.join(THREAD_TIMEOUT);
    let got_greeting = got_greeting?;
    let got_answer = got_answer?;
    ensure!(
        got_greeting == greeting,
        "guest got {} greeting bytes, want {}",
        got_greeting.len(),
        greeting.len()
    );
    ensure!(
        got_answer == answer,
        "server got {} answer bytes, want {}",
        got_answer.len(),
        answer.len()
    );
    Ok(())
}

/// A connected UDP socket (in the calling thread's namespace).
pub fn udp_socket(to: SocketAddr) -> Result<UdpSocket> {
    let s = UdpSocket::bind(if to.is_ipv6() { "[::]:0" } else { "0.0.0.0:0" })?;
    s.connect(to)?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    Ok(s)
}

fn is_timeout(e: &std::io::Error) -> bool {
    matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)
}

/// Sends `data` and waits for the same bytes back (three tries of 2 s).
pub fn udp_echo(s: &UdpSocket, data: &[u8]) -> Result<()> {
    let mut buf = vec![0u8; 65536];
    for _ in 0..3 {
        s.send(data)?;
        match s.recv(&mut buf) {
            Ok(n) if buf[..n] == *data => return Ok(()),
            Ok(n) => bail!(
                "echo of {} bytes came back as {n} different bytes",
                data.len()
            ),
            Err(e) if is_timeout(&e) => {}
            Err(e) => return Err(e).context("recv"),
        }
    }
    bail!("no echo for a {}-byte datagram after 3 tries", data.len())
}

/// What [`udp_round_trips`] saw.
#[derive(Debug, Clone)]
pub struct UdpOutcome {
    /// The guest socket's address.
    pub guest: SocketAddr,
    /// The senders the world server saw (the NAT address).
    pub world_peers: Vec<SocketAddr>,
}

/// Against a UDP echo server at `198.51.100.2:port`: datagrams of 1, 100,
/// 1000 and 1472 bytes (1452 over IPv6) come back; then `push 5` makes the server send five
/// datagrams of its own, which must all reach the guest.
pub fn udp_round_trips(topo: &Topology, port: u16) -> Result<UdpOutcome> {
    udp_round_trips_at(topo, world(port))
}

/// [`udp_round_trips`] against a server at `at` (either family).
pub fn udp_round_trips_at(topo: &Topology, at: SocketAddr) -> Result<UdpOutcome> {
    let server = UdpEchoServer::start(topo.world(), at)?;
    let guest = nsthread::run_in(topo.guest(), "guest", THREAD_TIMEOUT, move || {
        let s = udp_socket(at)?;
        // The largest datagram that fits the guest's MTU unfragmented.
        let max = if at.is_ipv6() { 1500 - 48 } else { 1500 - 28 };
        for len in [1, 100, 1000, max] {
            udp_echo(&s, &pattern(len, 5))?;
        }
        s.send(b"push 5")?;
        let mut got = Vec::new();
        let mut buf = [0u8; 64];
        let deadline = Instant::now() + Duration::from_secs(5);
        while got.len() < 6 && Instant::now() < deadline {
            match s.recv(&mut buf) {
                Ok(n) => got.push(String::from_utf8_lossy(&buf[..n]).into_owned()),
                Err(e) if is_timeout(&e) => {}
                Err(e) => return Err(e).context("recv"),
            }
        }
        got.sort();
        let want = ["push 5", "push-1", "push-2", "push-3", "push-4", "push-5"];
        ensure!(
            got == want,
            "world → guest datagrams: got {got:?}, want {want:?}"
        );
        Ok(s.local_addr()?)
    })?;
    Ok(UdpOutcome {
        guest,
        world_peers: server.peers().into_iter().collect(),
    })
}

/// Empty datagrams echo as empty datagrams (and do not break the flow).
pub fn udp_empty_datagrams(topo: &Topology, port: u16) -> Result<()> {
    udp_empty_datagrams_at(topo, world(port))
}

/// [`udp_empty_datagrams`] against a server at `at` (either family).
pub fn udp_empty_datagrams_at(topo: &Topology, at: SocketAddr) -> Result<()> {
    let server = UdpEchoServer::start(topo.world(), at)?;
    nsthread::run_in(topo.guest(), "guest", THREAD_TIMEOUT, move || {
        let s = udp_socket(at)?;
        udp_echo(&s, b"").context("empty datagram")?;
        udp_echo(&s, b"x").context("datagram after an empty one")?;
        udp_echo(&s, b"").context("second empty datagram")
    })?;
    ensure!(
        server.datagrams() >= 3,
        "server saw {} datagrams",
        server.datagrams()
    );
    Ok(())
}

/// `dig +short @server name A` in the guest; returns the trimmed answer.
pub fn dig(topo: &Topology, server: &str, name: &str) -> Result<String> {
    let at = format!("@{server}");
    let out = topo
        .guest()
        .stdout(&["dig", "+short", "+time=2", "+tries=2", &at, name, "A"])?;
    Ok(out.trim().to_owned())
}

/// Adds table [`NFT_TABLE`] to `ns` with a chain `chain` on `hook`
/// (`output` or `input`) holding one counting rule `rule` (e.g. `tcp dport
/// 80 counter`).
pub fn nft_rule(ns: &Netns, hook: &str, rule: &str) -> Result<()> {
    ns.run(&["nft", "add", "table", "inet", NFT_TABLE])?;
    ns.run(&[
        "nft",
        &format!(
            "add chain inet {NFT_TABLE} {hook} {{ type filter hook {hook} priority 0; policy accept; }}"
        ),
    ])?;
    ns.run(&["nft", &format!("add rule inet {NFT_TABLE} {hook} {rule}")])?;
    Ok(())
}

/// Packets counted by the (first) rule of chain `hook` of [`NFT_TABLE`].
pub fn nft_counter(ns: &Netns, hook: &str) -> Result<u64> {
    let text = ns.stdout(&["nft", "list", "chain", "inet", NFT_TABLE, hook])?;
    text.split_whitespace()
        .skip_while(|w| *w != "packets")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("no counter in:\n{text}"))
}

/// Drops, in the guest, every pure ACK to `198.51.100.2:port` (counted).
pub fn drop_guest_pure_acks(topo: &Topology, port: u16) -> Result<()> {
    nft_rule(
        topo.guest(),
        "output",
        &format!(
            "oifname \"{GUEST_IFACE}\" ip daddr {WORLD_ADDR} tcp dport {port} \
             tcp flags == ack counter drop"
        ),
    )
}

/// A probe from the guest (`10.0.2.15`, a port no socket uses) to
/// `198.51.100.2:80`.
pub fn probe(
    topo: &Topology,
    gateway_mac: [u8; 6],
    seq: u32,
    ack: u32,
    flags: Flags,
    payload: &[u8],
) -> Result<Probe> {
    let src_port = 40000 + (std::process::id() % 20000) as u16;
    Ok(Probe {
        src_mac: rawtcp::iface_mac(topo.guest(), GUEST_IFACE)?,
        dst_mac: gateway_mac,
        src: SocketAddrV4::new(DEFAULT_GUEST_ADDR.parse()?, src_port),
        dst: SocketAddrV4::new(WORLD_ADDR.parse()?, 80),
        seq,
        ack,
        flags,
        payload: payload.to_vec(),
    })
}

fn first_rst(seen: &[Segment]) -> Option<&Segment> {
    seen.iter().find(|s| s.flags.rst)
}

/// Segments that belong to no connection, sent from the guest with raw
/// frames to `gateway_mac`, get the RFC 9293 §3.10.7.1 answers: an ACK
/// (with or without data) gets `<SEQ=SEG.ACK><CTL=RST>`, a segment without
/// ACK gets `<SEQ=0><ACK=SEG.SEQ+SEG.LEN><CTL=RST,ACK>`, an RST gets
/// nothing. `with_non_ack` includes the segment without ACK (the kernel
/// peer cannot: conntrack declares it invalid and does not NAT it).
pub fn unknown_segments_get_rsts(
    topo: &Topology,
    gateway_mac: [u8; 6],
    with_non_ack: bool,
) -> Result<()> {
    let listen = Duration::from_secs(3);
    let ack = Flags {
        ack: true,
        ..Flags::default()
    };
    for payload in [&b""[..], b"hello"] {
        let flags = Flags {
            psh: !payload.is_empty(),
            ..ack
        };
        let p = probe(topo, gateway_mac, 1000, 5000, flags, payload)?;
        let seen = rawtcp::exchange(topo.guest(), GUEST_IFACE, &p, listen)?;
        let rst = first_rst(&seen).with_context(|| {
            format!(
                "no RST for an ACK segment ({} bytes) of no connection; seen {seen:?}",
                payload.len()
            )
        })?;
        ensure!(
            rst.seq == 5000 && !rst.flags.ack && rst.src == p.dst,
            "RST should be <SEQ=5000><CTL=RST> from {}: {rst:?}",
            p.dst
        );
    }
    if with_non_ack {
        let flags = Flags {
            psh: true,
            ..Flags::default()
        };
        let p = probe(topo, gateway_mac, 7000, 0, flags, b"x")?;
        let seen = rawtcp::exchange(topo.guest(), GUEST_IFACE, &p, listen)?;
        let rst = first_rst(&seen).with_context(|| {
            format!("no RST for a non-ACK segment of no connection; seen {seen:?}")
        })?;
        ensure!(
            rst.seq == 0 && rst.flags.ack && rst.ack == 7001,
            "RST should be <SEQ=0><ACK=7001><CTL=RST,ACK>: {rst:?}"
        );
    }
    let flags = Flags {
        rst: true,
        ..Flags::default()
    };
    let p = probe(topo, gateway_mac, 5000, 0, flags, b"")?;
    let seen = rawtcp::exchange(topo.guest(), GUEST_IFACE, &p, Duration::from_millis(1500))?;
    ensure!(seen.is_empty(), "an RST was answered: {seen:?}");
    Ok(())
}
