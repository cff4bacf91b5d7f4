//! Port forwarding rules: passt's `-t SPEC` / `-u SPEC` syntax and the one
//! rule table both protocols share.
//!
//! # Theory of operation
//!
//! A forwarding rule says "a connection (TCP) or datagram (UDP) from the
//! world to host port `P` goes to guest port `P - first + to`". Following the
//! fwd seed (passt's "Unify TCP and UDP forwarding tables"), there is a
//! single [`FwdTable`] per source side, and the protocol is a field of each
//! [`Rule`] rather than a reason to keep two tables: every consumer (the
//! socket reservations, the uplink program's port map, the flow manager's
//! lookup) walks the same list.
//!
//! The command line gives one SPEC per `-t` (TCP) or `-u` (UDP) option,
//! repeatable. A SPEC is a comma-separated list of items:
//!
//! * `[ADDR[%IFACE]/]FIRST[-LAST][:TOFIRST[-TOLAST]]`: forward host ports
//!   `FIRST..=LAST` (to the same ports, or to `TOFIRST..`). `TOLAST`, if
//!   given, must make the target range as long as the source range. `ADDR`
//!   restricts the rule to connections addressed to that host address;
//!   `IFACE` is kept with the rule (for binding the reservation to a
//!   device).
//! * `~FIRST[-LAST]`: exclude those host ports from every range of *this*
//!   SPEC (exclusions never reach into other options).
//! * `all`: every port outside the host's ephemeral range (the range the
//!   host picks its own outgoing ports from, which a forward would collide
//!   with); may be combined with exclusions.
//! * `none`: nothing; must stand alone.
//!
//! A SPEC made only of exclusions means "all but": `-t ~22` is `all,~22`.
//!
//! Exclusions are resolved when the SPEC is parsed: each range is cut into
//! the contiguous blocks that survive, each block a [`Rule`] keeping its
//! offset to the target range. The table therefore holds only positive,
//! non-overlapping rules and [`FwdTable::lookup`] is a plain scan. Two rules
//! that would claim the same protocol, port and address (whether in one
//! SPEC or in two options) are an error naming both tokens, so a lookup is
//! never ambiguous.
//!
//! Parsing is pure: the host's ephemeral range is an argument
//! ([`host_ephemeral_range`] reads the real one), so the parser's tests do
//! not depend on the machine.
//!
//! **Both families.** A rule's address may be IPv4 or IPv6; a rule
//! without one forwards the port on every address of the host of either
//! family. Its IPv6 openings go to the guest's current IPv6 address (see
//! `flow::inbound`).
//!
//! **The ports are really ours.** The kernel fast path never consults the
//! host's socket tables, so a forwarded port must be taken in the host's
//! own eyes: at startup [`PortReservations::reserve`] creates one socket
//! per forwarded (protocol, address, port), `bind`s it without listening
//! (as the NAT ports are held, see `flow::ports`) and keeps it for the
//! daemon's life. A rule without an address holds each port twice: on
//! `0.0.0.0` and on `[::]` with `IPV6_V6ONLY`, so the port is taken on
//! both families and neither socket stands in the other's way; a rule for
//! an IPv6 address holds it on that address (`IPV6_V6ONLY` too). A port
//! the host already uses on either family fails a `bind`, which is a
//! startup error naming the port and the rule; while tapgate runs, no host
//! process can bind the port. (A host without IPv6 support at all, where
//! no `AF_INET6` socket can be made, holds the IPv4 side only.) A TCP
//! segment that reaches the host stack for such a port (one that neither
//! matches a flow nor opens one) is answered by the host kernel with an
//! RST, as for a closed port.
//!
//! At runtime (`tapgate rules add|del`) a change is prepared first
//! ([`FwdTable::prepare_add`]: parsed and checked for overlaps;
//! [`FwdTable::prepare_remove`]: the rules a SPEC stands for, each of which
//! must be in the table exactly), its ports reserved or released
//! ([`PortReservations::add`], [`PortReservations::release`]), and only
//! then applied, so a refused change leaves everything as it was. Each rule
//! counts the flows opened through it ([`FwdTable::hit`]).
//!
//! The uplink program learns the forwarded ports from a trie keyed by
//! (family, address, protocol, port prefix), filled by
//! `kernel::maps::KernelFwdPorts` from the rules and the host's addresses
//! ([`host_addrs`]; [`FwdTable::kernel_keys`] lists the same ports one by
//! one); the flow manager maps each new inbound connection to its guest
//! port with [`FwdTable::lookup`], for either family.

