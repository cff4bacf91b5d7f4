//! Creating and removing the pod's tap, inside the pod's network namespace.
//!
//! # Theory of operation
//!
//! `setns(CLONE_NEWNET)` moves only the calling thread, so every operation
//! here runs on a short-lived helper thread ([`in_netns`]) that opens the
//! namespace file (`CNI_NETNS`), enters it and does its work there; the
//! plugin's main thread never changes namespace. Everything is done with
//! ioctls and one netlink message, never by running `ip` (a runtime's
//! environment need not have it):
//!
//! * create: `TUNSETIFF` on `/dev/net/tun` with
//!   `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR` (what QEMU with vhost-net opens;
//!   `IFF_MULTI_QUEUE` on request), `TUNSETOWNER`/`TUNSETGROUP`, the MTU
//!   and `IFF_UP` through an `AF_INET` socket made in the namespace, and
//!   `TUNSETPERSIST` last, so that a failure half-way leaves nothing: the
//!   tap dies with the descriptor until it is made persistent;
//! * reuse: an existing interface of that name is accepted only if the
//!   ethtool driver info says it is a tap (driver `tun`, bus `tap`); it
//!   gets the same owner, MTU and flags again. If the hypervisor already
//!   holds it (`EBUSY` on attach) it is left as it is;
//! * remove: `RTM_DELLINK` by index over rtnetlink, which works whether or
//!   not a hypervisor still holds the tap. A vanished namespace or tap is
//!   not an error ([`Removed`] says which case it was), and an interface of
//!   that name that is not a tap is left alone.
//!
//! When the configuration names no MTU the tap takes the MTU of the pod's
//! uplink (the configured one, else the IPv4 default route's interface),
//! read inside the namespace.

use std::{
    fs::{File, OpenOptions},
    io,
    os::{
        fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd},
        unix::fs::OpenOptionsExt,
    },
    path::{Path, PathBuf},
};

use nix::sched::{CloneFlags, setns};
use thiserror::Error;

use crate::iface;

/// Why a tap operation failed.
#[derive(Debug, Error)]
pub enum TapError {
    /// The namespace file does not exist (any more).
    #[error("network namespace {} does not exist", .0.display())]
    NetnsGone(PathBuf),
    /// The namespace could not be opened or entered.
    #[error("cannot enter network namespace {}: {source}", path.display())]
    Netns {
        /// The namespace file.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// An interface of that name exists and is not a tap.
    #[error("interface {0} exists and is not a tap")]
    NotATap(String),
    /// No MTU configured and no uplink to take it from.
    #[error("no tap MTU configured and none to take from the uplink: {0}")]
    NoUplink(iface::IfaceError),
    /// A system call failed.
    #[error("{what}: {source}")]
    Sys {
        /// What was being done.
        what: String,
        /// The error.
        source: io::Error,
    },
}

fn sys(what: impl Into<String>) -> impl FnOnce(io::Error) -> TapError {
    let what = what.into();
    move |source| TapError::Sys { what, source }
}

/// How to create the tap.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TapSpec {
    /// Its name (`CNI_IFNAME`).
    pub name: String,
    /// The uid allowed to open it.
    pub owner: Option<u32>,
    /// The gid allowed to open it.
    pub group: Option<u32>,
    /// Its MTU; `None` = the uplink's.
    pub mtu: Option<u32>,
    /// `IFF_MULTI_QUEUE`.
    pub multi_queue: bool,
    /// The uplink to take the MTU from (`None`: the default route's).
    pub uplink: Option<String>,
}

/// The tap as it is after [`ensure`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TapInfo {
    /// Its MAC address, `aa:bb:cc:dd:ee:ff`.
    pub mac: String,
    /// Its MTU.
    pub mtu: u32,
    /// Whether this call created it (rather than reusing one).
    pub created: bool,
}

/// What [`remove`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Removed {
    /// The tap was deleted.
    Deleted,
    /// There was no interface of that name.
    Absent,
    /// The namespace is gone (and the tap with it).
    NetnsGone,
    /// The interface is not a tap; it was left alone.
    NotATap,
}

