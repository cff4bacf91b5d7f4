//! The clock algorithm: keepalives to idle guests, inactivity resets and
//! dead-guest probes, driven by the kernel's per-flow activity bits.
//!
//! # Theory of operation
//!
//! The kernel sets two bits in each flow's activity word (an mmapped array,
//! so reading it costs no syscall): `ACTIVE` for any forwarded packet,
//! `TAP_ACTIVE` for one from the guest. This module reads and clears them on
//! two independent intervals — one bit per flow, scan, clear, as in the
//! passt seed — with [`FlowMaps::take_activity`], an atomic fetch-and-clear
//! in the real maps, so a bit the kernel sets during a scan is either seen
//! by this scan or left for the next one, never lost. The keepalive scan
//! only takes `TAP_ACTIVE`, the inactivity scan only `ACTIVE`, so neither
//! hides activity from the other.
//!
//! * **Keepalive** (every `keepalive_interval`): a TCP flow whose
//!   `TAP_ACTIVE` bit is clear (the guest sent nothing since the last
//!   scan) gets a keepalive towards the guest, as from the remote the guest
//!   addressed: `seq` = the guest's last ACK − 1, `ack` = the remote's last
//!   ACK, the remote's last window, flag ACK, no data (the HOWTO's probe).
//!   The sequence number is just outside the guest's window, so a live
//!   guest answers with a duplicate ACK, which the fast path forwards to the
//!   remote (harmless) and which sets the bits again; a guest that forgot
//!   the flow answers with an RST, which the fast path forwards too — the
//!   remote expects exactly that sequence number — and reports as an
//!   `EventRst`, which removes the flow (counted in `rst_answer_resets`
//!   when a keepalive was outstanding).
//! * **Inactivity** (every `inactivity_interval`): a TCP flow whose `ACTIVE`
//!   bit is clear (no packet at all since the last scan) is reset on both
//!   sides — an RST to the guest as from the remote (`seq` = the guest's
//!   last ACK) and one to the world from the NAT address and port (`seq` =
//!   the remote's last ACK) — and removed. With the last packet at `t`, the
//!   first scan after `t` clears the bit and the next one finds it clear:
//!   the flow dies between one and two intervals after `t`. A guest's answer
//!   to a keepalive is traffic like any other, so idle connections to a
//!   live guest survive (that is what keepalives are for).
//! * **Dead-guest probes** (`keepalive_probes` = N > 0): each flow counts
//!   the keepalives sent since the guest last sent anything; a keepalive
//!   scan that finds `TAP_ACTIVE` still clear after N keepalives resets the
//!   flow on both sides instead of sending another one.
//!
//! Only flows in `Established`, `FinWait` and `CloseWait` are scanned:
//! handshakes and `LastAck` have their own, much shorter timers. UDP flows
//! have their own idle expiry (`udp.rs`), which owns their bits.
//!
//! The last ACKs come from the kernel's per-direction `last_ack` (one map
//! lookup, only for flows that get a segment). A direction that never
//! forwarded a packet has no meaningful `last_ack`; its last ACK is then the
//! handshake's: `world_isn + 1` from the guest, `guest_isn + 1` from the
//! remote (window 0: the guest drops the out-of-window keepalive before
//! looking at the window). A flow for which even that is unknown is
//! skipped.
//!
//! **Timing.** The first tick starts both clocks; scans then run on a fixed
//! grid of their interval, up to half a tick early so the daemon's
//! one-second tick jitter never pushes a scan to the following tick.
//!
//! **Cost.** A scan snapshots the candidate slots and then works through at
//! most [`SCAN_CHUNK`] flows per tick; while a scan is in progress
//! ([`FlowManager::clock_busy`]) the daemon ticks again after
//! [`SCAN_PAUSE`] instead of a second later. A chunk of idle flows (a
//! keepalive each: two map lookups and a frame, about 3.5 µs) then holds the
//! single daemon thread — and every punted packet — for about 15 ms at
//! most, and a million flows are scanned in a few seconds (`cargo bench
//! -p tapgate --bench clock` measures both). Flows created after a scan
//! started are not part of it.

use std::time::{Duration, Instant};

use datapath_common::{ACTIVE, FlowState, TAP_ACTIVE};
use log::{debug, info, warn};

use super::{FlowManager, FlowMaps, NatPorts, Output, packet, table::Flow};

/// Most flows one tick looks at per scan.
pub const SCAN_CHUNK: usize = 4096;

/// How soon the daemon ticks again while a scan is in progress.
pub const SCAN_PAUSE: Duration = Duration::from_millis(10);

/// How early a scan may run (the daemon ticks about once a second).
const DUE_SLACK: Duration = Duration::from_millis(500);

/// Which scan.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Keepalive,
    Inactivity,
}

