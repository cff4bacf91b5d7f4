//! Rebuilding the flow table from an adopted datapath's kernel maps.
//!
//! # Theory of operation
//!
//! When a daemon restarts on a datapath an earlier one left pinned, the
//! kernel went on forwarding every established flow; only user space's
//! view is gone. Each flow is two map entries (one per direction) that
//! share a slot and together hold everything the [`Flow`] record is made
//! of: the guest → world key names the guest and the address it talked
//! to, its entry the NAT address and the real destination; the world →
//! guest entry adds the guest's MAC; both carry the state. So the table is
//! rebuilt from the maps alone:
//!
//! 1. entries are paired by slot, one per direction; a pair is kept only
//!    if the flow made from it derives exactly the two keys found (the
//!    same code computed them when the flow was installed). Anything else
//!    — an entry without partner, two claims on one slot, a state or
//!    family this build does not know — is an orphan and is removed.
//! 2. the NAT port is held again with a socket bound to it, exactly as a
//!    new flow's is, unless a forwarding rule holds it (an inbound flow).
//!    A host client's flow (its world side keyed in the loopback
//!    program's direction) holds the gateway's port the guest talks to
//!    instead (its `remote`).
//!    A port the host took while no daemon ran cannot be had: the flow
//!    keeps running in the kernel, and the loss is counted.
//! 3. timers restart: a handshake gets a fresh handshake timeout, `LastAck`
//!    a fresh last-ack timeout. What only user space knew is gone — the
//!    FIN sequence numbers of half-closed flows — so such a flow is reaped
//!    by its timeout rather than by its final ACK (never earlier than
//!    before, possibly later). UDP and ICMP flows start a new idle period.
//!
//! The activity bits are left as the kernel set them, so the clock's next
//! scans see the gap's traffic.

use std::{collections::HashMap, net::SocketAddr, time::Instant};

use datapath_common::{
    DIR_FROM_LO, DIR_FROM_TAP, DIR_FROM_UPLINK, FLOW_F_LOCAL, FlowEntry, FlowKey, FlowState,
};
use log::{info, warn};
use smoltcp::wire::EthernetAddress;

use super::{
    FlowManager, FlowMaps, NatLease, NatPorts,
    store::addr_of16,
    table::{Addressing, Flow},
};
use crate::fwd::Proto;

/// What [`FlowManager::adopt`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AdoptReport {
    /// Flows rebuilt.
    pub flows: u64,
    /// Of those, flows whose NAT port could not be held again.
    pub ports_lost: u64,
    /// Entries removed because they made no flow.
    pub orphans: u64,
}

/// The socket address of a map field of `family`.
fn sock(family: u8, addr: &[u8; 16], port: u16) -> Option<SocketAddr> {
    addr_of16(family, addr).map(|ip| SocketAddr::new(ip, port))
}

impl<M: FlowMaps, P: NatPorts> FlowManager<M, P> {
    /// Rebuilds the flow table from the kernel maps (see the module
    /// documentation). Call once, on a fresh manager, before any punt is
    /// handled.
    pub fn adopt(&mut self, now: Instant) -> AdoptReport {
        let mut report = AdoptReport::default();
        let entries = match self.maps.entries() {
            Ok(e) => e,
            Err(e) => {
                warn!("adopt: reading the flow map: {e}");
                self.stats.map_errors += 1;
                return report;
            }
        };
        let mut tap_side: HashMap<u32, Vec<(FlowKey, FlowEntry)>> = HashMap::new();
        let mut uplink_side: HashMap<u32, Vec<(FlowKey, FlowEntry)>> = HashMap::new();
        let mut orphans: Vec<FlowKey> = Vec::new();
        for (key, entry) in entries {
            match key.dir {
                DIR_FROM_TAP => tap_side.entry(entry.slot).or_default().push((key, entry)),
                DIR_FROM_UPLINK | DIR_FROM_LO => uplink_side
                    .entry(entry.slot)
                    .or_default()
                    .push((key, entry)),
                _ => orphans.push(key),
            }
        }
        for (slot, mut taps) in tap_side {
            let ups = uplink_side.remove(&slot).unwrap_or_default();
            let pair = match (taps.as_slice(), ups.as_slice()) {
                ([t], [u]) => Some((*t, *u)),
                _ => None,
            };
            let made = pair.and_then(|(t, u)| self.adopt_pair(t, u, now, &mut report));
            if made.is_none() {
                orphans.extend(taps.drain(..).map(|(k, _)| k));
                orphans.extend(ups.into_iter().map(|(k, _)| k));
            }
        }
        orphans.extend(uplink_side.into_values().flatten().map(|(k, _)| k));
        for key in &orphans {
            if let Err(e) = self.maps.remove(key) {
                warn!("adopt: removing an orphaned entry: {e}");
                self.stats.map_errors += 1;
            }
        }
        report.orphans = orphans.len() as u64;
        self.stats.flows_adopted += report.flows;
        self.stats.adopt_ports_lost += report.ports_lost;
        self.stats.adopt_orphans += report.orphans;
        info!(
            "adopted {} flows from the kernel maps ({} NAT ports lost, {} orphaned entries removed)",
            report.flows, report.ports_lost, report.orphans
        );
        report
    }

    /// Makes a flow of one tap-side and one uplink-side entry, or `None`
    /// when they do not describe one.
    fn adopt_pair(
        &mut self,
        (tk, te): (FlowKey, FlowEntry),
        (uk, ue): (FlowKey, FlowEntry),
        now: Instant,
        report: &mut AdoptReport,
    ) -> Option<u32> {
        if tk.family != uk.family || tk.proto != uk.proto {
            return None;
        }
        let f = tk.family;
        let state = FlowState::from_u8(te.state)?;
        let proto = tk.proto;
        let nat = sock(f, &te.new_src, te.new_sport)?;
        let slot = te.slot;
        let deadline = match state {
            FlowState::Handshake => now.checked_add(self.handshake_timeout),
            FlowState::LastAck => now.checked_add(self.last_ack_timeout),
            _ => None,
        };
        let mut flow = Flow::new(
            slot,
            Addressing {
                proto,
                guest: sock(f, &tk.src, tk.sport)?,
                remote: sock(f, &tk.dst, tk.dport)?,
                world: sock(f, &te.new_dst, te.new_dport)?,
                nat,
                guest_mac: EthernetAddress(ue.eth_dst),
            },
            NatLease::new(nat.port(), ()),
            state,
            now,
        );
        flow.deadline = deadline;
        flow.host_client = uk.dir == DIR_FROM_LO;
        if flow.tap_key() != tk || flow.uplink_key() != uk || !self.table.claim_slot(slot) {
            return None;
        }
        // An inbound forward's port is held by its rule's reservation; a
        // host client's flow holds the gateway's port it shows the guest.
        let forwarded = Proto::from_ip_proto(proto)
            .is_some_and(|p| self.forwards.rule_for(p, nat.ip(), nat.port()).is_some())
            && te.flags & FLOW_F_LOCAL == 0;
        let held = if flow.host_client {
            Some(flow.remote)
        } else if forwarded {
            None
        } else {
            Some(nat)
        };
        if let Some(held) = held {
            match self.ports.hold(proto, held.ip(), held.port()) {
                Ok(lease) => flow.lease = lease,
                Err(e) => {
                    warn!(
                        "adopt: {} -> {}: NAT port {held} cannot be held again ({e}); the flow goes on",
                        flow.guest, flow.world
                    );
                    report.ports_lost += 1;
                }
            }
        }
        self.table.insert(flow);
        report.flows += 1;
        Some(slot)
    }
}
