//! IPv4 fragment reassembly (bounded memory, timeouts) and IPv4
//! fragmentation.
//!
//! # Theory of operation
//!
//! Everything here is pure: packets in, packets out, no I/O and no clock of
//! its own (the caller passes `now`). Nothing panics on any input; every
//! header is read through smoltcp's [`Ipv4Packet`] after its length checks,
//! and every other slice access goes through `get`.
//!
//! ## Reassembly ([`Reassembler`])
//!
//! A fragment is accepted when its header is sound: version 4, IHL ≥ 5, a
//! valid header checksum, the total length within the buffer (trailing
//! bytes, e.g. Ethernet padding, are ignored), and MF set or a non-zero
//! offset. Anything else is [`FragDrop::Malformed`] and only that packet is
//! dropped: its key cannot be trusted, so no datagram in progress is
//! touched.
//!
//! Fragments are grouped by the key (source, destination, protocol,
//! identification) of RFC 791. For each datagram in progress the
//! reassembler holds the fragments' payloads as separate pieces sorted by
//! offset and never overlapping, the first fragment's header once it has
//! arrived, and the payload length once the last fragment (MF clear) has
//! arrived. The datagram is complete when the header is there, the length
//! is known and the pieces add up to it; then the pieces are copied behind
//! the first fragment's header (options included), whose flags (reserved,
//! DF and MF) and offset are cleared and whose total length and checksum
//! are recomputed, and the result is returned as [`FragOutcome::Complete`].
//!
//! Once a fragment's header is sound, every other problem discards the
//! whole datagram in progress under its key, if any, as Linux does:
//! * [`FragDrop::Malformed`]: an empty fragment, a non-last fragment whose
//!   payload is not a multiple of 8 bytes, or fragments that disagree about
//!   where the datagram ends (two different last fragments, data past the
//!   last fragment's end);
//! * [`FragDrop::TooBig`]: the reassembled datagram would exceed 65535
//!   bytes (header included; the first fragment's header length is used
//!   once known, 20 bytes until then);
//! * [`FragDrop::Overlap`]: a fragment overlaps one already held (RFC 5722
//!   for IPv6, Linux for IPv4 since 4.19: overlaps are an attack, not a
//!   retransmission). **Exact duplicates** — same offset, same length and
//!   the same bytes — are the exception: they are ignored and the outcome
//!   is [`FragOutcome::Pending`] (counted in [`FragStats::duplicates`]);
//!   a last fragment duplicating a piece held from a non-last one still
//!   records where the datagram ends. A fragment at the same place with
//!   *different* bytes is an overlap.
//!
//! ## Bounds
//!
//! At most [`ReassemblyLimits::max_datagrams`] datagrams are in progress and
//! at most [`ReassemblyLimits::max_bytes`] bytes are held. A held fragment
//! is charged its payload plus [`FRAGMENT_OVERHEAD`] bytes (so a flood of
//! tiny fragments cannot hold much more real memory than the limit says),
//! and the first fragment's header is charged too. When a fragment needs
//! room, the oldest datagrams (in order of their first fragment's arrival)
//! are **evicted** — discarded silently, counted in [`FragStats::evicted`] —
//! until it fits. Under a flood this keeps the quick-to-complete legitimate
//! datagrams going, where refusing new datagrams would block them for a
//! whole timeout. The fragment is refused with [`FragDrop::NoRoom`] only
//! when no eviction can make room: the fragment alone exceeds the byte
//! limit, `max_datagrams` is zero, or its own datagram would exceed the
//! byte limit (that datagram can never complete and is discarded).
//!
//! ## Timeouts
//!
//! A datagram lives [`ReassemblyLimits::timeout`] from its first fragment's
//! arrival (30 s, Linux's `ipfrag_time`). [`Reassembler::expire`] discards
//! the ones past it and returns, for each, the first fragment's header and
//! first 8 payload bytes when the first fragment had arrived: exactly the
//! quote of an ICMP time exceeded, code 1 (RFC 792; RFC 1122 §3.3.2 sends
//! it only in that case). `push` does not look at the clock other than to
//! stamp new datagrams, so the caller runs `expire` periodically; `now` is
//! expected not to go backwards (as [`Instant::now`] does not).
//!
//! ## Fragmentation ([`fragment`])
//!
//! The payload is cut into pieces of `(mtu − header length)` bytes rounded
//! down to a multiple of 8; every piece gets a copy of the header with its
//! own total length, offset, MF and checksum. Identification, TOS, TTL,
//! protocol, addresses and the DF and reserved bits are kept. A packet that
//! is itself a fragment is cut further: the offsets are relative to its
//! own, and its MF stays on its last piece. IP options are treated as
//! Linux does (`ip_options_fragment`): the first fragment carries them all,
//! the others keep the same header length but every option without the
//! "copied" flag (RFC 791) is overwritten with NOPs; a malformed option
//! list makes the packet [`FragError::Malformed`].

use std::{
    collections::{BTreeMap, HashMap},
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use smoltcp::wire::{IPV4_HEADER_LEN, Ipv4Packet};
use thiserror::Error;

/// Largest IPv4 datagram, header included.
pub const MAX_DATAGRAM: usize = 65535;

/// Bytes charged against [`ReassemblyLimits::max_bytes`] for each held
/// fragment on top of its payload (bookkeeping and allocator overhead).
pub const FRAGMENT_OVERHEAD: usize = 64;

/// How many payload bytes of the first fragment an [`Expired`] quotes
/// (RFC 792: the first 64 bits of the datagram's data).
pub const QUOTE_PAYLOAD_LEN: usize = 8;

/// IPv4 option type: end of option list.
const OPT_EOL: u8 = 0;
/// IPv4 option type: no operation.
const OPT_NOP: u8 = 1;
/// The "copied" flag in an IPv4 option type: the option goes into every
/// fragment.
const OPT_COPIED: u8 = 0x80;

/// Limits of a [`Reassembler`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReassemblyLimits {
    /// Datagrams in progress at most.
    pub max_datagrams: usize,
    /// Bytes held at most (payloads plus [`FRAGMENT_OVERHEAD`] per fragment
    /// plus the first fragments' headers).
    pub max_bytes: usize,
    /// How long a datagram may take to complete, from its first fragment.
    pub timeout: Duration,
}

impl Default for ReassemblyLimits {
    /// 64 datagrams in progress, 4 MiB held, 30 s (Linux's `ipfrag_time`).
    fn default() -> Self {
        Self {
            max_datagrams: 64,
            max_bytes: 4 << 20,
            timeout: Duration::from_secs(30),
        }
    }
}

/// Whether `ip` is an IPv4 packet with MF set or a non-zero fragment offset.
///
/// Only the first 20 bytes are looked at (no checksum or length checks):
/// this is the cheap test for whether a packet goes to a [`Reassembler`].
/// False for anything shorter than an IPv4 header or not version 4.
pub fn is_fragment(ip: &[u8]) -> bool {
    if ip.len() < IPV4_HEADER_LEN {
        return false;
    }
    let p = Ipv4Packet::new_unchecked(ip);
    p.version() == 4 && (p.more_frags() || p.frag_offset() != 0)
}