/// Runs `f` on a helper thread inside the network namespace `netns`.
pub fn in_netns<T, F>(netns: &Path, f: F) -> Result<T, TapError>
where
    T: Send,
    F: FnOnce() -> Result<T, TapError> + Send,
{
    let file = File::open(netns).map_err(|source| {
        if source.kind() == io::ErrorKind::NotFound {
            TapError::NetnsGone(netns.to_owned())
        } else {
            TapError::Netns {
                path: netns.to_owned(),
                source,
            }
        }
    })?;
    std::thread::scope(|s| {
        s.spawn(move || {
            setns(file.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|e| TapError::Netns {
                path: netns.to_owned(),
                source: e.into(),
            })?;
            f()
        })
        .join()
        .unwrap_or_else(|_| {
            Err(TapError::Sys {
                what: "namespace helper thread".into(),
                source: io::Error::other("panicked"),
            })
        })
    })
}

/// Creates the tap in `netns`, or reuses the tap of that name there.
pub fn ensure(netns: &Path, spec: &TapSpec) -> Result<TapInfo, TapError> {
    in_netns(netns, || ensure_here(spec))
}

/// Removes tap `name` from `netns`.
pub fn remove(netns: &Path, name: &str) -> Result<Removed, TapError> {
    match in_netns(netns, || remove_here(name)) {
        Err(TapError::NetnsGone(_)) => Ok(Removed::NetnsGone),
        other => other,
    }
}

/// Whether a tap named `name` exists in `netns` (`false` also when the
/// namespace is gone).
pub fn exists(netns: &Path, name: &str) -> Result<bool, TapError> {
    match in_netns(netns, || {
        let sock = ctl_socket()?;
        Ok(ifindex(name).is_some() && is_tap(&sock, name)?)
    }) {
        Err(TapError::NetnsGone(_)) => Ok(false),
        other => other,
    }
}

fn ensure_here(spec: &TapSpec) -> Result<TapInfo, TapError> {
    let name = spec.name.as_str();
    let sock = ctl_socket()?;
    let existed = ifindex(name).is_some();
    if existed && !is_tap(&sock, name)? {
        return Err(TapError::NotATap(name.to_owned()));
    }
    let mtu = match spec.mtu {
        Some(m) => m,
        None => uplink_mtu(spec.uplink.as_deref())?,
    };
    let tun = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/net/tun")
        .map_err(sys("opening /dev/net/tun"))?;
    let mut flags = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
    if spec.multi_queue {
        flags |= libc::IFF_MULTI_QUEUE;
    }
    let mut ifr = ifreq(name);
    ifr.ifr_ifru.ifru_flags = flags as libc::c_short;
    // SAFETY: TUNSETIFF reads and writes a `struct ifreq`, which `ifr` is.
    let rc = unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF, &mut ifr) };
    if rc < 0 {
        let err = io::Error::last_os_error();
        if existed && err.raw_os_error() == Some(libc::EBUSY) {
            // The hypervisor holds it already: it is in use as configured.
            log::info!("tap {name} exists and is in use; reusing it as it is");
            return Ok(TapInfo {
                mac: mac_of(&sock, name)?,
                mtu: mtu_of(&sock, name)?,
                created: false,
            });
        }
        let what = if existed && err.raw_os_error() == Some(libc::EINVAL) {
            format!("attaching to the existing tap {name} (created with other flags: multiQueue?)")
        } else {
            format!("creating tap {name} (TUNSETIFF)")
        };
        return Err(sys(what)(err));
    }
    if let Some(uid) = spec.owner {
        tun_set(&tun, libc::TUNSETOWNER, uid, "TUNSETOWNER", name)?;
    }
    if let Some(gid) = spec.group {
        tun_set(&tun, libc::TUNSETGROUP, gid, "TUNSETGROUP", name)?;
    }
    set_mtu(&sock, name, mtu)?;
    set_up(&sock, name)?;
    tun_set(&tun, libc::TUNSETPERSIST, 1, "TUNSETPERSIST", name)?;
    let mac = mac_of(&sock, name)?;
    log::info!(
        "tap {name} {} (mtu {mtu}, mac {mac})",
        if existed { "reused" } else { "created" }
    );
    Ok(TapInfo {
        mac,
        mtu,
        created: !existed,
    })
}

fn remove_here(name: &str) -> Result<Removed, TapError> {
    let sock = ctl_socket()?;
    let Some(index) = ifindex(name) else {
        return Ok(Removed::Absent);
    };
    if !is_tap(&sock, name)? {
        return Ok(Removed::NotATap);
    }
    match del_link(index) {
        Ok(()) => Ok(Removed::Deleted),
        Err(e) if e.raw_os_error() == Some(libc::ENODEV) => Ok(Removed::Absent),
        Err(e) => Err(sys(format!("deleting tap {name} (RTM_DELLINK)"))(e)),
    }
}

