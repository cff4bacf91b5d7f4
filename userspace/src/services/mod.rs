//! The gateway's own services for the guest, and the dispatch of guest
//! frames to them.
//!
//! # Theory of operation
//!
//! Every frame the kernel punts from the tap lands here. The dispatcher
//! checks the Ethernet header, learns the guest's MAC address, and hands the
//! frame to the one service that owns it, one file per protocol:
//!
//! | family | service | file |
//! |---|---|---|
//! | IPv4 | ARP for the gateway's addresses | [`arp`] |
//! | IPv4 | DHCPv4 server | [`dhcpv4`] |
//! | IPv4 | echo to the gateway | [`echo`] |
//! | IPv6 | Neighbor Discovery: NA for the gateway's addresses, RAs | [`ndp`] |
//! | IPv6 | DHCPv6 server | [`dhcpv6`] |
//! | IPv6 | echo to the gateway | [`icmpv6`] |
//! | IPv6 | DNS on the IPv6 DNS address, relayed to an IPv4 resolver | [`dns`] |
//!
//! Each service returns at most one reply frame, which the caller writes
//! back on the tap; [`GuestServices::poll`] yields what the services send
//! unasked (unsolicited router advertisements). Other unicast IPv4 and
//! IPv6 traffic is handed back unclaimed ([`Claim::NotMine`]) for the flow
//! manager, which NATs it or answers as a router would; IPv6 from a
//! source outside the guest prefix (link-local, spoofed) never leaves the
//! link and is dropped and counted here, as is IPv6 multicast nobody on
//! the link serves (MLD reports, mDNS). With IPv6 turned off, IPv6 frames
//! are only counted.
//! Whatever no one owns, or fails to parse, is counted by kind and dropped
//! — the guest is untrusted and nothing it sends can stop the dispatcher.

use std::time::Instant;

use log::{debug, info};
use smoltcp::wire::{
    EthernetFrame, EthernetProtocol, IpProtocol, Ipv4Address, Ipv4Packet, Ipv6Packet,
};

use crate::config::{GuestNet6Config, GuestNetConfig};

pub mod arp;
pub mod dhcpv4;
pub mod dhcpv6;
pub mod dns;
pub mod echo;
pub mod error;
pub mod icmpv6;
pub mod ndp;

use dhcpv4::DhcpServer;
use dhcpv6::Dhcpv6Server;
use error::FrameError;
use ndp::Ndp;

/// Counters of the guest services.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceStats {
    /// ARP replies sent.
    pub arp_replies: u64,
    /// DHCP replies sent.
    pub dhcp_replies: u64,
    /// ICMP and ICMPv6 echo replies sent by the gateway.
    pub echo_replies: u64,
    /// DHCPv6 replies sent (Advertise and Reply).
    pub dhcpv6_replies: u64,
    /// Neighbor Advertisements sent.
    pub neighbor_adverts: u64,
    /// Router Advertisements sent (solicited and unsolicited).
    pub router_adverts: u64,
    /// The guest's IPv6 packets from a source outside its prefix.
    pub ipv6_bad_source: u64,
    /// DNS queries to the IPv6 DNS address relayed to an IPv4 resolver.
    pub dns6_relayed: u64,
    /// Frames dropped because they failed to parse.
    pub malformed: u64,
    /// Well-formed frames no service handles (yet).
    pub unhandled: u64,
}

/// The IPv6 side of the services (absent when IPv6 is off).
struct V6 {
    cfg: GuestNet6Config,
    ndp: Ndp,
    dhcp: Dhcpv6Server,
    /// The guest's addresses in the prefix, in the order they were seen
    /// (duplicate-address probes, then sources), at most [`LEARNED6_MAX`].
    learned: Vec<std::net::Ipv6Addr>,
    /// The relay for the IPv6 DNS address, when the host's resolver is
    /// IPv4 only.
    relay: Option<dns::DnsRelay>,
}

