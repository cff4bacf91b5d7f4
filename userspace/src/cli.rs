//! The command line.
//!
//! # Theory of operation
//!
//! clap parses and validates every argument before anything touches the
//! system: addresses, prefix lengths and MAC addresses are typed values, and
//! a value clap cannot parse is a one-line error naming the flag. Cross-field
//! checks (gateway inside the guest subnet, ...) live in
//! [`RunArgs::guest_config`].

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    path::PathBuf,
};

use clap::{ArgGroup, Args, Parser, Subcommand, ValueEnum};
use smoltcp::wire::EthernetAddress;
use thiserror::Error;

use crate::{
    config::{self, GuestNetConfig},
    control::{self, ControlCommand, RulesRequest},
    fwd::{FwdTable, PortRange, Proto, SpecError},
};

/// tapgate: user-mode-style networking for a guest behind a tap device,
/// with an eBPF fast path.
#[derive(Debug, Parser)]
#[command(name = "tapgate", version, about, long_about = None)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
// `Run` is much larger than the others; the value is parsed once and
// lives for the whole process, so boxing it would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Attach to a tap device and serve the guest behind it (runs in the
    /// foreground until SIGINT/SIGTERM).
    Run(RunArgs),
    /// Print a running daemon's counters (fast path, slow path, punts,
    /// flows), read from its control socket.
    Stats(QueryArgs),
    /// List a running daemon's flows, read from its control socket.
    Flows(QueryArgs),
    /// List or change a running daemon's port forwarding rules.
    #[command(subcommand)]
    Rules(RulesAction),
    /// Run the node agent: one process serving the taps of every VM pod
    /// of a Kubernetes node, driven by `tapgate-cni` over an HTTP API on a
    /// UNIX socket (runs in the foreground until SIGINT/SIGTERM, which
    /// leave every datapath running for the next agent).
    Agent(AgentArgs),
}

/// Arguments of `tapgate agent`.
#[derive(Debug, Args)]
pub struct AgentArgs {
    /// The API socket (HTTP+JSON; mode 0600).
    #[arg(long, value_name = "PATH", default_value = crate::agent::api::DEFAULT_AGENT_SOCKET)]
    pub socket: PathBuf,
    /// Where attachments and their guests' state are recorded, so a
    /// restarted agent takes them over.
    #[arg(long, value_name = "DIR", default_value = crate::agent::DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
    /// The bpffs directory under which each attachment's datapath is
    /// pinned.
    #[arg(long, value_name = "DIR", default_value = crate::agent::DEFAULT_BPFFS_DIR)]
    pub bpffs_dir: PathBuf,
    /// Also serve `/healthz` and `/metrics` (only those) over TCP here,
    /// e.g. `0.0.0.0:9465`.
    #[arg(long, value_name = "ADDR:PORT")]
    pub listen: Option<std::net::SocketAddr>,
    /// Size of each attachment's punt ring buffer in KiB (a power of two,
    /// at least 64).
    #[arg(long, value_name = "KIB", default_value_t = crate::agent::DEFAULT_RING_KIB,
          value_parser = parse_ring_kib)]
    pub ring_kib: u32,
    /// Log verbosity of the agent and of every attachment's programs.
    #[arg(long, value_name = "LEVEL", value_enum, default_value_t = LogLevel::Info)]
    pub log_level: LogLevel,
}

/// A ring size in KiB: a power of two from 64 KiB to 1 GiB.
fn parse_ring_kib(s: &str) -> Result<u32, String> {
    let kib: u32 = s
        .parse()
        .map_err(|_| format!("\"{s}\" is not a number of KiB"))?;
    if !(64..=(1 << 20)).contains(&kib) || !kib.is_power_of_two() {
        return Err(format!("{kib} KiB: a power of two from 64 to 1048576"));
    }
    Ok(kib)
}

/// `tapgate rules ...`.
#[derive(Debug, Subcommand)]
pub enum RulesAction {
    /// List the rules with the number of flows each has opened.
    List(QueryArgs),
    /// Add rules (`-t SPEC` or `-u SPEC`); they apply from the next
    /// connection on. The ports are reserved like at startup.
    Add(RulesChange),
    /// Remove the rules a SPEC added (`-t SPEC` or `-u SPEC`, as given to
    /// `add` or `run`); their flows stay unless `--reset-flows`.
    Del(RulesDel),
}

