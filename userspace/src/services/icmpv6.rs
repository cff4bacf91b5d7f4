//! ICMPv6 the gateway originates: echo replies and errors.
//!
//! # Theory of operation
//!
//! Like [`super::echo`] for IPv4, [`echo_reply`] answers the guest's pings
//! to the gateway's own IPv6 addresses (gateway, link-local router, DNS):
//! same identifier, sequence number and payload, from the pinged address,
//! hop limit 64, the checksum over the IPv6 pseudo-header (RFC 4443 §4.2).
//!
//! [`error`] builds an ICMPv6 error about a packet from the guest, as a
//! router does (RFC 4443 §2.4): from the gateway's global address, quoting
//! as much of the offending packet as keeps the error within the minimum
//! MTU of 1280 bytes (§2.4 (c)); never about an ICMPv6 error, a packet to
//! or from a multicast address or from the unspecified address (§2.4 (e)).
//! The caller rate-limits (§2.4 (f)).
//!
//! Frames are parsed with smoltcp's `wire` views; malformed input is a
//! [`FrameError`], and nothing a guest sends can make this module panic.

use std::net::Ipv6Addr;

use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    EthernetAddress, EthernetFrame, EthernetProtocol, EthernetRepr, Icmpv6DstUnreachable,
    Icmpv6Message, Icmpv6Packet, Icmpv6Repr, IpProtocol, Ipv6Packet, Ipv6Repr,
};

use crate::config::GuestNet6Config;
use crate::services::error::FrameError;

/// Hop limit of the messages the gateway originates.
pub const HOP_LIMIT: u8 = 64;
/// The IPv6 minimum MTU, the bound on an ICMPv6 error (RFC 8200 §5).
pub const MIN_MTU: usize = 1280;
/// IPv6 and ICMPv6 error headers in front of the quote.
const ERROR_HEADERS: usize = 40 + 8;

/// The guest's ICMPv6 echo request to one of the gateway's addresses,
/// answered with a complete Ethernet frame; `Ok(None)` for any other
/// ICMPv6 message or destination.
pub fn echo_reply(cfg: &GuestNet6Config, frame: &[u8]) -> Result<Option<Vec<u8>>, FrameError> {
    let eth = EthernetFrame::new_checked(frame).map_err(FrameError::malformed("ethernet"))?;
    if eth.ethertype() != EthernetProtocol::Ipv6 {
        return Err(FrameError::Unsupported("ethertype (not ipv6)"));
    }
    let ip = Ipv6Packet::new_checked(eth.payload()).map_err(FrameError::malformed("ipv6"))?;
    let ip_repr = Ipv6Repr::parse(&ip).map_err(FrameError::malformed("ipv6"))?;
    if ip_repr.next_header != IpProtocol::Icmpv6 {
        return Err(FrameError::Unsupported("ip protocol (not icmpv6)"));
    }
    if !cfg.is_gateway_addr(ip_repr.dst_addr) {
        return Ok(None);
    }
    let icmp = Icmpv6Packet::new_checked(ip.payload()).map_err(FrameError::malformed("icmpv6"))?;
    if icmp.msg_type() != Icmpv6Message::EchoRequest {
        return Ok(None);
    }
    let caps = ChecksumCapabilities::default();
    let Icmpv6Repr::EchoRequest {
        ident,
        seq_no,
        data,
    } = Icmpv6Repr::parse(&ip_repr.src_addr, &ip_repr.dst_addr, &icmp, &caps)
        .map_err(FrameError::malformed("icmpv6"))?
    else {
        return Ok(None);
    };
    if ip_repr.src_addr.is_unspecified() || ip_repr.src_addr.is_multicast() {
        return Err(FrameError::Unsupported("icmpv6 echo source not unicast"));
    }
    if !eth.src_addr().is_unicast() {
        return Err(FrameError::Unsupported(
            "icmpv6 echo sender mac not unicast",
        ));
    }
    let reply = Icmpv6Repr::EchoReply {
        ident,
        seq_no,
        data,
    };
    Ok(Some(build(
        cfg.gateway_mac,
        eth.src_addr(),
        ip_repr.dst_addr,
        ip_repr.src_addr,
        &reply,
    )))
}

