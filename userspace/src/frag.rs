//! IP fragment reassembly (bounded memory, timeouts) and fragmentation, for
//! IPv4 (RFC 791) and IPv6 (RFC 8200 §4.5, RFC 5722).
//!
//! # Theory of operation
//!
//! Everything here is pure: packets in, packets out, no I/O and no clock of
//! its own (the caller passes `now`). Nothing panics on any input; every
//! fixed header is read through smoltcp's [`Ipv4Packet`] or [`Ipv6Packet`]
//! after its length checks, and every other slice access goes through
//! `get`. The one piece of state outside a [`Reassembler`] is the counter
//! behind the identification of the IPv6 fragments [`fragment`] makes.
//!
//! One [`Reassembler`] takes fragments of both families, told apart by the
//! version nibble; the two never share a datagram (the family is part of
//! the key) but do share the limits below.
//!
//! ## Reassembly ([`Reassembler`])
//!
//! **IPv4.** A fragment is accepted when its header is sound: version 4,
//! IHL ≥ 5, a valid header checksum, the total length within the buffer
//! (trailing bytes, e.g. Ethernet padding, are ignored), and MF set or a
//! non-zero offset. Its key is (source, destination, protocol,
//! identification), RFC 791.
//!
//! **IPv6.** A fragment is accepted when its fixed header is sound (version
//! 6, the payload length within the buffer; trailing bytes are ignored)
//! and a Fragment header (next header 44) follows it, either directly or
//! behind at most [`MAX_EXT_HEADERS`] extension headers that belong to the
//! unfragmentable part: a Hop-by-Hop Options header (first only), Routing
//! and Destination Options headers. Any other header before it, or a
//! Fragment header cut short, makes the packet [`FragDrop::Malformed`].
//! Its key is (source, destination, identification), RFC 8200 §4.5. A
//! fragment with offset 0 and M clear (an "atomic fragment", RFC 6946) is
//! not held: it comes back at once as [`FragOutcome::Complete`], its
//! Fragment header removed, and no datagram in progress is touched
//! (counted in [`FragStats::atomic`]).
//!
//! In both families, a packet failing these checks is
//! [`FragDrop::Malformed`] and only that packet is dropped: its key cannot
//! be trusted, so no datagram in progress is touched.
//!
//! For each datagram in progress the reassembler holds the fragments'
//! payloads as separate pieces sorted by offset and never overlapping, the
//! first fragment's header once it has arrived (IPv4: the IP header with
//! its options; IPv6: everything up to and including the Fragment header),
//! and the payload length once the last fragment (MF or M clear) has
//! arrived. The datagram is complete when the header is there, the length
//! is known and the pieces add up to it; then the pieces are copied behind
//! the first fragment's header, and the result is returned as
//! [`FragOutcome::Complete`]:
//! * IPv4: the header with its options, whose flags (reserved, DF and MF)
//!   and offset are cleared and whose total length and checksum are
//!   recomputed;
//! * IPv6: the first fragment's unfragmentable part (the fixed header and
//!   the extension headers before the Fragment header) without the Fragment
//!   header; the payload length is recomputed and the next header of the
//!   header that preceded the Fragment header is set to the first
//!   fragment's Fragment header's next header (RFC 8200: only the offset-0
//!   fragment's unfragmentable part and next header are used).
//!
//! Once a fragment's header is sound, every other problem discards the
//! whole datagram in progress under its key, if any, as Linux does:
//! * [`FragDrop::Malformed`]: an empty fragment, a non-last fragment whose
//!   payload is not a multiple of 8 bytes, or fragments that disagree about
//!   where the datagram ends (two different last fragments, data past the
//!   last fragment's end);
//! * [`FragDrop::TooBig`]: the reassembled datagram would exceed its
//!   family's limit: IPv4, 65535 bytes header included (the first
//!   fragment's header length is used once known, 20 bytes until then);
//!   IPv6, a payload length of 65535 (the unfragmentable part past the
//!   fixed header counts once the first fragment is known);
//! * [`FragDrop::Overlap`]: a fragment overlaps one already held (RFC 5722
//!   for IPv6, Linux for IPv4 since 4.19: overlaps are an attack, not a
//!   retransmission). **Exact duplicates** — same offset, same length and
//!   the same bytes — are the exception: they are ignored and the outcome
//!   is [`FragOutcome::Pending`] (counted in [`FragStats::duplicates`]);
//!   a last fragment duplicating a piece held from a non-last one still
//!   records where the datagram ends. A fragment at the same place with
//!   *different* bytes is an overlap. As in Linux, the fragments of a
//!   discarded datagram that arrive later start a new one (RFC 5722 would
//!   also discard those "not yet received"; that would need a tombstone per
//!   datagram for the rest of its timeout).
//!
//! ## Bounds
//!
//! At most [`ReassemblyLimits::max_datagrams`] datagrams are in progress and
//! at most [`ReassemblyLimits::max_bytes`] bytes are held, both families
//! together. A held fragment is charged its payload plus
//! [`FRAGMENT_OVERHEAD`] bytes (so a flood of tiny fragments cannot hold
//! much more real memory than the limit says), and the first fragment's
//! header is charged too. When a fragment needs room, the oldest datagrams
//! (in order of their first fragment's arrival) are **evicted** — discarded
//! silently, counted in [`FragStats::evicted`] — until it fits. Under a
//! flood this keeps the quick-to-complete legitimate datagrams going, where
//! refusing new datagrams would block them for a whole timeout. The
//! fragment is refused with [`FragDrop::NoRoom`] only when no eviction can
//! make room: the fragment alone exceeds the byte limit, `max_datagrams` is
//! zero, or its own datagram would exceed the byte limit (that datagram can
//! never complete and is discarded).
//!
//! ## Timeouts
//!
//! A datagram lives [`ReassemblyLimits::timeout`] from its first fragment's
//! arrival (30 s, Linux's `ipfrag_time`, for both families; RFC 8200 says
//! 60 s for IPv6, an upper bound). [`Reassembler::expire`] discards the
//! ones past it and returns, for each, what the ICMP error about it quotes
//! when the first fragment had arrived:
//! * IPv4: the first fragment's header and first 8 payload bytes, exactly
//!   the quote of an ICMP time exceeded, code 1 (RFC 792; RFC 1122 §3.3.2
//!   sends it only in that case);
//! * IPv6: the first fragment as received (Fragment header included), cut
//!   at [`QUOTE6_MAX`] bytes: the quote of an ICMPv6 time exceeded, code 1
//!   (RFC 8200 §4.5, RFC 4443 §3.3), which fits 1280 bytes.
//!
//! `push` does not look at the clock other than to stamp new datagrams, so
//! the caller runs `expire` periodically; `now` is expected not to go
//! backwards (as [`Instant::now`] does not).
//!
//! ## Fragmentation ([`fragment`])
//!
//! **IPv4.** The payload is cut into pieces of `(mtu − header length)`
//! bytes rounded down to a multiple of 8; every piece gets a copy of the
//! header with its own total length, offset, MF and checksum.
//! Identification, TOS, TTL, protocol, addresses and the DF and reserved
//! bits are kept. A packet that is itself a fragment is cut further: the
//! offsets are relative to its own, and its MF stays on its last piece. IP
//! options are treated as Linux does (`ip_options_fragment`): the first
//! fragment carries them all, the others keep the same header length but
//! every option without the "copied" flag (RFC 791) is overwritten with
//! NOPs; a malformed option list makes the packet [`FragError::Malformed`].
//!
//! **IPv6** (RFC 8200 §4.5). An MTU below 1280 is
//! [`FragError::MtuTooSmall`] whatever the packet. The packet splits into
//! its unfragmentable part — the fixed header, a Hop-by-Hop Options header
//! and everything up to the last Routing header (Destination Options
//! headers before it), looked for through at most [`MAX_EXT_HEADERS`]
//! extension headers — and the fragmentable rest, cut into pieces of
//! `(mtu − unfragmentable length − 8)` bytes rounded down to a multiple of
//! 8. Each piece gets a copy of the unfragmentable part, its last next
//! header changed to 44, its payload length fixed, and a Fragment header
//! carrying the original next header, the offset, M (set on every piece
//! but the last) and the identification. The identification comes from a
//! process-wide counter that starts at a random value (std's `RandomState`)
//! and advances by one per fragmented packet ([`fragment`]), or from the
//! caller ([`fragment_with_ident`]). A packet that already has a Fragment
//! header is not fragmented again (IPv6 fragments only at the source):
//! [`FragError::Malformed`].

