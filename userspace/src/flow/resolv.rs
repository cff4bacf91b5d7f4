//! Finding the upstream resolver for the DNS forwarder.
//!
//! # Theory of operation
//!
//! The guest's DNS server is a virtual address of the gateway (`10.0.2.3`
//! by default); its queries become flows whose real destination is an
//! upstream resolver reachable through the uplink. The upstream is the
//! `--dns-upstream` flag if given, else the first IPv4 `nameserver` of
//! `/etc/resolv.conf`.
//!
//! A loopback upstream (systemd-resolved's stub `127.0.0.53`, a local
//! dnsmasq) cannot be reached through the uplink. For the systemd stub the
//! real upstreams are listed in `/run/systemd/resolve/resolv.conf`; the
//! first usable IPv4 one there is taken. Otherwise DNS is unavailable: a
//! warning is logged and the guest's queries are refused (ICMP port
//! unreachable for UDP, RST for TCP) rather than silently lost.
//!
//! The parser follows resolv.conf(5): one keyword per line, `#` or `;`
//! start a comment line, the address is the first word after `nameserver`
//! (IPv6 and scoped addresses are skipped for the IPv4 DNS address). The
//! IPv6 DNS address is served by the first global IPv6 `nameserver`, if
//! any ([`resolve_upstream6`]): NAT cannot turn an IPv6 query into an
//! IPv4 one.

use std::{
    io,
    net::{Ipv4Addr, Ipv6Addr},
    path::Path,
};

use log::{info, warn};

/// The system resolver configuration.
pub const RESOLV_CONF: &str = "/etc/resolv.conf";

/// systemd-resolved's list of its real upstream servers.
pub const RESOLVED_UPSTREAM_CONF: &str = "/run/systemd/resolve/resolv.conf";

/// The IPv4 `nameserver` addresses of a resolv.conf text, in order.
pub fn ipv4_nameservers(text: &str) -> Vec<Ipv4Addr> {
    text.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            if words.next()? != "nameserver" {
                return None;
            }
            words.next()?.parse::<Ipv4Addr>().ok()
        })
        .collect()
}

/// Whether `ip` can be an upstream reached through the uplink (not
/// loopback, unspecified, broadcast or multicast).
pub fn is_usable_upstream(ip: Ipv4Addr) -> bool {
    !(ip.is_loopback() || ip.is_unspecified() || ip.is_broadcast() || ip.is_multicast())
}

/// The upstream resolver: `flag` if given, else from [`RESOLV_CONF`] (see
/// the module documentation); `None`, with a warning, when there is no
/// usable one.
pub fn resolve_upstream(flag: Option<Ipv4Addr>) -> Option<Ipv4Addr> {
    resolve_upstream_with(flag, |p| std::fs::read_to_string(p))
}

/// [`resolve_upstream`] reading files through `read`.
pub fn resolve_upstream_with(
    flag: Option<Ipv4Addr>,
    read: impl Fn(&Path) -> io::Result<String>,
) -> Option<Ipv4Addr> {
    if let Some(ip) = flag {
        if is_usable_upstream(ip) {
            return Some(ip);
        }
        warn!("dns: upstream {ip} cannot be reached through the uplink; DNS is unavailable");
        return None;
    }
    let text = match read(Path::new(RESOLV_CONF)) {
        Ok(t) => t,
        Err(e) => {
            warn!("dns: reading {RESOLV_CONF}: {e}; DNS is unavailable");
            return None;
        }
    };
    let Some(&first) = ipv4_nameservers(&text).first() else {
        warn!("dns: no IPv4 nameserver in {RESOLV_CONF}; DNS is unavailable");
        return None;
    };
    if is_usable_upstream(first) {
        info!("dns: upstream {first} (from {RESOLV_CONF})");
        return Some(first);
    }
    // A local stub: systemd-resolved lists the servers it forwards to.
    let real = read(Path::new(RESOLVED_UPSTREAM_CONF)).ok().and_then(|t| {
        ipv4_nameservers(&t)
            .into_iter()
            .find(|ip| is_usable_upstream(*ip))
    });
    match real {
        Some(ip) => {
            info!(
                "dns: {RESOLV_CONF} names the local stub {first}; upstream {ip} (from {RESOLVED_UPSTREAM_CONF})"
            );
            Some(ip)
        }
        None => {
            warn!(
                "dns: the nameserver {first} of {RESOLV_CONF} is a loopback address, \
                 unreachable through the uplink; DNS is unavailable (use --dns-upstream)"
            );
            None
        }
    }
}

/// The usable IPv6 `nameserver` addresses of a resolv.conf text, in order
/// (no loopback, link-local with a scope, multicast or IPv4-mapped).
pub fn ipv6_nameservers(text: &str) -> Vec<Ipv6Addr> {
    text.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            if words.next()? != "nameserver" {
                return None;
            }
            words.next()?.parse::<Ipv6Addr>().ok()
        })
        .filter(|ip| {
            !(ip.is_loopback()
                || ip.is_unspecified()
                || ip.is_multicast()
                || ip.is_unicast_link_local()
                || ip.to_ipv4_mapped().is_some())
        })
        .collect()
}

