//! Packet views, address/port rewrites and the replies the slow path
//! synthesizes.
//!
//! # Theory of operation
//!
//! Everything here is stateless and built on smoltcp's `wire` views, which
//! check lengths before any accessor runs. Both families go through the
//! same functions; only the header code differs. Three jobs:
//!
//! * **Parsing** ([`parse_frame`], [`parse_ip`]): an Ethernet frame (from
//!   the guest or the uplink) is accepted when it carries a complete IPv4
//!   packet (version 4, valid header checksum, total length within the
//!   frame — Ethernet padding is cut off) without options and not a
//!   fragment, or a complete IPv6 packet whose transport header follows
//!   the fixed header (extension headers are refused; fragments are
//!   reassembled before they get here), with a TCP or UDP header whose
//!   ports are not zero (over IPv6 a zero UDP checksum is refused too, RFC
//!   8200 §8.1), or an ICMP/ICMPv6 message whose checksum is right (ICMP is
//!   never offloaded). The TCP/UDP checksum is deliberately *not*
//!   verified: frames from a tap or a veth may carry a partial (offloaded)
//!   checksum that only the egress device completes. [`parse_snap`] reads
//!   the truncated copies the kernel puts in event records: only the
//!   headers are there, so payload lengths come from the IP and TCP length
//!   fields, not from the snap.
//! * **Rewriting** ([`rewrite`]): the slow path applies exactly the rewrite
//!   of the flow entry the kernel would apply (new source and destination
//!   address and port — for ICMP echo, the identifier — TTL or hop limit
//!   − 1) to a copy of the packet, then recomputes the IPv4 header checksum
//!   and the *full* TCP/UDP/ICMP(v6) checksum, so a partial checksum on
//!   input still yields a correct packet. TCP options, flags and payload
//!   are kept byte for byte.
//! * **Synthesis**: RSTs for segments that match no connection (RFC 9293
//!   §3.10.7.1: from the segment's ACK if it has one, otherwise seq 0 and
//!   an ACK covering the segment), in either family ([`ip_header`]), and
//!   ICMP errors quoting the offending packet's IP header and first 8
//!   payload bytes (RFC 792, the passt seed's rule) or, for IPv6, ICMPv6
//!   errors quoting as much as fits 1280 bytes ([`icmp6_error_quoting`]),
//!   as IP packets (wrapped in Ethernet for the guest).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use smoltcp::{
    phy::ChecksumCapabilities,
    wire::{
        ETHERNET_HEADER_LEN, EthernetAddress, EthernetFrame, EthernetProtocol, EthernetRepr,
        IPV4_HEADER_LEN, IPV6_HEADER_LEN, Icmpv4DstUnreachable, Icmpv4Packet, Icmpv6Packet,
        IpAddress, IpProtocol, Ipv4Packet, Ipv4Repr, Ipv6Packet, Ipv6Repr, TCP_HEADER_LEN,
        TcpControl, TcpPacket, TcpRepr, TcpSeqNumber, UdpPacket,
    },
};
use thiserror::Error;

/// TTL of the packets the gateway originates.
pub const ORIGIN_TTL: u8 = 64;

/// How many bytes of the offending datagram's payload an ICMP error quotes
/// (RFC 792: the IP header and the first 64 bits).
pub const ICMP_QUOTE_LEN: usize = 8;

/// Why a packet was not accepted.
#[derive(Debug, Error, Clone, Copy, PartialEq, Eq)]
pub enum PacketError {
    /// A header failed smoltcp's checks (the layer is named).
    #[error("malformed {0}")]
    Malformed(&'static str),
    /// The frame is neither IPv4 nor IPv6.
    #[error("not an IP frame")]
    NotIp,
    /// The IPv4 header carries options.
    #[error("IPv4 options")]
    IpOptions,
    /// The packet is an IPv4 fragment.
    #[error("IPv4 fragment")]
    Fragment,
    /// Neither TCP, UDP nor ICMP (ICMPv6); for IPv6 also an extension
    /// header the slow path does not walk.
    #[error("IP protocol {0}")]
    Protocol(u8),
    /// An ICMP message of a type the operation does not handle.
    #[error("ICMP type {0}")]
    IcmpType(u8),
}

/// The TCP header fields the flow manager looks at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpSeg {
    /// Source port.
    pub sport: u16,
    /// Destination port.
    pub dport: u16,
    /// Sequence number.
    pub seq: u32,
    /// Acknowledgment number, if the ACK flag is set.
    pub ack: Option<u32>,
    /// SYN flag.
    pub syn: bool,
    /// FIN flag.
    pub fin: bool,
    /// RST flag.
    pub rst: bool,
    /// Payload bytes (from the length fields).
    pub payload_len: u32,
}

impl TcpSeg {
    /// Length in sequence space: payload plus one for SYN and for FIN.
    pub fn seq_len(&self) -> u32 {
        self.payload_len
            .wrapping_add(u32::from(self.syn))
            .wrapping_add(u32::from(self.fin))
    }

    /// A SYN without ACK: the opening segment of an active open.
    pub fn is_syn_only(&self) -> bool {
        self.syn && self.ack.is_none() && !self.rst
    }
}

/// The transport header of an accepted packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L4 {
    /// A TCP segment.
    Tcp(TcpSeg),
    /// A UDP datagram.
    Udp {
        /// Source port.
        sport: u16,
        /// Destination port.
        dport: u16,
    },
    /// An ICMP message (checksum verified).
    Icmp(IcmpMsg),
}

/// The ICMP header fields the flow manager looks at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IcmpMsg {
    /// ICMPv6 rather than ICMPv4.
    pub v6: bool,
    /// Type.
    pub ty: u8,
    /// Code.
    pub code: u8,
    /// The identifier of an echo request or reply (0 for other types).
    pub id: u16,
}

impl IcmpMsg {
    /// An echo request.
    pub fn is_echo_request(&self) -> bool {
        self.ty
            == if self.v6 {
                ICMPV6_ECHO_REQUEST
            } else {
                ICMP_ECHO_REQUEST
            }
    }

    /// An echo reply.
    pub fn is_echo_reply(&self) -> bool {
        self.ty
            == if self.v6 {
                ICMPV6_ECHO_REPLY
            } else {
                ICMP_ECHO_REPLY
            }
    }

    /// An error that quotes the packet it is about (destination
    /// unreachable, time exceeded, parameter problem).
    pub fn is_error(&self) -> bool {
        if self.v6 {
            // Destination unreachable, packet too big, time exceeded,
            // parameter problem (RFC 4443 §2.1).
            (1..=4).contains(&self.ty)
        } else {
            matches!(
                self.ty,
                ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED | ICMP_PARAM_PROBLEM
            )
        }
    }
}

/// An accepted IPv4 or IPv6 packet (see [`parse_ip`]).
#[derive(Clone, Copy, Debug)]
pub struct Packet<'a> {
    /// The IP packet, exactly its total length (IPv4) or header plus
    /// payload length (IPv6).
    pub ip: &'a [u8],
    /// Source address.
    pub src: IpAddr,
    /// Destination address.
    pub dst: IpAddr,
    /// Time to live (IPv4) or hop limit (IPv6) as received.
    pub ttl: u8,
    /// The transport header.
    pub l4: L4,
}