use std::{
    collections::{BTreeMap, HashMap, hash_map::RandomState},
    hash::BuildHasher,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::{
        OnceLock,
        atomic::{AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

use smoltcp::wire::{IPV4_HEADER_LEN, IPV6_HEADER_LEN, Ipv4Packet, Ipv6Packet};
use thiserror::Error;

/// Largest IPv4 datagram, header included.
pub const MAX_DATAGRAM: usize = 65535;

/// Largest IPv6 payload length (a reassembled IPv6 datagram is at most the
/// 40-byte fixed header plus this; jumbograms are not fragmented).
pub const MAX_PAYLOAD6: usize = 65535;

/// Bytes charged against [`ReassemblyLimits::max_bytes`] for each held
/// fragment on top of its payload (bookkeeping and allocator overhead).
pub const FRAGMENT_OVERHEAD: usize = 64;

/// How many payload bytes of the first IPv4 fragment an [`Expired`] quotes
/// (RFC 792: the first 64 bits of the datagram's data).
pub const QUOTE_PAYLOAD_LEN: usize = 8;

/// How many bytes of the first IPv6 fragment an [`Expired`] quotes at most:
/// what fits in a 1280-byte ICMPv6 error after its IPv6 and ICMPv6 headers
/// (RFC 4443 §2.4 (c)).
pub const QUOTE6_MAX: usize = 1280 - IPV6_HEADER_LEN - 8;

/// The IPv6 minimum link MTU (RFC 8200 §5): [`fragment`] refuses less.
pub const IPV6_MIN_MTU: usize = 1280;

/// Length of the IPv6 Fragment header.
pub const FRAG6_HEADER_LEN: usize = 8;

/// How many IPv6 extension headers (Hop-by-Hop, Routing, Destination
/// Options) are looked through, before a Fragment header or to the end of
/// the unfragmentable part.
pub const MAX_EXT_HEADERS: usize = 4;

/// IPv6 next header: Hop-by-Hop Options.
const NH_HOP_BY_HOP: u8 = 0;
/// IPv6 next header: Routing.
const NH_ROUTING: u8 = 43;
/// IPv6 next header: Fragment.
const NH_FRAGMENT: u8 = 44;
/// IPv6 next header: Destination Options.
const NH_DEST_OPTS: u8 = 60;
/// Offset of the next header field in the IPv6 fixed header.
const IPV6_NEXT_HEADER_AT: usize = 6;

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

/// Whether `ip` is an IPv4 packet with MF set or a non-zero fragment
/// offset, or an IPv6 packet with a Fragment header.
///
/// The cheap test for whether a packet goes to a [`Reassembler`], without
/// checksum or length checks. IPv4: only the first 20 bytes are looked at.
/// IPv6: the next header chain is followed through at most
/// [`MAX_EXT_HEADERS`] Hop-by-Hop, Routing and Destination Options headers
/// within the buffer; a Fragment header found there counts even if cut
/// short (the reassembler then drops it as malformed), and so does an
/// atomic fragment (offset 0, M clear). False for anything shorter than a
/// fixed header or of another version.
pub fn is_fragment(ip: &[u8]) -> bool {
    match ip.first().map(|b| b >> 4) {
        Some(4) if ip.len() >= IPV4_HEADER_LEN => {
            let p = Ipv4Packet::new_unchecked(ip);
            p.more_frags() || p.frag_offset() != 0
        }
        Some(6) if ip.len() >= IPV6_HEADER_LEN => find_fragment_header(ip).is_some(),
        _ => false,
    }
}

/// For an IPv6 fragment — or the start of one, such as an
/// [`Expired::first`] quote — the next header of its Fragment header and
/// the bytes after that header in `ip` (the start of the fragment's data).
/// `None` if `ip` is not IPv6 or no Fragment header is found as
/// [`is_fragment`] looks for one, or the Fragment header is cut short.
pub fn fragment6_payload(ip: &[u8]) -> Option<(u8, &[u8])> {
    if ip.first().map(|b| b >> 4) != Some(6) || ip.len() < IPV6_HEADER_LEN {
        return None;
    }
    let (at, _) = find_fragment_header(ip)?;
    let next = *ip.get(at)?;
    let data = ip.get(at.checked_add(FRAG6_HEADER_LEN)?..)?;
    Some((next, data))
}

/// What became of a fragment given to [`Reassembler::push`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FragOutcome {
    /// The datagram is whole: a complete IP packet. IPv4: the first
    /// fragment's header with its options, flags — reserved, DF, MF — and
    /// offset cleared, total length and header checksum recomputed. IPv6:
    /// the first fragment's unfragmentable part, the Fragment header gone,
    /// the next header and payload length fixed.
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
    /// The datagram would exceed its family's limit (IPv4: 65535 bytes;
    /// IPv6: a 65535-byte payload); it is discarded.
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
    /// Source address of the datagram (its family is the datagram's).
    pub key_src: IpAddr,
    /// Destination address of the datagram.
    pub key_dst: IpAddr,
    /// If the first fragment arrived, the quote for the "fragment
    /// reassembly time exceeded" error (time exceeded, code 1). IPv4: the
    /// first fragment's header (as received, options included) and first 8
    /// payload bytes (RFC 792, RFC 1122 §3.3.2). IPv6: the first fragment
    /// as received, Fragment header included, cut at [`QUOTE6_MAX`] bytes
    /// (RFC 8200 §4.5).
    pub first: Option<Vec<u8>>,
}

/// Counters of a [`Reassembler`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FragStats {
    /// Packets given to [`Reassembler::push`].
    pub fragments: u64,
    /// Datagrams completed (atomic fragments not included).
    pub reassembled: u64,
    /// IPv6 atomic fragments (offset 0, M clear) returned at once.
    pub atomic: u64,
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

/// The address family of a fragment.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Family {
    V4,
    V6,
}

impl Family {
    /// The header length a datagram is assumed to have until its first
    /// fragment arrives (the fixed header).
    fn base_header(self) -> usize {
        match self {
            Self::V4 => IPV4_HEADER_LEN,
            Self::V6 => IPV6_HEADER_LEN,
        }
    }

    /// The largest reassembled datagram, header included.
    fn max_len(self) -> usize {
        match self {
            Self::V4 => MAX_DATAGRAM,
            Self::V6 => IPV6_HEADER_LEN + MAX_PAYLOAD6,
        }
    }
}

/// The reassembly key: RFC 791's (source, destination, protocol,
/// identification) for IPv4, RFC 8200's (source, destination,
/// identification) for IPv6 (`proto` zero). Addresses are 16 bytes, an
/// IPv4 address in the first four (the rest zero).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Key {
    family: Family,
    src: [u8; 16],
    dst: [u8; 16],
    proto: u8,
    ident: u32,
}

impl Key {
    fn addr(&self, a: [u8; 16]) -> IpAddr {
        match self.family {
            Family::V4 => IpAddr::V4(Ipv4Addr::new(a[0], a[1], a[2], a[3])),
            Family::V6 => IpAddr::V6(Ipv6Addr::from(a)),
        }
    }
}

/// An IPv4 address as a key's 16 bytes.
fn v4_key_addr(a: Ipv4Addr) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[..4].copy_from_slice(&a.octets());
    out
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

/// The header of a datagram's first fragment.
#[derive(Debug)]
struct First {
    /// As received: the IPv4 header, or the IPv6 headers up to and
    /// including the Fragment header.
    bytes: Vec<u8>,
    /// How much of `bytes` goes into the reassembled datagram (IPv4: all;
    /// IPv6: the unfragmentable part, up to the Fragment header).
    unfrag: usize,
    /// IPv6: where the next header naming the Fragment header sits.
    nh_at: usize,
    /// IPv6: the Fragment header's next header.
    next: u8,
}

/// A datagram in progress.
#[derive(Debug)]
struct Datagram {
    /// Arrival order, the key of `Reassembler::order`.
    seq: u64,
    /// When the first fragment (in arrival order) came.
    first_seen: Instant,
    /// The fragment at offset 0's header.
    header: Option<First>,
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
    /// IPv4: the IP header; IPv6: the headers through the Fragment header.
    header: &'a [u8],
    /// How much of `header` a reassembled datagram keeps (see [`First`]).
    unfrag: usize,
    /// IPv6: where the next header naming the Fragment header sits.
    nh_at: usize,
    /// IPv6: the Fragment header's next header.
    next: u8,
    payload: &'a [u8],
    offset: usize,
    more: bool,
}