impl RulesAction {
    /// The control request.
    pub fn command(&self) -> ControlCommand {
        let request = match self {
            Self::List(_) => RulesRequest::List,
            Self::Add(c) => {
                let (proto, spec) = c.proto_spec();
                RulesRequest::Add { proto, spec }
            }
            Self::Del(d) => {
                let (proto, spec) = d.change.proto_spec();
                RulesRequest::Del {
                    proto,
                    spec,
                    reset_flows: d.reset_flows,
                }
            }
        };
        ControlCommand::Rules(request)
    }

    /// Which daemon, and how to print.
    pub fn query(&self) -> &QueryArgs {
        match self {
            Self::List(q) => q,
            Self::Add(c) => &c.query,
            Self::Del(d) => &d.change.query,
        }
    }
}

/// One SPEC for `rules add` / `rules del`.
#[derive(Debug, Args)]
#[command(group(ArgGroup::new("spec").required(true).args(["tcp", "udp"])))]
pub struct RulesChange {
    /// TCP ports, in `--tcp-ports` syntax.
    #[arg(short = 't', long = "tcp-ports", value_name = "SPEC", value_parser = parse_spec_word)]
    pub tcp: Option<String>,
    /// UDP ports, in `--udp-ports` syntax.
    #[arg(short = 'u', long = "udp-ports", value_name = "SPEC", value_parser = parse_spec_word)]
    pub udp: Option<String>,
    /// Which daemon, and how to print.
    #[command(flatten)]
    pub query: QueryArgs,
}

impl RulesChange {
    /// The protocol and the SPEC.
    pub fn proto_spec(&self) -> (Proto, String) {
        match (&self.tcp, &self.udp) {
            (Some(t), _) => (Proto::Tcp, t.clone()),
            (None, Some(u)) => (Proto::Udp, u.clone()),
            // clap's group requires one of them.
            (None, None) => (Proto::Tcp, String::new()),
        }
    }
}

/// `rules del`.
#[derive(Debug, Args)]
pub struct RulesDel {
    /// The SPEC.
    #[command(flatten)]
    pub change: RulesChange,
    /// Also reset (TCP: RST to both sides) the flows opened through the
    /// removed rules.
    #[arg(long)]
    pub reset_flows: bool,
}

/// A SPEC travels as one word of the control protocol.
fn parse_spec_word(s: &str) -> Result<String, String> {
    if s.is_empty() || s.contains(char::is_whitespace) {
        return Err(format!(
            "{s:?}: a SPEC has no spaces (separate items with commas)"
        ));
    }
    Ok(s.to_owned())
}

/// Log verbosity, for the daemon and for the eBPF programs alike.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogLevel {
    /// Nothing.
    Off,
    /// Errors only.
    Error,
    /// Warnings and errors.
    Warn,
    /// Informational messages (default).
    Info,
    /// Debugging detail.
    Debug,
    /// Everything, including one line per punted packet.
    Trace,
}

impl LogLevel {
    /// The `log` crate's filter for this level.
    pub fn filter(self) -> log::LevelFilter {
        match self {
            Self::Off => log::LevelFilter::Off,
            Self::Error => log::LevelFilter::Error,
            Self::Warn => log::LevelFilter::Warn,
            Self::Info => log::LevelFilter::Info,
            Self::Debug => log::LevelFilter::Debug,
            Self::Trace => log::LevelFilter::Trace,
        }
    }

    /// The in-kernel `aya-log` level (0 = off ... 5 = trace).
    pub fn bpf_level(self) -> u8 {
        match self {
            Self::Off => 0,
            Self::Error => 1,
            Self::Warn => 2,
            Self::Info => 3,
            Self::Debug => 4,
            Self::Trace => 5,
        }
    }
}

