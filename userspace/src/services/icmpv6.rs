//! ICMPv6 echo answered by the gateway.
//!
//! # Theory of operation
//!
//! Like [`super::echo`] for IPv4, [`echo_reply`] answers the guest's pings
//! to the gateway's own IPv6 addresses (gateway, link-local router, DNS):
//! same identifier, sequence number and payload, from the pinged address,
//! hop limit 64, the checksum over the IPv6 pseudo-header (RFC 4443 §4.2).
//!
//! ICMPv6 errors about the guest's packets are the flow manager's
//! (`flow::packet::icmp6_error_quoting`), like ICMPv4 ones.
//!
//! Frames are parsed with smoltcp's `wire` views; malformed input is a
//! [`FrameError`], and nothing a guest sends can make this module panic.

use std::net::Ipv6Addr;

use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    EthernetAddress, EthernetFrame, EthernetProtocol, EthernetRepr, Icmpv6Message, Icmpv6Packet,
    Icmpv6Repr, IpProtocol, Ipv6Packet, Ipv6Repr,
};

use crate::config::GuestNet6Config;
use crate::services::error::FrameError;

/// Hop limit of the messages the gateway originates.
pub const HOP_LIMIT: u8 = 64;

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
        }
        // A payload length beyond the frame.
        let mut g = f.clone();
        g[14 + 4] = 0xff;
        let _ = echo_reply(&c, &g);
    }
}
