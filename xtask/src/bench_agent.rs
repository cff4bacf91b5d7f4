//! `cargo xtask bench --agent`: many attachments in one node agent.
//!
//! # Theory of operation
//!
//! The bench builds a node with N VM pods (all in namespaces of its own,
//! never the machine's interfaces) and one `tapgate agent` (the release
//! binary, a private bpffs and state directory: [`Agent`]) serving all of
//! them:
//!
//! ```text
//!  guest ns             pod #0 ns                     node ns
//!  eth0 ══veth══ tap0  [attachment]  eth0 ══veth══ pod0  10.200.0.1/30  iperf3 -s, TCP echo
//!                                    10.200.0.2/30
//!                     pod #i ns (i ≥ 1)
//!                      tap0 (a real tap, no VM)  eth0 ══veth══ podI  10.200.0.(4i+1)/30
//! ```
//!
//! Pod #i's `eth0` is `10.200.0.0 + 4i + 2/30` with a default route via the
//! node's end (`+1`), as a primary CNI leaves it; its `tap0` is a real tap
//! (`ip tuntap add`, nobody holds it), except pod #0's, which is a veth
//! whose other end is the guest's `eth0` (the fast guest the other
//! benchmarks use). Every attachment is a `POST /v1/attachments` with
//! default settings (forward every port, the agent's real default).
//!
//! Steps, each announced on stderr:
//!
//! 1. The agent starts; its RSS (`VmRSS` of `/proc/PID/status`) is read
//!    idle.
//! 2. Attachment #0 is made (timed); the kernel memory it holds is listed
//!    per object. The guest gets 10.0.2.15 by DHCP and is measured
//!    **alone**: iperf3 single-stream guest → node server (`--seconds`),
//!    then [`CONNECTS`] sequential TCP connects to the node's echo server
//!    (a connect is the handshake's round trip through the slow path: the
//!    SYN is punted and the agent connects on the guest's behalf).
//! 3. Attachments #1..N-1 are made, each `POST` timed from request to 201;
//!    the agent's RSS and kernel memory are read again, and the guest is
//!    measured again **with all N** present.
//! 4. Every attachment is deleted (timed); the agent must list none, its
//!    bpffs must hold no pin and it must hold no eBPF object any more.
//!
//! Kernel memory is what the agent holds: the maps, programs and links
//! behind its file descriptors (`/proc/PID/fdinfo`: `map_id`, `prog_id`),
//! plus every map those programs use (`bpftool -j prog show`'s `map_ids`),
//! each counted once with the kernel's `bytes_memlock` (`bpftool -j map
//! show` / `prog show`; for maps the kernel reports its actual usage, so a
//! hash map without preallocation counts what it holds). bpftool's own
//! `pids` column stays empty on this machine, hence the fd walk. With only
//! attachment #0 present everything the agent holds is #0's, which gives
//! the per-object breakdown of one attachment.
//!
//! The table goes to stdout; the same data goes under the key `agent` of
//! `target/bench/latest.json` (other keys kept). Every namespace, process
//! and mount is owned by a guard, so an error or Ctrl-C (checked between
//! steps) leaves nothing behind; every wait is bounded.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    path::Path,
    process::Command,
    sync::atomic::AtomicBool,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use tapgate_tests::{
    Child, Netns,
    child::{check_output, run_with_timeout},
    cni::{Agent, http},
    dhcp::DhcpClient,
    nsthread,
    servers::TcpEchoServer,
};

use crate::bench::{
    CONNECT_TIMEOUT_MS, IPERF_PORT, Measurement, RUN_SLACK, check_stop, command_line, gbits, pad,
    parse_iperf, wait_listening,
};

/// Sequential TCP connects per latency measurement.
pub const CONNECTS: usize = 200;
/// Connects made first and not counted (ARP, first flows).
const WARMUP: usize = 5;
/// Bound on one connect.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// The echo server's port in the node namespace.
const ECHO_PORT: u16 = 5202;
/// Pods get /30s out of 10.200.0.0/16.
const MAX_ATTACHMENTS: usize = 16_384;
/// Bound on one bpftool listing.
const BPFTOOL_TIMEOUT: Duration = Duration::from_secs(30);
/// The goal for one idle attachment's kernel memory.
const KERNEL_GOAL_BYTES: u64 = 4 << 20;

