//! Bounds-checked header parsing, for both address families.
//!
//! # Theory of operation
//!
//! Headers are copied out of the skb with `bpf_skb_load_bytes` (through
//! `TcContext::load`), which checks the offset against the packet and works
//! for non-linear (GSO) skbs; nothing here dereferences packet memory
//! directly, so no helper that changes the packet can leave a stale
//! pointer behind. Every multi-byte field is kept in network order as it
//! sits in the packet, converted only where a number is needed.
//!
//! Both families parse into one family-neutral [`Packet`]: addresses as 16
//! bytes (an IPv4 address in the first four, the rest zero, as in the flow
//! keys), TTL or hop limit, header length, protocol, transport offset,
//! ports and what the fast path needs of TCP and ICMP. [`ipv4_l4`] and
//! [`ipv6_l4`] read the network header; the transport header is read by
//! one function for both ([`transport`]).
//!
//! IPv6: only the 40-byte fixed header is parsed, and its next header must
//! be TCP, UDP or ICMPv6 — or a fragment header (44), the one extension
//! header read: [`ipv6_l4`] parses its 8 bytes (next header, offset, M
//! flag, 32-bit identification) and, in the first fragment (offset 0),
//! the transport header right after it, which must again be TCP, UDP or
//! ICMPv6; a later fragment parses with zero ports and whatever next
//! header it names (RFC 8200: only the first fragment's counts). Such a
//! packet is a fragment ([`Packet::is_fragment`], atomic fragments
//! included) and never forwarded: the tap program punts it, the uplink
//! program punts it when its datagram belongs to a flow
//! ([`crate::flow`]). A packet with any other extension header
//! (hop-by-hop, routing, destination options, ..., or a fragment header
//! after one of them) is not a flow packet: the tap program punts it (a
//! fragment header it cannot parse as `Fragment`, see
//! [`ipv6_is_fragment`]), the uplink program leaves it to the host.
//! Walking extension headers in the kernel would buy little (guests and
//! peers rarely send them on established flows) and a wrongly skipped
//! header would mis-forward; user space sees every one of them instead.
//!
//! ICMP and ICMPv6 echo: the identifier is the "port" — an echo request's
//! source port, an echo reply's destination port — so a reply's key
//! mirrors its request's. Other ICMP types carry zero ports.

use aya_ebpf::programs::TcContext;
use datapath_common::{
    FAMILY_IPV4, FAMILY_IPV6, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP, PuntReason,
    ipv4_to_16,
};

/// Length of an Ethernet header without VLAN tags.
pub const ETH_HLEN: usize = 14;
/// Offset of the EtherType.
pub const ETH_TYPE_OFF: usize = 12;
/// EtherType of IPv4.
pub const ETH_P_IP: u16 = 0x0800;
/// EtherType of ARP.
pub const ETH_P_ARP: u16 = 0x0806;
/// EtherType of IPv6.
pub const ETH_P_IPV6: u16 = 0x86DD;

/// TCP flag bits.
pub const TCP_FIN: u8 = 0x01;
/// SYN.
pub const TCP_SYN: u8 = 0x02;
/// RST.
pub const TCP_RST: u8 = 0x04;
/// ACK.
pub const TCP_ACK: u8 = 0x10;
/// Largest TCP header (with options).
pub const TCP_MAX_HLEN: usize = 60;

/// An address family of the fast path.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// IPv4 (EtherType 0x0800).
    V4,
    /// IPv6 (EtherType 0x86DD).
    V6,
}

impl Family {
    /// The family's value in flow keys.
    #[inline(always)]
    pub fn key(self) -> u8 {
        match self {
            Self::V4 => FAMILY_IPV4,
            Self::V6 => FAMILY_IPV6,
        }
    }

    /// The family's ICMP protocol number.
    #[inline(always)]
    pub fn icmp_proto(self) -> u8 {
        match self {
            Self::V4 => PROTO_ICMP,
            Self::V6 => PROTO_ICMPV6,
        }
    }

