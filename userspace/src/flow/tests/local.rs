//! Clients on the host itself of forwarded ports (the loopback program's
//! punts): `127.0.0.1`, `::1` or a host address on a forwarded port reach
//! the guest, which sees them coming from the gateway's address.

use smoltcp::wire::{IpAddress, IpProtocol, Ipv6Packet, Ipv6Repr, TcpPacket, UdpPacket};

use super::*;
use crate::{
    config::GuestNet6Config,
    fwd::{FwdTable, PortRange, Proto},
};

const LO4: Ipv4Addr = Ipv4Addr::LOCALHOST;
const LO6: Ipv6Addr = Ipv6Addr::LOCALHOST;
/// The guest's current IPv6 address.
const GUEST6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0x5054, 0xff, 0xfe12, 0x3456);
/// The host client's (ephemeral) port.
const CPORT: u16 = 41000;

fn gw4() -> Ipv4Addr {
    GuestNetConfig::default().gateway
}

fn gw6() -> Ipv6Addr {
    GuestNet6Config::default().gateway
}

/// A dual-stack manager forwarding TCP 8080 → guest 80 and UDP 5353 on
/// every address, TCP 9443 → 443 on `HOST` only; the guest's MAC and
/// IPv6 address are known.
fn local_t() -> T {
    let mut forwards = FwdTable::new();
    for (proto, spec) in [
        (Proto::Tcp, "8080:80"),
        (Proto::Udp, "5353"),
        (Proto::Tcp, "192.0.2.2/9443:443"),
    ] {
        forwards
            .add_spec(proto, spec, PortRange::LINUX_EPHEMERAL)
            .unwrap();
    }
    let mut t = T::with(FlowConfig {
        guest6: Some(GuestNet6Config::default()),
        host_addrs: HostAddrs::fixed(vec![IpAddr::V4(HOST), IpAddr::V6(HOST6)]),
        forwards,
        ..config()
    });
    t.m.set_guest_mac(GUEST_MAC);
    t.m.set_guest_addr6(GUEST6);
    t
}

impl T {
    /// A frame the loopback program punted for `reason`.
    fn host(&mut self, frame: &[u8], reason: PuntReason) -> Vec<Output> {
        let mut out = Vec::new();
        self.m.from_host(frame, reason, self.now, &mut out);
        out
    }

    /// An event record of the loopback program.
    fn host_event(&mut self, reason: PuntReason, frame: &[u8]) {
        let mut out = Vec::new();
        let snap = &frame[..frame.len().min(128)];
        self.m.host_event(reason, snap, self.now, &mut out);
        assert!(out.is_empty());
    }
}

/// The IP packet of the one frame for the guest in `out`, either family.
fn to_guest_any(out: Vec<Output>) -> Vec<u8> {
    match <[Output; 1]>::try_from(out) {
        Ok([Output::ToGuest(f)]) => f[14..].to_vec(),
        other => panic!("expected one frame to the guest, got {other:?}"),
    }
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
            (r, t.src_port(), t.dst_port(), p.payload()[13])
        }
        IpProtocol::Udp => {
            let u = UdpPacket::new_checked(p.payload()).unwrap();
            assert!(u.verify_checksum(&s, &d), "udp checksum");
            (r, u.src_port(), u.dst_port(), 0)
        }
        other => panic!("{other}"),
    }
}

