//! tapgate's kernel programs.
//!
//! # Theory of operation
//!
//! Two TC classifiers, attached with tcx where the kernel has it:
//!
//! * `tg_tap_ingress` sees every frame the guest sends. Frames of
//!   established flows will be forwarded from here in the kernel; everything
//!   else leaves through the one punt exit ([`punt::punt`]) to user space and
//!   is dropped here — the host stack never sees a guest frame.
//! * `tg_uplink_ingress` sees every packet arriving on the host's uplink.
//!   A packet that belongs to no flow of ours is left exactly as it was and
//!   handed to the next program or the stack (`TCX_NEXT`), as if nothing were
//!   attached.
//!
//! Maps are defined in [`maps`]; shared types come from `datapath-common`.
#![no_std]
#![no_main]

mod maps;
mod punt;

use aya_ebpf::{bindings::TC_ACT_UNSPEC, macros::classifier, programs::TcContext};
use aya_log_ebpf::trace;
use datapath_common::{Counter, Origin, PuntReason};

const ETH_P_IP: u16 = 0x0800;
const ETH_P_ARP: u16 = 0x0806;
const ETH_P_IPV6: u16 = 0x86DD;
/// Offset of the EtherType in an Ethernet header.
const ETH_TYPE_OFF: usize = 12;

/// Frames from the guest.
#[classifier]
pub fn tg_tap_ingress(ctx: TcContext) -> i32 {
    let reason = match ctx.load::<u16>(ETH_TYPE_OFF).map(u16::from_be) {
        Ok(ETH_P_ARP) => PuntReason::Arp,
        Ok(ETH_P_IP) => PuntReason::Ipv4NoFlow,
        Ok(ETH_P_IPV6) => PuntReason::Ipv6NoFlow,
        _ => PuntReason::Other,
    };
    trace!(&ctx, "tap: punt reason {} len {}", reason as u16, ctx.len());
    punt::punt(&ctx, Origin::Tap, reason)
}

/// Packets from the world.
#[classifier]
pub fn tg_uplink_ingress(_ctx: TcContext) -> i32 {
    // No flows yet: nothing on the uplink is ours. TCX_NEXT (TC_ACT_UNSPEC)
    // behaves exactly like no program at all.
    maps::count(Counter::UplinkNotOurs, 1);
    TC_ACT_UNSPEC
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // eBPF programs cannot panic: the verifier rejects any reachable call
    // to this function, so the loop is never executed.
    loop {}
}

/// License section required by GPL-only helpers (ring buffer, skb helpers).
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
