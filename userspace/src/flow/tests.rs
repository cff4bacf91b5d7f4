//! Flow manager tests over in-memory fakes of the kernel maps and the NAT
//! port reservation. The fakes let the tests play the kernel's part: bump
//! an entry's `packets` and `last_ack` as if it had forwarded a packet, set
//! activity bits, and check exactly which entries exist.
#![allow(clippy::unwrap_used)]

mod adopt;
mod forward6;
mod icmp;
mod ipv6;
mod local;

use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use datapath_common::{
    ACTIVE, FLOW_F_EVENTS, FLOW_F_LOCAL, FlowEntry, FlowKey, FlowState, LOOPBACK_IFINDEX, Origin,
    PROTO_TCP, PROTO_UDP, PuntReason, TAP_ACTIVE, ipv4_from_16, ipv4_to_16,
};
use smoltcp::{
    phy::ChecksumCapabilities,
    wire::{
        EthernetFrame, EthernetRepr, Icmpv4DstUnreachable, Icmpv4Packet, Ipv4Packet, Ipv4Repr,
        TcpControl, TcpSeqNumber,
    },
};

use super::{
    packet::tests::{GUEST_MAC, GW_MAC, Seg, check_tcp, check_udp, sa4, udp_ip},
    *,
};
use crate::config::GuestNetConfig;

// ---------------------------------------------------------------------------
// Fakes
// ---------------------------------------------------------------------------

/// The kernel's maps, in memory.
#[derive(Default)]
struct FakeMaps {
    entries: HashMap<FlowKey, FlowEntry>,
    activity: Vec<u64>,
    /// Refuse inserts once this many entries exist.
    capacity: Option<usize>,
}

impl FlowMaps for FakeMaps {
    fn insert(&mut self, key: &FlowKey, entry: &FlowEntry) -> Result<(), MapsError> {
        if self
            .capacity
            .is_some_and(|c| self.entries.len() >= c && !self.entries.contains_key(key))
        {
            return Err(MapsError::Full);
        }
        self.entries.insert(*key, *entry);
        Ok(())
    }

    fn update_state(
        &mut self,
        key: &FlowKey,
        state: FlowState,
        flags: u8,
    ) -> Result<(), MapsError> {
        let e = self.entries.get_mut(key).ok_or(MapsError::NotFound)?;
        e.state = state as u8;
        e.flags = (e.flags & !FLOW_F_EVENTS) | (flags & FLOW_F_EVENTS);
        Ok(())
    }

    fn get(&self, key: &FlowKey) -> Result<Option<FlowEntry>, MapsError> {
        Ok(self.entries.get(key).copied())
    }

    fn remove(&mut self, key: &FlowKey) -> Result<(), MapsError> {
        self.entries.remove(key);
        Ok(())
    }

    fn activity(&self, slot: u32) -> u64 {
        self.activity.get(slot as usize).copied().unwrap_or(0)
    }

    fn clear_activity(&mut self, slot: u32, bits: u64) {
        if let Some(w) = self.activity.get_mut(slot as usize) {
            *w &= !bits;
        }
    }

    fn entries(&self) -> Result<Vec<(FlowKey, FlowEntry)>, MapsError> {
        Ok(self.entries.iter().map(|(k, e)| (*k, *e)).collect())
    }
}

impl FakeMaps {
    /// The kernel forwarded a packet matching `key` carrying `ack`.
    fn forwarded(&mut self, key: &FlowKey, ack: u32) {
        let e = self.entries.get_mut(key).unwrap();
        assert!(FlowState::from_u8(e.state).unwrap().forwards());
        e.packets += 1;
        e.last_ack = ack;
        let slot = e.slot as usize;
        if self.activity.len() <= slot {
            self.activity.resize(slot + 1, 0);
        }
        self.activity[slot] |= ACTIVE | if key.dir == 0 { TAP_ACTIVE } else { 0 };
    }

    fn set_activity(&mut self, slot: u32, bits: u64) {
        let slot = slot as usize;
        if self.activity.len() <= slot {
            self.activity.resize(slot + 1, 0);
        }
        self.activity[slot] |= bits;
    }

    fn entry(&self, key: &FlowKey) -> FlowEntry {
        *self.entries.get(key).unwrap()
    }
}

/// Ports held by live leases, shared with the test.
type Live = Arc<Mutex<HashSet<(u8, u16)>>>;

struct Guard {
    live: Live,
    key: (u8, u16),
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.live.lock().unwrap().remove(&self.key);
    }
}

struct FakePorts {
    next: u16,
    live: Live,
    exhausted: bool,
    no_route: Option<super::NoRoute>,
}

impl NatPorts for FakePorts {
    fn reserve(&mut self, proto: u8, local: IpAddr) -> Result<NatLease, NatError> {
        // The routed source, or the gateway's address for host-local flows
        // and host clients of forwarded ports.
        assert!(
            local == IpAddr::V4(HOST)
                || local == IpAddr::V6(HOST6)
                || local == IpAddr::V4(GuestNetConfig::default().gateway)
                || local == IpAddr::V6(crate::config::GuestNet6Config::default().gateway),
            "{local}"
        );
        if self.exhausted {
            return Err(NatError::Exhausted(local));
        }
        // Like the kernel: the next port not in use.
        loop {
            let port = self.next;
            self.next = if self.next == u16::MAX {
                50000
            } else {
                self.next + 1
            };
            let key = (proto, port);
            if self.live.lock().unwrap().insert(key) {
                let guard = Guard {
                    live: self.live.clone(),
                    key,
                };
                return Ok(NatLease::new(port, guard));
            }
        }
    }

    fn hold(&mut self, proto: u8, local: IpAddr, port: u16) -> Result<NatLease, NatError> {
        let key = (proto, port);
        if !self.live.lock().unwrap().insert(key) {
            return Err(NatError::Exhausted(local));
        }
        let guard = Guard {
            live: self.live.clone(),
            key,
        };
        Ok(NatLease::new(port, guard))
    }

    fn source_for(&mut self, remote: IpAddr) -> Result<IpAddr, NatError> {
        if let Some(why) = self.no_route {
            return Err(NatError::NoRoute(remote, why));
        }
        Ok(match remote {
            IpAddr::V4(_) => IpAddr::V4(HOST),
            IpAddr::V6(_) => IpAddr::V6(HOST6),
        })
    }
}

/// The IPv4 address of `a` (the IPv4 tests' addresses are all IPv4).
fn ip4(a: IpAddr) -> Ipv4Addr {
    match a {
        IpAddr::V4(a) => a,
        IpAddr::V6(_) => panic!("{a} is not IPv4"),
    }
}

// ---------------------------------------------------------------------------
// Fixtures
// ---------------------------------------------------------------------------

const GUEST: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);
const HOST: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);
/// The host's IPv6 address (the NAT source of IPv6 flows).
const HOST6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);
const REMOTE_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
const UPSTREAM: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 53);
const TAP_IF: u32 = 3;
const UPLINK_IF: u32 = 2;
const FIRST_PORT: u16 = 50000;

fn remote() -> SocketAddr {
    sa4(REMOTE_IP, 80)
}

fn guest(port: u16) -> SocketAddr {
    sa4(GUEST, port)
}

fn nat(port: u16) -> SocketAddr {
    sa4(HOST, port)
}

fn config() -> FlowConfig {
    FlowConfig {
        max_flows: 16,
        host_addrs: HostAddrs::fixed(vec![HOST]),
        dns_upstream: Some(UPSTREAM),
        // The clock has tests of its own (end of file).
        keepalive_interval: Duration::ZERO,
        inactivity_interval: Duration::ZERO,
        ..FlowConfig::new(GuestNetConfig::default(), TAP_IF, UPLINK_IF)
    }
}

struct T {
    m: FlowManager<FakeMaps, FakePorts>,
    live: Live,
    now: Instant,
}

impl T {
    fn new() -> Self {
        Self::with(config())
    }

    fn with(cfg: FlowConfig) -> Self {
        let live = Live::default();
        let ports = FakePorts {
            next: FIRST_PORT,
            live: live.clone(),
            exhausted: false,
            no_route: None,
        };
        Self {
            m: FlowManager::new(cfg, FakeMaps::default(), ports),
            live,
            now: Instant::now(),
        }
    }

    fn advance(&mut self, d: Duration) {
        self.now += d;
    }

    fn guest(&mut self, frame: &[u8], reason: PuntReason) -> Vec<Output> {
        let mut out = Vec::new();
        self.m
            .from_guest(frame, GUEST_MAC, reason, self.now, &mut out);
        out
    }

    fn world(&mut self, frame: &[u8], reason: PuntReason) -> Vec<Output> {
        let mut out = Vec::new();
        self.m.from_world(frame, reason, self.now, &mut out);
        out
    }

    fn event(&mut self, reason: PuntReason, origin: Origin, frame: &[u8]) {
        let mut out = Vec::new();
        let snap = &frame[..frame.len().min(128)];
        self.m.event(reason, origin, snap, self.now, &mut out);
        assert!(out.is_empty());
    }

    fn tick(&mut self) {
        let mut out = Vec::new();
        self.m.tick(self.now, &mut out);
        assert!(out.is_empty());
    }

    fn maps(&mut self) -> &mut FakeMaps {
        self.m.maps_mut()
    }

    fn live_ports(&self) -> usize {
        self.live.lock().unwrap().len()
    }

    fn drops(&self, r: DropReason) -> u64 {
        self.m.stats().drops.get(r)
    }

    /// A guest SYN from `port` to the remote; returns the translated SYN.
    fn open(&mut self, port: u16, isn: u32) -> Vec<u8> {
        let out = self.guest(
            &Seg::new(guest(port), remote()).syn(isn).guest_frame(),
            PuntReason::Ipv4NoFlow,
        );
        to_world(out)
    }

    /// A full handshake from guest `port`; returns the NAT port.
    fn establish(&mut self, port: u16, isn: u32, world_isn: u32) -> u16 {
        let syn = self.open(port, isn);
        let natp = check_tcp(&syn).1.src_port;
        let synack = Seg::new(remote(), nat(natp))
            .syn(world_isn)
            .ack(isn.wrapping_add(1));
        let out = self.world(&synack.world_frame(), PuntReason::Handshake);
        assert_eq!(out.len(), 1);
        natp
    }
}

fn tap_k(port: u16) -> FlowKey {
    store::tap_key(GUEST, REMOTE_IP, port, 80, PROTO_TCP)
}

fn uplink_k(natp: u16) -> FlowKey {
    store::uplink_key(REMOTE_IP, HOST, 80, natp, PROTO_TCP)
}

fn to_world(out: Vec<Output>) -> Vec<u8> {
    match <[Output; 1]>::try_from(out) {
        Ok([Output::ToWorld(p)]) => p,
        other => panic!("expected one packet to the world, got {other:?}"),
    }
}

/// The IPv4 packet of the one frame for the guest in `out`, after checking
/// its Ethernet header.
fn to_guest(out: Vec<Output>) -> Vec<u8> {
    match <[Output; 1]>::try_from(out) {
        Ok([Output::ToGuest(f)]) => {
            let eth = EthernetFrame::new_checked(&f[..]).unwrap();
            let r = EthernetRepr::parse(&eth).unwrap();
            assert_eq!(r.src_addr, GW_MAC);
            assert_eq!(r.dst_addr, GUEST_MAC);
            f[14..].to_vec()
        }
        other => panic!("expected one frame to the guest, got {other:?}"),
    }
}

fn state(e: &FlowEntry) -> FlowState {
    FlowState::from_u8(e.state).unwrap()
}

fn seq(v: u32) -> TcpSeqNumber {
    TcpSeqNumber(v as i32)
}

/// Checks an ICMP error for the guest; returns the outer source and the
/// ICMP message bytes.
fn check_icmp(ip: &[u8]) -> (Ipv4Addr, Vec<u8>) {
    let caps = ChecksumCapabilities::default();
    let p = Ipv4Packet::new_checked(ip).unwrap();
    let r = Ipv4Repr::parse(&p, &caps).unwrap();
    assert_eq!(r.dst_addr, GUEST);
    let icmp = Icmpv4Packet::new_checked(p.payload()).unwrap();
    assert!(icmp.verify_checksum());
    (r.src_addr, p.payload().to_vec())
}

