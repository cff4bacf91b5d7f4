//! Rewriting a packet for the other side: addresses, ports, TTL or hop
//! limit, MACs.
//!
//! # Theory of operation
//!
//! [`rewrite`] changes the addresses the way of the packet's family, then
//! the ports (or the echo identifier) and the TTL / hop limit. Every field
//! change goes through the kernel's incremental checksum helpers:
//! `bpf_l3_csum_replace` for the IPv4 header and `bpf_l4_csum_replace` for
//! TCP/UDP/ICMPv6, with `BPF_F_PSEUDO_HDR` for address changes (they are
//! part of the pseudo-header). The helpers know about `CHECKSUM_PARTIAL`
//! skbs — a TSO/GSO super-packet from a virtio or veth guest carries only
//! the pseudo-header sum, which they adjust correctly — and
//! `BPF_F_MARK_MANGLED_0` keeps a UDP checksum of zero ("none") zero.
//! Only fields that actually change are touched.
//!
//! IPv4 addresses are 4 bytes, replaced in one helper call per checksum.
//! IPv6 has no header checksum; an address is 16 bytes, too wide for the
//! helper's `from`/`to`, so `bpf_csum_diff` sums old and new and the
//! difference goes to `bpf_l4_csum_replace` (size 0 = "`to` is a
//! difference"). On Linux 6.16 and later that call also carries
//! `BPF_F_IPV6` ([`TG_L4_CSUM_IPV6`], set by the loader): without it the
//! kernel adjusts `skb->csum` of a `CHECKSUM_COMPLETE` packet as if an
//! IPv4 header checksum had absorbed the address change, which corrupts it
//! for IPv6 (kernel commit "bpf: Fix L4 csum update on IPv6 in
//! CHECKSUM_COMPLETE"); older kernels refuse the flag. The hop limit is
//! covered by no checksum, only by a `CHECKSUM_COMPLETE` packet's
//! `skb->csum`, which `BPF_F_RECOMPUTE_CSUM` on the store keeps right.
//! (`tests/tests/kernel_fixtures.rs` checks `skb->csum` of
//! `CHECKSUM_COMPLETE` skbs for every rewrite.) The one rewrite that
//! leaves it stale: a UDP datagram without checksum (0) whose ports
//! change — `BPF_F_MARK_MANGLED_0` leaves the zero and `skb->csum` alone.
//! Harmless where packets go (a device's egress ignores `skb->csum`; the
//! guest's frames redirected into loopback are not `CHECKSUM_COMPLETE`).
//!
//! ICMP echo differs: its one "port" is the identifier at offset 4 of the
//! ICMP header — the source port of a request (towards the world) and the
//! destination port of a reply (towards the guest) in the flow entry's
//! terms. ICMPv4's checksum has no pseudo-header, so address changes touch
//! only the IPv4 header checksum; ICMPv6's has one (RFC 4443 §2.3), so
//! address changes go into it as into TCP's and UDP's.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, BPF_F_RECOMPUTE_CSUM},
    helpers::bpf_csum_diff,
    programs::TcContext,
};
use datapath_common::{FlowEntry, PROTO_UDP, ipv4_from_16};

use crate::parse::{
    Family, IP_CSUM_OFF, IP_DST_OFF, IP_SRC_OFF, IP_TTL_OFF, IP6_DST_OFF, IP6_HOP_LIMIT_OFF,
    IP6_SRC_OFF, Packet,
};

/// `BPF_F_IPV6` (`linux/bpf.h`, Linux 6.16): `bpf_l4_csum_replace` on an
/// IPv6 packet; not in aya-ebpf's bindings yet.
const BPF_F_IPV6: u64 = 1 << 7;

/// Whether the kernel takes [`BPF_F_IPV6`] (Linux ≥ 6.16): nonzero to pass
/// it. A read-only global the loader overrides before loading
/// (`EbpfLoader::override_global`); 0 (leave the flag out) by default.
#[unsafe(no_mangle)]
static TG_L4_CSUM_IPV6: u8 = 0;

/// The extra `bpf_l4_csum_replace` flag for IPv6 address changes.
#[inline(always)]
fn l4_csum_ipv6_flag() -> u64 {
    // SAFETY: a plain read of a static; volatile so that the compiler does
    // not fold the default value the loader replaces.
    if unsafe { core::ptr::read_volatile(&raw const TG_L4_CSUM_IPV6) } != 0 {
        BPF_F_IPV6
    } else {
        0
    }
}

/// Error from a checksum or store helper (the packet may be half-written
/// and must be dropped).
pub struct RewriteError;

#[inline(always)]
fn ok(rc: Result<(), i64>) -> Result<(), RewriteError> {
    rc.map_err(|_| RewriteError)
}

