//! Kernel fixtures: the datapath's classifiers run on hand-made frames with
//! `BPF_PROG_TEST_RUN` ([`tapgate_tests::progtest`]).
//!
//! # Theory of operation
//!
//! Each case is one frame (built with smoltcp's `wire` reprs), the flow
//! entries seeded before it, and what must come out: the verdict, the
//! frame as the program left it (unchanged, or exactly the frame a fresh
//! build of the rewritten packet gives — addresses, ports, TTL / hop
//! limit, MACs towards the guest — whose checksums smoltcp verifies too),
//! the change of every kernel counter (all others must stay put), the
//! activity words, the records in the punt ring, the entry's own counters
//! and the datagrams in the fragment-tracking map `TG_FRAGS` (seeded ones
//! as they were, new ones stamped with the time of the run). Every case
//! starts from an empty flow table, clear activity words, an empty
//! `TG_FRAGS` (then its seeds) and an empty ring.
//!
//! Under test run the redirect helpers only record their target, so a
//! forwarded packet's verdict is their return code, `TC_ACT_REDIRECT`;
//! entries are seeded with `out_ifindex` 1 (`lo`), which `bpf_check_mtu`
//! finds in the test's namespace (MTU 65536). The MTU case runs in a
//! namespace of its own with a 1280-byte veth device as egress.
//!
//! Checksums: the cases run as `CHECKSUM_NONE` skbs (the packet's own
//! checksums are what counts), the IPv6 ones with and without
//! `BPF_F_IPV6` (both program paths). They run again as
//! `CHECKSUM_COMPLETE` skbs, the kind a NIC delivers on the uplink, where
//! the kernel checks that the program kept `skb->csum` right: with
//! `BPF_F_IPV6` every case must pass, without it an IPv6 address rewrite
//! must corrupt `skb->csum` (`EBADMSG`) — the kernel bug the flag exists
//! for, which is why the loader sets it on Linux ≥ 6.16. Test run cannot
//! build `CHECKSUM_PARTIAL` skbs (a guest's TSO/GSO frames), the only kind
//! where `BPF_F_PSEUDO_HDR` changes the packet's bytes: that flag is not
//! covered here.
//!
//! These need root (loading programs, test runs); without it each test
//! says so and passes.
#![allow(clippy::unwrap_used)]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use datapath_common::{
    ACTIVE, Counter, DIR_FROM_TAP, DIR_FROM_UPLINK, FAMILY_IPV4, FAMILY_IPV6, FRAG_TRACK_NS,
    FlowEntry, FlowKey, FlowState, FragKey, Origin, PROG_TAP_INGRESS, PROG_UPLINK_EGRESS,
    PROG_UPLINK_INGRESS, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP, PUNT_REASON_COUNTER_BASE,
    PuntReason, TAP_ACTIVE, ipv4_to_16,
};
use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    EthernetAddress, EthernetFrame, EthernetProtocol, EthernetRepr, Icmpv4Packet, Icmpv4Repr,
    Icmpv6Packet, Icmpv6Repr, IpAddress, IpProtocol, Ipv4Packet, Ipv4Repr, Ipv6Packet, Ipv6Repr,
    NdiscRepr, RawHardwareAddress, TcpControl, TcpPacket, TcpRepr, TcpSeqNumber, UdpPacket,
    UdpRepr,
};
use tapgate_tests::netns::Netns;
use tapgate_tests::nsthread;
use tapgate_tests::progtest::{
    Counters, FIXTURE_FLOWS, ProgTest, ProgTestOptions, TestRun, ktime_ns,
};

/// `TC_ACT_UNSPEC`: not ours, continue as if no program were attached.
const TC_ACT_UNSPEC: i32 = -1;
/// `TC_ACT_SHOT`: dropped here (every punt).
const TC_ACT_SHOT: i32 = 2;
/// `TC_ACT_REDIRECT`: forwarded (the redirect helpers' return code).
const TC_ACT_REDIRECT: i32 = 7;

const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
const GATEWAY_MAC: [u8; 6] = [0x52, 0x55, 0x0a, 0x00, 0x02, 0x02];
const PEER_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x02];
const UPLINK_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x01];

const GUEST4: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);
const WORLD4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
const NAT4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
const GUEST6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0x15);
const WORLD6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 0x10);
const NAT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);
const ROUTER6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xff, 0, 0, 0, 0, 1);

const GUEST_PORT: u16 = 40000;
const NAT_PORT: u16 = 50000;
const WORLD_PORT: u16 = 443;
const GUEST_ID: u16 = 0x1234;
const NAT_ID: u16 = 0xbeef;
/// The flow slot the cases use.
const SLOT: u32 = 5;

// ---------------------------------------------------------------------------
// Frames
// ---------------------------------------------------------------------------

/// A transport header and payload to build.
#[derive(Clone, Copy)]
enum L4<'a> {
    Tcp {
        sport: u16,
        dport: u16,
        control: TcpControl,
        ack: Option<u32>,
        payload: &'a [u8],
    },
    /// UDP; `checksum: false` sends an all-zero checksum ("none", IPv4).
    Udp {
        sport: u16,
        dport: u16,
        checksum: bool,
        payload: &'a [u8],
    },
    EchoRequest {
        ident: u16,
        payload: &'a [u8],
    },
    EchoReply {
        ident: u16,
        payload: &'a [u8],
    },
}

impl L4<'_> {
    fn proto(&self, v6: bool) -> IpProtocol {
        match self {
            L4::Tcp { .. } => IpProtocol::Tcp,
            L4::Udp { .. } => IpProtocol::Udp,
            _ if v6 => IpProtocol::Icmpv6,
            _ => IpProtocol::Icmp,
        }
    }

    /// The transport bytes, checksummed for `src` → `dst`.
    fn bytes(&self, src: IpAddr, dst: IpAddr) -> Vec<u8> {
        let caps = ChecksumCapabilities::default();
        let (s, d): (IpAddress, IpAddress) = (src.into(), dst.into());
        match *self {
            L4::Tcp {
                sport,
                dport,
                control,
                ack,
                payload,
            } => {
                let repr = TcpRepr {
                    src_port: sport,
                    dst_port: dport,
                    control,
                    seq_number: TcpSeqNumber(1000),
                    ack_number: ack.map(|a| TcpSeqNumber(a as i32)),
                    window_len: 5000,
                    window_scale: None,
                    max_seg_size: None,
                    sack_permitted: false,
                    sack_ranges: [None; 3],
                    timestamp: None,
                    payload,
                };
                let mut buf = vec![0; repr.buffer_len()];
                repr.emit(&mut TcpPacket::new_unchecked(&mut buf), &s, &d, &caps);
                buf
            }
            L4::Udp {
                sport,
                dport,
                checksum,
                payload,
            } => {
                let repr = UdpRepr {
                    src_port: sport,
                    dst_port: dport,
                };
                let mut buf = vec![0; repr.header_len() + payload.len()];
                let mut pkt = UdpPacket::new_unchecked(&mut buf);
                repr.emit(
                    &mut pkt,
                    &s,
                    &d,
                    payload.len(),
                    |p| p.copy_from_slice(payload),
                    &caps,
                );
                if !checksum {
                    pkt.set_checksum(0);
                }
                buf
            }
            L4::EchoRequest { ident, payload } | L4::EchoReply { ident, payload } => {
                let request = matches!(self, L4::EchoRequest { .. });
                match (src, dst) {
                    (IpAddr::V6(s6), IpAddr::V6(d6)) => {
                        let repr = if request {
                            Icmpv6Repr::EchoRequest {
                                ident,
                                seq_no: 7,
                                data: payload,
                            }
                        } else {
                            Icmpv6Repr::EchoReply {
                                ident,
                                seq_no: 7,
                                data: payload,
                            }
                        };
                        icmpv6_bytes(s6, d6, &repr)
                    }
                    _ => {
                        let repr = if request {
                            Icmpv4Repr::EchoRequest {
                                ident,
                                seq_no: 7,
                                data: payload,
                            }
                        } else {
                            Icmpv4Repr::EchoReply {
                                ident,
                                seq_no: 7,
                                data: payload,
                            }
                        };
                        let mut buf = vec![0; repr.buffer_len()];
                        repr.emit(&mut Icmpv4Packet::new_unchecked(&mut buf[..]), &caps);
                        buf
                    }
                }
            }
        }
    }
}

fn icmpv6_bytes(src: Ipv6Addr, dst: Ipv6Addr, repr: &Icmpv6Repr) -> Vec<u8> {
    let mut buf = vec![0; repr.buffer_len()];
    repr.emit(
        &src,
        &dst,
        &mut Icmpv6Packet::new_unchecked(&mut buf[..]),
        &ChecksumCapabilities::default(),
    );
    buf
}

/// An Ethernet frame around `payload`.
fn eth(src: [u8; 6], dst: [u8; 6], ethertype: EthernetProtocol, payload: &[u8]) -> Vec<u8> {
    let repr = EthernetRepr {
        src_addr: EthernetAddress(src),
        dst_addr: EthernetAddress(dst),
        ethertype,
    };
    let mut buf = vec![0; repr.buffer_len() + payload.len()];
    let mut frame = EthernetFrame::new_unchecked(&mut buf);
    repr.emit(&mut frame);
    frame.payload_mut().copy_from_slice(payload);
    buf
}

/// An IPv4 packet: header (TTL `ttl`) + `l4`.
fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, ttl: u8, l4: &L4) -> Vec<u8> {
    let payload = l4.bytes(src.into(), dst.into());
    let repr = Ipv4Repr {
        src_addr: src,
        dst_addr: dst,
        next_header: l4.proto(false),
        payload_len: payload.len(),
        hop_limit: ttl,
    };
    let mut buf = vec![0; repr.buffer_len() + payload.len()];
    let mut pkt = Ipv4Packet::new_unchecked(&mut buf);
    repr.emit(&mut pkt, &ChecksumCapabilities::default());
    pkt.payload_mut().copy_from_slice(&payload);
    buf
}

/// An IPv6 packet: fixed header with `next_header`, then `rest`.
fn ipv6_raw(
    src: Ipv6Addr,
    dst: Ipv6Addr,
    hop_limit: u8,
    next_header: IpProtocol,
    rest: &[u8],
) -> Vec<u8> {
    let repr = Ipv6Repr {
        src_addr: src,
        dst_addr: dst,
        next_header,
        payload_len: rest.len(),
        hop_limit,
    };
    let mut buf = vec![0; repr.buffer_len() + rest.len()];
    let mut pkt = Ipv6Packet::new_unchecked(&mut buf);
    repr.emit(&mut pkt);
    pkt.payload_mut().copy_from_slice(rest);
    buf
}

/// An IPv6 packet: fixed header (hop limit `hop_limit`) + `l4`.
fn ipv6(src: Ipv6Addr, dst: Ipv6Addr, hop_limit: u8, l4: &L4) -> Vec<u8> {
    ipv6_raw(
        src,
        dst,
        hop_limit,
        l4.proto(true),
        &l4.bytes(src.into(), dst.into()),
    )
}

/// A frame from the guest (guest MAC → gateway MAC).
fn from_guest(ip: &[u8]) -> Vec<u8> {
    eth(GUEST_MAC, GATEWAY_MAC, ethertype_of(ip), ip)
}

/// A frame from the world as the uplink receives it.
fn from_world(ip: &[u8]) -> Vec<u8> {
    eth(PEER_MAC, UPLINK_MAC, ethertype_of(ip), ip)
}

/// A frame for the guest as the fast path must leave it (gateway MAC →
/// guest MAC).
fn to_guest(ip: &[u8]) -> Vec<u8> {
    eth(GATEWAY_MAC, GUEST_MAC, ethertype_of(ip), ip)
}

fn ethertype_of(ip: &[u8]) -> EthernetProtocol {
    if ip.first().is_some_and(|b| b >> 4 == 6) {
        EthernetProtocol::Ipv6
    } else {
        EthernetProtocol::Ipv4
    }
}

fn tcp<'a>(sport: u16, dport: u16, control: TcpControl, payload: &'a [u8]) -> L4<'a> {
    L4::Tcp {
        sport,
        dport,
        control,
        ack: Some(2000),
        payload,
    }
}

