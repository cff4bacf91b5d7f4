//! Types, map names and constants shared by the eBPF programs and user space.
//!
//! # Theory of operation
//!
//! The kernel programs and the daemon talk through BPF maps only. Everything
//! both sides must agree on lives here, in one place: map names and sizes,
//! the layout of every record that crosses the boundary, reason codes and
//! counter indices. Every shared type is `#[repr(C)]`, [`bytemuck::Pod`],
//! has no implicit padding (the derive refuses padding) and carries a size
//! assertion, so a layout change is a compile error on both sides rather than
//! a silent misread.
//!
//! The crate is `no_std` so the eBPF crate can use it; the `user` feature
//! adds `aya::Pod` impls for user space.
#![no_std]

use bytemuck::{Pod, Zeroable};

/// Version of the maps' layout shared by the programs and user space: the
/// set of pinned maps, their types, key and value layouts and the meaning
/// of every field and flag in them. A datapath pinned by one tapgate is
/// adopted by another (restart without loss) only if both have the same
/// version, so it must be bumped with any change to the maps listed in
/// [`PINNED_MAPS`] or to the types stored in them.
///
/// History: 1, the first pinned layout; 2, [`FwdPrefix`] carries a family
/// and a 16-byte address (inbound forwards over IPv6), and [`FragKey`] a
/// family, 16-byte addresses and a 32-bit identification (IPv6 fragments
/// from the world; both changes belong to the one, unreleased version 2).
pub const MAP_LAYOUT_VERSION: u32 = 2;

/// The maps that outlive a restarting daemon (pinned under bpffs): the flow
/// table and everything a running flow or a pending punt depends on. The
/// scratch buffer and the log ring belong to one program load.
pub const PINNED_MAPS: [&str; 6] = [
    FLOWS_MAP,
    ACTIVITY_MAP,
    PUNT_RING_MAP,
    COUNTERS_MAP,
    FWD_PORTS_MAP,
    FRAGS_MAP,
];

/// Name of the ring buffer carrying punted frames and events to user space.
pub const PUNT_RING_MAP: &str = "TG_PUNT";
/// Size in bytes of the punt ring buffer (a power of two, page-aligned).
pub const PUNT_RING_BYTES: u32 = 8 << 20;

/// Name of the per-CPU scratch array used to assemble a punt record.
pub const SCRATCH_MAP: &str = "TG_SCRATCH";

/// Name of the per-CPU counters array (indexed by [`Counter`]).
pub const COUNTERS_MAP: &str = "TG_COUNTERS";

/// Name of the TC program attached to the tap's ingress (frames from the guest).
pub const PROG_TAP_INGRESS: &str = "tg_tap_ingress";
/// Name of the TC program attached to the uplink's ingress (packets from the world).
pub const PROG_UPLINK_INGRESS: &str = "tg_uplink_ingress";
/// Name of the TC program attached to the uplink's egress with
/// `--allow-host`: the host's own replies to host-local flows.
pub const PROG_UPLINK_EGRESS: &str = "tg_uplink_egress";
/// Name of the TC program attached to loopback's ingress while ports are
/// forwarded: openings and packets of host-local clients of forwarded
/// ports (a process on the host connecting to `127.0.0.1:PORT`, `[::1]:PORT`
/// or one of the host's own addresses).
pub const PROG_LO_INGRESS: &str = "tg_lo_ingress";

/// Name of the programs' read-only global that makes IPv6 address
/// rewrites pass `BPF_F_IPV6` to `bpf_l4_csum_replace` (a `u8`, nonzero to
/// pass it). The loader sets it on Linux 6.16 and later, which take the
/// flag (and need it to keep `skb->csum` of `CHECKSUM_COMPLETE` packets
/// right); older kernels refuse it.
pub const L4_CSUM_IPV6_GLOBAL: &str = "TG_L4_CSUM_IPV6";

/// Largest frame the kernel copies into a punt record: a 64 KiB IP packet
/// plus its Ethernet header. Longer frames (GSO super-packets beyond that)
/// are dropped and counted as [`Counter::PuntOversize`].
pub const PUNT_MAX_FRAME: u32 = 65535 + 14;

/// Size of the data area of the scratch buffer: the next power of two above
/// [`PUNT_MAX_FRAME`], so the eBPF side can bound a length with a mask.
pub const SCRATCH_DATA_BYTES: usize = 1 << 17;

