//! NAT ports and source addresses that can never collide with the host's
//! own sockets.
//!
//! # Theory of operation
//!
//! A translated flow leaves the host from `(host address, NAT port)`. The
//! kernel fast path never consults the socket tables, so nothing would stop
//! a host process from picking the same port for its own connection and
//! having its replies stolen by the flow map (or ours delivered to it). The
//! cure is to make the port *taken* in the host's own eyes for as long as
//! the flow lives: [`SocketPorts::reserve`] creates a TCP (or UDP) socket
//! and `bind`s it to `(local, 0)` without ever listening or connecting. The
//! kernel picks a free port from the ephemeral range, and from then on
//! Linux's port autoselection for `connect()` and `bind(…, 0)` skips it
//! (a bound socket without `SO_REUSEADDR` owns a bind bucket that
//! `__inet_hash_connect` refuses), and an explicit `bind` to it fails with
//! `EADDRINUSE`. The socket lives in the [`NatLease`]; dropping the lease
//! closes it and releases the port. A bound-but-not-listening TCP socket
//! accepts nothing, so a segment that reaches the host stack for that port
//! (one that matched no flow entry) is answered by the host kernel with an
//! RST, as for any closed port. A bound UDP socket would queue stray
//! datagrams, so its receive buffer is shrunk to the minimum; nothing ever
//! reads it and the kernel drops what does not fit.
//!
//! ICMP echo flows need an identifier instead of a port: an unprivileged
//! ICMP ("ping") socket bound to `(local, 0)` reserves one against the
//! host's own ping sockets the same way. Where the host does not allow
//! ping sockets (`net.ipv4.ping_group_range`, which tapgate never
//! changes), identifiers come from an allocator of tapgate's own that only
//! avoids its own flows; a host `ping` using a raw socket with the same
//! identifier towards the same destination at the same time would then
//! see our replies taken (documented, unlikely: 65536 identifiers).
//!
//! [`SocketPorts::source_for`] asks the host's routing which source address
//! it would use towards a destination: a UDP socket `connect`ed to it (no
//! packet is sent) and `getsockname`. A refusal says why, as a router's
//! ICMP would ([`NoRoute`]).
//!
//! [`NatPorts`] is a trait so the flow manager's tests can use a fake.

use std::{
    collections::HashSet,
    fmt,
    net::{IpAddr, SocketAddr},
    os::fd::{AsRawFd, OwnedFd},
    sync::{Arc, Mutex},
};

use datapath_common::{PROTO_ICMP, PROTO_TCP, PROTO_UDP};
use nix::{
    errno::Errno,
    sys::socket::{
        AddressFamily, SockFlag, SockProtocol, SockType, SockaddrStorage, bind, connect,
        getsockname, setsockopt, socket, sockopt,
    },
};
use thiserror::Error;

/// Why the host cannot route towards a destination, as the kernel's route
/// lookup said (and as a Linux router would answer: `ip_error`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NoRoute {
    /// No route at all (`ENETUNREACH`): net unreachable.
    Net,
    /// A route of type `unreachable` (`EHOSTUNREACH`): host unreachable.
    Host,
    /// A route of type `prohibit` (`EACCES`): administratively prohibited.
    Prohibited,
    /// A route of type `blackhole` (`EINVAL`): silently dropped.
    Blackhole,
}

/// Why a NAT port or source address could not be had.
#[derive(Debug, Error)]
pub enum NatError {
    /// Only TCP and UDP ports are reserved.
    #[error("no NAT ports for IP protocol {0}")]
    Protocol(u8),
    /// Every port of the ephemeral range is taken on that address.
    #[error("no free NAT port on {0}")]
    Exhausted(IpAddr),
    /// The host has no route (or no usable source address) towards it.
    #[error("no route to {0} ({1:?})")]
    NoRoute(IpAddr, NoRoute),
    /// A system call failed.
    #[error("{op}: {source}")]
    Os {
        /// What was being done.
        op: &'static str,
        /// The OS error.
        #[source]
        source: Errno,
    },
}

/// A reserved NAT port; the reservation is released when the lease is
/// dropped.
pub struct NatLease {
    port: u16,
    /// Whatever holds the reservation (a bound socket for [`SocketPorts`]).
    _hold: Box<dyn Send>,
}

impl NatLease {
    /// A lease on `port`, held for as long as `hold` lives.
    pub fn new(port: u16, hold: impl Send + 'static) -> Self {
        Self {
            port,
            _hold: Box::new(hold),
        }
    }

    /// The reserved port.
    pub fn port(&self) -> u16 {
        self.port
    }
}

impl fmt::Debug for NatLease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatLease")
            .field("port", &self.port)
            .finish_non_exhaustive()
    }
}

