//! Writing frames to the guest and packets to the world.
//!
//! # Theory of operation
//!
//! Frames for the guest (ARP and DHCP replies, echo replies, later SYN-ACKs,
//! RSTs and ICMP errors) are transmitted on the tap device through an
//! `AF_PACKET` socket bound to it: the tap driver hands a transmitted frame
//! to whoever holds the tap's file descriptor, which is the guest. The
//! socket is bound with protocol 0, so it receives nothing. It is
//! non-blocking: when the device queue is full the writer waits for the
//! socket to become writable instead of dropping the frame. Frames of any
//! length are sent as they are (a 42-byte empty UDP frame is legitimate).
//!
//! Packets for the world (translated SYNs, first datagrams of a flow, RSTs)
//! are IP packets, not frames: they leave through a raw socket with
//! `IP_HDRINCL` (`IPPROTO_RAW`), so the host's own routing table, neighbour
//! cache and egress path pick the interface and the next hop exactly as for
//! any host packet. The writer takes the destination from the packet's own
//! header, and the family from its version nibble: an `AF_INET6` raw socket
//! with `IPPROTO_RAW` takes whole IPv6 packets the same way (the kernel
//! implies `IPV6_HDRINCL`). A host without IPv6 gets no IPv6 socket, and
//! IPv6 packets for the world are refused with an error.

use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use log::trace;
use thiserror::Error;
use tokio::io::unix::AsyncFd;

use smoltcp::wire::{Ipv4Packet, Ipv6Packet};

use crate::iface::Iface;

/// Something the slow path wants sent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Output {
    /// A complete Ethernet frame for the guest (written on the tap).
    ToGuest(Vec<u8>),
    /// An IPv4 or IPv6 packet for the world (sent through the host's
    /// routing).
    ToWorld(Vec<u8>),
}

/// Both inject paths.
pub struct Injectors {
    /// Frames to the guest.
    pub tap: TapWriter,
    /// Packets to the world.
    pub world: WorldWriter,
}

impl Injectors {
    /// Sends one output on its path.
    pub async fn send(&self, out: &Output) -> Result<(), InjectError> {
        match out {
            Output::ToGuest(frame) => self.tap.send(frame).await,
            Output::ToWorld(packet) => self.world.send(packet).await,
        }
    }
}

/// Errors from the writers.
#[derive(Debug, Error)]
pub enum InjectError {
    /// Creating or binding the packet socket failed.
    #[error("opening a {iface} socket: {source}")]
    Open {
        /// Interface name.
        iface: String,
        /// The OS error.
        source: io::Error,
    },
    /// The packet is not an IP packet the writer can send.
    #[error("not a sendable IP packet: {0}")]
    BadPacket(smoltcp::wire::Error),
    /// An IPv6 packet, and the host has no IPv6 raw socket.
    #[error("no IPv6 on this host: cannot send an IPv6 packet")]
    NoIpv6,
    /// Sending a frame failed.
    #[error("sending a {len}-byte frame to the guest: {source}")]
    Send {
        /// Frame length.
        len: usize,
        /// The OS error.
        source: io::Error,
    },
}

/// Sends Ethernet frames to the guest through the tap.
pub struct TapWriter {
    fd: AsyncFd<OwnedFd>,
}

impl TapWriter {
    /// Opens a send-only packet socket bound to `tap` (inside a tokio runtime).
    pub fn open(tap: &Iface) -> Result<Self, InjectError> {
        let open_err = |source| InjectError::Open {
            iface: format!("packet socket on {}", tap.name),
            source,
        };
        // SAFETY: plain socket(2); ownership moves into OwnedFd right away.
        let raw = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                0,
            )
        };
        if raw < 0 {
            return Err(open_err(io::Error::last_os_error()));
        }
        // SAFETY: `raw` is a fresh, valid descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: sockaddr_ll is plain old data.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = 0;
        sll.sll_ifindex = i32::try_from(tap.index)
            .map_err(|_| open_err(io::Error::other("ifindex out of range")))?;
        // SAFETY: binds our socket to a correctly sized sockaddr_ll.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&raw const sll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(open_err(io::Error::last_os_error()));
        }
        let fd = crate::aio::register(fd, tokio::io::Interest::WRITABLE).map_err(open_err)?;
        Ok(Self { fd })
    }

    /// Sends one frame, waiting for room if the device queue is full.
    pub async fn send(&self, frame: &[u8]) -> Result<(), InjectError> {
        send_with(&self.fd, frame, None).await?;
        trace!("sent {} bytes to the guest", frame.len());
        Ok(())
    }
}

