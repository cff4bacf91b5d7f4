//! UDP in the slow path: flow creation, denials and idle expiry.
//!
//! # Theory of operation
//!
//! UDP has no handshake: the first datagram from the guest to an allowed
//! destination installs both map entries directly as `Established` and is
//! translated here; the kernel forwards the rest, replies included. An
//! empty datagram (a 42-byte frame) is as good as any. A datagram for an
//! existing flow that still reaches user space (punted before the entries
//! were in place) is translated too.
//!
//! Refused destinations get an ICMP error from the gateway: communication
//! administratively prohibited (type 3 code 13) for the policy, port
//! unreachable from the gateway's address for a gateway port without a
//! service (and for DNS without an upstream), net or host unreachable (or
//! prohibited) as the host's routing refuses the destination; broadcast
//! and multicast are dropped silently. A datagram larger than the uplink's
//! MTU is fragmented (DF clear) or refused with "fragmentation needed"
//! (DF set) by `forward_to_world`.
//!
//! **Idle expiry.** UDP flows end by silence. Every `udp_timeout / 4` the
//! scan reads each UDP flow's activity word: a set `ACTIVE` bit (any packet
//! the kernel forwarded, either direction) means activity since the last
//! scan — the flow's `last_seen` becomes the scan time and the bits are
//! cleared; a flow whose bit stayed clear for `udp_timeout` since
//! `last_seen` is removed. With the last packet at `t`, the first scan
//! after it is before `t + timeout/4`, so the flow goes between
//! `t + timeout` and `t + 1.25 × timeout` (plus the tick's one second).
//! Only UDP slots are cleared here; TCP slots belong to the clock
//! algorithm.

use std::time::Instant;

use datapath_common::{ACTIVE, FlowState, PROTO_UDP, TAP_ACTIVE};
use log::debug;
use smoltcp::wire::{EthernetAddress, Icmpv4DstUnreachable};

use super::{
    DropReason, FlowManager, FlowMaps, NatPorts, Output,
    packet::{IcmpError, Packet},
    policy::{Denial, Verdict},
    store::tap_key,
};

impl<M: FlowMaps, P: NatPorts> FlowManager<M, P> {
    /// A UDP datagram from the guest.
    pub(super) fn guest_udp(
        &mut self,
        pkt: &Packet<'_>,
        guest_mac: EthernetAddress,
        now: Instant,
        out: &mut Vec<Output>,
    ) -> Result<(), DropReason> {
        let (sport, dport) = pkt.ports();
        let key = tap_key(pkt.src, pkt.dst, sport, dport, PROTO_UDP);
        if let Some(slot) = self.table.by_tap(&key) {
            // Punted as an exception: too big for the uplink, which
            // forward_to_world fragments or answers with "fragmentation
            // needed".
            if let Some(f) = self.table.get_mut(slot) {
                f.last_seen = now;
            }
            return self.forward_to_world(slot, pkt, out);
        }
        let world = match self.policy.check(pkt.dst_sock(), now) {
            Verdict::Allow(w) => w,
            Verdict::Deny(d) => return self.deny_udp(d, pkt, guest_mac, out),
        };
        match self.install(pkt, world, guest_mac, FlowState::Established, 0, now) {
            Ok(slot) => self.forward_to_world(slot, pkt, out),
            Err(e) => {
                self.unreachable_after(e, pkt, guest_mac, out);
                Err(e)
            }
        }
    }

    fn deny_udp(
        &mut self,
        denial: Denial,
        pkt: &Packet<'_>,
        guest_mac: EthernetAddress,
        out: &mut Vec<Output>,
    ) -> Result<(), DropReason> {
        debug!(
            "flow: udp {} -> {} denied ({denial:?})",
            pkt.src,
            pkt.dst_sock()
        );
        match denial {
            Denial::Silent => {
                self.stats.policy_denied += 1;
                Ok(())
            }
            Denial::Prohibited => {
                self.stats.policy_denied += 1;
                let kind = IcmpError::Unreachable(Icmpv4DstUnreachable::CommProhibited);
                self.icmp_to_guest(self.gateway_for(pkt.src), pkt, kind, guest_mac, out);
                Ok(())
            }
            Denial::Closed => {
                self.stats.policy_denied += 1;
                let kind = IcmpError::Unreachable(Icmpv4DstUnreachable::PortUnreachable);
                self.icmp_to_guest(pkt.dst, pkt, kind, guest_mac, out);
                Ok(())
            }
            Denial::DnsUnavailable => {
                let kind = IcmpError::Unreachable(Icmpv4DstUnreachable::PortUnreachable);
                self.icmp_to_guest(pkt.dst, pkt, kind, guest_mac, out);
                Err(DropReason::DnsUnavailable)
            }
        }
    }

    /// The UDP idle scan (see the module documentation); a no-op until
    /// `udp_timeout / 4` has passed since the last scan.
    pub(super) fn scan_udp(&mut self, now: Instant) {
        let period = self.udp_timeout / 4;
        if self
            .last_udp_scan
            .is_some_and(|last| now.saturating_duration_since(last) < period)
        {
            return;
        }
        self.last_udp_scan = Some(now);
        for slot in self.table.udp_slots() {
            if self.maps.activity(slot) & ACTIVE != 0 {
                self.maps.clear_activity(slot, ACTIVE | TAP_ACTIVE);
                if let Some(f) = self.table.get_mut(slot) {
                    f.last_seen = now;
                }
                continue;
            }
            let idle = self
                .table
                .get(slot)
                .map(|f| now.saturating_duration_since(f.last_seen));
            if idle.is_some_and(|idle| idle >= self.udp_timeout) {
                self.stats.udp_expired += 1;
                self.remove_flow(slot, "udp idle");
            }
        }
    }
}
