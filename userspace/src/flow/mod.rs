//! The user-space flow manager: new flows and TCP handshakes, half-close
//! tracking, RSTs for unknown connections, UDP expiry, the DNS forwarder
//! and the guest's access policy.
//!
//! # Theory of operation
//!
//! The kernel fast path forwards packets of flows that are in its flow map
//! and hands everything else to user space; this module decides what
//! enters the map, and when it leaves.
//!
//! * **Guest frames** ([`FlowManager::from_guest`]): the IPv4 and IPv6
//!   TCP/UDP/echo frames the gateway's own services did not take (both
//!   families take the same path; see `packet.rs` for what differs). A guest SYN (TCP) or first
//!   datagram (UDP) to a destination the [`policy`] allows gets a source
//!   address from the host's routing, a NAT port reserved against the
//!   host's own sockets ([`ports`]), a slot, and two map entries, one per
//!   direction, each with that direction's full rewrite. TCP flows start in
//!   `Handshake` (both directions punted), UDP flows as `Established`. The
//!   packet itself is translated here and sent to the world
//!   ([`Output::ToWorld`]). A TCP segment that matches no flow is answered
//!   with an RST (RFC 9293 §3.10.7.1); denied flows get an RST (TCP) or an
//!   ICMP error (UDP).
//! * **World frames** ([`FlowManager::from_world`]): packets of our flows
//!   the kernel did not forward — the handshake's SYN-ACK marks the flow
//!   `Established` in both entries and goes to the guest; an RST during the
//!   handshake goes to the guest and removes the flow. From then on the
//!   kernel forwards the flow.
//! * **Inbound forwards** (`inbound.rs`): a connection or datagram from
//!   the world to a forwarded host port ([`crate::fwd`]) is the mirror
//!   image: the kernel punts the opening (`PuntReason::Forward`), the rule
//!   table gives the guest port, and the flow is installed with the world
//!   client as `remote`/`world` (source unchanged) and the forwarded host
//!   address and port as `nat`; IPv4 and IPv6 alike, an IPv6 opening going
//!   to the guest's current IPv6 address. From there on it is an ordinary
//!   flow; only who sent the SYN differs, so the guest's SYN-ACK is what
//!   establishes it.
//! * **Host-local clients of forwarded ports** ([`FlowManager::from_host`],
//!   `inbound.rs`): a process on the host connecting to `127.0.0.1:PORT`,
//!   `[::1]:PORT` or a host address is caught by the loopback program;
//!   the flow is an inbound forward whose `remote` is the gateway's address
//!   (the guest cannot answer `127.0.0.1`) with a NAT port of its own, and
//!   whose world side is keyed in the loopback program's direction
//!   ([`table::Flow::host_client`]).
//! * **Events** ([`FlowManager::event`]): the kernel reports FINs and RSTs
//!   it forwarded (and, for flows that ask, every packet). FINs drive the
//!   half-close states of the seed PR, mirrored into both map entries
//!   (the kernel forwards in all of them, so data keeps flowing in the
//!   direction still open): `Established → FinWait` (guest closed first)
//!   `→ LastAck` (world closed too), or `Established → CloseWait` (world
//!   first) `→ LastAck`. Each FIN's end (`seq + len + 1`, the ACK that
//!   acknowledges it) is remembered. Entering `LastAck` sets
//!   [`FLOW_F_EVENTS`] on both entries so every further packet is reported,
//!   then reads both entries' `last_ack` to catch an ACK that passed before
//!   the flag was set. The flow is reaped once both FINs are acknowledged,
//!   or [`LAST_ACK_TIMEOUT`] after entering `LastAck` — never earlier. An
//!   RST (event or punted) removes the flow at once.
//! * **Timers** ([`FlowManager::tick`], about once a second): handshakes
//!   that never complete, `LastAck` timeouts, and the UDP idle scan, which
//!   reads each UDP flow's activity word every `udp_timeout / 4`, clears
//!   it, and removes flows whose `ACTIVE` bit stayed clear for
//!   `udp_timeout`. A flow therefore expires between 1× and 1.25× the
//!   timeout after its last packet (plus the tick's granularity). The
//!   tick also runs the clock algorithm (`clock.rs`): keepalives to guests
//!   idle for a `keepalive_interval`, both-sided resets of TCP flows idle
//!   for an `inactivity_interval` or whose guest answered none of
//!   `keepalive_probes` keepalives.
//!
//! Removing a flow removes both map entries, drops its NAT lease (releasing
//! the port) and frees its slot. Slots are bounded by `max_flows`, which
//! bounds all per-flow memory; when they are exhausted new TCP flows are
//! refused with an RST.
//!
//! * **ICMP** ([`icmp`]): echo requests open flows keyed by identifier
//!   (carried by the kernel from then on); ICMP errors about a flow are
//!   translated both ways, outer and quoted headers; the gateway
//!   synthesizes what a router would (time exceeded, fragmentation needed,
//!   unreachable, administratively prohibited), rate limited and counted.
//!   A packet larger than the egress MTU is fragmented when DF is clear.
//!
//! Everything from the guest is untrusted: every header is parsed with
//! smoltcp's checked views ([`packet`]), anything that does not parse or
//! that the slow path does not handle (IP options, protocols other than
//! TCP/UDP/ICMP) is counted by [`DropReason`] and dropped. A guest packet
//! whose TTL would expire gets ICMP time exceeded from the gateway.
//! Nothing here panics on input.
//!
//! The kernel maps and the NAT port reservation are behind the
//! [`FlowMaps`] and [`NatPorts`] traits, so all of this is unit-tested
//! with in-memory fakes (`tests.rs`).

pub mod adopt;
pub mod clock;
mod frag6;
pub mod icmp;
mod inbound;
pub mod packet;
pub mod policy;
pub mod ports;
pub mod resolv;
pub mod store;
pub mod table;
mod tcp;
mod udp;

#[cfg(test)]
mod tests;

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::{Duration, Instant},
};