/// Sends `buf` on `fd` (to `dest` if given), waiting for room when the
/// socket or the device queue is full.
async fn send_with(
    fd: &AsyncFd<OwnedFd>,
    buf: &[u8],
    dest: Option<(*const libc::sockaddr, libc::socklen_t)>,
) -> Result<(), InjectError> {
    let send_err = |source| InjectError::Send {
        len: buf.len(),
        source,
    };
    let (addr, addr_len) = dest.unwrap_or((std::ptr::null(), 0));
    loop {
        let mut guard = fd.writable().await.map_err(send_err)?;
        let sent = guard.try_io(|fd| {
            // SAFETY: sends from a valid buffer of buf.len() bytes to an
            // address that is either null or a live sockaddr_in/_in6 of
            // addr_len bytes.
            let n = unsafe {
                libc::sendto(
                    fd.as_raw_fd(),
                    buf.as_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                    addr,
                    addr_len,
                )
            };
            if n < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(())
            }
        });
        match sent {
            Ok(Ok(())) => return Ok(()),
            // Device queue full: give it a moment, never drop.
            Ok(Err(e)) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                tokio::task::yield_now().await;
            }
            Ok(Err(e)) => return Err(send_err(e)),
            Err(_would_block) => {}
        }
    }
}

/// Sends IPv4 and IPv6 packets to the world through the host's routing.
pub struct WorldWriter {
    fd: AsyncFd<OwnedFd>,
    /// The IPv6 raw socket, where the host has IPv6.
    fd6: Option<AsyncFd<OwnedFd>>,
}

/// A non-blocking raw socket of `family` with `IPPROTO_RAW`, registered
/// with tokio.
fn raw_socket(family: libc::c_int) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: plain socket(2); ownership moves into OwnedFd right away.
    // IPPROTO_RAW implies IP_HDRINCL (IPV6_HDRINCL): we supply the whole
    // IP header.
    let raw = unsafe {
        libc::socket(
            family,
            libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            libc::IPPROTO_RAW,
        )
    };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh, valid descriptor we own.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    crate::aio::register(fd, tokio::io::Interest::WRITABLE)
}

impl WorldWriter {
    /// Opens the raw sockets (inside a tokio runtime); a host without IPv6
    /// gets only the IPv4 one.
    pub fn open() -> Result<Self, InjectError> {
        let fd = raw_socket(libc::AF_INET).map_err(|source| InjectError::Open {
            iface: "raw IPv4".to_owned(),
            source,
        })?;
        let fd6 = match raw_socket(libc::AF_INET6) {
            Ok(fd) => Some(fd),
            Err(e) => {
                log::warn!("no raw IPv6 socket ({e}): the guest's IPv6 cannot reach the world");
                None
            }
        };
        Ok(Self { fd, fd6 })
    }

    /// Sends one complete IP packet to the destination in its header.
    pub async fn send(&self, packet: &[u8]) -> Result<(), InjectError> {
        if packet.first().map(|b| b >> 4) == Some(6) {
            return self.send6(packet).await;
        }
        let ip = Ipv4Packet::new_checked(packet).map_err(InjectError::BadPacket)?;
        // SAFETY: sockaddr_in is plain old data.
        let mut dest: libc::sockaddr_in = unsafe { std::mem::zeroed() };
        dest.sin_family = libc::AF_INET as libc::sa_family_t;
        dest.sin_addr.s_addr = u32::from_ne_bytes(ip.dst_addr().octets());
        let addr = (
            std::ptr::from_ref(&dest).cast::<libc::sockaddr>(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        );
        send_with(&self.fd, packet, Some(addr)).await?;
        trace!("sent {} bytes to {}", packet.len(), ip.dst_addr());
        Ok(())
    }

    /// [`Self::send`] for an IPv6 packet.
    async fn send6(&self, packet: &[u8]) -> Result<(), InjectError> {
        let ip = Ipv6Packet::new_checked(packet).map_err(InjectError::BadPacket)?;
        let fd = self.fd6.as_ref().ok_or(InjectError::NoIpv6)?;
        // SAFETY: sockaddr_in6 is plain old data.
        let mut dest: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
        dest.sin6_family = libc::AF_INET6 as libc::sa_family_t;
        dest.sin6_addr.s6_addr = ip.dst_addr().octets();
        let addr = (
            std::ptr::from_ref(&dest).cast::<libc::sockaddr>(),
            std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t,
        );
        send_with(fd, packet, Some(addr)).await?;
        trace!("sent {} bytes to {}", packet.len(), ip.dst_addr());
        Ok(())
    }
}