impl Fragment<'_> {
    fn end(&self) -> usize {
        self.offset + self.payload.len()
    }

    /// The header length the reassembled datagram gets from this fragment
    /// if it is the first, or from `held`, or the family's base.
    fn header_len(&self, held: Option<&First>) -> usize {
        if self.offset == 0 {
            self.unfrag
        } else {
            held.map_or(self.key.family.base_header(), |h| h.unfrag)
        }
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
        let hl = f.header_len(self.header.as_ref());
        if hl + end.max(self.max_end) > f.key.family.max_len() {
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
                self.header = Some(First {
                    bytes: f.header.to_vec(),
                    unfrag: f.unfrag,
                    nh_at: f.nh_at,
                    next: f.next,
                });
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
    fn assemble(&self, family: Family) -> Option<Vec<u8>> {
        let first = self.header.as_ref()?;
        match family {
            Family::V4 => {
                let header = &first.bytes;
                let total = u16::try_from(header.len() + self.received).ok()?;
                let mut out = Vec::with_capacity(usize::from(total));
                out.extend_from_slice(header);
                for p in &self.pieces {
                    out.extend_from_slice(&p.data);
                }
                // The header came from a checked packet: at least 20
                // bytes, which is all the setters touch (the checksum
                // covers the header only).
                let mut ip = Ipv4Packet::new_unchecked(&mut out[..]);
                ip.set_total_len(total);
                ip.clear_flags();
                ip.set_frag_offset(0);
                ip.fill_checksum();
                Some(out)
            }
            Family::V6 => assemble6(first, self.pieces.iter().map(|p| p.data.as_slice())),
        }
    }

    /// The ICMP quote (see [`Expired::first`]).
    fn quote(&self, family: Family) -> Option<Vec<u8>> {
        let header = &self.header.as_ref()?.bytes;
        let first = self.pieces.first().filter(|p| p.offset == 0)?;
        let data = match family {
            Family::V4 => first.data.get(..QUOTE_PAYLOAD_LEN).unwrap_or(&first.data),
            Family::V6 => {
                let room = QUOTE6_MAX.saturating_sub(header.len());
                first.data.get(..room).unwrap_or(&first.data)
            }
        };
        let mut q = Vec::with_capacity(header.len() + data.len());
        q.extend_from_slice(header);
        q.extend_from_slice(data);
        if family == Family::V6 {
            q.truncate(QUOTE6_MAX);
        }
        Some(q)
    }
}

/// An IPv6 datagram from its first fragment's headers and its payload
/// `pieces` in order: the unfragmentable part, the next header naming the
/// Fragment header replaced by the Fragment header's, the payload length
/// fixed. `None` if the payload length would not fit.
fn assemble6<'a>(first: &First, pieces: impl Iterator<Item = &'a [u8]> + Clone) -> Option<Vec<u8>> {
    let unfrag = first.bytes.get(..first.unfrag)?;
    let data: usize = pieces.clone().map(<[u8]>::len).sum();
    let payload_len = u16::try_from((unfrag.len() + data).checked_sub(IPV6_HEADER_LEN)?).ok()?;
    let mut out = Vec::with_capacity(unfrag.len() + data);
    out.extend_from_slice(unfrag);
    for p in pieces {
        out.extend_from_slice(p);
    }
    *out.get_mut(first.nh_at)? = first.next;
    // At least the 40-byte fixed header (`unfrag` comes from a checked
    // packet), which is all the setter touches.
    Ipv6Packet::new_unchecked(&mut out[..]).set_payload_len(payload_len);
    Some(out)
}

/// Reassembles IPv4 and IPv6 datagrams from their fragments, within
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
    match ip.first().map(|b| b >> 4) {
        Some(6) => parse_fragment6(ip),
        _ => parse_fragment4(ip),
    }
}

/// [`parse_fragment`] for IPv4.
fn parse_fragment4(ip: &[u8]) -> Option<Fragment<'_>> {
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
            family: Family::V4,
            src: v4_key_addr(p.src_addr()),
            dst: v4_key_addr(p.dst_addr()),
            proto: u8::from(p.next_header()),
            ident: u32::from(p.ident()),
        },
        header: ip.get(..hl)?,
        unfrag: hl,
        nh_at: 0,
        next: 0,
        payload: ip.get(hl..total)?,
        offset,
        more,
    })
}

/// [`parse_fragment`] for IPv6.
fn parse_fragment6(ip: &[u8]) -> Option<Fragment<'_>> {
    let p = Ipv6Packet::new_checked(ip).ok()?;
    if p.version() != 6 {
        return None;
    }
    let total = IPV6_HEADER_LEN + usize::from(p.payload_len());
    let bytes = ip.get(..total)?;
    let (at, nh_at) = find_fragment_header(bytes)?;
    let end = at.checked_add(FRAG6_HEADER_LEN)?;
    let fh = bytes.get(at..end)?;
    let (&next, field, ident) = match fh {
        [next, _reserved, f0, f1, i0, i1, i2, i3] => (
            next,
            u16::from_be_bytes([*f0, *f1]),
            u32::from_be_bytes([*i0, *i1, *i2, *i3]),
        ),
        _ => return None,
    };
    Some(Fragment {
        key: Key {
            family: Family::V6,
            src: p.src_addr().octets(),
            dst: p.dst_addr().octets(),
            proto: 0,
            ident,
        },
        header: bytes.get(..end)?,
        unfrag: at,
        nh_at,
        next,
        payload: bytes.get(end..)?,
        // The offset in 8-byte units sits in the top 13 bits.
        offset: usize::from(field & !7),
        more: field & 1 != 0,
    })
}

