//! Dispatching frames from the guest to the gateway's services.
//!
//! # Theory of operation
//!
//! Every frame the kernel punts from the tap lands here. The dispatcher
//! checks the Ethernet header, learns the guest's MAC address, and hands the
//! frame to the one service that owns it: ARP for the gateway's addresses,
//! the DHCPv4 server, or ICMP echo to the gateway. Each service returns at
//! most one reply frame, which the caller writes back on the tap. Other
//! IPv4 traffic is handed back unclaimed ([`Claim::NotMine`]) for the flow
//! manager. Whatever no one owns, or fails to parse, is counted by kind and
//! dropped — the guest is untrusted and nothing it sends can stop the
//! dispatcher.

use std::time::Instant;

use log::{debug, info};
use smoltcp::wire::{EthernetFrame, EthernetProtocol, IpProtocol, Ipv4Address, Ipv4Packet};

use crate::config::GuestNetConfig;

pub mod arp;
pub mod dhcpv4;
pub mod echo;
pub mod error;

use dhcpv4::DhcpServer;
use error::FrameError;

/// Counters of the guest services.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceStats {
    /// ARP replies sent.
    pub arp_replies: u64,
    /// DHCP replies sent.
    pub dhcp_replies: u64,
    /// ICMP echo replies sent by the gateway.
    pub echo_replies: u64,
    /// Frames dropped because they failed to parse.
    pub malformed: u64,
    /// Well-formed frames no service handles (yet).
    pub unhandled: u64,
}

/// The gateway's services for one guest.
pub struct GuestServices {
    cfg: GuestNetConfig,
    dhcp: DhcpServer,
    guest_mac: Option<smoltcp::wire::EthernetAddress>,
    stats: ServiceStats,
}

impl GuestServices {
    /// Services for the subnet described by `cfg`.
    pub fn new(cfg: GuestNetConfig) -> Self {
        Self {
            dhcp: DhcpServer::new(cfg.clone()),
            cfg,
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
    /// MAC address and its DHCP lease.
    pub fn snapshot(&self) -> crate::state::GuestState {
        crate::state::GuestState::new(self.guest_mac, self.dhcp.lease())
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
}

/// What the services made of a frame.
#[derive(Debug, PartialEq, Eq)]
pub enum Claim {
    /// Handled; this frame goes back to the guest.
    Reply(Vec<u8>),
    /// Handled (or dropped and counted); nothing to send.
    Consumed,
    /// An IPv4 packet that is not for the gateway's services: it belongs to
    /// the flow manager.
    NotMine,
}

impl From<Option<Vec<u8>>> for Claim {
    fn from(reply: Option<Vec<u8>>) -> Self {
        reply.map_or(Self::Consumed, Self::Reply)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_is_counted_not_fatal() {
        let mut s = GuestServices::new(GuestNetConfig::default());
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
        let mut s = GuestServices::new(GuestNetConfig::default());
        let mut f = vec![0u8; 20];
        f[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 1]);
        f[12..14].copy_from_slice(&[0x08, 0x00]);
        assert_eq!(s.handle(&f, Instant::now()), Claim::Consumed);
        assert_eq!(s.stats().malformed, 1);
    }
}
