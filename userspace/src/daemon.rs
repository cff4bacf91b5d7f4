//! The daemon: attach to a tap and serve the guest — `tapgate run`, and
//! each attachment of `tapgate agent`.
//!
//! # Theory of operation
//!
//! [`run`] is the one datapath code path. `tapgate run` calls it on its
//! main thread; the node agent calls it once per attachment, each on its
//! own thread that first entered the pod's network namespace (see
//! `netns`), with [`Hooks`] that replace the signals by a stop channel,
//! report readiness, answer stats queries, and name a pin directory and a
//! state file so a restarted agent adopts the datapath instead of
//! rebuilding it.
//!
//! Start-up checks everything that can be checked before touching the
//! kernel (privileges, arguments and forwarding rules, interfaces, the
//! per-tap lock, the control socket), reserves the forwarded ports (a port
//! the host already uses is an error naming it; the sockets are held until
//! exit), then loads and verifies the programs, opens the writers and
//! only then attaches — so a failure leaves nothing behind. The daemon then
//! runs on one tokio thread:
//!
//! * the punt reader hands each record to [`dispatch`]: guest frames go to
//!   the gateway's services first and, if not theirs, to the flow manager;
//!   packets from the world and flow events go to the flow manager — those
//!   punted on loopback's ingress (the record's ifindex) as from a client
//!   on the host itself; their outputs go to the guest (tap) or the world
//!   (raw socket);
//! * a one-second tick drives the flow manager's timers (LastAck and
//!   handshake timeouts, UDP expiry, the clock algorithm's keepalives and
//!   inactivity/dead-guest resets, whose segments it sends);
//! * the control socket answers `tapgate stats`, `tapgate flows` and
//!   `tapgate rules` (a change reserves or releases ports, updates the
//!   uplink program's forwarded-ports map and the manager's table, and
//!   attaches the loopback program with the first rule or detaches it with
//!   the last; RSTs of flows reset by `del --reset-flows` go out with the
//!   next tick);
//! * the aya-log forwarder copies the programs' log records into our log;
//! * SIGINT/SIGTERM (or the [`Hooks::stop`] channel) end the loop; then
//!   either everything attached is detached ([`Stop::Detach`]) or the
//!   pinned datapath is left running for the next daemon ([`Stop::Keep`]);
//! * the tick also notices when the tap (or, for the agent, the pod's
//!   network namespace) is gone, and ends the loop: nothing is left to
//!   serve.
//!
//! **Restart without loss.** With [`Hooks::pin_dir`], the datapath is
//! pinned and a datapath found pinned there is adopted (`loader`): the
//! flow table is rebuilt from the kernel maps (`flow::adopt`), the
//! forwarded ports are reserved again and the kernel's forwarded-ports map
//! re-synced without a gap, the guest's MAC and DHCP lease come back from
//! [`Hooks::state_file`] — and only then does the punt reader start, on
//! the ring that kept collecting punts while no daemon ran.
//!
//! The services and the flow manager live in `RefCell`s: everything runs on
//! one thread and no borrow is held across an `await`.

use std::{
    cell::{Cell, RefCell},
    fs,
    os::fd::AsRawFd,
    path::PathBuf,
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use aya_log::EbpfLogger;
use datapath_common::{Counter, LOOPBACK_IFINDEX, Origin, PuntReason};
use log::{debug, info, warn};
use serde_json::{Value, json};
use smoltcp::wire::{ETHERNET_HEADER_LEN, EthernetFrame};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::{mpsc, oneshot},
};

use crate::{
    cli::RunArgs,
    control::{self, ControlSource, RulesRequest},
    flow::{self, FlowConfig, FlowManager, SocketPorts},
    frag::{self, Reassembler, ReassemblyLimits},
    fwd::{self, PortReservations},
    iface::{self, Iface},
    instance::InstanceLock,
    kernel::{
        inject::{Injectors, Output, TapWriter, WorldWriter},
        loader::{Datapath, EMBEDDED_OBJECT, KernelCounters, LoadOptions},
        maps::{KernelFlowMaps, KernelFwdPorts},
        punt::{self, Punted, ReaderStats},
    },
    netns,
    services::{Claim, GuestServices},
    state::GuestState,
};

/// How often the flow manager's timers run.
const TICK: Duration = Duration::from_secs(1);
/// How often forwards without an address are re-synced with the host's
/// addresses.
const HOST_ADDRS_REFRESH: Duration = Duration::from_secs(5);
/// Default size of the punt ring buffer for `tapgate run`.
pub const RUN_RING_BYTES: u32 = datapath_common::PUNT_RING_BYTES;

type Manager = FlowManager<KernelFlowMaps, SocketPorts>;

/// How a stopped daemon leaves the kernel side.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    /// Detach everything and remove the pins: the guest loses its network.
    Detach,
    /// Leave the pinned datapath running for the next daemon (restart
    /// without loss); without pinning this is [`Stop::Detach`].
    Keep,
}

/// Why [`run`] returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ended {
    /// Stopped by a signal or the stop channel.
    Stopped(Stop),
    /// The tap went away (the VM ended); everything was removed.
    TapGone,
    /// The watched network namespace went away (the pod ended);
    /// everything was removed.
    NetnsGone,
}

