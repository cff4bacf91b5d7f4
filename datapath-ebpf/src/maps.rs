//! Every map the programs use, defined in one place.
//!
//! # Theory of operation
//!
//! Names and sizes come from `datapath-common` so user space opens exactly
//! these. The scratch array is sized to one entry here; the loader resizes it
//! to the number of possible CPUs before loading (a per-CPU array cannot hold
//! a 128 KiB value, the kernel caps those at 32 KiB). The flow map and the
//! activity array are resized by the loader to `--max-flows` (two entries
//! per flow, one slot per flow).

use aya_ebpf::{
    bindings::{BPF_F_MMAPABLE, BPF_F_NO_PREALLOC},
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf},
};
use datapath_common::{
    ActivityWord, COUNTER_SLOTS, Counter, DEFAULT_MAX_FLOWS, FRAGS_MAX, FWD_PORTS_MAX, FlowEntry,
    FlowKey, FragKey, FwdPrefix, PUNT_RING_BYTES, PuntScratch,
};

/// Punted frames and events for user space.
#[map(name = "TG_PUNT")]
pub static TG_PUNT: RingBuf = RingBuf::with_byte_size(PUNT_RING_BYTES, 0);

/// One scratch record per CPU, indexed by `bpf_get_smp_processor_id()`.
#[map(name = "TG_SCRATCH")]
pub static TG_SCRATCH: Array<PuntScratch> = Array::with_max_entries(1, 0);

/// Per-CPU counters indexed by `datapath_common::Counter` and, from
/// `PUNT_REASON_COUNTER_BASE`, by punt reason.
#[map(name = "TG_COUNTERS")]
pub static TG_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_SLOTS, 0);

/// The flow table: both directions of every flow. Entries are allocated on
/// insert (no preallocation): user space manages their lifetime.
#[map(name = "TG_FLOWS")]
pub static TG_FLOWS: HashMap<FlowKey, FlowEntry> =
    HashMap::with_max_entries(2 * DEFAULT_MAX_FLOWS, BPF_F_NO_PREALLOC);

/// Activity bits by flow slot, mmapped by user space.
#[map(name = "TG_ACTIVITY")]
pub static TG_ACTIVITY: Array<ActivityWord> =
    Array::with_max_entries(DEFAULT_MAX_FLOWS, BPF_F_MMAPABLE);

/// Host ports forwarded to the guest, by address and protocol, as port
/// prefixes: new connections and datagrams to them are punted. Filled by
/// user space from its rules.
#[map(name = "TG_FWD_PORTS")]
pub static TG_FWD_PORTS: LpmTrie<FwdPrefix, u8> =
    LpmTrie::with_max_entries(FWD_PORTS_MAX, BPF_F_NO_PREALLOC);

/// Datagrams of our flows whose fragments arrive from the world: the time
/// their first fragment was seen. Written and read by the kernel only; LRU,
/// so old datagrams make room by themselves.
#[map(name = "TG_FRAGS")]
pub static TG_FRAGS: LruHashMap<FragKey, u64> = LruHashMap::with_max_entries(FRAGS_MAX, 0);

/// Adds `n` to counter slot `idx` on this CPU.
#[inline(always)]
pub fn count_idx(idx: u32, n: u64) {
    if let Some(p) = TG_COUNTERS.get_ptr_mut(idx) {
        // SAFETY: the pointer comes from the map lookup and is valid for
        // this CPU while the program runs; per-CPU, so no concurrent writer.
        unsafe { *p += n };
    }
}

/// Adds `n` to counter `c` on this CPU.
#[inline(always)]
pub fn count(c: Counter, n: u64) {
    count_idx(c as u32, n);
}

/// Sets `bits` in the activity word of `slot`, writing only when one of
/// them is still clear (no cache-line ping-pong on the hot path).
#[inline(always)]
pub fn mark_active(slot: u32, bits: ActivityWord) {
    if let Some(p) = TG_ACTIVITY.get_ptr_mut(slot) {
        // SAFETY: array values are 8-byte aligned and live as long as the
        // map; the read may race a writer, which at worst costs one extra
        // atomic or.
        unsafe {
            if core::ptr::read_volatile(p) & bits != bits {
                crate::atomic::or(p, bits);
            }
        }
    }
}
