//! An attachment's settings as `tapgate run` arguments.
//!
//! # Theory of operation
//!
//! An attachment is exactly a `tapgate run` on the pod's tap, so its
//! settings ([`AttachSettings`], from the CNI network configuration) are
//! turned into the command line `tapgate run` would get and parsed by the
//! same clap definitions: every value is checked by the same parsers, and
//! an error names the flag the setting maps to. The node agent's defaults
//! differ from `tapgate run`'s in two places: every TCP and UDP port of
//! the pod's address is forwarded to the VM unless the settings say
//! otherwise (KubeVirt's masquerade binding does the same), and the flow
//! limit is per attachment ([`DEFAULT_AGENT_MAX_FLOWS`]), since one node
//! serves many guests.

use clap::Parser;

use super::api::AttachSettings;
use crate::cli::{Cli, Command, LogLevel, RunArgs};

/// Default flow limit of one attachment.
pub const DEFAULT_AGENT_MAX_FLOWS: u32 = 16_384;

/// The settings as `tapgate run` flags: `(setting key, flag, value)`
/// (`value` is `None` for a boolean flag that is set). Forwarding SPECs,
/// the flow limit's default and `reservePorts` are added by [`run_args`].
/// The CNI plugin checks a configuration with the same list, so an error
/// names the key the operator wrote.
pub fn run_flags(s: &AttachSettings) -> Vec<(&'static str, &'static str, Option<String>)> {
    let num = |v: Option<u64>| v.map(|v| v.to_string());
    let mut out = Vec::new();
    for (key, flag, value) in [
        ("uplink", "--uplink", s.uplink.clone()),
        ("address", "--address", s.address.clone()),
        ("gateway", "--gateway", s.gateway.clone()),
        ("dns", "--dns", s.dns.clone()),
        ("mac", "--mac", s.mac.clone()),
        ("address6", "--address6", s.address6.clone()),
        ("gateway6", "--gateway6", s.gateway6.clone()),
        ("dns6", "--dns6", s.dns6.clone()),
        (
            "dhcpLease",
            "--dhcp-lease",
            num(s.dhcp_lease.map(u64::from)),
        ),
        ("dnsUpstream", "--dns-upstream", s.dns_upstream.clone()),
        (
            "keepaliveInterval",
            "--keepalive-interval",
            num(s.keepalive_interval),
        ),
        (
            "inactivityInterval",
            "--inactivity-interval",
            num(s.inactivity_interval),
        ),
        (
            "keepaliveProbes",
            "--keepalive-probes",
            num(s.keepalive_probes.map(u64::from)),
        ),
        (
            "lastAckTimeout",
            "--last-ack-timeout",
            num(s.last_ack_timeout),
        ),
        ("udpTimeout", "--udp-timeout", num(s.udp_timeout)),
        ("maxFlows", "--max-flows", num(s.max_flows.map(u64::from))),
    ] {
        if value.is_some() {
            out.push((key, flag, value));
        }
    }
    if s.allow_host == Some(true) {
        out.push(("allowHost", "--allow-host", None));
    }
    if s.ipv6 == Some(false) {
        out.push(("ipv6", "--no-ipv6", None));
    }
    for d in s.dns_search.iter().flatten() {
        out.push(("dnsSearch", "--dns-search", Some(d.clone())));
    }
    out
}