/// Arguments of `tapgate run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// The guest-facing interface: a tap device held by a hypervisor (or a
    /// veth, for tests and benchmarks).
    #[arg(long, value_name = "TAP")]
    pub tap: String,

    /// The host's interface towards the world; `auto` picks the interface
    /// of the IPv4 default route.
    #[arg(long, value_name = "IFACE|auto", default_value = "auto")]
    pub uplink: String,

    /// The guest's address and prefix length, handed out by DHCP.
    #[arg(long, value_name = "CIDR", default_value = "10.0.2.15/24", value_parser = parse_cidr)]
    pub address: (Ipv4Addr, u8),

    /// The gateway's address (answered by tapgate).
    #[arg(long, value_name = "IP", default_value_t = config::DEFAULT_GATEWAY)]
    pub gateway: Ipv4Addr,

    /// The DNS server address handed to the guest (answered by tapgate).
    #[arg(long, value_name = "IP", default_value_t = config::DEFAULT_DNS)]
    pub dns: Ipv4Addr,

    /// The gateway's MAC address, as seen by the guest.
    #[arg(long, value_name = "MAC", default_value = "52:55:0a:00:02:02", value_parser = parse_mac)]
    pub mac: EthernetAddress,

    /// The guest's IPv6 address (handed out by DHCPv6) and the prefix the
    /// router advertisements announce for SLAAC.
    #[arg(long, value_name = "CIDR6", default_value = "fd00::15/64", value_parser = parse_cidr6)]
    pub address6: (Ipv6Addr, u8),

    /// The gateway's global IPv6 address (its link-local router address
    /// is derived from --mac).
    #[arg(long, value_name = "IP6", default_value_t = config::DEFAULT_GATEWAY6)]
    pub gateway6: Ipv6Addr,

    /// The IPv6 DNS server address handed to the guest (RDNSS, DHCPv6).
    #[arg(long, value_name = "IP6", default_value_t = config::DEFAULT_DNS6)]
    pub dns6: Ipv6Addr,

    /// A DNS search domain for the guest (RA DNSSL and the DHCPv6 domain
    /// list); repeatable.
    #[arg(long = "dns-search", value_name = "DOMAIN", value_parser = parse_domain)]
    pub dns_search: Vec<String>,

    /// Serve no IPv6 at all: no router advertisements, NDP or DHCPv6; the
    /// guest's IPv6 frames are dropped and counted.
    #[arg(long)]
    pub no_ipv6: bool,

    /// DHCP lease time in seconds.
    #[arg(long, value_name = "SECS", default_value_t = config::DEFAULT_LEASE_SECS,
          value_parser = clap::value_parser!(u32).range(2..))]
    pub dhcp_lease: u32,

    /// Log level of the daemon and of the eBPF programs.
    #[arg(long, value_name = "LEVEL", value_enum, default_value_t = LogLevel::Info)]
    pub log_level: LogLevel,

    /// Load the eBPF programs from this ELF file instead of the embedded
    /// object (for developing the programs).
    #[arg(long, value_name = "PATH")]
    pub ebpf_object: Option<PathBuf>,

    /// The control socket answering `tapgate stats` and `tapgate flows`
    /// (default: /run/tapgate/TAP.sock, or /run/tapgate/netns-INODE/TAP.sock
    /// outside the host's initial network namespace).
    #[arg(long, value_name = "PATH")]
    pub control_socket: Option<PathBuf>,

    /// Upstream DNS resolver for the forwarder on the --dns address
    /// (default: the first nameserver of /etc/resolv.conf).
    #[arg(long, value_name = "IP")]
    pub dns_upstream: Option<Ipv4Addr>,

    /// Let the guest reach the host's own addresses (loopback stays closed).
    #[arg(long)]
    pub allow_host: bool,

    /// Seconds a closed TCP flow waits for its final ACK before it is
    /// reaped.
    #[arg(long, value_name = "SECS", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    pub last_ack_timeout: u64,

    /// Seconds of inactivity after which a UDP flow expires.
    #[arg(long, value_name = "SECS", default_value_t = 180, value_parser = clap::value_parser!(u64).range(1..))]
    pub udp_timeout: u64,

    /// Seconds between keepalive scans: a TCP flow the guest sent nothing
    /// on since the last scan gets a keepalive towards the guest (0: off).
    #[arg(long, value_name = "SECS", default_value_t = 300)]
    pub keepalive_interval: u64,

    /// Seconds between inactivity scans: a TCP flow with no packet at all
    /// since the last scan is reset on both sides (0: off).
    #[arg(long, value_name = "SECS", default_value_t = 7200)]
    pub inactivity_interval: u64,

    /// Reset a TCP flow on both sides once the guest has answered none of
    /// this many consecutive keepalives (0: off).
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub keepalive_probes: u32,

    /// Maximum number of concurrent flows (kernel map and port budget).
    #[arg(long, value_name = "N", default_value_t = datapath_common::DEFAULT_MAX_FLOWS,
          value_parser = clap::value_parser!(u32).range(16..=(1 << 22)))]
    pub max_flows: u32,

    /// Forward host TCP ports to the guest, passt's syntax (repeatable):
    /// `[ADDR[%IFACE]/]FIRST[-LAST][:TOFIRST[-TOLAST]]`, `~FIRST[-LAST]`
    /// exclusions, `all`, `none`, comma-separated; e.g. `8080:80`,
    /// `10000-10100`, `1-1024,~22`.
    #[arg(short = 't', long = "tcp-ports", value_name = "SPEC")]
    pub tcp_ports: Vec<String>,

    /// Forward host UDP ports to the guest, same syntax as `--tcp-ports`.
    #[arg(short = 'u', long = "udp-ports", value_name = "SPEC")]
    pub udp_ports: Vec<String>,

    /// Do not hold the forwarded ports with sockets: a host process may
    /// then bind one, but never sees the connections forwarded to the
    /// guest. For a network namespace that belongs to the guest alone
    /// (a VM pod; the node agent's default), where `-t all` would
    /// otherwise hold tens of thousands of sockets.
    #[arg(long)]
    pub no_reserve_ports: bool,

    /// Pin the datapath under bpffs and leave it running when tapgate is
    /// stopped by SIGINT/SIGTERM: a new `tapgate run --keep-datapath` on
    /// the same tap adopts it, and established flows never stop. (A
    /// datapath left pinned is adopted by any later `tapgate run` on the
    /// tap; without this flag that one removes it at exit.)
    #[arg(long)]
    pub keep_datapath: bool,

    /// The bpffs directory `--keep-datapath` pins under (default
    /// `/sys/fs/bpf/tapgate/netns-INODE/TAP`).
    #[arg(long, value_name = "DIR")]
    pub pin_dir: Option<PathBuf>,

    /// Serve Prometheus metrics (`/metrics`, and `/healthz`) over HTTP on
    /// this address, e.g. `127.0.0.1:9465`.
    #[arg(long, value_name = "ADDR:PORT")]
    pub metrics: Option<std::net::SocketAddr>,
}