/// Why the gateway refuses a packet from the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// No route to the destination (RFC 4443 §3.1 code 0).
    NoRoute,
    /// Communication administratively prohibited (code 1).
    Prohibited,
    /// Port unreachable (code 4).
    PortUnreachable,
}

/// The ICMPv6 Destination Unreachable frame for the guest's IPv6 frame
/// `frame` (see the module documentation), or `None` where RFC 4443
/// forbids an error.
pub fn error(cfg: &GuestNet6Config, frame: &[u8], why: Refusal) -> Option<Vec<u8>> {
    let eth = EthernetFrame::new_checked(frame).ok()?;
    if eth.ethertype() != EthernetProtocol::Ipv6 || !eth.src_addr().is_unicast() {
        return None;
    }
    let ip = Ipv6Packet::new_checked(eth.payload()).ok()?;
    let ip_repr = Ipv6Repr::parse(&ip).ok()?;
    let src = ip_repr.src_addr;
    if src.is_unspecified() || src.is_multicast() || ip_repr.dst_addr.is_multicast() {
        return None;
    }
    if ip_repr.next_header == IpProtocol::Icmpv6 {
        // An error (types 0-127), or a message too short to tell, is
        // never answered with another error.
        let ty = ip.payload().first().copied()?;
        if ty < 128 {
            return None;
        }
    }
    let packet = eth.payload();
    let whole = ip
        .total_len()
        .min(packet.len())
        .min(MIN_MTU - ERROR_HEADERS);
    let quoted = packet.get(40..whole).unwrap_or_default();
    let reason = match why {
        Refusal::NoRoute => Icmpv6DstUnreachable::NoRoute,
        Refusal::Prohibited => Icmpv6DstUnreachable::AdminProhibit,
        Refusal::PortUnreachable => Icmpv6DstUnreachable::PortUnreachable,
    };
    let msg = Icmpv6Repr::DstUnreachable {
        reason,
        header: ip_repr,
        data: quoted,
    };
    let mut reply = build(cfg.gateway_mac, eth.src_addr(), cfg.gateway, src, &msg);
    // The quote as it was sent (smoltcp re-emits the quoted header from
    // its Repr, without traffic class and flow label).
    let icmp_at = 14 + 40;
    if let (Some(dst), Some(orig)) = (
        reply.get_mut(icmp_at + 8..icmp_at + 8 + whole),
        packet.get(..whole),
    ) {
        dst.copy_from_slice(orig);
    }
    if let Some(icmp) = reply.get_mut(icmp_at..) {
        Icmpv6Packet::new_unchecked(icmp).fill_checksum(&cfg.gateway, &src);
    }
    Some(reply)
}

/// An Ethernet frame from `src_mac` to `dst_mac` carrying `msg` from
/// `src` to `dst`.
fn build(
    src_mac: EthernetAddress,
    dst_mac: EthernetAddress,
    src: Ipv6Addr,
    dst: Ipv6Addr,
    msg: &Icmpv6Repr<'_>,
) -> Vec<u8> {
    let ip = Ipv6Repr {
        src_addr: src,
        dst_addr: dst,
        next_header: IpProtocol::Icmpv6,
        payload_len: msg.buffer_len(),
        hop_limit: HOP_LIMIT,
    };
    let eth = EthernetRepr {
        src_addr: src_mac,
        dst_addr: dst_mac,
        ethertype: EthernetProtocol::Ipv6,
    };
    let mut frame = vec![0u8; eth.buffer_len() + ip.buffer_len() + msg.buffer_len()];
    let mut f = EthernetFrame::new_unchecked(&mut frame[..]);
    eth.emit(&mut f);
    let mut p = Ipv6Packet::new_unchecked(f.payload_mut());
    ip.emit(&mut p);
    let mut icmp = Icmpv6Packet::new_unchecked(p.payload_mut());
    msg.emit(&src, &dst, &mut icmp, &ChecksumCapabilities::default());
    frame
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)]
mod tests {
    use super::*;
    use smoltcp::wire::{UdpPacket, UdpRepr};

