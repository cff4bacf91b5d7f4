//! DHCPv4 server for the guest.
//!
//! # Theory of operation
//!
//! Exactly one guest sits behind the tap and there is exactly one address
//! to hand out, `cfg.guest_addr`, so the server is tiny: [`DhcpServer`]
//! holds the configuration and at most one lease (client MAC and expiry).
//! [`DhcpServer::handle`] takes one Ethernet frame carrying a UDP datagram
//! to port 67, parses every layer with smoltcp's `wire` views (verifying the
//! IPv4 and UDP checksums) and answers as RFC 2131 prescribes:
//!
//! * DISCOVER → OFFER of `guest_addr` (no lease is reserved by an offer).
//! * REQUEST → ACK when it asks for `guest_addr`, in any of the client
//!   states: SELECTING (server identifier = `cfg.gateway`, requested IP),
//!   INIT-REBOOT (requested IP, no server identifier), RENEWING/REBINDING
//!   (`ciaddr`). A REQUEST for another address is NAKed; one naming another
//!   server's identifier is not for us and gets no reply.
//! * RELEASE and DECLINE drop the client's lease, no reply.
//! * INFORM → ACK with configuration only (no address, no lease time).
//!
//! A client MAC other than the lease holder's gets no OFFER and a NAK to
//! its REQUEST until the lease expires; expired leases are forgotten at the
//! next [`DhcpServer::handle`] call.
//!
//! OFFER and ACK carry the server identifier (`cfg.gateway`), subnet mask,
//! router, DNS server, broadcast address, interface MTU and, except for an
//! INFORM, lease time, T1 (lease/2) and T2 (lease·7/8). smoltcp's
//! [`DhcpRepr`] emits the first few natively; T1/T2, MTU, broadcast address,
//! the NAK message and the echoed client identifier go through its
//! `additional_options`. Replies are padded to the 300-byte BOOTP minimum
//! and kept within 576-byte IP datagrams unless the client's maximum message
//! size allows more (only a very long client identifier can matter).
//!
//! Replies are addressed per RFC 2131 §4.1: from `cfg.gateway:67` and
//! `cfg.gateway_mac` to port 68; broadcast (IP and MAC) for a NAK or when the
//! client set the broadcast flag, else unicast to `ciaddr` when set, else to
//! `yiaddr` at `chaddr`. Relayed requests (non-zero `giaddr`) are refused:
//! there is no relay on a tap link. Malformed input is a [`FrameError`];
//! nothing a guest sends can make the server panic.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    DHCP_CLIENT_PORT, DHCP_SERVER_PORT, DhcpMessageType, DhcpOpCode, DhcpOption, DhcpPacket,
    DhcpRepr, EthernetAddress, EthernetFrame, EthernetProtocol, EthernetRepr, IpProtocol,
    Ipv4Packet, Ipv4Repr, UdpPacket, UdpRepr,
};

use crate::config::GuestNetConfig;
use crate::services::error::FrameError;

/// Option 26, interface MTU (RFC 2132 §5.1).
const OPT_INTERFACE_MTU: u8 = 26;
/// Option 28, broadcast address (RFC 2132 §5.3).
const OPT_BROADCAST_ADDRESS: u8 = 28;
/// Option 56, message (RFC 2132 §9.9).
const OPT_MESSAGE: u8 = 56;
/// Option 58, renewal (T1) time (RFC 2132 §9.11).
const OPT_RENEWAL_TIME: u8 = 58;
/// Option 59, rebinding (T2) time (RFC 2132 §9.12).
const OPT_REBINDING_TIME: u8 = 59;
/// Option 61, client identifier (RFC 2132 §9.14), echoed per RFC 6842.
const OPT_CLIENT_ID: u8 = 61;

/// The smallest MTU option 26 may carry (RFC 2132 §5.1).
const MIN_MTU_OPTION: u16 = 68;
/// The IP datagram size every DHCP client accepts (RFC 2131 §2).
const MIN_MAX_MESSAGE: usize = 576;
/// IPv4 (without options) and UDP header bytes.
const IP_UDP_HEADERS: usize = 20 + 8;
/// Minimum BOOTP message length some old clients insist on (RFC 1542 §2.1).
const BOOTP_MIN_LEN: usize = 300;
/// TTL of the replies.
const REPLY_TTL: u8 = 64;

/// The one lease the server can hand out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Lease {
    /// The client holding the lease.
    mac: EthernetAddress,
    /// When the lease runs out.
    expires: Instant,
}

/// What kind of reply to build.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Reply {
    /// DHCPOFFER of the guest address.
    Offer,
    /// DHCPACK of the guest address, with a lease.
    Ack,
    /// DHCPACK to a DHCPINFORM: configuration only.
    InformAck,
    /// DHCPNAK with the given message.
    Nak(&'static str),
}

/// DHCPv4 server state for the one guest behind the tap.
#[derive(Debug)]
pub struct DhcpServer {
    /// The subnet being served.
    cfg: GuestNetConfig,
    /// The current lease, if any.
    lease: Option<Lease>,
}

impl DhcpServer {
    /// Creates a server for `cfg` with no lease.
    pub fn new(cfg: GuestNetConfig) -> Self {
        Self { cfg, lease: None }
    }

    /// Handles one Ethernet frame carrying a UDP datagram to port 67.
    /// Returns the complete Ethernet reply frame, or `Ok(None)` when no reply
    /// is due (e.g. RELEASE, DECLINE, a REQUEST meant for another server, a
    /// DISCOVER from a second client while the lease is held).
    ///
    /// `now` is the time the frame arrived; it stamps lease expiry.
    pub fn handle(&mut self, frame: &[u8], now: Instant) -> Result<Option<Vec<u8>>, FrameError> {
        let caps = ChecksumCapabilities::default();
        let eth = EthernetFrame::new_checked(frame).map_err(FrameError::malformed("ethernet"))?;
        let eth_repr = EthernetRepr::parse(&eth).map_err(FrameError::malformed("ethernet"))?;
        if eth_repr.ethertype != EthernetProtocol::Ipv4 {
            return Err(FrameError::Unsupported("ethertype (not ipv4)"));
        }

        let ip = Ipv4Packet::new_checked(eth.payload()).map_err(FrameError::malformed("ipv4"))?;
        if ip.next_header() != IpProtocol::Udp {
            return Err(FrameError::Unsupported("ip protocol (not udp)"));
        }
        if ip.more_frags() || ip.frag_offset() != 0 {
            return Err(FrameError::Unsupported("fragmented dhcp"));
        }
        let ip_repr = Ipv4Repr::parse(&ip, &caps).map_err(FrameError::malformed("ipv4"))?;

        let udp = UdpPacket::new_checked(ip.payload()).map_err(FrameError::malformed("udp"))?;
        let udp_repr = UdpRepr::parse(
            &udp,
            &ip_repr.src_addr.into(),
            &ip_repr.dst_addr.into(),
            &caps,
        )
        .map_err(FrameError::malformed("udp"))?;
        if udp_repr.dst_port != DHCP_SERVER_PORT {
            return Err(FrameError::Unsupported("udp port (not dhcp server)"));
        }

        let dhcp = DhcpPacket::new_checked(udp.payload()).map_err(FrameError::malformed("dhcp"))?;
        if dhcp.opcode() != DhcpOpCode::Request {
            // A BOOTREPLY on the server port; smoltcp's Repr would accept an
            // OFFER/ACK/NAK with op = 2.
            return Err(FrameError::Malformed {
                layer: "dhcp",
                source: smoltcp::wire::Error,
            });
        }
        let req = DhcpRepr::parse(&dhcp).map_err(FrameError::malformed("dhcp"))?;
        if !req.relay_agent_ip.is_unspecified() {
            return Err(FrameError::Unsupported("relayed dhcp"));
        }
        if !req.client_hardware_address.is_unicast() {
            return Err(FrameError::Unsupported("dhcp chaddr not unicast"));
        }
        // smoltcp only parses 7-byte Ethernet client identifiers; echo
        // whatever the client sent (RFC 6842), e.g. systemd's IAID+DUID.
        let client_id = dhcp.options().find(|opt| opt.kind == OPT_CLIENT_ID);

        self.expire(now);
        let mac = req.client_hardware_address;
        log::debug!(
            "dhcp: {:?} from {mac} xid={:#010x} ciaddr={} requested={:?} server-id={:?}",
            req.message_type,
            req.transaction_id,
            req.client_ip,
            req.requested_ip,
            req.server_identifier
        );

        let reply = match req.message_type {
            DhcpMessageType::Discover => self.on_discover(mac),
            DhcpMessageType::Request => self.on_request(&req, now),
            DhcpMessageType::Decline => {
                self.on_decline(&req);
                None
            }
            DhcpMessageType::Release => {
                self.on_release(&req);
                None
            }
            DhcpMessageType::Inform => Some(Reply::InformAck),
            _ => return Err(FrameError::Unsupported("dhcp message type")),
        };
        match reply {
            Some(kind) => self.build_reply(&req, client_id, kind).map(Some),
            None => Ok(None),
        }
    }