impl RunArgs {
    /// The forwarding rules of `-t` and `-u`, in one table; `ephemeral` is
    /// the host's ephemeral port range (left out of `all`).
    pub fn forwards(&self, ephemeral: PortRange) -> Result<FwdTable, SpecError> {
        let mut table = FwdTable::new();
        for (proto, specs) in [(Proto::Tcp, &self.tcp_ports), (Proto::Udp, &self.udp_ports)] {
            for spec in specs {
                table.add_spec(proto, spec, ephemeral)?;
            }
        }
        Ok(table)
    }

    /// The control socket's path: `--control-socket`, or the default for
    /// the tap.
    pub fn control_socket_path(&self) -> PathBuf {
        self.control_socket
            .clone()
            .unwrap_or_else(|| control::default_socket_path(&self.tap))
    }
}

/// Arguments of `tapgate stats` and `tapgate flows`.
#[derive(Debug, Args)]
pub struct QueryArgs {
    /// Print the daemon's JSON document (pretty-printed) instead of text.
    #[arg(long)]
    pub json: bool,

    /// Which daemon to ask.
    #[command(flatten)]
    pub target: ControlTarget,
}

/// Which daemon a query goes to: by tap (its default control socket) or by
/// socket path. Exactly one is required.
#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub struct ControlTarget {
    /// The tap the daemon serves (its control socket is
    /// /run/tapgate/TAP.sock, or /run/tapgate/netns-INODE/TAP.sock outside the
    /// host's initial network namespace).
    #[arg(long, value_name = "TAP", value_parser = parse_ifname)]
    pub tap: Option<String>,

    /// The daemon's control socket (as given to `tapgate run
    /// --control-socket`).
    #[arg(long, value_name = "PATH")]
    pub control_socket: Option<PathBuf>,
}

