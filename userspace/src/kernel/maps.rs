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
//! The forwarded-ports map ([`KernelFwdPorts`]) is a longest-prefix-match
//! trie, written at startup, by `tapgate rules add|del` and whenever the
//! host's addresses change: its keys are (family, address, protocol, port
//! prefix), for IPv4 and IPv6 alike ([`fwd_prefix`]); the uplink and the
//! loopback program look openings up in it (loopback's own addresses are
//! published for the host's clients, [`published_host_addrs`]).
//!
//! A state change rewrites the whole entry (hash maps have no partial
//! update): counters or the last ACK the kernel wrote between the read and
//! the write are overwritten with the values just read. The flow manager
//! reads `last_ack` again after every state change, so nothing it relies
//! on is lost.

use std::{
    collections::HashSet,
    io,
    net::IpAddr,
    os::fd::{AsFd, AsRawFd},
    ptr::NonNull,
    sync::atomic::{AtomicU64, Ordering},
};

use aya::maps::{
    HashMap, Map, MapData, MapError,
    lpm_trie::{Key, LpmTrie},
};
use datapath_common::{
    ActivityWord, FAMILY_IPV4, FAMILY_IPV6, FLOW_F_EVENTS, FWD_PORTS_MAP, FWD_PREFIX_FIXED_BITS,
    FlowEntry, FlowKey, FlowState, FwdPrefix, ipv4_to_16,
};

use crate::{
    flow::{FlowMaps, MapsError},
    kernel::loader::LoaderError,
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

    fn entries(&self) -> Result<Vec<(FlowKey, FlowEntry)>, MapsError> {
        // Keys first, then one lookup each: an entry removed in between
        // (none is, user space is the only writer of keys) is skipped.
        let keys: Vec<FlowKey> = self
            .flows
            .keys()
            .collect::<Result<_, _>>()
            .map_err(|e| map_err("iterate", e))?;
        let mut out = Vec::with_capacity(keys.len());
        for key in keys {
            if let Some(entry) = self.get(&key)? {
                out.push((key, entry));
            }
        }
        Ok(out)
    }

    fn clear_activity(&mut self, slot: u32, bits: u64) {
        self.activity.take(slot, bits);
    }

    fn take_activity(&mut self, slot: u32, bits: u64) -> u64 {
        self.activity.take(slot, bits)
    }
}

/// The forwarded-ports trie: which (address, protocol, port) openings the
/// uplink program punts, for both families. User space keeps the rules and
/// the host's addresses and publishes their product as port prefixes (a
/// range is covered by at most 30 of them, `all` by a handful), changing
/// only what differs from what is published.
pub struct KernelFwdPorts {
    map: LpmTrie<MapData, FwdPrefix, u8>,
    rules: Vec<crate::fwd::Rule>,
    host_addrs: Vec<IpAddr>,
    published: HashSet<(FwdPrefix, u32)>,
}

impl KernelFwdPorts {
    pub(crate) fn new(map: Map) -> Result<Self, LoaderError> {
        let map = LpmTrie::try_from(map).map_err(|source| LoaderError::Map {
            name: FWD_PORTS_MAP,
            source,
        })?;
        Ok(Self {
            map,
            rules: Vec::new(),
            host_addrs: Vec::new(),
            published: HashSet::new(),
        })
    }

    /// Takes over the prefixes an earlier daemon published in an adopted
    /// map, so the next sync removes what the current rules no longer
    /// forward (and only that: forwarded ports keep being punted
    /// throughout).
    pub fn adopt_published(&mut self) -> Result<usize, MapError> {
        for key in self.map.keys() {
            let key = key?;
            self.published.insert((key.data(), key.prefix_len()));
        }
        Ok(self.published.len())
    }

    /// Publishes `rules` too; returns how many prefixes are published now.
    /// On error the rules stay recorded: the caller removes them again.
    pub fn insert(&mut self, rules: &[crate::fwd::Rule]) -> Result<usize, MapError> {
        self.rules.extend_from_slice(rules);
        self.sync()
    }

    /// Withdraws `rules`.
    pub fn remove(&mut self, rules: &[crate::fwd::Rule]) -> Result<(), MapError> {
        self.rules.retain(|r| !rules.contains(r));
        self.sync().map(drop)
    }

    /// Sets the host's addresses, IPv4 and IPv6 (rules without an address
    /// are published once per address); see [`published_host_addrs`] for
    /// the ones left out.
    pub fn set_host_addrs(&mut self, addrs: &[IpAddr]) -> Result<(), MapError> {
        let addrs = published_host_addrs(addrs);
        if addrs == self.host_addrs {
            return Ok(());
        }
        self.host_addrs = addrs;
        self.sync().map(drop)
    }