/// Replaces a 4-byte IPv4 address at `off` and fixes both checksums.
#[inline(always)]
fn set_addr4(
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
    if p.l4_csum_has_pseudo_hdr() {
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

/// Replaces a 16-byte IPv6 address at `off` and fixes the transport
/// checksum (TCP, UDP and ICMPv6 all cover the pseudo-header).
#[inline(always)]
fn set_addr6(
    ctx: &TcContext,
    p: &Packet,
    off: usize,
    old: [u8; 16],
    new: [u8; 16],
    l4_flags: u64,
) -> Result<(), RewriteError> {
    if old == new {
        return Ok(());
    }
    let (mut from, mut to) = (old, new);
    // SAFETY: both buffers are 16 bytes of initialised stack memory, the
    // sizes given (multiples of 4, as the helper wants).
    let diff =
        unsafe { bpf_csum_diff(from.as_mut_ptr().cast(), 16, to.as_mut_ptr().cast(), 16, 0) };
    if diff < 0 {
        return Err(RewriteError);
    }
    ok(ctx.l4_csum_replace(
        p.l4_csum_off(),
        0,
        diff as u64,
        l4_flags | BPF_F_PSEUDO_HDR as u64 | l4_csum_ipv6_flag(),
    ))?;
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

/// The addresses of an IPv4 packet.
#[inline(always)]
fn ipv4_addrs(
    ctx: &TcContext,
    p: &Packet,
    e: &FlowEntry,
    l4_flags: u64,
) -> Result<(), RewriteError> {
    let (src, dst) = (ipv4_from_16(&p.src), ipv4_from_16(&p.dst));
    set_addr4(ctx, p, IP_SRC_OFF, src, ipv4_from_16(&e.new_src), l4_flags)?;
    set_addr4(ctx, p, IP_DST_OFF, dst, ipv4_from_16(&e.new_dst), l4_flags)
}

/// The addresses of an IPv6 packet.
#[inline(always)]
fn ipv6_addrs(
    ctx: &TcContext,
    p: &Packet,
    e: &FlowEntry,
    l4_flags: u64,
) -> Result<(), RewriteError> {
    set_addr6(ctx, p, IP6_SRC_OFF, p.src, e.new_src, l4_flags)?;
    set_addr6(ctx, p, IP6_DST_OFF, p.dst, e.new_dst, l4_flags)
}

/// The ports, or an echo message's identifier.
#[inline(always)]
fn ports(ctx: &TcContext, p: &Packet, e: &FlowEntry, l4_flags: u64) -> Result<(), RewriteError> {
    if p.is_icmp() {
        // The identifier: a request's "source port", a reply's
        // "destination port" (the other one is zero in both). It is not
        // part of the pseudo-header.
        let (old, new) = if p.is_echo_request() {
            (p.sport, e.new_sport)
        } else {
            (p.dport, e.new_dport)
        };
        return set_port(ctx, p, p.l4_off + 4, old, new.to_be_bytes(), 0);
    }
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
    )
}

/// Decrements the IPv4 TTL (the caller has checked it is above 1).
#[inline(always)]
fn ipv4_ttl(ctx: &TcContext, p: &Packet) -> Result<(), RewriteError> {
    // TTL and protocol share a 16-bit checksum word.
    let old = u16::from_ne_bytes([p.ttl, p.proto]) as u64;
    let new = u16::from_ne_bytes([p.ttl - 1, p.proto]) as u64;
    ok(ctx.l3_csum_replace(IP_CSUM_OFF, old, new, 2))?;
    ok(ctx.store(IP_TTL_OFF, &(p.ttl - 1), 0))
}

/// Decrements the IPv6 hop limit (the caller has checked it is above 1).
/// No header checksum covers it; the store keeps a `CHECKSUM_COMPLETE`
/// packet's `skb->csum` right.
#[inline(always)]
fn ipv6_hop_limit(ctx: &TcContext, p: &Packet) -> Result<(), RewriteError> {
    ok(ctx.store(IP6_HOP_LIMIT_OFF, &(p.ttl - 1), BPF_F_RECOMPUTE_CSUM as u64))
}

/// Applies the entry's rewrite to the packet and decrements the TTL or
/// hop limit (the caller has checked it is above 1).
#[inline(always)]
pub fn rewrite(ctx: &TcContext, p: &Packet, e: &FlowEntry) -> Result<(), RewriteError> {
    // UDP's zero checksum means "none" (IPv4; invalid in IPv6, where it
    // stays as invalid as the sender made it).
    let l4_flags = if p.proto == PROTO_UDP {
        BPF_F_MARK_MANGLED_0 as u64
    } else {
        0
    };
    match p.family {
        Family::V4 => ipv4_addrs(ctx, p, e, l4_flags)?,
        Family::V6 => ipv6_addrs(ctx, p, e, l4_flags)?,
    }
    ports(ctx, p, e, l4_flags)?;
    match p.family {
        Family::V4 => ipv4_ttl(ctx, p),
        Family::V6 => ipv6_hop_limit(ctx, p),
    }
}

/// Writes the Ethernet addresses of a frame for the guest.
#[inline(always)]
pub fn set_macs(ctx: &TcContext, e: &FlowEntry) -> Result<(), RewriteError> {
    let mut macs = [0u8; 12];
    macs[..6].copy_from_slice(&e.eth_dst);
    macs[6..].copy_from_slice(&e.eth_src);
    ok(ctx.store(0, &macs, 0))
}
