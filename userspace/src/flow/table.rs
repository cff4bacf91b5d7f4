//! The user-space flow table: one record per flow, indexed by both of its
//! map keys, with bounded slots and deadlines.
//!
//! # Theory of operation
//!
//! The kernel sees a flow as two map entries (one per direction) sharing an
//! activity slot. User space keeps one [`Flow`] per flow with what the
//! kernel does not need: the NAT lease, the TCP close bookkeeping, timers.
//! The table indexes flows by slot and by both directional keys, so a
//! punted packet or an event finds its flow from either side in O(1).
//!
//! Slots are handed out from a free list, lowest never-used slot first,
//! and never reach `max_flows`: the flow count, hence all of user space's
//! memory for flows, is bounded by the configuration. A removed flow's slot
//! goes back on the free list.
//!
//! Timed states (the handshake, LastAck) put `(deadline, slot)` in an
//! ordered set, so the periodic tick only looks at flows that are due. UDP
//! flows are listed apart for the idle scan.
//!
//! Each [`Flow`] derives its two keys and entries itself, so the entries
//! installed in the kernel and the rewrite the slow path applies to the
//! packets it forwards are computed by the same code. A flow whose world
//! side is a client on the host itself ([`Flow::host_client`]: an inbound
//! forward through loopback) has its world-side key in the loopback
//! program's direction; the table indexes it with the uplink-side keys
//! (the direction is part of the key, so the two never meet).

use std::{
    collections::{BTreeSet, HashMap},
    net::SocketAddr,
    time::Instant,
};

use datapath_common::{FlowEntry, FlowKey, FlowState, PROTO_TCP};
use smoltcp::wire::EthernetAddress;

use super::{
    packet::Rewrite,
    ports::NatLease,
    store::{addr16, lo_key, tap_key, uplink_key},
};

/// One flow as user space tracks it.
#[derive(Debug)]
pub struct Flow {
    /// Activity slot, also the flow's identity in the table.
    pub slot: u32,
    /// IP protocol.
    pub proto: u8,
    /// The guest's address and port.
    pub guest: SocketAddr,
    /// The destination as the guest addressed it.
    pub remote: SocketAddr,
    /// The real destination in the world (the upstream resolver for DNS).
    pub world: SocketAddr,
    /// The host's source address and the NAT port.
    pub nat: SocketAddr,
    /// The guest's MAC address (destination of frames towards it).
    pub guest_mac: EthernetAddress,
    /// The NAT port reservation, released when the flow is dropped.
    pub lease: NatLease,
    /// Current state (mirrored into both map entries).
    pub state: FlowState,
    /// When the flow was created.
    pub created: Instant,
    /// When `state` last changed.
    pub state_since: Instant,
    /// Last time the flow was seen active (UDP idle expiry).
    pub last_seen: Instant,
    /// The guest's initial sequence number (TCP).
    pub guest_isn: u32,
    /// Sequence number acknowledging the guest's FIN, once seen.
    pub guest_fin: Option<u32>,
    /// Sequence number acknowledging the world's FIN, once seen.
    pub world_fin: Option<u32>,
    /// The world acknowledged the guest's FIN.
    pub guest_fin_acked: bool,
    /// The guest acknowledged the world's FIN.
    pub world_fin_acked: bool,
    /// The pending deadline in the table's timer set, if any.
    pub deadline: Option<Instant>,
    /// The world's initial sequence number, from its SYN-ACK (TCP).
    pub world_isn: Option<u32>,
    /// Keepalives sent since the guest last sent anything (the clock's
    /// dead-guest probe count).
    pub keepalives_unanswered: u32,
    /// The world side is a client on the host itself, caught on loopback's
    /// ingress (an inbound forward from `127.0.0.1`, `::1` or a host
    /// address): its key is in the loopback program's direction. Set
    /// before the flow enters the table; it never changes.
    pub host_client: bool,
}

