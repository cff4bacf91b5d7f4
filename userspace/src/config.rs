//! The guest-facing network configuration, resolved from the command line.
//!
//! # Theory of operation
//!
//! tapgate plays the gateway of a small virtual subnet, as QEMU's user
//! networking does: the guest gets one address by DHCP, the gateway and the
//! DNS forwarder are virtual addresses answered by user space, and the
//! gateway has a MAC address of its own (`--mac`). The guest's MAC is learned
//! from its frames. Defaults are QEMU's: guest `10.0.2.15/24`, gateway
//! `10.0.2.2`, DNS `10.0.2.3`.

use std::net::Ipv4Addr;

use smoltcp::wire::EthernetAddress;

/// Default guest address (QEMU user networking).
pub const DEFAULT_GUEST_ADDR: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);
/// Default prefix length of the guest subnet.
pub const DEFAULT_PREFIX_LEN: u8 = 24;
/// Default gateway address.
pub const DEFAULT_GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
/// Default DNS forwarder address.
pub const DEFAULT_DNS: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 3);
/// Default gateway MAC: locally administered, `52:55` followed by the
/// default gateway address, as QEMU's slirp does.
pub const DEFAULT_GATEWAY_MAC: EthernetAddress = EthernetAddress([0x52, 0x55, 10, 0, 2, 2]);
/// Default DHCP lease time in seconds (one day).
pub const DEFAULT_LEASE_SECS: u32 = 86_400;

/// Everything the guest services need to know about the virtual subnet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuestNetConfig {
    /// The address handed to the guest.
    pub guest_addr: Ipv4Addr,
    /// Prefix length of the guest subnet.
    pub prefix_len: u8,
    /// The gateway's address (answered by tapgate).
    pub gateway: Ipv4Addr,
    /// The DNS forwarder's address (answered by tapgate).
    pub dns: Ipv4Addr,
    /// The gateway's MAC address.
    pub gateway_mac: EthernetAddress,
    /// MTU advertised to the guest (DHCP option 26), the tap's MTU.
    pub mtu: u16,
    /// DHCP lease time in seconds.
    pub lease_secs: u32,
}

impl Default for GuestNetConfig {
    fn default() -> Self {
        Self {
            guest_addr: DEFAULT_GUEST_ADDR,
            prefix_len: DEFAULT_PREFIX_LEN,
            gateway: DEFAULT_GATEWAY,
            dns: DEFAULT_DNS,
            gateway_mac: DEFAULT_GATEWAY_MAC,
            mtu: 1500,
            lease_secs: DEFAULT_LEASE_SECS,
        }
    }
}

impl GuestNetConfig {
    /// The subnet mask for [`Self::prefix_len`].
    pub fn netmask(&self) -> Ipv4Addr {
        let bits = u32::MAX
            .checked_shl(32 - u32::from(self.prefix_len.min(32)))
            .unwrap_or(0);
        Ipv4Addr::from(bits)
    }

    /// The subnet's broadcast address.
    pub fn broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.guest_addr) | !u32::from(self.netmask()))
    }

    /// Whether `ip` is one of the gateway's own virtual addresses.
    pub fn is_gateway_addr(&self, ip: Ipv4Addr) -> bool {
        ip == self.gateway || ip == self.dns
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn netmask_and_broadcast() {
        let mut c = GuestNetConfig::default();
        assert_eq!(c.netmask(), Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(c.broadcast(), Ipv4Addr::new(10, 0, 2, 255));
        c.prefix_len = 0;
        assert_eq!(c.netmask(), Ipv4Addr::UNSPECIFIED);
        c.prefix_len = 32;
        assert_eq!(c.netmask(), Ipv4Addr::BROADCAST);
        assert_eq!(c.broadcast(), c.guest_addr);
    }

    #[test]
    fn gateway_addresses() {
        let c = GuestNetConfig::default();
        assert!(c.is_gateway_addr(DEFAULT_GATEWAY));
        assert!(c.is_gateway_addr(DEFAULT_DNS));
        assert!(!c.is_gateway_addr(DEFAULT_GUEST_ADDR));
    }
}