/// One periodic scan: its interval, when it is next due, and the part of
/// the current pass still to do.
#[derive(Debug)]
struct Sweep {
    kind: Kind,
    interval: Duration,
    next: Option<Instant>,
    /// Slots of the pass in progress, processed from `pos` on.
    slots: Vec<u32>,
    pos: usize,
    /// When the pass in progress started.
    started: Option<Instant>,
}

impl Sweep {
    fn new(kind: Kind, interval: Duration) -> Self {
        Self {
            kind,
            interval,
            next: None,
            slots: Vec::new(),
            pos: 0,
            started: None,
        }
    }

    fn enabled(&self) -> bool {
        !self.interval.is_zero()
    }

    fn in_progress(&self) -> bool {
        self.pos < self.slots.len()
    }
}

/// The clock algorithm's configuration and scan state.
#[derive(Debug)]
pub(super) struct Clock {
    keepalive: Sweep,
    inactivity: Sweep,
    probes: u32,
}

impl Clock {
    /// A clock with the given intervals (zero: off) and probe count (zero:
    /// off).
    pub(super) fn new(keepalive: Duration, inactivity: Duration, probes: u32) -> Self {
        Self {
            keepalive: Sweep::new(Kind::Keepalive, keepalive),
            inactivity: Sweep::new(Kind::Inactivity, inactivity),
            probes,
        }
    }
}

impl Clock {
    /// Whether a scan is part-way through its flows.
    fn busy(&self) -> bool {
        self.keepalive.in_progress() || self.inactivity.in_progress()
    }

    fn sweep_mut(&mut self, kind: Kind) -> &mut Sweep {
        match kind {
            Kind::Keepalive => &mut self.keepalive,
            Kind::Inactivity => &mut self.inactivity,
        }
    }
}

/// Whether the clock looks at `flow`.
fn scanned(flow: &Flow) -> bool {
    flow.is_tcp()
        && matches!(
            flow.state,
            FlowState::Established | FlowState::FinWait | FlowState::CloseWait
        )
}

impl<M: FlowMaps, P: NatPorts> FlowManager<M, P> {
    /// Whether a keepalive or inactivity scan is part-way through its flows:
    /// the caller should [`tick`](Self::tick) again after [`SCAN_PAUSE`].
    pub fn clock_busy(&self) -> bool {
        self.clock.busy()
    }

    /// Runs whatever part of the keepalive and inactivity scans is due.
    pub(super) fn run_clock(&mut self, now: Instant, out: &mut Vec<Output>) {
        // Inactivity first: no keepalive for a flow about to be reset.
        for kind in [Kind::Inactivity, Kind::Keepalive] {
            let mut sweep =
                std::mem::replace(self.clock.sweep_mut(kind), Sweep::new(kind, Duration::ZERO));
            self.run_sweep(&mut sweep, now, out);
            *self.clock.sweep_mut(kind) = sweep;
        }
    }

    /// Starts a pass of `sweep` if it is due, then processes up to
    /// [`SCAN_CHUNK`] flows of the pass in progress.
    fn run_sweep(&mut self, sweep: &mut Sweep, now: Instant, out: &mut Vec<Output>) {
        if !sweep.enabled() {
            return;
        }
        let Some(next) = sweep.next else {
            // The first tick starts the clock.
            sweep.next = now.checked_add(sweep.interval);
            return;
        };
        // Due half a tick early: the daemon's tick jitters around the
        // second, and a scan must not slip to the tick after.
        if !sweep.in_progress() && now.checked_add(DUE_SLACK).is_some_and(|t| t >= next) {
            sweep.slots.clear();
            sweep
                .slots
                .extend(self.table.iter().filter(|f| scanned(f)).map(|f| f.slot));
            sweep.pos = 0;
            sweep.started = Some(now);
            // On a fixed grid from the first tick, unless it fell behind.
            sweep.next = next
                .checked_add(sweep.interval)
                .filter(|t| *t > now)
                .or_else(|| now.checked_add(sweep.interval));
            debug!(
                "clock: {:?} scan of {} flows",
                sweep.kind,
                sweep.slots.len()
            );
        }
        let Some(started) = sweep.started else {
            return;
        };
        let end = sweep.pos.saturating_add(SCAN_CHUNK).min(sweep.slots.len());
        for i in sweep.pos..end {
            let Some(&slot) = sweep.slots.get(i) else {
                break;
            };
            // Removed meanwhile, or the slot went to a newer flow.
            if !self
                .table
                .get(slot)
                .is_some_and(|f| scanned(f) && f.created <= started)
            {
                continue;
            }
            match sweep.kind {
                Kind::Keepalive => self.keepalive_slot(slot, out),
                Kind::Inactivity => self.inactivity_slot(slot, out),
            }
        }
        sweep.pos = end;
        if !sweep.in_progress() {
            sweep.slots = Vec::new();
            sweep.pos = 0;
            sweep.started = None;
        }
    }

