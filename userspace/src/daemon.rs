//! `tapgate run`: attach to a tap and serve the guest.
//!
//! # Theory of operation
//!
//! Start-up checks everything that can be checked before touching the
//! kernel (privileges, arguments, interfaces, the per-tap lock), then loads
//! and verifies the programs, opens the tap writer and only then attaches —
//! so a failure leaves nothing behind. The daemon then runs on one tokio
//! thread: the punt reader feeds frames from the guest to the services and
//! writes their replies back, the aya-log forwarder copies the programs' log
//! records into the daemon's log, and a signal handler waits for SIGINT or
//! SIGTERM. On a signal everything attached is detached before exit.

use std::{fs, os::fd::AsRawFd, sync::atomic::Ordering, time::Instant};

use anyhow::{Context, Result, bail};
use aya_log::EbpfLogger;
use datapath_common::{Counter, Origin};
use log::{debug, info, warn};
use tapgate::{
    cli::RunArgs,
    guest::GuestServices,
    iface::{self, Iface},
    inject::TapWriter,
    instance::InstanceLock,
    loader::{Datapath, EMBEDDED_OBJECT, LoadOptions},
    privileges,
    punt::{self, ReaderStats},
};
use tokio::signal::unix::{SignalKind, signal};

/// Runs the daemon until SIGINT/SIGTERM.
pub fn run(args: RunArgs) -> Result<()> {
    if !privileges::has_needed_caps() {
        bail!("tapgate must run as root (it needs CAP_BPF, CAP_NET_ADMIN and CAP_NET_RAW)");
    }
    let mut cfg = args.guest_config()?;
    let tap = Iface::by_name(&args.tap).context("tap")?;
    let uplink_name = if args.uplink == "auto" {
        iface::default_route_iface().context("uplink")?
    } else {
        args.uplink.clone()
    };
    let uplink = Iface::by_name(&uplink_name).context("uplink")?;
    if uplink.index == tap.index {
        bail!(
            "the uplink and the tap are the same interface ({})",
            tap.name
        );
    }
    let _lock = InstanceLock::acquire(&tap.name)?;
    let tap_mtu = tap.mtu().context("tap")?;
    cfg.mtu = u16::try_from(tap_mtu).unwrap_or(u16::MAX);

    let object_file;
    let object: &[u8] = match &args.ebpf_object {
        Some(path) => {
            object_file = fs::read(path)
                .with_context(|| format!("reading eBPF object {}", path.display()))?;
            &object_file
        }
        None => EMBEDDED_OBJECT,
    };
    let mut datapath = Datapath::load(
        object,
        &LoadOptions {
            bpf_log_level: args.log_level.bpf_level(),
            max_flows: datapath_common::DEFAULT_MAX_FLOWS,
        },
    )?;
    let bpf_logger = match EbpfLogger::init(datapath.ebpf_mut()) {
        Ok(l) => Some(l),
        Err(e) => {
            warn!("eBPF log forwarding unavailable: {e}");
            None
        }
    };
    let ring = datapath.take_punt_ring()?;
    let counters = datapath.take_counters()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    let result = runtime.block_on(async {
        let writer = TapWriter::open(&tap)?;
        // Signal handlers go in before attaching, so no signal is missed.
        let mut sigint = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
        let mut sigterm = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
        datapath.attach(&tap, &uplink)?;
        info!(
            "ready: tap={} uplink={} guest={}/{} gateway={} dns={} mtu={}",
            tap.name, uplink.name, cfg.guest_addr, cfg.prefix_len, cfg.gateway, cfg.dns, cfg.mtu
        );

        let stats = ReaderStats::default();
        let mut services = GuestServices::new(cfg.clone());
        let tap_index = tap.index;
        let reader = punt::run(ring, &stats, &writer, |p, outbox| {
            if p.origin == Origin::Tap && p.ifindex == tap_index {
                if let Some(reply) = services.handle(p.frame, Instant::now()) {
                    outbox.push(reply);
                }
            } else {
                debug!(
                    "ignoring punted frame from {:?} ifindex {}",
                    p.origin, p.ifindex
                );
            }
        });
        let logs = forward_bpf_logs(bpf_logger);
        let outcome = tokio::select! {
            r = reader => r.context("punt reader"),
            _ = sigint.recv() => { info!("SIGINT received"); Ok(()) }
            _ = sigterm.recv() => { info!("SIGTERM received"); Ok(()) }
            () = logs => Ok(()),
        };
        info!(
            "punted records {} (bad {}), inject errors {}, kernel: {}",
            stats.records.load(Ordering::Relaxed),
            stats.bad_records.load(Ordering::Relaxed),
            stats.inject_errors.load(Ordering::Relaxed),
            Counter::ALL
                .iter()
                .map(|c| format!("{}={}", c.name(), counters.get(*c)))
                .collect::<Vec<_>>()
                .join(" ")
        );
        outcome
    });
    datapath.detach();
    info!("detached from {} and {}", tap.name, uplink.name);
    result
}

/// Copies the programs' aya-log records into the daemon's log; never
/// returns unless polling fails (then log forwarding just stops).
async fn forward_bpf_logs<T: log::Log>(logger: Option<EbpfLogger<T>>) {
    let Some(logger) = logger else {
        return std::future::pending().await;
    };
    let mut fd = match tapgate::aio::register(logger, tokio::io::Interest::READABLE) {
        Ok(fd) => fd,
        Err(e) => {
            warn!("eBPF log forwarding unavailable: {e}");
            return std::future::pending().await;
        }
    };
    debug!("forwarding eBPF logs from fd {}", fd.get_ref().as_raw_fd());
    loop {
        match fd.readable_mut().await {
            Ok(mut guard) => {
                guard.get_inner_mut().flush();
                guard.clear_ready();
            }
            Err(e) => {
                warn!("eBPF log forwarding stopped: {e}");
                return std::future::pending().await;
            }
        }
    }
}
