//! Which destinations the guest may reach, and where DNS goes.
//!
//! # Theory of operation
//!
//! Every new flow from the guest is checked once, here; the kernel fast
//! path only ever forwards flows user space installed, so the check covers
//! every packet. The default policy is that of user-mode networking: the
//! guest reaches the world, but not
//!
//! * the host itself — every address on the host's interfaces (read with
//!   `getifaddrs`, refreshed at most every [`HOST_ADDRS_REFRESH`]) unless
//!   `allow_host` is set, and loopback (127/8) always;
//! * its own subnet, except the gateway's services (the DNS forwarder on
//!   `cfg.dns:53`); the gateway's addresses answer other ports as a closed
//!   host would (RST, ICMP port unreachable);
//! * broadcast, multicast and `0.0.0.0/8` destinations, dropped silently
//!   (no ICMP error may answer a broadcast or multicast datagram,
//!   RFC 1122 §3.2.2).
//!
//! A TCP/UDP flow to `cfg.dns:53` is allowed with the upstream resolver as
//! its real destination (DNAT), when an upstream is known.
//!
//! IPv6 mirrors it: the host's own IPv6 addresses and `::1`, the guest's
//! own prefix, link-local and IPv4-mapped destinations are prohibited;
//! multicast and `::` are dropped silently; the gateway's IPv6 addresses
//! answer as a closed host. The DNS address `cfg6.dns` is a NAT flow only
//! to an IPv6 upstream resolver (NAT cannot change a packet's family);
//! without one it is denied here as unavailable — the guest services relay
//! its UDP queries to the IPv4 resolver before they reach the flow manager
//! (`services/dns.rs`), so what is left (TCP) answers as closed.
//!
//! The verdict is pure data ([`Verdict`]); the flow manager turns denials
//! into RSTs or ICMP errors and counts them.

use std::{
    collections::HashSet,
    fmt, io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::{Duration, Instant},
};

use log::{debug, warn};

use crate::config::{GuestNet6Config, GuestNetConfig};

/// How often, at most, the host's addresses are re-read.
pub const HOST_ADDRS_REFRESH: Duration = Duration::from_secs(5);

/// The DNS port.
pub const DNS_PORT: u16 = 53;

type AddrFn = dyn FnMut() -> io::Result<Vec<IpAddr>> + Send;

/// Where the set of the host's own addresses comes from.
pub struct HostAddrs {
    source: Box<AddrFn>,
    refresh: Duration,
}

impl HostAddrs {
    /// All IPv4 and IPv6 addresses on the host's interfaces
    /// (`getifaddrs`), re-read at most every [`HOST_ADDRS_REFRESH`].
    pub fn system() -> Self {
        Self::from_fn(system_host_ips, HOST_ADDRS_REFRESH)
    }

    /// A fixed set (tests, or a host whose addresses never change).
    pub fn fixed<A: Into<IpAddr>>(addrs: Vec<A>) -> Self {
        let addrs: Vec<IpAddr> = addrs.into_iter().map(Into::into).collect();
        Self::from_fn(move || Ok(addrs.clone()), Duration::MAX)
    }

    /// Addresses from `f`, called at most every `refresh`.
    pub fn from_fn(
        f: impl FnMut() -> io::Result<Vec<IpAddr>> + Send + 'static,
        refresh: Duration,
    ) -> Self {
        Self {
            source: Box::new(f),
            refresh,
        }
    }
}

impl fmt::Debug for HostAddrs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HostAddrs")
            .field("refresh", &self.refresh)
            .finish_non_exhaustive()
    }
}

/// The IPv4 addresses of all of the host's interfaces.
pub fn system_host_addrs() -> io::Result<Vec<Ipv4Addr>> {
    let addrs = nix::ifaddrs::getifaddrs().map_err(io::Error::from)?;
    Ok(addrs
        .filter_map(|a| a.address.and_then(|s| s.as_sockaddr_in().map(|s| s.ip())))
        .collect())
}

/// The IPv4 and IPv6 addresses of all of the host's interfaces.
pub fn system_host_ips() -> io::Result<Vec<IpAddr>> {
    let addrs = nix::ifaddrs::getifaddrs().map_err(io::Error::from)?;
    Ok(addrs
        .filter_map(|a| {
            let s = a.address?;
            if let Some(v4) = s.as_sockaddr_in() {
                return Some(IpAddr::V4(v4.ip()));
            }
            s.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
        })
        .collect())
}

/// What to do with a new flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Allowed; the real destination (differs from the addressed one for
    /// the DNS forwarder).
    Allow(SocketAddr),
    /// Refused.
    Deny(Denial),
}

/// Why a flow was refused, which decides the answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Denial {
    /// Broadcast, multicast or "this network": dropped without an answer.
    Silent,
    /// Administratively prohibited (host, loopback, guest subnet): RST or
    /// ICMP communication administratively prohibited.
    Prohibited,
    /// A gateway address on a port with no service: RST or ICMP port
    /// unreachable, from that address.
    Closed,
    /// The DNS forwarder has no upstream resolver: answered as `Closed`.
    DnsUnavailable,
}