fn udp(sport: u16, dport: u16, payload: &[u8]) -> L4<'_> {
    L4::Udp {
        sport,
        dport,
        checksum: true,
        payload,
    }
}

// ---------------------------------------------------------------------------
// Fragments
// ---------------------------------------------------------------------------

/// Identification of the fragmented IPv4 datagrams.
const FRAG_ID4: u16 = 0x5678;
/// Identification of the fragmented IPv6 datagrams (four distinct bytes).
const FRAG_ID6: u32 = 0x89ab_cdef;
/// A datagram whose first fragment came a second ago: its later
/// fragments are taken.
const FRAG_RECENT: Duration = Duration::from_secs(1);
/// A datagram whose first fragment came longer ago than the kernel tracks
/// it ([`FRAG_TRACK_NS`]): its later fragments are not ours.
const FRAG_STALE: Duration = Duration::from_nanos(FRAG_TRACK_NS + 1_000_000_000);

/// `ip` (an IPv4 packet as [`ipv4`] builds it) made a fragment of
/// datagram `id`: DF clear, MF as `more`, at `offset` 8-byte units, the
/// header checksum recomputed. The bytes after the header stay as they
/// are (for a later fragment they are just data).
fn ipv4_fragment(ip: &[u8], id: u16, more: bool, offset: u16) -> Vec<u8> {
    let mut buf = ip.to_vec();
    let mut p = Ipv4Packet::new_unchecked(&mut buf);
    p.set_ident(id);
    p.set_dont_frag(false);
    p.set_more_frags(more);
    p.set_frag_offset(offset * 8);
    p.fill_checksum();
    buf
}

/// An IPv6 fragment header (RFC 8200 §4.5): `next`, the offset in 8-byte
/// units, the M flag and the identification.
fn frag6_header(next: IpProtocol, offset: u16, more: bool, id: u32) -> [u8; 8] {
    let [o0, o1] = ((offset << 3) | u16::from(more)).to_be_bytes();
    let [i0, i1, i2, i3] = id.to_be_bytes();
    [u8::from(next), 0, o0, o1, i0, i1, i2, i3]
}

/// An IPv6 fragment from the world (`WORLD6` → `NAT6`): the fixed header,
/// a fragment header, then `rest`.
fn world_frag6(next: IpProtocol, offset: u16, more: bool, id: u32, rest: &[u8]) -> Vec<u8> {
    from_world(&ipv6_raw(
        WORLD6,
        NAT6,
        50,
        IpProtocol::Ipv6Frag,
        &concat(&frag6_header(next, offset, more, id), rest),
    ))
}

/// The `TG_FRAGS` key of IPv4 datagram `id` of `proto` from `WORLD4` to
/// `NAT4`: addresses in the 16-byte form, the 16-bit identification in the
/// first two bytes.
fn frag_key4(id: u16, proto: u8) -> FragKey {
    let [i0, i1] = id.to_be_bytes();
    FragKey {
        src: ipv4_to_16(WORLD4.octets()),
        dst: ipv4_to_16(NAT4.octets()),
        id: [i0, i1, 0, 0],
        proto,
        family: FAMILY_IPV4,
        _pad: [0; 2],
    }
}

/// The `TG_FRAGS` key of IPv6 datagram `id` from `WORLD6` to `NAT6`
/// (RFC 8200: no protocol).
fn frag_key6(id: u32) -> FragKey {
    FragKey {
        src: WORLD6.octets(),
        dst: NAT6.octets(),
        id: id.to_be_bytes(),
        proto: 0,
        family: FAMILY_IPV6,
        _pad: [0; 2],
    }
}

/// Checks the checksums of an output frame with smoltcp: the IPv4 header's
/// and the transport's (a UDP checksum of zero counts as valid: "none").
fn verify_checksums(frame: &[u8]) -> Result<(), String> {
    let eth = EthernetFrame::new_checked(frame).map_err(|e| format!("ethernet: {e}"))?;
    let (src, dst, proto, l4): (IpAddress, IpAddress, IpProtocol, &[u8]) = match eth.ethertype() {
        EthernetProtocol::Ipv4 => {
            let ip = Ipv4Packet::new_checked(eth.payload()).map_err(|e| format!("ipv4: {e}"))?;
            if !ip.verify_checksum() {
                return Err("bad IPv4 header checksum".into());
            }
            (
                ip.src_addr().into(),
                ip.dst_addr().into(),
                ip.next_header(),
                &eth.payload()[ip.header_len() as usize..ip.total_len() as usize],
            )
        }
        EthernetProtocol::Ipv6 => {
            let ip = Ipv6Packet::new_checked(eth.payload()).map_err(|e| format!("ipv6: {e}"))?;
            (
                ip.src_addr().into(),
                ip.dst_addr().into(),
                ip.next_header(),
                &eth.payload()[40..40 + ip.payload_len() as usize],
            )
        }
        other => return Err(format!("ethertype {other}")),
    };
    let ok = match (proto, src, dst) {
        (IpProtocol::Tcp, ..) => TcpPacket::new_checked(l4)
            .map_err(|e| format!("tcp: {e}"))?
            .verify_checksum(&src, &dst),
        (IpProtocol::Udp, ..) => UdpPacket::new_checked(l4)
            .map_err(|e| format!("udp: {e}"))?
            .verify_checksum(&src, &dst),
        (IpProtocol::Icmp, ..) => Icmpv4Packet::new_checked(l4)
            .map_err(|e| format!("icmp: {e}"))?
            .verify_checksum(),
        (IpProtocol::Icmpv6, IpAddress::Ipv6(s), IpAddress::Ipv6(d)) => {
            Icmpv6Packet::new_checked(l4)
                .map_err(|e| format!("icmpv6: {e}"))?
                .verify_checksum(&s, &d)
        }
        (other, ..) => return Err(format!("protocol {other}")),
    };
    if ok {
        Ok(())
    } else {
        Err(format!("bad {proto} checksum"))
    }
}

// ---------------------------------------------------------------------------
// Flows
// ---------------------------------------------------------------------------

/// One NAT flow as user space installs it: the guest's endpoint, the
/// world's, and the NAT address and port (identifier for echo flows) it
/// leaves with.
#[derive(Clone, Copy)]
struct Flow {
    family: u8,
    proto: u8,
    guest: ([u8; 16], u16),
    world: ([u8; 16], u16),
    nat: ([u8; 16], u16),
    state: FlowState,
}

impl Flow {
    fn v4(proto: u8) -> Self {
        let (gp, wp, np) = ports_for(proto);
        Self {
            family: FAMILY_IPV4,
            proto,
            guest: (ipv4_to_16(GUEST4.octets()), gp),
            world: (ipv4_to_16(WORLD4.octets()), wp),
            nat: (ipv4_to_16(NAT4.octets()), np),
            state: FlowState::Established,
        }
    }

    fn v6(proto: u8) -> Self {
        let (gp, wp, np) = ports_for(proto);
        Self {
            family: FAMILY_IPV6,
            proto,
            guest: (GUEST6.octets(), gp),
            world: (WORLD6.octets(), wp),
            nat: (NAT6.octets(), np),
            state: FlowState::Established,
        }
    }

    fn state(mut self, state: FlowState) -> Self {
        self.state = state;
        self
    }

    fn tap_key(&self) -> FlowKey {
        self.key(self.guest, self.world, DIR_FROM_TAP)
    }

    fn uplink_key(&self) -> FlowKey {
        self.key(self.world, self.nat, DIR_FROM_UPLINK)
    }

    fn key(&self, src: ([u8; 16], u16), dst: ([u8; 16], u16), dir: u8) -> FlowKey {
        FlowKey {
            src: src.0,
            dst: dst.0,
            sport: src.1,
            dport: dst.1,
            proto: self.proto,
            family: self.family,
            dir,
            _pad: 0,
        }
    }

    fn entry(&self, src: ([u8; 16], u16), dst: ([u8; 16], u16)) -> FlowEntry {
        FlowEntry {
            new_src: src.0,
            new_dst: dst.0,
            new_sport: src.1,
            new_dport: dst.1,
            out_ifindex: 1,
            eth_src: GATEWAY_MAC,
            eth_dst: GUEST_MAC,
            slot: SLOT,
            state: self.state as u8,
            ..FlowEntry::default()
        }
    }

    /// Both entries.
    fn entries(&self) -> Vec<(FlowKey, FlowEntry)> {
        vec![
            (self.tap_key(), self.entry(self.nat, self.world)),
            (self.uplink_key(), self.entry(self.world, self.guest)),
        ]
    }
}

/// (guest, world, NAT) ports of a flow of `proto`; an echo flow's "ports"
/// are the guest's and the NAT identifier (the world side has none).
fn ports_for(proto: u8) -> (u16, u16, u16) {
    match proto {
        PROTO_ICMP | PROTO_ICMPV6 => (GUEST_ID, 0, NAT_ID),
        _ => (GUEST_PORT, WORLD_PORT, NAT_PORT),
    }
}

// ---------------------------------------------------------------------------
// Cases
// ---------------------------------------------------------------------------

/// What the program must leave of the frame.
enum Out {
    /// Exactly the input.
    Unchanged,
    /// Exactly this frame, whose checksums must verify.
    Frame(Vec<u8>),
}

/// What must be in the punt ring after the run.
#[derive(Clone, Copy)]
enum Record {
    /// The whole frame, handed over.
    Punt(PuntReason, Origin),
    /// An event: the first bytes of the frame as it arrived.
    Event(PuntReason, Origin),
}

/// What a forwarded packet must leave in its entry.
struct EntryAfter {
    key: FlowKey,
    last_ack: u32,
    last_win: u32,
}

struct Case {
    name: &'static str,
    program: &'static str,
    flows: Vec<(FlowKey, FlowEntry)>,
    frame: Vec<u8>,
    verdict: i32,
    out: Out,
    /// Counter slots and their expected change; every other slot stays.
    counters: Vec<(u32, u64)>,
    /// The activity word of [`SLOT`] afterwards (all others stay 0).
    activity: u64,
    records: Vec<Record>,
    entry: Option<EntryAfter>,
    /// As a `CHECKSUM_COMPLETE` skb the run must fail with `EBADMSG`: the
    /// program leaves `skb->csum` stale (a known limit, see
    /// [`Case::stale_skb_csum`]).
    stale_skb_csum: bool,
    /// `TG_FRAGS` entries seeded before the run, each with how long
    /// before the run its first fragment was seen.
    frags: Vec<(FragKey, Duration)>,
    /// Datagrams the run must enter in `TG_FRAGS` (stamped with the time
    /// of the run); every other entry must stay as seeded.
    tracked: Vec<FragKey>,
}

fn slot(c: Counter) -> u32 {
    c as u32
}

fn reason_slot(r: PuntReason) -> u32 {
    PUNT_REASON_COUNTER_BASE + r as u32
}

fn forwarded(frame: &[u8]) -> Vec<(u32, u64)> {
    vec![
        (slot(Counter::FastPackets), 1),
        (slot(Counter::FastBytes), frame.len() as u64),
    ]
}

fn punted(reason: PuntReason, frame: &[u8]) -> Vec<(u32, u64)> {
    vec![
        (slot(Counter::PuntPackets), 1),
        (slot(Counter::PuntBytes), frame.len() as u64),
        (reason_slot(reason), 1),
    ]
}

fn not_ours() -> Vec<(u32, u64)> {
    vec![(slot(Counter::UplinkNotOurs), 1)]
}

impl Case {
    /// A packet the kernel forwards, rewritten to `expected`.
    fn forward(
        name: &'static str,
        program: &'static str,
        flow: &Flow,
        frame: Vec<u8>,
        expected: Vec<u8>,
    ) -> Self {
        let from_tap = program == PROG_TAP_INGRESS;
        Case {
            name,
            program,
            flows: flow.entries(),
            counters: forwarded(&frame),
            frame,
            verdict: TC_ACT_REDIRECT,
            out: Out::Frame(expected),
            activity: if from_tap {
                ACTIVE | TAP_ACTIVE
            } else {
                ACTIVE
            },
            records: Vec::new(),
            stale_skb_csum: false,
            frags: Vec::new(),
            tracked: Vec::new(),
            entry: Some(EntryAfter {
                key: if from_tap {
                    flow.tap_key()
                } else {
                    flow.uplink_key()
                },
                last_ack: if flow.proto == PROTO_TCP { 2000 } else { 0 },
                last_win: if flow.proto == PROTO_TCP { 5000 } else { 0 },
            }),
        }
    }