impl ControlTarget {
    /// The control socket to connect to.
    pub fn socket_path(&self) -> PathBuf {
        match (&self.control_socket, &self.tap) {
            (Some(path), _) => path.clone(),
            (None, Some(tap)) => control::default_socket_path(tap),
            // clap requires one of the two; fall back to the usual tap.
            (None, None) => control::default_socket_path("tap0"),
        }
    }
}

/// Parses an interface name (1-15 bytes, no `/`, whitespace or `:`, not
/// `.` or `..`), as the kernel accepts them.
pub fn parse_ifname(s: &str) -> Result<String, String> {
    let ok = (1..=15).contains(&s.len())
        && s != "."
        && s != ".."
        && !s.chars().any(|c| c == '/' || c == ':' || c.is_whitespace());
    if ok {
        Ok(s.to_owned())
    } else {
        Err(format!("\"{s}\" is not an interface name"))
    }
}

/// A combination of arguments that makes no sense.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ConfigError {
    /// The guest address is not a usable host address in its subnet.
    #[error("--address {0}/{1}: not a usable host address in its subnet")]
    GuestAddress(Ipv4Addr, u8),
    /// Prefix too long to hold guest, gateway and DNS addresses.
    #[error("--address: prefix length /{0} leaves no room for a gateway (use /1 to /30)")]
    Prefix(u8),
    /// Gateway or DNS outside the guest subnet, or clashing.
    #[error("--{flag} {addr}: must be a host address in {net}/{prefix}, other than the guest's")]
    OutsideSubnet {
        /// Which flag.
        flag: &'static str,
        /// Its value.
        addr: Ipv4Addr,
        /// The subnet.
        net: Ipv4Addr,
        /// Its prefix length.
        prefix: u8,
    },
}

/// An IPv6 address setting that makes no sense.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum Config6Error {
    /// The prefix is too short or too long.
    #[error("--address6: prefix length /{0} is not usable (use /8 to /126; SLAAC needs /64)")]
    Prefix(u8),
    /// The guest address is not a global or unique-local unicast address.
    #[error("--address6 {0}: not a unicast address outside fe80::/10")]
    GuestAddress(Ipv6Addr),
    /// Gateway or DNS outside the prefix, or clashing.
    #[error("--{flag} {addr}: must be a unicast address in {prefix}/{len}, other than the guest's")]
    OutsidePrefix {
        /// Which flag.
        flag: &'static str,
        /// Its value.
        addr: Ipv6Addr,
        /// The prefix.
        prefix: Ipv6Addr,
        /// Its length.
        len: u8,
    },
}

impl RunArgs {
    /// Checks the IPv6 addresses against each other and builds the guest's
    /// IPv6 configuration; `None` with `--no-ipv6`.
    pub fn guest_config6(&self) -> Result<Option<config::GuestNet6Config>, Config6Error> {
        if self.no_ipv6 {
            return Ok(None);
        }
        let (guest_addr, len) = self.address6;
        if !(8..=126).contains(&len) {
            return Err(Config6Error::Prefix(len));
        }
        let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
        let prefix = Ipv6Addr::from(u128::from(guest_addr) & mask);
        let usable = |ip: Ipv6Addr| {
            !ip.is_multicast()
                && !ip.is_unspecified()
                && !ip.is_loopback()
                && !ip.is_unicast_link_local()
                && u128::from(ip) & !mask != 0
        };
        if !usable(guest_addr) {
            return Err(Config6Error::GuestAddress(guest_addr));
        }
        for (flag, addr) in [("gateway6", self.gateway6), ("dns6", self.dns6)] {
            if !usable(addr) || u128::from(addr) & mask != u128::from(prefix) || addr == guest_addr
            {
                return Err(Config6Error::OutsidePrefix {
                    flag,
                    addr,
                    prefix,
                    len,
                });
            }
        }
        Ok(Some(config::GuestNet6Config {
            prefix,
            prefix_len: len,
            gateway: self.gateway6,
            router_ll: config::link_local_of(self.mac),
            dns: self.dns6,
            guest_addr,
            gateway_mac: self.mac,
            mtu: 1500,
            search: self.dns_search.clone(),
            lease_secs: self.dhcp_lease,
        }))
    }

