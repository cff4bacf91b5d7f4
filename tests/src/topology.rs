//! The three-namespace test topology and starting tapgate in it.
//!
//! # Theory of operation
//!
//! ```text
//!  guest ns            host ns                           world ns
//!  eth0 ──[link]── tap0   tapgate   uplink0 ════veth════ wan0     dummy0
//!  (DHCP client)                    198.51.100.1/24      198.51.100.2/24
//!                                   2001:db8:1::1/64     2001:db8:1::2/64
//!                                   default via .2                203.0.113.10/32
//!                                   (and via ::2)                 2001:db8:2::10/128
//!                                                       (dummy0, or lo without the dummy driver)
//! ```
//!
//! The guest link is either a [`TapRelay`] ([`GuestKind::RealTap`]: a real
//! tap device in the host namespace fed by a hypervisor-like relay thread,
//! the configuration tapgate is built for) or a veth pair
//! ([`GuestKind::Veth`]: cheaper, for benchmarks). Either way the guest sees
//! `eth0` (MTU 1500) and the host sees `tap0`. Interfaces are created
//! directly inside their namespaces (`ip -n NS link add ... netns PEER`), so
//! nothing ever appears in the machine's own namespace.
//!
//! [`GuestKind::KernelRouted`] is the peer tapgate is measured and its test
//! scenarios are checked against: a veth guest with the static address
//! `10.0.2.15/24`, routed by the host kernel (`ip_forward=1` in the host
//! namespace only) with an nft table [`KERNEL_ROUTER_TABLE`] masquerading
//! on `uplink0`. No tapgate runs in it. It is dual-stack the same way: the
//! guest has [`KERNEL_GUEST_ADDR6`]`/64` with a default route via the
//! host's [`KERNEL_GATEWAY6`] on `tap0`, the host namespace forwards IPv6
//! (`net.ipv6.conf.all.forwarding=1` there only; its interfaces then stop
//! accepting router advertisements, which none of them needs) and an nft
//! `ip6` table of the same name masquerades on `uplink0`.
//!
//! tapgate runs in the host namespace (`ip netns exec HOST tapgate run ...`)
//! as a [`Child`] whose stderr is captured; [`Topology::start_tapgate`]
//! waits for its readiness line. Each topology owns a private directory for
//! tapgate's control socket ([`Topology::control_socket`]), passed as
//! `--control-socket` unless the caller gives one: the default path under
//! `/run/tapgate` is shared by every network namespace, so two topologies
//! with a `tap0` each would otherwise collide.
//!
//! `Drop` stops the relay first (closing the tap descriptors destroys both
//! taps), then deletes the guest, host and world namespaces, killing
//! anything still running in them (the namespaces take their sysctls and
//! nft tables with them), then removes the control socket's directory.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::child::Child;
use crate::netns::Netns;
use crate::relay::{RelayStats, TapRelay};
use crate::scratch::ScratchDir;

/// Name of the tap (or veth end) in the host namespace.
pub const TAP_NAME: &str = "tap0";
/// Name of the guest's interface.
pub const GUEST_IFACE: &str = "eth0";
/// Name of the host's uplink (veth to the world namespace).
pub const UPLINK_NAME: &str = "uplink0";
/// Name of the world's end of the uplink veth.
pub const WAN_NAME: &str = "wan0";
/// The host's address on the uplink.
pub const HOST_UPLINK_ADDR: &str = "198.51.100.1";
/// The world's address on the uplink link (the host's default gateway).
pub const WORLD_ADDR: &str = "198.51.100.2";
/// Prefix length of the uplink link.
pub const UPLINK_PREFIX: u8 = 24;
/// Name of the dummy interface holding [`WORLD_FAR_ADDR`] (when the kernel
/// has the dummy driver; otherwise the address is on the world's `lo`).
pub const FAR_IFACE: &str = "dummy0";
/// A "far" server address in the world namespace (on `dummy0` or `lo`).
pub const WORLD_FAR_ADDR: &str = "203.0.113.10";
/// The guest's MTU.
pub const GUEST_MTU: u32 = 1500;
/// The host's IPv6 address on the uplink.
pub const HOST_UPLINK_ADDR6: &str = "2001:db8:1::1";
/// The world's IPv6 address on the uplink link (the host's IPv6 default
/// gateway).
pub const WORLD_ADDR6: &str = "2001:db8:1::2";
/// A "far" IPv6 server address in the world namespace (beside
/// [`WORLD_FAR_ADDR`]).
pub const WORLD_FAR_ADDR6: &str = "2001:db8:2::10";