/// Options of the agent benchmark.
#[derive(Clone, Debug)]
pub struct Options {
    /// Attachments in the agent.
    pub attachments: usize,
    /// Seconds of the iperf3 runs.
    pub seconds: u32,
}

/// The node's address on pod `i`'s link (the pod's gateway).
fn node_addr(i: usize) -> Ipv4Addr {
    let i = u32::try_from(i).unwrap_or(u32::MAX);
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 200, 0, 0)) + 4 * i + 1)
}

/// Pod `i`'s `eth0` address.
fn pod_addr(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(node_addr(i)) + 1)
}

/// The namespaces: dropped guest, pods, node (killing what runs there).
struct Bed {
    guest: Netns,
    pods: Vec<Netns>,
    node: Netns,
}

impl Bed {
    fn new(n: usize, stop: &AtomicBool) -> Result<Bed> {
        let node = Netns::new("node")?;
        let guest = Netns::new("guest")?;
        let mut pods = Vec::with_capacity(n);
        let started = Instant::now();
        for i in 0..n {
            check_stop(stop)?;
            let pod = Netns::new("pod")?;
            let veth = format!("pod{i}");
            let gw = node_addr(i).to_string();
            node.ip(&[
                "link",
                "add",
                &veth,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                pod.name(),
            ])?;
            node.ip(&["addr", "add", &format!("{gw}/30"), "dev", &veth])?;
            node.ip(&["link", "set", &veth, "up"])?;
            pod.ip(&["addr", "add", &format!("{}/30", pod_addr(i)), "dev", "eth0"])?;
            pod.ip(&["link", "set", "eth0", "up"])?;
            pod.ip(&["route", "add", "default", "via", &gw])?;
            if i == 0 {
                pod.ip(&[
                    "link",
                    "add",
                    "tap0",
                    "type",
                    "veth",
                    "peer",
                    "name",
                    "eth0",
                    "netns",
                    guest.name(),
                ])?;
                guest.ip(&["link", "set", "eth0", "up"])?;
            } else {
                pod.ip(&["tuntap", "add", "tap0", "mode", "tap"])?;
            }
            pod.ip(&["link", "set", "tap0", "up"])?;
            pods.push(pod);
            if (i + 1) % 10 == 0 || i + 1 == n {
                eprintln!(
                    "xtask: agent: {}/{n} pod namespaces ({:.1} s)",
                    i + 1,
                    started.elapsed().as_secs_f64()
                );
            }
        }
        Ok(Bed { guest, pods, node })
    }
}

/// p50, p99 and max of a set of durations (seconds).
#[derive(Clone, Copy, Debug, PartialEq)]
struct Stats {
    n: usize,
    p50: f64,
    p99: f64,
    max: f64,
    mean: f64,
}

impl Stats {
    /// Nearest-rank percentiles; `None` for no samples.
    fn of(samples: &[f64]) -> Option<Stats> {
        let mut v = samples.to_vec();
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let rank = |q: f64| {
            let r = (q * n as f64).ceil() as usize;
            v[r.clamp(1, n) - 1]
        };
        (n > 0).then(|| Stats {
            n,
            p50: rank(0.50),
            p99: rank(0.99),
            max: v[n - 1],
            mean: v.iter().sum::<f64>() / n as f64,
        })
    }

    fn json(&self) -> Value {
        json!({ "n": self.n, "p50": self.p50, "p99": self.p99, "max": self.max, "mean": self.mean })
    }
}

fn stats_json(s: Option<&Stats>) -> Value {
    s.map_or(Value::Null, Stats::json)
}

/// Memory figures of `/proc/PID/status`, KiB.
#[derive(Clone, Copy, Debug, Default)]
struct Rss {
    total: u64,
    anon: u64,
    file: u64,
}

impl Rss {
    fn read(pid: u32) -> Result<Rss> {
        let path = format!("/proc/{pid}/status");
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        let field = |k: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(k))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse::<u64>().ok())
                .with_context(|| format!("no {k} in {path}"))
        };
        Ok(Rss {
            total: field("VmRSS:")?,
            anon: field("RssAnon:")?,
            file: field("RssFile:")?,
        })
    }

    fn json(&self) -> Value {
        json!({ "vm_rss_kib": self.total, "rss_anon_kib": self.anon, "rss_file_kib": self.file })
    }
}

/// One eBPF object the agent holds.
#[derive(Clone, Debug)]
struct BpfObject {
    kind: &'static str,
    name: String,
    bytes: u64,
}