/// Follows the next header chain of the IPv6 packet `ip` (at least its
/// fixed header) through at most [`MAX_EXT_HEADERS`] extension headers of
/// the unfragmentable part (Hop-by-Hop first only, Routing, Destination
/// Options) to a Fragment header: its offset, and the offset of the next
/// header byte naming it. The Fragment header itself may lie past the end
/// of `ip`; the headers before it must not.
fn find_fragment_header(ip: &[u8]) -> Option<(usize, usize)> {
    let mut next = *ip.get(IPV6_NEXT_HEADER_AT)?;
    let mut nh_at = IPV6_NEXT_HEADER_AT;
    let mut at = IPV6_HEADER_LEN;
    for n in 0..=MAX_EXT_HEADERS {
        match next {
            NH_FRAGMENT => return Some((at, nh_at)),
            NH_HOP_BY_HOP if n == 0 => {}
            NH_ROUTING | NH_DEST_OPTS if n < MAX_EXT_HEADERS => {}
            _ => return None,
        }
        let len = (usize::from(*ip.get(at + 1)?) + 1) * 8;
        next = *ip.get(at)?;
        nh_at = at;
        at += len;
        if at > ip.len() {
            return None;
        }
    }
    None
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

    /// Takes one fragment: `ip` is an IPv4 packet with MF set or a non-zero
    /// offset, or an IPv6 packet with a Fragment header (see
    /// [`is_fragment`]; anything else is [`FragDrop::Malformed`]). Trailing
    /// bytes past the packet's length are ignored. `now` stamps the
    /// datagram if this is its first fragment. An IPv6 atomic fragment
    /// comes back at once, without its Fragment header.
    pub fn push(&mut self, ip: &[u8], now: Instant) -> FragOutcome {
        self.stats.fragments += 1;
        let Some(f) = parse_fragment(ip) else {
            return self.dropped(FragDrop::Malformed);
        };
        if f.key.family == Family::V6 && f.offset == 0 && !f.more {
            return self.atomic(&f);
        }
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
        let whole = dg.assemble(f.key.family);
        self.discard(&f.key);
        match whole {
            Some(packet) => {
                self.stats.reassembled += 1;
                FragOutcome::Complete(packet)
            }
            None => self.dropped(FragDrop::Malformed),
        }
    }

    /// An IPv6 atomic fragment (RFC 6946): the packet without its Fragment
    /// header, leaving every datagram in progress alone.
    fn atomic(&mut self, f: &Fragment<'_>) -> FragOutcome {
        let first = First {
            bytes: f.header.to_vec(),
            unfrag: f.unfrag,
            nh_at: f.nh_at,
            next: f.next,
        };
        match assemble6(&first, std::iter::once(f.payload)) {
            Some(packet) => {
                self.stats.atomic += 1;
                FragOutcome::Complete(packet)
            }
            None => self.dropped(FragDrop::Malformed),
        }
    }

    /// Starts a datagram for `f`, making room for it.
    fn start(&mut self, f: &Fragment<'_>, charge: usize, now: Instant) -> Result<Place, FragDrop> {
        if f.header_len(None) + f.end() > f.key.family.max_len() {
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
                    key_src: key.addr(key.src),
                    key_dst: key.addr(key.dst),
                    first: dg.quote(key.family),
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
    /// Not a sound IP packet: IPv4, a bad version, IHL, checksum, lengths
    /// or option list; IPv6, a bad version or payload length, extension
    /// headers running past the packet or more of them than
    /// [`MAX_EXT_HEADERS`], or a Fragment header already there.
    #[error("malformed IP packet")]
    Malformed,
    /// The MTU cannot carry the header and 8 payload bytes, or is below
    /// 1280 for IPv6.
    #[error("MTU too small for the header and 8 bytes of payload")]
    MtuTooSmall,
    /// A fragment's offset would not fit in the 13-bit offset field (only
    /// possible when fragmenting an IPv4 fragment).
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

/// Splits an IP packet into fragments of at most `mtu` bytes each (IP
/// header included); by the version nibble, an IPv4 or an IPv6 packet.
///
/// Trailing bytes past the packet's length are ignored. A packet that
/// already fits is returned as the one element (for IPv6, only with an MTU
/// of at least 1280).
///
/// IPv4: payload offsets are multiples of 8; identification, TOS, TTL,
/// protocol, addresses and the DF and reserved bits are kept (the caller
/// decides about DF: this function ignores it); each header's checksum is
/// fixed. A packet that is itself a fragment is split further (offsets add
/// up, MF stays on the last piece if the input had it). Options: the first
/// fragment has them all, the others the same header length with
/// non-copied options overwritten by NOPs (see the module documentation).
///
/// IPv6: fragments with a Fragment header behind the unfragmentable part,
/// each piece's data a multiple of 8 bytes but the last's; the
/// identification is the next value of a process-wide counter (see the
/// module documentation; [`fragment_with_ident`] takes one instead). An
/// MTU below 1280 is [`FragError::MtuTooSmall`].
pub fn fragment(ip: &[u8], mtu: usize) -> Result<Vec<Vec<u8>>, FragError> {
    match ip.first().map(|b| b >> 4) {
        Some(6) => fragment6(ip, mtu, None),
        _ => fragment4(ip, mtu),
    }
}

/// [`fragment`] with the identification of IPv6 fragments given: `ident`
/// goes into every Fragment header. IPv4 packets keep their own
/// identification (`ident` is not used).
pub fn fragment_with_ident(ip: &[u8], mtu: usize, ident: u32) -> Result<Vec<Vec<u8>>, FragError> {
    match ip.first().map(|b| b >> 4) {
        Some(6) => fragment6(ip, mtu, Some(ident)),
        _ => fragment4(ip, mtu),
    }
}

/// [`fragment`] for IPv4.
fn fragment4(ip: &[u8], mtu: usize) -> Result<Vec<Vec<u8>>, FragError> {
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

/// The next identification for IPv6 fragments: a process-wide counter
/// from a random start.
fn next_ident() -> u32 {
    static START: OnceLock<u32> = OnceLock::new();
    static COUNT: AtomicU32 = AtomicU32::new(0);
    let start = *START.get_or_init(|| {
        let h = RandomState::new().hash_one(0x6672_6167_u32);
        (h ^ (h >> 32)) as u32
    });
    start.wrapping_add(COUNT.fetch_add(1, Ordering::Relaxed))
}

/// The unfragmentable part of the IPv6 packet `ip` (RFC 8200 §4.5): its
/// length, and the offset of the next header byte at its end (the fixed
/// header's, or the last Hop-by-Hop or Routing header's). Destination
/// Options headers count when a Routing header follows them.
fn unfragmentable(ip: &[u8]) -> Result<(usize, usize), FragError> {
    let mut next = *ip.get(IPV6_NEXT_HEADER_AT).ok_or(FragError::Malformed)?;
    let mut at = IPV6_HEADER_LEN;
    let mut part = (IPV6_HEADER_LEN, IPV6_NEXT_HEADER_AT);
    for n in 0..=MAX_EXT_HEADERS {
        let kind = next;
        match kind {
            // Already a fragment, or a Hop-by-Hop header out of place.
            NH_FRAGMENT => return Err(FragError::Malformed),
            NH_HOP_BY_HOP if n != 0 => return Err(FragError::Malformed),
            NH_HOP_BY_HOP | NH_ROUTING | NH_DEST_OPTS if n < MAX_EXT_HEADERS => {}
            // More extension headers than are looked through.
            NH_HOP_BY_HOP | NH_ROUTING | NH_DEST_OPTS => return Err(FragError::Malformed),
            _ => return Ok(part),
        }
        let len = (usize::from(*ip.get(at + 1).ok_or(FragError::Malformed)?) + 1) * 8;
        next = *ip.get(at).ok_or(FragError::Malformed)?;
        let this = at;
        at += len;
        if at > ip.len() {
            return Err(FragError::Malformed);
        }
        if kind != NH_DEST_OPTS {
            part = (at, this);
        }
    }
    Err(FragError::Malformed)
}

/// [`fragment`] for IPv6, with `ident` or the counter's next value.
fn fragment6(ip: &[u8], mtu: usize, ident: Option<u32>) -> Result<Vec<Vec<u8>>, FragError> {
    let p = Ipv6Packet::new_checked(ip).map_err(|_| FragError::Malformed)?;
    if p.version() != 6 {
        return Err(FragError::Malformed);
    }
    let total = IPV6_HEADER_LEN + usize::from(p.payload_len());
    let bytes = ip.get(..total).ok_or(FragError::Malformed)?;
    if mtu < IPV6_MIN_MTU {
        return Err(FragError::MtuTooSmall);
    }
    if total <= mtu {
        return Ok(vec![bytes.to_vec()]);
    }
    let (unfrag, nh_at) = unfragmentable(bytes)?;
    let step = mtu
        .checked_sub(unfrag + FRAG6_HEADER_LEN)
        .ok_or(FragError::MtuTooSmall)?
        & !7;
    if step == 0 {
        return Err(FragError::MtuTooSmall);
    }
    let head = bytes.get(..unfrag).ok_or(FragError::Malformed)?;
    let rest = bytes.get(unfrag..).ok_or(FragError::Malformed)?;
    let next = *bytes.get(nh_at).ok_or(FragError::Malformed)?;
    let ident = ident.unwrap_or_else(next_ident).to_be_bytes();
    let mut out = Vec::with_capacity(rest.len().div_ceil(step));
    for (n, chunk) in rest.chunks(step).enumerate() {
        let at = n * step;
        let last = at + chunk.len() == rest.len();
        // `at` is a multiple of 8 below 65536: the offset in 8-byte units
        // in the top 13 bits, M in the lowest.
        let field = u16::try_from(at).map_err(|_| FragError::OffsetOverflow)? | u16::from(!last);
        let mut frag = Vec::with_capacity(unfrag + FRAG6_HEADER_LEN + chunk.len());
        frag.extend_from_slice(head);
        frag.extend_from_slice(&[next, 0]);
        frag.extend_from_slice(&field.to_be_bytes());
        frag.extend_from_slice(&ident);
        frag.extend_from_slice(chunk);
        let payload_len =
            u16::try_from(frag.len() - IPV6_HEADER_LEN).map_err(|_| FragError::Malformed)?;
        if let Some(b) = frag.get_mut(nh_at) {
            *b = NH_FRAGMENT;
        }
        // `frag` starts with the checked fixed header.
        Ipv6Packet::new_unchecked(&mut frag[..]).set_payload_len(payload_len);
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
        assert_eq!(
            (gone[0].key_src, gone[0].key_dst),
            (IpAddr::V4(SRC), IpAddr::V4(DST))
        );
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

    /// IPv6: reassembly and fragmentation with Fragment headers.
    mod ipv6 {
        use smoltcp::{
            phy::ChecksumCapabilities,
            wire::{IpAddress, Ipv6Repr, UdpPacket, UdpRepr},
        };

        use super::*;
        use crate::flow::packet::{IcmpError, icmp6_error_quoting};

        const SRC6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0x15);
        const DST6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 0x10);
        const UDP: u8 = 17;

        /// Patterned bytes.
        fn pattern(len: usize, seed: usize) -> Vec<u8> {
            (0..len).map(|i| (i * 7 + i / 251 + seed) as u8).collect()
        }

        /// An 8-byte extension header of `kind` (Hop-by-Hop and
        /// Destination Options: one PadN option; Routing: type 4,
        /// segments left 0); the next header byte is filled in by [`ip6`].
        fn ext(kind: u8) -> (u8, Vec<u8>) {
            let body = match kind {
                NH_ROUTING => vec![0, 0, 4, 0, 0, 0, 0, 0],
                _ => vec![0, 0, 1, 4, 0, 0, 0, 0],
            };
            (kind, body)
        }

        /// A Fragment header (its next header filled in by [`ip6`]).
        fn frag_hdr(offset: usize, more: bool, ident: u32) -> (u8, Vec<u8>) {
            let field = (offset as u16 & !7) | u16::from(more);
            let mut h = vec![0, 0];
            h.extend_from_slice(&field.to_be_bytes());
            h.extend_from_slice(&ident.to_be_bytes());
            (NH_FRAGMENT, h)
        }

        /// An IPv6 packet from `SRC6` to `DST6` (traffic class, flow label
        /// and hop limit set): the fixed header, `headers` chained, the
        /// last naming `last`, then `payload`.
        fn ip6(headers: &[(u8, Vec<u8>)], last: u8, payload: &[u8]) -> Vec<u8> {
            let mut buf = vec![0x6a, 0xb1, 0x23, 0x45, 0, 0, 0, 61];
            buf.extend_from_slice(&SRC6.octets());
            buf.extend_from_slice(&DST6.octets());
            buf[6] = headers.first().map_or(last, |h| h.0);
            for (i, (_, body)) in headers.iter().enumerate() {
                let mut body = body.clone();
                body[0] = headers.get(i + 1).map_or(last, |h| h.0);
                buf.extend_from_slice(&body);
            }
            buf.extend_from_slice(payload);
            let plen = (buf.len() - IPV6_HEADER_LEN) as u16;
            buf[4..6].copy_from_slice(&plen.to_be_bytes());
            buf
        }

        fn packet6(payload_len: usize, seed: usize) -> Vec<u8> {
            ip6(&[], UDP, &pattern(payload_len, seed))
        }

        /// A hand-made fragment right after the fixed header.
        fn raw6(ident: u32, offset: usize, more: bool, payload: &[u8]) -> Vec<u8> {
            ip6(&[frag_hdr(offset, more, ident)], UDP, payload)
        }

        /// A fragment's parts: unfragmentable length, next header, offset,
        /// M, identification, data.
        fn parts(f: &[u8]) -> (usize, u8, usize, bool, u32, &[u8]) {
            let (at, _) = find_fragment_header(f).unwrap();
            let h = &f[at..at + 8];
            let field = u16::from_be_bytes([h[2], h[3]]);
            let ident = u32::from_be_bytes([h[4], h[5], h[6], h[7]]);
            let data = &f[at + 8..];
            (
                at,
                h[0],
                usize::from(field & !7),
                field & 1 == 1,
                ident,
                data,
            )
        }

        /// Checks `frags` of `orig` as `fragment(orig, mtu)` makes them;
        /// returns their identification.
        fn check_fragments6(orig: &[u8], frags: &[Vec<u8>], mtu: usize) -> u32 {
            let (unfrag, nh_at) = unfragmentable(orig).unwrap();
            let ident = parts(&frags[0]).4;
            let mut expect = 0;
            let mut data = Vec::new();
            for (n, f) in frags.iter().enumerate() {
                assert!(f.len() <= mtu, "fragment {n} is {} > {mtu}", f.len());
                let p = Ipv6Packet::new_checked(&f[..]).unwrap();
                assert_eq!(usize::from(p.payload_len()) + 40, f.len());
                // The unfragmentable part, its last next header now 44.
                let mut head = orig[..unfrag].to_vec();
                head[nh_at] = NH_FRAGMENT;
                head[4..6].copy_from_slice(&f[4..6]);
                assert_eq!(&f[..unfrag], &head[..]);
                let (at, next, offset, more, id, d) = parts(f);
                assert_eq!(at, unfrag);
                assert_eq!(next, orig[nh_at]);
                assert_eq!((offset, id), (expect, ident));
                assert_eq!(f[at + 1], 0, "reserved");
                let last = n + 1 == frags.len();
                assert_eq!(more, !last);
                if !last {
                    assert_eq!(d.len() % 8, 0);
                }
                assert!(is_fragment(f));
                expect += d.len();
                data.extend_from_slice(d);
            }
            assert_eq!(data, &orig[unfrag..]);
            ident
        }

        #[test]
        fn is_fragment_recognises_ipv6() {
            assert!(!is_fragment(&packet6(100, 0)));
            assert!(is_fragment(&raw6(1, 0, true, &[0; 8])));
            assert!(is_fragment(&raw6(1, 8, false, &[0; 8])));
            // Atomic fragments go to the reassembler too.
            assert!(is_fragment(&raw6(1, 0, false, &[0; 8])));
            let f = frag_hdr(8, true, 1);
            for chain in [
                vec![ext(NH_HOP_BY_HOP), f.clone()],
                vec![ext(NH_DEST_OPTS), f.clone()],
                vec![ext(NH_HOP_BY_HOP), ext(NH_ROUTING), f.clone()],
                vec![
                    ext(NH_HOP_BY_HOP),
                    ext(NH_DEST_OPTS),
                    ext(NH_ROUTING),
                    ext(NH_DEST_OPTS),
                    f.clone(),
                ],
            ] {
                assert!(is_fragment(&ip6(&chain, UDP, &[0; 8])), "{chain:?}");
            }
            for chain in [
                // Five extension headers: more than are looked through.
                vec![
                    ext(NH_HOP_BY_HOP),
                    ext(NH_DEST_OPTS),
                    ext(NH_ROUTING),
                    ext(NH_DEST_OPTS),
                    ext(NH_DEST_OPTS),
                    f.clone(),
                ],
                // Hop-by-Hop only first.
                vec![ext(NH_DEST_OPTS), ext(NH_HOP_BY_HOP), f.clone()],
                // No Fragment header at all.
                vec![ext(NH_HOP_BY_HOP), ext(NH_DEST_OPTS)],
            ] {
                assert!(!is_fragment(&ip6(&chain, UDP, &[0; 8])), "{chain:?}");
            }
            // A Fragment header cut short still counts; a fixed header cut
            // short does not.
            let f = raw6(1, 0, true, &[0; 8]);
            assert!(is_fragment(&f[..40]));
            assert!(!is_fragment(&f[..39]));
            let h = ip6(&[ext(NH_HOP_BY_HOP), frag_hdr(0, true, 1)], UDP, &[0; 8]);
            assert!(is_fragment(&h[..48]));
            assert!(!is_fragment(&h[..47]));
            // The version nibble decides.
            let mut v5 = f.clone();
            v5[0] = 0x5a;
            assert!(!is_fragment(&v5));
        }

        #[test]
        fn reassembles_in_order_reverse_and_shuffled() {
            let orig = packet6(8200, 1);
            let frags = fragment_with_ident(&orig, 1500, 0xdead_beef).unwrap();
            assert_eq!(frags.len(), 6);
            assert_eq!(check_fragments6(&orig, &frags, 1500), 0xdead_beef);
            let now = Instant::now();
            let mut r = reassembler();
            assert_eq!(push_all(&mut r, &frags, now), orig);
            let mut reversed = frags.clone();
            reversed.reverse();
            assert_eq!(push_all(&mut r, &reversed, now), orig);
            let mut lcg = Lcg(6);
            for _ in 0..20 {
                let mut shuffled = frags.clone();
                lcg.shuffle(&mut shuffled);
                assert_eq!(push_all(&mut r, &shuffled, now), orig);
            }
            assert_eq!((r.in_progress(), r.bytes_held()), (0, 0));
            let s = r.stats();
            assert_eq!((s.reassembled, s.fragments), (22, 22 * 6));
        }

        #[test]
        fn families_and_keys_are_kept_apart() {
            // The same identification in IPv4 and IPv6, and IPv6 datagrams
            // differing in identification or source only.
            let a = packet6(3000, 1);
            let b = packet6(3000, 2);
            let mut c = packet6(3000, 3);
            c[8 + 15] ^= 1;
            let v4 = packet(3000, 7);
            let fa = fragment_with_ident(&a, 1280, 7).unwrap();
            let fb = fragment_with_ident(&b, 1280, 8).unwrap();
            let fc = fragment_with_ident(&c, 1280, 7).unwrap();
            let f4 = fragment(&v4, 1000).unwrap();
            assert_eq!((fa.len(), f4.len()), (3, 4));
            let mut r = reassembler();
            let now = Instant::now();
            for i in 0..2 {
                for f in [&fa[i], &fb[i], &fc[i], &f4[i]] {
                    assert_eq!(r.push(f, now), FragOutcome::Pending);
                }
            }
            assert_eq!(r.push(&f4[2], now), FragOutcome::Pending);
            assert_eq!(r.in_progress(), 4);
            assert_eq!(r.push(&fc[2], now), FragOutcome::Complete(c));
            assert_eq!(r.push(&f4[3], now), FragOutcome::Complete(v4));
            assert_eq!(r.push(&fb[2], now), FragOutcome::Complete(b));
            assert_eq!(r.push(&fa[2], now), FragOutcome::Complete(a));
            assert_eq!((r.in_progress(), r.bytes_held()), (0, 0));
        }

        #[test]
        fn exact_duplicates_are_ignored() {
            let orig = packet6(3000, 4);
            let frags = fragment_with_ident(&orig, 1280, 9).unwrap();
            let mut r = reassembler();
            let now = Instant::now();
            assert_eq!(r.push(&frags[0], now), FragOutcome::Pending);
            assert_eq!(r.push(&frags[1], now), FragOutcome::Pending);
            let held = r.bytes_held();
            assert_eq!(r.push(&frags[0], now), FragOutcome::Pending);
            assert_eq!(r.push(&frags[1], now), FragOutcome::Pending);
            assert_eq!(r.bytes_held(), held);
            assert_eq!(r.stats().duplicates, 2);
            assert_eq!(push_all(&mut r, &frags[2..], now), orig);

            // A last fragment duplicating a piece held from a non-last one
            // finishes the datagram.
            assert_eq!(
                r.push(&raw6(5, 0, true, &[3; 16]), now),
                FragOutcome::Pending
            );
            assert_eq!(
                r.push(&raw6(5, 16, true, &[4; 8]), now),
                FragOutcome::Pending
            );
            let FragOutcome::Complete(whole) = r.push(&raw6(5, 16, false, &[4; 8]), now) else {
                panic!("not complete");
            };
            assert_eq!(
                whole,
                ip6(&[], UDP, &[[3u8; 16].as_slice(), &[4; 8]].concat())
            );
        }

        #[test]
        fn overlaps_drop_the_datagram() {
            let now = Instant::now();
            let mut r = reassembler();
            // Overlapping the previous piece, the next one, at the same
            // offset with other bytes, and with another length.
            for (a, b) in [
                ((0, [1u8; 16].to_vec()), (8, [1u8; 16].to_vec())),
                ((16, [1; 16].to_vec()), (8, [1; 16].to_vec())),
                ((16, [1; 16].to_vec()), (16, [2; 16].to_vec())),
                ((16, [1; 16].to_vec()), (16, [1; 8].to_vec())),
            ] {
                assert_eq!(r.push(&raw6(1, a.0, true, &a.1), now), FragOutcome::Pending);
                assert_eq!(
                    r.push(&raw6(1, b.0, true, &b.1), now),
                    FragOutcome::Dropped(FragDrop::Overlap)
                );
                assert_eq!((r.in_progress(), r.bytes_held()), (0, 0));
            }
            assert_eq!(r.stats().dropped_overlap, 4);

            // Real fragments cut at two MTUs: the second cut overlaps the
            // first; a datagram of another key is not touched.
            let orig = packet6(5000, 5);
            let big = fragment_with_ident(&orig, 1500, 2).unwrap();
            let small = fragment_with_ident(&orig, 1280, 2).unwrap();
            let other = fragment_with_ident(&orig, 1280, 3).unwrap();
            assert_eq!(r.push(&other[0], now), FragOutcome::Pending);
            assert_eq!(r.push(&big[0], now), FragOutcome::Pending);
            assert_eq!(
                r.push(&small[1], now),
                FragOutcome::Dropped(FragDrop::Overlap)
            );
            assert_eq!(r.in_progress(), 1);
            // What comes later starts afresh (as in Linux).
            assert_eq!(push_all(&mut r, &big, now), orig);
            assert_eq!(push_all(&mut r, &other[1..], now), orig);
        }

        #[test]
        fn too_big() {
            let now = Instant::now();
            let mut r = reassembler();
            // A payload length of 65536.
            assert_eq!(
                r.push(&raw6(7, 65528, false, &[0; 8]), now),
                FragOutcome::Dropped(FragDrop::TooBig)
            );
            // Exactly 65535 is fine.
            r.push(&raw6(7, 0, true, &[0; 8]), now);
            assert_eq!(
                r.push(&raw6(7, 65528, false, &[0; 7]), now),
                FragOutcome::Pending
            );
            // One more byte drops the datagram in progress.
            r.push(&raw6(8, 0, true, &[0; 8]), now);
            assert_eq!(r.in_progress(), 2);
            assert_eq!(
                r.push(&raw6(8, 65528, false, &[0; 8]), now),
                FragOutcome::Dropped(FragDrop::TooBig)
            );
            assert_eq!(r.in_progress(), 1);
            // The first fragment's extension headers count once it
            // arrives.
            r.push(&raw6(9, 65528, false, &[0; 7]), now);
            let first = ip6(&[ext(NH_HOP_BY_HOP), frag_hdr(0, true, 9)], UDP, &[0; 8]);
            assert_eq!(r.push(&first, now), FragOutcome::Dropped(FragDrop::TooBig));
            assert_eq!(r.stats().dropped_too_big, 3);
            assert_eq!(r.in_progress(), 1);
        }

        #[test]
        fn malformed_packets() {
            let now = Instant::now();
            let mut r = reassembler();
            let good = raw6(10, 0, true, &[5; 16]);
            let whole = packet6(16, 10);
            // The Fragment header cut short by the payload length.
            let mut short = good[..44].to_vec();
            short[4..6].copy_from_slice(&4u16.to_be_bytes());
            // The payload length past the buffer.
            let mut long = good.clone();
            long[4..6].copy_from_slice(&100u16.to_be_bytes());
            // An extension header running past the packet.
            let mut runs_over = ip6(&[ext(NH_HOP_BY_HOP), frag_hdr(0, true, 10)], UDP, &[5; 16]);
            runs_over[41] = 200;
            let too_many = ip6(
                &[
                    ext(NH_HOP_BY_HOP),
                    ext(NH_DEST_OPTS),
                    ext(NH_ROUTING),
                    ext(NH_DEST_OPTS),
                    ext(NH_DEST_OPTS),
                    frag_hdr(0, true, 10),
                ],
                UDP,
                &[5; 16],
            );
            let hbh_late = ip6(
                &[ext(NH_DEST_OPTS), ext(NH_HOP_BY_HOP), frag_hdr(0, true, 10)],
                UDP,
                &[5; 16],
            );
            let mut v5 = good.clone();
            v5[0] = 0x5a;
            for bad in [
                short,
                long,
                runs_over,
                too_many,
                hbh_late,
                whole,
                v5,
                good[..47].to_vec(),
                good[..40].to_vec(),
                good[..39].to_vec(),
            ] {
                assert_eq!(r.push(&bad, now), FragOutcome::Dropped(FragDrop::Malformed));
            }
            assert_eq!(r.stats().dropped_malformed, 10);
            assert_eq!(r.in_progress(), 0);

            // A bad header leaves the datagram in progress alone ...
            assert_eq!(r.push(&good, now), FragOutcome::Pending);
            assert_eq!(
                r.push(&raw6(10, 16, true, &[5; 16])[..50], now),
                FragOutcome::Dropped(FragDrop::Malformed)
            );
            assert_eq!(r.in_progress(), 1);
            // ... a middle fragment not a multiple of 8 discards it.
            assert_eq!(
                r.push(&raw6(10, 16, true, &[5; 12]), now),
                FragOutcome::Dropped(FragDrop::Malformed)
            );
            assert_eq!((r.in_progress(), r.bytes_held()), (0, 0));
            // An empty fragment, M set or not.
            for more in [true, false] {
                assert_eq!(
                    r.push(&raw6(10, 16, more, &[]), now),
                    FragOutcome::Dropped(FragDrop::Malformed)
                );
            }
            // Ends that disagree.
            r.push(&raw6(11, 32, false, &[1; 8]), now);
            assert_eq!(
                r.push(&raw6(11, 40, true, &[1; 8]), now),
                FragOutcome::Dropped(FragDrop::Malformed)
            );
            // A last fragment of any length is fine.
            assert_eq!(
                r.push(&raw6(10, 16, false, &[5; 3]), now),
                FragOutcome::Pending
            );
            assert_eq!(r.stats().dropped_malformed, 15);
        }

        #[test]
        fn atomic_fragments_come_back_at_once() {
            let now = Instant::now();
            let mut r = reassembler();
            assert_eq!(
                r.push(&raw6(5, 0, true, &[1; 8]), now),
                FragOutcome::Pending
            );
            let held = r.bytes_held();
            assert_eq!(
                r.push(&raw6(5, 0, false, &[2; 13]), now),
                FragOutcome::Complete(ip6(&[], UDP, &[2; 13]))
            );
            let with_hbh = ip6(&[ext(NH_HOP_BY_HOP), frag_hdr(0, false, 5)], UDP, &[2; 13]);
            assert_eq!(
                r.push(&with_hbh, now),
                FragOutcome::Complete(ip6(&[ext(NH_HOP_BY_HOP)], UDP, &[2; 13]))
            );
            // The datagram in progress under the same key is untouched.
            assert_eq!((r.in_progress(), r.bytes_held()), (1, held));
            assert_eq!((r.stats().atomic, r.stats().reassembled), (2, 0));
        }

        #[test]
        fn extension_headers_round_trip() {
            let (hbh, dst, rt) = (ext(NH_HOP_BY_HOP), ext(NH_DEST_OPTS), ext(NH_ROUTING));
            // (headers, unfragmentable length): Destination Options count
            // only before a Routing header.
            for (chain, unfrag) in [
                (vec![hbh.clone()], 48),
                (vec![dst.clone()], 40),
                (vec![hbh.clone(), dst.clone()], 48),
                (vec![hbh.clone(), rt.clone()], 56),
                (vec![hbh.clone(), dst.clone(), rt.clone(), dst.clone()], 64),
                (vec![dst.clone(), rt.clone()], 56),
            ] {
                let orig = ip6(&chain, UDP, &pattern(5000, unfrag));
                assert_eq!(unfragmentable(&orig).unwrap().0, unfrag);
                let frags = fragment_with_ident(&orig, 1280, 77).unwrap();
                check_fragments6(&orig, &frags, 1280);
                let mut reversed = frags.clone();
                reversed.reverse();
                assert_eq!(
                    push_all(&mut reassembler(), &reversed, Instant::now()),
                    orig
                );
            }
            // Hand-made fragments behind Destination Options (which a
            // sender would not put there, but may): reassembled with them,
            // their next header now the Fragment header's.
            let data = pattern(24, 3);
            let a = ip6(&[dst.clone(), frag_hdr(0, true, 4)], UDP, &data[..16]);
            let b = ip6(&[hbh.clone(), frag_hdr(16, false, 4)], UDP, &data[16..]);
            let whole = push_all(&mut reassembler(), &[b, a], Instant::now());
            assert_eq!(whole, ip6(&[dst], UDP, &data));
        }

        #[test]
        fn fragment_sizes_and_mtus() {
            let cases = [
                (8200, 1500),
                (8200, 1280),
                (65535, 1500),
                (65535, 1280),
                (1460, 1500),
                (1461, 1500),
                (1240, 1280),
                (1241, 1280),
                (100, 1280),
                // Odd MTUs: the data per fragment rounds down to 8.
                (8200, 1281),
                (8200, 1503),
                (20000, 9001),
            ];
            for (len, mtu) in cases {
                let orig = packet6(len, len ^ mtu);
                let frags = fragment(&orig, mtu).unwrap();
                if orig.len() <= mtu {
                    assert_eq!(frags, vec![orig.clone()], "{len} at {mtu}");
                    continue;
                }
                check_fragments6(&orig, &frags, mtu);
                let step = (mtu - 48) & !7;
                assert_eq!(frags.len(), len.div_ceil(step), "{len} at {mtu}");
                for f in &frags[..frags.len() - 1] {
                    assert_eq!(f.len(), 48 + step);
                }
                let mut r = reassembler();
                let mut lcg = Lcg(len as u64);
                let mut shuffled = frags.clone();
                lcg.shuffle(&mut shuffled);
                assert_eq!(push_all(&mut r, &shuffled, Instant::now()), orig);
            }
            // The counter: consecutive packets get different
            // identifications.
            let orig = packet6(3000, 0);
            let a = parts(&fragment(&orig, 1280).unwrap()[0]).4;
            let b = parts(&fragment(&orig, 1280).unwrap()[0]).4;
            assert_ne!(a, b);
            // Trailing bytes are ignored.
            let mut padded = orig.clone();
            padded.extend_from_slice(&[0xee; 9]);
            let frags = fragment_with_ident(&padded, 1280, 1).unwrap();
            check_fragments6(&orig, &frags, 1280);
            assert_eq!(fragment(&padded, 5000).unwrap(), vec![orig.clone()]);
        }

        #[test]
        fn fragment_refuses() {
            let orig = packet6(100, 0);
            // Below the IPv6 minimum MTU, even for a packet that fits.
            for mtu in [0, 68, 1279] {
                assert_eq!(fragment(&orig, mtu), Err(FragError::MtuTooSmall));
            }
            // An unfragmentable part leaving no room for 8 bytes.
            let mut huge_hbh = ext(NH_HOP_BY_HOP);
            huge_hbh.1 = vec![0; 1240];
            // Pad1 options all through.
            huge_hbh.1[1] = (1240 / 8 - 1) as u8;
            let big = ip6(&[huge_hbh], UDP, &pattern(3000, 0));
            assert_eq!(fragment(&big, 1280), Err(FragError::MtuTooSmall));
            assert_eq!(fragment(&big, 1296).unwrap().len(), 375);
            // Already a fragment; truncated; extension headers running
            // over, too many, or Hop-by-Hop out of place.
            let f = raw6(1, 0, true, &pattern(3000, 0));
            let mut runs_over = ip6(&[ext(NH_ROUTING)], UDP, &pattern(1500, 0));
            runs_over[41] = 255;
            let (d, h) = (ext(NH_DEST_OPTS), ext(NH_HOP_BY_HOP));
            let too_many = ip6(&vec![d.clone(); 5], UDP, &pattern(3000, 0));
            let hbh_late = ip6(&[d.clone(), h], UDP, &pattern(3000, 0));
            let mut long = orig.clone();
            long[4..6].copy_from_slice(&200u16.to_be_bytes());
            for bad in [f, runs_over, too_many, hbh_late, long, orig[..39].to_vec()] {
                assert_eq!(fragment(&bad, 1280), Err(FragError::Malformed));
            }
            // Four are fine.
            let four = ip6(&vec![d; 4], UDP, &pattern(3000, 0));
            check_fragments6(&four, &fragment(&four, 1280).unwrap(), 1280);
        }

        #[test]
        fn udp_datagram_survives_with_its_checksum() {
            let data = pattern(8192, 11);
            let udp = UdpRepr {
                src_port: 40000,
                dst_port: 7,
            };
            let ip = Ipv6Repr {
                src_addr: SRC6,
                dst_addr: DST6,
                next_header: IpProtocol::Udp,
                payload_len: udp.header_len() + data.len(),
                hop_limit: 64,
            };
            let mut orig = vec![0u8; ip.buffer_len() + ip.payload_len];
            let mut p = Ipv6Packet::new_unchecked(&mut orig[..]);
            ip.emit(&mut p);
            let (s, d) = (IpAddress::Ipv6(SRC6), IpAddress::Ipv6(DST6));
            udp.emit(
                &mut UdpPacket::new_unchecked(p.payload_mut()),
                &s,
                &d,
                data.len(),
                |b| b.copy_from_slice(&data),
                &ChecksumCapabilities::default(),
            );
            for mtu in [1280, 1500] {
                let mut frags = fragment(&orig, mtu).unwrap();
                check_fragments6(&orig, &frags, mtu);
                Lcg(mtu as u64).shuffle(&mut frags);
                let whole = push_all(&mut reassembler(), &frags, Instant::now());
                let p = Ipv6Packet::new_checked(&whole[..]).unwrap();
                let r = Ipv6Repr::parse(&p).unwrap();
                assert_eq!((r.src_addr, r.dst_addr), (SRC6, DST6));
                assert_eq!(r.next_header, IpProtocol::Udp);
                let u = UdpPacket::new_checked(p.payload()).unwrap();
                assert!(u.verify_checksum(&s, &d));
                let parsed = UdpRepr::parse(&u, &s, &d, &ChecksumCapabilities::default()).unwrap();
                assert_eq!(parsed, udp);
                assert_eq!(u.payload(), &data[..]);
            }
        }

        #[test]
        fn expire_quotes_the_first_fragment() {
            let limits = ReassemblyLimits::default();
            let mut r = Reassembler::new(limits);
            let start = Instant::now();
            let a = fragment_with_ident(&packet6(3000, 1), 1500, 1).unwrap();
            let b = fragment_with_ident(&packet6(3000, 2), 1500, 2).unwrap();
            r.push(&a[0], start);
            r.push(&b[1], start + Duration::from_secs(1));
            r.push(&raw6(3, 0, true, &[9; 16]), start + Duration::from_secs(2));
            r.push(&a[1], start + Duration::from_secs(20));
            assert!(
                r.expire(start + limits.timeout - Duration::from_millis(1))
                    .is_empty()
            );
            let gone = r.expire(start + limits.timeout + Duration::from_secs(2));
            assert_eq!(gone.len(), 3);
            for e in &gone {
                assert_eq!((e.key_src, e.key_dst), (IpAddr::V6(SRC6), IpAddr::V6(DST6)));
            }
            // A full-sized first fragment: its first 1232 bytes; a small
            // one: all of it; no first fragment: nothing.
            assert_eq!(a[0].len(), 1496);
            assert_eq!(gone[0].first.as_deref(), Some(&a[0][..QUOTE6_MAX]));
            assert_eq!(gone[1].first, None);
            let small = raw6(3, 0, true, &[9; 16]);
            assert_eq!(gone[2].first.as_deref(), Some(&small[..]));
            assert_eq!((r.in_progress(), r.bytes_held()), (0, 0));
            assert_eq!(r.stats().timed_out, 3);
            // The quote fits an ICMPv6 error whole.
            let gw = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 2);
            let quote = gone[0].first.as_deref().unwrap();
            let err = icmp6_error_quoting(gw, SRC6, quote, IcmpError::ReassemblyTimeout);
            assert_eq!(err.len(), 1280);
            assert_eq!(&err[40..42], &[3, 1]);
            assert_eq!(&err[48..], quote);
        }

        #[test]
        fn limits_evict_across_families() {
            let mut r = Reassembler::new(ReassemblyLimits {
                max_datagrams: 4,
                ..ReassemblyLimits::default()
            });
            let start = Instant::now();
            let packets: Vec<Vec<u8>> = (0..10)
                .map(|i| {
                    if i % 2 == 0 {
                        packet6(3000, i)
                    } else {
                        packet(3000, 300 + i as u16)
                    }
                })
                .collect();
            let frags: Vec<Vec<Vec<u8>>> = packets
                .iter()
                .enumerate()
                .map(|(i, p)| fragment_with_ident(p, 1500, i as u32).unwrap())
                .collect();
            for (i, f) in frags.iter().enumerate() {
                let now = start + Duration::from_millis(i as u64);
                assert_eq!(r.push(&f[0], now), FragOutcome::Pending);
                assert!(r.in_progress() <= 4);
            }
            assert_eq!((r.in_progress(), r.stats().evicted), (4, 6));
            for i in 6..10 {
                assert_eq!(push_all(&mut r, &frags[i][1..], start), packets[i]);
            }

            // Bytes: a first IPv6 fragment is charged its data, the
            // overhead and its headers (Fragment header included).
            let one = 1448 + FRAGMENT_OVERHEAD + 48;
            let limits = ReassemblyLimits {
                max_bytes: 3 * one + 100,
                ..ReassemblyLimits::default()
            };
            let mut r = Reassembler::new(limits);
            for i in 0..20 {
                let f = fragment_with_ident(&packet6(3000, i), 1500, i as u32).unwrap();
                assert_eq!(r.push(&f[0], start), FragOutcome::Pending);
                assert!(r.bytes_held() <= limits.max_bytes);
            }
            assert_eq!((r.in_progress(), r.bytes_held()), (3, 3 * one));
            assert_eq!(r.stats().evicted, 17);
            // A datagram outgrowing the limit on its own is discarded.
            let mut small = Reassembler::new(ReassemblyLimits {
                max_bytes: 2000,
                ..ReassemblyLimits::default()
            });
            let f = fragment_with_ident(&packet6(3000, 0), 1280, 1).unwrap();
            assert_eq!(small.push(&f[0], start), FragOutcome::Pending);
            assert_eq!(
                small.push(&f[1], start),
                FragOutcome::Dropped(FragDrop::NoRoom)
            );
            assert_eq!((small.in_progress(), small.bytes_held()), (0, 0));
        }

        #[test]
        fn garbage_never_panics() {
            let limits = ReassemblyLimits {
                max_datagrams: 8,
                max_bytes: 20_000,
                timeout: Duration::from_secs(1),
            };
            let mut r = Reassembler::new(limits);
            let mut lcg = Lcg(0x6eed);
            let start = Instant::now();
            let seeds: Vec<Vec<u8>> = [
                fragment_with_ident(&packet6(3000, 1), 1280, 1).unwrap(),
                fragment_with_ident(
                    &ip6(
                        &[ext(NH_HOP_BY_HOP), ext(NH_ROUTING), ext(NH_DEST_OPTS)],
                        UDP,
                        &pattern(2000, 2),
                    ),
                    1280,
                    2,
                )
                .unwrap(),
                vec![raw6(3, 0, false, &[1; 8]), raw6(3, 8, false, &[1; 8])],
            ]
            .concat();
            // Every length of every seed, and of noise behind a fixed
            // header's first byte.
            for (k, s) in seeds.iter().enumerate() {
                for len in 0..=s.len() {
                    let _ = is_fragment(&s[..len]);
                    let _ = r.push(&s[..len], start);
                    let _ = fragment(&s[..len], 1280);
                    let _ = fragment_with_ident(&s[..len], 1280 + len % 300, k as u32);
                }
            }
            for len in 0..1600 {
                let mut noise: Vec<u8> = (0..len).map(|_| lcg.next() as u8).collect();
                if let Some(b) = noise.first_mut() {
                    *b = 0x60 | (*b & 0x0f);
                }
                if let Some(b) = noise.get_mut(6) {
                    *b = [NH_FRAGMENT, NH_HOP_BY_HOP, NH_DEST_OPTS, UDP][len % 4];
                }
                let _ = is_fragment(&noise);
                let _ = r.push(&noise, start);
                let _ = fragment(&noise, 1280 + len);
            }
            for i in 0..5000u64 {
                let mut buf = seeds[lcg.below(seeds.len())].clone();
                for _ in 0..lcg.below(4) {
                    let at = lcg.below(buf.len());
                    buf[at] = lcg.next() as u8;
                }
                if lcg.below(4) == 0 {
                    buf.truncate(lcg.below(buf.len() + 1));
                }
                // Mostly keep the payload length right so the deeper paths
                // run.
                if buf.len() >= IPV6_HEADER_LEN && lcg.below(4) != 0 {
                    let plen = (buf.len() - IPV6_HEADER_LEN) as u16;
                    buf[4..6].copy_from_slice(&plen.to_be_bytes());
                    buf[0] = 0x60;
                }
                let now = start + Duration::from_millis(i);
                let _ = is_fragment(&buf);
                let _ = r.push(&buf, now);
                let _ = fragment(&buf, 1200 + lcg.below(400));
                if i % 100 == 0 {
                    r.expire(now);
                }
                assert!(r.in_progress() <= limits.max_datagrams);
                assert!(r.bytes_held() <= limits.max_bytes);
            }
            let s = r.stats();
            assert!(
                s.reassembled > 0 && s.dropped_overlap > 0 && s.dropped_malformed > 0,
                "{s:?}"
            );
        }
    }
}