impl Packet<'_> {
    /// The IP protocol number.
    pub fn proto(&self) -> u8 {
        match self.l4 {
            L4::Tcp(_) => datapath_common::PROTO_TCP,
            L4::Udp { .. } => datapath_common::PROTO_UDP,
            L4::Icmp(m) if m.v6 => PROTO_ICMPV6,
            L4::Icmp(_) => datapath_common::PROTO_ICMP,
        }
    }

    /// Whether this is an IPv6 packet.
    pub fn is_v6(&self) -> bool {
        self.src.is_ipv6()
    }

    /// Source and destination ports. ICMP, as in the flow keys: an echo
    /// request's identifier is its source port, an echo reply's its
    /// destination port; other messages have none.
    pub fn ports(&self) -> (u16, u16) {
        match self.l4 {
            L4::Tcp(s) => (s.sport, s.dport),
            L4::Udp { sport, dport } => (sport, dport),
            L4::Icmp(m) if m.is_echo_request() => (m.id, 0),
            L4::Icmp(m) if m.is_echo_reply() => (0, m.id),
            L4::Icmp(_) => (0, 0),
        }
    }

    /// Whether the packet may not be fragmented on its way: the Don't
    /// Fragment flag of IPv4; always for IPv6, which routers never
    /// fragment (RFC 8200 §5).
    pub fn dont_frag(&self) -> bool {
        self.is_v6() || self.ip.get(6).is_some_and(|b| b & 0x40 != 0)
    }

    /// The destination as an address and port.
    pub fn dst_sock(&self) -> SocketAddr {
        SocketAddr::new(self.dst, self.ports().1)
    }
}

/// Parses an Ethernet frame carrying an IPv4 TCP, UDP or ICMP packet, or
/// an IPv6 TCP, UDP or ICMPv6 one.
pub fn parse_frame(frame: &[u8]) -> Result<Packet<'_>, PacketError> {
    let eth = EthernetFrame::new_checked(frame).map_err(|_| PacketError::Malformed("ethernet"))?;
    let payload = frame
        .get(ETHERNET_HEADER_LEN..)
        .ok_or(PacketError::Malformed("ethernet"))?;
    match eth.ethertype() {
        EthernetProtocol::Ipv4 => parse_ip4(payload),
        EthernetProtocol::Ipv6 => parse_ip6(payload),
        _ => Err(PacketError::NotIp),
    }
}

/// Parses an IP packet of either family, by its version nibble.
pub fn parse_ip(bytes: &[u8]) -> Result<Packet<'_>, PacketError> {
    match bytes.first().map(|b| b >> 4) {
        Some(6) => parse_ip6(bytes),
        _ => parse_ip4(bytes),
    }
}

/// Parses an IPv6 packet (trailing bytes beyond its payload length are
/// ignored): version 6, the transport header directly after the fixed
/// header (extension headers are refused as [`PacketError::Protocol`]),
/// TCP or UDP with non-zero ports, or ICMPv6 with a valid checksum.
pub fn parse_ip6(bytes: &[u8]) -> Result<Packet<'_>, PacketError> {
    let ip = Ipv6Packet::new_checked(bytes).map_err(|_| PacketError::Malformed("ipv6"))?;
    if ip.version() != 6 {
        return Err(PacketError::Malformed("ipv6 version"));
    }
    let total = IPV6_HEADER_LEN + usize::from(ip.payload_len());
    let bytes = bytes.get(..total).ok_or(PacketError::Malformed("ipv6"))?;
    let payload = bytes
        .get(IPV6_HEADER_LEN..)
        .ok_or(PacketError::Malformed("ipv6"))?;
    let (src, dst) = (ip.src_addr(), ip.dst_addr());
    let l4 = match ip.next_header() {
        IpProtocol::Tcp => L4::Tcp(parse_tcp(payload)?),
        IpProtocol::Udp => parse_udp(payload, true)?,
        IpProtocol::Icmpv6 => {
            let icmp =
                Icmpv6Packet::new_checked(payload).map_err(|_| PacketError::Malformed("icmpv6"))?;
            if !icmp.verify_checksum(&src, &dst) {
                return Err(PacketError::Malformed("icmpv6 checksum"));
            }
            let ty = u8::from(icmp.msg_type());
            let id = if ty == ICMPV6_ECHO_REQUEST || ty == ICMPV6_ECHO_REPLY {
                icmp.echo_ident()
            } else {
                0
            };
            L4::Icmp(IcmpMsg {
                v6: true,
                ty,
                code: icmp.msg_code(),
                id,
            })
        }
        other => return Err(PacketError::Protocol(u8::from(other))),
    };
    Ok(Packet {
        ip: bytes,
        src: IpAddr::V6(src),
        dst: IpAddr::V6(dst),
        ttl: ip.hop_limit(),
        l4,
    })
}

/// Parses an IPv4 packet (trailing bytes beyond its total length are
/// ignored): header checksum verified, no options, not a fragment, TCP or
/// UDP with non-zero ports, or ICMP with a valid checksum.
pub fn parse_ip4(bytes: &[u8]) -> Result<Packet<'_>, PacketError> {
    let ip = Ipv4Packet::new_checked(bytes).map_err(|_| PacketError::Malformed("ipv4"))?;
    if ip.version() != 4 {
        return Err(PacketError::Malformed("ipv4 version"));
    }
    if !ip.verify_checksum() {
        return Err(PacketError::Malformed("ipv4 checksum"));
    }
    if ip.more_frags() || ip.frag_offset() != 0 {
        return Err(PacketError::Fragment);
    }
    if usize::from(ip.header_len()) != IPV4_HEADER_LEN {
        return Err(PacketError::IpOptions);
    }
    let bytes = bytes
        .get(..usize::from(ip.total_len()))
        .ok_or(PacketError::Malformed("ipv4"))?;
    let payload = bytes
        .get(IPV4_HEADER_LEN..)
        .ok_or(PacketError::Malformed("ipv4"))?;
    let l4 = match ip.next_header() {
        IpProtocol::Tcp => L4::Tcp(parse_tcp(payload)?),
        IpProtocol::Udp => parse_udp(payload, false)?,
        IpProtocol::Icmp => {
            let icmp =
                Icmpv4Packet::new_checked(payload).map_err(|_| PacketError::Malformed("icmp"))?;
            if !icmp.verify_checksum() {
                return Err(PacketError::Malformed("icmp checksum"));
            }
            let ty = u8::from(icmp.msg_type());
            let id = if ty == ICMP_ECHO_REQUEST || ty == ICMP_ECHO_REPLY {
                icmp.echo_ident()
            } else {
                0
            };
            L4::Icmp(IcmpMsg {
                v6: false,
                ty,
                code: icmp.msg_code(),
                id,
            })
        }
        other => return Err(PacketError::Protocol(u8::from(other))),
    };
    Ok(Packet {
        ip: bytes,
        src: IpAddr::V4(ip.src_addr()),
        dst: IpAddr::V4(ip.dst_addr()),
        ttl: ip.hop_limit(),
        l4,
    })
}