    /// A packet punted with `reason` (dropped here, handed over whole).
    fn punt(
        name: &'static str,
        program: &'static str,
        flows: Vec<(FlowKey, FlowEntry)>,
        frame: Vec<u8>,
        reason: PuntReason,
    ) -> Self {
        let origin = if program == PROG_TAP_INGRESS {
            Origin::Tap
        } else {
            Origin::Uplink
        };
        Case {
            name,
            program,
            flows,
            counters: punted(reason, &frame),
            frame,
            verdict: TC_ACT_SHOT,
            out: Out::Unchanged,
            activity: 0,
            records: vec![Record::Punt(reason, origin)],
            entry: None,
            stale_skb_csum: false,
            frags: Vec::new(),
            tracked: Vec::new(),
        }
    }

    /// A packet of the uplink that is not ours: untouched, `TCX_NEXT`.
    fn not_ours(name: &'static str, flows: Vec<(FlowKey, FlowEntry)>, frame: Vec<u8>) -> Self {
        Case {
            name,
            program: PROG_UPLINK_INGRESS,
            flows,
            frame,
            verdict: TC_ACT_UNSPEC,
            out: Out::Unchanged,
            counters: not_ours(),
            activity: 0,
            records: Vec::new(),
            entry: None,
            stale_skb_csum: false,
            frags: Vec::new(),
            tracked: Vec::new(),
        }
    }

    /// Marks a forwarded case whose rewrite leaves a `CHECKSUM_COMPLETE`
    /// skb's `skb->csum` stale. The one known: a UDP datagram without
    /// checksum (0) whose ports change — `bpf_l4_csum_replace` with
    /// `BPF_F_MARK_MANGLED_0` leaves both the zero checksum and
    /// `skb->csum` alone, so the port change is in neither. Harmless
    /// where the fast path sends packets (a device's egress ignores
    /// `skb->csum`); it would matter only for a host-local flow's UDP
    /// without checksum redirected into loopback's ingress, whose guest
    /// frames are not `CHECKSUM_COMPLETE` in the first place.
    fn stale_skb_csum(mut self) -> Self {
        self.stale_skb_csum = true;
        self
    }

    /// Seeds the entries with egress device `ifindex` instead of `lo`.
    fn out_ifindex(mut self, ifindex: u32) -> Self {
        for (_, e) in &mut self.flows {
            e.out_ifindex = ifindex;
        }
        self
    }

    fn also_count(mut self, c: Counter) -> Self {
        self.counters.push((slot(c), 1));
        self
    }

    fn with_event(mut self, reason: PuntReason, origin: Origin) -> Self {
        self.counters.push((reason_slot(reason), 1));
        self.records.push(Record::Event(reason, origin));
        self
    }

    /// Seeds `TG_FRAGS` with `key`, its first fragment seen `age` before
    /// the run.
    fn frag_seen(mut self, key: FragKey, age: Duration) -> Self {
        self.frags.push((key, age));
        self
    }

    /// The run must enter `key` in `TG_FRAGS` (and count it).
    fn tracks(mut self, key: FragKey) -> Self {
        self.tracked.push(key);
        self.also_count(Counter::FragsTracked)
    }

    /// Runs the case on a fresh table (the skb `CHECKSUM_COMPLETE` if
    /// `complete`); `Err` lists every mismatch.
    fn run(&self, t: &mut ProgTest, complete: bool) -> Result<(), String> {
        t.clear_flows()
            .map_err(|e| format!("clearing flows: {e:#}"))?;
        t.clear_activity()
            .map_err(|e| format!("clearing activity: {e:#}"))?;
        t.drain_punts().map_err(|e| format!("draining: {e:#}"))?;
        for (k, e) in &self.flows {
            t.insert_flow(k, e)
                .map_err(|e| format!("seeding a flow: {e:#}"))?;
        }
        t.clear_frags()
            .map_err(|e| format!("clearing TG_FRAGS: {e:#}"))?;
        let seeded: Vec<(FragKey, u64)> = {
            let now = ktime_ns();
            self.frags
                .iter()
                .map(|(k, age)| (*k, now.saturating_sub(age.as_nanos() as u64)))
                .collect()
        };
        for (k, at) in &seeded {
            t.insert_frag(k, *at)
                .map_err(|e| format!("seeding TG_FRAGS: {e:#}"))?;
        }
        let before = t.counters().map_err(|e| format!("counters: {e:#}"))?;
        let ran_from = ktime_ns();
        let run = t.run_with(self.program, &self.frame, complete);
        let ran_until = ktime_ns();
        if complete && self.stale_skb_csum {
            return match run {
                Err(e) if errno(&e) == Some(libc::EBADMSG) => Ok(()),
                Err(e) => Err(format!("{e:#}; expected EBADMSG (stale skb->csum)")),
                Ok(r) => Err(format!(
                    "verdict {}: skb->csum was right after all (drop stale_skb_csum)",
                    r.verdict
                )),
            };
        }
        let TestRun { verdict, data } = run.map_err(|e| format!("{e:#}"))?;
        let after = t.counters().map_err(|e| format!("counters: {e:#}"))?;

        let mut problems = Vec::new();
        if verdict != self.verdict {
            problems.push(format!("verdict {verdict}, expected {}", self.verdict));
        }
        match &self.out {
            Out::Unchanged if data != self.frame => problems.push(format!(
                "frame changed:\n   in  {}\n   out {}",
                hex(&self.frame),
                hex(&data)
            )),
            Out::Frame(expected) => {
                if &data != expected {
                    problems.push(format!(
                        "frame differs:\n   want {}\n   got  {}",
                        hex(expected),
                        hex(&data)
                    ));
                }
                if let Err(e) = verify_checksums(&data) {
                    problems.push(format!("output checksums: {e}"));
                }
            }
            Out::Unchanged => {}
        }
        self.check_counters(&after.since(&before), &mut problems);
        self.check_frags(t, &seeded, (ran_from, ran_until), &mut problems);
        self.check_activity(t, &mut problems);
        self.check_records(t, &mut problems);
        if let Some(want) = &self.entry {
            match t.flow(&want.key) {
                None => problems.push("the entry is gone".into()),
                Some(e) => {
                    if e.packets != 1 || e.bytes != self.frame.len() as u64 {
                        problems.push(format!(
                            "entry counted {} packets, {} bytes; expected 1, {}",
                            e.packets,
                            e.bytes,
                            self.frame.len()
                        ));
                    }
                    if e.last_ack != want.last_ack || e.last_win != want.last_win {
                        problems.push(format!(
                            "entry last_ack {} last_win {}; expected {} {}",
                            e.last_ack, e.last_win, want.last_ack, want.last_win
                        ));
                    }
                }
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("\n  "))
        }
    }

    fn check_counters(&self, delta: &Counters, problems: &mut Vec<String>) {
        let mut want = vec![0u64; delta.0.len()];
        for &(i, n) in &self.counters {
            want[i as usize] += n;
        }
        for (i, (&got, &want)) in delta.0.iter().zip(&want).enumerate() {
            if got != want {
                problems.push(format!(
                    "counter {} changed by {got}, expected {want}",
                    counter_name(i as u32)
                ));
            }
        }
    }

    /// `TG_FRAGS` after the run: the seeds as they were, plus the
    /// datagrams the case tracks, stamped within `ran` (the run's start
    /// and end), and nothing else.
    fn check_frags(
        &self,
        t: &ProgTest,
        seeded: &[(FragKey, u64)],
        ran: (u64, u64),
        problems: &mut Vec<String>,
    ) {
        let got = match t.frags() {
            Ok(g) => g,
            Err(e) => return problems.push(format!("TG_FRAGS: {e:#}")),
        };
        for (k, at) in &got {
            let fine = if self.tracked.contains(k) {
                (ran.0..=ran.1).contains(at)
            } else {
                seeded.contains(&(*k, *at))
            };
            if !fine {
                problems.push(format!("TG_FRAGS holds {k:?} at {at} ns (ran {ran:?})"));
            }
        }
        for k in seeded.iter().map(|(k, _)| k).chain(&self.tracked) {
            if !got.iter().any(|(g, _)| g == k) {
                problems.push(format!("TG_FRAGS lacks {k:?}"));
            }
        }
    }

    fn check_activity(&self, t: &ProgTest, problems: &mut Vec<String>) {
        for s in 0..FIXTURE_FLOWS {
            let want = if s == SLOT { self.activity } else { 0 };
            match t.activity(s) {
                Ok(got) if got == want => {}
                Ok(got) => problems.push(format!("activity[{s}] = {got:#x}, expected {want:#x}")),
                Err(e) => problems.push(format!("activity[{s}]: {e:#}")),
            }
        }
    }

    fn check_records(&self, t: &mut ProgTest, problems: &mut Vec<String>) {
        let got = match t.drain_punts() {
            Ok(r) => r,
            Err(e) => return problems.push(format!("punt ring: {e:#}")),
        };
        if got.len() != self.records.len() {
            problems.push(format!(
                "{} records in the punt ring, expected {}",
                got.len(),
                self.records.len()
            ));
            return;
        }
        for (rec, want) in got.iter().zip(&self.records) {
            let (reason, origin, data) = match *want {
                Record::Punt(r, o) => (r, o, &self.frame[..]),
                Record::Event(r, o) => (r, o, &self.frame[..self.frame.len().min(128)]),
            };
            let h = rec.header;
            if h.reason != reason as u16 || h.origin != origin as u8 {
                problems.push(format!(
                    "record reason {} origin {}, expected {} ({:?})",
                    h.reason,
                    h.origin,
                    reason.name(),
                    origin
                ));
            }
            if rec.data != data || h.orig_len as usize != self.frame.len() {
                problems.push(format!(
                    "record of {} bytes (orig {}): not the frame as it arrived",
                    rec.data.len(),
                    h.orig_len
                ));
            }
        }
    }
}