    /// The punt reason of a guest packet of this family that belongs to no
    /// flow the kernel forwards.
    #[inline(always)]
    pub fn no_flow(self) -> PuntReason {
        match self {
            Self::V4 => PuntReason::Ipv4NoFlow,
            Self::V6 => PuntReason::Ipv6NoFlow,
        }
    }

    /// The (echo request, echo reply) ICMP types of this family.
    #[inline(always)]
    fn echo_types(self) -> (u8, u8) {
        match self {
            Self::V4 => (ICMP_ECHO_REQUEST, ICMP_ECHO_REPLY),
            Self::V6 => (ICMPV6_ECHO_REQUEST, ICMPV6_ECHO_REPLY),
        }
    }
}

/// An IPv4 header as laid out on the wire (without options).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Ipv4Hdr {
    /// Version and header length.
    pub vihl: u8,
    /// DSCP/ECN.
    pub tos: u8,
    /// Total length (network order).
    pub tot_len: [u8; 2],
    /// Identification.
    pub id: [u8; 2],
    /// Flags and fragment offset (network order).
    pub frag: [u8; 2],
    /// Time to live.
    pub ttl: u8,
    /// Protocol.
    pub proto: u8,
    /// Header checksum.
    pub csum: [u8; 2],
    /// Source address.
    pub src: [u8; 4],
    /// Destination address.
    pub dst: [u8; 4],
}

/// Offsets of IPv4 header fields from the start of the frame.
pub const IP_TTL_OFF: usize = ETH_HLEN + 8;
/// Protocol.
pub const IP_PROTO_OFF: usize = ETH_HLEN + 9;
/// Header checksum.
pub const IP_CSUM_OFF: usize = ETH_HLEN + 10;
/// Source address.
pub const IP_SRC_OFF: usize = ETH_HLEN + 12;
/// Destination address.
pub const IP_DST_OFF: usize = ETH_HLEN + 16;

/// The fixed IPv6 header as laid out on the wire.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Ipv6Hdr {
    /// Version, traffic class, flow label.
    pub vtcfl: [u8; 4],
    /// Payload length (network order).
    pub payload_len: [u8; 2],
    /// Next header.
    pub next: u8,
    /// Hop limit.
    pub hop_limit: u8,
    /// Source address.
    pub src: [u8; 16],
    /// Destination address.
    pub dst: [u8; 16],
}

/// Length of the fixed IPv6 header.
pub const IPV6_HLEN: usize = 40;
const _: () = assert!(core::mem::size_of::<Ipv6Hdr>() == IPV6_HLEN);
/// Offsets of IPv6 header fields from the start of the frame.
pub const IP6_NEXT_OFF: usize = ETH_HLEN + 6;
/// Hop limit.
pub const IP6_HOP_LIMIT_OFF: usize = ETH_HLEN + 7;
/// Source address.
pub const IP6_SRC_OFF: usize = ETH_HLEN + 8;
/// Destination address.
pub const IP6_DST_OFF: usize = ETH_HLEN + 24;
/// Next-header value of the IPv6 fragment header.
pub const IPV6_NEXT_FRAGMENT: u8 = 44;

/// The IPv6 fragment header (RFC 8200 §4.5) as laid out on the wire.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Ipv6FragHdr {
    /// Next header: the first header of the fragmentable part (only the
    /// first fragment's counts).
    pub next: u8,
    /// Reserved.
    pub reserved: u8,
    /// Fragment offset (13 bits, 8-byte units), two reserved bits and the
    /// M (more fragments) flag, network order.
    pub off_m: [u8; 2],
    /// Identification, network order.
    pub id: [u8; 4],
}

/// Length of the IPv6 fragment header.
pub const IPV6_FRAG_HLEN: usize = 8;
const _: () = assert!(core::mem::size_of::<Ipv6FragHdr>() == IPV6_FRAG_HLEN);