    /// Checks the addresses against each other and builds the guest
    /// configuration (the MTU is filled in from the tap later).
    pub fn guest_config(&self) -> Result<GuestNetConfig, ConfigError> {
        let (guest_addr, prefix_len) = self.address;
        if !(1..=30).contains(&prefix_len) {
            return Err(ConfigError::Prefix(prefix_len));
        }
        let cfg = GuestNetConfig {
            guest_addr,
            prefix_len,
            gateway: self.gateway,
            dns: self.dns,
            gateway_mac: self.mac,
            mtu: 1500,
            lease_secs: self.dhcp_lease,
        };
        let mask = u32::from(cfg.netmask());
        let net = u32::from(guest_addr) & mask;
        let host_in_subnet = |ip: Ipv4Addr| {
            let v = u32::from(ip);
            v & mask == net && v != net && v != (net | !mask) && crate::iface::is_unicast(ip)
        };
        if !host_in_subnet(guest_addr) {
            return Err(ConfigError::GuestAddress(guest_addr, prefix_len));
        }
        for (flag, addr) in [("gateway", self.gateway), ("dns", self.dns)] {
            if !host_in_subnet(addr) || addr == guest_addr {
                return Err(ConfigError::OutsideSubnet {
                    flag,
                    addr,
                    net: Ipv4Addr::from(net),
                    prefix: prefix_len,
                });
            }
        }
        Ok(cfg)
    }
}

/// Parses `A.B.C.D/N`.
pub fn parse_cidr(s: &str) -> Result<(Ipv4Addr, u8), String> {
    let (addr, prefix) = s
        .split_once('/')
        .ok_or_else(|| format!("\"{s}\" is not ADDRESS/PREFIX (e.g. 10.0.2.15/24)"))?;
    let addr: Ipv4Addr = addr
        .parse()
        .map_err(|_| format!("\"{addr}\" is not an IPv4 address"))?;
    let prefix: u8 = prefix
        .parse()
        .ok()
        .filter(|p| *p <= 32)
        .ok_or_else(|| format!("\"{prefix}\" is not a prefix length (0-32)"))?;
    Ok((addr, prefix))
}

/// Parses `IPV6/N`.
pub fn parse_cidr6(s: &str) -> Result<(Ipv6Addr, u8), String> {
    let (addr, prefix) = s
        .split_once('/')
        .ok_or_else(|| format!("\"{s}\" is not ADDRESS/PREFIX (e.g. fd00::15/64)"))?;
    let addr: Ipv6Addr = addr
        .parse()
        .map_err(|_| format!("\"{addr}\" is not an IPv6 address"))?;
    let prefix: u8 = prefix
        .parse()
        .ok()
        .filter(|p| *p <= 128)
        .ok_or_else(|| format!("\"{prefix}\" is not a prefix length (0-128)"))?;
    Ok((addr, prefix))
}

/// Parses a DNS domain name (labels of 1 to 63 letters, digits or
/// hyphens, 253 characters at most).
pub fn parse_domain(s: &str) -> Result<String, String> {
    let name = s.trim_end_matches('.');
    let ok = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|l| {
            (1..=63).contains(&l.len())
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        });
    if ok {
        Ok(name.to_ascii_lowercase())
    } else {
        Err(format!("\"{s}\" is not a domain name"))
    }
}