/// Reserves NAT ports and picks source addresses.
pub trait NatPorts {
    /// Reserves a port for `proto` ([`PROTO_TCP`] or [`PROTO_UDP`]) on the
    /// host address `local` that no host socket can take while the lease
    /// lives.
    fn reserve(&mut self, proto: u8, local: IpAddr) -> Result<NatLease, NatError>;

    /// Reserves exactly `port` (a flow adopted from an earlier daemon
    /// keeps its NAT port); an error if it is taken.
    fn hold(&mut self, proto: u8, local: IpAddr, port: u16) -> Result<NatLease, NatError>;

    /// The host address the kernel would use as source towards `remote`.
    fn source_for(&mut self, remote: IpAddr) -> Result<IpAddr, NatError>;
}

/// The real [`NatPorts`]: ports held by bound, never-listening sockets;
/// source addresses from the host's routing.
#[derive(Debug, Default)]
pub struct SocketPorts {
    /// ICMP identifiers handed out without a ping socket.
    icmp_ids: IcmpIds,
}

/// tapgate's own ICMP identifier allocator (used where the host refuses
/// ping sockets): identifiers in use per source address, and where the
/// next search starts.
#[derive(Debug, Default)]
struct IcmpIds {
    live: Arc<Mutex<HashSet<(IpAddr, u16)>>>,
    next: u16,
}

/// Holds one identifier of [`IcmpIds`]; dropping it frees the identifier.
struct IcmpIdHold {
    live: Arc<Mutex<HashSet<(IpAddr, u16)>>>,
    key: (IpAddr, u16),
}

impl Drop for IcmpIdHold {
    fn drop(&mut self) {
        if let Ok(mut live) = self.live.lock() {
            live.remove(&self.key);
        }
    }
}

impl IcmpIds {
    fn hold(&mut self, local: IpAddr, id: u16) -> Result<NatLease, NatError> {
        let mut live = self.live.lock().map_err(|_| NatError::Exhausted(local))?;
        if !live.insert((local, id)) {
            return Err(NatError::Exhausted(local));
        }
        let hold = IcmpIdHold {
            live: self.live.clone(),
            key: (local, id),
        };
        Ok(NatLease::new(id, hold))
    }

    fn reserve(&mut self, local: IpAddr) -> Result<NatLease, NatError> {
        let mut live = self.live.lock().map_err(|_| NatError::Exhausted(local))?;
        if self.next == 0 {
            // Start somewhere else than the host's own pings usually do.
            self.next = (std::process::id() as u16).wrapping_mul(7919) | 1;
        }
        for _ in 0..=u16::MAX {
            let id = self.next;
            self.next = self.next.wrapping_add(1);
            if live.insert((local, id)) {
                let hold = IcmpIdHold {
                    live: self.live.clone(),
                    key: (local, id),
                };
                return Ok(NatLease::new(id, hold));
            }
        }
        Err(NatError::Exhausted(local))
    }
}

impl SocketPorts {
    /// A reserver using the host's socket tables.
    pub fn new() -> Self {
        Self::default()
    }
}

/// Port used for the routing query in [`SocketPorts::source_for`]; any
/// non-zero port does, nothing is sent.
const ROUTE_QUERY_PORT: u16 = 9;

impl NatPorts for SocketPorts {
    fn reserve(&mut self, proto: u8, local: IpAddr) -> Result<NatLease, NatError> {
        self.bind_port(proto, local, 0)
    }

    fn hold(&mut self, proto: u8, local: IpAddr, port: u16) -> Result<NatLease, NatError> {
        self.bind_port(proto, local, port)
    }

    fn source_for(&mut self, remote: IpAddr) -> Result<IpAddr, NatError> {
        self.routed_source(remote)
    }
}