use datapath_common::{
    ACTIVE, DEFAULT_MAX_FLOWS, FLOW_F_EVENTS, FLOW_F_LOCAL, FlowState, LOOPBACK_IFINDEX, Origin,
    PROTO_ICMP, PROTO_TCP, PROTO_UDP, PuntReason, TAP_ACTIVE,
};
use log::{debug, info, warn};
use smoltcp::wire::{ETHERNET_HEADER_LEN, EthernetAddress};

use crate::{
    config::{GuestNet6Config, GuestNetConfig},
    fwd::FwdTable,
};

pub use icmp::{IcmpCounts, IcmpKind, IcmpStats};
pub use policy::HostAddrs;
pub use ports::{NatError, NatLease, NatPorts, NoRoute, SocketPorts, raise_nofile_limit};
pub use store::{FlowMaps, MapsError};

use packet::{IcmpError, L4, Packet, PacketError};
use policy::Policy;
use table::{Addressing, Flow, FlowTable};

/// How long a flow may stay in `LastAck` waiting for the final ACK (TCP
/// MSL × 2, as in the seed PR).
pub const LAST_ACK_TIMEOUT: Duration = Duration::from_secs(60);
/// Default idle timeout of UDP flows.
pub const UDP_TIMEOUT: Duration = Duration::from_secs(180);
/// Default time a TCP handshake may take before the flow is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(75);
/// Default interval of the clock's keepalive scan (the passt seed's).
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(300);
/// Default interval of the clock's inactivity scan (the passt seed's).
pub const INACTIVITY_INTERVAL: Duration = Duration::from_secs(7200);

pub use crate::kernel::inject::Output;

/// Configuration of the flow manager.
#[derive(Debug)]
pub struct FlowConfig {
    /// The guest subnet, gateway and DNS addresses, gateway MAC, tap MTU.
    pub guest: GuestNetConfig,
    /// The guest's IPv6 prefix and the gateway's IPv6 addresses; `None`
    /// when IPv6 is off (the guest's IPv6 packets are then dropped).
    pub guest6: Option<GuestNet6Config>,
    /// The tap's interface index (egress of the world → guest entries).
    pub tap_ifindex: u32,
    /// The uplink's interface index (egress of the guest → world entries).
    pub uplink_ifindex: u32,
    /// The uplink's MTU: larger packets towards the world are fragmented,
    /// or refused with "fragmentation needed" when DF is set.
    pub uplink_mtu: u16,
    /// How long a flow stays in `LastAck` without the final ACK.
    pub last_ack_timeout: Duration,
    /// Idle timeout of UDP flows.
    pub udp_timeout: Duration,
    /// How long a TCP handshake may take.
    pub handshake_timeout: Duration,
    /// Maximum number of flows (slots of the activity array).
    pub max_flows: u32,
    /// Let the guest reach the host's own addresses (not loopback).
    pub allow_host: bool,
    /// Where the host's own addresses come from.
    pub host_addrs: HostAddrs,
    /// The upstream resolver of the DNS forwarder; `None` makes DNS
    /// unavailable. See [`resolv::resolve_upstream`].
    pub dns_upstream: Option<Ipv4Addr>,
    /// The IPv6 upstream resolver behind the IPv6 DNS address, if any.
    pub dns_upstream6: Option<Ipv6Addr>,
    /// Interval of the keepalive scan; zero turns keepalives off.
    pub keepalive_interval: Duration,
    /// Interval of the inactivity scan; zero turns inactivity resets off.
    pub inactivity_interval: Duration,
    /// Unanswered keepalives after which a flow is reset on both sides;
    /// zero turns dead-guest detection off.
    pub keepalive_probes: u32,
    /// Host ports forwarded to the guest (`-t`/`-u`).
    pub forwards: FwdTable,
}

impl FlowConfig {
    /// Defaults for everything but the subnet and the interfaces: the
    /// timeouts above, [`DEFAULT_MAX_FLOWS`], host addresses from the
    /// system, host access denied, no DNS upstream.
    pub fn new(guest: GuestNetConfig, tap_ifindex: u32, uplink_ifindex: u32) -> Self {
        Self {
            guest,
            guest6: None,
            tap_ifindex,
            uplink_ifindex,
            uplink_mtu: 1500,
            last_ack_timeout: LAST_ACK_TIMEOUT,
            udp_timeout: UDP_TIMEOUT,
            handshake_timeout: HANDSHAKE_TIMEOUT,
            max_flows: DEFAULT_MAX_FLOWS,
            allow_host: false,
            host_addrs: HostAddrs::system(),
            dns_upstream: None,
            dns_upstream6: None,
            keepalive_interval: KEEPALIVE_INTERVAL,
            inactivity_interval: INACTIVITY_INTERVAL,
            keepalive_probes: 0,
            forwards: FwdTable::new(),
        }
    }
}

/// One flow, for reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FlowInfo {
    /// "tcp", "udp" or "icmp".
    pub proto: &'static str,
    /// The guest's address and port.
    pub guest: SocketAddr,
    /// The remote as the guest sees it.
    pub remote: SocketAddr,
    /// The real destination (differs from `remote` for DNS).
    pub upstream: SocketAddr,
    /// The host address and NAT port.
    pub nat: SocketAddr,
    /// State, lower case ("handshake", "established", "fin_wait",
    /// "close_wait", "last_ack").
    pub state: &'static str,
    /// Packets the kernel forwarded, both directions.
    pub fastpath_packets: u64,
    /// Time since the flow was created.
    pub age: Duration,
    /// The flow's activity slot.
    pub slot: u32,
}

