//! ICMPv4 echo ("ping") answered by the gateway.
//!
//! # Theory of operation
//!
//! The gateway and DNS forwarder addresses are virtual, so tapgate itself
//! answers the guest's pings to them; `ping 10.0.2.2` is the first thing
//! anyone tries. [`echo_reply`] parses the Ethernet, IPv4 and ICMP headers
//! with smoltcp's `wire` views, verifying the IPv4 and ICMP checksums, and
//! for an echo request to one of the gateway's addresses builds the complete
//! Ethernet frame of the echo reply: same identifier, sequence number and
//! payload, from the pinged address to the sender, TTL 64, fresh checksums,
//! no IP options, Ethernet source `cfg.gateway_mac` and destination the
//! request's source MAC.
//!
//! ICMP for other hosts and ICMP messages other than echo request need no
//! answer here (`Ok(None)`). Fragmented ICMP is not reassembled: it is
//! refused as unsupported. Malformed input is a [`FrameError`]; nothing the
//! guest sends can make this module panic. The function keeps no state.

use std::net::Ipv4Addr;

use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    EthernetFrame, EthernetProtocol, EthernetRepr, Icmpv4Message, Icmpv4Packet, Icmpv4Repr,
    IpProtocol, Ipv4Packet, Ipv4Repr,
};

use crate::config::GuestNetConfig;
use crate::services::error::FrameError;

/// TTL of the replies the gateway originates.
const REPLY_TTL: u8 = 64;

/// Answers an ICMPv4 echo request addressed to one of the gateway's virtual
/// addresses with a complete Ethernet frame (dst MAC = the request's source
/// MAC, src = `cfg.gateway_mac`, same id/seq/payload, TTL 64, correct IPv4
/// and ICMP checksums).
///
/// Returns `Ok(None)` for ICMP not for the gateway or not an echo request.
/// A fragmented ICMP packet (MF set or offset != 0) is
/// `Err(Unsupported("fragmented icmp"))`; frames that are not IPv4/ICMP,
/// truncated, or fail a checksum are errors too.
pub fn echo_reply(cfg: &GuestNetConfig, frame: &[u8]) -> Result<Option<Vec<u8>>, FrameError> {
    let eth = EthernetFrame::new_checked(frame).map_err(FrameError::malformed("ethernet"))?;
    let eth_repr = EthernetRepr::parse(&eth).map_err(FrameError::malformed("ethernet"))?;
    if eth_repr.ethertype != EthernetProtocol::Ipv4 {
        return Err(FrameError::Unsupported("ethertype (not ipv4)"));
    }

    let ip = Ipv4Packet::new_checked(eth.payload()).map_err(FrameError::malformed("ipv4"))?;
    if ip.next_header() != IpProtocol::Icmp {
        return Err(FrameError::Unsupported("ip protocol (not icmp)"));
    }
    // smoltcp (without its reassembly feature) refuses fragments in
    // Ipv4Repr::parse; tell them apart from malformed packets.
    if ip.more_frags() || ip.frag_offset() != 0 {
        return Err(FrameError::Unsupported("fragmented icmp"));
    }
    let caps = ChecksumCapabilities::default();
    let ip_repr = Ipv4Repr::parse(&ip, &caps).map_err(FrameError::malformed("ipv4"))?;

    if !cfg.is_gateway_addr(ip_repr.dst_addr) {
        log::debug!(
            "icmp: {} -> {} is not for the gateway",
            ip_repr.src_addr,
            ip_repr.dst_addr
        );
        return Ok(None);
    }

    let icmp = Icmpv4Packet::new_checked(ip.payload()).map_err(FrameError::malformed("icmp"))?;
    if icmp.msg_type() != Icmpv4Message::EchoRequest {
        log::debug!(
            "icmp: ignoring {} from {} to {}",
            icmp.msg_type(),
            ip_repr.src_addr,
            ip_repr.dst_addr
        );
        return Ok(None);
    }
    let Icmpv4Repr::EchoRequest {
        ident,
        seq_no,
        data,
    } = Icmpv4Repr::parse(&icmp, &caps).map_err(FrameError::malformed("icmp"))?
    else {
        // msg_type was checked above; parse yields EchoRequest or an error.
        return Ok(None);
    };

    if !is_unicast_host(ip_repr.src_addr) {
        return Err(FrameError::Unsupported("icmp echo source not unicast"));
    }
    if !eth_repr.src_addr.is_unicast() {
        return Err(FrameError::Unsupported("icmp echo sender mac not unicast"));
    }

    log::debug!(
        "icmp: echo reply {} -> {} id={ident} seq={seq_no} len={}",
        ip_repr.dst_addr,
        ip_repr.src_addr,
        data.len()
    );
    let icmp_repr = Icmpv4Repr::EchoReply {
        ident,
        seq_no,
        data,
    };
    let reply_ip = Ipv4Repr {
        src_addr: ip_repr.dst_addr,
        dst_addr: ip_repr.src_addr,
        next_header: IpProtocol::Icmp,
        payload_len: icmp_repr.buffer_len(),
        hop_limit: REPLY_TTL,
    };
    let reply_eth = EthernetRepr {
        src_addr: cfg.gateway_mac,
        dst_addr: eth_repr.src_addr,
        ethertype: EthernetProtocol::Ipv4,
    };

    let mut buf =
        vec![0u8; reply_eth.buffer_len() + reply_ip.buffer_len() + icmp_repr.buffer_len()];
    let mut eth_out = EthernetFrame::new_unchecked(&mut buf[..]);
    reply_eth.emit(&mut eth_out);
    let mut ip_out = Ipv4Packet::new_unchecked(eth_out.payload_mut());
    reply_ip.emit(&mut ip_out, &caps);
    icmp_repr.emit(
        &mut Icmpv4Packet::new_unchecked(ip_out.payload_mut()),
        &caps,
    );
    Ok(Some(buf))
}

