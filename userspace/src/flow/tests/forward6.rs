//! Inbound port forwards over IPv6: openings to a forwarded (address,
//! protocol, port) of the host's IPv6 side reach the guest's current IPv6
//! address, through the same rule table, flow code and rule changes as
//! IPv4.

use smoltcp::wire::{IpAddress, IpProtocol, Ipv6Packet, Ipv6Repr, TcpPacket, UdpPacket};

use super::*;
use crate::{
    config::GuestNet6Config,
    fwd::{FwdTable, PortRange, Proto},
};

/// The guest's current IPv6 address (a SLAAC-style one in the default
/// prefix).
const GUEST6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0x5054, 0xff, 0xfe12, 0x3456);
/// A world client.
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 0x10);
/// Another address of the host's (not forwarded by addressed rules).
const OTHER6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x99);

fn client6() -> SocketAddr {
    sa4(CLIENT6, 41000)
}

fn host6(port: u16) -> SocketAddr {
    sa4(HOST6, port)
}

fn guest6(port: u16) -> SocketAddr {
    sa4(GUEST6, port)
}

/// A table of `specs`.
fn table(specs: &[(Proto, &str)]) -> FwdTable {
    let mut forwards = FwdTable::new();
    for (proto, spec) in specs {
        forwards
            .add_spec(*proto, spec, PortRange::LINUX_EPHEMERAL)
            .unwrap();
    }
    forwards
}

/// A dual-stack manager forwarding `specs`; the guest's MAC is known, its
/// IPv6 address is not yet.
fn fwd6_with(specs: &[(Proto, &str)]) -> T {
    let mut t = T::with(FlowConfig {
        guest6: Some(GuestNet6Config::default()),
        host_addrs: HostAddrs::fixed(vec![IpAddr::V4(HOST), IpAddr::V6(HOST6)]),
        forwards: table(specs),
        ..config()
    });
    t.m.set_guest_mac(GUEST_MAC);
    t
}

/// TCP 8080 → guest 80 and UDP 5353 on every host address, TCP 8443 →
/// 443 on `HOST6` only; the guest's IPv6 address is known.
fn fwd6() -> T {
    let mut t = fwd6_with(&[
        (Proto::Tcp, "8080:80"),
        (Proto::Udp, "5353"),
        (Proto::Tcp, "[2001:db8::1]/8443:443"),
    ]);
    t.m.set_guest_addr6(GUEST6);
    t
}

/// Re-parses an IPv6 TCP or UDP packet verifying its checksum; returns
/// the header, the ports and the TCP flags byte (0 for UDP).
fn check6(ip: &[u8]) -> (Ipv6Repr, u16, u16, u8) {
    let p = Ipv6Packet::new_checked(ip).unwrap();
    let r = Ipv6Repr::parse(&p).unwrap();
    let (s, d) = (IpAddress::Ipv6(r.src_addr), IpAddress::Ipv6(r.dst_addr));
    match r.next_header {
        IpProtocol::Tcp => {
            let t = TcpPacket::new_checked(p.payload()).unwrap();
            assert!(t.verify_checksum(&s, &d), "tcp checksum");
            let flags = p.payload()[13];
            (r, t.src_port(), t.dst_port(), flags)
        }
        IpProtocol::Udp => {
            let u = UdpPacket::new_checked(p.payload()).unwrap();
            assert!(u.verify_checksum(&s, &d), "udp checksum");
            (r, u.src_port(), u.dst_port(), 0)
        }
        other => panic!("{other}"),
    }
}

const SYN: u8 = 0x02;
const RST: u8 = 0x04;
const ACK: u8 = 0x10;

fn hits(t: &T) -> Vec<u64> {
    t.m.forwards().rules_with_hits().map(|(_, h)| h).collect()
}

