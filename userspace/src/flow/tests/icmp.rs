//! ICMP in the flow manager: echo flows, error translation both ways,
//! synthesized errors, their limits and counters.

use smoltcp::wire::{IpAddress, TcpPacket, UdpPacket};

use super::*;
use crate::flow::icmp::{IcmpKind, csum_adjust};
use crate::flow::packet::{ICMP_ECHO_REPLY, ICMP_ECHO_REQUEST, icmp_message};

const GW: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
const ROUTER: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 254);

/// An IPv4 echo request or reply with identifier `id`.
fn echo(src: Ipv4Addr, dst: Ipv4Addr, ty: u8, id: u16, seq: u16, ttl: u8) -> Vec<u8> {
    let mut rest = [0u8; 4];
    rest[..2].copy_from_slice(&id.to_be_bytes());
    rest[2..].copy_from_slice(&seq.to_be_bytes());
    let mut ip = icmp_message(src, dst, ty, 0, rest, b"abcdefghijklmnop");
    let mut p = Ipv4Packet::new_unchecked(&mut ip[..]);
    p.set_hop_limit(ttl);
    p.fill_checksum();
    ip
}

fn guest_frame(ip: &[u8]) -> Vec<u8> {
    packet::ethernet_frame(GUEST_MAC, GW_MAC, ip)
}

fn world_frame(ip: &[u8]) -> Vec<u8> {
    packet::ethernet_frame(EthernetAddress([2, 0, 0, 0, 0, 2]), GW_MAC, ip)
}

/// Checks an ICMP packet's checksums; returns (src, dst, ICMP bytes).
fn icmp_of(ip: &[u8]) -> (Ipv4Addr, Ipv4Addr, Vec<u8>) {
    let p = Ipv4Packet::new_checked(ip).unwrap();
    assert!(p.verify_checksum(), "outer ipv4 checksum");
    let m = Icmpv4Packet::new_checked(p.payload()).unwrap();
    assert!(m.verify_checksum(), "icmp checksum");
    (p.src_addr(), p.dst_addr(), p.payload().to_vec())
}

/// An ICMP error from `from` to `to` quoting `offending` (header + 8).
fn error(
    from: Ipv4Addr,
    to: Ipv4Addr,
    ty: u8,
    code: u8,
    rest: [u8; 4],
    offending: &[u8],
) -> Vec<u8> {
    let hl = usize::from(offending[0] & 0x0f) * 4;
    icmp_message(from, to, ty, code, rest, &offending[..hl + 8])
}

/// Opens an echo flow with guest identifier `id`; returns the request as
/// sent to the world.
fn ping(t: &mut T, id: u16) -> Vec<u8> {
    let out = t.guest(
        &guest_frame(&echo(GUEST, REMOTE_IP, ICMP_ECHO_REQUEST, id, 1, 64)),
        PuntReason::Ipv4NoFlow,
    );
    to_world(out)
}

