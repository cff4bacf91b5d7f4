//! Inbound port forwards: connections and datagrams from the world to a
//! forwarded host port.
//!
//! # Theory of operation
//!
//! The uplink program punts, with `PuntReason::Forward`, a packet that
//! matches no flow and opens one to a forwarded port: a pure SYN, or any
//! UDP datagram (`datapath-ebpf/src/flow.rs`). Here the rule table
//! ([`crate::fwd::FwdTable::lookup`]) gives the guest port, and the flow is
//! built as the mirror image of a guest-initiated one:
//!
//! | field    | guest-initiated           | inbound forward              |
//! |----------|---------------------------|------------------------------|
//! | `guest`  | guest socket              | guest address : guest port   |
//! | `remote` | what the guest addressed  | the world client             |
//! | `world`  | real destination          | the world client             |
//! | `nat`    | host address : NAT port   | forwarded host address:port  |
//!
//! so the world → guest entry DNATs to the guest (the client's address and
//! port are left alone: the guest sees the real client), and the guest →
//! world entry SNATs the guest's replies to the forwarded address and
//! port. The host port is held for the daemon's life by
//! [`crate::fwd::PortReservations`], so the flow's lease holds nothing.
//!
//! **Both families.** The opening's family decides the guest address: an
//! IPv4 opening goes to the guest's configured IPv4 address, an IPv6 one to
//! the guest's *current* IPv6 address (`FlowManager::guest_addr6`, set by
//! the daemon from the guest services: its DHCPv6 address while leased,
//! else the first address it was seen to use). Until one is known an IPv6
//! opening is dropped as `GuestUnknown`, as any opening is before the
//! guest's MAC address is; with IPv6 off for the guest it is
//! `NoForward`. The flow is then an ordinary IPv6 flow (its keys carry the
//! family); the rule lookup, hit counters, `reset_forwarded` and adoption
//! compare the rule's address, if any, with the flow's own, so an IPv4 rule
//! address never matches an IPv6 flow and a rule without an address
//! matches both. A guest that changes its address later keeps the flows
//! opened to the old one; new openings go to the new one.
//!
//! **Clients on the host itself.** A process on the host (or in the pod)
//! connecting to `127.0.0.1:PORT`, `[::1]:PORT` or one of the host's own
//! addresses on a forwarded port — `curl localhost:8080`, as QEMU's
//! `hostfwd`, passt and slirp4netns users do — never crosses the uplink:
//! the loopback program (`datapath-ebpf/src/local.rs`) catches its opening
//! on loopback's ingress and punts it (the daemon calls
//! [`FlowManager::from_host`]). The guest cannot answer `127.0.0.1` (its
//! own loopback) nor tell the host's addresses from the world's, so such a
//! flow differs in one field: its `remote` is the gateway's address of the
//! family (`10.0.2.2`, `fd00::2`) with a NAT port reserved on it as
//! host-local flows do (bound with `IP_FREEBIND`: the host does not own the
//! address), and the guest sees the connection coming from there, as passt
//! shows such clients from its gateway:
//!
//! | field    | from the world               | from the host                |
//! |----------|------------------------------|------------------------------|
//! | `guest`  | guest address : guest port   | guest address : guest port   |
//! | `remote` | the world client             | gateway : NAT port           |
//! | `world`  | the world client             | the host client              |
//! | `nat`    | forwarded host address:port  | forwarded address:port       |
//!
//! The client's side is keyed in the loopback program's direction
//! ([`super::table::Flow::host_client`]), so only packets on loopback's
//! ingress ever match it. The guest's side leaves the tap program by
//! `bpf_redirect_neigh` to loopback (`LOOPBACK_IFINDEX`, no flag): the
//! helper's route lookup gives the packet the host's local route, so the
//! stack delivers `127.0.0.1 → 127.0.0.1` (or host address → itself) to
//! the client's socket like its own loopback traffic — redirected into
//! loopback's ingress, as host-local flows are, IPv4 would drop it as a
//! martian. What the slow path sends the client (the guest's SYN-ACK, RSTs)
//! goes through the raw socket and the host's routing, to loopback as
//! well. The lease holds the gateway's NAT port; the forwarded port is held
//! by its reservation, as for the world's clients. An opening from the
//! gateway's own address is the guest reaching its own forwarded port
//! through a host address (`--allow-host`): refused with an RST, as the
//! reservation refused it before. Openings from the uplink with a loopback
//! address are martians and dropped.
//!
//! A TCP flow starts in `Handshake` with the world's SYN translated to the
//! guest; the guest's SYN-ACK (punted: handshake) moves both entries to
//! `Established` before it is sent on (`tcp.rs`), and from then on the
//! flow runs in the kernel with the same half-close, clock and RST rules as
//! any other. A guest RST (nothing listening on the guest port) goes back
//! to the client and removes the flow; a world SYN retransmission is
//! translated again. A UDP flow is `Established` at once.
//!
//! **Runtime rule changes** (`tapgate rules`): an added rule takes effect
//! for the next opening; a removed rule leaves its flows alone unless
//! asked to reset them ([`FlowManager::reset_forwarded`]): an inbound flow
//! is recognised by its `nat` side being a forwarded port of the rule (an
//! outbound flow's NAT port is never one: forwarded ports are held by
//! their reservations, so the host cannot hand them out).

use std::{
    net::{IpAddr, SocketAddr},
    time::Instant,
};

use datapath_common::{FlowState, LOOPBACK_IFINDEX};
use log::{debug, warn};