/// What the fast path needs to know about a TCP segment.
#[derive(Clone, Copy, Default)]
pub struct TcpInfo {
    /// Acknowledgment number (host order).
    pub ack: u32,
    /// Flag byte (FIN, SYN, RST, PSH, ACK, ...).
    pub flags: u8,
    /// Window (host order, unscaled).
    pub win: u16,
}

/// ICMP types the fast path tells apart.
pub const ICMP_ECHO_REPLY: u8 = 0;
/// Destination unreachable.
pub const ICMP_DEST_UNREACH: u8 = 3;
/// Echo request.
pub const ICMP_ECHO_REQUEST: u8 = 8;
/// Time exceeded.
pub const ICMP_TIME_EXCEEDED: u8 = 11;
/// Parameter problem.
pub const ICMP_PARAM_PROBLEM: u8 = 12;
/// Length of the ICMP header (type, code, checksum, 4 more bytes); the
/// same for ICMPv6.
pub const ICMP_HLEN: usize = 8;

/// ICMPv6 destination unreachable.
pub const ICMPV6_DEST_UNREACH: u8 = 1;
/// ICMPv6 packet too big.
pub const ICMPV6_PKT_TOO_BIG: u8 = 2;
/// ICMPv6 time exceeded.
pub const ICMPV6_TIME_EXCEEDED: u8 = 3;
/// ICMPv6 parameter problem.
pub const ICMPV6_PARAM_PROBLEM: u8 = 4;
/// ICMPv6 echo request.
pub const ICMPV6_ECHO_REQUEST: u8 = 128;
/// ICMPv6 echo reply.
pub const ICMPV6_ECHO_REPLY: u8 = 129;

/// A parsed TCP, UDP or ICMP(v6) packet of either family.
#[derive(Clone, Copy)]
pub struct Packet {
    /// The address family.
    pub family: Family,
    /// Source address (IPv4: first four bytes, the rest zero).
    pub src: [u8; 16],
    /// Destination address (IPv4: first four bytes, the rest zero).
    pub dst: [u8; 16],
    /// TTL (IPv4) or hop limit (IPv6).
    pub ttl: u8,
    /// Network header length in bytes (IPv4 with options; IPv6: 40, or 48
    /// with a fragment header).
    pub l3_len: usize,
    /// Transport protocol (IPv6 fragment: the fragment header's next
    /// header, meaningful in the first fragment only).
    pub proto: u8,
    /// Offset of the transport header from the start of the frame.
    pub l4_off: usize,
    /// Source port as on the wire; an ICMP echo request's identifier.
    pub sport: [u8; 2],
    /// Destination port as on the wire; an ICMP echo reply's identifier.
    pub dport: [u8; 2],
    /// TCP details (zero for UDP and ICMP).
    pub tcp: TcpInfo,
    /// ICMP type (0 for TCP and UDP: tell them apart by protocol).
    pub icmp_type: u8,
    /// Fragment identification as on the wire (fragment tracking): IPv4's
    /// 16 bits in the first two bytes, the rest zero; IPv6's 32 bits from
    /// the fragment header (zero without one).
    pub frag_id: [u8; 4],
    /// Whether the packet is a fragment: IPv4 with MF set or a nonzero
    /// offset; IPv6 with a fragment header (an atomic fragment too).
    pub fragment: bool,
    /// Fragment offset in 8-byte units: nonzero for a fragment other than
    /// the first, which carries no transport header.
    pub frag_off: u16,
}

impl Packet {
    /// Whether the network header carries options (IPv4 only: of IPv6's
    /// extension headers only a fragment header parses, and fragments are
    /// never forwarded).
    #[inline(always)]
    pub fn has_ip_options(&self) -> bool {
        self.family == Family::V4 && self.l3_len != 20
    }

    /// Whether the packet is a fragment: IPv4 with MF set or a non-zero
    /// offset, IPv6 with a fragment header.
    #[inline(always)]
    pub fn is_fragment(&self) -> bool {
        self.fragment
    }

