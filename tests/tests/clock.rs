//! End-to-end tests of the clock algorithm (issue 4) with seconds-long
//! intervals and a real tap guest: keepalives reach an idle live guest and
//! the connection stays usable; a guest that forgot a connection answers
//! a keepalive with an RST that removes the flow and reaches the world;
//! with keepalives off, idle connections are reset on both sides after one
//! to two inactivity intervals while busy ones live on; with
//! `--keepalive-probes`, a silent guest's connections are reset on the
//! world side.
//!
//! Each test holds both ends of its TCP connections in the test process:
//! the guest's socket is created by a thread inside the guest namespace,
//! the world's accepted by a one-shot server in the world namespace (a
//! socket stays in the namespace it was created in). They need root; run
//! them with `cargo xtask test`.
//!
//! tapgate flags these tests rely on: `--control-socket`,
//! `--keepalive-interval SECS`, `--inactivity-interval SECS`,
//! `--keepalive-probes N`.
#![allow(clippy::unwrap_used)]

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use serde_json::Value;
use tapgate_tests::GuestKind;
use tapgate_tests::child::Child;
use tapgate_tests::control::{self, flow_matches};
use tapgate_tests::nsthread;
use tapgate_tests::running::Running;
use tapgate_tests::scenarios::{NFT_TABLE, THREAD_TIMEOUT, connect, nft_rule, world};
use tapgate_tests::servers::serve_once;
use tapgate_tests::topology::{DEFAULT_GUEST_ADDR, WORLD_ADDR};

/// How long a flow may take to show up in `tapgate flows`.
const FLOW_VISIBLE: Duration = Duration::from_secs(5);
/// Slack on top of documented bounds: the one-second tick and polling.
const SLACK: Duration = Duration::from_millis(2500);

/// This file's helpers on the shared fixture.
trait ClockRun {
    /// A connection from the guest to `198.51.100.2:port`, both ends, after
    /// one round trip (so both directions went through the fast path).
    fn pair(&self, port: u16) -> Pair;
    /// Whether `tapgate flows` lists the pair's flow.
    fn listed(&self, p: &Pair) -> bool;
    /// A top-level counter of `tapgate stats`.
    fn stat(&self, key: &str) -> u64;
}

impl ClockRun for Running {
    fn pair(&self, port: u16) -> Pair {
        let server = self.ok(serve_once(
            self.topo.world(),
            world(port),
            Duration::from_secs(10),
            |s, _| Ok(s),
        ));
        let mut guest = self.ok(nsthread::run_in(
            self.topo.guest(),
            "connect",
            THREAD_TIMEOUT,
            move || connect(world(port)),
        ));
        let mut world_end = self.ok(server.join(THREAD_TIMEOUT));
        self.ok(set_timeouts(&world_end));
        let port_g = self
            .ok(guest.local_addr().map_err(anyhow::Error::from))
            .port();
        self.ok(round_trip(&mut guest, &mut world_end));
        let remote = world(port).to_string();
        let guest_addr = format!("{DEFAULT_GUEST_ADDR}:{port_g}");
        self.ok(control::wait_flow(&self.topo, FLOW_VISIBLE, |f| {
            flow_matches(f, "tcp", &guest_addr, &remote)
        }));
        Pair {
            guest,
            world: world_end,
            guest_addr,
            remote,
        }
    }

    fn listed(&self, p: &Pair) -> bool {
        self.ok(control::flows(&self.topo))
            .iter()
            .any(|f| flow_matches(f, "tcp", &p.guest_addr, &p.remote))
    }

    fn stat(&self, key: &str) -> u64 {
        let s = self.ok(control::stats(&self.topo));
        s.get(key)
            .and_then(Value::as_u64)
            .unwrap_or_else(|| self.fail(format!("no {key} in stats: {s}")))
    }
}

/// Both ends of one connection.
struct Pair {
    guest: TcpStream,
    world: TcpStream,
    guest_addr: String,
    remote: String,
}

fn set_timeouts(s: &TcpStream) -> Result<()> {
    s.set_read_timeout(Some(Duration::from_secs(20)))?;
    s.set_write_timeout(Some(Duration::from_secs(20)))?;
    Ok(())
}

/// One byte guest → world and one back.
fn round_trip(guest: &mut TcpStream, world_end: &mut TcpStream) -> Result<()> {
    let mut b = [0u8; 1];
    guest.write_all(b"g")?;
    world_end.read_exact(&mut b)?;
    if &b != b"g" {
        bail!("world read {b:?}");
    }
    world_end.write_all(b"w")?;
    guest.read_exact(&mut b)?;
    if &b != b"w" {
        bail!("guest read {b:?}");
    }
    Ok(())
}

/// Blocks on a read of `s` (its read timeout bounds it) and returns how
/// the connection ended: `Ok(elapsed)` for a reset, an error otherwise.
fn wait_reset(s: &mut TcpStream) -> Result<Duration> {
    let started = Instant::now();
    let mut b = [0u8; 16];
    match s.read(&mut b) {
        Err(e) if e.kind() == ErrorKind::ConnectionReset => Ok(started.elapsed()),
        Err(e) => bail!("expected ECONNRESET, got {e} after {:?}", started.elapsed()),
        Ok(n) => bail!("expected ECONNRESET, read {n} bytes"),
    }
}

