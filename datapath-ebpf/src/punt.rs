//! The single punt exit — copy a frame to user space and drop it here — and
//! flow events, which copy the first bytes of a packet that is forwarded.
//!
//! # Theory of operation
//!
//! The frame (linear part and fragments alike, via `bpf_skb_load_bytes`) is
//! copied into this CPU's scratch record behind a [`PuntHeader`], and the
//! header plus the real length is handed to the ring buffer with one
//! `bpf_ringbuf_output` call (a ring-buffer reservation must have a constant
//! size, which would waste 64 KiB per small frame). The frame is then
//! dropped in the kernel: user space owns it from here on. Every failure is
//! counted, never silent.
//!
//! An event ([`event`]) is not an exit: it reserves a constant-size record
//! (header + [`EVENT_SNAP_LEN`] bytes) in the same ring, so events and
//! punted packets stay in one order, and the caller goes on forwarding.
//! The snap holds every header of a forwarded segment of either family:
//! Ethernet + IPv6 (no extension headers are forwarded) + TCP with options
//! is 114 bytes, IPv4 (no options forwarded) 20 bytes less.

use aya_ebpf::{
    bindings::TC_ACT_SHOT,
    helpers::{bpf_get_smp_processor_id, bpf_skb_load_bytes},
    programs::TcContext,
};
use datapath_common::{
    Counter, EVENT_RECORD_LEN, EVENT_SNAP_LEN, Origin, PUNT_MAX_FRAME, PUNT_REASON_COUNTER_BASE,
    PuntHeader, PuntReason, SCRATCH_DATA_BYTES,
};

use aya_log_ebpf::trace;

use crate::{
    maps::{TG_PUNT, TG_SCRATCH, count, count_idx},
    parse::{ETH_HLEN, IPV6_HLEN, TCP_MAX_HLEN},
};

const _: () = assert!(ETH_HLEN + IPV6_HLEN + TCP_MAX_HLEN <= EVENT_SNAP_LEN as usize);

/// Hands the whole frame in `ctx` to user space and returns the TC verdict
/// that drops it here.
#[inline(always)]
pub fn punt(ctx: &TcContext, origin: Origin, reason: PuntReason) -> i32 {
    count_idx(PUNT_REASON_COUNTER_BASE + reason as u32, 1);
    let skb_len = ctx.len();
    trace!(
        ctx,
        "punt: origin {} reason {} len {}", origin as u8, reason as u16, skb_len
    );
    if skb_len > PUNT_MAX_FRAME || skb_len == 0 {
        count(Counter::PuntOversize, 1);
        return TC_ACT_SHOT;
    }
    // SAFETY: plain helper call without arguments.
    let cpu = unsafe { bpf_get_smp_processor_id() };
    let Some(scratch) = TG_SCRATCH.get_ptr_mut(cpu) else {
        count(Counter::PuntLoadError, 1);
        return TC_ACT_SHOT;
    };
    // The mask keeps the verifier certain the length fits the buffer.
    let len = (skb_len as usize) & (SCRATCH_DATA_BYTES - 1);
    if len == 0 {
        count(Counter::PuntOversize, 1);
        return TC_ACT_SHOT;
    }
    // SAFETY: `scratch` points to a map value of size_of::<PuntScratch>()
    // bytes, owned by this CPU for the duration of the program.
    let rc = unsafe {
        (*scratch).hdr = PuntHeader {
            len: len as u32,
            orig_len: skb_len,
            ifindex: (*ctx.skb.skb).ifindex,
            reason: reason as u16,
            origin: origin as u8,
            _pad: 0,
        };
        bpf_skb_load_bytes(
            ctx.skb.skb as *const _,
            0,
            (*scratch).data.as_mut_ptr().cast(),
            len as u32,
        )
    };
    if rc != 0 {
        count(Counter::PuntLoadError, 1);
        return TC_ACT_SHOT;
    }
    let total = core::mem::size_of::<PuntHeader>() + len;
    // SAFETY: `total` is at most size_of::<PuntScratch>() by construction.
    let rc = unsafe {
        aya_ebpf::helpers::bpf_ringbuf_output(
            core::ptr::addr_of!(TG_PUNT) as *mut _,
            scratch.cast(),
            total as u64,
            0,
        )
    };
    if rc != 0 {
        count(Counter::PuntRingFull, 1);
    } else {
        count(Counter::PuntPackets, 1);
        count(Counter::PuntBytes, len as u64);
    }
    TC_ACT_SHOT
}

/// Writes an event record: the first bytes of the packet in `ctx` as it
/// arrived. Never fails the caller; a full ring is counted.
#[inline(always)]
pub fn event(ctx: &TcContext, origin: Origin, reason: PuntReason) {
    count_idx(PUNT_REASON_COUNTER_BASE + reason as u32, 1);
    let skb_len = ctx.len();
    let snap = if skb_len < EVENT_SNAP_LEN {
        skb_len
    } else {
        EVENT_SNAP_LEN
    };
    let Some(mut rec) = TG_PUNT.reserve::<[u8; EVENT_RECORD_LEN]>(0) else {
        count(Counter::EventRingFull, 1);
        return;
    };
    let buf = rec.as_mut_ptr().cast::<u8>();
    let hdr = PuntHeader {
        len: 0,
        orig_len: skb_len,
        // SAFETY: reading a field of the context the program was given.
        ifindex: unsafe { (*ctx.skb.skb).ifindex },
        reason: reason as u16,
        origin: origin as u8,
        _pad: 0,
    };
    let hdr_len = core::mem::size_of::<PuntHeader>();
    // SAFETY: the record is EVENT_RECORD_LEN bytes; the header fits at the
    // start and at most EVENT_SNAP_LEN bytes follow it.
    let rc = unsafe {
        core::ptr::write_unaligned(buf.cast::<PuntHeader>(), hdr);
        if snap > 0 && snap <= EVENT_SNAP_LEN {
            let rc = bpf_skb_load_bytes(ctx.skb.skb as *const _, 0, buf.add(hdr_len).cast(), snap);
            if rc == 0 {
                (*buf.cast::<PuntHeader>()).len = snap;
            }
            rc
        } else {
            0
        }
    };
    if rc != 0 {
        count(Counter::PuntLoadError, 1);
    }
    rec.submit(0);
}