/// Why a packet was dropped.
#[repr(usize)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// A header failed to parse.
    Malformed = 0,
    /// Not an IPv4 frame.
    NotIp,
    /// IPv4 options.
    IpOptions,
    /// IPv4 fragment.
    Fragment,
    /// Neither TCP nor UDP.
    Protocol,
    /// From the guest, but not from its address (or MAC).
    BadSource,
    /// TTL would expire.
    TtlExpired,
    /// Too big for the egress MTU.
    TooBig,
    /// From the world (or an event) for no flow we know.
    UnknownFlow,
    /// An RST from the guest for no flow (RFC 9293: discarded).
    UnknownRst,
    /// `max_flows` flows exist.
    TableFull,
    /// No NAT port could be reserved.
    PortExhausted,
    /// The host has no route to the destination (net unreachable).
    NoRoute,
    /// The host's route says the destination is unreachable.
    HostUnreachable,
    /// The host's route prohibits the destination.
    RouteProhibited,
    /// The host's route is a blackhole.
    Blackhole,
    /// Installing the map entries failed.
    MapError,
    /// The NAT tuple is already in use (should not happen).
    NatCollision,
    /// The DNS forwarder has no upstream.
    DnsUnavailable,
    /// An opening from the world that no forwarding rule covers.
    NoForward,
    /// An inbound forward before the guest's MAC address (or, for IPv6,
    /// its current IPv6 address) is known.
    GuestUnknown,
}

impl DropReason {
    /// All reasons, in counter order.
    pub const ALL: [DropReason; 21] = [
        Self::Malformed,
        Self::NotIp,
        Self::IpOptions,
        Self::Fragment,
        Self::Protocol,
        Self::BadSource,
        Self::TtlExpired,
        Self::TooBig,
        Self::UnknownFlow,
        Self::UnknownRst,
        Self::TableFull,
        Self::PortExhausted,
        Self::NoRoute,
        Self::HostUnreachable,
        Self::RouteProhibited,
        Self::Blackhole,
        Self::MapError,
        Self::NatCollision,
        Self::DnsUnavailable,
        Self::NoForward,
        Self::GuestUnknown,
    ];

    /// Stable lower-case name for logs and reports.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Malformed => "malformed",
            Self::NotIp => "not_ip",
            Self::IpOptions => "ip_options",
            Self::Fragment => "fragment",
            Self::Protocol => "protocol",
            Self::BadSource => "bad_source",
            Self::TtlExpired => "ttl_expired",
            Self::TooBig => "too_big",
            Self::UnknownFlow => "unknown_flow",
            Self::UnknownRst => "unknown_rst",
            Self::TableFull => "table_full",
            Self::PortExhausted => "port_exhausted",
            Self::NoRoute => "no_route",
            Self::HostUnreachable => "host_unreachable",
            Self::RouteProhibited => "route_prohibited",
            Self::Blackhole => "blackhole",
            Self::MapError => "map_error",
            Self::NatCollision => "nat_collision",
            Self::DnsUnavailable => "dns_unavailable",
            Self::NoForward => "no_forward",
            Self::GuestUnknown => "guest_unknown",
        }
    }
}

impl From<PacketError> for DropReason {
    fn from(e: PacketError) -> Self {
        match e {
            PacketError::Malformed(_) => Self::Malformed,
            PacketError::NotIp => Self::NotIp,
            PacketError::IpOptions => Self::IpOptions,
            PacketError::Fragment => Self::Fragment,
            PacketError::Protocol(_) | PacketError::IcmpType(_) => Self::Protocol,
        }
    }
}

/// Drop counters, one per [`DropReason`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DropCounts([u64; DropReason::ALL.len()]);

impl DropCounts {
    /// The count for `reason`.
    pub fn get(&self, reason: DropReason) -> u64 {
        self.0.get(reason as usize).copied().unwrap_or(0)
    }

    /// All counts with their reasons.
    pub fn iter(&self) -> impl Iterator<Item = (DropReason, u64)> + '_ {
        DropReason::ALL.iter().map(|r| (*r, self.get(*r)))
    }

    /// Sum of all counts.
    pub fn total(&self) -> u64 {
        self.0.iter().sum()
    }

    fn add(&mut self, reason: DropReason) {
        if let Some(c) = self.0.get_mut(reason as usize) {
            *c += 1;
        }
    }
}

/// Counters of the flow manager.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FlowStats {
    /// Flows in the table.
    pub flows_active: u64,
    /// TCP flows in the table.
    pub tcp_active: u64,
    /// UDP flows in the table.
    pub udp_active: u64,
    /// Of those, ICMP echo flows (they expire like UDP flows).
    pub icmp_active: u64,
    /// Flows rebuilt from an adopted datapath's kernel maps.
    pub flows_adopted: u64,
    /// Adopted flows whose NAT port could not be held again (the host
    /// took it while no daemon ran); they keep running.
    pub adopt_ports_lost: u64,
    /// Kernel entries of an adopted datapath that made no flow (no
    /// partner, inconsistent), removed.
    pub adopt_orphans: u64,
    /// Flows created.
    pub flows_created: u64,
    /// Flows removed, for any reason.
    pub flows_closed: u64,
    /// TCP flows reaped after both FINs were acknowledged.
    pub tcp_closed_cleanly: u64,
    /// Flows removed because of an RST from either side.
    pub resets: u64,
    /// Handshakes that timed out.
    pub handshake_timeouts: u64,
    /// Flows reaped by the `LastAck` timeout.
    pub last_ack_timeouts: u64,
    /// UDP flows expired as idle.
    pub udp_expired: u64,
    /// Flows replaced by a new SYN on the same ports.
    pub flows_replaced: u64,
    /// Retransmitted SYNs re-sent during a handshake.
    pub syn_retransmits: u64,
    /// RSTs synthesized (to the guest or the world).
    pub rsts_sent: u64,
    /// ICMP errors synthesized for the guest.
    pub icmp_sent: u64,
    /// ICMP by kind and direction.
    pub icmp: IcmpStats,
    /// Fragments sent because a packet was larger than the egress MTU.
    pub fragments_sent: u64,
    /// New flows refused by the policy.
    pub policy_denied: u64,
    /// Inbound flows opened through a forwarding rule.
    pub forwards_accepted: u64,
    /// Of those, flows of clients on the host itself (through loopback).
    pub forwards_from_host: u64,
    /// Packets translated and sent by the slow path towards the world.
    pub slow_to_world: u64,
    /// Packets translated and sent by the slow path towards the guest.
    pub slow_to_guest: u64,
    /// Event records received.
    pub events: u64,
    /// Event records for no flow we know.
    pub events_unknown: u64,
    /// Failed flow map operations.
    pub map_errors: u64,
    /// Keepalives sent to guests by the clock.
    pub keepalives_sent: u64,
    /// TCP flows reset on both sides by the inactivity scan.
    pub inactivity_resets: u64,
    /// TCP flows reset on both sides after `keepalive_probes` unanswered
    /// keepalives.
    pub probe_resets: u64,
    /// TCP flows removed because the guest answered a keepalive with an
    /// RST (also counted in `resets`).
    pub rst_answer_resets: u64,
    /// Dropped packets, by reason.
    pub drops: DropCounts,
}