use std::{
    collections::HashMap,
    fmt, fs, io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddrV4, SocketAddrV6},
    os::fd::{AsRawFd, OwnedFd},
};

use datapath_common::{PROTO_TCP, PROTO_UDP};
use nix::{
    errno::Errno,
    sys::socket::{
        AddressFamily, SockFlag, SockType, SockaddrIn, SockaddrIn6, bind, setsockopt, socket,
        sockopt,
    },
};
use thiserror::Error;

/// The transport protocol a rule forwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Proto {
    /// TCP (`-t`).
    Tcp,
    /// UDP (`-u`).
    Udp,
}

impl Proto {
    /// The IP protocol number.
    pub fn ip_proto(self) -> u8 {
        match self {
            Proto::Tcp => PROTO_TCP,
            Proto::Udp => PROTO_UDP,
        }
    }

    /// The protocol for an IP protocol number, if it is one we forward.
    pub fn from_ip_proto(proto: u8) -> Option<Self> {
        match proto {
            PROTO_TCP => Some(Proto::Tcp),
            PROTO_UDP => Some(Proto::Udp),
            _ => None,
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        })
    }
}

/// An inclusive range of ports, `first <= last`, neither 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PortRange {
    /// First port of the range.
    pub first: u16,
    /// Last port of the range (inclusive).
    pub last: u16,
}

impl PortRange {
    /// Linux's default ephemeral range (`net.ipv4.ip_local_port_range`).
    pub const LINUX_EPHEMERAL: PortRange = PortRange {
        first: 32768,
        last: 60999,
    };

    /// Whether `port` is in the range.
    pub fn contains(&self, port: u16) -> bool {
        (self.first..=self.last).contains(&port)
    }

    /// How many ports the range holds.
    pub fn len(&self) -> u32 {
        u32::from(self.last) - u32::from(self.first) + 1
    }

    /// Always false: a range holds at least one port.
    pub fn is_empty(&self) -> bool {
        false
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}-{}", self.first, self.last)
        }
    }
}

/// One forwarding rule: host ports `host` of protocol `proto` go to guest
/// ports starting at `to_first`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// The protocol forwarded.
    pub proto: Proto,
    /// Only connections to this host address, or any if `None`.
    pub addr: Option<IpAddr>,
    /// The device the reservation is bound to, if any.
    pub iface: Option<String>,
    /// The host ports forwarded.
    pub host: PortRange,
    /// The guest port `host.first` maps to; the rest follow in order.
    pub to_first: u16,
    /// The SPEC item the rule came from (for errors and listings).
    pub token: String,
}

impl Rule {
    /// The guest port for host port `port`, if the rule covers it.
    pub fn map(&self, port: u16) -> Option<u16> {
        if !self.host.contains(port) {
            return None;
        }
        // Parsing guarantees `to_first + len - 1 <= 65535`.
        Some(self.to_first + (port - self.host.first))
    }

    /// The guest ports the rule forwards to.
    pub fn guest(&self) -> PortRange {
        PortRange {
            first: self.to_first,
            last: self.to_first + (self.host.last - self.host.first),
        }
    }

    /// Whether an address restriction lets a connection to `addr` match.
    fn matches_addr(&self, addr: IpAddr) -> bool {
        self.addr.is_none_or(|a| a == addr)
    }

    /// Whether two rules forward the same ports the same way.
    fn same_mapping(&self, other: &Rule) -> bool {
        self.proto == other.proto
            && self.addr == other.addr
            && self.host == other.host
            && self.to_first == other.to_first
    }

