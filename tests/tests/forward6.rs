//! End-to-end tests of inbound port forwards over IPv6 (`-t`/`-u`): clients
//! in the world namespace reach servers in the guest namespace through the
//! host's IPv6 uplink address (`2001:db8:1::1`), the guest's current IPv6
//! address (SLAAC here) being the destination. A rule without an address
//! forwards on both families, a rule with an IPv6 address on that address
//! only, and a port the host already uses on IPv6 alone is a startup error.
//!
//! Every test builds its own [`Topology`] (dual-stack: the host's
//! `2001:db8:1::1/64` on uplink0, the world's `2001:db8:1::2` on wan0)
//! and runs the real `tapgate` binary in the host namespace; the guest
//! takes its IPv4 address by DHCP and its IPv6 address by SLAAC first.
//! They need root; run them with `cargo xtask test`.
//!
//! tapgate flags these tests rely on: `-t/--tcp-ports`, `-u/--udp-ports`,
//! `--control-socket`.
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::Duration;

use tapgate_tests::child::Child;
use tapgate_tests::control;
use tapgate_tests::ipv6::Ipv6Guest;
use tapgate_tests::nsthread;
use tapgate_tests::running::Running;
use tapgate_tests::scenarios::{THREAD_TIMEOUT, connect};
use tapgate_tests::servers::{HttpServer, UdpEchoServer, serve_once, wait_tcp_listening};
use tapgate_tests::topology::{GUEST_IFACE, HOST_UPLINK_ADDR, HOST_UPLINK_ADDR6, WORLD_ADDR6};
use tapgate_tests::{GuestKind, Topology, require_root};

/// Bound on a curl or socat run.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(60);

/// This file's helpers on the shared fixture.
trait Forward6Run {
    /// `curl ARGS` from the world namespace: (exit ok, stdout, stderr).
    fn curl(&self, args: &[&str]) -> (bool, String, String);
    /// The guest's global IPv6 address (after [`Forward6Run::wait_slaac`]).
    fn guest_addr6(&self) -> String;
}