    const GUEST_MAC: EthernetAddress = EthernetAddress([0x02, 0, 0, 0, 0, 0x15]);
    const GUEST: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0x15);
    const WORLD: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x80);

    /// A frame from the guest: IPv6 from `src` to `dst` with `next` and
    /// `payload` (already complete, checksums included).
    fn frame(src: Ipv6Addr, dst: Ipv6Addr, next: IpProtocol, payload: &[u8]) -> Vec<u8> {
        let ip = Ipv6Repr {
            src_addr: src,
            dst_addr: dst,
            next_header: next,
            payload_len: payload.len(),
            hop_limit: 64,
        };
        let mut f = vec![0u8; 14 + 40 + payload.len()];
        let mut e = EthernetFrame::new_unchecked(&mut f[..]);
        EthernetRepr {
            src_addr: GUEST_MAC,
            dst_addr: GuestNet6Config::default().gateway_mac,
            ethertype: EthernetProtocol::Ipv6,
        }
        .emit(&mut e);
        let mut p = Ipv6Packet::new_unchecked(e.payload_mut());
        ip.emit(&mut p);
        p.payload_mut().copy_from_slice(payload);
        // Traffic class and flow label, to see them quoted verbatim.
        f[14] = 0x6a;
        f[15] = 0xbc;
        f
    }

    fn icmp(src: Ipv6Addr, dst: Ipv6Addr, msg: &Icmpv6Repr<'_>) -> Vec<u8> {
        let mut b = vec![0u8; msg.buffer_len()];
        msg.emit(
            &src,
            &dst,
            &mut Icmpv6Packet::new_unchecked(&mut b[..]),
            &ChecksumCapabilities::default(),
        );
        b
    }

    fn udp(src: Ipv6Addr, dst: Ipv6Addr, len: usize) -> Vec<u8> {
        let data = vec![0x5au8; len];
        let repr = UdpRepr {
            src_port: 40000,
            dst_port: 53,
        };
        let mut b = vec![0u8; 8 + len];
        repr.emit(
            &mut UdpPacket::new_unchecked(&mut b[..]),
            &src.into(),
            &dst.into(),
            len,
            |p| p.copy_from_slice(&data),
            &ChecksumCapabilities::default(),
        );
        b
    }

    /// The reply's IPv6 header and ICMPv6 bytes, checksum verified.
    fn parse(reply: &[u8]) -> (Ipv6Repr, Vec<u8>) {
        let eth = EthernetFrame::new_checked(reply).unwrap();
        assert_eq!(eth.dst_addr(), GUEST_MAC);
        let ip = Ipv6Packet::new_checked(eth.payload()).unwrap();
        let repr = Ipv6Repr::parse(&ip).unwrap();
        let pkt = Icmpv6Packet::new_checked(ip.payload()).unwrap();
        assert!(pkt.verify_checksum(&repr.src_addr, &repr.dst_addr));
        (repr, ip.payload().to_vec())
    }

    #[test]
    fn echo_to_each_gateway_address() {
        let c = GuestNet6Config::default();
        for dst in [c.gateway, c.dns, c.router_ll] {
            let req = Icmpv6Repr::EchoRequest {
                ident: 7,
                seq_no: 9,
                data: b"hello",
            };
            let f = frame(GUEST, dst, IpProtocol::Icmpv6, &icmp(GUEST, dst, &req));
            let (ip, body) = parse(&echo_reply(&c, &f).unwrap().unwrap());
            assert_eq!((ip.src_addr, ip.dst_addr, ip.hop_limit), (dst, GUEST, 64));
            let pkt = Icmpv6Packet::new_checked(&body[..]).unwrap();
            assert_eq!(
                Icmpv6Repr::parse(&dst, &GUEST, &pkt, &ChecksumCapabilities::default()).unwrap(),
                Icmpv6Repr::EchoReply {
                    ident: 7,
                    seq_no: 9,
                    data: b"hello"
                }
            );
        }
        // Not for the gateway, or not a request: no answer.
        let req = Icmpv6Repr::EchoRequest {
            ident: 1,
            seq_no: 1,
            data: b"",
        };
        let f = frame(GUEST, WORLD, IpProtocol::Icmpv6, &icmp(GUEST, WORLD, &req));
        assert_eq!(echo_reply(&c, &f).unwrap(), None);
        let rep = Icmpv6Repr::EchoReply {
            ident: 1,
            seq_no: 1,
            data: b"",
        };
        let f = frame(
            GUEST,
            c.gateway,
            IpProtocol::Icmpv6,
            &icmp(GUEST, c.gateway, &rep),
        );
        assert_eq!(echo_reply(&c, &f).unwrap(), None);
        // A bad checksum is an error.
        let mut f = frame(
            GUEST,
            c.gateway,
            IpProtocol::Icmpv6,
            &icmp(GUEST, c.gateway, &req),
        );
        let n = f.len();
        f[n - 1] ^= 1;
        assert!(echo_reply(&c, &f).is_err());
    }

    #[test]
    fn error_quotes_what_fits_in_1280_bytes() {
        let c = GuestNet6Config::default();
        for (len, quoted) in [(10, 40 + 8 + 10), (3000, MIN_MTU - ERROR_HEADERS)] {
            let f = frame(GUEST, WORLD, IpProtocol::Udp, &udp(GUEST, WORLD, len));
            let reply = error(&c, &f, Refusal::NoRoute).unwrap();
            let (ip, body) = parse(&reply);
            assert_eq!((ip.src_addr, ip.dst_addr), (c.gateway, GUEST));
            assert!(reply.len() - 14 <= MIN_MTU);
            assert_eq!(body[0], 1, "destination unreachable");
            assert_eq!(body[1], 0, "no route");
            assert_eq!(body.len(), 8 + quoted);
            // Verbatim, traffic class and flow label included.
            assert_eq!(&body[8..], &f[14..14 + quoted]);
        }
        let f = frame(GUEST, c.gateway, IpProtocol::Udp, &udp(GUEST, c.gateway, 4));
        let (_, body) = parse(&error(&c, &f, Refusal::PortUnreachable).unwrap());
        assert_eq!((body[0], body[1]), (1, 4));
        let (_, body) = parse(&error(&c, &f, Refusal::Prohibited).unwrap());
        assert_eq!((body[0], body[1]), (1, 1));
    }

    #[test]
    fn no_error_about_errors_multicast_or_unspecified() {
        let c = GuestNet6Config::default();
        let quote = [0u8; 48];
        let err = Icmpv6Repr::DstUnreachable {
            reason: Icmpv6DstUnreachable::NoRoute,
            header: Ipv6Repr {
                src_addr: WORLD,
                dst_addr: GUEST,
                next_header: IpProtocol::Udp,
                payload_len: 8,
                hop_limit: 1,
            },
            data: &quote[..8],
        };
        let f = frame(GUEST, WORLD, IpProtocol::Icmpv6, &icmp(GUEST, WORLD, &err));
        assert_eq!(error(&c, &f, Refusal::NoRoute), None);
        let mcast = Ipv6Addr::new(0xff0e, 0, 0, 0, 0, 0, 0, 0x101);
        let f = frame(GUEST, mcast, IpProtocol::Udp, &udp(GUEST, mcast, 4));
        assert_eq!(error(&c, &f, Refusal::NoRoute), None);
        let un = Ipv6Addr::UNSPECIFIED;
        let f = frame(un, WORLD, IpProtocol::Udp, &udp(un, WORLD, 4));
        assert_eq!(error(&c, &f, Refusal::NoRoute), None);
        // An echo request is not an error: it gets one.
        let req = Icmpv6Repr::EchoRequest {
            ident: 1,
            seq_no: 1,
            data: b"x",
        };
        let f = frame(GUEST, WORLD, IpProtocol::Icmpv6, &icmp(GUEST, WORLD, &req));
        assert!(error(&c, &f, Refusal::NoRoute).is_some());
    }

    #[test]
    fn garbage_never_panics() {
        let c = GuestNet6Config::default();
        let f = frame(
            GUEST,
            c.gateway,
            IpProtocol::Udp,
            &udp(GUEST, c.gateway, 40),
        );
        for n in 0..f.len() {
            let _ = echo_reply(&c, &f[..n]);
            let _ = error(&c, &f[..n], Refusal::NoRoute);
        }
        // A payload length beyond the frame.
        let mut g = f.clone();
        g[14 + 4] = 0xff;
        let _ = echo_reply(&c, &g);
        let _ = error(&c, &g, Refusal::NoRoute);
    }
}
