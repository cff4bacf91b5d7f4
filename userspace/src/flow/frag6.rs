//! ICMPv6 "fragment reassembly time exceeded" for the guest.
//!
//! # Theory of operation
//!
//! The daemon reassembles the guest's IPv6 fragments ([`crate::frag`]);
//! when a datagram times out with its first fragment received, RFC 8200
//! §4.5 asks for an ICMPv6 Time Exceeded, code 1, to the fragment's source.
//! [`FlowManager::reassembly_timeout6_to_guest`] sends it, as
//! `reassembly_timeout_to_guest` (`icmp.rs`) does for IPv4: only about a
//! datagram from one of the guest's own addresses to a unicast destination,
//! from the gateway's IPv6 address, quoting what the reassembler kept of
//! the first fragment (at most 1232 bytes, so the error fits 1280), through
//! the rate limit shared by every synthesized error and counted with them.
//! Never about an ICMPv6 error (RFC 4443 §2.4 (e)) or a Redirect: when the
//! first fragment's data is ICMPv6, its type must be an informational one
//! other than Redirect.

use std::net::IpAddr;

use smoltcp::wire::{EthernetAddress, IPV6_HEADER_LEN, Ipv6Packet};

use super::{
    FlowManager, FlowMaps, NatPorts, Output,
    packet::{self, IcmpError, PROTO_ICMPV6},
};
use crate::frag;

/// ICMPv6 type: Redirect (RFC 4861), never answered with an error.
const ICMPV6_REDIRECT: u8 = 137;

/// Whether the fragmented datagram whose first fragment starts `first`
/// may be answered with an ICMPv6 error: not an ICMPv6 error or Redirect
/// (nor ICMPv6 whose type is not in the quote).
fn may_answer6(first: &[u8]) -> bool {
    match frag::fragment6_payload(first) {
        Some((PROTO_ICMPV6, data)) => data
            .first()
            .is_some_and(|&ty| ty >= 128 && ty != ICMPV6_REDIRECT),
        Some(_) => true,
        None => false,
    }
}

impl<M: FlowMaps, P: NatPorts> FlowManager<M, P> {
    /// Queues ICMPv6 "fragment reassembly time exceeded" (type 3, code 1)
    /// for the guest about a datagram whose fragments from the guest timed
    /// out; `first` is the first fragment as the reassembler quotes it
    /// ([`crate::frag::Expired::first`]). Nothing without IPv6, for a
    /// source that is not the guest's, a multicast destination, or an
    /// ICMPv6 error; within the rate limit of synthesized errors.
    pub fn reassembly_timeout6_to_guest(
        &mut self,
        first: &[u8],
        guest_mac: EthernetAddress,
        out: &mut Vec<Output>,
    ) {
        // Only the headers are looked at: the payload length names the
        // whole first fragment, which the quote may cut.
        let Some(header) = first.get(..IPV6_HEADER_LEN) else {
            return;
        };
        let ip = Ipv6Packet::new_unchecked(header);
        if ip.version() != 6 {
            return;
        }
        let (src, dst) = (ip.src_addr(), ip.dst_addr());
        let Some(gateway) = self.guest6.as_ref().map(|g| g.gateway) else {
            return;
        };
        if !self.is_guest_source(IpAddr::V6(src))
            || !super::is_unicast(IpAddr::V6(dst))
            || !guest_mac.is_unicast()
            || !may_answer6(first)
        {
            return;
        }
        let kind = IcmpError::ReassemblyTimeout;
        let ip = packet::icmp6_error_quoting(gateway, src, first, kind);
        self.emit_to_guest(ip, kind, guest_mac, out);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)]
mod tests {
    use std::net::Ipv6Addr;

    use datapath_common::{FlowEntry, FlowKey, FlowState};
    use smoltcp::wire::{EthernetFrame, EthernetProtocol, Icmpv6Packet};

    use super::*;
    use crate::flow::icmp::IcmpKind;
    use crate::{
        config::{GuestNet6Config, GuestNetConfig},
        flow::{FlowConfig, HostAddrs, MapsError, NatError, NatLease},
        frag::{FragOutcome, Reassembler, ReassemblyLimits, fragment_with_ident},
    };

    /// Maps that hold nothing: no flow is ever made here.
    struct NoMaps;