    fn sync(&mut self) -> Result<usize, MapError> {
        let want = wanted_prefixes(&self.rules, &self.host_addrs);
        // New prefixes first, so a port covered before and after is never
        // uncovered in between.
        for (data, len) in &want {
            if !self.published.contains(&(*data, *len)) {
                self.map.insert(&Key::new(*len, *data), 1, 0)?;
                self.published.insert((*data, *len));
            }
        }
        let stale: Vec<(FwdPrefix, u32)> = self.published.difference(&want).copied().collect();
        for (data, len) in stale {
            match self.map.remove(&Key::new(len, data)) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(e),
            }
            self.published.remove(&(data, len));
        }
        Ok(self.published.len())
    }
}

/// The host addresses a rule without an address is published for, sorted
/// and without duplicates: every address of both families but unspecified
/// and multicast ones, and IPv6 link-local addresses (the same `fe80::`
/// address may sit on several interfaces, and an inbound flow's replies
/// are routed by destination, which a link-local one cannot be without
/// its interface). Loopback's addresses (`127.0.0.1`, `::1`) are
/// published too: clients on the host itself connect there, and the
/// loopback program punts their openings. The uplink program would punt a
/// packet from the world to one of them as well (a martian the host stack
/// drops); user space drops it instead.
pub fn published_host_addrs(addrs: &[IpAddr]) -> Vec<IpAddr> {
    let mut addrs: Vec<IpAddr> = addrs
        .iter()
        .copied()
        .filter(|a| !a.is_unspecified() && !a.is_multicast())
        .filter(|a| match a {
            IpAddr::V4(_) => true,
            IpAddr::V6(v6) => !v6.is_unicast_link_local(),
        })
        .collect();
    addrs.sort_unstable();
    addrs.dedup();
    addrs
}

/// The trie key data of host address `addr`, IP protocol `proto` and port
/// (or port-prefix base) `port`: the family, the address in 16 bytes (IPv4
/// in the first four, as the uplink program reads packets), the protocol
/// and the port big-endian.
pub fn fwd_prefix(addr: IpAddr, proto: u8, port: u16) -> FwdPrefix {
    let (family, addr) = match addr {
        IpAddr::V4(a) => (FAMILY_IPV4, ipv4_to_16(a.octets())),
        IpAddr::V6(a) => (FAMILY_IPV6, a.octets()),
    };
    FwdPrefix {
        family,
        addr,
        proto,
        port: port.to_be_bytes(),
    }
}

/// Every (key data, prefix length) `rules` need published, with
/// `host_addrs` (as [`published_host_addrs`] leaves them) standing in for
/// a rule without an address: each rule's port range as its prefixes, for
/// each address it covers, of either family.
pub fn wanted_prefixes(
    rules: &[crate::fwd::Rule],
    host_addrs: &[IpAddr],
) -> HashSet<(FwdPrefix, u32)> {
    let mut want = HashSet::new();
    for rule in rules {
        let addrs: &[IpAddr] = match &rule.addr {
            None => host_addrs,
            Some(a) => std::slice::from_ref(a),
        };
        for (base, bits) in port_prefixes(rule.host.first, rule.host.last) {
            for a in addrs {
                want.insert((
                    fwd_prefix(*a, rule.proto.ip_proto(), base),
                    FWD_PREFIX_FIXED_BITS + u32::from(bits),
                ));
            }
        }
    }
    want
}