/// A UDP header with non-zero ports; over IPv6 (`v6`) a zero checksum is
/// refused too (RFC 8200 §8.1).
fn parse_udp(payload: &[u8], v6: bool) -> Result<L4, PacketError> {
    let udp = UdpPacket::new_checked(payload).map_err(|_| PacketError::Malformed("udp"))?;
    if udp.src_port() == 0 || udp.dst_port() == 0 {
        return Err(PacketError::Malformed("udp port 0"));
    }
    if v6 && udp.checksum() == 0 {
        return Err(PacketError::Malformed("udp checksum 0 over ipv6"));
    }
    Ok(L4::Udp {
        sport: udp.src_port(),
        dport: udp.dst_port(),
    })
}

fn parse_tcp(payload: &[u8]) -> Result<TcpSeg, PacketError> {
    let tcp = TcpPacket::new_checked(payload).map_err(|_| PacketError::Malformed("tcp"))?;
    if tcp.src_port() == 0 || tcp.dst_port() == 0 {
        return Err(PacketError::Malformed("tcp port 0"));
    }
    let payload_len = payload.len().saturating_sub(usize::from(tcp.header_len()));
    Ok(seg_of(&tcp, payload_len))
}

fn seg_of(tcp: &TcpPacket<&[u8]>, payload_len: usize) -> TcpSeg {
    TcpSeg {
        sport: tcp.src_port(),
        dport: tcp.dst_port(),
        seq: seq_u32(tcp.seq_number()),
        ack: tcp.ack().then(|| seq_u32(tcp.ack_number())),
        syn: tcp.syn(),
        fin: tcp.fin(),
        rst: tcp.rst(),
        payload_len: u32::try_from(payload_len).unwrap_or(u32::MAX),
    }
}

fn seq_u32(s: TcpSeqNumber) -> u32 {
    s.0 as u32
}

fn seq_num(v: u32) -> TcpSeqNumber {
    TcpSeqNumber(v as i32)
}

/// A TCP header read from an event record's snap.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SnapSeg {
    /// Source address.
    pub src: IpAddr,
    /// Destination address.
    pub dst: IpAddr,
    /// The TCP header (payload length from the length fields).
    pub seg: TcpSeg,
}

/// Parses the leading bytes of a TCP packet as copied into an event record
/// (Ethernet + IPv4 or IPv6 + TCP headers; the payload and even trailing
/// TCP options may be cut off). The payload length comes from the IP
/// length field and the TCP data offset.
pub fn parse_snap(snap: &[u8]) -> Result<SnapSeg, PacketError> {
    let eth = EthernetFrame::new_checked(snap).map_err(|_| PacketError::Malformed("ethernet"))?;
    let b = snap
        .get(ETHERNET_HEADER_LEN..)
        .ok_or(PacketError::Malformed("ethernet"))?;
    match eth.ethertype() {
        EthernetProtocol::Ipv4 => {}
        EthernetProtocol::Ipv6 => return parse_snap6(b),
        _ => return Err(PacketError::NotIp),
    }
    if b.len() < IPV4_HEADER_LEN {
        return Err(PacketError::Malformed("ipv4"));
    }
    // The snap is shorter than total_len: check by hand what new_checked
    // would, except the total length against the buffer.
    let ip = Ipv4Packet::new_unchecked(b);
    let hl = usize::from(ip.header_len());
    let total = usize::from(ip.total_len());
    if ip.version() != 4 || hl < IPV4_HEADER_LEN || b.len() < hl || total < hl {
        return Err(PacketError::Malformed("ipv4"));
    }
    if ip.next_header() != IpProtocol::Tcp {
        return Err(PacketError::Protocol(u8::from(ip.next_header())));
    }
    let t = b.get(hl..).ok_or(PacketError::Malformed("ipv4"))?;
    if t.len() < TCP_HEADER_LEN {
        return Err(PacketError::Malformed("tcp"));
    }
    let tcp = TcpPacket::new_unchecked(t);
    let th = usize::from(tcp.header_len());
    if th < TCP_HEADER_LEN || total < hl + th {
        return Err(PacketError::Malformed("tcp"));
    }
    Ok(SnapSeg {
        src: IpAddr::V4(ip.src_addr()),
        dst: IpAddr::V4(ip.dst_addr()),
        seg: seg_of(&tcp, total - hl - th),
    })
}

/// [`parse_snap`] for IPv6 (`b` starts at the IPv6 header).
fn parse_snap6(b: &[u8]) -> Result<SnapSeg, PacketError> {
    if b.len() < IPV6_HEADER_LEN {
        return Err(PacketError::Malformed("ipv6"));
    }
    let ip = Ipv6Packet::new_unchecked(b);
    if ip.version() != 6 {
        return Err(PacketError::Malformed("ipv6"));
    }
    if ip.next_header() != IpProtocol::Tcp {
        return Err(PacketError::Protocol(u8::from(ip.next_header())));
    }
    let total = usize::from(ip.payload_len());
    let t = b
        .get(IPV6_HEADER_LEN..)
        .ok_or(PacketError::Malformed("ipv6"))?;
    if t.len() < TCP_HEADER_LEN {
        return Err(PacketError::Malformed("tcp"));
    }
    let tcp = TcpPacket::new_unchecked(t);
    let th = usize::from(tcp.header_len());
    if th < TCP_HEADER_LEN || total < th {
        return Err(PacketError::Malformed("tcp"));
    }
    Ok(SnapSeg {
        src: IpAddr::V6(ip.src_addr()),
        dst: IpAddr::V6(ip.dst_addr()),
        seg: seg_of(&tcp, total - th),
    })
}

/// The address/port rewrite of one flow direction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rewrite {
    /// New source address and port.
    pub src: SocketAddr,
    /// New destination address and port.
    pub dst: SocketAddr,
}

/// Clears the Don't Fragment bit of the IPv4 packet `ip` (fixing its
/// header checksum) so that it may be cut; IPv6 packets and anything too
/// short for an IPv4 header are left alone.
pub fn clear_dont_frag(ip: &mut [u8]) {
    if ip.first().map(|b| b >> 4) != Some(4) {
        return;
    }
    if let Ok(mut p) = Ipv4Packet::new_checked(&mut ip[..])
        && p.dont_frag()
    {
        p.set_dont_frag(false);
        p.fill_checksum();
    }
}