fn counter_name(i: u32) -> String {
    if let Some(c) = Counter::ALL.iter().find(|c| **c as u32 == i) {
        return c.name().to_owned();
    }
    match i
        .checked_sub(PUNT_REASON_COUNTER_BASE)
        .and_then(|r| PuntReason::from_u16(r as u16))
    {
        Some(r) => format!("punt:{}", r.name()),
        None => format!("#{i}"),
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Runs every case on `t` (as `CHECKSUM_COMPLETE` skbs if `complete`),
/// prints each result and fails with all the failures at once.
fn run_all(what: &str, t: &mut ProgTest, cases: &[Case], complete: bool) {
    let mut failures = Vec::new();
    for case in cases {
        match case.run(t, complete) {
            Ok(()) => eprintln!("ok    {what}: {}", case.name),
            Err(e) => {
                eprintln!("FAIL  {what}: {}\n  {e}", case.name);
                failures.push(format!("{}: {e}", case.name));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{what}: {} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

/// Whether the test can run: root loads programs; without it the test
/// says so and passes.
fn have_root(test: &str) -> bool {
    if tapgate_tests::require_root().is_ok() {
        true
    } else {
        eprintln!("skipping {test}: {}", tapgate_tests::NEED_ROOT);
        false
    }
}

fn load(opts: ProgTestOptions) -> ProgTest {
    ProgTest::load(opts).unwrap_or_else(|e| panic!("{e:#}"))
}

// ---------------------------------------------------------------------------
// IPv4
// ---------------------------------------------------------------------------

fn ipv4_cases() -> Vec<Case> {
    let tcp_flow = Flow::v4(PROTO_TCP);
    let udp_flow = Flow::v4(PROTO_UDP);
    let echo_flow = Flow::v4(PROTO_ICMP);
    let data = b"hello, world";
    let ack = TcpControl::Psh;

    let guest_tcp = |ttl, control| {
        from_guest(&ipv4(
            GUEST4,
            WORLD4,
            ttl,
            &tcp(GUEST_PORT, WORLD_PORT, control, data),
        ))
    };
    vec![
        Case::forward(
            "tcp guest → world: SNAT, TTL-1",
            PROG_TAP_INGRESS,
            &tcp_flow,
            guest_tcp(64, ack),
            from_guest(&ipv4(
                NAT4,
                WORLD4,
                63,
                &tcp(NAT_PORT, WORLD_PORT, ack, data),
            )),
        ),
        Case::forward(
            "tcp world → guest: DNAT, TTL-1, guest MACs",
            PROG_UPLINK_INGRESS,
            &tcp_flow,
            from_world(&ipv4(
                WORLD4,
                NAT4,
                50,
                &tcp(WORLD_PORT, NAT_PORT, ack, data),
            )),
            to_guest(&ipv4(
                WORLD4,
                GUEST4,
                49,
                &tcp(WORLD_PORT, GUEST_PORT, ack, data),
            )),
        ),
        Case::forward(
            "tcp FIN guest → world: forwarded with an event",
            PROG_TAP_INGRESS,
            &tcp_flow,
            guest_tcp(64, TcpControl::Fin),
            from_guest(&ipv4(
                NAT4,
                WORLD4,
                63,
                &tcp(NAT_PORT, WORLD_PORT, TcpControl::Fin, data),
            )),
        )
        .with_event(PuntReason::EventFin, Origin::Tap),
        Case::forward(
            "udp guest → world",
            PROG_TAP_INGRESS,
            &udp_flow,
            from_guest(&ipv4(
                GUEST4,
                WORLD4,
                64,
                &udp(GUEST_PORT, WORLD_PORT, data),
            )),
            from_guest(&ipv4(NAT4, WORLD4, 63, &udp(NAT_PORT, WORLD_PORT, data))),
        ),
        Case::forward(
            "udp with checksum 0: stays 0",
            PROG_TAP_INGRESS,
            &udp_flow,
            from_guest(&ipv4(
                GUEST4,
                WORLD4,
                64,
                &L4::Udp {
                    sport: GUEST_PORT,
                    dport: WORLD_PORT,
                    checksum: false,
                    payload: data,
                },
            )),
            from_guest(&ipv4(
                NAT4,
                WORLD4,
                63,
                &L4::Udp {
                    sport: NAT_PORT,
                    dport: WORLD_PORT,
                    checksum: false,
                    payload: data,
                },
            )),
        )
        .stale_skb_csum(),
        Case::forward(
            "icmp echo request guest → world: identifier",
            PROG_TAP_INGRESS,
            &echo_flow,
            from_guest(&ipv4(
                GUEST4,
                WORLD4,
                64,
                &L4::EchoRequest {
                    ident: GUEST_ID,
                    payload: data,
                },
            )),
            from_guest(&ipv4(
                NAT4,
                WORLD4,
                63,
                &L4::EchoRequest {
                    ident: NAT_ID,
                    payload: data,
                },
            )),
        ),
        Case::forward(
            "icmp echo reply world → guest: identifier",
            PROG_UPLINK_INGRESS,
            &echo_flow,
            from_world(&ipv4(
                WORLD4,
                NAT4,
                50,
                &L4::EchoReply {
                    ident: NAT_ID,
                    payload: data,
                },
            )),
            to_guest(&ipv4(
                WORLD4,
                GUEST4,
                49,
                &L4::EchoReply {
                    ident: GUEST_ID,
                    payload: data,
                },
            )),
        ),
        Case::punt(
            "TTL 1: punted",
            PROG_TAP_INGRESS,
            tcp_flow.entries(),
            guest_tcp(1, ack),
            PuntReason::Exception,
        ),
        Case::punt(
            "SYN on an established flow: punted",
            PROG_TAP_INGRESS,
            tcp_flow.entries(),
            guest_tcp(64, TcpControl::Syn),
            PuntReason::Exception,
        ),
        Case::punt(
            "flow in its handshake: punted",
            PROG_TAP_INGRESS,
            tcp_flow.state(FlowState::Handshake).entries(),
            guest_tcp(64, ack),
            PuntReason::Handshake,
        ),
        Case::punt(
            "guest packet of no flow: punted",
            PROG_TAP_INGRESS,
            Vec::new(),
            guest_tcp(64, ack),
            PuntReason::Ipv4NoFlow,
        ),
        Case::not_ours(
            "world packet of no flow: not ours, untouched",
            udp_flow.entries(),
            from_world(&ipv4(
                WORLD4,
                NAT4,
                50,
                &tcp(WORLD_PORT, NAT_PORT, ack, data),
            )),
        ),
    ]
    .into_iter()
    .chain(ipv4_fragment_cases())
    .collect()
}

/// IPv4 fragments: every one from the guest punted; from the world, the
/// first fragment of a flow's datagram punted and tracked in `TG_FRAGS`,
/// later ones punted while their datagram is tracked and recent.
fn ipv4_fragment_cases() -> Vec<Case> {
    let udp_flow = Flow::v4(PROTO_UDP);
    let tcp_flow = Flow::v4(PROTO_TCP);
    let echo_flow = Flow::v4(PROTO_ICMP);
    let data = b"hello, world";
    let world_udp = ipv4(WORLD4, NAT4, 50, &udp(WORLD_PORT, NAT_PORT, data));
    let first = from_world(&ipv4_fragment(&world_udp, FRAG_ID4, true, 0));
    let later = from_world(&ipv4_fragment(&world_udp, FRAG_ID4, false, 3));
    let key = frag_key4(FRAG_ID4, PROTO_UDP);
    let echo_first = from_world(&ipv4_fragment(
        &ipv4(
            WORLD4,
            NAT4,
            50,
            &L4::EchoReply {
                ident: NAT_ID,
                payload: data,
            },
        ),
        FRAG_ID4,
        true,
        0,
    ));
    let guest_first = from_guest(&ipv4_fragment(
        &ipv4(GUEST4, WORLD4, 64, &udp(GUEST_PORT, WORLD_PORT, data)),
        FRAG_ID4,
        true,
        0,
    ));
    let up = PROG_UPLINK_INGRESS;
    vec![
        Case::punt(
            "fragment from the guest: punted for reassembly, not tracked",
            PROG_TAP_INGRESS,
            udp_flow.entries(),
            guest_first,
            PuntReason::Fragment,
        ),
        Case::punt(
            "first fragment of a flow's datagram from the world: punted, tracked",
            up,
            udp_flow.entries(),
            first.clone(),
            PuntReason::Fragment,
        )
        .tracks(key),
        Case::punt(
            "first fragment of an echo reply: punted, tracked",
            up,
            echo_flow.entries(),
            echo_first,
            PuntReason::Fragment,
        )
        .tracks(frag_key4(FRAG_ID4, PROTO_ICMP)),
        Case::not_ours(
            "first fragment of no flow from the world: not ours",
            tcp_flow.entries(),
            first,
        ),
        Case::punt(
            "later fragment of a tracked datagram: punted",
            up,
            udp_flow.entries(),
            later.clone(),
            PuntReason::Fragment,
        )
        .frag_seen(key, FRAG_RECENT),
        Case::not_ours(
            "later fragment of an untracked datagram: not ours",
            udp_flow.entries(),
            later.clone(),
        ),
        Case::not_ours(
            "later fragment of a datagram tracked over 30 s ago: not ours",
            udp_flow.entries(),
            later.clone(),
        )
        .frag_seen(key, FRAG_STALE),
        Case::not_ours(
            "later fragment of a datagram tracked with another protocol: not ours",
            udp_flow.entries(),
            later,
        )
        .frag_seen(frag_key4(FRAG_ID4, PROTO_TCP), FRAG_RECENT),
    ]
}

#[test]
fn ipv4_fast_path() {
    if !have_root("ipv4_fast_path") {
        return;
    }
    let mut t = load(ProgTestOptions::default());
    run_all("ipv4", &mut t, &ipv4_cases(), false);
}

// ---------------------------------------------------------------------------
// IPv6
// ---------------------------------------------------------------------------

/// An 8-byte extension header (hop-by-hop or destination options: PadN).
fn ext_options(next: IpProtocol) -> [u8; 8] {
    [u8::from(next), 0, 1, 4, 0, 0, 0, 0]
}

/// A fragment header: offset 0, more fragments, identification 0x1234.
fn ext_fragment(next: IpProtocol) -> [u8; 8] {
    frag6_header(next, 0, true, 0x1234)
}

fn concat(a: &[u8], b: &[u8]) -> Vec<u8> {
    [a, b].concat()
}

/// An ICMPv6 error from a router on the path about `quoted` (an IPv6
/// packet): packet too big, MTU 1280.
fn packet_too_big(quoted: &[u8]) -> Vec<u8> {
    let q = Ipv6Packet::new_checked(quoted).unwrap();
    let header = Ipv6Repr::parse(&q).unwrap();
    let repr = Icmpv6Repr::PktTooBig {
        mtu: 1280,
        header,
        data: &quoted[40..],
    };
    ipv6_raw(
        ROUTER6,
        NAT6,
        60,
        IpProtocol::Icmpv6,
        &icmpv6_bytes(ROUTER6, NAT6, &repr),
    )
}

fn ipv6_cases() -> Vec<Case> {
    let tcp_flow = Flow::v6(PROTO_TCP);
    let udp_flow = Flow::v6(PROTO_UDP);
    let echo_flow = Flow::v6(PROTO_ICMPV6);
    let data = b"hello, world";
    let ack = TcpControl::Psh;
    let guest_tcp_l4 = tcp(GUEST_PORT, WORLD_PORT, ack, data);
    let world_tcp_l4 = tcp(WORLD_PORT, NAT_PORT, ack, data);
    let guest_tcp = |hops, control| {
        from_guest(&ipv6(
            GUEST6,
            WORLD6,
            hops,
            &tcp(GUEST_PORT, WORLD_PORT, control, data),
        ))
    };
    // What we sent to the world for the TCP flow, as a router quotes it.
    let sent = ipv6(NAT6, WORLD6, 63, &tcp(NAT_PORT, WORLD_PORT, ack, &[0; 64]));
    let ns_target = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x99);
    let ns = ipv6_raw(
        Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 2),
        Ipv6Addr::new(0xff02, 0, 0, 0, 0, 1, 0xff00, 0x99),
        255,
        IpProtocol::Icmpv6,
        &icmpv6_bytes(
            Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 2),
            Ipv6Addr::new(0xff02, 0, 0, 0, 0, 1, 0xff00, 0x99),
            &Icmpv6Repr::Ndisc(NdiscRepr::NeighborSolicit {
                target_addr: ns_target,
                lladdr: Some(RawHardwareAddress::from(EthernetAddress(PEER_MAC))),
            }),
        ),
    );
    let world_hbh = from_world(&ipv6_raw(
        WORLD6,
        NAT6,
        50,
        IpProtocol::HopByHop,
        &concat(
            &ext_options(IpProtocol::Tcp),
            &world_tcp_l4.bytes(WORLD6.into(), NAT6.into()),
        ),
    ));
    let guest_hbh = from_guest(&ipv6_raw(
        GUEST6,
        WORLD6,
        64,
        IpProtocol::HopByHop,
        &concat(
            &ext_options(IpProtocol::Tcp),
            &guest_tcp_l4.bytes(GUEST6.into(), WORLD6.into()),
        ),
    ));
    let udp_bytes = udp(GUEST_PORT, WORLD_PORT, data).bytes(GUEST6.into(), WORLD6.into());
    let guest_frag = from_guest(&ipv6_raw(
        GUEST6,
        WORLD6,
        64,
        IpProtocol::Ipv6Frag,
        &concat(&ext_fragment(IpProtocol::Udp), &udp_bytes),
    ));
    let full = from_world(&ipv6(WORLD6, NAT6, 50, &world_tcp_l4));
    // The fixed header and 10 bytes of a 20-byte TCP header (test run
    // cannot take a frame shorter than the fixed header: see
    // `truncated_network_headers`).
    let cut_tcp = |frame: &[u8]| {
        let mut f = frame[..14 + 40 + 10].to_vec();
        f[14 + 4..14 + 6].copy_from_slice(&10u16.to_be_bytes());
        f
    };
    let truncated_world = cut_tcp(&full);
    let truncated_guest = cut_tcp(&guest_tcp(64, ack));
    // Version 4 in the first nibble behind the IPv6 EtherType.
    let wrong_version = |frame: &[u8]| {
        let mut f = frame.to_vec();
        f[14] = 0x40 | (f[14] & 0x0f);
        f
    };
    let echo_world = from_world(&ipv6(
        WORLD6,
        NAT6,
        50,
        &L4::EchoReply {
            ident: NAT_ID,
            payload: data,
        },
    ));
    // An ICMPv6 header cut after 4 bytes.
    let mut truncated_icmp = echo_world[..14 + 40 + 4].to_vec();
    truncated_icmp[14 + 4..14 + 6].copy_from_slice(&4u16.to_be_bytes());
    let ptb = from_world(&packet_too_big(&sent));
    // The quote cut inside the quoted IPv6 header.
    let mut ptb_short = ptb[..14 + 40 + 8 + 20].to_vec();
    ptb_short[14 + 4..14 + 6].copy_from_slice(&28u16.to_be_bytes());

    vec![
        Case::forward(
            "tcp guest → world: SNAT, hop limit-1",
            PROG_TAP_INGRESS,
            &tcp_flow,
            guest_tcp(64, ack),
            from_guest(&ipv6(
                NAT6,
                WORLD6,
                63,
                &tcp(NAT_PORT, WORLD_PORT, ack, data),
            )),
        ),
        Case::forward(
            "tcp world → guest: DNAT, hop limit-1, guest MACs",
            PROG_UPLINK_INGRESS,
            &tcp_flow,
            from_world(&ipv6(WORLD6, NAT6, 50, &world_tcp_l4)),
            to_guest(&ipv6(
                WORLD6,
                GUEST6,
                49,
                &tcp(WORLD_PORT, GUEST_PORT, ack, data),
            )),
        ),
        Case::forward(
            "tcp FIN world → guest: forwarded with an event",
            PROG_UPLINK_INGRESS,
            &tcp_flow,
            from_world(&ipv6(
                WORLD6,
                NAT6,
                50,
                &tcp(WORLD_PORT, NAT_PORT, TcpControl::Fin, data),
            )),
            to_guest(&ipv6(
                WORLD6,
                GUEST6,
                49,
                &tcp(WORLD_PORT, GUEST_PORT, TcpControl::Fin, data),
            )),
        )
        .with_event(PuntReason::EventFin, Origin::Uplink),
        Case::forward(
            "udp guest → world",
            PROG_TAP_INGRESS,
            &udp_flow,
            from_guest(&ipv6(
                GUEST6,
                WORLD6,
                64,
                &udp(GUEST_PORT, WORLD_PORT, data),
            )),
            from_guest(&ipv6(NAT6, WORLD6, 63, &udp(NAT_PORT, WORLD_PORT, data))),
        ),
        Case::forward(
            "udp world → guest",
            PROG_UPLINK_INGRESS,
            &udp_flow,
            from_world(&ipv6(WORLD6, NAT6, 50, &udp(WORLD_PORT, NAT_PORT, data))),
            to_guest(&ipv6(
                WORLD6,
                GUEST6,
                49,
                &udp(WORLD_PORT, GUEST_PORT, data),
            )),
        ),
        Case::forward(
            "icmpv6 echo request guest → world: identifier and pseudo-header",
            PROG_TAP_INGRESS,
            &echo_flow,
            from_guest(&ipv6(
                GUEST6,
                WORLD6,
                64,
                &L4::EchoRequest {
                    ident: GUEST_ID,
                    payload: data,
                },
            )),
            from_guest(&ipv6(
                NAT6,
                WORLD6,
                63,
                &L4::EchoRequest {
                    ident: NAT_ID,
                    payload: data,
                },
            )),
        ),
        Case::forward(
            "icmpv6 echo reply world → guest: identifier and pseudo-header",
            PROG_UPLINK_INGRESS,
            &echo_flow,
            echo_world.clone(),
            to_guest(&ipv6(
                WORLD6,
                GUEST6,
                49,
                &L4::EchoReply {
                    ident: GUEST_ID,
                    payload: data,
                },
            )),
        ),
        Case::punt(
            "hop limit 1: punted",
            PROG_TAP_INGRESS,
            tcp_flow.entries(),
            guest_tcp(1, ack),
            PuntReason::Exception,
        ),
        Case::punt(
            "SYN on an established flow: punted",
            PROG_TAP_INGRESS,
            tcp_flow.entries(),
            guest_tcp(64, TcpControl::Syn),
            PuntReason::Exception,
        ),
        Case::punt(
            "flow in its handshake: punted",
            PROG_UPLINK_INGRESS,
            tcp_flow.state(FlowState::Handshake).entries(),
            from_world(&ipv6(WORLD6, NAT6, 50, &world_tcp_l4)),
            PuntReason::Handshake,
        ),
        Case::punt(
            "guest packet of no flow: punted",
            PROG_TAP_INGRESS,
            Vec::new(),
            guest_tcp(64, ack),
            PuntReason::Ipv6NoFlow,
        ),
        Case::punt(
            "hop-by-hop header from the guest: punted",
            PROG_TAP_INGRESS,
            tcp_flow.entries(),
            guest_hbh,
            PuntReason::Ipv6NoFlow,
        ),
        Case::not_ours(
            "hop-by-hop header from the world: not ours",
            tcp_flow.entries(),
            world_hbh,
        ),
        Case::punt(
            "fragment from the guest: punted for reassembly",
            PROG_TAP_INGRESS,
            udp_flow.entries(),
            guest_frag,
            PuntReason::Fragment,
        ),
        Case::punt(
            "neighbour solicitation from the guest: punted",
            PROG_TAP_INGRESS,
            Vec::new(),
            from_guest(&ns),
            PuntReason::Ipv6NoFlow,
        ),
        Case::not_ours(
            "neighbour solicitation on the uplink: not ours, untouched",
            echo_flow.entries(),
            from_world(&ns),
        ),
        Case::not_ours(
            "echo request from the world (the host's ping): not ours",
            echo_flow.entries(),
            from_world(&ipv6(
                WORLD6,
                NAT6,
                50,
                &L4::EchoRequest {
                    ident: NAT_ID,
                    payload: data,
                },
            )),
        ),
        Case::punt(
            "packet too big quoting a flow: punted",
            PROG_UPLINK_INGRESS,
            tcp_flow.entries(),
            ptb.clone(),
            PuntReason::IcmpError,
        ),
        Case::not_ours(
            "packet too big quoting no flow: not ours",
            udp_flow.entries(),
            ptb,
        ),
        Case::not_ours(
            "packet too big with a truncated quote: not ours, counted",
            tcp_flow.entries(),
            ptb_short,
        )
        .also_count(Counter::IcmpUnparsed),
        Case::punt(
            "truncated TCP header from the guest: punted",
            PROG_TAP_INGRESS,
            tcp_flow.entries(),
            truncated_guest,
            PuntReason::Ipv6NoFlow,
        ),
        Case::not_ours(
            "truncated TCP header from the world: not ours",
            tcp_flow.entries(),
            truncated_world,
        ),
        Case::punt(
            "version 4 behind the IPv6 EtherType from the guest: punted",
            PROG_TAP_INGRESS,
            tcp_flow.entries(),
            wrong_version(&guest_tcp(64, ack)),
            PuntReason::Ipv6NoFlow,
        ),
        Case::not_ours(
            "version 4 behind the IPv6 EtherType from the world: not ours",
            tcp_flow.entries(),
            wrong_version(&full),
        ),
        Case::not_ours(
            "truncated ICMPv6 from the world: not ours, counted",
            echo_flow.entries(),
            truncated_icmp,
        )
        .also_count(Counter::IcmpUnparsed),
        Case::not_ours(
            "world packet of no flow: not ours, untouched",
            udp_flow.entries(),
            full,
        ),
    ]
    .into_iter()
    .chain(ipv6_fragment_cases())
    .collect()
}

/// IPv6 fragments (a fragment header right after the fixed header): from
/// the guest every one punted; from the world the first fragment of a
/// flow's datagram punted and tracked in `TG_FRAGS` by (addresses,
/// identification), later ones — whatever next header they name —
/// punted while their datagram is tracked and recent. A fragment header
/// anywhere else, or another header between it and the transport header,
/// is not ours.
fn ipv6_fragment_cases() -> Vec<Case> {
    let udp_flow = Flow::v6(PROTO_UDP);
    let tcp_flow = Flow::v6(PROTO_TCP);
    let echo_flow = Flow::v6(PROTO_ICMPV6);
    let data = b"hello, world";
    let (w, n) = (IpAddr::V6(WORLD6), IpAddr::V6(NAT6));
    let udp_world = udp(WORLD_PORT, NAT_PORT, data).bytes(w, n);
    let first = world_frag6(IpProtocol::Udp, 0, true, FRAG_ID6, &udp_world);
    let later = world_frag6(IpProtocol::Udp, 3, false, FRAG_ID6, &[0x5a; 24]);
    let key = frag_key6(FRAG_ID6);
    let tcp_first = world_frag6(
        IpProtocol::Tcp,
        0,
        true,
        FRAG_ID6,
        &tcp(WORLD_PORT, NAT_PORT, TcpControl::Psh, data).bytes(w, n),
    );
    let echo_first = world_frag6(
        IpProtocol::Icmpv6,
        0,
        true,
        FRAG_ID6,
        &L4::EchoReply {
            ident: NAT_ID,
            payload: data,
        }
        .bytes(w, n),
    );
    let after_hbh = from_world(&ipv6_raw(
        WORLD6,
        NAT6,
        50,
        IpProtocol::HopByHop,
        &concat(
            &ext_options(IpProtocol::Ipv6Frag),
            &concat(
                &frag6_header(IpProtocol::Udp, 0, true, FRAG_ID6),
                &udp_world,
            ),
        ),
    ));
    let dst_opts_after = world_frag6(
        IpProtocol::Ipv6Opts,
        0,
        true,
        FRAG_ID6,
        &concat(&ext_options(IpProtocol::Udp), &udp_world),
    );
    let guest_later = from_guest(&ipv6_raw(
        GUEST6,
        WORLD6,
        64,
        IpProtocol::Ipv6Frag,
        &concat(
            &frag6_header(IpProtocol::Udp, 3, false, FRAG_ID6),
            &[0x5a; 24],
        ),
    ));
    // Tracked under the IPv4 family with the same bytes: another datagram.
    let key_as_v4 = FragKey {
        family: FAMILY_IPV4,
        ..key
    };
    let up = PROG_UPLINK_INGRESS;
    let fragment = PuntReason::Fragment;
    vec![
        Case::punt(
            "later fragment from the guest: punted for reassembly, not tracked",
            PROG_TAP_INGRESS,
            udp_flow.entries(),
            guest_later,
            fragment,
        ),
        Case::punt(
            "first fragment of a flow's datagram from the world: punted, tracked",
            up,
            udp_flow.entries(),
            first.clone(),
            fragment,
        )
        .tracks(key),
        Case::punt(
            "first fragment of a TCP flow's segment: punted, tracked",
            up,
            tcp_flow.entries(),
            tcp_first,
            fragment,
        )
        .tracks(key),
        Case::punt(
            "first fragment of an echo reply: punted, tracked",
            up,
            echo_flow.entries(),
            echo_first,
            fragment,
        )
        .tracks(key),
        Case::punt(
            "atomic fragment (offset 0, M clear) of a flow: punted, tracked",
            up,
            udp_flow.entries(),
            world_frag6(IpProtocol::Udp, 0, false, FRAG_ID6, &udp_world),
            fragment,
        )
        .tracks(key),
        Case::punt(
            "first fragment again (retransmitted): punted, tracked anew",
            up,
            udp_flow.entries(),
            first.clone(),
            fragment,
        )
        .frag_seen(key, FRAG_STALE)
        .tracks(key),
        Case::not_ours(
            "first fragment of no flow from the world: not ours",
            tcp_flow.entries(),
            first,
        ),
        Case::not_ours(
            "first fragment with a truncated UDP header: not ours",
            udp_flow.entries(),
            world_frag6(IpProtocol::Udp, 0, true, FRAG_ID6, &udp_world[..2]),
        ),
        Case::not_ours(
            "fragment header after a hop-by-hop header: not ours",
            udp_flow.entries(),
            after_hbh,
        ),
        Case::not_ours(
            "first fragment with destination options before UDP: not ours",
            udp_flow.entries(),
            dst_opts_after,
        ),
        Case::punt(
            "later fragment of a tracked datagram: punted",
            up,
            udp_flow.entries(),
            later.clone(),
            fragment,
        )
        .frag_seen(key, FRAG_RECENT),
        Case::punt(
            "later fragment naming another next header: punted (the first's counts)",
            up,
            udp_flow.entries(),
            world_frag6(IpProtocol::Ipv6NoNxt, 3, false, FRAG_ID6, &[0x5a; 24]),
            fragment,
        )
        .frag_seen(key, FRAG_RECENT),
        Case::not_ours(
            "later fragment of an untracked datagram: not ours",
            udp_flow.entries(),
            later.clone(),
        ),
        Case::not_ours(
            "later fragment of a datagram tracked over 30 s ago: not ours",
            udp_flow.entries(),
            later.clone(),
        )
        .frag_seen(key, FRAG_STALE),
        Case::not_ours(
            "later fragment of another identification: not ours",
            udp_flow.entries(),
            later.clone(),
        )
        .frag_seen(frag_key6(FRAG_ID6 ^ 1), FRAG_RECENT),
        Case::not_ours(
            "later fragment whose bytes are tracked as IPv4: not ours",
            udp_flow.entries(),
            later,
        )
        .frag_seen(key_as_v4, FRAG_RECENT),
    ]
}

#[test]
fn ipv6_fast_path() {
    if !have_root("ipv6_fast_path") {
        return;
    }
    let mut t = load(ProgTestOptions::default());
    run_all("ipv6", &mut t, &ipv6_cases(), false);
}

/// The same cases with `BPF_F_IPV6` passed to `bpf_l4_csum_replace`, as
/// the loader does on Linux ≥ 6.16 (this kernel must accept the flag: a
/// refusal would fail every rewrite, counted as `redirect_error`).
#[test]
fn ipv6_fast_path_with_bpf_f_ipv6() {
    if !have_root("ipv6_fast_path_with_bpf_f_ipv6") {
        return;
    }
    if !tapgate::kernel::loader::kernel_has_l4_csum_ipv6() {
        eprintln!("skipping: this kernel predates BPF_F_IPV6 (Linux 6.16)");
        return;
    }
    let mut t = load(ProgTestOptions { l4_csum_ipv6: true });
    run_all("ipv6+BPF_F_IPV6", &mut t, &ipv6_cases(), false);
}

/// A packet the egress device's MTU cannot carry is punted (user space
/// answers with packet too big / fragmentation needed). Runs in a
/// namespace of its own whose egress device has a 1280-byte MTU.
#[test]
fn too_big_for_the_egress_mtu() {
    if !have_root("too_big_for_the_egress_mtu") {
        return;
    }
    let ns = Netns::new("fix").unwrap();
    // A veth pair (this kernel has no dummy driver); only its MTU matters.
    let out = ns
        .ip(&[
            "link", "add", "small0", "mtu", "1280", "type", "veth", "peer", "name", "small1",
        ])
        .unwrap();
    assert!(out.status.success(), "ip link add: {out:?}");
    let ifindex: u32 = ns
        .stdout(&["cat", "/sys/class/net/small0/ifindex"])
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    nsthread::run_in(&ns, "mtu-fixture", Duration::from_secs(30), move || {
        let mut t = load(ProgTestOptions::default());
        let (v4, v6) = (Flow::v4(PROTO_TCP), Flow::v6(PROTO_TCP));
        let (big, fits) = (&[0u8; 1300][..], &[0u8; 1200][..]);
        let guest4 = |payload| {
            from_guest(&ipv4(
                GUEST4,
                WORLD4,
                64,
                &tcp(GUEST_PORT, WORLD_PORT, TcpControl::Psh, payload),
            ))
        };
        let guest6 = |payload| {
            from_guest(&ipv6(
                GUEST6,
                WORLD6,
                64,
                &tcp(GUEST_PORT, WORLD_PORT, TcpControl::Psh, payload),
            ))
        };
        let cases = [
            Case::punt(
                "ipv6 above the egress MTU (1374-byte frame): punted",
                PROG_TAP_INGRESS,
                v6.entries(),
                guest6(big),
                PuntReason::Exception,
            ),
            Case::forward(
                "ipv6 within the egress MTU (1274-byte frame): forwarded",
                PROG_TAP_INGRESS,
                &v6,
                guest6(fits),
                from_guest(&ipv6(
                    NAT6,
                    WORLD6,
                    63,
                    &tcp(NAT_PORT, WORLD_PORT, TcpControl::Psh, fits),
                )),
            ),
            Case::punt(
                "ipv4 above the egress MTU (1354-byte frame): punted",
                PROG_TAP_INGRESS,
                v4.entries(),
                guest4(big),
                PuntReason::Exception,
            ),
            Case::forward(
                "ipv4 within the egress MTU (1254-byte frame): forwarded",
                PROG_TAP_INGRESS,
                &v4,
                guest4(fits),
                from_guest(&ipv4(
                    NAT4,
                    WORLD4,
                    63,
                    &tcp(NAT_PORT, WORLD_PORT, TcpControl::Psh, fits),
                )),
            ),
        ]
        .map(|c| c.out_ifindex(ifindex));
        run_all("mtu", &mut t, &cases, false);
        Ok(())
    })
    .unwrap();
}

/// The errno of a failed test run, if it was the syscall that failed.
fn errno(e: &anyhow::Error) -> Option<i32> {
    e.downcast_ref::<std::io::Error>()
        .and_then(std::io::Error::raw_os_error)
}

/// Test run cannot take a frame whose IPv4 or IPv6 header is cut short
/// (the kernel refuses it with `EINVAL` before the program runs), so the
/// programs' handling of those — a punt from the tap, not ours on the
/// uplink, as for any packet that does not parse — is covered by the
/// truncated transport headers above instead. This pins down the
/// limitation: should a kernel accept such frames, turn them into cases.
#[test]
fn truncated_network_headers() {
    if !have_root("truncated_network_headers") {
        return;
    }
    let t = load(ProgTestOptions::default());
    let v6 = from_world(&ipv6(WORLD6, NAT6, 50, &udp(WORLD_PORT, NAT_PORT, b"x")));
    let v4 = from_world(&ipv4(WORLD4, NAT4, 50, &udp(WORLD_PORT, NAT_PORT, b"x")));
    for (what, frame, hlen) in [("ipv6", &v6, 40), ("ipv4", &v4, 20)] {
        for program in [PROG_TAP_INGRESS, PROG_UPLINK_INGRESS] {
            let before = t.counters().unwrap();
            let cut = &frame[..14 + hlen - 1];
            match t.run(program, cut) {
                Err(e) if errno(&e) == Some(libc::EINVAL) => {}
                other => panic!("{what} {program}: a cut header ran: {other:?}"),
            }
            assert_eq!(t.counters().unwrap(), before, "{what} {program}");
            let whole = &frame[..14 + hlen];
            assert!(
                t.run(program, whole).is_ok(),
                "{what} {program}: the bare header must run"
            );
        }
    }
}

/// Every case again as a `CHECKSUM_COMPLETE` skb, with the flags the
/// loader would use here: the kernel must find `skb->csum` still right.
#[test]
fn checksum_complete_skbs() {
    if !have_root("checksum_complete_skbs") {
        return;
    }
    let mut t = load(ProgTestOptions::default());
    run_all("ipv4 CHECKSUM_COMPLETE", &mut t, &ipv4_cases(), true);
    if !tapgate::kernel::loader::kernel_has_l4_csum_ipv6() {
        eprintln!("skipping the IPv6 part: this kernel predates BPF_F_IPV6 (Linux 6.16)");
        return;
    }
    let mut t = load(ProgTestOptions { l4_csum_ipv6: true });
    run_all(
        "ipv6+BPF_F_IPV6 CHECKSUM_COMPLETE",
        &mut t,
        &ipv6_cases(),
        true,
    );
}

/// Without `BPF_F_IPV6`, an IPv6 address rewrite leaves `skb->csum` of a
/// `CHECKSUM_COMPLETE` skb wrong (the kernel adjusts it as for IPv4): the
/// reason the loader passes the flag wherever the kernel takes it. A
/// rewrite of ports alone (no address change) is right either way.
#[test]
fn checksum_complete_needs_bpf_f_ipv6() {
    if !have_root("checksum_complete_needs_bpf_f_ipv6") {
        return;
    }
    let mut t = load(ProgTestOptions::default());
    let flow = Flow::v6(PROTO_TCP);
    for (k, e) in flow.entries() {
        t.insert_flow(&k, &e).unwrap();
    }
    let frame = from_guest(&ipv6(
        GUEST6,
        WORLD6,
        64,
        &tcp(GUEST_PORT, WORLD_PORT, TcpControl::Psh, b"data"),
    ));
    match t.run_with(PROG_TAP_INGRESS, &frame, true) {
        Err(e) if errno(&e) == Some(libc::EBADMSG) => {}
        other => panic!("expected EBADMSG without BPF_F_IPV6, got {other:?}"),
    }
    // Same flow, NAT address = guest address: only the port changes.
    let mut ports_only = flow;
    ports_only.nat.0 = GUEST6.octets();
    t.clear_flows().unwrap();
    for (k, e) in ports_only.entries() {
        t.insert_flow(&k, &e).unwrap();
    }
    let run = t.run_with(PROG_TAP_INGRESS, &frame, true).unwrap();
    assert_eq!(run.verdict, TC_ACT_REDIRECT);
}

/// The four programs pass this kernel's verifier with either value of
/// the IPv6 checksum flag; prints how much of the verifier's budget (one
/// million instructions) each takes.
#[test]
fn programs_pass_the_verifier() {
    if !have_root("programs_pass_the_verifier") {
        return;
    }
    for l4_csum_ipv6 in [false, true] {
        let t = load(ProgTestOptions { l4_csum_ipv6 });
        for program in [
            PROG_TAP_INGRESS,
            PROG_UPLINK_INGRESS,
            PROG_UPLINK_EGRESS,
            datapath_common::PROG_LO_INGRESS,
        ] {
            let n = t.verified_instructions(program).unwrap();
            eprintln!("BPF_F_IPV6 {l4_csum_ipv6}: {program}: {n:?} instructions verified");
            assert!(n.is_none_or(|n| n < 1_000_000), "{program}: {n:?}");
        }
    }
}

/// The uplink's egress program (`--allow-host`) is the ingress program's
/// code: an IPv6 reply of the host to a host-local flow goes to the guest.
#[test]
fn uplink_egress_forwards_ipv6() {
    if !have_root("uplink_egress_forwards_ipv6") {
        return;
    }
    let mut t = load(ProgTestOptions::default());
    let flow = Flow::v6(PROTO_UDP);
    let mut case = Case::forward(
        "udp host → guest on the uplink's egress",
        PROG_UPLINK_INGRESS,
        &flow,
        from_world(&ipv6(WORLD6, NAT6, 64, &udp(WORLD_PORT, NAT_PORT, b"hi"))),
        to_guest(&ipv6(
            WORLD6,
            GUEST6,
            63,
            &udp(WORLD_PORT, GUEST_PORT, b"hi"),
        )),
    );
    case.program = PROG_UPLINK_EGRESS;
    run_all("egress", &mut t, &[case], false);
}

// ---------------------------------------------------------------------------
// Forwarded ports (TG_FWD_PORTS), both families
// ---------------------------------------------------------------------------

/// The forwarding rules of the openings cases: TCP 8080 → 80 and UDP 5353
/// on every host address (both families), TCP 9000-9010 (a range: several
/// prefixes), TCP 9443 → 443 on the host's IPv6 address only.
fn fwd_rules() -> tapgate::fwd::FwdTable {
    use tapgate::fwd::{FwdTable, PortRange, Proto};
    let mut t = FwdTable::new();
    for (proto, spec) in [
        (Proto::Tcp, "8080:80"),
        (Proto::Udp, "5353"),
        (Proto::Tcp, "9000-9010"),
        (Proto::Tcp, "[2001:db8::1]/9443:443"),
    ] {
        t.add_spec(proto, spec, PortRange::LINUX_EPHEMERAL)
            .unwrap_or_else(|e| panic!("{spec}: {e}"));
    }
    t
}

/// A pure SYN (no ACK number) from the world.
fn syn_only(sport: u16, dport: u16) -> L4<'static> {
    L4::Tcp {
        sport,
        dport,
        control: TcpControl::Syn,
        ack: None,
        payload: b"",
    }
}

fn forward_cases() -> Vec<Case> {
    const CLIENT_PORT: u16 = 41000;
    let other6 = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x99);
    // The IPv6 address whose first four bytes are the host's IPv4 address.
    let lookalike6 = Ipv6Addr::from(ipv4_to_16(NAT4.octets()));
    let w6 = |dst: Ipv6Addr, l4: &L4| from_world(&ipv6(WORLD6, dst, 50, l4));
    let w4 = |dst: Ipv4Addr, l4: &L4| from_world(&ipv4(WORLD4, dst, 50, l4));
    let fwd = |name, frame| {
        Case::punt(
            name,
            PROG_UPLINK_INGRESS,
            Vec::new(),
            frame,
            PuntReason::Forward,
        )
    };
    let no = |name, frame| Case::not_ours(name, Vec::new(), frame);
    let frag = |name, frame| {
        Case::punt(
            name,
            PROG_UPLINK_INGRESS,
            Vec::new(),
            frame,
            PuntReason::Fragment,
        )
    };
    let udp_to_5353 = udp(CLIENT_PORT, 5353, b"query");
    vec![
        // IPv6
        fwd(
            "ipv6 SYN to a forwarded port: punted (forward)",
            w6(NAT6, &syn_only(CLIENT_PORT, 8080)),
        ),
        no(
            "ipv6 SYN to another port: not ours",
            w6(NAT6, &syn_only(CLIENT_PORT, 8081)),
        ),
        fwd(
            "ipv6 UDP to a forwarded port: punted (forward)",
            w6(NAT6, &udp_to_5353),
        ),
        no(
            "ipv6 UDP to another port: not ours",
            w6(NAT6, &udp(CLIENT_PORT, 5354, b"query")),
        ),
        no(
            "ipv6 SYN to the UDP-only port: not ours",
            w6(NAT6, &syn_only(CLIENT_PORT, 5353)),
        ),
        no(
            "ipv6 SYN-ACK to a forwarded port: not ours",
            w6(NAT6, &tcp(CLIENT_PORT, 8080, TcpControl::Syn, b"")),
        ),
        no(
            "ipv6 ACK to a forwarded port: not ours",
            w6(NAT6, &tcp(CLIENT_PORT, 8080, TcpControl::None, b"x")),
        ),
        fwd(
            "ipv6 SYN into a forwarded range: punted (forward)",
            w6(NAT6, &syn_only(CLIENT_PORT, 9007)),
        ),
        no(
            "ipv6 SYN past a forwarded range: not ours",
            w6(NAT6, &syn_only(CLIENT_PORT, 9011)),
        ),
        fwd(
            "ipv6 SYN to an IPv6-addressed rule: punted (forward)",
            w6(NAT6, &syn_only(CLIENT_PORT, 9443)),
        ),
        no(
            "ipv6 SYN to a forwarded port of an address not the host's: not ours",
            w6(other6, &syn_only(CLIENT_PORT, 8080)),
        ),
        no(
            "ipv6 SYN to the address sharing the host's IPv4 bytes: not ours",
            w6(lookalike6, &syn_only(CLIENT_PORT, 8080)),
        ),
        frag(
            "ipv6 first fragment of a UDP datagram to a forwarded port: punted (fragment), tracked",
            world_frag6(
                IpProtocol::Udp,
                0,
                true,
                FRAG_ID6,
                &udp_to_5353.bytes(WORLD6.into(), NAT6.into()),
            ),
        )
        .tracks(frag_key6(FRAG_ID6)),
        no(
            "ipv6 first fragment of a UDP datagram to another port: not ours",
            world_frag6(
                IpProtocol::Udp,
                0,
                true,
                FRAG_ID6,
                &udp(CLIENT_PORT, 5354, b"query").bytes(WORLD6.into(), NAT6.into()),
            ),
        ),
        // IPv4, through the same trie
        fwd(
            "ipv4 SYN to a forwarded port: punted (forward)",
            w4(NAT4, &syn_only(CLIENT_PORT, 8080)),
        ),
        no(
            "ipv4 SYN to another port: not ours",
            w4(NAT4, &syn_only(CLIENT_PORT, 8081)),
        ),
        fwd(
            "ipv4 UDP to a forwarded port: punted (forward)",
            w4(NAT4, &udp_to_5353),
        ),
        no(
            "ipv4 UDP to another port: not ours",
            w4(NAT4, &udp(CLIENT_PORT, 5354, b"query")),
        ),
        no(
            "ipv4 SYN to the IPv6-only rule's port: not ours",
            w4(NAT4, &syn_only(CLIENT_PORT, 9443)),
        ),
        frag(
            "ipv4 first fragment of a UDP datagram to a forwarded port: punted (fragment), tracked",
            from_world(&ipv4_fragment(
                &ipv4(WORLD4, NAT4, 50, &udp_to_5353),
                FRAG_ID4,
                true,
                0,
            )),
        )
        .tracks(frag_key4(FRAG_ID4, PROTO_UDP)),
    ]
}

/// Openings of forwarded ports, IPv6 and IPv4, with `TG_FWD_PORTS` filled
/// exactly as user space fills it (`kernel::maps::wanted_prefixes` over
/// the rules and the host's addresses): a pure SYN or a datagram to a
/// forwarded (address, protocol, port) is punted as `Forward`, anything
/// else is not ours.
#[test]
fn forwarded_port_openings() {
    if !have_root("forwarded_port_openings") {
        return;
    }
    let mut t = load(ProgTestOptions::default());
    let host = [IpAddr::V4(NAT4), IpAddr::V6(NAT6)];
    let prefixes = tapgate::kernel::maps::wanted_prefixes(fwd_rules().rules(), &host);
    assert!(
        prefixes
            .iter()
            .any(|(k, _)| k.family == FAMILY_IPV6 && k.addr == NAT6.octets()),
        "no IPv6 key published"
    );
    for (data, len) in prefixes {
        t.insert_fwd_prefix(data, len).unwrap();
    }
    run_all("forwards", &mut t, &forward_cases(), false);
    // Without the keys, the same openings are not ours.
    t.clear_fwd_prefixes().unwrap();
    let none: Vec<Case> = forward_cases()
        .into_iter()
        .map(|c| Case::not_ours(c.name, Vec::new(), c.frame))
        .collect();
    run_all("no keys (every case not ours)", &mut t, &none, false);
}

// ---------------------------------------------------------------------------
// Loopback's ingress: clients on the host itself of forwarded ports
// ---------------------------------------------------------------------------

const LO4: Ipv4Addr = Ipv4Addr::LOCALHOST;
const LO6: Ipv6Addr = Ipv6Addr::LOCALHOST;
/// The gateway's addresses: what a host client's flow shows the guest.
const GATEWAY4: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
const GATEWAY6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 2);
/// The host client's port and the gateway's NAT port of its flow.
const HOST_CLIENT_PORT: u16 = 41000;
const GATEWAY_PORT: u16 = 50001;

