//! Loopback's ingress: clients on the host itself of forwarded ports.
//!
//! # Theory of operation
//!
//! A process on the host that connects to a forwarded port at `127.0.0.1`,
//! `::1` or one of the host's own addresses never crosses the uplink: its
//! packets go out of loopback and come straight back in at loopback's
//! ingress, where `tg_lo_ingress` (attached while ports are forwarded)
//! sees them — and every other packet the host sends itself, which must
//! stay exactly as harmless as no program at all.
//!
//! So the program takes only what is provably ours, on keys of their own
//! direction ([`DIR_FROM_LO`]: a packet from the uplink never matches a
//! host client's entry, whatever addresses it claims, nor a loopback
//! packet an uplink entry):
//!
//! * a packet matching a `DIR_FROM_LO` entry (the client's side of a flow
//!   user space installed) goes the way of any world → guest packet
//!   ([`crate::flow::forward`]: rewritten to `gateway:NAT port → guest`, the
//!   guest's MACs, redirected to the tap; handshakes and exceptions
//!   punted);
//! * a pure SYN or a UDP datagram that matches no entry but is addressed to
//!   a forwarded (address, protocol, port) — user space publishes
//!   `127.0.0.1` and `::1` too for rules without an address — is punted as
//!   `Forward`; the punt record's ifindex (loopback's) tells user space it
//!   came from the host. Not when its *source* is a forwarded port as well:
//!   the forwarded ports are held by tapgate's reservations, so no host
//!   socket sends from one — such a packet is a guest's reply that tapgate
//!   itself delivered through loopback (to a client whose own port happens
//!   to be forwarded, possible with `--no-reserve-ports`), never an
//!   opening;
//! * an ICMP error quoting a packet of such a flow (the host's port
//!   unreachable for a guest's datagram to a client that went away) is
//!   punted for translation;
//! * everything else — fragments (loopback's 64 KiB MTU carries any
//!   datagram whole), other ICMP, unrelated traffic, and the guest's
//!   packets tapgate redirects to the host (they carry the flow's
//!   `nat → client` addresses, which no `DIR_FROM_LO` key has, and are
//!   never pure SYNs) — continues untouched (`TCX_NEXT`), counted as
//!   [`Counter::LoNotOurs`].
//!
//! The guest's direction of such a flow does not come through here on its
//! way in: its entry leaves the tap program by `bpf_redirect_neigh` to
//! loopback, whose route lookup attaches the host's local route, so the
//! stack delivers a packet with a local (or `127.0.0.1`) source and
//! destination like its own loopback traffic. (Redirected into loopback's
//! *ingress* instead, as host-local flows of `--allow-host` are, IPv4
//! would drop it as a martian: a local source, or a loopback destination,
//! arriving without a route.) The tap program marks such a frame
//! `PACKET_HOST` first: it reached the tap addressed to the gateway's MAC
//! (`PACKET_OTHERHOST`), and loopback's receive path keeps the mark.
//!
//! The guest reaching its own forwarded port at a host address
//! (`--allow-host`) comes back here too, from the gateway's address: user
//! space refuses that opening (an RST), as the port's reservation did.

use aya_ebpf::{bindings::TC_ACT_UNSPEC, maps::lpm_trie::Key, programs::TcContext};
use datapath_common::{
    Counter, DIR_FROM_LO, FWD_PREFIX_BITS, FlowKey, FwdPrefix, Origin, PuntReason,
};

use crate::{
    flow::{forward, key_of, opens_forward},
    maps::{TG_FLOWS, TG_FWD_PORTS, count},
    parse::{self, Family, Packet},
    punt::punt,
};

/// A packet on loopback's ingress (IPv4 or IPv6, as its EtherType says):
/// forward or punt it if it belongs to a host client's flow or opens one;
/// anything else continues untouched.
#[inline(always)]
pub fn from_lo(ctx: &TcContext, family: Family) -> i32 {
    let Some(p) = parse::l4(ctx, family) else {
        return not_ours();
    };
    if p.is_fragment() {
        return not_ours();
    }
    if p.is_icmp_error() {
        return icmp_error(ctx, &p);
    }
    if p.is_icmp() {
        // No echo flows here: a ping of a local address is the host's.
        return not_ours();
    }
    let key = key_of(&p, DIR_FROM_LO);
    match TG_FLOWS.get_ptr_mut(&key) {
        // SAFETY: the pointer comes from the map lookup and stays valid
        // for the duration of the program (RCU).
        Some(e) => forward(ctx, &p, unsafe { &mut *e }, Origin::Uplink),
        None if opens_forward(&p) && !from_forwarded_port(&p) => {
            punt(ctx, Origin::Uplink, PuntReason::Forward)
        }
        None => not_ours(),
    }
}

/// The verdict for a packet that is not ours: continue as if no program
/// were attached (`TCX_NEXT`).
#[inline(always)]
fn not_ours() -> i32 {
    count(Counter::LoNotOurs, 1);
    TC_ACT_UNSPEC
}

/// Whether the packet's source (address, protocol, port) is a forwarded
/// port: then it is a reply from one (see the module documentation).
#[inline(always)]
fn from_forwarded_port(p: &Packet) -> bool {
    let key = Key::new(
        FWD_PREFIX_BITS,
        FwdPrefix {
            family: p.family.key(),
            addr: p.src,
            proto: p.proto,
            port: p.sport,
        },
    );
    TG_FWD_PORTS.get(&key).is_some()
}

/// An ICMP(v6) error on loopback: punted when the packet it quotes (sent
/// by tapgate to a host client) belongs to a host client's flow, left
/// alone otherwise.
#[inline(always)]
fn icmp_error(ctx: &TcContext, p: &Packet) -> i32 {
    let Some(q) = parse::icmp_quote(ctx, p) else {
        return not_ours();
    };
    let key = FlowKey {
        src: q.dst,
        dst: q.src,
        sport: u16::from_be_bytes(q.dport),
        dport: u16::from_be_bytes(q.sport),
        proto: q.proto,
        family: p.family.key(),
        dir: DIR_FROM_LO,
        _pad: 0,
    };
    if TG_FLOWS.get_ptr(&key).is_some() {
        punt(ctx, Origin::Uplink, PuntReason::IcmpError)
    } else {
        not_ours()
    }
}