/// Applies `rw` to a copy of the accepted IP packet `ip` (as in
/// [`Packet::ip`]): new addresses and ports, TTL (hop limit) − 1, fresh
/// IPv4 header and full TCP/UDP/ICMP checksums; everything else is kept.
/// The rewrite's addresses must be of the packet's family.
pub fn rewrite(ip: &[u8], rw: Rewrite) -> Result<Vec<u8>, PacketError> {
    let mut buf = ip.to_vec();
    let (proto, l4_at) = match (rw.src.ip(), rw.dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let mut p = Ipv4Packet::new_checked(&mut buf[..])
                .map_err(|_| PacketError::Malformed("ipv4"))?;
            p.set_src_addr(s);
            p.set_dst_addr(d);
            p.set_hop_limit(p.hop_limit().saturating_sub(1));
            p.fill_checksum();
            (p.next_header(), usize::from(p.header_len()))
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let mut p = Ipv6Packet::new_checked(&mut buf[..])
                .map_err(|_| PacketError::Malformed("ipv6"))?;
            p.set_src_addr(s);
            p.set_dst_addr(d);
            p.set_hop_limit(p.hop_limit().saturating_sub(1));
            (p.next_header(), IPV6_HEADER_LEN)
        }
        _ => return Err(PacketError::Malformed("address family")),
    };
    let (src, dst) = (IpAddress::from(rw.src.ip()), IpAddress::from(rw.dst.ip()));
    let l4 = buf.get_mut(l4_at..).ok_or(PacketError::Malformed("ip"))?;
    match proto {
        IpProtocol::Tcp => {
            let mut t = TcpPacket::new_checked(l4).map_err(|_| PacketError::Malformed("tcp"))?;
            t.set_src_port(rw.src.port());
            t.set_dst_port(rw.dst.port());
            t.fill_checksum(&src, &dst);
        }
        IpProtocol::Udp => {
            let mut u = UdpPacket::new_checked(l4).map_err(|_| PacketError::Malformed("udp"))?;
            u.set_src_port(rw.src.port());
            u.set_dst_port(rw.dst.port());
            u.fill_checksum(&src, &dst);
        }
        IpProtocol::Icmp => {
            // Echo only: the identifier is the request's source port and
            // the reply's destination port.
            let mut m =
                Icmpv4Packet::new_checked(l4).map_err(|_| PacketError::Malformed("icmp"))?;
            match u8::from(m.msg_type()) {
                ICMP_ECHO_REQUEST => m.set_echo_ident(rw.src.port()),
                ICMP_ECHO_REPLY => m.set_echo_ident(rw.dst.port()),
                other => return Err(PacketError::IcmpType(other)),
            }
            m.fill_checksum();
        }
        IpProtocol::Icmpv6 => {
            let (IpAddress::Ipv6(s6), IpAddress::Ipv6(d6)) = (src, dst) else {
                return Err(PacketError::Malformed("address family"));
            };
            let mut m =
                Icmpv6Packet::new_checked(l4).map_err(|_| PacketError::Malformed("icmpv6"))?;
            match u8::from(m.msg_type()) {
                ICMPV6_ECHO_REQUEST => m.set_echo_ident(rw.src.port()),
                ICMPV6_ECHO_REPLY => m.set_echo_ident(rw.dst.port()),
                other => return Err(PacketError::IcmpType(other)),
            }
            m.fill_checksum(&s6, &d6);
        }
        other => return Err(PacketError::Protocol(u8::from(other))),
    }
    Ok(buf)
}

/// Wraps an IP packet into an Ethernet frame (the EtherType from its
/// version nibble).
pub fn ethernet_frame(src: EthernetAddress, dst: EthernetAddress, ip: &[u8]) -> Vec<u8> {
    let ethertype = match ip.first().map(|b| b >> 4) {
        Some(6) => EthernetProtocol::Ipv6,
        _ => EthernetProtocol::Ipv4,
    };
    let repr = EthernetRepr {
        src_addr: src,
        dst_addr: dst,
        ethertype,
    };
    let mut buf = vec![0u8; repr.buffer_len() + ip.len()];
    let mut f = EthernetFrame::new_unchecked(&mut buf[..]);
    repr.emit(&mut f);
    f.payload_mut().copy_from_slice(ip);
    buf
}

/// An IP packet carrying a bare TCP RST from `src` to `dst`: flags RST,
/// plus ACK when `ack` is given.
pub fn tcp_rst(src: SocketAddr, dst: SocketAddr, seq: u32, ack: Option<u32>) -> Vec<u8> {
    tcp_segment(src, dst, TcpControl::Rst, seq, ack, 0)
}

/// An IP packet carrying a TCP keepalive from `src` to `dst`: a bare ACK
/// with `seq` (one below what the receiver expects, so it must answer),
/// `ack` and `window`, and no data.
pub fn tcp_keepalive(src: SocketAddr, dst: SocketAddr, seq: u32, ack: u32, window: u16) -> Vec<u8> {
    tcp_segment(src, dst, TcpControl::None, seq, Some(ack), window)
}

/// An IP packet carrying a TCP segment without options or data (of the
/// addresses' family; they must agree).
fn tcp_segment(
    src: SocketAddr,
    dst: SocketAddr,
    control: TcpControl,
    seq: u32,
    ack: Option<u32>,
    window: u16,
) -> Vec<u8> {
    let caps = ChecksumCapabilities::default();
    let tcp = TcpRepr {
        src_port: src.port(),
        dst_port: dst.port(),
        control,
        seq_number: seq_num(seq),
        ack_number: ack.map(seq_num),
        window_len: window,
        window_scale: None,
        max_seg_size: None,
        sack_permitted: false,
        sack_ranges: [None; 3],
        timestamp: None,
        payload: &[],
    };
    let (s, d) = (IpAddress::from(src.ip()), IpAddress::from(dst.ip()));
    let (mut buf, at) = ip_header(src.ip(), dst.ip(), IpProtocol::Tcp, tcp.buffer_len());
    if let Some(l4) = buf.get_mut(at..) {
        tcp.emit(&mut TcpPacket::new_unchecked(l4), &s, &d, &caps);
    }
    buf
}

/// A buffer holding an IP header from `src` to `dst` (hop limit
/// [`ORIGIN_TTL`]) for `payload_len` bytes of `proto`, and the offset of
/// the payload. Mixed families give an IPv6 header with `::` for the
/// address that is not IPv6 (callers never mix them).
pub fn ip_header(
    src: IpAddr,
    dst: IpAddr,
    proto: IpProtocol,
    payload_len: usize,
) -> (Vec<u8>, usize) {
    let caps = ChecksumCapabilities::default();
    if let (IpAddr::V4(s), IpAddr::V4(d)) = (src, dst) {
        let ip = Ipv4Repr {
            src_addr: s,
            dst_addr: d,
            next_header: proto,
            payload_len,
            hop_limit: ORIGIN_TTL,
        };
        let mut buf = vec![0u8; ip.buffer_len() + payload_len];
        ip.emit(&mut Ipv4Packet::new_unchecked(&mut buf[..]), &caps);
        return (buf, ip.buffer_len());
    }
    let v6 = |a: IpAddr| match a {
        IpAddr::V6(a) => a,
        IpAddr::V4(_) => Ipv6Addr::UNSPECIFIED,
    };
    let ip = Ipv6Repr {
        src_addr: v6(src),
        dst_addr: v6(dst),
        next_header: proto,
        payload_len,
        hop_limit: ORIGIN_TTL,
    };
    let mut buf = vec![0u8; ip.buffer_len() + payload_len];
    ip.emit(&mut Ipv6Packet::new_unchecked(&mut buf[..]));
    (buf, ip.buffer_len())
}

/// The RST answering `seg` (sent by `from` to `to`) when it matches no
/// connection, RFC 9293 §3.10.7.1: `<SEQ=SEG.ACK><CTL=RST>` if the segment
/// has an ACK, else `<SEQ=0><ACK=SEG.SEQ+SEG.LEN><CTL=RST,ACK>`. Returns the
/// IP packet from `to` back to `from`.
pub fn rst_reply(from: impl Into<IpAddr>, to: impl Into<IpAddr>, seg: &TcpSeg) -> Vec<u8> {
    let (from, to) = (from.into(), to.into());
    let (seq, ack) = match seg.ack {
        Some(a) => (a, None),
        None => (0, Some(seg.seq.wrapping_add(seg.seq_len()))),
    };
    tcp_rst(
        SocketAddr::new(to, seg.dport),
        SocketAddr::new(from, seg.sport),
        seq,
        ack,
    )
}

