//! Neighbor Discovery for the gateway: neighbour and router advertisements.
//!
//! # Theory of operation
//!
//! The gateway's IPv6 addresses (the global gateway address, the
//! link-local router address and the DNS address, all in
//! [`GuestNet6Config`]) are virtual, so tapgate answers Neighbor
//! Discovery (RFC 4861) for them itself, with smoltcp's `wire` views:
//!
//! * **Neighbor Solicitation** for one of the gateway's addresses gets a
//!   Neighbor Advertisement with the Router and Override flags and the
//!   gateway's MAC as target link-layer address: unicast to the solicitor
//!   (Solicited flag), or to all nodes for a duplicate-address probe
//!   (unspecified source, RFC 4861 §7.2.4) — the guest learns the address
//!   is taken. A solicitation for any other address, above all a
//!   duplicate-address probe for the guest's own address, is never
//!   answered (RFC 4862 §5.4: the guest's address must stay usable).
//! * **Router Solicitation** gets a Router Advertisement at once, unicast
//!   to the solicitor (§6.2.6 allows the unicast answer). §6.2.6 also asks
//!   for a random delay of up to 0.5 s; with one host on the link, which
//!   the delay exists to desynchronise, tapgate deliberately answers at
//!   once (a guest waits for the first RA it gets). A solicitation from the
//!   unspecified address is answered to all nodes, at most once per
//!   [`MIN_DELAY_BETWEEN_RAS`]: a guest flooding such solicitations gets
//!   no multicast flood back.
//! * **Unsolicited Router Advertisements** go to all nodes: the first
//!   [`INITIAL_ADVERTS`] (the first at start) [`INITIAL_INTERVAL`] apart
//!   (RFC 4861 §6.2.4), then every 200–600 s (`MinRtrAdvInterval` and
//!   `MaxRtrAdvInterval`, §6.2.1), polled with [`Ndp::poll`].
//!
//! Every advertisement comes from the link-local router address with hop
//! limit 255 (§4.2, §7.1.2: receivers drop anything else), and carries:
//! cur hop limit 64, the Managed and Other flags (the DHCPv6 server hands
//! out an address and DNS options), a router lifetime of 1800 s, the
//! gateway's MAC, the tap's MTU, the prefix with the on-link and
//! autonomous flags (SLAAC works beside DHCPv6), RDNSS with the DNS
//! address (RFC 8106) and, when search domains are configured, DNSSL.
//! smoltcp's `NdiscRepr` emits the first options; RDNSS and DNSSL, which
//! smoltcp lacks, are written by [`Rdnss`] and [`Dnssl`] in the same
//! Repr style (`buffer_len` / `emit`), and the ICMPv6 checksum is filled
//! once over the whole message.
//!
//! Incoming messages are validated as §6.1.1 and §7.1.1 require (hop limit
//! 255, code 0, valid checksum, no source link-layer option from an
//! unspecified source, target not multicast, a probe sent to the target's
//! solicited-node group); what fails is a [`FrameError`] and counted by
//! the caller. Advertisements and redirects from the guest are ignored.
//! Nothing a guest sends can make this module panic.

use std::net::Ipv6Addr;
use std::time::{Duration, Instant};

use smoltcp::wire::{
    EthernetAddress, EthernetFrame, EthernetProtocol, EthernetRepr, Icmpv6Message, Icmpv6Packet,
    IpProtocol, Ipv6Packet, Ipv6Repr, NdiscNeighborFlags, NdiscPrefixInfoFlags,
    NdiscPrefixInformation, NdiscRepr, NdiscRouterFlags, RawHardwareAddress,
};

use crate::config::GuestNet6Config;
use crate::services::error::FrameError;

/// Hop limit of every Neighbor Discovery message (RFC 4861 §4).
pub const ND_HOP_LIMIT: u8 = 255;
/// The "Cur Hop Limit" the RA recommends.
pub const ADVERTISED_HOP_LIMIT: u8 = 64;
/// The router lifetime advertised (`AdvDefaultLifetime`, 3 ×
/// `MaxRtrAdvInterval`, RFC 4861 §6.2.1).
pub const ROUTER_LIFETIME: Duration = Duration::from_secs(1800);
/// Lifetime of the RDNSS and DNSSL options (RFC 8106 §5.1 recommends at
/// least 3 × `MaxRtrAdvInterval`).
pub const DNS_LIFETIME_SECS: u32 = 1800;
/// Unsolicited advertisements sent fast after start, the first included
/// (`MAX_INITIAL_RTR_ADVERTISEMENTS`).
pub const INITIAL_ADVERTS: u32 = 3;
/// The least time between two multicast advertisements
/// (`MIN_DELAY_BETWEEN_RAS`, RFC 4861 §10).
pub const MIN_DELAY_BETWEEN_RAS: Duration = Duration::from_secs(3);
/// Their spacing (at most `MAX_INITIAL_RTR_ADVERT_INTERVAL`, 16 s).
pub const INITIAL_INTERVAL: Duration = Duration::from_secs(16);
/// `MinRtrAdvInterval`.
pub const MIN_INTERVAL: Duration = Duration::from_secs(200);
/// `MaxRtrAdvInterval`.
pub const MAX_INTERVAL: Duration = Duration::from_secs(600);