    /// Whether two rules could both match some packet.
    fn overlaps(&self, other: &Rule) -> bool {
        self.proto == other.proto
            && self.host.first <= other.host.last
            && other.host.first <= self.host.last
            && (self.addr.is_none() || other.addr.is_none() || self.addr == other.addr)
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ", self.proto)?;
        if let Some(addr) = self.addr {
            write!(f, "{addr}")?;
            if let Some(iface) = &self.iface {
                write!(f, "%{iface}")?;
            }
            f.write_str("/")?;
        }
        write!(f, "{} -> {}", self.host, self.guest())
    }
}

/// Why a SPEC was refused. Every variant names the offending item.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SpecError {
    /// The SPEC is the empty string.
    #[error("empty port specification")]
    Empty,
    /// An item between commas is empty (`80,,81`, `80,`).
    #[error("{spec:?}: empty item in port specification")]
    EmptyItem {
        /// The whole SPEC.
        spec: String,
    },
    /// A port is not a decimal number.
    #[error("{token:?}: {text:?} is not a port number")]
    BadNumber {
        /// The item.
        token: String,
        /// The part that is not a number.
        text: String,
    },
    /// Port 0.
    #[error("{token:?}: port 0 cannot be forwarded")]
    PortZero {
        /// The item.
        token: String,
    },
    /// A port above 65535.
    #[error("{token:?}: port {text} is out of range (1-65535)")]
    TooLarge {
        /// The item.
        token: String,
        /// The number as written.
        text: String,
    },
    /// `LAST < FIRST`.
    #[error("{token:?}: range {first}-{last} is reversed")]
    Reversed {
        /// The item.
        token: String,
        /// First port as written.
        first: u16,
        /// Last port as written.
        last: u16,
    },
    /// The target range has a different length from the source range.
    #[error("{token:?}: {from} ports cannot map to {to} ports")]
    LengthMismatch {
        /// The item.
        token: String,
        /// Length of the host range.
        from: u32,
        /// Length of the target range.
        to: u32,
    },
    /// `TOFIRST` plus the range's length runs past 65535.
    #[error("{token:?}: target range runs past port 65535")]
    TargetOverflow {
        /// The item.
        token: String,
    },
    /// The part before `/` is not an IP address.
    #[error("{token:?}: {text:?} is not an IP address")]
    BadAddress {
        /// The item.
        token: String,
        /// The address as written.
        text: String,
    },
    /// The part after `%` is not an interface name.
    #[error("{token:?}: {text:?} is not an interface name")]
    BadIface {
        /// The item.
        token: String,
        /// The name as written.
        text: String,
    },
    /// An exclusion with an address or a target (`~1.2.3.4/22`, `~22:23`).
    #[error("{token:?}: an exclusion is only ports, FIRST[-LAST]")]
    BadExclusion {
        /// The item.
        token: String,
    },
    /// A word that is not `all` or `none`.
    #[error("{token:?}: unknown word (expected a port, a range, \"all\" or \"none\")")]
    UnknownWord {
        /// The item.
        token: String,
    },
    /// `none` together with anything else.
    #[error("{token:?}: \"none\" must be the whole specification")]
    NoneNotAlone {
        /// The item.
        token: String,
    },
    /// `all` together with explicit ranges.
    #[error("{token:?}: \"all\" can only be combined with exclusions")]
    AllWithRanges {
        /// The item.
        token: String,
    },
    /// The exclusions leave nothing to forward (`22,~22`).
    #[error("{spec:?}: the exclusions leave no port to forward")]
    NothingLeft {
        /// The whole SPEC.
        spec: String,
    },
    /// `rules del` of a SPEC whose rules are not all in the table.
    #[error("{token:?}: there is no rule {rule} to remove")]
    NotForwarded {
        /// The item.
        token: String,
        /// The protocol.
        proto: Proto,
        /// The rule that is not there.
        rule: String,
    },
    /// Two rules claim the same port.
    #[error("{token:?}: {proto} port {port} is already forwarded by {other:?}")]
    Overlap {
        /// The new item.
        token: String,
        /// The item of the rule already in the table.
        other: String,
        /// The protocol.
        proto: Proto,
        /// The first port both claim.
        port: u16,
    },
}

/// One parsed forwarding item before exclusions are applied.
struct Item {
    addr: Option<IpAddr>,
    iface: Option<String>,
    host: PortRange,
    to_first: u16,
    token: String,
}

