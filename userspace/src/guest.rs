//! Dispatching frames from the guest to the gateway's services.
//!
//! # Theory of operation
//!
//! Every frame the kernel punts from the tap lands here. The dispatcher
//! checks the Ethernet header, learns the guest's MAC address, and hands the
//! frame to the one service that owns it: ARP for the gateway's addresses,
//! the DHCPv4 server, or ICMP echo to the gateway. Each service returns at
//! most one reply frame, which the caller writes back on the tap. Whatever
//! no service owns, or fails to parse, is counted by kind and dropped — the
//! guest is untrusted and nothing it sends can stop the dispatcher.

use std::time::Instant;

use log::{debug, info};
use smoltcp::wire::{EthernetFrame, EthernetProtocol, IpProtocol, Ipv4Address, Ipv4Packet};

use crate::{
    arp,
    config::GuestNetConfig,
    dhcp::{self, DhcpServer},
    frame::FrameError,
    icmp,
};

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

    /// Handles one frame from the guest; returns the reply frame, if any.
    pub fn handle(&mut self, frame: &[u8], now: Instant) -> Option<Vec<u8>> {
        match self.dispatch(frame, now) {
            Ok(Some(reply)) => Some(reply),
            Ok(None) => None,
            Err(e) => {
                self.stats.malformed += 1;
                debug!("dropped frame from the guest: {e}");
                None
            }
        }
    }

    fn dispatch(&mut self, frame: &[u8], now: Instant) -> Result<Option<Vec<u8>>, FrameError> {
        let eth = EthernetFrame::new_checked(frame).map_err(FrameError::malformed("ethernet"))?;
        let src = eth.src_addr();
        if src.is_unicast() && self.guest_mac != Some(src) {
            info!("guest MAC address is {src}");
            self.guest_mac = Some(src);
        }
        let reply = match eth.ethertype() {
            EthernetProtocol::Arp => {
                arp::reply(&self.cfg, frame)?.inspect(|_| self.stats.arp_replies += 1)
            }
            EthernetProtocol::Ipv4 => self.ipv4(frame, eth.payload(), now)?,
            _ => None,
        };
        if reply.is_none() {
            self.stats.unhandled += 1;
        }
        Ok(reply)
    }

    fn ipv4(
        &mut self,
        frame: &[u8],
        packet: &[u8],
        now: Instant,
    ) -> Result<Option<Vec<u8>>, FrameError> {
        if dhcp::is_dhcp_request(frame) {
            return Ok(self
                .dhcp
                .handle(frame, now)?
                .inspect(|_| self.stats.dhcp_replies += 1));
        }
        let ip = Ipv4Packet::new_checked(packet).map_err(FrameError::malformed("ipv4"))?;
        let dst: Ipv4Address = ip.dst_addr();
        if ip.next_header() == IpProtocol::Icmp && self.cfg.is_gateway_addr(dst) {
            return Ok(
                icmp::echo_reply(&self.cfg, frame)?.inspect(|_| self.stats.echo_replies += 1)
            );
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_is_counted_not_fatal() {
        let mut s = GuestServices::new(GuestNetConfig::default());
        let now = Instant::now();
        assert!(s.handle(&[], now).is_none());
        assert!(s.handle(&[0u8; 13], now).is_none());
        assert_eq!(s.stats().malformed, 2);
        // A well-formed Ethernet frame of an unknown type.
        let mut f = vec![0u8; 60];
        f[0..6].copy_from_slice(&[0x52, 0x55, 10, 0, 2, 2]);
        f[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 1]);
        f[12..14].copy_from_slice(&[0x88, 0xb5]);
        assert!(s.handle(&f, now).is_none());
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
        assert!(s.handle(&f, Instant::now()).is_none());
        assert_eq!(s.stats().malformed, 1);
    }
}
