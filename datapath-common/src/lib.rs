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

/// Largest frame the kernel copies into a punt record: a 64 KiB IP packet
/// plus its Ethernet header. Longer frames (GSO super-packets beyond that)
/// are dropped and counted as [`Counter::PuntOversize`].
pub const PUNT_MAX_FRAME: u32 = 65535 + 14;

/// Size of the data area of the scratch buffer: the next power of two above
/// [`PUNT_MAX_FRAME`], so the eBPF side can bound a length with a mask.
pub const SCRATCH_DATA_BYTES: usize = 1 << 17;

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
    /// An IPv6 packet that matched no established flow.
    Ipv6NoFlow = 3,
    /// Any other frame (unknown EtherType, truncated header): user space
    /// decides and counts.
    Other = 4,
}

impl PuntReason {
    /// All reasons, for iterating counters and reports.
    pub const ALL: [PuntReason; 4] = [Self::Arp, Self::Ipv4NoFlow, Self::Ipv6NoFlow, Self::Other];

    /// Decodes the wire value, `None` for anything unknown.
    pub const fn from_u16(v: u16) -> Option<Self> {
        match v {
            1 => Some(Self::Arp),
            2 => Some(Self::Ipv4NoFlow),
            3 => Some(Self::Ipv6NoFlow),
            4 => Some(Self::Other),
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
        }
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
}

/// Number of entries in [`COUNTERS_MAP`].
pub const COUNTER_SLOTS: u32 = 16;

impl Counter {
    /// All counters, for reports.
    pub const ALL: [Counter; 6] = [
        Self::PuntPackets,
        Self::PuntBytes,
        Self::PuntRingFull,
        Self::PuntOversize,
        Self::PuntLoadError,
        Self::UplinkNotOurs,
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
        }
    }
}
const _: () = assert!((Counter::ALL.len() as u32) <= COUNTER_SLOTS);

#[cfg(feature = "user")]
mod user {
    // SAFETY: PuntHeader is repr(C), Pod, has no padding (asserted above).
    unsafe impl aya::Pod for super::PuntHeader {}
}