/// How many leading bytes of a forwarded packet an event record carries:
/// enough for Ethernet + IPv4 + TCP with options (14 + 20 + 60 = 94; the
/// kernel forwards no IPv4 packet with options) and for Ethernet + IPv6 +
/// TCP with options (14 + 40 + 60 = 114; the kernel forwards no IPv6
/// packet with extension headers).
pub const EVENT_SNAP_LEN: u32 = 128;
const _: () = assert!(14 + 40 + 60 <= EVENT_SNAP_LEN);

/// Size of an event record in the punt ring: header + snap.
pub const EVENT_RECORD_LEN: usize = core::mem::size_of::<PuntHeader>() + EVENT_SNAP_LEN as usize;

/// Where a punted frame came from.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// Received from the guest on the tap device (an Ethernet frame).
    Tap = 1,
    /// Received from the world on the uplink (an Ethernet frame).
    Uplink = 2,
}

impl Origin {
    /// Decodes the wire value, `None` for anything unknown.
    pub const fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(Self::Tap),
            2 => Some(Self::Uplink),
            _ => None,
        }
    }
}

/// Why the kernel handed a frame (or an event) to user space.
#[repr(u16)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PuntReason {
    /// An ARP frame from the guest.
    Arp = 1,
    /// An IPv4 packet that matched no established flow.
    Ipv4NoFlow = 2,
    /// An IPv6 packet that matched no established flow, or one the fast
    /// path does not parse: extension headers other than a fragment
    /// header, ICMPv6 other than echo requests (NDP, MLD, errors).
    Ipv6NoFlow = 3,
    /// Any other frame (unknown EtherType, truncated header): user space
    /// decides and counts.
    Other = 4,
    /// A packet of a flow that is not established yet (SYN-ACK, SYN
    /// retransmission, RST during the handshake): user space drives it.
    Handshake = 5,
    /// A packet the fast path cannot forward as it is (TTL expiring, too
    /// big for the egress MTU, IP options, a SYN on an established flow).
    Exception = 6,
    /// Event, not an exit: a FIN of an established flow was forwarded; the
    /// record holds the first bytes of the packet as it arrived.
    EventFin = 7,
    /// Event: an RST of an established flow was forwarded.
    EventRst = 8,
    /// Event: a packet of a flow whose entry asks for events
    /// ([`FLOW_F_EVENTS`], set in LastAck) was forwarded.
    EventAck = 9,
    /// A packet from the world that matched no flow but opens one to a
    /// forwarded port ([`FWD_PORTS_MAP`]): a pure SYN, or a UDP datagram.
    Forward = 10,
    /// An ICMP error from the world (destination unreachable, time
    /// exceeded, parameter problem; for ICMPv6 also packet too big) whose
    /// quoted packet belongs to one of our flows: user space translates it
    /// for the guest.
    IcmpError = 11,
    /// A fragment (IPv4, or IPv6 with a fragment header right after the
    /// fixed header): any from the guest, and from the world those of a
    /// datagram of one of our flows ([`FRAGS_MAP`]). User space
    /// reassembles the datagram.
    Fragment = 12,
}

impl PuntReason {
    /// All reasons, for iterating counters and reports.
    pub const ALL: [PuntReason; 12] = [
        Self::Arp,
        Self::Ipv4NoFlow,
        Self::Ipv6NoFlow,
        Self::Other,
        Self::Handshake,
        Self::Exception,
        Self::EventFin,
        Self::EventRst,
        Self::EventAck,
        Self::Forward,
        Self::IcmpError,
        Self::Fragment,
    ];

    /// Decodes the wire value, `None` for anything unknown.
    pub const fn from_u16(v: u16) -> Option<Self> {
        match v {
            1 => Some(Self::Arp),
            2 => Some(Self::Ipv4NoFlow),
            3 => Some(Self::Ipv6NoFlow),
            4 => Some(Self::Other),
            5 => Some(Self::Handshake),
            6 => Some(Self::Exception),
            7 => Some(Self::EventFin),
            8 => Some(Self::EventRst),
            9 => Some(Self::EventAck),
            10 => Some(Self::Forward),
            11 => Some(Self::IcmpError),
            12 => Some(Self::Fragment),
            _ => None,
        }
    }