/// tapgate's default guest address.
pub const DEFAULT_GUEST_ADDR: &str = "10.0.2.15";
/// tapgate's default guest prefix length.
pub const DEFAULT_GUEST_PREFIX: u8 = 24;
/// tapgate's default gateway address.
pub const DEFAULT_GATEWAY: &str = "10.0.2.2";
/// tapgate's default DNS address.
pub const DEFAULT_DNS: &str = "10.0.2.3";
/// tapgate's default gateway MAC address.
pub const DEFAULT_GATEWAY_MAC: &str = "52:55:0a:00:02:02";

/// Name of the nft tables (`ip` and `ip6`) of a [`GuestKind::KernelRouted`]
/// host.
pub const KERNEL_ROUTER_TABLE: &str = "tg_bench";
/// The static IPv6 address of a [`GuestKind::KernelRouted`] guest (in
/// `fd00::/64`, like tapgate's guests).
pub const KERNEL_GUEST_ADDR6: &str = "fd00::15";
/// The host's IPv6 address on `tap0` in a [`GuestKind::KernelRouted`]
/// topology: the guest's IPv6 default gateway.
pub const KERNEL_GATEWAY6: &str = "fd00::2";
/// Prefix length of the guest link's IPv6 subnet.
pub const GUEST_PREFIX6: u8 = 64;

/// File name of tapgate's control socket in the topology's directory.
pub const CONTROL_SOCKET_NAME: &str = "control.sock";

/// Substring of the line tapgate logs once it is attached.
pub const READY_MARKER: &str = "ready: tap=";
/// How long [`Topology::start_tapgate`] waits for [`READY_MARKER`].
pub const READY_TIMEOUT: Duration = Duration::from_secs(15);

/// How the guest's interface is connected to the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestKind {
    /// A real tap device in the host namespace, relayed by a thread to a
    /// second tap in the guest namespace, as a hypervisor would.
    RealTap,
    /// A veth pair (faster; tapgate sees a veth instead of a tap).
    Veth,
    /// A veth pair routed by the host kernel with nft masquerade instead of
    /// tapgate (the benchmark peer): guest `10.0.2.15/24` via `10.0.2.2` and
    /// `fd00::15/64` via `fd00::2` on the host's `tap0`. Do not start
    /// tapgate in it.
    KernelRouted,
}

/// Guest, host and world namespaces wired together; torn down on drop.
#[derive(Debug)]
pub struct Topology {
    kind: GuestKind,
    // Dropped explicitly first in `Drop`.
    relay: Option<TapRelay>,
    /// The tapgate binary, if not [`crate::tapgate_bin`]'s.
    tapgate_bin: Option<PathBuf>,
    // Fields drop in declaration order after `Drop::drop`.
    guest: Netns,
    host: Netns,
    world: Netns,
    /// Holds tapgate's control socket; removed after the namespaces.
    control_dir: ScratchDir,
}