fn icmp_code(icmp: &[u8]) -> u8 {
    Icmpv4Packet::new_checked(icmp).unwrap().msg_code()
}

// ---------------------------------------------------------------------------
// TCP handshake
// ---------------------------------------------------------------------------

#[test]
fn syn_installs_both_entries_and_is_translated() {
    let mut t = T::new();
    let syn = t.open(40000, 1000);

    let (ip, tcp) = check_tcp(&syn);
    assert_eq!(ip.src_addr, HOST);
    assert_eq!(ip.dst_addr, REMOTE_IP);
    assert_eq!(ip.hop_limit, 63);
    assert_eq!((tcp.src_port, tcp.dst_port), (FIRST_PORT, 80));
    assert_eq!(tcp.control, TcpControl::Syn);
    assert_eq!(tcp.seq_number, seq(1000));
    assert_eq!(tcp.ack_number, None);
    // Options survive.
    assert_eq!(tcp.max_seg_size, Some(1460));
    assert_eq!(tcp.window_scale, Some(7));
    assert!(tcp.sack_permitted);
    assert!(tcp.timestamp.is_some());

    let maps = t.maps();
    assert_eq!(maps.entries.len(), 2);
    let te = maps.entry(&tap_k(40000));
    assert_eq!(te.new_src, ipv4_to_16(HOST.octets()));
    assert_eq!(te.new_sport, FIRST_PORT);
    assert_eq!(te.new_dst, ipv4_to_16(REMOTE_IP.octets()));
    assert_eq!(te.new_dport, 80);
    assert_eq!(te.out_ifindex, UPLINK_IF);
    assert_eq!(state(&te), FlowState::Handshake);
    assert_eq!(te.flags, 0);
    let ue = maps.entry(&uplink_k(FIRST_PORT));
    assert_eq!(ue.new_src, ipv4_to_16(REMOTE_IP.octets()));
    assert_eq!(ue.new_sport, 80);
    assert_eq!(ue.new_dst, ipv4_to_16(GUEST.octets()));
    assert_eq!(ue.new_dport, 40000);
    assert_eq!(ue.eth_src, GW_MAC.0);
    assert_eq!(ue.eth_dst, GUEST_MAC.0);
    assert_eq!(ue.out_ifindex, TAP_IF);
    assert_eq!(state(&ue), FlowState::Handshake);
    assert_eq!(ue.slot, te.slot);

    let s = t.m.stats();
    assert_eq!((s.flows_active, s.tcp_active, s.udp_active), (1, 1, 0));
    assert_eq!(s.flows_created, 1);
    assert_eq!(t.live_ports(), 1);

    let flows = t.m.flows_at(t.now + Duration::from_secs(3));
    assert_eq!(flows.len(), 1);
    let f = &flows[0];
    assert_eq!(f.proto, "tcp");
    assert_eq!(f.guest.to_string(), "10.0.2.15:40000");
    assert_eq!(f.remote.to_string(), "203.0.113.10:80");
    assert_eq!(f.nat.to_string(), "192.0.2.2:50000");
    assert_eq!(f.state, "handshake");
    assert_eq!(f.age, Duration::from_secs(3));
    assert_eq!(f.fastpath_packets, 0);
}

#[test]
fn retransmitted_syn_is_sent_again() {
    let mut t = T::new();
    let first = t.open(40000, 1000);
    t.advance(Duration::from_secs(1));
    let out = t.guest(
        &Seg::new(guest(40000), remote()).syn(1000).guest_frame(),
        PuntReason::Handshake,
    );
    let again = to_world(out);
    assert_eq!(first, again);
    let s = t.m.stats();
    assert_eq!(s.flows_created, 1);
    assert_eq!(s.flows_active, 1);
    assert_eq!(s.syn_retransmits, 1);
    assert_eq!(t.live_ports(), 1);
}

#[test]
fn syn_ack_establishes_and_reaches_the_guest() {
    let mut t = T::new();
    t.open(40000, 1000);
    let synack = Seg::new(remote(), nat(FIRST_PORT)).syn(5000).ack(1001);
    let out = t.world(&synack.world_frame(), PuntReason::Handshake);
    let ip = to_guest(out);
    let (r, tcp) = check_tcp(&ip);
    assert_eq!((r.src_addr, r.dst_addr), (REMOTE_IP, GUEST));
    assert_eq!(r.hop_limit, 63);
    assert_eq!((tcp.src_port, tcp.dst_port), (80, 40000));
    assert_eq!(tcp.control, TcpControl::Syn);
    assert_eq!(tcp.seq_number, seq(5000));
    assert_eq!(tcp.ack_number, Some(seq(1001)));
    assert_eq!(tcp.max_seg_size, Some(1460));

    let maps = t.maps();
    assert_eq!(state(&maps.entry(&tap_k(40000))), FlowState::Established);
    assert_eq!(
        state(&maps.entry(&uplink_k(FIRST_PORT))),
        FlowState::Established
    );
    // The handshake deadline is gone.
    t.advance(Duration::from_secs(1000));
    t.tick();
    assert_eq!(t.m.stats().tcp_active, 1);
    assert_eq!(t.m.flows()[0].state, "established");

    // A retransmitted SYN-ACK (the guest's ACK was lost) that the kernel
    // punts as an exception still reaches the guest.
    let out = t.world(&synack.world_frame(), PuntReason::Exception);
    let (_, tcp) = check_tcp(&to_guest(out));
    assert_eq!(tcp.control, TcpControl::Syn);
}

#[test]
fn guest_ack_racing_the_state_update_is_forwarded() {
    let mut t = T::new();
    t.open(40000, 1000);
    let ack = Seg::new(guest(40000), remote())
        .seq(1001)
        .ack(5001)
        .data(b"GET /");
    let out = t.guest(&ack.guest_frame(), PuntReason::Handshake);
    let (r, tcp) = check_tcp(&to_world(out));
    assert_eq!(r.src_addr, HOST);
    assert_eq!(tcp.src_port, FIRST_PORT);
    assert_eq!(tcp.payload, b"GET /");
    assert_eq!(t.m.stats().flows_active, 1);
}

#[test]
fn rst_during_handshake_reaches_the_guest_and_removes_the_flow() {
    let mut t = T::new();
    t.open(40000, 1000);
    let rst = Seg::new(remote(), nat(FIRST_PORT))
        .ctl(TcpControl::Rst)
        .seq(0)
        .ack(1001);
    let out = t.world(&rst.world_frame(), PuntReason::Handshake);
    let (r, tcp) = check_tcp(&to_guest(out));
    assert_eq!(r.dst_addr, GUEST);
    assert_eq!(tcp.control, TcpControl::Rst);
    assert_eq!(tcp.dst_port, 40000);
    let s = t.m.stats();
    assert_eq!(s.flows_active, 0);
    assert_eq!(s.resets, 1);
    assert!(t.maps().entries.is_empty());
    assert_eq!(t.live_ports(), 0);
}

#[test]
fn handshake_times_out() {
    let mut t = T::new();
    t.open(40000, 1000);
    t.advance(HANDSHAKE_TIMEOUT - Duration::from_millis(1));
    t.tick();
    assert_eq!(t.m.stats().flows_active, 1);
    t.advance(Duration::from_millis(1));
    t.tick();
    let s = t.m.stats();
    assert_eq!(s.flows_active, 0);
    assert_eq!(s.handshake_timeouts, 1);
    assert!(t.maps().entries.is_empty());
    assert_eq!(t.live_ports(), 0);
}

// ---------------------------------------------------------------------------
// Half-close
// ---------------------------------------------------------------------------

/// Guest ISN 1000, world ISN 5000; data sequence numbers are arbitrary.
#[test]
fn half_close_guest_first_reaped_on_final_ack() {
    let mut t = T::new();
    let natp = t.establish(40000, 1000, 5000);
    let (tk, uk) = (tap_k(40000), uplink_k(natp));

    // The guest sends its request and FIN (seq 2000, 10 bytes): the kernel
    // forwards it and reports the FIN.
    let fin = Seg::new(guest(40000), remote())
        .ctl(TcpControl::Fin)
        .seq(2000)
        .ack(6000)
        .data(b"0123456789");
    t.maps().forwarded(&tk, 6000);
    t.event(PuntReason::EventFin, Origin::Tap, &fin.guest_frame());
    assert_eq!(state(&t.maps().entry(&tk)), FlowState::FinWait);
    assert_eq!(state(&t.maps().entry(&uk)), FlowState::FinWait);
    assert_eq!(t.maps().entry(&tk).flags, 0);
    assert_eq!(t.m.flows()[0].state, "fin_wait");

    // The world keeps sending its response (kernel-forwarded) and acks the
    // FIN (2000 + 10 + 1).
    t.maps().forwarded(&uk, 2011);
    // Nothing times out in FinWait.
    t.advance(Duration::from_secs(10_000));
    t.tick();
    assert_eq!(t.m.stats().flows_active, 1);

    // The world closes: FIN seq 7000 with 5 bytes, acking the guest's FIN.
    let wfin = Seg::new(remote(), nat(natp))
        .ctl(TcpControl::Fin)
        .seq(7000)
        .ack(2011)
        .data(b"bye!!");
    t.maps().forwarded(&uk, 2011);
    t.event(PuntReason::EventFin, Origin::Uplink, &wfin.world_frame());
    assert_eq!(state(&t.maps().entry(&tk)), FlowState::LastAck);
    assert_eq!(state(&t.maps().entry(&uk)), FlowState::LastAck);
    assert_eq!(t.maps().entry(&tk).flags, FLOW_F_EVENTS);
    assert_eq!(t.maps().entry(&uk).flags, FLOW_F_EVENTS);
    assert_eq!(t.m.stats().flows_active, 1);

    // An ACK that does not cover the world's FIN (7000 + 5 + 1) changes
    // nothing.
    let ack = Seg::new(guest(40000), remote()).seq(2011).ack(7005);
    t.event(PuntReason::EventAck, Origin::Tap, &ack.guest_frame());
    assert_eq!(t.m.stats().flows_active, 1);

    // The guest's final ACK.
    let ack = Seg::new(guest(40000), remote()).seq(2011).ack(7006);
    t.maps().forwarded(&tk, 7006);
    t.event(PuntReason::EventAck, Origin::Tap, &ack.guest_frame());
    let s = t.m.stats();
    assert_eq!(s.flows_active, 0);
    assert_eq!(s.tcp_closed_cleanly, 1);
    assert_eq!(s.flows_closed, 1);
    assert!(t.maps().entries.is_empty());
    assert_eq!(t.live_ports(), 0);
}

#[test]
fn half_close_world_first_reaped_on_final_ack() {
    let mut t = T::new();
    let natp = t.establish(40000, 1000, 5000);
    let (tk, uk) = (tap_k(40000), uplink_k(natp));

    // The world closes first (FIN seq 7000, no data).
    let wfin = Seg::new(remote(), nat(natp))
        .ctl(TcpControl::Fin)
        .seq(7000)
        .ack(2000);
    t.maps().forwarded(&uk, 2000);
    t.event(PuntReason::EventFin, Origin::Uplink, &wfin.world_frame());
    assert_eq!(state(&t.maps().entry(&tk)), FlowState::CloseWait);
    assert_eq!(state(&t.maps().entry(&uk)), FlowState::CloseWait);
    assert_eq!(t.m.flows()[0].state, "close_wait");

    // The guest acks it, keeps sending (kernel-forwarded), then closes
    // with a FIN at 2500 that also acks the world's FIN.
    t.maps().forwarded(&tk, 7001);
    let fin = Seg::new(guest(40000), remote())
        .ctl(TcpControl::Fin)
        .seq(2500)
        .ack(7001);
    t.maps().forwarded(&tk, 7001);
    t.event(PuntReason::EventFin, Origin::Tap, &fin.guest_frame());
    assert_eq!(state(&t.maps().entry(&tk)), FlowState::LastAck);
    assert_eq!(t.maps().entry(&uk).flags, FLOW_F_EVENTS);
    assert_eq!(t.m.stats().flows_active, 1);

    // The world's final ACK (2501).
    let ack = Seg::new(remote(), nat(natp)).seq(7001).ack(2501);
    t.maps().forwarded(&uk, 2501);
    t.event(PuntReason::EventAck, Origin::Uplink, &ack.world_frame());
    let s = t.m.stats();
    assert_eq!(s.flows_active, 0);
    assert_eq!(s.tcp_closed_cleanly, 1);
    assert!(t.maps().entries.is_empty());
    assert_eq!(t.live_ports(), 0);
}