/// The forwarding rules of one source side (today: the world, towards the
/// guest), TCP and UDP together.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FwdTable {
    rules: Vec<Rule>,
    /// Flows opened through each rule (same index as `rules`).
    hits: Vec<u64>,
}

impl FwdTable {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Parses one `-t`/`-u` SPEC for `proto` and adds its rules; on error
    /// the table is unchanged. `ephemeral` is the host's ephemeral port
    /// range, left out of `all` and of exclusion-only specs.
    pub fn add_spec(
        &mut self,
        proto: Proto,
        spec: &str,
        ephemeral: PortRange,
    ) -> Result<(), SpecError> {
        let new = self.prepare_add(proto, spec, ephemeral)?;
        self.insert(new);
        Ok(())
    }

    /// The rules `add_spec` would add, checked against the table (no
    /// change): for a caller that must reserve their ports first.
    pub fn prepare_add(
        &self,
        proto: Proto,
        spec: &str,
        ephemeral: PortRange,
    ) -> Result<Vec<Rule>, SpecError> {
        let new = parse_spec(proto, spec, ephemeral)?;
        for (i, rule) in new.iter().enumerate() {
            let clash = self
                .rules
                .iter()
                .chain(&new[..i])
                .find(|r| r.overlaps(rule));
            if let Some(other) = clash {
                return Err(SpecError::Overlap {
                    token: rule.token.clone(),
                    other: other.token.clone(),
                    proto,
                    port: rule.host.first.max(other.host.first),
                });
            }
        }
        Ok(new)
    }

    /// Appends rules from [`FwdTable::prepare_add`] (hit counters at 0).
    pub fn insert(&mut self, rules: Vec<Rule>) {
        self.hits.extend(rules.iter().map(|_| 0));
        self.rules.extend(rules);
    }

    /// The rules a SPEC stands for, each of which must be in the table
    /// exactly (same protocol, address, ports and target): what
    /// [`FwdTable::remove`] takes away for `rules del` with the SPEC that
    /// added them. No change to the table.
    pub fn prepare_remove(
        &self,
        proto: Proto,
        spec: &str,
        ephemeral: PortRange,
    ) -> Result<Vec<Rule>, SpecError> {
        let gone = parse_spec(proto, spec, ephemeral)?;
        for rule in &gone {
            if !self.rules.iter().any(|r| r.same_mapping(rule)) {
                return Err(SpecError::NotForwarded {
                    token: rule.token.clone(),
                    proto,
                    rule: rule.to_string(),
                });
            }
        }
        Ok(gone)
    }

    /// Removes the rules with the same mappings as `rules`.
    pub fn remove(&mut self, rules: &[Rule]) {
        let mut i = 0;
        while i < self.rules.len() {
            if rules.iter().any(|g| g.same_mapping(&self.rules[i])) {
                self.rules.remove(i);
                self.hits.remove(i);
            } else {
                i += 1;
            }
        }
    }

    /// The guest port for a `proto` packet to host address `addr`, port
    /// `port`, or `None` if no rule forwards it.
    pub fn lookup(&self, proto: Proto, addr: IpAddr, port: u16) -> Option<u16> {
        self.rule_for(proto, addr, port)?.map(port)
    }

    /// [`FwdTable::lookup`] that also counts a hit on the rule (call it
    /// once the inbound flow exists).
    pub fn hit(&mut self, proto: Proto, addr: IpAddr, port: u16) -> Option<u16> {
        let i = self
            .rules
            .iter()
            .position(|r| r.proto == proto && r.host.contains(port) && r.matches_addr(addr))?;
        if let Some(h) = self.hits.get_mut(i) {
            *h += 1;
        }
        self.rules.get(i)?.map(port)
    }