#[test]
fn echo_to_the_world_opens_a_natted_flow() {
    let mut t = T::new();
    let req = ping(&mut t, 0x1234);
    let (src, dst, icmp) = icmp_of(&req);
    assert_eq!((src, dst), (HOST, REMOTE_IP));
    let m = Icmpv4Packet::new_checked(&icmp[..]).unwrap();
    let natid = m.echo_ident();
    assert_eq!(m.echo_seq_no(), 1);
    assert_eq!(m.data(), b"abcdefghijklmnop");
    assert_eq!(Ipv4Packet::new_checked(&req[..]).unwrap().hop_limit(), 63);
    // Both entries: the request keyed by the guest's identifier as source
    // port, the reply by the NAT identifier as destination port.
    let te = t
        .maps()
        .entry(&store::tap_key(GUEST, REMOTE_IP, 0x1234, 0, PROTO_ICMP));
    assert_eq!(te.new_sport, natid);
    assert_eq!(state(&te), FlowState::Established);
    let ue = t
        .maps()
        .entry(&store::uplink_key(REMOTE_IP, HOST, 0, natid, PROTO_ICMP));
    assert_eq!(ue.new_dport, 0x1234);
    assert_eq!(ipv4_from_16(&ue.new_dst), GUEST.octets());
    // A reply the kernel punted (say, too big for it) still gets home.
    let out = t.world(
        &world_frame(&echo(REMOTE_IP, HOST, ICMP_ECHO_REPLY, natid, 1, 60)),
        PuntReason::Exception,
    );
    let ip = to_guest(out);
    let (src, dst, icmp) = icmp_of(&ip);
    assert_eq!((src, dst), (REMOTE_IP, GUEST));
    assert_eq!(
        Icmpv4Packet::new_checked(&icmp[..]).unwrap().echo_ident(),
        0x1234
    );
    let s = t.m.stats();
    assert_eq!(s.flows_active, 1);
    assert_eq!(s.udp_active, 1, "echo flows expire like UDP flows");
    assert_eq!(s.icmp.translated_to_world.get(IcmpKind::EchoRequest), 1);
    assert_eq!(s.icmp.translated_to_guest.get(IcmpKind::EchoReply), 1);
    assert_eq!(t.m.flows()[0].proto, "icmp");
    // A second identifier is a second flow with its own NAT identifier.
    let req2 = ping(&mut t, 0x1235);
    let id2 = Icmpv4Packet::new_checked(&icmp_of(&req2).2[..])
        .unwrap()
        .echo_ident();
    assert_ne!(id2, natid);
    assert_eq!(t.m.stats().flows_active, 2);
}

#[test]
fn echo_flows_expire_when_idle() {
    let mut t = T::with(FlowConfig {
        udp_timeout: Duration::from_secs(8),
        ..config()
    });
    ping(&mut t, 7);
    for _ in 0..12 {
        t.advance(Duration::from_secs(1));
        t.tick();
    }
    assert_eq!(t.m.stats().flows_active, 0);
    assert_eq!(t.live_ports(), 0);
    assert!(t.maps().entries.is_empty());
}

#[test]
fn echo_to_denied_destinations_is_admin_prohibited() {
    let mut t = T::new();
    let out = t.guest(
        &guest_frame(&echo(GUEST, HOST, ICMP_ECHO_REQUEST, 9, 1, 64)),
        PuntReason::Ipv4NoFlow,
    );
    let (src, dst, icmp) = icmp_of(&to_guest(out));
    assert_eq!((src, dst), (GW, GUEST));
    assert_eq!((icmp[0], icmp[1]), (3, 13));
    assert_eq!(t.m.stats().flows_active, 0);
}

#[test]
fn no_route_answers_like_a_linux_router() {
    for (why, code) in [
        (NoRoute::Net, Some(0)),
        (NoRoute::Host, Some(1)),
        (NoRoute::Prohibited, Some(13)),
        (NoRoute::Blackhole, None),
    ] {
        let mut t = T::new();
        t.m.ports.no_route = Some(why);
        let syn = Seg::new(guest(40000), remote()).syn(1).guest_frame();
        let udp = packet::ethernet_frame(
            GUEST_MAC,
            GW_MAC,
            &udp_ip(guest(5000), sa4(REMOTE_IP, 53), b"q", 64),
        );
        let ping = guest_frame(&echo(GUEST, REMOTE_IP, ICMP_ECHO_REQUEST, 3, 1, 64));
        for frame in [syn, udp, ping] {
            let out = t.guest(&frame, PuntReason::Ipv4NoFlow);
            match code {
                Some(code) => {
                    let (src, _, icmp) = icmp_of(&to_guest(out));
                    assert_eq!(src, GW);
                    assert_eq!((icmp[0], icmp[1]), (3, code), "{why:?}");
                    assert_eq!(&icmp[8..], &frame[14..14 + 28]);
                }
                None => assert!(out.is_empty(), "{why:?}"),
            }
        }
        assert_eq!(t.m.stats().flows_active, 0);
    }
}