/// Which side a packet came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Side {
    /// From the guest (tap).
    Guest,
    /// From the world (uplink).
    World,
}

/// The flow manager (see the module documentation).
pub struct FlowManager<M: FlowMaps, P: NatPorts> {
    guest: GuestNetConfig,
    guest6: Option<GuestNet6Config>,
    /// The guest's current IPv6 address (inbound IPv6 forwards go there).
    guest_addr6: Option<Ipv6Addr>,
    /// The guest frame being handled is a reassembled datagram.
    reassembled: bool,
    tap_ifindex: u32,
    uplink_ifindex: u32,
    uplink_mtu: u16,
    last_ack_timeout: Duration,
    udp_timeout: Duration,
    handshake_timeout: Duration,
    maps: M,
    ports: P,
    table: FlowTable,
    policy: Policy,
    stats: FlowStats,
    last_udp_scan: Option<Instant>,
    clock: clock::Clock,
    forwards: FwdTable,
    guest_mac: Option<EthernetAddress>,
    icmp_limit: icmp::Limiter,
}

impl<M: FlowMaps, P: NatPorts> FlowManager<M, P> {
    /// A flow manager with no flows, over `maps` (assumed empty) and `ports`.
    pub fn new(cfg: FlowConfig, maps: M, ports: P) -> Self {
        let FlowConfig {
            guest,
            guest6,
            tap_ifindex,
            uplink_ifindex,
            uplink_mtu,
            last_ack_timeout,
            udp_timeout,
            handshake_timeout,
            max_flows,
            allow_host,
            host_addrs,
            dns_upstream,
            dns_upstream6,
            keepalive_interval,
            inactivity_interval,
            keepalive_probes,
            forwards,
        } = cfg;
        let dns_upstream = dns_upstream.filter(|ip| {
            let ok = resolv::is_usable_upstream(*ip);
            if !ok {
                warn!(
                    "dns: upstream {ip} cannot be reached through the uplink; DNS is unavailable"
                );
            }
            ok
        });
        let mut policy = Policy::new(guest.clone(), allow_host, dns_upstream, host_addrs);
        if let Some(g6) = &guest6 {
            policy = policy.with_ipv6(g6.clone(), dns_upstream6);
        }
        Self {
            policy,
            guest,
            guest6,
            guest_addr6: None,
            reassembled: false,
            tap_ifindex,
            uplink_ifindex,
            uplink_mtu,
            last_ack_timeout,
            udp_timeout,
            handshake_timeout,
            maps,
            ports,
            table: FlowTable::new(max_flows),
            stats: FlowStats::default(),
            last_udp_scan: None,
            clock: clock::Clock::new(keepalive_interval, inactivity_interval, keepalive_probes),
            forwards,
            guest_mac: None,
            icmp_limit: icmp::Limiter::new(),
        }
    }

    /// Sets the guest's current IPv6 address (from the guest services:
    /// its DHCPv6 lease or the first address it was seen to use).
    pub fn set_guest_addr6(&mut self, addr: Ipv6Addr) {
        self.guest_addr6 = Some(addr);
    }

    /// The guest's current IPv6 address, once known.
    pub fn guest_addr6(&self) -> Option<Ipv6Addr> {
        self.guest_addr6
    }

    /// Sets the uplink's MTU (it may change while tapgate runs).
    pub fn set_uplink_mtu(&mut self, mtu: u16) {
        self.uplink_mtu = mtu;
    }

    /// Tells the manager the guest's MAC address (learnt by the gateway's
    /// services), the destination of inbound forwards' frames.
    pub fn set_guest_mac(&mut self, mac: EthernetAddress) {
        if mac.is_unicast() {
            self.guest_mac = Some(mac);
        }
    }

    /// The forwarding rules.
    pub fn forwards(&self) -> &FwdTable {
        &self.forwards
    }

    /// The forwarding rules, to change at runtime (`tapgate rules`): an
    /// added rule applies to the next opening, existing flows stay.
    pub fn forwards_mut(&mut self) -> &mut FwdTable {
        &mut self.forwards
    }

    /// The flow maps (for diagnostics and tests).
    pub fn maps(&self) -> &M {
        &self.maps
    }

    /// The flow maps, mutably (tests simulate the kernel through them).
    #[cfg(test)]
    pub(crate) fn maps_mut(&mut self) -> &mut M {
        &mut self.maps
    }

    /// Handles an IPv4 frame from the guest that the gateway's services did
    /// not take, punted for `reason`; `guest_mac` is the guest's MAC address
    /// (the destination of frames towards it).
    pub fn from_guest(
        &mut self,
        frame: &[u8],
        guest_mac: EthernetAddress,
        reason: PuntReason,
        now: Instant,
        out: &mut Vec<Output>,
    ) {
        if guest_mac.is_unicast() {
            self.guest_mac = Some(guest_mac);
        }
        // A datagram the guest sent in fragments (reassembled by the
        // daemon) may be cut again, IPv6 too: its source already chose to
        // fragment, as Linux's conntrack re-fragments what it reassembled.
        self.reassembled = reason == PuntReason::Fragment;
        let done = self.guest_frame(frame, guest_mac, now, out);
        self.reassembled = false;
        if let Err(why) = done {
            self.count_drop(frame, why);
            debug!(
                "flow: dropped a {}-byte frame from the guest ({}): {}",
                frame.len(),
                reason.name(),
                why.name()
            );
        }
    }