    /// The rules with the flows each has opened so far.
    pub fn rules_with_hits(&self) -> impl Iterator<Item = (&Rule, u64)> + '_ {
        self.rules.iter().zip(self.hits.iter().copied())
    }

    /// The rule that forwards a `proto` packet to `addr`:`port`, if any.
    pub fn rule_for(&self, proto: Proto, addr: IpAddr, port: u16) -> Option<&Rule> {
        self.rules
            .iter()
            .find(|r| r.proto == proto && r.host.contains(port) && r.matches_addr(addr))
    }

    /// Whether some rule forwards `proto` port `port` (on any address).
    pub fn forwards(&self, proto: Proto, port: u16) -> bool {
        self.rules
            .iter()
            .any(|r| r.proto == proto && r.host.contains(port))
    }

    /// The rules, in the order they were added.
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// Whether the table forwards nothing.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Every (protocol, host address, host port) the uplink program must
    /// punt openings for, of both families; a rule without an address
    /// gives each port twice, with `0.0.0.0` and with `::` (standing for
    /// every host address of that family).
    pub fn kernel_keys(&self) -> impl Iterator<Item = (Proto, IpAddr, u16)> + '_ {
        kernel_keys(&self.rules)
    }

    /// How many (protocol, address, port) the table forwards, a rule
    /// without an address counted once per family: the number of
    /// [`FwdTable::kernel_keys`], and of the sockets
    /// [`PortReservations`] holds for the table.
    pub fn port_count(&self) -> usize {
        self.rules
            .iter()
            .map(|r| r.host.len() as usize * rule_addrs(r).len())
            .sum()
    }
}

/// The addresses a rule's ports are keyed and held on: its own, or the
/// unspecified address of each family for a rule without one.
fn rule_addrs(rule: &Rule) -> Vec<IpAddr> {
    match rule.addr {
        Some(a) => vec![a],
        None => vec![
            IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        ],
    }
}

/// Every (protocol, host address, host port) of `rules`, of both
/// families; a rule without an address gives each port with `0.0.0.0`
/// and with `::`.
pub fn kernel_keys(rules: &[Rule]) -> impl Iterator<Item = (Proto, IpAddr, u16)> + '_ {
    rules.iter().flat_map(|r| {
        rule_addrs(r)
            .into_iter()
            .flat_map(move |a| (r.host.first..=r.host.last).map(move |p| (r.proto, a, p)))
    })
}

/// The host's addresses that rules without an address forward on: every
/// address of the host's interfaces, IPv4 and, if `ipv6` (the guest has
/// IPv6), IPv6. (`kernel::maps::published_host_addrs` then leaves out
/// loopback, link-local IPv6 and the like.)
pub fn host_addrs(ipv6: bool) -> io::Result<Vec<IpAddr>> {
    let mut addrs = crate::flow::policy::system_host_ips()?;
    addrs.retain(|a| ipv6 || a.is_ipv4());
    Ok(addrs)
}

/// The host's ephemeral port range (`net.ipv4.ip_local_port_range`), or
/// Linux's default if it cannot be read.
pub fn host_ephemeral_range() -> PortRange {
    let parsed = fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            let mut it = s.split_whitespace().map(|w| w.parse::<u16>().ok());
            let (first, last) = (it.next()??, it.next()??);
            (first >= 1 && first <= last).then_some(PortRange { first, last })
        });
    parsed.unwrap_or(PortRange::LINUX_EPHEMERAL)
}

/// Why the forwarded ports could not be reserved.
#[derive(Debug, Error)]
pub enum ReserveError {
    /// The host already uses the port.
    #[error(
        "{proto} port {port} is already in use on the host (forwarded by \"{token}\"): \
         stop whatever uses it or leave it out with ~{port}"
    )]
    InUse {
        /// The protocol.
        proto: Proto,
        /// The port.
        port: u16,
        /// The SPEC item of the rule.
        token: String,
    },
    /// The rule's address is not one of the host's.
    #[error(
        "{proto} port {port}: {addr} is not an address of this host (forwarded by \"{token}\")"
    )]
    NotLocal {
        /// The protocol.
        proto: Proto,
        /// The port.
        port: u16,
        /// The address.
        addr: IpAddr,
        /// The SPEC item of the rule.
        token: String,
    },
    /// A system call failed.
    #[error("{proto} port {port}: {op}: {source}")]
    Os {
        /// The protocol.
        proto: Proto,
        /// The port.
        port: u16,
        /// What was being done.
        op: &'static str,
        /// The OS error.
        #[source]
        source: Errno,
    },
}