#[test]
fn last_ack_catches_an_ack_that_passed_before_the_flag() {
    let mut t = T::new();
    let natp = t.establish(40000, 1000, 5000);
    let (tk, uk) = (tap_k(40000), uplink_k(natp));
    let fin = Seg::new(guest(40000), remote())
        .ctl(TcpControl::Fin)
        .seq(2000)
        .ack(7000);
    t.event(PuntReason::EventFin, Origin::Tap, &fin.guest_frame());
    // The world acks the guest's FIN with a pure ACK (no event in FinWait).
    t.maps().forwarded(&uk, 2001);
    // The world's FIN, with a stale ACK in it...
    let wfin = Seg::new(remote(), nat(natp))
        .ctl(TcpControl::Fin)
        .seq(7000)
        .ack(2000);
    // ... and the guest's final ACK, forwarded by the kernel before the
    // FIN event reached user space (so no EventAck for it).
    t.maps().forwarded(&tk, 7001);
    t.event(PuntReason::EventFin, Origin::Uplink, &wfin.world_frame());
    let s = t.m.stats();
    assert_eq!(s.flows_active, 0, "reaped from the entries' last_ack");
    assert_eq!(s.tcp_closed_cleanly, 1);
    assert!(t.maps().entries.is_empty());
}

#[test]
fn last_ack_ignores_last_ack_of_an_entry_that_forwarded_nothing() {
    // A FIN end in the upper half of sequence space compares "after" 0, so
    // an untouched entry's last_ack (0) must not count as an ACK.
    let mut t = T::new();
    let natp = t.establish(40000, 0x8000_0000, 0x8000_0000);
    let uk = uplink_k(natp);
    let fin = Seg::new(guest(40000), remote())
        .ctl(TcpControl::Fin)
        .seq(0x8000_0001)
        .ack(0x8000_0001);
    t.event(PuntReason::EventFin, Origin::Tap, &fin.guest_frame());
    let wfin = Seg::new(remote(), nat(natp))
        .ctl(TcpControl::Fin)
        .seq(0x8000_0001);
    // The world's FIN without ACK (odd, but possible in a snap).
    t.maps().forwarded(&uk, 0);
    t.maps().entries.get_mut(&uk).unwrap().packets = 0;
    t.event(PuntReason::EventFin, Origin::Uplink, &wfin.world_frame());
    assert_eq!(t.m.stats().flows_active, 1);
    assert_eq!(t.m.flows()[0].state, "last_ack");
}

#[test]
fn last_ack_is_reaped_at_the_timeout_not_before() {
    let mut t = T::new();
    let natp = t.establish(40000, 1000, 5000);
    let fin = Seg::new(guest(40000), remote())
        .ctl(TcpControl::Fin)
        .seq(2000)
        .ack(7000);
    t.event(PuntReason::EventFin, Origin::Tap, &fin.guest_frame());
    t.advance(Duration::from_secs(30));
    let wfin = Seg::new(remote(), nat(natp))
        .ctl(TcpControl::Fin)
        .seq(7000)
        .ack(2001);
    t.event(PuntReason::EventFin, Origin::Uplink, &wfin.world_frame());
    assert_eq!(t.m.flows()[0].state, "last_ack");
    // The guest never sends its final ACK.
    for _ in 0..59 {
        t.advance(Duration::from_secs(1));
        t.tick();
    }
    t.advance(Duration::from_millis(999));
    t.tick();
    assert_eq!(t.m.stats().flows_active, 1, "not before the timeout");
    t.advance(Duration::from_millis(1));
    t.tick();
    let s = t.m.stats();
    assert_eq!(s.flows_active, 0);
    assert_eq!(s.last_ack_timeouts, 1);
    assert!(t.maps().entries.is_empty());
    assert_eq!(t.live_ports(), 0);
}

#[test]
fn configured_last_ack_timeout() {
    let mut t = T::with(FlowConfig {
        last_ack_timeout: Duration::from_secs(5),
        ..config()
    });
    let natp = t.establish(40000, 1000, 5000);
    let fin = Seg::new(guest(40000), remote())
        .ctl(TcpControl::Fin)
        .seq(2000)
        .ack(7000);
    t.event(PuntReason::EventFin, Origin::Tap, &fin.guest_frame());
    let wfin = Seg::new(remote(), nat(natp)).ctl(TcpControl::Fin).seq(7000);
    t.event(PuntReason::EventFin, Origin::Uplink, &wfin.world_frame());
    t.advance(Duration::from_secs(4));
    t.tick();
    assert_eq!(t.m.stats().flows_active, 1);
    t.advance(Duration::from_secs(1));
    t.tick();
    assert_eq!(t.m.stats().flows_active, 0);
}

#[test]
fn fin_retransmission_does_not_move_the_fin() {
    let mut t = T::new();
    let natp = t.establish(40000, 1000, 5000);
    let fin = Seg::new(guest(40000), remote())
        .ctl(TcpControl::Fin)
        .seq(2000)
        .ack(7000);
    t.event(PuntReason::EventFin, Origin::Tap, &fin.guest_frame());
    t.event(PuntReason::EventFin, Origin::Tap, &fin.guest_frame());
    let wfin = Seg::new(remote(), nat(natp))
        .ctl(TcpControl::Fin)
        .seq(7000)
        .ack(2001);
    t.event(PuntReason::EventFin, Origin::Uplink, &wfin.world_frame());
    let ack = Seg::new(guest(40000), remote()).seq(2001).ack(7001);
    t.event(PuntReason::EventAck, Origin::Tap, &ack.guest_frame());
    assert_eq!(t.m.stats().tcp_closed_cleanly, 1);
}

#[test]
fn rst_event_removes_the_flow() {
    for origin in [Origin::Tap, Origin::Uplink] {
        let mut t = T::new();
        let natp = t.establish(40000, 1000, 5000);
        let frame = match origin {
            Origin::Tap => Seg::new(guest(40000), remote())
                .ctl(TcpControl::Rst)
                .seq(2000)
                .guest_frame(),
            Origin::Uplink => Seg::new(remote(), nat(natp))
                .ctl(TcpControl::Rst)
                .seq(7000)
                .world_frame(),
        };
        t.event(PuntReason::EventRst, origin, &frame);
        let s = t.m.stats();
        assert_eq!(s.flows_active, 0, "{origin:?}");
        assert_eq!(s.resets, 1);
        assert!(t.maps().entries.is_empty());
        assert_eq!(t.live_ports(), 0);
    }
}

#[test]
fn events_for_unknown_flows_are_counted() {
    let mut t = T::new();
    let fin = Seg::new(guest(40000), remote()).ctl(TcpControl::Fin).seq(1);
    t.event(PuntReason::EventFin, Origin::Tap, &fin.guest_frame());
    t.event(PuntReason::EventFin, Origin::Tap, &fin.guest_frame()[..40]);
    let s = t.m.stats();
    assert_eq!(s.events, 2);
    assert_eq!(s.events_unknown, 1);
    assert_eq!(s.drops.get(DropReason::Malformed), 1);
}

// ---------------------------------------------------------------------------
// SYN on a live flow, exceptions
// ---------------------------------------------------------------------------

#[test]
fn new_syn_on_a_live_flow_replaces_it() {
    let mut t = T::new();
    let natp = t.establish(40000, 1000, 5000);
    t.maps().forwarded(&uplink_k(natp), 1500);
    // The guest rebooted and reuses the port with a new ISN.
    let out = t.guest(
        &Seg::new(guest(40000), remote()).syn(90000).guest_frame(),
        PuntReason::Exception,
    );
    assert_eq!(out.len(), 2, "{out:?}");
    let Output::ToWorld(rst) = &out[0] else {
        panic!("{out:?}")
    };
    let (r, tcp) = check_tcp(rst);
    assert_eq!((r.src_addr, r.dst_addr), (HOST, REMOTE_IP));
    assert_eq!((tcp.src_port, tcp.dst_port), (natp, 80));
    assert_eq!(tcp.control, TcpControl::Rst);
    assert_eq!(tcp.seq_number, seq(1500));
    let Output::ToWorld(syn) = &out[1] else {
        panic!("{out:?}")
    };
    let (_, tcp) = check_tcp(syn);
    assert_eq!(tcp.control, TcpControl::Syn);
    assert_eq!(tcp.seq_number, seq(90000));
    assert_ne!(tcp.src_port, natp);
    let s = t.m.stats();
    assert_eq!(s.flows_replaced, 1);
    assert_eq!(s.flows_active, 1);
    assert_eq!(t.live_ports(), 1);
    assert!(!t.maps().entries.contains_key(&uplink_k(natp)));
    assert_eq!(state(&t.maps().entry(&tap_k(40000))), FlowState::Handshake);
}

#[test]
fn duplicate_opening_syn_on_an_established_flow_is_forwarded() {
    let mut t = T::new();
    let natp = t.establish(40000, 1000, 5000);
    let out = t.guest(
        &Seg::new(guest(40000), remote()).syn(1000).guest_frame(),
        PuntReason::Exception,
    );
    let (_, tcp) = check_tcp(&to_world(out));
    assert_eq!(tcp.src_port, natp);
    let s = t.m.stats();
    assert_eq!(s.flows_replaced, 0);
    assert_eq!(s.flows_active, 1);
}

#[test]
fn guest_packets_too_big_for_the_uplink_get_frag_needed_or_are_fragmented() {
    let mut t = T::with(FlowConfig {
        uplink_mtu: 1280,
        ..config()
    });
    let natp = t.establish(40000, 1000, 5000);
    // TCP has DF set: "fragmentation needed" with the uplink's MTU.
    let big = Seg::new(guest(40000), remote())
        .seq(1001)
        .ack(5001)
        .data(&[7u8; 1400]);
    let frame = big.guest_frame();
    let out = t.guest(&frame, PuntReason::Exception);
    let (from, icmp) = check_icmp(&to_guest(out));
    assert_eq!(from, GuestNetConfig::default().gateway);
    assert_eq!((icmp[0], icmp_code(&icmp)), (3, 4));
    assert_eq!(u16::from_be_bytes([icmp[6], icmp[7]]), 1280);
    assert_eq!(&icmp[8..], &frame[14..14 + 28]);
    assert_eq!(t.drops(DropReason::TooBig), 1);
    assert_eq!(
        t.m.stats()
            .icmp
            .sent_to_guest
            .get(super::IcmpKind::FragNeeded),
        1
    );
    // One that fits goes through.
    let small = Seg::new(guest(40000), remote())
        .seq(1001)
        .ack(5001)
        .data(&[7u8; 1200]);
    let (_, tcp) = check_tcp(&to_world(
        t.guest(&small.guest_frame(), PuntReason::Exception),
    ));
    assert_eq!(tcp.src_port, natp);
    // A UDP datagram without DF is fragmented to the uplink's MTU.
    let payload: Vec<u8> = (0..3000u32).map(|i| (i % 251) as u8).collect();
    let mut ip = udp_ip(guest(5353), sa4(REMOTE_IP, 9999), &payload, 64);
    {
        let mut p = Ipv4Packet::new_unchecked(&mut ip[..]);
        p.set_dont_frag(false);
        p.fill_checksum();
    }
    let frame = packet::ethernet_frame(GW_MAC, GUEST_MAC, &ip);
    let out = t.guest(&frame, PuntReason::Ipv4NoFlow);
    assert!(out.len() >= 3, "{} fragments", out.len());
    let mut r = crate::frag::Reassembler::new(crate::frag::ReassemblyLimits::default());
    let mut whole = None;
    for o in &out {
        let Output::ToWorld(f) = o else {
            panic!("not towards the world: {o:?}")
        };
        assert!(f.len() <= 1280);
        if let crate::frag::FragOutcome::Complete(w) = r.push(f, t.now) {
            whole = Some(w);
        }
    }
    let (r, sport, dport, data) = check_udp(&whole.expect("reassembled"));
    assert_eq!((r.src_addr, dport), (HOST, 9999));
    assert_ne!(sport, 0);
    assert_eq!(data, payload);
    assert_eq!(t.m.stats().fragments_sent, out.len() as u64);
}