#[test]
fn a_host_client_on_loopback_reaches_the_guest_from_the_gateway() {
    let mut t = local_t();
    let client = sa4(LO4, CPORT);
    let fwd = sa4(LO4, 8080);
    let syn = Seg::new(client, fwd).syn(7000);
    let ip = to_guest(t.host(&syn.world_frame(), PuntReason::Forward));
    let (r, tcp) = check_tcp(&ip);
    // The guest sees the gateway at a NAT port of the flow's, never
    // 127.0.0.1 (its own loopback).
    assert_eq!((r.src_addr, r.dst_addr), (gw4(), GUEST));
    assert_eq!((tcp.src_port, tcp.dst_port), (FIRST_PORT, 80));
    assert_eq!((tcp.control, tcp.seq_number), (TcpControl::Syn, seq(7000)));
    assert_eq!(r.hop_limit, 63);

    // The client's side is keyed in the loopback program's direction only.
    let lk = store::lo_key(LO4, LO4, CPORT, 8080, PROTO_TCP);
    assert_eq!(lk.dir, datapath_common::DIR_FROM_LO);
    let le = t.maps().entry(&lk);
    assert_eq!(state(&le), FlowState::Handshake);
    assert_eq!(ipv4_from_16(&le.new_src), gw4().octets());
    assert_eq!(ipv4_from_16(&le.new_dst), GUEST.octets());
    assert_eq!((le.new_sport, le.new_dport), (FIRST_PORT, 80));
    assert_eq!(le.out_ifindex, TAP_IF);
    assert_eq!((le.eth_src, le.eth_dst), (GW_MAC.0, GUEST_MAC.0));
    assert!(
        t.maps()
            .get(&store::uplink_key(LO4, LO4, CPORT, 8080, PROTO_TCP))
            .unwrap()
            .is_none()
    );
    // The guest's side goes to the client through loopback, by a route
    // lookup (no FLOW_F_LOCAL: that would redirect into loopback's
    // ingress, where IPv4 drops a local source as a martian).
    let tk = store::tap_key(GUEST, gw4(), 80, FIRST_PORT, PROTO_TCP);
    let te = t.maps().entry(&tk);
    assert_eq!(ipv4_from_16(&te.new_src), LO4.octets());
    assert_eq!(ipv4_from_16(&te.new_dst), LO4.octets());
    assert_eq!((te.new_sport, te.new_dport), (8080, CPORT));
    assert_eq!(te.out_ifindex, LOOPBACK_IFINDEX);
    assert_eq!(te.flags & FLOW_F_LOCAL, 0);
    // The flow holds the gateway's port; the forwarded one is the rule's.
    assert_eq!(t.live_ports(), 1);
    let s = t.m.stats();
    assert_eq!((s.forwards_accepted, s.forwards_from_host), (1, 1));
    assert_eq!(t.m.host_client_flows(), 1);
    let info = &t.m.flows()[0];
    assert_eq!(
        (info.guest, info.remote, info.upstream, info.nat),
        (guest(80), sa4(gw4(), FIRST_PORT), client, fwd)
    );
    assert_eq!(
        t.m.forwards()
            .rules_with_hits()
            .map(|(_, h)| h)
            .collect::<Vec<_>>(),
        vec![1, 0, 0]
    );

    // A retransmitted SYN (the kernel punts it: handshake) goes again.
    let out = t.host(&syn.world_frame(), PuntReason::Handshake);
    assert_eq!(check_tcp(&to_guest(out)).1.src_port, FIRST_PORT);
    assert_eq!(t.m.stats().flows_created, 1);

    // The guest's SYN-ACK establishes it and reaches the client from the
    // address and port it connected to.
    let synack = Seg::new(guest(80), sa4(gw4(), FIRST_PORT))
        .syn(3000)
        .ack(7001);
    let ip = to_world(t.guest(&synack.guest_frame(), PuntReason::Handshake));
    let (r, tcp) = check_tcp(&ip);
    assert_eq!((r.src_addr, r.dst_addr), (LO4, LO4));
    assert_eq!((tcp.src_port, tcp.dst_port), (8080, CPORT));
    assert_eq!(tcp.control, TcpControl::Syn);
    assert_eq!(tcp.ack_number, Some(seq(7001)));
    for k in [lk, tk] {
        assert_eq!(state(&t.maps().entry(&k)), FlowState::Established);
    }

    // Half-close: the client's FIN comes as a loopback event, the guest's
    // as a tap event, the final ACK from loopback again.
    let fin = Seg::new(client, fwd)
        .ctl(TcpControl::Fin)
        .seq(7001)
        .ack(3001);
    t.host_event(PuntReason::EventFin, &fin.world_frame());
    let gfin = Seg::new(guest(80), sa4(gw4(), FIRST_PORT))
        .ctl(TcpControl::Fin)
        .seq(3001)
        .ack(7002);
    t.event(PuntReason::EventFin, Origin::Tap, &gfin.guest_frame());
    assert_eq!(t.m.flows()[0].state, "last_ack");
    let last = Seg::new(client, fwd).seq(7002).ack(3002);
    t.host_event(PuntReason::EventAck, &last.world_frame());
    assert!(t.m.flows().is_empty());
    assert!(t.maps().entries.is_empty());
    assert_eq!(t.m.stats().tcp_closed_cleanly, 1);
    assert_eq!(t.live_ports(), 0, "the gateway's port is released");
    assert_eq!(t.m.host_client_flows(), 0);
}

