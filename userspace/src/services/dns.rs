//! The IPv6 DNS address served by an IPv4 resolver.
//!
//! # Theory of operation
//!
//! The DNS forwarder is normally a NAT flow: a query to the DNS address is
//! DNATed to the host's resolver and the fast path carries it. NAT cannot
//! change a packet's family, so when the host has an IPv4 resolver only,
//! queries to the IPv6 DNS address (`fd00::3`, the one RDNSS and DHCPv6
//! hand out) are relayed here instead, as a stub forwarder does:
//!
//! * [`DnsRelay::query`] takes the guest's UDP datagram to `dns6:53`
//!   (checksum verified), gives it a random transaction id of the relay's
//!   own (RFC 5452: from `/dev/urandom`), remembers (id → guest address,
//!   port, MAC, the guest's id, the question) and sends the message from
//!   an IPv4 UDP socket connected to the resolver (so the kernel drops
//!   datagrams from anyone else);
//! * [`DnsRelay::answers`] reads what the resolver sent back — at most
//!   [`ANSWERS_PER_CALL`] datagrams a call, so a flood cannot hold the
//!   event loop — keeps only answers to ids it handed out that repeat the
//!   query's question, puts the guest's id back and builds the Ethernet
//!   frame from `dns6:53` to the guest. An answer the tap's MTU cannot
//!   carry is cut to its header and question with the TC bit set
//!   (RFC 1035 §4.1.1): the resolver retries over TCP, which the IPv6 DNS
//!   address refuses, and moves on to the IPv4 one.
//!
//! Pending queries are bounded ([`MAX_PENDING`], the oldest is dropped to
//! make room) and forgotten after [`QUERY_TIMEOUT`] ([`DnsRelay::expire`]);
//! the guest's resolver retries on its own. The messages themselves are
//! not parsed beyond the 12-byte header's id: the resolver judges them.
//! TCP to the IPv6 DNS address is refused as a closed port by the flow
//! manager, and resolvers fall back to the IPv4 address.

use std::{
    collections::{HashMap, VecDeque},
    io,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, UdpSocket},
    time::{Duration, Instant},
};

use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    EthernetAddress, EthernetFrame, EthernetProtocol, EthernetRepr, IpAddress, IpProtocol,
    Ipv6Packet, Ipv6Repr, UdpPacket, UdpRepr,
};

use crate::config::GuestNet6Config;
use crate::services::error::FrameError;

/// Queries waiting for an answer, at most.
pub const MAX_PENDING: usize = 512;
/// How long a query waits for its answer.
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(5);
/// The DNS port.
const DNS_PORT: u16 = 53;
/// Largest answer read from the resolver (a UDP datagram).
const MAX_ANSWER: usize = 65_535;
/// Answers read by one [`DnsRelay::answers`] call, at most.
pub const ANSWERS_PER_CALL: usize = 64;
/// IPv6 and UDP headers in front of an answer, and the Ethernet header.
const ANSWER_OVERHEAD: usize = 14 + 40 + 8;

/// One query on its way.
#[derive(Debug, Clone)]
struct Pending {
    guest: (Ipv6Addr, u16),
    mac: EthernetAddress,
    id: u16,
    sent: Instant,
    /// The query's question section (what the answer must repeat).
    question: Vec<u8>,
}

/// The question section of a DNS message: from byte 12 through the end
/// of its first question (name, type, class); `None` if it does not parse.
fn question(msg: &[u8]) -> Option<&[u8]> {
    let mut at = 12usize;
    loop {
        let len = usize::from(*msg.get(at)?);
        if len == 0 {
            at += 1;
            break;
        }
        // A compression pointer cannot occur in a query's first name.
        if len > 63 {
            return None;
        }
        at += 1 + len;
    }
    msg.get(12..at.checked_add(4)?)
}

/// Counters of the relay.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RelayStats {
    /// Queries sent to the resolver.
    pub queries: u64,
    /// Answers relayed to the guest.
    pub answers: u64,
    /// Queries that timed out or were pushed out by newer ones.
    pub dropped: u64,
    /// Datagrams from the resolver that matched no query.
    pub stray: u64,
}

