//! `cargo xtask bench`: single-stream TCP throughput over IPv4 and IPv6
//! and fragmented UDP, tapgate against the kernel's own NAT, measured in the
//! same run.
//!
//! # Theory of operation
//!
//! Both peers use the test harness's veth topology (guest, host and world
//! namespaces; see `tapgate_tests::topology`), one after the other:
//!
//! * **kernel+nft**: [`Topology::new_kernel_router`] — the guest
//!   `10.0.2.15/24` and `fd00::15/64` is routed by the host namespace's
//!   kernel (`ip_forward=1` and `net.ipv6.conf.all.forwarding=1` there
//!   only) with nft masquerade (`ip` and `ip6` tables) on `uplink0`. This
//!   is the in-kernel limit the fast path is measured against.
//! * **tapgate**: a [`GuestKind::Veth`] topology with the release build of
//!   tapgate attached to `tap0` (`--log-level info`, a private control
//!   socket). The guest first autoconfigures IPv6 from tapgate's router
//!   advertisements: the bench waits (at most [`SLAAC_TIMEOUT`] each) for
//!   a global address in `fd00::/64`, out of `tentative`, and for the
//!   default route via the router's link-local [`ROUTER_LL`], and runs the
//!   IPv6 transfers; only then does the guest get its IPv4 address by DHCP
//!   (the harness's udhcpc script flushes every address of `eth0`, the
//!   link-local one too, after which the guest would wait for tapgate's
//!   next unsolicited advertisement, up to minutes, to get IPv6 back).
//!
//! For each peer and direction an `iperf3 -s -1` server runs in the world
//! namespace on `198.51.100.2` and the guest runs `iperf3 -c 198.51.100.2
//! -t SECS -J` (guest→world) or the same with `-R` (world→guest), then a
//! UDP run of 8192-byte datagrams offered at 2 Gbit/s (`-u -l 8192 -b 2G`),
//! which the guest fragments and tapgate reassembles and fragments again
//! (the slow path end to end; the kernel peer routes fragments as they
//! are); then both TCP directions again over IPv6: the server listens with
//! `-s -1 -B 2001:db8:1::2`, the client runs `iperf3 -6 -c 2001:db8:1::2`
//! (NAT66 in tapgate, masquerade in the kernel peer). The result is
//! `end.sum_received.bits_per_second` of iperf3's JSON (for UDP: what the
//! server received). Each run is bounded (`--connect-timeout`, and the
//! client is killed after SECS + 20 s); a failed run is reported as such
//! (`no connection (iperf3 error: ...)`, `no SLAAC address ...`) and the
//! bench goes on.
//!
//! Around tapgate's IPv4 TCP runs, and separately around its IPv6 TCP
//! runs, the bench reads `tapgate stats --json` from the control socket;
//! the share of packets the fast path handled is `Δfastpath_packets /
//! (Δfastpath_packets + Δslowpath_packets)` (`fastpath` and
//! `fastpath_share6` in the JSON).
//!
//! The table goes to stdout and the same data as JSON to
//! `target/bench/latest.json`: `results` holds the IPv4 rows (one object
//! per direction), `ipv6` the IPv6 ones (per peer, keys
//! `tcp6_guest_to_world` and `tcp6_world_to_guest`, and their ratios).
//! Every namespace and process is owned by a guard, so an error or Ctrl-C
//! (recorded by a handler, checked between steps) leaves nothing behind.

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use clap::ValueEnum;
use serde_json::{Value, json};
use tapgate_tests::{
    Child, GuestKind, Netns, Topology,
    child::run_with_timeout,
    dhcp::DhcpClient,
    topology::{GUEST_IFACE, WORLD_ADDR, WORLD_ADDR6},
};

/// The iperf3 port in the world namespace.
pub(crate) const IPERF_PORT: u16 = 5201;
/// Slack on top of `-t` before an iperf3 client is killed.
pub(crate) const RUN_SLACK: Duration = Duration::from_secs(20);
/// iperf3's own bound on connecting (milliseconds).
pub(crate) const CONNECT_TIMEOUT_MS: &str = "5000";
/// How long to wait for the iperf3 server to listen.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(5);
/// How long to wait for each of the guest's SLAAC address and IPv6
/// default route (tapgate answers the guest's router solicitation at once;
/// the guest sends it after its link-local address's DAD, about 1-2 s).
const SLAAC_TIMEOUT: Duration = Duration::from_secs(20);
/// tapgate's link-local router address for its default MAC
/// 52:55:0a:00:02:02 (modified EUI-64).
const ROUTER_LL: &str = "fe80::5055:aff:fe00:202";