/// The kernel memory the agent holds.
#[derive(Clone, Debug, Default)]
struct Kernel {
    objects: Vec<BpfObject>,
}

impl Kernel {
    fn total(&self) -> u64 {
        self.objects.iter().map(|o| o.bytes).sum()
    }

    /// `(kind, name) → (count, bytes)`.
    fn by_name(&self) -> BTreeMap<(&'static str, String), (usize, u64)> {
        let mut out = BTreeMap::new();
        for o in &self.objects {
            let e = out.entry((o.kind, o.name.clone())).or_insert((0, 0));
            e.0 += 1;
            e.1 += o.bytes;
        }
        out
    }

    /// Lists what process `pid` holds (see the module documentation).
    fn of(pid: u32) -> Result<Kernel> {
        let (maps_held, progs_held) = held_ids(pid)?;
        let progs = bpftool(&["prog", "show"])?;
        let mut maps_wanted = maps_held;
        let mut objects = Vec::new();
        for p in progs.as_array().into_iter().flatten() {
            let Some(id) = p["id"].as_u64() else { continue };
            if !progs_held.contains(&id) {
                continue;
            }
            objects.push(BpfObject {
                kind: "prog",
                name: p["name"].as_str().unwrap_or("?").to_owned(),
                bytes: p["bytes_memlock"].as_u64().unwrap_or(0),
            });
            maps_wanted.extend(
                p["map_ids"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_u64),
            );
        }
        let maps = bpftool(&["map", "show"])?;
        for m in maps.as_array().into_iter().flatten() {
            if m["id"].as_u64().is_some_and(|id| maps_wanted.contains(&id)) {
                objects.push(BpfObject {
                    kind: "map",
                    name: m["name"].as_str().unwrap_or("?").to_owned(),
                    bytes: m["bytes_memlock"].as_u64().unwrap_or(0),
                });
            }
        }
        Ok(Kernel { objects })
    }
}

/// The map and program ids behind `pid`'s file descriptors (a link counts
/// for its program).
fn held_ids(pid: u32) -> Result<(BTreeSet<u64>, BTreeSet<u64>)> {
    let dir = format!("/proc/{pid}/fd");
    let mut maps = BTreeSet::new();
    let mut progs = BTreeSet::new();
    for entry in std::fs::read_dir(&dir).with_context(|| format!("listing {dir}"))? {
        let Ok(entry) = entry else { continue };
        let Ok(target) = std::fs::read_link(entry.path()) else {
            continue;
        };
        let (set, key) = match target.to_str() {
            Some("anon_inode:bpf-map") => (&mut maps, "map_id:"),
            Some("anon_inode:bpf-prog" | "anon_inode:bpf_link") => (&mut progs, "prog_id:"),
            _ => continue,
        };
        let info = format!("/proc/{pid}/fdinfo/{}", entry.file_name().to_string_lossy());
        // The descriptor may be closed meanwhile: skip it.
        let Ok(text) = std::fs::read_to_string(&info) else {
            continue;
        };
        if let Some(id) = text
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().parse().ok())
        {
            set.insert(id);
        }
    }
    Ok((maps, progs))
}

/// `bpftool -j ARGS`, parsed.
fn bpftool(args: &[&str]) -> Result<Value> {
    let what = format!("bpftool -j {}", args.join(" "));
    let out = run_with_timeout(
        Command::new("bpftool").arg("-j").args(args),
        BPFTOOL_TIMEOUT,
    )?;
    let out = check_output(&what, out)?;
    serde_json::from_slice(&out.stdout).with_context(|| format!("{what} printed no JSON"))
}

/// What the guest of pod #0 measured.
#[derive(Debug)]
struct Probe {
    iperf: Measurement,
    connect: std::result::Result<Stats, String>,
}

impl Probe {
    fn json(&self) -> Value {
        json!({
            "iperf_guest_to_node": match &self.iperf {
                Ok(bps) => json!({ "bits_per_second": bps }),
                Err(e) => json!({ "error": e }),
            },
            "connect_seconds": match &self.connect {
                Ok(s) => s.json(),
                Err(e) => json!({ "error": e }),
            },
        })
    }
}