/// What became of a fragment given to [`Reassembler::push`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FragOutcome {
    /// The datagram is whole: a complete IPv4 packet (the first fragment's
    /// header with its options, flags — reserved, DF, MF — and offset
    /// cleared, total length and header checksum recomputed).
    Complete(Vec<u8>),
    /// Held, waiting for more fragments (or an exact duplicate, ignored).
    Pending,
    /// Dropped, and counted in [`FragStats`]; whether the datagram in
    /// progress went with it depends on the reason (see [`FragDrop`]).
    Dropped(FragDrop),
}

/// Why a fragment was dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FragDrop {
    /// A bad header (only the packet is dropped), or a bad length or
    /// fragments disagreeing about the datagram's end (the datagram in
    /// progress is discarded too).
    Malformed,
    /// The fragment overlaps one already held; the datagram is discarded.
    Overlap,
    /// The datagram would exceed 65535 bytes; it is discarded.
    TooBig,
    /// No eviction could make room for the fragment; its datagram, if one
    /// was in progress, is discarded.
    NoRoom,
}

impl FragDrop {
    /// A short name for counters and logs.
    pub fn name(self) -> &'static str {
        match self {
            Self::Malformed => "malformed",
            Self::Overlap => "overlap",
            Self::TooBig => "too_big",
            Self::NoRoom => "no_room",
        }
    }
}

/// A datagram discarded by [`Reassembler::expire`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Expired {
    /// Source address of the datagram.
    pub key_src: Ipv4Addr,
    /// Destination address of the datagram.
    pub key_dst: Ipv4Addr,
    /// The first fragment's IPv4 header (as received, options included)
    /// and first 8 payload bytes, if the first fragment arrived: the quote
    /// for an ICMP time exceeded, code 1 "fragment reassembly time
    /// exceeded" (RFC 792, RFC 1122 §3.3.2).
    pub first: Option<Vec<u8>>,
}

/// Counters of a [`Reassembler`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FragStats {
    /// Packets given to [`Reassembler::push`].
    pub fragments: u64,
    /// Datagrams completed.
    pub reassembled: u64,
    /// Datagrams discarded by [`Reassembler::expire`].
    pub timed_out: u64,
    /// [`FragDrop::Malformed`] outcomes.
    pub dropped_malformed: u64,
    /// [`FragDrop::Overlap`] outcomes.
    pub dropped_overlap: u64,
    /// [`FragDrop::TooBig`] outcomes.
    pub dropped_too_big: u64,
    /// [`FragDrop::NoRoom`] outcomes.
    pub dropped_no_room: u64,
    /// Exact duplicates ignored.
    pub duplicates: u64,
    /// Datagrams in progress discarded to make room for newer fragments.
    pub evicted: u64,
}

/// The reassembly key of RFC 791.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Key {
    src: Ipv4Addr,
    dst: Ipv4Addr,
    proto: u8,
    ident: u16,
}

/// One fragment's payload, held.
#[derive(Debug)]
struct Piece {
    offset: usize,
    data: Vec<u8>,
}

impl Piece {
    fn end(&self) -> usize {
        self.offset + self.data.len()
    }
}

/// A datagram in progress.
#[derive(Debug)]
struct Datagram {
    /// Arrival order, the key of `Reassembler::order`.
    seq: u64,
    /// When the first fragment (in arrival order) came.
    first_seen: Instant,
    /// The fragment at offset 0's header.
    header: Option<Vec<u8>>,
    /// Sorted by offset, never overlapping.
    pieces: Vec<Piece>,
    /// Sum of the pieces' lengths.
    received: usize,
    /// Payload length, once the last fragment arrived.
    len: Option<usize>,
    /// The largest piece end seen.
    max_end: usize,
    /// Bytes charged against the limit.
    charged: usize,
}

/// A fragment whose header passed the checks.
struct Fragment<'a> {
    key: Key,
    header: &'a [u8],
    payload: &'a [u8],
    offset: usize,
    more: bool,
}

impl Fragment<'_> {
    fn end(&self) -> usize {
        self.offset + self.payload.len()
    }
}

/// Where a fragment goes in its datagram.
enum Place {
    /// Inserted at this index of the pieces.
    Insert(usize),
    /// An exact duplicate of a piece held.
    Duplicate,
}

impl Datagram {
    /// Checks `f` against what is held (without changing anything).
    fn place(&self, f: &Fragment<'_>) -> Result<Place, FragDrop> {
        let end = f.end();
        if f.more {
            if self.len.is_some_and(|len| end > len) {
                return Err(FragDrop::Malformed);
            }
        } else if self.len.is_some_and(|len| end != len) || end < self.max_end {
            return Err(FragDrop::Malformed);
        }
        let hl = if f.offset == 0 {
            f.header.len()
        } else {
            self.header.as_ref().map_or(IPV4_HEADER_LEN, Vec::len)
        };
        if hl + end.max(self.max_end) > MAX_DATAGRAM {
            return Err(FragDrop::TooBig);
        }
        let i = self.pieces.partition_point(|p| p.offset < f.offset);
        if i > 0
            && let Some(prev) = self.pieces.get(i - 1)
            && prev.end() > f.offset
        {
            return Err(FragDrop::Overlap);
        }
        if let Some(next) = self.pieces.get(i) {
            if next.offset == f.offset && next.data == f.payload {
                return Ok(Place::Duplicate);
            }
            if next.offset < end {
                return Err(FragDrop::Overlap);
            }
        }
        Ok(Place::Insert(i))
    }

    /// What holding `f` costs.
    fn charge(f: &Fragment<'_>) -> usize {
        let header = if f.offset == 0 { f.header.len() } else { 0 };
        f.payload.len() + FRAGMENT_OVERHEAD + header
    }

    /// Records `f` (already placed); the end is recorded for duplicates too.
    fn record(&mut self, f: &Fragment<'_>, place: Place) {
        if !f.more {
            self.len = Some(f.end());
        }
        if let Place::Insert(i) = place {
            self.max_end = self.max_end.max(f.end());
            self.received += f.payload.len();
            self.charged += Self::charge(f);
            if f.offset == 0 {
                self.header = Some(f.header.to_vec());
            }
            self.pieces.insert(
                i,
                Piece {
                    offset: f.offset,
                    data: f.payload.to_vec(),
                },
            );
        }
    }

    fn is_complete(&self) -> bool {
        self.header.is_some() && self.len == Some(self.received)
    }