    /// Handles a frame from the uplink punted for `reason` (a packet of one
    /// of our flows the kernel did not forward).
    pub fn from_world(
        &mut self,
        frame: &[u8],
        reason: PuntReason,
        now: Instant,
        out: &mut Vec<Output>,
    ) {
        // A datagram that reached the host in fragments (reassembled by the
        // daemon) is cut again for the guest, IPv6 too.
        self.reassembled = reason == PuntReason::Fragment;
        let done = self.world_frame(frame, reason, false, now, out);
        self.reassembled = false;
        if let Err(why) = done {
            self.count_drop(frame, why);
            debug!(
                "flow: dropped a {}-byte frame from the world ({}): {}",
                frame.len(),
                reason.name(),
                why.name()
            );
        }
    }

    /// Handles a frame the loopback program punted for `reason`: from a
    /// client on the host itself, an opening of a forwarded port or a
    /// packet of such a client's flow the kernel did not forward.
    pub fn from_host(
        &mut self,
        frame: &[u8],
        reason: PuntReason,
        now: Instant,
        out: &mut Vec<Output>,
    ) {
        if let Err(why) = self.world_frame(frame, reason, true, now, out) {
            self.count_drop(frame, why);
            debug!(
                "flow: dropped a {}-byte frame from the host ({}): {}",
                frame.len(),
                reason.name(),
                why.name()
            );
        }
    }

    /// Handles an event record of the loopback program: `snap` holds the
    /// first bytes of a packet of a host client's flow the kernel forwarded.
    pub fn host_event(
        &mut self,
        reason: PuntReason,
        snap: &[u8],
        now: Instant,
        _out: &mut Vec<Output>,
    ) {
        self.stats.events += 1;
        if !reason.is_event() {
            debug!("flow: {} is not an event", reason.name());
            return;
        }
        if let Err(why) = self.event_snap(reason, Origin::Uplink, true, snap, now) {
            self.stats.drops.add(why);
            debug!(
                "flow: ignored a {} event from the host ({} bytes): {}",
                reason.name(),
                snap.len(),
                why.name()
            );
        }
    }

    /// How many flows are those of clients on the host itself (the loopback
    /// program is needed while there are any).
    pub fn host_client_flows(&self) -> usize {
        self.table.host_clients()
    }

    /// Handles an event record: `snap` holds the first bytes of a packet the
    /// kernel forwarded, as it arrived from `origin`.
    pub fn event(
        &mut self,
        reason: PuntReason,
        origin: Origin,
        snap: &[u8],
        now: Instant,
        _out: &mut Vec<Output>,
    ) {
        self.stats.events += 1;
        if !reason.is_event() {
            debug!("flow: {} is not an event", reason.name());
            return;
        }
        if let Err(why) = self.event_snap(reason, origin, false, snap, now) {
            self.stats.drops.add(why);
            debug!(
                "flow: ignored a {} event ({} bytes): {}",
                reason.name(),
                snap.len(),
                why.name()
            );
        }
    }

    /// Runs the timers; call about once a second. Reaps `LastAck` flows
    /// whose final ACK never came, drops handshakes that never completed,
    /// expires idle UDP flows and runs the clock algorithm ([`clock`]),
    /// whose keepalives and RSTs are queued on `out`.
    pub fn tick(&mut self, now: Instant, out: &mut Vec<Output>) {
        for slot in self.table.take_due(now) {
            let Some(flow) = self.table.get(slot) else {
                continue;
            };
            match flow.state {
                FlowState::Handshake => {
                    debug!(
                        "flow: handshake {} -> {} timed out",
                        flow.guest, flow.remote
                    );
                    self.stats.handshake_timeouts += 1;
                    self.remove_flow(slot, "handshake timeout");
                }
                FlowState::LastAck => {
                    warn!(
                        "flow: tcp {} -> {} reaped: no final ACK within {:?} of LastAck",
                        flow.guest, flow.remote, self.last_ack_timeout
                    );
                    self.stats.last_ack_timeouts += 1;
                    self.remove_flow(slot, "last-ack timeout");
                }
                _ => {}
            }
        }
        self.scan_udp(now);
        self.run_clock(now, out);
    }

    /// All flows, for reports (ages relative to the current time).
    pub fn flows(&self) -> Vec<FlowInfo> {
        self.flows_at(Instant::now())
    }

    /// All flows, with ages relative to `now`, ordered by slot.
    pub fn flows_at(&self, now: Instant) -> Vec<FlowInfo> {
        let mut v: Vec<FlowInfo> = self
            .table
            .iter()
            .map(|f| {
                let packets = |k| {
                    self.maps
                        .get(&k)
                        .ok()
                        .flatten()
                        .map_or(0, |e: datapath_common::FlowEntry| e.packets)
                };
                FlowInfo {
                    proto: proto_name(f.proto),
                    guest: f.guest,
                    remote: f.remote,
                    upstream: f.world,
                    nat: f.nat,
                    state: state_name(f.state),
                    fastpath_packets: packets(f.tap_key()).saturating_add(packets(f.uplink_key())),
                    age: now.saturating_duration_since(f.created),
                    slot: f.slot,
                }
            })
            .collect();
        v.sort_by_key(|i| i.slot);
        v
    }

    /// The counters.
    pub fn stats(&self) -> FlowStats {
        let mut s = self.stats.clone();
        let tcp = self.table.iter().filter(|f| f.is_tcp()).count() as u64;
        s.flows_active = self.table.len() as u64;
        s.tcp_active = tcp;
        s.udp_active = s.flows_active.saturating_sub(tcp);
        s.icmp_active = self
            .table
            .iter()
            .filter(|f| f.proto == PROTO_ICMP || f.proto == packet::PROTO_ICMPV6)
            .count() as u64;
        s
    }

    /// Counts a dropped frame; an ICMP message that did not parse counts
    /// as malformed ICMP too.
    fn count_drop(&mut self, frame: &[u8], why: DropReason) {
        self.stats.drops.add(why);
        let is_icmp = (frame.get(12..14) == Some(&[0x08, 0x00][..])
            && frame.get(ETHERNET_HEADER_LEN + 9) == Some(&PROTO_ICMP))
            || (frame.get(12..14) == Some(&[0x86, 0xdd][..])
                && frame.get(ETHERNET_HEADER_LEN + 6) == Some(&packet::PROTO_ICMPV6));
        if why == DropReason::Malformed && is_icmp {
            self.stats.icmp.malformed += 1;
        }
    }