    /// The keepalive scan's step for one flow.
    fn keepalive_slot(&mut self, slot: u32, out: &mut Vec<Output>) {
        let heard = self.maps.take_activity(slot, TAP_ACTIVE) & TAP_ACTIVE != 0;
        let probes = self.clock.probes;
        let Some(flow) = self.table.get_mut(slot) else {
            return;
        };
        if heard {
            flow.keepalives_unanswered = 0;
            return;
        }
        if probes > 0 && flow.keepalives_unanswered >= probes {
            info!(
                "clock: tcp {} -> {}: no answer to {probes} keepalives, resetting",
                flow.guest, flow.remote
            );
            self.stats.probe_resets += 1;
            self.reset_both_sides(slot, "dead guest", out);
            return;
        }
        let Some(guest_ack) = self.guest_last_ack(slot) else {
            debug!("clock: slot {slot}: the guest's last ACK is unknown, no keepalive");
            return;
        };
        let Some((world_ack, window)) = self.world_last_ack(slot) else {
            debug!("clock: slot {slot}: the remote's last ACK is unknown, no keepalive");
            return;
        };
        let Some(flow) = self.table.get_mut(slot) else {
            return;
        };
        flow.keepalives_unanswered = flow.keepalives_unanswered.saturating_add(1);
        let ip = packet::tcp_keepalive(
            flow.remote,
            flow.guest,
            guest_ack.wrapping_sub(1),
            world_ack,
            window,
        );
        debug!(
            "clock: keepalive to {} from {} (#{})",
            flow.guest, flow.remote, flow.keepalives_unanswered
        );
        out.push(Output::ToGuest(packet::ethernet_frame(
            self.guest.gateway_mac,
            flow.guest_mac,
            &ip,
        )));
        self.stats.keepalives_sent += 1;
    }

    /// The inactivity scan's step for one flow.
    fn inactivity_slot(&mut self, slot: u32, out: &mut Vec<Output>) {
        if self.maps.take_activity(slot, ACTIVE) & ACTIVE != 0 {
            return;
        }
        if let Some(flow) = self.table.get(slot) {
            info!(
                "clock: tcp {} -> {} idle for an inactivity interval, resetting",
                flow.guest, flow.remote
            );
        }
        self.stats.inactivity_resets += 1;
        self.reset_both_sides(slot, "inactivity", out);
    }

    /// Resets the flow in `slot` towards the guest and towards the world
    /// (each side only if its expected sequence number is known) and
    /// removes it.
    pub(super) fn reset_both_sides(&mut self, slot: u32, why: &str, out: &mut Vec<Output>) {
        let guest_ack = self.guest_last_ack(slot);
        let world_ack = self.world_last_ack(slot).map(|(ack, _)| ack);
        if let Some(flow) = self.table.get(slot) {
            if let Some(seq) = guest_ack {
                let ip = packet::tcp_rst(flow.remote, flow.guest, seq, None);
                out.push(Output::ToGuest(packet::ethernet_frame(
                    self.guest.gateway_mac,
                    flow.guest_mac,
                    &ip,
                )));
                self.stats.rsts_sent += 1;
            }
            if let Some(seq) = world_ack {
                out.push(Output::ToWorld(packet::tcp_rst(
                    flow.nat, flow.world, seq, None,
                )));
                self.stats.rsts_sent += 1;
            }
        }
        self.remove_flow(slot, why);
    }

    /// The guest's last ACK number (what it expects from the remote next).
    fn guest_last_ack(&mut self, slot: u32) -> Option<u32> {
        let flow = self.table.get(slot)?;
        let fallback = flow.world_isn.map(|isn| isn.wrapping_add(1));
        match self.maps.get(&flow.tap_key()) {
            Ok(Some(e)) if e.packets > 0 => Some(e.last_ack),
            Ok(_) => fallback,
            Err(e) => {
                warn!("clock: reading slot {slot}'s entry: {e}");
                self.stats.map_errors += 1;
                None
            }
        }
    }

    /// The remote's last ACK number and window (what it expects from the
    /// guest next).
    fn world_last_ack(&mut self, slot: u32) -> Option<(u32, u16)> {
        let flow = self.table.get(slot)?;
        let fallback = (flow.guest_isn.wrapping_add(1), 0);
        match self.maps.get(&flow.uplink_key()) {
            Ok(Some(e)) if e.packets > 0 => {
                Some((e.last_ack, u16::try_from(e.last_win).unwrap_or(u16::MAX)))
            }
            Ok(_) => Some(fallback),
            Err(e) => {
                warn!("clock: reading slot {slot}'s entry: {e}");
                self.stats.map_errors += 1;
                None
            }
        }
    }
}