/// The policy state: configuration plus the cached host addresses.
#[derive(Debug)]
pub struct Policy {
    guest: GuestNetConfig,
    guest6: Option<GuestNet6Config>,
    allow_host: bool,
    dns_upstream: Option<Ipv4Addr>,
    dns_upstream6: Option<Ipv6Addr>,
    host: HostAddrs,
    cached: HashSet<IpAddr>,
    refreshed: Option<Instant>,
}

impl Policy {
    /// A policy for the guest subnet `guest`.
    pub fn new(
        guest: GuestNetConfig,
        allow_host: bool,
        dns_upstream: Option<Ipv4Addr>,
        host: HostAddrs,
    ) -> Self {
        Self {
            guest,
            guest6: None,
            allow_host,
            dns_upstream,
            dns_upstream6: None,
            host,
            cached: HashSet::new(),
            refreshed: None,
        }
    }

    /// Serves the guest's IPv6 prefix too, with `upstream6` behind its DNS
    /// address.
    pub fn with_ipv6(mut self, guest6: GuestNet6Config, upstream6: Option<Ipv6Addr>) -> Self {
        self.guest6 = Some(guest6);
        self.dns_upstream6 = upstream6;
        self
    }

    /// The upstream resolver DNS flows go to, if any.
    pub fn dns_upstream(&self) -> Option<Ipv4Addr> {
        self.dns_upstream
    }

    /// Decides on a new TCP or UDP flow to `dst` (as the guest addressed it).
    pub fn check(&mut self, dst: SocketAddr, now: Instant) -> Verdict {
        let ip = match dst.ip() {
            IpAddr::V4(ip) => ip,
            IpAddr::V6(ip) => return self.check6(ip, dst.port(), now),
        };
        if ip.is_broadcast() || ip.is_multicast() || ip.octets()[0] == 0 {
            return Verdict::Deny(Denial::Silent);
        }
        if ip == self.guest.dns && dst.port() == DNS_PORT {
            return match self.dns_upstream {
                Some(up) => Verdict::Allow(SocketAddr::new(IpAddr::V4(up), DNS_PORT)),
                None => Verdict::Deny(Denial::DnsUnavailable),
            };
        }
        if self.guest.is_gateway_addr(ip) {
            return Verdict::Deny(Denial::Closed);
        }
        let mask = u32::from(self.guest.netmask());
        if u32::from(ip) & mask == u32::from(self.guest.guest_addr) & mask {
            if ip == self.guest.broadcast() {
                return Verdict::Deny(Denial::Silent);
            }
            return Verdict::Deny(Denial::Prohibited);
        }
        if ip.is_loopback() {
            return Verdict::Deny(Denial::Prohibited);
        }
        if !self.allow_host && self.is_host_addr(IpAddr::V4(ip), now) {
            return Verdict::Deny(Denial::Prohibited);
        }
        Verdict::Allow(dst)
    }

    /// [`Self::check`] for IPv6.
    fn check6(&mut self, ip: Ipv6Addr, port: u16, now: Instant) -> Verdict {
        let Some(g) = &self.guest6 else {
            return Verdict::Deny(Denial::Prohibited);
        };
        if ip.is_multicast() || ip.is_unspecified() {
            return Verdict::Deny(Denial::Silent);
        }
        if ip == g.dns && port == DNS_PORT {
            return match self.dns_upstream6 {
                Some(up) => Verdict::Allow(SocketAddr::new(IpAddr::V6(up), DNS_PORT)),
                None => Verdict::Deny(Denial::DnsUnavailable),
            };
        }
        if g.is_gateway_addr(ip) {
            return Verdict::Deny(Denial::Closed);
        }
        if g.in_prefix(ip)
            || ip.is_loopback()
            || ip.is_unicast_link_local()
            || ip.to_ipv4_mapped().is_some()
        {
            return Verdict::Deny(Denial::Prohibited);
        }
        if !self.allow_host && self.is_host_addr(IpAddr::V6(ip), now) {
            return Verdict::Deny(Denial::Prohibited);
        }
        Verdict::Allow(SocketAddr::new(IpAddr::V6(ip), port))
    }

    fn is_host_addr(&mut self, ip: IpAddr, now: Instant) -> bool {
        let stale = self
            .refreshed
            .is_none_or(|t| now.saturating_duration_since(t) >= self.host.refresh);
        if stale {
            match (self.host.source)() {
                Ok(addrs) => {
                    debug!("policy: host addresses {addrs:?}");
                    self.cached = addrs.into_iter().collect();
                }
                // Keep the previous set rather than opening the host up.
                Err(e) => warn!("policy: reading the host's addresses: {e}"),
            }
            self.refreshed = Some(now);
        }
        self.cached.contains(&ip)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    };

    use super::*;

    /// A socket address of either family (test shorthand).
    fn sa4(ip: impl Into<std::net::IpAddr>, port: u16) -> std::net::SocketAddr {
        std::net::SocketAddr::new(ip.into(), port)
    }