#[test]
fn the_hosts_own_address_and_addressed_rules_work_alike() {
    let mut t = local_t();
    // To the host's own address (a client's source is that address).
    let syn = Seg::new(sa4(HOST, CPORT), nat(8080)).syn(1).world_frame();
    let (r, tcp) = check_tcp(&to_guest(t.host(&syn, PuntReason::Forward)));
    assert_eq!((r.src_addr, tcp.src_port), (gw4(), FIRST_PORT));
    assert_eq!((r.dst_addr, tcp.dst_port), (GUEST, 80));
    let te = t
        .maps()
        .entry(&store::tap_key(GUEST, gw4(), 80, FIRST_PORT, PROTO_TCP));
    assert_eq!(ipv4_from_16(&te.new_src), HOST.octets());
    assert_eq!(ipv4_from_16(&te.new_dst), HOST.octets());
    assert_eq!(te.out_ifindex, LOOPBACK_IFINDEX);
    // A rule for the host's address serves it there...
    let syn = Seg::new(sa4(HOST, CPORT + 1), nat(9443))
        .syn(1)
        .world_frame();
    let (_, tcp) = check_tcp(&to_guest(t.host(&syn, PuntReason::Forward)));
    assert_eq!((tcp.src_port, tcp.dst_port), (FIRST_PORT + 1, 443));
    // ... but not on loopback (the kernel never punts that; if it did,
    // the rule table says no).
    let syn = Seg::new(sa4(LO4, CPORT), sa4(LO4, 9443))
        .syn(1)
        .world_frame();
    assert!(t.host(&syn, PuntReason::Forward).is_empty());
    assert_eq!(t.drops(DropReason::NoForward), 1);
    // Two clients, two gateway ports: their guest-side keys differ.
    assert_eq!(t.m.flows().len(), 2);
    assert_eq!(t.live_ports(), 2);
}

#[test]
fn host_udp_of_both_families() {
    let mut t = local_t();
    // IPv4: 127.0.0.1 → 127.0.0.1:5353.
    let q = packet::ethernet_frame(
        GW_MAC,
        GUEST_MAC,
        &udp_ip(sa4(LO4, CPORT), sa4(LO4, 5353), b"query", 64),
    );
    let (r, sp, dp, payload) = check_udp(&to_guest(t.host(&q, PuntReason::Forward)));
    assert_eq!((r.src_addr, r.dst_addr), (gw4(), GUEST));
    assert_eq!((sp, dp, &payload[..]), (FIRST_PORT, 5353, &b"query"[..]));
    let lk = store::lo_key(LO4, LO4, CPORT, 5353, PROTO_UDP);
    assert_eq!(state(&t.maps().entry(&lk)), FlowState::Established);
    // The guest's reply, if punted, goes back to the client from the
    // forwarded address and port.
    let reply = udp_frame(guest(5353), sa4(gw4(), FIRST_PORT), b"answer");
    let (r, sp, dp, _) = check_udp(&to_world(t.guest(&reply, PuntReason::Ipv4NoFlow)));
    assert_eq!((r.src_addr, r.dst_addr), (LO4, LO4));
    assert_eq!((sp, dp), (5353, CPORT));

    // IPv6: [::1] → [::1]:5353, to the guest's current IPv6 address, from
    // the gateway's IPv6 address.
    let q6 = packet::ethernet_frame(
        GW_MAC,
        GUEST_MAC,
        &udp_ip(sa4(LO6, CPORT), sa4(LO6, 5353), b"query6", 64),
    );
    let (h, sp, dp, _) = check6(&to_guest_any(t.host(&q6, PuntReason::Forward)));
    assert_eq!((h.src_addr, h.dst_addr), (gw6(), GUEST6));
    assert_eq!((sp, dp), (FIRST_PORT + 1, 5353));
    let tk6 = store::tap_key(GUEST6, gw6(), 5353, FIRST_PORT + 1, PROTO_UDP);
    let te6 = t.maps().entry(&tk6);
    assert_eq!((te6.new_src, te6.new_dst), (LO6.octets(), LO6.octets()));
    assert_eq!(te6.out_ifindex, LOOPBACK_IFINDEX);
    let lk6 = store::lo_key(LO6, LO6, CPORT, 5353, PROTO_UDP);
    assert_eq!(t.maps().entry(&lk6).new_dst, GUEST6.octets());
    // IPv6 TCP the same way.
    let syn6 = Seg::new(sa4(LO6, CPORT), sa4(LO6, 8080)).syn(9);
    let (h, sp, dp, flags) = check6(&to_guest_any(
        t.host(&syn6.world_frame(), PuntReason::Forward),
    ));
    assert_eq!((h.src_addr, h.dst_addr), (gw6(), GUEST6));
    assert_eq!((sp, dp, flags), (FIRST_PORT + 2, 80, 0x02));
    assert_eq!(t.m.stats().forwards_from_host, 3);
    assert_eq!(t.m.host_client_flows(), 3);
    assert_eq!(t.m.stats().udp_active, 2);
}