    impl FlowMaps for NoMaps {
        fn insert(&mut self, _: &FlowKey, _: &FlowEntry) -> Result<(), MapsError> {
            Err(MapsError::Full)
        }
        fn update_state(&mut self, _: &FlowKey, _: FlowState, _: u8) -> Result<(), MapsError> {
            Err(MapsError::NotFound)
        }
        fn get(&self, _: &FlowKey) -> Result<Option<FlowEntry>, MapsError> {
            Ok(None)
        }
        fn remove(&mut self, _: &FlowKey) -> Result<(), MapsError> {
            Ok(())
        }
        fn activity(&self, _: u32) -> u64 {
            0
        }
        fn entries(&self) -> Result<Vec<(FlowKey, FlowEntry)>, MapsError> {
            Ok(Vec::new())
        }
        fn clear_activity(&mut self, _: u32, _: u64) {}
    }

    /// Ports that are never reserved.
    struct NoPorts;

    impl NatPorts for NoPorts {
        fn reserve(&mut self, proto: u8, _: IpAddr) -> Result<NatLease, NatError> {
            Err(NatError::Protocol(proto))
        }
        fn hold(&mut self, proto: u8, _: IpAddr, _: u16) -> Result<NatLease, NatError> {
            Err(NatError::Protocol(proto))
        }
        fn source_for(&mut self, remote: IpAddr) -> Result<IpAddr, NatError> {
            Err(NatError::Exhausted(remote))
        }
    }