    /// The current lease, if the guest holds one: (client MAC, expiry).
    ///
    /// Expired leases are forgotten at the next [`Self::handle`] call, so
    /// compare the expiry with the current time if that matters.
    pub fn lease(&self) -> Option<(EthernetAddress, Instant)> {
        self.lease.map(|lease| (lease.mac, lease.expires))
    }

    /// Puts back a lease an earlier daemon granted (restart without loss):
    /// `mac` holds the address until `expires`.
    pub fn restore_lease(&mut self, mac: EthernetAddress, expires: Instant) {
        self.lease = Some(Lease { mac, expires });
    }

    /// Forgets the lease if it has run out at `now`.
    fn expire(&mut self, now: Instant) {
        if let Some(lease) = self.lease.filter(|lease| now >= lease.expires) {
            log::info!(
                "dhcp: lease of {} to {} expired",
                self.cfg.guest_addr,
                lease.mac
            );
            self.lease = None;
        }
    }

    /// The holder of an unexpired lease other than `mac`, if any.
    fn held_by_other(&self, mac: EthernetAddress) -> Option<EthernetAddress> {
        self.lease
            .map(|lease| lease.mac)
            .filter(|holder| *holder != mac)
    }

    /// DHCPDISCOVER: offer the address unless another client holds it.
    fn on_discover(&self, mac: EthernetAddress) -> Option<Reply> {
        if let Some(holder) = self.held_by_other(mac) {
            log::warn!(
                "dhcp: DISCOVER from {mac} ignored: {} is leased to {holder}",
                self.cfg.guest_addr
            );
            return None;
        }
        Some(Reply::Offer)
    }

    /// DHCPREQUEST in any client state: ACK, NAK or stay silent.
    fn on_request(&mut self, req: &DhcpRepr<'_>, now: Instant) -> Option<Reply> {
        let mac = req.client_hardware_address;
        let ciaddr = Some(req.client_ip).filter(|ip| !ip.is_unspecified());
        // SELECTING: the client answers an OFFER, ours or another's.
        if let Some(server_id) = req
            .server_identifier
            .filter(|server_id| *server_id != self.cfg.gateway)
        {
            log::debug!("dhcp: REQUEST from {mac} is for server {server_id}");
            return None;
        }
        // SELECTING and INIT-REBOOT name the address in option 50;
        // RENEWING/REBINDING clients put their bound address in ciaddr.
        let requested = req.requested_ip.or(ciaddr);
        let Some(requested) = requested else {
            log::warn!("dhcp: REQUEST from {mac} names no address");
            return Some(Reply::Nak("no address requested"));
        };
        if requested != self.cfg.guest_addr {
            log::warn!(
                "dhcp: NAK to {mac}: requested {requested}, only {} is available",
                self.cfg.guest_addr
            );
            return Some(Reply::Nak("requested address not available"));
        }
        if let Some(holder) = self.held_by_other(mac) {
            log::warn!("dhcp: NAK to {mac}: {requested} is leased to {holder}");
            return Some(Reply::Nak("address leased to another client"));
        }

        let secs = self.cfg.lease_secs;
        let expires = now
            .checked_add(Duration::from_secs(u64::from(secs)))
            .unwrap_or_else(|| {
                // Unreachable with a monotonic clock and a u32 lease time.
                log::warn!("dhcp: lease expiry overflows the clock");
                now
            });
        if self.lease.is_some() {
            log::debug!("dhcp: renewed lease of {requested} to {mac} for {secs}s");
        } else {
            log::info!("dhcp: leased {requested} to {mac} for {secs}s");
        }
        self.lease = Some(Lease { mac, expires });
        Some(Reply::Ack)
    }

    /// DHCPDECLINE: the client found the address in use; drop its lease.
    fn on_decline(&mut self, req: &DhcpRepr<'_>) {
        let mac = req.client_hardware_address;
        if req
            .server_identifier
            .is_some_and(|server_id| server_id != self.cfg.gateway)
        {
            log::debug!("dhcp: DECLINE from {mac} is for another server");
            return;
        }
        log::warn!(
            "dhcp: {mac} declined {:?}: the address seems to be in use on the link",
            req.requested_ip
        );
        if self.lease.is_some_and(|lease| lease.mac == mac) {
            self.lease = None;
        }
    }

    /// DHCPRELEASE: the client gives its address back.
    fn on_release(&mut self, req: &DhcpRepr<'_>) {
        let mac = req.client_hardware_address;
        if self.lease.is_some_and(|lease| lease.mac == mac) {
            log::info!("dhcp: {mac} released {}", req.client_ip);
            self.lease = None;
        } else {
            log::debug!("dhcp: RELEASE from {mac}, which holds no lease");
        }
    }