    /// Stable lower-case name used in logs and JSON output.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Arp => "arp",
            Self::Ipv4NoFlow => "ipv4_no_flow",
            Self::Ipv6NoFlow => "ipv6_no_flow",
            Self::Other => "other",
            Self::Handshake => "handshake",
            Self::Exception => "exception",
            Self::EventFin => "event_fin",
            Self::EventRst => "event_rst",
            Self::EventAck => "event_ack",
            Self::Forward => "forward",
            Self::IcmpError => "icmp_error",
            Self::Fragment => "fragment",
        }
    }

    /// Whether the record is an event about a packet the kernel forwarded
    /// (as opposed to a packet handed over for user space to deal with).
    pub const fn is_event(self) -> bool {
        matches!(self, Self::EventFin | Self::EventRst | Self::EventAck)
    }
}

/// Header of every record in the punt ring; the frame bytes follow it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable, PartialEq, Eq)]
pub struct PuntHeader {
    /// Number of frame bytes following the header.
    pub len: u32,
    /// Original length of the packet (may exceed `len` only if truncated).
    pub orig_len: u32,
    /// Interface index the frame arrived on.
    pub ifindex: u32,
    /// A [`PuntReason`] value.
    pub reason: u16,
    /// An [`Origin`] value.
    pub origin: u8,
    /// Reserved, zero.
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<PuntHeader>() == 16);

/// The per-CPU scratch buffer: a header followed by room for one frame.
///
/// The program copies the packet here, then hands `size_of::<PuntHeader>() +
/// len` bytes of it to the ring buffer in one `bpf_ringbuf_output` call.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct PuntScratch {
    /// Record header.
    pub hdr: PuntHeader,
    /// Frame bytes; only the first `hdr.len` are meaningful.
    pub data: [u8; SCRATCH_DATA_BYTES],
}
const _: () = assert!(core::mem::size_of::<PuntScratch>() == 16 + SCRATCH_DATA_BYTES);

/// Indices of the per-CPU counters in [`COUNTERS_MAP`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// Frames handed to user space through the punt ring.
    PuntPackets = 0,
    /// Bytes of those frames.
    PuntBytes = 1,
    /// Frames that should have been punted but the ring was full.
    PuntRingFull = 2,
    /// Frames too large to punt.
    PuntOversize = 3,
    /// Frames whose bytes could not be read from the skb.
    PuntLoadError = 4,
    /// Packets seen on the uplink that belong to no flow of ours (left alone).
    UplinkNotOurs = 5,
    /// Packets forwarded by the fast path (both directions).
    FastPackets = 6,
    /// Bytes of those packets.
    FastBytes = 7,
    /// Event records that could not be written (ring full).
    EventRingFull = 8,
    /// Redirects the kernel refused (the packet was dropped).
    RedirectError = 9,
    /// ICMP on the uplink too short to read, or errors whose quoted packet
    /// could not be read (left to the host stack, like anything not ours).
    IcmpUnparsed = 10,
    /// First fragments of our flows whose datagram the kernel now tracks
    /// in [`FRAGS_MAP`].
    FragsTracked = 11,
    /// Packets seen on loopback's ingress that belong to no flow of ours
    /// (the host's own local traffic, left alone).
    LoNotOurs = 12,
}

/// Number of entries in [`COUNTERS_MAP`]: the [`Counter`]s, then one
/// punt counter per [`PuntReason`] at `PUNT_REASON_COUNTER_BASE + reason`.
pub const COUNTER_SLOTS: u32 = 32;

/// Index of the first per-reason punt counter in [`COUNTERS_MAP`].
pub const PUNT_REASON_COUNTER_BASE: u32 = 16;
const _: () = assert!(PUNT_REASON_COUNTER_BASE + (PuntReason::ALL.len() as u32) < COUNTER_SLOTS);

impl Counter {
    /// All counters, for reports.
    pub const ALL: [Counter; 13] = [
        Self::PuntPackets,
        Self::PuntBytes,
        Self::PuntRingFull,
        Self::PuntOversize,
        Self::PuntLoadError,
        Self::UplinkNotOurs,
        Self::FastPackets,
        Self::FastBytes,
        Self::EventRingFull,
        Self::RedirectError,
        Self::IcmpUnparsed,
        Self::FragsTracked,
        Self::LoNotOurs,
    ];