#[test]
fn inbound_ipv6_syn_reaches_the_guests_current_address() {
    let mut t = fwd6();
    let syn = Seg::new(client6(), host6(8080)).syn(7000);
    let ip = to_guest(t.world(&syn.world_frame(), PuntReason::Forward));
    let (h, sp, dp, flags) = check6(&ip);
    // DNAT to the guest's address and port 80; the client is left alone.
    assert_eq!((h.src_addr, h.dst_addr), (CLIENT6, GUEST6));
    assert_eq!((sp, dp, flags), (41000, 80, SYN));
    assert_eq!(h.hop_limit, 63);

    // Both entries, of family 6, with the forwarded address and port.
    let uk = store::uplink_key(CLIENT6, HOST6, 41000, 8080, PROTO_TCP);
    let tk = store::tap_key(GUEST6, CLIENT6, 80, 41000, PROTO_TCP);
    assert_eq!((uk.family, tk.family), (6, 6));
    let ue = t.maps().entry(&uk);
    assert_eq!(state(&ue), FlowState::Handshake);
    assert_eq!((ue.new_src, ue.new_sport), (CLIENT6.octets(), 41000));
    assert_eq!((ue.new_dst, ue.new_dport), (GUEST6.octets(), 80));
    assert_eq!(ue.out_ifindex, TAP_IF);
    let te = t.maps().entry(&tk);
    assert_eq!((te.new_src, te.new_sport), (HOST6.octets(), 8080));
    assert_eq!((te.new_dst, te.new_dport), (CLIENT6.octets(), 41000));
    assert_eq!(te.out_ifindex, UPLINK_IF);
    assert_eq!(t.m.stats().forwards_accepted, 1);
    assert_eq!(hits(&t), vec![1, 0, 0]);
    // The forwarded port is held by the reservations, not by the flow.
    assert_eq!(t.live_ports(), 0);
    let info = &t.m.flows()[0];
    assert_eq!(
        (info.guest, info.remote, info.nat),
        (guest6(80), client6(), host6(8080))
    );

    // The guest's SYN-ACK establishes it and leaves from the forwarded
    // address and port.
    let synack = Seg::new(guest6(80), client6()).syn(3000).ack(7001);
    let ip = to_world(t.guest(&synack.guest_frame(), PuntReason::Handshake));
    let (h, sp, dp, flags) = check6(&ip);
    assert_eq!((h.src_addr, h.dst_addr), (HOST6, CLIENT6));
    assert_eq!((sp, dp, flags), (8080, 41000, SYN | ACK));
    for k in [uk, tk] {
        assert_eq!(state(&t.maps().entry(&k)), FlowState::Established);
    }

    // Half-close and the final ACK reap it, as for IPv4.
    let fin = Seg::new(client6(), host6(8080))
        .ctl(TcpControl::Fin)
        .seq(7001)
        .ack(3001);
    t.event(PuntReason::EventFin, Origin::Uplink, &fin.world_frame());
    let gfin = Seg::new(guest6(80), client6())
        .ctl(TcpControl::Fin)
        .seq(3001)
        .ack(7002);
    t.event(PuntReason::EventFin, Origin::Tap, &gfin.guest_frame());
    assert_eq!(t.m.flows()[0].state, "last_ack");
    let last = Seg::new(client6(), host6(8080)).seq(7002).ack(3002);
    t.event(PuntReason::EventAck, Origin::Uplink, &last.world_frame());
    assert!(t.m.flows().is_empty());
    assert!(t.maps().entries.is_empty());
    assert_eq!(t.m.stats().tcp_closed_cleanly, 1);
}

#[test]
fn one_rule_forwards_both_families() {
    let mut t = fwd6();
    let ip6 = to_guest(t.world(
        &Seg::new(client6(), host6(8080)).syn(1).world_frame(),
        PuntReason::Forward,
    ));
    assert_eq!(check6(&ip6).0.dst_addr, GUEST6);
    let ip4 = to_guest(t.world(
        &Seg::new(client(), nat(8080)).syn(1).world_frame(),
        PuntReason::Forward,
    ));
    let (r, tcp) = check_tcp(&ip4);
    assert_eq!((r.dst_addr, tcp.dst_port), (GUEST, 80));
    assert_eq!(t.m.flows().len(), 2);
    assert_eq!(hits(&t), vec![2, 0, 0]);
}