/// A question to a running daemon, answered on its own thread.
#[derive(Debug)]
pub enum Query {
    /// The counters, as `tapgate stats --json` prints them.
    Stats(oneshot::Sender<Value>),
}

/// What a daemon reports once it serves the guest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ready {
    /// The uplink in use.
    pub uplink: String,
    /// Whether the datapath was adopted from pins.
    pub adopted: bool,
    /// Flows rebuilt from the adopted maps.
    pub flows_adopted: u64,
}

/// What the caller adds to a daemon (see the module documentation).
#[derive(Debug)]
pub struct Hooks {
    /// Pin the datapath here, adopting one already pinned.
    pub pin_dir: Option<PathBuf>,
    /// On SIGINT/SIGTERM leave the pinned datapath running
    /// (`--keep-datapath`); only used without [`Hooks::stop`].
    pub keep_on_signal: bool,
    /// Where the guest's MAC and DHCP lease are kept across restarts.
    pub state_file: Option<PathBuf>,
    /// End (and clean up) when this path no longer names the network
    /// namespace with this inode.
    pub netns_watch: Option<(PathBuf, u64)>,
    /// Stop when this fires (instead of SIGINT/SIGTERM); a dropped sender
    /// counts as [`Stop::Keep`] (the agent is going away).
    pub stop: Option<oneshot::Receiver<Stop>>,
    /// Questions to answer while running.
    pub queries: Option<mpsc::Receiver<Query>>,
    /// Told once the daemon serves the guest.
    pub ready: Option<oneshot::Sender<Ready>>,
    /// Size of the punt ring buffer (fixed for an adopted datapath).
    pub ring_bytes: u32,
    /// Capacity of the kernel's fragment tracking (datagrams).
    pub frags_max: u32,
    /// Bind the control socket (`tapgate stats` ...).
    pub control_socket: bool,
}

impl Default for Hooks {
    fn default() -> Self {
        Self {
            pin_dir: None,
            keep_on_signal: false,
            state_file: None,
            netns_watch: None,
            stop: None,
            queries: None,
            ready: None,
            ring_bytes: RUN_RING_BYTES,
            frags_max: datapath_common::FRAGS_MAX,
            control_socket: true,
        }
    }
}

/// Waits for the stop channel, or for SIGINT/SIGTERM without one.
async fn stopped(stop: Option<oneshot::Receiver<Stop>>, keep_on_signal: bool) -> Result<Stop> {
    if let Some(rx) = stop {
        return Ok(rx.await.unwrap_or(Stop::Keep));
    }
    let mut sigint = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    tokio::select! {
        _ = sigint.recv() => info!("SIGINT received"),
        _ = sigterm.recv() => info!("SIGTERM received"),
    }
    Ok(if keep_on_signal {
        Stop::Keep
    } else {
        Stop::Detach
    })
}

/// Answers queries until the channel closes.
async fn answer(queries: Option<mpsc::Receiver<Query>>, state: &State<'_>) {
    let Some(mut rx) = queries else {
        return std::future::pending().await;
    };
    while let Some(q) = rx.recv().await {
        match q {
            Query::Stats(reply) => {
                let _ = reply.send(state.stats());
            }
        }
    }
    std::future::pending().await
}

