//! TCP in the slow path: handshakes, RSTs, and the half-close state machine.
//!
//! # Theory of operation
//!
//! **Opening.** A guest SYN (no ACK) for no known flow is checked against
//! the policy, gets a flow in `Handshake` (both map entries punt every
//! packet) and is translated to the world. A retransmitted SYN (the flow
//! still in `Handshake`) is translated and sent again. The world's SYN-ACK
//! moves both entries to `Established` *before* the translated SYN-ACK is
//! queued for the guest, so the guest's ACK already finds the kernel
//! forwarding. Anything else of a handshaking flow (the guest's ACK racing
//! the state update, data, an RST) is translated by the slow path; an RST
//! from either side removes the flow.
//!
//! An inbound forward (`inbound.rs`) is opened by the world's SYN instead;
//! its handshake completes with the guest's SYN-ACK, which likewise moves
//! both entries to `Established` before it is translated to the world.
//!
//! A pure SYN on a flow that is past its handshake (the kernel punts it as
//! an exception) is either a late duplicate of the opening SYN (same ISN:
//! forwarded, harmless) or a new connection reusing the guest's port after
//! the old one was forgotten (guest reboot, TIME-WAIT reuse): the old flow
//! is reset towards the world — `seq` = the world's last ACK, which the
//! kernel keeps in the world → guest entry — removed, and a fresh flow is
//! built for the new SYN.
//!
//! **Closing** (the seed PR's states, driven by the kernel's FIN events and
//! by FINs the slow path forwards itself). The state is a function of the
//! FINs seen: none → `Established`, the guest's → `FinWait`, the world's →
//! `CloseWait`, both → `LastAck`; it is mirrored into both entries, and the
//! kernel keeps forwarding in all of them. Each FIN's end
//! (`seq + payload + 1`, from the IP and TCP length fields since event
//! snaps are truncated) is the ACK number that acknowledges it; ACKs are
//! compared in sequence space. On entering `LastAck` the entries get
//! [`FLOW_F_EVENTS`](datapath_common::FLOW_F_EVENTS), then both entries'
//! `last_ack` are read (only when the entry forwarded a packet, so the
//! field is meaningful): an ACK the kernel forwarded before the flag was
//! set is not missed. If the kernel's own `last_ack` write races the
//! flag's read-modify-write the worst case is the `LastAck` timeout, never
//! an early reap. The flow is reaped when both FINs are acknowledged.
//!
//! **Unknown segments.** A guest segment for no flow that is neither an RST
//! nor a pure SYN is answered with an RST as from the remote, per RFC 9293
//! §3.10.7.1 (the passt seed): `seq = SEG.ACK` if it has an ACK, else
//! `seq = 0, ack = SEG.SEQ + SEG.LEN` with RST|ACK. An RST for no flow is
//! dropped. Segments from the world to a NAT port without a flow never get
//! here: they miss the uplink map and the host kernel RSTs them.

use std::time::Instant;

use datapath_common::{FlowState, PROTO_TCP};
use log::{debug, info, warn};
use smoltcp::wire::{EthernetAddress, Icmpv4DstUnreachable};

use super::{
    DropReason, FlowManager, FlowMaps, NatPorts, Output, Side,
    packet::{self, IcmpError, Packet, TcpSeg, seq_ge},
    policy::{Denial, Verdict},
    store::tap_key,
    table::Flow,
};

/// The state a past-handshake flow is in given the FINs seen so far.
pub(super) fn closing_state(flow: &Flow) -> FlowState {
    match (flow.guest_fin.is_some(), flow.world_fin.is_some()) {
        (false, false) => FlowState::Established,
        (true, false) => FlowState::FinWait,
        (false, true) => FlowState::CloseWait,
        (true, true) => FlowState::LastAck,
    }
}