#[test]
fn inbound_ipv6_waits_for_the_guests_address() {
    let mut t = fwd6_with(&[(Proto::Tcp, "8080:80")]);
    let syn = Seg::new(client6(), host6(8080)).syn(1).world_frame();
    assert!(t.world(&syn, PuntReason::Forward).is_empty());
    assert_eq!(t.drops(DropReason::GuestUnknown), 1);
    assert!(t.m.flows().is_empty());
    assert!(t.maps().entries.is_empty());
    assert_eq!(hits(&t), vec![0]);
    // IPv4 openings do not wait for it.
    let syn4 = Seg::new(client(), nat(8080)).syn(1).world_frame();
    assert_eq!(
        check_tcp(&to_guest(t.world(&syn4, PuntReason::Forward)))
            .1
            .dst_port,
        80
    );

    // Once known, the next opening goes there...
    t.m.set_guest_addr6(GUEST6);
    let ip = to_guest(t.world(&syn, PuntReason::Forward));
    assert_eq!(check6(&ip).0.dst_addr, GUEST6);
    // ... and when it changes, new openings follow while the old flow
    // stays where it was opened.
    let moved = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0x15);
    t.m.set_guest_addr6(moved);
    let other_client = Seg::new(sa4(CLIENT6, 41001), host6(8080)).syn(1);
    let ip = to_guest(t.world(&other_client.world_frame(), PuntReason::Forward));
    assert_eq!(check6(&ip).0.dst_addr, moved);
    let guests: Vec<SocketAddr> = t.m.flows().iter().map(|f| f.guest).collect();
    assert!(guests.contains(&guest6(80)) && guests.contains(&sa4(moved, 80)));
    assert_eq!(t.drops(DropReason::GuestUnknown), 1);
}

#[test]
fn inbound_ipv6_with_ipv6_off_is_not_forwarded() {
    let mut t = T::with(FlowConfig {
        forwards: table(&[(Proto::Tcp, "8080:80")]),
        ..config()
    });
    t.m.set_guest_mac(GUEST_MAC);
    let syn = Seg::new(client6(), host6(8080)).syn(1).world_frame();
    assert!(t.world(&syn, PuntReason::Forward).is_empty());
    assert_eq!(t.drops(DropReason::NoForward), 1);
    assert!(t.maps().entries.is_empty());
}

#[test]
fn inbound_ipv6_udp_is_established_at_once() {
    let mut t = fwd6();
    let ip = to_guest(t.world(
        &world_udp_frame(client6(), host6(5353), b"query"),
        PuntReason::Forward,
    ));
    let (h, sp, dp, _) = check6(&ip);
    assert_eq!((h.src_addr, h.dst_addr), (CLIENT6, GUEST6));
    assert_eq!((sp, dp), (41000, 5353));
    assert_eq!(&ip[48..], b"query");
    let uk = store::uplink_key(CLIENT6, HOST6, 41000, 5353, PROTO_UDP);
    let tk = store::tap_key(GUEST6, CLIENT6, 5353, 41000, PROTO_UDP);
    for k in [uk, tk] {
        assert_eq!(state(&t.maps().entry(&k)), FlowState::Established);
    }
    // The guest's reply, if punted, goes back from the forwarded port.
    let reply = udp_frame(guest6(5353), client6(), b"answer");
    let ip = to_world(t.guest(&reply, PuntReason::Ipv6NoFlow));
    let (h, sp, dp, _) = check6(&ip);
    assert_eq!((h.src_addr, h.dst_addr), (HOST6, CLIENT6));
    assert_eq!((sp, dp), (5353, 41000));
    assert_eq!(t.m.stats().udp_active, 1);
    assert_eq!(hits(&t), vec![0, 1, 0]);
    // It expires like any UDP flow.
    t.advance(UDP_TIMEOUT * 2);
    t.tick();
    t.advance(UDP_TIMEOUT * 2);
    t.tick();
    assert!(t.m.flows().is_empty());
}

#[test]
fn rule_addresses_choose_the_family() {
    let mut t = fwd6();
    // The IPv6-addressed rule: its address only.
    let ip = to_guest(t.world(
        &Seg::new(client6(), host6(8443)).syn(1).world_frame(),
        PuntReason::Forward,
    ));
    assert_eq!(check6(&ip).2, 443);
    assert_eq!(hits(&t), vec![0, 0, 1]);
    for frame in [
        // Another IPv6 address of the host.
        Seg::new(client6(), sa4(OTHER6, 8443)).syn(1).world_frame(),
        // The host's IPv4 address.
        Seg::new(client(), nat(8443)).syn(1).world_frame(),
    ] {
        assert!(t.world(&frame, PuntReason::Forward).is_empty());
    }
    assert_eq!(t.drops(DropReason::NoForward), 2);
    // An IPv4-addressed rule never takes IPv6.
    let mut t = fwd6_with(&[(Proto::Tcp, "192.0.2.2/8081:81")]);
    t.m.set_guest_addr6(GUEST6);
    let syn = Seg::new(client6(), host6(8081)).syn(1).world_frame();
    assert!(t.world(&syn, PuntReason::Forward).is_empty());
    assert_eq!(t.drops(DropReason::NoForward), 1);
    let syn4 = Seg::new(client(), nat(8081)).syn(1).world_frame();
    assert_eq!(
        check_tcp(&to_guest(t.world(&syn4, PuntReason::Forward)))
            .1
            .dst_port,
        81
    );
}

