//! End-to-end tests of forwarded ports reached from the host itself: a
//! process in the host namespace connecting to `127.0.0.1:PORT`,
//! `[::1]:PORT` or one of the host's own addresses (`198.51.100.1`,
//! `2001:db8:1::1`) on a forwarded port reaches the guest — QEMU's
//! `hostfwd`, passt and slirp4netns users' `curl localhost:8080` — and
//! the guest sees such clients coming from the gateway (`10.0.2.2`,
//! `fd00::2`). Loopback traffic that is not a forward stays the host's:
//! an unforwarded local port is refused by the host as before, unrelated
//! local connections and datagrams pass untouched, and after tapgate
//! exits nothing is attached to `lo`; with no rules, nothing ever is, and
//! runtime rules attach and detach the loopback program.
//!
//! Every test builds its own [`Topology`] and runs the real `tapgate`
//! binary in the host namespace; the guest takes its IPv4 address by DHCP
//! and its IPv6 address by SLAAC first. They need root (without it they
//! say so and pass); run them with `cargo xtask test`.
//!
//! tapgate flags these tests rely on: `-t/--tcp-ports`, `-u/--udp-ports`,
//! `--control-socket`; `tapgate stats --json`, `tapgate rules add|del`.
#![allow(clippy::unwrap_used)]

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use tapgate_tests::control;
use tapgate_tests::ipv6::Ipv6Guest;
use tapgate_tests::nsthread;
use tapgate_tests::running::Running;
use tapgate_tests::scenarios::{THREAD_TIMEOUT, connect, udp_echo, udp_socket};
use tapgate_tests::servers::{HttpServer, TcpEchoServer, UdpEchoServer, serve_once};
use tapgate_tests::tcx::{self, TcxDirection};
use tapgate_tests::topology::{
    DEFAULT_GATEWAY, HOST_UPLINK_ADDR, HOST_UPLINK_ADDR6, KERNEL_GATEWAY6,
};
use tapgate_tests::{GuestKind, require_root};

/// Bound on a curl run.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(60);
/// Bound on the guest's autoconfiguration and on tapgate's reactions.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(20);
/// The rules of most tests: TCP 8080 → guest 80, TCP 7007 (a server that
/// tells who called), UDP 5353 → guest 53.
const RULES: [&str; 6] = ["-t", "8080:80", "-t", "7007", "-u", "5353:53"];

/// This file's helpers on the shared fixture.
trait LocalRun {
    /// `curl ARGS` from the host namespace: (exit ok, stdout, stderr).
    fn host_curl(&self, args: &[&str]) -> (bool, String, String);
    /// Waits until `cond` holds, failing with `what` after
    /// [`SETTLE_TIMEOUT`].
    fn wait_for(&self, what: &str, cond: impl Fn() -> bool);
    /// The programs attached to `lo`'s tcx ingress in the host namespace.
    fn lo_programs(&self) -> Vec<String>;
    /// A kernel counter of `tapgate stats --json`.
    fn kernel_counter(&self, name: &str) -> u64;
    /// A `flows` counter of `tapgate stats --json`.
    fn flow_counter(&self, name: &str) -> u64;
}

