//! `cargo xtask demo`: the built-in default topology.
//!
//! # Theory of operation
//!
//! Builds throwaway namespaces with the test harness — a guest behind a
//! *real tap* whose file descriptor a relay holds (as a hypervisor would), a
//! host namespace running tapgate on that tap, and a world namespace behind
//! the host's uplink — then shows the guest getting its address by DHCP,
//! pinging the gateway, fetching a page from an HTTP server in the world
//! through the NAT fast path, and `tapgate flows` / `tapgate stats` while a
//! download runs. Every namespace and process is owned by a guard, so
//! leaving this function for any reason (an error, Ctrl-C) removes them all.
//! Ctrl-C also reaches the children (same process group); the handler only
//! records it so the demo stops between steps and cleans up.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::{Context, Result, bail};
use tapgate_tests::{
    child::Child,
    dhcp::DhcpClient,
    servers::HttpServer,
    topology::{DEFAULT_GATEWAY, GuestKind, Topology, WORLD_ADDR},
};

fn step(stop: &AtomicBool, title: &str) -> Result<()> {
    if stop.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    println!("\n==> {title}");
    Ok(())
}

fn show(label: &str, text: &str) {
    for line in text.lines() {
        println!("    {label}{line}");
    }
}

/// Runs the demo; everything it created is gone when it returns.
pub fn run() -> Result<()> {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&stop);
    ctrlc::set_handler(move || flag.store(true, Ordering::SeqCst))
        .context("installing the Ctrl-C handler")?;

    let result = demo(&stop);
    // demo() has returned, so every guard has run: nothing is left.
    if stop.load(Ordering::SeqCst) {
        println!("\n==> interrupted; namespaces, relay and tapgate removed");
        std::process::exit(130);
    }
    if result.is_ok() {
        println!("\n==> demo complete; namespaces, relay and tapgate removed");
    }
    result
}

fn demo(stop: &AtomicBool) -> Result<()> {
    step(
        stop,
        "creating guest / host / world namespaces, guest behind a real tap",
    )?;
    let topo = Topology::new(GuestKind::RealTap)?;
    println!(
        "    guest netns {} (eth0), host netns {} (tap0, uplink0), world netns {}",
        topo.guest().name(),
        topo.host().name(),
        topo.world().name()
    );

    step(
        stop,
        "starting `tapgate run --tap tap0 --uplink uplink0` in the host namespace",
    )?;
    let mut tapgate = topo.start_tapgate(&[])?;
    for line in tapgate.stderr().lines().filter(|l| l.contains("INFO")) {
        show("tapgate: ", line);
    }

    step(stop, "guest: udhcpc -i eth0")?;
    let client = DhcpClient::new(topo.guest(), topo.guest_iface())?;
    let lease = client.run_once()?;
    println!(
        "    lease: ip {} mask /{} router {} dns {} lease {} s mtu {}",
        lease.ip, lease.mask, lease.router, lease.dns, lease.lease, lease.mtu
    );
    show(
        "guest$ ip -4 addr: ",
        &topo
            .guest()
            .stdout(&["ip", "-4", "-br", "addr", "show", "dev", "eth0"])?,
    );
    show("guest$ ip route: ", &topo.guest().stdout(&["ip", "route"])?);

    step(stop, &format!("guest: ping -c 3 {DEFAULT_GATEWAY}"))?;
    show("", &topo.ping_from_guest(DEFAULT_GATEWAY, 3)?);

    step(
        stop,
        &format!("world: busybox httpd on {WORLD_ADDR}:80; guest: curl"),
    )?;
    let big = vec![b'x'; 2 << 20];
    let http = HttpServer::start(
        topo.world(),
        format!("{WORLD_ADDR}:80").parse()?,
        &[("hello", b"hello from the world\n"), ("big", &big)],
    )?;
    show(
        "guest$ curl: ",
        &topo
            .guest()
            .stdout(&["curl", "-sS", "--max-time", "10", &http.url("hello")])?,
    );

    step(
        stop,
        "guest: a slow 2 MiB download; meanwhile `tapgate flows` and `tapgate stats`",
    )?;
    let mut slow = topo.guest().cmd("curl");
    slow.args([
        "-sS",
        "--max-time",
        "20",
        "--limit-rate",
        "1M",
        "-o",
        "/dev/null",
    ])
    .arg(http.url("big"));
    let mut download = Child::spawn(slow, "curl")?;
    std::thread::sleep(Duration::from_millis(800));
    let socket = topo.control_socket();
    let socket = socket
        .to_str()
        .context("control socket path is not UTF-8")?;
    let bin = tapgate_tests::tapgate_bin()?;
    for what in ["flows", "stats"] {
        let out = std::process::Command::new(&bin)
            .args([what, "--control-socket", socket])
            .output()
            .with_context(|| format!("running tapgate {what}"))?;
        // The summary: everything before the per-reason breakdown.
        let text = String::from_utf8_lossy(&out.stdout);
        let summary: Vec<&str> = text
            .lines()
            .take_while(|l| !l.starts_with("punts"))
            .collect();
        show(&format!("$ tapgate {what}: "), &summary.join("\n"));
    }
    let status = download.wait_exit(Duration::from_secs(25))?;
    if !status.success() {
        bail!("the download failed ({status}): {}", download.stderr());
    }
    println!("    download complete");

    step(
        stop,
        "stopping tapgate (SIGTERM): it detaches everything it attached",
    )?;
    let status = tapgate.stop()?;
    std::thread::sleep(Duration::from_millis(100));
    for line in tapgate
        .stderr()
        .lines()
        .filter(|l| l.contains("detached") || l.contains("punted records"))
    {
        show("tapgate: ", line);
    }
    if !status.success() {
        bail!("tapgate exited with {status}");
    }
    Ok(())
}
