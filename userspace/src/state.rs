//! The small state a restarted daemon cannot read back from the kernel.
//!
//! # Theory of operation
//!
//! Flows live in the kernel maps, which outlive the daemon when it keeps
//! its datapath (see `loader`). What does not is the guest's identity
//! towards the gateway's services: its MAC address (the destination of
//! inbound forwards and of the gateway's replies), its DHCP lease (so
//! the renewal of a lease granted before the restart is ACKed, not NAKed),
//! its DHCPv6 lease (client DUID and expiry) and the IPv6 address inbound
//! IPv6 forwards go to. The IPv6 fields are optional, so a file written
//! before them still loads.
//! The daemon writes both to a small JSON file whenever they change —
//! atomically, to a temporary name renamed over the file — and reads it
//! back when it adopts a datapath. Times are stored as wall-clock seconds
//! (an `Instant` means nothing to another process).

use std::{
    fs, io,
    path::{Path, PathBuf},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};
use smoltcp::wire::EthernetAddress;
use thiserror::Error;

/// Errors reading or writing the state file.
#[derive(Debug, Error)]
pub enum StateError {
    /// The file could not be read or written.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The file is not a state file of this version.
    #[error("state file {path}: {source}")]
    Format {
        /// The file.
        path: PathBuf,
        /// The parser's reason.
        source: serde_json::Error,
    },
}

/// The guest's MAC address and DHCP lease.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GuestState {
    /// The guest's MAC address, once learnt.
    guest_mac: Option<[u8; 6]>,
    /// The lease holder's MAC address.
    lease_mac: Option<[u8; 6]>,
    /// The lease's expiry, seconds since the Unix epoch.
    lease_expires_unix: Option<u64>,
    /// The DHCPv6 lease holder's DUID (hex).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    lease6_duid: Option<String>,
    /// The DHCPv6 lease's expiry, seconds since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    lease6_expires_unix: Option<u64>,
    /// The guest's IPv6 address for inbound forwards.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    guest_addr6: Option<std::net::Ipv6Addr>,
}