#[test]
fn loopback_and_uplink_keys_never_meet() {
    let mut t = local_t();
    let syn = Seg::new(sa4(LO4, CPORT), sa4(LO4, 8080)).syn(1);
    t.host(&syn.world_frame(), PuntReason::Forward);
    // The same packet from the uplink finds no flow...
    assert!(
        t.world(&syn.world_frame(), PuntReason::Handshake)
            .is_empty()
    );
    assert_eq!(t.drops(DropReason::UnknownFlow), 1);
    // ... and an opening from the uplink with a loopback address is a
    // martian, not a forward.
    assert!(t.world(&syn.world_frame(), PuntReason::Forward).is_empty());
    let syn_to_lo = Seg::new(client(), sa4(LO4, 8080)).syn(1).world_frame();
    assert!(t.world(&syn_to_lo, PuntReason::Forward).is_empty());
    assert_eq!(t.drops(DropReason::BadSource), 2);
    assert_eq!(t.m.flows().len(), 1);
    // A world client of the same port is an ordinary inbound flow.
    let out = t.world(
        &Seg::new(client(), nat(8080)).syn(1).world_frame(),
        PuntReason::Forward,
    );
    let (r, _) = check_tcp(&to_guest(out));
    assert_eq!(r.src_addr, REMOTE_IP);
    assert_eq!(t.m.host_client_flows(), 1);
    // And an event from the uplink does not find the host client's flow.
    let rst = Seg::new(sa4(LO4, CPORT), sa4(LO4, 8080))
        .ctl(TcpControl::Rst)
        .world_frame();
    t.event(PuntReason::EventRst, Origin::Uplink, &rst);
    assert_eq!(t.m.flows().len(), 2);
    t.host_event(PuntReason::EventRst, &rst);
    assert_eq!(t.m.flows().len(), 1);
    assert_eq!(t.m.host_client_flows(), 0);
}

