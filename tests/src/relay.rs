//! A hypervisor stand-in: two tap devices and a thread copying frames.
//!
//! # Theory of operation
//!
//! A VM monitor such as QEMU holds the file descriptor of a tap device in
//! the host and hands every frame it reads to the guest's virtual NIC (and
//! the other way round). [`TapRelay`] does the same without a VM: the guest
//! side is simply a second tap device in the guest namespace, so the guest's
//! kernel sees a real NIC and tapgate sees a real tap (`tun` driver, not a
//! veth), exactly as with a hypervisor.
//!
//! The relay thread `setns(2)`s itself into the host namespace, opens
//! `/dev/net/tun` and creates the host tap (`TUNSETIFF` with
//! `IFF_TAP | IFF_NO_PI`), then does the same in the guest namespace.
//! `setns` changes only the calling thread, which is why all of this
//! happens in the relay thread and never in a test thread. The taps are not
//! persistent: they vanish when the thread closes the descriptors.
//!
//! [`TapRelay::attach`] is the variant for a tap somebody else created (a
//! CNI plugin's persistent `tap0` in a pod, as QEMU with KubeVirt's
//! `domainAttachmentType: tap` finds it): the host side is a namespace
//! *path* (`/run/netns/...`, `/proc/PID/ns/net`) rather than a [`Netns`],
//! and the thread first checks that the tap exists there, so that
//! `TUNSETIFF` attaches to it instead of creating a new one. Root may
//! attach whatever the tap's owner and group; a tap that another process
//! holds already answers `EBUSY` (single-queue taps take one descriptor),
//! and closing the descriptor leaves a persistent tap in place.
//!
//! The thread then `poll(2)`s both non-blocking tap descriptors plus an
//! eventfd used to stop it. Each readable side is drained (a bounded number
//! of frames per wake-up, into a 64 KiB+ buffer) and every frame is written
//! to the other side; a frame the other side refuses (`EAGAIN`, or `EIO`
//! while its link is down) is dropped and counted, as a NIC would. Counters
//! are exposed through [`RelayStats`] for debugging.
//!
//! `Drop` (or [`TapRelay::stop`]) signals the eventfd and joins the thread,
//! which closes both descriptors and so destroys both taps.

use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sched::{CloneFlags, setns};
use nix::sys::eventfd::{EfdFlags, EventFd};

use crate::netns::Netns;

/// Size of the relay's frame buffer: larger than any frame a tap without
/// offloads can produce (64 KiB MTU plus link-layer header).
pub const FRAME_BUFFER: usize = 65536 + 4096;

/// Maximum frames moved from one side per wake-up, so that one busy side
/// cannot starve the other or the stop signal.
const BATCH: usize = 64;

/// Frame counters of a running relay.
#[derive(Debug, Default)]
pub struct RelayStats {
    /// Frames read from the host tap and written to the guest tap.
    pub host_to_guest: AtomicU64,
    /// Frames read from the guest tap and written to the host tap.
    pub guest_to_host: AtomicU64,
    /// Frames read from the host tap that the guest tap refused.
    pub host_to_guest_dropped: AtomicU64,
    /// Frames read from the guest tap that the host tap refused.
    pub guest_to_host_dropped: AtomicU64,
}

impl RelayStats {
    /// A one-line summary for failure messages.
    pub fn summary(&self) -> String {
        format!(
            "relay: host->guest {} (dropped {}), guest->host {} (dropped {})",
            self.host_to_guest.load(Ordering::Relaxed),
            self.host_to_guest_dropped.load(Ordering::Relaxed),
            self.guest_to_host.load(Ordering::Relaxed),
            self.guest_to_host_dropped.load(Ordering::Relaxed),
        )
    }
}

/// A running relay between a tap in the host namespace and a tap in the
/// guest namespace. Stopped (and both taps destroyed) on drop.
#[derive(Debug)]
pub struct TapRelay {
    stop_flag: Arc<AtomicBool>,
    stop_event: Arc<EventFd>,
    thread: Option<JoinHandle<()>>,
    stats: Arc<RelayStats>,
}

impl TapRelay {
    /// Creates tap `host_tap` in `host` and tap `guest_tap` in `guest` and
    /// starts copying frames between them. The links are left down; bring
    /// them up with `ip link set ... up`.
    pub fn start(host: &Netns, host_tap: &str, guest: &Netns, guest_tap: &str) -> Result<TapRelay> {
        Self::spawn(&host.path(), host_tap, false, guest, guest_tap)
    }

    /// Opens the existing tap `host_tap` in the namespace at `host_ns_path`
    /// (fails if there is no such interface), creates tap `guest_tap` in
    /// `guest` and starts copying frames between them. Only the guest link
    /// is left down.
    pub fn attach(
        host_ns_path: &str,
        host_tap: &str,
        guest: &Netns,
        guest_tap: &str,
    ) -> Result<TapRelay> {
        Self::spawn(host_ns_path, host_tap, true, guest, guest_tap)
    }

