//! `cargo xtask demo`: the built-in default topology.
//!
//! # Theory of operation
//!
//! Builds throwaway namespaces with the test harness — a guest behind a
//! *real tap* whose file descriptor a relay holds (as a hypervisor would), a
//! host namespace running tapgate on that tap, and a world namespace behind
//! the host's uplink — then shows the guest getting its address by DHCP and
//! pinging the gateway. Every namespace and process is owned by a guard, so
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
    dhcp::DhcpClient,
    topology::{DEFAULT_GATEWAY, GuestKind, Topology},
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