    const HOST: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);

    fn policy(allow_host: bool, upstream: Option<Ipv4Addr>) -> Policy {
        Policy::new(
            GuestNetConfig::default(),
            allow_host,
            upstream,
            HostAddrs::fixed(vec![HOST, Ipv4Addr::LOCALHOST]),
        )
    }

    fn sa(a: [u8; 4], p: u16) -> SocketAddr {
        sa4(Ipv4Addr::from(a), p)
    }

    #[test]
    fn world_is_allowed() {
        let mut p = policy(false, None);
        let now = Instant::now();
        let d = sa([1, 1, 1, 1], 443);
        assert_eq!(p.check(d, now), Verdict::Allow(d));
        let d = sa([169, 254, 169, 254], 80);
        assert_eq!(p.check(d, now), Verdict::Allow(d));
    }

    #[test]
    fn host_loopback_subnet_are_prohibited() {
        let mut p = policy(false, None);
        let now = Instant::now();
        let deny = Verdict::Deny(Denial::Prohibited);
        assert_eq!(p.check(sa4(HOST, 22), now), deny);
        assert_eq!(p.check(sa([127, 0, 0, 1], 22), now), deny);
        assert_eq!(p.check(sa([127, 9, 9, 9], 22), now), deny);
        assert_eq!(p.check(sa([10, 0, 2, 15], 22), now), deny);
        assert_eq!(p.check(sa([10, 0, 2, 99], 22), now), deny);
    }

    #[test]
    fn allow_host_lifts_only_the_host_restriction() {
        let mut p = policy(true, None);
        let now = Instant::now();
        let d = sa4(HOST, 22);
        assert_eq!(p.check(d, now), Verdict::Allow(d));
        assert_eq!(
            p.check(sa([127, 0, 0, 1], 22), now),
            Verdict::Deny(Denial::Prohibited)
        );
    }

    #[test]
    fn broadcast_multicast_are_silent() {
        let mut p = policy(false, None);
        let now = Instant::now();
        let silent = Verdict::Deny(Denial::Silent);
        for d in [
            sa([255, 255, 255, 255], 67),
            sa([224, 0, 0, 251], 5353),
            sa([239, 255, 255, 250], 1900),
            sa([10, 0, 2, 255], 137),
            sa([0, 0, 0, 0], 80),
        ] {
            assert_eq!(p.check(d, now), silent, "{d}");
        }
    }

    #[test]
    fn dns_and_gateway() {
        let now = Instant::now();
        let up = Ipv4Addr::new(9, 9, 9, 9);
        let mut p = policy(false, Some(up));
        assert_eq!(
            p.check(sa([10, 0, 2, 3], 53), now),
            Verdict::Allow(sa4(up, 53))
        );
        assert_eq!(p.dns_upstream(), Some(up));
        assert_eq!(
            p.check(sa([10, 0, 2, 3], 54), now),
            Verdict::Deny(Denial::Closed)
        );
        assert_eq!(
            p.check(sa([10, 0, 2, 2], 53), now),
            Verdict::Deny(Denial::Closed)
        );
        let mut p = policy(false, None);
        assert_eq!(
            p.check(sa([10, 0, 2, 3], 53), now),
            Verdict::Deny(Denial::DnsUnavailable)
        );
    }

    #[test]
    fn host_addresses_are_refreshed_at_most_every_interval() {
        let calls = Arc::new(AtomicUsize::new(0));
        let c = calls.clone();
        let host = HostAddrs::from_fn(
            move || {
                let n = c.fetch_add(1, Ordering::SeqCst);
                // The host gains an address after the first read.
                Ok(if n == 0 { vec![] } else { vec![HOST.into()] })
            },
            Duration::from_secs(5),
        );
        let mut p = Policy::new(GuestNetConfig::default(), false, None, host);
        let t0 = Instant::now();
        let d = sa4(HOST, 80);
        assert_eq!(p.check(d, t0), Verdict::Allow(d));
        assert_eq!(p.check(d, t0 + Duration::from_secs(4)), Verdict::Allow(d));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(
            p.check(d, t0 + Duration::from_secs(5)),
            Verdict::Deny(Denial::Prohibited)
        );
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn failed_refresh_keeps_the_old_set() {
        let calls = Arc::new(AtomicUsize::new(0));
        let c = calls.clone();
        let host = HostAddrs::from_fn(
            move || {
                if c.fetch_add(1, Ordering::SeqCst) == 0 {
                    Ok(vec![HOST.into()])
                } else {
                    Err(io::Error::other("boom"))
                }
            },
            Duration::ZERO,
        );
        let mut p = Policy::new(GuestNetConfig::default(), false, None, host);
        let now = Instant::now();
        let d = sa4(HOST, 80);
        assert_eq!(p.check(d, now), Verdict::Deny(Denial::Prohibited));
        assert_eq!(p.check(d, now), Verdict::Deny(Denial::Prohibited));
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn system_addresses_include_loopback() {
        let addrs = system_host_addrs().unwrap();
        assert!(addrs.contains(&Ipv4Addr::LOCALHOST), "{addrs:?}");
    }
}