    fn guest_frame(
        &mut self,
        frame: &[u8],
        guest_mac: EthernetAddress,
        now: Instant,
        out: &mut Vec<Output>,
    ) -> Result<(), DropReason> {
        let pkt = packet::parse_frame(frame)?;
        if !self.is_guest_source(pkt.src) || !guest_mac.is_unicast() {
            return Err(DropReason::BadSource);
        }
        if pkt.ttl <= 1 {
            if is_unicast(pkt.dst) {
                self.icmp_to_guest(
                    self.gateway_for(pkt.src),
                    &pkt,
                    IcmpError::TtlExceeded,
                    guest_mac,
                    out,
                );
            }
            return Err(DropReason::TtlExpired);
        }
        match pkt.l4 {
            L4::Tcp(seg) => self.guest_tcp(&pkt, seg, guest_mac, now, out),
            L4::Udp { .. } => self.guest_udp(&pkt, guest_mac, now, out),
            // ICMPv6 other than echo and errors (NDP, MLD) is the
            // gateway's services' business, never a flow's.
            L4::Icmp(msg) if msg.v6 && !msg.is_echo_request() && !msg.is_error() => {
                self.stats.icmp.unsupported += 1;
                Err(DropReason::Protocol)
            }
            L4::Icmp(msg) => self.guest_icmp(&pkt, msg, guest_mac, now, out),
        }
    }

    /// Whether `src` is an address the guest may send from: its IPv4
    /// address, or any address of its IPv6 prefix but the gateway's.
    fn is_guest_source(&self, src: IpAddr) -> bool {
        match src {
            IpAddr::V4(a) => a == self.guest.guest_addr,
            IpAddr::V6(a) => self
                .guest6
                .as_ref()
                .is_some_and(|g| g.in_prefix(a) && !g.is_gateway_addr(a)),
        }
    }

    /// The gateway's address of `peer`'s family (the source of what the
    /// gateway originates); the IPv4 gateway when IPv6 is off.
    fn gateway_for(&self, peer: IpAddr) -> IpAddr {
        match (peer, &self.guest6) {
            (IpAddr::V6(_), Some(g)) => IpAddr::V6(g.gateway),
            _ => IpAddr::V4(self.guest.gateway),
        }
    }

    /// A packet for a flow's world side: from the uplink, or with `host`
    /// from a client on the host itself (the loopback program's).
    fn world_frame(
        &mut self,
        frame: &[u8],
        reason: PuntReason,
        host: bool,
        now: Instant,
        out: &mut Vec<Output>,
    ) -> Result<(), DropReason> {
        let pkt = packet::parse_frame(frame)?;
        if let L4::Icmp(msg) = pkt.l4 {
            if msg.v6 && !msg.is_echo_reply() && !msg.is_error() {
                // The host's own NDP and MLD: never ours.
                self.stats.icmp.unsupported += 1;
                return Err(DropReason::Protocol);
            }
            if msg.is_error() {
                return self.world_icmp_error(&pkt, msg, host, out);
            }
            if !msg.is_echo_reply() {
                self.stats.icmp.unsupported += 1;
                return Err(DropReason::Protocol);
            }
        }
        let (sport, dport) = pkt.ports();
        let key = if host {
            store::lo_key(pkt.src, pkt.dst, sport, dport, pkt.proto())
        } else {
            store::uplink_key(pkt.src, pkt.dst, sport, dport, pkt.proto())
        };
        let slot = match self.table.by_uplink(&key) {
            Some(slot) => slot,
            None if matches!(reason, PuntReason::Forward | PuntReason::Fragment) => {
                return self.inbound(&pkt, host, now, out);
            }
            None => {
                if matches!(pkt.l4, L4::Icmp(_)) {
                    self.stats.icmp.unknown_flow += 1;
                }
                return Err(DropReason::UnknownFlow);
            }
        };
        if pkt.ttl <= 1 {
            // A router between the world and the guest: its TTL runs out
            // here. The error comes from the address the world sent to.
            self.icmp_to_world(pkt.dst, &pkt, IcmpError::TtlExceeded, out);
            return Err(DropReason::TtlExpired);
        }
        match pkt.l4 {
            L4::Tcp(seg) => self.world_tcp(slot, &pkt, seg, now, out),
            L4::Udp { .. } | L4::Icmp(_) => {
                if let Some(f) = self.table.get_mut(slot) {
                    f.last_seen = now;
                }
                self.forward_to_guest(slot, &pkt, out)
            }
        }
    }

    /// An event of `origin` (with `host`, the loopback program's).
    fn event_snap(
        &mut self,
        reason: PuntReason,
        origin: Origin,
        host: bool,
        snap: &[u8],
        now: Instant,
    ) -> Result<(), DropReason> {
        let s = packet::parse_snap(snap)?;
        let seg = s.seg;
        let (side, slot) = match origin {
            Origin::Tap => (
                Side::Guest,
                self.table.by_tap(&store::tap_key(
                    s.src, s.dst, seg.sport, seg.dport, PROTO_TCP,
                )),
            ),
            Origin::Uplink if host => (
                Side::World,
                self.table.by_uplink(&store::lo_key(
                    s.src, s.dst, seg.sport, seg.dport, PROTO_TCP,
                )),
            ),
            Origin::Uplink => (
                Side::World,
                self.table.by_uplink(&store::uplink_key(
                    s.src, s.dst, seg.sport, seg.dport, PROTO_TCP,
                )),
            ),
        };
        let Some(slot) = slot else {
            self.stats.events_unknown += 1;
            debug!(
                "flow: {} event for no known flow {}:{} -> {}:{}",
                reason.name(),
                s.src,
                seg.sport,
                s.dst,
                seg.dport
            );
            return Ok(());
        };
        if reason == PuntReason::EventRst {
            self.stats.resets += 1;
            if side == Side::Guest
                && self
                    .table
                    .get(slot)
                    .is_some_and(|f| f.keepalives_unanswered > 0)
            {
                // The guest's answer to a keepalive: it forgot the flow.
                self.stats.rst_answer_resets += 1;
                info!("flow: slot {slot}: the guest answered a keepalive with an RST");
            }
            self.remove_flow(slot, "rst");
            return Ok(());
        }
        self.after_segment(slot, side, &seg, now);
        Ok(())
    }

