//! ARP for the gateway's virtual addresses.
//!
//! # Theory of operation
//!
//! The gateway (`cfg.gateway`) and the DNS forwarder (`cfg.dns`) exist only
//! in tapgate, so nobody else on the tap link will answer the guest's ARP
//! requests for them. [`reply`] parses an Ethernet frame carrying ARP with
//! smoltcp's `wire` views and, when it is a request for one of those two
//! addresses, builds the complete Ethernet frame of the reply: both virtual
//! addresses resolve to `cfg.gateway_mac`, exactly as QEMU's slirp does.
//!
//! Everything else that is well-formed ARP — replies, requests for other
//! addresses (the guest probing its own address, looking for a neighbour
//! that does not exist), gratuitous announcements — needs no answer and
//! yields `Ok(None)`. Frames that are not Ethernet/IPv4 ARP, or that are
//! truncated, are reported as a [`FrameError`]. The function keeps no state
//! and never panics on guest input.

use smoltcp::wire::{
    ArpOperation, ArpPacket, ArpRepr, EthernetAddress, EthernetFrame, EthernetProtocol,
    EthernetRepr,
};

use crate::config::GuestNetConfig;
use crate::services::error::FrameError;

/// Answers an ARP request from the guest for one of the gateway's virtual
/// addresses (`cfg.gateway` or `cfg.dns`) with a complete Ethernet frame;
/// `Ok(None)` for any other ARP (replies, requests for other addresses,
/// gratuitous ARP of the guest).
///
/// The reply resolves the requested address to `cfg.gateway_mac` and is
/// sent to the requester's hardware address. Frames that are not ARP, not
/// Ethernet/IPv4 ARP, truncated, or whose sender hardware address is not
/// unicast are errors.
pub fn reply(cfg: &GuestNetConfig, frame: &[u8]) -> Result<Option<Vec<u8>>, FrameError> {
    let eth = EthernetFrame::new_checked(frame).map_err(FrameError::malformed("ethernet"))?;
    let eth_repr = EthernetRepr::parse(&eth).map_err(FrameError::malformed("ethernet"))?;
    if eth_repr.ethertype != EthernetProtocol::Arp {
        return Err(FrameError::Unsupported("ethertype (not arp)"));
    }

    let arp = ArpPacket::new_checked(eth.payload()).map_err(FrameError::malformed("arp"))?;
    let arp_repr = ArpRepr::parse(&arp).map_err(FrameError::malformed("arp"))?;
    let ArpRepr::EthernetIpv4 {
        operation,
        source_hardware_addr,
        source_protocol_addr,
        target_protocol_addr,
        ..
    } = arp_repr
    else {
        return Err(FrameError::Unsupported("arp hardware/protocol"));
    };

    if operation != ArpOperation::Request {
        log::debug!(
            "arp: ignoring {operation:?} from {source_hardware_addr}/{source_protocol_addr}"
        );
        return Ok(None);
    }
    if !cfg.is_gateway_addr(target_protocol_addr) {
        log::debug!(
            "arp: ignoring request from {source_protocol_addr} for {target_protocol_addr} (not ours)"
        );
        return Ok(None);
    }
    if !source_hardware_addr.is_unicast() {
        return Err(FrameError::Unsupported("arp sender not unicast"));
    }

    log::debug!(
        "arp: {target_protocol_addr} is-at {} (asked by {source_hardware_addr}/{source_protocol_addr})",
        cfg.gateway_mac
    );
    let reply_repr = ArpRepr::EthernetIpv4 {
        operation: ArpOperation::Reply,
        source_hardware_addr: cfg.gateway_mac,
        source_protocol_addr: target_protocol_addr,
        target_hardware_addr: source_hardware_addr,
        target_protocol_addr: source_protocol_addr,
    };
    Ok(Some(build_frame(
        cfg.gateway_mac,
        source_hardware_addr,
        &reply_repr,
    )))
}