    /// The whole datagram; `None` if it cannot be built (which the checks
    /// on the way in rule out).
    fn assemble(&self) -> Option<Vec<u8>> {
        let header = self.header.as_ref()?;
        let total = u16::try_from(header.len() + self.received).ok()?;
        let mut out = Vec::with_capacity(usize::from(total));
        out.extend_from_slice(header);
        for p in &self.pieces {
            out.extend_from_slice(&p.data);
        }
        // The header came from a checked packet: at least 20 bytes, which
        // is all the setters touch (the checksum covers the header only).
        let mut ip = Ipv4Packet::new_unchecked(&mut out[..]);
        ip.set_total_len(total);
        ip.clear_flags();
        ip.set_frag_offset(0);
        ip.fill_checksum();
        Some(out)
    }

    /// The ICMP quote: first fragment's header and first payload bytes.
    fn quote(&self) -> Option<Vec<u8>> {
        let header = self.header.as_ref()?;
        let first = self.pieces.first().filter(|p| p.offset == 0)?;
        let data = first.data.get(..QUOTE_PAYLOAD_LEN).unwrap_or(&first.data);
        let mut q = Vec::with_capacity(header.len() + data.len());
        q.extend_from_slice(header);
        q.extend_from_slice(data);
        Some(q)
    }
}

/// Reassembles IPv4 datagrams from their fragments, within
/// [`ReassemblyLimits`] (see the module documentation).
#[derive(Debug)]
pub struct Reassembler {
    limits: ReassemblyLimits,
    datagrams: HashMap<Key, Datagram>,
    /// Datagrams in order of arrival (oldest first).
    order: BTreeMap<u64, Key>,
    next_seq: u64,
    bytes: usize,
    stats: FragStats,
}

/// Parses and checks a fragment's header (see the module documentation).
fn parse_fragment(ip: &[u8]) -> Option<Fragment<'_>> {
    let p = Ipv4Packet::new_checked(ip).ok()?;
    if p.version() != 4 || !p.verify_checksum() {
        return None;
    }
    let offset = usize::from(p.frag_offset());
    let more = p.more_frags();
    if !more && offset == 0 {
        return None;
    }
    let hl = usize::from(p.header_len());
    let total = usize::from(p.total_len());
    Some(Fragment {
        key: Key {
            src: p.src_addr(),
            dst: p.dst_addr(),
            proto: u8::from(p.next_header()),
            ident: p.ident(),
        },
        header: ip.get(..hl)?,
        payload: ip.get(hl..total)?,
        offset,
        more,
    })
}

impl Reassembler {
    /// An empty reassembler.
    pub fn new(limits: ReassemblyLimits) -> Self {
        Self {
            limits,
            datagrams: HashMap::new(),
            order: BTreeMap::new(),
            next_seq: 0,
            bytes: 0,
            stats: FragStats::default(),
        }
    }

    /// Takes one fragment: `ip` is an IPv4 packet (trailing bytes past its
    /// total length are ignored) with MF set or a non-zero offset (see
    /// [`is_fragment`]; anything else is [`FragDrop::Malformed`]). `now`
    /// stamps the datagram if this is its first fragment.
    pub fn push(&mut self, ip: &[u8], now: Instant) -> FragOutcome {
        self.stats.fragments += 1;
        let Some(f) = parse_fragment(ip) else {
            return self.dropped(FragDrop::Malformed);
        };
        if f.payload.is_empty() || (f.more && f.payload.len() % 8 != 0) {
            self.discard(&f.key);
            return self.dropped(FragDrop::Malformed);
        }
        let charge = Datagram::charge(&f);
        let place = match self.datagrams.get(&f.key) {
            Some(dg) => match dg.place(&f) {
                Ok(Place::Insert(_)) if dg.charged + charge > self.limits.max_bytes => {
                    Err(FragDrop::NoRoom)
                }
                other => other,
            },
            None => self.start(&f, charge, now),
        };
        let place = match place {
            Ok(place) => place,
            Err(why) => {
                self.discard(&f.key);
                return self.dropped(why);
            }
        };
        if let Place::Insert(_) = place {
            // Cannot fail: the datagram's own charge fits (checked above).
            self.make_room(charge, false, Some(f.key));
            self.bytes += charge;
        } else {
            self.stats.duplicates += 1;
        }
        let Some(dg) = self.datagrams.get_mut(&f.key) else {
            return self.dropped(FragDrop::Malformed);
        };
        dg.record(&f, place);
        if !dg.is_complete() {
            return FragOutcome::Pending;
        }
        let whole = dg.assemble();
        self.discard(&f.key);
        match whole {
            Some(packet) => {
                self.stats.reassembled += 1;
                FragOutcome::Complete(packet)
            }
            None => self.dropped(FragDrop::Malformed),
        }
    }

    /// Starts a datagram for `f`, making room for it.
    fn start(&mut self, f: &Fragment<'_>, charge: usize, now: Instant) -> Result<Place, FragDrop> {
        let hl = if f.offset == 0 {
            f.header.len()
        } else {
            IPV4_HEADER_LEN
        };
        if hl + f.end() > MAX_DATAGRAM {
            return Err(FragDrop::TooBig);
        }
        if self.limits.max_datagrams == 0 || charge > self.limits.max_bytes {
            return Err(FragDrop::NoRoom);
        }
        self.make_room(0, true, None);
        let seq = self.next_seq;
        self.next_seq += 1;
        self.order.insert(seq, f.key);
        self.datagrams.insert(
            f.key,
            Datagram {
                seq,
                first_seen: now,
                header: None,
                pieces: Vec::new(),
                received: 0,
                len: None,
                max_end: 0,
                charged: 0,
            },
        );
        // The charge itself is made room for by the caller.
        Ok(Place::Insert(0))
    }

    /// Evicts the oldest datagrams (never `keep`) until `bytes` more fit
    /// and, with `slot`, a new datagram does. False if that was impossible.
    fn make_room(&mut self, bytes: usize, slot: bool, keep: Option<Key>) -> bool {
        loop {
            let full = slot && self.datagrams.len() >= self.limits.max_datagrams;
            if !full && self.bytes + bytes <= self.limits.max_bytes {
                return true;
            }
            let Some(victim) = self.order.values().find(|k| Some(**k) != keep).copied() else {
                return false;
            };
            self.discard(&victim);
            self.stats.evicted += 1;
        }
    }

    /// Forgets the datagram under `key`, if any; returns it.
    fn discard(&mut self, key: &Key) -> Option<Datagram> {
        let dg = self.datagrams.remove(key)?;
        self.order.remove(&dg.seq);
        self.bytes = self.bytes.saturating_sub(dg.charged);
        Some(dg)
    }

    /// Counts a drop.
    fn dropped(&mut self, why: FragDrop) -> FragOutcome {
        let counter = match why {
            FragDrop::Malformed => &mut self.stats.dropped_malformed,
            FragDrop::Overlap => &mut self.stats.dropped_overlap,
            FragDrop::TooBig => &mut self.stats.dropped_too_big,
            FragDrop::NoRoom => &mut self.stats.dropped_no_room,
        };
        *counter += 1;
        FragOutcome::Dropped(why)
    }