impl Forward6Run for Running {
    fn curl(&self, args: &[&str]) -> (bool, String, String) {
        let mut argv = vec!["curl", "-sS", "--max-time", "50"];
        argv.extend_from_slice(args);
        let out = self.ok(self.topo.world().output_timeout(&argv, CLIENT_TIMEOUT));
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    fn guest_addr6(&self) -> String {
        let text = self.ok(self.topo.guest().stdout(&[
            "ip",
            "-6",
            "-o",
            "addr",
            "show",
            "dev",
            GUEST_IFACE,
            "scope",
            "global",
        ]));
        text.split_whitespace()
            .skip_while(|w| *w != "inet6")
            .nth(1)
            .and_then(|a| a.split('/').next())
            .map(str::to_owned)
            .unwrap_or_else(|| self.fail(format!("no global IPv6 address in:\n{text}")))
    }
}

/// A dual-stack guest behind tapgate started with `args`, or `None`
/// (skipped) without root.
fn start(args: &[&str]) -> Option<Running> {
    if let Err(e) = require_root() {
        eprintln!("skipping: {e}");
        return None;
    }
    // An IPv4 lease first (the guest's MAC and IPv4 address), then IPv6
    // by SLAAC.
    let run = Running::with_lease(GuestKind::RealTap, args);
    run.wait_slaac();
    Some(run)
}

/// `[::]:port`, a dual-stack guest-side listening address.
fn any6(port: u16) -> SocketAddr {
    SocketAddr::from(([0u16; 8], port))
}

/// `http://[2001:db8:1::1]:port/name`.
fn url6(port: u16, name: &str) -> String {
    format!("http://[{HOST_UPLINK_ADDR6}]:{port}/{name}")
}

#[test]
fn tcp_and_udp_forwards_over_ipv6_and_ipv4() {
    let Some(run) = start(&["-t", "8080:80", "-u", "5353:53"]) else {
        return;
    };
    let page: &[u8] = b"hello over IPv6 from the guest\n";
    let httpd = run.ok(HttpServer::start(
        run.topo.guest(),
        any6(80),
        &[("file", page)],
    ));
    let echo = run.ok(UdpEchoServer::start(run.topo.guest(), any6(53)));

    // TCP over IPv6 to the host's IPv6 address.
    let url = url6(8080, "file");
    let (ok, body, err) = run.curl(&["-6", "-g", &url]);
    run.check(ok, format!("curl {url} failed: {err}"));
    run.check(
        body.as_bytes() == page,
        format!("curl {url} returned {body:?}"),
    );
    drop(httpd);

    // Through the same rule, the guest sees the real client, and the
    // connection arrives at its SLAAC address.
    let guest6 = run.guest_addr6();
    let server = run.ok(serve_once(
        run.topo.guest(),
        any6(80),
        THREAD_TIMEOUT,
        |mut s, peer| {
            let local = s.local_addr()?;
            s.write_all(format!("{peer} {local}").as_bytes())?;
            Ok(())
        },
    ));
    let answer = run.ok(nsthread::run_in(
        run.topo.world(),
        "tcp6 client",
        THREAD_TIMEOUT,
        || {
            let mut s = connect(SocketAddr::new(HOST_UPLINK_ADDR6.parse()?, 8080))?;
            let mut answer = String::new();
            s.read_to_string(&mut answer)?;
            Ok(answer)
        },
    ));
    run.ok(server.join(THREAD_TIMEOUT));
    run.check(
        answer.starts_with(&format!("[{WORLD_ADDR6}]:"))
            && answer.ends_with(&format!(" [{guest6}]:80")),
        format!("the guest saw {answer:?}; want the world client and [{guest6}]:80"),
    );

    // UDP over IPv6, a round trip through socat.
    let (ok, out) = {
        let o = run.ok(run.topo.world().output_timeout(
            &[
                "bash",
                "-c",
                &format!("echo udp6-ping | socat -t 2 - UDP6:[{HOST_UPLINK_ADDR6}]:5353"),
            ],
            CLIENT_TIMEOUT,
        ));
        let mut text = String::from_utf8_lossy(&o.stdout).into_owned();
        text.push_str(&String::from_utf8_lossy(&o.stderr));
        (o.status.success(), text)
    };
    run.check(
        ok && out.contains("udp6-ping"),
        format!("UDP echo over IPv6 via [{HOST_UPLINK_ADDR6}]:5353:\n{out}"),
    );
    let peers = echo.peers();
    run.check(
        peers
            .iter()
            .any(|p| p.is_ipv6() && p.ip().to_string() == WORLD_ADDR6),
        format!("the guest's UDP server saw {peers:?}, not the world client"),
    );

    // The same TCP rule over IPv4: the rule has no address, so it covers
    // both families.
    let _httpd = run.ok(HttpServer::start(
        run.topo.guest(),
        any6(80),
        &[("file", page)],
    ));
    let url4 = format!("http://{HOST_UPLINK_ADDR}:8080/file");
    let (ok, body, err) = run.curl(&["-4", &url4]);
    run.check(ok, format!("curl {url4} failed: {err}"));
    run.check(
        body.as_bytes() == page,
        format!("curl {url4} returned {body:?}"),
    );

    let stats = run.ok(control::stats(&run.topo));
    run.check(
        stats["flows"]["forwards_accepted"].as_u64() == Some(4),
        format!("four inbound flows expected (tcp6 twice, udp6, tcp4): {stats}"),
    );
}

#[test]
fn tcp_forward_over_ipv6_bulk_mostly_on_fast_path() {
    let Some(run) = start(&["-t", "8080:80"]) else {
        return;
    };
    let size = 32usize << 20;
    let big: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
    let _httpd = run.ok(HttpServer::start(
        run.topo.guest(),
        any6(80),
        &[("big", &big)],
    ));
    let before = run.ok(control::stats(&run.topo));
    let (f0, s0) = run.ok(control::fast_slow(&before));
    let url = url6(8080, "big");
    let (ok, got, err) = run.curl(&[
        "-6",
        "-g",
        "-o",
        "/dev/null",
        "-w",
        "%{size_download}",
        &url,
    ]);
    run.check(ok, format!("curl {url} failed: {err}"));
    run.check(
        got.trim() == size.to_string(),
        format!("downloaded {got} bytes of {size}"),
    );
    let after = run.ok(control::stats(&run.topo));
    let (f1, s1) = run.ok(control::fast_slow(&after));
    let (fast, slow) = (f1.saturating_sub(f0), s1.saturating_sub(s0));
    let share = fast as f64 / (fast + slow).max(1) as f64;
    run.check(
        fast + slow >= 500 && share >= 0.99,
        format!(
            "fast path handled {:.2}% ({fast} of {}) packets, want >= 99%",
            share * 100.0,
            fast + slow
        ),
    );
}

#[test]
fn ipv6_rule_address_forwards_only_that_address() {
    let Some(run) = start(&["-t", &format!("{HOST_UPLINK_ADDR6}/8081:80")]) else {
        return;
    };
    let page: &[u8] = b"only on the IPv6 address\n";
    let _httpd = run.ok(HttpServer::start(
        run.topo.guest(),
        any6(80),
        &[("file", page)],
    ));
    let url = url6(8081, "file");
    let (ok, body, err) = run.curl(&["-6", "-g", &url]);
    run.check(ok, format!("curl {url} failed: {err}"));
    run.check(
        body.as_bytes() == page,
        format!("curl {url} returned {body:?}"),
    );
    // The host's IPv4 address is not forwarded: nothing listens there, the
    // host refuses the connection.
    let url4 = format!("http://{HOST_UPLINK_ADDR}:8081/file");
    let (ok, body, err) = run.curl(&["-4", "--max-time", "5", &url4]);
    run.check(
        !ok && body.is_empty() && (err.contains("refused") || err.contains("Couldn't connect")),
        format!("curl {url4} (not forwarded) gave ok={ok} {body:?} {err}"),
    );
    let stats = run.ok(control::stats(&run.topo));
    run.check(
        stats["flows"]["forwards_accepted"].as_u64() == Some(1),
        format!("one inbound flow expected: {stats}"),
    );
}

#[test]
fn port_used_by_an_ipv6_only_host_listener_fails_at_startup() {
    if let Err(e) = require_root() {
        eprintln!("skipping: {e}");
        return;
    }
    let topo = Topology::new(GuestKind::Veth).unwrap_or_else(|e| panic!("{e:#}"));
    // A host process on port 8090 of IPv6 only: the port is free on IPv4,
    // so only holding the IPv6 side shows the clash.
    let mut listener = Child::spawn(
        {
            let mut c = topo.host().cmd("socat");
            c.args([
                "TCP6-LISTEN:8090,ipv6only=1,reuseaddr,fork",
                "SYSTEM:echo host",
            ]);
            c
        },
        "socat",
    )
    .unwrap_or_else(|e| panic!("{e:#}"));
    wait_tcp_listening(topo.host(), 8090, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("{e:#}: {}", listener.stderr()));
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
            "8090",
        ])
        .unwrap_or_else(|e| panic!("{e:#}"));
    let status = tapgate
        .wait_exit(Duration::from_secs(15))
        .unwrap_or_else(|e| panic!("{e:#}"));
    let stderr = tapgate.stderr();
    assert!(!status.success(), "tapgate started: {stderr}");
    assert!(
        stderr.contains("tcp port 8090 is already in use on the host (forwarded by \"8090\")"),
        "unclear error: {stderr}"
    );
    // Nothing was attached: the host's listener still answers.
    let out = topo
        .host()
        .output_timeout(
            &["bash", "-c", "socat -t 2 - TCP6:[::1]:8090 </dev/null"],
            CLIENT_TIMEOUT,
        )
        .unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "host");
    let _ = listener.stop();
}
