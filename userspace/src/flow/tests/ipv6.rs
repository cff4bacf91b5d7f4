//! The flow manager with IPv6: NAT66 flows through the same code as IPv4,
//! per-family keys and entries, ICMPv6 synthesized and translated.

use smoltcp::wire::{Icmpv6Packet, IpAddress, Ipv6Packet, Ipv6Repr, TcpPacket, UdpPacket};

use super::*;
use crate::config::GuestNet6Config;
use crate::flow::packet::ICMPV6_ECHO_REQUEST;

/// The guest's SLAAC-style address in the default prefix.
const GUEST6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0x5054, 0xff, 0xfe12, 0x3456);
const REMOTE6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 0x10);
const ROUTER6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 0xfe);

fn t6() -> T {
    T::with(FlowConfig {
        guest6: Some(GuestNet6Config::default()),
        host_addrs: HostAddrs::fixed(vec![IpAddr::V4(HOST), IpAddr::V6(HOST6)]),
        ..config()
    })
}

/// Checks an IPv6 packet's transport checksum; returns its header.
fn check6(ip: &[u8]) -> Ipv6Repr {
    let p = Ipv6Packet::new_checked(ip).unwrap();
    let r = Ipv6Repr::parse(&p).unwrap();
    let (s, d) = (IpAddress::Ipv6(r.src_addr), IpAddress::Ipv6(r.dst_addr));
    match r.next_header {
        smoltcp::wire::IpProtocol::Tcp => {
            assert!(
                TcpPacket::new_checked(p.payload())
                    .unwrap()
                    .verify_checksum(&s, &d)
            );
        }
        smoltcp::wire::IpProtocol::Udp => {
            assert!(
                UdpPacket::new_checked(p.payload())
                    .unwrap()
                    .verify_checksum(&s, &d)
            );
        }
        smoltcp::wire::IpProtocol::Icmpv6 => {
            let m = Icmpv6Packet::new_checked(p.payload()).unwrap();
            assert!(
                m.verify_checksum(&r.src_addr, &r.dst_addr),
                "icmpv6 checksum"
            );
        }
        other => panic!("{other}"),
    }
    r
}

#[test]
fn tcp_flows_get_ipv6_entries_and_translation() {
    let mut t = t6();
    let (g, r) = (sa4(GUEST6, 40000), sa4(REMOTE6, 80));
    let out = t.guest(
        &Seg::new(g, r).syn(1000).guest_frame(),
        PuntReason::Ipv6NoFlow,
    );
    let syn = to_world(out);
    let h = check6(&syn);
    assert_eq!((h.src_addr, h.dst_addr, h.hop_limit), (HOST6, REMOTE6, 63));
    let natp = TcpPacket::new_checked(&syn[40..]).unwrap().src_port();
    // Both entries, of family 6, with 16-byte addresses.
    let tk = store::tap_key(GUEST6, REMOTE6, 40000, 80, PROTO_TCP);
    let uk = store::uplink_key(REMOTE6, HOST6, 80, natp, PROTO_TCP);
    assert_eq!(tk.family, datapath_common::FAMILY_IPV6);
    let te = t.maps().entry(&tk);
    assert_eq!(te.new_src, HOST6.octets());
    assert_eq!(te.new_dst, REMOTE6.octets());
    let ue = t.maps().entry(&uk);
    assert_eq!((ue.new_dst, ue.new_dport), (GUEST6.octets(), 40000));
    // The SYN-ACK establishes it and reaches the guest translated.
    let synack = Seg::new(r, sa4(HOST6, natp)).syn(5000).ack(1001);
    let out = t.world(&synack.world_frame(), PuntReason::Handshake);
    let back = to_guest(out);
    let h = check6(&back);
    assert_eq!((h.src_addr, h.dst_addr), (REMOTE6, GUEST6));
    assert_eq!(t.maps().entry(&tk).state, FlowState::Established as u8);
    let flows = t.m.flows();
    assert_eq!(flows[0].guest, g);
    assert_eq!(flows[0].nat, sa4(HOST6, natp));
    // An IPv4 flow at the same time is independent.
    let _ = t.open(40001, 7);
    assert_eq!(t.m.stats().flows_active, 2);
}

