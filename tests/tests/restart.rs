//! Restart without loss: the daemon is replaced (SIGTERM, then SIGKILL)
//! while a 200 MiB transfer runs through its datapath.
//!
//! For the node agent (an attachment made by `tapgate-cni` in a pod
//! namespace, the VM a relay on the pod's tap) and for `tapgate run
//! --keep-datapath` alike:
//!
//! * the transfer completes, every byte checked against its position
//!   (nothing lost, duplicated or corrupted);
//! * bytes arrived while no daemon ran: the fast path never stopped;
//! * the new daemon adopted the datapath and its flows;
//! * an idle connection opened before the restarts gets keepalives from
//!   the new daemon and still carries data;
//! * a new connection after the restarts works;
//! * removing the attachment (CNI DEL), or a `tapgate run` without the
//!   flag, leaves nothing pinned.
#![allow(clippy::unwrap_used)]

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use nix::sys::signal::Signal;
use serde_json::Value;
use tapgate_tests::{
    Netns,
    bpffs::Bpffs,
    child::Child,
    cni::{Agent, CniCall, NODE_ADDR, PodNet, http, tapgate_cni_bin},
    dhcp::DhcpClient,
    nsthread::{NsThread, spawn_in},
    paced::{self, PacedSender},
    relay::TapRelay,
    require_root,
    servers::TcpEchoServer,
    topology::{DEFAULT_GUEST_ADDR, GUEST_IFACE, GuestKind, Topology, WORLD_ADDR},
};

/// The transfer: 200 MiB in 256 KiB chunks with 6 ms pauses (about 5 s
/// of pauses), so both restarts happen in the middle of it.
const TOTAL: u64 = 200 << 20;
const CHUNK: usize = 256 << 10;
const PAUSE: Duration = Duration::from_millis(6);
/// The keepalive interval the daemons run with.
const KEEPALIVE_SECS: u64 = 1;

/// A guest connection opened to an echo server and left idle until told
/// to talk again: `Ok(())` once both exchanges echoed.
fn idle_connection(guest: &Netns, to: SocketAddr) -> Result<(mpsc::Sender<()>, NsThread<()>)> {
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let (ready_tx, ready_rx) = mpsc::channel::<()>();
    let thread = spawn_in(guest, "idle-conn", move || {
        let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(10))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut echo = |msg: &[u8]| -> Result<()> {
            s.write_all(msg)?;
            let mut back = vec![0u8; msg.len()];
            s.read_exact(&mut back).context("reading the echo")?;
            if back != msg {
                bail!("echoed {back:?} for {msg:?}");
            }
            Ok(())
        };
        echo(b"before")?;
        let _ = ready_tx.send(());
        go_rx
            .recv_timeout(Duration::from_secs(120))
            .context("never told to talk again")?;
        echo(b"after the restarts")
    })?;
    ready_rx
        .recv_timeout(Duration::from_secs(15))
        .context("the idle connection did not open")?;
    Ok((go_tx, thread))
}

/// Checks the transfer and returns a report line.
fn check_transfer(
    received: &paced::Received,
    gaps: &[(&str, Instant, Instant)],
    log: impl Fn() -> String,
) {
    assert_eq!(received.bytes, TOTAL, "bytes received\n{}", log());
    assert_eq!(received.first_bad, None, "first wrong byte\n{}", log());
    for (what, from, to) in gaps {
        let during = received.bytes_between(*from, *to);
        assert!(
            during > 0,
            "no byte arrived during the {what} gap ({:?} without a daemon)\n{}",
            to.duration_since(*from),
            log()
        );
        eprintln!(
            "{what}: {during} bytes arrived in the {:?} without a serving daemon",
            to.duration_since(*from)
        );
    }
}

