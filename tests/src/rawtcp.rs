//! Hand-made TCP segments sent from a namespace, and the segments that
//! come back.
//!
//! # Theory of operation
//!
//! Some behaviour can only be provoked with a segment no socket would send:
//! an ACK for a connection that never existed must be answered with an RST
//! (RFC 9293 §3.10.7.1), and an RST must never be answered. [`exchange`]
//! opens an `AF_PACKET` socket bound to one interface on a thread inside
//! the namespace ([`crate::nsthread`]), *then* sends the crafted Ethernet
//! frame ([`Probe::frame`], built with smoltcp's `wire` module, checksums
//! included) and collects, for a bounded time, every inbound IPv4/TCP
//! segment that comes from the probe's destination address to the probe's
//! source port. Opening the capture before sending leaves no window in
//! which a quick reply could be missed. The guest's own kernel never sees
//! the probe (it leaves through the packet socket), and ignores the answer
//! (an RST for a port it has no socket on).

use std::net::SocketAddrV4;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    EthernetAddress, EthernetFrame, EthernetProtocol, EthernetRepr, IpAddress, IpProtocol,
    Ipv4Packet, Ipv4Repr, TcpPacket, TcpSeqNumber,
};

use crate::netns::Netns;
use crate::nsthread;

/// TCP header length of the probes (no options).
const TCP_HEADER: usize = 20;
/// Poll period of the capture.
const CAPTURE_POLL: Duration = Duration::from_millis(50);

/// TCP flags of a segment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Flags {
    /// SYN.
    pub syn: bool,
    /// ACK.
    pub ack: bool,
    /// RST.
    pub rst: bool,
    /// FIN.
    pub fin: bool,
    /// PSH.
    pub psh: bool,
}

/// A crafted segment to send from a namespace.
#[derive(Debug, Clone)]
pub struct Probe {
    /// Source MAC address (the sending interface's).
    pub src_mac: [u8; 6],
    /// Destination MAC address (the gateway's).
    pub dst_mac: [u8; 6],
    /// Source address and port.
    pub src: SocketAddrV4,
    /// Destination address and port.
    pub dst: SocketAddrV4,
    /// Sequence number.
    pub seq: u32,
    /// Acknowledgment number (sent only with [`Flags::ack`]).
    pub ack: u32,
    /// Flags.
    pub flags: Flags,
    /// Payload.
    pub payload: Vec<u8>,
}

/// A TCP segment seen on the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    /// Source address and port.
    pub src: SocketAddrV4,
    /// Destination address and port.
    pub dst: SocketAddrV4,
    /// Sequence number.
    pub seq: u32,
    /// Acknowledgment number (meaningful with [`Flags::ack`]).
    pub ack: u32,
    /// Flags.
    pub flags: Flags,
    /// Payload length.
    pub payload_len: usize,
}

impl Probe {
    /// The Ethernet frame carrying the probe.
    pub fn frame(&self) -> Vec<u8> {
        let eth = EthernetRepr {
            src_addr: EthernetAddress(self.src_mac),
            dst_addr: EthernetAddress(self.dst_mac),
            ethertype: EthernetProtocol::Ipv4,
        };
        let ip = Ipv4Repr {
            src_addr: *self.src.ip(),
            dst_addr: *self.dst.ip(),
            next_header: IpProtocol::Tcp,
            payload_len: TCP_HEADER + self.payload.len(),
            hop_limit: 64,
        };
        let mut buf = vec![0u8; eth.buffer_len() + ip.buffer_len() + ip.payload_len];
        let mut frame = EthernetFrame::new_unchecked(&mut buf[..]);
        eth.emit(&mut frame);
        let mut packet = Ipv4Packet::new_unchecked(frame.payload_mut());
        ip.emit(&mut packet, &ChecksumCapabilities::default());
        let mut tcp = TcpPacket::new_unchecked(packet.payload_mut());
        tcp.set_src_port(self.src.port());
        tcp.set_dst_port(self.dst.port());
        tcp.set_seq_number(TcpSeqNumber(self.seq as i32));
        tcp.set_ack_number(TcpSeqNumber(if self.flags.ack {
            self.ack as i32
        } else {
            0
        }));
        tcp.set_header_len(TCP_HEADER as u8);
        tcp.clear_flags();
        tcp.set_syn(self.flags.syn);
        tcp.set_ack(self.flags.ack);
        tcp.set_rst(self.flags.rst);
        tcp.set_fin(self.flags.fin);
        tcp.set_psh(self.flags.psh);
        tcp.set_window_len(64240);
        tcp.set_urgent_at(0);
        tcp.payload_mut().copy_from_slice(&self.payload);
        tcp.fill_checksum(
            &IpAddress::Ipv4(*self.src.ip()),
            &IpAddress::Ipv4(*self.dst.ip()),
        );
        buf
    }
}

