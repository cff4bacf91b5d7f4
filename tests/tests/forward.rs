//! End-to-end tests of inbound port forwards (`-t`/`-u`): clients in the
//! world namespace reach servers in the guest namespace through the host's
//! uplink address, the fast path carries the established flows, excluded
//! ports are refused, a port the host already uses is a startup error, and
//! rules added and removed at runtime (`tapgate rules`) take effect for the
//! next connection while existing flows stay (or are reset on request).
//!
//! Every test builds its own [`Topology`] and runs the real `tapgate`
//! binary in the host namespace; the guest takes its address by DHCP
//! first. They need root; run them with `cargo xtask test`.
//!
//! tapgate flags these tests rely on: `-t/--tcp-ports`, `-u/--udp-ports`,
//! `--control-socket`; `tapgate rules list|add|del [--reset-flows] --json`.
#![allow(clippy::unwrap_used)]

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::Result;
use tapgate_tests::control;
use tapgate_tests::nsthread;
use tapgate_tests::running::Running;
use tapgate_tests::scenarios::{THREAD_TIMEOUT, connect, udp_echo, udp_socket};
use tapgate_tests::servers::{HttpServer, TcpEchoServer, UdpEchoServer, serve_once};
use tapgate_tests::topology::HOST_UPLINK_ADDR;
use tapgate_tests::{GuestKind, Topology, require_root};

/// Bound on a curl run.
const CURL_TIMEOUT: Duration = Duration::from_secs(60);

/// This file's helpers on the shared fixture.
trait ForwardRun {
    /// `curl URL` from the world namespace: (exit ok, stdout, stderr).
    fn curl(&self, args: &[&str]) -> (bool, String, String);
}

impl ForwardRun for Running {
    fn curl(&self, args: &[&str]) -> (bool, String, String) {
        let mut argv = vec!["curl", "-sS", "--max-time", "50"];
        argv.extend_from_slice(args);
        let out = self.ok(self.topo.world().output_timeout(&argv, CURL_TIMEOUT));
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

/// `198.51.100.1:port`, the host's uplink address.
fn host(port: u16) -> SocketAddr {
    SocketAddr::new(HOST_UPLINK_ADDR.parse().unwrap(), port)
}

/// A guest-side listening address.
fn any(port: u16) -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], port))
}

#[test]
fn tcp_forward_http_reaches_the_guest() {
    let run = Running::with_lease(GuestKind::RealTap, &["-t", "8080:80"]);
    let page = b"hello from the guest\n";
    let _httpd = run.ok(HttpServer::start(
        run.topo.guest(),
        any(80),
        &[("index.html", page)],
    ));
    let url = format!("http://{}/index.html", host(8080));
    let (ok, body, err) = run.curl(&[&url]);
    run.check(ok, format!("curl {url} failed: {err}"));
    run.check(
        body.as_bytes() == page,
        format!("curl {url} returned {body:?}"),
    );
    let stats = run.ok(control::stats(&run.topo));
    run.check(
        stats["flows"]["forwards_accepted"].as_u64() == Some(1),
        format!("one inbound flow expected: {stats}"),
    );
}

#[test]
fn tcp_forward_bulk_mostly_on_fast_path() {
    let run = Running::with_lease(GuestKind::Veth, &["-t", "8080:80"]);
    let size = 64usize << 20;
    let big: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
    let _httpd = run.ok(HttpServer::start(
        run.topo.guest(),
        any(80),
        &[("big", &big)],
    ));
    let before = run.ok(control::stats(&run.topo));
    let (f0, s0) = run.ok(control::fast_slow(&before));
    let url = format!("http://{}/big", host(8080));
    let (ok, got, err) = run.curl(&["-o", "/dev/null", "-w", "%{size_download}", &url]);
    run.check(ok, format!("curl {url} failed: {err}"));
    run.check(
        got.trim() == size.to_string(),
        format!("downloaded {got} bytes of {size}"),
    );
    let after = run.ok(control::stats(&run.topo));
    let (f1, s1) = run.ok(control::fast_slow(&after));
    let (fast, slow) = (f1.saturating_sub(f0), s1.saturating_sub(s0));
    let total = fast + slow;
    run.check(
        total >= 1000,
        format!("only {total} packets counted for 64 MiB: {before} -> {after}"),
    );
    let share = fast as f64 / total as f64;
    run.check(
        share >= 0.99,
        format!(
            "fast path handled {:.2}% ({fast} of {total}) packets, want >= 99%: {before} -> {after}",
            share * 100.0
        ),
    );
}