impl Topology {
    /// Builds the topology (see the module documentation).
    pub fn new(kind: GuestKind) -> Result<Topology> {
        crate::require_root()?;
        let control_dir = ScratchDir::new("topo")?;
        let guest = Netns::new("guest")?;
        let host = Netns::new("host")?;
        let world = Netns::new("world")?;

        // host <-> world
        host.ip(&[
            "link",
            "add",
            UPLINK_NAME,
            "type",
            "veth",
            "peer",
            "name",
            WAN_NAME,
            "netns",
            world.name(),
        ])?;
        host.ip(&[
            "addr",
            "add",
            &format!("{HOST_UPLINK_ADDR}/{UPLINK_PREFIX}"),
            "dev",
            UPLINK_NAME,
        ])?;
        host.ip(&["link", "set", UPLINK_NAME, "up"])?;
        world.ip(&[
            "addr",
            "add",
            &format!("{WORLD_ADDR}/{UPLINK_PREFIX}"),
            "dev",
            WAN_NAME,
        ])?;
        world.ip(&["link", "set", WAN_NAME, "up"])?;
        host.ip(&["route", "add", "default", "via", WORLD_ADDR])?;
        // The same link dual-stack (nodad: usable at once).
        host.ip(&[
            "-6",
            "addr",
            "add",
            &format!("{HOST_UPLINK_ADDR6}/64"),
            "dev",
            UPLINK_NAME,
            "nodad",
        ])?;
        world.ip(&[
            "-6",
            "addr",
            "add",
            &format!("{WORLD_ADDR6}/64"),
            "dev",
            WAN_NAME,
            "nodad",
        ])?;
        host.ip(&["-6", "route", "add", "default", "via", WORLD_ADDR6])?;
        // The far address lives on a dummy interface where the kernel has
        // the dummy driver, else on the world's loopback (same effect: a
        // local address reachable only through wan0).
        if world
            .ip(&["link", "add", FAR_IFACE, "type", "dummy"])
            .is_ok()
        {
            world.ip(&["link", "set", FAR_IFACE, "up"])?;
            world.ip(&[
                "addr",
                "add",
                &format!("{WORLD_FAR_ADDR}/32"),
                "dev",
                FAR_IFACE,
            ])?;
            world.ip(&[
                "-6",
                "addr",
                "add",
                &format!("{WORLD_FAR_ADDR6}/128"),
                "dev",
                FAR_IFACE,
                "nodad",
            ])?;
        } else {
            world.ip(&["addr", "add", &format!("{WORLD_FAR_ADDR}/32"), "dev", "lo"])?;
            world.ip(&[
                "-6",
                "addr",
                "add",
                &format!("{WORLD_FAR_ADDR6}/128"),
                "dev",
                "lo",
                "nodad",
            ])?;
        }

        // guest <-> host
        let relay = match kind {
            GuestKind::RealTap => Some(TapRelay::start(&host, TAP_NAME, &guest, GUEST_IFACE)?),
            GuestKind::Veth | GuestKind::KernelRouted => {
                host.ip(&[
                    "link",
                    "add",
                    TAP_NAME,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    GUEST_IFACE,
                    "netns",
                    guest.name(),
                ])?;
                None
            }
        };
        let topo = Topology {
            kind,
            relay,
            tapgate_bin: None,
            guest,
            host,
            world,
            control_dir,
        };
        topo.guest.ip(&[
            "link",
            "set",
            GUEST_IFACE,
            "mtu",
            &GUEST_MTU.to_string(),
            "up",
        ])?;
        topo.host.ip(&["link", "set", TAP_NAME, "up"])?;
        if kind == GuestKind::KernelRouted {
            topo.route_in_kernel()?;
        }
        Ok(topo)
    }

    /// Builds a [`GuestKind::KernelRouted`] topology: the guest is routed
    /// by the host kernel with nft masquerade, no tapgate involved.
    pub fn new_kernel_router() -> Result<Topology> {
        Topology::new(GuestKind::KernelRouted)
    }