/// The MTU of `uplink` (or of the default route's interface).
fn uplink_mtu(uplink: Option<&str>) -> Result<u32, TapError> {
    let name = match uplink {
        Some(u) if u != "auto" => u.to_owned(),
        _ => iface::default_route_iface().map_err(TapError::NoUplink)?,
    };
    iface::Iface::by_name(&name)
        .and_then(|i| i.mtu())
        .map_err(TapError::NoUplink)
}

fn ifindex(name: &str) -> Option<u32> {
    nix::net::if_::if_nametoindex(name).ok()
}

fn ctl_socket() -> Result<OwnedFd, TapError> {
    // SAFETY: plain socket(2); the descriptor is owned right away.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(sys("creating a control socket")(io::Error::last_os_error()));
    }
    // SAFETY: fd is a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn ifreq(name: &str) -> libc::ifreq {
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in ifr
        .ifr_name
        .iter_mut()
        .take(libc::IFNAMSIZ - 1)
        .zip(name.bytes())
    {
        *dst = src as libc::c_char;
    }
    ifr
}

/// An ioctl on `fd` with a `struct ifreq` for `name`.
fn ifreq_ioctl(
    fd: RawFd,
    req: libc::Ioctl,
    ifr: &mut libc::ifreq,
    what: &str,
) -> Result<(), TapError> {
    // SAFETY: every request used here reads and/or writes a `struct ifreq`
    // (or, for SIOCETHTOOL, the buffer its ifr_data points to).
    let rc = unsafe { libc::ioctl(fd, req, ifr as *mut libc::ifreq) };
    if rc < 0 {
        return Err(sys(what)(io::Error::last_os_error()));
    }
    Ok(())
}