#[test]
fn udp_forward_echo() {
    let run = Running::with_lease(GuestKind::RealTap, &["-u", "5353"]);
    let _echo = run.ok(UdpEchoServer::start(run.topo.guest(), any(5353)));
    run.ok(nsthread::run_in(
        run.topo.world(),
        "udp client",
        THREAD_TIMEOUT,
        || {
            let s = udp_socket(host(5353))?;
            udp_echo(&s, b"ping through a forward")?;
            udp_echo(&s, &[7u8; 1200])?;
            Ok(())
        },
    ));
    let flows = run.ok(control::flows(&run.topo));
    run.check(
        flows
            .iter()
            .any(|f| control::field(f, "nat") == host(5353).to_string()),
        format!("no flow via {}: {flows:?}", host(5353)),
    );
}

#[test]
fn tcp_forward_range_and_excluded_port() {
    let run = Running::with_lease(GuestKind::RealTap, &["-t", "9000-9010,~9005"]);
    let _open = run.ok(TcpEchoServer::start(run.topo.guest(), any(9004)));
    let _excluded = run.ok(TcpEchoServer::start(run.topo.guest(), any(9005)));
    let outcome = run.ok(nsthread::run_in(
        run.topo.world(),
        "tcp client",
        THREAD_TIMEOUT,
        || {
            let mut s = connect(host(9004))?;
            s.write_all(b"echo")?;
            let mut buf = [0u8; 4];
            s.read_exact(&mut buf)?;
            anyhow::ensure!(&buf == b"echo", "echo came back as {buf:?}");
            drop(s);
            Ok(TcpStream::connect_timeout(&host(9005), Duration::from_secs(5)).map(|_| ()))
        },
    ));
    match outcome {
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => {}
        other => run.fail(format!("excluded port 9005: {other:?}, want refused")),
    }
}

#[test]
fn port_used_by_a_host_listener_fails_at_startup() {
    require_root().unwrap_or_else(|e| panic!("{e}"));
    let topo = Topology::new(GuestKind::Veth).unwrap_or_else(|e| panic!("{e:#}"));
    let _host_httpd = HttpServer::start(topo.host(), any(8080), &[("x", b"x")])
        .unwrap_or_else(|e| panic!("{e:#}"));
    let control = topo.control_socket();
    let control = control.to_str().unwrap();
    let mut tapgate = topo
        .spawn_tapgate(&[
            "run",
            "--tap",
            topo.tap_name(),
            "--uplink",
            topo.uplink_name(),
            "--control-socket",
            control,
            "-t",
            "8000-8100",
        ])
        .unwrap_or_else(|e| panic!("{e:#}"));
    let status = tapgate
        .wait_exit(Duration::from_secs(15))
        .unwrap_or_else(|e| panic!("{e:#}"));
    let stderr = tapgate.stderr();
    assert!(!status.success(), "tapgate started: {stderr}");
    assert!(
        stderr.contains("tcp port 8080 is already in use on the host"),
        "unclear error: {stderr}"
    );
    // Nothing was attached: the host's server still answers locally.
    let out = topo
        .host()
        .output_timeout(
            &["curl", "-sS", "--max-time", "5", "http://127.0.0.1:8080/x"],
            CURL_TIMEOUT,
        )
        .unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "x");
}