/// Polls `f` every 200 ms until it is true (bounded).
fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> Result<bool>) -> Result<()> {
    let deadline = Instant::now() + limit;
    let mut last = None;
    while Instant::now() < deadline {
        match f() {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) => last = Some(e),
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    match last {
        Some(e) => Err(e.context(format!("{what}: not within {limit:?}"))),
        None => bail!("{what}: not within {limit:?}"),
    }
}

fn conf(socket: &std::path::Path) -> String {
    serde_json::json!({
        "cniVersion": "1.0.0",
        "name": "tapgate",
        "type": "tapgate-cni",
        "agentSocket": socket,
        "keepaliveInterval": KEEPALIVE_SECS,
        "tcpPorts": ["none"],
        "udpPorts": ["none"],
    })
    .to_string()
}

fn attachment(agent: &Agent, cid: &str) -> Result<Value> {
    let (status, body) = http(
        agent.socket(),
        "GET",
        &format!("/v1/attachments/{cid}/tap0"),
        None,
    )?;
    if status != 200 {
        bail!("GET attachment: {status} {body}");
    }
    Ok(serde_json::from_str(&body)?)
}

#[test]
fn agent_restarts_without_losing_a_byte() {
    require_root().unwrap();
    let cni = tapgate_cni_bin().unwrap();
    let net = PodNet::new().unwrap();
    let guest = Netns::new("guest").unwrap();
    let mut agent = Agent::start().unwrap();
    let cid = "restart0123456789";
    let netns = net.netns_path();
    let log = || agent.stderr();

    CniCall::new("ADD", &conf(agent.socket()))
        .container(cid, &netns, "eth0")
        .run(&cni)
        .unwrap()
        .json()
        .unwrap_or_else(|e| panic!("ADD: {e:#}\n{}", log()));
    let relay = TapRelay::attach(&netns, "tap0", &guest, GUEST_IFACE).unwrap();
    guest.ip(&["link", "set", GUEST_IFACE, "up"]).unwrap();
    let lease = DhcpClient::new(&guest, GUEST_IFACE)
        .unwrap()
        .run_once()
        .unwrap_or_else(|e| panic!("DHCP: {e:#}\n{}\n{}", relay.stats().summary(), log()));
    assert_eq!(lease.ip, DEFAULT_GUEST_ADDR);

    let echo_addr: SocketAddr = format!("{NODE_ADDR}:9001").parse().unwrap();
    let _echo = TcpEchoServer::start(&net.node, echo_addr).unwrap();
    let (talk, idle) = idle_connection(&guest, echo_addr).unwrap();
    let bulk_addr: SocketAddr = format!("{NODE_ADDR}:9000").parse().unwrap();
    let sender = PacedSender::start(&net.node, bulk_addr, TOTAL, CHUNK, PAUSE).unwrap();
    let receiver = paced::receive(&guest, bulk_addr).unwrap();

    std::thread::sleep(Duration::from_millis(1500));
    let (term_exit, term_ready) = agent.restart(Signal::SIGTERM).unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let (kill_exit, kill_ready) = agent.restart(Signal::SIGKILL).unwrap();

    let received = receiver.join(Duration::from_secs(120)).unwrap();
    sender.join(Duration::from_secs(10)).unwrap();
    let log = || agent.stderr();
    check_transfer(
        &received,
        &[
            ("SIGTERM", term_exit, term_ready),
            ("SIGKILL", kill_exit, kill_ready),
        ],
        log,
    );

    // The guest's MAC (and lease) came back from the state file.
    assert!(log().contains("(restored)"), "{}", log());
    // Adopted, with both connections' flows.
    let a = attachment(&agent, cid).unwrap();
    assert_eq!(a["phase"], "running", "{a}");
    assert_eq!(a["adopted"], true, "{a}");
    let adopted = a["stats"]["flows"]["adopted"].as_u64().unwrap_or(0);
    assert!(adopted >= 2, "flows adopted: {adopted}\n{a}");

    // The idle connection gets keepalives from the new agent, and talks.
    wait_for(
        "a keepalive from the restarted agent",
        Duration::from_secs(10),
        || {
            let a = attachment(&agent, cid)?;
            Ok(a["stats"]["keepalives_sent"].as_u64().unwrap_or(0) > 0)
        },
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{}", log()));
    talk.send(()).unwrap();
    idle.join(Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("idle connection: {e:#}\n{}", log()));

    // A new connection.
    let (talk2, fresh) = idle_connection(&guest, echo_addr).unwrap();
    talk2.send(()).unwrap();
    fresh.join(Duration::from_secs(20)).unwrap();

    // DEL removes everything the attachment pinned.
    CniCall::new("DEL", &conf(agent.socket()))
        .container(cid, &netns, "eth0")
        .run(&cni)
        .unwrap()
        .expect_silent_success()
        .unwrap();
    assert!(
        agent.bpffs().pins().is_empty(),
        "{:?}",
        agent.bpffs().pins()
    );
}

/// Starts `tapgate run` with `args` on `topo` (waits for readiness).
fn start_run(topo: &Topology, args: &[&str]) -> Child {
    topo.start_tapgate(args)
        .unwrap_or_else(|e| panic!("starting tapgate run: {e:#}"))
}

#[test]
fn run_keep_datapath_restarts_without_losing_a_byte() {
    require_root().unwrap();
    let topo = Topology::new(GuestKind::RealTap).unwrap();
    let bpffs = Bpffs::new().unwrap();
    let pin_dir = bpffs.path().join("run");
    let pin = pin_dir.to_str().unwrap();
    let ka = KEEPALIVE_SECS.to_string();
    let args = [
        "--keep-datapath",
        "--pin-dir",
        pin,
        "--keepalive-interval",
        &ka,
    ];
    let mut tapgate = start_run(&topo, &args);
    let mut logs = String::new();
    let lease = DhcpClient::new(topo.guest(), GUEST_IFACE)
        .unwrap()
        .run_once()
        .unwrap_or_else(|e| panic!("DHCP: {e:#}\n{}", tapgate.stderr()));
    assert_eq!(lease.ip, DEFAULT_GUEST_ADDR);

    let echo_addr: SocketAddr = format!("{WORLD_ADDR}:9001").parse().unwrap();
    let _echo = TcpEchoServer::start(topo.world(), echo_addr).unwrap();
    let (talk, idle) = idle_connection(topo.guest(), echo_addr).unwrap();
    let bulk_addr: SocketAddr = format!("{WORLD_ADDR}:9000").parse().unwrap();
    let sender = PacedSender::start(topo.world(), bulk_addr, TOTAL, CHUNK, PAUSE).unwrap();
    let receiver = paced::receive(topo.guest(), bulk_addr).unwrap();

    let mut gaps = Vec::new();
    for (what, signal) in [("SIGTERM", Signal::SIGTERM), ("SIGKILL", Signal::SIGKILL)] {
        std::thread::sleep(Duration::from_millis(1500));
        tapgate.signal(signal).unwrap();
        tapgate.wait_exit(Duration::from_secs(30)).unwrap();
        let exited = Instant::now();
        logs.push_str(&tapgate.stderr());
        tapgate = start_run(&topo, &args);
        gaps.push((what, exited, Instant::now()));
    }
    let received = receiver.join(Duration::from_secs(120)).unwrap();
    sender.join(Duration::from_secs(10)).unwrap();
    let all_logs = || format!("{logs}{}", tapgate.stderr());
    check_transfer(&received, &gaps, all_logs);
    let now = tapgate.stderr();
    assert!(now.contains("adopted the datapath"), "{now}");
    assert!(
        now.contains("(restored)"),
        "guest state not restored:\n{now}"
    );

    // Keepalives from the new daemon to the idle guest connection.
    let stats = || -> Result<Value> {
        let out = topo.host().output_timeout(
            &[
                tapgate_tests::topology::tapgate_bin_str()?.as_str(),
                "stats",
                "--json",
                "--control-socket",
                topo.control_socket().to_str().unwrap_or_default(),
            ],
            Duration::from_secs(10),
        )?;
        Ok(serde_json::from_slice(&out.stdout)?)
    };
    wait_for(
        "a keepalive from the restarted daemon",
        Duration::from_secs(10),
        || Ok(stats()?["keepalives_sent"].as_u64().unwrap_or(0) > 0),
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{}", all_logs()));
    let adopted = stats().unwrap()["flows"]["adopted"].as_u64().unwrap_or(0);
    assert!(adopted >= 2, "flows adopted: {adopted}");
    talk.send(()).unwrap();
    idle.join(Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("idle connection: {e:#}\n{}", all_logs()));
    let (talk2, fresh) = idle_connection(topo.guest(), echo_addr).unwrap();
    talk2.send(()).unwrap();
    fresh.join(Duration::from_secs(20)).unwrap();

    // Without the flag, a run adopts what is pinned and removes it at exit.
    tapgate.stop().unwrap();
    let mut plain = start_run(&topo, &["--pin-dir", pin]);
    assert!(plain.stderr().contains("adopted the datapath"));
    plain.stop().unwrap();
    assert!(bpffs.pins().is_empty(), "{:?}", bpffs.pins());
}