impl SocketPorts {
    /// Binds a socket to `local`:`port` (0: any free port) and returns
    /// the lease holding it.
    fn bind_port(&mut self, proto: u8, local: IpAddr, port: u16) -> Result<NatLease, NatError> {
        let (ty, protocol) = match proto {
            PROTO_TCP => (SockType::Stream, None),
            PROTO_UDP => (SockType::Datagram, None),
            PROTO_ICMP | super::packet::PROTO_ICMPV6 => {
                (SockType::Datagram, Some(SockProtocol::Icmp))
            }
            other => return Err(NatError::Protocol(other)),
        };
        let (family, protocol) = match local {
            IpAddr::V4(_) => (AddressFamily::Inet, protocol),
            IpAddr::V6(_) => (AddressFamily::Inet6, protocol.map(|_| SockProtocol::IcmpV6)),
        };
        let fd: OwnedFd = match socket(family, ty, SockFlag::SOCK_CLOEXEC, protocol) {
            Ok(fd) => fd,
            // Ping sockets not allowed for our group: our own allocator.
            Err(Errno::EACCES | Errno::EPERM)
                if proto == PROTO_ICMP || proto == super::packet::PROTO_ICMPV6 =>
            {
                return if port == 0 {
                    self.icmp_ids.reserve(local)
                } else {
                    self.icmp_ids.hold(local, port)
                };
            }
            Err(source) => {
                return Err(NatError::Os {
                    op: "socket",
                    source,
                });
            }
        };
        // Host-local flows use the gateway's address, which the host does
        // not own, as their NAT source: allow binding it.
        if let Err(e) = setsockopt(&fd, sockopt::IpFreebind, &true) {
            log::debug!("nat: IP_FREEBIND: {e}");
        }
        if ty == SockType::Datagram {
            // (A ping socket too: it would queue the echo replies the
            // kernel fast path did not take.)
            // Nobody reads this socket: keep what strays into it small (the
            // kernel rounds 0 up to its minimum).
            if let Err(e) = setsockopt(&fd, sockopt::RcvBuf, &0) {
                log::debug!("nat: shrinking a UDP port's receive buffer: {e}");
            }
        }
        match bind(
            fd.as_raw_fd(),
            &SockaddrStorage::from(SocketAddr::new(local, port)),
        ) {
            Ok(()) => {}
            Err(Errno::EADDRINUSE) => return Err(NatError::Exhausted(local)),
            Err(Errno::EADDRNOTAVAIL) => return Err(NatError::NoRoute(local, NoRoute::Net)),
            Err(source) => return Err(NatError::Os { op: "bind", source }),
        }
        let bound = bound_addr(&fd)?;
        log::trace!("nat: reserved {bound} proto {proto}");
        Ok(NatLease::new(bound.port(), fd))
    }

    /// The source address the host's routing picks towards `remote`.
    fn routed_source(&mut self, remote: IpAddr) -> Result<IpAddr, NatError> {
        let family = match remote {
            IpAddr::V4(_) => AddressFamily::Inet,
            IpAddr::V6(_) => AddressFamily::Inet6,
        };
        let fd: OwnedFd = socket(family, SockType::Datagram, SockFlag::SOCK_CLOEXEC, None)
            .map_err(|source| NatError::Os {
                op: "socket",
                source,
            })?;
        let dest = SockaddrStorage::from(SocketAddr::new(remote, ROUTE_QUERY_PORT));
        match connect(fd.as_raw_fd(), &dest) {
            Ok(()) => {}
            Err(e @ (Errno::ENETUNREACH | Errno::EHOSTUNREACH | Errno::EINVAL | Errno::EACCES)) => {
                let why = match e {
                    Errno::EHOSTUNREACH => NoRoute::Host,
                    Errno::EACCES => NoRoute::Prohibited,
                    Errno::EINVAL => NoRoute::Blackhole,
                    _ => NoRoute::Net,
                };
                return Err(NatError::NoRoute(remote, why));
            }
            Err(source) => {
                return Err(NatError::Os {
                    op: "connect",
                    source,
                });
            }
        }
        let ip = bound_addr(&fd)?.ip();
        if ip.is_unspecified() {
            return Err(NatError::NoRoute(remote, NoRoute::Net));
        }
        Ok(ip)
    }
}

/// The local address a socket is bound to.
fn bound_addr(fd: &OwnedFd) -> Result<SocketAddr, NatError> {
    let os = |source| NatError::Os {
        op: "getsockname",
        source,
    };
    let st: SockaddrStorage = getsockname(fd.as_raw_fd()).map_err(os)?;
    if let Some(a) = st.as_sockaddr_in() {
        return Ok(SocketAddr::new(IpAddr::V4(a.ip()), a.port()));
    }
    if let Some(a) = st.as_sockaddr_in6() {
        return Ok(SocketAddr::new(IpAddr::V6(a.ip()), a.port()));
    }
    Err(os(Errno::EAFNOSUPPORT))
}

