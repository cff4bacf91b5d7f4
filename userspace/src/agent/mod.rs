//! `tapgate agent`: the Kubernetes node agent.
//!
//! # Theory of operation
//!
//! One agent runs per node (a DaemonSet) and serves the tap of every VM
//! pod there. The CNI plugin (`tapgate-cni`, see `crate::cni`) creates the
//! tap in the pod's network namespace and asks the agent, over HTTP+JSON
//! on a UNIX socket ([`api`]), to *attach*: the agent starts a datapath for
//! that tap — exactly `tapgate run` (`crate::daemon`), on a thread of its
//! own inside the pod's namespace, NATing the VM to the pod's address on
//! its `eth0` ([`registry`]). The API also lists, inspects, deletes and
//! garbage-collects attachments, and serves `/healthz` and Prometheus
//! `/metrics` ([`server`], [`crate::metrics`]), the latter two also on an
//! optional TCP address for the kubelet's probes and Prometheus.
//!
//! **Restart without loss.** Every attachment's datapath is pinned under
//! bpffs and its request and guest state recorded under the state
//! directory. SIGTERM (a rolling update) or SIGINT stops the agent leaving
//! every datapath running in the kernel; the next agent reads the records
//! back and adopts each pinned datapath before it handles punts again. A
//! SIGKILL leaves the same state behind (the links and maps are pinned,
//! not owned by the process). Only a `DELETE`, a GC or the pod's end
//! removes an attachment's datapath.

pub mod api;
pub mod client;
pub mod registry;
pub mod server;
pub mod settings;

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use log::{info, warn};
use tokio::signal::unix::{SignalKind, signal};

use crate::{cli::AgentArgs, metrics::AgentMetrics, privileges};

/// Default state directory.
pub const DEFAULT_STATE_DIR: &str = "/run/tapgate/agent";
/// Default bpffs directory for pinned datapaths.
pub const DEFAULT_BPFFS_DIR: &str = "/sys/fs/bpf/tapgate";
/// Default punt ring size per attachment, KiB.
pub const DEFAULT_RING_KIB: u32 = 1024;

/// Where `tapgate run` pins the datapath of `tap` (with
/// `--keep-datapath`): per network namespace, as tap names are.
pub fn run_pin_dir(tap: &str) -> PathBuf {
    PathBuf::from(DEFAULT_BPFFS_DIR)
        .join(format!("netns-{}", crate::netns::current_id().unwrap_or(0)))
        .join(tap)
}

/// Where `tapgate run --keep-datapath` keeps the guest's MAC and lease.
pub fn run_state_file(tap: &str) -> PathBuf {
    PathBuf::from(crate::control::CONTROL_DIR)
        .join(format!("netns-{}", crate::netns::current_id().unwrap_or(0)))
        .join(format!("{tap}.guest.json"))
}

/// Runs the agent until SIGINT/SIGTERM.
pub fn run(args: &AgentArgs) -> Result<()> {
    if !privileges::has_needed_caps() {
        bail!(
            "tapgate agent must run as root (it needs CAP_BPF, CAP_NET_ADMIN, CAP_NET_RAW and CAP_SYS_ADMIN)"
        );
    }
    // One thread per attachment: glibc would give each its own malloc
    // arena (8 per core), each keeping ~18 MB after set-up. Two arenas
    // serve the API and the datapaths' modest allocations.
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets a glibc tunable; called before any thread.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
    // Every attachment holds sockets (NAT ports, forwarded ports): raise
    // the process's limit once, as far as the hard limit allows.
    match crate::flow::ports::raise_nofile_limit(u64::MAX) {
        Ok(n) => info!("open-file limit {n}"),
        Err(e) => warn!("cannot raise the open-file limit: {e}"),
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    runtime.block_on(serve(args))
}

async fn serve(args: &AgentArgs) -> Result<()> {
    let registry = registry::Registry::new(
        registry::Paths {
            state_dir: args.state_dir.clone(),
            bpffs_dir: args.bpffs_dir.clone(),
        },
        args.log_level,
        args.ring_kib.saturating_mul(1024),
        AgentMetrics::default(),
    );
    let listener = server::bind_api_socket(&args.socket)?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    // Attachments a previous agent left are adopted before the API
    // answers: a CNI call never sees a half-restored agent.
    registry.restore().await;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let shutdown = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let api = tokio::spawn(server::serve_unix(
        listener,
        server::api_router(registry.clone()),
        shutdown(stop_rx.clone()),
    ));
    let public = args.listen.map(|addr| {
        tokio::spawn(server::serve_tcp(
            addr,
            server::public_router(registry.clone()),
            shutdown(stop_rx.clone()),
        ))
    });
    info!(
        "agent ready: api={} attachments={}",
        args.socket.display(),
        registry.list().len()
    );
    tokio::select! {
        _ = sigint.recv() => info!("SIGINT received"),
        _ = sigterm.recv() => info!("SIGTERM received"),
    }
    let _ = stop_tx.send(true);
    // Datapaths stay in the kernel for the next agent.
    registry.shutdown().await;
    if let Err(e) = std::fs::remove_file(&args.socket) {
        warn!("removing {}: {e}", args.socket.display());
    }
    for task in std::iter::once(api).chain(public) {
        match task.await {
            Ok(Err(e)) => warn!("{e:#}"),
            Err(e) => warn!("server task: {e}"),
            Ok(Ok(())) => {}
        }
    }
    info!("agent stopped; datapaths left running for the next agent");
    Ok(())
}
