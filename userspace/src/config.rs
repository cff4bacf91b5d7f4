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

use std::net::{Ipv4Addr, Ipv6Addr};

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

/// Default IPv6 prefix of the guest subnet (slirp4netns's).
pub const DEFAULT_PREFIX6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0);
/// Default prefix length of the guest's IPv6 subnet.
pub const DEFAULT_PREFIX6_LEN: u8 = 64;
/// Default IPv6 gateway address (global, in the prefix).
pub const DEFAULT_GATEWAY6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 2);
/// Default IPv6 DNS address.
pub const DEFAULT_DNS6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 3);
/// Default address DHCPv6 hands to the guest (stateful), mirroring
/// `10.0.2.15`.
pub const DEFAULT_GUEST6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0x15);

/// The guest-facing IPv6 configuration: a private prefix the gateway
/// advertises (SLAAC) and serves by DHCPv6, a global gateway address and a
/// link-local router address (RAs come from the link-local one, RFC 4861
/// §4.2), a DNS address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuestNet6Config {
    /// The prefix (its host bits zero).
    pub prefix: Ipv6Addr,
    /// Its length (64 for SLAAC).
    pub prefix_len: u8,
    /// The gateway's global address.
    pub gateway: Ipv6Addr,
    /// The gateway's link-local address: the source of RAs and the
    /// guest's default router.
    pub router_ll: Ipv6Addr,
    /// The DNS forwarder's address.
    pub dns: Ipv6Addr,
    /// The address DHCPv6 hands out.
    pub guest_addr: Ipv6Addr,
    /// The gateway's MAC address (shared with IPv4).
    pub gateway_mac: EthernetAddress,
    /// The tap's MTU (the RA's MTU option).
    pub mtu: u16,
    /// DNS search domains (RA DNSSL, DHCPv6 domain list); empty = none.
    pub search: Vec<String>,
    /// Lifetime of the DHCPv6 address and of the advertised prefix, in
    /// seconds (valid; preferred is the same).
    pub lease_secs: u32,
}

/// The modified-EUI-64 link-local address of `mac` (RFC 4291 §2.5.1,
/// appendix A): `fe80::` + the MAC with `ff:fe` in the middle and the
/// universal/local bit flipped.
pub fn link_local_of(mac: EthernetAddress) -> Ipv6Addr {
    let m = mac.0;
    Ipv6Addr::new(
        0xfe80,
        0,
        0,
        0,
        u16::from_be_bytes([m[0] ^ 0x02, m[1]]),
        u16::from_be_bytes([m[2], 0xff]),
        u16::from_be_bytes([0xfe, m[3]]),
        u16::from_be_bytes([m[4], m[5]]),
    )
}

impl Default for GuestNet6Config {
    fn default() -> Self {
        Self {
            prefix: DEFAULT_PREFIX6,
            prefix_len: DEFAULT_PREFIX6_LEN,
            gateway: DEFAULT_GATEWAY6,
            router_ll: link_local_of(DEFAULT_GATEWAY_MAC),
            dns: DEFAULT_DNS6,
            guest_addr: DEFAULT_GUEST6,
            gateway_mac: DEFAULT_GATEWAY_MAC,
            mtu: 1500,
            search: Vec::new(),
            lease_secs: DEFAULT_LEASE_SECS,
        }
    }
}

impl GuestNet6Config {
    /// Whether `ip` is inside the guest prefix.
    pub fn in_prefix(&self, ip: Ipv6Addr) -> bool {
        let bits = u32::from(self.prefix_len.min(128));
        let mask = u128::MAX.checked_shl(128 - bits).unwrap_or(0);
        u128::from(ip) & mask == u128::from(self.prefix) & mask
    }

    /// Whether `ip` is one of the gateway's own addresses (global gateway,
    /// link-local router, DNS).
    pub fn is_gateway_addr(&self, ip: Ipv6Addr) -> bool {
        ip == self.gateway || ip == self.router_ll || ip == self.dns
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
    fn ipv6_defaults_and_prefix() {
        let c = GuestNet6Config::default();
        assert_eq!(
            c.router_ll,
            "fe80::5055:aff:fe00:202"
                .parse::<Ipv6Addr>()
                .unwrap_or(Ipv6Addr::UNSPECIFIED)
        );
        assert!(c.in_prefix(c.guest_addr));
        assert!(c.in_prefix(c.gateway));
        assert!(!c.in_prefix(c.router_ll));
        assert!(!c.in_prefix("fd00:0:0:1::15".parse().unwrap_or(Ipv6Addr::UNSPECIFIED)));
        assert!(c.is_gateway_addr(c.router_ll) && c.is_gateway_addr(c.dns));
        assert!(!c.is_gateway_addr(c.guest_addr));
    }

    #[test]
    fn gateway_addresses() {
        let c = GuestNetConfig::default();
        assert!(c.is_gateway_addr(DEFAULT_GATEWAY));
        assert!(c.is_gateway_addr(DEFAULT_DNS));
        assert!(!c.is_gateway_addr(DEFAULT_GUEST_ADDR));
    }
}