    /// Whether the packet is a fragment other than the first (no
    /// transport header: ports are zero).
    #[inline(always)]
    pub fn is_later_fragment(&self) -> bool {
        self.frag_off != 0
    }

    /// Whether the packet is TCP.
    #[inline(always)]
    pub fn is_tcp(&self) -> bool {
        self.proto == PROTO_TCP
    }

    /// Whether the packet is ICMP (IPv4) or ICMPv6 (IPv6).
    #[inline(always)]
    pub fn is_icmp(&self) -> bool {
        self.proto == self.family.icmp_proto()
    }

    /// Whether the packet is an echo request (a flow packet from the guest).
    #[inline(always)]
    pub fn is_echo_request(&self) -> bool {
        self.is_icmp() && !self.is_later_fragment() && self.icmp_type == self.family.echo_types().0
    }

    /// Whether the packet is an echo reply (a flow packet from the world).
    #[inline(always)]
    pub fn is_echo_reply(&self) -> bool {
        self.is_icmp() && !self.is_later_fragment() && self.icmp_type == self.family.echo_types().1
    }

    /// Whether the packet is an ICMP error that quotes a packet
    /// (IPv4: destination unreachable, time exceeded, parameter problem;
    /// IPv6: those and packet too big).
    #[inline(always)]
    pub fn is_icmp_error(&self) -> bool {
        self.is_icmp()
            && !self.is_later_fragment()
            && match self.family {
                Family::V4 => matches!(
                    self.icmp_type,
                    ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED | ICMP_PARAM_PROBLEM
                ),
                Family::V6 => matches!(
                    self.icmp_type,
                    ICMPV6_DEST_UNREACH
                        | ICMPV6_PKT_TOO_BIG
                        | ICMPV6_TIME_EXCEEDED
                        | ICMPV6_PARAM_PROBLEM
                ),
            }
    }

    /// Whether the transport checksum covers the pseudo-header (TCP, UDP,
    /// ICMPv6; not ICMPv4).
    #[inline(always)]
    pub fn l4_csum_has_pseudo_hdr(&self) -> bool {
        self.proto != PROTO_ICMP
    }

    /// Offset of the transport checksum from the start of the frame.
    #[inline(always)]
    pub fn l4_csum_off(&self) -> usize {
        self.l4_off
            + match self.proto {
                PROTO_TCP => 16,
                PROTO_UDP => 6,
                _ => 2,
            }
    }
}

/// The EtherType of the frame, `None` if it is too short.
#[inline(always)]
pub fn ethertype(ctx: &TcContext) -> Option<u16> {
    ctx.load::<[u8; 2]>(ETH_TYPE_OFF)
        .ok()
        .map(u16::from_be_bytes)
}

/// Parses a TCP, UDP or ICMP(v6) packet of `family` after the Ethernet
/// header ([`ipv4_l4`] or [`ipv6_l4`]).
#[inline(always)]
pub fn l4(ctx: &TcContext, family: Family) -> Option<Packet> {
    match family {
        Family::V4 => ipv4_l4(ctx),
        Family::V6 => ipv6_l4(ctx),
    }
}

/// The protocol (IPv4) or next-header (IPv6) byte of a packet that did
/// not parse, if the frame is long enough to have one.
#[inline(always)]
pub fn l3_proto(ctx: &TcContext, family: Family) -> Option<u8> {
    ctx.load::<u8>(match family {
        Family::V4 => IP_PROTO_OFF,
        Family::V6 => IP6_NEXT_OFF,
    })
    .ok()
}

/// Whether the frame is an IPv6 packet whose (complete) fixed header is
/// followed by a fragment header (for the tap's packets that do not parse:
/// a fragment header cut short, a first fragment with another header after
/// it).
#[inline(always)]
pub fn ipv6_is_fragment(ctx: &TcContext) -> bool {
    match ctx.load::<Ipv6Hdr>(ETH_HLEN) {
        Ok(ip) => ip.vtcfl[0] >> 4 == 6 && ip.next == IPV6_NEXT_FRAGMENT,
        Err(_) => false,
    }
}