/// Measures pod #0's guest: iperf3 to the node, then connect latency.
fn probe(bed: &Bed, echo: SocketAddr, seconds: u32, label: &str) -> Probe {
    eprintln!("xtask: agent: {label}: iperf3 guest→node for {seconds} s");
    let iperf = iperf(bed, seconds).unwrap_or_else(|e| Err(format!("{e:#}")));
    match &iperf {
        Ok(bps) => eprintln!("xtask: agent: {label}: iperf3 {}", gbits(*bps)),
        Err(e) => eprintln!("xtask: agent: {label}: iperf3 failed: {e}"),
    }
    eprintln!("xtask: agent: {label}: {CONNECTS} sequential connects to {echo}");
    let connect = connect_latency(&bed.guest, echo).map_err(|e| format!("{e:#}"));
    match &connect {
        Ok(s) => eprintln!(
            "xtask: agent: {label}: connect p50 {} p99 {}",
            micros(s.p50),
            micros(s.p99)
        ),
        Err(e) => eprintln!("xtask: agent: {label}: connects failed: {e}"),
    }
    Probe { iperf, connect }
}

/// One bounded iperf3 run, guest → the node's server.
fn iperf(bed: &Bed, seconds: u32) -> Result<Measurement> {
    let addr = node_addr(0).to_string();
    let port = IPERF_PORT.to_string();
    let mut server_cmd = bed.node.cmd("iperf3");
    server_cmd.args(["-s", "-1", "-B", &addr, "-p", &port]);
    let mut server = Child::spawn(server_cmd, "iperf3 server")?;
    wait_listening(&bed.node, &mut server, IPERF_PORT)?;
    let secs = seconds.to_string();
    let argv = [
        "iperf3",
        "-c",
        &addr,
        "-p",
        &port,
        "-t",
        &secs,
        "-J",
        "--connect-timeout",
        CONNECT_TIMEOUT_MS,
    ];
    let limit = Duration::from_secs(u64::from(seconds)) + RUN_SLACK;
    let out = match bed.guest.output_timeout(&argv, limit) {
        Ok(out) => out,
        Err(e) => return Ok(Err(format!("iperf3 did not finish: {e:#}"))),
    };
    drop(server);
    Ok(parse_iperf(&out.stdout, &out.stderr))
}

/// [`CONNECTS`] sequential connects (after [`WARMUP`] uncounted ones) from
/// the guest to `addr`, each closed at once; the time `connect()` took.
fn connect_latency(guest: &Netns, addr: SocketAddr) -> Result<Stats> {
    let total = WARMUP + CONNECTS;
    let limit = CONNECT_TIMEOUT * u32::try_from(total).unwrap_or(u32::MAX) + Duration::from_secs(5);
    let samples = nsthread::run_in(guest, "connects", limit, move || {
        let mut samples = Vec::with_capacity(CONNECTS);
        let mut failures = Vec::new();
        for k in 0..total {
            let t = Instant::now();
            match TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) {
                Ok(s) => {
                    let took = t.elapsed().as_secs_f64();
                    drop(s);
                    if k >= WARMUP {
                        samples.push(took);
                    }
                }
                Err(e) => failures.push(e.to_string()),
            }
        }
        if failures.len() > CONNECTS / 100 {
            bail!(
                "{} of {total} connects failed (first: {})",
                failures.len(),
                failures[0]
            );
        }
        Ok(samples)
    })?;
    Stats::of(&samples).context("no connect succeeded")
}

/// The agent's own set-up histogram: `(count, sum)`.
fn agent_histogram(agent: &Agent) -> Option<(f64, f64)> {
    let (code, text) = http(agent.socket(), "GET", "/metrics", None).ok()?;
    if code != 200 {
        return None;
    }
    let value = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse::<f64>().ok())
    };
    Some((
        value("tapgate_agent_attachment_setup_seconds_count ")?,
        value("tapgate_agent_attachment_setup_seconds_sum ")?,
    ))
}

fn container_id(i: usize) -> String {
    format!("bench{i}")
}

/// `POST /v1/attachments` for pod `i`; the time to the 201.
fn attach(agent: &Agent, bed: &Bed, i: usize) -> Result<f64> {
    let body = json!({
        "containerId": container_id(i),
        "ifname": "tap0",
        "netns": bed.pods[i].path(),
        "podNamespace": "bench",
        "podName": format!("vm{i}"),
        "network": "tapgate-bench",
    })
    .to_string();
    let t = Instant::now();
    let (code, answer) = http(agent.socket(), "POST", "/v1/attachments", Some(&body))?;
    let took = t.elapsed().as_secs_f64();
    if code != 201 {
        bail!("POST attachment #{i}: {code} {answer}");
    }
    Ok(took)
}