/// `bytes` as lower-case hex.
fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The bytes of a hex string; `None` if it is not one.
fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| s.get(i..i + 2).and_then(|d| u8::from_str_radix(d, 16).ok()))
        .collect()
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl GuestState {
    /// A state from the services' view.
    pub fn new(
        guest_mac: Option<EthernetAddress>,
        lease: Option<(EthernetAddress, Instant)>,
    ) -> Self {
        let now = Instant::now();
        Self {
            guest_mac: guest_mac.map(|m| m.0),
            lease_mac: lease.map(|(m, _)| m.0),
            lease_expires_unix: lease.map(|(_, e)| {
                unix_now().saturating_add(e.saturating_duration_since(now).as_secs())
            }),
            ..Self::default()
        }
    }

    /// Adds the IPv6 side: the DHCPv6 lease (client DUID, expiry) and the
    /// guest's IPv6 address.
    pub fn with_ipv6(
        mut self,
        lease6: Option<(Vec<u8>, Instant)>,
        addr6: Option<std::net::Ipv6Addr>,
    ) -> Self {
        let now = Instant::now();
        self.lease6_duid = lease6.as_ref().map(|(d, _)| hex(d));
        self.lease6_expires_unix = lease6
            .map(|(_, e)| unix_now().saturating_add(e.saturating_duration_since(now).as_secs()));
        self.guest_addr6 = addr6;
        self
    }

    /// The DHCPv6 lease (client DUID, expiry), if one was granted and has
    /// not expired by now.
    pub fn lease6(&self, now: Instant) -> Option<(Vec<u8>, Instant)> {
        let duid = unhex(self.lease6_duid.as_deref()?)?;
        let left = self.lease6_expires_unix?.checked_sub(unix_now())?;
        (left > 0 && !duid.is_empty())
            .then(|| {
                now.checked_add(Duration::from_secs(left))
                    .map(|e| (duid, e))
            })
            .flatten()
    }

    /// The guest's IPv6 address, if it was known.
    pub fn guest_addr6(&self) -> Option<std::net::Ipv6Addr> {
        self.guest_addr6
    }

    /// Whether `other` says the same (lease expiries within two seconds:
    /// both are rounded from a monotonic clock, so they jitter).
    pub fn same_as(&self, other: &GuestState) -> bool {
        let close = |a: Option<u64>, b: Option<u64>| match (a, b) {
            (Some(a), Some(b)) => a.abs_diff(b) <= 2,
            (a, b) => a == b,
        };
        self.guest_mac == other.guest_mac
            && self.lease_mac == other.lease_mac
            && close(self.lease_expires_unix, other.lease_expires_unix)
            && self.lease6_duid == other.lease6_duid
            && close(self.lease6_expires_unix, other.lease6_expires_unix)
            && self.guest_addr6 == other.guest_addr6
    }

    /// The guest's MAC address, if it was known.
    pub fn guest_mac(&self) -> Option<EthernetAddress> {
        self.guest_mac
            .map(EthernetAddress)
            .filter(EthernetAddress::is_unicast)
    }

    /// The lease (holder, expiry as an `Instant`), if one was granted and
    /// has not expired by now.
    pub fn lease(&self, now: Instant) -> Option<(EthernetAddress, Instant)> {
        let mac = EthernetAddress(self.lease_mac?);
        let left = self.lease_expires_unix?.checked_sub(unix_now())?;
        (left > 0 && mac.is_unicast())
            .then(|| now.checked_add(Duration::from_secs(left)).map(|e| (mac, e)))
            .flatten()
    }

    /// Reads the state file; a missing file is an empty state.
    pub fn load(path: &Path) -> Result<Self, StateError> {
        let text = match fs::read(path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(source) => {
                return Err(StateError::Io {
                    what: "reading",
                    path: path.to_owned(),
                    source,
                });
            }
        };
        serde_json::from_slice(&text).map_err(|source| StateError::Format {
            path: path.to_owned(),
            source,
        })
    }

    /// Writes the state file atomically (temporary file, then rename).
    pub fn save(&self, path: &Path) -> Result<(), StateError> {
        let io_err = |what| {
            move |source| StateError::Io {
                what,
                path: path.to_owned(),
                source,
            }
        };
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir).map_err(io_err("creating the directory of"))?;
        }
        let tmp = path.with_extension("tmp");
        let text = serde_json::to_vec(self).map_err(|source| StateError::Format {
            path: path.to_owned(),
            source,
        })?;
        fs::write(&tmp, text).map_err(io_err("writing"))?;
        fs::rename(&tmp, path).map_err(io_err("replacing"))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_keeps_mac_and_remaining_lease() {
        let dir = std::env::temp_dir().join(format!("tg-state-{}", std::process::id()));
        let path = dir.join("guest.json");
        let mac = EthernetAddress([2, 0, 0, 0, 0, 1]);
        let now = Instant::now();
        let s = GuestState::new(Some(mac), Some((mac, now + Duration::from_secs(3600))));
        s.save(&path).unwrap();
        let back = GuestState::load(&path).unwrap();
        fs::remove_dir_all(&dir).unwrap();
        assert_eq!(back.guest_mac(), Some(mac));
        let (lm, expires) = back.lease(now).unwrap();
        assert_eq!(lm, mac);
        let left = expires.duration_since(now).as_secs();
        assert!((3598..=3600).contains(&left), "{left}");
    }

    #[test]
    fn missing_file_is_empty_and_garbage_is_an_error() {
        let dir = std::env::temp_dir().join(format!("tg-state-g-{}", std::process::id()));
        let path = dir.join("guest.json");
        assert_eq!(GuestState::load(&path).unwrap(), GuestState::default());
        fs::create_dir_all(&dir).unwrap();
        fs::write(&path, b"{not json").unwrap();
        let r = GuestState::load(&path);
        fs::remove_dir_all(&dir).unwrap();
        assert!(matches!(r, Err(StateError::Format { .. })));
    }

    #[test]
    fn rounding_jitter_is_not_a_change() {
        let a = GuestState {
            guest_mac: Some([2, 0, 0, 0, 0, 1]),
            lease_mac: Some([2, 0, 0, 0, 0, 1]),
            lease_expires_unix: Some(1000),
            ..GuestState::default()
        };
        let b = GuestState {
            lease_expires_unix: Some(1001),
            ..a.clone()
        };
        let renewed = GuestState {
            lease_expires_unix: Some(5000),
            ..a.clone()
        };
        assert!(a.same_as(&b));
        assert!(!a.same_as(&renewed));
        assert!(!a.same_as(&GuestState::default()));
    }

    #[test]
    fn ipv6_lease_and_address_round_trip_and_old_files_load() {
        let now = Instant::now();
        let addr: std::net::Ipv6Addr = "fd00::15".parse().unwrap();
        let duid = vec![0, 1, 0, 1, 0xde, 0xad, 0xbe, 0xef];
        let s = GuestState::new(None, None).with_ipv6(
            Some((duid.clone(), now + Duration::from_secs(600))),
            Some(addr),
        );
        let text = serde_json::to_string(&s).unwrap();
        let back: GuestState = serde_json::from_str(&text).unwrap();
        assert!(back.same_as(&s));
        let (d, e) = back.lease6(now).unwrap();
        assert_eq!(d, duid);
        assert!((598..=600).contains(&e.duration_since(now).as_secs()));
        assert_eq!(back.guest_addr6(), Some(addr));
        // A file from before the IPv6 fields.
        let old: GuestState = serde_json::from_str(
            r#"{"guestMac":[2,0,0,0,0,1],"leaseMac":null,"leaseExpiresUnix":null}"#,
        )
        .unwrap();
        assert_eq!(old.lease6(now), None);
        assert_eq!(old.guest_addr6(), None);
        assert_eq!(unhex("zz"), None);
        assert_eq!(unhex("0a0"), None);
    }

    #[test]
    fn expired_lease_is_not_restored() {
        let s = GuestState {
            guest_mac: Some([2, 0, 0, 0, 0, 1]),
            lease_mac: Some([2, 0, 0, 0, 0, 1]),
            lease_expires_unix: Some(unix_now().saturating_sub(5)),
            ..GuestState::default()
        };
        assert!(s.lease(Instant::now()).is_none());
    }
}