/// Whether `ip` can be the source of a packet we answer (not unspecified,
/// broadcast or multicast).
fn is_unicast_host(ip: Ipv4Addr) -> bool {
    !(ip.is_unspecified() || ip.is_broadcast() || ip.is_multicast())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use smoltcp::wire::EthernetAddress;

    use super::*;

    const GUEST_MAC: EthernetAddress = EthernetAddress([0x52, 0x54, 0x00, 0x12, 0x34, 0x56]);

    fn cfg() -> GuestNetConfig {
        GuestNetConfig::default()
    }

    /// Builds an IPv4 frame from the guest carrying `icmp`.
    fn icmp_frame(src: Ipv4Addr, dst: Ipv4Addr, icmp: &Icmpv4Repr) -> Vec<u8> {
        let caps = ChecksumCapabilities::default();
        let eth = EthernetRepr {
            src_addr: GUEST_MAC,
            dst_addr: cfg().gateway_mac,
            ethertype: EthernetProtocol::Ipv4,
        };
        let ip = Ipv4Repr {
            src_addr: src,
            dst_addr: dst,
            next_header: IpProtocol::Icmp,
            payload_len: icmp.buffer_len(),
            hop_limit: 64,
        };
        let mut buf = vec![0u8; 14 + 20 + icmp.buffer_len()];
        let mut f = EthernetFrame::new_unchecked(&mut buf[..]);
        eth.emit(&mut f);
        let mut p = Ipv4Packet::new_unchecked(f.payload_mut());
        ip.emit(&mut p, &caps);
        icmp.emit(&mut Icmpv4Packet::new_unchecked(p.payload_mut()), &caps);
        buf
    }

    fn echo(dst: Ipv4Addr, ident: u16, seq_no: u16, data: &[u8]) -> Vec<u8> {
        icmp_frame(
            cfg().guest_addr,
            dst,
            &Icmpv4Repr::EchoRequest {
                ident,
                seq_no,
                data,
            },
        )
    }

    /// Re-parses a generated frame with checksum verification and checks the
    /// reply fields.
    fn check_reply(frame: &[u8], from: Ipv4Addr, ident: u16, seq_no: u16, payload: &[u8]) {
        let c = cfg();
        let caps = ChecksumCapabilities::default();
        let eth = EthernetFrame::new_checked(frame).unwrap();
        let eth_repr = EthernetRepr::parse(&eth).unwrap();
        assert_eq!(eth_repr.src_addr, c.gateway_mac);
        assert_eq!(eth_repr.dst_addr, GUEST_MAC);
        assert_eq!(eth_repr.ethertype, EthernetProtocol::Ipv4);

        let ip = Ipv4Packet::new_checked(eth.payload()).unwrap();
        assert!(ip.verify_checksum());
        assert_eq!(ip.header_len(), 20);
        assert!(!ip.more_frags());
        assert_eq!(ip.frag_offset(), 0);
        let ip_repr = Ipv4Repr::parse(&ip, &caps).unwrap();
        assert_eq!(ip_repr.src_addr, from);
        assert_eq!(ip_repr.dst_addr, c.guest_addr);
        assert_eq!(ip_repr.hop_limit, 64);
        assert_eq!(ip_repr.next_header, IpProtocol::Icmp);
        assert_eq!(usize::from(ip.total_len()), frame.len() - 14);

        let icmp = Icmpv4Packet::new_checked(ip.payload()).unwrap();
        assert!(icmp.verify_checksum());
        assert_eq!(
            Icmpv4Repr::parse(&icmp, &caps).unwrap(),
            Icmpv4Repr::EchoReply {
                ident,
                seq_no,
                data: payload
            }
        );
    }

    #[test]
    fn replies_to_echo_for_gateway() {
        let c = cfg();
        let payload: Vec<u8> = (0..56u8).collect();
        let out = echo_reply(&c, &echo(c.gateway, 0x1234, 7, &payload))
            .unwrap()
            .unwrap();
        assert_eq!(out.len(), 14 + 20 + 8 + 56);
        check_reply(&out, c.gateway, 0x1234, 7, &payload);
    }

    #[test]
    fn replies_to_echo_for_dns() {
        let c = cfg();
        let out = echo_reply(&c, &echo(c.dns, 1, 0xffff, b"hello"))
            .unwrap()
            .unwrap();
        check_reply(&out, c.dns, 1, 0xffff, b"hello");
    }

    #[test]
    fn replies_to_empty_and_large_payloads() {
        let c = cfg();
        let out = echo_reply(&c, &echo(c.gateway, 9, 9, &[]))
            .unwrap()
            .unwrap();
        check_reply(&out, c.gateway, 9, 9, &[]);

        let big = vec![0xa5u8; 1472];
        let out = echo_reply(&c, &echo(c.gateway, 10, 11, &big))
            .unwrap()
            .unwrap();
        assert_eq!(out.len(), 1514);
        check_reply(&out, c.gateway, 10, 11, &big);
    }

    #[test]
    fn ignores_echo_for_other_host() {
        let c = cfg();
        let frame = echo(Ipv4Addr::new(1, 1, 1, 1), 1, 1, b"x");
        assert_eq!(echo_reply(&c, &frame).unwrap(), None);
        let frame = echo(c.broadcast(), 1, 1, b"x");
        assert_eq!(echo_reply(&c, &frame).unwrap(), None);
    }

    #[test]
    fn ignores_non_echo_request() {
        let c = cfg();
        let frame = icmp_frame(
            c.guest_addr,
            c.gateway,
            &Icmpv4Repr::EchoReply {
                ident: 1,
                seq_no: 2,
                data: b"pong",
            },
        );
        assert_eq!(echo_reply(&c, &frame).unwrap(), None);

        // A timestamp request (type 13), which smoltcp cannot represent.
        let mut frame = echo(c.gateway, 1, 2, &[0; 12]);
        {
            let mut eth = EthernetFrame::new_unchecked(&mut frame[..]);
            let mut ip = Ipv4Packet::new_unchecked(eth.payload_mut());
            let mut icmp = Icmpv4Packet::new_unchecked(ip.payload_mut());
            icmp.set_msg_type(Icmpv4Message::Timestamp);
            icmp.fill_checksum();
        }
        assert_eq!(echo_reply(&c, &frame).unwrap(), None);
    }

    #[test]
    fn rejects_fragments() {
        let c = cfg();
        for (mf, offset) in [(true, 0), (false, 8), (true, 16)] {
            let mut frame = echo(c.gateway, 1, 2, &[0; 32]);
            {
                let mut eth = EthernetFrame::new_unchecked(&mut frame[..]);
                let mut ip = Ipv4Packet::new_unchecked(eth.payload_mut());
                ip.set_dont_frag(false);
                ip.set_more_frags(mf);
                ip.set_frag_offset(offset);
                ip.fill_checksum();
            }
            assert_eq!(
                echo_reply(&c, &frame),
                Err(FrameError::Unsupported("fragmented icmp")),
                "mf={mf} offset={offset}"
            );
        }
    }

    #[test]
    fn rejects_bad_ip_checksum() {
        let c = cfg();
        let mut frame = echo(c.gateway, 1, 2, b"abc");
        frame[14 + 10] ^= 0xff;
        assert!(matches!(
            echo_reply(&c, &frame),
            Err(FrameError::Malformed { layer: "ipv4", .. })
        ));
    }

    #[test]
    fn rejects_bad_icmp_checksum() {
        let c = cfg();
        let mut frame = echo(c.gateway, 1, 2, b"abc");
        let last = frame.len() - 1;
        frame[last] ^= 0x01;
        assert!(matches!(
            echo_reply(&c, &frame),
            Err(FrameError::Malformed { layer: "icmp", .. })
        ));
    }

    #[test]
    fn rejects_truncated_frames() {
        let c = cfg();
        let frame = echo(c.gateway, 1, 2, b"abcdefgh");
        for len in [0, 10, 14, 20, 33, 14 + 20 + 4, frame.len() - 1] {
            assert!(
                matches!(
                    echo_reply(&c, &frame[..len]),
                    Err(FrameError::Malformed { .. })
                ),
                "len {len}"
            );
        }
    }

    #[test]
    fn accepts_ethernet_padding() {
        let c = cfg();
        let mut frame = echo(c.gateway, 3, 4, b"");
        frame.resize(60, 0);
        let out = echo_reply(&c, &frame).unwrap().unwrap();
        check_reply(&out, c.gateway, 3, 4, b"");
    }

    #[test]
    fn skips_ip_options() {
        // Request with a 4-byte IP option (NOP x3 + EOL): the reply carries
        // the same ICMP payload and a plain 20-byte header.
        let c = cfg();
        let plain = echo(c.gateway, 5, 6, b"opts");
        let mut frame = plain[..34].to_vec();
        frame.extend_from_slice(&[1, 1, 1, 0]);
        frame.extend_from_slice(&plain[34..]);
        {
            let mut eth = EthernetFrame::new_unchecked(&mut frame[..]);
            let mut ip = Ipv4Packet::new_unchecked(eth.payload_mut());
            ip.set_header_len(24);
            ip.set_total_len(ip.total_len() + 4);
            ip.fill_checksum();
        }
        let out = echo_reply(&c, &frame).unwrap().unwrap();
        check_reply(&out, c.gateway, 5, 6, b"opts");
    }

    #[test]
    fn rejects_non_icmp() {
        let c = cfg();
        let mut frame = echo(c.gateway, 1, 2, b"");
        {
            let mut eth = EthernetFrame::new_unchecked(&mut frame[..]);
            let mut ip = Ipv4Packet::new_unchecked(eth.payload_mut());
            ip.set_next_header(IpProtocol::Udp);
            ip.fill_checksum();
        }
        assert_eq!(
            echo_reply(&c, &frame),
            Err(FrameError::Unsupported("ip protocol (not icmp)"))
        );
        let mut frame = echo(c.gateway, 1, 2, b"");
        EthernetFrame::new_unchecked(&mut frame[..]).set_ethertype(EthernetProtocol::Arp);
        assert_eq!(
            echo_reply(&c, &frame),
            Err(FrameError::Unsupported("ethertype (not ipv4)"))
        );
    }

    #[test]
    fn rejects_broadcast_source() {
        let c = cfg();
        let frame = icmp_frame(
            Ipv4Addr::BROADCAST,
            c.gateway,
            &Icmpv4Repr::EchoRequest {
                ident: 1,
                seq_no: 1,
                data: b"",
            },
        );
        assert_eq!(
            echo_reply(&c, &frame),
            Err(FrameError::Unsupported("icmp echo source not unicast"))
        );
    }
}