    const GUEST_MAC: EthernetAddress = EthernetAddress([0x02, 0, 0, 0, 0, 0x15]);
    const GUEST6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0x5054, 0xff, 0xfe12, 0x3456);
    const REMOTE6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 0x10);

    fn manager(ipv6: bool) -> FlowManager<NoMaps, NoPorts> {
        let mut cfg = FlowConfig::new(GuestNetConfig::default(), 2, 3);
        cfg.host_addrs = HostAddrs::fixed(Vec::<IpAddr>::new());
        if ipv6 {
            cfg.guest6 = Some(GuestNet6Config::default());
        }
        FlowManager::new(cfg, NoMaps, NoPorts)
    }

    /// An IPv6 packet `src → dst` with `next` and `payload`.
    fn ip6(src: Ipv6Addr, dst: Ipv6Addr, next: u8, payload: &[u8]) -> Vec<u8> {
        let mut b = vec![0x60, 0, 0, 0];
        b.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        b.extend_from_slice(&[next, 64]);
        b.extend_from_slice(&src.octets());
        b.extend_from_slice(&dst.octets());
        b.extend_from_slice(payload);
        b
    }

    /// The quote of a timed-out datagram: the first fragment of `ip` cut
    /// at 1500, as the reassembler keeps it.
    fn quote_of(ip: &[u8]) -> Vec<u8> {
        let frags = fragment_with_ident(ip, 1500, 0x1234).unwrap();
        let mut r = Reassembler::new(ReassemblyLimits::default());
        let start = std::time::Instant::now();
        assert_eq!(r.push(&frags[0], start), FragOutcome::Pending);
        let gone = r.expire(start + ReassemblyLimits::default().timeout);
        gone[0].first.clone().unwrap()
    }

    fn udp_datagram(src: Ipv6Addr, dst: Ipv6Addr) -> Vec<u8> {
        let mut udp = vec![0x9c, 0x40, 0, 7];
        udp.extend_from_slice(&[0; 4]);
        udp.extend((0..4000).map(|i| i as u8));
        ip6(src, dst, 17, &udp)
    }

    #[test]
    fn time_exceeded_code_1_quoting_the_first_fragment() {
        let mut m = manager(true);
        let quote = quote_of(&udp_datagram(GUEST6, REMOTE6));
        assert_eq!(quote.len(), frag::QUOTE6_MAX);
        let mut out = Vec::new();
        m.reassembly_timeout6_to_guest(&quote, GUEST_MAC, &mut out);
        let [Output::ToGuest(frame)] = &out[..] else {
            panic!("{out:?}");
        };
        let eth = EthernetFrame::new_checked(&frame[..]).unwrap();
        assert_eq!(eth.ethertype(), EthernetProtocol::Ipv6);
        assert_eq!(eth.dst_addr(), GUEST_MAC);
        assert_eq!(eth.src_addr(), GuestNet6Config::default().gateway_mac);
        let ip = Ipv6Packet::new_checked(eth.payload()).unwrap();
        let gw = GuestNet6Config::default().gateway;
        assert_eq!((ip.src_addr(), ip.dst_addr()), (gw, GUEST6));
        assert_eq!(ip.next_header(), smoltcp::wire::IpProtocol::Icmpv6);
        assert_eq!(eth.payload().len(), 1280);
        let icmp = Icmpv6Packet::new_checked(ip.payload()).unwrap();
        assert!(icmp.verify_checksum(&gw, &GUEST6));
        assert_eq!((u8::from(icmp.msg_type()), icmp.msg_code()), (3, 1));
        assert_eq!(&ip.payload()[8..], &quote[..]);
        let s = m.stats();
        assert_eq!(s.icmp.sent_to_guest.get(IcmpKind::ReassemblyTimeout), 1);
        assert_eq!(s.icmp_sent, 1);
    }

    #[test]
    fn only_about_the_guests_own_datagrams() {
        let gw = GuestNet6Config::default().gateway;
        let multicast = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
        let outside = Ipv6Addr::new(0xfd01, 0, 0, 0, 0, 0, 0, 0x15);
        // An ICMPv6 error and a Redirect, fragmented (big enough to be).
        let mut error = vec![1, 4, 0, 0, 0, 0, 0, 0];
        error.extend_from_slice(&[0; 3000]);
        let mut redirect = error.clone();
        redirect[0] = ICMPV6_REDIRECT;
        let mut echo = error.clone();
        echo[..2].copy_from_slice(&[128, 0]);
        for (quote, ipv6, mac, answered) in [
            (
                quote_of(&udp_datagram(GUEST6, REMOTE6)),
                true,
                GUEST_MAC,
                true,
            ),
            (
                quote_of(&ip6(GUEST6, REMOTE6, 58, &echo)),
                true,
                GUEST_MAC,
                true,
            ),
            (
                quote_of(&udp_datagram(GUEST6, REMOTE6)),
                false,
                GUEST_MAC,
                false,
            ),
            (
                quote_of(&udp_datagram(GUEST6, REMOTE6)),
                true,
                EthernetAddress::BROADCAST,
                false,
            ),
            (quote_of(&udp_datagram(gw, REMOTE6)), true, GUEST_MAC, false),
            (
                quote_of(&udp_datagram(outside, REMOTE6)),
                true,
                GUEST_MAC,
                false,
            ),
            (
                quote_of(&udp_datagram(GUEST6, multicast)),
                true,
                GUEST_MAC,
                false,
            ),
            (
                quote_of(&ip6(GUEST6, REMOTE6, 58, &error)),
                true,
                GUEST_MAC,
                false,
            ),
            (
                quote_of(&ip6(GUEST6, REMOTE6, 58, &redirect)),
                true,
                GUEST_MAC,
                false,
            ),
        ] {
            let mut m = manager(ipv6);
            let mut out = Vec::new();
            m.reassembly_timeout6_to_guest(&quote, mac, &mut out);
            assert_eq!(out.len(), usize::from(answered), "{:?}", &quote[..48]);
        }
        // Garbage and IPv4 never get an answer, and never panic.
        let mut m = manager(true);
        let good = quote_of(&udp_datagram(GUEST6, REMOTE6));
        let mut out = Vec::new();
        for len in 0..100 {
            m.reassembly_timeout6_to_guest(&good[..len], GUEST_MAC, &mut out);
        }
        // From 48 bytes on (the fixed and Fragment headers), the quote is
        // enough; each answer or suppression is counted.
        assert!(out.iter().all(|o| matches!(o, Output::ToGuest(_))));
        let s = m.stats();
        assert_eq!(out.len() as u64 + s.icmp.rate_limited, 52);
        let mut v4 = good.clone();
        v4[0] = 0x45;
        let mut out = Vec::new();
        m.reassembly_timeout6_to_guest(&v4, GUEST_MAC, &mut out);
        assert!(out.is_empty());
    }

    #[test]
    fn rate_limited_with_the_other_errors() {
        let mut m = manager(true);
        let quote = quote_of(&udp_datagram(GUEST6, REMOTE6));
        let mut out = Vec::new();
        for _ in 0..10_000 {
            m.reassembly_timeout6_to_guest(&quote, GUEST_MAC, &mut out);
        }
        let s = m.stats();
        assert!(out.len() < 10_000, "{}", out.len());
        assert_eq!(s.icmp.rate_limited as usize, 10_000 - out.len());
    }
}
