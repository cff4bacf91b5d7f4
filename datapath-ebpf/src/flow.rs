//! Flow lookup and forwarding: the fast path proper, for IPv4 and IPv6.
//!
//! # Theory of operation
//!
//! Parse ([`crate::parse`], one family-neutral packet) → look up the
//! directional key → check that the kernel may forward this packet as it
//! is → account and emit events → rewrite ([`nat::rewrite`], per family)
//! → redirect: towards the guest to the tap; towards the world to the
//! uplink, the next hop (ARP or IPv6 neighbour) resolved by
//! `bpf_redirect_neigh`; towards one of the host's own addresses
//! ([`FLOW_F_LOCAL`], `--allow-host`) into loopback's ingress, where the
//! host stack delivers it. Such flows use the gateway's address as their
//! NAT source, so the host's replies are routed out of the uplink, where
//! the egress program catches them before they leave. Towards a client on
//! the host itself (an inbound forward from loopback, see
//! [`crate::local`]) the entry's egress is loopback without a flag:
//! `bpf_redirect_neigh` to it, the frame marked for this host
//! (`PACKET_HOST`) first, whose route lookup gives the packet the local
//! route so the stack delivers it as its own loopback traffic.
//! Anything the fast path does not handle leaves through the single punt
//! exit with a reason; a packet on the uplink that matches no flow is
//! returned untouched (`TCX_NEXT`), unless it opens a connection to a
//! forwarded host port (a pure SYN, or any UDP datagram, to an (address,
//! protocol, port) in `TG_FWD_PORTS`, IPv4 and IPv6 alike: the trie's keys
//! carry the family and a 16-byte address): that one is punted
//! (`Forward`) for user space to install the inbound flow. Other segments
//! to a forwarded port without a flow reach the host stack, whose
//! bound-but-not-listening socket on the port answers them with an RST.
//! An opening that arrives fragmented is recognised by its first
//! fragment, which carries the ports ([`uplink_fragment`]; for IPv6 only
//! with the fragment header right after the fixed header).
//!
//! The checks that send a packet of a known flow to user space instead:
//! the flow is still in its handshake; a SYN on an established flow; IPv4
//! options; a TTL / hop limit that would expire here; a packet the egress
//! MTU cannot carry (`bpf_check_mtu`, segments of GSO packets included;
//! user space answers with fragmentation needed or packet too big).
//!
//! ICMP: echo requests (from the tap) and replies (from the uplink) are
//! flow packets like any other, keyed by identifier, for ICMPv4 and
//! ICMPv6 alike. Every other ICMP message from the guest is punted (NDP
//! and MLD included: user space answers for the gateway). An ICMP error
//! from the world is ours when the packet it quotes belongs to a flow:
//! punted for translation; every other ICMP from the world goes to the
//! host untouched — above all IPv6 neighbour discovery, which the host
//! needs for its own addresses. Fragments are punted for reassembly: all
//! of the guest's, and of the world's the fragments of a datagram whose
//! first fragment matched a flow ([`uplink_fragment`]), IPv4 and IPv6
//! alike.
//!
//! IPv6 extension headers are never looked past, except a fragment
//! header right after the fixed header (see [`crate::parse`]): from the
//! guest a packet with any other is punted (`Ipv6NoFlow`; `Fragment` for
//! a fragment header right after the fixed header that does not parse),
//! from the world it is not ours — a packet we cannot read fully is never
//! forwarded. An IPv6 fragment is never forwarded either, only punted.

use aya_ebpf::{
    bindings::{BPF_F_INGRESS, TC_ACT_SHOT, TC_ACT_UNSPEC},
    helpers::{bpf_check_mtu, bpf_ktime_get_ns, bpf_redirect, bpf_redirect_neigh},
    maps::lpm_trie::Key,
    programs::TcContext,
};
use datapath_common::{
    ACTIVE, Counter, DIR_FROM_TAP, DIR_FROM_UPLINK, FLOW_F_EVENTS, FLOW_F_LOCAL, FRAG_TRACK_NS,
    FWD_PREFIX_BITS, FlowEntry, FlowKey, FlowState, FragKey, FwdPrefix, Origin, PROTO_TCP,
    PROTO_UDP, PuntReason, TAP_ACTIVE,
};