/// The relay (see the module documentation).
#[derive(Debug)]
pub struct DnsRelay {
    cfg: GuestNet6Config,
    upstream: SocketAddrV4,
    socket: UdpSocket,
    pending: HashMap<u16, Pending>,
    order: VecDeque<u16>,
    /// Where transaction ids come from.
    random: Option<std::fs::File>,
    /// Fallback id state when /dev/urandom cannot be read.
    next_id: u16,
    stats: RelayStats,
}

impl DnsRelay {
    /// A relay for `cfg.dns` to the IPv4 resolver `upstream`, with a
    /// non-blocking socket of its own (in the calling thread's network
    /// namespace).
    pub fn new(cfg: GuestNet6Config, upstream: Ipv4Addr) -> io::Result<Self> {
        Self::with_upstream(cfg, SocketAddrV4::new(upstream, DNS_PORT))
    }

    /// [`Self::new`] with the resolver's port too (tests).
    pub fn with_upstream(cfg: GuestNet6Config, upstream: SocketAddrV4) -> io::Result<Self> {
        let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
        socket.connect(upstream)?;
        socket.set_nonblocking(true)?;
        Ok(Self {
            cfg,
            upstream,
            socket,
            pending: HashMap::new(),
            order: VecDeque::new(),
            random: std::fs::File::open("/dev/urandom").ok(),
            next_id: (std::process::id() as u16).wrapping_mul(40_503),
            stats: RelayStats::default(),
        })
    }

    /// The socket answers arrive on (to wait for it to become readable).
    pub fn socket(&self) -> &UdpSocket {
        &self.socket
    }

    /// The counters so far.
    pub fn stats(&self) -> &RelayStats {
        &self.stats
    }

    /// Whether `frame` is a UDP datagram to the IPv6 DNS address's port 53.
    pub fn is_query(&self, frame: &[u8]) -> bool {
        frame.get(12..14) == Some(&[0x86, 0xdd][..])
            && frame.get(14 + 6) == Some(&17)
            && frame.get(14 + 24..14 + 40) == Some(&self.cfg.dns.octets()[..])
            && frame.get(14 + 40 + 2..14 + 40 + 4) == Some(&DNS_PORT.to_be_bytes()[..])
    }

    /// Relays the guest's query in `frame` (see [`Self::is_query`]).
    pub fn query(&mut self, frame: &[u8], now: Instant) -> Result<(), FrameError> {
        let eth = EthernetFrame::new_checked(frame).map_err(FrameError::malformed("ethernet"))?;
        let ip = Ipv6Packet::new_checked(eth.payload()).map_err(FrameError::malformed("ipv6"))?;
        let ip_repr = Ipv6Repr::parse(&ip).map_err(FrameError::malformed("ipv6"))?;
        let udp = UdpPacket::new_checked(ip.payload()).map_err(FrameError::malformed("udp"))?;
        let (src, dst) = (
            IpAddress::Ipv6(ip_repr.src_addr),
            IpAddress::Ipv6(ip_repr.dst_addr),
        );
        // RFC 8200 §8.1: a zero UDP checksum is invalid over IPv6.
        if udp.checksum() == 0 || !udp.verify_checksum(&src, &dst) {
            return Err(FrameError::Unsupported("udp checksum"));
        }
        let msg = udp.payload();
        let Some(id) = msg.get(..2).map(|b| u16::from_be_bytes([b[0], b[1]])) else {
            return Err(FrameError::Unsupported("dns message shorter than its id"));
        };
        if msg.len() < 12 || !eth.src_addr().is_unicast() || !self.cfg.in_prefix(ip_repr.src_addr) {
            return Err(FrameError::Unsupported("dns query"));
        }
        let question = question(msg)
            .ok_or(FrameError::Unsupported("dns query without a question"))?
            .to_vec();
        self.expire(now);
        if self.pending.len() >= MAX_PENDING
            && let Some(old) = self.order.pop_front()
            && self.pending.remove(&old).is_some()
        {
            self.stats.dropped += 1;
        }
        let ours = self.fresh_id();
        let mut out = msg.to_vec();
        out[..2].copy_from_slice(&ours.to_be_bytes());
        match self.socket.send(&out) {
            Ok(_) => {}
            Err(e) => {
                log::debug!("dns6 relay: sending to {}: {e}", self.upstream);
                return Err(FrameError::Unsupported("dns upstream unreachable"));
            }
        }
        self.pending.insert(
            ours,
            Pending {
                guest: (ip_repr.src_addr, udp.src_port()),
                mac: eth.src_addr(),
                id,
                sent: now,
                question,
            },
        );
        self.order.push_back(ours);
        self.stats.queries += 1;
        Ok(())
    }