/// Serves the guest behind `args.tap` until stopped (see the module
/// documentation). The calling thread's network namespace is the one
/// served.
pub fn run(args: &RunArgs, mut hooks: Hooks) -> Result<Ended> {
    let mut cfg = args.guest_config()?;
    let mut cfg6 = args.guest_config6()?;
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
    let ephemeral = fwd::host_ephemeral_range();
    let forwards = args.forwards(ephemeral).context("port forwarding rules")?;
    let _lock = InstanceLock::acquire(&tap.name)?;
    let control_socket = if hooks.control_socket {
        Some(control::bind_control_socket(&args.control_socket_path())?)
    } else {
        None
    };
    let tap_mtu = tap.mtu().context("tap")?;
    cfg.mtu = u16::try_from(tap_mtu).unwrap_or(u16::MAX);
    if let Some(c) = cfg6.as_mut() {
        c.mtu = cfg.mtu;
    }
    if cfg6.is_some() && tap_mtu < 1280 {
        warn!(
            "tap {} has MTU {tap_mtu}, below IPv6's 1280: IPv6 is off",
            tap.name
        );
        cfg6 = None;
    }

    // One socket per flow holds its NAT port, one per forwarded port holds
    // that: make room for them.
    let held_ports = if args.no_reserve_ports {
        0
    } else {
        forwards.port_count() as u64
    };
    let want_fds = u64::from(args.max_flows) + 1024 + held_ports;
    let max_flows = match flow::ports::raise_nofile_limit(want_fds) {
        Ok(got) if got < want_fds => {
            let capped = u32::try_from(got.saturating_sub(1024).max(16)).unwrap_or(u32::MAX);
            warn!("open-file limit {got}: flows capped at {capped}");
            capped.min(args.max_flows)
        }
        Ok(_) => args.max_flows,
        Err(e) => {
            warn!("cannot raise the open-file limit: {e}");
            args.max_flows
        }
    };

    // The forwarded ports are taken before anything is loaded: a port the
    // host already uses is a startup error naming it.
    let reservations = if args.no_reserve_ports {
        PortReservations::default()
    } else {
        PortReservations::reserve(&forwards).context("port forwarding")?
    };
    for rule in forwards.rules() {
        info!("forwarding {rule} (\"{}\")", rule.token);
    }

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
            ring_bytes: hooks.ring_bytes,
            pin: hooks.pin_dir.clone(),
            frags_max: hooks.frags_max,
            host_egress: args.allow_host,
            ..LoadOptions::new(args.log_level.bpf_level(), max_flows)
        },
    )?;
    let adopted = datapath.adopted();
    let max_flows = datapath.max_flows();
    let bpf_logger = match EbpfLogger::init(datapath.ebpf_mut()) {
        Ok(l) => Some(l),
        Err(e) => {
            warn!("eBPF log forwarding unavailable: {e}");
            None
        }
    };
    let mut fwd_ports = datapath.take_fwd_ports()?;
    if adopted {
        // Keys the previous daemon published stay until the sync below
        // knows which the current rules still want: no forwarded port
        // stops being punted meanwhile.
        fwd_ports
            .adopt_published()
            .context("reading the adopted forwarded-ports map")?;
    }
    fwd_ports
        .set_host_addrs(&fwd::host_addrs(cfg6.is_some()).context("reading the host's addresses")?)
        .context("filling the forwarded-ports map")?;
    let forwarded = fwd_ports
        .insert(forwards.rules())
        .context("filling the forwarded-ports map")?;
    debug!(
        "{forwarded} forwarded ports in the kernel, {} held",
        reservations.len()
    );
    let ring = datapath.take_punt_ring()?;
    let counters = datapath.take_counters()?;
    let flow_maps = datapath.take_flow_maps()?;

    let mut fcfg = FlowConfig::new(cfg.clone(), tap.index, uplink.index);
    fcfg.guest6 = cfg6.clone();
    // An operator-named resolver (IPv4) serves both DNS addresses (the
    // IPv6 one through the relay); otherwise resolv.conf's IPv6 one, if any.
    fcfg.dns_upstream6 = if args.dns_upstream.is_some() {
        None
    } else {
        flow::resolv::resolve_upstream6()
    };
    fcfg.uplink_mtu = uplink_mtu(&uplink).context("uplink")?;
    fcfg.last_ack_timeout = Duration::from_secs(args.last_ack_timeout);
    fcfg.udp_timeout = Duration::from_secs(args.udp_timeout);
    fcfg.keepalive_interval = Duration::from_secs(args.keepalive_interval);
    fcfg.inactivity_interval = Duration::from_secs(args.inactivity_interval);
    fcfg.keepalive_probes = args.keepalive_probes;
    fcfg.max_flows = max_flows;
    fcfg.allow_host = args.allow_host;
    fcfg.dns_upstream = flow::resolv::resolve_upstream(args.dns_upstream);
    fcfg.forwards = forwards;
    match fcfg.dns_upstream {
        Some(ip) => info!("DNS forwarder {}:53 -> {ip}:53", cfg.dns),
        None => warn!(
            "no usable upstream DNS resolver: DNS to {} is refused",
            cfg.dns
        ),
    }
    let fcfg_dns6_missing = fcfg.guest6.is_some() && fcfg.dns_upstream6.is_none();
    let dns_upstream4 = fcfg.dns_upstream;
    let mut manager = FlowManager::new(fcfg, flow_maps, SocketPorts::new());
    let mut services = GuestServices::new(cfg.clone(), cfg6.clone());
    // The IPv6 DNS address needs an IPv6 resolver to be a NAT flow; with
    // an IPv4 one only, the services relay it.
    let dns_relay_fd = match (fcfg_dns6_missing, dns_upstream4) {
        (true, Some(up)) => match services.enable_dns_relay(up) {
            Ok(fd) => fd,
            Err(e) => {
                warn!("dns: cannot relay the IPv6 DNS address: {e}");
                None
            }
        },
        _ => None,
    };
    let mut flows_adopted = 0;
    if adopted {
        flows_adopted = manager.adopt(Instant::now()).flows;
    }
    // Host-local clients of forwarded ports come in on loopback's ingress:
    // the program is attached while there are rules, or adopted flows of
    // such clients (see `State::sync_loopback`).
    let loopback = !manager.forwards().is_empty() || manager.host_client_flows() > 0;
    if let Some(path) = &hooks.state_file {
        match GuestState::load(path) {
            Ok(saved) if adopted => services.restore(&saved),
            Ok(_) => {}
            Err(e) => warn!("{e}: starting without the guest's saved state"),
        }
    }
    if let Some(mac) = services.guest_mac() {
        manager.set_guest_mac(mac);
    }
    // After a restart: inbound IPv6 forwards go to the restored address.
    if let Some(a) = services.guest_addr6() {
        manager.set_guest_addr6(a);
    }

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    let stop = hooks.stop.take();
    let queries = hooks.queries.take();
    let ready = hooks.ready.take();
    // The control socket's `rules` requests attach and detach the loopback
    // program while the loop runs.
    let datapath = RefCell::new(datapath);
    let result = runtime.block_on(async {
        let injectors = Injectors {
            tap: TapWriter::open(&tap)?,
            world: WorldWriter::open()?,
        };
        let listener = match &control_socket {
            Some(c) => Some(
                c.tokio_listener()
                    .context("registering the control socket")?,
            ),
            None => None,
        };
        datapath
            .borrow_mut()
            .attach(&tap, &uplink, args.allow_host, loopback)?;
        info!(
            "ready: tap={} uplink={} guest={}/{} gateway={} dns={} mtu={}{}{}{}",
            tap.name,
            uplink.name,
            cfg.guest_addr,
            cfg.prefix_len,
            cfg.gateway,
            cfg.dns,
            cfg.mtu,
            cfg6.as_ref()
                .map(|c| format!(
                    " guest6={}/{} gateway6={} router={} dns6={}",
                    c.guest_addr, c.prefix_len, c.gateway, c.router_ll, c.dns
                ))
                .unwrap_or_else(|| " ipv6=off".to_owned()),
            control_socket
                .as_ref()
                .map(|c| format!(" control={}", c.path().display()))
                .unwrap_or_default(),
            if adopted {
                format!(" adopted={flows_adopted} flows")
            } else {
                String::new()
            }
        );
        if let Some(ready) = ready {
            let _ = ready.send(Ready {
                uplink: uplink.name.clone(),
                adopted,
                flows_adopted,
            });
        }

        let state = State {
            services: RefCell::new(services),
            manager: RefCell::new(manager),
            reader: ReaderStats::default(),
            counters,
            tap_index: tap.index,
            guest_mtu: cfg.mtu,
            fwd: RefCell::new(FwdRuntime {
                reservations,
                reserve: !args.no_reserve_ports,
                kernel: fwd_ports,
                ephemeral,
            }),
            pending: RefCell::new(Vec::new()),
            frags_guest: RefCell::new(Reassembler::new(ReassemblyLimits::default())),
            frags_world: RefCell::new(Reassembler::new(ReassemblyLimits::default())),
            saved: Cell::new(None),
            datapath: &datapath,
            lo_failed: Cell::new(false),
        };
        let reader = punt::run(ring, &state.reader, &injectors, |p, out| {
            state.dispatch(&p, out)
        });
        let ticker = async {
            let mut interval = tokio::time::interval(TICK);
            let mut out = Vec::new();
            let mut busy = false;
            let mut addrs_checked = Instant::now();
            loop {
                // A scan in progress goes on in small chunks with short
                // pauses, so punted packets never wait long behind it.
                if busy {
                    tokio::time::sleep(flow::clock::SCAN_PAUSE).await;
                } else {
                    interval.tick().await;
                }
                let now = Instant::now();
                busy = {
                    let mut manager = state.manager.borrow_mut();
                    manager.tick(now, &mut out);
                    manager.clock_busy()
                };
                // Unsolicited router advertisements.
                out.extend(
                    state
                        .services
                        .borrow_mut()
                        .poll(now)
                        .into_iter()
                        .map(Output::ToGuest),
                );
                state.expire_fragments(now, &mut out);
                if let Some(path) = &hooks.state_file {
                    state.save_guest_state(path);
                }
                if let Some(gone) = gone(&tap, hooks.netns_watch.as_ref()) {
                    return gone;
                }
                // Forwards without an address follow the host's addresses
                // (both families; IPv6 ones while the guest has IPv6).
                if now.duration_since(addrs_checked) >= HOST_ADDRS_REFRESH {
                    addrs_checked = now;
                    let addrs = fwd::host_addrs(cfg6.is_some());
                    let synced = addrs
                        .map_err(anyhow::Error::from)
                        .and_then(|a| Ok(state.fwd.borrow_mut().kernel.set_host_addrs(&a)?));
                    if let Err(e) = synced {
                        warn!("updating forwarded ports for the host's addresses: {e:#}");
                    }
                    // The uplink's MTU may change too (the kernel's MTU
                    // check follows it by itself).
                    match uplink_mtu(&uplink) {
                        Ok(mtu) => state.manager.borrow_mut().set_uplink_mtu(mtu),
                        Err(e) => warn!("reading the uplink's MTU: {e:#}"),
                    }
                }
                // The last host-local flow of a removed rule may be gone.
                state.sync_loopback(&state.manager.borrow());
                // RSTs of flows reset by `tapgate rules del --reset-flows`.
                out.append(&mut state.pending.borrow_mut());
                for o in out.drain(..) {
                    if let Err(e) = injectors.send(&o).await {
                        warn!("{e}");
                    }
                }
            }
        };
        let dns_relay = async {
            let Some(fd) = dns_relay_fd else {
                return std::future::pending().await;
            };
            let afd = match crate::aio::register(fd, tokio::io::Interest::READABLE) {
                Ok(a) => a,
                Err(e) => {
                    warn!("dns: relay socket: {e}");
                    return std::future::pending().await;
                }
            };
            loop {
                let mut ready = match afd.readable().await {
                    Ok(r) => r,
                    Err(e) => {
                        warn!("dns: relay socket: {e}");
                        return std::future::pending().await;
                    }
                };
                // A bounded batch per wake-up: a flood cannot hold the
                // loop; readiness is cleared only once the socket is empty.
                let (frames, drained) = state.services.borrow_mut().dns_relay_answers();
                if drained {
                    ready.clear_ready();
                }
                for f in frames {
                    if let Err(e) = injectors.send(&Output::ToGuest(f)).await {
                        warn!("{e}");
                    }
                }
                tokio::task::yield_now().await;
            }
        };
        let control = async {
            match listener {
                Some(l) => control::serve(l, &state).await,
                None => std::future::pending().await,
            }
        };
        let outcome = tokio::select! {
            r = reader => r.context("punt reader").map(|()| Ended::Stopped(Stop::Detach)),
            ended = ticker => Ok(ended),
            () = control => Ok(Ended::Stopped(Stop::Detach)),
            () = forward_bpf_logs(bpf_logger) => Ok(Ended::Stopped(Stop::Detach)),
            () = answer(queries, &state) => Ok(Ended::Stopped(Stop::Detach)),
            () = dns_relay => Ok(Ended::Stopped(Stop::Detach)),
            s = stopped(stop, hooks.keep_on_signal) => s.map(Ended::Stopped),
        };
        if let Some(path) = &hooks.state_file {
            state.save_guest_state(path);
        }
        info!("final counters: {}", state.stats());
        outcome
    });
    let mut datapath = datapath.into_inner();
    match result {
        Ok(Ended::Stopped(Stop::Keep)) if datapath.pin_dir().is_some() => {
            datapath.leave_pinned();
            info!(
                "left the datapath of {} running in the kernel (pinned)",
                tap.name
            );
        }
        _ => {
            datapath.detach();
            if let Some(path) = &hooks.state_file {
                remove_state(path);
            }
            info!("detached from {} and {}", tap.name, uplink.name);
        }
    }
    result
}