/// How many of the guest's IPv6 addresses are remembered.
const LEARNED6_MAX: usize = 16;

impl V6 {
    /// Remembers `a` as one of the guest's addresses if it is one it may
    /// use (in the prefix, not the gateway's).
    fn learn(&mut self, a: std::net::Ipv6Addr) {
        if self.cfg.in_prefix(a)
            && !self.cfg.is_gateway_addr(a)
            && !self.learned.contains(&a)
            && self.learned.len() < LEARNED6_MAX
        {
            info!("guest IPv6 address {a}");
            self.learned.push(a);
        }
    }
}

/// The gateway's services for one guest.
pub struct GuestServices {
    cfg: GuestNetConfig,
    dhcp: DhcpServer,
    v6: Option<V6>,
    guest_mac: Option<smoltcp::wire::EthernetAddress>,
    stats: ServiceStats,
}

impl GuestServices {
    /// Services for the subnet described by `cfg`, and for the IPv6
    /// prefix of `cfg6` unless it is `None`.
    pub fn new(cfg: GuestNetConfig, cfg6: Option<GuestNet6Config>) -> Self {
        let now = Instant::now();
        Self {
            dhcp: DhcpServer::new(cfg.clone()),
            cfg,
            v6: cfg6.map(|cfg| V6 {
                ndp: Ndp::new(cfg.clone(), now),
                dhcp: Dhcpv6Server::new(cfg.clone()),
                cfg,
                learned: Vec::new(),
                relay: None,
            }),
            guest_mac: None,
            stats: ServiceStats::default(),
        }
    }

    /// The counters so far.
    pub fn stats(&self) -> &ServiceStats {
        &self.stats
    }

    /// The guest's MAC address, once it has sent a frame.
    pub fn guest_mac(&self) -> Option<smoltcp::wire::EthernetAddress> {
        self.guest_mac
    }

    /// What a restarted daemon needs to go on serving the same guest: its
    /// MAC address, its DHCP and DHCPv6 leases, its IPv6 address.
    pub fn snapshot(&self) -> crate::state::GuestState {
        let v6 = self.v6.as_ref();
        crate::state::GuestState::new(self.guest_mac, self.dhcp.lease())
            .with_ipv6(v6.and_then(|v| v.dhcp.lease()), self.guest_addr6())
    }

    /// Puts back what [`Self::snapshot`] saved.
    pub fn restore(&mut self, state: &crate::state::GuestState) {
        let now = std::time::Instant::now();
        if let Some(mac) = state.guest_mac() {
            info!("guest MAC address is {mac} (restored)");
            self.guest_mac = Some(mac);
        }
        if let Some((mac, expires)) = state.lease(now) {
            self.dhcp.restore_lease(mac, expires);
        }
        if let Some(v6) = self.v6.as_mut() {
            if let Some((duid, expires)) = state.lease6(now) {
                v6.dhcp.restore_lease(duid, expires);
            }
            if let Some(a) = state.guest_addr6() {
                v6.learn(a);
            }
        }
    }

    /// The guest's IPv6 address inbound IPv6 forwards go to: the DHCPv6
    /// address while it is leased, else the first address the guest was
    /// seen to use (its first duplicate-address probe in the prefix, or
    /// its first source there) — with SLAAC, its stable address.
    pub fn guest_addr6(&self) -> Option<std::net::Ipv6Addr> {
        let v6 = self.v6.as_ref()?;
        if v6.dhcp.lease().is_some() {
            return Some(v6.cfg.guest_addr);
        }
        v6.learned.first().copied()
    }