/// Which side of the comparison to measure.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Peer {
    /// Kernel routing + nft masquerade.
    Kernel,
    /// tapgate.
    Tapgate,
}

/// Options of `cargo xtask bench`.
#[derive(Clone, Debug)]
pub struct Options {
    /// Seconds per iperf3 run.
    pub seconds: u32,
    /// Measure only this peer.
    pub only: Option<Peer>,
}

/// A transfer: direction and kind of traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Direction {
    GuestToWorld,
    WorldToGuest,
    /// UDP, 8192-byte datagrams (fragmented on the 1500-byte links),
    /// guest → world, offered at 2 Gbit/s: what arrives counts.
    FragUdpUp,
    /// TCP over IPv6, guest → world.
    Tcp6GuestToWorld,
    /// TCP over IPv6, world → guest (`-R`).
    Tcp6WorldToGuest,
}

impl Direction {
    /// Every run, in table order.
    const ALL: [Direction; 5] = [
        Direction::GuestToWorld,
        Direction::WorldToGuest,
        Direction::FragUdpUp,
        Direction::Tcp6GuestToWorld,
        Direction::Tcp6WorldToGuest,
    ];
    /// The IPv4 runs (the `results` array of the JSON).
    const IPV4: [Direction; 3] = [
        Direction::GuestToWorld,
        Direction::WorldToGuest,
        Direction::FragUdpUp,
    ];
    /// The IPv6 runs (the `ipv6` object of the JSON).
    const IPV6: [Direction; 2] = [Direction::Tcp6GuestToWorld, Direction::Tcp6WorldToGuest];

    fn label(self) -> &'static str {
        match self {
            Self::GuestToWorld => "guest→world",
            Self::WorldToGuest => "world→guest",
            Self::FragUdpUp => "udp 8K frag ↑",
            Self::Tcp6GuestToWorld => "IPv6 guest→world",
            Self::Tcp6WorldToGuest => "IPv6 world→guest",
        }
    }

    /// A JSON key for the run (those of the IPv6 runs are the keys of
    /// `ipv6`; the IPv4 runs keep their `results` array).
    fn key(self) -> &'static str {
        match self {
            Self::GuestToWorld => "tcp_guest_to_world",
            Self::WorldToGuest => "tcp_world_to_guest",
            Self::FragUdpUp => "udp_frag_guest_to_world",
            Self::Tcp6GuestToWorld => "tcp6_guest_to_world",
            Self::Tcp6WorldToGuest => "tcp6_world_to_guest",
        }
    }

    fn is_ipv6(self) -> bool {
        matches!(self, Self::Tcp6GuestToWorld | Self::Tcp6WorldToGuest)
    }
}

/// One iperf3 result: bits per second, or why there is none.
pub(crate) type Measurement = std::result::Result<f64, String>;

/// Results of one peer, per direction (`None`: not measured).
#[derive(Debug, Default)]
struct PeerResults {
    up: Option<Measurement>,
    down: Option<Measurement>,
    frag: Option<Measurement>,
    up6: Option<Measurement>,
    down6: Option<Measurement>,
}

impl PeerResults {
    fn get(&self, d: Direction) -> Option<&Measurement> {
        match d {
            Direction::GuestToWorld => self.up.as_ref(),
            Direction::WorldToGuest => self.down.as_ref(),
            Direction::FragUdpUp => self.frag.as_ref(),
            Direction::Tcp6GuestToWorld => self.up6.as_ref(),
            Direction::Tcp6WorldToGuest => self.down6.as_ref(),
        }
    }

    fn set(&mut self, d: Direction, m: Measurement) {
        let slot = match d {
            Direction::GuestToWorld => &mut self.up,
            Direction::WorldToGuest => &mut self.down,
            Direction::FragUdpUp => &mut self.frag,
            Direction::Tcp6GuestToWorld => &mut self.up6,
            Direction::Tcp6WorldToGuest => &mut self.down6,
        };
        *slot = Some(m);
    }

    /// The same failure for every direction of `dirs`.
    fn fail_all(&mut self, dirs: &[Direction], reason: &str) {
        for &d in dirs {
            self.set(d, Err(reason.to_owned()));
        }
    }