#[test]
fn ttl_expiring_from_the_guest_gets_time_exceeded() {
    let mut t = T::new();
    let syn = Seg::new(guest(40000), remote()).syn(1).ttl(1);
    let out = t.guest(&syn.guest_frame(), PuntReason::Ipv4NoFlow);
    let (from, icmp) = check_icmp(&to_guest(out));
    assert_eq!(from, GuestNetConfig::default().gateway);
    assert_eq!(
        Icmpv4Packet::new_checked(&icmp[..]).unwrap().msg_type(),
        smoltcp::wire::Icmpv4Message::TimeExceeded
    );
    let s = t.m.stats();
    assert_eq!(s.flows_active, 0);
    assert_eq!(s.icmp_sent, 1);
    assert_eq!(s.drops.get(DropReason::TtlExpired), 1);
}

#[test]
fn world_packets_for_no_flow_or_too_big_are_dropped() {
    let mut t = T::new();
    let natp = t.establish(40000, 1000, 5000);
    let stray = Seg::new(remote(), nat(natp + 1)).seq(1).ack(1);
    assert!(
        t.world(&stray.world_frame(), PuntReason::Exception)
            .is_empty()
    );
    assert_eq!(t.drops(DropReason::UnknownFlow), 1);
    // Too big for the tap with DF: "fragmentation needed" to the world,
    // from the address it sent to, with the tap's MTU.
    let big = Seg::new(remote(), nat(natp))
        .seq(1)
        .ack(1)
        .data(&[0u8; 1500]);
    let frame = big.world_frame();
    let icmp_to_world = |out: Vec<Output>| {
        let ip = to_world(out);
        let p = Ipv4Packet::new_checked(&ip[..]).unwrap();
        assert!(p.verify_checksum());
        assert_eq!((p.src_addr(), p.dst_addr()), (HOST, REMOTE_IP));
        let m = Icmpv4Packet::new_checked(p.payload()).unwrap();
        assert!(m.verify_checksum());
        p.payload().to_vec()
    };
    let icmp = icmp_to_world(t.world(&frame, PuntReason::Exception));
    assert_eq!((icmp[0], icmp[1]), (3, 4));
    assert_eq!(u16::from_be_bytes([icmp[6], icmp[7]]), 1500);
    assert_eq!(&icmp[8..], &frame[14..14 + 28]);
    assert_eq!(t.drops(DropReason::TooBig), 1);
    // TTL running out on the way to the guest: time exceeded.
    let low = Seg::new(remote(), nat(natp)).seq(1).ack(1).ttl(1);
    let icmp = icmp_to_world(t.world(&low.world_frame(), PuntReason::Exception));
    assert_eq!((icmp[0], icmp[1]), (11, 0));
    assert_eq!(t.drops(DropReason::TtlExpired), 1);
    let s = t.m.stats();
    assert_eq!(s.icmp.sent_to_world.get(super::IcmpKind::FragNeeded), 1);
    assert_eq!(s.icmp.sent_to_world.get(super::IcmpKind::TimeExceeded), 1);
}

// ---------------------------------------------------------------------------
// RST for unknown segments
// ---------------------------------------------------------------------------

#[test]
fn unknown_segment_with_ack_gets_rst_from_its_ack() {
    let mut t = T::new();
    let seg = Seg::new(guest(40000), remote())
        .seq(100)
        .ack(5555)
        .data(b"0123456789");
    let out = t.guest(&seg.guest_frame(), PuntReason::Ipv4NoFlow);
    let (r, tcp) = check_tcp(&to_guest(out));
    assert_eq!((r.src_addr, r.dst_addr), (REMOTE_IP, GUEST));
    assert_eq!((tcp.src_port, tcp.dst_port), (80, 40000));
    assert_eq!(tcp.control, TcpControl::Rst);
    assert_eq!(tcp.seq_number, seq(5555));
    assert_eq!(tcp.ack_number, None);
    let s = t.m.stats();
    assert_eq!(s.rsts_sent, 1);
    assert_eq!(s.flows_active, 0);
    assert_eq!(t.live_ports(), 0);
}

#[test]
fn unknown_segment_without_ack_gets_rst_ack() {
    let mut t = T::new();
    let seg = Seg::new(guest(40000), remote())
        .seq(100)
        .data(b"0123456789");
    let out = t.guest(&seg.guest_frame(), PuntReason::Ipv4NoFlow);
    let (_, tcp) = check_tcp(&to_guest(out));
    assert_eq!(tcp.control, TcpControl::Rst);
    assert_eq!(tcp.seq_number, seq(0));
    assert_eq!(tcp.ack_number, Some(seq(110)));

    // A FIN counts one more.
    let seg = Seg::new(guest(40000), remote())
        .ctl(TcpControl::Fin)
        .seq(100)
        .data(b"0123456789");
    let out = t.guest(&seg.guest_frame(), PuntReason::Ipv4NoFlow);
    let (_, tcp) = check_tcp(&to_guest(out));
    assert_eq!(tcp.ack_number, Some(seq(111)));
}

#[test]
fn unknown_syn_ack_gets_rst_and_unknown_rst_is_dropped() {
    let mut t = T::new();
    let synack = Seg::new(guest(40000), remote()).syn(100).ack(777);
    let out = t.guest(&synack.guest_frame(), PuntReason::Ipv4NoFlow);
    let (_, tcp) = check_tcp(&to_guest(out));
    assert_eq!(tcp.seq_number, seq(777));
    assert_eq!(t.m.stats().flows_active, 0);

    let rst = Seg::new(guest(40000), remote())
        .ctl(TcpControl::Rst)
        .seq(100)
        .ack(1);
    assert!(
        t.guest(&rst.guest_frame(), PuntReason::Ipv4NoFlow)
            .is_empty()
    );
    assert_eq!(t.drops(DropReason::UnknownRst), 1);
}

// ---------------------------------------------------------------------------
// UDP
// ---------------------------------------------------------------------------

fn udp_frame(src: SocketAddr, dst: SocketAddr, payload: &[u8]) -> Vec<u8> {
    packet::ethernet_frame(GUEST_MAC, GW_MAC, &udp_ip(src, dst, payload, 64))
}

fn world_udp_frame(src: SocketAddr, dst: SocketAddr, payload: &[u8]) -> Vec<u8> {
    packet::ethernet_frame(
        smoltcp::wire::EthernetAddress([2, 0, 0, 0, 0, 0xaa]),
        smoltcp::wire::EthernetAddress([2, 0, 0, 0, 0, 0xbb]),
        &udp_ip(src, dst, payload, 64),
    )
}

fn udp_remote() -> SocketAddr {
    sa4(REMOTE_IP, 9999)
}

#[test]
fn udp_first_datagram_installs_an_established_flow() {
    let mut t = T::new();
    let out = t.guest(
        &udp_frame(guest(5000), udp_remote(), b"hello"),
        PuntReason::Ipv4NoFlow,
    );
    let (r, sp, dp, payload) = check_udp(&to_world(out));
    assert_eq!((r.src_addr, r.dst_addr), (HOST, REMOTE_IP));
    assert_eq!((sp, dp), (FIRST_PORT, 9999));
    assert_eq!(payload, b"hello");
    assert_eq!(r.hop_limit, 63);
    let tk = store::tap_key(GUEST, REMOTE_IP, 5000, 9999, PROTO_UDP);
    let uk = store::uplink_key(REMOTE_IP, HOST, 9999, FIRST_PORT, PROTO_UDP);
    assert_eq!(state(&t.maps().entry(&tk)), FlowState::Established);
    let ue = t.maps().entry(&uk);
    assert_eq!(state(&ue), FlowState::Established);
    assert_eq!(ue.new_dport, 5000);
    let s = t.m.stats();
    assert_eq!((s.tcp_active, s.udp_active), (0, 1));
    assert_eq!(t.m.flows()[0].proto, "udp");

    // A second datagram punted before the entries took effect is
    // translated too, without a second flow.
    let out = t.guest(
        &udp_frame(guest(5000), udp_remote(), b"again"),
        PuntReason::Ipv4NoFlow,
    );
    assert_eq!(check_udp(&to_world(out)).1, FIRST_PORT);
    assert_eq!(t.m.stats().flows_created, 1);

    // A reply punted on the uplink side reaches the guest.
    let reply = world_udp_frame(udp_remote(), nat(FIRST_PORT), b"world");
    let out = t.world(&reply, PuntReason::Exception);
    let (r, sp, dp, payload) = check_udp(&to_guest(out));
    assert_eq!((r.src_addr, r.dst_addr), (REMOTE_IP, GUEST));
    assert_eq!((sp, dp), (9999, 5000));
    assert_eq!(payload, b"world");
}

#[test]
fn empty_udp_datagram_is_normal() {
    let mut t = T::new();
    let frame = udp_frame(guest(5000), udp_remote(), &[]);
    assert_eq!(frame.len(), 42);
    let out = t.guest(&frame, PuntReason::Ipv4NoFlow);
    let (_, _, _, payload) = check_udp(&to_world(out));
    assert!(payload.is_empty());
    assert_eq!(t.m.stats().udp_active, 1);
}

#[test]
fn udp_idle_flow_expires_between_1x_and_1_25x_the_timeout() {
    let mut t = T::new();
    let start = t.now;
    t.guest(
        &udp_frame(guest(5000), udp_remote(), b"x"),
        PuntReason::Ipv4NoFlow,
    );
    let mut gone_at = None;
    for s in 1..=300u64 {
        t.advance(Duration::from_secs(1));
        t.tick();
        if t.m.stats().udp_active == 0 {
            gone_at = Some(s);
            break;
        }
    }
    let gone_at = Duration::from_secs(gone_at.unwrap());
    assert!(gone_at >= UDP_TIMEOUT, "{gone_at:?}");
    assert!(gone_at <= UDP_TIMEOUT * 5 / 4 + Duration::from_secs(1));
    assert_eq!(t.now - start, gone_at);
    let s = t.m.stats();
    assert_eq!(s.udp_expired, 1);
    assert!(t.maps().entries.is_empty());
    assert_eq!(t.live_ports(), 0);
}

#[test]
fn udp_activity_keeps_the_flow_alive() {
    let mut t = T::new();
    t.guest(
        &udp_frame(guest(5000), udp_remote(), b"x"),
        PuntReason::Ipv4NoFlow,
    );
    let uk = store::uplink_key(REMOTE_IP, HOST, 9999, FIRST_PORT, PROTO_UDP);
    let start = t.now;
    // Replies every 100 s for 1000 s (forwarded by the kernel).
    let mut last = start;
    for s in 1..=1000u64 {
        t.advance(Duration::from_secs(1));
        if s % 100 == 0 {
            t.maps().forwarded(&uk, 0);
            last = t.now;
        }
        t.tick();
        assert_eq!(t.m.stats().udp_active, 1, "at {s} s");
    }
    // Then silence: it goes within 1.25 × the timeout.
    loop {
        t.advance(Duration::from_secs(1));
        t.tick();
        if t.m.stats().udp_active == 0 {
            break;
        }
        assert!(t.now - last <= UDP_TIMEOUT * 5 / 4 + Duration::from_secs(1));
    }
    assert!(t.now - last >= UDP_TIMEOUT);
}