#[test]
fn port_unreachable_from_the_world_reaches_the_guest_translated() {
    let mut t = T::new();
    // The guest's datagram, as it sent it, and as it left.
    let sent = udp_ip(guest(5000), sa4(REMOTE_IP, 9999), b"hello world", 64);
    let left = to_world(t.guest(
        &packet::ethernet_frame(GUEST_MAC, GW_MAC, &sent),
        PuntReason::Ipv4NoFlow,
    ));
    let (_, natp, _, _) = check_udp(&left);
    let err = error(REMOTE_IP, HOST, 3, 3, [0; 4], &left);
    let out = t.world(&world_frame(&err), PuntReason::IcmpError);
    let ip = to_guest(out);
    let (src, dst, icmp) = icmp_of(&ip);
    // From the remote itself (the guest addressed it), to the guest.
    assert_eq!((src, dst), (REMOTE_IP, GUEST));
    assert_eq!((icmp[0], icmp[1]), (3, 3));
    let q = &icmp[8..];
    let qp = Ipv4Packet::new_unchecked(q);
    assert!(qp.verify_checksum(), "quoted header checksum");
    assert_eq!((qp.src_addr(), qp.dst_addr()), (GUEST, REMOTE_IP));
    let qu = UdpPacket::new_unchecked(&q[20..]);
    assert_eq!((qu.src_port(), qu.dst_port()), (5000, 9999));
    // The quoted UDP checksum is the one the guest computed.
    let orig = UdpPacket::new_unchecked(&sent[20..]);
    assert_eq!(qu.checksum(), orig.checksum());
    assert_ne!(natp, 5000);
    let s = t.m.stats();
    assert_eq!(s.icmp.translated_to_guest.get(IcmpKind::PortUnreachable), 1);
}

#[test]
fn frag_needed_from_a_router_keeps_its_address_and_mtu() {
    let mut t = T::new();
    let natp = t.establish(40000, 1000, 5000);
    let data = Seg::new(guest(40000), remote())
        .seq(1001)
        .ack(5001)
        .data(&[1u8; 100]);
    // The segment as the world saw it: the flow's rewrite.
    let mut left = data.ip();
    {
        let mut p = Ipv4Packet::new_unchecked(&mut left[..]);
        p.set_src_addr(HOST);
        p.fill_checksum();
        let mut tcp = TcpPacket::new_unchecked(p.payload_mut());
        tcp.set_src_port(natp);
        tcp.fill_checksum(&IpAddress::Ipv4(HOST), &IpAddress::Ipv4(REMOTE_IP));
    }
    // Linux routers quote up to 576 bytes: here the TCP checksum is quoted.
    let err = icmp_message(ROUTER, HOST, 3, 4, [0, 0, 0x05, 0x00], &left[..68]);
    let ip = to_guest(t.world(&world_frame(&err), PuntReason::IcmpError));
    let (src, dst, icmp) = icmp_of(&ip);
    assert_eq!((src, dst), (ROUTER, GUEST));
    assert_eq!((icmp[0], icmp[1]), (3, 4));
    assert_eq!(u16::from_be_bytes([icmp[6], icmp[7]]), 0x500);
    let q = &icmp[8..];
    let qp = Ipv4Packet::new_unchecked(q);
    assert!(qp.verify_checksum());
    assert_eq!((qp.src_addr(), qp.dst_addr()), (GUEST, REMOTE_IP));
    // Quoted TCP header: ports back and checksum the guest's own.
    let orig = data.ip();
    assert_eq!(&q[20..38], &orig[20..38]);
    assert_eq!(
        t.m.stats()
            .icmp
            .translated_to_guest
            .get(IcmpKind::FragNeeded),
        1
    );
}

#[test]
fn errors_about_echo_flows_restore_the_identifier() {
    let mut t = T::new();
    let req = ping(&mut t, 0x4242);
    let err = error(ROUTER, HOST, 11, 0, [0; 4], &req);
    let ip = to_guest(t.world(&world_frame(&err), PuntReason::IcmpError));
    let (src, _, icmp) = icmp_of(&ip);
    assert_eq!(src, ROUTER);
    assert_eq!((icmp[0], icmp[1]), (11, 0));
    let q = &icmp[8..];
    let orig = echo(GUEST, REMOTE_IP, ICMP_ECHO_REQUEST, 0x4242, 1, 64);
    // Identifier and the request's own checksum back as the guest sent them.
    assert_eq!(&q[20..28], &orig[20..28]);
    assert_eq!(Ipv4Packet::new_unchecked(q).src_addr(), GUEST);
    assert_eq!(
        t.m.stats()
            .icmp
            .translated_to_guest
            .get(IcmpKind::TimeExceeded),
        1
    );
}