    /// The same failure for every direction.
    fn failed(reason: &str) -> Self {
        let mut r = Self::default();
        r.fail_all(&Direction::ALL, reason);
        r
    }
}

/// The fast path's share of tapgate's packets during the runs.
#[derive(Debug)]
struct Share {
    fast: u64,
    slow: u64,
}

/// A fast-path share, or why there is none.
type ShareResult = std::result::Result<Share, String>;

/// tapgate's fast-path shares: around the IPv4 TCP runs and around the
/// IPv6 ones.
#[derive(Debug)]
struct Shares {
    v4: ShareResult,
    v6: ShareResult,
}

/// Runs the benchmark with the tapgate binary `bin` (a release build);
/// writes the JSON report to `report`.
pub fn run(bin: &Path, opts: &Options, report: &Path) -> Result<()> {
    tapgate_tests::require_root()?;
    if opts.seconds == 0 {
        bail!("--seconds must be at least 1");
    }
    let stop = interrupt_flag()?;

    let date = command_line("date", &["-u", "+%Y-%m-%d %H:%M UTC"]);
    let kernel_release = command_line("uname", &["-r"]);
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    let header = format!(
        "single-stream TCP (IPv4, IPv6) and 8K UDP, veth guest, {} s, {date}, {cores} cores",
        opts.seconds
    );
    eprintln!("xtask: {header}");

    let kernel = if opts.only == Some(Peer::Tapgate) {
        None
    } else {
        Some(run_kernel(opts, &stop)?)
    };
    let (tapgate, shares) = if opts.only == Some(Peer::Kernel) {
        (None, None)
    } else {
        let (results, shares) = run_tapgate(bin, opts, &stop)?;
        (Some(results), Some(shares))
    };
    if stop.load(Ordering::SeqCst) {
        bail!("interrupted");
    }

    println!(
        "{}",
        table(&header, kernel.as_ref(), tapgate.as_ref(), shares.as_ref())
    );
    let k = |d| kernel.as_ref().and_then(|r| r.get(d));
    let t = |d| tapgate.as_ref().and_then(|r| r.get(d));
    let ipv6_of = |peer: Option<&PeerResults>| {
        Direction::IPV6
            .iter()
            .map(|&d| {
                (
                    d.key().to_owned(),
                    measurement_json(peer.and_then(|r| r.get(d))),
                )
            })
            .collect::<serde_json::Map<_, _>>()
    };
    let doc = json!({
        "benchmark": "single-stream TCP (IPv4 and IPv6) and fragmented UDP (iperf3)",
        "topology": "veth guest",
        "seconds": opts.seconds,
        "date": date,
        "cores": cores,
        "kernel_release": kernel_release,
        "results": Direction::IPV4.iter().map(|&d| {
            json!({
                "direction": d.label(),
                "kernel_nft": measurement_json(k(d)),
                "tapgate": measurement_json(t(d)),
                "ratio": ratio(k(d), t(d)),
            })
        }).collect::<Vec<_>>(),
        "ipv6": {
            "kernel_nft": ipv6_of(kernel.as_ref()),
            "tapgate": ipv6_of(tapgate.as_ref()),
            "ratio": Direction::IPV6
                .iter()
                .map(|&d| (d.key().to_owned(), json!(ratio(k(d), t(d)))))
                .collect::<serde_json::Map<_, _>>(),
        },
        "fastpath": shares.as_ref().map(|s| share_json(&s.v4)),
        "fastpath_share6": shares.as_ref().map(|s| share_json(&s.v6)),
    });
    if let Some(dir) = report.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let text = serde_json::to_string_pretty(&doc).context("encoding the report")?;
    std::fs::write(report, text + "\n").with_context(|| format!("writing {}", report.display()))?;
    eprintln!("xtask: report written to {}", report.display());
    Ok(())
}

/// The flag a Ctrl-C sets, checked between steps. The handler is
/// installed once per process (the agent benchmark shares it).
pub(crate) fn interrupt_flag() -> Result<Arc<AtomicBool>> {
    static FLAG: OnceLock<Arc<AtomicBool>> = OnceLock::new();
    if let Some(flag) = FLAG.get() {
        return Ok(Arc::clone(flag));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&stop);
    ctrlc::set_handler(move || flag.store(true, Ordering::SeqCst))
        .context("installing the Ctrl-C handler")?;
    Ok(Arc::clone(FLAG.get_or_init(|| stop)))
}