/// Parses a unicast MAC address `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Result<EthernetAddress, String> {
    let mut bytes = [0u8; 6];
    let mut parts = s.split([':', '-']);
    for b in bytes.iter_mut() {
        let part = parts.next().filter(|p| p.len() == 2);
        *b = part
            .and_then(|p| u8::from_str_radix(p, 16).ok())
            .ok_or_else(|| format!("\"{s}\" is not a MAC address (aa:bb:cc:dd:ee:ff)"))?;
    }
    if parts.next().is_some() {
        return Err(format!("\"{s}\" is not a MAC address (aa:bb:cc:dd:ee:ff)"));
    }
    let mac = EthernetAddress(bytes);
    if !mac.is_unicast() {
        return Err(format!("\"{s}\" is not a unicast MAC address"));
    }
    Ok(mac)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn run_args(extra: &[&str]) -> Result<RunArgs, clap::Error> {
        let mut argv = vec!["tapgate", "run", "--tap", "tap0"];
        argv.extend_from_slice(extra);
        Cli::try_parse_from(argv).map(|c| match c.command {
            Command::Run(r) => r,
            other => panic!("not a run command: {other:?}"),
        })
    }

    #[test]
    fn rules_commands() {
        let parse = |argv: &[&str]| {
            let mut v = vec!["tapgate", "rules"];
            v.extend_from_slice(argv);
            Cli::try_parse_from(v).map(|c| match c.command {
                Command::Rules(r) => r,
                other => panic!("not a rules command: {other:?}"),
            })
        };
        let r = parse(&["list", "--tap", "tap0", "--json"]).unwrap();
        assert_eq!(r.command(), ControlCommand::Rules(RulesRequest::List));
        assert!(r.query().json);
        let r = parse(&["add", "-t", "8080:80", "--tap", "tap0"]).unwrap();
        assert_eq!(
            r.command(),
            ControlCommand::Rules(RulesRequest::Add {
                proto: Proto::Tcp,
                spec: "8080:80".into()
            })
        );
        let r = parse(&["del", "-u", "5353", "--reset-flows", "--tap", "tap0"]).unwrap();
        assert_eq!(
            r.command(),
            ControlCommand::Rules(RulesRequest::Del {
                proto: Proto::Udp,
                spec: "5353".into(),
                reset_flows: true
            })
        );
        // Exactly one SPEC, without spaces, and a target.
        assert!(parse(&["add", "--tap", "tap0"]).is_err());
        assert!(parse(&["add", "-t", "80", "-u", "80", "--tap", "tap0"]).is_err());
        assert!(parse(&["add", "-t", "80, 81", "--tap", "tap0"]).is_err());
        assert!(parse(&["add", "-t", "80"]).is_err());
    }

    #[test]
    fn forwarding_options() {
        let eph = PortRange::LINUX_EPHEMERAL;
        let r = run_args(&[]).unwrap();
        assert!(r.forwards(eph).unwrap().is_empty());
        let r = run_args(&["-t", "8080:80", "--tcp-ports", "1-1024,~22", "-u", "5353"]).unwrap();
        assert_eq!(r.tcp_ports, ["8080:80", "1-1024,~22"]);
        let t = r.forwards(eph).unwrap();
        let any = std::net::IpAddr::V4(Ipv4Addr::UNSPECIFIED);
        assert_eq!(t.lookup(Proto::Tcp, any, 8080), Some(80));
        assert_eq!(t.lookup(Proto::Tcp, any, 22), None);
        assert_eq!(t.lookup(Proto::Tcp, any, 23), Some(23));
        assert_eq!(t.lookup(Proto::Udp, any, 5353), Some(5353));
        assert_eq!(t.lookup(Proto::Udp, any, 8080), None);
        // Errors name the token; overlaps across options are caught.
        let r = run_args(&["-t", "80", "-t", "70-90"]).unwrap();
        assert!(matches!(r.forwards(eph), Err(SpecError::Overlap { .. })));
        let r = run_args(&["-u", "5353,0"]).unwrap();
        assert_eq!(
            r.forwards(eph).unwrap_err().to_string(),
            "\"0\": port 0 cannot be forwarded"
        );
    }

    #[test]
    fn defaults_are_qemus() {
        let r = run_args(&[]).unwrap();
        assert_eq!(r.uplink, "auto");
        let c = r.guest_config().unwrap();
        assert_eq!(c, GuestNetConfig::default());
    }

    #[test]
    fn custom_subnet() {
        let r = run_args(&[
            "--address",
            "192.168.77.9/24",
            "--gateway",
            "192.168.77.1",
            "--dns",
            "192.168.77.53",
        ])
        .unwrap();
        let c = r.guest_config().unwrap();
        assert_eq!(c.guest_addr, Ipv4Addr::new(192, 168, 77, 9));
        assert_eq!(c.gateway, Ipv4Addr::new(192, 168, 77, 1));
    }

    #[test]
    fn bad_values_are_errors() {
        for args in [
            &["--address", "10.0.2.15"][..],
            &["--address", "10.0.2.300/24"],
            &["--address", "10.0.2.15/33"],
            &["--gateway", "nope"],
            &["--mac", "01:00:5e:00:00:01"],
            &["--mac", "52:55:0a:00:02"],
            &["--mac", "52:55:0a:00:02:02:03"],
            &["--dhcp-lease", "1"],
            &["--log-level", "loud"],
        ] {
            assert!(run_args(args).is_err(), "{args:?} accepted");
        }
        assert!(Cli::try_parse_from(["tapgate", "run"]).is_err());
    }

    #[test]
    fn inconsistent_addresses_are_errors() {
        let cases: [(&[&str], &str); 5] = [
            (&["--gateway", "10.0.3.2"], "--gateway 10.0.3.2"),
            (&["--dns", "10.0.2.15"], "--dns 10.0.2.15"),
            (&["--address", "10.0.2.0/24"], "--address 10.0.2.0/24"),
            (&["--address", "10.0.2.255/24"], "--address 10.0.2.255/24"),
            (&["--address", "10.0.2.15/31"], "/31"),
        ];
        for (args, needle) in cases {
            let e = run_args(args).unwrap().guest_config().unwrap_err();
            assert!(e.to_string().contains(needle), "{e} lacks {needle}");
        }
    }

    #[test]
    fn control_socket_paths() {
        let r = run_args(&[]).unwrap();
        assert_eq!(
            r.control_socket_path(),
            control::default_socket_path("tap0")
        );
        let r = run_args(&["--control-socket", "/tmp/x.sock"]).unwrap();
        assert_eq!(r.control_socket_path(), PathBuf::from("/tmp/x.sock"));
    }

    fn query_args(argv: &[&str]) -> Result<(bool, QueryArgs), clap::Error> {
        Cli::try_parse_from(argv).map(|c| match c.command {
            Command::Stats(q) => (true, q),
            Command::Flows(q) => (false, q),
            other => panic!("not a query: {other:?}"),
        })
    }

    #[test]
    fn query_commands() {
        let (stats, q) = query_args(&["tapgate", "stats", "--tap", "tap7"]).unwrap();
        assert!(stats && !q.json);
        assert_eq!(q.target.socket_path(), control::default_socket_path("tap7"));
        let (stats, q) = query_args(&[
            "tapgate",
            "flows",
            "--json",
            "--control-socket",
            "/tmp/c.sock",
        ])
        .unwrap();
        assert!(!stats && q.json);
        assert_eq!(q.target.socket_path(), PathBuf::from("/tmp/c.sock"));
        // Exactly one of --tap and --control-socket.
        for argv in [
            &["tapgate", "stats"][..],
            &["tapgate", "flows", "--tap", "a", "--control-socket", "/x"],
            &["tapgate", "stats", "--tap", "../etc"],
            &["tapgate", "stats", "--tap", ""],
        ] {
            assert!(query_args(argv).is_err(), "{argv:?} accepted");
        }
    }

    #[test]
    fn mac_parsing() {
        assert_eq!(
            parse_mac("02:AA:bb:cc:dd:ee").unwrap(),
            EthernetAddress([2, 0xaa, 0xbb, 0xcc, 0xdd, 0xee])
        );
        assert!(parse_mac("02:aa:bb:cc:dd:e").is_err());
        assert!(parse_mac("").is_err());
    }
}
