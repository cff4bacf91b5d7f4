//! Network interface lookups in the current network namespace.
//!
//! # Theory of operation
//!
//! Everything here asks the kernel of the namespace tapgate runs in: names
//! resolve through `if_nametoindex`, the MTU through `SIOCGIFMTU`, and the
//! default route through `/proc/thread-self/net/route` (per network
//! namespace, and per thread: a thread may have entered another one).
//! Nothing reads `/sys/class/net`, which shows the namespace `/sys` was
//! mounted in rather than the one the process is in.

use std::{ffi::CString, fs, io, net::Ipv4Addr};

use thiserror::Error;

/// Errors from interface lookups.
#[derive(Debug, Error)]
pub enum IfaceError {
    /// No interface of that name in this namespace.
    #[error("interface \"{0}\" not found")]
    NotFound(String),
    /// The name cannot be an interface name.
    #[error("invalid interface name \"{0}\"")]
    BadName(String),
    /// No IPv4 default route to pick an uplink from.
    #[error("no IPv4 default route in this network namespace; name the uplink with --uplink")]
    NoDefaultRoute,
    /// A system call failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The OS error.
        source: io::Error,
    },
}

/// An interface resolved in this namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Iface {
    /// Its name.
    pub name: String,
    /// Its index.
    pub index: u32,
}

impl Iface {
    /// Resolves `name`, failing with [`IfaceError::NotFound`] if it is absent.
    pub fn by_name(name: &str) -> Result<Self, IfaceError> {
        if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains(['/', ' ', '\0']) {
            return Err(IfaceError::BadName(name.to_owned()));
        }
        let index = nix::net::if_::if_nametoindex(name)
            .map_err(|_| IfaceError::NotFound(name.to_owned()))?;
        Ok(Self {
            name: name.to_owned(),
            index,
        })
    }

    /// The interface's MTU.
    pub fn mtu(&self) -> Result<u32, IfaceError> {
        let io_err = |source| IfaceError::Io {
            what: format!("reading the MTU of {}", self.name),
            source,
        };
        let name =
            CString::new(self.name.as_str()).map_err(|_| IfaceError::BadName(self.name.clone()))?;
        // SAFETY: plain socket(2) call; the fd is closed below.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(io_err(io::Error::last_os_error()));
        }
        // SAFETY: ifreq is plain old data; zeroed is a valid value.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in req.ifr_name.iter_mut().zip(name.as_bytes()) {
            *dst = *src as libc::c_char;
        }
        // SAFETY: SIOCGIFMTU reads ifr_name and writes ifr_mtu in `req`.
        let rc = unsafe { libc::ioctl(fd, libc::SIOCGIFMTU, &mut req) };
        let err = io::Error::last_os_error();
        // SAFETY: fd is ours and open.
        unsafe { libc::close(fd) };
        if rc < 0 {
            return Err(io_err(err));
        }
        // SAFETY: the kernel filled ifru_mtu for SIOCGIFMTU.
        let mtu = unsafe { req.ifr_ifru.ifru_mtu };
        u32::try_from(mtu).map_err(|_| io_err(io::Error::other("negative MTU")))
    }
}

/// The name of the interface holding the IPv4 default route in the calling
/// thread's network namespace.
///
/// `/proc/net` is `/proc/self/net`, which shows the namespace of the
/// process's main thread; a thread that entered another namespace with
/// `setns(2)` (the CNI plugin, the agent) must read
/// `/proc/thread-self/net/route` instead. Kernels without `thread-self`
/// (before 3.17) fall back to `/proc/net/route`.
pub fn default_route_iface() -> Result<String, IfaceError> {
    let table = fs::read_to_string("/proc/thread-self/net/route")
        .or_else(|_| fs::read_to_string("/proc/net/route"))
        .map_err(|source| IfaceError::Io {
            what: "reading /proc/thread-self/net/route".into(),
            source,
        })?;
    parse_default_route(&table).ok_or(IfaceError::NoDefaultRoute)
}

/// Picks the default route's interface from the text of `/proc/net/route`
/// (lowest metric wins).
fn parse_default_route(table: &str) -> Option<String> {
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            // Iface Destination Gateway Flags RefCnt Use Metric Mask ...
            let (iface, dest, flags, metric, mask) =
                (f.first()?, f.get(1)?, f.get(3)?, f.get(6)?, f.get(7)?);
            let up = u32::from_str_radix(flags, 16).ok()? & 0x1 != 0;
            (up && *dest == "00000000" && *mask == "00000000")
                .then(|| Some((metric.parse::<u32>().ok()?, (*iface).to_owned())))?
        })
        .min_by_key(|(metric, _)| *metric)
        .map(|(_, iface)| iface)
}

/// Whether `ip` is an IPv4 address usable as a unicast host address.
pub fn is_unicast(ip: Ipv4Addr) -> bool {
    !(ip.is_unspecified() || ip.is_broadcast() || ip.is_multicast() || ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    const TABLE: &str = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
        eth1\t00000000\t0102A8C0\t0003\t0\t0\t200\t00000000\t0\t0\t0\n\
        eth0\t00000000\t0101A8C0\t0003\t0\t0\t100\t00000000\t0\t0\t0\n\
        eth0\t0001A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n";

    #[test]
    fn default_route_lowest_metric() {
        assert_eq!(parse_default_route(TABLE).as_deref(), Some("eth0"));
    }

    #[test]
    fn no_default_route() {
        let t = "Iface\tDestination\tGateway\tFlags\tRefCnt\tUse\tMetric\tMask\n\
                 eth0\t0001A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\n";
        assert_eq!(parse_default_route(t), None);
        assert_eq!(parse_default_route(""), None);
        assert_eq!(parse_default_route("garbage\nline with few fields"), None);
    }

    #[test]
    fn bad_names_rejected() {
        assert!(matches!(Iface::by_name(""), Err(IfaceError::BadName(_))));
        assert!(matches!(Iface::by_name("a/b"), Err(IfaceError::BadName(_))));
        assert!(matches!(
            Iface::by_name("averyveryverylongname"),
            Err(IfaceError::BadName(_))
        ));
        assert!(matches!(
            Iface::by_name("tgnosuch9"),
            Err(IfaceError::NotFound(_))
        ));
    }

    #[test]
    fn loopback_mtu_readable() {
        let lo = Iface::by_name("lo").expect("lo exists");
        assert!(lo.mtu().expect("mtu") >= 1280);
    }
}
