//! DHCPv6 server for the guest.
//!
//! # Theory of operation
//!
//! The IPv6 sibling of [`crate::services::dhcpv4`]: exactly one guest sits
//! behind the tap and there is exactly one address to hand out,
//! `cfg.guest_addr`, so [`Dhcpv6Server`] holds the configuration, its own
//! DUID and at most one lease (the client's DUID and an expiry).
//! [`Dhcpv6Server::handle`] takes one Ethernet frame carrying a UDP datagram
//! to port 547, parses Ethernet, IPv6 and UDP with smoltcp's `wire` views
//! (verifying the UDP checksum, which IPv6 makes mandatory: a zero checksum
//! is refused, RFC 8200 §8.1) and the DHCPv6 message with this module's own
//! [`wire`] layer, written in the same `Packet`/`Repr` style. It answers as
//! RFC 8415 §18.3 prescribes:
//!
//! * Solicit → Advertise (Preference 255, so the client need not wait for
//!   other servers) offering `guest_addr` in the client's IA_NA; an offer
//!   reserves nothing. With a Rapid Commit option the server commits at
//!   once: a Reply with Rapid Commit and a lease.
//! * Request → Reply binding the address: the lease is the client's DUID and
//!   `now + lease_secs`.
//! * Renew and Rebind → Reply extending the lease. The server is configured
//!   to create bindings on Renew/Rebind (RFC 8415 §18.3.4/§18.3.5 allow it),
//!   so a client the server does not know — e.g. after a restart without
//!   state — simply gets the address bound. Every other address the client
//!   lists (outside the prefix, or just not ours) comes back with lifetimes
//!   0 so the client stops using it.
//! * Confirm → Reply with status Success when every address in the IAs lies
//!   inside `cfg.prefix`, else NotOnLink; a Confirm with no address at all
//!   gets no reply (RFC 8415 §18.3.3).
//! * Release and Decline → Reply with status Success; the lease is dropped.
//!   IAs the client holds no binding for come back with NoBinding.
//! * Information-request → Reply with configuration only and an Information
//!   Refresh Time (`lease_secs` clamped to 600…86400 s, RFC 8415 §21.23).
//!
//! Advertise and Reply always carry our Server Identifier — DUID-LL (type 3,
//! hardware type 1, `cfg.gateway_mac`) — and the client's Client Identifier
//! echoed; Advertises and address-carrying Replies also carry the DNS server
//! (`cfg.dns`, RFC 3646) and, if `cfg.search` is not empty, the domain
//! search list in DNS wire format. Lifetimes: preferred = valid =
//! `lease_secs`, T1 = lease/2 and T2 = lease·4/5, the ratios RFC 8415 §21.4
//! recommends (0.5 and 0.8 of the shortest preferred lifetime).
//!
//! The address goes to one IA_NA per client: the one that already lists it,
//! else the first; further IA_NAs get NoAddrsAvail (an address belongs to a
//! single IA), and so does every IA_TA — the guest makes its own temporary
//! addresses with SLAAC. A Solicit or Request with no IA at all gets a
//! top-level NoAddrsAvail status. Committing (Request, Solicit with Rapid
//! Commit) an IA that lists an address outside the prefix gets NotOnLink for
//! that IA (RFC 8415 §18.2.10.1). At most four IAs of each kind and four
//! listed addresses per IA are answered, which keeps every reply far below
//! the IPv6 minimum MTU.
//!
//! One client DUID holds the lease at a time: any other DUID gets its IAs
//! answered with NoAddrsAvail until the lease expires; expired leases are
//! forgotten at the next [`Dhcpv6Server::handle`] call.
//!
//! Messages are dropped without a reply (`Ok(None)`) where RFC 8415 §16 says
//! a server MUST discard them: no Client Identifier (except in an
//! Information-request, where it is optional); a Solicit, Confirm or Rebind
//! carrying any Server Identifier; a Request, Renew, Release or Decline
//! whose Server Identifier is missing or not ours; an Information-request
//! naming another server or carrying an IA.
//!
//! Replies go from `cfg.gateway_mac` and `cfg.router_ll` (the link-local
//! router address), UDP port 547, to the request's source MAC and source
//! address (the client's link-local address), UDP port 546, hop limit 64.
//! Requests are accepted sent to ff02::1:2 or to one of the gateway's own
//! addresses (RFC 9915, which obsoletes RFC 8415, drops the unicast
//! restriction, so unicast is simply served rather than answered with
//! UseMulticast). Relayed messages are refused: there is no relay on a tap
//! link. Malformed input is a [`FrameError`]; nothing a guest sends can make
//! the server panic.

use std::fmt;
use std::net::Ipv6Addr;
use std::time::{Duration, Instant};

use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    ETHERNET_HEADER_LEN, EthernetAddress, EthernetFrame, EthernetProtocol, EthernetRepr,
    IPV6_HEADER_LEN, IpProtocol, Ipv6Packet, Ipv6Repr, UDP_HEADER_LEN, UdpPacket, UdpRepr,
};

use crate::config::GuestNet6Config;
use crate::services::error::FrameError;

use wire::{
    ALL_DHCP_RELAY_AGENTS_AND_SERVERS, CLIENT_PORT, IaAddr, IaNa, IaTa, MessageType, Packet, Repr,
    SERVER_PORT, Status, StatusCode,
};

pub mod wire {
    //! DHCPv6 messages on the wire (RFC 8415 §8, §21; RFC 3646), in
    //! smoltcp's `Packet`/`Repr` style.
    //!
    //! [`Packet`] is a bounds-checked view of a client/server message
    //! (message type, 24-bit transaction id, options); [`OptionIter`] walks
    //! a run of options and refuses one whose length overruns the buffer;
    //! [`Repr`] is the parsed message with the options this server uses, and
    //! emits itself back. Unknown options are skipped (RFC 8415 §16).
    //! [`encode_domain_list`] and [`decode_domain_list`] handle the DNS
    //! wire-format names of the domain search list (RFC 3646 §4, RFC 8415
    //! §10: no compression). Every accessor uses checked slicing: no input
    //! can make this module panic.

    use std::net::Ipv6Addr;

    use smoltcp::wire::{Error, Result};