/// A frame as loopback carries it (all-zero MACs).
fn on_lo(ip: &[u8]) -> Vec<u8> {
    eth([0; 6], [0; 6], ethertype_of(ip), ip)
}

/// A packet on loopback's ingress that is not ours: untouched,
/// `TCX_NEXT`, counted as `lo_not_ours`.
fn lo_not_ours(name: &'static str, flows: Vec<(FlowKey, FlowEntry)>, frame: Vec<u8>) -> Case {
    let mut c = Case::not_ours(name, flows, frame);
    c.program = datapath_common::PROG_LO_INGRESS;
    c.counters = vec![(slot(Counter::LoNotOurs), 1)];
    c
}

/// A host client's flow as user space installs it: the client talks to
/// a forwarded (address, port) on loopback; the guest sees the gateway at
/// a NAT port.
#[derive(Clone, Copy)]
struct HostFlow {
    family: u8,
    proto: u8,
    client: ([u8; 16], u16),
    forwarded: ([u8; 16], u16),
    gateway: ([u8; 16], u16),
    guest: ([u8; 16], u16),
    state: FlowState,
}

impl HostFlow {
    fn v4(proto: u8, forwarded_port: u16, guest_port: u16) -> Self {
        Self {
            family: FAMILY_IPV4,
            proto,
            client: (ipv4_to_16(LO4.octets()), HOST_CLIENT_PORT),
            forwarded: (ipv4_to_16(LO4.octets()), forwarded_port),
            gateway: (ipv4_to_16(GATEWAY4.octets()), GATEWAY_PORT),
            guest: (ipv4_to_16(GUEST4.octets()), guest_port),
            state: FlowState::Established,
        }
    }