#[test]
fn tcp_activity_bits_are_left_to_the_clock() {
    let mut t = T::new();
    t.establish(40000, 1000, 5000);
    t.maps().set_activity(0, ACTIVE | TAP_ACTIVE);
    t.advance(Duration::from_secs(1000));
    t.tick();
    assert_eq!(t.maps().activity(0), ACTIVE | TAP_ACTIVE);
}

// ---------------------------------------------------------------------------
// DNS
// ---------------------------------------------------------------------------

fn dns() -> SocketAddr {
    sa4(GuestNetConfig::default().dns, 53)
}

#[test]
fn dns_over_udp_is_dnat_to_the_upstream() {
    let mut t = T::new();
    let out = t.guest(
        &udp_frame(guest(33333), dns(), b"query"),
        PuntReason::Ipv4NoFlow,
    );
    let (r, sp, dp, payload) = check_udp(&to_world(out));
    assert_eq!((r.src_addr, r.dst_addr), (HOST, UPSTREAM));
    assert_eq!((sp, dp), (FIRST_PORT, 53));
    assert_eq!(payload, b"query");

    let tk = store::tap_key(GUEST, ip4(dns().ip()), 33333, 53, PROTO_UDP);
    let uk = store::uplink_key(UPSTREAM, HOST, 53, FIRST_PORT, PROTO_UDP);
    let te = t.maps().entry(&tk);
    assert_eq!(te.new_dst, ipv4_to_16(UPSTREAM.octets()));
    assert_eq!(te.new_dport, 53);
    let ue = t.maps().entry(&uk);
    assert_eq!(ue.new_src, ipv4_to_16(ip4(dns().ip()).octets()));
    assert_eq!(ue.new_sport, 53);
    assert_eq!(ue.new_dst, ipv4_to_16(GUEST.octets()));
    assert_eq!(ue.new_dport, 33333);

    let f = &t.m.flows()[0];
    assert_eq!(f.remote, dns());
    assert_eq!(f.upstream, sa4(UPSTREAM, 53));

    // The answer, if it reaches user space, comes from 10.0.2.3:53.
    let answer = world_udp_frame(sa4(UPSTREAM, 53), nat(FIRST_PORT), b"answer");
    let out = t.world(&answer, PuntReason::Exception);
    let (r, sp, dp, _) = check_udp(&to_guest(out));
    assert_eq!((r.src_addr, sp), (ip4(dns().ip()), 53));
    assert_eq!((r.dst_addr, dp), (GUEST, 33333));
}

#[test]
fn dns_over_tcp_is_dnat_to_the_upstream() {
    let mut t = T::new();
    let out = t.guest(
        &Seg::new(guest(40000), dns()).syn(1).guest_frame(),
        PuntReason::Ipv4NoFlow,
    );
    let (r, tcp) = check_tcp(&to_world(out));
    assert_eq!(r.dst_addr, UPSTREAM);
    assert_eq!(tcp.dst_port, 53);
    let synack = Seg::new(sa4(UPSTREAM, 53), nat(FIRST_PORT)).syn(9).ack(2);
    let out = t.world(&synack.world_frame(), PuntReason::Handshake);
    let (r, tcp) = check_tcp(&to_guest(out));
    assert_eq!((r.src_addr, tcp.src_port), (ip4(dns().ip()), 53));
}

#[test]
fn dns_without_upstream_is_refused() {
    for upstream in [None, Some(Ipv4Addr::new(127, 0, 0, 53))] {
        let mut t = T::with(FlowConfig {
            dns_upstream: upstream,
            ..config()
        });
        let out = t.guest(
            &udp_frame(guest(33333), dns(), b"query"),
            PuntReason::Ipv4NoFlow,
        );
        let (from, icmp) = check_icmp(&to_guest(out));
        assert_eq!(from, ip4(dns().ip()));
        assert_eq!(icmp_code(&icmp), 3, "port unreachable");
        let out = t.guest(
            &Seg::new(guest(40000), dns()).syn(1).guest_frame(),
            PuntReason::Ipv4NoFlow,
        );
        let (r, tcp) = check_tcp(&to_guest(out));
        assert_eq!(r.src_addr, ip4(dns().ip()));
        assert_eq!(tcp.control, TcpControl::Rst);
        assert_eq!(t.drops(DropReason::DnsUnavailable), 2);
        assert_eq!(t.m.stats().flows_active, 0);
    }
}

// ---------------------------------------------------------------------------
// Policy
// ---------------------------------------------------------------------------

#[test]
fn tcp_to_the_host_is_admin_prohibited() {
    let mut t = T::new();
    let host = sa4(HOST, 22);
    let syn = Seg::new(guest(40000), host).syn(1000).guest_frame();
    let out = t.guest(&syn, PuntReason::Ipv4NoFlow);
    let (from, icmp) = check_icmp(&to_guest(out));
    assert_eq!(from, GuestNetConfig::default().gateway);
    assert_eq!((icmp[0], icmp_code(&icmp)), (3, 13));
    // Quoting the SYN's header and first 8 bytes, as sent.
    assert_eq!(&icmp[8..], &syn[14..14 + 28]);
    let s = t.m.stats();
    assert_eq!(
        s.icmp.sent_to_guest.get(super::IcmpKind::AdminProhibited),
        1
    );
    assert_eq!(s.policy_denied, 1);
    assert_eq!(s.flows_active, 0);
    assert_eq!(t.live_ports(), 0);
    assert!(t.maps().entries.is_empty());
}

#[test]
fn udp_to_loopback_and_subnet_gets_admin_prohibited() {
    let mut t = T::new();
    for dst in [
        sa4(Ipv4Addr::LOCALHOST, 53),
        sa4(HOST, 53),
        sa4(Ipv4Addr::new(10, 0, 2, 99), 53),
    ] {
        let frame = udp_frame(guest(5000), dst, b"0123456789abcdef");
        let out = t.guest(&frame, PuntReason::Ipv4NoFlow);
        let (from, icmp) = check_icmp(&to_guest(out));
        assert_eq!(from, GuestNetConfig::default().gateway);
        assert_eq!(
            icmp_code(&icmp),
            u8::from(Icmpv4DstUnreachable::CommProhibited)
        );
        // The original IP header, then the UDP header (8 bytes).
        assert_eq!(&icmp[8..], &frame[14..42]);
    }
    let s = t.m.stats();
    assert_eq!(s.policy_denied, 3);
    assert_eq!(s.icmp_sent, 3);
    assert_eq!(s.flows_active, 0);
}

#[test]
fn multicast_and_broadcast_are_dropped_silently() {
    let mut t = T::new();
    for dst in [
        sa4(Ipv4Addr::new(224, 0, 0, 251), 5353),
        sa4(Ipv4Addr::BROADCAST, 67),
        sa4(Ipv4Addr::new(10, 0, 2, 255), 137),
    ] {
        let out = t.guest(&udp_frame(guest(5353), dst, b"x"), PuntReason::Ipv4NoFlow);
        assert!(out.is_empty(), "{dst}");
    }
    assert_eq!(t.m.stats().policy_denied, 3);
}

#[test]
fn gateway_ports_without_service_are_closed() {
    let mut t = T::new();
    let gw = sa4(GuestNetConfig::default().gateway, 123);
    let out = t.guest(&udp_frame(guest(5000), gw, b"ntp"), PuntReason::Ipv4NoFlow);
    let (from, icmp) = check_icmp(&to_guest(out));
    assert_eq!(from, ip4(gw.ip()));
    assert_eq!(icmp_code(&icmp), 3);
}

#[test]
fn allow_host_lets_the_guest_reach_the_host() {
    let mut t = T::with(FlowConfig {
        allow_host: true,
        ..config()
    });
    let host = sa4(HOST, 22);
    let out = t.guest(
        &Seg::new(guest(40000), host).syn(1).guest_frame(),
        PuntReason::Ipv4NoFlow,
    );
    let (r, tcp) = check_tcp(&to_world(out));
    assert_eq!(r.dst_addr, HOST);
    // A host-local flow: the gateway's address is the NAT source, and the
    // guest's direction enters the host stack through loopback.
    let gateway = GuestNetConfig::default().gateway;
    assert_eq!(r.src_addr, gateway);
    let te =
        t.m.maps()
            .entry(&store::tap_key(GUEST, HOST, 40000, 22, PROTO_TCP));
    assert_eq!(te.out_ifindex, LOOPBACK_IFINDEX);
    assert_eq!(te.flags & FLOW_F_LOCAL, FLOW_F_LOCAL);
    assert_eq!(ipv4_from_16(&te.new_src), gateway.octets());
    // Its return entry is keyed on the gateway's address.
    let ue = t.m.maps().entry(&store::uplink_key(
        HOST,
        gateway,
        22,
        tcp.src_port,
        PROTO_TCP,
    ));
    assert_eq!(ipv4_from_16(&ue.new_dst), GUEST.octets());
    // Loopback stays closed.
    let out = t.guest(
        &Seg::new(guest(40001), sa4(Ipv4Addr::LOCALHOST, 22))
            .syn(1)
            .guest_frame(),
        PuntReason::Ipv4NoFlow,
    );
    let (from, icmp) = check_icmp(&to_guest(out));
    assert_eq!(from, gateway);
    assert_eq!((icmp[0], icmp_code(&icmp)), (3, 13));
    assert_eq!(t.m.stats().policy_denied, 1);
}

// ---------------------------------------------------------------------------
// Resource limits and failures
// ---------------------------------------------------------------------------

#[test]
fn max_flows_refuses_with_rst_then_recovers() {
    let mut t = T::with(FlowConfig {
        max_flows: 4,
        ..config()
    });
    for p in 0..4 {
        t.open(40000 + p, 1);
    }
    let out = t.guest(
        &Seg::new(guest(40004), remote()).syn(77).guest_frame(),
        PuntReason::Ipv4NoFlow,
    );
    let (_, tcp) = check_tcp(&to_guest(out));
    assert_eq!(tcp.control, TcpControl::Rst);
    assert_eq!(tcp.ack_number, Some(seq(78)));
    assert!(
        t.guest(
            &udp_frame(guest(5000), udp_remote(), b""),
            PuntReason::Ipv4NoFlow
        )
        .is_empty()
    );
    let s = t.m.stats();
    assert_eq!(s.drops.get(DropReason::TableFull), 2);
    assert_eq!(s.flows_active, 4);
    assert_eq!(s.rsts_sent, 1);
    assert_eq!(t.live_ports(), 4);
    // One goes away; there is room again.
    let rst = Seg::new(guest(40001), remote()).ctl(TcpControl::Rst).seq(2);
    t.guest(&rst.guest_frame(), PuntReason::Handshake);
    assert_eq!(t.m.stats().flows_active, 3);
    t.open(40004, 77);
    assert_eq!(t.m.stats().flows_active, 4);
}

#[test]
fn port_exhaustion_and_no_route() {
    let mut t = T::new();
    t.m.ports.exhausted = true;
    let out = t.guest(
        &Seg::new(guest(40000), remote()).syn(1).guest_frame(),
        PuntReason::Ipv4NoFlow,
    );
    let (_, tcp) = check_tcp(&to_guest(out));
    assert_eq!(tcp.control, TcpControl::Rst);
    assert_eq!(t.drops(DropReason::PortExhausted), 1);

    t.m.ports.exhausted = false;
    t.m.ports.no_route = Some(super::NoRoute::Net);
    let out = t.guest(
        &udp_frame(guest(5000), udp_remote(), b"x"),
        PuntReason::Ipv4NoFlow,
    );
    let (from, icmp) = check_icmp(&to_guest(out));
    assert_eq!(from, GuestNetConfig::default().gateway);
    assert_eq!(icmp_code(&icmp), 0, "net unreachable");
    assert_eq!(t.drops(DropReason::NoRoute), 1);
    assert_eq!(t.m.stats().flows_active, 0);
    assert!(t.maps().entries.is_empty());
}