    /// Installs a new flow for `pkt` (from the guest) towards `world`:
    /// source address, NAT port, slot, both map entries.
    fn install(
        &mut self,
        pkt: &Packet<'_>,
        world: SocketAddr,
        guest_mac: EthernetAddress,
        state: FlowState,
        guest_isn: u32,
        now: Instant,
    ) -> Result<u32, DropReason> {
        if !self.table.has_room() {
            warn!("flow: {} flows exist, refusing a new one", self.table.len());
            return Err(DropReason::TableFull);
        }
        let proto = pkt.proto();
        let routed_src = self.ports.source_for(world.ip()).map_err(|e| {
            debug!("flow: no source address towards {world}: {e}");
            match e {
                NatError::NoRoute(_, NoRoute::Host) => DropReason::HostUnreachable,
                NatError::NoRoute(_, NoRoute::Prohibited) => DropReason::RouteProhibited,
                NatError::NoRoute(_, NoRoute::Blackhole) => DropReason::Blackhole,
                _ => DropReason::NoRoute,
            }
        })?;
        // The host routes its own addresses locally (source == destination).
        // Such a flow (allowed by --allow-host) enters the host stack through
        // loopback with the gateway's address as source: a local source
        // there would be a martian, and the host's replies to the gateway's
        // address leave through the uplink, where the egress program takes
        // them.
        let local = routed_src == world.ip();
        let src = if local {
            self.gateway_for(routed_src)
        } else {
            routed_src
        };
        let lease = self.ports.reserve(proto, src).map_err(|e| {
            warn!("flow: reserving a NAT port on {src}: {e}");
            DropReason::PortExhausted
        })?;
        let slot = self.table.alloc_slot().ok_or(DropReason::TableFull)?;
        let (sport, dport) = pkt.ports();
        let deadline = if state == FlowState::Handshake {
            now.checked_add(self.handshake_timeout)
        } else {
            None
        };
        let nat = SocketAddr::new(src, lease.port());
        let mut flow = Flow::new(
            slot,
            Addressing {
                proto,
                guest: SocketAddr::new(pkt.src, sport),
                remote: SocketAddr::new(pkt.dst, dport),
                world,
                nat,
                guest_mac,
            },
            lease,
            state,
            now,
        );
        flow.guest_isn = guest_isn;
        flow.deadline = deadline;
        let (tk_out, tk_flags) = if local {
            (LOOPBACK_IFINDEX, FLOW_F_LOCAL)
        } else {
            (self.uplink_ifindex, 0)
        };
        self.commit_flow(flow, tk_out, tk_flags)
    }

    /// Enters a new flow (slot already allocated) into the table and both
    /// map entries; the tap-side entry leaves by `tap_out` with `tap_flags`.
    /// On failure the slot is released.
    fn commit_flow(&mut self, flow: Flow, tap_out: u32, tap_flags: u8) -> Result<u32, DropReason> {
        let (slot, proto, state) = (flow.slot, flow.proto, flow.state);
        let (tk, uk) = (flow.tap_key(), flow.uplink_key());
        if self.table.by_uplink(&uk).is_some() || self.table.by_tap(&tk).is_some() {
            warn!(
                "flow: NAT tuple {} -> {} already in use",
                flow.nat, flow.world
            );
            self.table.release_slot(slot);
            return Err(DropReason::NatCollision);
        }
        let te = flow.tap_entry(tap_out, tap_flags);
        let ue = flow.uplink_entry(self.tap_ifindex, self.guest.gateway_mac, 0);
        self.maps.clear_activity(slot, ACTIVE | TAP_ACTIVE);
        // The return direction first: once the guest's direction forwards,
        // replies must find their entry.
        if let Err(e) = self.maps.insert(&uk, &ue) {
            warn!("flow: installing {} -> {}: {e}", flow.guest, flow.world);
            self.stats.map_errors += 1;
            self.table.release_slot(slot);
            return Err(DropReason::MapError);
        }
        if let Err(e) = self.maps.insert(&tk, &te) {
            warn!("flow: installing {} -> {}: {e}", flow.guest, flow.world);
            self.stats.map_errors += 1;
            if let Err(e) = self.maps.remove(&uk) {
                warn!("flow: removing a half-installed entry: {e}");
                self.stats.map_errors += 1;
            }
            self.table.release_slot(slot);
            return Err(DropReason::MapError);
        }
        debug!(
            "flow: new {} {} -> {} (world {}) via {} slot {slot} {}",
            proto_name(proto),
            flow.guest,
            flow.remote,
            flow.world,
            flow.nat,
            state_name(state)
        );
        self.table.insert(flow);
        self.stats.flows_created += 1;
        Ok(slot)
    }

    /// Removes a flow: both map entries, its NAT port and its slot.
    fn remove_flow(&mut self, slot: u32, why: &str) {
        let Some(flow) = self.table.remove(slot) else {
            return;
        };
        for key in [flow.tap_key(), flow.uplink_key()] {
            if let Err(e) = self.maps.remove(&key) {
                warn!("flow: removing slot {slot}'s entry: {e}");
                self.stats.map_errors += 1;
            }
        }
        self.maps.clear_activity(slot, ACTIVE | TAP_ACTIVE);
        self.stats.flows_closed += 1;
        debug!(
            "flow: removed {} {} -> {} via {} ({why})",
            proto_name(flow.proto),
            flow.guest,
            flow.remote,
            flow.nat
        );
        // Dropping `flow` drops the lease: the NAT port is free again.
    }