    /// Stable lower-case name used in logs and JSON output.
    pub const fn name(self) -> &'static str {
        match self {
            Self::PuntPackets => "punt_packets",
            Self::PuntBytes => "punt_bytes",
            Self::PuntRingFull => "punt_ring_full",
            Self::PuntOversize => "punt_oversize",
            Self::PuntLoadError => "punt_load_error",
            Self::UplinkNotOurs => "uplink_not_ours",
            Self::FastPackets => "fastpath_packets",
            Self::FastBytes => "fastpath_bytes",
            Self::EventRingFull => "event_ring_full",
            Self::RedirectError => "redirect_error",
            Self::IcmpUnparsed => "icmp_unparsed",
            Self::FragsTracked => "frags_tracked",
            Self::LoNotOurs => "lo_not_ours",
        }
    }
}
const _: () = assert!((Counter::ALL.len() as u32) <= PUNT_REASON_COUNTER_BASE);

// ---------------------------------------------------------------------------
// Flow table
// ---------------------------------------------------------------------------

/// Name of the flow hash map ([`FlowKey`] → [`FlowEntry`]).
pub const FLOWS_MAP: &str = "TG_FLOWS";
/// Name of the mmapable activity array (one [`ActivityWord`] per slot).
pub const ACTIVITY_MAP: &str = "TG_ACTIVITY";

/// Default number of flow slots (each flow has two map entries, one per
/// direction, and one slot). The loader may change it (`--max-flows`).
pub const DEFAULT_MAX_FLOWS: u32 = 1 << 18;

/// Activity bit: any packet of the flow was forwarded since the last scan.
pub const ACTIVE: u64 = 1;
/// Activity bit: a packet from the guest was forwarded since the last scan.
pub const TAP_ACTIVE: u64 = 2;
/// One activity word per flow slot. The kernel sets bits only when they
/// are not already set; user space clears them after each scan.
pub type ActivityWord = u64;

/// Key direction: a packet arriving from the guest on the tap.
pub const DIR_FROM_TAP: u8 = 0;
/// Key direction: a packet arriving from the world on the uplink.
pub const DIR_FROM_UPLINK: u8 = 1;
/// Key direction: a packet arriving on loopback's ingress from a client on
/// the host itself, towards a forwarded port (an inbound forward from the
/// host). A key of its own, so that a packet from the uplink never matches
/// a host-local client's entry (nor the reverse), whatever its addresses
/// claim. New within [`MAP_LAYOUT_VERSION`] 2 (unreleased); a daemon that
/// does not know it removes such entries as orphans when it adopts them.
pub const DIR_FROM_LO: u8 = 2;

/// Address family values in keys and entries.
pub const FAMILY_IPV4: u8 = 4;
/// IPv6: addresses fill the 16-byte fields as on the wire.
pub const FAMILY_IPV6: u8 = 6;

/// IP protocol numbers used in keys.
pub const PROTO_ICMP: u8 = 1;
/// TCP.
pub const PROTO_TCP: u8 = 6;
/// UDP.
pub const PROTO_UDP: u8 = 17;
/// ICMPv6 (echo flows of IPv6: the identifier is the "port", as for
/// [`PROTO_ICMP`]).
pub const PROTO_ICMPV6: u8 = 58;

/// Name of the forwarded-ports map: a longest-prefix-match trie of
/// [`FwdPrefix`] → `u8` (1), the host ports whose new connections (TCP SYN)
/// and datagrams (UDP) from the world are punted with
/// [`PuntReason::Forward`]. User space fills it from its forwarding rules,
/// a port range as the few prefixes that cover it, so forwarding every
/// port costs a handful of entries, not one per port.
pub const FWD_PORTS_MAP: &str = "TG_FWD_PORTS";
/// Capacity of [`FWD_PORTS_MAP`] in prefixes (trie nodes are allocated on
/// insert; the capacity costs nothing until used).
pub const FWD_PORTS_MAX: u32 = 65536;
/// Bits of a [`FwdPrefix`] that every entry matches exactly: the family,
/// the address and the protocol (8 + 128 + 8).
pub const FWD_PREFIX_FIXED_BITS: u32 = 144;
/// Bits of a whole [`FwdPrefix`] (the prefix length of a lookup): the
/// fixed part and the 16-bit port.
pub const FWD_PREFIX_BITS: u32 = FWD_PREFIX_FIXED_BITS + 16;