/// Where a flow's packets come from and go: everything of a [`Flow`] that
/// its map entries carry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Addressing {
    /// IP protocol.
    pub proto: u8,
    /// The guest's address and port.
    pub guest: SocketAddr,
    /// The destination as the guest addressed it.
    pub remote: SocketAddr,
    /// The real destination in the world.
    pub world: SocketAddr,
    /// The host's source address and the NAT port.
    pub nat: SocketAddr,
    /// The guest's MAC address.
    pub guest_mac: EthernetAddress,
}

impl Flow {
    /// A flow in `state` from `now` on, with nothing seen yet of its close
    /// and no deadline.
    pub fn new(slot: u32, a: Addressing, lease: NatLease, state: FlowState, now: Instant) -> Self {
        Self {
            slot,
            proto: a.proto,
            guest: a.guest,
            remote: a.remote,
            world: a.world,
            nat: a.nat,
            guest_mac: a.guest_mac,
            lease,
            state,
            created: now,
            state_since: now,
            last_seen: now,
            guest_isn: 0,
            guest_fin: None,
            world_fin: None,
            guest_fin_acked: false,
            world_fin_acked: false,
            deadline: None,
            world_isn: None,
            keepalives_unanswered: 0,
            host_client: false,
        }
    }

    /// The key of the guest → world direction.
    pub fn tap_key(&self) -> FlowKey {
        tap_key(
            self.guest.ip(),
            self.remote.ip(),
            self.guest.port(),
            self.remote.port(),
            self.proto,
        )
    }

    /// The key of the world → guest direction: the uplink program's, or
    /// for a [`Flow::host_client`] the loopback program's.
    pub fn uplink_key(&self) -> FlowKey {
        let (src, dst) = (self.world, self.nat);
        if self.host_client {
            lo_key(src.ip(), dst.ip(), src.port(), dst.port(), self.proto)
        } else {
            uplink_key(src.ip(), dst.ip(), src.port(), dst.port(), self.proto)
        }
    }

    /// The rewrite towards the world: from the NAT address to the real
    /// destination.
    pub fn to_world(&self) -> Rewrite {
        Rewrite {
            src: self.nat,
            dst: self.world,
        }
    }

    /// The rewrite towards the guest: from the address the guest addressed
    /// to the guest.
    pub fn to_guest(&self) -> Rewrite {
        Rewrite {
            src: self.remote,
            dst: self.guest,
        }
    }

    /// The map entry for the guest → world direction.
    pub fn tap_entry(&self, uplink_ifindex: u32, flags: u8) -> FlowEntry {
        entry(
            self.to_world(),
            uplink_ifindex,
            [0; 6],
            [0; 6],
            self.slot,
            self.state,
            flags,
        )
    }

    /// The map entry for the world → guest direction.
    pub fn uplink_entry(
        &self,
        tap_ifindex: u32,
        gateway_mac: EthernetAddress,
        flags: u8,
    ) -> FlowEntry {
        entry(
            self.to_guest(),
            tap_ifindex,
            gateway_mac.0,
            self.guest_mac.0,
            self.slot,
            self.state,
            flags,
        )
    }

    /// Whether this is a TCP flow.
    pub fn is_tcp(&self) -> bool {
        self.proto == PROTO_TCP
    }
}

fn entry(
    rw: Rewrite,
    out_ifindex: u32,
    eth_src: [u8; 6],
    eth_dst: [u8; 6],
    slot: u32,
    state: FlowState,
    flags: u8,
) -> FlowEntry {
    FlowEntry {
        new_src: addr16(rw.src.ip()),
        new_dst: addr16(rw.dst.ip()),
        new_sport: rw.src.port(),
        new_dport: rw.dst.port(),
        out_ifindex,
        eth_src,
        eth_dst,
        slot,
        state: state as u8,
        flags,
        ..FlowEntry::default()
    }
}

/// Bounded slot allocator: a free list plus a high-water mark.
#[derive(Debug)]
struct Slots {
    free: Vec<u32>,
    next: u32,
    max: u32,
}