/// Whether the tap is gone (or replaced), or the watched namespace path no
/// longer names our namespace.
fn gone(tap: &Iface, netns_watch: Option<&(PathBuf, u64)>) -> Option<Ended> {
    if let Some((path, ino)) = netns_watch
        && !netns::still_names(path, *ino)
    {
        warn!(
            "network namespace {} is gone: stopping and removing the datapath",
            path.display()
        );
        return Some(Ended::NetnsGone);
    }
    match Iface::by_name(&tap.name) {
        Ok(now) if now.index == tap.index => None,
        _ => {
            warn!(
                "tap {} is gone: stopping and removing the datapath",
                tap.name
            );
            Some(Ended::TapGone)
        }
    }
}

/// Removes the state file of a datapath that is gone for good.
fn remove_state(path: &std::path::Path) {
    match fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => warn!("removing {}: {e}", path.display()),
    }
}

/// `frame` as it is if its IP packet fits `mtu`, else the frames of its
/// fragments (the Ethernet header copied onto each): IPv4 fragments, or
/// IPv6 ones with a Fragment header (see [`frag::fragment`]).
fn frames_within(frame: Vec<u8>, mtu: usize) -> Vec<Vec<u8>> {
    let Some(ip) = frame.get(ETHERNET_HEADER_LEN..) else {
        return vec![frame];
    };
    if ip.len() <= mtu {
        return vec![frame];
    }
    match frag::fragment(ip, mtu) {
        Ok(pieces) => pieces
            .into_iter()
            .map(|p| {
                let mut f = frame[..ETHERNET_HEADER_LEN].to_vec();
                f.extend_from_slice(&p);
                f
            })
            .collect(),
        Err(e) => {
            warn!("fragmenting a {}-byte reply for the guest: {e}", ip.len());
            Vec::new()
        }
    }
}