#[test]
fn keepalives_reach_an_idle_live_guest() {
    let run = Running::with_lease(
        GuestKind::RealTap,
        &["--keepalive-interval", "1", "--inactivity-interval", "0"],
    );
    let mut p = run.pair(7401);
    // A keepalive: from the remote's port, no SYN/FIN/RST, no payload
    // (the connection is idle, so nothing else matches).
    let filter = "tcp and src port 7401 and tcp[tcpflags] & (tcp-syn|tcp-fin|tcp-rst) == 0 \
                  and tcp[tcpflags] & tcp-ack != 0 \
                  and (ip[2:2] - ((ip[0] & 0xf) << 2) - ((tcp[12] & 0xf0) >> 2)) == 0";
    let mut cmd: Command = run.topo.guest().cmd("tcpdump");
    cmd.args(["-i", run.topo.guest_iface(), "-n", "-l", "-c", "2", filter]);
    let mut dump = run.ok(Child::spawn(cmd, "tcpdump"));
    let status = run.ok(dump.wait_timeout(Duration::from_secs(10)));
    run.check(
        status.is_some_and(|s| s.success()),
        format!(
            "no keepalives captured in the guest: {status:?}\n{}\n{}",
            dump.stdout(),
            dump.stderr()
        ),
    );
    run.check(run.stat("keepalives_sent") >= 2, "keepalives_sent below 2");
    // The guest answered them: the connection is intact and usable.
    run.check(run.listed(&p), "the flow is gone after keepalives");
    run.ok(round_trip(&mut p.guest, &mut p.world));
    run.check(run.stat("probe_resets") == 0, "probe reset of a live guest");
}

#[test]
fn a_guest_that_forgot_the_connection_resets_it() {
    let run = Running::with_lease(
        GuestKind::RealTap,
        &["--keepalive-interval", "1", "--inactivity-interval", "0"],
    );
    let mut p = run.pair(7402);
    // Forget the socket without telling anyone: `ss -K` sends an RST,
    // which the guest's firewall drops while the socket is destroyed.
    run.ok(nft_rule(
        run.topo.guest(),
        "output",
        &format!("ip daddr {WORLD_ADDR} tcp dport 7402 tcp flags & rst == rst counter drop"),
    ));
    run.ok(run
        .topo
        .guest()
        .run(&["ss", "-K", "dst", WORLD_ADDR, "dport", "=", ":7402"]));
    run.ok(run
        .topo
        .guest()
        .run(&["nft", "delete", "table", "inet", NFT_TABLE]));
    let started = Instant::now();
    // The next keepalive gets an RST from the guest's stack, forwarded to
    // the world: within two keepalive intervals.
    let reset = run.ok(wait_reset(&mut p.world));
    run.check(
        reset <= Duration::from_secs(2) + SLACK,
        format!("world reset after {reset:?}"),
    );
    let gone = run.ok(control::wait_flow_gone(
        &run.topo,
        Duration::from_secs(2) + SLACK,
        |f| flow_matches(f, "tcp", &p.guest_addr, &p.remote),
    ));
    run.check(
        started.elapsed() <= Duration::from_secs(2) + SLACK,
        format!("flow gone after {gone:?}"),
    );
    run.check(
        run.stat("rst_answer_resets") >= 1,
        "rst_answer_resets not counted",
    );
}

#[test]
fn inactivity_resets_idle_connections_only() {
    let run = Running::with_lease(
        GuestKind::RealTap,
        &["--keepalive-interval", "0", "--inactivity-interval", "2"],
    );
    let mut idle = run.pair(7403);
    let mut busy = run.pair(7404);
    let idle_since = Instant::now();
    let mut idle_world = idle.world.try_clone().unwrap();
    let watcher = std::thread::spawn(move || wait_reset(&mut idle_world));
    // Traffic on the busy connection every half second for ~3 intervals.
    while idle_since.elapsed() < Duration::from_secs(7) {
        run.ok(round_trip(&mut busy.guest, &mut busy.world));
        std::thread::sleep(Duration::from_millis(500));
    }
    let world_reset = run.ok(watcher.join().unwrap());
    run.check(
        world_reset >= Duration::from_millis(1500) && world_reset <= Duration::from_secs(4) + SLACK,
        format!("idle connection reset on the world side after {world_reset:?}"),
    );
    let guest_reset = wait_reset(&mut idle.guest);
    run.check(
        guest_reset.is_ok(),
        format!("the guest side was not reset: {guest_reset:?}"),
    );
    run.check(!run.listed(&idle), "the idle flow is still listed");
    run.check(run.listed(&busy), "the busy flow is gone");
    run.ok(round_trip(&mut busy.guest, &mut busy.world));
    run.check(
        run.stat("inactivity_resets") == 1,
        "inactivity_resets is not 1",
    );
}

#[test]
fn probes_reset_a_silent_guests_connections() {
    let run = Running::with_lease(
        GuestKind::RealTap,
        &[
            "--keepalive-interval",
            "1",
            "--keepalive-probes",
            "2",
            "--inactivity-interval",
            "0",
        ],
    );
    let mut p = run.pair(7405);
    // The guest goes silent: nothing it sends leaves.
    run.ok(nft_rule(
        run.topo.guest(),
        "output",
        &format!("ip daddr {WORLD_ADDR} counter drop"),
    ));
    // One scan consumes the last activity, two keepalives go unanswered,
    // the next scan resets: about four intervals.
    let reset = run.ok(wait_reset(&mut p.world));
    run.check(
        reset <= Duration::from_secs(4) + SLACK,
        format!("world reset after {reset:?}"),
    );
    run.check(run.stat("probe_resets") == 1, "probe_resets is not 1");
    run.check(run.stat("keepalives_sent") >= 2, "fewer than 2 keepalives");
    run.check(!run.listed(&p), "the flow is still listed");
}
