//! End-to-end tests of the gateway's IPv6 services, with the guest's real
//! tools: `rdisc6` and `ndisc6` (ndisc6), the kernel's own SLAAC and
//! duplicate-address detection, `ping -6`, `dhclient -6` and `dhcpcd`.
//!
//! Every test builds its own [`Topology`] and runs the real `tapgate`
//! binary in the host namespace (root; `cargo xtask test`). The guest is
//! behind a real tap unless a test says otherwise.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use std::io::{Read, Write};
use std::net::SocketAddr;

use tapgate_tests::bulk::{self, Direction};
use tapgate_tests::child::Child;
use tapgate_tests::control;
use tapgate_tests::ipv6::{DNS6, GATEWAY6, GUEST6, Ipv6Guest, ROUTER_LL};
use tapgate_tests::nsthread;
use tapgate_tests::running::Running;
use tapgate_tests::scenarios;
use tapgate_tests::scratch::ScratchDir;
use tapgate_tests::servers::{HttpServer, TcpEchoServer, UdpEchoServer};
use tapgate_tests::topology::{
    GUEST_IFACE, HOST_UPLINK_ADDR6, WORLD_ADDR6, WORLD_FAR_ADDR, WORLD_FAR_ADDR6,
};
use tapgate_tests::{GuestKind, require_root};

/// dhclient's script for the tests: the address only, never the machine's
/// /etc/resolv.conf or hostname.
const DHCLIENT6_SCRIPT: &str = r#"#!/bin/sh
case "$reason" in
BOUND6|RENEW6|REBIND6|REBOOT6)
    [ -n "$new_ip6_address" ] && ip -6 addr replace "$new_ip6_address/$new_ip6_prefixlen" \
        dev "$interface" valid_lft "${new_max_life:-forever}" preferred_lft "${new_preferred_life:-forever}" ;;
RELEASE6|EXPIRE6|STOP6)
    [ -n "$old_ip6_address" ] && ip -6 addr del "$old_ip6_address/$old_ip6_prefixlen" dev "$interface" ;;
esac
exit 0
"#;

/// This file's helpers on the shared fixture.
trait Ipv6Run {
    /// `tapgate stats --json`'s `services` counter `key`.
    fn service(&self, key: &str) -> u64;
}

impl Ipv6Run for Running {
    fn service(&self, key: &str) -> u64 {
        let stats = self.ok(control::stats(&self.topo));
        stats["services"][key]
            .as_u64()
            .unwrap_or_else(|| self.fail(format!("stats lack services.{key}: {stats}")))
    }
}