#[test]
fn unknown_ipv6_segments_get_an_rst() {
    let mut t = t6();
    let seg = Seg::new(sa4(GUEST6, 40000), sa4(REMOTE6, 80))
        .seq(10)
        .ack(99)
        .data(b"late");
    let out = t.guest(&seg.guest_frame(), PuntReason::Ipv6NoFlow);
    let rst = to_guest(out);
    let h = check6(&rst);
    assert_eq!((h.src_addr, h.dst_addr), (REMOTE6, GUEST6));
    let tcp = TcpPacket::new_checked(&rst[40..]).unwrap();
    assert!(tcp.rst());
    assert_eq!(tcp.seq_number(), TcpSeqNumber(99));
}

#[test]
fn denied_and_unroutable_ipv6_is_answered_with_icmpv6() {
    let mut t = t6();
    // The host's own address: administratively prohibited, from the
    // gateway's IPv6 address.
    let ip = udp_ip(sa4(GUEST6, 5000), sa4(HOST6, 53), b"q", 64);
    let err = to_guest(t.guest(
        &packet::ethernet_frame(GUEST_MAC, GW_MAC, &ip),
        PuntReason::Ipv6NoFlow,
    ));
    let h = check6(&err);
    assert_eq!(
        (h.src_addr, h.dst_addr),
        (GuestNet6Config::default().gateway, GUEST6)
    );
    assert_eq!((err[40], err[41]), (1, 1), "unreachable, admin prohibited");
    assert_eq!(&err[48..], &ip[..], "the whole datagram quoted");
    // A big datagram is quoted only up to 1280 bytes of error.
    let big = udp_ip(sa4(GUEST6, 5000), sa4(HOST6, 53), &[7u8; 1400], 64);
    let err = to_guest(t.guest(
        &packet::ethernet_frame(GUEST_MAC, GW_MAC, &big),
        PuntReason::Ipv6NoFlow,
    ));
    assert_eq!(err.len(), 1280);
    // Hop limit 1: time exceeded.
    let ip = udp_ip(sa4(GUEST6, 5000), sa4(REMOTE6, 53), b"q", 1);
    let err = to_guest(t.guest(
        &packet::ethernet_frame(GUEST_MAC, GW_MAC, &ip),
        PuntReason::Ipv6NoFlow,
    ));
    check6(&err);
    assert_eq!((err[40], err[41]), (3, 0));
    // No route: destination unreachable, no route.
    t.m.ports.no_route = Some(crate::flow::NoRoute::Net);
    let ip = udp_ip(sa4(GUEST6, 5001), sa4(REMOTE6, 53), b"q", 64);
    let err = to_guest(t.guest(
        &packet::ethernet_frame(GUEST_MAC, GW_MAC, &ip),
        PuntReason::Ipv6NoFlow,
    ));
    check6(&err);
    assert_eq!((err[40], err[41]), (1, 0));
}

#[test]
fn only_prefix_sources_are_natted() {
    let mut t = t6();
    for src in ["fe80::1", "2001:db8:9::1", "fd00::2"] {
        let src: Ipv6Addr = src.parse().unwrap();
        let ip = udp_ip(sa4(src, 5000), sa4(REMOTE6, 53), b"q", 64);
        let out = t.guest(
            &packet::ethernet_frame(GUEST_MAC, GW_MAC, &ip),
            PuntReason::Ipv6NoFlow,
        );
        assert!(out.is_empty());
    }
    assert_eq!(t.drops(DropReason::BadSource), 3);
    // Without IPv6 configured, every IPv6 source is refused.
    let mut t = T::new();
    let ip = udp_ip(sa4(GUEST6, 5000), sa4(REMOTE6, 53), b"q", 64);
    assert!(
        t.guest(
            &packet::ethernet_frame(GUEST_MAC, GW_MAC, &ip),
            PuntReason::Ipv6NoFlow
        )
        .is_empty()
    );
    assert_eq!(t.drops(DropReason::BadSource), 1);
}

#[test]
fn too_big_for_the_uplink_gets_packet_too_big_never_fragments() {
    let mut t = T::with(FlowConfig {
        uplink_mtu: 1280,
        ..t6_config()
    });
    let ip = udp_ip(sa4(GUEST6, 5000), sa4(REMOTE6, 53), &[1u8; 1400], 64);
    let err = to_guest(t.guest(
        &packet::ethernet_frame(GUEST_MAC, GW_MAC, &ip),
        PuntReason::Ipv6NoFlow,
    ));
    check6(&err);
    assert_eq!((err[40], err[41]), (2, 0), "packet too big");
    assert_eq!(
        u32::from_be_bytes([err[44], err[45], err[46], err[47]]),
        1280
    );
    assert_eq!(t.drops(DropReason::TooBig), 1);
}