    /// A random id no pending query uses.
    fn fresh_id(&mut self) -> u16 {
        loop {
            let mut b = [0u8; 2];
            let id = match self
                .random
                .as_mut()
                .map(|f| io::Read::read_exact(f, &mut b))
            {
                Some(Ok(())) => u16::from_ne_bytes(b),
                _ => {
                    // No /dev/urandom: a scrambled counter (weaker).
                    self.next_id = self.next_id.wrapping_add(0x9e37);
                    self.next_id.rotate_left(5) ^ 0x5a5a
                }
            };
            if !self.pending.contains_key(&id) {
                return id;
            }
        }
    }

    /// Forgets queries older than [`QUERY_TIMEOUT`].
    pub fn expire(&mut self, now: Instant) {
        while let Some(&id) = self.order.front() {
            match self.pending.get(&id) {
                Some(p) if now.saturating_duration_since(p.sent) < QUERY_TIMEOUT => break,
                Some(_) => {
                    self.pending.remove(&id);
                    self.stats.dropped += 1;
                }
                None => {}
            }
            self.order.pop_front();
        }
    }

    /// The frames for the guest of the answers waiting on the socket (at
    /// most [`ANSWERS_PER_CALL`]), and whether the socket was drained
    /// (`false`: call again).
    pub fn answers(&mut self) -> (Vec<Vec<u8>>, bool) {
        let mut frames = Vec::new();
        let mut buf = vec![0u8; MAX_ANSWER];
        for _ in 0..ANSWERS_PER_CALL {
            let (n, from) = match self.socket.recv_from(&mut buf) {
                Ok(r) => r,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return (frames, true),
                Err(e) => {
                    // E.g. ECONNREFUSED from the resolver's port
                    // unreachable: the query times out.
                    log::debug!("dns6 relay: {e}");
                    continue;
                }
            };
            let msg = buf.get(..n).unwrap_or_default();
            let id = msg.get(..2).map(|b| u16::from_be_bytes([b[0], b[1]]));
            let p = match id {
                Some(id) if from == SocketAddr::V4(self.upstream) => self.pending.get(&id),
                _ => None,
            };
            // The answer must repeat the question (RFC 5452 §9.1).
            let Some(p) = p
                .filter(|p| question(msg) == Some(&p.question[..]))
                .cloned()
            else {
                self.stats.stray += 1;
                continue;
            };
            if let Some(id) = id {
                self.pending.remove(&id);
            }
            let mut answer = msg.to_vec();
            answer[..2].copy_from_slice(&p.id.to_be_bytes());
            if ANSWER_OVERHEAD + answer.len() > usize::from(self.cfg.mtu).max(1280) + 14 {
                // Too big for the tap: header and question, truncated.
                answer.truncate(12 + p.question.len());
                answer[2] |= 0x02;
                for b in &mut answer[6..12] {
                    *b = 0;
                }
            }
            frames.push(self.answer_frame(&p, &answer));
            self.stats.answers += 1;
        }
        (frames, false)
    }