    /// UDP port DHCPv6 clients listen on.
    pub const CLIENT_PORT: u16 = 546;
    /// UDP port DHCPv6 servers and relays listen on.
    pub const SERVER_PORT: u16 = 547;
    /// All_DHCP_Relay_Agents_and_Servers, ff02::1:2 (RFC 8415 §7.1).
    pub const ALL_DHCP_RELAY_AGENTS_AND_SERVERS: Ipv6Addr =
        Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 1, 2);

    /// Length of the message header: type and transaction id.
    pub const HEADER_LEN: usize = 4;
    /// Length of an option header: code and length.
    pub const OPTION_HEADER_LEN: usize = 4;
    /// Largest transaction id (24 bits).
    pub const MAX_TRANSACTION_ID: u32 = 0x00ff_ffff;
    /// Shortest DUID: a 2-byte type and one byte (RFC 8415 §11.1).
    pub const DUID_MIN_LEN: usize = 3;
    /// Longest DUID: a 2-byte type and 128 bytes (RFC 8415 §11.1).
    pub const DUID_MAX_LEN: usize = 130;
    /// Longest label of a DNS name (RFC 1035 §2.3.4).
    pub const MAX_LABEL_LEN: usize = 63;
    /// Longest DNS name in wire format (RFC 1035 §2.3.4).
    pub const MAX_NAME_LEN: usize = 255;

    /// Option 1, Client Identifier (RFC 8415 §21.2).
    pub const OPT_CLIENTID: u16 = 1;
    /// Option 2, Server Identifier (RFC 8415 §21.3).
    pub const OPT_SERVERID: u16 = 2;
    /// Option 3, Identity Association for Non-temporary Addresses (§21.4).
    pub const OPT_IA_NA: u16 = 3;
    /// Option 4, Identity Association for Temporary Addresses (§21.5).
    pub const OPT_IA_TA: u16 = 4;
    /// Option 5, IA Address (§21.6).
    pub const OPT_IAADDR: u16 = 5;
    /// Option 6, Option Request (§21.7).
    pub const OPT_ORO: u16 = 6;
    /// Option 7, Preference (§21.8).
    pub const OPT_PREFERENCE: u16 = 7;
    /// Option 8, Elapsed Time (§21.9).
    pub const OPT_ELAPSED_TIME: u16 = 8;
    /// Option 13, Status Code (§21.13).
    pub const OPT_STATUS_CODE: u16 = 13;
    /// Option 14, Rapid Commit (§21.14).
    pub const OPT_RAPID_COMMIT: u16 = 14;
    /// Option 23, DNS Recursive Name Server (RFC 3646 §3).
    pub const OPT_DNS_SERVERS: u16 = 23;
    /// Option 24, Domain Search List (RFC 3646 §4).
    pub const OPT_DOMAIN_LIST: u16 = 24;
    /// Option 32, Information Refresh Time (RFC 8415 §21.23).
    pub const OPT_INFORMATION_REFRESH_TIME: u16 = 32;
    /// Option 82, SOL_MAX_RT (RFC 8415 §21.24).
    pub const OPT_SOL_MAX_RT: u16 = 82;

    /// Fixed part of an IA_NA: IAID, T1, T2.
    const IA_NA_FIXED_LEN: usize = 12;
    /// Fixed part of an IA_TA: IAID.
    const IA_TA_FIXED_LEN: usize = 4;
    /// Fixed part of an IAADDR: address, preferred and valid lifetimes.
    const IAADDR_FIXED_LEN: usize = 24;
    /// Fixed part of a Status Code: the code.
    const STATUS_FIXED_LEN: usize = 2;
    /// Length of one IPv6 address.
    const ADDR_LEN: usize = 16;

    /// A DHCPv6 message type (RFC 8415 §7.3).
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum MessageType {
        /// 1: a client looks for servers.
        Solicit,
        /// 2: a server offers itself.
        Advertise,
        /// 3: a client asks one server for addresses.
        Request,
        /// 4: a client asks whether its addresses fit the link.
        Confirm,
        /// 5: a client extends its lease with the server that granted it.
        Renew,
        /// 6: a client extends its lease with any server.
        Rebind,
        /// 7: a server answers.
        Reply,
        /// 8: a client gives addresses back.
        Release,
        /// 9: a client found an address already in use.
        Decline,
        /// 10: a server asks the client to reconfigure.
        Reconfigure,
        /// 11: a client asks for configuration only.
        InformationRequest,
        /// 12: a relay forwards a client message.
        RelayForw,
        /// 13: a server answers through a relay.
        RelayRepl,
        /// Any other value.
        Unknown(u8),
    }

    impl From<u8> for MessageType {
        fn from(value: u8) -> Self {
            match value {
                1 => Self::Solicit,
                2 => Self::Advertise,
                3 => Self::Request,
                4 => Self::Confirm,
                5 => Self::Renew,
                6 => Self::Rebind,
                7 => Self::Reply,
                8 => Self::Release,
                9 => Self::Decline,
                10 => Self::Reconfigure,
                11 => Self::InformationRequest,
                12 => Self::RelayForw,
                13 => Self::RelayRepl,
                other => Self::Unknown(other),
            }
        }
    }

    impl From<MessageType> for u8 {
        fn from(value: MessageType) -> Self {
            match value {
                MessageType::Solicit => 1,
                MessageType::Advertise => 2,
                MessageType::Request => 3,
                MessageType::Confirm => 4,
                MessageType::Renew => 5,
                MessageType::Rebind => 6,
                MessageType::Reply => 7,
                MessageType::Release => 8,
                MessageType::Decline => 9,
                MessageType::Reconfigure => 10,
                MessageType::InformationRequest => 11,
                MessageType::RelayForw => 12,
                MessageType::RelayRepl => 13,
                MessageType::Unknown(other) => other,
            }
        }
    }

    /// A Status Code value (RFC 8415 §21.13).
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum StatusCode {
        /// 0: success.
        Success,
        /// 1: unspecified failure.
        UnspecFail,
        /// 2: the server has no addresses for the IA.
        NoAddrsAvail,
        /// 3: the client's binding is unknown to the server.
        NoBinding,
        /// 4: the addresses are not on the client's link.
        NotOnLink,
        /// 5: the client must use multicast.
        UseMulticast,
        /// Any other value.
        Unknown(u16),
    }

    impl From<u16> for StatusCode {
        fn from(value: u16) -> Self {
            match value {
                0 => Self::Success,
                1 => Self::UnspecFail,
                2 => Self::NoAddrsAvail,
                3 => Self::NoBinding,
                4 => Self::NotOnLink,
                5 => Self::UseMulticast,
                other => Self::Unknown(other),
            }
        }
    }

    impl From<StatusCode> for u16 {
        fn from(value: StatusCode) -> Self {
            match value {
                StatusCode::Success => 0,
                StatusCode::UnspecFail => 1,
                StatusCode::NoAddrsAvail => 2,
                StatusCode::NoBinding => 3,
                StatusCode::NotOnLink => 4,
                StatusCode::UseMulticast => 5,
                StatusCode::Unknown(other) => other,
            }
        }
    }

    /// `N` bytes of `data` from `at`, or an error past its end.
    fn read_array<const N: usize>(data: &[u8], at: usize) -> Result<[u8; N]> {
        let end = at.checked_add(N).ok_or(Error)?;
        data.get(at..end)
            .and_then(|bytes| <[u8; N]>::try_from(bytes).ok())
            .ok_or(Error)
    }

    /// The big-endian u16 at `at`.
    fn read_u16(data: &[u8], at: usize) -> Result<u16> {
        read_array::<2>(data, at).map(u16::from_be_bytes)
    }

    /// The big-endian u32 at `at`.
    fn read_u32(data: &[u8], at: usize) -> Result<u32> {
        read_array::<4>(data, at).map(u32::from_be_bytes)
    }

    /// `data` as exactly `N` bytes (a fixed-length option body).
    fn exact<const N: usize>(data: &[u8]) -> Result<[u8; N]> {
        <[u8; N]>::try_from(data).map_err(|_| Error)
    }

    /// Fills an option that may appear only once.
    fn set_once<V>(slot: &mut Option<V>, value: V) -> Result<()> {
        if slot.is_some() {
            return Err(Error);
        }
        *slot = Some(value);
        Ok(())
    }

    /// A DUID of legal length.
    fn parse_duid(data: &[u8]) -> Result<&[u8]> {
        if (DUID_MIN_LEN..=DUID_MAX_LEN).contains(&data.len()) {
            Ok(data)
        } else {
            Err(Error)
        }
    }

    /// Adds an option with a body of `body` bytes to a running length.
    fn add_option(len: usize, body: usize) -> usize {
        len.saturating_add(OPTION_HEADER_LEN.saturating_add(body))
    }

    /// One option as found in a message: its code and body.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct RawOption<'a> {
        /// The option code.
        pub code: u16,
        /// The option body (without code and length).
        pub data: &'a [u8],
    }

    /// Iterator over a run of options (a message's, or the options
    /// encapsulated in an IA or IAADDR). Yields an error, then ends, at an
    /// option header cut short or a length running past the buffer.
    #[derive(Clone, Debug)]
    pub struct OptionIter<'a> {
        /// What is left to walk.
        rest: &'a [u8],
        /// Whether an error was yielded (the iterator is then done).
        failed: bool,
    }

    impl<'a> OptionIter<'a> {
        /// An iterator over the options in `data`.
        pub fn new(data: &'a [u8]) -> Self {
            Self {
                rest: data,
                failed: false,
            }
        }
    }

    impl<'a> Iterator for OptionIter<'a> {
        type Item = Result<RawOption<'a>>;

        fn next(&mut self) -> Option<Self::Item> {
            if self.failed || self.rest.is_empty() {
                return None;
            }
            match split_option(self.rest) {
                Ok((option, rest)) => {
                    self.rest = rest;
                    Some(Ok(option))
                }
                Err(e) => {
                    self.failed = true;
                    self.rest = &[];
                    Some(Err(e))
                }
            }
        }
    }

    impl core::iter::FusedIterator for OptionIter<'_> {}

    /// The first option of `data` and what follows it.
    fn split_option(data: &[u8]) -> Result<(RawOption<'_>, &[u8])> {
        let code = read_u16(data, 0)?;
        let len = usize::from(read_u16(data, 2)?);
        let end = OPTION_HEADER_LEN.checked_add(len).ok_or(Error)?;
        let body = data.get(OPTION_HEADER_LEN..end).ok_or(Error)?;
        let rest = data.get(end..).ok_or(Error)?;
        Ok((RawOption { code, data: body }, rest))
    }

    /// A read/write wrapper around a client/server DHCPv6 message buffer
    /// (RFC 8415 §8). Relay messages have another layout and are not
    /// handled.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct Packet<T: AsRef<[u8]>> {
        /// The message bytes.
        buffer: T,
    }

    impl<T: AsRef<[u8]>> Packet<T> {
        /// Imbues a raw octet buffer with DHCPv6 message structure.
        pub const fn new_unchecked(buffer: T) -> Self {
            Self { buffer }
        }

        /// Shorthand for [`Self::new_unchecked`] and [`Self::check_len`].
        pub fn new_checked(buffer: T) -> Result<Self> {
            let packet = Self::new_unchecked(buffer);
            packet.check_len()?;
            Ok(packet)
        }

        /// Ensures the buffer holds the message header. Options are checked
        /// as they are read.
        pub fn check_len(&self) -> Result<()> {
            if self.buffer.as_ref().len() < HEADER_LEN {
                Err(Error)
            } else {
                Ok(())
            }
        }

        /// Consumes the packet, returning the underlying buffer.
        pub fn into_inner(self) -> T {
            self.buffer
        }

        /// The message type (`Unknown(0)` on a buffer shorter than the
        /// header, which only [`Self::new_unchecked`] admits).
        pub fn msg_type(&self) -> MessageType {
            MessageType::from(self.buffer.as_ref().first().copied().unwrap_or(0))
        }

        /// The 24-bit transaction id (0 on a buffer shorter than the header).
        pub fn transaction_id(&self) -> u32 {
            read_array::<3>(self.buffer.as_ref(), 1)
                .map(|[a, b, c]| u32::from_be_bytes([0, a, b, c]))
                .unwrap_or(0)
        }

        /// The message's options.
        pub fn options(&self) -> OptionIter<'_> {
            OptionIter::new(self.buffer.as_ref().get(HEADER_LEN..).unwrap_or_default())
        }
    }

    impl<T: AsRef<[u8]> + AsMut<[u8]>> Packet<T> {
        /// Sets the message type (no-op on a buffer shorter than the header).
        pub fn set_msg_type(&mut self, value: MessageType) {
            if let Some(byte) = self.buffer.as_mut().first_mut() {
                *byte = value.into();
            }
        }

        /// Sets the transaction id from its low 24 bits (no-op on a buffer
        /// shorter than the header).
        pub fn set_transaction_id(&mut self, value: u32) {
            let [_, a, b, c] = value.to_be_bytes();
            if let Some(bytes) = self.buffer.as_mut().get_mut(1..HEADER_LEN) {
                bytes.copy_from_slice(&[a, b, c]);
            }
        }

        /// The options area, mutably.
        pub fn options_mut(&mut self) -> &mut [u8] {
            self.buffer
                .as_mut()
                .get_mut(HEADER_LEN..)
                .unwrap_or_default()
        }
    }

    /// Sequential writer into an emit buffer.
    struct Writer<'b> {
        /// The buffer being filled.
        buf: &'b mut [u8],
        /// The next byte to write.
        pos: usize,
    }

    impl Writer<'_> {
        /// Writes `data`, or fails if it does not fit.
        fn bytes(&mut self, data: &[u8]) -> Result<()> {
            let end = self.pos.checked_add(data.len()).ok_or(Error)?;
            self.buf
                .get_mut(self.pos..end)
                .ok_or(Error)?
                .copy_from_slice(data);
            self.pos = end;
            Ok(())
        }

        /// Writes a big-endian u16.
        fn u16(&mut self, value: u16) -> Result<()> {
            self.bytes(&value.to_be_bytes())
        }

        /// Writes a big-endian u32.
        fn u32(&mut self, value: u32) -> Result<()> {
            self.bytes(&value.to_be_bytes())
        }

        /// Writes an option header for a body of `body_len` bytes.
        fn header(&mut self, code: u16, body_len: usize) -> Result<()> {
            self.u16(code)?;
            self.u16(u16::try_from(body_len).map_err(|_| Error)?)
        }

        /// Writes a whole option.
        fn option(&mut self, code: u16, body: &[u8]) -> Result<()> {
            self.header(code, body.len())?;
            self.bytes(body)
        }
    }

    /// A Status Code option (RFC 8415 §21.13).
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct Status<'a> {
        /// The status.
        pub code: StatusCode,
        /// The message for humans (UTF-8 by the RFC, not checked here).
        pub message: &'a [u8],
    }

    impl<'a> Status<'a> {
        /// Parses a Status Code option body.
        pub fn parse(data: &'a [u8]) -> Result<Self> {
            Ok(Self {
                code: StatusCode::from(read_u16(data, 0)?),
                message: data.get(STATUS_FIXED_LEN..).ok_or(Error)?,
            })
        }

        /// The option body length.
        fn body_len(&self) -> usize {
            STATUS_FIXED_LEN.saturating_add(self.message.len())
        }

        /// Emits the whole option.
        fn emit(&self, w: &mut Writer<'_>) -> Result<()> {
            w.header(OPT_STATUS_CODE, self.body_len())?;
            w.u16(self.code.into())?;
            w.bytes(self.message)
        }
    }

    /// Parses the options encapsulated in an IA or IAADDR: IAADDRs (if
    /// `addresses` is given) and one Status Code; others are skipped.
    fn parse_nested<'a>(
        data: &'a [u8],
        mut addresses: Option<&mut Vec<IaAddr<'a>>>,
    ) -> Result<Option<Status<'a>>> {
        let mut status = None;
        for option in OptionIter::new(data) {
            let RawOption { code, data } = option?;
            match (code, addresses.as_mut()) {
                (OPT_STATUS_CODE, _) => set_once(&mut status, Status::parse(data)?)?,
                (OPT_IAADDR, Some(list)) => list.push(IaAddr::parse(data)?),
                _ => {}
            }
        }
        Ok(status)
    }

    /// An IA Address option (RFC 8415 §21.6).
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub struct IaAddr<'a> {
        /// The address.
        pub addr: Ipv6Addr,
        /// Preferred lifetime, seconds.
        pub preferred: u32,
        /// Valid lifetime, seconds.
        pub valid: u32,
        /// An encapsulated Status Code, if any.
        pub status: Option<Status<'a>>,
    }

    impl<'a> IaAddr<'a> {
        /// Parses an IAADDR option body.
        pub fn parse(data: &'a [u8]) -> Result<Self> {
            Ok(Self {
                addr: Ipv6Addr::from(read_array::<ADDR_LEN>(data, 0)?),
                preferred: read_u32(data, 16)?,
                valid: read_u32(data, 20)?,
                status: parse_nested(data.get(IAADDR_FIXED_LEN..).ok_or(Error)?, None)?,
            })
        }

        /// The option body length.
        fn body_len(&self) -> usize {
            let nested = self.status.map_or(0, |s| add_option(0, s.body_len()));
            IAADDR_FIXED_LEN.saturating_add(nested)
        }

        /// Emits the whole option.
        fn emit(&self, w: &mut Writer<'_>) -> Result<()> {
            w.header(OPT_IAADDR, self.body_len())?;
            w.bytes(&self.addr.octets())?;
            w.u32(self.preferred)?;
            w.u32(self.valid)?;
            self.status.as_ref().map_or(Ok(()), |s| s.emit(w))
        }
    }

    /// Length of the IAADDR and Status Code options inside an IA.
    fn nested_len(addresses: &[IaAddr<'_>], status: Option<&Status<'_>>) -> usize {
        let len = addresses
            .iter()
            .fold(0usize, |len, a| add_option(len, a.body_len()));
        status.map_or(len, |s| add_option(len, s.body_len()))
    }

    /// An IA_NA option (RFC 8415 §21.4).
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub struct IaNa<'a> {
        /// The identity association's id, chosen by the client.
        pub iaid: u32,
        /// Renewal time, seconds.
        pub t1: u32,
        /// Rebinding time, seconds.
        pub t2: u32,
        /// The IAADDR options inside.
        pub addresses: Vec<IaAddr<'a>>,
        /// An encapsulated Status Code, if any.
        pub status: Option<Status<'a>>,
    }

    impl<'a> IaNa<'a> {
        /// Parses an IA_NA option body.
        pub fn parse(data: &'a [u8]) -> Result<Self> {
            let mut addresses = Vec::new();
            let status = parse_nested(
                data.get(IA_NA_FIXED_LEN..).ok_or(Error)?,
                Some(&mut addresses),
            )?;
            Ok(Self {
                iaid: read_u32(data, 0)?,
                t1: read_u32(data, 4)?,
                t2: read_u32(data, 8)?,
                addresses,
                status,
            })
        }

        /// The option body length.
        fn body_len(&self) -> usize {
            IA_NA_FIXED_LEN.saturating_add(nested_len(&self.addresses, self.status.as_ref()))
        }

        /// Emits the whole option.
        fn emit(&self, w: &mut Writer<'_>) -> Result<()> {
            w.header(OPT_IA_NA, self.body_len())?;
            w.u32(self.iaid)?;
            w.u32(self.t1)?;
            w.u32(self.t2)?;
            for address in &self.addresses {
                address.emit(w)?;
            }
            self.status.as_ref().map_or(Ok(()), |s| s.emit(w))
        }
    }

    /// An IA_TA option (RFC 8415 §21.5).
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub struct IaTa<'a> {
        /// The identity association's id, chosen by the client.
        pub iaid: u32,
        /// The IAADDR options inside.
        pub addresses: Vec<IaAddr<'a>>,
        /// An encapsulated Status Code, if any.
        pub status: Option<Status<'a>>,
    }

    impl<'a> IaTa<'a> {
        /// Parses an IA_TA option body.
        pub fn parse(data: &'a [u8]) -> Result<Self> {
            let mut addresses = Vec::new();
            let status = parse_nested(
                data.get(IA_TA_FIXED_LEN..).ok_or(Error)?,
                Some(&mut addresses),
            )?;
            Ok(Self {
                iaid: read_u32(data, 0)?,
                addresses,
                status,
            })
        }

        /// The option body length.
        fn body_len(&self) -> usize {
            IA_TA_FIXED_LEN.saturating_add(nested_len(&self.addresses, self.status.as_ref()))
        }

        /// Emits the whole option.
        fn emit(&self, w: &mut Writer<'_>) -> Result<()> {
            w.header(OPT_IA_TA, self.body_len())?;
            w.u32(self.iaid)?;
            for address in &self.addresses {
                address.emit(w)?;
            }
            self.status.as_ref().map_or(Ok(()), |s| s.emit(w))
        }
    }

    /// A high-level representation of a client/server DHCPv6 message, with
    /// the options this server reads or writes. Options that may appear
    /// once are refused when repeated; ORO and DNS server lists accumulate.
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub struct Repr<'a> {
        /// The message type.
        pub msg_type: MessageType,
        /// The transaction id (24 bits).
        pub transaction_id: u32,
        /// The Client Identifier option's DUID.
        pub client_id: Option<&'a [u8]>,
        /// The Server Identifier option's DUID.
        pub server_id: Option<&'a [u8]>,
        /// The IA_NA options.
        pub ia_na: Vec<IaNa<'a>>,
        /// The IA_TA options (non-empty = IA_TA present).
        pub ia_ta: Vec<IaTa<'a>>,
        /// The option codes of the Option Request option (empty = absent).
        pub oro: Vec<u16>,
        /// Whether a Rapid Commit option is present.
        pub rapid_commit: bool,
        /// The Elapsed Time option, hundredths of a second.
        pub elapsed_time: Option<u16>,
        /// The top-level Status Code option.
        pub status: Option<Status<'a>>,
        /// The Preference option.
        pub preference: Option<u8>,
        /// The DNS Recursive Name Server addresses (empty = absent).
        pub dns_servers: Vec<Ipv6Addr>,
        /// The Domain Search List option's body, DNS wire format (see
        /// [`encode_domain_list`] and [`decode_domain_list`]).
        pub domain_list: Option<&'a [u8]>,
        /// The Information Refresh Time option, seconds.
        pub information_refresh_time: Option<u32>,
        /// The SOL_MAX_RT option, seconds.
        pub sol_max_rt: Option<u32>,
    }

    impl<'a> Repr<'a> {
        /// A message of `msg_type` with no options.
        pub fn new(msg_type: MessageType, transaction_id: u32) -> Self {
            Self {
                msg_type,
                transaction_id,
                client_id: None,
                server_id: None,
                ia_na: Vec::new(),
                ia_ta: Vec::new(),
                oro: Vec::new(),
                rapid_commit: false,
                elapsed_time: None,
                status: None,
                preference: None,
                dns_servers: Vec::new(),
                domain_list: None,
                information_refresh_time: None,
                sol_max_rt: None,
            }
        }

        /// Parses a message. Fails on a truncated header, an option running
        /// past the buffer, an option of the wrong length, a DUID of illegal
        /// length, or a once-only option repeated.
        pub fn parse<T: AsRef<[u8]> + ?Sized>(packet: &Packet<&'a T>) -> Result<Self> {
            packet.check_len()?;
            let buffer: &'a T = packet.buffer;
            let data: &'a [u8] = buffer.as_ref();
            let mut repr = Self::new(packet.msg_type(), packet.transaction_id());
            for option in OptionIter::new(data.get(HEADER_LEN..).unwrap_or_default()) {
                let RawOption { code, data } = option?;
                match code {
                    OPT_CLIENTID => set_once(&mut repr.client_id, parse_duid(data)?)?,
                    OPT_SERVERID => set_once(&mut repr.server_id, parse_duid(data)?)?,
                    OPT_IA_NA => repr.ia_na.push(IaNa::parse(data)?),
                    OPT_IA_TA => repr.ia_ta.push(IaTa::parse(data)?),
                    OPT_ORO => {
                        if data.len() % 2 != 0 {
                            return Err(Error);
                        }
                        for at in (0..data.len()).step_by(2) {
                            repr.oro.push(read_u16(data, at)?);
                        }
                    }
                    OPT_PREFERENCE => {
                        let [preference] = exact::<1>(data)?;
                        set_once(&mut repr.preference, preference)?;
                    }
                    OPT_ELAPSED_TIME => set_once(
                        &mut repr.elapsed_time,
                        u16::from_be_bytes(exact::<2>(data)?),
                    )?,
                    OPT_STATUS_CODE => set_once(&mut repr.status, Status::parse(data)?)?,
                    OPT_RAPID_COMMIT => {
                        if !data.is_empty() {
                            return Err(Error);
                        }
                        repr.rapid_commit = true;
                    }
                    OPT_DNS_SERVERS => {
                        if data.len() % ADDR_LEN != 0 {
                            return Err(Error);
                        }
                        for at in (0..data.len()).step_by(ADDR_LEN) {
                            repr.dns_servers
                                .push(Ipv6Addr::from(read_array::<ADDR_LEN>(data, at)?));
                        }
                    }
                    OPT_DOMAIN_LIST => set_once(&mut repr.domain_list, data)?,
                    OPT_INFORMATION_REFRESH_TIME => set_once(
                        &mut repr.information_refresh_time,
                        u32::from_be_bytes(exact::<4>(data)?),
                    )?,
                    OPT_SOL_MAX_RT => {
                        set_once(&mut repr.sol_max_rt, u32::from_be_bytes(exact::<4>(data)?))?
                    }
                    // RFC 8415 §16: options a receiver does not know are
                    // ignored.
                    _ => {}
                }
            }
            Ok(repr)
        }

        /// The length of the message [`Self::emit`] writes.
        pub fn buffer_len(&self) -> usize {
            let mut len = HEADER_LEN;
            if let Some(id) = self.client_id {
                len = add_option(len, id.len());
            }
            if let Some(id) = self.server_id {
                len = add_option(len, id.len());
            }
            for ia in &self.ia_na {
                len = add_option(len, ia.body_len());
            }
            for ia in &self.ia_ta {
                len = add_option(len, ia.body_len());
            }
            if !self.oro.is_empty() {
                len = add_option(len, self.oro.len().saturating_mul(2));
            }
            if self.preference.is_some() {
                len = add_option(len, 1);
            }
            if self.elapsed_time.is_some() {
                len = add_option(len, 2);
            }
            if self.rapid_commit {
                len = add_option(len, 0);
            }
            if let Some(status) = &self.status {
                len = add_option(len, status.body_len());
            }
            if !self.dns_servers.is_empty() {
                len = add_option(len, self.dns_servers.len().saturating_mul(ADDR_LEN));
            }
            if let Some(list) = self.domain_list {
                len = add_option(len, list.len());
            }
            if self.information_refresh_time.is_some() {
                len = add_option(len, 4);
            }
            if self.sol_max_rt.is_some() {
                len = add_option(len, 4);
            }
            len
        }

        /// Emits the message into `packet`, whose buffer should be
        /// [`Self::buffer_len`] bytes long (bytes past it are left alone and
        /// would read as options). Fails if the buffer is too short, the
        /// transaction id does not fit 24 bits or an option body exceeds
        /// 65535 bytes.
        pub fn emit<T: AsRef<[u8]> + AsMut<[u8]> + ?Sized>(
            &self,
            packet: &mut Packet<&mut T>,
        ) -> Result<()> {
            if self.transaction_id > MAX_TRANSACTION_ID {
                return Err(Error);
            }
            let mut w = Writer {
                buf: packet.buffer.as_mut(),
                pos: 0,
            };
            let [_, a, b, c] = self.transaction_id.to_be_bytes();
            w.bytes(&[self.msg_type.into(), a, b, c])?;
            if let Some(id) = self.client_id {
                w.option(OPT_CLIENTID, id)?;
            }
            if let Some(id) = self.server_id {
                w.option(OPT_SERVERID, id)?;
            }
            for ia in &self.ia_na {
                ia.emit(&mut w)?;
            }
            for ia in &self.ia_ta {
                ia.emit(&mut w)?;
            }
            if !self.oro.is_empty() {
                w.header(OPT_ORO, self.oro.len().saturating_mul(2))?;
                for code in &self.oro {
                    w.u16(*code)?;
                }
            }
            if let Some(preference) = self.preference {
                w.option(OPT_PREFERENCE, &[preference])?;
            }
            if let Some(elapsed) = self.elapsed_time {
                w.option(OPT_ELAPSED_TIME, &elapsed.to_be_bytes())?;
            }
            if self.rapid_commit {
                w.option(OPT_RAPID_COMMIT, &[])?;
            }
            if let Some(status) = &self.status {
                status.emit(&mut w)?;
            }
            if !self.dns_servers.is_empty() {
                w.header(
                    OPT_DNS_SERVERS,
                    self.dns_servers.len().saturating_mul(ADDR_LEN),
                )?;
                for server in &self.dns_servers {
                    w.bytes(&server.octets())?;
                }
            }
            if let Some(list) = self.domain_list {
                w.option(OPT_DOMAIN_LIST, list)?;
            }
            if let Some(irt) = self.information_refresh_time {
                w.option(OPT_INFORMATION_REFRESH_TIME, &irt.to_be_bytes())?;
            }
            if let Some(rt) = self.sol_max_rt {
                w.option(OPT_SOL_MAX_RT, &rt.to_be_bytes())?;
            }
            Ok(())
        }
    }

    /// Encodes domain names for the Domain Search List option (RFC 3646
    /// §4): each name as DNS wire-format labels ending in the root label,
    /// uncompressed (RFC 8415 §10). A trailing dot is accepted. Fails on an
    /// empty name or label, a label over 63 bytes or a name over 255 bytes.
    pub fn encode_domain_list<S: AsRef<str>>(names: &[S]) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        for name in names {
            let name = name.as_ref();
            let name = name.strip_suffix('.').unwrap_or(name);
            if name.is_empty() {
                return Err(Error);
            }
            let start = out.len();
            for label in name.split('.') {
                let len = u8::try_from(label.len())
                    .ok()
                    .filter(|len| (1..=MAX_LABEL_LEN).contains(&usize::from(*len)))
                    .ok_or(Error)?;
                out.push(len);
                out.extend_from_slice(label.as_bytes());
            }
            out.push(0);
            if out.len().saturating_sub(start) > MAX_NAME_LEN {
                return Err(Error);
            }
        }
        Ok(out)
    }

    /// Decodes a Domain Search List option body into dotted names (no
    /// trailing dot). Fails on a truncated name, a compression pointer or
    /// reserved label type, a name over 255 bytes, the root name alone, or
    /// a label that is not UTF-8.
    pub fn decode_domain_list(data: &[u8]) -> Result<Vec<String>> {
        let mut names = Vec::new();
        let mut pos = 0usize;
        while pos < data.len() {
            let start = pos;
            let mut labels: Vec<&str> = Vec::new();
            loop {
                let len = usize::from(*data.get(pos).ok_or(Error)?);
                pos = pos.checked_add(1).ok_or(Error)?;
                if len == 0 {
                    break;
                }
                if len > MAX_LABEL_LEN {
                    return Err(Error);
                }
                let end = pos.checked_add(len).ok_or(Error)?;
                let label = data.get(pos..end).ok_or(Error)?;
                labels.push(core::str::from_utf8(label).map_err(|_| Error)?);
                pos = end;
                if pos.saturating_sub(start) >= MAX_NAME_LEN {
                    return Err(Error);
                }
            }
            if labels.is_empty() {
                return Err(Error);
            }
            names.push(labels.join("."));
        }
        Ok(names)
    }
}