    /// Serves the IPv6 DNS address by relaying to the IPv4 resolver
    /// `upstream` (for a host without an IPv6 resolver); returns a
    /// duplicate of the relay's socket to wait on, `None` without IPv6.
    pub fn enable_dns_relay(
        &mut self,
        upstream: std::net::Ipv4Addr,
    ) -> std::io::Result<Option<std::os::fd::OwnedFd>> {
        let Some(v6) = self.v6.as_mut() else {
            return Ok(None);
        };
        let relay = dns::DnsRelay::new(v6.cfg.clone(), upstream)?;
        let fd = relay.socket().try_clone()?;
        info!("dns: {}:53 relayed to {upstream}:53", v6.cfg.dns);
        v6.relay = Some(relay);
        Ok(Some(std::os::fd::OwnedFd::from(fd)))
    }

    /// The relayed DNS answers waiting for the guest, as frames (a
    /// bounded batch), and whether the relay's socket was drained.
    pub fn dns_relay_answers(&mut self) -> (Vec<Vec<u8>>, bool) {
        self.v6
            .as_mut()
            .and_then(|v| v.relay.as_mut())
            .map_or((Vec::new(), true), dns::DnsRelay::answers)
    }

    /// Frames the services send unasked at `now` (unsolicited router
    /// advertisements).
    pub fn poll(&mut self, now: Instant) -> Vec<Vec<u8>> {
        let Some(v6) = self.v6.as_mut() else {
            return Vec::new();
        };
        if let Some(r) = v6.relay.as_mut() {
            r.expire(now);
        }
        let adverts: Vec<Vec<u8>> = v6.ndp.poll(now).into_iter().collect();
        self.stats.router_adverts += adverts.len() as u64;
        adverts
    }

    /// Handles one frame from the guest.
    pub fn handle(&mut self, frame: &[u8], now: Instant) -> Claim {
        match self.dispatch(frame, now) {
            Ok(claim) => {
                if matches!(claim, Claim::Consumed) {
                    self.stats.unhandled += 1;
                }
                claim
            }
            Err(e) => {
                self.stats.malformed += 1;
                debug!("dropped frame from the guest: {e}");
                Claim::Consumed
            }
        }
    }

    fn dispatch(&mut self, frame: &[u8], now: Instant) -> Result<Claim, FrameError> {
        let eth = EthernetFrame::new_checked(frame).map_err(FrameError::malformed("ethernet"))?;
        let src = eth.src_addr();
        if src.is_unicast() && self.guest_mac != Some(src) {
            info!("guest MAC address is {src}");
            self.guest_mac = Some(src);
        }
        match eth.ethertype() {
            EthernetProtocol::Arp => Ok(Claim::from(
                arp::reply(&self.cfg, frame)?.inspect(|_| self.stats.arp_replies += 1),
            )),
            EthernetProtocol::Ipv4 => self.ipv4(frame, eth.payload(), now),
            EthernetProtocol::Ipv6 => self.ipv6(frame, eth.payload(), now),
            _ => Ok(Claim::Consumed),
        }
    }

    fn ipv4(&mut self, frame: &[u8], packet: &[u8], now: Instant) -> Result<Claim, FrameError> {
        if dhcpv4::is_dhcp_request(frame) {
            let reply = self.dhcp.handle(frame, now)?;
            return Ok(Claim::from(reply.inspect(|_| self.stats.dhcp_replies += 1)));
        }
        let ip = Ipv4Packet::new_checked(packet).map_err(FrameError::malformed("ipv4"))?;
        let dst: Ipv4Address = ip.dst_addr();
        if ip.next_header() == IpProtocol::Icmp && self.cfg.is_gateway_addr(dst) {
            let reply = echo::echo_reply(&self.cfg, frame)?;
            return Ok(Claim::from(reply.inspect(|_| self.stats.echo_replies += 1)));
        }
        Ok(Claim::NotMine)
    }