#[test]
fn guest_rst_to_an_inbound_ipv6_syn_reaches_the_client() {
    let mut t = fwd6();
    t.world(
        &Seg::new(client6(), host6(8080)).syn(7000).world_frame(),
        PuntReason::Forward,
    );
    let rst = Seg::new(guest6(80), client6())
        .ctl(TcpControl::Rst)
        .seq(0)
        .ack(7001);
    let ip = to_world(t.guest(&rst.guest_frame(), PuntReason::Handshake));
    let (h, sp, _, flags) = check6(&ip);
    assert_eq!((h.src_addr, sp), (HOST6, 8080));
    assert_ne!(flags & RST, 0);
    assert!(t.m.flows().is_empty());
    assert!(t.maps().entries.is_empty());
}

#[test]
fn removed_rules_reset_their_ipv6_inbound_flows() {
    let mut t = fwd6();
    // Established IPv6 and IPv4 flows through the rule without an address,
    // one through the IPv6-addressed rule, and an IPv6 UDP flow.
    for (client, host) in [(client6(), host6(8080)), (client(), nat(8080))] {
        t.world(
            &Seg::new(client, host).syn(7000).world_frame(),
            PuntReason::Forward,
        );
        let g = SocketAddr::new(
            if client.is_ipv6() {
                IpAddr::V6(GUEST6)
            } else {
                IpAddr::V4(GUEST)
            },
            80,
        );
        t.guest(
            &Seg::new(g, client).syn(3000).ack(7001).guest_frame(),
            PuntReason::Handshake,
        );
    }
    t.world(
        &Seg::new(client6(), host6(8443)).syn(1).world_frame(),
        PuntReason::Forward,
    );
    t.world(
        &world_udp_frame(client6(), host6(5353), b"q"),
        PuntReason::Forward,
    );
    assert_eq!(t.m.flows().len(), 4);

    let eph = PortRange::LINUX_EPHEMERAL;
    // The IPv6-addressed rule takes only its own flow.
    let gone =
        t.m.forwards()
            .prepare_remove(Proto::Tcp, "[2001:db8::1]/8443:443", eph)
            .unwrap();
    t.m.forwards_mut().remove(&gone);
    let mut out = Vec::new();
    assert_eq!(t.m.reset_forwarded(&gone, &mut out), 1);
    assert_eq!(t.m.flows().len(), 3);
    // The rule without an address takes its flows of both families, each
    // reset on both sides.
    let gone =
        t.m.forwards()
            .prepare_remove(Proto::Tcp, "8080:80", eph)
            .unwrap();
    t.m.forwards_mut().remove(&gone);
    let mut out = Vec::new();
    assert_eq!(t.m.reset_forwarded(&gone, &mut out), 2);
    assert_eq!(out.len(), 4);
    let mut v6_rsts = 0;
    for o in &out {
        let ip = match o {
            Output::ToGuest(f) => &f[14..],
            Output::ToWorld(ip) => &ip[..],
        };
        if ip[0] >> 4 == 6 {
            let (h, ..) = check6(ip);
            assert!(h.src_addr == HOST6 || h.dst_addr == GUEST6, "{h:?}");
            v6_rsts += 1;
        }
    }
    assert_eq!(v6_rsts, 2);
    let left: Vec<SocketAddr> = t.m.flows().iter().map(|f| f.nat).collect();
    assert_eq!(left, vec![host6(5353)]);
    // A new opening to the removed port is not forwarded.
    let syn = Seg::new(sa4(CLIENT6, 41005), host6(8080))
        .syn(1)
        .world_frame();
    assert!(t.world(&syn, PuntReason::Forward).is_empty());
    assert_eq!(t.drops(DropReason::NoForward), 1);
}