/// DUID type 3, DUID-LL (RFC 8415 §11.4).
const DUID_TYPE_LL: u16 = 3;
/// Hardware type 1, Ethernet (IANA ARP hardware types).
const HARDWARE_TYPE_ETHERNET: u16 = 1;
/// The Preference that makes a client stop collecting Advertises (RFC 8415
/// §18.2.1).
const PREFERENCE_MAX: u8 = 255;
/// Hop limit of the replies.
const REPLY_HOP_LIMIT: u8 = 64;
/// Most IAs of each kind answered in one reply.
const MAX_IAS: usize = 4;
/// Most client-listed addresses echoed (with lifetimes 0) per IA.
const MAX_LISTED: usize = 4;
/// Information Refresh Time ceiling, the RFC default (RFC 8415 §21.23).
const IRT_DEFAULT: u32 = 86_400;
/// Information Refresh Time floor (IRT_MINIMUM, RFC 8415 §7.6).
const IRT_MINIMUM: u32 = 600;
/// The IPv6 minimum link MTU (RFC 8200 §5).
const IPV6_MIN_MTU: usize = 1280;

/// Status messages (for humans reading packet dumps).
const MSG_HELD: &str = "address leased to another client";
/// See [`MSG_HELD`].
const MSG_ONE_ADDRESS: &str = "one address per client";
/// See [`MSG_HELD`].
const MSG_NO_TEMPORARY: &str = "no temporary addresses, use SLAAC";
/// See [`MSG_HELD`].
const MSG_NOT_ON_LINK: &str = "address not on this link";
/// See [`MSG_HELD`].
const MSG_NO_BINDING: &str = "no binding";
/// See [`MSG_HELD`].
const MSG_NO_IA: &str = "no IA requested";

/// The one lease the server can hand out.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Lease {
    /// The client holding the lease (its DUID).
    duid: Vec<u8>,
    /// When the lease runs out.
    expires: Instant,
    /// The MAC address the lease was bound from (unknown for a lease
    /// restored after a restart).
    mac: Option<EthernetAddress>,
}

/// How an IA_NA is being answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// Advertise: offer, hints outside the prefix ignored.
    Offer,
    /// Request or rapid-commit Solicit: bind; addresses off the link get
    /// NotOnLink.
    Commit,
    /// Renew or Rebind: bind; every other listed address gets lifetimes 0.
    Extend,
}

/// What a reply says, before it is dressed in identifiers and headers.
#[derive(Debug)]
struct Answer {
    /// Advertise or Reply.
    msg_type: MessageType,
    /// The IA_NAs answered.
    ia_na: Vec<IaNa<'static>>,
    /// The IA_TAs answered.
    ia_ta: Vec<IaTa<'static>>,
    /// The top-level status.
    status: Option<Status<'static>>,
    /// Whether to include Rapid Commit.
    rapid_commit: bool,
    /// Whether to include Preference 255.
    preference: bool,
    /// Whether to include DNS servers and the domain list.
    config: bool,
    /// Whether to include an Information Refresh Time.
    refresh: bool,
}

impl Answer {
    /// An answer of `msg_type` with nothing in it.
    fn new(msg_type: MessageType) -> Self {
        Self {
            msg_type,
            ia_na: Vec::new(),
            ia_ta: Vec::new(),
            status: None,
            rapid_commit: false,
            preference: false,
            config: false,
            refresh: false,
        }
    }
}