/// `DELETE` of attachment `i`; the time to the 200.
fn detach(agent: &Agent, i: usize) -> Result<f64> {
    let path = format!("/v1/attachments/{}/tap0", container_id(i));
    let t = Instant::now();
    let (code, answer) = http(agent.socket(), "DELETE", &path, None)?;
    let took = t.elapsed().as_secs_f64();
    if code != 200 {
        bail!("DELETE attachment #{i}: {code} {answer}");
    }
    Ok(took)
}

/// The agent's attachments by phase.
fn phases(agent: &Agent) -> Result<BTreeMap<String, usize>> {
    let (code, body) = http(agent.socket(), "GET", "/v1/attachments", None)?;
    if code != 200 {
        bail!("GET /v1/attachments: {code} {body}");
    }
    let v: Value = serde_json::from_str(&body).context("GET /v1/attachments")?;
    let mut out = BTreeMap::new();
    for a in v["attachments"].as_array().into_iter().flatten() {
        *out.entry(a["phase"].as_str().unwrap_or("?").to_owned())
            .or_default() += 1;
    }
    Ok(out)
}

fn progress_every(n: usize) -> usize {
    (n / 10).max(1)
}

/// Everything measured.
struct Results {
    n: usize,
    setup: Option<Stats>,
    delete: Option<Stats>,
    histogram: Option<(f64, f64)>,
    rss_idle: Rss,
    rss_one: Rss,
    rss_all: Rss,
    rss_after: Rss,
    kernel_one: Kernel,
    kernel_all: Kernel,
    kernel_after: Kernel,
    alone: Probe,
    crowded: Probe,
    left: usize,
    pins_left: usize,
}