/// The sockets that hold every forwarded port for as long as they live
/// (see the module documentation), keyed by (protocol, address, port): a
/// rule without an address holds its ports on `0.0.0.0` and on `::`.
#[derive(Debug, Default)]
pub struct PortReservations {
    sockets: HashMap<(Proto, IpAddr, u16), OwnedFd>,
}

impl PortReservations {
    /// Binds one socket per (protocol, address, port) of `table`; the first
    /// port that cannot be had is the error (everything bound so far is
    /// released).
    pub fn reserve(table: &FwdTable) -> Result<Self, ReserveError> {
        let mut held = Self::default();
        held.add(table.rules())?;
        Ok(held)
    }

    /// Reserves the ports of `rules` too; on error nothing of `rules` is
    /// kept.
    pub fn add(&mut self, rules: &[Rule]) -> Result<(), ReserveError> {
        let mut new = HashMap::new();
        for rule in rules {
            for addr in rule_addrs(rule) {
                for port in rule.host.first..=rule.host.last {
                    match reserve_one(rule, addr, port) {
                        Ok(fd) => {
                            new.insert((rule.proto, addr, port), fd);
                        }
                        // No IPv6 on this host at all: the wildcard's
                        // IPv6 side has nothing to hold.
                        Err(ReserveError::Os {
                            source: Errno::EAFNOSUPPORT,
                            ..
                        }) if rule.addr.is_none() && addr.is_ipv6() => {
                            log::debug!(
                                "fwd: no IPv6 on this host: {} port {port} held on IPv4 only",
                                rule.proto
                            );
                            break;
                        }
                        Err(e) => return Err(e),
                    }
                }
            }
        }
        self.sockets.extend(new);
        Ok(())
    }

    /// Releases the ports of `rules` (the host may use them again).
    pub fn release(&mut self, rules: &[Rule]) {
        for rule in rules {
            for addr in rule_addrs(rule) {
                for port in rule.host.first..=rule.host.last {
                    self.sockets.remove(&(rule.proto, addr, port));
                }
            }
        }
    }

    /// How many sockets are held.
    pub fn len(&self) -> usize {
        self.sockets.len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.sockets.is_empty()
    }
}

/// Binds (without listening) a socket on `addr`:`port` for `rule`: an
/// `AF_INET` socket for an IPv4 address, an `AF_INET6` one with
/// `IPV6_V6ONLY` for an IPv6 address (`::` included, which then holds the
/// port on IPv6 only, beside the `0.0.0.0` socket). A link-local IPv6
/// address is bound on the rule's interface, if it names one.
fn reserve_one(rule: &Rule, addr: IpAddr, port: u16) -> Result<OwnedFd, ReserveError> {
    let proto = rule.proto;
    let os = |op| {
        move |source| ReserveError::Os {
            proto,
            port,
            op,
            source,
        }
    };
    let ty = match proto {
        Proto::Tcp => SockType::Stream,
        Proto::Udp => SockType::Datagram,
    };
    let family = match addr {
        IpAddr::V4(_) => AddressFamily::Inet,
        IpAddr::V6(_) => AddressFamily::Inet6,
    };
    let fd = socket(family, ty, SockFlag::SOCK_CLOEXEC, None).map_err(os("socket"))?;
    if addr.is_ipv6() {
        setsockopt(&fd, sockopt::Ipv6V6Only, &true).map_err(os("IPV6_V6ONLY"))?;
    }
    if let Some(iface) = &rule.iface {
        setsockopt(&fd, sockopt::BindToDevice, &std::ffi::OsString::from(iface))
            .map_err(os("SO_BINDTODEVICE"))?;
    }
    if proto == Proto::Udp {
        // Nothing reads it (openings are punted before the stack sees
        // them): keep what strays into it small.
        if let Err(e) = setsockopt(&fd, sockopt::RcvBuf, &0) {
            log::debug!("fwd: shrinking udp port {port}'s receive buffer: {e}");
        }
    }
    let bound = match addr {
        IpAddr::V4(a) => bind(
            fd.as_raw_fd(),
            &SockaddrIn::from(SocketAddrV4::new(a, port)),
        ),
        IpAddr::V6(a) => {
            let scope = match &rule.iface {
                Some(iface) if a.is_unicast_link_local() => {
                    nix::net::if_::if_nametoindex(iface.as_str()).map_err(os("if_nametoindex"))?
                }
                _ => 0,
            };
            bind(
                fd.as_raw_fd(),
                &SockaddrIn6::from(SocketAddrV6::new(a, port, 0, scope)),
            )
        }
    };
    match bound {
        Ok(()) => Ok(fd),
        Err(Errno::EADDRINUSE) => Err(ReserveError::InUse {
            proto,
            port,
            token: rule.token.clone(),
        }),
        Err(Errno::EADDRNOTAVAIL) => Err(ReserveError::NotLocal {
            proto,
            port,
            addr,
            token: rule.token.clone(),
        }),
        Err(source) => Err(os("bind")(source)),
    }
}

