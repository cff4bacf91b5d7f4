//! Driving busybox `udhcpc` in a guest namespace.
//!
//! # Theory of operation
//!
//! `udhcpc` does the DHCP exchange itself and calls a script for every
//! event (`deconfig`, `bound`, `renew`, `leasefail`, `nak`) with the lease
//! in environment variables. The system's default script must never be
//! used here: under `ip netns exec` it would rewrite the machine's own
//! `/etc/resolv.conf`. [`DhcpClient`] therefore writes a script of its own
//! into a private [`ScratchDir`]. The script configures only the guest
//! interface (`ip addr flush`/`ip addr add ip/mask`, `ip route replace
//! default via router`, the MTU) and appends one line per event to a log
//! file:
//!
//! ```text
//! bound ip=10.0.2.15 mask=24 subnet=255.255.255.0 router=10.0.2.2 dns=10.0.2.3 lease=86400 mtu=1500 serverid=10.0.2.2
//! ```
//!
//! (list values are comma-separated, missing ones empty). Tests read the
//! log with [`DhcpClient::events`] and assert on the parsed
//! [`DhcpEvent`]s. [`DhcpClient::run_once`] runs a bounded one-shot
//! `udhcpc -q -n`; [`DhcpClient::start`] runs it in the background (as a
//! [`Child`]) so lease renewals can be observed.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::child::{Child, check_output, run_with_timeout};
use crate::netns::Netns;
use crate::scratch::ScratchDir;

/// Bound on a one-shot `udhcpc` run (it gives up by itself after ~6 s).
pub const ONE_SHOT_TIMEOUT: Duration = Duration::from_secs(20);

/// One event reported by `udhcpc` to the script.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DhcpEvent {
    /// The event: `deconfig`, `bound`, `renew`, `leasefail`, `nak`.
    pub kind: String,
    /// Offered/leased address (`$ip`).
    pub ip: String,
    /// Prefix length (`$mask`, as busybox passes it).
    pub mask: String,
    /// Dotted subnet mask (`$subnet`).
    pub subnet: String,
    /// Routers, comma-separated (`$router`).
    pub router: String,
    /// DNS servers, comma-separated (`$dns`).
    pub dns: String,
    /// Lease time in seconds (`$lease`).
    pub lease: String,
    /// Interface MTU option (`$mtu`), empty if the server sent none.
    pub mtu: String,
    /// Server identifier (`$serverid`).
    pub serverid: String,
    /// The raw log line.
    pub line: String,
}

impl DhcpEvent {
    /// Parses one line of the script's log; `None` for an empty line.
    pub fn parse(line: &str) -> Option<DhcpEvent> {
        let mut words = line.split_whitespace();
        let mut event = DhcpEvent {
            kind: words.next()?.to_owned(),
            line: line.to_owned(),
            ..DhcpEvent::default()
        };
        for word in words {
            let Some((key, value)) = word.split_once('=') else {
                continue;
            };
            let value = value.to_owned();
            match key {
                "ip" => event.ip = value,
                "mask" => event.mask = value,
                "subnet" => event.subnet = value,
                "router" => event.router = value,
                "dns" => event.dns = value,
                "lease" => event.lease = value,
                "mtu" => event.mtu = value,
                "serverid" => event.serverid = value,
                _ => {}
            }
        }
        Some(event)
    }

    /// Whether this event carries a lease (`bound` or `renew`).
    pub fn is_lease(&self) -> bool {
        self.kind == "bound" || self.kind == "renew"
    }
}

/// The event script; `@LOG@` is replaced by the log path.
const SCRIPT: &str = r#"#!/bin/sh
# udhcpc event script written by tapgate-tests: configures only $interface
# inside the guest namespace; never touches /etc/resolv.conf.
PATH=/usr/sbin:/usr/bin:/sbin:/bin
LOG='@LOG@'
EVENT="$1"
join() { echo $* | tr ' ' ','; }
first() { echo $1; }
case "$EVENT" in
deconfig)
    ip addr flush dev "$interface"
    ip link set dev "$interface" up
    ;;
bound|renew)
    ip addr flush dev "$interface"
    ip addr add "$ip/${mask:-$subnet}" dev "$interface"
    if [ -n "$mtu" ]; then ip link set dev "$interface" mtu "$mtu"; fi
    if [ -n "$router" ]; then
        ip route replace default via "$(first $router)" dev "$interface"
    fi
    ;;
esac
echo "$EVENT ip=$ip mask=$mask subnet=$subnet router=$(join $router) dns=$(join $dns) lease=$lease mtu=$mtu serverid=$serverid" >> "$LOG"
exit 0
"#;

/// A `udhcpc` client for one interface of one namespace, with its private
/// script and event log. A background client started with
/// [`DhcpClient::start`] is stopped on drop.
#[derive(Debug)]
pub struct DhcpClient {
    ns_name: String,
    iface: String,
    script: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    // Declared last: the directory outlives the child using its files.
    dir: ScratchDir,
}