    fn ipv6(&mut self, frame: &[u8], packet: &[u8], now: Instant) -> Result<Claim, FrameError> {
        let Some(v6) = self.v6.as_mut() else {
            return Ok(Claim::Consumed);
        };
        let ip = Ipv6Packet::new_checked(packet).map_err(FrameError::malformed("ipv6"))?;
        let (src, dst) = (ip.src_addr(), ip.dst_addr());
        match ip.next_header() {
            IpProtocol::Icmpv6 => match ip.payload().first().copied() {
                // Router/Neighbor Solicitation and Advertisement, Redirect.
                Some(ty @ 133..=137) => {
                    let reply = v6.ndp.handle(frame, now)?;
                    // A duplicate-address probe names an address the guest
                    // is about to use.
                    if ty == 135
                        && src.is_unspecified()
                        && let Some(t) = ip.payload().get(8..24)
                        && let Ok(t) = <[u8; 16]>::try_from(t)
                    {
                        v6.learn(std::net::Ipv6Addr::from(t));
                    }
                    if reply.is_some() {
                        match ty {
                            133 => self.stats.router_adverts += 1,
                            _ => self.stats.neighbor_adverts += 1,
                        }
                    }
                    return Ok(Claim::from(reply));
                }
                Some(128) if v6.cfg.is_gateway_addr(dst) => {
                    let reply = icmpv6::echo_reply(&v6.cfg, frame)?;
                    return Ok(Claim::from(reply.inspect(|_| self.stats.echo_replies += 1)));
                }
                _ => {}
            },
            IpProtocol::Udp if v6.relay.as_ref().is_some_and(|r| r.is_query(frame)) => {
                if let Some(r) = v6.relay.as_mut() {
                    r.query(frame, now)?;
                    self.stats.dns6_relayed += 1;
                }
                return Ok(Claim::Consumed);
            }
            IpProtocol::Udp if dhcpv6::is_dhcpv6_request(frame) => {
                let reply = v6.dhcp.handle(frame, now)?;
                return Ok(Claim::from(
                    reply.inspect(|_| self.stats.dhcpv6_replies += 1),
                ));
            }
            _ => {}
        }
        // MLD reports, mDNS, LLMNR ...: nothing on this link listens.
        if dst.is_multicast() {
            return Ok(Claim::Consumed);
        }
        if !v6.cfg.in_prefix(src) || v6.cfg.is_gateway_addr(src) {
            // Link-local or spoofed sources never leave the link.
            self.stats.ipv6_bad_source += 1;
            return Ok(Claim::Consumed);
        }
        v6.learn(src);
        Ok(Claim::NotMine)
    }
}

/// What the services made of a frame.
#[derive(Debug, PartialEq, Eq)]
pub enum Claim {
    /// Handled; this frame goes back to the guest.
    Reply(Vec<u8>),
    /// Handled (or dropped and counted); nothing to send.
    Consumed,
    /// An IPv4 or IPv6 packet that is not for the gateway's services: it belongs to
    /// the flow manager.
    NotMine,
}

impl From<Option<Vec<u8>>> for Claim {
    fn from(reply: Option<Vec<u8>>) -> Self {
        reply.map_or(Self::Consumed, Self::Reply)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn garbage_is_counted_not_fatal() {
        let mut s = GuestServices::new(GuestNetConfig::default(), None);
        let now = Instant::now();
        assert_eq!(s.handle(&[], now), Claim::Consumed);
        assert_eq!(s.handle(&[0u8; 13], now), Claim::Consumed);
        assert_eq!(s.stats().malformed, 2);
        // A well-formed Ethernet frame of an unknown type.
        let mut f = vec![0u8; 60];
        f[0..6].copy_from_slice(&[0x52, 0x55, 10, 0, 2, 2]);
        f[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 1]);
        f[12..14].copy_from_slice(&[0x88, 0xb5]);
        assert_eq!(s.handle(&f, now), Claim::Consumed);
        assert_eq!(s.stats().unhandled, 1);
        assert_eq!(
            s.guest_mac(),
            Some(smoltcp::wire::EthernetAddress([0x02, 0, 0, 0, 0, 1]))
        );
    }