#[test]
fn tcp_forward_half_close_client_first() {
    // The world client sends a request and shuts its side down; the guest
    // reads to EOF, answers on the half-open connection and closes. The
    // flow goes CloseWait -> LastAck and is reaped on the final ACK.
    let run = Running::with_lease(GuestKind::RealTap, &["-t", "8081:81"]);
    let server = run.ok(serve_once(
        run.topo.guest(),
        any(81),
        THREAD_TIMEOUT,
        |mut s, peer| {
            s.set_read_timeout(Some(Duration::from_secs(20)))?;
            let mut request = Vec::new();
            s.read_to_end(&mut request)?;
            s.write_all(format!("{} bytes from {peer}", request.len()).as_bytes())?;
            Ok(request.len())
        },
    ));
    let answer = run.ok(nsthread::run_in(
        run.topo.world(),
        "client",
        THREAD_TIMEOUT,
        || {
            let mut s = connect(host(8081))?;
            s.write_all(&[1u8; 5000])?;
            s.shutdown(std::net::Shutdown::Write)?;
            let mut answer = String::new();
            s.read_to_string(&mut answer)?;
            Ok(answer)
        },
    ));
    run.check(run.ok(server.join(THREAD_TIMEOUT)) == 5000, "server read");
    run.check(
        answer.starts_with("5000 bytes from 198.51.100.2:"),
        format!("answer {answer:?}: the guest must see the real client"),
    );
    // Reaped on the final ACK, well before the LastAck timeout.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let stats = run.ok(control::stats(&run.topo));
        if stats["flows"]["tcp_closed_cleanly"].as_u64() == Some(1)
            && stats["flows"]["tcp_active"].as_u64() == Some(0)
        {
            break;
        }
        if std::time::Instant::now() > deadline {
            run.fail(format!("flow not reaped cleanly: {stats}"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `tapgate rules ARGS --json`, parsed.
fn rules(run: &Running, args: &[&str]) -> serde_json::Value {
    let mut argv = vec!["rules"];
    argv.extend_from_slice(args);
    argv.push("--json");
    let text = run.ok(control::query(&run.topo, &argv));
    run.ok(serde_json::from_str(&text).map_err(anyhow::Error::from))
}

/// Writes `msg` on `s` and reads the echo back.
fn echo(s: &mut TcpStream, msg: &[u8]) -> Result<()> {
    s.write_all(msg)?;
    let mut buf = vec![0u8; msg.len()];
    s.read_exact(&mut buf)?;
    anyhow::ensure!(buf == msg, "echo came back as {buf:?}");
    Ok(())
}

#[test]
fn rules_added_and_removed_at_runtime() {
    let run = Running::with_lease(GuestKind::RealTap, &[]);
    let _server = run.ok(TcpEchoServer::start(run.topo.guest(), any(7000)));
    let list = rules(&run, &["list"]);
    run.check(list["rules"] == serde_json::json!([]), format!("{list}"));

    // Added: the next connection goes through.
    let added = rules(&run, &["add", "-t", "7000"]);
    run.check(added["added"][0]["host"] == "7000", format!("{added}"));
    // A conflicting rule is refused with the offending item named.
    let err = control::query(&run.topo, &["rules", "add", "-t", "6990-7010"]);
    let msg = format!(
        "{:#}",
        err.err().unwrap_or_else(|| run.fail("overlap accepted"))
    );
    run.check(
        msg.contains("\"6990-7010\""),
        format!("unclear error: {msg}"),
    );

    // A connection through the rule; the rule is removed while it is open.
    let (step_tx, step_rx) = mpsc::channel::<()>();
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let client = run.ok(nsthread::spawn_in(run.topo.world(), "client", move || {
        let mut s = connect(host(7000))?;
        echo(&mut s, b"before")?;
        done_tx.send(())?;
        step_rx.recv_timeout(THREAD_TIMEOUT)?;
        // The flow outlives its rule.
        echo(&mut s, b"after")?;
        // A new connection does not.
        let refused = TcpStream::connect_timeout(&host(7000), Duration::from_secs(5));
        anyhow::ensure!(
            matches!(&refused, Err(e) if e.kind() == ErrorKind::ConnectionRefused),
            "new connection after removal: {refused:?}"
        );
        Ok(())
    }));
    run.check(
        done_rx.recv_timeout(THREAD_TIMEOUT).is_ok(),
        "first echo through the added rule",
    );
    let list = rules(&run, &["list"]);
    run.check(list["rules"][0]["hits"] == 1, format!("{list}"));
    let removed = rules(&run, &["del", "-t", "7000"]);
    run.check(removed["flows_reset"] == 0, format!("{removed}"));
    step_tx.send(()).unwrap();
    run.ok(client.join(THREAD_TIMEOUT));

    // Added again and removed with --reset-flows: the open connection is
    // reset.
    rules(&run, &["add", "-t", "7000"]);
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let (step_tx, step_rx) = mpsc::channel::<()>();
    let client = run.ok(nsthread::spawn_in(run.topo.world(), "client", move || {
        let mut s = connect(host(7000))?;
        echo(&mut s, b"before")?;
        done_tx.send(())?;
        step_rx.recv_timeout(THREAD_TIMEOUT)?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut buf = [0u8; 16];
        let got = s.read(&mut buf);
        anyhow::ensure!(
            matches!(&got, Err(e) if e.kind() == ErrorKind::ConnectionReset),
            "read after --reset-flows: {got:?}"
        );
        Ok(())
    }));
    run.check(
        done_rx.recv_timeout(THREAD_TIMEOUT).is_ok(),
        "echo through the re-added rule",
    );
    let removed = rules(&run, &["del", "-t", "7000", "--reset-flows"]);
    run.check(removed["flows_reset"] == 1, format!("{removed}"));
    step_tx.send(()).unwrap();
    run.ok(client.join(THREAD_TIMEOUT));
    let list = rules(&run, &["list"]);
    run.check(list["rules"] == serde_json::json!([]), format!("{list}"));
}

#[test]
fn forwards_take_only_traffic_to_the_hosts_addresses() {
    // `-t 8080` has no address: it covers the host's own addresses, never a
    // packet merely routed through the host (the uplink program must leave
    // that alone). A SYN from the world to port 8080 of an address that is
    // not the host's is not punted and opens no flow; one to the host's
    // address is.
    let run = Running::with_lease(GuestKind::RealTap, &["-t", "8080"]);
    let syn_to = |dst: std::net::Ipv4Addr| tapgate_tests::rawtcp::Probe {
        src_mac: run.ok(tapgate_tests::rawtcp::iface_mac(run.topo.world(), "wan0")),
        dst_mac: run.ok(tapgate_tests::rawtcp::iface_mac(run.topo.host(), "uplink0")),
        src: std::net::SocketAddrV4::new("198.51.100.2".parse().unwrap(), 40123),
        dst: std::net::SocketAddrV4::new(dst, 8080),
        seq: 1,
        ack: 0,
        flags: tapgate_tests::rawtcp::Flags {
            syn: true,
            ..tapgate_tests::rawtcp::Flags::default()
        },
        payload: Vec::new(),
    };
    let forward_punts = |run: &Running| {
        let st = run.ok(control::stats(&run.topo));
        st["punts"]["forward"].as_u64().unwrap_or(u64::MAX)
    };
    let before = forward_punts(&run);
    let transit: std::net::Ipv4Addr = "203.0.113.99".parse().unwrap();
    run.ok(tapgate_tests::rawtcp::exchange(
        run.topo.world(),
        "wan0",
        &syn_to(transit),
        Duration::from_millis(500),
    ));
    let after_transit = forward_punts(&run);
    run.check(
        after_transit == before,
        format!("a SYN to {transit}:8080 was taken ({before} -> {after_transit} forward punts)"),
    );
    run.ok(tapgate_tests::rawtcp::exchange(
        run.topo.world(),
        "wan0",
        &syn_to(HOST_UPLINK_ADDR.parse().unwrap()),
        Duration::from_millis(500),
    ));
    let after_host = forward_punts(&run);
    run.check(
        after_host == before + 1,
        format!("a SYN to the host's :8080 was not punted ({before} -> {after_host})"),
    );
}