impl Slots {
    fn alloc(&mut self) -> Option<u32> {
        if let Some(s) = self.free.pop() {
            return Some(s);
        }
        if self.next < self.max {
            self.next += 1;
            return Some(self.next - 1);
        }
        None
    }

    fn release(&mut self, slot: u32) {
        self.free.push(slot);
    }

    /// Takes `slot` itself (a flow adopted from the kernel): slots below
    /// it that were never handed out go on the free list. `false` if the
    /// slot is out of range or taken.
    fn claim(&mut self, slot: u32) -> bool {
        if slot >= self.max {
            return false;
        }
        if slot >= self.next {
            self.free.extend(self.next..slot);
            self.next = slot + 1;
            return true;
        }
        match self.free.iter().position(|s| *s == slot) {
            Some(i) => {
                self.free.swap_remove(i);
                true
            }
            None => false,
        }
    }
}

/// All flows, by slot and by both keys.
#[derive(Debug)]
pub struct FlowTable {
    flows: HashMap<u32, Flow>,
    by_tap: HashMap<FlowKey, u32>,
    by_uplink: HashMap<FlowKey, u32>,
    slots: Slots,
    deadlines: BTreeSet<(Instant, u32)>,
    udp: BTreeSet<u32>,
    /// How many flows are [`Flow::host_client`]s.
    host_clients: usize,
}

impl FlowTable {
    /// An empty table of at most `max_flows` flows.
    pub fn new(max_flows: u32) -> Self {
        Self {
            flows: HashMap::new(),
            by_tap: HashMap::new(),
            by_uplink: HashMap::new(),
            slots: Slots {
                free: Vec::new(),
                next: 0,
                max: max_flows,
            },
            deadlines: BTreeSet::new(),
            udp: BTreeSet::new(),
            host_clients: 0,
        }
    }

    /// Number of flows.
    pub fn len(&self) -> usize {
        self.flows.len()
    }

    /// Whether there are no flows.
    pub fn is_empty(&self) -> bool {
        self.flows.is_empty()
    }

    /// Number of flows of clients on the host itself
    /// ([`Flow::host_client`]).
    pub fn host_clients(&self) -> usize {
        self.host_clients
    }

    /// Takes a free slot, `None` when `max_flows` are in use. The slot must
    /// be given to [`Self::insert`] or back to [`Self::release_slot`].
    pub fn alloc_slot(&mut self) -> Option<u32> {
        self.slots.alloc()
    }

    /// Takes a given slot for a flow adopted from the kernel maps; `false`
    /// if it is out of range or already taken.
    pub fn claim_slot(&mut self, slot: u32) -> bool {
        self.slots.claim(slot)
    }

    /// Returns a slot taken by [`Self::alloc_slot`] but never used.
    pub fn release_slot(&mut self, slot: u32) {
        debug_assert!(!self.flows.contains_key(&slot));
        self.slots.release(slot);
    }

    /// Whether another flow can be added.
    pub fn has_room(&self) -> bool {
        !self.slots.free.is_empty() || self.slots.next < self.slots.max
    }

    /// Adds a flow (its slot from [`Self::alloc_slot`]).
    pub fn insert(&mut self, flow: Flow) {
        let slot = flow.slot;
        self.by_tap.insert(flow.tap_key(), slot);
        self.by_uplink.insert(flow.uplink_key(), slot);
        if !flow.is_tcp() {
            self.udp.insert(slot);
        }
        if let Some(t) = flow.deadline {
            self.deadlines.insert((t, slot));
        }
        if flow.host_client {
            self.host_clients += 1;
        }
        self.flows.insert(slot, flow);
    }

    /// Removes a flow and frees its slot.
    pub fn remove(&mut self, slot: u32) -> Option<Flow> {
        let flow = self.flows.remove(&slot)?;
        self.by_tap.remove(&flow.tap_key());
        self.by_uplink.remove(&flow.uplink_key());
        self.udp.remove(&slot);
        if let Some(t) = flow.deadline {
            self.deadlines.remove(&(t, slot));
        }
        if flow.host_client {
            self.host_clients = self.host_clients.saturating_sub(1);
        }
        self.slots.release(slot);
        Some(flow)
    }