    fn v6(proto: u8, forwarded_port: u16, guest_port: u16) -> Self {
        Self {
            family: FAMILY_IPV6,
            proto,
            client: (LO6.octets(), HOST_CLIENT_PORT),
            forwarded: (LO6.octets(), forwarded_port),
            gateway: (GATEWAY6.octets(), GATEWAY_PORT),
            guest: (GUEST6.octets(), guest_port),
            state: FlowState::Established,
        }
    }

    fn key(&self, src: ([u8; 16], u16), dst: ([u8; 16], u16), dir: u8) -> FlowKey {
        FlowKey {
            src: src.0,
            dst: dst.0,
            sport: src.1,
            dport: dst.1,
            proto: self.proto,
            family: self.family,
            dir,
            _pad: 0,
        }
    }

    /// The client's side, in the loopback program's direction.
    fn lo_key(&self) -> FlowKey {
        self.key(self.client, self.forwarded, datapath_common::DIR_FROM_LO)
    }

    fn entry(&self, src: ([u8; 16], u16), dst: ([u8; 16], u16)) -> FlowEntry {
        FlowEntry {
            new_src: src.0,
            new_dst: dst.0,
            new_sport: src.1,
            new_dport: dst.1,
            out_ifindex: 1,
            eth_src: GATEWAY_MAC,
            eth_dst: GUEST_MAC,
            slot: SLOT,
            state: self.state as u8,
            ..FlowEntry::default()
        }
    }