    /// Configures the host namespace as a plain NAT router for the guest.
    fn route_in_kernel(&self) -> Result<()> {
        let guest_cidr = format!("{DEFAULT_GUEST_ADDR}/{DEFAULT_GUEST_PREFIX}");
        let gateway_cidr = format!("{DEFAULT_GATEWAY}/{DEFAULT_GUEST_PREFIX}");
        self.host
            .ip(&["addr", "add", &gateway_cidr, "dev", TAP_NAME])?;
        self.guest
            .ip(&["addr", "add", &guest_cidr, "dev", GUEST_IFACE])?;
        self.guest
            .ip(&["route", "add", "default", "via", DEFAULT_GATEWAY])?;
        // net.ipv4.* sysctls are per network namespace: this one only
        // concerns the host namespace.
        self.host
            .run(&["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"])?;
        self.host
            .run(&["nft", "add", "table", "ip", KERNEL_ROUTER_TABLE])?;
        self.host.run(&[
            "nft",
            "add chain ip",
            KERNEL_ROUTER_TABLE,
            "postrouting { type nat hook postrouting priority srcnat; policy accept; }",
        ])?;
        self.host.run(&[
            "nft",
            "add rule ip",
            KERNEL_ROUTER_TABLE,
            "postrouting",
            &format!("oifname \"{UPLINK_NAME}\" masquerade"),
        ])?;
        self.route_in_kernel6()
    }

    /// The IPv6 half of [`Topology::route_in_kernel`]: static addresses
    /// (`nodad`: usable at once), IPv6 forwarding in the host namespace and
    /// an `ip6` masquerade table. Nothing of it touches IPv4.
    fn route_in_kernel6(&self) -> Result<()> {
        let guest_cidr = format!("{KERNEL_GUEST_ADDR6}/{GUEST_PREFIX6}");
        let gateway_cidr = format!("{KERNEL_GATEWAY6}/{GUEST_PREFIX6}");
        self.host
            .ip(&["-6", "addr", "add", &gateway_cidr, "dev", TAP_NAME, "nodad"])?;
        self.guest.ip(&[
            "-6",
            "addr",
            "add",
            &guest_cidr,
            "dev",
            GUEST_IFACE,
            "nodad",
        ])?;
        self.guest
            .ip(&["-6", "route", "add", "default", "via", KERNEL_GATEWAY6])?;
        // Per network namespace too. With forwarding on, the host's
        // interfaces ignore router advertisements (accept_ra=1 means "unless
        // forwarding"): none is expected, the uplink's default route is
        // static.
        self.host
            .run(&["sysctl", "-q", "-w", "net.ipv6.conf.all.forwarding=1"])?;
        self.host
            .run(&["nft", "add", "table", "ip6", KERNEL_ROUTER_TABLE])?;
        self.host.run(&[
            "nft",
            "add chain ip6",
            KERNEL_ROUTER_TABLE,
            "postrouting { type nat hook postrouting priority srcnat; policy accept; }",
        ])?;
        self.host.run(&[
            "nft",
            "add rule ip6",
            KERNEL_ROUTER_TABLE,
            "postrouting",
            &format!("oifname \"{UPLINK_NAME}\" masquerade"),
        ])?;
        Ok(())
    }

    /// Uses `bin` as the tapgate binary for this topology (instead of
    /// `$TAPGATE_BIN` or the binary next to the test executable).
    pub fn set_tapgate_bin(&mut self, bin: PathBuf) {
        self.tapgate_bin = Some(bin);
    }

    /// The control socket [`Topology::start_tapgate`] gives tapgate (in a
    /// directory private to this topology).
    pub fn control_socket(&self) -> PathBuf {
        self.control_dir.join(CONTROL_SOCKET_NAME)
    }

    /// How the guest is connected.
    pub fn kind(&self) -> GuestKind {
        self.kind
    }

    /// The guest namespace (interface [`GUEST_IFACE`]).
    pub fn guest(&self) -> &Netns {
        &self.guest
    }

    /// The host namespace (where tapgate runs; interfaces [`TAP_NAME`] and
    /// [`UPLINK_NAME`]).
    pub fn host(&self) -> &Netns {
        &self.host
    }

    /// The world namespace (interface [`WAN_NAME`]; [`WORLD_FAR_ADDR`] on
    /// [`FAR_IFACE`] or `lo`).
    pub fn world(&self) -> &Netns {
        &self.world
    }

