//! Every map the programs use, defined in one place.
//!
//! Names and sizes come from `datapath-common` so user space opens exactly
//! these. The scratch array is sized to one entry here; the loader resizes it
//! to the number of possible CPUs before loading (a per-CPU array cannot hold
//! a 128 KiB value, the kernel caps those at 32 KiB).

use aya_ebpf::{
    macros::map,
    maps::{Array, PerCpuArray, RingBuf},
};
use datapath_common::{COUNTER_SLOTS, PUNT_RING_BYTES, PuntScratch};

/// Punted frames and events for user space.
#[map(name = "TG_PUNT")]
pub static TG_PUNT: RingBuf = RingBuf::with_byte_size(PUNT_RING_BYTES, 0);

/// One scratch record per CPU, indexed by `bpf_get_smp_processor_id()`.
#[map(name = "TG_SCRATCH")]
pub static TG_SCRATCH: Array<PuntScratch> = Array::with_max_entries(1, 0);

/// Per-CPU counters indexed by `datapath_common::Counter`.
#[map(name = "TG_COUNTERS")]
pub static TG_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_SLOTS, 0);

/// Adds `n` to counter `c` on this CPU.
#[inline(always)]
pub fn count(c: datapath_common::Counter, n: u64) {
    if let Some(p) = TG_COUNTERS.get_ptr_mut(c as u32) {
        // SAFETY: the pointer comes from the map lookup and is valid for
        // this CPU while the program runs; per-CPU, so no concurrent writer.
        unsafe { *p += n };
    }
}
