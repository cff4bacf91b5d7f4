//! Clock benchmark: how long the keepalive scan takes for 10k, 100k and 1M
//! flows, and how long it can hold up the punt path.
//!
//! # Theory of operation
//!
//! The daemon's own pieces, on the real kernel maps: the embedded eBPF
//! object is loaded (not attached) in a private network namespace with room
//! for N flows, and a real [`FlowManager`] is fed N guest SYNs and the
//! world's SYN-ACKs, which installs N established flows (two map entries
//! each) exactly as in production. Only the NAT ports are synthetic (N
//! sockets would exceed the open-file limit long before a million).
//!
//! Two scans are timed per size, each driven tick by tick as the daemon
//! does (the scan is chunked, [`tapgate::flow::clock::SCAN_CHUNK`] flows a
//! tick):
//! * **active** — every guest sent something since the last scan (the bits
//!   are set as the kernel would): the scan only reads and clears bits in
//!   the mmapped array, no syscall;
//! * **idle** — no guest sent anything: every flow gets a keepalive, which
//!   costs two map lookups (last ACK and window) and a frame.
//!
//! The longest single tick is the longest the event loop — and with it
//! every punted packet — can be kept waiting by a scan. Output: one line
//! per size, and `target/bench/clock.json`.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use datapath_common::{PuntReason, TAP_ACTIVE};
use smoltcp::{
    phy::ChecksumCapabilities,
    wire::{
        EthernetAddress, EthernetFrame, EthernetProtocol, EthernetRepr, IpProtocol, Ipv4Packet,
        Ipv4Repr, TcpControl, TcpPacket, TcpRepr, TcpSeqNumber,
    },
};
use tapgate::{
    config::GuestNetConfig,
    flow::{FlowConfig, FlowManager, HostAddrs, NatError, NatLease, NatPorts, Output},
    kernel::loader::{Datapath, EMBEDDED_OBJECT, LoadOptions},
    kernel::maps::KernelFlowMaps,
};

const GUEST_MAC: EthernetAddress = EthernetAddress([0x02, 0, 0, 0, 0, 0x15]);
/// Guest source ports used per remote address.
const PORTS_PER_REMOTE: u32 = 60_000;

/// NAT ports without sockets: one synthetic source address per remote,
/// ports counted up per address.
#[derive(Default)]
struct SyntheticPorts {
    next: HashMap<IpAddr, u16>,
}

impl NatPorts for SyntheticPorts {
    fn reserve(&mut self, _proto: u8, local: IpAddr) -> Result<NatLease, NatError> {
        let port = self.next.entry(local).or_insert(1024);
        let p = *port;
        *port = port.checked_add(1).ok_or(NatError::Exhausted(local))?;
        Ok(NatLease::new(p, ()))
    }

    fn hold(&mut self, _proto: u8, _local: IpAddr, port: u16) -> Result<NatLease, NatError> {
        Ok(NatLease::new(port, ()))
    }

    fn source_for(&mut self, remote: IpAddr) -> Result<IpAddr, NatError> {
        let IpAddr::V4(remote) = remote else {
            return Err(NatError::Protocol(0));
        };
        let [_, _, c, d] = remote.octets();
        Ok(IpAddr::V4(Ipv4Addr::new(198, 19, c, d)))
    }
}

fn remote_of(i: u32) -> (Ipv4Addr, u16) {
    let block = i / PORTS_PER_REMOTE;
    let [_, _, c, d] = block.to_be_bytes();
    (
        Ipv4Addr::new(198, 18, c, d),
        1024 + (i % PORTS_PER_REMOTE) as u16,
    )
}

/// An Ethernet frame carrying a TCP segment.
fn frame(
    src: (Ipv4Addr, u16),
    dst: (Ipv4Addr, u16),
    control: TcpControl,
    seq: u32,
    ack: Option<u32>,
) -> Vec<u8> {
    let tcp = TcpRepr {
        src_port: src.1,
        dst_port: dst.1,
        control,
        seq_number: TcpSeqNumber(seq as i32),
        ack_number: ack.map(|a| TcpSeqNumber(a as i32)),
        window_len: 64240,
        window_scale: None,
        max_seg_size: None,
        sack_permitted: false,
        sack_ranges: [None, None, None],
        timestamp: None,
        payload: &[],
    };
    let ip = Ipv4Repr {
        src_addr: src.0,
        dst_addr: dst.0,
        next_header: IpProtocol::Tcp,
        payload_len: tcp.header_len(),
        hop_limit: 64,
    };
    let eth = EthernetRepr {
        src_addr: GUEST_MAC,
        dst_addr: EthernetAddress([0x52, 0x55, 10, 0, 2, 2]),
        ethertype: EthernetProtocol::Ipv4,
    };
    let caps = ChecksumCapabilities::default();
    let mut buf = vec![0u8; eth.buffer_len() + ip.buffer_len() + tcp.header_len()];
    let mut e = EthernetFrame::new_unchecked(&mut buf);
    eth.emit(&mut e);
    let mut p = Ipv4Packet::new_unchecked(e.payload_mut());
    ip.emit(&mut p, &caps);
    tcp.emit(
        &mut TcpPacket::new_unchecked(p.payload_mut()),
        &src.0.into(),
        &dst.0.into(),
        &caps,
    );
    buf
}

/// The NAT source of a translated SYN.
fn nat_of(out: &[Output]) -> Result<(Ipv4Addr, u16)> {
    let Some(Output::ToWorld(pkt)) = out.last() else {
        bail!("no translated SYN: {out:?}");
    };
    let ip = Ipv4Packet::new_checked(pkt.as_slice())?;
    let tcp = TcpPacket::new_checked(ip.payload())?;
    Ok((ip.src_addr(), tcp.src_port()))
}