/// Parses one SPEC into rules (exclusions applied, `all` expanded).
fn parse_spec(proto: Proto, spec: &str, ephemeral: PortRange) -> Result<Vec<Rule>, SpecError> {
    if spec.is_empty() {
        return Err(SpecError::Empty);
    }
    let tokens: Vec<&str> = spec.split(',').collect();
    if tokens.iter().any(|t| t.is_empty()) {
        return Err(SpecError::EmptyItem {
            spec: spec.to_owned(),
        });
    }

    let mut items = Vec::new();
    let mut excluded: Vec<PortRange> = Vec::new();
    let mut all: Option<&str> = None;
    for &token in &tokens {
        if token == "none" {
            if tokens.len() > 1 {
                return Err(SpecError::NoneNotAlone {
                    token: token.to_owned(),
                });
            }
            return Ok(Vec::new());
        } else if token == "all" {
            all = Some(token);
        } else if let Some(rest) = token.strip_prefix('~') {
            if rest.contains(['/', ':', '%']) {
                return Err(SpecError::BadExclusion {
                    token: token.to_owned(),
                });
            }
            excluded.push(parse_range(token, rest)?);
        } else {
            items.push(parse_item(token)?);
        }
    }

    if let (Some(_), Some(item)) = (all, items.first()) {
        return Err(SpecError::AllWithRanges {
            token: item.token.clone(),
        });
    }
    if items.is_empty() {
        // `all`, or only exclusions: every port outside the ephemeral range.
        let name = all.unwrap_or(spec);
        for host in complement(&[ephemeral]) {
            items.push(Item {
                addr: None,
                iface: None,
                host,
                to_first: host.first,
                token: name.to_owned(),
            });
        }
    }

    let mut rules = Vec::new();
    for item in items {
        for block in subtract(item.host, &excluded) {
            rules.push(Rule {
                proto,
                addr: item.addr,
                iface: item.iface.clone(),
                host: block,
                to_first: item.to_first + (block.first - item.host.first),
                token: item.token.clone(),
            });
        }
    }
    if rules.is_empty() {
        return Err(SpecError::NothingLeft {
            spec: spec.to_owned(),
        });
    }
    Ok(rules)
}