/// The all-nodes multicast group.
pub const ALL_NODES: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);

/// Option type of Recursive DNS Server (RFC 8106 §5.1).
const OPT_RDNSS: u8 = 25;
/// Option type of DNS Search List (RFC 8106 §5.2).
const OPT_DNSSL: u8 = 31;

/// The Ethernet multicast address of an IPv6 multicast group (RFC 2464
/// §7): `33:33` and the group's last four bytes.
pub fn multicast_mac(group: Ipv6Addr) -> EthernetAddress {
    let o = group.octets();
    EthernetAddress([0x33, 0x33, o[12], o[13], o[14], o[15]])
}

/// The solicited-node multicast group of `addr` (RFC 4291 §2.7.1):
/// `ff02::1:ff` and its last three bytes.
pub fn solicited_node(addr: Ipv6Addr) -> Ipv6Addr {
    let o = addr.octets();
    Ipv6Addr::from([
        0xff, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0xff, o[13], o[14], o[15],
    ])
}

/// The Recursive DNS Server option (RFC 8106 §5.1).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rdnss<'a> {
    /// How long the addresses may be used, in seconds.
    pub lifetime: u32,
    /// The DNS servers (at least one).
    pub servers: &'a [Ipv6Addr],
}

impl Rdnss<'_> {
    /// Bytes of the option on the wire (8 + 16 per server).
    pub fn buffer_len(&self) -> usize {
        8 + 16 * self.servers.len()
    }

    /// Writes the option at the start of `buf` (at least
    /// [`Self::buffer_len`] bytes); returns the bytes written, 0 if the
    /// option does not fit or is too long for its length byte.
    pub fn emit(&self, buf: &mut [u8]) -> usize {
        let len = self.buffer_len();
        let Some(units) = u8::try_from(len / 8).ok().filter(|_| len <= buf.len()) else {
            return 0;
        };
        let Some(out) = buf.get_mut(..len) else {
            return 0;
        };
        out.fill(0);
        out[0] = OPT_RDNSS;
        out[1] = units;
        out[4..8].copy_from_slice(&self.lifetime.to_be_bytes());
        for (chunk, server) in out[8..].chunks_exact_mut(16).zip(self.servers) {
            chunk.copy_from_slice(&server.octets());
        }
        len
    }
}

/// The DNS Search List option (RFC 8106 §5.2): domain names in DNS wire
/// format (RFC 1035 §3.1), zero-padded to a multiple of 8 bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dnssl<'a> {
    /// How long the domains may be used, in seconds.
    pub lifetime: u32,
    /// The search domains ("example.com", no trailing dot needed).
    pub domains: &'a [String],
}

/// `name` in DNS wire format: length-prefixed labels and a zero byte;
/// `None` for an empty label, a label over 63 bytes or a name over 255.
pub fn dns_name(name: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(name.len() + 2);
    for label in name.trim_end_matches('.').split('.') {
        let len = u8::try_from(label.len())
            .ok()
            .filter(|l| (1..=63).contains(l))?;
        out.push(len);
        out.extend_from_slice(label.as_bytes());
    }
    out.push(0);
    (out.len() <= 255).then_some(out)
}

impl Dnssl<'_> {
    /// The encoded names (those that cannot be encoded are left out).
    fn names(&self) -> Vec<u8> {
        self.domains
            .iter()
            .filter_map(|d| dns_name(d))
            .flatten()
            .collect()
    }

    /// Bytes of the option on the wire; 0 when no domain can be encoded.
    pub fn buffer_len(&self) -> usize {
        let names = self.names().len();
        if names == 0 {
            return 0;
        }
        (8 + names).div_ceil(8) * 8
    }

    /// Writes the option at the start of `buf`; returns the bytes written,
    /// 0 when it does not fit or there is nothing to write.
    pub fn emit(&self, buf: &mut [u8]) -> usize {
        let names = self.names();
        let len = self.buffer_len();
        let Some(units) = u8::try_from(len / 8).ok().filter(|u| *u > 0) else {
            return 0;
        };
        let Some(out) = buf.get_mut(..len) else {
            return 0;
        };
        out.fill(0);
        out[0] = OPT_DNSSL;
        out[1] = units;
        out[4..8].copy_from_slice(&self.lifetime.to_be_bytes());
        out[8..8 + names.len()].copy_from_slice(&names);
        len
    }
}