#[test]
fn host_datagrams_too_big_for_the_tap_are_cut_not_refused() {
    let mut t = local_t();
    let big = vec![0x5a; 4000];
    let q = packet::ethernet_frame(
        GW_MAC,
        GUEST_MAC,
        &udp_ip(sa4(LO4, CPORT), sa4(LO4, 5353), &big, 64),
    );
    // Linux sets DF on a UDP datagram it need not fragment.
    let mut q = q;
    {
        let mut p = Ipv4Packet::new_unchecked(&mut q[14..]);
        p.set_dont_frag(true);
        p.fill_checksum();
    }
    let out = t.host(&q, PuntReason::Forward);
    assert!(out.len() >= 3, "{} pieces", out.len());
    let mut payload = 0;
    for o in &out {
        let Output::ToGuest(f) = o else {
            panic!("only frames for the guest: {o:?}")
        };
        let p = Ipv4Packet::new_checked(&f[14..]).unwrap();
        assert!(p.verify_checksum());
        assert!(!p.dont_frag());
        assert!(usize::from(p.total_len()) <= 1500);
        assert_eq!(p.src_addr(), gw4());
        payload += usize::from(p.total_len()) - 20;
    }
    assert_eq!(payload, 8 + big.len());
    assert_eq!(t.m.stats().icmp.sent_to_world.total(), 0);
    // From the world the same datagram gets "fragmentation needed".
    let w = world_udp_frame(client(), nat(5353), &big);
    let mut w = w;
    {
        let mut p = Ipv4Packet::new_unchecked(&mut w[14..]);
        p.set_dont_frag(true);
        p.fill_checksum();
    }
    let out = t.world(&w, PuntReason::Forward);
    assert!(matches!(&out[..], [Output::ToWorld(_)]), "{out:?}");
}

#[test]
fn the_hosts_icmp_errors_reach_the_guest_from_the_gateway() {
    let mut t = local_t();
    let q = packet::ethernet_frame(
        GW_MAC,
        GUEST_MAC,
        &udp_ip(sa4(LO4, CPORT), sa4(LO4, 5353), b"query", 64),
    );
    t.host(&q, PuntReason::Forward);
    // The guest's reply reached a client that went away: the host answers
    // port unreachable, quoting the reply as tapgate delivered it.
    let delivered = udp_ip(sa4(LO4, 5353), sa4(LO4, CPORT), b"answer", 63);
    let err = packet::icmp_error(
        IpAddr::V4(LO4),
        &packet::parse_frame(&packet::ethernet_frame(GW_MAC, GUEST_MAC, &delivered)).unwrap(),
        packet::IcmpError::Unreachable(Icmpv4DstUnreachable::PortUnreachable),
    );
    let frame = packet::ethernet_frame(GW_MAC, GUEST_MAC, &err);
    // From the uplink it is nobody's...
    assert!(t.world(&frame, PuntReason::IcmpError).is_empty());
    // ... from loopback it is the flow's: from the gateway, about the
    // guest's datagram to the gateway's port.
    let ip = to_guest(t.host(&frame, PuntReason::IcmpError));
    let (src, icmp) = check_icmp(&ip);
    assert_eq!(src, gw4());
    assert_eq!(icmp_code(&icmp), 3);
    // (The quote is cut short: its header and 8 bytes.)
    let quoted = Ipv4Packet::new_unchecked(&icmp[8..]);
    assert_eq!((quoted.src_addr(), quoted.dst_addr()), (GUEST, gw4()));
}

#[test]
fn removing_the_rule_resets_host_clients_too() {
    let mut t = local_t();
    let client = sa4(LO4, CPORT);
    t.host(
        &Seg::new(client, sa4(LO4, 8080)).syn(7000).world_frame(),
        PuntReason::Forward,
    );
    t.guest(
        &Seg::new(guest(80), sa4(gw4(), FIRST_PORT))
            .syn(3000)
            .ack(7001)
            .guest_frame(),
        PuntReason::Handshake,
    );
    let eph = PortRange::LINUX_EPHEMERAL;
    let gone =
        t.m.forwards()
            .prepare_remove(Proto::Tcp, "8080:80", eph)
            .unwrap();
    t.m.forwards_mut().remove(&gone);
    let mut out = Vec::new();
    assert_eq!(t.m.reset_forwarded(&gone, &mut out), 1);
    let mut saw = (false, false);
    for o in out {
        match o {
            Output::ToGuest(f) => {
                let (r, tcp) = check_tcp(&f[14..]);
                assert_eq!((r.src_addr, tcp.src_port), (gw4(), FIRST_PORT));
                assert_eq!(tcp.control, TcpControl::Rst);
                saw.0 = true;
            }
            Output::ToWorld(ip) => {
                let (r, tcp) = check_tcp(&ip);
                assert_eq!((r.src_addr, r.dst_addr), (LO4, LO4));
                assert_eq!((tcp.src_port, tcp.dst_port), (8080, CPORT));
                assert_eq!(tcp.control, TcpControl::Rst);
                saw.1 = true;
            }
        }
    }
    assert_eq!(saw, (true, true));
    assert_eq!(t.m.host_client_flows(), 0);
    assert_eq!(t.live_ports(), 0);
}