/// Parses `[ADDR[%IFACE]/]FIRST[-LAST][:TOFIRST[-TOLAST]]`.
fn parse_item(token: &str) -> Result<Item, SpecError> {
    let (prefix, ports) = match token.rsplit_once('/') {
        Some((prefix, ports)) => (Some(prefix), ports),
        None => (None, token),
    };
    let (mut addr, mut iface) = (None, None);
    if let Some(prefix) = prefix {
        let (a, i) = match prefix.split_once('%') {
            Some((a, i)) => (a, Some(i)),
            None => (prefix, None),
        };
        addr = Some(parse_addr(token, a)?);
        if let Some(i) = i {
            if i.is_empty()
                || i.len() >= libc::IFNAMSIZ
                || i.contains(|c: char| c == '/' || c.is_whitespace())
            {
                return Err(SpecError::BadIface {
                    token: token.to_owned(),
                    text: i.to_owned(),
                });
            }
            iface = Some(i.to_owned());
        }
    }
    if ports.chars().all(|c| c.is_ascii_alphabetic()) && !ports.is_empty() {
        return Err(SpecError::UnknownWord {
            token: token.to_owned(),
        });
    }
    let (from, to) = match ports.split_once(':') {
        Some((from, to)) => (from, Some(to)),
        None => (ports, None),
    };
    let host = parse_range(token, from)?;
    let to_first = match to {
        None => host.first,
        Some(to) => {
            let target = parse_range(token, to)?;
            let explicit_end = to.contains('-');
            if explicit_end && target.len() != host.len() {
                return Err(SpecError::LengthMismatch {
                    token: token.to_owned(),
                    from: host.len(),
                    to: target.len(),
                });
            }
            if u32::from(target.first) + host.len() - 1 > u32::from(u16::MAX) {
                return Err(SpecError::TargetOverflow {
                    token: token.to_owned(),
                });
            }
            target.first
        }
    };
    Ok(Item {
        addr,
        iface,
        host,
        to_first,
        token: token.to_owned(),
    })
}

/// Parses an address, IPv4 or IPv6 (optionally in brackets).
fn parse_addr(token: &str, text: &str) -> Result<IpAddr, SpecError> {
    let bare = text
        .strip_prefix('[')
        .and_then(|t| t.strip_suffix(']'))
        .unwrap_or(text);
    bare.parse::<Ipv4Addr>()
        .map(IpAddr::V4)
        .or_else(|_| bare.parse::<IpAddr>())
        .map_err(|_| SpecError::BadAddress {
            token: token.to_owned(),
            text: text.to_owned(),
        })
}

/// Parses `FIRST[-LAST]`.
fn parse_range(token: &str, text: &str) -> Result<PortRange, SpecError> {
    let (first, last) = match text.split_once('-') {
        Some((first, last)) => (first, Some(last)),
        None => (text, None),
    };
    let first = parse_port(token, first)?;
    let last = match last {
        Some(last) => parse_port(token, last)?,
        None => first,
    };
    if last < first {
        return Err(SpecError::Reversed {
            token: token.to_owned(),
            first,
            last,
        });
    }
    Ok(PortRange { first, last })
}

/// Parses one port: decimal digits only, 1 to 65535.
fn parse_port(token: &str, text: &str) -> Result<u16, SpecError> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(SpecError::BadNumber {
            token: token.to_owned(),
            text: text.to_owned(),
        });
    }
    let too_large = || SpecError::TooLarge {
        token: token.to_owned(),
        text: text.to_owned(),
    };
    if text.len() > 5 {
        return Err(too_large());
    }
    let value: u32 = text.parse().map_err(|_| too_large())?;
    match u16::try_from(value) {
        Ok(0) => Err(SpecError::PortZero {
            token: token.to_owned(),
        }),
        Ok(port) => Ok(port),
        Err(_) => Err(too_large()),
    }
}

/// The ports 1..=65535 outside every range of `holes`.
fn complement(holes: &[PortRange]) -> Vec<PortRange> {
    subtract(
        PortRange {
            first: 1,
            last: u16::MAX,
        },
        holes,
    )
}

/// The contiguous blocks of `range` outside every range of `holes`.
fn subtract(range: PortRange, holes: &[PortRange]) -> Vec<PortRange> {
    let mut out = Vec::new();
    let mut start = u32::from(range.first);
    let end = u32::from(range.last);
    let mut holes: Vec<PortRange> = holes.to_vec();
    holes.sort_by_key(|h| h.first);
    for hole in holes {
        let (hf, hl) = (u32::from(hole.first), u32::from(hole.last));
        if hl < start || hf > end {
            continue;
        }
        if hf > start {
            out.push(block(start, hf - 1));
        }
        start = start.max(hl + 1);
    }
    if start <= end {
        out.push(block(start, end));
    }
    out
}

/// A range from bounds known to be within 1..=65535.
fn block(first: u32, last: u32) -> PortRange {
    PortRange {
        first: u16::try_from(first).unwrap_or(u16::MAX),
        last: u16::try_from(last).unwrap_or(u16::MAX),
    }
}

#[cfg(test)]
mod tests;