    /// The flow whose guest → world key is `key`.
    pub fn by_tap(&self, key: &FlowKey) -> Option<u32> {
        self.by_tap.get(key).copied()
    }

    /// The flow whose world → guest key is `key`.
    pub fn by_uplink(&self, key: &FlowKey) -> Option<u32> {
        self.by_uplink.get(key).copied()
    }

    /// The flow in `slot`.
    pub fn get(&self, slot: u32) -> Option<&Flow> {
        self.flows.get(&slot)
    }

    /// The flow in `slot`, mutably (its keys must not change).
    pub fn get_mut(&mut self, slot: u32) -> Option<&mut Flow> {
        self.flows.get_mut(&slot)
    }

    /// Sets (or clears) the deadline of the flow in `slot`.
    pub fn set_deadline(&mut self, slot: u32, deadline: Option<Instant>) {
        let Some(flow) = self.flows.get_mut(&slot) else {
            return;
        };
        if let Some(t) = flow.deadline {
            self.deadlines.remove(&(t, slot));
        }
        flow.deadline = deadline;
        if let Some(t) = deadline {
            self.deadlines.insert((t, slot));
        }
    }

    /// Takes the flows whose deadline is at or before `now` off the timer
    /// set (their `deadline` becomes `None`) and returns their slots.
    pub fn take_due(&mut self, now: Instant) -> Vec<u32> {
        let mut due = Vec::new();
        while let Some(&(t, slot)) = self.deadlines.first() {
            if t > now {
                break;
            }
            self.deadlines.pop_first();
            if let Some(flow) = self.flows.get_mut(&slot) {
                flow.deadline = None;
            }
            due.push(slot);
        }
        due
    }

    /// The slots of all UDP flows.
    pub fn udp_slots(&self) -> Vec<u32> {
        self.udp.iter().copied().collect()
    }

    /// All flows, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = &Flow> {
        self.flows.values()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::{net::Ipv4Addr, time::Duration};

    use datapath_common::{PROTO_UDP, ipv4_to_16};

    use super::*;

    fn flow(slot: u32, port: u16, proto: u8, now: Instant) -> Flow {
        Flow::new(
            slot,
            Addressing {
                proto,
                guest: SocketAddr::new(Ipv4Addr::new(10, 0, 2, 15).into(), port),
                remote: SocketAddr::new(Ipv4Addr::new(1, 1, 1, 1).into(), 80),
                world: SocketAddr::new(Ipv4Addr::new(1, 1, 1, 1).into(), 80),
                nat: SocketAddr::new(Ipv4Addr::new(192, 0, 2, 2).into(), port + 10000),
                guest_mac: EthernetAddress([2, 0, 0, 0, 0, 1]),
            },
            NatLease::new(port + 10000, ()),
            FlowState::Handshake,
            now,
        )
    }

    #[test]
    fn slots_are_bounded_and_reused() {
        let mut t = FlowTable::new(3);
        let a = t.alloc_slot().unwrap();
        let b = t.alloc_slot().unwrap();
        let c = t.alloc_slot().unwrap();
        assert_eq!((a, b, c), (0, 1, 2));
        assert!(!t.has_room());
        assert_eq!(t.alloc_slot(), None);
        t.release_slot(b);
        assert!(t.has_room());
        assert_eq!(t.alloc_slot(), Some(b));
        assert_eq!(t.alloc_slot(), None);
    }

    #[test]
    fn claimed_slots_are_never_handed_out_again() {
        let mut t = FlowTable::new(8);
        assert!(t.claim_slot(3));
        assert!(!t.claim_slot(3));
        assert!(t.claim_slot(0));
        assert!(!t.claim_slot(8));
        let mut got: Vec<u32> = std::iter::from_fn(|| t.alloc_slot()).collect();
        got.sort_unstable();
        assert_eq!(got, vec![1, 2, 4, 5, 6, 7]);
    }