/// Emits `repr` behind an Ethernet header from `src` to `dst`.
fn build_frame(src: EthernetAddress, dst: EthernetAddress, repr: &ArpRepr) -> Vec<u8> {
    let eth_repr = EthernetRepr {
        src_addr: src,
        dst_addr: dst,
        ethertype: EthernetProtocol::Arp,
    };
    let mut buf = vec![0u8; eth_repr.buffer_len() + repr.buffer_len()];
    let mut eth = EthernetFrame::new_unchecked(&mut buf[..]);
    eth_repr.emit(&mut eth);
    repr.emit(&mut ArpPacket::new_unchecked(eth.payload_mut()));
    buf
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    const GUEST_MAC: EthernetAddress = EthernetAddress([0x52, 0x54, 0x00, 0x12, 0x34, 0x56]);

    fn cfg() -> GuestNetConfig {
        GuestNetConfig::default()
    }

    /// Builds an ARP frame from the guest with the given fields.
    fn arp_frame(
        op: ArpOperation,
        sha: EthernetAddress,
        spa: Ipv4Addr,
        tha: EthernetAddress,
        tpa: Ipv4Addr,
    ) -> Vec<u8> {
        let repr = ArpRepr::EthernetIpv4 {
            operation: op,
            source_hardware_addr: sha,
            source_protocol_addr: spa,
            target_hardware_addr: tha,
            target_protocol_addr: tpa,
        };
        let dst = if op == ArpOperation::Request {
            EthernetAddress::BROADCAST
        } else {
            tha
        };
        build_frame(sha, dst, &repr)
    }

    fn request(tpa: Ipv4Addr) -> Vec<u8> {
        arp_frame(
            ArpOperation::Request,
            GUEST_MAC,
            cfg().guest_addr,
            EthernetAddress([0; 6]),
            tpa,
        )
    }

    /// Parses a generated reply and returns (ethernet repr, arp repr).
    fn parse_reply(frame: &[u8]) -> (EthernetRepr, ArpRepr) {
        let eth = EthernetFrame::new_checked(frame).unwrap();
        let eth_repr = EthernetRepr::parse(&eth).unwrap();
        let arp = ArpPacket::new_checked(eth.payload()).unwrap();
        (eth_repr, ArpRepr::parse(&arp).unwrap())
    }

    fn assert_reply_for(target: Ipv4Addr) {
        let c = cfg();
        let out = reply(&c, &request(target)).unwrap().unwrap();
        assert_eq!(out.len(), 14 + 28);
        let (eth, arp) = parse_reply(&out);
        assert_eq!(eth.src_addr, c.gateway_mac);
        assert_eq!(eth.dst_addr, GUEST_MAC);
        assert_eq!(eth.ethertype, EthernetProtocol::Arp);
        assert_eq!(
            arp,
            ArpRepr::EthernetIpv4 {
                operation: ArpOperation::Reply,
                source_hardware_addr: c.gateway_mac,
                source_protocol_addr: target,
                target_hardware_addr: GUEST_MAC,
                target_protocol_addr: c.guest_addr,
            }
        );
    }

    #[test]
    fn answers_request_for_gateway() {
        assert_reply_for(cfg().gateway);
    }

    #[test]
    fn answers_request_for_dns() {
        assert_reply_for(cfg().dns);
    }

    #[test]
    fn answers_with_configured_mac_and_addresses() {
        let c = GuestNetConfig {
            gateway: Ipv4Addr::new(192, 168, 7, 1),
            dns: Ipv4Addr::new(192, 168, 7, 53),
            guest_addr: Ipv4Addr::new(192, 168, 7, 100),
            gateway_mac: EthernetAddress([0x02, 0, 0, 0, 0, 0x01]),
            ..GuestNetConfig::default()
        };
        let frame = arp_frame(
            ArpOperation::Request,
            GUEST_MAC,
            c.guest_addr,
            EthernetAddress([0; 6]),
            c.dns,
        );
        let (eth, arp) = parse_reply(&reply(&c, &frame).unwrap().unwrap());
        assert_eq!(eth.src_addr, c.gateway_mac);
        let ArpRepr::EthernetIpv4 {
            source_hardware_addr,
            source_protocol_addr,
            target_protocol_addr,
            ..
        } = arp
        else {
            panic!("not ethernet/ipv4 arp");
        };
        assert_eq!(source_hardware_addr, c.gateway_mac);
        assert_eq!(source_protocol_addr, c.dns);
        assert_eq!(target_protocol_addr, c.guest_addr);
    }

    #[test]
    fn answers_probe_from_unconfigured_guest() {
        // RFC 5227 probe: sender IP 0.0.0.0. The reply goes to the MAC.
        let c = cfg();
        let frame = arp_frame(
            ArpOperation::Request,
            GUEST_MAC,
            Ipv4Addr::UNSPECIFIED,
            EthernetAddress([0; 6]),
            c.gateway,
        );
        let (eth, arp) = parse_reply(&reply(&c, &frame).unwrap().unwrap());
        assert_eq!(eth.dst_addr, GUEST_MAC);
        let ArpRepr::EthernetIpv4 {
            target_protocol_addr,
            ..
        } = arp
        else {
            panic!("not ethernet/ipv4 arp");
        };
        assert_eq!(target_protocol_addr, Ipv4Addr::UNSPECIFIED);
    }

    #[test]
    fn ignores_request_for_other_address() {
        let c = cfg();
        assert_eq!(
            reply(&c, &request(Ipv4Addr::new(10, 0, 2, 99))).unwrap(),
            None
        );
        // The guest looking for itself (duplicate address detection).
        assert_eq!(reply(&c, &request(c.guest_addr)).unwrap(), None);
    }

    #[test]
    fn ignores_gratuitous_arp() {
        let c = cfg();
        for op in [ArpOperation::Request, ArpOperation::Reply] {
            let frame = arp_frame(
                op,
                GUEST_MAC,
                c.guest_addr,
                EthernetAddress::BROADCAST,
                c.guest_addr,
            );
            assert_eq!(reply(&c, &frame).unwrap(), None, "{op:?}");
        }
    }

    #[test]
    fn ignores_replies_even_about_gateway() {
        let c = cfg();
        let frame = arp_frame(
            ArpOperation::Reply,
            GUEST_MAC,
            c.guest_addr,
            c.gateway_mac,
            c.gateway,
        );
        assert_eq!(reply(&c, &frame).unwrap(), None);
    }

    #[test]
    fn rejects_truncated_frames() {
        let c = cfg();
        let frame = request(c.gateway);
        for len in [0, 5, 13, 14, 20, 14 + 27] {
            let err = reply(&c, &frame[..len]).unwrap_err();
            assert!(
                matches!(err, FrameError::Malformed { .. }),
                "len {len}: {err:?}"
            );
        }
    }

    #[test]
    fn accepts_trailing_padding() {
        let c = cfg();
        let mut frame = request(c.gateway);
        frame.resize(60, 0);
        assert!(reply(&c, &frame).unwrap().is_some());
    }

    #[test]
    fn rejects_non_arp_ethertype() {
        let c = cfg();
        let mut frame = request(c.gateway);
        EthernetFrame::new_unchecked(&mut frame[..]).set_ethertype(EthernetProtocol::Ipv4);
        assert_eq!(
            reply(&c, &frame),
            Err(FrameError::Unsupported("ethertype (not arp)"))
        );
    }

    #[test]
    fn rejects_non_ethernet_ipv4_arp() {
        let c = cfg();
        let mut frame = request(c.gateway);
        // hlen 8 instead of 6
        frame[14 + 4] = 8;
        assert!(matches!(
            reply(&c, &frame),
            Err(FrameError::Malformed { layer: "arp", .. })
        ));
    }

    #[test]
    fn rejects_multicast_sender() {
        let c = cfg();
        let frame = arp_frame(
            ArpOperation::Request,
            EthernetAddress::BROADCAST,
            c.guest_addr,
            EthernetAddress([0; 6]),
            c.gateway,
        );
        assert_eq!(
            reply(&c, &frame),
            Err(FrameError::Unsupported("arp sender not unicast"))
        );
    }
}