pub(crate) fn check_stop(stop: &AtomicBool) -> Result<()> {
    if stop.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

/// The kernel peer: every run on one (dual-stack) kernel-routed topology.
fn run_kernel(opts: &Options, stop: &AtomicBool) -> Result<PeerResults> {
    eprintln!("xtask: kernel+nft: building the kernel-routed topology");
    let topo = Topology::new_kernel_router().context("building the kernel-routed topology")?;
    let mut results = PeerResults::default();
    for d in Direction::ALL {
        check_stop(stop)?;
        eprintln!("xtask: kernel+nft: {} for {} s", d.label(), opts.seconds);
        let m = iperf(&topo, d, opts.seconds);
        report_progress("kernel+nft", d, &m);
        results.set(d, m);
    }
    Ok(results)
}

/// The tapgate peer: every run, and the fast-path shares. IPv6 first
/// (see the module documentation), then DHCP and IPv4.
fn run_tapgate(bin: &Path, opts: &Options, stop: &AtomicBool) -> Result<(PeerResults, Shares)> {
    eprintln!("xtask: tapgate: building the veth topology");
    let mut topo = Topology::new(GuestKind::Veth).context("building the veth topology")?;
    topo.set_tapgate_bin(bin.to_path_buf());
    let control = topo.control_socket();
    let no_run = || Shares {
        v4: Err("no run".to_owned()),
        v6: Err("no run".to_owned()),
    };
    // `info` is the quietest level that still logs the readiness line;
    // nothing is logged per packet or per flow at that level.
    let mut tapgate = match topo.start_tapgate(&["--log-level", "info"]) {
        Ok(child) => child,
        Err(e) => {
            let reason = format!("tapgate did not start: {e:#}");
            return Ok((PeerResults::failed(&reason), no_run()));
        }
    };
    let mut results = PeerResults::default();
    let mut shares = no_run();
    let measure = |d: Direction, results: &mut PeerResults, tapgate: &mut Child| -> Result<()> {
        check_stop(stop)?;
        eprintln!("xtask: tapgate: {} for {} s", d.label(), opts.seconds);
        let mut m = iperf(&topo, d, opts.seconds);
        if let Some(status) = tapgate.try_wait()? {
            m = Err(format!(
                "tapgate exited ({status}); stderr:\n{}",
                tapgate.stderr()
            ));
        }
        report_progress("tapgate", d, &m);
        results.set(d, m);
        Ok(())
    };

    check_stop(stop)?;
    eprintln!("xtask: tapgate: waiting for the guest's SLAAC address and IPv6 default route");
    match wait_slaac(topo.guest()) {
        Ok(()) => {
            let before = fast_slow(bin, &control);
            for d in Direction::IPV6 {
                measure(d, &mut results, &mut tapgate)?;
            }
            shares.v6 = share_between(before, fast_slow(bin, &control));
        }
        Err(e) => {
            let reason = format!("{e:#}");
            eprintln!("xtask: tapgate: IPv6 runs skipped: {reason}");
            results.fail_all(&Direction::IPV6, &reason);
        }
    }

    check_stop(stop)?;
    let client = DhcpClient::new(topo.guest(), topo.guest_iface())?;
    if let Err(e) = client.run_once() {
        let reason = format!("no DHCP lease: {e:#}");
        results.fail_all(&Direction::IPV4, &reason);
        return Ok((results, shares));
    }
    let before = fast_slow(bin, &control);
    let mut after = None;
    for d in Direction::IPV4 {
        if d == Direction::FragUdpUp {
            // The share is the TCP runs'; fragments all take the slow path.
            after = Some(fast_slow(bin, &control));
        }
        measure(d, &mut results, &mut tapgate)?;
    }
    let after = after.unwrap_or_else(|| fast_slow(bin, &control));
    shares.v4 = share_between(before, after);
    drop(tapgate);
    Ok((results, shares))
}

/// The fast-path share between two `(fast, slow)` readings.
fn share_between(
    before: std::result::Result<(u64, u64), String>,
    after: std::result::Result<(u64, u64), String>,
) -> ShareResult {
    match (before, after) {
        (Ok((f0, s0)), Ok((f1, s1))) => Ok(Share {
            fast: f1.saturating_sub(f0),
            slow: s1.saturating_sub(s0),
        }),
        (Err(e), _) | (_, Err(e)) => Err(e),
    }
}

/// Waits (at most [`SLAAC_TIMEOUT`] each) until the guest has a global
/// address in `fd00::/64` out of `tentative`, no link-local address still
/// `tentative`, and a default route via [`ROUTER_LL`].
fn wait_slaac(guest: &Netns) -> Result<()> {
    wait_guest(
        guest,
        &["ip", "-6", "addr", "show", "dev", GUEST_IFACE],
        "no SLAAC address in fd00::/64",
        |t| {
            t.lines().any(|l| {
                l.contains("inet6 fd00::") && l.contains("scope global") && !l.contains("tentative")
            }) && !t
                .lines()
                .any(|l| l.contains("inet6 fe80") && l.contains("tentative"))
        },
    )?;
    let route = format!("default via {ROUTER_LL} dev {GUEST_IFACE}");
    wait_guest(
        guest,
        &["ip", "-6", "route", "show", "default"],
        &format!("no IPv6 default route via {ROUTER_LL}"),
        |t| t.contains(&route),
    )
}

/// Polls `argv` in `guest` until its stdout satisfies `cond`; after
/// [`SLAAC_TIMEOUT`], fails with `what` and the last output.
fn wait_guest(guest: &Netns, argv: &[&str], what: &str, cond: impl Fn(&str) -> bool) -> Result<()> {
    let deadline = Instant::now() + SLAAC_TIMEOUT;
    loop {
        let out = guest.output_timeout(argv, Duration::from_secs(5))?;
        let text = String::from_utf8_lossy(&out.stdout);
        if out.status.success() && cond(&text) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "{what} after {SLAAC_TIMEOUT:?}; `{}` printed:\n{}",
                argv.join(" "),
                text.trim_end()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn report_progress(peer: &str, d: Direction, m: &Measurement) {
    match m {
        Ok(bps) => eprintln!("xtask: {peer}: {}: {}", d.label(), gbits(*bps)),
        Err(e) => eprintln!("xtask: {peer}: {}: failed: {e}", d.label()),
    }
}

/// Reads `fastpath_packets` and `slowpath_packets` through `tapgate stats
/// --json`.
fn fast_slow(bin: &Path, control: &Path) -> std::result::Result<(u64, u64), String> {
    let mut cmd = Command::new(bin);
    cmd.arg("stats")
        .arg("--json")
        .arg("--control-socket")
        .arg(control);
    let out = run_with_timeout(&mut cmd, Duration::from_secs(15)).map_err(|e| format!("{e:#}"))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        return Err(format!(
            "`tapgate stats` failed: {}",
            stderr.lines().next().unwrap_or("no output").trim()
        ));
    }
    let doc: Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| format!("`tapgate stats --json` printed no JSON: {e}"))?;
    let field = |k: &str| {
        doc.get(k)
            .and_then(Value::as_u64)
            .ok_or_else(|| format!("`tapgate stats --json` has no number {k:?}"))
    };
    Ok((field("fastpath_packets")?, field("slowpath_packets")?))
}

/// Waits until something listens on TCP `port` in `ns`.
pub(crate) fn wait_listening(ns: &Netns, server: &mut Child, port: u16) -> Result<()> {
    let deadline = Instant::now() + LISTEN_TIMEOUT;
    let filter = format!("sport = :{port}");
    loop {
        let out = ns.output_timeout(&["ss", "-Hltn", &filter], Duration::from_secs(5))?;
        if !String::from_utf8_lossy(&out.stdout).trim().is_empty() {
            return Ok(());
        }
        if let Some(status) = server.try_wait()? {
            bail!("iperf3 server exited ({status}): {}", server.stderr());
        }
        if Instant::now() >= deadline {
            bail!("iperf3 server not listening after {LISTEN_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One bounded iperf3 run in direction `d`.
fn iperf(topo: &Topology, d: Direction, seconds: u32) -> Measurement {
    iperf_inner(topo, d, seconds).unwrap_or_else(|e| Err(format!("{e:#}")))
}

fn iperf_inner(topo: &Topology, d: Direction, seconds: u32) -> Result<Measurement> {
    let port = IPERF_PORT.to_string();
    let server_addr = if d.is_ipv6() { WORLD_ADDR6 } else { WORLD_ADDR };
    let mut server_cmd = topo.world().cmd("iperf3");
    server_cmd.args(["-s", "-1", "-B", server_addr, "-p", &port]);
    let mut server = Child::spawn(server_cmd, "iperf3 server")?;
    wait_listening(topo.world(), &mut server, IPERF_PORT)?;
    let secs = seconds.to_string();
    let mut argv = vec!["iperf3"];
    if d.is_ipv6() {
        argv.push("-6");
    }
    argv.extend([
        "-c",
        server_addr,
        "-p",
        &port,
        "-t",
        &secs,
        "-J",
        "--connect-timeout",
        CONNECT_TIMEOUT_MS,
    ]);
    match d {
        Direction::GuestToWorld | Direction::Tcp6GuestToWorld => {}
        Direction::WorldToGuest | Direction::Tcp6WorldToGuest => argv.push("-R"),
        Direction::FragUdpUp => argv.extend(["-u", "-l", "8192", "-b", "2G"]),
    }
    let limit = Duration::from_secs(u64::from(seconds)) + RUN_SLACK;
    let out = match topo.guest().output_timeout(&argv, limit) {
        Ok(out) => out,
        Err(e) => return Ok(Err(format!("iperf3 did not finish: {e:#}"))),
    };
    drop(server);
    Ok(parse_iperf(&out.stdout, &out.stderr))
}

/// Extracts `end.sum_received.bits_per_second` from iperf3's JSON.
pub(crate) fn parse_iperf(stdout: &[u8], stderr: &[u8]) -> Measurement {
    let doc: Value = match serde_json::from_slice(stdout) {
        Ok(doc) => doc,
        Err(e) => {
            return Err(format!(
                "iperf3 printed no JSON ({e}); stderr: {}",
                String::from_utf8_lossy(stderr).trim()
            ));
        }
    };
    if let Some(err) = doc.get("error").and_then(Value::as_str) {
        return Err(if err.contains("unable to connect") {
            format!("no connection (iperf3 error: {err})")
        } else {
            format!("iperf3 error: {err}")
        });
    }
    doc.pointer("/end/sum_received/bits_per_second")
        .and_then(Value::as_f64)
        .filter(|bps| *bps > 0.0)
        .ok_or_else(|| "iperf3 reported no end.sum_received.bits_per_second".to_owned())
}

pub(crate) fn gbits(bps: f64) -> String {
    format!("{:.1} Gbit/s", bps / 1e9)
}

fn ratio(kernel: Option<&Measurement>, tapgate: Option<&Measurement>) -> Option<f64> {
    match (kernel, tapgate) {
        (Some(Ok(k)), Some(Ok(t))) if *k > 0.0 => Some(t / k),
        _ => None,
    }
}

fn share_of(s: &Share) -> Option<f64> {
    let total = s.fast.saturating_add(s.slow);
    (total > 0).then(|| s.fast as f64 / total as f64)
}

fn share_json(s: &ShareResult) -> Value {
    match s {
        Ok(s) => json!({
            "fastpath_packets": s.fast,
            "slowpath_packets": s.slow,
            "share": share_of(s),
        }),
        Err(e) => json!({ "error": e }),
    }
}

fn measurement_json(m: Option<&Measurement>) -> Value {
    match m {
        None => Value::Null,
        Some(Ok(bps)) => json!({ "bits_per_second": bps }),
        Some(Err(e)) => json!({ "error": e }),
    }
}

/// Left-aligns `s` in `width` characters (not bytes: `→` is one).
pub(crate) fn pad(s: &str, width: usize) -> String {
    let len = s.chars().count();
    format!("{s}{}", " ".repeat(width.saturating_sub(len)))
}

/// Width of the table's first column (`IPv6 world→guest` and a space).
const LABEL_WIDTH: usize = 18;

/// The human-readable report.
fn table(
    header: &str,
    kernel: Option<&PeerResults>,
    tapgate: Option<&PeerResults>,
    shares: Option<&Shares>,
) -> String {
    let cell = |m: Option<&Measurement>| match m {
        None => "skipped".to_owned(),
        Some(Ok(bps)) => gbits(*bps),
        Some(Err(_)) => "failed".to_owned(),
    };
    let mut lines = vec![
        header.to_owned(),
        format!(
            "{}{}{}ratio",
            pad("direction", LABEL_WIDTH),
            pad("kernel+nft", 14),
            pad("tapgate", 14)
        ),
    ];
    let mut notes = Vec::new();
    for d in Direction::ALL {
        let k = kernel.and_then(|r| r.get(d));
        let t = tapgate.and_then(|r| r.get(d));
        let r = ratio(k, t).map_or_else(|| "-".to_owned(), |r| format!("{r:.2}"));
        lines.push(format!(
            "{}{}{}{r}",
            pad(d.label(), LABEL_WIDTH),
            pad(&cell(k), 14),
            pad(&cell(t), 14)
        ));
        for (peer, m) in [("kernel+nft", k), ("tapgate", t)] {
            if let Some(Err(e)) = m {
                notes.push(format!("{peer} {}: {e}", d.label()));
            }
        }
    }
    if let Some(shares) = shares {
        for (what, share) in [("IPv4 TCP", &shares.v4), ("IPv6 TCP", &shares.v6)] {
            lines.push(match share {
                Ok(s) => match share_of(s) {
                    Some(f) => format!(
                        "fast-path share, {what}: {:.2}% of {} packets",
                        f * 100.0,
                        s.fast + s.slow
                    ),
                    None => format!("fast-path share, {what}: no packets counted"),
                },
                Err(e) => format!("fast-path share, {what}: unavailable ({e})"),
            });
        }
    }
    lines.extend(notes);
    lines.join("\n")
}

/// The first line of a command's output, or `?`.
pub(crate) fn command_line(program: &str, args: &[&str]) -> String {
    run_with_timeout(Command::new(program).args(args), Duration::from_secs(5))
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(|l| l.trim().to_owned())
        })
        .unwrap_or_else(|| "?".to_owned())
}

/// Where the JSON report goes under the target directory.
pub fn report_path(target: &Path) -> PathBuf {
    target.join("bench").join("latest.json")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn parses_iperf_json() {
        let ok = br#"{"end":{"sum_received":{"bits_per_second":1.25e10}}}"#;
        assert_eq!(parse_iperf(ok, b""), Ok(1.25e10));
        let err = br#"{"start":{},"error":"unable to connect to server: Connection timed out"}"#;
        let e = parse_iperf(err, b"").unwrap_err();
        assert!(e.starts_with("no connection (iperf3 error: unable"), "{e}");
        assert!(
            parse_iperf(b"garbage", b"boom")
                .unwrap_err()
                .contains("boom")
        );
    }

    #[test]
    fn table_layout() {
        let kernel = PeerResults {
            up: Some(Ok(13.1e9)),
            down: Some(Ok(10.2e9)),
            frag: Some(Ok(2.0e9)),
            up6: Some(Ok(12.5e9)),
            down6: Some(Ok(10.0e9)),
        };
        let tapgate = PeerResults {
            up: Some(Ok(12.0e9)),
            down: Some(Err("no connection (iperf3 error: x)".to_owned())),
            frag: None,
            up6: Some(Ok(12.5e9)),
            down6: Some(Err("no SLAAC address".to_owned())),
        };
        let shares = Shares {
            v4: Ok(Share {
                fast: 9997,
                slow: 3,
            }),
            v6: Err("no run".to_owned()),
        };
        let t = table("h", Some(&kernel), Some(&tapgate), Some(&shares));
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(
            lines[1..],
            [
                "direction         kernel+nft    tapgate       ratio",
                "guest→world       13.1 Gbit/s   12.0 Gbit/s   0.92",
                "world→guest       10.2 Gbit/s   failed        -",
                "udp 8K frag ↑     2.0 Gbit/s    skipped       -",
                "IPv6 guest→world  12.5 Gbit/s   12.5 Gbit/s   1.00",
                "IPv6 world→guest  10.0 Gbit/s   failed        -",
                "fast-path share, IPv4 TCP: 99.97% of 10000 packets",
                "fast-path share, IPv6 TCP: unavailable (no run)",
                "tapgate world→guest: no connection (iperf3 error: x)",
                "tapgate IPv6 world→guest: no SLAAC address",
            ]
        );
    }

    #[test]
    fn failed_fills_every_direction() {
        let r = PeerResults::failed("boom");
        for d in Direction::ALL {
            assert_eq!(r.get(d), Some(&Err("boom".to_owned())), "{d:?}");
        }
    }
}
