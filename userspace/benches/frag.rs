//! Fragmentation benchmark: how long [`Reassembler::push`] takes to put an
//! 8 KiB UDP datagram back together from its 6 fragments (MTU 1500), and
//! how long [`fragment`] takes to cut it.
//!
//! # Theory of operation
//!
//! Pure CPU work, no kernel, no root. 1024 datagrams (8192 bytes of UDP
//! payload, distinct identifications) are built and fragmented once; the
//! timed loops then cycle through them for 200k datagrams each:
//! * **in order** — each datagram's fragments pushed one after the other;
//! * **interleaved** — 32 datagrams in progress at once, their fragments
//!   pushed round-robin and in reverse order within each datagram (the
//!   pieces are inserted in front rather than appended);
//! * **fragment** — [`fragment`] on the whole datagram.
//!
//! Every completed datagram is checked against the original's length, so
//! the loop cannot be optimised into nothing. Gbit/s counts the
//! reassembled IPv4 datagram (8220 bytes). Output: one line per loop; an
//! optional plain-number argument changes the datagram count.

use std::{hint::black_box, net::Ipv4Addr, time::Instant};

use anyhow::{Result, ensure};
use smoltcp::wire::{IPV4_HEADER_LEN, IpProtocol, Ipv4Packet};
use tapgate::frag::{FragOutcome, Reassembler, ReassemblyLimits, fragment};

/// UDP payload per datagram.
const PAYLOAD: usize = 8192;
/// UDP header.
const UDP_HEADER_LEN: usize = 8;
const MTU: usize = 1500;
/// Distinct datagrams built up front.
const DISTINCT: usize = 1024;
/// Datagrams in progress at once in the interleaved loop.
const IN_FLIGHT: usize = 32;

/// An IPv4/UDP datagram with `PAYLOAD` bytes (the UDP header is not filled
/// in: only the IP layer is looked at).
fn datagram(ident: u16) -> Vec<u8> {
    let len = IPV4_HEADER_LEN + UDP_HEADER_LEN + PAYLOAD;
    let mut buf: Vec<u8> = (0..len).map(|i| (i * 31) as u8).collect();
    let mut p = Ipv4Packet::new_unchecked(&mut buf[..]);
    p.set_version(4);
    p.set_header_len(IPV4_HEADER_LEN as u8);
    p.set_dscp(0);
    p.set_ecn(0);
    p.set_total_len(len as u16);
    p.set_ident(ident);
    p.clear_flags();
    p.set_frag_offset(0);
    p.set_hop_limit(64);
    p.set_next_header(IpProtocol::Udp);
    p.set_src_addr(Ipv4Addr::new(10, 0, 2, 15));
    p.set_dst_addr(Ipv4Addr::new(192, 0, 2, 1));
    p.fill_checksum();
    buf
}

fn report(what: &str, n: usize, secs: f64, bytes: usize) {
    let ns = secs * 1e9 / n as f64;
    let gbits = (n * bytes * 8) as f64 / secs / 1e9;
    println!("frag: {what}: {ns:.0} ns/datagram, {gbits:.1} Gbit/s");
}

fn main() -> Result<()> {
    let n: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(200_000);
    let originals: Vec<Vec<u8>> = (0..DISTINCT).map(|i| datagram(i as u16)).collect();
    let frags = originals
        .iter()
        .map(|d| fragment(d, MTU))
        .collect::<Result<Vec<_>, _>>()?;
    ensure!(frags.iter().all(|f| f.len() == 6), "not 6 fragments each");
    let whole = originals[0].len();

    // In order.
    let mut r = Reassembler::new(ReassemblyLimits::default());
    let now = Instant::now();
    let t = Instant::now();
    let mut complete = 0usize;
    for i in 0..n {
        for f in &frags[i % DISTINCT] {
            if let FragOutcome::Complete(p) = r.push(black_box(f), now) {
                ensure!(p.len() == whole, "wrong length");
                complete += 1;
            }
        }
    }
    let secs = t.elapsed().as_secs_f64();
    ensure!(complete == n, "{complete} of {n} datagrams completed");
    report(
        &format!("reassemble {PAYLOAD}-byte datagrams (6 fragments, in order)"),
        n,
        secs,
        whole,
    );

    // Interleaved, reverse order within each datagram.
    let mut r = Reassembler::new(ReassemblyLimits::default());
    let t = Instant::now();
    let mut complete = 0usize;
    let mut base = 0;
    while base < n {
        let batch = IN_FLIGHT.min(n - base);
        for k in (0..6).rev() {
            for j in 0..batch {
                let f = &frags[(base + j) % DISTINCT][k];
                if let FragOutcome::Complete(p) = r.push(black_box(f), now) {
                    ensure!(p.len() == whole, "wrong length");
                    complete += 1;
                }
            }
        }
        base += batch;
    }
    let secs = t.elapsed().as_secs_f64();
    ensure!(complete == n, "{complete} of {n} datagrams completed");
    report(
        &format!(
            "reassemble {PAYLOAD}-byte datagrams (6 fragments, {IN_FLIGHT} interleaved, reversed)"
        ),
        n,
        secs,
        whole,
    );

    // Fragmenting.
    let t = Instant::now();
    let mut pieces = 0usize;
    for i in 0..n {
        pieces += black_box(fragment(black_box(&originals[i % DISTINCT]), MTU)?).len();
    }
    let secs = t.elapsed().as_secs_f64();
    ensure!(pieces == 6 * n, "wrong fragment count");
    report(
        &format!("fragment {PAYLOAD}-byte datagrams (MTU {MTU}, 6 fragments)"),
        n,
        secs,
        whole,
    );
    Ok(())
}