    /// Moves a flow to `state` and mirrors it into both map entries
    /// (`LastAck` also asks the kernel for events on every packet).
    fn set_state(&mut self, slot: u32, state: FlowState, now: Instant) {
        let Some(flow) = self.table.get_mut(slot) else {
            return;
        };
        if flow.state == state {
            return;
        }
        let old = flow.state;
        flow.state = state;
        flow.state_since = now;
        let keys = [flow.tap_key(), flow.uplink_key()];
        let deadline = match state {
            FlowState::LastAck => now.checked_add(self.last_ack_timeout),
            FlowState::Handshake => flow.deadline,
            _ => None,
        };
        self.table.set_deadline(slot, deadline);
        let flags = if state == FlowState::LastAck {
            FLOW_F_EVENTS
        } else {
            0
        };
        for key in keys {
            if let Err(e) = self.maps.update_state(&key, state, flags) {
                warn!("flow: updating slot {slot}'s state: {e}");
                self.stats.map_errors += 1;
            }
        }
        debug!(
            "flow: slot {slot} {} -> {}",
            state_name(old),
            state_name(state)
        );
    }

    /// Translates a packet from the guest along its flow and queues it for
    /// the world: fragmented when larger than the egress MTU, refused with
    /// "fragmentation needed" when it also has DF set.
    fn forward_to_world(
        &mut self,
        slot: u32,
        pkt: &Packet<'_>,
        out: &mut Vec<Output>,
    ) -> Result<(), DropReason> {
        let flow = self.table.get(slot).ok_or(DropReason::UnknownFlow)?;
        let (rw, mac) = (flow.to_world(), flow.guest_mac);
        // Host-local flows and host clients' flows enter through loopback,
        // which takes anything.
        let mtu = if flow.host_client || flow.nat.ip() == self.gateway_for(flow.nat.ip()) {
            usize::from(u16::MAX)
        } else {
            usize::from(self.uplink_mtu)
        };
        if pkt.ip.len() > mtu && pkt.dont_frag() && !(pkt.is_v6() && self.reassembled) {
            let kind = IcmpError::FragNeeded {
                mtu: self.uplink_mtu,
            };
            self.icmp_to_guest(self.gateway_for(pkt.src), pkt, kind, mac, out);
            return Err(DropReason::TooBig);
        }
        let ip = packet::rewrite(pkt.ip, rw)?;
        if let L4::Icmp(m) = pkt.l4 {
            self.stats
                .icmp
                .translated_to_world
                .add(IcmpKind::of_msg(&m));
        }
        self.stats.slow_to_world += 1;
        let pieces = self.within_mtu(ip, mtu)?;
        out.extend(pieces.into_iter().map(Output::ToWorld));
        Ok(())
    }

    /// `ip` as it is when it fits `mtu`, else its fragments (counted).
    fn within_mtu(&mut self, ip: Vec<u8>, mtu: usize) -> Result<Vec<Vec<u8>>, DropReason> {
        if ip.len() <= mtu {
            return Ok(vec![ip]);
        }
        let pieces = crate::frag::fragment(&ip, mtu).map_err(|e| {
            debug!("flow: fragmenting a {}-byte packet: {e}", ip.len());
            DropReason::TooBig
        })?;
        self.stats.fragments_sent += pieces.len() as u64;
        Ok(pieces)
    }

    /// Translates a packet from the world along its flow and queues the
    /// frame for the guest: fragmented when larger than the tap's MTU,
    /// refused with "fragmentation needed" (to the world) when it also has
    /// DF set.
    fn forward_to_guest(
        &mut self,
        slot: u32,
        pkt: &Packet<'_>,
        out: &mut Vec<Output>,
    ) -> Result<(), DropReason> {
        let flow = self.table.get(slot).ok_or(DropReason::UnknownFlow)?;
        let (rw, mac, host) = (flow.to_guest(), flow.guest_mac, flow.host_client);
        let mtu = usize::from(self.guest.mtu);
        // A client on the host itself is not told to send smaller packets:
        // its datagram crossed loopback whole (64 KiB MTU), and a "too big"
        // would only teach its stack a path MTU for a local address; the
        // host, as the datagram's source node, cuts it for the tap instead.
        if pkt.ip.len() > mtu && pkt.dont_frag() && !(pkt.is_v6() && self.reassembled) && !host {
            let kind = IcmpError::FragNeeded {
                mtu: self.guest.mtu,
            };
            self.icmp_to_world(pkt.dst, pkt, kind, out);
            return Err(DropReason::TooBig);
        }
        let mut ip = packet::rewrite(pkt.ip, rw)?;
        if host && ip.len() > mtu {
            packet::clear_dont_frag(&mut ip);
        }
        if let L4::Icmp(m) = pkt.l4 {
            self.stats
                .icmp
                .translated_to_guest
                .add(IcmpKind::of_msg(&m));
        }
        self.stats.slow_to_guest += 1;
        let gw = self.guest.gateway_mac;
        let pieces = self.within_mtu(ip, mtu)?;
        out.extend(
            pieces
                .iter()
                .map(|p| Output::ToGuest(packet::ethernet_frame(gw, mac, p))),
        );
        Ok(())
    }
}

/// Whether `ip` is a destination errors may be sent about (RFC 1122
/// §3.2.2: never about broadcast or multicast).
fn is_unicast(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(ip) => !(ip.is_broadcast() || ip.is_multicast() || ip.is_unspecified()),
        IpAddr::V6(ip) => !(ip.is_multicast() || ip.is_unspecified()),
    }
}

/// "tcp", "udp", "icmp" or "other".
fn proto_name(proto: u8) -> &'static str {
    match proto {
        PROTO_TCP => "tcp",
        PROTO_UDP => "udp",
        PROTO_ICMP => "icmp",
        packet::PROTO_ICMPV6 => "icmpv6",
        _ => "other",
    }
}

/// Lower-case name of a flow state.
pub fn state_name(s: FlowState) -> &'static str {
    match s {
        FlowState::Handshake => "handshake",
        FlowState::Established => "established",
        FlowState::FinWait => "fin_wait",
        FlowState::CloseWait => "close_wait",
        FlowState::LastAck => "last_ack",
    }
}