/// The `tapgate run` arguments for serving `ifname` with `settings`.
pub fn run_args(ifname: &str, s: &AttachSettings, log: LogLevel) -> Result<RunArgs, String> {
    let mut argv: Vec<String> = vec![
        "tapgate".into(),
        "run".into(),
        "--tap".into(),
        ifname.into(),
    ];
    for (_, flag, value) in run_flags(s) {
        match value {
            // `--flag=value`: a value starting with `-` stays a value.
            Some(v) => argv.push(format!("{flag}={v}")),
            None => argv.push(flag.to_owned()),
        }
    }
    if s.max_flows.is_none() {
        argv.push(format!("--max-flows={DEFAULT_AGENT_MAX_FLOWS}"));
    }
    let level = match log {
        LogLevel::Off => "off",
        LogLevel::Error => "error",
        LogLevel::Warn => "warn",
        LogLevel::Info => "info",
        LogLevel::Debug => "debug",
        LogLevel::Trace => "trace",
    };
    argv.push(format!("--log-level={level}"));
    let all = vec!["all".to_owned()];
    for (long, specs) in [("--tcp-ports", &s.tcp_ports), ("--udp-ports", &s.udp_ports)] {
        for spec in specs.as_ref().unwrap_or(&all) {
            if spec != "none" {
                argv.push(format!("{long}={spec}"));
            }
        }
    }
    if s.reserve_ports != Some(true) {
        argv.push("--no-reserve-ports".into());
    }
    let cli = Cli::try_parse_from(&argv).map_err(|e| {
        // clap's first line names the flag and the value.
        let text = e.to_string();
        text.lines()
            .next()
            .unwrap_or("invalid settings")
            .trim_start_matches("error: ")
            .to_owned()
    })?;
    let Command::Run(args) = cli.command else {
        return Err("internal error: not a run command".into());
    };
    args.guest_config().map_err(|e| e.to_string())?;
    args.guest_config6().map_err(|e| e.to_string())?;
    args.forwards(crate::fwd::host_ephemeral_range())
        .map_err(|e| format!("port forwarding rules: {e}"))?;
    Ok(args)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn defaults_forward_everything_with_a_per_attachment_limit() {
        let a = run_args("tap0", &AttachSettings::default(), LogLevel::Info).unwrap();
        assert_eq!(a.tap, "tap0");
        assert_eq!(a.tcp_ports, vec!["all"]);
        assert_eq!(a.udp_ports, vec!["all"]);
        assert_eq!(a.max_flows, DEFAULT_AGENT_MAX_FLOWS);
        assert_eq!(a.keepalive_interval, 300);
        assert!(a.no_reserve_ports);
    }

    #[test]
    fn settings_map_onto_flags() {
        let s = AttachSettings {
            address: Some("192.168.100.10/24".into()),
            gateway: Some("192.168.100.1".into()),
            dns: Some("192.168.100.3".into()),
            tcp_ports: Some(vec!["8080:80".into(), "22".into()]),
            udp_ports: Some(vec!["none".into()]),
            keepalive_interval: Some(30),
            inactivity_interval: Some(600),
            allow_host: Some(true),
            ..AttachSettings::default()
        };
        let a = run_args("tap1", &s, LogLevel::Debug).unwrap();
        assert_eq!(a.tcp_ports, vec!["8080:80", "22"]);
        assert!(a.udp_ports.is_empty());
        assert_eq!((a.keepalive_interval, a.inactivity_interval), (30, 600));
        assert!(a.allow_host);
        assert_eq!(a.log_level, LogLevel::Debug);
    }

    #[test]
    fn ipv6_settings_map_onto_flags() {
        let s = AttachSettings {
            address6: Some("fd42::10/64".into()),
            gateway6: Some("fd42::1".into()),
            dns6: Some("fd42::53".into()),
            dns_search: Some(vec!["pod.example".into(), "example".into()]),
            ..AttachSettings::default()
        };
        let a = run_args("tap0", &s, LogLevel::Info).unwrap();
        let c = a.guest_config6().unwrap().unwrap();
        assert_eq!(c.guest_addr.to_string(), "fd42::10");
        assert_eq!(c.gateway.to_string(), "fd42::1");
        assert_eq!(c.search, vec!["pod.example", "example"]);
        let off = AttachSettings {
            ipv6: Some(false),
            ..AttachSettings::default()
        };
        assert!(
            run_args("tap0", &off, LogLevel::Info)
                .unwrap()
                .guest_config6()
                .unwrap()
                .is_none()
        );
        let e = run_args(
            "tap0",
            &AttachSettings {
                gateway6: Some("fd43::1".into()),
                ..AttachSettings::default()
            },
            LogLevel::Info,
        )
        .unwrap_err();
        assert!(e.contains("--gateway6"), "{e}");
    }

    #[test]
    fn bad_values_name_their_flag() {
        let bad = |s: AttachSettings| run_args("tap0", &s, LogLevel::Info).unwrap_err();
        let e = bad(AttachSettings {
            address: Some("10.0.2.300/24".into()),
            ..AttachSettings::default()
        });
        assert!(e.contains("--address"), "{e}");
        let e = bad(AttachSettings {
            gateway: Some("192.168.1.1".into()),
            ..AttachSettings::default()
        });
        assert!(e.contains("--gateway"), "{e}");
        let e = bad(AttachSettings {
            tcp_ports: Some(vec!["100-90".into()]),
            ..AttachSettings::default()
        });
        assert!(e.contains("reversed"), "{e}");
        let e = bad(AttachSettings {
            max_flows: Some(1),
            ..AttachSettings::default()
        });
        assert!(e.contains("--max-flows"), "{e}");
    }
}