#[test]
fn adopted_ipv6_inbound_flows_are_held_by_their_rule() {
    let mut t = fwd6();
    t.world(
        &Seg::new(client6(), host6(8080)).syn(7000).world_frame(),
        PuntReason::Forward,
    );
    t.guest(
        &Seg::new(guest6(80), client6())
            .syn(3000)
            .ack(7001)
            .guest_frame(),
        PuntReason::Handshake,
    );
    t.world(
        &world_udp_frame(client6(), host6(5353), b"q"),
        PuntReason::Forward,
    );
    let before = t.m.flows();
    let maps = FakeMaps {
        entries: t.m.maps().entries.clone(),
        activity: t.m.maps().activity.clone(),
        capacity: None,
    };
    drop(t);
    // The restarted daemon, with the same rules.
    let live = Live::default();
    let mut m = FlowManager::new(
        FlowConfig {
            guest6: Some(GuestNet6Config::default()),
            forwards: table(&[
                (Proto::Tcp, "8080:80"),
                (Proto::Udp, "5353"),
                (Proto::Tcp, "[2001:db8::1]/8443:443"),
            ]),
            ..config()
        },
        maps,
        FakePorts {
            next: FIRST_PORT,
            live: live.clone(),
            exhausted: false,
            no_route: None,
        },
    );
    let report = m.adopt(Instant::now());
    assert_eq!((report.flows, report.ports_lost, report.orphans), (2, 0, 0));
    let strip = |v: &[FlowInfo]| {
        let mut v: Vec<_> = v
            .iter()
            .map(|f| (f.proto, f.guest, f.remote, f.nat, f.state))
            .collect();
        v.sort_by_key(|x| x.3);
        v
    };
    assert_eq!(strip(&before), strip(&m.flows()));
    // No NAT port held: the forwarded ports are the reservations'.
    assert!(live.lock().unwrap().is_empty());
}

/// The frames for the guest in `out` as IP packets.
fn all_to_guest(out: Vec<Output>) -> Vec<Vec<u8>> {
    out.into_iter()
        .map(|o| match o {
            Output::ToGuest(f) => f[14..].to_vec(),
            other => panic!("expected frames for the guest, got {other:?}"),
        })
        .collect()
}

#[test]
fn big_datagrams_to_a_forwarded_port_reach_the_guest_in_fragments() {
    let mut t = fwd6();
    // A 5 KiB datagram reassembled from the world's fragments: cut again
    // for the tap, both families.
    let payload = vec![0x42u8; 5000];
    for (src, dst) in [
        (sa4(REMOTE_IP, 41000), sa4(HOST, 5353)),
        (client6(), host6(5353)),
    ] {
        let mut ip = udp_ip(src, dst, &payload, 64);
        if src.is_ipv4() {
            // What the reassembler hands on: DF clear (fragments never
            // have it).
            let mut p = smoltcp::wire::Ipv4Packet::new_unchecked(&mut ip[..]);
            p.set_dont_frag(false);
            p.fill_checksum();
        }
        let frame = packet::ethernet_frame(GW_MAC, GW_MAC, &ip);
        let pieces = all_to_guest(t.world(&frame, PuntReason::Fragment));
        assert!(pieces.len() >= 4, "{} pieces", pieces.len());
        let mut r = crate::frag::Reassembler::new(crate::frag::ReassemblyLimits::default());
        let mut whole = None;
        for p in &pieces {
            assert!(p.len() <= 1500, "a {}-byte piece", p.len());
            if let crate::frag::FragOutcome::Complete(w) = r.push(p, t.now) {
                whole = Some(w);
            }
        }
        let whole = whole.expect("the pieces make the datagram again");
        let (ip_src, ip_dst, data) = if src.is_ipv6() {
            let (h, _, _, _) = check6(&whole);
            (
                IpAddr::V6(h.src_addr),
                IpAddr::V6(h.dst_addr),
                whole[48..].to_vec(),
            )
        } else {
            let (h, _, _, d) = check_udp(&whole);
            (IpAddr::V4(h.src_addr), IpAddr::V4(h.dst_addr), d)
        };
        assert_eq!(ip_src, src.ip());
        assert_eq!(
            ip_dst,
            if src.is_ipv6() {
                IpAddr::V6(GUEST6)
            } else {
                IpAddr::V4(GuestNetConfig::default().guest_addr)
            }
        );
        assert_eq!(data, payload);
    }
    // Not reassembled (the kernel punted it whole): IPv6 too big for the
    // tap gets Packet Too Big towards the world, as a router answers.
    let ip = udp_ip(client6(), host6(5353), &payload, 64);
    let out = t.world(
        &packet::ethernet_frame(GW_MAC, GW_MAC, &ip),
        PuntReason::Exception,
    );
    let w = to_world(out);
    assert_eq!((w[40], w[41]), (2, 0), "packet too big");
}
