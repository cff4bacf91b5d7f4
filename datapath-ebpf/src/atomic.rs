//! Atomic add and or on map memory.
//!
//! # Theory of operation
//!
//! The BPF target has no compare-and-swap, so `core::sync::atomic` offers
//! loads and stores but no read-modify-write. The compiler intrinsics lower
//! to BPF's own atomic instructions (`lock xadd`, `atomic or`; the build
//! selects `-C target-cpu=v3`), which is what per-flow counters and activity
//! bits shared by CPUs and user space need.

use core::intrinsics::{AtomicOrdering, atomic_or, atomic_xadd};

/// `*p += v`, atomically.
///
/// # Safety
/// `p` must point to live, 8-byte aligned map memory.
#[inline(always)]
pub unsafe fn add(p: *mut u64, v: u64) {
    // SAFETY: upheld by the caller.
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(p, v) };
}

/// `*p |= v`, atomically.
///
/// # Safety
/// `p` must point to live, 8-byte aligned map memory.
#[inline(always)]
pub unsafe fn or(p: *mut u64, v: u64) {
    // SAFETY: upheld by the caller.
    unsafe { atomic_or::<u64, u64, { AtomicOrdering::Relaxed }>(p, v) };
}