    /// The DHCP part of a reply of `kind` to `req`, with `extra` options.
    fn reply_repr<'a>(
        &self,
        req: &DhcpRepr<'_>,
        kind: Reply,
        extra: &'a [DhcpOption<'a>],
    ) -> DhcpRepr<'a> {
        let cfg = &self.cfg;
        let (message_type, your_ip, client_ip) = match kind {
            Reply::Offer => (
                DhcpMessageType::Offer,
                cfg.guest_addr,
                Ipv4Addr::UNSPECIFIED,
            ),
            Reply::Ack => (DhcpMessageType::Ack, cfg.guest_addr, req.client_ip),
            Reply::InformAck => (DhcpMessageType::Ack, Ipv4Addr::UNSPECIFIED, req.client_ip),
            Reply::Nak(_) => (
                DhcpMessageType::Nak,
                Ipv4Addr::UNSPECIFIED,
                Ipv4Addr::UNSPECIFIED,
            ),
        };
        let configures = !matches!(kind, Reply::Nak(_));
        let mut repr = DhcpRepr {
            message_type,
            transaction_id: req.transaction_id,
            secs: 0,
            client_hardware_address: req.client_hardware_address,
            client_ip,
            your_ip,
            server_ip: Ipv4Addr::UNSPECIFIED,
            router: configures.then_some(cfg.gateway),
            subnet_mask: configures.then_some(cfg.netmask()),
            relay_agent_ip: Ipv4Addr::UNSPECIFIED,
            broadcast: req.broadcast,
            requested_ip: None,
            // Echoed verbatim through `extra` instead (smoltcp only knows
            // the Ethernet form).
            client_identifier: None,
            server_identifier: Some(cfg.gateway),
            parameter_request_list: None,
            // Filled below (smoltcp's list type is a heapless::Vec).
            dns_servers: configures.then(Default::default),
            max_size: None,
            lease_duration: matches!(kind, Reply::Offer | Reply::Ack).then_some(cfg.lease_secs),
            // smoltcp parses T1/T2 but does not emit them: they go in `extra`.
            renew_duration: None,
            rebind_duration: None,
            additional_options: extra,
        };
        let pushed = repr
            .dns_servers
            .as_mut()
            .map(|list| list.push(cfg.dns).is_ok());
        if pushed == Some(false) {
            log::warn!("dhcp: no room for the DNS server option");
        }
        repr
    }

    /// Builds the complete Ethernet frame of a reply of `kind` to `req`.
    fn build_reply(
        &self,
        req: &DhcpRepr<'_>,
        client_id: Option<DhcpOption<'_>>,
        kind: Reply,
    ) -> Result<Vec<u8>, FrameError> {
        let cfg = &self.cfg;
        let t1 = (cfg.lease_secs / 2).to_be_bytes();
        let t2 = u32::try_from(u64::from(cfg.lease_secs) * 7 / 8)
            .unwrap_or(u32::MAX)
            .to_be_bytes();
        let mtu = cfg.mtu.to_be_bytes();
        let broadcast = cfg.broadcast().octets();

        let mut extra: Vec<DhcpOption<'_>> = Vec::with_capacity(6);
        if matches!(kind, Reply::Offer | Reply::Ack) {
            extra.push(DhcpOption {
                kind: OPT_RENEWAL_TIME,
                data: &t1,
            });
            extra.push(DhcpOption {
                kind: OPT_REBINDING_TIME,
                data: &t2,
            });
        }
        match kind {
            Reply::Offer | Reply::Ack | Reply::InformAck => {
                if cfg.mtu >= MIN_MTU_OPTION {
                    extra.push(DhcpOption {
                        kind: OPT_INTERFACE_MTU,
                        data: &mtu,
                    });
                }
                extra.push(DhcpOption {
                    kind: OPT_BROADCAST_ADDRESS,
                    data: &broadcast,
                });
            }
            Reply::Nak(message) => extra.push(DhcpOption {
                kind: OPT_MESSAGE,
                data: message.as_bytes(),
            }),
        }
        let limit = usize::from(req.max_size.unwrap_or(0)).max(MIN_MAX_MESSAGE) - IP_UDP_HEADERS;
        if let Some(client_id) = client_id {
            extra.push(client_id);
            if self.reply_repr(req, kind, &extra).buffer_len() > limit {
                log::debug!("dhcp: client identifier too long to echo");
                extra.pop();
            }
        }
        let repr = self.reply_repr(req, kind, &extra);

        let (dst_ip, dst_mac) = destination(req, kind, repr.your_ip);
        log::debug!(
            "dhcp: {:?} to {dst_ip}/{dst_mac} xid={:#010x} yiaddr={}",
            repr.message_type,
            repr.transaction_id,
            repr.your_ip
        );

        let eth_repr = EthernetRepr {
            src_addr: cfg.gateway_mac,
            dst_addr: dst_mac,
            ethertype: EthernetProtocol::Ipv4,
        };
        let udp_repr = UdpRepr {
            src_port: DHCP_SERVER_PORT,
            dst_port: DHCP_CLIENT_PORT,
        };
        let dhcp_len = repr.buffer_len().max(BOOTP_MIN_LEN);
        let udp_len = udp_repr.header_len() + dhcp_len;
        let ip_repr = Ipv4Repr {
            src_addr: cfg.gateway,
            dst_addr: dst_ip,
            next_header: IpProtocol::Udp,
            payload_len: udp_len,
            hop_limit: REPLY_TTL,
        };
        let headers = eth_repr.buffer_len() + ip_repr.buffer_len() + udp_repr.header_len();

        // The DHCP message goes in place first; the zeroed tail past the END
        // option is padding. The UDP checksum then covers it.
        let mut buf = vec![0u8; headers + dhcp_len];
        let dhcp_buf = buf
            .get_mut(headers..)
            .ok_or(FrameError::Unsupported("dhcp reply layout"))?;
        repr.emit(&mut DhcpPacket::new_unchecked(dhcp_buf))
            .map_err(FrameError::malformed("dhcp reply"))?;

        let caps = ChecksumCapabilities::default();
        let mut eth = EthernetFrame::new_unchecked(&mut buf[..]);
        eth_repr.emit(&mut eth);
        let mut ip = Ipv4Packet::new_unchecked(eth.payload_mut());
        ip_repr.emit(&mut ip, &caps);
        udp_repr.emit(
            &mut UdpPacket::new_unchecked(ip.payload_mut()),
            &cfg.gateway.into(),
            &dst_ip.into(),
            dhcp_len,
            |_payload| {},
            &caps,
        );
        Ok(buf)
    }
}

/// Where a reply goes (RFC 2131 §4.1, no relay): IP and MAC destination.
fn destination(req: &DhcpRepr<'_>, kind: Reply, your_ip: Ipv4Addr) -> (Ipv4Addr, EthernetAddress) {
    let broadcast = (Ipv4Addr::BROADCAST, EthernetAddress::BROADCAST);
    if matches!(kind, Reply::Nak(_)) || req.broadcast {
        broadcast
    } else if !req.client_ip.is_unspecified() {
        (req.client_ip, req.client_hardware_address)
    } else if !your_ip.is_unspecified() {
        (your_ip, req.client_hardware_address)
    } else {
        broadcast
    }
}