/// Raises the soft limit on open files towards `want` (capped by the hard
/// limit) and returns the resulting soft limit.
///
/// [`SocketPorts`] holds one socket per flow, so a daemon configured for
/// many flows needs more descriptors than the usual soft limit of 1024:
/// call this at startup with `max_flows` plus some headroom, and cap
/// `max_flows` by what it returns.
pub fn raise_nofile_limit(want: u64) -> std::io::Result<u64> {
    // SAFETY: rlimit is plain old data, filled by getrlimit.
    let mut lim: libc::rlimit = unsafe { std::mem::zeroed() };
    // SAFETY: a valid resource and a pointer to a live rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let target = want.min(lim.rlim_max);
    if target > lim.rlim_cur {
        lim.rlim_cur = target;
        // SAFETY: a valid resource and a pointer to a live rlimit.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raw const lim) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(lim.rlim_cur)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::net::Ipv4Addr;
    use std::{
        io::ErrorKind,
        net::{TcpListener, TcpStream, UdpSocket},
    };

    use super::*;

    /// A socket address of either family (test shorthand).
    fn sa4(ip: impl Into<std::net::IpAddr>, port: u16) -> std::net::SocketAddr {
        std::net::SocketAddr::new(ip.into(), port)
    }

    const LO: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

    #[test]
    fn tcp_reservations_differ_and_block_binds() {
        let mut p = SocketPorts::new();
        let a = p.reserve(PROTO_TCP, LO).unwrap();
        let b = p.reserve(PROTO_TCP, LO).unwrap();
        assert_ne!(a.port(), 0);
        assert_ne!(a.port(), b.port());
        for port in [a.port(), b.port()] {
            let err = TcpListener::bind((LO, port)).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::AddrInUse, "port {port}");
            // Binding the wildcard address collides as well.
            let err = TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::AddrInUse, "port {port}");
        }
    }

    #[test]
    fn tcp_release_frees_the_port() {
        let mut p = SocketPorts::new();
        let lease = p.reserve(PROTO_TCP, LO).unwrap();
        let port = lease.port();
        drop(lease);
        let l = TcpListener::bind((LO, port)).unwrap();
        assert_eq!(l.local_addr().unwrap().port(), port);
    }

    #[test]
    fn reserved_tcp_port_refuses_connections() {
        // Bound but not listening: the host kernel answers with an RST.
        let mut p = SocketPorts::new();
        let lease = p.reserve(PROTO_TCP, LO).unwrap();
        let err = TcpStream::connect((LO, lease.port())).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::ConnectionRefused);
    }

    #[test]
    fn udp_reservations_differ_and_block_binds() {
        let mut p = SocketPorts::new();
        let a = p.reserve(PROTO_UDP, LO).unwrap();
        let b = p.reserve(PROTO_UDP, LO).unwrap();
        assert_ne!(a.port(), b.port());
        let err = UdpSocket::bind((LO, a.port())).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::AddrInUse);
        let port = a.port();
        drop(a);
        UdpSocket::bind((LO, port)).unwrap();
    }

    #[test]
    fn other_protocols_are_refused() {
        let mut p = SocketPorts::new();
        assert!(matches!(p.reserve(47, LO), Err(NatError::Protocol(47))));
    }

    #[test]
    fn icmp_identifiers_are_distinct_while_held() {
        // A ping socket where the host allows them, tapgate's allocator
        // where it does not: either way, two live leases differ.
        let mut p = SocketPorts::new();
        let a = p.reserve(PROTO_ICMP, LO).unwrap();
        let b = p.reserve(PROTO_ICMP, LO).unwrap();
        assert_ne!(a.port(), b.port());
        // The allocator alone: a freed identifier can come back, a held one
        // never does.
        let mut ids = IcmpIds::default();
        let x = ids.reserve(LO).unwrap();
        let held = x.port();
        for _ in 0..70_000 {
            let y = ids.reserve(LO).unwrap();
            assert_ne!(y.port(), held);
        }
        drop(x);
        assert!(ids.live.lock().unwrap().is_empty());
    }

    #[test]
    fn a_foreign_address_can_be_reserved_and_is_held() {
        // Host-local flows use the gateway's address, which no interface
        // here has (TEST-NET-3 stands in for it): IP_FREEBIND lets the
        // reservation bind it, and the port is then held like any other.
        let foreign = Ipv4Addr::new(203, 0, 113, 77);
        let mut p = SocketPorts::new();
        let lease = p.reserve(PROTO_TCP, foreign.into()).unwrap();
        let again = std::net::TcpListener::bind(sa4(foreign, lease.port()));
        assert!(again.is_err(), "port {} not held", lease.port());
    }

    #[test]
    fn source_for_loopback_is_loopback() {
        let mut p = SocketPorts::new();
        assert_eq!(p.source_for(LO).unwrap(), LO);
        assert_eq!(
            p.source_for(Ipv4Addr::new(127, 1, 2, 3).into()).unwrap(),
            LO
        );
    }

    #[test]
    fn nofile_limit_never_shrinks() {
        let now = raise_nofile_limit(0).unwrap();
        assert!(now > 0);
        assert_eq!(raise_nofile_limit(now).unwrap(), now);
        assert!(raise_nofile_limit(now + 1).unwrap() >= now);
    }

    #[test]
    fn lease_debug_shows_port() {
        let l = NatLease::new(4242, ());
        assert_eq!(l.port(), 4242);
        assert!(format!("{l:?}").contains("4242"));
    }
}