fn t6_config() -> FlowConfig {
    FlowConfig {
        guest6: Some(GuestNet6Config::default()),
        host_addrs: HostAddrs::fixed(vec![IpAddr::V4(HOST), IpAddr::V6(HOST6)]),
        ..config()
    }
}

#[test]
fn icmpv6_errors_are_translated_both_ways() {
    let mut t = t6();
    let ip = udp_ip(sa4(GUEST6, 5000), sa4(REMOTE6, 53), b"query", 64);
    let sent = to_world(t.guest(
        &packet::ethernet_frame(GUEST_MAC, GW_MAC, &ip),
        PuntReason::Ipv6NoFlow,
    ));
    check6(&sent);
    let natp = UdpPacket::new_checked(&sent[40..]).unwrap().src_port();
    // A router says "port unreachable" about what we sent.
    let err = packet::icmp6_error_quoting(
        ROUTER6,
        HOST6,
        &sent,
        IcmpError::Unreachable(Icmpv4DstUnreachable::PortUnreachable),
    );
    let out = t.world(
        &packet::ethernet_frame(GW_MAC, GW_MAC, &err),
        PuntReason::IcmpError,
    );
    let back = to_guest(out);
    let h = check6(&back);
    assert_eq!((h.src_addr, h.dst_addr), (ROUTER6, GUEST6));
    // The quote is the guest's own datagram again, its UDP checksum valid.
    let q = &back[48..];
    let qh = Ipv6Repr::parse(&Ipv6Packet::new_checked(q).unwrap()).unwrap();
    assert_eq!((qh.src_addr, qh.dst_addr), (GUEST6, REMOTE6));
    let u = UdpPacket::new_checked(&q[40..]).unwrap();
    assert_eq!((u.src_port(), u.dst_port()), (5000, 53));
    assert!(u.verify_checksum(&IpAddress::Ipv6(GUEST6), &IpAddress::Ipv6(REMOTE6)));
    // The guest's own error about a packet of the flow goes to the world.
    let from_world = udp_ip(sa4(REMOTE6, 53), sa4(HOST6, natp), b"answer", 64);
    let to_g = to_guest(t.world(
        &packet::ethernet_frame(GW_MAC, GW_MAC, &from_world),
        PuntReason::Exception,
    ));
    let gerr = packet::icmp6_error_quoting(
        GUEST6,
        REMOTE6,
        &to_g,
        IcmpError::Unreachable(Icmpv4DstUnreachable::PortUnreachable),
    );
    let out = t.guest(
        &packet::ethernet_frame(GUEST_MAC, GW_MAC, &gerr),
        PuntReason::Ipv6NoFlow,
    );
    let w = to_world(out);
    let h = check6(&w);
    assert_eq!((h.src_addr, h.dst_addr), (HOST6, REMOTE6));
    let q = &w[48..];
    let u = UdpPacket::new_checked(&q[40..]).unwrap();
    assert_eq!((u.src_port(), u.dst_port()), (53, natp));
    assert!(u.verify_checksum(&IpAddress::Ipv6(REMOTE6), &IpAddress::Ipv6(HOST6)));
}

#[test]
fn icmpv6_echo_flows() {
    let mut t = t6();
    let mut rest = [0u8; 4];
    rest[..2].copy_from_slice(&0x4242u16.to_be_bytes());
    rest[3] = 1;
    let (mut ip, at) = packet::ip_header(
        IpAddr::V6(GUEST6),
        IpAddr::V6(REMOTE6),
        smoltcp::wire::IpProtocol::Icmpv6,
        8 + 4,
    );
    ip[at..at + 8].copy_from_slice(&[
        ICMPV6_ECHO_REQUEST,
        0,
        0,
        0,
        rest[0],
        rest[1],
        rest[2],
        rest[3],
    ]);
    ip[at + 8..].copy_from_slice(b"ping");
    Icmpv6Packet::new_unchecked(&mut ip[at..]).fill_checksum(&GUEST6, &REMOTE6);
    let out = t.guest(
        &packet::ethernet_frame(GUEST_MAC, GW_MAC, &ip),
        PuntReason::Ipv6NoFlow,
    );
    let req = to_world(out);
    let h = check6(&req);
    assert_eq!(h.src_addr, HOST6);
    assert_eq!(t.m.flows()[0].proto, "icmpv6");
}