    /// Both entries: guest → client (out through loopback) and client →
    /// guest.
    fn entries(&self) -> Vec<(FlowKey, FlowEntry)> {
        vec![
            (
                self.key(self.guest, self.gateway, DIR_FROM_TAP),
                self.entry(self.forwarded, self.client),
            ),
            (self.lo_key(), self.entry(self.gateway, self.guest)),
        ]
    }
}

/// ICMP port unreachable from `src` to `dst` about `quoted` (an IPv4
/// packet): its header and first 8 bytes, as Linux quotes.
fn port_unreachable4(src: Ipv4Addr, dst: Ipv4Addr, quoted: &[u8]) -> Vec<u8> {
    let q = Ipv4Packet::new_checked(quoted).unwrap();
    let header = Ipv4Repr::parse(&q, &ChecksumCapabilities::default()).unwrap();
    let repr = Icmpv4Repr::DstUnreachable {
        reason: smoltcp::wire::Icmpv4DstUnreachable::PortUnreachable,
        header,
        data: &quoted[20..28],
    };
    let mut icmp = vec![0; repr.buffer_len()];
    repr.emit(
        &mut Icmpv4Packet::new_unchecked(&mut icmp[..]),
        &ChecksumCapabilities::default(),
    );
    let ip = Ipv4Repr {
        src_addr: src,
        dst_addr: dst,
        next_header: IpProtocol::Icmp,
        payload_len: icmp.len(),
        hop_limit: 64,
    };
    let mut buf = vec![0; ip.buffer_len() + icmp.len()];
    let mut pkt = Ipv4Packet::new_unchecked(&mut buf);
    ip.emit(&mut pkt, &ChecksumCapabilities::default());
    pkt.payload_mut().copy_from_slice(&icmp);
    buf
}