/// Which ICMP error to synthesize.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IcmpError {
    /// Destination unreachable with this code.
    Unreachable(Icmpv4DstUnreachable),
    /// Destination unreachable, fragmentation needed and DF set, with the
    /// next hop's MTU (RFC 1191).
    FragNeeded {
        /// The MTU the packet must fit.
        mtu: u16,
    },
    /// Time to live exceeded in transit.
    TtlExceeded,
    /// Fragment reassembly time exceeded.
    ReassemblyTimeout,
}

impl IcmpError {
    /// ICMP type, code and the four bytes after the checksum.
    fn header(self) -> (u8, u8, [u8; 4]) {
        match self {
            Self::Unreachable(code) => (ICMP_DEST_UNREACH, u8::from(code), [0; 4]),
            Self::FragNeeded { mtu } => {
                let m = mtu.to_be_bytes();
                (
                    ICMP_DEST_UNREACH,
                    u8::from(Icmpv4DstUnreachable::FragRequired),
                    [0, 0, m[0], m[1]],
                )
            }
            Self::TtlExceeded => (ICMP_TIME_EXCEEDED, 0, [0; 4]),
            Self::ReassemblyTimeout => (ICMP_TIME_EXCEEDED, 1, [0; 4]),
        }
    }
}

/// ICMPv6 type: echo request.
pub const ICMPV6_ECHO_REQUEST: u8 = 128;
/// ICMPv6 type: echo reply.
pub const ICMPV6_ECHO_REPLY: u8 = 129;
/// IP protocol number of ICMPv6.
pub const PROTO_ICMPV6: u8 = 58;
/// ICMP type: echo reply.
pub const ICMP_ECHO_REPLY: u8 = 0;
/// ICMP type: destination unreachable.
pub const ICMP_DEST_UNREACH: u8 = 3;
/// ICMP type: echo request.
pub const ICMP_ECHO_REQUEST: u8 = 8;
/// ICMP type: time exceeded.
pub const ICMP_TIME_EXCEEDED: u8 = 11;
/// ICMP type: parameter problem.
pub const ICMP_PARAM_PROBLEM: u8 = 12;
/// Length of an ICMP header (type, code, checksum and four more bytes).
pub const ICMP_HEADER_LEN: usize = 8;

/// An ICMP error from `from` to the source of `pkt`. IPv4: quoting its
/// header verbatim and the first [`ICMP_QUOTE_LEN`] bytes of its payload.
/// IPv6: an ICMPv6 error quoting as much of the packet as keeps the error
/// within 1280 bytes (RFC 4443 §2.4 (c)); `from` must then be IPv6.
/// Returns the IP packet.
pub fn icmp_error(from: impl Into<IpAddr>, pkt: &Packet<'_>, kind: IcmpError) -> Vec<u8> {
    match (from.into(), pkt.src) {
        (IpAddr::V4(f), IpAddr::V4(to)) => icmp_error_quoting(f, to, pkt.ip, kind),
        (from, to) => icmp6_error_quoting(v6_of(from), v6_of(to), pkt.ip, kind),
    }
}

/// `a` if it is IPv6, else `::` (never a real source: callers pass
/// addresses of the packet's family).
fn v6_of(a: IpAddr) -> Ipv6Addr {
    match a {
        IpAddr::V6(a) => a,
        IpAddr::V4(_) => Ipv6Addr::UNSPECIFIED,
    }
}

/// The largest ICMPv6 error (RFC 4443 §2.4 (c): the IPv6 minimum MTU).
pub const ICMPV6_ERROR_MAX: usize = 1280;

/// An ICMPv6 error from `from` to `to` about the IPv6 packet `offending`:
/// type and code mapped from `kind` (RFC 4443 §3), quoting as much as fits
/// in [`ICMPV6_ERROR_MAX`]. Packet Too Big never names an MTU below 1280.
pub fn icmp6_error_quoting(
    from: Ipv6Addr,
    to: Ipv6Addr,
    offending: &[u8],
    kind: IcmpError,
) -> Vec<u8> {
    let room = ICMPV6_ERROR_MAX - IPV6_HEADER_LEN - ICMP_HEADER_LEN;
    let quote = offending
        .get(..offending.len().min(room))
        .unwrap_or_default();
    let (ty, code, rest) = match kind {
        IcmpError::Unreachable(c) => {
            let code = match c {
                Icmpv4DstUnreachable::PortUnreachable => 4,
                Icmpv4DstUnreachable::NetProhibited
                | Icmpv4DstUnreachable::HostProhibited
                | Icmpv4DstUnreachable::CommProhibited => 1,
                Icmpv4DstUnreachable::HostUnreachable => 3,
                _ => 0,
            };
            (1, code, [0; 4])
        }
        IcmpError::FragNeeded { mtu } => (2, 0, u32::from(mtu.max(1280)).to_be_bytes()),
        IcmpError::TtlExceeded => (3, 0, [0; 4]),
        IcmpError::ReassemblyTimeout => (3, 1, [0; 4]),
    };
    let icmp_len = ICMP_HEADER_LEN + quote.len();
    let (mut buf, at) = ip_header(
        IpAddr::V6(from),
        IpAddr::V6(to),
        IpProtocol::Icmpv6,
        icmp_len,
    );
    if let Some(m) = buf.get_mut(at..) {
        if let Some(h) = m.get_mut(..ICMP_HEADER_LEN) {
            h.copy_from_slice(&[ty, code, 0, 0, rest[0], rest[1], rest[2], rest[3]]);
        }
        if let Some(d) = m.get_mut(ICMP_HEADER_LEN..) {
            d.copy_from_slice(quote);
        }
        Icmpv6Packet::new_unchecked(m).fill_checksum(&from, &to);
    }
    buf
}

/// An ICMP error from `from` to `to` about the IPv4 packet `offending`
/// (at least its header): the header verbatim (options included) and the
/// first [`ICMP_QUOTE_LEN`] bytes after it, or what there is of them.
/// Returns the IPv4 packet.
pub fn icmp_error_quoting(
    from: Ipv4Addr,
    to: Ipv4Addr,
    offending: &[u8],
    kind: IcmpError,
) -> Vec<u8> {
    let hl = offending
        .first()
        .map_or(IPV4_HEADER_LEN, |b| usize::from(b & 0x0f) * 4);
    let quote_len = offending.len().min(hl + ICMP_QUOTE_LEN);
    let quote = offending.get(..quote_len).unwrap_or_default();
    let (ty, code, rest) = kind.header();
    icmp_message(from, to, ty, code, rest, quote)
}