/// The IP packet of `frame` if it is a fragment for a [`Reassembler`]: an
/// IPv4 one (EtherType 0x0800) or an IPv6 one with a Fragment header
/// (EtherType 0x86DD), the version matching the EtherType.
fn ip_fragment(frame: &[u8]) -> Option<&[u8]> {
    let ip = frame.get(ETHERNET_HEADER_LEN..)?;
    let version = match frame.get(12..14)? {
        [0x08, 0x00] => 4,
        [0x86, 0xdd] => 6,
        _ => return None,
    };
    (ip.first().map(|b| b >> 4) == Some(version) && frag::is_fragment(ip)).then_some(ip)
}

/// The MTU of `uplink`, at most 65535.
fn uplink_mtu(uplink: &Iface) -> Result<u16> {
    let mtu = uplink
        .mtu()
        .with_context(|| format!("reading the MTU of {}", uplink.name))?;
    Ok(u16::try_from(mtu).unwrap_or(u16::MAX))
}

/// Everything the event loop shares.
struct State<'a> {
    services: RefCell<GuestServices>,
    manager: RefCell<Manager>,
    reader: ReaderStats,
    counters: KernelCounters,
    tap_index: u32,
    /// The tap's MTU.
    guest_mtu: u16,
    fwd: RefCell<FwdRuntime>,
    /// Segments queued outside the punt path (control requests), sent by
    /// the ticker.
    pending: RefCell<Vec<Output>>,
    /// Reassembly of the guest's fragmented datagrams.
    frags_guest: RefCell<Reassembler>,
    /// Reassembly of fragmented datagrams from the world for our flows.
    frags_world: RefCell<Reassembler>,
    /// The guest state last written to the state file.
    saved: Cell<Option<GuestState>>,
    /// The loaded programs (for attaching and detaching the loopback
    /// program as forwarding rules come and go).
    datapath: &'a RefCell<Datapath>,
    /// Attaching the loopback program failed (and was said).
    lo_failed: Cell<bool>,
}