/// The fewest prefixes `(base, prefix bits)` of the 16-bit port space that
/// cover exactly `first..=last`.
pub fn port_prefixes(first: u16, last: u16) -> Vec<(u16, u8)> {
    let mut out = Vec::new();
    let (mut lo, hi) = (u32::from(first), u32::from(last));
    while lo <= hi {
        // The largest aligned block starting at lo that fits.
        let mut size = if lo == 0 {
            1 << 16
        } else {
            1u32 << lo.trailing_zeros()
        };
        while lo + size - 1 > hi {
            size >>= 1;
        }
        let bits = 16 - size.trailing_zeros();
        out.push((lo as u16, bits as u8));
        lo += size;
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    use datapath_common::{
        FAMILY_IPV4, FAMILY_IPV6, FWD_PREFIX_BITS, FWD_PREFIX_FIXED_BITS, PROTO_TCP, PROTO_UDP,
    };

    use super::{fwd_prefix, port_prefixes, published_host_addrs, wanted_prefixes};
    use crate::fwd::{FwdTable, PortRange, Proto};

    fn covered(p: &[(u16, u8)]) -> Vec<u16> {
        let mut v: Vec<u16> = p
            .iter()
            .flat_map(|(base, bits)| {
                let size = 1u32 << (16 - u32::from(*bits));
                (u32::from(*base)..u32::from(*base) + size).map(|x| x as u16)
            })
            .collect();
        v.sort_unstable();
        v
    }

    #[test]
    fn prefixes_cover_ranges_exactly() {
        for (a, b) in [
            (0, 65535),
            (80, 80),
            (1, 1023),
            (1024, 32767),
            (60999, 65535),
            (8000, 8100),
            (65535, 65535),
            (0, 0),
        ] {
            let p = port_prefixes(a, b);
            assert_eq!(covered(&p), (a..=b).collect::<Vec<u16>>(), "{a}-{b}");
            assert!(p.len() <= 30, "{a}-{b}: {}", p.len());
        }
        assert_eq!(port_prefixes(0, 65535), vec![(0, 0)]);
        assert_eq!(port_prefixes(80, 80), vec![(80, 16)]);
    }

    const HOST4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
    const HOST6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 1);

    fn rules(specs: &[(Proto, &str)]) -> FwdTable {
        let mut t = FwdTable::new();
        for (proto, spec) in specs {
            t.add_spec(*proto, spec, PortRange::LINUX_EPHEMERAL)
                .unwrap();
        }
        t
    }

    #[test]
    fn prefix_keys_carry_the_family_and_16_byte_addresses() {
        let k = fwd_prefix(IpAddr::V4(HOST4), PROTO_TCP, 8080);
        assert_eq!(k.family, FAMILY_IPV4);
        assert_eq!(&k.addr[..4], &HOST4.octets());
        assert!(k.addr[4..].iter().all(|b| *b == 0));
        assert_eq!(k.port, 8080u16.to_be_bytes());
        let k6 = fwd_prefix(IpAddr::V6(HOST6), PROTO_UDP, 53);
        assert_eq!(
            (k6.family, k6.addr, k6.proto),
            (FAMILY_IPV6, HOST6.octets(), PROTO_UDP)
        );
        // An IPv6 address sharing an IPv4 address's bytes is another key.
        let lookalike = Ipv6Addr::from(k.addr);
        assert_ne!(fwd_prefix(IpAddr::V6(lookalike), PROTO_TCP, 8080), k);
        assert_eq!(FWD_PREFIX_BITS, FWD_PREFIX_FIXED_BITS + 16);
    }

    #[test]
    fn host_addresses_of_both_families_are_published() {
        let ll: Ipv6Addr = "fe80::1".parse().unwrap();
        let addrs = published_host_addrs(&[
            IpAddr::V6(HOST6),
            IpAddr::V4(HOST4),
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(Ipv6Addr::LOCALHOST),
            IpAddr::V6(ll),
            IpAddr::V6(Ipv6Addr::UNSPECIFIED),
            IpAddr::V4(HOST4),
        ]);
        // Loopback's addresses too: the host's own clients connect there.
        assert_eq!(
            addrs,
            vec![
                IpAddr::V4(Ipv4Addr::LOCALHOST),
                IpAddr::V4(HOST4),
                IpAddr::V6(Ipv6Addr::LOCALHOST),
                IpAddr::V6(HOST6),
            ]
        );
    }

    #[test]
    fn rules_are_published_per_address_and_family() {
        let host = [IpAddr::V4(HOST4), IpAddr::V6(HOST6)];
        // No address: every host address of both families.
        let t = rules(&[(Proto::Tcp, "8080:80")]);
        let want = wanted_prefixes(t.rules(), &host);
        let full = FWD_PREFIX_FIXED_BITS + 16;
        assert_eq!(want.len(), 2);
        for a in host {
            assert!(
                want.contains(&(fwd_prefix(a, PROTO_TCP, 8080), full)),
                "{a}"
            );
        }
        // An IPv6 rule address: that address only, whatever the host has.
        let other6: Ipv6Addr = "2001:db8:1::2".parse().unwrap();
        let t = rules(&[(Proto::Udp, "[2001:db8:1::2]/5353")]);
        let want = wanted_prefixes(t.rules(), &host);
        assert_eq!(
            want.into_iter().collect::<Vec<_>>(),
            vec![(fwd_prefix(IpAddr::V6(other6), PROTO_UDP, 5353), full)]
        );
        // An IPv4 rule address: no IPv6 key at all.
        let t = rules(&[(Proto::Tcp, "198.51.100.1/8000-8001")]);
        let want = wanted_prefixes(t.rules(), &host);
        assert_eq!(want.len(), 1);
        assert!(
            want.iter()
                .all(|(k, len)| k.family == FAMILY_IPV4 && *len == full - 1)
        );
        // A range is its prefixes, once per address.
        let t = rules(&[(Proto::Tcp, "1-1023")]);
        let per_addr = port_prefixes(1, 1023).len();
        assert_eq!(wanted_prefixes(t.rules(), &host).len(), 2 * per_addr);
        // Without host addresses a rule without an address publishes nothing.
        assert!(wanted_prefixes(t.rules(), &[]).is_empty());
    }
}
