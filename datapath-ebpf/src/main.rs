//! tapgate's kernel programs.
//!
//! # Theory of operation
//!
//! TC classifiers, attached with tcx where the kernel has it:
//!
//! * `tg_tap_ingress` sees every frame the guest sends. IPv4 and IPv6
//!   TCP/UDP and ICMP/ICMPv6 echo frames of established flows are
//!   rewritten and redirected to the uplink in the kernel
//!   ([`flow::from_tap`]); everything else leaves through the one punt
//!   exit ([`punt::punt`]) to user space and is dropped here — the host
//!   stack never sees a guest frame.
//! * `tg_uplink_ingress` sees every packet arriving on the host's uplink.
//!   Packets of our flows (IPv4 or IPv6) are rewritten and redirected to
//!   the tap, or punted (so are ICMP errors about our flows and the
//!   fragments of their datagrams, IPv4 and IPv6); a packet that belongs
//!   to no flow of ours — the host's own traffic, its IPv6 neighbour
//!   discovery above all — is left exactly as it was and handed to the
//!   next program or the stack (`TCX_NEXT`), as if nothing were attached.
//!   `tg_uplink_egress` (with `--allow-host` only) is the same code on the
//!   uplink's egress, for the host's replies to host-local flows.
//! * `tg_lo_ingress` (attached while ports are forwarded) sees everything
//!   the host sends itself through loopback: the openings and packets of
//!   clients on the host of forwarded ports (`127.0.0.1:PORT`,
//!   `[::1]:PORT`, the host's own addresses) are ours, on flow keys of
//!   their own direction; the host's other local traffic passes untouched
//!   ([`local::from_lo`]).
//!
//! The EtherType picks the family; from there one code path serves both
//! ([`parse::Family`]): parse → lookup → rewrite per family → one punt
//! exit.
//!
//! Modules: [`parse`] (bounds-checked headers), [`flow`] (lookup and
//! forwarding), [`local`] (loopback's ingress), [`nat`] (rewrite and checksums), [`punt`] (the punt exit
//! and events), [`maps`] (every map). Shared types come from
//! `datapath-common`.
#![no_std]
#![no_main]
// The BPF target has no compare-and-swap, so core's atomic types offer no
// read-modify-write; the intrinsics compile to BPF's atomic add/or.
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod atomic;
mod flow;
mod local;
mod maps;
mod nat;
mod parse;
mod punt;

use aya_ebpf::{bindings::TC_ACT_UNSPEC, macros::classifier, programs::TcContext};
use datapath_common::{Counter, Origin, PuntReason};
use parse::{ETH_P_ARP, ETH_P_IP, ETH_P_IPV6, Family};

/// Frames from the guest.
#[classifier]
pub fn tg_tap_ingress(ctx: TcContext) -> i32 {
    let family = match parse::ethertype(&ctx) {
        Some(ETH_P_IP) => Family::V4,
        Some(ETH_P_IPV6) => Family::V6,
        Some(ETH_P_ARP) => return punt::punt(&ctx, Origin::Tap, PuntReason::Arp),
        _ => return punt::punt(&ctx, Origin::Tap, PuntReason::Other),
    };
    flow::from_tap(&ctx, family)
}

/// Packets from the world.
#[classifier]
pub fn tg_uplink_ingress(ctx: TcContext) -> i32 {
    uplink(&ctx)
}

/// Packets the host sends out of the uplink (attached with `--allow-host`
/// only): replies of the host's own sockets to host-local flows are ours;
/// everything else leaves untouched.
#[classifier]
pub fn tg_uplink_egress(ctx: TcContext) -> i32 {
    uplink(&ctx)
}

/// Packets the host sends itself through loopback (attached while ports
/// are forwarded): host-local clients of forwarded ports are ours;
/// everything else passes untouched.
#[classifier]
pub fn tg_lo_ingress(ctx: TcContext) -> i32 {
    match parse::ethertype(&ctx) {
        Some(ETH_P_IP) => local::from_lo(&ctx, Family::V4),
        Some(ETH_P_IPV6) => local::from_lo(&ctx, Family::V6),
        _ => {
            maps::count(Counter::LoNotOurs, 1);
            TC_ACT_UNSPEC
        }
    }
}

#[inline(always)]
fn uplink(ctx: &TcContext) -> i32 {
    match parse::ethertype(ctx) {
        Some(ETH_P_IP) => flow::from_uplink(ctx, Family::V4),
        Some(ETH_P_IPV6) => flow::from_uplink(ctx, Family::V6),
        _ => {
            // TCX_NEXT (TC_ACT_UNSPEC) behaves exactly like no program.
            maps::count(Counter::UplinkNotOurs, 1);
            TC_ACT_UNSPEC
        }
    }
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
