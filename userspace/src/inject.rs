//! Writing frames to the guest.
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

use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use log::trace;
use thiserror::Error;
use tokio::io::unix::AsyncFd;

use crate::iface::Iface;

/// Errors from the tap writer.
#[derive(Debug, Error)]
pub enum InjectError {
    /// Creating or binding the packet socket failed.
    #[error("opening a packet socket on {iface}: {source}")]
    Open {
        /// Interface name.
        iface: String,
        /// The OS error.
        source: io::Error,
    },
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
            iface: tap.name.clone(),
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
        loop {
            let mut guard = self
                .fd
                .writable()
                .await
                .map_err(|source| InjectError::Send {
                    len: frame.len(),
                    source,
                })?;
            match guard.try_io(|fd| {
                // SAFETY: sends from a valid buffer of frame.len() bytes.
                let n = unsafe {
                    libc::send(
                        fd.as_raw_fd(),
                        frame.as_ptr().cast(),
                        frame.len(),
                        libc::MSG_DONTWAIT,
                    )
                };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(())
                }
            }) {
                Ok(Ok(())) => {
                    trace!("sent {} bytes to the guest", frame.len());
                    return Ok(());
                }
                Ok(Err(e)) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                    tokio::task::yield_now().await;
                }
                Ok(Err(source)) => {
                    return Err(InjectError::Send {
                        len: frame.len(),
                        source,
                    });
                }
                Err(_would_block) => continue,
            }
        }
    }
}