/// What `tapgate rules add|del` changes besides the manager's table.
struct FwdRuntime {
    reservations: PortReservations,
    /// Whether ports are held with sockets (not `--no-reserve-ports`).
    reserve: bool,
    kernel: KernelFwdPorts,
    ephemeral: fwd::PortRange,
}

/// A rule for the control protocol.
fn rule_json(rule: &fwd::Rule, hits: Option<u64>) -> Value {
    let mut v = json!({
        "proto": rule.proto.to_string(),
        "spec": rule.token,
        "addr": rule.addr.map(|a| a.to_string()),
        "host": rule.host.to_string(),
        "guest": rule.guest().to_string(),
    });
    if let (Some(h), Some(obj)) = (hits, v.as_object_mut()) {
        obj.insert("hits".to_owned(), json!(h));
    }
    v
}

impl State<'_> {
    /// Writes the guest's MAC and DHCP lease if they changed.
    fn save_guest_state(&self, path: &std::path::Path) {
        let now = self.services.borrow().snapshot();
        let prev = self.saved.take();
        if prev.as_ref().is_some_and(|p| p.same_as(&now)) {
            self.saved.set(prev);
            return;
        }
        match now.save(path) {
            Ok(()) => self.saved.set(Some(now)),
            Err(e) => {
                warn!("{e}");
                self.saved.set(prev);
            }
        }
    }

    /// Attaches the loopback program while there are forwarding rules or
    /// flows of host-local clients (opened through a rule since removed:
    /// they carry on until they end, as the world's do), and detaches it
    /// once there are neither. Without the program a rule still serves the
    /// world, so a failure to attach is only logged.
    fn sync_loopback(&self, manager: &Manager) {
        let want = !manager.forwards().is_empty() || manager.host_client_flows() > 0;
        let mut datapath = self.datapath.borrow_mut();
        if want == datapath.loopback_attached() {
            return;
        }
        if want {
            // Retried every tick; said once.
            match datapath.attach_loopback() {
                Ok(()) => self.lo_failed.set(false),
                Err(e) if !self.lo_failed.replace(true) => {
                    warn!("host-local clients of forwarded ports are not served: {e}");
                }
                Err(e) => debug!("attaching to loopback: {e}"),
            }
        } else {
            datapath.detach_loopback();
            info!("no forwarding rules and no host-local flows: detached from loopback");
        }
    }

    /// `tapgate rules ...`.
    fn change_rules(&self, request: &RulesRequest) -> Result<Value> {
        let mut manager = self.manager.borrow_mut();
        let mut fwd = self.fwd.borrow_mut();
        let fwd = &mut *fwd;
        match request {
            RulesRequest::List => {
                let rules: Vec<Value> = manager
                    .forwards()
                    .rules_with_hits()
                    .map(|(r, h)| rule_json(r, Some(h)))
                    .collect();
                Ok(json!({ "rules": rules }))
            }
            RulesRequest::Add { proto, spec } => {
                let rules = manager
                    .forwards()
                    .prepare_add(*proto, spec, fwd.ephemeral)?;
                // The ports first (a host user is the error), then the
                // kernel, then the table the manager maps openings with.
                if fwd.reserve {
                    fwd.reservations.add(&rules)?;
                }
                if let Err(e) = fwd.kernel.insert(&rules) {
                    if let Err(e) = fwd.kernel.remove(&rules) {
                        warn!("rules: undoing a partial add: {e}");
                    }
                    fwd.reservations.release(&rules);
                    return Err(e).context("filling the forwarded-ports map");
                }
                for rule in &rules {
                    info!("rules: added {rule} (\"{}\")", rule.token);
                }
                let added: Vec<Value> = rules.iter().map(|r| rule_json(r, None)).collect();
                manager.forwards_mut().insert(rules);
                // Host-local clients too, from the first rule on.
                self.sync_loopback(&manager);
                Ok(json!({ "added": added }))
            }
            RulesRequest::Del {
                proto,
                spec,
                reset_flows,
            } => {
                let rules = manager
                    .forwards()
                    .prepare_remove(*proto, spec, fwd.ephemeral)?;
                // No new openings are punted once the kernel entries go.
                fwd.kernel
                    .remove(&rules)
                    .context("updating the forwarded-ports map")?;
                manager.forwards_mut().remove(&rules);
                let reset = if *reset_flows {
                    manager.reset_forwarded(&rules, &mut self.pending.borrow_mut())
                } else {
                    0
                };
                fwd.reservations.release(&rules);
                for rule in &rules {
                    info!("rules: removed {rule}, {reset} flows reset");
                }
                self.sync_loopback(&manager);
                let removed: Vec<Value> = rules.iter().map(|r| rule_json(r, None)).collect();
                Ok(json!({ "removed": removed, "flows_reset": reset }))
            }
        }
    }
}

