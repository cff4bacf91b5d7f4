//! The guest's IPv6 side in the end-to-end tests: tapgate's default IPv6
//! addresses and waiting for the guest's autoconfiguration.
//!
//! # Theory of operation
//!
//! A guest namespace brings IPv6 up by itself: its kernel sends a router
//! solicitation when `eth0` comes up, runs duplicate-address detection on
//! its link-local address, and configures a SLAAC address in `fd00::/64`
//! and a default route via tapgate's link-local router address once the
//! router advertisement arrives. [`Ipv6Guest`] waits for exactly that, by
//! polling `ip -6 addr` / `ip -6 route` in the guest (bounded by
//! [`SLAAC_TIMEOUT`]), and runs the guest's tools with their output.

use std::time::{Duration, Instant};

use crate::running::Running;
use crate::topology::GUEST_IFACE;

/// The gateway's link-local router address for the default MAC
/// 52:55:0a:00:02:02 (modified EUI-64).
pub const ROUTER_LL: &str = "fe80::5055:aff:fe00:202";
/// The gateway's global IPv6 address.
pub const GATEWAY6: &str = "fd00::2";
/// The IPv6 DNS address.
pub const DNS6: &str = "fd00::3";
/// The address DHCPv6 hands out.
pub const GUEST6: &str = "fd00::15";
/// Bound on the guest's autoconfiguration.
pub const SLAAC_TIMEOUT: Duration = Duration::from_secs(20);

/// The IPv6 helpers on the shared fixture.
pub trait Ipv6Guest {
    /// Runs `argv` in the guest (bounded) and returns (success, stdout
    /// followed by stderr), whatever its exit status.
    fn guest_out(&self, argv: &[&str], timeout: Duration) -> (bool, String);
    /// Waits until the output of `argv` in the guest satisfies `cond`,
    /// failing with `what` and the last output after [`SLAAC_TIMEOUT`].
    fn wait_guest(&self, argv: &[&str], what: &str, cond: impl Fn(&str) -> bool) -> String;
    /// Waits for an autoconfigured address in fd00::/64 (and a link-local
    /// address, if any, out of `tentative`) and the default route via the
    /// router's link-local address. (A DHCPv4 client's deconfiguration may
    /// have flushed the link-local address.)
    fn wait_slaac(&self);
    /// Waits for the guest's link-local address to leave `tentative`.
    fn wait_link_local(&self);
}

impl Ipv6Guest for Running {
    fn guest_out(&self, argv: &[&str], timeout: Duration) -> (bool, String) {
        let out = self.ok(self.topo.guest().output_timeout(argv, timeout));
        let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.push_str(&String::from_utf8_lossy(&out.stderr));
        (out.status.success(), text)
    }

    fn wait_guest(&self, argv: &[&str], what: &str, cond: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + SLAAC_TIMEOUT;
        loop {
            let text = self.ok(self.topo.guest().stdout(argv));
            if cond(&text) {
                return text;
            }
            if Instant::now() > deadline {
                self.fail(format!("{what} within {SLAAC_TIMEOUT:?}; last:\n{text}"));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn wait_slaac(&self) {
        let show = ["ip", "-6", "addr", "show", "dev", GUEST_IFACE];
        self.wait_guest(&show, "a SLAAC address in fd00::/64", |t| {
            t.lines().any(|l| {
                l.contains("inet6 fd00::") && l.contains("scope global") && !l.contains("tentative")
            }) && !t
                .lines()
                .any(|l| l.contains("fe80") && l.contains("tentative"))
        });
        self.wait_guest(
            &["ip", "-6", "route", "show", "default"],
            "a default route via the router's link-local address",
            |t| t.contains(&format!("default via {ROUTER_LL} dev {GUEST_IFACE}")),
        );
    }

    fn wait_link_local(&self) {
        let show = ["ip", "-6", "addr", "show", "dev", GUEST_IFACE];
        self.wait_guest(&show, "a usable link-local address", |t| {
            t.lines()
                .any(|l| l.contains("inet6 fe80::") && !l.contains("tentative"))
        });
    }
}