/// Runs the agent benchmark with the tapgate binary `bin` (a release
/// build); merges the results into the JSON report `report`.
pub fn run(bin: &Path, opts: &Options, report: &Path) -> Result<()> {
    tapgate_tests::require_root()?;
    let n = opts.attachments;
    if !(1..=MAX_ATTACHMENTS).contains(&n) {
        bail!("--attachments must be 1 to {MAX_ATTACHMENTS}");
    }
    if opts.seconds == 0 {
        bail!("--seconds must be at least 1");
    }
    let stop = crate::bench::interrupt_flag()?;
    let date = command_line("date", &["-u", "+%Y-%m-%d %H:%M UTC"]);
    let kernel_release = command_line("uname", &["-r"]);
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    let header = format!("node agent, {n} attachments, {date}, {cores} cores");
    eprintln!("xtask: agent: {header}");

    eprintln!("xtask: agent: building the node, the guest and {n} pod namespaces");
    let bed = Bed::new(n, &stop)?;
    let echo = TcpEchoServer::start(&bed.node, SocketAddr::new(node_addr(0).into(), ECHO_PORT))
        .context("starting the echo server in the node namespace")?;
    check_stop(&stop)?;

    eprintln!("xtask: agent: starting {}", bin.display());
    let agent = Agent::start_bin(bin, &["--log-level", "info"])?;
    let pid = agent.pid();
    let with_log = |e: anyhow::Error| {
        let log = agent.stderr();
        let tail: Vec<&str> = log.lines().rev().take(20).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        e.context(format!("agent log (last lines):\n{}", tail.join("\n")))
    };
    std::thread::sleep(Duration::from_millis(500));
    let rss_idle = Rss::read(pid)?;
    eprintln!("xtask: agent: idle RSS {} KiB", rss_idle.total);

    let mut setup = Vec::with_capacity(n);
    setup.push(attach(&agent, &bed, 0).map_err(with_log)?);
    eprintln!("xtask: agent: attachment #0 in {}", millis(setup[0]));
    let rss_one = Rss::read(pid)?;
    let kernel_one = Kernel::of(pid)?;
    eprintln!(
        "xtask: agent: one attachment: RSS {} KiB, kernel {} in {} objects",
        rss_one.total,
        mib(kernel_one.total()),
        kernel_one.objects.len()
    );
    check_stop(&stop)?;

    eprintln!("xtask: agent: DHCP in the guest");
    DhcpClient::new(&bed.guest, "eth0")?
        .run_once()
        .context("DHCP in pod #0's guest")?;
    let alone = probe(&bed, echo.addr(), opts.seconds, "alone");
    check_stop(&stop)?;

    let started = Instant::now();
    for i in 1..n {
        check_stop(&stop)?;
        setup.push(attach(&agent, &bed, i).map_err(with_log)?);
        if (i + 1) % progress_every(n) == 0 || i + 1 == n {
            eprintln!(
                "xtask: agent: {}/{n} attachments ({:.1} s, last {})",
                i + 1,
                started.elapsed().as_secs_f64(),
                millis(setup[i])
            );
        }
    }
    let running = phases(&agent)?;
    if running.get("running") != Some(&n) {
        bail!("expected {n} running attachments, the agent lists {running:?}");
    }
    std::thread::sleep(Duration::from_secs(1));
    let rss_all = Rss::read(pid)?;
    let kernel_all = Kernel::of(pid)?;
    eprintln!(
        "xtask: agent: {n} attachments: RSS {} KiB, kernel {} in {} objects",
        rss_all.total,
        mib(kernel_all.total()),
        kernel_all.objects.len()
    );
    let histogram = agent_histogram(&agent);
    check_stop(&stop)?;
    let crowded = probe(&bed, echo.addr(), opts.seconds, &format!("with {n}"));
    check_stop(&stop)?;

    eprintln!("xtask: agent: deleting {n} attachments");
    let mut delete = Vec::with_capacity(n);
    let started = Instant::now();
    for i in 0..n {
        delete.push(detach(&agent, i).map_err(with_log)?);
        if (i + 1) % progress_every(n) == 0 || i + 1 == n {
            eprintln!(
                "xtask: agent: {}/{n} deleted ({:.1} s)",
                i + 1,
                started.elapsed().as_secs_f64()
            );
        }
    }
    let left: usize = phases(&agent)?.values().sum();
    let pins_left = agent.bpffs().pins().len();
    std::thread::sleep(Duration::from_secs(1));
    let rss_after = Rss::read(pid)?;
    let kernel_after = Kernel::of(pid)?;
    eprintln!(
        "xtask: agent: after teardown: {left} attachments, {pins_left} pins, {} eBPF objects held, RSS {} KiB",
        kernel_after.objects.len(),
        rss_after.total
    );
    drop(agent);
    drop(echo);
    drop(bed);

    let results = Results {
        n,
        setup: Stats::of(&setup),
        delete: Stats::of(&delete),
        histogram,
        rss_idle,
        rss_one,
        rss_all,
        rss_after,
        kernel_one,
        kernel_all,
        kernel_after,
        alone,
        crowded,
        left,
        pins_left,
    };
    println!("{}", table(&header, &results));
    let mut doc = results.json();
    doc["date"] = json!(date);
    doc["cores"] = json!(cores);
    doc["kernel_release"] = json!(kernel_release);
    doc["seconds"] = json!(opts.seconds);
    merge_report(report, "agent", doc)?;
    if left != 0 || pins_left != 0 || !results.kernel_after.objects.is_empty() {
        bail!(
            "teardown incomplete: {left} attachments, {pins_left} pins, {} eBPF objects left",
            results.kernel_after.objects.len()
        );
    }
    Ok(())
}

impl Results {
    fn per_attachment_rss(&self) -> f64 {
        self.rss_all.total.saturating_sub(self.rss_idle.total) as f64 / self.n as f64
    }

    fn per_attachment_kernel(&self) -> f64 {
        self.kernel_all.total() as f64 / self.n as f64
    }

    fn ratio_json(&self) -> Value {
        let tput = match (&self.alone.iperf, &self.crowded.iperf) {
            (Ok(a), Ok(c)) if *a > 0.0 => Some(c / a),
            _ => None,
        };
        let (p50, p99) = match (&self.alone.connect, &self.crowded.connect) {
            (Ok(a), Ok(c)) if a.p50 > 0.0 && a.p99 > 0.0 => {
                (Some(c.p50 / a.p50), Some(c.p99 / a.p99))
            }
            _ => (None, None),
        };
        json!({ "throughput": tput, "connect_p50": p50, "connect_p99": p99 })
    }