    /// Name of the tap in the host namespace.
    pub fn tap_name(&self) -> &'static str {
        TAP_NAME
    }

    /// Name of the uplink in the host namespace.
    pub fn uplink_name(&self) -> &'static str {
        UPLINK_NAME
    }

    /// Name of the guest's interface.
    pub fn guest_iface(&self) -> &'static str {
        GUEST_IFACE
    }

    /// The relay's frame counters ([`GuestKind::RealTap`] only).
    pub fn relay_stats(&self) -> Option<&RelayStats> {
        self.relay.as_ref().map(TapRelay::stats)
    }

    /// A one-line description of the relay counters, for failure messages.
    pub fn relay_summary(&self) -> String {
        self.relay_stats().map_or_else(
            || "relay: none (veth guest)".to_owned(),
            RelayStats::summary,
        )
    }

    /// A command running the tapgate binary with `args` in the host
    /// namespace.
    pub fn tapgate_command(&self, args: &[&str]) -> Result<Command> {
        let bin = match &self.tapgate_bin {
            Some(bin) => bin.clone(),
            None => crate::tapgate_bin()?,
        };
        let mut cmd = self.host.cmd(&path_str(&bin)?);
        cmd.args(args).env("RUST_BACKTRACE", "1");
        Ok(cmd)
    }

    /// Spawns tapgate with exactly `args` in the host namespace, without
    /// waiting for anything (for error-case tests).
    pub fn spawn_tapgate(&self, args: &[&str]) -> Result<Child> {
        Child::spawn(self.tapgate_command(args)?, "tapgate")
    }

    /// Runs `tapgate run --tap tap0 --uplink uplink0 --log-level debug
    /// --control-socket <control_socket()> <extra_args>` in the host
    /// namespace and waits (at most [`READY_TIMEOUT`]) for its readiness
    /// line. `--log-level` and `--control-socket` are left out when
    /// `extra_args` has them. Fails with the captured stderr if tapgate
    /// exits or stays silent.
    pub fn start_tapgate(&self, extra_args: &[&str]) -> Result<Child> {
        let control = path_str(&self.control_socket())?;
        let mut args = vec!["run", "--tap", TAP_NAME, "--uplink", UPLINK_NAME];
        if !extra_args.contains(&"--log-level") {
            args.extend_from_slice(&["--log-level", "debug"]);
        }
        if !extra_args.contains(&"--control-socket") {
            args.extend_from_slice(&["--control-socket", &control]);
        }
        args.extend_from_slice(extra_args);
        let mut child = self.spawn_tapgate(&args)?;
        child
            .wait_stderr_contains(READY_MARKER, READY_TIMEOUT)
            .with_context(|| format!("tapgate {} did not become ready", args.join(" ")))?;
        Ok(child)
    }

    /// Pings `target` from the guest (`ping -c COUNT -W 2`), failing unless
    /// every reply arrives; the error includes the relay counters.
    pub fn ping_from_guest(&self, target: &str, count: u32) -> Result<String> {
        ping(&self.guest, target, count).with_context(|| self.relay_summary())
    }
}

/// Pings `target` from `ns` (`ping -n -c COUNT -W 2`); fails unless the run
/// succeeds with 0% packet loss. Returns ping's output.
pub fn ping(ns: &Netns, target: &str, count: u32) -> Result<String> {
    let count = count.to_string();
    let out = ns.run(&["ping", "-n", "-c", &count, "-W", "2", target])?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if text.contains(" 0% packet loss") {
        Ok(text)
    } else {
        anyhow::bail!("ping {target} from {} lost packets:\n{text}", ns.name())
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        if let Some(mut relay) = self.relay.take() {
            relay.stop();
        }
        // guest, host and world are dropped next, in that order, then the
        // control socket's directory.
    }
}

fn path_str(path: &std::path::Path) -> Result<String> {
    path.to_str()
        .map(str::to_owned)
        .with_context(|| format!("path {} is not UTF-8", path.display()))
}

/// Convenience: the tapgate binary path as a string (see
/// [`crate::tapgate_bin`]).
pub fn tapgate_bin_str() -> Result<String> {
    let bin: PathBuf = crate::tapgate_bin()?;
    path_str(&bin)
}