/// An IPv4 packet from `src` to `dst` (TTL [`ORIGIN_TTL`]) carrying one
/// ICMP message: `ty`, `code`, the four bytes `rest` after the checksum,
/// then `data`; both checksums filled.
pub fn icmp_message(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    ty: u8,
    code: u8,
    rest: [u8; 4],
    data: &[u8],
) -> Vec<u8> {
    let caps = ChecksumCapabilities::default();
    let icmp_len = ICMP_HEADER_LEN + data.len();
    let ip = Ipv4Repr {
        src_addr: src,
        dst_addr: dst,
        next_header: IpProtocol::Icmp,
        payload_len: icmp_len,
        hop_limit: ORIGIN_TTL,
    };
    let mut buf = vec![0u8; ip.buffer_len() + icmp_len];
    let mut p = Ipv4Packet::new_unchecked(&mut buf[..]);
    ip.emit(&mut p, &caps);
    let payload = p.payload_mut();
    if let Some(h) = payload.get_mut(..ICMP_HEADER_LEN) {
        h.copy_from_slice(&[ty, code, 0, 0, rest[0], rest[1], rest[2], rest[3]]);
    }
    if let Some(d) = payload.get_mut(ICMP_HEADER_LEN..) {
        d.copy_from_slice(data);
    }
    Icmpv4Packet::new_unchecked(payload).fill_checksum();
    buf
}