/// The IPv6 upstream behind the IPv6 DNS address: the first usable IPv6
/// nameserver of [`RESOLV_CONF`] (or of systemd-resolved's list).
pub fn resolve_upstream6() -> Option<Ipv6Addr> {
    let found = [RESOLV_CONF, RESOLVED_UPSTREAM_CONF].iter().find_map(|p| {
        std::fs::read_to_string(p)
            .ok()
            .and_then(|t| ipv6_nameservers(&t).first().copied())
    });
    match found {
        Some(ip) => info!("dns: IPv6 upstream {ip}"),
        None => info!("dns: no IPv6 nameserver: the IPv6 DNS address is relayed to the IPv4 one"),
    }
    found
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn reader(files: &[(&str, &str)]) -> impl Fn(&Path) -> io::Result<String> {
        let files: HashMap<String, String> = files
            .iter()
            .map(|(p, t)| ((*p).to_owned(), (*t).to_owned()))
            .collect();
        move |p: &Path| {
            files
                .get(p.to_str().unwrap_or_default())
                .cloned()
                .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))
        }
    }

    #[test]
    fn parses_nameservers() {
        let text = "# generated\n\
                    ; another comment\n\
                    search example.com\n\
                    nameserver fe80::1%eth0\n\
                    nameserver   2001:db8::53\n\
                    \tnameserver 192.0.2.53  # trailing words ignored\n\
                    nameserver 198.51.100.1\n\
                    nameserver\n\
                    nameserver not-an-ip\n\
                    options edns0\n\
                    #nameserver 203.0.113.1\n";
        assert_eq!(
            ipv4_nameservers(text),
            vec![Ipv4Addr::new(192, 0, 2, 53), Ipv4Addr::new(198, 51, 100, 1)]
        );
        assert!(ipv4_nameservers("").is_empty());
        assert!(ipv4_nameservers("nameserver ::1\n").is_empty());
        assert!(ipv4_nameservers("nameservers 1.2.3.4\n").is_empty());
    }

    #[test]
    fn flag_wins() {
        let r = reader(&[(RESOLV_CONF, "nameserver 192.0.2.1\n")]);
        assert_eq!(
            resolve_upstream_with(Some(Ipv4Addr::new(9, 9, 9, 9)), &r),
            Some(Ipv4Addr::new(9, 9, 9, 9))
        );
        assert_eq!(resolve_upstream_with(Some(Ipv4Addr::LOCALHOST), &r), None);
    }

    #[test]
    fn first_ipv4_of_resolv_conf() {
        let r = reader(&[(
            RESOLV_CONF,
            "nameserver 2001:db8::1\nnameserver 192.0.2.1\nnameserver 192.0.2.2\n",
        )]);
        assert_eq!(
            resolve_upstream_with(None, &r),
            Some(Ipv4Addr::new(192, 0, 2, 1))
        );
    }

    #[test]
    fn loopback_stub_falls_back_to_systemd_upstreams() {
        let r = reader(&[
            (RESOLV_CONF, "nameserver 127.0.0.53\noptions edns0\n"),
            (
                RESOLVED_UPSTREAM_CONF,
                "nameserver 127.0.0.1\nnameserver 198.51.100.7\n",
            ),
        ]);
        assert_eq!(
            resolve_upstream_with(None, &r),
            Some(Ipv4Addr::new(198, 51, 100, 7))
        );
    }

    #[test]
    fn loopback_without_alternative_is_unavailable() {
        let r = reader(&[(RESOLV_CONF, "nameserver 127.0.0.1\n")]);
        assert_eq!(resolve_upstream_with(None, &r), None);
        let r = reader(&[]);
        assert_eq!(resolve_upstream_with(None, &r), None);
        let r = reader(&[(RESOLV_CONF, "search x\n")]);
        assert_eq!(resolve_upstream_with(None, &r), None);
    }

    #[test]
    fn usable_upstreams() {
        assert!(is_usable_upstream(Ipv4Addr::new(1, 1, 1, 1)));
        assert!(is_usable_upstream(Ipv4Addr::new(10, 0, 0, 1)));
        assert!(!is_usable_upstream(Ipv4Addr::new(127, 0, 0, 53)));
        assert!(!is_usable_upstream(Ipv4Addr::UNSPECIFIED));
        assert!(!is_usable_upstream(Ipv4Addr::BROADCAST));
        assert!(!is_usable_upstream(Ipv4Addr::new(224, 0, 0, 1)));
    }

    #[test]
    fn ipv6_nameservers_skip_what_the_uplink_cannot_reach() {
        let text =
            "nameserver ::1\nnameserver fe80::1\nnameserver 10.0.0.1\nnameserver 2001:db8::53\n";
        assert_eq!(
            ipv6_nameservers(text),
            vec![
                "2001:db8::53"
                    .parse::<Ipv6Addr>()
                    .unwrap_or(Ipv6Addr::UNSPECIFIED)
            ]
        );
    }
}