/// The rules of the loopback cases: TCP 8080 → 80 and UDP 5353 on every
/// address, UDP 6000-6010 (a client may sit on one of those ports with
/// `--no-reserve-ports`), TCP 9443 → 443 on the host's IPv4 address only.
fn lo_rules() -> tapgate::fwd::FwdTable {
    use tapgate::fwd::{FwdTable, PortRange, Proto};
    let mut t = FwdTable::new();
    for (proto, spec) in [
        (Proto::Tcp, "8080:80"),
        (Proto::Udp, "5353"),
        (Proto::Udp, "6000-6010"),
        (Proto::Tcp, "198.51.100.1/9443:443"),
    ] {
        t.add_spec(proto, spec, PortRange::LINUX_EPHEMERAL)
            .unwrap_or_else(|e| panic!("{spec}: {e}"));
    }
    t
}

/// The openings on loopback's ingress: punted as `Forward` with the keys
/// published, not ours without them.
fn lo_opening_cases() -> Vec<Case> {
    let c = HOST_CLIENT_PORT;
    let fwd = |name, frame| {
        Case::punt(
            name,
            datapath_common::PROG_LO_INGRESS,
            Vec::new(),
            frame,
            PuntReason::Forward,
        )
    };
    vec![
        fwd(
            "ipv4 SYN from the host to 127.0.0.1:8080: punted (forward)",
            on_lo(&ipv4(LO4, LO4, 64, &syn_only(c, 8080))),
        ),
        fwd(
            "ipv4 SYN from the host to its own address: punted (forward)",
            on_lo(&ipv4(NAT4, NAT4, 64, &syn_only(c, 8080))),
        ),
        fwd(
            "ipv4 SYN to an addressed rule at its address: punted (forward)",
            on_lo(&ipv4(NAT4, NAT4, 64, &syn_only(c, 9443))),
        ),
        fwd(
            "ipv4 UDP from the host to 127.0.0.1:5353: punted (forward)",
            on_lo(&ipv4(LO4, LO4, 64, &udp(c, 5353, b"query"))),
        ),
        fwd(
            "ipv4 UDP to a client port that is forwarded too: punted (forward)",
            on_lo(&ipv4(LO4, LO4, 64, &udp(c, 6001, b"query"))),
        ),
        fwd(
            "ipv6 SYN from the host to [::1]:8080: punted (forward)",
            on_lo(&ipv6(LO6, LO6, 64, &syn_only(c, 8080))),
        ),
        fwd(
            "ipv6 SYN from the host to its own IPv6 address: punted (forward)",
            on_lo(&ipv6(NAT6, NAT6, 64, &syn_only(c, 8080))),
        ),
        fwd(
            "ipv6 UDP from the host to [::1]:5353: punted (forward)",
            on_lo(&ipv6(LO6, LO6, 64, &udp(c, 5353, b"query"))),
        ),
    ]
}

fn lo_cases() -> Vec<Case> {
    let c = HOST_CLIENT_PORT;
    let data = b"GET /file";
    let ack = TcpControl::Psh;
    let tcp4 = HostFlow::v4(PROTO_TCP, 8080, 80);
    let udp4 = HostFlow::v4(PROTO_UDP, 5353, 5353);
    let tcp6 = HostFlow::v6(PROTO_TCP, 8080, 80);
    let handshake4 = HostFlow {
        state: FlowState::Handshake,
        ..tcp4
    };
    let world_flow = Flow::v4(PROTO_TCP);
    let to_the_tap = |name, flow: &HostFlow, frame: Vec<u8>, expected: Vec<u8>| Case {
        name,
        program: datapath_common::PROG_LO_INGRESS,
        flows: flow.entries(),
        counters: forwarded(&frame),
        frame,
        verdict: TC_ACT_REDIRECT,
        out: Out::Frame(expected),
        activity: ACTIVE,
        records: Vec::new(),
        entry: Some(EntryAfter {
            key: flow.lo_key(),
            last_ack: if flow.proto == PROTO_TCP { 2000 } else { 0 },
            last_win: if flow.proto == PROTO_TCP { 5000 } else { 0 },
        }),
        stale_skb_csum: false,
        frags: Vec::new(),
        tracked: Vec::new(),
    };
    let reply_quoted = ipv4(LO4, LO4, 63, &udp(5353, c, b"answer"));
    let mut cases = lo_opening_cases();
    cases.extend([
        // What else the host sends itself is not ours.
        lo_not_ours(
            "ipv4 SYN to an unforwarded port on 127.0.0.1: not ours",
            Vec::new(),
            on_lo(&ipv4(LO4, LO4, 64, &syn_only(c, 8081))),
        ),
        lo_not_ours(
            "ipv4 SYN to an addressed rule on 127.0.0.1: not ours",
            Vec::new(),
            on_lo(&ipv4(LO4, LO4, 64, &syn_only(c, 9443))),
        ),
        lo_not_ours(
            "ipv6 SYN to an unforwarded port on ::1: not ours",
            Vec::new(),
            on_lo(&ipv6(LO6, LO6, 64, &syn_only(c, 8081))),
        ),
        lo_not_ours(
            "ipv4 ACK to a forwarded port without a flow: not ours",
            Vec::new(),
            on_lo(&ipv4(LO4, LO4, 64, &tcp(c, 8080, ack, data))),
        ),
        // What tapgate itself sends the client through loopback.
        lo_not_ours(
            "ipv4 SYN-ACK into loopback (the guest's, to the client): not ours",
            handshake4.entries(),
            on_lo(&ipv4(LO4, LO4, 64, &tcp(8080, c, TcpControl::Syn, b""))),
        ),
        lo_not_ours(
            "ipv6 SYN-ACK into loopback: not ours",
            HostFlow {
                state: FlowState::Handshake,
                ..tcp6
            }
            .entries(),
            on_lo(&ipv6(LO6, LO6, 64, &tcp(8080, c, TcpControl::Syn, b""))),
        ),
        lo_not_ours(
            "ipv4 guest data delivered to the client: not ours",
            tcp4.entries(),
            on_lo(&ipv4(LO4, LO4, 63, &tcp(8080, c, ack, data))),
        ),
        lo_not_ours(
            "ipv4 UDP from a forwarded port to a forwarded client port: not ours (a reply)",
            udp4.entries(),
            on_lo(&ipv4(LO4, LO4, 63, &udp(5353, 6001, b"answer"))),
        ),
        // A host client's flow.
        to_the_tap(
            "ipv4 data of a host client's flow: to the tap, from the gateway, guest MACs",
            &tcp4,
            on_lo(&ipv4(LO4, LO4, 64, &tcp(c, 8080, ack, data))),
            to_guest(&ipv4(
                GATEWAY4,
                GUEST4,
                63,
                &tcp(GATEWAY_PORT, 80, ack, data),
            )),
        ),
        to_the_tap(
            "ipv4 UDP of a host client's flow: to the tap",
            &udp4,
            on_lo(&ipv4(LO4, LO4, 64, &udp(c, 5353, b"query"))),
            to_guest(&ipv4(
                GATEWAY4,
                GUEST4,
                63,
                &udp(GATEWAY_PORT, 5353, b"query"),
            )),
        ),
        to_the_tap(
            "ipv6 data of a host client's flow: to the tap, from the gateway",
            &tcp6,
            on_lo(&ipv6(LO6, LO6, 64, &tcp(c, 8080, ack, data))),
            to_guest(&ipv6(
                GATEWAY6,
                GUEST6,
                63,
                &tcp(GATEWAY_PORT, 80, ack, data),
            )),
        ),
        to_the_tap(
            "ipv4 FIN of a host client's flow: to the tap with an event",
            &tcp4,
            on_lo(&ipv4(LO4, LO4, 64, &tcp(c, 8080, TcpControl::Fin, data))),
            to_guest(&ipv4(
                GATEWAY4,
                GUEST4,
                63,
                &tcp(GATEWAY_PORT, 80, TcpControl::Fin, data),
            )),
        )
        .with_event(PuntReason::EventFin, Origin::Uplink),
        Case::punt(
            "ipv4 segment of a host client's handshake: punted (handshake)",
            datapath_common::PROG_LO_INGRESS,
            handshake4.entries(),
            on_lo(&ipv4(LO4, LO4, 64, &tcp(c, 8080, ack, data))),
            PuntReason::Handshake,
        ),
        Case::punt(
            "ipv4 port unreachable about a host client's datagram: punted (icmp error)",
            datapath_common::PROG_LO_INGRESS,
            udp4.entries(),
            on_lo(&port_unreachable4(LO4, LO4, &reply_quoted)),
            PuntReason::IcmpError,
        ),
        lo_not_ours(
            "ipv4 port unreachable quoting no flow: not ours",
            Vec::new(),
            on_lo(&port_unreachable4(LO4, LO4, &reply_quoted)),
        ),
        // Keys of one direction never match packets of the other.
        Case::not_ours(
            "a host client's segment on the uplink: not ours",
            tcp4.entries(),
            from_world(&ipv4(LO4, LO4, 64, &tcp(c, 8080, ack, data))),
        ),
        lo_not_ours(
            "a world flow's segment on loopback: not ours",
            world_flow.entries(),
            on_lo(&ipv4(
                WORLD4,
                NAT4,
                50,
                &tcp(WORLD_PORT, NAT_PORT, ack, data),
            )),
        ),
        // Neither fragments nor pings nor other frames.
        lo_not_ours(
            "ipv4 first fragment to a forwarded port on loopback: not ours",
            udp4.entries(),
            on_lo(&ipv4_fragment(
                &ipv4(LO4, LO4, 64, &udp(c, 5353, b"query")),
                FRAG_ID4,
                true,
                0,
            )),
        ),
        lo_not_ours(
            "ping of 127.0.0.1: not ours",
            Vec::new(),
            on_lo(&ipv4(
                LO4,
                LO4,
                64,
                &L4::EchoRequest {
                    ident: GUEST_ID,
                    payload: data,
                },
            )),
        ),
        lo_not_ours(
            "ARP on loopback: not ours",
            Vec::new(),
            eth([0; 6], [0; 6], EthernetProtocol::Arp, &[0; 28]),
        ),
    ]);
    cases
}

/// The loopback program (`tg_lo_ingress`) with `TG_FWD_PORTS` filled as
/// user space fills it for rules without an address — loopback's
/// addresses included — and for an addressed rule: openings of forwarded
/// ports are punted (`Forward`, the record's ifindex loopback's — under
/// test run every skb is on loopback), packets of a host client's flow
/// (keyed `DIR_FROM_LO`) go to the tap as from the gateway, and
/// everything else the host sends itself — the guest's SYN-ACK and data
/// tapgate delivers to the client, unforwarded ports, pings, fragments —
/// is not ours. Without the keys, no opening is ours.
#[test]
fn loopback_openings_and_host_client_flows() {
    if !have_root("loopback_openings_and_host_client_flows") {
        return;
    }
    let mut t = load(ProgTestOptions::default());
    let host = tapgate::kernel::maps::published_host_addrs(&[
        IpAddr::V4(LO4),
        IpAddr::V6(LO6),
        IpAddr::V4(NAT4),
        IpAddr::V6(NAT6),
    ]);
    assert!(host.contains(&IpAddr::V4(LO4)) && host.contains(&IpAddr::V6(LO6)));
    for (data, len) in tapgate::kernel::maps::wanted_prefixes(lo_rules().rules(), &host) {
        t.insert_fwd_prefix(data, len).unwrap();
    }
    run_all("loopback", &mut t, &lo_cases(), false);

    // The record says where it came from.
    t.drain_punts().unwrap();
    let syn = on_lo(&ipv4(LO4, LO4, 64, &syn_only(HOST_CLIENT_PORT, 8080)));
    let run = t.run(datapath_common::PROG_LO_INGRESS, &syn).unwrap();
    assert_eq!(run.verdict, TC_ACT_SHOT);
    let recs = t.drain_punts().unwrap();
    assert_eq!(recs.len(), 1);
    assert_eq!(
        recs[0].header.ifindex,
        datapath_common::LOOPBACK_IFINDEX,
        "the punt names loopback"
    );

    // Without the keys, the same openings are not ours.
    t.clear_fwd_prefixes().unwrap();
    let none: Vec<Case> = lo_opening_cases()
        .into_iter()
        .map(|c| lo_not_ours(c.name, Vec::new(), c.frame))
        .collect();
    run_all("loopback without keys (not ours)", &mut t, &none, false);
}