/// Parses an IPv4 TCP, UDP or ICMP packet after the Ethernet header.
/// `None` for anything else (other protocols, truncated headers, not
/// version 4). A non-first fragment has no transport header: it parses
/// with zero ports and [`Packet::is_later_fragment`] set.
#[inline(always)]
pub fn ipv4_l4(ctx: &TcContext) -> Option<Packet> {
    let ip: Ipv4Hdr = ctx.load(ETH_HLEN).ok()?;
    if ip.vihl >> 4 != 4 || (ip.vihl & 0x0f) < 5 {
        return None;
    }
    if ip.proto != PROTO_TCP && ip.proto != PROTO_UDP && ip.proto != PROTO_ICMP {
        return None;
    }
    let l3_len = usize::from(ip.vihl & 0x0f) * 4;
    let frag = u16::from_be_bytes(ip.frag);
    let mut p = Packet {
        family: Family::V4,
        src: ipv4_to_16(ip.src),
        dst: ipv4_to_16(ip.dst),
        ttl: ip.ttl,
        l3_len,
        proto: ip.proto,
        l4_off: ETH_HLEN + l3_len,
        sport: [0; 2],
        dport: [0; 2],
        tcp: TcpInfo::default(),
        icmp_type: 0,
        frag_id: [ip.id[0], ip.id[1], 0, 0],
        fragment: (frag & 0x3fff) != 0,
        frag_off: frag & 0x1fff,
    };
    if p.is_later_fragment() {
        return Some(p);
    }
    transport(ctx, &mut p)?;
    Some(p)
}

/// Parses an IPv6 TCP, UDP or ICMPv6 packet after the Ethernet header:
/// the fixed header directly followed by the transport header, or by a
/// fragment header and then (first fragment) the transport header. A
/// later fragment (offset > 0) has no transport header: it parses with
/// zero ports, [`Packet::is_later_fragment`] set and its fragment
/// header's next header, whatever that is. `None` for anything else
/// (other extension headers, other protocols, truncated headers, not
/// version 6).
#[inline(always)]
pub fn ipv6_l4(ctx: &TcContext) -> Option<Packet> {
    let ip: Ipv6Hdr = ctx.load(ETH_HLEN).ok()?;
    if ip.vtcfl[0] >> 4 != 6 {
        return None;
    }
    let mut p = Packet {
        family: Family::V6,
        src: ip.src,
        dst: ip.dst,
        ttl: ip.hop_limit,
        l3_len: IPV6_HLEN,
        proto: ip.next,
        l4_off: ETH_HLEN + IPV6_HLEN,
        sport: [0; 2],
        dport: [0; 2],
        tcp: TcpInfo::default(),
        icmp_type: 0,
        frag_id: [0; 4],
        fragment: false,
        frag_off: 0,
    };
    if ip.next == IPV6_NEXT_FRAGMENT {
        let f: Ipv6FragHdr = ctx.load(ETH_HLEN + IPV6_HLEN).ok()?;
        p.l3_len = IPV6_HLEN + IPV6_FRAG_HLEN;
        p.l4_off = ETH_HLEN + IPV6_HLEN + IPV6_FRAG_HLEN;
        p.proto = f.next;
        p.frag_id = f.id;
        p.fragment = true;
        p.frag_off = u16::from_be_bytes(f.off_m) >> 3;
        if p.is_later_fragment() {
            return Some(p);
        }
    }
    if p.proto != PROTO_TCP && p.proto != PROTO_UDP && p.proto != PROTO_ICMPV6 {
        return None;
    }
    transport(ctx, &mut p)?;
    Some(p)
}