impl State<'_> {
    /// Routes one punt record to its handler; IPv4 fragments and IPv6 ones
    /// (a Fragment header) go through reassembly first, and the whole
    /// datagram is dispatched once it is complete (with the Ethernet header
    /// of its last fragment).
    fn dispatch(&self, p: &Punted<'_>, out: &mut Vec<Output>) {
        if !p.reason.is_event()
            && let Some(ip) = ip_fragment(p.frame)
        {
            let frags = match p.origin {
                Origin::Tap => &self.frags_guest,
                Origin::Uplink => &self.frags_world,
            };
            let outcome = frags.borrow_mut().push(ip, Instant::now());
            let frag::FragOutcome::Complete(whole) = outcome else {
                return;
            };
            let mut frame = p
                .frame
                .get(..ETHERNET_HEADER_LEN)
                .unwrap_or_default()
                .to_vec();
            frame.extend_from_slice(&whole);
            let q = Punted {
                origin: p.origin,
                reason: p.reason,
                ifindex: p.ifindex,
                frame: &frame,
            };
            return self.dispatch_whole(&q, out);
        }
        self.dispatch_whole(p, out);
    }

    /// Drops reassemblies that timed out; the guest hears of its own
    /// ("fragment reassembly time exceeded": ICMP, or ICMPv6 for IPv6).
    fn expire_fragments(&self, now: Instant, out: &mut Vec<Output>) {
        let mac = self.services.borrow().guest_mac();
        for e in self.frags_guest.borrow_mut().expire(now) {
            if let (Some(first), Some(mac)) = (e.first, mac) {
                let mut manager = self.manager.borrow_mut();
                if e.key_src.is_ipv6() {
                    manager.reassembly_timeout6_to_guest(&first, mac, out);
                } else {
                    manager.reassembly_timeout_to_guest(&first, mac, out);
                }
            }
        }
        let lost = self.frags_world.borrow_mut().expire(now).len();
        if lost > 0 {
            debug!("{lost} datagrams from the world timed out in reassembly");
        }
    }

    /// Routes one punt record (a whole packet, or an event) to its handler.
    fn dispatch_whole(&self, p: &Punted<'_>, out: &mut Vec<Output>) {
        let now = Instant::now();
        let mut manager = self.manager.borrow_mut();
        // The loopback program's records: a client on the host itself.
        let from_host = p.origin == Origin::Uplink && p.ifindex == LOOPBACK_IFINDEX;
        if p.reason.is_event() {
            if from_host {
                manager.host_event(p.reason, p.frame, now, out);
            } else {
                manager.event(p.reason, p.origin, p.frame, now, out);
            }
            return;
        }
        match p.origin {
            Origin::Uplink => {
                // An opening of a forwarded port (a whole datagram, or one
                // reassembled from fragments) may be the first the manager
                // hears of the guest: it needs the MAC for the tap.
                if matches!(p.reason, PuntReason::Forward | PuntReason::Fragment)
                    && let Some(mac) = self.services.borrow().guest_mac()
                {
                    manager.set_guest_mac(mac);
                }
                if from_host {
                    manager.from_host(p.frame, p.reason, now, out);
                } else {
                    manager.from_world(p.frame, p.reason, now, out);
                }
            }
            Origin::Tap if p.ifindex != self.tap_index => {
                debug!("ignoring a frame punted from ifindex {}", p.ifindex);
            }
            Origin::Tap => {
                let mut services = self.services.borrow_mut();
                let claim = match p.reason {
                    // Frames of known flows skip the gateway's services.
                    PuntReason::Handshake | PuntReason::Exception => Claim::NotMine,
                    // A reassembled datagram may be for the gateway (a
                    // large ping) or for a flow.
                    _ => services.handle(p.frame, now),
                };
                if let Some(a) = services.guest_addr6()
                    && manager.guest_addr6() != Some(a)
                {
                    manager.set_guest_addr6(a);
                }
                match claim {
                    Claim::Reply(frame) => {
                        // A reply to a reassembled request (a large ping
                        // of the gateway) may need fragments of its own.
                        let mtu = usize::from(self.guest_mtu);
                        out.extend(frames_within(frame, mtu).into_iter().map(Output::ToGuest));
                    }
                    Claim::Consumed => {}
                    Claim::NotMine => {
                        let mac = services.guest_mac().or_else(|| {
                            EthernetFrame::new_checked(p.frame)
                                .ok()
                                .map(|f| f.src_addr())
                        });
                        if let Some(mac) = mac {
                            manager.from_guest(p.frame, mac, p.reason, now, out);
                        }
                    }
                }
            }
        }
    }
}