#[test]
fn map_failure_leaves_nothing_behind() {
    for capacity in [0, 1] {
        let mut t = T::new();
        t.maps().capacity = Some(capacity);
        let out = t.guest(
            &Seg::new(guest(40000), remote()).syn(1).guest_frame(),
            PuntReason::Ipv4NoFlow,
        );
        let (_, tcp) = check_tcp(&to_guest(out));
        assert_eq!(tcp.control, TcpControl::Rst);
        let s = t.m.stats();
        assert_eq!(s.drops.get(DropReason::MapError), 1);
        assert_eq!(s.flows_active, 0);
        assert!(t.maps().entries.is_empty(), "capacity {capacity}");
        assert_eq!(t.live_ports(), 0);
        // The slot went back too: all 16 can still be used.
        t.maps().capacity = None;
        for p in 0..16 {
            t.open(41000 + p, 1);
        }
        assert_eq!(t.m.stats().flows_active, 16);
    }
}

#[test]
fn no_leaks_after_many_flows() {
    let mut t = T::with(FlowConfig {
        max_flows: 8,
        ..config()
    });
    for i in 0..2000u32 {
        let port = 10000 + (i % 500) as u16;
        if i % 2 == 0 {
            let natp = t.establish(port, i, i);
            let rst = Seg::new(remote(), nat(natp)).ctl(TcpControl::Rst).seq(i);
            t.event(PuntReason::EventRst, Origin::Uplink, &rst.world_frame());
        } else {
            t.guest(
                &udp_frame(guest(port), udp_remote(), b"x"),
                PuntReason::Ipv4NoFlow,
            );
            t.advance(UDP_TIMEOUT * 2);
            t.tick();
            t.advance(UDP_TIMEOUT * 2);
            t.tick();
        }
        assert!(t.m.stats().flows_active <= 1);
    }
    let s = t.m.stats();
    assert_eq!(s.flows_active, 0);
    assert_eq!(s.flows_created, 2000);
    assert_eq!(s.flows_closed, 2000);
    assert_eq!(s.drops.total(), 0);
    assert!(t.maps().entries.is_empty());
    assert_eq!(t.live_ports(), 0);
    assert!(t.m.table.is_empty());
    // Only low slots were ever used.
    t.open(1, 1);
    assert!(t.m.flows()[0].slot < 8);
}

// ---------------------------------------------------------------------------
// Malformed input
// ---------------------------------------------------------------------------

#[test]
fn malformed_frames_are_counted() {
    let mut t = T::new();
    let good = Seg::new(guest(40000), remote()).syn(1).guest_frame();
    let cases: Vec<(Vec<u8>, DropReason)> = vec![
        (Vec::new(), DropReason::Malformed),
        (good[..13].to_vec(), DropReason::Malformed),
        (good[..30].to_vec(), DropReason::Malformed),
        (good[..40].to_vec(), DropReason::Malformed),
        (good[..good.len() - 1].to_vec(), DropReason::Malformed),
        (
            {
                let mut f = good.clone();
                f[12] = 0x88;
                f[13] = 0xb5;
                f
            },
            DropReason::NotIp,
        ),
        (
            {
                let mut f = good.clone();
                f[14 + 15] = 99; // source address, checksum now wrong
                f
            },
            DropReason::Malformed,
        ),
        (
            {
                let mut f = good.clone();
                let mut p = Ipv4Packet::new_unchecked(&mut f[14..]);
                p.set_src_addr(Ipv4Addr::new(10, 0, 2, 16));
                p.fill_checksum();
                f
            },
            DropReason::BadSource,
        ),
        (
            {
                let mut f = good.clone();
                let mut p = Ipv4Packet::new_unchecked(&mut f[14..]);
                p.set_frag_offset(8);
                p.fill_checksum();
                f
            },
            DropReason::Fragment,
        ),
        (
            {
                let mut f = good.clone();
                let mut p = Ipv4Packet::new_unchecked(&mut f[14..]);
                p.set_next_header(smoltcp::wire::IpProtocol::Unknown(47));
                p.fill_checksum();
                f
            },
            DropReason::Protocol,
        ),
        (
            {
                let mut f = good[..34].to_vec();
                f.extend_from_slice(&[1, 1, 1, 0]);
                f.extend_from_slice(&good[34..]);
                let mut p = Ipv4Packet::new_unchecked(&mut f[14..]);
                p.set_header_len(24);
                p.set_total_len(p.total_len() + 4);
                p.fill_checksum();
                f
            },
            DropReason::IpOptions,
        ),
    ];
    for (i, (frame, why)) in cases.iter().enumerate() {
        let before = t.drops(*why);
        assert!(
            t.guest(frame, PuntReason::Ipv4NoFlow).is_empty(),
            "case {i}"
        );
        assert_eq!(t.drops(*why), before + 1, "case {i}: {why:?}");
        assert!(t.world(frame, PuntReason::Handshake).is_empty(), "case {i}");
    }
    assert_eq!(t.m.stats().flows_active, 0);
    assert_eq!(t.m.stats().drops.get(DropReason::UnknownFlow), 1);
    // A multicast source MAC is not a guest.
    let mut out = Vec::new();
    t.m.from_guest(
        &good,
        smoltcp::wire::EthernetAddress([1, 0, 0x5e, 0, 0, 1]),
        PuntReason::Ipv4NoFlow,
        t.now,
        &mut out,
    );
    assert!(out.is_empty());
}

#[test]
fn random_bytes_never_panic() {
    let mut t = T::new();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let templates = [
        Seg::new(guest(40000), remote()).syn(1).guest_frame(),
        udp_frame(guest(5000), udp_remote(), b"abc"),
        Seg::new(guest(40000), remote())
            .ctl(TcpControl::Fin)
            .ack(1)
            .guest_frame(),
    ];
    for i in 0..20_000 {
        let mut f = templates[i % templates.len()].clone();
        let flips = (next() % 4) as usize + 1;
        for _ in 0..flips {
            let pos = (next() as usize) % f.len();
            f[pos] = next() as u8;
        }
        if next() % 4 == 0 {
            let len = (next() as usize) % (f.len() + 1);
            f.truncate(len);
        }
        let mut out = Vec::new();
        t.m.from_guest(&f, GUEST_MAC, PuntReason::Ipv4NoFlow, t.now, &mut out);
        t.m.from_world(&f, PuntReason::Handshake, t.now, &mut out);
        t.m.event(PuntReason::EventFin, Origin::Tap, &f, t.now, &mut out);
        t.m.event(PuntReason::EventAck, Origin::Uplink, &f, t.now, &mut out);
        if i % 100 == 0 {
            t.advance(Duration::from_secs(30));
            t.tick();
        }
    }
    // Whatever flows exist are consistent with the maps and the ports.
    let n = t.m.stats().flows_active as usize;
    assert_eq!(t.maps().entries.len(), 2 * n);
    assert_eq!(t.live_ports(), n);
}

#[test]
fn the_manager_can_move_between_threads() {
    fn assert_send<T: Send>() {}
    assert_send::<FlowManager<FakeMaps, FakePorts>>();
    assert_send::<FlowManager<FakeMaps, SocketPorts>>();
    assert_send::<FlowConfig>();
    assert_send::<Output>();
}

// ---------------------------------------------------------------------------
// Clock algorithm
// ---------------------------------------------------------------------------

fn clock_config(keepalive: u64, inactivity: u64, probes: u32) -> FlowConfig {
    FlowConfig {
        keepalive_interval: Duration::from_secs(keepalive),
        inactivity_interval: Duration::from_secs(inactivity),
        keepalive_probes: probes,
        ..config()
    }
}

impl T {
    /// One tick; returns what it emitted.
    fn tick_out(&mut self) -> Vec<Output> {
        let mut out = Vec::new();
        self.m.tick(self.now, &mut out);
        out
    }

    /// Advances one second and ticks, `n` times, calling `each(t, second)`
    /// before every tick; returns the outputs with the second they came in.
    fn run(&mut self, n: u64, mut each: impl FnMut(&mut T, u64)) -> Vec<(u64, Output)> {
        let mut all = Vec::new();
        for s in 1..=n {
            self.advance(Duration::from_secs(1));
            each(self, s);
            for o in self.tick_out() {
                all.push((s, o));
            }
        }
        all
    }

    /// An established flow from guest port 40000 (guest ISN 1000, world
    /// ISN 5000) that exchanged data on the fast path: the guest's last
    /// ACK 6000, the remote's last ACK 2000 and window 501. The clock is
    /// started (first tick) at the current time.
    fn clock_flow(&mut self) -> u16 {
        let natp = self.establish(40000, 1000, 5000);
        self.maps().forwarded(&tap_k(40000), 6000);
        self.maps().forwarded(&uplink_k(natp), 2000);
        self.maps()
            .entries
            .get_mut(&uplink_k(natp))
            .unwrap()
            .last_win = 501;
        assert!(self.tick_out().is_empty());
        natp
    }
}

/// The TCP segment of a frame for the guest, checked down to the checksums.
fn guest_tcp(o: &Output) -> (Ipv4Repr, smoltcp::wire::TcpRepr<'static>) {
    match o {
        Output::ToGuest(f) => {
            let eth = EthernetFrame::new_checked(&f[..]).unwrap();
            let r = EthernetRepr::parse(&eth).unwrap();
            assert_eq!(r.src_addr, GW_MAC);
            assert_eq!(r.dst_addr, GUEST_MAC);
            check_tcp(&f[14..])
        }
        other => panic!("expected a frame to the guest, got {other:?}"),
    }
}

/// Checks a keepalive for guest port 40000 from the remote.
fn assert_keepalive(o: &Output, seq_: u32, ack: u32, win: u16) {
    let (ip, tcp) = guest_tcp(o);
    assert_eq!((ip.src_addr, ip.dst_addr), (REMOTE_IP, GUEST));
    assert_eq!((tcp.src_port, tcp.dst_port), (80, 40000));
    assert_eq!(tcp.control, TcpControl::None);
    assert_eq!(tcp.seq_number, seq(seq_));
    assert_eq!(tcp.ack_number, Some(seq(ack)));
    assert_eq!(tcp.window_len, win);
    assert!(tcp.payload.is_empty());
}

/// Checks the two RSTs of a both-sided reset: to the guest with `guest_seq`,
/// to the world from the NAT port with `world_seq`.
fn assert_reset_both(out: &[Output], natp: u16, guest_seq: u32, world_seq: u32) {
    assert_eq!(out.len(), 2, "{out:?}");
    let (ip, tcp) = guest_tcp(&out[0]);
    assert_eq!((ip.src_addr, ip.dst_addr), (REMOTE_IP, GUEST));
    assert_eq!((tcp.src_port, tcp.dst_port), (80, 40000));
    assert_eq!(tcp.control, TcpControl::Rst);
    assert_eq!(tcp.seq_number, seq(guest_seq));
    let Output::ToWorld(p) = &out[1] else {
        panic!("expected an RST to the world, got {:?}", out[1]);
    };
    let (ip, tcp) = check_tcp(p);
    assert_eq!((ip.src_addr, ip.dst_addr), (HOST, REMOTE_IP));
    assert_eq!((tcp.src_port, tcp.dst_port), (natp, 80));
    assert_eq!(tcp.control, TcpControl::Rst);
    assert_eq!(tcp.seq_number, seq(world_seq));
}

#[test]
fn keepalive_goes_to_an_idle_guest_with_exact_numbers() {
    let mut t = T::with(clock_config(10, 0, 0));
    t.clock_flow();
    // The scan at 10 consumes the guest's bit from clock_flow's packets;
    // the one at 20 finds it clear.
    let out = t.run(20, |_, _| {});
    assert_eq!(out.len(), 1, "{out:?}");
    assert_eq!(out[0].0, 20);
    assert_keepalive(&out[0].1, 5999, 2000, 501);
    assert_eq!(t.m.stats().keepalives_sent, 1);
    assert_eq!(t.m.stats().flows_active, 1);
}

