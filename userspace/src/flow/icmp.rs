//! ICMP in the flow manager: echo flows, error translation both ways, the
//! errors the gateway synthesizes, their rate limit and their counters.
//!
//! # Theory of operation
//!
//! * **Echo.** An echo request from the guest to an allowed destination
//!   opens a flow like a first UDP datagram does: the identifier is the
//!   "port" (a request's source port, a reply's destination port, so the
//!   reply's key mirrors the request's), NATed to an identifier reserved
//!   on the host ([`super::ports`]). The flow is installed `Established`;
//!   the kernel carries the following requests and every reply, and the
//!   flow expires by silence with the UDP timeout. Echo to the gateway's
//!   own addresses never gets here: the gateway's services answer it.
//! * **Errors from the world.** The uplink program punts an ICMP error
//!   (destination unreachable, time exceeded, parameter problem) when the
//!   packet it quotes belongs to a flow ([`datapath_common::PuntReason::IcmpError`]).
//!   The quote is a packet we sent, `nat → world`; the flow is found by
//!   its mirror image, exactly as the kernel found it. [`translate_error`]
//!   rewrites the outer header (to the guest; from the flow's remote when
//!   the world host itself complains, else from the router that did) and
//!   the quote (back to `guest → remote`, as the guest sent it), fixing
//!   the quoted IPv4 header's checksum, the quoted transport checksum
//!   incrementally (RFC 1624: the quote holds only part of the datagram,
//!   but the checksum covers all of it, so only the difference can be
//!   applied), the ICMP checksum and the outer checksum. The rest of the
//!   message — type, code, the next-hop MTU of "fragmentation needed" —
//!   passes unchanged. The guest's socket then sees the error as if it
//!   came straight from the network (`ECONNREFUSED`, PMTU, ...).
//! * **Errors from the guest** about a flow (a port unreachable for a
//!   datagram the world sent through a forward, say) are the mirror image:
//!   outer from the NAT address to the world host, quote back to `world →
//!   nat`.
//! * **Synthesis.** The gateway answers as a router would: time exceeded
//!   when a guest packet's TTL runs out here (and for a world packet whose
//!   TTL would run out on its way to the guest, from the NAT address);
//!   fragmentation needed, with the MTU, for a DF packet larger than the
//!   uplink (or, towards the world, the tap); net/host unreachable or
//!   administratively prohibited as the host's own route lookup refuses a
//!   destination; administratively prohibited for destinations the policy
//!   denies; port unreachable for UDP to a gateway port nothing serves.
//!   Quotes follow the passt seed: the offending header and its first 8
//!   payload bytes (RFC 792). Never an error about an ICMP error, a
//!   broadcast or multicast, or a later fragment (RFC 1122 §3.2.2).
//!   ICMPv6 (RFC 4443): the same kinds as ICMPv6 types and codes, the
//!   quote as much of the packet as keeps the error within 1280 bytes,
//!   Packet Too Big instead of fragmentation needed (IPv6 is never
//!   fragmented on the way); errors from the world and the guest are
//!   translated by [`translate_error`] for both families.
//! * **Rate limit.** Synthesized errors share one token bucket (like
//!   Linux's `icmp_msgs_per_sec` / `icmp_msgs_burst`): a guest flooding
//!   oversized or TTL-1 packets costs at most that many replies. What it
//!   suppresses is counted.
//! * **Counters** by message kind ([`IcmpKind`]) and direction, reported
//!   as the `icmp` object of `tapgate stats --json`.
//!
//! Everything is parsed with checked views; a malformed message (bad
//! checksum, truncated header or quote) is dropped and counted, never
//! forwarded.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6},
    time::Instant,
};

use datapath_common::{FlowState, PROTO_ICMP, PROTO_TCP, PROTO_UDP};
use log::debug;
use smoltcp::wire::{
    EthernetAddress, IPV4_HEADER_LEN, IPV6_HEADER_LEN, Icmpv4DstUnreachable, Icmpv4Packet,
    Icmpv6Packet, Ipv4Packet, Ipv6Packet,
};

use super::{
    DropReason, FlowManager, FlowMaps, NatPorts, Output,
    packet::{
        self, ICMP_DEST_UNREACH, ICMP_ECHO_REPLY, ICMP_ECHO_REQUEST, ICMP_HEADER_LEN,
        ICMP_PARAM_PROBLEM, ICMP_TIME_EXCEEDED, ICMPV6_ECHO_REQUEST, IcmpError, IcmpMsg,
        PROTO_ICMPV6, Packet, PacketError,
    },
    policy::{Denial, Verdict},
    store::{lo_key, tap_key, uplink_key},
};