impl DhcpClient {
    /// Prepares a client for `iface` in `ns` (writes the script; runs
    /// nothing yet).
    pub fn new(ns: &Netns, iface: &str) -> Result<DhcpClient> {
        let dir = ScratchDir::new("dhcp")?;
        let script = dir.join("udhcpc.script");
        let log = dir.join("events.log");
        let log_str = log.to_str().context("temporary path is not UTF-8")?;
        if log_str.contains('\'') {
            bail!("temporary path {log_str} contains a quote");
        }
        std::fs::write(&script, SCRIPT.replace("@LOG@", log_str))
            .with_context(|| format!("cannot write {}", script.display()))?;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755))
            .with_context(|| format!("cannot chmod {}", script.display()))?;
        std::fs::write(&log, b"").with_context(|| format!("cannot create {}", log.display()))?;
        Ok(DhcpClient {
            ns_name: ns.name().to_owned(),
            iface: iface.to_owned(),
            script,
            log,
            child: None,
            dir,
        })
    }

    fn command(&self, one_shot: bool) -> Result<std::process::Command> {
        let script = self.script.to_str().context("script path is not UTF-8")?;
        let mut cmd = std::process::Command::new("ip");
        cmd.args(["netns", "exec", &self.ns_name, "busybox", "udhcpc"]);
        cmd.args(["-f", "-i", &self.iface, "-s", script]);
        cmd.args(["-t", "5", "-T", "1", "-A", "1", "-O", "mtu"]);
        if one_shot {
            cmd.args(["-q", "-n"]);
        }
        Ok(cmd)
    }

    /// Runs `udhcpc -q -n` once (bounded by [`ONE_SHOT_TIMEOUT`]) and
    /// returns the `bound` event. The error includes udhcpc's output and the
    /// event log.
    pub fn run_once(&self) -> Result<DhcpEvent> {
        let out = run_with_timeout(&mut self.command(true)?, ONE_SHOT_TIMEOUT)?;
        let what = format!("udhcpc on {} in {}", self.iface, self.ns_name);
        let out = check_output(&what, out).with_context(|| self.log_text())?;
        self.events()?
            .into_iter()
            .rev()
            .find(|e| e.kind == "bound")
            .with_context(|| {
                format!(
                    "{what} succeeded but logged no bound event\nudhcpc stderr:\n{}\n{}",
                    String::from_utf8_lossy(&out.stderr),
                    self.log_text()
                )
            })
    }

    /// Starts udhcpc in the background (without `-q`, so it keeps renewing
    /// the lease until stopped).
    pub fn start(&mut self) -> Result<()> {
        if self.child.is_some() {
            bail!("udhcpc already started");
        }
        self.child = Some(Child::spawn(self.command(false)?, "udhcpc")?);
        Ok(())
    }

    /// The background udhcpc, if started.
    pub fn child(&mut self) -> Option<&mut Child> {
        self.child.as_mut()
    }

    /// All events logged so far, oldest first.
    pub fn events(&self) -> Result<Vec<DhcpEvent>> {
        let text = std::fs::read_to_string(&self.log)
            .with_context(|| format!("cannot read {}", self.log.display()))?;
        Ok(text.lines().filter_map(DhcpEvent::parse).collect())
    }

    /// The event log (and the background udhcpc's stderr), for failure
    /// messages.
    pub fn log_text(&self) -> String {
        let events = std::fs::read_to_string(&self.log).unwrap_or_default();
        let mut text = format!("udhcpc event log:\n{events}");
        if let Some(child) = &self.child {
            text.push_str(&format!("udhcpc stderr:\n{}", child.stderr()));
        }
        text
    }

    /// Waits at most `timeout` for an event of kind `kind` (beyond the first
    /// `skip` such events) and returns it.
    pub fn wait_event(&self, kind: &str, skip: usize, timeout: Duration) -> Result<DhcpEvent> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(event) = self
                .events()?
                .into_iter()
                .filter(|e| e.kind == kind)
                .nth(skip)
            {
                return Ok(event);
            }
            if Instant::now() >= deadline {
                bail!(
                    "no {kind:?} event (after {skip} earlier ones) within {timeout:?}\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Path of the private script directory (for debugging).
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }
}

impl Drop for DhcpClient {
    fn drop(&mut self) {
        // Stop the background client before the directory goes away.
        self.child = None;
    }
}

#[cfg(test)]
mod tests {
    use super::DhcpEvent;

    #[test]
    fn parses_event_lines() {
        let e = DhcpEvent::parse(
            "bound ip=10.0.2.15 mask=24 subnet=255.255.255.0 router=10.0.2.2 \
             dns=10.0.2.3,10.0.2.4 lease=86400 mtu= serverid=10.0.2.2",
        )
        .expect("event");
        assert_eq!(e.kind, "bound");
        assert_eq!(e.ip, "10.0.2.15");
        assert_eq!(e.mask, "24");
        assert_eq!(e.subnet, "255.255.255.0");
        assert_eq!(e.router, "10.0.2.2");
        assert_eq!(e.dns, "10.0.2.3,10.0.2.4");
        assert_eq!(e.lease, "86400");
        assert_eq!(e.mtu, "");
        assert!(e.is_lease());
        assert_eq!(DhcpEvent::parse("   "), None);
    }
}