#[test]
fn errors_from_the_guest_about_a_flow_reach_the_world() {
    let mut t = T::new();
    let sent = udp_ip(guest(5000), sa4(REMOTE_IP, 9999), b"x", 64);
    let left = to_world(t.guest(
        &packet::ethernet_frame(GUEST_MAC, GW_MAC, &sent),
        PuntReason::Ipv4NoFlow,
    ));
    let (_, natp, _, _) = check_udp(&left);
    // A reply from the world, as the guest received it...
    let reply = udp_ip(sa4(REMOTE_IP, 9999), guest(5000), b"y", 63);
    // ...which the guest refuses: port unreachable.
    let err = error(GUEST, REMOTE_IP, 3, 3, [0; 4], &reply);
    let out = t.guest(&guest_frame(&err), PuntReason::Ipv4NoFlow);
    let ip = to_world(out);
    let (src, dst, icmp) = icmp_of(&ip);
    assert_eq!((src, dst), (HOST, REMOTE_IP));
    let q = &icmp[8..];
    let qp = Ipv4Packet::new_unchecked(q);
    assert!(qp.verify_checksum());
    assert_eq!((qp.src_addr(), qp.dst_addr()), (REMOTE_IP, HOST));
    let qu = UdpPacket::new_unchecked(&q[20..]);
    assert_eq!((qu.src_port(), qu.dst_port()), (9999, natp));
    // Incremental checksum: what the world's datagram carried.
    let as_sent = udp_ip(sa4(REMOTE_IP, 9999), nat(natp), b"y", 64);
    assert_eq!(
        qu.checksum(),
        UdpPacket::new_unchecked(&as_sent[20..]).checksum()
    );
    assert_eq!(
        t.m.stats()
            .icmp
            .translated_to_world
            .get(IcmpKind::PortUnreachable),
        1
    );
}

#[test]
fn malformed_and_unknown_icmp_is_dropped_and_counted() {
    let mut t = T::new();
    let req = ping(&mut t, 5);
    // From the world: bad checksum, truncated quote, quote of no flow.
    let good = error(REMOTE_IP, HOST, 3, 1, [0; 4], &req);
    let mut bad_sum = good.clone();
    let n = bad_sum.len();
    bad_sum[n - 1] ^= 0xff;
    let short = icmp_message(REMOTE_IP, HOST, 3, 1, [0; 4], &req[..24]);
    let mut other = req.clone();
    other[24] ^= 0x55; // a different identifier: no flow
    Ipv4Packet::new_unchecked(&mut other[..]).fill_checksum();
    let none = error(REMOTE_IP, HOST, 3, 1, [0; 4], &other);
    let bad_ihl = {
        let mut q = req[..28].to_vec();
        q[0] = 0x4f; // 60-byte header in a 28-byte quote
        icmp_message(REMOTE_IP, HOST, 3, 1, [0; 4], &q)
    };
    for e in [&bad_sum, &short, &none, &bad_ihl] {
        assert!(t.world(&world_frame(e), PuntReason::IcmpError).is_empty());
    }
    let s = t.m.stats();
    assert_eq!(s.icmp.malformed, 3);
    assert_eq!(s.icmp.unknown_flow, 1);
    // From the guest: bad checksum, a 3-byte ICMP message, an error quoting
    // garbage, an unsupported type; none gets an answer.
    let mut bad = echo(GUEST, REMOTE_IP, ICMP_ECHO_REQUEST, 77, 1, 64);
    let n = bad.len();
    bad[n - 1] ^= 1;
    let tiny = {
        let mut ip = udp_ip(guest(1), sa4(REMOTE_IP, 2), b"", 64);
        ip.truncate(23);
        let mut p = Ipv4Packet::new_unchecked(&mut ip[..]);
        p.set_next_header(smoltcp::wire::IpProtocol::Icmp);
        p.set_total_len(23);
        p.fill_checksum();
        ip
    };
    let garbage = icmp_message(GUEST, REMOTE_IP, 3, 3, [0; 4], &[0xffu8; 28]);
    let timestamp = icmp_message(GUEST, REMOTE_IP, 13, 0, [0; 4], &[0u8; 12]);
    for ip in [&bad, &tiny, &garbage, &timestamp] {
        assert!(t.guest(&guest_frame(ip), PuntReason::Ipv4NoFlow).is_empty());
    }
    let s = t.m.stats();
    assert_eq!(s.icmp.malformed, 6);
    assert_eq!(s.icmp.unsupported, 1);
    assert_eq!(s.flows_active, 1);
}