#[test]
fn activity_bits_over_ticks() {
    let mut t = T::with(clock_config(10, 30, 0));
    let natp = t.clock_flow();
    let (tk, uk) = (tap_k(40000), uplink_k(natp));
    // The first keepalive scan consumes the guest's bit from clock_flow,
    // leaving ACTIVE to the inactivity scan.
    assert!(t.run(10, |_, _| {}).is_empty());
    assert_eq!(t.maps().activity(0), ACTIVE);
    // Only the world talks: the guest's bit stays clear, so a keepalive.
    let out = t.run(10, |t, s| {
        if s == 5 {
            t.maps().forwarded(&uk, 2000);
        }
    });
    assert_eq!(out.len(), 1);
    assert_keepalive(&out[0].1, 5999, 2000, 501);
    // The guest answers (a duplicate ACK through the fast path): no
    // keepalive at the next scan, and the bit is consumed.
    let out = t.run(10, |t, s| {
        if s == 1 {
            t.maps().forwarded(&tk, 6000);
        }
    });
    assert!(out.is_empty(), "{out:?}");
    assert_eq!(t.maps().activity(0) & TAP_ACTIVE, 0);
    // At 30 s the inactivity scan consumed ACTIVE; the flow lives on.
    assert_eq!(t.m.stats().flows_active, 1);
    assert_eq!(t.m.stats().keepalives_sent, 1);
}

#[test]
fn keepalive_without_fast_path_packets_uses_the_handshake() {
    let mut t = T::with(clock_config(5, 0, 0));
    t.establish(40000, 1000, 5000);
    assert!(t.tick_out().is_empty());
    let out = t.run(5, |_, _| {});
    assert_eq!(out.len(), 1);
    // The guest's last ACK is world ISN + 1, the remote's guest ISN + 1.
    assert_keepalive(&out[0].1, 5000, 1001, 0);
}

#[test]
fn rst_answer_to_a_keepalive_removes_the_flow() {
    let mut t = T::with(clock_config(10, 0, 0));
    t.clock_flow();
    assert_eq!(t.run(20, |_, _| {}).len(), 1);
    // The guest forgot the flow: RST with seq = the keepalive's ACK,
    // forwarded by the kernel, reported as an event.
    let rst = Seg::new(guest(40000), remote())
        .ctl(TcpControl::Rst)
        .seq(2000);
    t.event(PuntReason::EventRst, Origin::Tap, &rst.guest_frame());
    let s = t.m.stats();
    assert_eq!((s.flows_active, s.resets, s.rst_answer_resets), (0, 1, 1));
    assert!(t.maps().entries.is_empty());
    assert_eq!(t.live_ports(), 0);
    // Nothing more from the clock.
    assert!(t.run(30, |_, _| {}).is_empty());
}

#[test]
fn rst_without_a_keepalive_is_not_an_answer() {
    let mut t = T::with(clock_config(10, 0, 0));
    t.clock_flow();
    let rst = Seg::new(guest(40000), remote())
        .ctl(TcpControl::Rst)
        .seq(2000);
    t.event(PuntReason::EventRst, Origin::Tap, &rst.guest_frame());
    let s = t.m.stats();
    assert_eq!((s.resets, s.rst_answer_resets), (1, 0));
}

#[test]
fn inactivity_resets_both_sides_between_one_and_two_intervals() {
    let mut t = T::with(clock_config(0, 100, 0));
    let natp = t.clock_flow();
    // The last packet was at 0 (clock_flow); the scan at 100 consumes its
    // bit, the one at 200 finds it clear.
    let out = t.run(250, |_, _| {});
    assert!(out.iter().all(|(s, _)| *s == 200), "{out:?}");
    let out: Vec<Output> = out.into_iter().map(|(_, o)| o).collect();
    assert_reset_both(&out, natp, 6000, 2000);
    let s = t.m.stats();
    assert_eq!(
        (s.inactivity_resets, s.flows_active, s.rsts_sent),
        (1, 0, 2)
    );
    assert!(t.maps().entries.is_empty());
    assert_eq!(t.live_ports(), 0);
}

#[test]
fn inactivity_with_the_last_packet_just_after_a_scan() {
    let mut t = T::with(clock_config(0, 100, 0));
    let natp = t.clock_flow();
    // Consume the initial bit, then a packet right after the scan at 100:
    // it dies at 300, two intervals later; one just before the scan at 200
    // dies at 300 too, one interval later.
    let out = t.run(350, |t, s| {
        if s == 101 || s == 199 {
            t.maps().forwarded(&uplink_k(natp), 2000);
        }
    });
    assert!(out.iter().all(|(s, _)| *s == 300), "{out:?}");
    assert_eq!(out.len(), 2);
}

#[test]
fn traffic_every_interval_is_never_reset() {
    let mut t = T::with(clock_config(0, 10, 0));
    let natp = t.clock_flow();
    let out = t.run(1000, |t, s| {
        if s % 10 == 3 {
            t.maps().forwarded(&uplink_k(natp), 2000);
        }
    });
    assert!(out.is_empty());
    assert_eq!(t.m.stats().flows_active, 1);
    assert_eq!(t.m.stats().inactivity_resets, 0);
}

#[test]
fn a_live_guest_answering_keepalives_stays() {
    let mut t = T::with(clock_config(10, 25, 0));
    t.clock_flow();
    // The guest answers each keepalive one second later.
    let mut sent = 0;
    for _ in 0..20 {
        let out = t.run(10, |_, _| {});
        for (_, o) in &out {
            assert_keepalive(o, 5999, 2000, 501);
            sent += 1;
        }
        if !out.is_empty() {
            t.maps().forwarded(&tap_k(40000), 6000);
        }
    }
    assert!(sent >= 9, "{sent}");
    let s = t.m.stats();
    assert_eq!((s.flows_active, s.inactivity_resets), (1, 0));
}

#[test]
fn unanswered_probes_reset_the_flow() {
    let mut t = T::with(clock_config(10, 0, 2));
    let natp = t.clock_flow();
    let out = t.run(40, |_, _| {});
    // Keepalives at 20 and 30, the reset at 40.
    let times: Vec<u64> = out.iter().map(|(s, _)| *s).collect();
    assert_eq!(times, vec![20, 30, 40, 40]);
    assert_keepalive(&out[0].1, 5999, 2000, 501);
    assert_keepalive(&out[1].1, 5999, 2000, 501);
    let out: Vec<Output> = out.into_iter().skip(2).map(|(_, o)| o).collect();
    assert_reset_both(&out, natp, 6000, 2000);
    let s = t.m.stats();
    assert_eq!(
        (s.keepalives_sent, s.probe_resets, s.flows_active),
        (2, 1, 0)
    );
    assert_eq!(t.live_ports(), 0);
}

#[test]
fn an_answer_restarts_the_probe_count() {
    let mut t = T::with(clock_config(10, 0, 2));
    t.clock_flow();
    let out = t.run(70, |t, s| {
        // The guest answers the second keepalive only.
        if s == 35 {
            t.maps().forwarded(&tap_k(40000), 6000);
        }
    });
    // Keepalives at 20 and 30; 40 hears the answer; keepalives at 50 and
    // 60; reset at 70.
    let times: Vec<u64> = out.iter().map(|(s, _)| *s).collect();
    assert_eq!(times, vec![20, 30, 50, 60, 70, 70]);
    assert_eq!(t.m.stats().probe_resets, 1);
}

#[test]
fn zero_intervals_turn_the_clock_off() {
    let mut t = T::with(clock_config(0, 0, 3));
    t.clock_flow();
    assert!(t.run(20_000, |_, _| {}).is_empty());
    assert_eq!(t.m.stats().flows_active, 1);
    assert_eq!(t.maps().activity(0), ACTIVE | TAP_ACTIVE);
}

#[test]
fn the_clock_skips_handshakes_last_ack_and_udp() {
    let mut t = T::with(FlowConfig {
        handshake_timeout: Duration::from_secs(1000),
        last_ack_timeout: Duration::from_secs(1000),
        udp_timeout: Duration::from_secs(1000),
        ..clock_config(10, 20, 0)
    });
    // A handshake, a UDP flow, and a flow in LastAck.
    t.open(40001, 1);
    t.guest(
        &udp_frame(guest(5000), udp_remote(), b"x"),
        PuntReason::Ipv4NoFlow,
    );
    let natp = t.establish(40000, 1000, 5000);
    let (tk, uk) = (tap_k(40000), uplink_k(natp));
    let fin = Seg::new(guest(40000), remote())
        .ctl(TcpControl::Fin)
        .seq(1001)
        .ack(5001);
    t.maps().forwarded(&tk, 5001);
    t.event(PuntReason::EventFin, Origin::Tap, &fin.guest_frame());
    let wfin = Seg::new(remote(), nat(natp))
        .ctl(TcpControl::Fin)
        .seq(5001)
        .ack(1002);
    t.maps().forwarded(&uk, 1002);
    t.event(PuntReason::EventFin, Origin::Uplink, &wfin.world_frame());
    assert_eq!(t.m.flows()[2].state, "last_ack");
    assert!(t.tick_out().is_empty());
    assert!(t.run(100, |_, _| {}).is_empty());
    assert_eq!(t.m.stats().flows_active, 3);
}

#[test]
fn a_scan_larger_than_a_chunk_is_spread_over_ticks() {
    use crate::flow::clock::SCAN_CHUNK;
    let n = SCAN_CHUNK + 100;
    let mut t = T::with(FlowConfig {
        max_flows: u32::try_from(n).unwrap() + 10,
        ..clock_config(10, 0, 0)
    });
    for i in 0..n {
        t.establish(20000 + u16::try_from(i).unwrap(), 1000, 5000);
    }
    assert!(t.tick_out().is_empty());
    assert!(!t.m.clock_busy());
    // Nobody sent anything on the fast path: every flow is idle. The due
    // scan does one chunk a tick, and says so.
    t.advance(Duration::from_secs(10));
    assert_eq!(t.tick_out().len(), SCAN_CHUNK);
    assert!(t.m.clock_busy());
    assert_eq!(t.tick_out().len(), 100);
    assert!(!t.m.clock_busy());
    assert_eq!(t.m.stats().keepalives_sent, u64::try_from(n).unwrap());
    // Nothing more until the next interval.
    assert!(t.tick_out().is_empty());
}

// ---------------------------------------------------------------------------
// Inbound forwards
// ---------------------------------------------------------------------------

/// A world client connecting to forwarded ports.
fn client() -> SocketAddr {
    sa4(REMOTE_IP, 41000)
}

/// A manager forwarding TCP 8080 → guest 80, TCP 9000-9010 except 9005 to
/// themselves, UDP 5353; the guest's MAC is known.
fn fwd_t() -> T {
    let mut forwards = crate::fwd::FwdTable::new();
    let eph = crate::fwd::PortRange::LINUX_EPHEMERAL;
    forwards
        .add_spec(crate::fwd::Proto::Tcp, "8080:80", eph)
        .unwrap();
    forwards
        .add_spec(crate::fwd::Proto::Tcp, "9000-9010,~9005", eph)
        .unwrap();
    forwards
        .add_spec(crate::fwd::Proto::Udp, "5353", eph)
        .unwrap();
    let mut t = T::with(FlowConfig {
        forwards,
        ..config()
    });
    t.m.set_guest_mac(GUEST_MAC);
    t
}

fn fwd_tap_k(gport: u16, proto: u8) -> FlowKey {
    store::tap_key(GUEST, REMOTE_IP, gport, 41000, proto)
}

fn fwd_uplink_k(hport: u16, proto: u8) -> FlowKey {
    store::uplink_key(REMOTE_IP, HOST, 41000, hport, proto)
}