impl ControlSource for State<'_> {
    fn stats(&self) -> Value {
        let c = &self.counters;
        let punts: serde_json::Map<String, Value> = PuntReason::ALL
            .iter()
            .map(|r| (r.name().to_owned(), json!(c.punts(*r))))
            .collect();
        let kernel: serde_json::Map<String, Value> = Counter::ALL
            .iter()
            .map(|k| (k.name().to_owned(), json!(c.get(*k))))
            .collect();
        let f = self.manager.borrow().stats();
        let drops: serde_json::Map<String, Value> = f
            .drops
            .iter()
            .map(|(r, n)| (r.name().to_owned(), json!(n)))
            .collect();
        let s = self.services.borrow().stats().clone();
        let kinds = |c: &flow::IcmpCounts| -> Value {
            Value::Object(
                c.iter()
                    .map(|(k, n)| (k.name().to_owned(), json!(n)))
                    .collect(),
            )
        };
        let fragments = {
            let (g, w) = (self.frags_guest.borrow(), self.frags_world.borrow());
            let (gs, ws) = (g.stats(), w.stats());
            json!({
                "from_guest": gs.fragments,
                "from_world": ws.fragments,
                "reassembled": gs.reassembled + ws.reassembled,
                "sent": f.fragments_sent,
                "timed_out": gs.timed_out + ws.timed_out,
                "in_progress": g.in_progress() + w.in_progress(),
                "bytes_held": g.bytes_held() + w.bytes_held(),
                "duplicates": gs.duplicates + ws.duplicates,
                "evicted": gs.evicted + ws.evicted,
                "dropped": {
                    "malformed": gs.dropped_malformed + ws.dropped_malformed,
                    "overlap": gs.dropped_overlap + ws.dropped_overlap,
                    "too_big": gs.dropped_too_big + ws.dropped_too_big,
                    "no_room": gs.dropped_no_room + ws.dropped_no_room,
                },
            })
        };
        let icmp = json!({
            "sent_to_guest": kinds(&f.icmp.sent_to_guest),
            "sent_to_world": kinds(&f.icmp.sent_to_world),
            "translated_to_guest": kinds(&f.icmp.translated_to_guest),
            "translated_to_world": kinds(&f.icmp.translated_to_world),
            "rate_limited": f.icmp.rate_limited,
            "dropped": {
                "malformed": f.icmp.malformed,
                "unknown_flow": f.icmp.unknown_flow,
                "unsupported": f.icmp.unsupported,
            },
        });
        json!({
            "fastpath_packets": c.get(Counter::FastPackets),
            "fastpath_bytes": c.get(Counter::FastBytes),
            "slowpath_packets": c.get(Counter::PuntPackets),
            "punts": punts,
            "flows_active": f.flows_active,
            "keepalives_sent": f.keepalives_sent,
            "inactivity_resets": f.inactivity_resets,
            "probe_resets": f.probe_resets,
            "rst_answer_resets": f.rst_answer_resets,
            "icmp": icmp,
            "fragments": fragments,
            "flows": {
                "tcp_active": f.tcp_active,
                "udp_active": f.udp_active,
                "icmp_active": f.icmp_active,
                "adopted": f.flows_adopted,
                "adopt_ports_lost": f.adopt_ports_lost,
                "adopt_orphans": f.adopt_orphans,
                "created": f.flows_created,
                "closed": f.flows_closed,
                "tcp_closed_cleanly": f.tcp_closed_cleanly,
                "resets": f.resets,
                "handshake_timeouts": f.handshake_timeouts,
                "last_ack_timeouts": f.last_ack_timeouts,
                "udp_expired": f.udp_expired,
                "rsts_sent": f.rsts_sent,
                "icmp_sent": f.icmp_sent,
                "policy_denied": f.policy_denied,
                "forwards_accepted": f.forwards_accepted,
                "forwards_from_host": f.forwards_from_host,
                "slow_to_world": f.slow_to_world,
                "slow_to_guest": f.slow_to_guest,
                "events": f.events,
                "map_errors": f.map_errors,
                "drops": drops,
            },
            "services": {
                "arp_replies": s.arp_replies,
                "dhcp_replies": s.dhcp_replies,
                "echo_replies": s.echo_replies,
                "dhcpv6_replies": s.dhcpv6_replies,
                "neighbor_adverts": s.neighbor_adverts,
                "router_adverts": s.router_adverts,
                "ipv6_bad_source": s.ipv6_bad_source,
                "dns6_relayed": s.dns6_relayed,
                "malformed": s.malformed,
                "unhandled": s.unhandled,
            },
            "reader": {
                "records": self.reader.records.load(Ordering::Relaxed),
                "bad_records": self.reader.bad_records.load(Ordering::Relaxed),
                "inject_errors": self.reader.inject_errors.load(Ordering::Relaxed),
            },
            "kernel": kernel,
        })
    }

    fn rules(&self, request: &RulesRequest) -> Value {
        self.change_rules(request)
            .unwrap_or_else(|e| json!({ "error": format!("{e:#}") }))
    }

    fn flows(&self) -> Value {
        let flows: Vec<Value> = self
            .manager
            .borrow()
            .flows()
            .iter()
            .map(|f| {
                json!({
                    "proto": f.proto,
                    "guest": f.guest.to_string(),
                    "remote": f.remote.to_string(),
                    "upstream": f.upstream.to_string(),
                    "nat": f.nat.to_string(),
                    "state": f.state,
                    "fastpath_packets": f.fastpath_packets,
                    "age_secs": f.age.as_secs_f64(),
                })
            })
            .collect();
        Value::Array(flows)
    }
}

/// Copies the programs' aya-log records into the daemon's log; never
/// returns unless polling fails (then log forwarding just stops).
async fn forward_bpf_logs<T: log::Log>(logger: Option<EbpfLogger<T>>) {
    let Some(logger) = logger else {
        return std::future::pending().await;
    };
    let mut fd = match crate::aio::register(logger, tokio::io::Interest::READABLE) {
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