impl LocalRun for Running {
    fn host_curl(&self, args: &[&str]) -> (bool, String, String) {
        let mut argv = vec!["curl", "-sS", "--max-time", "50"];
        argv.extend_from_slice(args);
        let out = self.ok(self.topo.host().output_timeout(&argv, CLIENT_TIMEOUT));
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    fn wait_for(&self, what: &str, cond: impl Fn() -> bool) {
        let deadline = Instant::now() + SETTLE_TIMEOUT;
        while !cond() {
            if Instant::now() > deadline {
                self.fail(format!("{what} within {SETTLE_TIMEOUT:?}"));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn lo_programs(&self) -> Vec<String> {
        self.ok(tcx::attached_names(
            self.topo.host(),
            "lo",
            TcxDirection::Ingress,
        ))
    }

    fn kernel_counter(&self, name: &str) -> u64 {
        let stats = self.ok(control::stats(&self.topo));
        stats["kernel"][name]
            .as_u64()
            .unwrap_or_else(|| self.fail(format!("no kernel.{name} in {stats}")))
    }

    fn flow_counter(&self, name: &str) -> u64 {
        let stats = self.ok(control::stats(&self.topo));
        stats["flows"][name]
            .as_u64()
            .unwrap_or_else(|| self.fail(format!("no flows.{name} in {stats}")))
    }
}

/// A dual-stack guest behind tapgate started with `args`, or `None`
/// (skipped) without root.
fn start(args: &[&str]) -> Option<Running> {
    if let Err(e) = require_root() {
        eprintln!("skipping: {e}");
        return None;
    }
    let run = Running::with_lease(GuestKind::RealTap, args);
    run.wait_slaac();
    Some(run)
}

/// `[::]:port`, a dual-stack guest-side listening address.
fn any6(port: u16) -> SocketAddr {
    SocketAddr::from(([0u16; 8], port))
}

/// `addr:port` of a literal address.
fn at(addr: &str, port: u16) -> SocketAddr {
    SocketAddr::new(addr.parse().unwrap(), port)
}

/// The address a dual-stack guest socket saw, IPv4-mapped ones as IPv4.
fn canonical(a: SocketAddr) -> IpAddr {
    a.ip().to_canonical()
}

/// The URL of `name` on `addr:port` (IPv6 in brackets).
fn url(addr: &str, port: u16, name: &str) -> String {
    format!("http://{}/{name}", at(addr, port))
}

#[test]
fn host_clients_reach_the_guest_on_every_local_address() {
    let Some(run) = start(&RULES) else {
        return;
    };
    run.check(
        tcx::contains_program(&run.lo_programs(), "tg_lo_ingress"),
        format!("tg_lo_ingress not on lo: {:?}", run.lo_programs()),
    );
    let page: &[u8] = b"hello to the host from the guest\n";
    let size = 16usize << 20;
    let big: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
    let _httpd = run.ok(HttpServer::start(
        run.topo.guest(),
        any6(80),
        &[("file", page), ("big", &big)],
    ));

    // curl in the host namespace, to each of the host's local addresses.
    for addr in ["127.0.0.1", "::1", HOST_UPLINK_ADDR, HOST_UPLINK_ADDR6] {
        let u = url(addr, 8080, "file");
        let (ok, body, err) = run.host_curl(&["-g", &u]);
        run.check(ok, format!("curl {u} failed: {err}"));
        run.check(
            body.as_bytes() == page,
            format!("curl {u} returned {body:?}"),
        );
    }
    run.check(
        run.flow_counter("forwards_from_host") == 4,
        format!(
            "four host clients expected: {}",
            run.ok(control::stats(&run.topo))
        ),
    );

    // A bulk download over loopback runs on the fast path (both
    // directions: the guest's data through `bpf_redirect_neigh` to
    // loopback, the client's ACKs through the loopback program).
    for addr in ["127.0.0.1", "::1"] {
        let before = run.ok(control::stats(&run.topo));
        let (f0, s0) = run.ok(control::fast_slow(&before));
        let u = url(addr, 8080, "big");
        let (ok, got, err) =
            run.host_curl(&["-g", "-o", "/dev/null", "-w", "%{size_download}", &u]);
        run.check(ok, format!("curl {u} failed: {err}"));
        run.check(
            got.trim() == size.to_string(),
            format!("{u}: downloaded {got} bytes of {size}"),
        );
        let after = run.ok(control::stats(&run.topo));
        let (f1, s1) = run.ok(control::fast_slow(&after));
        let (fast, slow) = (f1.saturating_sub(f0), s1.saturating_sub(s0));
        let total = fast + slow;
        run.check(
            total >= 500,
            format!("{u}: only {total} packets counted for 16 MiB"),
        );
        run.check(
            fast as f64 >= 0.99 * total as f64,
            format!("{u}: fast path {fast} of {total} packets, want >= 99%"),
        );
    }

    // The guest sees the gateway's address of each family.
    for (client_to, want) in [("127.0.0.1", DEFAULT_GATEWAY), ("::1", KERNEL_GATEWAY6)] {
        let server = run.ok(serve_once(
            run.topo.guest(),
            any6(7007),
            THREAD_TIMEOUT,
            |mut s, peer| {
                s.write_all(peer.ip().to_canonical().to_string().as_bytes())?;
                Ok(())
            },
        ));
        let to = at(client_to, 7007);
        let seen = run.ok(nsthread::run_in(
            run.topo.host(),
            "host tcp client",
            THREAD_TIMEOUT,
            move || {
                let mut s = connect(to)?;
                let mut answer = String::new();
                s.read_to_string(&mut answer)?;
                Ok(answer)
            },
        ));
        run.ok(server.join(THREAD_TIMEOUT));
        run.check(
            seen == want,
            format!("a host client via {to}: the guest saw {seen:?}, want {want}"),
        );
    }
}

#[test]
fn host_udp_round_trips_on_loopback() {
    let Some(run) = start(&RULES) else {
        return;
    };
    let echo = run.ok(UdpEchoServer::start(run.topo.guest(), any6(53)));
    for addr in ["127.0.0.1", "::1"] {
        let to = at(addr, 5353);
        run.ok(nsthread::run_in(
            run.topo.host(),
            "host udp client",
            THREAD_TIMEOUT,
            move || {
                let s = udp_socket(to)?;
                udp_echo(&s, b"ping over loopback")?;
                udp_echo(&s, &[7u8; 1200])?;
                // Larger than the tap's MTU: tapgate cuts it for the guest
                // (a local client is not told to send smaller datagrams),
                // and the guest's answer comes back whole.
                udp_echo(&s, &[9u8; 4000])?;
                Ok(())
            },
        ));
    }
    let peers: Vec<IpAddr> = echo.peers().into_iter().map(canonical).collect();
    let want: Vec<IpAddr> = vec![
        DEFAULT_GATEWAY.parse().unwrap(),
        KERNEL_GATEWAY6.parse().unwrap(),
    ];
    run.check(
        want.iter().all(|w| peers.contains(w)) && peers.iter().all(|p| want.contains(p)),
        format!("the guest's UDP server saw {peers:?}, want {want:?}"),
    );
    run.check(
        run.flow_counter("forwards_from_host") == 2,
        format!("two host UDP flows: {}", run.ok(control::stats(&run.topo))),
    );
}

#[test]
fn other_loopback_traffic_stays_the_hosts() {
    let Some(run) = start(&RULES) else {
        return;
    };
    let lo_before = run.kernel_counter("lo_not_ours");

    // A port that is not forwarded on 127.0.0.1 / ::1: the host refuses,
    // as without tapgate.
    for addr in ["127.0.0.1", "::1"] {
        let to = at(addr, 8081);
        let refused = run.ok(nsthread::run_in(
            run.topo.host(),
            "unforwarded",
            THREAD_TIMEOUT,
            move || {
                Ok(TcpStream::connect_timeout(&to, Duration::from_secs(5))
                    .map(|_| ())
                    .map_err(|e| e.kind()))
            },
        ));
        run.check(
            refused == Err(ErrorKind::ConnectionRefused),
            format!("{to}: {refused:?}, want refused"),
        );
    }

    // Unrelated local services and their clients: a socat TCP listener,
    // a TCP echo server with a few MiB, a UDP echo server.
    let socat = run.ok(run
        .topo
        .host()
        .cmd("socat")
        .args([
            "-T",
            "10",
            "TCP-LISTEN:9999,bind=127.0.0.1,reuseaddr",
            "EXEC:cat",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(anyhow::Error::from));
    let mut socat = scopeguard(socat);
    run.ok(tapgate_tests::servers::wait_tcp_listening(
        run.topo.host(),
        9999,
        Duration::from_secs(10),
    ));
    let out = run.ok(run.topo.host().output_timeout(
        &[
            "bash",
            "-c",
            "echo through-loopback | socat -t 2 - TCP:127.0.0.1:9999",
        ],
        CLIENT_TIMEOUT,
    ));
    run.check(
        String::from_utf8_lossy(&out.stdout).contains("through-loopback"),
        format!(
            "socat over loopback: {} {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    );
    let _ = socat.0.kill();
    let _ = socat.0.wait();

    let tcp_echo = run.ok(TcpEchoServer::start(run.topo.host(), at("::1", 9998)));
    let udp_echo_srv = run.ok(UdpEchoServer::start(run.topo.host(), at("127.0.0.1", 9997)));
    let (tcp_to, udp_to) = (tcp_echo.addr(), udp_echo_srv.addr());
    run.ok(nsthread::run_in(
        run.topo.host(),
        "local clients",
        THREAD_TIMEOUT,
        move || {
            let mut s = connect(tcp_to)?;
            let chunk: Vec<u8> = (0..1 << 20).map(|i| (i % 253) as u8).collect();
            let mut back = vec![0u8; chunk.len()];
            for _ in 0..4 {
                s.write_all(&chunk)?;
                s.read_exact(&mut back)?;
                anyhow::ensure!(back == chunk, "the local echo came back different");
            }
            let u = udp_socket(udp_to)?;
            udp_echo(&u, b"local datagram")?;
            Ok(())
        },
    ));
    run.check(
        tcp_echo.accepted() == 1,
        "the local TCP echo server saw one client",
    );
    run.check(
        udp_echo_srv.datagrams() >= 1,
        "the local UDP echo server saw nothing",
    );

    // None of it was tapgate's: no flow, no forward, and the loopback
    // program let it all pass.
    let stats = run.ok(control::stats(&run.topo));
    run.check(
        stats["flows"]["forwards_from_host"] == 0 && stats["flows_active"] == 0,
        format!("tapgate took loopback traffic that was not a forward: {stats}"),
    );
    let lo_after = run.kernel_counter("lo_not_ours");
    run.check(
        lo_after > lo_before + 100,
        format!(
            "lo_not_ours went {lo_before} -> {lo_after}: did loopback traffic meet the program?"
        ),
    );
}

#[test]
fn nothing_is_left_on_lo_and_rules_attach_and_detach_it() {
    let Some(mut run) = start(&RULES) else {
        return;
    };
    run.check(
        tcx::contains_program(&run.lo_programs(), "tg_lo_ingress"),
        format!("tg_lo_ingress not on lo: {:?}", run.lo_programs()),
    );
    let status = run
        .tapgate
        .stop()
        .unwrap_or_else(|e| run.fail(format!("stopping tapgate: {e:#}")));
    run.check(
        status.code() == Some(0),
        format!("tapgate exited with {status}"),
    );
    run.check(
        run.lo_programs().is_empty(),
        format!("programs left on lo: {:?}", run.lo_programs()),
    );
    let net = run.ok(run
        .topo
        .host()
        .stdout(&["bpftool", "net", "show", "dev", "lo"]));
    run.check(
        !net.contains("tg_"),
        format!("bpftool net show dev lo:\n{net}"),
    );
    drop(run);

    // Without rules nothing is attached to lo; the first rule attaches it,
    // removing the last detaches it.
    let Some(run) = start(&[]) else {
        return;
    };
    run.check(
        run.lo_programs().is_empty(),
        format!("lo has programs without any rule: {:?}", run.lo_programs()),
    );
    let _httpd = run.ok(HttpServer::start(
        run.topo.guest(),
        any6(80),
        &[("file", b"added at runtime\n")],
    ));
    run.ok(control::query(
        &run.topo,
        &["rules", "add", "-t", "8080:80"],
    ));
    run.check(
        tcx::contains_program(&run.lo_programs(), "tg_lo_ingress"),
        format!(
            "`rules add` left lo without the program: {:?}",
            run.lo_programs()
        ),
    );
    let u = url("127.0.0.1", 8080, "file");
    let (ok, body, err) = run.host_curl(&[&u]);
    run.check(
        ok && body == "added at runtime\n",
        format!("curl {u}: {err} {body:?}"),
    );
    run.ok(control::query(
        &run.topo,
        &["rules", "del", "-t", "8080:80"],
    ));
    // Once curl's flow has closed (at once, or by the next tick).
    run.wait_for("lo without programs after the last rule went", || {
        run.lo_programs().is_empty()
    });
    // And 127.0.0.1:8080 is the host's again: nothing listens.
    let to = at("127.0.0.1", 8080);
    let refused = run.ok(nsthread::run_in(
        run.topo.host(),
        "after del",
        THREAD_TIMEOUT,
        move || {
            Ok(TcpStream::connect_timeout(&to, Duration::from_secs(5))
                .map(|_| ())
                .map_err(|e| e.kind()))
        },
    ));
    run.check(
        refused == Err(ErrorKind::ConnectionRefused),
        format!("{to} after `rules del`: {refused:?}, want refused"),
    );
}

/// A child process killed when the guard goes (a failed check included).
struct Guarded(std::process::Child);

impl Drop for Guarded {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn scopeguard(child: std::process::Child) -> Guarded {
    Guarded(child)
}

/// A host client's connection, echoing `msg` each time it is told to
/// (with the message); `Ok(n)` with the number of echoes once the sender
/// goes.
fn host_connection(
    run: &Running,
    to: SocketAddr,
) -> (
    std::sync::mpsc::Sender<Vec<u8>>,
    std::sync::mpsc::Receiver<()>,
    tapgate_tests::nsthread::NsThread<usize>,
) {
    let (go_tx, go_rx) = std::sync::mpsc::channel::<Vec<u8>>();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let thread = run.ok(nsthread::spawn_in(
        run.topo.host(),
        "host-conn",
        move || {
            let mut s = connect(to)?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            let mut n = 0;
            while let Ok(msg) = go_rx.recv_timeout(Duration::from_secs(120)) {
                s.write_all(&msg)?;
                let mut back = vec![0u8; msg.len()];
                s.read_exact(&mut back)?;
                anyhow::ensure!(back == msg, "echoed {back:?} for {msg:?}");
                n += 1;
                let _ = done_tx.send(());
            }
            Ok(n)
        },
    ));
    (go_tx, done_rx, thread)
}

#[test]
fn host_clients_survive_a_restart_with_the_loopback_link_kept() {
    if let Err(e) = require_root() {
        eprintln!("skipping: {e}");
        return;
    }
    let bpffs = tapgate_tests::bpffs::Bpffs::new().unwrap();
    let pin_dir = bpffs.path().join("run");
    let pin = pin_dir.to_str().unwrap().to_owned();
    let keep = ["--keep-datapath", "--pin-dir", &pin, "-t", "7007"];
    let mut run = Running::with_lease(GuestKind::RealTap, &keep);
    let _echo = run.ok(TcpEchoServer::start(run.topo.guest(), any6(7007)));
    let (talk, echoed, conn) = host_connection(&run, at("127.0.0.1", 7007));
    let echo = |run: &Running, msg: &str| {
        talk.send(msg.as_bytes().to_vec()).unwrap();
        if echoed.recv_timeout(Duration::from_secs(15)).is_err() {
            run.fail(format!("no echo of {msg:?} over the host connection"));
        }
    };
    echo(&run, "before");
    let lo_id = run.ok(tcx::attached(run.topo.host(), "lo", TcxDirection::Ingress));

    // Stopped, keeping the datapath: the loopback link stays, pinned, and
    // the host client's flow runs in the kernel without a daemon.
    let status = run
        .tapgate
        .stop()
        .unwrap_or_else(|e| run.fail(format!("stopping tapgate: {e:#}")));
    run.check(
        status.code() == Some(0),
        format!("tapgate exited with {status}"),
    );
    run.check(
        tcx::contains_program(&run.lo_programs(), "tg_lo_ingress"),
        format!("the kept datapath lost lo's link: {:?}", run.lo_programs()),
    );
    run.check(
        bpffs
            .pins()
            .iter()
            .any(|p| p.ends_with("link_tg_lo_ingress")),
        format!("no pinned lo link: {:?}", bpffs.pins()),
    );
    echo(&run, "while no daemon runs");

    // The next daemon adopts it: the same link gets the new program.
    run.tapgate = run
        .topo
        .start_tapgate(&keep)
        .unwrap_or_else(|e| panic!("restarting tapgate: {e:#}"));
    let log = run.tapgate.stderr();
    run.check(
        log.contains("adopted the datapath")
            && log.contains("link_tg_lo_ingress")
            && log.contains("replaced the program of the link pinned"),
        "the lo link was not adopted",
    );
    let now = run.ok(tcx::attached(run.topo.host(), "lo", TcxDirection::Ingress));
    run.check(
        now.len() == 1 && lo_id.len() == 1 && now[0].id != lo_id[0].id,
        format!("lo's programs went {lo_id:?} -> {now:?}: want one, the new daemon's"),
    );
    echo(&run, "after the restart");
    run.check(
        run.flow_counter("adopted") >= 1,
        format!(
            "the host client's flow was not adopted: {}",
            run.ok(control::stats(&run.topo))
        ),
    );
    drop(talk);
    let n = run.ok(conn.join(THREAD_TIMEOUT));
    run.check(n == 3, format!("{n} echoes"));

    // The connection is closed: its flow goes once both FINs are
    // acknowledged. (While a host client's flow is kept, the loopback link
    // rightly stays.)
    let deadline = Instant::now() + Duration::from_secs(20);
    while !run.ok(control::flows(&run.topo)).is_empty() {
        run.check(
            Instant::now() < deadline,
            format!(
                "the closed connection's flow stays: {:?}",
                run.ok(control::flows(&run.topo))
            ),
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // A daemon without rules drops the stale link (lo is empty while it
    // runs); stopped without the flag, it removes every pin.
    let status = run
        .tapgate
        .stop()
        .unwrap_or_else(|e| run.fail(format!("stopping tapgate: {e:#}")));
    run.check(
        status.code() == Some(0),
        format!("tapgate exited with {status}"),
    );
    run.tapgate = run
        .topo
        .start_tapgate(&["--pin-dir", &pin])
        .unwrap_or_else(|e| panic!("restarting tapgate: {e:#}"));
    run.check(
        run.lo_programs().is_empty(),
        format!(
            "a daemon without rules left lo's link: {:?}",
            run.lo_programs()
        ),
    );
    let status = run
        .tapgate
        .stop()
        .unwrap_or_else(|e| run.fail(format!("stopping tapgate: {e:#}")));
    run.check(
        status.code() == Some(0),
        format!("tapgate exited with {status}"),
    );
    run.check(
        bpffs.pins().is_empty() && run.lo_programs().is_empty(),
        format!(
            "left behind: pins {:?}, lo {:?}",
            bpffs.pins(),
            run.lo_programs()
        ),
    );
}

#[test]
fn host_local_flows_pass_the_loopback_program() {
    // `--allow-host` flows enter the host through loopback's ingress too:
    // the loopback program must leave them alone, and the guest reaching
    // its own forwarded port through the host is refused as before.
    let Some(run) = start(&["--allow-host", "-t", "8080:80"]) else {
        return;
    };
    let _guest_httpd = run.ok(HttpServer::start(
        run.topo.guest(),
        any6(80),
        &[("file", b"guest\n")],
    ));
    let host_addr: IpAddr = HOST_UPLINK_ADDR.parse().unwrap();
    let http = run.ok(HttpServer::start(
        run.topo.host(),
        SocketAddr::new(host_addr, 9100),
        &[("secret", b"host-only\n")],
    ));
    let fast_before = run
        .ok(control::fast_slow(&run.ok(control::stats(&run.topo))))
        .0;
    let u = http.url("secret");
    let out = run.ok(run
        .topo
        .guest()
        .output_timeout(&["curl", "-sS", "--max-time", "8", &u], CLIENT_TIMEOUT));
    run.check(
        out.status.success() && out.stdout == b"host-only\n",
        format!(
            "the guest's curl {u}: {} {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    );
    let fast_after = run
        .ok(control::fast_slow(&run.ok(control::stats(&run.topo))))
        .0;
    run.check(
        fast_after >= fast_before + 4,
        format!("only {} packets on the fast path", fast_after - fast_before),
    );
    // The guest to its own forwarded port at the host's address: refused
    // quickly (7: connection refused), not hanging.
    let own = format!("http://{HOST_UPLINK_ADDR}:8080/file");
    let started = Instant::now();
    let out = run.ok(run
        .topo
        .guest()
        .output_timeout(&["curl", "-sS", "--max-time", "8", &own], CLIENT_TIMEOUT));
    let took = started.elapsed();
    run.check(
        out.status.code() == Some(7) && took < Duration::from_secs(4),
        format!(
            "the guest's curl {own}: exit {:?} after {took:?}, want a quick refusal",
            out.status.code()
        ),
    );
    // And the host's own clients still reach the guest.
    let (ok, body, err) = run.host_curl(&[&url("127.0.0.1", 8080, "file")]);
    run.check(
        ok && body == "guest\n",
        format!("host curl: {err} {body:?}"),
    );
}
