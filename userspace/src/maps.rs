//! User-space access to the flow map and the activity array.
//!
//! # Theory of operation
//!
//! The flow map is an ordinary BPF hash map, read and written with
//! syscalls (one per insert, lookup or delete — only the slow path does
//! these). The activity array is created `BPF_F_MMAPABLE` and mapped into
//! the daemon once, so scanning a million flows' activity bits costs no
//! syscall at all: each slot is an 8-byte word the kernel sets bits in
//! atomically, and user space reads and clears them with atomic
//! operations on the same memory.
//!
//! The forwarded-ports map ([`KernelFwdPorts`]) is a plain hash map too,
//! written at startup and by `tapgate rules add|del`.
//!
//! A state change rewrites the whole entry (hash maps have no partial
//! update): counters or the last ACK the kernel wrote between the read and
//! the write are overwritten with the values just read. The flow manager
//! reads `last_ack` again after every state change, so nothing it relies
//! on is lost.

use std::{
    io,
    os::fd::{AsFd, AsRawFd},
    ptr::NonNull,
    sync::atomic::{AtomicU64, Ordering},
};

use aya::maps::{HashMap, Map, MapData, MapError};
use datapath_common::{
    ActivityWord, FLOW_F_EVENTS, FWD_PORTS_MAP, FlowEntry, FlowKey, FlowState, FwdPortKey,
};

use crate::{
    flow::{FlowMaps, MapsError},
    loader::LoaderError,
};

/// The activity array, mapped into this process.
pub struct ActivityMap {
    base: NonNull<AtomicU64>,
    len: usize,
    map_len: usize,
    _map: MapData,
}

impl ActivityMap {
    fn new(map: MapData) -> Result<Self, LoaderError> {
        let info = map.info().map_err(|source| LoaderError::Map {
            name: datapath_common::ACTIVITY_MAP,
            source,
        })?;
        let len = info.max_entries() as usize;
        let page = 4096usize;
        let map_len = (len * std::mem::size_of::<ActivityWord>()).div_ceil(page) * page;
        // SAFETY: mapping the map's own fd, shared, for its whole size; the
        // kernel checks the map is mmapable and the length fits.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                map.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(LoaderError::Mmap(io::Error::last_os_error()));
        }
        let base = NonNull::new(ptr.cast::<AtomicU64>())
            .ok_or_else(|| LoaderError::Mmap(io::Error::other("mmap returned null")))?;
        Ok(Self {
            base,
            len,
            map_len,
            _map: map,
        })
    }

    /// Number of slots.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the array has no slots.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn word(&self, slot: u32) -> Option<&AtomicU64> {
        let i = slot as usize;
        // SAFETY: i < len, within the mapping, which lives as long as self;
        // the memory is only ever accessed atomically.
        (i < self.len).then(|| unsafe { &*self.base.as_ptr().add(i) })
    }

    /// The activity bits of `slot` (0 for a slot out of range).
    pub fn get(&self, slot: u32) -> ActivityWord {
        self.word(slot).map_or(0, |w| w.load(Ordering::Relaxed))
    }

    /// Sets `bits` of `slot`, as the kernel does for a forwarded packet
    /// (for benchmarks and tests; in production only the kernel sets bits).
    pub fn set(&self, slot: u32, bits: ActivityWord) {
        if let Some(w) = self.word(slot) {
            w.fetch_or(bits, Ordering::AcqRel);
        }
    }

    /// Clears `bits` of `slot`, returning the bits that were set before.
    pub fn take(&self, slot: u32, bits: ActivityWord) -> ActivityWord {
        self.word(slot)
            .map_or(0, |w| w.fetch_and(!bits, Ordering::AcqRel) & bits)
    }
}

impl Drop for ActivityMap {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what new() mapped.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.map_len) };
    }
}

/// The flow map and the activity array.
pub struct KernelFlowMaps {
    flows: HashMap<MapData, FlowKey, FlowEntry>,
    activity: ActivityMap,
}

impl KernelFlowMaps {
    /// Wraps the maps taken from the loaded object.
    pub fn new(flows: Map, activity: Map) -> Result<Self, LoaderError> {
        let flows = HashMap::try_from(flows).map_err(|source| LoaderError::Map {
            name: datapath_common::FLOWS_MAP,
            source,
        })?;
        let activity = match activity {
            Map::Array(data) => ActivityMap::new(data)?,
            _ => {
                return Err(LoaderError::Map {
                    name: datapath_common::ACTIVITY_MAP,
                    source: MapError::InvalidMapType { map_type: 0 },
                });
            }
        };
        Ok(Self { flows, activity })
    }

    /// The activity array.
    pub fn activity(&self) -> &ActivityMap {
        &self.activity
    }
}

/// Maps aya's error for `op`, recognising a full map.
fn map_err(op: &'static str, e: MapError) -> MapsError {
    match &e {
        MapError::SyscallError(se) if se.io_error.raw_os_error() == Some(libc::E2BIG) => {
            MapsError::Full
        }
        MapError::KeyNotFound => MapsError::NotFound,
        _ => MapsError::backend(op, e),
    }
}