/// Data of a [`FWD_PORTS_MAP`] key, in match order: an address family, a
/// host address, a protocol and a host port (big-endian, so a port range
/// is a bit prefix). Entries always match family, address and protocol
/// exactly: user space publishes a rule without an address once per
/// address of the host, of both families, so traffic routed through the
/// host, or to a multicast or broadcast address, never matches. The family
/// comes first so an IPv4 address (in the first four bytes of `addr`, the
/// rest zero, as in [`FlowKey`]) never matches an IPv6 address that
/// happens to share those bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable, PartialEq, Eq, Hash, Default)]
pub struct FwdPrefix {
    /// [`FAMILY_IPV4`] or [`FAMILY_IPV6`].
    pub family: u8,
    /// The host (destination) address: IPv6 as on the wire, IPv4 in the
    /// first four bytes and the rest zero ([`ipv4_to_16`]).
    pub addr: [u8; 16],
    /// [`PROTO_TCP`] or [`PROTO_UDP`].
    pub proto: u8,
    /// The host (destination) port, big-endian.
    pub port: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<FwdPrefix>() == 20);
const _: () = assert!(FWD_PREFIX_BITS as usize == 8 * core::mem::size_of::<FwdPrefix>());

/// Name of the fragment-tracking map: [`FragKey`] → the time (ns,
/// `bpf_ktime_get_ns`) the first fragment of a datagram of one of our flows
/// arrived from the world (IPv4, or IPv6 with a fragment header right
/// after the fixed header). Later fragments carry no ports; the uplink
/// program punts those whose datagram is here and younger than
/// [`FRAG_TRACK_NS`]. An LRU map: the kernel evicts old entries itself.
pub const FRAGS_MAP: &str = "TG_FRAGS";
/// Capacity of [`FRAGS_MAP`].
pub const FRAGS_MAX: u32 = 8192;
/// How long a tracked datagram's later fragments are taken (the
/// reassembly timeout of user space and of Linux, 30 s).
pub const FRAG_TRACK_NS: u64 = 30_000_000_000;

/// Key of [`FRAGS_MAP`]: what identifies the fragments of one datagram,
/// for both families: IPv4 by addresses, protocol and identification (RFC
/// 791), IPv6 by addresses and identification (RFC 8200; the next header
/// of later fragments may differ from the first's, so `proto` is zero).
///
/// Changed within [`MAP_LAYOUT_VERSION`] 2 (not released with the old
/// layout, so no further bump): it had 4-byte addresses, a 16-bit
/// identification and no family (12 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable, PartialEq, Eq, Hash, Default)]
pub struct FragKey {
    /// Source address (IPv4: first four bytes, the rest zero, as in
    /// [`FlowKey`]).
    pub src: [u8; 16],
    /// Destination address (IPv4: first four bytes, the rest zero).
    pub dst: [u8; 16],
    /// Identification, network order as on the wire: IPv4's 16 bits in
    /// the first two bytes (the rest zero), IPv6's 32 bits (the fragment
    /// header's).
    pub id: [u8; 4],
    /// IP protocol (IPv4); zero for IPv6.
    pub proto: u8,
    /// [`FAMILY_IPV4`] or [`FAMILY_IPV6`].
    pub family: u8,
    /// Reserved, zero.
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<FragKey>() == 40);

/// A directional 5-tuple as the packet carries it on arrival. IPv4
/// addresses occupy the first four bytes of the 16-byte fields, the rest is
/// zero, so both families share one map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable, PartialEq, Eq, Hash, Default)]
pub struct FlowKey {
    /// Source address.
    pub src: [u8; 16],
    /// Destination address.
    pub dst: [u8; 16],
    /// Source port, host order. ICMP echo: the identifier of a request
    /// (its "source port"), 0 for a reply.
    pub sport: u16,
    /// Destination port, host order. ICMP echo: 0 for a request, the
    /// identifier of a reply (the port the reply goes back to).
    pub dport: u16,
    /// IP protocol ([`PROTO_TCP`], [`PROTO_UDP`], [`PROTO_ICMP`],
    /// [`PROTO_ICMPV6`]).
    pub proto: u8,
    /// [`FAMILY_IPV4`] or [`FAMILY_IPV6`].
    pub family: u8,
    /// [`DIR_FROM_TAP`], [`DIR_FROM_UPLINK`] or [`DIR_FROM_LO`].
    pub dir: u8,
    /// Reserved, zero.
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<FlowKey>() == 40);