    fn json(&self) -> Value {
        let one_by_name: BTreeMap<String, Value> = self
            .kernel_one
            .by_name()
            .into_iter()
            .map(|((kind, name), (count, bytes))| {
                (
                    format!("{kind} {name}"),
                    json!({ "count": count, "bytes": bytes }),
                )
            })
            .collect();
        json!({
            "benchmark": "node agent: N attachments in one agent",
            "attachments": self.n,
            "settings": "defaults (tcpPorts/udpPorts absent = forward all)",
            "setup_seconds": stats_json(self.setup.as_ref()),
            "setup_agent_histogram": self.histogram.map(|(count, sum)| json!({
                "count": count, "sum": sum, "mean": if count > 0.0 { sum / count } else { 0.0 },
            })),
            "delete_seconds": stats_json(self.delete.as_ref()),
            "rss": {
                "idle": self.rss_idle.json(),
                "one": self.rss_one.json(),
                "all": self.rss_all.json(),
                "after_teardown": self.rss_after.json(),
                "per_attachment_kib": self.per_attachment_rss(),
            },
            "kernel": {
                "one_bytes": self.kernel_one.total(),
                "one_objects": self.kernel_one.objects.len(),
                "one_by_object": one_by_name,
                "all_bytes": self.kernel_all.total(),
                "all_objects": self.kernel_all.objects.len(),
                "per_attachment_bytes": self.per_attachment_kernel(),
                "goal_bytes": KERNEL_GOAL_BYTES,
            },
            "pod0_alone": self.alone.json(),
            "pod0_with_all": self.crowded.json(),
            "ratio_with_all_to_alone": self.ratio_json(),
            "teardown": {
                "attachments_left": self.left,
                "pins_left": self.pins_left,
                "kernel_objects_left": self.kernel_after.objects.len(),
            },
        })
    }
}

/// Sets `key` of the JSON object in `report` to `value`, keeping the
/// other keys (a missing or unreadable report starts empty).
fn merge_report(report: &Path, key: &str, value: Value) -> Result<()> {
    let mut doc = match std::fs::read(report) {
        Ok(bytes) => match serde_json::from_slice::<Value>(&bytes) {
            Ok(v) if v.is_object() => v,
            _ => {
                eprintln!(
                    "xtask: agent: {} is not a JSON object; starting it afresh",
                    report.display()
                );
                json!({})
            }
        },
        Err(_) => json!({}),
    };
    doc[key] = value;
    if let Some(dir) = report.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let text = serde_json::to_string_pretty(&doc).context("encoding the report")?;
    std::fs::write(report, text + "\n").with_context(|| format!("writing {}", report.display()))?;
    eprintln!(
        "xtask: agent: results added to {} (key {key:?})",
        report.display()
    );
    Ok(())
}

fn millis(s: f64) -> String {
    format!("{:.1} ms", s * 1e3)
}

fn micros(s: f64) -> String {
    format!("{:.0} µs", s * 1e6)
}

fn mib(bytes: u64) -> String {
    format!("{:.2} MiB", bytes as f64 / f64::from(1 << 20))
}

fn kib(bytes: u64) -> String {
    format!("{:.0} KiB", bytes as f64 / 1024.0)
}