/// Synthesized ICMP messages allowed per second (Linux's default).
pub const ICMP_RATE: u32 = 1000;
/// Burst of synthesized ICMP messages allowed at once (Linux's default).
pub const ICMP_BURST: u32 = 50;

/// What an ICMP message is, for the counters.
#[repr(usize)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IcmpKind {
    /// Echo request.
    EchoRequest = 0,
    /// Echo reply.
    EchoReply,
    /// Destination unreachable: net (code 0).
    NetUnreachable,
    /// Destination unreachable: host (code 1).
    HostUnreachable,
    /// Destination unreachable: protocol (code 2).
    ProtocolUnreachable,
    /// Destination unreachable: port (code 3).
    PortUnreachable,
    /// Destination unreachable: fragmentation needed and DF set (code 4).
    FragNeeded,
    /// Destination unreachable: administratively prohibited (codes 9, 10, 13).
    AdminProhibited,
    /// Destination unreachable with another code.
    UnreachableOther,
    /// Time exceeded in transit (type 11 code 0).
    TimeExceeded,
    /// Fragment reassembly time exceeded (type 11 code 1).
    ReassemblyTimeout,
    /// Parameter problem.
    ParamProblem,
    /// Any other type.
    Other,
}

impl IcmpKind {
    /// All kinds, in counter order.
    pub const ALL: [IcmpKind; 13] = [
        Self::EchoRequest,
        Self::EchoReply,
        Self::NetUnreachable,
        Self::HostUnreachable,
        Self::ProtocolUnreachable,
        Self::PortUnreachable,
        Self::FragNeeded,
        Self::AdminProhibited,
        Self::UnreachableOther,
        Self::TimeExceeded,
        Self::ReassemblyTimeout,
        Self::ParamProblem,
        Self::Other,
    ];

    /// The kind of a message of type `ty` and code `code`.
    pub fn of(ty: u8, code: u8) -> Self {
        match (ty, code) {
            (ICMP_ECHO_REQUEST, _) => Self::EchoRequest,
            (ICMP_ECHO_REPLY, _) => Self::EchoReply,
            (ICMP_DEST_UNREACH, 0) => Self::NetUnreachable,
            (ICMP_DEST_UNREACH, 1) => Self::HostUnreachable,
            (ICMP_DEST_UNREACH, 2) => Self::ProtocolUnreachable,
            (ICMP_DEST_UNREACH, 3) => Self::PortUnreachable,
            (ICMP_DEST_UNREACH, 4) => Self::FragNeeded,
            (ICMP_DEST_UNREACH, 9 | 10 | 13) => Self::AdminProhibited,
            (ICMP_DEST_UNREACH, _) => Self::UnreachableOther,
            (ICMP_TIME_EXCEEDED, 1) => Self::ReassemblyTimeout,
            (ICMP_TIME_EXCEEDED, _) => Self::TimeExceeded,
            (ICMP_PARAM_PROBLEM, _) => Self::ParamProblem,
            _ => Self::Other,
        }
    }

    /// The kind of a parsed ICMP or ICMPv6 message (RFC 4443 §2.1 for the
    /// ICMPv6 numbers: no route and address unreachable count as net and
    /// host unreachable, Packet Too Big as fragmentation needed).
    pub fn of_msg(m: &IcmpMsg) -> Self {
        if !m.v6 {
            return Self::of(m.ty, m.code);
        }
        match (m.ty, m.code) {
            (128, _) => Self::EchoRequest,
            (129, _) => Self::EchoReply,
            (1, 0) => Self::NetUnreachable,
            (1, 1) => Self::AdminProhibited,
            (1, 3) => Self::HostUnreachable,
            (1, 4) => Self::PortUnreachable,
            (1, _) => Self::UnreachableOther,
            (2, _) => Self::FragNeeded,
            (3, 1) => Self::ReassemblyTimeout,
            (3, _) => Self::TimeExceeded,
            (4, _) => Self::ParamProblem,
            _ => Self::Other,
        }
    }

    /// The kind of a synthesized error.
    pub fn of_error(e: IcmpError) -> Self {
        match e {
            IcmpError::Unreachable(code) => Self::of(ICMP_DEST_UNREACH, u8::from(code)),
            IcmpError::FragNeeded { .. } => Self::FragNeeded,
            IcmpError::TtlExceeded => Self::TimeExceeded,
            IcmpError::ReassemblyTimeout => Self::ReassemblyTimeout,
        }
    }