/// Flow states as the kernel sees them.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlowState {
    /// Handshake in progress: every packet goes to user space.
    Handshake = 0,
    /// Established: forwarded in the kernel.
    Established = 1,
    /// Half-closed, the guest closed first (still forwarded).
    FinWait = 2,
    /// Half-closed, the world closed first (still forwarded).
    CloseWait = 3,
    /// Both sides closed, waiting for the final ACK (still forwarded).
    LastAck = 4,
}

impl FlowState {
    /// Decodes the wire value.
    pub const fn from_u8(v: u8) -> Option<Self> {
        match v {
            0 => Some(Self::Handshake),
            1 => Some(Self::Established),
            2 => Some(Self::FinWait),
            3 => Some(Self::CloseWait),
            4 => Some(Self::LastAck),
            _ => None,
        }
    }

    /// Whether the kernel forwards packets in this state.
    pub const fn forwards(self) -> bool {
        !matches!(self, Self::Handshake)
    }
}

/// Entry flag: emit an [`PuntReason::EventAck`] record for every forwarded
/// packet (set by user space in LastAck, to see the final ACK).
pub const FLOW_F_EVENTS: u8 = 1;
/// Entry flag: the destination is one of the host's own addresses
/// (`--allow-host`): the packet enters the host stack through the ingress
/// of `out_ifindex` (loopback) instead of leaving through the uplink.
pub const FLOW_F_LOCAL: u8 = 2;

/// Index of the loopback device in every network namespace.
pub const LOOPBACK_IFINDEX: u32 = 1;

/// The complete rewrite for one direction of a flow, its state, its slot,
/// and what the kernel last saw in that direction.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable, PartialEq, Eq, Default)]
pub struct FlowEntry {
    /// New source address.
    pub new_src: [u8; 16],
    /// New destination address.
    pub new_dst: [u8; 16],
    /// New source port.
    pub new_sport: u16,
    /// New destination port.
    pub new_dport: u16,
    /// Egress interface index.
    pub out_ifindex: u32,
    /// Ethernet source for frames to the guest (unused towards the world:
    /// `bpf_redirect_neigh` fills the header there).
    pub eth_src: [u8; 6],
    /// Ethernet destination for frames to the guest.
    pub eth_dst: [u8; 6],
    /// Index into the activity array.
    pub slot: u32,
    /// A [`FlowState`] value.
    pub state: u8,
    /// `FLOW_F_*` bits.
    pub flags: u8,
    /// Reserved, zero.
    pub _pad: [u8; 2],
    /// Last ACK number seen in this direction (TCP, host order).
    pub last_ack: u32,
    /// Last window seen in this direction (TCP, unscaled, host order).
    pub last_win: u32,
    /// Reserved, zero.
    pub _pad2: u32,
    /// Packets forwarded in this direction by the kernel.
    pub packets: u64,
    /// Bytes forwarded in this direction by the kernel.
    pub bytes: u64,
}
const _: () = assert!(core::mem::size_of::<FlowEntry>() == 88);

/// Stores an IPv4 address in a 16-byte key/entry field.
pub const fn ipv4_to_16(a: [u8; 4]) -> [u8; 16] {
    [a[0], a[1], a[2], a[3], 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
}

/// The IPv4 address in a 16-byte key/entry field.
pub const fn ipv4_from_16(a: &[u8; 16]) -> [u8; 4] {
    [a[0], a[1], a[2], a[3]]
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: PuntHeader is repr(C), Pod, has no padding (asserted above).
    unsafe impl aya::Pod for super::PuntHeader {}
    // SAFETY: repr(C), Pod, no padding (asserted above).
    unsafe impl aya::Pod for super::FlowKey {}
    // SAFETY: repr(C), Pod, no padding (asserted above).
    unsafe impl aya::Pod for super::FlowEntry {}
    // SAFETY: repr(C), Pod, no padding (asserted above).
    unsafe impl aya::Pod for super::FwdPrefix {}
    // SAFETY: repr(C), Pod, no padding (asserted above).
    unsafe impl aya::Pod for super::FragKey {}
}