/// Whitespace runs folded to one space, so rdisc6's aligned columns can be
/// matched as `Key : value`.
fn squeeze(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn start(args: &[&str]) -> Option<Running> {
    if let Err(e) = require_root() {
        eprintln!("skipping: {e}");
        return None;
    }
    Some(Running::start(GuestKind::RealTap, args))
}

#[test]
fn router_advertisement_as_rdisc6_sees_it() {
    let Some(run) = start(&["--dns-search", "example.test"]) else {
        return;
    };
    // Capture the advertisement itself, to check the IP header rdisc6
    // does not print.
    let mut dump = Child::spawn(
        {
            let mut c = run.topo.guest().cmd("tcpdump");
            c.args([
                "-n",
                "-vv",
                "-l",
                "-i",
                GUEST_IFACE,
                "-c",
                "1",
                "icmp6 and ip6[40] == 134",
            ]);
            c
        },
        "tcpdump",
    )
    .unwrap();
    run.wait_link_local();
    std::thread::sleep(Duration::from_millis(300));
    // One solicitation, 500 ms to answer it (RFC 4861 asks a router to
    // answer within MAX_RA_DELAY_TIME, 0.5 s).
    let (ok, out) = run.guest_out(
        &["rdisc6", "-1", "-r", "1", "-w", "500", GUEST_IFACE],
        Duration::from_secs(10),
    );
    let s = squeeze(&out);
    run.check(ok, format!("rdisc6 got no advertisement in 0.5 s:\n{out}"));
    for want in [
        "Hop limit : 64",
        "Stateful address conf. : Yes",
        "Stateful other conf. : Yes",
        "Router lifetime : 1800",
        "Source link-layer address: 52:55:0A:00:02:02",
        "MTU : 1500 bytes",
        "Prefix : fd00::/64",
        "On-link : Yes",
        "Autonomous address conf.: Yes",
        &format!("Recursive DNS server : {DNS6}"),
        "DNS search list : example.test",
        &format!("from {ROUTER_LL}"),
    ] {
        run.check(s.contains(want), format!("rdisc6 lacks \"{want}\":\n{out}"));
    }
    dump.wait_exit(Duration::from_secs(10)).unwrap();
    let captured = dump.stdout();
    run.check(
        captured.contains("hlim 255") && captured.contains(&format!("{ROUTER_LL} >")),
        format!("the advertisement is not from {ROUTER_LL} with hop limit 255:\n{captured}"),
    );
    run.check(
        run.service("router_adverts") >= 1,
        "router_adverts not counted",
    );
}

#[test]
fn guest_autoconfigures_and_reaches_the_gateway() {
    let Some(run) = start(&[]) else {
        return;
    };
    run.wait_slaac();
    // The gateway's addresses answer Neighbor Solicitations ...
    let (ok, out) = run.guest_out(
        &["ndisc6", "-1", "-r", "3", GATEWAY6, GUEST_IFACE],
        Duration::from_secs(10),
    );
    run.check(
        ok && out.contains("Target link-layer address: 52:55:0A:00:02:02"),
        format!("ndisc6 {GATEWAY6}:\n{out}"),
    );
    // ... and pings.
    for target in [GATEWAY6, DNS6, &format!("{ROUTER_LL}%{GUEST_IFACE}")] {
        let (ok, out) = run.guest_out(
            &[
                "ping", "-6", "-n", "-c", "3", "-i", "0.2", "-W", "2", target,
            ],
            Duration::from_secs(10),
        );
        run.check(
            ok && out.contains(" 0% packet loss"),
            format!("ping -6 {target}:\n{out}"),
        );
    }
    // The guest's neighbour cache marks the gateway as a router (the NA's
    // Router flag).
    let neigh = run.ok(run.topo.guest().stdout(&[
        "ip",
        "-6",
        "neigh",
        "show",
        GATEWAY6,
        "dev",
        GUEST_IFACE,
    ]));
    run.check(
        neigh.contains("lladdr 52:55:0a:00:02:02") && neigh.contains("router"),
        format!("neighbour entry of {GATEWAY6}: {neigh}"),
    );
    run.check(
        run.service("neighbor_adverts") >= 1 && run.service("echo_replies") >= 9,
        "NAs or echo replies not counted",
    );
}

#[test]
fn duplicate_address_detection() {
    let Some(run) = start(&[]) else {
        return;
    };
    run.wait_slaac();
    // The guest's own address: the gateway stays silent, DAD succeeds.
    run.ok(run.topo.guest().ip(&[
        "-6",
        "addr",
        "add",
        &format!("{GUEST6}/64"),
        "dev",
        GUEST_IFACE,
    ]));
    // The gateway's address: the gateway defends it, DAD fails.
    run.ok(run
        .topo
        .guest()
        .ip(&["-6", "addr", "add", "fd00::2/64", "dev", GUEST_IFACE]));
    let show = ["ip", "-6", "addr", "show", "dev", GUEST_IFACE];
    let text = run.wait_guest(&show, "DAD to finish for both addresses", |t| {
        let line = |a: &str| {
            t.lines()
                .find(|l| l.contains(&format!("inet6 {a}/64")))
                .unwrap_or_default()
                .to_owned()
        };
        !line(GUEST6).is_empty()
            && !line(GUEST6).contains("tentative")
            && line("fd00::2").contains("dadfailed")
    });
    run.check(
        !text
            .lines()
            .any(|l| l.contains(&format!("inet6 {GUEST6}/64")) && l.contains("dadfailed")),
        format!("the gateway answered a DAD probe for the guest's address:\n{text}"),
    );
}

#[test]
fn ipv6_without_a_route_out_is_unreachable_at_once() {
    let Some(run) = start(&[]) else {
        return;
    };
    run.wait_slaac();
    // The host loses its IPv6 default route: the guest's IPv6 to the
    // world fails at once ("no route", from the gateway) instead of
    // hanging, while the gateway's own services go on.
    run.ok(run.topo.host().ip(&["-6", "route", "del", "default"]));
    let began = Instant::now();
    let (ok, out) = run.guest_out(
        &[
            "curl",
            "-6",
            "-sS",
            "-m",
            "10",
            "-o",
            "/dev/null",
            &format!("http://[{WORLD_FAR_ADDR6}]/"),
        ],
        Duration::from_secs(15),
    );
    let took = began.elapsed();
    run.check(
        !ok && out.contains("Couldn't connect") && took < Duration::from_secs(3),
        format!("curl -6 without a route, after {took:?}:\n{out}"),
    );
    let (_, out) = run.guest_out(
        &["ping", "-6", "-n", "-c", "1", "-W", "2", WORLD_FAR_ADDR6],
        Duration::from_secs(10),
    );
    run.check(
        out.contains("Destination unreachable: No route"),
        format!("ping -6 without a route:\n{out}"),
    );
    let (ok, out) = run.guest_out(
        &["ping", "-6", "-n", "-c", "1", "-W", "2", GATEWAY6],
        Duration::from_secs(10),
    );
    run.check(ok, format!("the gateway stopped answering:\n{out}"));
}

#[test]
fn ipv6_to_the_host_itself_is_prohibited() {
    let Some(run) = start(&[]) else {
        return;
    };
    run.wait_slaac();
    let began = Instant::now();
    let (ok, out) = run.guest_out(
        &[
            "curl",
            "-6",
            "-sS",
            "-m",
            "10",
            "-o",
            "/dev/null",
            &format!("http://[{HOST_UPLINK_ADDR6}]:22/"),
        ],
        Duration::from_secs(15),
    );
    let took = began.elapsed();
    run.check(
        !ok && out.contains("Couldn't connect") && took < Duration::from_secs(3),
        format!("curl -6 to the host after {took:?}:\n{out}"),
    );
    let stats = run.ok(control::stats(&run.topo));
    run.check(
        stats["flows"]["policy_denied"].as_u64().unwrap_or(0) >= 1
            || stats.to_string().contains("\"policy_denied\":1"),
        format!("the refusal was not counted: {stats}"),
    );
}

#[test]
fn tcp_both_ways_over_ipv6_on_the_fast_path() {
    let Some(run) = start(&[]) else {
        return;
    };
    run.wait_slaac();
    const BYTES: u64 = 64 << 20;
    for (dir, port) in [
        (Direction::GuestToWorld, 5601),
        (Direction::WorldToGuest, 5602),
    ] {
        let (fast0, slow0) = run.ok(control::fast_slow(&run.ok(control::stats(&run.topo))));
        let hashes = run.ok(bulk::transfer_at(
            &run.topo,
            WORLD_ADDR6,
            dir,
            BYTES,
            port,
            Duration::from_secs(120),
        ));
        run.check(hashes.equal(), format!("{dir:?}: {hashes:?}"));
        let (fast1, slow1) = run.ok(control::fast_slow(&run.ok(control::stats(&run.topo))));
        let (fast, slow) = (fast1 - fast0, slow1 - slow0);
        let share = fast as f64 / (fast + slow).max(1) as f64;
        eprintln!(
            "{dir:?}: {fast} packets on the fast path, {slow} punted ({:.3}%)",
            share * 100.0
        );
        run.check(
            share >= 0.999,
            format!(
                "{dir:?}: fast path carried only {:.3}% ({fast} fast, {slow} slow)",
                share * 100.0
            ),
        );
    }
}

#[test]
fn dual_stack_guest_http_udp_and_ping() {
    if let Err(e) = require_root() {
        eprintln!("skipping: {e}");
        return;
    }
    // An IPv4 lease first, then IPv6 by SLAAC: both at once.
    let run = Running::with_lease(GuestKind::RealTap, &[]);
    run.wait_slaac();
    let body: &[u8] = b"hello over both families\n";
    let far6: SocketAddr = format!("[{WORLD_FAR_ADDR6}]:80").parse().unwrap();
    let far4: SocketAddr = format!("{WORLD_FAR_ADDR}:80").parse().unwrap();
    let _http6 = run.ok(HttpServer::start(run.topo.world(), far6, &[("f", body)]));
    let _http4 = run.ok(HttpServer::start(run.topo.world(), far4, &[("f", body)]));
    for url in [
        format!("http://[{WORLD_FAR_ADDR6}]/f"),
        format!("http://{WORLD_FAR_ADDR}/f"),
    ] {
        let (ok, out) = run.guest_out(
            &["curl", "-g", "-sS", "-m", "10", &url],
            Duration::from_secs(15),
        );
        run.check(ok && out.as_bytes() == body, format!("curl {url}:\n{out}"));
    }
    // TCP and UDP echo over IPv6: the world sees the host's address.
    let echo = run.ok(TcpEchoServer::start(
        run.topo.world(),
        format!("[{WORLD_FAR_ADDR6}]:7000").parse().unwrap(),
    ));
    let (ok, out) = run.guest_out(
        &[
            "bash",
            "-c",
            &format!("echo tcp6 | socat -t 2 - TCP6:[{WORLD_FAR_ADDR6}]:7000"),
        ],
        Duration::from_secs(15),
    );
    run.check(
        ok && out.contains("tcp6"),
        format!("TCP echo over IPv6:\n{out}"),
    );
    let host6 = format!("[{HOST_UPLINK_ADDR6}]:");
    run.check(
        echo.peers()
            .iter()
            .all(|p| p.to_string().starts_with(&host6))
            && echo.accepted() == 1,
        format!("TCP peers {:?}", echo.peers()),
    );
    let udp = run.ok(UdpEchoServer::start(
        run.topo.world(),
        format!("[{WORLD_FAR_ADDR6}]:7001").parse().unwrap(),
    ));
    let (ok, out) = run.guest_out(
        &[
            "bash",
            "-c",
            &format!("echo udp6 | socat -t 2 - UDP6:[{WORLD_FAR_ADDR6}]:7001"),
        ],
        Duration::from_secs(15),
    );
    run.check(
        ok && out.contains("udp6"),
        format!("UDP echo over IPv6:\n{out}"),
    );
    run.check(
        udp.peers()
            .iter()
            .all(|p| p.to_string().starts_with(&host6))
            && udp.datagrams() >= 1,
        format!("UDP peers {:?}", udp.peers()),
    );
    // ICMPv6 echo through the NAT, on the fast path after the first.
    let (ok, out) = run.guest_out(
        &[
            "ping",
            "-6",
            "-n",
            "-c",
            "5",
            "-i",
            "0.2",
            "-W",
            "2",
            WORLD_FAR_ADDR6,
        ],
        Duration::from_secs(15),
    );
    run.check(
        ok && out.contains(" 0% packet loss"),
        format!("ping -6:\n{out}"),
    );
    let flows = run.ok(control::flows(&run.topo));
    run.check(
        flows.iter().any(|f| control::field(f, "proto") == "icmpv6"),
        format!("no icmpv6 flow: {flows:?}"),
    );
}

#[test]
fn no_ipv6_turns_every_ipv6_service_off() {
    let Some(run) = start(&["--no-ipv6"]) else {
        return;
    };
    run.wait_link_local();
    let (ok, out) = run.guest_out(
        &["rdisc6", "-1", "-r", "2", "-w", "500", GUEST_IFACE],
        Duration::from_secs(10),
    );
    run.check(!ok, format!("rdisc6 got an answer with --no-ipv6:\n{out}"));
    let (ok, _) = run.guest_out(
        &[
            "ping",
            "-6",
            "-n",
            "-c",
            "1",
            "-W",
            "1",
            &format!("{ROUTER_LL}%{GUEST_IFACE}"),
        ],
        Duration::from_secs(10),
    );
    run.check(!ok, "the router address answered with --no-ipv6");
    run.check(
        run.service("router_adverts") == 0 && run.service("neighbor_adverts") == 0,
        "IPv6 services answered with --no-ipv6",
    );
}

#[test]
fn dhcpv6_lease_renew_and_release_with_dhclient() {
    let Some(run) = start(&["--dhcp-lease", "6"]) else {
        return;
    };
    run.wait_slaac();
    let dir = ScratchDir::new("dhclient6").unwrap();
    let lease = dir.join("dhclient6.leases");
    let pid = dir.join("dhclient6.pid");
    let script = dir.join("dhclient6-script");
    // Debian's dhclient-script would write the machine's /etc/resolv.conf
    // (network namespaces share /etc): this one only sets the address.
    std::fs::write(&script, DHCLIENT6_SCRIPT).unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let (lease, pid, script) = (
        lease.to_str().unwrap(),
        pid.to_str().unwrap(),
        script.to_str().unwrap(),
    );
    // In the foreground with a 6 s lease: the binding, then a renewal at
    // T1 (3 s).
    let mut client = Child::spawn(
        {
            let mut c = run.topo.guest().cmd("dhclient");
            c.args([
                "-6",
                "-d",
                "-v",
                "-sf",
                script,
                "-lf",
                lease,
                "-pf",
                pid,
                GUEST_IFACE,
            ]);
            c
        },
        "dhclient -6",
    )
    .unwrap();
    client
        .wait_stderr_contains("XMT: Renew", Duration::from_secs(30))
        .unwrap_or_else(|e| run.fail(format!("{e:#}\n{}", client.stderr())));
    let deadline = Instant::now() + Duration::from_secs(10);
    while client.stderr().matches("RCV: Reply message").count() < 2 {
        if Instant::now() > deadline {
            run.fail(format!("no Reply to the Renew:\n{}", client.stderr()));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    run.wait_guest(
        &["ip", "-6", "addr", "show", "dev", GUEST_IFACE],
        "the DHCPv6 address on eth0",
        |t| t.contains(&format!("inet6 {GUEST6}/128")),
    );
    client.stop().unwrap();
    let before = run.service("dhcpv6_replies");
    // dhclient retransmits an unanswered Release (RFC 8415 §18.2.7: 1 s,
    // then doubling, 4 times): a release answered at once ends before its
    // first retransmission.
    let began = Instant::now();
    let (ok, out) = run.guest_out(
        &[
            "dhclient",
            "-6",
            "-r",
            "-v",
            "-sf",
            script,
            "-lf",
            lease,
            "-pf",
            pid,
            GUEST_IFACE,
        ],
        Duration::from_secs(20),
    );
    let took = began.elapsed();
    run.check(
        ok && out.contains("XMT: Release") && !out.contains("XMT: Release on eth0, interval 2"),
        format!("dhclient -6 -r after {took:?}:\n{out}"),
    );
    run.check(
        run.service("dhcpv6_replies") == before + 1,
        "the Release was not answered",
    );
    run.wait_guest(
        &["ip", "-6", "addr", "show", "dev", GUEST_IFACE],
        "the released address gone from eth0",
        |t| !t.contains(&format!("inet6 {GUEST6}/128")),
    );
}

#[test]
fn dhcpv6_with_dhcpcd() {
    let Some(run) = start(&[]) else {
        return;
    };
    run.wait_slaac();
    let dir = ScratchDir::new("dhcpcd6").unwrap();
    let conf = dir.join("dhcpcd.conf");
    std::fs::write(
        &conf,
        "ipv6only\nnoipv6rs\nia_na 1\nduid\nnohook resolv.conf\nnohook hostname\nnohook ntp.conf\noption dhcp6_name_servers, dhcp6_domain_search\n",
    )
    .unwrap();
    let (ok, out) = run.guest_out(
        &[
            "dhcpcd",
            "-f",
            conf.to_str().unwrap(),
            "-1",
            "-t",
            "15",
            "-B",
            "-d",
            // No hooks at all: they would write the machine's files.
            "-c",
            "/bin/true",
            GUEST_IFACE,
        ],
        Duration::from_secs(30),
    );
    run.check(ok, format!("dhcpcd failed:\n{out}"));
    run.wait_guest(
        &["ip", "-6", "addr", "show", "dev", GUEST_IFACE],
        "dhcpcd's DHCPv6 address on eth0",
        |t| t.contains(&format!("inet6 {GUEST6}/128")),
    );
}

/// `[2001:db8:1::2]:port`, the world's end of the uplink.
fn world6(port: u16) -> SocketAddr {
    SocketAddr::new(WORLD_ADDR6.parse().unwrap(), port)
}

#[test]
fn half_close_both_ways_over_ipv6() {
    let Some(run) = start(&[]) else {
        return;
    };
    run.wait_slaac();
    run.ok(scenarios::half_close_guest_first_at(
        &run.topo,
        world6(5611),
    ));
    run.ok(scenarios::half_close_server_first_at(
        &run.topo,
        world6(5612),
    ));
}

#[test]
fn udp_over_ipv6_both_ways() {
    let Some(run) = start(&[]) else {
        return;
    };
    run.wait_slaac();
    let o = run.ok(scenarios::udp_round_trips_at(&run.topo, world6(5621)));
    let host6: std::net::IpAddr = HOST_UPLINK_ADDR6.parse().unwrap();
    run.check(
        !o.world_peers.is_empty() && o.world_peers.iter().all(|p| p.ip() == host6),
        format!("the world saw {:?}, not the host's address", o.world_peers),
    );
    run.ok(scenarios::udp_empty_datagrams_at(&run.topo, world6(5622)));
}

#[test]
fn icmpv6_from_the_world_reaches_the_guest_translated() {
    let Some(run) = start(&[]) else {
        return;
    };
    run.wait_slaac();
    // A UDP port nobody listens on in the world: the world's kernel answers
    // port unreachable to the host's address; the guest's connected socket
    // must see ECONNREFUSED.
    let got = run.ok(nsthread::run_in(
        run.topo.guest(),
        "udp6",
        Duration::from_secs(20),
        move || {
            let s = scenarios::udp_socket(world6(5631))?;
            for _ in 0..3 {
                s.send(b"anyone?")?;
                let mut b = [0u8; 16];
                match s.recv(&mut b) {
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                        return Ok(true);
                    }
                    _ => std::thread::sleep(Duration::from_millis(200)),
                }
            }
            Ok(false)
        },
    ));
    run.check(got, "no ECONNREFUSED from a closed world port over IPv6");
    let stats = run.ok(control::stats(&run.topo));
    run.check(
        stats["icmp"]["translated_to_guest"]
            .as_object()
            .is_some_and(|m| m.values().any(|v| v.as_u64().unwrap_or(0) > 0)),
        format!("no ICMP translated to the guest: {}", stats["icmp"]),
    );
}

#[test]
fn path_mtu_over_ipv6_with_a_1280_byte_uplink() {
    let Some(run) = start(&[]) else {
        return;
    };
    run.wait_slaac();
    run.ok(run
        .topo
        .host()
        .ip(&["link", "set", "uplink0", "mtu", "1280"]));
    // Only the host's side: the world still announces a 1440-byte MSS,
    // so the guest's segments must be cut down by path MTU discovery.
    // tapgate reads the uplink's MTU every few seconds.
    std::thread::sleep(Duration::from_secs(6));
    let hashes = run.ok(bulk::transfer_at(
        &run.topo,
        WORLD_ADDR6,
        Direction::GuestToWorld,
        16 << 20,
        5641,
        Duration::from_secs(60),
    ));
    run.check(
        hashes.equal(),
        format!("upload over a 1280-byte path: {hashes:?}"),
    );
    let route = run.ok(run
        .topo
        .guest()
        .stdout(&["ip", "-6", "route", "get", WORLD_ADDR6]));
    run.check(
        route.contains("mtu 1280"),
        format!("the guest learnt no path MTU: {route}"),
    );
}

/// An idle IPv6 connection from the guest to the world, after one round
/// trip: (guest end, world end).
fn idle_pair6(run: &Running, port: u16) -> (std::net::TcpStream, std::net::TcpStream) {
    let server = run.ok(tapgate_tests::servers::serve_once(
        run.topo.world(),
        world6(port),
        Duration::from_secs(10),
        |s, _| Ok(s),
    ));
    let mut guest = run.ok(nsthread::run_in(
        run.topo.guest(),
        "connect",
        Duration::from_secs(20),
        move || scenarios::connect(world6(port)),
    ));
    let mut world_end = run.ok(server.join(Duration::from_secs(20)));
    world_end
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    guest.write_all(b"g").unwrap();
    let mut b = [0u8; 1];
    world_end.read_exact(&mut b).unwrap();
    (guest, world_end)
}

#[test]
fn keepalives_over_ipv6() {
    let Some(run) = start(&["--keepalive-interval", "1", "--inactivity-interval", "0"]) else {
        return;
    };
    run.wait_slaac();
    let (mut guest, mut world_end) = idle_pair6(&run, 5651);
    let stat = |k: &str| run.ok(control::stats(&run.topo))[k].as_u64().unwrap_or(0);
    let deadline = Instant::now() + Duration::from_secs(10);
    while stat("keepalives_sent") < 2 {
        run.check(Instant::now() < deadline, "no keepalives over IPv6");
        std::thread::sleep(Duration::from_millis(200));
    }
    // The guest answered them: the connection still works.
    guest.write_all(b"h").unwrap();
    let mut b = [0u8; 1];
    world_end.read_exact(&mut b).unwrap();
    run.check(
        &b == b"h" && stat("probe_resets") == 0,
        "the connection broke",
    );
}

#[test]
fn inactivity_resets_idle_ipv6_connections() {
    let Some(run) = start(&["--keepalive-interval", "0", "--inactivity-interval", "2"]) else {
        return;
    };
    run.wait_slaac();
    let (mut guest, mut world_end) = idle_pair6(&run, 5652);
    // No packet at all for an inactivity interval: reset on both sides.
    let began = Instant::now();
    let mut buf = [0u8; 8];
    let r = world_end.read(&mut buf);
    run.check(
        matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
        format!(
            "the world end was not reset: {r:?} after {:?}",
            began.elapsed()
        ),
    );
    guest
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let r = guest.read(&mut buf);
    run.check(
        matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
        format!("the guest end was not reset: {r:?}"),
    );
}

#[test]
fn dns_on_the_ipv6_address_is_relayed_to_an_ipv4_resolver() {
    let Some(run) = start(&["--dns-upstream", tapgate_tests::topology::WORLD_ADDR]) else {
        return;
    };
    let dns = run.ok(tapgate_tests::servers::DnsServer::start(
        run.topo.world(),
        SocketAddr::new(tapgate_tests::topology::WORLD_ADDR.parse().unwrap(), 53),
        "192.0.2.77".parse().unwrap(),
    ));
    run.wait_slaac();
    let answer = run.ok(tapgate_tests::scenarios::dig(
        &run.topo,
        DNS6,
        "example.test",
    ));
    run.check(
        answer == "192.0.2.77",
        format!(
            "dig @{DNS6}: {answer:?} (upstream saw {} queries)",
            dns.queries()
        ),
    );
    run.check(
        run.service("dns6_relayed") >= 1,
        "the query was not relayed",
    );
}

#[test]
fn traceroute6_sees_the_gateway_then_the_destination() {
    let Some(run) = start(&[]) else {
        return;
    };
    run.wait_slaac();
    let (ok, out) = run.guest_out(
        &[
            "traceroute",
            "-6",
            "-n",
            "-q",
            "1",
            "-w",
            "2",
            "-m",
            "4",
            WORLD_FAR_ADDR6,
        ],
        Duration::from_secs(30),
    );
    let hops: Vec<Vec<&str>> = out
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().collect())
        .collect();
    run.check(
        ok && hops.first().and_then(|h| h.get(1)) == Some(&GATEWAY6)
            && hops.get(1).and_then(|h| h.get(1)) == Some(&WORLD_FAR_ADDR6),
        format!("traceroute -6:\n{out}"),
    );
}

#[test]
fn rst_for_a_stale_ipv6_flow_after_a_restart() {
    let Some(mut run) = start(&[]) else {
        return;
    };
    run.wait_slaac();
    let _server = run.ok(TcpEchoServer::start(run.topo.world(), world6(5661)));
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<()>();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let guest = run.ok(nsthread::spawn_in(run.topo.guest(), "guest", move || {
        let mut s = scenarios::connect(world6(5661))?;
        s.write_all(b"one")?;
        let mut buf = [0u8; 3];
        s.read_exact(&mut buf)?;
        let _ = ready_tx.send(());
        if go_rx.recv_timeout(Duration::from_secs(60)).is_err() {
            anyhow::bail!("never told to go on");
        }
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        // The write may succeed locally; the RST shows on the next read.
        let write = s.write_all(b"two");
        let mut buf = [0u8; 16];
        match (write, s.read(&mut buf)) {
            (Err(e), _) | (_, Err(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => Ok(()),
            (_, Ok(n)) => anyhow::bail!("no RST: read returned {n} bytes after the restart"),
            (_, Err(e)) => anyhow::bail!("no RST: read failed with {e} ({:?})", e.kind()),
        }
    }));
    let ((), guest) = run.recv(&ready_rx, guest, "the connection never worked");
    // A restart that keeps nothing: the flow is unknown to the new daemon,
    // which answers the guest's next segment with an RST (RFC 9293
    // §3.10.7.1).
    let stopped = run.tapgate.stop();
    let status = run.ok(stopped);
    run.check(status.success(), format!("tapgate exited with {status}"));
    run.tapgate = run
        .topo
        .start_tapgate(&[])
        .unwrap_or_else(|e| run.fail(format!("restarting tapgate: {e:#}")));
    let _ = go_tx.send(());
    run.ok(guest.join(Duration::from_secs(60)));
}

#[test]
fn iperf3_over_ipv6_from_a_veth_guest_with_gso() {
    if let Err(e) = require_root() {
        eprintln!("skipping: {e}");
        return;
    }
    // A veth guest sends TSO super-packets: the fast path must carry them.
    let run = Running::start(GuestKind::Veth, &[]);
    run.wait_slaac();
    let mut server = run.ok(Child::spawn(
        {
            let mut c = run.topo.world().cmd("iperf3");
            c.args(["-s", "-1", "-B", WORLD_ADDR6, "-p", "5671"]);
            c
        },
        "iperf3 -s",
    ));
    run.ok(tapgate_tests::servers::wait_tcp_listening(
        run.topo.world(),
        5671,
        Duration::from_secs(5),
    ));
    let (fast0, slow0) = run.ok(control::fast_slow(&run.ok(control::stats(&run.topo))));
    let (ok, out) = run.guest_out(
        &[
            "iperf3",
            "-6",
            "-c",
            WORLD_ADDR6,
            "-p",
            "5671",
            "-t",
            "3",
            "--connect-timeout",
            "5000",
        ],
        Duration::from_secs(30),
    );
    run.check(ok && out.contains("receiver"), format!("iperf3 -6:\n{out}"));
    let _ = server.wait_exit(Duration::from_secs(10));
    let (fast1, slow1) = run.ok(control::fast_slow(&run.ok(control::stats(&run.topo))));
    let (fast, slow) = (fast1 - fast0, slow1 - slow0);
    let share = fast as f64 / (fast + slow).max(1) as f64;
    run.check(
        share >= 0.999,
        format!(
            "fast path {:.3}% ({fast} fast, {slow} slow)\n{out}",
            share * 100.0
        ),
    );
}

#[test]
fn keepalive_probes_reset_a_silent_ipv6_guest() {
    let Some(run) = start(&[
        "--keepalive-interval",
        "1",
        "--keepalive-probes",
        "2",
        "--inactivity-interval",
        "0",
    ]) else {
        return;
    };
    run.wait_slaac();
    let (_guest, mut world_end) = idle_pair6(&run, 5681);
    // The guest goes silent: nothing it sends to the world leaves.
    run.ok(scenarios::nft_rule(
        run.topo.guest(),
        "output",
        &format!("ip6 daddr {WORLD_ADDR6} counter drop"),
    ));
    let began = Instant::now();
    let mut buf = [0u8; 8];
    let r = world_end.read(&mut buf);
    run.check(
        matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
        format!(
            "the world end was not reset: {r:?} after {:?}",
            began.elapsed()
        ),
    );
    let stats = run.ok(control::stats(&run.topo));
    run.check(
        stats["probe_resets"].as_u64() == Some(1),
        format!("probe_resets: {}", stats["probe_resets"]),
    );
}

#[test]
fn the_hosts_ipv6_address_with_allow_host() {
    let Some(run) = start(&["--allow-host"]) else {
        return;
    };
    run.wait_slaac();
    let addr: SocketAddr = format!("[{HOST_UPLINK_ADDR6}]:8080").parse().unwrap();
    let _http = run.ok(HttpServer::start(
        run.topo.host(),
        addr,
        &[("secret", b"host-only\n")],
    ));
    let (fast0, _) = run.ok(control::fast_slow(&run.ok(control::stats(&run.topo))));
    let (ok, out) = run.guest_out(
        &[
            "curl",
            "-g",
            "-sS",
            "--max-time",
            "8",
            &format!("http://[{HOST_UPLINK_ADDR6}]:8080/secret"),
        ],
        Duration::from_secs(20),
    );
    run.check(
        ok && out == "host-only\n",
        format!("curl -6 to the host: {out}"),
    );
    let (fast1, _) = run.ok(control::fast_slow(&run.ok(control::stats(&run.topo))));
    run.check(
        fast1 >= fast0 + 4,
        format!("only {} packets on the fast path", fast1 - fast0),
    );
}

#[test]
fn udp_over_ipv6_expires_when_idle() {
    let Some(run) = start(&["--udp-timeout", "4"]) else {
        return;
    };
    run.wait_slaac();
    let _server = run.ok(UdpEchoServer::start(run.topo.world(), world6(5691)));
    let local = run.ok(nsthread::run_in(
        run.topo.guest(),
        "guest",
        Duration::from_secs(20),
        || {
            let s = scenarios::udp_socket(world6(5691))?;
            scenarios::udp_echo(&s, b"ping")?;
            Ok(s.local_addr()?)
        },
    ));
    let guest = local.to_string();
    let remote = world6(5691).to_string();
    let this = |f: &serde_json::Value| control::flow_matches(f, "udp", &guest, &remote);
    run.ok(control::wait_flow(&run.topo, Duration::from_secs(5), this));
    // Expires between 1x and 1.25x the timeout after the last datagram.
    run.ok(control::wait_flow_gone(
        &run.topo,
        Duration::from_secs(10),
        this,
    ));
}