#[test]
fn no_errors_about_errors_and_a_rate_limit() {
    let mut t = T::new();
    // A guest ICMP error whose TTL runs out: no time exceeded about it.
    let err = icmp_message(GUEST, REMOTE_IP, 3, 3, [0; 4], &[0x45u8; 28]);
    let mut low = err.clone();
    Ipv4Packet::new_unchecked(&mut low[..]).set_hop_limit(1);
    Ipv4Packet::new_unchecked(&mut low[..]).fill_checksum();
    assert!(
        t.guest(&guest_frame(&low), PuntReason::Ipv4NoFlow)
            .is_empty()
    );
    // A burst of TTL-1 probes: at most the burst is answered.
    let mut answered = 0;
    for i in 0..200u16 {
        let probe = udp_ip(guest(30000 + i), sa4(REMOTE_IP, 33434), b"", 1);
        answered += t
            .guest(
                &packet::ethernet_frame(GUEST_MAC, GW_MAC, &probe),
                PuntReason::Ipv4NoFlow,
            )
            .len();
    }
    let s = t.m.stats();
    assert!(answered <= 60, "{answered} answers to a 200-packet burst");
    assert!(answered >= 50);
    assert_eq!(s.icmp.rate_limited, 200 - answered as u64);
    assert_eq!(
        s.icmp.sent_to_guest.get(IcmpKind::TimeExceeded),
        answered as u64
    );
}

#[test]
fn incremental_checksums_match_a_full_recount() {
    let before = udp_ip(guest(5000), sa4(REMOTE_IP, 53), b"checksum me", 64);
    let after = udp_ip(nat(61000), sa4(UPSTREAM, 53), b"checksum me", 64);
    let c0 = UdpPacket::new_unchecked(&before[20..]).checksum();
    let c1 = UdpPacket::new_unchecked(&after[20..]).checksum();
    let adj = csum_adjust(c0, &before[12..20], &after[12..20]);
    let adj = csum_adjust(adj, &before[20..24], &after[20..24]);
    assert_eq!(adj, c1);
}

#[test]
fn reassembly_timeout_quotes_the_first_fragment() {
    let mut t = T::new();
    let mut first = udp_ip(guest(5000), sa4(REMOTE_IP, 53), &[1u8; 64], 64);
    {
        let mut p = Ipv4Packet::new_unchecked(&mut first[..]);
        p.set_more_frags(true);
        p.fill_checksum();
    }
    let quote = &first[..28];
    let mut out = Vec::new();
    t.m.reassembly_timeout_to_guest(quote, GUEST_MAC, &mut out);
    let (src, dst, icmp) = icmp_of(&to_guest(out));
    assert_eq!((src, dst), (GW, GUEST));
    assert_eq!((icmp[0], icmp[1]), (11, 1));
    assert_eq!(&icmp[8..], quote);
    assert_eq!(
        t.m.stats()
            .icmp
            .sent_to_guest
            .get(IcmpKind::ReassemblyTimeout),
        1
    );
    // Not about the guest's own datagram: nothing.
    let mut other = first.clone();
    Ipv4Packet::new_unchecked(&mut other[..]).set_src_addr(REMOTE_IP);
    Ipv4Packet::new_unchecked(&mut other[..]).fill_checksum();
    let mut out = Vec::new();
    t.m.reassembly_timeout_to_guest(&other[..28], GUEST_MAC, &mut out);
    assert!(out.is_empty());
}