/// Counters of the NDP service.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NdpStats {
    /// Neighbor Advertisements sent.
    pub neighbor_adverts: u64,
    /// Router Advertisements sent in answer to a solicitation.
    pub solicited_adverts: u64,
    /// Router Advertisements sent unsolicited.
    pub unsolicited_adverts: u64,
    /// Duplicate-address probes for addresses not the gateway's (left
    /// unanswered, as they must be).
    pub dad_probes: u64,
}

/// The gateway's Neighbor Discovery.
#[derive(Debug)]
pub struct Ndp {
    cfg: GuestNet6Config,
    /// When the next unsolicited advertisement is due.
    next_advert: Instant,
    /// Unsolicited advertisements sent so far.
    adverts_sent: u32,
    /// When the last multicast advertisement went out.
    last_multicast: Option<Instant>,
    stats: NdpStats,
}

impl Ndp {
    /// The service for `cfg`; the first unsolicited advertisement is due
    /// at `now`.
    pub fn new(cfg: GuestNet6Config, now: Instant) -> Self {
        Self {
            cfg,
            next_advert: now,
            adverts_sent: 0,
            last_multicast: None,
            stats: NdpStats::default(),
        }
    }

    /// The counters so far.
    pub fn stats(&self) -> &NdpStats {
        &self.stats
    }

    /// The unsolicited advertisement, when one is due at `now`.
    pub fn poll(&mut self, now: Instant) -> Option<Vec<u8>> {
        if now < self.next_advert {
            return None;
        }
        self.adverts_sent = self.adverts_sent.saturating_add(1);
        self.next_advert = now + self.interval(now);
        self.last_multicast = Some(now);
        self.stats.unsolicited_adverts += 1;
        Some(self.router_advert(ALL_NODES, multicast_mac(ALL_NODES)))
    }