#[test]
fn host_client_flows_are_adopted_holding_the_gateways_port() {
    let mut t = local_t();
    t.host(
        &Seg::new(sa4(LO4, CPORT), sa4(LO4, 8080))
            .syn(7000)
            .world_frame(),
        PuntReason::Forward,
    );
    t.guest(
        &Seg::new(guest(80), sa4(gw4(), FIRST_PORT))
            .syn(3000)
            .ack(7001)
            .guest_frame(),
        PuntReason::Handshake,
    );
    let q6 = packet::ethernet_frame(
        GW_MAC,
        GUEST_MAC,
        &udp_ip(sa4(LO6, CPORT), sa4(LO6, 5353), b"q", 64),
    );
    t.host(&q6, PuntReason::Forward);
    let before = t.m.flows();
    let maps = FakeMaps {
        entries: t.m.maps().entries.clone(),
        activity: t.m.maps().activity.clone(),
        capacity: None,
    };
    drop(t);

    let mut n = local_t();
    n.m = FlowManager::new(
        FlowConfig {
            guest6: Some(GuestNet6Config::default()),
            host_addrs: HostAddrs::fixed(vec![IpAddr::V4(HOST), IpAddr::V6(HOST6)]),
            forwards: local_t().m.forwards().clone(),
            ..config()
        },
        maps,
        FakePorts {
            next: FIRST_PORT,
            live: n.live.clone(),
            exhausted: false,
            no_route: None,
        },
    );
    let report = n.m.adopt(n.now);
    assert_eq!((report.flows, report.ports_lost, report.orphans), (2, 0, 0));
    let key = |v: &[FlowInfo]| {
        let mut v: Vec<_> = v
            .iter()
            .map(|f| (f.proto, f.guest, f.remote, f.upstream, f.nat, f.state))
            .collect();
        v.sort_by_key(|x| x.1);
        v
    };
    assert_eq!(key(&before), key(&n.m.flows()));
    // The gateway's ports are held again (not the forwarded ones).
    assert_eq!(n.live_ports(), 2);
    assert_eq!(n.m.host_client_flows(), 2);
    // The adopted flow still takes the client's packets on loopback.
    let data = Seg::new(sa4(LO4, CPORT), sa4(LO4, 8080))
        .seq(7001)
        .ack(3001)
        .data(b"GET /")
        .world_frame();
    let (r, tcp) = check_tcp(&to_guest(n.host(&data, PuntReason::Exception)));
    assert_eq!((r.src_addr, tcp.src_port), (gw4(), FIRST_PORT));
}

#[test]
fn the_guest_reaching_its_own_forwarded_port_is_refused() {
    // With --allow-host the guest's SYN to a host address leaves from the
    // gateway's address; to a forwarded port it comes back on loopback.
    let mut t = local_t();
    let from_gw = sa4(gw4(), 50123);
    let syn = Seg::new(from_gw, nat(8080)).syn(77);
    let ip = to_world(t.host(&syn.world_frame(), PuntReason::Forward));
    let (r, tcp) = check_tcp(&ip);
    // The RST the port's reservation gave before, back to the guest's flow.
    assert_eq!((r.src_addr, r.dst_addr), (HOST, gw4()));
    assert_eq!((tcp.src_port, tcp.dst_port), (8080, 50123));
    assert_eq!(tcp.control, TcpControl::Rst);
    assert_eq!(tcp.ack_number, Some(seq(78)));
    assert!(t.m.flows().is_empty());
    assert_eq!(t.live_ports(), 0);
    assert_eq!(t.drops(DropReason::NoForward), 1);
    // UDP: dropped, as the reservation swallowed it.
    let q = packet::ethernet_frame(GW_MAC, GUEST_MAC, &udp_ip(from_gw, nat(5353), b"q", 64));
    assert!(t.host(&q, PuntReason::Forward).is_empty());
    assert!(t.m.flows().is_empty());
}