/// Whether `a` is at or after `b` in sequence space (RFC 9293 modular
/// comparison).
pub fn seq_ge(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) >= 0
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(crate) mod tests {
    use smoltcp::wire::{TcpOption, UdpRepr};

    use super::*;

    /// A socket address of either family (test shorthand).
    pub(crate) fn sa4(ip: impl Into<std::net::IpAddr>, port: u16) -> std::net::SocketAddr {
        std::net::SocketAddr::new(ip.into(), port)
    }

    pub(crate) const GUEST_MAC: EthernetAddress =
        EthernetAddress([0x52, 0x54, 0x00, 0x12, 0x34, 0x56]);
    pub(crate) const GW_MAC: EthernetAddress = EthernetAddress([0x52, 0x55, 10, 0, 2, 2]);

    /// What to put in a test TCP segment.
    #[derive(Clone, Debug)]
    pub(crate) struct Seg {
        pub src: SocketAddr,
        pub dst: SocketAddr,
        pub seq: u32,
        pub ack: Option<u32>,
        pub control: TcpControl,
        pub payload: Vec<u8>,
        pub mss: Option<u16>,
        pub ttl: u8,
    }

    impl Seg {
        pub(crate) fn new(src: impl Into<SocketAddr>, dst: impl Into<SocketAddr>) -> Self {
            Self {
                src: src.into(),
                dst: dst.into(),
                seq: 1000,
                ack: None,
                control: TcpControl::None,
                payload: Vec::new(),
                mss: None,
                ttl: 64,
            }
        }
        pub(crate) fn syn(mut self, seq: u32) -> Self {
            self.control = TcpControl::Syn;
            self.seq = seq;
            self.mss = Some(1460);
            self
        }
        pub(crate) fn ctl(mut self, c: TcpControl) -> Self {
            self.control = c;
            self
        }
        pub(crate) fn seq(mut self, s: u32) -> Self {
            self.seq = s;
            self
        }
        pub(crate) fn ack(mut self, a: u32) -> Self {
            self.ack = Some(a);
            self
        }
        pub(crate) fn data(mut self, d: &[u8]) -> Self {
            self.payload = d.to_vec();
            self
        }
        pub(crate) fn ttl(mut self, t: u8) -> Self {
            self.ttl = t;
            self
        }
        /// The IPv4 packet.
        pub(crate) fn ip(&self) -> Vec<u8> {
            let caps = ChecksumCapabilities::default();
            let tcp = TcpRepr {
                src_port: self.src.port(),
                dst_port: self.dst.port(),
                control: self.control,
                seq_number: seq_num(self.seq),
                ack_number: self.ack.map(seq_num),
                window_len: 29200,
                window_scale: self.mss.map(|_| 7),
                max_seg_size: self.mss,
                sack_permitted: self.mss.is_some(),
                sack_ranges: [None; 3],
                timestamp: self
                    .mss
                    .map(|_| smoltcp::wire::TcpTimestampRepr::new(11, 0)),
                payload: &self.payload,
            };
            let (s, d) = (
                IpAddress::from(self.src.ip()),
                IpAddress::from(self.dst.ip()),
            );
            let (mut buf, at) = ip_header(
                self.src.ip(),
                self.dst.ip(),
                IpProtocol::Tcp,
                tcp.buffer_len(),
            );
            set_hop_limit(&mut buf, self.ttl);
            tcp.emit(&mut TcpPacket::new_unchecked(&mut buf[at..]), &s, &d, &caps);
            buf
        }
        pub(crate) fn guest_frame(&self) -> Vec<u8> {
            ethernet_frame(GUEST_MAC, GW_MAC, &self.ip())
        }
        /// The Ethernet frame as received on the uplink.
        pub(crate) fn world_frame(&self) -> Vec<u8> {
            ethernet_frame(
                EthernetAddress([2, 0, 0, 0, 0, 0xaa]),
                EthernetAddress([2, 0, 0, 0, 0, 0xbb]),
                &self.ip(),
            )
        }
    }

    /// A UDP datagram's IPv4 packet.
    /// Sets the TTL (IPv4, checksum refreshed) or hop limit (IPv6) of
    /// the packet in `buf`.
    pub(crate) fn set_hop_limit(buf: &mut [u8], ttl: u8) {
        if buf[0] >> 4 == 6 {
            Ipv6Packet::new_unchecked(buf).set_hop_limit(ttl);
        } else {
            let mut p = Ipv4Packet::new_unchecked(buf);
            p.set_hop_limit(ttl);
            p.fill_checksum();
        }
    }

    pub(crate) fn udp_ip(
        src: impl Into<SocketAddr>,
        dst: impl Into<SocketAddr>,
        payload: &[u8],
        ttl: u8,
    ) -> Vec<u8> {
        let (src, dst) = (src.into(), dst.into());
        let caps = ChecksumCapabilities::default();
        let udp = UdpRepr {
            src_port: src.port(),
            dst_port: dst.port(),
        };
        let (mut buf, at) = ip_header(
            src.ip(),
            dst.ip(),
            IpProtocol::Udp,
            udp.header_len() + payload.len(),
        );
        set_hop_limit(&mut buf, ttl);
        udp.emit(
            &mut UdpPacket::new_unchecked(&mut buf[at..]),
            &IpAddress::from(src.ip()),
            &IpAddress::from(dst.ip()),
            payload.len(),
            |b| b.copy_from_slice(payload),
            &caps,
        );
        buf
    }

    /// Re-parses an IPv4 TCP packet verifying both checksums. (The copy
    /// the returned repr borrows is leaked: tests only.)
    pub(crate) fn check_tcp(ip: &[u8]) -> (Ipv4Repr, TcpRepr<'static>) {
        let ip: &'static [u8] = Box::leak(ip.to_vec().into_boxed_slice());
        let caps = ChecksumCapabilities::default();
        let p = Ipv4Packet::new_checked(ip).unwrap();
        assert!(p.verify_checksum(), "ipv4 checksum");
        let r = Ipv4Repr::parse(&p, &caps).unwrap();
        let t = TcpPacket::new_checked(&ip[20..]).unwrap();
        let src = IpAddress::Ipv4(r.src_addr);
        let dst = IpAddress::Ipv4(r.dst_addr);
        assert!(t.verify_checksum(&src, &dst), "tcp checksum");
        let t = TcpPacket::new_checked(&ip[20..]).unwrap();
        let tr = TcpRepr::parse(&t, &src, &dst, &caps).unwrap();
        (r, tr)
    }

    /// Re-parses an IPv4 UDP packet verifying both checksums; returns the
    /// header and payload.
    pub(crate) fn check_udp(ip: &[u8]) -> (Ipv4Repr, u16, u16, Vec<u8>) {
        let caps = ChecksumCapabilities::default();
        let p = Ipv4Packet::new_checked(ip).unwrap();
        assert!(p.verify_checksum(), "ipv4 checksum");
        let r = Ipv4Repr::parse(&p, &caps).unwrap();
        let u = UdpPacket::new_checked(&ip[20..]).unwrap();
        let src = IpAddress::Ipv4(r.src_addr);
        let dst = IpAddress::Ipv4(r.dst_addr);
        assert!(u.verify_checksum(&src, &dst), "udp checksum");
        (r, u.src_port(), u.dst_port(), u.payload().to_vec())
    }

    fn sa(a: [u8; 4], p: u16) -> SocketAddr {
        sa4(Ipv4Addr::from(a), p)
    }

    #[test]
    fn parses_tcp_with_padding() {
        let s = Seg::new(sa([10, 0, 2, 15], 40000), sa([1, 1, 1, 1], 80))
            .ctl(TcpControl::Fin)
            .seq(7)
            .ack(9)
            .data(b"hi");
        let mut f = s.guest_frame();
        let ip_len = f.len() - 14;
        f.resize(f.len() + 20, 0xee);
        let p = parse_frame(&f).unwrap();
        assert_eq!(p.ip.len(), ip_len);
        assert_eq!(p.src, Ipv4Addr::new(10, 0, 2, 15));
        assert_eq!(p.dst_sock(), sa([1, 1, 1, 1], 80));
        let L4::Tcp(seg) = p.l4 else { panic!() };
        assert_eq!(
            seg,
            TcpSeg {
                sport: 40000,
                dport: 80,
                seq: 7,
                ack: Some(9),
                syn: false,
                fin: true,
                rst: false,
                payload_len: 2
            }
        );
        assert_eq!(seg.seq_len(), 3);
    }

    #[test]
    fn refuses_bad_packets() {
        let s = Seg::new(sa([10, 0, 2, 15], 40000), sa([1, 1, 1, 1], 80));
        let f = s.guest_frame();
        for len in [0, 13, 14, 20, 33, 34, 40, 53] {
            assert!(
                matches!(parse_frame(&f[..len]), Err(PacketError::Malformed(_))),
                "len {len}"
            );
        }
        let mut g = f.clone();
        g[12] = 0x88;
        g[13] = 0xb5;
        assert_eq!(parse_frame(&g).unwrap_err(), PacketError::NotIp);
        // An IPv4 packet under the IPv6 EtherType is not IPv6.
        let mut g = f.clone();
        g[12] = 0x86;
        g[13] = 0xdd;
        assert!(matches!(parse_frame(&g), Err(PacketError::Malformed(_))));
        let mut g = f.clone();
        g[14 + 10] ^= 1;
        assert_eq!(
            parse_frame(&g).unwrap_err(),
            PacketError::Malformed("ipv4 checksum")
        );
        // Fragment.
        let mut g = f.clone();
        {
            let mut p = Ipv4Packet::new_unchecked(&mut g[14..]);
            p.set_more_frags(true);
            p.fill_checksum();
        }
        assert_eq!(parse_frame(&g).unwrap_err(), PacketError::Fragment);
        // Options (4 bytes of NOPs).
        let mut g = f[..34].to_vec();
        g.extend_from_slice(&[1, 1, 1, 0]);
        g.extend_from_slice(&f[34..]);
        {
            let mut p = Ipv4Packet::new_unchecked(&mut g[14..]);
            p.set_header_len(24);
            p.set_total_len(p.total_len() + 4);
            p.fill_checksum();
        }
        assert_eq!(parse_frame(&g).unwrap_err(), PacketError::IpOptions);
        // Another protocol.
        let mut g = f.clone();
        {
            let mut p = Ipv4Packet::new_unchecked(&mut g[14..]);
            p.set_next_header(IpProtocol::Unknown(47));
            p.fill_checksum();
        }
        assert_eq!(parse_frame(&g).unwrap_err(), PacketError::Protocol(47));
        // ICMP with a bad checksum.
        let mut g = f.clone();
        {
            let mut p = Ipv4Packet::new_unchecked(&mut g[14..]);
            p.set_next_header(IpProtocol::Icmp);
            p.fill_checksum();
        }
        assert_eq!(
            parse_frame(&g).unwrap_err(),
            PacketError::Malformed("icmp checksum")
        );
        // TCP data offset beyond the packet.
        let mut g = f.clone();
        g[14 + 20 + 12] = 0xf0;
        assert_eq!(parse_frame(&g).unwrap_err(), PacketError::Malformed("tcp"));
        // Port 0.
        let mut g = f;
        g[14 + 20] = 0;
        g[14 + 21] = 0;
        assert_eq!(
            parse_frame(&g).unwrap_err(),
            PacketError::Malformed("tcp port 0")
        );
    }

    #[test]
    fn parses_empty_udp() {
        let ip = udp_ip(sa([10, 0, 2, 15], 5000), sa([8, 8, 8, 8], 53), &[], 64);
        let f = ethernet_frame(GUEST_MAC, GW_MAC, &ip);
        assert_eq!(f.len(), 42);
        let p = parse_frame(&f).unwrap();
        assert_eq!(
            p.l4,
            L4::Udp {
                sport: 5000,
                dport: 53
            }
        );
        // UDP length field beyond the packet.
        let mut g = f;
        g[14 + 20 + 5] = 9;
        assert_eq!(parse_frame(&g).unwrap_err(), PacketError::Malformed("udp"));
    }

    #[test]
    fn rewrite_keeps_options_and_fixes_checksums() {
        let s = Seg::new(sa([10, 0, 2, 15], 40000), sa([1, 1, 1, 1], 80)).syn(12345);
        let ip = s.ip();
        let rw = Rewrite {
            src: sa([192, 0, 2, 2], 50001),
            dst: sa([1, 1, 1, 1], 80),
        };
        let out = rewrite(&ip, rw).unwrap();
        assert_eq!(out.len(), ip.len());
        let (r, t) = check_tcp(&out);
        assert_eq!(r.src_addr, Ipv4Addr::new(192, 0, 2, 2));
        assert_eq!(r.hop_limit, 63);
        assert_eq!(t.src_port, 50001);
        assert_eq!(t.control, TcpControl::Syn);
        assert_eq!(t.seq_number, seq_num(12345));
        assert_eq!(t.max_seg_size, Some(1460));
        assert_eq!(t.window_scale, Some(7));
        assert!(t.sack_permitted);
        // Option bytes are identical.
        assert_eq!(&out[40..ip.len()], &ip[40..]);
        let opts = TcpPacket::new_checked(&out[20..]).unwrap();
        let (_, first) = TcpOption::parse(opts.options()).unwrap();
        assert_eq!(first, TcpOption::MaxSegmentSize(1460));
    }

    #[test]
    fn rewrite_fixes_a_partial_checksum() {
        // An offloaded packet carries garbage in the TCP checksum.
        let s = Seg::new(sa([10, 0, 2, 15], 40000), sa([1, 1, 1, 1], 80))
            .ack(5)
            .data(b"payload");
        let mut ip = s.ip();
        ip[20 + 16] = 0x12;
        ip[20 + 17] = 0x34;
        let out = rewrite(
            &ip,
            Rewrite {
                src: sa([192, 0, 2, 2], 1),
                dst: sa([1, 1, 1, 1], 80),
            },
        )
        .unwrap();
        let (_, t) = check_tcp(&out);
        assert_eq!(t.payload, b"payload");
    }

    #[test]
    fn rewrite_udp() {
        let ip = udp_ip(
            sa([10, 0, 2, 15], 5000),
            sa([10, 0, 2, 3], 53),
            b"query",
            64,
        );
        let out = rewrite(
            &ip,
            Rewrite {
                src: sa([192, 0, 2, 2], 40000),
                dst: sa([9, 9, 9, 9], 53),
            },
        )
        .unwrap();
        let (r, sp, dp, payload) = check_udp(&out);
        assert_eq!(
            (r.src_addr, r.dst_addr),
            (Ipv4Addr::new(192, 0, 2, 2), Ipv4Addr::new(9, 9, 9, 9))
        );
        assert_eq!((sp, dp), (40000, 53));
        assert_eq!(payload, b"query");
        assert_eq!(r.hop_limit, 63);
    }

    #[test]
    fn rst_reply_follows_rfc9293() {
        let guest = Ipv4Addr::new(10, 0, 2, 15);
        let remote = Ipv4Addr::new(1, 1, 1, 1);
        // With ACK: <SEQ=SEG.ACK><CTL=RST>.
        let seg = TcpSeg {
            sport: 40000,
            dport: 80,
            seq: 100,
            ack: Some(5555),
            syn: false,
            fin: false,
            rst: false,
            payload_len: 10,
        };
        let ip = rst_reply(guest, remote, &seg);
        let (r, t) = check_tcp(&ip);
        assert_eq!((r.src_addr, r.dst_addr), (remote, guest));
        assert_eq!((t.src_port, t.dst_port), (80, 40000));
        assert_eq!(t.control, TcpControl::Rst);
        assert_eq!(t.seq_number, seq_num(5555));
        assert_eq!(t.ack_number, None);
        // Without ACK: <SEQ=0><ACK=SEG.SEQ+SEG.LEN><CTL=RST,ACK>.
        let seg = TcpSeg {
            ack: None,
            fin: true,
            seq: u32::MAX - 3,
            ..seg
        };
        let ip = rst_reply(guest, remote, &seg);
        let (_, t) = check_tcp(&ip);
        assert_eq!(t.seq_number, seq_num(0));
        assert_eq!(t.ack_number, Some(seq_num(7))); // wraps: MAX-3 + 11
    }

    #[test]
    fn icmp_error_quotes_header_and_8_bytes() {
        let mut ip = udp_ip(
            sa([10, 0, 2, 15], 5000),
            sa([127, 0, 0, 1], 9),
            b"0123456789",
            64,
        );
        {
            // Identification and TOS that a re-synthesized header would lose.
            let mut p = Ipv4Packet::new_unchecked(&mut ip[..]);
            p.set_ident(0xbeef);
            p.set_dscp(10);
            p.set_dont_frag(false);
            p.fill_checksum();
        }
        let p = parse_ip(&ip).unwrap();
        let out = icmp_error(
            Ipv4Addr::new(10, 0, 2, 2),
            &p,
            IcmpError::Unreachable(Icmpv4DstUnreachable::CommProhibited),
        );
        let caps = ChecksumCapabilities::default();
        let op = Ipv4Packet::new_checked(&out[..]).unwrap();
        let or = Ipv4Repr::parse(&op, &caps).unwrap();
        assert_eq!(or.src_addr, Ipv4Addr::new(10, 0, 2, 2));
        assert_eq!(or.dst_addr, Ipv4Addr::new(10, 0, 2, 15));
        let icmp = Icmpv4Packet::new_checked(op.payload()).unwrap();
        assert!(icmp.verify_checksum());
        assert_eq!(
            icmp.msg_type(),
            smoltcp::wire::Icmpv4Message::DstUnreachable
        );
        assert_eq!(icmp.msg_code(), 13);
        // The original header verbatim (total length and checksum as sent:
        // smoltcp's own parser wants the whole datagram, so check by hand),
        // then the first 8 payload bytes.
        let quoted = icmp.data();
        assert_eq!(quoted.len(), 28);
        let q = Ipv4Packet::new_unchecked(quoted);
        assert!(q.verify_checksum());
        assert_eq!(q.src_addr(), Ipv4Addr::new(10, 0, 2, 15));
        assert_eq!(q.dst_addr(), Ipv4Addr::new(127, 0, 0, 1));
        assert_eq!(usize::from(q.total_len()), ip.len());
        assert_eq!(q.next_header(), IpProtocol::Udp);
        assert_eq!(quoted, &ip[..28]);
        assert_eq!(out.len(), 20 + 8 + 20 + 8);

        let out = icmp_error(Ipv4Addr::new(10, 0, 2, 2), &p, IcmpError::TtlExceeded);
        let op = Ipv4Packet::new_checked(&out[..]).unwrap();
        let icmp = Icmpv4Packet::new_checked(op.payload()).unwrap();
        assert!(icmp.verify_checksum());
        assert_eq!(icmp.msg_type(), smoltcp::wire::Icmpv4Message::TimeExceeded);
        assert_eq!(icmp.msg_code(), 0);
        assert_eq!(icmp.data(), &ip[..28]);
    }

    #[test]
    fn snap_gives_payload_length_from_headers() {
        let s = Seg::new(sa([10, 0, 2, 15], 40000), sa([1, 1, 1, 1], 80))
            .ctl(TcpControl::Fin)
            .seq(10)
            .ack(20)
            .data(&[7u8; 500]);
        let f = s.guest_frame();
        let snap = &f[..128];
        let ss = parse_snap(snap).unwrap();
        assert_eq!(ss.src, Ipv4Addr::new(10, 0, 2, 15));
        assert_eq!(ss.seg.payload_len, 500);
        assert!(ss.seg.fin);
        assert_eq!(ss.seg.seq.wrapping_add(ss.seg.seq_len()), 511);
        for len in [0, 20, 40, 14 + 20 + 19] {
            assert!(parse_snap(&f[..len]).is_err(), "len {len}");
        }
        // total_len smaller than the headers.
        let mut g = f[..128].to_vec();
        g[14 + 2] = 0;
        g[14 + 3] = 30;
        assert!(parse_snap(&g).is_err());
    }

    #[test]
    fn sequence_comparison_wraps() {
        assert!(seq_ge(5, 5));
        assert!(seq_ge(6, 5));
        assert!(!seq_ge(4, 5));
        assert!(seq_ge(3, u32::MAX - 2));
        assert!(!seq_ge(u32::MAX - 2, 3));
    }
}