/// Result of one timed scan.
struct Scan {
    total: Duration,
    longest_tick: Duration,
    ticks: u32,
}

type Manager = FlowManager<KernelFlowMaps, SyntheticPorts>;

/// Ticks at `now` until the scan that is due has finished (it sends
/// `expect_keepalives` keepalives). The daemon pauses
/// [`SCAN_PAUSE`](tapgate::flow::clock::SCAN_PAUSE) between the ticks of a
/// scan; the total here is the work alone.
fn timed_scan(m: &mut Manager, now: Instant, n: u32, expect_keepalives: u64) -> Result<Scan> {
    let before = m.stats().keepalives_sent;
    let most = n.div_ceil(tapgate::flow::clock::SCAN_CHUNK as u32) + 1;
    let mut out = Vec::new();
    let mut scan = Scan {
        total: Duration::ZERO,
        longest_tick: Duration::ZERO,
        ticks: 0,
    };
    // As the daemon does: one tick starts the scan, more follow while it is
    // in progress.
    while scan.ticks == 0 || m.clock_busy() {
        ensure!(
            scan.ticks <= most,
            "the scan did not finish in {most} ticks"
        );
        let t = Instant::now();
        m.tick(now, &mut out);
        let took = t.elapsed();
        scan.total += took;
        scan.longest_tick = scan.longest_tick.max(took);
        scan.ticks += 1;
        out.clear();
    }
    let sent = m.stats().keepalives_sent - before;
    ensure!(
        sent == expect_keepalives,
        "the scan sent {sent} keepalives, expected {expect_keepalives}"
    );
    Ok(scan)
}

fn bench(n: u32) -> Result<String> {
    let mut datapath = Datapath::load(EMBEDDED_OBJECT, &LoadOptions::new(0, n))
        .context("loading the eBPF object")?;
    let maps = datapath.take_flow_maps()?;
    let mut cfg = FlowConfig::new(GuestNetConfig::default(), 2, 3);
    cfg.max_flows = n;
    cfg.host_addrs = HostAddrs::fixed(Vec::<IpAddr>::new());
    cfg.keepalive_interval = Duration::from_secs(10);
    cfg.inactivity_interval = Duration::ZERO;
    let guest_ip = cfg.guest.guest_addr;
    let mut m = FlowManager::new(cfg, maps, SyntheticPorts::default());

    let t = Instant::now();
    let start = Instant::now();
    let mut out = Vec::new();
    for i in 0..n {
        let (remote, gport) = remote_of(i);
        let guest = (guest_ip, gport);
        let syn = frame(guest, (remote, 80), TcpControl::Syn, 1000, None);
        out.clear();
        m.from_guest(&syn, GUEST_MAC, PuntReason::Ipv4NoFlow, start, &mut out);
        let nat = nat_of(&out)?;
        let syn_ack = frame((remote, 80), nat, TcpControl::Syn, 5000, Some(1001));
        out.clear();
        m.from_world(&syn_ack, PuntReason::Handshake, start, &mut out);
    }
    let install = t.elapsed();
    let active = m.stats().flows_active;
    ensure!(
        active == u64::from(n),
        "{active} flows installed, wanted {n}"
    );

    // The first tick starts the clock; the scan is due one interval later.
    m.tick(start, &mut out);
    // Active: every guest sent something since the last scan.
    for slot in 0..n {
        m.maps().activity().set(slot, TAP_ACTIVE);
    }
    let active_scan = timed_scan(&mut m, start + Duration::from_secs(10), n, 0)?;
    // Idle: nothing since (the scan cleared the bits): a keepalive each.
    let idle_scan = timed_scan(&mut m, start + Duration::from_secs(20), n, u64::from(n))?;

    let per = |d: Duration| d.as_nanos() as f64 / f64::from(n);
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let longest = ms(active_scan.longest_tick.max(idle_scan.longest_tick));
    let (install, active, idle) = (ms(install), ms(active_scan.total), ms(idle_scan.total));
    let (active_per, idle_per) = (per(active_scan.total), per(idle_scan.total));
    println!(
        "clock: {n:>8} flows: install {install:>7.0} ms | active scan {active:>7.1} ms \
         ({active_per:>5.0} ns/flow) | idle scan {idle:>7.1} ms ({idle_per:>6.0} ns/flow, a \
         keepalive each) | longest tick {longest:>6.1} ms"
    );
    Ok(format!(
        "{{\"flows\":{n},\"install_ms\":{install:.1},\"active_scan_ms\":{active:.3},\
         \"active_ns_per_flow\":{active_per:.1},\"idle_scan_ms\":{idle:.3},\
         \"idle_ns_per_flow\":{idle_per:.1},\"longest_tick_ms\":{longest:.3},\"ticks\":{}}}",
        active_scan.ticks + idle_scan.ticks,
    ))
}

fn main() -> Result<()> {
    // cargo bench passes `--bench`; sizes may follow as plain numbers.
    let sizes: Vec<u32> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let sizes = if sizes.is_empty() {
        vec![10_000, 100_000, 1_000_000]
    } else {
        sizes
    };
    if !nix::unistd::geteuid().is_root() {
        bail!("the clock benchmark loads BPF maps: run it as root (`cargo xtask bench`)");
    }
    let rows = std::thread::spawn(move || -> Result<Vec<String>> {
        // A private namespace: nothing is attached anywhere, and nothing of
        // the host is touched.
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
            .context("unsharing the network namespace")?;
        sizes.into_iter().map(bench).collect()
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the benchmark thread panicked"))??;
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&dir).context("creating target/bench")?;
    std::fs::write(dir.join("clock.json"), format!("[{}]\n", rows.join(",")))
        .context("writing target/bench/clock.json")?;
    Ok(())
}