/// Reads the transport header at `p.l4_off` into `p`: ports, TCP details,
/// the ICMP type and an echo message's identifier. `None` if it is
/// truncated.
#[inline(always)]
fn transport(ctx: &TcContext, p: &mut Packet) -> Option<()> {
    if p.proto == PROTO_TCP {
        let h: [u8; 16] = ctx.load(p.l4_off).ok()?;
        p.sport = [h[0], h[1]];
        p.dport = [h[2], h[3]];
        p.tcp = TcpInfo {
            ack: u32::from_be_bytes([h[8], h[9], h[10], h[11]]),
            flags: h[13],
            win: u16::from_be_bytes([h[14], h[15]]),
        };
    } else if p.proto == PROTO_UDP {
        let h: [u8; 4] = ctx.load(p.l4_off).ok()?;
        p.sport = [h[0], h[1]];
        p.dport = [h[2], h[3]];
    } else {
        let h: [u8; ICMP_HLEN] = ctx.load(p.l4_off).ok()?;
        p.icmp_type = h[0];
        let (request, reply) = p.family.echo_types();
        if h[0] == request {
            p.sport = [h[4], h[5]];
        } else if h[0] == reply {
            p.dport = [h[4], h[5]];
        }
    }
    Some(())
}

/// The flow a quoted packet belongs to, read from an ICMP(v6) error: the
/// quote is a packet we sent towards the world (source the NAT address),
/// so its mirror image is the key of the flow's uplink-side entry: `(src,
/// dst, sport, dport)` of the key are the quote's `(dst, src, dport,
/// sport)`. `None` when the quote is too short to name a flow, or is not a
/// TCP/UDP packet or an echo request. IPv4: the outer header must not be a
/// fragment; the inner may be the first fragment of its datagram, never a
/// later one. IPv6: the quoted fixed header must be followed directly by
/// the transport header (no extension headers).
#[inline(always)]
pub fn icmp_quote(ctx: &TcContext, p: &Packet) -> Option<Quote> {
    let inner_off = p.l4_off + ICMP_HLEN;
    let (src, dst, proto, l4_off) = match p.family {
        Family::V4 => {
            let ip: Ipv4Hdr = ctx.load(inner_off).ok()?;
            if ip.vihl >> 4 != 4
                || (ip.vihl & 0x0f) < 5
                || (u16::from_be_bytes(ip.frag) & 0x1fff) != 0
            {
                return None;
            }
            (
                ipv4_to_16(ip.src),
                ipv4_to_16(ip.dst),
                ip.proto,
                inner_off + usize::from(ip.vihl & 0x0f) * 4,
            )
        }
        Family::V6 => {
            let ip: Ipv6Hdr = ctx.load(inner_off).ok()?;
            if ip.vtcfl[0] >> 4 != 6 {
                return None;
            }
            (ip.src, ip.dst, ip.next, inner_off + IPV6_HLEN)
        }
    };
    let h: [u8; ICMP_HLEN] = ctx.load(l4_off).ok()?;
    let (sport, dport) = if proto == PROTO_TCP || proto == PROTO_UDP {
        ([h[0], h[1]], [h[2], h[3]])
    } else if proto == p.family.icmp_proto() && h[0] == p.family.echo_types().0 {
        // A quoted echo request: its identifier is its "source port".
        ([h[4], h[5]], [0, 0])
    } else {
        return None;
    };
    Some(Quote {
        src,
        dst,
        sport,
        dport,
        proto,
    })
}

/// The addresses and ports of a packet quoted by an ICMP error, as quoted.
#[derive(Clone, Copy)]
pub struct Quote {
    /// Source address of the quoted packet (IPv4: first four bytes).
    pub src: [u8; 16],
    /// Destination address.
    pub dst: [u8; 16],
    /// Source port (echo request: identifier).
    pub sport: [u8; 2],
    /// Destination port.
    pub dport: [u8; 2],
    /// IP protocol.
    pub proto: u8,
}