    #[test]
    fn indexes_and_removal() {
        let now = Instant::now();
        let mut t = FlowTable::new(8);
        let s = t.alloc_slot().unwrap();
        let f = flow(s, 1000, PROTO_UDP, now);
        let (tk, uk) = (f.tap_key(), f.uplink_key());
        t.insert(f);
        assert_eq!(t.by_tap(&tk), Some(s));
        assert_eq!(t.by_uplink(&uk), Some(s));
        assert_eq!(t.by_tap(&uk), None);
        assert_eq!(t.udp_slots(), vec![s]);
        assert_eq!(t.len(), 1);
        let f = t.remove(s).unwrap();
        assert_eq!(f.slot, s);
        assert!(t.is_empty());
        assert_eq!(t.by_tap(&tk), None);
        assert!(t.udp_slots().is_empty());
        assert!(t.remove(s).is_none());
        assert_eq!(t.alloc_slot(), Some(s));
    }

    #[test]
    fn deadlines_come_due_in_order() {
        let now = Instant::now();
        let mut t = FlowTable::new(8);
        for (i, secs) in [(0u16, 30u64), (1, 10), (2, 20)] {
            let s = t.alloc_slot().unwrap();
            let mut f = flow(s, 1000 + i, PROTO_TCP, now);
            f.deadline = Some(now + Duration::from_secs(secs));
            t.insert(f);
        }
        assert!(t.take_due(now + Duration::from_secs(9)).is_empty());
        assert_eq!(t.take_due(now + Duration::from_secs(20)), vec![1, 2]);
        // Moving a deadline replaces the old one.
        t.set_deadline(0, Some(now + Duration::from_secs(40)));
        assert!(t.take_due(now + Duration::from_secs(39)).is_empty());
        t.set_deadline(0, None);
        assert!(t.take_due(now + Duration::from_secs(100)).is_empty());
        assert_eq!(t.get(1).unwrap().deadline, None);
    }

    #[test]
    fn entries_carry_the_rewrites() {
        let now = Instant::now();
        let mut f = flow(5, 1000, PROTO_TCP, now);
        f.remote = SocketAddr::new(Ipv4Addr::new(10, 0, 2, 3).into(), 53);
        f.world = SocketAddr::new(Ipv4Addr::new(9, 9, 9, 9).into(), 53);
        let te = f.tap_entry(7, 0);
        assert_eq!(te.new_src, ipv4_to_16([192, 0, 2, 2]));
        assert_eq!(te.new_sport, 11000);
        assert_eq!(te.new_dst, ipv4_to_16([9, 9, 9, 9]));
        assert_eq!(te.new_dport, 53);
        assert_eq!(te.out_ifindex, 7);
        assert_eq!(te.slot, 5);
        let ue = f.uplink_entry(3, EthernetAddress([2, 2, 2, 2, 2, 2]), 1);
        assert_eq!(ue.new_src, ipv4_to_16([10, 0, 2, 3]));
        assert_eq!(ue.new_sport, 53);
        assert_eq!(ue.new_dst, ipv4_to_16([10, 0, 2, 15]));
        assert_eq!(ue.new_dport, 1000);
        assert_eq!(ue.eth_src, [2, 2, 2, 2, 2, 2]);
        assert_eq!(ue.eth_dst, [2, 0, 0, 0, 0, 1]);
        assert_eq!(ue.flags, 1);
        let uk = f.uplink_key();
        assert_eq!(uk.src, ipv4_to_16([9, 9, 9, 9]));
        assert_eq!(uk.dst, ipv4_to_16([192, 0, 2, 2]));
        assert_eq!((uk.sport, uk.dport), (53, 11000));
        let tk = f.tap_key();
        assert_eq!(tk.dst, ipv4_to_16([10, 0, 2, 3]));
        assert_eq!((tk.sport, tk.dport), (1000, 53));
    }
}