use super::{
    DropReason, FlowManager, FlowMaps, NatLease, NatPorts, Output,
    packet::{self, L4, Packet},
    table::{Addressing, Flow},
};
use crate::fwd::{Proto, Rule};

impl<M: FlowMaps, P: NatPorts> FlowManager<M, P> {
    /// An opening for no known flow, punted as `PuntReason::Forward`: from
    /// the world, or with `host` from a client on the host itself (the
    /// loopback program's).
    pub(super) fn inbound(
        &mut self,
        pkt: &Packet<'_>,
        host: bool,
        now: Instant,
        out: &mut Vec<Output>,
    ) -> Result<(), DropReason> {
        // Loopback addresses never come from the world: such a packet on
        // the uplink is a martian the host stack would have dropped.
        if !host && (pkt.src.is_loopback() || pkt.dst.is_loopback()) {
            return Err(DropReason::BadSource);
        }
        // From the gateway's address: the guest itself, through a
        // host-local flow (`--allow-host`), reaching its own forwarded port
        // at a host address. Refused as the port's reservation refused it
        // before there was a loopback program: such a hairpin's guest side
        // would have to go to the uplink's egress, not to loopback.
        if host && pkt.src == self.gateway_for(pkt.src) {
            if let L4::Tcp(seg) = pkt.l4 {
                out.push(Output::ToWorld(packet::rst_reply(pkt.src, pkt.dst, &seg)));
                self.stats.rsts_sent += 1;
            }
            return Err(DropReason::NoForward);
        }
        let (sport, dport) = pkt.ports();
        let (proto, state, world_isn) = match pkt.l4 {
            L4::Tcp(seg) if seg.is_syn_only() => (Proto::Tcp, FlowState::Handshake, Some(seg.seq)),
            // Only pure SYNs are punted for TCP; anything else is stale.
            L4::Tcp(_) => return Err(DropReason::UnknownFlow),
            L4::Udp { .. } => (Proto::Udp, FlowState::Established, None),
            L4::Icmp(_) => return Err(DropReason::UnknownFlow),
        };
        let guest_port = self
            .forwards
            .lookup(proto, pkt.dst, dport)
            .ok_or(DropReason::NoForward)?;
        if pkt.ttl <= 1 {
            return Err(DropReason::TtlExpired);
        }
        let guest_mac = self.guest_mac.ok_or(DropReason::GuestUnknown)?;
        // The guest address of the opening's family: IPv6 goes to the
        // guest's current IPv6 address, once one is known.
        let guest_ip = match pkt.dst {
            IpAddr::V4(_) => IpAddr::V4(self.guest.guest_addr),
            IpAddr::V6(_) if self.guest6.is_none() => return Err(DropReason::NoForward),
            IpAddr::V6(_) => IpAddr::V6(self.guest_addr6.ok_or(DropReason::GuestUnknown)?),
        };
        if !self.table.has_room() {
            return Err(DropReason::TableFull);
        }
        let guest = SocketAddr::new(guest_ip, guest_port);
        let client = SocketAddr::new(pkt.src, sport);
        let (remote, lease, tap_out) = if host {
            // The guest answers the gateway, at a NAT port of the flow's.
            let gateway = self.gateway_for(guest_ip);
            let lease = self.ports.reserve(proto.ip_proto(), gateway).map_err(|e| {
                warn!("flow: reserving a NAT port on {gateway}: {e}");
                DropReason::PortExhausted
            })?;
            let remote = SocketAddr::new(gateway, lease.port());
            (remote, lease, LOOPBACK_IFINDEX)
        } else {
            // The forwarded port is held by the port reservations.
            (client, NatLease::new(dport, ()), self.uplink_ifindex)
        };
        let slot = self.table.alloc_slot().ok_or(DropReason::TableFull)?;
        let mut flow = Flow::new(
            slot,
            Addressing {
                proto: proto.ip_proto(),
                guest,
                remote,
                world: client,
                nat: SocketAddr::new(pkt.dst, dport),
                guest_mac,
            },
            lease,
            state,
            now,
        );
        if state == FlowState::Handshake {
            flow.deadline = now.checked_add(self.handshake_timeout);
        }
        flow.world_isn = world_isn;
        flow.host_client = host;
        debug!(
            "flow: inbound {proto} {client} -> {}:{dport} forwarded to guest port {guest_port}{}",
            pkt.dst,
            if host {
                format!(" (a host client, to the guest as {remote})")
            } else {
                String::new()
            }
        );
        let slot = self.commit_flow(flow, tap_out, 0)?;
        // Counted once the flow exists: hits are flows opened.
        self.forwards.hit(proto, pkt.dst, dport);
        self.stats.forwards_accepted += 1;
        if host {
            self.stats.forwards_from_host += 1;
        }
        self.forward_to_guest(slot, pkt, out)
    }

    /// Resets (TCP: RST to both sides) and removes every inbound flow
    /// opened through one of `rules`; returns how many went.
    pub fn reset_forwarded(&mut self, rules: &[Rule], out: &mut Vec<Output>) -> usize {
        let doomed: Vec<(u32, bool)> = self
            .table
            .iter()
            .filter(|f| {
                rules.iter().any(|r| {
                    r.proto.ip_proto() == f.proto
                        && r.host.contains(f.nat.port())
                        && r.addr.is_none_or(|a| a == f.nat.ip())
                })
            })
            .map(|f| (f.slot, f.is_tcp()))
            .collect();
        for &(slot, tcp) in &doomed {
            if tcp {
                self.reset_both_sides(slot, "forwarding rule removed", out);
            } else {
                self.remove_flow(slot, "forwarding rule removed");
            }
        }
        doomed.len()
    }
}