fn tun_set(
    tun: &File,
    req: libc::Ioctl,
    value: u32,
    what: &str,
    name: &str,
) -> Result<(), TapError> {
    // SAFETY: these TUN ioctls take their argument by value.
    let rc = unsafe { libc::ioctl(tun.as_raw_fd(), req, libc::c_ulong::from(value)) };
    if rc < 0 {
        return Err(sys(format!("{what} {value} on {name}"))(
            io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// `struct ethtool_drvinfo`.
#[repr(C)]
struct DrvInfo {
    cmd: u32,
    driver: [u8; 32],
    version: [u8; 32],
    fw_version: [u8; 32],
    bus_info: [u8; 32],
    erom_version: [u8; 32],
    reserved2: [u8; 12],
    n_priv_flags: u32,
    n_stats: u32,
    testinfo_len: u32,
    eedump_len: u32,
    regdump_len: u32,
}

const ETHTOOL_GDRVINFO: u32 = 0x3;

/// Whether `name` is a tap: the tun driver reports bus `tap` for taps and
/// `tun` for tun devices.
fn is_tap(sock: &OwnedFd, name: &str) -> Result<bool, TapError> {
    // SAFETY: DrvInfo is plain old data; all-zero is a valid value.
    let mut info: DrvInfo = unsafe { std::mem::zeroed() };
    info.cmd = ETHTOOL_GDRVINFO;
    let mut ifr = ifreq(name);
    ifr.ifr_ifru.ifru_data = (&raw mut info).cast::<libc::c_char>();
    // SAFETY: SIOCETHTOOL with ETHTOOL_GDRVINFO fills the DrvInfo that
    // ifr_data points to, which lives until the call returns.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCETHTOOL, &mut ifr) };
    if rc < 0 {
        let err = io::Error::last_os_error();
        // Drivers without ethtool support are not taps.
        if err.raw_os_error() == Some(libc::EOPNOTSUPP) {
            return Ok(false);
        }
        return Err(sys(format!("reading the driver of {name}"))(err));
    }
    let text = |b: &[u8]| {
        let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
        String::from_utf8_lossy(&b[..end]).into_owned()
    };
    Ok(text(&info.driver) == "tun" && text(&info.bus_info) == "tap")
}

fn mtu_of(sock: &OwnedFd, name: &str) -> Result<u32, TapError> {
    let mut ifr = ifreq(name);
    ifreq_ioctl(
        sock.as_raw_fd(),
        libc::SIOCGIFMTU,
        &mut ifr,
        "reading the tap's MTU",
    )?;
    // SAFETY: the kernel filled ifru_mtu.
    let mtu = unsafe { ifr.ifr_ifru.ifru_mtu };
    u32::try_from(mtu).map_err(|_| sys("reading the tap's MTU")(io::Error::other("negative")))
}

fn set_mtu(sock: &OwnedFd, name: &str, mtu: u32) -> Result<(), TapError> {
    let mut ifr = ifreq(name);
    ifr.ifr_ifru.ifru_mtu = libc::c_int::try_from(mtu)
        .map_err(|_| sys("setting the MTU")(io::Error::other("MTU out of range")))?;
    ifreq_ioctl(
        sock.as_raw_fd(),
        libc::SIOCSIFMTU,
        &mut ifr,
        &format!("setting the MTU of {name} to {mtu}"),
    )
}

fn set_up(sock: &OwnedFd, name: &str) -> Result<(), TapError> {
    let mut ifr = ifreq(name);
    let what = format!("bringing {name} up");
    ifreq_ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut ifr, &what)?;
    // SAFETY: the kernel filled ifru_flags.
    unsafe { ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
    ifreq_ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &mut ifr, &what)
}

fn mac_of(sock: &OwnedFd, name: &str) -> Result<String, TapError> {
    let mut ifr = ifreq(name);
    ifreq_ioctl(
        sock.as_raw_fd(),
        libc::SIOCGIFHWADDR,
        &mut ifr,
        &format!("reading the MAC of {name}"),
    )?;
    // SAFETY: the kernel filled ifru_hwaddr.
    let data = unsafe { ifr.ifr_ifru.ifru_hwaddr.sa_data };
    Ok(data[..6]
        .iter()
        .map(|&b| format!("{:02x}", b as u8))
        .collect::<Vec<_>>()
        .join(":"))
}

/// Deletes link `index` with one `RTM_DELLINK` and waits for the ack.
fn del_link(index: u32) -> io::Result<()> {
    #[repr(C)]
    struct Req {
        hdr: libc::nlmsghdr,
        ifi: libc::ifinfomsg,
    }
    // SAFETY: plain socket(2); owned right away.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is fresh and ours.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let tv = libc::timeval {
        tv_sec: 5,
        tv_usec: 0,
    };
    // SAFETY: SO_RCVTIMEO takes a timeval of the given size.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&raw const tv).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    // SAFETY: Req is plain old data; all-zero is a valid value.
    let mut req: Req = unsafe { std::mem::zeroed() };
    req.hdr.nlmsg_len = std::mem::size_of::<Req>() as u32;
    req.hdr.nlmsg_type = libc::RTM_DELLINK;
    req.hdr.nlmsg_flags = (libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16;
    req.hdr.nlmsg_seq = 1;
    req.ifi.ifi_family = libc::AF_UNSPEC as u8;
    req.ifi.ifi_index =
        libc::c_int::try_from(index).map_err(|_| io::Error::other("interface index too large"))?;
    // SAFETY: sends the bytes of `req`, which outlives the call.
    let n = unsafe {
        libc::send(
            fd.as_raw_fd(),
            (&raw const req).cast(),
            std::mem::size_of::<Req>(),
            0,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut buf = [0u8; 4096];
    // SAFETY: receives into `buf`, within its length.
    let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let n = usize::try_from(n).unwrap_or(0);
    // nlmsghdr (16 bytes), then for NLMSG_ERROR the (negative) errno.
    let hdr_len = std::mem::size_of::<libc::nlmsghdr>();
    if n < hdr_len + 4 {
        return Err(io::Error::other("short netlink answer"));
    }
    let msg_type = u16::from_ne_bytes([buf[4], buf[5]]);
    if msg_type != libc::NLMSG_ERROR as u16 {
        return Err(io::Error::other(format!(
            "unexpected netlink answer type {msg_type}"
        )));
    }
    let errno = i32::from_ne_bytes([
        buf[hdr_len],
        buf[hdr_len + 1],
        buf[hdr_len + 2],
        buf[hdr_len + 3],
    ]);
    if errno == 0 {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(-errno))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn missing_netns_is_gone() {
        let p = Path::new("/run/netns/tapgate-cni-test-does-not-exist");
        assert!(matches!(
            ensure(p, &TapSpec::default()),
            Err(TapError::NetnsGone(_))
        ));
        assert_eq!(remove(p, "tap0").unwrap(), Removed::NetnsGone);
        assert!(!exists(p, "tap0").unwrap());
    }

    #[test]
    fn ifreq_truncates_long_names() {
        let ifr = ifreq("a-name-that-is-far-too-long");
        assert_eq!(ifr.ifr_name[libc::IFNAMSIZ - 1], 0);
    }
}