    /// The wait before the next unsolicited advertisement: fast at first,
    /// then uniformly spread over [`MIN_INTERVAL`, `MAX_INTERVAL`) (RFC
    /// 4861 §6.2.4 wants it random, so routers on one link do not
    /// synchronise).
    fn interval(&self, now: Instant) -> Duration {
        if self.adverts_sent < INITIAL_ADVERTS {
            return INITIAL_INTERVAL;
        }
        let span = (MAX_INTERVAL - MIN_INTERVAL).as_millis();
        let seed = now.elapsed().as_nanos()
            ^ u128::from(self.adverts_sent).wrapping_mul(0x9e37_79b9_7f4a_7c15)
            ^ std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0);
        let jitter = u64::try_from(seed % span.max(1)).unwrap_or(0);
        MIN_INTERVAL + Duration::from_millis(jitter)
    }

    /// Handles one ICMPv6 Neighbor Discovery frame from the guest: the
    /// reply frame, if one is due.
    pub fn handle(&mut self, frame: &[u8], now: Instant) -> Result<Option<Vec<u8>>, FrameError> {
        let eth = EthernetFrame::new_checked(frame).map_err(FrameError::malformed("ethernet"))?;
        if eth.ethertype() != EthernetProtocol::Ipv6 {
            return Err(FrameError::Unsupported("ethertype (not ipv6)"));
        }
        let ip = Ipv6Packet::new_checked(eth.payload()).map_err(FrameError::malformed("ipv6"))?;
        let ip_repr = Ipv6Repr::parse(&ip).map_err(FrameError::malformed("ipv6"))?;
        if ip_repr.next_header != IpProtocol::Icmpv6 {
            return Err(FrameError::Unsupported("ip protocol (not icmpv6)"));
        }
        let icmp =
            Icmpv6Packet::new_checked(ip.payload()).map_err(FrameError::malformed("icmpv6"))?;
        if !icmp.verify_checksum(&ip_repr.src_addr, &ip_repr.dst_addr) {
            return Err(FrameError::Unsupported("icmpv6 checksum"));
        }
        if !matches!(
            icmp.msg_type(),
            Icmpv6Message::NeighborSolicit
                | Icmpv6Message::RouterSolicit
                | Icmpv6Message::NeighborAdvert
                | Icmpv6Message::RouterAdvert
                | Icmpv6Message::Redirect
        ) {
            return Err(FrameError::Unsupported("icmpv6 (not ndp)"));
        }
        // RFC 4861 §6.1.1, §7.1.1: only link-local senders can use hop
        // limit 255, and every ND message has code 0.
        if ip_repr.hop_limit != ND_HOP_LIMIT {
            return Err(FrameError::Unsupported("ndp hop limit (not 255)"));
        }
        if icmp.msg_code() != 0 {
            return Err(FrameError::Unsupported("ndp code (not 0)"));
        }
        let ndisc = NdiscRepr::parse(&icmp).map_err(FrameError::malformed("ndp"))?;
        let src = ip_repr.src_addr;
        let from_unspecified = src.is_unspecified();
        match ndisc {
            NdiscRepr::NeighborSolicit {
                target_addr,
                lladdr,
            } => {
                if target_addr.is_multicast() {
                    return Err(FrameError::Unsupported("ns for a multicast target"));
                }
                if from_unspecified
                    && (lladdr.is_some() || ip_repr.dst_addr != solicited_node(target_addr))
                {
                    return Err(FrameError::Unsupported("malformed duplicate-address probe"));
                }
                if !self.cfg.is_gateway_addr(target_addr) {
                    if from_unspecified {
                        // The guest checks its own address: silence is
                        // the answer that lets it use it.
                        self.stats.dad_probes += 1;
                    }
                    return Ok(None);
                }
                let (dst, dst_mac, solicited) = if from_unspecified {
                    (ALL_NODES, multicast_mac(ALL_NODES), false)
                } else {
                    (src, hardware_of(lladdr).unwrap_or(eth.src_addr()), true)
                };
                let mut flags = NdiscNeighborFlags::ROUTER | NdiscNeighborFlags::OVERRIDE;
                if solicited {
                    flags |= NdiscNeighborFlags::SOLICITED;
                }
                let na = NdiscRepr::NeighborAdvert {
                    flags,
                    target_addr,
                    lladdr: Some(RawHardwareAddress::from(self.cfg.gateway_mac)),
                };
                self.stats.neighbor_adverts += 1;
                // From the address asked for, as hosts answer.
                Ok(Some(self.frame(target_addr, dst, dst_mac, |buf| {
                    let mut pkt = Icmpv6Packet::new_unchecked(buf);
                    na.emit(&mut pkt);
                    na.buffer_len()
                })))
            }
            NdiscRepr::RouterSolicit { lladdr } => {
                if from_unspecified && lladdr.is_some() {
                    return Err(FrameError::Unsupported("rs with lladdr from ::"));
                }
                if from_unspecified {
                    if self
                        .last_multicast
                        .is_some_and(|t| now.saturating_duration_since(t) < MIN_DELAY_BETWEEN_RAS)
                    {
                        return Ok(None);
                    }
                    self.last_multicast = Some(now);
                    self.stats.solicited_adverts += 1;
                    return Ok(Some(
                        self.router_advert(ALL_NODES, multicast_mac(ALL_NODES)),
                    ));
                }
                self.stats.solicited_adverts += 1;
                let mac = hardware_of(lladdr).unwrap_or(eth.src_addr());
                Ok(Some(self.router_advert(src, mac)))
            }
            // Hosts do not advertise routes to us, and the gateway has no
            // neighbour cache to update: the guest's MAC is learned from
            // its frames.
            _ => Ok(None),
        }
    }

    /// A complete Router Advertisement frame to `dst` at `dst_mac`.
    pub fn router_advert(&self, dst: Ipv6Addr, dst_mac: EthernetAddress) -> Vec<u8> {
        let cfg = &self.cfg;
        let ra = NdiscRepr::RouterAdvert {
            hop_limit: ADVERTISED_HOP_LIMIT,
            flags: NdiscRouterFlags::MANAGED | NdiscRouterFlags::OTHER,
            router_lifetime: smoltcp::time::Duration::from_secs(ROUTER_LIFETIME.as_secs()),
            reachable_time: smoltcp::time::Duration::ZERO,
            retrans_time: smoltcp::time::Duration::ZERO,
            lladdr: Some(RawHardwareAddress::from(cfg.gateway_mac)),
            mtu: Some(u32::from(cfg.mtu)),
            prefix_info: Some(NdiscPrefixInformation {
                prefix_len: cfg.prefix_len,
                flags: NdiscPrefixInfoFlags::ON_LINK | NdiscPrefixInfoFlags::ADDRCONF,
                valid_lifetime: smoltcp::time::Duration::from_secs(u64::from(cfg.lease_secs)),
                preferred_lifetime: smoltcp::time::Duration::from_secs(u64::from(cfg.lease_secs)),
                prefix: cfg.prefix,
            }),
        };
        let servers = [cfg.dns];
        let rdnss = Rdnss {
            lifetime: DNS_LIFETIME_SECS,
            servers: &servers,
        };
        let dnssl = Dnssl {
            lifetime: DNS_LIFETIME_SECS,
            domains: &cfg.search,
        };
        self.frame(cfg.router_ll, dst, dst_mac, |buf| {
            let base = ra.buffer_len();
            let mut pkt = Icmpv6Packet::new_unchecked(&mut buf[..base]);
            ra.emit(&mut pkt);
            let mut at = base;
            at += buf.get_mut(at..).map_or(0, |b| rdnss.emit(b));
            at += buf.get_mut(at..).map_or(0, |b| dnssl.emit(b));
            at
        })
    }

    /// An Ethernet frame from the gateway carrying the ICMPv6 message that
    /// `body` writes (into a buffer large enough for any RA); the ICMPv6
    /// checksum is filled here.
    fn frame(
        &self,
        src: Ipv6Addr,
        dst: Ipv6Addr,
        dst_mac: EthernetAddress,
        body: impl FnOnce(&mut [u8]) -> usize,
    ) -> Vec<u8> {
        let mut icmp = vec![0u8; 1024];
        let len = body(&mut icmp).min(icmp.len());
        icmp.truncate(len);
        {
            let mut pkt = Icmpv6Packet::new_unchecked(&mut icmp[..]);
            pkt.fill_checksum(&src, &dst);
        }
        let ip = Ipv6Repr {
            src_addr: src,
            dst_addr: dst,
            next_header: IpProtocol::Icmpv6,
            payload_len: icmp.len(),
            hop_limit: ND_HOP_LIMIT,
        };
        let eth = EthernetRepr {
            src_addr: self.cfg.gateway_mac,
            dst_addr: dst_mac,
            ethertype: EthernetProtocol::Ipv6,
        };
        let mut frame = vec![0u8; eth.buffer_len() + ip.buffer_len() + icmp.len()];
        let mut f = EthernetFrame::new_unchecked(&mut frame[..]);
        eth.emit(&mut f);
        let mut p = Ipv6Packet::new_unchecked(f.payload_mut());
        ip.emit(&mut p);
        p.payload_mut().copy_from_slice(&icmp);
        frame
    }
}