    fn spawn(
        host_path: &str,
        host_tap: &str,
        host_exists: bool,
        guest: &Netns,
        guest_tap: &str,
    ) -> Result<TapRelay> {
        for name in [host_tap, guest_tap] {
            if name.is_empty() || name.len() >= libc::IFNAMSIZ {
                bail!("invalid interface name {name:?}");
            }
        }
        let stop_flag = Arc::new(AtomicBool::new(false));
        let stop_event = Arc::new(
            EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
                .context("cannot create eventfd")?,
        );
        let stats = Arc::new(RelayStats::default());
        let (ready_tx, ready_rx) = mpsc::channel::<Result<()>>();
        let thread = {
            let host_path = host_path.to_owned();
            let guest_path = guest.path();
            let host_tap = host_tap.to_owned();
            let guest_tap = guest_tap.to_owned();
            let stop_flag = Arc::clone(&stop_flag);
            let stop_event = Arc::clone(&stop_event);
            let stats = Arc::clone(&stats);
            std::thread::Builder::new()
                .name(format!("relay-{host_tap}-{guest_tap}"))
                .spawn(move || {
                    let taps =
                        open_tap_in(&host_path, &host_tap, host_exists).and_then(|host_fd| {
                            open_tap_in(&guest_path, &guest_tap, false)
                                .map(|guest_fd| (host_fd, guest_fd))
                        });
                    match taps {
                        Ok((host_fd, guest_fd)) => {
                            let _ = ready_tx.send(Ok(()));
                            relay_loop(&host_fd, &guest_fd, &stop_flag, &stop_event, &stats);
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                        }
                    }
                })
                .context("cannot spawn the relay thread")?
        };
        let mut relay = TapRelay {
            stop_flag,
            stop_event,
            thread: Some(thread),
            stats,
        };
        match ready_rx.recv_timeout(Duration::from_secs(10)) {
            Ok(Ok(())) => Ok(relay),
            Ok(Err(e)) => {
                relay.stop();
                Err(e.context(format!("cannot create taps {host_tap}/{guest_tap}")))
            }
            Err(_) => {
                relay.stop();
                bail!("relay thread did not create taps {host_tap}/{guest_tap} within 10 s")
            }
        }
    }

    /// Frame counters.
    pub fn stats(&self) -> &RelayStats {
        &self.stats
    }

    /// Stops the thread and closes both taps (idempotent).
    pub fn stop(&mut self) {
        self.stop_flag.store(true, Ordering::SeqCst);
        let _ = self.stop_event.write(1);
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                log::warn!("relay thread panicked");
            }
            log::debug!("relay stopped; {}", self.stats.summary());
        }
    }
}

impl Drop for TapRelay {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Moves the calling thread into the namespace bind-mounted at `ns_path` and
/// creates tap `name` there, or attaches to the existing tap `name` when
/// `must_exist`; returns its non-blocking descriptor.
fn open_tap_in(ns_path: &str, name: &str, must_exist: bool) -> Result<File> {
    let ns = File::open(ns_path).with_context(|| format!("cannot open {ns_path}"))?;
    setns(ns.as_fd(), CloneFlags::CLONE_NEWNET)
        .with_context(|| format!("setns({ns_path}) failed"))?;
    if must_exist && nix::net::if_::if_nametoindex(name).is_err() {
        bail!("there is no interface {name} in {ns_path} to attach to");
    }
    let tun = File::options()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open("/dev/net/tun")
        .context("cannot open /dev/net/tun")?;
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    ifr.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short;
    // SAFETY: TUNSETIFF reads and writes a `struct ifreq`, which `ifr` is;
    // the descriptor is valid for the duration of the call.
    let rc = unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF, &mut ifr) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("TUNSETIFF {name} in {ns_path} failed"));
    }
    Ok(tun)
}

fn relay_loop(
    host: &File,
    guest: &File,
    stop_flag: &AtomicBool,
    stop_event: &EventFd,
    stats: &RelayStats,
) {
    let mut buf = vec![0u8; FRAME_BUFFER];
    let bad = PollFlags::POLLERR | PollFlags::POLLHUP | PollFlags::POLLNVAL;
    while !stop_flag.load(Ordering::SeqCst) {
        let mut fds = [
            PollFd::new(host.as_fd(), PollFlags::POLLIN),
            PollFd::new(guest.as_fd(), PollFlags::POLLIN),
            PollFd::new(stop_event.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, PollTimeout::from(500u16)) {
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => {
                log::error!("relay: poll failed: {e}");
                return;
            }
        }
        let revents: Vec<PollFlags> = fds
            .iter()
            .map(|fd| fd.revents().unwrap_or(PollFlags::empty()))
            .collect();
        if !revents[2].is_empty() {
            return;
        }
        if revents[0].intersects(bad) || revents[1].intersects(bad) {
            log::error!(
                "relay: tap error/hangup ({:?}, {:?})",
                revents[0],
                revents[1]
            );
            return;
        }
        if revents[0].contains(PollFlags::POLLIN) {
            pump(
                host,
                guest,
                &mut buf,
                &stats.host_to_guest,
                &stats.host_to_guest_dropped,
            );
        }
        if revents[1].contains(PollFlags::POLLIN) {
            pump(
                guest,
                host,
                &mut buf,
                &stats.guest_to_host,
                &stats.guest_to_host_dropped,
            );
        }
    }
}

/// Moves up to [`BATCH`] frames from `from` to `to`.
fn pump(from: &File, to: &File, buf: &mut [u8], sent: &AtomicU64, dropped: &AtomicU64) {
    let mut reader = from;
    let mut writer = to;
    for _ in 0..BATCH {
        let len = match reader.read(buf) {
            Ok(0) => return,
            Ok(len) => len,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => {
                log::warn!("relay: read failed: {e}");
                return;
            }
        };
        match writer.write(&buf[..len]) {
            // A tap write takes a whole frame or fails.
            Ok(written) if written == len => {
                sent.fetch_add(1, Ordering::Relaxed);
            }
            Ok(written) => {
                log::warn!("relay: short write ({written} of {len} bytes)");
                dropped.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                // EAGAIN (queue full) or EIO (link down): drop the frame.
                log::trace!("relay: dropped a {len}-byte frame: {e}");
                dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}