impl<M: FlowMaps, P: NatPorts> FlowManager<M, P> {
    /// A TCP segment from the guest.
    pub(super) fn guest_tcp(
        &mut self,
        pkt: &Packet<'_>,
        seg: TcpSeg,
        guest_mac: EthernetAddress,
        now: Instant,
        out: &mut Vec<Output>,
    ) -> Result<(), DropReason> {
        let key = tap_key(pkt.src, pkt.dst, seg.sport, seg.dport, PROTO_TCP);
        if let Some(slot) = self.table.by_tap(&key) {
            let (state, isn) = self
                .table
                .get(slot)
                .map(|f| (f.state, f.guest_isn))
                .ok_or(DropReason::UnknownFlow)?;
            if state == FlowState::Handshake && seg.syn && seg.ack.is_some() && !seg.rst {
                // The guest accepted an inbound forward's SYN: established
                // in the kernel before the world sees the SYN-ACK.
                let next = self.table.get(slot).map(closing_state);
                if let Some(f) = self.table.get_mut(slot) {
                    f.guest_isn = seg.seq;
                }
                if let Some(next) = next {
                    self.set_state(slot, next, now);
                }
            }
            if !seg.is_syn_only() {
                // A packet the kernel punted as an exception is too big
                // for the uplink: forward_to_world fragments it or answers
                // "fragmentation needed".
                self.forward_to_world(slot, pkt, out)?;
                self.after_segment(slot, Side::Guest, &seg, now);
                return Ok(());
            }
            if state == FlowState::Handshake {
                self.stats.syn_retransmits += 1;
                if let Some(f) = self.table.get_mut(slot) {
                    f.guest_isn = seg.seq;
                }
                return self.forward_to_world(slot, pkt, out);
            }
            if seg.seq == isn {
                // The opening SYN again, crossing our SYN-ACK.
                return self.forward_to_world(slot, pkt, out);
            }
            info!(
                "flow: new connection {}:{} -> {}:{} reuses a live flow; replacing it",
                pkt.src, seg.sport, pkt.dst, seg.dport
            );
            self.reset_world_side(slot, out);
            self.stats.flows_replaced += 1;
            self.remove_flow(slot, "replaced by a new SYN");
        }
        if seg.rst {
            return Err(DropReason::UnknownRst);
        }
        if !seg.is_syn_only() {
            if !super::is_unicast(pkt.dst) {
                return Err(DropReason::UnknownFlow);
            }
            debug!(
                "flow: RST for unknown {}:{} -> {}:{}",
                pkt.src, seg.sport, pkt.dst, seg.dport
            );
            self.rst_to_guest(pkt, &seg, guest_mac, out);
            return Ok(());
        }
        self.new_tcp_flow(pkt, seg, guest_mac, now, out)
    }

    fn new_tcp_flow(
        &mut self,
        pkt: &Packet<'_>,
        seg: TcpSeg,
        guest_mac: EthernetAddress,
        now: Instant,
        out: &mut Vec<Output>,
    ) -> Result<(), DropReason> {
        let world = match self.policy.check(pkt.dst_sock(), now) {
            Verdict::Allow(w) => w,
            Verdict::Deny(d) => return self.deny_tcp(d, pkt, &seg, guest_mac, out),
        };
        match self.install(pkt, world, guest_mac, FlowState::Handshake, seg.seq, now) {
            Ok(slot) => self.forward_to_world(slot, pkt, out),
            Err(
                e @ (DropReason::NoRoute
                | DropReason::HostUnreachable
                | DropReason::RouteProhibited
                | DropReason::Blackhole),
            ) => {
                self.unreachable_after(e, pkt, guest_mac, out);
                Err(e)
            }
            Err(e) => {
                self.rst_to_guest(pkt, &seg, guest_mac, out);
                Err(e)
            }
        }
    }

    fn deny_tcp(
        &mut self,
        denial: Denial,
        pkt: &Packet<'_>,
        seg: &TcpSeg,
        guest_mac: EthernetAddress,
        out: &mut Vec<Output>,
    ) -> Result<(), DropReason> {
        debug!(
            "flow: tcp {}:{} -> {}:{} denied ({denial:?})",
            pkt.src, seg.sport, pkt.dst, seg.dport
        );
        match denial {
            Denial::Silent => {
                self.stats.policy_denied += 1;
                Ok(())
            }
            Denial::Prohibited => {
                // As a router's reject rule: "communication administratively
                // prohibited", which aborts the guest's connect at once.
                self.stats.policy_denied += 1;
                let kind = IcmpError::Unreachable(Icmpv4DstUnreachable::CommProhibited);
                self.icmp_to_guest(self.gateway_for(pkt.src), pkt, kind, guest_mac, out);
                Ok(())
            }
            Denial::Closed => {
                // A gateway port nothing serves: closed, as a host's.
                self.stats.policy_denied += 1;
                self.rst_to_guest(pkt, seg, guest_mac, out);
                Ok(())
            }
            Denial::DnsUnavailable => {
                self.rst_to_guest(pkt, seg, guest_mac, out);
                Err(DropReason::DnsUnavailable)
            }
        }
    }

    /// A TCP segment from the world for the flow in `slot`.
    pub(super) fn world_tcp(
        &mut self,
        slot: u32,
        pkt: &Packet<'_>,
        seg: TcpSeg,
        now: Instant,
        out: &mut Vec<Output>,
    ) -> Result<(), DropReason> {
        let flow = self.table.get(slot).ok_or(DropReason::UnknownFlow)?;
        if flow.state == FlowState::Handshake && seg.syn && seg.ack.is_some() && !seg.rst {
            // Established in the kernel before the guest sees the SYN-ACK.
            let next = closing_state(flow);
            if let Some(f) = self.table.get_mut(slot) {
                f.world_isn = Some(seg.seq);
            }
            self.set_state(slot, next, now);
        }
        self.forward_to_guest(slot, pkt, out)?;
        self.after_segment(slot, Side::World, &seg, now);
        Ok(())
    }