    /// Discards the datagrams whose first fragment came `timeout` or more
    /// before `now`, oldest first, and returns them.
    pub fn expire(&mut self, now: Instant) -> Vec<Expired> {
        let mut out = Vec::new();
        while let Some((_, key)) = self.order.first_key_value() {
            let key = *key;
            let due = self.datagrams.get(&key).is_none_or(|dg| {
                now.saturating_duration_since(dg.first_seen) >= self.limits.timeout
            });
            if !due {
                break;
            }
            if let Some(dg) = self.discard(&key) {
                self.stats.timed_out += 1;
                out.push(Expired {
                    key_src: key.src,
                    key_dst: key.dst,
                    first: dg.quote(),
                });
            } else {
                // An order entry without its datagram: cannot happen, but
                // never loop on it.
                self.order.pop_first();
            }
        }
        out
    }

    /// The counters.
    pub fn stats(&self) -> &FragStats {
        &self.stats
    }

    /// Datagrams in progress.
    pub fn in_progress(&self) -> usize {
        self.datagrams.len()
    }

    /// Bytes held (as charged against [`ReassemblyLimits::max_bytes`]).
    pub fn bytes_held(&self) -> usize {
        self.bytes
    }

    /// The limits.
    pub fn limits(&self) -> &ReassemblyLimits {
        &self.limits
    }
}

/// Why [`fragment`] could not split a packet.
#[derive(Debug, Error, Clone, Copy, PartialEq, Eq)]
pub enum FragError {
    /// Not a sound IPv4 packet (version, IHL, checksum, lengths) or its
    /// options are malformed.
    #[error("malformed IPv4 packet")]
    Malformed,
    /// The MTU cannot carry the header and 8 payload bytes.
    #[error("MTU too small for the header and 8 bytes of payload")]
    MtuTooSmall,
    /// A fragment's offset would not fit in the 13-bit offset field (only
    /// possible when fragmenting a fragment).
    #[error("fragment offset out of range")]
    OffsetOverflow,
}

/// The header for non-first fragments: options without the "copied" flag
/// replaced by NOPs (RFC 791, Linux's `ip_options_fragment`).
fn later_header(header: &[u8]) -> Result<Vec<u8>, FragError> {
    let mut out = header.to_vec();
    let options = out.get_mut(IPV4_HEADER_LEN..).unwrap_or_default();
    let mut i = 0;
    while let Some(&kind) = options.get(i) {
        match kind {
            OPT_EOL => break,
            OPT_NOP => i += 1,
            _ => {
                let len = usize::from(*options.get(i + 1).ok_or(FragError::Malformed)?);
                let option = options
                    .get_mut(i..i + len)
                    .filter(|_| len >= 2)
                    .ok_or(FragError::Malformed)?;
                if kind & OPT_COPIED == 0 {
                    option.fill(OPT_NOP);
                }
                i += len;
            }
        }
    }
    Ok(out)
}

