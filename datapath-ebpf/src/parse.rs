//! Bounds-checked header parsing.
//!
//! # Theory of operation
//!
//! Headers are copied out of the skb with `bpf_skb_load_bytes` (through
//! `TcContext::load`), which checks the offset against the packet and works
//! for non-linear (GSO) skbs; nothing here dereferences packet memory
//! directly, so no helper that changes the packet can leave a stale
//! pointer behind. Every multi-byte field is kept in network order as it
//! sits in the packet, converted only where a number is needed.

use aya_ebpf::programs::TcContext;
use datapath_common::{PROTO_ICMP, PROTO_TCP, PROTO_UDP};

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
/// Length of the ICMP header (type, code, checksum, 4 more bytes).
pub const ICMP_HLEN: usize = 8;

/// A parsed IPv4 TCP, UDP or ICMP packet.
#[derive(Clone, Copy)]
pub struct Packet {
    /// The IPv4 header.
    pub ip: Ipv4Hdr,
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
}

impl Packet {
    /// Header length in bytes.
    #[inline(always)]
    pub fn ihl_bytes(&self) -> usize {
        usize::from(self.ip.vihl & 0x0f) * 4
    }

    /// Whether the packet is a fragment (MF set or a non-zero offset).
    #[inline(always)]
    pub fn is_fragment(&self) -> bool {
        (u16::from_be_bytes(self.ip.frag) & 0x3fff) != 0
    }

    /// Whether the packet is TCP.
    #[inline(always)]
    pub fn is_tcp(&self) -> bool {
        self.ip.proto == PROTO_TCP
    }

    /// Whether the packet is ICMP.
    #[inline(always)]
    pub fn is_icmp(&self) -> bool {
        self.ip.proto == PROTO_ICMP
    }

    /// Whether the packet is a fragment other than the first (no
    /// transport header: ports are zero).
    #[inline(always)]
    pub fn is_later_fragment(&self) -> bool {
        (u16::from_be_bytes(self.ip.frag) & 0x1fff) != 0
    }

    /// Whether the packet is an ICMP error that quotes a packet.
    #[inline(always)]
    pub fn is_icmp_error(&self) -> bool {
        self.is_icmp()
            && !self.is_later_fragment()
            && matches!(
                self.icmp_type,
                ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED | ICMP_PARAM_PROBLEM
            )
    }

    /// Whether the packet is an ICMP echo request or reply (the ICMP the
    /// flow table carries).
    #[inline(always)]
    pub fn is_icmp_echo(&self) -> bool {
        self.is_icmp()
            && !self.is_later_fragment()
            && matches!(self.icmp_type, ICMP_ECHO_REQUEST | ICMP_ECHO_REPLY)
    }

    /// Offset of the transport checksum from the start of the frame.
    #[inline(always)]
    pub fn l4_csum_off(&self) -> usize {
        self.l4_off
            + match self.ip.proto {
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

/// Parses an IPv4 TCP, UDP or ICMP packet after the Ethernet header.
/// `None` for anything else (other protocols, truncated headers, not
/// version 4). A non-first fragment has no transport header: it parses
/// with zero ports and [`Packet::is_later_fragment`] set. ICMP: an echo
/// request's identifier is its source port, an echo reply's its
/// destination port (so a reply's key mirrors its request's); other ICMP
/// types have zero ports.
#[inline(always)]
pub fn ipv4_l4(ctx: &TcContext) -> Option<Packet> {
    let ip: Ipv4Hdr = ctx.load(ETH_HLEN).ok()?;
    if ip.vihl >> 4 != 4 || (ip.vihl & 0x0f) < 5 {
        return None;
    }
    if ip.proto != PROTO_TCP && ip.proto != PROTO_UDP && ip.proto != PROTO_ICMP {
        return None;
    }
    let l4_off = ETH_HLEN + usize::from(ip.vihl & 0x0f) * 4;
    let mut p = Packet {
        ip,
        l4_off,
        sport: [0; 2],
        dport: [0; 2],
        tcp: TcpInfo::default(),
        icmp_type: 0,
    };
    if p.is_later_fragment() {
        return Some(p);
    }
    if ip.proto == PROTO_TCP {
        let h: [u8; 16] = ctx.load(l4_off).ok()?;
        p.sport = [h[0], h[1]];
        p.dport = [h[2], h[3]];
        p.tcp = TcpInfo {
            ack: u32::from_be_bytes([h[8], h[9], h[10], h[11]]),
            flags: h[13],
            win: u16::from_be_bytes([h[14], h[15]]),
        };
    } else if ip.proto == PROTO_UDP {
        let h: [u8; 4] = ctx.load(l4_off).ok()?;
        p.sport = [h[0], h[1]];
        p.dport = [h[2], h[3]];
    } else {
        let h: [u8; ICMP_HLEN] = ctx.load(l4_off).ok()?;
        p.icmp_type = h[0];
        match h[0] {
            ICMP_ECHO_REQUEST => p.sport = [h[4], h[5]],
            ICMP_ECHO_REPLY => p.dport = [h[4], h[5]],
            _ => {}
        }
    }
    Some(p)
}

/// The flow a quoted packet belongs to, read from an ICMP error: the
/// quote is a packet we sent towards the world (source the NAT address),
/// so its mirror image is the key of the flow's uplink-side entry: `(src,
/// dst, sport, dport)` of the key are the quote's `(dst, src, dport,
/// sport)`. `None` when the quote is too short to name a flow (the outer
/// header must not be a fragment; the inner may be the first fragment of
/// its datagram, never a later one).
#[inline(always)]
pub fn icmp_quote(ctx: &TcContext, p: &Packet) -> Option<Quote> {
    let inner_off = p.l4_off + ICMP_HLEN;
    let ip: Ipv4Hdr = ctx.load(inner_off).ok()?;
    if ip.vihl >> 4 != 4 || (ip.vihl & 0x0f) < 5 || (u16::from_be_bytes(ip.frag) & 0x1fff) != 0 {
        return None;
    }
    let l4_off = inner_off + usize::from(ip.vihl & 0x0f) * 4;
    let h: [u8; ICMP_HLEN] = ctx.load(l4_off).ok()?;
    let (sport, dport) = match ip.proto {
        PROTO_TCP | PROTO_UDP => ([h[0], h[1]], [h[2], h[3]]),
        // A quoted echo request: its identifier is its "source port".
        PROTO_ICMP if h[0] == ICMP_ECHO_REQUEST => ([h[4], h[5]], [0, 0]),
        _ => return None,
    };
    Some(Quote {
        src: ip.src,
        dst: ip.dst,
        sport,
        dport,
        proto: ip.proto,
    })
}

/// The addresses and ports of a packet quoted by an ICMP error, as quoted.
#[derive(Clone, Copy)]
pub struct Quote {
    /// Source address of the quoted packet.
    pub src: [u8; 4],
    /// Destination address.
    pub dst: [u8; 4],
    /// Source port (echo request: identifier).
    pub sport: [u8; 2],
    /// Destination port.
    pub dport: [u8; 2],
    /// IP protocol.
    pub proto: u8,
}