/// The Ethernet address in a link-layer address option.
fn hardware_of(lladdr: Option<RawHardwareAddress>) -> Option<EthernetAddress> {
    let raw = lladdr?;
    let bytes = raw.as_bytes();
    (bytes.len() == 6)
        .then(|| EthernetAddress::from_bytes(bytes))
        .filter(|m| m.is_unicast())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)]
mod tests {
    use super::*;
    use smoltcp::phy::ChecksumCapabilities;
    use smoltcp::wire::{Icmpv6Repr, NdiscOption, NdiscOptionRepr};

    const GUEST_MAC: EthernetAddress = EthernetAddress([0x02, 0, 0, 0, 0, 0x15]);
    const GUEST_LL: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0x15);

    fn cfg() -> GuestNet6Config {
        GuestNet6Config {
            search: vec!["example.test".to_owned(), "corp.example".to_owned()],
            ..GuestNet6Config::default()
        }
    }

    /// A frame from the guest carrying the ND message `nd`.
    fn frame(src: Ipv6Addr, dst: Ipv6Addr, hop_limit: u8, nd: &NdiscRepr<'_>) -> Vec<u8> {
        let msg = Icmpv6Repr::Ndisc(*nd);
        let ip = Ipv6Repr {
            src_addr: src,
            dst_addr: dst,
            next_header: IpProtocol::Icmpv6,
            payload_len: msg.buffer_len(),
            hop_limit,
        };
        let eth = EthernetRepr {
            src_addr: GUEST_MAC,
            dst_addr: multicast_mac(dst),
            ethertype: EthernetProtocol::Ipv6,
        };
        let mut f = vec![0u8; 14 + 40 + msg.buffer_len()];
        let mut e = EthernetFrame::new_unchecked(&mut f[..]);
        eth.emit(&mut e);
        let mut p = Ipv6Packet::new_unchecked(e.payload_mut());
        ip.emit(&mut p);
        let mut icmp = Icmpv6Packet::new_unchecked(p.payload_mut());
        msg.emit(&src, &dst, &mut icmp, &ChecksumCapabilities::default());
        f
    }

    /// The reply's Ethernet destination, IPv6 header and ICMPv6 bytes,
    /// with the checksum verified.
    fn parse(reply: &[u8]) -> (EthernetAddress, Ipv6Repr, Vec<u8>) {
        let eth = EthernetFrame::new_checked(reply).unwrap();
        assert_eq!(eth.src_addr(), GuestNet6Config::default().gateway_mac);
        assert_eq!(eth.ethertype(), EthernetProtocol::Ipv6);
        let ip = Ipv6Packet::new_checked(eth.payload()).unwrap();
        let repr = Ipv6Repr::parse(&ip).unwrap();
        let icmp = Icmpv6Packet::new_checked(ip.payload()).unwrap();
        assert!(icmp.verify_checksum(&repr.src_addr, &repr.dst_addr));
        (eth.dst_addr(), repr, ip.payload().to_vec())
    }

    /// Every option of an RA or NA body: (type, bytes including the
    /// type/length header).
    fn options(icmp: &[u8], fixed: usize) -> Vec<(u8, Vec<u8>)> {
        let mut out = Vec::new();
        let mut rest = &icmp[fixed..];
        while !rest.is_empty() {
            let len = usize::from(rest[1]) * 8;
            assert!(len > 0 && len <= rest.len(), "bad option length");
            out.push((rest[0], rest[..len].to_vec()));
            rest = &rest[len..];
        }
        out
    }

    fn ns(target: Ipv6Addr, lladdr: Option<EthernetAddress>) -> NdiscRepr<'static> {
        NdiscRepr::NeighborSolicit {
            target_addr: target,
            lladdr: lladdr.map(RawHardwareAddress::from),
        }
    }

    #[test]
    fn neighbor_solicitation_for_the_gateway_gets_an_advertisement() {
        let c = cfg();
        let mut ndp = Ndp::new(c.clone(), Instant::now());
        for target in [c.gateway, c.router_ll, c.dns] {
            let f = frame(
                GUEST_LL,
                solicited_node(target),
                255,
                &ns(target, Some(GUEST_MAC)),
            );
            let reply = ndp.handle(&f, Instant::now()).unwrap().unwrap();
            let (mac, ip, icmp) = parse(&reply);
            assert_eq!(mac, GUEST_MAC);
            assert_eq!(
                (ip.src_addr, ip.dst_addr, ip.hop_limit),
                (target, GUEST_LL, 255)
            );
            let pkt = Icmpv6Packet::new_checked(&icmp[..]).unwrap();
            let NdiscRepr::NeighborAdvert {
                flags,
                target_addr,
                lladdr,
            } = NdiscRepr::parse(&pkt).unwrap()
            else {
                panic!("not an NA");
            };
            assert_eq!(target_addr, target);
            assert_eq!(
                flags,
                NdiscNeighborFlags::ROUTER
                    | NdiscNeighborFlags::SOLICITED
                    | NdiscNeighborFlags::OVERRIDE
            );
            assert_eq!(hardware_of(lladdr), Some(c.gateway_mac));
        }
        assert_eq!(ndp.stats().neighbor_adverts, 3);
    }

    #[test]
    fn solicitation_without_source_option_is_answered_to_the_frame_source() {
        let c = cfg();
        let mut ndp = Ndp::new(c.clone(), Instant::now());
        let f = frame(GUEST_LL, c.gateway, 255, &ns(c.gateway, None));
        let (mac, ip, _) = parse(&ndp.handle(&f, Instant::now()).unwrap().unwrap());
        assert_eq!((mac, ip.dst_addr), (GUEST_MAC, GUEST_LL));
    }

    #[test]
    fn duplicate_address_probes() {
        let c = cfg();
        let mut ndp = Ndp::new(c.clone(), Instant::now());
        let un = Ipv6Addr::UNSPECIFIED;
        // The guest probing its own (or any other) address: never answered.
        for target in [
            c.guest_addr,
            GUEST_LL,
            Ipv6Addr::new(0xfd00, 0, 0, 0, 1, 2, 3, 4),
        ] {
            let f = frame(un, solicited_node(target), 255, &ns(target, None));
            assert_eq!(ndp.handle(&f, Instant::now()).unwrap(), None);
        }
        assert_eq!(ndp.stats().dad_probes, 3);
        // A probe for the gateway's address is defended, to all nodes and
        // without the Solicited flag (RFC 4861 §7.2.4).
        let f = frame(un, solicited_node(c.gateway), 255, &ns(c.gateway, None));
        let (mac, ip, icmp) = parse(&ndp.handle(&f, Instant::now()).unwrap().unwrap());
        assert_eq!((mac, ip.dst_addr), (multicast_mac(ALL_NODES), ALL_NODES));
        let pkt = Icmpv6Packet::new_checked(&icmp[..]).unwrap();
        let NdiscRepr::NeighborAdvert { flags, .. } = NdiscRepr::parse(&pkt).unwrap() else {
            panic!("not an NA");
        };
        assert!(!flags.contains(NdiscNeighborFlags::SOLICITED));
        // A probe must go to the solicited-node group and carry no source
        // link-layer address.
        let f = frame(un, c.gateway, 255, &ns(c.gateway, None));
        assert!(ndp.handle(&f, Instant::now()).is_err());
        let f = frame(
            un,
            solicited_node(c.gateway),
            255,
            &ns(c.gateway, Some(GUEST_MAC)),
        );
        assert!(ndp.handle(&f, Instant::now()).is_err());
    }

    #[test]
    fn solicitation_for_another_address_is_not_answered() {
        let mut ndp = Ndp::new(cfg(), Instant::now());
        let other = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0x99);
        let f = frame(
            GUEST_LL,
            solicited_node(other),
            255,
            &ns(other, Some(GUEST_MAC)),
        );
        assert_eq!(ndp.handle(&f, Instant::now()).unwrap(), None);
        assert_eq!(ndp.stats().neighbor_adverts, 0);
    }

    #[test]
    fn invalid_nd_messages_are_refused() {
        let c = cfg();
        let mut ndp = Ndp::new(c.clone(), Instant::now());
        // Hop limit other than 255: could come from off-link.
        let f = frame(GUEST_LL, c.gateway, 64, &ns(c.gateway, None));
        assert!(ndp.handle(&f, Instant::now()).is_err());
        // A multicast target.
        let f = frame(GUEST_LL, ALL_NODES, 255, &ns(ALL_NODES, None));
        assert!(ndp.handle(&f, Instant::now()).is_err());
        // A bad checksum.
        let mut f = frame(GUEST_LL, c.gateway, 255, &ns(c.gateway, None));
        let last = f.len() - 1;
        f[last] ^= 0xff;
        assert!(ndp.handle(&f, Instant::now()).is_err());
        // A non-zero code (checksum refreshed).
        let mut f = frame(GUEST_LL, c.gateway, 255, &ns(c.gateway, None));
        f[14 + 40 + 1] = 1;
        Icmpv6Packet::new_unchecked(&mut f[14 + 40..]).fill_checksum(&GUEST_LL, &c.gateway);
        assert!(ndp.handle(&f, Instant::now()).is_err());
        // Truncated frames of every length.
        let f = frame(GUEST_LL, c.gateway, 255, &ns(c.gateway, Some(GUEST_MAC)));
        for n in 0..f.len() {
            let _ = ndp.handle(&f[..n], Instant::now());
        }
        assert_eq!(ndp.stats().neighbor_adverts, 0);
    }

    #[test]
    fn router_solicitation_gets_a_complete_advertisement() {
        let c = cfg();
        let mut ndp = Ndp::new(c.clone(), Instant::now());
        let rs = NdiscRepr::RouterSolicit {
            lladdr: Some(RawHardwareAddress::from(GUEST_MAC)),
        };
        let f = frame(
            GUEST_LL,
            Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 2),
            255,
            &rs,
        );
        let (mac, ip, icmp) = parse(&ndp.handle(&f, Instant::now()).unwrap().unwrap());
        assert_eq!(mac, GUEST_MAC);
        assert_eq!(
            (ip.src_addr, ip.dst_addr, ip.hop_limit),
            (c.router_ll, GUEST_LL, 255)
        );
        let pkt = Icmpv6Packet::new_checked(&icmp[..]).unwrap();
        assert_eq!(pkt.msg_type(), Icmpv6Message::RouterAdvert);
        assert_eq!(pkt.current_hop_limit(), 64);
        assert_eq!(
            pkt.router_flags(),
            NdiscRouterFlags::MANAGED | NdiscRouterFlags::OTHER
        );
        assert_eq!(pkt.router_lifetime().secs(), 1800);
        let opts = options(&icmp, 16);
        let kinds: Vec<u8> = opts.iter().map(|(t, _)| *t).collect();
        assert_eq!(kinds, vec![1, 5, 3, OPT_RDNSS, OPT_DNSSL]);
        for (_, bytes) in &opts {
            let opt = NdiscOption::new_checked(&bytes[..]).unwrap();
            match NdiscOptionRepr::parse(&opt).unwrap() {
                NdiscOptionRepr::SourceLinkLayerAddr(a) => {
                    assert_eq!(hardware_of(Some(a)), Some(c.gateway_mac));
                }
                NdiscOptionRepr::Mtu(m) => assert_eq!(m, 1500),
                NdiscOptionRepr::PrefixInformation(p) => {
                    assert_eq!((p.prefix, p.prefix_len), (c.prefix, 64));
                    assert!(p.is_valid_prefix_info());
                    assert!(p.flags.contains(NdiscPrefixInfoFlags::ON_LINK));
                    assert_eq!(p.valid_lifetime.secs(), u64::from(c.lease_secs));
                }
                NdiscOptionRepr::Unknown { type_, data, .. } if type_ == OPT_RDNSS => {
                    assert_eq!(&data[2..6], &DNS_LIFETIME_SECS.to_be_bytes());
                    assert_eq!(&data[6..22], &c.dns.octets());
                }
                NdiscOptionRepr::Unknown { type_, data, .. } if type_ == OPT_DNSSL => {
                    let mut want = dns_name("example.test").unwrap();
                    want.extend(dns_name("corp.example").unwrap());
                    assert_eq!(&data[6..6 + want.len()], &want[..]);
                    assert!(data[6 + want.len()..].iter().all(|b| *b == 0));
                    assert_eq!((data.len() + 2) % 8, 0);
                }
                other => panic!("unexpected option {other:?}"),
            }
        }
        assert_eq!(ndp.stats().solicited_adverts, 1);
        // From the unspecified address: to all nodes; with a source
        // link-layer option from there: refused.
        let rs = NdiscRepr::RouterSolicit { lladdr: None };
        let f = frame(
            Ipv6Addr::UNSPECIFIED,
            Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 2),
            255,
            &rs,
        );
        let (mac, ip, _) = parse(&ndp.handle(&f, Instant::now()).unwrap().unwrap());
        assert_eq!((mac, ip.dst_addr), (multicast_mac(ALL_NODES), ALL_NODES));
        let rs = NdiscRepr::RouterSolicit {
            lladdr: Some(RawHardwareAddress::from(GUEST_MAC)),
        };
        let f = frame(
            Ipv6Addr::UNSPECIFIED,
            Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 2),
            255,
            &rs,
        );
        assert!(ndp.handle(&f, Instant::now()).is_err());
    }

    #[test]
    fn no_search_domains_no_dnssl() {
        let ndp = Ndp::new(GuestNet6Config::default(), Instant::now());
        let ra = ndp.router_advert(ALL_NODES, multicast_mac(ALL_NODES));
        let (_, _, icmp) = parse(&ra);
        let kinds: Vec<u8> = options(&icmp, 16).iter().map(|(t, _)| *t).collect();
        assert_eq!(kinds, vec![1, 5, 3, OPT_RDNSS]);
    }

    #[test]
    fn unsolicited_adverts_follow_rfc_4861_timers() {
        let t0 = Instant::now();
        let mut ndp = Ndp::new(cfg(), t0);
        let first = ndp.poll(t0).unwrap();
        let (mac, ip, _) = parse(&first);
        assert_eq!(
            (mac, ip.dst_addr, ip.src_addr),
            (multicast_mac(ALL_NODES), ALL_NODES, cfg().router_ll)
        );
        assert!(ndp.poll(t0 + Duration::from_secs(1)).is_none());
        // The rest of the first three, 16 s apart.
        let mut t = t0;
        for _ in 1..INITIAL_ADVERTS {
            t += INITIAL_INTERVAL;
            assert!(ndp.poll(t - Duration::from_millis(1)).is_none());
            assert!(ndp.poll(t).is_some());
        }
        // Then 200 to 600 s apart.
        for _ in 0..20 {
            let mut step = Duration::ZERO;
            loop {
                step += Duration::from_secs(1);
                assert!(step <= MAX_INTERVAL, "no advert within MaxRtrAdvInterval");
                if ndp.poll(t + step).is_some() {
                    break;
                }
            }
            assert!(step >= MIN_INTERVAL, "advert after only {step:?}");
            t += step;
        }
        assert_eq!(
            ndp.stats().unsolicited_adverts,
            u64::from(INITIAL_ADVERTS) + 20
        );
    }

    #[test]
    fn helpers() {
        assert_eq!(
            solicited_node("fd00::1234:5678".parse().unwrap()),
            "ff02::1:ff34:5678".parse::<Ipv6Addr>().unwrap()
        );
        assert_eq!(
            multicast_mac(ALL_NODES),
            EthernetAddress([0x33, 0x33, 0, 0, 0, 1])
        );
        assert_eq!(dns_name("a.bc").unwrap(), b"\x01a\x02bc\x00");
        assert_eq!(dns_name("a.bc.").unwrap(), b"\x01a\x02bc\x00");
        assert!(dns_name("a..b").is_none());
        assert!(dns_name(&"x".repeat(64)).is_none());
        // A domain that cannot be encoded is left out, the others kept.
        let domains = vec!["bad..name".to_owned()];
        let d = Dnssl {
            lifetime: 1,
            domains: &domains,
        };
        assert_eq!(d.buffer_len(), 0);
        assert_eq!(d.emit(&mut [0u8; 64]), 0);
        let r = Rdnss {
            lifetime: 1,
            servers: &[ALL_NODES],
        };
        assert_eq!(r.emit(&mut [0u8; 8]), 0, "does not fit");
    }
}