/// Splits an IPv4 packet into fragments of at most `mtu` bytes each (IP
/// header included).
///
/// Trailing bytes past the total length are ignored. Payload offsets are
/// multiples of 8; identification, TOS, TTL, protocol, addresses and the
/// DF and reserved bits are kept (the caller decides about DF: this
/// function ignores it); each header's checksum is fixed. A packet that
/// already fits is returned as the one element. A packet that is itself a
/// fragment is split further (offsets add up, MF stays on the last piece if
/// the input had it). Options: the first fragment has them all, the others
/// the same header length with non-copied options overwritten by NOPs (see
/// the module documentation).
pub fn fragment(ip: &[u8], mtu: usize) -> Result<Vec<Vec<u8>>, FragError> {
    let p = Ipv4Packet::new_checked(ip).map_err(|_| FragError::Malformed)?;
    if p.version() != 4 || !p.verify_checksum() {
        return Err(FragError::Malformed);
    }
    let hl = usize::from(p.header_len());
    let total = usize::from(p.total_len());
    let header = ip.get(..hl).ok_or(FragError::Malformed)?;
    let payload = ip.get(hl..total).ok_or(FragError::Malformed)?;
    if total <= mtu {
        return Ok(vec![ip.get(..total).ok_or(FragError::Malformed)?.to_vec()]);
    }
    let step = mtu.checked_sub(hl).ok_or(FragError::MtuTooSmall)? & !7;
    if step == 0 {
        return Err(FragError::MtuTooSmall);
    }
    let base = usize::from(p.frag_offset());
    let more = p.more_frags();
    let later = later_header(header)?;
    let mut out = Vec::with_capacity(payload.len().div_ceil(step));
    for (n, chunk) in payload.chunks(step).enumerate() {
        let at = n * step;
        let offset = u16::try_from(base + at).map_err(|_| FragError::OffsetOverflow)?;
        let last = at + chunk.len() == payload.len();
        let mut frag = Vec::with_capacity(hl + chunk.len());
        frag.extend_from_slice(if n == 0 { header } else { &later });
        frag.extend_from_slice(chunk);
        let len = u16::try_from(frag.len()).map_err(|_| FragError::Malformed)?;
        // `frag` starts with a checked header (the total length field is
        // still the input's, so no `new_checked`).
        let mut f = Ipv4Packet::new_unchecked(&mut frag[..]);
        f.set_total_len(len);
        f.set_frag_offset(offset);
        f.set_more_frags(more || !last);
        f.fill_checksum();
        out.push(frag);
    }
    Ok(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use smoltcp::wire::IpProtocol;

    use super::*;

    const SRC: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);
    const DST: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 7);

    /// A tiny LCG (Knuth's MMIX constants): reproducible "random" numbers.
    struct Lcg(u64);

    impl Lcg {
        fn next(&mut self) -> u32 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (self.0 >> 33) as u32
        }

        fn below(&mut self, n: usize) -> usize {
            self.next() as usize % n
        }

        fn shuffle<T>(&mut self, v: &mut [T]) {
            for i in (1..v.len()).rev() {
                v.swap(i, self.below(i + 1));
            }
        }
    }

    /// An IPv4 packet (UDP, DF clear) with `options` and `payload_len`
    /// bytes of patterned payload.
    fn packet_with(options: &[u8], payload_len: usize, ident: u16) -> Vec<u8> {
        let hl = IPV4_HEADER_LEN + options.len();
        let mut buf = vec![0u8; hl + payload_len];
        for (i, b) in buf.iter_mut().enumerate().skip(hl) {
            *b = (i * 7 + i / 251) as u8;
        }
        buf[IPV4_HEADER_LEN..hl].copy_from_slice(options);
        let mut p = Ipv4Packet::new_unchecked(&mut buf[..]);
        p.set_version(4);
        p.set_header_len(hl as u8);
        p.set_dscp(10);
        p.set_ecn(1);
        p.set_total_len((hl + payload_len) as u16);
        p.set_ident(ident);
        p.clear_flags();
        p.set_frag_offset(0);
        p.set_hop_limit(61);
        p.set_next_header(IpProtocol::Udp);
        p.set_src_addr(SRC);
        p.set_dst_addr(DST);
        p.fill_checksum();
        buf
    }

    fn packet(payload_len: usize, ident: u16) -> Vec<u8> {
        packet_with(&[], payload_len, ident)
    }

    /// A fragment with a hand-made offset, MF and payload.
    fn raw_fragment(ident: u16, offset: usize, more: bool, payload: &[u8]) -> Vec<u8> {
        let mut buf = packet(payload.len(), ident);
        buf[IPV4_HEADER_LEN..].copy_from_slice(payload);
        let mut p = Ipv4Packet::new_unchecked(&mut buf[..]);
        p.set_frag_offset(offset as u16);
        p.set_more_frags(more);
        p.fill_checksum();
        buf
    }

    fn reassembler() -> Reassembler {
        Reassembler::new(ReassemblyLimits::default())
    }

    /// Pushes all `frags`; the last must complete, the others be pending.
    fn push_all(r: &mut Reassembler, frags: &[Vec<u8>], now: Instant) -> Vec<u8> {
        let (last, rest) = frags.split_last().unwrap();
        for f in rest {
            assert_eq!(r.push(f, now), FragOutcome::Pending);
        }
        match r.push(last, now) {
            FragOutcome::Complete(p) => p,
            other => panic!("not complete: {other:?}"),
        }
    }

    /// Checks the fragments of `orig` as `fragment(orig, mtu)` made them.
    fn check_fragments(orig: &[u8], frags: &[Vec<u8>], mtu: usize) {
        let o = Ipv4Packet::new_checked(orig).unwrap();
        let mut expect_offset = usize::from(o.frag_offset());
        for (n, f) in frags.iter().enumerate() {
            assert!(f.len() <= mtu, "fragment {n} is {} > {mtu}", f.len());
            let p = Ipv4Packet::new_checked(&f[..]).unwrap();
            assert!(p.verify_checksum());
            assert_eq!(usize::from(p.total_len()), f.len());
            assert_eq!(p.ident(), o.ident());
            assert_eq!((p.dscp(), p.ecn()), (o.dscp(), o.ecn()));
            assert_eq!(p.hop_limit(), o.hop_limit());
            assert_eq!(p.next_header(), o.next_header());
            assert_eq!((p.src_addr(), p.dst_addr()), (o.src_addr(), o.dst_addr()));
            assert_eq!(p.dont_frag(), o.dont_frag());
            assert_eq!(usize::from(p.frag_offset()), expect_offset);
            assert_eq!(p.frag_offset() % 8, 0);
            let last = n + 1 == frags.len();
            if !last {
                assert!(p.more_frags());
                assert_eq!(p.payload().len() % 8, 0);
            } else {
                assert_eq!(p.more_frags(), o.more_frags());
            }
            assert!(is_fragment(f) || frags.len() == 1);
            expect_offset += p.payload().len();
        }
        let payload: Vec<u8> = frags
            .iter()
            .flat_map(|f| Ipv4Packet::new_checked(&f[..]).unwrap().payload().to_vec())
            .collect();
        assert_eq!(payload, o.payload());
    }

    #[test]
    fn is_fragment_classifies() {
        let whole = packet(100, 1);
        assert!(!is_fragment(&whole));
        assert!(is_fragment(&raw_fragment(1, 0, true, &[0; 8])));
        assert!(is_fragment(&raw_fragment(1, 8, false, &[0; 8])));
        assert!(!is_fragment(&whole[..19]));
        assert!(!is_fragment(&[]));
        let mut v6 = raw_fragment(1, 0, true, &[0; 8]);
        v6[0] = 0x65;
        assert!(!is_fragment(&v6));
    }

    #[test]
    fn reassembles_in_order_reverse_and_shuffled() {
        let orig = packet(8200, 0x1234);
        let frags = fragment(&orig, 1500).unwrap();
        assert_eq!(frags.len(), 6);
        let now = Instant::now();

        let mut r = reassembler();
        assert_eq!(push_all(&mut r, &frags, now), orig);

        let mut reversed = frags.clone();
        reversed.reverse();
        assert_eq!(push_all(&mut r, &reversed, now), orig);

        let mut lcg = Lcg(7);
        for _ in 0..20 {
            let mut shuffled = frags.clone();
            lcg.shuffle(&mut shuffled);
            assert_eq!(push_all(&mut r, &shuffled, now), orig);
        }
        assert_eq!(r.in_progress(), 0);
        assert_eq!(r.bytes_held(), 0);
        let s = r.stats();
        assert_eq!(s.reassembled, 22);
        assert_eq!(s.fragments, 22 * 6);
    }

    #[test]
    fn interleaved_datagrams() {
        let a = packet(3000, 1);
        let b = packet(3000, 2);
        let fa = fragment(&a, 1000).unwrap();
        let fb = fragment(&b, 1000).unwrap();
        let mut r = reassembler();
        let now = Instant::now();
        for (x, y) in fa.iter().zip(&fb).take(fa.len() - 1) {
            assert_eq!(r.push(x, now), FragOutcome::Pending);
            assert_eq!(r.push(y, now), FragOutcome::Pending);
        }
        assert_eq!(r.in_progress(), 2);
        assert_eq!(
            r.push(fb.last().unwrap(), now),
            FragOutcome::Complete(b.clone())
        );
        assert_eq!(r.push(fa.last().unwrap(), now), FragOutcome::Complete(a));
    }

    #[test]
    fn round_trips_sizes_and_mtus() {
        let cases = [
            (8200, 1500),
            (8200, 1280),
            (8200, 576),
            (65515, 1500),
            (65515, 1280),
            (65515, 68),
            (1480, 1500),
            (100, 1500),
            (1481, 1500),
            // Odd MTUs: the payload per fragment rounds down to 8.
            (8200, 1001),
            (8200, 577),
            (5000, 69),
            (5000, 29),
        ];
        for (len, mtu) in cases {
            let orig = packet(len, len as u16 ^ mtu as u16);
            let frags = fragment(&orig, mtu).unwrap();
            check_fragments(&orig, &frags, mtu);
            if orig.len() <= mtu {
                assert_eq!(frags, vec![orig.clone()], "{len} at {mtu}");
                continue;
            }
            let step = (mtu - IPV4_HEADER_LEN) & !7;
            assert_eq!(frags.len(), len.div_ceil(step), "{len} at {mtu}");
            for f in &frags[..frags.len() - 1] {
                assert_eq!(f.len(), IPV4_HEADER_LEN + step);
            }
            let mut r = reassembler();
            assert_eq!(push_all(&mut r, &frags, Instant::now()), orig);
        }
    }

    #[test]
    fn trailing_bytes_are_ignored() {
        let orig = packet(3000, 5);
        let mut padded = orig.clone();
        padded.extend_from_slice(&[0xee; 17]);
        let frags = fragment(&padded, 1500).unwrap();
        check_fragments(&orig, &frags, 1500);
        let mut r = reassembler();
        let now = Instant::now();
        let padded: Vec<Vec<u8>> = frags
            .iter()
            .map(|f| [f.as_slice(), &[0u8; 6]].concat())
            .collect();
        assert_eq!(push_all(&mut r, &padded, now), orig);
        assert_eq!(fragment(&orig[..100], 50), Err(FragError::Malformed));
    }

    #[test]
    fn fragmenting_a_fragment() {
        let orig = packet(8200, 77);
        let frags = fragment(&orig, 1500).unwrap();
        // A middle fragment (MF set) and the last one (MF clear), cut again.
        let middle = fragment(&frags[2], 576).unwrap();
        check_fragments(&frags[2], &middle, 576);
        assert!(middle.len() > 1);
        assert!(
            middle
                .iter()
                .all(|f| Ipv4Packet::new_checked(&f[..]).unwrap().more_frags())
        );
        let last = fragment(frags.last().unwrap(), 300).unwrap();
        check_fragments(frags.last().unwrap(), &last, 300);
        assert!(
            !Ipv4Packet::new_checked(&last.last().unwrap()[..])
                .unwrap()
                .more_frags()
        );

        let mut all: Vec<Vec<u8>> = Vec::new();
        all.extend_from_slice(&frags[..2]);
        all.extend(middle);
        all.extend_from_slice(&frags[3..frags.len() - 1]);
        all.extend(last);
        let mut lcg = Lcg(99);
        lcg.shuffle(&mut all);
        let mut r = reassembler();
        assert_eq!(push_all(&mut r, &all, Instant::now()), orig);
    }

    #[test]
    fn offsets_past_the_field_are_refused() {
        // A fragment near the top of the offset range, whose payload
        // split at a small MTU would need offsets past 65528.
        let mut f = packet(1000, 3);
        let mut p = Ipv4Packet::new_unchecked(&mut f[..]);
        p.set_frag_offset(65000);
        p.fill_checksum();
        assert_eq!(fragment(&f, 500), Err(FragError::OffsetOverflow));
    }

    #[test]
    fn mtu_too_small() {
        let orig = packet(100, 1);
        assert_eq!(fragment(&orig, 27), Err(FragError::MtuTooSmall));
        assert_eq!(fragment(&orig, 0), Err(FragError::MtuTooSmall));
        assert_eq!(fragment(&orig, 28).unwrap().len(), 13);
        let opts = packet_with(&[1, 1, 1, 0], 100, 1);
        assert_eq!(fragment(&opts, 31), Err(FragError::MtuTooSmall));
    }

    #[test]
    fn options_copied_flag() {
        // Router alert (copied), record route (not copied), EOL.
        let options = [0x94, 4, 0, 0, 0x07, 3, 4, 0];
        let orig = packet_with(&options, 3000, 9);
        let frags = fragment(&orig, 1000).unwrap();
        check_fragments(&orig, &frags, 1000);
        assert_eq!(&frags[0][20..28], &options);
        for f in &frags[1..] {
            assert_eq!(&f[20..28], &[0x94, 4, 0, 0, 1, 1, 1, 0]);
        }
        let mut r = reassembler();
        let mut reversed = frags.clone();
        reversed.reverse();
        assert_eq!(push_all(&mut r, &reversed, Instant::now()), orig);

        // An option running past the header, and one of length 1.
        for bad in [[0x94, 8, 0, 0], [0x07, 1, 0, 0]] {
            let p = packet_with(&bad, 3000, 9);
            assert_eq!(fragment(&p, 1000), Err(FragError::Malformed));
            // A packet that fits is not looked into.
            assert_eq!(fragment(&p, 5000).unwrap(), vec![p]);
        }
    }

    #[test]
    fn reassembled_flags_are_cleared() {
        let mut orig = packet(3000, 4);
        let mut p = Ipv4Packet::new_unchecked(&mut orig[..]);
        p.set_dont_frag(true);
        p.fill_checksum();
        let frags = fragment(&orig, 1500).unwrap();
        assert!(
            frags
                .iter()
                .all(|f| Ipv4Packet::new_checked(&f[..]).unwrap().dont_frag())
        );
        let whole = push_all(&mut reassembler(), &frags, Instant::now());
        let w = Ipv4Packet::new_checked(&whole[..]).unwrap();
        assert!(w.verify_checksum());
        assert!(!w.dont_frag() && !w.more_frags() && w.frag_offset() == 0);
        assert_eq!(w.payload(), &orig[20..]);
    }

    #[test]
    fn overlap_drops_the_datagram() {
        let now = Instant::now();
        let mut r = reassembler();
        assert_eq!(
            r.push(&raw_fragment(1, 0, true, &[1; 16]), now),
            FragOutcome::Pending
        );
        assert_eq!(
            r.push(&raw_fragment(1, 8, true, &[1; 16]), now),
            FragOutcome::Dropped(FragDrop::Overlap)
        );
        assert_eq!((r.in_progress(), r.bytes_held()), (0, 0));
        assert_eq!(r.stats().dropped_overlap, 1);

        // Overlapping the next piece rather than the previous one.
        r.push(&raw_fragment(2, 16, true, &[1; 16]), now);
        assert_eq!(
            r.push(&raw_fragment(2, 8, true, &[1; 16]), now),
            FragOutcome::Dropped(FragDrop::Overlap)
        );
        // Same offset, different bytes.
        r.push(&raw_fragment(3, 16, true, &[1; 16]), now);
        assert_eq!(
            r.push(&raw_fragment(3, 16, true, &[2; 16]), now),
            FragOutcome::Dropped(FragDrop::Overlap)
        );
        // Same offset, different length.
        r.push(&raw_fragment(4, 16, true, &[1; 16]), now);
        assert_eq!(
            r.push(&raw_fragment(4, 16, true, &[1; 8]), now),
            FragOutcome::Dropped(FragDrop::Overlap)
        );
        assert_eq!(r.stats().dropped_overlap, 4);
        assert_eq!((r.in_progress(), r.bytes_held()), (0, 0));
    }

    #[test]
    fn exact_duplicates_are_ignored() {
        let orig = packet(3000, 8);
        let frags = fragment(&orig, 1000).unwrap();
        let mut r = reassembler();
        let now = Instant::now();
        assert_eq!(r.push(&frags[0], now), FragOutcome::Pending);
        let held = r.bytes_held();
        assert_eq!(r.push(&frags[0], now), FragOutcome::Pending);
        assert_eq!(r.bytes_held(), held);
        assert_eq!(r.stats().duplicates, 1);
        assert_eq!(push_all(&mut r, &frags[1..], now), orig);
    }

    #[test]
    fn a_last_duplicate_completes() {
        // The pieces are all there but the end was not known: the same
        // bytes with MF clear finish the datagram.
        let now = Instant::now();
        let mut r = reassembler();
        assert_eq!(
            r.push(&raw_fragment(5, 0, true, &[3; 16]), now),
            FragOutcome::Pending
        );
        assert_eq!(
            r.push(&raw_fragment(5, 16, true, &[4; 8]), now),
            FragOutcome::Pending
        );
        let FragOutcome::Complete(whole) = r.push(&raw_fragment(5, 16, false, &[4; 8]), now) else {
            panic!("not complete");
        };
        assert_eq!(&whole[20..], &[[3u8; 16].as_slice(), &[4; 8]].concat());
    }

    #[test]
    fn inconsistent_ends_are_malformed() {
        let now = Instant::now();
        let mut r = reassembler();
        r.push(&raw_fragment(6, 32, false, &[1; 8]), now);
        // Data past the end.
        assert_eq!(
            r.push(&raw_fragment(6, 40, true, &[1; 8]), now),
            FragOutcome::Dropped(FragDrop::Malformed)
        );
        assert_eq!(r.in_progress(), 0);
        // Two different ends.
        r.push(&raw_fragment(6, 32, false, &[1; 8]), now);
        assert_eq!(
            r.push(&raw_fragment(6, 48, false, &[1; 8]), now),
            FragOutcome::Dropped(FragDrop::Malformed)
        );
        // An end before data already held.
        r.push(&raw_fragment(6, 64, true, &[1; 8]), now);
        assert_eq!(
            r.push(&raw_fragment(6, 16, false, &[1; 8]), now),
            FragOutcome::Dropped(FragDrop::Malformed)
        );
        assert_eq!(r.in_progress(), 0);
        assert_eq!(r.stats().dropped_malformed, 3);
    }

    #[test]
    fn too_big() {
        let now = Instant::now();
        let mut r = reassembler();
        // 20 + 65528 + 8 > 65535.
        assert_eq!(
            r.push(&raw_fragment(7, 65528, false, &[0; 8]), now),
            FragOutcome::Dropped(FragDrop::TooBig)
        );
        // Exactly 65535 is fine: 20 + 65512 + 3.
        r.push(&raw_fragment(7, 0, true, &[0; 8]), now);
        assert_eq!(
            r.push(&raw_fragment(7, 65512, false, &[0; 3]), now),
            FragOutcome::Pending
        );
        // One more byte drops the datagram in progress.
        r.push(&raw_fragment(8, 0, true, &[0; 8]), now);
        assert_eq!(r.in_progress(), 2);
        assert_eq!(
            r.push(&raw_fragment(8, 65512, false, &[0; 4]), now),
            FragOutcome::Dropped(FragDrop::TooBig)
        );
        assert_eq!(r.in_progress(), 1);
        // The first fragment's options count once it arrives.
        r.push(&raw_fragment(9, 65512, false, &[0; 3]), now);
        let mut first = packet_with(&[1, 1, 1, 1], 8, 9);
        let mut p = Ipv4Packet::new_unchecked(&mut first[..]);
        p.set_more_frags(true);
        p.fill_checksum();
        assert_eq!(r.push(&first, now), FragOutcome::Dropped(FragDrop::TooBig));
        assert_eq!(r.stats().dropped_too_big, 3);
        assert_eq!(r.in_progress(), 1);
    }

    #[test]
    fn malformed_packets() {
        let now = Instant::now();
        let mut r = reassembler();
        let good = raw_fragment(10, 0, true, &[5; 16]);

        let mut bad_sum = good.clone();
        bad_sum[10] ^= 1;
        let mut v6 = good.clone();
        v6[0] = 0x65;
        let mut short_ihl = good.clone();
        short_ihl[0] = 0x44;
        let mut long_len = good.clone();
        Ipv4Packet::new_unchecked(&mut long_len[..]).set_total_len(100);
        Ipv4Packet::new_unchecked(&mut long_len[..]).fill_checksum();
        let whole = packet(16, 10);
        for bad in [
            bad_sum,
            v6,
            short_ihl,
            long_len,
            good[..good.len() - 1].to_vec(),
            good[..19].to_vec(),
            Vec::new(),
            whole,
        ] {
            assert_eq!(r.push(&bad, now), FragOutcome::Dropped(FragDrop::Malformed));
            assert_eq!(fragment(&bad, 20).err(), {
                if Ipv4Packet::new_checked(&bad[..]).is_ok_and(|p| p.verify_checksum())
                    && bad[0] >> 4 == 4
                {
                    Some(FragError::MtuTooSmall)
                } else {
                    Some(FragError::Malformed)
                }
            });
        }
        assert_eq!(r.stats().dropped_malformed, 8);
        assert_eq!(r.in_progress(), 0);

        // A bad header leaves the datagram in progress alone; a bad length
        // with a sound header discards it.
        assert_eq!(r.push(&good, now), FragOutcome::Pending);
        let mut bad_sum = raw_fragment(10, 16, true, &[5; 16]);
        bad_sum[10] ^= 1;
        assert_eq!(
            r.push(&bad_sum, now),
            FragOutcome::Dropped(FragDrop::Malformed)
        );
        assert_eq!(r.in_progress(), 1);
        assert_eq!(
            r.push(&raw_fragment(10, 16, true, &[5; 12]), now),
            FragOutcome::Dropped(FragDrop::Malformed)
        );
        assert_eq!(r.in_progress(), 0);
        // An empty fragment.
        assert_eq!(
            r.push(&raw_fragment(10, 16, false, &[]), now),
            FragOutcome::Dropped(FragDrop::Malformed)
        );
        // A last fragment of any length is fine.
        assert_eq!(
            r.push(&raw_fragment(10, 16, false, &[5; 3]), now),
            FragOutcome::Pending
        );
        assert_eq!(r.stats().dropped_malformed, 11);
        assert_eq!(r.stats().fragments, 13);
    }

    #[test]
    fn max_datagrams_evicts_the_oldest() {
        let mut r = Reassembler::new(ReassemblyLimits {
            max_datagrams: 4,
            ..ReassemblyLimits::default()
        });
        let start = Instant::now();
        let packets: Vec<Vec<u8>> = (0..10).map(|i| packet(3000, 100 + i)).collect();
        let frags: Vec<Vec<Vec<u8>>> = packets.iter().map(|p| fragment(p, 1500).unwrap()).collect();
        for (i, f) in frags.iter().enumerate() {
            let now = start + Duration::from_millis(i as u64);
            assert_eq!(r.push(&f[0], now), FragOutcome::Pending);
            assert!(r.in_progress() <= 4);
        }
        assert_eq!(r.in_progress(), 4);
        assert_eq!(r.stats().evicted, 6);
        // The six oldest are gone: their rest starts a new datagram again.
        assert_eq!(r.push(&frags[0][1], start), FragOutcome::Pending);
        assert_eq!(r.stats().evicted, 7);
        for i in 7..10 {
            assert_eq!(push_all(&mut r, &frags[i][1..], start), packets[i]);
        }
    }

    #[test]
    fn max_bytes_is_never_exceeded() {
        let one = 1480 + FRAGMENT_OVERHEAD + IPV4_HEADER_LEN;
        let limits = ReassemblyLimits {
            max_bytes: 3 * one + 100,
            ..ReassemblyLimits::default()
        };
        let mut r = Reassembler::new(limits);
        let now = Instant::now();
        for i in 0..20 {
            let f = fragment(&packet(3000, 200 + i), 1500).unwrap();
            assert_eq!(r.push(&f[0], now), FragOutcome::Pending);
            assert!(r.bytes_held() <= limits.max_bytes);
        }
        assert_eq!(r.in_progress(), 3);
        assert_eq!(r.bytes_held(), 3 * one);
        assert_eq!(r.stats().evicted, 17);

        // A fragment larger than the whole limit: no room, nothing evicted.
        let mut small = Reassembler::new(ReassemblyLimits {
            max_bytes: 1000,
            ..ReassemblyLimits::default()
        });
        let f = fragment(&packet(3000, 1), 1500).unwrap();
        assert_eq!(
            small.push(&f[1], now),
            FragOutcome::Dropped(FragDrop::NoRoom)
        );
        // A datagram outgrowing the limit on its own is discarded.
        let f = fragment(&packet(3000, 2), 600).unwrap();
        assert_eq!(small.push(&f[0], now), FragOutcome::Pending);
        assert_eq!(
            small.push(&f[1], now),
            FragOutcome::Dropped(FragDrop::NoRoom)
        );
        assert_eq!((small.in_progress(), small.bytes_held()), (0, 0));
        assert_eq!(small.stats().dropped_no_room, 2);
        assert_eq!(small.stats().evicted, 0);

        let mut none = Reassembler::new(ReassemblyLimits {
            max_datagrams: 0,
            ..ReassemblyLimits::default()
        });
        assert_eq!(
            none.push(&f[0], now),
            FragOutcome::Dropped(FragDrop::NoRoom)
        );
    }

    #[test]
    fn byte_eviction_spares_the_growing_datagram() {
        let one = 968 + FRAGMENT_OVERHEAD;
        let mut r = Reassembler::new(ReassemblyLimits {
            max_bytes: 4 * one + IPV4_HEADER_LEN,
            ..ReassemblyLimits::default()
        });
        let now = Instant::now();
        let old = fragment(&packet(3000, 1), 988).unwrap();
        let new = fragment(&packet(3000, 2), 988).unwrap();
        assert_eq!(new.len(), 4);
        r.push(&old[1], now);
        r.push(&old[2], now);
        r.push(&new[1], now + Duration::from_secs(1));
        r.push(&new[2], now + Duration::from_secs(1));
        // The new datagram's first fragment needs the old one's room.
        assert_eq!(
            r.push(&new[0], now + Duration::from_secs(1)),
            FragOutcome::Pending
        );
        assert_eq!(r.stats().evicted, 1);
        assert_eq!(
            r.push(&new[3], now + Duration::from_secs(2)),
            FragOutcome::Complete(packet(3000, 2))
        );
        assert_eq!(r.bytes_held(), 0);
    }

    #[test]
    fn expire_quotes_the_first_fragment() {
        let limits = ReassemblyLimits::default();
        let mut r = Reassembler::new(limits);
        let start = Instant::now();
        let a = fragment(&packet(3000, 1), 1500).unwrap();
        let b = fragment(&packet(3000, 2), 1500).unwrap();
        r.push(&a[0], start);
        r.push(&b[1], start + Duration::from_secs(1));
        // Later fragments do not extend the lifetime.
        r.push(&a[1], start + Duration::from_secs(20));
        assert!(
            r.expire(start + limits.timeout - Duration::from_millis(1))
                .is_empty()
        );
        let gone = r.expire(start + limits.timeout);
        assert_eq!(gone.len(), 1);
        assert_eq!((gone[0].key_src, gone[0].key_dst), (SRC, DST));
        assert_eq!(gone[0].first.as_deref(), Some(&a[0][..IPV4_HEADER_LEN + 8]));
        let gone = r.expire(start + Duration::from_secs(60));
        assert_eq!(gone.len(), 1);
        assert_eq!(gone[0].first, None);
        assert_eq!((r.in_progress(), r.bytes_held()), (0, 0));
        assert_eq!(r.stats().timed_out, 2);
        // Time going backwards expires nothing and does not panic.
        r.push(&a[0], start + Duration::from_secs(100));
        assert!(r.expire(start).is_empty());
    }

    #[test]
    fn garbage_never_panics() {
        let limits = ReassemblyLimits {
            max_datagrams: 8,
            max_bytes: 20_000,
            timeout: Duration::from_secs(1),
        };
        let mut r = Reassembler::new(limits);
        let mut lcg = Lcg(0x5eed);
        let start = Instant::now();
        let seeds: Vec<Vec<u8>> = [
            fragment(&packet(3000, 1), 600).unwrap(),
            fragment(&packet_with(&[0x94, 4, 0, 0], 2000, 2), 300).unwrap(),
        ]
        .concat();
        for i in 0..5000u64 {
            let mut buf: Vec<u8> = match lcg.below(3) {
                // Pure noise.
                0 => (0..lcg.below(80)).map(|_| lcg.next() as u8).collect(),
                // A real fragment, cut short or mangled.
                _ => {
                    let mut b = seeds[lcg.below(seeds.len())].clone();
                    for _ in 0..lcg.below(3) {
                        let at = lcg.below(b.len());
                        b[at] = lcg.next() as u8;
                    }
                    if lcg.below(4) == 0 {
                        b.truncate(lcg.below(b.len() + 1));
                    }
                    b
                }
            };
            // Mostly make the header checksum right so the deeper paths run.
            if buf.len() >= IPV4_HEADER_LEN && lcg.below(4) != 0 {
                if lcg.below(2) == 0 {
                    buf[0] = 0x45;
                }
                let mut p = Ipv4Packet::new_unchecked(&mut buf[..]);
                if usize::from(p.header_len()) <= p.as_ref().len() {
                    p.fill_checksum();
                }
            }
            let now = start + Duration::from_millis(i);
            let _ = is_fragment(&buf);
            let _ = r.push(&buf, now);
            let _ = fragment(&buf, 20 + lcg.below(200));
            if i % 100 == 0 {
                r.expire(now);
            }
            assert!(r.in_progress() <= limits.max_datagrams);
            assert!(r.bytes_held() <= limits.max_bytes);
        }
        let s = r.stats();
        assert!(
            s.reassembled > 0 && s.dropped_overlap > 0 && s.evicted > 0,
            "{s:?}"
        );
        assert_eq!(r.stats().fragments, 5000);
    }
}
