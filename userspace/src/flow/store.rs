//! The flow manager's view of the kernel's flow map and activity array.
//!
//! # Theory of operation
//!
//! The kernel fast path reads two BPF maps: a hash map from a directional
//! [`FlowKey`] to the [`FlowEntry`] holding that direction's complete
//! rewrite, and an mmapped array of activity words indexed by flow slot.
//! The flow manager only needs a handful of operations on them, gathered in
//! the [`FlowMaps`] trait: the daemon implements it over the real aya maps,
//! the tests over a `HashMap` and a `Vec`. Keeping the trait this small also
//! documents the contract: user space writes whole entries when a flow is
//! installed, afterwards only the state and flag bytes
//! ([`FlowMaps::update_state`], a read-modify-write so the kernel's
//! counters are kept), reads entries back for the kernel's per-direction
//! `last_ack` and counters, and clears activity bits after reading them.
//!
//! This module also builds the keys the kernel looks up, so the key layout
//! (addresses via [`addr16`]: IPv6 as it is, IPv4 in the first four bytes, ports as host-order values of the wire
//! bytes) is written down once.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use datapath_common::{
    DIR_FROM_LO, DIR_FROM_TAP, DIR_FROM_UPLINK, FAMILY_IPV4, FAMILY_IPV6, FlowEntry, FlowKey,
    FlowState, ipv4_from_16, ipv4_to_16,
};
use thiserror::Error;

/// Why a flow map operation failed.
#[derive(Debug, Error)]
pub enum MapsError {
    /// The map has no room for another entry.
    #[error("the flow map is full")]
    Full,
    /// The entry to update does not exist.
    #[error("no such flow map entry")]
    NotFound,
    /// The underlying map operation failed.
    #[error("flow map {op}: {source}")]
    Backend {
        /// The operation ("insert", "lookup", ...).
        op: &'static str,
        /// The backend's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl MapsError {
    /// Wraps a backend error (e.g. aya's `MapError`) from operation `op`.
    pub fn backend(op: &'static str, e: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self::Backend {
            op,
            source: Box::new(e),
        }
    }
}

/// The operations the flow manager needs on the kernel's flow map and
/// activity array.
pub trait FlowMaps {
    /// Inserts or replaces the entry for `key`.
    fn insert(&mut self, key: &FlowKey, entry: &FlowEntry) -> Result<(), MapsError>;

    /// Rewrites the `state` of the entry for `key` and its
    /// [`FLOW_F_EVENTS`](datapath_common::FLOW_F_EVENTS) bit from `flags`
    /// (read-modify-write; other flag bits and the other fields stay as
    /// they are).
    fn update_state(&mut self, key: &FlowKey, state: FlowState, flags: u8)
    -> Result<(), MapsError>;

    /// The entry for `key`, if any.
    fn get(&self, key: &FlowKey) -> Result<Option<FlowEntry>, MapsError>;

    /// Removes the entry for `key` (removing a missing entry is not an
    /// error).
    fn remove(&mut self, key: &FlowKey) -> Result<(), MapsError>;

    /// The activity word of `slot` ([`datapath_common::ACTIVE`] |
    /// [`datapath_common::TAP_ACTIVE`] bits); 0 for a slot out of range.
    fn activity(&self, slot: u32) -> u64;

    /// Every entry of the map (a datapath adopted from an earlier daemon
    /// is rebuilt from these).
    fn entries(&self) -> Result<Vec<(FlowKey, FlowEntry)>, MapsError>;

    /// Clears `bits` in the activity word of `slot`.
    fn clear_activity(&mut self, slot: u32, bits: u64);

    /// Clears `bits` in the activity word of `slot` and returns which of
    /// them were set. The real maps do this in one atomic operation, so a
    /// bit the kernel sets concurrently is either returned or stays set —
    /// never lost; the default (read, then clear) is for fakes.
    fn take_activity(&mut self, slot: u32, bits: u64) -> u64 {
        let set = self.activity(slot) & bits;
        self.clear_activity(slot, bits);
        set
    }
}

/// The key the tap program looks up for a packet from the guest.
pub fn tap_key(
    src: impl Into<IpAddr>,
    dst: impl Into<IpAddr>,
    sport: u16,
    dport: u16,
    proto: u8,
) -> FlowKey {
    key(DIR_FROM_TAP, src.into(), dst.into(), sport, dport, proto)
}

/// The key the uplink program looks up for a packet from the world.
pub fn uplink_key(
    src: impl Into<IpAddr>,
    dst: impl Into<IpAddr>,
    sport: u16,
    dport: u16,
    proto: u8,
) -> FlowKey {
    key(DIR_FROM_UPLINK, src.into(), dst.into(), sport, dport, proto)
}

/// The key the loopback program looks up for a packet from a client on the
/// host itself (towards a forwarded port).
pub fn lo_key(
    src: impl Into<IpAddr>,
    dst: impl Into<IpAddr>,
    sport: u16,
    dport: u16,
    proto: u8,
) -> FlowKey {
    key(DIR_FROM_LO, src.into(), dst.into(), sport, dport, proto)
}

/// An address as the maps hold it: IPv6 as it is, IPv4 in the first four
/// bytes (the family says which).
pub fn addr16(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(a) => ipv4_to_16(a.octets()),
        IpAddr::V6(a) => a.octets(),
    }
}

/// The address of the map field `bytes` of family `family`; `None` for an
/// unknown family.
pub fn addr_of16(family: u8, bytes: &[u8; 16]) -> Option<IpAddr> {
    match family {
        FAMILY_IPV4 => Some(IpAddr::V4(Ipv4Addr::from(ipv4_from_16(bytes)))),
        FAMILY_IPV6 => Some(IpAddr::V6(Ipv6Addr::from(*bytes))),
        _ => None,
    }
}

/// The map family of `ip`.
pub fn family_of(ip: IpAddr) -> u8 {
    match ip {
        IpAddr::V4(_) => FAMILY_IPV4,
        IpAddr::V6(_) => FAMILY_IPV6,
    }
}

fn key(dir: u8, src: IpAddr, dst: IpAddr, sport: u16, dport: u16, proto: u8) -> FlowKey {
    FlowKey {
        src: addr16(src),
        dst: addr16(dst),
        sport,
        dport,
        proto,
        family: family_of(src),
        dir,
        _pad: 0,
    }
}
