//! Checking that the process may load BPF programs and open raw sockets.
//!
//! # Theory of operation
//!
//! Rather than failing halfway through loading with `EPERM`, tapgate checks
//! its effective capabilities up front (from `/proc/self/status`) and says
//! in one line what it needs.

use std::fs;

/// CAP_NET_ADMIN: attach TC programs.
const CAP_NET_ADMIN: u32 = 12;
/// CAP_NET_RAW: packet and raw sockets.
const CAP_NET_RAW: u32 = 13;
/// CAP_SYS_ADMIN: covers BPF on kernels without CAP_BPF.
const CAP_SYS_ADMIN: u32 = 21;
/// CAP_BPF: load programs and create maps.
const CAP_BPF: u32 = 39;

/// Whether the effective capability set in a `/proc/<pid>/status` text has
/// everything tapgate needs.
pub fn status_has_needed_caps(status: &str) -> bool {
    let Some(eff) = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
    else {
        return false;
    };
    let has = |cap: u32| eff & (1u64 << cap) != 0;
    has(CAP_NET_ADMIN) && has(CAP_NET_RAW) && (has(CAP_BPF) || has(CAP_SYS_ADMIN))
}

/// Whether this process has the capabilities tapgate needs.
pub fn has_needed_caps() -> bool {
    fs::read_to_string("/proc/self/status")
        .map(|s| status_has_needed_caps(&s))
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_caps() {
        assert!(status_has_needed_caps(
            "Name:\tx\nCapEff:\t000001ffffffffff\n"
        ));
    }

    #[test]
    fn no_caps() {
        assert!(!status_has_needed_caps("CapEff:\t0000000000000000\n"));
        assert!(!status_has_needed_caps("Name: x\n"));
        assert!(!status_has_needed_caps("CapEff:\tzz\n"));
    }

    #[test]
    fn bpf_or_sys_admin() {
        let net = (1u64 << CAP_NET_ADMIN) | (1u64 << CAP_NET_RAW);
        let with_bpf = format!("CapEff:\t{:016x}\n", net | (1u64 << CAP_BPF));
        let with_sys = format!("CapEff:\t{:016x}\n", net | (1u64 << CAP_SYS_ADMIN));
        let without = format!("CapEff:\t{net:016x}\n");
        assert!(status_has_needed_caps(&with_bpf));
        assert!(status_has_needed_caps(&with_sys));
        assert!(!status_has_needed_caps(&without));
    }
}