/// Whether `frame` is an IPv4/UDP datagram to port 67 (cheap check for the
/// dispatcher; false for anything malformed). Checksums are not verified
/// here; [`DhcpServer::handle`] does that.
pub fn is_dhcp_request(frame: &[u8]) -> bool {
    let Ok(eth) = EthernetFrame::new_checked(frame) else {
        return false;
    };
    if eth.ethertype() != EthernetProtocol::Ipv4 {
        return false;
    }
    let Ok(ip) = Ipv4Packet::new_checked(eth.payload()) else {
        return false;
    };
    if ip.version() != 4
        || ip.next_header() != IpProtocol::Udp
        || ip.more_frags()
        || ip.frag_offset() != 0
    {
        return false;
    }
    let Ok(udp) = UdpPacket::new_checked(ip.payload()) else {
        return false;
    };
    udp.dst_port() == DHCP_SERVER_PORT
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const MAC_A: EthernetAddress = EthernetAddress([0x52, 0x54, 0x00, 0x12, 0x34, 0x56]);
    const MAC_B: EthernetAddress = EthernetAddress([0x52, 0x54, 0x00, 0xab, 0xcd, 0xef]);
    const XID: u32 = 0x3903_f326;
    /// busybox udhcpc's default parameter request list (subnet, router,
    /// DNS, hostname, domain, broadcast, NTP, search, static routes).
    const UDHCPC_PRL: &[u8] = &[1, 3, 6, 12, 15, 28, 42, 119, 121];
    const VENDOR: &[DhcpOption<'static>] = &[
        DhcpOption {
            kind: 60,
            data: b"udhcp 1.36.1",
        },
        DhcpOption {
            kind: 12,
            data: b"guest",
        },
    ];

    fn cfg() -> GuestNetConfig {
        GuestNetConfig::default()
    }

    fn server() -> DhcpServer {
        DhcpServer::new(cfg())
    }

    /// A client message of type `msg` from `mac`, with nothing optional set.
    fn msg(message_type: DhcpMessageType, mac: EthernetAddress) -> DhcpRepr<'static> {
        DhcpRepr {
            message_type,
            transaction_id: XID,
            secs: 0,
            client_hardware_address: mac,
            client_ip: Ipv4Addr::UNSPECIFIED,
            your_ip: Ipv4Addr::UNSPECIFIED,
            server_ip: Ipv4Addr::UNSPECIFIED,
            router: None,
            subnet_mask: None,
            relay_agent_ip: Ipv4Addr::UNSPECIFIED,
            broadcast: false,
            requested_ip: None,
            client_identifier: None,
            server_identifier: None,
            parameter_request_list: None,
            dns_servers: None,
            max_size: None,
            lease_duration: None,
            renew_duration: None,
            rebind_duration: None,
            additional_options: &[],
        }
    }

    /// A DISCOVER as busybox udhcpc sends it.
    fn discover(mac: EthernetAddress) -> DhcpRepr<'static> {
        DhcpRepr {
            client_identifier: Some(mac),
            max_size: Some(576),
            parameter_request_list: Some(UDHCPC_PRL),
            additional_options: VENDOR,
            ..msg(DhcpMessageType::Discover, mac)
        }
    }

    /// A REQUEST in SELECTING state answering our OFFER.
    fn selecting(mac: EthernetAddress, requested: Ipv4Addr) -> DhcpRepr<'static> {
        DhcpRepr {
            requested_ip: Some(requested),
            server_identifier: Some(cfg().gateway),
            client_identifier: Some(mac),
            parameter_request_list: Some(UDHCPC_PRL),
            ..msg(DhcpMessageType::Request, mac)
        }
    }

    /// A REQUEST in RENEWING state (ciaddr set, unicast to the server).
    fn renewing(mac: EthernetAddress, ciaddr: Ipv4Addr) -> DhcpRepr<'static> {
        DhcpRepr {
            client_ip: ciaddr,
            ..msg(DhcpMessageType::Request, mac)
        }
    }

    /// Serialises `dhcp` into a complete frame, IP source ciaddr (or
    /// 0.0.0.0) and destination `dst`.
    fn frame_to(dhcp: &DhcpRepr<'_>, dst: Ipv4Addr) -> Vec<u8> {
        let mut payload = vec![0u8; dhcp.buffer_len()];
        dhcp.emit(&mut DhcpPacket::new_unchecked(&mut payload[..]))
            .unwrap();
        udp_frame(
            dhcp.client_hardware_address,
            dhcp.client_ip,
            dst,
            DHCP_CLIENT_PORT,
            DHCP_SERVER_PORT,
            &payload,
        )
    }

    /// `dhcp` broadcast as a client without an address does.
    fn frame(dhcp: &DhcpRepr<'_>) -> Vec<u8> {
        frame_to(dhcp, Ipv4Addr::BROADCAST)
    }

    fn udp_frame(
        mac: EthernetAddress,
        src: Ipv4Addr,
        dst: Ipv4Addr,
        src_port: u16,
        dst_port: u16,
        payload: &[u8],
    ) -> Vec<u8> {
        let caps = ChecksumCapabilities::default();
        let udp = UdpRepr { src_port, dst_port };
        let ip = Ipv4Repr {
            src_addr: src,
            dst_addr: dst,
            next_header: IpProtocol::Udp,
            payload_len: 8 + payload.len(),
            hop_limit: 64,
        };
        let eth = EthernetRepr {
            src_addr: mac,
            dst_addr: EthernetAddress::BROADCAST,
            ethertype: EthernetProtocol::Ipv4,
        };
        let mut buf = vec![0u8; 14 + 20 + 8 + payload.len()];
        let mut f = EthernetFrame::new_unchecked(&mut buf[..]);
        eth.emit(&mut f);
        let mut p = Ipv4Packet::new_unchecked(f.payload_mut());
        ip.emit(&mut p, &caps);
        udp.emit(
            &mut UdpPacket::new_unchecked(p.payload_mut()),
            &src.into(),
            &dst.into(),
            payload.len(),
            |b| b.copy_from_slice(payload),
            &caps,
        );
        buf
    }

    /// A reply, re-parsed with checksum verification.
    struct Parsed {
        eth: EthernetRepr,
        ip: Ipv4Repr,
        udp: UdpRepr,
        dhcp: Vec<u8>,
    }

    impl Parsed {
        fn new(frame: &[u8]) -> Self {
            let caps = ChecksumCapabilities::default();
            let eth = EthernetFrame::new_checked(frame).unwrap();
            let eth_repr = EthernetRepr::parse(&eth).unwrap();
            let ip = Ipv4Packet::new_checked(eth.payload()).unwrap();
            assert!(ip.verify_checksum(), "ipv4 checksum");
            assert_eq!(usize::from(ip.total_len()), frame.len() - 14);
            let ip_repr = Ipv4Repr::parse(&ip, &caps).unwrap();
            let udp = UdpPacket::new_checked(ip.payload()).unwrap();
            assert_ne!(udp.checksum(), 0, "udp checksum present");
            assert!(udp.verify_checksum(&ip_repr.src_addr.into(), &ip_repr.dst_addr.into()));
            let udp_repr = UdpRepr::parse(
                &udp,
                &ip_repr.src_addr.into(),
                &ip_repr.dst_addr.into(),
                &caps,
            )
            .unwrap();
            Self {
                eth: eth_repr,
                ip: ip_repr,
                udp: udp_repr,
                dhcp: udp.payload().to_vec(),
            }
        }

        fn packet(&self) -> DhcpPacket<&[u8]> {
            DhcpPacket::new_checked(&self.dhcp[..]).unwrap()
        }

        /// The raw data of option `kind`, if present.
        fn option(&self, kind: u8) -> Option<Vec<u8>> {
            self.packet()
                .options()
                .find(|o| o.kind == kind)
                .map(|o| o.data.to_vec())
        }

        fn message_type(&self) -> DhcpMessageType {
            DhcpMessageType::from(self.option(53).unwrap()[0])
        }

        fn u32_option(&self, kind: u8) -> Option<u32> {
            self.option(kind)
                .map(|d| u32::from_be_bytes(d.try_into().unwrap()))
        }

        fn addr_option(&self, kind: u8) -> Option<Ipv4Addr> {
            self.option(kind)
                .map(|d| Ipv4Addr::from(<[u8; 4]>::try_from(d).unwrap()))
        }
    }

    fn handle(server: &mut DhcpServer, frame: &[u8], now: Instant) -> Option<Parsed> {
        server.handle(frame, now).unwrap().map(|f| Parsed::new(&f))
    }

    /// Checks what every reply has in common.
    fn assert_common(reply: &Parsed, mac: EthernetAddress) {
        let c = cfg();
        assert_eq!(reply.eth.src_addr, c.gateway_mac);
        assert_eq!(reply.eth.ethertype, EthernetProtocol::Ipv4);
        assert_eq!(reply.ip.src_addr, c.gateway);
        assert_eq!(reply.ip.next_header, IpProtocol::Udp);
        assert_eq!(reply.ip.hop_limit, 64);
        assert_eq!(reply.udp.src_port, 67);
        assert_eq!(reply.udp.dst_port, 68);
        assert!(reply.dhcp.len() >= BOOTP_MIN_LEN);
        assert!(reply.dhcp.len() <= 576 - 28, "len {}", reply.dhcp.len());
        let p = reply.packet();
        assert_eq!(p.opcode(), DhcpOpCode::Reply);
        assert_eq!(p.transaction_id(), XID);
        assert_eq!(p.client_hardware_address(), mac);
        assert_eq!(p.relay_agent_ip(), Ipv4Addr::UNSPECIFIED);
        assert_eq!(p.hops(), 0);
        assert_eq!(reply.addr_option(54), Some(c.gateway), "server id");
    }

    /// Checks the configuration options of an OFFER or ACK.
    fn assert_config(reply: &Parsed) {
        let c = cfg();
        let p = reply.packet();
        let repr = DhcpRepr::parse(&p).unwrap();
        assert_eq!(repr.subnet_mask, Some(Ipv4Addr::new(255, 255, 255, 0)));
        assert_eq!(repr.router, Some(c.gateway));
        assert_eq!(
            repr.dns_servers.as_deref(),
            Some(&[Ipv4Addr::new(10, 0, 2, 3)][..])
        );
        assert_eq!(
            reply.addr_option(28),
            Some(Ipv4Addr::new(10, 0, 2, 255)),
            "broadcast"
        );
        assert_eq!(
            reply.option(26),
            Some(1500u16.to_be_bytes().to_vec()),
            "mtu"
        );
    }

    /// Checks the lease options of an OFFER or ACK.
    fn assert_lease_options(reply: &Parsed) {
        let repr_packet = reply.packet();
        let repr = DhcpRepr::parse(&repr_packet).unwrap();
        assert_eq!(repr.lease_duration, Some(86_400));
        assert_eq!(repr.renew_duration, Some(43_200));
        assert_eq!(repr.rebind_duration, Some(75_600));
    }

    fn assert_unicast_to(reply: &Parsed, ip: Ipv4Addr, mac: EthernetAddress) {
        assert_eq!(reply.ip.dst_addr, ip);
        assert_eq!(reply.eth.dst_addr, mac);
    }

    fn assert_broadcast(reply: &Parsed) {
        assert_eq!(reply.ip.dst_addr, Ipv4Addr::BROADCAST);
        assert_eq!(reply.eth.dst_addr, EthernetAddress::BROADCAST);
    }

    /// Runs DISCOVER/OFFER/REQUEST/ACK for `mac` at `now`.
    fn bind(server: &mut DhcpServer, mac: EthernetAddress, now: Instant) -> Parsed {
        let offer = handle(server, &frame(&discover(mac)), now).unwrap();
        assert_eq!(offer.message_type(), DhcpMessageType::Offer);
        let ack = handle(server, &frame(&selecting(mac, cfg().guest_addr)), now).unwrap();
        assert_eq!(ack.message_type(), DhcpMessageType::Ack);
        ack
    }

    #[test]
    fn discover_gets_offer() {
        let mut s = server();
        let now = Instant::now();
        let offer = handle(&mut s, &frame(&discover(MAC_A)), now).unwrap();
        assert_eq!(offer.message_type(), DhcpMessageType::Offer);
        assert_common(&offer, MAC_A);
        assert_config(&offer);
        assert_lease_options(&offer);
        let p = offer.packet();
        assert_eq!(p.your_ip(), cfg().guest_addr);
        assert_eq!(p.client_ip(), Ipv4Addr::UNSPECIFIED);
        assert_eq!(p.server_ip(), Ipv4Addr::UNSPECIFIED);
        assert!(!p.flags().contains(smoltcp::wire::DhcpFlags::BROADCAST));
        // RFC 6842: the client identifier comes back.
        let mut cid = vec![1u8];
        cid.extend_from_slice(MAC_A.as_bytes());
        assert_eq!(offer.option(61), Some(cid));
        // Not asked for, not sent back.
        assert_eq!(offer.option(55), None);
        assert_eq!(offer.option(50), None);
        // No broadcast flag, no ciaddr: unicast to yiaddr at chaddr.
        assert_unicast_to(&offer, cfg().guest_addr, MAC_A);
        // An offer reserves nothing.
        assert_eq!(s.lease(), None);
    }

    #[test]
    fn offer_message_type_comes_first() {
        let mut s = server();
        let offer = handle(&mut s, &frame(&discover(MAC_A)), Instant::now()).unwrap();
        assert_eq!(&offer.dhcp[236..243], &[0x63, 0x82, 0x53, 0x63, 53, 1, 2]);
    }

    #[test]
    fn discover_with_broadcast_flag_gets_broadcast_offer() {
        let mut s = server();
        let d = DhcpRepr {
            broadcast: true,
            ..discover(MAC_A)
        };
        let offer = handle(&mut s, &frame(&d), Instant::now()).unwrap();
        assert_eq!(offer.message_type(), DhcpMessageType::Offer);
        assert_broadcast(&offer);
        assert!(
            offer
                .packet()
                .flags()
                .contains(smoltcp::wire::DhcpFlags::BROADCAST)
        );
        assert_eq!(offer.packet().your_ip(), cfg().guest_addr);
    }

    #[test]
    fn discover_asking_for_other_address_still_gets_ours() {
        let mut s = server();
        let d = DhcpRepr {
            requested_ip: Some(Ipv4Addr::new(192, 168, 1, 50)),
            ..discover(MAC_A)
        };
        let offer = handle(&mut s, &frame(&d), Instant::now()).unwrap();
        assert_eq!(offer.packet().your_ip(), cfg().guest_addr);
    }

    #[test]
    fn selecting_request_gets_ack_and_lease() {
        let mut s = server();
        let now = Instant::now();
        let ack = handle(&mut s, &frame(&selecting(MAC_A, cfg().guest_addr)), now).unwrap();
        assert_eq!(ack.message_type(), DhcpMessageType::Ack);
        assert_common(&ack, MAC_A);
        assert_config(&ack);
        assert_lease_options(&ack);
        assert_eq!(ack.packet().your_ip(), cfg().guest_addr);
        assert_eq!(ack.packet().client_ip(), Ipv4Addr::UNSPECIFIED);
        assert_unicast_to(&ack, cfg().guest_addr, MAC_A);
        assert_eq!(s.lease(), Some((MAC_A, now + Duration::from_secs(86_400))));
    }

    #[test]
    fn selecting_request_with_broadcast_flag_gets_broadcast_ack() {
        let mut s = server();
        let r = DhcpRepr {
            broadcast: true,
            ..selecting(MAC_A, cfg().guest_addr)
        };
        let ack = handle(&mut s, &frame(&r), Instant::now()).unwrap();
        assert_eq!(ack.message_type(), DhcpMessageType::Ack);
        assert_broadcast(&ack);
    }

    #[test]
    fn request_for_another_server_is_ignored() {
        let mut s = server();
        let r = DhcpRepr {
            server_identifier: Some(Ipv4Addr::new(10, 0, 2, 1)),
            ..selecting(MAC_A, cfg().guest_addr)
        };
        assert!(s.handle(&frame(&r), Instant::now()).unwrap().is_none());
        assert_eq!(s.lease(), None);
    }

    #[test]
    fn selecting_request_for_other_address_gets_nak() {
        let mut s = server();
        let now = Instant::now();
        let r = selecting(MAC_A, Ipv4Addr::new(10, 0, 2, 16));
        let nak = handle(&mut s, &frame(&r), now).unwrap();
        assert_eq!(nak.message_type(), DhcpMessageType::Nak);
        assert_common(&nak, MAC_A);
        // NAKs are broadcast, carry no address and no configuration.
        assert_broadcast(&nak);
        let p = nak.packet();
        assert_eq!(p.your_ip(), Ipv4Addr::UNSPECIFIED);
        assert_eq!(p.client_ip(), Ipv4Addr::UNSPECIFIED);
        for kind in [1, 3, 6, 26, 28, 51, 58, 59] {
            assert_eq!(nak.option(kind), None, "option {kind} in NAK");
        }
        assert_eq!(
            nak.option(56).as_deref(),
            Some(&b"requested address not available"[..])
        );
        assert_eq!(s.lease(), None);
    }

    #[test]
    fn init_reboot_request() {
        let mut s = server();
        let now = Instant::now();
        let reboot = |ip| DhcpRepr {
            requested_ip: Some(ip),
            ..msg(DhcpMessageType::Request, MAC_A)
        };
        let nak = handle(&mut s, &frame(&reboot(Ipv4Addr::new(192, 168, 1, 7))), now).unwrap();
        assert_eq!(nak.message_type(), DhcpMessageType::Nak);
        assert_broadcast(&nak);
        assert_eq!(s.lease(), None);

        let ack = handle(&mut s, &frame(&reboot(cfg().guest_addr)), now).unwrap();
        assert_eq!(ack.message_type(), DhcpMessageType::Ack);
        assert_common(&ack, MAC_A);
        assert_lease_options(&ack);
        assert_unicast_to(&ack, cfg().guest_addr, MAC_A);
        assert_eq!(s.lease().unwrap().0, MAC_A);
    }

    #[test]
    fn renewing_request_extends_lease() {
        let mut s = server();
        let t0 = Instant::now();
        bind(&mut s, MAC_A, t0);
        let t1 = t0 + Duration::from_secs(43_200);
        let r = renewing(MAC_A, cfg().guest_addr);
        let ack = handle(&mut s, &frame_to(&r, cfg().gateway), t1).unwrap();
        assert_eq!(ack.message_type(), DhcpMessageType::Ack);
        assert_common(&ack, MAC_A);
        assert_config(&ack);
        assert_lease_options(&ack);
        // ciaddr is echoed and the reply is unicast to it.
        assert_eq!(ack.packet().client_ip(), cfg().guest_addr);
        assert_eq!(ack.packet().your_ip(), cfg().guest_addr);
        assert_unicast_to(&ack, cfg().guest_addr, MAC_A);
        assert_eq!(s.lease(), Some((MAC_A, t1 + Duration::from_secs(86_400))));
    }

    #[test]
    fn rebinding_request_gets_ack() {
        let mut s = server();
        let t0 = Instant::now();
        bind(&mut s, MAC_A, t0);
        // REBINDING: like RENEWING but broadcast.
        let r = renewing(MAC_A, cfg().guest_addr);
        let t2 = t0 + Duration::from_secs(75_600);
        let ack = handle(&mut s, &frame(&r), t2).unwrap();
        assert_eq!(ack.message_type(), DhcpMessageType::Ack);
        assert_unicast_to(&ack, cfg().guest_addr, MAC_A);
        assert_eq!(s.lease().unwrap().1, t2 + Duration::from_secs(86_400));
    }

    #[test]
    fn renewing_other_address_gets_nak() {
        let mut s = server();
        let r = renewing(MAC_A, Ipv4Addr::new(10, 0, 2, 77));
        let nak = handle(&mut s, &frame_to(&r, cfg().gateway), Instant::now()).unwrap();
        assert_eq!(nak.message_type(), DhcpMessageType::Nak);
        assert_broadcast(&nak);
        assert_eq!(s.lease(), None);
    }

    #[test]
    fn request_without_address_gets_nak() {
        let mut s = server();
        let r = msg(DhcpMessageType::Request, MAC_A);
        let nak = handle(&mut s, &frame(&r), Instant::now()).unwrap();
        assert_eq!(nak.message_type(), DhcpMessageType::Nak);
        assert_eq!(s.lease(), None);
    }

    #[test]
    fn release_drops_lease() {
        let mut s = server();
        let now = Instant::now();
        bind(&mut s, MAC_A, now);
        assert!(s.lease().is_some());

        // A release from someone else changes nothing.
        let other = DhcpRepr {
            client_ip: cfg().guest_addr,
            server_identifier: Some(cfg().gateway),
            ..msg(DhcpMessageType::Release, MAC_B)
        };
        assert!(s.handle(&frame(&other), now).unwrap().is_none());
        assert_eq!(s.lease().unwrap().0, MAC_A);

        let release = DhcpRepr {
            client_ip: cfg().guest_addr,
            server_identifier: Some(cfg().gateway),
            ..msg(DhcpMessageType::Release, MAC_A)
        };
        assert!(
            s.handle(&frame_to(&release, cfg().gateway), now)
                .unwrap()
                .is_none()
        );
        assert_eq!(s.lease(), None);

        // The address is free for another client now.
        bind(&mut s, MAC_B, now);
        assert_eq!(s.lease().unwrap().0, MAC_B);
    }

    #[test]
    fn decline_drops_lease() {
        let mut s = server();
        let now = Instant::now();
        bind(&mut s, MAC_A, now);
        let decline = DhcpRepr {
            requested_ip: Some(cfg().guest_addr),
            server_identifier: Some(cfg().gateway),
            ..msg(DhcpMessageType::Decline, MAC_A)
        };
        assert!(s.handle(&frame(&decline), now).unwrap().is_none());
        assert_eq!(s.lease(), None);
    }

    #[test]
    fn decline_for_other_server_keeps_lease() {
        let mut s = server();
        let now = Instant::now();
        bind(&mut s, MAC_A, now);
        let decline = DhcpRepr {
            requested_ip: Some(cfg().guest_addr),
            server_identifier: Some(Ipv4Addr::new(10, 0, 2, 1)),
            ..msg(DhcpMessageType::Decline, MAC_A)
        };
        assert!(s.handle(&frame(&decline), now).unwrap().is_none());
        assert_eq!(s.lease().unwrap().0, MAC_A);
    }

    #[test]
    fn inform_gets_configuration_only() {
        let mut s = server();
        let inform = DhcpRepr {
            client_ip: cfg().guest_addr,
            parameter_request_list: Some(UDHCPC_PRL),
            ..msg(DhcpMessageType::Inform, MAC_A)
        };
        let ack = handle(&mut s, &frame_to(&inform, cfg().gateway), Instant::now()).unwrap();
        assert_eq!(ack.message_type(), DhcpMessageType::Ack);
        assert_common(&ack, MAC_A);
        assert_config(&ack);
        let p = ack.packet();
        assert_eq!(p.your_ip(), Ipv4Addr::UNSPECIFIED);
        assert_eq!(p.client_ip(), cfg().guest_addr);
        for kind in [51, 58, 59] {
            assert_eq!(ack.option(kind), None, "option {kind} in INFORM ACK");
        }
        assert_unicast_to(&ack, cfg().guest_addr, MAC_A);
        assert_eq!(s.lease(), None);
    }

    #[test]
    fn second_client_is_refused_while_lease_held() {
        let mut s = server();
        let t0 = Instant::now();
        bind(&mut s, MAC_A, t0);

        let later = t0 + Duration::from_secs(60);
        assert!(s.handle(&frame(&discover(MAC_B)), later).unwrap().is_none());
        let nak = handle(&mut s, &frame(&selecting(MAC_B, cfg().guest_addr)), later).unwrap();
        assert_eq!(nak.message_type(), DhcpMessageType::Nak);
        assert_common(&nak, MAC_B);
        assert_broadcast(&nak);
        assert_eq!(
            nak.option(56).as_deref(),
            Some(&b"address leased to another client"[..])
        );
        assert_eq!(s.lease(), Some((MAC_A, t0 + Duration::from_secs(86_400))));

        // The holder itself is still served.
        let offer = handle(&mut s, &frame(&discover(MAC_A)), later).unwrap();
        assert_eq!(offer.message_type(), DhcpMessageType::Offer);
    }

    #[test]
    fn expired_lease_is_free_again() {
        let mut s = server();
        let t0 = Instant::now();
        bind(&mut s, MAC_A, t0);
        let expiry = t0 + Duration::from_secs(86_400);
        assert_eq!(s.lease(), Some((MAC_A, expiry)));

        // Just before expiry B is still refused ...
        let before = expiry - Duration::from_secs(1);
        assert!(
            s.handle(&frame(&discover(MAC_B)), before)
                .unwrap()
                .is_none()
        );
        // ... at expiry the lease is forgotten and B gets the address.
        let offer = handle(&mut s, &frame(&discover(MAC_B)), expiry).unwrap();
        assert_eq!(offer.message_type(), DhcpMessageType::Offer);
        assert_eq!(s.lease(), None);
        let ack = handle(&mut s, &frame(&selecting(MAC_B, cfg().guest_addr)), expiry).unwrap();
        assert_eq!(ack.message_type(), DhcpMessageType::Ack);
        assert_eq!(
            s.lease(),
            Some((MAC_B, expiry + Duration::from_secs(86_400)))
        );
    }

    #[test]
    fn custom_config_options() {
        let c = GuestNetConfig {
            guest_addr: Ipv4Addr::new(172, 16, 5, 10),
            prefix_len: 16,
            gateway: Ipv4Addr::new(172, 16, 0, 1),
            dns: Ipv4Addr::new(172, 16, 0, 53),
            gateway_mac: EthernetAddress([0x02, 0, 0, 0, 0, 0x01]),
            mtu: 9000,
            lease_secs: 3600,
        };
        let mut s = DhcpServer::new(c.clone());
        let now = Instant::now();
        let r = DhcpRepr {
            server_identifier: Some(c.gateway),
            ..selecting(MAC_A, c.guest_addr)
        };
        let ack = handle(&mut s, &frame(&r), now).unwrap();
        assert_eq!(ack.eth.src_addr, c.gateway_mac);
        assert_eq!(ack.ip.src_addr, c.gateway);
        let p = ack.packet();
        let repr = DhcpRepr::parse(&p).unwrap();
        assert_eq!(repr.message_type, DhcpMessageType::Ack);
        assert_eq!(repr.your_ip, c.guest_addr);
        assert_eq!(repr.server_identifier, Some(c.gateway));
        assert_eq!(repr.subnet_mask, Some(Ipv4Addr::new(255, 255, 0, 0)));
        assert_eq!(repr.router, Some(c.gateway));
        assert_eq!(repr.dns_servers.as_deref(), Some(&[c.dns][..]));
        assert_eq!(repr.lease_duration, Some(3600));
        assert_eq!(repr.renew_duration, Some(1800));
        assert_eq!(repr.rebind_duration, Some(3150));
        assert_eq!(ack.addr_option(28), Some(Ipv4Addr::new(172, 16, 255, 255)));
        assert_eq!(ack.option(26), Some(9000u16.to_be_bytes().to_vec()));
        assert_eq!(ack.u32_option(51), Some(3600));
        assert_eq!(s.lease(), Some((MAC_A, now + Duration::from_secs(3600))));
    }

    #[test]
    fn long_lease_times_do_not_overflow() {
        let c = GuestNetConfig {
            lease_secs: u32::MAX,
            ..cfg()
        };
        let mut s = DhcpServer::new(c);
        let ack = handle(
            &mut s,
            &frame(&selecting(MAC_A, cfg().guest_addr)),
            Instant::now(),
        )
        .unwrap();
        assert_eq!(ack.u32_option(51), Some(u32::MAX));
        assert_eq!(ack.u32_option(58), Some(u32::MAX / 2));
        assert_eq!(
            ack.u32_option(59),
            Some(u32::try_from(u64::from(u32::MAX) * 7 / 8).unwrap())
        );
    }

    #[test]
    fn non_ethernet_client_id_is_echoed() {
        // systemd-networkd: type 255, IAID, DUID.
        let cid: Vec<u8> = [255u8, 0xaa, 0xbb, 0xcc, 0xdd, 0, 4]
            .into_iter()
            .chain(0..16u8)
            .collect();
        let opts = [DhcpOption {
            kind: 61,
            data: &cid,
        }];
        let d = DhcpRepr {
            additional_options: &opts,
            ..msg(DhcpMessageType::Discover, MAC_A)
        };
        let mut s = server();
        let offer = handle(&mut s, &frame(&d), Instant::now()).unwrap();
        assert_eq!(offer.option(61), Some(cid));
    }

    #[test]
    fn oversized_client_id_is_not_echoed_beyond_576() {
        let cid = vec![0x42u8; 255];
        let opts = [DhcpOption {
            kind: 61,
            data: &cid,
        }];
        let d = DhcpRepr {
            additional_options: &opts,
            ..selecting(MAC_A, cfg().guest_addr)
        };
        let d = DhcpRepr {
            client_identifier: None,
            ..d
        };
        let mut s = server();
        let ack = handle(&mut s, &frame(&d), Instant::now()).unwrap();
        assert_eq!(ack.message_type(), DhcpMessageType::Ack);
        assert_eq!(ack.option(61), None);
        assert!(ack.dhcp.len() <= 548);

        // A client accepting bigger messages gets it back.
        let big = DhcpRepr {
            max_size: Some(1500),
            ..d
        };
        let ack = handle(&mut s, &frame(&big), Instant::now()).unwrap();
        assert_eq!(ack.option(61), Some(cid));
        assert!(ack.dhcp.len() > 548);
    }

    #[test]
    fn zero_udp_checksum_is_accepted() {
        let mut f = frame(&discover(MAC_A));
        f[14 + 20 + 6] = 0;
        f[14 + 20 + 7] = 0;
        let offer = handle(&mut server(), &f, Instant::now()).unwrap();
        assert_eq!(offer.message_type(), DhcpMessageType::Offer);
    }

    #[test]
    fn bad_checksums_are_rejected() {
        let mut s = server();
        let mut f = frame(&discover(MAC_A));
        f[14 + 10] ^= 0x55;
        assert!(matches!(
            s.handle(&f, Instant::now()),
            Err(FrameError::Malformed { layer: "ipv4", .. })
        ));
        let mut f = frame(&discover(MAC_A));
        f[14 + 20 + 8 + 4] ^= 0x55; // xid byte
        assert!(matches!(
            s.handle(&f, Instant::now()),
            Err(FrameError::Malformed { layer: "udp", .. })
        ));
    }

    /// Patches byte `at` of the DHCP payload and fixes the UDP checksum.
    fn patch_dhcp(frame: &mut [u8], at: usize, value: u8) {
        frame[14 + 20 + 8 + at] = value;
        let mut eth = EthernetFrame::new_unchecked(&mut frame[..]);
        let mut ip = Ipv4Packet::new_unchecked(eth.payload_mut());
        let (src, dst) = (ip.src_addr(), ip.dst_addr());
        UdpPacket::new_unchecked(ip.payload_mut()).fill_checksum(&src.into(), &dst.into());
    }

    fn assert_malformed_dhcp(frame: &[u8]) {
        let mut s = server();
        let r = s.handle(frame, Instant::now());
        assert!(
            matches!(r, Err(FrameError::Malformed { layer: "dhcp", .. })),
            "{r:?}"
        );
        assert_eq!(s.lease(), None);
    }

    #[test]
    fn wrong_op_is_rejected() {
        // An OFFER-typed message with op = BOOTREPLY sent to the server port.
        let offer = msg(DhcpMessageType::Offer, MAC_A);
        assert_malformed_dhcp(&frame(&offer));
        // A DISCOVER with op patched to BOOTREPLY.
        let mut f = frame(&discover(MAC_A));
        patch_dhcp(&mut f, 0, 2);
        assert_malformed_dhcp(&f);
    }

    #[test]
    fn non_ethernet_hardware_is_rejected() {
        let mut f = frame(&discover(MAC_A));
        patch_dhcp(&mut f, 1, 6); // htype IEEE 802
        assert_malformed_dhcp(&f);
        let mut f = frame(&discover(MAC_A));
        patch_dhcp(&mut f, 2, 16); // hlen
        assert_malformed_dhcp(&f);
    }

    #[test]
    fn bad_magic_and_missing_message_type_are_rejected() {
        let mut f = frame(&discover(MAC_A));
        patch_dhcp(&mut f, 236, 0x64);
        assert_malformed_dhcp(&f);
        let mut f = frame(&discover(MAC_A));
        patch_dhcp(&mut f, 240, 0); // option 53 -> pad, then garbage
        patch_dhcp(&mut f, 241, 0);
        patch_dhcp(&mut f, 242, 0);
        assert_malformed_dhcp(&f);
    }

    #[test]
    fn truncated_dhcp_is_rejected() {
        let payload = [1u8; 200];
        let f = udp_frame(
            MAC_A,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::BROADCAST,
            68,
            67,
            &payload,
        );
        assert_malformed_dhcp(&f);
    }

    #[test]
    fn truncated_frames_never_panic() {
        let f = frame(&discover(MAC_A));
        for len in 0..f.len() {
            let mut s = server();
            let r = s.handle(&f[..len], Instant::now());
            assert!(
                matches!(r, Err(FrameError::Malformed { .. })),
                "len {len}: {r:?}"
            );
        }
    }

    #[test]
    fn corrupted_frames_never_panic() {
        let base = frame(&selecting(MAC_A, cfg().guest_addr));
        for at in 0..base.len() {
            for value in [0x00, 0x01, 0x7f, 0x80, 0xff] {
                let mut f = base.clone();
                f[at] = value;
                if at >= 42 {
                    patch_dhcp(&mut f, at - 42, value);
                }
                let mut s = server();
                let _ = s.handle(&f, Instant::now());
            }
        }
    }

    #[test]
    fn relayed_request_is_refused() {
        let d = DhcpRepr {
            relay_agent_ip: Ipv4Addr::new(10, 0, 2, 1),
            ..discover(MAC_A)
        };
        assert_eq!(
            server().handle(&frame(&d), Instant::now()),
            Err(FrameError::Unsupported("relayed dhcp"))
        );
    }

    #[test]
    fn non_dhcp_frames_are_rejected() {
        let f = udp_frame(MAC_A, cfg().guest_addr, cfg().dns, 5353, 53, b"dns?");
        assert_eq!(
            server().handle(&f, Instant::now()),
            Err(FrameError::Unsupported("udp port (not dhcp server)"))
        );
        let mut f = frame(&discover(MAC_A));
        EthernetFrame::new_unchecked(&mut f[..]).set_ethertype(EthernetProtocol::Arp);
        assert_eq!(
            server().handle(&f, Instant::now()),
            Err(FrameError::Unsupported("ethertype (not ipv4)"))
        );
    }

    #[test]
    fn is_dhcp_request_classifies() {
        let f = frame(&discover(MAC_A));
        assert!(is_dhcp_request(&f));
        assert!(is_dhcp_request(&frame_to(
            &renewing(MAC_A, cfg().guest_addr),
            cfg().gateway
        )));
        // Truncated anywhere in the headers.
        for len in [0, 13, 14, 33, 34, 41] {
            assert!(!is_dhcp_request(&f[..len]), "len {len}");
        }
        // Other UDP ports, other protocols, other ethertypes.
        assert!(!is_dhcp_request(&udp_frame(
            MAC_A,
            cfg().guest_addr,
            cfg().dns,
            5353,
            53,
            b"x"
        )));
        assert!(!is_dhcp_request(&udp_frame(
            MAC_A,
            cfg().gateway,
            cfg().guest_addr,
            67,
            68,
            b"x"
        )));
        let mut g = f.clone();
        EthernetFrame::new_unchecked(&mut g[..]).set_ethertype(EthernetProtocol::Arp);
        assert!(!is_dhcp_request(&g));
        let mut g = f.clone();
        g[14 + 9] = 6; // TCP
        assert!(!is_dhcp_request(&g));
        // Fragments.
        let mut g = f.clone();
        {
            let mut eth = EthernetFrame::new_unchecked(&mut g[..]);
            Ipv4Packet::new_unchecked(eth.payload_mut()).set_more_frags(true);
        }
        assert!(!is_dhcp_request(&g));
    }
}