    /// Close bookkeeping for a segment of the flow in `slot` that went
    /// through (forwarded by the kernel or by us) from `side`.
    pub(super) fn after_segment(&mut self, slot: u32, side: Side, seg: &TcpSeg, now: Instant) {
        if seg.rst {
            self.stats.resets += 1;
            self.remove_flow(slot, "rst");
            return;
        }
        if seg.fin {
            self.note_fin(slot, side, seg.seq.wrapping_add(seg.seq_len()), now);
        }
        if let Some(ack) = seg.ack {
            self.note_ack(slot, side, ack);
        }
        self.check_reap(slot);
    }

    /// A FIN from `side` ending at `end` (the ACK number acknowledging it).
    fn note_fin(&mut self, slot: u32, side: Side, end: u32, now: Instant) {
        let Some(flow) = self.table.get_mut(slot) else {
            return;
        };
        if !flow.is_tcp() {
            return;
        }
        match side {
            Side::Guest => flow.guest_fin.get_or_insert(end),
            Side::World => flow.world_fin.get_or_insert(end),
        };
        if flow.state == FlowState::Handshake {
            return;
        }
        let next = closing_state(flow);
        if next == flow.state {
            return;
        }
        debug!(
            "flow: tcp {} -> {}: FIN from the {}",
            flow.guest,
            flow.remote,
            if side == Side::Guest {
                "guest"
            } else {
                "world"
            }
        );
        self.set_state(slot, next, now);
        if next == FlowState::LastAck {
            self.catch_up_acks(slot);
        }
    }

    /// An ACK number sent by `side`.
    fn note_ack(&mut self, slot: u32, side: Side, ack: u32) {
        let Some(flow) = self.table.get_mut(slot) else {
            return;
        };
        match side {
            Side::Guest => {
                if flow.world_fin.is_some_and(|end| seq_ge(ack, end)) {
                    flow.world_fin_acked = true;
                }
            }
            Side::World => {
                if flow.guest_fin.is_some_and(|end| seq_ge(ack, end)) {
                    flow.guest_fin_acked = true;
                }
            }
        }
    }

    /// Reads the ACK numbers the kernel last forwarded in each direction.
    fn catch_up_acks(&mut self, slot: u32) {
        let Some(flow) = self.table.get(slot) else {
            return;
        };
        for (key, side) in [
            (flow.tap_key(), Side::Guest),
            (flow.uplink_key(), Side::World),
        ] {
            match self.maps.get(&key) {
                // `last_ack` is only meaningful once the kernel forwarded
                // something in that direction.
                Ok(Some(e)) if e.packets > 0 => self.note_ack(slot, side, e.last_ack),
                Ok(_) => {}
                Err(e) => {
                    warn!("flow: reading slot {slot}'s entry: {e}");
                    self.stats.map_errors += 1;
                }
            }
        }
    }

    /// Reaps the flow if both FINs are acknowledged.
    fn check_reap(&mut self, slot: u32) {
        let Some(flow) = self.table.get(slot) else {
            return;
        };
        if flow.state == FlowState::LastAck && flow.guest_fin_acked && flow.world_fin_acked {
            self.stats.tcp_closed_cleanly += 1;
            self.remove_flow(slot, "closed");
        }
    }

    /// Sends an RST to the world for the flow in `slot`, if the kernel has
    /// seen the world's ACK number (the sequence number it expects).
    fn reset_world_side(&mut self, slot: u32, out: &mut Vec<Output>) {
        let Some(flow) = self.table.get(slot) else {
            return;
        };
        let (nat, world) = (flow.nat, flow.world);
        match self.maps.get(&flow.uplink_key()) {
            Ok(Some(e)) if e.packets > 0 => {
                out.push(Output::ToWorld(packet::tcp_rst(
                    nat, world, e.last_ack, None,
                )));
                self.stats.rsts_sent += 1;
            }
            Ok(_) => {}
            Err(e) => {
                warn!("flow: reading slot {slot}'s entry: {e}");
                self.stats.map_errors += 1;
            }
        }
    }

    /// Queues for the guest the RST answering `seg` as from its destination.
    fn rst_to_guest(
        &mut self,
        pkt: &Packet<'_>,
        seg: &TcpSeg,
        guest_mac: EthernetAddress,
        out: &mut Vec<Output>,
    ) {
        let ip = packet::rst_reply(pkt.src, pkt.dst, seg);
        out.push(Output::ToGuest(packet::ethernet_frame(
            self.guest.gateway_mac,
            guest_mac,
            &ip,
        )));
        self.stats.rsts_sent += 1;
    }
}