#[test]
fn inbound_syn_installs_both_entries_and_reaches_the_guest() {
    let mut t = fwd_t();
    let syn = Seg::new(client(), nat(8080)).syn(7000);
    let out = t.world(&syn.world_frame(), PuntReason::Forward);
    let ip = to_guest(out);
    let (r, tcp) = check_tcp(&ip);
    // DNAT to the guest's port 80; the client's address is left alone.
    assert_eq!((r.src_addr, r.dst_addr), (REMOTE_IP, GUEST));
    assert_eq!((tcp.src_port, tcp.dst_port), (41000, 80));
    assert_eq!(tcp.control, TcpControl::Syn);
    assert_eq!(tcp.seq_number, seq(7000));

    let ue = t.maps().entry(&fwd_uplink_k(8080, PROTO_TCP));
    assert_eq!(state(&ue), FlowState::Handshake);
    assert_eq!(ipv4_from_16(&ue.new_src), REMOTE_IP.octets());
    assert_eq!(ipv4_from_16(&ue.new_dst), GUEST.octets());
    assert_eq!((ue.new_sport, ue.new_dport), (41000, 80));
    assert_eq!(ue.out_ifindex, TAP_IF);
    let te = t.maps().entry(&fwd_tap_k(80, PROTO_TCP));
    assert_eq!(state(&te), FlowState::Handshake);
    assert_eq!(ipv4_from_16(&te.new_src), HOST.octets());
    assert_eq!(ipv4_from_16(&te.new_dst), REMOTE_IP.octets());
    assert_eq!((te.new_sport, te.new_dport), (8080, 41000));
    assert_eq!(te.out_ifindex, UPLINK_IF);
    assert_eq!(t.m.stats().forwards_accepted, 1);
    // No NAT port: the forwarded port is held by the reservations.
    assert_eq!(t.live_ports(), 0);
    let info = &t.m.flows()[0];
    assert_eq!(
        (info.guest, info.remote, info.nat),
        (guest(80), client(), nat(8080))
    );

    // A retransmitted SYN finds the flow and is translated again.
    let out = t.world(&syn.world_frame(), PuntReason::Handshake);
    assert_eq!(check_tcp(&to_guest(out)).1.dst_port, 80);
    assert_eq!(t.m.stats().flows_created, 1);
}

#[test]
fn guest_syn_ack_establishes_an_inbound_flow() {
    let mut t = fwd_t();
    t.world(
        &Seg::new(client(), nat(8080)).syn(7000).world_frame(),
        PuntReason::Forward,
    );
    let synack = Seg::new(guest(80), client()).syn(3000).ack(7001);
    let out = t.guest(&synack.guest_frame(), PuntReason::Handshake);
    let ip = to_world(out);
    let (r, tcp) = check_tcp(&ip);
    assert_eq!((r.src_addr, r.dst_addr), (HOST, REMOTE_IP));
    assert_eq!((tcp.src_port, tcp.dst_port), (8080, 41000));
    assert_eq!(tcp.control, TcpControl::Syn);
    assert_eq!(tcp.ack_number, Some(seq(7001)));
    for k in [fwd_tap_k(80, PROTO_TCP), fwd_uplink_k(8080, PROTO_TCP)] {
        assert_eq!(state(&t.maps().entry(&k)), FlowState::Established);
    }
    // No handshake deadline any more.
    t.advance(Duration::from_secs(1000));
    t.tick();
    assert_eq!(t.m.flows()[0].state, "established");

    // Half-close runs the same machinery: the client closes first...
    let fin = Seg::new(client(), nat(8080))
        .ctl(TcpControl::Fin)
        .seq(7001)
        .ack(3001);
    t.event(PuntReason::EventFin, Origin::Uplink, &fin.world_frame());
    assert_eq!(t.m.flows()[0].state, "close_wait");
    // ... the guest closes too and acknowledges the client's FIN ...
    let gfin = Seg::new(guest(80), client())
        .ctl(TcpControl::Fin)
        .seq(3001)
        .ack(7002);
    t.event(PuntReason::EventFin, Origin::Tap, &gfin.guest_frame());
    assert_eq!(t.m.flows()[0].state, "last_ack");
    // ... and the client's final ACK reaps it.
    let last = Seg::new(client(), nat(8080)).seq(7002).ack(3002);
    t.event(PuntReason::EventAck, Origin::Uplink, &last.world_frame());
    assert!(t.m.flows().is_empty());
    assert_eq!(t.m.stats().tcp_closed_cleanly, 1);
    assert!(t.maps().entries.is_empty());
}

#[test]
fn guest_rst_to_an_inbound_syn_reaches_the_client_and_removes_the_flow() {
    let mut t = fwd_t();
    t.world(
        &Seg::new(client(), nat(9001)).syn(7000).world_frame(),
        PuntReason::Forward,
    );
    assert_eq!(t.m.flows()[0].guest, guest(9001));
    let rst = Seg::new(guest(9001), client())
        .ctl(TcpControl::Rst)
        .seq(0)
        .ack(7001);
    let (r, tcp) = check_tcp(&to_world(
        t.guest(&rst.guest_frame(), PuntReason::Handshake),
    ));
    assert_eq!((r.src_addr, tcp.src_port), (HOST, 9001));
    assert_eq!(tcp.control, TcpControl::Rst);
    assert!(t.m.flows().is_empty());
    assert!(t.maps().entries.is_empty());
}

#[test]
fn inbound_handshake_times_out() {
    let mut t = fwd_t();
    t.world(
        &Seg::new(client(), nat(8080)).syn(7000).world_frame(),
        PuntReason::Forward,
    );
    t.advance(HANDSHAKE_TIMEOUT + Duration::from_secs(1));
    t.tick();
    assert!(t.m.flows().is_empty());
    assert_eq!(t.m.stats().handshake_timeouts, 1);
}

#[test]
fn inbound_openings_without_a_rule_are_dropped() {
    let mut t = fwd_t();
    // An excluded port (the kernel would not punt it; defence in depth),
    // a port of the other protocol, and a non-SYN segment.
    for (frame, why) in [
        (
            Seg::new(client(), nat(9005)).syn(1).world_frame(),
            DropReason::NoForward,
        ),
        (
            world_udp_frame(client(), nat(8080), b"x"),
            DropReason::NoForward,
        ),
        (
            Seg::new(client(), nat(8080)).seq(1).ack(2).world_frame(),
            DropReason::UnknownFlow,
        ),
    ] {
        assert!(t.world(&frame, PuntReason::Forward).is_empty());
        assert!(t.drops(why) > 0, "{why:?}");
    }
    assert!(t.m.flows().is_empty());
    assert!(t.maps().entries.is_empty());
    // Only `Forward` punts open flows.
    let syn = Seg::new(client(), nat(8080)).syn(1).world_frame();
    assert!(t.world(&syn, PuntReason::Exception).is_empty());
    assert!(t.m.flows().is_empty());
}

#[test]
fn inbound_needs_the_guest_mac() {
    let mut forwards = crate::fwd::FwdTable::new();
    forwards
        .add_spec(
            crate::fwd::Proto::Tcp,
            "8080:80",
            crate::fwd::PortRange::LINUX_EPHEMERAL,
        )
        .unwrap();
    let mut t = T::with(FlowConfig {
        forwards,
        ..config()
    });
    let syn = Seg::new(client(), nat(8080)).syn(1).world_frame();
    assert!(t.world(&syn, PuntReason::Forward).is_empty());
    assert_eq!(t.drops(DropReason::GuestUnknown), 1);
    assert_eq!(
        t.m.forwards().rules_with_hits().next().map(|(_, h)| h),
        Some(0)
    );
    // Any frame from the guest teaches it.
    t.guest(
        &udp_frame(guest(5000), udp_remote(), b"hi"),
        PuntReason::Ipv4NoFlow,
    );
    assert_eq!(
        check_tcp(&to_guest(t.world(&syn, PuntReason::Forward)))
            .1
            .dst_port,
        80
    );
    assert_eq!(
        t.m.forwards().rules_with_hits().next().map(|(_, h)| h),
        Some(1)
    );
}

#[test]
fn inbound_udp_is_established_at_once() {
    let mut t = fwd_t();
    let out = t.world(
        &world_udp_frame(client(), nat(5353), b"query"),
        PuntReason::Forward,
    );
    let (r, sp, dp, payload) = check_udp(&to_guest(out));
    assert_eq!((r.src_addr, r.dst_addr), (REMOTE_IP, GUEST));
    assert_eq!((sp, dp), (41000, 5353));
    assert_eq!(payload, b"query");
    for k in [fwd_tap_k(5353, PROTO_UDP), fwd_uplink_k(5353, PROTO_UDP)] {
        assert_eq!(state(&t.maps().entry(&k)), FlowState::Established);
    }
    // The guest's reply, if punted, goes back from the forwarded port.
    let reply = udp_frame(guest(5353), client(), b"answer");
    let (r, sp, dp, _) = check_udp(&to_world(t.guest(&reply, PuntReason::Ipv4NoFlow)));
    assert_eq!((r.src_addr, r.dst_addr), (HOST, REMOTE_IP));
    assert_eq!((sp, dp), (5353, 41000));
    assert_eq!(t.m.stats().udp_active, 1);
    // And it expires like any UDP flow.
    t.advance(UDP_TIMEOUT * 2);
    t.tick();
    t.advance(UDP_TIMEOUT * 2);
    t.tick();
    assert!(t.m.flows().is_empty());
}

#[test]
fn removed_rule_resets_only_its_inbound_flows() {
    let mut t = fwd_t();
    // An established inbound TCP flow through 8080, one through 9001, an
    // inbound UDP flow and an ordinary outbound flow.
    t.world(
        &Seg::new(client(), nat(8080)).syn(7000).world_frame(),
        PuntReason::Forward,
    );
    t.guest(
        &Seg::new(guest(80), client())
            .syn(3000)
            .ack(7001)
            .guest_frame(),
        PuntReason::Handshake,
    );
    let k = fwd_uplink_k(8080, PROTO_TCP);
    t.maps().forwarded(&k, 3001);
    t.maps().forwarded(&fwd_tap_k(80, PROTO_TCP), 7001);
    t.world(
        &Seg::new(client(), nat(9001)).syn(1).world_frame(),
        PuntReason::Forward,
    );
    t.world(
        &world_udp_frame(client(), nat(5353), b"q"),
        PuntReason::Forward,
    );
    t.establish(40000, 100, 200);
    assert_eq!(t.m.flows().len(), 4);

    let eph = crate::fwd::PortRange::LINUX_EPHEMERAL;
    let gone =
        t.m.forwards()
            .prepare_remove(crate::fwd::Proto::Tcp, "8080:80", eph)
            .unwrap();
    t.m.forwards_mut().remove(&gone);
    let mut out = Vec::new();
    assert_eq!(t.m.reset_forwarded(&gone, &mut out), 1);
    // RSTs to both sides of the established flow.
    assert_eq!(out.len(), 2);
    let mut saw = (false, false);
    for o in out {
        match o {
            Output::ToGuest(f) => {
                let (r, tcp) = check_tcp(&f[14..]);
                assert_eq!((r.dst_addr, tcp.dst_port), (GUEST, 80));
                assert_eq!(tcp.control, TcpControl::Rst);
                saw.0 = true;
            }
            Output::ToWorld(ip) => {
                let (r, tcp) = check_tcp(&ip);
                assert_eq!((r.src_addr, tcp.src_port), (HOST, 8080));
                assert_eq!(tcp.seq_number, seq(3001));
                assert_eq!(tcp.control, TcpControl::Rst);
                saw.1 = true;
            }
        }
    }
    assert_eq!(saw, (true, true));
    let left: Vec<SocketAddr> = t.m.flows().iter().map(|f| f.nat).collect();
    assert_eq!(left.len(), 3);
    assert!(!left.contains(&nat(8080)));
    // A new SYN to the removed port opens nothing.
    let syn = Seg::new(client(), nat(8080)).syn(1).world_frame();
    assert!(t.world(&syn, PuntReason::Forward).is_empty());
    assert_eq!(t.drops(DropReason::NoForward), 1);

    // UDP flows of a removed rule simply go.
    let gone =
        t.m.forwards()
            .prepare_remove(crate::fwd::Proto::Udp, "5353", eph)
            .unwrap();
    let mut out = Vec::new();
    assert_eq!(t.m.reset_forwarded(&gone, &mut out), 1);
    assert!(out.is_empty());
    assert_eq!(t.m.flows().len(), 2);
    assert_eq!(t.m.forwards().rules_with_hits().count(), 3);
}