    /// Stable lower-case name for reports.
    pub const fn name(self) -> &'static str {
        match self {
            Self::EchoRequest => "echo_request",
            Self::EchoReply => "echo_reply",
            Self::NetUnreachable => "net_unreachable",
            Self::HostUnreachable => "host_unreachable",
            Self::ProtocolUnreachable => "protocol_unreachable",
            Self::PortUnreachable => "port_unreachable",
            Self::FragNeeded => "frag_needed",
            Self::AdminProhibited => "admin_prohibited",
            Self::UnreachableOther => "unreachable_other",
            Self::TimeExceeded => "time_exceeded",
            Self::ReassemblyTimeout => "reassembly_timeout",
            Self::ParamProblem => "param_problem",
            Self::Other => "other",
        }
    }
}

/// One counter per [`IcmpKind`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IcmpCounts([u64; IcmpKind::ALL.len()]);

impl IcmpCounts {
    /// The count of `kind`.
    pub fn get(&self, kind: IcmpKind) -> u64 {
        self.0.get(kind as usize).copied().unwrap_or(0)
    }

    /// All counts with their kinds.
    pub fn iter(&self) -> impl Iterator<Item = (IcmpKind, u64)> + '_ {
        IcmpKind::ALL.iter().map(|k| (*k, self.get(*k)))
    }

    /// Sum of all counts.
    pub fn total(&self) -> u64 {
        self.0.iter().sum()
    }

    pub(super) fn add(&mut self, kind: IcmpKind) {
        if let Some(c) = self.0.get_mut(kind as usize) {
            *c += 1;
        }
    }
}

/// ICMP counters of the flow manager.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IcmpStats {
    /// Messages the gateway synthesized for the guest.
    pub sent_to_guest: IcmpCounts,
    /// Messages the gateway synthesized for the world.
    pub sent_to_world: IcmpCounts,
    /// Messages from the world translated for the guest by the slow path
    /// (errors about flows; echo replies the kernel did not forward).
    pub translated_to_guest: IcmpCounts,
    /// Messages from the guest translated for the world by the slow path.
    pub translated_to_world: IcmpCounts,
    /// Synthesized messages suppressed by the rate limit.
    pub rate_limited: u64,
    /// ICMP that failed to parse (checksum, truncated header or quote).
    pub malformed: u64,
    /// ICMP about (or of) no flow we know.
    pub unknown_flow: u64,
    /// ICMP messages tapgate does not handle (types other than echo and
    /// errors, echo replies from the guest, ...).
    pub unsupported: u64,
}

/// A token bucket for synthesized ICMP.
#[derive(Debug)]
pub(crate) struct Limiter {
    tokens: f64,
    last: Option<Instant>,
}

impl Limiter {
    /// A full bucket.
    pub(crate) fn new() -> Self {
        Self {
            tokens: f64::from(ICMP_BURST),
            last: None,
        }
    }