/// Parses an Ethernet frame holding an IPv4 TCP segment.
pub fn parse_frame(frame: &[u8]) -> Option<Segment> {
    let eth = EthernetFrame::new_checked(frame).ok()?;
    if eth.ethertype() != EthernetProtocol::Ipv4 {
        return None;
    }
    let ip = Ipv4Packet::new_checked(eth.payload()).ok()?;
    if ip.next_header() != IpProtocol::Tcp || ip.frag_offset() != 0 {
        return None;
    }
    let tcp = TcpPacket::new_checked(ip.payload()).ok()?;
    Some(Segment {
        src: SocketAddrV4::new(ip.src_addr(), tcp.src_port()),
        dst: SocketAddrV4::new(ip.dst_addr(), tcp.dst_port()),
        seq: tcp.seq_number().0 as u32,
        ack: tcp.ack_number().0 as u32,
        flags: Flags {
            syn: tcp.syn(),
            ack: tcp.ack(),
            rst: tcp.rst(),
            fin: tcp.fin(),
            psh: tcp.psh(),
        },
        payload_len: tcp.payload().len(),
    })
}

/// The MAC address of `iface` in `ns` (from `ip -j link show`).
pub fn iface_mac(ns: &Netns, iface: &str) -> Result<[u8; 6]> {
    let out = ns.stdout(&["ip", "-j", "link", "show", "dev", iface])?;
    let doc: serde_json::Value =
        serde_json::from_str(&out).context("`ip -j link show` printed no JSON")?;
    let text = doc
        .pointer("/0/address")
        .and_then(serde_json::Value::as_str)
        .with_context(|| format!("no address for {iface} in {out}"))?;
    parse_mac(text)
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(text: &str) -> Result<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        let part = parts.next().with_context(|| format!("bad MAC {text:?}"))?;
        *byte = u8::from_str_radix(part, 16).with_context(|| format!("bad MAC {text:?}"))?;
    }
    if parts.next().is_some() {
        bail!("bad MAC {text:?}");
    }
    Ok(mac)
}

/// An `AF_PACKET` socket bound to one interface (of the calling thread's
/// namespace).
struct PacketSocket {
    fd: OwnedFd,
}