    /// The Ethernet frame carrying `answer` from `dns6:53` to the guest.
    fn answer_frame(&self, p: &Pending, answer: &[u8]) -> Vec<u8> {
        let udp = UdpRepr {
            src_port: DNS_PORT,
            dst_port: p.guest.1,
        };
        let ip = Ipv6Repr {
            src_addr: self.cfg.dns,
            dst_addr: p.guest.0,
            next_header: IpProtocol::Udp,
            payload_len: udp.header_len() + answer.len(),
            hop_limit: 64,
        };
        let eth = EthernetRepr {
            src_addr: self.cfg.gateway_mac,
            dst_addr: p.mac,
            ethertype: EthernetProtocol::Ipv6,
        };
        let mut frame = vec![0u8; eth.buffer_len() + ip.buffer_len() + ip.payload_len];
        let mut f = EthernetFrame::new_unchecked(&mut frame[..]);
        eth.emit(&mut f);
        let mut pk = Ipv6Packet::new_unchecked(f.payload_mut());
        ip.emit(&mut pk);
        udp.emit(
            &mut UdpPacket::new_unchecked(pk.payload_mut()),
            &IpAddress::Ipv6(self.cfg.dns),
            &IpAddress::Ipv6(p.guest.0),
            answer.len(),
            |b| b.copy_from_slice(answer),
            &ChecksumCapabilities::default(),
        );
        frame
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const GUEST_MAC: EthernetAddress = EthernetAddress([2, 0, 0, 0, 0, 0x15]);

    fn query_frame(cfg: &GuestNet6Config, src: Ipv6Addr, id: u16) -> Vec<u8> {
        let mut msg = vec![0u8; 12];
        msg[..2].copy_from_slice(&id.to_be_bytes());
        msg.extend_from_slice(b"\x07example\x00\x00\x01\x00\x01");
        let udp = UdpRepr {
            src_port: 40000,
            dst_port: 53,
        };
        let ip = Ipv6Repr {
            src_addr: src,
            dst_addr: cfg.dns,
            next_header: IpProtocol::Udp,
            payload_len: 8 + msg.len(),
            hop_limit: 64,
        };
        let eth = EthernetRepr {
            src_addr: GUEST_MAC,
            dst_addr: cfg.gateway_mac,
            ethertype: EthernetProtocol::Ipv6,
        };
        let mut frame = vec![0u8; 14 + 40 + 8 + msg.len()];
        let mut f = EthernetFrame::new_unchecked(&mut frame[..]);
        eth.emit(&mut f);
        let mut p = Ipv6Packet::new_unchecked(f.payload_mut());
        ip.emit(&mut p);
        udp.emit(
            &mut UdpPacket::new_unchecked(p.payload_mut()),
            &IpAddress::Ipv6(src),
            &IpAddress::Ipv6(cfg.dns),
            msg.len(),
            |b| b.copy_from_slice(&msg),
            &ChecksumCapabilities::default(),
        );
        frame
    }

    #[test]
    fn relays_a_query_and_its_answer_with_the_guests_id() {
        let cfg = GuestNet6Config::default();
        // A resolver on loopback.
        let resolver = UdpSocket::bind("127.0.0.1:0").unwrap();
        resolver
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let port = resolver.local_addr().unwrap().port();
        let mut relay =
            DnsRelay::with_upstream(cfg.clone(), SocketAddrV4::new(Ipv4Addr::LOCALHOST, port))
                .unwrap();
        let guest: Ipv6Addr = "fd00::15".parse().unwrap();
        let q = query_frame(&cfg, guest, 0xbeef);
        assert!(relay.is_query(&q));
        relay.query(&q, Instant::now()).unwrap();
        let mut buf = [0u8; 512];
        let (n, from) = resolver.recv_from(&mut buf).unwrap();
        let sent_id = u16::from_be_bytes([buf[0], buf[1]]);
        assert_ne!(sent_id, 0xbeef, "the relay's own id");
        assert_eq!(&buf[2..n], &query_frame(&cfg, guest, 0)[14 + 48 + 2..]);
        // A stray datagram, an answer to another question, then the
        // answer.
        resolver.send_to(b"\x00\x00junkjunkjunk", from).unwrap();
        let mut other = buf[..n].to_vec();
        other[2] |= 0x80;
        other[13] = b'E';
        resolver.send_to(&other, from).unwrap();
        let mut answer = buf[..n].to_vec();
        answer[2] |= 0x80;
        resolver.send_to(&answer, from).unwrap();
        let mut frames = Vec::new();
        for _ in 0..100 {
            frames.extend(relay.answers().0);
            if !frames.is_empty() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(frames.len(), 1);
        let f = EthernetFrame::new_checked(&frames[0][..]).unwrap();
        assert_eq!(f.dst_addr(), GUEST_MAC);
        let ip = Ipv6Packet::new_checked(f.payload()).unwrap();
        assert_eq!((ip.src_addr(), ip.dst_addr()), (cfg.dns, guest));
        let u = UdpPacket::new_checked(ip.payload()).unwrap();
        assert!(u.verify_checksum(&IpAddress::Ipv6(cfg.dns), &IpAddress::Ipv6(guest)));
        assert_eq!((u.src_port(), u.dst_port()), (53, 40000));
        assert_eq!(&u.payload()[..2], &0xbeefu16.to_be_bytes());
        assert_eq!(relay.stats().answers, 1);
        assert!(relay.stats().stray >= 2);
        // An answer too big for the tap is cut to its question with TC.
        relay
            .query(&query_frame(&cfg, guest, 0x1111), Instant::now())
            .unwrap();
        let (n, _) = resolver.recv_from(&mut buf).unwrap();
        let mut big = buf[..n].to_vec();
        big[2] |= 0x80;
        big[7] = 1;
        big.extend(std::iter::repeat_n(0u8, 3000));
        resolver.send_to(&big, from).unwrap();
        let mut frames = Vec::new();
        for _ in 0..100 {
            frames.extend(relay.answers().0);
            if !frames.is_empty() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let f = EthernetFrame::new_checked(&frames[0][..]).unwrap();
        let ip = Ipv6Packet::new_checked(f.payload()).unwrap();
        let u = UdpPacket::new_checked(ip.payload()).unwrap();
        let msg = u.payload();
        assert!(frames[0].len() <= 1514);
        assert_eq!(msg[2] & 0x02, 0x02, "TC set");
        assert_eq!(&msg[6..12], &[0; 6]);
        assert_eq!(&msg[..2], &0x1111u16.to_be_bytes());
    }

    #[test]
    fn bad_queries_are_refused_and_pending_is_bounded() {
        let cfg = GuestNet6Config::default();
        // A resolver that never answers.
        let resolver = UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = resolver.local_addr().unwrap().port();
        let mut relay =
            DnsRelay::with_upstream(cfg.clone(), SocketAddrV4::new(Ipv4Addr::LOCALHOST, port))
                .unwrap();
        let guest: Ipv6Addr = "fd00::15".parse().unwrap();
        // Bad checksum; outside the prefix; truncated.
        let mut q = query_frame(&cfg, guest, 1);
        let n = q.len();
        q[n - 1] ^= 1;
        assert!(relay.query(&q, Instant::now()).is_err());
        let q = query_frame(&cfg, "2001:db8::1".parse().unwrap(), 1);
        assert!(relay.query(&q, Instant::now()).is_err());
        let q = query_frame(&cfg, guest, 1);
        for len in 0..q.len() {
            let _ = relay.query(&q[..len], Instant::now());
        }
        // A flood keeps at most MAX_PENDING, and they time out.
        let now = Instant::now();
        for i in 0..(MAX_PENDING + 10) {
            relay
                .query(&query_frame(&cfg, guest, i as u16), now)
                .unwrap();
        }
        assert_eq!(relay.pending.len(), MAX_PENDING);
        assert_eq!(relay.stats().dropped, 10);
        relay.expire(now + QUERY_TIMEOUT);
        assert!(relay.pending.is_empty());
    }
}