    #[test]
    fn truncated_ipv4_is_malformed() {
        let mut s = GuestServices::new(GuestNetConfig::default(), None);
        let mut f = vec![0u8; 20];
        f[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 1]);
        f[12..14].copy_from_slice(&[0x08, 0x00]);
        assert_eq!(s.handle(&f, Instant::now()), Claim::Consumed);
        assert_eq!(s.stats().malformed, 1);
    }

    /// An IPv6 UDP frame from the guest's MAC.
    fn udp6(src: std::net::Ipv6Addr, dst: std::net::Ipv6Addr) -> Vec<u8> {
        let mut f = vec![0u8; 14 + 40 + 8];
        f[0..6].copy_from_slice(&[0x52, 0x55, 10, 0, 2, 2]);
        f[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 1]);
        f[12..14].copy_from_slice(&[0x86, 0xdd]);
        f[14] = 0x60;
        f[18..20].copy_from_slice(&8u16.to_be_bytes());
        f[20] = 17;
        f[21] = 64;
        f[22..38].copy_from_slice(&src.octets());
        f[38..54].copy_from_slice(&dst.octets());
        f
    }

    #[test]
    fn ipv6_beyond_the_gateway() {
        let cfg6 = GuestNet6Config::default();
        let mut s = GuestServices::new(GuestNetConfig::default(), Some(cfg6.clone()));
        let now = Instant::now();
        let world: std::net::Ipv6Addr = "2001:db8::1".parse().unwrap();
        // From the prefix to the world, or to a gateway port without a
        // service: the flow manager's.
        assert_eq!(s.handle(&udp6(cfg6.guest_addr, world), now), Claim::NotMine);
        assert_eq!(
            s.handle(&udp6(cfg6.guest_addr, cfg6.dns), now),
            Claim::NotMine
        );
        // From outside the prefix (link-local, spoofed, the gateway's
        // own): dropped, counted.
        for src in ["fe80::1", "2001:db8::99", "fd00::2"] {
            let src: std::net::Ipv6Addr = src.parse().unwrap();
            assert_eq!(s.handle(&udp6(src, world), now), Claim::Consumed);
        }
        assert_eq!(s.stats().ipv6_bad_source, 3);
        // Multicast nobody serves: dropped.
        let mdns: std::net::Ipv6Addr = "ff02::fb".parse().unwrap();
        assert_eq!(s.handle(&udp6(cfg6.guest_addr, mdns), now), Claim::Consumed);
        // Without IPv6, nothing is answered or passed on.
        let mut off = GuestServices::new(GuestNetConfig::default(), None);
        assert_eq!(
            off.handle(&udp6(cfg6.guest_addr, world), now),
            Claim::Consumed
        );
        assert!(off.poll(now).is_empty());
        // With it, the first unsolicited RA is due at once.
        assert_eq!(s.poll(now).len(), 1);
        assert_eq!(s.stats().router_adverts, 1);
    }

    #[test]
    fn the_guests_ipv6_address_is_the_first_it_used() {
        let cfg6 = GuestNet6Config::default();
        let mut s = GuestServices::new(GuestNetConfig::default(), Some(cfg6.clone()));
        let now = Instant::now();
        let world: std::net::Ipv6Addr = "2001:db8::1".parse().unwrap();
        assert_eq!(s.guest_addr6(), None);
        let stable: std::net::Ipv6Addr = "fd00::5054:ff:fe12:3456".parse().unwrap();
        let temp: std::net::Ipv6Addr = "fd00::1234:5678:9abc:def0".parse().unwrap();
        let _ = s.handle(&udp6(stable, world), now);
        let _ = s.handle(&udp6(temp, world), now);
        // Spoofed and link-local sources are never learnt.
        let _ = s.handle(&udp6("fe80::1".parse().unwrap(), world), now);
        assert_eq!(s.guest_addr6(), Some(stable));
        // Without IPv6 there is none.
        let off = GuestServices::new(GuestNetConfig::default(), None);
        assert_eq!(off.guest_addr6(), None);
    }
}