    /// Takes a token if there is one.
    pub(crate) fn allow(&mut self, now: Instant) -> bool {
        if let Some(last) = self.last {
            let dt = now.saturating_duration_since(last).as_secs_f64();
            self.tokens = (self.tokens + dt * f64::from(ICMP_RATE)).min(f64::from(ICMP_BURST));
        }
        self.last = Some(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// The addresses and ports of the packet an ICMP error quotes, as quoted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Quoted {
    /// Source address.
    pub src: IpAddr,
    /// Destination address.
    pub dst: IpAddr,
    /// IP protocol.
    pub proto: u8,
    /// Source port; a quoted echo request's identifier.
    pub sport: u16,
    /// Destination port (0 for a quoted echo request).
    pub dport: u16,
}

/// Reads the quote of the ICMPv6 error `icmp` (the ICMPv6 message): a
/// fixed IPv6 header directly followed by at least 8 bytes of TCP, UDP or
/// an ICMPv6 echo request (an extension header in the quote is refused).
pub fn quoted6(icmp: &[u8]) -> Result<Quoted, PacketError> {
    let q = icmp
        .get(ICMP_HEADER_LEN..)
        .ok_or(PacketError::Malformed("icmpv6"))?;
    if q.len() < IPV6_HEADER_LEN + 8 || q[0] >> 4 != 6 {
        return Err(PacketError::Malformed("icmpv6 quote"));
    }
    let ip = Ipv6Packet::new_unchecked(q);
    let l4 = &q[IPV6_HEADER_LEN..IPV6_HEADER_LEN + 8];
    let word = |i: usize| u16::from_be_bytes([l4[i], l4[i + 1]]);
    let proto = u8::from(ip.next_header());
    let (sport, dport) = match proto {
        PROTO_TCP | PROTO_UDP => (word(0), word(2)),
        PROTO_ICMPV6 if l4[0] == ICMPV6_ECHO_REQUEST => (word(4), 0),
        PROTO_ICMPV6 => return Err(PacketError::IcmpType(l4[0])),
        other => return Err(PacketError::Protocol(other)),
    };
    Ok(Quoted {
        src: IpAddr::V6(ip.src_addr()),
        dst: IpAddr::V6(ip.dst_addr()),
        proto,
        sport,
        dport,
    })
}

/// [`quoted`] or [`quoted6`], by the family of the error's packet `ip`.
pub fn quoted_in(ip: &[u8]) -> Result<Quoted, PacketError> {
    if ip.first().map(|b| b >> 4) == Some(6) {
        quoted6(ip.get(IPV6_HEADER_LEN..).unwrap_or_default())
    } else {
        let hl = ip
            .first()
            .map_or(IPV4_HEADER_LEN, |b| usize::from(b & 0x0f) * 4);
        quoted(ip.get(hl..).unwrap_or_default())
    }
}

/// Reads the quote of the ICMP error `icmp` (the ICMP message: header and
/// data): an IPv4 header (options allowed) and at least 8 bytes after it,
/// not a later fragment, TCP, UDP or an echo request.
pub fn quoted(icmp: &[u8]) -> Result<Quoted, PacketError> {
    let q = icmp
        .get(ICMP_HEADER_LEN..)
        .ok_or(PacketError::Malformed("icmp"))?;
    let vihl = *q.first().ok_or(PacketError::Malformed("icmp quote"))?;
    let hl = usize::from(vihl & 0x0f) * 4;
    if vihl >> 4 != 4 || hl < IPV4_HEADER_LEN || q.len() < hl + 8 {
        return Err(PacketError::Malformed("icmp quote"));
    }
    let ip = Ipv4Packet::new_unchecked(q);
    if ip.frag_offset() != 0 {
        return Err(PacketError::Malformed("icmp quote: later fragment"));
    }
    let l4 = q
        .get(hl..hl + 8)
        .ok_or(PacketError::Malformed("icmp quote"))?;
    let word = |i: usize| u16::from_be_bytes([l4[i], l4[i + 1]]);
    let proto = u8::from(ip.next_header());
    let (sport, dport) = match proto {
        PROTO_TCP | PROTO_UDP => (word(0), word(2)),
        PROTO_ICMP if l4[0] == ICMP_ECHO_REQUEST => (word(4), 0),
        PROTO_ICMP => return Err(PacketError::IcmpType(l4[0])),
        other => return Err(PacketError::Protocol(other)),
    };
    Ok(Quoted {
        src: IpAddr::V4(ip.src_addr()),
        dst: IpAddr::V4(ip.dst_addr()),
        proto,
        sport,
        dport,
    })
}

/// How [`translate_error`] rewrites an ICMP error (every address of the
/// error's family).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ErrorRewrite {
    /// New outer source.
    pub outer_src: IpAddr,
    /// New outer destination.
    pub outer_dst: IpAddr,
    /// New source of the quoted packet (for an echo request, the port is
    /// its identifier).
    pub inner_src: SocketAddr,
    /// New destination of the quoted packet (port unused for echo).
    pub inner_dst: SocketAddr,
}

/// One's complement checksum adjustment (RFC 1624, eqn. 3): `csum` was
/// computed over data containing `old`; returns it for the data with `new`
/// in its place (both of the same, even length).
pub fn csum_adjust(csum: u16, old: &[u8], new: &[u8]) -> u16 {
    let mut sum = u32::from(!csum);
    for (o, n) in old.chunks(2).zip(new.chunks(2)) {
        let o = u16::from_be_bytes([o[0], *o.get(1).unwrap_or(&0)]);
        let n = u16::from_be_bytes([n[0], *n.get(1).unwrap_or(&0)]);
        sum += u32::from(!o) + u32::from(n);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Translates the ICMP or ICMPv6 error `ip` (a whole packet, as
/// [`packet::parse_ip`] accepts it; `rw`'s addresses of its family) along
/// `rw`: outer addresses and TTL (hop limit) − 1, the quoted packet's
/// addresses and ports, every checksum (the quoted transport checksum
/// incrementally, when the quote holds it). Returns the new packet.
pub fn translate_error(ip: &[u8], rw: ErrorRewrite) -> Result<Vec<u8>, PacketError> {
    match (rw.outer_src, rw.outer_dst, rw.inner_src, rw.inner_dst) {
        (IpAddr::V4(os), IpAddr::V4(od), SocketAddr::V4(is), SocketAddr::V4(id)) => {
            translate_error4(ip, (os, od, is, id))
        }
        (IpAddr::V6(os), IpAddr::V6(od), SocketAddr::V6(is), SocketAddr::V6(id)) => {
            translate_error6(ip, os, od, is, id)
        }
        _ => Err(PacketError::Malformed("address family")),
    }
}

/// [`translate_error`] for ICMPv6: outer addresses and hop limit − 1, the
/// quoted IPv6 header's addresses and the quoted ports (or echo
/// identifier) with their checksum adjusted incrementally (RFC 1624; the
/// pseudo-header holds the 16-byte addresses), the outer ICMPv6 checksum
/// recomputed over the new pseudo-header.
fn translate_error6(
    ip: &[u8],
    outer_src: Ipv6Addr,
    outer_dst: Ipv6Addr,
    inner_src: SocketAddrV6,
    inner_dst: SocketAddrV6,
) -> Result<Vec<u8>, PacketError> {
    let mut buf = ip.to_vec();
    let mut outer =
        Ipv6Packet::new_checked(&mut buf[..]).map_err(|_| PacketError::Malformed("ipv6"))?;
    outer.set_src_addr(outer_src);
    outer.set_dst_addr(outer_dst);
    outer.set_hop_limit(outer.hop_limit().saturating_sub(1));
    let icmp = outer.payload_mut();
    let q = icmp
        .get_mut(ICMP_HEADER_LEN..)
        .ok_or(PacketError::Malformed("icmpv6"))?;
    if q.len() < IPV6_HEADER_LEN + 8 {
        return Err(PacketError::Malformed("icmpv6 quote"));
    }
    let proto = q[6];
    let old_addrs: [u8; 32] = q[8..40]
        .try_into()
        .map_err(|_| PacketError::Malformed("icmpv6 quote"))?;
    let mut new_addrs = [0u8; 32];
    new_addrs[..16].copy_from_slice(&inner_src.ip().octets());
    new_addrs[16..].copy_from_slice(&inner_dst.ip().octets());
    q[8..40].copy_from_slice(&new_addrs);
    let l4 = &mut q[IPV6_HEADER_LEN..];
    let (old_ports, new_ports, csum_at): ([u8; 4], [u8; 4], usize) = match proto {
        PROTO_TCP | PROTO_UDP => {
            let old: [u8; 4] = l4[..4]
                .try_into()
                .map_err(|_| PacketError::Malformed("icmpv6 quote"))?;
            let mut new = [0u8; 4];
            new[..2].copy_from_slice(&inner_src.port().to_be_bytes());
            new[2..].copy_from_slice(&inner_dst.port().to_be_bytes());
            l4[..4].copy_from_slice(&new);
            (old, new, if proto == PROTO_TCP { 16 } else { 6 })
        }
        PROTO_ICMPV6 => {
            // A quoted echo request: its identifier (and, unlike ICMPv4,
            // the pseudo-header's addresses) change.
            let old: [u8; 4] = [l4[4], l4[5], 0, 0];
            let id = inner_src.port().to_be_bytes();
            l4[4..6].copy_from_slice(&id);
            (old, [id[0], id[1], 0, 0], 2)
        }
        other => return Err(PacketError::Protocol(other)),
    };
    if let Some(c) = l4.get_mut(csum_at..csum_at + 2) {
        let old = u16::from_be_bytes([c[0], c[1]]);
        // A quoted zero UDP checksum (invalid over IPv6, but quoted as
        // sent) stays as it was.
        if proto == PROTO_UDP && old == 0 {
            Icmpv6Packet::new_unchecked(outer.payload_mut()).fill_checksum(&outer_src, &outer_dst);
            return Ok(buf);
        }
        let mut new = csum_adjust(old, &old_addrs, &new_addrs);
        new = csum_adjust(new, &old_ports, &new_ports);
        if proto == PROTO_UDP && new == 0 {
            new = 0xffff;
        }
        c.copy_from_slice(&new.to_be_bytes());
    }
    Icmpv6Packet::new_unchecked(outer.payload_mut()).fill_checksum(&outer_src, &outer_dst);
    Ok(buf)
}

/// [`translate_error`] for ICMPv4; `rw` = (outer source, outer
/// destination, inner source, inner destination).
fn translate_error4(
    ip: &[u8],
    rw: (Ipv4Addr, Ipv4Addr, SocketAddrV4, SocketAddrV4),
) -> Result<Vec<u8>, PacketError> {
    let mut buf = ip.to_vec();
    let mut outer =
        Ipv4Packet::new_checked(&mut buf[..]).map_err(|_| PacketError::Malformed("ipv4"))?;
    outer.set_src_addr(rw.0);
    outer.set_dst_addr(rw.1);
    outer.set_hop_limit(outer.hop_limit().saturating_sub(1));
    let icmp = outer.payload_mut();
    let q = icmp
        .get_mut(ICMP_HEADER_LEN..)
        .ok_or(PacketError::Malformed("icmp"))?;
    let vihl = *q.first().ok_or(PacketError::Malformed("icmp quote"))?;
    let hl = usize::from(vihl & 0x0f) * 4;
    if hl < IPV4_HEADER_LEN || q.len() < hl + 8 {
        return Err(PacketError::Malformed("icmp quote"));
    }
    let proto = q[9];
    // The pseudo-header words that change (addresses), and the ports.
    let old_addrs: [u8; 8] = q[12..20]
        .try_into()
        .map_err(|_| PacketError::Malformed("icmp quote"))?;
    let mut new_addrs = [0u8; 8];
    new_addrs[..4].copy_from_slice(&rw.2.ip().octets());
    new_addrs[4..].copy_from_slice(&rw.3.ip().octets());
    q[12..20].copy_from_slice(&new_addrs);
    {
        let mut inner = Ipv4Packet::new_unchecked(&mut q[..]);
        inner.fill_checksum();
    }
    let l4 = q
        .get_mut(hl..)
        .ok_or(PacketError::Malformed("icmp quote"))?;
    match proto {
        PROTO_TCP | PROTO_UDP => {
            let old_ports: [u8; 4] = l4[..4]
                .try_into()
                .map_err(|_| PacketError::Malformed("icmp quote"))?;
            let mut new_ports = [0u8; 4];
            new_ports[..2].copy_from_slice(&rw.2.port().to_be_bytes());
            new_ports[2..].copy_from_slice(&rw.3.port().to_be_bytes());
            l4[..4].copy_from_slice(&new_ports);
            let off = if proto == PROTO_TCP { 16 } else { 6 };
            if let Some(c) = l4.get_mut(off..off + 2) {
                let old = u16::from_be_bytes([c[0], c[1]]);
                // UDP: zero means "no checksum" and stays so.
                if !(proto == PROTO_UDP && old == 0) {
                    let mut new = csum_adjust(old, &old_addrs, &new_addrs);
                    new = csum_adjust(new, &old_ports, &new_ports);
                    if proto == PROTO_UDP && new == 0 {
                        new = 0xffff;
                    }
                    c.copy_from_slice(&new.to_be_bytes());
                }
            }
        }
        PROTO_ICMP => {
            // A quoted echo request: only its identifier changes (no
            // pseudo-header in ICMP's checksum).
            let old_id: [u8; 2] = l4[4..6]
                .try_into()
                .map_err(|_| PacketError::Malformed("icmp quote"))?;
            let new_id = rw.2.port().to_be_bytes();
            l4[4..6].copy_from_slice(&new_id);
            let old = u16::from_be_bytes([l4[2], l4[3]]);
            l4[2..4].copy_from_slice(&csum_adjust(old, &old_id, &new_id).to_be_bytes());
        }
        other => return Err(PacketError::Protocol(other)),
    }
    Icmpv4Packet::new_unchecked(outer.payload_mut()).fill_checksum();
    outer.fill_checksum();
    Ok(buf)
}

/// Whether an error may be sent about `pkt` (RFC 1122 §3.2.2): not about
/// an ICMP error, nor from or to a broadcast or multicast address.
fn may_answer(pkt: &Packet<'_>) -> bool {
    let about_error = matches!(pkt.l4, packet::L4::Icmp(m) if m.is_error());
    !about_error && super::is_unicast(pkt.src) && super::is_unicast(pkt.dst)
}

impl<M: FlowMaps, P: NatPorts> FlowManager<M, P> {
    /// An ICMP message from the guest: echo requests open or use a flow,
    /// errors about a flow are translated for the world, the rest is
    /// counted and dropped.
    pub(super) fn guest_icmp(
        &mut self,
        pkt: &Packet<'_>,
        msg: IcmpMsg,
        guest_mac: EthernetAddress,
        now: Instant,
        out: &mut Vec<Output>,
    ) -> Result<(), DropReason> {
        if msg.is_error() {
            return self.guest_icmp_error(pkt, now, out);
        }
        if !msg.is_echo_request() {
            self.stats.icmp.unsupported += 1;
            return Err(DropReason::Protocol);
        }
        let key = tap_key(pkt.src, pkt.dst, msg.id, 0, pkt.proto());
        if let Some(slot) = self.table.by_tap(&key) {
            if let Some(f) = self.table.get_mut(slot) {
                f.last_seen = now;
            }
            return self.forward_to_world(slot, pkt, out);
        }
        let world = match self.policy.check(pkt.dst_sock(), now) {
            Verdict::Allow(w) => SocketAddr::new(w.ip(), 0),
            Verdict::Deny(Denial::Silent) => {
                self.stats.policy_denied += 1;
                return Ok(());
            }
            Verdict::Deny(d) => {
                debug!("flow: icmp echo {} -> {} denied ({d:?})", pkt.src, pkt.dst);
                self.stats.policy_denied += 1;
                let kind = IcmpError::Unreachable(Icmpv4DstUnreachable::CommProhibited);
                self.icmp_to_guest(self.gateway_for(pkt.src), pkt, kind, guest_mac, out);
                return Ok(());
            }
        };
        match self.install(pkt, world, guest_mac, FlowState::Established, 0, now) {
            Ok(slot) => self.forward_to_world(slot, pkt, out),
            Err(e) => {
                self.unreachable_after(e, pkt, guest_mac, out);
                Err(e)
            }
        }
    }

    /// Answers a refused new flow as a router would, when the refusal
    /// came from the host's routing.
    pub(super) fn unreachable_after(
        &mut self,
        e: DropReason,
        pkt: &Packet<'_>,
        guest_mac: EthernetAddress,
        out: &mut Vec<Output>,
    ) {
        let code = match e {
            DropReason::NoRoute => Icmpv4DstUnreachable::NetUnreachable,
            DropReason::HostUnreachable => Icmpv4DstUnreachable::HostUnreachable,
            DropReason::RouteProhibited => Icmpv4DstUnreachable::CommProhibited,
            _ => return,
        };
        self.icmp_to_guest(
            self.gateway_for(pkt.src),
            pkt,
            IcmpError::Unreachable(code),
            guest_mac,
            out,
        );
    }

    /// An ICMP error from the guest about a packet of a flow (sent to it
    /// from the world): translated back to `world → nat` for the world.
    fn guest_icmp_error(
        &mut self,
        pkt: &Packet<'_>,
        _now: Instant,
        out: &mut Vec<Output>,
    ) -> Result<(), DropReason> {
        let q = quoted_in(pkt.ip)?;
        let key = tap_key(q.dst, q.src, q.dport, q.sport, q.proto);
        let Some(flow) = self.table.by_tap(&key).and_then(|s| self.table.get(s)) else {
            self.stats.icmp.unknown_flow += 1;
            return Err(DropReason::UnknownFlow);
        };
        let rw = ErrorRewrite {
            outer_src: flow.nat.ip(),
            outer_dst: flow.world.ip(),
            inner_src: flow.world,
            inner_dst: flow.nat,
        };
        let ip = translate_error(pkt.ip, rw)?;
        if let packet::L4::Icmp(m) = pkt.l4 {
            self.stats
                .icmp
                .translated_to_world
                .add(IcmpKind::of_msg(&m));
        }
        out.push(Output::ToWorld(ip));
        self.stats.slow_to_world += 1;
        Ok(())
    }

    /// An ICMP error from the world about a packet of a flow (punted by
    /// the uplink program, or with `host` by the loopback program: the
    /// host's own error about a packet for a client on the host):
    /// translated for the guest.
    pub(super) fn world_icmp_error(
        &mut self,
        pkt: &Packet<'_>,
        msg: IcmpMsg,
        host: bool,
        out: &mut Vec<Output>,
    ) -> Result<(), DropReason> {
        let q = quoted_in(pkt.ip)?;
        let key = if host {
            lo_key(q.dst, q.src, q.dport, q.sport, q.proto)
        } else {
            uplink_key(q.dst, q.src, q.dport, q.sport, q.proto)
        };
        let Some(flow) = self.table.by_uplink(&key).and_then(|s| self.table.get(s)) else {
            self.stats.icmp.unknown_flow += 1;
            return Err(DropReason::UnknownFlow);
        };
        if pkt.ttl <= 1 {
            return Err(DropReason::TtlExpired);
        }
        // The world host itself complains: it is the remote the guest
        // addressed (they differ for DNS). A router on the way keeps its
        // own address (traceroute shows it).
        let outer_src = if pkt.src == flow.world.ip() {
            flow.remote.ip()
        } else {
            pkt.src
        };
        let rw = ErrorRewrite {
            outer_src,
            outer_dst: flow.guest.ip(),
            inner_src: flow.guest,
            inner_dst: flow.remote,
        };
        let mac = flow.guest_mac;
        let ip = translate_error(pkt.ip, rw)?;
        self.stats
            .icmp
            .translated_to_guest
            .add(IcmpKind::of_msg(&msg));
        out.push(Output::ToGuest(packet::ethernet_frame(
            self.guest.gateway_mac,
            mac,
            &ip,
        )));
        self.stats.slow_to_guest += 1;
        Ok(())
    }

    /// Queues an ICMP error from `from` about `pkt` (from the guest) for
    /// the guest, within the rate limit.
    pub(super) fn icmp_to_guest(
        &mut self,
        from: IpAddr,
        pkt: &Packet<'_>,
        kind: IcmpError,
        guest_mac: EthernetAddress,
        out: &mut Vec<Output>,
    ) {
        if may_answer(pkt) {
            let ip = packet::icmp_error(from, pkt, kind);
            self.emit_to_guest(ip, kind, guest_mac, out);
        }
    }

    /// Whether the rate limit lets one more synthesized error out; a
    /// suppressed one is counted.
    fn icmp_allowed(&mut self) -> bool {
        let ok = self.icmp_limit.allow(Instant::now());
        if !ok {
            self.stats.icmp.rate_limited += 1;
        }
        ok
    }

    /// Queues the synthesized error `ip` (of `kind`) for the guest if the
    /// rate limit allows, and counts it.
    pub(super) fn emit_to_guest(
        &mut self,
        ip: Vec<u8>,
        kind: IcmpError,
        guest_mac: EthernetAddress,
        out: &mut Vec<Output>,
    ) {
        if !self.icmp_allowed() {
            return;
        }
        out.push(Output::ToGuest(packet::ethernet_frame(
            self.guest.gateway_mac,
            guest_mac,
            &ip,
        )));
        self.stats.icmp.sent_to_guest.add(IcmpKind::of_error(kind));
        self.stats.icmp_sent += 1;
    }

    /// Queues an ICMP error from `from` about `pkt` (from the world) for
    /// its source in the world, within the rate limit.
    pub(super) fn icmp_to_world(
        &mut self,
        from: IpAddr,
        pkt: &Packet<'_>,
        kind: IcmpError,
        out: &mut Vec<Output>,
    ) {
        if !may_answer(pkt) {
            return;
        }
        if !self.icmp_allowed() {
            return;
        }
        out.push(Output::ToWorld(packet::icmp_error(from, pkt, kind)));
        self.stats.icmp.sent_to_world.add(IcmpKind::of_error(kind));
    }

    /// Queues "fragment reassembly time exceeded" for the guest about a
    /// datagram whose fragments from the guest timed out; `first` is the
    /// first fragment's header and first payload bytes.
    pub fn reassembly_timeout_to_guest(
        &mut self,
        first: &[u8],
        guest_mac: EthernetAddress,
        out: &mut Vec<Output>,
    ) {
        // Only the header is here: the total length names the whole
        // datagram, so smoltcp's checked view would refuse it.
        let Some(header) = first.get(..IPV4_HEADER_LEN) else {
            return;
        };
        let ip = Ipv4Packet::new_unchecked(header);
        if ip.version() != 4 {
            return;
        }
        let (src, dst) = (ip.src_addr(), ip.dst_addr());
        if src != self.guest.guest_addr || !super::is_unicast(IpAddr::V4(dst)) {
            return;
        }
        let kind = IcmpError::ReassemblyTimeout;
        let ip = packet::icmp_error_quoting(self.guest.gateway, src, first, kind);
        self.emit_to_guest(ip, kind, guest_mac, out);
    }
}