/// The human-readable report.
fn table(header: &str, r: &Results) -> String {
    let n = r.n;
    let stats = |s: Option<&Stats>| match s {
        Some(s) => format!(
            "p50 {}  p99 {}  max {}",
            millis(s.p50),
            millis(s.p99),
            millis(s.max)
        ),
        None => "none".to_owned(),
    };
    let mut lines = vec![header.to_owned()];
    let mut setup = stats(r.setup.as_ref());
    if let Some((count, sum)) = r.histogram
        && count > 0.0
    {
        setup.push_str(&format!(
            "  (agent's histogram: mean {})",
            millis(sum / count)
        ));
    }
    lines.push(format!("{}{setup}", pad("set-up (POST → 201)", 26)));
    lines.push(format!(
        "{}{}",
        pad("delete (DELETE → 200)", 26),
        stats(r.delete.as_ref())
    ));
    lines.push(format!(
        "{}idle {} MiB, 1: {} MiB, {n}: {} MiB → {:.2} MiB per attachment (anon {} MiB at {n}); after teardown {} MiB",
        pad("agent RSS", 26),
        r.rss_idle.total / 1024,
        r.rss_one.total / 1024,
        r.rss_all.total / 1024,
        r.per_attachment_rss() / 1024.0,
        r.rss_all.anon / 1024,
        r.rss_after.total / 1024,
    ));
    let per = r.per_attachment_kernel();
    lines.push(format!(
        "{}1: {}, {n}: {} in {} objects → {} per attachment ({} the 4 MiB goal)",
        pad("kernel (maps + progs)", 26),
        mib(r.kernel_one.total()),
        mib(r.kernel_all.total()),
        r.kernel_all.objects.len(),
        mib(per.round() as u64),
        if per <= KERNEL_GOAL_BYTES as f64 {
            "within"
        } else {
            "OVER"
        }
    ));
    let mut objects: Vec<_> = r.kernel_one.by_name().into_iter().collect();
    objects.sort_by_key(|o| std::cmp::Reverse(o.1.1));
    let parts: Vec<String> = objects
        .iter()
        .map(|((kind, name), (count, bytes))| {
            let times = if *count > 1 {
                format!(" ×{count}")
            } else {
                String::new()
            };
            let kind = if *kind == "prog" { "prog " } else { "" };
            format!("{kind}{name}{times} {}", kib(*bytes))
        })
        .collect();
    lines.push(format!(
        "{}{}",
        pad("  one attachment", 26),
        parts.join(", ")
    ));
    lines.push(format!(
        "{}{}{}ratio",
        pad("pod #0's guest", 26),
        pad("alone", 14),
        pad(&format!("with {n}"), 14)
    ));
    let ratio = r.ratio_json();
    let ratio_cell = |k: &str| {
        ratio[k]
            .as_f64()
            .map_or_else(|| "-".to_owned(), |x| format!("{x:.2}"))
    };
    let tput = |m: &Measurement| {
        m.as_ref()
            .map_or_else(|_| "failed".to_owned(), |b| gbits(*b))
    };
    lines.push(format!(
        "{}{}{}{}",
        pad("iperf3 guest→node", 26),
        pad(&tput(&r.alone.iperf), 14),
        pad(&tput(&r.crowded.iperf), 14),
        ratio_cell("throughput")
    ));
    for (label, key, pick) in [
        (
            "connect p50",
            "connect_p50",
            (|s: &Stats| s.p50) as fn(&Stats) -> f64,
        ),
        ("connect p99", "connect_p99", |s: &Stats| s.p99),
    ] {
        let cell = |p: &std::result::Result<Stats, String>| {
            p.as_ref()
                .map_or_else(|_| "failed".to_owned(), |s| micros(pick(s)))
        };
        lines.push(format!(
            "{}{}{}{}",
            pad(label, 26),
            pad(&cell(&r.alone.connect), 14),
            pad(&cell(&r.crowded.connect), 14),
            ratio_cell(key)
        ));
    }
    lines.push(format!(
        "teardown: {} attachments, {} pins, {} eBPF objects left",
        r.left,
        r.pins_left,
        r.kernel_after.objects.len()
    ));
    for (label, p) in [("alone", &r.alone), ("with all", &r.crowded)] {
        if let Err(e) = &p.iperf {
            lines.push(format!("iperf3 {label}: {e}"));
        }
        if let Err(e) = &p.connect {
            lines.push(format!("connects {label}: {e}"));
        }
    }
    lines.join("\n")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_disjoint_slash_30s() {
        assert_eq!(node_addr(0), Ipv4Addr::new(10, 200, 0, 1));
        assert_eq!(pod_addr(0), Ipv4Addr::new(10, 200, 0, 2));
        assert_eq!(node_addr(1), Ipv4Addr::new(10, 200, 0, 5));
        assert_eq!(pod_addr(99), Ipv4Addr::new(10, 200, 1, 142));
        assert_eq!(
            pod_addr(MAX_ATTACHMENTS - 1),
            Ipv4Addr::new(10, 200, 255, 254)
        );
    }

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        let s = Stats::of(&v).unwrap();
        assert_eq!((s.p50, s.p99, s.max, s.n), (50.0, 99.0, 100.0, 100));
        let s = Stats::of(&[3.0]).unwrap();
        assert_eq!((s.p50, s.p99, s.max), (3.0, 3.0, 3.0));
        assert!(Stats::of(&[]).is_none());
    }

    #[test]
    fn merge_keeps_other_keys() {
        let dir = std::env::temp_dir().join(format!("tg-bench-merge-{}", std::process::id()));
        let report = dir.join("latest.json");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(&report, r#"{"results":[1],"agent":{"old":true}}"#).unwrap();
        merge_report(&report, "agent", json!({"new": 1})).unwrap();
        let v: Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
        assert_eq!(v["results"], json!([1]));
        assert_eq!(v["agent"], json!({"new": 1}));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