impl FlowMaps for KernelFlowMaps {
    fn insert(&mut self, key: &FlowKey, entry: &FlowEntry) -> Result<(), MapsError> {
        self.flows
            .insert(key, entry, 0)
            .map_err(|e| map_err("insert", e))
    }

    fn update_state(
        &mut self,
        key: &FlowKey,
        state: FlowState,
        flags: u8,
    ) -> Result<(), MapsError> {
        let mut e = self.flows.get(key, 0).map_err(|e| map_err("lookup", e))?;
        e.state = state as u8;
        e.flags = (e.flags & !FLOW_F_EVENTS) | (flags & FLOW_F_EVENTS);
        self.flows
            .insert(key, e, 0)
            .map_err(|e| map_err("update", e))
    }

    fn get(&self, key: &FlowKey) -> Result<Option<FlowEntry>, MapsError> {
        match self.flows.get(key, 0) {
            Ok(e) => Ok(Some(e)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(map_err("lookup", e)),
        }
    }

    fn remove(&mut self, key: &FlowKey) -> Result<(), MapsError> {
        match self.flows.remove(key) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(map_err("remove", e)),
        }
    }

    fn activity(&self, slot: u32) -> u64 {
        self.activity.get(slot)
    }

    fn clear_activity(&mut self, slot: u32, bits: u64) {
        self.activity.take(slot, bits);
    }

    fn take_activity(&mut self, slot: u32, bits: u64) -> u64 {
        self.activity.take(slot, bits)
    }
}

/// The uplink program's forwarded-ports map (`FwdPortKey` → 1).
///
/// The kernel matches exact (address, protocol, port) keys only, so a rule
/// without an address is published once per IPv4 address of the host:
/// a packet merely routed through the host, or sent to a multicast or
/// broadcast address, never matches a forward. The published rules and the
/// host's addresses are kept here, and [`Self::set_host_addrs`] re-syncs
/// the map when the addresses change.
pub struct KernelFwdPorts {
    map: HashMap<MapData, FwdPortKey, u8>,
    rules: Vec<crate::fwd::Rule>,
    host_addrs: Vec<std::net::Ipv4Addr>,
    published: std::collections::HashSet<FwdPortKey>,
}

impl KernelFwdPorts {
    pub(crate) fn new(map: Map) -> Result<Self, LoaderError> {
        let map = HashMap::try_from(map).map_err(|source| LoaderError::Map {
            name: FWD_PORTS_MAP,
            source,
        })?;
        Ok(Self {
            map,
            rules: Vec::new(),
            host_addrs: Vec::new(),
            published: std::collections::HashSet::new(),
        })
    }

    /// Publishes `rules` too; returns how many map entries exist now. On
    /// error the rules stay recorded: the caller removes them again.
    pub fn insert(&mut self, rules: &[crate::fwd::Rule]) -> Result<usize, MapError> {
        self.rules.extend_from_slice(rules);
        self.sync()
    }

    /// Withdraws `rules` (rules not published are fine).
    pub fn remove(&mut self, rules: &[crate::fwd::Rule]) -> Result<(), MapError> {
        self.rules.retain(|r| !rules.contains(r));
        self.sync().map(drop)
    }

    /// Sets the host's IPv4 addresses (loopback is left out: nothing
    /// arrives on the uplink for it) and re-syncs the map if they changed.
    pub fn set_host_addrs(&mut self, addrs: &[std::net::Ipv4Addr]) -> Result<(), MapError> {
        let mut addrs: Vec<_> = addrs
            .iter()
            .copied()
            .filter(|a| !a.is_loopback() && !a.is_unspecified())
            .collect();
        addrs.sort_unstable();
        addrs.dedup();
        if addrs == self.host_addrs {
            return Ok(());
        }
        self.host_addrs = addrs;
        self.sync().map(drop)
    }

    /// Brings the map to exactly the keys the rules and addresses call for.
    fn sync(&mut self) -> Result<usize, MapError> {
        let mut want = std::collections::HashSet::new();
        for (proto, addr, port) in crate::fwd::kernel_keys(&self.rules) {
            if addr.is_unspecified() {
                want.extend(self.host_addrs.iter().map(|a| fwd_key(proto, *a, port)));
            } else {
                want.insert(fwd_key(proto, addr, port));
            }
        }
        for key in self.published.difference(&want) {
            match self.map.remove(key) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(e),
            }
        }
        self.published.retain(|k| want.contains(k));
        for key in want {
            if !self.published.contains(&key) {
                self.map.insert(key, 1, 0)?;
                self.published.insert(key);
            }
        }
        Ok(self.published.len())
    }
}

fn fwd_key(proto: crate::fwd::Proto, addr: std::net::Ipv4Addr, port: u16) -> FwdPortKey {
    FwdPortKey {
        addr: addr.octets(),
        port,
        proto: proto.ip_proto(),
        _pad: 0,
    }
}