/// A status with a static message.
fn status(code: StatusCode, message: &'static str) -> Status<'static> {
    Status {
        code,
        message: message.as_bytes(),
    }
}

/// Up to [`MAX_LISTED`] of `addresses`, with lifetimes 0.
fn zeroed(addresses: &[IaAddr<'_>]) -> Vec<IaAddr<'static>> {
    addresses
        .iter()
        .take(MAX_LISTED)
        .map(|a| IaAddr {
            addr: a.addr,
            preferred: 0,
            valid: 0,
            status: None,
        })
        .collect()
}

/// An IA_NA refused with `code`; with `zero`, the addresses it listed come
/// back with lifetimes 0.
fn refused_ia(ia: &IaNa<'_>, zero: bool, code: StatusCode, message: &'static str) -> IaNa<'static> {
    IaNa {
        iaid: ia.iaid,
        t1: 0,
        t2: 0,
        addresses: if zero {
            zeroed(&ia.addresses)
        } else {
            Vec::new()
        },
        status: Some(status(code, message)),
    }
}

/// Every IA_TA (up to [`MAX_IAS`]) refused with `code`; with `zero`, their
/// addresses come back with lifetimes 0.
fn refused_ta(
    ias: &[IaTa<'_>],
    zero: bool,
    code: StatusCode,
    message: &'static str,
) -> Vec<IaTa<'static>> {
    ias.iter()
        .take(MAX_IAS)
        .map(|ia| IaTa {
            iaid: ia.iaid,
            addresses: if zero {
                zeroed(&ia.addresses)
            } else {
                Vec::new()
            },
            status: Some(status(code, message)),
        })
        .collect()
}

/// Every IA_NA (up to [`MAX_IAS`]) refused with NoBinding.
fn no_binding(ias: &[IaNa<'_>]) -> Vec<IaNa<'static>> {
    ias.iter()
        .take(MAX_IAS)
        .map(|ia| refused_ia(ia, false, StatusCode::NoBinding, MSG_NO_BINDING))
        .collect()
}

/// The DUID-LL of `mac`.
fn duid_ll(mac: EthernetAddress) -> Vec<u8> {
    let mut duid = Vec::with_capacity(10);
    duid.extend_from_slice(&DUID_TYPE_LL.to_be_bytes());
    duid.extend_from_slice(&HARDWARE_TYPE_ETHERNET.to_be_bytes());
    duid.extend_from_slice(mac.as_bytes());
    duid
}

/// Bytes as hex, for logs.
struct Hex<'a>(&'a [u8]);

impl fmt::Display for Hex<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for byte in self.0 {
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

/// DHCPv6 server state for the one guest behind the tap.
#[derive(Debug)]
pub struct Dhcpv6Server {
    /// The IPv6 subnet being served.
    cfg: GuestNet6Config,
    /// Our DUID (DUID-LL of the gateway MAC).
    duid: Vec<u8>,
    /// `cfg.search` in DNS wire format; empty = not sent.
    domain_list: Vec<u8>,
    /// The current lease, if any.
    lease: Option<Lease>,
    /// The source MAC of the message being handled.
    current_mac: Option<EthernetAddress>,
}

impl Dhcpv6Server {
    /// Creates a server for `cfg` with no lease. A search list that cannot
    /// be encoded (a label over 63 bytes, an empty name) is logged and not
    /// sent.
    pub fn new(cfg: GuestNet6Config) -> Self {
        let domain_list = wire::encode_domain_list(&cfg.search).unwrap_or_else(|_| {
            log::warn!(
                "dhcpv6: search domains {:?} cannot be encoded, not sent",
                cfg.search
            );
            Vec::new()
        });
        Self {
            duid: duid_ll(cfg.gateway_mac),
            cfg,
            domain_list,
            lease: None,
            current_mac: None,
        }
    }

    /// The server's DUID (DUID-LL of the gateway MAC), as sent in the
    /// Server Identifier option.
    pub fn duid(&self) -> &[u8] {
        &self.duid
    }

    /// Handles one Ethernet frame carrying a UDP datagram to port 547.
    /// Returns the complete Ethernet reply frame, or `Ok(None)` when no
    /// reply is due (a message RFC 8415 §16 says to discard, e.g. one for
    /// another server, or a Confirm without addresses).
    ///
    /// `now` is the time the frame arrived; it stamps lease expiry.
    pub fn handle(&mut self, frame: &[u8], now: Instant) -> Result<Option<Vec<u8>>, FrameError> {
        let caps = ChecksumCapabilities::default();
        let eth = EthernetFrame::new_checked(frame).map_err(FrameError::malformed("ethernet"))?;
        let eth_repr = EthernetRepr::parse(&eth).map_err(FrameError::malformed("ethernet"))?;
        if eth_repr.ethertype != EthernetProtocol::Ipv6 {
            return Err(FrameError::Unsupported("ethertype (not ipv6)"));
        }
        if !eth_repr.src_addr.is_unicast() {
            return Err(FrameError::Unsupported("ethernet source not unicast"));
        }

        let ip = Ipv6Packet::new_checked(eth.payload()).map_err(FrameError::malformed("ipv6"))?;
        let ip_repr = Ipv6Repr::parse(&ip).map_err(FrameError::malformed("ipv6"))?;
        if ip_repr.next_header != IpProtocol::Udp {
            return Err(FrameError::Unsupported("ipv6 next header (not udp)"));
        }
        let (src, dst) = (ip_repr.src_addr, ip_repr.dst_addr);

        let udp = UdpPacket::new_checked(ip.payload()).map_err(FrameError::malformed("udp"))?;
        if udp.checksum() == 0 {
            // Optional only over IPv4; smoltcp's check lets it pass.
            return Err(FrameError::Malformed {
                layer: "udp",
                source: smoltcp::wire::Error,
            });
        }
        let udp_repr = UdpRepr::parse(&udp, &src.into(), &dst.into(), &caps)
            .map_err(FrameError::malformed("udp"))?;
        if udp_repr.dst_port != SERVER_PORT {
            return Err(FrameError::Unsupported("udp port (not dhcpv6 server)"));
        }
        if udp_repr.src_port != CLIENT_PORT {
            return Err(FrameError::Unsupported(
                "udp source port (not dhcpv6 client)",
            ));
        }
        if dst != ALL_DHCP_RELAY_AGENTS_AND_SERVERS && !self.cfg.is_gateway_addr(dst) {
            return Err(FrameError::Unsupported("dhcpv6 destination"));
        }
        if src.is_unspecified() || src.is_multicast() {
            return Err(FrameError::Unsupported("ipv6 source not unicast"));
        }

        let packet = Packet::new_checked(udp.payload()).map_err(FrameError::malformed("dhcpv6"))?;
        let req = Repr::parse(&packet).map_err(FrameError::malformed("dhcpv6"))?;
        // One guest behind the tap: the same MAC with another DUID is the
        // same machine with another DHCPv6 client (an initramfs, a new
        // network manager, a lost DUID file): it takes the lease over
        // rather than waiting a whole lease time.
        self.current_mac = Some(eth_repr.src_addr);
        if let (Some(lease), Some(client)) = (&self.lease, req.client_id)
            && lease.duid != client
            && lease.mac == Some(eth_repr.src_addr)
        {
            log::info!(
                "dhcpv6: {} now uses DUID {}: the lease of {} moves to it",
                eth_repr.src_addr,
                Hex(client),
                Hex(&lease.duid)
            );
            self.lease = None;
        }
        match req.msg_type {
            MessageType::Advertise
            | MessageType::Reply
            | MessageType::Reconfigure
            | MessageType::RelayRepl => {
                return Err(FrameError::Unsupported(
                    "dhcpv6 message type (server to client)",
                ));
            }
            MessageType::RelayForw => return Err(FrameError::Unsupported("relayed dhcpv6")),
            MessageType::Unknown(_) => return Err(FrameError::Unsupported("dhcpv6 message type")),
            _ => {}
        }

        self.expire(now);
        log::debug!(
            "dhcpv6: {:?} from {src} xid={:#08x} client={} server={} ia_na={} ia_ta={} rapid={}",
            req.msg_type,
            req.transaction_id,
            Hex(req.client_id.unwrap_or_default()),
            Hex(req.server_id.unwrap_or_default()),
            req.ia_na.len(),
            req.ia_ta.len(),
            req.rapid_commit
        );
        if let Err(why) = self.addressed_to_us(&req) {
            log::debug!("dhcpv6: {:?} from {src} dropped: it {why}", req.msg_type);
            return Ok(None);
        }

        let answer = match (req.msg_type, req.client_id) {
            (MessageType::InformationRequest, _) => Some(Self::on_information_request()),
            (MessageType::Solicit, Some(client)) => Some(self.on_solicit(&req, client, now)),
            (MessageType::Request, Some(client)) => Some(self.on_request(&req, client, now)),
            (MessageType::Renew | MessageType::Rebind, Some(client)) => {
                Some(self.on_renew(&req, client, now))
            }
            (MessageType::Confirm, Some(_)) => self.on_confirm(&req),
            (MessageType::Release | MessageType::Decline, Some(client)) => {
                Some(self.on_release(&req, client))
            }
            // Refused by `addressed_to_us` already.
            _ => None,
        };
        match answer {
            Some(answer) => self
                .build_reply(&req, answer, eth_repr.src_addr, src)
                .map(Some),
            None => Ok(None),
        }
    }

    /// The current lease, if the guest holds one: (client DUID, expiry).
    ///
    /// Expired leases are forgotten at the next [`Self::handle`] call, so
    /// compare the expiry with the current time if that matters.
    pub fn lease(&self) -> Option<(Vec<u8>, Instant)> {
        self.lease
            .as_ref()
            .map(|lease| (lease.duid.clone(), lease.expires))
    }

    /// Puts back a lease an earlier daemon granted (restart without loss):
    /// the client with DUID `duid` holds the address until `expires`.
    pub fn restore_lease(&mut self, duid: Vec<u8>, expires: Instant) {
        self.lease = Some(Lease {
            duid,
            expires,
            mac: None,
        });
    }

    /// Forgets the lease if it has run out at `now`.
    fn expire(&mut self, now: Instant) {
        if let Some(lease) = self.lease.as_ref().filter(|lease| now >= lease.expires) {
            log::info!(
                "dhcpv6: lease of {} to {} expired",
                self.cfg.guest_addr,
                Hex(&lease.duid)
            );
            self.lease = None;
        }
    }

    /// Whether an unexpired lease is held by a client other than `client`.
    fn held_by_other(&self, client: &[u8]) -> bool {
        self.lease
            .as_ref()
            .is_some_and(|lease| lease.duid != client)
    }

    /// Whether `client` holds the lease.
    fn holds(&self, client: &[u8]) -> bool {
        self.lease
            .as_ref()
            .is_some_and(|lease| lease.duid == client)
    }

    /// Binds (or extends) the lease of `client` from `now`.
    fn bind(&mut self, client: &[u8], now: Instant) {
        let secs = self.cfg.lease_secs;
        let expires = now
            .checked_add(Duration::from_secs(u64::from(secs)))
            .unwrap_or_else(|| {
                // Unreachable with a monotonic clock and a u32 lease time.
                log::warn!("dhcpv6: lease expiry overflows the clock");
                now
            });
        if self.holds(client) {
            log::debug!(
                "dhcpv6: extended lease of {} to {} for {secs}s",
                self.cfg.guest_addr,
                Hex(client)
            );
        } else {
            log::info!(
                "dhcpv6: leased {} to {} for {secs}s",
                self.cfg.guest_addr,
                Hex(client)
            );
        }
        self.lease = Some(Lease {
            duid: client.to_vec(),
            expires,
            mac: self.current_mac,
        });
    }

    /// RFC 8415 §16: whether the identifiers let us answer `req`, or why
    /// the message must be discarded.
    fn addressed_to_us(&self, req: &Repr<'_>) -> Result<(), &'static str> {
        let ours = req.server_id.map(|id| id == self.duid.as_slice());
        match req.msg_type {
            MessageType::InformationRequest => {
                if ours == Some(false) {
                    Err("names another server")
                } else if !req.ia_na.is_empty() || !req.ia_ta.is_empty() {
                    Err("carries an IA")
                } else {
                    Ok(())
                }
            }
            _ if req.client_id.is_none() => Err("has no client identifier"),
            MessageType::Solicit | MessageType::Confirm | MessageType::Rebind => match ours {
                Some(_) => Err("carries a server identifier"),
                None => Ok(()),
            },
            _ => match ours {
                None => Err("has no server identifier"),
                Some(false) => Err("names another server"),
                Some(true) => Ok(()),
            },
        }
    }

    /// The IA_NA options of an answer to `ias`, and whether the address was
    /// given to one of them. `held` = another client holds the lease.
    fn answer_ia_na(&self, ias: &[IaNa<'_>], held: bool, kind: Kind) -> (Vec<IaNa<'static>>, bool) {
        let ias = ias.get(..MAX_IAS).unwrap_or(ias);
        let guest = self.cfg.guest_addr;
        let off_link = |ia: &IaNa<'_>| {
            kind == Kind::Commit && ia.addresses.iter().any(|a| !self.cfg.in_prefix(a.addr))
        };
        let lists_ours = |ia: &IaNa<'_>| ia.addresses.iter().any(|a| a.addr == guest);
        let picked = if held {
            None
        } else {
            ias.iter()
                .position(|ia| !off_link(ia) && lists_ours(ia))
                .or_else(|| ias.iter().position(|ia| !off_link(ia)))
        };
        let zero = kind == Kind::Extend;
        let answers = ias
            .iter()
            .enumerate()
            .map(|(i, ia)| {
                if picked == Some(i) {
                    self.bound_ia(ia, zero)
                } else if off_link(ia) {
                    refused_ia(ia, false, StatusCode::NotOnLink, MSG_NOT_ON_LINK)
                } else if held {
                    refused_ia(ia, zero, StatusCode::NoAddrsAvail, MSG_HELD)
                } else {
                    refused_ia(ia, zero, StatusCode::NoAddrsAvail, MSG_ONE_ADDRESS)
                }
            })
            .collect();
        (answers, picked.is_some())
    }

    /// `ia` holding the guest address; with `zero`, the other addresses it
    /// listed come back with lifetimes 0.
    fn bound_ia(&self, ia: &IaNa<'_>, zero: bool) -> IaNa<'static> {
        let lease = self.cfg.lease_secs;
        let guest = self.cfg.guest_addr;
        let mut addresses = vec![IaAddr {
            addr: guest,
            preferred: lease,
            valid: lease,
            status: None,
        }];
        if zero {
            let others: Vec<IaAddr<'_>> = ia
                .addresses
                .iter()
                .filter(|a| a.addr != guest)
                .cloned()
                .collect();
            addresses.extend(zeroed(&others));
        }
        IaNa {
            iaid: ia.iaid,
            // RFC 8415 §21.4: 0.5 and 0.8 of the preferred lifetime.
            t1: lease / 2,
            t2: u32::try_from(u64::from(lease).saturating_mul(4) / 5).unwrap_or(u32::MAX),
            addresses,
            status: None,
        }
    }

    /// Solicit: Advertise, or with Rapid Commit a Reply and a lease.
    fn on_solicit(&mut self, req: &Repr<'_>, client: &[u8], now: Instant) -> Answer {
        let held = self.held_by_other(client);
        if held {
            log::warn!(
                "dhcpv6: Solicit from {} refused: {} is leased to another client",
                Hex(client),
                self.cfg.guest_addr
            );
        }
        let ia_ta = refused_ta(
            &req.ia_ta,
            false,
            StatusCode::NoAddrsAvail,
            MSG_NO_TEMPORARY,
        );
        if req.rapid_commit {
            let (ia_na, bound) = self.answer_ia_na(&req.ia_na, held, Kind::Commit);
            if bound {
                self.bind(client, now);
                return Answer {
                    ia_na,
                    ia_ta,
                    rapid_commit: true,
                    config: true,
                    ..Answer::new(MessageType::Reply)
                };
            }
            // Nothing to commit: a plain Advertise tells the client why.
        }
        let (ia_na, _) = self.answer_ia_na(&req.ia_na, held, Kind::Offer);
        let status = (req.ia_na.is_empty() && req.ia_ta.is_empty())
            .then(|| status(StatusCode::NoAddrsAvail, MSG_NO_IA));
        Answer {
            ia_na,
            ia_ta,
            status,
            preference: true,
            config: true,
            ..Answer::new(MessageType::Advertise)
        }
    }

    /// Request: Reply binding the address.
    fn on_request(&mut self, req: &Repr<'_>, client: &[u8], now: Instant) -> Answer {
        let held = self.held_by_other(client);
        let (ia_na, bound) = self.answer_ia_na(&req.ia_na, held, Kind::Commit);
        if bound {
            self.bind(client, now);
        } else if held {
            log::warn!(
                "dhcpv6: Request from {} refused: {} is leased to another client",
                Hex(client),
                self.cfg.guest_addr
            );
        }
        let status = (req.ia_na.is_empty() && req.ia_ta.is_empty())
            .then(|| status(StatusCode::NoAddrsAvail, MSG_NO_IA));
        Answer {
            ia_na,
            ia_ta: refused_ta(
                &req.ia_ta,
                false,
                StatusCode::NoAddrsAvail,
                MSG_NO_TEMPORARY,
            ),
            status,
            config: true,
            ..Answer::new(MessageType::Reply)
        }
    }

    /// Renew or Rebind: Reply extending (or creating) the binding.
    fn on_renew(&mut self, req: &Repr<'_>, client: &[u8], now: Instant) -> Answer {
        let held = self.held_by_other(client);
        let (ia_na, bound) = self.answer_ia_na(&req.ia_na, held, Kind::Extend);
        if bound {
            self.bind(client, now);
        } else if held {
            log::warn!(
                "dhcpv6: {:?} from {} refused: {} is leased to another client",
                req.msg_type,
                Hex(client),
                self.cfg.guest_addr
            );
        }
        Answer {
            ia_na,
            ia_ta: refused_ta(&req.ia_ta, true, StatusCode::NoBinding, MSG_NO_BINDING),
            config: true,
            ..Answer::new(MessageType::Reply)
        }
    }

    /// Confirm: are the client's addresses on this link?
    fn on_confirm(&self, req: &Repr<'_>) -> Option<Answer> {
        let mut addresses = req
            .ia_na
            .iter()
            .flat_map(|ia| ia.addresses.iter())
            .chain(req.ia_ta.iter().flat_map(|ia| ia.addresses.iter()))
            .map(|a| a.addr)
            .peekable();
        if addresses.peek().is_none() {
            log::debug!("dhcpv6: Confirm without addresses, no reply (RFC 8415 §18.3.3)");
            return None;
        }
        let on_link = addresses.all(|addr| self.cfg.in_prefix(addr));
        let status = if on_link {
            status(StatusCode::Success, "all addresses on link")
        } else {
            status(StatusCode::NotOnLink, MSG_NOT_ON_LINK)
        };
        Some(Answer {
            status: Some(status),
            ..Answer::new(MessageType::Reply)
        })
    }

    /// Release or Decline: drop the client's lease.
    fn on_release(&mut self, req: &Repr<'_>, client: &[u8]) -> Answer {
        let mut answer = Answer {
            status: Some(status(StatusCode::Success, "ok")),
            ..Answer::new(MessageType::Reply)
        };
        if self.holds(client) {
            if req.msg_type == MessageType::Decline {
                log::warn!(
                    "dhcpv6: {} declined {}: the address seems to be in use on the link",
                    Hex(client),
                    self.cfg.guest_addr
                );
            } else {
                log::info!("dhcpv6: {} released {}", Hex(client), self.cfg.guest_addr);
            }
            self.lease = None;
        } else {
            log::debug!(
                "dhcpv6: {:?} from {}, which holds no lease",
                req.msg_type,
                Hex(client)
            );
            answer.ia_na = no_binding(&req.ia_na);
            answer.ia_ta = refused_ta(&req.ia_ta, false, StatusCode::NoBinding, MSG_NO_BINDING);
        }
        answer
    }

    /// Information-request: configuration only.
    fn on_information_request() -> Answer {
        Answer {
            config: true,
            refresh: true,
            ..Answer::new(MessageType::Reply)
        }
    }

    /// Builds the complete Ethernet frame of `answer` to `req`, sent to
    /// `client_mac` and `client_ip`.
    fn build_reply(
        &self,
        req: &Repr<'_>,
        answer: Answer,
        client_mac: EthernetAddress,
        client_ip: Ipv6Addr,
    ) -> Result<Vec<u8>, FrameError> {
        let cfg = &self.cfg;
        let mut repr = Repr {
            client_id: req.client_id,
            server_id: Some(self.duid.as_slice()),
            ia_na: answer.ia_na,
            ia_ta: answer.ia_ta,
            rapid_commit: answer.rapid_commit,
            status: answer.status,
            preference: answer.preference.then_some(PREFERENCE_MAX),
            dns_servers: if answer.config {
                vec![cfg.dns]
            } else {
                Vec::new()
            },
            domain_list: (answer.config && !self.domain_list.is_empty())
                .then_some(self.domain_list.as_slice()),
            information_refresh_time: answer
                .refresh
                .then(|| cfg.lease_secs.clamp(IRT_MINIMUM, IRT_DEFAULT)),
            ..Repr::new(answer.msg_type, req.transaction_id)
        };
        let limit = usize::from(cfg.mtu)
            .max(IPV6_MIN_MTU)
            .saturating_sub(IPV6_HEADER_LEN + UDP_HEADER_LEN);
        if repr.buffer_len() > limit && repr.domain_list.is_some() {
            log::debug!("dhcpv6: domain list too long for the reply, left out");
            repr.domain_list = None;
        }
        let dhcp_len = repr.buffer_len();
        if dhcp_len > limit {
            return Err(FrameError::Unsupported("dhcpv6 reply too large"));
        }
        log::debug!(
            "dhcpv6: {:?} to {client_ip}/{client_mac} xid={:#08x} ia_na={:?} status={:?}",
            repr.msg_type,
            repr.transaction_id,
            repr.ia_na,
            repr.status.map(|s| s.code)
        );

        let eth_repr = EthernetRepr {
            src_addr: cfg.gateway_mac,
            dst_addr: client_mac,
            ethertype: EthernetProtocol::Ipv6,
        };
        let udp_repr = UdpRepr {
            src_port: SERVER_PORT,
            dst_port: CLIENT_PORT,
        };
        let ip_repr = Ipv6Repr {
            src_addr: cfg.router_ll,
            dst_addr: client_ip,
            next_header: IpProtocol::Udp,
            payload_len: UDP_HEADER_LEN + dhcp_len,
            hop_limit: REPLY_HOP_LIMIT,
        };
        let headers = ETHERNET_HEADER_LEN + IPV6_HEADER_LEN + UDP_HEADER_LEN;

        let mut buf = vec![0u8; headers + dhcp_len];
        let dhcp_buf = buf
            .get_mut(headers..)
            .ok_or(FrameError::Unsupported("dhcpv6 reply layout"))?;
        repr.emit(&mut Packet::new_unchecked(dhcp_buf))
            .map_err(FrameError::malformed("dhcpv6 reply"))?;

        let caps = ChecksumCapabilities::default();
        let mut eth = EthernetFrame::new_unchecked(&mut buf[..]);
        eth_repr.emit(&mut eth);
        let mut ip = Ipv6Packet::new_unchecked(eth.payload_mut());
        ip_repr.emit(&mut ip);
        udp_repr.emit(
            &mut UdpPacket::new_unchecked(ip.payload_mut()),
            &cfg.router_ll.into(),
            &client_ip.into(),
            dhcp_len,
            |_payload| {},
            &caps,
        );
        Ok(buf)
    }
}

/// Whether `frame` is an IPv6/UDP datagram to port 547, the UDP header
/// directly after the fixed IPv6 header (cheap check for the dispatcher;
/// false for anything malformed). Checksums are not verified here;
/// [`Dhcpv6Server::handle`] does that.
pub fn is_dhcpv6_request(frame: &[u8]) -> bool {
    let Ok(eth) = EthernetFrame::new_checked(frame) else {
        return false;
    };
    if eth.ethertype() != EthernetProtocol::Ipv6 {
        return false;
    }
    let Ok(ip) = Ipv6Packet::new_checked(eth.payload()) else {
        return false;
    };
    if ip.version() != 6 || ip.next_header() != IpProtocol::Udp {
        return false;
    }
    let Ok(udp) = UdpPacket::new_checked(ip.payload()) else {
        return false;
    };
    udp.dst_port() == SERVER_PORT
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::wire::*;
    use super::*;
    use crate::config::link_local_of;

    const MAC_A: EthernetAddress = EthernetAddress([0x52, 0x54, 0x00, 0x12, 0x34, 0x56]);
    const MAC_B: EthernetAddress = EthernetAddress([0x52, 0x54, 0x00, 0xab, 0xcd, 0xef]);
    /// The multicast MAC of ff02::1:2 (RFC 2464 §7).
    const MCAST_MAC: EthernetAddress = EthernetAddress([0x33, 0x33, 0, 1, 0, 2]);
    const XID: u32 = 0x00c0_ffee;
    const IAID: u32 = 0x0012_3456;
    const DAY: u32 = 86_400;

    /// A DUID-LLT as dhclient makes it (type 1, hardware 1, time, MAC).
    fn duid_llt(mac: EthernetAddress) -> Vec<u8> {
        let mut duid = vec![0, 1, 0, 1, 0x2d, 0x8f, 0x11, 0x22];
        duid.extend_from_slice(mac.as_bytes());
        duid
    }

    fn cfg() -> GuestNet6Config {
        GuestNet6Config {
            search: vec!["example.com".into(), "corp.internal".into()],
            ..GuestNet6Config::default()
        }
    }

    fn server() -> Dhcpv6Server {
        Dhcpv6Server::new(cfg())
    }

    /// DUID-LL of the default gateway MAC.
    const SERVER_DUID: &[u8] = &[0, 3, 0, 1, 0x52, 0x55, 10, 0, 2, 2];

    fn server_duid() -> Vec<u8> {
        SERVER_DUID.to_vec()
    }

    fn guest() -> Ipv6Addr {
        cfg().guest_addr
    }

    fn addr(s: &str) -> Ipv6Addr {
        s.parse().unwrap()
    }

    fn secs(n: u32) -> Duration {
        Duration::from_secs(u64::from(n))
    }

    fn ia(iaid: u32, addrs: &[Ipv6Addr]) -> IaNa<'static> {
        IaNa {
            iaid,
            t1: 0,
            t2: 0,
            addresses: addrs
                .iter()
                .map(|&addr| IaAddr {
                    addr,
                    preferred: 0,
                    valid: 0,
                    status: None,
                })
                .collect(),
            status: None,
        }
    }

    /// A client message: client id, elapsed time, ORO (DNS, domain list).
    fn msg(msg_type: MessageType, duid: &[u8]) -> Repr<'_> {
        Repr {
            client_id: Some(duid),
            elapsed_time: Some(0),
            oro: vec![OPT_DNS_SERVERS, OPT_DOMAIN_LIST],
            ..Repr::new(msg_type, XID)
        }
    }

    fn solicit(duid: &[u8]) -> Repr<'_> {
        Repr {
            ia_na: vec![ia(IAID, &[])],
            ..msg(MessageType::Solicit, duid)
        }
    }

    /// A message naming server `sid`, the guest address in its IA_NA.
    fn to_server<'a>(msg_type: MessageType, duid: &'a [u8], sid: &'a [u8]) -> Repr<'a> {
        Repr {
            server_id: Some(sid),
            ia_na: vec![ia(IAID, &[guest()])],
            ..msg(msg_type, duid)
        }
    }

    /// A Rebind (no server id) for the guest address.
    fn rebind(duid: &[u8]) -> Repr<'_> {
        Repr {
            ia_na: vec![ia(IAID, &[guest()])],
            ..msg(MessageType::Rebind, duid)
        }
    }

    fn payload(repr: &Repr<'_>) -> Vec<u8> {
        let mut buf = vec![0u8; repr.buffer_len()];
        repr.emit(&mut Packet::new_unchecked(&mut buf[..])).unwrap();
        buf
    }

    fn udp_frame(
        mac: EthernetAddress,
        src: Ipv6Addr,
        dst: Ipv6Addr,
        src_port: u16,
        dst_port: u16,
        payload: &[u8],
    ) -> Vec<u8> {
        let caps = ChecksumCapabilities::default();
        let udp = UdpRepr { src_port, dst_port };
        let ip = Ipv6Repr {
            src_addr: src,
            dst_addr: dst,
            next_header: IpProtocol::Udp,
            payload_len: 8 + payload.len(),
            hop_limit: 1,
        };
        let eth = EthernetRepr {
            src_addr: mac,
            dst_addr: if dst.is_multicast() {
                MCAST_MAC
            } else {
                cfg().gateway_mac
            },
            ethertype: EthernetProtocol::Ipv6,
        };
        let mut buf = vec![0u8; 14 + 40 + 8 + payload.len()];
        let mut f = EthernetFrame::new_unchecked(&mut buf[..]);
        eth.emit(&mut f);
        let mut p = Ipv6Packet::new_unchecked(f.payload_mut());
        ip.emit(&mut p);
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

    /// `payload` from `mac`'s link-local address to ff02::1:2.
    fn raw_frame(mac: EthernetAddress, payload: &[u8]) -> Vec<u8> {
        udp_frame(
            mac,
            link_local_of(mac),
            ALL_DHCP_RELAY_AGENTS_AND_SERVERS,
            CLIENT_PORT,
            SERVER_PORT,
            payload,
        )
    }

    fn frame_to(mac: EthernetAddress, dst: Ipv6Addr, repr: &Repr<'_>) -> Vec<u8> {
        udp_frame(
            mac,
            link_local_of(mac),
            dst,
            CLIENT_PORT,
            SERVER_PORT,
            &payload(repr),
        )
    }

    /// `repr` as a client sends it: link-local source to ff02::1:2.
    fn frame(mac: EthernetAddress, repr: &Repr<'_>) -> Vec<u8> {
        frame_to(mac, ALL_DHCP_RELAY_AGENTS_AND_SERVERS, repr)
    }

    /// Recomputes the UDP checksum of a well-formed frame.
    fn fix_udp_checksum(frame: &mut [u8]) {
        let mut eth = EthernetFrame::new_unchecked(&mut frame[..]);
        let mut ip = Ipv6Packet::new_unchecked(eth.payload_mut());
        let (src, dst) = (ip.src_addr(), ip.dst_addr());
        UdpPacket::new_unchecked(ip.payload_mut()).fill_checksum(&src.into(), &dst.into());
    }

    /// A reply, re-parsed with checksum verification.
    struct Parsed {
        eth: EthernetRepr,
        ip: Ipv6Repr,
        udp: UdpRepr,
        payload: Vec<u8>,
    }

    impl Parsed {
        fn new(frame: &[u8]) -> Self {
            let caps = ChecksumCapabilities::default();
            let eth = EthernetFrame::new_checked(frame).unwrap();
            let eth_repr = EthernetRepr::parse(&eth).unwrap();
            let ip = Ipv6Packet::new_checked(eth.payload()).unwrap();
            assert_eq!(usize::from(ip.payload_len()), frame.len() - 14 - 40);
            let ip_repr = Ipv6Repr::parse(&ip).unwrap();
            let udp = UdpPacket::new_checked(ip.payload()).unwrap();
            assert_ne!(udp.checksum(), 0, "udp checksum present");
            assert!(udp.verify_checksum(&ip_repr.src_addr.into(), &ip_repr.dst_addr.into()));
            assert_eq!(usize::from(udp.len()), ip.payload().len());
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
                payload: udp.payload().to_vec(),
            }
        }

        fn repr(&self) -> Repr<'_> {
            let packet = Packet::new_checked(&self.payload[..]).unwrap();
            let repr = Repr::parse(&packet).unwrap();
            assert_eq!(repr.buffer_len(), self.payload.len());
            repr
        }
    }

    fn handle(server: &mut Dhcpv6Server, frame: &[u8], now: Instant) -> Option<Parsed> {
        server.handle(frame, now).unwrap().map(|f| Parsed::new(&f))
    }

    /// Checks what every reply has in common.
    fn assert_common(
        reply: &Parsed,
        repr: &Repr<'_>,
        mac: EthernetAddress,
        duid: &[u8],
        msg_type: MessageType,
    ) {
        let c = cfg();
        assert_eq!(reply.eth.src_addr, c.gateway_mac);
        assert_eq!(reply.eth.dst_addr, mac);
        assert_eq!(reply.eth.ethertype, EthernetProtocol::Ipv6);
        assert_eq!(reply.ip.src_addr, c.router_ll);
        assert_eq!(reply.ip.dst_addr, link_local_of(mac));
        assert_eq!(reply.ip.next_header, IpProtocol::Udp);
        assert_eq!(reply.ip.hop_limit, 64);
        assert_eq!(reply.udp.src_port, 547);
        assert_eq!(reply.udp.dst_port, 546);
        assert_eq!(repr.msg_type, msg_type);
        assert_eq!(repr.transaction_id, XID);
        assert_eq!(repr.client_id, Some(duid));
        assert_eq!(repr.server_id, Some(&server_duid()[..]));
        // Server messages carry no client-only options.
        assert!(repr.oro.is_empty());
        assert_eq!(repr.elapsed_time, None);
    }

    /// Checks the DNS server and domain list.
    fn assert_config(repr: &Repr<'_>) {
        assert_eq!(repr.dns_servers, vec![cfg().dns]);
        let names = decode_domain_list(repr.domain_list.unwrap()).unwrap();
        assert_eq!(names, cfg().search);
    }

    fn assert_no_config(repr: &Repr<'_>) {
        assert!(repr.dns_servers.is_empty());
        assert_eq!(repr.domain_list, None);
        assert_eq!(repr.information_refresh_time, None);
    }

    /// Checks an IA_NA holding the guest address with full lifetimes.
    fn assert_bound(ia: &IaNa<'_>, iaid: u32) {
        assert_eq!(ia.iaid, iaid);
        assert_eq!(ia.t1, DAY / 2, "T1 = lease/2");
        assert_eq!(ia.t2, DAY * 4 / 5, "T2 = lease*4/5");
        assert_eq!(ia.status, None);
        let first = &ia.addresses[0];
        assert_eq!(first.addr, guest());
        assert_eq!((first.preferred, first.valid), (DAY, DAY));
        assert_eq!(first.status, None);
    }

    /// Checks an IA refused with `code`.
    fn assert_refused(ia: &IaNa<'_>, iaid: u32, code: StatusCode) {
        assert_eq!(ia.iaid, iaid);
        assert_eq!((ia.t1, ia.t2), (0, 0));
        assert_eq!(ia.status.map(|s| s.code), Some(code));
        assert!(
            ia.addresses
                .iter()
                .all(|a| a.preferred == 0 && a.valid == 0)
        );
    }

    /// Solicit/Advertise/Request/Reply for `duid` at `now`.
    fn bind(s: &mut Dhcpv6Server, mac: EthernetAddress, duid: &[u8], now: Instant) {
        let adv = handle(s, &frame(mac, &solicit(duid)), now).unwrap();
        let sid = adv.repr().server_id.unwrap().to_vec();
        let reply = handle(
            s,
            &frame(mac, &to_server(MessageType::Request, duid, &sid)),
            now,
        )
        .unwrap();
        let repr = reply.repr();
        assert_eq!(repr.msg_type, MessageType::Reply);
        assert_bound(&repr.ia_na[0], IAID);
        assert_eq!(s.lease(), Some((duid.to_vec(), now + secs(DAY))));
    }

    #[test]
    fn server_duid_is_duid_ll() {
        assert_eq!(server().duid(), &server_duid()[..]);
        let other = Dhcpv6Server::new(GuestNet6Config {
            gateway_mac: MAC_B,
            ..cfg()
        });
        assert_eq!(
            other.duid(),
            &[0, 3, 0, 1, 0x52, 0x54, 0x00, 0xab, 0xcd, 0xef]
        );
    }

    #[test]
    fn solicit_gets_advertise() {
        let mut s = server();
        let a = duid_llt(MAC_A);
        let adv = handle(&mut s, &frame(MAC_A, &solicit(&a)), Instant::now()).unwrap();
        let repr = adv.repr();
        assert_common(&adv, &repr, MAC_A, &a, MessageType::Advertise);
        assert_eq!(repr.preference, Some(255));
        assert_eq!(repr.ia_na.len(), 1);
        assert_bound(&repr.ia_na[0], IAID);
        assert_eq!(repr.ia_na[0].addresses.len(), 1);
        assert_config(&repr);
        assert!(!repr.rapid_commit);
        assert_eq!(repr.status, None);
        assert_eq!(repr.information_refresh_time, None);
        assert!(repr.ia_ta.is_empty());
        // An Advertise reserves nothing.
        assert_eq!(s.lease(), None);
    }

    #[test]
    fn solicit_hinting_another_address_still_gets_ours() {
        let mut s = server();
        let a = duid_llt(MAC_A);
        let sol = Repr {
            ia_na: vec![ia(IAID, &[addr("2001:db8::7")])],
            ..msg(MessageType::Solicit, &a)
        };
        let adv = handle(&mut s, &frame(MAC_A, &sol), Instant::now()).unwrap();
        let repr = adv.repr();
        assert_bound(&repr.ia_na[0], IAID);
        assert_eq!(repr.ia_na[0].addresses.len(), 1);
    }

    #[test]
    fn rapid_commit_solicit_gets_reply_and_lease() {
        let mut s = server();
        let a = duid_llt(MAC_A);
        let now = Instant::now();
        let sol = Repr {
            rapid_commit: true,
            ..solicit(&a)
        };
        let reply = handle(&mut s, &frame(MAC_A, &sol), now).unwrap();
        let repr = reply.repr();
        assert_common(&reply, &repr, MAC_A, &a, MessageType::Reply);
        assert!(repr.rapid_commit);
        assert_eq!(repr.preference, None);
        assert_bound(&repr.ia_na[0], IAID);
        assert_config(&repr);
        assert_eq!(s.lease(), Some((a.clone(), now + secs(DAY))));
    }

    #[test]
    fn rapid_commit_refused_falls_back_to_advertise() {
        let mut s = server();
        let (a, b) = (duid_llt(MAC_A), duid_llt(MAC_B));
        let now = Instant::now();
        bind(&mut s, MAC_A, &a, now);
        let sol = Repr {
            rapid_commit: true,
            ..solicit(&b)
        };
        let adv = handle(&mut s, &frame(MAC_B, &sol), now).unwrap();
        let repr = adv.repr();
        assert_common(&adv, &repr, MAC_B, &b, MessageType::Advertise);
        assert!(!repr.rapid_commit);
        assert_refused(&repr.ia_na[0], IAID, StatusCode::NoAddrsAvail);
        assert_eq!(s.lease().unwrap().0, a);
    }

    #[test]
    fn request_gets_reply_and_lease() {
        let mut s = server();
        let a = duid_llt(MAC_A);
        let now = Instant::now();
        let req = to_server(MessageType::Request, &a, SERVER_DUID);
        let reply = handle(&mut s, &frame(MAC_A, &req), now).unwrap();
        let repr = reply.repr();
        assert_common(&reply, &repr, MAC_A, &a, MessageType::Reply);
        assert_bound(&repr.ia_na[0], IAID);
        assert_eq!(repr.ia_na[0].addresses.len(), 1);
        assert_config(&repr);
        assert_eq!(repr.status, None);
        assert_eq!(repr.preference, None);
        assert!(!repr.rapid_commit);
        assert_eq!(s.lease(), Some((a.clone(), now + secs(DAY))));
        // The full Solicit/Advertise/Request/Reply exchange too.
        let mut s = server();
        bind(&mut s, MAC_A, &a, now);
    }

    #[test]
    fn request_off_link_gets_not_on_link() {
        let mut s = server();
        let a = duid_llt(MAC_A);
        let req = Repr {
            ia_na: vec![ia(IAID, &[addr("2001:db8::15")])],
            ..to_server(MessageType::Request, &a, SERVER_DUID)
        };
        let reply = handle(&mut s, &frame(MAC_A, &req), Instant::now()).unwrap();
        let repr = reply.repr();
        assert_refused(&repr.ia_na[0], IAID, StatusCode::NotOnLink);
        assert!(repr.ia_na[0].addresses.is_empty());
        assert_eq!(s.lease(), None);
    }

    #[test]
    fn request_for_other_in_prefix_address_gets_ours() {
        let mut s = server();
        let a = duid_llt(MAC_A);
        let req = Repr {
            ia_na: vec![ia(IAID, &[addr("fd00::99")])],
            ..to_server(MessageType::Request, &a, SERVER_DUID)
        };
        let reply = handle(&mut s, &frame(MAC_A, &req), Instant::now()).unwrap();
        let repr = reply.repr();
        assert_bound(&repr.ia_na[0], IAID);
        assert_eq!(repr.ia_na[0].addresses.len(), 1);
        assert!(s.lease().is_some());
    }

    #[test]
    fn request_without_ia_gets_no_addrs_avail() {
        let mut s = server();
        let a = duid_llt(MAC_A);
        let sid = server_duid();
        let req = Repr {
            server_id: Some(&sid),
            ..msg(MessageType::Request, &a)
        };
        let reply = handle(&mut s, &frame(MAC_A, &req), Instant::now()).unwrap();
        let repr = reply.repr();
        assert_eq!(repr.status.map(|s| s.code), Some(StatusCode::NoAddrsAvail));
        assert!(repr.ia_na.is_empty());
        assert_eq!(s.lease(), None);
    }

    #[test]
    fn renew_extends_the_lease() {
        let mut s = server();
        let a = duid_llt(MAC_A);
        let now = Instant::now();
        bind(&mut s, MAC_A, &a, now);
        let later = now + secs(DAY / 2);
        let renew = to_server(MessageType::Renew, &a, SERVER_DUID);
        let reply = handle(&mut s, &frame(MAC_A, &renew), later).unwrap();
        let repr = reply.repr();
        assert_common(&reply, &repr, MAC_A, &a, MessageType::Reply);
        assert_bound(&repr.ia_na[0], IAID);
        assert_eq!(repr.ia_na[0].addresses.len(), 1);
        assert_config(&repr);
        assert_eq!(s.lease(), Some((a.clone(), later + secs(DAY))));
    }

    #[test]
    fn renew_zeroes_addresses_not_ours() {
        let mut s = server();
        let a = duid_llt(MAC_A);
        let now = Instant::now();
        bind(&mut s, MAC_A, &a, now);
        let renew = Repr {
            ia_na: vec![ia(IAID, &[guest(), addr("fd00::99"), addr("2001:db8::1")])],
            ..to_server(MessageType::Renew, &a, SERVER_DUID)
        };
        let reply = handle(&mut s, &frame(MAC_A, &renew), now).unwrap();
        let repr = reply.repr();
        let ia = &repr.ia_na[0];
        assert_bound(ia, IAID);
        let rest: Vec<(Ipv6Addr, u32, u32)> = ia.addresses[1..]
            .iter()
            .map(|a| (a.addr, a.preferred, a.valid))
            .collect();
        assert_eq!(
            rest,
            vec![(addr("fd00::99"), 0, 0), (addr("2001:db8::1"), 0, 0)]
        );
    }

    #[test]
    fn renew_without_binding_binds() {
        let mut s = server();
        let a = duid_llt(MAC_A);
        let now = Instant::now();
        let renew = to_server(MessageType::Renew, &a, SERVER_DUID);
        let reply = handle(&mut s, &frame(MAC_A, &renew), now).unwrap();
        assert_bound(&reply.repr().ia_na[0], IAID);
        assert_eq!(s.lease(), Some((a.clone(), now + secs(DAY))));
    }

    #[test]
    fn rebind_extends_and_binds_unknown() {
        let mut s = server();
        let a = duid_llt(MAC_A);
        let now = Instant::now();
        // Unknown binding, the address is ours: just bind it.
        let reply = handle(&mut s, &frame(MAC_A, &rebind(&a)), now).unwrap();
        let repr = reply.repr();
        assert_common(&reply, &repr, MAC_A, &a, MessageType::Reply);
        assert_bound(&repr.ia_na[0], IAID);
        assert_config(&repr);
        assert_eq!(s.lease(), Some((a.clone(), now + secs(DAY))));
        // Known binding: extended.
        let later = now + secs(70_000);
        let reply = handle(&mut s, &frame(MAC_A, &rebind(&a)), later).unwrap();
        assert_bound(&reply.repr().ia_na[0], IAID);
        assert_eq!(s.lease(), Some((a.clone(), later + secs(DAY))));
    }

    #[test]
    fn rebind_off_link_address_gets_lifetime_zero() {
        let mut s = server();
        let a = duid_llt(MAC_A);
        let r = Repr {
            ia_na: vec![ia(IAID, &[addr("2001:db8::1")])],
            ..rebind(&a)
        };
        let reply = handle(&mut s, &frame(MAC_A, &r), Instant::now()).unwrap();
        let repr = reply.repr();
        let ia = &repr.ia_na[0];
        assert_bound(ia, IAID);
        assert_eq!(ia.addresses.len(), 2);
        assert_eq!(ia.addresses[1].addr, addr("2001:db8::1"));
        assert_eq!((ia.addresses[1].preferred, ia.addresses[1].valid), (0, 0));
    }

    #[test]
    fn confirm_on_link_and_not_on_link() {
        let mut s = server();
        let a = duid_llt(MAC_A);
        let confirm = |addrs: &[Ipv6Addr]| Repr {
            ia_na: vec![ia(IAID, addrs)],
            ..msg(MessageType::Confirm, &a)
        };
        let now = Instant::now();
        for (addrs, code) in [
            (vec![guest()], StatusCode::Success),
            (vec![addr("fd00::1234")], StatusCode::Success),
            (vec![addr("2001:db8::15")], StatusCode::NotOnLink),
            (vec![guest(), addr("fd00:0:0:1::15")], StatusCode::NotOnLink),
        ] {
            let reply = handle(&mut s, &frame(MAC_A, &confirm(&addrs)), now).unwrap();
            let repr = reply.repr();
            assert_common(&reply, &repr, MAC_A, &a, MessageType::Reply);
            assert_eq!(repr.status.map(|s| s.code), Some(code), "{addrs:?}");
            assert!(repr.ia_na.is_empty());
            assert_no_config(&repr);
        }
        // No addresses at all: no reply (RFC 8415 §18.3.3).
        assert!(
            s.handle(&frame(MAC_A, &confirm(&[])), now)
                .unwrap()
                .is_none()
        );
        // A server identifier in a Confirm: discard.
        let sid = server_duid();
        let with_sid = Repr {
            server_id: Some(&sid),
            ..confirm(&[guest()])
        };
        assert!(s.handle(&frame(MAC_A, &with_sid), now).unwrap().is_none());
        // Confirm binds nothing.
        assert_eq!(s.lease(), None);
    }

    #[test]
    fn release_drops_the_lease() {
        let mut s = server();
        let a = duid_llt(MAC_A);
        let now = Instant::now();
        bind(&mut s, MAC_A, &a, now);
        let release = to_server(MessageType::Release, &a, SERVER_DUID);
        let reply = handle(&mut s, &frame(MAC_A, &release), now).unwrap();
        let repr = reply.repr();
        assert_common(&reply, &repr, MAC_A, &a, MessageType::Reply);
        assert_eq!(repr.status.map(|s| s.code), Some(StatusCode::Success));
        assert!(repr.ia_na.is_empty());
        assert_no_config(&repr);
        assert_eq!(s.lease(), None);
        // Released again: nothing bound, the IA says NoBinding.
        let reply = handle(&mut s, &frame(MAC_A, &release), now).unwrap();
        let repr = reply.repr();
        assert_eq!(repr.status.map(|s| s.code), Some(StatusCode::Success));
        assert_refused(&repr.ia_na[0], IAID, StatusCode::NoBinding);
    }

    #[test]
    fn decline_drops_the_lease() {
        let mut s = server();
        let (a, b) = (duid_llt(MAC_A), duid_llt(MAC_B));
        let now = Instant::now();
        bind(&mut s, MAC_A, &a, now);
        // Another client's Decline leaves A's lease alone.
        let decline_b = to_server(MessageType::Decline, &b, SERVER_DUID);
        let reply = handle(&mut s, &frame(MAC_B, &decline_b), now).unwrap();
        assert_refused(&reply.repr().ia_na[0], IAID, StatusCode::NoBinding);
        assert_eq!(s.lease().unwrap().0, a);
        let decline = to_server(MessageType::Decline, &a, SERVER_DUID);
        let reply = handle(&mut s, &frame(MAC_A, &decline), now).unwrap();
        let repr = reply.repr();
        assert_common(&reply, &repr, MAC_A, &a, MessageType::Reply);
        assert_eq!(repr.status.map(|s| s.code), Some(StatusCode::Success));
        assert!(repr.ia_na.is_empty());
        assert_eq!(s.lease(), None);
    }

    #[test]
    fn information_request_gets_configuration() {
        let mut s = server();
        let a = duid_llt(MAC_A);
        let now = Instant::now();
        let info = msg(MessageType::InformationRequest, &a);
        let reply = handle(&mut s, &frame(MAC_A, &info), now).unwrap();
        let repr = reply.repr();
        assert_common(&reply, &repr, MAC_A, &a, MessageType::Reply);
        assert_config(&repr);
        assert_eq!(repr.information_refresh_time, Some(86_400));
        assert!(repr.ia_na.is_empty() && repr.ia_ta.is_empty());
        assert_eq!(repr.status, None);
        assert_eq!(s.lease(), None);

        // The client identifier is optional here (RFC 8415 §18.2.6).
        let anonymous = Repr {
            client_id: None,
            ..msg(MessageType::InformationRequest, &a)
        };
        let reply = handle(&mut s, &frame(MAC_A, &anonymous), now).unwrap();
        let repr = reply.repr();
        assert_eq!(repr.client_id, None);
        assert_eq!(repr.server_id, Some(&server_duid()[..]));
        assert_config(&repr);

        // Our server id is fine, another's is not; an IA is not allowed.
        let sid = server_duid();
        let other = vec![0, 3, 0, 1, 1, 2, 3, 4, 5, 6];
        let ours = Repr {
            server_id: Some(&sid),
            ..msg(MessageType::InformationRequest, &a)
        };
        assert!(s.handle(&frame(MAC_A, &ours), now).unwrap().is_some());
        let theirs = Repr {
            server_id: Some(&other),
            ..msg(MessageType::InformationRequest, &a)
        };
        assert!(s.handle(&frame(MAC_A, &theirs), now).unwrap().is_none());
        let with_ia = Repr {
            ia_na: vec![ia(IAID, &[])],
            ..msg(MessageType::InformationRequest, &a)
        };
        assert!(s.handle(&frame(MAC_A, &with_ia), now).unwrap().is_none());
    }

    #[test]
    fn information_refresh_time_is_clamped() {
        let a = duid_llt(MAC_A);
        for (lease, irt) in [(300, 600), (3600, 3600), (7 * 86_400, 86_400)] {
            let mut s = Dhcpv6Server::new(GuestNet6Config {
                lease_secs: lease,
                ..cfg()
            });
            let info = msg(MessageType::InformationRequest, &a);
            let reply = handle(&mut s, &frame(MAC_A, &info), Instant::now()).unwrap();
            assert_eq!(reply.repr().information_refresh_time, Some(irt));
        }
    }

    #[test]
    fn second_client_refused_while_held_then_served_after_expiry() {
        let mut s = server();
        let (a, b) = (duid_llt(MAC_A), duid_llt(MAC_B));
        let now = Instant::now();
        bind(&mut s, MAC_A, &a, now);

        let adv = handle(&mut s, &frame(MAC_B, &solicit(&b)), now).unwrap();
        let repr = adv.repr();
        assert_common(&adv, &repr, MAC_B, &b, MessageType::Advertise);
        assert_refused(&repr.ia_na[0], IAID, StatusCode::NoAddrsAvail);
        assert!(repr.ia_na[0].addresses.is_empty());

        let req = to_server(MessageType::Request, &b, SERVER_DUID);
        let reply = handle(&mut s, &frame(MAC_B, &req), now).unwrap();
        let repr = reply.repr();
        assert_refused(&repr.ia_na[0], IAID, StatusCode::NoAddrsAvail);
        assert!(repr.ia_na[0].addresses.is_empty());

        // A Renew from B: its (claimed) address comes back with lifetime 0.
        let renew = to_server(MessageType::Renew, &b, SERVER_DUID);
        let reply = handle(&mut s, &frame(MAC_B, &renew), now).unwrap();
        let repr = reply.repr();
        assert_refused(&repr.ia_na[0], IAID, StatusCode::NoAddrsAvail);
        assert_eq!(repr.ia_na[0].addresses.len(), 1);
        assert_eq!(s.lease(), Some((a.clone(), now + secs(DAY))));

        // A's lease runs out: B is served, and the old lease is forgotten.
        let later = now + secs(DAY);
        let adv = handle(&mut s, &frame(MAC_B, &solicit(&b)), later).unwrap();
        assert_bound(&adv.repr().ia_na[0], IAID);
        assert_eq!(s.lease(), None);
        bind(&mut s, MAC_B, &b, later);
        // Now A is the one refused.
        let adv = handle(&mut s, &frame(MAC_A, &solicit(&a)), later).unwrap();
        assert_refused(&adv.repr().ia_na[0], IAID, StatusCode::NoAddrsAvail);
    }

    #[test]
    fn the_same_mac_with_a_new_duid_takes_the_lease_over() {
        let mut s = server();
        let (a, b) = (duid_llt(MAC_A), duid_llt(MAC_B));
        let now = Instant::now();
        bind(&mut s, MAC_A, &a, now);
        // The same guest (MAC A) comes back with another DUID: served.
        bind(&mut s, MAC_A, &b, now + secs(60));
        assert_eq!(s.lease(), Some((b.clone(), now + secs(60) + secs(DAY))));
        // Another MAC with yet another DUID is still refused.
        let c = vec![0, 3, 0, 1, 2, 9, 9, 9, 9, 9];
        let adv = handle(&mut s, &frame(MAC_B, &solicit(&c)), now + secs(61)).unwrap();
        assert_refused(&adv.repr().ia_na[0], IAID, StatusCode::NoAddrsAvail);
    }

    #[test]
    fn restored_lease_is_honoured() {
        let mut s = server();
        let (a, b) = (duid_llt(MAC_A), duid_llt(MAC_B));
        let now = Instant::now();
        s.restore_lease(b.clone(), now + secs(1000));
        assert_eq!(s.lease(), Some((b.clone(), now + secs(1000))));
        let adv = handle(&mut s, &frame(MAC_A, &solicit(&a)), now).unwrap();
        assert_refused(&adv.repr().ia_na[0], IAID, StatusCode::NoAddrsAvail);
        let renew = to_server(MessageType::Renew, &b, SERVER_DUID);
        let reply = handle(&mut s, &frame(MAC_B, &renew), now).unwrap();
        assert_bound(&reply.repr().ia_na[0], IAID);
        assert_eq!(s.lease(), Some((b.clone(), now + secs(DAY))));
    }

    #[test]
    fn messages_for_other_servers_are_ignored() {
        let mut s = server();
        let a = duid_llt(MAC_A);
        let now = Instant::now();
        let other = vec![0, 3, 0, 1, 1, 2, 3, 4, 5, 6];
        for msg_type in [
            MessageType::Request,
            MessageType::Renew,
            MessageType::Release,
            MessageType::Decline,
        ] {
            let m = to_server(msg_type, &a, &other);
            assert!(
                s.handle(&frame(MAC_A, &m), now).unwrap().is_none(),
                "{msg_type:?}"
            );
            // No server identifier at all: also discarded.
            let m = Repr {
                server_id: None,
                ..to_server(msg_type, &a, &other)
            };
            assert!(
                s.handle(&frame(MAC_A, &m), now).unwrap().is_none(),
                "{msg_type:?}"
            );
        }
        assert_eq!(s.lease(), None);
        // Solicit and Rebind must not carry a server identifier, even ours.
        let sid = server_duid();
        for m in [
            Repr {
                server_id: Some(&sid),
                ..solicit(&a)
            },
            Repr {
                server_id: Some(&other),
                ..solicit(&a)
            },
            Repr {
                server_id: Some(&sid),
                ..rebind(&a)
            },
        ] {
            assert!(s.handle(&frame(MAC_A, &m), now).unwrap().is_none());
        }
        assert_eq!(s.lease(), None);
    }

    #[test]
    fn messages_without_client_id_are_ignored() {
        let mut s = server();
        let a = duid_llt(MAC_A);
        let sid = server_duid();
        let now = Instant::now();
        for m in [
            solicit(&a),
            to_server(MessageType::Request, &a, &sid),
            to_server(MessageType::Renew, &a, &sid),
            rebind(&a),
            to_server(MessageType::Release, &a, &sid),
            to_server(MessageType::Decline, &a, &sid),
            Repr {
                ia_na: vec![ia(IAID, &[guest()])],
                ..msg(MessageType::Confirm, &a)
            },
        ] {
            let m = Repr {
                client_id: None,
                ..m
            };
            assert!(s.handle(&frame(MAC_A, &m), now).unwrap().is_none(), "{m:?}");
        }
        assert_eq!(s.lease(), None);
    }

    #[test]
    fn ia_ta_gets_no_addrs_avail() {
        let mut s = server();
        let a = duid_llt(MAC_A);
        let ta = IaTa {
            iaid: 77,
            addresses: Vec::new(),
            status: None,
        };
        let only_ta = Repr {
            ia_ta: vec![ta.clone()],
            ..msg(MessageType::Solicit, &a)
        };
        let adv = handle(&mut s, &frame(MAC_A, &only_ta), Instant::now()).unwrap();
        let repr = adv.repr();
        assert_common(&adv, &repr, MAC_A, &a, MessageType::Advertise);
        assert!(repr.ia_na.is_empty());
        assert_eq!(repr.ia_ta.len(), 1);
        assert_eq!(repr.ia_ta[0].iaid, 77);
        assert!(repr.ia_ta[0].addresses.is_empty());
        assert_eq!(
            repr.ia_ta[0].status.map(|s| s.code),
            Some(StatusCode::NoAddrsAvail)
        );
        assert_eq!(repr.status, None);
        // Together with an IA_NA: the IA_NA still gets the address.
        let both = Repr {
            ia_ta: vec![ta],
            ..solicit(&a)
        };
        let adv = handle(&mut s, &frame(MAC_A, &both), Instant::now()).unwrap();
        let repr = adv.repr();
        assert_bound(&repr.ia_na[0], IAID);
        assert_eq!(
            repr.ia_ta[0].status.map(|s| s.code),
            Some(StatusCode::NoAddrsAvail)
        );
    }

    #[test]
    fn solicit_without_ia_is_answered() {
        let mut s = server();
        let a = duid_llt(MAC_A);
        let sol = msg(MessageType::Solicit, &a);
        let adv = handle(&mut s, &frame(MAC_A, &sol), Instant::now()).unwrap();
        let repr = adv.repr();
        assert_common(&adv, &repr, MAC_A, &a, MessageType::Advertise);
        assert_eq!(repr.status.map(|s| s.code), Some(StatusCode::NoAddrsAvail));
        assert!(repr.ia_na.is_empty() && repr.ia_ta.is_empty());
        assert_config(&repr);
    }

    #[test]
    fn one_ia_na_gets_the_address() {
        let mut s = server();
        let a = duid_llt(MAC_A);
        // The IA already listing the address keeps it.
        let sol = Repr {
            ia_na: vec![ia(1, &[]), ia(2, &[guest()])],
            ..msg(MessageType::Solicit, &a)
        };
        let adv = handle(&mut s, &frame(MAC_A, &sol), Instant::now()).unwrap();
        let repr = adv.repr();
        assert_refused(&repr.ia_na[0], 1, StatusCode::NoAddrsAvail);
        assert_bound(&repr.ia_na[1], 2);
        // Otherwise the first one gets it.
        let sol = Repr {
            ia_na: vec![ia(1, &[]), ia(2, &[])],
            ..msg(MessageType::Solicit, &a)
        };
        let adv = handle(&mut s, &frame(MAC_A, &sol), Instant::now()).unwrap();
        let repr = adv.repr();
        assert_bound(&repr.ia_na[0], 1);
        assert_refused(&repr.ia_na[1], 2, StatusCode::NoAddrsAvail);
        // Many IAs: at most four answered.
        let sol = Repr {
            ia_na: (0..10).map(|i| ia(i, &[])).collect(),
            ..msg(MessageType::Solicit, &a)
        };
        let adv = handle(&mut s, &frame(MAC_A, &sol), Instant::now()).unwrap();
        assert_eq!(adv.repr().ia_na.len(), 4);
    }

    #[test]
    fn reply_addressing() {
        let mut s = server();
        let a = duid_llt(MAC_A);
        let adv = handle(&mut s, &frame(MAC_A, &solicit(&a)), Instant::now()).unwrap();
        assert_eq!(adv.eth.src_addr, cfg().gateway_mac);
        assert_eq!(adv.eth.dst_addr, MAC_A);
        assert_eq!(adv.ip.src_addr, addr("fe80::5055:aff:fe00:202"));
        assert_eq!(adv.ip.dst_addr, addr("fe80::5054:ff:fe12:3456"));
        assert_eq!(adv.ip.hop_limit, 64);
        assert_eq!((adv.udp.src_port, adv.udp.dst_port), (547, 546));
        // Unicast to the gateway's own addresses is served too.
        for dst in [cfg().router_ll, cfg().gateway] {
            let reply = s
                .handle(&frame_to(MAC_A, dst, &solicit(&a)), Instant::now())
                .unwrap()
                .map(|f| Parsed::new(&f))
                .unwrap();
            assert_eq!(reply.ip.dst_addr, link_local_of(MAC_A));
        }
        // Not to anyone else.
        for dst in [guest(), addr("ff02::1"), addr("ff05::1:3")] {
            assert_eq!(
                s.handle(&frame_to(MAC_A, dst, &solicit(&a)), Instant::now()),
                Err(FrameError::Unsupported("dhcpv6 destination")),
                "{dst}"
            );
        }
    }

    #[test]
    fn dhclient_style_solicit() {
        // Bytes as `dhclient -6` puts them on the wire: DUID-LLT, ORO for
        // DNS servers and domain list, elapsed time 0, IA_NA with the last
        // four MAC bytes as IAID and T1 = T2 = 0.
        let mut p = vec![1, 0xc0, 0xff, 0xee];
        p.extend_from_slice(&[0, 1, 0, 14]);
        p.extend_from_slice(&duid_llt(MAC_A));
        p.extend_from_slice(&[0, 6, 0, 4, 0, 23, 0, 24]);
        p.extend_from_slice(&[0, 8, 0, 2, 0, 0]);
        p.extend_from_slice(&[0, 3, 0, 12, 0x00, 0x12, 0x34, 0x56, 0, 0, 0, 0, 0, 0, 0, 0]);
        let src = addr("fe80::5054:ff:fe12:3456");
        assert_eq!(src, link_local_of(MAC_A));
        let f = udp_frame(MAC_A, src, addr("ff02::1:2"), 546, 547, &p);
        assert!(is_dhcpv6_request(&f));
        let mut s = server();
        let adv = handle(&mut s, &f, Instant::now()).unwrap();
        let repr = adv.repr();
        assert_common(&adv, &repr, MAC_A, &duid_llt(MAC_A), MessageType::Advertise);
        assert_bound(&repr.ia_na[0], 0x0012_3456);
        assert_eq!(adv.eth.dst_addr, MAC_A);
        assert_eq!(adv.ip.dst_addr, src);
        // The exact bytes of the echoed client id and our server id.
        let mut client_opt = vec![0, 1, 0, 14];
        client_opt.extend_from_slice(&duid_llt(MAC_A));
        assert!(adv.payload.windows(18).any(|w| w == &client_opt[..]));
        let server_opt: [u8; 14] = [0, 2, 0, 10, 0, 3, 0, 1, 0x52, 0x55, 10, 0, 2, 2];
        assert!(adv.payload.windows(14).any(|w| w == server_opt));
        assert_eq!(&adv.payload[..4], &[2, 0xc0, 0xff, 0xee]);
    }

    #[test]
    fn unencodable_search_list_is_left_out() {
        let mut s = Dhcpv6Server::new(GuestNet6Config {
            search: vec!["x".repeat(64)],
            ..cfg()
        });
        let a = duid_llt(MAC_A);
        let adv = handle(&mut s, &frame(MAC_A, &solicit(&a)), Instant::now()).unwrap();
        let repr = adv.repr();
        assert_eq!(repr.domain_list, None);
        assert_eq!(repr.dns_servers, vec![cfg().dns]);
        // No search list configured: no option.
        let mut s = Dhcpv6Server::new(GuestNet6Config::default());
        let adv = handle(&mut s, &frame(MAC_A, &solicit(&a)), Instant::now()).unwrap();
        assert_eq!(adv.repr().domain_list, None);
    }

    #[test]
    fn domain_list_encoding() {
        assert_eq!(
            encode_domain_list(&["example.com"]).unwrap(),
            b"\x07example\x03com\x00".to_vec()
        );
        assert_eq!(
            encode_domain_list(&["example.com."]).unwrap(),
            b"\x07example\x03com\x00".to_vec()
        );
        assert_eq!(
            encode_domain_list(&["a.b", "c"]).unwrap(),
            vec![1, b'a', 1, b'b', 0, 1, b'c', 0]
        );
        assert_eq!(encode_domain_list::<&str>(&[]).unwrap(), Vec::<u8>::new());
        let l63 = "a".repeat(63);
        let l64 = "a".repeat(64);
        assert_eq!(encode_domain_list(&[l63.as_str()]).unwrap().len(), 65);
        assert!(encode_domain_list(&[l64.as_str()]).is_err());
        assert!(encode_domain_list(&[format!("{l64}.com")]).is_err());
        for bad in ["", ".", "a..b", ".a", "a.b.."] {
            assert!(encode_domain_list(&[bad]).is_err(), "{bad:?}");
        }
        // 255 bytes in wire format is the limit.
        let l61 = "b".repeat(61);
        let max = format!("{l63}.{l63}.{l63}.{l61}");
        assert_eq!(encode_domain_list(&[max.as_str()]).unwrap().len(), 255);
        let over = format!("{l63}.{l63}.{l63}.{l61}b");
        assert!(encode_domain_list(&[over.as_str()]).is_err());

        // Decoding.
        let names = ["example.com", "corp.internal", "x"];
        let enc = encode_domain_list(&names).unwrap();
        assert_eq!(decode_domain_list(&enc).unwrap(), names.to_vec());
        assert_eq!(decode_domain_list(&[]).unwrap(), Vec::<String>::new());
        for bad in [
            &[0xc0, 0x0c][..], // compression pointer
            &[0x40][..],       // reserved label type
            &[3, b'a'][..],    // truncated label
            &[1, b'a'][..],    // no root label
            &[0][..],          // the root name alone
            &[1, 0xff, 0][..], // not UTF-8
        ] {
            assert!(decode_domain_list(bad).is_err(), "{bad:?}");
        }
        let enc = encode_domain_list(&[max.as_str()]).unwrap();
        assert_eq!(decode_domain_list(&enc).unwrap(), vec![max]);
    }

    /// A raw message: type, XID, then the given options.
    fn raw(msg_type: u8, options: &[(u16, &[u8])]) -> Vec<u8> {
        let mut p = vec![msg_type, 0xc0, 0xff, 0xee];
        for (code, data) in options {
            p.extend_from_slice(&opt(*code, data));
        }
        p
    }

    fn opt(code: u16, data: &[u8]) -> Vec<u8> {
        let mut o = code.to_be_bytes().to_vec();
        o.extend_from_slice(&u16::try_from(data.len()).unwrap().to_be_bytes());
        o.extend_from_slice(data);
        o
    }

    fn parse(bytes: &[u8]) -> smoltcp::wire::Result<Repr<'_>> {
        Repr::parse(&Packet::new_checked(bytes)?)
    }

    #[test]
    fn packet_view() {
        for len in 0..4 {
            assert!(Packet::new_checked(&[1u8, 2, 3][..len.min(3)]).is_err());
        }
        let bytes = [11u8, 0x12, 0x34, 0x56, 0, 8, 0, 2, 0, 5];
        let p = Packet::new_checked(&bytes[..]).unwrap();
        assert_eq!(p.msg_type(), MessageType::InformationRequest);
        assert_eq!(p.transaction_id(), 0x0012_3456);
        let opts: Vec<_> = p.options().collect();
        assert_eq!(
            opts,
            vec![Ok(RawOption {
                code: 8,
                data: &[0, 5][..]
            })]
        );
        // Unchecked views of short buffers never panic.
        let short = Packet::new_unchecked(&[5u8][..]);
        assert_eq!(short.msg_type(), MessageType::Renew);
        assert_eq!(short.transaction_id(), 0);
        assert_eq!(short.options().count(), 0);
        let mut empty = [0u8; 0];
        let mut p = Packet::new_unchecked(&mut empty[..]);
        p.set_msg_type(MessageType::Solicit);
        p.set_transaction_id(7);
        assert!(p.options_mut().is_empty());
        let mut buf = [0u8; 6];
        let mut p = Packet::new_unchecked(&mut buf[..]);
        p.set_msg_type(MessageType::Reply);
        p.set_transaction_id(0xff12_3456);
        assert_eq!(p.options_mut().len(), 2);
        assert_eq!(buf[..4], [7, 0x12, 0x34, 0x56]);
        for t in 0..=255u8 {
            assert_eq!(u8::from(MessageType::from(t)), t);
        }
        for c in 0..=20u16 {
            assert_eq!(u16::from(StatusCode::from(c)), c);
        }
    }

    #[test]
    fn option_iterator_refuses_overruns() {
        let data = [0, 1, 0, 2, 0xaa, 0xbb, 0, 2, 0, 5, 1];
        let mut it = OptionIter::new(&data);
        assert_eq!(
            it.next(),
            Some(Ok(RawOption {
                code: 1,
                data: &[0xaa, 0xbb][..]
            }))
        );
        assert!(matches!(it.next(), Some(Err(_))));
        assert_eq!(it.next(), None);
        assert_eq!(it.next(), None);
        // A header cut short.
        for cut in [&[0u8][..], &[0, 1][..], &[0, 1, 0][..]] {
            let mut it = OptionIter::new(cut);
            assert!(matches!(it.next(), Some(Err(_))));
            assert_eq!(it.next(), None);
        }
        // Zero-length options are fine; the end is exact.
        let data = [0, 14, 0, 0, 0, 14, 0, 0];
        assert_eq!(OptionIter::new(&data).filter(|o| o.is_ok()).count(), 2);
        // Maximal length claim on a short buffer.
        assert!(matches!(
            OptionIter::new(&[0, 1, 0xff, 0xff, 1, 2]).next(),
            Some(Err(_))
        ));
    }

    #[test]
    fn repr_round_trip() {
        let duid = duid_llt(MAC_A);
        let sid = server_duid();
        let list = encode_domain_list(&["example.com"]).unwrap();
        let repr = Repr {
            msg_type: MessageType::Reply,
            transaction_id: 0x00ab_cdef,
            client_id: Some(&duid),
            server_id: Some(&sid),
            ia_na: vec![
                IaNa {
                    iaid: 1,
                    t1: 100,
                    t2: 160,
                    addresses: vec![
                        IaAddr {
                            addr: guest(),
                            preferred: 200,
                            valid: 300,
                            status: Some(Status {
                                code: StatusCode::Success,
                                message: b"fine",
                            }),
                        },
                        IaAddr {
                            addr: addr("fd00::99"),
                            preferred: 0,
                            valid: 0,
                            status: None,
                        },
                    ],
                    status: Some(Status {
                        code: StatusCode::Unknown(99),
                        message: b"",
                    }),
                },
                ia(2, &[]),
            ],
            ia_ta: vec![IaTa {
                iaid: 3,
                addresses: vec![IaAddr {
                    addr: addr("fd00::77"),
                    preferred: 1,
                    valid: 2,
                    status: None,
                }],
                status: Some(Status {
                    code: StatusCode::NoAddrsAvail,
                    message: b"none",
                }),
            }],
            oro: vec![23, 24, 82],
            rapid_commit: true,
            elapsed_time: Some(1234),
            status: Some(Status {
                code: StatusCode::UseMulticast,
                message: b"use multicast",
            }),
            preference: Some(255),
            dns_servers: vec![addr("fd00::3"), addr("2001:db8::53")],
            domain_list: Some(&list),
            information_refresh_time: Some(3600),
            sol_max_rt: Some(7200),
        };
        let bytes = payload(&repr);
        assert_eq!(bytes.len(), repr.buffer_len());
        assert_eq!(parse(&bytes).unwrap(), repr);
        // Empty message.
        let empty = Repr::new(MessageType::Solicit, 0);
        assert_eq!(payload(&empty), vec![1, 0, 0, 0]);
        assert_eq!(parse(&[1, 0, 0, 0]).unwrap(), empty);
        // A 25-bit transaction id cannot be emitted; nor can a short buffer
        // be filled.
        let big = Repr::new(MessageType::Solicit, 0x0100_0000);
        let mut buf = [0u8; 4];
        assert!(big.emit(&mut Packet::new_unchecked(&mut buf[..])).is_err());
        let mut short = vec![0u8; repr.buffer_len() - 1];
        assert!(
            repr.emit(&mut Packet::new_unchecked(&mut short[..]))
                .is_err()
        );
        // An option body over 65535 bytes cannot be emitted.
        let huge = vec![0u8; 70_000];
        let too_long = Repr {
            domain_list: Some(&huge),
            ..Repr::new(MessageType::Reply, 1)
        };
        let mut buf = vec![0u8; too_long.buffer_len()];
        assert!(
            too_long
                .emit(&mut Packet::new_unchecked(&mut buf[..]))
                .is_err()
        );
    }

    #[test]
    fn repr_refuses_bad_options() {
        let duid = duid_llt(MAC_A);
        let iaaddr_ok = {
            let mut d = guest().octets().to_vec();
            d.extend_from_slice(&[0; 8]);
            d
        };
        let ia_with = |nested: &[u8]| {
            let mut d = vec![0u8; 12];
            d.extend_from_slice(nested);
            d
        };
        // Sanity: the good parts parse.
        let good_ia = ia_with(&opt(OPT_IAADDR, &iaaddr_ok));
        assert!(parse(&raw(1, &[(OPT_CLIENTID, &duid), (OPT_IA_NA, &good_ia)])).is_ok());
        let bad: Vec<Vec<u8>> = vec![
            raw(1, &[(OPT_CLIENTID, &duid), (OPT_CLIENTID, &duid)]),
            raw(1, &[(OPT_SERVERID, &duid), (OPT_SERVERID, &duid)]),
            raw(1, &[(OPT_CLIENTID, &[0, 1])]),
            raw(1, &[(OPT_CLIENTID, &[7u8; 131])]),
            raw(1, &[(OPT_ELAPSED_TIME, &[0, 0, 0])]),
            raw(1, &[(OPT_ELAPSED_TIME, &[0])]),
            raw(1, &[(OPT_RAPID_COMMIT, &[1])]),
            raw(1, &[(OPT_ORO, &[0, 23, 0])]),
            raw(1, &[(OPT_PREFERENCE, &[1, 2])]),
            raw(1, &[(OPT_IA_NA, &[0u8; 11])]),
            raw(1, &[(OPT_IA_TA, &[0u8; 3])]),
            raw(1, &[(OPT_IA_NA, &ia_with(&opt(OPT_IAADDR, &[0u8; 23])))]),
            raw(1, &[(OPT_IA_NA, &ia_with(&[0, 5, 0, 30, 1, 2]))]),
            raw(1, &[(OPT_DNS_SERVERS, &[0u8; 15])]),
            raw(1, &[(OPT_STATUS_CODE, &[0])]),
            raw(1, &[(OPT_STATUS_CODE, &[0, 0]), (OPT_STATUS_CODE, &[0, 0])]),
            raw(1, &[(OPT_INFORMATION_REFRESH_TIME, &[0, 0, 0])]),
            raw(1, &[(OPT_SOL_MAX_RT, &[0, 0, 0, 0, 0])]),
            {
                let mut d = iaaddr_ok.clone();
                d.extend_from_slice(&opt(OPT_STATUS_CODE, &[0]));
                raw(1, &[(OPT_IA_NA, &ia_with(&opt(OPT_IAADDR, &d)))])
            },
        ];
        for bytes in &bad {
            assert!(parse(bytes).is_err(), "{bytes:?}");
        }
        // Unknown options (top level and nested) are skipped.
        let ia_unknown = ia_with(&opt(999, &[1, 2, 3]));
        let bytes = raw(
            1,
            &[
                (OPT_CLIENTID, &duid),
                (12345, &[9; 7]),
                (OPT_IA_NA, &ia_unknown),
            ],
        );
        let r = parse(&bytes).unwrap();
        assert_eq!(r.client_id, Some(&duid[..]));
        assert_eq!(r.ia_na.len(), 1);
        assert!(r.ia_na[0].addresses.is_empty());
    }

    fn assert_malformed(frame: &[u8], layer: &str) {
        let mut s = server();
        let r = s.handle(frame, Instant::now());
        assert!(
            matches!(&r, Err(FrameError::Malformed { layer: l, .. }) if *l == layer),
            "{r:?}"
        );
        assert_eq!(s.lease(), None);
    }

    #[test]
    fn malformed_dhcpv6_is_rejected() {
        let a = duid_llt(MAC_A);
        let good = payload(&solicit(&a));
        // Truncated: the last option cut short.
        for cut in 1..good.len() - 4 {
            let f = raw_frame(MAC_A, &good[..good.len() - cut]);
            let mut s = server();
            let r = s.handle(&f, Instant::now());
            // Cutting exactly at an option boundary leaves a valid message.
            if let Err(e) = r {
                assert!(
                    matches!(
                        e,
                        FrameError::Malformed {
                            layer: "dhcpv6",
                            ..
                        }
                    ),
                    "cut {cut}: {e:?}"
                );
            }
        }
        let truncated = raw_frame(MAC_A, &good[..good.len() - 2]);
        assert_malformed(&truncated, "dhcpv6");
        // An option length running past the end.
        let mut overlong = raw(1, &[(OPT_CLIENTID, &a)]);
        overlong[6..8].copy_from_slice(&200u16.to_be_bytes());
        assert_malformed(&raw_frame(MAC_A, &overlong), "dhcpv6");
        // A message shorter than its header.
        for len in 0..4 {
            assert_malformed(&raw_frame(MAC_A, &good[..len]), "dhcpv6");
        }
    }

    #[test]
    fn bad_udp_checksums_are_rejected() {
        let a = duid_llt(MAC_A);
        let good = frame(MAC_A, &solicit(&a));
        assert!(server().handle(&good, Instant::now()).unwrap().is_some());
        // Zero checksum: mandatory in IPv6.
        let mut f = good.clone();
        f[14 + 40 + 6..14 + 40 + 8].copy_from_slice(&[0, 0]);
        assert_malformed(&f, "udp");
        // Wrong checksum.
        let mut f = good.clone();
        f[14 + 40 + 8 + 2] ^= 0x55;
        assert_malformed(&f, "udp");
        let mut f = good.clone();
        f[14 + 40 + 6] ^= 0x01;
        assert_malformed(&f, "udp");
        // Address change breaks the pseudo-header sum.
        let mut f = good;
        f[14 + 8 + 15] ^= 0x01;
        assert_malformed(&f, "udp");
    }

    #[test]
    fn wrong_ports_and_protocols_are_refused() {
        let a = duid_llt(MAC_A);
        let p = payload(&solicit(&a));
        let ll = link_local_of(MAC_A);
        let dst = ALL_DHCP_RELAY_AGENTS_AND_SERVERS;
        assert_eq!(
            server().handle(&udp_frame(MAC_A, ll, dst, 546, 548, &p), Instant::now()),
            Err(FrameError::Unsupported("udp port (not dhcpv6 server)"))
        );
        assert_eq!(
            server().handle(&udp_frame(MAC_A, ll, dst, 5000, 547, &p), Instant::now()),
            Err(FrameError::Unsupported(
                "udp source port (not dhcpv6 client)"
            ))
        );
        // From the unspecified or a multicast address.
        for src in [Ipv6Addr::UNSPECIFIED, addr("ff02::1")] {
            assert_eq!(
                server().handle(&udp_frame(MAC_A, src, dst, 546, 547, &p), Instant::now()),
                Err(FrameError::Unsupported("ipv6 source not unicast"))
            );
        }
        // From a multicast MAC.
        assert_eq!(
            server().handle(&raw_frame(MCAST_MAC, &p), Instant::now()),
            Err(FrameError::Unsupported("ethernet source not unicast"))
        );
        // Not UDP.
        let mut f = raw_frame(MAC_A, &p);
        f[14 + 6] = 6;
        assert_eq!(
            server().handle(&f, Instant::now()),
            Err(FrameError::Unsupported("ipv6 next header (not udp)"))
        );
        // Not IPv6.
        let mut f = raw_frame(MAC_A, &p);
        EthernetFrame::new_unchecked(&mut f[..]).set_ethertype(EthernetProtocol::Ipv4);
        assert_eq!(
            server().handle(&f, Instant::now()),
            Err(FrameError::Unsupported("ethertype (not ipv6)"))
        );
        // IP version field not 6.
        let mut f = raw_frame(MAC_A, &p);
        f[14] = 0x40;
        assert_malformed(&f, "ipv6");
        // Server-to-client and relay messages on the server port.
        for (t, why) in [
            (2, "dhcpv6 message type (server to client)"),
            (7, "dhcpv6 message type (server to client)"),
            (10, "dhcpv6 message type (server to client)"),
            (13, "dhcpv6 message type (server to client)"),
            (12, "relayed dhcpv6"),
            (0, "dhcpv6 message type"),
            (200, "dhcpv6 message type"),
        ] {
            let m = raw(t, &[(OPT_CLIENTID, &a)]);
            assert_eq!(
                server().handle(&raw_frame(MAC_A, &m), Instant::now()),
                Err(FrameError::Unsupported(why)),
                "type {t}"
            );
        }
    }

    #[test]
    fn truncated_frames_never_panic() {
        let a = duid_llt(MAC_A);
        let f = frame(MAC_A, &to_server(MessageType::Request, &a, SERVER_DUID));
        for len in 0..f.len() {
            let mut s = server();
            let r = s.handle(&f[..len], Instant::now());
            assert!(
                matches!(r, Err(FrameError::Malformed { .. })),
                "len {len}: {r:?}"
            );
            assert!(!is_dhcpv6_request(&f[..len]), "len {len}");
        }
    }

    /// xorshift64: deterministic garbage.
    fn garbage(seed: &mut u64, len: usize) -> Vec<u8> {
        (0..len)
            .map(|_| {
                *seed ^= *seed << 13;
                *seed ^= *seed >> 7;
                *seed ^= *seed << 17;
                (*seed >> 24) as u8
            })
            .collect()
    }

    #[test]
    fn garbage_never_panics() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut s = server();
        let now = Instant::now();
        for len in 0..600 {
            for _ in 0..4 {
                let g = garbage(&mut seed, len);
                // As a whole frame.
                let _ = s.handle(&g, now);
                let _ = is_dhcpv6_request(&g);
                // As a DHCPv6 message in a valid datagram, of every
                // client message type.
                let mut m = g.clone();
                if let Some(t) = m.first_mut() {
                    *t = (len % 12) as u8;
                }
                let f = raw_frame(MAC_A, &m);
                assert!(is_dhcpv6_request(&f));
                let _ = s.handle(&f, now);
                // Straight at the wire layer.
                if let Ok(p) = Packet::new_checked(&g[..]) {
                    let _ = Repr::parse(&p);
                    let _ = p.options().count();
                }
                let _ = decode_domain_list(&g);
            }
        }
        // Options with plausible codes and random bodies.
        let a = duid_llt(MAC_A);
        let sid = server_duid();
        for round in 0..2000usize {
            let code = [1u16, 2, 3, 4, 5, 6, 7, 8, 13, 14, 23, 24, 32, 82][round % 14];
            let len = round % 60;
            let body = garbage(&mut seed, len);
            let t = [1u8, 3, 4, 5, 6, 8, 9, 11][round % 8];
            let m = raw(
                t,
                &[(OPT_CLIENTID, &a), (OPT_SERVERID, &sid), (code, &body)],
            );
            let _ = s.handle(&raw_frame(MAC_A, &m), now);
        }
    }

    #[test]
    fn corrupted_frames_never_panic() {
        let a = duid_llt(MAC_A);
        let base = frame(MAC_A, &to_server(MessageType::Renew, &a, SERVER_DUID));
        for at in 0..base.len() {
            for value in [0x00, 0x01, 0x05, 0x7f, 0x80, 0xff] {
                let mut f = base.clone();
                f[at] = value;
                if at >= 14 + 40 + 8 {
                    fix_udp_checksum(&mut f);
                }
                let mut s = server();
                let _ = s.handle(&f, Instant::now());
                let _ = is_dhcpv6_request(&f);
            }
        }
    }

    #[test]
    fn is_dhcpv6_request_classifies() {
        let a = duid_llt(MAC_A);
        let f = frame(MAC_A, &solicit(&a));
        assert!(is_dhcpv6_request(&f));
        for len in [0, 13, 14, 53, 54, 61] {
            assert!(!is_dhcpv6_request(&f[..len]), "len {len}");
        }
        let p = payload(&solicit(&a));
        let ll = link_local_of(MAC_A);
        let dst = ALL_DHCP_RELAY_AGENTS_AND_SERVERS;
        assert!(!is_dhcpv6_request(&udp_frame(MAC_A, ll, dst, 547, 546, &p)));
        assert!(!is_dhcpv6_request(&udp_frame(MAC_A, ll, dst, 5353, 53, &p)));
        let mut g = f.clone();
        g[14 + 6] = 0; // hop-by-hop header first
        assert!(!is_dhcpv6_request(&g));
        let mut g = f.clone();
        EthernetFrame::new_unchecked(&mut g[..]).set_ethertype(EthernetProtocol::Ipv4);
        assert!(!is_dhcpv6_request(&g));
        let mut g = f;
        g[14] = 0x40;
        assert!(!is_dhcpv6_request(&g));
        // Our own replies are not requests.
        let reply = server().handle(&frame(MAC_A, &solicit(&a)), Instant::now());
        assert!(!is_dhcpv6_request(&reply.unwrap().unwrap()));
    }
}