use crate::{
    maps::{TG_FLOWS, TG_FRAGS, TG_FWD_PORTS, count, mark_active},
    nat,
    parse::{self, Family, Packet, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
    punt::{event, punt},
};

/// `BPF_MTU_CHK_SEGS`: check each GSO segment against the MTU.
const BPF_MTU_CHK_SEGS: u64 = 1;
/// `PACKET_HOST` (`linux/if_packet.h`): a frame for this host.
const PACKET_HOST: u32 = 0;

/// The directional key of a packet as it arrived.
#[inline(always)]
pub(crate) fn key_of(p: &Packet, dir: u8) -> FlowKey {
    FlowKey {
        src: p.src,
        dst: p.dst,
        sport: u16::from_be_bytes(p.sport),
        dport: u16::from_be_bytes(p.dport),
        proto: p.proto,
        family: p.family.key(),
        dir,
        _pad: 0,
    }
}

/// Whether the egress device can carry the packet (GSO segments checked
/// individually).
#[inline(always)]
fn fits_mtu(ctx: &TcContext, ifindex: u32) -> bool {
    let mut mtu_len: u32 = 0;
    // SAFETY: helper call on the program's own context; mtu_len is a live
    // local the helper may write.
    let rc = unsafe {
        bpf_check_mtu(
            ctx.skb.skb.cast(),
            ifindex,
            &mut mtu_len,
            0,
            BPF_MTU_CHK_SEGS,
        )
    };
    rc == 0
}

/// Forwards a packet of a known flow, or punts it.
#[inline(always)]
pub(crate) fn forward(ctx: &TcContext, p: &Packet, e: &mut FlowEntry, origin: Origin) -> i32 {
    let Some(state) = FlowState::from_u8(e.state) else {
        return punt(ctx, origin, PuntReason::Exception);
    };
    if !state.forwards() {
        return punt(ctx, origin, PuntReason::Handshake);
    }
    let flags = p.tcp.flags;
    if (p.is_tcp() && flags & TCP_SYN != 0)
        || p.has_ip_options()
        || p.is_fragment()
        || p.ttl <= 1
        || !fits_mtu(ctx, e.out_ifindex)
    {
        return punt(ctx, origin, PuntReason::Exception);
    }

    // Events carry the packet as it arrived, so they go before the rewrite.
    if p.is_tcp() {
        if flags & TCP_RST != 0 {
            event(ctx, origin, PuntReason::EventRst);
        } else if flags & TCP_FIN != 0 {
            event(ctx, origin, PuntReason::EventFin);
        } else if e.flags & FLOW_F_EVENTS != 0 {
            event(ctx, origin, PuntReason::EventAck);
        }
        if flags & TCP_ACK != 0 && e.last_ack != p.tcp.ack {
            e.last_ack = p.tcp.ack;
        }
        if e.last_win != u32::from(p.tcp.win) {
            e.last_win = u32::from(p.tcp.win);
        }
    }
    let len = u64::from(ctx.len());
    // SAFETY: the entry lives in the map for the duration of the program;
    // other CPUs update these counters atomically too.
    unsafe {
        crate::atomic::add(&raw mut e.packets, 1);
        crate::atomic::add(&raw mut e.bytes, len);
    }
    count(Counter::FastPackets, 1);
    count(Counter::FastBytes, len);
    mark_active(
        e.slot,
        if origin == Origin::Tap {
            ACTIVE | TAP_ACTIVE
        } else {
            ACTIVE
        },
    );

    let towards_guest = origin == Origin::Uplink;
    let local = !towards_guest && e.flags & FLOW_F_LOCAL != 0;
    // Frames for the guest get its MACs; frames into loopback get the
    // all-zero MACs loopback accepts as its own.
    if nat::rewrite(ctx, p, e).is_err()
        || ((towards_guest || local) && nat::set_macs(ctx, e).is_err())
    {
        count(Counter::RedirectError, 1);
        return TC_ACT_SHOT;
    }
    // A host client's flow (guest → a client on the host, through loopback
    // by route lookup): the frame reached the tap addressed to the
    // gateway's MAC, so it is marked for another host (PACKET_OTHERHOST),
    // and loopback's receive path keeps that mark (the all-zero MAC the
    // neighbour layer writes is loopback's own) for IP to drop. It is for
    // this host.
    if !towards_guest
        && !local
        && e.out_ifindex == datapath_common::LOOPBACK_IFINDEX
        && ctx.change_type(PACKET_HOST).is_err()
    {
        count(Counter::RedirectError, 1);
        return TC_ACT_SHOT;
    }
    // SAFETY: plain helper calls; a null params pointer with length 0 asks
    // the kernel to resolve the next hop from the routing table.
    let rc = unsafe {
        if towards_guest {
            bpf_redirect(e.out_ifindex, 0)
        } else if local {
            bpf_redirect(e.out_ifindex, BPF_F_INGRESS as u64)
        } else {
            bpf_redirect_neigh(e.out_ifindex, core::ptr::null_mut(), 0, 0)
        }
    };
    if rc == i64::from(TC_ACT_SHOT) {
        count(Counter::RedirectError, 1);
    }
    rc as i32
}

/// A frame from the guest (IPv4 or IPv6, as its EtherType says): forward
/// it if it belongs to an established flow, punt it otherwise (the guest's
/// frames never reach the host stack). Fragments go to user space's
/// reassembly; of ICMP, only echo requests can belong to a flow (every
/// other message is for user space).
#[inline(always)]
pub fn from_tap(ctx: &TcContext, family: Family) -> i32 {
    let Some(p) = parse::l4(ctx, family) else {
        let reason = if family == Family::V6 && parse::ipv6_is_fragment(ctx) {
            PuntReason::Fragment
        } else {
            family.no_flow()
        };
        return punt(ctx, Origin::Tap, reason);
    };
    if p.is_fragment() {
        return punt(ctx, Origin::Tap, PuntReason::Fragment);
    }
    if p.is_icmp() && !p.is_echo_request() {
        return punt(ctx, Origin::Tap, family.no_flow());
    }
    let key = key_of(&p, DIR_FROM_TAP);
    match TG_FLOWS.get_ptr_mut(&key) {
        // SAFETY: the pointer comes from the map lookup and stays valid
        // for the duration of the program (RCU).
        Some(e) => forward(ctx, &p, unsafe { &mut *e }, Origin::Tap),
        None => punt(ctx, Origin::Tap, family.no_flow()),
    }
}

/// A packet from the world (or, on the uplink's egress, from the host to a
/// host-local flow): forward or punt it if it belongs to one of our flows;
/// anything else continues untouched, as if nothing were attached.
/// Ours are: packets matching a flow entry (of ICMP, echo replies), ICMP
/// errors quoting a packet of a flow (punted for translation), fragments
/// of datagrams of a flow ([`uplink_fragment`]) and openings of
/// forwarded ports (either family, [`opens_forward`]).
#[inline(always)]
pub fn from_uplink(ctx: &TcContext, family: Family) -> i32 {
    let Some(p) = parse::l4(ctx, family) else {
        // An ICMP message too short to read cannot be shown to be about a
        // flow of ours: the host stack judges it, we count it.
        if parse::l3_proto(ctx, family) == Some(family.icmp_proto()) {
            count(Counter::IcmpUnparsed, 1);
        }
        return not_ours();
    };
    if p.is_fragment() {
        return uplink_fragment(ctx, &p);
    }
    if p.is_icmp_error() {
        return icmp_error(ctx, &p);
    }
    if p.is_icmp() && !p.is_echo_reply() {
        return not_ours();
    }
    let key = key_of(&p, DIR_FROM_UPLINK);
    match TG_FLOWS.get_ptr_mut(&key) {
        // SAFETY: as in from_tap.
        Some(e) => forward(ctx, &p, unsafe { &mut *e }, Origin::Uplink),
        None if opens_forward(&p) => punt(ctx, Origin::Uplink, PuntReason::Forward),
        None => not_ours(),
    }
}

/// The verdict for a packet that is not ours: continue as if no program
/// were attached (`TCX_NEXT`).
#[inline(always)]
fn not_ours() -> i32 {
    count(Counter::UplinkNotOurs, 1);
    TC_ACT_UNSPEC
}

/// An ICMP(v6) error from the world: punted when the packet it quotes
/// belongs to one of our flows (user space translates outer and inner
/// headers for the guest), left alone otherwise. A quote too short to read
/// (or, for IPv6, with extension headers) cannot be ours to judge: it goes
/// on to the host stack, counted.
#[inline(always)]
fn icmp_error(ctx: &TcContext, p: &Packet) -> i32 {
    let Some(q) = parse::icmp_quote(ctx, p) else {
        count(Counter::IcmpUnparsed, 1);
        return not_ours();
    };
    let key = FlowKey {
        src: q.dst,
        dst: q.src,
        sport: u16::from_be_bytes(q.dport),
        dport: u16::from_be_bytes(q.sport),
        proto: q.proto,
        family: p.family.key(),
        dir: DIR_FROM_UPLINK,
        _pad: 0,
    };
    if TG_FLOWS.get_ptr(&key).is_some() {
        punt(ctx, Origin::Uplink, PuntReason::IcmpError)
    } else {
        not_ours()
    }
}

/// A fragment arriving from the world: IPv4, or IPv6 with its fragment
/// header right after the fixed header (with the header elsewhere it does
/// not parse and is not ours). Only the first fragment of a datagram
/// (offset 0) carries ports: if it belongs to a flow (or opens a
/// forwarded port), the datagram is entered in `TG_FRAGS` and the
/// fragment punted; later fragments are punted when their datagram is
/// there and recent ([`FRAG_TRACK_NS`]). The datagram is named as each
/// family's reassembly names it: IPv4 by addresses, protocol and 16-bit
/// identification, IPv6 by addresses and 32-bit identification (its later
/// fragments' next header may differ from the first's). User space
/// reassembles. A later fragment that overtakes its first fragment is not
/// recognised and reaches the host stack, which discards it when its
/// reassembly times out.
#[inline(always)]
fn uplink_fragment(ctx: &TcContext, p: &Packet) -> i32 {
    let fkey = FragKey {
        src: p.src,
        dst: p.dst,
        id: p.frag_id,
        proto: match p.family {
            Family::V4 => p.proto,
            Family::V6 => 0,
        },
        family: p.family.key(),
        _pad: [0; 2],
    };
    // SAFETY: plain helper call without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    if p.is_later_fragment() {
        return match TG_FRAGS.get_ptr(&fkey) {
            // SAFETY: the pointer comes from the map lookup (RCU).
            Some(t) if now.wrapping_sub(unsafe { *t }) < FRAG_TRACK_NS => {
                punt(ctx, Origin::Uplink, PuntReason::Fragment)
            }
            _ => not_ours(),
        };
    }
    if p.is_icmp() && !p.is_echo_reply() {
        return not_ours();
    }
    let key = key_of(p, DIR_FROM_UPLINK);
    if TG_FLOWS.get_ptr(&key).is_none() && !opens_forward(p) {
        return not_ours();
    }
    if TG_FRAGS.insert(&fkey, &now, 0).is_ok() {
        count(Counter::FragsTracked, 1);
    }
    punt(ctx, Origin::Uplink, PuntReason::Fragment)
}

/// Whether a packet that matched no flow opens one to a forwarded port: a
/// pure SYN (TCP) or any datagram (UDP) to a port `TG_FWD_PORTS` covers for
/// its family and destination address (IPv4 or IPv6; the packet's 16-byte
/// address is already in the trie's form, an IPv4 address in the first
/// four bytes).
#[inline(always)]
pub(crate) fn opens_forward(p: &Packet) -> bool {
    let opening = match p.proto {
        PROTO_TCP => p.tcp.flags & (TCP_SYN | TCP_ACK | TCP_RST | TCP_FIN) == TCP_SYN,
        PROTO_UDP => true,
        _ => false,
    };
    if !opening {
        return false;
    }
    // Entries match family and address exactly (see FwdPrefix): never a
    // packet merely routed through the host, never multicast or broadcast.
    let key = Key::new(
        FWD_PREFIX_BITS,
        FwdPrefix {
            family: p.family.key(),
            addr: p.dst,
            proto: p.proto,
            port: p.dport,
        },
    );
    TG_FWD_PORTS.get(&key).is_some()
}
