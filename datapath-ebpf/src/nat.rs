//! Rewriting a packet for the other side: addresses, ports, TTL, MACs.
//!
//! # Theory of operation
//!
//! Every field change goes through the kernel's incremental checksum
//! helpers: `bpf_l3_csum_replace` for the IPv4 header and
//! `bpf_l4_csum_replace` for TCP/UDP, with `BPF_F_PSEUDO_HDR` for address
//! changes (they are part of the pseudo-header). The helpers know about
//! `CHECKSUM_PARTIAL` skbs — a TSO/GSO super-packet from a virtio or veth
//! guest carries only the pseudo-header sum, which they adjust correctly —
//! and `BPF_F_MARK_MANGLED_0` keeps a UDP checksum of zero ("none") zero.
//! Only fields that actually change are touched.
//!
//! ICMP echo differs in two ways: its checksum has no pseudo-header, so
//! address changes touch only the IPv4 header checksum, and its one "port"
//! is the identifier at offset 4 of the ICMP header — the source port of a
//! request (towards the world) and the destination port of a reply
//! (towards the guest) in the flow entry's terms.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::TcContext,
};
use datapath_common::{FlowEntry, ipv4_from_16};

use crate::parse::{ICMP_ECHO_REQUEST, IP_CSUM_OFF, IP_DST_OFF, IP_SRC_OFF, IP_TTL_OFF, Packet};

/// Error from a checksum or store helper (the packet may be half-written
/// and must be dropped).
pub struct RewriteError;

#[inline(always)]
fn ok(rc: Result<(), i64>) -> Result<(), RewriteError> {
    rc.map_err(|_| RewriteError)
}

/// Replaces a 4-byte address at `off` and fixes both checksums.
#[inline(always)]
fn set_addr(
    ctx: &TcContext,
    p: &Packet,
    off: usize,
    old: [u8; 4],
    new: [u8; 4],
    l4_flags: u64,
) -> Result<(), RewriteError> {
    if old == new {
        return Ok(());
    }
    let (from, to) = (
        u32::from_ne_bytes(old) as u64,
        u32::from_ne_bytes(new) as u64,
    );
    if !p.is_icmp() {
        ok(ctx.l4_csum_replace(
            p.l4_csum_off(),
            from,
            to,
            l4_flags | BPF_F_PSEUDO_HDR as u64 | 4,
        ))?;
    }
    ok(ctx.l3_csum_replace(IP_CSUM_OFF, from, to, 4))?;
    ok(ctx.store(off, &new, 0))
}

/// Replaces a 2-byte port at `off` and fixes the transport checksum.
#[inline(always)]
fn set_port(
    ctx: &TcContext,
    p: &Packet,
    off: usize,
    old: [u8; 2],
    new: [u8; 2],
    l4_flags: u64,
) -> Result<(), RewriteError> {
    if old == new {
        return Ok(());
    }
    let (from, to) = (
        u16::from_ne_bytes(old) as u64,
        u16::from_ne_bytes(new) as u64,
    );
    ok(ctx.l4_csum_replace(p.l4_csum_off(), from, to, l4_flags | 2))?;
    ok(ctx.store(off, &new, 0))
}

/// Applies the entry's rewrite to the packet and decrements the TTL
/// (the caller has checked it is above 1).
#[inline(always)]
pub fn rewrite(ctx: &TcContext, p: &Packet, e: &FlowEntry) -> Result<(), RewriteError> {
    let l4_flags = if p.is_tcp() {
        0
    } else {
        BPF_F_MARK_MANGLED_0 as u64
    };
    set_addr(
        ctx,
        p,
        IP_SRC_OFF,
        p.ip.src,
        ipv4_from_16(&e.new_src),
        l4_flags,
    )?;
    set_addr(
        ctx,
        p,
        IP_DST_OFF,
        p.ip.dst,
        ipv4_from_16(&e.new_dst),
        l4_flags,
    )?;
    if p.is_icmp() {
        // The identifier: a request's "source port", a reply's
        // "destination port" (the other one is zero in both).
        let (old, new) = if p.icmp_type == ICMP_ECHO_REQUEST {
            (p.sport, e.new_sport)
        } else {
            (p.dport, e.new_dport)
        };
        set_port(ctx, p, p.l4_off + 4, old, new.to_be_bytes(), 0)?;
    } else {
        set_port(
            ctx,
            p,
            p.l4_off,
            p.sport,
            e.new_sport.to_be_bytes(),
            l4_flags,
        )?;
        set_port(
            ctx,
            p,
            p.l4_off + 2,
            p.dport,
            e.new_dport.to_be_bytes(),
            l4_flags,
        )?;
    }
    // TTL and protocol share a 16-bit checksum word.
    let old = u16::from_ne_bytes([p.ip.ttl, p.ip.proto]) as u64;
    let new = u16::from_ne_bytes([p.ip.ttl - 1, p.ip.proto]) as u64;
    ok(ctx.l3_csum_replace(IP_CSUM_OFF, old, new, 2))?;
    ok(ctx.store(IP_TTL_OFF, &(p.ip.ttl - 1), 0))
}

/// Writes the Ethernet addresses of a frame for the guest.
#[inline(always)]
pub fn set_macs(ctx: &TcContext, e: &FlowEntry) -> Result<(), RewriteError> {
    let mut macs = [0u8; 12];
    macs[..6].copy_from_slice(&e.eth_dst);
    macs[6..].copy_from_slice(&e.eth_src);
    ok(ctx.store(0, &macs, 0))
}