impl PacketSocket {
    fn open(iface: &str) -> Result<PacketSocket> {
        let proto = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: plain socket(2) call; the result is checked below.
        let raw = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                i32::from(proto),
            )
        };
        if raw < 0 {
            return Err(std::io::Error::last_os_error()).context("socket(AF_PACKET)");
        }
        // SAFETY: `raw` is a fresh descriptor owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let index = nix::net::if_::if_nametoindex(iface)
            .with_context(|| format!("no interface {iface}"))?;
        // SAFETY: sockaddr_ll is plain data; all-zero is a valid value.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = proto;
        sll.sll_ifindex = i32::try_from(index).context("ifindex")?;
        // SAFETY: `sll` is a valid sockaddr_ll of the given size.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&raw const sll).cast::<libc::sockaddr>(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("bind(AF_PACKET, {iface})"));
        }
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: CAPTURE_POLL.as_micros() as libc::suseconds_t,
        };
        // SAFETY: `tv` is a valid timeval of the given size.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const tv).cast::<libc::c_void>(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error()).context("SO_RCVTIMEO");
        }
        Ok(PacketSocket { fd })
    }

    fn send(&self, frame: &[u8]) -> Result<()> {
        // SAFETY: the buffer is valid for `frame.len()` bytes.
        let n = unsafe {
            libc::send(
                self.fd.as_raw_fd(),
                frame.as_ptr().cast::<libc::c_void>(),
                frame.len(),
                0,
            )
        };
        if n < 0 {
            return Err(std::io::Error::last_os_error()).context("send(AF_PACKET)");
        }
        Ok(())
    }

    /// One inbound frame, `None` after the poll period without one.
    fn recv_inbound(&self, buf: &mut [u8]) -> Result<Option<usize>> {
        // SAFETY: sockaddr_ll is plain data; all-zero is a valid value.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
        // SAFETY: `buf` and `sll` are valid for the sizes passed.
        let n = unsafe {
            libc::recvfrom(
                self.fd.as_raw_fd(),
                buf.as_mut_ptr().cast::<libc::c_void>(),
                buf.len(),
                0,
                (&raw mut sll).cast::<libc::sockaddr>(),
                &mut len,
            )
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            return match e.kind() {
                std::io::ErrorKind::WouldBlock
                | std::io::ErrorKind::TimedOut
                | std::io::ErrorKind::Interrupted => Ok(None),
                _ => Err(e).context("recvfrom(AF_PACKET)"),
            };
        }
        if sll.sll_pkttype == libc::PACKET_OUTGOING {
            return Ok(None);
        }
        Ok(Some(usize::try_from(n).unwrap_or(0)))
    }
}

/// Sends `probe` out of `iface` in `ns` and returns the TCP segments
/// received within `listen` from the probe's destination address to its
/// source port.
pub fn exchange(ns: &Netns, iface: &str, probe: &Probe, listen: Duration) -> Result<Vec<Segment>> {
    let iface = iface.to_owned();
    let probe = probe.clone();
    nsthread::run_in(ns, "raw-tcp", listen + Duration::from_secs(5), move || {
        let socket = PacketSocket::open(&iface)?;
        socket.send(&probe.frame())?;
        let deadline = Instant::now() + listen;
        let mut seen = Vec::new();
        let mut buf = vec![0u8; 65536];
        while Instant::now() < deadline {
            let Some(n) = socket.recv_inbound(&mut buf)? else {
                continue;
            };
            if let Some(seg) = parse_frame(&buf[..n])
                && seg.src.ip() == probe.dst.ip()
                && seg.dst.port() == probe.src.port()
            {
                seen.push(seg);
            }
        }
        Ok(seen)
    })
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    #[test]
    fn probe_round_trips_through_the_parser() {
        let probe = Probe {
            src_mac: [2, 0, 0, 0, 0, 1],
            dst_mac: [0x52, 0x55, 10, 0, 2, 2],
            src: SocketAddrV4::new(Ipv4Addr::new(10, 0, 2, 15), 40000),
            dst: SocketAddrV4::new(Ipv4Addr::new(198, 51, 100, 2), 80),
            seq: 0xdead_beef,
            ack: 0x1234_5678,
            flags: Flags {
                ack: true,
                psh: true,
                ..Flags::default()
            },
            payload: b"hello".to_vec(),
        };
        let frame = probe.frame();
        let seg = parse_frame(&frame).expect("parses");
        assert_eq!(seg.src, probe.src);
        assert_eq!(seg.dst, probe.dst);
        assert_eq!(seg.seq, 0xdead_beef);
        assert_eq!(seg.ack, 0x1234_5678);
        assert_eq!(seg.flags, probe.flags);
        assert_eq!(seg.payload_len, 5);
        // The checksums smoltcp filled in verify.
        let eth = EthernetFrame::new_checked(&frame[..]).expect("eth");
        let ip = Ipv4Packet::new_checked(eth.payload()).expect("ip");
        assert!(ip.verify_checksum());
        let tcp = TcpPacket::new_checked(ip.payload()).expect("tcp");
        assert!(tcp.verify_checksum(
            &IpAddress::Ipv4(ip.src_addr()),
            &IpAddress::Ipv4(ip.dst_addr())
        ));
        assert_eq!(parse_mac("52:55:0a:00:02:02").expect("mac"), probe.dst_mac);
        assert!(parse_mac("52:55:0a:00:02").is_err());
    }
}
